//! The RX and TX engines driven through `MockSplitQueue` chains over mock
//! guest memory, with a datagram socketpair standing in for the tap (one
//! datagram = one vnet header + frame, as a tap read/write): frames in both
//! directions, mergeable buffers, and malformed chains, oversized frames and
//! empty rings (each followed by a valid frame to show the queue keeps
//! serving).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use vhost_user_net::rx::{Rx, RxStop};
use vhost_user_net::stats::QueueStats;
use vhost_user_net::tx::Tx;
use vhost_user_net::virtio::Negotiated;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: u64 = 8 << 20;
const BUF: u64 = 0x10_0000;
const R: u16 = 0;
const W: u16 = VRING_DESC_F_WRITE as u16;
const MTU: u16 = 1500;
const Q: u16 = 64;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).expect("guest memory")
}

/// A datagram socketpair: (device end, test end).
fn fake_tap() -> (OwnedFd, OwnedFd) {
    let mut fds = [0i32; 2];
    // SAFETY: socketpair writes two fds into the array.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0, "socketpair");
    // SAFETY: both fds were just created and are owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

fn send(fd: RawFd, data: &[u8]) {
    // SAFETY: sending from a live slice.
    let n = unsafe { libc::send(fd, data.as_ptr().cast(), data.len(), 0) };
    assert_eq!(n, data.len() as isize, "send to the fake tap");
}

fn recv(fd: RawFd) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 70000];
    // SAFETY: receiving into a live buffer of its length.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    if n < 0 {
        return None;
    }
    buf.truncate(n as usize);
    Some(buf)
}

/// Writes chains into the descriptor table from index `*next` on and makes
/// them available.
fn add_chains(vq: &MockSplitQueue<GuestMemoryMmap>, next: &mut u16, chains: &[&[(u64, u32, u16)]]) {
    let start = *next;
    let mut descs = Vec::new();
    for chain in chains {
        for (i, &(a, l, f)) in chain.iter().enumerate() {
            let idx = *next;
            *next += 1;
            let flags = if i + 1 < chain.len() {
                f | VRING_DESC_F_NEXT as u16
            } else {
                f
            };
            descs.push(RawDescriptor::from(SplitDescriptor::new(
                a,
                l,
                flags,
                idx + 1,
            )));
        }
    }
    vq.add_desc_chains(&descs, start).expect("chains");
}

fn used(vq: &MockSplitQueue<GuestMemoryMmap>, i: usize) -> (u32, u32) {
    let e = vq.used().ring().ref_at(i).expect("used").load();
    (e.id(), e.len())
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
        .collect()
}

fn v1(extra: u64) -> u64 {
    (1 << VIRTIO_F_VERSION_1) | extra
}

const MRG: u64 = 1 << VIRTIO_NET_F_MRG_RXBUF;

fn get(c: &std::sync::atomic::AtomicU64) -> u64 {
    c.load(std::sync::atomic::Ordering::Relaxed)
}

fn tx_run(tx: &mut Tx, q: &mut Queue, m: &GuestMemoryMmap, fd: RawFd, s: &QueueStats) -> usize {
    let mut signals = 0;
    tx.process(q, m, fd, s, &mut || signals += 1).expect("tx");
    signals
}

fn rx_run(rx: &mut Rx, q: &mut Queue, m: &GuestMemoryMmap, fd: RawFd, s: &QueueStats) -> RxStop {
    rx.process(q, m, fd, s, &mut || {}).expect("rx")
}

