//! The disk behind the device, and the interface the queue engine uses to
//! do I/O on it.
//!
//! - [`Disk`]: the image (a raw file / block device, or a qcow2 image
//!   through the `qcow2` crate, safe to share between queue threads), with
//!   synchronous operations for control paths (flush, resize, snapshots).
//! - [`DiskBackend`]: one queue's asynchronous data path: the engine
//!   submits [`DiskOp`]s (reads and writes with guest-memory iovecs,
//!   flushes, discards, write-zeroes) under a tag and later reaps
//!   [`Completion`]s, without knowing which backend it talks to.
//!   [`raw::RawBackend`] uses io_uring; [`qcow2::Qcow2Backend`] runs each
//!   operation synchronously at submission and completes it through the
//!   same completion path. [`open_backend`] picks one for a disk.

pub mod qcow2;
pub mod raw;

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use ::qcow2::{ImageFormat, OpenOptions, Qcow2};
use std::sync::Arc;

/// Errors opening or using the disk.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The image could not be opened.
    #[error("cannot open {}", path.display())]
    Open {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The qcow2 library refused the image or an operation.
    #[error("qcow2")]
    Qcow2(#[from] ::qcow2::Error),
    /// A host I/O error.
    #[error("{what}")]
    Io {
        /// What failed.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Request outside the disk.
    #[error("request beyond the end of the disk")]
    OutOfRange,
    /// The operation is not possible on this disk.
    #[error("{0}")]
    Unsupported(&'static str),
}

/// What the disk is made of.
#[derive(Debug)]
pub enum Backing {
    /// A raw file or block device.
    Raw(File),
    /// A qcow2 image.
    Qcow2(Box<Qcow2>),
}

/// The disk served to the guest.
#[derive(Debug)]
pub struct Disk {
    backing: Backing,
    size: AtomicU64,
    read_only: bool,
    path: PathBuf,
}

impl Disk {
    /// Opens `path` as `format` (raw, or qcow2 with its backing chain).
    pub fn open(
        path: &Path,
        format: ImageFormat,
        read_only: bool,
        direct: bool,
    ) -> Result<Disk, DiskError> {
        let backing = match format {
            ImageFormat::Raw => {
                let mut o = std::fs::OpenOptions::new();
                o.read(true).write(!read_only);
                if direct {
                    o.custom_flags(libc::O_DIRECT);
                }
                Backing::Raw(o.open(path).map_err(|source| DiskError::Open {
                    path: path.into(),
                    source,
                })?)
            }
            ImageFormat::Qcow2 => {
                if direct {
                    return Err(DiskError::Unsupported(
                        "--direct is only supported for raw images",
                    ));
                }
                let opts = OpenOptions {
                    read_only,
                    ..Default::default()
                };
                Backing::Qcow2(Box::new(Qcow2::open(path, &opts)?))
            }
        };
        let size = match &backing {
            Backing::Raw(f) => ::qcow2::backing::file_size(f)?,
            Backing::Qcow2(q) => q.size(),
        };
        Ok(Disk {
            backing,
            size: AtomicU64::new(size),
            read_only,
            path: path.into(),
        })
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The image path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The raw file descriptor for io_uring, for raw disks.
    pub fn raw_fd(&self) -> Option<RawFd> {
        match &self.backing {
            Backing::Raw(f) => Some(f.as_raw_fd()),
            Backing::Qcow2(_) => None,
        }
    }

    /// The qcow2 image, for qcow2 disks.
    pub fn qcow2(&self) -> Option<&Qcow2> {
        match &self.backing {
            Backing::Qcow2(q) => Some(q),
            Backing::Raw(_) => None,
        }
    }

    fn check(&self, off: u64, len: u64) -> Result<(), DiskError> {
        match off.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(DiskError::OutOfRange),
        }
    }

    /// Reads synchronously.
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> Result<(), DiskError> {
        self.check(off, buf.len() as u64)?;
        match &self.backing {
            Backing::Raw(f) => f.read_exact_at(buf, off).map_err(|source| DiskError::Io {
                what: "read",
                source,
            }),
            Backing::Qcow2(q) => Ok(q.read_at(buf, off)?),
        }
    }

    /// Writes synchronously.
    pub fn write_at(&self, buf: &[u8], off: u64) -> Result<(), DiskError> {
        self.check(off, buf.len() as u64)?;
        match &self.backing {
            Backing::Raw(f) => f.write_all_at(buf, off).map_err(|source| DiskError::Io {
                what: "write",
                source,
            }),
            Backing::Qcow2(q) => Ok(q.write_at(buf, off)?),
        }
    }

    /// Makes completed writes (and qcow2 metadata) durable.
    pub fn flush(&self) -> Result<(), DiskError> {
        match &self.backing {
            Backing::Raw(f) => f.sync_data().map_err(|source| DiskError::Io {
                what: "fdatasync",
                source,
            }),
            Backing::Qcow2(q) => Ok(q.flush()?),
        }
    }

    /// Deallocates a range (contents become zeros on raw files that support holes).
    pub fn discard(&self, off: u64, len: u64) -> Result<(), DiskError> {
        self.check(off, len)?;
        match &self.backing {
            Backing::Raw(f) => Ok(::qcow2::io::punch_hole(f, off, len)?),
            Backing::Qcow2(q) => Ok(q.discard(off, len)?),
        }
    }

    /// Zeroes a range; `unmap` allows deallocating it.
    pub fn write_zeroes(&self, off: u64, len: u64, _unmap: bool) -> Result<(), DiskError> {
        self.check(off, len)?;
        match &self.backing {
            // ZERO_RANGE (or written zeros) guarantees zeros; a punched hole
            // would not where the file system ignores it. `unmap` is a hint.
            Backing::Raw(f) => Ok(::qcow2::io::zero_range(f, off, len)?),
            Backing::Qcow2(q) => Ok(q.write_zeroes(off, len)?),
        }
    }

    /// Grows the disk (online resize).
    pub fn resize(&self, new_size: u64) -> Result<(), DiskError> {
        if self.read_only {
            return Err(DiskError::Unsupported("the disk is read-only"));
        }
        if new_size < self.size() {
            return Err(DiskError::Unsupported(
                "shrinking a disk in use is not supported",
            ));
        }
        match &self.backing {
            Backing::Raw(f) => f.set_len(new_size).map_err(|source| DiskError::Io {
                what: "resize",
                source,
            })?,
            Backing::Qcow2(q) => q.resize(new_size)?,
        }
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }
}

/// What a backend can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Writes, discards and write-zeroes are refused.
    pub read_only: bool,
    /// DISCARD is implemented.
    pub discard: bool,
    /// WRITE_ZEROES is implemented.
    pub write_zeroes: bool,
}

/// A byte range for discard and write-zeroes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    /// First byte.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Write-zeroes may deallocate the range.
    pub unmap: bool,
}

/// One operation on the disk. The iovecs point into guest memory, which
/// the caller keeps mapped until the operation is reaped.
#[derive(Debug, Clone, Copy)]
pub enum DiskOp<'a> {
    /// Read `iov`'s total length from `offset` into the iovecs.
    Read {
        /// Disk offset in bytes.
        offset: u64,
        /// Destination buffers (guest memory).
        iov: &'a [libc::iovec],
    },
    /// Write the iovecs at `offset`; with `durable`, the data is on stable
    /// storage when the operation completes (write-through cache).
    Write {
        /// Disk offset in bytes.
        offset: u64,
        /// Source buffers (guest memory).
        iov: &'a [libc::iovec],
        /// Durable at completion.
        durable: bool,
    },
    /// Make every write completed before it durable (and qcow2 metadata);
    /// completes after every operation submitted before it.
    Flush,
    /// Deallocate the ranges (contents become unspecified or zero).
    Discard(&'a [ByteRange]),
    /// Zero the ranges.
    WriteZeroes(&'a [ByteRange]),
}

/// Why an operation failed.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// The host returned an error.
    #[error("{op}")]
    Os {
        /// The operation.
        op: &'static str,
        /// The error (from an errno: no allocation).
        #[source]
        source: std::io::Error,
    },
    /// Fewer bytes were transferred than asked.
    #[error("{op}: short transfer, {done} of {expected} bytes")]
    Short {
        /// The operation.
        op: &'static str,
        /// Bytes transferred.
        done: u64,
        /// Bytes asked.
        expected: u64,
    },
    /// The disk (or the image library) refused the operation.
    #[error("{op}")]
    Disk {
        /// The operation.
        op: &'static str,
        /// Why.
        #[source]
        source: DiskError,
    },
    /// The backend has no room for the operation.
    #[error("{op}: submission queue full")]
    Full {
        /// The operation.
        op: &'static str,
    },
}

/// How a failed operation is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// An I/O error.
    Io,
    /// The host ran out of space (or quota).
    NoSpace,
    /// The image's metadata is inconsistent.
    Corrupt,
}

