//! [`ObjectStore`] over Amazon S3 (or any S3-compatible service) via aws-sdk-s3.
//!
//! Everything S3-specific stays in this file: the engine only sees
//! [`StoreError`]. The mapping is deliberately narrow: 404 means "not there",
//! 412/409 on a conditional PUT means "another writer won", and everything else
//! is an I/O error whose message says what S3 (or the network) actually said.
//!
//! TLS note: the Rust SDK does not read `AWS_CA_BUNDLE` (only the Python/CLI
//! SDKs do), so a missing or unreadable bundle in the environment cannot break
//! a plain `http://` endpoint such as a local moto or MinIO.

use std::path::Path;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::operation::RequestId;
use aws_sdk_s3::primitives::{ByteStream, DateTime, Length};
use aws_sdk_s3::types::{
    BucketLocationConstraint, ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart,
    CreateBucketConfiguration,
};
use aws_sdk_s3::Client;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use md5::{Digest, Md5};

use super::{
    GetResult, ListPage, ObjectMeta, ObjectStore, PendingUpload, PutCondition, StoreError,
    StoreResult,
};

/// Region used when neither the config nor the environment names one; S3
/// needs some region to sign requests, and us-east-1 is what S3-compatible
/// services expect by default.
const FALLBACK_REGION: &str = "us-east-1";

/// When the SDK adds and verifies CRC checksums.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChecksumMode {
    /// Only when an operation requires them. The default, because many
    /// S3-compatible services (and older S3 clones) reject the SDK's newer
    /// default CRC checksum headers and trailers.
    #[default]
    WhenRequired,
    /// Whenever the operation supports them (the SDK's own default): extra
    /// end-to-end integrity on real S3.
    WhenSupported,
}

/// How to reach the bucket. Anything left `None` comes from the standard AWS
/// chain (environment, profile, IMDS/container roles), so production needs
/// nothing but the bucket name. `Debug` hides the secret key.
#[derive(Clone)]
pub struct S3Config {
    pub bucket: String,
    /// Else `AWS_REGION` / the profile; else `us-east-1`.
    pub region: Option<String>,
    /// Else `AWS_ENDPOINT_URL(_S3)` via the standard chain, else AWS itself.
    pub endpoint_url: Option<String>,
    /// Path-style URLs (`host/bucket/key`); most S3-compatible servers need it.
    pub force_path_style: bool,
    /// A named profile from `~/.aws/config` instead of the default one.
    pub profile: Option<String>,
    /// Explicit access key and secret (tests, embedded servers); else the
    /// standard credential chain. Never printed.
    pub credentials: Option<(String, String)>,
    pub checksums: ChecksumMode,
    /// Attempts per request, including the first (standard retry mode:
    /// exponential backoff on throttling, 5xx and timeouts).
    pub max_attempts: u32,
    /// Limit on establishing a connection.
    pub connect_timeout: Duration,
    /// Limit on one attempt of one request, so a hung connection fails and is
    /// retried instead of blocking a commit forever. Requests that send a
    /// body get more time on top, by [`S3Config::min_upload_rate`].
    pub attempt_timeout: Duration,
    /// Files of at least this many bytes are uploaded as multipart uploads
    /// (parts of [`S3Config::part_size`], several in flight); smaller ones in
    /// one PUT. Never below `part_size`.
    pub multipart_threshold: u64,
    /// Bytes per part of a multipart upload (`--write-part-size`): at least
    /// 5 MiB (S3's minimum for all parts but the last), at most 5 GiB. Grown
    /// for files that would need more than S3's 10,000 parts.
    pub part_size: u64,
    /// Parts of one upload in flight at once; memory use does not grow with
    /// it (parts stream from the file).
    pub parts_in_flight: usize,
    /// The slowest upload bandwidth (bytes per second, shared by the parts in
    /// flight) that still counts as working: a request sending `n` bytes,
    /// with `k - 1` others of the same upload beside it, may take
    /// `attempt_timeout + n * k / min_upload_rate` before it is cut and
    /// retried.
    pub min_upload_rate: u64,
}

/// S3's smallest part (all but the last part of an upload).
pub const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;
/// S3's largest part, and its largest single PUT.
pub const MAX_PART_SIZE: u64 = 5 * 1024 * 1024 * 1024;
/// S3's most parts in one upload.
const MAX_PARTS: u64 = 10_000;

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field(
                "endpoint_url",
                &self.endpoint_url.as_deref().map(redact_userinfo),
            )
            .field("force_path_style", &self.force_path_style)
            .field("profile", &self.profile)
            .field(
                "credentials",
                &self
                    .credentials
                    .as_ref()
                    .map(|(access_key, _)| (access_key, "** redacted **")),
            )
            .field("checksums", &self.checksums)
            .field("max_attempts", &self.max_attempts)
            .field("connect_timeout", &self.connect_timeout)
            .field("attempt_timeout", &self.attempt_timeout)
            .field("multipart_threshold", &self.multipart_threshold)
            .field("part_size", &self.part_size)
            .field("parts_in_flight", &self.parts_in_flight)
            .field("min_upload_rate", &self.min_upload_rate)
            .finish()
    }
}

impl S3Config {
    /// A config for `bucket` with the defaults: standard chains for
    /// region/endpoint/credentials, 5 attempts, 5s connect and 60s attempt
    /// timeouts (plus 1 s per MiB sent at once); files from 16 MiB on go up
    /// in parts of 8 MiB, 8 at a time.
    pub fn new(bucket: impl Into<String>) -> Self {
        S3Config {
            bucket: bucket.into(),
            region: None,
            endpoint_url: None,
            force_path_style: false,
            profile: None,
            credentials: None,
            checksums: ChecksumMode::default(),
            max_attempts: 5,
            connect_timeout: Duration::from_secs(5),
            attempt_timeout: Duration::from_secs(60),
            multipart_threshold: 16 * 1024 * 1024,
            part_size: 8 * 1024 * 1024,
            parts_in_flight: 8,
            min_upload_rate: 1024 * 1024,
        }
    }
}

/// One bucket in S3. Cheap to clone: the SDK client is shared.
#[derive(Debug, Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
    region: String,
    /// The endpoint as given (credentials in the URL removed), for messages.
    endpoint: Option<String>,
    max_attempts: u32,
    connect_timeout: Duration,
    attempt_timeout: Duration,
    /// `max-keys` for LIST; `None` lets S3 choose (1000).
    page_size: Option<i32>,
    multipart_threshold: u64,
    part_size: u64,
    parts_in_flight: usize,
    min_upload_rate: u64,
    checksums: ChecksumMode,
}

