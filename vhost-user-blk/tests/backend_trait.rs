//! The queue engine against a [`DiskBackend`] it has never seen: an
//! in-memory disk that holds every completion until the engine kicks it and
//! then completes them in reverse order, with only 4 tags (fewer than a
//! wave), and fails writes past a limit with ENOSPC. Every chain must come
//! back exactly once with the right status, the failure must be counted as
//! "no space", and the bytes must be where they belong: a new backend fits
//! without touching the engine.

use std::collections::HashSet;
use std::os::unix::io::RawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vhost_user_blk::disk::{BackendError, Capabilities, Completion, DiskBackend, DiskOp, OpError};
use vhost_user_blk::queue::{DeviceSettings, Processed, QueueCtx, QueueEngine};
use vhost_user_blk::stats::QueueStats;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const BLOCK: usize = 4096;
const BLOCKS: u64 = 20;
/// Writes at or past this offset fail with ENOSPC.
const FULL_AT: u64 = 19 * BLOCK as u64;
const SIZE: u64 = 1 << 20;
const HDRS: u64 = 0x10_0000;
const STATUS: u64 = 0x20_0000;
const DATA: u64 = 0x40_0000;

/// An in-memory disk completing in reverse order at each kick.
struct ReverseDisk {
    data: Arc<Mutex<Vec<u8>>>,
    held: Vec<Completion>,
    ready: Vec<Completion>,
    max_held: usize,
}

impl DiskBackend for ReverseDisk {
    fn depth(&self) -> usize {
        4
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: false,
            discard: false,
            write_zeroes: false,
        }
    }

    fn size(&self) -> u64 {
        SIZE
    }

    fn submit(&mut self, tag: usize, op: DiskOp<'_>) -> Result<(), OpError> {
        let mut data = self.data.lock().expect("data");
        let result = match op {
            DiskOp::Read { offset, iov } => {
                let mut at = offset as usize;
                for v in iov {
                    // SAFETY: the engine's iovecs are guest memory the test
                    // keeps mapped; `at..at + len` is inside `data` (the
                    // engine checked the range against `size`).
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            data[at..].as_ptr(),
                            v.iov_base.cast::<u8>(),
                            v.iov_len,
                        )
                    };
                    at += v.iov_len;
                }
                Ok((at - offset as usize) as u64)
            }
            DiskOp::Write { offset, iov, .. } if offset >= FULL_AT => {
                let _ = iov;
                Err(OpError::Os {
                    op: "write",
                    source: std::io::Error::from_raw_os_error(libc::ENOSPC),
                })
            }
            DiskOp::Write { offset, iov, .. } => {
                let mut at = offset as usize;
                for v in iov {
                    // SAFETY: as for reads, copying the other way.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            v.iov_base.cast::<u8>(),
                            data[at..].as_mut_ptr(),
                            v.iov_len,
                        )
                    };
                    at += v.iov_len;
                }
                Ok((at - offset as usize) as u64)
            }
            DiskOp::Flush => Ok(0),
            DiskOp::Discard(_) | DiskOp::WriteZeroes(_) => unreachable!("not offered"),
        };
        self.held.push(Completion { tag, result });
        self.max_held = self.max_held.max(self.held.len());
        Ok(())
    }

    fn kick(&mut self, _wait: bool) -> Result<(), BackendError> {
        while let Some(c) = self.held.pop() {
            self.ready.push(c);
        }
        Ok(())
    }

    fn reap(&mut self, f: &mut dyn FnMut(Completion)) -> usize {
        let n = self.ready.len();
        for c in self.ready.drain(..) {
            f(c);
        }
        n
    }

    fn completion_fd(&mut self) -> Result<Option<RawFd>, BackendError> {
        Ok(None)
    }
}

fn pattern(b: u64) -> Vec<u8> {
    (0..BLOCK).map(|i| (i as u64 * 7 + b * 13) as u8).collect()
}

/// Adds request `n` (header, one data descriptor, status) at descriptor
/// `3n`; returns its head.
fn add(
    mem: &GuestMemoryMmap,
    vq: &MockSplitQueue<GuestMemoryMmap>,
    n: u64,
    ty: u32,
    sector: u64,
) -> u16 {
    let hdr = HDRS + n * 16;
    mem.write_obj(ty, GuestAddress(hdr)).expect("hdr");
    mem.write_obj(0u32, GuestAddress(hdr + 4)).expect("hdr");
    mem.write_obj(sector, GuestAddress(hdr + 8)).expect("hdr");
    mem.write_obj(0xffu8, GuestAddress(STATUS + n))
        .expect("status");
    let head = (3 * n) as u16;
    let w = VRING_DESC_F_WRITE as u16;
    let next = VRING_DESC_F_NEXT as u16;
    let data_flags = if ty == VIRTIO_BLK_T_IN { w } else { 0 };
    let descs = [
        RawDescriptor::from(SplitDescriptor::new(hdr, 16, next, head + 1)),
        RawDescriptor::from(SplitDescriptor::new(
            DATA + n * BLOCK as u64,
            BLOCK as u32,
            data_flags | next,
            head + 2,
        )),
        RawDescriptor::from(SplitDescriptor::new(STATUS + n, 1, w, 0)),
    ];
    vq.add_desc_chains(&descs, head).expect("chain");
    head
}

