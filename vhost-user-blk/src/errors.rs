//! Why requests fail, how each failure is counted, and the rate-limited
//! log that explains them (a hostile guest must not flood the log).

use std::fmt;
use std::time::{Duration, Instant};

use crate::disk::{FailureKind, OpError};
use crate::request::ParseError;
use crate::stats::QueueStats;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The chain is not a valid virtio-blk request.
    #[error("malformed request")]
    Malformed(#[source] ParseError),
    /// A read or write outside the disk or not sector-aligned.
    #[error("sector {sector}, {len} bytes: not aligned or beyond the disk")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Payload bytes.
        len: u64,
    },
    /// A write, discard or write-zeroes on a read-only disk.
    #[error("write to a read-only disk")]
    ReadOnly,
    /// A discard / write-zeroes payload the device refuses.
    #[error("discard/write-zeroes: {0}")]
    BadRanges(&'static str),
    /// Guest memory named by a valid chain could not be accessed.
    #[error("guest memory not accessible")]
    GuestMemory,
    /// The disk operation failed.
    #[error("disk operation failed")]
    Disk(#[source] OpError),
}

/// How a failure is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The host's I/O failed.
    Io,
    /// The host ran out of space.
    NoSpace,
    /// The image is corrupt.
    Corrupt,
    /// The request was malformed or invalid (the guest's fault).
    Malformed,
}

impl RequestError {
    /// How this failure is counted.
    pub fn kind(&self) -> ErrorKind {
        match self {
            RequestError::Disk(e) => match e.kind() {
                FailureKind::Io => ErrorKind::Io,
                FailureKind::NoSpace => ErrorKind::NoSpace,
                FailureKind::Corrupt => ErrorKind::Corrupt,
            },
            _ => ErrorKind::Malformed,
        }
    }

    /// Adds one to the counter of this failure's kind.
    pub fn count(&self, stats: &QueueStats) {
        let c = match self.kind() {
            ErrorKind::Io => &stats.err_io,
            ErrorKind::NoSpace => &stats.err_no_space,
            ErrorKind::Corrupt => &stats.err_corrupt,
            ErrorKind::Malformed => &stats.err_malformed,
        };
        QueueStats::add(c, 1);
    }
}

/// Displays an error followed by its sources: `a: b: c`.
#[derive(Debug)]
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut src = self.0.source();
        while let Some(s) = src {
            write!(f, ": {s}")?;
            src = s.source();
        }
        Ok(())
    }
}

/// At most [`LogLimit::BURST`] lines per [`LogLimit::WINDOW`]; the number
/// of lines left out is logged when the next window opens.
#[derive(Debug)]
pub struct LogLimit {
    window_start: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

impl Default for LogLimit {
    fn default() -> Self {
        LogLimit::new()
    }
}

impl LogLimit {
    /// Lines per window.
    pub const BURST: u32 = 5;
    /// The window.
    pub const WINDOW: Duration = Duration::from_secs(10);

    /// A limiter with a full budget.
    pub const fn new() -> LogLimit {
        LogLimit {
            window_start: None,
            logged: 0,
            suppressed: 0,
        }
    }

    /// Whether a line may be logged now (counts it either way).
    pub fn allow(&mut self, queue: usize) -> bool {
        let now = Instant::now();
        let expired = self
            .window_start
            .is_none_or(|s| now.duration_since(s) >= Self::WINDOW);
        if expired {
            if self.suppressed > 0 {
                log::warn!(
                    "queue {queue}: {} similar message(s) suppressed",
                    self.suppressed
                );
            }
            self.window_start = Some(now);
            self.logged = 0;
            self.suppressed = 0;
        }
        if self.logged < Self::BURST {
            self.logged += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }
}

/// Counts a failed request by kind and logs it with its error chain
/// (rate-limited).
pub fn report(limit: &mut LogLimit, stats: &QueueStats, queue: usize, head: u16, e: &RequestError) {
    e.count(stats);
    if limit.allow(queue) {
        log::warn!("queue {queue}: request {head} failed: {}", Chain(e));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_limit_lets_a_burst_through_then_suppresses() {
        let mut l = LogLimit::new();
        let allowed = (0..100).filter(|_| l.allow(0)).count();
        assert_eq!(allowed, LogLimit::BURST as usize);
        assert_eq!(l.suppressed, 100 - u64::from(LogLimit::BURST));
    }

    #[test]
    fn errors_are_counted_by_kind_and_explained_with_their_chain() {
        let stats = QueueStats::default();
        let nospc = RequestError::Disk(OpError::Os {
            op: "write",
            source: std::io::Error::from_raw_os_error(libc::ENOSPC),
        });
        assert_eq!(nospc.kind(), ErrorKind::NoSpace);
        nospc.count(&stats);
        let text = Chain(&nospc).to_string();
        assert!(text.starts_with("disk operation failed: write: "), "{text}");
        let corrupt = RequestError::Disk(OpError::Disk {
            op: "read",
            source: crate::disk::DiskError::Qcow2(qcow2::Error::Corrupt("L2 table".into())),
        });
        assert_eq!(corrupt.kind(), ErrorKind::Corrupt);
        corrupt.count(&stats);
        let qcow2_nospc = RequestError::Disk(OpError::Disk {
            op: "write",
            source: crate::disk::DiskError::Qcow2(qcow2::Error::NoSpace),
        });
        assert_eq!(qcow2_nospc.kind(), ErrorKind::NoSpace);
        RequestError::Malformed(ParseError::NoStatus).count(&stats);
        let eio = RequestError::Disk(OpError::Os {
            op: "read",
            source: std::io::Error::from_raw_os_error(libc::EIO),
        });
        eio.count(&stats);
        let j = stats.to_json(0);
        for k in ["err_io", "err_no_space", "err_corrupt", "err_malformed"] {
            assert_eq!(j[k], 1, "{k}: {j}");
        }
    }
}
