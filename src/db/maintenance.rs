//! Whole-database operations: download, compact, rebuild_index and gc.

use super::attrs::{AttrChange, AttrKey, AttrRecord};
use super::state::{OwnFile, State};
use super::S4db;
use crate::error::{Error, Result};
use crate::format::{
    data_file_name, encode_file_header, file_id, parse_data_file_name, scan_entries, split_file_id,
    Corruption, FormatError, Index, Location, HEADER_SIZE, INDEX_NAME,
};
use crate::remote::{ObjectMeta, StoreError};
use futures::StreamExt;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::time::{Duration, SystemTime};

/// What compaction did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CompactReport {
    pub files_before: usize,
    pub files_after: usize,
    pub bytes_before: u64,
    pub bytes_after: u64,
    pub keys: usize,
}

/// What a rebuild found.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RebuildReport {
    pub files: usize,
    pub keys: usize,
    /// Files whose replay stopped early at a torn or corrupt entry, with the reason.
    pub torn: Vec<String>,
}

impl S4db {
    /// Lists the data objects under the prefix, as `(file_id, meta)`.
    pub(crate) async fn list_data_objects(&self) -> Result<Vec<(u64, ObjectMeta)>> {
        let prefix = self.prefix().to_string();
        let objects = self.inner.store.list(&prefix).await?;
        Ok(objects
            .into_iter()
            .filter_map(|o| {
                let name = o.key.strip_prefix(&prefix)?;
                parse_data_file_name(name).map(|id| (id, o))
            })
            .collect())
    }

