//! Engine benchmarks (criterion). See docs/BENCHMARKS.md for results and
//! scripts/bench_micro.sh for the side-by-side run against the Python package.
//!
//!     cargo bench --bench engine                 everything (a few minutes)
//!     cargo bench --bench engine -- put          only benchmarks whose id contains "put"
//!     cargo test --all-targets                   test mode: every benchmark runs once, small sizes
//!
//! Two backends:
//! - the embedded local store (`LocalStore` in a temporary directory);
//! - a moto S3 server (`moto/...` benchmarks). With `S4DB_BENCH_MOTO_ENDPOINT`
//!   set (scripts/bench_micro.sh does), that server is used; otherwise the bench starts
//!   `moto_server` itself (`$S4DB_MOTO_SERVER`, default
//!   `.venv-test/py10/bin/moto_server`) on the first moto benchmark and kills
//!   it at the end. Moto is a local Python server: its latencies are not S3's.
//!
//! Values are incompressible pseudo-random bytes (stored raw, like most real
//! payloads that were compressed already); keys are `key-00000042`.
//! Upload benchmarks also print one `s4db-bench-bytes {json}` line with the
//! bytes they sent, which scripts/bench_micro.sh puts in its table.
//! No timing is asserted anywhere.

mod common;

use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use s4db::remote::{
    GetResult, ListPage, LocalStore, ObjectMeta, ObjectStore, PutCondition, S3Config, S3Store,
    StoreResult,
};
use s4db::{OpenOptions, S4db, Value};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::runtime::Runtime;

// ------------------------------------------------------------------ sizes

/// `cargo test --all-targets` runs this binary without `--bench`: criterion's
/// test mode runs each benchmark once. Setup sizes shrink there to keep it quick.
fn test_mode() -> bool {
    static TEST: OnceLock<bool> = OnceLock::new();
    *TEST.get_or_init(|| !std::env::args().any(|a| a == "--bench"))
}

/// Existing keys for the "put cost vs database size" benchmark.
fn db_sizes() -> [usize; 3] {
    if test_mode() {
        [1_000, 3_000, 10_000]
    } else {
        [1_000, 10_000, 100_000]
    }
}

/// The simulated round trip of the `get_remote/latency5ms_*` benchmarks.
fn simulated_latency() -> Duration {
    Duration::from_millis(if test_mode() { 1 } else { 5 })
}

/// The "big" upload that precedes the incremental one: keys × value size.
fn big_upload() -> (usize, usize) {
    if test_mode() {
        (16, 16 * 1024)
    } else {
        (1_000, 16 * 1024)
    }
}

const UPLOAD_KEYS: usize = 1_000;
const UPLOAD_VALUE: usize = 1024;
const MANY: usize = 64;

// ---------------------------------------------------------------- helpers

fn key(i: usize) -> String {
    format!("key-{i:08}")
}

/// Incompressible bytes, so Snappy stores them raw.
fn value(len: usize, seed: u64) -> Value {
    Value::Binary(common::random_bytes(len, seed))
}

fn runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime")
    })
}

/// A database prefix never used before in this process.
fn fresh_prefix(what: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{what}-{}/", N.fetch_add(1, Ordering::Relaxed))
}

/// A local-store bucket in a temporary directory (removed on drop).
struct LocalBucket {
    _dir: tempfile::TempDir,
    store: Arc<dyn ObjectStore>,
}

fn local_bucket() -> LocalBucket {
    let dir = tempfile::Builder::new()
        .prefix("s4db-bench-")
        .tempdir()
        .expect("tempdir");
    let store = LocalStore::open(dir.path(), "bucket").expect("open local store");
    LocalBucket {
        _dir: dir,
        store: Arc::new(store),
    }
}

/// Opens a database with a temporary local directory (made at the first write).
fn open(store: &Arc<dyn ObjectStore>, prefix: &str) -> S4db {
    runtime()
        .block_on(S4db::open(store.clone(), prefix, OpenOptions::default()))
        .expect("open database")
}

/// Puts `n` keys (`key(first..first+n)`) of `len` bytes in batches of 1000.
fn fill(db: &S4db, first: usize, n: usize, len: usize) {
    let mut i = first;
    while i < first + n {
        let end = (i + 1000).min(first + n);
        db.put((i..end).map(|k| (key(k), value(len, k as u64))))
            .expect("put");
        i = end;
    }
}

