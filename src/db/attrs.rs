//! File attributes kept by the engine: mode, owner, times, file type,
//! device number, hard-link group and extended attributes, per key and per
//! explicit directory (ARCHITECTURE.md, "Attributes").
//!
//! A key's record is bound to the entry it describes (file id and offset): an
//! entry never changes, so a record can never be paired with another version
//! of the value. When another writer (the Python package) overwrites the key,
//! the index points elsewhere, the record no longer applies and the key shows
//! the mount's defaults. Directories are not keys: their records are keyed by
//! path and make empty directories persist.

use super::state::State;
use super::S4db;
use crate::error::{Error, Result};
use crate::format::{Key, Location, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::SystemTime;

/// Largest extended attribute value (Linux's XATTR_SIZE_MAX).
pub const MAX_XATTR_VALUE: usize = 64 * 1024;
/// Longest extended attribute name, namespace included (XATTR_NAME_MAX).
pub const MAX_XATTR_NAME: usize = 255;
/// Most bytes of names and values one file may carry in extended attributes.
pub const MAX_XATTR_TOTAL: usize = 256 * 1024;

/// What kind of file a key or directory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileKind {
    Regular,
    Dir,
    /// The value is the link target, as text.
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

impl FileKind {
    pub fn code(self) -> u8 {
        match self {
            FileKind::Regular => 1,
            FileKind::Dir => 2,
            FileKind::Symlink => 3,
            FileKind::Fifo => 4,
            FileKind::Socket => 5,
            FileKind::CharDevice => 6,
            FileKind::BlockDevice => 7,
        }
    }

    pub fn from_code(c: u8) -> Option<FileKind> {
        Some(match c {
            1 => FileKind::Regular,
            2 => FileKind::Dir,
            3 => FileKind::Symlink,
            4 => FileKind::Fifo,
            5 => FileKind::Socket,
            6 => FileKind::CharDevice,
            7 => FileKind::BlockDevice,
            _ => return None,
        })
    }

    /// The `S_IFMT` bits of this kind.
    pub fn type_bits(self) -> u32 {
        match self {
            FileKind::Regular => libc::S_IFREG,
            FileKind::Dir => libc::S_IFDIR,
            FileKind::Symlink => libc::S_IFLNK,
            FileKind::Fifo => libc::S_IFIFO,
            FileKind::Socket => libc::S_IFSOCK,
            FileKind::CharDevice => libc::S_IFCHR,
            FileKind::BlockDevice => libc::S_IFBLK,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            FileKind::Regular => "regular file",
            FileKind::Dir => "directory",
            FileKind::Symlink => "symbolic link",
            FileKind::Fifo => "fifo",
            FileKind::Socket => "socket",
            FileKind::CharDevice => "character device",
            FileKind::BlockDevice => "block device",
        }
    }
}

/// The attributes of one file or directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attrs {
    pub kind: FileKind,
    /// The 12 permission bits (setuid, setgid, sticky, rwx × 3).
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    /// Device number of a character or block device.
    pub rdev: u64,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    /// Hard-link group: 0 when the file has one name; otherwise shared by
    /// every key that names the same file.
    pub link_id: u64,
    /// Extended attributes by full name (`user.x`, `trusted.y`, `security.z`).
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Attrs {
    /// Fresh attributes of a new file or directory made now.
    pub fn new(kind: FileKind, mode: u16, uid: u32, gid: u32) -> Attrs {
        let now = SystemTime::now();
        Attrs {
            kind,
            mode: mode & 0o7777,
            uid,
            gid,
            rdev: 0,
            atime: now,
            mtime: now,
            ctime: now,
            link_id: 0,
            xattrs: BTreeMap::new(),
        }
    }

    /// Bytes the extended attributes take (names and values).
    pub fn xattr_bytes(&self) -> usize {
        self.xattrs.iter().map(|(k, v)| k.len() + v.len()).sum()
    }
}

/// A key's attributes and the entry they belong to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttrRecord {
    /// The entry (version of the value) these attributes describe.
    pub loc: Location,
    /// The entry's CRC-32 (its last 4 bytes) when known: it lets the record
    /// follow its entry when another writer copies the entry unchanged to a
    /// new place (the Python package's compaction).
    pub crc: Option<u32>,
    pub attrs: Arc<Attrs>,
}

