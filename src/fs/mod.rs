//! The filesystem core: keys as files, testable without FUSE.
//!
//! Methods take inode numbers and names and return plain structs or an
//! [`FsError`]; `crate::fuse` only converts and replies. Lookups, `stat` and
//! listings come from the engine's in-memory index (no S3 request). Bytes of
//! an open file collect in a per-inode [`content::Content`] shared by all its
//! handles and become one put when a handle is flushed (close) or fsynced.

pub mod attrs;
pub mod changes;
pub mod content;
pub mod control;
mod dirs;
pub mod error;
mod files;
pub mod inodes;
pub mod invalidate;
pub mod maintain;
pub mod meta;
pub mod names;
mod scan;
mod special;
pub mod stream;
mod sync;
pub mod write_behind;
pub use sync::StatFs;
pub mod value_cache;

pub use crate::db::attrs::FileKind;
use crate::db::attrs::Op;
use crate::db::S4db;
use crate::format::{range_from, Key, Location, Value};
use crate::remote::MeteredStore;
use content::Content;
use control::ControlFile;
pub use dirs::PlusFill;
pub use error::{FsError, FsResult};
use futures::StreamExt;
use inodes::{FastMap, Inodes, NodeKind, CONTROL_DIR_INO, ROOT_INO};
use meta::{MetaCache, ValueMeta};
use names::{
    after_subtree, has_path_under, is_shadowed, join, key_is_path, new_component, CONTROL_DIR,
};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ffi::OsStr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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
    /// Upload at most this long after the oldest unpublished write, however
    /// often writes come; `None`: no bound beyond the debounce.
    pub upload_max_delay: Option<Duration>,
    /// Load other writers' commits this often while nothing is unsynced; `None`: only on request.
    pub refresh_interval: Option<Duration>,
    /// Where large open files spill (the local directory).
    pub spill_dir: PathBuf,
    /// How large cold values are fetched: part size and parallel GETs.
    pub stream: stream::StreamConfig,
    /// Where value sizes learned from the store are remembered.
    pub meta_path: Option<PathBuf>,
}

/// What `stat` shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: FileKind,
    pub size: u64,
    /// The 12 permission bits.
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub nlink: u32,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub ino: u64,
    pub kind: FileKind,
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
    /// How the value at `base` is stored: bytes or text to the Python
    /// package. A clean value put back elsewhere (cached, renamed) keeps it.
    binary: bool,
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
    Dir(dirs::Listing),
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
    open_files: Mutex<FastMap<u64, Arc<OpenFile>>>,
    handles: Mutex<FastMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
    meta: MetaCache,
    resolving: Mutex<HashMap<Location, Arc<tokio::sync::OnceCell<ValueMeta>>>>,
    /// Data files whose hint object was looked for, and whether it exists.
    hinted: Mutex<HashMap<u64, Arc<tokio::sync::OnceCell<bool>>>>,
    /// The READDIRPLUS batch the last listing settled on: a new listing
    /// starts there (a walk's directories are read by the same buffer).
    plus_batch: AtomicUsize,
    /// Changes counted for work prepared ahead (`changes`).
    changes: Arc<changes::Changes>,
    /// Per inode, the entry whose bytes the kernel's page cache holds.
    cached: Mutex<FastMap<u64, Location>>,
    cache_hits: AtomicU64,
    small_values: ValueCache,
    /// Inodes whose name was unlinked or replaced, with the value they had:
    /// handles opened before keep reading that version, not the new one.
    detached: Mutex<FastMap<u64, Location>>,
    last_error: Mutex<String>,
    upload_wanted: tokio::sync::Notify,
    last_write: Mutex<Instant>,
    /// When the oldest write not yet published was made.
    first_unsynced: Mutex<Option<Instant>>,
    /// The kernel's caches (FUSE notify), once the session runs.
    invalidator: Mutex<Option<Arc<dyn invalidate::Invalidate>>>,
    /// Per file inode, what `stat` last showed of it.
    served: Mutex<FastMap<u64, invalidate::Served>>,
    /// Cold reads seen, to tell a scan; offset maps of scanned data files.
    scan: Mutex<scan::ScanState>,
    /// Where background work runs (calls may come from the FUSE thread).
    rt: tokio::runtime::Handle,
    /// The background maintenance's settings and last failure.
    maint: Mutex<maintain::MaintState>,
    /// Buffers for write-behind parts (when the store has multipart uploads).
    part_buffers: Option<Arc<crate::buffer_pool::BufferPool>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// An existing entry's name: a name that is not UTF-8 names no key.
