//! A wrapper that merges concurrent range GETs of the same object.
//!
//! Values written together sit next to each other in one data file, so a
//! burst of cold reads (64 `cat`s at once through the mount, an export) asks
//! for many small neighbouring ranges of one object at the same moment. Each
//! request costs a round trip of server work and, on S3, money and a share of
//! the per-prefix request rate; one larger GET costs about the same as one
//! small one. So, per object key:
//!
//! - while fewer than [`CoalesceLimits::max_in_flight_per_object`] range GETs
//!   of it are in flight, a call goes out at once, alone: reads one by one
//!   are one GET each, with no timer and no added latency;
//! - otherwise it waits. When an in-flight GET of that object ends (or its
//!   caller gives up), every waiting call is taken, sorted by offset and cut
//!   into runs of nearby ranges; each run is one GET whose bytes are sliced
//!   (zero-copy) to answer each of its callers, and a failure reaches all of
//!   them. A waiter waits for at most one GET of at most
//!   [`CoalesceLimits::max_span`] bytes before its own goes out.
//!
//! Runs are spawned tasks, so a caller that is cancelled harms no one else.
//! The wrapper sits above [`super::MeteredStore`], whose counts stay those of
//! requests actually sent.

use super::{
    GetResult, ListPage, ObjectMeta, ObjectStore, PendingUpload, PutCondition, StoreError,
    StoreResult,
};
use async_trait::async_trait;
use bytes::Bytes;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// When range GETs of one object wait to be merged, and how far merging goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CoalesceLimits {
    /// Range GETs of one object that go out alone, at once, before further
    /// calls wait. 2: two readers of one object at a time (two processes,
    /// readahead next to a read) never wait for each other; from the third
    /// on, calls queue behind at most one GET and then go out together.
    pub max_in_flight_per_object: usize,
    /// The largest hole between two ranges that one GET still spans: 64 KiB
    /// more transfer costs well under a millisecond, a request a round trip.
    pub max_gap: u64,
    /// The most bytes one merged GET spans, which also bounds the wait of a
    /// queued call. Calls for more than this bypass the wrapper entirely, so
    /// large reads neither wait nor make small ones wait.
    pub max_span: u64,
}

impl Default for CoalesceLimits {
    fn default() -> Self {
        CoalesceLimits {
            max_in_flight_per_object: 2,
            max_gap: 64 * 1024,
            max_span: 8 * 1024 * 1024,
        }
    }
}

/// Merges concurrent range GETs of one object; passes everything else through.
#[derive(Debug)]
pub struct CoalescingStore {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    inner: Arc<dyn ObjectStore>,
    limits: CoalesceLimits,
    /// Only objects with a range GET in flight have an entry.
    objects: Mutex<HashMap<String, Object>>,
}

#[derive(Debug, Default)]
struct Object {
    in_flight: usize,
    queued: Vec<Waiter>,
}

#[derive(Debug)]
struct Waiter {
    offset: u64,
    len: u64,
    reply: oneshot::Sender<StoreResult<Bytes>>,
}

impl Waiter {
    fn end(&self) -> u64 {
        self.offset.saturating_add(self.len)
    }
}

/// Waiters answered by one GET of `start..end`.
#[derive(Debug)]
struct Run {
    start: u64,
    end: u64,
    waiters: Vec<Waiter>,
}

impl Shared {
    fn objects(&self) -> MutexGuard<'_, HashMap<String, Object>> {
        self.objects.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One range GET of `key` in flight. Dropping it, when the GET ends or its
/// caller is cancelled, sends out whatever queued behind it.
struct Slot {
    shared: Arc<Shared>,
    key: String,
    runtime: Handle,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let runs = {
            let mut objects = self.shared.objects();
            let Some(object) = objects.get_mut(&self.key) else {
                return;
            };
            object.in_flight -= 1;
            let waiting: Vec<Waiter> = std::mem::take(&mut object.queued)
                .into_iter()
                .filter(|w| !w.reply.is_closed())
                .collect();
            let runs = group(waiting, &self.shared.limits);
            object.in_flight += runs.len();
            if object.in_flight == 0 {
                objects.remove(&self.key);
            }
            runs
        };
        for run in runs {
            let slot = Slot {
                shared: self.shared.clone(),
                key: self.key.clone(),
                runtime: self.runtime.clone(),
            };
            // On a runtime shutting down the task is dropped: its slot hands
            // on as above and its waiters see their reply dropped.
            self.runtime.spawn(fetch_run(slot, run));
        }
    }
}

