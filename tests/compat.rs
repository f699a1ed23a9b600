//! Byte compatibility with the real Python `s4db` package (0.10.0 and 0.8.0),
//! in both directions, through a moto S3 server.

mod common;

use common::{noise, s3_store, Moto, Py, PyValue};
use s4db::format::{Index, Value};
use s4db::remote::ObjectStore;
use s4db::{OpenOptions, S4db, ScanMode};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;

/// The values both sides write: every flag combination the format has.
fn corpus() -> BTreeMap<String, Value> {
    let big: String = (0..3 * 1024 * 1024 / 16)
        .map(|i| format!("{i:015x}\n"))
        .collect();
    [
        ("text", Value::Text("hello world".into())),
        ("compressible", Value::Text("abcabc".repeat(500))),
        ("binary", Value::Binary(vec![0, 1, 2, 255, 254, 0])),
        ("incompressible", Value::Binary(noise(5000))),
        ("empty-text", Value::Text(String::new())),
        ("empty-binary", Value::Binary(Vec::new())),
        (
            "unicode/ключ/日本語/🔑",
            Value::Text("значение ✓ 値".into()),
        ),
        ("nested/a/b/c/d", Value::Text("deep".into())),
        ("spaces and\ttabs", Value::Text("x".into())),
        ("big", Value::Text(big)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

fn to_py(v: &Value) -> serde_json::Value {
    match v {
        Value::Text(s) => PyValue::Text(s.clone()).to_json(),
        Value::Binary(b) => PyValue::Bytes(b.clone()).to_json(),
    }
}

fn from_py(v: &serde_json::Value) -> Option<Value> {
    PyValue::from_json(v).map(|p| match p {
        PyValue::Text(s) => Value::Text(s),
        PyValue::Bytes(b) => Value::Binary(b),
    })
}

/// Python's view of a database: values read per key with `get`, and the
/// same through `iter(local=True)`; asserts the two agree.
fn python_dump(py: &Py, moto: &Moto, bucket: &str, prefix: &str) -> BTreeMap<String, Value> {
    let out = py.run(moto, &["--bucket", bucket, "--prefix", prefix, "dump"], b"");
    let values: BTreeMap<String, Value> = out["values"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), from_py(v).unwrap()))
        .collect();
    let iter_local: BTreeMap<String, Value> = out["iter_local"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), from_py(v).unwrap()))
        .collect();
    assert_eq!(
        values, iter_local,
        "Python's get and iter(local=True) disagree"
    );
    values
}

fn python_apply(py: &Py, moto: &Moto, bucket: &str, prefix: &str, ops: serde_json::Value) {
    let out = py.run(
        moto,
        &["--bucket", bucket, "--prefix", prefix, "apply"],
        ops.to_string().as_bytes(),
    );
    assert_eq!(out["ok"], json!(true));
}

async fn rust_items(db: &S4db) -> BTreeMap<String, Value> {
    let per_key: BTreeMap<String, Value> = db
        .items(ScanMode::PerKey)
        .await
        .unwrap()
        .into_iter()
        .collect();
    let local: BTreeMap<String, Value> = db
        .items(ScanMode::Local)
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(per_key, local);
    per_key
}

