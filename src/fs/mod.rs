//! The filesystem core: keys as files, testable without FUSE.
//!
//! Methods take inode numbers and names and return plain structs or an
//! [`FsError`]; `crate::fuse` only converts and replies. Lookups, `stat` and
//! listings come from the engine's in-memory index (no S3 request). Bytes of
//! an open file collect in a per-inode [`content::Content`] shared by all its
//! handles and become one put when a handle is flushed (close) or fsynced.

pub mod content;
pub mod control;
pub mod error;
pub mod inodes;
pub mod meta;
pub mod names;
pub mod value_cache;

use crate::db::S4db;
use crate::format::{Location, Value};
use crate::remote::MeteredStore;
use content::Content;
use control::ControlFile;
pub use error::{FsError, FsResult};
use futures::StreamExt;
use inodes::{Inodes, NodeKind, CONTROL_DIR_INO, ROOT_INO};
use meta::{MetaCache, ValueMeta};
use names::{
    after_subtree, has_path_under, is_shadowed, join, key_is_path, new_component, CONTROL_DIR,
};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsStr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};
use value_cache::{ValueCache, SMALL_ENTRY};

/// Range GETs in flight when sizes of a listed directory are resolved.
const RESOLVE_CONCURRENCY: usize = 16;
/// How long a failed background upload waits before trying again.
const UPLOAD_RETRY: Duration = Duration::from_secs(5);

/// How the filesystem presents the database.
#[derive(Debug, Clone)]
pub struct FsConfig {
    pub uid: u32,
    pub gid: u32,
    pub file_mode: u16,
    pub dir_mode: u16,
    pub read_only: bool,
    /// Upload this long after the last write; `None`: only on request and at unmount.
    pub upload_delay: Option<Duration>,
    /// Load other writers' commits this often while nothing is unsynced; `None`: only on request.
    pub refresh_interval: Option<Duration>,
    /// Where large open files spill (the local directory).
    pub spill_dir: PathBuf,
    /// Where value sizes learned from the store are remembered.
    pub meta_path: Option<PathBuf>,
}

/// What `stat` shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: NodeKind,
    pub size: u64,
    pub mtime: SystemTime,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub ino: u64,
    pub kind: NodeKind,
    pub name: String,
}

/// A directory entry with its attributes, for READDIRPLUS.
#[derive(Debug, Clone)]
pub struct PlusEntry {
    /// The offset of the entry after this one.
    pub next_offset: u64,
    pub name: String,
    pub attr: Attr,
    /// Whether sending it gives the kernel an inode reference to count.
    pub counted: bool,
}

/// What an open returns: the handle and whether the kernel may keep the
/// pages it cached from an earlier open (the value has not changed).
#[derive(Debug, Clone, Copy)]
pub struct Opened {
    pub fh: u64,
    pub keep_cache: bool,
    /// Contents generated at open (control files): bypass the page cache.
    pub direct_io: bool,
}

/// The state of one file while any handle has it open.
#[derive(Debug)]
struct OpenFile {
    data: tokio::sync::Mutex<FileData>,
    handles: AtomicU64,
}

#[derive(Debug)]
struct FileData {
    /// `None` until the first read or write needs the bytes.
    content: Option<Content>,
    /// The entry the content was loaded from.
    base: Option<Location>,
    /// Where the value was when the file was opened: what a later first
    /// read loads, even if the name was replaced meanwhile.
    open_loc: Option<Location>,
    /// Changed since the last put.
    dirty: bool,
    /// Unlinked or replaced while open: later writes go nowhere.
    unlinked: bool,
    mtime: SystemTime,
}

#[derive(Debug)]
enum Handle {
    File {
        ino: u64,
        open: Arc<OpenFile>,
        append: bool,
        writable: bool,
    },
    Dir {
        /// The directory's path; `None` for `.s4db`.
        path: Option<String>,
        entries: Arc<Vec<DirEntry>>,
    },
    Control {
        file: ControlFile,
        snapshot: Vec<u8>,
    },
}

/// The filesystem over one open database.
#[derive(Debug)]
pub struct S4Fs {
    db: S4db,
    store: Arc<MeteredStore>,
    cfg: FsConfig,
    started: SystemTime,
    inodes: Mutex<Inodes>,
    /// Directories made by mkdir (or emptied by unlink/rename) that no key implies.
    dirs: Mutex<BTreeSet<String>>,
    open_files: Mutex<HashMap<u64, Arc<OpenFile>>>,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
    meta: MetaCache,
    resolving: Mutex<HashMap<Location, Arc<tokio::sync::OnceCell<ValueMeta>>>>,
    /// Data files whose hint object was looked for, and whether it exists.
    hinted: Mutex<HashMap<u64, Arc<tokio::sync::OnceCell<bool>>>>,
    /// Per inode, the entry whose bytes the kernel's page cache holds.
    cached: Mutex<HashMap<u64, Location>>,
    cache_hits: AtomicU64,
    small_values: ValueCache,
    /// Inodes whose name was unlinked or replaced, with the value they had:
    /// handles opened before keep reading that version, not the new one.
    detached: Mutex<HashMap<u64, Location>>,
    last_error: Mutex<String>,
    upload_wanted: tokio::sync::Notify,
    last_write: Mutex<Instant>,
    /// Where background work runs (calls may come from the FUSE thread).
    rt: tokio::runtime::Handle,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// An existing entry's name: a name that is not UTF-8 names no key.
fn existing_name(name: &OsStr) -> FsResult<&str> {
    name.to_str().ok_or(FsError::NotFound)
}

impl S4Fs {
    /// The filesystem over `db`, whose store is `store` (counted for stats).
    /// Call within the tokio runtime that is to run its background work.
    pub fn new(db: S4db, store: Arc<MeteredStore>, cfg: FsConfig) -> FsResult<Arc<S4Fs>> {
        let live: std::collections::HashSet<(u64, u64)> =
            db.read_index(|idx| idx.values().map(|l| (l.file_id, l.offset)).collect());
        let meta = MetaCache::open(cfg.meta_path.as_deref(), |f, o| live.contains(&(f, o)))?;
        Ok(Arc::new(S4Fs {
            db,
            store,
            cfg,
            started: SystemTime::now(),
            inodes: Mutex::new(Inodes::default()),
            dirs: Mutex::new(BTreeSet::new()),
            open_files: Mutex::new(HashMap::new()),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            meta,
            resolving: Mutex::new(HashMap::new()),
            hinted: Mutex::new(HashMap::new()),
            cached: Mutex::new(HashMap::new()),
            cache_hits: AtomicU64::new(0),
            small_values: ValueCache::default(),
            detached: Mutex::new(HashMap::new()),
            last_error: Mutex::new(String::new()),
            upload_wanted: tokio::sync::Notify::new(),
            last_write: Mutex::new(Instant::now()),
            rt: tokio::runtime::Handle::current(),
        }))
    }

