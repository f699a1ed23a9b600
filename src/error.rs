//! The library's public error: one enum whose variants say what happened,
//! name the key, file or directory, and imply what to do about it.

use crate::format::FormatError;
use crate::remote::StoreError;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Stored bytes failed a check: a data file entry or the index is corrupt.
    #[error("corrupt data: {0}; run `s4db rebuild-index` to recover from the data files")]
    Corrupt(#[from] FormatError),

    /// The object store failed (after its own retries).
    #[error("object store: {0}")]
    Store(StoreError),

    /// A key the format cannot represent.
    #[error("invalid key {key:?}: {reason}")]
    InvalidKey { key: String, reason: String },

    /// A value too large for the format's 32-bit lengths.
    #[error("value of key {key:?} is {len} bytes; an entry must stay under 4 GiB")]
    ValueTooLarge { key: String, len: u64 },

    /// Another writer committed in a way this operation cannot merge.
    #[error("conflict: {0}")]
    Conflict(String),

    /// The operation would discard or strand writes that are not uploaded yet.
    #[error("unsynced writes: {0}")]
    Unsynced(String),

    /// Another process holds the local directory.
    #[error("local directory {dir} is in use by another s4db process{holder}; use another --local-dir or stop that process")]
    LocalDirBusy { dir: PathBuf, holder: String },

    /// A local file operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// An option or argument that cannot work.
    #[error("{0}")]
    Usage(String),
}

/// What a caller can do about an [`Error`]: the few cases a program (or the
/// filesystem layer, choosing an errno) needs to tell apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Transient: the store failed or another writer won; trying again may work.
    Retry,
    /// The request itself is wrong (a key, a value, an option); fix the input.
    InvalidInput,
    /// Stored bytes are damaged; rebuild the index or restore the object.
    Corrupt,
    /// Writes are not uploaded yet; upload first.
    Unsynced,
    /// Another process holds the local directory.
    Busy,
    /// A local file operation failed (disk full, permissions...).
    LocalIo,
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        Error::Store(e)
    }
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Corrupt(_) => ErrorKind::Corrupt,
            Error::Store(_) | Error::Conflict(_) => ErrorKind::Retry,
            Error::InvalidKey { .. } | Error::ValueTooLarge { .. } | Error::Usage(_) => {
                ErrorKind::InvalidInput
            }
            Error::Unsynced(_) => ErrorKind::Unsynced,
            Error::LocalDirBusy { .. } => ErrorKind::Busy,
            Error::Io { .. } => ErrorKind::LocalIo,
        }
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// Keys in messages are shortened so a 64 KiB key does not flood a terminal.
    pub(crate) fn invalid_key(key: &str, reason: impl Into<String>) -> Self {
        let shown: String = key.chars().take(80).collect();
        Error::InvalidKey {
            key: shown,
            reason: reason.into(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
