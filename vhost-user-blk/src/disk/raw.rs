//! The raw backend: reads and writes become io_uring `read`/`write`
//! (`readv`/`writev` for several segments) straight into guest memory, on
//! the disk file registered with the ring; a FLUSH is an `fdatasync` that
//! drains the operations before it. Discard and write-zeroes run
//! synchronously (`fallocate`) and complete through the same path.

use std::os::unix::io::RawFd;
use std::sync::Arc;

use io_uring::{opcode, squeue, types, IoUring};

use super::{
    BackendError, ByteRange, Capabilities, Completion, Disk, DiskBackend, DiskOp, OpError,
};

/// The disk's file in the ring's registered file table.
const DISK: types::Fixed = types::Fixed(0);

/// Per-tag state of an operation in flight.
#[derive(Debug, Default)]
struct Slot {
    op: &'static str,
    /// The iovec array the kernel reads for readv/writev.
    iov: Vec<libc::iovec>,
}

// SAFETY: the raw pointers in `iov` point into guest memory that the queue's
// owner keeps mapped while operations are in flight; a Slot is only used by
// the thread that currently owns its backend.
unsafe impl Send for Slot {}

/// io_uring on a raw file or block device, one per queue.
pub struct RawBackend {
    disk: Arc<Disk>,
    ring: IoUring,
    slots: Vec<Slot>,
    /// Operations that completed without the ring (discard, write-zeroes,
    /// refused submissions).
    ready: Vec<Completion>,
    eventfd: Option<std::fs::File>,
}

impl std::fmt::Debug for RawBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawBackend")
            .field("depth", &self.slots.len())
            .finish()
    }
}

impl RawBackend {
    /// A ring for `disk` (which must be raw) with room for `depth`
    /// operations (rounded up to a power of two, at most 4096).
    pub fn new(disk: Arc<Disk>, depth: u16) -> Result<RawBackend, BackendError> {
        let entries = u32::from(depth.max(1)).next_power_of_two().min(4096);
        let fd = disk
            .raw_fd()
            .ok_or_else(|| BackendError::Uring(std::io::Error::other("not a raw disk")))?;
        let ring = new_ring(entries, fd).map_err(BackendError::Uring)?;
        Ok(RawBackend {
            disk,
            ring,
            slots: (0..entries).map(|_| Slot::default()).collect(),
            ready: Vec::with_capacity(entries as usize),
            eventfd: None,
        })
    }

    fn sync(&mut self, tag: usize, op: &'static str, ranges: &[ByteRange], zero: bool) {
        let mut result = Ok(0);
        for r in ranges {
            let res = if zero {
                self.disk.write_zeroes(r.offset, r.len, r.unmap)
            } else {
                self.disk.discard(r.offset, r.len)
            };
            if let Err(source) = res {
                result = Err(OpError::Disk { op, source });
                break;
            }
        }
        self.ready.push(Completion { tag, result });
    }
}

/// An io_uring for one queue with the disk `fd` registered (no file
/// reference counting per request). Completions of page-cache I/O are posted
/// inline; COOP_TASKRUN spares the interrupt for the others since this thread
/// enters the ring for every wave anyway.
fn new_ring(entries: u32, fd: libc::c_int) -> std::io::Result<IoUring> {
    let ring = IoUring::builder()
        .setup_coop_taskrun()
        .build(entries)
        .or_else(|_| IoUring::new(entries))?;
    ring.submitter().register_files(&[fd])?;
    Ok(ring)
}

