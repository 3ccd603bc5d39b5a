//! The tap device: `/dev/net/tun` opened once per queue pair with
//! IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE, non-blocking, with
//! a 12-byte virtio-net header. Knows nothing of virtio queues.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Longest interface name (IFNAMSIZ without the NUL).
pub const MAX_NAME_LEN: usize = libc::IFNAMSIZ - 1;

/// Tap errors.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name does not fit IFNAMSIZ or contains a NUL.
    #[error("invalid interface name {0:?} (1 to 15 bytes)")]
    Name(String),
    /// `/dev/net/tun` could not be opened.
    #[error("opening /dev/net/tun")]
    Open(#[source] std::io::Error),
    /// TUNSETIFF failed (name taken by a non-tap, flags mismatch, no permission).
    #[error("creating or attaching tap {name:?}")]
    SetIff {
        /// The requested name.
        name: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Another ioctl failed.
    #[error("{what} on tap {name}")]
    Ioctl {
        /// The ioctl.
        what: &'static str,
        /// The tap.
        name: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// An open tap with one fd per queue pair.
#[derive(Debug)]
pub struct Tap {
    name: String,
    queues: Vec<OwnedFd>,
    ufo: bool,
}

fn ifreq(name: &str, flags: libc::c_int) -> libc::ifreq {
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = flags as libc::c_short;
    req
}

impl Tap {
    /// Creates tap `name` (or attaches to an existing tap of that name) with
    /// `queue_pairs` queues, without carrier. A name with `%d` lets the
    /// kernel pick a number.
    pub fn open(name: &str, queue_pairs: u16) -> Result<Tap, TapError> {
        if name.is_empty() || name.len() > MAX_NAME_LEN || name.contains('\0') {
            return Err(TapError::Name(name.into()));
        }
        let flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | libc::IFF_MULTI_QUEUE;
        let mut queues = Vec::with_capacity(usize::from(queue_pairs));
        let mut actual = name.to_string();
        for _ in 0..queue_pairs.max(1) {
            // SAFETY: a plain open(2) of a NUL-terminated path.
            let fd = unsafe {
                libc::open(
                    c"/dev/net/tun".as_ptr(),
                    libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
                )
            };
            if fd < 0 {
                return Err(TapError::Open(std::io::Error::last_os_error()));
            }
            // SAFETY: `fd` was just opened and is owned by nobody else.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let mut req = ifreq(&actual, flags);
            // SAFETY: TUNSETIFF reads and writes one ifreq we own.
            let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req) };
            if r < 0 {
                return Err(TapError::SetIff {
                    name: actual,
                    source: std::io::Error::last_os_error(),
                });
            }
            // The kernel fills in the real name (e.g. for "tap%d").
            let bytes: Vec<u8> = req
                .ifr_name
                .iter()
                .take_while(|&&c| c != 0)
                .map(|&c| c as u8)
                .collect();
            actual = String::from_utf8_lossy(&bytes).into_owned();
            queues.push(fd);
        }
        let mut tap = Tap {
            name: actual,
            queues,
            ufo: false,
        };
        tap.set_vnet_hdr_len(crate::virtio::HDR_LEN)?;
        // UFO was removed from Linux 4.14 and brought back for taps only:
        // probe it, then start with no offloads until the guest acks some.
        tap.ufo = tap.set_offload(libc::TUN_F_CSUM | libc::TUN_F_UFO).is_ok();
        tap.set_offload(0)?;
        // Attaching turned the carrier on: off until a driver starts.
        tap.set_carrier(false)?;
        Ok(tap)
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Number of queues (fds).
    pub fn queues(&self) -> usize {
        self.queues.len()
    }

    /// The fd of queue pair `i`.
    pub fn fd(&self, i: usize) -> Option<RawFd> {
        self.queues.get(i).map(AsRawFd::as_raw_fd)
    }

    /// Whether the tap accepts TUN_F_UFO.
    pub fn supports_ufo(&self) -> bool {
        self.ufo
    }

    fn ioctl_all(
        &self,
        what: &'static str,
        req: libc::Ioctl,
        arg: libc::c_ulong,
    ) -> Result<(), TapError> {
        for fd in &self.queues {
            // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
            let r = unsafe { libc::ioctl(fd.as_raw_fd(), req, arg) };
            if r < 0 {
                return Err(TapError::Ioctl {
                    what,
                    name: self.name.clone(),
                    source: std::io::Error::last_os_error(),
                });
            }
        }
        Ok(())
    }

    /// TUNSETQUEUE: attaches (`true`) or detaches queue `i`. The kernel
    /// spreads received frames over the attached queues only, so queues of
    /// pairs the driver does not use must be detached.
    pub fn set_queue_attached(&self, i: usize, attached: bool) -> Result<(), TapError> {
        let Some(fd) = self.queues.get(i) else {
            return Ok(());
        };
        let flags = if attached {
            libc::IFF_ATTACH_QUEUE
        } else {
            libc::IFF_DETACH_QUEUE
        };
        let mut req = ifreq("", flags);
        // SAFETY: TUNSETQUEUE reads one ifreq we own.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETQUEUE, &mut req) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            // Attaching an attached queue (or detaching a detached one) is EINVAL.
            if e.raw_os_error() == Some(libc::EINVAL) {
                return Ok(());
            }
            return Err(TapError::Ioctl {
                what: "TUNSETQUEUE",
                name: self.name.clone(),
                source: e,
            });
        }
        Ok(())
    }

    /// TUNSETCARRIER: the link's carrier (its operational state: a bridge
    /// forwards to the port only with carrier). Needs no privilege, so it
    /// works after the daemon dropped root.
    pub fn set_carrier(&self, on: bool) -> Result<(), TapError> {
        self.int_ioctl("TUNSETCARRIER", libc::TUNSETCARRIER, libc::c_int::from(on))
    }

    /// TUNSETPERSIST: whether the tap outlives its last fd (the daemon).
    pub fn set_persist(&self, on: bool) -> Result<(), TapError> {
        let Some(fd) = self.queues.first() else {
            return Ok(());
        };
        // SAFETY: TUNSETPERSIST takes its argument by value; no memory is passed.
        let r =
            unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETPERSIST, libc::c_ulong::from(on)) };
        if r < 0 {
            return Err(TapError::Ioctl {
                what: "TUNSETPERSIST",
                name: self.name.clone(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// An ioctl that reads one int through its pointer argument, on the
    /// first queue's fd (device-wide settings).
    fn int_ioctl(
        &self,
        what: &'static str,
        req: libc::Ioctl,
        value: libc::c_int,
    ) -> Result<(), TapError> {
        let Some(fd) = self.queues.first() else {
            return Ok(());
        };
        // SAFETY: the request reads one int from the pointer we pass.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), req, &value) };
        if r < 0 {
            return Err(TapError::Ioctl {
                what,
                name: self.name.clone(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// The ioctl requests this module issues once the daemon serves (for
    /// the seccomp filter).
    pub const SERVING_IOCTLS: &'static [u64] = &[
        libc::TUNSETQUEUE,
        libc::TUNSETOFFLOAD,
        libc::TUNSETVNETHDRSZ,
        libc::TUNSETCARRIER,
        libc::TUNSETPERSIST,
    ];

    /// TUNSETOFFLOAD: which offloaded packets the tap may hand us.
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        self.ioctl_all(
            "TUNSETOFFLOAD",
            libc::TUNSETOFFLOAD,
            libc::c_ulong::from(flags),
        )
    }

    /// TUNSETVNETHDRSZ: the virtio-net header length on every packet.
    pub fn set_vnet_hdr_len(&self, len: usize) -> Result<(), TapError> {
        let len = len as libc::c_int;
        for fd in &self.queues {
            // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer we pass.
            let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &len) };
            if r < 0 {
                return Err(TapError::Ioctl {
                    what: "TUNSETVNETHDRSZ",
                    name: self.name.clone(),
                    source: std::io::Error::last_os_error(),
                });
            }
        }
        Ok(())
    }
}
