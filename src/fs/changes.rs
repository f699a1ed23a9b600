//! A count of changes, so that work prepared ahead of a request (the next
//! page of a directory listing, see `dirs`) can tell whether anything it
//! read may have changed since: if so it is thrown away and done again.
//!
//! A change is counted when it starts and again when it is done, and
//! changes under way are counted too: work is stale if a change overlapped
//! it in any way. The adapter counts every FUSE call that may change
//! something (all but a short list that only reads); the filesystem counts
//! the changes it makes or learns of on its own (writes put in the
//! background, other writers' commits, compaction).

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;

#[derive(Debug, Default)]
pub struct Changes {
    /// Bumped when a change starts and when it is done.
    epoch: AtomicU64,
    /// Changes started and not yet done.
    under_way: AtomicU64,
}

impl Changes {
    /// Where a piece of work starts, taken before it reads anything.
    pub fn mark(&self) -> u64 {
        self.epoch.load(SeqCst)
    }

    /// Whether nothing changed since `mark`, nor is changing now.
    pub fn unchanged_since(&self, mark: u64) -> bool {
        self.under_way.load(SeqCst) == 0 && self.epoch.load(SeqCst) == mark
    }

    /// A change that is already done (counted after it is visible).
    pub fn changed(&self) {
        self.epoch.fetch_add(1, SeqCst);
    }

    /// A change starting: counted as under way until the guard is dropped,
    /// after the change is visible (after its answer is fine: work checked
    /// meanwhile still sees it under way).
    pub fn begin(self: &Arc<Self>) -> Changing {
        self.under_way.fetch_add(1, SeqCst);
        self.epoch.fetch_add(1, SeqCst);
        Changing(self.clone())
    }
}

/// A change under way (see [`Changes::begin`]).
#[derive(Debug)]
pub struct Changing(Arc<Changes>);

impl Drop for Changing {
    fn drop(&mut self) {
        self.0.epoch.fetch_add(1, SeqCst);
        self.0.under_way.fetch_sub(1, SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_is_stale_when_a_change_overlaps_it() {
        let c = Arc::new(Changes::default());
        let mark = c.mark();
        assert!(c.unchanged_since(mark));
        // A change under way: stale while it runs, and after it is done.
        let change = c.begin();
        assert!(!c.unchanged_since(mark));
        let during = c.mark();
        assert!(!c.unchanged_since(during));
        drop(change);
        assert!(!c.unchanged_since(mark));
        assert!(!c.unchanged_since(during));
        // Work started after it is fresh until the next change.
        let after = c.mark();
        assert!(c.unchanged_since(after));
        c.changed();
        assert!(!c.unchanged_since(after));
    }
}
