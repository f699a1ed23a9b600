//! Several entries of one remote data file in one range GET.
//!
//! A value is normally fetched alone: one range GET of exactly its entry. When
//! a caller knows it will want the entries around it too (the mount renaming
//! the files of a directory one `mv` at a time, each needing its value to
//! re-put it), one GET spanning them all replaces a round trip per entry.

use super::{decode_live, S4db};
use crate::error::Result;
use crate::format::{data_file_name, Location, Value};

/// Gaps between wanted entries larger than this end a span: fetching what
/// lies between would cost more than another request saves.
const MAX_GAP: u64 = 64 * 1024;

impl S4db {
    /// The values of `entries` (key and location, all in data file `file_id`),
    /// read from a local copy when there is one, else with one range GET per
    /// span of nearby entries. An entry that cannot be decoded (corrupt, or
    /// no longer that key's) comes back as an error in its own slot only.
    pub async fn get_at_many(
        &self,
        file_id: u64,
        entries: &[(String, Location)],
    ) -> Result<Vec<Result<Value>>> {
        debug_assert!(entries.iter().all(|(_, l)| l.file_id == file_id));
        let local = self.state().local.clone();
        let wanted_end = entries
            .iter()
            .map(|(_, l)| l.offset + l.length as u64)
            .max();
        let here = match &local {
            Some(dir) => dir.size_of(file_id)?.is_some_and(|n| Some(n) >= wanted_end),
            None => false,
        };
        if here {
            // Local preads are cheaper than any span.
            let mut out = Vec::with_capacity(entries.len());
            for (key, loc) in entries {
                out.push(self.get_at(key, *loc).await);
            }
            return Ok(out);
        }
        let mut order: Vec<usize> = (0..entries.len()).collect();
        order.sort_by_key(|&i| entries[i].1.offset);
        let mut out: Vec<Option<Result<Value>>> = entries.iter().map(|_| None).collect();
        let object = self.object_key(&data_file_name(file_id));
        let mut i = 0;
        while i < order.len() {
            let start = entries[order[i]].1.offset;
            let mut end = start + entries[order[i]].1.length as u64;
            let mut j = i + 1;
            while j < order.len() && entries[order[j]].1.offset <= end + MAX_GAP {
                let l = entries[order[j]].1;
                end = end.max(l.offset + l.length as u64);
                j += 1;
            }
            let bytes = self
                .inner
                .store
                .get_range(&object, start, end - start)
                .await?;
            for &k in &order[i..j] {
                let (key, loc) = &entries[k];
                let from = (loc.offset - start) as usize;
                let slice = bytes.get(from..from + loc.length as usize).unwrap_or(&[]);
                out[k] = Some(decode_live(key, *loc, slice));
            }
            i = j;
        }
        Ok(out
            .into_iter()
            .map(|v| v.expect("every entry is in a span"))
            .collect())
    }
}
