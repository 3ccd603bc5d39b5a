//! The pipelined queue loop with many requests in one kick: more chains than
//! io_uring slots, reads and writes of one and of several segments (plain
//! read/write and readv/writev), a FLUSH among them. Every chain must come
//! back exactly once with the right status and the bytes must reach the
//! disk and the guest, for raw (io_uring) and qcow2 (synchronous) disks.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vhost_user_blk::disk::Disk;
use vhost_user_blk::queue::{DeviceSettings, Processed, QueueCtx, QueueEngine};
use vhost_user_blk::stats::QueueStats;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const BLOCK: usize = 4096;
const BLOCKS: usize = 60;
const DISK: u64 = 1 << 20;
const QUEUE: u16 = 256;
/// Fewer io_uring slots than requests: the loop must wait for free slots.
const DEPTH: u16 = 16;
const HDRS: u64 = 0x10_0000;
const STATUS: u64 = 0x20_0000;
const DATA: u64 = 0x40_0000;
const W: u16 = VRING_DESC_F_WRITE as u16;

fn pattern(block: usize) -> Vec<u8> {
    (0..BLOCK)
        .map(|i| {
            (i as u8)
                .wrapping_mul(13)
                .wrapping_add((block as u8).wrapping_mul(7))
        })
        .collect()
}

struct Chains<'a> {
    mem: &'a GuestMemoryMmap,
    vq: &'a MockSplitQueue<'a, GuestMemoryMmap>,
    next_desc: u16,
    count: u16,
}

impl Chains<'_> {
    /// Adds request number `n` (its header and status at per-request
    /// addresses) made of `descs` after the header, status last.
    fn add(&mut self, n: u64, ty: u32, sector: u64, data: &[(u64, u32, u16)]) {
        let hdr = HDRS + n * 16;
        self.mem.write_obj(ty, GuestAddress(hdr)).expect("hdr");
        self.mem
            .write_obj(0u32, GuestAddress(hdr + 4))
            .expect("hdr");
        self.mem
            .write_obj(sector, GuestAddress(hdr + 8))
            .expect("hdr");
        self.mem
            .write_obj(0xffu8, GuestAddress(STATUS + n))
            .expect("status");
        let mut all = vec![(hdr, 16, 0)];
        all.extend_from_slice(data);
        all.push((STATUS + n, 1, W));
        let base = self.next_desc;
        let descs: Vec<RawDescriptor> = all
            .iter()
            .enumerate()
            .map(|(i, &(a, l, f))| {
                let (flags, next) = if i + 1 < all.len() {
                    (f | VRING_DESC_F_NEXT as u16, base + i as u16 + 1)
                } else {
                    (f, 0)
                };
                RawDescriptor::from(SplitDescriptor::new(a, l, flags, next))
            })
            .collect();
        self.vq.add_desc_chains(&descs, base).expect("chain");
        self.next_desc += all.len() as u16;
        self.count += 1;
    }
}

/// Data descriptors for block buffer `b`: one segment for even `b`, two
/// (1 KiB + 3 KiB) for odd ones.
fn segments(b: usize, flags: u16) -> Vec<(u64, u32, u16)> {
    let addr = DATA + (b * BLOCK) as u64;
    if b.is_multiple_of(2) {
        vec![(addr, BLOCK as u32, flags)]
    } else {
        vec![
            (addr, 1024, flags),
            (addr + 1024, BLOCK as u32 - 1024, flags),
        ]
    }
}

/// Runs the queue; returns the number of driver notifications.
fn process(worker: &mut QueueEngine, q: &mut Queue, mem: &GuestMemoryMmap) -> usize {
    process_holding(worker, q, mem, Duration::ZERO)
}

/// [`process`] with the test-only completion hold set to `hold`.
fn process_holding(
    worker: &mut QueueEngine,
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    hold: Duration,
) -> usize {
    let (signals, how) = process_once(worker, q, mem, hold);
    assert_eq!(how, Processed::Idle);
    signals
}

