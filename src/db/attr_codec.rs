//! Encoding of the attribute object `<prefix>s4db.attrs` and of the local
//! attribute journal `<local_dir>/attrs.journal`.
//!
//! The object (all integers big-endian):
//!
//! ```text
//! "S4ATTRS1"                     8-byte magic
//! snappy_raw(body)               Snappy raw block (not framed)
//! u32 crc                        CRC-32 of everything before it (magic included)
//!
//! body:
//!   u64 generation               +1 on every PUT of the object
//!   u32 file_count
//!   file_count × ( u16 key_len | key | u64 file_id | u64 offset | u32 length
//!                | u8 flags (0x01: entry CRC known) | u32 entry_crc | attrs )
//!   u32 dir_count
//!   dir_count × ( u16 path_len | path | attrs )
//!
//! attrs:
//!   u8 kind (1 regular, 2 dir, 3 symlink, 4 fifo, 5 socket, 6 char dev, 7 block dev)
//!   u16 mode (permission bits only, <= 0o7777) | u32 uid | u32 gid | u64 rdev
//!   atime, mtime, ctime: each i64 seconds since the epoch (negative before
//!                        1970) | u32 nanoseconds (< 10^9)
//!   u64 link_id
//!   u16 xattr_count
//!   xattr_count × ( u8 name_len | name | u32 value_len | value )
//! ```
//!
//! A key may have more than one file record (different entries): while a
//! commit is in flight the object serves both the index before it and the
//! index after it. The name is outside the Python package's data-file
//! pattern, so it neither reads nor deletes it.
//!
//! The journal is a sequence of `u32 len | payload | u32 crc(payload)`
//! records, payload `u8 tag` (1 file record, 2 file record removed, 3 dir
//! record, 4 dir record removed) `| u16 key_len | key` then, for tag 1, the
//! file record fields above from `file_id` on, for tag 3 the attrs. Replay
//! stops at the first record that is torn or fails its CRC.

use super::attrs::{AttrChange, AttrKey, AttrRecord, Attrs, FileKind};
use crate::format::{Corruption, FormatError, Location};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Name of the attribute object under the database prefix.
pub const ATTRS_NAME: &str = "s4db.attrs";
/// Name of the attribute journal in the local directory.
pub const JOURNAL_NAME: &str = "attrs.journal";

const MAGIC: &[u8; 8] = b"S4ATTRS1";
const FLAG_CRC: u8 = 0x01;
/// Largest body we agree to decompress (a table of millions of records fits).
const MAX_BODY: usize = 1 << 31;

/// A decoded attribute object.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttrObject {
    pub generation: u64,
    pub files: Vec<(String, AttrRecord)>,
    pub dirs: Vec<(String, Arc<Attrs>)>,
}

/// Encodes the attribute object.
pub fn encode_object<'a>(
    generation: u64,
    files: impl IntoIterator<Item = (&'a str, &'a AttrRecord)>,
    dirs: impl IntoIterator<Item = (&'a str, &'a Attrs)>,
) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&generation.to_be_bytes());
    let count_at = body.len();
    body.extend_from_slice(&0u32.to_be_bytes());
    let mut n = 0u32;
    for (key, rec) in files {
        put_str(&mut body, key);
        put_record(&mut body, rec);
        n += 1;
    }
    body[count_at..count_at + 4].copy_from_slice(&n.to_be_bytes());
    let count_at = body.len();
    body.extend_from_slice(&0u32.to_be_bytes());
    let mut n = 0u32;
    for (path, attrs) in dirs {
        put_str(&mut body, path);
        put_attrs(&mut body, attrs);
        n += 1;
    }
    body[count_at..count_at + 4].copy_from_slice(&n.to_be_bytes());
    let compressed = snap::raw::Encoder::new()
        .compress_vec(&body)
        .expect("snappy compresses any buffer under 4 GiB");
    let mut out = Vec::with_capacity(MAGIC.len() + compressed.len() + 4);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&compressed);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    out
}