impl DiskBackend for RawBackend {
    fn depth(&self) -> usize {
        self.slots.len()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: self.disk.read_only(),
            discard: true,
            write_zeroes: true,
        }
    }

    fn size(&self) -> u64 {
        self.disk.size()
    }

    fn submit(&mut self, tag: usize, op: DiskOp<'_>) -> Result<(), OpError> {
        let Some(s) = self.slots.get_mut(tag) else {
            return Err(OpError::Full { op: "submit" });
        };
        let sqe = match op {
            DiskOp::Read { offset, iov } => {
                s.op = "read";
                match iov {
                    // One segment (the usual case): plain read, no iovec import.
                    [one] => opcode::Read::new(DISK, one.iov_base.cast(), one.iov_len as u32)
                        .offset(offset)
                        .build(),
                    _ => {
                        s.iov.clear();
                        s.iov.extend_from_slice(iov);
                        opcode::Readv::new(DISK, s.iov.as_ptr(), s.iov.len() as u32)
                            .offset(offset)
                            .build()
                    }
                }
            }
            DiskOp::Write {
                offset,
                iov,
                durable,
            } => {
                s.op = "write";
                let flags = if durable { libc::RWF_DSYNC } else { 0 };
                match iov {
                    [one] => opcode::Write::new(DISK, one.iov_base.cast(), one.iov_len as u32)
                        .offset(offset)
                        .rw_flags(flags)
                        .build(),
                    _ => {
                        s.iov.clear();
                        s.iov.extend_from_slice(iov);
                        opcode::Writev::new(DISK, s.iov.as_ptr(), s.iov.len() as u32)
                            .offset(offset)
                            .rw_flags(flags)
                            .build()
                    }
                }
            }
            DiskOp::Flush => {
                s.op = "fdatasync";
                let sqe = opcode::Fsync::new(DISK)
                    .flags(types::FsyncFlags::DATASYNC)
                    .build()
                    .flags(squeue::Flags::IO_DRAIN)
                    .user_data(tag as u64);
                // SAFETY: the entry references no memory.
                if unsafe { self.ring.submission().push(&sqe) }.is_err() {
                    // No room on the ring: flush synchronously.
                    let result = self
                        .disk
                        .flush()
                        .map(|()| 0)
                        .map_err(|source| OpError::Disk {
                            op: "fdatasync",
                            source,
                        });
                    self.ready.push(Completion { tag, result });
                }
                return Ok(());
            }
            DiskOp::Discard(ranges) => {
                self.sync(tag, "discard", ranges, false);
                return Ok(());
            }
            DiskOp::WriteZeroes(ranges) => {
                self.sync(tag, "write-zeroes", ranges, true);
                return Ok(());
            }
        };
        let op = s.op;
        // SAFETY: the iovec array (for readv/writev) lives in
        // `self.slots[tag]`, which is not touched again until the completion
        // is reaped, and the buffers are guest memory kept mapped by the
        // caller until then.
        match unsafe { self.ring.submission().push(&sqe.user_data(tag as u64)) } {
            Ok(()) => Ok(()),
            Err(_) => Err(OpError::Full { op }),
        }
    }

    fn kick(&mut self, wait: bool) -> Result<(), BackendError> {
        let wait = wait && self.ready.is_empty();
        if wait || !self.ring.submission().is_empty() {
            loop {
                match self.ring.submit_and_wait(usize::from(wait)) {
                    Ok(_) => break,
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                    Err(e) => return Err(BackendError::Uring(e)),
                }
            }
        }
        Ok(())
    }

    fn reap(&mut self, f: &mut dyn FnMut(Completion)) -> usize {
        let mut n = 0;
        for c in self.ready.drain(..) {
            f(c);
            n += 1;
        }
        while let Some(cqe) = self.ring.completion().next() {
            let tag = cqe.user_data() as usize;
            let Some(s) = self.slots.get(tag) else {
                continue;
            };
            let res = cqe.result();
            let result = if res >= 0 {
                Ok(res as u64)
            } else {
                Err(OpError::Os {
                    op: s.op,
                    source: std::io::Error::from_raw_os_error(-res),
                })
            };
            f(Completion { tag, result });
            n += 1;
        }
        n
    }

    fn completion_fd(&mut self) -> Result<Option<RawFd>, BackendError> {
        use std::os::unix::io::{AsRawFd, FromRawFd};
        if self.eventfd.is_none() {
            // SAFETY: eventfd creates a new fd that we own from here on.
            let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
            if fd < 0 {
                return Err(BackendError::Uring(std::io::Error::last_os_error()));
            }
            // SAFETY: `fd` was just created and is owned by nobody else.
            let file = unsafe { std::fs::File::from_raw_fd(fd) };
            self.ring
                .submitter()
                .register_eventfd(file.as_raw_fd())
                .map_err(BackendError::Uring)?;
            self.eventfd = Some(file);
        }
        Ok(self.eventfd.as_ref().map(|f| f.as_raw_fd()))
    }
}
