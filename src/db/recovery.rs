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
