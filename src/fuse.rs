//! The thin `fuser::Filesystem` adapter: convert arguments, call
//! [`crate::fs::S4Fs`], reply. Every call that may wait (on S3, on a file's
//! lock, on an upload) runs as a task on the tokio runtime and replies from
//! there, so the session thread keeps reading requests: 64 parallel `cat`s of
//! remote keys overlap instead of queueing behind each other. Every call is
//! counted and timed into [`crate::metrics`] as it replies, with its errno.

use crate::buffer_pool::BufferPool;
use crate::fs::attrs::{Caller, SetAttr, SetTime, XattrMode};
use crate::fs::{Attr, FileKind, FsError, FsResult, PlusFill, S4Fs};
use fuser::{
    consts, FileAttr, FileType, Filesystem, KernelConfig, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, TimeOrNow,
};
use std::ffi::{OsStr, OsString};
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Waker};
use std::time::{Duration, Instant, SystemTime};

/// How long the kernel may trust names and attributes before asking again:
/// long, because nothing changes them behind the daemon's back except a
/// refresh it runs itself, which invalidates what changed (`KernelCaches`).
const TTL: Duration = Duration::from_secs(3600);
/// The calls that change nothing. Every other call is counted as a change
/// while it runs (`fs::changes`): a listing page made ahead is not sent if
/// one overlapped it.
const READ_ONLY: [&str; 14] = [
    "lookup",
    "getattr",
    "readlink",
    "getxattr",
    "listxattr",
    "open",
    "read",
    "opendir",
    "readdir",
    "readdirplus",
    "releasedir",
    "fsyncdir",
    "statfs",
    "access",
];
/// Largest write the kernel sends at once.
const MAX_WRITE: u32 = 1024 * 1024;

pub struct FuseAdapter {
    fs: Arc<S4Fs>,
    rt: tokio::runtime::Handle,
    /// Where each write's bytes are copied off the session's buffer.
    write_buffers: Arc<BufferPool>,
}

impl FuseAdapter {
    pub fn new(fs: Arc<S4Fs>, rt: tokio::runtime::Handle) -> FuseAdapter {
        // Writes in flight at once: the kernel's background requests.
        let write_buffers = BufferPool::new(MAX_WRITE as usize, 16);
        FuseAdapter {
            fs,
            rt,
            write_buffers,
        }
    }

    /// Runs `f`, which replies when done: first right here on the session
    /// thread, and only if it has to wait (S3, a lock, an upload) as a task on
    /// the runtime. Most calls (a create, a write into a buffer, a lookup of a
    /// known key) finish at once, and handing them to another thread would
    /// cost more than the call itself: two thread wake-ups per request.
    ///
    /// `f`'s future returns the errno it replied with (0: success); the call
    /// is recorded in the metrics as `op`, timed from here to the reply.
    fn spawn<F, Fut>(&self, op: &'static str, f: F)
    where
        F: FnOnce(Arc<S4Fs>) -> Fut,
        Fut: Future<Output = Replied> + Send + 'static,
    {
        let _runtime = self.rt.enter(); // tokio's timers and I/O need its context
        let started = Instant::now();
        let changing = self.changing(op);
        let call = f(self.fs.clone());
        let mut task = Box::pin(async move {
            let errno = call.await;
            drop(changing);
            crate::metrics::global().fuse_call(op, started, errno);
        });
        let mut cx = Context::from_waker(Waker::noop());
        if task.as_mut().poll(&mut cx).is_pending() {
            // The runtime polls it again at once with a real waker, which
            // replaces the no-op one wherever the first poll registered it.
            self.rt.spawn(task);
        }
    }

    /// Runs `f`, which replies, right here on the session thread: the calls
    /// that never wait. Counted and recorded as [`FuseAdapter::spawn`] does.
    fn here(&self, op: &'static str, f: impl FnOnce(&Arc<S4Fs>) -> Replied) {
        let started = Instant::now();
        let _changing = self.changing(op);
        let errno = f(&self.fs);
        crate::metrics::global().fuse_call(op, started, errno);
    }

    /// A change under way for the whole of call `op`, unless it is read-only.
    fn changing(&self, op: &'static str) -> Option<crate::fs::changes::Changing> {
        (!READ_ONLY.contains(&op)).then(|| self.fs.changes().begin())
    }
}

/// What a call replied: 0 for success, else the errno sent.
type Replied = i32;

/// Sends `e`'s errno and returns it.
fn fail(e: &FsError, reply: impl FnOnce(i32)) -> Replied {
    let n = errno(e);
    reply(n);
    n
}

fn file_type(kind: FileKind) -> FileType {
    match kind {
        FileKind::Regular => FileType::RegularFile,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
        FileKind::CharDevice => FileType::CharDevice,
        FileKind::BlockDevice => FileType::BlockDevice,
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: a.ino,
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.ctime,
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: 4096,
        flags: 0,
    }
}

fn caller(req: &Request<'_>) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
    }
}

