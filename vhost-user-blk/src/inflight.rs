//! Inflight I/O tracking for split virtqueues (vhost-user spec, "Inflight
//! I/O tracking"): a shared memory region, kept by the frontend across
//! backend restarts, that records which descriptor heads were taken from the
//! available ring and not yet returned, so that a restarted backend
//! resubmits exactly those, oldest first, and nothing twice.
//!
//! Layout per queue (little-endian, `queue_region_size` bytes, 64-byte
//! aligned): a 16-byte header `{ features: u64, version: u16, desc_num: u16,
//! last_batch_head: u16, used_idx: u16 }` then `desc_num` 16-byte entries
//! `{ inflight: u8, padding: [u8; 5], next: u16, counter: u64 }`.
//!
//! The worker calls [`QueueInflight::begin`] right after taking a head from
//! the available ring, and [`QueueInflight::before_used`] /
//! [`QueueInflight::after_used`] around publishing it in the used ring
//! (one head per used-index update). [`QueueInflight::recover`] applies the
//! spec's reconnect rules. This module knows nothing of vhost-user.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, VolatileMemory};

/// Size of a queue region's header.
pub const HEADER_SIZE: usize = 16;
/// Size of one descriptor entry.
pub const ENTRY_SIZE: usize = 16;
/// Queue regions are aligned to this.
pub const ALIGNMENT: usize = 64;
/// The region version this backend writes.
pub const VERSION: u16 = 1;
/// Largest split virtqueue.
pub const MAX_QUEUE_SIZE: u16 = 32768;

const OFF_VERSION: usize = 8;
const OFF_DESC_NUM: usize = 10;
const OFF_LAST_BATCH_HEAD: usize = 12;
const OFF_USED_IDX: usize = 14;
const ENTRY_INFLIGHT: usize = 0;
const ENTRY_NEXT: usize = 6;
const ENTRY_COUNTER: usize = 8;

/// Errors of setting up an inflight region.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    /// Queue count or size out of range.
    #[error("bad inflight layout: {num_queues} queue(s) of {queue_size}")]
    Layout {
        /// Queues.
        num_queues: u16,
        /// Descriptors per queue.
        queue_size: u16,
    },
    /// The region is smaller than the layout needs, or past the end of the file.
    #[error(
        "inflight region of {size} bytes at {offset} does not fit (need {need}, file has {file})"
    )]
    TooSmall {
        /// Region size.
        size: u64,
        /// Region offset in the file.
        offset: u64,
        /// Bytes the layout needs.
        need: u64,
        /// File size.
        file: u64,
    },
    /// Creating or sizing the memfd failed.
    #[error("creating the inflight memfd")]
    Create(#[source] std::io::Error),
    /// Mapping failed.
    #[error("mapping the inflight region")]
    Map(#[source] vm_memory::mmap::MmapRegionError),
}

/// Bytes of one queue's region.
pub fn queue_region_size(queue_size: u16) -> usize {
    (HEADER_SIZE + ENTRY_SIZE * usize::from(queue_size)).next_multiple_of(ALIGNMENT)
}

fn check_layout(num_queues: u16, queue_size: u16) -> Result<u64, InflightError> {
    if num_queues == 0 || queue_size == 0 || queue_size > MAX_QUEUE_SIZE {
        return Err(InflightError::Layout {
            num_queues,
            queue_size,
        });
    }
    Ok(u64::from(num_queues) * queue_region_size(queue_size) as u64)
}

/// Creates a zeroed memfd for `num_queues` queues of `queue_size` and
/// returns it with its size (what GET_INFLIGHT_FD hands to the frontend).
pub fn create(num_queues: u16, queue_size: u16) -> Result<(File, u64), InflightError> {
    let size = check_layout(num_queues, queue_size)?;
    // SAFETY: the name is a NUL-terminated string; the call has no other
    // memory effects.
    let fd = unsafe {
        libc::memfd_create(
            c"outboard-inflight".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(InflightError::Create(std::io::Error::last_os_error()));
    }
    // SAFETY: memfd_create returned a fresh fd that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(InflightError::Create)?;
    // Neither side can resize it under the other's mapping afterwards.
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on an fd we own, with an integer argument.
    if unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, seals) } < 0 {
        return Err(InflightError::Create(std::io::Error::last_os_error()));
    }
    Ok((file, size))
}

/// A mapped inflight region shared with the frontend.
#[derive(Debug)]
pub struct InflightRegion {
    map: MmapRegion<()>,
    num_queues: u16,
    queue_size: u16,
}

impl InflightRegion {
    /// Maps `size` bytes at `offset` of `file` (SET_INFLIGHT_FD), after
    /// checking that the layout fits in the region and the region in the file.
    pub fn map(
        file: File,
        offset: u64,
        size: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<InflightRegion, InflightError> {
        let need = check_layout(num_queues, queue_size)?;
        let file_len = file.metadata().map_err(InflightError::Create)?.len();
        let too_small = InflightError::TooSmall {
            size,
            offset,
            need,
            file: file_len,
        };
        if size < need || offset.checked_add(size).is_none_or(|end| end > file_len) {
            return Err(too_small);
        }
        let len = usize::try_from(need).map_err(|_| too_small)?;
        let map = MmapRegion::from_file(FileOffset::new(file, offset), len)
            .map_err(InflightError::Map)?;
        Ok(InflightRegion {
            map,
            num_queues,
            queue_size,
        })
    }

    /// Number of queues the region covers.
    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    /// The tracker of queue `index`.
    pub fn queue(self: &Arc<Self>, index: u16) -> Option<QueueInflight> {
        (index < self.num_queues).then(|| QueueInflight {
            region: self.clone(),
            base: usize::from(index) * queue_region_size(self.queue_size),
            desc_num: self.queue_size,
            counter: 0,
        })
    }
}

/// The inflight record of one queue.
#[derive(Debug)]
pub struct QueueInflight {
    region: Arc<InflightRegion>,
    base: usize,
    desc_num: u16,
    counter: u64,
}

/// Offsets are computed from the validated layout and aligned, so these
/// lookups only fail on a bug.
fn atomic<T: vm_memory::AtomicInteger>(map: &MmapRegion<()>, off: usize) -> Option<&T> {
    map.get_atomic_ref::<T>(off).ok()
}

impl QueueInflight {
    fn header16(&self, off: usize) -> Option<&AtomicU16> {
        atomic(&self.region.map, self.base + off)
    }

