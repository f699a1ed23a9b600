//! A wrapper store that injects failures, latency and conflicts at chosen
//! calls, so tests can prove what the engine does when S3 misbehaves.

use super::{
    GetResult, ListPage, ObjectMeta, ObjectStore, PendingUpload, PutCondition, StoreError,
    StoreResult,
};
use async_trait::async_trait;
use bytes::Bytes;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The store operations a fault can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Get,
    GetRange,
    Put,
    Delete,
    Head,
    List,
    /// Listing unfinished multipart uploads.
    ListUploads,
    /// Aborting a multipart upload.
    AbortUpload,
    /// Starting a multipart upload.
    StartUpload,
    /// Sending one part of a multipart upload started ahead.
    UploadPart,
}

/// What happens to a targeted call.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Fail with an I/O error carrying this message.
    Error(String),
    /// Fail as if another writer won a conditional write.
    Conflict,
    /// Sleep, then perform the call.
    Delay(Duration),
    /// Wait for a permit of this semaphore, then perform the call: a test
    /// holds calls in flight for as long as it needs, with no timing involved.
    Gate(Arc<tokio::sync::Semaphore>),
    /// Perform the call, then fail with this message as if the reply was lost
    /// (a timeout after the server acted): the ambiguous case.
    LostReply(String),
}

#[derive(Debug)]
struct Rule {
    op: Op,
    key_contains: String,
    skip: u64,
    remaining: u64,
    fault: Fault,
}

#[derive(Debug)]
pub struct FaultStore {
    inner: Arc<dyn ObjectStore>,
    rules: Mutex<Vec<Rule>>,
    calls: Mutex<Vec<(Op, String)>>,
    put_conditions: Mutex<Vec<(String, PutCondition)>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

/// Counts a call as in flight until dropped; carries a lost-reply fault.
struct InFlight<'a> {
    store: &'a FaultStore,
    lost_reply: Option<String>,
}

impl InFlight<'_> {
    /// The inner call's result, unless its reply is to be lost.
    fn finish<T>(self, key: &str, result: StoreResult<T>) -> StoreResult<T> {
        match (&self.lost_reply, result) {
            (Some(message), Ok(_)) => Err(StoreError::io("injected lost reply of", key, message)),
            (_, result) => result,
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.store.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl FaultStore {
    pub fn new(inner: Arc<dyn ObjectStore>) -> Self {
        FaultStore {
            inner,
            rules: Mutex::new(Vec::new()),
            calls: Mutex::new(Vec::new()),
            put_conditions: Mutex::new(Vec::new()),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
        }
    }

    /// Applies `fault` to `times` calls of `op` whose key contains
    /// `key_contains`, after letting the first `skip` matching calls through.
    pub fn inject(&self, op: Op, key_contains: &str, skip: u64, times: u64, fault: Fault) {
        self.rules.lock().unwrap().push(Rule {
            op,
            key_contains: key_contains.to_string(),
            skip,
            remaining: times,
            fault,
        });
    }

    pub fn clear(&self) {
        self.rules.lock().unwrap().clear();
    }

    /// Every call made so far, in order, as `(op, key)`.
    pub fn calls(&self) -> Vec<(Op, String)> {
        self.calls.lock().unwrap().clone()
    }

    /// The precondition of every PUT so far, with its key.
    pub fn put_conditions(&self) -> Vec<(String, PutCondition)> {
        self.put_conditions.lock().unwrap().clone()
    }

    /// How many calls of `op` were made.
    pub fn count(&self, op: Op) -> usize {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|(o, _)| *o == op)
            .count()
    }

    /// Calls in flight right now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// The most calls that were ever in flight at once: proves that reads overlap.
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight.load(Ordering::SeqCst)
    }

    /// Records the call and returns the fault that applies to it, if any.
    fn check(&self, op: Op, key: &str) -> Option<Fault> {
        self.calls.lock().unwrap().push((op, key.to_string()));
        let mut rules = self.rules.lock().unwrap();
        for rule in rules.iter_mut() {
            if rule.op != op || !key.contains(&rule.key_contains) || rule.remaining == 0 {
                continue;
            }
            if rule.skip > 0 {
                rule.skip -= 1;
                continue;
            }
            rule.remaining -= 1;
            return Some(rule.fault.clone());
        }
        None
    }

    fn record_condition(&self, key: &str, condition: &PutCondition) {
        self.put_conditions
            .lock()
            .unwrap()
            .push((key.to_string(), condition.clone()));
    }

    async fn before(&self, op: Op, key: &str) -> StoreResult<InFlight<'_>> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        let mut guard = InFlight {
            store: self,
            lost_reply: None,
        };
        match self.check(op, key) {
            None => Ok(guard),
            Some(Fault::LostReply(message)) => {
                guard.lost_reply = Some(message);
                Ok(guard)
            }
            Some(Fault::Delay(d)) => {
                tokio::time::sleep(d).await;
                Ok(guard)
            }
            Some(Fault::Gate(gate)) => {
                let _permit = gate
                    .acquire()
                    .await
                    .map_err(|e| StoreError::io("gate of", key, e))?;
                Ok(guard)
            }
            Some(Fault::Conflict) => Err(StoreError::Conflict {
                key: key.to_string(),
            }),
            Some(Fault::Error(message)) => Err(StoreError::io("injected fault in", key, message)),
        }
    }
}

