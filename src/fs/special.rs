//! Symbolic links, special files (fifos, sockets, devices) and hard links.
//!
//! A symlink is a key whose value is the target as text (what the Python
//! package reads), marked a symlink by its attributes. Special files are
//! keys with an empty value. Hard links are keys of one link group: each
//! name holds the same value and attributes, every write goes to all of
//! them, and `nlink` counts them.

use super::attrs::Caller;
use super::*;
use crate::db::attrs::{FileKind, Op};

/// Most names one file may have (what `pathconf(_PC_LINK_MAX)` reports).
pub const MAX_LINKS: u32 = 32_000;

impl S4Fs {
    pub async fn symlink(
        &self,
        parent: u64,
        name: &OsStr,
        target: &std::path::Path,
        caller: Caller,
    ) -> FsResult<Attr> {
        self.check_writable()?;
        let (dir, path) = self.new_path(parent, name)?;
        if self.resolve(&path).is_some() {
            return Err(FsError::Exists);
        }
        let target = target.to_str().ok_or(FsError::InvalidName(
            "a symlink target must be UTF-8 to be stored as text".into(),
        ))?;
        let value = Value::Text(target.to_string());
        self.make_node(&dir, &path, FileKind::Symlink, 0o777, 0, caller, value)?;
        let ino = self.bind(&path, NodeKind::File, true);
        self.attr_of(ino, &path, NodeKind::File).await
    }

    /// The target of symlink `ino`: its value.
    pub async fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        let (path, kind) = self.node(ino)?;
        let loc = match kind {
            NodeKind::File => self.location_of(ino, &path).ok_or(FsError::NotFound)?,
            NodeKind::Dir => return Err(FsError::InvalidArgument("not a symlink")),
        };
        match self.db.attrs_at(&path, loc) {
            Some(a) if a.kind == FileKind::Symlink => {}
            _ => return Err(FsError::InvalidArgument("not a symlink")),
        }
        let value = match self.small_values.take(loc) {
            Some(v) => v,
            None => self.db.get_at(&path, loc).await?,
        };
        Ok(value.into_bytes())
    }

    /// mknod(2): a regular file, fifo, socket or device.
    pub async fn mknod(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        rdev: u32,
        caller: Caller,
    ) -> FsResult<Attr> {
        self.check_writable()?;
        let kind = match mode & libc::S_IFMT {
            libc::S_IFREG | 0 => FileKind::Regular,
            libc::S_IFIFO => FileKind::Fifo,
            libc::S_IFSOCK => FileKind::Socket,
            libc::S_IFCHR => FileKind::CharDevice,
            libc::S_IFBLK => FileKind::BlockDevice,
            _ => return Err(FsError::InvalidArgument("unknown file type")),
        };
        let (dir, path) = self.new_path(parent, name)?;
        if self.resolve(&path).is_some() {
            return Err(FsError::Exists);
        }
        let rdev = match kind {
            FileKind::CharDevice | FileKind::BlockDevice => rdev as u64,
            _ => 0,
        };
        let value = Value::Text(String::new());
        self.make_node(&dir, &path, kind, mode, rdev, caller, value)?;
        let ino = self.bind(&path, NodeKind::File, true);
        self.attr_of(ino, &path, NodeKind::File).await
    }

    /// link(2): `new_name` becomes another name of file `ino`.
    pub async fn link(&self, ino: u64, new_parent: u64, new_name: &OsStr) -> FsResult<Attr> {
        self.check_writable()?;
        let (path, kind) = self.node(ino)?;
        if kind == NodeKind::Dir {
            return Err(FsError::NotPermitted("directories cannot be hard-linked"));
        }
        let (dir, new_path) = self.new_path(new_parent, new_name)?;
        if self.resolve(&new_path).is_some() {
            return Err(FsError::Exists);
        }
        let loc = self.location_of(ino, &path).ok_or(FsError::NotFound)?;
        if lock(&self.detached).contains_key(&ino) {
            return Err(FsError::NotFound);
        }
        // Unput bytes go first, so the new name gets them too.
        self.commit_open_under(&path).await?;
        let loc = self.db.location(&path).unwrap_or(loc);
        let (mut a, _) = self.file_attrs_at(&path, loc).await?;
        let members = match a.link_id {
            0 => vec![path.clone()],
            id => self.db.link_members(id),
        };
        if members.len() as u32 >= MAX_LINKS {
            return Err(FsError::TooManyLinks);
        }
        if a.link_id == 0 {
            a.link_id = new_link_id();
        }
        // The inode the kernel knows becomes the group's: every name shares it.
        lock(&self.inodes).join_link(ino, a.link_id);
        let now = SystemTime::now();
        a.ctime = now;
        let value = match self.small_values.take(loc) {
            Some(v) => v,
            None => self.db.get_at(&path, loc).await?,
        };
        let len = value.len() as u64;
        let mut ops: Vec<Op> = members
            .iter()
            .map(|k| Op::SetAttrs {
                key: k.clone(),
                attrs: a.clone(),
            })
            .collect();
        ops.push(Op::Put {
            key: new_path.clone(),
            value,
            attrs: Some(a.clone()),
        });
        ops.push(self.touch_dir_op(&dir, now));
        let placed = self.db.write(ops)?;
        if let Some(l) = placed[members.len()] {
            let mtime = a.mtime;
            self.meta.insert(l, ValueMeta { len, mtime });
        }
        self.wrote();
        let ino = lock(&self.inodes).bind_linked(&new_path, NodeKind::File, a.link_id, true);
        self.attr_of(ino, &new_path, NodeKind::File).await
    }
}

/// A fresh hard-link group id (random: two mounts never pick the same).
fn new_link_id() -> u64 {
    loop {
        let id: u64 = rand::random();
        if id != 0 {
            return id;
        }
    }
}

impl S4Fs {
    /// fallocate(2) without flags: the file grows to `offset + len` if it
    /// is shorter (no blocks to reserve in an object store); other modes
    /// (punching holes, keeping the size) are not supported.
    pub async fn fallocate(&self, ino: u64, offset: u64, len: u64, mode: i32) -> FsResult<()> {
        if mode != 0 {
            return Err(FsError::NotSupported("fallocate modes other than 0"));
        }
        let size = self.getattr(ino).await?.size;
        let end = offset.checked_add(len).ok_or(FsError::TooLarge {
            key: String::new(),
            len: u64::MAX,
        })?;
        if end > size {
            self.setattr(ino, super::attrs::SetAttr::size(end)).await?;
        }
        Ok(())
    }
}
