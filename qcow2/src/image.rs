//! [`Qcow2`]: an open image and its data path.
//!
//! Reads and writes look up (and, for writes, allocate) under the metadata
//! mutex, then release it for the data `pread`/`pwrite`. A write that needs
//! a new cluster marks the guest cluster in flight, writes the whole new
//! cluster (guest data merged with the copy-on-write source) outside the
//! lock, and publishes the L2 entry afterwards.

use std::cell::RefCell;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Condvar, Mutex, MutexGuard, RwLock};

use crate::backing::{check_range, file_size, open_backing, BlockImage, ImageFormat};
use crate::cache::Cache;
use crate::check::{CheckReport, RepairMode};
use crate::compress::decompress;
use crate::entry::{self, L2Entry};
use crate::error::{Error, Result};
use crate::header::{CompressionType, Header, INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use crate::io::read_or_zero;
use crate::meta::{read_table, sync, Geo, Meta};
use crate::options::{CreateOptions, OpenOptions};
use crate::refcount::Refcounts;
use crate::snapshot::{parse_table, SnapshotInfo, MAX_TABLE_BYTES};

/// What `info` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// Bytes the file occupies on the host (allocated blocks).
    pub actual_size: u64,
    /// File length.
    pub file_length: u64,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// 2 or 3.
    pub version: u32,
    /// Refcount width in bits.
    pub refcount_bits: u32,
    /// Backing file name as stored.
    pub backing_file: Option<String>,
    /// Backing format from the header extension.
    pub backing_format: Option<String>,
    /// "zlib" or "zstd".
    pub compression_type: &'static str,
    /// Lazy refcounts compatible bit.
    pub lazy_refcounts: bool,
    /// Corrupt bit.
    pub corrupt: bool,
    /// Dirty bit (as found at open).
    pub dirty: bool,
    /// Internal snapshots.
    pub snapshots: Vec<SnapshotInfo>,
}

/// One extent of `map`: a run of guest bytes with the same allocation state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapExtent {
    /// Guest offset.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Contains data (allocated here or in a backing file).
    pub data: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// 0: this image, 1: its backing file, ...
    pub depth: u32,
    /// Host offset in this image's file for uncompressed allocated data.
    pub offset: Option<u64>,
    /// Data is compressed.
    pub compressed: bool,
}

/// An open qcow2 image. `Sync`: share it between I/O threads with `Arc`.
#[derive(Debug)]
pub struct Qcow2 {
    pub(crate) file: File,
    path: PathBuf,
    backing: Option<Box<dyn BlockImage>>,
    pub(crate) geo: Geo,
    read_only: bool,
    size: AtomicU64,
    pub(crate) meta: Mutex<Meta>,
    cv: Condvar,
    /// Held shared by data requests, exclusively by whole-image operations.
    pub(crate) gate: RwLock<()>,
    dirty_at_open: bool,
    compression: CompressionType,
    /// The header's corrupt bit (set: only `check -r all` may write).
    marked_corrupt: std::sync::atomic::AtomicBool,
}

