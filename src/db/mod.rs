//! The engine: [`S4db`], a cheap handle over one open database.
//!
//! Writes append to local data files and update the in-memory index under a
//! short mutex; reads look the key up under that mutex, release it, and then
//! do their one `pread` or range GET, so remote reads overlap. Maintenance
//! (upload, download, compact, rebuild, gc) is serialized by an async mutex of
//! its own and never blocks writers across network I/O.

pub mod attr_codec;
mod attr_store;
pub mod attrs;
mod commit;
mod hints;
mod incremental;
mod local_dir;
mod maintenance;
mod own_file;
mod readahead;
mod recovery;
mod retired;
mod state;

use crate::error::{Error, Result};
use crate::format::{
    data_file_name, decode_entry, encode_entry, encode_file_header, range_from, Corruption,
    FormatError, Index, IndexEntries, Key, Location, Value, HEADER_SIZE, INDEX_NAME, MAX_KEY_BYTES,
};
use crate::remote::{ObjectStore, StoreError};
use futures::StreamExt;
use local_dir::LocalDir;
pub use local_dir::{create_private_dir, privacy_warning};
use state::{ActiveFile, OwnFile, State};
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

pub use commit::UploadReport;
pub use hints::FileHints;
pub use incremental::{CompactOptions, MaintenanceStats, RoundReport};
pub use maintenance::{CompactReport, RebuildReport};
pub use own_file::PartsAhead;
pub use retired::RETIRED_NAME;

/// Default soft limit of a data file, as in the Python package.
pub const DEFAULT_MAX_FILE_SIZE: u64 = 64 * 1024 * 1024;

/// Receives progress of long operations (the command line draws a bar).
pub trait Progress: Send + Sync {
    /// A phase starts; `total` is in `unit`s (e.g. "files", "bytes", "keys").
    fn start(&self, what: &str, total: u64, unit: &str);
    fn advance(&self, n: u64);
    fn finish(&self);
}

/// How [`S4db::open`] behaves.
#[derive(Clone)]
pub struct OpenOptions {
    /// Where data files are written and cached. `None`: a temporary directory
    /// made at the first write and removed on drop (unsynced writes then die
    /// with the process). With a directory, unsynced writes survive: the next
    /// open of the same directory replays them.
    pub local_dir: Option<PathBuf>,
    /// Soft limit of a data file: roll when the next entry would pass it.
    pub max_file_size: u64,
    /// Conditional writes (compare-and-swap on the index). Turn off only for
    /// S3-compatible services without If-Match / If-None-Match support.
    pub fenced: bool,
    /// How many times a commit rebases onto a concurrent writer's index.
    pub rebase_attempts: u32,
    /// Concurrent requests in `get_many`, downloads and uploads.
    pub concurrency: usize,
    /// Open even when the index object is corrupt (start empty, keep its ETag),
    /// so `rebuild_index` can replace it.
    pub ignore_corrupt_index: bool,
    pub progress: Option<Arc<dyn Progress>>,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            local_dir: None,
            max_file_size: DEFAULT_MAX_FILE_SIZE,
            fenced: true,
            rebase_attempts: 8,
            concurrency: 16,
            ignore_corrupt_index: false,
            progress: None,
        }
    }
}

impl std::fmt::Debug for OpenOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenOptions")
            .field("local_dir", &self.local_dir)
            .field("max_file_size", &self.max_file_size)
            .field("fenced", &self.fenced)
            .finish_non_exhaustive()
    }
}

/// How [`S4db::scan`] reads values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanMode {
    /// One read per key: local `pread` or S3 range GET.
    PerKey,
    /// First download the referenced data files that are missing locally,
    /// then read everything from disk (one GET per file, not per key).
    Local,
}

/// A point-in-time description of the database, printed by `s4db stats`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Stats {
    pub store: String,
    pub prefix: String,
    pub keys: usize,
    /// Bytes of live entries (compressed, with entry overhead).
    pub live_bytes: u64,
    /// Data files the index references.
    pub data_files: usize,
    pub index_etag: Option<String>,
    pub next_file_num: u32,
    pub writer_id: String,
    pub local_dir: Option<PathBuf>,
    /// Keys written or deleted here and not committed yet.
    pub unsynced_changes: usize,
    /// Data files written here and not uploaded yet.
    pub unpublished_files: usize,
    pub fenced: bool,
    /// Keys whose current value has attributes (the others show defaults).
    pub keys_with_attrs: usize,
    /// Explicit directories (with attributes).
    pub dirs_with_attrs: usize,
    /// Attribute changes made here and not committed yet.
    pub unsynced_attr_changes: usize,
    /// ETag of the attribute object this view came from.
    pub attrs_etag: Option<String>,
}

/// Entry counts of the engine's main in-memory maps ([`S4db::memory_stats`]).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct MemoryStats {
    /// Keys of the visible index.
    pub index_keys: usize,
    /// Data files this instance wrote or adopted and still tracks.
    pub own_files: usize,
    /// Key changes not committed yet (journal and in flight).
    pub journal: usize,
    /// Keys written since the last commit, with where they were before.
    pub journal_base: usize,
    /// Compaction moves not committed yet.
    pub moves: usize,
    /// Selected attribute records (one per key with attributes).
    pub attr_records: usize,
    /// Spare attribute records (other entries of a key, kept until provably stale).
    pub attr_spare_records: usize,
    pub attr_dirs: usize,
    pub attr_links: usize,
    /// Attribute changes not committed yet.
    pub attr_journal: usize,
    /// Open read handles, mappings and read times of local data files.
    pub local_handles: usize,
    pub local_maps: usize,
    pub local_used: usize,
}

