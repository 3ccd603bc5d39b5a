//! Errors of the qcow2 library.

use std::io;
use std::path::PathBuf;

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong opening, reading or writing an image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error on the image file (or a backing file).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Opening a file failed.
    #[error("cannot open {}: {source}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The file is not a qcow2 image (bad magic).
    #[error("not a qcow2 image (bad magic)")]
    NotQcow2,
    /// A header field is invalid.
    #[error("invalid image header: {0}")]
    BadHeader(String),
    /// A feature the image uses that this library does not implement.
    #[error("unsupported image feature: {0}")]
    Unsupported(String),
    /// Metadata is inconsistent (the image is corrupt).
    #[error("image is corrupt: {0}")]
    Corrupt(String),
    /// The image has the corrupt bit set and cannot be opened read-write.
    #[error("image is marked corrupt; open it read-only or repair it with `check -r all`")]
    MarkedCorrupt,
    /// A request falls outside the virtual disk.
    #[error("request out of range: offset {offset} length {len} beyond disk size {size}")]
    OutOfRange {
        /// Start of the request.
        offset: u64,
        /// Length of the request.
        len: u64,
        /// Disk size.
        size: u64,
    },
    /// A write was attempted on a read-only image.
    #[error("image is opened read-only")]
    ReadOnly,
    /// A problem with a backing file.
    #[error("backing file {}: {reason}", path.display())]
    Backing {
        /// The backing file as resolved.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A backing file could not be opened.
    #[error("backing file {}", path.display())]
    BackingOpen {
        /// The backing file as resolved.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: Box<Error>,
    },
    /// No such snapshot.
    #[error("snapshot {0:?} not found")]
    NoSnapshot(String),
    /// A snapshot with this name already exists.
    #[error("snapshot {0:?} already exists")]
    SnapshotExists(String),
    /// Invalid argument (size, cluster size, name ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A compressed cluster could not be decompressed.
    #[error("compressed cluster at host offset {offset:#x} is invalid: {reason}")]
    Decompress {
        /// Host offset of the compressed data.
        offset: u64,
        /// What went wrong.
        reason: String,
    },
    /// The image file system ran out of space.
    #[error("no space left for the image")]
    NoSpace,
}

impl Error {
    /// Wraps an `io::Error` with a short description of the operation.
    pub fn io(what: &'static str, source: io::Error) -> Self {
        if source.raw_os_error() == Some(libc::ENOSPC) {
            return Error::NoSpace;
        }
        Error::Io { what, source }
    }

    /// Shorthand for a corruption error.
    pub fn corrupt(msg: impl Into<String>) -> Self {
        Error::Corrupt(msg.into())
    }
}
