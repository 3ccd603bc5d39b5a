//! The per-queue request engine: pops descriptor chains, parses them
//! ([`crate::request`]), hands the disk operations to the queue's
//! [`DiskBackend`] and completes them ([`crate::complete`]). It calls only
//! the backend trait, so raw (io_uring), qcow2 and later backends run under
//! the same engine. Nothing here allocates per request once the buffers
//! have grown to the largest request seen.
//!
//! Chains are taken in waves of `WAVE` (8): each wave is submitted and what
//! has completed goes to the used ring (one notification at most, EVENT_IDX
//! permitting) before the next wave, so the driver refills the ring while
//! the device works. A queue that runs dry polls its available ring for an
//! adaptive window (`PollWindow`) before it goes back to waiting for kicks.
//!
//! Completions are event-driven when the backend has a completion eventfd
//! ([`QueueEngine::completion_fd`]): a pass that runs out of chains returns
//! to the queue's event loop with its operations still in flight, and the
//! owner runs the next pass when the eventfd fires (or a kick arrives); the
//! pass reaps first. The engine waits for completions itself only when no
//! tag is free, when the owner wants it stopped ([`QueueEngine::watch`],
//! [`QueueEngine::wait_all`], [`QueueEngine::abandon`]), and for backends
//! without an eventfd. The owner keeps the guest memory of a pass mapped
//! while [`QueueEngine::in_flight`] is not zero.
//!
//! With an inflight region ([`crate::inflight`]), every head taken from the
//! available ring is recorded until it is in the used ring, and after a
//! restart the recorded heads are resubmitted, oldest first, before new ones.
//!
//! Hooks for later work live here, once: [`QueueEngine::admit`] (rate
//! limiting before submission) and the dirty-marking point in
//! [`crate::complete::publish`].
//!
//! A failed request is counted by kind and logged, rate-limited
//! ([`crate::errors`]). A broken ring (an available index no ring can hold)
//! ends the pass with [`QueueError::Queue`] after the requests in flight
//! have completed; the caller counts it and the queue serves again at the
//! next kick once the driver repaired the ring (see
//! [`QueueEngine::ring_broken`]).
//!
//! This module knows virtio queues and guest memory, not vhost-user.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::chain::ChainWalker;
use crate::complete::{avail_ok, notify, op_done, publish, Done, Pending};
use crate::disk::{open_backend, BackendError, Capabilities, Completion, Disk, DiskBackend};
use crate::dispatch::{Dispatch, Env, Prepared};
use crate::errors::{report, Chain, LogLimit, RequestError};
use crate::inflight::QueueInflight;
use crate::poll::PollWindow;
use crate::request::{parse, Request};
use crate::stats::QueueStats;

mod hold;

/// Errors that end a pass over a queue (per-request errors become a virtio
/// status).
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The disk backend failed as a whole.
    #[error("disk backend")]
    Backend(#[from] BackendError),
    /// The virtqueue itself is broken (bad ring addresses, an available
    /// index no ring can hold ...).
    #[error("virtqueue: {0:?}")]
    Queue(virtio_queue::Error),
}

/// Device settings a queue needs.
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
    /// I/O was started and before they go to the used ring. The requests stay
    /// recorded in the inflight region meanwhile, so that the crash tests
    /// can count on requests being in flight whenever they kill the daemon.
    pub hold_completions: Duration,
}

/// Everything one pass over a queue works with, besides the engine.
pub struct QueueCtx<'a, M: GuestMemoryBackend> {
    /// Queue number (for log lines).
    pub index: usize,
    /// Device settings.
    pub settings: &'a DeviceSettings,
    /// Writeback cache (false: writes are durable when completed).
    pub writeback: bool,
    /// The virtqueue.
    pub q: &'a mut Queue,
    /// Guest memory, kept mapped for the whole pass.
    pub mem: &'a M,
    /// The queue's counters.
    pub stats: &'a QueueStats,
    /// Tells the driver about used buffers.
    pub signal: &'a mut dyn FnMut(),
}

impl<M: GuestMemoryBackend> std::fmt::Debug for QueueCtx<'_, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueCtx")
            .field("index", &self.index)
            .field("writeback", &self.writeback)
            .finish_non_exhaustive()
    }
}

