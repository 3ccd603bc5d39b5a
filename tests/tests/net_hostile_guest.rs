//! A hostile guest against the running daemon: the test is the vhost-user
//! frontend (raw messages, guest memory in a memfd it maps itself) of a
//! `vhost-user-net` with two queue pairs, seccomp in `kill` mode, its tap
//! on a bridge in namespace A with a veth to namespace B.
//!
//! Pair 0 is hostile: its RX ring has an available index far ahead of the
//! ring, its TX ring holds a self-loop, a next index past the table, a
//! 4 GiB length and an address outside guest memory before one valid
//! frame. Pair 1 behaves. The daemon must stay up, count the bad chains,
//! still send pair 0's valid frame and pair 1's frame to B, and deliver
//! frames from B into the guest's RX buffers once pair 0's ring is
//! repaired.

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use outboard_tests::netd::NetDaemon;
use outboard_tests::netns::{ipv4_frame, Netns};
use outboard_tests::raw_frontend::{
    connect, kick, vring_state, GuestMem, GET_FEATURES, NEXT, SET_VRING_ENABLE, WRITE,
};

const MEM_SIZE: usize = 1 << 20;
const QSIZE: u16 = 64;
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x58];
const GUEST_IP: [u8; 4] = [10, 204, 0, 1];
const PEER_IP: [u8; 4] = [10, 204, 0, 2];

/// Buffers of queue `q`, 64 slots of 2 KiB.
fn buf(q: u64, slot: u64) -> u64 {
    0x2_0000 + q * 0x2_0000 + slot * 0x800
}

fn udp_frame(peer_mac: [u8; 6], src_port: u16, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend_from_slice(&src_port.to_be_bytes());
    l4.extend_from_slice(&dst_port.to_be_bytes());
    l4.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    l4.extend_from_slice(&[0, 0]); // no UDP checksum (IPv4)
    l4.extend_from_slice(payload);
    let mut f = vec![0u8; 12]; // virtio-net header: no offloads
    f.extend(ipv4_frame(peer_mac, GUEST_MAC, GUEST_IP, PEER_IP, 17, &l4));
    f
}

