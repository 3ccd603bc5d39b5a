//! The adaptive busy-poll window of a queue that ran dry.

use std::time::{Duration, Instant};

/// Shortest poll window worth spinning for.
const MIN_POLL: Duration = Duration::from_micros(2);

/// The busy-poll window after the queue runs dry, adapted like QEMU's
/// aio-poll: when the queue is woken by a kick sooner than the largest
/// window (`--poll-us`), polling that long would have caught the request
/// without the kick and the wake-up, so the window grows; when it slept
/// longer, polling would have been wasted and the window shrinks. An idle
/// queue thus stops spinning, a busy one spins just long enough.
#[derive(Debug, Default)]
pub(crate) struct PollWindow {
    pub(crate) window: Duration,
    asleep_since: Option<Instant>,
}

impl PollWindow {
    /// The queue is about to wait for a kick.
    pub(crate) fn sleeping(&mut self) {
        self.asleep_since = Some(Instant::now());
    }

    /// The queue was woken; `max` is the largest window (zero: no polling).
    pub(crate) fn woken(&mut self, max: Duration) {
        if let Some(since) = self.asleep_since.take() {
            self.adapt(since.elapsed(), max);
        }
    }

    /// Adapts the window to a sleep of `slept`.
    fn adapt(&mut self, slept: Duration, max: Duration) {
        if max.is_zero() {
            self.window = Duration::ZERO;
            return;
        }
        if slept >= max {
            self.window /= 2;
            if self.window < MIN_POLL {
                self.window = Duration::ZERO;
            }
        } else if slept > self.window {
            self.window = (self.window * 2).max(MIN_POLL).min(max);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_micros(50);

    #[test]
    fn poll_window_grows_on_short_sleeps_and_shrinks_to_zero_when_idle() {
        let mut p = PollWindow::default();
        assert_eq!(p.window, Duration::ZERO);
        // Kicked 10 us after going to sleep, again and again: the window
        // grows past 10 us (polling would have caught it) up to the cap.
        let short = Duration::from_micros(10);
        let mut steps = 0;
        while p.window <= short {
            p.adapt(short, MAX);
            steps += 1;
            assert!(steps < 10, "window stuck at {:?}", p.window);
        }
        assert!(p.window <= MAX);
        // A sleep shorter than the window (the poll itself failed just
        // before) does not grow it further.
        let w = p.window;
        p.adapt(w / 2, MAX);
        assert_eq!(p.window, w);
        // Long sleeps: the window halves down to nothing.
        for _ in 0..10 {
            p.adapt(Duration::from_millis(5), MAX);
        }
        assert_eq!(p.window, Duration::ZERO);
        // Growth never exceeds the cap; a zero cap switches polling off.
        for _ in 0..20 {
            p.adapt(Duration::from_micros(49), MAX);
        }
        assert_eq!(p.window, MAX);
        p.adapt(short, Duration::ZERO);
        assert_eq!(p.window, Duration::ZERO);
    }
}
