//! Engine workloads, the Rust engine's side: the figures the Python s4db package's
//! own benchmark publishes, measured the same way on both sides.
//! `scripts/bench_engine_python.py` runs the identical workloads with the real Python
//! s4db 0.10.0; `scripts/bench_engine.sh` runs both against one moto_server (and a
//! second pass behind `scripts/latency_proxy.py`) and writes the side-by-side table.
//!
//!     cargo bench --bench workloads -- --endpoint http://127.0.0.1:PORT [--keys N]
//!         [--json OUT] [--quick] [--runs R] [--naive-keys M] [--only ID,ID...]
//!
//! A plain program (harness = false), not criterion. Without `--endpoint` it prints a
//! note and exits 0: `cargo test --all-targets` runs every bench target once.
//!
//! Data: keys `key-00000042`; values incompressible pseudo-random bytes (stored raw
//! after Snappy gives up; os.urandom on the Python side), so neither side gains from
//! compression. Credentials, region (us-east-1) and path-style addressing are explicit;
//! nothing comes from the host's AWS configuration. Each run makes a fresh bucket.
//!
//! Workloads (ids; defaults in brackets, `--quick` sizes in the code below):
//! - `put_one_by_one`: PUT_KEYS [10,000] keys of 100 B into a fresh database, one
//!   `put` call per key (local only, no upload). Metrics: total_s, per_key_us.
//! - `put_batch`: the same keys in one `put` call. Metrics: total_s, per_key_us.
//! - `bulk_load`: N [--keys, 100,000] keys of 100 B in `put` batches of 1,000 into a
//!   fresh database, then one `upload`. Metrics: put_s, upload_s, total_s, requests
//!   (S3 requests of the upload).
//! - `local_get`: point reads at N keys: LOCAL_GETS [10,000] uniformly random gets
//!   (seeded) on the database the last bulk_load made (its data files local: pread),
//!   each timed: mean/p50/p95/p99_us; then the same keys again untimed one by one:
//!   keys_per_s.
//! - `remote_get`: a fresh read-only open of that database (no local data files;
//!   open_ms = the index GET and decode), then REMOTE_GETS [100] random gets, each one
//!   range GET: mean/p50/p95/p99_ms, requests (the open's and the gets').
//! - `one_object_per_key`: M [--naive-keys, 1,000] values of 1 KiB as one s4db `put` + `upload` in a
//!   fresh database (s4db_s, s4db_requests) vs M individual S3 PUTs, one object per key,
//!   sequential (seq_s, seq_requests) and with 16 in flight (par_s, par_requests).
//!   One-object PUTs use the plain SDK client with its defaults (boto3 on the Python
//!   side).
//!
//! Every workload runs R [3] times (fresh data each time, except the reads, which reuse
//! the last bulk load); a workload whose first run took over 5 s is not repeated. Each
//! metric is the median over runs; latency percentiles are computed per run (nearest
//! rank) and then take the median over runs.
//!
//! JSON (`--json OUT`), the same on both sides:
//!
//! ```text
//! {"schema": "s4db-engine-workloads/1", "side": "rust" | "python",
//!  "engine": "s4db <version>", "endpoint": URL, "quick": bool,
//!  "params": {"keys", "put_keys", "value_bytes", "batch", "local_gets", "remote_gets",
//!             "naive_keys", "naive_value_bytes", "naive_concurrency", "runs",
//!             "repeat_under_s"},
//!  "workloads": {ID: {"desc": str, "runs": n,
//!                     "metrics": {NAME: {"unit": "s"|"ms"|"us"|"keys/s"|"requests",
//!                                        "median": float, "values": [float per run]}}}}}
//! ```
//!
//! No timing is asserted anywhere.

mod common;

use common::random_bytes;
use futures::StreamExt;
use s4db::remote::{MeteredStore, ObjectStore, S3Config, S3Store};
use s4db::{OpenOptions, S4db, Value};
use serde_json::{json, Map};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

const REGION: &str = "us-east-1";
const ACCESS_KEY: &str = "testing";
const SECRET_KEY: &str = "testing";
/// A workload whose first run took longer than this is not repeated.
const REPEAT_UNDER: Duration = Duration::from_secs(5);

