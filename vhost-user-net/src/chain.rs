//! Descriptor chains as iovecs into guest memory, and small helpers on
//! iovec lists. No vhost-user types; no allocation once the caller's
//! vectors have grown.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{GuestAddress, GuestMemoryBackend};

/// Why a chain cannot carry a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// A descriptor points outside guest memory (or across regions).
    #[error("descriptor outside guest memory")]
    BadAddress,
    /// A device-writable descriptor on the TX ring or a device-readable
    /// one on the RX ring.
    #[error("descriptor of the wrong direction")]
    WrongDirection,
    /// The chain holds fewer bytes than a virtio-net header.
    #[error("chain shorter than the virtio-net header")]
    TooShort,
    /// The chain ends on a descriptor that still has a next one: it loops
    /// (longer than the queue), points past the table, or into an
    /// unreadable or nested indirect table.
    #[error("descriptor chain loops or leaves its table")]
    Broken,
}

/// Appends the buffers of a chain to `iov` (all device-writable when
/// `writable`, all device-readable otherwise) and returns their total
/// length. On error `iov` is left as it was.
pub fn collect<M: GuestMemoryBackend + ?Sized>(
    mem: &M,
    descs: impl Iterator<Item = Descriptor>,
    writable: bool,
    iov: &mut Vec<libc::iovec>,
) -> Result<usize, ChainError> {
    let start = iov.len();
    let mut total = 0usize;
    // `virtio-queue` ends the iteration quietly on a loop or a bad next
    // index: the last descriptor then still says NEXT.
    let mut more = false;
    for d in descs {
        more = d.has_next();
        if d.is_write_only() != writable {
            iov.truncate(start);
            return Err(ChainError::WrongDirection);
        }
        let len = d.len() as usize;
        if len == 0 {
            continue;
        }
        let Ok(slice) = mem.get_slice(GuestAddress(d.addr().0), len) else {
            iov.truncate(start);
            return Err(ChainError::BadAddress);
        };
        iov.push(libc::iovec {
            iov_base: slice.ptr_guard_mut().as_ptr().cast(),
            iov_len: len,
        });
        total += len;
    }
    if more {
        iov.truncate(start);
        return Err(ChainError::Broken);
    }
    Ok(total)
}

/// Fails when the driver's available index is more than a queue size
/// ahead of the device's: `virtio-queue` then pops nothing while
/// `enable_notification` keeps reporting buffers, which would spin the
/// engine's loop forever.
pub fn check_avail<M: GuestMemoryBackend>(
    q: &virtio_queue::Queue,
    mem: &M,
) -> Result<(), virtio_queue::Error> {
    use virtio_queue::QueueT;
    let avail = q.avail_idx(mem, std::sync::atomic::Ordering::Acquire)?;
    if avail.0.wrapping_sub(q.next_avail()) > q.size() {
        return Err(virtio_queue::Error::InvalidAvailRingIndex);
    }
    Ok(())
}

/// Copies `data` into the memory described by `iov`, starting `offset`
/// bytes in. Returns false when `iov` is too short.
///
/// # Safety
/// Every iovec must describe writable memory that stays mapped for the
/// duration of the call (guest memory the caller holds a reference to).
pub unsafe fn write_at(iov: &[libc::iovec], mut offset: usize, mut data: &[u8]) -> bool {
    for v in iov {
        if data.is_empty() {
            break;
        }
        if offset >= v.iov_len {
            offset -= v.iov_len;
            continue;
        }
        let n = (v.iov_len - offset).min(data.len());
        // SAFETY: `offset + n <= iov_len`, and the caller guarantees the
        // iovec is valid writable memory; `data` is a distinct Rust slice.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), v.iov_base.cast::<u8>().add(offset), n);
        }
        data = &data[n..];
        offset = 0;
    }
    data.is_empty()
}
