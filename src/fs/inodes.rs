//! Inode numbers for paths. Directories exist only as prefixes of keys, so an
//! inode is a name for a path: it follows the path through renames and is
//! dropped when the kernel forgets it.

use crate::format::Key;
use std::collections::HashMap;

/// The hash map of the daemon's per-inode tables, which a listing of a
/// large directory fills an entry per file: foldhash, several times faster
/// than the standard SipHash on short keys, and still seeded per process.
pub type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

pub const ROOT_INO: u64 = 1;
/// `.s4db` at the root; its files take the numbers right after it.
pub const CONTROL_DIR_INO: u64 = 2;
/// First number handed out to keys and directories.
const FIRST_DYNAMIC_INO: u64 = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    File,
    Dir,
}

/// Paths are [`Key`]s: a listed directory can bind many inodes at once
/// (READDIRPLUS), and short paths then need no allocation of their own.
#[derive(Debug)]
struct Node {
    path: Key,
    kind: NodeKind,
    /// Lookups the kernel holds (FUSE's nlookup); at zero the inode is freed.
    lookups: u64,
}

#[derive(Debug)]
pub struct Inodes {
    by_ino: FastMap<u64, Node>,
    by_path: FastMap<Key, u64>,
    /// Hard-link groups: every name of the group binds this inode.
    by_link: FastMap<u64, u64>,
    next: u64,
}

impl Default for Inodes {
    fn default() -> Self {
        Inodes {
            by_ino: FastMap::default(),
            by_path: FastMap::default(),
            by_link: FastMap::default(),
            next: FIRST_DYNAMIC_INO,
        }
    }
}

impl Inodes {
    /// The path and kind of a dynamic inode (not the root or control files).
    pub fn get(&self, ino: u64) -> Option<(&str, NodeKind)> {
        self.by_ino.get(&ino).map(|n| (n.path.as_str(), n.kind))
    }

    pub fn ino_of(&self, path: &str) -> Option<u64> {
        self.by_path
            .get(path)
            .copied()
            .filter(|i| self.by_ino.contains_key(i))
    }

    /// The inode of `path` as `kind`, made if needed; `lookup` counts one
    /// kernel reference (entry replies). A path that changed kind (file to
    /// directory) gets a new inode, so the kernel never mixes the two.
    pub fn bind(&mut self, path: &str, kind: NodeKind, lookup: bool) -> u64 {
        let existing = self
            .by_path
            .get(path)
            .copied()
            .filter(|ino| self.by_ino.get(ino).is_some_and(|n| n.kind == kind));
        let ino = existing.unwrap_or_else(|| {
            let ino = self.next;
            self.next += 1;
            self.by_ino.insert(
                ino,
                Node {
                    path: path.into(),
                    kind,
                    lookups: 0,
                },
            );
            self.by_path.insert(path.into(), ino);
            ino
        });
        if lookup {
            self.by_ino.get_mut(&ino).expect("bound").lookups += 1;
        }
        ino
    }

    /// [`Inodes::bind`] of a file in hard-link group `link` (0: none): the
    /// group's inode if it has one, which `path` then names too.
    pub fn bind_linked(&mut self, path: &str, kind: NodeKind, link: u64, lookup: bool) -> u64 {
        if link != 0 {
            if let Some(&ino) = self.by_link.get(&link) {
                if let Some(node) = self.by_ino.get_mut(&ino) {
                    if lookup {
                        node.lookups += 1;
                    }
                    if self.by_path.get(path) != Some(&ino) {
                        node.path = path.into();
                        self.by_path.insert(path.into(), ino);
                    }
                    return ino;
                }
            }
        }
        let ino = self.bind(path, kind, lookup);
        if link != 0 {
            self.by_link.insert(link, ino);
        }
        ino
    }

    /// Inode `ino` is the one of hard-link group `link` from now on.
    pub fn join_link(&mut self, ino: u64, link: u64) {
        self.by_link.insert(link, ino);
    }

    /// The inode now goes by `path` (another name of a hard-linked file,
    /// after the one it went by was unlinked).
    pub fn repoint(&mut self, ino: u64, path: &str) {
        if let Some(node) = self.by_ino.get_mut(&ino) {
            node.path = path.into();
            self.by_path.insert(path.into(), ino);
        }
    }

    /// Every inode the kernel holds: number, path and kind.
    pub fn bound(&self) -> Vec<(u64, String, NodeKind)> {
        self.by_ino
            .iter()
            .map(|(ino, n)| (*ino, n.path.to_string(), n.kind))
            .collect()
    }

    /// The kernel took a reference (an entry it was sent in a listing).
    pub fn add_lookup(&mut self, ino: u64) {
        if let Some(node) = self.by_ino.get_mut(&ino) {
            node.lookups += 1;
        }
    }

    /// The kernel dropped `n` references.
    pub fn forget(&mut self, ino: u64, n: u64) {
        let Some(node) = self.by_ino.get_mut(&ino) else {
            return;
        };
        node.lookups = node.lookups.saturating_sub(n);
        if node.lookups == 0 {
            let node = self.by_ino.remove(&ino).expect("present");
            if self.by_path.get(node.path.as_str()) == Some(&ino) {
                self.by_path.remove(node.path.as_str());
            }
            self.by_link.retain(|_, i| *i != ino);
        }
    }

    /// The path no longer names anything (unlink, rmdir); open inodes keep
    /// their number until forgotten.
    pub fn unbind(&mut self, path: &str) {
        self.by_path.remove(path);
    }

    /// `from` (and, for a directory, everything under it) is now `to`.
    pub fn rename(&mut self, from: &str, to: &str) {
        self.unbind(to);
        let under = format!("{from}/");
        let moved: Vec<(Key, u64)> = self
            .by_path
            .iter()
            .filter(|(p, _)| p.as_str() == from || p.starts_with(&under))
            .map(|(p, i)| (p.clone(), *i))
            .collect();
        for (old, ino) in moved {
            let new = Key::from(format!("{to}{}", &old[from.len()..]));
            self.by_path.remove(old.as_str());
            self.by_path.insert(new.clone(), ino);
            if let Some(node) = self.by_ino.get_mut(&ino) {
                node.path = new;
            }
        }
    }

    /// A number for a readdir entry the kernel has not looked up: the bound
    /// inode if there is one, else a stable hash (`d_ino` is informational;
    /// the kernel looks the name up before using it).
    pub fn listing_ino(&self, path: &str) -> u64 {
        use std::hash::BuildHasher;
        self.ino_of(path)
            .unwrap_or_else(|| foldhash::fast::FixedState::default().hash_one(path) | (1 << 63))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_forget_rename() {
        let mut t = Inodes::default();
        let a = t.bind("d/a", NodeKind::File, true);
        let d = t.bind("d", NodeKind::Dir, true);
        assert_eq!(t.bind("d/a", NodeKind::File, true), a);
        t.rename("d", "e");
        assert_eq!(t.get(a), Some(("e/a", NodeKind::File)));
        assert_eq!(t.get(d), Some(("e", NodeKind::Dir)));
        assert_eq!(t.ino_of("d/a"), None);
        t.forget(a, 1);
        assert!(t.get(a).is_some());
        t.forget(a, 1);
        assert!(t.get(a).is_none());
        assert_ne!(t.bind("e", NodeKind::File, false), d);
    }
}
