//! Batched tap I/O over io_uring: one ring per engine (RX or TX of one
//! queue pair), so a batch of frames costs one `io_uring_enter` instead of
//! one `readv`/`writev` each.
//!
//! The tap fd is not registered with the ring: a registered file is
//! released only when the kernel tears the ring down, asynchronously after
//! the process exited, so the tap (which must vanish on a clean exit)
//! would outlive the daemon for a moment.
//!
//! The engines submit a batch of `readv`/`writev` requests whose iovecs
//! point straight into guest memory (no bounce copy) and wait for all of
//! them before they touch the used ring: nothing is in flight between two
//! passes, so a queue stopped by the frontend (GET_VRING_BASE) never has a
//! request pending on guest memory.
//!
//! Tap reads carry `RWF_NOWAIT`: an empty tap completes the read with
//! `EAGAIN` at once instead of arming a poll (the engines are driven by the
//! tap's edge-triggered epoll, as on the synchronous path).

use std::os::fd::RawFd;

use io_uring::{cqueue, squeue, types, IoUring};

/// How the engines move frames to and from the tap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum TapIo {
    /// One `readv`/`writev` system call per frame.
    Sync,
    /// Batches of reads/writes submitted to an io_uring at once.
    #[default]
    Uring,
}

/// io_uring errors.
#[derive(Debug, thiserror::Error)]
pub enum UringError {
    /// The ring could not be created or the tap fd registered.
    #[error("setting up an io_uring for the tap")]
    Setup(#[source] std::io::Error),
}

/// A ring for one engine.
pub struct Ring {
    ring: IoUring,
    fd: RawFd,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring").finish_non_exhaustive()
    }
}

impl Ring {
    /// A ring of `entries` submission entries for the tap `fd`.
    /// COOP_TASKRUN: the thread enters the ring for every batch anyway, no
    /// interrupt is needed to run completions.
    pub fn new(entries: u32, fd: RawFd) -> Result<Ring, UringError> {
        let ring = IoUring::builder()
            .setup_coop_taskrun()
            .build(entries)
            .or_else(|_| IoUring::new(entries))
            .map_err(UringError::Setup)?;
        Ok(Ring { ring, fd })
    }

    /// The tap, as the target of a request.
    pub fn tap(&self) -> types::Fd {
        types::Fd(self.fd)
    }

    /// Submission entries.
    pub fn capacity(&mut self) -> usize {
        self.ring.submission().capacity()
    }

    /// Queues `sqe`; false when the submission queue is full.
    ///
    /// # Safety
    /// Every buffer and iovec array `sqe` refers to must stay valid until
    /// its completion has been reaped with [`Ring::run`].
    pub unsafe fn push(&mut self, sqe: &squeue::Entry) -> bool {
        // SAFETY: forwarded to the caller.
        unsafe { self.ring.submission().push(sqe).is_ok() }
    }

    /// Submits what was pushed and waits until `n` completions arrived,
    /// handing each `(user_data, result)` to `done`. On an error of the
    /// ring itself the completions not yet reaped are lost: `Err` with the
    /// number reaped, the caller counts the rest as failed.
    pub fn run(&mut self, n: usize, done: &mut dyn FnMut(u64, i32)) -> Result<(), usize> {
        let mut reaped = 0usize;
        while reaped < n {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                    ) => {}
                Err(_) => return Err(reaped),
            }
            let cq: cqueue::CompletionQueue<'_> = self.ring.completion();
            for c in cq {
                done(c.user_data(), c.result());
                reaped += 1;
            }
        }
        Ok(())
    }
}
