//! vhost-user block backend.
//!
//! The device model (request parsing and execution against a disk) is
//! separate from the transport; only `backend` and `server` know vhost-user.
//!
//! # Modules
//! - [`cli`]: command line and its validation into a `Config`.
//! - [`disk`]: the image (raw file / block device or qcow2) and the
//!   [`disk::DiskBackend`] trait the queue engine does I/O through, with
//!   [`disk::raw`] (io_uring) and [`disk::qcow2`] (synchronous for now).
//! - [`device`]: the device model: settings, config space, the queues'
//!   engines and counters, pause/resize (no vhost-user).
//! - [`queue`]: the per-queue engine: pass loop, waves, busy-polling,
//!   submission to and reaping from the disk backend, inflight recovery;
//!   [`queue::QueueCtx`] carries a pass's context.
//! - [`request`]: virtio-blk request parsing from descriptor chains.
//! - [`dispatch`]: a parsed request into a disk operation (or an answer).
//! - [`complete`]: status byte, used ring, inflight record, notification
//!   (`complete::publish` is where completions become visible).
//! - [`errors`]: why requests fail, counting by kind, the rate-limited log.
//! - [`chain`]: walking a descriptor chain from a head index (resubmission).
//! - [`inflight`]: the inflight I/O tracking region (crash recovery).
//! - [`virtio`]: feature bits and the configuration space.
//! - [`stats`]: per-queue counters.
//! - [`backend`]: the `VhostUserBackend` adapter (delegates to [`device`]).
//! - [`server`]: listening, re-listening after a disconnect, `--fd`.
//! - [`control`]: the JSON-lines control socket (stats, live snapshots, resize).

pub mod backend;
pub mod chain;
pub mod cli;
pub mod complete;
pub mod control;
pub mod device;
pub mod disk;
pub mod dispatch;
pub mod errors;
pub mod inflight;
mod poll;
pub mod queue;
pub mod request;
pub mod server;
pub mod stats;
pub mod virtio;

use std::sync::Arc;

use outboard_common::daemon;

use crate::cli::Config;
use crate::device::BlkDevice;
use crate::disk::Disk;
use crate::queue::DeviceSettings;

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
    Device(#[source] device::DeviceError),
    /// The prologue (sockets, signals, sandbox) or serving failed.
    #[error(transparent)]
    Daemon(#[from] daemon::DaemonError),
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
    let control_device = device.clone();
    let metrics_device = device.clone();
    let signal_device = device.clone();
    daemon::run(
        &cfg.daemon,
        daemon::Hooks {
            control: move |req: &serde_json::Value| control::handle(req, &control_device),
            metrics: move |out: &mut String| stats::render(&metrics_device.stats, out),
            on_signal: move |sig| on_signal(&signal_device, sig),
            serve: move |listener| server::serve(device, listener),
            syscalls: &[],
            ioctls: &[],
        },
    )?;
    Ok(())
}

/// SIGTERM/SIGINT: stop taking requests, let in-flight ones finish, flush;
/// the exit code says whether the final flush worked.
fn on_signal(device: &BlkDevice, sig: i32) -> i32 {
    log::info!("signal {sig}: draining and flushing");
    device.pause(true);
    match device.disk.flush() {
        Ok(()) => 0,
        Err(e) => {
            log::error!("final flush failed: {e}");
            1
        }
    }
}
