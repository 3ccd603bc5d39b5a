//! The per-queue request engine: pops descriptor chains, parses them,
//! executes them against the [`Disk`] and completes them.
//!
//! Raw disks: reads and writes become io_uring `read`/`write` (`readv`/
//! `writev` for several segments) straight into guest memory, on the disk
//! file registered with the ring; a FLUSH is an `fdatasync` that drains the
//! requests before it. qcow2 disks: the library call runs on this queue's
//! thread through a per-queue bounce buffer. Nothing here allocates per
//! request once the buffers have grown to the largest request seen.
//!
//! Chains are taken in waves of `WAVE` (8): each wave is submitted and what
//! has completed goes to the used ring (one notification at most, EVENT_IDX
//! permitting) before the next wave, so the driver refills the ring while
//! the device works. A queue that runs dry polls its available ring for an
//! adaptive window (`PollWindow`) before it goes back to waiting for kicks.
//!
//! With an inflight region ([`crate::inflight`]), every head taken from the
//! available ring is recorded until it is in the used ring, and after a
//! restart the recorded heads are resubmitted, oldest first, before new ones.
//!
//! This module knows virtio queues and guest memory, not vhost-user.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types, IoUring};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::chain::ChainWalker;
use crate::disk::Disk;
use crate::inflight::QueueInflight;
use crate::request::{parse, Request, RequestType, Segments, DWZ_SEGMENT_SIZE, SECTOR_SIZE};
use crate::stats::QueueStats;

/// Errors that stop a queue (per-request errors become a virtio status).
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// io_uring could not be set up or used.
    #[error("io_uring")]
    Uring(#[source] std::io::Error),
    /// The virtqueue itself is broken (bad ring addresses ...).
    #[error("virtqueue: {0:?}")]
    Queue(virtio_queue::Error),
}

/// Device settings a worker needs.
#[derive(Debug, Clone)]
pub struct DeviceSettings {
    /// GET_ID answer (up to 20 bytes).
    pub serial: Vec<u8>,
    /// Largest number of discard / write-zeroes segments per request.
    pub max_dwz_segments: u32,
    /// Largest adaptive busy-poll window once the queue runs dry (0: off).
    pub poll: Duration,
    /// TEST ONLY (`--test-hold-completions-ms`; zero, i.e. off, in
    /// production): how long each wave's completions are held after their
    /// I/O finished and before they go to the used ring. The requests stay
    /// recorded in the inflight region meanwhile, so that the crash tests
    /// can count on requests being in flight whenever they kill the daemon.
    pub hold_completions: Duration,
}

/// One io_uring request in flight.
#[derive(Debug, Default)]
struct Slot {
    head: u16,
    status: GuestAddress,
    used_len: u32,
    expected: u64,
    kind: Option<RequestType>,
    iov: Vec<libc::iovec>,
}

// SAFETY: the raw pointers in `iov` point into guest memory that the queue's
// owner keeps mapped while requests are in flight; a Slot is only used by
// the thread that currently owns its Worker.
unsafe impl Send for Slot {}

/// The engine of one queue.
pub struct Worker {
    ring: Option<IoUring>,
    slots: Vec<Slot>,
    /// Indices of slots not in flight.
    free: Vec<usize>,
    segs: Segments,
    bounce: Vec<u8>,
    /// Inflight tracking shared with the frontend, if it set one up.
    inflight: Option<QueueInflight>,
    /// Recover from `inflight` before the next pass.
    recover: bool,
    /// Heads to resubmit before taking new ones (the next one last): left in
    /// flight by a previous instance, or the next wave the test-only hold took
    /// early (see `hold_and_release`).
    resubmit: Vec<u16>,
    /// The adaptive busy-poll window.
    poll: PollWindow,
    /// Bumped by the owner to make `process` return (see [`Worker::watch`]).
    epoch: Option<Arc<AtomicU64>>,
    /// `epoch` as of the last [`Processed::Interrupted`].
    seen_epoch: u64,
    /// Synchronous completions of the current wave held back by the test-only
    /// [`DeviceSettings::hold_completions`] (empty unless it is set; at most
    /// [`WAVE`], the capacity reserved up front).
    held: Vec<(u16, GuestAddress, Done)>,
}

