//! The filesystem core without FUSE: the same calls the kernel makes, on
//! the local-directory store, checked against the engine and a model.

use super::attrs::{Caller, SetAttr};
use super::*;
use crate::remote::LocalStore;
use crate::OpenOptions;
use proptest::prelude::*;
use std::ffi::OsString;

struct Fixture {
    fs: Arc<S4Fs>,
    _dir: tempfile::TempDir,
}

async fn fixture(seed: &[(&str, Value)]) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn crate::remote::ObjectStore> =
        Arc::new(LocalStore::open(dir.path().join("store"), "b").unwrap());
    if !seed.is_empty() {
        let db = S4db::open(store.clone(), "p", OpenOptions::default())
            .await
            .unwrap();
        db.put(seed.iter().map(|(k, v)| (k.to_string(), v.clone())))
            .unwrap();
        db.upload().await.unwrap();
    }
    let store = Arc::new(MeteredStore::new(store));
    let local = dir.path().join("local");
    let opts = OpenOptions {
        local_dir: Some(local.clone()),
        ..OpenOptions::default()
    };
    let db = S4db::open(store.clone(), "p", opts).await.unwrap();
    let cfg = FsConfig {
        uid: 0,
        gid: 0,
        file_mode: 0o644,
        dir_mode: 0o755,
        read_only: false,
        upload_delay: None,
        upload_max_delay: None,
        refresh_interval: None,
        spill_dir: local.join("spill"),
        stream: stream::StreamConfig::default(),
        meta_path: Some(local.join("meta")),
    };
    let fs = S4Fs::new(db, store, cfg).unwrap();
    Fixture { fs, _dir: dir }
}

fn os(s: &str) -> OsString {
    OsString::from(s)
}

impl Fixture {
    /// The inode of directory `path` ("" is the root), looked up component by component.
    async fn dir(&self, path: &str) -> u64 {
        let mut ino = ROOT_INO;
        for c in path.split('/').filter(|c| !c.is_empty()) {
            ino = self.fs.lookup(ino, &os(c)).await.unwrap().ino;
        }
        ino
    }

    async fn write_file(&self, path: &str, data: &[u8]) -> FsResult<()> {
        let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
        let parent = self.dir(dir).await;
        let fh = match self.fs.lookup(parent, &os(name)).await {
            Ok(a) => {
                // As the kernel sends an O_TRUNC open: the open, then a
                // truncating SETATTR.
                let fh = self.fs.open(a.ino, libc::O_WRONLY).await?.fh;
                self.fs.setattr(a.ino, SetAttr::size(0)).await?;
                fh
            }
            Err(_) => {
                self.fs
                    .create(parent, &os(name), 0o644, libc::O_WRONLY, Caller::ROOT)
                    .await?
                    .1
                    .fh
            }
        };
        self.fs.write(fh, 0, data).await?;
        self.fs.flush(fh).await?;
        self.fs.release(fh).await
    }

    async fn read_file(&self, path: &str) -> FsResult<Vec<u8>> {
        let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
        let attr = self.fs.lookup(self.dir(dir).await, &os(name)).await?;
        let o = self.fs.open(attr.ino, libc::O_RDONLY).await?;
        let data = self.fs.read(o.fh, 0, u32::MAX).await?;
        self.fs.release(o.fh).await?;
        assert_eq!(data.len() as u64, attr.size, "st_size of {path}");
        Ok(data)
    }

    async fn names(&self, dir: &str) -> Vec<String> {
        let fh = self.fs.opendir(self.dir(dir).await).unwrap();
        let entries = self.fs.readdir(fh).unwrap();
        self.fs.releasedir(fh);
        entries
            .iter()
            .map(|e| e.name.clone())
            .filter(|n| n != "." && n != "..")
            .collect()
    }
}

