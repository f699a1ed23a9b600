//! Crash recovery at open: replay the data files an earlier process wrote in
//! this local directory but never committed.
//!
//! Every entry that `put` returned for is in such a file (a killed process
//! loses nothing that reached the page cache). Replay stops at the first entry
//! that fails its checks, cuts the torn tail off, and applies what came before
//! as this instance's own unsynced writes, so the next upload publishes them.

use super::local_dir::LocalDir;
use super::state::{OwnFile, State};
use crate::error::{Error, Result};
use crate::format::{data_file_name, scan_entries, Location};
use std::collections::HashSet;

/// Runs with the state locked: it only touches local files.
pub(crate) fn replay_pending(state: &mut State, local: &LocalDir) -> Result<()> {
    let pending = local.pending()?;
    if pending.is_empty() {
        return Ok(());
    }
    let committed: HashSet<u64> = state.index.entries.values().map(|l| l.file_id).collect();
    for file_id in pending {
        let path = local.file_path(file_id);
        let name = data_file_name(file_id);
        // A file the index references was committed before the crash (uploads
        // seal files, so a file is committed whole or not at all).
        if committed.contains(&file_id) {
            continue;
        }
        let data = match std::fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io("read", &path, e)),
        };
        let scan = match scan_entries(&name, &data) {
            Ok(scan) => scan,
            Err(e) => {
                // Not even a header: created but never written. Nothing to replay.
                tracing::warn!("{}: {e}; set aside as {name}.bad", path.display());
                let _ = std::fs::rename(&path, path.with_extension("s4db.bad"));
                continue;
            }
        };
        if let Some(stop) = &scan.stopped {
            tracing::warn!(
                "{}: cutting torn tail of {} bytes ({stop})",
                path.display(),
                data.len() as u64 - scan.valid_len
            );
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|e| Error::io("open", &path, e))?;
            f.set_len(scan.valid_len)
                .map_err(|e| Error::io("truncate", &path, e))?;
            local.forget(file_id);
        }
        for entry in &scan.entries {
            let change = (!entry.tombstone).then_some(Location {
                file_id,
                offset: entry.offset,
                length: entry.length,
            });
            state.record(entry.key.clone(), change);
        }
        state.files.insert(
            file_id,
            OwnFile {
                published: false,
                unconditional: true,
                compacted: false,
            },
        );
        tracing::info!(
            "replayed {} unsynced entries from {}",
            scan.entries.len(),
            path.display()
        );
    }
    state.save_pending_list()
}

/// Replays `<local_dir>/attrs.journal` (after [`replay_pending`]): the
/// attribute changes an earlier process made and did not commit. A key's
/// record applies only if its entry is the key's current one after replay
/// (otherwise the value it described is gone or was never committed); a
/// torn tail is ignored.
pub(crate) fn replay_attr_log(state: &mut State, local: &LocalDir) -> Result<()> {
    use super::attrs::{same_entry, AttrChange, AttrKey};
    let path = local.path().join(super::attr_codec::JOURNAL_NAME);
    let data = match std::fs::read(&path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("read", &path, e)),
    };
    let (changes, valid) = super::attr_codec::decode_journal(&data);
    if valid < data.len() {
        tracing::warn!(
            "{}: ignoring a torn tail of {} bytes",
            path.display(),
            data.len() - valid
        );
    }
    let mut applied = 0usize;
    for (k, change) in changes {
        let applies = match (&k, &change) {
            (AttrKey::File(key), AttrChange::File(Some(rec))) => state
                .index
                .entries
                .get(key.as_str())
                .is_some_and(|l| same_entry(*l, rec.loc)),
            _ => true,
        };
        if applies {
            state.record_attr(k, change);
            applied += 1;
        }
    }
    if applied > 0 {
        tracing::info!(
            "replayed {applied} unsynced attribute changes from {}",
            path.display()
        );
    }
    Ok(())
}