/// How [`Worker::process`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Processed {
    /// The queue is empty and notifications are enabled.
    Idle,
    /// The owner bumped the epoch (see [`Worker::watch`]): nothing is in
    /// flight any more, chains may be left in the ring, and `process` must
    /// be called again (with the current memory map) to serve them.
    Interrupted,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("io_uring", &self.ring.is_some())
            .field("slots", &self.slots.len())
            .finish()
    }
}

/// How a request ended when it completed without io_uring.
#[derive(Debug, Clone, Copy)]
struct Done {
    status: u32,
    used_len: u32,
}

impl Done {
    fn ok(used_len: u32) -> Done {
        Done {
            status: VIRTIO_BLK_S_OK,
            used_len,
        }
    }
    fn err() -> Done {
        Done {
            status: VIRTIO_BLK_S_IOERR,
            used_len: 1,
        }
    }
    fn unsupp() -> Done {
        Done {
            status: VIRTIO_BLK_S_UNSUPP,
            used_len: 1,
        }
    }
}

fn queue_err(e: virtio_queue::Error) -> WorkerError {
    WorkerError::Queue(e)
}

impl Worker {
    /// A worker for `disk` with up to `depth` requests in flight.
    pub fn new(disk: &Disk, depth: u16) -> Result<Worker, WorkerError> {
        let entries = u32::from(depth.max(1)).next_power_of_two().min(4096);
        let ring = match disk.raw_fd() {
            Some(fd) => Some(new_ring(entries, fd).map_err(WorkerError::Uring)?),
            None => None,
        };
        let slots = (0..entries).map(|_| Slot::default()).collect();
        Ok(Worker {
            ring,
            slots,
            free: (0..entries as usize).rev().collect(),
            segs: Segments::default(),
            bounce: Vec::new(),
            inflight: None,
            recover: false,
            // Room for the test-only hold's next wave (see hold_and_release).
            resubmit: Vec::with_capacity(WAVE),
            poll: PollWindow::default(),
            epoch: None,
            seen_epoch: 0,
            held: Vec::with_capacity(WAVE),
        })
    }

    /// Tracks requests in `inflight` from now on (`None`: stop tracking).
    /// The next pass first resubmits what the region records as in flight.
    pub fn set_inflight(&mut self, inflight: Option<QueueInflight>) {
        self.recover = inflight.is_some();
        self.inflight = inflight;
        self.resubmit.clear();
        self.held.clear();
    }

    /// Watches `epoch`, which the owner bumps after each change of the guest
    /// memory map and when it pauses the device: `process` then stops taking
    /// chains (they may point into memory its map does not have yet), waits
    /// for those in flight and returns [`Processed::Interrupted`]; the owner
    /// loads the map again and calls `process` again unless it is pausing.
    /// Matters most while polling, when the driver may add a region and use
    /// it before the next kick, and may keep the queue busy indefinitely.
    pub fn watch(&mut self, epoch: Arc<AtomicU64>) {
        self.epoch = Some(epoch);
    }

    /// Whether the epoch moved since the last [`Processed::Interrupted`].
    fn interrupted(&self) -> bool {
        self.epoch
            .as_ref()
            .is_some_and(|e| e.load(Ordering::Acquire) != self.seen_epoch)
    }

    /// Records the current epoch: the caller loads the map after this, so a
    /// later change is seen by the next pass.
    fn interrupt_seen(&mut self) -> Processed {
        if let Some(e) = &self.epoch {
            self.seen_epoch = e.load(Ordering::Acquire);
        }
        Processed::Interrupted
    }

    /// Number of heads waiting to be resubmitted.
    pub fn pending_resubmits(&self) -> usize {
        self.resubmit.len()
    }

