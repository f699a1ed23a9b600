//! Incremental compaction: bounded rounds that merge small data files by
//! size tier and rewrite files that are mostly dead, without ever rewriting
//! the whole database (the full [`S4db::compact`] does that).
//!
//! A round:
//! 1. plans from the index (live bytes per file) and one LIST (file sizes):
//!    files of similar size (a tier: sizes within a factor `min_files` of
//!    each other) are merged when at least `min_files` of them exist, and
//!    files whose live bytes are below `dead_ratio` of their size are
//!    rewritten; at most `max_round_bytes` of files are read;
//! 2. copies the live entries of those files (CRC-checked) into new files of
//!    this writer, with the state lock held only to allocate file numbers;
//! 3. lists the replaced files in the retired list (`retired.rs`), *before*
//!    the commit, so they are never deleted early whatever happens next;
//! 4. moves each key to its copy where the index still names the old entry
//!    (a key written meanwhile keeps its new value), re-binds its attribute
//!    record to the copy, and commits through the ordinary upload: new data
//!    files and their hint objects, the attribute object, the index with
//!    `If-Match`. On a conflict the upload rebases, and the moves are applied
//!    again to the winner's index wherever it still names the old entry.
//!
//! Replaced objects stay for the grace period (readers of an older index
//! keep reading them; our own readers refresh when an object is gone) and
//! `gc` deletes them after it. Own files left entirely dead by overwrites are
//! retired the same way. Tombstones are not carried: after compaction a
//! `rebuild-index` may bring back a deleted key whose older put sits in a
//! file that was not compacted (rebuild is a recovery tool; see README).

use super::attrs::{AttrChange, AttrKey, AttrRecord};
use super::state::OwnFile;
use super::S4db;
use crate::error::{Error, Result};
use crate::format::{
    data_file_name, encode_file_header, file_id, Corruption, FormatError, Location, HEADER_SIZE,
};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// Files smaller than this are all tier 0.
const TIER_BASE: u64 = 16 * 1024;

/// How incremental compaction chooses its work.
#[derive(Debug, Clone)]
pub struct CompactOptions {
    /// Merge a size tier once it holds this many files (the fan-in, ≥ 2).
    pub min_files: usize,
    /// Rewrite a file whose live bytes are below this share of its size.
    pub dead_ratio: f64,
    /// Most bytes of data files one round reads (local or from the store).
    pub max_round_bytes: u64,
    /// Run even with writes unsynced, publishing them with the round's
    /// commit (the mount, which publishes them soon anyway); otherwise a
    /// round refuses with [`Error::Unsynced`].
    pub publish_unsynced: bool,
}

impl Default for CompactOptions {
    fn default() -> Self {
        CompactOptions {
            min_files: 4,
            dead_ratio: 0.5,
            max_round_bytes: 256 * 1024 * 1024,
            publish_unsynced: false,
        }
    }
}

/// What one incremental round did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RoundReport {
    /// Files whose live entries were copied into new files.
    pub files_merged: usize,
    /// New files written.
    pub files_written: usize,
    /// Files listed for deletion after the grace period (merged ones and
    /// own files nothing references any more).
    pub files_retired: usize,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub keys_moved: usize,
    /// The keys moved, with their old and new entry (for callers that keep
    /// per-entry facts, like the mount's sizes).
    #[serde(skip)]
    pub moves: Vec<(String, Location, Location)>,
}

impl RoundReport {
    pub fn did_work(&self) -> bool {
        self.files_merged > 0 || self.files_retired > 0
    }
}

/// Totals of background maintenance since open (the mount's `.s4db/stats`).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub rounds: AtomicU64,
    pub compactions: AtomicU64,
    pub files_merged: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub files_retired: AtomicU64,
    pub last_compaction: AtomicU64,
    pub gc_runs: AtomicU64,
    pub objects_deleted: AtomicU64,
    pub attr_records_pruned: AtomicU64,
    pub last_gc: AtomicU64,
    pub evicted_files: AtomicU64,
    pub evicted_bytes: AtomicU64,
}

