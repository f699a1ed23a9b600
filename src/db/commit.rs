//! Upload: publish new data files, then the attribute object, then commit
//! the index (FORMAT.md, "Commit protocol").
//!
//! An upload seals the active file, so every data file is uploaded exactly
//! once: an upload transfers only the bytes written since the last one. The
//! index PUT is a compare-and-swap on the ETag we loaded; when another writer
//! committed first we take its index, put our uncommitted writes back on top
//! (last writer wins per key) and try again.
//!
//! Attributes go first. When attribute changes are in flight, each attempt
//! PUTs `<prefix>s4db.attrs` with `If-Match` on the ETag it was loaded with
//! (`If-None-Match: *` when there was none); on a conflict it GETs the
//! winner's object, puts this instance's attribute changes back on top (last
//! writer wins per record) and tries again. Then the index, as above; on an
//! index conflict both objects are fetched (index first) and rebased. When
//! only attributes changed the index PUT is skipped: a chmod costs one PUT.
//!
//! Why this order is safe: a reader GETs the index and then the attribute
//! object, so it always sees attributes at least as new as the entries it
//! reads. Records are bound to entries (file id and offset), so a record
//! written ahead of a commit that is then lost can never attach to another
//! version of a value; and while a commit is in flight the object keeps the
//! records of the entries the committed index still names, so a reader of
//! the older index (or a commit that never lands) keeps its attributes too.

use super::attr_codec::ATTRS_NAME;
use super::state::OwnFile;
use super::S4db;
use crate::error::{Error, Result};
use crate::format::{data_file_name, Index, INDEX_NAME};
use crate::remote::{PutCondition, StoreError};
use futures::StreamExt;
use md5::{Digest, Md5};
use std::collections::HashMap;

/// What an upload did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct UploadReport {
    /// Data files uploaded.
    pub files: usize,
    /// Bytes of data files uploaded.
    pub bytes: u64,
    /// Whether the index was committed (false: there was nothing to publish).
    pub committed: bool,
    /// How many times the commit rebased onto another writer's index.
    pub rebases: u32,
    /// Whether the attribute object was committed.
    pub attrs_committed: bool,
}

impl S4db {
    /// Publishes local writes: PUTs each data file written since the last
    /// upload (create-only), then commits the index with a conditional PUT.
    /// On a lost race, rebases onto the winner and retries (bounded).
    ///
    /// # Errors
    /// [`Error::Store`] when a PUT fails after retries (nothing is lost: the
    /// writes stay unsynced and the next upload tries again);
    /// [`Error::Conflict`] when the commit lost the race every time, or the
    /// index was rebuilt and someone committed meanwhile.
    pub async fn upload(&self) -> Result<UploadReport> {
        let _serial = self.inner.maintenance.lock().await;
        self.upload_locked().await
    }

    pub(crate) async fn upload_locked(&self) -> Result<UploadReport> {
        let (files, local) = {
            let mut state = self.state();
            if !state.has_unsynced() {
                return Ok(UploadReport::default());
            }
            state.active = None;
            let journal = std::mem::take(&mut state.journal);
            state.inflight.extend(journal);
            state.before_upload = Some(HashMap::new());
            let attr_journal = std::mem::take(&mut state.attr_journal);
            state.attr_inflight.extend(attr_journal);
            state.attr_before_upload = Some(HashMap::new());
            let files: Vec<(u64, OwnFile)> = state
                .files
                .iter()
                .filter(|(_, f)| !f.published)
                .map(|(id, f)| (*id, *f))
                .collect();
            (files, state.local.clone())
        };
        let result = self.publish(files, local.as_deref()).await;
        let mut state = self.state();
        state.before_upload = None;
        state.attr_before_upload = None;
        match result {
            Ok(report) => {
                state.inflight.clear();
                state.attr_inflight.clear();
                state.index_rewritten = false;
                state.moves.clear();
                // The commit landed: only keys written since keep a base.
                let journal = std::mem::take(&mut state.journal);
                state.journal_base.retain(|k, _| journal.contains_key(k));
                state.journal = journal;
                state.prune_attrs();
                state.save_pending_list()?;
                state.rewrite_attr_log()?;
                Ok(report)
            }
            Err(e) => {
                // Keep every write: what failed to commit goes back to the journal.
                let inflight = std::mem::take(&mut state.inflight);
                for (k, c) in inflight {
                    state.journal.entry(k).or_insert(c);
                }
                let inflight = std::mem::take(&mut state.attr_inflight);
                for (k, c) in inflight {
                    state.attr_journal.entry(k).or_insert(c);
                }
                Err(e)
            }
        }
    }