    /// Applies the inflight region after a (re)connect: the available ring
    /// position becomes the used index plus the heads still in flight (the
    /// previous instance took exactly those), which are queued for
    /// resubmission in the order they were first taken.
    fn recover<M: GuestMemoryBackend>(
        &mut self,
        q: &mut Queue,
        mem: &M,
    ) -> Result<(), WorkerError> {
        self.recover = false;
        let Some(t) = self.inflight.as_mut() else {
            return Ok(());
        };
        let used = q.used_idx(mem, Ordering::Acquire).map_err(queue_err)?.0;
        let heads = t.recover(used, q.size());
        let next = used.wrapping_add(heads.len() as u16);
        let avail = q.avail_idx(mem, Ordering::Acquire).map_err(queue_err)?.0;
        if avail.wrapping_sub(next) > q.size() {
            // The region and the rings disagree: trust the frontend's base.
            log::warn!(
                "inflight region inconsistent with the rings (used {used}, {} in flight, \
                 avail {avail}): not resubmitting",
                heads.len()
            );
            return Ok(());
        }
        q.set_next_avail(next);
        log::debug!("inflight recovery: used {used}, avail {avail}, next {next}");
        if !heads.is_empty() {
            log::info!(
                "resubmitting {} request(s) left in flight by a previous instance",
                heads.len()
            );
        }
        self.resubmit = heads;
        self.resubmit.reverse();
        Ok(())
    }

    /// Processes the queue until it is empty with notifications enabled
    /// (or it was interrupted, see [`Worker::watch`]).
    /// `signal` is called whenever the driver must be told about used buffers.
    #[allow(clippy::too_many_arguments)]
    pub fn process<M: GuestMemoryBackend>(
        &mut self,
        disk: &Disk,
        settings: &DeviceSettings,
        writeback: bool,
        q: &mut Queue,
        mem: &M,
        stats: &QueueStats,
        signal: &mut dyn FnMut(),
    ) -> Result<Processed, WorkerError> {
        if self.interrupted() {
            return Ok(self.interrupt_seen());
        }
        if self.recover {
            self.recover(q, mem)?;
        }
        self.poll.woken(settings.poll);
        loop {
            q.disable_notification(mem).map_err(queue_err)?;
            loop {
                let n = self.run_pipeline(disk, settings, writeback, q, mem, stats, signal)?;
                if self.interrupted() {
                    return Ok(self.interrupt_seen());
                }
                if n == 0 && !self.poll_avail(q, mem)? {
                    break;
                }
            }
            if !q.enable_notification(mem).map_err(queue_err)? {
                self.poll.sleeping();
                return Ok(Processed::Idle);
            }
            // More is available: unless the driver published an available
            // index no ring can hold (we would spin on it forever).
            let avail = q.avail_idx(mem, Ordering::Acquire).map_err(queue_err)?;
            if avail.0.wrapping_sub(q.next_avail()) > q.size() {
                return Err(WorkerError::Queue(
                    virtio_queue::Error::InvalidAvailRingIndex,
                ));
            }
        }
    }

