//! vhost-user network backend: a virtio-net device on a Linux tap,
//! optionally attached to a Linux bridge.
//!
//! The device model (RX/TX engines over virtio queues and a tap fd) is
//! separate from the transport; only `backend` and `server` know vhost-user.
//!
//! # Modules
//! - [`cli`]: command line and its validation into a `Config`.
//! - [`tap`]: opening the tap (one fd per queue pair), vnet header, offloads,
//!   carrier, persistence.
//! - [`netlink`]: links up/down, MTU, bridges, addresses, aliases over
//!   rtnetlink (setup only).
//! - [`virtio`]: feature bits, negotiated settings, the configuration space.
//! - [`chain`]: descriptor chains as iovecs into guest memory.
//! - [`rx`]: tap → guest (readv into the chains, mergeable buffers).
//! - [`tx`]: guest → tap (writev from the chains).
//! - [`stats`]: per-queue counters.
//! - [`device`]: the device: tap, engines, counters, link state.
//! - [`backend`]: the `VhostUserBackend` adapter.
//! - [`server`]: listening, re-listening after a disconnect, the tap on the epoll.
//! - [`control`]: the JSON-lines control socket (counters).
//!
//! This file: setup ([`prepare`]: tap, bridge, the persistent tagged tap
//! that survives a crash), then the sandbox ([`apply_seccomp`], `--user`)
//! and serving ([`run`]).

pub mod backend;
pub mod chain;
pub mod cli;
pub mod control;
pub mod device;
pub mod netlink;
pub mod poll;
pub mod rx;
pub mod server;
pub mod stats;
pub mod tap;
pub mod tx;
pub mod uring;
pub mod virtio;

use std::sync::Arc;

use outboard_common::{daemon, sandbox};

use crate::backend::NetBackend;
use crate::cli::{random_mac, Config};
use crate::device::NetDevice;
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
    /// The prologue (sockets, signals, sandbox) or serving failed.
    #[error(transparent)]
    Daemon(#[from] daemon::DaemonError),
}

/// The alias (IFLA_IFALIAS) of a tap the daemon created, followed by
/// ` mac=` and the guest's MAC: it marks the tap as ours (persistent while
/// we serve, removed at a clean exit) and tells a restarted instance the
/// MAC to keep.
pub const TAP_ALIAS: &str = "outboard-vhost-user-net";

/// System calls the net daemon needs while serving, besides the common
/// list (found by running the net tests with `--seccomp log`).
pub const SERVING_SYSCALLS: &[i64] = &[];

/// Installs the daemon's seccomp filter on every thread: the common list,
/// [`SERVING_SYSCALLS`] and the tap requests of
/// [`Tap::SERVING_IOCTLS`]. No `socket`: the daemon can open no netlink
/// socket (nor create taps) once serving.
pub fn apply_seccomp(mode: sandbox::SeccompMode) -> Result<(), sandbox::SandboxError> {
    sandbox::apply_with_ioctls(mode, SERVING_SYSCALLS, Tap::SERVING_IOCTLS)
}

fn format_mac(m: [u8; 6]) -> String {
    m.map(|b| format!("{b:02x}")).join(":")
}

/// `Some(mac)` if `alias` is ours (`mac` is `None` if it holds none).
fn our_alias(alias: &str) -> Option<Option<[u8; 6]>> {
    let rest = alias.strip_prefix(TAP_ALIAS)?;
    if rest.is_empty() {
        return Some(None);
    }
    Some(rest.strip_prefix(" mac=").and_then(cli::parse_mac))
}

/// A set-up device and whether its tap is the daemon's own (created by
/// this or an earlier instance, persistent until a clean exit).
#[derive(Debug)]
pub struct Prepared {
    /// The device.
    pub device: Arc<NetDevice>,
    /// The tap carries [`TAP_ALIAS`].
    pub owned_tap: bool,
}

/// Opens the tap, configures it (MTU, bridge, address; admin up, no
/// carrier until a driver starts) and returns the device.
pub fn setup(cfg: &Config) -> Result<Arc<NetDevice>, Error> {
    Ok(prepare(cfg)?.device)
}

