//! The daemons' shared prologue: the options every vhost-user daemon takes
//! ([`DaemonOptions`], flattened into each daemon's command line) and the
//! start-up sequence around the daemon's own serve loop ([`run`]):
//!
//! 1. bind `--socket-path` (replacing a stale socket file) or take over `--fd`;
//! 2. serve `--control-socket` on its own thread with the daemon's handler;
//!    and `--metrics` (Prometheus text, on its own thread) with the
//!    daemon's render closure;
//! 3. start the signal thread (SIGTERM/SIGINT: the daemon's clean-up, then
//!    the socket file is removed and the process exits);
//! 4. apply `--socket-mode` to the socket file;
//! 5. switch to `--user` (when started as root);
//! 6. install the `--seccomp` filter (common list plus the daemon's own);
//! 7. serve frontends.
//!
//! Everything that needs privileges (opening the image, creating the tap)
//! happens before [`run`]; nothing after step 5 can need them.

use std::os::unix::net::UnixListener;
use std::path::PathBuf;

use serde_json::Value;

use crate::control::ControlError;
use crate::metrics::{MetricsError, MetricsListen};
use crate::sandbox::{self, SandboxError, SeccompMode};
use crate::server::{self, ServeError};

/// The options every daemon takes, flattened into each daemon's command
/// line with `#[command(flatten)]`.
#[derive(Debug, Clone, clap::Args)]
pub struct DaemonOptions {
    /// Print the backend's capabilities as JSON (for QEMU) and exit.
    #[arg(long)]
    pub print_capabilities: bool,
    /// Unix socket to listen on, e.g. /run/vm0.sock (a stale socket file is replaced).
    #[arg(long, value_name = "PATH", conflicts_with = "fd")]
    pub socket_path: Option<PathBuf>,
    /// An already listening unix socket inherited from the parent, e.g. --fd 3.
    #[arg(long, value_name = "FDNUM")]
    pub fd: Option<i32>,
    /// Control socket (JSON lines, see the ctl subcommand), e.g. /run/vm0-ctl.sock.
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,
    /// Serve Prometheus metrics (HTTP GET /metrics) on unix:PATH or a
    /// loopback IP:PORT (port 0: any free port, logged); repeatable.
    #[arg(long, value_name = "unix:PATH|IP:PORT", value_parser = crate::metrics::parse_listen)]
    pub metrics: Vec<MetricsListen>,
    /// Log level: error, warn, info, debug or trace.
    #[arg(long, default_value = "info")]
    pub log_level: log::LevelFilter,
    /// Seccomp filter once serving: errno (forbidden system calls fail with
    /// EPERM), kill (SIGSYS), log (allowed, logged by the kernel) or off.
    #[arg(long, value_name = "MODE", default_value = "errno")]
    pub seccomp: SeccompMode,
    /// Run as this user once the device and sockets are set up (when started as root).
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
    /// Permissions of the --socket-path socket file, in octal (e.g. 0660).
    #[arg(long, value_name = "OCTAL", value_parser = parse_mode)]
    pub socket_mode: Option<u32>,
}

/// Parses an octal file mode: `0660`, `660` or `0o660`, at most `07777`.
pub fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| format!("{s:?} is not an octal mode such as 0660"))
}

/// Where the daemon listens.
#[derive(Debug, Clone)]
pub enum Listen {
    /// Bind this path.
    Path(PathBuf),
    /// Use this inherited fd.
    Fd(i32),
}

/// The validated [`DaemonOptions`].
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// Listening socket.
    pub listen: Listen,
    /// Control socket.
    pub control_socket: Option<PathBuf>,
    /// Metrics endpoints.
    pub metrics: Vec<MetricsListen>,
    /// Seccomp mode.
    pub seccomp: SeccompMode,
    /// Unprivileged user to switch to.
    pub user: Option<String>,
    /// Socket file permissions.
    pub socket_mode: Option<u32>,
}

/// Invalid shared options.
#[derive(Debug, thiserror::Error)]
pub enum OptionsError {
    /// Neither --socket-path nor --fd.
    #[error("give --socket-path PATH or --fd FDNUM")]
    NoSocket,
}

impl TryFrom<DaemonOptions> for DaemonConfig {
    type Error = OptionsError;

