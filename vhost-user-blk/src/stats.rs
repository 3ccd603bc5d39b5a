//! Per-queue counters (atomics: the data path counts, it does not log).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use outboard_common::metrics::family;

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
    /// Reads completed (successful or not; `requests` counts every op).
    pub reads: AtomicU64,
    /// Writes completed (successful or not).
    pub writes: AtomicU64,
    /// Discards completed (successful or not).
    pub discards: AtomicU64,
    /// Write-zeroes completed (successful or not).
    pub write_zeroes: AtomicU64,
    /// Requests resubmitted after a restart (found in flight in the
    /// inflight region at reconnect).
    pub resubmitted: AtomicU64,
    /// Disk operations in flight (a gauge, stored by the queue thread when
    /// it submits and when it reaps).
    pub in_flight: AtomicU64,
    /// Disk-operation latency (submission to completion) per [`LatencyOp`]:
    /// non-cumulative counts per bucket of [`LATENCY_BOUNDS_NS`], the last
    /// one above every bound.
    pub latency: [[AtomicU64; LATENCY_BUCKETS]; LATENCY_OPS],
    /// Sum of those latencies in nanoseconds, per [`LatencyOp`].
    pub latency_sum_ns: [AtomicU64; LATENCY_OPS],
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

/// Upper bounds (inclusive, nanoseconds) of the latency buckets: 10 µs to 1 s.
pub const LATENCY_BOUNDS_NS: [u64; 13] = [
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    100_000_000,
    1_000_000_000,
];
/// The bounds as Prometheus `le` labels (seconds).
const LATENCY_LE: [&str; 13] = [
    "1e-05", "2.5e-05", "5e-05", "0.0001", "0.00025", "0.0005", "0.001", "0.0025", "0.005", "0.01",
    "0.025", "0.1", "1",
];
/// Buckets: one per bound plus the one above them all.
pub const LATENCY_BUCKETS: usize = LATENCY_BOUNDS_NS.len() + 1;
/// Operations with a latency histogram.
pub const LATENCY_OPS: usize = 5;

/// The operations with a latency histogram (index into
/// [`QueueStats::latency`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LatencyOp {
    /// Read.
    Read = 0,
    /// Write.
    Write = 1,
    /// Flush.
    Flush = 2,
    /// Discard.
    Discard = 3,
    /// Write zeroes.
    WriteZeroes = 4,
}

const LATENCY_OP_NAMES: [&str; LATENCY_OPS] = ["read", "write", "flush", "discard", "write_zeroes"];

impl QueueStats {
    /// Adds `v` to a counter.
    pub fn add(c: &AtomicU64, v: u64) {
        c.fetch_add(v, Ordering::Relaxed);
    }

