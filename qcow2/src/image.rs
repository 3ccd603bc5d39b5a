//! [`Qcow2`]: an open image.
#![allow(clippy::todo, unused)]

use std::path::Path;

use crate::backing::{BlockImage, ImageFormat};
use crate::check::{CheckReport, RepairMode};
use crate::error::Result;
use crate::options::{CreateOptions, OpenOptions};
use crate::snapshot::SnapshotInfo;

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
pub struct Qcow2 {}

impl Qcow2 {
    /// Opens an image.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Qcow2> {
        todo!()
    }
    /// Creates a new empty image (the file must not exist).
    pub fn create(path: &Path, opts: &CreateOptions) -> Result<()> {
        crate::create::create(path, opts)
    }
    /// Virtual size.
    pub fn size(&self) -> u64 {
        todo!()
    }
    /// Header summary and snapshot list.
    pub fn info(&self) -> ImageInfo {
        todo!()
    }
    /// Reads guest bytes.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        todo!()
    }
    /// Writes guest bytes (copy-on-write for shared clusters).
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        todo!()
    }
    /// Makes a range read as zeros.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        todo!()
    }
    /// Deallocates fully covered clusters of a range.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        todo!()
    }
    /// Makes all completed writes durable (data + metadata).
    pub fn flush(&self) -> Result<()> {
        todo!()
    }
    /// Grows the virtual disk.
    pub fn resize(&self, new_size: u64) -> Result<()> {
        todo!()
    }
    /// Lists internal snapshots.
    pub fn snapshots(&self) -> Vec<SnapshotInfo> {
        todo!()
    }
    /// Creates an internal snapshot of the current disk state.
    pub fn snapshot_create(&self, name: &str) -> Result<SnapshotInfo> {
        todo!()
    }
    /// Reverts the disk to a snapshot (by id or name).
    pub fn snapshot_apply(&self, id_or_name: &str) -> Result<()> {
        todo!()
    }
    /// Deletes a snapshot (by id or name).
    pub fn snapshot_delete(&self, id_or_name: &str) -> Result<()> {
        todo!()
    }
    /// Checks metadata consistency; with `repair`, fixes what it may.
    pub fn check(&self, repair: Option<RepairMode>) -> Result<CheckReport> {
        todo!()
    }
    /// Allocation map of `[offset, offset+len)`.
    pub fn map(&self, offset: u64, len: u64) -> Result<Vec<MapExtent>> {
        todo!()
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
