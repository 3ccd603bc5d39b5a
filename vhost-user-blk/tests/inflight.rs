//! Inflight I/O tracking through the device model, with the region's bytes
//! read and written directly in the layout of the vhost-user spec (not
//! through the code under test): heads are recorded while in flight and
//! cleared once used; after a "crash" the recorded heads are resubmitted in
//! counter order, before new ones, completed ones are not redone, and a
//! batch that reached the used ring before its flags were cleared is not
//! resubmitted.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost_user_blk::disk::Disk;
use vhost_user_blk::inflight::{self, InflightRegion};
use vhost_user_blk::queue::{DeviceSettings, QueueCtx, QueueEngine};
use vhost_user_blk::stats::QueueStats;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

const QSIZE: u16 = 16;
const MEM: u64 = 8 << 20;
const DISK: u64 = 1 << 20;
const BUF: u64 = 0x10_0000;

/// One write request per chain: header, 512 data bytes, status.
/// Chain `k` starts at descriptor `3k`, writes sector `k` with byte `0x10+k`.
fn add_write_chain(mem: &GuestMemoryMmap, vq: &MockSplitQueue<GuestMemoryMmap>, k: u16) {
    let base = BUF + u64::from(k) * 0x1000;
    mem.write_obj(VIRTIO_BLK_T_OUT, GuestAddress(base))
        .expect("hdr");
    mem.write_obj(0u32, GuestAddress(base + 4)).expect("hdr");
    mem.write_obj(u64::from(k), GuestAddress(base + 8))
        .expect("hdr");
    mem.write_slice(&[0x10 + k as u8; 512], GuestAddress(base + 0x100))
        .expect("data");
    mem.write_obj(0xffu8, GuestAddress(base + 0x800))
        .expect("status");
    let h = 3 * k;
    let next = VRING_DESC_F_NEXT as u16;
    let descs = [
        SplitDescriptor::new(base, 16, next, h + 1),
        SplitDescriptor::new(base + 0x100, 512, next, h + 2),
        SplitDescriptor::new(base + 0x800, 1, VRING_DESC_F_WRITE as u16, 0),
    ];
    let raw: Vec<RawDescriptor> = descs.iter().map(|d| RawDescriptor::from(*d)).collect();
    vq.add_desc_chains(&raw, h).expect("chain");
}

fn status_of(mem: &GuestMemoryMmap, k: u16) -> u8 {
    mem.read_obj(GuestAddress(BUF + u64::from(k) * 0x1000 + 0x800))
        .expect("status")
}

struct Rig {
    disk: Arc<Disk>,
    worker: QueueEngine,
    region: File,
    size: u64,
    /// The queue's counters, kept across passes.
    stats: QueueStats,
    _dir: tempfile::TempDir,
}

fn rig() -> (GuestMemoryMmap, Rig) {
    rig_with(qcow2::ImageFormat::Qcow2)
}

/// A rig on a `format` disk: qcow2 requests complete synchronously, in
/// submission order; raw ones go through io_uring.
fn rig_with(format: qcow2::ImageFormat) -> (GuestMemoryMmap, Rig) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk");
    if format == qcow2::ImageFormat::Qcow2 {
        let o = qcow2::CreateOptions {
            size: DISK,
            cluster_size: 4096,
            ..Default::default()
        };
        qcow2::Qcow2::create(&path, &o).expect("create qcow2");
    } else {
        File::create(&path)
            .and_then(|f| f.set_len(DISK))
            .expect("create raw");
    }
    let disk = Arc::new(Disk::open(&path, format, false, false).expect("open"));
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).expect("mem");
    let worker = QueueEngine::new(&disk, QSIZE).expect("worker");
    let (region, size) = inflight::create(1, QSIZE).expect("memfd");
    let rig = Rig {
        disk,
        worker,
        region,
        size,
        stats: QueueStats::default(),
        _dir: dir,
    };
    (mem, rig)
}

impl Rig {
    fn attach(&mut self) {
        let f = self.region.try_clone().expect("dup");
        let r = Arc::new(InflightRegion::map(f, 0, self.size, 1, QSIZE).expect("map"));
        self.worker.set_inflight(r.queue(0));
    }

    fn process(&mut self, mem: &GuestMemoryMmap, q: &mut Queue) {
        self.process_holding(mem, q, Duration::ZERO);
    }

    /// [`Rig::process`] with the test-only completion hold set to `hold`.
    fn process_holding(&mut self, mem: &GuestMemoryMmap, q: &mut Queue, hold: Duration) {
        let settings = DeviceSettings {
            serial: Vec::new(),
            max_dwz_segments: 4,
            poll: Duration::ZERO,
            hold_completions: hold,
        };
        self.worker
            .process_all(&mut QueueCtx {
                index: 0,
                settings: &settings,
                writeback: true,
                q,
                mem,
                stats: &self.stats,
                signal: &mut || {},
            })
            .expect("process");
    }

