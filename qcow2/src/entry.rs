//! L1 and L2 table entry encoding.

/// Entry flag: refcount is exactly one, the cluster may be written in place.
pub const COPIED: u64 = 1 << 63;
/// L2 flag: compressed cluster.
pub const COMPRESSED: u64 = 1 << 62;
/// L2 flag (v3): the cluster reads as zeros.
pub const ZERO: u64 = 1;
/// Host offset bits of a standard L1/L2 entry.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bits that must be zero in an L1 entry.
pub const L1_RESERVED: u64 = !(OFFSET_MASK | COPIED);
/// Bits that must be zero in a standard (uncompressed) L2 entry.
pub const L2_RESERVED: u64 = !(OFFSET_MASK | COPIED | ZERO);

/// What an L2 entry says about a guest cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L2Entry {
    /// Not allocated here: read from the backing file (or zeros).
    Unallocated,
    /// Reads as zeros; `Some(host)` when a host cluster is still attached.
    Zero(Option<u64>),
    /// Data at `host`; `copied` means refcount 1 (writable in place).
    Normal {
        /// Host offset of the cluster.
        host: u64,
        /// The COPIED flag.
        copied: bool,
    },
    /// Compressed data: `host` byte offset and `len` bytes to read (an upper bound).
    Compressed {
        /// Byte offset of the compressed stream.
        host: u64,
        /// Bytes covered by the descriptor.
        len: u64,
    },
}

impl L2Entry {
    /// Decodes a raw (host-endian) L2 entry.
    pub fn decode(raw: u64, cluster_bits: u32) -> L2Entry {
        if raw & COMPRESSED != 0 {
            let x = 62 - (cluster_bits - 8);
            let host = raw & ((1u64 << x) - 1);
            let sectors = (raw & !COMPRESSED & !COPIED) >> x;
            let len = (sectors + 1) * 512 - (host & 511);
            return L2Entry::Compressed { host, len };
        }
        let host = raw & OFFSET_MASK;
        if raw & ZERO != 0 {
            return L2Entry::Zero((host != 0).then_some(host));
        }
        if host == 0 {
            return L2Entry::Unallocated;
        }
        L2Entry::Normal {
            host,
            copied: raw & COPIED != 0,
        }
    }

    /// Host clusters this entry references (for refcounting), as
    /// `(first_cluster_index, count)`.
    pub fn host_clusters(raw: u64, cluster_bits: u32) -> Option<(u64, u64)> {
        match L2Entry::decode(raw, cluster_bits) {
            L2Entry::Unallocated | L2Entry::Zero(None) => None,
            L2Entry::Zero(Some(h)) | L2Entry::Normal { host: h, .. } => {
                Some((h >> cluster_bits, 1))
            }
            L2Entry::Compressed { host, len } => {
                let first = host >> cluster_bits;
                let last = (host + len - 1) >> cluster_bits;
                Some((first, last - first + 1))
            }
        }
    }

    /// Whether the raw entry has reserved bits set or a misaligned offset.
    pub fn is_malformed(raw: u64, cluster_bits: u32) -> bool {
        if raw & COMPRESSED != 0 {
            return false;
        }
        raw & L2_RESERVED != 0 || (raw & OFFSET_MASK) & ((1 << cluster_bits) - 1) != 0
    }
}

/// Encodes a normal data cluster entry.
pub fn normal(host: u64, copied: bool) -> u64 {
    host | if copied { COPIED } else { 0 }
}

/// Sets or clears COPIED on a raw L1/L2 entry (no-op for compressed or unallocated).
pub fn with_copied(raw: u64, copied: bool) -> u64 {
    if raw & COMPRESSED != 0 || raw & OFFSET_MASK == 0 {
        return raw & !COPIED;
    }
    if copied {
        raw | COPIED
    } else {
        raw & !COPIED
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressed_descriptor_decodes_like_the_spec() {
        // 64 KiB clusters: x = 62 - 8 = 54 bits of offset.
        let raw = COMPRESSED | (3u64 << 54) | 0x12345;
        assert_eq!(
            L2Entry::decode(raw, 16),
            L2Entry::Compressed {
                host: 0x12345,
                len: 4 * 512 - 0x145
            }
        );
        assert_eq!(L2Entry::host_clusters(raw, 16), Some((1, 1)));
    }

    #[test]
    fn entry_kinds() {
        assert_eq!(L2Entry::decode(0, 16), L2Entry::Unallocated);
        assert_eq!(L2Entry::decode(1, 16), L2Entry::Zero(None));
        assert_eq!(L2Entry::decode(0x20001, 16), L2Entry::Zero(Some(0x20000)));
        assert_eq!(
            L2Entry::decode(COPIED | 0x30000, 16),
            L2Entry::Normal {
                host: 0x30000,
                copied: true
            }
        );
        assert!(L2Entry::is_malformed(0x30200, 16));
        assert!(!L2Entry::is_malformed(0x30000, 16));
        assert!(L2Entry::is_malformed(0x30000 | 2, 16));
    }
}
