//! Command line (QEMU's vhost-user backend program conventions plus our
//! options) and its validation into a [`Config`].

use std::net::IpAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
pub use outboard_common::daemon::{DaemonConfig, Listen};
use outboard_common::daemon::{DaemonOptions, OptionsError};
pub use outboard_common::mac::random_mac;

use crate::uring::TapIo;
use crate::virtio::Offloads;

/// A switch that defaults on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    /// Enabled.
    On,
    /// Disabled.
    Off,
}

impl OnOff {
    fn on(self) -> bool {
        self == OnOff::On
    }
}

/// vhost-user network backend: a virtio-net device for a vhost-user frontend
/// (QEMU, Cloud Hypervisor, DPDK virtio-user, ...) on a Linux tap, optionally
/// attached to a Linux bridge.
#[derive(Debug, Parser)]
#[command(
    name = "vhost-user-net",
    version,
    after_help = "Examples:\n  \
        vhost-user-net --socket-path /run/vm0-net.sock --tap vm0 --bridge br0\n  \
        vhost-user-net --socket-path /run/vm0-net.sock --tap vm0 --bridge br0 --create-bridge \\\n      \
        --queue-pairs 2 --mac 52:54:00:12:34:56 --control-socket /run/vm0-net-ctl.sock\n  \
        vhost-user-net --socket-path /run/vm0-net.sock --tap vm0 --ip 192.168.100.1 --netmask 255.255.255.0\n  \
        qemu-system-x86_64 ... -chardev socket,id=n0,path=/run/vm0-net.sock \\\n      \
        -netdev vhost-user,id=net0,chardev=n0,queues=2 -device virtio-net-pci,netdev=net0,mq=on\n\n\
        The tap is created (or an existing one opened) at start; its carrier comes up when the \
        guest driver starts the queues and goes down, keeping its bridge membership, when the \
        frontend disconnects; the daemon then listens again on the same socket. A tap the daemon \
        created outlives a crash (it is persistent until a clean exit), so a restarted daemon \
        finds it with its bridge, address and guest MAC.\n\n\
        Offload switches default to on: --tso4 off etc. turn one off (csum off turns off all \
        segmentation offloads too).\n\n\
        Prometheus metrics: --metrics unix:/run/vm0-metrics.sock and/or --metrics \
        127.0.0.1:9101 (loopback only), then curl http://127.0.0.1:9101/metrics\n\n\
        Control a running daemon: vhost-user-net ctl /run/vm0-net-ctl.sock stats",
    subcommand_negates_reqs = true,
    args_conflicts_with_subcommands = true,
    mut_arg("socket_path", |a| a.help(
        "Unix socket to listen on, e.g. /run/vm0-net.sock (a stale socket file is replaced)")),
    mut_arg("control_socket", |a| a.help(
        "Control socket for counters (JSON lines), e.g. /run/vm0-net-ctl.sock")),
    mut_arg("user", |a| a.help(
        "Run as this user once the tap and sockets are set up (when started as root); \
        no capability is kept"))
)]
pub struct Args {
    /// Client for a running daemon's control socket.
    #[command(subcommand)]
    pub ctl: Option<Sub>,
    /// The options every daemon takes (socket, control socket, sandbox, logging).
    #[command(flatten)]
    pub daemon: DaemonOptions,
    /// Tap interface to create, or to open if it exists ("%d" picks a free number).
    #[arg(long, value_name = "NAME", default_value = "obtap%d")]
    pub tap: String,
    /// Attach the tap to this Linux bridge (which must exist unless --create-bridge).
    #[arg(long, value_name = "BRIDGE")]
    pub bridge: Option<String>,
    /// Create the --bridge if it does not exist (and bring it up).
    #[arg(long, requires = "bridge")]
    pub create_bridge: bool,
    /// The guest's MAC address, e.g. 52:54:00:12:34:56 (default: the one a previous instance
    /// used on this tap, else random, locally administered).
    #[arg(long, value_name = "MAC")]
    pub mac: Option<String>,
    /// MTU of the guest NIC and of the tap.
    #[arg(long, default_value_t = 1500, value_parser = clap::value_parser!(u16).range(68..=65535))]
    pub mtu: u16,
    /// Number of RX/TX queue pairs (one worker thread and one tap queue each), 1 to 16.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub queue_pairs: u16,
    /// Entries per queue, a power of two from 2 to 32768.
    #[arg(long, default_value_t = 256)]
    pub queue_size: u16,
    /// Checksum offload (CSUM, GUEST_CSUM); off also turns off TSO and UFO.
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    pub csum: OnOff,
    /// TCPv4 segmentation offload (HOST_TSO4, GUEST_TSO4).
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    pub tso4: OnOff,
    /// TCPv6 segmentation offload (HOST_TSO6, GUEST_TSO6).
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    pub tso6: OnOff,
    /// UDP fragmentation offload (HOST_UFO, GUEST_UFO), if the tap supports it.
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    pub ufo: OnOff,
    /// Mergeable receive buffers (MRG_RXBUF).
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    pub mrg_rxbuf: OnOff,
    /// Notification suppression (RING_EVENT_IDX).
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    pub event_idx: OnOff,
    /// Tap I/O: uring (batches of reads/writes per system call) or sync (one
    /// readv/writev per frame).
    #[arg(long, value_enum, default_value_t = TapIo::default())]
    pub tap_io: TapIo,
    /// Largest window a TX queue that ran dry polls its ring before waiting for a kick
    /// (adaptive; 0: off).
    #[arg(long, value_name = "US", default_value_t = 50)]
    pub poll_us: u32,
    /// Host-side address of the tap for a routed setup, e.g. 192.168.100.1.
    #[arg(long, value_name = "ADDR")]
    pub ip: Option<IpAddr>,
    /// Netmask of --ip, dotted (255.255.255.0) or a prefix length (24).
    #[arg(long, value_name = "MASK", requires = "ip")]
    pub netmask: Option<String>,
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The shared daemon settings (socket, control socket, sandbox).
    pub daemon: DaemonConfig,
    /// Tap name (may contain %d).
    pub tap: String,
    /// Bridge to attach to.
    pub bridge: Option<String>,
    /// Create the bridge if missing.
    pub create_bridge: bool,
    /// Guest MAC (`None`: the previous instance's on this tap, else random).
    pub mac: Option<[u8; 6]>,
    /// MTU.
    pub mtu: u16,
    /// Queue pairs.
    pub queue_pairs: u16,
    /// Queue size.
    pub queue_size: u16,
    /// Offload switches.
    pub offloads: Offloads,
    /// Tap I/O mode.
    pub tap_io: TapIo,
    /// TX busy-poll window (microseconds).
    pub poll_us: u32,
    /// Host address and prefix length.
    pub ip: Option<(IpAddr, u8)>,
}

