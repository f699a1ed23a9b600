//! s4db: a Bitcask-style key-value store kept in an S3 bucket, byte-compatible
//! with the Python `s4db` package (see FORMAT.md and ARCHITECTURE.md).
//!
//! Values are Snappy-compressed entries appended to numbered data files; an
//! in-memory index knows the file and byte offset of every live key, so a read
//! is one `pread` of a local file or one S3 range GET of exactly that entry.
//! Writes append locally; [`S4db::upload`] publishes the data files and then
//! the index, which is the commit point.
//!
//! ```
//! use s4db::remote::LocalStore;
//! use s4db::{OpenOptions, S4db, ScanMode, Value};
//! use std::sync::Arc;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> s4db::Result<()> {
//! # let dir = tempfile::tempdir().unwrap();
//! // The embedded backend; `S3Store::connect(S3Config::new("bucket"))` is the S3 one.
//! let store = Arc::new(LocalStore::open(dir.path(), "bucket")?);
//! let db = S4db::open(store.clone(), "some/prefix", OpenOptions::default()).await?;
//! db.put([
//!     ("greeting", Value::from("hello")),
//!     ("blob", Value::from(vec![0u8, 255])),
//! ])?;
//! db.delete(["blob"])?;
//! db.upload().await?; // the commit point: others see the writes from here on
//!
//! let reader = S4db::open(store, "some/prefix/", OpenOptions::default()).await?;
//! assert_eq!(reader.get("greeting").await?, Some(Value::from("hello")));
//! assert_eq!(reader.keys(), vec!["greeting"]);
//! let all = reader.items(ScanMode::PerKey).await?;
//! assert_eq!(all, vec![("greeting".to_string(), Value::from("hello"))]);
//! # Ok(())
//! # }
//! ```

pub mod db;
pub mod error;
pub mod format;
pub mod remote;

pub use db::{OpenOptions, Progress, S4db, ScanMode, Stats};
pub use error::{Error, ErrorKind, Result};
pub use format::Value;
pub mod buffer_pool;
pub mod cli;
pub mod fs;
pub mod fuse;
pub mod metrics;
pub mod mount;
pub mod target;
