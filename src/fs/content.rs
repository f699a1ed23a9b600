//! The bytes of one open file: in memory while small, in an unlinked
//! temporary file once past a threshold, so a large value being written
//! does not hold its size in RAM; a large value only read streams from S3
//! through a bounded window of parts.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Past this many bytes, content moves to a temporary file.
pub const SPILL_BYTES: u64 = 8 * 1024 * 1024;

#[derive(Debug)]
enum Store {
    Memory(Vec<u8>),
    /// The value from byte `base` of `file`. `named` is set when the file is
    /// laid out as the data file the value will be put in (write-behind):
    /// its name lets the engine link it into place instead of copying.
    Spilled {
        file: File,
        base: u64,
        named: Option<tempfile::TempPath>,
    },
    /// A large value only read, fetched from S3 part by part as it is read
    /// (never written: a write loads the value whole first).
    Remote(super::stream::Stream),
}

fn spilled(file: File) -> Store {
    Store::Spilled {
        file,
        base: 0,
        named: None,
    }
}

#[derive(Debug)]
pub struct Content {
    store: Store,
    len: u64,
    spill_dir: PathBuf,
    /// The parts of a large value being written, on their way to S3.
    behind: Option<super::write_behind::WriteBehind>,
    /// Bytes the last put took: a write-behind started after it sends only
    /// the parts past them again (a file put at every fsync is not sent
    /// whole every time).
    put_len: u64,
    /// A write-behind could not start: the value goes up when published.
    behind_refused: bool,
    /// The named file became a data file (linked into place): it must not
    /// change, so the next write first copies the value out.
    sealed: bool,
}

impl Content {
    fn new(store: Store, len: u64, spill_dir: &Path) -> Content {
        Content {
            store,
            len,
            spill_dir: spill_dir.to_path_buf(),
            behind: None,
            put_len: 0,
            behind_refused: false,
            sealed: false,
        }
    }

    pub fn empty(spill_dir: &Path) -> Content {
        Content::new(Store::Memory(Vec::new()), 0, spill_dir)
    }

    pub fn from_bytes(bytes: Vec<u8>, spill_dir: &Path) -> io::Result<Content> {
        let len = bytes.len() as u64;
        let mut c = Content::new(Store::Memory(bytes), len, spill_dir);
        c.spill_if_large()?;
        Ok(c)
    }

    /// Content that starts out in `file` (already `len` bytes long).
    pub fn from_spill_file(file: File, len: u64, spill_dir: &Path) -> Content {
        Content::new(spilled(file), len, spill_dir)
    }

    /// A large value read from S3 as it is read.
    pub fn streaming(stream: super::stream::Stream, spill_dir: &Path) -> Content {
        let len = stream.len();
        Content::new(Store::Remote(stream), len, spill_dir)
    }

    /// Whether the value is being read from S3 (it cannot be written as it
    /// is: a write loads it whole first).
    pub fn is_streaming(&self) -> bool {
        matches!(self.store, Store::Remote(_))
    }

    /// Whether the value is held in memory.
    pub fn is_in_memory(&self) -> bool {
        matches!(self.store, Store::Memory(_))
    }

