//! Per-queue counters (atomics: the data path counts, it does not log).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use outboard_common::metrics::family;

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

/// Appends every queue's counters in the Prometheus text format: queue
/// 2k is pair k's RX queue (`direction="rx"`, to the guest), 2k+1 its TX
/// queue (`direction="tx"`, to the tap).
pub fn render(queues: &[QueueStats], out: &mut String) {
    let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
    type Counter = fn(&QueueStats) -> &AtomicU64;
    let fams: [(&str, &str, Counter); 5] = [
        (
            "outboard_net_packets_total",
            "Frames moved, by queue and direction (rx: to the guest, tx: to the tap).",
            |s| &s.packets,
        ),
        (
            "outboard_net_bytes_total",
            "Bytes of those frames, without the virtio-net header.",
            |s| &s.bytes,
        ),
        (
            "outboard_net_drops_total",
            "Frames dropped: too large for the guest's buffers or the MTU, tap full or down.",
            |s| &s.drops,
        ),
        (
            "outboard_net_errors_total",
            "Malformed descriptor chains and unexpected tap errors.",
            |s| &s.errors,
        ),
        (
            "outboard_net_rx_holes_total",
            "RX buffers given back to the guest empty.",
            |s| &s.holes,
        ),
    ];
    for (name, help, c) in fams {
        family(out, name, "counter", help);
        for (i, s) in queues.iter().enumerate() {
            let pair = i / 2;
            let dir = if i.is_multiple_of(2) { "rx" } else { "tx" };
            let _ = writeln!(
                out,
                "{name}{{queue=\"{i}\",pair=\"{pair}\",direction=\"{dir}\"}} {}",
                g(c(s))
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_counts() {
        let q = [QueueStats::default(), QueueStats::default()];
        QueueStats::add(&q[1].packets, 2);
        QueueStats::add(&q[1].bytes, 120);
        let mut out = String::new();
        render(&q, &mut out);
        assert!(
            out.contains("outboard_net_packets_total{queue=\"1\",pair=\"0\",direction=\"tx\"} 2\n")
        );
        assert!(
            out.contains("outboard_net_bytes_total{queue=\"1\",pair=\"0\",direction=\"tx\"} 120\n")
        );
        assert!(out.contains("# TYPE outboard_net_drops_total counter\n"));
    }
}