struct Params {
    keys: usize,
    put_keys: usize,
    value_bytes: usize,
    batch: usize,
    local_gets: usize,
    remote_gets: usize,
    naive_keys: usize,
    naive_value_bytes: usize,
    naive_concurrency: usize,
    runs: usize,
}

struct Args {
    endpoint: Option<String>,
    json: Option<String>,
    quick: bool,
    only: Option<Vec<String>>,
    params: Params,
}

const WORKLOADS: [&str; 6] = [
    "put_one_by_one",
    "put_batch",
    "bulk_load",
    "local_get",
    "remote_get",
    "one_object_per_key",
];

fn parse_args() -> Args {
    let mut endpoint = None;
    let mut json = None;
    let mut quick = false;
    let mut only = None;
    let mut keys = None;
    let mut runs = None;
    let mut naive_keys = None;
    let mut it = std::env::args().skip(1);
    let usage =
        "workloads --endpoint URL [--keys N] [--json OUT] [--quick] [--runs R] [--naive-keys M] [--only ID,...]";
    while let Some(a) = it.next() {
        let mut val = |name: &str| {
            it.next()
                .unwrap_or_else(|| panic!("{name} needs a value; usage: {usage}"))
        };
        match a.as_str() {
            "--endpoint" => endpoint = Some(val("--endpoint")),
            "--json" => json = Some(val("--json")),
            "--keys" => keys = Some(val("--keys").parse().expect("--keys N")),
            "--runs" => runs = Some(val("--runs").parse().expect("--runs R")),
            "--naive-keys" => {
                naive_keys = Some(val("--naive-keys").parse().expect("--naive-keys M"))
            }
            "--only" => {
                let ids: Vec<String> = val("--only").split(',').map(str::to_string).collect();
                for id in &ids {
                    assert!(WORKLOADS.contains(&id.as_str()), "unknown workload {id}");
                }
                only = Some(ids);
            }
            "--quick" => quick = true,
            // What cargo passes to bench targets.
            "--bench" | "--test" | "--nocapture" => {}
            "-h" | "--help" => {
                println!("usage: {usage}");
                std::process::exit(0);
            }
            other => panic!("unknown argument {other}; usage: {usage}"),
        }
    }
    let mut params = if quick {
        Params {
            keys: keys.unwrap_or(2_000),
            put_keys: 300,
            value_bytes: 100,
            batch: 1_000,
            local_gets: 300,
            remote_gets: 10,
            naive_keys: 20,
            naive_value_bytes: 1024,
            naive_concurrency: 16,
            runs: runs.unwrap_or(1),
        }
    } else {
        Params {
            keys: keys.unwrap_or(100_000),
            put_keys: 10_000,
            value_bytes: 100,
            batch: 1_000,
            local_gets: 10_000,
            remote_gets: 100,
            naive_keys: 1_000,
            naive_value_bytes: 1024,
            naive_concurrency: 16,
            runs: runs.unwrap_or(3),
        }
    };
    if let Some(m) = naive_keys {
        params.naive_keys = m;
    }
    Args {
        endpoint,
        json,
        quick,
        only,
        params,
    }
}

// ---------------------------------------------------------------- helpers

fn key(i: usize) -> String {
    format!("key-{i:08}")
}

/// `n` uniformly random indices below `below` (seeded: the same every time).
fn random_indices(n: usize, below: usize, seed: u64) -> Vec<usize> {
    let mut x = seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % below as u64) as usize
        })
        .collect()
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn latency_metrics(samples: &mut [f64], unit: &str, out: &mut Vec<(String, f64)>) {
    samples.sort_by(|a, b| a.total_cmp(b));
    let mean = samples.iter().sum::<f64>() / samples.len() as f64;
    out.push((format!("mean_{unit}"), mean));
    for p in [50.0, 95.0, 99.0] {
        out.push((format!("p{p}_{unit}"), percentile(samples, p)));
    }
}

