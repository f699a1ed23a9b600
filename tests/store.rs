//! The S3 store's large-file path through the engine, against moto: data
//! files over the multipart threshold go up in parts and read back
//! byte-identical, and gc aborts multipart uploads a failed upload left.

mod common;

use common::{noise, Moto, ACCESS_KEY, REGION, SECRET_KEY};
use s4db::db::PartsAhead;
use s4db::format::data_file_name;
use s4db::format::Value;
use s4db::remote::{ObjectStore, S3Config, S3Store};
use s4db::{OpenOptions, S4db};
use std::sync::Arc;
use std::time::Duration;

const MIB: u64 = 1024 * 1024;

/// A store on a fresh bucket that uploads files from 5 MiB on in 5 MiB parts.
async fn multipart_store(moto: &Moto) -> S3Store {
    let bucket = moto.unique_bucket();
    let mut config = S3Config::new(bucket);
    config.endpoint_url = Some(moto.endpoint.clone());
    config.region = Some(REGION.into());
    config.force_path_style = true;
    config.credentials = Some((ACCESS_KEY.into(), SECRET_KEY.into()));
    config.max_attempts = 2;
    config.multipart_threshold = 5 * MIB;
    config.part_size = 5 * MIB;
    S3Store::connect(config).await.expect("connect to moto")
}

/// A database under `prefix` on a [`multipart_store`], with its own local
/// directory.
async fn multipart_db(prefix: &str) -> (Arc<dyn ObjectStore>, tempfile::TempDir, S4db) {
    let store: Arc<dyn ObjectStore> = Arc::new(multipart_store(Moto::shared()).await);
    let dir = tempfile::tempdir().unwrap();
    let opts = OpenOptions {
        local_dir: Some(dir.path().to_path_buf()),
        ..OpenOptions::default()
    };
    let db = S4db::open(store.clone(), prefix, opts).await.unwrap();
    (store, dir, db)
}