impl S3Store {
    /// Builds the client. No request is made: a wrong bucket or credentials
    /// show up on the first operation, with S3's own explanation.
    pub async fn connect(config: S3Config) -> StoreResult<S3Store> {
        if config.bucket.is_empty() {
            return Err(StoreError::io("connect to", "", "S3 bucket name is empty"));
        }
        if !(MIN_PART_SIZE..=MAX_PART_SIZE).contains(&config.part_size) {
            return Err(StoreError::io(
                "connect to",
                &config.bucket,
                format!(
                    "write part size {} is out of range: S3 takes parts of 5 MiB ({MIN_PART_SIZE} bytes) to 5 GiB",
                    config.part_size
                ),
            ));
        }
        // Explicit settings go on the loader so they beat the environment.
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let Some(profile) = &config.profile {
            loader = loader.profile_name(profile);
        }
        if let Some(region) = &config.region {
            loader = loader.region(Region::new(region.clone()));
        }
        if let Some(url) = &config.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        if let Some((access_key, secret)) = &config.credentials {
            loader = loader.credentials_provider(Credentials::new(
                access_key.clone(),
                secret.clone(),
                None,
                None,
                "s4db-config",
            ));
        }
        let sdk_config = loader.load().await;

        let (request_checksums, response_checksums) = match config.checksums {
            ChecksumMode::WhenRequired => (
                RequestChecksumCalculation::WhenRequired,
                ResponseChecksumValidation::WhenRequired,
            ),
            ChecksumMode::WhenSupported => (
                RequestChecksumCalculation::WhenSupported,
                ResponseChecksumValidation::WhenSupported,
            ),
        };
        // The SDK rejects zero attempts; treat it as "no retries".
        let max_attempts = config.max_attempts.max(1);
        let region = sdk_config
            .region()
            .map(|r| r.to_string())
            .unwrap_or_else(|| FALLBACK_REGION.to_string());
        let mut builder = aws_sdk_s3::config::Builder::from(&sdk_config)
            .region(Region::new(region.clone()))
            .force_path_style(config.force_path_style)
            .request_checksum_calculation(request_checksums)
            .response_checksum_validation(response_checksums)
            .retry_config(RetryConfig::standard().with_max_attempts(max_attempts))
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(config.connect_timeout)
                    .operation_attempt_timeout(config.attempt_timeout)
                    .build(),
            );
        if let Some(url) = &config.endpoint_url {
            builder = builder.endpoint_url(url);
        }
        let endpoint = config
            .endpoint_url
            .as_deref()
            .or(sdk_config.endpoint_url())
            .map(redact_userinfo);
        Ok(S3Store {
            client: Client::from_conf(builder.build()),
            bucket: config.bucket,
            region,
            endpoint,
            max_attempts,
            connect_timeout: config.connect_timeout,
            attempt_timeout: config.attempt_timeout,
            page_size: None,
            multipart_threshold: config.multipart_threshold.max(config.part_size),
            part_size: config.part_size,
            parts_in_flight: config.parts_in_flight.max(1),
            min_upload_rate: config.min_upload_rate.max(1),
            checksums: config.checksums,
        })
    }

    /// LIST at most `n` keys per page (tests use tiny pages to exercise
    /// continuation tokens).
    pub fn with_page_size(mut self, n: i32) -> Self {
        self.page_size = Some(n);
        self
    }

    /// The bucket this store writes to.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Creates the bucket (for tests and the embedded demo server); a bucket
    /// we already own is fine.
    pub async fn create_bucket(&self) -> StoreResult<()> {
        let mut request = self.client.create_bucket().bucket(&self.bucket);
        // us-east-1 is the one region that rejects an explicit constraint.
        if self.region != FALLBACK_REGION {
            request = request.create_bucket_configuration(
                CreateBucketConfiguration::builder()
                    .location_constraint(BucketLocationConstraint::from(self.region.as_str()))
                    .build(),
            );
        }
        match request.send().await {
            Ok(_) => Ok(()),
            Err(err) if err.code() == Some("BucketAlreadyOwnedByYou") => Ok(()),
            Err(err) => Err(StoreError::io(
                "create bucket",
                &self.bucket,
                self.error_message(&err, self.attempt_timeout),
            )),
        }
    }

    /// Where requests go, for error messages.
    fn endpoint_label(&self) -> String {
        match &self.endpoint {
            Some(url) => url.clone(),
            None => format!("s3.{}.amazonaws.com", self.region),
        }
    }

    /// Maps an SDK failure: NotFound for 404 (except a missing bucket, which
    /// must not look like an empty database), Conflict when the precondition
    /// of a conditional PUT failed, else Io with a readable message.
    fn map_error<E>(
        &self,
        op: &'static str,
        key: &str,
        condition: &PutCondition,
        err: SdkError<E>,
    ) -> StoreError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        self.map_error_timed(op, key, condition, err, self.attempt_timeout)
    }

    /// [`Self::map_error`] for a request whose attempts had `timeout`.
    fn map_error_timed<E>(
        &self,
        op: &'static str,
        key: &str,
        condition: &PutCondition,
        err: SdkError<E>,
        timeout: Duration,
    ) -> StoreError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        // HEAD responses have no body, hence no code: the status decides.
        let status = err.raw_response().map(|r| r.status().as_u16());
        let code = err.code();
        let conflict = || StoreError::Conflict {
            key: key.to_string(),
        };
        let missing = (status == Some(404) || matches!(code, Some("NoSuchKey" | "NotFound")))
            && code != Some("NoSuchBucket");
        if missing {
            // S3 answers If-Match on a deleted object with 404: the version
            // the writer based its change on is gone, which is a lost race.
            if matches!(condition, PutCondition::IfMatch(_)) {
                return conflict();
            }
            return StoreError::NotFound {
                key: key.to_string(),
            };
        }
        let precondition_failed = status == Some(412)
            || matches!(
                code,
                Some("PreconditionFailed" | "ConditionalRequestConflict")
            );
        if *condition != PutCondition::None && precondition_failed {
            return conflict();
        }
        StoreError::io(op, key, self.error_message(&err, timeout))
    }

    /// One line saying what went wrong, in the terms the user can act on:
    /// S3's code and message with the HTTP status, or which endpoint could not
    /// be reached / timed out. The SDK's error chain is appended where S3 gave
    /// no code, so the message is never just "service error".
    fn error_message<E>(&self, err: &SdkError<E>, timeout: Duration) -> String
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let attempts = if self.max_attempts > 1 {
            format!(" (up to {} attempts)", self.max_attempts)
        } else {
            String::new()
        };
        match err {
            SdkError::ServiceError(_) | SdkError::ResponseError(_) => {
                let status = err
                    .raw_response()
                    .map(|r| r.status().as_u16())
                    .map(|s| format!("HTTP {s}{}", status_reason(s)))
                    .unwrap_or_else(|| "no HTTP status".to_string());
                let request_id = err
                    .request_id()
                    .map(|id| format!(", request id {id}"))
                    .unwrap_or_default();
                match (err.code(), err.message()) {
                    (Some(code), Some(message)) => {
                        format!("S3 error {code}: {message} ({status}{request_id})")
                    }
                    (Some(code), None) => format!("S3 error {code} ({status}{request_id})"),
                    // Unparseable response: the SDK's explanation is the detail.
                    _ if matches!(err, SdkError::ResponseError(_)) => {
                        format!("S3 returned {status}{request_id}: {}", error_chain(err))
                    }
                    // No S3 error document (HEAD, or a proxy's page): show
                    // the start of the body instead of "unhandled error".
                    _ => {
                        let body = err
                            .raw_response()
                            .and_then(|r| r.body().bytes())
                            .map(|b| one_line(&String::from_utf8_lossy(b)))
                            .unwrap_or_default();
                        if body.is_empty() {
                            format!("S3 returned {status}{request_id} with no error details")
                        } else {
                            format!("S3 returned {status}{request_id}: {}", truncate(&body, 200))
                        }
                    }
                }
            }
            SdkError::TimeoutError(_) => format!(
                "timed out after {} waiting for {}{attempts}",
                secs(timeout),
                self.endpoint_label()
            ),
            SdkError::DispatchFailure(failure) => {
                let detail = match failure.as_connector_error() {
                    Some(e) => error_chain(e),
                    None => error_chain(err),
                };
                let detail = detail.strip_prefix("other: ").unwrap_or(&detail);
                if detail.contains("credential") {
                    // Credential resolution fails before anything is sent.
                    format!("no usable AWS credentials: {detail}")
                } else if failure.is_timeout() {
                    format!(
                        "could not connect to {}: timed out after {}{attempts}",
                        self.endpoint_label(),
                        secs(self.connect_timeout)
                    )
                } else if failure.is_io() && detail.to_ascii_lowercase().contains("connect") {
                    format!(
                        "could not connect to {}: {detail}{attempts}",
                        self.endpoint_label()
                    )
                } else {
                    format!(
                        "request to {} failed: {detail}{attempts}",
                        self.endpoint_label()
                    )
                }
            }
            _ => format!("could not send the request: {}", error_chain(err)),
        }
    }

    /// Reads a response body. Body failures happen after the SDK's retry loop
    /// has returned, so the callers retry them themselves.
    async fn read_body(&self, op: &'static str, key: &str, body: ByteStream) -> StoreResult<Bytes> {
        body.collect().await.map(|b| b.into_bytes()).map_err(|e| {
            StoreError::io(
                op,
                key,
                format!(
                    "reading the response body from {} failed: {}",
                    self.endpoint_label(),
                    error_chain(&e)
                ),
            )
        })
    }

    /// Runs `fetch` again when only the body transfer failed (a reset in the
    /// middle of a large download), within the configured attempt budget.
    async fn retry_body<T, F, Fut>(&self, mut fetch: F) -> StoreResult<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, FetchError>>,
    {
        let mut attempt = 1;
        loop {
            match fetch().await {
                Ok(v) => return Ok(v),
                Err(FetchError::Request(e)) => return Err(e),
                Err(FetchError::Body(e)) if attempt >= self.max_attempts => return Err(e),
                Err(FetchError::Body(_)) => {
                    tokio::time::sleep(Duration::from_millis(100 << attempt.min(6))).await;
                    attempt += 1;
                }
            }
        }
    }

    fn put_request(
        &self,
        key: &str,
        body: ByteStream,
        condition: &PutCondition,
    ) -> aws_sdk_s3::operation::put_object::builders::PutObjectFluentBuilder {
        let request = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .body(body);
        match condition {
            PutCondition::None => request,
            PutCondition::IfAbsent => request.if_none_match("*"),
            PutCondition::IfMatch(etag) => request.if_match(etag),
        }
    }

    async fn send_put(
        &self,
        key: &str,
        body: ByteStream,
        len: u64,
        condition: PutCondition,
    ) -> StoreResult<String> {
        let timeout = self.send_timeout(len, 1);
        let output = self
            .put_request(key, body, &condition)
            .customize()
            .config_override(self.timeout_override(timeout))
            .send()
            .await
            .map_err(|e| self.map_error_timed("put", key, &condition, e, timeout))?;
        output
            .e_tag
            .ok_or_else(|| StoreError::io("put", key, "S3 response has no ETag"))
    }

    /// The attempt timeout of a request sending `len` bytes while `sharing`
    /// requests (itself included) share the bandwidth.
    fn send_timeout(&self, len: u64, sharing: usize) -> Duration {
        let secs = len as f64 * sharing as f64 / self.min_upload_rate as f64;
        self.attempt_timeout + Duration::from_secs_f64(secs.min(1e9))
    }

    /// A per-request config that replaces the attempt timeout.
    fn timeout_override(&self, attempt: Duration) -> aws_sdk_s3::config::Builder {
        aws_sdk_s3::config::Builder::default().timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(self.connect_timeout)
                .operation_attempt_timeout(attempt)
                .build(),
        )
    }

    /// The part size for a file of `size` bytes: the configured one, grown
    /// (to a whole MiB) when S3's 10,000 parts would not hold the file.
    fn part_size_for(&self, size: u64) -> u64 {
        const MIB: u64 = 1024 * 1024;
        let needed = size.div_ceil(MAX_PARTS).div_ceil(MIB) * MIB;
        self.part_size.max(needed)
    }

    /// Uploads a file as a multipart upload: parts read from the file at
    /// their offsets, [`S3Config::parts_in_flight`] at a time, each retried by
    /// the SDK under its own timeout. Whatever goes wrong (or when the future
    /// is dropped), the upload is aborted, so no parts are left behind.
    ///
    /// Preconditions: `IfAbsent` sends `If-None-Match: *` with the
    /// CompleteMultipartUpload, which makes the create atomic on S3; a HEAD
    /// first saves uploading a whole file only to lose. `IfMatch` sends
    /// `If-Match` there likewise and checks the ETag with a HEAD first, which
    /// is all the protection on servers that ignore the header on
    /// CompleteMultipartUpload (moto 5.2.5 does; it honours `If-None-Match`).
    async fn put_multipart(
        &self,
        key: &str,
        path: &Path,
        size: u64,
        condition: PutCondition,
    ) -> StoreResult<String> {
        self.check_condition(key, &condition).await?;
        self.multipart_upload(key, path, size, condition).await
    }

    /// The HEAD before a multipart upload: a conflict the completion would
    /// meet, found before any part is sent.
    async fn check_condition(&self, key: &str, condition: &PutCondition) -> StoreResult<()> {
        if *condition == PutCondition::None {
            return Ok(());
        }
        match (condition, self.head(key).await) {
            (PutCondition::IfAbsent, Err(StoreError::NotFound { .. })) => Ok(()),
            (PutCondition::IfMatch(etag), Ok(meta)) if meta.etag.as_ref() == Some(etag) => Ok(()),
            (_, Ok(_) | Err(StoreError::NotFound { .. })) => Err(StoreError::Conflict {
                key: key.to_string(),
            }),
            (_, Err(e)) => Err(e),
        }
    }

    /// [`Self::put_multipart`] without the HEAD: start, parts, complete (with
    /// the conditional header), abort on failure.
    async fn multipart_upload(
        &self,
        key: &str,
        path: &Path,
        size: u64,
        condition: PutCondition,
    ) -> StoreResult<String> {
        let upload_id = self.create_upload(key).await?;
        let part_size = self.part_size_for(size);
        self.finish_upload(key, path, size, upload_id, part_size, Vec::new(), condition)
            .await
    }

    /// CreateMultipartUpload: the new upload's id.
    async fn create_upload(&self, key: &str) -> StoreResult<String> {
        let mut create = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key);
        if self.checksums == ChecksumMode::WhenSupported {
            create = create.checksum_algorithm(ChecksumAlgorithm::Crc32);
        }
        create
            .send()
            .await
            .map_err(|e| self.map_error("start multipart upload of", key, &PutCondition::None, e))?
            .upload_id
            .ok_or_else(|| {
                StoreError::io(
                    "start multipart upload of",
                    key,
                    "S3 response has no upload id",
                )
            })
    }

    /// Sends the parts of the file not in `kept`, then completes the upload;
    /// aborts it on failure (or when dropped unfinished).
    #[allow(clippy::too_many_arguments)]
    async fn finish_upload(
        &self,
        key: &str,
        path: &Path,
        size: u64,
        upload_id: String,
        part_size: u64,
        kept: Vec<CompletedPart>,
        condition: PutCondition,
    ) -> StoreResult<String> {
        let guard = AbortOnDrop {
            store: self.clone(),
            key: key.to_string(),
            upload_id: Some(upload_id.clone()),
        };
        let result = self
            .upload_parts_and_complete(key, path, size, &upload_id, part_size, kept, &condition)
            .await;
        match result {
            Ok(etag) => {
                guard.disarm();
                Ok(etag)
            }
            Err(e) => {
                guard.abort().await;
                Err(e)
            }
        }
    }

    /// Sends every part of the file but those in `kept`, then completes.
    #[allow(clippy::too_many_arguments)]
    async fn upload_parts_and_complete(
        &self,
        key: &str,
        path: &Path,
        size: u64,
        upload_id: &str,
        part_size: u64,
        kept: Vec<CompletedPart>,
        condition: &PutCondition,
    ) -> StoreResult<String> {
        let count = size.div_ceil(part_size).max(1);
        let missing: Vec<u64> = (0..count)
            .filter(|i| !kept.iter().any(|p| p.part_number == Some(*i as i32 + 1)))
            .collect();
        let in_flight = self.parts_in_flight.min(missing.len()).max(1);
        let timeout = self.send_timeout(part_size, in_flight);
        let uploads = futures::stream::iter(missing)
            .map(|i| {
                let offset = i * part_size;
                let len = part_size.min(size - offset);
                self.upload_file_part(key, path, upload_id, i as i32 + 1, offset, len, timeout)
            })
            .buffer_unordered(in_flight);
        let mut parts: Vec<CompletedPart> = uploads.try_collect().await?;
        parts.extend(kept);
        parts.sort_by_key(|p| p.part_number);
        let expected_etag = multipart_etag(&parts);

        let mut complete = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            );
        complete = match condition {
            PutCondition::None => complete,
            PutCondition::IfAbsent => complete.if_none_match("*"),
            PutCondition::IfMatch(etag) => complete.if_match(etag),
        };
        match complete.send().await {
            Ok(output) => output.e_tag.ok_or_else(|| {
                StoreError::io(
                    "complete multipart upload of",
                    key,
                    "S3 response has no ETag",
                )
            }),
            // A retry of a completion whose reply was lost: the upload is
            // gone because it became the object. Ours if the ETag says so.
            Err(e) if e.code() == Some("NoSuchUpload") => {
                match (self.head(key).await, expected_etag) {
                    (
                        Ok(ObjectMeta {
                            etag: Some(etag), ..
                        }),
                        Some(expected),
                    ) if etag == expected => Ok(etag),
                    _ => Err(StoreError::io(
                        "complete multipart upload of",
                        key,
                        self.error_message(&e, self.attempt_timeout),
                    )),
                }
            }
            Err(e) => Err(self.map_error("complete multipart upload of", key, condition, e)),
        }
    }

    /// One part: `len` bytes of the file from `offset`, streamed from disk
    /// (and re-read on a retry).
    #[allow(clippy::too_many_arguments)]
    async fn upload_file_part(
        &self,
        key: &str,
        path: &Path,
        upload_id: &str,
        number: i32,
        offset: u64,
        len: u64,
        timeout: Duration,
    ) -> StoreResult<CompletedPart> {
        let body = ByteStream::read_from()
            .path(path)
            .offset(offset)
            .length(Length::Exact(len))
            .build()
            .await
            .map_err(|e| {
                StoreError::io(
                    "read local file for",
                    key,
                    format!("{} (part {number}): {}", path.display(), error_chain(&e)),
                )
            })?;
        self.send_part(key, upload_id, number, body, len, timeout)
            .await
    }

    /// UploadPart of `body` (`len` bytes), under `timeout` per attempt.
    async fn send_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        body: ByteStream,
        len: u64,
        timeout: Duration,
    ) -> StoreResult<CompletedPart> {
        let mut request = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(number)
            .content_length(len as i64)
            .body(body);
        if self.checksums == ChecksumMode::WhenSupported {
            request = request.checksum_algorithm(ChecksumAlgorithm::Crc32);
        }
        let output = request
            .customize()
            // Unsigned payload, as parts streamed from a file always are:
            // parts sent from memory would otherwise cost a SHA-256 pass
            // over their bytes each. TLS guards the bytes in transit, and
            // `--checksums when-supported` adds a CRC32 that S3 checks.
            .disable_payload_signing()
            .config_override(self.timeout_override(timeout))
            .send()
            .await
            .map_err(|e| {
                let op = "upload part of";
                let err = self.map_error_timed(op, key, &PutCondition::None, e, timeout);
                match err {
                    // The upload is gone (aborted by gc, say): not "no such key".
                    StoreError::NotFound { .. } => StoreError::io(
                        op,
                        key,
                        format!("part {number}: the multipart upload no longer exists"),
                    ),
                    other => other,
                }
            })?;
        let etag = output
            .e_tag
            .ok_or_else(|| StoreError::io("upload part of", key, "S3 response has no ETag"))?;
        Ok(CompletedPart::builder()
            .part_number(number)
            .e_tag(etag)
            .set_checksum_crc32(output.checksum_crc32)
            .build())
    }

    async fn abort_upload(&self, key: &str, upload_id: &str) -> StoreResult<()> {
        match self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            // Already aborted or completed.
            Err(e) if e.code() == Some("NoSuchUpload") => Ok(()),
            Err(e) => {
                match self.map_error("abort multipart upload of", key, &PutCondition::None, e) {
                    StoreError::NotFound { .. } => Ok(()),
                    other => Err(other),
                }
            }
        }
    }
}

