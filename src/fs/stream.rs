//! Large cold reads at S3's parallel bandwidth, served from memory: the
//! entry of a large raw value is fetched as parts by parallel range GETs (as
//! mountpoint-s3's prefetcher does) into a window that runs ahead of the
//! reader, and each read is copied out of the parts it covers. No temporary
//! file: bytes go from the socket to the reader, and memory is bounded by the
//! window (`parallelism` parts ahead of the reader, one behind it).
//!
//! The fetcher takes every part in order, so the entry CRC is still checked
//! as a whole: each part's CRC is kept as it arrives and the parts' CRCs are
//! combined once the last is in. A read that includes the value's last byte
//! waits for that check, so no read returns the end of a value whose CRC
//! failed: it fails with EIO, and the inode's page cache is not kept for the
//! next open (which then drops whatever pages the earlier reads filled).
//! A part read again after it left the window (a seek back) is fetched again
//! and must match the CRC it had the first time.

use crate::format::{data_file_name, Location, ENTRY_OVERHEAD, FLAG_RAW, FLAG_TOMBSTONE};
use crate::remote::ObjectStore;
use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// How large values are fetched (`--read-part-size`, `--max-threads`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamConfig {
    /// Bytes per range GET.
    pub part_size: u64,
    /// Range GETs in flight per file, and parts fetched ahead of its reader.
    pub parallelism: usize,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            part_size: 8 * 1024 * 1024,
            parallelism: 8,
        }
    }
}

/// A large value being read from its data file in S3. Dropping it (the
/// last handle closed) stops the fetch.
#[derive(Debug)]
pub struct Stream {
    shared: Arc<Shared>,
    fetcher: tokio::task::AbortHandle,
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.fetcher.abort();
    }
}

struct Shared {
    store: Arc<dyn ObjectStore>,
    object: String,
    /// Where the entry starts in its data file.
    entry_offset: u64,
    file_id: u64,
    /// Entry bytes before the value (flags, lengths, key).
    head_len: u64,
    value_len: u64,
    part_size: u64,
    parallelism: usize,
    state: Mutex<State>,
    changed: tokio::sync::Notify,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("object", &self.object)
            .field("entry_offset", &self.entry_offset)
            .field("value_len", &self.value_len)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct State {
    /// Parts in memory: the window ahead of the reader and one behind.
    held: BTreeMap<usize, Bytes>,
    /// The CRC of each part's bytes that the entry CRC covers, once fetched.
    crcs: Vec<Option<crc32fast::Hasher>>,
    /// The part the latest read started in.
    reader_at: usize,
    /// The furthest part a read has asked for: the fetcher runs up to
    /// `parallelism` parts past it.
    wanted: usize,
    verified: bool,
    failed: Option<String>,
}

/// Whether `part` is not more than one part behind the reader's part.
fn in_window(reader_at: usize, part: usize) -> bool {
    part + 1 >= reader_at
}

/// The first part of an entry, fetched to learn whether it can stream.
pub enum Opening {
    /// A raw value: the rest is being fetched. Carries whether it is binary.
    Streaming(Stream, bool),
    /// Not a raw value (compressed, or short): read it whole instead.
    Whole,
}

impl Stream {
    /// The value's length.
    pub fn len(&self) -> u64 {
        self.shared.value_len
    }

    pub fn is_empty(&self) -> bool {
        self.shared.value_len == 0
    }

    /// Up to `size` value bytes from `offset`, once the parts covering them
    /// are in (and, for a range that reaches the value's end, the entry CRC
    /// is checked).
    pub async fn read(&self, offset: u64, size: u64) -> Result<Vec<u8>, String> {
        let s = &self.shared;
        let end = offset.saturating_add(size).min(s.value_len);
        if offset >= end {
            return Ok(Vec::new());
        }
        let first = s.part_of(offset);
        let last = s.part_of(end - 1);
        s.update(|st| {
            st.reader_at = first;
            st.wanted = st.wanted.max(last);
            // Parts more than one behind the reader leave the window.
            st.held.retain(|part, _| in_window(st.reader_at, *part));
        });
        let mut out = Vec::with_capacity((end - offset) as usize);
        for part in first..=last {
            let bytes = s.part(part).await?;
            let part_start = part as u64 * s.part_size;
            // This part's share of [offset, end), in entry coordinates.
            let from = (s.head_len + offset).max(part_start);
            let to = (s.head_len + end).min(part_start + bytes.len() as u64);
            out.extend_from_slice(&bytes[(from - part_start) as usize..(to - part_start) as usize]);
        }
        if end == s.value_len {
            s.wait(|st| st.verified.then_some(())).await?;
        }
        Ok(out)
    }
}

impl Shared {
    fn entry_len(&self) -> u64 {
        self.head_len + self.value_len + 4
    }

