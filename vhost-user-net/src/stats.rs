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
    /// full or down (the sum of the `drop_*` counters below).
    pub drops: AtomicU64,
    /// Drops by [`DropReason`] (indexed by it).
    pub drop_reasons: [AtomicU64; DROP_REASONS],
    /// Malformed descriptor chains and unexpected tap errors.
    pub errors: AtomicU64,
    /// RX buffers given back to the guest empty: on the io_uring path, a
    /// buffer whose read found the tap empty (or got a frame too large for
    /// it) while a later buffer got a frame, when the pass ends.
    pub holes: AtomicU64,
}

/// Why a frame was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Larger than the guest's RX buffers, or than the MTU on TX.
    TooLarge = 0,
    /// Shorter than the virtio-net header (RX).
    Runt = 1,
    /// The tap queue was full (EAGAIN, ENOBUFS).
    TapFull = 2,
    /// The tap was down (EIO).
    TapDown = 3,
}

/// Number of [`DropReason`]s.
pub const DROP_REASONS: usize = 4;
/// Their metric label values, by index.
const DROP_REASON_NAMES: [&str; DROP_REASONS] = ["too_large", "runt", "tap_full", "tap_down"];

impl DropReason {
    /// The reason of a failed tap write's errno (EAGAIN/ENOBUFS: full,
    /// else down).
    pub fn of_tap_errno(errno: i32) -> DropReason {
        if errno == libc::EIO {
            DropReason::TapDown
        } else {
            DropReason::TapFull
        }
    }
}

impl QueueStats {
    /// Adds `v` to a counter.
    pub fn add(c: &AtomicU64, v: u64) {
        c.fetch_add(v, Ordering::Relaxed);
    }

    /// Counts one dropped frame (total and by reason).
    pub fn drop(&self, reason: DropReason) {
        Self::add(&self.drops, 1);
        if let Some(c) = self.drop_reasons.get(reason as usize) {
            Self::add(c, 1);
        }
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
            "drop_too_large": g(&self.drop_reasons[DropReason::TooLarge as usize]),
            "drop_runt": g(&self.drop_reasons[DropReason::Runt as usize]),
            "drop_tap_full": g(&self.drop_reasons[DropReason::TapFull as usize]),
            "drop_tap_down": g(&self.drop_reasons[DropReason::TapDown as usize]),
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
    let fams: [(&str, &str, Counter); 4] = [
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
    family(
        out,
        "outboard_net_drops_total",
        "counter",
        "Frames dropped, by queue, direction and reason (too_large: guest buffers or MTU, \
         runt, tap_full, tap_down).",
    );
    for (i, s) in queues.iter().enumerate() {
        let pair = i / 2;
        let dir = if i.is_multiple_of(2) { "rx" } else { "tx" };
        for (c, reason) in s.drop_reasons.iter().zip(DROP_REASON_NAMES) {
            let _ = writeln!(
                out,
                "outboard_net_drops_total{{queue=\"{i}\",pair=\"{pair}\",direction=\"{dir}\",reason=\"{reason}\"}} {}",
                g(c)
            );
        }
    }
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
        q[0].drop(DropReason::TapDown);
        q[0].drop(DropReason::TapDown);
        q[0].drop(DropReason::Runt);
        assert_eq!(q[0].drops.load(Ordering::Relaxed), 3);
        let mut out = String::new();
        render(&q, &mut out);
        assert!(out.contains(
            "outboard_net_drops_total{queue=\"0\",pair=\"0\",direction=\"rx\",reason=\"tap_down\"} 2\n"
        ));
        assert!(out.contains(
            "outboard_net_drops_total{queue=\"0\",pair=\"0\",direction=\"rx\",reason=\"runt\"} 1\n"
        ));
        assert_eq!(DropReason::of_tap_errno(libc::EIO), DropReason::TapDown);
        assert_eq!(DropReason::of_tap_errno(libc::ENOBUFS), DropReason::TapFull);
    }
}
