//! The disk behind the device: a raw file / block device (data I/O through
//! io_uring in the queue workers) or a qcow2 image (through the `qcow2`
//! crate, which is safe to share between queue threads).

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use qcow2::{ImageFormat, OpenOptions, Qcow2};

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
    Qcow2(#[from] qcow2::Error),
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
            Backing::Raw(f) => qcow2::backing::file_size(f)?,
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
            Backing::Raw(f) => Ok(qcow2::io::punch_hole(f, off, len)?),
            Backing::Qcow2(q) => Ok(q.discard(off, len)?),
        }
    }

    /// Zeroes a range; `unmap` allows deallocating it.
    pub fn write_zeroes(&self, off: u64, len: u64, _unmap: bool) -> Result<(), DiskError> {
        self.check(off, len)?;
        match &self.backing {
            // ZERO_RANGE (or written zeros) guarantees zeros; a punched hole
            // would not where the file system ignores it. `unmap` is a hint.
            Backing::Raw(f) => Ok(qcow2::io::zero_range(f, off, len)?),
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
