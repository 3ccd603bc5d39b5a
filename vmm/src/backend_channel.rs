//! The backend channel of one vhost-user connection (BACKEND_REQ): a socket
//! pair whose far end goes to the backend with SET_BACKEND_REQ_FD, served by
//! a thread that answers the backend's requests. Only CONFIG_CHANGE_MSG is
//! handled (the device's config space changed, e.g. a disk was resized): it
//! calls the device's callback, which tells the guest. The thread ends when
//! its [`Channel`] is dropped (with the connection) or the socket breaks.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vhost::vhost_user::{FrontendReqHandler, VhostUserFrontendReqHandler};

/// What to call when the backend reports a config change.
pub type ConfigChange = Arc<dyn Fn() + Send + Sync>;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Creating the socket pair.
    #[error("creating the backend channel")]
    Create(#[source] vhost::vhost_user::Error),
    /// Starting the thread.
    #[error("starting the backend channel thread")]
    Thread(#[source] std::io::Error),
}

struct Handler {
    on_config: ConfigChange,
}

impl VhostUserFrontendReqHandler for Handler {
    fn handle_config_change(&self) -> std::io::Result<u64> {
        (self.on_config)();
        Ok(0)
    }
}

/// A served backend channel; dropping it stops the thread.
pub struct Channel {
    tx_fd: RawFd,
    stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("tx_fd", &self.tx_fd)
            .finish()
    }
}

impl AsRawFd for Channel {
    /// The end to send to the backend (owned by the serving thread, open
    /// until this handle is dropped and the thread notices).
    fn as_raw_fd(&self) -> RawFd {
        self.tx_fd
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn readable(fd: RawFd, timeout_ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let r = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    r > 0 && p.revents != 0
}

impl Channel {
    /// Creates the pair and starts serving it. `reply_ack`: whether
    /// REPLY_ACK was negotiated (the backend may then wait for our answers).
    pub fn start(name: &str, reply_ack: bool, on_config: ConfigChange) -> Result<Self, Error> {
        let mut h =
            FrontendReqHandler::new(Arc::new(Handler { on_config })).map_err(Error::Create)?;
        h.set_reply_ack_flag(reply_ack);
        let tx_fd = h.get_tx_raw_fd();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let name = name.to_string();
        std::thread::Builder::new()
            .name("vhost-backend-req".into())
            .spawn(move || {
                // The thread owns both ends: it polls with a timeout so that it
                // sees `stop` even though its own copy keeps the pair open.
                while !flag.load(Ordering::Relaxed) {
                    if !readable(h.as_raw_fd(), 200) {
                        continue;
                    }
                    match h.handle_request() {
                        Ok(_) => {}
                        Err(vhost::vhost_user::Error::Disconnected)
                        | Err(vhost::vhost_user::Error::SocketBroken(_))
                        | Err(vhost::vhost_user::Error::PartialMessage) => return,
                        Err(e) => log::warn!("{name}: backend request: {e}"),
                    }
                }
            })
            .map_err(Error::Thread)?;
        Ok(Channel { tx_fd, stop })
    }
}
