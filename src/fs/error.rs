//! Filesystem errors and their one errno mapping: a new variant cannot
//! compile without choosing the errno a program will see.

use crate::error::{Error as DbError, ErrorKind};

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("already exists")]
    Exists,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("directory not empty")]
    NotEmpty,
    #[error("name component is {0} bytes, more than 255")]
    NameTooLong(usize),
    #[error("name cannot be a key: {0}")]
    InvalidName(String),
    #[error("mounted read-only")]
    ReadOnly,
    #[error("not supported: {0}")]
    NotSupported(&'static str),
    #[error("not permitted: {0}")]
    NotPermitted(&'static str),
    #[error("value of {key:?} would be {len} bytes, past the format's 4 GiB entry limit")]
    TooLarge { key: String, len: u64 },
    #[error("no such extended attribute")]
    NoXattr,
    #[error("extended attribute name is empty or longer than 255 bytes")]
    XattrRange,
    #[error("extended attribute value is larger than 64 KiB")]
    XattrTooBig,
    #[error("no space: {0}")]
    NoSpace(&'static str),
    #[error("permission denied: {0}")]
    Access(&'static str),
    #[error("too many links")]
    TooManyLinks,
    #[error("bad file handle")]
    BadHandle,
    #[error("invalid argument: {0}")]
    InvalidArgument(&'static str),
    #[error("{0}")]
    Db(#[from] DbError),
    #[error("local file: {0}")]
    Io(#[from] std::io::Error),
}

pub type FsResult<T> = Result<T, FsError>;

impl FsError {
    pub fn to_errno(&self) -> libc::c_int {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::Exists => libc::EEXIST,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::NotEmpty => libc::ENOTEMPTY,
            FsError::NameTooLong(_) => libc::ENAMETOOLONG,
            FsError::InvalidName(_) | FsError::InvalidArgument(_) => libc::EINVAL,
            FsError::ReadOnly => libc::EROFS,
            FsError::NotSupported(_) => libc::ENOTSUP,
            FsError::NotPermitted(_) => libc::EPERM,
            FsError::TooLarge { .. } => libc::EFBIG,
            FsError::BadHandle => libc::EBADF,
            FsError::NoXattr => libc::ENODATA,
            FsError::XattrRange => libc::ERANGE,
            FsError::XattrTooBig => libc::E2BIG,
            FsError::NoSpace(_) => libc::ENOSPC,
            FsError::Access(_) => libc::EACCES,
            FsError::TooManyLinks => libc::EMLINK,
            FsError::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
            FsError::Db(DbError::ValueTooLarge { .. }) => libc::EFBIG,
            FsError::Db(DbError::InvalidKey { .. }) => libc::EINVAL,
            FsError::Db(DbError::Io { source, .. }) => source.raw_os_error().unwrap_or(libc::EIO),
            FsError::Db(e) => match e.kind() {
                ErrorKind::Busy => libc::EBUSY,
                ErrorKind::Unsynced => libc::EBUSY,
                ErrorKind::InvalidInput => libc::EINVAL,
                ErrorKind::Retry | ErrorKind::Corrupt | ErrorKind::LocalIo => libc::EIO,
            },
        }
    }
}
