//! vhost-user network backend: a virtio-net device on a Linux tap,
//! optionally attached to a Linux bridge.
//!
//! The device model (RX/TX engines over virtio queues and a tap fd) is
//! separate from the transport; only `backend` and `server` know vhost-user.
//!
//! # Modules
//! - [`cli`]: command line and its validation into a `Config`.
//! - [`tap`]: opening the tap (one fd per queue pair), vnet header, offloads.
//! - [`netlink`]: links up/down, MTU, bridges, addresses over rtnetlink.
//! - [`virtio`]: feature bits, negotiated settings, the configuration space.
//! - [`chain`]: descriptor chains as iovecs into guest memory.
//! - [`rx`]: tap → guest (readv into the chains, mergeable buffers).
//! - [`tx`]: guest → tap (writev from the chains).
//! - [`stats`]: per-queue counters.
//! - [`device`]: the device: tap, engines, counters, link state.
//! - [`backend`]: the `VhostUserBackend` adapter.
//! - [`server`]: listening, re-listening after a disconnect, the tap on the epoll.
//! - [`control`]: the JSON-lines control socket (counters).

pub mod backend;
pub mod chain;
pub mod cli;
pub mod control;
pub mod device;
pub mod netlink;
pub mod rx;
pub mod server;
pub mod stats;
pub mod tap;
pub mod tx;
pub mod virtio;

use std::sync::Arc;

use crate::backend::NetBackend;
use crate::cli::{Config, Listen};
use crate::device::{LinkControl, NetDevice};
use crate::netlink::Netlink;
use crate::tap::Tap;
use crate::virtio::DeviceParams;

/// Errors that stop the daemon.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The tap could not be set up.
    #[error(transparent)]
    Tap(#[from] tap::TapError),
    /// A netlink request failed.
    #[error(transparent)]
    Netlink(#[from] netlink::NetlinkError),
    /// The bridge does not exist.
    #[error("bridge {0:?} does not exist (add --create-bridge to create it)")]
    NoBridge(String),
    /// The device could not be set up.
    #[error("device setup")]
    Device(#[from] device::DeviceError),
    /// Listening or serving failed.
    #[error(transparent)]
    Serve(#[from] outboard_common::server::ServeError),
    /// The control socket could not be set up.
    #[error("control socket")]
    Control(#[from] control::ControlError),
    /// Signal handling could not be set up.
    #[error("signal handling")]
    Signals(#[source] std::io::Error),
}

/// The tap's link, over netlink.
#[derive(Debug)]
pub struct TapLink {
    netlink: Netlink,
    name: String,
    index: u32,
}

impl LinkControl for TapLink {
    fn set_up(&self, up: bool) -> Result<(), String> {
        self.netlink
            .set_up(&self.name, self.index, up)
            .map_err(|e| e.to_string())
    }
}

/// Opens the tap, configures it (MTU, bridge, address; down until a driver
/// starts) and returns the device.
pub fn setup(cfg: &Config) -> Result<Arc<NetDevice>, Error> {
    let tap = Tap::open(&cfg.tap, cfg.queue_pairs)?;
    let nl = Netlink::new()?;
    let name = tap.name().to_string();
    let index = nl.require(&name)?;
    nl.set_up(&name, index, false)?;
    nl.set_mtu(&name, index, u32::from(cfg.mtu))?;
    if let Some(br) = &cfg.bridge {
        let b = match nl.index(br)? {
            Some(b) => b,
            None if cfg.create_bridge => {
                log::info!("creating bridge {br}");
                nl.create_bridge(br)?
            }
            None => return Err(Error::NoBridge(br.clone())),
        };
        nl.attach(&name, index, b)?;
    }
    if let Some((ip, prefix)) = cfg.ip {
        nl.add_address(&name, index, ip, prefix)?;
    }
    let params = DeviceParams {
        mac: cfg.mac,
        mtu: cfg.mtu,
        queue_pairs: cfg.queue_pairs,
        queue_size: cfg.queue_size,
        offloads: cfg.offloads,
        tap_ufo: tap.supports_ufo(),
    };
    let link = TapLink {
        netlink: nl,
        name,
        index,
    };
    Ok(Arc::new(NetDevice::new(params, tap, Some(Box::new(link)))?))
}

/// Sets up the device and serves frontends until a signal.
pub fn run(cfg: Config) -> Result<(), Error> {
    let device = setup(&cfg)?;
    let m = cfg.mac;
    log::info!(
        "tap {}{} for guest MAC {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}, {} queue pair(s) of {}, MTU {}",
        device.tap().name(),
        cfg.bridge.as_ref().map(|b| format!(" on bridge {b}")).unwrap_or_default(),
        m[0], m[1], m[2], m[3], m[4], m[5],
        cfg.queue_pairs,
        cfg.queue_size,
        cfg.mtu
    );
    let (listener, owned_path) = match &cfg.listen {
        Listen::Path(p) => (outboard_common::server::bind(p)?, Some(p.clone())),
        Listen::Fd(fd) => (outboard_common::server::from_fd(*fd)?, None),
    };
    if let Some(path) = &cfg.control_socket {
        control::spawn(path, device.clone())?;
        log::info!("control socket on {}", path.display());
    }
    spawn_signal_thread(owned_path)?;
    server::serve(NetBackend::new(device), listener)?;
    Ok(())
}

/// SIGTERM/SIGINT: remove our socket and exit (the tap goes with the process
/// unless it is persistent).
fn spawn_signal_thread(socket: Option<std::path::PathBuf>) -> Result<(), Error> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals =
        signal_hook::iterator::Signals::new([SIGTERM, SIGINT]).map_err(Error::Signals)?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                log::info!("signal {sig}: exiting");
                if let Some(p) = socket {
                    let _ = std::fs::remove_file(p);
                }
                std::process::exit(0);
            }
        })
        .map_err(Error::Signals)?;
    Ok(())
}