    fn parts(&self) -> usize {
        self.entry_len().div_ceil(self.part_size) as usize
    }

    /// The part that holds value byte `offset`.
    fn part_of(&self, offset: u64) -> usize {
        ((self.head_len + offset) / self.part_size) as usize
    }

    fn part_len(&self, part: usize) -> u64 {
        let at = part as u64 * self.part_size;
        self.part_size.min(self.entry_len() - at)
    }

    /// Part `part`'s bytes: from the window, else once the fetcher brings
    /// it, else (it left the window) fetched again.
    async fn part(&self, part: usize) -> Result<Bytes, String> {
        let first_crc = self
            .wait(|st| match st.held.get(&part) {
                Some(b) => Some(Ok(b.clone())),
                None => st.crcs[part].clone().map(Err),
            })
            .await?;
        let first_crc = match first_crc {
            Ok(bytes) => return Ok(bytes),
            Err(crc) => crc.finalize(),
        };
        let bytes = self.get_part(part).await?;
        let crc = self.covered_crc(part, &bytes).finalize();
        if crc != first_crc {
            let e = format!(
                "{}: part {part} of the entry at offset {} read again differs from the \
                 first read (CRC {crc:08x}, was {first_crc:08x}): the object changed or is \
                 corrupt; run `s4db download` and `s4db stats` to check it",
                data_file_name(self.file_id),
                self.entry_offset
            );
            self.update(|st| st.failed = Some(e.clone()));
            return Err(e);
        }
        self.update(|st| self.hold(st, part, bytes.clone()));
        Ok(bytes)
    }

    async fn get_part(&self, part: usize) -> Result<Bytes, String> {
        let at = part as u64 * self.part_size;
        let want = self.part_len(part);
        match self
            .store
            .get_range(&self.object, self.entry_offset + at, want)
            .await
        {
            Ok(b) if b.len() as u64 == want => Ok(b),
            Ok(b) => Err(format!(
                "{}: part at {} came back with {} bytes, not {want}",
                self.object,
                self.entry_offset + at,
                b.len()
            )),
            Err(e) => Err(e.to_string()),
        }
    }

    /// The CRC of the bytes of `part` that the entry CRC covers (all but the
    /// entry's last 4).
    fn covered_crc(&self, part: usize, bytes: &[u8]) -> crc32fast::Hasher {
        let at = part as u64 * self.part_size;
        let covered_end = (at + bytes.len() as u64).min(self.entry_len() - 4);
        let mut crc = crc32fast::Hasher::new();
        if at < covered_end {
            crc.update(&bytes[..(covered_end - at) as usize]);
        }
        crc
    }

    /// Keeps a part in the window if the reader has not passed it.
    fn hold(&self, st: &mut State, part: usize, bytes: Bytes) {
        if in_window(st.reader_at, part) && st.held.len() <= self.parallelism + 2 {
            st.held.insert(part, bytes);
        }
    }

