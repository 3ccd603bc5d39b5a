//! Least privilege of the running daemon: the seccomp filter is on by
//! default (`Seccomp: 2` in `/proc/PID/status`) and off with
//! `--seccomp off`; `--user nobody` (the test runs as root) drops to that
//! uid after the sockets and the image are open, `--socket-mode` sets the
//! socket's permissions, and a libblkio client is served normally. (The
//! filter refusing a forbidden call is shown in `common/tests/sandbox.rs`.)

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use outboard_tests::blkio_client::{
    create_image, ours_command, ClientOptions, Daemon, DaemonConfig, Format,
};

fn status_field(pid: u32, field: &str) -> Option<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .map(|v| v.trim().to_string())
}

/// Waits until `field` of the daemon's status satisfies `ok`.
fn wait_status(pid: u32, field: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = status_field(pid, field).unwrap_or_default();
        if ok(&v) || Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn start(dir: &Path, extra: &[&str]) -> (Daemon, DaemonConfig) {
    let image = dir.join("disk.raw");
    create_image(&image, Format::Raw, 8 << 20);
    let cfg = DaemonConfig {
        image,
        format: Format::Raw,
        socket: dir.join("vhost.sock"),
        num_queues: 1,
        direct: false,
    };
    let mut cmd = ours_command(&outboard_tests::workspace_binary("vhost-user-blk"), &cfg);
    cmd.args(extra);
    let d = Daemon::spawn("vhost-user-blk", cmd, &cfg.socket, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}"));
    (d, cfg)
}

fn io_works(daemon: &mut Daemon) {
    let mut c = daemon
        .connect(&ClientOptions::queues(1))
        .unwrap_or_else(|e| panic!("connect: {e}\n{}", daemon.log_text()));
    let data = vec![0x5au8; 8192];
    c.write(4096, &data).expect("write");
    assert!(c.read(4096, data.len()).expect("read") == data);
}

#[test]
fn seccomp_filter_is_on_by_default_and_off_on_request() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut d, _) = start(dir.path(), &[]);
    let pid = d.pid().expect("pid");
    let v = wait_status(pid, "Seccomp:", |v| v == "2");
    assert_eq!(v, "2", "filter mode in /proc/{pid}/status");
    io_works(&mut d);
    d.stop();

    let dir = tempfile::tempdir().expect("tempdir");
    let (mut d, _) = start(dir.path(), &["--seccomp", "off"]);
    let pid = d.pid().expect("pid");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(status_field(pid, "Seccomp:").as_deref(), Some("0"));
    io_works(&mut d);
    d.stop();
}

#[test]
fn user_and_socket_mode() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test starts the daemon as root to see it drop privileges"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut d, cfg) = start(dir.path(), &["--user", "nobody", "--socket-mode", "0660"]);
    let pid = d.pid().expect("pid");
    let uid = wait_status(pid, "Uid:", |v| v.starts_with("65534"));
    assert!(
        uid.split_whitespace().all(|u| u == "65534"),
        "real, effective, saved and fs uid are nobody's: {uid}\n{}",
        d.log_text()
    );
    let groups = status_field(pid, "Groups:").unwrap_or_default();
    assert!(groups.is_empty(), "no supplementary groups: {groups:?}");
    let mode = std::fs::metadata(&cfg.socket)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o660, "socket mode {mode:o}");
    io_works(&mut d);
    d.stop();
}
