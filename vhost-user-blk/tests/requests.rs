//! The device model driven through `MockSplitQueue` chains over mock guest
//! memory, with a real disk file: every request type, and malformed chains
//! (each followed by a valid request to show the queue keeps serving).

use std::sync::Arc;
use std::time::Duration;

use vhost_user_blk::disk::Disk;
use vhost_user_blk::queue::{DeviceSettings, QueueCtx, QueueEngine};
use vhost_user_blk::stats::QueueStats;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: u64 = 8 << 20;
const DISK: u64 = 1 << 20;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
const R: u16 = 0;
const W: u16 = VRING_DESC_F_WRITE as u16;

struct Dev {
    disk: Arc<Disk>,
    worker: QueueEngine,
    stats: QueueStats,
}

struct Rig {
    mem: GuestMemoryMmap,
    dev: Dev,
    _dir: tempfile::TempDir,
}

fn rig(format: qcow2::ImageFormat, read_only: bool) -> Rig {
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
                cluster_size: 4096,
                ..Default::default()
            };
            qcow2::Qcow2::create(&path, &o).expect("create qcow2");
        }
    }
    let disk = Arc::new(Disk::open(&path, format, read_only, false).expect("open disk"));
    let mem =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).expect("guest memory");
    let worker = QueueEngine::new(&disk, 16).expect("worker");
    Rig {
        mem,
        dev: Dev {
            disk,
            worker,
            stats: QueueStats::default(),
        },
        _dir: dir,
    }
}

fn settings() -> DeviceSettings {
    DeviceSettings {
        serial: b"outboard-serial-0001".to_vec(),
        max_dwz_segments: 4,
        poll: Duration::ZERO,
        hold_completions: Duration::ZERO,
    }
}

fn desc(addr: u64, len: u32, flags: u16) -> (u64, u32, u16) {
    (addr, len, flags)
}

impl Dev {
    fn run(&mut self, mem: &GuestMemoryMmap, vq: &MockSplitQueue<GuestMemoryMmap>) -> (u32, u8) {
        let mut q: Queue = vq.create_queue().expect("queue");
        let mut signals = 0;
        let settings = settings();
        self.worker
            .process_all(&mut QueueCtx {
                index: 0,
                settings: &settings,
                writeback: true,
                q: &mut q,
                mem,
                stats: &self.stats,
                signal: &mut || signals += 1,
            })
            .expect("process");
        let used = vq.used().ring().ref_at(0).expect("used").load();
        assert_eq!(vq.used().idx().load(), 1, "exactly one chain completed");
        assert!(signals > 0, "the driver was notified");
        let status: u8 = mem.read_obj(GuestAddress(STATUS)).expect("status");
        (used.len(), status)
    }
}

impl Rig {
    fn header(&self, ty: u32, sector: u64) {
        self.mem.write_obj(ty, GuestAddress(HDR)).expect("hdr");
        self.mem
            .write_obj(0u32, GuestAddress(HDR + 4))
            .expect("hdr");
        self.mem
            .write_obj(sector, GuestAddress(HDR + 8))
            .expect("hdr");
        self.mem
            .write_obj(0xffu8, GuestAddress(STATUS))
            .expect("status");
    }

    /// Submits one chain; returns (used len, status byte).
    fn submit(&mut self, chain: &[(u64, u32, u16)]) -> (u32, u8) {
        let vq = MockSplitQueue::new(&self.mem, 16);
        let descs: Vec<RawDescriptor> = chain
            .iter()
            .enumerate()
            .map(|(i, &(a, l, f))| {
                let next = if i + 1 < chain.len() {
                    VRING_DESC_F_NEXT as u16
                } else {
                    0
                };
                RawDescriptor::from(SplitDescriptor::new(a, l, f | next, i as u16 + 1))
            })
            .collect();
        vq.add_desc_chains(&descs, 0).expect("chain");
        self.dev.run(&self.mem, &vq)
    }

