//! The mutable state of an open database, guarded by one mutex that is never
//! held across network I/O.
//!
//! Three layers make up what readers see (`index`):
//! the last committed index, then `inflight` (writes an upload is committing
//! right now), then `journal` (writes since). While an upload is running,
//! `before_upload` remembers the committed-image value of each key the journal
//! overwrote, so the upload can serialize exactly what it published.

use super::attrs::{AttrChange, AttrKey, AttrRecord, AttrTable};
use super::local_dir::LocalDir;
use crate::format::{Index, Key, Location};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::sync::Arc;

/// A logical write: the new location of a key, or `None` for a delete.
pub(crate) type Change = Option<Location>;

/// What we know about a data file this instance wrote or adopted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OwnFile {
    /// Uploaded (its bytes are in the store under its name).
    pub published: bool,
    /// Upload without a precondition: a recovered file that a dead process
    /// may already have uploaded in part.
    pub unconditional: bool,
    /// Written by compaction: copies of entries that are committed already.
    /// Never in the pending list (a restart must not replay old values over
    /// newer commits); a crash leaves it an orphan for gc.
    pub compacted: bool,
}

#[derive(Debug)]
pub(crate) struct ActiveFile {
    pub id: u64,
    pub file: File,
    pub len: u64,
}

#[derive(Debug)]
pub(crate) struct State {
    /// What readers see: committed + inflight + journal.
    pub index: Index,
    /// ETag of the index object the committed layer came from.
    pub index_etag: Option<String>,
    pub journal: HashMap<String, Change>,
    pub inflight: HashMap<String, Change>,
    /// During an upload: the committed-image value of keys the journal changed.
    pub before_upload: Option<HashMap<String, Change>>,
    /// The whole index was rebuilt and must be committed as is (no rebase).
    pub index_rewritten: bool,
    pub local: Option<Arc<LocalDir>>,
    /// Last sequence number this writer allocated.
    pub seq: u32,
    pub active: Option<ActiveFile>,
    pub files: BTreeMap<u64, OwnFile>,
    /// Attribute records as readers see them: committed + inflight + journal,
    /// layered like the index.
    pub attrs: AttrTable,
    /// ETag of the attribute object the committed layer came from.
    pub attrs_etag: Option<String>,
    pub attr_journal: HashMap<AttrKey, AttrChange>,
    pub attr_inflight: HashMap<AttrKey, AttrChange>,
    /// During an upload: the committed-image value of attribute records the
    /// journal changed.
    pub attr_before_upload: Option<HashMap<AttrKey, AttrChange>>,
    /// Generation of the attribute object the committed layer came from.
    pub attrs_generation: u64,
    /// `<local_dir>/attrs.journal`, open for appending, and the changes
    /// recorded since its last write (one `write` per batch).
    pub attr_log: Option<File>,
    pub attr_log_buf: Vec<u8>,
    /// Keys an incremental compaction moved (old entry -> its copy) that are
    /// not committed yet: applied to every index a rebase adopts, where the
    /// key still names the old entry.
    pub moves: HashMap<String, (Location, Location)>,
    /// The committed attribute object still holds records that were dropped
    /// here (of files a compaction replaced): gc commits the smaller one.
    pub attrs_object_stale: bool,
    /// Per key written since the last commit, where the key was before its
    /// first write: the committed index may still name that entry, so gc
    /// keeps its file while the write is unsynced.
    pub journal_base: HashMap<String, Change>,
    /// Multipart uploads started ahead for unpublished data files holding
    /// one large value each (`own_file`): the next upload finishes them.
    pub early_uploads: HashMap<u64, super::own_file::PendingParts>,
}

impl State {
    pub fn new(index: Index, index_etag: Option<String>) -> State {
        State {
            index,
            index_etag,
            journal: HashMap::new(),
            inflight: HashMap::new(),
            before_upload: None,
            index_rewritten: false,
            local: None,
            seq: 0,
            active: None,
            files: BTreeMap::new(),
            attrs: AttrTable::default(),
            attrs_etag: None,
            attr_journal: HashMap::new(),
            attr_inflight: HashMap::new(),
            attr_before_upload: None,
            attrs_generation: 0,
            attr_log: None,
            attr_log_buf: Vec::new(),
            moves: HashMap::new(),
            attrs_object_stale: false,
            journal_base: HashMap::new(),
            early_uploads: HashMap::new(),
        }
    }

