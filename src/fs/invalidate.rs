//! Telling the kernel what other writers changed. The kernel may trust
//! names and attributes for a long time (`crate::fuse`'s TTL), because
//! nothing changes them behind the daemon's back except a refresh it runs
//! itself: after a refresh (or a commit that rebased onto another writer)
//! brings changes, every inode the kernel holds whose value, attributes or
//! name changed is invalidated through the FUSE notify calls.

use super::*;

/// The kernel's caches, as the FUSE adapter reaches them.
pub trait Invalidate: Send + Sync + std::fmt::Debug {
    /// Drops the cached attributes of `ino`, and its cached pages too when
    /// `data` (its value changed).
    fn inode(&self, ino: u64, data: bool);
    /// Drops the cached name `name` in directory `parent`.
    fn entry(&self, parent: u64, name: &str);
}

/// What a file inode was last shown as: its entry and its attributes.
#[derive(Debug, Clone)]
pub(super) struct Served {
    pub loc: Option<Location>,
    pub attrs: Option<Arc<crate::db::attrs::Attrs>>,
}

impl S4Fs {
    /// The adapter's way to the kernel's caches (set once the session runs).
    pub fn set_invalidator(&self, inv: Arc<dyn Invalidate>) {
        *lock(&self.invalidator) = Some(inv);
    }

    /// Remembers what `stat` showed of file inode `ino`, to tell later
    /// whether a refresh changed it.
    pub(super) fn served(
        &self,
        ino: u64,
        loc: Option<Location>,
        attrs: Option<Arc<crate::db::attrs::Attrs>>,
    ) {
        lock(&self.served).insert(ino, Served { loc, attrs });
    }

    /// Picks up other writers' commits, then invalidates what they changed.
    pub async fn refresh(&self) -> FsResult<bool> {
        let changed = self.db.refresh().await?;
        if changed {
            self.invalidate_changed().await;
        }
        Ok(changed)
    }

    /// Invalidates every inode the kernel holds whose name, value or
    /// attributes are no longer what it was shown. Never from the FUSE
    /// session thread: the kernel may hold a directory lock for a request
    /// that thread has yet to read, and a notify waits for that lock.
    pub(super) async fn invalidate_changed(&self) {
        self.changes.changed();
        let Some(inv) = lock(&self.invalidator).clone() else {
            return;
        };
        super::files::off_session_thread().await;
        let bound = lock(&self.inodes).bound();
        let mut stale_names = Vec::new();
        let mut n = 0;
        for (ino, path, kind) in bound {
            match kind {
                NodeKind::Dir => {
                    inv.inode(ino, false);
                    if self.resolve(&path) != Some(NodeKind::Dir) {
                        stale_names.push(path);
                    }
                }
                NodeKind::File => {
                    let was = lock(&self.served).get(&ino).cloned();
                    let loc = self.db.location(&path);
                    let attrs = loc.and_then(|l| self.db.attrs_at(&path, l));
                    let Some(was) = was else { continue };
                    if loc.is_none() || self.resolve(&path) != Some(NodeKind::File) {
                        stale_names.push(path);
                        inv.inode(ino, true);
                        n += 1;
                    } else if was.loc != loc {
                        inv.inode(ino, true);
                        lock(&self.cached).remove(&ino);
                        n += 1;
                    } else if was.attrs.as_deref() != attrs.as_deref() {
                        inv.inode(ino, false);
                        n += 1;
                    }
                }
            }
        }
        for path in stale_names {
            let (parent, name) = match path.rsplit_once('/') {
                Some((p, n)) => (lock(&self.inodes).ino_of(p), n.to_string()),
                None => (Some(ROOT_INO), path.clone()),
            };
            if let Some(parent) = parent {
                inv.entry(parent, &name);
            }
        }
        tracing::debug!("invalidated {n} changed files after a refresh");
    }
}
