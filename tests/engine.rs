//! The engine against real stores: the local-directory backend and a moto S3
//! server, plus fault injection, crash recovery and a reference model.

mod common;

use common::{noise, s3_store, Moto};
use s4db::format::{data_file_name, Value};
use s4db::remote::{Fault, FaultStore, LocalStore, ObjectStore, Op};
use s4db::{Error, OpenOptions, S4db, ScanMode};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// A place to keep a database: a fresh local store or a fresh moto bucket.
struct Backend {
    name: &'static str,
    store: Arc<dyn ObjectStore>,
    _dir: Option<tempfile::TempDir>,
}

impl Backend {
    fn local() -> Backend {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path(), "bucket").unwrap();
        Backend {
            name: "local",
            store: Arc::new(store),
            _dir: Some(dir),
        }
    }

    async fn moto() -> Backend {
        let moto = Moto::shared();
        Backend {
            name: "moto",
            store: Arc::new(s3_store(moto, &moto.unique_bucket()).await),
            _dir: None,
        }
    }

    async fn all() -> Vec<Backend> {
        vec![Backend::local(), Backend::moto().await]
    }

    async fn open(&self, prefix: &str, opts: OpenOptions) -> S4db {
        S4db::open(self.store.clone(), prefix, opts).await.unwrap()
    }
}

fn with_dir(dir: &std::path::Path) -> OpenOptions {
    OpenOptions {
        local_dir: Some(dir.to_path_buf()),
        ..OpenOptions::default()
    }
}

fn text(s: &str) -> Value {
    Value::Text(s.to_string())
}