/// Decodes the attribute object named `name` (for messages), rejecting any
/// damage: bad magic, a CRC mismatch, a body that does not decompress or
/// does not parse exactly.
pub fn decode_object(name: &str, data: &[u8]) -> Result<AttrObject, FormatError> {
    let err = |offset: u64, kind| FormatError::new(name, offset, kind);
    if data.len() < MAGIC.len() + 4 {
        return Err(err(
            0,
            Corruption::Truncated {
                need: MAGIC.len() as u64 + 4,
                have: data.len() as u64,
            },
        ));
    }
    if &data[..MAGIC.len()] != MAGIC {
        return Err(err(0, Corruption::BadMagic(data[..MAGIC.len()].to_vec())));
    }
    let (head, tail) = data.split_at(data.len() - 4);
    let stored = u32::from_be_bytes(tail.try_into().expect("4 bytes"));
    let computed = crc32fast::hash(head);
    if stored != computed {
        return Err(err(head.len() as u64, Corruption::Crc { stored, computed }));
    }
    let compressed = &head[MAGIC.len()..];
    let len = snap::raw::decompress_len(compressed)
        .map_err(|e| err(MAGIC.len() as u64, Corruption::Snappy(e.to_string())))?;
    if len > MAX_BODY {
        return Err(err(
            MAGIC.len() as u64,
            Corruption::Malformed(format!("body of {len} bytes is too large")),
        ));
    }
    let body = snap::raw::Decoder::new()
        .decompress_vec(compressed)
        .map_err(|e| err(MAGIC.len() as u64, Corruption::Snappy(e.to_string())))?;
    let mut r = Reader::new(&body);
    let parsed = (|| {
        let generation = r.u64()?;
        let n = r.u32()? as usize;
        let mut files = Vec::with_capacity(n.min(body.len() / 40));
        for _ in 0..n {
            let key = r.str16()?;
            let rec = r.record()?;
            files.push((key, rec));
        }
        let n = r.u32()? as usize;
        let mut dirs = Vec::with_capacity(n.min(body.len() / 40));
        for _ in 0..n {
            let path = r.str16()?;
            dirs.push((path, Arc::new(r.attrs()?)));
        }
        if r.pos != body.len() {
            return Err(Corruption::TrailingBytes((body.len() - r.pos) as u64));
        }
        Ok(AttrObject {
            generation,
            files,
            dirs,
        })
    })();
    parsed.map_err(|kind| {
        let kind = match kind {
            Corruption::Truncated { need, have } => Corruption::Malformed(format!(
                "decompressed body truncated: need {need} bytes, have {have}"
            )),
            k => k,
        };
        err(r.pos as u64, kind)
    })
}

