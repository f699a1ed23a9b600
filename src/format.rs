//! The on-disk and in-S3 byte formats (see FORMAT.md), in one place.
//!
//! Everything here is pure: bytes in, values or typed errors out. Decoding
//! never panics on hostile input and never returns garbage as a value: the
//! CRC is checked before anything inside an entry is interpreted.

use std::collections::BTreeMap;

/// Data-file magic bytes.
pub const MAGIC: &[u8; 4] = b"S4DB";
/// Data-file format version we write.
pub const DATA_VERSION: u8 = 2;
/// Size of a data-file header: magic, version, low 32 bits of the file id.
pub const HEADER_SIZE: u64 = 9;
/// Fixed bytes of an entry: flags, key length, value length, CRC.
pub const ENTRY_OVERHEAD: u64 = 13;
/// Keys are bounded by the index's u16 key-length field.
pub const MAX_KEY_BYTES: usize = 65535;

pub const FLAG_TOMBSTONE: u8 = 0x01;
pub const FLAG_RAW: u8 = 0x02;
pub const FLAG_BINARY: u8 = 0x04;
const KNOWN_FLAGS: u8 = FLAG_TOMBSTONE | FLAG_RAW | FLAG_BINARY;

/// What went wrong while decoding; always paired with the file and offset in [`FormatError`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Corruption {
    #[error("truncated: need {need} bytes, have {have}")]
    Truncated { need: u64, have: u64 },
    #[error("CRC mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Crc { stored: u32, computed: u32 },
    #[error("unknown flag bits {0:#04x}")]
    UnknownFlags(u8),
    #[error("tombstone carries a {0}-byte value")]
    TombstoneWithValue(u32),
    #[error("key is {0} bytes, more than the 65535 the format allows")]
    KeyTooLong(u64),
    #[error("entry of {0} bytes does not fit the format's 32-bit length")]
    EntryTooLong(u64),
    #[error("key is not valid UTF-8")]
    KeyNotUtf8,
    #[error("text value is not valid UTF-8")]
    TextNotUtf8,
    #[error("Snappy decompression failed: {0}")]
    Snappy(String),
    #[error("bad magic {0:02x?}, not an s4db data file")]
    BadMagic(Vec<u8>),
    #[error("unsupported version {0}")]
    UnsupportedVersion(u8),
    #[error("{0} trailing bytes after the last entry")]
    TrailingBytes(u64),
    #[error("entry holds key {found:?}, expected {expected:?}")]
    WrongKey { expected: String, found: String },
    /// A side object (e.g. the attribute object) whose contents make no sense.
    #[error("{0}")]
    Malformed(String),
}

/// A decoding failure, naming the object and the byte offset where it happened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file} at offset {offset}: {kind}")]
pub struct FormatError {
    pub file: String,
    pub offset: u64,
    pub kind: Corruption,
}

impl FormatError {
    pub fn new(file: &str, offset: u64, kind: Corruption) -> Self {
        FormatError {
            file: file.to_string(),
            offset,
            kind,
        }
    }
}

/// A stored value: text (UTF-8, returned as `str` by the Python package) or binary.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum Value {
    Text(String),
    Binary(Vec<u8>),
}

impl Value {
    /// Text when the bytes are valid UTF-8, binary otherwise: the rule the
    /// command line and the filesystem use for content of unknown type.
    pub fn from_bytes_guess(bytes: Vec<u8>) -> Value {
        match String::from_utf8(bytes) {
            Ok(text) => Value::Text(text),
            Err(e) => Value::Binary(e.into_bytes()),
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Value::Text(s) => s.as_bytes(),
            Value::Binary(b) => b,
        }
    }

    pub fn into_bytes(self) -> Vec<u8> {
        match self {
            Value::Text(s) => s.into_bytes(),
            Value::Binary(b) => b,
        }
    }

    pub fn is_binary(&self) -> bool {
        matches!(self, Value::Binary(_))
    }