    async fn publish(
        &self,
        files: Vec<(u64, OwnFile)>,
        local: Option<&super::LocalDir>,
    ) -> Result<UploadReport> {
        let mut report = UploadReport::default();
        if !files.is_empty() {
            let local = local.ok_or_else(|| {
                Error::Usage("data files to upload but no local directory".into())
            })?;
            let uploads = futures::stream::iter(files.into_iter().map(|(id, f)| async move {
                let path = local.file_path(id);
                let name = data_file_name(id);
                let size = std::fs::metadata(&path)
                    .map_err(|e| Error::io("stat", &path, e))?
                    .len();
                let key = self.object_key(&name);
                let condition = self.new_file_condition(f.unconditional);
                // Parts sent while the file's one large value was written
                // are kept; a failure aborts them and the retry sends all.
                let pending = self.state().early_uploads.remove(&id);
                let put = match pending {
                    Some(pending) => {
                        let early = pending.settle().await;
                        let store = &self.inner.store;
                        store
                            .put_file_with_parts(&key, &path, condition, early)
                            .await
                    }
                    None => self.inner.store.put_file(&key, &path, condition).await,
                };
                match put {
                    Ok(_) => {}
                    // An earlier attempt may have landed without us hearing back:
                    // the same bytes under our own name are a success.
                    Err(StoreError::Conflict { .. }) if same_content(self, &key, &path).await? => {}
                    Err(e) => return Err(Error::from(e)),
                }
                self.publish_hints(id, local).await;
                Ok::<_, Error>((id, size))
            }))
            .buffer_unordered(self.inner.opts.concurrency.clamp(1, 8));
            futures::pin_mut!(uploads);
            while let Some(done) = uploads.next().await {
                let (id, size) = done?;
                self.state().files.insert(
                    id,
                    OwnFile {
                        published: true,
                        unconditional: false,
                        compacted: false,
                    },
                );
                report.files += 1;
                report.bytes += size;
            }
        }
        (report.rebases, report.attrs_committed) = self.commit_index().await?;
        report.committed = true;
        Ok(report)
    }

    /// The precondition for a data file this writer creates: create-only when
    /// fenced, unless it is recovered from a dead process that may have sent it.
    pub(crate) fn new_file_condition(&self, recovered: bool) -> PutCondition {
        if self.inner.opts.fenced && !recovered {
            PutCondition::IfAbsent
        } else {
            PutCondition::None
        }
    }

    /// The precondition for committing an index over the one with `etag`
    /// (the compare-and-swap of the commit protocol).
    pub(crate) fn index_condition(&self, etag: &Option<String>) -> PutCondition {
        match (etag, self.inner.opts.fenced) {
            (_, false) => PutCondition::None,
            (Some(etag), true) => PutCondition::IfMatch(etag.clone()),
            (None, true) => PutCondition::IfAbsent,
        }
    }