fn existing_name(name: &OsStr) -> FsResult<&str> {
    if name.len() > names::MAX_NAME_BYTES {
        return Err(FsError::NameTooLong(name.len()));
    }
    name.to_str().ok_or(FsError::NotFound)
}

impl S4Fs {
    /// The filesystem over `db`, whose store is `store` (counted for stats).
    /// Call within the tokio runtime that is to run its background work.
    pub fn new(db: S4db, store: Arc<MeteredStore>, cfg: FsConfig) -> FsResult<Arc<S4Fs>> {
        let meta = MetaCache::open(cfg.meta_path.as_deref(), db.len(), || {
            db.read_index(|idx| idx.values().map(|l| (l.file_id, l.offset)).collect())
        })?;
        let db_unsynced = db.has_unsynced_writes();
        content::remove_leftovers(&cfg.spill_dir);
        // As many as can be in flight, each one part.
        let part_buffers = crate::remote::ObjectStore::part_layout(&*store).map(|layout| {
            crate::buffer_pool::BufferPool::new(
                layout.part_size as usize,
                layout.parts_in_flight.max(1),
            )
        });
        let fs = Arc::new(S4Fs {
            db,
            store,
            cfg,
            started: SystemTime::now(),
            inodes: Mutex::new(Inodes::default()),
            open_files: Mutex::new(FastMap::default()),
            handles: Mutex::new(FastMap::default()),
            next_fh: AtomicU64::new(1),
            meta,
            resolving: Mutex::new(HashMap::new()),
            hinted: Mutex::new(HashMap::new()),
            plus_batch: AtomicUsize::new(dirs::FIRST_PLUS_BATCH),
            changes: Arc::default(),
            cached: Mutex::new(FastMap::default()),
            cache_hits: AtomicU64::new(0),
            small_values: ValueCache::default(),
            detached: Mutex::new(FastMap::default()),
            last_error: Mutex::new(String::new()),
            upload_wanted: tokio::sync::Notify::new(),
            last_write: Mutex::new(Instant::now()),
            // Writes replayed from a process that died count from now.
            first_unsynced: Mutex::new(db_unsynced.then(Instant::now)),
            invalidator: Mutex::new(None),
            served: Mutex::new(FastMap::default()),
            scan: Mutex::new(scan::ScanState::default()),
            rt: tokio::runtime::Handle::current(),
            maint: Mutex::new(Default::default()),
            part_buffers,
        });
        if db_unsynced {
            fs.upload_wanted.notify_one();
        }
        Ok(fs)
    }

    pub fn db(&self) -> &S4db {
        &self.db
    }

    /// Where FUSE calls that may change something are counted.
    pub fn changes(&self) -> &Arc<changes::Changes> {
        &self.changes
    }

    // ----- attributes -------------------------------------------------------

    /// `stat` of directory inode `ino` at `path`.
    fn dir_attr(&self, ino: u64, path: &str) -> Attr {
        let a = self.dir_attrs_of(path);
        self.attr_from(ino, &a, 0, self.dir_nlink(path))
    }

    /// `stat` of the control directory.
    fn control_dir_attr(&self) -> Attr {
        let mut a = (*self.dir_attrs_of(CONTROL_DIR)).clone();
        a.mode = 0o755;
        self.attr_from(CONTROL_DIR_INO, &a, 0, 2)
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
        let mut a = self.default_file_attrs(SystemTime::now());
        a.mode = perm;
        self.attr_from(c.ino(), &a, size, 1)
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
                    // One GET of the whole entry, and of its directory's
                    // neighbours (an `ls -l` stats them next); the reads that
                    // follow use the values.
                    let value = match self.fetch_with_neighbours(key, loc).await {
                        Some(v) => v,
                        None => self.db.get_at(key, loc).await?,
                    };
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
                        self.meta.add_hints(file_id, h);
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
        let t0 = Instant::now();
        let files: std::collections::BTreeSet<u64> = self.db.read_index(|idx| {
            idx.values()
                .filter(|l| self.meta.get(**l).is_none())
                .map(|l| l.file_id)
                .collect()
        });
        let count = files.len();
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
        // scripts/bench_scale.sh waits for this line.
        tracing::info!(
            "hints preloaded: {count} data files in {:.3} s",
            t0.elapsed().as_secs_f64()
        );
    }

