//! Hint objects: beside each data file this project publishes, a small object
//! listing each value's length (Bitcask's hint files, for sizes rather than
//! start-up). A mount on another machine learns every size in a file from
//! one GET instead of a range GET per key, and `ls -l` stays free.
//!
//! `<prefix>hints/<data file name>.hint`: `"S4HINT1\n"`, u64 upload time in
//! ns since the epoch, then per live value u64 offset and u64 length, then a
//! CRC-32 of everything before it; big-endian. The Python package lists only
//! names matching its data-file pattern, so it never sees these; our `gc`
//! removes hints whose data file is gone.

use super::S4db;
use crate::error::Result;
use crate::format::{data_file_name, entry_value_len};
use crate::remote::{PutCondition, StoreError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const MAGIC: &[u8; 8] = b"S4HINT1\n";
/// The folder of hint objects under the database prefix.
pub const HINTS_DIR: &str = "hints/";

/// Value lengths of one data file, by entry offset, and when it was published.
/// A mount keeps these for every data file, so they are packed: sorted pairs
/// found by binary search, 8 bytes an entry when they fit in 32 bits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileHints {
    pub published: SystemTime,
    lengths: Lengths,
}

/// (offset, value length) pairs sorted by offset.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Lengths {
    /// Files under 4 GiB with values under 4 GiB: all of them in practice.
    Narrow(Box<[(u32, u32)]>),
    Wide(Box<[(u64, u64)]>),
}

impl FileHints {
    fn new(published: SystemTime, mut pairs: Vec<(u64, u64)>) -> FileHints {
        if !pairs.is_sorted_by_key(|p| p.0) {
            pairs.sort_unstable_by_key(|p| p.0);
        }
        let narrow = |(o, l): &(u64, u64)| Some((u32::try_from(*o).ok()?, u32::try_from(*l).ok()?));
        let lengths = match pairs.iter().map(narrow).collect::<Option<Box<[_]>>>() {
            Some(n) => Lengths::Narrow(n),
            None => Lengths::Wide(pairs.into_boxed_slice()),
        };
        FileHints { published, lengths }
    }

    /// The length of the value whose entry starts at `offset`.
    pub fn len_at(&self, offset: u64) -> Option<u64> {
        fn find<T: Copy + Ord + TryFrom<u64> + Into<u64>>(
            v: &[(T, T)],
            offset: u64,
        ) -> Option<u64> {
            let offset = T::try_from(offset).ok()?;
            let i = v.binary_search_by_key(&offset, |p| p.0).ok()?;
            Some(v[i].1.into())
        }
        match &self.lengths {
            Lengths::Narrow(v) => find(v, offset),
            Lengths::Wide(v) => find(v, offset),
        }
    }

