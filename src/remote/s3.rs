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
use aws_sdk_s3::primitives::{ByteStream, DateTime};
use aws_sdk_s3::types::{BucketLocationConstraint, CreateBucketConfiguration};
use aws_sdk_s3::Client;
use bytes::Bytes;

use super::{GetResult, ListPage, ObjectMeta, ObjectStore, PutCondition, StoreError, StoreResult};

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
    /// retried instead of blocking a commit forever.
    pub attempt_timeout: Duration,
}

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
            .finish()
    }
}

impl S3Config {
    /// A config for `bucket` with the defaults: standard chains for
    /// region/endpoint/credentials, 5 attempts, 5s connect and 60s attempt timeouts.
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
}

impl S3Store {
    /// Builds the client. No request is made: a wrong bucket or credentials
    /// show up on the first operation, with S3's own explanation.
    pub async fn connect(config: S3Config) -> StoreResult<S3Store> {
        if config.bucket.is_empty() {
            return Err(StoreError::io("connect to", "", "S3 bucket name is empty"));
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
                self.error_message(&err),
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
        StoreError::io(op, key, self.error_message(&err))
    }

    /// One line saying what went wrong, in the terms the user can act on:
    /// S3's code and message with the HTTP status, or which endpoint could not
    /// be reached / timed out. The SDK's error chain is appended where S3 gave
    /// no code, so the message is never just "service error".
    fn error_message<E>(&self, err: &SdkError<E>) -> String
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
                secs(self.attempt_timeout),
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
        condition: PutCondition,
    ) -> StoreResult<String> {
        let output = self
            .put_request(key, body, &condition)
            .send()
            .await
            .map_err(|e| self.map_error("put", key, &condition, e))?;
        output
            .e_tag
            .ok_or_else(|| StoreError::io("put", key, "S3 response has no ETag"))
    }
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
        self.send_put(key, ByteStream::from(data), condition).await
    }

    /// Streams from disk (and re-reads the file on a retry) so data files of
    /// any size never sit in memory.
    async fn put_file(
        &self,
        key: &str,
        path: &Path,
        condition: PutCondition,
    ) -> StoreResult<String> {
        let body = ByteStream::from_path(path).await.map_err(|e| {
            StoreError::io(
                "read local file for",
                key,
                format!("{}: {}", path.display(), error_chain(&e)),
            )
        })?;
        self.send_put(key, body, condition).await
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
}
