//! The vhost-user frontend side of one device: connect and negotiate,
//! read/write config space (GET_CONFIG/SET_CONFIG), hand the memory table,
//! the rings, the kick eventfds (ioeventfds) and the call eventfds (irqfds)
//! to the backend, and stop the rings on reset. Where the backend offers
//! INFLIGHT_SHMFD, the inflight region it hands out at the first start is
//! kept here ([`Inflight`]) and handed to every later instance of the backend
//! before its rings start, so a restarted backend completes what a crashed one
//! had taken. No virtio-pci knowledge.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserInflight};
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use crate::backend_channel::{self, Channel, ConfigChange};
use crate::memory::GuestMemory;

/// VHOST_USER_F_PROTOCOL_FEATURES (a vhost-user bit in the feature word).
pub const PROTOCOL_FEATURES_BIT: u64 = 1 << 30;
/// Most queues we ever ask for.
pub const MAX_QUEUES: u64 = 64;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Could not connect in time.
    #[error("cannot connect to vhost-user backend {0}")]
    Connect(PathBuf, #[source] vhost::Error),
    /// A protocol request failed.
    #[error("vhost-user backend {0}: {1} failed")]
    Request(PathBuf, &'static str, #[source] vhost::Error),
    /// The backend lacks something we need.
    #[error("vhost-user backend {0}: {1}")]
    Refused(PathBuf, String),
    /// Guest memory cannot be shared (not file-backed).
    #[error("guest memory region cannot be shared with the backend")]
    Memory(#[source] vhost::Error),
    /// A ring address is outside guest memory.
    #[error("queue {0}: ring address {1:#x} is outside guest memory")]
    RingAddress(usize, u64),
    /// The backend channel could not be set up.
    #[error("vhost-user backend {0}: backend channel")]
    Channel(PathBuf, #[source] backend_channel::Error),
}

/// What the backend must do for one queue.
#[derive(Debug)]
pub struct QueueSetup<'a> {
    /// Queue index.
    pub index: usize,
    /// Ring size the driver chose.
    pub size: u16,
    /// Largest size we offered.
    pub max_size: u16,
    /// Guest addresses of the descriptor table, available and used rings.
    pub desc: u64,
    /// Available (driver) ring.
    pub avail: u64,
    /// Used (device) ring.
    pub used: u64,
    /// Next available index to process (0 on a fresh start).
    pub base: u16,
    /// Kick eventfd (an ioeventfd on the notify address).
    pub kick: &'a EventFd,
    /// Call eventfd (an irqfd), or none.
    pub call: Option<&'a EventFd>,
    /// Whether the backend processes it from the start (`SET_VRING_ENABLE`):
    /// a multi-queue NIC starts with its first pair only.
    pub enabled: bool,
}

/// The inflight I/O tracking region of a device (vhost-user "Inflight I/O
/// tracking"): a shared memory file the backend allocated (GET_INFLIGHT_FD)
/// and records taken-but-unfinished requests in. The frontend only keeps it
/// and hands it back (SET_INFLIGHT_FD) after a reconnect; it only reads it
/// to log what a restarted backend will resubmit.
pub struct Inflight {
    file: File,
    info: VhostUserInflight,
}

impl std::fmt::Debug for Inflight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inflight")
            .field("mmap_size", &self.info.mmap_size)
            .field("num_queues", &self.info.num_queues)
            .field("queue_size", &self.info.queue_size)
            .finish()
    }
}