    pub fn len(&self) -> usize {
        self.as_bytes().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl std::fmt::Debug for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Text(s) if s.len() <= 64 => write!(f, "Text({s:?})"),
            Value::Text(s) => write!(f, "Text({} bytes)", s.len()),
            Value::Binary(b) if b.len() <= 32 => write!(f, "Binary({b:02x?})"),
            Value::Binary(b) => write!(f, "Binary({} bytes)", b.len()),
        }
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::Text(s.to_string())
    }
}
impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::Text(s)
    }
}
impl From<Vec<u8>> for Value {
    fn from(b: Vec<u8>) -> Self {
        Value::Binary(b)
    }
}
impl From<&[u8]> for Value {
    fn from(b: &[u8]) -> Self {
        Value::Binary(b.to_vec())
    }
}

/// The 9-byte data-file header for a file with this id.
pub fn encode_file_header(file_id: u64) -> [u8; 9] {
    let mut h = [0u8; 9];
    h[..4].copy_from_slice(MAGIC);
    h[4] = DATA_VERSION;
    h[5..9].copy_from_slice(&(file_id as u32).to_be_bytes());
    h
}

/// Checks a data-file header; returns its version and stored sequence number.
pub fn decode_file_header(file: &str, data: &[u8]) -> Result<(u8, u32), FormatError> {
    if data.len() < HEADER_SIZE as usize {
        return Err(FormatError::new(
            file,
            0,
            Corruption::Truncated {
                need: HEADER_SIZE,
                have: data.len() as u64,
            },
        ));
    }
    if &data[..4] != MAGIC {
        return Err(FormatError::new(
            file,
            0,
            Corruption::BadMagic(data[..4].to_vec()),
        ));
    }
    let version = data[4];
    if version != 1 && version != 2 {
        return Err(FormatError::new(
            file,
            4,
            Corruption::UnsupportedVersion(version),
        ));
    }
    Ok((version, be_u32(&data[5..9])))
}

/// Encodes a put (`Some(value)`) or a tombstone (`None`) for `key`, appending
/// it to `out`. Values are Snappy-compressed only when that makes them smaller.
pub fn encode_entry(out: &mut Vec<u8>, key: &str, value: Option<&Value>) {
    let start = out.len();
    let (flags, stored): (u8, std::borrow::Cow<[u8]>) = match value {
        None => (FLAG_TOMBSTONE, std::borrow::Cow::Borrowed(&[])),
        Some(v) => {
            let raw = v.as_bytes();
            let mut flags = if v.is_binary() { FLAG_BINARY } else { 0 };
            let compressed = snap::raw::Encoder::new()
                .compress_vec(raw)
                .unwrap_or_else(|_| raw.to_vec());
            if compressed.len() < raw.len() {
                (flags, std::borrow::Cow::Owned(compressed))
            } else {
                flags |= FLAG_RAW;
                (flags, std::borrow::Cow::Borrowed(raw))
            }
        }
    };
    out.push(flags);
    out.extend_from_slice(&(key.len() as u32).to_be_bytes());
    out.extend_from_slice(&(stored.len() as u32).to_be_bytes());
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(&stored);
    let crc = crc32fast::hash(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// The bytes of a raw entry before its value: flags, lengths, key.
pub fn raw_entry_head(key: &str, len: u32, binary: bool) -> Vec<u8> {
    let flags = FLAG_RAW | if binary { FLAG_BINARY } else { 0 };
    let mut head = Vec::with_capacity(9 + key.len());
    head.push(flags);
    head.extend_from_slice(&(key.len() as u32).to_be_bytes());
    head.extend_from_slice(&len.to_be_bytes());
    head.extend_from_slice(key.as_bytes());
    head
}

/// Writes a put entry whose value (`len` bytes) is streamed from `src`,
/// stored raw (FLAG_RAW): a large value never has to be in memory, which
/// Snappy's raw block format would require. Returns the entry's length.
pub fn write_raw_entry(
    out: &mut impl std::io::Write,
    key: &str,
    src: &mut impl std::io::Read,
    len: u32,
    binary: bool,
) -> std::io::Result<u64> {
    let head = raw_entry_head(key, len, binary);
    let mut crc = crc32fast::Hasher::new();
    crc.update(&head);
    out.write_all(&head)?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut left = len as usize;
    while left > 0 {
        let n = src.read(&mut buf[..left.min(256 * 1024)])?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("value of {key:?} ended {left} bytes early"),
            ));
        }
        crc.update(&buf[..n]);
        out.write_all(&buf[..n])?;
        left -= n;
    }
    out.write_all(&crc.finalize().to_be_bytes())?;
    Ok(ENTRY_OVERHEAD + key.len() as u64 + len as u64)
}

