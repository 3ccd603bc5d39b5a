//! Command line of `outboard`.

use std::path::PathBuf;

use clap::Parser;
use outboard_common::size::{parse_size_in, SizeError, Unit};

/// Default kernel command line.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 panic=-1";

/// Boot a Linux guest whose disks and NICs are served by vhost-user daemons.
#[derive(Debug, Parser)]
#[command(name = "outboard", version, about)]
pub struct Args {
    /// Kernel: an ELF vmlinux (64-bit entry) or a bzImage.
    #[arg(long)]
    pub kernel: PathBuf,
    /// Initramfs (cpio, optionally compressed).
    #[arg(long)]
    pub initramfs: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub cpus: u8,
    /// Guest RAM: a number with an optional 1024-based suffix b (bytes), K, M, G, T, P or E
    /// (case-insensitive, one letter; plain numbers are MiB, as qemu's -m), e.g. 512M, 2G, 1.5G.
    #[arg(long, default_value = "512M", value_parser = parse_size)]
    pub memory: u64,
    /// Serial console: `stdio`, `file=PATH` or `off`.
    #[arg(long, default_value = "stdio")]
    pub serial: String,
    /// A disk: `socket=PATH` (a running vhost-user-blk backend) or
    /// `path=IMG[,format=raw|qcow2][,readonly=on][,queues=N]` (starts our
    /// vhost-user-blk on a private socket). Repeat for more disks.
    #[arg(long = "disk")]
    pub disks: Vec<String>,
    /// A NIC: `socket=PATH[,mac=MAC][,queues=N]` or
    /// `tap=NAME[,bridge=BR][,mac=MAC][,queues=N]` (starts our vhost-user-net). `queues`:
    /// queue pairs (1 to 16, default 1); with more than one the guest gets a control
    /// queue with multi-queue (VIRTIO_NET_F_MQ) and picks how many it uses (`ethtool -L`).
    /// Repeat for more NICs.
    #[arg(long = "net")]
    pub nets: Vec<String>,
    /// Log level (error, warn, info, debug, trace).
    #[arg(long, default_value = "warn")]
    pub log_level: String,
}

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A malformed `key=value,...` option.
    #[error("--{0} {1}: {2}")]
    BadOption(&'static str, String, String),
}

/// Parses `--memory`: the common size grammar
/// ([`outboard_common::size`], qemu-img's) with plain numbers in MiB, as
/// qemu's `-m`: `512M`, `1G`, `2048` (MiB), `65536K`, `1.5G`.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    parse_size_in(s, Unit::MiB)
}

/// Splits `a=b,c=d` into pairs; a bare word is a key with an empty value.
pub fn split_kv(s: &str) -> Vec<(String, String)> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.trim().to_string(), v.trim().to_string()),
            None => (p.trim().to_string(), String::new()),
        })
        .collect()
}

/// How a disk is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskSpec {
    /// An existing backend socket.
    Socket(PathBuf),
    /// Our vhost-user-blk started for this image.
    Image {
        /// Image path.
        path: PathBuf,
        /// raw or qcow2.
        format: String,
        /// Read-only.
        readonly: bool,
        /// Queues.
        queues: u16,
    },
}

/// How a NIC is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetSpec {
    /// An existing backend socket (and the MAC to give the guest when the
    /// backend does not provide the config space itself).
    Socket {
        /// The backend's socket.
        path: PathBuf,
        /// Guest MAC.
        mac: Option<String>,
        /// Queue pairs.
        pairs: u16,
    },
    /// Our vhost-user-net started on a tap.
    Tap {
        /// Tap name.
        tap: String,
        /// Bridge to attach the tap to.
        bridge: Option<String>,
        /// Guest MAC.
        mac: Option<String>,
        /// Queue pairs.
        pairs: u16,
    },
}

fn on(v: &str) -> bool {
    matches!(v, "" | "on" | "true" | "yes" | "1")
}