#[test]
fn tx_writes_header_and_frame_from_a_split_chain() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, Q);
    let (dev, test) = fake_tap();
    let hdr: Vec<u8> = vec![1, 0, 0, 0, 0, 0, 34, 0, 16, 0, 0, 0];
    let f = frame(1000, 7);
    m.write_slice(&hdr, GuestAddress(BUF)).expect("hdr");
    m.write_slice(&f[..300], GuestAddress(BUF + 0x1000))
        .expect("f1");
    m.write_slice(&f[300..], GuestAddress(BUF + 0x2000))
        .expect("f2");
    let mut n = 0;
    add_chains(
        &vq,
        &mut n,
        &[&[(BUF, 12, R), (BUF + 0x1000, 300, R), (BUF + 0x2000, 700, R)]],
    );
    let mut q: Queue = vq.create_queue().expect("queue");
    let mut tx = Tx::new(Negotiated::new(v1(0), MTU));
    let s = QueueStats::default();
    let signals = tx_run(&mut tx, &mut q, &m, dev.as_raw_fd(), &s);
    let got = recv(test.as_raw_fd()).expect("a datagram on the tap");
    assert_eq!(&got[..12], &hdr[..], "virtio-net header passed through");
    assert_eq!(&got[12..], &f[..], "frame bytes");
    assert_eq!(vq.used().idx().load(), 1);
    assert_eq!(used(&vq, 0), (0, 0));
    assert!(signals > 0, "the driver was notified");
    assert_eq!((get(&s.packets), get(&s.bytes)), (1, 1000));
    assert_eq!((get(&s.drops), get(&s.errors)), (0, 0));
}

#[test]
fn tx_drops_malformed_and_oversized_chains_and_keeps_serving() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, Q);
    let (dev, test) = fake_tap();
    let f = frame(100, 1);
    m.write_slice(&f, GuestAddress(BUF + 12)).expect("frame");
    let mut n = 0;
    add_chains(
        &vq,
        &mut n,
        &[
            // A device-writable descriptor on the TX ring.
            &[(BUF, 12, R), (BUF + 12, 100, W)],
            // Shorter than the header.
            &[(BUF, 8, R)],
            // Outside guest memory.
            &[(BUF, 12, R), (MEM - 10, 100, R)],
            // Larger than MTU + Ethernet header without HOST_TSO/UFO.
            &[(BUF, 12, R), (BUF + 12, 1500 + 18 + 1, R)],
            // Valid.
            &[(BUF, 12, R), (BUF + 12, 100, R)],
        ],
    );
    let mut q: Queue = vq.create_queue().expect("queue");
    let mut tx = Tx::new(Negotiated::new(v1(0), MTU));
    let s = QueueStats::default();
    tx_run(&mut tx, &mut q, &m, dev.as_raw_fd(), &s);
    assert_eq!(vq.used().idx().load(), 5, "every chain returned");
    let got = recv(test.as_raw_fd()).expect("the valid frame");
    assert_eq!(&got[12..], &f[..]);
    assert!(
        recv(test.as_raw_fd()).is_none(),
        "only the valid frame reached the tap"
    );
    assert_eq!(get(&s.errors), 3);
    assert_eq!(get(&s.drops), 1);
    assert_eq!(get(&s.packets), 1);
    // With HOST_TSO4 acked the same large frame is accepted.
    let mut tx = Tx::new(Negotiated::new(
        v1((1 << VIRTIO_NET_F_CSUM) | (1 << VIRTIO_NET_F_HOST_TSO4)),
        MTU,
    ));
    add_chains(&vq, &mut n, &[&[(BUF, 12, R), (BUF + 12, 20000, R)]]);
    tx_run(&mut tx, &mut q, &m, dev.as_raw_fd(), &s);
    assert_eq!(recv(test.as_raw_fd()).map(|d| d.len()), Some(20012));
}