    pub fn db(&self) -> &S4db {
        &self.db
    }

    // ----- attributes -------------------------------------------------------

    fn dir_attr(&self, ino: u64) -> Attr {
        Attr {
            ino,
            kind: NodeKind::Dir,
            size: 0,
            mtime: self.started,
            perm: self.cfg.dir_mode,
            uid: self.cfg.uid,
            gid: self.cfg.gid,
        }
    }

    fn file_attr(&self, ino: u64, size: u64, mtime: SystemTime, perm: u16) -> Attr {
        Attr {
            ino,
            kind: NodeKind::File,
            size,
            mtime,
            perm,
            uid: self.cfg.uid,
            gid: self.cfg.gid,
        }
    }

    fn control_attr(&self, c: ControlFile) -> Attr {
        let (size, perm) = if c.is_action() {
            (
                c.help().len() as u64,
                if self.cfg.read_only { 0o444 } else { 0o644 },
            )
        } else {
            (self.control_contents(c).len() as u64, 0o444)
        };
        self.file_attr(c.ino(), size, SystemTime::now(), perm)
    }

    /// Length and put time of the value at `loc`: remembered, or resolved
    /// from the entry's first bytes once (concurrent askers share the request).
    async fn value_meta(&self, key: &str, loc: Location) -> FsResult<ValueMeta> {
        if let Some(m) = self.meta.get(loc) {
            return Ok(m);
        }
        if self.learn_hints(loc.file_id).await {
            if let Some(m) = self.meta.get(loc) {
                return Ok(m);
            }
        }
        let cell = lock(&self.resolving).entry(loc).or_default().clone();
        let m = *cell
            .get_or_try_init(|| async {
                let len = if loc.length <= SMALL_ENTRY {
                    // One GET of the whole entry; the read that follows uses it.
                    let value = self.db.get_at(key, loc).await?;
                    let len = value.len() as u64;
                    self.small_values.insert(loc, value);
                    len
                } else {
                    self.db.value_len(key, loc).await?
                };
                let m = ValueMeta {
                    len,
                    mtime: SystemTime::now(),
                };
                self.meta.insert(loc, m);
                Ok::<_, FsError>(m)
            })
            .await?;
        lock(&self.resolving).remove(&loc);
        Ok(m)
    }

    /// Loads the hint object of data file `file_id` once per mount (one GET
    /// for all its sizes). Returns whether the file has hints.
    async fn learn_hints(&self, file_id: u64) -> bool {
        let cell = lock(&self.hinted).entry(file_id).or_default().clone();
        *cell
            .get_or_init(|| async {
                match self.db.file_hints(file_id).await {
                    Ok(Some(h)) => {
                        for (offset, len) in h.lengths {
                            let loc = Location {
                                file_id,
                                offset,
                                length: 0,
                            };
                            let mtime = h.published;
                            self.meta.learn(loc, ValueMeta { len, mtime });
                        }
                        true
                    }
                    Ok(None) => false,
                    Err(e) => {
                        tracing::debug!("hints of file {file_id:#x}: {e}");
                        false
                    }
                }
            })
            .await
    }

    /// At mount: fetch the hint objects of every data file holding values
    /// whose size is not known here, so a later `ls -l` costs no request.
    pub async fn preload_hints(self: Arc<Self>) {
        let files: std::collections::BTreeSet<u64> = self.db.read_index(|idx| {
            idx.values()
                .filter(|l| self.meta.get(**l).is_none())
                .map(|l| l.file_id)
                .collect()
        });
        futures::stream::iter(files)
            .for_each_concurrent(RESOLVE_CONCURRENCY, |id| {
                let fs = self.clone();
                async move {
                    fs.learn_hints(id).await;
                }
            })
            .await;
        if let Err(e) = self.meta.save() {
            tracing::warn!("cannot save value sizes: {e}");
        }
    }

    async fn attr_of(&self, ino: u64, path: &str, kind: NodeKind) -> FsResult<Attr> {
        if kind == NodeKind::Dir {
            return Ok(self.dir_attr(ino));
        }
        let open = lock(&self.open_files).get(&ino).cloned();
        if let Some(open) = open {
            let d = open.data.lock().await;
            if d.unlinked {
                return Err(FsError::NotFound);
            }
            if let Some(c) = &d.content {
                return Ok(self.file_attr(ino, c.len(), d.mtime, self.cfg.file_mode));
            }
            if let Some(loc) = d.open_loc {
                let m = self.value_meta(path, loc).await?;
                return Ok(self.file_attr(ino, m.len, m.mtime, self.cfg.file_mode));
            }
        }
        let loc = self.location_of(ino, path).ok_or(FsError::NotFound)?;
        let m = self.value_meta(path, loc).await?;
        Ok(self.file_attr(ino, m.len, m.mtime, self.cfg.file_mode))
    }

    // ----- names ------------------------------------------------------------

    /// The path of directory inode `ino` ("" for the root).
    fn dir_path(&self, ino: u64) -> FsResult<String> {
        if ino == ROOT_INO {
            return Ok(String::new());
        }
        if ino == CONTROL_DIR_INO {
            return Err(FsError::NotPermitted(
                "the .s4db directory holds only control files",
            ));
        }
        match lock(&self.inodes).get(ino) {
            Some((p, NodeKind::Dir)) => Ok(p.to_string()),
            Some((_, NodeKind::File)) => Err(FsError::NotDir),
            None => Err(FsError::NotFound),
        }
    }

    /// An open file made here that has no entry yet (created, not closed).
    fn created_open_file(&self, path: &str) -> bool {
        let ino = lock(&self.inodes).ino_of(path);
        ino.is_some_and(|i| lock(&self.open_files).contains_key(&i))
    }