    /// Keeps the io_uring full: takes available chains while slots are free,
    /// in waves of up to [`WAVE`] requests; after each wave submits it and
    /// completes whatever has finished (notifying the driver), so the driver
    /// reaps and refills one wave while the next is executed. Waits for a
    /// completion only when nothing is available or no slot is free. Runs
    /// until nothing is available or in flight; returns the number of chains
    /// completed.
    #[allow(clippy::too_many_arguments)]
    fn run_pipeline<M: GuestMemoryBackend>(
        &mut self,
        disk: &Disk,
        settings: &DeviceSettings,
        writeback: bool,
        q: &mut Queue,
        mem: &M,
        stats: &QueueStats,
        signal: &mut dyn FnMut(),
    ) -> Result<usize, WorkerError> {
        let mut completed = 0usize;
        let mut unsignalled = 0usize;
        loop {
            let mut taken = 0usize;
            let mut drained = false;
            while taken < WAVE {
                let Some(&slot) = self.free.last() else {
                    break;
                };
                if self.interrupted() {
                    drained = true;
                    break;
                }
                let (head, parsed) = if let Some(head) = self.resubmit.pop() {
                    let table = GuestAddress(q.desc_table());
                    let chain = ChainWalker::new(mem, table, q.size(), head);
                    (head, parse(mem, chain, &mut self.segs))
                } else {
                    let Some(chain) = q.pop_descriptor_chain(mem) else {
                        drained = true;
                        break;
                    };
                    let head = chain.head_index();
                    if let Some(t) = self.inflight.as_mut() {
                        t.begin(head);
                    }
                    (head, parse(mem, chain, &mut self.segs))
                };
                taken += 1;
                let done = match parsed {
                    Ok(req) => self
                        .start(disk, settings, writeback, mem, head, &req, slot, stats)
                        .map(|d| (req.status, d)),
                    Err((_, Some(status))) => {
                        QueueStats::add(&stats.malformed, 1);
                        Some((status, Done::err()))
                    }
                    Err((_, None)) => {
                        QueueStats::add(&stats.malformed, 1);
                        add_used(mem, q, head, 0, self.inflight.as_ref())?;
                        completed += 1;
                        unsignalled += 1;
                        continue;
                    }
                };
                match done {
                    Some((status, d)) if settings.hold_completions.is_zero() => {
                        finish(mem, q, head, status, d, stats, self.inflight.as_ref())?;
                        completed += 1;
                        unsignalled += 1;
                    }
                    // Test-only hold: published after the wave (below).
                    Some((status, d)) => self.held.push((head, status, d)),
                    None => {
                        self.free.pop();
                    }
                }
            }
            let idle = drained || taken == 0;
            let in_flight = self.slots.len() - self.free.len();
            let uring_busy = in_flight > 0;
            if uring_busy {
                // With the test-only hold, one wave at a time: wait for all of it.
                let want = if settings.hold_completions.is_zero() {
                    usize::from(idle || self.free.is_empty())
                } else {
                    in_flight
                };
                self.submit(want)?;
            }
            if !settings.hold_completions.is_zero() {
                let n = self.hold_and_release(settings.hold_completions, mem, q, stats)?;
                completed += n;
                unsignalled += n;
            }
            if uring_busy {
                let n = self.reap(mem, q, stats)?;
                completed += n;
                unsignalled += n;
            } else if idle {
                break;
            }
            if unsignalled > 0 && q.needs_notification(mem).map_err(queue_err)? {
                signal();
                unsignalled = 0;
            }
        }
        if unsignalled > 0 && q.needs_notification(mem).map_err(queue_err)? {
            signal();
        }
        Ok(completed)
    }

