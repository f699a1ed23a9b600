//! Small values fetched only to learn their size (`stat` of another
//! writer's key): kept, up to a byte budget, so the `cat` that usually
//! follows costs no second range GET.

use crate::format::{Location, Value};
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

/// Entries up to this size are fetched whole when their size is needed.
pub const SMALL_ENTRY: u32 = 1024 * 1024;
/// Bytes of values kept at most; the oldest go first.
const BUDGET: usize = 64 * 1024 * 1024;

#[derive(Debug, Default)]
pub struct ValueCache {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    values: HashMap<Location, Value>,
    order: VecDeque<Location>,
    bytes: usize,
}

impl ValueCache {
    pub fn insert(&self, loc: Location, value: Value) {
        let mut c = self.inner.lock().unwrap();
        if value.len() > BUDGET || c.values.contains_key(&loc) {
            return;
        }
        c.bytes += value.len();
        c.values.insert(loc, value);
        c.order.push_back(loc);
        while c.bytes > BUDGET {
            let Some(old) = c.order.pop_front() else {
                break;
            };
            if let Some(v) = c.values.remove(&old) {
                c.bytes -= v.len();
            }
        }
    }

    /// The value at `loc`, removed from the cache (an open file holds it now).
    pub fn take(&self, loc: Location) -> Option<Value> {
        let mut c = self.inner.lock().unwrap();
        let v = c.values.remove(&loc)?;
        c.bytes -= v.len();
        Some(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_within_budget_oldest_out_first() {
        let cache = ValueCache::default();
        let loc = |offset| Location {
            file_id: 1,
            offset,
            length: 0,
        };
        let big = || Value::Binary(vec![0; BUDGET / 2]);
        cache.insert(loc(1), big());
        cache.insert(loc(2), big());
        cache.insert(loc(3), big());
        assert!(cache.take(loc(1)).is_none());
        assert!(cache.take(loc(3)).is_some());
        assert!(cache.take(loc(3)).is_none());
    }
}
