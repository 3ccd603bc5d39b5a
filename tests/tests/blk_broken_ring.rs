//! A guest that breaks its ring, against the running block daemon: the test
//! is the vhost-user frontend (raw messages, guest memory in a file it maps
//! itself) of a `vhost-user-blk` with one queue and a control socket.
//!
//! After a good write, the driver publishes an available index far past
//! the ring and kicks again and again: each pass is counted in the queue's
//! `ring_errors`, the log explains it (rate-limited: a few lines, not one
//! per kick) and the daemon stays up. The driver then repairs the index and
//! kicks: the queue serves again (before, the error ended the queue's
//! thread until the frontend reconnected). A read past the end of the disk
//! is counted as `err_malformed` and logged with its reason.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use outboard_tests::blkio_client::{create_image, ours_command, Daemon, DaemonConfig, Format};
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
const QSIZE: u16 = 16;
const NEXT: u16 = 1;
const WRITE: u16 = 2;
const DESC: u64 = 0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const HDR: u64 = 0x1_0000;
const DATA: u64 = 0x2_0000;
const STATUS: u64 = 0x3_0000;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const DISK: u64 = 1 << 20;

/// Guest memory: a file mapped shared in the test.
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
        // SAFETY: in bounds of our mapping (checked above); the daemon only
        // reads these bytes after the kick that follows.
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

    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = Vec::with_capacity(16);
        d.extend_from_slice(&addr.to_le_bytes());
        d.extend_from_slice(&len.to_le_bytes());
        d.extend_from_slice(&flags.to_le_bytes());
        d.extend_from_slice(&next.to_le_bytes());
        self.write(DESC + 16 * u64::from(i), &d);
    }

    /// Request `n`: header, one data descriptor, status; head `3n`.
    fn request(&self, n: u16, ty: u32, sector: u64, len: u32) -> u16 {
        let head = 3 * n;
        let hdr = HDR + 16 * u64::from(n);
        let mut h = Vec::new();
        h.extend_from_slice(&ty.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&sector.to_le_bytes());
        self.write(hdr, &h);
        self.write(STATUS + u64::from(n), &[0xff]);
        let data_flags = if ty == T_IN { WRITE } else { 0 };
        self.desc(head, hdr, 16, NEXT, head + 1);
        self.desc(
            head + 1,
            DATA + 0x1000 * u64::from(n),
            len,
            data_flags | NEXT,
            head + 2,
        );
        self.desc(head + 2, STATUS + u64::from(n), 1, WRITE, 0);
        head
    }

    fn set_avail(&self, slot: u16, head: u16) {
        self.write(AVAIL + 4 + 2 * u64::from(slot % QSIZE), &head.to_le_bytes());
    }

    fn set_avail_idx(&self, idx: u16) {
        self.write(AVAIL + 2, &idx.to_le_bytes());
    }

    fn used_idx(&self) -> u16 {
        let b = self.read(USED + 2, 2);
        u16::from_le_bytes([b[0], b[1]])
    }

    fn status(&self, n: u16) -> u8 {
        self.read(STATUS + u64::from(n), 1)[0]
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

/// Connects and sets up queue 0 over `mem`; returns the connection (kept
/// open) and the kick and call eventfds.
fn connect(socket: &Path, mem: &GuestMem) -> (Conn, OwnedFd, OwnedFd) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let s = loop {
        match UnixStream::connect(socket) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                eprintln!("connect: {e}, retrying");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("connect: {e}"),
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut c = Conn(s);
    c.send(SET_OWNER, &[], &[]);
    let f = c.get_u64(GET_FEATURES);
    assert!(f & VERSION_1 != 0 && f & F_PROTOCOL_FEATURES != 0);
    // No EVENT_IDX: the device signals every batch it completes.
    c.send(
        SET_FEATURES,
        &(VERSION_1 | F_PROTOCOL_FEATURES).to_le_bytes(),
        &[],
    );
    let p = c.get_u64(GET_PROTOCOL_FEATURES);
    // Without REPLY_ACK (bit 3).
    c.send(SET_PROTOCOL_FEATURES, &(p & !8).to_le_bytes(), &[]);
    let mut table = Vec::new();
    table.extend_from_slice(&1u32.to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes());
    for v in [0u64, MEM_SIZE as u64, HVA, 0] {
        table.extend_from_slice(&v.to_le_bytes());
    }
    c.send(SET_MEM_TABLE, &table, &[mem.file.as_raw_fd()]);
    let state = |n: u32| [0u32.to_le_bytes(), n.to_le_bytes()].concat();
    c.send(SET_VRING_NUM, &state(u32::from(QSIZE)), &[]);
    let mut addr = Vec::new();
    addr.extend_from_slice(&0u32.to_le_bytes());
    addr.extend_from_slice(&0u32.to_le_bytes());
    for v in [HVA + DESC, HVA + USED, HVA + AVAIL, 0] {
        addr.extend_from_slice(&v.to_le_bytes());
    }
    c.send(SET_VRING_ADDR, &addr, &[]);
    c.send(SET_VRING_BASE, &state(0), &[]);
    let call = eventfd();
    c.send(SET_VRING_CALL, &0u64.to_le_bytes(), &[call.as_raw_fd()]);
    let k = eventfd();
    c.send(SET_VRING_KICK, &0u64.to_le_bytes(), &[k.as_raw_fd()]);
    c.send(SET_VRING_ENABLE, &state(1), &[]);
    // A round trip: every message above was handled.
    c.get_u64(GET_FEATURES);
    (c, k, call)
}

/// Queue 0's counters from the control socket.
fn queue_stats(ctl: &Path) -> serde_json::Value {
    let mut s = UnixStream::connect(ctl).expect("control socket");
    s.write_all(b"{\"cmd\":\"stats\"}\n")
        .expect("stats request");
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).expect("stats reply");
    let v: serde_json::Value = serde_json::from_str(&line).expect("stats json");
    v["queues"][0].clone()
}

