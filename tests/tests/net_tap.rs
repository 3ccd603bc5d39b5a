//! The vhost-user-net device model on a real tap, in network namespaces the
//! test creates: namespace A holds the bridge (created by the daemon's own
//! setup code over netlink) with the tap and one end of a veth; namespace B
//! holds the other end with an address and kernel sockets. The "guest" is
//! mock guest memory with `MockSplitQueue` rings, driven through the same
//! `NetDevice` calls the vhost-user adapter makes.
//!
//! - TX: frames the guest writes (plain, checksum-offloaded, and a UFO
//!   datagram) arrive at a UDP socket in B, byte for byte.
//! - RX: a UDP datagram from a socket in B, and a 10000-byte TCP GSO packet
//!   injected in B (AF_PACKET with a virtio-net header), land in guest
//!   buffers intact: with offloads as one GSO frame with NEEDS_CSUM, without
//!   them segmented with valid checksums; with and without MRG_RXBUF.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outboard_tests::netns::{csum_add, csum_fold, ipv4_frame, pseudo_v4, Netns};
use vhost_user_net::cli::{Config, DaemonConfig, Listen};
use vhost_user_net::device::NetDevice;
use vhost_user_net::uring::TapIo;
use vhost_user_net::virtio::Offloads;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const GUEST_IP: [u8; 4] = [10, 200, 0, 1];
const PEER_IP: [u8; 4] = [10, 200, 0, 2];
const MEM: u64 = 16 << 20;
const TXQ: u64 = 0x1_0000;
const TXBUF: u64 = 0x8_0000;
const RXBUF: u64 = 0x10_0000;
const PACKET_VNET_HDR: libc::c_int = 15;

struct Rig {
    dev: Arc<NetDevice>,
    mem: GuestMemoryMmap,
    b: Netns,
    _a: Netns,
    peer_mac: [u8; 6],
    mrg: bool,
    offloads: bool,
}

fn rig(mrg: bool, offloads: bool, io: TapIo) -> Rig {
    rig_pairs(mrg, offloads, 1, io)
}

fn rig_pairs(mrg: bool, offloads: bool, pairs: u16, io: TapIo) -> Rig {
    let a = Netns::new("neta");
    let b = Netns::new("netb");
    a.veth("va", &b, "vb");
    b.ip(&["addr", "add", "10.200.0.2/24", "dev", "vb"]);
    b.ip(&[
        "neigh",
        "replace",
        "10.200.0.1",
        "lladdr",
        "52:54:00:12:34:56",
        "dev",
        "vb",
    ]);
    let on = offloads;
    let cfg = Config {
        daemon: DaemonConfig {
            listen: Listen::Fd(-1),
            control_socket: None,
            metrics: Vec::new(),
            seccomp: "off".parse().expect("mode"),
            user: None,
            socket_mode: None,
        },
        tap: "obtap0".into(),
        bridge: Some("obbr0".into()),
        create_bridge: true,
        mac: Some(GUEST_MAC),
        mtu: 1500,
        queue_pairs: pairs,
        queue_size: 256,
        offloads: Offloads {
            csum: on,
            tso4: on,
            tso6: on,
            ufo: on,
            mrg_rxbuf: mrg,
            event_idx: true,
        },
        tap_io: io,
        poll_us: 50,
        ip: None,
    };
    let dev = a.run(move || vhost_user_net::setup(&cfg).expect("device setup in namespace A"));
    a.ip(&["link", "set", "va", "master", "obbr0"]);
    // The driver acks everything offered and starts the queues.
    dev.set_acked(dev.features()).expect("ack");
    dev.start();
    assert!(dev.link_up());
    wait_forwarding(&a, "obtap0");
    let peer_mac = b.mac("vb");
    Rig {
        dev,
        mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).expect("memory"),
        b,
        _a: a,
        peer_mac,
        mrg,
        offloads,
    }
}