/// Aborts a multipart upload unless disarmed: awaited on the error path, and
/// spawned on the runtime when the uploading future is dropped unfinished.
struct AbortOnDrop {
    store: S3Store,
    key: String,
    upload_id: Option<String>,
}

impl AbortOnDrop {
    fn disarm(mut self) {
        self.upload_id = None;
    }

    async fn abort(mut self) {
        if let Some(id) = self.upload_id.take() {
            abort_logged(&self.store, &self.key, &id).await;
        }
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        let Some(id) = self.upload_id.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let store = self.store.clone();
                let key = std::mem::take(&mut self.key);
                runtime.spawn(async move { abort_logged(&store, &key, &id).await });
            }
            Err(_) => tracing::warn!(
                "multipart upload {id} of {} left unfinished (no runtime to abort it on); gc aborts it later",
                self.key
            ),
        }
    }
}

async fn abort_logged(store: &S3Store, key: &str, upload_id: &str) {
    if let Err(e) = store.abort_upload(key, upload_id).await {
        tracing::warn!("{e}; gc aborts the upload later");
    }
}

/// The ETag S3 gives a multipart object of these parts (MD5 of the parts'
/// binary MD5s, a dash, the part count), when every part ETag is a plain MD5.
/// Only to recognise our own object after a lost reply: no ETag of a data
/// file is ever compared with an MD5 of its content.
fn multipart_etag(parts: &[CompletedPart]) -> Option<String> {
    let mut md5 = Md5::new();
    for part in parts {
        let hex = part.e_tag()?.trim_matches('"');
        if hex.len() != 32 {
            return None;
        }
        for i in (0..32).step_by(2) {
            md5.update([u8::from_str_radix(hex.get(i..i + 2)?, 16).ok()?]);
        }
    }
    let digest: String = md5.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Some(format!("\"{digest}-{}\"", parts.len()))
}

