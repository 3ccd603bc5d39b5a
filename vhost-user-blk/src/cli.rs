//! Command line (QEMU's vhost-user backend program conventions plus our
//! options) and its validation into a [`Config`].

pub use outboard_common::daemon::{DaemonConfig, Listen};
use outboard_common::daemon::{DaemonOptions, OptionsError};
pub use outboard_common::size::parse_size;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

/// Image formats on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    /// A plain file or block device.
    Raw,
    /// A qcow2 image (backing files and internal snapshots included).
    Qcow2,
    /// Guess from the file's first bytes (only for images you trust).
    Auto,
}

/// Cache modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CacheArg {
    /// Writes complete when the host has them; FLUSH makes them durable.
    Writeback,
    /// Every write is durable before it completes.
    Writethrough,
}

/// vhost-user block backend: serves a raw file, block device or qcow2 image
/// to a vhost-user frontend (QEMU, Cloud Hypervisor, Firecracker, libblkio).
#[derive(Debug, Parser)]
#[command(
    name = "vhost-user-blk",
    version,
    after_help = "Examples:\n  \
        vhost-user-blk --socket-path /run/vm0-disk.sock --blk-file disk.img\n  \
        vhost-user-blk --socket-path /run/vm0.sock --blk-file vm0.qcow2 --format qcow2 \\\n      \
        --num-queues 4 --control-socket /run/vm0-ctl.sock\n  \
        qemu-system-x86_64 ... -chardev socket,id=c0,path=/run/vm0.sock \\\n      \
        -device vhost-user-blk-pci,chardev=c0,num-queues=4\n\n\
        The daemon listens on the socket, serves one frontend at a time, and listens again when \
        it disconnects. SIGTERM finishes in-flight requests, flushes and exits.\n\n\
        Prometheus metrics: --metrics unix:/run/vm0-metrics.sock and/or --metrics \
        127.0.0.1:9101 (loopback only), then curl http://127.0.0.1:9101/metrics\n\n\
        Control a running daemon: vhost-user-blk ctl /run/vm0-ctl.sock stats",
    subcommand_negates_reqs = true,
    args_conflicts_with_subcommands = true,
    mut_arg("socket_path", |a| a.help(
        "Unix socket to listen on, e.g. /run/vm0-disk.sock (a stale socket file is replaced)")),
    mut_arg("control_socket", |a| a.help(
        "Control socket for stats, live snapshots and resize (JSON lines), e.g. /run/vm0-ctl.sock")),
    mut_arg("user", |a| a.help(
        "Run as this user once the image and sockets are open (when started as root)"))
)]
pub struct Args {
    /// Client for a running daemon's control socket.
    #[command(subcommand)]
    pub ctl: Option<Sub>,
    /// The options every daemon takes (socket, control socket, sandbox, logging).
    #[command(flatten)]
    pub daemon: DaemonOptions,
    /// The disk image or block device to serve.
    #[arg(
        long,
        value_name = "PATH",
        required_unless_present = "print_capabilities"
    )]
    pub blk_file: Option<PathBuf>,
    /// Image format; "auto" probes and should only be used for trusted images.
    #[arg(long, value_enum, default_value_t = FormatArg::Raw)]
    pub format: FormatArg,
    /// Serve the disk read-only (writes fail; the guest sees a read-only disk).
    #[arg(long)]
    pub read_only: bool,
    /// Number of request queues (one worker thread each), 1 to 64.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub num_queues: u16,
    /// Entries per queue, a power of two from 2 to 32768.
    #[arg(long, default_value_t = 256)]
    pub queue_size: u16,
    /// Serial number the guest reads with GET_ID (at most 20 bytes), e.g. --serial vm0-root.
    #[arg(long, value_name = "STRING", default_value = "")]
    pub serial: String,
    /// Open raw images with O_DIRECT (bypass the host page cache).
    #[arg(long)]
    pub direct: bool,
    /// Cache mode the guest starts with (it may switch it via CONFIG_WCE).
    #[arg(long, value_enum, default_value_t = CacheArg::Writeback)]
    pub cache: CacheArg,
    /// Longest busy-poll of a queue after it runs dry, in microseconds (0: off).
    /// The window adapts: it grows while requests keep arriving within it and
    /// shrinks to nothing on an idle queue. Saves the kick and wake-up per
    /// batch; e.g. --poll-us 0 to never poll.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub poll_us: u64,
    /// TEST ONLY, hidden from --help, off (0) by default: hold each wave of
    /// completions this many milliseconds (at most 10000) after its I/O
    /// finished before returning it to the guest, so that requests are in
    /// flight (recorded in the inflight region) whenever a crash test kills
    /// the daemon. Never use it in production: it only adds latency.
    #[arg(
        long,
        hide = true,
        value_name = "MS",
        default_value_t = 0,
        value_parser = clap::value_parser!(u64).range(0..=10_000)
    )]
    pub test_hold_completions_ms: u64,
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The shared daemon settings (socket, control socket, sandbox).
    pub daemon: DaemonConfig,
    /// Image.
    pub blk_file: PathBuf,
    /// Format (None: probe).
    pub format: Option<qcow2::ImageFormat>,
    /// Read-only.
    pub read_only: bool,
    /// Queues.
    pub num_queues: u16,
    /// Queue size.
    pub queue_size: u16,
    /// Serial.
    pub serial: Vec<u8>,
    /// O_DIRECT.
    pub direct: bool,
    /// Writeback cache at start.
    pub writeback: bool,
    /// Poll window.
    pub poll: Duration,
    /// TEST ONLY (`--test-hold-completions-ms`, zero by default): how long
    /// each wave of completions is held back.
    pub test_hold_completions: Duration,
}