fn process_once(
    worker: &mut QueueEngine,
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    hold: Duration,
) -> (usize, Processed) {
    let settings = DeviceSettings {
        serial: Vec::new(),
        max_dwz_segments: 1,
        poll: Duration::ZERO,
        hold_completions: hold,
    };
    let stats = QueueStats::default();
    let mut signals = 0;
    // Like the daemon's event loop: a pass, then, while requests are in
    // flight, wait for the completion eventfd and run the next pass. The
    // counter is consumed before each pass, so a wait only returns for a
    // completion posted after that.
    let fd = worker.completion_fd();
    loop {
        if let Some(fd) = fd {
            let mut v = 0u64;
            // SAFETY: reads 8 bytes into `v` from the engine's eventfd
            // (non-blocking; EAGAIN when nothing completed).
            unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
        }
        let how = worker
            .process(&mut QueueCtx {
                index: 0,
                settings: &settings,
                writeback: true,
                q: &mut *q,
                mem,
                stats: &stats,
                signal: &mut || signals += 1,
            })
            .expect("process");
        if how == Processed::Interrupted || worker.in_flight() == 0 {
            return (signals, how);
        }
        let fd = fd.expect("requests left in flight only with a completion eventfd");
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, 10_000) };
        assert_eq!(n, 1, "the completion eventfd fired within 10 s");
    }
}

/// Checks that the used ring holds `heads` exactly once each from used
/// index `from` on, with `len` as used length, and all statuses are OK.
fn check_used(
    vq: &MockSplitQueue<GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    from: u16,
    chains: &Chains<'_>,
    first_req: u64,
    len_of: impl Fn(u64) -> u32,
    heads: &[(u16, u64)],
) {
    assert_eq!(
        vq.used().idx().load(),
        from + chains.count,
        "every chain was returned"
    );
    let mut seen = HashSet::new();
    for i in from..from + chains.count {
        let e = vq
            .used()
            .ring()
            .ref_at(usize::from(i))
            .expect("used")
            .load();
        let head = e.id() as u16;
        assert!(seen.insert(head), "head {head} returned twice");
        let &(_, n) = heads
            .iter()
            .find(|(h, _)| *h == head)
            .expect("a head we submitted");
        assert_eq!(e.len(), len_of(n), "used length of request {n}");
    }
    for n in first_req..first_req + u64::from(chains.count) {
        let st: u8 = mem.read_obj(GuestAddress(STATUS + n)).expect("status");
        assert_eq!(st, 0, "status of request {n}");
    }
}

fn disk(format: qcow2::ImageFormat) -> (tempfile::TempDir, Arc<Disk>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk");
    match format {
        qcow2::ImageFormat::Raw => {
            let f = std::fs::File::create(&path).expect("create");
            f.set_len(DISK).expect("size");
        }
        qcow2::ImageFormat::Qcow2 => {
            let o = qcow2::CreateOptions {
                size: DISK,
                ..Default::default()
            };
            qcow2::Qcow2::create(&path, &o).expect("create qcow2");
        }
    }
    let disk = Arc::new(Disk::open(&path, format, false, false).expect("open"));
    (dir, disk)
}

