//! Large cold reads at S3's parallel bandwidth: the entry of a large raw
//! value is fetched as parts by parallel range GETs (as mountpoint-s3's
//! prefetcher does), written into the open file's temporary file as they
//! arrive, and served in order: a read waits only for the parts it covers.
//! Memory is bounded by the parts in flight (`parallelism × part_size`).
//!
//! The entry CRC covers the whole entry, so it can only be checked once
//! every part is in: each part's CRC is computed as it arrives and the parts'
//! CRCs are combined in order. A read that includes the value's last byte
//! waits for that check, so no read returns the end of a value whose CRC
//! failed: it fails with EIO, and the inode's page cache is not kept for the
//! next open (which then drops whatever pages the earlier reads filled).

use crate::format::{data_file_name, Location, ENTRY_OVERHEAD, FLAG_RAW, FLAG_TOMBSTONE};
use crate::remote::ObjectStore;
use futures::StreamExt;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

/// How large values are fetched (`--read-part-size`, `--max-threads`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamConfig {
    /// Bytes per range GET.
    pub part_size: u64,
    /// Range GETs in flight per file.
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

/// A value being fetched into a file, part by part.
#[derive(Debug)]
pub struct Stream {
    /// Entry bytes before the value (flags, lengths, key).
    head_len: u64,
    value_len: u64,
    part_size: u64,
    state: Mutex<State>,
    changed: tokio::sync::Notify,
}

#[derive(Debug)]
struct State {
    done: Vec<bool>,
    verified: bool,
    failed: Option<String>,
}

/// The first part of an entry, fetched to learn whether it can stream.
pub enum Opening {
    /// A raw value: the rest is being fetched into the file.
    Streaming(Arc<Stream>, bool),
    /// Not a raw value (compressed, or short): read it whole instead.
    Whole,
}

impl Stream {
    /// How many parts the entry is fetched in.
    fn entry_parts(&self) -> usize {
        let entry_len = self.head_len + self.value_len + 4;
        entry_len.div_ceil(self.part_size) as usize
    }

    /// Waits until the value bytes `[offset, offset + len)` are in the file
    /// (and, for a range that reaches the value's end, checked).
    pub async fn ready(&self, offset: u64, len: u64) -> Result<(), String> {
        let end = (offset + len).min(self.value_len);
        if offset >= end {
            return self.ready_all().await;
        }
        let first = ((self.head_len + offset) / self.part_size) as usize;
        let last = ((self.head_len + end - 1) / self.part_size) as usize;
        let needs_check = end == self.value_len;
        self.wait(|s| s.done[first..=last].iter().all(|d| *d) && (!needs_check || s.verified))
            .await
    }

    /// Waits until every part is in and the CRC checked.
    pub async fn ready_all(&self) -> Result<(), String> {
        self.wait(|s| s.verified).await
    }

    async fn wait(&self, ok: impl Fn(&State) -> bool) -> Result<(), String> {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(e) = &s.failed {
                    return Err(e.clone());
                }
                if ok(&s) {
                    return Ok(());
                }
            }
            notified.await;
        }
    }

    fn update(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()));
        self.changed.notify_waiters();
    }
}

/// Starts fetching the value of `key` at `loc` (an entry of a data file
/// that is not local) into `file`: GETs the first part, and if the value is
/// raw, spawns the fetch of the rest on `rt`. Returns the stream and
/// whether the value is binary.
pub async fn open(
    store: Arc<dyn ObjectStore>,
    object: String,
    key: &str,
    loc: Location,
    file: Arc<File>,
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
    {
        return Err(corrupt(format!("entry does not hold a value of {key:?}")).into());
    }
    let binary = flags & crate::format::FLAG_BINARY != 0;
    let stream = Arc::new(Stream {
        head_len,
        value_len,
        part_size,
        state: Mutex::new(State {
            done: Vec::new(),
            verified: false,
            failed: None,
        }),
        changed: tokio::sync::Notify::new(),
    });
    let parts = stream.entry_parts();
    stream.update(|s| s.done = vec![false; parts]);
    let fetch = fetch_rest(stream.clone(), store, object, loc, file, first, cfg);
    rt.spawn(async move {
        let _ = fetch.await;
    });
    Ok(Opening::Streaming(stream, binary))
}