/// The engine of one queue.
pub struct QueueEngine {
    disk: Box<dyn DiskBackend>,
    caps: Capabilities,
    /// Requests in flight, by tag.
    slots: Vec<Pending>,
    /// Tags not in flight.
    free: Vec<usize>,
    /// Request-to-operation buffers.
    dispatch: Dispatch,
    /// Inflight tracking shared with the frontend, if it set one up.
    inflight: Option<QueueInflight>,
    /// Recover from `inflight` before the next pass.
    recover: bool,
    /// Heads to resubmit before taking new ones (the next one last).
    resubmit: Vec<u16>,
    /// The adaptive busy-poll window.
    poll: PollWindow,
    /// Bumped by the owner to make `process` return (see [`QueueEngine::watch`]).
    epoch: Option<Arc<AtomicU64>>,
    /// `epoch` as of the last [`Processed::Interrupted`].
    seen_epoch: u64,
    /// The backend's completion eventfd: completions are reaped when it
    /// fires on the owner's event loop (`None`: a pass waits for them).
    completion_fd: Option<std::os::unix::io::RawFd>,
    /// Rate limit of this queue's failed-request log lines.
    log: LogLimit,
    /// Rate limit of this queue's broken-ring log lines (a separate budget:
    /// one flood must not hide the other).
    ring_log: LogLimit,
    /// Synchronous completions of the current wave held back by the test-only
    /// [`DeviceSettings::hold_completions`] (empty unless it is set; at most
    /// [`WAVE`], the capacity reserved up front).
    held: Vec<(u16, Option<GuestAddress>, Done)>,
}

/// How [`QueueEngine::process`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Processed {
    /// The queue is empty and notifications are enabled.
    Idle,
    /// The owner bumped the epoch (see [`QueueEngine::watch`]): nothing is
    /// in flight any more, chains may be left in the ring, and `process`
    /// must be called again (with the current memory map) to serve them.
    Interrupted,
}

impl std::fmt::Debug for QueueEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueEngine")
            .field("depth", &self.slots.len())
            .field("in_flight", &(self.slots.len() - self.free.len()))
            .finish()
    }
}

/// How starting a request went.
enum Started {
    /// Its operation is in flight under the tag.
    Queued,
    /// It is finished.
    Done(Done),
}

/// Admission decision of the rate-limiting hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admit {
    /// Submit now.
    Go,
}

impl QueueEngine {
    /// An engine for `disk` with up to `depth` requests in flight, on the
    /// backend [`open_backend`] picks.
    pub fn new(disk: &Arc<Disk>, depth: u16) -> Result<QueueEngine, QueueError> {
        Ok(QueueEngine::with_backend(open_backend(disk, depth)?))
    }

    /// An engine on `disk`.
    pub fn with_backend(mut disk: Box<dyn DiskBackend>) -> QueueEngine {
        let depth = disk.depth().max(1);
        let completion_fd = match disk.completion_fd() {
            Ok(fd) => fd,
            Err(e) => {
                log::warn!(
                    "no completion eventfd ({}): completions are waited for in the pass",
                    Chain(&e)
                );
                None
            }
        };
        QueueEngine {
            completion_fd,
            caps: disk.capabilities(),
            disk,
            slots: vec![Pending::default(); depth],
            free: (0..depth).rev().collect(),
            dispatch: Dispatch::default(),
            inflight: None,
            recover: false,
            // Room for the test-only hold's next wave (see hold_and_release).
            resubmit: Vec::with_capacity(WAVE),
            poll: PollWindow::default(),
            epoch: None,
            seen_epoch: 0,
            log: LogLimit::new(),
            ring_log: LogLimit::new(),
            held: Vec::with_capacity(WAVE),
        }
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

    /// The eventfd that becomes readable when operations completed (one
    /// edge per completion batch; nobody reads it: watch it edge-triggered);
    /// `None` when the engine waits for completions itself.
    pub fn completion_fd(&self) -> Option<std::os::unix::io::RawFd> {
        self.completion_fd
    }

    /// Number of requests in flight: while it is not zero, the guest memory
    /// of the pass that left them in flight must stay mapped, and a later
    /// pass (or [`QueueEngine::wait_all`]) must complete them.
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
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
        ctx: &mut QueueCtx<'_, M>,
    ) -> Result<(), QueueError> {
        self.recover = false;
        let Some(t) = self.inflight.as_mut() else {
            return Ok(());
        };
        let (q, mem) = (&mut *ctx.q, ctx.mem);
        let used = q
            .used_idx(mem, Ordering::Acquire)
            .map_err(QueueError::Queue)?
            .0;
        let heads = t.recover(used, q.size());
        let next = used.wrapping_add(heads.len() as u16);
        let avail = q
            .avail_idx(mem, Ordering::Acquire)
            .map_err(QueueError::Queue)?
            .0;
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
        QueueStats::add(&ctx.stats.resubmitted, heads.len() as u64);
        self.resubmit = heads;
        self.resubmit.reverse();
        Ok(())
    }

