//! Cached metadata of an open image (L1, L2 slices, refcounts, snapshot
//! list) and its ordered writeback. Everything here runs under the image's
//! metadata mutex; nothing here touches guest data.

use std::collections::{BTreeSet, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::cache::Cache;
use crate::entry::{self, L2Entry};
use crate::error::{Error, Result};
use crate::header::Header;
use crate::io::{punch_hole, read_or_zero, write_zero_bytes};
use crate::refcount::Refcounts;
use crate::snapshot::SnapshotInfo;

/// Geometry derived from the header.
#[derive(Debug, Clone, Copy)]
pub struct Geo {
    /// log2 cluster size.
    pub cluster_bits: u32,
    /// Cluster size in bytes.
    pub cs: u64,
    /// log2 of L2 entries per table.
    pub l2_bits: u32,
    /// Entries per L2 slice.
    pub slice_entries: u64,
}

impl Geo {
    /// Geometry for a cluster size.
    pub fn new(cluster_bits: u32) -> Geo {
        let cs = 1u64 << cluster_bits;
        Geo {
            cluster_bits,
            cs,
            l2_bits: cluster_bits - 3,
            slice_entries: (cs / 8).min(512),
        }
    }

    /// Bytes of one L2 slice.
    pub fn slice_bytes(&self) -> u64 {
        self.slice_entries * 8
    }

    /// L1 entries needed for a disk of `size` bytes.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        size.div_ceil(self.cs << self.l2_bits)
    }
}

/// Metadata state guarded by the image mutex.
#[derive(Debug)]
pub struct Meta {
    pub geo: Geo,
    pub header: Header,
    /// Active L1 table (host-endian, flags included).
    pub l1: Vec<u64>,
    /// Dirty 512-byte sectors of the L1 table.
    pub l1_dirty: BTreeSet<u64>,
    pub l2: Cache<Box<[u64]>>,
    pub rc: Refcounts,
    pub snapshots: Vec<SnapshotInfo>,
    /// On-disk length of the snapshot table in bytes.
    pub snapshots_len: u64,
    /// Guest clusters with an allocation in flight.
    pub inflight: HashSet<u64>,
    /// Host clusters that lose a reference once the L2/L1 updates are durable.
    pub pending_release: Vec<u64>,
    pub header_dirty: bool,
    pub read_only: bool,
}

fn decode_u64s(raw: &[u8]) -> Box<[u64]> {
    raw.chunks_exact(8)
        .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect()
}

fn encode_u64s(v: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() * 8);
    for e in v {
        out.extend_from_slice(&e.to_be_bytes());
    }
    out
}

/// Reads a table of `n` big-endian u64 at `off`.
pub fn read_table(file: &File, off: u64, n: u64) -> Result<Vec<u64>> {
    let mut raw = vec![0u8; (n * 8) as usize];
    read_or_zero(file, &mut raw, off)?;
    Ok(decode_u64s(&raw).into_vec())
}

/// Writes a table of u64 big-endian at `off`, padded with zeros to `pad_to` bytes.
pub fn write_table(file: &File, off: u64, v: &[u64], pad_to: u64) -> Result<()> {
    let mut raw = encode_u64s(v);
    raw.resize((pad_to as usize).max(raw.len()), 0);
    file.write_all_at(&raw, off)
        .map_err(|e| Error::io("write table", e))
}

pub fn sync(file: &File) -> Result<()> {
    file.sync_data().map_err(|e| Error::io("fdatasync", e))
}