/// Separates "the request failed" (already retried by the SDK, final) from
/// "the body transfer failed" (worth another try).
enum FetchError {
    Request(StoreError),
    Body(StoreError),
}

#[async_trait]
impl ObjectStore for S3Store {
    fn describe(&self) -> String {
        match &self.endpoint {
            Some(url) => format!("s3://{} at {url}", self.bucket),
            None => format!("s3://{}", self.bucket),
        }
    }

    async fn get(&self, key: &str) -> StoreResult<GetResult> {
        self.retry_body(|| async {
            let output = self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(key)
                .send()
                .await
                .map_err(|e| {
                    FetchError::Request(self.map_error("get", key, &PutCondition::None, e))
                })?;
            let etag = output.e_tag.ok_or_else(|| {
                FetchError::Request(StoreError::io("get", key, "S3 response has no ETag"))
            })?;
            let data = self
                .read_body("get", key, output.body)
                .await
                .map_err(FetchError::Body)?;
            Ok(GetResult { data, etag })
        })
        .await
    }

    async fn get_range(&self, key: &str, offset: u64, len: u64) -> StoreResult<Bytes> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        let last = offset.saturating_add(len - 1);
        self.retry_body(|| async {
            let result = self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(key)
                .range(format!("bytes={offset}-{last}"))
                .send()
                .await;
            let output = match result {
                Ok(output) => output,
                // Range starts at or past the end (including empty objects).
                Err(e)
                    if e.raw_response().map(|r| r.status().as_u16()) == Some(416)
                        || e.code() == Some("InvalidRange") =>
                {
                    return Ok(Bytes::new());
                }
                Err(e) => {
                    return Err(FetchError::Request(self.map_error(
                        "get",
                        key,
                        &PutCondition::None,
                        e,
                    )))
                }
            };
            let ranged = output.content_range.is_some();
            let data = self
                .read_body("get", key, output.body)
                .await
                .map_err(FetchError::Body)?;
            if ranged {
                return Ok(data);
            }
            // Some S3-compatible servers ignore Range and send the whole
            // object with 200; cut the requested slice out of it.
            let start = usize::try_from(offset)
                .unwrap_or(usize::MAX)
                .min(data.len());
            let end = usize::try_from(last.saturating_add(1))
                .unwrap_or(usize::MAX)
                .min(data.len());
            Ok(data.slice(start..end))
        })
        .await
    }

    async fn put(&self, key: &str, data: Bytes, condition: PutCondition) -> StoreResult<String> {
        let len = data.len() as u64;
        self.send_put(key, ByteStream::from(data), len, condition)
            .await
    }

    /// Streams from disk (and re-reads the file on a retry) so data files of
    /// any size never sit in memory; files from the multipart threshold on go
    /// up in parts (see [`S3Store::put_multipart`]).
    async fn put_file(
        &self,
        key: &str,
        path: &Path,
        condition: PutCondition,
    ) -> StoreResult<String> {
        let size = local_size(key, path).await?;
        if size >= self.multipart_threshold {
            return self.put_multipart(key, path, size, condition).await;
        }
        let body = ByteStream::read_from()
            .path(path)
            .length(Length::Exact(size))
            .build()
            .await
            .map_err(|e| {
                StoreError::io(
                    "read local file for",
                    key,
                    format!("{}: {}", path.display(), error_chain(&e)),
                )
            })?;
        self.send_put(key, body, size, condition).await
    }

    fn part_layout(&self) -> Option<crate::remote::PartLayout> {
        Some(crate::remote::PartLayout {
            threshold: self.multipart_threshold,
            part_size: self.part_size,
            parts_in_flight: self.parts_in_flight,
        })
    }

    async fn start_multipart_upload(&self, key: &str) -> StoreResult<String> {
        self.create_upload(key).await
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        data: Bytes,
    ) -> StoreResult<crate::remote::SentPart> {
        let len = data.len() as u64;
        let crc = crc32fast::hash(&data);
        let timeout = self.send_timeout(len, self.parts_in_flight);
        let part = self
            .send_part(key, upload_id, number, ByteStream::from(data), len, timeout)
            .await?;
        Ok(crate::remote::SentPart {
            number,
            etag: part.e_tag.unwrap_or_default(),
            checksum_crc32: part.checksum_crc32,
            crc,
            len,
        })
    }

    /// Keeps the parts of `early` that fit the file (every part but the last
    /// is `part_size` bytes), sends the rest from the file and completes,
    /// with the precondition checked as in [`S3Store::put_multipart`]. An
    /// upload S3 cannot take (part size out of range, too many parts) is
    /// aborted and the file sent as by `put_file`.
    async fn put_file_with_parts(
        &self,
        key: &str,
        path: &Path,
        condition: PutCondition,
        early: crate::remote::EarlyUpload,
    ) -> StoreResult<String> {
        let size = local_size(key, path).await?;
        let part_size = early.part_size;
        let count = size.div_ceil(part_size).max(1);
        if !(MIN_PART_SIZE..=MAX_PART_SIZE).contains(&part_size) || count > MAX_PARTS {
            abort_logged(self, key, &early.upload_id).await;
            return self.put_file(key, path, condition).await;
        }
        if let Err(e) = self.check_condition(key, &condition).await {
            abort_logged(self, key, &early.upload_id).await;
            return Err(e);
        }
        let kept: Vec<CompletedPart> = early
            .parts
            .iter()
            .filter(|p| {
                p.number >= 1 && {
                    let offset = early.part_offset(p.number);
                    offset < size && p.len == part_size.min(size - offset)
                }
            })
            .map(|p| {
                CompletedPart::builder()
                    .part_number(p.number)
                    .e_tag(&p.etag)
                    .set_checksum_crc32(p.checksum_crc32.clone())
                    .build()
            })
            .collect();
        self.finish_upload(key, path, size, early.upload_id, part_size, kept, condition)
            .await
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        match self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            // S3 itself answers 204 for a missing key; some clones say 404.
            Err(e) => match self.map_error("delete", key, &PutCondition::None, e) {
                StoreError::NotFound { .. } => Ok(()),
                other => Err(other),
            },
        }
    }

    async fn head(&self, key: &str) -> StoreResult<ObjectMeta> {
        let output = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| self.map_error("head", key, &PutCondition::None, e))?;
        Ok(ObjectMeta {
            key: key.to_string(),
            size: size_of(output.content_length),
            last_modified: system_time(output.last_modified),
            etag: output.e_tag,
        })
    }

    /// Every page of ListMultipartUploads under `prefix`. (moto 5.2.5 reports
    /// every upload as initiated in 2010, so there any grace period has passed.)
    async fn list_multipart_uploads(&self, prefix: &str) -> StoreResult<Vec<PendingUpload>> {
        let mut all = Vec::new();
        let (mut key_marker, mut id_marker) = (None, None);
        loop {
            let output = self
                .client
                .list_multipart_uploads()
                .bucket(&self.bucket)
                .prefix(prefix)
                .set_key_marker(key_marker)
                .set_upload_id_marker(id_marker)
                .send()
                .await
                .map_err(|e| {
                    self.map_error("list multipart uploads of", prefix, &PutCondition::None, e)
                })?;
            all.extend(
                output
                    .uploads
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|u| {
                        Some(PendingUpload {
                            key: u.key?,
                            upload_id: u.upload_id?,
                            initiated: system_time(u.initiated),
                        })
                    }),
            );
            if output.is_truncated != Some(true) {
                return Ok(all);
            }
            if output.next_key_marker.is_none() && output.next_upload_id_marker.is_none() {
                return Err(StoreError::io(
                    "list multipart uploads of",
                    prefix,
                    "S3 said the listing is truncated but sent no markers",
                ));
            }
            key_marker = output.next_key_marker;
            id_marker = output.next_upload_id_marker;
        }
    }

    async fn abort_multipart_upload(&self, key: &str, upload_id: &str) -> StoreResult<()> {
        self.abort_upload(key, upload_id).await
    }

    async fn list_page(&self, prefix: &str, continuation: Option<String>) -> StoreResult<ListPage> {
        let output = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .set_continuation_token(continuation)
            .set_max_keys(self.page_size)
            .send()
            .await
            .map_err(|e| self.map_error("list", prefix, &PutCondition::None, e))?;
        let next = if output.is_truncated == Some(true) {
            match output.next_continuation_token {
                Some(token) => Some(token),
                // Without a token the caller would loop on page one forever.
                None => {
                    return Err(StoreError::io(
                        "list",
                        prefix,
                        "S3 said the listing is truncated but sent no continuation token",
                    ))
                }
            }
        } else {
            None
        };
        let objects = output
            .contents
            .unwrap_or_default()
            .into_iter()
            .filter_map(|object| {
                Some(ObjectMeta {
                    key: object.key?,
                    size: size_of(object.size),
                    last_modified: system_time(object.last_modified),
                    etag: object.e_tag,
                })
            })
            .collect();
        Ok(ListPage { objects, next })
    }
}

