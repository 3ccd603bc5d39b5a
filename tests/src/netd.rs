//! The `vhost-user-net` daemon as the network tests run it: started inside
//! a test namespace with a control socket, queried for its counters, killed
//! on drop.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::netns::Netns;

/// A running daemon.
#[derive(Debug)]
pub struct NetDaemon {
    child: Child,
    /// The vhost-user socket.
    pub socket: PathBuf,
    /// The control socket.
    pub control: PathBuf,
    log: PathBuf,
    /// Logs of earlier instances (before [`NetDaemon::crash_and_restart`]).
    old_logs: Vec<PathBuf>,
    /// How it was started (`ip netns exec NS BIN ARGS...`), to restart it.
    argv: Vec<std::ffi::OsString>,
    _dir: tempfile::TempDir,
}

impl NetDaemon {
    /// Starts `vhost-user-net --socket-path .. --control-socket .. ARGS` in
    /// `ns` and waits for both sockets.
    pub fn spawn(ns: &Netns, args: &[&str]) -> NetDaemon {
        Self::spawn_bin(&crate::workspace_binary("vhost-user-net"), ns, args)
    }

    /// [`NetDaemon::spawn`] with the daemon binary at `bin`.
    pub fn spawn_bin(bin: &Path, ns: &Netns, args: &[&str]) -> NetDaemon {
        let dir = tempfile::Builder::new()
            .prefix("ob-net-")
            .tempdir()
            .expect("tempdir");
        // With --user, the sockets' directory belongs to that user, as a
        // deployment would arrange (the daemon removes its socket at exit).
        if let Some(user) = args
            .iter()
            .position(|a| *a == "--user")
            .and_then(|i| args.get(i + 1))
        {
            chown_to(dir.path(), user);
        }
        let socket = dir.path().join("net.sock");
        let control = dir.path().join("ctl.sock");
        let log = dir.path().join("daemon.log");
        let mut cmd = ns.command(bin.to_str().expect("utf-8 path"));
        // OB_NET_SECCOMP=log runs every test daemon with that filter mode
        // (to list the system calls it makes: the kernel logs them).
        if let Ok(mode) = std::env::var("OB_NET_SECCOMP") {
            if !args.contains(&"--seccomp") {
                cmd.args(["--seccomp", &mode]);
            }
        }
        cmd.arg("--socket-path")
            .arg(&socket)
            .arg("--control-socket")
            .arg(&control)
            .args(["--log-level", "debug"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"));
        let argv = std::iter::once(cmd.get_program().to_os_string())
            .chain(cmd.get_args().map(|a| a.to_os_string()))
            .collect();
        let child = cmd.spawn().expect("spawn vhost-user-net");
        let mut d = NetDaemon {
            child,
            socket,
            control,
            log,
            old_logs: Vec::new(),
            argv,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(d.socket.exists() && d.control.exists()) {
            if let Ok(Some(st)) = d.child.try_wait() {
                panic!("vhost-user-net exited ({st}):\n{}", d.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "sockets did not appear:\n{}",
                d.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        d
    }

    /// The daemon's log so far (of every instance, oldest first).
    pub fn log_text(&self) -> String {
        let mut s = String::new();
        for (i, p) in self.old_logs.iter().enumerate() {
            s += &format!("--- instance {i} ---\n");
            s += &std::fs::read_to_string(p).unwrap_or_default();
        }
        if !self.old_logs.is_empty() {
            s += "--- current instance ---\n";
        }
        s + &std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, then the same command again (same socket, tap, bridge...):
    /// returns once the new instance listens.
    pub fn crash_and_restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let n = self.old_logs.len() + 1;
        let log = self.log.with_file_name(format!("daemon.{n}.log"));
        self.old_logs
            .push(std::mem::replace(&mut self.log, log.clone()));
        self.child = std::process::Command::new(&self.argv[0])
            .args(&self.argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("respawn vhost-user-net");
        // The socket files of the killed instance remain: wait for the log.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("waiting for a frontend")
        {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!(
                    "restarted vhost-user-net exited ({st}):\n{}",
                    self.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "restarted daemon not listening:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, and the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: signalling our own child process by its pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().expect("wait for the daemon")
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Field `key` (e.g. `"Seccomp:"`) of `/proc/PID/status`, trimmed.
    pub fn status_field(&self, key: &str) -> Option<String> {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        s.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.trim().to_string())
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// `{"cmd":"stats"}` on the control socket.
    pub fn stats(&self) -> serde_json::Value {
        control(&self.control, r#"{"cmd":"stats"}"#)
    }

    /// Sum of counter `key` over the queues of `direction` ("rx"/"tx").
    pub fn counter(&self, direction: &str, key: &str) -> u64 {
        let s = self.stats();
        s["queues"]
            .as_array()
            .expect("queues")
            .iter()
            .filter(|q| q["direction"] == direction)
            .map(|q| q[key].as_u64().expect("counter"))
            .sum()
    }

    /// Waits until the tap is up (a driver started the queues).
    pub fn wait_link(&self, up: bool, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.stats()["link_up"] != up {
            assert!(
                Instant::now() < deadline,
                "link_up did not become {up}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NetDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Gives `path` to `user` (and its primary group).
fn chown_to(path: &Path, user: &str) {
    let name = std::ffi::CString::new(user).expect("user name");
    // SAFETY: getpwnam returns NULL or a pointer to static storage that we
    // read at once, before any other getpw* call.
    let (uid, gid) = unsafe {
        let pw = libc::getpwnam(name.as_ptr());
        assert!(!pw.is_null(), "no user {user}");
        ((*pw).pw_uid, (*pw).pw_gid)
    };
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("chown the socket directory");
}

/// One request on a JSON-lines control socket.
pub fn control(path: &Path, request: &str) -> serde_json::Value {
    let mut s = UnixStream::connect(path).expect("connect control socket");
    writeln!(s, "{request}").expect("send");
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).expect("reply");
    serde_json::from_str(&line).expect("JSON reply")
}