fn set_time(t: TimeOrNow) -> SetTime {
    match t {
        TimeOrNow::SpecificTime(t) => SetTime::At(t),
        TimeOrNow::Now => SetTime::Now,
    }
}

/// Replies to getxattr/listxattr: the size when asked for it (`size` 0),
/// ERANGE when the caller's buffer is too small.
fn reply_xattr(reply: ReplyXattr, size: u32, r: FsResult<Vec<u8>>) -> Replied {
    match r {
        Ok(v) if size == 0 => reply.size(v.len() as u32),
        Ok(v) if v.len() > size as usize => {
            reply.error(libc::ERANGE);
            return libc::ERANGE;
        }
        Ok(v) => reply.data(&v),
        Err(e) => return fail(&e, |n| reply.error(n)),
    }
    0
}

/// The errno for `e`; failures of the store or of stored bytes (which a
/// program only sees as EIO) are logged with what they name.
fn errno(e: &FsError) -> i32 {
    match e {
        FsError::Db(_) | FsError::Io(_) => tracing::warn!("{e}"),
        _ => tracing::debug!("fuse: {e}"),
    }
    e.to_errno()
}

fn reply_attr(reply: ReplyAttr, r: FsResult<Attr>) -> Replied {
    match r {
        Ok(a) => {
            reply.attr(&TTL, &file_attr(&a));
            0
        }
        Err(e) => fail(&e, |n| reply.error(n)),
    }
}

fn reply_entry(reply: ReplyEntry, r: FsResult<Attr>) -> Replied {
    match r {
        Ok(a) => {
            reply.entry(&TTL, &file_attr(&a), 0);
            0
        }
        Err(e) => fail(&e, |n| reply.error(n)),
    }
}

fn reply_empty(reply: ReplyEmpty, r: FsResult<()>) -> Replied {
    match r {
        Ok(()) => {
            reply.ok();
            0
        }
        Err(e) => fail(&e, |n| reply.error(n)),
    }
}

fn open_flags(keep_cache: bool, direct_io: bool) -> u32 {
    let mut flags = 0;
    if keep_cache {
        flags |= consts::FOPEN_KEEP_CACHE;
    }
    if direct_io {
        flags |= consts::FOPEN_DIRECT_IO;
    }
    flags
}

