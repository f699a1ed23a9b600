//! The local working directory: data files this process writes or has
//! downloaded, an exclusive lock, and the list of files written here that are
//! not committed yet (what a restart replays).
//!
//! The pending list (`s4db-pending`) is one file name per line, appended before
//! a new data file is created and rewritten after each commit, so it costs one
//! small write per data file, never per put.
//!
//! Sealed data files (every file but the one this process is appending to)
//! never change: nothing writes, extends or truncates them (recovery and a
//! failed append cut only the growing file's torn tail, and downloads are
//! installed by rename), so they are read through shared read-only mappings:
//! a local get costs no syscall. Removing or replacing a file drops its
//! mapping here; a reader still holding it keeps the old inode alive.

use crate::error::{Error, Result};
use crate::format::data_file_name;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

const LOCK_NAME: &str = "s4db.lock";
const PENDING_NAME: &str = "s4db-pending";

#[derive(Debug)]
pub(crate) struct LocalDir {
    path: PathBuf,
    _lock: File,
    /// Set when we created a temporary directory; removed when dropped.
    _temp: Option<tempfile::TempDir>,
    /// Read handles, opened once per data file (a BTreeMap: few files, and
    /// no hashing on the read path).
    handles: Mutex<BTreeMap<u64, Arc<File>>>,
    /// Mappings of sealed data files, made on their first read.
    maps: Mutex<BTreeMap<u64, Arc<Mapping>>>,
    /// When each data file was last read here (a tick of `clock`), for
    /// evicting the least recently used ones.
    used: Mutex<HashMap<u64, u64>>,
    clock: AtomicU64,
}

/// Creates `path` (and missing parents) owner-only, 0700.
pub fn create_private_dir(path: &Path) -> std::io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
}

/// Why `path` (an existing directory) is not private, if it is not: a
/// warning to show (the data files in it are readable only by their owner,
/// but names and sizes are visible, and others may add files).
pub fn privacy_warning(path: &Path) -> Option<String> {
    let mode = fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then(|| {
        format!(
            "the local directory {} is open to other users (mode {mode:04o}); \
             its data files are owner-only, but `chmod 700 {}` keeps their names and sizes private too",
            path.display(),
            path.display()
        )
    })
}

/// A shared read-only mapping of a whole sealed data file.
#[derive(Debug)]
struct Mapping {
    ptr: *const u8,
    len: usize,
}