fn wait_until(what: &str, d: &NetDaemon, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ok() {
        assert!(
            Instant::now() < deadline,
            "{what}\n{}\n{}",
            d.stats(),
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Namespace A with the daemon (two queue pairs, seccomp in `kill` mode,
/// its tap on a bridge with a veth to B) and namespace B as the peer
/// (10.204.0.2, the guest's address and MAC known).
fn two_pairs(a_name: &str, b_name: &str) -> (Netns, Netns, NetDaemon) {
    let a = Netns::new(a_name);
    let b = Netns::new(b_name);
    a.veth("va", &b, "vb");
    b.ip(&["addr", "add", "10.204.0.2/24", "dev", "vb"]);
    b.ip(&[
        "neigh",
        "replace",
        "10.204.0.1",
        "lladdr",
        "52:54:00:12:34:58",
        "dev",
        "vb",
    ]);
    let d = NetDaemon::spawn(
        &a,
        &[
            "--tap",
            "obtap0",
            "--bridge",
            "obbr0",
            "--create-bridge",
            "--queue-pairs",
            "2",
            "--mac",
            "52:54:00:12:34:58",
            "--seccomp",
            "kill",
        ],
    );
    a.ip(&["link", "set", "va", "master", "obbr0"]);
    (a, b, d)
}

/// Waits until the tap is up and its bridge port forwards.
fn wait_bridged(a: &Netns, d: &NetDaemon) {
    wait_until("tap up", d, || d.stats()["link_up"] == true);
    wait_until("bridge port forwarding", d, || {
        a.exec(&["cat", "/sys/class/net/obtap0/brport/state"])
            .trim()
            == "3"
    });
}

/// Waits until `n` of the tap's queues are attached (`ip -d link`: "numqueues N"; a queue
/// the daemon detached counts in "numdisabled"). A pair attaches its queue on its worker
/// thread at its first queue event, so a kick alone does not say when that happened.
fn wait_tap_queues(a: &Netns, d: &NetDaemon, n: usize) {
    let want = format!("numqueues {n} ");
    wait_until(&format!("{n} tap queue(s) attached"), d, || {
        a.exec(&["ip", "-d", "link", "show", "dev", "obtap0"])
            .contains(&want)
    });
}

/// Gives RX queue `q` all its buffers, 2 KiB each.
fn fill_rx(mem: &GuestMem, q: u64) {
    for i in 0..QSIZE {
        mem.desc(q, i, buf(q, u64::from(i)), 2048, WRITE, 0);
    }
    mem.avail(q, 0, &(0..QSIZE).collect::<Vec<_>>(), QSIZE);
}

#[test]
fn a_hostile_queue_pair_does_not_stop_the_daemon_or_the_other_pair() {
    let (a, b, mut d) = two_pairs("hga", "hgb");
    let peer_mac = b.mac("vb");
    let socks: Vec<UdpSocket> = (0..2u16)
        .map(|p| {
            b.run(move || {
                let u = UdpSocket::bind(("10.204.0.2", 7100 + p)).expect("bind in B");
                u.set_read_timeout(Some(Duration::from_secs(5)))
                    .expect("timeout");
                u
            })
        })
        .collect();
    let mem = GuestMem::new(MEM_SIZE, QSIZE);
    // Both pairs' four queues; no offloads, no mergeable buffers: a 12-byte
    // header, plain frames.
    let (_conn, kicks, _calls) = connect(&d.socket, &mem, 4, 0, Duration::ZERO);

    // Pair 1 RX: 64 buffers; the kick starts the pair and the link.
    fill_rx(&mem, 2);
    kick(&kicks[2]);
    wait_bridged(&a, &d);

    // Pair 0, hostile. RX: an available index far past the ring.
    mem.avail(0, 0, &[], 1000);
    kick(&kicks[0]);
    // TX: four bad chains, then a valid frame.
    let f0 = udp_frame(peer_mac, 5000, 7100, b"pair 0 after hostile chains");
    mem.write(buf(1, 10), &f0);
    mem.desc(1, 0, buf(1, 0), 12, NEXT, 0); // loops on itself
    mem.desc(1, 1, buf(1, 0), 12, NEXT, 9999); // next past the table
    mem.desc(1, 2, buf(1, 0), 12, NEXT, 3);
    mem.desc(1, 3, buf(1, 1), u32::MAX, 0, 0); // 4 GiB
    mem.desc(1, 4, (MEM_SIZE as u64) + 0x1000, 100, 0, 0); // outside memory
    mem.desc(1, 5, buf(1, 10), f0.len() as u32, 0, 0);
    mem.avail(1, 0, &[0, 1, 2, 4, 5], 5);
    kick(&kicks[1]);
    // Pair 1 TX: a valid frame.
    let f1 = udp_frame(peer_mac, 5001, 7101, b"pair 1");
    mem.write(buf(3, 0), &f1);
    mem.desc(3, 0, buf(3, 0), f1.len() as u32, 0, 0);
    mem.avail(3, 0, &[0], 1);
    kick(&kicks[3]);

    let mut got = vec![0u8; 2048];
    for (p, want) in [
        (1usize, &b"pair 1"[..]),
        (0, b"pair 0 after hostile chains"),
    ] {
        let (n, _) = socks[p].recv_from(&mut got).unwrap_or_else(|e| {
            panic!(
                "pair {p}'s frame did not reach B: {e}\n{}\n{}",
                d.stats(),
                d.log_text()
            )
        });
        assert_eq!(&got[..n], want, "pair {p}");
    }
    wait_until("pair 0 TX completed all five chains", &d, || {
        mem.used_idx(1) == 5
    });
    // A frame can reach B before its queue thread bumps the counters.
    wait_until("both TX queues counted their frame", &d, || {
        let s = d.stats();
        s["queues"][1]["packets"].as_u64() >= Some(1)
            && s["queues"][3]["packets"].as_u64() >= Some(1)
    });
    assert!(d.is_running(), "daemon died:\n{}", d.log_text());
    let stats = d.stats();
    let q = |i: usize, k: &str| stats["queues"][i][k].as_u64().expect("counter");
    assert_eq!(q(1, "errors"), 4, "the four bad TX chains: {stats}");
    assert_eq!((q(1, "packets"), q(3, "packets")), (1, 1), "{stats}");
    assert!(q(0, "errors") >= 1, "the broken RX ring counted: {stats}");
    // Refused before `virtio-queue` would log it on every pop (a guest
    // kicking a broken ring must not flood the log).
    assert!(!d.log_text().contains("Iterator error"), "{}", d.log_text());

    // Pair 0 repairs its RX ring: frames from B reach both RX rings.
    fill_rx(&mem, 0);
    kick(&kicks[0]);
    let senders: Vec<UdpSocket> = (0..16u16)
        .map(|i| b.run(move || UdpSocket::bind(("10.204.0.2", 7200 + i)).expect("bind")))
        .collect();
    for (i, s) in senders.iter().enumerate() {
        s.send_to(format!("flow {i}").as_bytes(), "10.204.0.1:9")
            .expect("send");
    }
    let seen = wait_flows(&mem, senders.len(), "flow ");
    assert!(
        seen.iter().all(Option::is_some),
        "flows delivered into the guest: {seen:?}\n{}",
        d.stats()
    );
    assert!(d.is_running(), "daemon died:\n{}", d.log_text());
}

/// Which RX queue (0 or 2) each flow `i` (payload "flow I") landed on.
fn flows_seen(mem: &GuestMem, n: usize, prefix: &str) -> Vec<Option<u64>> {
    let mut seen = vec![None; n];
    for q in [0u64, 2] {
        for i in 0..mem.used_idx(q) {
            let (id, len) = mem.used(q, i);
            let f = mem.read(buf(q, u64::from(id)), len as usize);
            if let Some(n) = f
                .get(12 + 42..)
                .and_then(|p| std::str::from_utf8(p).ok())
                .and_then(|t| t.strip_prefix(prefix))
                .and_then(|t| t.parse::<usize>().ok())
            {
                if let Some(s) = seen.get_mut(n) {
                    *s = Some(q);
                }
            }
        }
    }
    seen
}

/// Flows `0..n` seen (as in [`flows_seen`]) once all have landed or after
/// 10 s.
fn wait_flows(mem: &GuestMem, n: usize, prefix: &str) -> Vec<Option<u64>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = flows_seen(mem, n, prefix);
        if seen.iter().all(Option::is_some) || Instant::now() > deadline {
            return seen;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Issue 12 part 2, daemon side: the frontend disables queue pair 1
/// (SET_VRING_ENABLE 0 on its rings, what QEMU sends for `ethtool -L
/// combined 1` in the guest): the daemon detaches tap queue 1 at once, so
/// every flow from B reaches pair 0's RX ring, byte for byte, and nothing
/// more lands on pair 1. Enabled again (and kicked), pair 1 receives flows
/// again. Seccomp in kill mode: TUNSETQUEUE is allowed once serving.
#[test]
fn a_disabled_queue_pair_gives_its_flows_to_the_others() {
    let (a, b, d) = two_pairs("hqa", "hqb");
    let mem = GuestMem::new(MEM_SIZE, QSIZE);
    let (mut conn, kicks, _calls) = connect(&d.socket, &mem, 4, 0, Duration::ZERO);
    for q in [0u64, 2] {
        fill_rx(&mem, q);
        kick(&kicks[q as usize]);
    }
    wait_bridged(&a, &d);
    wait_tap_queues(&a, &d, 2);
    let senders: Vec<UdpSocket> = (0..20u16)
        .map(|i| b.run(move || UdpSocket::bind(("10.204.0.2", 7300 + i)).expect("bind")))
        .collect();
    let send_all = |prefix: &str| {
        for (i, s) in senders.iter().enumerate() {
            s.send_to(format!("{prefix}{i}").as_bytes(), "10.204.0.1:9")
                .expect("send");
        }
    };
    // Both pairs run: the tap spreads the 20 flows over both RX rings.
    send_all("both ");
    let seen = wait_flows(&mem, senders.len(), "both ");
    assert!(
        seen.iter().all(Option::is_some),
        "flows lost with both pairs: {seen:?}\n{}",
        d.stats()
    );
    assert!(
        seen.contains(&Some(0)) && seen.contains(&Some(2)),
        "flows spread over both pairs: {seen:?}"
    );
    // The frontend disables pair 1 (both rings).
    conn.send(SET_VRING_ENABLE, &vring_state(2, 0), &[]);
    conn.send(SET_VRING_ENABLE, &vring_state(3, 0), &[]);
    conn.get_u64(GET_FEATURES);
    wait_tap_queues(&a, &d, 1);
    let pair1_before = mem.used_idx(2);
    send_all("one ");
    let seen = wait_flows(&mem, senders.len(), "one ");
    assert!(
        seen.iter().all(|s| *s == Some(0)),
        "with pair 1 disabled every flow reaches pair 0: {seen:?}\n{}\n{}",
        d.stats(),
        d.log_text()
    );
    assert_eq!(mem.used_idx(2), pair1_before, "nothing more on pair 1");
    // Byte for byte: each datagram's payload after the headers.
    for i in 0..mem.used_idx(0) {
        let (id, len) = mem.used(0, i);
        let f = mem.read(buf(0, u64::from(id)), len as usize);
        if let Some(p) = f.get(12 + 42..) {
            if let Some(n) = std::str::from_utf8(p)
                .ok()
                .and_then(|t| t.strip_prefix("one "))
            {
                assert_eq!(p, format!("one {n}").as_bytes());
                assert_eq!(&f[12..18], &GUEST_MAC, "to the guest's MAC");
            }
        }
    }
    // Enabled again and kicked: pair 1 takes flows again.
    conn.send(SET_VRING_ENABLE, &vring_state(2, 1), &[]);
    conn.send(SET_VRING_ENABLE, &vring_state(3, 1), &[]);
    conn.get_u64(GET_FEATURES);
    kick(&kicks[2]);
    // The kick attaches the queue on the pair's worker thread.
    wait_tap_queues(&a, &d, 2);
    send_all("again ");
    let seen = wait_flows(&mem, senders.len(), "again ");
    assert!(
        seen.iter().all(Option::is_some) && seen.contains(&Some(2)),
        "pair 1 receives again once enabled: {seen:?}\n{}",
        d.stats()
    );
    let mut d = d;
    assert!(d.is_running(), "daemon died:\n{}", d.log_text());
}