#[test]
fn rx_without_mrg_fills_one_chain_and_sets_num_buffers() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, Q);
    let (dev, test) = fake_tap();
    let mut n = 0;
    add_chains(
        &vq,
        &mut n,
        &[
            &[(BUF, 12, W), (BUF + 0x1000, 2048, W)],
            &[(BUF + 0x2000, 2060, W)],
        ],
    );
    m.write_slice(&[0xee; 12], GuestAddress(BUF))
        .expect("poison");
    let mut q: Queue = vq.create_queue().expect("queue");
    let mut rx = Rx::new(Negotiated::new(v1(0), MTU), MTU);
    let s = QueueStats::default();
    let mut pkt = vec![0u8; 10];
    let f = frame(1400, 9);
    pkt.extend_from_slice(&[0xaa, 0xbb]); // what the tap leaves in num_buffers
    pkt.extend_from_slice(&f);
    send(test.as_raw_fd(), &pkt);
    assert_eq!(
        rx_run(&mut rx, &mut q, &m, dev.as_raw_fd(), &s),
        RxStop::TapEmpty
    );
    assert_eq!(vq.used().idx().load(), 1);
    assert_eq!(used(&vq, 0), (0, 1412));
    let mut hdr = [0u8; 12];
    m.read_slice(&mut hdr, GuestAddress(BUF)).expect("hdr");
    assert_eq!(u16::from_le_bytes([hdr[10], hdr[11]]), 1, "num_buffers");
    let mut got = vec![0u8; 1400];
    m.read_slice(&mut got, GuestAddress(BUF + 0x1000))
        .expect("frame");
    assert_eq!(got, f);
    // The second chain was popped and given back: it is the next one used.
    assert_eq!(q.next_avail(), 1, "unused chain returned to the ring");
    send(test.as_raw_fd(), &pkt[..112]);
    rx_run(&mut rx, &mut q, &m, dev.as_raw_fd(), &s);
    assert_eq!(used(&vq, 1), (2, 112));
    assert_eq!((get(&s.packets), get(&s.bytes)), (2, 1500));
}

#[test]
fn rx_with_mrg_spreads_a_frame_over_chains() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, Q);
    let (dev, test) = fake_tap();
    let mut n = 0;
    // Sixteen 256-byte chains (4 KiB: room for two full-size frames).
    let chains: Vec<[(u64, u32, u16); 1]> =
        (0..16u64).map(|i| [(BUF + i * 0x1000, 256, W)]).collect();
    let refs: Vec<&[(u64, u32, u16)]> = chains.iter().map(|c| &c[..]).collect();
    add_chains(&vq, &mut n, &refs);
    let mut q: Queue = vq.create_queue().expect("queue");
    let mut rx = Rx::new(Negotiated::new(v1(MRG), MTU), MTU);
    let s = QueueStats::default();
    let f = frame(1000, 3);
    let mut pkt = vec![0u8; 12];
    pkt.extend_from_slice(&f);
    send(test.as_raw_fd(), &pkt);
    assert_eq!(
        rx_run(&mut rx, &mut q, &m, dev.as_raw_fd(), &s),
        RxStop::TapEmpty
    );
    assert_eq!(
        vq.used().idx().load(),
        4,
        "1012 bytes need four 256-byte buffers"
    );
    let lens: Vec<(u32, u32)> = (0..4).map(|i| used(&vq, i)).collect();
    assert_eq!(lens, vec![(0, 256), (1, 256), (2, 256), (3, 244)]);
    let mut hdr = [0u8; 12];
    m.read_slice(&mut hdr, GuestAddress(BUF)).expect("hdr");
    assert_eq!(u16::from_le_bytes([hdr[10], hdr[11]]), 4, "num_buffers");
    let mut got = Vec::new();
    for (i, &(_, len)) in lens.iter().enumerate() {
        let mut b = vec![0u8; len as usize];
        m.read_slice(&mut b, GuestAddress(BUF + i as u64 * 0x1000))
            .expect("buf");
        got.extend_from_slice(&b);
    }
    assert_eq!(&got[12..], &f[..], "frame intact across buffers");
    assert_eq!(q.next_avail(), 4, "popped but unused chains returned");
    // Two more frames in one pass: 60 bytes (one buffer) then 600 (three).
    send(test.as_raw_fd(), &pkt[..72]);
    send(test.as_raw_fd(), &pkt[..612]);
    rx_run(&mut rx, &mut q, &m, dev.as_raw_fd(), &s);
    assert_eq!(vq.used().idx().load(), 8);
    assert_eq!(used(&vq, 4), (4, 72));
    assert_eq!(used(&vq, 7), (7, 612 - 512));
    m.read_slice(&mut hdr, GuestAddress(BUF + 5 * 0x1000))
        .expect("hdr");
    assert_eq!(u16::from_le_bytes([hdr[10], hdr[11]]), 3);
    assert_eq!(get(&s.packets), 3);
}