/// Invalid command lines.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Invalid shared options (neither --socket-path nor --fd).
    #[error(transparent)]
    Daemon(#[from] OptionsError),
    /// Missing --blk-file.
    #[error("give --blk-file PATH")]
    NoFile,
    /// Bad queue size.
    #[error("--queue-size {0} must be a power of two from 2 to 32768")]
    QueueSize(u16),
    /// Serial too long.
    #[error("--serial is {0} bytes; at most 20")]
    Serial(usize),
    /// --direct with a non-raw format.
    #[error("--direct is only supported with --format raw")]
    Direct,
}

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(a: Args) -> Result<Config, ConfigError> {
        let daemon = DaemonConfig::try_from(a.daemon)?;
        let blk_file = a.blk_file.ok_or(ConfigError::NoFile)?;
        if !a.queue_size.is_power_of_two() || a.queue_size < 2 {
            return Err(ConfigError::QueueSize(a.queue_size));
        }
        if a.serial.len() > 20 {
            return Err(ConfigError::Serial(a.serial.len()));
        }
        let format = match a.format {
            FormatArg::Raw => Some(qcow2::ImageFormat::Raw),
            FormatArg::Qcow2 => Some(qcow2::ImageFormat::Qcow2),
            FormatArg::Auto => None,
        };
        if a.direct && a.format != FormatArg::Raw {
            return Err(ConfigError::Direct);
        }
        Ok(Config {
            daemon,
            blk_file,
            format,
            read_only: a.read_only,
            num_queues: a.num_queues,
            queue_size: a.queue_size,
            serial: a.serial.into_bytes(),
            direct: a.direct,
            writeback: a.cache == CacheArg::Writeback,
            poll: Duration::from_micros(a.poll_us),
            test_hold_completions: Duration::from_millis(a.test_hold_completions_ms),
        })
    }
}

/// `--print-capabilities` output (QEMU's vhost-user backend conventions).
pub fn capabilities() -> &'static str {
    r#"{"type": "block", "features": ["read-only", "blk-file"]}"#
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Sub {
    /// Send a command to a running daemon's control socket and print the reply.
    #[command(
        after_help = "Examples:\n  vhost-user-blk ctl /run/vm0-ctl.sock stats\n  \
        vhost-user-blk ctl /run/vm0-ctl.sock snapshot-create before-upgrade\n  \
        vhost-user-blk ctl /run/vm0-ctl.sock resize 40G"
    )]
    Ctl {
        /// The daemon's --control-socket path.
        socket: PathBuf,
        /// What to do.
        #[command(subcommand)]
        cmd: CtlCmd,
    },
}

/// Control commands.
#[derive(Debug, Subcommand)]
pub enum CtlCmd {
    /// Per-queue request, byte and error counters.
    Stats,
    /// Take an internal snapshot of the running disk (qcow2 only).
    SnapshotCreate {
        /// Snapshot name.
        name: String,
    },
    /// List internal snapshots.
    SnapshotList,
    /// Delete an internal snapshot (by name or id).
    SnapshotDelete {
        /// Snapshot name or id.
        name: String,
    },
    /// Grow the disk while the guest runs.
    Resize {
        /// New size: bytes, or a number with a 1024-based suffix K, M, G, T, P or E
        /// (qemu-img's sizes), e.g. 40G, 1.5T, 0x100000.
        size: String,
    },
}

impl CtlCmd {
    /// The JSON request for this command.
    pub fn request(&self) -> Result<serde_json::Value, String> {
        use serde_json::json;
        Ok(match self {
            CtlCmd::Stats => json!({"cmd": "stats"}),
            CtlCmd::SnapshotCreate { name } => json!({"cmd": "snapshot-create", "name": name}),
            CtlCmd::SnapshotList => json!({"cmd": "snapshot-list"}),
            CtlCmd::SnapshotDelete { name } => json!({"cmd": "snapshot-delete", "name": name}),
            CtlCmd::Resize { size } => {
                json!({"cmd": "resize", "size": parse_size(size).map_err(|e| e.to_string())?})
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("40G"), Ok(40 << 30));
        assert_eq!(parse_size("3k"), Ok(3072));
        assert!(parse_size("1X").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn shared_options_keep_their_names_and_help() {
        use clap::{CommandFactory, Parser};
        let a = Args::try_parse_from([
            "vhost-user-blk",
            "--socket-path",
            "/s",
            "--blk-file",
            "disk.img",
            "--control-socket",
            "/c",
            "--log-level",
            "debug",
            "--seccomp",
            "off",
            "--user",
            "nobody",
            "--socket-mode",
            "0660",
        ])
        .expect("parse");
        assert_eq!(a.daemon.log_level, log::LevelFilter::Debug);
        let c = Config::try_from(a).expect("valid");
        assert!(matches!(c.daemon.listen, Listen::Path(ref p) if p.as_os_str() == "/s"));
        assert_eq!(c.daemon.socket_mode, Some(0o660));
        assert_eq!(c.daemon.user.as_deref(), Some("nobody"));
        assert!(c.daemon.control_socket.is_some());
        assert!(matches!(
            Args::try_parse_from(["vhost-user-blk", "--blk-file", "disk.img"])
                .map(Config::try_from),
            Ok(Err(ConfigError::Daemon(_)))
        ));
        let help = Args::command().render_long_help().to_string();
        for s in [
            "Examples:",
            "/run/vm0-disk.sock",
            "--fd <FDNUM>",
            "--print-capabilities",
            "ctl ",
        ] {
            assert!(help.contains(s), "--help lacks {s:?}");
        }
    }
}