    /// Counts one `op` that took `ns` nanoseconds (no allocation, two
    /// relaxed atomic adds).
    pub fn observe(&self, op: LatencyOp, ns: u64) {
        let i = op as usize;
        let b = LATENCY_BOUNDS_NS
            .iter()
            .position(|&bound| ns <= bound)
            .unwrap_or(LATENCY_BOUNDS_NS.len());
        if let (Some(row), Some(sum)) = (self.latency.get(i), self.latency_sum_ns.get(i)) {
            if let Some(c) = row.get(b) {
                Self::add(c, 1);
            }
            Self::add(sum, ns);
        }
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
            "reads": g(&self.reads),
            "writes": g(&self.writes),
            "discards": g(&self.discards),
            "write_zeroes": g(&self.write_zeroes),
            "resubmitted": g(&self.resubmitted),
            "in_flight": g(&self.in_flight),
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

/// Appends every queue's counters in the Prometheus text format (see
/// README "Metrics" for the names).
pub fn render(queues: &[QueueStats], out: &mut String) {
    let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
    family(
        out,
        "outboard_blk_requests_total",
        "counter",
        "Requests completed, by queue and operation (other: completed without a disk operation: get-id, unsupported, refused).",
    );
    for (i, s) in queues.iter().enumerate() {
        let (r, w, f, d, z) = (
            g(&s.reads),
            g(&s.writes),
            g(&s.flushes),
            g(&s.discards),
            g(&s.write_zeroes),
        );
        // `requests` is counted after the per-op counter: clamp, never wrap.
        let other = g(&s.requests).saturating_sub(r + w + f + d + z);
        for (op, v) in [
            ("read", r),
            ("write", w),
            ("flush", f),
            ("discard", d),
            ("write_zeroes", z),
            ("other", other),
        ] {
            let _ = writeln!(
                out,
                "outboard_blk_requests_total{{queue=\"{i}\",op=\"{op}\"}} {v}"
            );
        }
    }
    family(
        out,
        "outboard_blk_bytes_total",
        "counter",
        "Bytes transferred by successful reads and writes, by queue and operation.",
    );
    for (i, s) in queues.iter().enumerate() {
        for (op, v) in [("read", g(&s.read_bytes)), ("write", g(&s.write_bytes))] {
            let _ = writeln!(
                out,
                "outboard_blk_bytes_total{{queue=\"{i}\",op=\"{op}\"}} {v}"
            );
        }
    }
    family(
        out,
        "outboard_blk_errors_total",
        "counter",
        "Failed requests by queue and kind (each failure counts once).",
    );
    for (i, s) in queues.iter().enumerate() {
        for (kind, v) in [
            ("io", g(&s.err_io)),
            ("no_space", g(&s.err_no_space)),
            ("corrupt", g(&s.err_corrupt)),
            ("malformed", g(&s.err_malformed)),
        ] {
            let _ = writeln!(
                out,
                "outboard_blk_errors_total{{queue=\"{i}\",kind=\"{kind}\"}} {v}"
            );
        }
    }
    let per_queue = |out: &mut String, name: &str, help: &str, c: fn(&QueueStats) -> &AtomicU64| {
        family(out, name, "counter", help);
        for (i, s) in queues.iter().enumerate() {
            let _ = writeln!(out, "{name}{{queue=\"{i}\"}} {}", g(c(s)));
        }
    };
    per_queue(
        out,
        "outboard_blk_status_errors_total",
        "Requests completed with status IOERR.",
        |s| &s.io_errors,
    );
    per_queue(
        out,
        "outboard_blk_unsupported_total",
        "Requests completed with status UNSUPP.",
        |s| &s.unsupported,
    );
    per_queue(
        out,
        "outboard_blk_malformed_chains_total",
        "Descriptor chains that were not valid requests.",
        |s| &s.malformed,
    );
    per_queue(
        out,
        "outboard_blk_ring_errors_total",
        "Times the ring itself was found broken (the queue stops until the next kick).",
        |s| &s.ring_errors,
    );
    family(
        out,
        "outboard_blk_in_flight",
        "gauge",
        "Disk operations in flight (as of the queue thread's last submission or completion).",
    );
    for (i, s) in queues.iter().enumerate() {
        let _ = writeln!(
            out,
            "outboard_blk_in_flight{{queue=\"{i}\"}} {}",
            g(&s.in_flight)
        );
    }
    family(
        out,
        "outboard_blk_request_duration_seconds",
        "histogram",
        "Disk-operation latency, submission to completion, by queue and operation.",
    );
    for (i, s) in queues.iter().enumerate() {
        for (op, name) in LATENCY_OP_NAMES.iter().enumerate() {
            let (Some(row), Some(sum)) = (s.latency.get(op), s.latency_sum_ns.get(op)) else {
                continue;
            };
            let mut cum = 0u64;
            for (b, c) in row.iter().enumerate() {
                cum += g(c);
                let le = LATENCY_LE.get(b).copied().unwrap_or("+Inf");
                let _ = writeln!(
                    out,
                    "outboard_blk_request_duration_seconds_bucket{{queue=\"{i}\",op=\"{name}\",le=\"{le}\"}} {cum}"
                );
            }
            let ns = g(sum);
            let _ = writeln!(
                out,
                "outboard_blk_request_duration_seconds_sum{{queue=\"{i}\",op=\"{name}\"}} {}.{:09}",
                ns / 1_000_000_000,
                ns % 1_000_000_000
            );
            let _ = writeln!(
                out,
                "outboard_blk_request_duration_seconds_count{{queue=\"{i}\",op=\"{name}\"}} {cum}"
            );
        }
    }
    per_queue(
        out,
        "outboard_blk_resubmitted_total",
        "Requests resubmitted after a restart (left in flight by a previous instance).",
        |s| &s.resubmitted,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_counts() {
        let q = [QueueStats::default(), QueueStats::default()];
        QueueStats::add(&q[1].reads, 3);
        QueueStats::add(&q[1].requests, 4);
        QueueStats::add(&q[1].read_bytes, 12288);
        QueueStats::add(&q[0].err_no_space, 1);
        let mut out = String::new();
        render(&q, &mut out);
        assert!(out.contains("outboard_blk_requests_total{queue=\"1\",op=\"read\"} 3\n"));
        assert!(out.contains("outboard_blk_requests_total{queue=\"1\",op=\"other\"} 1\n"));
        assert!(out.contains("outboard_blk_bytes_total{queue=\"1\",op=\"read\"} 12288\n"));
        assert!(out.contains("outboard_blk_errors_total{queue=\"0\",kind=\"no_space\"} 1\n"));
        assert!(out.contains("# TYPE outboard_blk_resubmitted_total counter\n"));

        q[0].observe(LatencyOp::Write, 10_000);
        q[0].observe(LatencyOp::Write, 10_001);
        q[0].observe(LatencyOp::Write, 2_000_000_000);
        let mut out = String::new();
        render(&q, &mut out);
        let w = |le: &str| {
            format!("outboard_blk_request_duration_seconds_bucket{{queue=\"0\",op=\"write\",le=\"{le}\"}} ")
        };
        assert!(out.contains(&(w("1e-05") + "1\n")), "{out}");
        assert!(out.contains(&(w("2.5e-05") + "2\n")));
        assert!(out.contains(&(w("1") + "2\n")));
        assert!(out.contains(&(w("+Inf") + "3\n")));
        assert!(out.contains(
            "outboard_blk_request_duration_seconds_sum{queue=\"0\",op=\"write\"} 2.000020001\n"
        ));
        assert!(out
            .contains("outboard_blk_request_duration_seconds_count{queue=\"0\",op=\"write\"} 3\n"));
    }
}
