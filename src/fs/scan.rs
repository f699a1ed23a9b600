//! Cold scans of small files (`cat dir/*`, `grep -r`, `tar c`, `cp -r` and
//! `rsync` out of the mount): when two cold reads in a row land close
//! together in one data file, the reader is walking the files in the order
//! they were written, and the entries that follow are fetched in one range
//! GET of at most [`WINDOW`] bytes into the small-value cache. A lone `cat`
//! stays one GET of exactly its entry.

use super::*;

/// Bytes of entries one scan read-ahead fetches (one range GET). Large
/// enough that a reader going in name order through files stored in
/// another order (`cp -r` writes in the source's directory order) rarely
/// falls off the window's edges.
pub const WINDOW: u64 = 4 * 1024 * 1024;
/// Dead bytes (overwritten or deleted entries) a read-ahead reads through
/// rather than starting another GET.
const GAP: u64 = 64 * 1024;
/// Segments of data files whose offset → key maps are kept (being scanned).
const MAPS: usize = 4;
/// Bytes of a data file one offset → key map covers.
const SEGMENT: u64 = 8 * 1024 * 1024;

/// Entries of one data file by offset: (offset, length, key).
pub(super) type FileMap = Arc<Vec<(u64, u32, Key)>>;

#[derive(Debug, Default)]
pub(super) struct ScanState {
    /// The last cold read: data file and the entry's end.
    last: Option<(u64, u64)>,
    /// By (data file, segment).
    maps: VecDeque<((u64, u64), FileMap)>,
}

impl S4Fs {
    /// Whether this cold read of `loc` follows the previous one closely in
    /// the same data file (a scan). Records it either way.
    pub(super) fn is_scan(&self, loc: Location) -> bool {
        let mut s = lock(&self.scan);
        let scan = s
            .last
            .is_some_and(|(file, end)| file == loc.file_id && loc.offset.abs_diff(end) <= WINDOW);
        s.last = Some((loc.file_id, loc.offset + loc.length as u64));
        scan
    }

    /// The live entries of data file `file_id` from the [`SEGMENT`] that
    /// holds `offset` (and one window past it), in offset order: built from
    /// the index once per scanned segment and kept for a few, so memory stays
    /// bounded however large the data file.
    fn file_map(&self, file_id: u64, offset: u64) -> FileMap {
        let segment = (file_id, offset / SEGMENT);
        if let Some((_, m)) = lock(&self.scan).maps.iter().find(|(s, _)| *s == segment) {
            return m.clone();
        }
        let from = segment.1 * SEGMENT;
        let to = from + SEGMENT + WINDOW;
        let mut v: Vec<(u64, u32, Key)> = self.db.read_index(|idx| {
            idx.iter()
                .filter(|(k, l)| {
                    l.file_id == file_id && (from..to).contains(&l.offset) && key_is_path(k)
                })
                .map(|(k, l)| (l.offset, l.length, k.clone()))
                .collect()
        });
        v.sort_unstable_by_key(|e| e.0);
        let m: FileMap = Arc::new(v);
        let mut s = lock(&self.scan);
        s.maps.push_back((segment, m.clone()));
        if s.maps.len() > MAPS {
            s.maps.pop_front();
        }
        m
    }

    /// The value of `key` at `loc`, with the small entries after it in its
    /// data file (up to [`WINDOW`] bytes, one range GET), which go to the
    /// small-value cache. `None` when that read fails: the caller reads the
    /// value alone and reports its error.
    pub(super) async fn fetch_scan_window(&self, key: &str, loc: Location) -> Option<Value> {
        let map = self.file_map(loc.file_id, loc.offset);
        let start = map.partition_point(|e| e.0 < loc.offset);
        let mut wanted = vec![(key.to_string(), loc)];
        let mut end = loc.offset + loc.length as u64;
        for (offset, length, k) in map.iter().skip(start) {
            if *offset == loc.offset {
                continue;
            }
            let next_end = offset + *length as u64;
            if *length > SMALL_ENTRY || next_end - loc.offset > WINDOW || *offset > end + GAP {
                break; // too large, past the window, or a gap: one contiguous GET
            }
            let l = Location {
                file_id: loc.file_id,
                offset: *offset,
                length: *length,
            };
            if self.db.location(k) == Some(l) {
                wanted.push((k.to_string(), l));
            }
            end = next_end;
        }
        if wanted.len() == 1 {
            return None;
        }
        self.fetch_group(loc.file_id, &wanted).await
    }
}