/// The SDK itself, to make what the store never makes: a dangling upload.
fn sdk_client(moto: &Moto) -> aws_sdk_s3::Client {
    let config = aws_sdk_s3::Config::builder()
        .behavior_version_latest()
        .endpoint_url(&moto.endpoint)
        .region(aws_sdk_s3::config::Region::new(REGION))
        .credentials_provider(aws_sdk_s3::config::Credentials::new(
            ACCESS_KEY, SECRET_KEY, None, None, "test",
        ))
        .force_path_style(true)
        .build();
    aws_sdk_s3::Client::from_conf(config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_value_goes_up_in_parts_and_reads_back_identical() {
    let (store, _dir, db) = multipart_db("big/").await;
    let value = noise(12 * MIB as usize);
    db.put([("large", Value::Binary(value.clone()))]).unwrap();
    db.put([("small", Value::Text("x".into()))]).unwrap();
    let report = db.upload().await.unwrap();
    assert!(report.bytes > 12 * MIB, "{report:?}");

    let objects = store.list("big/").await.unwrap();
    let multipart: Vec<_> = objects
        .iter()
        .filter(|o| o.etag.as_deref().is_some_and(|e| e.contains('-')))
        .collect();
    assert_eq!(multipart.len(), 1, "one data file in parts: {objects:?}");
    assert!(store.list_multipart_uploads("").await.unwrap().is_empty());

    // Another instance, nothing cached: every byte comes from the parts.
    let reader = S4db::open(store.clone(), "big/", OpenOptions::default())
        .await
        .unwrap();
    match reader.get("large").await.unwrap() {
        Some(Value::Binary(got)) => assert!(got == value, "the value differs"),
        other => panic!(
            "expected the binary value, got {:?}",
            other.map(|_| "other")
        ),
    }
    assert_eq!(
        reader.get("small").await.unwrap(),
        Some(Value::Text("x".into()))
    );
}

/// Waits (up to 10 s) until no multipart upload is left under `prefix`:
/// an abandoned upload is aborted in the background.
async fn until_no_uploads(store: &dyn ObjectStore, prefix: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = store.list_multipart_uploads(prefix).await.unwrap();
        if left.is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "uploads left: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A large value whose parts went up while it was written (the mount's
/// write-behind): the upload keeps the parts whose bytes match the finished
/// data file and sends again one that does not, so the object is the local
/// file byte for byte; a reservation the index has moved past (a later file
/// already holds the key) is not used, and its upload is aborted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parts_sent_ahead_are_kept_when_they_match_and_sent_again_when_not() {
    let (store, dir, db) = multipart_db("ahead/").await;
    let key = "big";
    let value = noise(23 * MIB as usize);
    let part = 5 * MIB;
    let value_at = S4db::own_file_value_offset(key);

    // Sends parts `numbers` of `key`'s own data file, part 3 with a byte
    // the value does not have.
    let send_ahead = |file_id: u64| {
        let (store, value) = (store.clone(), value.clone());
        async move {
            let object = format!("ahead/{}", data_file_name(file_id));
            let upload_id = store.start_multipart_upload(&object).await.unwrap();
            let mut parts = Vec::new();
            for number in 2..=4u64 {
                let start = ((number - 1) * part - value_at) as usize;
                let mut bytes = value[start..start + part as usize].to_vec();
                if number == 3 {
                    bytes[100] ^= 1;
                }
                let sent = store
                    .upload_part(&object, &upload_id, number as i32, bytes.into())
                    .await
                    .unwrap();
                parts.push(sent);
            }
            PartsAhead {
                file_id,
                upload_id,
                part_size: part,
                sent: Box::pin(async move { parts }),
                stop: Default::default(),
            }
        }
    };

    let file_id = db.reserve_file_id().unwrap();
    let early = send_ahead(file_id).await;
    let len = value.len() as u64;
    let loc = db
        .put_own_file(key, &mut &value[..], len, true, None, early)
        .unwrap();
    assert_eq!((loc.file_id, loc.offset), (file_id, 9), "its own file");
    db.upload().await.unwrap();
    let object = format!("ahead/{}", data_file_name(file_id));
    let local = std::fs::read(dir.path().join(data_file_name(file_id))).unwrap();
    assert!(
        store.get(&object).await.unwrap().data == local,
        "object differs"
    );
    let etag = store.head(&object).await.unwrap().etag.unwrap();
    assert!(etag.ends_with("-5\""), "five parts of 5 MiB: {etag}");
    assert!(store
        .list_multipart_uploads("ahead/")
        .await
        .unwrap()
        .is_empty());
    let reader = S4db::open(store.clone(), "ahead/", OpenOptions::default())
        .await
        .unwrap();
    assert!(reader.get(key).await.unwrap() == Some(Value::Binary(value.clone())));

    // Reserved, then the key is put the usual way into a later file: the
    // reservation would put the newer value in an older file. Not used.
    let stale = db.reserve_file_id().unwrap();
    let early = send_ahead(stale).await;
    db.put([(key, Value::Text("in between".into()))]).unwrap();
    let loc = db
        .put_own_file(key, &mut &value[..], len, true, None, early)
        .unwrap();
    assert!(loc.file_id > stale, "{loc:?} not in {stale:x}");
    until_no_uploads(&*store, "ahead/").await;
    db.upload().await.unwrap();
    let reader = S4db::open(store.clone(), "ahead/", OpenOptions::default())
        .await
        .unwrap();
    assert!(reader.get(key).await.unwrap() == Some(Value::Binary(value)));
    let objects = store.list("ahead/").await.unwrap();
    assert!(
        !objects
            .iter()
            .any(|o| o.key.ends_with(&data_file_name(stale))),
        "{objects:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_aborts_dangling_multipart_uploads_under_its_prefix() {
    let moto = Moto::shared();
    let s3 = multipart_store(moto).await;
    s3.create_bucket().await.unwrap();
    let bucket = s3.bucket().to_string();
    let store: Arc<dyn ObjectStore> = Arc::new(s3);
    let client = sdk_client(moto);
    for key in ["db/dangling", "elsewhere/dangling"] {
        client
            .create_multipart_upload()
            .bucket(&bucket)
            .key(key)
            .send()
            .await
            .unwrap();
    }
    let db = S4db::open(store.clone(), "db/", OpenOptions::default())
        .await
        .unwrap();
    // moto reports every upload as started in 2010: older than any grace.
    db.gc(Duration::from_secs(3600)).await.unwrap();
    let left: Vec<String> = store
        .list_multipart_uploads("")
        .await
        .unwrap()
        .into_iter()
        .map(|u| u.key)
        .collect();
    assert_eq!(left, ["elsewhere/dangling"]);
}

/// Upload time of one large data file through `scripts/latency_proxy.py`,
/// single PUT against multipart. A measurement, not a check:
///
/// ```text
/// S4DB_BENCH_MIB=256 S4DB_BENCH_RTT_MS=20 cargo test --release --test store \
///     -- --ignored --nocapture upload_timing
/// ```
///
/// Extra proxy flags (say a bandwidth cap, when the proxy has one) go in
/// `S4DB_BENCH_PROXY_ARGS`; another proxy with the same arguments can be
/// named in `S4DB_BENCH_PROXY`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn upload_timing() {
    let env = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.into());
    let mib: u64 = env("S4DB_BENCH_MIB", "256").parse().unwrap();
    let rtt = env("S4DB_BENCH_RTT_MS", "20");
    let extra = env("S4DB_BENCH_PROXY_ARGS", "");
    let moto = Moto::start();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let script = std::env::var_os("S4DB_BENCH_PROXY")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| common::repo_root().join("scripts/latency_proxy.py"));
    let mut proxy = std::process::Command::new("python3")
        .arg(script)
        .args([port.to_string(), "127.0.0.1".into(), moto.port.to_string()])
        .args(["--rtt-ms", &rtt])
        .args(extra.split_whitespace())
        .spawn()
        .unwrap();
    let endpoint = format!("http://127.0.0.1:{port}");
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data");
    std::fs::write(&path, noise((mib * MIB) as usize)).unwrap();
    let modes: [(&str, u64, u64, usize); 4] = [
        ("single PUT", u64::MAX, 8 * MIB, 1),
        ("multipart 8 MiB x 1", 16 * MIB, 8 * MIB, 1),
        ("multipart 8 MiB x 4", 16 * MIB, 8 * MIB, 4),
        ("multipart 8 MiB x 8", 16 * MIB, 8 * MIB, 8),
    ];
    for (i, (name, threshold, part, in_flight)) in modes.into_iter().enumerate() {
        let mut config = S3Config::new(format!("s4db-bench-{i}"));
        config.endpoint_url = Some(endpoint.clone());
        config.region = Some(REGION.into());
        config.force_path_style = true;
        config.credentials = Some((ACCESS_KEY.into(), SECRET_KEY.into()));
        config.max_attempts = 1;
        config.multipart_threshold = threshold;
        config.part_size = part;
        config.parts_in_flight = in_flight;
        let store = S3Store::connect(config).await.unwrap();
        store.create_bucket().await.unwrap();
        let started = std::time::Instant::now();
        store
            .put_file("db/data", &path, s4db::remote::PutCondition::IfAbsent)
            .await
            .unwrap();
        let secs = started.elapsed().as_secs_f64();
        println!(
            "{name:>22}: {mib} MiB in {secs:6.2} s = {:7.1} MiB/s (rtt {rtt} ms{})",
            mib as f64 / secs,
            if extra.is_empty() {
                String::new()
            } else {
                format!(", {extra}")
            }
        );
        store.delete("db/data").await.unwrap();
    }
    let _ = proxy.kill();
    let _ = proxy.wait();
}
