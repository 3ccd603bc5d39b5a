//! A qcow2 image library: v2 and v3 images, internal snapshots, backing
//! chains, compressed (zlib/zstd) clusters on read, and a thread-safe data
//! path. It knows nothing of virtio or vhost-user.
//!
//! # Modules
//! - [`header`]: the fixed header, feature bits and header extensions.
//! - [`options`]: [`OpenOptions`] and [`CreateOptions`].
//! - [`backing`]: the [`BlockImage`] trait, [`RawImage`], backing chains.
//! - `entry`: L1/L2 entry encoding.
//! - `cache`: the LRU cache of L2 slices and refcount blocks.
//! - `refcount`: refcount table, refcount blocks and the cluster allocator.
//! - `snapshot`: the on-disk snapshot table.
//! - `compress`: zlib/zstd decompression of compressed clusters.
//! - [`image`]: [`Qcow2`], the open image: read/write/discard/flush, resize,
//!   snapshots, check and repair.
//! - `meta`: cached metadata under the image mutex and its ordered writeback.
//! - `rebuild`: snapshot create/apply/delete, L1 growth, shrinking, refcount rebuild and
//!   check, all through one atomic metadata switch.
//! - `create`: writing a new empty image.
//! - [`check`]: check report types.
//!
//! # Concurrency
//! [`Qcow2`] is `Sync`. Metadata (L1, caches, allocator) sits behind one
//! mutex that is held only for lookups and allocation decisions, never
//! across guest data I/O: two threads reading or writing distinct clusters
//! do their `pread`/`pwrite` in parallel. A cluster that is being allocated
//! (copy-on-write in flight) is marked in-flight; other requests touching the
//! same guest cluster wait for it. Operations that change the whole image
//! (snapshots, resize) take an exclusive gate that data requests hold shared.
//!
//! # Crash ordering
//! Metadata is cached and written back on [`Qcow2::flush`] (and on cache
//! eviction), in this order, each step made durable with `fdatasync` before
//! the next:
//! 1. guest data of newly allocated clusters (written before they are
//!    published in an L2 table, so a published cluster never holds garbage);
//! 2. refcount blocks, then the refcount table (a new table is written to a
//!    fresh place and the header switched to it afterwards);
//! 3. L2 tables, then the L1 table, then the header fields;
//! 4. only then are clusters that lost a reference (copy-on-write sources,
//!    discarded clusters, replaced tables) decremented; those decrements are
//!    written by the next flush.
//!
//! So on disk a refcount is never lower than the number of references to a
//! cluster: a crash at any point can leak clusters (repairable with
//! `check -r leaks`) but never corrupt the image.
//!
//! Snapshot create, apply and delete, L1 growth, shrinking, the refcount rebuild of a
//! dirty image and `check -r` change refcounts *and* COPIED flags at once,
//! which no ordering of in-place writes can do without a window that
//! `qemu-img check` reports as corruption. They write a complete new set of
//! roots (active L1 + L2 copies, snapshot table, refcount table + blocks) to
//! unused space, `fdatasync`, and switch to it with one write of the
//! header's fixed fields (a single sector). See `rebuild`.

pub mod backing;
mod cache;
pub mod check;
mod compress;
mod create;
mod entry;
pub mod error;
pub mod header;
pub mod image;
pub mod io;
mod meta;
pub mod options;
mod rebuild;
mod refcount;
mod snapshot;

pub use backing::{open_image, BlockImage, ImageFormat, RawImage};
pub use check::{CheckReport, RepairMode};
pub use error::{Error, Result};
pub use image::{ImageInfo, MapExtent, Qcow2};
pub use options::{CreateOptions, OpenOptions};
pub use snapshot::SnapshotInfo;