    async fn attr_of(&self, ino: u64, path: &str, kind: NodeKind) -> FsResult<Attr> {
        if kind == NodeKind::Dir {
            return Ok(self.dir_attr(ino, path));
        }
        let open = lock(&self.open_files).get(&ino).cloned();
        let mut size_now = None;
        let mut loc = None;
        let mut unlinked = false;
        if let Some(open) = open {
            let d = open.data.lock().await;
            unlinked = d.unlinked;
            if let Some(c) = &d.content {
                if d.dirty || d.unlinked {
                    size_now = Some((c.len(), d.mtime));
                }
            }
            loc = d.open_loc.filter(|_| d.content.is_none()).or(d.base);
        }
        // An unlinked file that is still open has no name left.
        unlinked |= lock(&self.detached).contains_key(&ino);
        let loc = match self.location_of(ino, path) {
            Some(l) => l,
            None => loc.ok_or(FsError::NotFound)?,
        };
        let m = self.value_meta(path, loc).await?;
        let record = self.db.attrs_at(path, loc);
        let mut size = m.len;
        let mut a = match &record {
            Some(a) => (**a).clone(),
            None => self.default_file_attrs(m.mtime),
        };
        self.served(ino, Some(loc), record);
        if let Some((len, mtime)) = size_now {
            // Unput bytes of an open file: what a close will put.
            size = len;
            a.mtime = mtime;
            a.ctime = a.ctime.max(mtime);
        }
        let nlink = if unlinked { 0 } else { self.nlink_of(&a) };
        Ok(self.attr_from(ino, &a, size, nlink))
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
        let dir_under = self.db.read_dirs(|dirs| {
            range_from(dirs, prefix)
                .next()
                .is_some_and(|(d, _)| d.starts_with(prefix))
        });
        if dir_under {
            return true;
        }
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
        if dir || self.db.dir_attrs(path).is_some() || self.pending_under(&under) {
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
            return Ok(self.control_dir_attr());
        }
        if parent == CONTROL_DIR_INO {
            let c = ControlFile::from_name(name).ok_or(FsError::NotFound)?;
            return Ok(self.control_attr(c));
        }
        let path = join(&self.dir_path(parent)?, name);
        let kind = self.resolve(&path).ok_or(FsError::NotFound)?;
        let ino = self.bind(&path, kind, true);
        self.attr_of(ino, &path, kind).await
    }

    pub fn forget(&self, ino: u64, n: u64) {
        lock(&self.inodes).forget(ino, n);
        if lock(&self.inodes).get(ino).is_none() {
            lock(&self.cached).remove(&ino);
            lock(&self.detached).remove(&ino);
            lock(&self.served).remove(&ino);
        }
    }

    pub async fn getattr(&self, ino: u64) -> FsResult<Attr> {
        if ino == ROOT_INO {
            return Ok(self.dir_attr(ino, ""));
        }
        if ino == CONTROL_DIR_INO {
            return Ok(self.control_dir_attr());
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

    fn check_writable(&self) -> FsResult<()> {
        if self.cfg.read_only {
            Err(FsError::ReadOnly)
        } else {
            Ok(())
        }
    }

    /// The new path `name` in directory `parent`, refused when it is not a key.
    /// Returns the directory's path and the new path.
    fn new_path(&self, parent: u64, name: &OsStr) -> FsResult<(String, String)> {
        let dir = self.dir_path(parent)?;
        let name = new_component(name)?;
        if dir.is_empty() && name == CONTROL_DIR {
            return Err(FsError::Exists);
        }
        let path = join(&dir, name);
        Ok((dir, path))
    }

    /// The inode of `path`: every name of a hard-linked file shares one.
    fn bind(&self, path: &str, kind: NodeKind, lookup: bool) -> u64 {
        let link = match kind {
            NodeKind::File => self.db.attrs(path).map_or(0, |a| a.link_id),
            NodeKind::Dir => 0,
        };
        lock(&self.inodes).bind_linked(path, kind, link, lookup)
    }

    fn add_handle(&self, h: impl Into<Arc<Handle>>) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.handles).insert(fh, h.into());
        fh
    }

    fn handle(&self, fh: u64) -> FsResult<Arc<Handle>> {
        lock(&self.handles)
            .get(&fh)
            .cloned()
            .ok_or(FsError::BadHandle)
    }

    fn node(&self, ino: u64) -> FsResult<(String, NodeKind)> {
        let inodes = lock(&self.inodes);
        let (p, k) = inodes.get(ino).ok_or(FsError::NotFound)?;
        Ok((p.to_string(), k))
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
