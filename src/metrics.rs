//! Prometheus metrics of a mount: S3 requests, FUSE calls, uploads, commits,
//! compaction, gc and the state of the database, in the text format that
//! `prometheus-client` encodes, served at `/metrics` by [`serve`] when
//! `s4db-mount --metrics-addr` asks for it.
//!
//! The counters are process-wide ([`global`]): the metered store, the FUSE
//! adapter and the upload path record into them whether or not anything
//! scrapes (an atomic add per event). What is a state rather than an event
//! (keys, live bytes, unsynced writes, resident memory) is read at scrape time
//! from the [`Snapshot`] source that the mount installs with [`set_source`].

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant, SystemTime};

/// One S3 request kind and how it ended (`ok`, `not_found`, `conflict`, `error`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct S3Labels {
    pub op: &'static str,
    pub outcome: &'static str,
}

/// An operation (S3 request kind or FUSE call).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    pub op: &'static str,
}

/// A FUSE call that replied with an error, by errno name (`ENOENT`, ...).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrnoLabels {
    pub op: &'static str,
    pub errno: String,
}

/// How a maintenance run ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn s3_histogram() -> Histogram {
    // 1 ms .. 24 s
    Histogram::new(exponential_buckets(0.001, 2.5, 12))
}

fn fuse_histogram() -> Histogram {
    // 10 µs .. 42 s
    Histogram::new(exponential_buckets(0.000_01, 4.0, 12))
}

/// Every metric the daemon records.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    s3_requests: Family<S3Labels, Counter>,
    s3_duration: HistogramFamily<OpLabel>,
    s3_received: Family<OpLabel, Counter>,
    s3_sent: Family<OpLabel, Counter>,
    s3_in_flight: Gauge,
    fuse_requests: Family<OpLabel, Counter>,
    fuse_duration: HistogramFamily<OpLabel>,
    fuse_errors: Family<ErrnoLabels, Counter>,
    fuse_read_bytes: Counter,
    fuse_written_bytes: Counter,
    /// Successful FUSE reads (for the cache misses: reads minus hits).
    fuse_reads_ok: AtomicU64,
    uploads: Family<OutcomeLabel, Counter>,
    upload_files: Counter,
    upload_bytes: Counter,
    commits: Counter,
    conflicts: Counter,
    rebases: Counter,
    last_upload: Gauge<f64, AtomicU64>,
    compactions: Family<OutcomeLabel, Counter>,
    compaction_removed_objects: Counter,
    compaction_removed_bytes: Counter,
    gc_runs: Family<OutcomeLabel, Counter>,
    gc_removed_objects: Counter,
    listing_pages: Family<OutcomeLabel, Counter>,
    gc_removed_bytes: Counter,
    /// Bytes written through the mount since the upload that will carry them began.
    unsynced_bytes: AtomicI64,
}

/// The state of the mounted database at one scrape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub keys: u64,
    pub live_bytes: u64,
    pub data_files: u64,
    pub unsynced_entries: u64,
    pub unpublished_files: u64,
    pub oldest_unsynced_write: Option<Duration>,
    pub open_files: u64,
    pub cache_hits: u64,
}

type Source = Arc<dyn Fn() -> Option<Snapshot> + Send + Sync>;

fn source() -> &'static RwLock<Option<Source>> {
    static SOURCE: OnceLock<RwLock<Option<Source>>> = OnceLock::new();
    SOURCE.get_or_init(|| RwLock::new(None))
}

/// Installs what scrapes read the database's state from (the mount's `S4Fs`).
pub fn set_source(f: impl Fn() -> Option<Snapshot> + Send + Sync + 'static) {
    *source().write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(f));
}

