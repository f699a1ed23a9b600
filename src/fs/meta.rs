//! What `stat` shows about a value that the index does not hold: its length
//! and the time it was put, per entry location (an entry never changes, so
//! neither does its length).
//!
//! Entries written through this mount are recorded as they are written.
//! Others' entries are resolved once (the entry's first bytes: a `pread` or a
//! small range GET) and remembered in `<local-dir>/s4db-mount.meta`, so a later
//! mount does not ask again. Lengths from hint objects are kept apart, per
//! data file in their packed form (8 bytes a value rather than a hash-map
//! entry of 40), and not written to the file: the next mount GETs them again,
//! one request per data file.

use crate::db::FileHints;
use crate::format::Location;
use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Length and put time of one value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValueMeta {
    pub len: u64,
    pub mtime: SystemTime,
}

/// One record of the meta file: file id, offset, value length, mtime in ns.
const RECORD: usize = 32;
/// Records past twice the live keys tolerated before the file is pruned.
const PRUNE_SLACK: usize = 4096;

#[derive(Debug)]
pub struct MetaCache {
    /// Values written or resolved here (with their put time), as in the file.
    map: Mutex<HashMap<(u64, u64), ValueMeta>>,
    /// Hint objects by data file id; their values' mtime is the upload time.
    hinted: RwLock<HashMap<u64, FileHints>>,
    /// Records learned since the last save, appended to the file in batches.
    log: Mutex<Option<BufWriter<File>>>,
    path: Option<PathBuf>,
}

fn key(loc: Location) -> (u64, u64) {
    (loc.file_id, loc.offset)
}