fn run(format: qcow2::ImageFormat, hold: Duration) {
    let (_dir, disk) = disk(format);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).expect("memory");
    let vq = MockSplitQueue::new(&mem, QUEUE);
    let mut q: Queue = vq.create_queue().expect("queue");
    let mut worker = QueueEngine::new(&disk, DEPTH).expect("worker");

    // Writes: request b writes pattern(b) to block b.
    for b in 0..BLOCKS {
        mem.write_slice(&pattern(b), GuestAddress(DATA + (b * BLOCK) as u64))
            .expect("data");
    }
    let mut chains = Chains {
        mem: &mem,
        vq: &vq,
        next_desc: 0,
        count: 0,
    };
    let mut heads = Vec::new();
    for b in 0..BLOCKS {
        heads.push((chains.next_desc, b as u64));
        let sector = (b * BLOCK / 512) as u64;
        chains.add(b as u64, VIRTIO_BLK_T_OUT, sector, &segments(b, 0));
    }
    let signals = process_holding(&mut worker, &mut q, &mem, hold);
    check_used(&vq, &mem, 0, &chains, 0, |_| 1, &heads);
    assert!(
        signals > 1,
        "completions are returned in waves, not once per batch"
    );
    for b in 0..BLOCKS {
        let mut got = vec![0u8; BLOCK];
        disk.read_at(&mut got, (b * BLOCK) as u64)
            .expect("read back");
        assert!(got == pattern(b), "block {b} on disk");
    }

    // Reads, reversed, into poisoned buffers, with a FLUSH in the middle.
    mem.write_slice(&vec![0xaa; BLOCKS * BLOCK], GuestAddress(DATA))
        .expect("poison");
    let from = vq.used().idx().load();
    let mut chains = Chains {
        mem: &mem,
        vq: &vq,
        next_desc: 0,
        count: 0,
    };
    let mut heads = Vec::new();
    let first = 1000u64;
    let flush = first + BLOCKS as u64 / 2;
    for i in 0..=BLOCKS as u64 {
        let n = first + i;
        heads.push((chains.next_desc, n));
        if n == flush {
            chains.add(n, VIRTIO_BLK_T_FLUSH, 0, &[]);
            continue;
        }
        let b = if n < flush { i } else { i - 1 } as usize;
        let src = BLOCKS - 1 - b;
        let sector = (src * BLOCK / 512) as u64;
        chains.add(n, VIRTIO_BLK_T_IN, sector, &segments(b, W));
    }
    process_holding(&mut worker, &mut q, &mem, hold);
    let len_of = |n: u64| if n == flush { 1 } else { BLOCK as u32 + 1 };
    check_used(&vq, &mem, from, &chains, first, len_of, &heads);
    for b in 0..BLOCKS {
        let mut got = vec![0u8; BLOCK];
        mem.read_slice(&mut got, GuestAddress(DATA + (b * BLOCK) as u64))
            .expect("data");
        assert!(got == pattern(BLOCKS - 1 - b), "read into buffer {b}");
    }
    let avail = q.avail_idx(&mem, Ordering::Acquire).expect("avail");
    assert_eq!(avail.0, q.next_avail(), "queue drained");
    assert_eq!(worker.pending_resubmits(), 0);
}

#[test]
fn many_requests_in_one_kick_raw() {
    run(qcow2::ImageFormat::Raw, Duration::ZERO);
}

#[test]
fn many_requests_in_one_kick_qcow2() {
    run(qcow2::ImageFormat::Qcow2, Duration::ZERO);
}

/// The same with the test-only completion hold, which runs one wave at a
/// time and takes the next wave before it publishes the current one: every
/// chain still comes back exactly once, in a pass of at least one hold per
/// wave.
#[test]
fn many_requests_in_one_kick_with_held_completions() {
    for format in [qcow2::ImageFormat::Raw, qcow2::ImageFormat::Qcow2] {
        let hold = Duration::from_millis(5);
        let t0 = std::time::Instant::now();
        run(format, hold);
        // Two passes (writes, then reads and a flush) of 61 chains or fewer
        // in waves of 8.
        let waves = 2 * BLOCKS.div_ceil(8) as u32;
        assert!(
            t0.elapsed() >= hold * waves,
            "{format:?}: {:?} for {waves} held waves",
            t0.elapsed()
        );
    }
}

/// A bumped epoch (memory map change, pause) makes a pass return before it
/// takes any chain; the next pass serves them all.
#[test]
fn interrupted_pass_leaves_the_chains_for_the_next() {
    let (_dir, disk) = disk(qcow2::ImageFormat::Raw);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).expect("memory");
    let vq = MockSplitQueue::new(&mem, QUEUE);
    let mut q: Queue = vq.create_queue().expect("queue");
    let mut worker = QueueEngine::new(&disk, DEPTH).expect("worker");
    let epoch = Arc::new(AtomicU64::new(0));
    worker.watch(epoch.clone());
    let mut chains = Chains {
        mem: &mem,
        vq: &vq,
        next_desc: 0,
        count: 0,
    };
    let mut heads = Vec::new();
    for b in 0..10 {
        mem.write_slice(&pattern(b), GuestAddress(DATA + (b * BLOCK) as u64))
            .expect("data");
        heads.push((chains.next_desc, b as u64));
        let sector = (b * BLOCK / 512) as u64;
        chains.add(b as u64, VIRTIO_BLK_T_OUT, sector, &segments(b, 0));
    }
    epoch.fetch_add(1, Ordering::AcqRel);
    let (_, how) = process_once(&mut worker, &mut q, &mem, Duration::ZERO);
    assert_eq!(how, Processed::Interrupted);
    assert_eq!(
        vq.used().idx().load(),
        0,
        "no chain taken while interrupted"
    );
    assert_eq!(q.next_avail(), 0);
    process(&mut worker, &mut q, &mem);
    check_used(&vq, &mem, 0, &chains, 0, |_| 1, &heads);
}
