//! What `stat` shows and what chmod, chown, utimens and the xattr calls
//! change. Attributes live in the engine (`crate::db::attrs`), bound to the
//! entry they describe; a key without a record (written by the Python
//! package) shows the mount's defaults. The kernel checks permissions from
//! these attributes (`default_permissions`), including who may chmod, chown
//! and set times; this layer keeps what it is told and applies the rules the
//! kernel leaves to the filesystem (setgid directories, ctime).

use super::*;
use crate::db::attrs::{Attrs, FileKind, Op, MAX_XATTR_NAME, MAX_XATTR_TOTAL, MAX_XATTR_VALUE};

/// Entries a directory's `stat` looks at to count its subdirectories.
const NLINK_SCAN: usize = 4096;

/// Who makes a call: new files and directories get this owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

impl Caller {
    pub const ROOT: Caller = Caller { uid: 0, gid: 0 };
}

/// A time that setattr sets: a given one, or the time of the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetTime {
    At(SystemTime),
    Now,
}

impl SetTime {
    pub(super) fn resolve(self, now: SystemTime) -> SystemTime {
        match self {
            SetTime::At(t) => t,
            SetTime::Now => now,
        }
    }
}

/// What a setattr call changes (`None`: left as it is).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
    pub ctime: Option<SystemTime>,
}

impl SetAttr {
    pub fn size(size: u64) -> SetAttr {
        SetAttr {
            size: Some(size),
            ..SetAttr::default()
        }
    }

    pub fn mtime(t: SystemTime) -> SetAttr {
        SetAttr {
            mtime: Some(SetTime::At(t)),
            ..SetAttr::default()
        }
    }

    fn changes_metadata(&self) -> bool {
        self.mode.is_some()
            || self.uid.is_some()
            || self.gid.is_some()
            || self.atime.is_some()
            || self.mtime.is_some()
            || self.ctime.is_some()
    }
}

/// How setxattr treats an existing attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XattrMode {
    /// Create or replace.
    Any,
    /// XATTR_CREATE: fail with EEXIST if it exists.
    Create,
    /// XATTR_REPLACE: fail with ENODATA if it does not.
    Replace,
}

/// The namespaces kept; `system.*` (ACLs) is refused so tools do not
/// believe ACLs are enforced.
fn check_xattr_name(name: &[u8]) -> FsResult<()> {
    if name.is_empty() || name.len() > MAX_XATTR_NAME {
        return Err(FsError::XattrRange);
    }
    let kept = [&b"user."[..], b"trusted.", b"security."];
    if kept
        .iter()
        .any(|p| name.starts_with(p) && name.len() > p.len())
    {
        Ok(())
    } else {
        Err(FsError::NotSupported(
            "only user.*, trusted.* and security.* extended attributes are kept",
        ))
    }
}

impl S4Fs {
    /// The attributes a key without a record shows.
    pub(super) fn default_file_attrs(&self, mtime: SystemTime) -> Attrs {
        let mut a = Attrs::new(
            FileKind::Regular,
            self.cfg.file_mode,
            self.cfg.uid,
            self.cfg.gid,
        );
        (a.atime, a.mtime, a.ctime) = (mtime, mtime, mtime);
        a
    }

    /// The attributes of directory `path` ("" is the root): its record, or
    /// the mount's defaults for a directory only keys imply.
    pub(super) fn dir_attrs_of(&self, path: &str) -> Arc<Attrs> {
        self.db.dir_attrs(path).unwrap_or_else(|| {
            let mut a = Attrs::new(FileKind::Dir, self.cfg.dir_mode, self.cfg.uid, self.cfg.gid);
            (a.atime, a.mtime, a.ctime) = (self.started, self.started, self.started);
            Arc::new(a)
        })
    }

    /// The attributes of the file `key` at `loc`, or the defaults.
    pub(super) async fn file_attrs_at(&self, key: &str, loc: Location) -> FsResult<(Attrs, u64)> {
        let m = self.value_meta(key, loc).await?;
        let attrs = match self.db.attrs_at(key, loc) {
            Some(a) => (*a).clone(),
            None => self.default_file_attrs(m.mtime),
        };
        Ok((attrs, m.len))
    }

    /// `stat` of a node from its attributes.
    pub(super) fn attr_from(&self, ino: u64, a: &Attrs, size: u64, nlink: u32) -> Attr {
        Attr {
            ino,
            kind: a.kind,
            size,
            perm: a.mode & 0o7777,
            uid: a.uid,
            gid: a.gid,
            rdev: a.rdev as u32,
            nlink,
            atime: a.atime,
            mtime: a.mtime,
            ctime: a.ctime,
        }
    }

    /// Names of the file: 1, or its hard-link group's size.
    pub(super) fn nlink_of(&self, a: &Attrs) -> u32 {
        match a.link_id {
            0 => 1,
            id => self.db.link_members(id).len().max(1) as u32,
        }
    }