    /// Starts a request: `None` when it was queued on io_uring (slot
    /// `slot`), `Some` when it completed synchronously.
    #[allow(clippy::too_many_arguments)]
    fn start<M: GuestMemoryBackend>(
        &mut self,
        disk: &Disk,
        settings: &DeviceSettings,
        writeback: bool,
        mem: &M,
        head: u16,
        req: &Request,
        slot: usize,
        stats: &QueueStats,
    ) -> Option<Done> {
        let writes = matches!(
            req.ty,
            RequestType::Out | RequestType::Discard | RequestType::WriteZeroes
        );
        if writes && disk.read_only() {
            return Some(Done::err());
        }
        match req.ty {
            RequestType::In | RequestType::Out => {
                let Some(off) = data_range(disk, req) else {
                    return Some(Done::err());
                };
                let used_len = if req.ty == RequestType::In {
                    req.len as u32 + 1
                } else {
                    1
                };
                if req.len == 0 {
                    return Some(Done::ok(used_len));
                }
                if self.ring.is_some() {
                    return self.queue_rw(writeback, mem, head, req, off, slot, used_len);
                }
                Some(self.rw_sync(disk, writeback, mem, req, off, used_len, stats))
            }
            RequestType::Flush => {
                if let Some(ring) = self.ring.as_mut() {
                    let sqe = opcode::Fsync::new(DISK)
                        .flags(types::FsyncFlags::DATASYNC)
                        .build()
                        .flags(squeue::Flags::IO_DRAIN)
                        .user_data(slot as u64);
                    let s = &mut self.slots[slot];
                    (s.head, s.status, s.used_len, s.expected) = (head, req.status, 1, 0);
                    s.kind = Some(req.ty);
                    // SAFETY: the entry references no memory.
                    if unsafe { ring.submission().push(&sqe) }.is_ok() {
                        return None;
                    }
                    return Some(match disk.flush() {
                        Ok(()) => Done::ok(1),
                        Err(_) => Done::err(),
                    });
                }
                QueueStats::add(&stats.flushes, 1);
                Some(match disk.flush() {
                    Ok(()) => Done::ok(1),
                    Err(_) => Done::err(),
                })
            }
            RequestType::GetId => {
                let n = (req.len as usize).min(settings.serial.len()).min(20);
                let mut id = [0u8; 20];
                id[..n].copy_from_slice(&settings.serial[..n]);
                let want = (req.len as usize).min(20);
                match scatter(mem, &self.segs, &id[..want]) {
                    Ok(()) => Some(Done::ok(want as u32 + 1)),
                    Err(()) => Some(Done::err()),
                }
            }
            RequestType::Discard | RequestType::WriteZeroes => {
                Some(self.discard_or_zero(disk, settings, mem, req))
            }
            RequestType::Unsupported(_) => Some(Done::unsupp()),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn queue_rw<M: GuestMemoryBackend>(
        &mut self,
        writeback: bool,
        mem: &M,
        head: u16,
        req: &Request,
        off: u64,
        slot: usize,
        used_len: u32,
    ) -> Option<Done> {
        let ring = self.ring.as_mut()?;
        let s = &mut self.slots[slot];
        s.iov.clear();
        for &(addr, len) in &self.segs.data {
            let Ok(vs) = mem.get_slice(addr, len as usize) else {
                return Some(Done::err());
            };
            s.iov.push(libc::iovec {
                iov_base: vs.ptr_guard_mut().as_ptr().cast(),
                iov_len: len as usize,
            });
        }
        s.head = head;
        s.status = req.status;
        s.used_len = used_len;
        s.expected = req.len;
        s.kind = Some(req.ty);
        let (ptr, n) = (s.iov.as_ptr(), s.iov.len() as u32);
        let flags = if writeback { 0 } else { libc::RWF_DSYNC };
        // One segment (the usual case): plain read/write, no iovec import.
        let sqe = match (req.ty, s.iov.as_slice()) {
            (RequestType::In, [one]) => {
                opcode::Read::new(DISK, one.iov_base.cast(), one.iov_len as u32)
                    .offset(off)
                    .build()
            }
            (RequestType::In, _) => opcode::Readv::new(DISK, ptr, n).offset(off).build(),
            (_, [one]) => opcode::Write::new(DISK, one.iov_base.cast(), one.iov_len as u32)
                .offset(off)
                .rw_flags(flags)
                .build(),
            _ => opcode::Writev::new(DISK, ptr, n)
                .offset(off)
                .rw_flags(flags)
                .build(),
        };
        // SAFETY: the iovec array lives in `self.slots[slot]`, which is not
        // touched again until the completion is reaped in this batch, and the
        // buffers are guest memory kept mapped by the caller meanwhile.
        match unsafe { ring.submission().push(&sqe.user_data(slot as u64)) } {
            Ok(()) => None,
            Err(_) => Some(Done::err()),
        }
    }

    /// Submits what is queued on io_uring, then waits until `want`
    /// completions are there.
    fn submit(&mut self, want: usize) -> Result<(), WorkerError> {
        let Some(ring) = self.ring.as_mut() else {
            return Ok(());
        };
        if want > 0 || !ring.submission().is_empty() {
            loop {
                match ring.submit_and_wait(want) {
                    Ok(_) => break,
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                    Err(e) => return Err(WorkerError::Uring(e)),
                }
            }
        }
        Ok(())
    }

    /// TEST ONLY (see [`DeviceSettings::hold_completions`]): when this wave
    /// has finished requests (held synchronous ones, or io_uring completions
    /// waiting to be reaped; the caller waited for the whole wave), sleeps
    /// `hold` before they are published, then takes the next wave's chains
    /// from the available ring (recorded in the inflight region, queued for
    /// the next wave like resubmissions), then publishes the held ones (the
    /// caller reaps io_uring next). Everything published after the sleep was
    /// started before it, so each request waits at least `hold` between being
    /// taken and being used; and as the next wave is taken before this one
    /// is published, the daemon has requests in flight at every moment while
    /// the driver keeps more than a wave queued. The sleep is bounded (the
    /// option is capped), so a pause or stop is delayed by at most that much.
    /// Returns how many requests completed.
    fn hold_and_release<M: GuestMemoryBackend>(
        &mut self,
        hold: Duration,
        mem: &M,
        q: &mut Queue,
        stats: &QueueStats,
    ) -> Result<usize, WorkerError> {
        let uring_done = self
            .ring
            .as_mut()
            .is_some_and(|r| !r.completion().is_empty());
        if self.held.is_empty() && !uring_done {
            return Ok(0);
        }
        std::thread::sleep(hold);
        // Not while the owner wants the pass to end (a new memory map, a
        // pause), and not before pending resubmissions (they are older).
        if self.resubmit.is_empty() && !self.interrupted() {
            while self.resubmit.len() < WAVE {
                let Some(chain) = q.pop_descriptor_chain(mem) else {
                    break;
                };
                let head = chain.head_index();
                if let Some(t) = self.inflight.as_mut() {
                    t.begin(head);
                }
                self.resubmit.push(head);
            }
            // Taken from the end: the oldest goes last.
            self.resubmit.reverse();
        }
        let n = self.held.len();
        for (head, status, d) in self.held.drain(..) {
            finish(mem, q, head, status, d, stats, self.inflight.as_ref())?;
        }
        Ok(n)
    }

    /// Completes everything io_uring has finished. Returns how many
    /// requests completed.
    fn reap<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        q: &mut Queue,
        stats: &QueueStats,
    ) -> Result<usize, WorkerError> {
        let Some(ring) = self.ring.as_mut() else {
            return Ok(0);
        };
        let mut done = 0usize;
        while let Some(cqe) = ring.completion().next() {
            let slot = cqe.user_data() as usize;
            let Some(s) = self.slots.get(slot) else {
                continue;
            };
            let res = cqe.result();
            let ok = res >= 0 && res as u64 == s.expected;
            let status = if ok {
                VIRTIO_BLK_S_OK
            } else {
                VIRTIO_BLK_S_IOERR
            };
            match s.kind {
                Some(RequestType::In) if ok => QueueStats::add(&stats.read_bytes, s.expected),
                Some(RequestType::Out) if ok => QueueStats::add(&stats.write_bytes, s.expected),
                Some(RequestType::Flush) => QueueStats::add(&stats.flushes, 1),
                _ => {}
            }
            let (head, addr, used_len) = (s.head, s.status, s.used_len);
            self.free.push(slot);
            let d = Done { status, used_len };
            finish(mem, q, head, addr, d, stats, self.inflight.as_ref())?;
            done += 1;
        }
        Ok(done)
    }

    #[allow(clippy::too_many_arguments)]
    fn rw_sync<M: GuestMemoryBackend>(
        &mut self,
        disk: &Disk,
        writeback: bool,
        mem: &M,
        req: &Request,
        off: u64,
        used_len: u32,
        stats: &QueueStats,
    ) -> Done {
        let len = req.len as usize;
        if self.bounce.len() < len {
            self.bounce.resize(len, 0);
        }
        let buf = &mut self.bounce[..len];
        let ok = if req.ty == RequestType::In {
            disk.read_at(buf, off).is_ok() && scatter(mem, &self.segs, buf).is_ok()
        } else {
            gather(mem, &self.segs, buf).is_ok()
                && disk.write_at(buf, off).is_ok()
                && (writeback || disk.flush().is_ok())
        };
        if !ok {
            return Done::err();
        }
        let c = if req.ty == RequestType::In {
            &stats.read_bytes
        } else {
            &stats.write_bytes
        };
        QueueStats::add(c, req.len);
        Done::ok(used_len)
    }

    fn discard_or_zero<M: GuestMemoryBackend>(
        &mut self,
        disk: &Disk,
        settings: &DeviceSettings,
        mem: &M,
        req: &Request,
    ) -> Done {
        let len = req.len as usize;
        if req.len == 0 || !req.len.is_multiple_of(DWZ_SEGMENT_SIZE) {
            return Done::err();
        }
        if req.len / DWZ_SEGMENT_SIZE > u64::from(settings.max_dwz_segments) {
            return Done::err();
        }
        if self.bounce.len() < len {
            self.bounce.resize(len, 0);
        }
        if gather(mem, &self.segs, &mut self.bounce[..len]).is_err() {
            return Done::err();
        }
        for seg in self.bounce[..len].chunks_exact(DWZ_SEGMENT_SIZE as usize) {
            let sector = u64::from_le_bytes([
                seg[0], seg[1], seg[2], seg[3], seg[4], seg[5], seg[6], seg[7],
            ]);
            let num = u64::from(u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]));
            let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
            let unmap = flags & 1 != 0;
            if flags & !1 != 0 || (req.ty == RequestType::Discard && unmap) {
                return Done::unsupp();
            }
            let (Some(off), Some(n)) = (
                sector.checked_mul(SECTOR_SIZE),
                num.checked_mul(SECTOR_SIZE),
            ) else {
                return Done::err();
            };
            let r = if req.ty == RequestType::Discard {
                disk.discard(off, n)
            } else {
                disk.write_zeroes(off, n, unmap)
            };
            if r.is_err() {
                return Done::err();
            }
        }
        Done::ok(1)
    }
}