    fn write(&mut self, sector: u64, data: &[u8]) -> u8 {
        self.mem
            .write_slice(data, GuestAddress(DATA))
            .expect("data");
        self.header(VIRTIO_BLK_T_OUT, sector);
        self.submit(&[
            desc(HDR, 16, R),
            desc(DATA, data.len() as u32, R),
            desc(STATUS, 1, W),
        ])
        .1
    }

    fn read(&mut self, sector: u64, len: usize) -> (u8, Vec<u8>) {
        self.mem
            .write_slice(&vec![0xAA; len], GuestAddress(DATA))
            .expect("poison");
        self.header(VIRTIO_BLK_T_IN, sector);
        let (used, st) = self.submit(&[
            desc(HDR, 16, R),
            desc(DATA, len as u32, W),
            desc(STATUS, 1, W),
        ]);
        if st == VIRTIO_BLK_S_OK as u8 {
            assert_eq!(used as usize, len + 1, "used length of a read");
        }
        let mut buf = vec![0u8; len];
        self.mem
            .read_slice(&mut buf, GuestAddress(DATA))
            .expect("data");
        (st, buf)
    }

    fn assert_still_serving(&mut self) {
        let data: Vec<u8> = (0..512u32).map(|i| (i * 7 + 3) as u8).collect();
        assert_eq!(self.write(7, &data), 0);
        assert_eq!(self.read(7, 512), (0, data));
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

#[test]
fn write_then_read_raw_and_qcow2_and_bytes_reach_the_file() {
    for format in [qcow2::ImageFormat::Raw, qcow2::ImageFormat::Qcow2] {
        let mut r = rig(format, false);
        let data = pattern(8192, 5);
        assert_eq!(r.write(3, &data), OK, "{format:?}");
        assert_eq!(r.read(3, 8192), (OK, data.clone()), "{format:?}");
        let mut on_disk = vec![0u8; 8192];
        r.dev
            .disk
            .read_at(&mut on_disk, 3 * 512)
            .expect("read disk");
        assert_eq!(on_disk, data, "{format:?}: bytes on the disk");
        assert_eq!(
            r.dev
                .stats
                .write_bytes
                .load(std::sync::atomic::Ordering::Relaxed),
            8192
        );
    }
}

#[test]
fn header_split_over_descriptors_and_data_over_several() {
    let mut r = rig(qcow2::ImageFormat::Raw, false);
    let data = pattern(1024, 9);
    r.mem
        .write_slice(&data[..512], GuestAddress(DATA))
        .expect("data");
    r.mem
        .write_slice(&data[512..], GuestAddress(DATA + 0x1000))
        .expect("data");
    r.header(VIRTIO_BLK_T_OUT, 10);
    let chain = [
        desc(HDR, 8, R),
        desc(HDR + 8, 8, R),
        desc(DATA, 512, R),
        desc(DATA + 0x1000, 512, R),
        desc(STATUS, 1, W),
    ];
    assert_eq!(r.submit(&chain), (1, OK));
    assert_eq!(r.read(10, 1024), (OK, data));
}

#[test]
fn flush_get_id_and_unsupported() {
    let mut r = rig(qcow2::ImageFormat::Raw, false);
    r.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(r.submit(&[desc(HDR, 16, R), desc(STATUS, 1, W)]), (1, OK));
    r.header(VIRTIO_BLK_T_GET_ID, 0);
    assert_eq!(
        r.submit(&[desc(HDR, 16, R), desc(DATA, 20, W), desc(STATUS, 1, W)]),
        (21, OK)
    );
    let mut id = [0u8; 20];
    r.mem.read_slice(&mut id, GuestAddress(DATA)).expect("id");
    assert_eq!(&id, b"outboard-serial-0001");
    r.header(VIRTIO_BLK_T_SCSI_CMD, 0);
    assert_eq!(r.submit(&[desc(HDR, 16, R), desc(STATUS, 1, W)]).1, UNSUPP);
    r.header(0x7777, 0);
    assert_eq!(r.submit(&[desc(HDR, 16, R), desc(STATUS, 1, W)]).1, UNSUPP);
}

fn dwz(r: &mut Rig, ty: u32, segs: &[(u64, u32, u32)]) -> u8 {
    let mut raw = Vec::new();
    for &(sector, num, flags) in segs {
        raw.extend_from_slice(&sector.to_le_bytes());
        raw.extend_from_slice(&num.to_le_bytes());
        raw.extend_from_slice(&flags.to_le_bytes());
    }
    r.mem
        .write_slice(&raw, GuestAddress(DATA))
        .expect("segments");
    r.header(ty, 0);
    r.submit(&[
        desc(HDR, 16, R),
        desc(DATA, raw.len() as u32, R),
        desc(STATUS, 1, W),
    ])
    .1
}

#[test]
fn write_zeroes_and_discard() {
    for format in [qcow2::ImageFormat::Raw, qcow2::ImageFormat::Qcow2] {
        let mut r = rig(format, false);
        let data = pattern(64 * 1024, 1);
        assert_eq!(r.write(0, &data), OK);
        // Zero 8 KiB at sector 16 (with unmap allowed) and 512 B at sector 100.
        assert_eq!(
            dwz(
                &mut r,
                VIRTIO_BLK_T_WRITE_ZEROES,
                &[(16, 16, 1), (100, 1, 0)]
            ),
            OK
        );
        let mut want = data.clone();
        want[16 * 512..32 * 512].fill(0);
        want[100 * 512..101 * 512].fill(0);
        assert_eq!(r.read(0, 64 * 1024), (OK, want), "{format:?}");
        assert_eq!(dwz(&mut r, VIRTIO_BLK_T_DISCARD, &[(0, 128, 0)]), OK);
        // Discard with the unmap flag is invalid; unknown flags too.
        assert_eq!(dwz(&mut r, VIRTIO_BLK_T_DISCARD, &[(0, 8, 1)]), UNSUPP);
        assert_eq!(dwz(&mut r, VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 8, 2)]), UNSUPP);
        // Out of range, too many segments, ragged payload.
        assert_eq!(
            dwz(&mut r, VIRTIO_BLK_T_WRITE_ZEROES, &[(DISK / 512, 1, 0)]),
            IOERR
        );
        assert_eq!(dwz(&mut r, VIRTIO_BLK_T_DISCARD, &[(0, 1, 0); 5]), IOERR);
        r.header(VIRTIO_BLK_T_DISCARD, 0);
        assert_eq!(
            r.submit(&[desc(HDR, 16, R), desc(DATA, 10, R), desc(STATUS, 1, W)])
                .1,
            IOERR
        );
        r.assert_still_serving();
    }
}

