//! Directories: listings (READDIR and READDIRPLUS), mkdir, rmdir.

use super::attrs::Caller;
use super::*;

impl S4Fs {
    /// The children of directory `dir`: one walk of the index that skips
    /// each subdirectory's keys, plus explicit directories and files being
    /// created. A file listed from the index comes with its location.
    pub(super) fn list_children(&self, dir: &str) -> BTreeMap<String, Listed> {
        let prefix = dir_prefix(dir);
        let usable = |c: &str| names::key_is_path(c) && !(dir.is_empty() && c == CONTROL_DIR);
        let mut out = BTreeMap::new();
        self.db.read_index(|idx| {
            walk_children(idx, &prefix, |child| {
                match child {
                    IndexChild::Dir(name) if usable(name) => {
                        out.insert(name.to_string(), Listed::Dir);
                    }
                    IndexChild::File(name, loc) if usable(name) => {
                        out.entry(name.to_string())
                            .or_insert(Listed::File(Some(loc)));
                    }
                    _ => {}
                }
                true
            });
        });
        self.db.read_dirs(|dirs| {
            for (d, _) in range_from(dirs, &prefix) {
                let Some(rest) = d.strip_prefix(&prefix) else {
                    break;
                };
                let child = rest.split('/').next().unwrap_or(rest);
                if usable(child) {
                    out.insert(child.to_string(), Listed::Dir);
                }
            }
        });
        let inodes = lock(&self.inodes);
        for ino in lock(&self.open_files).keys() {
            if let Some((p, _)) = inodes.get(*ino) {
                if let Some(rest) = p.strip_prefix(&prefix) {
                    match rest.split_once('/') {
                        Some((child, _)) => {
                            out.insert(child.to_string(), Listed::Dir);
                        }
                        None => {
                            out.entry(rest.to_string()).or_insert(Listed::File(None));
                        }
                    }
                }
            }
        }
        out
    }

    /// How many subdirectories `dir` has, or `None` when it has more than
    /// `limit` entries to look at (a `stat` must stay cheap in a directory
    /// of a million keys; such a directory then shows `nlink` 1, the
    /// convention for "not counted" that `find` knows).
    pub(super) fn subdir_count(&self, dir: &str, limit: usize) -> Option<usize> {
        let prefix = dir_prefix(dir);
        let mut subdirs = std::collections::BTreeSet::new();
        let mut looked_at = 0;
        let complete = self.db.read_index(|idx| {
            walk_children(idx, &prefix, |child| {
                if let IndexChild::Dir(name) = child {
                    if !(dir.is_empty() && name == CONTROL_DIR) {
                        subdirs.insert(name.to_string());
                    }
                }
                looked_at += 1;
                looked_at < limit
            })
        });
        if !complete {
            return None;
        }
        self.db.read_dirs(|dirs| {
            for (d, _) in range_from(dirs, &prefix) {
                let Some(rest) = d.strip_prefix(&prefix) else {
                    break;
                };
                let child = rest.split('/').next().unwrap_or(rest);
                let control = dir.is_empty() && child == CONTROL_DIR;
                if !child.is_empty() && !control {
                    subdirs.insert(child.to_string());
                }
            }
        });
        Some(subdirs.len())
    }

