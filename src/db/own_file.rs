//! A large value in a data file of its own, whose parts went up to the store
//! while the value was still being written.
//!
//! The filesystem sends the complete parts of a large file as they are
//! written (a multipart upload started ahead, see `fs::write_behind`), so
//! publishing it later sends only the first part (file and entry headers),
//! the last (the CRC) and any part rewritten meanwhile. For that the parts
//! must be cut from the data file the value will be in, before that file
//! exists: the value goes into a data file of its own, whose id is reserved
//! when the parts start ([`S4db::reserve_file_id`]) and whose layout is
//! fixed by the key ([`S4db::own_file_value_offset`]).
//!
//! Order: a writer's later files must never hold an older version of a key
//! (recovery replays and `rebuild-index` scans by file order). A reserved
//! id is older than every file rolled after it, so the put refuses it (and
//! writes the value the usual way) when the index already names the key in
//! a later file, which only a compaction running meanwhile can do: every
//! other put of the key goes through the same open file, which uses or drops
//! its reservation.
//!
//! The filesystem lays the value out as that data file while it is written,
//! so the put writes the headers and the CRC around it and links the file
//! into place ([`S4db::put_own_file_in_place`]); other callers copy the
//! value in ([`S4db::put_own_file`]).
//!
//! Parts may still be on their way when the value is put (a close does not
//! wait for S3); the upload waits for them. Nothing trusts them blindly:
//! while the value is copied into its data file, the CRC-32 of each part's
//! place is computed, and the upload keeps only the parts whose sent bytes
//! have that CRC; a part that differs is sent again.

use super::{attrs, state::OwnFile, LocalDir, S4db};
use crate::error::{Error, Result};
use crate::format::{encode_file_header, Location, ENTRY_OVERHEAD, HEADER_SIZE};
use crate::remote::{EarlyUpload, SentPart};
use futures::future::BoxFuture;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Bytes of an entry before its key: flags, key length, value length.
const ENTRY_HEAD: u64 = 9;

/// A multipart upload started ahead for reserved data file `file_id`,
/// whose parts may still be on their way.
pub struct PartsAhead {
    pub file_id: u64,
    pub upload_id: String,
    /// Every part but the last has exactly this size.
    pub part_size: u64,
    /// Resolves to the parts sent, once every part still on its way has
    /// landed or failed.
    pub sent: BoxFuture<'static, Vec<SentPart>>,
    /// Set to stop sending parts (the upload is being aborted).
    pub stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for PartsAhead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartsAhead")
            .field("file_id", &self.file_id)
            .field("upload_id", &self.upload_id)
            .field("part_size", &self.part_size)
            .finish_non_exhaustive()
    }
}

/// Parts ahead of an unpublished own file, with the CRC each part must have.
#[derive(Debug)]
pub(crate) struct PendingParts {
    ahead: PartsAhead,
    /// CRC-32 of the data file's bytes at each part wholly inside the value.
    expected: HashMap<i32, u32>,
}

impl PendingParts {
    /// Waits for the parts still on their way and keeps those that hold the
    /// data file's bytes at their place; the others are sent again.
    pub(crate) async fn settle(self) -> EarlyUpload {
        let PendingParts { ahead, expected } = self;
        let sent = ahead.sent.await;
        let count = sent.len();
        let parts: Vec<SentPart> = sent
            .into_iter()
            .filter(|p| expected.get(&p.number) == Some(&p.crc))
            .collect();
        if parts.len() < count {
            tracing::debug!(
                "{} of {count} parts sent ahead for data file {:x} differ from it; they are sent again",
                count - parts.len(),
                ahead.file_id
            );
        }
        EarlyUpload {
            upload_id: ahead.upload_id,
            part_size: ahead.part_size,
            parts,
        }
    }
}

impl S4db {
    /// Takes the next file id of this writer for a value that will be the
    /// only entry of its data file ([`S4db::put_own_file`]). An id never
    /// used leaves a gap in the sequence, which nothing minds.
    pub fn reserve_file_id(&self) -> Result<u64> {
        let mut state = self.state();
        state.seq = state.seq.checked_add(1).ok_or_else(|| {
            Error::Usage("this writer ran out of file sequence numbers; reopen the database".into())
        })?;
        Ok(crate::format::file_id(self.inner.writer_id, state.seq))
    }

    /// Where the value of `key` starts in a data file holding only it.
    pub fn own_file_value_offset(key: &str) -> u64 {
        HEADER_SIZE + ENTRY_HEAD + key.len() as u64
    }