/// One machine-readable line for scripts/bench_micro.sh.
fn report_bytes(bench: &str, files: usize, data_bytes: u64, index_bytes: u64) {
    println!(
        "s4db-bench-bytes {{\"bench\":\"{bench}\",\"files\":{files},\"data_bytes\":{data_bytes},\"index_bytes\":{index_bytes}}}"
    );
}

fn index_size(db: &S4db) -> u64 {
    let key = format!("{}index.idx", db.prefix());
    runtime()
        .block_on(db.store().head(&key))
        .expect("head index")
        .size
}

/// A store that waits `delay` before every request: a stand-in for a server
/// that has network latency but serves requests in parallel (as S3 does and
/// moto, CPU-bound in one Python process, does not).
#[derive(Debug)]
struct Delayed {
    inner: Arc<dyn ObjectStore>,
    delay: Duration,
}

#[async_trait::async_trait]
impl ObjectStore for Delayed {
    fn describe(&self) -> String {
        format!("{} (+{:?} per request)", self.inner.describe(), self.delay)
    }
    async fn get(&self, key: &str) -> StoreResult<GetResult> {
        tokio::time::sleep(self.delay).await;
        self.inner.get(key).await
    }
    async fn get_range(&self, key: &str, offset: u64, len: u64) -> StoreResult<bytes::Bytes> {
        tokio::time::sleep(self.delay).await;
        self.inner.get_range(key, offset, len).await
    }
    async fn put(
        &self,
        key: &str,
        data: bytes::Bytes,
        condition: PutCondition,
    ) -> StoreResult<String> {
        tokio::time::sleep(self.delay).await;
        self.inner.put(key, data, condition).await
    }
    async fn delete(&self, key: &str) -> StoreResult<()> {
        tokio::time::sleep(self.delay).await;
        self.inner.delete(key).await
    }
    async fn head(&self, key: &str) -> StoreResult<ObjectMeta> {
        tokio::time::sleep(self.delay).await;
        self.inner.head(key).await
    }
    async fn list_page(&self, prefix: &str, continuation: Option<String>) -> StoreResult<ListPage> {
        tokio::time::sleep(self.delay).await;
        self.inner.list_page(prefix, continuation).await
    }
}

// ------------------------------------------------------------------- moto

struct Moto {
    endpoint: String,
    port: u16,
    child: Option<Child>,
    log: Option<PathBuf>,
}

static MOTO: Mutex<Option<Arc<Moto>>> = Mutex::new(None);

/// The moto server (started on first use) and a bucket on it.
fn moto_bucket() -> Arc<dyn ObjectStore> {
    static STORE: OnceLock<Arc<dyn ObjectStore>> = OnceLock::new();
    STORE
        .get_or_init(|| {
            let moto = {
                let mut guard = MOTO.lock().unwrap();
                guard.get_or_insert_with(|| Arc::new(start_moto())).clone()
            };
            let bucket = format!("bench-rs-{}", std::process::id());
            let (status, body) = http(moto.port, "PUT", &format!("/{bucket}"));
            assert!(
                status == 200,
                "creating bucket {bucket} on moto at {}: HTTP {status}: {body}",
                moto.endpoint
            );
            let mut config = S3Config::new(bucket);
            config.endpoint_url = Some(moto.endpoint.clone());
            config.region = Some("us-east-1".into());
            config.force_path_style = true;
            config.credentials = Some(("testing".into(), "testing".into()));
            let store = runtime()
                .block_on(S3Store::connect(config))
                .expect("connect to moto");
            Arc::new(store) as Arc<dyn ObjectStore>
        })
        .clone()
}