    pub fn opendir(self: &Arc<Self>, ino: u64) -> FsResult<u64> {
        let mut entries = vec![
            DirEntry {
                ino,
                kind: FileKind::Dir,
                name: ".".into(),
            },
            DirEntry {
                ino: ROOT_INO,
                kind: FileKind::Dir,
                name: "..".into(),
            },
        ];
        let mut path = None;
        if ino == CONTROL_DIR_INO {
            entries.extend(ControlFile::ALL.iter().map(|c| DirEntry {
                ino: c.ino(),
                kind: FileKind::Regular,
                name: c.name().into(),
            }));
        } else {
            let dir = self.dir_path(ino)?;
            path = Some(dir.clone());
            if dir.is_empty() {
                entries.push(DirEntry {
                    ino: CONTROL_DIR_INO,
                    kind: FileKind::Dir,
                    name: CONTROL_DIR.into(),
                });
            }
            let children = self.list_children(&dir);
            let mut unknown = Vec::new();
            {
                let inodes = lock(&self.inodes);
                for (name, listed) in children {
                    let path = join(&dir, &name);
                    let kind = match listed {
                        Listed::Dir => FileKind::Dir,
                        Listed::File(None) => FileKind::Regular, // being created
                        Listed::File(Some(loc)) => {
                            let kind = self.db.attrs_at(&path, loc).map(|a| a.kind);
                            if self.meta.get(loc).is_none() {
                                unknown.push((path.clone(), loc));
                            }
                            kind.unwrap_or(FileKind::Regular)
                        }
                    };
                    entries.push(DirEntry {
                        ino: inodes.listing_ino(&path),
                        kind,
                        name,
                    });
                }
            }
            self.prefetch_sizes(unknown);
        }
        // The first page is small, made when asked for; the second, of the
        // size the last listing learned, is made from now on, while the
        // first goes to the reader.
        let listing = Arc::new(Handle::Dir(Listing {
            path,
            entries: Arc::new(entries),
            plus_batch: AtomicUsize::new(FIRST_PLUS_BATCH),
            ahead: Mutex::new(None),
        }));
        let learned = self.plus_batch.load(Ordering::Relaxed);
        self.make_ahead(listing.clone(), FIRST_PLUS_BATCH as u64, learned);
        Ok(self.add_handle(listing))
    }

    /// A listing is usually followed by a `stat` of each entry (`ls -l`):
    /// resolve the sizes nobody knows yet (`wanted`) now, with requests in
    /// parallel.
    pub(super) fn prefetch_sizes(self: &Arc<Self>, wanted: Vec<(String, Location)>) {
        if wanted.is_empty() {
            return;
        }
        let fs = self.clone();
        self.rt.spawn(async move {
            futures::stream::iter(wanted)
                .for_each_concurrent(RESOLVE_CONCURRENCY, |(p, l)| {
                    let fs = fs.clone();
                    async move {
                        if let Err(e) = fs.value_meta(&p, l).await {
                            tracing::debug!("size of {p:?}: {e}");
                        }
                    }
                })
                .await;
        });
    }

    /// The listing taken at opendir (the adapter pages through it).
    pub fn readdir(&self, fh: u64) -> FsResult<Arc<Vec<DirEntry>>> {
        match &*self.handle(fh)? {
            Handle::Dir(l) => Ok(l.entries.clone()),
            _ => Err(FsError::BadHandle),
        }
    }

    /// Entries from `offset` with their attributes (READDIRPLUS: `ls -l`
    /// then needs no lookup per file), as many as the listing expects the
    /// kernel's reply page to hold: the page prepared ahead if nothing
    /// changed meanwhile, else made now. Entries come bound to inodes
    /// without a kernel reference; the adapter calls
    /// [`S4Fs::entries_sent`] with those that fit in its reply. Entries
    /// that vanished are skipped.
    pub async fn readdirplus(&self, fh: u64, offset: u64) -> FsResult<Vec<PlusEntry>> {
        let h = self.handle(fh)?;
        let Handle::Dir(l) = &*h else {
            return Err(FsError::BadHandle);
        };
        let ahead = lock(&l.ahead).take().filter(|a| a.offset == offset);
        let mut made = "on_request";
        if let Some(ahead) = ahead {
            if let Ok(page) = ahead.page.await {
                if self.changes.unchanged_since(page.mark) {
                    crate::metrics::global().listing_page("ahead");
                    return Ok(page.entries);
                }
                made = "remade";
            }
        }
        crate::metrics::global().listing_page(made);
        let max = l.plus_batch.load(Ordering::Relaxed);
        Ok(self.plus_page(l, offset, max).await.entries)
    }