/// The next READDIRPLUS page is made ahead, while the kernel takes in the
/// last one; a change made meanwhile is not sent stale.
#[tokio::test]
async fn a_listing_page_made_ahead_is_made_again_after_a_change() {
    let f = fixture(&[
        ("a/b", Value::from("first")),
        ("a/c", Value::from("second")),
    ])
    .await;
    let fh = f.fs.opendir(f.dir("a").await).unwrap();
    let page = f.fs.readdirplus(fh, 0).await.unwrap();
    let names: Vec<_> = page.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, [".", "..", "b", "c"]);
    // As if the kernel's page took `.`, `..` and `b`: `c`'s page is made
    // ahead (on this single-threaded runtime, at the next yield).
    let resume = page[2].next_offset;
    f.fs.entries_sent(fh, &[page[2].attr.ino], PlusFill::Full(3), Some(resume));
    tokio::task::yield_now().await;
    f.write_file("a/c", b"changed meanwhile").await.unwrap();
    let next = f.fs.readdirplus(fh, resume).await.unwrap();
    assert_eq!((next[0].name.as_str(), next[0].attr.size), ("c", 17));
    // Unchanged since it was made ahead: sent as made.
    f.fs.entries_sent(fh, &[], PlusFill::Full(0), Some(resume));
    tokio::task::yield_now().await;
    let again = f.fs.readdirplus(fh, resume).await.unwrap();
    assert_eq!((again[0].name.as_str(), again[0].attr.size), ("c", 17));
    f.fs.releasedir(fh);
}

#[tokio::test]
async fn files_directories_and_control_files() {
    let f = fixture(&[
        ("a/b", Value::from("committed")),
        ("bad//key", Value::from("hidden")),
        ("d", Value::from("shadowed")),
        ("d/e", Value::from("under")),
    ])
    .await;
    // `bad//key` is hidden and implies no directory `bad`.
    assert_eq!(f.names("").await, vec![".s4db", "a", "d"]);
    assert_eq!(f.names("d").await, vec!["e"]);
    // READDIRPLUS: attributes with the names, and inodes bound for them.
    let fh = f.fs.opendir(f.dir("a").await).unwrap();
    let plus = f.fs.readdirplus(fh, 2).await.unwrap();
    assert_eq!(plus.len(), 1);
    assert_eq!((plus[0].name.as_str(), plus[0].attr.size), ("b", 9));
    assert!(plus[0].counted);
    f.fs.entries_sent(fh, &[plus[0].attr.ino], PlusFill::Room, None);
    f.fs.releasedir(fh);
    assert_eq!(f.fs.getattr(plus[0].attr.ino).await.unwrap().size, 9);
    assert_eq!(f.read_file("a/b").await.unwrap(), b"committed");
    f.write_file("a/new", &[0xff, 0]).await.unwrap();
    assert_eq!(
        f.fs.db().get("a/new").await.unwrap(),
        Some(Value::Binary(vec![0xff, 0]))
    );
    let unmapped = f.fs.control_contents(ControlFile::Unmapped);
    assert_eq!(unmapped, b"\"bad//key\"\n\"d\"\n");

    // A directory rename is one batch; hidden keys stay where they are.
    let root = ROOT_INO;
    f.fs.rename(root, &os("d"), root, &os("z"), 0)
        .await
        .unwrap();
    assert_eq!(
        f.fs.db().get("z/e").await.unwrap(),
        Some(Value::from("under"))
    );
    assert_eq!(
        f.fs.db().get("d").await.unwrap(),
        Some(Value::from("shadowed"))
    );
    assert!(f.fs.db().get("d/e").await.unwrap().is_none());
    let err =
        f.fs.rename(root, &os("a"), root, &os("z"), libc::RENAME_NOREPLACE)
            .await;
    assert!(matches!(err, Err(FsError::Exists)));

    // Names that cannot be keys are refused, not rewritten.
    let long = "n".repeat(256);
    assert_eq!(
        f.fs.create(root, &os(&long), 0o644, 0, Caller::ROOT)
            .await
            .unwrap_err()
            .to_errno(),
        libc::ENAMETOOLONG
    );
    assert!(f
        .fs
        .mkdir(CONTROL_DIR_INO, &os("x"), 0o755, Caller::ROOT)
        .is_err());

    // Reading a control file runs nothing; writing runs it.
    f.fs.run_control(ControlFile::Upload).await.unwrap();
    assert!(!f.fs.db().has_unsynced_writes());
    assert!(f.fs.stats_json()["s3_requests"]["put"].as_u64().unwrap() >= 2);
}

