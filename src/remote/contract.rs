//! The behaviour every [`ObjectStore`] must have, as one test routine that
//! each backend's tests run against a real instance (a directory, moto).

use super::{ObjectStore, PutCondition, StoreError, StoreResult};
use bytes::Bytes;
use std::time::{Duration, SystemTime};

pub(crate) fn assert_conflict<T: std::fmt::Debug>(result: StoreResult<T>) {
    assert!(
        matches!(result, Err(StoreError::Conflict { .. })),
        "expected a conflict, got {result:?}"
    );
}

pub(crate) fn assert_not_found<T: std::fmt::Debug>(result: StoreResult<T>) {
    assert!(
        matches!(result, Err(StoreError::NotFound { .. })),
        "expected not found, got {result:?}"
    );
}

/// Runs the whole contract on an empty store.
pub(crate) async fn check(store: &dyn ObjectStore) {
    round_trip_and_etags(store).await;
    range_reads(store).await;
    conditional_puts(store).await;
    missing_objects_and_delete(store).await;
    listing(store).await;
}

async fn round_trip_and_etags(store: &dyn ObjectStore) {
    let before = SystemTime::now() - Duration::from_secs(60);
    let etag = store
        .put("rt/a", Bytes::from_static(b"hello"), PutCondition::None)
        .await
        .unwrap();
    let got = store.get("rt/a").await.unwrap();
    assert_eq!(&got.data[..], b"hello");
    assert_eq!(got.etag, etag);
    let meta = store.head("rt/a").await.unwrap();
    assert_eq!((meta.key.as_str(), meta.size), ("rt/a", 5));
    assert_eq!(meta.etag.as_deref(), Some(etag.as_str()));
    assert!(meta.last_modified > before, "{:?}", meta.last_modified);
    let again = store
        .put("rt/a", Bytes::from_static(b"world!"), PutCondition::None)
        .await
        .unwrap();
    assert_ne!(etag, again);
    assert_eq!(&store.get("rt/a").await.unwrap().data[..], b"world!");
}

async fn range_reads(store: &dyn ObjectStore) {
    store
        .put(
            "range/k",
            Bytes::from_static(b"0123456789"),
            PutCondition::None,
        )
        .await
        .unwrap();
    assert_eq!(&store.get_range("range/k", 2, 3).await.unwrap()[..], b"234");
    assert_eq!(
        &store.get_range("range/k", 0, 10).await.unwrap()[..],
        b"0123456789"
    );
    // A short object gives fewer bytes, not an error; past the end gives none.
    assert_eq!(&store.get_range("range/k", 8, 10).await.unwrap()[..], b"89");
    assert!(store.get_range("range/k", 10, 5).await.unwrap().is_empty());
    assert!(store
        .get_range("range/k", 1000, 5)
        .await
        .unwrap()
        .is_empty());
    assert!(store.get_range("range/k", 3, 0).await.unwrap().is_empty());
    store
        .put("range/empty", Bytes::new(), PutCondition::None)
        .await
        .unwrap();
    assert!(store
        .get_range("range/empty", 0, 4)
        .await
        .unwrap()
        .is_empty());
    assert_not_found(store.get_range("range/missing", 0, 4).await);
}

async fn conditional_puts(store: &dyn ObjectStore) {
    let put = |data: &'static [u8], condition| {
        store.put("cond/lock", Bytes::from_static(data), condition)
    };
    let first = put(b"v1", PutCondition::IfAbsent).await.unwrap();
    assert_conflict(put(b"v2", PutCondition::IfAbsent).await);
    let second = put(b"v2", PutCondition::IfMatch(first.clone()))
        .await
        .unwrap();
    assert_ne!(first, second);
    // The first ETag is stale now, and a failed PUT changes nothing.
    assert_conflict(put(b"v3", PutCondition::IfMatch(first)).await);
    let got = store.get("cond/lock").await.unwrap();
    assert_eq!(
        (&got.data[..], got.etag.as_str()),
        (&b"v2"[..], second.as_str())
    );
    // Replacing a version that was deleted meanwhile is a lost race too.
    store.delete("cond/lock").await.unwrap();
    assert_conflict(put(b"v4", PutCondition::IfMatch(second)).await);
    assert_not_found(store.get("cond/lock").await);
}

async fn missing_objects_and_delete(store: &dyn ObjectStore) {
    assert_not_found(store.get("gone/nope").await);
    assert_not_found(store.head("gone/nope").await);
    store.delete("gone/nope").await.unwrap();
    store
        .put("gone/doomed", Bytes::from_static(b"x"), PutCondition::None)
        .await
        .unwrap();
    store.delete("gone/doomed").await.unwrap();
    assert_not_found(store.get("gone/doomed").await);
    assert!(store.list("gone/").await.unwrap().is_empty());
}

async fn listing(store: &dyn ObjectStore) {
    for (i, key) in ["db/e", "db/b", "db/d", "db/a", "db/c", "dbx/z"]
        .iter()
        .enumerate()
    {
        store
            .put(key, Bytes::from(vec![b'x'; i + 1]), PutCondition::None)
            .await
            .unwrap();
    }
    let all = store.list("db/").await.unwrap();
    let keys: Vec<_> = all.iter().map(|o| o.key.as_str()).collect();
    assert_eq!(keys, ["db/a", "db/b", "db/c", "db/d", "db/e"]);
    let sizes: Vec<_> = all.iter().map(|o| o.size).collect();
    assert_eq!(sizes, [4, 2, 5, 3, 1]);
    assert_eq!(
        store.list("db").await.unwrap().len(),
        6,
        "a prefix, not a directory"
    );
    assert!(store.list("nothing/").await.unwrap().is_empty());
}
