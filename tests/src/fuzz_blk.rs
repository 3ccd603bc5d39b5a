//! Bodies of the block daemon's fuzz targets, shared by the cargo-fuzz crate
//! (`fuzz/`) and the stable smoke test (`tests/fuzz_blk_smoke.rs`):
//!
//! - [`virtio_blk_queue`]: a virtqueue whose descriptor table, available ring
//!   and buffers are arbitrary bytes in guest memory, processed by the real
//!   per-queue engine on a raw (io_uring) or qcow2 disk, optionally after a
//!   "restart" with an inflight region marking arbitrary heads (the
//!   resubmission path walks chains from those heads).
//! - [`vhost_user_messages`]: arbitrary vhost-user messages (with a memfd or
//!   an eventfd attached when the input asks) sent to the real message
//!   handler and `BlkBackend` after a normal handshake.
//!
//! What they look for: panics, hangs, crashes (SIGBUS/SIGSEGV), unbounded
//! allocation. Errors are expected and ignored.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vhost_user_blk::backend::BlkBackend;
use vhost_user_blk::device::BlkDevice;
use vhost_user_blk::disk::Disk;
use vhost_user_blk::inflight::{self, InflightRegion};
use vhost_user_blk::queue::{DeviceSettings, QueueCtx, QueueEngine};
use vhost_user_blk::stats::QueueStats;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Guest memory of the queue target.
pub const MEM_SIZE: usize = 64 << 10;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const DISK_SIZE: u64 = 1 << 20;

struct Disks {
    _dir: tempfile::TempDir,
    raw: Arc<Disk>,
    qcow2: Arc<Disk>,
}

fn disks() -> &'static Disks {
    static DISKS: OnceLock<Disks> = OnceLock::new();
    DISKS.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let raw = dir.path().join("raw");
        File::create(&raw)
            .and_then(|f| f.set_len(DISK_SIZE))
            .expect("raw disk");
        let q = dir.path().join("qcow2");
        let o = qcow2::CreateOptions {
            size: DISK_SIZE,
            cluster_size: 4096,
            ..Default::default()
        };
        qcow2::Qcow2::create(&q, &o).expect("qcow2 disk");
        let open = |p: &std::path::Path, f| Arc::new(Disk::open(p, f, false, false).expect("open"));
        Disks {
            raw: open(&raw, qcow2::ImageFormat::Raw),
            qcow2: open(&q, qcow2::ImageFormat::Qcow2),
            _dir: dir,
        }
    })
}

fn settings() -> DeviceSettings {
    DeviceSettings {
        serial: b"fuzz".to_vec(),
        max_dwz_segments: 4,
        poll: Duration::ZERO,
        hold_completions: Duration::ZERO,
    }
}

/// Input: `[flags, log2 queue size, avail idx lo, hi, inflight heads count,
/// heads..., memory bytes...]`. Flags: bit 0 qcow2, bit 1 EVENT_IDX, bit 2
/// inflight restart, bit 3 write-through. Returns the number of requests
/// completed (a depth signal for the smoke test).
pub fn virtio_blk_queue(data: &[u8]) -> u64 {
    let Some((&flags, rest)) = data.split_first() else {
        return 0;
    };
    let Some((&qlog, rest)) = rest.split_first() else {
        return 0;
    };
    let size = 1u16 << (qlog % 9);
    let (avail_idx, rest) = match rest {
        [a, b, rest @ ..] => (u16::from_le_bytes([*a, *b]), rest),
        _ => return 0,
    };
    let (heads, rest) = match rest.split_first() {
        Some((&n, rest)) if flags & 4 != 0 => {
            let n = usize::from(n % 8).min(rest.len());
            rest.split_at(n)
        }
        _ => (&[][..], rest),
    };
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]) else {
        return 0;
    };
    let n = rest.len().min(MEM_SIZE);
    let _ = mem.write_slice(&rest[..n], GuestAddress(0));
    let _ = mem.write_obj(avail_idx.to_le(), GuestAddress(AVAIL + 2));
    let d = disks();
    let disk = if flags & 1 != 0 { &d.qcow2 } else { &d.raw };
    let Ok(mut worker) = QueueEngine::new(disk, size) else {
        return 0;
    };
    let mut q = match Queue::new(size) {
        Ok(q) => q,
        Err(_) => return 0,
    };
    q.set_size(size);
    q.set_desc_table_address(Some(0), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_event_idx(flags & 2 != 0);
    q.set_ready(true);
    let _region_file;
    if flags & 4 != 0 {
        let Ok((file, len)) = inflight::create(1, size) else {
            return 0;
        };
        // version 1, desc_num, then the heads marked in flight (spec layout).
        use std::os::unix::fs::FileExt;
        let _ = file.write_all_at(&1u16.to_le_bytes(), 8);
        let _ = file.write_all_at(&size.to_le_bytes(), 10);
        for (i, &h) in heads.iter().enumerate() {
            let off = 16 + 16 * u64::from(h);
            let _ = file.write_all_at(&[1], off);
            let _ = file.write_all_at(&(i as u64).to_le_bytes(), off + 8);
        }
        let Ok(dup) = file.try_clone() else {
            return 0;
        };
        let Ok(region) = InflightRegion::map(dup, 0, len, 1, size) else {
            return 0;
        };
        worker.set_inflight(Arc::new(region).queue(0));
        _region_file = file;
    }
    let stats = QueueStats::default();
    let settings = settings();
    let _ = worker.process(&mut QueueCtx {
        index: 0,
        settings: &settings,
        writeback: flags & 8 == 0,
        q: &mut q,
        mem: &mem,
        stats: &stats,
        signal: &mut || {},
    });
    stats.requests.load(std::sync::atomic::Ordering::Relaxed)
}