/// Sorts waiters by offset and cuts them into runs: a waiter joins the run
/// before it when the hole between them is at most `max_gap` and the run
/// then spans at most `max_span`.
fn group(mut waiters: Vec<Waiter>, limits: &CoalesceLimits) -> Vec<Run> {
    waiters.sort_by_key(|w| w.offset);
    let mut runs: Vec<Run> = Vec::new();
    for w in waiters {
        let end = w.end();
        if let Some(run) = runs.last_mut() {
            let near = w.offset <= run.end.saturating_add(limits.max_gap);
            if near && end.max(run.end) - run.start <= limits.max_span {
                run.end = run.end.max(end);
                run.waiters.push(w);
                continue;
            }
        }
        runs.push(Run {
            start: w.offset,
            end,
            waiters: vec![w],
        });
    }
    runs
}

/// One GET for a whole run, sliced to answer each waiter.
async fn fetch_run(slot: Slot, run: Run) {
    let result = slot
        .shared
        .inner
        .get_range(&slot.key, run.start, run.end - run.start)
        .await;
    // The next queued calls may go out now.
    drop(slot);
    match result {
        Ok(data) => {
            let have = data.len() as u64;
            for w in run.waiters {
                // A short reply means the object ends there: past it, empty.
                let from = (w.offset - run.start).min(have);
                let to = (w.end() - run.start).min(have);
                let _ = w.reply.send(Ok(data.slice(from as usize..to as usize)));
            }
        }
        Err(e) => {
            for w in run.waiters {
                let _ = w.reply.send(Err(e.clone()));
            }
        }
    }
}

impl CoalescingStore {
    pub fn new(inner: Arc<dyn ObjectStore>) -> CoalescingStore {
        CoalescingStore::with_limits(inner, CoalesceLimits::default())
    }