    /// Processes the queue until it is empty with notifications enabled
    /// (or it was interrupted, see [`QueueEngine::watch`]). On an error
    /// nothing is left in flight.
    pub fn process<M: GuestMemoryBackend>(
        &mut self,
        ctx: &mut QueueCtx<'_, M>,
    ) -> Result<Processed, QueueError> {
        let r = self.pass(ctx);
        if r.is_err() {
            self.drain(ctx);
        }
        r
    }

    fn pass<M: GuestMemoryBackend>(
        &mut self,
        ctx: &mut QueueCtx<'_, M>,
    ) -> Result<Processed, QueueError> {
        if self.interrupted() {
            self.wait_all(ctx)?;
            return Ok(self.interrupt_seen());
        }
        if self.recover {
            self.recover(ctx)?;
        }
        self.poll.woken(ctx.settings.poll);
        loop {
            ctx.q
                .disable_notification(ctx.mem)
                .map_err(QueueError::Queue)?;
            loop {
                let n = self.run_pipeline(ctx)?;
                if self.interrupted() {
                    self.wait_all(ctx)?;
                    return Ok(self.interrupt_seen());
                }
                // With operations in flight the completion event (or a kick)
                // brings us back: no busy-polling past it.
                if n == 0 && (self.in_flight() > 0 || !self.poll_avail(ctx)?) {
                    break;
                }
            }
            if !ctx
                .q
                .enable_notification(ctx.mem)
                .map_err(QueueError::Queue)?
            {
                self.poll.sleeping();
                return Ok(Processed::Idle);
            }
            // More is available: unless the driver published an available
            // index no ring can hold (we would spin on it forever).
            avail_ok(ctx)?;
        }
    }

    /// For owners without an event loop (tools, tests): [`QueueEngine::process`]
    /// until nothing is in flight, waiting for a completion between passes.
    pub fn process_all<M: GuestMemoryBackend>(
        &mut self,
        ctx: &mut QueueCtx<'_, M>,
    ) -> Result<Processed, QueueError> {
        loop {
            let how = self.process(ctx)?;
            if how == Processed::Interrupted || self.in_flight() == 0 {
                return Ok(how);
            }
            self.disk.kick(true)?;
        }
    }

    /// After an error: waits for what is in flight (its memory must stay
    /// mapped) and completes it as far as the ring allows.
    fn drain<M: GuestMemoryBackend>(&mut self, ctx: &mut QueueCtx<'_, M>) {
        let mut unsignalled = 0;
        while self.in_flight() > 0 {
            if self.disk.kick(true).is_err() {
                break;
            }
            unsignalled += self.reap(ctx).unwrap_or(0);
        }
        let _ = notify(ctx, &mut unsignalled);
    }

    /// Waits for every request in flight and completes it (the owner stops
    /// the queue: a pause, GET_VRING_BASE, a new memory map). `ctx.mem` may
    /// be a newer map than the one the requests were started with; the
    /// owner keeps that one mapped until this returns.
    pub fn wait_all<M: GuestMemoryBackend>(
        &mut self,
        ctx: &mut QueueCtx<'_, M>,
    ) -> Result<(), QueueError> {
        let mut unsignalled = 0;
        while self.in_flight() > 0 {
            self.disk.kick(true)?;
            unsignalled += self.reap(ctx)?;
        }
        notify(ctx, &mut unsignalled)
    }