impl Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request<'_>, config: &mut KernelConfig) -> Result<(), i32> {
        // Optional capabilities: the kernel may lack some; that is fine.
        // Not FUSE_ATOMIC_O_TRUNC: with it, an open with O_TRUNC reaches us
        // (and empties the file) before the kernel checks that the file is
        // not being executed, and the open it then fails with ETXTBSY still
        // truncated the program under the running process. Without it the
        // kernel checks first and truncates with a SETATTR.
        let _ = config.add_capabilities(
            consts::FUSE_ASYNC_READ
                | consts::FUSE_BIG_WRITES
                | consts::FUSE_PARALLEL_DIROPS
                // Always READDIRPLUS (not _AUTO, which falls back to plain
                // readdir after a directory's first batch): a walk that
                // stats every entry then needs no lookup per name.
                | consts::FUSE_DO_READDIRPLUS,
        );
        let _ = config.set_max_write(MAX_WRITE);
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        Ok(())
    }

    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let name = name.to_os_string();
        self.spawn("lookup", move |fs| async move {
            reply_entry(reply, fs.lookup(parent, &name).await)
        });
    }

    fn forget(&mut self, _req: &Request<'_>, ino: u64, nlookup: u64) {
        self.here("forget", |fs| {
            fs.forget(ino, nlookup);
            0
        });
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        self.spawn("getattr", move |fs| async move {
            reply_attr(reply, fs.getattr(ino).await)
        });
    }

    fn setattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(set_time),
            mtime: mtime.map(set_time),
            ctime,
        };
        self.spawn("setattr", move |fs| async move {
            reply_attr(reply, fs.setattr(ino, set).await)
        });
    }

    fn mkdir(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        self.here("mkdir", |fs| {
            reply_entry(reply, fs.mkdir(parent, name, mode, caller(req)))
        });
    }

    fn unlink(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        self.here("unlink", |fs| reply_empty(reply, fs.unlink(parent, name)));
    }

    fn rmdir(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        self.here("rmdir", |fs| reply_empty(reply, fs.rmdir(parent, name)));
    }

    fn symlink(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        link_name: &OsStr,
        target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        let (name, target) = (link_name.to_os_string(), target.to_path_buf());
        let who = caller(req);
        self.spawn("symlink", move |fs| async move {
            reply_entry(reply, fs.symlink(parent, &name, &target, who).await)
        });
    }

    fn readlink(&mut self, _req: &Request<'_>, ino: u64, reply: ReplyData) {
        self.spawn("readlink", move |fs| async move {
            match fs.readlink(ino).await {
                Ok(target) => {
                    reply.data(&target);
                    0
                }
                Err(e) => fail(&e, |n| reply.error(n)),
            }
        });
    }

    fn link(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        newparent: u64,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let name = newname.to_os_string();
        self.spawn("link", move |fs| async move {
            reply_entry(reply, fs.link(ino, newparent, &name).await)
        });
    }

    fn mknod(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let name = name.to_os_string();
        let who = caller(req);
        self.spawn("mknod", move |fs| async move {
            reply_entry(reply, fs.mknod(parent, &name, mode, rdev, who).await)
        });
    }

    fn setxattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let mode = if flags & libc::XATTR_CREATE != 0 {
            XattrMode::Create
        } else if flags & libc::XATTR_REPLACE != 0 {
            XattrMode::Replace
        } else {
            XattrMode::Any
        };
        let (name, value) = (name.to_os_string(), value.to_vec());
        self.spawn("setxattr", move |fs| async move {
            reply_empty(reply, fs.setxattr(ino, &name, &value, mode).await)
        });
    }

    fn getxattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        name: &OsStr,
        size: u32,
        reply: ReplyXattr,
    ) {
        let name = name.to_os_string();
        self.spawn("getxattr", move |fs| async move {
            reply_xattr(reply, size, fs.getxattr(ino, &name).await)
        });
    }

    fn listxattr(&mut self, _req: &Request<'_>, ino: u64, size: u32, reply: ReplyXattr) {
        self.spawn("listxattr", move |fs| async move {
            reply_xattr(reply, size, fs.listxattr(ino).await)
        });
    }

    fn removexattr(&mut self, _req: &Request<'_>, ino: u64, name: &OsStr, reply: ReplyEmpty) {
        let name = name.to_os_string();
        self.spawn("removexattr", move |fs| async move {
            reply_empty(reply, fs.removexattr(ino, &name).await)
        });
    }

    fn fallocate(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        length: i64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        self.spawn("fallocate", move |fs| async move {
            let r = fs
                .fallocate(ino, offset.max(0) as u64, length.max(0) as u64, mode)
                .await;
            reply_empty(reply, r)
        });
    }

    fn rename(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
        reply: ReplyEmpty,
    ) {
        let (name, newname): (OsString, OsString) = (name.into(), newname.into());
        self.spawn("rename", move |fs| async move {
            let r = fs.rename(parent, &name, newparent, &newname, flags).await;
            reply_empty(reply, r)
        });
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        self.spawn("open", move |fs| async move {
            match fs.open(ino, flags).await {
                Ok(o) => {
                    reply.opened(o.fh, open_flags(o.keep_cache, o.direct_io));
                    0
                }
                Err(e) => fail(&e, |n| reply.error(n)),
            }
        });
    }

    fn create(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let name = name.to_os_string();
        let who = caller(req);
        self.spawn("create", move |fs| async move {
            match fs.create(parent, &name, mode, flags, who).await {
                Ok((a, o)) => {
                    reply.created(
                        &TTL,
                        &file_attr(&a),
                        0,
                        o.fh,
                        open_flags(o.keep_cache, o.direct_io),
                    );
                    0
                }
                Err(e) => fail(&e, |n| reply.error(n)),
            }
        });
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        self.spawn("read", move |fs| async move {
            match fs.read(fh, offset.max(0) as u64, size).await {
                Ok(data) => {
                    crate::metrics::global().fuse_read(data.len());
                    reply.data(&data);
                    0
                }
                Err(e) => fail(&e, |n| reply.error(n)),
            }
        });
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        let data = self.write_buffers.copy_of(data);
        // Unsynced from the moment it arrives: a write to .s4db/upload
        // publishes what came before it, itself included.
        crate::metrics::global().write_arrived(data.len());
        self.spawn("write", move |fs| async move {
            let r = fs.write(fh, offset.max(0) as u64, &data).await;
            let taken = r.as_ref().map_or(0, |n| *n as usize);
            crate::metrics::global().write_done(data.len(), taken);
            match r {
                Ok(n) => {
                    reply.written(n);
                    0
                }
                Err(e) => fail(&e, |n| reply.error(n)),
            }
        });
    }

    fn flush(&mut self, _req: &Request<'_>, _ino: u64, fh: u64, _lock: u64, reply: ReplyEmpty) {
        self.spawn("flush", move |fs| async move {
            reply_empty(reply, fs.flush(fh).await)
        });
    }

    fn fsync(&mut self, _req: &Request<'_>, _ino: u64, fh: u64, _data: bool, reply: ReplyEmpty) {
        self.spawn("fsync", move |fs| async move {
            reply_empty(reply, fs.fsync(fh).await)
        });
    }

    fn release(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        _flags: i32,
        _lock_owner: Option<u64>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.spawn("release", move |fs| async move {
            reply_empty(reply, fs.release(fh).await)
        });
    }

    fn opendir(&mut self, _req: &Request<'_>, ino: u64, _flags: i32, reply: ReplyOpen) {
        self.here("opendir", |fs| match fs.opendir(ino) {
            Ok(fh) => {
                reply.opened(fh, 0);
                0
            }
            Err(e) => fail(&e, |n| reply.error(n)),
        });
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        self.here("readdir", |fs| {
            let entries = match fs.readdir(fh) {
                Ok(e) => e,
                Err(e) => return fail(&e, |n| reply.error(n)),
            };
            for (i, e) in entries.iter().enumerate().skip(offset.max(0) as usize) {
                if reply.add(e.ino, (i + 1) as i64, file_type(e.kind), &e.name) {
                    break;
                }
            }
            reply.ok();
            0
        });
    }

    fn readdirplus(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        offset: i64,
        mut reply: ReplyDirectoryPlus,
    ) {
        self.spawn("readdirplus", move |fs| async move {
            let entries = match fs.readdirplus(fh, offset.max(0) as u64).await {
                Ok(e) => e,
                Err(e) => return fail(&e, |n| reply.error(n)),
            };
            let mut sent = Vec::with_capacity(entries.len());
            let mut filled = PlusFill::Room;
            let mut resume = None; // where the kernel asks next
            for (i, e) in entries.iter().enumerate() {
                let attr = file_attr(&e.attr);
                if reply.add(attr.ino, e.next_offset as i64, &e.name, &TTL, &attr, 0) {
                    filled = PlusFill::Full(i);
                    break;
                }
                resume = Some(e.next_offset);
                if e.counted {
                    sent.push(attr.ino);
                }
            }
            fs.entries_sent(fh, &sent, filled, resume);
            reply.ok();
            0
        });
    }

    fn releasedir(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        _flags: i32,
        reply: ReplyEmpty,
    ) {
        self.here("releasedir", |fs| {
            fs.releasedir(fh);
            reply.ok();
            0
        });
    }

    fn fsyncdir(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        _data: bool,
        reply: ReplyEmpty,
    ) {
        self.here("fsyncdir", |_| {
            reply.ok();
            0
        });
    }

    fn statfs(&mut self, _req: &Request<'_>, _ino: u64, reply: ReplyStatfs) {
        self.here("statfs", |fs| {
            let s = fs.statfs();
            reply.statfs(
                s.blocks, s.bfree, s.bfree, s.files, s.ffree, s.bsize, s.namelen, s.bsize,
            );
            0
        });
    }

    fn access(&mut self, _req: &Request<'_>, _ino: u64, _mask: i32, reply: ReplyEmpty) {
        self.here("access", |_| {
            reply.ok();
            0
        });
    }
}

/// The kernel's caches through FUSE notify messages (sent from a runtime
/// worker, never from the session thread, which the kernel may be waiting on).
pub struct KernelCaches(pub fuser::Notifier);

impl std::fmt::Debug for KernelCaches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KernelCaches")
    }
}

impl crate::fs::invalidate::Invalidate for KernelCaches {
    fn inode(&self, ino: u64, data: bool) {
        let offset = if data { 0 } else { -1 };
        if let Err(e) = self.0.inval_inode(ino, offset, 0) {
            if e.raw_os_error() != Some(libc::ENOENT) {
                tracing::debug!("invalidating inode {ino}: {e}");
            }
        }
    }

    fn entry(&self, parent: u64, name: &str) {
        if let Err(e) = self.0.inval_entry(parent, OsStr::new(name)) {
            if e.raw_os_error() != Some(libc::ENOENT) {
                tracing::debug!("invalidating {name:?} in inode {parent}: {e}");
            }
        }
    }
}