    fn entry(&self, head: u16) -> usize {
        self.base + HEADER_SIZE + usize::from(head) * ENTRY_SIZE
    }

    fn flag(&self, head: u16) -> Option<&AtomicU8> {
        if head >= self.desc_num {
            return None;
        }
        atomic(&self.region.map, self.entry(head) + ENTRY_INFLIGHT)
    }

    fn next(&self, head: u16) -> Option<&AtomicU16> {
        if head >= self.desc_num {
            return None;
        }
        atomic(&self.region.map, self.entry(head) + ENTRY_NEXT)
    }

    fn counter(&self, head: u16) -> Option<&AtomicU64> {
        if head >= self.desc_num {
            return None;
        }
        atomic(&self.region.map, self.entry(head) + ENTRY_COUNTER)
    }

    /// Number of descriptor entries.
    pub fn desc_num(&self) -> u16 {
        self.desc_num
    }

    /// Records that `head` was taken from the available ring.
    pub fn begin(&mut self, head: u16) {
        if let (Some(c), Some(f)) = (self.counter(head), self.flag(head)) {
            c.store(self.counter.to_le(), Ordering::Release);
            f.store(1, Ordering::Release);
        }
        self.counter = self.counter.wrapping_add(1);
    }

    /// Before `head` is written to the used ring: it becomes the last batch.
    pub fn before_used(&self, head: u16) {
        if let (Some(next), Some(last)) = (self.next(head), self.header16(OFF_LAST_BATCH_HEAD)) {
            next.store(last.load(Ordering::Acquire), Ordering::Release);
            last.store(head.to_le(), Ordering::Release);
        }
    }

    /// After the used index became `used_idx` with `head` in it.
    pub fn after_used(&self, head: u16, used_idx: u16) {
        if let Some(f) = self.flag(head) {
            f.store(0, Ordering::Release);
        }
        if let Some(u) = self.header16(OFF_USED_IDX) {
            u.store(used_idx.to_le(), Ordering::Release);
        }
    }

    /// Whether `head` is recorded as in flight.
    pub fn is_inflight(&self, head: u16) -> bool {
        self.flag(head)
            .is_some_and(|f| f.load(Ordering::Acquire) == 1)
    }

    /// Applies the reconnect rules given the used ring's index: clears the
    /// entries of a batch that reached the used ring before the previous
    /// instance could clear them, and returns the heads still in flight that
    /// are valid for a queue of `queue_size`, oldest first. A region never
    /// used before (version 0) is initialised and yields nothing.
    pub fn recover(&mut self, ring_used_idx: u16, queue_size: u16) -> Vec<u16> {
        let (Some(version), Some(used)) = (self.header16(OFF_VERSION), self.header16(OFF_USED_IDX))
        else {
            return Vec::new();
        };
        if u16::from_le(version.load(Ordering::Acquire)) == 0 {
            if let Some(d) = self.header16(OFF_DESC_NUM) {
                d.store(self.desc_num.to_le(), Ordering::Release);
            }
            used.store(ring_used_idx.to_le(), Ordering::Release);
            version.store(VERSION.to_le(), Ordering::Release);
            self.counter = 0;
            return Vec::new();
        }
        let recorded = u16::from_le(used.load(Ordering::Acquire));
        if recorded != ring_used_idx {
            let batch = ring_used_idx.wrapping_sub(recorded);
            let mut head = self
                .header16(OFF_LAST_BATCH_HEAD)
                .map_or(0, |h| u16::from_le(h.load(Ordering::Acquire)));
            for _ in 0..batch.min(self.desc_num) {
                let (Some(f), Some(next)) = (self.flag(head), self.next(head)) else {
                    break;
                };
                f.store(0, Ordering::Release);
                head = u16::from_le(next.load(Ordering::Acquire));
            }
            used.store(ring_used_idx.to_le(), Ordering::Release);
        }
        let mut heads: Vec<(u64, u16)> = Vec::new();
        for head in 0..self.desc_num {
            if !self.is_inflight(head) {
                continue;
            }
            if head >= queue_size {
                // Not a head of this ring: forget it.
                if let Some(f) = self.flag(head) {
                    f.store(0, Ordering::Release);
                }
                continue;
            }
            let c = self
                .counter(head)
                .map_or(0, |c| u64::from_le(c.load(Ordering::Acquire)));
            heads.push((c, head));
        }
        heads.sort_unstable();
        self.counter = heads.last().map_or(0, |&(c, _)| c.wrapping_add(1));
        heads.into_iter().map(|(_, h)| h).collect()
    }
}
