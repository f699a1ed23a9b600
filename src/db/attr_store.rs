//! Loading the attribute object: GET, decode, select records against the
//! index, and re-bind records to entries that another writer copied
//! unchanged (the Python package's compaction).
//!
//! Re-binding: the Python package (0.10.0) compacts by copying each live
//! entry's bytes unchanged into new files, so a key's entry moves to a new
//! (file, offset) with the same length and the same bytes. A record whose
//! key now sits at a different entry is re-bound to it when all of these
//! hold: no record of the key matches its current entry, the record's own
//! entry is in a data file the index no longer references (the file was
//! compacted away, not merely overwritten in part), the lengths are equal,
//! and the current entry's CRC (its last 4 bytes) equals the CRC the record
//! saved. The CRCs are read when the object is loaded (open, refresh,
//! rebase): a `pread` for local files, else one range GET per data file that
//! holds candidates, spanning them.

use super::attr_codec::{decode_object, AttrObject, ATTRS_NAME};
use super::attrs::{same_entry, AttrChange, AttrKey, AttrRecord, AttrTable};
use super::S4db;
use crate::error::Result;
use crate::format::{data_file_name, FormatError, Location};
use crate::remote::{ObjectStore, StoreError};
use futures::StreamExt;
use std::collections::{BTreeMap, HashSet};

/// What a GET of the attribute object found.
#[derive(Debug)]
pub(crate) enum FetchedAttrs {
    Absent,
    Corrupt { etag: String, error: FormatError },
    Found { object: AttrObject, etag: String },
}

/// GETs and decodes `<prefix>s4db.attrs`.
pub(crate) async fn fetch_attr_object(
    store: &dyn ObjectStore,
    prefix: &str,
) -> Result<FetchedAttrs> {
    let key = format!("{prefix}{ATTRS_NAME}");
    match store.get(&key).await {
        Ok(got) => Ok(match decode_object(&key, &got.data) {
            Ok(object) => FetchedAttrs::Found {
                object,
                etag: got.etag,
            },
            Err(error) => FetchedAttrs::Corrupt {
                etag: got.etag,
                error,
            },
        }),
        Err(StoreError::NotFound { .. }) => Ok(FetchedAttrs::Absent),
        Err(e) => Err(e.into()),
    }
}

impl S4db {
    /// GETs the attribute object and builds its table against the visible
    /// index (see [`S4db::load_attrs`]).
    pub(crate) async fn fetch_attrs(&self) -> Result<(AttrTable, Option<String>, u64)> {
        let fetched = fetch_attr_object(self.inner.store.as_ref(), self.prefix()).await?;
        Ok(self.load_attrs(fetched).await)
    }

    /// The table of a fetched attribute object, records selected against
    /// the visible index and re-bound where an entry was copied unchanged.
    /// A corrupt object is reported and read as an empty table (its ETag is
    /// kept, so the next attribute commit replaces it): the values are
    /// untouched and keys show the defaults.
    pub(crate) async fn load_attrs(
        &self,
        fetched: FetchedAttrs,
    ) -> (AttrTable, Option<String>, u64) {
        let (object, etag) = match fetched {
            FetchedAttrs::Absent => return (AttrTable::default(), None, 0),
            FetchedAttrs::Corrupt { etag, error } => {
                tracing::warn!(
                    "{error}; opening without attributes (every key and directory shows the \
                     defaults; values are not affected). The next attribute change replaces the object."
                );
                return (AttrTable::default(), Some(etag), 0);
            }
            FetchedAttrs::Found { object, etag } => (object, etag),
        };
        let generation = object.generation;
        let (mut table, candidates) = {
            let state = self.state();
            let index = &state.index.entries;
            let table =
                AttrTable::from_records(object.files, object.dirs, |k| index.get(k).copied());
            let referenced: HashSet<u64> = index.values().map(|l| l.file_id).collect();
            let mut candidates = Vec::new();
            for key in table.files.keys() {
                let Some(now) = index.get(key) else {
                    continue;
                };
                if table.record_at(key, *now).is_some() {
                    continue;
                }
                let fits = table.records_of(key).find(|r| {
                    r.crc.is_some()
                        && r.loc.length == now.length
                        && !referenced.contains(&r.loc.file_id)
                });
                if let Some(r) = fits {
                    candidates.push((key.to_string(), *now, r.clone()));
                }
            }
            (table, candidates)
        };
        if !candidates.is_empty() {
            let locs: Vec<Location> = candidates.iter().map(|(_, l, _)| *l).collect();
            let crcs = self.read_entry_crcs(&locs).await;
            let mut rebound = 0usize;
            for ((key, now, old), crc) in candidates.into_iter().zip(crcs) {
                if crc.is_some() && crc == old.crc {
                    let rec = AttrRecord {
                        loc: now,
                        crc,
                        attrs: old.attrs.clone(),
                    };
                    table.apply(&AttrKey::File(key.clone()), &AttrChange::File(Some(rec)));
                    table.prune_spare(|k, r| k != key || !same_entry(r.loc, old.loc));
                    rebound += 1;
                }
            }
            if rebound > 0 {
                tracing::info!("{rebound} attribute records followed their entries to new places");
            }
        }
        (table, Some(etag), generation)
    }

    /// The CRC (last 4 bytes) of each entry at `locs`, `None` where it could
    /// not be read: local files first, else one range GET per data file.
    pub(crate) async fn read_entry_crcs(&self, locs: &[Location]) -> Vec<Option<u32>> {
        let local = self.state().local.clone();
        let mut out = vec![None; locs.len()];
        let mut remote: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
        for (i, l) in locs.iter().enumerate() {
            let Some(end) = (l.offset + l.length as u64).checked_sub(4) else {
                continue;
            };
            match local
                .as_ref()
                .and_then(|d| d.read_at(l.file_id, end, 4).ok().flatten())
            {
                Some(b) => out[i] = Some(u32::from_be_bytes(b[..4].try_into().expect("4"))),
                None => remote.entry(l.file_id).or_default().push(i),
            }
        }
        let gets = futures::stream::iter(remote.into_iter().map(|(file_id, idx)| async move {
            let start = idx
                .iter()
                .map(|&i| locs[i].offset + locs[i].length as u64 - 4)
                .min()
                .expect("non-empty");
            let end = idx
                .iter()
                .map(|&i| locs[i].offset + locs[i].length as u64)
                .max()
                .expect("non-empty");
            let key = self.object_key(&data_file_name(file_id));
            let got = self.inner.store.get_range(&key, start, end - start).await;
            (idx, start, got)
        }))
        .buffer_unordered(self.inner.opts.concurrency.clamp(1, 8));
        futures::pin_mut!(gets);
        while let Some((idx, start, got)) = gets.next().await {
            let bytes = match got {
                Ok(b) => b,
                Err(e) => {
                    tracing::debug!("reading entry CRCs: {e}");
                    continue;
                }
            };
            for i in idx {
                let at = (locs[i].offset + locs[i].length as u64 - 4 - start) as usize;
                if let Some(b) = bytes.get(at..at + 4) {
                    out[i] = Some(u32::from_be_bytes(b.try_into().expect("4")));
                }
            }
        }
        out
    }
}
