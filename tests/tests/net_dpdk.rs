//! DPDK's `dpdk-testpmd` (virtio-user PMD, no hugepages) as the vhost-user
//! frontend of our daemon, whose tap sits on a bridge in namespace A with a
//! veth to namespace B:
//!
//! - echo: datagrams from a UDP socket in B go through bridge, tap and
//!   daemon to testpmd, which swaps addresses and ports (5tswap) and sends
//!   them back; every echo must come back to the socket byte for byte.
//! - txonly (a second testpmd on the same daemon, which listened again):
//!   testpmd floods 64-byte UDP frames at B; the kernel socket in B must
//!   receive them and the counters must agree.
//!
//! The daemon runs as it would in production: seccomp filter on (in `kill`
//! mode here, so a system call missing from the list fails the test),
//! `--user nobody` with no capability left and `--socket-mode 0660`.
//! Queue pair 1 is attached to the tap (TUNSETQUEUE) only when testpmd
//! starts it, i.e. by the unprivileged, filtered daemon.

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use outboard_tests::netd::NetDaemon;
use outboard_tests::netns::Netns;
use outboard_tests::testpmd::{virtio_user, virtio_user_mq, Testpmd, PMD_MAC};

struct Setup {
    daemon: NetDaemon,
    b: Netns,
    a: Netns,
}

fn setup() -> Setup {
    let a = Netns::new("dpdka");
    let b = Netns::new("dpdkb");
    a.veth("va", &b, "vb");
    b.ip(&["addr", "add", "198.18.0.2/24", "dev", "vb"]);
    b.ip(&[
        "neigh",
        "replace",
        "198.18.0.1",
        "lladdr",
        PMD_MAC,
        "dev",
        "vb",
    ]);
    let daemon = NetDaemon::spawn(
        &a,
        &[
            "--tap",
            "obtap0",
            "--bridge",
            "obbr0",
            "--create-bridge",
            "--queue-pairs",
            "2",
            "--seccomp",
            "kill",
            "--user",
            "nobody",
            "--socket-mode",
            "0660",
        ],
    );
    a.ip(&["link", "set", "va", "master", "obbr0"]);
    sandboxed(&daemon);
    Setup { daemon, b, a }
}

