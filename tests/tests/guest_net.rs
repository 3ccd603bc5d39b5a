//! A real Linux guest (QEMU, TCG) on our `vhost-user-net` daemon: the tap
//! sits on a bridge in namespace A with a veth to namespace B. The guest
//! pings B, uploads a 4 MiB file to a TCP socket in B and downloads another
//! one from B (SHA-256 checked on both sides), once with every offload on
//! (checksum, TSO, UFO, mergeable buffers, event index) and once with all
//! of them off.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::Duration;

use outboard_tests::guest::{GuestImage, NetNic, Qemu};
use outboard_tests::netd::NetDaemon;
use outboard_tests::netns::Netns;

const GUEST_MAC: &str = "52:54:00:12:34:56";
const FILE_LEN: usize = 4 << 20;

fn sha256(data: &[u8]) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("f");
    std::fs::write(&p, data).expect("write");
    let out = std::process::Command::new("sha256sum")
        .arg(&p)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

fn host_file() -> Vec<u8> {
    let mut x = 0x1234_5678_9abc_def0u64;
    (0..FILE_LEN)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The guest's script: address, ping, upload, download.
const SCRIPT: &str = "set -e
ip link set eth0 up
ip addr add 10.202.0.1/24 dev eth0
for f in /sys/bus/virtio/devices/*/features; do echo FEATURES=$(cat $f); done
ping -c 3 -W 5 10.202.0.2
dd if=/dev/urandom of=/tmp/up bs=64k count=64 2>/dev/null
echo UP=$(sha256sum /tmp/up)
nc 10.202.0.2 5001 </tmp/up
nc 10.202.0.2 5002 >/tmp/down
echo DOWN=$(sha256sum /tmp/down)
";

fn field<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .unwrap_or_else(|| panic!("no {key} in the guest output:\n{out}"))
}

fn run(offloads: bool) {
    let image = GuestImage::ensure().unwrap_or_else(|e| panic!("{e}"));
    let a = Netns::new("gna");
    let b = Netns::new("gnb");
    a.veth("va", &b, "vb");
    b.ip(&["addr", "add", "10.202.0.2/24", "dev", "vb"]);
    let mut args = vec![
        "--tap",
        "obtap0",
        "--bridge",
        "obbr0",
        "--create-bridge",
        "--mac",
        GUEST_MAC,
    ];
    if !offloads {
        args.extend(["--csum", "off", "--mrg-rxbuf", "off", "--event-idx", "off"]);
    }
    let mut daemon = NetDaemon::spawn(&a, &args);
    a.ip(&["link", "set", "va", "master", "obbr0"]);
    let (up_l, down_l) = b.run(|| {
        (
            TcpListener::bind("10.202.0.2:5001").expect("bind 5001"),
            TcpListener::bind("10.202.0.2:5002").expect("bind 5002"),
        )
    });
    let upload = std::thread::spawn(move || {
        let (mut c, _) = up_l.accept().expect("upload connection");
        let mut buf = vec![0u8; FILE_LEN];
        c.read_exact(&mut buf).expect("read the upload");
        buf
    });
    let sent = host_file();
    let to_send = sent.clone();
    let download = std::thread::spawn(move || {
        let (mut c, _) = down_l.accept().expect("download connection");
        c.write_all(&to_send).expect("send the download");
    });
    // QEMU 7.2 (Debian 12) segfaults in vhost_net_start, unmasking MSI-X
    // vectors, for any vhost-user-net backend (DPDK's vhost PMD too) under
    // TCG: the NIC uses INTx instead.
    let mut nic = NetNic::new(&daemon.socket, GUEST_MAC);
    nic.device_props.push("vectors=0".into());
    let run = Qemu::new(&image)
        .nic(nic)
        .run(SCRIPT, Duration::from_secs(240))
        .and_then(|r| r.check())
        .unwrap_or_else(|e| panic!("{e}\n--- daemon ---\n{}", daemon.log_text()));
    let out = &run.output;
    let got = upload.join().expect("upload thread");
    download.join().expect("download thread");
    assert_eq!(field(out, "UP="), sha256(&got), "upload checksum");
    assert_eq!(field(out, "DOWN="), sha256(&sent), "download checksum");
    assert!(out.contains("3 packets transmitted"), "{out}");
    // The guest's virtio feature bits (bit 0 first): CSUM, MRG_RXBUF, EVENT_IDX.
    let features = field(out, "FEATURES=");
    let bit = |n: usize| features.as_bytes().get(n) == Some(&b'1');
    for (n, name) in [
        (0, "CSUM"),
        (1, "GUEST_CSUM"),
        (11, "HOST_TSO4"),
        (15, "MRG_RXBUF"),
        (29, "EVENT_IDX"),
    ] {
        assert_eq!(
            bit(n),
            offloads,
            "{name} in the guest's features {features}"
        );
    }
    assert!(daemon.is_running(), "daemon died:\n{}", daemon.log_text());
    // The guest is gone: the tap is down again and the daemon listens.
    daemon.wait_link(false, Duration::from_secs(10));
    assert!(daemon.counter("tx", "packets") > 100);
    assert!(daemon.counter("rx", "packets") > 100);
    eprintln!(
        "offloads {}: boot {:?}, total {:?}",
        if offloads { "on" } else { "off" },
        run.boot_to_marker,
        run.total
    );
}

#[test]
fn guest_pings_and_moves_files_with_offloads() {
    run(true);
}

#[test]
fn guest_pings_and_moves_files_without_offloads() {
    run(false);
}
