//! The qcow2 header (v2 and v3) and its extensions.
//!
//! The fixed part is parsed into [`Header`]; extensions are kept as raw
//! bytes in file order so that unknown ones survive a rewrite untouched.

use crate::error::{Error, Result};

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
/// Header extension: end of the list.
pub const EXT_END: u32 = 0;
/// Header extension: backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension: feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Header extension: bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Header extension: full disk encryption.
pub const EXT_CRYPTO: u32 = 0x0537_be77;
/// Header extension: external data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Incompatible feature: refcounts may be stale (lazy refcounts).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature: the image is corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature: external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature: compression type field is valid.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature: extended L2 entries (subclusters).
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Incompatible features this library understands.
pub const INCOMPAT_KNOWN: u64 = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION;
/// Compatible feature: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;

/// Largest cluster size (2 MiB), as QEMU.
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Smallest cluster size (512 B).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Upper bound on the L1 table size in bytes (as QEMU: 32 MiB).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Upper bound on the refcount table size in bytes (as QEMU: 8 MiB).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Largest virtual disk size accepted (as QEMU: 2^61 - 1 bytes, bounded by L1).
pub const MAX_DISK_SIZE: u64 = 1 << 61;
/// Length of the v3 header we write (includes the compression type byte + padding).
pub const V3_HEADER_LEN: u32 = 112;
/// Length of a v2 header.
pub const V2_HEADER_LEN: u32 = 72;

/// Compression algorithm for compressed clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressionType {
    /// Raw deflate (QEMU's default).
    Zlib,
    /// Zstandard.
    Zstd,
}

/// The parsed fixed header plus its extensions.
#[derive(Debug, Clone)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Offset of the backing file name (0: none).
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// 0 = none; anything else is encryption, which we refuse.
    pub crypt_method: u32,
    /// Number of active L1 entries.
    pub l1_size: u32,
    /// Offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Refcount table size in clusters.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits (v3).
    pub incompatible_features: u64,
    /// Compatible feature bits (v3).
    pub compatible_features: u64,
    /// Autoclear feature bits (v3).
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits (v2: always 4).
    pub refcount_order: u32,
    /// Length of the fixed header (v2: 72).
    pub header_length: u32,
    /// Compression type.
    pub compression_type: CompressionType,
    /// Header extensions in file order, `(type, data)`, end marker excluded.
    pub extensions: Vec<(u32, Vec<u8>)>,
    /// Backing file name, if any.
    pub backing_file: Option<String>,
}