#[test]
fn out_of_range_and_misaligned_requests_fail_cleanly() {
    let mut r = rig(qcow2::ImageFormat::Raw, false);
    assert_eq!(
        r.read(DISK / 512, 512).0,
        IOERR,
        "first sector past the end"
    );
    assert_eq!(r.read(DISK / 512 - 1, 1024).0, IOERR, "straddles the end");
    assert_eq!(r.read(u64::MAX, 512).0, IOERR, "sector * 512 overflows");
    assert_eq!(r.write(u64::MAX / 512, &[0u8; 512]), IOERR);
    assert_eq!(r.read(0, 100).0, IOERR, "length not a multiple of 512");
    r.assert_still_serving();
}

#[test]
fn read_only_disk_refuses_writes() {
    let mut r = rig(qcow2::ImageFormat::Raw, true);
    assert_eq!(r.write(0, &[1u8; 512]), IOERR);
    assert_eq!(dwz(&mut r, VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 1, 0)]), IOERR);
    assert_eq!(r.read(0, 512), (OK, vec![0u8; 512]));
}

#[test]
fn malformed_chains_are_refused_and_the_queue_keeps_serving() {
    let mut r = rig(qcow2::ImageFormat::Raw, false);
    // No writable descriptor at all: nowhere to put a status, used length 0.
    r.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(r.submit(&[desc(HDR, 16, R), desc(DATA, 512, R)]), (0, 0xff));
    r.assert_still_serving();
    // Header shorter than 16 bytes.
    r.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(r.submit(&[desc(HDR, 8, R), desc(STATUS, 1, W)]).1, IOERR);
    r.assert_still_serving();
    // A readable descriptor after a writable one.
    r.header(VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        r.submit(&[
            desc(HDR, 16, R),
            desc(DATA, 512, W),
            desc(DATA, 512, R),
            desc(STATUS, 1, W)
        ])
        .1,
        IOERR
    );
    r.assert_still_serving();
    // Data outside guest memory, and a gigantic length.
    r.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        r.submit(&[
            desc(HDR, 16, R),
            desc(MEM + 4096, 512, W),
            desc(STATUS, 1, W)
        ])
        .1,
        IOERR
    );
    r.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        r.submit(&[
            desc(HDR, 16, R),
            desc(DATA, u32::MAX - 100, W),
            desc(STATUS, 1, W)
        ])
        .1,
        IOERR
    );
    // A chain longer than 4 GiB is cut where it overflows (virtio-queue):
    // the status descriptor is never reached, the chain comes back empty.
    r.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        r.submit(&[
            desc(HDR, 16, R),
            desc(DATA, u32::MAX, W),
            desc(STATUS, 1, W)
        ]),
        (0, 0xff)
    );
    // Header outside guest memory.
    r.mem
        .write_obj(0xffu8, GuestAddress(STATUS))
        .expect("status");
    assert_eq!(
        r.submit(&[desc(u64::MAX - 8, 16, R), desc(STATUS, 1, W)]).1,
        IOERR
    );
    r.assert_still_serving();
    // Zero-length descriptors are skipped.
    r.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(
        r.submit(&[desc(HDR, 16, R), desc(DATA, 0, R), desc(STATUS, 1, W)]),
        (1, OK)
    );
    // Status byte alone (header missing entirely).
    r.mem
        .write_obj(0xffu8, GuestAddress(STATUS))
        .expect("status");
    assert_eq!(r.submit(&[desc(STATUS, 1, W)]).1, IOERR);
    r.assert_still_serving();
    let malformed = r
        .dev
        .stats
        .malformed
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(malformed, 8, "every malformed chain is counted");
}