fn counter(ctl: &Path, name: &str) -> u64 {
    queue_stats(ctl)[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name:?}"))
}

fn wait_until(what: &str, d: &mut Daemon, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ok() {
        assert!(d.is_running(), "daemon died:\n{}", d.log_text());
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_broken_ring_is_counted_and_logged_and_the_queue_serves_again_once_repaired() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.raw");
    create_image(&image, Format::Raw, DISK);
    let cfg = DaemonConfig {
        image,
        format: Format::Raw,
        socket: dir.path().join("vhost.sock"),
        num_queues: 1,
        direct: false,
    };
    let ctl = dir.path().join("ctl.sock");
    let mut cmd = ours_command(&outboard_tests::workspace_binary("vhost-user-blk"), &cfg);
    cmd.arg("--control-socket").arg(&ctl);
    let mut d = Daemon::spawn("vhost-user-blk", cmd, &cfg.socket, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}"));
    let mem = GuestMem::new();
    let (_conn, kicks, _call) = connect(&cfg.socket, &mem);

    // A good write of 4 KiB to sector 8.
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i % 253) as u8).collect();
    mem.write(DATA, &pattern);
    let h = mem.request(0, T_OUT, 8, 4096);
    mem.set_avail(0, h);
    mem.set_avail_idx(1);
    kick(&kicks);
    wait_until("the write", &mut d, || mem.used_idx() == 1);
    assert_eq!(mem.status(0), 0, "write status");

    // The driver breaks its ring: an available index 1000 entries ahead.
    mem.set_avail_idx(1001);
    let kicks_sent = 20u64;
    for i in 1..=kicks_sent {
        kick(&kicks);
        wait_until("the broken ring counted", &mut d, || {
            counter(&ctl, "ring_errors") >= i
        });
    }
    assert!(d.is_running(), "daemon died:\n{}", d.log_text());
    let log = d.log_text();
    let lines = log
        .lines()
        .filter(|l| l.contains("queue 0: virtqueue") && l.contains("InvalidAvailRingIndex"))
        .count();
    assert!(lines >= 1, "the broken ring is logged:\n{log}");
    assert!(
        lines <= 5,
        "{kicks_sent} kicks on a broken ring, {lines} log lines (rate-limited to 5 per window):\n{log}"
    );
    // Refused before `virtio-queue` would log it on every pop.
    assert!(!log.contains("Iterator error"), "{log}");
    assert_eq!(mem.used_idx(), 1, "nothing used from a broken ring");

    // The driver repairs the ring (its next request at slot 1) and kicks:
    // the same queue, on the same connection, serves it.
    let h = mem.request(1, T_IN, 8, 4096);
    mem.set_avail(1, h);
    mem.set_avail_idx(2);
    kick(&kicks);
    wait_until("the read after the repair", &mut d, || mem.used_idx() == 2);
    assert_eq!(mem.status(1), 0, "read status");
    assert!(
        mem.read(DATA + 0x1000, 4096) == pattern,
        "the read returns what was written"
    );

    // A read past the end of the disk: IOERR, counted as malformed (the
    // guest's fault, not the host's) and explained in the log.
    let before = queue_stats(&ctl);
    let h = mem.request(2, T_IN, DISK / 512, 4096);
    mem.set_avail(2, h);
    mem.set_avail_idx(3);
    kick(&kicks);
    wait_until("the out-of-range read", &mut d, || mem.used_idx() == 3);
    assert_eq!(mem.status(2), 1, "IOERR for a read past the end");
    let after = queue_stats(&ctl);
    let delta = |k: &str| after[k].as_u64().unwrap_or(0) - before[k].as_u64().unwrap_or(0);
    assert_eq!(
        (delta("io_errors"), delta("err_malformed"), delta("err_io")),
        (1, 1, 0),
        "{after}"
    );
    let log = d.log_text();
    assert!(
        log.contains("failed: sector 2048, 4096 bytes: not aligned or beyond the disk"),
        "{log}"
    );
    assert!(d.is_running(), "{}", d.log_text());
    d.stop();
}