/// The process's metrics.
pub fn global() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// The symbolic name of an errno, as `errno(1)` prints it.
pub fn errno_name(errno: i32) -> String {
    let name = match errno {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EINTR => "EINTR",
        libc::EIO => "EIO",
        libc::ENXIO => "ENXIO",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::EXDEV => "EXDEV",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::EFBIG => "EFBIG",
        libc::ENOSPC => "ENOSPC",
        libc::EROFS => "EROFS",
        libc::EMLINK => "EMLINK",
        libc::ERANGE => "ERANGE",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::ENOSYS => "ENOSYS",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ELOOP => "ELOOP",
        libc::ENODATA => "ENODATA",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ECANCELED => "ECANCELED",
        _ => return errno.to_string(),
    };
    name.to_string()
}

/// The daemon's resident set size, from `/proc/self/statm`.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * page.max(4096) as u64)
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut r = Registry::with_prefix("s4db");
        let m = Metrics {
            registry: Registry::default(),
            s3_requests: Family::default(),
            s3_duration: Family::new_with_constructor(s3_histogram),
            s3_received: Family::default(),
            s3_sent: Family::default(),
            s3_in_flight: Gauge::default(),
            fuse_requests: Family::default(),
            fuse_duration: Family::new_with_constructor(fuse_histogram),
            fuse_errors: Family::default(),
            fuse_read_bytes: Counter::default(),
            fuse_written_bytes: Counter::default(),
            fuse_reads_ok: AtomicU64::new(0),
            uploads: Family::default(),
            upload_files: Counter::default(),
            upload_bytes: Counter::default(),
            commits: Counter::default(),
            conflicts: Counter::default(),
            rebases: Counter::default(),
            last_upload: Gauge::default(),
            listing_pages: Family::default(),
            compactions: Family::default(),
            compaction_removed_objects: Counter::default(),
            compaction_removed_bytes: Counter::default(),
            gc_runs: Family::default(),
            gc_removed_objects: Counter::default(),
            gc_removed_bytes: Counter::default(),
            unsynced_bytes: AtomicI64::new(0),
        };
        r.register(
            "s3_requests",
            "S3 requests sent, by operation and outcome (ok, not_found, conflict, error)",
            m.s3_requests.clone(),
        );
        r.register_with_unit(
            "s3_request_duration",
            "S3 request latency, by operation (retries included)",
            Unit::Seconds,
            m.s3_duration.clone(),
        );
        r.register_with_unit(
            "s3_received",
            "Bytes received in S3 response bodies, by operation",
            Unit::Bytes,
            m.s3_received.clone(),
        );
        r.register_with_unit(
            "s3_sent",
            "Bytes sent in S3 request bodies, by operation",
            Unit::Bytes,
            m.s3_sent.clone(),
        );
        r.register(
            "s3_requests_in_flight",
            "S3 requests sent and not answered yet",
            m.s3_in_flight.clone(),
        );
        r.register(
            "fuse_requests",
            "FUSE calls answered, by operation",
            m.fuse_requests.clone(),
        );
        r.register_with_unit(
            "fuse_request_duration",
            "FUSE call latency from the kernel's request to the reply, by operation",
            Unit::Seconds,
            m.fuse_duration.clone(),
        );
        r.register(
            "fuse_errors",
            "FUSE calls answered with an error, by operation and errno",
            m.fuse_errors.clone(),
        );
        r.register_with_unit(
            "fuse_read",
            "Bytes returned by FUSE reads",
            Unit::Bytes,
            m.fuse_read_bytes.clone(),
        );
        r.register_with_unit(
            "fuse_written",
            "Bytes taken by FUSE writes",
            Unit::Bytes,
            m.fuse_written_bytes.clone(),
        );
        r.register(
            "uploads",
            "Uploads that had writes to publish, by outcome (ok, error)",
            m.uploads.clone(),
        );
        r.register(
            "upload_files",
            "Data files uploaded",
            m.upload_files.clone(),
        );
        r.register_with_unit(
            "upload",
            "Bytes of data files uploaded",
            Unit::Bytes,
            m.upload_bytes.clone(),
        );
        r.register(
            "commits",
            "Index commits published (conditional PUTs of the index that won)",
            m.commits.clone(),
        );
        r.register(
            "commit_conflicts",
            "Commits that found another writer's index first (each is rebased, or fails the upload)",
            m.conflicts.clone(),
        );
        r.register(
            "rebases",
            "Rebases of local writes onto another writer's index",
            m.rebases.clone(),
        );
        r.register_with_unit(
            "last_upload_timestamp",
            "When the last successful upload finished (Unix time; 0: none yet)",
            Unit::Seconds,
            m.last_upload.clone(),
        );
        r.register(
            "listing_pages",
            "READDIRPLUS pages sent, by how they were made (ahead: while the kernel took in the \
             last page; remade: made ahead, but a change overlapped it; on_request)",
            m.listing_pages.clone(),
        );
        r.register(
            "compactions",
            "Compaction runs, by outcome (ok, error)",
            m.compactions.clone(),
        );
        r.register(
            "compaction_removed_objects",
            "Data objects compaction removed (net: old files deleted less new files written)",
            m.compaction_removed_objects.clone(),
        );
        r.register_with_unit(
            "compaction_removed",
            "Bytes compaction removed (net: old files' bytes less new files' bytes)",
            Unit::Bytes,
            m.compaction_removed_bytes.clone(),
        );
        r.register(
            "gc_runs",
            "Garbage collection runs, by outcome (ok, error)",
            m.gc_runs.clone(),
        );
        r.register(
            "gc_removed_objects",
            "Unreferenced data objects garbage collection deleted",
            m.gc_removed_objects.clone(),
        );
        r.register_with_unit(
            "gc_removed",
            "Bytes of the data objects garbage collection deleted",
            Unit::Bytes,
            m.gc_removed_bytes.clone(),
        );
        r.register_collector(Box::new(StateCollector));
        Metrics { registry: r, ..m }
    }

    /// The text exposition of every metric (OpenMetrics text, which Prometheus reads).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Counts a request as in flight until the returned guard is dropped.
    pub fn s3_start(&self) -> S3InFlight<'_> {
        self.s3_in_flight.inc();
        S3InFlight(&self.s3_in_flight)
    }

    /// One S3 request that ended.
    pub fn s3_request(
        &self,
        op: &'static str,
        started: Instant,
        outcome: &'static str,
        received: u64,
        sent: u64,
    ) {
        self.s3_requests
            .get_or_create(&S3Labels { op, outcome })
            .inc();
        let l = OpLabel { op };
        self.s3_duration
            .get_or_create(&l)
            .observe(started.elapsed().as_secs_f64());
        if received > 0 {
            self.s3_received.get_or_create(&l).inc_by(received);
        }
        if sent > 0 {
            self.s3_sent.get_or_create(&l).inc_by(sent);
        }
    }

    /// One FUSE call that replied: `errno` 0 for success.
    pub fn fuse_call(&self, op: &'static str, started: Instant, errno: i32) {
        let l = OpLabel { op };
        self.fuse_requests.get_or_create(&l).inc();
        self.fuse_duration
            .get_or_create(&l)
            .observe(started.elapsed().as_secs_f64());
        if errno != 0 {
            self.fuse_errors
                .get_or_create(&ErrnoLabels {
                    op,
                    errno: errno_name(errno),
                })
                .inc();
        } else if op == "read" {
            self.fuse_reads_ok.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn fuse_read(&self, bytes: usize) {
        self.fuse_read_bytes.inc_by(bytes as u64);
    }

    /// A FUSE write of `bytes` arrived: unsynced from now on.
    pub fn write_arrived(&self, bytes: usize) {
        self.unsynced_bytes
            .fetch_add(bytes as i64, Ordering::Relaxed);
    }

    /// The write of `sent` bytes took `taken` of them.
    pub fn write_done(&self, sent: usize, taken: usize) {
        self.fuse_written_bytes.inc_by(taken as u64);
        self.unsynced_bytes
            .fetch_sub(sent.saturating_sub(taken) as i64, Ordering::Relaxed);
    }

    /// An upload begins: the bytes written so far are its to publish.
    pub fn upload_started(&self) -> u64 {
        self.unsynced_bytes.swap(0, Ordering::Relaxed).max(0) as u64
    }

    /// An upload ended. `taken` is what [`Metrics::upload_started`] returned.
    pub fn upload_finished(&self, taken: u64, r: &crate::Result<crate::db::UploadReport>) {
        match r {
            Ok(report) => {
                self.uploads
                    .get_or_create(&OutcomeLabel { outcome: "ok" })
                    .inc();
                self.upload_files.inc_by(report.files as u64);
                self.upload_bytes.inc_by(report.bytes);
                if report.committed {
                    self.commits.inc();
                }
                self.rebases.inc_by(report.rebases as u64);
                self.conflicts.inc_by(report.rebases as u64);
                let now = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default();
                self.last_upload.set(now.as_secs_f64());
            }
            Err(e) => {
                self.uploads
                    .get_or_create(&OutcomeLabel { outcome: "error" })
                    .inc();
                if is_conflict(e) {
                    self.conflicts.inc();
                }
                // Still to publish.
                self.unsynced_bytes
                    .fetch_add(taken as i64, Ordering::Relaxed);
            }
        }
    }

    pub fn compaction(&self, r: &crate::Result<crate::db::CompactReport>) {
        let outcome = if r.is_ok() { "ok" } else { "error" };
        self.compactions
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
        if let Ok(c) = r {
            let objects = c.files_before.saturating_sub(c.files_after) as u64;
            self.compaction_removed_objects.inc_by(objects);
            self.compaction_removed_bytes
                .inc_by(c.bytes_before.saturating_sub(c.bytes_after));
        }
    }

    /// A gc run: `removed` is the objects it deleted and their bytes.
    /// One background compaction round (`S4db::compact_round`): the files
    /// it retires are deleted by gc after the grace period, so they count as
    /// removed here and their bytes as rewritten.
    pub fn compaction_round(&self, r: &crate::Result<crate::db::RoundReport>) {
        let outcome = if r.is_ok() { "ok" } else { "error" };
        self.compactions
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
        if let Ok(r) = r {
            self.compaction_removed_objects
                .inc_by(r.files_retired as u64);
            self.compaction_removed_bytes
                .inc_by(r.bytes_read.saturating_sub(r.bytes_written));
        }
    }

    /// A READDIRPLUS page sent: `outcome` says how it was made.
    pub fn listing_page(&self, outcome: &'static str) {
        self.listing_pages
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }

    pub fn gc(&self, ok: bool, objects: u64, bytes: u64) {
        let outcome = if ok { "ok" } else { "error" };
        self.gc_runs.get_or_create(&OutcomeLabel { outcome }).inc();
        self.gc_removed_objects.inc_by(objects);
        self.gc_removed_bytes.inc_by(bytes);
    }

    /// Bytes written through the mount and not yet carried by an upload.
    pub fn unsynced_bytes(&self) -> u64 {
        self.unsynced_bytes.load(Ordering::Relaxed).max(0) as u64
    }
}

fn is_conflict(e: &crate::Error) -> bool {
    matches!(
        e,
        crate::Error::Conflict(_) | crate::Error::Store(crate::remote::StoreError::Conflict { .. })
    )
}

/// Counts one S3 request in flight while alive.
pub struct S3InFlight<'a>(&'a Gauge);