// SAFETY: the memory is only ever read, and unmapped once, in `drop`.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps all of `file`; `None` when it is empty (nothing to map).
    fn new(file: &File) -> std::io::Result<Option<Mapping>> {
        let len = file.metadata()?.len();
        let Ok(len) = usize::try_from(len) else {
            return Ok(None);
        };
        if len == 0 {
            return Ok(None);
        }
        // SAFETY: a fresh read-only mapping of a descriptor we own; the kernel
        // picks the address. Sound to read as `&[u8]` because sealed files
        // never change while mapped (see the module doc; the directory's
        // exclusive lock keeps other processes out).
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Some(Mapping {
            ptr: ptr as *const u8,
            len,
        }))
    }

    /// `len` bytes at `offset`, `None` past the end.
    fn get(&self, offset: u64, len: u32) -> Option<&[u8]> {
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(len as usize)?;
        if end > self.len {
            return None;
        }
        // SAFETY: in bounds of a live mapping (see `new`).
        Some(unsafe { std::slice::from_raw_parts(self.ptr.add(start), end - start) })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: exactly the region `new` mapped; no borrow outlives `self`.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

impl LocalDir {
    /// Opens (creating) `path` and takes its exclusive lock.
    /// Created owner-only (0700); an existing directory open to others is
    /// used with a warning. Files made here are 0600; files an older version
    /// left readable by others are made 0600 too.
    pub fn open(path: &Path) -> Result<LocalDir> {
        create_private_dir(path).map_err(|e| Error::io("create local directory", path, e))?;
        if let Some(w) = privacy_warning(path) {
            tracing::info!("{w}");
        }
        let dir = Self::locked(path.to_path_buf(), None)?;
        dir.tighten_modes();
        Ok(dir)
    }

    /// Makes the files directly in the directory owner-only (best effort).
    fn tighten_modes(&self) {
        let Ok(entries) = fs::read_dir(&self.path) else {
            return;
        };
        for e in entries.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_file() && m.permissions().mode() & 0o077 != 0 {
                let mode = m.permissions().mode() & 0o700;
                let _ = fs::set_permissions(e.path(), fs::Permissions::from_mode(mode));
            }
        }
    }

    /// A fresh temporary directory, removed when the database is dropped.
    pub fn temporary() -> Result<LocalDir> {
        let temp = tempfile::Builder::new()
            .prefix("s4db_")
            .tempdir()
            .map_err(|e| Error::io("create temporary directory in", std::env::temp_dir(), e))?;
        Self::locked(temp.path().to_path_buf(), Some(temp))
    }

    fn locked(path: PathBuf, temp: Option<tempfile::TempDir>) -> Result<LocalDir> {
        let lock_path = path.join(LOCK_NAME);
        let mut lock = OpenOptions::new()
            .create(true)
            .mode(0o600)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&lock_path)
            .map_err(|e| Error::io("open lock file", &lock_path, e))?;
        // SAFETY: flock on a descriptor we own; the lock lives as long as `lock`.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let holder = fs::read_to_string(&lock_path)
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .map(|pid| format!(" (pid {pid})"))
                .unwrap_or_default();
            return Err(Error::LocalDirBusy { dir: path, holder });
        }
        lock.set_len(0)
            .and_then(|_| lock.write_all(std::process::id().to_string().as_bytes()))
            .map_err(|e| Error::io("write lock file", &lock_path, e))?;
        Ok(LocalDir {
            path,
            _lock: lock,
            _temp: temp,
            handles: Mutex::new(BTreeMap::new()),
            maps: Mutex::new(BTreeMap::new()),
            used: Mutex::new(HashMap::new()),
            clock: AtomicU64::new(1),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file_path(&self, file_id: u64) -> PathBuf {
        self.path.join(data_file_name(file_id))
    }

    /// Reads exactly `len` bytes at `offset` of a local data file, or `None`
    /// when the file is absent or too short (a stale mirror): the caller then
    /// reads from the object store instead.
    pub fn read_at(&self, file_id: u64, offset: u64, len: u32) -> Result<Option<Vec<u8>>> {
        let Some(file) = self.handle(file_id)? else {
            return Ok(None);
        };
        let mut buf = vec![0u8; len as usize];
        match file.read_exact_at(&mut buf, offset) {
            Ok(()) => Ok(Some(buf)),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
            Err(e) => Err(Error::io("read", self.file_path(file_id), e)),
        }
    }

    /// Runs `f` over `len` bytes at `offset` of a sealed local data file (one
    /// no process appends to any more), read from its mapping; `None` when
    /// the file is absent or too short. Falls back to `pread` when the file
    /// cannot be mapped.
    pub fn with_sealed<R>(
        &self,
        file_id: u64,
        offset: u64,
        len: u32,
        f: impl FnOnce(&[u8]) -> R,
    ) -> Result<Option<R>> {
        let cached = self.maps.lock().unwrap().get(&file_id).cloned();
        if cached.is_some() {
            self.touch(file_id);
        }
        let map = match cached {
            Some(m) => Some(m),
            None => self.map(file_id)?,
        };
        if let Some(bytes) = map.as_deref().and_then(|m| m.get(offset, len)) {
            return Ok(Some(f(bytes)));
        }
        Ok(self.read_at(file_id, offset, len)?.map(|b| f(&b)))
    }

    /// Maps a sealed data file and caches the mapping; `None` when the file
    /// is absent, empty or cannot be mapped.
    fn map(&self, file_id: u64) -> Result<Option<Arc<Mapping>>> {
        let Some(file) = self.handle(file_id)? else {
            return Ok(None);
        };
        match Mapping::new(&file) {
            Ok(Some(m)) => {
                let mut maps = self.maps.lock().unwrap();
                Ok(Some(maps.entry(file_id).or_insert(Arc::new(m)).clone()))
            }
            Ok(None) => Ok(None),
            Err(e) => {
                tracing::debug!(
                    "mmap {}: {e}; reading with pread",
                    self.file_path(file_id).display()
                );
                Ok(None)
            }
        }
    }

    /// Copies `len` bytes at `offset` of a local data file into `sink`, in
    /// chunks, feeding each to `inspect` (a CRC). `false` when the file is
    /// absent or too short.
    pub fn copy_range(
        &self,
        file_id: u64,
        offset: u64,
        len: u64,
        sink: &File,
        mut inspect: impl FnMut(&[u8]),
    ) -> Result<bool> {
        let Some(file) = self.handle(file_id)? else {
            return Ok(false);
        };
        let mut buf = vec![0u8; 256 * 1024];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(buf.len() as u64) as usize;
            match file.read_exact_at(&mut buf[..n], offset + done) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(false),
                Err(e) => return Err(Error::io("read", self.file_path(file_id), e)),
            }
            inspect(&buf[..n]);
            sink.write_all_at(&buf[..n], done)
                .map_err(|e| Error::io("write", "a temporary file", e))?;
            done += n as u64;
        }
        Ok(true)
    }

    /// Records a read of data file `file_id` (for LRU eviction).
    fn touch(&self, file_id: u64) {
        let tick = self.clock.fetch_add(1, Ordering::Relaxed);
        self.used.lock().unwrap().insert(file_id, tick);
    }

    /// The read handle of a local data file (`None` when absent); a read
    /// of an absent file leaves no trace (the maps follow the directory).
    fn handle(&self, file_id: u64) -> Result<Option<Arc<File>>> {
        if let Some(f) = self.handles.lock().unwrap().get(&file_id).cloned() {
            self.touch(file_id);
            return Ok(Some(f));
        }
        let path = self.file_path(file_id);
        match File::open(&path) {
            Ok(f) => {
                let f = Arc::new(f);
                self.handles.lock().unwrap().insert(file_id, f.clone());
                self.touch(file_id);
                Ok(Some(f))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("open", path, e)),
        }
    }

    /// Entries of the handle, mapping and read-time maps (for memory stats).
    pub fn counts(&self) -> (usize, usize, usize) {
        (
            self.handles.lock().unwrap().len(),
            self.maps.lock().unwrap().len(),
            self.used.lock().unwrap().len(),
        )
    }

    /// Forgets a cached handle and mapping after the file was replaced,
    /// removed or cut.
    pub fn forget(&self, file_id: u64) {
        self.handles.lock().unwrap().remove(&file_id);
        self.maps.lock().unwrap().remove(&file_id);
    }

    /// Removes data files until the data files here take at most `cap`
    /// bytes: never one in `keep` (unpublished, being written); first the
    /// ones not in `referenced` (nothing reads them), then the least
    /// recently read (files not read since open count by their mtime, as
    /// older than any read). Returns the files and bytes removed.
    pub fn evict(
        &self,
        cap: u64,
        keep: &HashSet<u64>,
        referenced: &HashSet<u64>,
    ) -> Result<(u64, u64)> {
        let files = self.data_files()?;
        let mut total: u64 = files.iter().map(|(_, s)| s).sum();
        if total <= cap {
            // Forget reads of files that are gone (the map stays as small as the directory).
            let here: HashSet<u64> = files.iter().map(|(id, _)| *id).collect();
            self.used.lock().unwrap().retain(|id, _| here.contains(id));
            return Ok((0, 0));
        }
        let used = self.used.lock().unwrap().clone();
        let mut order: Vec<(bool, u64, std::time::SystemTime, u64, u64)> = files
            .iter()
            .filter(|(id, _)| !keep.contains(id))
            .map(|(id, size)| {
                let mtime = fs::metadata(self.file_path(*id))
                    .and_then(|m| m.modified())
                    .unwrap_or(std::time::UNIX_EPOCH);
                let tick = used.get(id).copied().unwrap_or(0);
                (referenced.contains(id), tick, mtime, *id, *size)
            })
            .collect();
        order.sort_by_key(|a| (a.0, a.1, a.2));
        let (mut n, mut bytes) = (0, 0);
        for (_, _, _, id, size) in order {
            if total <= cap {
                break;
            }
            self.remove(id)?;
            self.used.lock().unwrap().remove(&id);
            total -= size;
            n += 1;
            bytes += size;
        }
        Ok((n, bytes))
    }

    /// The size of a local data file, `None` when absent.
    pub fn size_of(&self, file_id: u64) -> Result<Option<u64>> {
        let path = self.file_path(file_id);
        match fs::metadata(&path) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("stat", path, e)),
        }
    }

    pub fn remove(&self, file_id: u64) -> Result<()> {
        self.forget(file_id);
        self.used.lock().unwrap().remove(&file_id);
        let path = self.file_path(file_id);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("remove", path, e)),
        }
    }

    /// Every data file here, as `(file_id, size)`, in file-name order.
    pub fn data_files(&self) -> Result<Vec<(u64, u64)>> {
        let mut out = Vec::new();
        let entries = fs::read_dir(&self.path).map_err(|e| Error::io("list", &self.path, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("list", &self.path, e))?;
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(crate::format::parse_data_file_name) else {
                continue;
            };
            let len = entry
                .metadata()
                .map_err(|e| Error::io("stat", entry.path(), e))?
                .len();
            out.push((id, len));
        }
        out.sort_by_key(|(id, _)| data_file_name(*id));
        Ok(out)
    }

    /// Creates a new data file (which must not exist) holding `header`.
    pub fn create_data_file(&self, file_id: u64, header: &[u8]) -> Result<File> {
        let path = self.file_path(file_id);
        let mut file = OpenOptions::new()
            .create_new(true)
            .mode(0o600)
            .read(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io("create data file", &path, e))?;
        file.write_all(header)
            .map_err(|e| Error::io("write", &path, e))?;
        Ok(file)
    }

    /// Moves a fully written temporary file into place as data file `file_id`.
    pub fn install(&self, tmp: tempfile::NamedTempFile, file_id: u64) -> Result<()> {
        let path = self.file_path(file_id);
        tmp.persist(&path)
            .map_err(|e| Error::io("install", &path, e.error))?;
        self.forget(file_id);
        Ok(())
    }

    /// Links the finished file at `path` (on this directory's file system)
    /// into place as data file `file_id`; the file keeps its other name.
    pub fn link(&self, path: &Path, file_id: u64) -> Result<()> {
        let target = self.file_path(file_id);
        fs::hard_link(path, &target).map_err(|e| Error::io("link", &target, e))?;
        self.forget(file_id);
        Ok(())
    }

    /// A temporary file in this directory (same file system, so `install` is a rename).
    pub fn temp_file(&self) -> Result<tempfile::NamedTempFile> {
        tempfile::Builder::new()
            .prefix(".download-")
            .tempfile_in(&self.path)
            .map_err(|e| Error::io("create temporary file in", &self.path, e))
    }

    /// Files written here whose entries are not committed yet, oldest first.
    pub fn pending(&self) -> Result<Vec<u64>> {
        let path = self.path.join(PENDING_NAME);
        match fs::read_to_string(&path) {
            Ok(text) => Ok(text
                .lines()
                .filter_map(crate::format::parse_data_file_name)
                .collect()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(Error::io("read", path, e)),
        }
    }

    /// Records a new pending file; called before the file itself is created.
    pub fn add_pending(&self, file_id: u64) -> Result<()> {
        let path = self.path.join(PENDING_NAME);
        let mut f = OpenOptions::new()
            .create(true)
            .mode(0o600)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io("open", &path, e))?;
        writeln!(f, "{}", data_file_name(file_id)).map_err(|e| Error::io("append to", &path, e))
    }

    /// Replaces the pending list atomically.
    pub fn set_pending(&self, files: &[u64]) -> Result<()> {
        let path = self.path.join(PENDING_NAME);
        let mut text = String::new();
        for id in files {
            text.push_str(&data_file_name(*id));
            text.push('\n');
        }
        self.write_atomic(&path, text.as_bytes())
    }

    /// Writes `data` to `path` by temporary file, fsync and rename.
    pub fn write_atomic(&self, path: &Path, data: &[u8]) -> Result<()> {
        let mut tmp = self.temp_file()?;
        tmp.write_all(data)
            .and_then(|_| tmp.as_file().sync_all())
            .map_err(|e| Error::io("write", path, e))?;
        tmp.persist(path)
            .map_err(|e| Error::io("replace", path, e.error))?;
        Ok(())
    }

    /// fsyncs the directory, so created and renamed files survive power loss.
    pub fn sync_dir(&self) -> Result<()> {
        File::open(&self.path)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io("sync", &self.path, e))
    }
}