fn start_moto() -> Moto {
    if let Ok(endpoint) = std::env::var("S4DB_BENCH_MOTO_ENDPOINT") {
        if !endpoint.is_empty() {
            let port = endpoint
                .rsplit(':')
                .next()
                .and_then(|p| p.trim_end_matches('/').parse().ok())
                .unwrap_or_else(|| {
                    panic!("S4DB_BENCH_MOTO_ENDPOINT={endpoint}: expected http://127.0.0.1:PORT")
                });
            return Moto {
                endpoint: endpoint.trim_end_matches('/').to_string(),
                port,
                child: None,
                log: None,
            };
        }
    }
    let server = std::env::var_os("S4DB_MOTO_SERVER")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv-test/py10/bin/moto_server")
        });
    if !server.exists() {
        panic!(
            "moto_server not found at {} (set S4DB_MOTO_SERVER, or run `scripts/test.sh --setup-only` \
             to create .venv-test/py10). The moto/* benchmarks need it; to run only the others: \
             `cargo bench --bench engine -- '^(put|get_|upload)'`.",
            server.display()
        );
    }
    let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("find a free port")
        .port();
    let log = std::env::temp_dir().join(format!("s4db-bench-moto-{}.log", std::process::id()));
    let out = std::fs::File::create(&log).expect("create moto log");
    let err = out.try_clone().expect("clone moto log");
    let mut cmd = Command::new(&server);
    cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    // SAFETY: only async-signal-safe prctl between fork and exec. Benchmarks run on
    // the main thread, so the server dies with this process even on a panic.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", server.display()));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "moto_server exited ({status}); log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        if try_http(port, "GET", "/").is_ok_and(|(s, _)| s == 200) {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "moto_server not answering on port {port}; log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Moto {
        endpoint: format!("http://127.0.0.1:{port}"),
        port,
        child: Some(child),
        log: Some(log),
    }
}

fn stop_moto() {
    let Some(moto) = MOTO.lock().unwrap().take() else {
        return;
    };
    let Ok(mut moto) = Arc::try_unwrap(moto) else {
        return;
    };
    if let Some(mut child) = moto.child.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
    if let Some(log) = moto.log.take() {
        let _ = std::fs::remove_file(log);
    }
}

fn http(port: u16, method: &str, path: &str) -> (u16, String) {
    try_http(port, method, path).unwrap_or_else(|e| panic!("{method} {path} to moto: {e}"))
}

/// One unsigned HTTP/1.1 request (moto accepts unsigned bucket creation).
fn try_http(port: u16, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad HTTP response: {resp:?}")))?;
    Ok((status, resp))
}

// ------------------------------------------------------------- benchmarks

/// Single puts and a batch put (local writes: the backend is not touched).
fn bench_put(c: &mut Criterion) {
    let mut g = c.benchmark_group("put");
    for (name, len) in [("single_100B", 100), ("single_4KiB", 4096)] {
        let v = value(len, 7);
        g.throughput(Throughput::Elements(1));
        g.bench_function(name, |b| {
            // A fresh database per sample, so the index and data file size stay bounded.
            b.iter_custom(|iters| {
                let bucket = local_bucket();
                let db = open(&bucket.store, "put/");
                let keys: Vec<String> = (0..iters as usize).map(key).collect();
                let start = Instant::now();
                for k in keys {
                    db.put([(k, v.clone())]).expect("put");
                }
                start.elapsed()
            })
        });
    }
    g.throughput(Throughput::Elements(1000));
    let batch: Vec<(String, Value)> = (0..1000).map(|i| (key(i), value(100, i as u64))).collect();
    g.bench_function("batch_1000x100B", |b| {
        b.iter_custom(|iters| {
            let bucket = local_bucket();
            let db = open(&bucket.store, "batch/");
            let start = Instant::now();
            for _ in 0..iters {
                db.put(batch.iter().cloned()).expect("put");
            }
            start.elapsed()
        })
    });
    g.finish();
}

/// A single put into a committed database of 1k, 10k and 100k keys: must be flat.
fn bench_put_vs_db_size(c: &mut Criterion) {
    let mut g = c.benchmark_group("put_vs_db_size");
    g.throughput(Throughput::Elements(1));
    let v = value(100, 3);
    for n in db_sizes() {
        let mut fixture: Option<(LocalBucket, S4db)> = None;
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            let (_, db) = fixture.get_or_insert_with(|| {
                let bucket = local_bucket();
                let db = open(&bucket.store, "grown/");
                fill(&db, 0, n, 100);
                runtime().block_on(db.upload()).expect("upload");
                (bucket, db)
            });
            // Overwrite existing keys in a scattered order: the index keeps n keys.
            let mut i = 0usize;
            b.iter(|| {
                i = (i + 7919) % n;
                db.put([(key(i), v.clone())]).expect("put")
            })
        });
    }
    g.finish();
}