/// One change of the attribute table, as journaled for an upload.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AttrKey {
    File(String),
    Dir(String),
}

/// A journaled change: the new record or directory attributes, or removal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttrChange {
    File(Option<AttrRecord>),
    Dir(Option<Arc<Attrs>>),
}

/// Every attribute record the engine knows, as readers see it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct AttrTable {
    pub files: HashMap<Key, AttrRecord>,
    /// Explicit directories (made by mkdir, or given attributes) by path.
    pub dirs: BTreeMap<Key, Arc<Attrs>>,
    /// Hard-link groups: link id → the keys whose record carries it.
    pub links: HashMap<u64, BTreeSet<Key>>,
    /// Records of other entries of a key than the one in `files`: the entry
    /// the committed index names while a commit that replaces it is in
    /// flight, or another writer's entry that its commit has not published
    /// yet. Kept (and written to the attribute object) until they are
    /// provably stale.
    pub spare: HashMap<Key, Vec<AttrRecord>>,
}

impl AttrTable {
    /// The record of `key` if it describes the entry at `loc`.
    pub fn file_at(&self, key: &str, loc: Location) -> Option<&Arc<Attrs>> {
        self.record_at(key, loc).map(|r| &r.attrs)
    }

    /// The record of `key` for the entry at `loc`, selected or spare.
    pub fn record_at(&self, key: &str, loc: Location) -> Option<&AttrRecord> {
        match self.files.get(key) {
            Some(r) if same_entry(r.loc, loc) => Some(r),
            _ => self.spare.get(key)?.iter().find(|r| same_entry(r.loc, loc)),
        }
    }