    /// PUTs the attribute object (when attribute changes are in flight) and
    /// then the committed image of the index (unless only attributes
    /// changed); on conflict rebases and retries. Returns the rebases and
    /// whether the attribute object was committed.
    async fn commit_index(&self) -> Result<(u32, bool)> {
        let index_key = self.object_key(INDEX_NAME);
        let attrs_key = self.object_key(ATTRS_NAME);
        let attempts = self.inner.opts.rebase_attempts.max(1);
        let mut attrs_done = false;
        for attempt in 0..attempts {
            let attr_put = {
                let state = self.state();
                (!attrs_done && !state.attr_inflight.is_empty()).then(|| {
                    let inflight = &state.inflight;
                    let generation = state.attrs_generation + 1;
                    let bytes =
                        state.encode_attr_image(&|k: &str| inflight.contains_key(k), generation);
                    (bytes, self.index_condition(&state.attrs_etag), generation)
                })
            };
            if let Some((bytes, condition, generation)) = attr_put {
                match self
                    .inner
                    .store
                    .put(&attrs_key, bytes.into(), condition)
                    .await
                {
                    Ok(etag) => {
                        let mut state = self.state();
                        state.attrs_etag = Some(etag);
                        state.attrs_generation = generation;
                        attrs_done = true;
                        state.attrs_object_stale = false;
                        if !self.inner.opts.fenced {
                            tracing::warn!("unfenced commit of {attrs_key}: a concurrent writer's attribute changes may have been overwritten");
                        }
                    }
                    Err(StoreError::Conflict { .. }) => {
                        let (table, etag, generation) = self.fetch_attrs().await?;
                        self.state().rebase_attrs(table, etag, generation);
                        tracing::info!(
                            "{attrs_key}: another writer committed first; rebased (attempt {})",
                            attempt + 1
                        );
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            let (bytes, condition, rewritten) = {
                let state = self.state();
                if state.inflight.is_empty() && !state.index_rewritten && state.moves.is_empty() {
                    // Only attributes changed: the committed index stays as it is.
                    return Ok((attempt, attrs_done));
                }
                let condition = self.index_condition(&state.index_etag);
                (
                    state.encode_committed_image(),
                    condition,
                    state.index_rewritten,
                )
            };
            match self
                .inner
                .store
                .put(&index_key, bytes.into(), condition)
                .await
            {
                Ok(etag) => {
                    self.state().index_etag = Some(etag);
                    if !self.inner.opts.fenced {
                        tracing::warn!("unfenced commit of {index_key}: a concurrent writer's commit may have been overwritten");
                    }
                    return Ok((attempt, attrs_done));
                }
                Err(StoreError::Conflict { .. }) if rewritten => {
                    return Err(Error::Conflict(format!(
                        "{index_key} changed while the index was being rebuilt; run rebuild-index again"
                    )));
                }
                Err(StoreError::Conflict { .. }) => {
                    let (remote, etag) = self.fetch_index().await?;
                    self.state().rebase(remote, etag);
                    let (table, etag, generation) = self.fetch_attrs().await?;
                    self.state().rebase_attrs(table, etag, generation);
                    tracing::info!(
                        "{index_key}: another writer committed first; rebased (attempt {})",
                        attempt + 1
                    );
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Conflict(format!(
            "{index_key}: lost the commit race {attempts} times; the writes are kept, upload again"
        )))
    }

    /// GETs and decodes the current index (an absent index is empty).
    pub(crate) async fn fetch_index(&self) -> Result<(Index, Option<String>)> {
        let key = self.object_key(INDEX_NAME);
        match super::get_index(self.inner.store.as_ref(), &key).await? {
            None => Ok((Index::default(), None)),
            Some(f) => Ok((f.index?, Some(f.etag))),
        }
    }
}

/// Whether the object `key` holds exactly the bytes of the local file.
async fn same_content(db: &S4db, key: &str, path: &std::path::Path) -> Result<bool> {
    let local = std::fs::read(path).map_err(|e| Error::io("read", path, e))?;
    match db.inner.store.get(key).await {
        Ok(remote) => Ok(
            remote.data.len() == local.len() && Md5::digest(&remote.data) == Md5::digest(&local)
        ),
        Err(StoreError::NotFound { .. }) => Ok(false),
        Err(e) => Err(e.into()),
    }
}