    /// Makes sure each file in `need` (file id -> bytes needed) is local and
    /// at least that long, downloading the others concurrently.
    pub(crate) async fn fetch_files(&self, need: BTreeMap<u64, u64>) -> Result<()> {
        let local = self.local_dir()?;
        let mut missing = Vec::new();
        for (id, len) in need {
            if local.size_of(id)?.is_none_or(|have| have < len) {
                missing.push(id);
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        if let Some(p) = self.progress() {
            p.start("downloading data files", missing.len() as u64, "files");
        }
        let downloads = futures::stream::iter(missing.into_iter().map(|id| {
            let local = local.clone();
            async move {
                let key = self.object_key(&data_file_name(id));
                let got = self.inner.store.get(&key).await?;
                let mut tmp = local.temp_file()?;
                tmp.write_all(&got.data)
                    .map_err(|e| Error::io("write", tmp.path(), e))?;
                local.install(tmp, id)?;
                Ok::<_, Error>(())
            }
        }))
        .buffer_unordered(self.inner.opts.concurrency.clamp(1, 8));
        futures::pin_mut!(downloads);
        while let Some(done) = downloads.next().await {
            done?;
            if let Some(p) = self.progress() {
                p.advance(1);
            }
        }
        if let Some(p) = self.progress() {
            p.finish();
        }
        Ok(())
    }

    /// Downloads every data file under the prefix that is missing or shorter
    /// locally (files this instance wrote are left alone), then reloads the
    /// index. With unsynced writes this fails unless `force`, which discards them.
    pub async fn download(&self, force: bool) -> Result<()> {
        let _serial = self.inner.maintenance.lock().await;
        let discard = {
            let state = self.state();
            if state.has_unsynced() && !force {
                return Err(Error::Unsynced(
                    "local writes are not uploaded; upload first, or force the download to discard them".into(),
                ));
            }
            state.unpublished_files()
        };
        let local = self.local_dir()?;
        let own: HashSet<u64> = self.state().files.keys().copied().collect();
        let need: BTreeMap<u64, u64> = self
            .list_data_objects()
            .await?
            .into_iter()
            .filter(|(id, _)| !own.contains(id))
            .map(|(id, o)| (id, o.size))
            .collect();
        self.fetch_files(need).await?;
        let (index, etag) = self.fetch_index().await?;
        // A mirror must hold every entry the index points at: an object that
        // is gone from the store is damage to report now, not at a later read.
        let mut ends: BTreeMap<u64, u64> = BTreeMap::new();
        for l in index.entries.values() {
            let end = ends.entry(l.file_id).or_default();
            *end = (*end).max(l.offset + l.length as u64);
        }
        for (id, end) in ends {
            if local.size_of(id)?.is_none_or(|size| size < end) {
                return Err(Error::Store(StoreError::NotFound {
                    key: format!(
                        "{} (referenced by {INDEX_NAME}; run rebuild-index --from-s3 to drop its keys)",
                        self.object_key(&data_file_name(id))
                    ),
                }));
            }
        }
        {
            let mut state = self.state();
            for id in &discard {
                state.files.remove(id);
                local.remove(*id)?;
            }
            state.active = None;
            state.journal.clear();
            state.journal_base.clear();
            state.moves.clear();
            state.index_rewritten = false;
            state.index = index;
            state.index_etag = etag;
            state.save_pending_list()?;
        }
        let (table, attrs_etag, generation) = self.fetch_attrs().await?;
        let mut state = self.state();
        state.attr_journal.clear();
        state.attr_inflight.clear();
        state.rebase_attrs(table, attrs_etag, generation);
        state.rewrite_attr_log()?;
        let snapshot = state.index.encode();
        drop(state);
        local.write_atomic(&local.path().join(INDEX_NAME), &snapshot)
    }

    /// Rewrites the live entries into new files of this writer, dropping
    /// overwritten and deleted ones; commits the new index with a conditional
    /// PUT and only then deletes the old objects. Downloads the referenced
    /// files it needs first. A lost race leaves the database as it was.
    ///
    /// # Errors
    /// [`Error::Unsynced`] with writes not uploaded yet; [`Error::Conflict`]
    /// when another writer committed during compaction (retry later).
    pub async fn compact(&self) -> Result<CompactReport> {
        let _serial = self.inner.maintenance.lock().await;
        let (snapshot, etag, mut new_attrs, attrs_etag, attrs_generation) = {
            let state = self.state();
            if state.has_unsynced() {
                return Err(Error::Unsynced("upload before compacting".into()));
            }
            (
                state.index.clone(),
                state.index_etag.clone(),
                state.attrs.clone(),
                state.attrs_etag.clone(),
                state.attrs_generation,
            )
        };
        // Group live entries by file, in file order, each file's in offset order.
        let mut by_file: BTreeMap<u64, Vec<(u64, u32, &str)>> = BTreeMap::new();
        for (key, loc) in &snapshot.entries {
            by_file
                .entry(loc.file_id)
                .or_default()
                .push((loc.offset, loc.length, key));
        }
        let need = by_file
            .iter()
            .map(|(id, v)| {
                (
                    *id,
                    v.iter().map(|(o, l, _)| o + *l as u64).max().unwrap_or(0),
                )
            })
            .collect();
        self.fetch_files(need).await?;
        let local = self.local_dir()?;
        let bytes_before: u64 = by_file
            .keys()
            .map(|id| local.size_of(*id).map(|s| s.unwrap_or(0)))
            .sum::<Result<u64>>()?;

        if let Some(p) = self.progress() {
            p.start("compacting", snapshot.entries.len() as u64, "keys");
        }
        let mut new_index = Index {
            next_file_num: snapshot.next_file_num,
            entries: BTreeMap::new(),
        };
        let mut new_files: Vec<(u64, u64)> = Vec::new();
        let mut out: Option<(u64, std::fs::File, u64)> = None;
        let max = self.inner.opts.max_file_size;
        for (old_id, entries) in &mut by_file {
            entries.sort_unstable();
            let name = data_file_name(*old_id);
            for (offset, length, key) in entries.iter() {
                let loc = Location {
                    file_id: *old_id,
                    offset: *offset,
                    length: *length,
                };
                let bytes = local.read_at(*old_id, *offset, *length)?.ok_or_else(|| {
                    FormatError::new(
                        &name,
                        *offset,
                        Corruption::Truncated {
                            need: *offset + *length as u64,
                            have: local.size_of(*old_id).ok().flatten().unwrap_or(0),
                        },
                    )
                })?;
                // Verify before copying: compaction must never propagate corruption.
                super::decode_live(key, loc, &bytes)?;
                let roll = match &out {
                    None => true,
                    Some((_, _, len)) => *len > HEADER_SIZE && len + *length as u64 > max,
                };
                if roll {
                    if let Some((id, _, len)) = out.take() {
                        new_files.push((id, len));
                    }
                    let id = {
                        let mut state = self.state();
                        state.seq += 1;
                        file_id(self.writer_id(), state.seq)
                    };
                    let file = local.create_data_file(id, &encode_file_header(id))?;
                    out = Some((id, file, HEADER_SIZE));
                }
                let (id, file, len) = out.as_mut().expect("opened above");
                file.write_all(&bytes)
                    .map_err(|e| Error::io("write", local.file_path(*id), e))?;
                new_index.entries.insert(
                    (*key).into(),
                    Location {
                        file_id: *id,
                        offset: *len,
                        length: *length,
                    },
                );
                *len += *length as u64;
                if let Some(p) = self.progress() {
                    p.advance(1);
                }
            }
        }
        if let Some((id, file, len)) = out.take() {
            file.sync_all()
                .map_err(|e| Error::io("sync", local.file_path(id), e))?;
            new_files.push((id, len));
        }
        if let Some(p) = self.progress() {
            p.finish();
        }

        // Every record follows its key to the key's new entry (same bytes, so
        // the same CRC). The object keeps the old records too until the new
        // index is committed: readers of the old index keep their attributes.
        for (key, new_loc) in &new_index.entries {
            let Some(old) = snapshot.entries.get(key) else {
                continue;
            };
            if let Some(r) = new_attrs.record_at(key, *old).cloned() {
                let rec = AttrRecord {
                    loc: *new_loc,
                    crc: r.crc,
                    attrs: r.attrs,
                };
                new_attrs.apply(
                    &AttrKey::File(key.to_string()),
                    &AttrChange::File(Some(rec)),
                );
            }
        }
        let attrs_put =
            (attrs_etag.is_some() || !new_attrs.files.is_empty() || !new_attrs.dirs.is_empty())
                .then(|| {
                    let files = new_attrs.files.iter().map(|(k, r)| (k.as_str(), r)).chain(
                        new_attrs
                            .spare
                            .iter()
                            .flat_map(|(k, v)| v.iter().map(move |r| (k.as_str(), r))),
                    );
                    let dirs = new_attrs.dirs.iter().map(|(p, a)| (p.as_str(), &**a));
                    super::attr_codec::encode_object(attrs_generation + 1, files, dirs)
                });
        let publish = async {
            for (id, _) in &new_files {
                let key = self.object_key(&data_file_name(*id));
                let condition = self.new_file_condition(false);
                self.inner
                    .store
                    .put_file(&key, &local.file_path(*id), condition)
                    .await?;
                self.publish_hints(*id, &local).await;
            }
            // Attributes first, as in every commit.
            let attrs_etag = match attrs_put {
                Some(bytes) => {
                    let condition = self.index_condition(&attrs_etag);
                    let key = self.object_key(super::attr_codec::ATTRS_NAME);
                    Some(self.inner.store.put(&key, bytes.into(), condition).await?)
                }
                None => None,
            };
            let condition = self.index_condition(&etag);
            let index_key = self.object_key(INDEX_NAME);
            let index_etag = self
                .inner
                .store
                .put(&index_key, new_index.encode().into(), condition)
                .await?;
            Ok::<_, Error>((index_etag, attrs_etag))
        };
        let keys = new_index.entries.len();
        let (new_etag, new_attrs_etag) = match publish.await {
            Ok(e) => e,
            Err(e) => {
                // Nothing committed: drop the replacement files (best effort; gc gets the rest).
                for (id, _) in &new_files {
                    let _ = self
                        .inner
                        .store
                        .delete(&self.object_key(&data_file_name(*id)))
                        .await;
                    self.delete_hints(*id).await;
                    let _ = local.remove(*id);
                }
                return Err(match e {
                    Error::Store(StoreError::Conflict { .. }) => Error::Conflict(
                        "another writer committed during compaction; the database is unchanged, compact again".into(),
                    ),
                    e => e,
                });
            }
        };
        {
            let mut state = self.state();
            for (id, _) in &new_files {
                state.files.insert(
                    *id,
                    OwnFile {
                        published: true,
                        unconditional: false,
                        compacted: false,
                    },
                );
            }
            // What readers see: the compacted index plus writes made meanwhile.
            let mut view = new_index;
            for (k, c) in &state.journal {
                super::state::apply(&mut view.entries, k, *c);
            }
            state.index = view;
            state.index_etag = Some(new_etag);
            if let Some(attrs_etag) = new_attrs_etag {
                // The old files are dead now: so are their records.
                let old: HashSet<u64> = by_file.keys().copied().collect();
                new_attrs.prune_spare(|_, r| !old.contains(&r.loc.file_id));
                for (k, c) in &state.attr_journal {
                    new_attrs.apply(k, c);
                }
                state.attrs = new_attrs;
                state.attrs_etag = Some(attrs_etag);
                state.attrs_generation = attrs_generation + 1;
            }
        }
        // Only now is it safe to delete what the old index referenced, and the
        // other files this instance published: all their entries are dead now,
        // and a tombstone left behind could not outlive the put it deletes.
        let own_dead: Vec<u64> = {
            let state = self.state();
            let fresh: HashSet<u64> = new_files.iter().map(|(id, _)| *id).collect();
            state
                .files
                .iter()
                .filter(|(id, f)| f.published && !fresh.contains(id))
                .map(|(id, _)| *id)
                .collect()
        };
        let mut dead: Vec<u64> = by_file.keys().copied().collect();
        dead.extend(own_dead.into_iter().filter(|id| !by_file.contains_key(id)));
        for old_id in &dead {
            self.inner
                .store
                .delete(&self.object_key(&data_file_name(*old_id)))
                .await?;
            self.delete_hints(*old_id).await;
            local.remove(*old_id)?;
            self.state().files.remove(old_id);
        }
        Ok(CompactReport {
            files_before: by_file.len(),
            files_after: new_files.len(),
            bytes_before,
            bytes_after: new_files.iter().map(|(_, len)| len).sum(),
            keys,
        })
    }

    /// Rebuilds the index by replaying data files (later entries win,
    /// tombstones delete), verifying every CRC; replay of a file stops at a
    /// torn or corrupt entry. Files replay writer by writer, each writer's in
    /// sequence order, writers in the order they first uploaded (S3's
    /// LastModified, to the second). With `from_s3`, first downloads every
    /// data file listed under the prefix, so a lost index is recoverable. The
    /// next upload commits the rebuilt index and publishes any local file the
    /// store does not have.
    ///
    /// # Errors
    /// [`Error::Usage`] when the store holds data files the local directory
    /// lacks and `from_s3` is off: the rebuilt index would forget their keys.
    pub async fn rebuild_index(&self, from_s3: bool) -> Result<RebuildReport> {
        let _serial = self.inner.maintenance.lock().await;
        let listed: HashMap<u64, ObjectMeta> =
            self.list_data_objects().await?.into_iter().collect();
        if from_s3 {
            self.fetch_files(listed.iter().map(|(k, o)| (*k, o.size)).collect())
                .await?;
        }
        let local = self.local_dir()?;
        let files = replay_order(&local, &listed)?;
        // Replaying a partial mirror would commit an index that forgets the
        // keys of the missing files (and gc would then delete those files).
        let here: HashSet<u64> = files.iter().map(|(id, _)| *id).collect();
        let missing: Vec<String> = listed
            .keys()
            .filter(|id| !here.contains(id))
            .map(|id| data_file_name(*id))
            .collect();
        if !missing.is_empty() {
            return Err(Error::Usage(format!(
                "{} data files in the store are not in the local directory {} (e.g. {}); \
                 rebuild from the store (--from-s3) or download them first",
                missing.len(),
                local.path().display(),
                missing[0]
            )));
        }
        if let Some(p) = self.progress() {
            p.start("replaying data files", files.len() as u64, "files");
        }
        let mut index = Index::default();
        let mut report = RebuildReport::default();
        let mut max_legacy = 0u32;
        let mut unpublished = Vec::new();
        for (id, size) in &files {
            let name = data_file_name(*id);
            let path = local.file_path(*id);
            let data = std::fs::read(&path).map_err(|e| Error::io("read", &path, e))?;
            let scan = match scan_entries(&name, &data) {
                Ok(s) => s,
                Err(e) => {
                    report.torn.push(e.to_string());
                    continue;
                }
            };
            if let Some(stop) = &scan.stopped {
                tracing::warn!("rebuild: stopping replay of {name}: {stop}");
                report.torn.push(stop.to_string());
            }
            let (writer, seq) = split_file_id(*id);
            if writer == 0 {
                max_legacy = max_legacy.max(seq);
            }
            for e in &scan.entries {
                let change = (!e.tombstone).then_some(Location {
                    file_id: *id,
                    offset: e.offset,
                    length: e.length,
                });
                super::state::apply(&mut index.entries, &e.key, change);
            }
            if listed.get(id).is_none_or(|remote| remote.size < *size) {
                unpublished.push(*id);
            }
            report.files += 1;
            if let Some(p) = self.progress() {
                p.advance(1);
            }
        }
        if let Some(p) = self.progress() {
            p.finish();
        }
        index.next_file_num = max_legacy + 1;
        report.keys = index.entries.len();
        let mut state = self.state();
        install_rebuilt(&mut state, index, &unpublished);
        Ok(report)
    }

    /// Deletes data objects that the index does not reference, that this
    /// instance did not write, and that are older than `grace` (so a
    /// concurrent writer's uploaded-but-uncommitted files survive); objects
    /// a compaction retired go once `grace` has passed since they were
    /// retired too (readers of an older index keep them meanwhile). Also
    /// deletes the hint objects of deleted data files (and orphaned ones
    /// older than `grace`), and drops attribute records of entries in files
    /// that are gone from the attribute object. Returns the deleted data
    /// file names.
    pub async fn gc(&self, grace: Duration) -> Result<Vec<String>> {
        let _serial = self.inner.maintenance.lock().await;
        self.gc_locked(grace, usize::MAX).await
    }

    /// [`S4db::gc`] bounded to deleting at most `max_objects` data files
    /// (and their hint objects) per call, so an upload waits for it at most
    /// that long; the next call goes on. Deletions run concurrently.
    pub async fn gc_round(&self, grace: Duration, max_objects: usize) -> Result<Vec<String>> {
        let _serial = self.inner.maintenance.lock().await;
        self.gc_locked(grace, max_objects).await
    }

    /// Deletes `keys` with up to `concurrency` requests in flight; returns
    /// how many went (an object already gone counts).
    async fn delete_all(&self, keys: Vec<String>) -> Result<u64> {
        let n = keys.len() as u64;
        let deletes = futures::stream::iter(keys.into_iter().map(|key| async move {
            match self.inner.store.delete(&key).await {
                Ok(()) | Err(StoreError::NotFound { .. }) => Ok(()),
                Err(e) => Err(Error::from(e)),
            }
        }))
        .buffer_unordered(self.inner.opts.concurrency.clamp(1, 16));
        futures::pin_mut!(deletes);
        while let Some(done) = deletes.next().await {
            done?;
        }
        Ok(n)
    }

    pub(crate) async fn gc_locked(
        &self,
        grace: Duration,
        max_objects: usize,
    ) -> Result<Vec<String>> {
        let (referenced, own) = {
            let state = self.state();
            if state.index_rewritten {
                return Err(Error::Unsynced(
                    "upload the rebuilt index before running gc".into(),
                ));
            }
            // With writes unsynced, what the committed index names stays too.
            let mut referenced: HashSet<u64> =
                state.index.entries.values().map(|l| l.file_id).collect();
            referenced.extend(state.shadowed_files());
            let own: HashSet<u64> = state.files.keys().copied().collect();
            (referenced, own)
        };
        let (retired, _) = self.fetch_retired().await?;
        let now = SystemTime::now();
        let now_unix = super::retired::unix_now();
        let mut deleted = Vec::new();
        let mut deleted_ids = HashSet::new();
        let mut kept = HashSet::new();
        let mut objects = 0u64;
        let mut doomed = Vec::new();
        for (id, meta) in self.list_data_objects().await? {
            let age = now.duration_since(meta.last_modified).unwrap_or_default();
            let name = data_file_name(id);
            let old_enough = age >= grace
                && retired
                    .get(&name)
                    .is_none_or(|t| now_unix.saturating_sub(*t) >= grace.as_secs());
            if referenced.contains(&id)
                || own.contains(&id)
                || !old_enough
                || doomed.len() >= max_objects
            {
                kept.insert(id);
                continue;
            }
            doomed.push(meta.key);
            deleted.push(name);
            deleted_ids.insert(id);
        }
        objects += self.delete_all(doomed).await?;
        if let Some(local) = self.state().local.clone() {
            for id in &deleted_ids {
                local.remove(*id)?;
            }
        }
        if !retired.is_empty() {
            let kept_names: HashSet<String> = kept.iter().map(|id| data_file_name(*id)).collect();
            self.edit_retired(|list| list.retain(|n, _| kept_names.contains(n)))
                .await?;
        }
        // Hints of data files that are gone (deleted here, or by the Python package).
        let hints = self.orphan_hints(&kept, &deleted_ids, grace).await?;
        objects += self.delete_all(hints).await?;
        // Parts of multipart uploads a failed or killed upload of a large data
        // file left behind (the uploader aborts them itself when it can).
        match crate::remote::abort_stale_uploads(self.inner.store.as_ref(), self.prefix(), grace)
            .await
        {
            Ok(aborted) if !aborted.is_empty() => {
                tracing::info!("gc: aborted {} unfinished multipart uploads", aborted.len())
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("gc: could not abort unfinished multipart uploads: {e}"),
        }
        let pruned = self.prune_dead_records(&kept, &own).await?;
        let c = &self.inner.counters;
        c.gc_runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        c.objects_deleted
            .fetch_add(objects, std::sync::atomic::Ordering::Relaxed);
        c.attr_records_pruned
            .fetch_add(pruned as u64, std::sync::atomic::Ordering::Relaxed);
        c.last_gc
            .store(now_unix, std::sync::atomic::Ordering::Relaxed);
        if objects > 0 || pruned > 0 {
            tracing::info!("gc: deleted {objects} objects, dropped {pruned} attribute records");
        }
        Ok(deleted)
    }

    /// Drops the attribute records whose entries are in data files that no
    /// longer exist (neither in `listed` nor written here) and that no key
    /// names, and commits the smaller attribute object (on a lost race the
    /// next gc tries again). With writes unsynced only the spare records go,
    /// from memory: the next upload publishes the smaller table. (A mount
    /// that always has a write on its way, or a second mount's access
    /// times, kept handing back the spare records of every file compaction
    /// replaced, so they piled up for as long as writes kept coming.)
    /// Returns how many records went.
    async fn prune_dead_records(&self, listed: &HashSet<u64>, own: &HashSet<u64>) -> Result<usize> {
        let exists = |id: u64| listed.contains(&id) || own.contains(&id);
        let (bytes, condition, generation, mut table, pruned) = {
            let mut state = self.state();
            if state.has_unsynced() {
                // No upload runs (gc holds the maintenance lock), and a spare
                // record is never the journal's: the table is ours to edit.
                let mut pruned = 0;
                state.attrs.prune_spare(|_, r| {
                    let keep = exists(r.loc.file_id);
                    pruned += usize::from(!keep);
                    keep
                });
                state.attrs_object_stale |= pruned > 0;
                return Ok(pruned);
            }
            let mut table = state.attrs.clone();
            let index = &state.index.entries;
            let before = table.files.len() + table.spare.values().map(Vec::len).sum::<usize>();
            table.files.retain(|k, r| {
                exists(r.loc.file_id)
                    || index
                        .get(k.as_str())
                        .is_some_and(|l| super::attrs::same_entry(*l, r.loc))
            });
            table.prune_spare(|_, r| exists(r.loc.file_id));
            let after = table.files.len() + table.spare.values().map(Vec::len).sum::<usize>();
            if after == before && !state.attrs_object_stale {
                return Ok(0);
            }
            table.reindex_links();
            let generation = state.attrs_generation + 1;
            let files = table.files.iter().map(|(k, r)| (k.as_str(), r)).chain(
                table
                    .spare
                    .iter()
                    .flat_map(|(k, v)| v.iter().map(move |r| (k.as_str(), r))),
            );
            let dirs = table.dirs.iter().map(|(p, a)| (p.as_str(), &**a));
            let bytes = super::attr_codec::encode_object(generation, files, dirs);
            let condition = self.index_condition(&state.attrs_etag);
            (bytes, condition, generation, table.clone(), before - after)
        };
        let key = self.object_key(super::attr_codec::ATTRS_NAME);
        match self.inner.store.put(&key, bytes.into(), condition).await {
            Ok(etag) => {
                let mut state = self.state();
                for (k, c) in &state.attr_journal {
                    table.apply(k, c);
                }
                state.attrs = table;
                state.attrs_etag = Some(etag);
                state.attrs_generation = generation;
                state.attrs_object_stale = false;
                Ok(pruned)
            }
            Err(StoreError::Conflict { .. }) => {
                tracing::info!("gc: {key} changed meanwhile; its dead records go next time");
                Ok(0)
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// The local data files as `(file_id, size)`, in replay order. A writer
/// instance numbers its files 1, 2, 3...; writers are ordered by the time of
/// their oldest file (the store's LastModified, else the local mtime), so
/// writers that followed one another replay in that order. Writers that ran
/// concurrently have no order to recover: last-writer-wins between them is
/// decided by that timestamp, then by name.
fn replay_order(
    local: &super::LocalDir,
    listed: &HashMap<u64, ObjectMeta>,
) -> Result<Vec<(u64, u64)>> {
    let files = local.data_files()?;
    let mut first_seen: HashMap<u32, SystemTime> = HashMap::new();
    for (id, _) in &files {
        let when = match listed.get(id) {
            Some(o) => o.last_modified,
            None => std::fs::metadata(local.file_path(*id))
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH),
        };
        let writer = split_file_id(*id).0;
        let t = first_seen.entry(writer).or_insert(when);
        *t = (*t).min(when);
    }
    let mut files = files;
    files.sort_by_key(|(id, _)| {
        let (writer, seq) = split_file_id(*id);
        (first_seen[&writer], writer, seq)
    });
    Ok(files)
}

fn install_rebuilt(state: &mut State, index: Index, unpublished: &[u64]) {
    state.index = index;
    // Records stay valid where the rebuilt index names the entries they describe.
    let entries = &state.index.entries;
    state.attrs.reselect(|k| entries.get(k).copied());
    state.journal.clear();
    state.journal_base.clear();
    state.moves.clear();
    state.inflight.clear();
    state.active = None;
    state.index_rewritten = true;
    for id in unpublished {
        state.files.insert(
            *id,
            OwnFile {
                published: false,
                unconditional: true,
                compacted: false,
            },
        );
    }
}