#[test]
fn rx_drops_oversized_frames_and_completes_malformed_chains() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, Q);
    let (dev, test) = fake_tap();
    let mut n = 0;
    add_chains(
        &vq,
        &mut n,
        &[
            // Device-readable: not an RX buffer.
            &[(BUF, 512, R)],
            // Too small for the header.
            &[(BUF + 0x1000, 8, W)],
            &[(BUF + 0x2000, 512, W)],
        ],
    );
    let mut q: Queue = vq.create_queue().expect("queue");
    let mut rx = Rx::new(Negotiated::new(v1(0), MTU), MTU);
    let s = QueueStats::default();
    let big = vec![0u8; 12 + 1000];
    send(test.as_raw_fd(), &big);
    let small: Vec<u8> = frame(112, 4);
    send(test.as_raw_fd(), &small);
    rx_run(&mut rx, &mut q, &m, dev.as_raw_fd(), &s);
    assert_eq!(vq.used().idx().load(), 3);
    assert_eq!(used(&vq, 0), (0, 0), "malformed chain returned empty");
    assert_eq!(used(&vq, 1), (1, 0), "malformed chain returned empty");
    assert_eq!(used(&vq, 2), (2, 112), "the next frame that fits");
    let mut got = vec![0u8; 100];
    m.read_slice(&mut got, GuestAddress(BUF + 0x2000 + 12))
        .expect("frame");
    assert_eq!(&got[..], &small[12..]);
    assert_eq!(get(&s.errors), 2);
    assert_eq!(
        get(&s.drops),
        1,
        "the 1000-byte frame did not fit 512 bytes"
    );
    assert_eq!(get(&s.packets), 1);
}

#[test]
fn rx_waits_for_buffers_without_losing_the_frame() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, Q);
    let (dev, test) = fake_tap();
    let mut q: Queue = vq.create_queue().expect("queue");
    let mut rx = Rx::new(Negotiated::new(v1(MRG), MTU), MTU);
    let s = QueueStats::default();
    let pkt = frame(12 + 800, 5);
    send(test.as_raw_fd(), &pkt);
    assert_eq!(
        rx_run(&mut rx, &mut q, &m, dev.as_raw_fd(), &s),
        RxStop::NoBuffers
    );
    let mut n = 0;
    // Less than an MTU-sized frame: still waiting, nothing consumed.
    add_chains(&vq, &mut n, &[&[(BUF, 1024, W)]]);
    assert_eq!(
        rx_run(&mut rx, &mut q, &m, dev.as_raw_fd(), &s),
        RxStop::NoBuffers
    );
    assert_eq!(vq.used().idx().load(), 0);
    assert_eq!(q.next_avail(), 0, "the short chain went back to the ring");
    add_chains(&vq, &mut n, &[&[(BUF + 0x1000, 1024, W)]]);
    // Now 2 KiB: the frame goes into the first buffer (the pass then ends
    // waiting for buffers again, since 1 KiB is left).
    rx_run(&mut rx, &mut q, &m, dev.as_raw_fd(), &s);
    assert_eq!(vq.used().idx().load(), 1);
    assert_eq!(used(&vq, 0), (0, 812));
    let mut got = vec![0u8; 800];
    m.read_slice(&mut got, GuestAddress(BUF + 12))
        .expect("frame");
    assert_eq!(&got[..], &pkt[12..]);
    assert_eq!((get(&s.drops), get(&s.errors)), (0, 0));
}

/// Runs one engine pass on a helper thread (with its own handle on the
/// guest memory) and fails if it does not return within 5 s: a hostile
/// ring must not spin an engine forever. Returns the queue and the result.
fn pass_within_5s(
    m: &GuestMemoryMmap,
    q: Queue,
    fd: RawFd,
    rx: bool,
    s: &std::sync::Arc<QueueStats>,
) -> (Queue, Result<(), String>) {
    let (tx, done) = std::sync::mpsc::channel();
    let (m, s) = (m.clone(), s.clone());
    std::thread::spawn(move || {
        let mut q = q;
        let cfg = Negotiated::new(v1(0), MTU);
        let r = if rx {
            Rx::new(cfg, MTU)
                .process(&mut q, &m, fd, &s, &mut || {})
                .map(|_| ())
                .map_err(|e| e.to_string())
        } else {
            Tx::new(cfg)
                .process(&mut q, &m, fd, &s, &mut || {})
                .map_err(|e| e.to_string())
        };
        let _ = tx.send((q, r));
    });
    done.recv_timeout(std::time::Duration::from_secs(5))
        .expect("the engine returned (no endless loop)")
}