    /// A directory's links: itself, its entry in the parent, and each
    /// subdirectory's `..`.
    pub(super) fn dir_nlink(&self, path: &str) -> u32 {
        match self.subdir_count(path, NLINK_SCAN) {
            Some(n) => 2 + n as u32,
            None => 1,
        }
    }

    /// Attributes of a new node made by `caller` in directory `parent_path`:
    /// the group of a setgid directory is inherited, and so is the bit by
    /// subdirectories.
    pub(super) fn new_attrs(
        &self,
        parent_path: &str,
        kind: FileKind,
        mode: u32,
        caller: Caller,
    ) -> Attrs {
        let parent = self.dir_attrs_of(parent_path);
        let mut mode = (mode & 0o7777) as u16;
        let mut gid = caller.gid;
        if parent.mode & libc::S_ISGID as u16 != 0 {
            gid = parent.gid;
            if kind == FileKind::Dir {
                mode |= libc::S_ISGID as u16;
            }
        }
        Attrs::new(kind, mode, caller.uid, gid)
    }

    /// The parent directory's change for an entry made or removed in it
    /// now: mtime and ctime move (the directory becomes explicit, so it and
    /// its times persist).
    pub(super) fn touch_dir_op(&self, path: &str, now: SystemTime) -> Op {
        let mut a = (*self.dir_attrs_of(path)).clone();
        (a.mtime, a.ctime) = (now, now);
        Op::SetDir {
            path: path.to_string(),
            attrs: Some(a),
        }
    }

    /// Applies `set` to attributes `a` (the kernel has checked permissions).
    fn apply_set(a: &mut Attrs, set: &SetAttr, now: SystemTime) {
        if let Some(mode) = set.mode {
            a.mode = (mode & 0o7777) as u16;
        }
        if let Some(uid) = set.uid {
            a.uid = uid;
        }
        if let Some(gid) = set.gid {
            a.gid = gid;
        }
        if let Some(t) = set.atime {
            a.atime = t.resolve(now);
        }
        if let Some(t) = set.mtime {
            a.mtime = t.resolve(now);
        }
        a.ctime = set.ctime.unwrap_or(now);
    }

    /// chmod, chown and utimens of inode `ino` at `path`, and the times a
    /// truncate sets. Returns the new attributes.
    pub(super) async fn set_metadata(
        &self,
        ino: u64,
        path: &str,
        kind: NodeKind,
        set: &SetAttr,
        content_changed: bool,
    ) -> FsResult<()> {
        if !set.changes_metadata() && !content_changed {
            return Ok(());
        }
        let now = SystemTime::now();
        if kind == NodeKind::Dir {
            let mut a = (*self.dir_attrs_of(path)).clone();
            Self::apply_set(&mut a, set, now);
            self.db.write(vec![Op::SetDir {
                path: path.to_string(),
                attrs: Some(a),
            }])?;
            self.wrote();
            return Ok(());
        }
        let loc = self.location_of(ino, path).ok_or(FsError::NotFound)?;
        if lock(&self.detached).contains_key(&ino) {
            // An unlinked file still open: its attributes go nowhere.
            return Ok(());
        }
        let (mut a, _) = self.file_attrs_at(path, loc).await?;
        Self::apply_set(&mut a, set, now);
        if content_changed {
            a.mtime = set.mtime.map_or(now, |t| t.resolve(now));
        }
        self.set_file_attrs(path, a)?;
        Ok(())
    }

    /// New attributes for the file `key` and every other name of it,
    /// published by the next upload (scheduled now).
    pub(super) fn set_file_attrs(&self, key: &str, a: Attrs) -> FsResult<()> {
        self.write_file_attrs(key, a)?;
        self.wrote();
        Ok(())
    }

    /// [`S4Fs::set_file_attrs`] without scheduling an upload: the change
    /// rides along with the next one (an atime, as `lazytime` keeps it).
    fn write_file_attrs(&self, key: &str, a: Attrs) -> FsResult<()> {
        let mut names = vec![key.to_string()];
        if a.link_id != 0 {
            names = self.db.link_members(a.link_id);
            if !names.iter().any(|n| n == key) {
                names.push(key.to_string());
            }
        }
        let ops = names
            .into_iter()
            .map(|key| Op::SetAttrs {
                key,
                attrs: a.clone(),
            })
            .collect();
        self.db.write(ops)?;
        // A read (a call counted as read-only) moves an atime this way.
        self.changes.changed();
        Ok(())
    }

    /// A read of the file's value: its atime moves as `relatime` would move
    /// it (when it is not newer than the last change, or a day old), and is
    /// published with the next upload (at the latest at unmount). Only
    /// files that carry attributes: a read of a Python-written key never
    /// makes a record, so a read-only walk publishes nothing.
    pub(super) fn relatime(&self, ino: u64, path: &str, loc: Option<Location>) {
        let Some(loc) = loc else { return };
        let Some(a) = self.db.attrs_at(path, loc) else {
            return;
        };
        let now = SystemTime::now();
        let day = Duration::from_secs(24 * 3600);
        let stale = a.atime <= a.mtime
            || a.atime <= a.ctime
            || now.duration_since(a.atime).is_ok_and(|age| age >= day);
        let current = self.db.location(path) == Some(loc);
        if !stale || !current || self.cfg.read_only || lock(&self.detached).contains_key(&ino) {
            return;
        }
        let mut a = (*a).clone();
        a.atime = now;
        // A read does not schedule an upload of its own: a mount that only
        // reads never races a busy writer's commits with atimes.
        if let Err(e) = self.write_file_attrs(path, a) {
            tracing::debug!("atime of {path:?}: {e}");
        }
    }

