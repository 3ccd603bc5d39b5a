//! The block device model: settings, configuration space, the disk, the
//! per-queue engines and counters, and the control operations (pause,
//! resize, snapshots). It knows virtio queues and guest memory, not
//! vhost-user: the adapter in [`crate::backend`] maps vhost-user messages
//! and events onto it, and gives it a [`Transport`] for the two things only
//! the connection can do (restarting the queues after a pause, telling the
//! guest about a configuration change).

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use virtio_bindings::virtio_blk::VIRTIO_BLK_F_CONFIG_WCE;
use virtio_queue::Queue;
use vm_memory::atomic::GuestMemoryLoadGuard;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use crate::disk::{Disk, DiskError};
use crate::inflight::InflightRegion;
use crate::queue::{DeviceSettings, Processed, QueueCtx, QueueEngine, QueueError};
use crate::stats::QueueStats;
use crate::virtio::{config_space, device_features, ConfigParams, WRITEBACK_OFFSET};

/// Errors of device operations.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A queue engine could not be set up.
    #[error("queue setup")]
    Queue(#[source] QueueError),
    /// A configuration-space write the device does not allow.
    #[error("only the writeback byte is writable")]
    ConfigReadOnly,
    /// A memory region the device cannot use.
    #[error("memory region of {len} bytes at offset {offset} exceeds its file ({file} bytes)")]
    RegionPastFile {
        /// Region length.
        len: u64,
        /// Offset in the file.
        offset: u64,
        /// File length.
        file: u64,
    },
    /// Looking at a memory region's file failed.
    #[error("memory region file")]
    RegionFile(#[source] io::Error),
    /// A queue was kicked before the guest memory map was set.
    #[error("queue kicked before the memory table was set")]
    NoMemory,
    /// No such queue.
    #[error("no queue {0}")]
    NoQueue(usize),
    /// The connection cannot carry a configuration-change message.
    #[error("the frontend did not open a backend channel")]
    NoBackendChannel,
    /// The configuration-change message could not be sent.
    #[error("config-change message")]
    Notify(#[source] io::Error),
    /// The disk refused an operation.
    #[error(transparent)]
    Disk(#[from] DiskError),
}

/// What only the transport (the vhost-user connection) can do for the
/// device.
pub trait Transport: Send + Sync {
    /// Serves the queues of the current connection again (after a pause).
    fn restart_queues(&self, device: &BlkDevice);
    /// Completes what the queues of the current connection have in flight
    /// ([`BlkDevice::drain_queue`] for each queue).
    fn drain_queues(&self, device: &BlkDevice);
    /// Tells the guest that the configuration space changed.
    fn notify_config_change(&self) -> io::Result<()>;
}

/// A queue's engine, and the guest memory its requests in flight use.
#[derive(Debug)]
struct Engine {
    engine: QueueEngine,
    /// The maps of the passes that left requests in flight (they read and
    /// write them), kept mapped until nothing is in flight; usually one.
    pinned: Vec<GuestMemoryLoadGuard<GuestMemoryMmap>>,
}

impl Engine {
    fn lock(m: &Mutex<Engine>) -> std::sync::MutexGuard<'_, Engine> {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// After a pass over `mem`: keeps it (and the maps pinned before)
    /// mapped while requests are in flight, releases them all otherwise.
    fn pin(&mut self, mem: GuestMemoryLoadGuard<GuestMemoryMmap>) {
        if self.engine.in_flight() == 0 {
            self.pinned.clear();
        } else if !self
            .pinned
            .iter()
            .any(|p| std::ptr::eq::<GuestMemoryMmap>(&**p, &*mem))
        {
            self.pinned.push(mem);
        }
    }
}

/// Shared state of the device.
pub struct BlkDevice {
    /// The disk.
    pub disk: Arc<Disk>,
    /// Per-queue counters.
    pub stats: Vec<QueueStats>,
    settings: DeviceSettings,
    params: Mutex<ConfigParams>,
    engines: Vec<Mutex<Engine>>,
    writeback: AtomicBool,
    acked: AtomicU64,
    mem: RwLock<Option<GuestMemoryAtomic<GuestMemoryMmap>>>,
    /// Bumped after each memory map change and on pause: the engines watch
    /// it and return from a pass (which may be polling) when it moves.
    epoch: Arc<AtomicU64>,
    /// While set, queues leave requests in the rings (quiesce).
    paused: AtomicBool,
    transport: Mutex<Option<Arc<dyn Transport>>>,
}

impl std::fmt::Debug for BlkDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkDevice")
            .field("disk", &self.disk)
            .field("queues", &self.engines.len())
            .finish()
    }
}

impl BlkDevice {
    /// A device serving `disk` with `num_queues` queues of `queue_size`.
    pub fn new(
        disk: Arc<Disk>,
        num_queues: u16,
        queue_size: u16,
        writeback: bool,
        settings: DeviceSettings,
    ) -> Result<BlkDevice, DeviceError> {
        let epoch = Arc::new(AtomicU64::new(0));
        let engines = (0..num_queues)
            .map(|_| {
                let mut engine = QueueEngine::new(&disk, queue_size).map_err(DeviceError::Queue)?;
                engine.watch(epoch.clone());
                Ok(Mutex::new(Engine {
                    engine,
                    pinned: Vec::new(),
                }))
            })
            .collect::<Result<Vec<_>, DeviceError>>()?;
        let (opt_io, discard_align) = match disk.qcow2() {
            Some(q) => (q.cluster_size() as u32, q.cluster_size() as u32),
            None => (0, 4096),
        };
        let params = ConfigParams {
            capacity_bytes: disk.size(),
            queue_size,
            num_queues,
            writeback,
            opt_io_bytes: opt_io,
            discard_alignment_bytes: discard_align,
        };
        Ok(BlkDevice {
            stats: (0..num_queues).map(|_| QueueStats::default()).collect(),
            disk,
            settings,
            params: Mutex::new(params),
            engines,
            writeback: AtomicBool::new(writeback),
            acked: AtomicU64::new(0),
            mem: RwLock::new(None),
            epoch,
            paused: AtomicBool::new(false),
            transport: Mutex::new(None),
        })
    }

    /// Number of queues.
    pub fn num_queues(&self) -> usize {
        self.engines.len()
    }

    /// Largest queue size.
    pub fn queue_size(&self) -> u16 {
        self.params
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .queue_size
    }

    /// The virtio features offered.
    pub fn features(&self) -> u64 {
        device_features(self.disk.read_only())
    }

    /// Records the features the driver acked.
    pub fn set_acked(&self, features: u64) {
        self.acked.store(features, Ordering::Relaxed);
    }

    /// Sets the transport (the current connection's helper).
    pub fn set_transport(&self, t: Arc<dyn Transport>) {
        *self.transport.lock().unwrap_or_else(|e| e.into_inner()) = Some(t);
    }

    /// Current configuration space.
    pub fn config(&self) -> [u8; crate::virtio::CONFIG_SPACE_SIZE] {
        let mut p = self
            .params
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        p.capacity_bytes = self.disk.size();
        p.writeback = self.writeback.load(Ordering::Relaxed);
        config_space(&p)
    }

    /// A driver write into the configuration space (only the writeback
    /// byte, when CONFIG_WCE was acked).
    pub fn set_config(&self, offset: u32, buf: &[u8]) -> Result<(), DeviceError> {
        let wce = self.acked.load(Ordering::Relaxed) & (1 << VIRTIO_BLK_F_CONFIG_WCE) != 0;
        if offset as usize == WRITEBACK_OFFSET && buf.len() == 1 && wce {
            self.writeback.store(buf[0] != 0, Ordering::Relaxed);
            return Ok(());
        }
        Err(DeviceError::ConfigReadOnly)
    }

    /// A new guest memory map: refuses regions past the end of their file,
    /// then makes every queue pick up the map at its next pass.
    pub fn set_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> Result<(), DeviceError> {
        check_regions_fit_files(&mem.memory())?;
        *self.mem.write().unwrap_or_else(|e| e.into_inner()) = Some(mem);
        self.epoch.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Tells the frontend that the configuration changed (after a resize).
    pub fn notify_config_change(&self) -> Result<(), DeviceError> {
        let t = self
            .transport
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match t {
            Some(t) => t.notify_config_change().map_err(DeviceError::Notify),
            None => Err(DeviceError::NoBackendChannel),
        }
    }

    /// Whether queues are paused.
    pub fn paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Stops (`true`) or resumes (`false`) taking requests from the rings.
    /// After `pause(true)` returns, no request is being executed; after
    /// `pause(false)` the requests that arrived meanwhile are processed.
    pub fn pause(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
        let t = self
            .transport
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if paused {
            // A polling or busy queue returns from its pass after waiting
            // for its requests; those a pass left in flight for the
            // completion event are completed here.
            self.epoch.fetch_add(1, Ordering::AcqRel);
            if let Some(t) = &t {
                t.drain_queues(self);
            }
            for e in &self.engines {
                let e = Engine::lock(e);
                if e.engine.in_flight() > 0 {
                    log::error!("pause: a queue still has requests in flight");
                }
            }
            return;
        }
        if let Some(t) = t {
            t.restart_queues(self);
        }
    }

    /// Runs `f` with the queues stopped and drained and the disk flushed.
    pub fn quiesced<T>(&self, f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
        self.pause(true);
        let r = self
            .disk
            .flush()
            .map_err(|e| format!("flush: {e}"))
            .and_then(|()| f());
        self.pause(false);
        r
    }

    /// Grows the disk with the queues quiesced, then tells the guest;
    /// returns whether the guest was notified.
    pub fn resize(&self, size: u64) -> Result<bool, String> {
        self.quiesced(|| self.disk.resize(size).map_err(|e| e.to_string()))?;
        Ok(match self.notify_config_change() {
            Ok(()) => true,
            Err(e) => {
                log::warn!("resize: guest not notified: {e}");
                false
            }
        })
    }

    /// A frontend connection ended: waits for the requests it left in
    /// flight (without completing them: its rings are gone) and forgets its
    /// inflight region.
    pub fn disconnected(&self) {
        for e in &self.engines {
            let mut e = Engine::lock(e);
            e.engine.abandon();
            e.pinned.clear();
            e.engine.set_inflight(None);
        }
    }

    /// The engine's completion eventfd for queue `index` (see
    /// [`QueueEngine::completion_fd`]): the transport runs the queue when
    /// it fires.
    pub fn completion_fd(&self, index: usize) -> Option<std::os::unix::io::RawFd> {
        self.engines
            .get(index)
            .and_then(|e| Engine::lock(e).engine.completion_fd())
    }

    /// Waits for the requests queue `index` has in flight and completes
    /// them on `q` (GET_VRING_BASE, a pause).
    pub fn drain_queue(
        &self,
        index: usize,
        q: &mut Queue,
        signal: &mut dyn FnMut(),
    ) -> Result<(), DeviceError> {
        let (Some(engine), Some(stats)) = (self.engines.get(index), self.stats.get(index)) else {
            return Err(DeviceError::NoQueue(index));
        };
        let mut e = Engine::lock(engine);
        if e.engine.in_flight() == 0 {
            e.pinned.clear();
            return Ok(());
        }
        let Some(atomic) = self.mem.read().unwrap_or_else(|e| e.into_inner()).clone() else {
            return Err(DeviceError::NoMemory);
        };
        let mem = atomic.memory();
        let mut ctx = QueueCtx {
            index,
            settings: &self.settings,
            writeback: self.writeback.load(Ordering::Relaxed),
            q,
            mem: &*mem,
            stats,
            signal,
        };
        let r = e.engine.wait_all(&mut ctx);
        if let Err(err) = &r {
            e.engine.ring_broken(&mut ctx, err);
            e.engine.abandon();
        }
        e.pinned.clear();
        Ok(())
    }

    /// Tracks in-flight requests of every queue in `region` from now on;
    /// each queue first resubmits what the region records.
    pub fn set_inflight(&self, region: InflightRegion) {
        let region = Arc::new(region);
        for (i, e) in self.engines.iter().enumerate() {
            let q = u16::try_from(i).ok().and_then(|i| region.queue(i));
            Engine::lock(e).engine.set_inflight(q);
        }
    }

    /// Serves queue `index` until it is empty with notifications enabled
    /// (or the device is paused). `signal` tells the driver about used
    /// buffers.
    pub fn run_queue(
        &self,
        index: usize,
        q: &mut Queue,
        signal: &mut dyn FnMut(),
    ) -> Result<(), DeviceError> {
        if self.paused() {
            return Ok(());
        }
        let (Some(engine), Some(stats)) = (self.engines.get(index), self.stats.get(index)) else {
            return Err(DeviceError::NoQueue(index));
        };
        let mut slot = Engine::lock(engine);
        loop {
            if self.paused() {
                return Ok(());
            }
            // A fresh map for each pass: the engine returns when it changes.
            let Some(atomic) = self.mem.read().unwrap_or_else(|e| e.into_inner()).clone() else {
                return Err(DeviceError::NoMemory);
            };
            let mem = atomic.memory();
            let mut ctx = QueueCtx {
                index,
                settings: &self.settings,
                writeback: self.writeback.load(Ordering::Relaxed),
                q: &mut *q,
                mem: &*mem,
                stats,
                signal: &mut *signal,
            };
            let engine = &mut slot.engine;
            let done = match engine.process(&mut ctx) {
                Ok(Processed::Idle) => true,
                Ok(Processed::Interrupted) => false,
                Err(e) => {
                    // Like the net daemon: a broken ring is the guest's
                    // problem. Count it, log it, and keep the queue: the
                    // driver's next kick after it repaired the ring is
                    // served (returning the error would end this queue's
                    // thread until the frontend reconnects).
                    engine.ring_broken(&mut ctx, &e);
                    true
                }
            };
            // Requests left in flight for the completion event use this
            // pass's map.
            slot.pin(mem);
            if done {
                return Ok(());
            }
        }
    }
}

/// Refuses memory regions that extend past the end of the regular file
/// (memfd) backing them: touching those pages would kill the daemon with
/// SIGBUS. (A frontend that shrinks the file later can still do that; it
/// owns the guest's memory anyway.)
fn check_regions_fit_files(mem: &GuestMemoryMmap) -> Result<(), DeviceError> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    for r in mem.iter() {
        let Some(fo) = r.file_offset() else {
            continue;
        };
        let md = fo.file().metadata().map_err(DeviceError::RegionFile)?;
        let end = fo.start().checked_add(r.len());
        if md.is_file() && end.is_none_or(|end| end > md.len()) {
            return Err(DeviceError::RegionPastFile {
                len: r.len(),
                offset: fo.start(),
                file: md.len(),
            });
        }
    }
    Ok(())
}
