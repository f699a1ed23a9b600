//! Files: open, read, write, the put at close or fsync, truncate, unlink and rename.

use super::attrs::{Caller, SetAttr};
use super::*;

impl S4Fs {
    /// The shared state of `ino`'s open file, made if this is the first handle.
    pub(super) fn open_file(&self, ino: u64, fresh: impl FnOnce() -> FileData) -> Arc<OpenFile> {
        let mut files = lock(&self.open_files);
        let open = files.entry(ino).or_insert_with(|| {
            Arc::new(OpenFile {
                data: tokio::sync::Mutex::new(fresh()),
                handles: AtomicU64::new(0),
            })
        });
        open.handles.fetch_add(1, Ordering::Relaxed);
        open.clone()
    }

    pub(super) fn unloaded(&self) -> FileData {
        FileData {
            content: None,
            base: None,
            open_loc: None,
            binary: false,
            dirty: false,
            unlinked: false,
            mtime: SystemTime::now(),
        }
    }

    /// create(2): the new file is a key at once (an empty value with its
    /// attributes), so every other call sees it as any file.
    pub async fn create(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        flags: i32,
        caller: Caller,
    ) -> FsResult<(Attr, Opened)> {
        self.check_writable()?;
        let (dir, path) = self.new_path(parent, name)?;
        match self.resolve(&path) {
            Some(NodeKind::Dir) => return Err(FsError::IsDir),
            Some(NodeKind::File) if flags & libc::O_EXCL != 0 => return Err(FsError::Exists),
            Some(NodeKind::File) => {
                let ino = self.bind(&path, NodeKind::File, true);
                let opened = self.open(ino, flags).await?;
                return Ok((self.attr_of(ino, &path, NodeKind::File).await?, opened));
            }
            None => {}
        }
        let loc = self.make_node(
            &dir,
            &path,
            FileKind::Regular,
            mode,
            0,
            caller,
            Value::Text(String::new()),
        )?;
        let ino = self.bind(&path, NodeKind::File, true);
        let open = self.open_file(ino, || FileData {
            content: Some(Content::empty(&self.cfg.spill_dir)),
            base: Some(loc),
            open_loc: Some(loc),
            ..self.unloaded()
        });
        lock(&self.cached).insert(ino, loc);
        let fh = self.add_handle(Handle::File {
            ino,
            open,
            append: flags & libc::O_APPEND != 0,
            writable: true,
        });
        let attr = self.attr_of(ino, &path, NodeKind::File).await?;
        Ok((
            attr,
            Opened {
                fh,
                keep_cache: false,
                direct_io: false,
            },
        ))
    }