/// S3 sizes are `i64`; a missing or negative one means empty.
/// The size of the local file `path` to be sent as `key`.
async fn local_size(key: &str, path: &Path) -> StoreResult<u64> {
    match tokio::fs::metadata(path).await {
        Ok(meta) => Ok(meta.len()),
        Err(e) => Err(StoreError::io(
            "read local file for",
            key,
            format!("{}: {}", path.display(), one_line(&e.to_string())),
        )),
    }
}

fn size_of(size: Option<i64>) -> u64 {
    size.and_then(|s| u64::try_from(s).ok()).unwrap_or(0)
}

/// S3 timestamps as `SystemTime`; a missing or unrepresentable one becomes
/// the epoch rather than failing the whole call.
fn system_time(time: Option<DateTime>) -> SystemTime {
    time.and_then(|t| SystemTime::try_from(t).ok())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// "60s", or "1.5s" for fractional values.
fn secs(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// Joins a multi-line error chain into one line.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// At most `max` characters of `s`, marking the cut.
fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

/// An error and its sources as one line, "outer: inner: root", skipping
/// levels that only repeat what is already said. Like the SDK's
/// `DisplayErrorContext` without the trailing `Debug` dump.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = one_line(&err.to_string());
    let mut source = err.source();
    while let Some(e) = source {
        let text = one_line(&e.to_string());
        if !text.is_empty() && !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = e.source();
    }
    out
}

/// Drops `user:password@` from an endpoint URL so it can go into messages.
fn redact_userinfo(url: &str) -> String {
    let (scheme, rest) = match url.find("://") {
        Some(i) => (&url[..i + 3], &url[i + 3..]),
        None => ("", url),
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}{}", &rest[at + 1..]),
        None => url.to_string(),
    }
}

