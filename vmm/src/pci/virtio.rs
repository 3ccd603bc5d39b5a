//! The modern virtio 1.x PCI transport for a vhost-user device: common,
//! notify, ISR and device-config capabilities in BAR0, MSI-X with one vector
//! per queue (+ config). Queue kicks are ioeventfds on the notify addresses
//! and queue interrupts irqfds on MSI routes; both eventfds go to the backend,
//! so the VMM only sees configuration accesses. Device config reads are
//! GET_CONFIG requests to the backend; a config-change message from the
//! backend (backend channel) bumps the config generation, sets ISR bit 1 and
//! raises the config MSI-X vector. A watcher thread reconnects to a backend
//! that went away and replays the device state (with the inflight region
//! where the backend tracks inflight I/O).

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_bindings::kvm_msi;
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::config::{PciConfig, PciId};
use super::msix::{MsixTable, NO_VECTOR};
use super::net_ctrl::{Command, CtrlQueue};
use super::PciDevice;
use crate::backend_channel::ConfigChange;
use crate::bus::lock;
use crate::devices::legacy::ExitSignal;
use crate::irq::{IrqRouting, MsiMessage};
use crate::memory::GuestMemory;
use crate::vhost_user::{Backend, Inflight, QueueSetup};

const COMMON_OFF: u64 = 0x0000;
const COMMON_LEN: u64 = 0x38;
const ISR_OFF: u64 = 0x1000;
const DEVICE_OFF: u64 = 0x2000;
const DEVICE_LEN: u64 = 0x1000;
const NOTIFY_OFF: u64 = 0x3000;
const NOTIFY_MULT: u64 = 4;
const MSIX_TABLE_OFF: u64 = 0x4000;
const MSIX_PBA_OFF: u64 = 0x5000;
/// BAR0 size.
pub const BAR_SIZE: u64 = 0x8000;
/// Largest ring we offer.
pub const MAX_QUEUE_SIZE: u16 = 256;

const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Transport features this frontend does not implement (access platform,
/// SR-IOV, notification data, ring reset, admin queues, LOG_ALL).
const UNSUPPORTED_TRANSPORT: u64 =
    (1 << 33) | (1 << 37) | (1 << 38) | (1 << 40) | (1 << 41) | (1 << 26);
/// virtio-net features that need a control queue: the backend's offer is
/// ignored (the control queue is ours, [`super::net_ctrl`]).
const NET_NEEDS_CTRL_VQ: u64 =
    (1 << 17) | (1 << 18) | (1 << 19) | (1 << 20) | (1 << 21) | (1 << 22) | (1 << 23);
/// What our control queue serves: CTRL_VQ, CTRL_RX, CTRL_MAC_ADDR (+ MQ with
/// more than one pair).
const NET_CTRL_VQ: u64 = (1 << 17) | (1 << 18) | (1 << 23);
const VIRTIO_NET_F_MQ: u64 = 1 << 22;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

const VIRTIO_NET_F_MAC: u64 = 1 << 5;
const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
const VIRTIO_NET_S_LINK_UP: u16 = 1;

const STATUS_FEATURES_OK: u8 = 8;
const STATUS_DRIVER_OK: u8 = 4;
const STATUS_NEEDS_RESET: u8 = 0x40;
/// ISR status bit: the device configuration changed.
const ISR_CONFIG: u8 = 2;

/// Device type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// virtio-blk (device id 2).
    Block,
    /// virtio-net (device id 1).
    Net,
}

impl DeviceKind {
    fn id(self) -> u16 {
        match self {
            DeviceKind::Net => 1,
            DeviceKind::Block => 2,
        }
    }
    /// Size of the device config space we read from the backend
    /// (virtio-blk up to the write-zeroes fields; virtio-net up to the MTU).
    fn config_len(self) -> usize {
        match self {
            DeviceKind::Net => 12,
            DeviceKind::Block => 60,
        }
    }
    fn class(self) -> u32 {
        match self {
            DeviceKind::Net => 0x02_00_00,
            DeviceKind::Block => 0x01_80_00,
        }
    }
}