const IND: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16;
const NX: u16 = VRING_DESC_F_NEXT as u16;

/// Writes raw descriptors into the table (index order) and makes `heads`
/// available.
fn raw_ring(vq: &MockSplitQueue<GuestMemoryMmap>, descs: &[(u64, u32, u16, u16)], heads: &[u16]) {
    for (i, &(a, l, f, n)) in descs.iter().enumerate() {
        let d = RawDescriptor::from(SplitDescriptor::new(a, l, f, n));
        vq.desc_table().store(i as u16, d).expect("descriptor");
    }
    for (i, &h) in heads.iter().enumerate() {
        vq.avail().ring().ref_at(i).expect("avail").store(h.to_le());
    }
    vq.avail().idx().store((heads.len() as u16).to_le());
}

/// Descriptor loops (to itself, back to the head), a next index past the
/// table, a gigantic length, an indirect table outside memory and a nested
/// indirect table on the TX ring: each chain is returned and counted as an
/// error, nothing reaches the tap, and the valid chain after them does.
#[test]
fn tx_hostile_chains_are_counted_and_the_queue_keeps_serving() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, Q);
    let (dev, test) = fake_tap();
    let f = frame(100, 3);
    m.write_slice(&f, GuestAddress(BUF + 12)).expect("frame");
    let ind = BUF + 0x8000;
    // A nested indirect table: its only entry is indirect again.
    m.write_obj(
        RawDescriptor::from(SplitDescriptor::new(ind, 16, IND, 0)),
        GuestAddress(ind),
    )
    .expect("indirect entry");
    raw_ring(
        &vq,
        &[
            // 0: loops on itself.
            (BUF, 12, NX, 0),
            // 1-2: 2 -> 1 -> 2 ...
            (BUF, 12, NX, 2),
            (BUF + 12, 100, NX, 1),
            // 3: next index past the table.
            (BUF, 12, NX, 60000),
            // 4-5: header, then 4 GiB - 1.
            (BUF, 12, NX, 5),
            (BUF + 12, u32::MAX, R, 0),
            // 6: indirect table outside guest memory.
            (MEM + 0x1000, 32, IND, 0),
            // 7: indirect table whose entry is indirect.
            (ind, 16, IND, 0),
            // 8-9: valid.
            (BUF, 12, NX, 9),
            (BUF + 12, 100, R, 0),
        ],
        &[0, 1, 3, 4, 6, 7, 8],
    );
    let q: Queue = vq.create_queue().expect("queue");
    let s = std::sync::Arc::new(QueueStats::default());
    let (_, r) = pass_within_5s(&m, q, dev.as_raw_fd(), false, &s);
    r.expect("tx pass");
    assert_eq!(vq.used().idx().load(), 7, "every chain returned");
    let got = recv(test.as_raw_fd()).expect("the valid frame");
    assert_eq!(&got[12..], &f[..]);
    assert!(recv(test.as_raw_fd()).is_none(), "nothing else on the tap");
    assert_eq!(get(&s.errors), 6, "six hostile chains counted");
    assert_eq!(get(&s.packets), 1);
}

