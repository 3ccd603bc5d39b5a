//! The virtio-net device: a tap, one RX/TX engine pair per queue pair,
//! counters, the acked features, and the link state: the tap's carrier is
//! on while a driver runs the queues and the link is administratively up
//! ([`NetDevice::set_link`], `ctl link down|up`); the config space's
//! VIRTIO_NET_S_LINK_UP follows the administrative state, and a change is
//! announced to the driver through the adapter's config-change hook. Knows
//! virtio queues and guest memory, not vhost-user.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use virtio_queue::Queue;
use vm_memory::GuestMemoryBackend;

use crate::rx::{Rx, RxError, RxStop};
use crate::stats::QueueStats;
use crate::tap::{Tap, TapError};
use crate::tx::{Tx, TxError};
use crate::uring::TapIo;
use crate::virtio::{
    config_space, device_features, tap_offload_flags, DeviceParams, Negotiated, CONFIG_SPACE_SIZE,
};

/// Device errors.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The tap has fewer queues than the device has pairs.
    #[error("the tap has {have} queue(s), {want} needed")]
    Queues {
        /// Tap queues.
        have: usize,
        /// Queue pairs.
        want: usize,
    },
    /// Configuring the tap failed.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// The config-change message could not be sent.
    #[error("notifying the driver of a configuration change: {0}")]
    Notify(String),
}

struct Pair {
    rx: Rx,
    tx: Tx,
}

/// Tells the driver that the configuration space changed (set by the
/// vhost-user adapter when the frontend opens its backend channel).
pub type ConfigNotifier = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

#[derive(Default)]
struct NotifierSlot(Mutex<Option<ConfigNotifier>>);

impl std::fmt::Debug for NotifierSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NotifierSlot").finish_non_exhaustive()
    }
}

/// The device shared by all queue threads.
#[derive(Debug)]
pub struct NetDevice {
    params: DeviceParams,
    tap: Tap,
    pairs: Vec<Mutex<Pair>>,
    /// Counters, indexed by queue (RX queues even, TX queues odd).
    pub stats: Vec<QueueStats>,
    acked: AtomicU64,
    link_up: AtomicBool,
    link_lock: Mutex<()>,
    /// Pairs whose queues the driver started (their tap queue is attached).
    started: Vec<AtomicBool>,
    /// The link is administratively up (`ctl link up|down`).
    admin_up: AtomicBool,
    notifier: NotifierSlot,
}

impl std::fmt::Debug for Pair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pair").finish_non_exhaustive()
    }
}

impl NetDevice {
    /// A device on `tap` (opened without carrier) with
    /// `params.queue_pairs` pairs.
    pub fn new(params: DeviceParams, tap: Tap) -> Result<NetDevice, DeviceError> {
        let want = usize::from(params.queue_pairs);
        if tap.queues() < want {
            return Err(DeviceError::Queues {
                have: tap.queues(),
                want,
            });
        }
        let n = Negotiated::new(0, params.mtu);
        // Only pair 0 receives until the driver starts more pairs.
        for i in 1..tap.queues() {
            tap.set_queue_attached(i, false)?;
        }
        let pairs = (0..want)
            .map(|i| {
                let mut p = Pair {
                    rx: Rx::new(n, params.mtu),
                    tx: Tx::new(n),
                };
                p.tx.set_poll(std::time::Duration::from_micros(u64::from(params.poll_us)));
                if let (TapIo::Uring, Some(fd)) = (params.tap_io, tap.fd(i)) {
                    // No io_uring (old kernel, seccomp of a container):
                    // one system call per frame.
                    if let Err(e) = p.rx.use_uring(fd).and_then(|()| p.tx.use_uring(fd)) {
                        log::warn!("pair {i}: {e}; one readv/writev per frame");
                    }
                }
                Mutex::new(p)
            })
            .collect();
        Ok(NetDevice {
            pairs,
            stats: (0..2 * want).map(|_| QueueStats::default()).collect(),
            params,
            tap,
            acked: AtomicU64::new(0),
            link_up: AtomicBool::new(false),
            link_lock: Mutex::new(()),
            started: (0..want).map(|_| AtomicBool::new(false)).collect(),
            admin_up: AtomicBool::new(true),
            notifier: NotifierSlot::default(),
        })
    }

    /// The fixed parameters.
    pub fn params(&self) -> &DeviceParams {
        &self.params
    }

    /// The tap.
    pub fn tap(&self) -> &Tap {
        &self.tap
    }

    /// Number of virtqueues (two per pair).
    pub fn num_queues(&self) -> usize {
        2 * self.pairs.len()
    }

    /// The virtio features offered.
    pub fn features(&self) -> u64 {
        device_features(&self.params)
    }

    /// The features the driver acked (0 before it did).
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    /// Whether the link is up (driver ready, frontend connected: the tap
    /// has carrier).
    pub fn link_up(&self) -> bool {
        self.link_up.load(Ordering::Relaxed)
    }

    /// The configuration space (its status says whether the link is
    /// administratively up).
    pub fn config(&self) -> [u8; CONFIG_SPACE_SIZE] {
        config_space(&self.params, self.admin_up())
    }

    /// Whether the link is administratively up.
    pub fn admin_up(&self) -> bool {
        self.admin_up.load(Ordering::Acquire)
    }

    /// Installs (or with `None` removes) the hook that tells the driver
    /// about configuration changes.
    pub fn set_config_notifier(&self, n: Option<ConfigNotifier>) {
        *self.notifier.0.lock().unwrap_or_else(|e| e.into_inner()) = n;
    }

