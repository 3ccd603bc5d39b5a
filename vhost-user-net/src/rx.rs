//! The receive engine of one queue pair: frames from the tap into the
//! guest's RX buffers.
//!
//! Each frame is read with one `readv` straight into the descriptor chains
//! (no bounce copy). Without MRG_RXBUF a frame goes into one chain; with it,
//! chains are popped until they can hold the largest frame the tap may
//! deliver, the frame is spread over as many as it needs and `num_buffers`
//! is set in its header. Chains popped but not used are kept for the next
//! frame and given back to the ring (un-popped) when the tap is empty.
//!
//! A one-byte overflow buffer after the guest's buffers detects frames that
//! did not fit: they are dropped and counted. Malformed chains are returned
//! with length 0 and counted. Neither stops the queue.
//!
//! With an io_uring ([`Rx::use_uring`]) and chains that each hold a whole
//! frame (always without MRG_RXBUF; with it, when the guest posts buffers
//! of at least the largest frame, as DPDK and Linux without guest GSO do),
//! up to [`RX_BATCH`] reads are submitted at once, one per chain, with one
//! system call. Reads that find the tap empty complete with EAGAIN, and a
//! frame may land in a later read than an empty one, so chains are used
//! out of order: unused chains stay popped for the next batch of the same
//! pass; the pass ends when a batch's unused chains are the last ones
//! popped, which then go back to the ring. Buffers too small for a whole
//! frame switch the pass to the one-`readv`-per-frame path above.

use std::os::fd::RawFd;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryBackend;

use io_uring::opcode;

use crate::chain::{check_avail, collect, write_at};
use crate::stats::{DropReason, QueueStats};
use crate::uring::{Ring, UringError};
use crate::virtio::{Negotiated, ETH_OVERHEAD, HDR_LEN, NUM_BUFFERS_OFFSET};

/// Most guest buffers in one `readv` (IOV_MAX is 1024, one more entry is
/// our overflow byte); a chain with more descriptors is malformed.
const MAX_IOV: usize = 896;

/// Most reads submitted to the io_uring at once.
pub const RX_BATCH: usize = 32;

/// A chain of the io_uring path: its iovecs (`iov_start..iov_end`, the last
/// one our overflow byte) and its read's result.
#[derive(Debug, Clone, Copy)]
struct Posted {
    head: u16,
    iov_start: usize,
    iov_end: usize,
    cap: usize,
    /// Pop order within the pass.
    seq: u64,
    res: i32,
}

/// Errors that stop this pass over the queue (the ring itself is unusable).
#[derive(Debug, thiserror::Error)]
pub enum RxError {
    /// The virtqueue is broken (bad ring addresses ...).
    #[error("virtqueue: {0:?}")]
    Queue(virtio_queue::Error),
}

/// Why a pass ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxStop {
    /// The tap has nothing more to read (or failed; counted).
    TapEmpty,
    /// The guest has not posted enough buffers; notifications are enabled.
    NoBuffers,
}

#[derive(Debug, Clone, Copy)]
struct Popped {
    head: u16,
    iov_start: usize,
    iov_end: usize,
    cap: usize,
}

/// What one io_uring batch found.
#[derive(Debug, Clone, Copy)]
struct Batch {
    /// The unused chains are the last ones popped (no read found the tap
    /// empty before a later one got a frame).
    clean: bool,
    /// Some read found the tap empty.
    empty: bool,
    /// A read failed with an unexpected error (counted).
    tap_failed: bool,
    /// The ring itself failed (now dropped).
    ring_failed: bool,
}

enum Fill {
    /// Enough buffers for the next frame.
    Enough,
    /// Not enough; wait for the guest.
    Short,
}

/// The RX engine of one queue.
pub struct Rx {
    cfg: Negotiated,
    mtu: usize,
    /// Chains popped and not yet used, `first..`.
    chains: Vec<Popped>,
    first: usize,
    stash_cap: usize,
    iov: Vec<libc::iovec>,
    scratch: Vec<libc::iovec>,
    overflow: Box<[u8; 1]>,
    ring: Option<Ring>,
    posted: Vec<Posted>,
    keep: Vec<Posted>,
    popped: u64,
    /// Reads to post in the next batch: doubles while batches come back
    /// full, falls to what the last batch found when the tap ran empty (so
    /// a trickle of frames costs a few reads per system call, not
    /// [`RX_BATCH`]).
    target: usize,
}

// SAFETY: the raw pointers in `iov`/`scratch` only live during one
// `process` call (both are cleared before it returns) and point into guest
// memory the caller keeps mapped meanwhile; `Rx` is used by one thread at a
// time (behind a mutex).
unsafe impl Send for Rx {}