/// The same hostile chains on the RX ring: completed empty and counted,
/// and the frame waiting on the tap lands in the valid chain after them.
#[test]
fn rx_hostile_chains_are_counted_and_the_queue_keeps_serving() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, Q);
    let (dev, test) = fake_tap();
    let ind = BUF + 0x8000;
    m.write_obj(
        RawDescriptor::from(SplitDescriptor::new(ind, 16, IND, 0)),
        GuestAddress(ind),
    )
    .expect("indirect entry");
    raw_ring(
        &vq,
        &[
            (BUF, 2048, W | NX, 0),
            (BUF, 1024, W | NX, 2),
            (BUF + 0x1000, 1024, W | NX, 1),
            (BUF, 2048, W | NX, 60000),
            (BUF, 12, W | NX, 5),
            (BUF + 0x1000, u32::MAX, W, 0),
            (MEM + 0x1000, 32, IND, 0),
            (ind, 16, IND, 0),
            (BUF + 0x4000, 2048, W, 0),
        ],
        &[0, 1, 3, 4, 6, 7, 8],
    );
    let pkt = frame(12 + 700, 8);
    send(test.as_raw_fd(), &pkt);
    let q: Queue = vq.create_queue().expect("queue");
    let s = std::sync::Arc::new(QueueStats::default());
    let (_, r) = pass_within_5s(&m, q, dev.as_raw_fd(), true, &s);
    r.expect("rx pass");
    assert_eq!(vq.used().idx().load(), 7, "every chain completed");
    for i in 0..6 {
        assert_eq!(used(&vq, i).1, 0, "hostile chain {i} completed empty");
    }
    assert_eq!(used(&vq, 6), (8, 712), "the frame in the valid chain");
    let mut got = vec![0u8; 700];
    m.read_slice(&mut got, GuestAddress(BUF + 0x4000 + 12))
        .expect("frame");
    assert_eq!(&got[..], &pkt[12..]);
    assert_eq!(get(&s.errors), 6);
    assert_eq!(get(&s.packets), 1);
}

/// An available index more than a queue size ahead (a driver bug or an
/// attack): both engines end the pass with an error at once instead of
/// spinning, and serve again once the index is sane.
#[test]
fn bogus_available_index_fails_the_pass_without_spinning() {
    for rx_side in [false, true] {
        let m = mem();
        let vq = MockSplitQueue::new(&m, Q);
        let (dev, test) = fake_tap();
        let flags = if rx_side { W } else { R };
        let mut n = 0;
        add_chains(&vq, &mut n, &[&[(BUF, 12, flags), (BUF + 12, 100, flags)]]);
        vq.avail().idx().store(1000u16.to_le());
        send(test.as_raw_fd(), &frame(112, 1));
        let q: Queue = vq.create_queue().expect("queue");
        let s = std::sync::Arc::new(QueueStats::default());
        let (q, r) = pass_within_5s(&m, q, dev.as_raw_fd(), rx_side, &s);
        assert!(r.is_err(), "rx {rx_side}: the pass reports the broken ring");
        assert_eq!(vq.used().idx().load(), 0);
        // The driver repairs its index: the chain is served.
        vq.avail().idx().store(1u16.to_le());
        let (_, r) = pass_within_5s(&m, q, dev.as_raw_fd(), rx_side, &s);
        r.expect("pass after the repair");
        if !rx_side {
            assert_eq!(recv(test.as_raw_fd()).map(|d| d.len()), Some(112));
        }
        assert_eq!(vq.used().idx().load(), 1, "rx {rx_side}: served again");
        assert_eq!(get(&s.packets), 1);
    }
}

// The io_uring path of both engines (`--tap-io uring`) on the same fake tap.

fn uring_rx(acked: u64, fd: RawFd) -> Rx {
    let mut rx = Rx::new(Negotiated::new(v1(acked), MTU), MTU);
    rx.use_uring(fd).expect("io_uring");
    assert!(rx.uring());
    rx
}