/// Requests taken from the ring per wave before the wave is submitted and
/// its completions are returned (see `run_pipeline`).
const WAVE: usize = 8;

/// The disk's file in the ring's registered file table.
const DISK: types::Fixed = types::Fixed(0);

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

/// Byte offset of an In/Out request if it is sector-aligned and in range.
fn data_range(disk: &Disk, req: &Request) -> Option<u64> {
    if !req.len.is_multiple_of(SECTOR_SIZE) {
        return None;
    }
    let off = req.sector.checked_mul(SECTOR_SIZE)?;
    (off.checked_add(req.len)? <= disk.size()).then_some(off)
}

/// Copies `buf` into the payload segments (device-writable).
fn scatter<M: GuestMemoryBackend>(mem: &M, segs: &Segments, mut buf: &[u8]) -> Result<(), ()> {
    for &(addr, len) in &segs.data {
        if buf.is_empty() {
            break;
        }
        let n = (len as usize).min(buf.len());
        mem.write_slice(&buf[..n], addr).map_err(|_| ())?;
        buf = &buf[n..];
    }
    Ok(())
}

/// Copies the payload segments (device-readable) into `buf`.
fn gather<M: GuestMemoryBackend>(mem: &M, segs: &Segments, mut buf: &mut [u8]) -> Result<(), ()> {
    for &(addr, len) in &segs.data {
        if buf.is_empty() {
            break;
        }
        let n = (len as usize).min(buf.len());
        mem.read_slice(&mut buf[..n], addr).map_err(|_| ())?;
        buf = &mut buf[n..];
    }
    Ok(())
}