async fn store(moto: &Moto, bucket: &str) -> Arc<dyn ObjectStore> {
    Arc::new(s3_store(moto, bucket).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_reads_what_we_write() {
    let moto = Moto::shared();
    let bucket = moto.unique_bucket();
    let store = store(moto, &bucket).await;
    let db = S4db::open(store.clone(), "rust/written", OpenOptions::default())
        .await
        .unwrap();
    let mut expected = corpus();
    db.put(expected.clone()).unwrap();
    db.upload().await.unwrap();
    // Overwrites and tombstones, in a second upload (a second data file).
    db.put([
        ("text".to_string(), Value::Text("overwritten".into())),
        ("binary".to_string(), Value::Text("now text".into())),
    ])
    .unwrap();
    db.delete(["nested/a/b/c/d", "spaces and\ttabs"]).unwrap();
    db.upload().await.unwrap();
    expected.insert("text".into(), Value::Text("overwritten".into()));
    expected.insert("binary".into(), Value::Text("now text".into()));
    expected.remove("nested/a/b/c/d");
    expected.remove("spaces and\ttabs");

    let py = Py::v10();
    assert_eq!(python_dump(&py, moto, &bucket, "rust/written/"), expected);
    // Python writes on top of ours, and compacts; we read the result.
    python_apply(
        &py,
        moto,
        &bucket,
        "rust/written/",
        json!([
            {"op": "put", "items": {"from-python": "hi", "text": {"b64": "AAE="}}},
            {"op": "delete", "keys": ["big"]},
            {"op": "upload"},
            {"op": "compact"},
        ]),
    );
    expected.insert("from-python".into(), Value::Text("hi".into()));
    expected.insert("text".into(), Value::Binary(vec![0, 1]));
    expected.remove("big");
    let fresh = S4db::open(store, "rust/written", OpenOptions::default())
        .await
        .unwrap();
    assert_eq!(rust_items(&fresh).await, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn we_read_what_python_writes() {
    let moto = Moto::shared();
    let bucket = moto.unique_bucket();
    let py = Py::v10();
    let mut expected = corpus();
    let items: serde_json::Map<String, serde_json::Value> = expected
        .iter()
        .map(|(k, v)| (k.clone(), to_py(v)))
        .collect();
    python_apply(
        &py,
        moto,
        &bucket,
        "py/",
        json!([
            {"op": "put", "items": items},
            {"op": "upload"},
            {"op": "put", "items": {"text": "second version", "extra": {"b64": "/w=="}}},
            {"op": "delete", "keys": ["compressible", "absent-key"]},
            {"op": "upload"},
        ]),
    );
    expected.insert("text".into(), Value::Text("second version".into()));
    expected.insert("extra".into(), Value::Binary(vec![255]));
    expected.remove("compressible");

    let store = store(moto, &bucket).await;
    let db = S4db::open(store.clone(), "py", OpenOptions::default())
        .await
        .unwrap();
    assert_eq!(rust_items(&db).await, expected);
    // Our writes and compaction on a Python database, read back by Python.
    db.put([("rust-key".to_string(), Value::Text("from rust".into()))])
        .unwrap();
    db.delete(["extra"]).unwrap();
    db.upload().await.unwrap();
    db.compact().await.unwrap();
    expected.insert("rust-key".into(), Value::Text("from rust".into()));
    expected.remove("extra");
    assert_eq!(python_dump(&py, moto, &bucket, "py/"), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_python_writers_and_one_of_ours_share_a_prefix() {
    let moto = Moto::shared();
    let bucket = moto.unique_bucket();
    let py = Py::v10();
    // Two Python processes at once, each fenced and rebasing on conflict.
    let writers: Vec<_> = (0..2)
        .map(|w| {
            let bucket = bucket.clone();
            let py = Py::v10();
            std::thread::spawn(move || {
                let mut ops = Vec::new();
                for round in 0..3 {
                    let items: serde_json::Map<String, serde_json::Value> = (0..20)
                        .map(|i| (format!("w{w}/k{i}"), json!(format!("round {round}"))))
                        .collect();
                    ops.push(json!({"op": "put", "items": items}));
                    ops.push(json!({"op": "upload"}));
                }
                python_apply(&py, Moto::shared(), &bucket, "shared/", json!(ops));
            })
        })
        .collect();
    let store = store(moto, &bucket).await;
    let db = S4db::open(store.clone(), "shared", OpenOptions::default())
        .await
        .unwrap();
    for round in 0..3 {
        db.put((0..20).map(|i| (format!("rust/k{i}"), Value::Text(format!("round {round}")))))
            .unwrap();
        db.upload().await.unwrap();
    }
    for w in writers {
        w.join().unwrap();
    }
    let fresh = S4db::open(store, "shared", OpenOptions::default())
        .await
        .unwrap();
    let items = rust_items(&fresh).await;
    assert_eq!(items.len(), 60, "{:?}", items.keys().collect::<Vec<_>>());
    assert!(items.values().all(|v| *v == Value::Text("round 2".into())));
    assert_eq!(python_dump(&py, moto, &bucket, "shared/"), items);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_format_1_database_from_python_0_8_reads_and_takes_our_writes() {
    let moto = Moto::shared();
    let bucket = moto.unique_bucket();
    let py08 = Py::v08();
    let items: serde_json::Map<String, serde_json::Value> = (0..30)
        .map(|i| (format!("old/{i}"), json!(format!("value {i} ✓"))))
        .collect();
    // A small max file size gives several legacy data files.
    let out = py08.run(
        moto,
        &[
            "--bucket",
            &bucket,
            "--prefix",
            "legacy/",
            "--max-file-size",
            "300",
            "apply",
        ],
        json!([
            {"op": "put", "items": items},
            {"op": "delete", "keys": ["old/0", "old/1"]},
            {"op": "put", "items": {"old/2": "rewritten"}},
            {"op": "upload"},
        ])
        .to_string()
        .as_bytes(),
    );
    assert_eq!(out["ok"], json!(true));
    let files = py08.run(
        moto,
        &["--bucket", &bucket, "--prefix", "legacy/", "files"],
        b"",
    );
    assert!(
        files
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == "data_000002.s4db"),
        "expected legacy file names: {files}"
    );

    let store = store(moto, &bucket).await;
    let raw = store.get("legacy/index.idx").await.unwrap().data;
    assert_eq!(raw[0], 1, "Python 0.8 writes index format 1");
    let legacy_next = Index::decode("index.idx", &raw).unwrap().next_file_num;

    let db = S4db::open(store.clone(), "legacy", OpenOptions::default())
        .await
        .unwrap();
    let mut expected: BTreeMap<String, Value> = (3..30)
        .map(|i| (format!("old/{i}"), Value::Text(format!("value {i} ✓"))))
        .collect();
    expected.insert("old/2".into(), Value::Text("rewritten".into()));
    assert_eq!(rust_items(&db).await, expected);

    db.put([
        ("new/text".to_string(), Value::Text("from rust".into())),
        ("new/bin".to_string(), Value::Binary(vec![9, 9, 0])),
    ])
    .unwrap();
    db.delete(["old/3"]).unwrap();
    db.upload().await.unwrap();
    expected.insert("new/text".into(), Value::Text("from rust".into()));
    expected.insert("new/bin".into(), Value::Binary(vec![9, 9, 0]));
    expected.remove("old/3");

    let raw = store.get("legacy/index.idx").await.unwrap().data;
    let index = Index::decode("index.idx", &raw).unwrap();
    assert_eq!(raw[0], 2, "we write index format 2");
    assert_eq!(
        index.next_file_num, legacy_next,
        "the legacy counter is carried through"
    );
    let py = Py::v10();
    assert_eq!(python_dump(&py, moto, &bucket, "legacy/"), expected);

    // Compaction and a rebuild from S3 keep the legacy counter and all values.
    db.compact().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let rebuilder = S4db::open(
        store.clone(),
        "legacy",
        OpenOptions {
            local_dir: Some(dir.path().to_path_buf()),
            ..OpenOptions::default()
        },
    )
    .await
    .unwrap();
    rebuilder.rebuild_index(true).await.unwrap();
    rebuilder.upload().await.unwrap();
    assert_eq!(python_dump(&py, moto, &bucket, "legacy/"), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_data_files_and_index_follow_the_naming_and_format() {
    let moto = Moto::shared();
    let bucket = moto.unique_bucket();
    let store = store(moto, &bucket).await;
    let db = S4db::open(store.clone(), "", OpenOptions::default())
        .await
        .unwrap();
    db.put([("k".to_string(), Value::Text("v".into()))])
        .unwrap();
    db.upload().await.unwrap();
    let py = Py::v10();
    let files = py.run(moto, &["--bucket", &bucket, "files"], b"");
    let expected_name = format!("data_{:08x}_000001.s4db", db.writer_id());
    // Beside the data file and the index: its hint object (value sizes for
    // the mount), under a name the Python package's listing never matches.
    let hint = format!("hints/{expected_name}.hint");
    assert_eq!(files, json!([expected_name, hint, "index.idx"]));
    let data = store.get(&expected_name).await.unwrap().data;
    assert_eq!(&data[..9], b"S4DB\x02\x00\x00\x00\x01");
    assert_eq!(
        py.run(moto, &["--bucket", &bucket, "get", "k"], b""),
        json!({"value": "v"})
    );
}

// ---------------------------------------------------------------- attributes

fn attrs(mode: u16, uid: u32) -> s4db::db::attrs::Attrs {
    let mut a = s4db::db::attrs::Attrs::new(s4db::db::attrs::FileKind::Regular, mode, uid, uid);
    a.xattrs.insert(b"user.x".to_vec(), b"y".to_vec());
    a
}

fn python_files(py: &Py, moto: &Moto, bucket: &str, prefix: &str) -> Vec<String> {
    let out = py.run(
        moto,
        &["--bucket", bucket, "--prefix", prefix, "files"],
        b"",
    );
    out.as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_0_10_reads_writes_and_compacts_a_database_with_attributes() {
    use s4db::db::attrs::Op as DbOp;
    let moto = Moto::shared();
    let bucket = moto.unique_bucket();
    let store = store(moto, &bucket).await;
    let py = Py::v10();
    let db = S4db::open(store.clone(), "at", OpenOptions::default())
        .await
        .unwrap();
    let mut expected = corpus();
    let mut ops: Vec<DbOp> = expected
        .iter()
        .enumerate()
        .map(|(i, (k, v))| DbOp::Put {
            key: k.clone(),
            value: v.clone(),
            attrs: Some(attrs(0o600 + i as u16, i as u32)),
        })
        .collect();
    ops.push(DbOp::SetDir {
        path: "empty".into(),
        attrs: Some(s4db::db::attrs::Attrs::new(
            s4db::db::attrs::FileKind::Dir,
            0o700,
            1,
            1,
        )),
    });
    db.write(ops).unwrap();
    db.upload().await.unwrap();
    let mode_of = |db: &S4db, k: &str| db.attrs(k).map(|a| a.mode);

    // Python sees the same keys and values; the attribute object is not a key.
    assert_eq!(python_dump(&py, moto, &bucket, "at/"), expected);
    assert!(python_files(&py, moto, &bucket, "at/").contains(&"s4db.attrs".to_string()));

    // Python overwrites one key and adds one: the overwritten key has no
    // attributes any more, the others keep theirs.
    python_apply(
        &py,
        moto,
        &bucket,
        "at/",
        json!([
            {"op": "put", "items": {"text": "python wrote this", "py/new": "x"}},
            {"op": "upload"},
        ]),
    );
    expected.insert("text".into(), Value::Text("python wrote this".into()));
    expected.insert("py/new".into(), Value::Text("x".into()));
    let fresh = S4db::open(store.clone(), "at", OpenOptions::default())
        .await
        .unwrap();
    assert_eq!(rust_items(&fresh).await, expected);
    assert_eq!(fresh.attrs("text"), None, "Python overwrote it: defaults");
    assert_eq!(fresh.attrs("py/new"), None);
    let kept: Vec<(String, Option<u16>)> = expected
        .keys()
        .filter(|k| *k != "text" && *k != "py/new")
        .map(|k| (k.clone(), mode_of(&fresh, k)))
        .collect();
    assert!(kept.iter().all(|(_, m)| m.is_some()), "{kept:?}");

    // Python's compaction copies the entries unchanged to new places: the
    // records follow them (same length, same entry CRC).
    python_apply(&py, moto, &bucket, "at/", json!([{"op": "compact"}]));
    let compacted = S4db::open(store.clone(), "at", OpenOptions::default())
        .await
        .unwrap();
    for k in ["binary", "big", "empty-text", "unicode/ключ/日本語/🔑"] {
        assert_ne!(compacted.location(k), fresh.location(k), "{k} moved");
    }
    let after: Vec<(String, Option<u16>)> = kept
        .iter()
        .map(|(k, _)| (k.clone(), mode_of(&compacted, k)))
        .collect();
    assert_eq!(after, kept, "attributes survive Python's compaction");
    assert_eq!(compacted.attrs("text"), None);
    assert!(compacted.dir_attrs("empty").is_some());
    assert_eq!(rust_items(&compacted).await, expected);
    assert!(python_files(&py, moto, &bucket, "at/").contains(&"s4db.attrs".to_string()));

    // And we keep writing; Python keeps reading.
    compacted
        .write(vec![DbOp::SetAttrs {
            key: "binary".into(),
            attrs: attrs(0o611, 5),
        }])
        .unwrap();
    compacted
        .put([("after", Value::Text("compaction".into()))])
        .unwrap();
    compacted.upload().await.unwrap();
    expected.insert("after".into(), Value::Text("compaction".into()));
    assert_eq!(python_dump(&py, moto, &bucket, "at/"), expected);
    let last = S4db::open(store.clone(), "at", OpenOptions::default())
        .await
        .unwrap();
    assert_eq!(mode_of(&last, "binary"), Some(0o611));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_0_8_keeps_reading_and_writing_when_we_set_attributes() {
    use s4db::db::attrs::Op as DbOp;
    let moto = Moto::shared();
    let bucket = moto.unique_bucket();
    let py08 = Py::v08();
    python_apply(
        &py08,
        moto,
        &bucket,
        "old/",
        json!([
            {"op": "put", "items": {"a": "1", "b": "2", "c": "3"}},
            {"op": "upload"},
        ]),
    );
    let store = store(moto, &bucket).await;
    let db = S4db::open(store.clone(), "old", OpenOptions::default())
        .await
        .unwrap();
    db.write(vec![
        DbOp::SetAttrs {
            key: "a".into(),
            attrs: attrs(0o640, 1),
        },
        DbOp::SetAttrs {
            key: "b".into(),
            attrs: attrs(0o604, 2),
        },
    ])
    .unwrap();
    let report = db.upload().await.unwrap();
    assert!(report.attrs_committed);
    // Only attributes changed: the format-1 index is untouched.
    let raw = store.get("old/index.idx").await.unwrap().data;
    assert_eq!(raw[0], 1, "the index is still Python 0.8's");
    let text = |s: &str| Value::Text(s.into());
    let mut expected: BTreeMap<String, Value> =
        [("a", text("1")), ("b", text("2")), ("c", text("3"))]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
    assert_eq!(python_dump(&py08, moto, &bucket, "old/"), expected);

    python_apply(
        &py08,
        moto,
        &bucket,
        "old/",
        json!([
            {"op": "put", "items": {"b": "rewritten", "d": "4"}},
            {"op": "upload"},
        ]),
    );
    expected.insert("b".into(), text("rewritten"));
    expected.insert("d".into(), text("4"));
    assert_eq!(python_dump(&py08, moto, &bucket, "old/"), expected);
    let fresh = S4db::open(store.clone(), "old", OpenOptions::default())
        .await
        .unwrap();
    assert_eq!(rust_items(&fresh).await, expected);
    assert_eq!(fresh.attrs("a").map(|a| a.mode), Some(0o640));
    assert_eq!(fresh.attrs("b"), None, "Python 0.8 overwrote it");
    assert_eq!(fresh.attrs("d"), None);
}