    // Spec layout: header {features u64, version u16, desc_num u16,
    // last_batch_head u16, used_idx u16}, then 16-byte entries
    // {inflight u8, pad [u8; 5], next u16, counter u64}.
    fn hdr16(&self, off: u64) -> u16 {
        let mut b = [0u8; 2];
        self.region.read_exact_at(&mut b, off).expect("read");
        u16::from_le_bytes(b)
    }
    fn set_hdr16(&self, off: u64, v: u16) {
        self.region.write_all_at(&v.to_le_bytes(), off).expect("w");
    }
    fn entry_inflight(&self, head: u16) -> u8 {
        entry_inflight(&self.region, head)
    }
    fn set_entry(&self, head: u16, inflight: u8, counter: u64) {
        let off = 16 + 16 * u64::from(head);
        self.region.write_all_at(&[inflight], off).expect("w");
        self.region
            .write_all_at(&counter.to_le_bytes(), off + 8)
            .expect("w");
    }

    fn sector(&self, k: u64) -> u8 {
        let mut b = [0u8; 512];
        self.disk.read_at(&mut b, k * 512).expect("read disk");
        assert!(b.iter().all(|&x| x == b[0]), "sector {k} is uniform");
        b[0]
    }
}

fn entry_inflight(region: &File, head: u16) -> u8 {
    let mut b = [0u8; 1];
    region
        .read_exact_at(&mut b, 16 + 16 * u64::from(head))
        .expect("read");
    b[0]
}

fn used_heads(vq: &MockSplitQueue<GuestMemoryMmap>) -> Vec<u32> {
    let n = vq.used().idx().load();
    (0..n)
        .map(|i| {
            vq.used()
                .ring()
                .ref_at(usize::from(i))
                .expect("used")
                .load()
                .id()
        })
        .collect()
}

#[test]
fn heads_are_recorded_then_cleared_and_the_header_initialised() {
    let (mem, mut r) = rig();
    let vq = MockSplitQueue::new(&mem, QSIZE);
    for k in 0..3 {
        add_write_chain(&mem, &vq, k);
    }
    r.attach();
    let mut q: Queue = vq.create_queue().expect("queue");
    r.process(&mem, &mut q);
    assert_eq!(used_heads(&vq), vec![0, 3, 6]);
    assert_eq!(r.hdr16(8), 1, "version");
    assert_eq!(r.hdr16(10), QSIZE, "desc_num");
    assert_eq!(r.hdr16(14), 3, "used_idx follows the used ring");
    assert_eq!(r.hdr16(12), 6, "last_batch_head is the last head used");
    for h in 0..QSIZE {
        assert_eq!(r.entry_inflight(h), 0, "head {h} cleared after use");
    }
    for k in 0..3 {
        assert_eq!(status_of(&mem, k), VIRTIO_BLK_S_OK as u8);
        assert_eq!(r.sector(u64::from(k)), 0x10 + k as u8);
    }
}

#[test]
fn restart_resubmits_inflight_heads_oldest_first_and_nothing_twice() {
    let (mem, mut r) = rig();
    let vq = MockSplitQueue::new(&mem, QSIZE);
    // The previous instance took heads 0, 3, 6 (in the order 6, 3, 0 by
    // counter: 6 first) and completed only head 0; the driver then queued 9.
    for k in 0..4 {
        add_write_chain(&mem, &vq, k);
    }
    r.set_hdr16(8, 1); // version
    r.set_hdr16(10, QSIZE);
    r.set_hdr16(14, 1); // used_idx
    r.set_entry(6, 1, 40);
    r.set_entry(3, 1, 41);
    vq.used().idx().store(1);
    let mut q: Queue = vq.create_queue().expect("queue");
    // What QEMU sends after the backend died: SET_VRING_BASE = used index.
    q.set_next_avail(1);
    q.set_next_used(1);
    r.attach();
    r.process(&mem, &mut q);

    // Head 0 was already used (slot 0, written by the "previous instance":
    // the mock ring holds 0 there); then 6 and 3 in counter order, then 9.
    assert_eq!(&used_heads(&vq)[1..], &[6, 3, 9]);
    assert_eq!(
        q.next_avail(),
        4,
        "avail position = used (1) + inflight (2) + new (1)"
    );
    assert_eq!(r.sector(0), 0, "the completed request was not redone");
    assert_eq!(r.sector(1), 0x11);
    assert_eq!(r.sector(2), 0x12);
    assert_eq!(r.sector(3), 0x13);
    for h in 0..QSIZE {
        assert_eq!(r.entry_inflight(h), 0, "head {h} cleared");
    }
    assert_eq!(r.hdr16(14), 4);
    // The metrics' outboard_blk_resubmitted_total: heads 6 and 3.
    assert_eq!(r.stats.resubmitted.load(Ordering::Relaxed), 2);
    assert_eq!(r.stats.writes.load(Ordering::Relaxed), 3);
    assert_eq!(r.stats.in_flight.load(Ordering::Relaxed), 0);
}