/// Places the entry bytes of part `i` (starting at entry offset `at`) in
/// the file, and returns the CRC of those that the entry CRC covers.
fn place(s: &Stream, file: &File, at: u64, bytes: &[u8]) -> std::io::Result<crc32fast::Hasher> {
    let entry_len = s.head_len + s.value_len + 4;
    let covered_end = (at + bytes.len() as u64).min(entry_len - 4);
    let mut crc = crc32fast::Hasher::new();
    if at < covered_end {
        crc.update(&bytes[..(covered_end - at) as usize]);
    }
    let (v_start, v_end) = (s.head_len, s.head_len + s.value_len);
    let from = at.max(v_start);
    let to = (at + bytes.len() as u64).min(v_end);
    if from < to {
        let slice = &bytes[(from - at) as usize..(to - at) as usize];
        file.write_all_at(slice, from - v_start)?;
    }
    Ok(crc)
}

async fn fetch_rest(
    s: Arc<Stream>,
    store: Arc<dyn ObjectStore>,
    object: String,
    loc: Location,
    file: Arc<File>,
    first: bytes::Bytes,
    cfg: StreamConfig,
) -> Result<(), ()> {
    let fail = |e: String| {
        tracing::warn!("reading {object}: {e}");
        s.update(|st| st.failed = Some(e));
        Err(())
    };
    let entry_len = loc.length as u64;
    let parts = s.entry_parts();
    let mut crcs: Vec<Option<crc32fast::Hasher>> = vec![None; parts];
    let mut tail = [0u8; 4];
    let mut keep_tail = |at: u64, bytes: &[u8]| {
        // The stored CRC: the entry's last 4 bytes (they may straddle parts).
        for i in 0..4u64 {
            let pos = entry_len - 4 + i;
            if pos >= at && pos < at + bytes.len() as u64 {
                tail[i as usize] = bytes[(pos - at) as usize];
            }
        }
    };
    match place(&s, &file, 0, &first) {
        Ok(c) => crcs[0] = Some(c),
        Err(e) => return fail(format!("writing a temporary file: {e}")),
    }
    keep_tail(0, &first);
    s.update(|st| st.done[0] = true);
    let reads = futures::stream::iter((1..parts).map(|i| {
        let (store, object) = (store.clone(), object.clone());
        let at = i as u64 * s.part_size;
        let len = s.part_size.min(entry_len - at);
        async move {
            let got = store.get_range(&object, loc.offset + at, len).await;
            (i, at, got)
        }
    }))
    .buffer_unordered(cfg.parallelism.max(1));
    futures::pin_mut!(reads);
    while let Some((i, at, got)) = reads.next().await {
        let bytes = match got {
            Ok(b) if b.len() as u64 == s.part_size.min(entry_len - at) => b,
            Ok(b) => return fail(format!("part at {at} came back with {} bytes", b.len())),
            Err(e) => return fail(e.to_string()),
        };
        match place(&s, &file, at, &bytes) {
            Ok(c) => crcs[i] = Some(c),
            Err(e) => return fail(format!("writing a temporary file: {e}")),
        }
        keep_tail(at, &bytes);
        s.update(|st| st.done[i] = true);
    }
    let mut whole = crc32fast::Hasher::new();
    for c in crcs.into_iter().flatten() {
        whole.combine(&c);
    }
    let computed = whole.finalize();
    let stored = u32::from_be_bytes(tail);
    if computed != stored {
        let e = crate::format::FormatError::new(
            &data_file_name(loc.file_id),
            loc.offset,
            crate::format::Corruption::Crc { stored, computed },
        );
        return fail(e.to_string());
    }
    s.update(|st| st.verified = true);
    Ok(())
}
