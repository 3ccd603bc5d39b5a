//! A minimal raw vhost-user frontend for tests that play a (possibly hostile)
//! guest against a running daemon: guest memory in a file the test maps
//! itself ([`GuestMem`]), split rings laid out at fixed guest addresses, the
//! messages of the handshake sent by hand ([`Conn`], [`connect`]) and
//! eventfds to kick with ([`kick`]).
//!
//! Layout: queue `q`'s descriptor table is at `q * 0x4000`, its available
//! ring 0x1000 and its used ring 0x2000 above ([`ring`]); the caller keeps
//! its buffers above the last queue's rings. The memory is one region at
//! guest address 0, mapped at [`HVA`] in the frontend's address space.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// VHOST_USER_GET_FEATURES.
pub const GET_FEATURES: u32 = 1;
/// VHOST_USER_SET_FEATURES.
pub const SET_FEATURES: u32 = 2;
/// VHOST_USER_SET_OWNER.
pub const SET_OWNER: u32 = 3;
/// VHOST_USER_SET_MEM_TABLE.
pub const SET_MEM_TABLE: u32 = 5;
/// VHOST_USER_SET_VRING_NUM.
pub const SET_VRING_NUM: u32 = 8;
/// VHOST_USER_SET_VRING_ADDR.
pub const SET_VRING_ADDR: u32 = 9;
/// VHOST_USER_SET_VRING_BASE.
pub const SET_VRING_BASE: u32 = 10;
/// VHOST_USER_SET_VRING_KICK.
pub const SET_VRING_KICK: u32 = 12;
/// VHOST_USER_SET_VRING_CALL.
pub const SET_VRING_CALL: u32 = 13;
/// VHOST_USER_GET_PROTOCOL_FEATURES.
pub const GET_PROTOCOL_FEATURES: u32 = 15;
/// VHOST_USER_SET_PROTOCOL_FEATURES.
pub const SET_PROTOCOL_FEATURES: u32 = 16;
/// VHOST_USER_SET_VRING_ENABLE.
pub const SET_VRING_ENABLE: u32 = 18;
/// VIRTIO_F_VERSION_1.
pub const VERSION_1: u64 = 1 << 32;
/// VHOST_USER_F_PROTOCOL_FEATURES.
pub const F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// Where the frontend says guest memory is mapped (its "host virtual
/// address"), as the ring addresses are given.
pub const HVA: u64 = 0x7f00_0000_0000;
/// VIRTQ_DESC_F_NEXT.
pub const NEXT: u16 = 1;
/// VIRTQ_DESC_F_WRITE.
pub const WRITE: u16 = 2;

/// Queue `q`'s descriptor table, available ring and used ring.
pub fn ring(q: u64) -> [u64; 3] {
    let base = q * 0x4000;
    [base, base + 0x1000, base + 0x2000]
}

/// Guest memory: a file mapped shared in the test, with split rings of
/// `queue_size` entries laid out by [`ring`].
#[derive(Debug)]
pub struct GuestMem {
    file: File,
    ptr: *mut u8,
    size: usize,
    queue_size: u16,
}

impl GuestMem {
    /// `size` bytes of zeroed guest memory for rings of `queue_size`.
    pub fn new(size: usize, queue_size: u16) -> GuestMem {
        assert!(
            queue_size <= 256,
            "a descriptor table of {queue_size} entries overflows its 4 KiB"
        );
        let file = tempfile::tempfile().expect("tempfile");
        file.set_len(size as u64).expect("size");
        // SAFETY: a fresh shared mapping of a file we own, of its size.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
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
            size,
            queue_size,
        }
    }

    /// The size of guest memory in bytes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The number of entries of each ring.
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// Writes `data` at guest address `gpa`.
    pub fn write(&self, gpa: u64, data: &[u8]) {
        assert!(gpa as usize + data.len() <= self.size);
        // SAFETY: in bounds of our mapping (checked above); the daemon only
        // reads these bytes after the kick that follows.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(gpa as usize), data.len())
        };
    }

    /// Reads `len` bytes at guest address `gpa`.
    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        assert!(gpa as usize + len <= self.size);
        let mut v = vec![0u8; len];
        // SAFETY: in bounds of our mapping; a racing daemon write can only
        // change the bytes we copy, not their validity.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(gpa as usize), v.as_mut_ptr(), len) };
        v
    }

    /// The little-endian u16 at guest address `gpa`.
    pub fn u16_at(&self, gpa: u64) -> u16 {
        let b = self.read(gpa, 2);
        u16::from_le_bytes([b[0], b[1]])
    }

    /// Writes descriptor `i` of queue `q`.
    pub fn desc(&self, q: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = Vec::with_capacity(16);
        d.extend_from_slice(&addr.to_le_bytes());
        d.extend_from_slice(&len.to_le_bytes());
        d.extend_from_slice(&flags.to_le_bytes());
        d.extend_from_slice(&next.to_le_bytes());
        self.write(ring(q)[0] + 16 * u64::from(i), &d);
    }

    /// Makes `heads` available on queue `q` after the `start` entries
    /// already there and sets the index to `idx`.
    pub fn avail(&self, q: u64, start: u16, heads: &[u16], idx: u16) {
        for (i, h) in heads.iter().enumerate() {
            let at = ring(q)[1] + 4 + 2 * u64::from((start + i as u16) % self.queue_size);
            self.write(at, &h.to_le_bytes());
        }
        self.write(ring(q)[1] + 2, &idx.to_le_bytes());
    }

    /// The index of queue `q`'s used ring.
    pub fn used_idx(&self, q: u64) -> u16 {
        self.u16_at(ring(q)[2] + 2)
    }

    /// (id, len) of used entry `i` of queue `q`.
    pub fn used(&self, q: u64, i: u16) -> (u32, u32) {
        let b = self.read(ring(q)[2] + 4 + 8 * u64::from(i % self.queue_size), 8);
        (
            u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        )
    }
}

