//! The adaptive busy-poll window of the TX engine (as the block daemon's
//! queues do): when a queue runs dry, it polls its available ring for a
//! while before waiting for a kick, which spares the driver the kick and
//! this thread the wake-up while frames keep coming.
//!
//! The window adapts like QEMU's aio-poll: a queue woken by a kick sooner
//! than the largest window (`--poll-us`) would have caught that chain by
//! polling, so the window grows; a longer sleep means polling would have
//! been wasted and the window shrinks, to nothing on an idle queue.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryBackend;

/// Shortest poll window worth spinning for.
const MIN_POLL: Duration = Duration::from_micros(2);

/// The window and when the queue went to sleep.
#[derive(Debug, Default)]
pub struct PollWindow {
    max: Duration,
    window: Duration,
    asleep_since: Option<Instant>,
}

impl PollWindow {
    /// A window of at most `max` (zero: never poll).
    pub fn new(max: Duration) -> PollWindow {
        PollWindow {
            max,
            ..PollWindow::default()
        }
    }

    /// The queue is about to wait for a kick.
    pub fn sleeping(&mut self) {
        self.asleep_since = Some(Instant::now());
    }

    /// The queue was woken.
    pub fn woken(&mut self) {
        if let Some(since) = self.asleep_since.take() {
            self.adapt(since.elapsed());
        }
    }

    fn adapt(&mut self, slept: Duration) {
        if self.max.is_zero() {
            self.window = Duration::ZERO;
            return;
        }
        if slept >= self.max {
            self.window /= 2;
            if self.window < MIN_POLL {
                self.window = Duration::ZERO;
            }
        } else if slept > self.window {
            self.window = (self.window * 2).max(MIN_POLL).min(self.max);
        }
    }

    /// Polls the available ring for up to the current window; `true` when
    /// a new chain arrived.
    pub fn poll<M: GuestMemoryBackend>(
        &self,
        q: &Queue,
        mem: &M,
    ) -> Result<bool, virtio_queue::Error> {
        if self.window.is_zero() {
            return Ok(false);
        }
        let deadline = Instant::now() + self.window;
        while Instant::now() < deadline {
            if q.avail_idx(mem, Ordering::Acquire)?.0 != q.next_avail() {
                return Ok(true);
            }
            // Yield rather than spin: a driver on this CPU gets to publish
            // its next chain at once; otherwise this returns at once.
            std::thread::yield_now();
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_grows_on_short_sleeps_and_shrinks_to_zero_when_idle() {
        let max = Duration::from_micros(50);
        let mut p = PollWindow::new(max);
        p.adapt(Duration::from_micros(10));
        assert_eq!(p.window, MIN_POLL);
        for _ in 0..10 {
            p.adapt(Duration::from_micros(49));
        }
        assert_eq!(p.window, max);
        for _ in 0..10 {
            p.adapt(Duration::from_millis(1));
        }
        assert_eq!(p.window, Duration::ZERO);
        let mut off = PollWindow::new(Duration::ZERO);
        off.adapt(Duration::from_micros(1));
        assert_eq!(off.window, Duration::ZERO);
    }
}
