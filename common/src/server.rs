//! The serve loop shared by the daemons: one listening socket for the
//! daemon's whole life; each frontend connection gets a fresh vhost-user
//! handler, and when it goes away (VM reboot, QEMU restart) the daemon runs
//! its per-disconnect hook and listens again on the same socket, which is
//! never unlinked under the next client's feet.

use std::os::unix::fs::FileTypeExt;
use std::os::unix::io::FromRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

/// Errors of the serve loop.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The socket path is taken by something else.
    #[error("{}: {reason}", path.display())]
    SocketInUse {
        /// The path.
        path: PathBuf,
        /// Why it can't be used.
        reason: &'static str,
    },
    /// Binding the socket failed.
    #[error("cannot listen on {}", path.display())]
    Bind {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The `--fd` is not a listening socket.
    #[error("--fd {0} is not a listening unix socket")]
    BadFd(i32),
    /// vhost-user-backend failed.
    #[error("vhost-user: {0}")]
    Daemon(String),
    /// The daemon's per-connection setup failed.
    #[error("connection setup: {0}")]
    Setup(String),
}

/// Binds `path`, removing a stale socket file nobody listens on.
pub fn bind(path: &Path) -> Result<UnixListener, ServeError> {
    if let Ok(md) = std::fs::symlink_metadata(path) {
        if !md.file_type().is_socket() {
            return Err(ServeError::SocketInUse {
                path: path.into(),
                reason: "exists and is not a socket",
            });
        }
        if UnixStream::connect(path).is_ok() {
            return Err(ServeError::SocketInUse {
                path: path.into(),
                reason: "another backend is listening there",
            });
        }
        let _ = std::fs::remove_file(path);
    }
    UnixListener::bind(path).map_err(|source| ServeError::Bind {
        path: path.into(),
        source,
    })
}

/// Takes over an inherited listening socket (`--fd`).
pub fn from_fd(fd: i32) -> Result<UnixListener, ServeError> {
    let mut accepting: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `accepting`.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut accepting as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r != 0 || accepting == 0 {
        return Err(ServeError::BadFd(fd));
    }
    // SAFETY: the fd is a listening socket handed to us by our parent, which
    // gives up its use; we own it from here on.
    Ok(unsafe { UnixListener::from_raw_fd(fd) })
}

/// What a daemon does around each frontend connection.
pub trait Session<B: VhostUserBackend> {
    /// Called with the fresh vhost-user daemon before it accepts the next
    /// frontend (e.g. to register extra fds on its worker threads' epoll).
    fn prepare(&mut self, _daemon: &VhostUserDaemon<B>) -> Result<(), String> {
        Ok(())
    }

    /// Called after the frontend went away, before listening again.
    fn disconnected(&mut self) {}
}

/// Serves frontends one after another with clones of `backend`, forever
/// (or until the process is terminated by a signal).
pub fn serve<B, S>(
    name: &str,
    backend: B,
    listener: UnixListener,
    session: &mut S,
) -> Result<(), ServeError>
where
    B: VhostUserBackend<Bitmap = ()> + Clone + 'static,
    B::Vring: Clone + Send + Sync,
    S: Session<B>,
{
    let mut listener = Listener::from(listener);
    loop {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = VhostUserDaemon::new(name.into(), backend.clone(), mem)
            .map_err(|e| ServeError::Daemon(e.to_string()))?;
        session.prepare(&daemon).map_err(ServeError::Setup)?;
        log::info!("waiting for a frontend");
        daemon
            .start(&mut listener)
            .map_err(|e| ServeError::Daemon(e.to_string()))?;
        log::info!("frontend connected");
        match daemon.wait() {
            Ok(()) => log::info!("frontend disconnected"),
            Err(e) => log::warn!("connection ended: {e}"),
        }
        drop(daemon);
        session.disconnected();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::io::AsRawFd;

    #[test]
    fn bind_replaces_stale_sockets_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("s");
        drop(bind(&p).expect("first bind"));
        // The file stays behind with nobody listening: stale, replaced.
        assert!(p.exists());
        let live = bind(&p).expect("rebind over a stale socket");
        assert!(matches!(bind(&p), Err(ServeError::SocketInUse { .. })));
        drop(live);
        let f = dir.path().join("file");
        std::fs::write(&f, b"x").expect("file");
        assert!(matches!(bind(&f), Err(ServeError::SocketInUse { .. })));
    }

    #[test]
    fn from_fd_wants_a_listening_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = std::fs::File::create(dir.path().join("f")).expect("file");
        assert!(matches!(
            from_fd(file.as_raw_fd()),
            Err(ServeError::BadFd(_))
        ));
    }
}