#[tokio::test]
async fn emptied_directories_stay_until_rmdir_and_sizes_survive_remount() {
    let f = fixture(&[]).await;
    f.fs.mkdir(ROOT_INO, &os("x"), 0o755, Caller::ROOT).unwrap();
    f.write_file("x/y", b"12345").await.unwrap();
    let x = f.dir("x").await;
    f.fs.unlink(x, &os("y")).unwrap();
    assert_eq!(f.names("").await, vec![".s4db", "x"]);
    assert!(matches!(f.fs.rmdir(ROOT_INO, &os("x")), Ok(())));
    assert_eq!(f.names("").await, vec![".s4db"]);

    // Truncate by path (no open handle) is one put.
    f.write_file("t", b"abcdef").await.unwrap();
    let t = f.fs.lookup(ROOT_INO, &os("t")).await.unwrap().ino;
    assert_eq!(f.fs.setattr(t, SetAttr::size(2)).await.unwrap().size, 2);
    assert_eq!(f.fs.db().get("t").await.unwrap(), Some(Value::from("ab")));
}

#[derive(Debug, Clone)]
enum Op {
    Write(u8, Vec<u8>),
    Append(u8, Vec<u8>),
    Unlink(u8),
    Rename(u8, u8),
    Upload,
}

fn op() -> impl Strategy<Value = Op> {
    let data = proptest::collection::vec(any::<u8>(), 0..40);
    prop_oneof![
        (0u8..6, data.clone()).prop_map(|(k, d)| Op::Write(k, d)),
        (0u8..6, data).prop_map(|(k, d)| Op::Append(k, d)),
        (0u8..6).prop_map(Op::Unlink),
        (0u8..6, 0u8..6).prop_map(|(a, b)| Op::Rename(a, b)),
        Just(Op::Upload),
    ]
}

/// Keys in two directories, so renames cross directories.
fn name(k: u8) -> String {
    format!("{}/f{k}", if k.is_multiple_of(2) { "even" } else { "odd" })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn random_operations_match_a_model(ops in proptest::collection::vec(op(), 1..25)) {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let f = fixture(&[]).await;
            f.fs.mkdir(ROOT_INO, &os("even"), 0o755, Caller::ROOT).unwrap();
            f.fs.mkdir(ROOT_INO, &os("odd"), 0o755, Caller::ROOT).unwrap();
            let mut model: BTreeMap<String, Vec<u8>> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Write(k, d) => {
                        f.write_file(&name(k), &d).await.unwrap();
                        model.insert(name(k), d);
                    }
                    Op::Append(k, d) => {
                        let mut cur = model.get(&name(k)).cloned().unwrap_or_default();
                        cur.extend_from_slice(&d);
                        f.write_file(&name(k), &cur).await.unwrap();
                        model.insert(name(k), cur);
                    }
                    Op::Unlink(k) => {
                        let (dir, file) = name(k).rsplit_once('/').map(|(a, b)| (a.to_string(), b.to_string())).unwrap();
                        let r = f.fs.unlink(f.dir(&dir).await, &os(&file));
                        assert_eq!(r.is_ok(), model.remove(&name(k)).is_some());
                    }
                    Op::Rename(a, b) => {
                        let (da, fa) = name(a).rsplit_once('/').map(|(x, y)| (x.to_string(), y.to_string())).unwrap();
                        let (db, fb) = name(b).rsplit_once('/').map(|(x, y)| (x.to_string(), y.to_string())).unwrap();
                        let r = f.fs.rename(f.dir(&da).await, &os(&fa), f.dir(&db).await, &os(&fb), 0).await;
                        match model.remove(&name(a)) {
                            Some(v) => { r.unwrap(); model.insert(name(b), v); }
                            None => assert!(r.is_err()),
                        }
                    }
                    Op::Upload => f.fs.run_control(ControlFile::Upload).await.unwrap(),
                }
            }
            for (k, v) in &model {
                assert_eq!(&f.read_file(k).await.unwrap(), v, "{k}");
            }
            let keys: Vec<String> = f.fs.db().keys();
            assert_eq!(keys, model.keys().cloned().collect::<Vec<_>>());
        });
    }
}

