//! `net-bench`: packets per second and Gbit/s through `vhost-user-net`
//! against the native tap path, measured in the same run.
//!
//! Namespace A holds a bridge with a veth to namespace B. `dpdk-testpmd`
//! (two lcores, no hugepages) is the traffic endpoint on A's side, either
//! through our daemon (`net_virtio_user` → daemon → tap on the bridge) or
//! directly on a tap (`net_tap`, the native baseline) on the same bridge:
//! - tx: testpmd `txonly` frames of SIZE bytes to B; counted by B's veth.
//! - rx: a UDP flood from a socket in B to testpmd `rxonly`; counted by testpmd.
//!
//! ```sh
//! cargo build --release -p vhost-user-net
//! cargo run --release -p outboard-tests --bin net-bench -- --secs 5 --sizes 64,1500
//! ```
//! Needs root, `ip` and `dpdk-testpmd`.

use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outboard_tests::netd::NetDaemon;
use outboard_tests::netns::Netns;
use outboard_tests::testpmd::{tap, virtio_user, Testpmd, PMD_MAC};

struct Opts {
    secs: u64,
    sizes: Vec<usize>,
}

fn opts() -> Opts {
    let mut o = Opts {
        secs: 5,
        sizes: vec![64, 1500],
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v = args.next().unwrap_or_default();
        match a.as_str() {
            "--secs" => o.secs = v.parse().unwrap_or(5),
            "--sizes" => o.sizes = v.split(',').filter_map(|s| s.parse().ok()).collect(),
            _ => {
                eprintln!("usage: net-bench [--secs N] [--sizes 64,1500]");
                std::process::exit(2);
            }
        }
    }
    o
}

fn rx_packets(b: &Netns) -> u64 {
    b.exec(&["cat", "/sys/class/net/vb/statistics/rx_packets"])
        .trim()
        .parse()
        .unwrap_or(0)
}

#[derive(Clone, Copy)]
enum Path {
    Daemon,
    Tap,
}

struct Rig {
    a: Netns,
    b: Netns,
    daemon: NetDaemon,
    peer: String,
}

impl Rig {
    fn start(&self, path: Path, mode: &[&str]) -> Testpmd {
        match path {
            Path::Daemon => {
                let t = Testpmd::start(&virtio_user(&self.daemon.socket), mode, None);
                let deadline = Instant::now() + Duration::from_secs(30);
                while self.daemon.stats()["link_up"] != true {
                    assert!(
                        Instant::now() < deadline,
                        "testpmd did not start:\n{}",
                        t.log_text()
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
                t
            }
            Path::Tap => {
                let t = Testpmd::start(&tap("obpmd0"), mode, Some(&self.a));
                let deadline = Instant::now() + Duration::from_secs(30);
                // Its port is started (it sets the tap's MAC until then).
                while !t.log_text().contains("Checking link statuses...\nDone") {
                    assert!(
                        Instant::now() < deadline,
                        "testpmd did not start:\n{}",
                        t.log_text()
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
                loop {
                    let ok = self
                        .a
                        .command("ip")
                        // net_tap gives the kernel side the port's MAC, which
                        // would make the bridge deliver our frames locally.
                        .args(["link", "set", "obpmd0", "address", "02:00:00:00:00:99"])
                        .output()
                        .map(|o| o.status.success())
                        .unwrap_or(false)
                        && self
                            .a
                            .command("ip")
                            .args(["link", "set", "obpmd0", "master", "obbr0", "up"])
                            .output()
                            .map(|o| o.status.success())
                            .unwrap_or(false);
                    if ok {
                        break;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "no tap from testpmd:\n{}",
                        t.log_text()
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
                t
            }
        }
    }

    /// testpmd txonly → B: frames per second counted by B's veth.
    fn tx(&self, path: Path, size: usize, secs: u64) -> f64 {
        let pkts = format!("--txpkts={size}");
        let peer = format!("--eth-peer=0,{}", self.peer);
        let t = self.start(path, &["--forward-mode=txonly", &pkts, &peer]);
        std::thread::sleep(Duration::from_secs(1));
        let (c0, t0) = (rx_packets(&self.b), Instant::now());
        std::thread::sleep(Duration::from_secs(secs));
        let (c1, t1) = (rx_packets(&self.b), Instant::now());
        t.stop();
        (c1 - c0) as f64 / (t1 - t0).as_secs_f64()
    }

    /// UDP flood from B → testpmd rxonly: frames per second testpmd received.
    fn rx(&self, path: Path, size: usize, secs: u64) -> f64 {
        let t = self.start(path, &["--forward-mode=rxonly"]);
        std::thread::sleep(Duration::from_millis(500));
        let stop = Arc::new(AtomicBool::new(false));
        let payload = vec![0x5au8; size.saturating_sub(42).max(1)];
        let senders: Vec<_> = (0..1)
            .map(|_| {
                let stop = stop.clone();
                let payload = payload.clone();
                let sock = self
                    .b
                    .run(|| UdpSocket::bind("198.18.0.2:0").expect("bind"));
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let _ = sock.send_to(&payload, "198.18.0.1:9");
                    }
                })
            })
            .collect();
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_secs(secs));
        stop.store(true, Ordering::Relaxed);
        let elapsed = t0.elapsed();
        for s in senders {
            let _ = s.join();
        }
        let (rx, _) = t.stop();
        rx as f64 / elapsed.as_secs_f64()
    }
}

fn main() {
    let o = opts();
    let a = Netns::new("bencha");
    let b = Netns::new("benchb");
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
    // The daemon built next to this binary (target/release/vhost-user-net).
    let bin = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("vhost-user-net")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| {
            eprintln!("net-bench: build the daemon first: cargo build --release -p vhost-user-net");
            std::process::exit(2)
        });
    let daemon = NetDaemon::spawn_bin(
        &bin,
        &a,
        &["--tap", "obtap0", "--bridge", "obbr0", "--create-bridge"],
    );
    a.ip(&["link", "set", "va", "master", "obbr0"]);
    // A hub: the testpmd MAC moves between the two paths.
    a.ip(&["link", "set", "obbr0", "type", "bridge", "ageing_time", "0"]);
    // No bridge netfilter in A (if loaded), and a sink socket in B that
    // never reads: frames cost the same on both paths, without ICMP replies.
    let _ = a
        .command("sysctl")
        .args(["-qw", "net.bridge.bridge-nf-call-iptables=0"])
        .output();
    let _sink = b.run(|| UdpSocket::bind("198.18.0.2:9").expect("sink"));
    let peer = b.mac("vb").map(|x| format!("{x:02x}")).join(":");
    let rig = Rig { a, b, daemon, peer };
    println!(
        "| size | direction | daemon pps | tap pps | daemon/tap | daemon Gbit/s | tap Gbit/s |"
    );
    println!("|---|---|---|---|---|---|---|");
    for &size in &o.sizes {
        for dir in ["tx", "rx"] {
            let mut r = [0f64; 2];
            for (i, path) in [Path::Daemon, Path::Tap].into_iter().enumerate() {
                r[i] = if dir == "tx" {
                    rig.tx(path, size, o.secs)
                } else {
                    rig.rx(path, size, o.secs)
                };
            }
            let gbps = |pps: f64| pps * size as f64 * 8.0 / 1e9;
            println!(
                "| {size} | {dir} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} |",
                r[0],
                r[1],
                r[0] / r[1].max(1.0),
                gbps(r[0]),
                gbps(r[1])
            );
        }
    }
}