    /// Whether an explicit directory or an open created file lies under `prefix`.
    fn pending_under(&self, prefix: &str) -> bool {
        let dirs = lock(&self.dirs);
        if dirs
            .range(prefix.to_string()..)
            .next()
            .is_some_and(|d| d.starts_with(prefix))
        {
            return true;
        }
        drop(dirs);
        let inodes = lock(&self.inodes);
        lock(&self.open_files)
            .keys()
            .any(|i| inodes.get(*i).is_some_and(|(p, _)| p.starts_with(prefix)))
    }

    /// What `path` is now: a directory (implied by keys, or made by mkdir),
    /// a file (a mappable key, or a created file not closed yet), or nothing.
    fn resolve(&self, path: &str) -> Option<NodeKind> {
        let under = format!("{path}/");
        let (file, dir) = self.db.read_index(|idx| {
            (
                idx.contains_key(path) && key_is_path(path),
                has_path_under(idx, &under),
            )
        });
        if dir || lock(&self.dirs).contains(path) || self.pending_under(&under) {
            Some(NodeKind::Dir)
        } else if file || self.created_open_file(path) {
            Some(NodeKind::File)
        } else {
            None
        }
    }

    pub async fn lookup(&self, parent: u64, name: &OsStr) -> FsResult<Attr> {
        let name = existing_name(name)?;
        if parent == ROOT_INO && name == CONTROL_DIR {
            return Ok(self.dir_attr(CONTROL_DIR_INO));
        }
        if parent == CONTROL_DIR_INO {
            let c = ControlFile::from_name(name).ok_or(FsError::NotFound)?;
            return Ok(self.control_attr(c));
        }
        let path = join(&self.dir_path(parent)?, name);
        let kind = self.resolve(&path).ok_or(FsError::NotFound)?;
        let ino = lock(&self.inodes).bind(&path, kind, true);
        self.attr_of(ino, &path, kind).await
    }

    pub fn forget(&self, ino: u64, n: u64) {
        lock(&self.inodes).forget(ino, n);
        if lock(&self.inodes).get(ino).is_none() {
            lock(&self.cached).remove(&ino);
            lock(&self.detached).remove(&ino);
        }
    }

    pub async fn getattr(&self, ino: u64) -> FsResult<Attr> {
        if ino == ROOT_INO || ino == CONTROL_DIR_INO {
            return Ok(self.dir_attr(ino));
        }
        if let Some(c) = ControlFile::from_ino(ino) {
            return Ok(self.control_attr(c));
        }
        let (path, kind) = {
            let inodes = lock(&self.inodes);
            let (p, k) = inodes.get(ino).ok_or(FsError::NotFound)?;
            (p.to_string(), k)
        };
        self.attr_of(ino, &path, kind).await
    }

    /// Where the value of file inode `ino` (named `path`) is: its own
    /// version if its name was taken away, else what the name holds.
    fn location_of(&self, ino: u64, path: &str) -> Option<Location> {
        let detached = lock(&self.detached).get(&ino).copied();
        detached.or_else(|| self.db.location(path))
    }

    /// The name `path` stops naming its inode (unlink, rename over it).
    fn detach(&self, path: &str) {
        let ino = lock(&self.inodes).ino_of(path);
        if let (Some(ino), Some(loc)) = (ino, self.db.location(path)) {
            lock(&self.detached).insert(ino, loc);
        }
    }

    fn node(&self, ino: u64) -> FsResult<(String, NodeKind)> {
        let inodes = lock(&self.inodes);
        let (p, k) = inodes.get(ino).ok_or(FsError::NotFound)?;
        Ok((p.to_string(), k))
    }

    // ----- directories ------------------------------------------------------

    /// The children of directory `dir`: one range scan of the index that
    /// skips each subdirectory's keys, plus explicit directories and files
    /// being created.
    fn list_children(&self, dir: &str) -> BTreeMap<String, NodeKind> {
        let prefix = if dir.is_empty() {
            String::new()
        } else {
            format!("{dir}/")
        };
        let usable = |c: &str| names::key_is_path(c) && !(dir.is_empty() && c == CONTROL_DIR);
        let mut out = BTreeMap::new();
        self.db.read_index(|idx| {
            let mut start = prefix.clone();
            while let Some((k, _)) = idx.range(start.clone()..).next() {
                let Some(rest) = k.strip_prefix(&prefix) else {
                    break;
                };
                if !key_is_path(k) {
                    // Hidden keys imply no directory (`a//b` shows no `a`).
                    start = format!("{k}\0");
                    continue;
                }
                match rest.split_once('/') {
                    Some((child, _)) => {
                        if usable(child) {
                            out.insert(child.to_string(), NodeKind::Dir);
                        }
                        start = after_subtree(&prefix, child);
                    }
                    None => {
                        if usable(rest) {
                            out.entry(rest.to_string()).or_insert(NodeKind::File);
                        }
                        start = format!("{k}\0");
                    }
                }
            }
        });
        for d in lock(&self.dirs).range(prefix.clone()..) {
            let Some(rest) = d.strip_prefix(&prefix) else {
                break;
            };
            let child = rest.split('/').next().unwrap_or(rest);
            out.insert(child.to_string(), NodeKind::Dir);
        }
        let inodes = lock(&self.inodes);
        for ino in lock(&self.open_files).keys() {
            if let Some((p, _)) = inodes.get(*ino) {
                if let Some(rest) = p.strip_prefix(&prefix) {
                    match rest.split_once('/') {
                        Some((child, _)) => {
                            out.insert(child.to_string(), NodeKind::Dir);
                        }
                        None => {
                            out.entry(rest.to_string()).or_insert(NodeKind::File);
                        }
                    }
                }
            }
        }
        out
    }