    /// Puts a value of `len` bytes read from `src` as the only entry of data
    /// file `ahead.file_id` (reserved with [`S4db::reserve_file_id`]), as
    /// [`S4db::put_from_reader`] does otherwise. The next upload waits for
    /// the parts still on their way, keeps those whose bytes match the file
    /// (their CRCs are computed here, while the value is copied) and sends
    /// the rest.
    ///
    /// When the reservation cannot be used (the file exists, or the index
    /// names the key in a later file of this writer), the early upload is
    /// aborted and the value put the usual way.
    pub fn put_own_file(
        &self,
        key: &str,
        src: &mut impl Read,
        len: u64,
        binary: bool,
        attrs: Option<attrs::Attrs>,
        ahead: PartsAhead,
    ) -> Result<Location> {
        let file_id = ahead.file_id;
        let entry_len = checked_entry_len(key, len)?;
        let Some(local) = self.claim_reservation(key, file_id)? else {
            self.abort_early_upload(ahead);
            return self.put_from_reader(key, src, len, binary, attrs);
        };
        // Written beside its final name and moved there whole, with no lock
        // held: nothing knows the file until it is recorded below.
        let mut tmp = local.temp_file()?;
        let value_offset = Self::own_file_value_offset(key);
        let mut parts = PartCrcs {
            src,
            hashes: PartHashes::new(value_offset, len, ahead.part_size),
        };
        let written = (|| {
            let mut out = std::io::BufWriter::with_capacity(256 * 1024, tmp.as_file_mut());
            out.write_all(&encode_file_header(file_id))?;
            crate::format::write_raw_entry(&mut out, key, &mut parts, len as u32, binary)?;
            out.flush()
        })();
        let installed = written
            .map_err(|e| Error::io("write", local.file_path(file_id), e))
            .and_then(|()| local.install(tmp, file_id));
        if let Err(e) = installed {
            self.abort_early_upload(ahead);
            return Err(e);
        }
        let expected = parts.hashes.finish();
        Ok(self.record_own_file(key, entry_len, attrs, ahead, expected))
    }

    /// [`S4db::put_own_file`] for a value already laid out as its data file:
    /// `file` (named `path`, on the local directory's file system) holds it
    /// from [`S4db::own_file_value_offset`] on. The headers and the CRC are
    /// written around it and the file is linked into place: the value is
    /// read once (for the CRCs), never copied. `Ok(None)` when the
    /// reservation cannot be used: the early upload is aborted and the
    /// caller puts the value the usual way.
    #[allow(clippy::too_many_arguments)]
    pub fn put_own_file_in_place(
        &self,
        key: &str,
        file: &std::fs::File,
        path: &std::path::Path,
        len: u64,
        binary: bool,
        attrs: Option<attrs::Attrs>,
        ahead: PartsAhead,
    ) -> Result<Option<Location>> {
        let file_id = ahead.file_id;
        let entry_len = checked_entry_len(key, len)?;
        let Some(local) = self.claim_reservation(key, file_id)? else {
            self.abort_early_upload(ahead);
            return Ok(None);
        };
        let value_offset = Self::own_file_value_offset(key);
        let mut hashes = PartHashes::new(value_offset, len, ahead.part_size);
        let written = (|| {
            use std::os::unix::fs::FileExt;
            let head = crate::format::raw_entry_head(key, len as u32, binary);
            let mut crc = crc32fast::Hasher::new();
            crc.update(&head);
            let mut buf = vec![0u8; 256 * 1024];
            let mut at = value_offset;
            while at < value_offset + len {
                let n = buf.len().min((value_offset + len - at) as usize);
                file.read_exact_at(&mut buf[..n], at)?;
                crc.update(&buf[..n]);
                hashes.take(&buf[..n]);
                at += n as u64;
            }
            file.write_all_at(&encode_file_header(file_id), 0)?;
            file.write_all_at(&head, HEADER_SIZE)?;
            file.write_all_at(&crc.finalize().to_be_bytes(), value_offset + len)?;
            file.set_len(value_offset + len + 4)
        })();
        let linked = written
            .map_err(|e| Error::io("write", path, e))
            .and_then(|()| local.link(path, file_id));
        if let Err(e) = linked {
            self.abort_early_upload(ahead);
            return Err(e);
        }
        Ok(Some(self.record_own_file(
            key,
            entry_len,
            attrs,
            ahead,
            hashes.finish(),
        )))
    }

    /// Checks that reserved `file_id` may hold `key`'s newest value and
    /// records it as pending; `None` when it may not (see the module doc).
    fn claim_reservation(&self, key: &str, file_id: u64) -> Result<Option<Arc<LocalDir>>> {
        let mut state = self.state();
        let later = state
            .index
            .entries
            .get(key)
            .is_some_and(|l| l.file_id > file_id && l.file_id >> 32 == file_id >> 32);
        if later || state.files.contains_key(&file_id) {
            return Ok(None);
        }
        let local = self.local_dir_locked(&mut state)?;
        local.add_pending(file_id)?;
        Ok(Some(local))
    }

