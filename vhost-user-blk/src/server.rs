//! The serve loop: one listening socket for the daemon's whole life; each
//! frontend connection gets a fresh vhost-user handler, and when it goes
//! away (VM reboot, QEMU restart) the daemon flushes and listens again on
//! the same socket, which is never unlinked under the next client's feet.

use std::os::unix::fs::FileTypeExt;
use std::os::unix::io::FromRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::backend::{BlkBackend, BlkDevice};

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

/// Serves frontends one after another, forever (or until the process is
/// terminated by a signal, see `main`).
pub fn serve(device: Arc<BlkDevice>, listener: UnixListener) -> Result<(), ServeError> {
    let mut listener = Listener::from(listener);
    loop {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon =
            VhostUserDaemon::new("vhost-user-blk".into(), BlkBackend(device.clone()), mem)
                .map_err(|e| ServeError::Daemon(e.to_string()))?;
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
        device.disconnected();
        if let Err(e) = device.disk.flush() {
            log::error!("flush after disconnect failed: {e}");
        }
    }
}