/// A snapshot of [`Counters`].
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct MaintenanceStats {
    /// Incremental rounds run (with or without work).
    pub rounds: u64,
    /// Rounds that merged or retired files.
    pub compactions: u64,
    pub files_merged: u64,
    pub bytes_read: u64,
    /// Bytes of new data files written by compaction.
    pub bytes_rewritten: u64,
    pub files_retired: u64,
    /// Unix seconds of the last round that did work (0: none yet).
    pub last_compaction_unix: u64,
    pub gc_runs: u64,
    /// Objects (data files and hint objects) gc deleted.
    pub objects_deleted: u64,
    /// Attribute records of deleted files that gc dropped.
    pub attr_records_pruned: u64,
    pub last_gc_unix: u64,
    /// Published data files removed from the local directory for its size cap.
    pub evicted_files: u64,
    pub evicted_bytes: u64,
}

impl Counters {
    pub fn snapshot(&self) -> MaintenanceStats {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        MaintenanceStats {
            rounds: g(&self.rounds),
            compactions: g(&self.compactions),
            files_merged: g(&self.files_merged),
            bytes_read: g(&self.bytes_read),
            bytes_rewritten: g(&self.bytes_written),
            files_retired: g(&self.files_retired),
            last_compaction_unix: g(&self.last_compaction),
            gc_runs: g(&self.gc_runs),
            objects_deleted: g(&self.objects_deleted),
            attr_records_pruned: g(&self.attr_records_pruned),
            last_gc_unix: g(&self.last_gc),
            evicted_files: g(&self.evicted_files),
            evicted_bytes: g(&self.evicted_bytes),
        }
    }
}

/// A candidate data file: its id, size in the store, live bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileUse {
    pub id: u64,
    pub size: u64,
    pub live: u64,
}

fn tier(size: u64, fan: u64) -> u32 {
    let (mut t, mut limit) = (0, TIER_BASE);
    while size >= limit {
        t += 1;
        limit = limit.saturating_mul(fan);
    }
    t
}

/// Which files one round rewrites (in rewrite order).
pub(crate) fn plan(files: &[FileUse], max_file_size: u64, opts: &CompactOptions) -> Vec<u64> {
    let fan = opts.min_files.max(2);
    let mut dead: Vec<&FileUse> = files
        .iter()
        .filter(|f| f.size > HEADER_SIZE && (f.live as f64) < opts.dead_ratio * f.size as f64)
        .collect();
    dead.sort_by(|a, b| {
        let ra = a.live as f64 / a.size as f64;
        let rb = b.live as f64 / b.size as f64;
        ra.total_cmp(&rb).then(a.id.cmp(&b.id))
    });
    let dead_ids: HashSet<u64> = dead.iter().map(|f| f.id).collect();
    let mut tiers: BTreeMap<u32, Vec<&FileUse>> = BTreeMap::new();
    for f in files {
        if !dead_ids.contains(&f.id) && f.size < max_file_size / 2 {
            tiers.entry(tier(f.size, fan as u64)).or_default().push(f);
        }
    }
    let mut chosen: Vec<&FileUse> = dead;
    for (_, mut group) in tiers {
        if group.len() >= fan {
            group.sort_by_key(|f| (f.size, f.id));
            chosen.extend(group);
        }
    }
    let mut out = Vec::new();
    let mut bytes = 0u64;
    for f in chosen {
        if !out.is_empty() && bytes + f.size > opts.max_round_bytes {
            break;
        }
        bytes += f.size;
        out.push(f.id);
    }
    // Copying one file that is not mostly dead into one new file gains nothing.
    if out.len() == 1 && !dead_ids.contains(&out[0]) {
        out.clear();
    }
    out
}

