//! Refcount table, refcount blocks and the cluster allocator.
//!
//! Refcount blocks are cached whole; the table is kept in memory. When the
//! table must grow it is given a new place in the file: the header is
//! switched to it by the owner after the new table is durable, and the old
//! table's clusters are released afterwards (see [`Refcounts::writeback`]).

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::cache::Cache;
use crate::error::{Error, Result};
use crate::header::MAX_REFTABLE_BYTES;
use crate::io::read_or_zero;

/// Reads entry `i` of a refcount block with `1 << order` bit entries.
pub fn rc_get(b: &[u8], i: usize, order: u32) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per = 8 / bits;
            ((b[i / per] >> ((i % per) * bits)) & ((1u16 << bits) - 1) as u8) as u64
        }
        3 => b[i] as u64,
        4 => u16::from_be_bytes([b[2 * i], b[2 * i + 1]]) as u64,
        5 => u32::from_be_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]) as u64,
        _ => {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[8 * i..8 * i + 8]);
            u64::from_be_bytes(a)
        }
    }
}

/// Writes entry `i` of a refcount block (`v` must fit the width).
pub fn rc_set(b: &mut [u8], i: usize, order: u32, v: u64) {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per = 8 / bits;
            let shift = (i % per) * bits;
            let mask = (((1u16 << bits) - 1) as u8) << shift;
            b[i / per] = (b[i / per] & !mask) | (((v as u8) << shift) & mask);
        }
        3 => b[i] = v as u8,
        4 => b[2 * i..2 * i + 2].copy_from_slice(&(v as u16).to_be_bytes()),
        5 => b[4 * i..4 * i + 4].copy_from_slice(&(v as u32).to_be_bytes()),
        _ => b[8 * i..8 * i + 8].copy_from_slice(&v.to_be_bytes()),
    }
}

/// Largest refcount representable with `1 << order` bits.
pub fn rc_max(order: u32) -> u64 {
    if order >= 6 {
        u64::MAX
    } else {
        (1u64 << (1 << order)) - 1
    }
}

/// Refcount state of an open image.
#[derive(Debug)]
pub struct Refcounts {
    order: u32,
    cluster_bits: u32,
    /// In-memory refcount table (its length is a whole number of clusters).
    table: Vec<u64>,
    table_offset: u64,
    table_dirty: bool,
    /// Where the table lived on disk before it was moved (to free after the header switch).
    moved_from: Option<(u64, u64)>,
    cache: Cache<Box<[u8]>>,
    cache_capacity: u64,
    free_hint: u64,
    busy: Vec<(u64, u64)>,
    /// One past the last cluster that exists in the file or was allocated.
    end: u64,
}

impl Refcounts {
    /// Loads the refcount table.
    pub fn load(
        file: &File,
        order: u32,
        cluster_bits: u32,
        table_offset: u64,
        table_clusters: u64,
        file_len: u64,
        cache_bytes: u64,
    ) -> Result<Self> {
        let cs = 1u64 << cluster_bits;
        let len = table_clusters * cs;
        let mut raw = vec![0u8; len as usize];
        read_or_zero(file, &mut raw, table_offset)?;
        let table: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        Ok(Refcounts {
            order,
            cluster_bits,
            table,
            table_offset,
            table_dirty: false,
            moved_from: None,
            cache: Cache::new((cache_bytes / cs) as usize),
            cache_capacity: (cache_bytes / cs).max(4),
            free_hint: 0,
            busy: Vec::new(),
            end: file_len.div_ceil(cs),
        })
    }

    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Log2 of the clusters one refcount block describes.
    fn block_shift(&self) -> u32 {
        self.cluster_bits + 3 - self.order
    }

    /// One past the last cluster in use or in the file.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Current on-disk location and size (clusters) of the table.
    pub fn table_location(&self) -> (u64, u64) {
        (
            self.table_offset,
            (self.table.len() as u64 * 8) >> self.cluster_bits,
        )
    }

    /// Replaces the table (after a metadata switch); the cache is emptied.
    pub fn reset(
        &mut self,
        file: &File,
        table_offset: u64,
        clusters: u64,
        file_end: u64,
    ) -> Result<()> {
        let cache_cap = self.cache_capacity;
        let fresh = Refcounts::load(
            file,
            self.order,
            self.cluster_bits,
            table_offset,
            clusters,
            file_end.max(self.end << self.cluster_bits),
            cache_cap << self.cluster_bits,
        )?;
        *self = fresh;
        Ok(())
    }

    /// Offsets of all refcount blocks.
    pub fn block_offsets(&self) -> Vec<u64> {
        self.table.iter().copied().filter(|&o| o != 0).collect()
    }

