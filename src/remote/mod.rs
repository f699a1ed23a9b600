//! Object stores: the one trait the engine talks to, and its implementations.
//!
//! The engine never sees S3 types. Every backend maps its failures onto
//! [`StoreError`], whose variants tell the caller what to do: a missing object
//! is data ("the database is empty"), a conflict means "another writer won,
//! rebase", anything else is an I/O failure worth reporting with the key.

pub mod coalesce;
#[cfg(test)]
mod contract;
pub mod fault;
pub mod local;
pub mod metered;
pub mod s3;

use async_trait::async_trait;
use bytes::Bytes;
use std::path::Path;
#[cfg(test)]
use std::sync::Arc;
use std::time::{Duration, SystemTime};

pub use coalesce::{CoalesceLimits, CoalescingStore};
pub use fault::{Fault, FaultStore, Op};
pub use local::LocalStore;
pub use metered::{MeteredStore, RequestCounts};
pub use s3::{S3Config, S3Store};

/// A precondition on a PUT, as S3 conditional writes define them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutCondition {
    /// Plain PUT: replaces whatever is there.
    None,
    /// `If-None-Match: *`: create only; fails with a conflict if the object exists.
    IfAbsent,
    /// `If-Match: <etag>`: replace only the version with this ETag.
    IfMatch(String),
}

/// What a LIST or HEAD tells about one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// The full object key (including the database prefix).
    pub key: String,
    pub size: u64,
    pub last_modified: SystemTime,
    pub etag: Option<String>,
}

/// The body and ETag of a whole-object GET.
#[derive(Debug, Clone)]
pub struct GetResult {
    pub data: Bytes,
    pub etag: String,
}

/// One page of a LIST; `next` is the continuation token when more pages follow.
#[derive(Debug, Clone, Default)]
pub struct ListPage {
    pub objects: Vec<ObjectMeta>,
    pub next: Option<String>,
}

/// A multipart upload that was started and neither completed nor aborted:
/// its parts cost storage but are no object anyone can read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingUpload {
    pub key: String,
    pub upload_id: String,
    /// When it was started (as the store reports it).
    pub initiated: SystemTime,
}

/// How a store splits large objects into parts: files of at least
/// `threshold` bytes go up in parts of `part_size`, `parts_in_flight` at a
/// time. Only stores with multipart uploads have one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartLayout {
    pub threshold: u64,
    pub part_size: u64,
    pub parts_in_flight: usize,
}

/// One part of a multipart upload that has been sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentPart {
    /// 1-based, as S3 numbers parts.
    pub number: i32,
    pub etag: String,
    /// The CRC32 checksum S3 returned (base64), when checksums are on: the
    /// completion must repeat it.
    pub checksum_crc32: Option<String>,
    /// CRC-32 of the bytes sent, computed by the sender: what the finished
    /// file's bytes at this part's place are checked against before the part
    /// is kept.
    pub crc: u32,
    /// Bytes in the part.
    pub len: u64,
}

/// A multipart upload started before its file was finished (the parts of a
/// large file written through the mount go up while it is written): the
/// parts already sent, which [`ObjectStore::put_file_with_parts`] keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EarlyUpload {
    pub upload_id: String,
    /// Every part but the last has exactly this size.
    pub part_size: u64,
    pub parts: Vec<SentPart>,
}

impl EarlyUpload {
    /// Where part `number` starts in the file.
    pub fn part_offset(&self, number: i32) -> u64 {
        (number as u64 - 1) * self.part_size
    }
}

/// Failures of an object store, by what the caller should do about them.
/// Cloneable, so one failed request can answer each caller it served.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("object {key} does not exist")]
    NotFound { key: String },
    #[error("conditional write of {key} failed: another writer changed it first")]
    Conflict { key: String },
    #[error("{op} {key}: {message}")]
    Io {
        op: &'static str,
        key: String,
        message: String,
    },
}