/// A device to attach: its kind and its connected backend.
#[derive(Debug)]
pub struct DeviceSpec {
    /// Device type.
    pub kind: DeviceKind,
    /// The backend, already connected.
    pub backend: Backend,
    /// For a NIC: the MAC we serve in the config space when the backend
    /// does not offer the CONFIG protocol feature (as QEMU does).
    pub mac: Option<[u8; 6]>,
    /// For a NIC: queue pairs (the backend must have twice as many queues).
    pub pairs: u16,
}

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The backend lacks VIRTIO_F_VERSION_1.
    #[error("vhost-user backend {0} does not offer VIRTIO_F_VERSION_1 (modern virtio)")]
    NoVersion1(PathBuf),
    /// KVM refused an ioeventfd/irqfd.
    #[error("KVM: {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// eventfd creation.
    #[error("eventfd")]
    EventFd(#[source] std::io::Error),
    /// Starting the reconnect thread.
    #[error("starting the backend watcher thread")]
    Thread(#[source] std::io::Error),
    /// Setting up the backend.
    #[error(transparent)]
    Backend(#[from] crate::vhost_user::Error),
    /// The backend has fewer queues than the pairs asked for need.
    #[error("vhost-user backend {0} has {1} queues, {2} queue pairs need {3}")]
    TooFewQueues(PathBuf, u64, u16, u64),
}

#[derive(Debug)]
struct Queue {
    size: u16,
    vector: u16,
    enabled: bool,
    desc: u64,
    avail: u64,
    used: u64,
    kick: EventFd,
    call: EventFd,
}

/// The device state shared by the vCPUs (through the PCI bus) and the watcher.
struct State {
    kind: DeviceKind,
    local_config: Option<Vec<u8>>,
    path: PathBuf,
    backend: Option<Backend>,
    vm: Arc<VmFd>,
    mem: GuestMemory,
    routing: IrqRouting,
    cfg: PciConfig,
    msix: MsixTable,
    msix_cap: usize,
    vector_gsi: Vec<u32>,
    /// The MSI message each vector is routed to now (None: masked/disabled).
    routes: Vec<Option<MsiMessage>>,
    bar: u64,
    device_features: u64,
    driver_features: u64,
    dfsel: u32,
    gfsel: u32,
    status: u8,
    config_generation: u8,
    /// ISR status (read to clear).
    isr: u8,
    /// A config change arrived while the config vector had no route.
    config_pending: bool,
    queue_sel: u16,
    config_vector: u16,
    queues: Vec<Queue>,
    /// (queue, gsi) irqfds currently registered.
    irqfds: Vec<(usize, u32)>,
    activated: bool,
    /// The backend's inflight region, kept from the first start until the
    /// device is reset, across backend restarts.
    inflight: Option<Inflight>,
    /// What the backend offered (acked features are masked with it).
    backend_features: u64,
    /// NIC: queue pairs offered, and the index of the control queue.
    pairs: u16,
    ctrl: Option<usize>,
    /// NIC: the control queue once the driver started the device.
    ctrl_queue: Option<CtrlQueue>,
    /// NIC: pairs in use (the guest's MQ_VQ_PAIRS_SET; 1 until then).
    active_pairs: u16,
}

/// A virtio-pci function (the PCI bus holds this handle; the watcher thread another).
pub struct VirtioPci {
    state: Arc<Mutex<State>>,
    // Snapshot of the config space for reads without touching the state lock
    // order; refreshed on every config write.
    cfg: PciConfig,
}

impl std::fmt::Debug for VirtioPci {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VirtioPci")
    }
}

fn virtio_cap(cfg_type: u8, offset: u64, len: u64, extra: Option<u32>) -> Vec<u8> {
    let cap_len = if extra.is_some() { 20 } else { 16 };
    let mut c = vec![0x09, 0, cap_len, cfg_type, 0, 0, 0, 0];
    c.extend_from_slice(&(offset as u32).to_le_bytes());
    c.extend_from_slice(&(len as u32).to_le_bytes());
    if let Some(x) = extra {
        c.extend_from_slice(&x.to_le_bytes());
    }
    c
}

impl VirtioPci {
    /// A function whose BAR0 sits at `bar`, for `spec`'s backend.
    pub fn new(
        vm: Arc<VmFd>,
        mem: &GuestMemory,
        routing: IrqRouting,
        spec: DeviceSpec,
        bar: u64,
        exit: ExitSignal,
    ) -> Result<Self, Error> {
        let backend = spec.backend;
        let path = backend.path().to_path_buf();
        let backend_features = backend.features();
        let mut features = backend_features;
        if features & VIRTIO_F_VERSION_1 == 0 {
            return Err(Error::NoVersion1(path));
        }
        features &= !UNSUPPORTED_TRANSPORT;
        let pairs = spec.pairs.max(1);
        let (nq, ctrl) = match spec.kind {
            DeviceKind::Block => (backend.queue_num() as usize, None),
            DeviceKind::Net => {
                let need = 2 * u64::from(pairs);
                if backend.queue_num() < need {
                    return Err(Error::TooFewQueues(path, backend.queue_num(), pairs, need));
                }
                features &= !NET_NEEDS_CTRL_VQ;
                features |= NET_CTRL_VQ;
                if pairs > 1 {
                    features |= VIRTIO_NET_F_MQ;
                }
                // RX/TX pairs, then the control queue.
                let nq = 2 * usize::from(pairs) + 1;
                (nq, Some(nq - 1))
            }
        };
        // A NIC whose backend has no config space: we serve MAC and link status.
        let local_config = match (spec.kind, spec.mac, backend.has_config()) {
            (DeviceKind::Net, Some(mac), false) => {
                features |= VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS;
                let mut c = mac.to_vec();
                c.extend_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
                c.extend_from_slice(&pairs.to_le_bytes()); // max_virtqueue_pairs
                c.extend_from_slice(&1500u16.to_le_bytes()); // mtu
                Some(c)
            }
            _ => None,
        };
        let mut cfg = PciConfig::new(PciId {
            vendor: 0x1af4,
            device: 0x1040 + spec.kind.id(),
            revision: 1,
            class: spec.kind.class(),
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        });
        cfg.add_mem_bar(0, bar as u32, BAR_SIZE as u32);
        cfg.add_capability(&virtio_cap(1, COMMON_OFF, COMMON_LEN, None), &[]);
        cfg.add_capability(
            &virtio_cap(
                2,
                NOTIFY_OFF,
                nq as u64 * NOTIFY_MULT,
                Some(NOTIFY_MULT as u32),
            ),
            &[],
        );
        cfg.add_capability(&virtio_cap(3, ISR_OFF, 4, None), &[]);
        cfg.add_capability(&virtio_cap(4, DEVICE_OFF, DEVICE_LEN, None), &[]);
        let msix = MsixTable::new(nq + 1);
        let (cap, wmask) = msix.capability(0, MSIX_TABLE_OFF as u32, MSIX_PBA_OFF as u32);
        let msix_cap = cfg.add_capability(&cap, &wmask);
        let vector_gsi = (0..=nq).map(|_| routing.allocate()).collect();

        let mut queues = Vec::with_capacity(nq);
        for q in 0..nq {
            let kick = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
            let call = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
            // The control queue's kicks exit to us (see net_ctrl).
            if Some(q) != ctrl {
                let addr = IoEventAddress::Mmio(bar + NOTIFY_OFF + q as u64 * NOTIFY_MULT);
                vm.register_ioevent(&kick, &addr, NoDatamatch)
                    .map_err(|e| Error::Kvm("KVM_IOEVENTFD", e))?;
            }
            queues.push(Queue {
                size: MAX_QUEUE_SIZE,
                vector: NO_VECTOR,
                enabled: false,
                desc: 0,
                avail: 0,
                used: 0,
                kick,
                call,
            });
        }
        let state = State {
            kind: spec.kind,
            local_config,
            path,
            backend: Some(backend),
            vm,
            mem: mem.clone(),
            routing,
            cfg: cfg.clone(),
            msix,
            msix_cap,
            routes: vec![None; nq + 1],
            vector_gsi,
            bar,
            device_features: features,
            driver_features: 0,
            dfsel: 0,
            gfsel: 0,
            status: 0,
            config_generation: 0,
            isr: 0,
            config_pending: false,
            queue_sel: 0,
            config_vector: NO_VECTOR,
            queues,
            irqfds: Vec::new(),
            activated: false,
            inflight: None,
            backend_features,
            pairs,
            ctrl,
            ctrl_queue: None,
            active_pairs: 1,
        };
        let state = Arc::new(Mutex::new(state));
        if let Some(b) = lock(&state).backend.as_mut() {
            b.open_backend_channel(config_callback(&state))?;
        }
        spawn_watcher(state.clone(), exit)?;
        Ok(VirtioPci { state, cfg })
    }
}

impl PciDevice for VirtioPci {
    fn config(&self) -> &PciConfig {
        &self.cfg
    }

    fn config_write(&mut self, off: usize, data: &[u8]) {
        let mut s = lock(&self.state);
        s.cfg.write(off, data);
        let ctl = s.msix_cap + 3;
        if (off..off + data.len()).contains(&ctl) {
            let hi = s.cfg.bytes()[ctl];
            s.msix.set_control(hi);
            s.update_routes();
        }
        if off <= 0x10 && off + data.len() > 0x10 {
            s.maybe_move_bar();
        }
        self.cfg = s.cfg.clone();
    }

    fn bar_read(&mut self, _bar: usize, offset: u64, data: &mut [u8]) {
        lock(&self.state).bar_read(offset, data);
    }

    fn bar_write(&mut self, _bar: usize, offset: u64, data: &[u8]) {
        lock(&self.state).bar_write(offset, data);
    }
}

fn le(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(b)
}

fn put(data: &mut [u8], v: u64) {
    let b = v.to_le_bytes();
    for (i, x) in data.iter_mut().enumerate() {
        *x = b.get(i).copied().unwrap_or(0);
    }
}

fn set_half(field: &mut u64, hi: bool, v: u64) {
    if hi {
        *field = (*field & 0xffff_ffff) | (v << 32);
    } else {
        *field = (*field & !0xffff_ffff) | (v & 0xffff_ffff);
    }
}

impl State {
    fn bar_read(&mut self, off: u64, data: &mut [u8]) {
        match off {
            o if o < COMMON_LEN => {
                let v = self.common_read(o);
                put(data, v);
            }
            o if (ISR_OFF..ISR_OFF + 4).contains(&o) => {
                data.fill(0);
                if o == ISR_OFF {
                    if let Some(b) = data.first_mut() {
                        *b = std::mem::take(&mut self.isr);
                    }
                }
            }
            o if (DEVICE_OFF..DEVICE_OFF + DEVICE_LEN).contains(&o) => {
                // Always the whole config from offset 0, as QEMU asks for it:
                // some backends (libvhost-user, hence qemu-storage-daemon)
                // ignore the offset of GET_CONFIG.
                let rel = (o - DEVICE_OFF) as usize;
                let len = self.kind.config_len();
                let r = match (&self.local_config, self.backend.as_mut()) {
                    (Some(c), _) => Ok(c.clone()),
                    (None, Some(b)) => b.get_config(0, len as u32).map_err(|e| e.to_string()),
                    (None, None) => Err("backend disconnected".to_string()),
                };
                match r {
                    Ok(mut v) => {
                        self.patch_config(&mut v);
                        for (i, b) in data.iter_mut().enumerate() {
                            *b = v.get(rel + i).copied().unwrap_or(0);
                        }
                    }
                    Err(e) => {
                        log::warn!("{}: reading device config: {e}", self.path.display());
                        data.fill(0);
                    }
                }
            }
            o if (MSIX_TABLE_OFF..MSIX_PBA_OFF).contains(&o) => {
                self.msix.read(o - MSIX_TABLE_OFF, data)
            }
            _ => data.fill(0),
        }
    }

    /// The frontend owns some config fields, as QEMU does: virtio-blk's
    /// `num_queues` (offset 34) is the number of queues we expose, whatever
    /// the backend reports (qemu-storage-daemon reports 0).
    fn patch_config(&self, config: &mut [u8]) {
        const BLK_NUM_QUEUES: usize = 34;
        const NET_MAX_PAIRS: usize = 8;
        if self.kind == DeviceKind::Block && config.len() >= BLK_NUM_QUEUES + 2 {
            let nq = (self.queues.len() as u16).to_le_bytes();
            config[BLK_NUM_QUEUES..BLK_NUM_QUEUES + 2].copy_from_slice(&nq);
        }
        // And virtio-net's max_virtqueue_pairs: the pairs we expose.
        if self.kind == DeviceKind::Net && config.len() >= NET_MAX_PAIRS + 2 {
            config[NET_MAX_PAIRS..NET_MAX_PAIRS + 2].copy_from_slice(&self.pairs.to_le_bytes());
        }
    }

    fn bar_write(&mut self, off: u64, data: &[u8]) {
        match off {
            o if o < COMMON_LEN => self.common_write(o, le(data)),
            o if (DEVICE_OFF..DEVICE_OFF + DEVICE_LEN).contains(&o) => {
                if let Some(b) = self.backend.as_mut() {
                    if let Err(e) = b.set_config((o - DEVICE_OFF) as u32, data) {
                        log::warn!("{e}");
                    }
                }
            }
            o if (NOTIFY_OFF..NOTIFY_OFF + self.queues.len() as u64 * NOTIFY_MULT).contains(&o) => {
                // Normally an ioeventfd catches these; forward if one slips
                // through. The control queue is ours.
                let q = ((o - NOTIFY_OFF) / NOTIFY_MULT) as usize;
                if Some(q) == self.ctrl {
                    self.ctrl_kick();
                } else {
                    let _ = self.queues[q].kick.write(1);
                }
            }
            o if (MSIX_TABLE_OFF..MSIX_PBA_OFF).contains(&o)
                && self.msix.write(o - MSIX_TABLE_OFF, data).is_some() =>
            {
                self.update_routes();
            }
            _ => {}
        }
    }

    fn common_read(&self, off: u64) -> u64 {
        let q = self.queues.get(usize::from(self.queue_sel));
        match off {
            0x00 => u64::from(self.dfsel),
            0x04 => match self.dfsel {
                0 => self.device_features & 0xffff_ffff,
                1 => self.device_features >> 32,
                _ => 0,
            },
            0x08 => u64::from(self.gfsel),
            0x0c => match self.gfsel {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            0x10 => u64::from(self.config_vector),
            0x12 => self.queues.len() as u64,
            0x14 => u64::from(self.status),
            0x15 => u64::from(self.config_generation),
            0x16 => u64::from(self.queue_sel),
            0x18 => q.map_or(0, |q| u64::from(q.size)),
            0x1a => q.map_or(u64::from(NO_VECTOR), |q| u64::from(q.vector)),
            0x1c => q.map_or(0, |q| u64::from(q.enabled)),
            0x1e => u64::from(self.queue_sel),
            0x20 => q.map_or(0, |q| q.desc & 0xffff_ffff),
            0x24 => q.map_or(0, |q| q.desc >> 32),
            0x28 => q.map_or(0, |q| q.avail & 0xffff_ffff),
            0x2c => q.map_or(0, |q| q.avail >> 32),
            0x30 => q.map_or(0, |q| q.used & 0xffff_ffff),
            0x34 => q.map_or(0, |q| q.used >> 32),
            _ => 0,
        }
    }

    fn common_write(&mut self, off: u64, v: u64) {
        let sel = usize::from(self.queue_sel);
        let nvec = self.msix.entries.len() as u64;
        match off {
            0x00 => self.dfsel = v as u32,
            0x08 => self.gfsel = v as u32,
            0x0c => match self.gfsel {
                0 => set_half(&mut self.driver_features, false, v),
                1 => set_half(&mut self.driver_features, true, v),
                _ => {}
            },
            0x10 => self.config_vector = if v < nvec { v as u16 } else { NO_VECTOR },
            0x14 => self.set_status(v as u8),
            0x16 => self.queue_sel = v as u16,
            _ => {
                let Some(q) = self.queues.get_mut(sel) else {
                    return;
                };
                match off {
                    0x18 => {
                        let s = v as u16;
                        if s.is_power_of_two() && s <= MAX_QUEUE_SIZE {
                            q.size = s;
                        }
                    }
                    0x1a => q.vector = if v < nvec { v as u16 } else { NO_VECTOR },
                    0x1c => q.enabled = v & 1 == 1,
                    0x20 => set_half(&mut q.desc, false, v),
                    0x24 => set_half(&mut q.desc, true, v),
                    0x28 => set_half(&mut q.avail, false, v),
                    0x2c => set_half(&mut q.avail, true, v),
                    0x30 => set_half(&mut q.used, false, v),
                    0x34 => set_half(&mut q.used, true, v),
                    _ => {}
                }
            }
        }
    }

    fn set_status(&mut self, v: u8) {
        if v == 0 {
            self.reset();
            return;
        }
        let mut v = v;
        if v & STATUS_FEATURES_OK != 0
            && self.status & STATUS_FEATURES_OK == 0
            && (self.driver_features & !self.device_features != 0
                || self.driver_features & VIRTIO_F_VERSION_1 == 0)
        {
            // The driver acked something we did not offer: refuse FEATURES_OK.
            v &= !STATUS_FEATURES_OK;
        }
        let newly_ok = v & STATUS_DRIVER_OK != 0 && self.status & STATUS_DRIVER_OK == 0;
        self.status = v;
        if newly_ok {
            if let Err(e) = self.activate(false) {
                log::error!("{}: activation failed: {e}", self.path.display());
                self.status |= STATUS_NEEDS_RESET;
            }
        }
    }

    fn reset(&mut self) {
        if self.activated {
            if let Some(b) = self.backend.as_mut() {
                b.stop();
            }
        }
        self.unregister_irqfds();
        self.activated = false;
        // A reset driver starts with empty rings: nothing left to resubmit.
        self.inflight = None;
        self.ctrl_queue = None;
        self.active_pairs = 1;
        self.status = 0;
        self.driver_features = 0;
        self.dfsel = 0;
        self.gfsel = 0;
        self.queue_sel = 0;
        self.config_vector = NO_VECTOR;
        self.isr = 0;
        self.config_pending = false;
        for q in &mut self.queues {
            q.size = MAX_QUEUE_SIZE;
            q.vector = NO_VECTOR;
            q.enabled = false;
            q.desc = 0;
            q.avail = 0;
            q.used = 0;
        }
    }

    fn unregister_irqfds(&mut self) {
        for (q, gsi) in std::mem::take(&mut self.irqfds) {
            if let Err(e) = self.vm.unregister_irqfd(&self.queues[q].call, gsi) {
                log::warn!("unregistering irqfd for queue {q}: {e}");
            }
        }
    }

    /// Wires the irqfds and starts the backend. `resume`: after a reconnect,
    /// the rings continue where the guest's used index says.
    fn activate(&mut self, resume: bool) -> Result<(), String> {
        if !resume {
            self.unregister_irqfds();
            for (i, q) in self.queues.iter().enumerate() {
                if !q.enabled || q.vector == NO_VECTOR {
                    continue;
                }
                let gsi = self.vector_gsi[usize::from(q.vector)];
                self.vm
                    .register_irqfd(&q.call, gsi)
                    .map_err(|e| format!("KVM_IRQFD for queue {i}: {e}"))?;
                self.irqfds.push((i, gsi));
            }
            self.update_routes();
            self.start_ctrl();
        }
        self.activated = true;
        let Some(backend) = self.backend.as_mut() else {
            // Disconnected: the watcher starts the device when the backend is back.
            return Ok(());
        };
        let mut setups = Vec::new();
        // At a resume: per queue (index, outstanding in the available ring,
        // recorded in flight by the inflight region, if there is one).
        let mut resumed = Vec::new();
        let mq = self.driver_features & VIRTIO_NET_F_MQ != 0;
        for (i, q) in self.queues.iter().enumerate() {
            if !q.enabled || Some(i) == self.ctrl {
                continue;
            }
            let base = if resume {
                // used->idx: everything before it completed.
                let used = self
                    .mem
                    .read_obj::<u16>(GuestAddress(q.used + 2))
                    .map_err(|e| format!("reading the used index of queue {i}: {e}"))?;
                let avail = self
                    .mem
                    .read_obj::<u16>(GuestAddress(q.avail + 2))
                    .unwrap_or(used);
                // avail - used counts every request the driver posted and
                // has not got back: those the dead backend had taken (the
                // inflight region records them; the new backend resubmits
                // them) and those it never took, or that were posted while
                // no backend ran (the new backend takes them as new ones).
                let recorded = self
                    .inflight
                    .as_ref()
                    .and_then(|r| r.recorded_in_flight(i, used, q.size));
                resumed.push((i, avail.wrapping_sub(used), recorded));
                used
            } else {
                0
            };
            setups.push(QueueSetup {
                index: i,
                size: q.size,
                max_size: MAX_QUEUE_SIZE,
                desc: q.desc,
                avail: q.avail,
                used: q.used,
                base,
                kick: &q.kick,
                call: (q.vector != NO_VECTOR).then_some(&q.call),
                // A NIC uses its first pair, or as many as the guest chose.
                enabled: self.ctrl.is_none()
                    || (i / 2) < usize::from(if mq { self.active_pairs } else { 1 }),
            });
        }
        if resume {
            log_resume(&self.path, &resumed);
        }
        if backend.has_inflight() {
            // As QEMU's vhost-user-blk: the region is taken at the first start
            // and handed to each backend instance before its rings start.
            if self.inflight.is_none() {
                let nq = u16::try_from(self.queues.len()).unwrap_or(u16::MAX);
                self.inflight = Some(
                    backend
                        .get_inflight(nq, MAX_QUEUE_SIZE)
                        .map_err(|e| e.to_string())?,
                );
            }
            if let Some(region) = &self.inflight {
                backend.set_inflight(region).map_err(|e| e.to_string())?;
            }
        }
        // Only what the backend offered (not our control-queue features).
        let acked = self.driver_features & self.backend_features;
        backend
            .activate(&self.mem, acked, &setups)
            .map_err(|e| e.to_string())?;
        if resume {
            // Requests may have completed while nobody listened: let the
            // guest look at its used rings.
            for s in &setups {
                if let Some(c) = s.call {
                    let _ = c.write(1);
                }
            }
        }
        Ok(())
    }

    /// The backend reported a config change: the next config read returns
    /// the new contents (a GET_CONFIG); tell the driver.
    fn config_changed(&mut self) {
        log::info!("{}: device configuration changed", self.path.display());
        self.config_generation = self.config_generation.wrapping_add(1);
        self.isr |= ISR_CONFIG;
        self.config_pending = true;
        self.signal_config();
    }

    /// Raises the config vector's MSI if a change is pending and the vector
    /// is routed (unmasked); otherwise it stays pending.
    fn signal_config(&mut self) {
        if !self.config_pending {
            return;
        }
        let Some(Some(m)) = self.routes.get(usize::from(self.config_vector)).copied() else {
            return;
        };
        let msi = kvm_msi {
            address_lo: m.addr as u32,
            address_hi: (m.addr >> 32) as u32,
            data: m.data,
            ..Default::default()
        };
        match self.vm.signal_msi(msi) {
            Ok(_) => self.config_pending = false,
            Err(e) => log::error!("{}: config interrupt: {e}", self.path.display()),
        }
    }

    fn update_routes(&mut self) {
        for v in 0..self.vector_gsi.len() {
            let msg = self
                .msix
                .message(v)
                .map(|(addr, data)| MsiMessage { addr, data });
            let was_live = self.routes[v].is_some();
            if let Err(e) = self.routing.set_msi(self.vector_gsi[v], msg) {
                log::error!("MSI route for vector {v}: {e}");
                continue;
            }
            self.routes[v] = msg;
            if self.activated && !was_live && msg.is_some() {
                // An interrupt signalled while the vector was masked had no
                // route and was dropped: deliver one now (the spec's pending bit).
                for q in self.queues.iter().filter(|q| usize::from(q.vector) == v) {
                    let _ = q.call.write(1);
                }
            }
        }
        self.signal_config();
    }

    /// Sets up the NIC's control queue when the driver enabled it.
    fn start_ctrl(&mut self) {
        self.ctrl_queue = None;
        self.active_pairs = 1;
        let Some(q) = self.ctrl.and_then(|i| self.queues.get(i)) else {
            return;
        };
        if !q.enabled {
            return;
        }
        let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        match CtrlQueue::new(q.size, q.desc, q.avail, q.used, event_idx) {
            Ok(c) => self.ctrl_queue = Some(c),
            Err(e) => log::warn!("{}: {e}", self.path.display()),
        }
    }

    /// The driver kicked the control queue: serve its commands now.
    fn ctrl_kick(&mut self) {
        let Some(mut ctrl) = self.ctrl_queue.take() else {
            return;
        };
        let mem = self.mem.clone();
        let r = ctrl.process(&mem, |c| self.ctrl_command(c));
        self.ctrl_queue = Some(ctrl);
        match r {
            Ok(0) => {}
            Ok(_) => {
                if let Some(q) = self.ctrl.and_then(|i| self.queues.get(i)) {
                    if q.vector != NO_VECTOR {
                        let _ = q.call.write(1);
                    }
                }
            }
            Err(e) => log::warn!("{}: {e}", self.path.display()),
        }
    }

    /// Executes one control command; `true`: VIRTIO_NET_OK.
    fn ctrl_command(&mut self, c: Command) -> bool {
        let path = self.path.display().to_string();
        match c {
            Command::PairsSet(n) => {
                let mq = self.driver_features & VIRTIO_NET_F_MQ != 0;
                if !mq || n == 0 || n > self.pairs {
                    log::warn!(
                        "{path}: guest asked for {n} queue pairs (of {})",
                        self.pairs
                    );
                    return false;
                }
                let Some(backend) = self.backend.as_mut() else {
                    // Disconnected: applied when the watcher restarts it.
                    self.active_pairs = n;
                    return true;
                };
                for pair in 0..usize::from(self.pairs) {
                    let on = pair < usize::from(n);
                    for i in [2 * pair, 2 * pair + 1] {
                        if !self.queues[i].enabled {
                            continue;
                        }
                        if let Err(e) = backend.set_vring_enable(i, on) {
                            log::warn!("{path}: {e}");
                            return false;
                        }
                    }
                }
                log::info!("{path}: guest uses {n} of {} queue pairs", self.pairs);
                self.active_pairs = n;
                true
            }
            // The tap hands the guest its own MAC, broadcast and multicast
            // frames (and everything the bridge floods); the guest's stack
            // drops what it did not ask for.
            Command::RxMode { .. } | Command::MacTable => true,
            Command::MacAddr(m) => {
                log::info!(
                    "{path}: guest set its MAC to {}",
                    m.iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<Vec<_>>()
                        .join(":")
                );
                true
            }
            Command::Unsupported { class, cmd } => {
                log::debug!("{path}: unsupported control command {class}.{cmd}");
                false
            }
        }
    }

    fn maybe_move_bar(&mut self) {
        let (new, _) = self.cfg.bar(0);
        if new == self.bar
            || new < crate::memory::PCI_MMIO_START
            || new + BAR_SIZE > crate::memory::PCI_MMIO_START + crate::memory::PCI_MMIO_SIZE
        {
            return;
        }
        for (q, queue) in self.queues.iter().enumerate() {
            if Some(q) == self.ctrl {
                continue;
            }
            let old = IoEventAddress::Mmio(self.bar + NOTIFY_OFF + q as u64 * NOTIFY_MULT);
            let _ = self.vm.unregister_ioevent(&queue.kick, &old, NoDatamatch);
            let addr = IoEventAddress::Mmio(new + NOTIFY_OFF + q as u64 * NOTIFY_MULT);
            if let Err(e) = self.vm.register_ioevent(&queue.kick, &addr, NoDatamatch) {
                log::error!("moving the notify ioeventfd of queue {q}: {e}");
            }
        }
        self.bar = new;
    }
}

/// The backend channel's callback for a device (weak: the channel thread
/// must not keep the device alive).
/// Logs what the guest had outstanding when a device resumed after a
/// reconnect, per queue `(index, outstanding, recorded)`: `outstanding` is
/// the available index minus the used index (everything posted and not
/// returned), `recorded` what the inflight region records as taken by the
/// previous backend (`None`: no region). Only the recorded ones are
/// resubmitted; the others were never taken and are served as new requests,
/// so the two numbers differ and both are logged.
fn log_resume(path: &Path, queues: &[(usize, u16, Option<u16>)]) {
    let outstanding: u32 = queues.iter().map(|&(_, o, _)| u32::from(o)).sum();
    let recorded: Option<u32> = queues.iter().map(|&(_, _, r)| r.map(u32::from)).sum();
    let detail = queues
        .iter()
        .map(|&(i, o, r)| match r {
            Some(r) => format!("queue {i}: {o}/{r}"),
            None => format!("queue {i}: {o}/-"),
        })
        .collect::<Vec<_>>()
        .join(", ");
    match recorded {
        // A warning like the reconnect itself, so both show at the default
        // log level, one line per resume.
        Some(r) => {
            log::warn!(
                "{}: resuming after a reconnect: {outstanding} request(s) outstanding in the \
                 available ring, {r} recorded in flight in the inflight region (the new backend \
                 resubmits these), {} never taken by the previous backend (served as new) \
                 [outstanding/in flight: {detail}]",
                path.display(),
                outstanding.saturating_sub(r)
            );
        }
        None if outstanding > 0 => log::warn!(
            "{}: resuming after a reconnect: {outstanding} request(s) outstanding in the \
             available ring and no inflight region (requests the previous backend had taken \
             are not resubmitted) [{detail}]",
            path.display()
        ),
        None => {}
    }
}

fn config_callback(state: &Arc<Mutex<State>>) -> ConfigChange {
    let weak = Arc::downgrade(state);
    Arc::new(move || {
        if let Some(s) = weak.upgrade() {
            lock(&s).config_changed();
        }
    })
}

fn poll_hangup(fd: RawFd, timeout_ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let r = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    r > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
}

/// Watches the backend socket; when it hangs up, reconnects (every 100 ms)
/// and replays features, memory table and rings if the device was running.
fn spawn_watcher(state: Arc<Mutex<State>>, exit: ExitSignal) -> Result<(), Error> {
    std::thread::Builder::new()
        .name("vhost-watch".into())
        .spawn(move || loop {
            if exit.is_set() {
                return;
            }
            let fd = lock(&state).backend.as_ref().map(Backend::raw_fd);
            match fd {
                Some(fd) => {
                    if !poll_hangup(fd, 200) || exit.is_set() {
                        continue;
                    }
                    let mut s = lock(&state);
                    log::warn!(
                        "{}: backend disconnected; waiting for it to come back",
                        s.path.display()
                    );
                    s.backend = None;
                }
                None => {
                    let path = lock(&state).path.clone();
                    let b = match Backend::connect(&path, Duration::from_millis(100)) {
                        Ok(b) => b,
                        Err(_) => {
                            std::thread::sleep(Duration::from_millis(100));
                            continue;
                        }
                    };
                    let mut s = lock(&state);
                    let local = if s.local_config.is_some() {
                        VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS
                    } else {
                        0
                    };
                    let mut b = b;
                    if let Err(e) = b.open_backend_channel(config_callback(&state)) {
                        log::error!("{e}");
                    }
                    // What the old backend offered must be there again
                    // (our own MAC/status and control-queue features aside).
                    let missing = s.device_features & s.backend_features & !b.features() & !local;
                    if missing != 0 {
                        log::error!(
                            "{}: reconnected backend lacks features {missing:#x}; not resuming",
                            path.display()
                        );
                        drop(s);
                        std::thread::sleep(Duration::from_secs(1));
                        continue;
                    }
                    s.backend_features = b.features();
                    s.backend = Some(b);
                    if s.activated {
                        match s.activate(true) {
                            Ok(()) => log::warn!(
                                "{}: backend reconnected, device resumed",
                                path.display()
                            ),
                            Err(e) => {
                                log::error!("{}: resuming after reconnect: {e}", path.display());
                                s.backend = None;
                            }
                        }
                    } else {
                        log::warn!("{}: backend reconnected", path.display());
                    }
                }
            }
        })
        .map(|_| ())
        .map_err(Error::Thread)
}
