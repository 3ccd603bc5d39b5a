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

use std::fs::File;
use std::io::{Read, Write};
use std::net::UdpSocket;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use outboard_tests::netd::NetDaemon;
use outboard_tests::netns::{ipv4_frame, Netns};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_OWNER: u32 = 3;
const SET_MEM_TABLE: u32 = 5;
const SET_VRING_NUM: u32 = 8;
const SET_VRING_ADDR: u32 = 9;
const SET_VRING_BASE: u32 = 10;
const SET_VRING_KICK: u32 = 12;
const SET_VRING_CALL: u32 = 13;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_PROTOCOL_FEATURES: u32 = 16;
const SET_VRING_ENABLE: u32 = 18;
const VERSION_1: u64 = 1 << 32;
const F_PROTOCOL_FEATURES: u64 = 1 << 30;
const MEM_SIZE: usize = 1 << 20;
const HVA: u64 = 0x7f00_0000_0000;
const QSIZE: u16 = 64;
const NEXT: u16 = 1;
const WRITE: u16 = 2;
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x58];
const GUEST_IP: [u8; 4] = [10, 204, 0, 1];
const PEER_IP: [u8; 4] = [10, 204, 0, 2];

/// Queue `q`'s descriptor table, available ring and used ring.
fn ring(q: u64) -> [u64; 3] {
    let base = q * 0x4000;
    [base, base + 0x1000, base + 0x2000]
}

/// Buffers of queue `q`, 64 slots of 2 KiB.
fn buf(q: u64, slot: u64) -> u64 {
    0x2_0000 + q * 0x2_0000 + slot * 0x800
}

/// Guest memory: a memfd-like file mapped shared in the test.
struct GuestMem {
    file: File,
    ptr: *mut u8,
}

impl GuestMem {
    fn new() -> GuestMem {
        let file = tempfile::tempfile().expect("tempfile");
        file.set_len(MEM_SIZE as u64).expect("size");
        // SAFETY: a fresh shared mapping of a file we own, of its size.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MEM_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap");
        GuestMem {
            file,
            ptr: ptr.cast(),
        }
    }

    fn write(&self, gpa: u64, data: &[u8]) {
        assert!(gpa as usize + data.len() <= MEM_SIZE);
        // SAFETY: in bounds of our mapping (checked above); the daemon
        // only reads these bytes after the kick that follows.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(gpa as usize), data.len())
        };
    }

    fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        assert!(gpa as usize + len <= MEM_SIZE);
        let mut v = vec![0u8; len];
        // SAFETY: in bounds of our mapping; a racing daemon write can only
        // change the bytes we copy, not their validity.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(gpa as usize), v.as_mut_ptr(), len) };
        v
    }

    fn u16_at(&self, gpa: u64) -> u16 {
        let b = self.read(gpa, 2);
        u16::from_le_bytes([b[0], b[1]])
    }

    fn desc(&self, q: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = Vec::with_capacity(16);
        d.extend_from_slice(&addr.to_le_bytes());
        d.extend_from_slice(&len.to_le_bytes());
        d.extend_from_slice(&flags.to_le_bytes());
        d.extend_from_slice(&next.to_le_bytes());
        self.write(ring(q)[0] + 16 * u64::from(i), &d);
    }

    /// Makes `heads` available after the `start` entries already there and
    /// sets the index to `idx`.
    fn avail(&self, q: u64, start: u16, heads: &[u16], idx: u16) {
        for (i, h) in heads.iter().enumerate() {
            let at = ring(q)[1] + 4 + 2 * u64::from((start + i as u16) % QSIZE);
            self.write(at, &h.to_le_bytes());
        }
        self.write(ring(q)[1] + 2, &idx.to_le_bytes());
    }

    fn used_idx(&self, q: u64) -> u16 {
        self.u16_at(ring(q)[2] + 2)
    }

    /// (id, len) of used entry `i`.
    fn used(&self, q: u64, i: u16) -> (u32, u32) {
        let b = self.read(ring(q)[2] + 4 + 8 * u64::from(i % QSIZE), 8);
        (
            u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        )
    }
}

impl Drop for GuestMem {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping made in `new`, used by nobody after.
        unsafe { libc::munmap(self.ptr.cast(), MEM_SIZE) };
    }
}

struct Conn(UnixStream);