    /// Largest representable refcount.
    pub fn max(&self) -> u64 {
        rc_max(self.order)
    }

    fn evict_if_full(&mut self, file: &File) -> Result<()> {
        while self.cache.is_full() {
            let Some((k, dirty)) = self.cache.lru() else {
                break;
            };
            if dirty {
                if let Some(b) = self.cache.peek(k) {
                    file.write_all_at(b, k)
                        .map_err(|e| Error::io("write refcount block", e))?;
                }
            }
            self.cache.remove(k);
        }
        Ok(())
    }

    fn load_block(&mut self, file: &File, off: u64) -> Result<()> {
        if self.cache.get(off).is_some() {
            return Ok(());
        }
        if !off.is_multiple_of(self.cs()) || off == 0 || (off >> self.cluster_bits) >= self.end {
            return Err(Error::corrupt(format!(
                "refcount block at {off:#x} is invalid"
            )));
        }
        let mut b = vec![0u8; self.cs() as usize].into_boxed_slice();
        read_or_zero(file, &mut b, off)?;
        self.evict_if_full(file)?;
        self.cache.insert(off, b, false);
        Ok(())
    }

    /// Refcount of cluster `idx`.
    pub fn get(&mut self, file: &File, idx: u64) -> Result<u64> {
        let bi = (idx >> self.block_shift()) as usize;
        let Some(&off) = self.table.get(bi) else {
            return Ok(0);
        };
        if off == 0 {
            return Ok(0);
        }
        self.load_block(file, off)?;
        let i = (idx & ((1 << self.block_shift()) - 1)) as usize;
        let order = self.order;
        Ok(self
            .cache
            .get(off)
            .map(|b| rc_get(b, i, order))
            .unwrap_or(0))
    }

    /// Sets the refcount of cluster `idx`, creating its block if needed.
    pub fn set(&mut self, file: &File, idx: u64, v: u64) -> Result<()> {
        let off = self.ensure_block(file, idx >> self.block_shift())?;
        self.load_block(file, off)?;
        let i = (idx & ((1 << self.block_shift()) - 1)) as usize;
        let order = self.order;
        if let Some(b) = self.cache.get_mut(off) {
            rc_set(b, i, order, v);
        }
        if v == 0 {
            self.free_hint = self.free_hint.min(idx);
        }
        self.end = self.end.max(idx + 1);
        Ok(())
    }

