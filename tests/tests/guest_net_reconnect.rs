//! Reconnect with a real guest: QEMU (TCG) on our `vhost-user-net` daemon
//! with `-chardev socket,...,reconnect=1`; the tap sits on a bridge in
//! namespace A with a veth to namespace B. While the guest pings B once a
//! second, the test SIGKILLs the daemon three times and restarts it with
//! the same arguments (no `--mac`). After each restart:
//!
//! - the tap is the same interface (same ifindex and MAC: persistent, not
//!   recreated), still on the bridge, and tagged with the same guest MAC;
//! - QEMU reconnects and the pings resume: the last pings of the stream
//!   are answered, and a 4 MiB download from B afterwards arrives intact
//!   (SHA-256).

use std::io::Write;
use std::net::TcpListener;
use std::time::{Duration, Instant};

use outboard_tests::guest::{GuestImage, NetNic, Qemu};
use outboard_tests::netd::NetDaemon;
use outboard_tests::netns::Netns;

const GUEST_MAC: &str = "52:54:00:12:34:57";
const PINGS: usize = 45;
const KILLS: usize = 3;

/// Ping B once a second (each ping on its own, so a failing one does not
/// end the stream), then download a file.
fn script() -> String {
    format!(
        "set -e
ip link set eth0 up
ip addr add 10.202.0.1/24 dev eth0
n=0
until ping -c 1 -W 1 10.202.0.2 >/dev/null 2>&1; do n=$((n+1)); [ $n -lt 30 ]; done
echo NET-READY
for i in $(seq 1 {PINGS}); do
  if ping -c 1 -W 1 10.202.0.2 >/dev/null 2>&1; then echo PONG $i; sleep 1; else echo LOST $i; fi
done
nc 10.202.0.2 5002 >/tmp/down
echo DOWN=$(sha256sum /tmp/down)
"
    )
}

/// (ifindex, MAC, master, alias) of the tap.
fn tap_state(a: &Netns) -> (u64, String, String, String) {
    let out = a.exec(&["ip", "-j", "-d", "link", "show", "dev", "obtap0"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("ip -j");
    let l = &v[0];
    let s = |k: &str| l[k].as_str().unwrap_or_default().to_string();
    (
        l["ifindex"].as_u64().expect("ifindex"),
        s("address"),
        s("master"),
        s("ifalias"),
    )
}

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

#[test]
fn pings_resume_after_the_daemon_is_killed_and_restarted() {
    let image = GuestImage::ensure().unwrap_or_else(|e| panic!("{e}"));
    let a = Netns::new("gra");
    let b = Netns::new("grb");
    a.veth("va", &b, "vb");
    b.ip(&["addr", "add", "10.202.0.2/24", "dev", "vb"]);
    let mut daemon = NetDaemon::spawn(
        &a,
        &["--tap", "obtap0", "--bridge", "obbr0", "--create-bridge"],
    );
    a.ip(&["link", "set", "va", "master", "obbr0"]);
    let before = tap_state(&a);
    assert_eq!(before.2, "obbr0");
    assert!(
        before.3.starts_with("outboard-vhost-user-net mac="),
        "{before:?}"
    );
    let down_l = b.run(|| TcpListener::bind("10.202.0.2:5002").expect("bind 5002"));
    let sent: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let to_send = sent.clone();
    let download = std::thread::spawn(move || {
        let (mut c, _) = down_l.accept().expect("download connection");
        c.write_all(&to_send).expect("send the download");
    });
    // QEMU 7.2 under TCG needs the NIC on INTx (see guest_net.rs).
    let mut nic = NetNic::new(&daemon.socket, GUEST_MAC);
    nic.device_props.push("vectors=0".into());
    nic.reconnect_secs = Some(1);
    let mut guest = Qemu::new(&image)
        .nic(nic)
        .spawn(&script())
        .unwrap_or_else(|e| panic!("{e}"));
    guest
        .wait_for_output("NET-READY", Duration::from_secs(180))
        .unwrap_or_else(|e| panic!("{e}\n--- daemon ---\n{}", daemon.log_text()));
    let t0 = Instant::now();
    for k in 0..KILLS {
        std::thread::sleep(Duration::from_secs(if k == 0 { 3 } else { 7 }));
        daemon.crash_and_restart();
        let after = tap_state(&a);
        assert_eq!(after, before, "tap survived restart {k} unchanged");
        // QEMU reconnects within a second or two and restarts the queues.
        let deadline = Instant::now() + Duration::from_secs(20);
        while daemon.stats()["link_up"] != true {
            assert!(
                Instant::now() < deadline,
                "QEMU did not restart the queues after restart {k}\n--- serial ---\n{}\n\
                 --- QEMU ---\n{}\n--- daemon ---\n{}",
                guest.serial(),
                std::fs::read_to_string(guest.run_dir().join("qemu.stderr")).unwrap_or_default(),
                daemon.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("restart {k}: link up again at {:?}", t0.elapsed());
    }
    let run = guest
        .wait(Duration::from_secs(180))
        .and_then(|r| r.check())
        .unwrap_or_else(|e| panic!("{e}\n--- daemon ---\n{}", daemon.log_text()));
    download.join().expect("download thread");
    let out = &run.output;
    let pongs: Vec<usize> = out
        .lines()
        .filter_map(|l| l.strip_prefix("PONG "))
        .filter_map(|n| n.trim().parse().ok())
        .collect();
    let lost = out.lines().filter(|l| l.starts_with("LOST ")).count();
    eprintln!("{} pongs, {lost} lost of {PINGS}", pongs.len());
    // The stream resumed after the last restart: its tail is answered.
    for i in PINGS - 5..=PINGS {
        assert!(pongs.contains(&i), "ping {i} unanswered:\n{out}");
    }
    assert!(
        pongs.len() >= PINGS / 2,
        "{} of {PINGS} answered:\n{out}",
        pongs.len()
    );
    let down = out
        .lines()
        .find_map(|l| l.strip_prefix("DOWN="))
        .and_then(|v| v.split_whitespace().next())
        .unwrap_or_else(|| panic!("no DOWN= in the guest output:\n{out}"));
    assert_eq!(down, sha256(&sent), "download after the restarts");
    assert!(daemon.is_running(), "daemon died:\n{}", daemon.log_text());
    let mac_line = format!(
        "for guest MAC {}",
        before.3.trim_start_matches("outboard-vhost-user-net mac=")
    );
    assert_eq!(
        daemon.log_text().matches(&mac_line).count(),
        KILLS + 1,
        "every instance kept the guest MAC ({mac_line})"
    );
}
