//! Turning a parsed virtio-blk request into a disk operation: range and
//! read-only checks, guest-memory iovecs for reads and writes, the ranges of
//! discard / write-zeroes, and the requests the device answers itself
//! (GET_ID, empty transfers, unsupported types). It knows guest memory and
//! the [`DiskOp`] vocabulary, not queues or backends.

use vm_memory::{Bytes, GuestMemoryBackend};

use crate::complete::Done;
use crate::disk::{ByteRange, Capabilities, DiskOp};
use crate::errors::RequestError;
use crate::queue::DeviceSettings;
use crate::request::{Request, RequestType, Segments, DWZ_SEGMENT_SIZE, SECTOR_SIZE};

/// Buffers reused from request to request (no allocation per request once
/// they have grown to the largest request seen).
#[derive(Debug, Default)]
pub struct Dispatch {
    /// Payload segments of the request being parsed.
    pub segs: Segments,
    /// Guest-memory iovecs of the request being submitted.
    iov: Vec<libc::iovec>,
    /// Ranges of the discard / write-zeroes being submitted.
    ranges: Vec<ByteRange>,
    /// Raw discard / write-zeroes segments read from the guest.
    dwz: Vec<u8>,
}

// SAFETY: the raw pointers in `iov` point into guest memory that the
// caller keeps mapped while the operation built from them is in flight; a
// Dispatch is used by one thread at a time (its queue's).
unsafe impl Send for Dispatch {}

/// What a request needs.
#[derive(Debug)]
pub enum Prepared<'a> {
    /// A disk operation; when it succeeds the request is done with
    /// `used_len`, and reads/writes must transfer `expected` bytes.
    Op {
        /// The operation.
        op: DiskOp<'a>,
        /// Used length on success.
        used_len: u32,
        /// Bytes a read or write transfers (0 for the others).
        expected: u64,
    },
    /// Nothing for the disk: the request is done.
    Done(Done),
}

/// The request environment: what the disk can do and the device settings.
#[derive(Debug, Clone, Copy)]
pub struct Env<'a> {
    /// The backend's capabilities.
    pub caps: Capabilities,
    /// Current disk size.
    pub size: u64,
    /// Writeback cache (false: writes durable at completion).
    pub writeback: bool,
    /// Device settings.
    pub settings: &'a DeviceSettings,
}