/// Invalid command lines.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Invalid shared options (neither --socket-path nor --fd).
    #[error(transparent)]
    Daemon(#[from] OptionsError),
    /// Bad queue size.
    #[error("--queue-size {0} must be a power of two from 2 to 32768")]
    QueueSize(u16),
    /// Bad MAC.
    #[error("--mac {0:?} is not a unicast MAC address like 52:54:00:12:34:56")]
    Mac(String),
    /// Bad netmask.
    #[error("--netmask {0:?} is not a netmask for --ip")]
    Netmask(String),
    /// Bad tap name.
    #[error("--tap {0:?} must be 1 to 15 bytes")]
    Tap(String),
}

/// Parses "52:54:00:12:34:56" (unicast only).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in mac.iter_mut() {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    if parts.next().is_some() || mac[0] & 1 != 0 {
        return None;
    }
    Some(mac)
}

/// Prefix length of a netmask given as "24" or "255.255.255.0".
pub fn parse_netmask(s: &str, ip: IpAddr) -> Option<u8> {
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if let Ok(n) = s.parse::<u8>() {
        return (n <= max).then_some(n);
    }
    let mask: IpAddr = s.parse().ok()?;
    let bits: u128 = match (mask, ip) {
        (IpAddr::V4(m), IpAddr::V4(_)) => u128::from(u32::from(m)) << 96,
        (IpAddr::V6(m), IpAddr::V6(_)) => u128::from(m),
        _ => return None,
    };
    let ones = bits.leading_ones();
    // Contiguous ones only.
    (bits.checked_shl(ones).unwrap_or(0) == 0).then_some(ones as u8)
}

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(a: Args) -> Result<Config, ConfigError> {
        let daemon = DaemonConfig::try_from(a.daemon)?;
        if !a.queue_size.is_power_of_two() || a.queue_size < 2 {
            return Err(ConfigError::QueueSize(a.queue_size));
        }
        if a.tap.is_empty() || a.tap.len() > crate::tap::MAX_NAME_LEN {
            return Err(ConfigError::Tap(a.tap));
        }
        let mac = match &a.mac {
            Some(m) => Some(parse_mac(m).ok_or_else(|| ConfigError::Mac(m.clone()))?),
            None => None,
        };
        let ip = match a.ip {
            None => None,
            Some(ip) => {
                let prefix = match &a.netmask {
                    Some(m) => {
                        parse_netmask(m, ip).ok_or_else(|| ConfigError::Netmask(m.clone()))?
                    }
                    None if ip.is_ipv4() => 24,
                    None => 64,
                };
                Some((ip, prefix))
            }
        };
        Ok(Config {
            daemon,
            tap: a.tap,
            bridge: a.bridge,
            create_bridge: a.create_bridge,
            mac,
            mtu: a.mtu,
            queue_pairs: a.queue_pairs,
            queue_size: a.queue_size,
            offloads: Offloads {
                csum: a.csum.on(),
                tso4: a.tso4.on(),
                tso6: a.tso6.on(),
                ufo: a.ufo.on(),
                mrg_rxbuf: a.mrg_rxbuf.on(),
                event_idx: a.event_idx.on(),
            },
            tap_io: a.tap_io,
            poll_us: a.poll_us,
            ip,
        })
    }
}

