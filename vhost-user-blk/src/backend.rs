//! The vhost-user adapter: implements `VhostUserBackend` on top of the
//! device model (one [`Worker`] per queue, each driven by its own thread).

use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use vhost::vhost_user::message::{
    VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Backend, VhostUserFrontendReqHandler};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_blk::VIRTIO_BLK_F_CONFIG_WCE;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::disk::Disk;
use crate::inflight::{self, InflightRegion};
use crate::stats::QueueStats;
use crate::virtio::{config_space, device_features, ConfigParams, WRITEBACK_OFFSET};
use crate::worker::{DeviceSettings, Processed, Worker};

/// Shared state of the device.
pub struct BlkDevice {
    /// The disk.
    pub disk: Arc<Disk>,
    /// Per-queue counters.
    pub stats: Vec<QueueStats>,
    settings: DeviceSettings,
    params: Mutex<ConfigParams>,
    workers: Vec<Mutex<Worker>>,
    writeback: AtomicBool,
    acked: AtomicU64,
    mem: RwLock<Option<GuestMemoryAtomic<GuestMemoryMmap>>>,
    /// Bumped after each memory map change and on pause: the workers watch
    /// it and return from a pass (which may be polling) when it moves.
    epoch: Arc<AtomicU64>,
    frontend: Mutex<Option<Backend>>,
    /// While set, queue threads leave requests in the rings (quiesce).
    paused: AtomicBool,
    /// The vrings of the current connection, to restart queues after a pause.
    vrings: Vec<Mutex<Option<VringRwLock>>>,
}

impl std::fmt::Debug for BlkDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkDevice")
            .field("disk", &self.disk)
            .field("queues", &self.workers.len())
            .finish()
    }
}

/// The `VhostUserBackend` handed to `vhost-user-backend`.
#[derive(Debug, Clone)]
pub struct BlkBackend(pub Arc<BlkDevice>);

impl BlkDevice {
    /// A device serving `disk` with `num_queues` queues of `queue_size`.
    pub fn new(
        disk: Arc<Disk>,
        num_queues: u16,
        queue_size: u16,
        writeback: bool,
        settings: DeviceSettings,
    ) -> Result<BlkDevice, crate::worker::WorkerError> {
        let epoch = Arc::new(AtomicU64::new(0));
        let workers = (0..num_queues)
            .map(|_| {
                let mut w = Worker::new(&disk, queue_size)?;
                w.watch(epoch.clone());
                Ok(Mutex::new(w))
            })
            .collect::<Result<Vec<_>, _>>()?;
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
            workers,
            writeback: AtomicBool::new(writeback),
            acked: AtomicU64::new(0),
            mem: RwLock::new(None),
            epoch,
            frontend: Mutex::new(None),
            paused: AtomicBool::new(false),
            vrings: (0..num_queues).map(|_| Mutex::new(None)).collect(),
        })
    }

    fn num_queues(&self) -> usize {
        self.workers.len()
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

    /// Tells the frontend that the configuration changed (after a resize).
    pub fn notify_config_change(&self) -> io::Result<()> {
        match &*self.frontend.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(b) => b
                .handle_config_change()
                .map(|_| ())
                .map_err(io::Error::other),
            None => Err(io::Error::other(
                "the frontend did not open a backend channel",
            )),
        }
    }

    /// Stops (`true`) or resumes (`false`) taking requests from the rings.
    /// After `pause(true)` returns, no request is being executed; after
    /// `pause(false)` the requests that arrived meanwhile are processed.
    pub fn pause(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
        if paused {
            // A polling or busy queue returns from its pass; taking each
            // worker lock waits for the requests it has in flight.
            self.epoch.fetch_add(1, Ordering::AcqRel);
            for w in &self.workers {
                drop(w.lock().unwrap_or_else(|e| e.into_inner()));
            }
            return;
        }
        for (i, slot) in self.vrings.iter().enumerate() {
            let vring = slot.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if let Some(v) = vring {
                if let Err(e) = self.run_queue(i, &v) {
                    log::warn!("queue {i} after resume: {e}");
                }
            }
        }
    }

    /// Forgets the vrings and the inflight region of a connection that ended.
    pub fn disconnected(&self) {
        for slot in &self.vrings {
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
        for w in &self.workers {
            w.lock()
                .unwrap_or_else(|e| e.into_inner())
                .set_inflight(None);
        }
    }

    /// Tracks in-flight requests of every queue in `region` from now on;
    /// each queue first resubmits what the region records.
    pub fn set_inflight(&self, region: InflightRegion) {
        let region = Arc::new(region);
        for (i, w) in self.workers.iter().enumerate() {
            let q = u16::try_from(i).ok().and_then(|i| region.queue(i));
            w.lock().unwrap_or_else(|e| e.into_inner()).set_inflight(q);
        }
    }

    fn run_queue(&self, index: usize, vring: &VringRwLock) -> io::Result<()> {
        if let Some(slot) = self.vrings.get(index) {
            let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
            if slot.is_none() {
                *slot = Some(vring.clone());
            }
        }
        if self.paused.load(Ordering::SeqCst) {
            return Ok(());
        }
        let Some(worker) = self.workers.get(index) else {
            return Err(io::Error::other(format!("no worker for queue {index}")));
        };
        let mut worker = worker.lock().unwrap_or_else(|e| e.into_inner());
        let mut state = vring.get_mut();
        // The call eventfd cannot be replaced while we hold the vring
        // state, so its raw fd stays valid for this pass (no dup per kick).
        let call = state.get_call().as_ref().map(|c| c.as_raw_fd());
        let mut signal = || {
            if let Some(fd) = call {
                let one = 1u64.to_ne_bytes();
                // SAFETY: `fd` is the open call eventfd owned by the vring
                // state we hold; writing 8 bytes from a local buffer.
                let _ = unsafe { libc::write(fd, one.as_ptr().cast(), one.len()) };
            }
        };
        loop {
            if self.paused.load(Ordering::SeqCst) {
                return Ok(());
            }
            // A fresh map for each pass: the worker returns when it changes.
            let Some(atomic) = self.mem.read().unwrap_or_else(|e| e.into_inner()).clone() else {
                return Err(io::Error::other(
                    "queue kicked before the memory table was set",
                ));
            };
            let mem = atomic.memory();
            let writeback = self.writeback.load(Ordering::Relaxed);
            let done = worker
                .process(
                    &self.disk,
                    &self.settings,
                    writeback,
                    state.get_queue_mut(),
                    &*mem,
                    &self.stats[index],
                    &mut signal,
                )
                .map_err(io::Error::other)?;
            if done == Processed::Idle {
                return Ok(());
            }
        }
    }
}