    fn try_from(o: DaemonOptions) -> Result<DaemonConfig, OptionsError> {
        let listen = match (o.socket_path, o.fd) {
            (Some(p), None) => Listen::Path(p),
            (None, Some(fd)) => Listen::Fd(fd),
            _ => return Err(OptionsError::NoSocket),
        };
        Ok(DaemonConfig {
            listen,
            control_socket: o.control_socket,
            metrics: o.metrics,
            seccomp: o.seccomp,
            user: o.user,
            socket_mode: o.socket_mode,
        })
    }
}

/// Errors of the prologue and the serve loop.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Listening or serving failed.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// The control socket could not be set up.
    #[error("control socket")]
    Control(#[source] ControlError),
    /// The metrics endpoint could not be set up.
    #[error("metrics endpoint")]
    Metrics(#[source] MetricsError),
    /// Signal handling could not be set up.
    #[error("signal handling")]
    Signals(#[source] std::io::Error),
    /// --socket-mode could not be applied.
    #[error("setting the socket permissions")]
    SocketMode(#[source] std::io::Error),
    /// Seccomp or dropping privileges failed.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
}

/// What a daemon plugs into [`run`].
#[derive(Debug)]
pub struct Hooks<C, M, T, S> {
    /// Answers one control-socket request (used with `--control-socket`).
    pub control: C,
    /// Appends the daemon's metrics in the Prometheus text format (used
    /// with `--metrics`, once per scrape, on the metrics thread).
    pub metrics: M,
    /// Runs on the signal thread at SIGTERM/SIGINT (given the signal) and
    /// returns the exit code; the socket file is removed after it.
    pub on_signal: T,
    /// Serves frontends on the listening socket, normally forever.
    pub serve: S,
    /// System calls the daemon needs while serving besides
    /// [`sandbox::BASE_SYSCALLS`].
    pub syscalls: &'static [i64],
    /// `ioctl` requests the daemon needs while serving besides
    /// [`sandbox::IOCTLS`].
    pub ioctls: &'static [u64],
}

/// The prologue (see the [module](self)), then `hooks.serve`.
pub fn run<C, M, T, S>(cfg: &DaemonConfig, hooks: Hooks<C, M, T, S>) -> Result<(), DaemonError>
where
    C: Fn(&Value) -> Value + Send + Sync + 'static,
    M: Fn(&mut String) + Send + Sync + 'static,
    T: FnOnce(i32) -> i32 + Send + 'static,
    S: FnOnce(UnixListener) -> Result<(), ServeError>,
{
    let (listener, owned_path) = match &cfg.listen {
        Listen::Path(p) => (server::bind(p)?, Some(p.clone())),
        Listen::Fd(fd) => (server::from_fd(*fd)?, None),
    };
    if let Some(path) = &cfg.control_socket {
        crate::control::spawn(path, hooks.control).map_err(DaemonError::Control)?;
        log::info!("control socket on {}", path.display());
    }
    if !cfg.metrics.is_empty() {
        let names =
            crate::metrics::spawn(&cfg.metrics, hooks.metrics).map_err(DaemonError::Metrics)?;
        log::info!("metrics on {}", names.join(", "));
    }
    spawn_signal_thread(owned_path.clone(), hooks.on_signal).map_err(DaemonError::Signals)?;
    if let (Some(mode), Some(p)) = (cfg.socket_mode, &owned_path) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
            .map_err(DaemonError::SocketMode)?;
    }
    if let Some(user) = &cfg.user {
        sandbox::drop_privileges(user)?;
        log::info!("running as {user}");
    }
    sandbox::apply_with_ioctls(cfg.seccomp, hooks.syscalls, hooks.ioctls)?;
    if cfg.seccomp != SeccompMode::Off {
        log::info!("seccomp filter on ({:?})", cfg.seccomp);
    }
    (hooks.serve)(listener)?;
    Ok(())
}

/// Starts the thread that waits for SIGTERM/SIGINT, then runs `on_signal`
/// (given the signal; it returns the exit code), removes `socket` (the
/// socket file the daemon bound, if any) and exits the process.
pub fn spawn_signal_thread<T>(socket: Option<PathBuf>, on_signal: T) -> std::io::Result<()>
where
    T: FnOnce(i32) -> i32 + Send + 'static,
{
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                let code = on_signal(sig);
                if let Some(p) = socket {
                    let _ = std::fs::remove_file(p);
                }
                std::process::exit(code);
            }
        })?;
    Ok(())
}