/// A decoded entry: the key and the value, or `None` for a tombstone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub value: Option<Value>,
}

/// Reads the lengths of the entry starting at `data[0]`; returns `(flags, key_len, value_len, total_len)`.
fn entry_frame(data: &[u8]) -> Option<(u8, u32, u32, u64)> {
    if data.len() < 9 {
        return None;
    }
    let key_len = be_u32(&data[1..5]);
    let value_len = be_u32(&data[5..9]);
    Some((
        data[0],
        key_len,
        value_len,
        ENTRY_OVERHEAD + key_len as u64 + value_len as u64,
    ))
}

/// Decodes exactly one entry occupying all of `data` (what the index locates:
/// one `pread` or range GET). `file` and `offset` only label errors.
pub fn decode_entry(file: &str, offset: u64, data: &[u8]) -> Result<Entry, FormatError> {
    let err = |kind| FormatError::new(file, offset, kind);
    let have = data.len() as u64;
    let Some((flags, key_len, value_len, total)) = entry_frame(data) else {
        return Err(err(Corruption::Truncated {
            need: ENTRY_OVERHEAD,
            have,
        }));
    };
    if total > have {
        return Err(err(Corruption::Truncated { need: total, have }));
    }
    if total < have {
        return Err(err(Corruption::TrailingBytes(have - total)));
    }
    let body_end = (total - 4) as usize;
    let stored = be_u32(&data[body_end..]);
    let computed = crc32fast::hash(&data[..body_end]);
    if stored != computed {
        return Err(err(Corruption::Crc { stored, computed }));
    }
    if flags & !KNOWN_FLAGS != 0 {
        return Err(err(Corruption::UnknownFlags(flags)));
    }
    if key_len as usize > MAX_KEY_BYTES {
        return Err(err(Corruption::KeyTooLong(key_len as u64)));
    }
    let key_end = 9 + key_len as usize;
    let key = std::str::from_utf8(&data[9..key_end])
        .map_err(|_| err(Corruption::KeyNotUtf8))?
        .to_string();
    if flags & FLAG_TOMBSTONE != 0 {
        if value_len != 0 {
            return Err(err(Corruption::TombstoneWithValue(value_len)));
        }
        return Ok(Entry { key, value: None });
    }
    let stored_value = &data[key_end..body_end];
    let raw = if flags & FLAG_RAW != 0 {
        stored_value.to_vec()
    } else {
        snap::raw::Decoder::new()
            .decompress_vec(stored_value)
            .map_err(|e| err(Corruption::Snappy(e.to_string())))?
    };
    let value = if flags & FLAG_BINARY != 0 {
        Value::Binary(raw)
    } else {
        Value::Text(String::from_utf8(raw).map_err(|_| err(Corruption::TextNotUtf8))?)
    };
    Ok(Entry {
        key,
        value: Some(value),
    })
}

/// The live value of `key` in the entry occupying all of `data`, or `None`
/// when anything is off: a tombstone, another key, a bad CRC or frame, a
/// failed decompression ([`decode_entry`] then says what). The hot path of a
/// get: the key is compared in place and the value copied once.
pub fn decode_value_of(key: &str, data: &[u8]) -> Option<Value> {
    let (flags, key_len, _, total) = entry_frame(data)?;
    if total != data.len() as u64
        || flags & !KNOWN_FLAGS != 0
        || flags & FLAG_TOMBSTONE != 0
        || key_len as usize != key.len()
        || key.len() > MAX_KEY_BYTES
    {
        return None;
    }
    let key_end = 9 + key.len();
    let body_end = data.len() - 4;
    if &data[9..key_end] != key.as_bytes()
        || be_u32(&data[body_end..]) != crc32fast::hash(&data[..body_end])
    {
        return None;
    }
    let stored = &data[key_end..body_end];
    let raw = if flags & FLAG_RAW != 0 {
        stored.to_vec()
    } else {
        snap::raw::Decoder::new().decompress_vec(stored).ok()?
    };
    if flags & FLAG_BINARY != 0 {
        Some(Value::Binary(raw))
    } else {
        String::from_utf8(raw).ok().map(Value::Text)
    }
}