    /// The READDIRPLUS page of `l` of up to `max` entries at `offset`, and
    /// the change mark it was made at.
    async fn plus_page(&self, l: &Listing, offset: u64, max: usize) -> PlusPage {
        let mark = self.changes.mark();
        let mut out = Vec::with_capacity(max);
        for (i, e) in l.entries.iter().enumerate().skip(offset as usize).take(max) {
            let fixed = |attr| (attr, false);
            let (attr, counted) = if e.name == "." || e.name == ".." {
                let dir = l.path.as_deref().unwrap_or(CONTROL_DIR);
                let (ino, dir) = match e.name.as_str() {
                    "." => (e.ino, dir),
                    _ => (ROOT_INO, ""),
                };
                fixed(self.dir_attr(ino, dir))
            } else if e.ino == CONTROL_DIR_INO {
                fixed(self.control_dir_attr())
            } else if let Some(c) = ControlFile::from_ino(e.ino).filter(|_| l.path.is_none()) {
                fixed(self.control_attr(c))
            } else {
                let child = join(l.path.as_deref().unwrap_or_default(), &e.name);
                let kind = match e.kind {
                    FileKind::Dir => NodeKind::Dir,
                    _ => NodeKind::File,
                };
                let ino = self.bind(&child, kind, false);
                match self.attr_of(ino, &child, kind).await {
                    Ok(attr) => (attr, true),
                    Err(_) => continue,
                }
            };
            out.push(PlusEntry {
                next_offset: i as u64 + 1,
                name: e.name.clone(),
                attr,
                counted,
            });
        }
        PlusPage { mark, entries: out }
    }

    /// The kernel now holds a reference to each of `inos`, sent in a reply
    /// to READDIRPLUS on `fh` that `filled` says whether it filled up. The
    /// page at `resume` (where the kernel asks next) is then made on the
    /// runtime, while the kernel takes in this one and the reader works
    /// through it: a walk's daemon work overlaps its reader's.
    pub fn entries_sent(
        self: &Arc<Self>,
        fh: u64,
        inos: &[u64],
        filled: PlusFill,
        resume: Option<u64>,
    ) {
        {
            let mut inodes = lock(&self.inodes);
            for ino in inos {
                inodes.add_lookup(*ino);
            }
        }
        let Ok(h) = self.handle(fh) else {
            return;
        };
        let Handle::Dir(l) = &*h else {
            return;
        };
        let learned = self.plus_batch.load(Ordering::Relaxed);
        let next = next_plus_batch(l.plus_batch.load(Ordering::Relaxed), filled, learned);
        l.plus_batch.store(next, Ordering::Relaxed);
        self.plus_batch.store(next, Ordering::Relaxed);
        if let Some(offset) = resume {
            let underway = lock(&l.ahead).as_ref().is_some_and(|a| a.offset == offset);
            if !underway {
                self.make_ahead(h.clone(), offset, next);
            }
        }
    }

    /// Starts making the page of `max` entries at `offset` of listing `h`
    /// on the runtime, for [`S4Fs::readdirplus`] to take when asked for it.
    fn make_ahead(self: &Arc<Self>, h: Arc<Handle>, offset: u64, max: usize) {
        let Handle::Dir(l) = &*h else {
            return;
        };
        if offset as usize >= l.entries.len() {
            return;
        }
        let (tx, page) = tokio::sync::oneshot::channel();
        *lock(&l.ahead) = Some(Ahead { offset, page });
        let fs = self.clone();
        self.rt.spawn(async move {
            if let Handle::Dir(l) = &*h {
                let _ = tx.send(fs.plus_page(l, offset, max).await);
            }
        });
    }

    pub fn mkdir(&self, parent: u64, name: &OsStr, mode: u32, caller: Caller) -> FsResult<Attr> {
        self.check_writable()?;
        let (dir, path) = self.new_path(parent, name)?;
        if self.resolve(&path).is_some() {
            return Err(FsError::Exists);
        }
        let now = SystemTime::now();
        let attrs = self.new_attrs(&dir, FileKind::Dir, mode, caller);
        self.db.write(vec![
            Op::SetDir {
                path: path.clone(),
                attrs: Some(attrs),
            },
            self.touch_dir_op(&dir, now),
        ])?;
        self.wrote();
        let ino = lock(&self.inodes).bind(&path, NodeKind::Dir, true);
        Ok(self.dir_attr(ino, &path))
    }