fn be32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_be_bytes(a)
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Backing format from the header extension, if present.
    pub fn backing_format(&self) -> Option<String> {
        self.extensions
            .iter()
            .find(|(t, _)| *t == EXT_BACKING_FORMAT)
            .map(|(_, d)| {
                String::from_utf8_lossy(d)
                    .trim_end_matches('\0')
                    .to_string()
            })
    }

    /// Parses a header from the first cluster of the file (`buf` holds at
    /// least the first `min(cluster_size, file_len)` bytes; 4 KiB suffices to
    /// detect the cluster size, the caller re-reads when it is larger).
    pub fn parse(buf: &[u8], file_len: u64) -> Result<Header> {
        if buf.len() < V2_HEADER_LEN as usize {
            return Err(Error::BadHeader(format!(
                "file too short ({} bytes)",
                buf.len()
            )));
        }
        if be32(buf, 0) != MAGIC {
            return Err(Error::NotQcow2);
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(Error::Unsupported(format!("qcow2 version {version}")));
        }
        let cluster_bits = be32(buf, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(Error::BadHeader(format!(
                "cluster_bits {cluster_bits} out of range 9..=21"
            )));
        }
        let mut h = Header {
            version,
            backing_file_offset: be64(buf, 8),
            backing_file_size: be32(buf, 16),
            cluster_bits,
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: CompressionType::Zlib,
            extensions: Vec::new(),
            backing_file: None,
        };
        if version == 3 {
            if buf.len() < 104 {
                return Err(Error::BadHeader("v3 header truncated".into()));
            }
            h.incompatible_features = be64(buf, 72);
            h.compatible_features = be64(buf, 80);
            h.autoclear_features = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length < 104 || !h.header_length.is_multiple_of(8) && h.header_length != 104
            {
                return Err(Error::BadHeader(format!(
                    "header_length {}",
                    h.header_length
                )));
            }
            if h.incompatible_features & INCOMPAT_COMPRESSION != 0 {
                if h.header_length <= 104 || buf.len() <= 104 {
                    return Err(Error::BadHeader(
                        "compression type bit set but no field".into(),
                    ));
                }
                h.compression_type = match buf[104] {
                    0 => CompressionType::Zlib,
                    1 => CompressionType::Zstd,
                    t => return Err(Error::Unsupported(format!("compression type {t}"))),
                };
            }
        }
        h.validate(buf, file_len)?;
        h.parse_extensions(buf)?;
        if h.backing_file_offset != 0 {
            let start = h.backing_file_offset as usize;
            let len = h.backing_file_size as usize;
            if len == 0 || len > 1023 || start.checked_add(len).is_none_or(|e| e > buf.len()) {
                return Err(Error::BadHeader(
                    "backing file name outside the first cluster".into(),
                ));
            }
            let name = std::str::from_utf8(&buf[start..start + len])
                .map_err(|_| Error::BadHeader("backing file name is not UTF-8".into()))?;
            h.backing_file = Some(name.to_string());
        }
        Ok(h)
    }

    fn validate(&self, buf: &[u8], file_len: u64) -> Result<()> {
        let cs = self.cluster_size();
        if self.crypt_method != 0 {
            return Err(Error::Unsupported("encrypted images".into()));
        }
        if self.refcount_order > 6 {
            return Err(Error::BadHeader(format!(
                "refcount_order {}",
                self.refcount_order
            )));
        }
        if self.version == 2 && self.refcount_order != 4 {
            return Err(Error::BadHeader("v2 image with refcount_order != 4".into()));
        }
        let unknown = self.incompatible_features & !INCOMPAT_KNOWN;
        if unknown & INCOMPAT_DATA_FILE != 0 {
            return Err(Error::Unsupported("external data file".into()));
        }
        if unknown & INCOMPAT_EXTL2 != 0 {
            return Err(Error::Unsupported(
                "extended L2 entries (subclusters)".into(),
            ));
        }
        if unknown != 0 {
            return Err(Error::Unsupported(format!(
                "incompatible feature bits {unknown:#x}"
            )));
        }
        if self.header_length as u64 > cs || self.header_length as usize > buf.len() {
            return Err(Error::BadHeader("header longer than a cluster".into()));
        }
        if self.size > MAX_DISK_SIZE {
            return Err(Error::BadHeader(format!(
                "disk size {} too large",
                self.size
            )));
        }
        let l2_entries = cs / 8;
        let needed_l1 = self.size.div_ceil(cs * l2_entries);
        if (self.l1_size as u64) < needed_l1 {
            return Err(Error::BadHeader(format!(
                "L1 table has {} entries, disk size needs {needed_l1}",
                self.l1_size
            )));
        }
        if self.l1_size as u64 * 8 > MAX_L1_BYTES {
            return Err(Error::BadHeader(format!(
                "L1 table of {} entries too large",
                self.l1_size
            )));
        }
        check_table(
            file_len,
            cs,
            self.l1_table_offset,
            self.l1_size as u64 * 8,
            "L1 table",
        )?;
        if self.refcount_table_clusters as u64 * cs > MAX_REFTABLE_BYTES {
            return Err(Error::BadHeader("refcount table too large".into()));
        }
        if self.refcount_table_clusters == 0 {
            return Err(Error::BadHeader("refcount table has no clusters".into()));
        }
        check_table(
            file_len,
            cs,
            self.refcount_table_offset,
            self.refcount_table_clusters as u64 * cs,
            "refcount table",
        )?;
        if self.nb_snapshots > 65536 {
            return Err(Error::BadHeader(format!("{} snapshots", self.nb_snapshots)));
        }
        if self.nb_snapshots > 0 {
            check_table(file_len, cs, self.snapshots_offset, 1, "snapshot table")?;
        }
        Ok(())
    }

    fn parse_extensions(&mut self, buf: &[u8]) -> Result<()> {
        let mut off = self.header_length as usize;
        let end = if self.backing_file_offset != 0 {
            (self.backing_file_offset as usize).min(buf.len())
        } else {
            buf.len()
        };
        loop {
            if off + 8 > end {
                // QEMU tolerates a missing end marker when the area is exhausted.
                break;
            }
            let ty = be32(buf, off);
            let len = be32(buf, off + 4) as usize;
            off += 8;
            if ty == EXT_END {
                break;
            }
            if off + len > end {
                return Err(Error::BadHeader(format!(
                    "header extension {ty:#x} overflows"
                )));
            }
            if ty == EXT_CRYPTO {
                return Err(Error::Unsupported("encrypted images".into()));
            }
            if ty == EXT_DATA_FILE {
                return Err(Error::Unsupported("external data file".into()));
            }
            self.extensions.push((ty, buf[off..off + len].to_vec()));
            off += len.next_multiple_of(8);
        }
        Ok(())
    }

    /// Serializes the whole header cluster: fixed header, extensions, end
    /// marker and the backing file name. Updates `backing_file_offset/size`.
    pub fn serialize(&mut self) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(512);
        out.resize(self.header_length as usize, 0);
        for (ty, data) in &self.extensions {
            out.extend_from_slice(&ty.to_be_bytes());
            out.extend_from_slice(&(data.len() as u32).to_be_bytes());
            out.extend_from_slice(data);
            out.resize(out.len().next_multiple_of(8), 0);
        }
        out.extend_from_slice(&[0u8; 8]);
        match &self.backing_file {
            Some(name) => {
                self.backing_file_offset = out.len() as u64;
                self.backing_file_size = name.len() as u32;
                out.extend_from_slice(name.as_bytes());
            }
            None => {
                self.backing_file_offset = 0;
                self.backing_file_size = 0;
            }
        }
        if out.len() as u64 > self.cluster_size() {
            return Err(Error::InvalidArgument(
                "header, extensions and backing file name do not fit in one cluster".into(),
            ));
        }
        let fixed = self.fixed_bytes();
        out[..fixed.len()].copy_from_slice(&fixed);
        Ok(out)
    }

    /// The fixed header fields only (72 bytes for v2, `header_length` for v3).
    /// Rewriting just these keeps extensions intact.
    pub fn fixed_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; self.header_length as usize];
        b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&self.version.to_be_bytes());
        b[8..16].copy_from_slice(&self.backing_file_offset.to_be_bytes());
        b[16..20].copy_from_slice(&self.backing_file_size.to_be_bytes());
        b[20..24].copy_from_slice(&self.cluster_bits.to_be_bytes());
        b[24..32].copy_from_slice(&self.size.to_be_bytes());
        b[32..36].copy_from_slice(&self.crypt_method.to_be_bytes());
        b[36..40].copy_from_slice(&self.l1_size.to_be_bytes());
        b[40..48].copy_from_slice(&self.l1_table_offset.to_be_bytes());
        b[48..56].copy_from_slice(&self.refcount_table_offset.to_be_bytes());
        b[56..60].copy_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b[60..64].copy_from_slice(&self.nb_snapshots.to_be_bytes());
        b[64..72].copy_from_slice(&self.snapshots_offset.to_be_bytes());
        if self.version == 3 {
            b[72..80].copy_from_slice(&self.incompatible_features.to_be_bytes());
            b[80..88].copy_from_slice(&self.compatible_features.to_be_bytes());
            b[88..96].copy_from_slice(&self.autoclear_features.to_be_bytes());
            b[96..100].copy_from_slice(&self.refcount_order.to_be_bytes());
            b[100..104].copy_from_slice(&self.header_length.to_be_bytes());
            if self.header_length > 104 {
                b[104] = match self.compression_type {
                    CompressionType::Zlib => 0,
                    CompressionType::Zstd => 1,
                };
            }
        }
        b
    }
}