/// Bytes of an entry's head that [`entry_value_len`] needs: the fixed
/// fields, the key, and Snappy's length preamble (a varint of at most 5 bytes).
pub fn entry_head_len(key_len: usize) -> u64 {
    9 + key_len as u64 + 5
}

/// The length of the value an entry holds, from the first bytes of the entry
/// (see [`entry_head_len`]) without reading or decompressing the value: a raw
/// value's stored length, or the length Snappy's preamble announces. The CRC
/// cannot be checked on a prefix; the read of the whole entry checks it.
pub fn entry_value_len(file: &str, offset: u64, head: &[u8]) -> Result<u64, FormatError> {
    let err = |kind| FormatError::new(file, offset, kind);
    let have = head.len() as u64;
    let Some((flags, key_len, value_len, _)) = entry_frame(head) else {
        return Err(err(Corruption::Truncated {
            need: ENTRY_OVERHEAD,
            have,
        }));
    };
    if flags & !KNOWN_FLAGS != 0 {
        return Err(err(Corruption::UnknownFlags(flags)));
    }
    if flags & (FLAG_RAW | FLAG_TOMBSTONE) != 0 {
        return Ok(value_len as u64);
    }
    let start = 9 + key_len as usize;
    let end = head.len().min(start + value_len as usize);
    let preamble = head.get(start..end).ok_or(err(Corruption::Truncated {
        need: start as u64,
        have,
    }))?;
    snap::raw::decompress_len(preamble)
        .map(|n| n as u64)
        .map_err(|e| err(Corruption::Snappy(e.to_string())))
}

/// Where one entry sits in a data file, as found by [`scan_entries`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScannedEntry {
    pub offset: u64,
    pub length: u32,
    pub key: String,
    pub tombstone: bool,
}

/// The result of replaying a data file: its valid entries and where the valid
/// prefix ends. `valid_len < file length` means a torn (or corrupt) tail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    pub entries: Vec<ScannedEntry>,
    pub valid_len: u64,
    /// Why replay stopped early, if it did.
    pub stopped: Option<FormatError>,
}

/// Replays a whole data file: checks the header, then walks entries until the
/// first one whose lengths run past the end, whose key is too long, or whose
/// CRC (or any other check) fails. Everything before that point is valid.
pub fn scan_entries(file: &str, data: &[u8]) -> Result<Scan, FormatError> {
    decode_file_header(file, data)?;
    let mut entries = Vec::new();
    let mut pos = HEADER_SIZE;
    let mut stopped = None;
    while (pos as usize) < data.len() {
        let rest = &data[pos as usize..];
        // The entry as its lengths frame it, cut at the end of the file:
        // decode_entry then reports a torn tail as truncation.
        let take = entry_frame(rest).map_or(rest.len() as u64, |(.., total)| {
            total.min(rest.len() as u64)
        });
        let decoded = match u32::try_from(take) {
            Ok(length) => decode_entry(file, pos, &rest[..take as usize]).map(|e| (e, length)),
            Err(_) => Err(FormatError::new(file, pos, Corruption::EntryTooLong(take))),
        };
        match decoded {
            Ok((entry, length)) => entries.push(ScannedEntry {
                offset: pos,
                length,
                key: entry.key,
                tombstone: entry.value.is_none(),
            }),
            Err(e) => {
                stopped = Some(e);
                break;
            }
        }
        pos += take;
    }
    Ok(Scan {
        entries,
        valid_len: pos,
        stopped,
    })
}

/// Where a live key's entry is: the data file and the exact byte span.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Location {
    pub file_id: u64,
    pub offset: u64,
    pub length: u32,
}

/// A key in the in-memory index: up to 24 bytes inline, no allocation of
/// its own (a `String` is 24 bytes plus ~32 on the heap for a 20-byte key);
/// `Borrow<str>`, so the map is looked up and range-scanned by `&str`.
pub type Key = compact_str::CompactString;

/// The entries of `map` from key `start` on, in key order (`range` by `&str`).
pub fn range_from<'a, V>(
    map: &'a BTreeMap<Key, V>,
    start: &str,
) -> std::collections::btree_map::Range<'a, Key, V> {
    use std::ops::Bound;
    map.range::<str, _>((Bound::Included(start), Bound::Unbounded))
}

/// The decoded `index.idx`: every live key's location plus the legacy counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Index {
    pub next_file_num: u32,
    pub entries: BTreeMap<Key, Location>,
}