impl Inflight {
    /// How many requests the region records as taken from queue `index` and
    /// not yet in its used ring, whose index is `ring_used` now (heads below
    /// `queue_size` only): what a restarted backend resubmits. Read (not
    /// changed) with the rules of the vhost-user spec for split queues: per
    /// queue a 16-byte header `{ features: u64, version: u16, desc_num: u16,
    /// last_batch_head: u16, used_idx: u16 }` then 16-byte entries `{ inflight:
    /// u8, padding: [u8; 5], next: u16, counter: u64 }`; when the header's
    /// used index lags the ring's, the last batch (`last_batch_head`, then
    /// `next`) reached the used ring before its flags were cleared and does
    /// not count. Queues sit back to back, `mmap_size / num_queues` bytes
    /// apart. `None` if the region cannot be read or is not laid out so.
    /// For logs only: the VMM never writes the region.
    pub fn recorded_in_flight(&self, index: usize, ring_used: u16, queue_size: u16) -> Option<u16> {
        const HEADER: usize = 16;
        const ENTRY: usize = 16;
        let nq = u64::from(self.info.num_queues);
        if index as u64 >= nq {
            return None;
        }
        let stride = usize::try_from(self.info.mmap_size / nq).ok()?;
        if stride < HEADER {
            return None;
        }
        let mut q = vec![0u8; stride];
        let off = self.info.mmap_offset + index as u64 * stride as u64;
        std::os::unix::fs::FileExt::read_exact_at(&self.file, &mut q, off).ok()?;
        let u16_at = |o: usize| u16::from_le_bytes([q[o], q[o + 1]]);
        if u16_at(8) == 0 {
            // Never initialised by a backend: nothing recorded.
            return Some(0);
        }
        let desc_num = usize::from(u16_at(10)).min((stride - HEADER) / ENTRY);
        let mut flags: Vec<bool> = (0..desc_num).map(|h| q[HEADER + h * ENTRY] == 1).collect();
        let batch = usize::from(ring_used.wrapping_sub(u16_at(14)));
        let mut head = usize::from(u16_at(12));
        for _ in 0..batch.min(desc_num) {
            let Some(f) = flags.get_mut(head) else {
                break;
            };
            *f = false;
            head = usize::from(u16_at(HEADER + head * ENTRY + 6));
        }
        let n = flags
            .iter()
            .take(usize::from(queue_size))
            .filter(|&&f| f)
            .count();
        u16::try_from(n).ok()
    }
}

/// A connected backend.
pub struct Backend {
    path: PathBuf,
    fe: Frontend,
    features: u64,
    protocol: VhostUserProtocolFeatures,
    queue_num: u64,
    started: Vec<usize>,
    channel: Option<Channel>,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("path", &self.path)
            .field("features", &format_args!("{:#x}", self.features))
            .field("protocol", &self.protocol)
            .field("queue_num", &self.queue_num)
            .finish()
    }
}

