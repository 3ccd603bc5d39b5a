//! The qcow2 backend, synchronous for now: each operation runs through the
//! `qcow2` crate on the queue's thread when it is submitted (data through a
//! per-queue bounce buffer) and its completion waits in a list until the
//! engine reaps it, exactly like an asynchronous backend's would. An
//! asynchronous qcow2 data path fits behind the same [`DiskBackend`] trait.

use std::os::unix::io::RawFd;
use std::sync::Arc;

use super::{
    BackendError, ByteRange, Capabilities, Completion, Disk, DiskBackend, DiskError, DiskOp,
    OpError,
};

/// Synchronous qcow2 I/O, one per queue.
#[derive(Debug)]
pub struct Qcow2Backend {
    disk: Arc<Disk>,
    depth: usize,
    bounce: Vec<u8>,
    ready: Vec<Completion>,
}

impl Qcow2Backend {
    /// A backend for `disk` with up to `depth` operations awaiting reaping.
    pub fn new(disk: Arc<Disk>, depth: u16) -> Qcow2Backend {
        let depth = usize::from(depth.max(1)).next_power_of_two().min(4096);
        Qcow2Backend {
            disk,
            depth,
            bounce: Vec::new(),
            ready: Vec::with_capacity(depth),
        }
    }

    fn read(&mut self, offset: u64, iov: &[libc::iovec]) -> Result<u64, DiskError> {
        let len = total(iov);
        if self.bounce.len() < len {
            self.bounce.resize(len, 0);
        }
        let (disk, buf) = (&self.disk, &mut self.bounce[..len]);
        disk.read_at(buf, offset)?;
        let mut at = 0;
        for v in iov {
            // SAFETY: each iovec is guest memory validated by the engine and
            // kept mapped by its caller until this operation is reaped; the
            // bounce buffer holds `len` bytes, the sum of the iovec lengths.
            unsafe {
                std::ptr::copy_nonoverlapping(buf.as_ptr().add(at), v.iov_base.cast(), v.iov_len)
            };
            at += v.iov_len;
        }
        Ok(len as u64)
    }

    fn write(&mut self, offset: u64, iov: &[libc::iovec], durable: bool) -> Result<u64, DiskError> {
        let len = total(iov);
        if self.bounce.len() < len {
            self.bounce.resize(len, 0);
        }
        let (disk, buf) = (&self.disk, &mut self.bounce[..len]);
        let mut at = 0;
        for v in iov {
            // SAFETY: as in `read`, with the copy going the other way.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    v.iov_base.cast::<u8>(),
                    buf.as_mut_ptr().add(at),
                    v.iov_len,
                )
            };
            at += v.iov_len;
        }
        disk.write_at(buf, offset)?;
        if durable {
            disk.flush()?;
        }
        Ok(len as u64)
    }

    fn ranges(&self, ranges: &[ByteRange], zero: bool) -> Result<u64, DiskError> {
        for r in ranges {
            if zero {
                self.disk.write_zeroes(r.offset, r.len, r.unmap)?;
            } else {
                self.disk.discard(r.offset, r.len)?;
            }
        }
        Ok(0)
    }
}

fn total(iov: &[libc::iovec]) -> usize {
    iov.iter().map(|v| v.iov_len).sum()
}

impl DiskBackend for Qcow2Backend {
    fn depth(&self) -> usize {
        self.depth
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
        let (name, r) = match op {
            DiskOp::Read { offset, iov } => ("read", self.read(offset, iov)),
            DiskOp::Write {
                offset,
                iov,
                durable,
            } => ("write", self.write(offset, iov, durable)),
            DiskOp::Flush => ("flush", self.disk.flush().map(|()| 0)),
            DiskOp::Discard(r) => ("discard", self.ranges(r, false)),
            DiskOp::WriteZeroes(r) => ("write-zeroes", self.ranges(r, true)),
        };
        let result = r.map_err(|source| OpError::Disk { op: name, source });
        self.ready.push(Completion { tag, result });
        Ok(())
    }

    fn kick(&mut self, _wait: bool) -> Result<(), BackendError> {
        Ok(())
    }

    fn reap(&mut self, f: &mut dyn FnMut(Completion)) -> usize {
        let n = self.ready.len();
        for c in self.ready.drain(..) {
            f(c);
        }
        n
    }

    fn completion_fd(&mut self) -> Result<Option<RawFd>, BackendError> {
        Ok(None)
    }
}
