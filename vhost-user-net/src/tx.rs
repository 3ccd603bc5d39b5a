//! The transmit engine of one queue pair: each chain (virtio-net header and
//! frame) is written to the tap with one `writev` straight from guest
//! memory. Malformed chains and oversized frames are dropped and counted;
//! a full or down tap drops the frame. Nothing stops the queue.

use std::os::fd::RawFd;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryBackend;

use crate::chain::{check_avail, collect};
use crate::stats::QueueStats;
use crate::virtio::Negotiated;

/// Errors that stop this pass over the queue (the ring itself is unusable).
#[derive(Debug, thiserror::Error)]
pub enum TxError {
    /// The virtqueue is broken.
    #[error("virtqueue: {0:?}")]
    Queue(virtio_queue::Error),
}

/// The TX engine of one queue.
pub struct Tx {
    cfg: Negotiated,
    iov: Vec<libc::iovec>,
}

// SAFETY: `iov` holds raw pointers only during one `process` call (it is
// cleared before each chain and they point into guest memory the caller
// keeps mapped); `Tx` is used by one thread at a time (behind a mutex).
unsafe impl Send for Tx {}

impl std::fmt::Debug for Tx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tx").field("cfg", &self.cfg).finish()
    }
}

fn qerr(e: virtio_queue::Error) -> TxError {
    TxError::Queue(e)
}

impl Tx {
    /// An engine for the negotiated settings `cfg`.
    pub fn new(cfg: Negotiated) -> Tx {
        Tx {
            cfg,
            iov: Vec::new(),
        }
    }

    /// Applies newly negotiated settings.
    pub fn configure(&mut self, cfg: Negotiated) {
        self.cfg = cfg;
    }

    /// Sends every available chain to `fd`, until the ring is empty with
    /// notifications enabled.
    pub fn process<M: GuestMemoryBackend>(
        &mut self,
        q: &mut Queue,
        mem: &M,
        fd: RawFd,
        stats: &QueueStats,
        signal: &mut dyn FnMut(),
    ) -> Result<(), TxError> {
        // A bogus available index: fail before `virtio-queue` logs it on
        // every pop (a guest could flood the log by kicking).
        check_avail(q, mem).map_err(qerr)?;
        loop {
            q.disable_notification(mem).map_err(qerr)?;
            let mut unsignalled = 0usize;
            while let Some(chain) = q.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                self.send(mem, chain, fd, stats);
                self.iov.clear();
                q.add_used(mem, head, 0).map_err(qerr)?;
                unsignalled += 1;
                if unsignalled >= 64 {
                    if q.needs_notification(mem).map_err(qerr)? {
                        signal();
                    }
                    unsignalled = 0;
                }
            }
            if unsignalled > 0 && q.needs_notification(mem).map_err(qerr)? {
                signal();
            }
            if !q.enable_notification(mem).map_err(qerr)? {
                return Ok(());
            }
            // More is available although nothing could be popped?
            check_avail(q, mem).map_err(qerr)?;
        }
    }

    fn send<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        chain: impl Iterator<Item = virtio_queue::desc::split::Descriptor>,
        fd: RawFd,
        stats: &QueueStats,
    ) {
        let hdr = self.cfg.hdr_len;
        let len = match collect(mem, chain, false, &mut self.iov) {
            Ok(len) if len >= hdr => len,
            _ => {
                QueueStats::add(&stats.errors, 1);
                return;
            }
        };
        if len - hdr > self.cfg.max_tx_frame {
            QueueStats::add(&stats.drops, 1);
            return;
        }
        loop {
            // SAFETY: the iovecs are guest memory validated by `collect`,
            // kept mapped by the caller's `mem`.
            let r = unsafe { libc::writev(fd, self.iov.as_ptr(), self.iov.len() as i32) };
            if r >= 0 {
                QueueStats::add(&stats.packets, 1);
                QueueStats::add(&stats.bytes, (len - hdr) as u64);
                return;
            }
            match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => continue,
                // Tap queue full, or the link is down.
                Some(libc::EAGAIN | libc::ENOBUFS | libc::EIO) => {
                    QueueStats::add(&stats.drops, 1);
                }
                // EINVAL: a virtio-net header the kernel refuses, ...
                _ => QueueStats::add(&stats.errors, 1),
            }
            return;
        }
    }
}
