//! Backends the VMM starts itself: `--disk path=` runs our `vhost-user-blk`
//! and `--net tap=` our `vhost-user-net`, each on a socket in a private
//! directory. Children get PR_SET_PDEATHSIG (SIGTERM) so they die with the
//! VMM, and are stopped (SIGTERM, then SIGKILL) when the VM ends.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::cli::{parse_mac, DiskSpec, NetSpec};
use crate::pci::virtio::{DeviceKind, DeviceSpec};
use crate::vhost_user::{self, Backend};

/// How long a started daemon gets to open its socket.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The daemon binary is missing.
    #[error("{0} not found (build it with `cargo build -p {1}`, or set {2})")]
    NoBinary(PathBuf, &'static str, &'static str),
    /// Creating the private socket directory.
    #[error("creating the backend socket directory {0}")]
    Dir(PathBuf, #[source] std::io::Error),
    /// Starting the daemon.
    #[error("starting {0}")]
    Spawn(PathBuf, #[source] std::io::Error),
    /// The daemon exited before its socket was ready.
    #[error("{0} exited ({1}) before its socket was ready")]
    Died(String, std::process::ExitStatus),
    /// Connecting / negotiating.
    #[error(transparent)]
    VhostUser(#[from] vhost_user::Error),
}

/// The children and their socket directory.
#[derive(Debug, Default)]
pub struct Children {
    dir: Option<PathBuf>,
    procs: Vec<(String, Child)>,
}

impl Children {
    fn dir(&mut self) -> Result<PathBuf, Error> {
        if let Some(d) = &self.dir {
            return Ok(d.clone());
        }
        let d = std::env::temp_dir().join(format!("outboard-{}", std::process::id()));
        std::fs::create_dir_all(&d).map_err(|e| Error::Dir(d.clone(), e))?;
        self.dir = Some(d.clone());
        Ok(d)
    }

    /// SIGTERM every child, wait up to 5 s, then SIGKILL; remove the sockets.
    pub fn stop(&mut self) {
        for (_, c) in &self.procs {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for (name, c) in &mut self.procs {
            loop {
                match c.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        log::warn!("{name} did not stop on SIGTERM; killing it");
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        }
        self.procs.clear();
        if let Some(d) = self.dir.take() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        self.stop();
    }
}

fn daemon_binary(name: &'static str, env: &'static str) -> Result<PathBuf, Error> {
    if let Some(p) = std::env::var_os(env) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(|e| Error::Spawn(name.into(), e))?;
    let p = exe.parent().unwrap_or(Path::new(".")).join(name);
    if p.is_file() {
        Ok(p)
    } else {
        Err(Error::NoBinary(p, name, env))
    }
}

fn spawn(
    children: &mut Children,
    name: String,
    mut cmd: Command,
    sock: &Path,
) -> Result<Backend, Error> {
    // SAFETY: the closure only calls prctl, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| Error::Spawn(cmd.get_program().into(), e))?;
    children.procs.push((name.clone(), child));
    let t0 = Instant::now();
    loop {
        if sock.exists() {
            return Ok(Backend::connect(sock, START_TIMEOUT)?);
        }
        if let Some((_, c)) = children.procs.last_mut() {
            if let Ok(Some(st)) = c.try_wait() {
                return Err(Error::Died(name, st));
            }
        }
        if t0.elapsed() > START_TIMEOUT {
            return Ok(Backend::connect(sock, Duration::ZERO)?);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Connects or starts the backend of one disk.
pub fn disk(children: &mut Children, spec: &DiskSpec, index: usize) -> Result<DeviceSpec, Error> {
    let backend = match spec {
        DiskSpec::Socket(p) => Backend::connect(p, START_TIMEOUT)?,
        DiskSpec::Image {
            path,
            format,
            readonly,
            queues,
        } => {
            let bin = daemon_binary("vhost-user-blk", "OUTBOARD_VHOST_USER_BLK")?;
            let sock = children.dir()?.join(format!("disk{index}.sock"));
            let mut cmd = Command::new(&bin);
            cmd.arg("--socket-path")
                .arg(&sock)
                .arg("--blk-file")
                .arg(path)
                .arg("--format")
                .arg(format)
                .arg("--num-queues")
                .arg(queues.to_string());
            if *readonly {
                cmd.arg("--read-only");
            }
            spawn(
                children,
                format!("vhost-user-blk ({})", path.display()),
                cmd,
                &sock,
            )?
        }
    };
    Ok(DeviceSpec {
        kind: DeviceKind::Block,
        backend,
        mac: None,
        pairs: 1,
    })
}

/// Connects or starts the backend of one NIC.
pub fn net(children: &mut Children, spec: &NetSpec, index: usize) -> Result<DeviceSpec, Error> {
    let backend = match spec {
        NetSpec::Socket { path, .. } => Backend::connect(path, START_TIMEOUT)?,
        NetSpec::Tap {
            tap,
            bridge,
            mac,
            pairs,
        } => {
            let bin = daemon_binary("vhost-user-net", "OUTBOARD_VHOST_USER_NET")?;
            let sock = children.dir()?.join(format!("net{index}.sock"));
            let mut cmd = Command::new(&bin);
            cmd.arg("--socket-path").arg(&sock).arg("--tap").arg(tap);
            if let Some(b) = bridge {
                cmd.arg("--bridge").arg(b);
            }
            if let Some(m) = mac {
                cmd.arg("--mac").arg(m);
            }
            cmd.arg("--queue-pairs").arg(pairs.to_string());
            spawn(children, format!("vhost-user-net ({tap})"), cmd, &sock)?
        }
    };
    let (mac, pairs) = match spec {
        NetSpec::Socket { mac, pairs, .. } | NetSpec::Tap { mac, pairs, .. } => {
            (mac.as_deref().and_then(parse_mac), *pairs)
        }
    };
    Ok(DeviceSpec {
        kind: DeviceKind::Net,
        backend,
        mac: Some(mac.unwrap_or_else(outboard_common::mac::random_mac)),
        pairs,
    })
}
