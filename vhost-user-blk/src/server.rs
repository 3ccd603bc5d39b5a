//! The serve loop: one listening socket for the daemon's whole life (see
//! `outboard_common::server`). Before each connection, each queue's
//! completion eventfd goes on its worker thread's epoll; after a frontend
//! disconnects the device forgets the connection's vrings and flushes the
//! disk.

use std::os::unix::net::UnixListener;
use std::sync::Arc;

use outboard_common::server::Session;
pub use outboard_common::server::{bind, from_fd, ServeError};
use vhost_user_backend::VhostUserDaemon;
use vmm_sys_util::epoll::EventSet;

use crate::backend::BlkBackend;
use crate::device::BlkDevice;

struct BlkSession(BlkBackend);

impl Session<BlkBackend> for BlkSession {
    fn prepare(&mut self, daemon: &VhostUserDaemon<BlkBackend>) -> Result<(), String> {
        let event = self.0.completion_event();
        for (i, h) in daemon.get_epoll_handlers().iter().enumerate() {
            // Thread i serves queue i. Edge-triggered: nobody reads the
            // eventfd, each completion batch is one edge.
            if let Some(fd) = self.0.device.completion_fd(i) {
                h.register_listener(fd, EventSet::IN | EventSet::EDGE_TRIGGERED, event)
                    .map_err(|e| format!("watching completions of queue {i}: {e}"))?;
            }
        }
        Ok(())
    }

    fn disconnected(&mut self) {
        self.0.disconnected();
        if let Err(e) = self.0.device.disk.flush() {
            log::error!("flush after disconnect failed: {e}");
        }
    }
}

/// Serves frontends one after another, forever (or until the process is
/// terminated by a signal, see `main`).
pub fn serve(device: Arc<BlkDevice>, listener: UnixListener) -> Result<(), ServeError> {
    let backend = BlkBackend::new(device);
    outboard_common::server::serve(
        "vhost-user-blk",
        backend.clone(),
        listener,
        &mut BlkSession(backend),
    )
}
