//! The on-disk snapshot table, in the layout QEMU reads and writes.

use crate::error::{Error, Result};

/// One internal snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Unique numeric id, as a string ("1", "2", ...).
    pub id: String,
    /// User-given name.
    pub name: String,
    /// Offset of this snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Entries in this snapshot's L1 table.
    pub l1_size: u32,
    /// Creation time, seconds since the epoch.
    pub date_sec: u32,
    /// Creation time, nanoseconds part.
    pub date_nsec: u32,
    /// Guest clock at creation (0 for disk-only snapshots).
    pub vm_clock_nsec: u64,
    /// Size of the saved VM state (0: none).
    pub vm_state_size: u64,
    /// Virtual disk size when the snapshot was taken.
    pub disk_size: u64,
    /// Instruction count (QEMU record/replay); None when absent.
    pub icount: Option<u64>,
    /// Extra data beyond what we understand, kept verbatim.
    pub extra_tail: Vec<u8>,
}

/// Fixed part of a snapshot table entry.
const FIXED: usize = 40;

fn be16(b: &[u8], o: usize) -> u16 {
    u16::from_be_bytes([b[o], b[o + 1]])
}
fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn be64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_be_bytes(a)
}

/// Upper bound on the table size (as QEMU: 64 MiB).
pub const MAX_TABLE_BYTES: usize = 64 << 20;

/// Parses `count` entries from `buf`; `version` decides the mandatory extra data.
/// Returns the entries and the table's length in bytes.
pub fn parse_table(
    buf: &[u8],
    count: u32,
    version: u32,
    default_size: u64,
) -> Result<(Vec<SnapshotInfo>, usize)> {
    let mut out = Vec::with_capacity(count.min(1024) as usize);
    let mut off = 0usize;
    let bad = |what: &str| Error::corrupt(format!("snapshot table: {what}"));
    for _ in 0..count {
        if off + FIXED > buf.len() {
            return Err(bad("truncated entry"));
        }
        let l1_table_offset = be64(buf, off);
        let l1_size = be32(buf, off + 8);
        let id_len = be16(buf, off + 12) as usize;
        let name_len = be16(buf, off + 14) as usize;
        let date_sec = be32(buf, off + 16);
        let date_nsec = be32(buf, off + 20);
        let vm_clock_nsec = be64(buf, off + 24);
        let vm_state_size32 = be32(buf, off + 32);
        let extra_len = be32(buf, off + 36) as usize;
        if extra_len > 1024 {
            return Err(bad("extra data too large"));
        }
        let mut p = off + FIXED;
        if p + extra_len + id_len + name_len > buf.len() {
            return Err(bad("entry overflows the table"));
        }
        let extra = &buf[p..p + extra_len];
        p += extra_len;
        if version >= 3 && extra_len < 16 {
            return Err(bad("v3 snapshot without disk size"));
        }
        let vm_state_size = if extra_len >= 8 {
            be64(extra, 0)
        } else {
            vm_state_size32 as u64
        };
        let disk_size = if extra_len >= 16 {
            be64(extra, 8)
        } else {
            default_size
        };
        let icount = if extra_len >= 24 {
            let v = be64(extra, 16);
            (v != u64::MAX).then_some(v)
        } else {
            None
        };
        let extra_tail = if extra_len > 24 {
            extra[24..].to_vec()
        } else {
            Vec::new()
        };
        let id = String::from_utf8_lossy(&buf[p..p + id_len]).into_owned();
        p += id_len;
        let name = String::from_utf8_lossy(&buf[p..p + name_len]).into_owned();
        p += name_len;
        off = p.next_multiple_of(8);
        out.push(SnapshotInfo {
            id,
            name,
            l1_table_offset,
            l1_size,
            date_sec,
            date_nsec,
            vm_clock_nsec,
            vm_state_size,
            disk_size,
            icount,
            extra_tail,
        });
    }
    Ok((out, off))
}

/// Serializes snapshot entries; QEMU's 24-byte extra data is always written.
pub fn serialize_table(snaps: &[SnapshotInfo]) -> Vec<u8> {
    let mut b = Vec::new();
    for s in snaps {
        let start = b.len();
        b.extend_from_slice(&s.l1_table_offset.to_be_bytes());
        b.extend_from_slice(&s.l1_size.to_be_bytes());
        b.extend_from_slice(&(s.id.len() as u16).to_be_bytes());
        b.extend_from_slice(&(s.name.len() as u16).to_be_bytes());
        b.extend_from_slice(&s.date_sec.to_be_bytes());
        b.extend_from_slice(&s.date_nsec.to_be_bytes());
        b.extend_from_slice(&s.vm_clock_nsec.to_be_bytes());
        b.extend_from_slice(&(s.vm_state_size.min(u32::MAX as u64) as u32).to_be_bytes());
        let extra_len = 24 + s.extra_tail.len();
        b.extend_from_slice(&(extra_len as u32).to_be_bytes());
        b.extend_from_slice(&s.vm_state_size.to_be_bytes());
        b.extend_from_slice(&s.disk_size.to_be_bytes());
        b.extend_from_slice(&s.icount.unwrap_or(u64::MAX).to_be_bytes());
        b.extend_from_slice(&s.extra_tail);
        b.extend_from_slice(s.id.as_bytes());
        b.extend_from_slice(s.name.as_bytes());
        let len = b.len() - start;
        b.resize(start + len.next_multiple_of(8), 0);
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_roundtrip_keeps_unknown_extra_data() {
        let s = SnapshotInfo {
            id: "7".into(),
            name: "before-upgrade".into(),
            l1_table_offset: 0x30000,
            l1_size: 3,
            date_sec: 1_700_000_000,
            date_nsec: 5,
            vm_clock_nsec: 9,
            vm_state_size: 0,
            disk_size: 1 << 30,
            icount: None,
            extra_tail: vec![1, 2, 3, 4, 5, 6, 7, 8],
        };
        let b = serialize_table(&[s.clone(), s.clone()]);
        assert_eq!(b.len() % 8, 0);
        let (back, len) = parse_table(&b, 2, 3, 0).expect("parse");
        assert_eq!(len, b.len());
        assert_eq!(back, vec![s.clone(), s]);
    }

    #[test]
    fn truncated_table_is_an_error() {
        let b = serialize_table(&[SnapshotInfo {
            id: "1".into(),
            name: "a".into(),
            l1_table_offset: 0x10000,
            l1_size: 1,
            date_sec: 0,
            date_nsec: 0,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: 0,
            icount: None,
            extra_tail: vec![],
        }]);
        assert!(parse_table(&b[..b.len() - 10], 1, 3, 0).is_err());
        assert!(parse_table(&b, 2, 3, 0).is_err());
    }
}
