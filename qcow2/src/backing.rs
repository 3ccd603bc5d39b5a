//! The [`BlockImage`] trait shared by raw files and qcow2 images, and the
//! opening of backing chains.

use std::fmt;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::image::Qcow2;
use crate::options::OpenOptions;

/// Image formats this crate reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// A plain file or block device.
    Raw,
    /// qcow2 v2/v3.
    Qcow2,
}

impl ImageFormat {
    /// Parses "raw" / "qcow2".
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "raw" => Ok(ImageFormat::Raw),
            "qcow2" => Ok(ImageFormat::Qcow2),
            other => Err(Error::Unsupported(format!("image format {other:?}"))),
        }
    }

    /// The name qemu-img uses.
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }

    /// Guesses the format from the first bytes of a file (qcow2 magic or raw).
    pub fn probe(path: &Path) -> Result<Self> {
        let f = File::open(path).map_err(|source| Error::Open {
            path: path.into(),
            source,
        })?;
        let mut magic = [0u8; 4];
        match f.read_exact_at(&mut magic, 0) {
            Ok(()) if u32::from_be_bytes(magic) == crate::header::MAGIC => Ok(ImageFormat::Qcow2),
            _ => Ok(ImageFormat::Raw),
        }
    }
}

/// A virtual disk: byte-addressed reads and writes, shareable between threads.
pub trait BlockImage: Send + Sync + fmt::Debug {
    /// Virtual size in bytes.
    fn size(&self) -> u64;
    /// Reads `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Writes `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;
    /// Makes `[offset, offset+len)` read as zeros.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()>;
    /// Hints that `[offset, offset+len)` is unused; contents become unspecified
    /// (this crate: fully covered clusters read as zeros or backing data).
    fn discard(&self, offset: u64, len: u64) -> Result<()>;
    /// Makes all completed writes (data and metadata) durable.
    fn flush(&self) -> Result<()>;
    /// The format.
    fn format(&self) -> ImageFormat;
}

/// A raw image: a file or a block device.
#[derive(Debug)]
pub struct RawImage {
    file: File,
    size: u64,
    read_only: bool,
}

impl RawImage {
    /// Opens a raw file or block device.
    pub fn open(path: &Path, read_only: bool) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| Error::Open {
                path: path.into(),
                source,
            })?;
        let size = file_size(&file)?;
        Ok(RawImage {
            file,
            size,
            read_only,
        })
    }

    /// Wraps an open file.
    pub fn from_file(file: File, read_only: bool) -> Result<Self> {
        let size = file_size(&file)?;
        Ok(RawImage {
            file,
            size,
            read_only,
        })
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        check_range(offset, len, self.size)
    }
}

/// Size of a regular file or block device.
pub fn file_size(file: &File) -> Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = file;
    f.seek(SeekFrom::End(0))
        .map_err(|e| Error::io("seek to end", e))
}

/// Errors unless `[offset, offset+len)` lies within `size`.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfRange { offset, len, size }),
    }
}

impl BlockImage for RawImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check(offset, buf.len() as u64)?;
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| Error::io("read", e))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.check(offset, buf.len() as u64)?;
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| Error::io("write", e))
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.check(offset, len)?;
        crate::io::zero_range(&self.file, offset, len)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.check(offset, len)?;
        crate::io::punch_hole(&self.file, offset, len)
    }

    fn flush(&self) -> Result<()> {
        self.file.sync_data().map_err(|e| Error::io("fdatasync", e))
    }

    fn format(&self) -> ImageFormat {
        ImageFormat::Raw
    }
}

/// Opens any supported image. `format: None` probes (only do that for
/// images the user named, never for backing files unless asked).
pub fn open_image(
    path: &Path,
    format: Option<ImageFormat>,
    opts: &OpenOptions,
) -> Result<Box<dyn BlockImage>> {
    let format = match format {
        Some(f) => f,
        None => ImageFormat::probe(path)?,
    };
    Ok(match format {
        ImageFormat::Raw => Box::new(RawImage::open(path, opts.read_only)?),
        ImageFormat::Qcow2 => Box::new(Qcow2::open(path, opts)?),
    })
}

/// Resolves a backing file name stored in `image` (relative to the image's directory).
pub fn resolve_backing(image: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    match image.parent() {
        Some(dir) => dir.join(p),
        None => p.to_path_buf(),
    }
}

/// Hard limit on backing chain length, whatever the options say (deeper
/// chains would exhaust the stack of the thread opening them).
pub const MAX_BACKING_DEPTH: u32 = 64;

/// Opens the backing file of `image` for reading, following the chain.
/// `chain` holds the canonical paths of the images above it (loop detection).
pub(crate) fn open_backing(
    image: &Path,
    name: &str,
    format: Option<&str>,
    opts: &OpenOptions,
    chain: &mut Vec<PathBuf>,
) -> Result<Box<dyn BlockImage>> {
    let path = resolve_backing(image, name);
    if opts.max_backing_depth == 0 || chain.len() > MAX_BACKING_DEPTH as usize {
        return Err(Error::Backing {
            path,
            reason: "backing chain too deep".into(),
        });
    }
    if let Ok(canon) = path.canonicalize() {
        if chain.contains(&canon) {
            return Err(Error::Backing {
                path,
                reason: "backing chain loops".into(),
            });
        }
    }
    let fmt = match format {
        Some(f) => ImageFormat::parse(f).map_err(|e| Error::Backing {
            path: path.clone(),
            reason: e.to_string(),
        })?,
        None if opts.probe_backing_format => ImageFormat::probe(&path)?,
        None => {
            return Err(Error::Backing {
                path,
                reason: "the image does not name the backing format and probing is off \
                         (recreate it with -F, or allow probing)"
                    .into(),
            })
        }
    };
    let child = OpenOptions {
        read_only: true,
        max_backing_depth: opts.max_backing_depth - 1,
        // A backing file's own cache need not cover the whole disk.
        l2_cache_bytes: Some(opts.l2_cache_bytes.unwrap_or(1 << 20).min(1 << 20)),
        refcount_cache_bytes: Some(64 << 10),
        ..opts.clone()
    };
    let opened: Result<Box<dyn BlockImage>> = match fmt {
        ImageFormat::Raw => RawImage::open(&path, true).map(|r| Box::new(r) as Box<dyn BlockImage>),
        ImageFormat::Qcow2 => {
            Qcow2::open_in_chain(&path, &child, chain).map(|q| Box::new(q) as Box<dyn BlockImage>)
        }
    };
    opened.map_err(|e| Error::BackingOpen {
        path,
        source: Box::new(e),
    })
}