/// A parsed index before its map is built, so that a caller can free the
/// object's bytes first (tens of MB at a million keys).
#[derive(Debug)]
pub struct IndexEntries {
    next_file_num: u32,
    entries: Vec<(Key, Location)>,
}

impl From<IndexEntries> for Index {
    /// Built from the whole vector at once: `BTreeMap`'s bulk build fills
    /// its nodes, where inserting keys in order leaves them half empty. A
    /// key listed twice keeps its last location, as inserting would.
    fn from(parsed: IndexEntries) -> Index {
        Index {
            next_file_num: parsed.next_file_num,
            entries: parsed.entries.into_iter().collect(),
        }
    }
}

impl Default for Index {
    fn default() -> Self {
        Index {
            next_file_num: 1,
            entries: BTreeMap::new(),
        }
    }
}

/// Serializes a format-2 index from `count` entries (order is free: readers
/// build a map), so callers can encode a view without materializing it.
pub fn encode_index<'a>(
    next_file_num: u32,
    count: u32,
    entries: impl Iterator<Item = (&'a str, Location)>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(13 + count as usize * 40);
    out.push(2u8);
    out.extend_from_slice(&next_file_num.to_be_bytes());
    out.extend_from_slice(&count.to_be_bytes());
    for (key, loc) in entries {
        out.extend_from_slice(&(key.len() as u16).to_be_bytes());
        out.extend_from_slice(key.as_bytes());
        out.extend_from_slice(&loc.file_id.to_be_bytes());
        out.extend_from_slice(&loc.offset.to_be_bytes());
        out.extend_from_slice(&loc.length.to_be_bytes());
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    out
}

/// The index object's name inside a database prefix.
pub const INDEX_NAME: &str = "index.idx";

impl Index {
    /// Serializes as format 2 (what we always write).
    pub fn encode(&self) -> Vec<u8> {
        encode_index(
            self.next_file_num,
            self.entries.len() as u32,
            self.entries.iter().map(|(k, l)| (k.as_str(), *l)),
        )
    }

    /// Parses format 2 (CRC-checked) or format 1 (legacy, no CRC). `file` labels errors.
    pub fn decode(file: &str, data: &[u8]) -> Result<Index, FormatError> {
        IndexEntries::decode(file, data).map(Index::from)
    }
}

impl IndexEntries {
    /// The first half of [`Index::decode`]: the entries in the object's order.
    pub fn decode(file: &str, data: &[u8]) -> Result<IndexEntries, FormatError> {
        let err = |offset: usize, kind| FormatError::new(file, offset as u64, kind);
        if data.len() < 9 {
            return Err(err(
                0,
                Corruption::Truncated {
                    need: 9,
                    have: data.len() as u64,
                },
            ));
        }
        let version = data[0];
        let fixed = match version {
            2 => 20,
            1 => 16,
            v => return Err(err(0, Corruption::UnsupportedVersion(v))),
        };
        let end = if version == 2 {
            if data.len() < 13 {
                return Err(err(
                    0,
                    Corruption::Truncated {
                        need: 13,
                        have: data.len() as u64,
                    },
                ));
            }
            let body = data.len() - 4;
            let stored = be_u32(&data[body..]);
            let computed = crc32fast::hash(&data[..body]);
            if stored != computed {
                return Err(err(body, Corruption::Crc { stored, computed }));
            }
            body
        } else {
            data.len()
        };
        let next_file_num = be_u32(&data[1..5]);
        let count = be_u32(&data[5..9]);
        // Each entry takes at least `2 + fixed` bytes: a bound on a hostile count.
        let mut entries = Vec::with_capacity((count as usize).min(end / (2 + fixed)));
        let mut pos = 9usize;
        for _ in 0..count {
            if pos + 2 > end {
                return Err(err(
                    pos,
                    Corruption::Truncated {
                        need: 2,
                        have: (end - pos) as u64,
                    },
                ));
            }
            let key_len = u16::from_be_bytes([data[pos], data[pos + 1]]) as usize;
            let need = 2 + key_len + fixed;
            if pos + need > end {
                return Err(err(
                    pos,
                    Corruption::Truncated {
                        need: need as u64,
                        have: (end - pos) as u64,
                    },
                ));
            }
            let key = std::str::from_utf8(&data[pos + 2..pos + 2 + key_len])
                .map_err(|_| err(pos, Corruption::KeyNotUtf8))?
                .into();
            let f = pos + 2 + key_len;
            let loc = if version == 2 {
                Location {
                    file_id: be_u64(&data[f..f + 8]),
                    offset: be_u64(&data[f + 8..f + 16]),
                    length: be_u32(&data[f + 16..f + 20]),
                }
            } else {
                Location {
                    file_id: be_u32(&data[f..f + 4]) as u64,
                    offset: be_u64(&data[f + 4..f + 12]),
                    length: be_u32(&data[f + 12..f + 16]),
                }
            };
            entries.push((key, loc));
            pos += need;
        }
        if pos != end {
            return Err(err(pos, Corruption::TrailingBytes((end - pos) as u64)));
        }
        Ok(IndexEntries {
            next_file_num,
            entries,
        })
    }
}

/// File ids: `writer_id << 32 | seq`.
pub fn file_id(writer_id: u32, seq: u32) -> u64 {
    ((writer_id as u64) << 32) | seq as u64
}

pub fn split_file_id(id: u64) -> (u32, u32) {
    ((id >> 32) as u32, id as u32)
}

/// The object name of a data file: legacy `data_NNNNNN.s4db` for writer 0,
/// `data_wwwwwwww_NNNNNN.s4db` otherwise.
pub fn data_file_name(id: u64) -> String {
    let (writer, seq) = split_file_id(id);
    if writer == 0 {
        format!("data_{seq:06}.s4db")
    } else {
        format!("data_{writer:08x}_{seq:06}.s4db")
    }
}

/// Parses a data-file name back to its id; `None` for anything else.
/// Accepts `data_(?:([0-9a-f]{8})_)?(\d{6,})\.s4db`.
pub fn parse_data_file_name(name: &str) -> Option<u64> {
    let rest = name.strip_prefix("data_")?.strip_suffix(".s4db")?;
    let (writer, seq) = match rest.split_once('_') {
        Some((w, s)) => {
            if w.len() != 8
                || !w
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                return None;
            }
            (u32::from_str_radix(w, 16).ok()?, s)
        }
        None => (0, rest),
    };
    if seq.len() < 6 || !seq.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(file_id(writer, seq.parse().ok()?))
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn value_strategy() -> impl Strategy<Value = Option<Value>> {
        prop_oneof![
            Just(None),
            ".{0,40}".prop_map(|s| Some(Value::Text(s))),
            "(abc){0,60}".prop_map(|s| Some(Value::Text(s))),
            proptest::collection::vec(any::<u8>(), 0..200).prop_map(|b| Some(Value::Binary(b))),
            proptest::collection::vec(Just(7u8), 0..300).prop_map(|b| Some(Value::Binary(b))),
        ]
    }

    proptest! {
        #[test]
        fn entry_round_trips(key in ".{0,30}", value in value_strategy()) {
            let mut buf = Vec::new();
            encode_entry(&mut buf, &key, value.as_ref());
            let entry = decode_entry("f", 0, &buf).unwrap();
            prop_assert_eq!(entry.key, key);
            prop_assert_eq!(entry.value, value);
        }

        #[test]
        fn value_len_comes_from_the_entry_head(key in ".{0,30}", value in value_strategy()) {
            let mut buf = Vec::new();
            encode_entry(&mut buf, &key, value.as_ref());
            let head = &buf[..buf.len().min(entry_head_len(key.len()) as usize)];
            let expected = value.as_ref().map_or(0, |v| v.len() as u64);
            prop_assert_eq!(entry_value_len("f", 0, head).unwrap(), expected);
        }

        #[test]
        fn the_fast_decoder_agrees_with_decode_entry(
            key in ".{0,30}",
            asked in ".{0,30}",
            value in value_strategy(),
            flip in proptest::option::of((any::<usize>(), 1u8..=255)),
        ) {
            let mut buf = Vec::new();
            encode_entry(&mut buf, &key, value.as_ref());
            if let Some((pos, xor)) = flip {
                let n = buf.len();
                buf[pos % n] ^= xor;
            }
            let asked = if asked.is_empty() { key.clone() } else { asked };
            let expected = match decode_entry("f", 0, &buf) {
                Ok(Entry { key: k, value: Some(v) }) if k == asked => Some(v),
                _ => None,
            };
            prop_assert_eq!(decode_value_of(&asked, &buf), expected);
        }

        #[test]
        fn streamed_raw_entries_decode(key in ".{0,30}", bytes in proptest::collection::vec(any::<u8>(), 0..300), binary in any::<bool>()) {
            let value = if binary { Value::Binary(bytes.clone()) } else { Value::from_bytes_guess(bytes.clone()) };
            let mut buf = Vec::new();
            let n = write_raw_entry(&mut buf, &key, &mut &value.as_bytes()[..], value.len() as u32, value.is_binary()).unwrap();
            prop_assert_eq!(n, buf.len() as u64);
            prop_assert_eq!(decode_entry("f", 0, &buf).unwrap().value, Some(value));
        }

        #[test]
        fn every_single_byte_corruption_is_detected(
            key in ".{0,12}",
            value in value_strategy(),
            pos_seed in any::<usize>(),
            xor in 1u8..=255,
        ) {
            let mut buf = Vec::new();
            encode_entry(&mut buf, &key, value.as_ref());
            let pos = pos_seed % buf.len();
            buf[pos] ^= xor;
            prop_assert!(decode_entry("f", 0, &buf).is_err());
        }

        #[test]
        fn index_round_trips(
            next in any::<u32>(),
            entries in proptest::collection::btree_map(".{0,20}", (any::<u64>(), any::<u64>(), any::<u32>()), 0..20),
        ) {
            let index = Index {
                next_file_num: next,
                entries: entries
                    .into_iter()
                    .map(|(k, (file_id, offset, length))| (k.into(), Location { file_id, offset, length }))
                    .collect(),
            };
            let bytes = index.encode();
            prop_assert_eq!(Index::decode("i", &bytes).unwrap(), index);
        }

        #[test]
        fn index_corruption_is_detected(
            entries in proptest::collection::btree_map("[a-z]{0,8}", any::<u64>(), 0..8),
            pos_seed in any::<usize>(),
            xor in 1u8..=255,
        ) {
            let index = Index {
                next_file_num: 3,
                entries: entries.into_iter().map(|(k, n)| (k.into(), Location { file_id: n, offset: n, length: 1 })).collect(),
            };
            let mut bytes = index.encode();
            let pos = pos_seed % bytes.len();
            bytes[pos] ^= xor;
            prop_assert!(Index::decode("i", &bytes).is_err());
        }

        #[test]
        fn decoding_garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_entry("f", 0, &data);
            let _ = Index::decode("i", &data);
            let mut file = encode_file_header(1).to_vec();
            file.extend_from_slice(&data);
            let scan = scan_entries("f", &file).unwrap();
            prop_assert!(scan.valid_len <= file.len() as u64);
        }

        #[test]
        fn file_names_round_trip(writer in any::<u32>(), seq in 0u32..2_000_000) {
            let id = file_id(writer, seq);
            prop_assert_eq!(parse_data_file_name(&data_file_name(id)), Some(id));
        }
    }

    /// Bytes the Python package 0.10.0 produces for `pack_entry("k", "hello")`
    /// and `pack_entry("k", b"\x00\xff")`, checked by hand against FORMAT.md.
    #[test]
    fn small_values_are_stored_raw_with_flags() {
        let mut buf = Vec::new();
        encode_entry(&mut buf, "k", Some(&Value::Text("hello".into())));
        assert_eq!(buf[0], FLAG_RAW);
        assert_eq!(&buf[1..9], &[0, 0, 0, 1, 0, 0, 0, 5]);
        assert_eq!(&buf[9..15], b"khello");
        assert_eq!(buf.len(), 19);
        buf.clear();
        encode_entry(&mut buf, "k", Some(&Value::Binary(vec![0, 255])));
        assert_eq!(buf[0], FLAG_RAW | FLAG_BINARY);
        buf.clear();
        encode_entry(&mut buf, "k", Some(&Value::Text("a".repeat(100))));
        assert_eq!(buf[0], 0, "compressible text is compressed");
        buf.clear();
        encode_entry(&mut buf, "gone", None);
        assert_eq!(buf[0], FLAG_TOMBSTONE);
        assert_eq!(buf.len(), 17);
    }

    #[test]
    fn truncation_and_trailing_bytes_are_errors() {
        let mut buf = Vec::new();
        encode_entry(&mut buf, "key", Some(&Value::Text("value".into())));
        for cut in 0..buf.len() {
            let e = decode_entry("data_000001.s4db", 42, &buf[..cut]).unwrap_err();
            assert_eq!(e.offset, 42);
            assert!(matches!(e.kind, Corruption::Truncated { .. }), "{e}");
        }
        let mut longer = buf.clone();
        longer.push(0);
        assert!(matches!(
            decode_entry("f", 0, &longer).unwrap_err().kind,
            Corruption::TrailingBytes(1)
        ));
    }

    #[test]
    fn unknown_flags_with_valid_crc_are_rejected() {
        let mut buf = Vec::new();
        encode_entry(&mut buf, "k", Some(&Value::Text("v".into())));
        buf[0] |= 0x80;
        let n = buf.len();
        let crc = crc32fast::hash(&buf[..n - 4]);
        buf[n - 4..].copy_from_slice(&crc.to_be_bytes());
        assert_eq!(
            decode_entry("f", 0, &buf).unwrap_err().kind,
            Corruption::UnknownFlags(0x82)
        );
    }

    #[test]
    fn invalid_utf8_key_with_valid_crc_is_rejected() {
        let mut buf = vec![FLAG_RAW, 0, 0, 0, 1, 0, 0, 0, 0, 0xff];
        let crc = crc32fast::hash(&buf);
        buf.extend_from_slice(&crc.to_be_bytes());
        assert_eq!(
            decode_entry("f", 0, &buf).unwrap_err().kind,
            Corruption::KeyNotUtf8
        );
    }

    #[test]
    fn scan_stops_at_torn_tail() {
        let mut file = encode_file_header(file_id(7, 1)).to_vec();
        encode_entry(&mut file, "a", Some(&Value::Text("1".into())));
        encode_entry(&mut file, "b", None);
        let good = file.len() as u64;
        encode_entry(&mut file, "c", Some(&Value::Text("3".into())));
        file.truncate(file.len() - 2);
        let scan = scan_entries("f", &file).unwrap();
        assert_eq!(scan.entries.len(), 2);
        assert!(scan.entries[1].tombstone);
        assert_eq!(scan.valid_len, good);
        assert!(scan.stopped.is_some());
    }

    #[test]
    fn index_rejects_version_truncation_and_trailing_bytes() {
        let mut index = Index::default();
        index.entries.insert(
            "k".into(),
            Location {
                file_id: 1,
                offset: 9,
                length: 20,
            },
        );
        let bytes = index.encode();
        let mut v3 = bytes.clone();
        v3[0] = 3;
        assert_eq!(
            Index::decode("i", &v3).unwrap_err().kind,
            Corruption::UnsupportedVersion(3)
        );
        for cut in 0..bytes.len() {
            assert!(Index::decode("i", &bytes[..cut]).is_err());
        }
        // format 1: no CRC, 4-byte file numbers
        let mut v1 = vec![1u8, 0, 0, 0, 2, 0, 0, 0, 1, 0, 1, b'k'];
        v1.extend_from_slice(&1u32.to_be_bytes());
        v1.extend_from_slice(&9u64.to_be_bytes());
        v1.extend_from_slice(&20u32.to_be_bytes());
        let parsed = Index::decode("i", &v1).unwrap();
        assert_eq!(parsed.next_file_num, 2);
        assert_eq!(parsed.entries["k"], index.entries["k"]);
        v1.push(0);
        assert_eq!(
            Index::decode("i", &v1).unwrap_err().kind,
            Corruption::TrailingBytes(1)
        );
    }

    #[test]
    fn data_file_names() {
        assert_eq!(data_file_name(file_id(0, 1)), "data_000001.s4db");
        assert_eq!(
            data_file_name(file_id(0x9f3a01c2, 1)),
            "data_9f3a01c2_000001.s4db"
        );
        assert_eq!(parse_data_file_name("data_1234567.s4db"), Some(1234567));
        assert_eq!(parse_data_file_name("data_9F3A01C2_000001.s4db"), None);
        assert_eq!(parse_data_file_name("data_00001.s4db"), None);
        assert_eq!(parse_data_file_name("index.idx"), None);
        assert_eq!(parse_data_file_name("data_000001.s4db.tmp"), None);
    }
}