/// Parses one `--disk` value.
pub fn parse_disk(s: &str) -> Result<DiskSpec, Error> {
    let bad = |m: &str| Error::BadOption("disk", s.to_string(), m.to_string());
    let kv = split_kv(s);
    let get = |k: &str| kv.iter().find(|(a, _)| a == k).map(|(_, v)| v.clone());
    for (k, _) in &kv {
        if !["socket", "path", "format", "readonly", "queues"].contains(&k.as_str()) {
            return Err(bad(&format!("unknown key {k:?}")));
        }
    }
    match (get("socket"), get("path")) {
        (Some(sock), None) => Ok(DiskSpec::Socket(sock.into())),
        (None, Some(path)) => {
            let format = get("format").unwrap_or_else(|| "raw".into());
            if format != "raw" && format != "qcow2" {
                return Err(bad("format must be raw or qcow2"));
            }
            let queues = match get("queues") {
                Some(q) => q
                    .parse::<u16>()
                    .ok()
                    .filter(|q| (1..=64).contains(q))
                    .ok_or_else(|| bad("queues must be 1..=64"))?,
                None => 1,
            };
            Ok(DiskSpec::Image {
                path: path.into(),
                format,
                readonly: get("readonly").is_some_and(|v| on(&v)),
                queues,
            })
        }
        _ => Err(bad("give exactly one of socket= or path=")),
    }
}

/// Parses a MAC address `52:54:00:12:34:56`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<_> = s.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut m = [0u8; 6];
    for (b, p) in m.iter_mut().zip(parts) {
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    Some(m)
}

/// Parses one `--net` value.
pub fn parse_net(s: &str) -> Result<NetSpec, Error> {
    let bad = |m: &str| Error::BadOption("net", s.to_string(), m.to_string());
    let kv = split_kv(s);
    let get = |k: &str| kv.iter().find(|(a, _)| a == k).map(|(_, v)| v.clone());
    for (k, _) in &kv {
        if !["socket", "tap", "bridge", "mac", "queues"].contains(&k.as_str()) {
            return Err(bad(&format!("unknown key {k:?}")));
        }
    }
    if let Some(m) = get("mac") {
        if parse_mac(&m).is_none() {
            return Err(bad("mac must look like 52:54:00:12:34:56"));
        }
    }
    let pairs = match get("queues") {
        None => 1,
        Some(v) => v
            .parse::<u16>()
            .ok()
            .filter(|n| (1..=16).contains(n))
            .ok_or_else(|| bad("queues must be 1..=16 (queue pairs)"))?,
    };
    match (get("socket"), get("tap")) {
        (Some(sock), None) => Ok(NetSpec::Socket {
            path: sock.into(),
            mac: get("mac"),
            pairs,
        }),
        (None, Some(tap)) => Ok(NetSpec::Tap {
            tap,
            bridge: get("bridge"),
            mac: get("mac"),
            pairs,
        }),
        _ => Err(bad("give exactly one of socket= or tap=")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("256"), Ok(256 << 20));
        assert!(parse_size("12X").is_err());
        assert!(parse_size("M").is_err());
    }

    #[test]
    fn disks() {
        assert_eq!(
            parse_disk("socket=/tmp/a").ok(),
            Some(DiskSpec::Socket("/tmp/a".into()))
        );
        assert_eq!(
            parse_disk("path=d.qcow2,format=qcow2,readonly=on,queues=2").ok(),
            Some(DiskSpec::Image {
                path: "d.qcow2".into(),
                format: "qcow2".into(),
                readonly: true,
                queues: 2
            })
        );
        assert!(parse_disk("path=a,socket=b").is_err());
        assert!(parse_disk("path=a,format=vmdk").is_err());
        assert!(parse_disk("path=a,bogus=1").is_err());
    }

    #[test]
    fn nets() {
        assert_eq!(
            parse_net("tap=tap0,bridge=br0,mac=52:54:00:00:00:01").ok(),
            Some(NetSpec::Tap {
                tap: "tap0".into(),
                bridge: Some("br0".into()),
                mac: Some("52:54:00:00:00:01".into()),
                pairs: 1,
            })
        );
        assert!(parse_net("bridge=br0").is_err());
        assert!(parse_net("tap=t0,mac=52:54:00").is_err());
        assert!(parse_net("tap=t0,queues=0").is_err());
        assert!(parse_net("tap=t0,queues=17").is_err());
        assert_eq!(
            parse_net("socket=/s,mac=52:54:00:00:00:0a,queues=2").ok(),
            Some(NetSpec::Socket {
                path: "/s".into(),
                mac: Some("52:54:00:00:00:0a".into()),
                pairs: 2,
            })
        );
        assert_eq!(
            parse_mac("52:54:00:ab:cd:ef"),
            Some([0x52, 0x54, 0, 0xab, 0xcd, 0xef])
        );
    }
}