/// [`setup`], also telling whether the tap is ours. A tap we create is made
/// persistent and tagged, so that it survives a crash of the daemon with
/// its bridge membership, address and MAC; a restarted instance finds the
/// tag and reuses the guest MAC it names when `--mac` is not given.
pub fn prepare(cfg: &Config) -> Result<Prepared, Error> {
    let nl = Netlink::new()?;
    let existed = !cfg.tap.contains('%') && nl.index(&cfg.tap)?.is_some();
    let tag = if existed {
        nl.alias(&cfg.tap)?.as_deref().and_then(our_alias)
    } else {
        None
    };
    let tap = Tap::open(&cfg.tap, cfg.queue_pairs)?;
    let owned_tap = !existed || tag.is_some();
    let mac = cfg.mac.or(tag.flatten()).unwrap_or_else(random_mac);
    let name = tap.name().to_string();
    let index = nl.require(&name)?;
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
    if owned_tap {
        nl.set_alias(
            &name,
            index,
            &format!("{TAP_ALIAS} mac={}", format_mac(mac)),
        )?;
        tap.set_persist(true)?;
    }
    let params = DeviceParams {
        mac,
        mtu: cfg.mtu,
        queue_pairs: cfg.queue_pairs,
        queue_size: cfg.queue_size,
        offloads: cfg.offloads,
        tap_ufo: tap.supports_ufo(),
        tap_io: cfg.tap_io,
        poll_us: cfg.poll_us,
    };
    let device = Arc::new(NetDevice::new(params, tap)?);
    // Administratively up for good: the carrier says whether a driver runs.
    nl.set_up(&name, index, true)?;
    Ok(Prepared { device, owned_tap })
}

/// Sets up the device and serves frontends until a signal.
pub fn run(cfg: Config) -> Result<(), Error> {
    let Prepared { device, owned_tap } = prepare(&cfg)?;
    let r = serve_device(&cfg, device.clone(), owned_tap);
    if r.is_err() && owned_tap {
        let _ = device.tap().set_persist(false);
    }
    r
}

fn serve_device(cfg: &Config, device: Arc<NetDevice>, owned_tap: bool) -> Result<(), Error> {
    log::info!(
        "tap {}{} for guest MAC {}, {} queue pair(s) of {}, MTU {}",
        device.tap().name(),
        cfg.bridge
            .as_ref()
            .map(|b| format!(" on bridge {b}"))
            .unwrap_or_default(),
        format_mac(device.params().mac),
        cfg.queue_pairs,
        cfg.queue_size,
        cfg.mtu
    );
    let serve_device = device.clone();
    let control_device = device.clone();
    let metrics_device = device.clone();
    daemon::run(
        &cfg.daemon,
        daemon::Hooks {
            control: move |req: &serde_json::Value| control::handle(req, &control_device),
            metrics: move |out: &mut String| stats::render(&metrics_device.stats, out),
            on_signal: move |sig| {
                on_signal(owned_tap.then_some(device.as_ref()), sig);
                0
            },
            serve: |listener| server::serve(NetBackend::new(serve_device), listener),
            syscalls: SERVING_SYSCALLS,
            ioctls: Tap::SERVING_IOCTLS,
        },
    )?;
    Ok(())
}

/// SIGTERM/SIGINT: make our tap non-persistent (it goes with the process);
/// the prologue then removes our socket and exits with status 0.
fn on_signal(owned_tap: Option<&NetDevice>, sig: i32) {
    log::info!("signal {sig}: exiting");
    if let Some(d) = owned_tap {
        if let Err(e) = d.tap().set_persist(false) {
            log::warn!("{e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_alias_marks_ours_and_keeps_the_mac() {
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let alias = format!("{TAP_ALIAS} mac={}", format_mac(mac));
        assert_eq!(alias, "outboard-vhost-user-net mac=52:54:00:12:34:56");
        assert_eq!(our_alias(&alias), Some(Some(mac)));
        assert_eq!(our_alias(TAP_ALIAS), Some(None));
        assert_eq!(our_alias(&format!("{TAP_ALIAS} mac=zz")), Some(None));
        assert_eq!(our_alias("uplink to the lab"), None);
    }
}