    pub fn opendir(self: &Arc<Self>, ino: u64) -> FsResult<u64> {
        let mut entries = vec![
            DirEntry {
                ino,
                kind: NodeKind::Dir,
                name: ".".into(),
            },
            DirEntry {
                ino: ROOT_INO,
                kind: NodeKind::Dir,
                name: "..".into(),
            },
        ];
        let mut path = None;
        if ino == CONTROL_DIR_INO {
            entries.extend(ControlFile::ALL.iter().map(|c| DirEntry {
                ino: c.ino(),
                kind: NodeKind::File,
                name: c.name().into(),
            }));
        } else {
            let dir = self.dir_path(ino)?;
            path = Some(dir.clone());
            if dir.is_empty() {
                entries.push(DirEntry {
                    ino: CONTROL_DIR_INO,
                    kind: NodeKind::Dir,
                    name: CONTROL_DIR.into(),
                });
            }
            let children = self.list_children(&dir);
            let mut unknown = Vec::new();
            {
                let inodes = lock(&self.inodes);
                for (name, kind) in children {
                    let path = join(&dir, &name);
                    entries.push(DirEntry {
                        ino: inodes.listing_ino(&path),
                        kind,
                        name,
                    });
                    if kind == NodeKind::File {
                        unknown.push(path);
                    }
                }
            }
            self.prefetch_sizes(unknown);
        }
        Ok(self.add_handle(Handle::Dir {
            path,
            entries: Arc::new(entries),
        }))
    }

    /// A listing is usually followed by a `stat` of each entry (`ls -l`):
    /// resolve the sizes nobody knows yet now, with requests in parallel.
    fn prefetch_sizes(self: &Arc<Self>, paths: Vec<String>) {
        let wanted: Vec<(String, Location)> = paths
            .into_iter()
            .filter_map(|p| self.db.location(&p).map(|l| (p, l)))
            .filter(|(_, l)| self.meta.get(*l).is_none())
            .collect();
        if wanted.is_empty() {
            return;
        }
        let fs = self.clone();
        self.rt.spawn(async move {
            futures::stream::iter(wanted)
                .for_each_concurrent(RESOLVE_CONCURRENCY, |(p, l)| {
                    let fs = fs.clone();
                    async move {
                        if let Err(e) = fs.value_meta(&p, l).await {
                            tracing::debug!("size of {p:?}: {e}");
                        }
                    }
                })
                .await;
        });
    }

    /// The listing taken at opendir (the adapter pages through it).
    pub fn readdir(&self, fh: u64) -> FsResult<Arc<Vec<DirEntry>>> {
        match &*self.handle(fh)? {
            Handle::Dir { entries, .. } => Ok(entries.clone()),
            _ => Err(FsError::BadHandle),
        }
    }

    /// Up to `max` entries from `offset` with their attributes (READDIRPLUS:
    /// `ls -l` then needs no lookup per file). Entries come bound to inodes
    /// without a kernel reference; the adapter calls [`S4Fs::entries_sent`]
    /// for those that fit in its reply. Entries that vanished are skipped.
    pub async fn readdirplus(&self, fh: u64, offset: u64, max: usize) -> FsResult<Vec<PlusEntry>> {
        let h = self.handle(fh)?;
        let Handle::Dir { path, entries } = &*h else {
            return Err(FsError::BadHandle);
        };
        let mut out = Vec::with_capacity(max);
        for (i, e) in entries.iter().enumerate().skip(offset as usize).take(max) {
            let fixed = |attr| (attr, false);
            let (attr, counted) = if e.name == "." || e.name == ".." || e.ino == CONTROL_DIR_INO {
                fixed(self.dir_attr(e.ino))
            } else if let Some(c) = ControlFile::from_ino(e.ino).filter(|_| path.is_none()) {
                fixed(self.control_attr(c))
            } else {
                let child = join(path.as_deref().unwrap_or_default(), &e.name);
                let ino = lock(&self.inodes).bind(&child, e.kind, false);
                match self.attr_of(ino, &child, e.kind).await {
                    Ok(attr) => (attr, true),
                    Err(_) => continue,
                }
            };
            out.push(PlusEntry {
                next_offset: i as u64 + 1,
                name: e.name.clone(),
                attr,
                counted,
            });
        }
        Ok(out)
    }

    /// The kernel now holds a reference to each of these inodes.
    pub fn entries_sent(&self, inos: &[u64]) {
        let mut inodes = lock(&self.inodes);
        for ino in inos {
            inodes.add_lookup(*ino);
        }
    }

    fn check_writable(&self) -> FsResult<()> {
        if self.cfg.read_only {
            Err(FsError::ReadOnly)
        } else {
            Ok(())
        }
    }

    /// The new path `name` in directory `parent`, refused when it is not a key.
    fn new_path(&self, parent: u64, name: &OsStr) -> FsResult<String> {
        let dir = self.dir_path(parent)?;
        let name = new_component(name)?;
        if dir.is_empty() && name == CONTROL_DIR {
            return Err(FsError::Exists);
        }
        Ok(join(&dir, name))
    }

    pub fn mkdir(&self, parent: u64, name: &OsStr) -> FsResult<Attr> {
        self.check_writable()?;
        let path = self.new_path(parent, name)?;
        if self.resolve(&path).is_some() {
            return Err(FsError::Exists);
        }
        lock(&self.dirs).insert(path.clone());
        let ino = lock(&self.inodes).bind(&path, NodeKind::Dir, true);
        Ok(self.dir_attr(ino))
    }

    /// Nothing shown under `path/`: no mappable key, no explicit directory,
    /// no file being created. Hidden keys under it stay as they are.
    fn dir_is_empty(&self, path: &str) -> bool {
        let under = format!("{path}/");
        !self.db.read_index(|idx| has_path_under(idx, &under)) && !self.pending_under(&under)
    }

    pub fn rmdir(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        self.check_writable()?;
        let path = join(&self.dir_path(parent)?, existing_name(name)?);
        match self.resolve(&path) {
            None => return Err(FsError::NotFound),
            Some(NodeKind::File) => return Err(FsError::NotDir),
            Some(NodeKind::Dir) if !self.dir_is_empty(&path) => return Err(FsError::NotEmpty),
            Some(NodeKind::Dir) => {}
        }
        lock(&self.dirs).remove(&path);
        lock(&self.inodes).unbind(&path);
        self.keep_parent(&path);
        Ok(())
    }

    /// After something left `path`'s directory, keep that directory in view
    /// even if no key implies it any more (`rm -r` removes it next).
    fn keep_parent(&self, path: &str) {
        if let Some((parent, _)) = path.rsplit_once('/') {
            if self.resolve(parent).is_none() {
                lock(&self.dirs).insert(parent.to_string());
            }
        }
    }