/// `--print-capabilities` output (QEMU's vhost-user backend conventions).
pub fn capabilities() -> &'static str {
    r#"{"type": "net", "features": []}"#
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Sub {
    /// Send a command to a running daemon's control socket and print the reply.
    #[command(after_help = "Example:\n  vhost-user-net ctl /run/vm0-net-ctl.sock stats")]
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
    /// Link state, negotiated features and per-queue packet, byte, drop and error counters.
    Stats,
    /// Set the link administratively down or up (tap carrier and the guest's link status,
    /// with a config-change notification).
    Link {
        /// up or down.
        #[arg(value_enum)]
        state: LinkState,
    },
}

/// `ctl link` states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LinkState {
    /// Carrier on.
    Up,
    /// Carrier off.
    Down,
}

impl CtlCmd {
    /// The JSON request for this command.
    pub fn request(&self) -> serde_json::Value {
        match self {
            CtlCmd::Stats => serde_json::json!({"cmd": "stats"}),
            CtlCmd::Link { state } => serde_json::json!({
                "cmd": "link",
                "state": if *state == LinkState::Up { "up" } else { "down" },
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs() {
        assert_eq!(
            parse_mac("52:54:00:12:34:aB"),
            Some([0x52, 0x54, 0, 0x12, 0x34, 0xab])
        );
        assert_eq!(parse_mac("01:00:5e:00:00:01"), None, "multicast");
        assert_eq!(parse_mac("52:54:00:12:34"), None);
        assert_eq!(parse_mac("52:54:00:12:34:56:78"), None);
        assert_eq!(parse_mac("5254.0012.3456"), None);
        let r = random_mac();
        assert_eq!(r[0] & 3, 2, "locally administered unicast");
    }

    #[test]
    fn netmasks() {
        let v4: IpAddr = "10.0.0.1".parse().expect("ip");
        let v6: IpAddr = "fd00::1".parse().expect("ip");
        assert_eq!(parse_netmask("255.255.255.0", v4), Some(24));
        assert_eq!(parse_netmask("255.255.0.0", v4), Some(16));
        assert_eq!(parse_netmask("255.0.255.0", v4), None);
        assert_eq!(parse_netmask("20", v4), Some(20));
        assert_eq!(parse_netmask("33", v4), None);
        assert_eq!(parse_netmask("64", v6), Some(64));
        assert_eq!(parse_netmask("ffff:ffff::", v6), Some(32));
        assert_eq!(parse_netmask("255.255.255.0", v6), None);
    }

    #[test]
    fn shared_options_keep_their_names_and_help() {
        use clap::{CommandFactory, Parser};
        let a = Args::try_parse_from([
            "vhost-user-net",
            "--socket-path",
            "/s",
            "--tap",
            "vm0",
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
            Args::try_parse_from(["vhost-user-net", "--tap", "vm0"]).map(Config::try_from),
            Ok(Err(ConfigError::Daemon(_)))
        ));
        let help = Args::command().render_long_help().to_string();
        for s in [
            "Examples:",
            "/run/vm0-net.sock",
            "--fd <FDNUM>",
            "--print-capabilities",
            "ctl ",
        ] {
            assert!(help.contains(s), "--help lacks {s:?}");
        }
    }
}