    /// A fresh unlinked temporary file in the spill directory.
    pub fn spill_file(spill_dir: &Path) -> io::Result<File> {
        std::fs::create_dir_all(spill_dir)?;
        tempfile::tempfile_in(spill_dir)
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn is_spilled(&self) -> bool {
        matches!(self.store, Store::Spilled { .. })
    }

    /// A second handle on the spill file, for reading parts beside writes,
    /// and where the value starts in it.
    pub fn spill_handle(&self) -> Option<io::Result<(File, u64)>> {
        match &self.store {
            Store::Spilled { file, base, .. } => Some(file.try_clone().map(|f| (f, *base))),
            Store::Memory(_) | Store::Remote(_) => None,
        }
    }

    /// Moves the value into a named file laid out as a data file whose value
    /// starts at `base` (the headers are written when it is put), so that
    /// the put can link it into place instead of copying it.
    pub fn lay_out_as_data_file(&mut self, base: u64) -> io::Result<()> {
        std::fs::create_dir_all(&self.spill_dir)?;
        let named = tempfile::Builder::new()
            .prefix(OWN_PREFIX)
            .tempfile_in(&self.spill_dir)?;
        let (file, path) = named.into_parts();
        copy_value(&mut self.reader(), &file, base)?;
        file.set_len(base + self.len)?;
        self.store = Store::Spilled {
            file,
            base,
            named: Some(path),
        };
        self.sealed = false;
        Ok(())
    }

    /// The named file the value is laid out in as a data file, with the
    /// value's offset, unless it was already put.
    pub fn data_file_layout(&self) -> Option<(&File, &Path, u64)> {
        match &self.store {
            Store::Spilled {
                file,
                base,
                named: Some(path),
            } if !self.sealed => Some((file, path, *base)),
            _ => None,
        }
    }

    /// The named file is a data file now: later changes copy the value out.
    pub fn seal(&mut self) {
        self.sealed = true;
    }

    /// Before a change: a sealed value moves to a fresh file laid out the
    /// same way (one copy, whatever the next put does with it).
    fn unseal(&mut self) -> io::Result<()> {
        if self.sealed {
            let base = self.data_file_base().unwrap_or(0);
            self.lay_out_as_data_file(base)?;
        }
        Ok(())
    }

    /// Where the value starts in its named file laid out as a data file
    /// (sealed or not).
    fn data_file_base(&self) -> Option<u64> {
        match &self.store {
            Store::Spilled {
                base,
                named: Some(_),
                ..
            } => Some(*base),
            _ => None,
        }
    }

    /// Whether the value is laid out, unsealed, as a data file with its
    /// value at `base`.
    pub fn is_laid_out_at(&self, base: u64) -> bool {
        self.data_file_layout().is_some_and(|(_, _, b)| b == base)
    }

    pub fn write_behind(&mut self) -> Option<&mut super::write_behind::WriteBehind> {
        self.behind.as_mut()
    }

    /// Whether a write-behind should be tried: large enough, none running.
    pub fn wants_write_behind(&self, threshold: u64) -> bool {
        self.behind.is_none() && !self.behind_refused && self.is_spilled() && self.len >= threshold
    }

    /// Installs a started write-behind, or (`None`) notes that it failed to.
    pub fn set_write_behind(&mut self, behind: Option<super::write_behind::WriteBehind>) {
        self.behind_refused = behind.is_none();
        self.behind = behind;
    }

    /// Takes the write-behind for the put of the content as it is now.
    pub fn take_write_behind(&mut self) -> Option<super::write_behind::WriteBehind> {
        self.put_len = self.len;
        self.behind.take()
    }

    /// Where a new write-behind's catch-up starts (see `put_len`).
    pub fn put_len(&self) -> u64 {
        self.put_len
    }

    /// Up to `size` bytes from `offset` (fewer at the end). A value read
    /// from S3 waits for its parts; a failed fetch or a CRC mismatch is an
    /// I/O error.
    pub async fn read(&self, offset: u64, size: u32) -> io::Result<Vec<u8>> {
        let end = self.len.min(offset.saturating_add(size as u64));
        if offset >= end {
            return Ok(Vec::new());
        }
        match &self.store {
            Store::Memory(v) => Ok(v[offset as usize..end as usize].to_vec()),
            Store::Spilled { file, base, .. } => {
                let mut buf = vec![0u8; (end - offset) as usize];
                file.read_exact_at(&mut buf, base + offset)?;
                Ok(buf)
            }
            Store::Remote(stream) => stream
                .read(offset, end - offset)
                .await
                .map_err(io::Error::other),
        }
    }

    /// Writes `data` at `offset`, zero-filling any gap past the end.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.unseal()?;
        let end = offset + data.len() as u64;
        if end > SPILL_BYTES {
            self.spill()?;
        }
        match &mut self.store {
            Store::Memory(v) => {
                if (v.len() as u64) < end {
                    v.resize(end as usize, 0);
                }
                v[offset as usize..end as usize].copy_from_slice(data);
            }
            Store::Spilled { file, base, .. } => file.write_all_at(data, *base + offset)?,
            Store::Remote(_) => return Err(not_loaded()),
        }
        self.len = self.len.max(end);
        Ok(())
    }

    pub fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.unseal()?;
        match &mut self.store {
            Store::Memory(v) if len <= SPILL_BYTES => v.resize(len as usize, 0),
            Store::Memory(_) => {
                self.spill()?;
                return self.truncate(len);
            }
            Store::Spilled { file, base, .. } => file.set_len(*base + len)?,
            Store::Remote(_) => return Err(not_loaded()),
        }
        self.len = len;
        Ok(())
    }

    /// The whole content, for a put.
    pub fn to_vec(&self) -> io::Result<Vec<u8>> {
        match &self.store {
            Store::Memory(v) => Ok(v[..self.len as usize].to_vec()),
            Store::Spilled { file, base, .. } => {
                let mut buf = vec![0u8; self.len as usize];
                file.read_exact_at(&mut buf, *base)?;
                Ok(buf)
            }
            Store::Remote(_) => Err(not_loaded()),
        }
    }

    /// Reads the whole content from the start (a large value streams from
    /// its temporary file into the data file, never whole into memory).
    pub fn reader(&self) -> Box<dyn Read + '_> {
        match &self.store {
            Store::Memory(v) => Box::new(&v[..self.len as usize]),
            Store::Spilled { file, base, .. } => Box::new(ReadAt {
                file,
                pos: *base,
                end: *base + self.len,
            }),
            Store::Remote(_) => Box::new(NotLoaded),
        }
    }

    /// Whether the bytes are valid UTF-8 (then they are stored as text),
    /// checked a chunk at a time.
    pub fn is_utf8(&self) -> io::Result<bool> {
        let mut reader = self.reader();
        let mut buf = vec![0u8; 256 * 1024];
        let mut carry = 0;
        loop {
            let n = reader.read(&mut buf[carry..])?;
            if n == 0 {
                return Ok(carry == 0);
            }
            let filled = carry + n;
            match std::str::from_utf8(&buf[..filled]) {
                Ok(_) => carry = 0,
                // A character cut by the chunk boundary: keep its first bytes.
                Err(e) if e.error_len().is_none() => {
                    let valid = e.valid_up_to();
                    buf.copy_within(valid..filled, 0);
                    carry = filled - valid;
                }
                Err(_) => return Ok(false),
            }
        }
    }

    fn spill_if_large(&mut self) -> io::Result<()> {
        if self.len > SPILL_BYTES {
            self.spill()?;
        }
        Ok(())
    }

    fn spill(&mut self) -> io::Result<()> {
        if let Store::Memory(v) = &self.store {
            let f = Content::spill_file(&self.spill_dir)?;
            f.write_all_at(v, 0)?;
            f.set_len(v.len() as u64)?;
            self.store = spilled(f);
        }
        Ok(())
    }
}

