//! Small values fetched only to learn their size (`stat` of another
//! writer's key): kept, up to a byte budget, so the `cat` that usually
//! follows costs no second range GET.
//!
//! The budget counts what an entry really costs (its bytes plus
//! [`ENTRY_OVERHEAD`] for the map slot, its place in the eviction order and
//! the allocator's headers), not only the value's length: a cache of
//! 100-byte values must not hold a million of them. Values of entries the
//! index no longer names (overwritten or deleted keys) are dropped by
//! [`ValueCache::retain`], which the maintenance loop runs, so on a mount
//! that runs for months the cache follows the live data, not the history.

use crate::format::{Location, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;

/// Entries up to this size are fetched whole when their size is needed.
pub const SMALL_ENTRY: u32 = 1024 * 1024;
/// Bytes of values kept at most (with their overhead); the oldest go first.
/// Sixteen scan windows or neighbour fetches ([`super::scan::WINDOW`]): the
/// reads that follow take their values within moments.
const BUDGET: usize = 16 * 1024 * 1024;
/// What one entry costs beyond its value's bytes: a hash-map slot (location
/// and value, 56 bytes), an eviction-order node (about 40), allocator headers.
pub const ENTRY_OVERHEAD: usize = 128;

#[derive(Debug, Default)]
pub struct ValueCache {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// By location: the value and its insertion number (its key in `order`).
    values: HashMap<Location, (u64, Value)>,
    /// Insertion number → location, oldest first: exactly one node per value.
    order: BTreeMap<u64, Location>,
    next: u64,
    /// What the values cost, overhead included.
    bytes: usize,
}

fn cost(v: &Value) -> usize {
    v.len() + ENTRY_OVERHEAD
}

impl Inner {
    fn remove(&mut self, loc: &Location) -> Option<Value> {
        let (seq, v) = self.values.remove(loc)?;
        self.order.remove(&seq);
        self.bytes -= cost(&v);
        Some(v)
    }
}

impl ValueCache {
    pub fn insert(&self, loc: Location, value: Value) {
        self.insert_within(loc, value, BUDGET);
    }

    fn insert_within(&self, loc: Location, value: Value, budget: usize) {
        let mut c = self.inner.lock().unwrap();
        if cost(&value) > budget || c.values.contains_key(&loc) {
            return;
        }
        let seq = c.next;
        c.next += 1;
        c.bytes += cost(&value);
        c.values.insert(loc, (seq, value));
        c.order.insert(seq, loc);
        while c.bytes > budget {
            let Some((_, old)) = c.order.pop_first() else {
                break;
            };
            if let Some((_, v)) = c.values.remove(&old) {
                c.bytes -= cost(&v);
            }
        }
    }

    /// The value at `loc`, removed from the cache (an open file holds it now).
    pub fn take(&self, loc: Location) -> Option<Value> {
        self.inner.lock().unwrap().remove(&loc)
    }

    /// Data files the cached values come from.
    pub fn files(&self) -> HashSet<u64> {
        let c = self.inner.lock().unwrap();
        c.values.keys().map(|l| l.file_id).collect()
    }

    /// Drops the values of entries `keep` says no to (entries no longer live).
    pub fn retain(&self, mut keep: impl FnMut(Location) -> bool) {
        let mut c = self.inner.lock().unwrap();
        let gone: Vec<Location> = c.values.keys().copied().filter(|l| !keep(*l)).collect();
        for l in gone {
            c.remove(&l);
        }
    }

    /// Values held and what they cost (bytes, overhead included).
    pub fn usage(&self) -> (usize, usize) {
        let c = self.inner.lock().unwrap();
        debug_assert_eq!(c.values.len(), c.order.len());
        (c.values.len(), c.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(offset: u64) -> Location {
        Location {
            file_id: 1,
            offset,
            length: 0,
        }
    }

    #[test]
    fn keeps_within_budget_oldest_out_first() {
        let cache = ValueCache::default();
        let big = || Value::Binary(vec![0; BUDGET / 2 - ENTRY_OVERHEAD]);
        cache.insert(loc(1), big());
        cache.insert(loc(2), big());
        cache.insert(loc(3), big());
        assert!(cache.take(loc(1)).is_none());
        assert!(cache.take(loc(3)).is_some());
        assert!(cache.take(loc(3)).is_none());
    }

    /// Tiny values count with their overhead, and taking or re-inserting one
    /// leaves no stale node behind: what the cache holds is what it counts.
    #[test]
    fn small_values_count_their_overhead_and_leave_nothing_behind() {
        let cache = ValueCache::default();
        let budget = 100 * (10 + ENTRY_OVERHEAD);
        for i in 0..10_000 {
            cache.insert_within(loc(i), Value::Text("0123456789".into()), budget);
        }
        assert_eq!(cache.usage(), (100, budget));
        for round in 0..1_000 {
            let l = loc(9_999 - round % 100);
            let v = cache.take(l).expect("cached");
            cache.insert_within(l, v, budget);
        }
        let c = cache.inner.lock().unwrap();
        assert_eq!((c.values.len(), c.order.len()), (100, 100));
    }

    #[test]
    fn retain_drops_values_of_dead_entries() {
        let cache = ValueCache::default();
        for i in 0..10 {
            cache.insert(loc(i), Value::Binary(vec![1; 10]));
        }
        assert_eq!(cache.files(), [1].into());
        cache.retain(|l| l.offset % 2 == 0);
        assert_eq!(cache.usage(), (5, 5 * (10 + ENTRY_OVERHEAD)));
        assert!(cache.take(loc(1)).is_none());
        assert!(cache.take(loc(2)).is_some());
    }
}
