//! A wrapper that counts requests by kind, for `.s4db/stats` and benchmarks:
//! "zero S3 requests for `ls -l`" is a claim the counters can check. Each
//! request is also recorded in the Prometheus metrics ([`crate::metrics`]):
//! by operation and outcome, with its latency and the body bytes it moved.

use super::{GetResult, ListPage, ObjectMeta, ObjectStore, PutCondition, StoreError, StoreResult};
use async_trait::async_trait;
use bytes::Bytes;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Requests sent to the wrapped store, by kind (a LIST page counts once).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct RequestCounts {
    pub get: u64,
    pub get_range: u64,
    pub put: u64,
    pub delete: u64,
    pub list: u64,
    pub head: u64,
    /// The most requests that were in flight at once (overlap, not queueing).
    pub max_in_flight: u64,
}

#[derive(Debug, Default)]
struct Counters {
    get: AtomicU64,
    get_range: AtomicU64,
    put: AtomicU64,
    delete: AtomicU64,
    list: AtomicU64,
    head: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
}

/// Counts every request, then forwards it unchanged.
#[derive(Debug)]
pub struct MeteredStore {
    inner: Arc<dyn ObjectStore>,
    counters: Counters,
}

impl MeteredStore {
    pub fn new(inner: Arc<dyn ObjectStore>) -> MeteredStore {
        MeteredStore {
            inner,
            counters: Counters::default(),
        }
    }

    pub fn counts(&self) -> RequestCounts {
        let c = &self.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RequestCounts {
            get: load(&c.get),
            get_range: load(&c.get_range),
            put: load(&c.put),
            delete: load(&c.delete),
            list: load(&c.list),
            head: load(&c.head),
            max_in_flight: load(&c.max_in_flight),
        }
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Counts a request as in flight until dropped.
struct InFlight<'a>(&'a Counters);

impl<'a> InFlight<'a> {
    fn start(c: &'a Counters) -> InFlight<'a> {
        let now = c.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        c.max_in_flight.fetch_max(now, Ordering::Relaxed);
        InFlight(c)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How a request ended, for the `outcome` label.
fn outcome<T>(r: &StoreResult<T>) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(StoreError::NotFound { .. }) => "not_found",
        Err(StoreError::Conflict { .. }) => "conflict",
        Err(StoreError::Io { .. }) => "error",
    }
}

/// Records one request that ended in the Prometheus metrics.
fn record<T>(op: &'static str, started: Instant, r: &StoreResult<T>, received: u64, sent: u64) {
    crate::metrics::global().s3_request(op, started, outcome(r), received, sent);
}

#[async_trait]
impl ObjectStore for MeteredStore {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    async fn get(&self, key: &str) -> StoreResult<GetResult> {
        bump(&self.counters.get);
        let _flying = InFlight::start(&self.counters);
        let _gauge = crate::metrics::global().s3_start();
        let started = Instant::now();
        let r = self.inner.get(key).await;
        let got = r.as_ref().map_or(0, |g| g.data.len() as u64);
        record("get", started, &r, got, 0);
        r
    }

    async fn get_range(&self, key: &str, offset: u64, len: u64) -> StoreResult<Bytes> {
        bump(&self.counters.get_range);
        let _flying = InFlight::start(&self.counters);
        let _gauge = crate::metrics::global().s3_start();
        let started = Instant::now();
        let r = self.inner.get_range(key, offset, len).await;
        let got = r.as_ref().map_or(0, |b| b.len() as u64);
        record("get_range", started, &r, got, 0);
        r
    }

    async fn put(&self, key: &str, data: Bytes, condition: PutCondition) -> StoreResult<String> {
        bump(&self.counters.put);
        let _gauge = crate::metrics::global().s3_start();
        let started = Instant::now();
        let sent = data.len() as u64;
        let r = self.inner.put(key, data, condition).await;
        record("put", started, &r, 0, if r.is_ok() { sent } else { 0 });
        r
    }

    async fn put_file(
        &self,
        key: &str,
        path: &Path,
        condition: PutCondition,
    ) -> StoreResult<String> {
        bump(&self.counters.put);
        let _gauge = crate::metrics::global().s3_start();
        let started = Instant::now();
        let sent = std::fs::metadata(path).map_or(0, |m| m.len());
        let r = self.inner.put_file(key, path, condition).await;
        record("put", started, &r, 0, if r.is_ok() { sent } else { 0 });
        r
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        bump(&self.counters.delete);
        let _gauge = crate::metrics::global().s3_start();
        let started = Instant::now();
        let r = self.inner.delete(key).await;
        record("delete", started, &r, 0, 0);
        r
    }

    async fn head(&self, key: &str) -> StoreResult<ObjectMeta> {
        bump(&self.counters.head);
        let _gauge = crate::metrics::global().s3_start();
        let started = Instant::now();
        let r = self.inner.head(key).await;
        record("head", started, &r, 0, 0);
        r
    }

    async fn list_page(&self, prefix: &str, continuation: Option<String>) -> StoreResult<ListPage> {
        bump(&self.counters.list);
        let _gauge = crate::metrics::global().s3_start();
        let started = Instant::now();
        let r = self.inner.list_page(prefix, continuation).await;
        record("list", started, &r, 0, 0);
        r
    }

    async fn list_multipart_uploads(&self, prefix: &str) -> StoreResult<Vec<super::PendingUpload>> {
        self.inner.list_multipart_uploads(prefix).await
    }

    async fn abort_multipart_upload(&self, key: &str, upload_id: &str) -> StoreResult<()> {
        self.inner.abort_multipart_upload(key, upload_id).await
    }

    fn part_layout(&self) -> Option<super::PartLayout> {
        self.inner.part_layout()
    }

    async fn start_multipart_upload(&self, key: &str) -> StoreResult<String> {
        self.inner.start_multipart_upload(key).await
    }

    /// A part sent ahead counts as a PUT of its bytes.
    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        data: Bytes,
    ) -> StoreResult<super::SentPart> {
        bump(&self.counters.put);
        let _gauge = crate::metrics::global().s3_start();
        let started = Instant::now();
        let sent = data.len() as u64;
        let r = self.inner.upload_part(key, upload_id, number, data).await;
        record("put", started, &r, 0, if r.is_ok() { sent } else { 0 });
        r
    }

    /// Counted as one PUT, as [`ObjectStore::put_file`] is.
    async fn put_file_with_parts(
        &self,
        key: &str,
        path: &Path,
        condition: PutCondition,
        early: super::EarlyUpload,
    ) -> StoreResult<String> {
        bump(&self.counters.put);
        let _gauge = crate::metrics::global().s3_start();
        let started = Instant::now();
        let size = std::fs::metadata(path).map_or(0, |m| m.len());
        let kept: u64 = early.parts.iter().map(|p| p.len).sum();
        let r = self
            .inner
            .put_file_with_parts(key, path, condition, early)
            .await;
        let sent = size.saturating_sub(kept);
        record("put", started, &r, 0, if r.is_ok() { sent } else { 0 });
        r
    }
}