/// Refuses memory regions that extend past the end of the regular file
/// (memfd) backing them: touching those pages would kill the daemon with
/// SIGBUS. (A frontend that shrinks the file later can still do that; it
/// owns the guest's memory anyway.)
fn check_regions_fit_files(mem: &GuestMemoryMmap) -> io::Result<()> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    for r in mem.iter() {
        let Some(fo) = r.file_offset() else {
            continue;
        };
        let md = fo.file().metadata()?;
        let end = fo.start().checked_add(r.len());
        if md.is_file() && end.is_none_or(|end| end > md.len()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "memory region of {} bytes at offset {} exceeds its file ({} bytes)",
                    r.len(),
                    fo.start(),
                    md.len()
                ),
            ));
        }
    }
    Ok(())
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.0.num_queues()
    }

    fn max_queue_size(&self) -> usize {
        usize::from(
            self.0
                .params
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .queue_size,
        )
    }

    fn features(&self) -> u64 {
        device_features(self.0.disk.read_only()) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        self.0.acked.store(features, Ordering::Relaxed);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
    }

    fn get_inflight_fd(
        &self,
        msg: &VhostUserInflight,
    ) -> io::Result<(VhostUserInflight, std::fs::File)> {
        if usize::from(msg.num_queues) > self.0.num_queues() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "more inflight queues than the device has",
            ));
        }
        let (file, size) =
            inflight::create(msg.num_queues, msg.queue_size).map_err(io::Error::other)?;
        Ok((
            VhostUserInflight::new(size, 0, msg.num_queues, msg.queue_size),
            file,
        ))
    }

    fn set_inflight_fd(&self, msg: &VhostUserInflight, file: std::fs::File) -> io::Result<()> {
        let region = InflightRegion::map(
            file,
            msg.mmap_offset,
            msg.mmap_size,
            msg.num_queues,
            msg.queue_size,
        )
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        log::info!(
            "inflight tracking on: {} queue(s) of {}",
            msg.num_queues,
            msg.queue_size
        );
        self.0.set_inflight(region);
        Ok(())
    }

    fn set_event_idx(&self, _enabled: bool) {}

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let c = self.0.config();
        let start = offset as usize;
        match start.checked_add(size as usize) {
            Some(end) if end <= c.len() => c[start..end].to_vec(),
            _ => Vec::new(),
        }
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        let wce = self.0.acked.load(Ordering::Relaxed) & (1 << VIRTIO_BLK_F_CONFIG_WCE) != 0;
        if offset as usize == WRITEBACK_OFFSET && buf.len() == 1 && wce {
            self.0.writeback.store(buf[0] != 0, Ordering::Relaxed);
            return Ok(());
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "only the writeback byte is writable",
        ))
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        check_regions_fit_files(&mem.memory())?;
        *self.0.mem.write().unwrap_or_else(|e| e.into_inner()) = Some(mem);
        self.0.epoch.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    fn set_backend_req_fd(&self, backend: Backend) {
        *self.0.frontend.lock().unwrap_or_else(|e| e.into_inner()) = Some(backend);
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.0.num_queues()).map(|i| 1u64 << i).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected event set {evset:?}")));
        }
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            return Err(io::Error::other(format!(
                "event {device_event} for no vring"
            )));
        };
        // One queue per thread: thread i serves queue i.
        self.0.run_queue(thread_id, vring)
    }
}