    /// Records the own file in place: the key's entry, its attributes and
    /// the parts the next upload finishes.
    fn record_own_file(
        &self,
        key: &str,
        entry_len: u64,
        attrs: Option<attrs::Attrs>,
        ahead: PartsAhead,
        expected: HashMap<i32, u32>,
    ) -> Location {
        let file_id = ahead.file_id;
        let loc = Location {
            file_id,
            offset: HEADER_SIZE,
            length: entry_len as u32,
        };
        let mut state = self.state();
        state.files.insert(
            file_id,
            OwnFile {
                published: false,
                unconditional: false,
                compacted: false,
            },
        );
        state
            .early_uploads
            .insert(file_id, PendingParts { ahead, expected });
        state.record(key.to_string(), Some(loc));
        if let Some(a) = attrs {
            attrs::set_record(&mut state, key, loc, a);
        }
        state.flush_attr_log();
        loc
    }

    /// Aborts a multipart upload started ahead for data file `file_id` that
    /// will not be finished (in the background: nothing waits on it; what
    /// fails to abort, gc aborts later).
    pub fn abort_early_upload(&self, ahead: PartsAhead) {
        ahead.stop.store(true, Ordering::Relaxed);
        let store = self.inner.store.clone();
        let key = self.object_key(&crate::format::data_file_name(ahead.file_id));
        let upload_id = ahead.upload_id.clone();
        let abort = async move {
            if let Err(e) = store.abort_multipart_upload(&key, &upload_id).await {
                tracing::warn!("{e}; gc aborts the upload later");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(abort);
            }
            Err(_) => tracing::warn!(
                "multipart upload {} of data file {:x} left unfinished (no runtime to abort it on); gc aborts it later",
                ahead.upload_id,
                ahead.file_id
            ),
        }
    }
}

/// The CRC-32 of each part of a data file that lies wholly inside the
/// value, computed as the value's bytes go by in order.
struct PartHashes {
    /// Where the value starts in the data file, and its end.
    value_offset: u64,
    value_end: u64,
    part_size: u64,
    /// Data-file offset of the next byte.
    at: u64,
    current: crc32fast::Hasher,
    crcs: HashMap<i32, u32>,
}

impl PartHashes {
    fn new(value_offset: u64, len: u64, part_size: u64) -> Self {
        PartHashes {
            value_offset,
            value_end: value_offset + len,
            part_size: part_size.max(1),
            at: value_offset,
            current: crc32fast::Hasher::new(),
            crcs: HashMap::new(),
        }
    }

    /// The CRC of every part wholly inside the value, by part number.
    fn finish(self) -> HashMap<i32, u32> {
        self.crcs
    }

    fn take(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let part_start = self.at / self.part_size * self.part_size;
            let part_end = part_start + self.part_size;
            let n = bytes.len().min((part_end - self.at) as usize);
            self.current.update(&bytes[..n]);
            self.at += n as u64;
            bytes = &bytes[n..];
            if self.at == part_end {
                let crc = std::mem::take(&mut self.current).finalize();
                if part_start >= self.value_offset && part_end <= self.value_end {
                    self.crcs
                        .insert((part_start / self.part_size) as i32 + 1, crc);
                }
            }
        }
    }
}

/// Passes a value through, hashing its parts.
struct PartCrcs<'a, R> {
    src: &'a mut R,
    hashes: PartHashes,
}

impl<R: Read> Read for PartCrcs<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.src.read(buf)?;
        self.hashes.take(&buf[..n]);
        Ok(n)
    }
}

/// The length of an entry holding a raw value of `len` bytes under `key`,
/// or the error that it is too large for the format.
pub(crate) fn checked_entry_len(key: &str, len: u64) -> Result<u64> {
    let entry_len = len + key.len() as u64 + ENTRY_OVERHEAD;
    if entry_len > u32::MAX as u64 {
        return Err(Error::ValueTooLarge {
            key: key.chars().take(80).collect(),
            len,
        });
    }
    Ok(entry_len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_crcs_cover_only_parts_inside_the_value() {
        // Value at data-file offset 5, 40 bytes: parts of 10 bytes.
        let value: Vec<u8> = (0..40u8).collect();
        let mut src = &value[..];
        let mut parts = PartCrcs {
            src: &mut src,
            hashes: PartHashes::new(5, 40, 10),
        };
        let mut sink = Vec::new();
        let mut buf = [0u8; 7];
        loop {
            let n = parts.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            sink.extend_from_slice(&buf[..n]);
        }
        assert_eq!(sink, value);
        let crcs = parts.hashes.finish();
        // Part 1 [0, 10) holds header bytes, part 5 [40, 50) runs past the end.
        let mut numbers: Vec<i32> = crcs.keys().copied().collect();
        numbers.sort();
        assert_eq!(numbers, [2, 3, 4]);
        assert_eq!(crcs[&2], crc32fast::hash(&value[5..15]));
        assert_eq!(crcs[&4], crc32fast::hash(&value[25..35]));
    }
}
