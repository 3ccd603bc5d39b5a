//! A full host file system under the daemon: the image (raw or qcow2) lives
//! on an 8 MiB tmpfs and a libblkio client writes 1 MiB requests past that.
//! The write that hits ENOSPC must fail with an I/O error (virtio IOERR,
//! EIO at the client) for that request only; the daemon stays up and keeps
//! serving reads of what was written; for raw, freeing space (a discard
//! punches the file) makes writes succeed again; for qcow2, the image has
//! no corruption afterwards (`qemu-img check`) and holds every completed
//! write. Each failed write is counted as `err_no_space` in the control
//! socket's stats and logged with its cause. Needs root (it mounts the
//! tmpfs).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use outboard_tests::blkio_client::{
    create_image, ours_command, ClientOptions, Daemon, DaemonConfig, Format,
};

const TMPFS_MIB: u64 = 8;
const DISK: u64 = 32 << 20;
const CHUNK: usize = 1 << 20;

struct Tmpfs(PathBuf, tempfile::TempDir);

impl Tmpfs {
    fn mount() -> Tmpfs {
        let dir = tempfile::tempdir().expect("tempdir");
        let mnt = dir.path().join("small");
        std::fs::create_dir(&mnt).expect("mkdir");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={TMPFS_MIB}m"))
            .arg("outboard-enospc")
            .arg(&mnt)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mounting a {TMPFS_MIB} MiB tmpfs failed (this test needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(mnt, dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn pattern(i: usize) -> Vec<u8> {
    (0..CHUNK)
        .map(|k| (k as u32).wrapping_mul(2_654_435_761).to_le_bytes()[(k + i) % 4] ^ i as u8)
        .collect()
}

/// Writes 1 MiB chunks until one fails; returns how many succeeded.
fn fill(client: &mut outboard_tests::blkio_client::BlkClient, daemon: &mut Daemon) -> usize {
    for i in 0..(DISK as usize / CHUNK) {
        match client.write((i * CHUNK) as u64, &pattern(i)) {
            Ok(()) => {}
            Err(e) => {
                assert_eq!(
                    e.errno(),
                    Some(libc::EIO),
                    "the failed write reports an I/O error: {e}"
                );
                assert!(daemon.is_running(), "daemon died:\n{}", daemon.log_text());
                return i;
            }
        }
    }
    panic!("wrote {DISK} bytes to a {TMPFS_MIB} MiB file system without an error");
}

fn start(image: &Path, format: Format, dir: &Path) -> Daemon {
    let cfg = DaemonConfig {
        image: image.to_path_buf(),
        format,
        socket: dir.join(format!("{format}.sock")),
        num_queues: 1,
        direct: false,
    };
    let mut cmd = ours_command(&outboard_tests::workspace_binary("vhost-user-blk"), &cfg);
    cmd.arg("--control-socket").arg(control_socket(format, dir));
    Daemon::spawn("vhost-user-blk", cmd, &cfg.socket, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}"))
}

fn control_socket(format: Format, dir: &Path) -> PathBuf {
    dir.join(format!("{format}-ctl.sock"))
}

/// The failed writes were counted as "no space" (not as generic I/O
/// errors) and logged with their cause.
fn check_counted_as_no_space(format: Format, dir: &Path, daemon: &Daemon) {
    let mut s = UnixStream::connect(control_socket(format, dir)).expect("control socket");
    s.write_all(b"{\"cmd\":\"stats\"}\n")
        .expect("stats request");
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).expect("stats reply");
    let v: serde_json::Value = serde_json::from_str(&line).expect("stats json");
    let q = &v["queues"][0];
    let n = |k: &str| q[k].as_u64().unwrap_or_else(|| panic!("no {k} in {v}"));
    assert!(n("err_no_space") >= 1, "ENOSPC counted as no space: {v}");
    assert_eq!(
        n("err_io") + n("err_corrupt"),
        0,
        "nothing else failed: {v}"
    );
    let log = daemon.log_text();
    assert!(
        log.to_lowercase().contains("no space left"),
        "the failure is logged with its cause:\n{log}"
    );
}

fn check_prefix(client: &mut outboard_tests::blkio_client::BlkClient, n: usize) {
    for i in 0..n {
        let back = client
            .read((i * CHUNK) as u64, CHUNK)
            .expect("read back after ENOSPC");
        assert!(back == pattern(i), "chunk {i} reads back what was written");
    }
}

#[test]
fn raw_enospc_fails_the_request_and_the_daemon_recovers_when_space_returns() {
    let fs = Tmpfs::mount();
    let image = fs.0.join("disk.raw");
    create_image(&image, Format::Raw, DISK);
    let mut daemon = start(&image, Format::Raw, fs.1.path());
    let mut client = daemon.connect(&ClientOptions::queues(1)).expect("connect");
    let n = fill(&mut client, &mut daemon);
    assert!(
        (2..=TMPFS_MIB as usize).contains(&n),
        "{n} MiB written before ENOSPC"
    );
    check_prefix(&mut client, n);
    check_counted_as_no_space(Format::Raw, fs.1.path(), &daemon);
    // Free the first 4 MiB (punched out of the sparse file) and write again.
    client.discard(0, 4 << 20).expect("discard frees space");
    client
        .write((n * CHUNK) as u64, &pattern(n))
        .expect("the write succeeds once there is space again");
    let back = client.read((n * CHUNK) as u64, CHUNK).expect("read");
    assert!(back == pattern(n));
    drop(client);
    assert!(daemon.is_running(), "{}", daemon.log_text());
    daemon.stop();
}

#[test]
fn qcow2_enospc_fails_the_request_and_leaves_a_consistent_image() {
    let fs = Tmpfs::mount();
    let image = fs.0.join("disk.qcow2");
    create_image(&image, Format::Qcow2, DISK);
    let mut daemon = start(&image, Format::Qcow2, fs.1.path());
    let mut client = daemon.connect(&ClientOptions::queues(1)).expect("connect");
    let n = fill(&mut client, &mut daemon);
    assert!(
        (2..=TMPFS_MIB as usize).contains(&n),
        "{n} MiB written before ENOSPC"
    );
    check_prefix(&mut client, n);
    check_counted_as_no_space(Format::Qcow2, fs.1.path(), &daemon);
    // Flushing may fail too while the disk is full; the daemon must survive.
    let _ = client.flush();
    assert!(daemon.is_running(), "{}", daemon.log_text());
    drop(client);
    daemon.stop();
    let c = outboard_tests::qemu_check(&image, &[]);
    assert!(
        (c.code == 0 || c.code == 3) && !c.text.contains("ERROR"),
        "qemu-img check finds corruption after ENOSPC (exit {}):\n{}",
        c.code,
        c.text
    );
    let all = outboard_tests::qemu_read_all(&image, "qcow2");
    for i in 0..n {
        assert!(
            all[i * CHUNK..(i + 1) * CHUNK] == pattern(i)[..],
            "qemu-img reads chunk {i} as written"
        );
    }
}