    /// Every record of `key` (selected first, then spare).
    pub fn records_of<'a>(&'a self, key: &str) -> impl Iterator<Item = &'a AttrRecord> + 'a {
        self.files
            .get(key)
            .into_iter()
            .chain(self.spare.get(key).into_iter().flatten())
    }

    /// Builds a table from decoded records (several per key possible): per
    /// key, the record of the entry `current` names is selected, else the
    /// last one; the others are spare.
    pub fn from_records(
        files: Vec<(String, AttrRecord)>,
        dirs: Vec<(String, Arc<Attrs>)>,
        current: impl Fn(&str) -> Option<Location>,
    ) -> AttrTable {
        let mut t = AttrTable::default();
        let mut by_key: HashMap<Key, Vec<AttrRecord>> = HashMap::new();
        for (key, rec) in files {
            by_key.entry(key.as_str().into()).or_default().push(rec);
        }
        for (k, mut recs) in by_key {
            let now = current(&k);
            let pick = recs
                .iter()
                .rposition(|r| now.is_some_and(|l| same_entry(l, r.loc)))
                .unwrap_or(recs.len() - 1);
            let sel = recs.swap_remove(pick);
            recs.retain(|r| !same_entry(r.loc, sel.loc));
            recs.sort_by_key(|r| (r.loc.file_id, r.loc.offset));
            recs.dedup_by(|a, b| same_entry(a.loc, b.loc));
            if !recs.is_empty() {
                t.spare.insert(k.clone(), recs);
            }
            t.files.insert(k, sel);
        }
        t.dirs = dirs.into_iter().map(|(p, a)| (p.into(), a)).collect();
        t.reindex_links();
        t
    }

    /// Selects each key's record again against `current` (after the index
    /// was replaced wholesale, e.g. rebuilt).
    pub fn reselect(&mut self, current: impl Fn(&str) -> Option<Location>) {
        let files = std::mem::take(&mut self.files);
        let spare = std::mem::take(&mut self.spare);
        let records = files
            .into_iter()
            .map(|(k, r)| (k.to_string(), r))
            .chain(
                spare
                    .into_iter()
                    .flat_map(|(k, v)| v.into_iter().map(move |r| (k.to_string(), r))),
            )
            .collect();
        let dirs = std::mem::take(&mut self.dirs);
        *self = AttrTable::from_records(records, Vec::new(), current);
        self.dirs = dirs;
    }

    /// Drops spare records for which `keep` says no.
    pub fn prune_spare(&mut self, mut keep: impl FnMut(&str, &AttrRecord) -> bool) {
        self.spare.retain(|k, v| {
            v.retain(|r| keep(k, r));
            !v.is_empty()
        });
    }

    /// The current value of `k`, as a change (for journaling its undo).
    pub fn get(&self, k: &AttrKey) -> AttrChange {
        match k {
            AttrKey::File(key) => AttrChange::File(self.files.get(key.as_str()).cloned()),
            AttrKey::Dir(path) => AttrChange::Dir(self.dirs.get(path.as_str()).cloned()),
        }
    }

    /// Applies one change.
    pub fn apply(&mut self, k: &AttrKey, change: &AttrChange) {
        match (k, change) {
            (AttrKey::File(key), AttrChange::File(rec)) => self.set_file(key, rec.clone()),
            (AttrKey::Dir(path), AttrChange::Dir(attrs)) => match attrs {
                Some(a) => {
                    self.dirs.insert(path.as_str().into(), a.clone());
                }
                None => {
                    self.dirs.remove(path.as_str());
                }
            },
            _ => debug_assert!(false, "attribute change of the wrong kind for {k:?}"),
        }
    }

    fn set_file(&mut self, key: &str, rec: Option<AttrRecord>) {
        let old = match rec {
            Some(r) => {
                let link = r.attrs.link_id;
                if let Some(spare) = self.spare.get_mut(key) {
                    spare.retain(|s| !same_entry(s.loc, r.loc));
                    if spare.is_empty() {
                        self.spare.remove(key);
                    }
                }
                let old = self.files.insert(key.into(), r);
                if link != 0 {
                    self.links.entry(link).or_default().insert(key.into());
                }
                old
            }
            None => self.files.remove(key),
        };
        if let Some(old) = old {
            let new_link = self.files.get(key).map_or(0, |r| r.attrs.link_id);
            let replaced = self
                .files
                .get(key)
                .is_none_or(|r| !same_entry(r.loc, old.loc));
            let old_link = old.attrs.link_id;
            if old_link != 0 && old_link != new_link {
                if let Some(members) = self.links.get_mut(&old_link) {
                    members.remove(key);
                    if members.is_empty() {
                        self.links.remove(&old_link);
                    }
                }
            }
            // The replaced record may still describe the entry the committed
            // index names (until this change commits): keep it aside.
            if replaced {
                self.spare.entry(key.into()).or_default().push(old);
            }
        }
    }

    /// Rebuilds the link groups from the records (after a bulk load).
    pub fn reindex_links(&mut self) {
        self.links.clear();
        for (k, r) in &self.files {
            if r.attrs.link_id != 0 {
                self.links
                    .entry(r.attrs.link_id)
                    .or_default()
                    .insert(k.clone());
            }
        }
    }
}

/// Whether two locations name the same entry (lengths agree for a valid index).
pub fn same_entry(a: Location, b: Location) -> bool {
    a.file_id == b.file_id && a.offset == b.offset
}

/// One operation of an [`S4db::write`] batch.
#[derive(Debug, Clone)]
pub enum Op {
    /// A new value; `attrs: None` keeps the key's attributes (with the
    /// content times of the write), or leaves it with none.
    Put {
        key: String,
        value: Value,
        attrs: Option<Attrs>,
    },
    /// A tombstone (skipped for an absent key); the key's record goes too.
    Delete { key: String },
    /// New attributes for the key's current value (the value is not rewritten).
    SetAttrs { key: String, attrs: Attrs },
    /// An explicit directory's attributes; `None` removes it (rmdir).
    SetDir { path: String, attrs: Option<Attrs> },
}

/// Binds `attrs` to the entry of `key` at `loc` (state locked).
pub(crate) fn set_record(state: &mut State, key: &str, loc: Location, attrs: Attrs) {
    let rec = AttrRecord {
        loc,
        crc: state.entry_crc(key, loc),
        attrs: Arc::new(attrs),
    };
    state.record_attr(AttrKey::File(key.to_string()), AttrChange::File(Some(rec)));
}

impl S4db {
    /// The attributes of `key`'s current value, if it has any (keys written
    /// by the Python package have none: callers use their defaults).
    pub fn attrs(&self, key: &str) -> Option<Arc<Attrs>> {
        let state = self.state();
        // The table first: most keys have no record (none at all in a
        // database the Python package wrote), and a hash lookup is cheaper
        // than the index's ordered one.
        let mut records = state.attrs.records_of(key).peekable();
        records.peek()?;
        let loc = *state.index.entries.get(key)?;
        records
            .find(|r| same_entry(r.loc, loc))
            .map(|r| r.attrs.clone())
    }