impl Conn {
    fn send(&self, req: u32, payload: &[u8], fds: &[RawFd]) {
        let mut msg = Vec::with_capacity(12 + payload.len());
        msg.extend_from_slice(&req.to_le_bytes());
        msg.extend_from_slice(&1u32.to_le_bytes());
        msg.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        msg.extend_from_slice(payload);
        if fds.is_empty() {
            (&self.0).write_all(&msg).expect("send");
        } else {
            self.0
                .send_with_fds(&[&msg[..]], fds)
                .expect("send with fds");
        }
    }

    fn get_u64(&mut self, req: u32) -> u64 {
        self.send(req, &[], &[]);
        let mut b = [0u8; 20];
        self.0.read_exact(&mut b).expect("reply");
        u64::from_le_bytes(b[12..20].try_into().expect("8 bytes"))
    }
}

fn eventfd() -> OwnedFd {
    // SAFETY: eventfd creates a new fd we own.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    assert!(fd >= 0, "eventfd");
    // SAFETY: just created, owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn kick(fd: &OwnedFd) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writing 8 bytes from a local buffer to our eventfd.
    let n = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), 8) };
    assert_eq!(n, 8, "kick");
}

/// Connects and sets up 4 queues of `QSIZE` over `mem`; returns the kick fds.
fn connect(socket: &std::path::Path, mem: &GuestMem) -> (Conn, Vec<OwnedFd>, Vec<OwnedFd>) {
    let s = UnixStream::connect(socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut c = Conn(s);
    c.send(SET_OWNER, &[], &[]);
    let f = c.get_u64(GET_FEATURES);
    assert!(f & VERSION_1 != 0 && f & F_PROTOCOL_FEATURES != 0);
    // No offloads, no mergeable buffers: a 12-byte header, plain frames.
    c.send(
        SET_FEATURES,
        &(VERSION_1 | F_PROTOCOL_FEATURES).to_le_bytes(),
        &[],
    );
    let p = c.get_u64(GET_PROTOCOL_FEATURES);
    c.send(SET_PROTOCOL_FEATURES, &(p & !8).to_le_bytes(), &[]);
    let mut table = Vec::new();
    table.extend_from_slice(&1u32.to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes());
    for v in [0u64, MEM_SIZE as u64, HVA, 0] {
        table.extend_from_slice(&v.to_le_bytes());
    }
    c.send(SET_MEM_TABLE, &table, &[mem.file.as_raw_fd()]);
    let (mut kicks, mut calls) = (Vec::new(), Vec::new());
    for q in 0..4u32 {
        let state = |n: u32| [q.to_le_bytes(), n.to_le_bytes()].concat();
        c.send(SET_VRING_NUM, &state(u32::from(QSIZE)), &[]);
        let r = ring(u64::from(q));
        let mut addr = Vec::new();
        addr.extend_from_slice(&q.to_le_bytes());
        addr.extend_from_slice(&0u32.to_le_bytes());
        for v in [HVA + r[0], HVA + r[2], HVA + r[1], 0] {
            addr.extend_from_slice(&v.to_le_bytes());
        }
        c.send(SET_VRING_ADDR, &addr, &[]);
        c.send(SET_VRING_BASE, &state(0), &[]);
        let call = eventfd();
        c.send(
            SET_VRING_CALL,
            &u64::from(q).to_le_bytes(),
            &[call.as_raw_fd()],
        );
        let k = eventfd();
        c.send(
            SET_VRING_KICK,
            &u64::from(q).to_le_bytes(),
            &[k.as_raw_fd()],
        );
        c.send(SET_VRING_ENABLE, &state(1), &[]);
        kicks.push(k);
        calls.push(call);
    }
    // A round trip: every message above was handled.
    c.get_u64(GET_FEATURES);
    (c, kicks, calls)
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

#[test]
fn a_hostile_queue_pair_does_not_stop_the_daemon_or_the_other_pair() {
    let a = Netns::new("hga");
    let b = Netns::new("hgb");
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
    let mut d = NetDaemon::spawn(
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
    let mem = GuestMem::new();
    let (_conn, kicks, _calls) = connect(&d.socket, &mem);

    // Pair 1 RX: 64 buffers; the kick starts the pair and the link.
    for i in 0..QSIZE {
        mem.desc(2, i, buf(2, u64::from(i)), 2048, WRITE, 0);
    }
    mem.avail(2, 0, &(0..QSIZE).collect::<Vec<_>>(), QSIZE);
    kick(&kicks[2]);
    wait_until("tap up", &d, || d.stats()["link_up"] == true);
    wait_until("bridge port forwarding", &d, || {
        a.exec(&["cat", "/sys/class/net/obtap0/brport/state"])
            .trim()
            == "3"
    });

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
    for i in 0..QSIZE {
        mem.desc(0, i, buf(0, u64::from(i)), 2048, WRITE, 0);
    }
    mem.avail(0, 0, &(0..QSIZE).collect::<Vec<_>>(), QSIZE);
    kick(&kicks[0]);
    let senders: Vec<UdpSocket> = (0..16u16)
        .map(|i| b.run(move || UdpSocket::bind(("10.204.0.2", 7200 + i)).expect("bind")))
        .collect();
    for (i, s) in senders.iter().enumerate() {
        s.send_to(format!("flow {i}").as_bytes(), "10.204.0.1:9")
            .expect("send");
    }
    let mut seen = vec![false; 16];
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.iter().any(|s| !s) && Instant::now() < deadline {
        for q in [0u64, 2] {
            for i in 0..mem.used_idx(q) {
                let (id, len) = mem.used(q, i);
                let f = mem.read(buf(q, u64::from(id)), len as usize);
                if let Some(text) = f.get(12 + 42..).and_then(|p| std::str::from_utf8(p).ok()) {
                    if let Some(n) = text
                        .strip_prefix("flow ")
                        .and_then(|n| n.parse::<usize>().ok())
                    {
                        if let Some(s) = seen.get_mut(n) {
                            *s = true;
                        }
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        seen.iter().all(|s| *s),
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

/// Issue 12 part 2, daemon side: the frontend disables queue pair 1
/// (SET_VRING_ENABLE 0 on its rings, what QEMU sends for `ethtool -L
/// combined 1` in the guest): the daemon detaches tap queue 1 at once, so
/// every flow from B reaches pair 0's RX ring, byte for byte, and nothing
/// more lands on pair 1. Enabled again (and kicked), pair 1 receives flows
/// again. Seccomp in kill mode: TUNSETQUEUE is allowed once serving.
#[test]
fn a_disabled_queue_pair_gives_its_flows_to_the_others() {
    let a = Netns::new("hqa");
    let b = Netns::new("hqb");
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
    let mem = GuestMem::new();
    let (mut conn, kicks, _calls) = connect(&d.socket, &mem);
    for q in [0u64, 2] {
        for i in 0..QSIZE {
            mem.desc(q, i, buf(q, u64::from(i)), 2048, WRITE, 0);
        }
        mem.avail(q, 0, &(0..QSIZE).collect::<Vec<_>>(), QSIZE);
        kick(&kicks[q as usize]);
    }
    wait_until("tap up", &d, || d.stats()["link_up"] == true);
    wait_until("bridge port forwarding", &d, || {
        a.exec(&["cat", "/sys/class/net/obtap0/brport/state"])
            .trim()
            == "3"
    });
    let senders: Vec<UdpSocket> = (0..20u16)
        .map(|i| b.run(move || UdpSocket::bind(("10.204.0.2", 7300 + i)).expect("bind")))
        .collect();
    let send_all = |prefix: &str| {
        for (i, s) in senders.iter().enumerate() {
            s.send_to(format!("{prefix}{i}").as_bytes(), "10.204.0.1:9")
                .expect("send");
        }
    };
    let wait_flows = |prefix: &str| -> Vec<Option<u64>> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let seen = flows_seen(&mem, senders.len(), prefix);
            if seen.iter().all(Option::is_some) || Instant::now() > deadline {
                return seen;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    // Both pairs run: the tap spreads the 20 flows over both RX rings.
    send_all("both ");
    let seen = wait_flows("both ");
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
    let state = |q: u32, n: u32| [q.to_le_bytes(), n.to_le_bytes()].concat();
    conn.send(SET_VRING_ENABLE, &state(2, 0), &[]);
    conn.send(SET_VRING_ENABLE, &state(3, 0), &[]);
    conn.get_u64(GET_FEATURES);
    let pair1_before = mem.used_idx(2);
    send_all("one ");
    let seen = wait_flows("one ");
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
    conn.send(SET_VRING_ENABLE, &state(2, 1), &[]);
    conn.send(SET_VRING_ENABLE, &state(3, 1), &[]);
    conn.get_u64(GET_FEATURES);
    kick(&kicks[2]);
    // The kick attaches the queue on the pair's worker thread.
    std::thread::sleep(Duration::from_millis(200));
    send_all("again ");
    let seen = wait_flows("again ");
    assert!(
        seen.iter().all(Option::is_some) && seen.contains(&Some(2)),
        "pair 1 receives again once enabled: {seen:?}\n{}",
        d.stats()
    );
    let mut d = d;
    assert!(d.is_running(), "daemon died:\n{}", d.log_text());
}