/// The daemon dropped root and every capability, has the filter on and
/// set its socket's mode.
fn sandboxed(d: &NetDaemon) {
    use std::os::unix::fs::PermissionsExt;
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.status_field("Seccomp:").as_deref() != Some("2") {
        assert!(
            Instant::now() < deadline,
            "no seccomp filter: {:?}\n{}",
            d.status_field("Seccomp:"),
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let uid = d.status_field("Uid:").unwrap_or_default();
    assert!(
        uid.split_whitespace().all(|u| u == "65534"),
        "real, effective, saved and fs uid are nobody's: {uid}"
    );
    for caps in ["CapEff:", "CapPrm:"] {
        assert_eq!(
            d.status_field(caps).as_deref(),
            Some("0000000000000000"),
            "{caps}"
        );
    }
    let mode = std::fs::metadata(&d.socket)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o660, "socket mode {mode:o}");
}

/// Waits until testpmd drives the daemon's queues (tap up).
fn wait_started(pmd: &Testpmd, daemon: &NetDaemon) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while daemon.stats()["link_up"] != true {
        assert!(
            Instant::now() < deadline,
            "testpmd did not start the queues\n--- testpmd ---\n{}\n--- daemon ---\n{}",
            pmd.log_text(),
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One test, two phases in turn: two busy-polling testpmd instances at once
/// would starve each other on a small machine.
#[test]
fn testpmd_through_the_daemon() {
    let s = setup();
    echo_phase(&s);
    // The same daemon serves the next frontend: its tap went down and comes
    // up again.
    s.daemon.wait_link(false, Duration::from_secs(10));
    txonly_phase(&s);
    // The `ctl` client prints the same counters.
    let out = std::process::Command::new(outboard_tests::workspace_binary("vhost-user-net"))
        .arg("ctl")
        .arg(&s.daemon.control)
        .arg("stats")
        .output()
        .expect("vhost-user-net ctl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["tap"], "obtap0");
    assert_eq!(v["queues"].as_array().map(Vec::len), Some(4));
    let tx: u64 = v["queues"][1]["packets"].as_u64().expect("packets");
    assert!(tx >= 1000, "{v}");
    // `ctl link down|up` through the client; testpmd is gone, so nobody is
    // notified, and the state shows in the counters' reply.
    let ctl = |args: &[&str]| -> serde_json::Value {
        let out = std::process::Command::new(outboard_tests::workspace_binary("vhost-user-net"))
            .arg("ctl")
            .arg(&s.daemon.control)
            .args(args)
            .output()
            .expect("vhost-user-net ctl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("JSON")
    };
    let down = ctl(&["link", "down"]);
    assert_eq!(down["ok"], true, "{down}");
    assert_eq!(down["notified"], false, "{down}");
    assert_eq!(ctl(&["stats"])["admin_up"], false);
    assert_eq!(ctl(&["link", "up"])["link"], "up");
    assert_eq!(ctl(&["stats"])["admin_up"], true);
    // SIGTERM: exit 0 and the socket is gone.
    let mut s = s;
    let socket = s.daemon.socket.clone();
    assert!(s.daemon.terminate().success());
    assert!(!socket.exists(), "socket removed on SIGTERM");
    // The tap it created was persistent while it served (to survive a
    // crash); a clean exit removes it.
    let gone = std::process::Command::new("ip")
        .args(["-n", s.a.name(), "link", "show", "obtap0"])
        .output()
        .expect("ip");
    assert!(!gone.status.success(), "tap removed on SIGTERM");
}

fn echo_phase(s: &Setup) {
    // Both queue pairs: testpmd spreads nothing itself, the tap hashes the
    // 200 flows (one source port each) over the two queues.
    let pmd = Testpmd::start(
        &virtio_user_mq(&s.daemon.socket, 2),
        &["--forward-mode=5tswap", "--rxq=2", "--txq=2"],
        None,
    );
    wait_started(&pmd, &s.daemon);
    let sock = s.b.run(|| {
        let u = UdpSocket::bind("198.18.0.2:7002").expect("bind in B");
        u.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        u
    });
    let mut buf = vec![0u8; 2048];
    // testpmd starts forwarding a little after it starts the queues: warm up.
    let deadline = Instant::now() + Duration::from_secs(15);
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    loop {
        sock.send_to(b"warm-up", "198.18.0.1:7").expect("send");
        if let Ok((7, _)) = sock.recv_from(&mut buf) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no echo from testpmd\n--- testpmd ---\n{}\n--- daemon ---\n{}\n{}",
            pmd.log_text(),
            s.daemon.log_text(),
            s.daemon.stats()
        );
    }
    // Late echoes of the warm-up are not counted below.
    while sock.recv_from(&mut buf).is_ok() {}
    sock.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    // Eight flows (source ports): the tap spreads them over both pairs.
    let socks: Vec<UdpSocket> = (0..8u16)
        .map(|k| {
            s.b.run(move || {
                let u = UdpSocket::bind(("198.18.0.2", 7010 + k)).expect("bind in B");
                u.set_read_timeout(Some(Duration::from_secs(2)))
                    .expect("timeout");
                u
            })
        })
        .collect();
    let rounds = 200usize;
    for i in 0..rounds {
        let len = 18 + (i * 37) % 1455;
        let msg: Vec<u8> = (0..len).map(|k| (k * 31 + i) as u8).collect();
        let sock = &socks[i % socks.len()];
        sock.send_to(&msg, "198.18.0.1:7").expect("send");
        let (n, from) = sock.recv_from(&mut buf).unwrap_or_else(|e| {
            panic!(
                "echo {i} ({len} bytes) did not come back: {e}\n--- testpmd ---\n{}\n--- daemon ---\n{}",
                pmd.log_text(),
                s.daemon.log_text()
            )
        });
        assert_eq!(from.to_string(), "198.18.0.1:7", "echo {i} source");
        assert_eq!(&buf[..n], &msg[..], "echo {i} bytes");
    }
    let stats = s.daemon.stats();
    let per_queue: Vec<u64> = stats["queues"]
        .as_array()
        .expect("queues")
        .iter()
        .map(|q| q["packets"].as_u64().expect("packets"))
        .collect();
    assert!(
        per_queue[0] > 0 && per_queue[2] > 0,
        "both RX queues carried echoes: {per_queue:?}"
    );
    let rx = s.daemon.counter("rx", "packets");
    let tx = s.daemon.counter("tx", "packets");
    assert!(
        rx >= rounds as u64 && tx >= rounds as u64,
        "daemon counters rx {rx} tx {tx}"
    );
    let (pmd_rx, pmd_tx) = pmd.stop();
    assert!(
        pmd_rx >= rounds as u64 && pmd_tx >= rounds as u64,
        "testpmd rx {pmd_rx} tx {pmd_tx}"
    );
    assert_eq!(
        s.daemon.counter("rx", "errors") + s.daemon.counter("tx", "errors"),
        0
    );
}

fn txonly_phase(s: &Setup) {
    let tx_before = s.daemon.counter("tx", "packets");
    let peer = s.b.mac("vb");
    let peer = peer.map(|b| format!("{b:02x}")).join(":");
    // testpmd's txonly frames are UDP 198.18.0.1:9 -> 198.18.0.2:9.
    let sock = s.b.run(|| {
        let u = UdpSocket::bind("198.18.0.2:9").expect("bind in B");
        u.set_read_timeout(Some(Duration::from_millis(500)))
            .expect("timeout");
        u
    });
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let counter = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        let (mut n, mut bad) = (0u64, 0u64);
        loop {
            match sock.recv_from(&mut buf) {
                Ok((len, from)) if len == 22 && from.to_string() == "198.18.0.1:9" => n += 1,
                Ok(_) => bad += 1,
                Err(_) if stop2.load(std::sync::atomic::Ordering::Relaxed) => break,
                Err(_) => {}
            }
        }
        (n, bad)
    });
    let pmd = Testpmd::start(
        &virtio_user(&s.daemon.socket),
        &[
            "--forward-mode=txonly",
            "--txpkts=64",
            &format!("--eth-peer=0,{peer}"),
        ],
        None,
    );
    wait_started(&pmd, &s.daemon);
    std::thread::sleep(Duration::from_secs(2));
    let (_, pmd_tx) = pmd.stop();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (received, bad) = counter.join().expect("counter thread");
    let daemon_tx = s.daemon.counter("tx", "packets") - tx_before;
    eprintln!("testpmd sent {pmd_tx}, daemon wrote {daemon_tx} to the tap, socket got {received}");
    assert_eq!(bad, 0, "unexpected datagrams");
    assert!(
        received >= 1000,
        "only {received} datagrams reached the socket"
    );
    assert!(
        daemon_tx >= received,
        "daemon {daemon_tx} < socket {received}"
    );
    assert!(pmd_tx >= daemon_tx, "testpmd {pmd_tx} < daemon {daemon_tx}");
    assert_eq!(s.daemon.counter("tx", "errors"), 0);
}