#[test]
fn uring_tx_writes_a_batch_in_order_and_counts_bad_chains() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, 256);
    let (dev, test) = fake_tap();
    let mut n = 0;
    let mut chains: Vec<Vec<(u64, u32, u16)>> = Vec::new();
    let mut frames = Vec::new();
    for i in 0..100u64 {
        let f = frame(12 + 60 + i as usize * 9, i as u8);
        let at = BUF + i * 0x1000;
        m.write_slice(&f, GuestAddress(at)).expect("frame");
        if i == 50 {
            // Device-writable on the TX ring: malformed, counted, skipped.
            chains.push(vec![(at, f.len() as u32, W)]);
            continue;
        }
        if i % 3 == 0 {
            // Header and frame in one buffer (a plain write).
            chains.push(vec![(at, f.len() as u32, R)]);
        } else {
            // Header split from the frame at an odd offset.
            chains.push(vec![(at, 5, R), (at + 5, f.len() as u32 - 5, R)]);
        }
        frames.push(f);
    }
    let refs: Vec<&[(u64, u32, u16)]> = chains.iter().map(|c| c.as_slice()).collect();
    add_chains(&vq, &mut n, &refs);
    let mut q: Queue = vq.create_queue().expect("queue");
    let mut tx = Tx::new(Negotiated::new(v1(0), MTU));
    tx.use_uring(dev.as_raw_fd()).expect("io_uring");
    let s = QueueStats::default();
    let signals = tx_run(&mut tx, &mut q, &m, dev.as_raw_fd(), &s);
    assert!(tx.uring(), "still on the io_uring path");
    assert!(signals >= 1);
    assert_eq!(vq.used().idx().load(), 100, "every chain completed");
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(recv(test.as_raw_fd()).as_ref(), Some(f), "frame {i}");
    }
    assert_eq!(recv(test.as_raw_fd()), None);
    assert_eq!((get(&s.packets), get(&s.errors)), (99, 1));
}

#[test]
fn uring_rx_reads_batches_in_order_and_gives_back_unused_chains() {
    for acked in [0, MRG] {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 256);
        let (dev, test) = fake_tap();
        let mut n = 0;
        let chains: Vec<Vec<(u64, u32, u16)>> = (0..80u64)
            .map(|i| vec![(BUF + i * 0x1000, 2048, W)])
            .collect();
        let refs: Vec<&[(u64, u32, u16)]> = chains.iter().map(|c| c.as_slice()).collect();
        add_chains(&vq, &mut n, &refs);
        let frames: Vec<Vec<u8>> = (0..70).map(|i| frame(12 + 60 + i * 17, i as u8)).collect();
        for f in &frames {
            send(test.as_raw_fd(), f);
        }
        let mut q: Queue = vq.create_queue().expect("queue");
        let mut rx = uring_rx(acked, dev.as_raw_fd());
        let s = QueueStats::default();
        assert_eq!(
            rx_run(&mut rx, &mut q, &m, dev.as_raw_fd(), &s),
            RxStop::TapEmpty
        );
        assert_eq!(vq.used().idx().load(), 70);
        assert_eq!(q.next_avail(), 70, "the 10 unused chains went back");
        for (i, f) in frames.iter().enumerate() {
            let (id, len) = used(&vq, i);
            assert_eq!(len as usize, f.len(), "frame {i}");
            let mut got = vec![0u8; f.len()];
            m.read_slice(&mut got, GuestAddress(BUF + u64::from(id) * 0x1000))
                .expect("frame");
            assert_eq!(&got[12..], &f[12..], "frame {i} bytes");
            assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
        }
        assert_eq!((get(&s.drops), get(&s.errors), get(&s.holes)), (0, 0, 0));
        // More frames: the chains given back are used next.
        send(test.as_raw_fd(), &frames[0]);
        rx_run(&mut rx, &mut q, &m, dev.as_raw_fd(), &s);
        assert_eq!(vq.used().idx().load(), 71);
        assert_eq!(used(&vq, 70).0, 70);
    }
}

