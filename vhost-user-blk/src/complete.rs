//! Completing requests: the status byte, the counters, the used ring, the
//! inflight record and the driver notification.
//!
//! [`publish`] is the one place where a completed request becomes visible
//! to the driver; [`notify`] the one place where the driver is signalled.

use std::sync::atomic::Ordering;
use std::time::Instant;

use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::disk::OpError;
use crate::errors::{report, LogLimit, RequestError};
use crate::inflight::QueueInflight;
use crate::queue::{QueueCtx, QueueError};
use crate::request::RequestType;
use crate::stats::{LatencyOp, QueueStats};

/// How a request ended: its virtio status and the used length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Done {
    /// VIRTIO_BLK_S_*.
    pub status: u32,
    /// Bytes written into the chain (payload and status byte).
    pub used_len: u32,
}

impl Done {
    /// Success with `used_len` bytes written.
    pub fn ok(used_len: u32) -> Done {
        Done {
            status: VIRTIO_BLK_S_OK,
            used_len,
        }
    }
    /// IOERR.
    pub fn err() -> Done {
        Done {
            status: VIRTIO_BLK_S_IOERR,
            used_len: 1,
        }
    }
    /// UNSUPP.
    pub fn unsupp() -> Done {
        Done {
            status: VIRTIO_BLK_S_UNSUPP,
            used_len: 1,
        }
    }
}

/// A request whose disk operation is in flight.
#[derive(Debug, Clone, Copy)]
pub struct Pending {
    /// Its head.
    pub head: u16,
    /// Its status byte.
    pub status: GuestAddress,
    /// Used length on success.
    pub used_len: u32,
    /// Bytes a read or write must transfer.
    pub expected: u64,
    /// Its type.
    pub kind: RequestType,
    /// When its operation was submitted (for the latency histogram).
    pub started: Instant,
}

impl Default for Pending {
    fn default() -> Self {
        Pending {
            head: 0,
            status: GuestAddress(0),
            used_len: 0,
            expected: 0,
            kind: RequestType::Flush,
            started: Instant::now(),
        }
    }
}

/// Completes `p` whose disk operation ended with `result` (bytes
/// transferred or the error): counts it, logs a failure (rate-limited) and
/// publishes it.
pub fn op_done<M: GuestMemoryBackend>(
    ctx: &mut QueueCtx<'_, M>,
    inflight: Option<&QueueInflight>,
    log: &mut LogLimit,
    p: &Pending,
    result: Result<u64, OpError>,
) -> Result<(), QueueError> {
    let stats = ctx.stats;
    let result = match result {
        Ok(n) if n == p.expected => Ok(()),
        Ok(n) => Err(OpError::Short {
            op: if p.kind == RequestType::In {
                "read"
            } else {
                "write"
            },
            done: n,
            expected: p.expected,
        }),
        Err(e) => Err(e),
    };
    let counted = match p.kind {
        RequestType::In => Some((&stats.reads, LatencyOp::Read)),
        RequestType::Out => Some((&stats.writes, LatencyOp::Write)),
        RequestType::Flush => Some((&stats.flushes, LatencyOp::Flush)),
        RequestType::Discard => Some((&stats.discards, LatencyOp::Discard)),
        RequestType::WriteZeroes => Some((&stats.write_zeroes, LatencyOp::WriteZeroes)),
        // Never submitted as disk operations (completed at once).
        RequestType::GetId | RequestType::Unsupported(_) => None,
    };
    if let Some((count, op)) = counted {
        QueueStats::add(count, 1);
        let ns = u64::try_from(p.started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        stats.observe(op, ns);
    }
    match p.kind {
        RequestType::In if result.is_ok() => QueueStats::add(&stats.read_bytes, p.expected),
        RequestType::Out if result.is_ok() => QueueStats::add(&stats.write_bytes, p.expected),
        _ => {}
    }
    let done = match result {
        Ok(()) => Done::ok(p.used_len),
        Err(e) => {
            report(log, stats, ctx.index, p.head, &RequestError::Disk(e));
            Done::err()
        }
    };
    publish(ctx, inflight, p.head, Some(p.status), done)
}

/// Publishes one completed request: writes its status byte (when the chain
/// has one: `status` is `None` for chains too broken to carry a status,
/// which go back with length 0), counts it, marks what the device wrote
/// (the dirty-logging point, a no-op today), and puts `head` in the used
/// ring, keeping the inflight record in step.
pub fn publish<M: GuestMemoryBackend>(
    ctx: &mut QueueCtx<'_, M>,
    inflight: Option<&QueueInflight>,
    head: u16,
    status: Option<GuestAddress>,
    done: Done,
) -> Result<(), QueueError> {
    let len = match status {
        Some(addr) => {
            // The address was validated when the chain was parsed.
            let _ = ctx.mem.write_obj(done.status as u8, addr);
            QueueStats::add(&ctx.stats.requests, 1);
            match done.status {
                VIRTIO_BLK_S_OK => {}
                VIRTIO_BLK_S_UNSUPP => QueueStats::add(&ctx.stats.unsupported, 1),
                _ => QueueStats::add(&ctx.stats.io_errors, 1),
            }
            done.used_len
        }
        None => 0,
    };
    mark_dirty(ctx, head, status);
    if let Some(t) = inflight {
        t.before_used(head);
    }
    ctx.q
        .add_used(ctx.mem, head, len)
        .map_err(QueueError::Queue)?;
    if let Some(t) = inflight {
        t.after_used(head, ctx.q.next_used());
    }
    Ok(())
}

/// The dirty-page marking point for live migration (VHOST_F_LOG_ALL):
/// nothing to do while the device does not offer it.
#[inline(always)]
fn mark_dirty<M: GuestMemoryBackend>(
    _ctx: &mut QueueCtx<'_, M>,
    _head: u16,
    _status: Option<GuestAddress>,
) {
}

/// Signals the driver if `unsignalled` completions are waiting and the
/// driver wants to hear about them (EVENT_IDX permitting).
pub fn notify<M: GuestMemoryBackend>(
    ctx: &mut QueueCtx<'_, M>,
    unsignalled: &mut usize,
) -> Result<(), QueueError> {
    if *unsignalled > 0
        && ctx
            .q
            .needs_notification(ctx.mem)
            .map_err(QueueError::Queue)?
    {
        (ctx.signal)();
        *unsignalled = 0;
    }
    Ok(())
}

/// Whether the driver published an available index no ring can hold (we
/// would spin on it, and `virtio-queue` would log on every pop).
pub fn avail_ok<M: GuestMemoryBackend>(ctx: &QueueCtx<'_, M>) -> Result<(), QueueError> {
    let avail = ctx
        .q
        .avail_idx(ctx.mem, Ordering::Acquire)
        .map_err(QueueError::Queue)?;
    if avail.0.wrapping_sub(ctx.q.next_avail()) > ctx.q.size() {
        return Err(QueueError::Queue(
            virtio_queue::Error::InvalidAvailRingIndex,
        ));
    }
    Ok(())
}