    /// Puts a new node's key (its value and attributes) and touches its
    /// directory, in one batch. Returns where the value went.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn make_node(
        &self,
        dir: &str,
        path: &str,
        kind: FileKind,
        mode: u32,
        rdev: u64,
        caller: Caller,
        value: Value,
    ) -> FsResult<Location> {
        let now = SystemTime::now();
        let mut attrs = self.new_attrs(dir, kind, mode, caller);
        attrs.rdev = rdev;
        (attrs.atime, attrs.mtime, attrs.ctime) = (now, now, now);
        let len = value.len() as u64;
        let placed = self.db.write(vec![
            Op::Put {
                key: path.to_string(),
                value,
                attrs: Some(attrs),
            },
            self.touch_dir_op(dir, now),
        ])?;
        let loc = placed[0].expect("a put is always placed");
        self.meta.insert(loc, ValueMeta { len, mtime: now });
        self.wrote();
        Ok(loc)
    }

    pub async fn open(&self, ino: u64, flags: i32) -> FsResult<Opened> {
        let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
        // No O_TRUNC here: without FUSE_ATOMIC_O_TRUNC (see `fuse::init`)
        // the kernel truncates with a SETATTR once its own checks passed.
        if let Some(c) = ControlFile::from_ino(ino) {
            if writable && !c.is_action() {
                return Err(FsError::NotPermitted("this control file is read-only"));
            }
            let snapshot = if c.is_action() {
                c.help().as_bytes().to_vec()
            } else {
                self.control_contents(c)
            };
            let fh = self.add_handle(Handle::Control { file: c, snapshot });
            return Ok(Opened {
                fh,
                keep_cache: false,
                direct_io: true,
            });
        }
        let (path, kind) = self.node(ino)?;
        if kind == NodeKind::Dir {
            return Err(FsError::IsDir);
        }
        if writable {
            self.check_writable()?;
        }
        let loc = self.location_of(ino, &path);
        if loc.is_none() && !self.created_open_file(&path) {
            return Err(FsError::NotFound);
        }
        let open = self.open_file(ino, || self.unloaded());
        {
            let mut d = open.data.lock().await;
            // A clean copy of a value that changed since (another writer, a
            // rename onto this name) is dropped and read again.
            if !d.dirty && d.content.is_some() && d.base != loc {
                d.content = None;
            }
            if d.content.is_none() {
                d.open_loc = loc;
            }
        }
        let keep_cache = !writable && loc.is_some() && lock(&self.cached).get(&ino) == loc.as_ref();
        let fh = self.add_handle(Handle::File {
            ino,
            open,
            append: flags & libc::O_APPEND != 0,
            writable,
        });
        Ok(Opened {
            fh,
            keep_cache,
            direct_io: false,
        })
    }

    /// Loads the value into `d` if no read or write has needed it yet.
    /// Returns whether it was already there (a cache hit). For a write (an
    /// append or a partial overwrite of a cold small file, as a loop over a
    /// directory does), the neighbours come along as for a rename; a read
    /// stays exactly one range GET.
    pub(super) async fn ensure_loaded(
        &self,
        ino: u64,
        path: &str,
        d: &mut FileData,
        for_write: bool,
    ) -> FsResult<bool> {
        match &d.content {
            // A value read from S3 part by part is loaded whole to be changed.
            Some(c) if for_write && c.is_streaming() => d.content = None,
            Some(_) => return Ok(true),
            None => {}
        }
        let loc = d.open_loc.or_else(|| self.location_of(ino, path));
        let spill = &self.cfg.spill_dir;
        let mut binary = false;
        d.content = Some(match loc {
            None => Content::empty(spill),
            Some(loc) => match self.small_values.take(loc) {
                Some(v) => {
                    binary = v.is_binary();
                    Content::from_bytes(v.into_bytes(), spill)?
                }
                None if self
                    .meta
                    .get(loc)
                    .is_some_and(|m| m.len > content::SPILL_BYTES) =>
                {
                    // A large value is not held in memory: read from S3
                    // part by part as it is read, or straight into a
                    // temporary file.
                    off_session_thread().await;
                    match self.stream_value(path, loc, for_write).await? {
                        Some((stream, bin)) => {
                            binary = bin;
                            Content::streaming(stream, spill)
                        }
                        None => {
                            let file = Content::spill_file(spill)?;
                            let len;
                            (len, binary) = self.db.get_into_file(path, loc, &file).await?;
                            Content::from_spill_file(file, len, spill)
                        }
                    }
                }
                None => {
                    let small = loc.length <= SMALL_ENTRY;
                    let near = if for_write && small {
                        self.fetch_with_neighbours(path, loc).await
                    } else if small && self.is_scan(loc) {
                        self.fetch_scan_window(path, loc).await
                    } else {
                        None
                    };
                    let got = match near {
                        Some(v) => Ok(v),
                        None => self.db.get_at(path, loc).await,
                    };
                    let v = match got {
                        // Another writer's compaction removed that version's
                        // file: read what the name holds now.
                        Err(crate::Error::Store(crate::remote::StoreError::NotFound {
                            ..
                        })) => self.db.get(path).await?.ok_or(FsError::NotFound)?,
                        other => other?,
                    };
                    binary = v.is_binary();
                    Content::from_bytes(v.into_bytes(), spill)?
                }
            },
        });
        d.base = loc;
        d.binary = binary;
        if let Some(loc) = loc {
            if let Some(m) = self.meta.get(loc) {
                d.mtime = m.mtime;
            }
            lock(&self.cached).insert(ino, loc);
        }
        Ok(false)
    }

    /// A read of a large cold value: parallel part GETs, served from memory
    /// as they arrive (see `stream`). `None` when the value is not one to
    /// stream (its data file is here, it is compressed, or this is a write,
    /// which needs it whole anyway).
    async fn stream_value(
        &self,
        path: &str,
        loc: Location,
        for_write: bool,
    ) -> FsResult<Option<(stream::Stream, bool)>> {
        if for_write {
            return Ok(None);
        }
        let local = self.db.local_dir()?;
        if local
            .size_of(loc.file_id)?
            .is_some_and(|n| n >= loc.offset + loc.length as u64)
        {
            return Ok(None);
        }
        let object = format!(
            "{}{}",
            self.db.prefix(),
            crate::format::data_file_name(loc.file_id)
        );
        // The parts are meant to be in flight together: past the coalescer,
        // which would hold all but two of them back to merge them.
        let opened = stream::open(
            self.store.clone(),
            object,
            path,
            loc,
            self.cfg.stream,
            &self.rt,
        )
        .await?;
        Ok(match opened {
            stream::Opening::Streaming(s, binary) => Some((s, binary)),
            stream::Opening::Whole => None,
        })
    }

    pub async fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        match &*self.handle(fh)? {
            Handle::Control { snapshot, .. } => {
                let start = (offset as usize).min(snapshot.len());
                let end = (start + size as usize).min(snapshot.len());
                Ok(snapshot[start..end].to_vec())
            }
            Handle::Dir(_) => Err(FsError::IsDir),
            Handle::File { ino, open, .. } => {
                let (path, _) = self.node(*ino)?;
                let mut d = open.data.lock().await;
                if self.ensure_loaded(*ino, &path, &mut d, false).await? {
                    self.cache_hits.fetch_add(1, Ordering::Relaxed);
                } else if !d.dirty && !d.unlinked {
                    self.relatime(*ino, &path, d.base);
                }
                let content = d.content.as_ref().expect("loaded");
                let read = content.read(offset, size).await;
                if read.is_err() && content.is_streaming() {
                    // A failed part or a CRC mismatch: every later read of
                    // this open fails too (the kernel retries a failed
                    // readahead), and the next open starts over and drops
                    // the pages read so far.
                    lock(&self.cached).remove(ino);
                }
                Ok(read?)
            }
        }
    }

    /// Writes into the open file (or runs a control operation). Returns the
    /// bytes taken.
    pub async fn write(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        let h = self.handle(fh)?;
        match &*h {
            Handle::Control { file, .. } => {
                self.run_control(*file).await?;
                Ok(data.len() as u32)
            }
            Handle::Dir(_) => Err(FsError::IsDir),
            Handle::File {
                ino,
                open,
                append,
                writable,
            } => {
                if !*writable {
                    return Err(FsError::BadHandle);
                }
                self.check_writable()?;
                let (path, _) = self.node(*ino)?;
                let mut d = open.data.lock().await;
                self.ensure_loaded(*ino, &path, &mut d, true).await?;
                let content = d.content.as_mut().expect("loaded");
                let offset = if *append { content.len() } else { offset };
                let end = offset + data.len() as u64;
                check_entry_size(&path, end)?;
                content.write(offset, data)?;
                self.write_behind(&path, content, offset, data.len() as u64)
                    .await;
                d.dirty = true;
                d.mtime = SystemTime::now();
                Ok(data.len() as u32)
            }
        }
    }

    /// Puts the open file's bytes if they changed: the one put per close.
    pub(super) async fn commit_open(&self, ino: u64, open: &OpenFile) -> FsResult<()> {
        let mut d = open.data.lock().await;
        if !d.dirty || d.unlinked {
            return Ok(());
        }
        let (path, _) = self.node(ino)?;
        // Parts of a large value already sent: kept if the value is still
        // the one they were cut for (dropped, and so aborted, otherwise).
        let behind = d.content.as_mut().and_then(|c| c.take_write_behind());
        let ahead = behind.and_then(|b| b.finish(&path));
        let content = d.content.as_ref().expect("dirty content is loaded");
        let len = content.len();
        check_entry_size(&path, len)?;
        // The file's attributes, with the content times of this put; every
        // name of a hard-linked file gets the same bytes.
        let now = SystemTime::now();
        let mut attrs = match d.base.and_then(|l| self.db.attrs_at(&path, l)) {
            Some(a) => (*a).clone(),
            None => match self.db.attrs(&path) {
                Some(a) => (*a).clone(),
                None => self.default_file_attrs(d.mtime),
            },
        };
        attrs.mtime = d.mtime;
        attrs.ctime = now.max(d.mtime);
        let mut others = match attrs.link_id {
            0 => Vec::new(),
            id => self.db.link_members(id),
        };
        others.retain(|k| *k != path);
        let (loc, binary, sealed) = if content.is_spilled() {
            // Too large to hold: streamed from the spill file as a raw entry.
            off_session_thread().await;
            let binary = !content.is_utf8()?;
            let attrs_of = Some(attrs.clone());
            let in_place = content
                .data_file_layout()
                .filter(|(_, _, base)| *base == S4db::own_file_value_offset(&path));
            // The value's own data file when its upload went ahead (linked
            // into place when it is laid out as one), else the active file.
            let db = &self.db;
            let mut sealed = false;
            let own = match (ahead, in_place) {
                (Some(ahead), Some((file, tmp, _))) => {
                    let placed =
                        db.put_own_file_in_place(&path, file, tmp, len, binary, attrs_of, ahead)?;
                    sealed = placed.is_some();
                    placed
                }
                (Some(ahead), None) => {
                    let mut reader = content.reader();
                    Some(db.put_own_file(&path, &mut reader, len, binary, attrs_of, ahead)?)
                }
                (None, _) => None,
            };
            let loc = match own {
                Some(loc) => loc,
                None => {
                    let attrs_of = Some(attrs.clone());
                    db.put_from_reader(&path, &mut content.reader(), len, binary, attrs_of)?
                }
            };
            for other in &others {
                self.db.put_from_reader(
                    other,
                    &mut content.reader(),
                    len,
                    binary,
                    Some(attrs.clone()),
                )?;
            }
            (loc, binary, sealed)
        } else {
            if let Some(ahead) = ahead {
                self.db.abort_early_upload(ahead);
            }
            let value = Value::from_bytes_guess(content.to_vec()?);
            let binary = value.is_binary();
            let mut ops = vec![Op::Put {
                key: path.clone(),
                value: value.clone(),
                attrs: Some(attrs.clone()),
            }];
            ops.extend(others.iter().map(|k| Op::Put {
                key: k.clone(),
                value: value.clone(),
                attrs: Some(attrs.clone()),
            }));
            let placed = self.db.write(ops)?;
            for (k, l) in others.iter().zip(&placed[1..]) {
                if let Some(l) = l {
                    let _ = k;
                    self.meta.insert(
                        *l,
                        ValueMeta {
                            len,
                            mtime: d.mtime,
                        },
                    );
                }
            }
            (placed[0].expect("a put is always placed"), binary, false)
        };
        if sealed {
            // Its file is the data file now: a later write copies it out.
            d.content.as_mut().expect("loaded").seal();
        }
        self.meta.insert(
            loc,
            ValueMeta {
                len,
                mtime: d.mtime,
            },
        );
        // The kernel's pages hold what was written: they stay valid.
        lock(&self.cached).insert(ino, loc);
        d.base = Some(loc);
        d.binary = binary;
        d.dirty = false;
        drop(d);
        self.wrote();
        Ok(())
    }

    pub async fn flush(&self, fh: u64) -> FsResult<()> {
        if let Handle::File { ino, open, .. } = &*self.handle(fh)? {
            self.commit_open(*ino, open).await?;
        }
        Ok(())
    }

    /// A put, then the data file and pending list made durable on disk.
    pub async fn fsync(&self, fh: u64) -> FsResult<()> {
        self.flush(fh).await?;
        off_session_thread().await;
        self.db.flush()?;
        Ok(())
    }

    pub async fn release(&self, fh: u64) -> FsResult<()> {
        let h = lock(&self.handles).remove(&fh).ok_or(FsError::BadHandle)?;
        if let Handle::File { ino, open, .. } = &*h {
            let result = self.commit_open(*ino, open).await;
            let last = {
                let mut files = lock(&self.open_files);
                let last = open.handles.fetch_sub(1, Ordering::Relaxed) == 1;
                if last {
                    files.remove(ino);
                }
                last
            };
            result?;
            if last {
                self.keep_small_value(open).await;
            }
        }
        Ok(())
    }

    /// The last handle closed: a small clean value stays in the cache, so
    /// the `>>` or `sed -i` that often follows a read needs no GET.
    pub(super) async fn keep_small_value(&self, open: &OpenFile) {
        let d = open.data.lock().await;
        if let (Some(c), Some(loc), false) = (&d.content, d.base, d.dirty) {
            if c.is_in_memory() && c.len() <= SMALL_ENTRY as u64 {
                let value = match c.to_vec() {
                    Ok(bytes) if d.binary => Value::Binary(bytes),
                    Ok(bytes) => match String::from_utf8(bytes) {
                        Ok(text) => Value::Text(text),
                        Err(_) => return, // not what was stored: never cache it
                    },
                    Err(_) => return,
                };
                self.small_values.insert(loc, value);
            }
        }
    }

    pub fn releasedir(&self, fh: u64) {
        lock(&self.handles).remove(&fh);
    }

    /// chmod, chown, utimens and truncate. The kernel has checked who may
    /// do it (`default_permissions`) and cleared setuid/setgid where Linux
    /// does; the new attributes are kept with the value's entry (the value
    /// is not rewritten) and published with the next upload.
    pub async fn setattr(&self, ino: u64, set: SetAttr) -> FsResult<Attr> {
        if ControlFile::from_ino(ino).is_some() || ino == CONTROL_DIR_INO {
            return self.getattr(ino).await;
        }
        self.check_writable()?;
        let (path, kind) = match ino {
            ROOT_INO => (String::new(), NodeKind::Dir),
            _ => self.node(ino)?,
        };
        if kind == NodeKind::Dir {
            if set.size.is_some() {
                return Err(FsError::IsDir);
            }
            self.set_metadata(ino, &path, kind, &set, false).await?;
            return Ok(self.dir_attr(ino, &path));
        }
        let now = SystemTime::now();
        let mtime = set.mtime.map(|t| t.resolve(now));
        if set.size.is_some() || mtime.is_some() {
            if self.location_of(ino, &path).is_none() && !self.created_open_file(&path) {
                return Err(FsError::NotFound);
            }
            let open = self.open_file(ino, || self.unloaded());
            let result = self.change_open(ino, &path, &open, set.size, mtime).await;
            let mut files = lock(&self.open_files);
            if open.handles.fetch_sub(1, Ordering::Relaxed) == 1 {
                files.remove(&ino);
            }
            drop(files);
            result?;
        }
        self.set_metadata(ino, &path, kind, &set, set.size.is_some())
            .await?;
        self.attr_of(ino, &path, kind).await
    }

    pub(super) async fn change_open(
        &self,
        ino: u64,
        path: &str,
        open: &OpenFile,
        size: Option<u64>,
        mtime: Option<SystemTime>,
    ) -> FsResult<()> {
        let mut d = open.data.lock().await;
        if let Some(size) = size {
            check_entry_size(path, size)?;
            if size == 0 {
                d.content = Some(Content::empty(&self.cfg.spill_dir));
            } else {
                self.ensure_loaded(ino, path, &mut d, true).await?;
            }
            d.content.as_mut().expect("loaded").truncate(size)?;
            d.dirty = true;
            d.mtime = SystemTime::now();
        }
        if let Some(t) = mtime {
            d.mtime = t;
            if !d.dirty {
                if let Some(loc) = self.db.location(path) {
                    let m = self.value_meta(path, loc).await?;
                    self.meta.insert(loc, ValueMeta { mtime: t, ..m });
                }
            }
        }
        let only_handle = open.handles.load(Ordering::Relaxed) == 1;
        drop(d);
        if only_handle {
            // A truncate(2) by path: no close will follow, so put now.
            self.commit_open(ino, open).await?;
        }
        Ok(())
    }

    pub fn unlink(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        self.check_writable()?;
        let dir = self.dir_path(parent)?;
        let path = join(&dir, existing_name(name)?);
        match self.resolve(&path) {
            None => return Err(FsError::NotFound),
            Some(NodeKind::Dir) => return Err(FsError::IsDir),
            Some(NodeKind::File) => {}
        }
        let now = SystemTime::now();
        let ino = lock(&self.inodes).ino_of(&path);
        let (others, mut ops) = self.remaining_names(&path, now);
        if others.is_empty() {
            self.detach(&path);
        }
        ops.push(self.touch_dir_op(&dir, now));
        if self.db.contains_key(&path) {
            ops.push(Op::Delete { key: path.clone() });
        }
        self.db.write(ops)?;
        self.wrote();
        let mut inodes = lock(&self.inodes);
        inodes.unbind(&path);
        match (ino, others.first()) {
            (Some(ino), Some(other)) => inodes.repoint(ino, other),
            _ => {
                drop(inodes);
                self.drop_open_file(&path);
            }
        }
        Ok(())
    }

    /// Before name `path` goes (unlink, or a rename over it): the other
    /// names of its hard-linked file, and the changes that give them one
    /// link fewer (a new ctime; a last name is an ordinary file again).
    pub(super) fn remaining_names(&self, path: &str, now: SystemTime) -> (Vec<String>, Vec<Op>) {
        let Some(a) = self.db.attrs(path).filter(|a| a.link_id != 0) else {
            return (Vec::new(), Vec::new());
        };
        let others: Vec<String> = self
            .db
            .link_members(a.link_id)
            .into_iter()
            .filter(|k| k != path)
            .collect();
        let mut a = (*a).clone();
        a.ctime = now;
        if others.len() == 1 {
            a.link_id = 0;
        }
        let ops = others
            .iter()
            .map(|k| Op::SetAttrs {
                key: k.clone(),
                attrs: a.clone(),
            })
            .collect();
        (others, ops)
    }

    /// The file at `path` is gone (unlinked or replaced): an open copy of it
    /// must not be put back by a later close.
    pub(super) fn drop_open_file(&self, path: &str) {
        let ino = lock(&self.inodes).ino_of(path);
        let open = ino.and_then(|i| lock(&self.open_files).get(&i).cloned());
        if let Some(open) = open {
            // Uncontended unless a put of it runs right now; then it lands
            // first and the delete after it still wins.
            if let Ok(mut d) = open.data.try_lock() {
                d.unlinked = true;
            }
        }
    }

    /// Puts every open file at or under `path` that has unput bytes.
    pub(super) async fn commit_open_under(&self, path: &str) -> FsResult<()> {
        let under = format!("{path}/");
        let opens: Vec<(u64, Arc<OpenFile>)> = {
            let inodes = lock(&self.inodes);
            lock(&self.open_files)
                .iter()
                .filter(|(i, _)| {
                    inodes
                        .get(**i)
                        .is_some_and(|(p, _)| p == path || p.starts_with(&under))
                })
                .map(|(i, o)| (*i, o.clone()))
                .collect()
        };
        for (ino, open) in opens {
            self.commit_open(ino, &open).await?;
        }
        Ok(())
    }

    /// The values of `keys` (at `locs`, as looked up just before): those a
    /// `stat` or a read left in the small-value cache cost nothing, the rest
    /// are fetched together.
    async fn values_of(
        &self,
        keys: &[&str],
        locs: &[Option<Location>],
    ) -> FsResult<Vec<Option<Value>>> {
        let mut values: Vec<Option<Value>> = locs
            .iter()
            .map(|l| l.and_then(|l| self.small_values.take(l)))
            .collect();
        let missing: Vec<usize> = (0..keys.len()).filter(|&i| values[i].is_none()).collect();
        if let [i] = missing[..] {
            // One cold file, as each `mv` of a loop over a directory asks:
            // its neighbours come along, so the next `mv`s need no request.
            if let Some(loc) = locs[i] {
                if let Some(v) = self.fetch_with_neighbours(keys[i], loc).await {
                    values[i] = Some(v);
                    return Ok(values);
                }
            }
        }
        let wanted: Vec<&str> = missing.iter().map(|&i| keys[i]).collect();
        for (i, v) in missing.into_iter().zip(self.db.get_many(&wanted).await?) {
            values[i] = v;
        }
        Ok(values)
    }

    /// The value of `key` at `loc`, fetched together with the small entries
    /// near it in the same data file that belong to other keys of its
    /// directory (within and at most [`NEIGHBOUR_BYTES`], in as few range GETs
    /// as their gaps allow), which go to the small-value cache with their
    /// sizes. `None` when that read fails: the caller
    /// reads the value alone and reports its error.
    pub(super) async fn fetch_with_neighbours(&self, key: &str, loc: Location) -> Option<Value> {
        let dir = key.rfind('/').map_or("", |i| &key[..=i]);
        let mut wanted = vec![(key.to_string(), loc)];
        self.db.read_index(|idx| {
            let mut bytes = 0u64;
            for (k, l) in range_from(idx, dir)
                .take_while(|(k, _)| k.starts_with(dir))
                .take(NEIGHBOUR_SCAN)
            {
                let near =
                    l.offset != loc.offset && l.offset.abs_diff(loc.offset) < NEIGHBOUR_BYTES;
                if l.file_id == loc.file_id && near && l.length <= SMALL_ENTRY {
                    bytes += l.length as u64;
                    if bytes > NEIGHBOUR_BYTES {
                        break;
                    }
                    wanted.push((k.to_string(), *l));
                }
            }
        });
        self.fetch_group(loc.file_id, &wanted).await
    }

    /// Reads `wanted` (entries of data file `file_id`, the one asked for
    /// first) in as few range GETs as their gaps allow; the others go to the
    /// small-value cache with their sizes. `None` when the read fails.
    pub(super) async fn fetch_group(
        &self,
        file_id: u64,
        wanted: &[(String, Location)],
    ) -> Option<Value> {
        let mut values = self.db.get_at_many(file_id, wanted).await.ok()?.into_iter();
        let own = values.next()?.ok()?;
        for ((_, l), v) in wanted.iter().skip(1).zip(values) {
            if let Ok(v) = v {
                if self.meta.get(*l).is_none() {
                    let (len, mtime) = (v.len() as u64, SystemTime::now());
                    self.meta.insert(*l, ValueMeta { len, mtime });
                }
                self.small_values.insert(*l, v);
            }
        }
        Some(own)
    }

    /// rename(2): the new keys and the tombstones of the old ones in one
    /// batch, so readers and the next upload see all of it or none.
    pub async fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        flags: u32,
    ) -> FsResult<()> {
        self.check_writable()?;
        if flags & libc::RENAME_EXCHANGE != 0 {
            return Err(FsError::InvalidArgument("RENAME_EXCHANGE is not supported"));
        }
        let from_dir = self.dir_path(parent)?;
        let from = join(&from_dir, existing_name(name)?);
        let (to_dir, to) = self.new_path(new_parent, new_name)?;
        let src = self.resolve(&from).ok_or(FsError::NotFound)?;
        if from == to {
            return Ok(());
        }
        let dst = self.resolve(&to);
        if flags & libc::RENAME_NOREPLACE != 0 && dst.is_some() {
            return Err(FsError::Exists);
        }
        if to.starts_with(&format!("{from}/")) {
            return Err(FsError::InvalidArgument(
                "cannot move a directory into itself",
            ));
        }
        match (src, dst) {
            (NodeKind::File, Some(NodeKind::Dir)) => return Err(FsError::IsDir),
            (NodeKind::Dir, Some(NodeKind::File)) => return Err(FsError::NotDir),
            (NodeKind::Dir, Some(NodeKind::Dir)) if !self.dir_is_empty(&to) => {
                return Err(FsError::NotEmpty)
            }
            _ => {}
        }
        self.commit_open_under(&from).await?;
        let moves: Vec<(String, String)> = match src {
            NodeKind::File => vec![(from.clone(), to.clone())],
            NodeKind::Dir => {
                let under = format!("{from}/");
                self.db.read_index(|idx| {
                    range_from(idx, &under)
                        .take_while(|(k, _)| k.starts_with(&under))
                        .filter(|(k, _)| key_is_path(k) && !is_shadowed(idx, k))
                        .map(|(k, _)| (k.to_string(), format!("{to}{}", &k[from.len()..])))
                        .collect()
                })
            }
        };
        let old: Vec<&str> = moves.iter().map(|(f, _)| f.as_str()).collect();
        let locs: Vec<Option<Location>> = old.iter().map(|k| self.db.location(k)).collect();
        let values = self.values_of(&old, &locs).await?;
        let now = SystemTime::now();
        let mut ops = Vec::with_capacity(moves.len() * 2 + 4);
        for ((f, t), v) in moves.iter().zip(values) {
            // A key deleted meanwhile is simply not moved.
            if let Some(v) = v {
                let attrs = self.db.attrs(f).map(|a| {
                    let mut a = (*a).clone();
                    a.ctime = now;
                    a
                });
                ops.push(Op::Put {
                    key: t.clone(),
                    value: v,
                    attrs,
                });
                ops.push(Op::Delete { key: f.clone() });
            }
        }
        let mut dst_others = Vec::new();
        if dst == Some(NodeKind::File) {
            let (others, more) = self.remaining_names(&to, now);
            ops.extend(more);
            if others.is_empty() {
                self.drop_open_file(&to);
                self.detach(&to);
            }
            dst_others = others;
        }
        if src == NodeKind::Dir {
            // Explicit directories move along; the directory itself stays
            // explicit where it lands (it may hold no key).
            let under = format!("{from}/");
            let moved: Vec<(String, Arc<crate::db::attrs::Attrs>)> = self.db.read_dirs(|dirs| {
                range_from(dirs, &from)
                    .take_while(|(d, _)| **d == from || d.starts_with(&under))
                    .filter(|(d, _)| **d == from || d.starts_with(&under))
                    .map(|(d, a)| (d.to_string(), a.clone()))
                    .collect()
            });
            if dst == Some(NodeKind::Dir) {
                ops.push(Op::SetDir {
                    path: to.clone(),
                    attrs: None,
                });
            }
            let mut own = (*self.dir_attrs_of(&from)).clone();
            own.ctime = now;
            for (d, a) in &moved {
                ops.push(Op::SetDir {
                    path: d.clone(),
                    attrs: None,
                });
                if *d != from {
                    ops.push(Op::SetDir {
                        path: format!("{to}{}", &d[from.len()..]),
                        attrs: Some((**a).clone()),
                    });
                }
            }
            ops.push(Op::SetDir {
                path: to.clone(),
                attrs: Some(own),
            });
        }
        ops.push(self.touch_dir_op(&from_dir, now));
        if to_dir != from_dir {
            ops.push(self.touch_dir_op(&to_dir, now));
        }
        let placed = self.db.write(ops)?;
        // Values did not change: their sizes and mtimes move with them.
        for (old_loc, new_loc) in locs.iter().zip(placed.iter().step_by(2)) {
            if let (Some(o), Some(n)) = (old_loc, new_loc) {
                if let Some(m) = self.meta.get(*o) {
                    self.meta.insert(*n, m);
                }
            }
        }
        let mut inodes = lock(&self.inodes);
        let replaced = inodes.ino_of(&to);
        inodes.rename(&from, &to);
        if let (Some(ino), Some(other)) = (replaced, dst_others.first()) {
            inodes.repoint(ino, other);
        }
        drop(inodes);
        self.wrote();
        Ok(())
    }
}

/// Called before long synchronous work (copying a large value, fsync): the
/// FUSE adapter runs each call on its session thread until it first waits, so
/// this wait moves the rest to a runtime worker and the session thread goes
/// back to serving other requests.
pub(super) async fn off_session_thread() {
    tokio::task::yield_now().await;
}

/// How far around a cold value a rename reads its directory's neighbours, and
/// how many of the directory's keys it looks at to find them.
const NEIGHBOUR_BYTES: u64 = 1024 * 1024;
const NEIGHBOUR_SCAN: usize = 16 * 1024;