impl S4db {
    /// Removes published data files from the local directory, least
    /// recently read first, until its data files take at most `cap` bytes
    /// (they are read from the store from then on). Unpublished files (the
    /// writes not uploaded yet, the file being appended to) are never
    /// removed. Returns the files and bytes removed.
    pub fn evict_local(&self, cap: u64) -> Result<(u64, u64)> {
        let (local, keep, referenced) = {
            let state = self.state();
            let Some(local) = state.local.clone() else {
                return Ok((0, 0));
            };
            let mut keep: HashSet<u64> = state
                .files
                .iter()
                .filter(|(_, f)| !f.published)
                .map(|(id, _)| *id)
                .collect();
            keep.extend(state.active.as_ref().map(|a| a.id));
            // Whatever a restart would replay stays too.
            keep.extend(local.pending()?);
            (local, keep, state.referenced_files())
        };
        let (n, bytes) = local.evict(cap, &keep, &referenced)?;
        if n > 0 {
            let c = &self.inner.counters;
            c.evicted_files.fetch_add(n, Ordering::Relaxed);
            c.evicted_bytes.fetch_add(bytes, Ordering::Relaxed);
            tracing::info!("local cache: evicted {n} published data files ({bytes} bytes)");
        }
        Ok((n, bytes))
    }

    /// Bytes of data files in the local directory (0 without one).
    pub fn local_data_bytes(&self) -> Result<u64> {
        match self.state().local.clone() {
            Some(l) => Ok(l.data_files()?.iter().map(|(_, s)| s).sum()),
            None => Ok(0),
        }
    }

    /// Totals of maintenance since open.
    pub fn maintenance_stats(&self) -> MaintenanceStats {
        self.inner.counters.snapshot()
    }

    /// One bounded round of incremental compaction (module doc): merges
    /// small files of a size tier once `min_files` of them exist, rewrites
    /// mostly dead files, retires own files nothing references, and commits.
    /// Replaced objects are deleted by [`S4db::gc`] after its grace period.
    /// Writes made during the round are published by its commit.
    ///
    /// # Errors
    /// [`Error::Unsynced`] when writes are not uploaded yet (upload first);
    /// [`Error::Store`] when the store fails (the copies are then published
    /// by the next upload, which also commits the moves).
    pub async fn compact_round(&self, opts: &CompactOptions) -> Result<RoundReport> {
        let _serial = self.inner.maintenance.lock().await;
        self.compact_round_locked(opts).await
    }

    pub(crate) async fn compact_round_locked(&self, opts: &CompactOptions) -> Result<RoundReport> {
        let counters = &self.inner.counters;
        counters.rounds.fetch_add(1, Ordering::Relaxed);
        let mut report = RoundReport::default();
        // Live bytes per referenced file, and own files nothing references.
        let (live, own_dead) = {
            let state = self.state();
            if state.index_rewritten || (state.has_unsynced() && !opts.publish_unsynced) {
                return Err(Error::Unsynced(
                    "upload before compacting (a round starts when nothing is unsynced)".into(),
                ));
            }
            let mut live: HashMap<u64, u64> = HashMap::new();
            for l in state.index.entries.values() {
                *live.entry(l.file_id).or_default() += l.length as u64;
            }
            let shadowed = state.shadowed_files();
            let own_dead: Vec<u64> = state
                .files
                .iter()
                .filter(|(id, f)| f.published && !live.contains_key(id) && !shadowed.contains(id))
                .map(|(id, _)| *id)
                .collect();
            (live, own_dead)
        };
        let listed: HashMap<u64, u64> = self
            .list_data_objects()
            .await?
            .into_iter()
            .map(|(id, o)| (id, o.size))
            .collect();
        let uses: Vec<FileUse> = live
            .iter()
            .filter_map(|(id, live)| {
                Some(FileUse {
                    id: *id,
                    size: *listed.get(id)?,
                    live: *live,
                })
            })
            .collect();
        let chosen = plan(&uses, self.inner.opts.max_file_size, opts);
        let mut retire: Vec<u64> = own_dead;
        if !chosen.is_empty() {
            self.merge_files(&chosen, &uses, &mut report).await?;
            retire.extend(&chosen);
        }
        if retire.is_empty() {
            return Ok(report);
        }
        let names: Vec<String> = retire.iter().map(|id| data_file_name(*id)).collect();
        self.retire(&names).await?;
        report.files_retired = retire.len();
        if !report.moves.is_empty() || self.state().has_unsynced() {
            self.upload_locked().await?;
        }
        // Committed: the replaced files are dead here (their objects stay
        // for the grace period), and so are their records.
        let local = self.state().local.clone();
        {
            let mut state = self.state();
            let gone: HashSet<u64> = retire.iter().copied().collect();
            for id in &retire {
                state.files.remove(id);
            }
            let mut dropped = false;
            state.attrs.prune_spare(|_, r| {
                let keep = !gone.contains(&r.loc.file_id);
                dropped |= !keep;
                keep
            });
            state.attrs_object_stale |= dropped;
        }
        if let Some(local) = local {
            for id in &retire {
                local.remove(*id)?;
            }
        }
        counters.compactions.fetch_add(1, Ordering::Relaxed);
        counters
            .files_merged
            .fetch_add(report.files_merged as u64, Ordering::Relaxed);
        counters
            .bytes_read
            .fetch_add(report.bytes_read, Ordering::Relaxed);
        counters
            .bytes_written
            .fetch_add(report.bytes_written, Ordering::Relaxed);
        counters
            .files_retired
            .fetch_add(report.files_retired as u64, Ordering::Relaxed);
        counters
            .last_compaction
            .store(super::retired::unix_now(), Ordering::Relaxed);
        tracing::info!(
            "compaction: {} files merged into {} ({} bytes read, {} written, {} keys moved), {} retired",
            report.files_merged,
            report.files_written,
            report.bytes_read,
            report.bytes_written,
            report.keys_moved,
            report.files_retired
        );
        Ok(report)
    }