    // ----- files ------------------------------------------------------------

    fn add_handle(&self, h: Handle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.handles).insert(fh, Arc::new(h));
        fh
    }

    fn handle(&self, fh: u64) -> FsResult<Arc<Handle>> {
        lock(&self.handles)
            .get(&fh)
            .cloned()
            .ok_or(FsError::BadHandle)
    }

    /// The shared state of `ino`'s open file, made if this is the first handle.
    fn open_file(&self, ino: u64, fresh: impl FnOnce() -> FileData) -> Arc<OpenFile> {
        let mut files = lock(&self.open_files);
        let open = files.entry(ino).or_insert_with(|| {
            Arc::new(OpenFile {
                data: tokio::sync::Mutex::new(fresh()),
                handles: AtomicU64::new(0),
            })
        });
        open.handles.fetch_add(1, Ordering::Relaxed);
        open.clone()
    }

    fn unloaded(&self) -> FileData {
        FileData {
            content: None,
            base: None,
            open_loc: None,
            dirty: false,
            unlinked: false,
            mtime: SystemTime::now(),
        }
    }

    fn created(&self) -> FileData {
        FileData {
            content: Some(Content::empty(&self.cfg.spill_dir)),
            dirty: true,
            ..self.unloaded()
        }
    }

    pub async fn create(&self, parent: u64, name: &OsStr, flags: i32) -> FsResult<(Attr, Opened)> {
        self.check_writable()?;
        let path = self.new_path(parent, name)?;
        match self.resolve(&path) {
            Some(NodeKind::Dir) => return Err(FsError::IsDir),
            Some(NodeKind::File) if flags & libc::O_EXCL != 0 => return Err(FsError::Exists),
            Some(NodeKind::File) => {
                let ino = lock(&self.inodes).bind(&path, NodeKind::File, true);
                let opened = self.open(ino, flags).await?;
                return Ok((self.attr_of(ino, &path, NodeKind::File).await?, opened));
            }
            None => {}
        }
        let ino = lock(&self.inodes).bind(&path, NodeKind::File, true);
        let open = self.open_file(ino, || self.created());
        let fh = self.add_handle(Handle::File {
            ino,
            open,
            append: flags & libc::O_APPEND != 0,
            writable: true,
        });
        let attr = self.file_attr(ino, 0, SystemTime::now(), self.cfg.file_mode);
        Ok((
            attr,
            Opened {
                fh,
                keep_cache: false,
                direct_io: false,
            },
        ))
    }

    pub async fn open(&self, ino: u64, flags: i32) -> FsResult<Opened> {
        let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
        let truncate = flags & libc::O_TRUNC != 0;
        if let Some(c) = ControlFile::from_ino(ino) {
            if writable && !c.is_action() {
                return Err(FsError::NotPermitted("this control file is read-only"));
            }
            let snapshot = if c.is_action() {
                c.help().as_bytes().to_vec()
            } else {
                self.control_contents(c)
            };
            let fh = self.add_handle(Handle::Control { file: c, snapshot });
            return Ok(Opened {
                fh,
                keep_cache: false,
                direct_io: true,
            });
        }
        let (path, kind) = self.node(ino)?;
        if kind == NodeKind::Dir {
            return Err(FsError::IsDir);
        }
        if writable || truncate {
            self.check_writable()?;
        }
        let loc = self.location_of(ino, &path);
        if loc.is_none() && !self.created_open_file(&path) {
            return Err(FsError::NotFound);
        }
        let open = self.open_file(ino, || self.unloaded());
        {
            let mut d = open.data.lock().await;
            // A clean copy of a value that changed since (another writer, a
            // rename onto this name) is dropped and read again.
            if !d.dirty && d.content.is_some() && d.base != loc {
                d.content = None;
            }
            if d.content.is_none() {
                d.open_loc = loc;
            }
            if truncate {
                d.content = Some(Content::empty(&self.cfg.spill_dir));
                d.dirty = true;
                d.mtime = SystemTime::now();
            }
        }
        let keep_cache =
            !writable && !truncate && loc.is_some() && lock(&self.cached).get(&ino) == loc.as_ref();
        let fh = self.add_handle(Handle::File {
            ino,
            open,
            append: flags & libc::O_APPEND != 0,
            writable,
        });
        Ok(Opened {
            fh,
            keep_cache,
            direct_io: false,
        })
    }

    /// Loads the value into `d` if no read or write has needed it yet.
    /// Returns whether it was already there (a cache hit).
    async fn ensure_loaded(&self, ino: u64, path: &str, d: &mut FileData) -> FsResult<bool> {
        if d.content.is_some() {
            return Ok(true);
        }
        let loc = d.open_loc.or_else(|| self.location_of(ino, path));
        let spill = &self.cfg.spill_dir;
        d.content = Some(match loc {
            None => Content::empty(spill),
            Some(loc) => match self.small_values.take(loc) {
                Some(v) => Content::from_bytes(v.into_bytes(), spill)?,
                None if self
                    .meta
                    .get(loc)
                    .is_some_and(|m| m.len > content::SPILL_BYTES) =>
                {
                    // Straight into a temporary file: a large value is not held in memory.
                    let file = Content::spill_file(spill)?;
                    let (len, _) = self.db.get_into_file(path, loc, &file).await?;
                    Content::from_spill_file(file, len, spill)
                }
                None => {
                    let v = match self.db.get_at(path, loc).await {
                        // Another writer's compaction removed that version's
                        // file: read what the name holds now.
                        Err(crate::Error::Store(crate::remote::StoreError::NotFound {
                            ..
                        })) => self.db.get(path).await?.ok_or(FsError::NotFound)?,
                        other => other?,
                    };
                    Content::from_bytes(v.into_bytes(), spill)?
                }
            },
        });
        d.base = loc;
        if let Some(loc) = loc {
            if let Some(m) = self.meta.get(loc) {
                d.mtime = m.mtime;
            }
            lock(&self.cached).insert(ino, loc);
        }
        Ok(false)
    }

