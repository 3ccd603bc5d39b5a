//! Options for opening and creating images.

/// How to open an image.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Open read-only (no header updates, no refcount rebuild).
    pub read_only: bool,
    /// Open backing files (if false, unallocated clusters read as zeros; used by `check`).
    pub open_backing: bool,
    /// Allow guessing the backing file format when the image does not name it.
    pub probe_backing_format: bool,
    /// Maximum length of a backing chain (the image itself not counted);
    /// never more than [`crate::backing::MAX_BACKING_DEPTH`].
    pub max_backing_depth: u32,
    /// L2 cache size in bytes; `None`: enough for the whole disk up to 64 GiB.
    pub l2_cache_bytes: Option<u64>,
    /// Refcount cache size in bytes; `None`: enough for the whole file up to 64 GiB.
    pub refcount_cache_bytes: Option<u64>,
    /// Open the file with O_DIRECT.
    pub direct: bool,
    /// Open an image marked corrupt read-write so that `check -r all` can
    /// repair it (and clear the mark); guest writes stay refused until then.
    pub repair: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            read_only: false,
            open_backing: true,
            probe_backing_format: false,
            max_backing_depth: 16,
            l2_cache_bytes: None,
            refcount_cache_bytes: None,
            direct: false,
            repair: false,
        }
    }
}

impl OpenOptions {
    /// Read-only defaults.
    pub fn read_only() -> Self {
        OpenOptions {
            read_only: true,
            ..Default::default()
        }
    }
}

/// How to create a qcow2 image.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Virtual disk size in bytes (rounded up to 512).
    pub size: u64,
    /// Cluster size in bytes, a power of two from 512 to 2 MiB (default 64 KiB).
    pub cluster_size: u64,
    /// Refcount width in bits, a power of two from 1 to 64 (default 16).
    pub refcount_bits: u32,
    /// qcow2 version, 2 ("compat=0.10") or 3 ("compat=1.1", default).
    pub version: u32,
    /// Backing file name as stored in the image (relative names resolve against the image).
    pub backing_file: Option<String>,
    /// Backing format stored in the header extension ("raw" or "qcow2").
    pub backing_format: Option<String>,
    /// Use zstd as compression type (v3 only; only matters for compressed writes).
    pub zstd: bool,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            cluster_size: 65536,
            refcount_bits: 16,
            version: 3,
            backing_file: None,
            backing_format: None,
            zstd: false,
        }
    }
}
