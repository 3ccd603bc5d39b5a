//! TEST ONLY: the completion hold of `--test-hold-completions-ms` (off in
//! production), which keeps requests in flight long enough for the crash
//! tests to kill the daemon with work recorded in the inflight region.

use virtio_queue::QueueT;
use vm_memory::GuestMemoryBackend;

use super::{QueueCtx, QueueEngine, QueueError, WAVE};
use crate::complete::{avail_ok, publish};

impl QueueEngine {
    /// TEST ONLY (see [`DeviceSettings::hold_completions`]): when this wave
    /// has requests in flight or held, starts the queued operations, sleeps
    /// the hold, then takes the next wave's chains from the available ring
    /// (recorded in the inflight region, queued like resubmissions), then
    /// publishes the held synchronous completions (the caller reaps the
    /// backend next). Every request therefore waits at least one hold
    /// between being taken and being published, and as the next wave is
    /// taken before this one is published, requests are in flight at every
    /// moment while the driver keeps more than a wave queued. The option is
    /// capped, so a pause or stop is delayed by at most one hold. Returns how
    /// many requests were published.
    #[cold]
    pub(super) fn hold_and_release<M: GuestMemoryBackend>(
        &mut self,
        ctx: &mut QueueCtx<'_, M>,
    ) -> Result<usize, QueueError> {
        let in_flight = self.free.len() < self.slots.len();
        if self.held.is_empty() && !in_flight {
            return Ok(0);
        }
        if in_flight {
            self.disk.kick(false)?;
        }
        std::thread::sleep(ctx.settings.hold_completions);
        // Not while the owner wants the pass to end (a new memory map, a
        // pause), and not before pending resubmissions (they are older).
        if self.resubmit.is_empty() && !self.interrupted() {
            while self.resubmit.len() < WAVE {
                avail_ok(ctx)?;
                let Some(chain) = ctx.q.pop_descriptor_chain(ctx.mem) else {
                    break;
                };
                let head = chain.head_index();
                if let Some(t) = self.inflight.as_mut() {
                    t.begin(head);
                }
                self.resubmit.push(head);
            }
            // Taken from the end: the oldest goes last.
            self.resubmit.reverse();
        }
        let n = self.held.len();
        for (head, status, done) in self.held.drain(..) {
            publish(ctx, self.inflight.as_ref(), head, status, done)?;
        }
        Ok(n)
    }
}