    /// The attributes of inode `ino` for the xattr calls.
    async fn xattr_target(&self, ino: u64) -> FsResult<(String, NodeKind, Attrs)> {
        if ino == ROOT_INO {
            return Ok((
                String::new(),
                NodeKind::Dir,
                (*self.dir_attrs_of("")).clone(),
            ));
        }
        if ino == CONTROL_DIR_INO || ControlFile::from_ino(ino).is_some() {
            return Err(FsError::NotSupported("control files carry no attributes"));
        }
        let (path, kind) = self.node(ino)?;
        let a = match kind {
            NodeKind::Dir => (*self.dir_attrs_of(&path)).clone(),
            NodeKind::File => {
                let loc = self.location_of(ino, &path).ok_or(FsError::NotFound)?;
                self.file_attrs_at(&path, loc).await?.0
            }
        };
        Ok((path, kind, a))
    }

    /// The extended attributes of inode `ino`, without learning its size:
    /// the kernel asks for `security.capability` before every write.
    fn xattrs_of(&self, ino: u64) -> FsResult<Option<Arc<Attrs>>> {
        if ino == ROOT_INO {
            return Ok(Some(self.dir_attrs_of("")));
        }
        if ino == CONTROL_DIR_INO || ControlFile::from_ino(ino).is_some() {
            return Ok(None);
        }
        let (path, kind) = self.node(ino)?;
        Ok(match kind {
            NodeKind::Dir => Some(self.dir_attrs_of(&path)),
            NodeKind::File => {
                let loc = self.location_of(ino, &path).ok_or(FsError::NotFound)?;
                self.db.attrs_at(&path, loc)
            }
        })
    }

    /// getxattr: the value, or ENODATA.
    pub async fn getxattr(&self, ino: u64, name: &OsStr) -> FsResult<Vec<u8>> {
        let name = name.as_encoded_bytes();
        if check_xattr_name(name).is_err() {
            return Err(FsError::NoXattr);
        }
        let a = self.xattrs_of(ino)?.ok_or(FsError::NoXattr)?;
        a.xattrs.get(name).cloned().ok_or(FsError::NoXattr)
    }

    /// listxattr: the names, each followed by a NUL.
    pub async fn listxattr(&self, ino: u64) -> FsResult<Vec<u8>> {
        let Some(a) = self.xattrs_of(ino)? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for k in a.xattrs.keys() {
            out.extend_from_slice(k);
            out.push(0);
        }
        Ok(out)
    }

    /// setxattr (kept with the file, published with the next upload).
    pub async fn setxattr(
        &self,
        ino: u64,
        name: &OsStr,
        value: &[u8],
        mode: XattrMode,
    ) -> FsResult<()> {
        self.check_writable()?;
        let name = name.as_encoded_bytes();
        check_xattr_name(name)?;
        if value.len() > MAX_XATTR_VALUE {
            return Err(FsError::XattrTooBig);
        }
        let (path, kind, mut a) = self.xattr_target(ino).await?;
        let exists = a.xattrs.contains_key(name);
        match mode {
            XattrMode::Create if exists => return Err(FsError::Exists),
            XattrMode::Replace if !exists => return Err(FsError::NoXattr),
            _ => {}
        }
        a.xattrs.insert(name.to_vec(), value.to_vec());
        if a.xattr_bytes() > MAX_XATTR_TOTAL {
            return Err(FsError::NoSpace(
                "the file's extended attributes would pass 256 KiB",
            ));
        }
        a.ctime = SystemTime::now();
        self.store_attrs(ino, &path, kind, a)
    }

    pub async fn removexattr(&self, ino: u64, name: &OsStr) -> FsResult<()> {
        self.check_writable()?;
        let name = name.as_encoded_bytes();
        if check_xattr_name(name).is_err() {
            return Err(FsError::NoXattr);
        }
        let (path, kind, mut a) = self.xattr_target(ino).await?;
        if a.xattrs.remove(name).is_none() {
            return Err(FsError::NoXattr);
        }
        a.ctime = SystemTime::now();
        self.store_attrs(ino, &path, kind, a)
    }

    fn store_attrs(&self, ino: u64, path: &str, kind: NodeKind, a: Attrs) -> FsResult<()> {
        match kind {
            NodeKind::Dir => {
                self.db.write(vec![Op::SetDir {
                    path: path.to_string(),
                    attrs: Some(a),
                }])?;
                self.wrote();
                Ok(())
            }
            NodeKind::File if lock(&self.detached).contains_key(&ino) => Ok(()),
            NodeKind::File => self.set_file_attrs(path, a),
        }
    }
}