/// Puts `head` in the used ring, keeping the inflight record in step.
fn add_used<M: GuestMemoryBackend>(
    mem: &M,
    q: &mut Queue,
    head: u16,
    len: u32,
    inflight: Option<&QueueInflight>,
) -> Result<(), WorkerError> {
    if let Some(t) = inflight {
        t.before_used(head);
    }
    q.add_used(mem, head, len).map_err(queue_err)?;
    if let Some(t) = inflight {
        t.after_used(head, q.next_used());
    }
    Ok(())
}

/// Writes the status byte and returns the chain to the driver.
fn finish<M: GuestMemoryBackend>(
    mem: &M,
    q: &mut Queue,
    head: u16,
    status_addr: GuestAddress,
    done: Done,
    stats: &QueueStats,
    inflight: Option<&QueueInflight>,
) -> Result<(), WorkerError> {
    // The address was validated when the chain was parsed.
    let _ = mem.write_obj(done.status as u8, status_addr);
    QueueStats::add(&stats.requests, 1);
    match done.status {
        VIRTIO_BLK_S_OK => {}
        VIRTIO_BLK_S_UNSUPP => QueueStats::add(&stats.unsupported, 1),
        _ => QueueStats::add(&stats.io_errors, 1),
    }
    add_used(mem, q, head, done.used_len, inflight)
}