/// Checks that `[offset, offset+len)` is cluster aligned, inside the file and
/// does not overlap the header cluster.
pub fn check_table(
    file_len: u64,
    cluster_size: u64,
    offset: u64,
    len: u64,
    what: &str,
) -> Result<()> {
    if !offset.is_multiple_of(cluster_size) {
        return Err(Error::BadHeader(format!(
            "{what} offset {offset:#x} is not cluster aligned"
        )));
    }
    if offset == 0 {
        return Err(Error::BadHeader(format!("{what} overlaps the header")));
    }
    match offset.checked_add(len) {
        Some(end) if end <= file_len.next_multiple_of(cluster_size) => Ok(()),
        _ => Err(Error::BadHeader(format!(
            "{what} at {offset:#x} (+{len} bytes) points outside the file ({file_len} bytes)"
        ))),
    }
}

/// The feature name table QEMU writes (so `qemu-img info` names our bits).
pub fn feature_table() -> Vec<u8> {
    let mut t = Vec::new();
    let names: [(u8, u8, &str); 7] = [
        (0, 0, "dirty bit"),
        (0, 1, "corrupt bit"),
        (0, 2, "external data file"),
        (0, 3, "compression type"),
        (0, 4, "extended L2 entries"),
        (1, 0, "lazy refcounts"),
        (2, 0, "bitmaps"),
    ];
    for (ty, bit, name) in names {
        let mut e = [0u8; 48];
        e[0] = ty;
        e[1] = bit;
        e[2..2 + name.len()].copy_from_slice(name.as_bytes());
        t.extend_from_slice(&e);
    }
    t
}
