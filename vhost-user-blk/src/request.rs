//! Parsing virtio-blk requests out of descriptor chains.
//!
//! The chain is treated as a byte stream (VIRTIO 1.x devices must not rely
//! on descriptor layout): the first 16 device-readable bytes are the header,
//! the remaining readable bytes are the payload of writes, discards and
//! write-zeroes, the writable bytes except the last are the payload of reads
//! and GET_ID, and the last writable byte is the status.
//!
//! Parsing fills caller-owned segment vectors (reused between requests) so
//! the data path does not allocate. It never touches the disk.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

/// Bytes per virtio-blk sector.
pub const SECTOR_SIZE: u64 = 512;
/// Size of the request header (type, reserved, sector).
pub const HEADER_SIZE: u64 = 16;
/// Size of one discard / write-zeroes segment.
pub const DWZ_SEGMENT_SIZE: u64 = 16;
/// Largest payload accepted in one request.
pub const MAX_PAYLOAD: u64 = 64 << 20;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    /// Read into the guest.
    In,
    /// Write from the guest.
    Out,
    /// Make completed writes durable.
    Flush,
    /// Return the device serial.
    GetId,
    /// Deallocate ranges.
    Discard,
    /// Zero ranges.
    WriteZeroes,
    /// Anything else.
    Unsupported(u32),
}

impl RequestType {
    fn from_raw(t: u32) -> Self {
        match t {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            VIRTIO_BLK_T_DISCARD => RequestType::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => RequestType::WriteZeroes,
            other => RequestType::Unsupported(other),
        }
    }
}

/// A guest memory segment: address and length.
pub type Segment = (GuestAddress, u32);

/// Why a chain is not a valid request. With `status` known, the device
/// answers IOERR/UNSUPP; without it the chain is returned with length 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// No writable byte for the status.
    #[error("descriptor chain has no status byte")]
    NoStatus,
    /// Fewer than 16 readable bytes.
    #[error("descriptor chain has no complete header")]
    ShortHeader,
    /// A readable descriptor follows a writable one.
    #[error("readable descriptor after a writable one")]
    ReadAfterWrite,
    /// A descriptor points outside guest memory.
    #[error("descriptor outside guest memory")]
    BadAddress,
    /// The payload is larger than the device accepts.
    #[error("payload too large")]
    TooLarge,
}

/// A parsed request. Its payload segments live in the [`Segments`] it was
/// parsed into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Type.
    pub ty: RequestType,
    /// First sector (In/Out).
    pub sector: u64,
    /// Payload bytes (readable for Out/Discard/WriteZeroes, writable for In/GetId).
    pub len: u64,
    /// Guest address of the status byte.
    pub status: GuestAddress,
}

/// Reusable segment storage for one request.
#[derive(Debug, Default)]
pub struct Segments {
    /// Payload segments of the request, in order.
    pub data: Vec<Segment>,
}

/// Parses a chain. On error, returns the status address when one was found.
pub fn parse<M: GuestMemoryBackend + ?Sized>(
    mem: &M,
    descs: impl Iterator<Item = Descriptor>,
    segs: &mut Segments,
) -> Result<Request, (ParseError, Option<GuestAddress>)> {
    segs.data.clear();
    let mut header = [0u8; HEADER_SIZE as usize];
    let mut header_got = 0u64;
    let mut readable_payload = 0u64;
    let mut writable = 0u64;
    let mut seen_writable = false;
    let mut last_writable: Option<Segment> = None;
    let mut error = None;
    for d in descs {
        let (addr, len) = (d.addr(), d.len());
        if len == 0 {
            continue;
        }
        if mem.get_slice(addr, len as usize).is_err() {
            error.get_or_insert(ParseError::BadAddress);
            continue;
        }
        if d.is_write_only() {
            seen_writable = true;
            if let Some(seg) = last_writable.replace((addr, len)) {
                segs.data.push(seg);
            }
            writable += len as u64;
            continue;
        }
        if seen_writable {
            error.get_or_insert(ParseError::ReadAfterWrite);
            continue;
        }
        // Readable: header first, then payload.
        let mut off = 0u64;
        if header_got < HEADER_SIZE {
            let n = (HEADER_SIZE - header_got).min(len as u64);
            let dst = &mut header[header_got as usize..(header_got + n) as usize];
            if mem.read_slice(dst, addr).is_err() {
                error.get_or_insert(ParseError::BadAddress);
                continue;
            }
            header_got += n;
            off = n;
        }
        if off < len as u64 {
            segs.data.push((addr.unchecked_add(off), len - off as u32));
            readable_payload += len as u64 - off;
        }
    }
    // The status is the last writable byte.
    let status = match last_writable {
        None => return Err((error.unwrap_or(ParseError::NoStatus), None)),
        Some((addr, len)) => {
            if len > 1 {
                segs.data.push((addr, len - 1));
            }
            addr.unchecked_add(len as u64 - 1)
        }
    };
    if let Some(e) = error {
        return Err((e, Some(status)));
    }
    if header_got < HEADER_SIZE {
        return Err((ParseError::ShortHeader, Some(status)));
    }
    let ty = RequestType::from_raw(u32::from_le_bytes([
        header[0], header[1], header[2], header[3],
    ]));
    let mut s = [0u8; 8];
    s.copy_from_slice(&header[8..16]);
    let sector = u64::from_le_bytes(s);
    // `segs.data` holds the readable payload segments, then the writable
    // ones: keep only those of the payload's direction.
    let n_readable = count_prefix(&segs.data, readable_payload);
    let len = if matches!(ty, RequestType::In | RequestType::GetId) {
        segs.data.drain(..n_readable);
        writable - 1
    } else {
        segs.data.truncate(n_readable);
        readable_payload
    };
    if len > MAX_PAYLOAD {
        return Err((ParseError::TooLarge, Some(status)));
    }
    Ok(Request {
        ty,
        sector,
        len,
        status,
    })
}

/// Number of leading segments whose lengths add up to `bytes`.
fn count_prefix(segs: &[Segment], bytes: u64) -> usize {
    let mut sum = 0u64;
    let mut n = 0;
    while sum < bytes && n < segs.len() {
        sum += segs[n].1 as u64;
        n += 1;
    }
    n
}
