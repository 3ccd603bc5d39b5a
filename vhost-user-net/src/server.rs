//! Serving frontends one after another (`outboard_common::server`): before
//! each connection the tap fds go on the new worker threads' epoll; after a
//! disconnect the tap goes down (keeping its bridge membership) and the
//! daemon listens again.

use std::os::unix::net::UnixListener;

use outboard_common::server::{ServeError, Session};
use vhost_user_backend::VhostUserDaemon;
use vmm_sys_util::epoll::EventSet;

use crate::backend::NetBackend;

struct NetSession(NetBackend);

impl Session<NetBackend> for NetSession {
    fn prepare(&mut self, daemon: &VhostUserDaemon<NetBackend>) -> Result<(), String> {
        let handlers = daemon.get_epoll_handlers();
        let tap = self.0.device.tap();
        for (i, h) in handlers.iter().enumerate() {
            let Some(fd) = tap.fd(i) else {
                return Err(format!("no tap queue for worker thread {i}"));
            };
            h.register_listener(
                fd,
                EventSet::IN | EventSet::EDGE_TRIGGERED,
                self.0.tap_event(),
            )
            .map_err(|e| format!("watching tap queue {i}: {e}"))?;
        }
        Ok(())
    }

    fn disconnected(&mut self) {
        self.0.device.stop();
    }
}

/// Serves frontends one after another, forever (or until a signal).
pub fn serve(backend: NetBackend, listener: UnixListener) -> Result<(), ServeError> {
    let mut session = NetSession(backend.clone());
    outboard_common::server::serve("vhost-user-net", backend, listener, &mut session)
}