/// Appends one journal record for `change` of `k` to `out`.
pub fn encode_change(out: &mut Vec<u8>, k: &AttrKey, change: &AttrChange) {
    let len_at = out.len();
    out.extend_from_slice(&0u32.to_be_bytes());
    let start = out.len();
    match (k, change) {
        (AttrKey::File(key), AttrChange::File(Some(rec))) => {
            out.push(1);
            put_str(out, key);
            put_record(out, rec);
        }
        (AttrKey::File(key), _) => {
            out.push(2);
            put_str(out, key);
        }
        (AttrKey::Dir(path), AttrChange::Dir(Some(attrs))) => {
            out.push(3);
            put_str(out, path);
            put_attrs(out, attrs);
        }
        (AttrKey::Dir(path), _) => {
            out.push(4);
            put_str(out, path);
        }
    }
    let len = (out.len() - start) as u32;
    out[len_at..start].copy_from_slice(&len.to_be_bytes());
    let crc = crc32fast::hash(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// Decodes journal records up to the first torn or damaged one. Returns
/// the changes and how many bytes were valid.
pub fn decode_journal(data: &[u8]) -> (Vec<(AttrKey, AttrChange)>, usize) {
    let mut out = Vec::new();
    let mut pos = 0;
    while data.len() - pos >= 8 {
        let len = u32::from_be_bytes(data[pos..pos + 4].try_into().expect("4")) as usize;
        let Some(end) = (pos + 4).checked_add(len).filter(|e| e + 4 <= data.len()) else {
            break;
        };
        let payload = &data[pos + 4..end];
        let crc = u32::from_be_bytes(data[end..end + 4].try_into().expect("4"));
        if crc32fast::hash(payload) != crc {
            break;
        }
        let mut r = Reader::new(payload);
        let parsed = (|| {
            let tag = r.u8()?;
            let key = r.str16()?;
            let change = match tag {
                1 => (AttrKey::File(key), AttrChange::File(Some(r.record()?))),
                2 => (AttrKey::File(key), AttrChange::File(None)),
                3 => (
                    AttrKey::Dir(key),
                    AttrChange::Dir(Some(Arc::new(r.attrs()?))),
                ),
                4 => (AttrKey::Dir(key), AttrChange::Dir(None)),
                t => return Err(Corruption::Malformed(format!("journal tag {t}"))),
            };
            if r.pos != payload.len() {
                return Err(Corruption::TrailingBytes((payload.len() - r.pos) as u64));
            }
            Ok(change)
        })();
        match parsed {
            Ok(c) => out.push(c),
            Err(_) => break,
        }
        pos = end + 4;
    }
    (out, pos)
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    debug_assert!(s.len() <= u16::MAX as usize);
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_record(out: &mut Vec<u8>, rec: &AttrRecord) {
    out.extend_from_slice(&rec.loc.file_id.to_be_bytes());
    out.extend_from_slice(&rec.loc.offset.to_be_bytes());
    out.extend_from_slice(&rec.loc.length.to_be_bytes());
    out.push(if rec.crc.is_some() { FLAG_CRC } else { 0 });
    out.extend_from_slice(&rec.crc.unwrap_or(0).to_be_bytes());
    put_attrs(out, &rec.attrs);
}

fn put_attrs(out: &mut Vec<u8>, a: &Attrs) {
    out.push(a.kind.code());
    out.extend_from_slice(&(a.mode & 0o7777).to_be_bytes());
    out.extend_from_slice(&a.uid.to_be_bytes());
    out.extend_from_slice(&a.gid.to_be_bytes());
    out.extend_from_slice(&a.rdev.to_be_bytes());
    for t in [a.atime, a.mtime, a.ctime] {
        let (s, ns) = split_time(t);
        out.extend_from_slice(&s.to_be_bytes());
        out.extend_from_slice(&ns.to_be_bytes());
    }
    out.extend_from_slice(&a.link_id.to_be_bytes());
    let xattrs: Vec<_> = a
        .xattrs
        .iter()
        .filter(|(n, v)| n.len() <= u8::MAX as usize && v.len() <= u32::MAX as usize)
        .take(u16::MAX as usize)
        .collect();
    out.extend_from_slice(&(xattrs.len() as u16).to_be_bytes());
    for (name, value) in xattrs {
        out.push(name.len() as u8);
        out.extend_from_slice(name);
        out.extend_from_slice(&(value.len() as u32).to_be_bytes());
        out.extend_from_slice(value);
    }
}

/// A time as seconds since the epoch (negative before it) and nanoseconds.
pub fn split_time(t: SystemTime) -> (i64, u32) {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs().min(i64::MAX as u64) as i64, d.subsec_nanos()),
        Err(e) => {
            let d = e.duration();
            let secs = d.as_secs().min(i64::MAX as u64) as i64;
            match d.subsec_nanos() {
                0 => (-secs, 0),
                ns => (-secs - 1, 1_000_000_000 - ns),
            }
        }
    }
}

/// Inverse of [`split_time`]; `None` for nanoseconds out of range or a time
/// the platform cannot represent.
pub fn join_time(secs: i64, nanos: u32) -> Option<SystemTime> {
    if nanos >= 1_000_000_000 {
        return None;
    }
    if secs >= 0 {
        UNIX_EPOCH.checked_add(Duration::new(secs as u64, nanos))
    } else {
        UNIX_EPOCH
            .checked_sub(Duration::from_secs(secs.unsigned_abs()))?
            .checked_add(Duration::from_nanos(nanos as u64))
    }
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(data: &'a [u8]) -> Self {
        Reader { data, pos: 0 }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Corruption> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.data.len())
            .ok_or(Corruption::Truncated {
                need: (self.pos + n) as u64,
                have: self.data.len() as u64,
            })?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, Corruption> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, Corruption> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32, Corruption> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, Corruption> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().expect("8")))
    }

    fn str16(&mut self) -> Result<String, Corruption> {
        let n = self.u16()? as usize;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| Corruption::KeyNotUtf8)
    }

    fn record(&mut self) -> Result<AttrRecord, Corruption> {
        let file_id = self.u64()?;
        let offset = self.u64()?;
        let length = self.u32()?;
        let flags = self.u8()?;
        if flags & !FLAG_CRC != 0 {
            return Err(Corruption::UnknownFlags(flags));
        }
        let crc = self.u32()?;
        if flags & FLAG_CRC == 0 && crc != 0 {
            return Err(Corruption::Malformed(
                "entry CRC set but marked unknown".into(),
            ));
        }
        let attrs = self.attrs()?;
        Ok(AttrRecord {
            loc: Location {
                file_id,
                offset,
                length,
            },
            crc: (flags & FLAG_CRC != 0).then_some(crc),
            attrs: Arc::new(attrs),
        })
    }

    fn attrs(&mut self) -> Result<Attrs, Corruption> {
        let code = self.u8()?;
        let kind = FileKind::from_code(code)
            .ok_or_else(|| Corruption::Malformed(format!("unknown file kind {code}")))?;
        let mode = self.u16()?;
        if mode > 0o7777 {
            return Err(Corruption::Malformed(format!(
                "mode {mode:#o} out of range"
            )));
        }
        let uid = self.u32()?;
        let gid = self.u32()?;
        let rdev = self.u64()?;
        let mut times = [UNIX_EPOCH; 3];
        for t in &mut times {
            let secs = self.u64()? as i64;
            let nanos = self.u32()?;
            *t = join_time(secs, nanos)
                .ok_or_else(|| Corruption::Malformed(format!("bad time {secs}s {nanos}ns")))?;
        }
        let link_id = self.u64()?;
        let n = self.u16()?;
        let mut xattrs = BTreeMap::new();
        for _ in 0..n {
            let name_len = self.u8()? as usize;
            let name = self.take(name_len)?.to_vec();
            let value_len = self.u32()? as usize;
            let value = self.take(value_len)?.to_vec();
            if xattrs.insert(name, value).is_some() {
                return Err(Corruption::Malformed("duplicate xattr name".into()));
            }
        }
        let [atime, mtime, ctime] = times;
        Ok(Attrs {
            kind,
            mode,
            uid,
            gid,
            rdev,
            atime,
            mtime,
            ctime,
            link_id,
            xattrs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn attrs(seed: u32) -> Attrs {
        let mut a = Attrs::new(FileKind::Regular, 0o644, 1000 + seed, 100);
        a.atime = UNIX_EPOCH - Duration::new(86_400 * 365 * 20, 123_456_789);
        a.mtime = UNIX_EPOCH + Duration::new(1_700_000_000, 999_999_999);
        a.link_id = seed as u64;
        a.xattrs
            .insert(b"user.k".to_vec(), vec![0, 1, 2, seed as u8]);
        a
    }

    fn sample() -> AttrObject {
        let rec = |i: u64, crc| AttrRecord {
            loc: Location {
                file_id: (7 << 32) | i,
                offset: 9 + i * 100,
                length: 42,
            },
            crc,
            attrs: Arc::new(attrs(i as u32)),
        };
        let mut dir = Attrs::new(FileKind::Dir, 0o1777, 0, 0);
        dir.kind = FileKind::Dir;
        AttrObject {
            generation: 5,
            files: vec![
                ("a".into(), rec(1, Some(0xdead_beef))),
                ("a".into(), rec(2, None)),
                ("ключ/🔑".into(), rec(3, Some(0))),
            ],
            dirs: vec![("d/e".into(), Arc::new(dir))],
        }
    }

    fn encode(o: &AttrObject) -> Vec<u8> {
        encode_object(
            o.generation,
            o.files.iter().map(|(k, r)| (k.as_str(), r)),
            o.dirs.iter().map(|(k, a)| (k.as_str(), &**a)),
        )
    }

    #[test]
    fn the_object_round_trips() {
        let o = sample();
        assert_eq!(decode_object("x", &encode(&o)).unwrap(), o);
        let empty = AttrObject::default();
        assert_eq!(decode_object("x", &encode(&empty)).unwrap(), empty);
    }

    #[test]
    fn every_byte_flip_and_truncation_is_rejected() {
        let bytes = encode(&sample());
        for i in 0..bytes.len() {
            for bit in [0x01u8, 0x80] {
                let mut b = bytes.clone();
                b[i] ^= bit;
                let e = decode_object("p/s4db.attrs", &b).unwrap_err();
                assert!(e.to_string().contains("p/s4db.attrs"), "{e}");
            }
        }
        for n in 0..bytes.len() {
            assert!(decode_object("x", &bytes[..n]).is_err(), "prefix of {n}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode_object("x", &longer).is_err());
    }

    #[test]
    fn times_before_1970_survive() {
        for t in [
            UNIX_EPOCH - Duration::new(1, 1),
            UNIX_EPOCH - Duration::new(0, 5),
            UNIX_EPOCH - Duration::from_secs(3),
            UNIX_EPOCH,
            UNIX_EPOCH + Duration::new(5, 7),
        ] {
            let (s, ns) = split_time(t);
            assert!(ns < 1_000_000_000);
            assert_eq!(join_time(s, ns), Some(t));
        }
        assert_eq!(
            split_time(UNIX_EPOCH - Duration::new(1, 1)),
            (-2, 999_999_999)
        );
    }

    #[test]
    fn the_journal_stops_at_a_torn_or_damaged_record() {
        let o = sample();
        let mut log = Vec::new();
        let changes: Vec<(AttrKey, AttrChange)> = vec![
            (
                AttrKey::File("a".into()),
                AttrChange::File(Some(o.files[0].1.clone())),
            ),
            (AttrKey::File("b".into()), AttrChange::File(None)),
            (
                AttrKey::Dir("d".into()),
                AttrChange::Dir(Some(o.dirs[0].1.clone())),
            ),
            (AttrKey::Dir("d".into()), AttrChange::Dir(None)),
        ];
        let mut ends = Vec::new();
        for (k, c) in &changes {
            encode_change(&mut log, k, c);
            ends.push(log.len());
        }
        assert_eq!(decode_journal(&log), (changes.clone(), log.len()));
        for cut in 0..log.len() {
            let (got, valid) = decode_journal(&log[..cut]);
            let whole = ends.iter().filter(|e| **e <= cut).count();
            assert_eq!(got, changes[..whole].to_vec());
            assert_eq!(valid, if whole == 0 { 0 } else { ends[whole - 1] });
        }
        let mut bad = log.clone();
        bad[ends[1] + 6] ^= 1;
        assert_eq!(decode_journal(&bad).0, changes[..2].to_vec());
    }

    proptest! {
        #[test]
        fn random_tables_round_trip(
            recs in proptest::collection::vec(
                ("[a-z/]{0,12}", any::<u64>(), any::<u64>(), any::<u32>(), any::<Option<u32>>(),
                 0u16..=0o7777, any::<u32>(), any::<i32>(), 0u32..1_000_000_000,
                 proptest::collection::btree_map(
                     proptest::collection::vec(any::<u8>(), 1..20),
                     proptest::collection::vec(any::<u8>(), 0..40), 0..4)),
                0..20),
            generation in any::<u64>(),
        ) {
            let files: Vec<(String, AttrRecord)> = recs
                .into_iter()
                .map(|(k, f, o, l, crc, mode, uid, secs, ns, xattrs)| {
                    let t = join_time(secs as i64, ns).unwrap();
                    let a = Attrs {
                        kind: FileKind::from_code((uid % 7 + 1) as u8).unwrap(),
                        mode,
                        uid,
                        gid: uid ^ 1,
                        rdev: f,
                        atime: t,
                        mtime: t,
                        ctime: UNIX_EPOCH,
                        link_id: o,
                        xattrs,
                    };
                    (k, AttrRecord {
                        loc: Location { file_id: f, offset: o, length: l },
                        crc,
                        attrs: Arc::new(a),
                    })
                })
                .collect();
            let o = AttrObject { generation, files, dirs: Vec::new() };
            prop_assert_eq!(decode_object("x", &encode(&o)).unwrap(), o);
        }
    }
}
