//! vhost-user block backend.
//!
//! The device model (request parsing and execution against a disk) is
//! separate from the transport; only `backend` and `server` know vhost-user.
//!
//! # Modules
//! - [`cli`]: command line and its validation into a `Config`.
//! - [`disk`]: raw file / block device or qcow2 image behind one type.
//! - [`request`]: virtio-blk request parsing from descriptor chains.
//! - [`chain`]: walking a descriptor chain from a head index (resubmission).
//! - [`inflight`]: the inflight I/O tracking region (crash recovery).
//! - [`worker`]: the per-queue engine (io_uring for raw, the qcow2 crate for qcow2).
//! - [`virtio`]: feature bits and the configuration space.
//! - [`stats`]: per-queue counters.
//! - [`backend`]: the `VhostUserBackend` adapter.
//! - [`server`]: listening, re-listening after a disconnect, `--fd`.
//! - [`control`]: the JSON-lines control socket (stats, live snapshots, resize).

pub mod backend;
pub mod chain;
pub mod cli;
pub mod control;
pub mod disk;
pub mod inflight;
pub mod request;
pub mod server;
pub mod stats;
pub mod virtio;
pub mod worker;

use std::sync::Arc;

use outboard_common::sandbox;

use crate::backend::BlkDevice;
use crate::cli::{Config, Listen};
use crate::disk::Disk;
use crate::worker::DeviceSettings;

/// Errors that stop the daemon.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The image could not be opened.
    #[error("{}", path.display())]
    Disk {
        /// The image.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: disk::DiskError,
    },
    /// Probing the format failed.
    #[error("probing the format")]
    Probe(#[source] qcow2::Error),
    /// The device could not be set up.
    #[error("device setup")]
    Device(#[source] worker::WorkerError),
    /// Listening or serving failed.
    #[error(transparent)]
    Serve(#[from] server::ServeError),
    /// The control socket could not be set up.
    #[error("control socket")]
    Control(#[from] control::ControlError),
    /// Signal handling could not be set up.
    #[error("signal handling")]
    Signals(#[source] std::io::Error),
    /// --socket-mode could not be applied.
    #[error("setting the socket permissions")]
    SocketMode(#[source] std::io::Error),
    /// Seccomp or dropping privileges failed.
    #[error(transparent)]
    Sandbox(#[from] sandbox::SandboxError),
}

/// Opens the disk, builds the device and serves frontends until a signal.
pub fn run(cfg: Config) -> Result<(), Error> {
    let format = match cfg.format {
        Some(f) => f,
        None => qcow2::ImageFormat::probe(&cfg.blk_file).map_err(Error::Probe)?,
    };
    let disk = Disk::open(&cfg.blk_file, format, cfg.read_only, cfg.direct).map_err(|source| {
        Error::Disk {
            path: cfg.blk_file.clone(),
            source,
        }
    })?;
    log::info!(
        "serving {} ({}, {} bytes{}) with {} queue(s) of {}",
        cfg.blk_file.display(),
        format.name(),
        disk.size(),
        if cfg.read_only { ", read-only" } else { "" },
        cfg.num_queues,
        cfg.queue_size
    );
    let settings = DeviceSettings {
        serial: cfg.serial.clone(),
        max_dwz_segments: virtio::MAX_DWZ_SEGMENTS,
        poll: cfg.poll,
        hold_completions: cfg.test_hold_completions,
    };
    if !cfg.test_hold_completions.is_zero() {
        log::warn!(
            "TEST ONLY: holding completions {:?} per wave (--test-hold-completions-ms)",
            cfg.test_hold_completions
        );
    }
    let device = Arc::new(
        BlkDevice::new(
            Arc::new(disk),
            cfg.num_queues,
            cfg.queue_size,
            cfg.writeback,
            settings,
        )
        .map_err(Error::Device)?,
    );
    let (listener, owned_path) = match &cfg.listen {
        Listen::Path(p) => (server::bind(p)?, Some(p.clone())),
        Listen::Fd(fd) => (server::from_fd(*fd)?, None),
    };
    if let Some(path) = &cfg.control_socket {
        control::spawn(path, device.clone())?;
        log::info!("control socket on {}", path.display());
    }
    spawn_signal_thread(device.clone(), owned_path.clone())?;
    if let (Some(mode), Some(p)) = (cfg.socket_mode, &owned_path) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
            .map_err(Error::SocketMode)?;
    }
    if let Some(user) = &cfg.user {
        sandbox::drop_privileges(user)?;
        log::info!("running as {user}");
    }
    sandbox::apply(cfg.seccomp, &[])?;
    if cfg.seccomp != sandbox::SeccompMode::Off {
        log::info!("seccomp filter on ({:?})", cfg.seccomp);
    }
    server::serve(device, listener)?;
    Ok(())
}

/// SIGTERM/SIGINT: stop taking requests, let in-flight ones finish, flush, exit.
fn spawn_signal_thread(
    device: Arc<BlkDevice>,
    socket: Option<std::path::PathBuf>,
) -> Result<(), Error> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals =
        signal_hook::iterator::Signals::new([SIGTERM, SIGINT]).map_err(Error::Signals)?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                log::info!("signal {sig}: draining and flushing");
                device.pause(true);
                let code = match device.disk.flush() {
                    Ok(()) => 0,
                    Err(e) => {
                        log::error!("final flush failed: {e}");
                        1
                    }
                };
                if let Some(p) = socket {
                    let _ = std::fs::remove_file(p);
                }
                std::process::exit(code);
            }
        })
        .map_err(Error::Signals)?;
    Ok(())
}