/// Waits until the bridge forwards to port `dev`: the kernel applies a
/// carrier change through its link watch, up to a second later.
fn wait_forwarding(ns: &Netns, dev: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let path = format!("/sys/class/net/{dev}/brport/state");
    // 3 is BR_STATE_FORWARDING.
    while ns.exec(&["cat", &path]).trim() != "3" {
        assert!(Instant::now() < deadline, "{dev} not forwarding");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn get(c: &std::sync::atomic::AtomicU64) -> u64 {
    c.load(std::sync::atomic::Ordering::Relaxed)
}

fn udp_l4(src_port: u16, dst_port: u16, payload: &[u8], csum: Option<u16>) -> Vec<u8> {
    let len = (8 + payload.len()) as u16;
    let mut u = Vec::new();
    u.extend_from_slice(&src_port.to_be_bytes());
    u.extend_from_slice(&dst_port.to_be_bytes());
    u.extend_from_slice(&len.to_be_bytes());
    u.extend_from_slice(&csum.unwrap_or(0).to_be_bytes());
    u.extend_from_slice(payload);
    u
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 7 + i / 251) as u8).wrapping_add(seed))
        .collect()
}

impl Rig {
    /// A UDP socket in B bound to 10.200.0.2:`port`.
    fn peer_udp(&self, port: u16) -> UdpSocket {
        self.b.run(move || {
            let s = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::from(PEER_IP), port))
                .expect("bind in B");
            s.set_read_timeout(Some(Duration::from_secs(3)))
                .expect("timeout");
            s
        })
    }

    /// The guest transmits `hdr` + `frame` in one chain.
    fn guest_send(&self, hdr: [u8; 12], frame: &[u8]) {
        self.guest_send_on(0, hdr, frame);
    }

    /// The guest transmits `hdr` + `frame` on queue pair `pair`.
    fn guest_send_on(&self, pair: usize, hdr: [u8; 12], frame: &[u8]) {
        let m = &self.mem;
        let vq = MockSplitQueue::create(m, GuestAddress(TXQ), 16);
        m.write_slice(&hdr, GuestAddress(TXBUF)).expect("hdr");
        m.write_slice(frame, GuestAddress(TXBUF + 0x1000))
            .expect("frame");
        let descs = [
            RawDescriptor::from(SplitDescriptor::new(TXBUF, 12, 1, 1)),
            RawDescriptor::from(SplitDescriptor::new(
                TXBUF + 0x1000,
                frame.len() as u32,
                0,
                0,
            )),
        ];
        vq.add_desc_chains(&descs, 0).expect("chain");
        let mut q: Queue = vq.create_queue().expect("queue");
        self.dev.tx(pair, &mut q, m, &mut || {}).expect("tx");
        assert_eq!(vq.used().idx().load(), 1, "chain completed");
    }

    /// Posts RX buffers, then collects frames (header + frame bytes) until
    /// `done` is satisfied or 5 s pass.
    fn guest_receive(&self, done: impl Fn(&[Vec<u8>]) -> bool) -> Vec<Vec<u8>> {
        let m = &self.mem;
        let (count, size) = if self.mrg || !self.offloads {
            (128u16, 2048u32)
        } else {
            // Without MRG_RXBUF, guest TSO needs 64 KiB buffers per chain.
            (64, 65562)
        };
        let vq = MockSplitQueue::new(m, 256);
        let descs: Vec<RawDescriptor> = (0..count)
            .map(|i| {
                RawDescriptor::from(SplitDescriptor::new(
                    RXBUF + u64::from(i) * u64::from(size),
                    size,
                    VRING_DESC_F_WRITE as u16,
                    0,
                ))
            })
            .collect();
        vq.add_desc_chains(&descs, 0).expect("rx chains");
        let mut q: Queue = vq.create_queue().expect("queue");
        let mut frames = Vec::new();
        let mut seen = 0u16;
        let mut pending: Vec<u8> = Vec::new();
        let mut left = 0u16;
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done(&frames) && Instant::now() < deadline {
            self.dev.rx(0, &mut q, m, &mut || {}).expect("rx");
            while seen < vq.used().idx().load() {
                let e = vq.used().ring().ref_at(seen as usize).expect("used").load();
                seen += 1;
                let mut buf = vec![0u8; e.len() as usize];
                m.read_slice(
                    &mut buf,
                    GuestAddress(RXBUF + u64::from(e.id()) * u64::from(size)),
                )
                .expect("read buffer");
                if left == 0 {
                    left = u16::from_le_bytes([buf[10], buf[11]]);
                    assert!(
                        self.mrg || left == 1,
                        "num_buffers {left} without MRG_RXBUF"
                    );
                    assert!(left >= 1, "num_buffers 0");
                }
                pending.extend_from_slice(&buf);
                left -= 1;
                if left == 0 {
                    frames.push(std::mem::take(&mut pending));
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        frames
    }
}

/// Frames (after the 12-byte header) that are IPv4 with protocol `proto`.
fn ipv4_of(frames: &[Vec<u8>], proto: u8) -> Vec<&Vec<u8>> {
    frames
        .iter()
        .filter(|f| f.len() > 12 + 34 && f[12 + 12..12 + 14] == [8, 0] && f[12 + 23] == proto)
        .collect()
}

/// Checks the L4 checksum of an IPv4 frame (no virtio header).
fn l4_csum_ok(frame: &[u8]) -> bool {
    let ihl = usize::from(frame[14] & 0xf) * 4;
    let l4 = &frame[14 + ihl..];
    let mut src = [0u8; 4];
    let mut dst = [0u8; 4];
    src.copy_from_slice(&frame[26..30]);
    dst.copy_from_slice(&frame[30..34]);
    csum_fold(csum_add(pseudo_v4(src, dst, frame[23], l4.len()), l4)) == 0xffff
}

/// Completes a NEEDS_CSUM frame as a device would and checks the result.
fn partial_csum_ok(hdr: &[u8], frame: &[u8]) -> bool {
    let start = usize::from(u16::from_le_bytes([hdr[6], hdr[7]]));
    let off = usize::from(u16::from_le_bytes([hdr[8], hdr[9]]));
    let mut f = frame.to_vec();
    let c = !csum_fold(csum_add(0, &f[start..]));
    f[start + off..start + off + 2].copy_from_slice(&c.to_be_bytes());
    l4_csum_ok(&f)
}

fn tx_case(mrg: bool, offloads: bool, io: TapIo) {
    let r = rig(mrg, offloads, io);
    let sock = r.peer_udp(7000);
    let payload = pattern(1200, 1);
    let mut hdr = [0u8; 12];
    let frame = if offloads {
        // Checksum left to the host: NEEDS_CSUM with the pseudo-header sum.
        let l4 = udp_l4(5000, 7000, &payload, None);
        let mut f = ipv4_frame(r.peer_mac, GUEST_MAC, GUEST_IP, PEER_IP, 17, &l4);
        let seed = csum_fold(pseudo_v4(GUEST_IP, PEER_IP, 17, l4.len()));
        f[40..42].copy_from_slice(&seed.to_be_bytes());
        hdr[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
        hdr[6..8].copy_from_slice(&34u16.to_le_bytes());
        hdr[8..10].copy_from_slice(&6u16.to_le_bytes());
        f
    } else {
        let l4 = udp_l4(5000, 7000, &payload, None);
        let c = !csum_fold(csum_add(pseudo_v4(GUEST_IP, PEER_IP, 17, l4.len()), &l4));
        let l4 = udp_l4(5000, 7000, &payload, Some(c));
        ipv4_frame(r.peer_mac, GUEST_MAC, GUEST_IP, PEER_IP, 17, &l4)
    };
    r.guest_send(hdr, &frame);
    let mut buf = vec![0u8; 65536];
    let (n, from) = sock.recv_from(&mut buf).expect("the guest's datagram in B");
    assert_eq!(&buf[..n], &payload[..], "payload");
    assert_eq!(from.to_string(), "10.200.0.1:5000");
    if offloads {
        // UFO: one 8000-byte datagram, fragmented by the host.
        let big = pattern(8000, 9);
        let l4 = udp_l4(5001, 7000, &big, None);
        let mut f = ipv4_frame(r.peer_mac, GUEST_MAC, GUEST_IP, PEER_IP, 17, &l4);
        f[20] = 0; // no DF
        let seed = csum_fold(pseudo_v4(GUEST_IP, PEER_IP, 17, l4.len()));
        f[40..42].copy_from_slice(&seed.to_be_bytes());
        let mut h = [0u8; 12];
        h[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
        h[1] = VIRTIO_NET_HDR_GSO_UDP as u8;
        h[2..4].copy_from_slice(&42u16.to_le_bytes());
        h[4..6].copy_from_slice(&1480u16.to_le_bytes());
        h[6..8].copy_from_slice(&34u16.to_le_bytes());
        h[8..10].copy_from_slice(&6u16.to_le_bytes());
        // The IP checksum changed with DF: recompute.
        f[24..26].copy_from_slice(&[0, 0]);
        let c = !csum_fold(csum_add(0, &f[14..34]));
        f[24..26].copy_from_slice(&c.to_be_bytes());
        r.guest_send(h, &f);
        let (n, _) = sock.recv_from(&mut buf).expect("the UFO datagram in B");
        assert_eq!(n, big.len());
        assert_eq!(&buf[..n], &big[..], "UFO payload");
    }
    let s = &r.dev.stats[1];
    assert_eq!(get(&s.errors), 0);
    assert_eq!(get(&s.drops), 0);
    assert_eq!(get(&s.packets), if offloads { 2 } else { 1 });
}

fn rx_udp_case(mrg: bool, offloads: bool, io: TapIo) {
    let r = rig(mrg, offloads, io);
    let sock = r.peer_udp(7001);
    let payload = pattern(1400, 3);
    sock.send_to(&payload, "10.200.0.1:6000")
        .expect("send from B");
    let frames = r.guest_receive(|f| !ipv4_of(f, 17).is_empty());
    let udp = ipv4_of(&frames, 17);
    let f = udp.first().expect("the datagram reached the guest");
    let (hdr, frame) = f.split_at(12);
    assert_eq!(&frame[0..6], &GUEST_MAC, "to the guest's MAC");
    assert_eq!(&frame[6..12], &r.peer_mac);
    assert_eq!(&frame[42..], &payload[..], "payload intact");
    if offloads {
        assert!(
            hdr[0] & (VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID) as u8 != 0,
            "with GUEST_CSUM the host hands the checksum over: {hdr:?}"
        );
        if hdr[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM as u8 != 0 {
            assert!(partial_csum_ok(hdr, frame), "partial checksum completes");
        }
    } else {
        assert_eq!(hdr[0], 0, "no offload flags without GUEST_CSUM: {hdr:?}");
        assert!(l4_csum_ok(frame), "full UDP checksum without GUEST_CSUM");
    }
    assert_eq!(hdr[1], VIRTIO_NET_HDR_GSO_NONE as u8);
}

/// AF_PACKET socket in B on `vb` with virtio-net headers.
fn packet_socket(b: &Netns) -> (OwnedFd, i32) {
    b.run(|| {
        // SAFETY: plain socket(2).
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from((libc::ETH_P_ALL as u16).to_be()),
            )
        };
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `fd` was just created.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let one: libc::c_int = 1;
        // SAFETY: setsockopt reads one int.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                PACKET_VNET_HDR,
                (&one as *const libc::c_int).cast(),
                4,
            )
        };
        assert_eq!(r, 0, "PACKET_VNET_HDR");
        // SAFETY: NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(c"vb".as_ptr()) } as i32;
        assert!(ifindex > 0);
        (fd, ifindex)
    })
}

fn rx_gso_case(mrg: bool, offloads: bool, io: TapIo) {
    let r = rig(mrg, offloads, io);
    let (fd, ifindex) = packet_socket(&r.b);
    let payload = pattern(10000, 5);
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&5001u16.to_be_bytes());
    tcp[4..8].copy_from_slice(&1000u32.to_be_bytes());
    tcp[8..12].copy_from_slice(&1u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x18; // PSH, ACK
    tcp[14..16].copy_from_slice(&65535u16.to_be_bytes());
    tcp.extend_from_slice(&payload);
    let mut frame = ipv4_frame(GUEST_MAC, r.peer_mac, PEER_IP, GUEST_IP, 6, &tcp);
    let seed = csum_fold(pseudo_v4(PEER_IP, GUEST_IP, 6, tcp.len()));
    frame[50..52].copy_from_slice(&seed.to_be_bytes());
    // virtio_net_hdr (10 bytes) for AF_PACKET.
    let mut pkt = vec![0u8; 10];
    pkt[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
    pkt[1] = VIRTIO_NET_HDR_GSO_TCPV4 as u8;
    pkt[2..4].copy_from_slice(&54u16.to_le_bytes());
    pkt[4..6].copy_from_slice(&1400u16.to_le_bytes());
    pkt[6..8].copy_from_slice(&34u16.to_le_bytes());
    pkt[8..10].copy_from_slice(&16u16.to_le_bytes());
    pkt.extend_from_slice(&frame);
    // SAFETY: sockaddr_ll is plain old data.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_ifindex = ifindex;
    sll.sll_halen = 6;
    sll.sll_addr[..6].copy_from_slice(&GUEST_MAC);
    // SAFETY: sending from a live buffer to a valid sockaddr_ll.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            pkt.as_ptr().cast(),
            pkt.len(),
            0,
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(
        n,
        pkt.len() as isize,
        "inject: {}",
        std::io::Error::last_os_error()
    );
    let total = |f: &[Vec<u8>]| -> usize { ipv4_of(f, 6).iter().map(|x| x.len() - 12 - 54).sum() };
    let frames = r.guest_receive(|f| total(f) >= payload.len());
    let tcp_frames = ipv4_of(&frames, 6);
    assert_eq!(total(&frames), payload.len(), "all payload bytes arrived");
    let mut got = vec![0u8; payload.len()];
    for f in &tcp_frames {
        let (hdr, fr) = f.split_at(12);
        let seq = u32::from_be_bytes([fr[38], fr[39], fr[40], fr[41]]);
        let off = (seq - 1000) as usize;
        got[off..off + fr.len() - 54].copy_from_slice(&fr[54..]);
        if offloads {
            assert_eq!(hdr[1], VIRTIO_NET_HDR_GSO_TCPV4 as u8, "one GSO frame");
            assert_eq!(u16::from_le_bytes([hdr[4], hdr[5]]), 1400, "gso_size");
        } else {
            assert_eq!(hdr[1], VIRTIO_NET_HDR_GSO_NONE as u8);
            assert_eq!(hdr[0], 0);
            assert!(fr.len() <= 1514, "segmented to the MTU");
            assert!(l4_csum_ok(fr), "segment checksum valid");
        }
    }
    assert_eq!(got, payload, "TCP payload intact");
    if offloads {
        assert_eq!(tcp_frames.len(), 1, "delivered as one GSO frame");
        if mrg {
            assert!(
                tcp_frames[0].len() > 2048,
                "a 10 KiB frame spans several mergeable buffers"
            );
        }
    } else {
        assert_eq!(tcp_frames.len(), 8, "10000 bytes in 1400-byte segments");
    }
    let s = &r.dev.stats[0];
    assert_eq!((get(&s.drops), get(&s.errors)), (0, 0));
}

/// Many frames at once, so the io_uring path runs full batches (and the
/// sync path a long pass): the guest posts `n` TX chains of different
/// lengths and kicks once; every datagram reaches B intact and in order.
fn tx_burst_case(io: TapIo) {
    let r = rig(false, false, io);
    let sock = r.peer_udp(7003);
    let m = &r.mem;
    let n = 120u16;
    let vq = MockSplitQueue::new(m, 256);
    let mut descs = Vec::new();
    let mut payloads = Vec::new();
    for i in 0..n {
        let payload = pattern(1 + usize::from(i) * 7, i as u8);
        let l4 = udp_l4(5003, 7003, &payload, None);
        let f = ipv4_frame(r.peer_mac, GUEST_MAC, GUEST_IP, PEER_IP, 17, &l4);
        let at = TXBUF + u64::from(i) * 0x1000;
        // Header and frame in one buffer, then split over two descriptors
        // at an odd offset.
        let mut chain = vec![0u8; 12];
        chain.extend_from_slice(&f);
        m.write_slice(&chain, GuestAddress(at)).expect("chain");
        let cut = 7 + u32::from(i % 20);
        descs.push(RawDescriptor::from(SplitDescriptor::new(
            at,
            cut,
            1,
            2 * i + 1,
        )));
        descs.push(RawDescriptor::from(SplitDescriptor::new(
            at + u64::from(cut),
            chain.len() as u32 - cut,
            0,
            0,
        )));
        payloads.push(payload);
    }
    // Last, a frame over the MTU (no TSO negotiated): dropped, counted as
    // too large, and its chain completed.
    let big = TXBUF + u64::from(n) * 0x1000;
    m.write_slice(&[0u8; 12 + 3000], GuestAddress(big))
        .expect("big chain");
    descs.push(RawDescriptor::from(SplitDescriptor::new(
        big,
        12 + 3000,
        0,
        0,
    )));
    vq.add_desc_chains(&descs, 0).expect("chains");
    let mut q: Queue = vq.create_queue().expect("queue");
    let mut signals = 0;
    r.dev.tx(0, &mut q, m, &mut || signals += 1).expect("tx");
    assert_eq!(vq.used().idx().load(), n + 1, "every chain completed");
    assert!(signals >= 1, "the driver was notified");
    let mut buf = vec![0u8; 65536];
    for (i, p) in payloads.iter().enumerate() {
        let (len, _) = sock.recv_from(&mut buf).expect("datagram in B");
        assert_eq!(&buf[..len], &p[..], "datagram {i}");
    }
    let s = &r.dev.stats[1];
    assert_eq!((get(&s.errors), get(&s.drops)), (0, 1));
    let too_large = vhost_user_net::stats::DropReason::TooLarge as usize;
    assert_eq!(get(&s.drop_reasons[too_large]), 1, "dropped as too large");
    assert_eq!(get(&s.packets), u64::from(n));
}

/// Many frames queued on the tap before the guest's RX queue runs: all of
/// them land in guest buffers intact, in the order they were sent, each in
/// one chain with num_buffers 1 (the io_uring path reads batches; with
/// MRG_RXBUF and buffers that hold a whole frame it stays on that path).
fn rx_burst_case(mrg: bool, io: TapIo) {
    let r = rig(mrg, false, io);
    let sock = r.peer_udp(7004);
    let n = 100usize;
    let payloads: Vec<Vec<u8>> = (0..n).map(|i| pattern(1 + i * 13, i as u8)).collect();
    for p in &payloads {
        sock.send_to(p, "10.200.0.1:6004").expect("send from B");
    }
    let frames = r.guest_receive(|f| {
        ipv4_of(f, 17)
            .iter()
            .filter(|x| x.len() > 12 + 36 && x[12 + 36..12 + 38] == 6004u16.to_be_bytes())
            .count()
            >= n
    });
    let ours: Vec<&Vec<u8>> = ipv4_of(&frames, 17)
        .into_iter()
        .filter(|x| x.len() > 12 + 36 && x[12 + 36..12 + 38] == 6004u16.to_be_bytes())
        .collect();
    assert_eq!(ours.len(), n, "every datagram reached the guest");
    for (i, (f, p)) in ours.iter().zip(&payloads).enumerate() {
        let frame = &f[12..];
        assert_eq!(&frame[42..], &p[..], "datagram {i} intact and in order");
        assert!(l4_csum_ok(frame), "datagram {i} checksum");
        assert_eq!(u16::from_le_bytes([f[10], f[11]]), 1, "num_buffers");
    }
    let s = &r.dev.stats[0];
    assert_eq!((get(&s.drops), get(&s.errors)), (0, 0));
}

macro_rules! matrix {
    ($($name:ident: $f:ident($mrg:expr, $off:expr, $io:ident);)*) => {
        $(#[test] fn $name() { $f($mrg, $off, TapIo::$io) })*
    };
}

matrix! {
    tx_offloads_mrg: tx_case(true, true, Uring);
    tx_plain: tx_case(false, false, Uring);
    rx_udp_offloads_mrg: rx_udp_case(true, true, Uring);
    rx_udp_offloads_no_mrg: rx_udp_case(false, true, Uring);
    rx_udp_plain_mrg: rx_udp_case(true, false, Uring);
    rx_udp_plain_no_mrg: rx_udp_case(false, false, Uring);
    rx_tso_mrg: rx_gso_case(true, true, Uring);
    rx_tso_no_mrg: rx_gso_case(false, true, Uring);
    rx_segmented_mrg: rx_gso_case(true, false, Uring);
    rx_segmented_no_mrg: rx_gso_case(false, false, Uring);
    tx_offloads_mrg_sync: tx_case(true, true, Sync);
    tx_plain_sync: tx_case(false, false, Sync);
    rx_udp_offloads_mrg_sync: rx_udp_case(true, true, Sync);
    rx_udp_offloads_no_mrg_sync: rx_udp_case(false, true, Sync);
    rx_udp_plain_mrg_sync: rx_udp_case(true, false, Sync);
    rx_udp_plain_no_mrg_sync: rx_udp_case(false, false, Sync);
    rx_tso_mrg_sync: rx_gso_case(true, true, Sync);
    rx_tso_no_mrg_sync: rx_gso_case(false, true, Sync);
    rx_segmented_mrg_sync: rx_gso_case(true, false, Sync);
    rx_segmented_no_mrg_sync: rx_gso_case(false, false, Sync);
}

#[test]
fn tx_burst_uring() {
    tx_burst_case(TapIo::Uring)
}

#[test]
fn tx_burst_sync() {
    tx_burst_case(TapIo::Sync)
}

#[test]
fn rx_burst_uring_mrg() {
    rx_burst_case(true, TapIo::Uring)
}

#[test]
fn rx_burst_uring_no_mrg() {
    rx_burst_case(false, TapIo::Uring)
}

#[test]
fn rx_burst_sync() {
    rx_burst_case(true, TapIo::Sync)
}

/// Two queue pairs (one tap queue each). While the driver has started only
/// pair 0, the second tap queue is detached and every flow from B reaches
/// pair 0; once pair 1 starts, both TX queues reach B and flows are spread
/// over both RX queues, every datagram intact.
#[test]
fn two_queue_pairs() {
    let r = rig_pairs(true, true, 2, TapIo::Uring);
    assert_eq!(r.dev.tap().queues(), 2);
    let m = &r.mem;
    let size = 2048u64;
    let queues: Vec<MockSplitQueue<GuestMemoryMmap>> = (0..2u64)
        .map(|p| MockSplitQueue::create(m, GuestAddress(0x2_0000 + p * 0x1_0000), 256))
        .collect();
    let mut qs: Vec<Queue> = Vec::new();
    for (p, vq) in queues.iter().enumerate() {
        let descs: Vec<RawDescriptor> = (0..128u64)
            .map(|i| {
                RawDescriptor::from(SplitDescriptor::new(
                    RXBUF + (p as u64 * 128 + i) * size,
                    size as u32,
                    VRING_DESC_F_WRITE as u16,
                    0,
                ))
            })
            .collect();
        vq.add_desc_chains(&descs, 0).expect("chains");
        qs.push(vq.create_queue().expect("queue"));
    }
    let senders: Vec<UdpSocket> = (0..64u16)
        .map(|i| {
            r.b.run(move || {
                UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::from(PEER_IP), 20000 + i))
                    .expect("bind")
            })
        })
        .collect();
    let mut seen = [0u16; 2];
    // Sends from flows `flows` and returns how many arrived on each pair.
    let mut receive = |flows: std::ops::Range<usize>| -> [usize; 2] {
        for i in flows.clone() {
            senders[i]
                .send_to(&pattern(300, i as u8), "10.200.0.1:6000")
                .expect("send");
        }
        let mut got = vec![None; 64];
        let mut per_pair = [0usize; 2];
        let deadline = Instant::now() + Duration::from_secs(5);
        while flows.clone().any(|i| got[i].is_none()) && Instant::now() < deadline {
            for p in 0..2 {
                r.dev.rx(p, &mut qs[p], m, &mut || {}).expect("rx");
                while seen[p] < queues[p].used().idx().load() {
                    let e = queues[p]
                        .used()
                        .ring()
                        .ref_at(seen[p] as usize)
                        .expect("used")
                        .load();
                    seen[p] += 1;
                    let mut buf = vec![0u8; e.len() as usize];
                    let addr = RXBUF + u64::from(e.id()) * size + p as u64 * 128 * size;
                    m.read_slice(&mut buf, GuestAddress(addr)).expect("buffer");
                    let f = &buf[12..];
                    if f.len() < 42 || f[12..14] != [8, 0] || f[23] != 17 {
                        continue;
                    }
                    let i = usize::from(u16::from_be_bytes([f[34], f[35]]) - 20000);
                    assert_eq!(&f[42..], &pattern(300, i as u8)[..], "flow {i} payload");
                    got[i] = Some(p);
                    per_pair[p] += 1;
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(
            flows.clone().all(|i| got[i].is_some()),
            "datagrams missing: {got:?}"
        );
        per_pair
    };
    assert_eq!(receive(0..32), [32, 0], "only pair 0 started: all on it");
    // What the adapter does when the driver starts the second pair.
    r.dev.start_pair(1);
    let spread = receive(32..64);
    assert!(
        spread[0] > 0 && spread[1] > 0,
        "32 flows all on one queue: {spread:?}"
    );
    let sock = r.peer_udp(7003);
    for pair in 0..2 {
        let payload = pattern(500, pair as u8);
        let l4 = udp_l4(5000 + pair as u16, 7003, &payload, None);
        let c = !csum_fold(csum_add(pseudo_v4(GUEST_IP, PEER_IP, 17, l4.len()), &l4));
        let l4 = udp_l4(5000 + pair as u16, 7003, &payload, Some(c));
        let f = ipv4_frame(r.peer_mac, GUEST_MAC, GUEST_IP, PEER_IP, 17, &l4);
        r.guest_send_on(pair, [0u8; 12], &f);
        let mut buf = vec![0u8; 2048];
        let (n, from) = sock.recv_from(&mut buf).expect("datagram from the pair");
        assert_eq!(&buf[..n], &payload[..], "pair {pair}");
        assert_eq!(from.port(), 5000 + pair as u16);
        assert_eq!(
            get(&r.dev.stats[2 * pair + 1].packets),
            1,
            "TX counter of pair {pair}"
        );
    }
}

/// The daemon's own setup over netlink: bridge created, tap attached, MTU
/// and host address set, tap down until the driver starts, then up, and
/// down again on disconnect while staying on the bridge.
#[test]
fn setup_and_link_state_over_netlink() {
    let a = Netns::new("neta");
    let cfg = Config {
        daemon: DaemonConfig {
            listen: Listen::Fd(-1),
            control_socket: None,
            metrics: Vec::new(),
            seccomp: "off".parse().expect("mode"),
            user: None,
            socket_mode: None,
        },
        tap: "obtap%d".into(),
        bridge: Some("obbr1".into()),
        create_bridge: true,
        mac: Some(GUEST_MAC),
        mtu: 1400,
        queue_pairs: 2,
        queue_size: 256,
        offloads: Offloads::default(),
        tap_io: TapIo::default(),
        poll_us: 50,
        ip: Some(("10.203.0.1".parse().expect("ip"), 24)),
    };
    let dev = a.run(move || vhost_user_net::setup(&cfg).expect("setup"));
    let name = dev.tap().name().to_string();
    assert_eq!(name, "obtap0", "the kernel picked the number");
    let show = |a: &Netns| -> serde_json::Value {
        let out = a.exec(&["ip", "-j", "-d", "addr", "show", "dev", "obtap0"]);
        serde_json::from_str::<serde_json::Value>(&out).expect("ip -j")[0].clone()
    };
    let link = show(&a);
    assert_eq!(link["mtu"], 1400);
    assert_eq!(link["master"], "obbr1");
    assert_eq!(link["linkinfo"]["info_kind"], "tun");
    assert!(
        link["addr_info"]
            .as_array()
            .expect("addresses")
            .iter()
            .any(|x| x["local"] == "10.203.0.1" && x["prefixlen"] == 24),
        "{link}"
    );
    let flag = |l: &serde_json::Value, f: &str| {
        l["flags"].as_array().expect("flags").iter().any(|x| x == f)
    };
    // Administratively up; the carrier (operstate) follows the driver.
    assert!(flag(&link, "UP"), "{link}");
    assert!(
        flag(&link, "NO-CARRIER") && link["operstate"] == "DOWN",
        "down until a driver starts the queues: {link}"
    );
    dev.start();
    let link = show(&a);
    assert!(
        flag(&link, "LOWER_UP") && link["operstate"] == "UP",
        "up once the queues started: {link}"
    );
    // `ctl link down|up`: carrier and the config space's link status
    // follow; no frontend channel, so nobody to notify.
    let status = |d: &NetDevice| u16::from_le_bytes([d.config()[6], d.config()[7]]);
    assert_eq!(status(&dev), VIRTIO_NET_S_LINK_UP as u16);
    assert!(!dev.set_link(false).expect("link down"), "nobody notified");
    assert_eq!(status(&dev), 0, "config status without LINK_UP");
    let link = show(&a);
    assert!(flag(&link, "NO-CARRIER"), "carrier off while down: {link}");
    assert!(dev.link_up(), "the driver still runs the queues");
    // A driver restarting the queues does not bring an administratively
    // down link up.
    dev.start();
    assert!(flag(&show(&a), "NO-CARRIER"));
    dev.set_link(true).expect("link up");
    assert_eq!(status(&dev), VIRTIO_NET_S_LINK_UP as u16);
    let link = show(&a);
    assert!(flag(&link, "LOWER_UP"), "carrier back: {link}");
    dev.stop();
    let link = show(&a);
    assert!(
        flag(&link, "NO-CARRIER") && link["operstate"] == "DOWN",
        "down after the frontend left: {link}"
    );
    assert_eq!(link["master"], "obbr1", "still on the bridge");
    // Created by us: persistent and tagged with the guest MAC.
    let alias = link["ifalias"].as_str().unwrap_or_default().to_string();
    assert_eq!(alias, "outboard-vhost-user-net mac=52:54:00:12:34:56");
    let details = a.exec(&["ip", "-d", "link", "show", "dev", "obtap0"]);
    assert!(details.contains("persist on"), "{details}");
}
