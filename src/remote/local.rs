//! The embedded backend: a bucket is a directory, an object is a file.
//!
//! Layout: `<root>/<bucket>/<key>`, with temporary files and the writer lock in
//! `<root>/.s4db-store/`. Writes are atomic (temporary file, fsync, rename,
//! fsync of the directory), and a conditional PUT checks the ETag and renames
//! under an exclusive `flock`, so several processes sharing one root get the
//! same compare-and-swap semantics S3 gives. ETags are the MD5 of the content,
//! as S3's are for single-part uploads.

use super::{GetResult, ListPage, ObjectMeta, ObjectStore, PutCondition, StoreError, StoreResult};
use async_trait::async_trait;
use bytes::Bytes;
use md5::{Digest, Md5};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// How many objects one LIST page returns, like S3's default.
const PAGE_SIZE: usize = 1000;
const STATE_DIR: &str = ".s4db-store";

#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
    bucket: String,
    bucket_dir: PathBuf,
}

impl LocalStore {
    /// Opens (creating when missing) the bucket directory `<root>/<bucket>`.
    pub fn open(root: impl Into<PathBuf>, bucket: &str) -> StoreResult<LocalStore> {
        let root = root.into();
        if bucket.is_empty() || bucket.contains('/') || bucket.starts_with('.') {
            return Err(StoreError::io(
                "open",
                bucket,
                "a bucket name must be non-empty, without '/', and not start with '.'",
            ));
        }
        let bucket_dir = root.join(bucket);
        for dir in [&bucket_dir, &root.join(STATE_DIR)] {
            fs::create_dir_all(dir)
                .map_err(|e| StoreError::io("create directory", &dir.display().to_string(), e))?;
        }
        Ok(LocalStore {
            root,
            bucket: bucket.to_string(),
            bucket_dir,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Maps an object key to its file, refusing keys that would escape the
    /// bucket directory or cannot be file names.
    fn path_of(&self, key: &str) -> StoreResult<PathBuf> {
        let bad = key.is_empty()
            || key.starts_with('/')
            || key.ends_with('/')
            || key.contains('\0')
            || key
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..");
        if bad {
            return Err(StoreError::io(
                "map",
                key,
                "this object key cannot be stored in a local directory (empty, '.', '..' or '//' component)",
            ));
        }
        Ok(self.bucket_dir.join(key))
    }

    fn lock(&self, key: &str) -> StoreResult<File> {
        let path = self.root.join(STATE_DIR).join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| StoreError::io("lock store for", key, e))?;
        // SAFETY: flock on a valid descriptor we own; released when `file` drops.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(StoreError::io(
                "lock store for",
                key,
                std::io::Error::last_os_error(),
            ));
        }
        Ok(file)
    }

    fn put_blocking(
        &self,
        key: &str,
        write: impl FnOnce(&mut File, &mut Md5) -> std::io::Result<()>,
        condition: PutCondition,
    ) -> StoreResult<String> {
        let target = self.path_of(key)?;
        let io = |e: std::io::Error| StoreError::io("put", key, e);
        let (tmp_file, tmp_path) = tempfile::Builder::new()
            .prefix("put-")
            .tempfile_in(self.root.join(STATE_DIR))
            .map_err(io)?
            .into_parts();
        let mut file = tmp_file;
        let mut hasher = Md5::new();
        write(&mut file, &mut hasher).map_err(io)?;
        file.sync_all().map_err(io)?;
        let etag = format!("\"{:x}\"", hasher.finalize());

        let _lock = self.lock(key)?;
        match &condition {
            PutCondition::None => {}
            PutCondition::IfAbsent => {
                if target.exists() {
                    return Err(StoreError::Conflict {
                        key: key.to_string(),
                    });
                }
            }
            PutCondition::IfMatch(expected) => match etag_of_file(&target) {
                Ok(current) if &current == expected => {}
                Ok(_) => {
                    return Err(StoreError::Conflict {
                        key: key.to_string(),
                    })
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(StoreError::Conflict {
                        key: key.to_string(),
                    })
                }
                Err(e) => return Err(io(e)),
            },
        }
        let parent = target.parent().unwrap_or(&self.bucket_dir);
        fs::create_dir_all(parent).map_err(io)?;
        tmp_path.persist(&target).map_err(|e| io(e.error))?;
        File::open(parent).and_then(|d| d.sync_all()).map_err(io)?;
        Ok(etag)
    }

    fn meta_of(&self, key: &str, path: &Path, with_etag: bool) -> StoreResult<ObjectMeta> {
        let md = fs::metadata(path).map_err(|e| not_found_or(e, "head", key))?;
        let etag = if with_etag {
            Some(etag_of_file(path).map_err(|e| not_found_or(e, "head", key))?)
        } else {
            None
        };
        Ok(ObjectMeta {
            key: key.to_string(),
            size: md.len(),
            last_modified: md.modified().map_err(|e| StoreError::io("head", key, e))?,
            etag,
        })
    }

    fn list_blocking(&self, prefix: &str, after: Option<String>) -> StoreResult<ListPage> {
        // Walk only the directory the prefix names, not the whole bucket.
        let dir_part = match prefix.rfind('/') {
            Some(i) => &prefix[..i],
            None => "",
        };
        let start = if dir_part.is_empty() {
            self.bucket_dir.clone()
        } else {
            match self.path_of(dir_part) {
                Ok(p) => p,
                Err(_) => return Ok(ListPage::default()),
            }
        };
        let mut keys = Vec::new();
        collect_files(&start, dir_part, &mut keys)
            .map_err(|e| StoreError::io("list", prefix, e))?;
        keys.retain(|k| k.starts_with(prefix) && after.as_deref().is_none_or(|a| k.as_str() > a));
        keys.sort();
        let more = keys.len() > PAGE_SIZE;
        keys.truncate(PAGE_SIZE);
        let mut objects = Vec::with_capacity(keys.len());
        for key in keys {
            match self.meta_of(&key, &self.bucket_dir.join(&key), false) {
                Ok(meta) => objects.push(meta),
                // Deleted between the walk and the stat: not listed, like S3.
                Err(StoreError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        let next = if more {
            objects.last().map(|o| o.key.clone())
        } else {
            None
        };
        Ok(ListPage { objects, next })
    }
}

fn collect_files(dir: &Path, rel: &str, out: &mut Vec<String>) -> std::io::Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        let key = if rel.is_empty() {
            name
        } else {
            format!("{rel}/{name}")
        };
        if entry.file_type()?.is_dir() {
            collect_files(&entry.path(), &key, out)?;
        } else {
            out.push(key);
        }
    }
    Ok(())
}

