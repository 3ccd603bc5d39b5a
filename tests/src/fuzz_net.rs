//! Body of the net daemon's fuzz target, shared by the cargo-fuzz crate
//! (`fuzz/`, target `virtio_net_queues`) and the stable smoke test
//! (`tests/fuzz_net_smoke.rs`): an RX and a TX virtqueue whose descriptor
//! tables, available rings and buffers are arbitrary bytes in one mock
//! guest memory, processed by the real engines (`vhost_user_net::rx::Rx`,
//! `tx::Tx`) with arbitrary negotiated features, and arbitrary frames
//! waiting on the "tap" (a datagram socketpair: one datagram = one vnet
//! header + frame, as a tap read).
//!
//! What it looks for: panics, hangs (an engine that never returns),
//! crashes, out-of-bounds writes (used lengths larger than the chain).
//! Errors are expected: the engines count them.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use vhost_user_net::rx::Rx;
use vhost_user_net::stats::QueueStats;
use vhost_user_net::tx::Tx;
use vhost_user_net::virtio::Negotiated;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest memory size.
pub const MEM_SIZE: usize = 64 << 10;
/// RX ring: descriptor table, available ring, used ring.
pub const RX_RING: [u64; 3] = [0x0000, 0x1000, 0x2000];
/// TX ring.
pub const TX_RING: [u64; 3] = [0x3000, 0x4000, 0x5000];
/// Most frames put on the fake tap per input.
pub const MAX_FRAMES: usize = 8;
const MTU: u16 = 1500;

/// Feature bits (virtio-net): the flags byte of the input picks them.
const VERSION_1: u64 = 1 << 32;
const MRG_RXBUF: u64 = 1 << 15;
const EVENT_IDX: u64 = 1 << 29;
const CSUM_TSO: u64 = (1 << 0) | (1 << 1) | (1 << 7) | (1 << 11);