/// Gets whose data file is local: one pread.
fn bench_get_local(c: &mut Criterion) {
    let mut g = c.benchmark_group("get_local");
    for (name, len, n) in [("100B", 100, 1000), ("64KiB", 64 * 1024, 64)] {
        let mut fixture: Option<(LocalBucket, S4db)> = None;
        g.throughput(Throughput::Elements(1));
        g.bench_function(name, |b| {
            let db: &S4db = &fixture
                .get_or_insert_with(|| {
                    let bucket = local_bucket();
                    let db = open(&bucket.store, "get/");
                    fill(&db, 0, n, len);
                    (bucket, db)
                })
                .1;
            let mut i = 0usize;
            b.to_async(runtime()).iter(|| {
                i = (i + 1) % n;
                let k = key(i);
                async move { db.get(&k).await.expect("get").expect("present") }
            })
        });
    }
    g.finish();
}

/// Uploads `n` keys to `store` and returns a fresh handle without a local
/// directory, so every get is a range GET from the store.
fn remote_reader(store: &Arc<dyn ObjectStore>, n: usize, len: usize) -> S4db {
    let prefix = fresh_prefix("remote");
    let writer = open(store, &prefix);
    fill(&writer, 0, n, len);
    runtime().block_on(writer.upload()).expect("upload");
    drop(writer);
    open(store, &prefix)
}

/// A get that needs a range GET (no local copy), on the local backend.
fn bench_get_remote_local(c: &mut Criterion) {
    let mut g = c.benchmark_group("get_remote");
    g.throughput(Throughput::Elements(1));
    let mut fixture: Option<(LocalBucket, S4db)> = None;
    g.bench_function("local_backend_100B", |b| {
        let db: &S4db = &fixture
            .get_or_insert_with(|| {
                let bucket = local_bucket();
                let db = remote_reader(&bucket.store, 1000, 100);
                (bucket, db)
            })
            .1;
        let mut i = 0usize;
        b.to_async(runtime()).iter(|| {
            i = (i + 1) % 1000;
            let k = key(i);
            async move { db.get(&k).await.expect("get").expect("present") }
        })
    });

    // The same reads behind a simulated round trip: sequential gets pay it 64
    // times, get_many (16 in flight) about 64 / 16 times.
    g.sample_size(10);
    g.warm_up_time(Duration::from_millis(500));
    g.throughput(Throughput::Elements(MANY as u64));
    let ms = simulated_latency().as_millis();
    let delayed: OnceLock<(LocalBucket, S4db)> = OnceLock::new();
    let reader = || -> &S4db {
        &delayed
            .get_or_init(|| {
                let bucket = local_bucket();
                let store: Arc<dyn ObjectStore> = Arc::new(Delayed {
                    inner: bucket.store.clone(),
                    delay: simulated_latency(),
                });
                let db = remote_reader(&store, 1000, 100);
                (bucket, db)
            })
            .1
    };
    let batches = key_batches();
    g.bench_function(format!("latency{ms}ms_get_{MANY}_sequential"), |b| {
        get_sequential(b, reader(), &batches)
    });
    g.bench_function(format!("latency{ms}ms_get_many_{MANY}"), |b| {
        get_many(b, reader(), &batches)
    });
    g.finish();
}

/// Keys 0..1000 in batches of `MANY`.
fn key_batches() -> Vec<Vec<String>> {
    (0..1000 / MANY)
        .map(|j| (j * MANY..(j + 1) * MANY).map(key).collect())
        .collect()
}

/// One iteration: the keys of one batch, one `get` after the other.
fn get_sequential(b: &mut criterion::Bencher, db: &S4db, batches: &[Vec<String>]) {
    let mut j = 0usize;
    b.to_async(runtime()).iter(|| {
        j = (j + 1) % batches.len();
        let keys = &batches[j];
        async move {
            for k in keys {
                db.get(k).await.expect("get").expect("present");
            }
        }
    })
}

/// One iteration: the keys of one batch in one `get_many`.
fn get_many(b: &mut criterion::Bencher, db: &S4db, batches: &[Vec<String>]) {
    let mut j = 0usize;
    b.to_async(runtime()).iter(|| {
        j = (j + 1) % batches.len();
        let keys = &batches[j];
        async move {
            let values = db.get_many(keys).await.expect("get_many");
            assert!(values.iter().all(Option::is_some));
        }
    })
}