    pub fn with_limits(inner: Arc<dyn ObjectStore>, limits: CoalesceLimits) -> CoalescingStore {
        CoalescingStore {
            shared: Arc::new(Shared {
                inner,
                limits: CoalesceLimits {
                    max_in_flight_per_object: limits.max_in_flight_per_object.max(1),
                    ..limits
                },
                objects: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Calls waiting to be merged, over all objects.
    pub fn queued(&self) -> usize {
        self.shared.objects().values().map(|o| o.queued.len()).sum()
    }
}

#[async_trait]
impl ObjectStore for CoalescingStore {
    fn describe(&self) -> String {
        self.shared.inner.describe()
    }

    async fn get(&self, key: &str) -> StoreResult<GetResult> {
        self.shared.inner.get(key).await
    }

    async fn get_range(&self, key: &str, offset: u64, len: u64) -> StoreResult<Bytes> {
        let shared = &self.shared;
        let runtime = match Handle::try_current() {
            Ok(runtime) if len > 0 && len <= shared.limits.max_span => runtime,
            // Nothing to merge, or no runtime to run merged GETs on.
            _ => return shared.inner.get_range(key, offset, len).await,
        };
        let waiting = {
            let mut objects = shared.objects();
            let object = objects.entry(key.to_string()).or_default();
            if object.in_flight < shared.limits.max_in_flight_per_object {
                object.in_flight += 1;
                None
            } else {
                let (reply, answer) = oneshot::channel();
                object.queued.push(Waiter { offset, len, reply });
                Some(answer)
            }
        };
        match waiting {
            None => {
                let _slot = Slot {
                    shared: shared.clone(),
                    key: key.to_string(),
                    runtime,
                };
                shared.inner.get_range(key, offset, len).await
            }
            Some(answer) => answer.await.unwrap_or_else(|_| {
                Err(StoreError::io(
                    "get",
                    key,
                    "the merged range GET was dropped (runtime shutting down)",
                ))
            }),
        }
    }

    async fn put(&self, key: &str, data: Bytes, condition: PutCondition) -> StoreResult<String> {
        self.shared.inner.put(key, data, condition).await
    }

    async fn put_file(
        &self,
        key: &str,
        path: &Path,
        condition: PutCondition,
    ) -> StoreResult<String> {
        self.shared.inner.put_file(key, path, condition).await
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.shared.inner.delete(key).await
    }

    fn part_layout(&self) -> Option<super::PartLayout> {
        self.shared.inner.part_layout()
    }

    async fn start_multipart_upload(&self, key: &str) -> StoreResult<String> {
        self.shared.inner.start_multipart_upload(key).await
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        data: Bytes,
    ) -> StoreResult<super::SentPart> {
        self.shared
            .inner
            .upload_part(key, upload_id, number, data)
            .await
    }

    async fn put_file_with_parts(
        &self,
        key: &str,
        path: &Path,
        condition: PutCondition,
        early: super::EarlyUpload,
    ) -> StoreResult<String> {
        self.shared
            .inner
            .put_file_with_parts(key, path, condition, early)
            .await
    }

    async fn head(&self, key: &str) -> StoreResult<ObjectMeta> {
        self.shared.inner.head(key).await
    }

    async fn list_page(&self, prefix: &str, continuation: Option<String>) -> StoreResult<ListPage> {
        self.shared.inner.list_page(prefix, continuation).await
    }

    async fn list_multipart_uploads(&self, prefix: &str) -> StoreResult<Vec<PendingUpload>> {
        self.shared.inner.list_multipart_uploads(prefix).await
    }

    async fn abort_multipart_upload(&self, key: &str, upload_id: &str) -> StoreResult<()> {
        self.shared
            .inner
            .abort_multipart_upload(key, upload_id)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::{Fault, FaultStore, LocalStore, Op};
    use tokio::sync::Semaphore;
    use tokio::task::JoinHandle;

    const KEY: &str = "db/data-1";

    /// An object of `size` bytes where byte i is `i % 251`, behind a fault
    /// wrapper (which counts calls) and the coalescer.
    async fn setup(size: usize) -> (tempfile::TempDir, Arc<FaultStore>, Arc<CoalescingStore>) {
        let dir = tempfile::tempdir().unwrap();
        let local = LocalStore::open(dir.path(), "bucket").unwrap();
        let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        local
            .put(KEY, Bytes::from(data), PutCondition::None)
            .await
            .unwrap();
        let faulty = Arc::new(FaultStore::new(Arc::new(local)));
        let store = Arc::new(CoalescingStore::new(faulty.clone()));
        (dir, faulty, store)
    }

    fn expected(offset: u64, len: u64) -> Vec<u8> {
        (offset..offset + len).map(|i| (i % 251) as u8).collect()
    }

    /// Holds the first two range GETs (the ones that go out alone) at a gate.
    fn hold_first_two(faulty: &FaultStore) -> Arc<Semaphore> {
        let gate = Arc::new(Semaphore::new(0));
        faulty.inject(Op::GetRange, "", 0, 2, Fault::Gate(gate.clone()));
        gate
    }

    fn read(store: &Arc<CoalescingStore>, offset: u64, len: u64) -> JoinHandle<StoreResult<Bytes>> {
        let store = store.clone();
        tokio::spawn(async move { store.get_range(KEY, offset, len).await })
    }

    async fn until(mut done: impl FnMut() -> bool) {
        while !done() {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn reads_one_by_one_are_one_request_each() {
        let (_dir, faulty, store) = setup(10_000).await;
        for i in 0..10 {
            let got = store.get_range(KEY, i * 100, 100).await.unwrap();
            assert_eq!(got, expected(i * 100, 100));
        }
        assert_eq!(faulty.count(Op::GetRange), 10);
        assert_eq!(store.queued(), 0);
        assert!(
            store.shared.objects().is_empty(),
            "idle objects are forgotten"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sixty_four_concurrent_reads_of_one_object_become_three_requests() {
        let (_dir, faulty, store) = setup(64 * 1000).await;
        let gate = hold_first_two(&faulty);
        // Neighbouring values, asked for in a scrambled order.
        let reads: Vec<_> = (0..64u64)
            .map(|i| (i * 37) % 64)
            .map(|i| (i, read(&store, i * 1000, 1000)))
            .collect();
        until(|| faulty.in_flight() == 2 && store.queued() == 62).await;
        gate.add_permits(2);
        for (i, reading) in reads {
            let got = reading.await.unwrap().unwrap();
            assert_eq!(got, expected(i * 1000, 1000), "read {i}");
        }
        // Two alone, then everything that queued behind them as one.
        assert_eq!(faulty.count(Op::GetRange), 3);
        assert_eq!(store.queued(), 0);
        assert!(store.shared.objects().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ranges_far_apart_are_not_merged_and_near_ones_are() {
        let (_dir, faulty, store) = setup(3 << 20).await;
        let gate = hold_first_two(&faulty);
        let alone = [read(&store, 0, 10), read(&store, 0, 10)];
        until(|| faulty.in_flight() == 2).await;
        // Two runs: a gap of exactly 64 KiB still joins, one more byte does not.
        let gap = CoalesceLimits::default().max_gap;
        let near = [(100, 50), (150 + gap, 50)];
        let far = [(150 + gap + 50 + gap + 1, 10), (2 << 20, 10)];
        let reads: Vec<_> = near
            .iter()
            .chain(&far)
            .map(|&(o, l)| ((o, l), read(&store, o, l)))
            .collect();
        until(|| store.queued() == 4).await;
        gate.add_permits(2);
        for ((o, l), reading) in reads {
            assert_eq!(reading.await.unwrap().unwrap(), expected(o, l));
        }
        for reading in alone {
            reading.await.unwrap().unwrap();
        }
        assert_eq!(faulty.count(Op::GetRange), 2 + 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_merged_request_fails_each_of_its_callers() {
        let (_dir, faulty, store) = setup(64 * 1000).await;
        let gate = hold_first_two(&faulty);
        faulty.inject(Op::GetRange, "", 0, 1, Fault::Error("boom".into()));
        let alone = [read(&store, 0, 10), read(&store, 0, 10)];
        until(|| faulty.in_flight() == 2).await;
        let reads: Vec<_> = (1..11).map(|i| read(&store, i * 1000, 1000)).collect();
        until(|| store.queued() == 10).await;
        gate.add_permits(2);
        for reading in reads {
            match reading.await.unwrap() {
                Err(StoreError::Io { key, message, .. }) => {
                    assert_eq!((key.as_str(), message.as_str()), (KEY, "boom"));
                }
                other => panic!("expected the injected error, got {other:?}"),
            }
        }
        for reading in alone {
            reading.await.unwrap().unwrap();
        }
        assert_eq!(faulty.count(Op::GetRange), 3);
        // The next read is on its own again, and succeeds.
        assert_eq!(store.get_range(KEY, 5, 5).await.unwrap(), expected(5, 5));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cancelled_callers_do_not_hurt_the_others() {
        let (_dir, faulty, store) = setup(64 * 1000).await;
        let gate = hold_first_two(&faulty);
        let alone = [read(&store, 0, 10), read(&store, 0, 10)];
        until(|| faulty.in_flight() == 2).await;
        let reads: Vec<_> = (1..11).map(|i| (i, read(&store, i * 1000, 1000))).collect();
        until(|| store.queued() == 10).await;
        // A waiter gives up, then both callers whose GETs are in flight (the
        // gate never opens for them): the queue still goes out, without it.
        let (mut kept, mut dropped) = (Vec::new(), Vec::new());
        for (i, reading) in reads {
            if i == 4 {
                dropped.push(reading);
            } else {
                kept.push((i, reading));
            }
        }
        for reading in dropped.into_iter().chain(alone) {
            reading.abort();
            assert!(reading.await.unwrap_err().is_cancelled());
        }
        for (i, reading) in kept {
            assert_eq!(reading.await.unwrap().unwrap(), expected(i * 1000, 1000));
        }
        // The merged GET was not gated; the gate's permits were never needed.
        assert_eq!(faulty.count(Op::GetRange), 3);
        assert_eq!(gate.available_permits(), 0);
        until(|| store.shared.objects().is_empty()).await;
    }

    #[tokio::test]
    async fn reads_past_the_end_and_large_reads_behave_as_without_merging() {
        let (_dir, faulty, store) = setup(1000).await;
        assert_eq!(
            store.get_range(KEY, 990, 100).await.unwrap(),
            expected(990, 10)
        );
        assert!(store.get_range(KEY, 2000, 10).await.unwrap().is_empty());
        assert!(store.get_range(KEY, 10, 0).await.unwrap().is_empty());
        let big = store.get_range(KEY, 0, 16 << 20).await.unwrap();
        assert_eq!(big, expected(0, 1000));
        assert!(matches!(
            store.get_range("db/missing", 0, 10).await,
            Err(StoreError::NotFound { .. })
        ));
        assert_eq!(faulty.count(Op::GetRange), 5);
    }

    #[test]
    fn grouping_sorts_and_cuts_at_gaps_and_spans() {
        let limits = CoalesceLimits {
            max_in_flight_per_object: 2,
            max_gap: 10,
            max_span: 100,
        };
        let waiters = [
            (35, 60),
            (0, 10),
            (200, 300),
            (20, 10),
            (125, 5),
            (5, 2),
            (100, 10),
        ]
        .into_iter()
        .map(|(offset, len)| Waiter {
            offset,
            len,
            reply: oneshot::channel().0,
        })
        .collect();
        let runs: Vec<_> = group(waiters, &limits)
            .iter()
            .map(|r| (r.start, r.end, r.waiters.len()))
            .collect();
        // Holes of at most 10 join 0..10, 5..7, 20..30 and 35..95; 100..110
        // is near but would make the run span 110; 125 is 15 past 110;
        // 200..500 is far, and longer than a span on its own.
        assert_eq!(
            runs,
            [(0, 95, 4), (100, 110, 1), (125, 130, 1), (200, 500, 1)]
        );
    }

    #[tokio::test]
    async fn the_store_contract_holds_through_the_coalescer() {
        let dir = tempfile::tempdir().unwrap();
        let local = LocalStore::open(dir.path(), "bucket").unwrap();
        let store = CoalescingStore::new(Arc::new(local));
        crate::remote::contract::check(&store).await;
    }
}