fn errno_kind(e: &std::io::Error) -> FailureKind {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => FailureKind::NoSpace,
        _ => FailureKind::Io,
    }
}

impl DiskError {
    /// How this error is counted.
    pub fn kind(&self) -> FailureKind {
        match self {
            DiskError::Io { source, .. } | DiskError::Open { source, .. } => errno_kind(source),
            DiskError::Qcow2(q) => match q {
                ::qcow2::Error::Corrupt(_)
                | ::qcow2::Error::MarkedCorrupt
                | ::qcow2::Error::Decompress { .. } => FailureKind::Corrupt,
                ::qcow2::Error::NoSpace => FailureKind::NoSpace,
                ::qcow2::Error::Io { source, .. } => errno_kind(source),
                _ => FailureKind::Io,
            },
            DiskError::OutOfRange | DiskError::Unsupported(_) => FailureKind::Io,
        }
    }
}

impl OpError {
    /// How this error is counted.
    pub fn kind(&self) -> FailureKind {
        match self {
            OpError::Os { source, .. } => errno_kind(source),
            OpError::Disk { source, .. } => source.kind(),
            OpError::Short { .. } | OpError::Full { .. } => FailureKind::Io,
        }
    }
}

/// A finished operation.
#[derive(Debug)]
pub struct Completion {
    /// The tag it was submitted under.
    pub tag: usize,
    /// Bytes transferred (reads and writes; 0 for the others), or why it
    /// failed.
    pub result: Result<u64, OpError>,
}