    /// How many values it gives the length of.
    pub fn len(&self) -> usize {
        match &self.lengths {
            Lengths::Narrow(v) => v.len(),
            Lengths::Wide(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub fn hint_name(file_id: u64) -> String {
    format!("{HINTS_DIR}{}.hint", data_file_name(file_id))
}

fn encode(published: SystemTime, lengths: &[(u64, u64)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + lengths.len() * 16 + 4);
    out.extend_from_slice(MAGIC);
    let ns = published
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    out.extend_from_slice(&ns.to_be_bytes());
    for (offset, len) in lengths {
        out.extend_from_slice(&offset.to_be_bytes());
        out.extend_from_slice(&len.to_be_bytes());
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    out
}

/// `None` when the bytes are not a valid hint object (then sizes are read
/// from the entries themselves: hints are an optimization, never trusted blindly).
fn decode(data: &[u8]) -> Option<FileHints> {
    let body_len = data.len().checked_sub(4)?;
    let (body, crc) = data.split_at(body_len);
    if !body.starts_with(MAGIC)
        || (body.len() - 16) % 16 != 0
        || crc32fast::hash(body).to_be_bytes() != crc
    {
        return None;
    }
    let n = |i: usize| u64::from_be_bytes(body[i..i + 8].try_into().unwrap());
    let published = UNIX_EPOCH + Duration::from_nanos(n(8));
    let pairs = (16..body.len())
        .step_by(16)
        .map(|i| (n(i), n(i + 8)))
        .collect();
    Some(FileHints::new(published, pairs))
}

/// The value length of every live entry of the local data file at `path`,
/// read from the entries' heads only (a pread of each head, the values
/// skipped), so a 4 GiB file costs no more memory than its entry count.
/// Stops at the first entry that does not frame (a file being cut).
fn value_lengths(path: &std::path::Path, name: &str) -> std::io::Result<Vec<(u64, u64)>> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(path)?;
    let size = file.metadata()?.len();
    let mut out = Vec::new();
    let mut pos = crate::format::HEADER_SIZE;
    let mut frame = [0u8; 9];
    while pos + crate::format::ENTRY_OVERHEAD <= size {
        file.read_exact_at(&mut frame, pos)?;
        let key_len = u32::from_be_bytes(frame[1..5].try_into().expect("4 bytes")) as u64;
        let value_len = u32::from_be_bytes(frame[5..9].try_into().expect("4 bytes")) as u64;
        let total = crate::format::ENTRY_OVERHEAD + key_len + value_len;
        if key_len > crate::format::MAX_KEY_BYTES as u64 || pos + total > size {
            break;
        }
        if frame[0] & crate::format::FLAG_TOMBSTONE == 0 {
            let head_len = crate::format::entry_head_len(key_len as usize).min(total);
            let mut head = vec![0u8; head_len as usize];
            file.read_exact_at(&mut head, pos)?;
            match entry_value_len(name, pos, &head) {
                Ok(len) => out.push((pos, len)),
                Err(_) => break,
            }
        }
        pos += total;
    }
    Ok(out)
}

impl S4db {
    /// Publishes the hint object of local data file `file_id` (just
    /// uploaded). Best effort: a failure only costs range GETs later.
    pub(crate) async fn publish_hints(&self, file_id: u64, local: &super::LocalDir) {
        let path = local.file_path(file_id);
        let name = data_file_name(file_id);
        let lengths = match value_lengths(&path, &name) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!("no hints for {name}: reading {}: {e}", path.display());
                return;
            }
        };
        let body = encode(SystemTime::now(), &lengths);
        let key = self.object_key(&hint_name(file_id));
        if let Err(e) = self
            .inner
            .store
            .put(&key, body.into(), PutCondition::None)
            .await
        {
            tracing::warn!("no hints for {name}: {e}");
        }
    }

    /// The hints of data file `file_id`, if this project published them.
    pub async fn file_hints(&self, file_id: u64) -> Result<Option<FileHints>> {
        let key = self.object_key(&hint_name(file_id));
        match self.inner.store.get(&key).await {
            Ok(got) => Ok(decode(&got.data)),
            Err(StoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes the hint object of a data file that was deleted.
    pub(crate) async fn delete_hints(&self, file_id: u64) {
        let key = self.object_key(&hint_name(file_id));
        if let Err(e) = self.inner.store.delete(&key).await {
            tracing::debug!("leaving {key} to gc: {e}");
        }
    }

    /// Hint objects to delete (for gc): those of the data files in
    /// `deleted`, and those whose data file is not in `live` that are older
    /// than `grace` (a hint is PUT just after its data file, so a young one
    /// may belong to a file uploaded after `live` was listed).
    pub(crate) async fn orphan_hints(
        &self,
        live: &std::collections::HashSet<u64>,
        deleted: &std::collections::HashSet<u64>,
        grace: Duration,
    ) -> Result<Vec<String>> {
        let dir = self.object_key(HINTS_DIR);
        let listed = self.inner.store.list(&dir).await?;
        let now = SystemTime::now();
        Ok(listed
            .into_iter()
            .filter(|o| {
                let name = o.key[dir.len()..].trim_end_matches(".hint");
                let old = now.duration_since(o.last_modified).unwrap_or_default() >= grace;
                match crate::format::parse_data_file_name(name) {
                    Some(id) => deleted.contains(&id) || (old && !live.contains(&id)),
                    None => old,
                }
            })
            .map(|o| o.key)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_lengths_come_from_entry_heads_alone() {
        use crate::format::{encode_entry, encode_file_header, write_raw_entry, Value};
        let mut data = encode_file_header(7).to_vec();
        encode_entry(&mut data, "text", Some(&Value::from("hello hello hello")));
        encode_entry(&mut data, "gone", None);
        encode_entry(&mut data, "bin", Some(&Value::from(vec![0u8, 1, 2, 255])));
        let raw_at = data.len() as u64;
        write_raw_entry(&mut data, "raw", &mut &[7u8; 100][..], 100, true).unwrap();
        let torn = data.len();
        encode_entry(&mut data, "torn", Some(&Value::from("cut off")));
        data.truncate(torn + 5);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.s4db");
        std::fs::write(&path, &data).unwrap();
        let got = value_lengths(&path, "f.s4db").unwrap();
        let lens: Vec<u64> = got.iter().map(|(_, l)| *l).collect();
        assert_eq!(lens, vec![17, 4, 100]);
        assert_eq!(got[2].0, raw_at);
    }

    #[test]
    fn hints_round_trip_and_reject_damage() {
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let bytes = encode(t, &[(9, 5), (40, 1 << 33)]);
        let h = decode(&bytes).unwrap();
        assert_eq!(h.published, t);
        assert_eq!(h.len_at(40), Some(1 << 33));
        assert_eq!((h.len_at(9), h.len_at(10), h.len()), (Some(5), None, 2));
        let narrow = decode(&encode(t, &[(40, 6), (9, 5)])).unwrap();
        assert!(matches!(narrow.lengths, Lengths::Narrow(_)));
        assert_eq!((narrow.len_at(9), narrow.len_at(40)), (Some(5), Some(6)));
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 1;
            assert!(decode(&bad).is_none(), "flip at {i}");
        }
        assert!(decode(&bytes[..bytes.len() - 1]).is_none());
    }
}
