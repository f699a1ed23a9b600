//! The retired list: data objects that a compaction replaced, with the time
//! they were retired, kept in the side object `<prefix>s4db.retired`.
//!
//! A compaction does not delete what it replaced: a reader holding an older
//! index (another mount between refreshes, the Python package) may still read
//! it. It lists the objects here before it commits, and `gc` (any process's)
//! deletes them once the grace period has passed since they were retired,
//! then drops them from the list. A listed object that an index still
//! references is never deleted (a compaction whose commit was lost).
//!
//! Text, so an operator can read it: a `S4RETIRED1` line, then one
//! `<unix seconds> <data file name>` line per object. Written with the same
//! compare-and-swap as the index (merged and retried on conflict); the Python
//! package's data-file pattern never matches its name.

use super::S4db;
use crate::error::{Error, Result};
use crate::remote::StoreError;
use std::collections::BTreeMap;

/// Name of the retired list under the database prefix.
pub const RETIRED_NAME: &str = "s4db.retired";
const MAGIC: &str = "S4RETIRED1";
const ATTEMPTS: u32 = 8;

/// Data file name -> unix seconds when it was retired.
pub(crate) type Retired = BTreeMap<String, u64>;

fn decode(data: &[u8]) -> Retired {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.lines();
    if lines.next() != Some(MAGIC) {
        tracing::warn!("{RETIRED_NAME} is not a retired list; starting it over");
        return Retired::new();
    }
    lines
        .filter_map(|l| {
            let (t, name) = l.split_once(' ')?;
            crate::format::parse_data_file_name(name)?;
            Some((name.to_string(), t.parse().ok()?))
        })
        .collect()
}

fn encode(list: &Retired) -> Vec<u8> {
    let mut out = format!("{MAGIC}\n");
    for (name, t) in list {
        out.push_str(&format!("{t} {name}\n"));
    }
    out.into_bytes()
}

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl S4db {
    /// The retired list and its ETag (`None`: there is none).
    pub(crate) async fn fetch_retired(&self) -> Result<(Retired, Option<String>)> {
        let key = self.object_key(RETIRED_NAME);
        match self.inner.store.get(&key).await {
            Ok(got) => Ok((decode(&got.data), Some(got.etag))),
            Err(StoreError::NotFound { .. }) => Ok((Retired::new(), None)),
            Err(e) => Err(e.into()),
        }
    }

    /// Changes the retired list with `edit` (compare-and-swap, retried on
    /// conflict). Skips the PUT when `edit` changes nothing.
    pub(crate) async fn edit_retired(&self, mut edit: impl FnMut(&mut Retired)) -> Result<()> {
        let key = self.object_key(RETIRED_NAME);
        for _ in 0..ATTEMPTS {
            let (mut list, etag) = self.fetch_retired().await?;
            let before = list.clone();
            edit(&mut list);
            if list == before {
                return Ok(());
            }
            let condition = self.index_condition(&etag);
            match self
                .inner
                .store
                .put(&key, encode(&list).into(), condition)
                .await
            {
                Ok(_) => return Ok(()),
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Conflict(format!(
            "{key}: lost the update race {ATTEMPTS} times; try again"
        )))
    }

    /// Lists `names` as retired now.
    pub(crate) async fn retire(&self, names: &[String]) -> Result<()> {
        if names.is_empty() {
            return Ok(());
        }
        let now = unix_now();
        self.edit_retired(|list| {
            for n in names {
                let t = list.entry(n.clone()).or_insert(now);
                *t = (*t).max(now);
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_junk() {
        let mut l = Retired::new();
        l.insert("data_0000000a_000001.s4db".into(), 17);
        l.insert("data_000002.s4db".into(), 1_700_000_000);
        assert_eq!(decode(&encode(&l)), l);
        assert!(decode(b"junk\n1 data_000001.s4db\n").is_empty());
        let with_junk = format!("{MAGIC}\n1 data_000001.s4db\nx y\n2 not-a-data-file\n");
        assert_eq!(decode(with_junk.as_bytes()).len(), 1);
    }
}