fn process(engine: &mut QueueEngine, q: &mut Queue, mem: &GuestMemoryMmap, stats: &QueueStats) {
    let settings = DeviceSettings {
        serial: Vec::new(),
        max_dwz_segments: 1,
        poll: Duration::ZERO,
        hold_completions: Duration::ZERO,
    };
    let how = engine
        .process_all(&mut QueueCtx {
            index: 0,
            settings: &settings,
            writeback: true,
            q,
            mem,
            stats,
            signal: &mut || {},
        })
        .expect("process");
    assert_eq!(how, Processed::Idle);
}

#[test]
fn an_unknown_backend_completing_out_of_order_serves_every_request_once() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).expect("memory");
    let vq = MockSplitQueue::new(&mem, 256);
    let mut q: Queue = vq.create_queue().expect("queue");
    let data = Arc::new(Mutex::new(vec![0u8; SIZE as usize]));
    let mut engine = QueueEngine::with_backend(Box::new(ReverseDisk {
        data: data.clone(),
        held: Vec::new(),
        ready: Vec::new(),
        max_held: 0,
    }));
    let stats = QueueStats::default();

    // Writes of blocks 0..20 (the last one past the "full" mark), a flush.
    for b in 0..BLOCKS {
        mem.write_slice(&pattern(b), GuestAddress(DATA + b * BLOCK as u64))
            .expect("data");
        add(&mem, &vq, b, VIRTIO_BLK_T_OUT, b * BLOCK as u64 / 512);
    }
    add(&mem, &vq, BLOCKS, VIRTIO_BLK_T_FLUSH, 0);
    process(&mut engine, &mut q, &mem, &stats);
    let n = BLOCKS + 1;
    assert_eq!(vq.used().idx().load(), n as u16, "every chain was returned");
    let mut seen = HashSet::new();
    for i in 0..n as usize {
        let e = vq.used().ring().ref_at(i).expect("used").load();
        assert!(seen.insert(e.id()), "head {} returned twice", e.id());
        assert_eq!(e.len(), 1, "used length of a write or flush");
    }
    for r in 0..n {
        let st: u8 = mem.read_obj(GuestAddress(STATUS + r)).expect("status");
        let want = if r == BLOCKS - 1 { 1 } else { 0 };
        assert_eq!(st, want, "status of request {r}");
    }
    let g = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        g(&stats.err_no_space),
        1,
        "the ENOSPC write is counted as no space"
    );
    assert_eq!((g(&stats.err_io), g(&stats.io_errors)), (0, 1));
    assert_eq!(g(&stats.write_bytes), (BLOCKS - 1) * BLOCK as u64);
    assert_eq!(g(&stats.flushes), 1);
    {
        let d = data.lock().expect("data");
        for b in 0..BLOCKS - 1 {
            let at = (b * BLOCK as u64) as usize;
            assert!(d[at..at + BLOCK] == pattern(b)[..], "block {b} on the disk");
        }
    }

    // Reads back into poisoned buffers.
    mem.write_slice(&vec![0xaa; BLOCKS as usize * BLOCK], GuestAddress(DATA))
        .expect("poison");
    let base = vq.used().idx().load();
    for b in 0..BLOCKS - 1 {
        add(&mem, &vq, b, VIRTIO_BLK_T_IN, b * BLOCK as u64 / 512);
    }
    process(&mut engine, &mut q, &mem, &stats);
    assert_eq!(vq.used().idx().load(), base + (BLOCKS - 1) as u16);
    for b in 0..BLOCKS - 1 {
        let mut got = vec![0u8; BLOCK];
        mem.read_slice(&mut got, GuestAddress(DATA + b * BLOCK as u64))
            .expect("data");
        assert!(got == pattern(b), "read of block {b}");
        let st: u8 = mem.read_obj(GuestAddress(STATUS + b)).expect("status");
        assert_eq!(st, 0, "status of read {b}");
    }
}