impl Drop for S3InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// What is read at scrape time: the database's state and the process's memory.
#[derive(Debug)]
struct StateCollector;

fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    v: f64,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(v);
    g.encode(enc.encode_descriptor(name, help, unit, g.metric_type())?)
}

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: u64,
) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(v);
    c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)
}

impl Collector for StateCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let src = source().read().unwrap_or_else(|p| p.into_inner()).clone();
        let m = global();
        if let Some(s) = src.and_then(|f| f()) {
            let b = Some(&Unit::Bytes);
            gauge(&mut enc, "keys", "Live keys", None, s.keys as f64)?;
            gauge(
                &mut enc,
                "live",
                "Bytes of live entries (compressed, with entry overhead)",
                b,
                s.live_bytes as f64,
            )?;
            gauge(
                &mut enc,
                "data_files",
                "Data files the index references",
                None,
                s.data_files as f64,
            )?;
            gauge(
                &mut enc,
                "unsynced_entries",
                "Keys written or deleted here and not committed yet",
                None,
                s.unsynced_entries as f64,
            )?;
            gauge(
                &mut enc,
                "unsynced",
                "Bytes written through the mount and not carried by an upload yet",
                b,
                m.unsynced_bytes() as f64,
            )?;
            gauge(
                &mut enc,
                "unpublished_files",
                "Data files written here and not uploaded yet",
                None,
                s.unpublished_files as f64,
            )?;
            gauge(
                &mut enc,
                "oldest_unsynced_write_age",
                "How long the oldest unpublished write has waited (0: none)",
                Some(&Unit::Seconds),
                s.oldest_unsynced_write.map_or(0.0, |d| d.as_secs_f64()),
            )?;
            gauge(
                &mut enc,
                "open_files",
                "Files open through the mount",
                None,
                s.open_files as f64,
            )?;
            counter(
                &mut enc,
                "cache_hits",
                "Reads answered from the value already loaded for the open file",
                s.cache_hits,
            )?;
            let reads = m.fuse_reads_ok.load(Ordering::Relaxed);
            counter(
                &mut enc,
                "cache_misses",
                "Reads that loaded the value (local data file, small-value cache or S3) or read a control file",
                reads.saturating_sub(s.cache_hits),
            )?;
        }
        if let Some(rss) = resident_bytes() {
            gauge(
                &mut enc,
                "resident_memory",
                "Resident set size of the daemon",
                Some(&Unit::Bytes),
                rss as f64,
            )?;
        }
        Ok(())
    }
}