#[async_trait]
impl ObjectStore for FaultStore {
    fn describe(&self) -> String {
        format!("faulty {}", self.inner.describe())
    }

    async fn get(&self, key: &str) -> StoreResult<GetResult> {
        let call = self.before(Op::Get, key).await?;
        call.finish(key, self.inner.get(key).await)
    }

    async fn get_range(&self, key: &str, offset: u64, len: u64) -> StoreResult<Bytes> {
        let call = self.before(Op::GetRange, key).await?;
        call.finish(key, self.inner.get_range(key, offset, len).await)
    }

    async fn put(&self, key: &str, data: Bytes, condition: PutCondition) -> StoreResult<String> {
        let call = self.before(Op::Put, key).await?;
        self.record_condition(key, &condition);
        call.finish(key, self.inner.put(key, data, condition).await)
    }

    async fn put_file(
        &self,
        key: &str,
        path: &Path,
        condition: PutCondition,
    ) -> StoreResult<String> {
        let call = self.before(Op::Put, key).await?;
        self.record_condition(key, &condition);
        call.finish(key, self.inner.put_file(key, path, condition).await)
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        let call = self.before(Op::Delete, key).await?;
        call.finish(key, self.inner.delete(key).await)
    }

    async fn head(&self, key: &str) -> StoreResult<ObjectMeta> {
        let call = self.before(Op::Head, key).await?;
        call.finish(key, self.inner.head(key).await)
    }

    async fn list_page(&self, prefix: &str, continuation: Option<String>) -> StoreResult<ListPage> {
        let call = self.before(Op::List, prefix).await?;
        call.finish(prefix, self.inner.list_page(prefix, continuation).await)
    }

    async fn list_multipart_uploads(&self, prefix: &str) -> StoreResult<Vec<PendingUpload>> {
        let call = self.before(Op::ListUploads, prefix).await?;
        call.finish(prefix, self.inner.list_multipart_uploads(prefix).await)
    }

    async fn abort_multipart_upload(&self, key: &str, upload_id: &str) -> StoreResult<()> {
        let call = self.before(Op::AbortUpload, key).await?;
        call.finish(key, self.inner.abort_multipart_upload(key, upload_id).await)
    }

    fn part_layout(&self) -> Option<super::PartLayout> {
        self.inner.part_layout()
    }

    async fn start_multipart_upload(&self, key: &str) -> StoreResult<String> {
        let call = self.before(Op::StartUpload, key).await?;
        call.finish(key, self.inner.start_multipart_upload(key).await)
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        data: Bytes,
    ) -> StoreResult<super::SentPart> {
        let call = self.before(Op::UploadPart, key).await?;
        call.finish(
            key,
            self.inner.upload_part(key, upload_id, number, data).await,
        )
    }

    /// A PUT, as [`ObjectStore::put_file`].
    async fn put_file_with_parts(
        &self,
        key: &str,
        path: &Path,
        condition: PutCondition,
        early: super::EarlyUpload,
    ) -> StoreResult<String> {
        let call = self.before(Op::Put, key).await?;
        self.record_condition(key, &condition);
        call.finish(
            key,
            self.inner
                .put_file_with_parts(key, path, condition, early)
                .await,
        )
    }
}