impl Backend {
    /// Connects (retrying until `timeout` while the socket is not there yet)
    /// and negotiates the protocol features.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, Error> {
        let t0 = Instant::now();
        let fe = loop {
            match Frontend::connect(path, MAX_QUEUES) {
                Ok(fe) => break fe,
                Err(e) if t0.elapsed() >= timeout => {
                    return Err(Error::Connect(path.into(), e));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let req = |what, e| Error::Request(path.into(), what, e);
        fe.set_owner().map_err(|e| req("SET_OWNER", e))?;
        let features = fe.get_features().map_err(|e| req("GET_FEATURES", e))?;
        let mut b = Backend {
            path: path.into(),
            fe,
            features,
            protocol: VhostUserProtocolFeatures::empty(),
            queue_num: 1,
            started: Vec::new(),
            channel: None,
        };
        if features & PROTOCOL_FEATURES_BIT != 0 {
            let offered =
                b.fe.get_protocol_features()
                    .map_err(|e| req("GET_PROTOCOL_FEATURES", e))?;
            let want = VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::INFLIGHT_SHMFD
                | VhostUserProtocolFeatures::BACKEND_REQ;
            b.protocol = offered & want;
            b.fe.set_protocol_features(b.protocol)
                .map_err(|e| req("SET_PROTOCOL_FEATURES", e))?;
            if b.protocol.contains(VhostUserProtocolFeatures::MQ) {
                b.queue_num =
                    b.fe.get_queue_num()
                        .map_err(|e| req("GET_QUEUE_NUM", e))?
                        .clamp(1, MAX_QUEUES);
            }
        }
        Ok(b)
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Virtio features the backend offers (without the vhost-user bit).
    pub fn features(&self) -> u64 {
        self.features & !PROTOCOL_FEATURES_BIT
    }

    /// Queues the backend supports (1 without MQ).
    pub fn queue_num(&self) -> u64 {
        self.queue_num
    }

    /// Whether config space can be read from the backend.
    pub fn has_config(&self) -> bool {
        self.protocol.contains(VhostUserProtocolFeatures::CONFIG)
    }

    /// Opens the backend channel (SET_BACKEND_REQ_FD) when the backend
    /// offers BACKEND_REQ: `on_config` runs on its thread whenever the backend
    /// reports a config change. A no-op for backends without it.
    pub fn open_backend_channel(&mut self, on_config: ConfigChange) -> Result<(), Error> {
        if !self
            .protocol
            .contains(VhostUserProtocolFeatures::BACKEND_REQ)
        {
            return Ok(());
        }
        let reply_ack = self.protocol.contains(VhostUserProtocolFeatures::REPLY_ACK);
        let name = self.path.display().to_string();
        let channel = Channel::start(&name, reply_ack, on_config)
            .map_err(|e| Error::Channel(self.path.clone(), e))?;
        self.fe
            .set_backend_request_fd(&channel)
            .map_err(|e| Error::Request(self.path.clone(), "SET_BACKEND_REQ_FD", e))?;
        self.channel = Some(channel);
        Ok(())
    }

    /// Whether the backend tracks inflight I/O in a region we keep.
    pub fn has_inflight(&self) -> bool {
        self.protocol
            .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
    }

    /// GET_INFLIGHT_FD: a fresh region for `num_queues` queues of up to
    /// `queue_size` descriptors.
    pub fn get_inflight(&mut self, num_queues: u16, queue_size: u16) -> Result<Inflight, Error> {
        let req = VhostUserInflight::new(0, 0, num_queues, queue_size);
        let (info, file) = self
            .fe
            .get_inflight_fd(&req)
            .map_err(|e| Error::Request(self.path.clone(), "GET_INFLIGHT_FD", e))?;
        if info.mmap_size == 0 {
            return Err(Error::Refused(
                self.path.clone(),
                "returned an empty inflight region".into(),
            ));
        }
        Ok(Inflight { file, info })
    }

    /// SET_INFLIGHT_FD: hands `region` to this backend instance (before the
    /// rings start, so it resubmits what the region records).
    pub fn set_inflight(&mut self, region: &Inflight) -> Result<(), Error> {
        self.fe
            .set_inflight_fd(&region.info, region.file.as_raw_fd())
            .map_err(|e| Error::Request(self.path.clone(), "SET_INFLIGHT_FD", e))
    }

    /// The socket fd (to watch for a hang-up).
    pub fn raw_fd(&self) -> RawFd {
        self.fe.as_raw_fd()
    }

    /// GET_CONFIG of `len` bytes at `offset`.
    pub fn get_config(&mut self, offset: u32, len: u32) -> Result<Vec<u8>, Error> {
        if !self.has_config() {
            return Err(Error::Refused(
                self.path.clone(),
                "does not offer the CONFIG protocol feature (device config space)".into(),
            ));
        }
        let buf = vec![0u8; len as usize];
        let (_, data) = self
            .fe
            .get_config(offset, len, VhostUserConfigFlags::WRITABLE, &buf)
            .map_err(|e| Error::Request(self.path.clone(), "GET_CONFIG", e))?;
        Ok(data)
    }

    /// SET_CONFIG (writable fields such as the block write-cache mode).
    pub fn set_config(&mut self, offset: u32, data: &[u8]) -> Result<(), Error> {
        if !self.has_config() {
            return Ok(());
        }
        self.fe
            .set_config(offset, VhostUserConfigFlags::WRITABLE, data)
            .map_err(|e| Error::Request(self.path.clone(), "SET_CONFIG", e))
    }

    /// Starts the device: features, memory table, then each queue.
    pub fn activate(
        &mut self,
        mem: &GuestMemory,
        acked: u64,
        queues: &[QueueSetup<'_>],
    ) -> Result<(), Error> {
        let path = self.path.clone();
        let req = |what, e| Error::Request(path.clone(), what, e);
        let proto = self.features & PROTOCOL_FEATURES_BIT;
        self.fe
            .set_features(acked | proto)
            .map_err(|e| req("SET_FEATURES", e))?;
        let regions = mem
            .iter()
            .map(|r| VhostUserMemoryRegionInfo::from_guest_region(r).map_err(Error::Memory))
            .collect::<Result<Vec<_>, _>>()?;
        self.fe
            .set_mem_table(&regions)
            .map_err(|e| req("SET_MEM_TABLE", e))?;
        let hva = |q: usize, gpa: u64, len: usize| {
            mem.get_slice(GuestAddress(gpa), len)
                .map(|s| s.ptr_guard().as_ptr() as u64)
                .map_err(|_| Error::RingAddress(q, gpa))
        };
        self.started.clear();
        for q in queues {
            let size = usize::from(q.size);
            let cfg = VringConfigData {
                queue_max_size: q.max_size,
                queue_size: q.size,
                flags: 0,
                desc_table_addr: hva(q.index, q.desc, 16 * size)?,
                used_ring_addr: hva(q.index, q.used, 6 + 8 * size)?,
                avail_ring_addr: hva(q.index, q.avail, 6 + 2 * size)?,
                log_addr: None,
            };
            self.fe
                .set_vring_num(q.index, q.size)
                .map_err(|e| req("SET_VRING_NUM", e))?;
            self.fe
                .set_vring_addr(q.index, &cfg)
                .map_err(|e| req("SET_VRING_ADDR", e))?;
            self.fe
                .set_vring_base(q.index, q.base)
                .map_err(|e| req("SET_VRING_BASE", e))?;
            if let Some(call) = q.call {
                self.fe
                    .set_vring_call(q.index, call)
                    .map_err(|e| req("SET_VRING_CALL", e))?;
            }
            self.fe
                .set_vring_kick(q.index, q.kick)
                .map_err(|e| req("SET_VRING_KICK", e))?;
            if proto != 0 {
                self.fe
                    .set_vring_enable(q.index, q.enabled)
                    .map_err(|e| req("SET_VRING_ENABLE", e))?;
            }
            self.started.push(q.index);
        }
        Ok(())
    }

    /// Enables or disables a started queue (`SET_VRING_ENABLE`; e.g. the
    /// queue pairs a multi-queue guest stops or starts using).
    pub fn set_vring_enable(&mut self, index: usize, enabled: bool) -> Result<(), Error> {
        self.fe
            .set_vring_enable(index, enabled)
            .map_err(|e| Error::Request(self.path.clone(), "SET_VRING_ENABLE", e))
    }

    /// Stops every started queue (GET_VRING_BASE), as on a device reset.
    pub fn stop(&mut self) {
        for q in std::mem::take(&mut self.started) {
            if let Err(e) = self.fe.get_vring_base(q) {
                log::warn!("{}: GET_VRING_BASE({q}): {e}", self.path.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use vmm_sys_util::tempfile::TempFile;

    /// Two queues of 4 descriptors, 128 bytes apart (16 + 4 * 16, 64-aligned).
    const STRIDE: u64 = 128;

    fn put16(f: &File, off: u64, v: u16) {
        f.write_all_at(&v.to_le_bytes(), off).expect("write");
    }

    fn region() -> Inflight {
        let file = TempFile::new().expect("tempfile").into_file();
        file.set_len(2 * STRIDE).expect("size");
        // Queue 1: version 1, desc_num 4, last batch 2 -> 3, used_idx 5;
        // heads 0 to 3 flagged in flight.
        let q = STRIDE;
        put16(&file, q + 8, 1);
        put16(&file, q + 10, 4);
        put16(&file, q + 12, 2);
        put16(&file, q + 14, 5);
        for h in 0..4u64 {
            file.write_all_at(&[1], q + 16 + 16 * h).expect("flag");
        }
        put16(&file, q + 16 + 16 * 2 + 6, 3);
        Inflight {
            file,
            info: VhostUserInflight::new(2 * STRIDE, 0, 2, 4),
        }
    }

    #[test]
    fn recorded_in_flight_follows_the_spec_reconnect_rules() {
        let r = region();
        // The ring's used index equals the recorded one: all four count.
        assert_eq!(r.recorded_in_flight(1, 5, 4), Some(4));
        // Only heads of a ring of 2 count.
        assert_eq!(r.recorded_in_flight(1, 5, 2), Some(2));
        // The ring is 2 ahead: the last batch (2, then 3) was used already.
        assert_eq!(r.recorded_in_flight(1, 7, 4), Some(2));
        // Queue 0 was never initialised; queue 2 does not exist.
        assert_eq!(r.recorded_in_flight(0, 0, 4), Some(0));
        assert_eq!(r.recorded_in_flight(2, 0, 4), None);
    }
}