impl Meta {
    /// Raw L1 entry for guest cluster `gc` and its L2 table offset (0: none).
    fn l2_table_of(&self, gc: u64) -> Result<(usize, u64)> {
        let l1i = (gc >> self.geo.l2_bits) as usize;
        let Some(&e) = self.l1.get(l1i) else {
            return Ok((l1i, 0));
        };
        let off = e & entry::OFFSET_MASK;
        if e & entry::L1_RESERVED != 0 || !off.is_multiple_of(self.geo.cs) {
            return Err(Error::corrupt(format!(
                "L1 entry {l1i} ({e:#x}) is invalid"
            )));
        }
        if off != 0 && (off >> self.geo.cluster_bits) >= self.rc.end() {
            return Err(Error::corrupt(format!(
                "L2 table at {off:#x} is outside the file"
            )));
        }
        Ok((l1i, off))
    }

    fn slice_key(&self, l2off: u64, gc: u64) -> (u64, usize) {
        let i = gc & ((1 << self.geo.l2_bits) - 1);
        let key = l2off + (i / self.geo.slice_entries) * self.geo.slice_bytes();
        (key, (i % self.geo.slice_entries) as usize)
    }

    fn load_slice(&mut self, file: &File, key: u64) -> Result<()> {
        if self.l2.get(key).is_some() {
            return Ok(());
        }
        while self.l2.is_full() {
            let Some((k, dirty)) = self.l2.lru() else {
                break;
            };
            if dirty {
                self.writeback(file)?;
            }
            self.l2.remove(k);
        }
        let mut raw = vec![0u8; self.geo.slice_bytes() as usize];
        read_or_zero(file, &mut raw, key)?;
        self.l2.insert(key, decode_u64s(&raw), false);
        Ok(())
    }

    /// Raw L2 entry of guest cluster `gc` (0 when it has no L2 table).
    pub fn get_l2(&mut self, file: &File, gc: u64) -> Result<u64> {
        let (_, l2off) = self.l2_table_of(gc)?;
        if l2off == 0 {
            return Ok(0);
        }
        let (key, i) = self.slice_key(l2off, gc);
        self.load_slice(file, key)?;
        Ok(self.l2.peek(key).map(|s| s[i]).unwrap_or(0))
    }

    /// Decoded L2 entry, validated against the file.
    pub fn lookup(&mut self, file: &File, gc: u64) -> Result<(L2Entry, u64)> {
        let raw = self.get_l2(file, gc)?;
        let cb = self.geo.cluster_bits;
        if L2Entry::is_malformed(raw, cb) {
            return Err(Error::corrupt(format!(
                "L2 entry for guest cluster {gc} ({raw:#x})"
            )));
        }
        let e = L2Entry::decode(raw, cb);
        if let Some((first, n)) = L2Entry::host_clusters(raw, cb) {
            if first == 0 || first + n > self.rc.end() {
                return Err(Error::corrupt(format!(
                    "guest cluster {gc} maps to host offset {:#x} outside the file",
                    first << cb
                )));
            }
        }
        Ok((e, raw))
    }

    /// Sets the raw L2 entry of `gc`; its L2 table must be writable
    /// ([`Self::ensure_l2_writable`]).
    pub fn set_l2(&mut self, file: &File, gc: u64, raw: u64) -> Result<()> {
        let (_, l2off) = self.l2_table_of(gc)?;
        let (key, i) = self.slice_key(l2off, gc);
        self.load_slice(file, key)?;
        if let Some(s) = self.l2.get_mut(key) {
            s[i] = raw;
        }
        Ok(())
    }

    fn mark_l1_dirty(&mut self, l1i: usize) {
        self.l1_dirty.insert(l1i as u64 / 64);
    }