const FRONTEND_VERSION: u32 = 1;

fn message(req: u32, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(12 + payload.len());
    m.extend_from_slice(&req.to_le_bytes());
    m.extend_from_slice(&FRONTEND_VERSION.to_le_bytes());
    m.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    m.extend_from_slice(payload);
    m
}

fn memfd(len: u64) -> Option<File> {
    let f = tempfile::tempfile().ok()?;
    f.set_len(len).ok()?;
    Some(f)
}

/// Input: records `[request, fds, len, payload[len]]`: `request % 48` is
/// the message type (+ flag bits from the high bits), `fds % 3` how many fds
/// to attach (a 64 KiB memory file, then an eventfd). They follow a normal
/// handshake (owner, features, protocol features). Returns the number of
/// reply bytes the handler sent.
pub fn vhost_user_messages(data: &[u8]) -> u64 {
    let d = disks();
    let Ok(device) = BlkDevice::new(d.raw.clone(), 2, 64, true, settings()) else {
        return 0;
    };
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let Ok(mut daemon) =
        VhostUserDaemon::new("fuzz".into(), BlkBackend::new(Arc::new(device)), mem)
    else {
        return 0;
    };
    let Ok(dir) = tempfile::tempdir() else {
        return 0;
    };
    let path = dir.path().join("s");
    let Ok(mut listener) = Listener::new(&path, true) else {
        return 0;
    };
    let Ok(client) = UnixStream::connect(&path) else {
        return 0;
    };
    if daemon.start(&mut listener).is_err() {
        return 0;
    }
    let _ = client.set_read_timeout(Some(Duration::from_secs(10)));
    let mut out = Vec::new();
    out.extend(message(3, &[])); // SET_OWNER
                                 // SET_FEATURES: VERSION_1 | PROTOCOL_FEATURES (any refused message ends
                                 // the connection, so the handshake must be valid).
    out.extend(message(2, &(1u64 << 32 | 1 << 30).to_le_bytes()[..]));
    // SET_PROTOCOL_FEATURES: MQ, REPLY_ACK, CONFIG, INFLIGHT_SHMFD,
    // CONFIGURE_MEM_SLOTS.
    let proto: u64 = 1 | 1 << 3 | 1 << 9 | 1 << 12 | 1 << 15;
    out.extend(message(16, &proto.to_le_bytes()[..]));
    let _ = (&client).write_all(&out);
    // The handshake asks for nothing; GET_FEATURES does, so replies prove it ran.
    let _ = (&client).write_all(&message(1, &[]));
    let (Some(mem_file), Ok(event)) = (
        memfd(MEM_SIZE as u64),
        vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK),
    ) else {
        return 0;
    };
    let pool = [mem_file.as_raw_fd(), event.as_raw_fd()];
    let mut rest = data;
    while let [req, nfd, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (payload, next) = tail.split_at(n);
        rest = next;
        let code = u32::from(req % 48);
        let flags = u32::from(req >> 6) << 2; // REPLY / NEED_REPLY bits
        let mut m = message(code, payload);
        m[4..8].copy_from_slice(&(FRONTEND_VERSION | flags).to_le_bytes());
        let fds = &pool[..usize::from(nfd % 3)];
        let sent = if fds.is_empty() {
            (&client).write_all(&m).is_ok()
        } else {
            client.send_with_fds(&[&m[..]], fds).is_ok()
        };
        if !sent {
            break;
        }
    }
    let _ = client.shutdown(std::net::Shutdown::Write);
    let mut sink = Vec::new();
    let _ = (&client).read_to_end(&mut sink);
    let _ = daemon.wait();
    sink.len() as u64
}