    /// Applies one logical write to the visible index and the journal.
    pub fn record(&mut self, key: String, change: Change) {
        if let Some(before) = self.before_upload.as_mut() {
            if !self.journal.contains_key(&key) && !before.contains_key(&key) {
                let was = self.index.entries.get(key.as_str()).copied();
                before.insert(key.clone(), was);
            }
        }
        let old = self.index.entries.get(key.as_str()).copied();
        if !self.journal_base.contains_key(&key) {
            self.journal_base.insert(key.clone(), old);
        }
        apply(&mut self.index.entries, &key, change);
        // The key's attributes follow it to its new entry (our own writers
        // keep them, with the content times of the write); a delete drops them.
        let carried = match (old, change) {
            (Some(old), Some(new)) => self.attrs.file_at(&key, old).cloned().map(|a| {
                let mut a = (*a).clone();
                let now = std::time::SystemTime::now();
                (a.mtime, a.ctime) = (now, now);
                Some(AttrRecord {
                    loc: new,
                    crc: self.entry_crc(&key, new),
                    attrs: Arc::new(a),
                })
            }),
            (Some(_), None) if self.attrs.files.contains_key(key.as_str()) => Some(None),
            _ => None,
        };
        if let Some(rec) = carried {
            self.record_attr(AttrKey::File(key.clone()), AttrChange::File(rec));
        }
        self.journal.insert(key, change);
    }

    /// Applies one attribute change to the visible table and its journal.
    pub fn record_attr(&mut self, k: AttrKey, change: AttrChange) {
        if let Some(before) = self.attr_before_upload.as_mut() {
            if !self.attr_journal.contains_key(&k) && !before.contains_key(&k) {
                before.insert(k.clone(), self.attrs.get(&k));
            }
        }
        if self.attr_log.is_some() {
            super::attr_codec::encode_change(&mut self.attr_log_buf, &k, &change);
        }
        self.attrs.apply(&k, &change);
        self.attr_journal.insert(k, change);
    }

    /// The CRC of the entry of `key` at `loc`: from a record of that entry,
    /// else its last 4 bytes in the local data file (`None` when the entry
    /// is not local: only another writer's entry can be remote-only).
    pub fn entry_crc(&self, key: &str, loc: Location) -> Option<u32> {
        if let Some(crc) = self.attrs.record_at(key, loc).and_then(|r| r.crc) {
            return Some(crc);
        }
        let local = self.local.as_ref()?;
        let end = (loc.offset + loc.length as u64).checked_sub(4)?;
        let bytes = local.read_at(loc.file_id, end, 4).ok()??;
        Some(u32::from_be_bytes(bytes[..4].try_into().ok()?))
    }

    /// Writes the attribute changes recorded since the last call to the
    /// local journal (one `write`; the page cache survives a killed process).
    pub fn flush_attr_log(&mut self) {
        if self.attr_log_buf.is_empty() {
            return;
        }
        let Some(log) = self.attr_log.as_mut() else {
            self.attr_log_buf.clear();
            return;
        };
        use std::io::Write;
        if let Err(e) = log.write_all(&self.attr_log_buf) {
            tracing::error!(
                "appending to the attribute journal: {e}; attribute changes not uploaded yet \
                 will not survive a crash of this process"
            );
        }
        self.attr_log_buf.clear();
    }