    /// The attributes of the value of `key` at `loc` (an older version that
    /// an open file still reads).
    pub fn attrs_at(&self, key: &str, loc: Location) -> Option<Arc<Attrs>> {
        self.state().attrs.file_at(key, loc).cloned()
    }

    /// The attributes of explicit directory `path`, if it is one.
    pub fn dir_attrs(&self, path: &str) -> Option<Arc<Attrs>> {
        self.state().attrs.dirs.get(path).cloned()
    }

    /// Runs `f` over the explicit directories (path → attributes) under the
    /// state lock. Keep `f` short.
    pub fn read_dirs<R>(&self, f: impl FnOnce(&BTreeMap<Key, Arc<Attrs>>) -> R) -> R {
        f(&self.state().attrs.dirs)
    }

    /// The keys of hard-link group `link_id` whose current value carries it.
    pub fn link_members(&self, link_id: u64) -> Vec<String> {
        let state = self.state();
        let Some(members) = state.attrs.links.get(&link_id) else {
            return Vec::new();
        };
        members
            .iter()
            .filter(|k| {
                state
                    .index
                    .entries
                    .get(k.as_str())
                    .is_some_and(|loc| state.attrs.file_at(k, *loc).is_some())
            })
            .map(Key::to_string)
            .collect()
    }

    /// Applies puts, deletes and attribute changes as one batch: readers see
    /// all of it or none, and one upload commits it whole (a rename moves a
    /// value and its attributes together). Returns, per operation, where its
    /// entry was written (`None` for attribute changes and skipped deletes).
    ///
    /// # Errors
    /// [`Error::InvalidKey`] for a key the format cannot hold;
    /// [`Error::Usage`] when attributes are set on a key that does not exist.
    pub fn write(&self, ops: Vec<Op>) -> Result<Vec<Option<Location>>> {
        let mut items = Vec::new();
        let mut slot = Vec::with_capacity(ops.len());
        let mut after = Vec::new();
        for (i, op) in ops.into_iter().enumerate() {
            match op {
                Op::Put { key, value, attrs } => {
                    slot.push(Some(items.len()));
                    if let Some(a) = attrs {
                        after.push((i, AttrKey::File(key.clone()), Some(a)));
                    }
                    items.push((key, Some(value)));
                }
                Op::Delete { key } => {
                    slot.push(Some(items.len()));
                    items.push((key, None));
                }
                Op::SetAttrs { key, attrs } => {
                    slot.push(None);
                    after.push((i, AttrKey::File(key), Some(attrs)));
                }
                Op::SetDir { path, attrs } => {
                    slot.push(None);
                    after.push((i, AttrKey::Dir(path), attrs));
                }
            }
        }
        for (_, k, _) in &after {
            let (AttrKey::File(key) | AttrKey::Dir(key)) = k;
            super::validate_key(key)?;
        }
        if !after.is_empty() {
            // The local directory holds the journal that keeps these changes
            // across a crash until they are uploaded.
            self.local_dir()?;
        }
        let missing = std::cell::RefCell::new(None);
        let placed = self.apply_with(items, |state, placed| {
            for (i, k, attrs) in after {
                match (k, attrs) {
                    (AttrKey::File(key), Some(a)) => {
                        let loc = match slot[i] {
                            Some(j) => placed[j],
                            None => state.index.entries.get(key.as_str()).copied(),
                        };
                        match loc {
                            Some(loc) => set_record(state, &key, loc, a),
                            None => *missing.borrow_mut() = Some(key),
                        }
                    }
                    (AttrKey::File(_), None) => {}
                    (k @ AttrKey::Dir(_), a) => {
                        state.record_attr(k, AttrChange::Dir(a.map(Arc::new)));
                    }
                }
            }
        })?;
        if let Some(key) = missing.into_inner() {
            return Err(Error::Usage(format!(
                "cannot set attributes of {key:?}: no such key"
            )));
        }
        Ok(slot
            .into_iter()
            .map(|s| s.and_then(|j| placed[j]))
            .collect())
    }
}