impl MetaCache {
    /// Loads `path` (if given and present) and appends to it from then on.
    /// When it holds many more records than the `live_keys` the index has
    /// (sizes of values since overwritten), it is pruned to the locations
    /// `live` returns and rewritten; otherwise it is taken as is, so a mount
    /// does not pay for a set of every location.
    pub fn open(
        path: Option<&Path>,
        live_keys: usize,
        live: impl FnOnce() -> HashSet<(u64, u64)>,
    ) -> io::Result<MetaCache> {
        let mut buf = Vec::new();
        if let Some(p) = path {
            match File::open(p) {
                Ok(mut f) => {
                    f.read_to_end(&mut buf)?;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        let records = buf.len() / RECORD;
        let prune = records > 2 * live_keys + PRUNE_SLACK;
        let live = prune.then(live);
        let mut map = HashMap::with_capacity(records.min(live_keys + PRUNE_SLACK));
        for r in buf.chunks_exact(RECORD) {
            let n = |i: usize| u64::from_be_bytes(r[i..i + 8].try_into().unwrap());
            if live.as_ref().is_none_or(|l| l.contains(&(n(0), n(8)))) {
                let mtime = UNIX_EPOCH + Duration::from_nanos(n(24));
                map.insert((n(0), n(8)), ValueMeta { len: n(16), mtime });
            }
        }
        drop(buf);
        let cache = MetaCache {
            map: Mutex::new(map),
            hinted: RwLock::new(HashMap::new()),
            log: Mutex::new(None),
            path: path.map(Path::to_path_buf),
        };
        if prune || records * RECORD != cache.file_len()? {
            cache.rewrite()?;
        } else {
            cache.append()?;
        }
        Ok(cache)
    }

    fn file_len(&self) -> io::Result<usize> {
        match self.path.as_ref().map(std::fs::metadata) {
            Some(Ok(m)) => Ok(m.len() as usize),
            Some(Err(e)) if e.kind() == io::ErrorKind::NotFound => Ok(0),
            Some(Err(e)) => Err(e),
            None => Ok(0),
        }
    }

    /// Appends new records to the file as it is.
    fn append(&self) -> io::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let f = OpenOptions::new().create(true).append(true).open(path)?;
        *self.log.lock().unwrap() = Some(BufWriter::new(f));
        Ok(())
    }

    /// What is known of the value at `loc`: a put time recorded here wins
    /// over a hint object's upload time.
    pub fn get(&self, loc: Location) -> Option<ValueMeta> {
        if let Some(m) = self.map.lock().unwrap().get(&key(loc)) {
            return Some(*m);
        }
        let hinted = self.hinted.read().unwrap();
        let hints = hinted.get(&loc.file_id)?;
        hints.len_at(loc.offset).map(|len| ValueMeta {
            len,
            mtime: hints.published,
        })
    }

    /// Entries held: remembered sizes, data files with hint lengths, and
    /// the values those hints cover.
    pub fn usage(&self) -> (usize, usize, usize) {
        let sizes = self.map.lock().unwrap().len();
        let hinted = self.hinted.read().unwrap();
        (
            sizes,
            hinted.len(),
            hinted.values().map(FileHints::len).sum(),
        )
    }

    /// Takes the hint object of data file `file_id`.
    pub fn add_hints(&self, file_id: u64, hints: FileHints) {
        self.hinted.write().unwrap().insert(file_id, hints);
    }

    pub fn insert(&self, loc: Location, meta: ValueMeta) {
        self.map.lock().unwrap().insert(key(loc), meta);
        let mut log = self.log.lock().unwrap();
        if let Some(w) = log.as_mut() {
            if let Err(e) = w.write_all(&encode(key(loc), meta)) {
                tracing::warn!("cannot record value sizes: {e}; they will be asked again");
                *log = None;
            }
        }
    }

    /// Forgets what is known of entries that are gone: hint lengths of data
    /// files not in `files`, and, once the map holds many more records than
    /// the `live_keys` the index has, every record `live` does not name
    /// (then the file is rewritten too). Keeps memory and the file as large
    /// as the live data, not the history.
    pub fn prune(
        &self,
        files: &HashSet<u64>,
        live_keys: usize,
        live: impl FnOnce() -> HashSet<(u64, u64)>,
    ) -> io::Result<()> {
        self.hinted
            .write()
            .unwrap()
            .retain(|id, _| files.contains(id));
        if self.map.lock().unwrap().len() <= 2 * live_keys + PRUNE_SLACK {
            return Ok(());
        }
        let live = live();
        self.map.lock().unwrap().retain(|k, _| live.contains(k));
        self.save()?;
        self.rewrite()
    }

    /// Makes what was learned durable (called after uploads and at unmount).
    pub fn save(&self) -> io::Result<()> {
        if let Some(w) = self.log.lock().unwrap().as_mut() {
            w.flush()?;
        }
        Ok(())
    }

    /// Writes the live records to a fresh file and appends from there.
    fn rewrite(&self) -> io::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("meta.tmp");
        let mut w = BufWriter::new(File::create(&tmp)?);
        for (k, m) in self.map.lock().unwrap().iter() {
            w.write_all(&encode(*k, *m))?;
        }
        w.flush()?;
        std::fs::rename(&tmp, path)?;
        self.append()
    }
}

fn encode((file, offset): (u64, u64), meta: ValueMeta) -> [u8; RECORD] {
    let mut r = [0u8; RECORD];
    let ns = meta
        .mtime
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    for (i, v) in [file, offset, meta.len, ns].into_iter().enumerate() {
        r[i * 8..i * 8 + 8].copy_from_slice(&v.to_be_bytes());
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembered_across_opens_and_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.meta");
        let loc = |offset| Location {
            file_id: 7,
            offset,
            length: 30,
        };
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let cache = MetaCache::open(Some(&path), 2, HashSet::new).unwrap();
        cache.insert(loc(9), ValueMeta { len: 5, mtime: t });
        cache.insert(loc(40), ValueMeta { len: 6, mtime: t });
        cache.save().unwrap();
        drop(cache);
        // Few records: taken as they are.
        let cache = MetaCache::open(Some(&path), 2, || panic!("no pruning needed")).unwrap();
        assert_eq!(cache.get(loc(40)), Some(ValueMeta { len: 6, mtime: t }));
        for offset in 100..(100 + 2 * PRUNE_SLACK as u64) {
            cache.insert(loc(offset), ValueMeta { len: 1, mtime: t });
        }
        cache.save().unwrap();
        drop(cache);
        // Many dead records: pruned to what is live.
        let cache = MetaCache::open(Some(&path), 1, || [(7, 9)].into()).unwrap();
        assert_eq!(cache.get(loc(9)), Some(ValueMeta { len: 5, mtime: t }));
        assert_eq!(cache.get(loc(40)), None);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), RECORD as u64);
    }
}
