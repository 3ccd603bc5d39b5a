//! Our `vhost-user-blk` daemon under the libblkio conformance suite (the same
//! cases that qemu-storage-daemon passes in `blkio_qsd.rs`), raw and qcow2.
//! qcow2 images are checked with `qemu-img check` afterwards.

use std::path::{Path, PathBuf};

use outboard_tests::blkio_client::{
    self as bc, create_image, Case, Daemon, DaemonConfig, Expect, Format,
};

const SIZE: u64 = 64 << 20;
const QUEUES: usize = 2;

/// The daemon binary built with the tests.
fn daemon_binary() -> PathBuf {
    outboard_tests::workspace_binary("vhost-user-blk")
}

/// Starts our daemon on `image` (`--socket-path SOCK --blk-file IMAGE` plus
/// `extra`) and waits until every path in `wait_for` exists.
fn spawn_daemon(
    sock: &Path,
    image: &Path,
    extra: &[&std::ffi::OsStr],
    wait_for: &[&Path],
) -> std::process::Child {
    let mut child = std::process::Command::new(daemon_binary())
        .arg("--socket-path")
        .arg(sock)
        .arg("--blk-file")
        .arg(image)
        .args(extra)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn vhost-user-blk");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !wait_for.iter().all(|p| p.exists()) {
        assert!(
            child.try_wait().expect("wait").is_none(),
            "vhost-user-blk exited early"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "sockets did not appear within 10 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child
}

fn run_case(format: Format, case: Case) {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join(format!("disk.{format}"));
    create_image(&image, format, SIZE);
    let cfg = DaemonConfig {
        image: image.clone(),
        format,
        socket: dir.path().join("vhost.sock"),
        num_queues: QUEUES,
        direct: false,
    };
    let mut daemon = Daemon::ours(&daemon_binary(), &cfg).unwrap_or_else(|e| panic!("{e}"));
    let expect = Expect {
        capacity: SIZE,
        num_queues: QUEUES,
        image: Some((image.clone(), format)),
    };
    case(daemon.socket(), &expect);
    assert!(
        daemon.is_running(),
        "vhost-user-blk died during the case:\n{}",
        daemon.log_text()
    );
    daemon.stop();
    if format == Format::Qcow2 {
        outboard_tests::assert_qemu_check_clean(&image, "after the daemon wrote the image");
    }
}

macro_rules! cases {
    ($($name:ident),* $(,)?) => {
        mod raw {
            $( #[test] fn $name() { super::run_case(super::Format::Raw, super::bc::$name); } )*
        }
        mod qcow2 {
            $( #[test] fn $name() { super::run_case(super::Format::Qcow2, super::bc::$name); } )*
        }
    };
}

cases!(
    case_capacity,
    case_write_read_patterns,
    case_flush,
    case_discard,
    case_write_zeroes,
    case_deep_queue,
    case_parallel_queues,
    case_out_of_range,
);

mod lifecycle {
    use std::os::unix::io::AsRawFd;
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};

    use outboard_tests::blkio_client::{create_image, BlkClient, ClientOptions, Format};

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
            .collect()
    }

    fn connect(sock: &std::path::Path) -> BlkClient {
        BlkClient::connect_vhost_user(sock, &ClientOptions::queues(1))
            .unwrap_or_else(|e| panic!("connect: {e}"))
    }

    #[test]
    fn relistens_on_the_same_socket_after_each_disconnect() {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("disk.qcow2");
        create_image(&image, Format::Qcow2, super::SIZE);
        let sock = dir.path().join("s.sock");
        let mut child = super::spawn_daemon(
            &sock,
            &image,
            &[
                std::ffi::OsStr::new("--format"),
                std::ffi::OsStr::new("qcow2"),
            ],
            &[&sock],
        );
        let data = pattern(256 * 1024, 3);
        {
            let mut c = connect(&sock);
            c.write(1 << 20, &data).expect("write");
        } // disconnect without a flush: the daemon flushes on disconnect
        for round in 0..3 {
            let mut c = connect(&sock);
            assert_eq!(
                c.read(1 << 20, data.len()).expect("read"),
                data,
                "round {round}"
            );
        }
        assert!(
            child.try_wait().expect("wait").is_none(),
            "daemon must keep running"
        );
        child.kill().expect("kill");
        let _ = child.wait();
        outboard_tests::assert_qemu_check_clean(&image, "after the daemon wrote the image");
    }

    #[test]
    fn serves_an_inherited_listening_fd() {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("disk.raw");
        create_image(&image, Format::Raw, super::SIZE);
        let sock = dir.path().join("inherited.sock");
        let listener = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
        let fd = listener.as_raw_fd();
        let mut cmd = Command::new(super::daemon_binary());
        cmd.arg("--fd")
            .arg(fd.to_string())
            .arg("--blk-file")
            .arg(&image)
            .stderr(Stdio::null());
        // SAFETY: only async-signal-safe fcntl between fork and exec, making
        // the listener survive exec (std sets CLOEXEC on it).
        unsafe {
            cmd.pre_exec(move || {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("spawn");
        drop(listener);
        let data = pattern(64 * 1024, 9);
        let mut c = connect(&sock);
        c.write(8192, &data).expect("write");
        c.flush().expect("flush");
        assert_eq!(c.read(8192, data.len()).expect("read"), data);
        drop(c);
        child.kill().expect("kill");
        let _ = child.wait();
        let on_disk = std::fs::read(&image).expect("image");
        assert_eq!(
            &on_disk[8192..8192 + data.len()],
            &data[..],
            "bytes in the file"
        );
    }

    #[test]
    fn sigterm_drains_and_flushes_qcow2_metadata() {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("disk.qcow2");
        create_image(&image, Format::Qcow2, super::SIZE);
        let sock = dir.path().join("t.sock");
        let mut child = super::spawn_daemon(
            &sock,
            &image,
            &[
                std::ffi::OsStr::new("--format"),
                std::ffi::OsStr::new("qcow2"),
            ],
            &[&sock],
        );
        let data = pattern(3 << 20, 5);
        let mut c = connect(&sock);
        c.write(5 << 20, &data).expect("write");
        // No flush from the guest: SIGTERM must make the data reachable.
        // SAFETY: plain kill(2) on our child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = child.wait().expect("wait");
        assert!(status.success(), "exit status after SIGTERM: {status}");
        assert!(!sock.exists(), "the daemon removes the socket it created");
        drop(c);
        outboard_tests::assert_qemu_check_clean(&image, "after the daemon wrote the image");
        let img = qcow2::Qcow2::open(&image, &qcow2::OpenOptions::read_only()).expect("open");
        let mut back = vec![0u8; data.len()];
        img.read_at(&mut back, 5 << 20).expect("read");
        assert!(
            back == data,
            "data written before SIGTERM must be in the image"
        );
    }
}

mod control {
    use std::process::Command;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use outboard_tests::blkio_client::{create_image, BlkClient, ClientOptions, Format};

    fn ctl(sock: &std::path::Path, args: &[&str]) -> serde_json::Value {
        let out = Command::new(super::daemon_binary())
            .arg("ctl")
            .arg(sock)
            .args(args)
            .output()
            .expect("ctl");
        assert!(
            out.status.success(),
            "ctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("ctl prints JSON")
    }

    #[test]
    fn live_snapshot_while_writing_holds_the_bytes_written_before_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("disk.qcow2");
        create_image(&image, Format::Qcow2, super::SIZE);
        let sock = dir.path().join("v.sock");
        let ctl_sock = dir.path().join("ctl.sock");
        let mut child = super::spawn_daemon(
            &sock,
            &image,
            &[
                std::ffi::OsStr::new("--format"),
                std::ffi::OsStr::new("qcow2"),
                std::ffi::OsStr::new("--num-queues"),
                std::ffi::OsStr::new("2"),
                std::ffi::OsStr::new("--control-socket"),
                ctl_sock.as_os_str(),
            ],
            &[&sock, &ctl_sock],
        );
        let mut c =
            BlkClient::connect_vhost_user(&sock, &ClientOptions::queues(2)).expect("connect");
        let before = vec![0xA5u8; 1 << 20];
        let after = vec![0x5Au8; 1 << 20];
        let stop = AtomicBool::new(false);
        let (q0, rest) = c.queues_mut().split_at_mut(1);
        let (q0, q1) = (&mut q0[0], &mut rest[0]);
        q0.write(0, &before).expect("write before");
        let written_during = std::thread::scope(|s| {
            // Queue 1 keeps writing elsewhere while the snapshot is taken.
            let writer = s.spawn(|| {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    q1.write((8 << 20) + (n % 64) * 4096, &[n as u8; 4096])
                        .expect("write during snapshot");
                    n += 1;
                }
                n
            });
            std::thread::sleep(Duration::from_millis(50));
            let reply = ctl(&ctl_sock, &["snapshot-create", "live1"]);
            assert_eq!(reply["name"], "live1");
            std::thread::sleep(Duration::from_millis(50));
            stop.store(true, Ordering::Relaxed);
            writer.join().expect("writer thread")
        });
        assert!(
            written_during > 0,
            "the writer made progress around the snapshot"
        );
        q0.write(0, &after).expect("write after");
        q0.flush().expect("flush");
        let stats = ctl(&ctl_sock, &["stats"]);
        let written: u64 = stats["queues"]
            .as_array()
            .expect("queues")
            .iter()
            .map(|q| q["write_bytes"].as_u64().unwrap_or(0))
            .sum();
        assert!(written >= 2 << 20, "stats count the writes: {stats}");
        let list = ctl(&ctl_sock, &["snapshot-list"]);
        assert_eq!(list["snapshots"][0]["name"], "live1", "{list}");
        drop(c);
        child.kill().expect("kill");
        let _ = child.wait();
        let p = image.to_str().expect("utf8");
        let out = Command::new("qemu-img")
            .args(["snapshot", "-l", p])
            .output()
            .expect("qemu-img");
        assert!(String::from_utf8_lossy(&out.stdout).contains("live1"));
        outboard_tests::assert_qemu_check_clean(&image, "after the daemon wrote the image");
        // qemu-img applies the snapshot: it holds what was written before it.
        let out = Command::new("qemu-img")
            .args(["snapshot", "-a", "live1", p])
            .output()
            .expect("qemu-img");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let img = qcow2::Qcow2::open(&image, &qcow2::OpenOptions::read_only()).expect("open");
        let mut back = vec![0u8; 1 << 20];
        img.read_at(&mut back, 0).expect("read");
        assert!(
            back == before,
            "the snapshot holds the bytes written before it"
        );
    }

    #[test]
    fn online_resize_grows_the_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("disk.qcow2");
        create_image(&image, Format::Qcow2, super::SIZE);
        let sock = dir.path().join("v.sock");
        let ctl_sock = dir.path().join("ctl.sock");
        let mut child = super::spawn_daemon(
            &sock,
            &image,
            &[
                std::ffi::OsStr::new("--format"),
                std::ffi::OsStr::new("qcow2"),
                std::ffi::OsStr::new("--control-socket"),
                ctl_sock.as_os_str(),
            ],
            &[&sock, &ctl_sock],
        );
        let reply = ctl(&ctl_sock, &["resize", "128M"]);
        assert_eq!(reply["size"], 128u64 << 20);
        let stats = ctl(&ctl_sock, &["stats"]);
        assert_eq!(stats["disk_size"], 128u64 << 20);
        // A new frontend sees the new capacity and can use the new space.
        let mut c =
            BlkClient::connect_vhost_user(&sock, &ClientOptions::queues(1)).expect("connect");
        assert_eq!(c.capacity(), 128 << 20);
        c.write(100 << 20, &[7u8; 4096])
            .expect("write in the new space");
        c.flush().expect("flush");
        drop(c);
        let bad = Command::new(super::daemon_binary())
            .arg("ctl")
            .arg(&ctl_sock)
            .args(["resize", "1M"])
            .output()
            .expect("ctl");
        assert!(!bad.status.success(), "shrinking is refused");
        child.kill().expect("kill");
        let _ = child.wait();
        outboard_tests::assert_qemu_check_clean(&image, "after the daemon wrote the image");
    }
}
