//! `net-bench`: packets per second and Gbit/s through `vhost-user-net`
//! against baselines measured in the same run, in interleaved rounds.
//!
//! - tx: `dpdk-testpmd` txonly through the daemon into a tap alone in a
//!   namespace (frames counted by the tap: `rx_packets`), for each
//!   `--tap-io` mode (uring, sync), against one thread writing ready-made
//!   frames to such a tap with one `write()` per frame (the same tap
//!   flags and 12-byte virtio-net header as the daemon's).
//! - rx and txbr: the bridged rig below (daemon vs testpmd's `net_tap`).
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
//! Needs root, `ip` and `dpdk-testpmd`. `--plot FILE.svg` also draws the results
//! (`outboard_tests::plot`: median bars with the range across rounds).

use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outboard_tests::netd::NetDaemon;
use outboard_tests::netns::Netns;
use outboard_tests::testpmd::{tap, virtio_user, Testpmd, PMD_MAC};

/// A measured cell: frame size and direction.
type Cell = (usize, String);

struct Opts {
    secs: u64,
    sizes: Vec<usize>,
    rounds: usize,
    dirs: Vec<String>,
    pin: Option<usize>,
    plot: Option<std::path::PathBuf>,
}

fn opts() -> Opts {
    let mut o = Opts {
        secs: 5,
        sizes: vec![64, 1500],
        rounds: 3,
        dirs: vec!["tx".into(), "rx".into()],
        pin: None,
        plot: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v = args.next().unwrap_or_default();
        match a.as_str() {
            "--secs" => o.secs = v.parse().unwrap_or(5),
            "--sizes" => o.sizes = v.split(',').filter_map(|s| s.parse().ok()).collect(),
            "--rounds" => o.rounds = v.parse().unwrap_or(3),
            "--dirs" => o.dirs = v.split(',').map(String::from).collect(),
            "--pin" => o.pin = v.parse().ok(),
            "--plot" => o.plot = Some(v.into()),
            _ => {
                eprintln!(
                    "usage: net-bench [--secs N] [--sizes 64,1500] [--rounds 3] [--dirs tx,rx,txbr] [--pin CPU] [--plot FILE.svg]"
                );
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

/// CPU time (user + system) of process `pid` so far, in nanoseconds.
fn process_cpu_ns(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command (which may contain spaces): state is field 3.
    let rest = stat.rsplit(')').next().unwrap_or_default();
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // utime and stime are fields 14 and 15 (indexes 11 and 12 after ')').
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    (f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)) * 1_000_000_000 / hz
}

/// CPU time of the calling thread, in nanoseconds.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A rate and the CPU time per frame of the path's own threads.
#[derive(Clone, Copy)]
struct Meas {
    pps: f64,
    /// Nanoseconds of CPU per frame (daemon process, or the write loop's
    /// thread); `None` where the work runs inside testpmd.
    cpu: Option<f64>,
}

fn tap_rx_packets(ns: &Netns, tap: &str) -> u64 {
    ns.exec(&[
        "cat",
        &format!("/sys/class/net/{tap}/statistics/rx_packets"),
    ])
    .trim()
    .parse()
    .unwrap_or(0)
}

#[derive(Clone, Copy)]
enum Path<'a> {
    Daemon(&'a NetDaemon),
    Tap,
}

struct Rig {
    a: Netns,
    b: Netns,
    peer: String,
}

/// A frame of `size` bytes (Ethernet, IPv4, UDP) to a MAC nobody has,
/// behind a zeroed 12-byte virtio-net header.
fn ready_frame(size: usize) -> Vec<u8> {
    let mut f = vec![0u8; 12];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x77, 0x02, 0, 0, 0, 0, 0x01, 0x08, 0x00]);
    let ip_len = size.saturating_sub(14).max(28) as u16;
    f.extend_from_slice(&[0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0]);
    f[12 + 16..12 + 18].copy_from_slice(&ip_len.to_be_bytes());
    f.extend_from_slice(&[198, 18, 1, 1, 198, 18, 1, 2]);
    f.extend_from_slice(&[0x13, 0x88, 0, 9]);
    f.extend_from_slice(&(ip_len - 20).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.resize(12 + size.max(42), 0x5a);
    f
}

/// `--tap TAP` and the daemon's mode arguments: `$env` (split at
/// whitespace) if set, else `--tap-io MODE` (for A/B runs of other
/// switches, e.g. `OB_BENCH_S="--tap-io uring --poll-us 0"`).
fn mode_args(tap: &str, env: &str, mode: &str) -> Vec<&'static str> {
    let extra = std::env::var(env).unwrap_or_else(|_| format!("--tap-io {mode}"));
    let mut v: Vec<&'static str> = vec!["--tap", Box::leak(tap.to_string().into_boxed_str())];
    v.extend(
        Box::leak(extra.into_boxed_str())
            .split_whitespace()
            .collect::<Vec<_>>(),
    );
    v
}

/// Pins every thread of process `pid` (and threads it starts later) to `cpu`.
fn pin_process(pid: u32, cpu: usize) {
    let ok = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", &cpu.to_string(), &pid.to_string()])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(ok, "taskset -a -p -c {cpu} {pid} failed");
}

/// Pins the calling thread to `cpu`.
fn pin_thread(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes inside it; the
    // affinity call reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// The tx baselines and daemons: taps alone in namespace `c`.
struct Lone {
    c: Netns,
    uring: NetDaemon,
    sync: NetDaemon,
    /// The write loop's tap (daemon flags: IFF_VNET_HDR, multi-queue).
    wtap: vhost_user_net::tap::Tap,
    /// The CPU the daemons and the write loop run on.
    pin: Option<usize>,
}

impl Lone {
    fn new(bin: &std::path::Path, pin: Option<usize>) -> Lone {
        let c = Netns::new("benchc");
        let uring = NetDaemon::spawn_bin(bin, &c, &mode_args("obtxu", "OB_BENCH_U", "uring"));
        let sync = NetDaemon::spawn_bin(bin, &c, &mode_args("obtxs", "OB_BENCH_S", "sync"));
        if let Some(cpu) = pin {
            pin_process(uring.pid(), cpu);
            pin_process(sync.pid(), cpu);
        }
        let wtap = c.run(|| vhost_user_net::tap::Tap::open("obtxw", 1).expect("tap"));
        wtap.set_carrier(true).expect("carrier");
        c.ip(&["link", "set", "obtxw", "up"]);
        Lone {
            c,
            uring,
            sync,
            wtap,
            pin,
        }
    }

    /// One thread, one `write()` per frame: frames per second the tap took.
    fn write_loop(&self, size: usize, secs: u64) -> Meas {
        let frame = ready_frame(size);
        let fd = self.wtap.fd(0).expect("fd");
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let pin = self.pin;
        let writer = std::thread::spawn(move || {
            if let Some(cpu) = pin {
                pin_thread(cpu);
            }
            let (mut n, c0) = (0u64, thread_cpu_ns());
            while !st.load(Ordering::Relaxed) {
                // SAFETY: writing our own buffer to the tap fd we hold open.
                let r = unsafe { libc::write(fd, frame.as_ptr().cast(), frame.len()) };
                n += u64::from(r > 0);
            }
            (thread_cpu_ns() - c0) as f64 / n.max(1) as f64
        });
        std::thread::sleep(Duration::from_secs(1));
        let (c0, t0) = (tap_rx_packets(&self.c, "obtxw"), Instant::now());
        std::thread::sleep(Duration::from_secs(secs));
        let (c1, t1) = (tap_rx_packets(&self.c, "obtxw"), Instant::now());
        stop.store(true, Ordering::Relaxed);
        let cpu = writer.join().ok();
        Meas {
            pps: (c1 - c0) as f64 / (t1 - t0).as_secs_f64(),
            cpu,
        }
    }

    /// testpmd txonly through `d` (tap `tap`): frames per second the tap took.
    fn daemon(&self, d: &NetDaemon, tap: &str, size: usize, secs: u64) -> Meas {
        let pkts = format!("--txpkts={size}");
        let t = Testpmd::start(
            &virtio_user(&d.socket),
            &[
                "--forward-mode=txonly",
                &pkts,
                "--eth-peer=0,02:00:00:00:00:77",
            ],
            None,
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while d.stats()["link_up"] != true {
            assert!(
                Instant::now() < deadline,
                "testpmd did not start:\n{}",
                t.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_secs(1));
        let (c0, t0, p0) = (
            tap_rx_packets(&self.c, tap),
            Instant::now(),
            process_cpu_ns(d.pid()),
        );
        std::thread::sleep(Duration::from_secs(secs));
        let (c1, t1, p1) = (
            tap_rx_packets(&self.c, tap),
            Instant::now(),
            process_cpu_ns(d.pid()),
        );
        t.stop();
        // The daemon sees the disconnect before the next round connects.
        let deadline = Instant::now() + Duration::from_secs(10);
        while d.stats()["link_up"] == true && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        Meas {
            pps: (c1 - c0) as f64 / (t1 - t0).as_secs_f64(),
            cpu: Some((p1 - p0) as f64 / (c1 - c0).max(1) as f64),
        }
    }
}

impl Rig {
    fn start(&self, path: Path<'_>, mode: &[&str]) -> Testpmd {
        match path {
            Path::Daemon(d) => {
                let t = Testpmd::start(&virtio_user(&d.socket), mode, None);
                let deadline = Instant::now() + Duration::from_secs(30);
                while d.stats()["link_up"] != true {
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
    fn tx(&self, path: Path<'_>, size: usize, secs: u64) -> Meas {
        let pkts = format!("--txpkts={size}");
        let peer = format!("--eth-peer=0,{}", self.peer);
        let t = self.start(path, &["--forward-mode=txonly", &pkts, &peer]);
        std::thread::sleep(Duration::from_secs(1));
        let (c0, t0) = (rx_packets(&self.b), Instant::now());
        std::thread::sleep(Duration::from_secs(secs));
        let (c1, t1) = (rx_packets(&self.b), Instant::now());
        t.stop();
        if let Path::Daemon(d) = path {
            let deadline = Instant::now() + Duration::from_secs(10);
            while d.stats()["link_up"] == true && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Meas {
            pps: (c1 - c0) as f64 / (t1 - t0).as_secs_f64(),
            cpu: None,
        }
    }

    /// UDP flood from B → testpmd rxonly: frames per second testpmd received.
    fn rx(&self, path: Path<'_>, size: usize, secs: u64) -> Meas {
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
        let pid = match path {
            Path::Daemon(d) => Some(d.pid()),
            Path::Tap => None,
        };
        let (t0, p0) = (Instant::now(), pid.map(process_cpu_ns));
        std::thread::sleep(Duration::from_secs(secs));
        stop.store(true, Ordering::Relaxed);
        let (elapsed, p1) = (t0.elapsed(), pid.map(process_cpu_ns));
        for s in senders {
            let _ = s.join();
        }
        let (rx, _) = t.stop();
        let cpu = match (p0, p1) {
            (Some(a), Some(b)) => Some((b - a) as f64 / rx.max(1) as f64),
            _ => None,
        };
        if let Path::Daemon(d) = path {
            let deadline = Instant::now() + Duration::from_secs(10);
            while d.stats()["link_up"] == true && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Meas {
            pps: rx as f64 / elapsed.as_secs_f64(),
            cpu,
        }
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
    let mut ua = mode_args("obtap0", "OB_BENCH_U", "uring");
    ua.extend(["--bridge", "obbr0", "--create-bridge"]);
    let uring = NetDaemon::spawn_bin(&bin, &a, &ua);
    let mut sa = mode_args("obtap1", "OB_BENCH_S", "sync");
    sa.extend(["--bridge", "obbr0"]);
    let sync = NetDaemon::spawn_bin(&bin, &a, &sa);
    a.ip(&["link", "set", "va", "master", "obbr0"]);
    // A hub: the testpmd MAC moves between the paths (a daemon's port
    // forwards only while its frontend runs: carrier).
    a.ip(&["link", "set", "obbr0", "type", "bridge", "ageing_time", "0"]);
    // No bridge netfilter in A (if loaded), and a sink socket in B that
    // never reads: frames cost the same on both paths, without ICMP replies.
    let _ = a
        .command("sysctl")
        .args(["-qw", "net.bridge.bridge-nf-call-iptables=0"])
        .output();
    let _sink = b.run(|| UdpSocket::bind("198.18.0.2:9").expect("sink"));
    let peer = b.mac("vb").map(|x| format!("{x:02x}")).join(":");
    let rig = Rig { a, b, peer };
    if let Some(cpu) = o.pin {
        pin_process(uring.pid(), cpu);
        pin_process(sync.pid(), cpu);
        println!("daemons and the write loop pinned to CPU {cpu} (testpmd: -l 0-1)");
    }
    let lone = o
        .dirs
        .iter()
        .any(|d| d == "tx")
        .then(|| Lone::new(&bin, o.pin));
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load average at start: {}", load.trim());
    println!("| round | size | dir | uring pps | sync pps | baseline pps | uring/base | sync/base | uring/sync | uring Gbit/s | CPU ns/frame uring, sync, base |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let ns = |m: Meas| m.cpu.map_or("-".to_string(), |c| format!("{c:.0}"));
    let gbps = |pps: f64, size: usize| pps * size as f64 * 8.0 / 1e9;
    // Per (size, direction): each path's frames/s in every round, for --plot.
    let mut cells: Vec<(Cell, [Vec<f64>; 3])> = Vec::new();
    for round in 1..=o.rounds {
        for &size in &o.sizes {
            for dir in &o.dirs {
                // Interleaved: each round measures every path once.
                let (u, s, base) = match dir.as_str() {
                    "tx" => {
                        let l = lone.as_ref().expect("lone taps");
                        let base = l.write_loop(size, o.secs);
                        let u = l.daemon(&l.uring, "obtxu", size, o.secs);
                        let s = l.daemon(&l.sync, "obtxs", size, o.secs);
                        (u, s, base)
                    }
                    "txbr" => (
                        rig.tx(Path::Daemon(&uring), size, o.secs),
                        rig.tx(Path::Daemon(&sync), size, o.secs),
                        rig.tx(Path::Tap, size, o.secs),
                    ),
                    "rx" => (
                        rig.rx(Path::Daemon(&uring), size, o.secs),
                        rig.rx(Path::Daemon(&sync), size, o.secs),
                        {
                            // testpmd's net_tap port sometimes receives
                            // nothing (its tap not yet forwarding): once more.
                            let m = rig.rx(Path::Tap, size, o.secs);
                            if m.pps > 0.0 {
                                m
                            } else {
                                rig.rx(Path::Tap, size, o.secs)
                            }
                        },
                    ),
                    other => {
                        eprintln!("unknown direction {other}");
                        std::process::exit(2);
                    }
                };
                let key = (size, dir.clone());
                let i = match cells.iter().position(|(k, _)| *k == key) {
                    Some(i) => i,
                    None => {
                        cells.push((key, Default::default()));
                        cells.len() - 1
                    }
                };
                for (v, m) in cells[i].1.iter_mut().zip([u.pps, s.pps, base.pps]) {
                    v.push(m);
                }
                println!(
                    "| {round} | {size} | {dir} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {}, {}, {} |",
                    u.pps,
                    s.pps,
                    base.pps,
                    u.pps / base.pps.max(1.0),
                    s.pps / base.pps.max(1.0),
                    u.pps / s.pps.max(1.0),
                    gbps(u.pps, size),
                    ns(u),
                    ns(s),
                    ns(base),
                );
            }
        }
    }
    println!("baseline: tx = one write() per frame to a lone tap; txbr, rx = testpmd net_tap on the bridge");
    if let Some(path) = &o.plot {
        let cells: Vec<outboard_tests::plot::Cell> = cells
            .into_iter()
            .map(|((size, dir), [u, s, base])| outboard_tests::plot::Cell {
                label: format!("{dir} {size} B"),
                bars: vec![
                    ("uring".into(), u),
                    ("sync".into(), s),
                    ("baseline".into(), base),
                ],
            })
            .collect();
        let title = format!(
            "net-bench: frames/s, median and range of {} rounds of {} s",
            o.rounds, o.secs
        );
        match outboard_tests::plot::bars(path, &title, "frames/s", &cells) {
            Ok(()) => println!("chart: {}", path.display()),
            Err(e) => {
                eprintln!("net-bench: {e}");
                std::process::exit(1);
            }
        }
    }
}