    pub async fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        match &*self.handle(fh)? {
            Handle::Control { snapshot, .. } => {
                let start = (offset as usize).min(snapshot.len());
                let end = (start + size as usize).min(snapshot.len());
                Ok(snapshot[start..end].to_vec())
            }
            Handle::Dir { .. } => Err(FsError::IsDir),
            Handle::File { ino, open, .. } => {
                let (path, _) = self.node(*ino)?;
                let mut d = open.data.lock().await;
                if self.ensure_loaded(*ino, &path, &mut d).await? {
                    self.cache_hits.fetch_add(1, Ordering::Relaxed);
                }
                let content = d.content.as_ref().expect("loaded");
                Ok(content.read(offset, size)?)
            }
        }
    }

    /// Writes into the open file (or runs a control operation). Returns the
    /// bytes taken.
    pub async fn write(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        let h = self.handle(fh)?;
        match &*h {
            Handle::Control { file, .. } => {
                self.run_control(*file).await?;
                Ok(data.len() as u32)
            }
            Handle::Dir { .. } => Err(FsError::IsDir),
            Handle::File {
                ino,
                open,
                append,
                writable,
            } => {
                if !*writable {
                    return Err(FsError::BadHandle);
                }
                self.check_writable()?;
                let (path, _) = self.node(*ino)?;
                let mut d = open.data.lock().await;
                self.ensure_loaded(*ino, &path, &mut d).await?;
                let content = d.content.as_mut().expect("loaded");
                let offset = if *append { content.len() } else { offset };
                let end = offset + data.len() as u64;
                check_entry_size(&path, end)?;
                content.write(offset, data)?;
                d.dirty = true;
                d.mtime = SystemTime::now();
                Ok(data.len() as u32)
            }
        }
    }

    /// Puts the open file's bytes if they changed: the one put per close.
    async fn commit_open(&self, ino: u64, open: &OpenFile) -> FsResult<()> {
        let mut d = open.data.lock().await;
        if !d.dirty || d.unlinked {
            return Ok(());
        }
        let (path, _) = self.node(ino)?;
        let content = d.content.as_ref().expect("dirty content is loaded");
        let len = content.len();
        check_entry_size(&path, len)?;
        let loc = if content.is_spilled() {
            // Too large to hold: streamed from the spill file as a raw entry.
            let binary = !content.is_utf8()?;
            self.db
                .put_from_reader(&path, &mut content.reader(), len, binary)?
        } else {
            let value = Value::from_bytes_guess(content.to_vec()?);
            let placed = self.db.apply([(path, Some(value))])?;
            placed[0].expect("a put is always placed")
        };
        self.meta.insert(
            loc,
            ValueMeta {
                len,
                mtime: d.mtime,
            },
        );
        // The kernel's pages hold what was written: they stay valid.
        lock(&self.cached).insert(ino, loc);
        d.base = Some(loc);
        d.dirty = false;
        drop(d);
        self.wrote();
        Ok(())
    }

    pub async fn flush(&self, fh: u64) -> FsResult<()> {
        if let Handle::File { ino, open, .. } = &*self.handle(fh)? {
            self.commit_open(*ino, open).await?;
        }
        Ok(())
    }

    /// A put, then the data file and pending list made durable on disk.
    pub async fn fsync(&self, fh: u64) -> FsResult<()> {
        self.flush(fh).await?;
        self.db.flush()?;
        Ok(())
    }

    pub async fn release(&self, fh: u64) -> FsResult<()> {
        let h = lock(&self.handles).remove(&fh).ok_or(FsError::BadHandle)?;
        if let Handle::File { ino, open, .. } = &*h {
            let result = self.commit_open(*ino, open).await;
            let last = {
                let mut files = lock(&self.open_files);
                let last = open.handles.fetch_sub(1, Ordering::Relaxed) == 1;
                if last {
                    files.remove(ino);
                }
                last
            };
            result?;
            if last {
                self.keep_small_value(open).await;
            }
        }
        Ok(())
    }

    /// The last handle closed: a small clean value stays in the cache, so
    /// the `>>` or `sed -i` that often follows a read needs no GET.
    async fn keep_small_value(&self, open: &OpenFile) {
        let d = open.data.lock().await;
        if let (Some(c), Some(loc), false) = (&d.content, d.base, d.dirty) {
            if !c.is_spilled() && c.len() <= SMALL_ENTRY as u64 {
                if let Ok(bytes) = c.to_vec() {
                    self.small_values.insert(loc, Value::Binary(bytes));
                }
            }
        }
    }

    pub fn releasedir(&self, fh: u64) {
        lock(&self.handles).remove(&fh);
    }

    /// chmod, chown and utimens succeed (so `cp -a` and `rsync -a` run
    /// clean); a new mtime is kept with the value; a size truncates or extends.
    pub async fn setattr(
        &self,
        ino: u64,
        size: Option<u64>,
        mtime: Option<SystemTime>,
    ) -> FsResult<Attr> {
        if ControlFile::from_ino(ino).is_some() || ino == ROOT_INO || ino == CONTROL_DIR_INO {
            return self.getattr(ino).await;
        }
        self.check_writable()?;
        let (path, kind) = self.node(ino)?;
        if kind == NodeKind::Dir {
            if size.is_some() {
                return Err(FsError::IsDir);
            }
            return Ok(self.dir_attr(ino));
        }
        if size.is_some() || mtime.is_some() {
            if self.location_of(ino, &path).is_none() && !self.created_open_file(&path) {
                return Err(FsError::NotFound);
            }
            let open = self.open_file(ino, || self.unloaded());
            let result = self.change_open(ino, &path, &open, size, mtime).await;
            let mut files = lock(&self.open_files);
            if open.handles.fetch_sub(1, Ordering::Relaxed) == 1 {
                files.remove(&ino);
            }
            drop(files);
            result?;
        }
        self.attr_of(ino, &path, kind).await
    }

    async fn change_open(
        &self,
        ino: u64,
        path: &str,
        open: &OpenFile,
        size: Option<u64>,
        mtime: Option<SystemTime>,
    ) -> FsResult<()> {
        let mut d = open.data.lock().await;
        if let Some(size) = size {
            check_entry_size(path, size)?;
            if size == 0 {
                d.content = Some(Content::empty(&self.cfg.spill_dir));
            } else {
                self.ensure_loaded(ino, path, &mut d).await?;
            }
            d.content.as_mut().expect("loaded").truncate(size)?;
            d.dirty = true;
            d.mtime = SystemTime::now();
        }
        if let Some(t) = mtime {
            d.mtime = t;
            if !d.dirty {
                if let Some(loc) = self.db.location(path) {
                    let m = self.value_meta(path, loc).await?;
                    self.meta.insert(loc, ValueMeta { mtime: t, ..m });
                }
            }
        }
        let only_handle = open.handles.load(Ordering::Relaxed) == 1;
        drop(d);
        if only_handle {
            // A truncate(2) by path: no close will follow, so put now.
            self.commit_open(ino, open).await?;
        }
        Ok(())
    }

    pub fn unlink(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        self.check_writable()?;
        let path = join(&self.dir_path(parent)?, existing_name(name)?);
        match self.resolve(&path) {
            None => return Err(FsError::NotFound),
            Some(NodeKind::Dir) => return Err(FsError::IsDir),
            Some(NodeKind::File) => {}
        }
        self.detach(&path);
        if self.db.contains_key(&path) {
            self.db.delete([&path])?;
            self.wrote();
        }
        self.drop_open_file(&path);
        lock(&self.inodes).unbind(&path);
        self.keep_parent(&path);
        Ok(())
    }

    /// The file at `path` is gone (unlinked or replaced): an open copy of it
    /// must not be put back by a later close.
    fn drop_open_file(&self, path: &str) {
        let ino = lock(&self.inodes).ino_of(path);
        let open = ino.and_then(|i| lock(&self.open_files).get(&i).cloned());
        if let Some(open) = open {
            // Uncontended unless a put of it runs right now; then it lands
            // first and the delete after it still wins.
            if let Ok(mut d) = open.data.try_lock() {
                d.unlinked = true;
            }
        }
    }

    /// Puts every open file at or under `path` that has unput bytes.
    async fn commit_open_under(&self, path: &str) -> FsResult<()> {
        let under = format!("{path}/");
        let opens: Vec<(u64, Arc<OpenFile>)> = {
            let inodes = lock(&self.inodes);
            lock(&self.open_files)
                .iter()
                .filter(|(i, _)| {
                    inodes
                        .get(**i)
                        .is_some_and(|(p, _)| p == path || p.starts_with(&under))
                })
                .map(|(i, o)| (*i, o.clone()))
                .collect()
        };
        for (ino, open) in opens {
            self.commit_open(ino, &open).await?;
        }
        Ok(())
    }

    /// rename(2): the new keys and the tombstones of the old ones in one
    /// batch, so readers and the next upload see all of it or none.
    pub async fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        flags: u32,
    ) -> FsResult<()> {
        self.check_writable()?;
        if flags & libc::RENAME_EXCHANGE != 0 {
            return Err(FsError::InvalidArgument("RENAME_EXCHANGE is not supported"));
        }
        let from = join(&self.dir_path(parent)?, existing_name(name)?);
        let to = self.new_path(new_parent, new_name)?;
        let src = self.resolve(&from).ok_or(FsError::NotFound)?;
        if from == to {
            return Ok(());
        }
        let dst = self.resolve(&to);
        if flags & libc::RENAME_NOREPLACE != 0 && dst.is_some() {
            return Err(FsError::Exists);
        }
        if to.starts_with(&format!("{from}/")) {
            return Err(FsError::InvalidArgument(
                "cannot move a directory into itself",
            ));
        }
        match (src, dst) {
            (NodeKind::File, Some(NodeKind::Dir)) => return Err(FsError::IsDir),
            (NodeKind::Dir, Some(NodeKind::File)) => return Err(FsError::NotDir),
            (NodeKind::Dir, Some(NodeKind::Dir)) if !self.dir_is_empty(&to) => {
                return Err(FsError::NotEmpty)
            }
            _ => {}
        }
        self.commit_open_under(&from).await?;
        let moves: Vec<(String, String)> = match src {
            NodeKind::File => vec![(from.clone(), to.clone())],
            NodeKind::Dir => {
                let under = format!("{from}/");
                self.db.read_index(|idx| {
                    idx.range(under.clone()..)
                        .take_while(|(k, _)| k.starts_with(&under))
                        .filter(|(k, _)| key_is_path(k) && !is_shadowed(idx, k))
                        .map(|(k, _)| (k.clone(), format!("{to}{}", &k[from.len()..])))
                        .collect()
                })
            }
        };
        let old: Vec<&str> = moves.iter().map(|(f, _)| f.as_str()).collect();
        let locs: Vec<Option<Location>> = old.iter().map(|k| self.db.location(k)).collect();
        let values = self.db.get_many(&old).await?;
        let mut batch = Vec::with_capacity(moves.len() * 2);
        for ((f, t), v) in moves.iter().zip(values) {
            // A key deleted meanwhile is simply not moved.
            if let Some(v) = v {
                batch.push((t.clone(), Some(v)));
                batch.push((f.clone(), None));
            }
        }
        if dst == Some(NodeKind::File) {
            self.drop_open_file(&to);
            self.detach(&to);
        }
        let placed = self.db.apply(batch)?;
        // Values did not change: their sizes and mtimes move with them.
        for (old_loc, new_loc) in locs.iter().zip(placed.iter().step_by(2)) {
            if let (Some(o), Some(n)) = (old_loc, new_loc) {
                if let Some(m) = self.meta.get(*o) {
                    self.meta.insert(*n, m);
                }
            }
        }
        if src == NodeKind::Dir {
            let mut dirs = lock(&self.dirs);
            let under = format!("{from}/");
            let moved: Vec<String> = dirs
                .iter()
                .filter(|d| **d == from || d.starts_with(&under))
                .cloned()
                .collect();
            for d in moved {
                dirs.remove(&d);
                dirs.insert(format!("{to}{}", &d[from.len()..]));
            }
            if self
                .db
                .read_index(|idx| !has_path_under(idx, &format!("{to}/")))
            {
                dirs.insert(to.clone());
            }
        }
        lock(&self.inodes).rename(&from, &to);
        self.keep_parent(&from);
        self.wrote();
        Ok(())
    }

    // ----- control files and sync -------------------------------------------

    fn control_contents(&self, c: ControlFile) -> Vec<u8> {
        match c {
            ControlFile::Stats => {
                let mut s = serde_json::to_string_pretty(&self.stats_json()).unwrap_or_default();
                s.push('\n');
                s.into_bytes()
            }
            ControlFile::LastError => lock(&self.last_error).clone().into_bytes(),
            ControlFile::Unmapped => {
                let keys = self.db.read_index(names::unmapped_keys);
                let mut out = String::new();
                for k in keys {
                    out.push_str(&serde_json::to_string(&k).unwrap_or_default());
                    out.push('\n');
                }
                out.into_bytes()
            }
            _ => c.help().as_bytes().to_vec(),
        }
    }

    pub fn stats_json(&self) -> serde_json::Value {
        let s = self.db.stats();
        serde_json::json!({
            "store": s.store,
            "prefix": s.prefix,
            "keys": s.keys,
            "files": s.data_files,
            "bytes": s.live_bytes,
            "unsynced_writes": s.unsynced_changes,
            "unpublished_files": s.unpublished_files,
            "open_files": lock(&self.open_files).len(),
            "s3_requests": self.store.counts(),
            "cache_hits": self.cache_hits.load(Ordering::Relaxed),
            "index_etag": s.index_etag,
            "writer_id": s.writer_id,
            "local_dir": s.local_dir,
            "read_only": self.cfg.read_only,
            "upload_delay_seconds": self.cfg.upload_delay.map(|d| d.as_secs_f64()),
            "refresh_interval_seconds": self.cfg.refresh_interval.map(|d| d.as_secs_f64()),
            "last_error": lock(&self.last_error).clone(),
        })
    }

    fn record_error(&self, what: &str, e: &dyn std::fmt::Display) {
        let when = humantime_now();
        let msg = format!("{when} {what}: {e}\n");
        tracing::error!("{}", msg.trim_end());
        *lock(&self.last_error) = msg;
    }

    /// Runs the operation of an action control file and waits for it.
    pub async fn run_control(&self, c: ControlFile) -> FsResult<()> {
        if !c.is_action() {
            return Err(FsError::NotPermitted("this control file is read-only"));
        }
        let mutates = !matches!(c, ControlFile::Refresh | ControlFile::Download);
        if mutates {
            self.check_writable()?;
        }
        let result = self.control_op(c).await;
        if let Err(e) = &result {
            self.record_error(c.name(), e);
        }
        result
    }

    async fn control_op(&self, c: ControlFile) -> FsResult<()> {
        let db = &self.db;
        match c {
            ControlFile::Upload => self.upload().await,
            ControlFile::Download => Ok(db.download(false).await?),
            ControlFile::Compact => {
                self.upload().await?;
                db.compact().await?;
                Ok(())
            }
            ControlFile::RebuildIndex => {
                db.rebuild_index(true).await?;
                self.upload().await
            }
            ControlFile::Gc => {
                db.gc(Duration::from_secs(24 * 3600)).await?;
                Ok(())
            }
            ControlFile::Refresh => {
                if db.has_unsynced_writes() {
                    return Err(crate::Error::Unsynced(
                        "refresh would mix in unpublished writes; write to .s4db/upload first"
                            .into(),
                    )
                    .into());
                }
                db.refresh().await?;
                Ok(())
            }
            ControlFile::Stats | ControlFile::LastError | ControlFile::Unmapped => {
                Err(FsError::NotPermitted("this control file is read-only"))
            }
        }
    }

    async fn upload(&self) -> FsResult<()> {
        if self.db.has_unsynced_writes() {
            self.db.upload().await?;
        }
        self.meta.save()?;
        Ok(())
    }

    /// Something was put or deleted: schedule the debounced upload.
    fn wrote(&self) {
        *lock(&self.last_write) = Instant::now();
        self.upload_wanted.notify_one();
    }

    /// Uploads `upload_delay` after the last write, forever (spawn it once).
    pub async fn run_uploader(self: Arc<Self>) {
        let Some(delay) = self.cfg.upload_delay else {
            return;
        };
        loop {
            self.upload_wanted.notified().await;
            loop {
                let quiet = lock(&self.last_write).elapsed();
                if quiet >= delay {
                    break;
                }
                tokio::time::sleep(delay - quiet).await;
            }
            if let Err(e) = self.upload().await {
                self.record_error("background upload", &e);
                tokio::time::sleep(UPLOAD_RETRY).await;
                self.upload_wanted.notify_one();
            }
        }
    }

    /// Picks up other writers' commits every `refresh_interval`, skipping a
    /// turn while this mount has writes to publish (forever; spawn it once).
    pub async fn run_refresher(self: Arc<Self>) {
        let Some(every) = self.cfg.refresh_interval else {
            return;
        };
        loop {
            tokio::time::sleep(every).await;
            if self.db.has_unsynced_writes() {
                continue;
            }
            match self.db.refresh().await {
                Ok(true) => tracing::info!("picked up another writer's commit"),
                Ok(false) => {}
                Err(e) => self.record_error("background refresh", &e),
            }
        }
    }

    /// At unmount: put what open files still hold, upload, and make the
    /// local directory durable.
    pub async fn shutdown(&self) -> FsResult<()> {
        let opens: Vec<(u64, Arc<OpenFile>)> = lock(&self.open_files)
            .iter()
            .map(|(i, o)| (*i, o.clone()))
            .collect();
        for (ino, open) in opens {
            if let Err(e) = self.commit_open(ino, &open).await {
                self.record_error("saving an open file at unmount", &e);
            }
        }
        let mut result = Ok(());
        if !self.cfg.read_only {
            for attempt in 1..=3 {
                result = self.upload().await;
                match &result {
                    Ok(()) => break,
                    Err(e) => {
                        self.record_error(&format!("upload at unmount (attempt {attempt})"), e)
                    }
                }
            }
        }
        self.db.flush()?;
        self.meta.save()?;
        result
    }
}

/// Refuses a value whose entry would not fit the format's 32-bit length.
fn check_entry_size(key: &str, len: u64) -> FsResult<()> {
    if len + key.len() as u64 + crate::format::ENTRY_OVERHEAD > u32::MAX as u64 {
        return Err(FsError::TooLarge {
            key: key.chars().take(80).collect(),
            len,
        });
    }
    Ok(())
}

/// Seconds since the epoch, for messages (no time-zone database needed).
fn humantime_now() -> String {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("[unix time {secs}]")
}

#[cfg(test)]
mod tests;