async fn get(db: &S4db, key: &str) -> Option<Value> {
    db.get(key).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_round_trip_through_upload_and_reopen() {
    let big: Vec<u8> = (0..3 * 1024 * 1024u32)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    let incompressible = noise(4096);
    for b in Backend::all().await {
        let db = b.open("some/prefix", OpenOptions::default()).await;
        assert!(db.is_empty());
        db.put([
            ("text", text("hello")),
            ("unicode/ключ/🔑", text("значение ✓")),
            ("empty", text("")),
            ("empty-binary", Value::Binary(vec![])),
            ("binary", Value::Binary(vec![0, 159, 255, 0])),
            ("incompressible", Value::Binary(incompressible.clone())),
            ("compressible", text(&"abc".repeat(1000))),
            ("big", Value::Binary(big.clone())),
            ("gone", text("soon")),
        ])
        .unwrap();
        assert_eq!(db.delete(["gone", "never-existed"]).unwrap(), 1);
        db.put([("text", text("hello again"))]).unwrap();
        assert_eq!(get(&db, "text").await, Some(text("hello again")));
        let report = db.upload().await.unwrap();
        assert!(
            report.committed && report.files == 1,
            "{}: {report:?}",
            b.name
        );

        let fresh = b.open("some/prefix/", OpenOptions::default()).await;
        assert_eq!(fresh.len(), 8, "{}", b.name);
        assert_eq!(get(&fresh, "text").await, Some(text("hello again")));
        assert_eq!(
            get(&fresh, "unicode/ключ/🔑").await,
            Some(text("значение ✓"))
        );
        assert_eq!(get(&fresh, "empty").await, Some(text("")));
        assert_eq!(
            get(&fresh, "empty-binary").await,
            Some(Value::Binary(vec![]))
        );
        assert_eq!(
            get(&fresh, "binary").await,
            Some(Value::Binary(vec![0, 159, 255, 0]))
        );
        assert_eq!(
            get(&fresh, "incompressible").await,
            Some(Value::Binary(incompressible.clone()))
        );
        assert_eq!(get(&fresh, "big").await, Some(Value::Binary(big.clone())));
        assert_eq!(get(&fresh, "gone").await, None);
        assert_eq!(fresh.keys()[0], "big");
        let many = fresh.get_many(&["text", "nope", "empty"]).await.unwrap();
        assert_eq!(many, vec![Some(text("hello again")), None, Some(text(""))]);
        for mode in [ScanMode::PerKey, ScanMode::Local] {
            let items = fresh.items(mode).await.unwrap();
            assert_eq!(items.len(), 8);
            assert_eq!(items[0].0, "big");
        }
        // Another prefix in the same bucket is another database.
        assert!(b.open("other", OpenOptions::default()).await.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_open_touches_no_local_directory_and_needs_two_gets() {
    let b = Backend::local();
    let faulty = Arc::new(FaultStore::new(b.store.clone()));
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("work");
    let db = S4db::open(faulty.clone(), "p", with_dir(&local))
        .await
        .unwrap();
    // The index, then the attribute object: attributes at least as new as the entries.
    assert_eq!(
        faulty.calls(),
        vec![
            (Op::Get, "p/index.idx".to_string()),
            (Op::Get, "p/s4db.attrs".to_string())
        ]
    );
    assert!(!local.exists(), "open must not create the local directory");
    db.put([("k", text("v"))]).unwrap();
    assert!(local.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_validated_before_anything_is_written() {
    let b = Backend::local();
    let db = b.open("", OpenOptions::default()).await;
    let long = "k".repeat(65536);
    let err = db
        .put([("fine", text("1")), (long.as_str(), text("2"))])
        .unwrap_err();
    assert!(matches!(err, Error::InvalidKey { .. }), "{err}");
    assert_eq!(err.kind(), s4db::ErrorKind::InvalidInput);
    assert!(err.to_string().contains("65535"), "{err}");
    assert!(db.is_empty() && !db.has_unsynced_writes());
    db.put([("k".repeat(65535), text("max"))]).unwrap();
    db.upload().await.unwrap();
    let fresh = b.open("", OpenOptions::default()).await;
    assert_eq!(get(&fresh, &"k".repeat(65535)).await, Some(text("max")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsynced_writes_survive_the_process_and_publish_on_next_upload() {
    for b in Backend::all().await {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = b.open("p", with_dir(dir.path())).await;
            db.put([("committed", text("1"))]).unwrap();
            db.upload().await.unwrap();
            db.put([("unsynced", text("2")), ("committed", text("1b"))])
                .unwrap();
            db.delete(["committed"]).unwrap();
            db.put([("later", Value::Binary(vec![1, 2, 3]))]).unwrap();
            // flush makes it durable against power loss and snapshots the index.
            db.flush().unwrap();
            let snapshot = std::fs::read(dir.path().join("index.idx")).unwrap();
            let snapshot = s4db::format::Index::decode("index.idx", &snapshot).unwrap();
            let keys: Vec<&str> = snapshot.entries.keys().map(|k| k.as_str()).collect();
            assert_eq!(keys, ["later", "unsynced"]);
            // dropped without upload: like a process that died
        }
        let remote_view = b.open("p", OpenOptions::default()).await;
        assert_eq!(remote_view.keys(), vec!["committed"], "{}", b.name);

        let db = b.open("p", with_dir(dir.path())).await;
        assert_eq!(db.keys(), vec!["later", "unsynced"], "{}", b.name);
        assert!(db.has_unsynced_writes());
        assert_eq!(get(&db, "unsynced").await, Some(text("2")));
        db.upload().await.unwrap();
        drop(db);
        let fresh = b.open("p", OpenOptions::default()).await;
        assert_eq!(fresh.keys(), vec!["later", "unsynced"], "{}", b.name);
        assert_eq!(
            get(&fresh, "later").await,
            Some(Value::Binary(vec![1, 2, 3]))
        );
        // Nothing is replayed twice.
        let again = b.open("p", with_dir(dir.path())).await;
        assert!(!again.has_unsynced_writes(), "{}", b.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discarding_own_writes_keeps_what_earlier_processes_left() {
    let b = Backend::local();
    let dir = tempfile::tempdir().unwrap();
    {
        let db = b.open("p", with_dir(dir.path())).await;
        db.put([("a", text("from before")), ("c", text("committed"))])
            .unwrap();
        db.upload().await.unwrap();
        db.put([("a", text("left unsynced"))]).unwrap();
    }
    let db = b.open("p", with_dir(dir.path())).await;
    db.put([("a", text("mine")), ("b", text("mine too"))])
        .unwrap();
    db.delete(["c"]).unwrap();
    db.discard_own_unsynced().await.unwrap();
    assert_eq!(db.keys(), vec!["a", "c"]);
    assert_eq!(get(&db, "a").await, Some(text("left unsynced")));
    drop(db);
    let db = b.open("p", with_dir(dir.path())).await;
    assert_eq!(get(&db, "a").await, Some(text("left unsynced")));
    db.upload().await.unwrap();
    let fresh = b.open("p", OpenOptions::default()).await;
    assert_eq!(fresh.keys(), vec!["a", "c"]);
    assert_eq!(get(&fresh, "a").await, Some(text("left unsynced")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_tail_is_cut_off_cleanly() {
    let b = Backend::local();
    let dir = tempfile::tempdir().unwrap();
    let file = {
        let db = b.open("p", with_dir(dir.path())).await;
        db.put([("a", text("1")), ("b", text("2"))]).unwrap();
        let loc = db.location("b").unwrap();
        dir.path().join(data_file_name(loc.file_id))
    };
    let good_len = std::fs::metadata(&file).unwrap().len();
    // Half an entry, as a crash mid-write leaves it.
    let mut torn = std::fs::OpenOptions::new()
        .append(true)
        .open(&file)
        .unwrap();
    std::io::Write::write_all(&mut torn, &[0x00, 0, 0, 0, 1, 0, 0, 0, 9, b'c', b'x']).unwrap();
    drop(torn);

    let db = b.open("p", with_dir(dir.path())).await;
    assert_eq!(db.keys(), vec!["a", "b"]);
    assert_eq!(std::fs::metadata(&file).unwrap().len(), good_len);
    db.upload().await.unwrap();
    let fresh = b.open("p", OpenOptions::default()).await;
    assert_eq!(get(&fresh, "b").await, Some(text("2")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_cannot_share_a_local_directory() {
    let b = Backend::local();
    let dir = tempfile::tempdir().unwrap();
    let first = b.open("p", with_dir(dir.path())).await;
    first.put([("k", text("v"))]).unwrap();
    let err = S4db::open(b.store.clone(), "p", with_dir(dir.path()))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::LocalDirBusy { .. }), "{err}");
    assert!(
        err.to_string().contains(&dir.path().display().to_string()),
        "{err}"
    );
    drop(first);
    b.open("p", with_dir(dir.path())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_sends_only_what_was_written_since_the_last() {
    for b in Backend::all().await {
        let db = b.open("p", OpenOptions::default()).await;
        let value = Value::Binary(noise(200_000));
        db.put([("big", value)]).unwrap();
        let first = db.upload().await.unwrap();
        assert!(first.bytes > 200_000, "{}: {first:?}", b.name);
        db.put([("small", text("tiny"))]).unwrap();
        let second = db.upload().await.unwrap();
        assert_eq!(second.files, 1, "{}", b.name);
        assert!(
            second.bytes < 100,
            "{}: re-sent {} bytes",
            b.name,
            second.bytes
        );
        assert_eq!(
            db.upload().await.unwrap(),
            Default::default(),
            "nothing to do"
        );
    }
}

/// Sizes and modification times of every file in `dir`.
fn dir_snapshot(dir: &std::path::Path) -> BTreeMap<String, (u64, std::time::SystemTime)> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            (
                e.file_name().into_string().unwrap(),
                (m.len(), m.modified().unwrap()),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_writes_its_entries_and_nothing_else() {
    let b = Backend::local();
    let dir = tempfile::tempdir().unwrap();
    let db = b.open("p", with_dir(dir.path())).await;
    db.put((0..20_000).map(|i| (format!("key{i:06}"), text("some value"))))
        .unwrap();
    db.upload().await.unwrap();
    db.put([("first", text("after upload"))]).unwrap();
    std::thread::sleep(Duration::from_millis(20)); // let mtimes tell writes apart
    let before = dir_snapshot(dir.path());
    db.put([("key000042", text("changed")), ("new", text("added"))])
        .unwrap();
    let after = dir_snapshot(dir.path());
    // Only the active data file changed, and by exactly the two entries.
    let active = data_file_name(db.location("new").unwrap().file_id);
    let mut expected_growth = Vec::new();
    s4db::format::encode_entry(&mut expected_growth, "key000042", Some(&text("changed")));
    s4db::format::encode_entry(&mut expected_growth, "new", Some(&text("added")));
    for (name, (len, mtime)) in &after {
        if *name == active {
            assert_eq!(*len, before[name].0 + expected_growth.len() as u64);
        } else {
            assert_eq!(
                Some(&(*len, *mtime)),
                before.get(name),
                "{name} was rewritten by a put"
            );
        }
    }
    assert_eq!(after.len(), before.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_roll_at_the_soft_size_limit() {
    let b = Backend::local();
    let opts = OpenOptions {
        max_file_size: 100,
        ..OpenOptions::default()
    };
    let db = b.open("p", opts).await;
    db.put((0..10).map(|i| (format!("key{i}"), text(&format!("value number {i}")))))
        .unwrap();
    db.put([("huge", text(&"x".repeat(500)))]).unwrap();
    let files: std::collections::BTreeSet<u64> = db
        .keys()
        .iter()
        .map(|k| db.location(k).unwrap().file_id)
        .collect();
    assert!(files.len() >= 4, "{files:?}");
    db.upload().await.unwrap();
    let fresh = b.open("p", OpenOptions::default()).await;
    for i in 0..10 {
        assert_eq!(
            get(&fresh, &format!("key{i}")).await,
            Some(text(&format!("value number {i}")))
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_uploads_lose_no_update() {
    for b in Backend::all().await {
        let seed = b.open("p", OpenOptions::default()).await;
        seed.put([("shared", text("0")), ("doomed", text("x"))])
            .unwrap();
        seed.upload().await.unwrap();

        let one = b.open("p", OpenOptions::default()).await;
        let two = b.open("p", OpenOptions::default()).await;
        one.put((0..50).map(|i| (format!("one/{i}"), text("1"))))
            .unwrap();
        two.put((0..50).map(|i| (format!("two/{i}"), text("2"))))
            .unwrap();
        one.put([("shared", text("one"))]).unwrap();
        two.delete(["doomed"]).unwrap();
        let (r1, r2) = tokio::join!(one.upload(), two.upload());
        let (r1, r2) = (r1.unwrap(), r2.unwrap());
        assert!(
            r1.rebases + r2.rebases >= 1,
            "{}: one of them must have rebased",
            b.name
        );

        let fresh = b.open("p", OpenOptions::default()).await;
        assert_eq!(fresh.len(), 101, "{}", b.name);
        assert_eq!(get(&fresh, "shared").await, Some(text("one")));
        assert_eq!(get(&fresh, "doomed").await, None);
        assert_eq!(get(&fresh, "two/49").await, Some(text("2")));
        // The later committer's view includes the other's writes too.
        let later = if r1.rebases > 0 { &one } else { &two };
        assert_eq!(later.len(), 101);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_during_an_upload_are_not_published_by_it() {
    let b = Backend::local();
    let faulty = Arc::new(FaultStore::new(b.store.clone()));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    faulty.inject(Op::Put, "index.idx", 0, 1, Fault::Gate(gate.clone()));
    let db = S4db::open(faulty.clone(), "p", OpenOptions::default())
        .await
        .unwrap();
    db.put([("before", text("1")), ("changed", text("old"))])
        .unwrap();
    let uploading = tokio::spawn({
        let db = db.clone();
        async move { db.upload().await }
    });
    // Wait until the index PUT is in flight (held at the gate), then write.
    while faulty.in_flight() < 1 {
        tokio::task::yield_now().await;
    }
    db.put([("during", text("2")), ("changed", text("new"))])
        .unwrap();
    db.delete(["before"]).unwrap();
    gate.add_permits(1);
    uploading.await.unwrap().unwrap();

    let remote = b.open("p", OpenOptions::default()).await;
    assert_eq!(remote.keys(), vec!["before", "changed"]);
    assert_eq!(get(&remote, "changed").await, Some(text("old")));
    assert!(db.has_unsynced_writes());
    db.upload().await.unwrap();
    let remote = b.open("p", OpenOptions::default()).await;
    assert_eq!(remote.keys(), vec!["changed", "during"]);
    assert_eq!(get(&remote, "changed").await, Some(text("new")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_made_during_an_upload_survive_a_crash_after_it() {
    let b = Backend::local();
    let dir = tempfile::tempdir().unwrap();
    let faulty = Arc::new(FaultStore::new(b.store.clone()));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    faulty.inject(Op::Put, "index.idx", 0, 1, Fault::Gate(gate.clone()));
    {
        let db = S4db::open(faulty.clone(), "p", with_dir(dir.path()))
            .await
            .unwrap();
        db.put([("before", text("1"))]).unwrap();
        let uploading = tokio::spawn({
            let db = db.clone();
            async move { db.upload().await }
        });
        while faulty.in_flight() < 1 {
            tokio::task::yield_now().await;
        }
        db.put([("during", text("2"))]).unwrap();
        gate.add_permits(1);
        uploading.await.unwrap().unwrap();
        // dropped: the process dies before the next upload
    }
    let db = b.open("p", with_dir(dir.path())).await;
    assert_eq!(db.keys(), vec!["before", "during"]);
    db.upload().await.unwrap();
    assert_eq!(
        b.open("p", OpenOptions::default()).await.keys(),
        vec!["before", "during"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_whose_replies_were_lost_are_retried_safely() {
    for b in Backend::all().await {
        let faulty = Arc::new(FaultStore::new(b.store.clone()));
        let db = S4db::open(faulty.clone(), "p", OpenOptions::default())
            .await
            .unwrap();
        db.put([("a", text("1"))]).unwrap();
        // The data file lands but the reply is lost: the retry finds the same
        // bytes under our own name and carries on.
        faulty.inject(Op::Put, ".s4db", 0, 1, Fault::LostReply("timed out".into()));
        assert!(db.upload().await.is_err());
        // The index commit lands but the reply is lost: the retry's
        // compare-and-swap fails against our own commit and rebases onto it.
        db.put([("b", text("2"))]).unwrap();
        faulty.inject(
            Op::Put,
            "index.idx",
            0,
            1,
            Fault::LostReply("timed out".into()),
        );
        assert!(db.upload().await.is_err());
        db.put([("c", text("3"))]).unwrap();
        let report = db.upload().await.unwrap();
        assert!(report.committed, "{}: {report:?}", b.name);
        assert!(!db.has_unsynced_writes());
        let fresh = b.open("p", OpenOptions::default()).await;
        assert_eq!(fresh.keys(), vec!["a", "b", "c"], "{}", b.name);
        assert_eq!(get(&fresh, "b").await, Some(text("2")));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_failures_keep_every_write_for_the_next_upload() {
    let b = Backend::local();
    let faulty = Arc::new(FaultStore::new(b.store.clone()));
    let db = S4db::open(faulty.clone(), "p", OpenOptions::default())
        .await
        .unwrap();
    db.put([("a", text("1"))]).unwrap();
    faulty.inject(Op::Put, ".s4db", 0, 1, Fault::Error("503 SlowDown".into()));
    let err = db.upload().await.unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("p/data_") && msg.contains("503 SlowDown"),
        "{msg}"
    );
    faulty.inject(Op::Put, "index.idx", 0, 1, Fault::Error("timed out".into()));
    let err = db.upload().await.unwrap_err();
    assert!(err.to_string().contains("p/index.idx"), "{err}");
    db.put([("b", text("2"))]).unwrap();
    db.upload().await.unwrap();
    let fresh = b.open("p", OpenOptions::default()).await;
    assert_eq!(fresh.keys(), vec!["a", "b"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_uploads_are_conditional_and_unfenced_ones_are_not() {
    use s4db::remote::PutCondition;
    for fenced in [true, false] {
        let b = Backend::moto().await;
        let faulty = Arc::new(FaultStore::new(b.store.clone()));
        let opts = OpenOptions {
            fenced,
            ..OpenOptions::default()
        };
        let db = S4db::open(faulty.clone(), "p", opts).await.unwrap();
        db.put([("a", text("1"))]).unwrap();
        db.upload().await.unwrap();
        let first_etag = db.stats().index_etag.unwrap();
        db.put([("b", text("2"))]).unwrap();
        db.upload().await.unwrap();
        let kinds: Vec<(bool, PutCondition)> = faulty
            .put_conditions()
            .into_iter()
            // Hint objects are best-effort side objects, outside the protocol.
            .filter(|(key, _)| !key.ends_with(".hint"))
            .map(|(key, c)| (key.ends_with("index.idx"), c))
            .collect();
        let expected = if fenced {
            vec![
                (false, PutCondition::IfAbsent),
                (true, PutCondition::IfAbsent),
                (false, PutCondition::IfAbsent),
                (true, PutCondition::IfMatch(first_etag)),
            ]
        } else {
            vec![
                (false, PutCondition::None),
                (true, PutCondition::None),
                (false, PutCondition::None),
                (true, PutCondition::None),
            ]
        };
        assert_eq!(kinds, expected, "fenced: {fenced}");
        assert_eq!(
            b.open("p", OpenOptions::default()).await.keys(),
            vec!["a", "b"]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_reads_overlap_and_do_not_block_writers() {
    let b = Backend::moto().await;
    let seed = b.open("p", OpenOptions::default()).await;
    seed.put((0..16).map(|i| (format!("k{i}"), text(&format!("v{i}")))))
        .unwrap();
    seed.upload().await.unwrap();

    let faulty = Arc::new(FaultStore::new(b.store.clone()));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    faulty.inject(Op::GetRange, "", 0, 100, Fault::Gate(gate.clone()));
    let db = S4db::open(faulty.clone(), "p", OpenOptions::default())
        .await
        .unwrap();
    let keys: Vec<String> = (0..16).map(|i| format!("k{i}")).collect();
    let reading = tokio::spawn({
        let db = db.clone();
        async move { db.get_many(&keys).await }
    });
    // All 16 range GETs are in flight at once, held at the gate...
    while faulty.in_flight() < 16 {
        tokio::task::yield_now().await;
    }
    // ...and a put and a local read still go through.
    db.put([("written", text("during reads"))]).unwrap();
    assert_eq!(get(&db, "written").await, Some(text("during reads")));
    assert!(!reading.is_finished());
    gate.add_permits(16);
    let values = reading.await.unwrap().unwrap();
    assert_eq!(values[3], Some(text("v3")));
    assert_eq!(faulty.max_in_flight(), 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_entries_are_reported_and_rebuild_recovers() {
    for b in Backend::all().await {
        let db = b.open("p", OpenOptions::default()).await;
        db.put([
            ("a", text("first")),
            ("b", text("second")),
            ("c", text("third")),
        ])
        .unwrap();
        db.upload().await.unwrap();
        let loc_b = db.location("b").unwrap();
        let name = format!("p/{}", data_file_name(loc_b.file_id));
        let mut bytes = b.store.get(&name).await.unwrap().data.to_vec();
        bytes[loc_b.offset as usize + 10] ^= 0x40;
        b.store
            .put(&name, bytes.into(), s4db::remote::PutCondition::None)
            .await
            .unwrap();

        let fresh = b.open("p", OpenOptions::default()).await;
        assert_eq!(get(&fresh, "a").await, Some(text("first")));
        let err = fresh.get("b").await.unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::Corrupt(_)), "{msg}");
        assert!(
            msg.contains(&data_file_name(loc_b.file_id)) && msg.contains("CRC"),
            "{msg}"
        );
        assert!(msg.contains(&format!("offset {}", loc_b.offset)), "{msg}");

        // Rebuild from the store: replay stops at the corrupt entry and keeps the rest.
        let dir = tempfile::tempdir().unwrap();
        let rebuilder = b.open("p", with_dir(dir.path())).await;
        let report = rebuilder.rebuild_index(true).await.unwrap();
        assert_eq!(report.torn.len(), 1, "{}: {report:?}", b.name);
        assert_eq!(rebuilder.keys(), vec!["a"]);
        rebuilder.upload().await.unwrap();
        assert_eq!(b.open("p", OpenOptions::default()).await.keys(), vec!["a"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_data_files_and_indexes_are_clear_errors() {
    for b in Backend::all().await {
        let db = b.open("p", OpenOptions::default()).await;
        db.put([("a", text("first")), ("b", text(&"second ".repeat(50)))])
            .unwrap();
        db.upload().await.unwrap();
        let loc_b = db.location("b").unwrap();
        let name = format!("p/{}", data_file_name(loc_b.file_id));
        let bytes = b.store.get(&name).await.unwrap().data;
        let cut = bytes.slice(..(loc_b.offset as usize + 20));
        b.store
            .put(&name, cut, s4db::remote::PutCondition::None)
            .await
            .unwrap();
        let fresh = b.open("p", OpenOptions::default()).await;
        assert_eq!(get(&fresh, "a").await, Some(text("first")));
        let msg = fresh.get("b").await.unwrap_err().to_string();
        assert!(
            msg.contains("truncated") && msg.contains(&name[2..]),
            "{}: {msg}",
            b.name
        );

        let index = b.store.get("p/index.idx").await.unwrap().data;
        let short = index.slice(..index.len() - 7);
        b.store
            .put("p/index.idx", short, s4db::remote::PutCondition::None)
            .await
            .unwrap();
        let err = S4db::open(b.store.clone(), "p", OpenOptions::default())
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Corrupt(_)), "{err}");
        assert_eq!(err.kind(), s4db::ErrorKind::Corrupt);
        assert!(err.to_string().contains("p/index.idx"), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_or_lost_index_is_rebuilt_from_the_store() {
    for b in Backend::all().await {
        let db = b.open("p", OpenOptions::default()).await;
        db.put([("a", text("1")), ("b", text("2"))]).unwrap();
        db.upload().await.unwrap();
        db.put([("c", text("3"))]).unwrap();
        db.delete(["a"]).unwrap();
        db.upload().await.unwrap();

        let key = "p/index.idx";
        let mut index = b.store.get(key).await.unwrap().data.to_vec();
        let n = index.len();
        index[n - 1] ^= 1;
        b.store
            .put(key, index.into(), s4db::remote::PutCondition::None)
            .await
            .unwrap();
        let err = S4db::open(b.store.clone(), "p", OpenOptions::default())
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("p/index.idx") && err.to_string().contains("rebuild"),
            "{err}"
        );

        let dir = tempfile::tempdir().unwrap();
        let opts = OpenOptions {
            ignore_corrupt_index: true,
            ..with_dir(dir.path())
        };
        let db = b.open("p", opts).await;
        db.rebuild_index(true).await.unwrap();
        assert_eq!(db.keys(), vec!["b", "c"]);
        db.upload().await.unwrap();
        let fresh = b.open("p", OpenOptions::default()).await;
        assert_eq!(fresh.keys(), vec!["b", "c"], "{}", b.name);

        // A rebuild from an incomplete local mirror is refused, not committed.
        let empty = tempfile::tempdir().unwrap();
        let partial = b.open("p", with_dir(empty.path())).await;
        let err = partial.rebuild_index(false).await.unwrap_err();
        assert!(err.to_string().contains("--from-s3"), "{err}");
        assert!(!partial.has_unsynced_writes());

        // Lost entirely: the same from the data files alone.
        b.store.delete(key).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let db = b.open("p", with_dir(dir.path())).await;
        assert!(db.is_empty());
        db.rebuild_index(true).await.unwrap();
        db.upload().await.unwrap();
        assert_eq!(
            b.open("p", OpenOptions::default()).await.keys(),
            vec!["b", "c"]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_keeps_live_values_and_drops_dead_files() {
    for b in Backend::all().await {
        let db = b.open("p", OpenOptions::default()).await;
        for round in 0..4 {
            db.put((0..20).map(|i| (format!("k{i}"), text(&format!("round {round} value {i}")))))
                .unwrap();
            db.upload().await.unwrap();
        }
        db.delete((10..20).map(|i| format!("k{i}"))).unwrap();
        db.upload().await.unwrap();
        let before = b.store.list("p/").await.unwrap().len();
        let report = db.compact().await.unwrap();
        assert_eq!(report.keys, 10);
        assert_eq!(report.files_after, 1, "{report:?}");
        assert!(report.bytes_after < report.bytes_before);
        let after = b.store.list("p/").await.unwrap();
        let names: Vec<&str> = after.iter().map(|o| &o.key[2..]).collect();
        // One data file, its hint object, the index: the old files' hints went with them.
        assert_eq!(
            names.len(),
            3,
            "{}: {before} objects became {after:?}",
            b.name
        );
        assert_eq!(names[1], format!("hints/{}.hint", names[0]));
        assert_eq!(names[2], "index.idx");
        let fresh = b.open("p", OpenOptions::default()).await;
        assert_eq!(fresh.len(), 10);
        assert_eq!(get(&fresh, "k3").await, Some(text("round 3 value 3")));
        // Writes after compaction go on as usual.
        db.put([("k0", text("after"))]).unwrap();
        db.upload().await.unwrap();
        assert_eq!(
            get(&b.open("p", OpenOptions::default()).await, "k0").await,
            Some(text("after"))
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_follow_another_writers_compaction() {
    for b in Backend::all().await {
        let writer = b.open("p", OpenOptions::default()).await;
        writer.put([("a", text("1")), ("b", text("2"))]).unwrap();
        writer.upload().await.unwrap();
        writer.put([("a", text("1b"))]).unwrap();
        writer.upload().await.unwrap();

        let reader = b.open("p", OpenOptions::default()).await;
        reader.put([("mine", text("unsynced"))]).unwrap();
        writer.compact().await.unwrap();
        // The reader's index points at deleted files: it refreshes and reads on.
        assert_eq!(get(&reader, "b").await, Some(text("2")), "{}", b.name);
        assert_eq!(get(&reader, "a").await, Some(text("1b")));
        assert_eq!(get(&reader, "mine").await, Some(text("unsynced")));
        assert!(!reader.refresh().await.unwrap(), "already current");
        reader.upload().await.unwrap();
        assert_eq!(
            b.open("p", OpenOptions::default()).await.keys(),
            vec!["a", "b", "mine"]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compaction_that_loses_the_race_changes_nothing() {
    let b = Backend::local();
    let db = b.open("p", OpenOptions::default()).await;
    db.put([("a", text("1")), ("b", text("2"))]).unwrap();
    db.upload().await.unwrap();
    db.put([("a", text("1b"))]).unwrap();
    db.upload().await.unwrap();
    let other = b.open("p", OpenOptions::default()).await;
    other.put([("c", text("3"))]).unwrap();
    other.upload().await.unwrap();
    let objects_before = b.store.list("p/").await.unwrap();
    let err = db.compact().await.unwrap_err();
    assert!(matches!(err, Error::Conflict(_)), "{err}");
    assert_eq!(err.kind(), s4db::ErrorKind::Retry);
    let fresh = b.open("p", OpenOptions::default()).await;
    assert_eq!(fresh.keys(), vec!["a", "b", "c"]);
    assert_eq!(get(&fresh, "a").await, Some(text("1b")));
    assert_eq!(
        b.store.list("p/").await.unwrap().len(),
        objects_before.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_deletes_only_old_unreferenced_objects() {
    for b in Backend::all().await {
        let db = b.open("p", OpenOptions::default()).await;
        db.put([("a", text("1"))]).unwrap();
        db.upload().await.unwrap();
        // An orphan: uploaded by a writer that died before committing.
        let orphan = format!("p/{}", data_file_name(s4db::format::file_id(0xdead, 1)));
        let mut bytes = s4db::format::encode_file_header(1).to_vec();
        s4db::format::encode_entry(&mut bytes, "lost", Some(&text("x")));
        b.store
            .put(&orphan, bytes.into(), s4db::remote::PutCondition::None)
            .await
            .unwrap();

        let other = b.open("p", OpenOptions::default()).await;
        assert!(
            other
                .gc(Duration::from_secs(3600))
                .await
                .unwrap()
                .is_empty(),
            "young objects stay"
        );
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let deleted = other.gc(Duration::from_secs(1)).await.unwrap();
        assert_eq!(
            deleted,
            vec![data_file_name(s4db::format::file_id(0xdead, 1))],
            "{}",
            b.name
        );
        assert_eq!(
            get(&b.open("p", OpenOptions::default()).await, "a").await,
            Some(text("1"))
        );
        // With an overwrite unsynced, gc keeps the file the committed index
        // still names for the key (other readers read it until the upload).
        db.put([("a", text("2"))]).unwrap();
        db.delete(["a"]).unwrap();
        db.gc(Duration::ZERO).await.unwrap();
        assert_eq!(
            get(&b.open("p", OpenOptions::default()).await, "a").await,
            Some(text("1")),
            "{}",
            b.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_mirrors_the_store_and_refuses_to_drop_unsynced_writes() {
    let b = Backend::moto().await;
    let writer = b.open("p", OpenOptions::default()).await;
    writer.put([("a", text("1")), ("b", text("2"))]).unwrap();
    writer.upload().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = b.open("p", with_dir(dir.path())).await;
    db.put([("mine", text("x"))]).unwrap();
    assert!(matches!(db.download(false).await, Err(Error::Unsynced(_))));
    db.download(true).await.unwrap();
    assert_eq!(db.keys(), vec!["a", "b"]);
    let local_files: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".s4db"))
        .collect();
    assert_eq!(local_files.len(), 1, "{local_files:?}");
    // Reads are now local: no range GET.
    let faulty = Arc::new(FaultStore::new(b.store.clone()));
    drop(db);
    let db = S4db::open(faulty.clone(), "p", with_dir(dir.path()))
        .await
        .unwrap();
    assert_eq!(get(&db, "b").await, Some(text("2")));
    assert_eq!(faulty.count(Op::GetRange), 0);
}

/// The child half of the crash test: put keys one at a time, reporting each.
#[test]
fn crash_child_writer() {
    let Ok(spec) = std::env::var("S4DB_CRASH_CHILD") else {
        return; // only meaningful when spawned by the crash test below
    };
    let (root, local) = spec.split_once('|').unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = Arc::new(LocalStore::open(root, "bucket").unwrap());
        let db = S4db::open(store, "p", with_dir(std::path::Path::new(local)))
            .await
            .unwrap();
        for i in 0.. {
            let value = format!("value {i} {}", "x".repeat(i % 500));
            db.put([(format!("key{i:06}"), text(&value))]).unwrap();
            println!("done {i}");
            if i % 50 == 0 {
                db.upload().await.unwrap();
            }
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_writer_loses_no_completed_put() {
    use std::io::BufRead;
    let root = tempfile::tempdir().unwrap();
    let local = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "crash_child_writer",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(
            "S4DB_CRASH_CHILD",
            format!("{}|{}", root.path().display(), local.path().display()),
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut last = None;
    for line in std::io::BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if let Some(n) = line.strip_prefix("done ") {
            let n: usize = n.parse().unwrap();
            last = Some(n);
            if n >= 777 {
                child.kill().unwrap(); // SIGKILL, mid-stream
                break;
            }
        }
    }
    child.wait().unwrap();
    let last = last.expect("the child wrote nothing");
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::open(root.path(), "bucket").unwrap());
    let db = S4db::open(store.clone(), "p", with_dir(local.path()))
        .await
        .unwrap();
    for i in 0..=last {
        let value = format!("value {i} {}", "x".repeat(i % 500));
        assert_eq!(
            get(&db, &format!("key{i:06}")).await,
            Some(text(&value)),
            "key{i:06}"
        );
    }
    db.upload().await.unwrap();
    let fresh = S4db::open(store, "p", OpenOptions::default())
        .await
        .unwrap();
    assert!(
        fresh.len() > last,
        "{} keys after upload, {} were acknowledged",
        fresh.len(),
        last + 1
    );
}

mod model {
    //! A reference model: random operation sequences against a `BTreeMap`.
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Step {
        Put(Vec<(u8, Option<Vec<u8>>)>),
        Delete(Vec<u8>),
        Upload,
        Reopen,
        Crash,
        Compact,
        Rebuild,
    }

    fn step() -> impl Strategy<Value = Step> {
        let value = prop_oneof![
            Just(None),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(Some)
        ];
        prop_oneof![
            6 => proptest::collection::vec((0u8..12, value), 1..5).prop_map(Step::Put),
            2 => proptest::collection::vec(0u8..12, 1..4).prop_map(Step::Delete),
            3 => Just(Step::Upload),
            1 => Just(Step::Reopen),
            1 => Just(Step::Crash),
            1 => Just(Step::Compact),
            1 => Just(Step::Rebuild),
        ]
    }

    fn key(k: u8) -> String {
        format!("dir{}/key{k}", k % 3)
    }

    /// `None` bytes stand for a text value.
    fn value(k: u8, v: &Option<Vec<u8>>) -> Value {
        match v {
            None => Value::Text(format!("text for {k} ✓")),
            Some(b) => Value::Binary(b.clone()),
        }
    }

    async fn run(b: &Backend, steps: Vec<Step>) -> Result<(), TestCaseError> {
        let dir: PathBuf = tempfile::tempdir().unwrap().keep();
        let opts = || OpenOptions {
            max_file_size: 120,
            ..with_dir(&dir)
        };
        let mut db = b.open("m", opts()).await;
        let mut model: BTreeMap<String, Value> = BTreeMap::new();
        let mut committed = model.clone();
        for step in steps {
            match step {
                Step::Put(items) => {
                    let batch: Vec<(String, Value)> =
                        items.iter().map(|(k, v)| (key(*k), value(*k, v))).collect();
                    for (k, v) in &batch {
                        model.insert(k.clone(), v.clone());
                    }
                    db.put(batch).unwrap();
                }
                Step::Delete(keys) => {
                    let keys: Vec<String> = keys.iter().map(|k| key(*k)).collect();
                    for k in &keys {
                        model.remove(k);
                    }
                    db.delete(&keys).unwrap();
                }
                Step::Upload => {
                    db.upload().await.unwrap();
                    committed = model.clone();
                }
                Step::Reopen | Step::Crash => {
                    if matches!(step, Step::Reopen) {
                        db.upload().await.unwrap();
                        committed = model.clone();
                    }
                    drop(db);
                    db = b.open("m", opts()).await;
                }
                Step::Compact => {
                    db.upload().await.unwrap();
                    committed = model.clone();
                    db.compact().await.unwrap();
                }
                Step::Rebuild => {
                    // Writers that followed each other within one second have
                    // no recoverable order; compaction first gives one writer.
                    db.upload().await.unwrap();
                    committed = model.clone();
                    db.compact().await.unwrap();
                    // Other writers' dead files hold tombstones and old puts
                    // alike; without them a rebuild cannot resurrect anything.
                    db.gc(Duration::ZERO).await.unwrap();
                    db.rebuild_index(true).await.unwrap();
                    db.upload().await.unwrap();
                }
            }
            let keys: Vec<String> = model.keys().cloned().collect();
            prop_assert_eq!(db.keys(), keys);
        }
        for (k, v) in &model {
            let got = db.get(k).await.unwrap();
            prop_assert_eq!(got.as_ref(), Some(v), "{}", k);
        }
        let remote = b.open("m", OpenOptions::default()).await;
        let remote_items: BTreeMap<String, Value> = remote
            .items(ScanMode::PerKey)
            .await
            .unwrap()
            .into_iter()
            .collect();
        prop_assert_eq!(remote_items, committed);
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    fn check<F, Fut>(cases: u32, backend: F)
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Backend>,
    {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let config = ProptestConfig {
            cases,
            failure_persistence: None,
            ..ProptestConfig::default()
        };
        proptest!(config, |(steps in proptest::collection::vec(step(), 1..25))| {
            rt.block_on(async {
                let b = backend().await;
                run(&b, steps).await
            })?;
        });
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    /// A tombstone in a file compaction deletes must not leave the put it
    /// deleted alive in an older file a rebuild would replay.
    async fn rebuild_after_compaction_resurrects_nothing() {
        let steps = vec![
            Step::Put(vec![
                (4, None),
                (6, None),
                (
                    6,
                    Some(vec![
                        0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 12, 212, 48, 141, 234,
                    ]),
                ),
            ]),
            Step::Delete(vec![4]),
            Step::Compact,
            Step::Rebuild,
        ];
        run(&Backend::local(), steps).await.unwrap();
    }

    #[test]
    fn model_on_the_local_backend() {
        check(64, || async { Backend::local() });
    }

    #[test]
    fn model_on_moto() {
        let store = tokio::sync::OnceCell::new();
        let case = std::sync::atomic::AtomicUsize::new(0);
        check(12, || async {
            let inner: &Arc<dyn ObjectStore> = store
                .get_or_init(|| async {
                    let moto = Moto::shared();
                    Arc::new(s3_store(moto, &moto.unique_bucket()).await) as Arc<dyn ObjectStore>
                })
                .await;
            // A new prefix per case keeps the cases apart in one bucket.
            let n = case.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Backend {
                name: "moto",
                store: Arc::new(Prefixed(inner.clone(), format!("case{n}/"))),
                _dir: None,
            }
        });
    }

    /// Puts every key of a store under a sub-prefix (one bucket, many cases).
    #[derive(Debug)]
    struct Prefixed(Arc<dyn ObjectStore>, String);

    #[async_trait::async_trait]
    impl ObjectStore for Prefixed {
        fn describe(&self) -> String {
            self.0.describe()
        }
        async fn get(&self, key: &str) -> s4db::remote::StoreResult<s4db::remote::GetResult> {
            self.0.get(&format!("{}{key}", self.1)).await
        }
        async fn get_range(
            &self,
            key: &str,
            o: u64,
            l: u64,
        ) -> s4db::remote::StoreResult<bytes::Bytes> {
            self.0.get_range(&format!("{}{key}", self.1), o, l).await
        }
        async fn put(
            &self,
            key: &str,
            d: bytes::Bytes,
            c: s4db::remote::PutCondition,
        ) -> s4db::remote::StoreResult<String> {
            self.0.put(&format!("{}{key}", self.1), d, c).await
        }
        async fn delete(&self, key: &str) -> s4db::remote::StoreResult<()> {
            self.0.delete(&format!("{}{key}", self.1)).await
        }
        async fn head(&self, key: &str) -> s4db::remote::StoreResult<s4db::remote::ObjectMeta> {
            self.0.head(&format!("{}{key}", self.1)).await
        }
        async fn list_page(
            &self,
            prefix: &str,
            c: Option<String>,
        ) -> s4db::remote::StoreResult<s4db::remote::ListPage> {
            let mut page = self.0.list_page(&format!("{}{prefix}", self.1), c).await?;
            for o in &mut page.objects {
                o.key = o.key[self.1.len()..].to_string();
            }
            Ok(page)
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_interleaved_puts_and_deletes_lands_whole_and_in_place() {
    for backend in Backend::all().await {
        let db = backend.open("batch", OpenOptions::default()).await;
        db.put([
            ("old/a", text("1")),
            ("old/b", text("22")),
            ("old/c", text("333")),
        ])
        .unwrap();
        // A directory rename: put new, delete old, key after key.
        let batch = ["a", "b", "c"].into_iter().flat_map(|k| {
            let v = text(&"x".repeat(k.len() * 7));
            [(format!("new/{k}"), Some(v)), (format!("old/{k}"), None)]
        });
        let placed = db
            .apply(batch.chain([("absent".to_string(), None)]))
            .unwrap();
        assert_eq!(placed.len(), 7);
        assert!(
            placed[6].is_none(),
            "{}: no tombstone for an absent key",
            backend.name
        );
        for (i, k) in ["a", "b", "c"].iter().enumerate() {
            let key = format!("new/{k}");
            assert_eq!(db.location(&key), placed[i * 2], "{}", backend.name);
            assert_eq!(get(&db, &key).await, Some(text(&"x".repeat(7))));
        }
        db.upload().await.unwrap();
        let reader = backend.open("batch", OpenOptions::default()).await;
        assert_eq!(reader.keys(), vec!["new/a", "new/b", "new/c"]);
        assert_eq!(get(&reader, "new/c").await, Some(text(&"x".repeat(7))));
    }
}

/// The dev build of the `workloads` bench target that `cargo test --all-targets` made
/// next to this test binary (target/<profile>/deps/workloads-<hash>), the newest one.
fn workloads_bench_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("S4DB_BENCH_WORKLOADS_BIN").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    use std::os::unix::fs::PermissionsExt;
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    std::fs::read_dir(deps)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix("workloads-")
                .is_some_and(|hash| hash.chars().all(|c| c.is_ascii_hexdigit()))
        })
        .filter_map(|e| {
            let meta = e.metadata().ok()?;
            let runnable = meta.is_file() && meta.permissions().mode() & 0o111 != 0;
            runnable.then_some((meta.modified().ok()?, e.path()))
        })
        .max()
        .map(|(_, path)| path)
        .unwrap_or_else(|| {
            panic!(
                "no workloads bench binary in {}: run `cargo test --all-targets` (which builds \
                 benches/workloads.rs), or set S4DB_BENCH_WORKLOADS_BIN",
                deps.display()
            )
        })
}

/// scripts/bench_engine.sh --quick runs every workload on both sides, Rust and the
/// Python s4db 0.10.0, with and without the latency proxy, and writes both sides'
/// results as JSON and as one markdown table per RTT. No timing is checked.
#[test]
fn the_engine_benchmark_script_runs_both_sides() {
    let out = tempfile::tempdir().unwrap();
    let run = std::process::Command::new(common::repo_root().join("scripts/bench_engine.sh"))
        .args(["--quick", "--rtt-ms", "0,5"])
        .env("S4DB_BENCH_WORKLOADS_BIN", workloads_bench_binary())
        .env("S4DB_BENCH_OUT", out.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "bench_engine.sh failed:\n{stderr}");
    let all = [
        "put_one_by_one",
        "put_batch",
        "bulk_load",
        "local_get",
        "remote_get",
        "one_object_per_key",
    ];
    for (rtt, workloads) in [(0, &all[..]), (5, &all[4..])] {
        let path = out.path().join(format!("engine-{rtt}ms.json"));
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(json["rtt_ms"], rtt);
        for side in ["rust", "python"] {
            let got = &json[side]["workloads"];
            let ids: Vec<&String> = got.as_object().unwrap().keys().collect();
            assert_eq!(ids.len(), workloads.len(), "{side} at {rtt} ms: {ids:?}");
            for id in workloads {
                let metrics = got[id]["metrics"].as_object().unwrap();
                assert!(!metrics.is_empty(), "{side} {id}");
                for (name, m) in metrics {
                    let v = m["median"].as_f64().unwrap();
                    assert!(v.is_finite() && v >= 0.0, "{side} {id} {name}: {m}");
                }
            }
        }
        // Same metrics on both sides: the table can pair every row.
        for id in workloads {
            let names = |side: &str| -> Vec<String> {
                json[side]["workloads"][id]["metrics"]
                    .as_object()
                    .unwrap()
                    .keys()
                    .cloned()
                    .collect()
            };
            assert_eq!(names("rust"), names("python"), "{id} at {rtt} ms");
        }
        let md = std::fs::read_to_string(out.path().join(format!("engine-{rtt}ms.md"))).unwrap();
        assert!(
            md.contains("s4db (Rust)") && md.contains("s4db (Python) 0.10.0"),
            "{md}"
        );
        let rows: Vec<&str> = md.lines().filter(|l| l.starts_with("| ")).collect();
        let label = if rtt == 0 {
            "local get, p99"
        } else {
            "remote get, p99"
        };
        let row = rows
            .iter()
            .find(|l| l.contains(label))
            .unwrap_or_else(|| panic!("{md}"));
        // Label, Rust, Python, ratio: all filled in.
        let cells: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
        assert_eq!(cells.len(), 4, "{row}");
        assert!(cells.iter().all(|c| !c.is_empty() && *c != "-"), "{row}");
    }
}

// ---------------------------------------------------------------- attributes

mod attributes {
    use super::*;
    use s4db::db::attrs::{Attrs, FileKind, Op as DbOp};
    use std::time::{SystemTime, UNIX_EPOCH};

    /// Attributes with every field set, a time before 1970 and xattrs.
    pub(super) fn sample(mode: u16, uid: u32) -> Attrs {
        let mut a = Attrs::new(FileKind::Regular, mode, uid, 100 + uid);
        a.atime = UNIX_EPOCH - Duration::new(86_400 * 400, 250_000_000);
        a.mtime = UNIX_EPOCH + Duration::new(1_600_000_000, 123_456_789);
        a.ctime = SystemTime::now();
        a.xattrs
            .insert(b"user.tag".to_vec(), vec![0, 159, 146, 150]);
        a
    }

    pub(super) fn put_with(key: &str, value: &str, attrs: Attrs) -> DbOp {
        DbOp::Put {
            key: key.into(),
            value: text(value),
            attrs: Some(attrs),
        }
    }

    fn set(key: &str, attrs: Attrs) -> DbOp {
        DbOp::SetAttrs {
            key: key.into(),
            attrs,
        }
    }

    fn dir(path: &str, attrs: Option<Attrs>) -> DbOp {
        DbOp::SetDir {
            path: path.into(),
            attrs,
        }
    }

    async fn object_names(b: &Backend) -> Vec<String> {
        let list = b.store.list("p/").await.unwrap();
        list.into_iter().map(|o| o.key[2..].to_string()).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn attributes_round_trip_through_upload_and_a_fresh_open() {
        for b in Backend::all().await {
            let db = b.open("p", OpenOptions::default()).await;
            let mut link = sample(0o4755, 7);
            link.kind = FileKind::Symlink;
            link.link_id = 42;
            db.write(vec![
                put_with("a/file", "hello", sample(0o640, 1000)),
                put_with("a/link", "file", link.clone()),
                DbOp::Put {
                    key: "plain".into(),
                    value: text("no attributes"),
                    attrs: None,
                },
                dir("a", Some(Attrs::new(FileKind::Dir, 0o750, 5, 6))),
            ])
            .unwrap();
            let report = db.upload().await.unwrap();
            assert!(report.attrs_committed, "{}: {report:?}", b.name);
            assert!(object_names(&b).await.contains(&"s4db.attrs".to_string()));

            let fresh = b.open("p", OpenOptions::default()).await;
            assert_eq!(*fresh.attrs("a/file").unwrap(), sample_like(&db, "a/file"));
            assert_eq!(*fresh.attrs("a/link").unwrap(), link);
            assert_eq!(fresh.attrs("plain"), None, "{}", b.name);
            assert_eq!(fresh.dir_attrs("a").unwrap().mode, 0o750);
            assert_eq!(fresh.link_members(42), vec!["a/link".to_string()]);
            assert_eq!(get(&fresh, "a/file").await, Some(text("hello")));
            let stats = fresh.stats();
            assert_eq!((stats.keys_with_attrs, stats.dirs_with_attrs), (2, 1));

            // A chmod is one PUT of the attribute object, no index rewrite.
            let faulty = Arc::new(FaultStore::new(b.store.clone()));
            let db2 = S4db::open(faulty.clone(), "p", OpenOptions::default())
                .await
                .unwrap();
            db2.write(vec![set("a/file", sample(0o600, 1000))]).unwrap();
            let seen = faulty.calls().len();
            let report = db2.upload().await.unwrap();
            assert!(report.attrs_committed);
            assert_eq!(
                faulty.calls()[seen..],
                vec![(s4db::remote::Op::Put, "p/s4db.attrs".to_string())],
                "{}",
                b.name
            );
            let fresh = b.open("p", OpenOptions::default()).await;
            assert_eq!(fresh.attrs("a/file").unwrap().mode, 0o600);
            assert_eq!(fresh.attrs("a/link").unwrap().link_id, 42);
            // Overwriting the value keeps the attributes (new content times).
            db2.put([("a/file", text("changed"))]).unwrap();
            db2.upload().await.unwrap();
            let fresh = b.open("p", OpenOptions::default()).await;
            assert_eq!(fresh.attrs("a/file").unwrap().mode, 0o600);
            // A delete drops them.
            db2.delete(["a/file"]).unwrap();
            db2.upload().await.unwrap();
            db2.put([("a/file", text("again"))]).unwrap();
            db2.upload().await.unwrap();
            assert_eq!(
                b.open("p", OpenOptions::default()).await.attrs("a/file"),
                None
            );
        }
    }

    /// What `db` holds for `key` (the reference the fresh open must equal).
    fn sample_like(db: &S4db, key: &str) -> Attrs {
        (*db.attrs(key).unwrap()).clone()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_writers_change_attributes_of_different_keys_and_both_survive() {
        for b in Backend::all().await {
            let seed = b.open("p", OpenOptions::default()).await;
            seed.write(vec![
                put_with("a", "1", sample(0o644, 1)),
                put_with("b", "2", sample(0o644, 1)),
            ])
            .unwrap();
            seed.upload().await.unwrap();
            let one = b.open("p", OpenOptions::default()).await;
            let two = b.open("p", OpenOptions::default()).await;
            one.write(vec![set("a", sample(0o600, 11))]).unwrap();
            two.write(vec![set("b", sample(0o700, 22))]).unwrap();
            let (r1, r2) = tokio::join!(one.upload(), two.upload());
            let (r1, r2) = (r1.unwrap(), r2.unwrap());
            assert!(r1.attrs_committed && r2.attrs_committed);
            let fresh = b.open("p", OpenOptions::default()).await;
            assert_eq!(fresh.attrs("a").unwrap().mode, 0o600, "{}", b.name);
            assert_eq!(fresh.attrs("b").unwrap().mode, 0o700, "{}", b.name);
            assert_eq!(fresh.attrs("b").unwrap().uid, 22);
            // The later one sees the other's change too after its rebase, and
            // both see it after a refresh.
            one.refresh().await.unwrap();
            assert_eq!(one.attrs("b").unwrap().mode, 0o700);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn attribute_changes_of_a_lost_commit_race_are_rebased_never_lost() {
        for b in Backend::all().await {
            let seed = b.open("p", OpenOptions::default()).await;
            seed.put([("shared", text("0"))]).unwrap();
            seed.upload().await.unwrap();
            let one = b.open("p", OpenOptions::default()).await;
            let two = b.open("p", OpenOptions::default()).await;
            // Both write values and attributes; the index and attribute races
            // both happen, and each side keeps what it wrote.
            one.write(
                (0..20)
                    .map(|i| put_with(&format!("one/{i}"), "1", sample(0o601, i)))
                    .collect(),
            )
            .unwrap();
            two.write(
                (0..20)
                    .map(|i| put_with(&format!("two/{i}"), "2", sample(0o602, i)))
                    .collect(),
            )
            .unwrap();
            two.write(vec![dir(
                "d2",
                Some(Attrs::new(FileKind::Dir, 0o700, 0, 0)),
            )])
            .unwrap();
            let (r1, r2) = tokio::join!(one.upload(), two.upload());
            let (r1, r2) = (r1.unwrap(), r2.unwrap());
            assert!(
                r1.rebases + r2.rebases >= 1,
                "{}: one of them must have rebased",
                b.name
            );
            let fresh = b.open("p", OpenOptions::default()).await;
            for i in 0..20u32 {
                assert_eq!(
                    fresh.attrs(&format!("one/{i}")).map(|a| (a.mode, a.uid)),
                    Some((0o601, i)),
                    "{}: one/{i}",
                    b.name
                );
                assert_eq!(
                    fresh.attrs(&format!("two/{i}")).map(|a| (a.mode, a.uid)),
                    Some((0o602, i)),
                    "{}: two/{i}",
                    b.name
                );
            }
            assert!(fresh.dir_attrs("d2").is_some());
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_commit_that_never_lands_keeps_the_old_attributes_for_readers() {
        let b = Backend::local();
        let faulty = Arc::new(FaultStore::new(b.store.clone()));
        let db = S4db::open(faulty.clone(), "p", OpenOptions::default())
            .await
            .unwrap();
        db.write(vec![put_with("k", "old", sample(0o640, 1))])
            .unwrap();
        db.upload().await.unwrap();
        db.write(vec![put_with("k", "new", sample(0o600, 2))])
            .unwrap();
        // The attribute object lands, the index PUT does not: readers still
        // read the old value, with its attributes.
        faulty.inject(Op::Put, "index.idx", 0, 100, Fault::Error("503".into()));
        db.upload().await.unwrap_err();
        let reader = b.open("p", OpenOptions::default()).await;
        assert_eq!(get(&reader, "k").await, Some(text("old")));
        assert_eq!(reader.attrs("k").map(|a| a.mode), Some(0o640));
        faulty.clear();
        db.upload().await.unwrap();
        let reader = b.open("p", OpenOptions::default()).await;
        assert_eq!(get(&reader, "k").await, Some(text("new")));
        assert_eq!(reader.attrs("k").map(|a| a.mode), Some(0o600));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_directory_record_persists_and_is_removed_by_rmdir() {
        for b in Backend::all().await {
            let db = b.open("p", OpenOptions::default()).await;
            db.write(vec![dir(
                "empty/dir",
                Some(Attrs::new(FileKind::Dir, 0o711, 3, 4)),
            )])
            .unwrap();
            db.upload().await.unwrap();
            let fresh = b.open("p", OpenOptions::default()).await;
            let got = fresh.dir_attrs("empty/dir").unwrap();
            assert_eq!((got.mode, got.uid, got.gid), (0o711, 3, 4), "{}", b.name);
            assert_eq!(fresh.read_dirs(|d| d.len()), 1);
            fresh.write(vec![dir("empty/dir", None)]).unwrap();
            fresh.upload().await.unwrap();
            let again = b.open("p", OpenOptions::default()).await;
            assert!(again.dir_attrs("empty/dir").is_none(), "{}", b.name);
            assert_eq!(again.read_dirs(|d| d.len()), 0);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn attributes_of_a_process_that_died_before_upload_publish_next_time() {
        for b in Backend::all().await {
            let dir_ = tempfile::tempdir().unwrap();
            let local = dir_.path().join("work");
            {
                let seed = b.open("p", OpenOptions::default()).await;
                seed.put([("old", text("committed"))]).unwrap();
                seed.upload().await.unwrap();
                let db = b.open("p", with_dir(&local)).await;
                db.write(vec![
                    put_with("new", "v", sample(0o751, 9)),
                    set("old", sample(0o604, 8)),
                    dir("made", Some(Attrs::new(FileKind::Dir, 0o755, 1, 1))),
                ])
                .unwrap();
                db.write(vec![put_with("gone", "x", sample(0o600, 1))])
                    .unwrap();
                db.delete(["gone"]).unwrap();
                // Dropped without an upload: as if the process had been killed.
            }
            let fresh = b.open("p", OpenOptions::default()).await;
            assert_eq!(fresh.attrs("old"), None, "nothing is published yet");
            let db = b.open("p", with_dir(&local)).await;
            assert_eq!(db.attrs("new").map(|a| a.mode), Some(0o751), "{}", b.name);
            assert_eq!(db.attrs("old").map(|a| a.mode), Some(0o604));
            assert!(db.dir_attrs("made").is_some());
            assert!(db.has_unsynced_writes());
            db.upload().await.unwrap();
            let fresh = b.open("p", OpenOptions::default()).await;
            assert_eq!(fresh.attrs("new").map(|a| a.uid), Some(9), "{}", b.name);
            assert_eq!(fresh.attrs("old").map(|a| a.uid), Some(8));
            assert_eq!(fresh.attrs("gone"), None);
            assert!(fresh.dir_attrs("made").is_some());
            drop(db);
            // Committed: the journal is empty again, a reopen has nothing to publish.
            let db = b.open("p", with_dir(&local)).await;
            assert!(!db.has_unsynced_writes(), "{}", b.name);
            let journal = std::fs::metadata(local.join("attrs.journal")).unwrap();
            assert_eq!(journal.len(), 0);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_torn_attribute_journal_keeps_its_whole_records() {
        let b = Backend::local();
        let dir_ = tempfile::tempdir().unwrap();
        let local = dir_.path().join("work");
        {
            let db = b.open("p", with_dir(&local)).await;
            db.write(vec![put_with("a", "1", sample(0o610, 1))])
                .unwrap();
            db.write(vec![put_with("b", "2", sample(0o620, 2))])
                .unwrap();
            db.flush().unwrap();
        }
        let path = local.join("attrs.journal");
        let len = std::fs::metadata(&path).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - 3).unwrap();
        let db = b.open("p", with_dir(&local)).await;
        assert_eq!(db.attrs("a").map(|a| a.mode), Some(0o610));
        assert_eq!(db.attrs("b"), None, "the torn record is dropped");
        assert_eq!(
            get(&db, "b").await,
            Some(text("2")),
            "values are not affected"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn compaction_keeps_attributes() {
        for b in Backend::all().await {
            let db = b.open("p", OpenOptions::default()).await;
            for round in 0..3 {
                db.write(
                    (0..10)
                        .map(|i| {
                            put_with(
                                &format!("k{i}"),
                                &format!("r{round}"),
                                sample(0o600 + i, round),
                            )
                        })
                        .collect(),
                )
                .unwrap();
                db.upload().await.unwrap();
            }
            db.write(vec![dir("d", Some(Attrs::new(FileKind::Dir, 0o700, 0, 0)))])
                .unwrap();
            db.upload().await.unwrap();
            let before = db.location("k3").unwrap();
            db.compact().await.unwrap();
            assert_ne!(db.location("k3").unwrap(), before);
            assert_eq!(db.attrs("k3").map(|a| a.mode), Some(0o603));
            let fresh = b.open("p", OpenOptions::default()).await;
            for i in 0..10u16 {
                let a = fresh.attrs(&format!("k{i}")).unwrap();
                assert_eq!((a.mode, a.uid), (0o600 + i, 2), "{}", b.name);
            }
            assert!(fresh.dir_attrs("d").is_some());
            // Writes after compaction keep working with attributes.
            db.write(vec![set("k1", sample(0o666, 5))]).unwrap();
            db.upload().await.unwrap();
            let fresh = b.open("p", OpenOptions::default()).await;
            assert_eq!(fresh.attrs("k1").map(|a| a.mode), Some(0o666));
            assert_eq!(fresh.attrs("k2").map(|a| a.mode), Some(0o602));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rebuild_index_keeps_records_of_the_entries_it_names() {
        let b = Backend::local();
        let dir_ = tempfile::tempdir().unwrap();
        let db = b.open("p", with_dir(dir_.path())).await;
        db.write(vec![put_with("a", "1", sample(0o611, 1))])
            .unwrap();
        db.upload().await.unwrap();
        db.rebuild_index(false).await.unwrap();
        db.upload().await.unwrap();
        assert_eq!(db.attrs("a").map(|a| a.mode), Some(0o611));
        let fresh = b.open("p", OpenOptions::default()).await;
        assert_eq!(fresh.attrs("a").map(|a| a.mode), Some(0o611));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn gc_never_deletes_the_attribute_object() {
        for b in Backend::all().await {
            let db = b.open("p", OpenOptions::default()).await;
            db.write(vec![put_with("a", "1", sample(0o600, 1))])
                .unwrap();
            db.upload().await.unwrap();
            let other = b.open("p", OpenOptions::default()).await;
            other.gc(Duration::ZERO).await.unwrap();
            assert!(object_names(&b).await.contains(&"s4db.attrs".to_string()));
            let fresh = b.open("p", OpenOptions::default()).await;
            assert_eq!(fresh.attrs("a").map(|a| a.mode), Some(0o600), "{}", b.name);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_corrupt_attribute_object_still_opens_with_defaults() {
        for b in Backend::all().await {
            let db = b.open("p", OpenOptions::default()).await;
            db.write(vec![put_with("a", "1", sample(0o600, 1))])
                .unwrap();
            db.upload().await.unwrap();
            let key = "p/s4db.attrs";
            let mut bytes = b.store.get(key).await.unwrap().data.to_vec();
            let mid = bytes.len() / 2;
            bytes[mid] ^= 0x40;
            b.store
                .put(key, bytes.into(), s4db::remote::PutCondition::None)
                .await
                .unwrap();
            let fresh = b.open("p", OpenOptions::default()).await;
            assert_eq!(get(&fresh, "a").await, Some(text("1")), "{}", b.name);
            assert_eq!(fresh.attrs("a"), None);
            // The next attribute change replaces the damaged object.
            fresh.write(vec![set("a", sample(0o640, 2))]).unwrap();
            fresh.upload().await.unwrap();
            let again = b.open("p", OpenOptions::default()).await;
            assert_eq!(again.attrs("a").map(|a| a.mode), Some(0o640), "{}", b.name);
        }
    }
}

// ------------------------------------------------- incremental compaction

mod incremental {
    use super::*;
    use s4db::db::attr_codec::{decode_object, ATTRS_NAME};
    use s4db::db::attrs::Op as DbOp;
    use s4db::db::CompactOptions;
    use std::collections::BTreeSet;

    async fn names(store: &dyn ObjectStore, prefix: &str) -> BTreeSet<String> {
        store
            .list(prefix)
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.key[prefix.len()..].to_string())
            .collect()
    }

    fn data(names: &BTreeSet<String>) -> BTreeSet<String> {
        names
            .iter()
            .filter(|n| n.starts_with("data_"))
            .cloned()
            .collect()
    }

    /// `n` uploads of one key each (every third with attributes), and an
    /// overwrite and a delete; returns the expected contents.
    async fn small_uploads(db: &S4db, n: usize) -> BTreeMap<String, Value> {
        let mut want = BTreeMap::new();
        for i in 0..n {
            let (key, value) = (format!("k{i:04}"), text(&format!("value {i}")));
            if i % 3 == 0 {
                db.write(vec![DbOp::Put {
                    key: key.clone(),
                    value: value.clone(),
                    attrs: Some(super::attributes::sample(0o600 + i as u16 % 8, 7)),
                }])
                .unwrap();
            } else {
                db.put([(key.clone(), value.clone())]).unwrap();
            }
            want.insert(key, value);
            db.upload().await.unwrap();
        }
        db.put([("k0001", text("overwritten"))]).unwrap();
        want.insert("k0001".into(), text("overwritten"));
        db.delete(["k0002"]).unwrap();
        want.remove("k0002");
        db.upload().await.unwrap();
        want
    }

    async fn contents(db: &S4db) -> BTreeMap<String, Value> {
        db.items(ScanMode::PerKey)
            .await
            .unwrap()
            .into_iter()
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rounds_merge_small_files_keep_values_and_attributes_and_gc_waits_for_the_grace() {
        for b in Backend::all().await {
            let dir = tempfile::tempdir().unwrap();
            let db = b.open("p", with_dir(dir.path())).await;
            let want = small_uploads(&db, 40).await;
            let attrs_before: BTreeMap<String, _> = want
                .keys()
                .filter_map(|k| db.attrs(k).map(|a| (k.clone(), a)))
                .collect();
            assert_eq!(attrs_before.len(), 14, "{}", b.name);
            let before = data(&names(b.store.as_ref(), "p/").await);
            assert!(before.len() >= 41, "{}: {before:?}", b.name);
            // A reader holding the index from before the compaction.
            let old_reader = b.open("p", OpenOptions::default()).await;

            let opts = CompactOptions::default();
            let r = db.compact_round(&opts).await.unwrap();
            assert_eq!(
                (r.files_merged, r.files_written),
                (want.len(), 1),
                "{}",
                b.name
            );
            assert_eq!(r.keys_moved, want.len(), "{}", b.name);
            // Nothing left to do: a second round is a no-op.
            assert!(!db.compact_round(&opts).await.unwrap().did_work());
            assert_eq!(db.stats().data_files, 1, "{}", b.name);
            assert_eq!(contents(&db).await, want, "{}", b.name);
            for (k, a) in &attrs_before {
                assert_eq!(db.attrs(k).as_deref(), Some(&**a), "{}: {k}", b.name);
            }
            // A fresh open sees the same values and attributes.
            let fresh = b.open("p", OpenOptions::default()).await;
            assert_eq!(contents(&fresh).await, want, "{}", b.name);
            for (k, a) in &attrs_before {
                assert_eq!(fresh.attrs(k).as_deref(), Some(&**a), "{}: {k}", b.name);
            }
            // The replaced objects are retired, not deleted: the old reader
            // reads them, and gc within the grace period keeps them.
            let objects = names(b.store.as_ref(), "p/").await;
            assert!(objects.contains(s4db::db::RETIRED_NAME), "{objects:?}");
            assert!(data(&objects).is_superset(&before), "{}", b.name);
            assert_eq!(contents(&old_reader).await, want, "{}", b.name);
            assert!(db.gc(Duration::from_secs(3600)).await.unwrap().is_empty());
            // Past the grace period gc deletes them and their hint objects.
            let deleted = db.gc(Duration::ZERO).await.unwrap();
            assert_eq!(deleted.len(), before.len(), "{}: {deleted:?}", b.name);
            let objects = names(b.store.as_ref(), "p/").await;
            assert_eq!(data(&objects).len(), 1, "{}: {objects:?}", b.name);
            let hints: Vec<_> = objects.iter().filter(|n| n.starts_with("hints/")).collect();
            assert_eq!(hints.len(), 1, "{}: {objects:?}", b.name);
            // The old reader finds its objects gone and refreshes by itself.
            assert_eq!(get(&old_reader, "k0003").await, Some(text("value 3")));
            // The attribute object keeps no record of a deleted file.
            let got = b.store.get(&format!("p/{ATTRS_NAME}")).await.unwrap();
            let object = decode_object(ATTRS_NAME, &got.data).unwrap();
            let live = db.location("k0000").unwrap().file_id;
            assert!(
                object.files.iter().all(|(_, r)| r.loc.file_id == live),
                "{}: {:?}",
                b.name,
                object
                    .files
                    .iter()
                    .map(|(k, r)| (k, r.loc))
                    .collect::<Vec<_>>()
            );
            let m = db.maintenance_stats();
            assert!(m.compactions >= 1 && m.objects_deleted >= 2 * before.len() as u64 - 2);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn moves_give_way_to_a_concurrent_writer_and_rounds_respect_their_budget() {
        let b = Backend::moto().await;
        let dir = tempfile::tempdir().unwrap();
        let db = b.open("p", with_dir(dir.path())).await;
        let mut want = small_uploads(&db, 12).await;
        // Another writer overwrites and deletes keys after our last look.
        let other = b.open("p", OpenOptions::default()).await;
        other.put([("k0004", text("theirs"))]).unwrap();
        other.delete(["k0005"]).unwrap();
        other.upload().await.unwrap();
        want.insert("k0004".into(), text("theirs"));
        want.remove("k0005");
        // A tight budget: a round reads at most two files (of 34 bytes).
        let tight = CompactOptions {
            max_round_bytes: 70,
            ..CompactOptions::default()
        };
        let r = db.compact_round(&tight).await.unwrap();
        assert_eq!(r.files_merged, 2, "{r:?}");
        // Rounds until done: the commit rebased onto the other writer's.
        let opts = CompactOptions::default();
        while db.compact_round(&opts).await.unwrap().did_work() {}
        assert_eq!(contents(&db).await, want);
        let fresh = b.open("p", OpenOptions::default()).await;
        assert_eq!(contents(&fresh).await, want);
        assert!(fresh.stats().data_files <= 4, "{:?}", fresh.stats());
        db.gc(Duration::ZERO).await.unwrap();
        assert_eq!(
            contents(&b.open("p", OpenOptions::default()).await).await,
            want
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_local_directory_is_private_and_evicts_published_files_only() {
        use std::os::unix::fs::PermissionsExt;
        let b = Backend::local();
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a/b/local");
        let db = b.open("p", with_dir(&dir)).await;
        db.put([("published", text("one"))]).unwrap();
        db.upload().await.unwrap();
        db.put([("unsynced", text("two"))]).unwrap();
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        let files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert!(files.len() >= 3, "{files:?}");
        for f in &files {
            assert_eq!(mode(f), 0o600, "{f:?}");
        }
        // Past a cap of zero only the published file goes.
        let (n, _) = db.evict_local(0).unwrap();
        assert_eq!(n, 1);
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with("data_"))
            .collect();
        assert_eq!(left.len(), 1, "{left:?}");
        assert_eq!(get(&db, "published").await, Some(text("one")));
        assert_eq!(get(&db, "unsynced").await, Some(text("two")));
        drop(db);
        // Unsynced data survived the eviction.
        let db = b.open("p", with_dir(&dir)).await;
        db.upload().await.unwrap();
        let fresh = b.open("p", OpenOptions::default()).await;
        assert_eq!(get(&fresh, "unsynced").await, Some(text("two")));
    }
}

// ------------------------------------------------------- memory over time

mod memory {
    use super::*;
    use s4db::db::attrs::{Attrs, FileKind, Op as DbOp};
    use s4db::db::CompactOptions;

    /// A writer that always has a write on its way (the mount's case: each
    /// upload is followed by the next write) and a second writer that
    /// commits access times of entries it saw before a compaction replaced
    /// their files: its commit hands their records back to the writer as
    /// spare records. gc deletes the files, and the records must go with
    /// them although the writer is never quiet; they used to pile up, one
    /// per replaced entry (gc pruned them only with nothing unsynced).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spare_attribute_records_follow_the_live_data_while_writes_keep_coming() {
        const KEYS: usize = 10;
        let b = Backend::local();
        let (wdir, rdir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let writer = b.open("p", with_dir(wdir.path())).await;
        let reader = b.open("p", with_dir(rdir.path())).await;
        let opts = CompactOptions {
            min_files: 2,
            publish_unsynced: true,
            ..CompactOptions::default()
        };
        let put = |i: usize| DbOp::Put {
            key: format!("k{}", i % KEYS),
            value: text(&format!("value {i}")),
            attrs: Some(Attrs::new(FileKind::Regular, 0o644, 1, 1)),
        };
        let mut most = 0;
        for round in 0..40 {
            for j in 0..KEYS {
                writer.write(vec![put(round * KEYS + j)]).unwrap();
                writer.upload().await.unwrap();
            }
            // The reader's access times, of the entries it saw before the
            // writer's next compaction replaced their files: its commit hands
            // their records back to the writer.
            reader.refresh().await.unwrap();
            writer.write(vec![put(round * KEYS)]).unwrap();
            writer.compact_round(&opts).await.unwrap();
            let touched: Vec<DbOp> = (0..KEYS)
                .filter_map(|j| {
                    let key = format!("k{j}");
                    let mut a = (*reader.attrs(&key)?).clone();
                    a.atime = std::time::SystemTime::now();
                    Some(DbOp::SetAttrs { key, attrs: a })
                })
                .collect();
            reader.write(touched).unwrap();
            reader.upload().await.unwrap();
            // The next write is on its way while gc runs.
            writer.write(vec![put(round * KEYS + 1)]).unwrap();
            writer.upload().await.unwrap();
            writer.write(vec![put(round * KEYS + 2)]).unwrap();
            writer.gc_round(Duration::ZERO, 500).await.unwrap();
            let m = writer.memory_stats();
            assert_eq!(m.index_keys, KEYS);
            if round >= 5 {
                most = most.max(m.attr_spare_records);
            }
        }
        assert!(
            most <= 4 * KEYS,
            "spare records follow the keys, not the {} uploads: {most}",
            40 * (KEYS + 3)
        );
        writer.upload().await.unwrap();
        assert_eq!(writer.keys().len(), KEYS);
    }
}