    /// Makes the L2 table of `gc` exist and be exclusively ours (COPIED),
    /// allocating or copying it.
    pub fn ensure_l2_writable(&mut self, file: &File, gc: u64) -> Result<()> {
        let (l1i, old) = self.l2_table_of(gc)?;
        if l1i >= self.l1.len() {
            return Err(Error::corrupt(format!(
                "guest cluster {gc} beyond the L1 table"
            )));
        }
        if old != 0 && self.l1[l1i] & entry::COPIED != 0 {
            return Ok(());
        }
        let cs = self.geo.cs;
        let new = self.rc.alloc(file, 1)? << self.geo.cluster_bits;
        self.l2.remove_range(new, new + cs);
        if old == 0 {
            write_zero_bytes(file, new, cs)?;
        } else {
            // Copy the shared table (through the cache: it may hold newer slices).
            let mut table = Vec::with_capacity((cs / 8) as usize);
            let mut key = old;
            while key < old + cs {
                self.load_slice(file, key)?;
                if let Some(s) = self.l2.peek(key) {
                    table.extend_from_slice(s);
                }
                key += self.geo.slice_bytes();
            }
            write_table(file, new, &table, cs)?;
            self.pending_release.push(old >> self.geo.cluster_bits);
        }
        self.l1[l1i] = new | entry::COPIED;
        self.mark_l1_dirty(l1i);
        Ok(())
    }

    /// Writes the fixed header fields (one sector: atomic on crash).
    pub fn write_header(&mut self, file: &File) -> Result<()> {
        file.write_all_at(&self.header.fixed_bytes(), 0)
            .map_err(|e| Error::io("write header", e))?;
        self.header_dirty = false;
        Ok(())
    }

    fn write_refcounts(&mut self, file: &File) -> Result<()> {
        let moved = self.rc.writeback(file)?;
        sync(file)?;
        if let Some((old, n)) = moved {
            let (off, clusters) = self.rc.table_location();
            self.header.refcount_table_offset = off;
            self.header.refcount_table_clusters = clusters as u32;
            self.write_header(file)?;
            sync(file)?;
            self.rc.release(file, old, n)?;
            self.rc.writeback(file)?;
        }
        Ok(())
    }

    /// Whether anything awaits writeback.
    pub fn is_dirty(&self) -> bool {
        self.rc.is_dirty()
            || self.l2.has_dirty()
            || !self.l1_dirty.is_empty()
            || self.header_dirty
            || !self.pending_release.is_empty()
    }

    /// Writes all cached metadata in crash-safe order (see the crate docs)
    /// and makes it durable.
    pub fn writeback(&mut self, file: &File) -> Result<()> {
        if self.read_only || !self.is_dirty() {
            return Ok(());
        }
        // 1 + 2: data of new clusters, then refcounts.
        sync(file)?;
        self.write_refcounts(file)?;
        // 3: L2 slices, L1 sectors, header.
        for k in self.l2.dirty_keys() {
            if let Some(s) = self.l2.peek(k) {
                file.write_all_at(&encode_u64s(s), k)
                    .map_err(|e| Error::io("write L2 table", e))?;
            }
            self.l2.mark_clean(k);
        }
        let l1_off = self.header.l1_table_offset;
        for sector in std::mem::take(&mut self.l1_dirty) {
            let start = (sector * 64) as usize;
            let end = (start + 64).min(self.l1.len());
            if start < end {
                file.write_all_at(
                    &encode_u64s(&self.l1[start..end]),
                    l1_off + start as u64 * 8,
                )
                .map_err(|e| Error::io("write L1 table", e))?;
            }
        }
        sync(file)?;
        if self.header_dirty {
            self.write_header(file)?;
            sync(file)?;
        }
        // 4: references dropped by the updates above.
        if !self.pending_release.is_empty() {
            let mut freed = Vec::new();
            for idx in std::mem::take(&mut self.pending_release) {
                if self.rc.add(file, idx, -1)? == 0 {
                    freed.push(idx);
                }
            }
            self.write_refcounts(file)?;
            for idx in freed {
                self.forget_cluster(file, idx)?;
            }
        }
        Ok(())
    }

    /// A host cluster became free: drop cached metadata at it and give its
    /// space back to the host file system.
    fn forget_cluster(&mut self, file: &File, idx: u64) -> Result<()> {
        let off = idx << self.geo.cluster_bits;
        self.l2.remove_range(off, off + self.geo.cs);
        punch_hole(file, off, self.geo.cs)
    }
}