/// Answers `GET /metrics` on `listener` with [`Metrics::render`], forever
/// (spawn it). Anything else gets 404 (405 for another method).
pub async fn serve(listener: tokio::net::TcpListener) {
    loop {
        let (conn, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("metrics: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), answer(conn)).await;
        });
    }
}

async fn answer(mut conn: tokio::net::TcpStream) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        let n = conn.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, ctype, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            global().render(),
        ),
        ("GET" | "HEAD", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found: metrics are at /metrics\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET /metrics\n".to_string(),
        ),
    };
    let mut reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if method != "HEAD" {
        reply.extend_from_slice(body.as_bytes());
    }
    conn.write_all(&reply).await?;
    conn.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_names() {
        let m = Metrics::new();
        m.s3_request("put", Instant::now(), "ok", 0, 10);
        m.fuse_call("lookup", Instant::now(), libc::ENOENT);
        let text = m.render();
        for want in [
            "s4db_s3_requests_total{op=\"put\",outcome=\"ok\"} 1",
            "s4db_s3_sent_bytes_total{op=\"put\"} 10",
            "s4db_s3_request_duration_seconds_count{op=\"put\"} 1",
            "s4db_fuse_errors_total{op=\"lookup\",errno=\"ENOENT\"} 1",
            "s4db_fuse_request_duration_seconds_bucket{",
            "# EOF",
        ] {
            assert!(text.contains(want), "{want} missing from:\n{text}");
        }
        // The process's memory is there even before a mount installs its source.
        assert!(text.contains("s4db_resident_memory_bytes "), "{text}");
    }

    #[test]
    fn errno_names() {
        assert_eq!(errno_name(libc::ENOENT), "ENOENT");
        assert_eq!(errno_name(4095), "4095");
    }
}