/// An open database. Cloning is cheap and shares everything.
#[derive(Clone, Debug)]
pub struct S4db {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    opts: OpenOptions,
    writer_id: u32,
    state: Mutex<State>,
    /// Serializes upload, download, compact, rebuild and gc.
    maintenance: tokio::sync::Mutex<()>,
    /// When `open`'s GET of the index returned (the mount logs its start-up timings).
    index_fetched_at: Instant,
    /// Totals of compaction, gc and eviction.
    counters: incremental::Counters,
}

/// Decodes the entry bytes found at `loc` (CRC first), checking that they are
/// a live value of `key`: an index pointing at the wrong bytes is corruption.
pub(crate) fn decode_live(key: &str, loc: Location, bytes: &[u8]) -> Result<Value> {
    if let Some(value) = crate::format::decode_value_of(key, bytes) {
        return Ok(value);
    }
    let name = data_file_name(loc.file_id);
    let entry = decode_entry(&name, loc.offset, bytes)?;
    match entry.value {
        Some(value) if entry.key == key => Ok(value),
        value => Err(FormatError::new(
            &name,
            loc.offset,
            Corruption::WrongKey {
                expected: key.to_string(),
                found: match value {
                    Some(_) => entry.key,
                    None => format!("a tombstone of {:?}", entry.key),
                },
            },
        )
        .into()),
    }
}

/// Whether `e` is a local write that failed for want of space.
pub(crate) fn is_disk_full(e: &Error) -> bool {
    matches!(e, Error::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC))
}

/// Whether data file `file_id` is sealed: not the file this process appends
/// to, which grows and may be cut back after a failed write, so only sealed
/// files are read through mappings.
fn is_sealed(state: &State, file_id: u64) -> bool {
    state.active.as_ref().is_none_or(|a| a.id != file_id)
}

/// An index object as GET returned it.
struct FetchedIndex {
    /// Its decoding, which may have failed.
    index: Result<Index, FormatError>,
    etag: String,
    /// When the GET's body had arrived (before decoding), for start-up timings.
    at: Instant,
}

