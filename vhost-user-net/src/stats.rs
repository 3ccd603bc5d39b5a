//! Per-queue counters (atomics: the data path counts, it does not log).

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one queue.
#[derive(Debug, Default)]
pub struct QueueStats {
    /// Frames moved (to the guest on RX queues, to the tap on TX queues).
    pub packets: AtomicU64,
    /// Bytes of those frames (without the virtio-net header).
    pub bytes: AtomicU64,
    /// Frames dropped: too large for the guest's buffers or the MTU, tap
    /// full or down.
    pub drops: AtomicU64,
    /// Malformed descriptor chains and unexpected tap errors.
    pub errors: AtomicU64,
    /// RX buffers given back to the guest empty: on the io_uring path, a
    /// buffer whose read found the tap empty (or got a frame too large for
    /// it) while a later buffer got a frame, when the pass ends.
    pub holes: AtomicU64,
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
            "direction": if queue.is_multiple_of(2) { "rx" } else { "tx" },
            "packets": g(&self.packets),
            "bytes": g(&self.bytes),
            "drops": g(&self.drops),
            "errors": g(&self.errors),
            "holes": g(&self.holes),
        })
    }
}