    /// Copies the live entries of `chosen` into new files and applies the
    /// moves (uncommitted) to the state.
    async fn merge_files(
        &self,
        chosen: &[u64],
        uses: &[FileUse],
        report: &mut RoundReport,
    ) -> Result<()> {
        let set: HashSet<u64> = chosen.iter().copied().collect();
        let mut by_file: BTreeMap<u64, Vec<(u64, u32, String)>> = BTreeMap::new();
        {
            let state = self.state();
            for (k, l) in &state.index.entries {
                if set.contains(&l.file_id) {
                    by_file
                        .entry(l.file_id)
                        .or_default()
                        .push((l.offset, l.length, k.to_string()));
                }
            }
        }
        let sizes: HashMap<u64, u64> = uses.iter().map(|u| (u.id, u.size)).collect();
        // Bring the files here (whole objects: one GET each).
        let need: BTreeMap<u64, u64> = chosen
            .iter()
            .map(|id| (*id, sizes.get(id).copied().unwrap_or(0)))
            .collect();
        self.fetch_files(need).await?;
        let local = self.local_dir()?;
        report.bytes_read = chosen.iter().filter_map(|id| sizes.get(id)).sum();
        let max = self.inner.opts.max_file_size;
        let mut out: Option<(u64, std::fs::File, u64)> = None;
        let mut written: Vec<(u64, u64)> = Vec::new();
        let mut moves: Vec<(String, Location, Location)> = Vec::new();
        let copied = (|| -> Result<()> {
            for id in chosen {
                let Some(entries) = by_file.get_mut(id) else {
                    continue;
                };
                entries.sort_unstable();
                let name = data_file_name(*id);
                for (offset, length, key) in entries.iter() {
                    let old = Location {
                        file_id: *id,
                        offset: *offset,
                        length: *length,
                    };
                    let bytes = local.read_at(*id, *offset, *length)?.ok_or_else(|| {
                        FormatError::new(
                            &name,
                            *offset,
                            Corruption::Truncated {
                                need: *offset + *length as u64,
                                have: local.size_of(*id).ok().flatten().unwrap_or(0),
                            },
                        )
                    })?;
                    // Never propagate corruption.
                    super::decode_live(key, old, &bytes)?;
                    let roll = match &out {
                        None => true,
                        Some((_, _, len)) => *len > HEADER_SIZE && len + *length as u64 > max,
                    };
                    if roll {
                        if let Some((nid, f, len)) = out.take() {
                            f.sync_all()
                                .map_err(|e| Error::io("sync", local.file_path(nid), e))?;
                            written.push((nid, len));
                        }
                        let nid = {
                            let mut state = self.state();
                            state.seq += 1;
                            let nid = file_id(self.writer_id(), state.seq);
                            state.files.insert(
                                nid,
                                OwnFile {
                                    published: false,
                                    unconditional: false,
                                    compacted: true,
                                },
                            );
                            nid
                        };
                        let f = local.create_data_file(nid, &encode_file_header(nid))?;
                        out = Some((nid, f, HEADER_SIZE));
                    }
                    let (nid, f, len) = out.as_mut().expect("opened above");
                    f.write_all(&bytes)
                        .map_err(|e| Error::io("write", local.file_path(*nid), e))?;
                    let new = Location {
                        file_id: *nid,
                        offset: *len,
                        length: *length,
                    };
                    *len += *length as u64;
                    moves.push((key.clone(), old, new));
                }
            }
            if let Some((nid, f, len)) = out.take() {
                f.sync_all()
                    .map_err(|e| Error::io("sync", local.file_path(nid), e))?;
                written.push((nid, len));
            }
            Ok(())
        })();
        if let Err(e) = copied {
            // Nothing was published: drop the partial copies.
            let mut state = self.state();
            let mine: Vec<u64> = state
                .files
                .iter()
                .filter(|(_, f)| f.compacted && !f.published)
                .map(|(id, _)| *id)
                .collect();
            for id in mine {
                state.files.remove(&id);
                let _ = local.remove(id);
            }
            return Err(e);
        }
        report.files_merged = chosen.len();
        report.files_written = written.len();
        report.bytes_written = written.iter().map(|(_, l)| l).sum();
        // Move what nobody rewrote meanwhile; records follow their entries.
        let mut state = self.state();
        for (key, old, new) in &moves {
            let here = state.index.entries.get(key.as_str()).copied();
            if !here.is_some_and(|l| super::attrs::same_entry(l, *old)) {
                continue;
            }
            state.index.entries.insert(key.as_str().into(), *new);
            if let Some(r) = state.attrs.record_at(key, *old).cloned() {
                let rec = AttrRecord {
                    loc: *new,
                    crc: r.crc,
                    attrs: r.attrs,
                };
                state.record_attr(AttrKey::File(key.clone()), AttrChange::File(Some(rec)));
            }
            state.moves.insert(key.clone(), (*old, *new));
        }
        state.flush_attr_log();
        report.keys_moved = state.moves.len();
        report.moves = moves
            .into_iter()
            .filter(|(k, _, _)| state.moves.contains_key(k))
            .collect();
        if report.moves.is_empty() {
            // Everything was rewritten meanwhile: the copies are dead already,
            // but they are files of ours to publish (and retire next round).
            tracing::debug!("compaction: every key moved meanwhile");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(id: u64, size: u64, live: u64) -> FileUse {
        FileUse { id, size, live }
    }

    #[test]
    fn tiers_merge_at_the_fan_in_and_dead_files_are_rewritten() {
        let opts = CompactOptions::default();
        let max = 64 << 20;
        // Three small files: not yet.
        let small: Vec<FileUse> = (1..=3).map(|i| f(i, 200, 200)).collect();
        assert!(plan(&small, max, &opts).is_empty());
        // Four: merged, smallest first.
        let mut four = small.clone();
        four.push(f(4, 100, 100));
        assert_eq!(plan(&four, max, &opts), vec![4, 1, 2, 3]);
        // A big file next to them is left alone.
        four.push(f(5, 40 << 20, 40 << 20));
        assert_eq!(plan(&four, max, &opts).len(), 4);
        // Files of another tier do not count towards this one.
        let mixed = vec![
            f(1, 100, 100),
            f(2, 100, 100),
            f(3, 1 << 20, 1 << 20),
            f(4, 1 << 20, 1 << 20),
        ];
        assert!(plan(&mixed, max, &opts).is_empty());
        // A mostly dead big file is rewritten alone.
        let dead = vec![f(7, 60 << 20, 1 << 20), f(8, 60 << 20, 59 << 20)];
        assert_eq!(plan(&dead, max, &opts), vec![7]);
        // The round's read budget bounds the work (at least one file).
        let tight = CompactOptions {
            max_round_bytes: 250,
            ..CompactOptions::default()
        };
        let four: Vec<FileUse> = (1..=4).map(|i| f(i, 100, 100)).collect();
        assert_eq!(plan(&four, max, &tight), vec![1, 2]);
    }
}