thread_local! {
    /// Per-thread buffers: a cluster for copy-on-write, compressed input,
    /// decompressed output. Reused so the data path does not allocate.
    static COW_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    static COMPRESSED_BUF: RefCell<(Vec<u8>, Vec<u8>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Where a run of guest bytes comes from.
#[derive(Debug, Clone, Copy)]
enum Source {
    Backing,
    Zero,
    Host(u64),
    Compressed { host: u64, len: u64 },
}

impl Qcow2 {
    /// Opens an image.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Qcow2> {
        Qcow2::open_in_chain(path, opts, &mut Vec::new())
    }

    /// Opens an image that is part of a backing chain below `chain`.
    pub(crate) fn open_in_chain(
        path: &Path,
        opts: &OpenOptions,
        chain: &mut Vec<PathBuf>,
    ) -> Result<Qcow2> {
        if opts.direct {
            return Err(Error::Unsupported(
                "O_DIRECT through the library data path".into(),
            ));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!opts.read_only)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| Error::Open {
                path: path.into(),
                source,
            })?;
        let file_len = file_size(&file)?;
        let mut first = vec![0u8; 4096.min(file_len) as usize];
        read_or_zero(&file, &mut first, 0)?;
        let mut header = Header::parse(&first, file_len)?;
        if header.cluster_size() > first.len() as u64 && file_len > first.len() as u64 {
            first = vec![0u8; header.cluster_size().min(file_len) as usize];
            read_or_zero(&file, &mut first, 0)?;
            header = Header::parse(&first, file_len)?;
        }
        let marked_corrupt = header.incompatible_features & INCOMPAT_CORRUPT != 0;
        if marked_corrupt && !opts.read_only && !opts.repair {
            return Err(Error::MarkedCorrupt);
        }
        let geo = Geo::new(header.cluster_bits);
        let l1 = read_table(&file, header.l1_table_offset, header.l1_size as u64)?;
        let rc_cache = opts.refcount_cache_bytes.unwrap_or_else(|| {
            // Enough blocks for a 64 GiB file plus metadata.
            let clusters = ((64u64 << 30) / geo.cs).max(1);
            let per_block = (geo.cs * 8) >> header.refcount_order;
            clusters.div_ceil(per_block) * geo.cs + 4 * geo.cs
        });
        let rc = Refcounts::load(
            &file,
            header.refcount_order,
            header.cluster_bits,
            header.refcount_table_offset,
            header.refcount_table_clusters as u64,
            file_len,
            rc_cache,
        )?;
        let (snapshots, snapshots_len) = load_snapshots(&file, &header, file_len)?;
        let l2_bytes = opts.l2_cache_bytes.unwrap_or_else(|| {
            header.size.min(64 << 30).div_ceil(geo.cs) * 8 + 16 * geo.slice_bytes()
        });
        let backing = match (&header.backing_file, opts.open_backing) {
            (Some(name), true) => {
                let fmt = header.backing_format();
                chain.push(path.canonicalize().unwrap_or_else(|_| path.to_path_buf()));
                Some(open_backing(path, name, fmt.as_deref(), opts, chain)?)
            }
            _ => None,
        };
        let dirty_at_open = header.incompatible_features & INCOMPAT_DIRTY != 0;
        let compression = header.compression_type;
        let meta = Meta {
            geo,
            l1,
            l1_dirty: Default::default(),
            l2: Cache::new((l2_bytes / geo.slice_bytes()) as usize),
            rc,
            snapshots,
            snapshots_len,
            inflight: Default::default(),
            pending_release: Vec::new(),
            header_dirty: false,
            read_only: opts.read_only,
            header,
        };
        let size = meta.header.size;
        let img = Qcow2 {
            file,
            path: path.to_path_buf(),
            backing,
            geo,
            read_only: opts.read_only,
            size: AtomicU64::new(size),
            meta: Mutex::new(meta),
            cv: Condvar::new(),
            gate: RwLock::new(()),
            dirty_at_open,
            compression,
            marked_corrupt: marked_corrupt.into(),
        };
        if !opts.read_only && !marked_corrupt {
            img.open_fixups()?;
        }
        Ok(img)
    }

    /// Read-write open: rebuild refcounts of a dirty image, drop autoclear bits.
    fn open_fixups(&self) -> Result<()> {
        let mut m = self.meta.lock();
        if m.header.incompatible_features & INCOMPAT_DIRTY != 0 {
            let state = crate::rebuild::State::current(&m);
            crate::rebuild::commit(&self.file, &mut m, state)?;
        }
        if m.header.autoclear_features != 0 {
            m.header.autoclear_features = 0;
            m.write_header(&self.file)?;
            sync(&self.file)?;
        }
        Ok(())
    }

    /// Creates a new empty image (the file must not exist).
    pub fn create(path: &Path, opts: &CreateOptions) -> Result<()> {
        crate::create::create(path, opts)
    }

    /// The image file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Virtual size.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.geo.cs
    }

    /// Header summary and snapshot list.
    pub fn info(&self) -> ImageInfo {
        let m = self.meta.lock();
        let h = &m.header;
        let md = self.file.metadata().ok();
        ImageInfo {
            virtual_size: h.size,
            actual_size: md.as_ref().map(|m| m.blocks() * 512).unwrap_or(0),
            file_length: md.as_ref().map(|m| m.len()).unwrap_or(0),
            cluster_size: h.cluster_size(),
            version: h.version,
            refcount_bits: 1 << h.refcount_order,
            backing_file: h.backing_file.clone(),
            backing_format: h.backing_format(),
            compression_type: match h.compression_type {
                CompressionType::Zlib => "zlib",
                CompressionType::Zstd => "zstd",
            },
            lazy_refcounts: h.compatible_features & crate::header::COMPAT_LAZY_REFCOUNTS != 0,
            corrupt: h.incompatible_features & INCOMPAT_CORRUPT != 0,
            dirty: self.dirty_at_open,
            snapshots: m.snapshots.clone(),
        }
    }

    /// The backing image, if one is open.
    pub fn backing(&self) -> Option<&dyn BlockImage> {
        self.backing.as_deref()
    }

    fn wait_not_inflight<'a>(&self, mut m: MutexGuard<'a, Meta>, gc: u64) -> MutexGuard<'a, Meta> {
        while m.inflight.contains(&gc) {
            self.cv.wait(&mut m);
        }
        m
    }

    /// Maps a run starting at guest offset `off` (at most `max` bytes, not
    /// beyond the run of identically mapped clusters).
    fn map_run(&self, m: &mut Meta, off: u64, max: u64) -> Result<(Source, u64)> {
        let cs = self.geo.cs;
        let gc = off >> self.geo.cluster_bits;
        let in_c = off & (cs - 1);
        let (e, _) = m.lookup(&self.file, gc)?;
        let src = match self.source_of(e) {
            Source::Host(h) => Source::Host(h + in_c),
            s => s,
        };
        let mut n = (cs - in_c).min(max);
        if matches!(src, Source::Compressed { .. }) {
            return Ok((src, n));
        }
        // Extend over following clusters mapped the same way (one lookup each).
        let mut next = gc + 1;
        while n < max && !m.inflight.contains(&next) {
            let (e2, _) = m.lookup(&self.file, next)?;
            let same = match (src, e2) {
                (Source::Backing, L2Entry::Unallocated) => true,
                (Source::Zero, L2Entry::Unallocated) => self.backing.is_none(),
                (Source::Zero, L2Entry::Zero(_)) => true,
                (Source::Host(h), L2Entry::Normal { host, .. }) => host == h + n,
                _ => false,
            };
            if !same {
                break;
            }
            n = (n + cs).min(max);
            next += 1;
        }
        Ok((src, n))
    }

    fn read_backing(&self, buf: &mut [u8], off: u64) -> Result<()> {
        let Some(b) = &self.backing else {
            buf.fill(0);
            return Ok(());
        };
        let bsize = b.size();
        let avail = bsize.saturating_sub(off).min(buf.len() as u64) as usize;
        if avail > 0 {
            b.read_at(&mut buf[..avail], off)?;
        }
        buf[avail..].fill(0);
        Ok(())
    }

    /// Where the data of a cluster with L2 entry `e` comes from (`Host` is
    /// the cluster's start).
    fn source_of(&self, e: L2Entry) -> Source {
        match e {
            L2Entry::Unallocated if self.backing.is_some() => Source::Backing,
            L2Entry::Unallocated | L2Entry::Zero(_) => Source::Zero,
            L2Entry::Normal { host, .. } => Source::Host(host),
            L2Entry::Compressed { host, len } => Source::Compressed { host, len },
        }
    }

    /// Decompresses a cluster; `len` is bounded by the descriptor encoding
    /// (at most 4 MiB) and bytes past the end of the file read as zeros.
    fn read_compressed(&self, host: u64, len: u64, out: &mut [u8], in_c: usize) -> Result<()> {
        let cs = self.geo.cs as usize;
        COMPRESSED_BUF.with(|s| {
            let mut s = s.borrow_mut();
            let (cbuf, ubuf) = &mut *s;
            cbuf.resize(len as usize, 0);
            read_or_zero(&self.file, cbuf, host)?;
            ubuf.resize(cs, 0);
            decompress(self.compression, cbuf, ubuf, host)?;
            out.copy_from_slice(&ubuf[in_c..in_c + out.len()]);
            Ok(())
        })
    }

    fn read_source(&self, src: Source, buf: &mut [u8], off: u64) -> Result<()> {
        match src {
            Source::Zero => {
                buf.fill(0);
                Ok(())
            }
            Source::Backing => self.read_backing(buf, off),
            // Bytes of a cluster past the end of the file read as zeros.
            Source::Host(h) => read_or_zero(&self.file, buf, h),
            Source::Compressed { host, len } => {
                let in_c = (off & (self.geo.cs - 1)) as usize;
                self.read_compressed(host, len, buf, in_c)
            }
        }
    }

    /// Reads guest bytes.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let _g = self.gate.read();
        check_range(offset, buf.len() as u64, self.size())?;
        let mut pos = 0usize;
        while pos < buf.len() {
            let off = offset + pos as u64;
            let (src, n) = {
                let m = self.meta.lock();
                let mut m = self.wait_not_inflight(m, off >> self.geo.cluster_bits);
                self.map_run(&mut m, off, (buf.len() - pos) as u64)?
            };
            let n = n as usize;
            self.read_source(src, &mut buf[pos..pos + n], off)?;
            pos += n;
        }
        Ok(())
    }

    /// Writes guest bytes (copy-on-write for shared clusters).
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        let _g = self.gate.read();
        check_range(offset, buf.len() as u64, self.size())?;
        let mut pos = 0usize;
        while pos < buf.len() {
            let off = offset + pos as u64;
            pos += self.write_chunk(&buf[pos..], off)?;
        }
        Ok(())
    }

    /// Writes from the start of `buf` at `off`, at most up to the end of a
    /// run of in-place clusters (or one cluster when allocating); returns
    /// the bytes written.
    fn write_chunk(&self, buf: &[u8], off: u64) -> Result<usize> {
        let cs = self.geo.cs;
        let gc = off >> self.geo.cluster_bits;
        let in_c = off & (cs - 1);
        let m = self.meta.lock();
        let mut m = self.wait_not_inflight(m, gc);
        let (old, old_raw) = m.lookup(&self.file, gc)?;
        if let L2Entry::Normal { host, copied: true } = old {
            // In place; extend over contiguous in-place clusters.
            let mut n = (cs - in_c).min(buf.len() as u64);
            let mut next = gc + 1;
            while n < buf.len() as u64 && !m.inflight.contains(&next) {
                match m.lookup(&self.file, next)?.0 {
                    L2Entry::Normal {
                        host: h2,
                        copied: true,
                    } if h2 == host + (next - gc) * cs => {}
                    _ => break,
                }
                n = (n + cs).min(buf.len() as u64);
                next += 1;
            }
            drop(m);
            self.file
                .write_all_at(&buf[..n as usize], host + in_c)
                .map_err(|e| Error::io("write", e))?;
            return Ok(n as usize);
        }
        // Allocate a new cluster; COW the rest of it from the old mapping.
        m.ensure_l2_writable(&self.file, gc)?;
        // A cluster past everything ever allocated is a hole: it reads as zeros.
        let end_before = m.rc.end();
        let new_idx = m.rc.alloc(&self.file, 1)?;
        let fresh = new_idx >= end_before;
        let host = new_idx << self.geo.cluster_bits;
        m.inflight.insert(gc);
        drop(m);
        let n = (cs - in_c).min(buf.len() as u64) as usize;
        let res = self.fill_new_cluster(old, gc, host, &buf[..n], in_c as usize, fresh);
        let mut m = self.meta.lock();
        m.inflight.remove(&gc);
        let res = res.and_then(|()| {
            m.set_l2(&self.file, gc, entry::normal(host, true))?;
            if let Some((first, cnt)) = L2Entry::host_clusters(old_raw, self.geo.cluster_bits) {
                m.pending_release.extend(first..first + cnt);
            }
            Ok(())
        });
        if res.is_err() {
            // Never published: give the cluster back right away.
            let _ = m.rc.add(&self.file, new_idx, -1);
        }
        drop(m);
        self.cv.notify_all();
        res.map(|()| n)
    }

    /// Writes a new cluster at `host`: `data` at `in_c`, the rest from `old`
    /// (skipped when `fresh`, i.e. past the end of the file, and `old` reads as zeros).
    fn fill_new_cluster(
        &self,
        old: L2Entry,
        gc: u64,
        host: u64,
        data: &[u8],
        in_c: usize,
        fresh: bool,
    ) -> Result<()> {
        let cs = self.geo.cs as usize;
        let zero_source = matches!(self.source_of(old), Source::Zero);
        if data.len() == cs || (fresh && zero_source) {
            // Nothing to copy: the rest of a fresh cluster already reads as zeros.
            return self
                .file
                .write_all_at(data, host + in_c as u64)
                .map_err(|e| Error::io("write", e));
        }
        let mut cluster = COW_BUF.with(|c| std::mem::take(&mut *c.borrow_mut()));
        cluster.resize(cs, 0);
        let base = gc << self.geo.cluster_bits;
        let r = (|| {
            match self.source_of(old) {
                Source::Host(h) => {
                    // Only the parts the guest does not overwrite.
                    read_or_zero(&self.file, &mut cluster[..in_c], h)?;
                    let tail = in_c + data.len();
                    read_or_zero(&self.file, &mut cluster[tail..], h + tail as u64)?;
                }
                src => self.read_source(src, &mut cluster, base)?,
            }
            cluster[in_c..in_c + data.len()].copy_from_slice(data);
            self.file
                .write_all_at(&cluster, host)
                .map_err(|e| Error::io("write", e))
        })();
        COW_BUF.with(|c| *c.borrow_mut() = cluster);
        r
    }

    /// Makes a range read as zeros.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.unmap(offset, len, true)
    }

    /// Deallocates fully covered clusters of a range (they read as zeros, or
    /// as the backing file's data on v2 images with a backing file).
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.unmap(offset, len, false)
    }

    fn unmap(&self, offset: u64, len: u64, zero: bool) -> Result<()> {
        self.check_writable()?;
        check_range(offset, len, self.size())?;
        let cs = self.geo.cs;
        let end = offset + len;
        let first_full = offset.next_multiple_of(cs);
        // Clusters fully covered, the last one may end at the disk end.
        let size = self.size();
        let full_end = if end == size {
            end.next_multiple_of(cs)
        } else {
            end & !(cs - 1)
        };
        if first_full >= full_end {
            return if zero {
                self.write_zero_bytes(offset, len)
            } else {
                Ok(())
            };
        }
        if zero {
            self.write_zero_bytes(offset, first_full - offset)?;
            if full_end < end {
                self.write_zero_bytes(full_end, end - full_end)?;
            }
        }
        let _g = self.gate.read();
        let v3 = self.meta.lock().header.version >= 3;
        for gc in (first_full >> self.geo.cluster_bits)..(full_end >> self.geo.cluster_bits) {
            let m = self.meta.lock();
            let mut m = self.wait_not_inflight(m, gc);
            let (old, raw) = m.lookup(&self.file, gc)?;
            // With a backing file, only a zero entry hides the backing data.
            let want = match (self.backing.is_some(), v3) {
                (false, _) => 0,
                (true, true) => entry::ZERO,
                (true, false) if zero => {
                    drop(m);
                    self.write_zero_bytes_locked(gc << self.geo.cluster_bits, cs)?;
                    continue;
                }
                (true, false) => 0,
            };
            if raw == want || (want == 0 && old == L2Entry::Unallocated) {
                continue;
            }
            m.ensure_l2_writable(&self.file, gc)?;
            m.set_l2(&self.file, gc, want)?;
            if let Some((first, cnt)) = L2Entry::host_clusters(raw, self.geo.cluster_bits) {
                m.pending_release.extend(first..first + cnt);
            }
        }
        Ok(())
    }

    fn write_zero_bytes(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let zeros = vec![0u8; len as usize];
        self.write_at(&zeros, offset)
    }

    /// Like [`Self::write_zero_bytes`] for callers already holding the gate.
    fn write_zero_bytes_locked(&self, offset: u64, len: u64) -> Result<()> {
        let zeros = vec![0u8; len as usize];
        let mut pos = 0usize;
        while pos < zeros.len() {
            pos += self.write_chunk(&zeros[pos..], offset + pos as u64)?;
        }
        Ok(())
    }

    /// Makes all completed writes durable (data + metadata).
    pub fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let mut m = self.meta.lock();
        if m.is_dirty() {
            m.writeback(&self.file)
        } else {
            sync(&self.file)
        }
    }

    /// Grows the virtual disk to `new_size` bytes (a multiple of 512).
    pub fn resize(&self, new_size: u64) -> Result<()> {
        self.check_writable()?;
        let _g = self.gate.write();
        let mut m = self.meta.lock();
        let old = m.header.size;
        if new_size < old {
            return Err(Error::InvalidArgument(format!(
                "shrinking from {old} to {new_size} bytes is not supported"
            )));
        }
        if !new_size.is_multiple_of(512) {
            return Err(Error::InvalidArgument(format!(
                "size {new_size} is not a multiple of 512"
            )));
        }
        let needed = self.geo.l1_entries_for(new_size);
        if needed * 8 > crate::header::MAX_L1_BYTES || new_size > crate::header::MAX_DISK_SIZE {
            return Err(Error::InvalidArgument(format!(
                "size {new_size} is too large"
            )));
        }
        if m.header.version < 3 && !m.snapshots.is_empty() {
            // As qemu-img: v2 snapshots do not record their disk size.
            return Err(Error::Unsupported(
                "resizing a v2 image that has snapshots".into(),
            ));
        }
        m.writeback(&self.file)?;
        if needed <= m.l1.len() as u64 {
            m.header.size = new_size;
            m.write_header(&self.file)?;
            sync(&self.file)?;
        } else {
            let mut state = crate::rebuild::State::current(&m);
            state.active_l1.resize(needed as usize, 0);
            state.size = new_size;
            crate::rebuild::commit(&self.file, &mut m, state)?;
        }
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }

    /// Lists internal snapshots.
    pub fn snapshots(&self) -> Vec<SnapshotInfo> {
        self.meta.lock().snapshots.clone()
    }

    /// Creates an internal snapshot of the current disk state.
    pub fn snapshot_create(&self, name: &str) -> Result<SnapshotInfo> {
        self.whole_image_op(|m| crate::rebuild::snapshot_create(&self.file, m, name))
    }

    /// Reverts the disk to a snapshot (by id or name); the disk takes the
    /// snapshot's size.
    pub fn snapshot_apply(&self, id_or_name: &str) -> Result<()> {
        self.whole_image_op(|m| crate::rebuild::snapshot_apply(&self.file, m, id_or_name))
    }

    /// Deletes a snapshot (by id or name).
    pub fn snapshot_delete(&self, id_or_name: &str) -> Result<()> {
        self.whole_image_op(|m| crate::rebuild::snapshot_delete(&self.file, m, id_or_name))
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        if self.marked_corrupt.load(Ordering::Relaxed) {
            return Err(Error::MarkedCorrupt);
        }
        Ok(())
    }

    fn whole_image_op<T>(&self, f: impl FnOnce(&mut Meta) -> Result<T>) -> Result<T> {
        self.check_writable()?;
        let _g = self.gate.write();
        let mut m = self.meta.lock();
        m.writeback(&self.file)?;
        let r = f(&mut m);
        self.size.store(m.header.size, Ordering::Release);
        r
    }

    /// Checks metadata consistency; with `repair`, fixes what it may.
    pub fn check(&self, repair: Option<RepairMode>) -> Result<CheckReport> {
        if repair.is_some() && self.read_only {
            return Err(Error::ReadOnly);
        }
        let _g = self.gate.write();
        let mut m = self.meta.lock();
        m.writeback(&self.file)?;
        let report = crate::rebuild::check(&self.file, &mut m, repair)?;
        let clean = report.corruptions == report.corruptions_fixed && report.check_errors == 0;
        if repair == Some(RepairMode::All) && clean && self.marked_corrupt.load(Ordering::Relaxed) {
            m.header.incompatible_features &= !INCOMPAT_CORRUPT;
            m.write_header(&self.file)?;
            sync(&self.file)?;
            self.marked_corrupt.store(false, Ordering::Relaxed);
        }
        Ok(report)
    }

    /// Allocation map of `[offset, offset+len)`.
    pub fn map(&self, offset: u64, len: u64) -> Result<Vec<MapExtent>> {
        let _g = self.gate.read();
        check_range(offset, len, self.size())?;
        let mut out: Vec<MapExtent> = Vec::new();
        let mut pos = offset;
        while pos < offset + len {
            let (src, n) = {
                let mut m = self.meta.lock();
                self.map_run(&mut m, pos, offset + len - pos)?
            };
            let (data, zero, depth, host, compressed) = match src {
                Source::Backing => (true, false, 1, None, false),
                Source::Zero => (false, true, 0, None, false),
                Source::Host(h) => (true, false, 0, Some(h), false),
                Source::Compressed { .. } => (true, false, 0, None, true),
            };
            let ext = MapExtent {
                start: pos,
                length: n,
                data,
                zero,
                depth,
                offset: host,
                compressed,
            };
            match out.last_mut() {
                Some(l)
                    if l.data == ext.data
                        && l.zero == ext.zero
                        && l.depth == ext.depth
                        && l.compressed == ext.compressed
                        && match (l.offset, ext.offset) {
                            (Some(a), Some(b)) => a + l.length == b,
                            (None, None) => true,
                            _ => false,
                        } =>
                {
                    l.length += n
                }
                _ => out.push(ext),
            }
            pos += n;
        }
        Ok(out)
    }
}