fn etag_of_file(path: &Path) -> std::io::Result<String> {
    let mut file = File::open(path)?;
    let mut hasher = Md5::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("\"{:x}\"", hasher.finalize()))
}

fn not_found_or(e: std::io::Error, op: &'static str, key: &str) -> StoreError {
    if e.kind() == std::io::ErrorKind::NotFound {
        StoreError::NotFound {
            key: key.to_string(),
        }
    } else {
        StoreError::io(op, key, e)
    }
}

/// Runs file-system work off the async executor's threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> StoreResult<T> + Send + 'static,
) -> StoreResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(StoreError::io("run", "local store task", e)))
}

#[async_trait]
impl ObjectStore for LocalStore {
    fn describe(&self) -> String {
        format!("local:{}", self.bucket_dir.display())
    }

    async fn get(&self, key: &str) -> StoreResult<GetResult> {
        let path = self.path_of(key)?;
        let key = key.to_string();
        blocking(move || {
            let data = fs::read(&path).map_err(|e| not_found_or(e, "get", &key))?;
            let etag = format!("\"{:x}\"", Md5::digest(&data));
            Ok(GetResult {
                data: Bytes::from(data),
                etag,
            })
        })
        .await
    }

    async fn get_range(&self, key: &str, offset: u64, len: u64) -> StoreResult<Bytes> {
        let path = self.path_of(key)?;
        let key = key.to_string();
        blocking(move || {
            let mut file = File::open(&path).map_err(|e| not_found_or(e, "get", &key))?;
            let size = file
                .metadata()
                .map_err(|e| StoreError::io("get", &key, e))?
                .len();
            let want = len.min(size.saturating_sub(offset)) as usize;
            let mut buf = vec![0u8; want];
            file.seek(SeekFrom::Start(offset))
                .and_then(|_| file.read_exact(&mut buf))
                .map_err(|e| StoreError::io("get", &key, e))?;
            Ok(Bytes::from(buf))
        })
        .await
    }