/// Removes the named spill files a killed daemon left in `spill_dir` (the
/// unnamed ones vanish with it). Only at start: the local directory's lock
/// says no other daemon uses them.
pub fn remove_leftovers(spill_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(spill_dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(OWN_PREFIX) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// What a change to, or a put of, a value still in S3 meets: the callers
/// load a value whole before they change it, so this is a bug if seen.
fn not_loaded() -> io::Error {
    io::Error::other("the value is being read from S3 and was not loaded whole before a change")
}

struct NotLoaded;

impl Read for NotLoaded {
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        Err(not_loaded())
    }
}

/// Names of the spill files laid out as data files.
const OWN_PREFIX: &str = "own-";

/// Copies everything `src` gives into `file` from `at` on.
fn copy_value(src: &mut dyn Read, file: &File, mut at: u64) -> io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = src.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        file.write_all_at(&buf[..n], at)?;
        at += n as u64;
    }
}

/// `Read` over a region of a file by position (the file is shared).
struct ReadAt<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl Read for ReadAt<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = (self.end - self.pos).min(buf.len() as u64) as usize;
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_laid_out_as_a_data_file_reads_the_same_and_copies_out_once_sealed() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let mut c = Content::empty(dir.path());
        let value: Vec<u8> = (0..SPILL_BYTES + 100).map(|i| (i % 251) as u8).collect();
        c.write(0, &value).unwrap();
        c.lay_out_as_data_file(30).unwrap();
        assert_eq!(c.to_vec().unwrap(), value);
        c.write(5, b"abc").unwrap();
        let (file, path, base) = c.data_file_layout().expect("named, not sealed");
        assert_eq!(base, 30);
        let mut at_base = [0u8; 8];
        file.read_exact_at(&mut at_base, 30).unwrap();
        assert_eq!(&at_base, &[0, 1, 2, 3, 4, b'a', b'b', b'c']);
        // The put writes around the value and links the file: sealed, the
        // file must not change again.
        let linked = dir.path().join("linked");
        std::fs::hard_link(path, &linked).unwrap();
        c.seal();
        assert!(c.data_file_layout().is_none());
        c.write(0, b"Z").unwrap();
        c.truncate(10).unwrap();
        assert_eq!(c.to_vec().unwrap(), b"Z\x01\x02\x03\x04abc\x08\x09");
        let kept = std::fs::read(&linked).unwrap();
        assert_eq!(kept.len() as u64, 30 + value.len() as u64);
        assert_eq!(&kept[30..38], &at_base, "the linked file is untouched");
        // Copied out into a new file laid out the same way; dropped, the
        // content removes its own names, never the link.
        assert!(c.is_laid_out_at(30));
        let count = || std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(count(), 2, "the link and the new layout");
        drop(c);
        assert_eq!(count(), 1, "only the linked file");
    }

    #[test]
    fn writes_reads_truncates_and_spills() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Content::empty(dir.path());
        c.write(0, b"hello").unwrap();
        c.write(7, b"!").unwrap();
        assert_eq!(c.to_vec().unwrap(), b"hello\0\0!");
        c.truncate(4).unwrap();
        let read = |c: &Content, at, n| futures::executor::block_on(c.read(at, n)).unwrap();
        assert_eq!(read(&c, 1, 10), b"ell");
        let big = SPILL_BYTES + 10;
        c.write(big - 1, b"x").unwrap();
        assert!(c.is_spilled());
        assert_eq!(c.len(), big);
        assert_eq!(read(&c, 0, 4), b"hell");
        assert_eq!(read(&c, big - 2, 5), b"\0x");
        assert!(c.is_utf8().unwrap());
        c.write(SPILL_BYTES - 1, "é".as_bytes()).unwrap();
        assert!(c.is_utf8().unwrap());
        c.write(3, &[0xff]).unwrap();
        assert!(!c.is_utf8().unwrap());
        let mut all = Vec::new();
        c.reader().read_to_end(&mut all).unwrap();
        assert_eq!(all.len() as u64, c.len());
        c.truncate(2).unwrap();
        assert_eq!(c.to_vec().unwrap(), b"he");
    }
}