/// Errors that stop a backend as a whole (not one operation).
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// io_uring could not be set up or entered.
    #[error("io_uring")]
    Uring(#[source] std::io::Error),
}

/// One queue's asynchronous data path to the disk.
///
/// The engine submits operations under tags in `0..depth()`, each tag used
/// by at most one operation in flight, calls [`DiskBackend::kick`] to start
/// them (and to wait for some to finish), and reaps completions in any
/// order. A backend may complete an operation during `submit` (synchronous
/// backends do); the completion is still delivered by `reap`.
pub trait DiskBackend: Send {
    /// Most operations in flight at once (tags are below it).
    fn depth(&self) -> usize;
    /// What the backend supports.
    fn capabilities(&self) -> Capabilities;
    /// Current disk size in bytes.
    fn size(&self) -> u64;
    /// Queues `op` under `tag`. On error nothing was queued: the operation
    /// failed with that error.
    fn submit(&mut self, tag: usize, op: DiskOp<'_>) -> Result<(), OpError>;
    /// Starts what was queued; with `wait`, returns once at least one
    /// operation has completed (at once when one already has).
    fn kick(&mut self, wait: bool) -> Result<(), BackendError>;
    /// Hands every finished operation to `f`; returns how many.
    fn reap(&mut self, f: &mut dyn FnMut(Completion)) -> usize;
    /// An eventfd that is written each time operations complete after
    /// `kick` returned, for an engine that waits for them on its event loop
    /// instead of in `kick` (it watches the fd edge-triggered and never
    /// reads it). Called once, when the engine is built. `None`:
    /// completions only appear during `submit` and `kick`, and the engine
    /// waits in `kick` while operations are in flight.
    fn completion_fd(&mut self) -> Result<Option<RawFd>, BackendError>;
}

/// The backend for `disk` with up to `depth` operations in flight: io_uring
/// for raw disks, the synchronous qcow2 path for qcow2 images.
pub fn open_backend(disk: &Arc<Disk>, depth: u16) -> Result<Box<dyn DiskBackend>, BackendError> {
    if disk.raw_fd().is_some() {
        Ok(Box::new(raw::RawBackend::new(disk.clone(), depth)?))
    } else {
        Ok(Box::new(qcow2::Qcow2Backend::new(disk.clone(), depth)))
    }
}