/// What the incremental benchmark keeps between samples.
struct Incremental {
    db: S4db,
    next: usize,
    last: Option<s4db::db::UploadReport>,
}

/// Upload of 1000 × 1 KiB into a fresh prefix, and an upload of one new key
/// after a big upload (only the new bytes and the index should be sent).
fn bench_upload(c: &mut Criterion, backend: &str, store: &dyn Fn() -> Arc<dyn ObjectStore>) {
    let group = if backend == "local" { "upload" } else { "moto" };
    let id = |what: &str| {
        if backend == "local" {
            format!("local_backend_{what}")
        } else {
            format!("upload_{what}")
        }
    };
    let mut g = c.benchmark_group(group);
    g.sampling_mode(SamplingMode::Flat);
    g.sample_size(10);
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(3));
    g.throughput(Throughput::Bytes((UPLOAD_KEYS * UPLOAD_VALUE) as u64));

    let mut last: Option<(S4db, s4db::db::UploadReport)> = None;
    let full = id(&format!("{UPLOAD_KEYS}x1KiB"));
    g.bench_function(full.as_str(), |b| {
        let store = store();
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let db = open(&store, &fresh_prefix("upload"));
                fill(&db, 0, UPLOAD_KEYS, UPLOAD_VALUE);
                let start = Instant::now();
                let report = runtime().block_on(db.upload()).expect("upload");
                total += start.elapsed();
                last = Some((db, report));
            }
            total
        })
    });
    if let Some((db, r)) = last.take() {
        report_bytes(
            &format!("{group}/{full}"),
            r.files,
            r.bytes,
            index_size(&db),
        );
    }

    g.throughput(Throughput::Elements(1));
    let (big_keys, big_len) = big_upload();
    let mut fixture: Option<Incremental> = None;
    let incr = id("incremental_1key");
    g.bench_function(incr.as_str(), |b| {
        let fx = fixture.get_or_insert_with(|| {
            let db = open(&store(), &fresh_prefix("incremental"));
            fill(&db, 0, big_keys, big_len);
            runtime().block_on(db.upload()).expect("big upload");
            Incremental {
                db,
                next: big_keys,
                last: None,
            }
        });
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                fx.db
                    .put([(key(fx.next), value(UPLOAD_VALUE, fx.next as u64))])
                    .expect("put");
                fx.next += 1;
                let start = Instant::now();
                let report = runtime().block_on(fx.db.upload()).expect("upload");
                total += start.elapsed();
                fx.last = Some(report);
            }
            total
        })
    });
    if let Some(fx) = fixture {
        if let Some(r) = &fx.last {
            report_bytes(
                &format!("{group}/{incr}"),
                r.files,
                r.bytes,
                index_size(&fx.db),
            );
        }
    }
    g.finish();
}

/// Range GETs against moto: one get, 64 sequential gets, and get_many of 64.
fn bench_moto_get(c: &mut Criterion) {
    let mut g = c.benchmark_group("moto");
    g.sample_size(20);
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(3));
    let reader: OnceLock<S4db> = OnceLock::new();
    let reader = || reader.get_or_init(|| remote_reader(&moto_bucket(), 1000, 100));

    g.throughput(Throughput::Elements(1));
    g.bench_function("get_remote_100B", |b| {
        let db = reader();
        let mut i = 0usize;
        b.to_async(runtime()).iter(|| {
            i = (i + 1) % 1000;
            let k = key(i);
            async move { db.get(&k).await.expect("get").expect("present") }
        })
    });

    g.throughput(Throughput::Elements(MANY as u64));
    let batches = key_batches();
    g.bench_function(format!("get_{MANY}_sequential"), |b| {
        get_sequential(b, reader(), &batches)
    });
    g.bench_function(format!("get_many_{MANY}"), |b| {
        get_many(b, reader(), &batches)
    });
    g.finish();
}

fn main() {
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();

    bench_put(&mut c);
    bench_put_vs_db_size(&mut c);
    bench_get_local(&mut c);
    bench_get_remote_local(&mut c);
    let local: OnceLock<LocalBucket> = OnceLock::new();
    bench_upload(&mut c, "local", &|| {
        local.get_or_init(local_bucket).store.clone()
    });
    bench_moto_get(&mut c);
    bench_upload(&mut c, "moto", &moto_bucket);

    c.final_summary();
    stop_moto();
}