impl std::fmt::Debug for Rx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rx").field("cfg", &self.cfg).finish()
    }
}

fn qerr(e: virtio_queue::Error) -> RxError {
    RxError::Queue(e)
}

impl Rx {
    /// An engine for the negotiated settings `cfg` and MTU `mtu`.
    pub fn new(cfg: Negotiated, mtu: u16) -> Rx {
        Rx {
            cfg,
            mtu: usize::from(mtu),
            chains: Vec::new(),
            first: 0,
            stash_cap: 0,
            iov: Vec::new(),
            scratch: Vec::new(),
            overflow: Box::new([0u8]),
            ring: None,
            posted: Vec::with_capacity(RX_BATCH),
            keep: Vec::with_capacity(RX_BATCH),
            popped: 0,
            target: 4,
        }
    }

    /// Reads from `fd` through an io_uring from now on (when the guest's
    /// buffers allow, see the module doc).
    pub fn use_uring(&mut self, fd: RawFd) -> Result<(), UringError> {
        self.ring = Some(Ring::new(RX_BATCH as u32, fd)?);
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

    /// Moves frames from `fd` into the queue until the tap is empty or the
    /// guest is out of buffers. `signal` is called whenever the driver must
    /// be told about used buffers.
    pub fn process<M: GuestMemoryBackend>(
        &mut self,
        q: &mut Queue,
        mem: &M,
        fd: RawFd,
        stats: &QueueStats,
        signal: &mut dyn FnMut(),
    ) -> Result<RxStop, RxError> {
        // A bogus available index: fail before `virtio-queue` logs it on
        // every pop (a guest could flood the log by kicking).
        check_avail(q, mem).map_err(qerr)?;
        if self.ring.is_some() {
            if let Some(stop) = self.process_uring(q, mem, stats, signal)? {
                return Ok(stop);
            }
            // Buffers too small for a whole frame: one readv per frame.
        }
        self.process_sync(q, mem, fd, stats, signal)
    }

    /// [`Rx::process`] with one `readv` per frame.
    fn process_sync<M: GuestMemoryBackend>(
        &mut self,
        q: &mut Queue,
        mem: &M,
        fd: RawFd,
        stats: &QueueStats,
        signal: &mut dyn FnMut(),
    ) -> Result<RxStop, RxError> {
        q.disable_notification(mem).map_err(qerr)?;
        let mut unsignalled = 0usize;
        let result = loop {
            match self.fill(q, mem, stats, &mut unsignalled) {
                Ok(Fill::Enough) => {}
                Ok(Fill::Short) => match q.enable_notification(mem) {
                    // More is available although nothing could be popped?
                    Ok(true) => match check_avail(q, mem) {
                        Ok(()) => continue,
                        Err(e) => break Err(qerr(e)),
                    },
                    Ok(false) => break Ok(RxStop::NoBuffers),
                    Err(e) => break Err(qerr(e)),
                },
                Err(e) => break Err(e),
            }
            match self.receive_one(q, mem, fd, stats) {
                Ok(Some(used)) => unsignalled += used,
                Ok(None) => break Ok(RxStop::TapEmpty),
                Err(e) => break Err(e),
            }
            if unsignalled >= 64 {
                if q.needs_notification(mem).map_err(qerr)? {
                    signal();
                }
                unsignalled = 0;
            }
        };
        self.rewind(q);
        if unsignalled > 0 && q.needs_notification(mem).map_err(qerr)? {
            signal();
        }
        result
    }

    /// The io_uring pass. `Ok(None)`: the guest's buffers are too small
    /// for one frame each; nothing is popped, continue with one `readv`
    /// per frame.
    fn process_uring<M: GuestMemoryBackend>(
        &mut self,
        q: &mut Queue,
        mem: &M,
        stats: &QueueStats,
        signal: &mut dyn FnMut(),
    ) -> Result<Option<RxStop>, RxError> {
        q.disable_notification(mem).map_err(qerr)?;
        self.popped = 0;
        self.keep.clear();
        self.iov.clear();
        let mut unsignalled = 0usize;
        let mut small = false;
        let result = loop {
            match self.post(q, mem, stats, &mut unsignalled, !small) {
                Ok(s) => small |= s,
                Err(e) => break Err(e),
            }
            if self.posted.is_empty() {
                if small {
                    break Ok(None);
                }
                match q.enable_notification(mem) {
                    // More is available although nothing could be popped?
                    Ok(true) => match check_avail(q, mem) {
                        Ok(()) => continue,
                        Err(e) => break Err(qerr(e)),
                    },
                    Ok(false) => break Ok(Some(RxStop::NoBuffers)),
                    Err(e) => break Err(qerr(e)),
                }
            }
            let b = match self.read_batch(q, mem, stats, &mut unsignalled) {
                Ok(b) => b,
                Err(e) => break Err(e),
            };
            if b.ring_failed {
                break Ok(None);
            }
            if b.tap_failed || (b.clean && b.empty) {
                break Ok(Some(RxStop::TapEmpty));
            }
            if b.clean && small {
                break Ok(None);
            }
            if unsignalled >= 64 {
                match q.needs_notification(mem) {
                    Ok(true) => signal(),
                    Ok(false) => {}
                    Err(e) => break Err(qerr(e)),
                }
                unsignalled = 0;
            }
        };
        let end = self.give_back(q, mem, stats, &mut unsignalled);
        if unsignalled > 0 && q.needs_notification(mem).map_err(qerr)? {
            signal();
        }
        match (result, end) {
            (Err(e), _) | (Ok(_), Err(e)) => Err(e),
            (Ok(r), Ok(())) => Ok(r),
        }
    }

    /// Moves the chains kept from the last batch to `posted` (their iovecs
    /// to the front of `iov`) and, with `pop`, pops more, up to
    /// [`RX_BATCH`]. Returns true when a popped chain was too small for a
    /// whole frame (it went back to the ring).
    fn post<M: GuestMemoryBackend>(
        &mut self,
        q: &mut Queue,
        mem: &M,
        stats: &QueueStats,
        unsignalled: &mut usize,
        pop: bool,
    ) -> Result<bool, RxError> {
        self.scratch.clear();
        self.posted.clear();
        for k in &self.keep {
            let start = self.scratch.len();
            self.scratch
                .extend_from_slice(&self.iov[k.iov_start..k.iov_end]);
            self.posted.push(Posted {
                iov_start: start,
                iov_end: self.scratch.len(),
                ..*k
            });
        }
        self.keep.clear();
        std::mem::swap(&mut self.iov, &mut self.scratch);
        self.scratch.clear();
        let hdr = self.cfg.hdr_len;
        let need = hdr + self.cfg.max_rx_frame;
        while pop && self.posted.len() < self.target {
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            self.popped += 1;
            let start = self.iov.len();
            match collect(mem, chain, true, &mut self.iov) {
                Ok(cap) if cap >= hdr && self.iov.len() - start <= MAX_IOV => {
                    if self.cfg.mrg_rxbuf && cap < need {
                        self.iov.truncate(start);
                        q.go_to_previous_position();
                        self.popped -= 1;
                        return Ok(true);
                    }
                    self.iov.push(libc::iovec {
                        iov_base: self.overflow.as_mut_ptr().cast(),
                        iov_len: 1,
                    });
                    self.posted.push(Posted {
                        head,
                        iov_start: start,
                        iov_end: self.iov.len(),
                        cap,
                        seq: self.popped - 1,
                        res: i32::MIN,
                    });
                }
                _ => {
                    // Chains are used out of order here: complete it now.
                    self.iov.truncate(start);
                    QueueStats::add(&stats.errors, 1);
                    q.add_used(mem, head, 0).map_err(qerr)?;
                    *unsignalled += 1;
                }
            }
        }
        Ok(false)
    }

    /// Reads into every posted chain at once and uses those that got a
    /// frame; the others are kept.
    fn read_batch<M: GuestMemoryBackend>(
        &mut self,
        q: &mut Queue,
        mem: &M,
        stats: &QueueStats,
        unsignalled: &mut usize,
    ) -> Result<Batch, RxError> {
        let mut b = Batch {
            clean: true,
            empty: false,
            tap_failed: false,
            ring_failed: false,
        };
        let Some(ring) = self.ring.as_mut() else {
            b.ring_failed = true;
            self.keep.extend_from_slice(&self.posted);
            self.posted.clear();
            return Ok(b);
        };
        let mut n = 0usize;
        for (i, p) in self.posted.iter().enumerate() {
            let iov = &self.iov[p.iov_start..p.iov_end];
            let sqe = opcode::Readv::new(ring.tap(), iov.as_ptr(), iov.len() as u32)
                .rw_flags(libc::RWF_NOWAIT)
                .build()
                .user_data(i as u64);
            // SAFETY: the iovecs (in `self.iov`, untouched until `run`
            // returned) are guest memory validated by `collect`, kept
            // mapped by the caller's `mem`, or our overflow byte; `run`
            // waits for every request pushed.
            if unsafe { ring.push(&sqe) } {
                n += 1;
            }
        }
        let posted = &mut self.posted;
        let r = ring.run(n, &mut |ud, res| {
            if let Some(p) = posted.get_mut(ud as usize) {
                p.res = res;
            }
        });
        if r.is_err() {
            // The ring failed: back to one readv per frame.
            self.ring = None;
            b.ring_failed = true;
        }
        let hdr = self.cfg.hdr_len;
        let mut unused_seen = false;
        let mut frames = 0usize;
        for i in 0..self.posted.len() {
            let p = self.posted[i];
            let got = match p.res {
                r if r >= 0 => {
                    let n = r as usize;
                    if n > p.cap || n < hdr {
                        stats.drop(if n < hdr {
                            DropReason::Runt
                        } else {
                            DropReason::TooLarge
                        });
                        None
                    } else {
                        Some(n)
                    }
                }
                r if r == -libc::EAGAIN => {
                    b.empty = true;
                    None
                }
                // Not run (the ring failed) or interrupted.
                r if r == -libc::EINTR || r == i32::MIN => None,
                _ => {
                    QueueStats::add(&stats.errors, 1);
                    b.tap_failed = true;
                    None
                }
            };
            match got {
                Some(n) => {
                    if unused_seen {
                        b.clean = false;
                    }
                    if hdr == HDR_LEN {
                        // SAFETY: the chain's iovecs are guest memory
                        // validated by `collect` and still mapped; it
                        // holds at least `hdr` bytes.
                        unsafe {
                            write_at(
                                &self.iov[p.iov_start..p.iov_end],
                                NUM_BUFFERS_OFFSET,
                                &1u16.to_le_bytes(),
                            );
                        }
                    }
                    q.add_used(mem, p.head, n as u32).map_err(qerr)?;
                    *unsignalled += 1;
                    frames += 1;
                    QueueStats::add(&stats.packets, 1);
                    QueueStats::add(&stats.bytes, (n - hdr) as u64);
                }
                None => {
                    unused_seen = true;
                    self.keep.push(p);
                }
            }
        }
        self.posted.clear();
        self.target = if b.empty {
            (frames + 1).clamp(2, RX_BATCH)
        } else {
            (self.target * 2).min(RX_BATCH)
        };
        Ok(b)
    }

    /// Ends an io_uring pass: the kept chains that are the last ones
    /// popped go back to the ring; any other (its read found the tap empty,
    /// or dropped a frame too large for it, while a later chain got a
    /// frame) is completed empty and counted as a hole.
    fn give_back<M: GuestMemoryBackend>(
        &mut self,
        q: &mut Queue,
        mem: &M,
        stats: &QueueStats,
        unsignalled: &mut usize,
    ) -> Result<(), RxError> {
        let mut r = Ok(());
        while let Some(k) = self.keep.last() {
            if k.seq + 1 != self.popped {
                break;
            }
            q.go_to_previous_position();
            self.popped -= 1;
            self.keep.pop();
        }
        for k in self.keep.drain(..) {
            QueueStats::add(&stats.holes, 1);
            if let Err(e) = q.add_used(mem, k.head, 0) {
                r = Err(qerr(e));
            }
            *unsignalled += 1;
        }
        self.posted.clear();
        self.iov.clear();
        self.scratch.clear();
        r
    }

    /// Gives the unused popped chains back to the ring.
    fn rewind(&mut self, q: &mut Queue) {
        for _ in self.first..self.chains.len() {
            q.go_to_previous_position();
        }
        self.chains.clear();
        self.iov.clear();
        self.scratch.clear();
        self.first = 0;
        self.stash_cap = 0;
    }

    fn stashed(&self) -> usize {
        self.chains.len() - self.first
    }

    /// Pops chains until the next frame fits (see the module doc).
    fn fill<M: GuestMemoryBackend>(
        &mut self,
        q: &mut Queue,
        mem: &M,
        stats: &QueueStats,
        unsignalled: &mut usize,
    ) -> Result<Fill, RxError> {
        let hdr = self.cfg.hdr_len;
        let want = if self.cfg.mrg_rxbuf {
            hdr + self.cfg.max_rx_frame
        } else {
            1
        };
        let mut blocked = false;
        while (self.cfg.mrg_rxbuf && self.stash_cap < want) || self.stashed() == 0 {
            let base = self
                .chains
                .get(self.first)
                .map_or(self.iov.len(), |c| c.iov_start);
            if self.iov.len() - base >= MAX_IOV {
                // readv takes at most IOV_MAX buffers: go with what we have.
                blocked = true;
                break;
            }
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let start = self.iov.len();
            match collect(mem, chain, true, &mut self.iov) {
                Ok(cap) if cap >= hdr && self.iov.len() - start <= MAX_IOV => {
                    self.chains.push(Popped {
                        head,
                        iov_start: start,
                        iov_end: self.iov.len(),
                        cap,
                    });
                    self.stash_cap += cap;
                }
                _ => {
                    if self.stashed() > 0 {
                        // Completing it now would put it between the used
                        // entries of the frame being gathered: leave it for
                        // when the stash is empty.
                        self.iov.truncate(start);
                        q.go_to_previous_position();
                        blocked = true;
                        break;
                    }
                    self.iov.truncate(start);
                    QueueStats::add(&stats.errors, 1);
                    q.add_used(mem, head, 0).map_err(qerr)?;
                    *unsignalled += 1;
                }
            }
        }
        if self.stashed() == 0 {
            return Ok(Fill::Short);
        }
        if !self.cfg.mrg_rxbuf || self.stash_cap >= want || blocked {
            return Ok(Fill::Enough);
        }
        // The ring is empty: go ahead if at least an MTU-sized frame fits
        // (a larger GSO frame is then dropped and counted), rather than
        // stalling a guest that keeps fewer buffers posted.
        if self.stash_cap >= hdr + self.mtu + ETH_OVERHEAD {
            Ok(Fill::Enough)
        } else {
            Ok(Fill::Short)
        }
    }

    /// Reads one frame into the stashed chains. `Some(n)`: n chains were
    /// used (0 when the frame was dropped); `None`: the tap is empty.
    fn receive_one<M: GuestMemoryBackend>(
        &mut self,
        q: &mut Queue,
        mem: &M,
        fd: RawFd,
        stats: &QueueStats,
    ) -> Result<Option<usize>, RxError> {
        let hdr = self.cfg.hdr_len;
        let front = self.chains[self.first];
        let (mut last, mut cap) = (self.first, front.cap);
        if self.cfg.mrg_rxbuf {
            // Every stashed chain, within readv's limit on buffers.
            while last + 1 < self.chains.len()
                && self.chains[last + 1].iov_end - front.iov_start <= MAX_IOV
            {
                last += 1;
                cap += self.chains[last].cap;
            }
        }
        self.scratch.clear();
        self.scratch
            .extend_from_slice(&self.iov[front.iov_start..self.chains[last].iov_end]);
        self.scratch.push(libc::iovec {
            iov_base: self.overflow.as_mut_ptr().cast(),
            iov_len: 1,
        });
        let n = loop {
            // SAFETY: every iovec is guest memory validated by `collect`
            // (kept mapped by the caller's `mem`) or our overflow byte.
            let r = unsafe { libc::readv(fd, self.scratch.as_ptr(), self.scratch.len() as i32) };
            if r >= 0 {
                break r as usize;
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => return Ok(None),
                _ => {
                    QueueStats::add(&stats.errors, 1);
                    return Ok(None);
                }
            }
        };
        if n > cap || n < hdr {
            // Larger than the buffers (truncated by the kernel), or runt.
            stats.drop(if n < hdr {
                DropReason::Runt
            } else {
                DropReason::TooLarge
            });
            return Ok(Some(0));
        }
        // How many chains the frame covers.
        let mut left = n;
        let mut used = 0usize;
        for c in &self.chains[self.first..=last] {
            used += 1;
            if left <= c.cap {
                break;
            }
            left -= c.cap;
        }
        if hdr == HDR_LEN {
            let nb = (used as u16).to_le_bytes();
            // SAFETY: the front chain's iovecs are guest memory validated by
            // `collect` and still mapped; it holds at least `hdr` bytes.
            unsafe {
                write_at(
                    &self.iov[front.iov_start..front.iov_end],
                    NUM_BUFFERS_OFFSET,
                    &nb,
                );
            }
        }
        let mut left = n;
        for i in 0..used {
            let c = self.chains[self.first + i];
            let len = left.min(c.cap);
            left -= len;
            self.stash_cap -= c.cap;
            q.add_used(mem, c.head, len as u32).map_err(qerr)?;
        }
        self.first += used;
        if self.first == self.chains.len() {
            self.chains.clear();
            self.iov.clear();
            self.first = 0;
        }
        QueueStats::add(&stats.packets, 1);
        QueueStats::add(&stats.bytes, (n - hdr) as u64);
        Ok(Some(used))
    }
}