impl Drop for GuestMem {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping made in `new`, used by nobody after.
        unsafe { libc::munmap(self.ptr.cast(), self.size) };
    }
}

/// The frontend's end of the vhost-user socket.
#[derive(Debug)]
pub struct Conn(UnixStream);

impl Conn {
    /// Sends message `req` (version 1, no flags) with `payload`, passing
    /// `fds` alongside when there are any.
    pub fn send(&self, req: u32, payload: &[u8], fds: &[RawFd]) {
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

    /// Sends `req` and reads its u64 reply.
    pub fn get_u64(&mut self, req: u32) -> u64 {
        self.send(req, &[], &[]);
        let mut b = [0u8; 20];
        self.0.read_exact(&mut b).expect("reply");
        u64::from_le_bytes(b[12..20].try_into().expect("8 bytes"))
    }
}

/// The payload of a vring state message: queue `q`, value `n`.
pub fn vring_state(q: u32, n: u32) -> Vec<u8> {
    [q.to_le_bytes(), n.to_le_bytes()].concat()
}

/// A fresh non-blocking eventfd.
pub fn eventfd() -> OwnedFd {
    // SAFETY: eventfd creates a new fd we own.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    assert!(fd >= 0, "eventfd");
    // SAFETY: just created, owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Signals the eventfd `fd` once.
pub fn kick(fd: &OwnedFd) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writing 8 bytes from a local buffer to our eventfd.
    let n = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), 8) };
    assert_eq!(n, 8, "kick");
}

/// Connects to `socket` (trying again for `retry` while it refuses) and
/// sets up `queues` queues over `mem`: SET_OWNER, features (VERSION_1,
/// PROTOCOL_FEATURES and `device_features`, which the device must offer),
/// the protocol features it offers without REPLY_ACK, the memory table, and
/// for each queue its size, addresses, base 0, call and kick eventfds and
/// enable. Returns the connection (kept open) and the kick and call
/// eventfds, one of each per queue.
pub fn connect(
    socket: &Path,
    mem: &GuestMem,
    queues: u32,
    device_features: u64,
    retry: Duration,
) -> (Conn, Vec<OwnedFd>, Vec<OwnedFd>) {
    let deadline = Instant::now() + retry;
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
    let features = VERSION_1 | F_PROTOCOL_FEATURES | device_features;
    let f = c.get_u64(GET_FEATURES);
    assert!(
        f & features == features,
        "device features {f:#x}, wanted {features:#x}"
    );
    c.send(SET_FEATURES, &features.to_le_bytes(), &[]);
    let p = c.get_u64(GET_PROTOCOL_FEATURES);
    // Without REPLY_ACK (bit 3).
    c.send(SET_PROTOCOL_FEATURES, &(p & !8).to_le_bytes(), &[]);
    let mut table = Vec::new();
    table.extend_from_slice(&1u32.to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes());
    for v in [0u64, mem.size() as u64, HVA, 0] {
        table.extend_from_slice(&v.to_le_bytes());
    }
    c.send(SET_MEM_TABLE, &table, &[mem.file.as_raw_fd()]);
    let (mut kicks, mut calls) = (Vec::new(), Vec::new());
    for q in 0..queues {
        c.send(
            SET_VRING_NUM,
            &vring_state(q, u32::from(mem.queue_size())),
            &[],
        );
        let r = ring(u64::from(q));
        let mut addr = Vec::new();
        addr.extend_from_slice(&q.to_le_bytes());
        addr.extend_from_slice(&0u32.to_le_bytes());
        for v in [HVA + r[0], HVA + r[2], HVA + r[1], 0] {
            addr.extend_from_slice(&v.to_le_bytes());
        }
        c.send(SET_VRING_ADDR, &addr, &[]);
        c.send(SET_VRING_BASE, &vring_state(q, 0), &[]);
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
        c.send(SET_VRING_ENABLE, &vring_state(q, 1), &[]);
        kicks.push(k);
        calls.push(call);
    }
    // A round trip: every message above was handled.
    c.get_u64(GET_FEATURES);
    (c, kicks, calls)
}