fn socketpair() -> Option<(OwnedFd, OwnedFd)> {
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
    if r != 0 {
        return None;
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    Some(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn queue(size: u16, ring: [u64; 3], event_idx: bool) -> Option<Queue> {
    let mut q = Queue::new(size).ok()?;
    q.set_size(size);
    q.set_desc_table_address(Some(ring[0] as u32), Some(0));
    q.set_avail_ring_address(Some(ring[1] as u32), Some(0));
    q.set_used_ring_address(Some(ring[2] as u32), Some(0));
    q.set_event_idx(event_idx);
    q.set_ready(true);
    Some(q)
}

/// Input: `[flags, log2 queue size, rx avail idx (2 bytes LE), tx avail idx
/// (2), frame count, then per frame its length (2) and bytes, then guest
/// memory]`. Flags: bit 0 MRG_RXBUF, bit 1 EVENT_IDX, bit 2 VERSION_1, bit
/// 3 checksum and TSO4 both ways, bit 4 a second RX pass. Returns the
/// number of used-ring entries the engines wrote (a depth signal).
///
/// Panics if an engine reports a used length larger than the chain it
/// belongs to could hold (checked against the descriptors as they were
/// before the pass, when no device-writable buffer overlaps the rings).
pub fn virtio_net_queues(data: &[u8]) -> u64 {
    let [flags, qlog, rx_lo, rx_hi, tx_lo, tx_hi, nframes, rest @ ..] = data else {
        return 0;
    };
    let size = 1u16 << (qlog % 9);
    let mut rest = rest;
    let mut frames = Vec::new();
    for _ in 0..usize::from(*nframes) % (MAX_FRAMES + 1) {
        let [lo, hi, tail @ ..] = rest else { break };
        let len = usize::from(u16::from_le_bytes([*lo, *hi])).min(tail.len());
        frames.push(&tail[..len]);
        rest = &tail[len..];
    }
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]) else {
        return 0;
    };
    let n = rest.len().min(MEM_SIZE);
    let _ = mem.write_slice(&rest[..n], GuestAddress(0));
    let rx_idx = u16::from_le_bytes([*rx_lo, *rx_hi]);
    let tx_idx = u16::from_le_bytes([*tx_lo, *tx_hi]);
    let _ = mem.write_obj(rx_idx.to_le(), GuestAddress(RX_RING[1] + 2));
    let _ = mem.write_obj(tx_idx.to_le(), GuestAddress(TX_RING[1] + 2));
    let mut mem_before = vec![0u8; MEM_SIZE];
    let _ = mem.read_slice(&mut mem_before, GuestAddress(0));
    let mut acked = 0;
    for (bit, f) in [
        (1, MRG_RXBUF),
        (2, EVENT_IDX),
        (4, VERSION_1),
        (8, CSUM_TSO),
    ] {
        if flags & bit != 0 {
            acked |= f;
        }
    }
    let cfg = Negotiated::new(acked, MTU);
    let event_idx = acked & EVENT_IDX != 0;
    let (Some(mut rxq), Some(mut txq)) = (
        queue(size, RX_RING, event_idx),
        queue(size, TX_RING, event_idx),
    ) else {
        return 0;
    };
    let Some((dev, peer)) = socketpair() else {
        return 0;
    };
    for f in &frames {
        // SAFETY: sending from a live slice; a full socket just refuses.
        unsafe { libc::send(peer.as_raw_fd(), f.as_ptr().cast(), f.len(), 0) };
    }
    let stats = QueueStats::default();
    let mut rx = Rx::new(cfg, MTU);
    let mut tx = Tx::new(cfg);
    let mut signals = 0u64;
    let _ = tx.process(&mut txq, &mem, dev.as_raw_fd(), &stats, &mut || {
        signals += 1
    });
    let _ = rx.process(&mut rxq, &mem, dev.as_raw_fd(), &stats, &mut || {
        signals += 1
    });
    if flags & 16 != 0 {
        let _ = rx.process(&mut rxq, &mem, dev.as_raw_fd(), &stats, &mut || {
            signals += 1
        });
    }
    if rings_stable(&mem_before, size) {
        check_used(&mem, &mem_before, RX_RING, size, rxq.next_used());
        check_used(&mem, &mem_before, TX_RING, size, txq.next_used());
    }
    u64::from(rxq.next_used()) + u64::from(txq.next_used())
}

/// A descriptor read from a memory image.
fn desc_at(img: &[u8], at: u64) -> Option<(u64, u32, u16, u16)> {
    let o = usize::try_from(at).ok()?;
    let b = img.get(o..o.checked_add(16)?)?;
    let u = |r: std::ops::Range<usize>| b[r].iter().rev().fold(0u64, |a, &x| a << 8 | u64::from(x));
    Some((u(0..8), u(8..12) as u32, u(12..14) as u16, u(14..16) as u16))
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

/// Whether nothing the engines may write (used rings, device-writable
/// buffers of any descriptor, direct or indirect) overlaps what they read
/// to find chains (descriptor tables, available rings, indirect tables).
/// A hostile guest may point buffers at its own rings; the engines then
/// see descriptors change under them and the used lengths can no longer be
/// checked against the descriptors as they were before.
fn rings_stable(img: &[u8], size: u16) -> bool {
    let n = u64::from(size);
    let mut read = Vec::new();
    let mut written = Vec::new();
    for ring in [RX_RING, TX_RING] {
        read.push((ring[0], ring[0] + 16 * n));
        read.push((ring[1], ring[1] + 6 + 2 * n));
        written.push((ring[2], ring[2] + 6 + 8 * n));
        for i in 0..n {
            let Some((addr, len, flags, _)) = desc_at(img, ring[0] + 16 * i) else {
                continue;
            };
            let end = addr.saturating_add(u64::from(len));
            if flags & 4 != 0 {
                read.push((addr, end));
                for j in 0..u64::from(len / 16).min(4096) {
                    let Some((a, l, f, _)) = desc_at(img, addr.saturating_add(16 * j)) else {
                        break;
                    };
                    if f & 2 != 0 {
                        written.push((a, a.saturating_add(u64::from(l))));
                    }
                }
            } else if flags & 2 != 0 {
                written.push((addr, end));
            }
        }
    }
    !written
        .iter()
        .any(|w| read.iter().any(|r| overlaps(*w, *r)))
}

/// Walks the used entries written so far and checks each length against
/// the capacity of the chain it names (the sum of its descriptors' lengths,
/// following at most `size` links as the engine does).
fn check_used(mem: &GuestMemoryMmap<()>, before: &[u8], ring: [u64; 3], size: u16, next_used: u16) {
    for i in 0..next_used.min(size) {
        let at = ring[2] + 4 + 8 * u64::from(i);
        let (Ok(id), Ok(len)) = (
            mem.read_obj::<u32>(GuestAddress(at)),
            mem.read_obj::<u32>(GuestAddress(at + 4)),
        ) else {
            continue;
        };
        if len == 0 {
            continue;
        }
        let cap = chain_capacity(before, ring[0], size, id);
        assert!(
            u64::from(len) <= cap,
            "used entry {i}: length {len} > chain {id} capacity {cap}"
        );
    }
}

/// Upper bound of the bytes chain `head` can hold in the memory image
/// `img`: direct descriptors, or an indirect table's entries.
fn chain_capacity(img: &[u8], table: u64, size: u16, head: u32) -> u64 {
    let desc = |table: u64, i: u64| desc_at(img, table.checked_add(16 * i)?);
    let (mut table, mut limit, mut i) = (table, u64::from(size), u64::from(head));
    let mut cap = 0u64;
    let mut steps = 0u64;
    while i < limit && steps <= 2 * u64::from(u16::MAX) {
        steps += 1;
        let Some((addr, len, flags, next)) = desc(table, i) else {
            break;
        };
        if flags & 4 != 0 {
            // Indirect: its entries, from 0.
            table = addr;
            limit = u64::from(len / 16);
            i = 0;
            continue;
        }
        cap += u64::from(len);
        if flags & 1 == 0 {
            break;
        }
        i = u64::from(next);
    }
    cap
}