    /// Adds `delta` to the refcount of `idx`; returns the new value.
    pub fn add(&mut self, file: &File, idx: u64, delta: i64) -> Result<u64> {
        let old = self.get(file, idx)?;
        let new = if delta >= 0 {
            old.checked_add(delta as u64)
                .filter(|v| *v <= self.max())
                .ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "refcount overflow on cluster {idx} ({}-bit refcounts)",
                        1 << self.order
                    ))
                })?
        } else {
            old.checked_sub(delta.unsigned_abs()).ok_or_else(|| {
                Error::corrupt(format!("refcount of cluster {idx} would drop below zero"))
            })?
        };
        self.set(file, idx, new)?;
        Ok(new)
    }

    fn in_busy(&self, idx: u64) -> bool {
        self.busy.iter().any(|&(s, n)| idx >= s && idx < s + n)
    }

    /// First index of `n` free clusters at or after the hint. Everything
    /// the scan passes over is in use, so the hint moves past it.
    fn find_free(&mut self, file: &File, n: u64) -> Result<u64> {
        let mut start = self.free_hint.max(1);
        let mut i = start;
        let mut first_free = None;
        loop {
            let used = self.in_busy(i) || self.get(file, i)? != 0;
            if used {
                i += 1;
                start = i;
                continue;
            }
            if first_free.is_none() && self.busy.is_empty() {
                first_free = Some(i);
                self.free_hint = i;
            }
            if i + 1 - start == n {
                return Ok(start);
            }
            i += 1;
        }
    }

    /// Allocates `n` contiguous clusters with refcount 1; returns the first index.
    pub fn alloc(&mut self, file: &File, n: u64) -> Result<u64> {
        let c = self.find_free(file, n)?;
        self.busy.push((c, n));
        let mut r = Ok(());
        for i in c..c + n {
            r = self.set(file, i, 1);
            if r.is_err() {
                break;
            }
        }
        self.busy.pop();
        r?;
        if c == self.free_hint {
            self.free_hint = c + n;
        }
        self.end = self.end.max(c + n);
        Ok(c)
    }

    fn ensure_block(&mut self, file: &File, bi: u64) -> Result<u64> {
        if bi as usize >= self.table.len() {
            self.grow_table(file, bi as usize + 1)?;
        }
        let existing = self.table[bi as usize];
        if existing != 0 {
            return Ok(existing);
        }
        let c = self.find_free(file, 1)?;
        let cs = self.cs();
        let mut block = vec![0u8; cs as usize].into_boxed_slice();
        if c >> self.block_shift() == bi {
            // The new block describes its own cluster.
            let i = (c & ((1 << self.block_shift()) - 1)) as usize;
            rc_set(&mut block, i, self.order, 1);
        } else {
            self.busy.push((c, 1));
            let r = self.set(file, c, 1);
            self.busy.pop();
            r?;
            if self.table[bi as usize] != 0 {
                // The recursion created this block meanwhile.
                self.set(file, c, 0)?;
                return Ok(self.table[bi as usize]);
            }
        }
        let off = c << self.cluster_bits;
        self.evict_if_full(file)?;
        self.cache.insert(off, block, true);
        self.table[bi as usize] = off;
        self.table_dirty = true;
        self.end = self.end.max(c + 1);
        Ok(off)
    }

    fn grow_table(&mut self, file: &File, min_entries: usize) -> Result<()> {
        let per_cluster = (self.cs() / 8) as usize;
        let new_len = min_entries
            .max(self.table.len() * 2)
            .next_multiple_of(per_cluster);
        if new_len as u64 * 8 > MAX_REFTABLE_BYTES {
            return Err(Error::InvalidArgument(
                "image too large: refcount table limit".into(),
            ));
        }
        let old = self.table_location();
        self.table.resize(new_len, 0);
        let clusters = (new_len as u64 * 8) >> self.cluster_bits;
        let start = self.alloc(file, clusters)?;
        match self.moved_from {
            None => self.moved_from = Some(old),
            Some(_) => {
                // The previous new place was never referenced by the header.
                for i in 0..old.1 {
                    self.add(file, (old.0 >> self.cluster_bits) + i, -1)?;
                }
            }
        }
        self.table_offset = start << self.cluster_bits;
        self.table_dirty = true;
        Ok(())
    }

    /// Whether anything awaits writeback.
    pub fn is_dirty(&self) -> bool {
        self.table_dirty || self.cache.has_dirty()
    }

    /// Writes dirty blocks, then the table. The caller must `fdatasync`
    /// afterwards and, when `Some((offset, clusters))` of the *old* table is
    /// returned, switch the header to [`Self::table_location`], sync, and
    /// then release the old table with [`Self::release`].
    pub fn writeback(&mut self, file: &File) -> Result<Option<(u64, u64)>> {
        for k in self.cache.dirty_keys() {
            if let Some(b) = self.cache.peek(k) {
                file.write_all_at(b, k)
                    .map_err(|e| Error::io("write refcount block", e))?;
            }
            self.cache.mark_clean(k);
        }
        if self.table_dirty {
            let mut raw = Vec::with_capacity(self.table.len() * 8);
            for e in &self.table {
                raw.extend_from_slice(&e.to_be_bytes());
            }
            file.write_all_at(&raw, self.table_offset)
                .map_err(|e| Error::io("write refcount table", e))?;
            self.table_dirty = false;
        }
        Ok(self.moved_from.take())
    }

    /// Drops one reference from each cluster of `[offset, offset + clusters)`.
    pub fn release(&mut self, file: &File, offset: u64, clusters: u64) -> Result<()> {
        for i in 0..clusters {
            self.add(file, (offset >> self.cluster_bits) + i, -1)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_matches_qemu_bit_order() {
        // QEMU: order 0 keeps entry i in bit (i % 8) of byte i / 8.
        let mut b = [0u8; 8];
        rc_set(&mut b, 9, 0, 1);
        assert_eq!(b[1], 0b10);
        rc_set(&mut b, 3, 1, 3);
        assert_eq!(b[0], 0b1100_0000);
        rc_set(&mut b, 1, 2, 0xa);
        assert_eq!(b[0] >> 4, 0xa);
        let mut w = [0u8; 64];
        for order in 0..=6 {
            w.fill(0);
            let max = rc_max(order);
            let n = (64 * 8) >> order;
            for i in 0..n {
                rc_set(&mut w, i, order, (i as u64 * 7) & max);
            }
            for i in 0..n {
                assert_eq!(
                    rc_get(&w, i, order),
                    (i as u64 * 7) & max,
                    "order {order} i {i}"
                );
            }
        }
        assert_eq!(u16::from_be_bytes([w[0], w[1]]), 0);
    }
}