/// GETs the index object: `None` when there is none (an empty database).
async fn get_index(store: &dyn ObjectStore, key: &str) -> Result<Option<FetchedIndex>> {
    match store.get(key).await {
        Ok(got) => {
            let at = Instant::now();
            let parsed = IndexEntries::decode(key, &got.data);
            // Free the object's bytes before the map is built: a lower peak.
            drop(got.data);
            Ok(Some(FetchedIndex {
                index: parsed.map(Index::from),
                etag: got.etag,
                at,
            }))
        }
        Err(StoreError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// `some/prefix` and `some/prefix/` are the same database; `` is the bucket root.
pub fn normalize_prefix(prefix: &str) -> String {
    let p = prefix.trim_start_matches('/');
    if p.is_empty() || p.ends_with('/') {
        p.to_string()
    } else {
        format!("{p}/")
    }
}

/// Rejects keys the format cannot hold, before anything is written.
pub fn validate_key(key: &str) -> Result<()> {
    if key.len() > MAX_KEY_BYTES {
        return Err(Error::invalid_key(
            key,
            format!(
                "{} bytes of UTF-8, more than the {MAX_KEY_BYTES} the format allows",
                key.len()
            ),
        ));
    }
    Ok(())
}

impl S4db {
    /// Opens the database under `prefix` in `store`: one GET of the index
    /// (a missing index is an empty database). If `opts.local_dir` exists, it
    /// is locked and its unsynced writes from an earlier process are replayed.
    ///
    /// # Errors
    /// [`Error::Corrupt`] when the index fails its checks (see
    /// `ignore_corrupt_index`), [`Error::Store`] when the store fails,
    /// [`Error::LocalDirBusy`] when another process holds the local directory.
    pub async fn open(
        store: Arc<dyn ObjectStore>,
        prefix: &str,
        opts: OpenOptions,
    ) -> Result<S4db> {
        let prefix = normalize_prefix(prefix);
        let index_key = format!("{prefix}{INDEX_NAME}");
        let fetched = get_index(store.as_ref(), &index_key).await?;
        let index_fetched_at = fetched.as_ref().map_or_else(Instant::now, |f| f.at);
        let (index, etag) = match fetched {
            None => (Index::default(), None),
            Some(FetchedIndex {
                index: Ok(index),
                etag,
                ..
            }) => (index, Some(etag)),
            Some(FetchedIndex {
                index: Err(e),
                etag,
                ..
            }) if opts.ignore_corrupt_index => {
                tracing::warn!("{e}; starting from an empty index to rebuild");
                (Index::default(), Some(etag))
            }
            Some(FetchedIndex { index: Err(e), .. }) => return Err(e.into()),
        };
        let fetched_attrs = attr_store::fetch_attr_object(store.as_ref(), &prefix).await?;
        let writer_id = loop {
            let id: u32 = rand::random();
            if id != 0 {
                break id;
            }
        };
        let db = S4db {
            inner: Arc::new(Inner {
                store,
                prefix,
                writer_id,
                state: Mutex::new(State::new(index, etag)),
                maintenance: tokio::sync::Mutex::new(()),
                opts,
                index_fetched_at,
                counters: Default::default(),
            }),
        };
        let (table, etag, generation) = db.load_attrs(fetched_attrs).await;
        db.state().rebase_attrs(table, etag, generation);
        if let Some(dir) = &db.inner.opts.local_dir {
            if dir.exists() {
                let local = Arc::new(LocalDir::open(dir)?);
                let mut state = db.state();
                state.local = Some(local.clone());
                recovery::replay_pending(&mut state, &local)?;
                recovery::replay_attr_log(&mut state, &local)?;
                state.rewrite_attr_log()?;
            }
        }
        Ok(db)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn object_key(&self, name: &str) -> String {
        format!("{}{name}", self.inner.prefix)
    }

    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.inner.store
    }

    /// When `open`'s GET of the index returned (before it was decoded).
    pub fn index_fetched_at(&self) -> Instant {
        self.inner.index_fetched_at
    }

    /// This instance's writer id (the namespace of the data files it writes).
    pub fn writer_id(&self) -> u32 {
        self.inner.writer_id
    }

    fn local_dir_locked(&self, state: &mut State) -> Result<Arc<LocalDir>> {
        if let Some(l) = &state.local {
            return Ok(l.clone());
        }
        let local = Arc::new(match &self.inner.opts.local_dir {
            Some(dir) => LocalDir::open(dir)?,
            None => LocalDir::temporary()?,
        });
        state.local = Some(local.clone());
        state.rewrite_attr_log()?;
        Ok(local)
    }

    /// The local directory, creating it if this is its first use.
    pub(crate) fn local_dir(&self) -> Result<Arc<LocalDir>> {
        let mut state = self.state();
        self.local_dir_locked(&mut state)
    }

    /// Writes a batch of key/value pairs, appended to the current data file.
    /// Every key is validated before anything is written; the batch costs
    /// O(batch), not O(database). Writes are local until [`S4db::upload`].
    ///
    /// ```no_run
    /// # async fn demo(db: s4db::S4db) -> s4db::Result<()> {
    /// db.put([("greeting", s4db::Value::from("hello")), ("raw", vec![0u8, 255].into())])?;
    /// db.upload().await?;
    /// # Ok(()) }
    /// ```
    pub fn put<K, I>(&self, items: I) -> Result<()>
    where
        K: Into<String>,
        I: IntoIterator<Item = (K, Value)>,
    {
        self.apply(items.into_iter().map(|(k, v)| (k, Some(v))))
            .map(drop)
    }

    /// Deletes keys; absent keys are skipped (no tombstone is written for them).
    /// Returns how many keys existed.
    pub fn delete<K: AsRef<str>>(&self, keys: impl IntoIterator<Item = K>) -> Result<usize> {
        let placed = self.apply(keys.into_iter().map(|k| (k.as_ref().to_string(), None)))?;
        Ok(placed.iter().filter(|p| p.is_some()).count())
    }

    /// Puts (`Some`) and deletes (`None`) in one append under one lock: readers
    /// see all of the batch or none of it, and one upload commits it whole
    /// (a rename is a put of the new key and a delete of the old one).
    /// Deletes of absent keys are skipped. Returns, per item, where its entry
    /// was written (`None` for a skipped delete).
    pub fn apply<K, I>(&self, items: I) -> Result<Vec<Option<Location>>>
    where
        K: Into<String>,
        I: IntoIterator<Item = (K, Option<Value>)>,
    {
        let items: Vec<(String, Option<Value>)> =
            items.into_iter().map(|(k, v)| (k.into(), v)).collect();
        self.apply_with(items, |_, _| {})
    }

    /// [`S4db::apply`], then `after` with the placements while the state is
    /// still locked: attribute changes of the batch land in the same instant.
    pub(crate) fn apply_with(
        &self,
        items: Vec<(String, Option<Value>)>,
        after: impl FnOnce(&mut State, &[Option<Location>]),
    ) -> Result<Vec<Option<Location>>> {
        for (key, value) in &items {
            validate_key(key)?;
            // Stored values are never longer than the raw bytes (FLAG_RAW), so
            // this bounds the entry, whose length the index keeps in a u32.
            let len = value.as_ref().map_or(0, |v| v.len() as u64);
            if len + key.len() as u64 + 13 > u32::MAX as u64 {
                return Err(Error::ValueTooLarge {
                    key: key.chars().take(80).collect(),
                    len,
                });
            }
        }
        if !items.is_empty() && items.iter().all(|(_, v)| v.is_some()) {
            return self.put_batch(items, after);
        }
        // Compress outside the lock: that is where a put spends its CPU.
        let encoded: Vec<Option<Vec<u8>>> = items
            .iter()
            .map(|(key, value)| {
                value.as_ref().map(|v| {
                    let mut e = Vec::new();
                    encode_entry(&mut e, key, Some(v));
                    e
                })
            })
            .collect();
        let mut state = self.state();
        // Entries are laid out in item order (append_locked places them by
        // running offset). Tombstones only for keys that exist when the
        // batch lands (or that an earlier item of the batch puts).
        let mut buf = Vec::with_capacity(encoded.iter().flatten().map(Vec::len).sum());
        let mut exists = std::collections::HashMap::new();
        let mut spans = Vec::with_capacity(items.len());
        let mut slot_of = Vec::with_capacity(items.len());
        for ((key, _), entry) in items.into_iter().zip(encoded) {
            let present = *exists
                .entry(key.clone())
                .or_insert_with(|| state.index.entries.contains_key(key.as_str()));
            let start = buf.len();
            let tombstone = match entry {
                Some(e) => {
                    buf.extend_from_slice(&e);
                    exists.insert(key.clone(), true);
                    false
                }
                None if present => {
                    encode_entry(&mut buf, &key, None);
                    exists.insert(key.clone(), false);
                    true
                }
                None => {
                    slot_of.push(None);
                    continue;
                }
            };
            slot_of.push(Some(spans.len()));
            spans.push((key, start, buf.len() - start, tombstone));
        }
        let placed = match spans.is_empty() {
            true => Vec::new(),
            false => {
                let placed;
                (state, placed) = self.append_making_room(state, &buf, spans)?;
                placed
            }
        };
        let placed: Vec<Option<Location>> =
            slot_of.into_iter().map(|s| s.map(|i| placed[i])).collect();
        after(&mut state, &placed);
        state.flush_attr_log();
        Ok(placed)
    }

    /// [`S4db::apply`] of puts only, the bulk-load case: every item is
    /// placed, so the entries are encoded (and compressed) outside the lock
    /// straight into the buffer that is written, with no per-entry buffer and
    /// no tracking of which keys exist.
    fn put_batch(
        &self,
        items: Vec<(String, Option<Value>)>,
        after: impl FnOnce(&mut State, &[Option<Location>]),
    ) -> Result<Vec<Option<Location>>> {
        let bytes: usize = items
            .iter()
            .map(|(k, v)| k.len() + v.as_ref().map_or(0, Value::len) + 16)
            .sum();
        let mut buf = Vec::with_capacity(bytes);
        let mut spans = Vec::with_capacity(items.len());
        for (key, value) in items {
            let start = buf.len();
            encode_entry(&mut buf, &key, value.as_ref());
            spans.push((key, start, buf.len() - start, false));
        }
        let (mut state, placed) = self.append_making_room(self.state(), &buf, spans)?;
        let placed: Vec<Option<Location>> = placed.into_iter().map(Some).collect();
        after(&mut state, &placed);
        state.flush_attr_log();
        Ok(placed)
    }

    /// Puts a value of `len` bytes read from `src`, streamed into the data
    /// file as one raw entry: memory stays bounded whatever the size (the
    /// filesystem uses this for files too large to hold). `binary` chooses
    /// the value's type, as [`Value::Binary`] vs [`Value::Text`].
    pub fn put_from_reader(
        &self,
        key: &str,
        src: &mut impl std::io::Read,
        len: u64,
        binary: bool,
        attrs: Option<attrs::Attrs>,
    ) -> Result<Location> {
        validate_key(key)?;
        let entry_len = own_file::checked_entry_len(key, len)?;
        let mut state = self.state();
        let local = self.local_dir_locked(&mut state)?;
        let max = self.inner.opts.max_file_size;
        let needs_roll = match &state.active {
            None => true,
            Some(a) => a.len > HEADER_SIZE && a.len + entry_len > max,
        };
        if needs_roll {
            self.roll_locked(&mut state, &local)?;
        }
        let active = state.active.as_mut().expect("rolled above");
        let offset = active.len;
        let mut out = std::io::BufWriter::with_capacity(256 * 1024, &mut active.file);
        let written = crate::format::write_raw_entry(&mut out, key, src, len as u32, binary)
            .and_then(|n| out.flush().map(|_| n));
        drop(out);
        if let Err(e) = written {
            let _ = active.file.set_len(active.len);
            return Err(Error::io("append to", local.file_path(active.id), e));
        }
        active.len += entry_len;
        let loc = Location {
            file_id: active.id,
            offset,
            length: entry_len as u32,
        };
        state.record(key.to_string(), Some(loc));
        if let Some(a) = attrs {
            attrs::set_record(&mut state, key, loc, a);
        }
        state.flush_attr_log();
        Ok(loc)
    }

    /// Appends encoded entries (`spans` index into `buf`) and publishes them
    /// to the in-memory index; when the local disk is full, once more after
    /// [`S4db::make_room`] (the lock is let go meanwhile). Returns the state,
    /// locked again, with the locations.
    fn append_making_room<'a>(
        &'a self,
        mut state: MutexGuard<'a, State>,
        buf: &[u8],
        spans: Vec<(String, usize, usize, bool)>,
    ) -> Result<(MutexGuard<'a, State>, Vec<Location>)> {
        let placed = match self.write_locked(&mut state, buf, &spans) {
            Err(e) if is_disk_full(&e) => {
                drop(state);
                self.make_room(&e);
                state = self.state();
                self.write_locked(&mut state, buf, &spans)?
            }
            r => r?,
        };
        let locations = record_placed(&mut state, placed, spans);
        Ok((state, locations))
    }

    /// Writes the entries of `spans` to the active data file(s), rolling at
    /// the soft size limit; returns (file, offset, span index) per entry. A
    /// failed write is cut off again and nothing is recorded.
    fn write_locked(
        &self,
        state: &mut State,
        buf: &[u8],
        spans: &[(String, usize, usize, bool)],
    ) -> Result<Vec<(u64, u64, usize)>> {
        let local = self.local_dir_locked(state)?;
        let max = self.inner.opts.max_file_size;
        let mut placed = Vec::with_capacity(spans.len());
        let mut i = 0;
        while i < spans.len() {
            let needs_roll = match &state.active {
                None => true,
                Some(a) => a.len > HEADER_SIZE && a.len + spans[i].2 as u64 > max,
            };
            if needs_roll {
                self.roll_locked(state, &local)?;
            }
            let active = state.active.as_mut().expect("rolled above");
            // Take as many entries as fit in this file, then write them at once.
            let first = spans[i].1;
            let mut end = first;
            let mut len = active.len;
            while i < spans.len() {
                let (_, start, n, _) = &spans[i];
                if len > HEADER_SIZE && len + *n as u64 > max {
                    break;
                }
                placed.push((active.id, len, i));
                len += *n as u64;
                end = start + n;
                i += 1;
            }
            if let Err(e) = active.file.write_all(&buf[first..end]) {
                // Cut any partial write so the file stays a clean sequence of entries.
                let _ = active.file.set_len(active.len);
                return Err(Error::io("append to", local.file_path(active.id), e));
            }
            active.len = len;
        }
        Ok(placed)
    }

    /// Starts the next data file of this writer; recorded as pending first.
    fn roll_locked(&self, state: &mut State, local: &LocalDir) -> Result<()> {
        state.seq = state.seq.checked_add(1).ok_or_else(|| {
            Error::Usage("this writer ran out of file sequence numbers; reopen the database".into())
        })?;
        let id = crate::format::file_id(self.inner.writer_id, state.seq);
        local.add_pending(id)?;
        let file = local.create_data_file(id, &encode_file_header(id))?;
        state.active = Some(ActiveFile {
            id,
            file,
            len: HEADER_SIZE,
        });
        state.files.insert(
            id,
            OwnFile {
                published: false,
                unconditional: false,
                compacted: false,
            },
        );
        Ok(())
    }

    /// The value of `key`, or `None` when it does not exist.
    ///
    /// # Errors
    /// [`Error::Corrupt`] when the stored entry fails its CRC or does not hold
    /// this key; [`Error::Store`] when the range GET fails.
    pub async fn get(&self, key: &str) -> Result<Option<Value>> {
        let (loc, local, sealed) = {
            let state = self.state();
            match state.index.entries.get(key) {
                Some(loc) => (*loc, state.local.clone(), is_sealed(&state, loc.file_id)),
                None => return Ok(None),
            }
        };
        match self.read_value(key, loc, local.as_deref(), sealed).await {
            Ok(v) => Ok(Some(v)),
            Err(first) => {
                // Another writer's compaction may have deleted the data file:
                // pick up its index and look again, once.
                if matches!(first, Error::Store(StoreError::NotFound { .. })) {
                    self.refresh().await?;
                }
                // Our own compaction may have moved the key meanwhile, too.
                let again = {
                    let state = self.state();
                    let loc = state.index.entries.get(key).copied();
                    loc.map(|l| (l, is_sealed(&state, l.file_id)))
                };
                match again {
                    Some((l, sealed)) if l != loc => self
                        .read_value(key, l, local.as_deref(), sealed)
                        .await
                        .map(Some),
                    None => Ok(None),
                    Some(_) => Err(first),
                }
            }
        }
    }

    /// The value `key` had at `loc` (an entry never changes, so a reader
    /// that looked the key up earlier still gets that version).
    pub async fn get_at(&self, key: &str, loc: Location) -> Result<Value> {
        let (local, sealed) = {
            let state = self.state();
            (state.local.clone(), is_sealed(&state, loc.file_id))
        };
        self.read_value(key, loc, local.as_deref(), sealed).await
    }

    /// Writes the value of `key` at `loc` into `sink` from its start and
    /// returns its length and whether it is binary. A raw entry in a local
    /// data file is copied in chunks with its CRC checked on the way, so a
    /// large value never sits whole in memory; any other entry is read as by
    /// [`S4db::get_at`].
    pub async fn get_into_file(
        &self,
        key: &str,
        loc: Location,
        sink: &std::fs::File,
    ) -> Result<(u64, bool)> {
        use std::os::unix::fs::FileExt;
        let local = self.state().local.clone();
        let head_len = 9 + key.len() as u32;
        let head = match &local {
            Some(l) if loc.length > head_len + 4 => l.read_at(loc.file_id, loc.offset, head_len)?,
            _ => None,
        };
        if let (Some(local), Some(head)) = (local, head) {
            let raw = head[0] & crate::format::FLAG_RAW != 0
                && head[0] & crate::format::FLAG_TOMBSTONE == 0;
            if raw && &head[9..] == key.as_bytes() {
                let value_len = (loc.length - head_len - 4) as u64;
                let mut crc = crc32fast::Hasher::new();
                crc.update(&head);
                let copied = local.copy_range(
                    loc.file_id,
                    loc.offset + head_len as u64,
                    value_len,
                    sink,
                    |b| crc.update(b),
                )?;
                let stored = local.read_at(loc.file_id, loc.offset + loc.length as u64 - 4, 4)?;
                if copied {
                    if let Some(stored) = stored {
                        let stored = u32::from_be_bytes(stored[..4].try_into().expect("4 bytes"));
                        let computed = crc.finalize();
                        if stored != computed {
                            let name = data_file_name(loc.file_id);
                            return Err(FormatError::new(
                                &name,
                                loc.offset,
                                Corruption::Crc { stored, computed },
                            )
                            .into());
                        }
                        sink.set_len(value_len)
                            .map_err(|e| Error::io("truncate", "a temporary file", e))?;
                        return Ok((value_len, head[0] & crate::format::FLAG_BINARY != 0));
                    }
                }
            }
        }
        let value = self.get_at(key, loc).await?;
        sink.write_all_at(value.as_bytes(), 0)
            .and_then(|_| sink.set_len(value.len() as u64))
            .map_err(|e| Error::io("write", "a temporary file", e))?;
        Ok((value.len() as u64, value.is_binary()))
    }

    /// Picks up what other writers committed: GETs the index and, if it
    /// changed, rebases this instance's uncommitted writes onto it. Returns
    /// whether anything changed.
    pub async fn refresh(&self) -> Result<bool> {
        let (index, etag) = self.fetch_index().await?;
        let mut changed = false;
        {
            let mut state = self.state();
            if state.index_etag != etag {
                if state.index_rewritten {
                    return Err(Error::Conflict(
                        "the index was rebuilt here and someone committed meanwhile; upload the rebuild or run it again".into(),
                    ));
                }
                state.rebase(index, etag);
                changed = true;
            }
        }
        // Then the attributes (another writer may have changed only those).
        let fetched =
            attr_store::fetch_attr_object(self.inner.store.as_ref(), self.prefix()).await?;
        let same = match &fetched {
            attr_store::FetchedAttrs::Absent => self.state().attrs_etag.is_none(),
            attr_store::FetchedAttrs::Corrupt { etag, .. }
            | attr_store::FetchedAttrs::Found { etag, .. } => {
                self.state().attrs_etag.as_deref() == Some(etag.as_str())
            }
        };
        if !same || changed {
            let (table, etag, generation) = self.load_attrs(fetched).await;
            self.state().rebase_attrs(table, etag, generation);
            changed |= !same;
        }
        Ok(changed)
    }

    /// Reads and decodes the entry at `loc`, checking that it holds `key`:
    /// in place from the mapping when the local file is `sealed`.
    async fn read_value(
        &self,
        key: &str,
        loc: Location,
        local: Option<&LocalDir>,
        sealed: bool,
    ) -> Result<Value> {
        let mut local = local;
        if let (Some(dir), true) = (local, sealed) {
            let decoded = dir.with_sealed(loc.file_id, loc.offset, loc.length, |bytes| {
                decode_live(key, loc, bytes)
            })?;
            if let Some(value) = decoded {
                return value;
            }
            local = None; // absent or short here (it read with pread too): the store has it
        }
        let bytes = self.read_entry_bytes(loc, local).await?;
        decode_live(key, loc, &bytes)
    }

    /// The raw entry bytes: a local `pread` when the file is here and long
    /// enough, else one range GET of exactly the entry.
    async fn read_entry_bytes(&self, loc: Location, local: Option<&LocalDir>) -> Result<Vec<u8>> {
        if let Some(local) = local {
            if let Some(bytes) = local.read_at(loc.file_id, loc.offset, loc.length)? {
                return Ok(bytes);
            }
        }
        let key = self.object_key(&data_file_name(loc.file_id));
        let bytes = self
            .inner
            .store
            .get_range(&key, loc.offset, loc.length as u64)
            .await?;
        Ok(bytes.to_vec())
    }

    /// Many keys at once, with up to `concurrency` range GETs in flight.
    /// Returns the values in the order of `keys`.
    pub async fn get_many<K: AsRef<str>>(&self, keys: &[K]) -> Result<Vec<Option<Value>>> {
        // Owned futures: borrowing closures here make the future not `Send`-general.
        let reads: Vec<_> = keys
            .iter()
            .map(|k| {
                let (db, key) = (self.clone(), k.as_ref().to_string());
                async move { db.get(&key).await }
            })
            .collect();
        futures::stream::iter(reads)
            .buffered(self.inner.opts.concurrency.max(1))
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect()
    }

    /// All live keys, sorted.
    pub fn keys(&self) -> Vec<String> {
        self.state()
            .index
            .entries
            .keys()
            .map(Key::to_string)
            .collect()
    }

    /// Live keys starting with `prefix`, sorted (a range scan of the index).
    pub fn keys_with_prefix(&self, prefix: &str) -> Vec<String> {
        range_from(&self.state().index.entries, prefix)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, _)| k.to_string())
            .collect()
    }

    pub fn len(&self) -> usize {
        self.state().index.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.state().index.entries.contains_key(key)
    }

    /// Where the index says `key` is (for tools and tests).
    pub fn location(&self, key: &str) -> Option<Location> {
        self.state().index.entries.get(key).copied()
    }

    /// Runs `f` over the live index (key → location) under the state lock:
    /// range scans for directory listings without copying the keys. Keep `f`
    /// short; writers wait for it.
    pub fn read_index<R>(
        &self,
        f: impl FnOnce(&std::collections::BTreeMap<Key, Location>) -> R,
    ) -> R {
        f(&self.state().index.entries)
    }

    /// The length of the value at `loc` (the entry of `key`), read from the
    /// entry's first bytes: a local `pread`, else one small range GET. Nothing
    /// is decompressed.
    pub async fn value_len(&self, key: &str, loc: Location) -> Result<u64> {
        let head = crate::format::entry_head_len(key.len()).min(loc.length as u64) as u32;
        let part = Location {
            length: head,
            ..loc
        };
        let local = self.state().local.clone();
        let bytes = self.read_entry_bytes(part, local.as_deref()).await?;
        let name = data_file_name(loc.file_id);
        Ok(crate::format::entry_value_len(&name, loc.offset, &bytes)?)
    }

    /// Calls `f` with every live key and value, in key order, over a snapshot
    /// of the index taken at the start.
    pub async fn scan(
        &self,
        mode: ScanMode,
        mut f: impl FnMut(String, Value) -> Result<()>,
    ) -> Result<()> {
        // A file sealed now stays sealed; the active one is read with pread.
        let (snapshot, active): (Vec<(Key, Location)>, Option<u64>) = {
            let state = self.state();
            let snapshot = state
                .index
                .entries
                .iter()
                .map(|(k, l)| (k.clone(), *l))
                .collect();
            (snapshot, state.active.as_ref().map(|a| a.id))
        };
        let local = match mode {
            ScanMode::Local => {
                let files: std::collections::BTreeMap<u64, u64> =
                    snapshot.iter().fold(Default::default(), |mut m, (_, l)| {
                        let end = m.entry(l.file_id).or_insert(0);
                        *end = (*end).max(l.offset + l.length as u64);
                        m
                    });
                self.fetch_files(files).await?;
                Some(self.local_dir()?)
            }
            ScanMode::PerKey => self.state().local.clone(),
        };
        let concurrency = self.inner.opts.concurrency.max(1);
        let mut reads = futures::stream::iter(snapshot.iter().map(|(k, l)| {
            let local = local.clone();
            let sealed = active != Some(l.file_id);
            async move { self.read_value(k, *l, local.as_deref(), sealed).await }
        }))
        .buffered(concurrency);
        let mut keys = snapshot.iter();
        while let Some(value) = reads.next().await {
            let (key, _) = keys.next().expect("one key per read");
            f(key.to_string(), value?)?;
        }
        Ok(())
    }

    /// [`S4db::scan`] collected into a vector, in key order (small databases, tests).
    pub async fn items(&self, mode: ScanMode) -> Result<Vec<(String, Value)>> {
        let mut out = Vec::new();
        self.scan(mode, |k, v| {
            out.push((k, v));
            Ok(())
        })
        .await?;
        Ok(out)
    }

    /// Makes the active data file and the pending list durable (fsync) and
    /// writes a snapshot of the index to `<local_dir>/index.idx`. Only power
    /// loss needs this: a killed process loses nothing that `put` returned.
    pub fn flush(&self) -> Result<()> {
        let state = self.state();
        let Some(local) = state.local.clone() else {
            return Ok(());
        };
        if let Some(active) = &state.active {
            active
                .file
                .sync_all()
                .map_err(|e| Error::io("sync", local.file_path(active.id), e))?;
        }
        if let Some(log) = &state.attr_log {
            log.sync_all()
                .map_err(|e| Error::io("sync", local.path().join(attr_codec::JOURNAL_NAME), e))?;
        }
        let snapshot = state.index.encode();
        drop(state);
        local.write_atomic(&local.path().join(INDEX_NAME), &snapshot)?;
        local.sync_dir()
    }

    /// After a write failed with ENOSPC: says so, and evicts every published
    /// data file from the local directory so a retry may fit. Nothing that
    /// was acknowledged is touched (unpublished files are never evicted; the
    /// failed append was cut back).
    pub(crate) fn make_room(&self, e: &Error) {
        let dir = self.state().local.as_ref().map(|l| l.path().to_path_buf());
        let freed = self.evict_local(0);
        tracing::error!(
            "the local directory {} is full ({e}); evicted published data files to make room ({}); \
             writes fail with ENOSPC until there is space: free some, or give --local-dir a larger file system \
             (nothing written before is lost: unsynced data stays until it is uploaded)",
            dir.as_deref().map_or("-".into(), |d| d.display().to_string()),
            match freed {
                Ok((n, b)) => format!("{n} files, {b} bytes"),
                Err(e) => format!("eviction failed: {e}"),
            }
        );
    }

    /// Throws away the data files this instance wrote and has not uploaded
    /// (writes replayed from an earlier process are kept), so a failed batch
    /// job leaves nothing behind for a later upload to publish. The in-memory
    /// view is reloaded from the store.
    pub async fn discard_own_unsynced(&self) -> Result<()> {
        let _serial = self.inner.maintenance.lock().await;
        let (index, etag) = self.fetch_index().await?;
        let fetched =
            attr_store::fetch_attr_object(self.inner.store.as_ref(), self.prefix()).await?;
        let (table, attrs_etag, generation) = self.load_attrs(fetched).await;
        let mut state = self.state();
        let Some(local) = state.local.clone() else {
            return Ok(());
        };
        let mine: Vec<u64> = state
            .unpublished_files()
            .into_iter()
            .filter(|id| crate::format::split_file_id(*id).0 == self.inner.writer_id)
            .collect();
        state.active = None;
        for id in &mine {
            state.files.remove(id);
            local.remove(*id)?;
        }
        // Start over from the store and replay what earlier processes left.
        state.journal.clear();
        state.journal_base.clear();
        state.moves.clear();
        state.inflight.clear();
        state.attr_journal.clear();
        state.attr_inflight.clear();
        state.index = index;
        state.index_etag = etag;
        state.save_pending_list()?;
        state.rebase_attrs(table, attrs_etag, generation);
        // Replay what earlier processes left; the journal's records of the
        // discarded entries no longer match any key and are skipped.
        state.attr_log = None;
        recovery::replay_pending(&mut state, &local)?;
        recovery::replay_attr_log(&mut state, &local)?;
        state.rewrite_attr_log()
    }

    /// Whether there are writes that are not committed to the store.
    pub fn has_unsynced_writes(&self) -> bool {
        self.state().has_unsynced()
    }

    /// Whether puts or deletes (not only attribute changes) are uncommitted:
    /// a refresh may rebase attribute changes, record by record, at any time.
    pub fn has_unsynced_data(&self) -> bool {
        let state = self.state();
        !state.journal.is_empty()
            || !state.inflight.is_empty()
            || state.index_rewritten
            || state.files.values().any(|f| !f.published)
    }

    pub fn stats(&self) -> Stats {
        let state = self.state();
        let files: std::collections::HashSet<u64> =
            state.index.entries.values().map(|l| l.file_id).collect();
        Stats {
            store: self.inner.store.describe(),
            prefix: self.inner.prefix.clone(),
            keys: state.index.entries.len(),
            live_bytes: state.index.entries.values().map(|l| l.length as u64).sum(),
            data_files: files.len(),
            index_etag: state.index_etag.clone(),
            next_file_num: state.index.next_file_num,
            writer_id: format!("{:08x}", self.inner.writer_id),
            local_dir: state.local.as_ref().map(|l| l.path().to_path_buf()),
            unsynced_changes: state.journal.len() + state.inflight.len(),
            unpublished_files: state.files.values().filter(|f| !f.published).count(),
            fenced: self.inner.opts.fenced,
            keys_with_attrs: state
                .attrs
                .files
                .iter()
                .filter(|(k, r)| {
                    state
                        .index
                        .entries
                        .get(k.as_str())
                        .is_some_and(|l| attrs::same_entry(*l, r.loc))
                })
                .count(),
            dirs_with_attrs: state.attrs.dirs.len(),
            unsynced_attr_changes: state.attr_journal.len() + state.attr_inflight.len(),
            attrs_etag: state.attrs_etag.clone(),
        }
    }

    /// Sizes of the engine's main in-memory maps, for `.s4db/stats` (what a
    /// long-running mount keeps must follow the live data, not the history).
    pub fn memory_stats(&self) -> MemoryStats {
        let state = self.state();
        let (local_handles, local_maps, local_used) =
            state.local.as_ref().map_or((0, 0, 0), |l| l.counts());
        MemoryStats {
            index_keys: state.index.entries.len(),
            own_files: state.files.len(),
            journal: state.journal.len() + state.inflight.len(),
            journal_base: state.journal_base.len(),
            moves: state.moves.len(),
            attr_records: state.attrs.files.len(),
            attr_spare_records: state.attrs.spare.values().map(Vec::len).sum(),
            attr_dirs: state.attrs.dirs.len(),
            attr_links: state.attrs.links.len(),
            attr_journal: state.attr_journal.len() + state.attr_inflight.len(),
            local_handles,
            local_maps,
            local_used,
        }
    }

    fn progress(&self) -> Option<&Arc<dyn Progress>> {
        self.inner.opts.progress.as_ref()
    }
}

/// Moves each placed entry's key into the journal (`placed` follows the
/// spans' order) and returns the locations.
fn record_placed(
    state: &mut State,
    placed: Vec<(u64, u64, usize)>,
    spans: Vec<(String, usize, usize, bool)>,
) -> Vec<Location> {
    let mut locations = Vec::with_capacity(placed.len());
    for ((file_id, offset, i), (key, _, n, tombstone)) in placed.into_iter().zip(spans) {
        debug_assert_eq!(i, locations.len());
        let loc = Location {
            file_id,
            offset,
            length: n as u32,
        };
        state.record(key, (!tombstone).then_some(loc));
        locations.push(loc);
    }
    locations
}