    /// The frontend went away: waits for the requests in flight (their
    /// guest memory is still mapped by the owner) and forgets them without
    /// completing them. They stay recorded in the inflight region, if any,
    /// so a frontend that reconnects resubmits them.
    pub fn abandon(&mut self) {
        while self.in_flight() > 0 {
            if let Err(e) = self.disk.kick(true) {
                log::error!("waiting for requests of a closed connection: {}", Chain(&e));
                return;
            }
            let free = &mut self.free;
            self.disk.reap(&mut |c: Completion| free.push(c.tag));
        }
    }

    /// A pass ended with `e` (e.g. the driver broke its ring): counts it,
    /// logs it (rate-limited) and re-enables notifications, so the driver's
    /// next kick, once it repaired the ring, is served.
    pub fn ring_broken<M: GuestMemoryBackend>(
        &mut self,
        ctx: &mut QueueCtx<'_, M>,
        e: &QueueError,
    ) {
        QueueStats::add(&ctx.stats.ring_errors, 1);
        if self.ring_log.allow(ctx.index) {
            log::warn!(
                "queue {}: {}; serving again at the next kick",
                ctx.index,
                Chain(e)
            );
        }
        let _ = ctx.q.enable_notification(ctx.mem);
        self.poll.sleeping();
    }

    /// Keeps the backend full: takes available chains while tags are free,
    /// in waves of up to [`WAVE`] requests; after each wave submits it and
    /// completes whatever has finished (notifying the driver), so the driver
    /// reaps and refills one wave while the next is executed. Waits for a
    /// completion when no tag is free, and, without a completion eventfd,
    /// when nothing is available. Runs until nothing is available and
    /// (event-driven) nothing more has completed or (otherwise) nothing is
    /// in flight; returns the number of chains completed.
    fn run_pipeline<M: GuestMemoryBackend>(
        &mut self,
        ctx: &mut QueueCtx<'_, M>,
    ) -> Result<usize, QueueError> {
        let mut completed = 0usize;
        let mut unsignalled = 0usize;
        loop {
            let mut taken = 0usize;
            let mut drained = false;
            while taken < WAVE {
                let Some(&tag) = self.free.last() else {
                    break;
                };
                if self.interrupted() {
                    drained = true;
                    break;
                }
                let (head, parsed) = if let Some(head) = self.resubmit.pop() {
                    let table = GuestAddress(ctx.q.desc_table());
                    let chain = ChainWalker::new(ctx.mem, table, ctx.q.size(), head);
                    (head, parse(ctx.mem, chain, &mut self.dispatch.segs))
                } else {
                    avail_ok(ctx)?;
                    let Some(chain) = ctx.q.pop_descriptor_chain(ctx.mem) else {
                        drained = true;
                        break;
                    };
                    let head = chain.head_index();
                    if let Some(t) = self.inflight.as_mut() {
                        t.begin(head);
                    }
                    (head, parse(ctx.mem, chain, &mut self.dispatch.segs))
                };
                taken += 1;
                let (status, done) = match parsed {
                    Ok(req) => match self.admit(&req) {
                        Admit::Go => match self.start(ctx, head, &req, tag) {
                            Ok(Started::Queued) => {
                                self.free.pop();
                                ctx.stats.in_flight.store(
                                    (self.slots.len() - self.free.len()) as u64,
                                    Ordering::Relaxed,
                                );
                                // What already finished (a synchronous
                                // backend completes at submission) goes
                                // back at once, as before the trait: the
                                // request is in flight no longer than it
                                // runs. No system call: the ring is only
                                // entered by `kick`. (Not under the
                                // test-only hold: it publishes after its
                                // sleep.)
                                if ctx.settings.hold_completions.is_zero() {
                                    let n = self.reap(ctx)?;
                                    completed += n;
                                    unsignalled += n;
                                }
                                continue;
                            }
                            Ok(Started::Done(d)) => (Some(req.status), d),
                            Err(e) => {
                                report(&mut self.log, ctx.stats, ctx.index, head, &e);
                                (Some(req.status), Done::err())
                            }
                        },
                    },
                    Err((e, status)) => {
                        QueueStats::add(&ctx.stats.malformed, 1);
                        report(
                            &mut self.log,
                            ctx.stats,
                            ctx.index,
                            head,
                            &RequestError::Malformed(e),
                        );
                        (status, Done::err())
                    }
                };
                if ctx.settings.hold_completions.is_zero() {
                    publish(ctx, self.inflight.as_ref(), head, status, done)?;
                    completed += 1;
                    unsignalled += 1;
                } else {
                    // Test-only hold: published after the wave's sleep.
                    self.held.push((head, status, done));
                }
            }
            let mut idle = drained || taken == 0;
            let holding = !ctx.settings.hold_completions.is_zero();
            if holding {
                let n = self.hold_and_release(ctx)?;
                completed += n;
                unsignalled += n;
                idle &= self.resubmit.is_empty();
            }
            if self.in_flight() > 0 {
                // Wait for a completion only when no tag is free, or when
                // nothing else is left and no completion event will call us
                // back (no eventfd, or the test-only hold, which keeps a
                // pass until its requests are done).
                let evented = self.completion_fd.is_some() && !holding;
                let wait = self.free.is_empty() || (idle && !evented);
                self.disk.kick(wait)?;
                let n = self.reap(ctx)?;
                completed += n;
                unsignalled += n;
                if idle && !wait && n == 0 {
                    break;
                }
            } else if idle {
                break;
            }
            notify(ctx, &mut unsignalled)?;
        }
        notify(ctx, &mut unsignalled)?;
        Ok(completed)
    }