/// Shortest poll window worth spinning for.
const MIN_POLL: Duration = Duration::from_micros(2);

/// The busy-poll window after the queue runs dry, adapted like QEMU's
/// aio-poll: when the queue is woken by a kick sooner than the largest
/// window (`--poll-us`), polling that long would have caught the request
/// without the kick and the wake-up, so the window grows; when it slept
/// longer, polling would have been wasted and the window shrinks. An idle
/// queue thus stops spinning, a busy one spins just long enough.
#[derive(Debug, Default)]
struct PollWindow {
    window: Duration,
    asleep_since: Option<Instant>,
}

impl PollWindow {
    /// The queue is about to wait for a kick.
    fn sleeping(&mut self) {
        self.asleep_since = Some(Instant::now());
    }

    /// The queue was woken; `max` is the largest window (zero: no polling).
    fn woken(&mut self, max: Duration) {
        if let Some(since) = self.asleep_since.take() {
            self.adapt(since.elapsed(), max);
        }
    }

    /// Adapts the window to a sleep of `slept`.
    fn adapt(&mut self, slept: Duration, max: Duration) {
        if max.is_zero() {
            self.window = Duration::ZERO;
            return;
        }
        if slept >= max {
            self.window /= 2;
            if self.window < MIN_POLL {
                self.window = Duration::ZERO;
            }
        } else if slept > self.window {
            self.window = (self.window * 2).max(MIN_POLL).min(max);
        }
    }
}

impl Worker {
    /// Polls the available ring for up to the current poll window; `true`
    /// when a new chain arrived (and the worker was not interrupted).
    fn poll_avail<M: GuestMemoryBackend>(&self, q: &Queue, mem: &M) -> Result<bool, WorkerError> {
        let window = self.poll.window;
        if window.is_zero() {
            return Ok(false);
        }
        let deadline = Instant::now() + window;
        while Instant::now() < deadline && !self.interrupted() {
            let avail = q.avail_idx(mem, Ordering::Acquire).map_err(queue_err)?;
            if avail.0 != q.next_avail() {
                return Ok(true);
            }
            // Yield rather than spin: when the driver runs on this CPU, it
            // gets to publish its next request at once (and anything else
            // runnable here gets the CPU); otherwise this returns at once.
            std::thread::yield_now();
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_micros(50);

    #[test]
    fn poll_window_grows_on_short_sleeps_and_shrinks_to_zero_when_idle() {
        let mut p = PollWindow::default();
        assert_eq!(p.window, Duration::ZERO);
        // Kicked 10 us after going to sleep, again and again: the window
        // grows past 10 us (polling would have caught it) up to the cap.
        let short = Duration::from_micros(10);
        let mut steps = 0;
        while p.window <= short {
            p.adapt(short, MAX);
            steps += 1;
            assert!(steps < 10, "window stuck at {:?}", p.window);
        }
        assert!(p.window <= MAX);
        // A sleep shorter than the window (the poll itself failed just
        // before) does not grow it further.
        let w = p.window;
        p.adapt(w / 2, MAX);
        assert_eq!(p.window, w);
        // Long sleeps: the window halves down to nothing.
        for _ in 0..10 {
            p.adapt(Duration::from_millis(5), MAX);
        }
        assert_eq!(p.window, Duration::ZERO);
        // Growth never exceeds the cap; a zero cap switches polling off.
        for _ in 0..20 {
            p.adapt(Duration::from_micros(49), MAX);
        }
        assert_eq!(p.window, MAX);
        p.adapt(short, Duration::ZERO);
        assert_eq!(p.window, Duration::ZERO);
    }
}