    /// Nothing shown under `path/`: no mappable key, no explicit directory,
    /// no file being created. Hidden keys under it stay as they are.
    pub(super) fn dir_is_empty(&self, path: &str) -> bool {
        let under = format!("{path}/");
        !self.db.read_index(|idx| has_path_under(idx, &under)) && !self.pending_under(&under)
    }

    pub fn rmdir(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        self.check_writable()?;
        let dir = self.dir_path(parent)?;
        let path = join(&dir, existing_name(name)?);
        match self.resolve(&path) {
            None => return Err(FsError::NotFound),
            Some(NodeKind::File) => return Err(FsError::NotDir),
            Some(NodeKind::Dir) if !self.dir_is_empty(&path) => return Err(FsError::NotEmpty),
            Some(NodeKind::Dir) => {}
        }
        self.db.write(vec![
            Op::SetDir {
                path: path.clone(),
                attrs: None,
            },
            self.touch_dir_op(&dir, SystemTime::now()),
        ])?;
        self.wrote();
        lock(&self.inodes).unbind(&path);
        Ok(())
    }
}

/// An open directory: its entries as of opendir, paged through by
/// READDIR and READDIRPLUS.
#[derive(Debug)]
pub(super) struct Listing {
    /// The directory's path; `None` for `.s4db`.
    path: Option<String>,
    entries: Arc<Vec<DirEntry>>,
    /// Entries to prepare for the next READDIRPLUS (`next_plus_batch`).
    plus_batch: AtomicUsize,
    /// The next READDIRPLUS page, being made while the kernel takes in
    /// the last one.
    ahead: Mutex<Option<Ahead>>,
}

/// A READDIRPLUS page made ahead, for the request at `offset`.
#[derive(Debug)]
pub(super) struct Ahead {
    offset: u64,
    page: tokio::sync::oneshot::Receiver<PlusPage>,
}

/// Entries of a READDIRPLUS page, made at change mark `mark`: sent only if
/// nothing changed since (`changes::Changes`).
#[derive(Debug)]
pub(super) struct PlusPage {
    mark: u64,
    entries: Vec<PlusEntry>,
}

/// How a READDIRPLUS reply ended: the kernel's page took `Full(n)` entries
/// and no more, or had `Room` for every entry prepared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlusFill {
    Full(usize),
    Room,
}

/// Entries in a listing's first READDIRPLUS page: few, as that page is made
/// when the kernel asks for it, where the next is made while the first is
/// sent (and is as large as the last listing learned).
pub(super) const FIRST_PLUS_BATCH: usize = 32;
/// More entries than a 128 KiB page (the kernel's largest) can hold.
const MOST_PLUS_BATCH: usize = 1024;

/// How many entries to prepare for the next READDIRPLUS. The kernel's reply
/// page is the reader's `getdents` buffer (32 KiB from glibc's `readdir`,
/// about 200 entries), which the request does not show us: a batch grows
/// while every entry fits and settles just above what a full page took
/// (`learned` is where the last listing settled: a batch that had room grows
/// to at least that at once). A walk of 100,000 keys in 100 directories then
/// makes 705 requests where a fixed 64 made 1,705, and few entries are
/// looked up that do not fit.
fn next_plus_batch(batch: usize, filled: PlusFill, learned: usize) -> usize {
    match filled {
        PlusFill::Full(n) => n + n / 8 + 1,
        PlusFill::Room => (batch * 2).max(learned),
    }
    .min(MOST_PLUS_BATCH)
}

/// A child in a listing: a directory, or a file with the location the
/// index gave it (none for a file being created).
#[derive(Debug, Clone, Copy)]
pub(super) enum Listed {
    Dir,
    File(Option<Location>),
}

