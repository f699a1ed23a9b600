//! s4db: a Bitcask-style key-value store kept in an S3 bucket, byte-compatible
//! with the Python `s4db` package (see FORMAT.md and ARCHITECTURE.md).
//!
//! Values are Snappy-compressed entries appended to numbered data files; an
//! in-memory index knows the file and byte offset of every live key, so a read
//! is one `pread` of a local file or one S3 range GET of exactly that entry.
//! Writes append locally; [`S4db::upload`] publishes the data files and then
//! the index, which is the commit point.

pub mod db;
pub mod error;
pub mod format;
pub mod remote;

pub use db::{OpenOptions, Progress, S4db, ScanMode, Stats};
pub use error::{Error, Result};
pub use format::Value;
pub mod cli;
pub mod target;