    /// The rate-limiting point, before a request's operation is submitted
    /// (QoS): every request goes at once today.
    #[inline(always)]
    fn admit(&mut self, _req: &Request) -> Admit {
        Admit::Go
    }

    /// Starts a request under `tag`.
    fn start<M: GuestMemoryBackend>(
        &mut self,
        ctx: &mut QueueCtx<'_, M>,
        head: u16,
        req: &Request,
        tag: usize,
    ) -> Result<Started, RequestError> {
        let env = Env {
            caps: self.caps,
            size: self.disk.size(),
            writeback: ctx.writeback,
            settings: ctx.settings,
        };
        match self.dispatch.prepare(ctx.mem, env, req)? {
            Prepared::Done(d) => Ok(Started::Done(d)),
            Prepared::Op {
                op,
                used_len,
                expected,
            } => {
                // Before submitting: a synchronous backend does the work there.
                let started = Instant::now();
                self.disk.submit(tag, op).map_err(RequestError::Disk)?;
                self.slots[tag] = Pending {
                    head,
                    status: req.status,
                    used_len,
                    expected,
                    kind: req.ty,
                    started,
                };
                Ok(Started::Queued)
            }
        }
    }

    /// Completes every operation the backend has finished; returns how many.
    fn reap<M: GuestMemoryBackend>(
        &mut self,
        ctx: &mut QueueCtx<'_, M>,
    ) -> Result<usize, QueueError> {
        let QueueEngine {
            disk,
            slots,
            free,
            inflight,
            log,
            ..
        } = self;
        let mut first_err = None;
        let n = disk.reap(&mut |c: Completion| {
            let Some(p) = slots.get(c.tag) else {
                return;
            };
            free.push(c.tag);
            if first_err.is_none() {
                if let Err(e) = op_done(ctx, inflight.as_ref(), log, p, c.result) {
                    first_err = Some(e);
                }
            }
        });
        ctx.stats
            .in_flight
            .store((slots.len() - free.len()) as u64, Ordering::Relaxed);
        match first_err {
            Some(e) => Err(e),
            None => Ok(n),
        }
    }
}

/// Requests taken from the ring per wave before the wave is submitted and
/// its completions are returned (see `run_pipeline`).
const WAVE: usize = 8;

impl QueueEngine {
    /// Polls the available ring for up to the current poll window; `true`
    /// when a new chain arrived (and the engine was not interrupted).
    fn poll_avail<M: GuestMemoryBackend>(&self, ctx: &QueueCtx<'_, M>) -> Result<bool, QueueError> {
        let window = self.poll.window;
        if window.is_zero() {
            return Ok(false);
        }
        let deadline = Instant::now() + window;
        while Instant::now() < deadline && !self.interrupted() {
            let avail = ctx
                .q
                .avail_idx(ctx.mem, Ordering::Acquire)
                .map_err(QueueError::Queue)?;
            if avail.0 != ctx.q.next_avail() {
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