fn load_snapshots(file: &File, h: &Header, file_len: u64) -> Result<(Vec<SnapshotInfo>, u64)> {
    if h.nb_snapshots == 0 {
        return Ok((Vec::new(), 0));
    }
    let avail = file_len
        .saturating_sub(h.snapshots_offset)
        .min(MAX_TABLE_BYTES as u64) as usize;
    let mut want = (h.nb_snapshots as usize * 256).clamp(4096, MAX_TABLE_BYTES);
    loop {
        let n = want.min(avail);
        let mut buf = vec![0u8; n];
        read_or_zero(file, &mut buf, h.snapshots_offset)?;
        match parse_table(&buf, h.nb_snapshots, h.version, h.size) {
            Ok((s, len)) => return Ok((s, len as u64)),
            Err(e) if n >= avail => return Err(e),
            Err(_) => want *= 4,
        }
    }
}

impl BlockImage for Qcow2 {
    fn size(&self) -> u64 {
        Qcow2::size(self)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        Qcow2::read_at(self, buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        Qcow2::write_at(self, buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        Qcow2::write_zeroes(self, offset, len)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        Qcow2::discard(self, offset, len)
    }
    fn flush(&self) -> Result<()> {
        Qcow2::flush(self)
    }
    fn format(&self) -> ImageFormat {
        ImageFormat::Qcow2
    }
}

impl Drop for Qcow2 {
    fn drop(&mut self) {
        if !self.read_only {
            let mut m = self.meta.lock();
            let _ = m.writeback(&self.file);
        }
    }
}