fn unit_of(metric: &str) -> &'static str {
    if metric.ends_with("_us") {
        "us"
    } else if metric.ends_with("_ms") {
        "ms"
    } else if metric.ends_with("per_s") {
        "keys/s"
    } else if metric.ends_with("_s") {
        "s"
    } else {
        "requests"
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn total_requests(store: &MeteredStore) -> f64 {
    let c = store.counts();
    (c.get + c.get_range + c.put + c.delete + c.list + c.head) as f64
}

// ---------------------------------------------------------------- bench

struct Bench {
    endpoint: String,
    bucket: String,
    store: Arc<dyn ObjectStore>,
    client: aws_sdk_s3::Client,
    p: Params,
    prefixes: usize,
    /// The database of `keys` keys the reads use (the last bulk load), and its prefix.
    loaded: Option<(S4db, String)>,
}

impl Bench {
    fn prefix(&mut self, what: &str) -> String {
        self.prefixes += 1;
        format!("{what}-{}/", self.prefixes)
    }

    async fn open(&self, prefix: &str) -> (S4db, Arc<MeteredStore>) {
        let metered = Arc::new(MeteredStore::new(self.store.clone()));
        let db = S4db::open(metered.clone(), prefix, OpenOptions::default())
            .await
            .expect("open database");
        (db, metered)
    }

    fn values(&self, n: usize, len: usize, seed: u64) -> Vec<(String, Value)> {
        (0..n)
            .map(|i| (key(i), Value::Binary(random_bytes(len, seed + i as u64))))
            .collect()
    }

    async fn put_one_by_one(&mut self, run: usize) -> Vec<(String, f64)> {
        let prefix = self.prefix("put1");
        let (db, _) = self.open(&prefix).await;
        let items = self.values(self.p.put_keys, self.p.value_bytes, run as u64 * 1_000_003);
        let t = Instant::now();
        for (k, v) in items {
            db.put([(k, v)]).expect("put");
        }
        let secs = t.elapsed().as_secs_f64();
        vec![
            ("total_s".into(), secs),
            ("per_key_us".into(), secs * 1e6 / self.p.put_keys as f64),
        ]
    }

    async fn put_batch(&mut self, run: usize) -> Vec<(String, f64)> {
        let prefix = self.prefix("putb");
        let (db, _) = self.open(&prefix).await;
        let items = self.values(self.p.put_keys, self.p.value_bytes, run as u64 * 1_000_003);
        let t = Instant::now();
        db.put(items).expect("put");
        let secs = t.elapsed().as_secs_f64();
        vec![
            ("total_s".into(), secs),
            ("per_key_us".into(), secs * 1e6 / self.p.put_keys as f64),
        ]
    }

    async fn bulk_load(&mut self, run: usize) -> Vec<(String, f64)> {
        let prefix = self.prefix("bulk");
        let (db, metered) = self.open(&prefix).await;
        let (n, batch) = (self.p.keys, self.p.batch);
        let seed = run as u64 * 10_000_019;
        // Values are made batch by batch, outside the timed calls.
        let mut put = Duration::ZERO;
        let mut start = 0;
        while start < n {
            let end = (start + batch).min(n);
            let items: Vec<(String, Value)> = (start..end)
                .map(|i| {
                    let v = random_bytes(self.p.value_bytes, seed + i as u64);
                    (key(i), Value::Binary(v))
                })
                .collect();
            let t = Instant::now();
            db.put(items).expect("put");
            put += t.elapsed();
            start = end;
        }
        let before = total_requests(&metered);
        let t = Instant::now();
        db.upload().await.expect("upload");
        let upload = t.elapsed();
        let requests = total_requests(&metered) - before;
        self.loaded = Some((db, prefix));
        vec![
            ("put_s".into(), put.as_secs_f64()),
            ("upload_s".into(), upload.as_secs_f64()),
            ("total_s".into(), (put + upload).as_secs_f64()),
            ("requests".into(), requests),
        ]
    }

    async fn ensure_loaded(&mut self) {
        if self.loaded.is_none() {
            eprintln!("workloads: loading {} keys for the reads", self.p.keys);
            self.bulk_load(0).await;
        }
    }

    async fn local_get(&mut self, run: usize) -> Vec<(String, f64)> {
        self.ensure_loaded().await;
        let db = self.loaded.as_ref().unwrap().0.clone();
        let keys: Vec<String> = random_indices(self.p.local_gets, self.p.keys, 7 + run as u64)
            .into_iter()
            .map(key)
            .collect();
        let mut samples = Vec::with_capacity(keys.len());
        for k in &keys {
            let t = Instant::now();
            let v = db.get(k).await.expect("get");
            samples.push(t.elapsed().as_secs_f64() * 1e6);
            assert!(v.is_some(), "{k} missing");
        }
        let t = Instant::now();
        for k in &keys {
            std::hint::black_box(db.get(k).await.expect("get"));
        }
        let throughput = keys.len() as f64 / t.elapsed().as_secs_f64();
        let mut out = Vec::new();
        latency_metrics(&mut samples, "us", &mut out);
        out.push(("keys_per_s".into(), throughput));
        out
    }

    async fn remote_get(&mut self, run: usize) -> Vec<(String, f64)> {
        self.ensure_loaded().await;
        let prefix = self.loaded.as_ref().unwrap().1.clone();
        let t = Instant::now();
        let (db, metered) = self.open(&prefix).await;
        let open_ms = t.elapsed().as_secs_f64() * 1e3;
        assert_eq!(db.len(), self.p.keys);
        let mut samples = Vec::with_capacity(self.p.remote_gets);
        for i in random_indices(self.p.remote_gets, self.p.keys, 1_000 + run as u64) {
            let k = key(i);
            let t = Instant::now();
            let v = db.get(&k).await.expect("get");
            samples.push(t.elapsed().as_secs_f64() * 1e3);
            assert!(v.is_some(), "{k} missing");
        }
        let mut out = vec![("open_ms".into(), open_ms)];
        latency_metrics(&mut samples, "ms", &mut out);
        out.push(("requests".into(), total_requests(&metered)));
        out
    }

    async fn one_object_per_key(&mut self, run: usize) -> Vec<(String, f64)> {
        let m = self.p.naive_keys;
        let values: Vec<Vec<u8>> = (0..m)
            .map(|i| random_bytes(self.p.naive_value_bytes, (run * m + i) as u64 + 77))
            .collect();

        let prefix = self.prefix("s4db-vs-naive");
        let (db, metered) = self.open(&prefix).await;
        let items: Vec<(String, Value)> = values
            .iter()
            .enumerate()
            .map(|(i, v)| (key(i), Value::Binary(v.clone())))
            .collect();
        let t = Instant::now();
        db.put(items).expect("put");
        db.upload().await.expect("upload");
        let s4db_s = t.elapsed().as_secs_f64();
        let s4db_requests = total_requests(&metered);

        let seq_prefix = self.prefix("naive-seq");
        let par_prefix = self.prefix("naive-par");
        let put_one = |prefix: String, i: usize| {
            let body = aws_sdk_s3::primitives::ByteStream::from(values[i].clone());
            let request = self
                .client
                .put_object()
                .bucket(&self.bucket)
                .key(format!("{prefix}{}", key(i)))
                .body(body);
            async move {
                request.send().await.expect("put_object");
            }
        };
        let t = Instant::now();
        for i in 0..m {
            put_one(seq_prefix.clone(), i).await;
        }
        let seq_s = t.elapsed().as_secs_f64();

        let t = Instant::now();
        futures::stream::iter((0..m).map(|i| put_one(par_prefix.clone(), i)))
            .buffer_unordered(self.p.naive_concurrency)
            .collect::<Vec<()>>()
            .await;
        let par_s = t.elapsed().as_secs_f64();
        vec![
            ("s4db_s".into(), s4db_s),
            ("s4db_requests".into(), s4db_requests),
            ("seq_s".into(), seq_s),
            ("seq_requests".into(), m as f64),
            ("par_s".into(), par_s),
            ("par_requests".into(), m as f64),
        ]
    }

    async fn run_one(&mut self, id: &str, run: usize) -> Vec<(String, f64)> {
        match id {
            "put_one_by_one" => self.put_one_by_one(run).await,
            "put_batch" => self.put_batch(run).await,
            "bulk_load" => self.bulk_load(run).await,
            "local_get" => self.local_get(run).await,
            "remote_get" => self.remote_get(run).await,
            "one_object_per_key" => self.one_object_per_key(run).await,
            _ => unreachable!(),
        }
    }
}

fn describe(id: &str, p: &Params) -> String {
    match id {
        "put_one_by_one" => format!("{} puts of one {} B value", p.put_keys, p.value_bytes),
        "put_batch" => format!("one put of {} values of {} B", p.put_keys, p.value_bytes),
        "bulk_load" => format!(
            "bulk load: {} keys of {} B in puts of {}, then upload",
            p.keys, p.value_bytes, p.batch
        ),
        "local_get" => format!(
            "local get (data file local), {} random keys of {}",
            p.local_gets, p.keys
        ),
        "remote_get" => format!(
            "remote get (range GET), fresh open of {} keys, {} random gets",
            p.keys, p.remote_gets
        ),
        "one_object_per_key" => format!(
            "{} values of {} B: s4db put+upload vs one S3 object per key (sequential, {} in flight)",
            p.naive_keys, p.naive_value_bytes, p.naive_concurrency
        ),
        _ => unreachable!(),
    }
}

fn main() {
    let args = parse_args();
    let Some(endpoint) = args.endpoint.clone() else {
        println!(
            "workloads: no --endpoint given, nothing to do (scripts/bench_engine.sh runs this \
             against moto)"
        );
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(run(args, endpoint));
}

async fn run(args: Args, endpoint: String) {
    let bucket = format!("wl-rs-{}", std::process::id());
    let mut config = S3Config::new(bucket.clone());
    config.endpoint_url = Some(endpoint.clone());
    config.region = Some(REGION.into());
    config.force_path_style = true;
    config.credentials = Some((ACCESS_KEY.into(), SECRET_KEY.into()));
    let s3 = S3Store::connect(config).await.expect("connect");
    s3.create_bucket().await.expect("create bucket");
    let sdk = aws_sdk_s3::config::Builder::new()
        .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
        .endpoint_url(&endpoint)
        .region(aws_sdk_s3::config::Region::new(REGION))
        .credentials_provider(aws_sdk_s3::config::Credentials::new(
            ACCESS_KEY, SECRET_KEY, None, None, "bench",
        ))
        .force_path_style(true)
        .build();
    let mut bench = Bench {
        endpoint: endpoint.clone(),
        bucket,
        store: Arc::new(s3),
        client: aws_sdk_s3::Client::from_conf(sdk),
        p: args.params,
        prefixes: 0,
        loaded: None,
    };

    let mut workloads = Map::new();
    for id in WORKLOADS {
        if let Some(only) = &args.only {
            if !only.iter().any(|o| o == id) {
                continue;
            }
        }
        let mut per_metric: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        let mut order = Vec::new();
        let mut runs = 0;
        if id == "local_get" || id == "remote_get" {
            bench.ensure_loaded().await; // not part of the first run's time
        }
        for run in 0..bench.p.runs {
            let t = Instant::now();
            let metrics = bench.run_one(id, run).await;
            runs += 1;
            for (name, v) in metrics {
                if !per_metric.contains_key(&name) {
                    order.push(name.clone());
                }
                per_metric.entry(name).or_default().push(v);
            }
            if run == 0 && t.elapsed() > REPEAT_UNDER {
                break;
            }
        }
        let mut metrics = Map::new();
        let mut line = format!("{id:20}");
        for name in order {
            let values = &per_metric[&name];
            let med = median(values);
            line += &format!(" {name}={med:.4}");
            metrics.insert(
                name.clone(),
                json!({"unit": unit_of(&name), "median": med, "values": values}),
            );
        }
        eprintln!("rust   {line}");
        workloads.insert(
            id.to_string(),
            json!({"desc": describe(id, &bench.p), "runs": runs, "metrics": metrics}),
        );
    }
    let p = &bench.p;
    let report = json!({
        "schema": "s4db-engine-workloads/1",
        "side": "rust",
        "engine": format!("s4db (Rust) {}", env!("CARGO_PKG_VERSION")),
        "endpoint": bench.endpoint,
        "quick": args.quick,
        "params": {
            "keys": p.keys, "put_keys": p.put_keys, "value_bytes": p.value_bytes,
            "batch": p.batch, "local_gets": p.local_gets, "remote_gets": p.remote_gets,
            "naive_keys": p.naive_keys, "naive_value_bytes": p.naive_value_bytes,
            "naive_concurrency": p.naive_concurrency, "runs": p.runs,
            "repeat_under_s": REPEAT_UNDER.as_secs(),
        },
        "workloads": workloads,
    });
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report).unwrap() + "\n")
            .unwrap_or_else(|e| panic!("write {path}: {e}"));
    }
}
