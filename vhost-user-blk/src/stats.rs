//! Per-queue counters (atomics: the data path counts, it does not log).

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one queue.
#[derive(Debug, Default)]
pub struct QueueStats {
    /// Requests completed.
    pub requests: AtomicU64,
    /// Bytes read by the guest.
    pub read_bytes: AtomicU64,
    /// Bytes written by the guest.
    pub write_bytes: AtomicU64,
    /// Flushes completed.
    pub flushes: AtomicU64,
    /// Requests completed with IOERR.
    pub io_errors: AtomicU64,
    /// Requests completed with UNSUPP.
    pub unsupported: AtomicU64,
    /// Chains that were not valid requests.
    pub malformed: AtomicU64,
    /// Failed requests by kind (each failed request counts in exactly one):
    /// host I/O errors,
    pub err_io: AtomicU64,
    /// no space (or quota) on the host,
    pub err_no_space: AtomicU64,
    /// a corrupt image,
    pub err_corrupt: AtomicU64,
    /// malformed or invalid requests (`malformed` chains, and valid chains
    /// the device refuses: out of range, read-only, bad discard ranges).
    pub err_malformed: AtomicU64,
    /// Times the ring itself was found broken (e.g. an available index no
    /// ring can hold): the queue stops until the driver kicks again.
    pub ring_errors: AtomicU64,
}

impl QueueStats {
    /// Adds `v` to a counter.
    pub fn add(c: &AtomicU64, v: u64) {
        c.fetch_add(v, Ordering::Relaxed);
    }

    /// A snapshot as JSON.
    pub fn to_json(&self, queue: usize) -> serde_json::Value {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        serde_json::json!({
            "queue": queue,
            "requests": g(&self.requests),
            "read_bytes": g(&self.read_bytes),
            "write_bytes": g(&self.write_bytes),
            "flushes": g(&self.flushes),
            "io_errors": g(&self.io_errors),
            "unsupported": g(&self.unsupported),
            "malformed": g(&self.malformed),
            "err_io": g(&self.err_io),
            "err_no_space": g(&self.err_no_space),
            "err_corrupt": g(&self.err_corrupt),
            "err_malformed": g(&self.err_malformed),
            "ring_errors": g(&self.ring_errors),
        })
    }
}
