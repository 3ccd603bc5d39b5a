//! The serve loop: one listening socket for the daemon's whole life (see
//! `outboard_common::server`); after each frontend disconnects the device
//! forgets the connection's vrings and flushes the disk.

use std::os::unix::net::UnixListener;
use std::sync::Arc;

use outboard_common::server::Session;
pub use outboard_common::server::{bind, from_fd, ServeError};

use crate::backend::BlkBackend;
use crate::device::BlkDevice;

struct BlkSession(BlkBackend);

impl Session<BlkBackend> for BlkSession {
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