    /// Waits until `ready` gives a value (or the stream failed).
    async fn wait<T>(&self, ready: impl Fn(&State) -> Option<T>) -> Result<T, String> {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(e) = &st.failed {
                    return Err(e.clone());
                }
                if let Some(v) = ready(&st) {
                    return Ok(v);
                }
            }
            notified.await;
        }
    }

    fn update<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let out = f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()));
        self.changed.notify_waiters();
        out
    }

    /// Takes in a fetched part: its CRC, and the bytes if in the window.
    fn arrived(&self, part: usize, bytes: Bytes) {
        let crc = self.covered_crc(part, &bytes);
        self.update(|st| {
            st.crcs[part] = Some(crc);
            self.hold(st, part, bytes);
        });
    }

    fn fail(&self, e: String) {
        tracing::warn!("reading {}: {e}", self.object);
        self.update(|st| st.failed = Some(e));
    }

    /// Fetches every part after the first in order, up to `parallelism` at
    /// a time and no further than `parallelism` parts past what the reader
    /// asked for, then checks the entry CRC.
    async fn fetch(self: Arc<Self>, last_four: [u8; 4]) {
        let parts = self.parts();
        let mut next = 1;
        let mut in_flight = FuturesUnordered::new();
        let mut tail = last_four;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let limit = {
                let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                if st.failed.is_some() {
                    return;
                }
                st.wanted + self.parallelism
            };
            while next < parts && next <= limit && in_flight.len() < self.parallelism {
                let me = self.clone();
                let part = next;
                in_flight.push(async move { (part, me.get_part(part).await) });
                next += 1;
            }
            if in_flight.is_empty() {
                if next >= parts {
                    break;
                }
                notified.await;
                continue;
            }
            tokio::select! {
                Some((part, got)) = in_flight.next() => match got {
                    Ok(bytes) => {
                        self.keep_tail(part, &bytes, &mut tail);
                        self.arrived(part, bytes);
                    }
                    Err(e) => return self.fail(e),
                },
                _ = &mut notified => {}
            }
        }
        self.check(u32::from_be_bytes(tail));
    }

    /// Copies the stored CRC (the entry's last 4 bytes, which may straddle
    /// parts) out of `part`.
    fn keep_tail(&self, part: usize, bytes: &[u8], tail: &mut [u8; 4]) {
        let at = part as u64 * self.part_size;
        for (i, t) in tail.iter_mut().enumerate() {
            let pos = self.entry_len() - 4 + i as u64;
            if pos >= at && pos < at + bytes.len() as u64 {
                *t = bytes[(pos - at) as usize];
            }
        }
    }

    /// Combines the parts' CRCs and compares them with the stored one.
    fn check(&self, stored: u32) {
        let mut whole = crc32fast::Hasher::new();
        {
            let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            for c in st.crcs.iter().flatten() {
                whole.combine(c);
            }
        }
        let computed = whole.finalize();
        if computed != stored {
            let e = crate::format::FormatError::new(
                &data_file_name(self.file_id),
                self.entry_offset,
                crate::format::Corruption::Crc { stored, computed },
            );
            return self.fail(e.to_string());
        }
        self.update(|st| st.verified = true);
    }
}