    async fn put(&self, key: &str, data: Bytes, condition: PutCondition) -> StoreResult<String> {
        let this = self.clone();
        let key = key.to_string();
        blocking(move || {
            this.put_blocking(
                &key,
                |f, h| {
                    h.update(&data);
                    f.write_all(&data)
                },
                condition,
            )
        })
        .await
    }

    async fn put_file(
        &self,
        key: &str,
        path: &Path,
        condition: PutCondition,
    ) -> StoreResult<String> {
        let this = self.clone();
        let key = key.to_string();
        let path = path.to_path_buf();
        blocking(move || {
            this.put_blocking(
                &key,
                |out, h| {
                    let mut src = File::open(&path)?;
                    let mut buf = vec![0u8; 1 << 16];
                    loop {
                        let n = src.read(&mut buf)?;
                        if n == 0 {
                            return Ok(());
                        }
                        h.update(&buf[..n]);
                        out.write_all(&buf[..n])?;
                    }
                },
                condition,
            )
        })
        .await
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        let this = self.clone();
        let path = self.path_of(key)?;
        let key = key.to_string();
        blocking(move || {
            let _lock = this.lock(&key)?;
            match fs::remove_file(&path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(StoreError::io("delete", &key, e)),
            }
        })
        .await
    }

    async fn head(&self, key: &str) -> StoreResult<ObjectMeta> {
        let this = self.clone();
        let path = self.path_of(key)?;
        let key = key.to_string();
        blocking(move || this.meta_of(&key, &path, true)).await
    }

    async fn list_page(&self, prefix: &str, continuation: Option<String>) -> StoreResult<ListPage> {
        let this = self.clone();
        let prefix = prefix.to_string();
        blocking(move || this.list_blocking(&prefix, continuation)).await
    }
}

impl std::fmt::Display for LocalStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.root.display(), self.bucket)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, LocalStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path(), "bucket").unwrap();
        (dir, store)
    }

    #[tokio::test]
    async fn the_store_contract_holds() {
        let (_dir, s) = store();
        crate::remote::contract::check(&s).await;
    }

    #[tokio::test]
    async fn the_store_contract_holds_through_the_fault_wrapper() {
        let (_dir, s) = store();
        let faulty = crate::remote::FaultStore::new(std::sync::Arc::new(s));
        crate::remote::contract::check(&faulty).await;
    }

    #[tokio::test]
    async fn list_paginates_in_key_order() {
        let (_dir, s) = store();
        for i in 0..(PAGE_SIZE + 5) {
            s.put(&format!("db/k{i:05}"), Bytes::new(), PutCondition::None)
                .await
                .unwrap();
        }
        s.put("other/x", Bytes::new(), PutCondition::None)
            .await
            .unwrap();
        let first = s.list_page("db/", None).await.unwrap();
        assert_eq!(first.objects.len(), PAGE_SIZE);
        assert!(first.next.is_some());
        let all = s.list("db/").await.unwrap();
        assert_eq!(all.len(), PAGE_SIZE + 5);
        assert!(all.windows(2).all(|w| w[0].key < w[1].key));
        assert_eq!(s.list("").await.unwrap().len(), PAGE_SIZE + 6);
    }

    #[tokio::test]
    async fn keys_that_escape_are_refused() {
        let (_dir, s) = store();
        for key in ["../x", "a//b", "/abs", "a/./b", ""] {
            assert!(
                s.put(key, Bytes::new(), PutCondition::None).await.is_err(),
                "{key}"
            );
        }
    }
}