#[test]
fn uring_rx_runs_out_of_buffers_and_resumes_without_losing_frames() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, 256);
    let (dev, test) = fake_tap();
    let mut n = 0;
    let frames: Vec<Vec<u8>> = (0..50).map(|i| frame(12 + 100 + i, i as u8)).collect();
    for f in &frames {
        send(test.as_raw_fd(), f);
    }
    let mut q: Queue = vq.create_queue().expect("queue");
    let mut rx = uring_rx(0, dev.as_raw_fd());
    let s = QueueStats::default();
    let mut next = 0u64;
    let mut post = |vq: &MockSplitQueue<GuestMemoryMmap>, k: u64| {
        let chains: Vec<Vec<(u64, u32, u16)>> = (next..next + k)
            .map(|i| vec![(BUF + i * 0x1000, 2048, W)])
            .collect();
        next += k;
        let refs: Vec<&[(u64, u32, u16)]> = chains.iter().map(|c| c.as_slice()).collect();
        add_chains(vq, &mut n, &refs);
    };
    post(&vq, 20);
    assert_eq!(
        rx_run(&mut rx, &mut q, &m, dev.as_raw_fd(), &s),
        RxStop::NoBuffers
    );
    assert_eq!(vq.used().idx().load(), 20);
    post(&vq, 40);
    assert_eq!(
        rx_run(&mut rx, &mut q, &m, dev.as_raw_fd(), &s),
        RxStop::TapEmpty
    );
    assert_eq!(vq.used().idx().load(), 50);
    for (i, f) in frames.iter().enumerate() {
        let (id, len) = used(&vq, i);
        assert_eq!(len as usize, f.len());
        let mut got = vec![0u8; f.len() - 12];
        m.read_slice(&mut got, GuestAddress(BUF + u64::from(id) * 0x1000 + 12))
            .expect("frame");
        assert_eq!(&got[..], &f[12..], "frame {i} in order");
    }
    assert_eq!(q.next_avail(), 50);
}

#[test]
fn uring_rx_drops_oversized_frames_and_completes_malformed_chains() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, Q);
    let (dev, test) = fake_tap();
    let mut n = 0;
    add_chains(
        &vq,
        &mut n,
        &[
            &[(BUF, 512, R)],
            &[(BUF + 0x1000, 512, W)],
            &[(BUF + 0x2000, 512, W)],
        ],
    );
    let mut q: Queue = vq.create_queue().expect("queue");
    let mut rx = uring_rx(0, dev.as_raw_fd());
    let s = QueueStats::default();
    send(test.as_raw_fd(), &vec![0u8; 12 + 1000]);
    let small = frame(112, 4);
    send(test.as_raw_fd(), &small);
    rx_run(&mut rx, &mut q, &m, dev.as_raw_fd(), &s);
    assert_eq!(vq.used().idx().load(), 3);
    assert_eq!(used(&vq, 0), (0, 0), "malformed chain returned empty");
    assert_eq!(used(&vq, 1), (2, 112), "the next frame, in the next chain");
    assert_eq!(
        used(&vq, 2),
        (1, 0),
        "the chain of the dropped frame: a hole"
    );
    let mut got = vec![0u8; 100];
    m.read_slice(&mut got, GuestAddress(BUF + 0x2000 + 12))
        .expect("frame");
    assert_eq!(&got[..], &small[12..]);
    assert_eq!(
        (
            get(&s.errors),
            get(&s.drops),
            get(&s.holes),
            get(&s.packets)
        ),
        (1, 1, 1, 1)
    );
}

#[test]
fn uring_rx_with_small_mergeable_buffers_takes_the_readv_path() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, Q);
    let (dev, test) = fake_tap();
    let mut n = 0;
    add_chains(
        &vq,
        &mut n,
        &[&[(BUF, 1024, W)], &[(BUF + 0x1000, 1024, W)]],
    );
    let pkt = frame(12 + 1500, 9);
    send(test.as_raw_fd(), &pkt);
    let mut q: Queue = vq.create_queue().expect("queue");
    let mut rx = uring_rx(MRG, dev.as_raw_fd());
    let s = QueueStats::default();
    rx_run(&mut rx, &mut q, &m, dev.as_raw_fd(), &s);
    assert_eq!(vq.used().idx().load(), 2, "one frame over two chains");
    assert_eq!(used(&vq, 0), (0, 1024));
    assert_eq!(used(&vq, 1), (1, 488));
    let mut got = vec![0u8; 2];
    m.read_slice(&mut got, GuestAddress(BUF + 10)).expect("hdr");
    assert_eq!(u16::from_le_bytes([got[0], got[1]]), 2, "num_buffers");
    assert_eq!((get(&s.drops), get(&s.errors)), (0, 0));
}