/// Starts reading the value of `key` at `loc` (an entry of a data file that
/// is not local): GETs the first part, and if the value is raw, spawns the
/// fetch of the rest on `rt`.
pub async fn open(
    store: Arc<dyn ObjectStore>,
    object: String,
    key: &str,
    loc: Location,
    cfg: StreamConfig,
    rt: &tokio::runtime::Handle,
) -> crate::Result<Opening> {
    let head_len = 9 + key.len() as u64;
    let entry_len = loc.length as u64;
    let part_size = cfg.part_size.max(head_len + 1);
    if entry_len < head_len + 4 || entry_len <= part_size {
        return Ok(Opening::Whole);
    }
    let first = store.get_range(&object, loc.offset, part_size).await?;
    let name = data_file_name(loc.file_id);
    let corrupt = |what: String| {
        crate::format::FormatError::new(
            &name,
            loc.offset,
            crate::format::Corruption::Malformed(what),
        )
    };
    if (first.len() as u64) < head_len {
        return Err(corrupt("entry shorter than its head".into()).into());
    }
    let flags = first[0];
    let value_len = u32::from_be_bytes(first[5..9].try_into().expect("4 bytes")) as u64;
    if flags & FLAG_RAW == 0 || flags & FLAG_TOMBSTONE != 0 {
        return Ok(Opening::Whole);
    }
    let key_len = u32::from_be_bytes(first[1..5].try_into().expect("4 bytes")) as u64;
    if key_len != key.len() as u64
        || &first[9..head_len as usize] != key.as_bytes()
        || head_len + value_len + 4 != entry_len
        || entry_len != value_len + key_len + ENTRY_OVERHEAD
        || first.len() as u64 != part_size
    {
        return Err(corrupt(format!("entry does not hold a value of {key:?}")).into());
    }
    let binary = flags & crate::format::FLAG_BINARY != 0;
    let shared = Arc::new(Shared {
        store,
        object,
        entry_offset: loc.offset,
        file_id: loc.file_id,
        head_len,
        value_len,
        part_size,
        parallelism: cfg.parallelism.max(1),
        state: Mutex::new(State::default()),
        changed: tokio::sync::Notify::new(),
    });
    let mut tail = [0u8; 4];
    shared.update(|st| st.crcs = vec![None; shared.parts()]);
    shared.keep_tail(0, &first, &mut tail);
    shared.arrived(0, first);
    let fetcher = rt.spawn(shared.clone().fetch(tail)).abort_handle();
    Ok(Opening::Streaming(Stream { shared, fetcher }, binary))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::local::LocalStore;

    /// A data file holding one raw entry of `value` for `key` after 25 bytes
    /// of padding, as the object `name` of a directory-backed store.
    fn stored(
        dir: &std::path::Path,
        name: &str,
        key: &str,
        value: &[u8],
    ) -> (LocalStore, Location) {
        let mut bytes = vec![0u8; 25];
        let mut src = value;
        let length =
            crate::format::write_raw_entry(&mut bytes, key, &mut src, value.len() as u32, false)
                .unwrap();
        let store = LocalStore::open(dir, "bucket").unwrap();
        std::fs::write(dir.join("bucket").join(name), &bytes).unwrap();
        let loc = Location {
            file_id: 1,
            offset: 25,
            length: length as u32,
        };
        (store, loc)
    }

    fn value(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8 ^ seed).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_in_order_and_back_and_checks_a_part_fetched_again() {
        let dir = tempfile::tempdir().unwrap();
        let v = value(10_000, 7);
        let (store, loc) = stored(dir.path(), "obj", "k", &v);
        let cfg = StreamConfig {
            part_size: 1000,
            parallelism: 2,
        };
        let rt = tokio::runtime::Handle::current();
        let store: Arc<dyn ObjectStore> = Arc::new(store);
        let Opening::Streaming(s, binary) =
            open(store, "obj".into(), "k", loc, cfg, &rt).await.unwrap()
        else {
            panic!("a raw value streams");
        };
        assert!(!binary);
        // In order, in reads that straddle parts, to the end (CRC checked).
        let mut got = Vec::new();
        for at in (0..v.len() as u64).step_by(700) {
            got.extend(s.read(at, 700).await.unwrap());
        }
        assert_eq!(got, v);
        assert!(s.read(10_000, 10).await.unwrap().is_empty());
        // The window is at the end: the start is fetched again, the same.
        assert_eq!(s.read(5, 10).await.unwrap(), &v[5..15]);
        {
            let st = s.shared.state.lock().unwrap();
            assert!(st.held.len() <= cfg.parallelism + 3, "{:?}", st.held.keys());
        }
        // The object changes under the stream: a part fetched again no
        // longer matches its first read, and every later read fails.
        let path = dir.path().join("bucket").join("obj");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[25 + 5_500] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let err = s.read(5_400, 200).await.unwrap_err();
        assert!(err.contains("differs from the first read"), "{err}");
        assert!(s.read(0, 10).await.is_err(), "the stream stays failed");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_bad_entry_crc_fails_the_read_of_the_last_byte_only() {
        let dir = tempfile::tempdir().unwrap();
        let v = value(10_000, 3);
        let (store, loc) = stored(dir.path(), "obj", "k", &v);
        let path = dir.path().join("bucket").join("obj");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[25 + 4_000] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let cfg = StreamConfig {
            part_size: 1000,
            parallelism: 3,
        };
        let rt = tokio::runtime::Handle::current();
        let Opening::Streaming(s, _) = open(Arc::new(store), "obj".into(), "k", loc, cfg, &rt)
            .await
            .unwrap()
        else {
            panic!("a raw value streams");
        };
        // Short of the end, served as stored (the CRC covers the whole).
        assert_eq!(s.read(0, 100).await.unwrap(), &v[..100]);
        let err = s.read(9_990, 10).await.unwrap_err();
        assert!(err.contains("CRC"), "{err}");
    }
}