#[test]
fn a_batch_used_before_its_flags_were_cleared_is_not_resubmitted() {
    let (mem, mut r) = rig();
    let vq = MockSplitQueue::new(&mem, QSIZE);
    for k in 0..2 {
        add_write_chain(&mem, &vq, k);
    }
    // The previous instance put head 3 in the used ring (used idx 1) and
    // died before clearing its flag and updating used_idx (still 0); head 0
    // is genuinely in flight.
    r.set_hdr16(8, 1);
    r.set_hdr16(10, QSIZE);
    r.set_hdr16(14, 0);
    r.set_hdr16(12, 3); // last_batch_head
    r.set_entry(0, 1, 7);
    r.set_entry(3, 1, 8);
    // used ring: flags u16, idx u16, then {id u32, len u32} elements.
    mem.write_obj(3u32, vq.used_addr().unchecked_add(4))
        .expect("used elem");
    mem.write_obj(1u32, vq.used_addr().unchecked_add(8))
        .expect("used elem");
    vq.used().idx().store(1);
    let mut q: Queue = vq.create_queue().expect("queue");
    q.set_next_avail(1);
    q.set_next_used(1);
    r.attach();
    r.process(&mem, &mut q);
    assert_eq!(used_heads(&vq), vec![3, 0], "only head 0 was resubmitted");
    assert_eq!(r.sector(0), 0x10);
    assert_eq!(r.sector(1), 0, "head 3's request was not redone");
    assert_eq!(r.hdr16(14), 2);
    assert_eq!(r.stats.resubmitted.load(Ordering::Relaxed), 1);
}

#[test]
fn a_region_too_small_or_past_the_file_is_refused() {
    let (f, size) = inflight::create(2, 256).expect("memfd");
    assert_eq!(size, 2 * 4160, "2 x align64(16 + 16 * 256)");
    let dup = |f: &File| f.try_clone().expect("dup");
    assert!(InflightRegion::map(dup(&f), 0, size, 2, 256).is_ok());
    assert!(InflightRegion::map(dup(&f), 0, size - 1, 2, 256).is_err());
    assert!(InflightRegion::map(dup(&f), 4096, size, 2, 256).is_err());
    assert!(InflightRegion::map(dup(&f), 0, size, 3, 256).is_err());
    assert!(InflightRegion::map(dup(&f), 0, size, 0, 256).is_err());
    assert!(InflightRegion::map(dup(&f), 0, size, 1, 0).is_err());
}

/// The test-only completion hold (`--test-hold-completions-ms`, which the
/// crash tests rely on to have requests in flight when they kill the daemon)
/// really holds: while it lasts the requests are taken and recorded in the
/// inflight region but neither completed nor in the used ring, and the pass
/// takes at least the hold. For io_uring (raw) and synchronous (qcow2) I/O.
fn completions_are_held(format: qcow2::ImageFormat) {
    const HOLD: Duration = Duration::from_millis(300);
    let (mem, mut r) = rig_with(format);
    let vq = MockSplitQueue::new(&mem, QSIZE);
    for k in 0..3 {
        add_write_chain(&mem, &vq, k);
    }
    r.attach();
    let region = r.region.try_clone().expect("dup");
    let mut q: Queue = vq.create_queue().expect("queue");
    let used_addr = q.used_ring();
    std::thread::scope(|s| {
        let (mem, q, r) = (&mem, &mut q, &mut r);
        let worker = s.spawn(move || {
            let t0 = Instant::now();
            r.process_holding(mem, q, HOLD);
            t0.elapsed()
        });
        // Wait until the worker took all three (recorded in the region).
        let deadline = Instant::now() + Duration::from_secs(10);
        while (0..3).any(|k| entry_inflight(&region, 3 * k) != 1) {
            assert!(
                !worker.is_finished(),
                "the pass ended before the requests were seen in flight"
            );
            assert!(Instant::now() < deadline, "requests never taken");
            std::thread::sleep(Duration::from_millis(1));
        }
        // The hold is far longer than this check: nothing completed yet.
        for k in 0..3u16 {
            assert_eq!(status_of(mem, k), 0xff, "request {k} completed early");
        }
        let used: u16 = mem
            .read_obj(GuestAddress(used_addr).unchecked_add(2))
            .expect("used idx");
        assert_eq!(used, 0, "nothing in the used ring during the hold");
        let took = worker.join().expect("worker");
        assert!(
            took >= HOLD,
            "{format:?}: the pass took {took:?}, less than the {HOLD:?} hold"
        );
    });
    assert_eq!(used_heads(&vq), vec![0, 3, 6]);
    for k in 0..3 {
        assert_eq!(status_of(&mem, k), VIRTIO_BLK_S_OK as u8);
        assert_eq!(r.sector(u64::from(k)), 0x10 + k as u8);
        assert_eq!(r.entry_inflight(3 * k), 0, "head {} cleared", 3 * k);
    }
}

#[test]
fn test_hold_keeps_completions_in_flight_raw() {
    completions_are_held(qcow2::ImageFormat::Raw);
}

#[test]
fn test_hold_keeps_completions_in_flight_qcow2() {
    completions_are_held(qcow2::ImageFormat::Qcow2);
}