#[test]
fn descriptor_loop_terminates() {
    let mut r = rig(qcow2::ImageFormat::Raw, false);
    r.header(VIRTIO_BLK_T_IN, 0);
    let vq = MockSplitQueue::new(&r.mem, 16);
    // 0 -> 1 -> 0 -> ... : the chain never ends on its own.
    let descs = [
        RawDescriptor::from(SplitDescriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 1)),
        RawDescriptor::from(SplitDescriptor::new(
            STATUS,
            1,
            (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16,
            0,
        )),
    ];
    vq.add_desc_chains(&descs, 0).expect("chain");
    let (_, st) = r.dev.run(&r.mem, &vq);
    assert_ne!(st, OK, "a looping chain is not a valid request");
    r.assert_still_serving();
}

#[test]
fn indirect_descriptor_table() {
    let mut r = rig(qcow2::ImageFormat::Raw, false);
    let data = pattern(512, 77);
    r.mem.write_slice(&data, GuestAddress(DATA)).expect("data");
    r.header(VIRTIO_BLK_T_OUT, 4);
    let table = 0x40_0000u64;
    let inner = [
        SplitDescriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 1),
        SplitDescriptor::new(DATA, 512, VRING_DESC_F_NEXT as u16, 2),
        SplitDescriptor::new(STATUS, 1, VRING_DESC_F_WRITE as u16, 0),
    ];
    for (i, d) in inner.iter().enumerate() {
        r.mem
            .write_obj(RawDescriptor::from(*d), GuestAddress(table + 16 * i as u64))
            .expect("table");
    }
    let vq = MockSplitQueue::new(&r.mem, 16);
    let head = RawDescriptor::from(SplitDescriptor::new(
        table,
        48,
        VRING_DESC_F_INDIRECT as u16,
        0,
    ));
    vq.add_desc_chains(&[head], 0).expect("chain");
    assert_eq!(r.dev.run(&r.mem, &vq), (1, OK));
    assert_eq!(r.read(4, 512), (OK, data));
}
