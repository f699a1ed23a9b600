//! Directories: listings (READDIR and READDIRPLUS), mkdir, rmdir.

use super::attrs::Caller;
use super::*;

impl S4Fs {
    /// The children of directory `dir`: one range scan of the index that
    /// skips each subdirectory's keys, plus explicit directories and files
    /// being created.
    pub(super) fn list_children(&self, dir: &str) -> BTreeMap<String, NodeKind> {
        let prefix = if dir.is_empty() {
            String::new()
        } else {
            format!("{dir}/")
        };
        let usable = |c: &str| names::key_is_path(c) && !(dir.is_empty() && c == CONTROL_DIR);
        let mut out = BTreeMap::new();
        self.db.read_index(|idx| {
            let mut start = prefix.clone();
            while let Some((k, _)) = range_from(idx, &start).next() {
                let Some(rest) = k.strip_prefix(&prefix) else {
                    break;
                };
                if !key_is_path(k) {
                    // Hidden keys imply no directory (`a//b` shows no `a`).
                    start = format!("{k}\0");
                    continue;
                }
                match rest.split_once('/') {
                    Some((child, _)) => {
                        if usable(child) {
                            out.insert(child.to_string(), NodeKind::Dir);
                        }
                        start = after_subtree(&prefix, child);
                    }
                    None => {
                        if usable(rest) {
                            out.entry(rest.to_string()).or_insert(NodeKind::File);
                        }
                        start = format!("{k}\0");
                    }
                }
            }
        });
        self.db.read_dirs(|dirs| {
            for (d, _) in range_from(dirs, &prefix) {
                let Some(rest) = d.strip_prefix(&prefix) else {
                    break;
                };
                let child = rest.split('/').next().unwrap_or(rest);
                if usable(child) {
                    out.insert(child.to_string(), NodeKind::Dir);
                }
            }
        });
        let inodes = lock(&self.inodes);
        for ino in lock(&self.open_files).keys() {
            if let Some((p, _)) = inodes.get(*ino) {
                if let Some(rest) = p.strip_prefix(&prefix) {
                    match rest.split_once('/') {
                        Some((child, _)) => {
                            out.insert(child.to_string(), NodeKind::Dir);
                        }
                        None => {
                            out.entry(rest.to_string()).or_insert(NodeKind::File);
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
        let prefix = if dir.is_empty() {
            String::new()
        } else {
            format!("{dir}/")
        };
        let mut subdirs = std::collections::BTreeSet::new();
        let complete = self.db.read_index(|idx| {
            let mut start = prefix.clone();
            for _ in 0..limit {
                let Some((k, _)) = range_from(idx, &start).next() else {
                    return true;
                };
                let Some(rest) = k.strip_prefix(&prefix) else {
                    return true;
                };
                match rest.split_once('/') {
                    Some((child, _)) if key_is_path(k) => {
                        if !(dir.is_empty() && child == CONTROL_DIR) {
                            subdirs.insert(child.to_string());
                        }
                        start = after_subtree(&prefix, child);
                    }
                    _ => start = format!("{k}\0"),
                }
            }
            false
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
                for (name, kind) in children {
                    let path = join(&dir, &name);
                    let kind = match kind {
                        NodeKind::Dir => FileKind::Dir,
                        NodeKind::File => {
                            unknown.push(path.clone());
                            self.db.attrs(&path).map_or(FileKind::Regular, |a| a.kind)
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
        Ok(self.add_handle(Handle::Dir {
            path,
            entries: Arc::new(entries),
        }))
    }

    /// A listing is usually followed by a `stat` of each entry (`ls -l`):
    /// resolve the sizes nobody knows yet now, with requests in parallel.
    pub(super) fn prefetch_sizes(self: &Arc<Self>, paths: Vec<String>) {
        let wanted: Vec<(String, Location)> = paths
            .into_iter()
            .filter_map(|p| self.db.location(&p).map(|l| (p, l)))
            .filter(|(_, l)| self.meta.get(*l).is_none())
            .collect();
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
            Handle::Dir { entries, .. } => Ok(entries.clone()),
            _ => Err(FsError::BadHandle),
        }
    }

    /// Up to `max` entries from `offset` with their attributes (READDIRPLUS:
    /// `ls -l` then needs no lookup per file). Entries come bound to inodes
    /// without a kernel reference; the adapter calls [`S4Fs::entries_sent`]
    /// for those that fit in its reply. Entries that vanished are skipped.
    pub async fn readdirplus(&self, fh: u64, offset: u64, max: usize) -> FsResult<Vec<PlusEntry>> {
        let h = self.handle(fh)?;
        let Handle::Dir { path, entries } = &*h else {
            return Err(FsError::BadHandle);
        };
        let mut out = Vec::with_capacity(max);
        for (i, e) in entries.iter().enumerate().skip(offset as usize).take(max) {
            let fixed = |attr| (attr, false);
            let (attr, counted) = if e.name == "." || e.name == ".." {
                let dir = path.as_deref().unwrap_or(CONTROL_DIR);
                let (ino, dir) = match e.name.as_str() {
                    "." => (e.ino, dir),
                    _ => (ROOT_INO, ""),
                };
                fixed(self.dir_attr(ino, dir))
            } else if e.ino == CONTROL_DIR_INO {
                fixed(self.control_dir_attr())
            } else if let Some(c) = ControlFile::from_ino(e.ino).filter(|_| path.is_none()) {
                fixed(self.control_attr(c))
            } else {
                let child = join(path.as_deref().unwrap_or_default(), &e.name);
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
        Ok(out)
    }

    /// The kernel now holds a reference to each of these inodes.
    pub fn entries_sent(&self, inos: &[u64]) {
        let mut inodes = lock(&self.inodes);
        for ino in inos {
            inodes.add_lookup(*ino);
        }
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