/// A short reason phrase for the statuses S3 commonly returns.
fn status_reason(status: u16) -> &'static str {
    match status {
        400 => " Bad Request",
        401 => " Unauthorized",
        403 => " Forbidden",
        404 => " Not Found",
        405 => " Method Not Allowed",
        409 => " Conflict",
        412 => " Precondition Failed",
        416 => " Range Not Satisfiable",
        500 => " Internal Server Error",
        501 => " Not Implemented",
        502 => " Bad Gateway",
        503 => " Service Unavailable",
        504 => " Gateway Timeout",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    //! These run against a real moto server (`pip install 'moto[server]'`),
    //! found via `S4DB_MOTO_SERVER` or a `.venv` next to Cargo.toml. They fail
    //! rather than skip when it is missing, so a green run means S3 was tested.

    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::path::PathBuf;
    use std::process::{Child, Command, Stdio};
    use std::sync::Arc;
    use std::time::Instant;

    const SECRET: &str = "s3cr3t-must-not-leak";

    fn moto_executable() -> PathBuf {
        if let Some(path) = std::env::var_os("S4DB_MOTO_SERVER") {
            let path = PathBuf::from(path);
            assert!(
                path.is_file(),
                "S4DB_MOTO_SERVER={} is not a file",
                path.display()
            );
            return path;
        }
        let candidates =
            [PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv-test/py10/bin/moto_server")];
        candidates
            .iter()
            .find(|p| p.is_file())
            .cloned()
            .unwrap_or_else(|| {
                panic!(
                    "moto_server not found: set S4DB_MOTO_SERVER to its path or run \
                     `scripts/test.sh --setup-only` (looked in {candidates:?})"
                )
            })
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("bind 127.0.0.1:0")
    }

    /// True once the server answers an HTTP request with a status line.
    fn answers(port: u16) -> bool {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let request = "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
        if stream.write_all(request.as_bytes()).is_err() {
            return false;
        }
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.")
    }

    /// A moto server on a free port, killed on drop.
    struct Moto {
        child: Child,
        port: u16,
        _log_dir: tempfile::TempDir,
    }

    impl Moto {
        fn start() -> Moto {
            let exe = moto_executable();
            let log_dir = tempfile::tempdir().expect("temp dir");
            let log_path = log_dir.path().join("moto.log");
            // The port can be taken between probing and binding; try a few.
            for _ in 0..3 {
                let port = free_port();
                let log = std::fs::File::create(&log_path).expect("create moto log");
                let mut child = Command::new(&exe)
                    .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                    // moto runs boto3 internally, which fails on a profile
                    // that does not exist; the client-side env is not its business.
                    .env_remove("AWS_PROFILE")
                    .env_remove("AWS_DEFAULT_PROFILE")
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(log)
                    .spawn()
                    .unwrap_or_else(|e| panic!("cannot start {}: {e}", exe.display()));
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    if answers(port) {
                        return Moto {
                            child,
                            port,
                            _log_dir: log_dir,
                        };
                    }
                    if matches!(child.try_wait(), Ok(Some(_))) || Instant::now() > deadline {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            panic!(
                "moto_server ({}) did not come up; its log:\n{log}",
                exe.display()
            );
        }

        fn url(&self) -> String {
            format!("http://127.0.0.1:{}", self.port)
        }

        fn config(&self, bucket: &str) -> S3Config {
            config_for(&self.url(), bucket)
        }

        /// A store on a freshly created bucket.
        async fn store(&self, bucket: &str) -> S3Store {
            let store = S3Store::connect(self.config(bucket))
                .await
                .expect("connect");
            store.create_bucket().await.expect("create bucket");
            store
        }
    }

    impl Drop for Moto {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn config_for(url: &str, bucket: &str) -> S3Config {
        S3Config {
            region: Some("us-east-1".into()),
            endpoint_url: Some(url.to_string()),
            force_path_style: true,
            credentials: Some(("AKIDS4DBTEST".into(), SECRET.into())),
            max_attempts: 2,
            connect_timeout: Duration::from_secs(2),
            attempt_timeout: Duration::from_secs(20),
            ..S3Config::new(bucket)
        }
    }

    fn io_message<T: std::fmt::Debug>(result: StoreResult<T>) -> String {
        match result {
            Err(err @ StoreError::Io { .. }) => {
                let message = err.to_string();
                eprintln!("Io message: {message}");
                assert!(!message.contains(SECRET), "secret leaked: {message}");
                message
            }
            other => panic!("expected Io, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn the_store_contract_holds_on_moto() {
        let moto = Moto::start();
        // A small page size makes every LIST of the contract span several pages.
        let store = moto.store("s4db-contract").await.with_page_size(2);
        crate::remote::contract::check(&store).await;
        let page = store.list_page("db/", None).await.unwrap();
        assert_eq!(page.objects.len(), 2);
        assert!(page.next.is_some());
        let listed = store.list("db/").await.unwrap();
        assert!(listed.iter().all(|o| o.etag.is_some()), "{listed:?}");
    }

    #[tokio::test]
    async fn put_file_streams_from_disk() {
        let moto = Moto::start();
        let store = moto.store("s4db-file").await;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();

        let etag = store
            .put_file("db/data", &path, PutCondition::IfAbsent)
            .await
            .unwrap();
        let got = store.get("db/data").await.unwrap();
        assert_eq!(got.etag, etag);
        assert!(got.data[..] == data[..], "downloaded data differs");
        assert_eq!(
            &store.get_range("db/data", 1_000_000, 16).await.unwrap()[..],
            &data[1_000_000..1_000_016]
        );
        crate::remote::contract::assert_conflict(
            store
                .put_file("db/data", &path, PutCondition::IfAbsent)
                .await,
        );
        let message = io_message(
            store
                .put_file("db/x", &dir.path().join("absent"), PutCondition::None)
                .await,
        );
        assert!(message.contains("absent"), "{message}");
    }

    #[tokio::test]
    async fn checksums_when_supported_work_too() {
        let moto = Moto::start();
        let config = S3Config {
            checksums: ChecksumMode::WhenSupported,
            ..moto.config("s4db-crc")
        };
        let store = S3Store::connect(config).await.unwrap();
        store.create_bucket().await.unwrap();
        let etag = store
            .put("k", Bytes::from_static(b"checked"), PutCondition::IfAbsent)
            .await
            .unwrap();
        let got = store.get("k").await.unwrap();
        assert_eq!((&got.data[..], got.etag), (&b"checked"[..], etag));
    }

    #[tokio::test]
    async fn missing_bucket_is_an_error_not_an_empty_database() {
        let moto = Moto::start();
        let store = S3Store::connect(moto.config("s4db-never-created"))
            .await
            .unwrap();
        let message = io_message(store.get("db/manifest").await);
        assert!(message.contains("NoSuchBucket"), "{message}");
        assert!(message.contains("HTTP 404"), "{message}");
        let message = io_message(store.list("db/").await);
        assert!(message.contains("NoSuchBucket"), "{message}");
    }

    #[tokio::test]
    async fn unreachable_endpoint_says_so() {
        let port = free_port(); // nothing listens here
        let url = format!("http://127.0.0.1:{port}");
        let config = S3Config {
            max_attempts: 1,
            ..config_for(&url, "s4db-down")
        };
        let store = S3Store::connect(config).await.unwrap();
        assert_eq!(store.describe(), format!("s3://s4db-down at {url}"));
        let message = io_message(store.get("k").await);
        assert!(
            message.contains(&format!("could not connect to {url}")),
            "{message}"
        );
    }

    #[tokio::test]
    async fn hung_server_times_out() {
        // Accepts connections and never answers.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let config = S3Config {
            max_attempts: 1,
            attempt_timeout: Duration::from_secs(1),
            ..config_for(&url, "s4db-hung")
        };
        let store = S3Store::connect(config).await.unwrap();
        let started = Instant::now();
        let message = io_message(store.head("k").await);
        assert!(message.contains("timed out after 1s"), "{message}");
        assert!(started.elapsed() < Duration::from_secs(10));
        drop(listener);
    }

    /// Serves `response` to every connection, like a proxy or a broken clone.
    fn canned_server(response: &'static str) -> String {
        canned_server_counting(response).0
    }

    /// Like [`canned_server`], also counting the requests served.
    fn canned_server_counting(
        response: &'static str,
    ) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = served.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut request = Vec::new();
                let mut byte = [0u8; 1];
                while !request.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
                    request.push(byte[0]);
                }
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = stream.write_all(response.as_bytes());
            }
        });
        (url, served)
    }

    #[tokio::test]
    async fn truncated_bodies_are_retried_then_reported() {
        // Promises 100 bytes, sends 5, closes.
        let (url, served) = canned_server_counting(
            "HTTP/1.1 200 OK\r\nETag: \"e\"\r\nContent-Length: 100\r\nConnection: close\r\n\r\nshort",
        );
        let config = S3Config {
            max_attempts: 3,
            ..config_for(&url, "s4db-short")
        };
        let store = S3Store::connect(config).await.unwrap();
        let message = io_message(store.get("k").await);
        assert!(message.contains("reading the response body"), "{message}");
        assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn errors_without_an_s3_error_body_still_say_something() {
        let url = canned_server(
            "HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/html\r\nContent-Length: 19\r\nConnection: close\r\n\r\n<html>oops</html>\r\n",
        );
        let config = S3Config {
            max_attempts: 1,
            ..config_for(&url, "s4db-proxy")
        };
        let store = S3Store::connect(config).await.unwrap();
        let message = io_message(store.get("k").await);
        assert!(message.contains("HTTP 502 Bad Gateway"), "{message}");
        assert!(message.contains("<html>oops</html>"), "{message}");
        let message = io_message(store.head("k").await);
        assert!(message.contains("HTTP 502 Bad Gateway"), "{message}");

        let url = canned_server(
            "HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
        let store = S3Store::connect(config_for(&url, "s4db-denied"))
            .await
            .unwrap();
        let message = io_message(store.head("k").await);
        assert!(message.contains("HTTP 403 Forbidden"), "{message}");
        assert!(!message.contains("unhandled"), "{message}");
    }

    #[test]
    fn describe_and_helpers() {
        assert_eq!(
            redact_userinfo("http://user:pw@minio:9000/x"),
            "http://minio:9000/x"
        );
        assert_eq!(redact_userinfo("http://minio:9000"), "http://minio:9000");
        assert_eq!(secs(Duration::from_secs(60)), "60s");
        assert_eq!(secs(Duration::from_millis(1500)), "1.5s");
        assert_eq!(one_line("a\n  b\tc"), "a b c");
        assert_eq!(truncate("abcdef", 3), "abc...");
        assert_eq!(truncate("ab", 3), "ab");
        let config = S3Config::new("b");
        assert_eq!(config.max_attempts, 5);
        assert_eq!(config.checksums, ChecksumMode::WhenRequired);
    }

    #[tokio::test]
    async fn describe_without_endpoint() {
        let config = S3Config {
            region: Some("eu-west-1".into()),
            credentials: Some(("AKID".into(), SECRET.into())),
            ..S3Config::new("plain")
        };
        assert!(!format!("{config:?}").contains(SECRET));
        let store = S3Store::connect(config).await.unwrap();
        assert!(!format!("{store:?}").contains(SECRET));
        // AWS_ENDPOINT_URL in the environment would legitimately change this.
        if std::env::var_os("AWS_ENDPOINT_URL").is_none()
            && std::env::var_os("AWS_ENDPOINT_URL_S3").is_none()
        {
            assert_eq!(store.describe(), "s3://plain");
        }
    }

    // ------------------------------------------------------------ multipart

    const MIB: u64 = 1024 * 1024;

    /// Multipart from 5 MiB on, in 5 MiB parts (S3's minimum).
    fn multipart_config(moto: &Moto, bucket: &str) -> S3Config {
        S3Config {
            multipart_threshold: 5 * MIB,
            part_size: 5 * MIB,
            parts_in_flight: 2,
            ..moto.config(bucket)
        }
    }

    async fn multipart_store(moto: &Moto, bucket: &str) -> S3Store {
        let store = S3Store::connect(multipart_config(moto, bucket))
            .await
            .unwrap();
        store.create_bucket().await.unwrap();
        store
    }

    /// A 12 MiB file (parts of 5, 5 and 2 MiB) of bytes that differ per position.
    fn twelve_mib_file(dir: &Path) -> (PathBuf, Vec<u8>) {
        let data: Vec<u8> = (0..12 * MIB as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let path = dir.join("data");
        std::fs::write(&path, &data).unwrap();
        (path, data)
    }

    async fn pending(store: &S3Store) -> Vec<PendingUpload> {
        store.list_multipart_uploads("").await.unwrap()
    }

    /// Fails every request whose URI contains `pattern` (with a note when
    /// `notify` is set, letting it through instead).
    #[derive(Debug)]
    struct OnRequest {
        pattern: &'static str,
        fail: bool,
        seen: Arc<tokio::sync::Notify>,
    }

    impl aws_sdk_s3::config::Intercept for OnRequest {
        fn name(&self) -> &'static str {
            "OnRequest"
        }

        fn read_before_transmit(
            &self,
            context: &aws_sdk_s3::config::interceptors::BeforeTransmitInterceptorContextRef<'_>,
            _: &aws_sdk_s3::config::RuntimeComponents,
            _: &mut aws_sdk_s3::config::ConfigBag,
        ) -> Result<(), aws_sdk_s3::error::BoxError> {
            if !context.request().uri().contains(self.pattern) {
                return Ok(());
            }
            self.seen.notify_one();
            if self.fail {
                return Err(format!("injected failure of {}", self.pattern).into());
            }
            Ok(())
        }
    }

    impl S3Store {
        fn with_interceptor(mut self, interceptor: OnRequest) -> S3Store {
            let config = self
                .client
                .config()
                .to_builder()
                .interceptor(interceptor)
                .build();
            self.client = Client::from_conf(config);
            self
        }
    }

    #[tokio::test]
    async fn large_files_upload_in_parts_and_read_back_identical() {
        let moto = Moto::start();
        let store = multipart_store(&moto, "s4db-multipart").await;
        let dir = tempfile::tempdir().unwrap();
        let (path, data) = twelve_mib_file(dir.path());

        let etag = store
            .put_file("db/big", &path, PutCondition::IfAbsent)
            .await
            .unwrap();
        assert!(etag.ends_with("-3\""), "not a 3-part upload: {etag}");
        let expected = {
            let parts: Vec<CompletedPart> = data
                .chunks(5 * MIB as usize)
                .enumerate()
                .map(|(i, c)| {
                    let md5: String = Md5::digest(c).iter().map(|b| format!("{b:02x}")).collect();
                    CompletedPart::builder()
                        .part_number(i as i32 + 1)
                        .e_tag(format!("\"{md5}\""))
                        .build()
                })
                .collect();
            multipart_etag(&parts)
        };
        assert_eq!(expected.as_deref(), Some(etag.as_str()));
        let got = store.get("db/big").await.unwrap();
        assert_eq!(got.etag, etag);
        assert!(got.data[..] == data[..], "downloaded data differs");
        assert_eq!(store.head("db/big").await.unwrap().size, 12 * MIB);
        // Ranges across both part boundaries, and the tail.
        for (offset, len) in [
            (5 * MIB - 10, 20),
            (10 * MIB - 3, 6),
            (0, 11 * MIB),
            (12 * MIB - 5, 100),
        ] {
            let want = &data[offset as usize..((offset + len) as usize).min(data.len())];
            let have = store.get_range("db/big", offset, len).await.unwrap();
            assert!(have[..] == want[..], "range {offset}+{len} differs");
        }
        // Create-only: the HEAD sees the object, nothing is uploaded.
        crate::remote::contract::assert_conflict(
            store
                .put_file("db/big", &path, PutCondition::IfAbsent)
                .await,
        );
        // Replacing by ETag works; a stale ETag is a conflict.
        let again = store
            .put_file("db/big", &path, PutCondition::IfMatch(etag.clone()))
            .await
            .unwrap();
        assert_eq!(again, etag, "same parts, same ETag");
        crate::remote::contract::assert_conflict(
            store
                .put_file("db/big", &path, PutCondition::IfMatch("\"stale\"".into()))
                .await,
        );
        assert!(pending(&store).await.is_empty());
        // Below the threshold: one PUT, a plain MD5 ETag.
        let small = dir.path().join("small");
        std::fs::write(&small, &data[..(5 * MIB - 1) as usize]).unwrap();
        let etag = store
            .put_file("db/small", &small, PutCondition::IfAbsent)
            .await
            .unwrap();
        assert!(!etag.contains('-'), "{etag}");
    }

    #[tokio::test]
    async fn if_none_match_on_complete_is_a_conflict_and_leaves_no_upload() {
        // The race the HEAD cannot see: the object appears after it. moto
        // 5.2.5 honours If-None-Match on CompleteMultipartUpload, like S3.
        let moto = Moto::start();
        let store = multipart_store(&moto, "s4db-mp-race").await;
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = twelve_mib_file(dir.path());
        store
            .put(
                "db/raced",
                Bytes::from_static(b"winner"),
                PutCondition::IfAbsent,
            )
            .await
            .unwrap();
        crate::remote::contract::assert_conflict(
            store
                .multipart_upload("db/raced", &path, 12 * MIB, PutCondition::IfAbsent)
                .await,
        );
        assert_eq!(&store.get("db/raced").await.unwrap().data[..], b"winner");
        assert!(pending(&store).await.is_empty());
    }

    #[tokio::test]
    async fn a_failed_part_aborts_the_upload() {
        let moto = Moto::start();
        let store = multipart_store(&moto, "s4db-mp-fail")
            .await
            .with_interceptor(OnRequest {
                pattern: "partNumber=2",
                fail: true,
                seen: Arc::default(),
            });
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = twelve_mib_file(dir.path());
        let message = io_message(
            store
                .put_file("db/big", &path, PutCondition::IfAbsent)
                .await,
        );
        assert!(message.contains("upload part of db/big"), "{message}");
        assert!(
            pending(&store).await.is_empty(),
            "the upload was not aborted"
        );
        crate::remote::contract::assert_not_found(store.head("db/big").await);

        // A file that shrank under the upload fails reading its last part.
        std::fs::write(&path, vec![1u8; 6 * MIB as usize]).unwrap();
        let message = io_message(
            store
                .multipart_upload("db/short", &path, 12 * MIB, PutCondition::None)
                .await,
        );
        assert!(message.contains("read local file"), "{message}");
        assert!(pending(&store).await.is_empty());
    }

    #[tokio::test]
    async fn a_dropped_upload_is_aborted() {
        let moto = Moto::start();
        let seen = Arc::new(tokio::sync::Notify::new());
        let store = multipart_store(&moto, "s4db-mp-drop")
            .await
            .with_interceptor(OnRequest {
                pattern: "partNumber=",
                fail: false,
                seen: seen.clone(),
            });
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = twelve_mib_file(dir.path());
        tokio::select! {
            r = store.put_file("db/big", &path, PutCondition::IfAbsent) => {
                panic!("finished before it could be dropped: {r:?}")
            }
            _ = seen.notified() => {}
        }
        // The abort runs on a spawned task.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !pending(&store).await.is_empty() {
            assert!(Instant::now() < deadline, "the upload was not aborted");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        crate::remote::contract::assert_not_found(store.head("db/big").await);
    }

    #[tokio::test]
    async fn stale_uploads_are_listed_and_aborted_under_the_prefix() {
        let moto = Moto::start();
        let store = moto.store("s4db-mp-stale").await;
        let mut ids = Vec::new();
        for key in ["db/data-1", "db/data-2", "other/data-3"] {
            let out = store
                .client
                .create_multipart_upload()
                .bucket(&store.bucket)
                .key(key)
                .send()
                .await
                .unwrap();
            ids.push(out.upload_id.unwrap());
        }
        let listed = store.list_multipart_uploads("db/").await.unwrap();
        let keys: Vec<_> = listed.iter().map(|u| u.key.as_str()).collect();
        assert_eq!(keys, ["db/data-1", "db/data-2"]);
        assert!(listed.iter().all(|u| ids.contains(&u.upload_id)));
        // moto reports every upload as started in 2010, so an hour is old enough.
        let aborted = crate::remote::abort_stale_uploads(&store, "db/", Duration::from_secs(3600))
            .await
            .unwrap();
        assert_eq!(aborted.len(), 2);
        assert!(store
            .list_multipart_uploads("db/")
            .await
            .unwrap()
            .is_empty());
        assert_eq!(store.list_multipart_uploads("").await.unwrap().len(), 1);
        // Aborting again is fine.
        store
            .abort_multipart_upload("db/data-1", &ids[0])
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn multipart_with_checksums_when_supported() {
        let moto = Moto::start();
        let config = S3Config {
            checksums: ChecksumMode::WhenSupported,
            ..multipart_config(&moto, "s4db-mp-crc")
        };
        let store = S3Store::connect(config).await.unwrap();
        store.create_bucket().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (path, data) = twelve_mib_file(dir.path());
        store
            .put_file("db/big", &path, PutCondition::IfAbsent)
            .await
            .unwrap();
        assert!(store.get("db/big").await.unwrap().data[..] == data[..]);
    }

    #[tokio::test]
    async fn part_sizes_and_timeouts() {
        let store = S3Store::connect(S3Config {
            credentials: Some(("AKID".into(), SECRET.into())),
            region: Some("us-east-1".into()),
            ..S3Config::new("b")
        })
        .await
        .unwrap();
        assert_eq!(store.part_size_for(4 * 1024 * MIB), 8 * MIB);
        // 100 GiB would need 12,800 parts of 8 MiB: 11 MiB parts fit.
        assert_eq!(store.part_size_for(100 * 1024 * MIB), 11 * MIB);
        assert_eq!(store.send_timeout(0, 1), Duration::from_secs(60));
        assert_eq!(store.send_timeout(8 * MIB, 8), Duration::from_secs(60 + 64));
        for bad in [MIN_PART_SIZE - 1, MAX_PART_SIZE + 1] {
            let err = S3Store::connect(S3Config {
                part_size: bad,
                ..S3Config::new("b")
            })
            .await
            .unwrap_err();
            assert!(err.to_string().contains("part size"), "{err}");
        }
    }
}