    /// Sets the link administratively up or down: the tap's carrier
    /// follows (while a driver runs the queues), the config space's status
    /// too, and the driver is told. `Ok(true)`: the driver was notified;
    /// `Ok(false)`: no driver, or its frontend opened no backend channel.
    pub fn set_link(&self, up: bool) -> Result<bool, DeviceError> {
        {
            let _g = self.link_lock.lock().unwrap_or_else(|e| e.into_inner());
            self.admin_up.store(up, Ordering::Release);
            if self.link_up.load(Ordering::Acquire) {
                self.tap.set_carrier(up)?;
                log::info!(
                    "{} link {}",
                    self.tap.name(),
                    if up { "up" } else { "down" }
                );
            }
        }
        let n = self.notifier.0.lock().unwrap_or_else(|e| e.into_inner());
        match n.as_ref() {
            Some(f) => f().map(|()| true).map_err(DeviceError::Notify),
            None => Ok(false),
        }
    }

    /// The driver acked `acked`: header length and tap offloads follow.
    pub fn set_acked(&self, acked: u64) -> Result<(), DeviceError> {
        self.acked.store(acked, Ordering::Relaxed);
        let n = Negotiated::new(acked, self.params.mtu);
        self.tap.set_vnet_hdr_len(n.hdr_len)?;
        self.tap.set_offload(tap_offload_flags(acked))?;
        for p in &self.pairs {
            let mut p = p.lock().unwrap_or_else(|e| e.into_inner());
            p.rx.configure(n);
            p.tx.configure(n);
        }
        Ok(())
    }

    /// The driver started the queues of `pair`: attach its tap queue and
    /// bring the tap up (each once per connection).
    pub fn start_pair(&self, pair: usize) {
        if let Some(s) = self.started.get(pair) {
            if !s.load(Ordering::Acquire) && !s.swap(true, Ordering::AcqRel) && pair > 0 {
                if let Err(e) = self.tap.set_queue_attached(pair, true) {
                    log::error!("{e}");
                }
            }
        }
        self.start();
    }

    /// The driver disabled a queue of `pair` (SET_VRING_ENABLE 0, e.g.
    /// `ethtool -L` in the guest): detach its tap queue so the kernel
    /// steers flows to the pairs still running; the next event of the pair
    /// after it is enabled again attaches it ([`NetDevice::start_pair`]).
    /// Pair 0 stays attached (a tap with no queue takes no frames at all).
    pub fn stop_pair(&self, pair: usize) {
        if pair == 0 {
            return;
        }
        if let Some(s) = self.started.get(pair) {
            if s.swap(false, Ordering::AcqRel) {
                match self.tap.set_queue_attached(pair, false) {
                    Ok(()) => log::info!("{}: queue pair {pair} disabled", self.tap.name()),
                    Err(e) => log::warn!("{e}"),
                }
            }
        }
    }

    /// The driver started the queues: carrier on (once).
    pub fn start(&self) {
        if self.link_up.load(Ordering::Acquire) {
            return;
        }
        let _g = self.link_lock.lock().unwrap_or_else(|e| e.into_inner());
        if self.link_up.load(Ordering::Acquire) {
            return;
        }
        if self.admin_up() {
            match self.tap.set_carrier(true) {
                Ok(()) => log::info!("{} up", self.tap.name()),
                Err(e) => log::error!("{e}"),
            }
        }
        self.link_up.store(true, Ordering::Release);
    }

    /// The frontend went away: carrier off (the tap stays on its bridge).
    pub fn stop(&self) {
        self.set_config_notifier(None);
        let _g = self.link_lock.lock().unwrap_or_else(|e| e.into_inner());
        if self.link_up.swap(false, Ordering::AcqRel) {
            match self.tap.set_carrier(false) {
                Ok(()) => log::info!("{} down", self.tap.name()),
                Err(e) => log::error!("{e}"),
            }
        }
        if let Err(e) = self.set_acked(0) {
            log::warn!("resetting the tap: {e}");
        }
        for (i, s) in self.started.iter().enumerate() {
            if s.swap(false, Ordering::AcqRel) && i > 0 {
                if let Err(e) = self.tap.set_queue_attached(i, false) {
                    log::warn!("{e}");
                }
            }
        }
    }

    /// Moves frames from the tap to the RX queue of `pair`.
    pub fn rx<M: GuestMemoryBackend>(
        &self,
        pair: usize,
        q: &mut Queue,
        mem: &M,
        signal: &mut dyn FnMut(),
    ) -> Result<RxStop, RxError> {
        let (Some(p), Some(fd), Some(stats)) = (
            self.pairs.get(pair),
            self.tap.fd(pair),
            self.stats.get(2 * pair),
        ) else {
            return Ok(RxStop::TapEmpty);
        };
        let mut p = p.lock().unwrap_or_else(|e| e.into_inner());
        p.rx.process(q, mem, fd, stats, signal)
    }

    /// Sends the TX queue of `pair` to the tap.
    pub fn tx<M: GuestMemoryBackend>(
        &self,
        pair: usize,
        q: &mut Queue,
        mem: &M,
        signal: &mut dyn FnMut(),
    ) -> Result<(), TxError> {
        let (Some(p), Some(fd), Some(stats)) = (
            self.pairs.get(pair),
            self.tap.fd(pair),
            self.stats.get(2 * pair + 1),
        ) else {
            return Ok(());
        };
        let mut p = p.lock().unwrap_or_else(|e| e.into_inner());
        p.tx.process(q, mem, fd, stats, signal)
    }
}