/// Writes 1 to a vring's call eventfd (interrupts the guest), the signal
/// closure both daemons hand their queue engines. `None` (no call fd yet)
/// does nothing; a failed write is ignored (the frontend went away).
///
/// The caller keeps the fd open for as long as it uses it (the daemons hold
/// the vring state, whose call eventfd cannot be replaced meanwhile).
pub fn signal_call(call: Option<std::os::unix::io::RawFd>) {
    if let Some(fd) = call {
        let one = 1u64.to_ne_bytes();
        // SAFETY: the caller guarantees `fd` is an open eventfd for this
        // call; we write 8 bytes from a local buffer.
        let _ = unsafe { libc::write(fd, one.as_ptr().cast(), one.len()) };
    }
}

/// What both daemons' `main` does once the command line is parsed and is
/// not `ctl`: `--print-capabilities` prints `capabilities` and returns;
/// else logging is set up at `--log-level` and `run` runs; its error is
/// printed as `NAME: MESSAGE` and the process exits with status 1.
pub fn main(
    name: &str,
    capabilities: &str,
    opts: &DaemonOptions,
    run: impl FnOnce() -> Result<(), String>,
) {
    if opts.print_capabilities {
        println!("{capabilities}");
        return;
    }
    crate::cli::init_logging(opts.log_level);
    if let Err(msg) = run() {
        eprintln!("{name}: {msg}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        daemon: DaemonOptions,
    }

    fn parse(args: &[&str]) -> Result<DaemonOptions, clap::Error> {
        Cli::try_parse_from(std::iter::once("d").chain(args.iter().copied())).map(|c| c.daemon)
    }

    #[test]
    fn options_and_validation() {
        let o = parse(&[
            "--socket-path",
            "/s",
            "--socket-mode",
            "0660",
            "--seccomp",
            "off",
        ])
        .expect("parse");
        assert_eq!(o.socket_mode, Some(0o660));
        assert_eq!(o.log_level, log::LevelFilter::Info);
        let c = DaemonConfig::try_from(o).expect("valid");
        assert!(matches!(c.listen, Listen::Path(ref p) if p.as_os_str() == "/s"));
        assert_eq!(c.seccomp, SeccompMode::Off);

        let o = parse(&["--fd", "3"]).expect("parse");
        assert_eq!(o.seccomp, SeccompMode::Errno);
        assert!(matches!(
            DaemonConfig::try_from(o).map(|c| c.listen),
            Ok(Listen::Fd(3))
        ));

        let o = parse(&[]).expect("parse");
        assert!(matches!(
            DaemonConfig::try_from(o),
            Err(OptionsError::NoSocket)
        ));
        assert!(parse(&["--socket-path", "/s", "--fd", "3"]).is_err());
        assert!(parse(&["--socket-mode", "0999"]).is_err());

        let o = parse(&[
            "--fd",
            "3",
            "--metrics",
            "unix:/m",
            "--metrics",
            "127.0.0.1:0",
        ])
        .expect("parse");
        assert_eq!(o.metrics.len(), 2);
        assert!(parse(&["--fd", "3", "--metrics", "0.0.0.0:9100"]).is_err());
    }

    #[test]
    fn modes() {
        assert_eq!(parse_mode("0660"), Ok(0o660));
        assert_eq!(parse_mode("0o600"), Ok(0o600));
        assert_eq!(parse_mode("7777"), Ok(0o7777));
        assert!(parse_mode("17777").is_err());
        assert!(parse_mode("rw").is_err());
    }

    #[test]
    fn signal_call_writes_one() {
        // SAFETY: creating an eventfd has no memory effects.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK) };
        assert!(fd >= 0);
        signal_call(Some(fd));
        signal_call(Some(fd));
        signal_call(None);
        let mut v = [0u8; 8];
        // SAFETY: reading 8 bytes into a local buffer from our eventfd.
        let n = unsafe { libc::read(fd, v.as_mut_ptr().cast(), v.len()) };
        assert_eq!(n, 8);
        assert_eq!(u64::from_ne_bytes(v), 2);
        // SAFETY: closing the eventfd we created and no longer use.
        unsafe { libc::close(fd) };
    }
}
