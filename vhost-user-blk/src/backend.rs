//! The vhost-user adapter: implements `VhostUserBackend` by delegating to
//! the device model ([`BlkDevice`]). Queue `i` is served by the library's
//! worker thread `i`. The adapter keeps only what belongs to the connection:
//! the vrings (to restart queues after a pause) and the backend channel (for
//! config-change messages).

use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::{
    VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Backend, VhostUserFrontendReqHandler};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::device::{BlkDevice, Transport};
use crate::inflight::{self, InflightRegion};

/// The `VhostUserBackend` handed to `vhost-user-backend`.
#[derive(Debug, Clone)]
pub struct BlkBackend {
    /// The device.
    pub device: Arc<BlkDevice>,
    conn: Arc<Connection>,
}

/// What belongs to the vhost-user connection.
struct Connection {
    /// The vrings of the current connection, to restart queues after a pause.
    vrings: Vec<Mutex<Option<VringRwLock>>>,
    frontend: Mutex<Option<Backend>>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection").finish_non_exhaustive()
    }
}

impl Transport for Connection {
    fn restart_queues(&self, device: &BlkDevice) {
        for (i, slot) in self.vrings.iter().enumerate() {
            let vring = slot.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if let Some(v) = vring {
                if let Err(e) = run(device, &self.vrings, i, &v) {
                    log::warn!("queue {i} after resume: {e}");
                }
            }
        }
    }

    fn drain_queues(&self, device: &BlkDevice) {
        for i in 0..self.vrings.len() {
            drain(device, &self.vrings, i);
        }
    }

    fn notify_config_change(&self) -> io::Result<()> {
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
}

/// Serves queue `index` from `vring` (remembered for restarts).
fn run(
    device: &BlkDevice,
    vrings: &[Mutex<Option<VringRwLock>>],
    index: usize,
    vring: &VringRwLock,
) -> io::Result<()> {
    if let Some(slot) = vrings.get(index) {
        let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(vring.clone());
        }
    }
    if device.paused() {
        return Ok(());
    }
    let mut state = vring.get_mut();
    // The call eventfd cannot be replaced while we hold the vring state, so
    // its raw fd stays valid for this pass (no dup per kick).
    let call = state.get_call().as_ref().map(|c| c.as_raw_fd());
    let mut signal = || outboard_common::daemon::signal_call(call);
    device
        .run_queue(index, state.get_queue_mut(), &mut signal)
        .map_err(io::Error::other)
}

/// Completes what queue `index` has in flight on its current vring.
fn drain(device: &BlkDevice, vrings: &[Mutex<Option<VringRwLock>>], index: usize) {
    let Some(slot) = vrings.get(index) else {
        return;
    };
    let vring = slot.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if let Some(v) = vring {
        let mut state = v.get_mut();
        let call = state.get_call().as_ref().map(|c| c.as_raw_fd());
        let mut signal = || outboard_common::daemon::signal_call(call);
        if let Err(e) = device.drain_queue(index, state.get_queue_mut(), &mut signal) {
            log::warn!("queue {index}: completing requests in flight: {e}");
        }
    }
}

impl BlkBackend {
    /// An adapter for `device` (which it gives its transport).
    pub fn new(device: Arc<BlkDevice>) -> BlkBackend {
        let conn = Arc::new(Connection {
            vrings: (0..device.num_queues()).map(|_| Mutex::new(None)).collect(),
            frontend: Mutex::new(None),
        });
        device.set_transport(conn.clone());
        BlkBackend { device, conn }
    }

    /// The event id of queue completions on a worker thread's epoll (one
    /// past the ids the library reserves).
    pub fn completion_event(&self) -> u64 {
        self.device.num_queues() as u64 + 1
    }

    /// The frontend went away: forgets its vrings and inflight region.
    pub fn disconnected(&self) {
        for slot in &self.conn.vrings {
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
        self.device.disconnected();
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.device.num_queues()
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.device.queue_size())
    }

    fn features(&self) -> u64 {
        self.device.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        self.device.set_acked(features);
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
        if usize::from(msg.num_queues) > self.device.num_queues() {
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
        self.device.set_inflight(region);
        Ok(())
    }

    fn set_event_idx(&self, _enabled: bool) {}

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // GET_VRING_BASE: the frontend takes the ring position next, so
        // every request taken from the ring must be in the used ring first.
        drain(&self.device, &self.conn.vrings, queue_index as usize);
        Ok(())
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let c = self.device.config();
        let start = offset as usize;
        match start.checked_add(size as usize) {
            Some(end) if end <= c.len() => c[start..end].to_vec(),
            _ => Vec::new(),
        }
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        self.device
            .set_config(offset, buf)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        self.device
            .set_memory(mem)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
    }

    fn set_backend_req_fd(&self, backend: Backend) {
        *self.conn.frontend.lock().unwrap_or_else(|e| e.into_inner()) = Some(backend);
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.device.num_queues()).map(|i| 1u64 << i).collect()
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
        // A completion event is for the thread's queue, like its kick.
        let index = if u64::from(device_event) == self.completion_event() {
            0
        } else {
            usize::from(device_event)
        };
        let Some(vring) = vrings.get(index) else {
            return Err(io::Error::other(format!(
                "event {device_event} for no vring"
            )));
        };
        // One queue per thread: thread i serves queue i.
        run(&self.device, &self.conn.vrings, thread_id, vring)
    }
}