impl Dispatch {
    /// Works out what `req` (parsed into `self.segs`) needs.
    pub fn prepare<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        env: Env<'_>,
        req: &Request,
    ) -> Result<Prepared<'_>, RequestError> {
        let writes = matches!(
            req.ty,
            RequestType::Out | RequestType::Discard | RequestType::WriteZeroes
        );
        if writes && env.caps.read_only {
            return Err(RequestError::ReadOnly);
        }
        match req.ty {
            RequestType::In | RequestType::Out => {
                let offset = data_range(env.size, req).ok_or(RequestError::OutOfRange {
                    sector: req.sector,
                    len: req.len,
                })?;
                let used_len = if req.ty == RequestType::In {
                    req.len as u32 + 1
                } else {
                    1
                };
                if req.len == 0 {
                    return Ok(Prepared::Done(Done::ok(used_len)));
                }
                self.iov.clear();
                for &(addr, len) in &self.segs.data {
                    let vs = mem
                        .get_slice(addr, len as usize)
                        .map_err(|_| RequestError::GuestMemory)?;
                    self.iov.push(libc::iovec {
                        iov_base: vs.ptr_guard_mut().as_ptr().cast(),
                        iov_len: len as usize,
                    });
                }
                let iov = &self.iov[..];
                let op = if req.ty == RequestType::In {
                    DiskOp::Read { offset, iov }
                } else {
                    DiskOp::Write {
                        offset,
                        iov,
                        durable: !env.writeback,
                    }
                };
                Ok(Prepared::Op {
                    op,
                    used_len,
                    expected: req.len,
                })
            }
            RequestType::Flush => Ok(Prepared::Op {
                op: DiskOp::Flush,
                used_len: 1,
                expected: 0,
            }),
            RequestType::GetId => {
                let serial = &env.settings.serial;
                let n = (req.len as usize).min(serial.len()).min(20);
                let mut id = [0u8; 20];
                id[..n].copy_from_slice(&serial[..n]);
                let want = (req.len as usize).min(20);
                scatter(mem, &self.segs, &id[..want])?;
                Ok(Prepared::Done(Done::ok(want as u32 + 1)))
            }
            RequestType::Discard | RequestType::WriteZeroes => {
                let supported = if req.ty == RequestType::Discard {
                    env.caps.discard
                } else {
                    env.caps.write_zeroes
                };
                if !supported {
                    return Ok(Prepared::Done(Done::unsupp()));
                }
                if let Some(d) = self.dwz_ranges(mem, env.settings, req)? {
                    return Ok(Prepared::Done(d));
                }
                let op = if req.ty == RequestType::Discard {
                    DiskOp::Discard(&self.ranges)
                } else {
                    DiskOp::WriteZeroes(&self.ranges)
                };
                Ok(Prepared::Op {
                    op,
                    used_len: 1,
                    expected: 0,
                })
            }
            RequestType::Unsupported(_) => Ok(Prepared::Done(Done::unsupp())),
        }
    }

    /// Reads and checks the segments of a discard / write-zeroes into
    /// `self.ranges`; `Some` when the request ends here (UNSUPP).
    fn dwz_ranges<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        settings: &DeviceSettings,
        req: &Request,
    ) -> Result<Option<Done>, RequestError> {
        let len = req.len as usize;
        if req.len == 0 || !req.len.is_multiple_of(DWZ_SEGMENT_SIZE) {
            return Err(RequestError::BadRanges("payload is not whole segments"));
        }
        if req.len / DWZ_SEGMENT_SIZE > u64::from(settings.max_dwz_segments) {
            return Err(RequestError::BadRanges("too many segments"));
        }
        if self.dwz.len() < len {
            self.dwz.resize(len, 0);
        }
        gather(mem, &self.segs, &mut self.dwz[..len])?;
        self.ranges.clear();
        for seg in self.dwz[..len].chunks_exact(DWZ_SEGMENT_SIZE as usize) {
            let sector = u64::from_le_bytes([
                seg[0], seg[1], seg[2], seg[3], seg[4], seg[5], seg[6], seg[7],
            ]);
            let num = u64::from(u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]));
            let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
            let unmap = flags & 1 != 0;
            if flags & !1 != 0 || (req.ty == RequestType::Discard && unmap) {
                return Ok(Some(Done::unsupp()));
            }
            let (Some(offset), Some(len)) = (
                sector.checked_mul(SECTOR_SIZE),
                num.checked_mul(SECTOR_SIZE),
            ) else {
                return Err(RequestError::BadRanges("range overflows"));
            };
            self.ranges.push(ByteRange { offset, len, unmap });
        }
        Ok(None)
    }
}

/// Byte offset of an In/Out request if it is sector-aligned and in range.
fn data_range(size: u64, req: &Request) -> Option<u64> {
    if !req.len.is_multiple_of(SECTOR_SIZE) {
        return None;
    }
    let off = req.sector.checked_mul(SECTOR_SIZE)?;
    (off.checked_add(req.len)? <= size).then_some(off)
}

/// Copies `buf` into the payload segments (device-writable).
fn scatter<M: GuestMemoryBackend>(
    mem: &M,
    segs: &Segments,
    mut buf: &[u8],
) -> Result<(), RequestError> {
    for &(addr, len) in &segs.data {
        if buf.is_empty() {
            break;
        }
        let n = (len as usize).min(buf.len());
        mem.write_slice(&buf[..n], addr)
            .map_err(|_| RequestError::GuestMemory)?;
        buf = &buf[n..];
    }
    Ok(())
}

/// Copies the payload segments (device-readable) into `buf`.
fn gather<M: GuestMemoryBackend>(
    mem: &M,
    segs: &Segments,
    mut buf: &mut [u8],
) -> Result<(), RequestError> {
    for &(addr, len) in &segs.data {
        if buf.is_empty() {
            break;
        }
        let n = (len as usize).min(buf.len());
        mem.read_slice(&mut buf[..n], addr)
            .map_err(|_| RequestError::GuestMemory)?;
        buf = &mut buf[n..];
    }
    Ok(())
}