    /// Rewrites the local attribute journal to hold exactly the changes not
    /// committed yet (journal and in-flight ones), and opens it for appending.
    pub fn rewrite_attr_log(&mut self) -> crate::error::Result<()> {
        let Some(local) = self.local.clone() else {
            return Ok(());
        };
        let mut buf = Vec::new();
        for (k, c) in &self.attr_inflight {
            if !self.attr_journal.contains_key(k) {
                super::attr_codec::encode_change(&mut buf, k, c);
            }
        }
        for (k, c) in &self.attr_journal {
            super::attr_codec::encode_change(&mut buf, k, c);
        }
        let path = local.path().join(super::attr_codec::JOURNAL_NAME);
        local.write_atomic(&path, &buf)?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| crate::error::Error::io("open", &path, e))?;
        self.attr_log = Some(file);
        self.attr_log_buf.clear();
        Ok(())
    }

    /// Adopts `remote` (a newer attribute object) as the committed layer,
    /// with our in-flight and journaled changes on top; last writer wins per
    /// record, as [`State::rebase`] does for the index.
    pub fn rebase_attrs(&mut self, remote: AttrTable, etag: Option<String>, generation: u64) {
        let mut t = remote;
        for (k, c) in &self.attr_inflight {
            t.apply(k, c);
        }
        if self.attr_before_upload.is_some() {
            self.attr_before_upload = Some(
                self.attr_journal
                    .keys()
                    .map(|k| (k.clone(), t.get(k)))
                    .collect(),
            );
        }
        for (k, c) in &self.attr_journal {
            t.apply(k, c);
        }
        self.attrs = t;
        self.attrs_etag = etag;
        self.attrs_generation = generation;
    }

    /// Where the running upload's index image puts `key`.
    fn image_loc(&self, key: &str) -> Option<Location> {
        match self.before_upload.as_ref().and_then(|b| b.get(key)) {
            Some(was) => *was,
            None => self.index.entries.get(key).copied(),
        }
    }

    /// Serializes the attribute object the running upload publishes: the
    /// visible table with the journal's changes taken back out, and only the
    /// records that may still matter. A record is dropped when its entry's
    /// file is referenced by the index image (so its commit happened, or
    /// never will for that entry), its key points elsewhere in the image, and
    /// the key is not one that `changing` says this commit changes (then the
    /// index committed now still names the old entry until the commit lands).
    /// A record in a file the image does not reference is kept: it may be
    /// another writer's entry whose commit is on its way.
    pub fn encode_attr_image(&self, changing: &dyn Fn(&str) -> bool, generation: u64) -> Vec<u8> {
        let referenced = self.referenced_files();
        let empty = HashMap::new();
        let overrides = self.attr_before_upload.as_ref().unwrap_or(&empty);
        let keep = |k: &str, r: &AttrRecord| {
            self.image_loc(k)
                .is_some_and(|l| super::attrs::same_entry(l, r.loc))
                || !referenced.contains(&r.loc.file_id)
                || changing(k)
        };
        let mut files: Vec<(&str, &AttrRecord)> = Vec::new();
        let keys = self
            .attrs
            .files
            .keys()
            .chain(self.attrs.spare.keys())
            .map(|k| k.as_str())
            .chain(overrides.keys().filter_map(|k| match k {
                AttrKey::File(f) => Some(f.as_str()),
                AttrKey::Dir(_) => None,
            }));
        let mut seen = std::collections::HashSet::new();
        for k in keys {
            if !seen.insert(k) {
                continue;
            }
            let start = files.len();
            let selected = match overrides.get(&AttrKey::File(k.to_string())) {
                Some(AttrChange::File(r)) => r.as_ref(),
                _ => self.attrs.files.get(k),
            };
            for r in selected
                .into_iter()
                .chain(self.attrs.spare.get(k).into_iter().flatten())
            {
                if keep(k, r)
                    && !files[start..]
                        .iter()
                        .any(|(_, o)| super::attrs::same_entry(o.loc, r.loc))
                {
                    files.push((k, r));
                }
            }
        }
        let mut dirs: BTreeMap<&str, &super::attrs::Attrs> = self
            .attrs
            .dirs
            .iter()
            .map(|(p, a)| (p.as_str(), &**a))
            .collect();
        for (k, c) in overrides {
            if let (AttrKey::Dir(p), AttrChange::Dir(a)) = (k, c) {
                match a {
                    Some(a) => dirs.insert(p.as_str(), &**a),
                    None => dirs.remove(p.as_str()),
                };
            }
        }
        super::attr_codec::encode_object(generation, files, dirs)
    }

    /// Data files referenced by the visible index or the upload's image.
    pub fn referenced_files(&self) -> std::collections::HashSet<u64> {
        let mut set: std::collections::HashSet<u64> =
            self.index.entries.values().map(|l| l.file_id).collect();
        if let Some(b) = &self.before_upload {
            set.extend(b.values().flatten().map(|l| l.file_id));
        }
        set
    }

    /// Data files the committed index may reference although the visible
    /// one does not: where unsynced writes' keys were before them, and where
    /// uncommitted compaction moves took keys from.
    pub fn shadowed_files(&self) -> std::collections::HashSet<u64> {
        let mut set: std::collections::HashSet<u64> = self
            .journal_base
            .values()
            .flatten()
            .map(|l| l.file_id)
            .collect();
        set.extend(self.moves.values().map(|(old, _)| old.file_id));
        set
    }

    /// After a commit: forgets spare records that can no longer matter (see
    /// [`State::encode_attr_image`]).
    pub fn prune_attrs(&mut self) {
        if self.attrs.spare.is_empty() {
            return;
        }
        let referenced = self.referenced_files();
        let index = &self.index.entries;
        let journal = &self.journal;
        self.attrs.prune_spare(|k, r| {
            index
                .get(k)
                .is_some_and(|l| super::attrs::same_entry(*l, r.loc))
                || !referenced.contains(&r.loc.file_id)
                || journal.contains_key(k)
        });
    }

    pub fn has_unsynced(&self) -> bool {
        !self.journal.is_empty()
            || !self.inflight.is_empty()
            || !self.attr_journal.is_empty()
            || !self.attr_inflight.is_empty()
            || self.index_rewritten
            || !self.moves.is_empty()
            || self.files.values().any(|f| !f.published)
    }

    /// Rewrites the local pending list to the files not uploaded yet. Called
    /// with the state locked, so a concurrent put's new file cannot be lost
    /// from the list between reading the state and writing the file.
    pub fn save_pending_list(&self) -> crate::error::Result<()> {
        match &self.local {
            Some(local) => local.set_pending(&self.unpublished_files()),
            None => Ok(()),
        }
    }

    pub fn unpublished_files(&self) -> Vec<u64> {
        self.files
            .iter()
            .filter(|(_, f)| !f.published && !f.compacted)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Serializes what the running upload publishes: the visible index with
    /// the journal's changes taken back out.
    pub fn encode_committed_image(&self) -> Vec<u8> {
        let empty = HashMap::new();
        let overrides = self.before_upload.as_ref().unwrap_or(&empty);
        let entries = &self.index.entries;
        let mut count = entries.len() as i64;
        for (key, was) in overrides {
            match (was, entries.contains_key(key.as_str())) {
                (Some(_), false) => count += 1,
                (None, true) => count -= 1,
                _ => {}
            }
        }
        let visible = entries
            .iter()
            .filter_map(|(k, loc)| match overrides.get(k.as_str()) {
                Some(was) => was.map(|l| (k.as_str(), l)),
                None => Some((k.as_str(), *loc)),
            });
        let restored = overrides.iter().filter_map(|(k, was)| match was {
            Some(l) if !entries.contains_key(k.as_str()) => Some((k.as_str(), *l)),
            _ => None,
        });
        crate::format::encode_index(
            self.index.next_file_num,
            count as u32,
            visible.chain(restored),
        )
    }

    /// Adopts `committed` (a newer remote index) as the base, with our
    /// inflight and journal writes on top; last writer wins per key.
    pub fn rebase(&mut self, mut committed: Index, etag: Option<String>) {
        committed.next_file_num = committed.next_file_num.max(self.index.next_file_num);
        // A compaction's moves hold where the other writer left the key alone.
        for (k, (old, new)) in &self.moves {
            if let Some(l) = committed.entries.get_mut(k.as_str()) {
                if super::attrs::same_entry(*l, *old) {
                    *l = *new;
                }
            }
        }
        for (k, c) in &self.inflight {
            apply(&mut committed.entries, k, *c);
        }
        if self.before_upload.is_some() {
            self.before_upload = Some(
                self.journal
                    .keys()
                    .map(|k| (k.clone(), committed.entries.get(k.as_str()).copied()))
                    .collect(),
            );
        }
        for (k, c) in &self.journal {
            apply(&mut committed.entries, k, *c);
        }
        self.index = committed;
        self.index_etag = etag;
    }
}

pub(crate) fn apply(entries: &mut BTreeMap<Key, Location>, key: &str, change: Change) {
    match change {
        Some(loc) => {
            entries.insert(key.into(), loc);
        }
        None => {
            entries.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(n: u64) -> Location {
        Location {
            file_id: n,
            offset: 9,
            length: 20,
        }
    }

    #[test]
    fn committed_image_excludes_writes_made_during_the_upload() {
        let mut index = Index::default();
        index.entries.insert("kept".into(), loc(1));
        index.entries.insert("overwritten".into(), loc(1));
        index.entries.insert("deleted".into(), loc(1));
        let mut state = State::new(index.clone(), None);
        state.before_upload = Some(HashMap::new());
        state.record("overwritten".into(), Some(loc(2)));
        state.record("deleted".into(), None);
        state.record("new".into(), Some(loc(2)));
        state.record("new".into(), Some(loc(3)));
        let image = Index::decode("i", &state.encode_committed_image()).unwrap();
        assert_eq!(image, index);
        assert_eq!(state.index.entries.len(), 3);
    }
}