/// What the index holds right under a directory.
enum IndexChild<'a> {
    File(&'a str, Location),
    Dir(&'a str),
    /// A key that is not a path (it implies no directory: `a//b` shows no `a`).
    Hidden,
}

fn dir_prefix(dir: &str) -> String {
    if dir.is_empty() {
        String::new()
    } else {
        format!("{dir}/")
    }
}

/// Calls `f` with each key right under `prefix` in order, and once per
/// subdirectory, whose keys are then skipped with one seek. Keys are walked,
/// not looked up one by one: a listing of a directory of a thousand files
/// is one pass over them. Stops when `f` returns false; returns whether the
/// walk reached the end.
fn walk_children<'a>(
    idx: &'a BTreeMap<Key, Location>,
    prefix: &str,
    mut f: impl FnMut(IndexChild<'a>) -> bool,
) -> bool {
    let mut keys = range_from(idx, prefix);
    while let Some((k, loc)) = keys.next() {
        let Some(rest) = k.strip_prefix(prefix) else {
            return true;
        };
        let child = match rest.split_once('/') {
            _ if !key_is_path(k) => IndexChild::Hidden,
            Some((dir, _)) => {
                keys = range_from(idx, &after_subtree(prefix, dir));
                IndexChild::Dir(dir)
            }
            None => IndexChild::File(rest, *loc),
        };
        if !f(child) {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plus_batch_grows_to_the_kernels_page_and_settles_just_above() {
        let page = 204; // a 32 KiB page of 7-character names
        let fill = |batch: usize| {
            if batch > page {
                PlusFill::Full(page)
            } else {
                PlusFill::Room
            }
        };
        let (mut batch, mut learned) = (FIRST_PLUS_BATCH, FIRST_PLUS_BATCH);
        let mut sizes = Vec::new();
        for _ in 0..5 {
            batch = next_plus_batch(batch, fill(batch), learned);
            learned = batch;
            sizes.push(batch);
        }
        assert_eq!(sizes, [64, 128, 256, 230, 230]);
        // The next listing's small first page is followed by a learned one.
        assert_eq!(next_plus_batch(FIRST_PLUS_BATCH, PlusFill::Room, 230), 230);
        assert_eq!(next_plus_batch(800, PlusFill::Room, 230), MOST_PLUS_BATCH);
        // A page that takes nothing still asks for an entry next time.
        assert_eq!(next_plus_batch(64, PlusFill::Full(0), 230), 1);
    }

    fn at(offset: u64) -> Location {
        Location {
            file_id: 1,
            offset,
            length: 10,
        }
    }

    fn strings(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    fn walk(idx: &BTreeMap<Key, Location>, prefix: &str, limit: usize) -> (Vec<String>, bool) {
        let mut seen = Vec::new();
        let complete = walk_children(idx, prefix, |child| {
            seen.push(match child {
                IndexChild::File(name, loc) => format!("{name}@{}", loc.offset),
                IndexChild::Dir(name) => format!("{name}/"),
                IndexChild::Hidden => "hidden".into(),
            });
            seen.len() < limit
        });
        (seen, complete)
    }

    #[test]
    fn a_walk_lists_files_and_each_subdirectory_once_and_stops_when_told() {
        let keys = [
            "a", "b//c", "b/x", "d/e/1", "d/e/2", "d/f", "d0", "d/", "e", "z/y",
        ];
        let idx: BTreeMap<Key, Location> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| (Key::from(*k), at(i as u64)))
            .collect();
        let all = ["a@0", "hidden", "b/", "hidden", "d/", "d0@6", "e@8", "z/"];
        assert_eq!(walk(&idx, "", 100), (strings(&all), true));
        // "d/" (an empty name) and "b//c" are no paths; "d/e" is passed over at once.
        let under_d = ["hidden", "e/", "f@5"];
        assert_eq!(walk(&idx, "d/", 100), (strings(&under_d), true));
        assert_eq!(walk(&idx, "b/", 100), (strings(&["hidden", "x@2"]), true));
        assert_eq!(walk(&idx, "q/", 100), (vec![], true));
        assert_eq!(walk(&idx, "", 3), (strings(&all[..3]), false));
    }
}