#[tokio::test]
async fn compaction_keeps_sizes_and_mtimes() {
    let f = fixture(&[]).await;
    f.write_file("k", b"value").await.unwrap();
    let ino = f.fs.lookup(ROOT_INO, &os("k")).await.unwrap().ino;
    let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_000);
    f.fs.setattr(ino, SetAttr::mtime(t)).await.unwrap();
    let before = f.fs.db().location("k");
    f.fs.run_control(ControlFile::Compact).await.unwrap();
    assert_ne!(
        f.fs.db().location("k"),
        before,
        "compaction moved the value"
    );
    let attr = f.fs.getattr(ino).await.unwrap();
    assert_eq!((attr.size, attr.mtime), (5, t));
}

/// A mount that runs for months: 600 uploads cycling through 10 keys, each
/// read back, with compaction rounds between them. What the maps hold after
/// a maintenance pass follows the 10 live keys, not the 600 uploads (the
/// small-value cache used to keep every value written or fetched, and the
/// eviction order a node per value ever taken).
#[tokio::test]
async fn memory_follows_the_live_data_not_the_uploads() {
    const KEYS: usize = 10;
    const UPLOADS: usize = 600;
    let f = fixture(&[]).await;
    // As the mount runs it with automatic uploads: a round publishes what
    // is unsynced (the reads' access times).
    let opts = crate::db::CompactOptions {
        publish_unsynced: true,
        ..Default::default()
    };
    for i in 0..UPLOADS {
        let key = format!("k{}", i % KEYS);
        f.write_file(&key, format!("value {i}").as_bytes())
            .await
            .unwrap();
        f.fs.upload().await.unwrap();
        // Half the values are never read back: they stay cached until
        // overwritten, then nothing will ask for them again.
        if i % 2 == 0 {
            let data = f.read_file(&key).await.unwrap();
            assert_eq!(data, format!("value {i}").as_bytes());
        }
        if i % 20 == 19 {
            f.fs.compact_turn(&opts).await;
        }
    }
    let cached = f.fs.memory_json()["small_values"].as_u64().unwrap() as usize;
    assert!(cached > UPLOADS / 3, "values of overwritten keys: {cached}");
    f.fs.prune_memory();
    let m = f.fs.memory_json();
    let n = |k: &str| m[k].as_u64().unwrap_or_else(|| panic!("{k} in {m}")) as usize;
    assert_eq!(n("index_keys"), KEYS);
    assert!(n("small_values") <= KEYS, "{m}");
    assert!(
        n("small_value_bytes") <= KEYS * (64 + value_cache::ENTRY_OVERHEAD),
        "{m}"
    );
    let files = f.fs.db().stats().data_files;
    assert!(
        files < 2 * KEYS,
        "compaction keeps the data files few: {files}"
    );
    for k in [
        "own_files",
        "local_handles",
        "local_maps",
        "local_used",
        "hinted",
    ] {
        assert!(
            n(k) <= files + 2,
            "{k} follows the data files ({files}): {m}"
        );
    }
    for k in [
        "attr_records",
        "attr_spare_records",
        "served",
        "cached",
        "inodes",
    ] {
        assert!(n(k) <= 2 * KEYS, "{k} follows the keys: {m}");
    }
}