impl StoreError {
    pub fn io(op: &'static str, key: &str, message: impl std::fmt::Display) -> Self {
        StoreError::Io {
            op,
            key: key.to_string(),
            message: message.to_string(),
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// An object store holding one bucket. Keys are full object keys; the engine
/// adds its prefix (see `crate::paths`).
#[async_trait]
pub trait ObjectStore: Send + Sync + std::fmt::Debug {
    /// A short description for messages and stats, e.g. `s3://bucket` or `local:/srv/s4db/bucket`.
    fn describe(&self) -> String;

    /// GET a whole object with its ETag.
    async fn get(&self, key: &str) -> StoreResult<GetResult>;

    /// GET `len` bytes starting at `offset`. Returns fewer bytes only when the object is shorter.
    async fn get_range(&self, key: &str, offset: u64, len: u64) -> StoreResult<Bytes>;

    /// PUT an object from memory; returns the new ETag.
    async fn put(&self, key: &str, data: Bytes, condition: PutCondition) -> StoreResult<String>;

    /// PUT an object from a local file; returns the new ETag. Backends that can
    /// stream from disk override this so large data files are not held in memory.
    async fn put_file(
        &self,
        key: &str,
        path: &Path,
        condition: PutCondition,
    ) -> StoreResult<String> {
        let data = tokio::fs::read(path).await.map_err(|e| {
            StoreError::io(
                "read local file for",
                key,
                format!("{}: {e}", path.display()),
            )
        })?;
        self.put(key, Bytes::from(data), condition).await
    }

    /// DELETE an object; deleting a missing object is not an error.
    async fn delete(&self, key: &str) -> StoreResult<()>;

    /// HEAD an object.
    async fn head(&self, key: &str) -> StoreResult<ObjectMeta>;

    /// One page of the objects whose keys start with `prefix`, in key order.
    async fn list_page(&self, prefix: &str, continuation: Option<String>) -> StoreResult<ListPage>;

    /// Every object under `prefix`, following continuation tokens.
    async fn list(&self, prefix: &str) -> StoreResult<Vec<ObjectMeta>> {
        let mut all = Vec::new();
        let mut token = None;
        loop {
            let page = self.list_page(prefix, token).await?;
            all.extend(page.objects);
            match page.next {
                Some(next) => token = Some(next),
                None => return Ok(all),
            }
        }
    }

    /// The unfinished multipart uploads of keys starting with `prefix`.
    /// Stores without multipart uploads have none; wrappers must forward it.
    async fn list_multipart_uploads(&self, _prefix: &str) -> StoreResult<Vec<PendingUpload>> {
        Ok(Vec::new())
    }

    /// Aborts one multipart upload, dropping its parts; aborting one that is
    /// already gone (completed or aborted) is not an error. Wrappers must
    /// forward it.
    async fn abort_multipart_upload(&self, _key: &str, _upload_id: &str) -> StoreResult<()> {
        Ok(())
    }

    /// How this store splits large files into parts; `None` for stores
    /// without multipart uploads (then the three calls below are not used).
    /// Wrappers must forward it and them.
    fn part_layout(&self) -> Option<PartLayout> {
        None
    }

    /// Starts a multipart upload of `key`; returns its upload id.
    async fn start_multipart_upload(&self, key: &str) -> StoreResult<String> {
        Err(StoreError::io(
            "start multipart upload of",
            key,
            "this store has no multipart uploads",
        ))
    }

    /// Sends part `number` of an upload started with
    /// [`ObjectStore::start_multipart_upload`].
    async fn upload_part(
        &self,
        key: &str,
        _upload_id: &str,
        _number: i32,
        _data: Bytes,
    ) -> StoreResult<SentPart> {
        Err(StoreError::io(
            "upload part of",
            key,
            "this store has no multipart uploads",
        ))
    }

    /// [`ObjectStore::put_file`], finishing `early`: its parts that fit the
    /// file are kept, the others sent from the file, then the upload is
    /// completed under `condition`. On failure the upload is aborted. The
    /// caller vouches that each kept part holds the file's bytes at its place.
    async fn put_file_with_parts(
        &self,
        key: &str,
        path: &Path,
        condition: PutCondition,
        early: EarlyUpload,
    ) -> StoreResult<String> {
        let _ = self.abort_multipart_upload(key, &early.upload_id).await;
        self.put_file(key, path, condition).await
    }
}

/// Aborts the multipart uploads under `prefix` started at least `older_than`
/// ago (uploads of a concurrent writer younger than that are left alone), and
/// returns them. What a failed or killed upload of a large data file leaves
/// behind goes this way (gc).
pub async fn abort_stale_uploads(
    store: &dyn ObjectStore,
    prefix: &str,
    older_than: Duration,
) -> StoreResult<Vec<PendingUpload>> {
    let now = SystemTime::now();
    let mut aborted = Vec::new();
    for upload in store.list_multipart_uploads(prefix).await? {
        let age = now.duration_since(upload.initiated).unwrap_or_default();
        if age >= older_than {
            store
                .abort_multipart_upload(&upload.key, &upload.upload_id)
                .await?;
            aborted.push(upload);
        }
    }
    Ok(aborted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A local store that also has unfinished multipart uploads.
    #[derive(Debug)]
    struct WithUploads {
        inner: LocalStore,
        uploads: Mutex<Vec<PendingUpload>>,
    }

    #[async_trait]
    impl ObjectStore for WithUploads {
        fn describe(&self) -> String {
            self.inner.describe()
        }
        async fn get(&self, key: &str) -> StoreResult<GetResult> {
            self.inner.get(key).await
        }
        async fn get_range(&self, key: &str, offset: u64, len: u64) -> StoreResult<Bytes> {
            self.inner.get_range(key, offset, len).await
        }
        async fn put(&self, key: &str, data: Bytes, c: PutCondition) -> StoreResult<String> {
            self.inner.put(key, data, c).await
        }
        async fn delete(&self, key: &str) -> StoreResult<()> {
            self.inner.delete(key).await
        }
        async fn head(&self, key: &str) -> StoreResult<ObjectMeta> {
            self.inner.head(key).await
        }
        async fn list_page(&self, prefix: &str, next: Option<String>) -> StoreResult<ListPage> {
            self.inner.list_page(prefix, next).await
        }
        async fn list_multipart_uploads(&self, prefix: &str) -> StoreResult<Vec<PendingUpload>> {
            let uploads = self.uploads.lock().unwrap();
            Ok(uploads
                .iter()
                .filter(|u| u.key.starts_with(prefix))
                .cloned()
                .collect())
        }
        async fn abort_multipart_upload(&self, key: &str, id: &str) -> StoreResult<()> {
            let mut uploads = self.uploads.lock().unwrap();
            uploads.retain(|u| (u.key.as_str(), u.upload_id.as_str()) != (key, id));
            Ok(())
        }
    }

    #[tokio::test]
    async fn only_old_uploads_under_the_prefix_are_aborted_through_the_wrappers() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let upload = |key: &str, age: u64| PendingUpload {
            key: key.to_string(),
            upload_id: format!("id-{key}"),
            initiated: now - Duration::from_secs(age),
        };
        let base = Arc::new(WithUploads {
            inner: LocalStore::open(dir.path(), "bucket").unwrap(),
            uploads: Mutex::new(vec![
                upload("db/old", 7200),
                upload("db/young", 60),
                upload("other/old", 7200),
            ]),
        });
        let faulty = Arc::new(FaultStore::new(base.clone()));
        let store = CoalescingStore::new(Arc::new(MeteredStore::new(faulty.clone())));
        let aborted = abort_stale_uploads(&store, "db/", Duration::from_secs(3600))
            .await
            .unwrap();
        assert_eq!(aborted, vec![upload("db/old", 7200)]);
        let left: Vec<String> = base
            .uploads
            .lock()
            .unwrap()
            .iter()
            .map(|u| u.key.clone())
            .collect();
        assert_eq!(left, ["db/young", "other/old"]);
        assert_eq!(
            (faulty.count(Op::ListUploads), faulty.count(Op::AbortUpload)),
            (1, 1)
        );
        // Stores without multipart uploads have none to abort.
        let plain = LocalStore::open(dir.path(), "bucket").unwrap();
        assert!(abort_stale_uploads(&plain, "", Duration::ZERO)
            .await
            .unwrap()
            .is_empty());
    }
}
