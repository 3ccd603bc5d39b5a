//! The transmit engine of one queue pair: each chain (virtio-net header and
//! frame) is written to the tap with one `writev` straight from guest
//! memory. Malformed chains and oversized frames are dropped and counted;
//! a full or down tap drops the frame. Nothing stops the queue.
//!
//! With an io_uring ([`Tx::use_uring`]) the chains available are taken in
//! batches of up to [`TX_BATCH`]: one `writev` request per frame, the batch
//! submitted with one system call, and the used ring updated once every
//! request of the batch has completed (so nothing is in flight when the
//! pass ends).

use std::os::fd::RawFd;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryBackend;

use io_uring::opcode;

use crate::chain::{check_avail, collect};
use crate::poll::PollWindow;
use crate::stats::{DropReason, QueueStats};
use crate::uring::{Ring, UringError};
use crate::virtio::Negotiated;

/// Most frames submitted to the io_uring at once.
pub const TX_BATCH: usize = 64;

/// Errors that stop this pass over the queue (the ring itself is unusable).
#[derive(Debug, thiserror::Error)]
pub enum TxError {
    /// The virtqueue is broken.
    #[error("virtqueue: {0:?}")]
    Queue(virtio_queue::Error),
}

/// One frame of a batch.
#[derive(Debug, Clone, Copy)]
struct Pending {
    head: u16,
    iov_start: usize,
    iov_end: usize,
    /// Frame length without the header; 0 when the chain was refused.
    len: usize,
    /// The write's result (`i32::MIN`: not submitted).
    res: i32,
}

/// The TX engine of one queue.
pub struct Tx {
    cfg: Negotiated,
    iov: Vec<libc::iovec>,
    ring: Option<Ring>,
    batch: Vec<Pending>,
    poll: PollWindow,
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
            ring: None,
            batch: Vec::with_capacity(TX_BATCH),
            poll: PollWindow::default(),
        }
    }

    /// Polls a ring that ran dry for up to `max` (adaptive, see
    /// [`PollWindow`]) before waiting for a kick; zero (the default): never.
    pub fn set_poll(&mut self, max: std::time::Duration) {
        self.poll = PollWindow::new(max);
    }

    /// Writes to `fd` through an io_uring from now on.
    pub fn use_uring(&mut self, fd: RawFd) -> Result<(), UringError> {
        self.ring = Some(Ring::new(TX_BATCH as u32, fd)?);
        Ok(())
    }

    /// Whether the io_uring path is in use.
    pub fn uring(&self) -> bool {
        self.ring.is_some()
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
        self.poll.woken();
        if self.ring.is_some() {
            return self.process_uring(q, mem, stats, signal);
        }
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
            if self.poll.poll(q, mem).map_err(qerr)? {
                continue;
            }
            if !q.enable_notification(mem).map_err(qerr)? {
                self.poll.sleeping();
                return Ok(());
            }
            // More is available although nothing could be popped?
            check_avail(q, mem).map_err(qerr)?;
        }
    }

    /// [`Tx::process`] in batches through the io_uring.
    fn process_uring<M: GuestMemoryBackend>(
        &mut self,
        q: &mut Queue,
        mem: &M,
        stats: &QueueStats,
        signal: &mut dyn FnMut(),
    ) -> Result<(), TxError> {
        loop {
            q.disable_notification(mem).map_err(qerr)?;
            loop {
                self.iov.clear();
                self.batch.clear();
                while self.batch.len() < TX_BATCH {
                    let Some(chain) = q.pop_descriptor_chain(mem) else {
                        break;
                    };
                    let head = chain.head_index();
                    let start = self.iov.len();
                    let len = self.check(mem, chain, stats);
                    if len == 0 {
                        self.iov.truncate(start);
                    }
                    self.batch.push(Pending {
                        head,
                        iov_start: start,
                        iov_end: self.iov.len(),
                        len,
                        res: i32::MIN,
                    });
                }
                if self.batch.is_empty() {
                    if self.poll.poll(q, mem).map_err(qerr)? {
                        continue;
                    }
                    break;
                }
                self.submit_batch(stats);
                for p in &self.batch {
                    q.add_used(mem, p.head, 0).map_err(qerr)?;
                }
                if q.needs_notification(mem).map_err(qerr)? {
                    signal();
                }
            }
            if !q.enable_notification(mem).map_err(qerr)? {
                self.poll.sleeping();
                return Ok(());
            }
            // More is available although nothing could be popped?
            check_avail(q, mem).map_err(qerr)?;
        }
    }

    /// Writes the batch's frames (one request each) and counts them.
    fn submit_batch(&mut self, stats: &QueueStats) {
        let Some(ring) = self.ring.as_mut() else {
            return;
        };
        let mut n = 0usize;
        for (i, p) in self.batch.iter().enumerate() {
            if p.len == 0 {
                continue;
            }
            let iov = &self.iov[p.iov_start..p.iov_end];
            let sqe = match iov {
                // Header and frame in one buffer (DPDK puts the header in
                // the mbuf's headroom): a plain write skips importing an
                // iovec array, a measurable part of io_uring's per-request
                // cost.
                [one] => {
                    opcode::Write::new(ring.tap(), one.iov_base.cast(), one.iov_len as u32).build()
                }
                _ => opcode::Writev::new(ring.tap(), iov.as_ptr(), iov.len() as u32).build(),
            }
            .user_data(i as u64);
            // SAFETY: the iovecs (in `self.iov`, not touched until the batch
            // is reaped below) point into guest memory kept mapped by the
            // caller's `mem`; `run` waits for every request pushed.
            if unsafe { ring.push(&sqe) } {
                n += 1;
            }
        }
        let batch = &mut self.batch;
        let r = ring.run(n, &mut |ud, res| {
            if let Some(p) = batch.get_mut(ud as usize) {
                p.res = res;
            }
        });
        if r.is_err() {
            // The ring failed: back to one writev per frame (frames of this
            // batch without a result count as errors).
            self.ring = None;
        }
        for p in &self.batch {
            if p.len == 0 {
                continue;
            }
            match p.res {
                r if r >= 0 => {
                    QueueStats::add(&stats.packets, 1);
                    QueueStats::add(&stats.bytes, p.len as u64);
                }
                r if matches!(-r, libc::EAGAIN | libc::ENOBUFS | libc::EIO) => {
                    stats.drop(DropReason::of_tap_errno(-r));
                }
                _ => QueueStats::add(&stats.errors, 1),
            }
        }
    }

    /// Appends the chain's buffers to `self.iov` and returns the frame
    /// length without the header, or 0 when the chain is dropped (counted).
    fn check<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        chain: impl Iterator<Item = virtio_queue::desc::split::Descriptor>,
        stats: &QueueStats,
    ) -> usize {
        let hdr = self.cfg.hdr_len;
        let len = match collect(mem, chain, false, &mut self.iov) {
            // A header without a frame is refused (by the tap on the sync path).
            Ok(len) if len > hdr => len,
            _ => {
                QueueStats::add(&stats.errors, 1);
                return 0;
            }
        };
        if len - hdr > self.cfg.max_tx_frame {
            stats.drop(DropReason::TooLarge);
            return 0;
        }
        len - hdr
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
            stats.drop(DropReason::TooLarge);
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
                Some(e @ (libc::EAGAIN | libc::ENOBUFS | libc::EIO)) => {
                    stats.drop(DropReason::of_tap_errno(e));
                }
                // EINVAL: a virtio-net header the kernel refuses, ...
                _ => QueueStats::add(&stats.errors, 1),
            }
            return;
        }
    }
}
