//! The vhost-user adapter: implements `VhostUserBackend` on top of
//! [`NetDevice`]. Queue pair `i` (RX queue `2i`, TX queue `2i+1`) and tap
//! queue `i` are served by worker thread `i`; the tap fd sits on that
//! thread's epoll (edge-triggered) as event [`NetBackend::tap_event`].

use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::{Arc, RwLock};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Backend, VhostUserFrontendReqHandler};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::device::NetDevice;

/// The `VhostUserBackend` handed to `vhost-user-backend`.
#[derive(Debug, Clone)]
pub struct NetBackend {
    /// The device.
    pub device: Arc<NetDevice>,
    mem: Arc<RwLock<Option<GuestMemoryAtomic<GuestMemoryMmap>>>>,
}

enum Dir {
    Rx,
    Tx,
}

impl NetBackend {
    /// An adapter for `device`.
    pub fn new(device: Arc<NetDevice>) -> NetBackend {
        NetBackend {
            device,
            mem: Arc::new(RwLock::new(None)),
        }
    }

    /// The epoll event id of the tap fd on each worker thread (above the
    /// ids the library reserves for the queues and its exit event).
    pub fn tap_event(&self) -> u64 {
        self.device.num_queues() as u64 + 1
    }

    fn run(&self, pair: usize, vring: &VringRwLock, dir: Dir) -> io::Result<()> {
        let mut state = vring.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() {
            return Ok(());
        }
        self.device.start_pair(pair);
        let Some(atomic) = self.mem.read().unwrap_or_else(|e| e.into_inner()).clone() else {
            return Ok(());
        };
        let mem = atomic.memory();
        // The call eventfd cannot be replaced while we hold the vring state,
        // so its raw fd stays valid for this pass.
        let call = state.get_call().as_ref().map(|c| c.as_raw_fd());
        let mut signal = || outboard_common::daemon::signal_call(call);
        let q = state.get_queue_mut();
        let r = match dir {
            Dir::Rx => self
                .device
                .rx(pair, q, &*mem, &mut signal)
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Dir::Tx => self
                .device
                .tx(pair, q, &*mem, &mut signal)
                .map_err(|e| e.to_string()),
        };
        if let Err(e) = r {
            // A broken ring is the guest's problem: count it, keep serving.
            let idx = 2 * pair + usize::from(matches!(dir, Dir::Tx));
            if let Some(s) = self.device.stats.get(idx) {
                crate::stats::QueueStats::add(&s.errors, 1);
            }
            log::debug!("queue {idx}: {e}");
        }
        Ok(())
    }
}

impl VhostUserBackend for NetBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.device.num_queues()
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.device.params().queue_size)
    }

    fn features(&self) -> u64 {
        self.device.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        if let Err(e) = self.device.set_acked(features) {
            log::error!("applying the acked features: {e}");
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::BACKEND_REQ
    }

    fn set_backend_req_fd(&self, backend: Backend) {
        self.device.set_config_notifier(Some(Box::new(move || {
            backend
                .handle_config_change()
                .map(|_| ())
                .map_err(|e| e.to_string())
        })));
    }

    fn set_event_idx(&self, _enabled: bool) {}

    fn vring_enabled(&self, index: usize, enabled: bool) {
        if !enabled {
            self.device.stop_pair(index / 2);
        }
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let c = self.device.config();
        let start = offset as usize;
        match start.checked_add(size as usize) {
            Some(end) if end <= c.len() => c[start..end].to_vec(),
            _ => Vec::new(),
        }
    }

    fn set_config(&self, _offset: u32, _buf: &[u8]) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the virtio-net configuration is read-only",
        ))
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        *self.mem.write().unwrap_or_else(|e| e.into_inner()) = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.device.num_queues() / 2)
            .map(|i| 0b11u64 << (2 * i))
            .collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        // Thread i serves pair i: vrings[0] is its RX queue, vrings[1] its TX.
        let (Some(rx), Some(tx)) = (vrings.first(), vrings.get(1)) else {
            return Err(io::Error::other("a worker thread without its queue pair"));
        };
        match u64::from(device_event) {
            0 => self.run(thread_id, rx, Dir::Rx),
            1 => self.run(thread_id, tx, Dir::Tx),
            e if e == self.tap_event() => self.run(thread_id, rx, Dir::Rx),
            e => Err(io::Error::other(format!("unexpected event {e}"))),
        }
    }
}
