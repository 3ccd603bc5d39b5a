//! Backend reconnect: the `outboard` VMM keeps the guest running when its vhost-user-blk
//! backend goes away, reconnects when a new one listens on the same socket, and replays
//! the memory table and the ring state; the guest's I/O after the restart completes and
//! both writes (before and after) are in the image.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use outboard_tests::vmm::{guest_or_skip, Outboard};
use outboard_tests::{assert_bytes_eq, workspace_binary};

const MIB: usize = 1 << 20;
const LINE_A: &str = "A-written-before-the-backend-restart-0123456789\n";
const LINE_B: &str = "B-written-after-the-backend-restart-9876543210\n";

const SCRIPT: &str = "set -e
yes A-written-before-the-backend-restart-0123456789 | head -c 1048576 >/tmp/a
yes B-written-after-the-backend-restart-9876543210 | head -c 1048576 >/tmp/b
dd if=/tmp/a of=/dev/vda bs=65536 oflag=direct conv=fsync 2>/dev/null
echo phase1-done
sleep 5
dd if=/tmp/b of=/dev/vda bs=65536 seek=32 oflag=direct conv=fsync 2>/dev/null
dd if=/dev/vda bs=65536 count=16 iflag=direct 2>/dev/null | cmp - /tmp/a
dd if=/dev/vda bs=65536 skip=32 count=16 iflag=direct 2>/dev/null | cmp - /tmp/b
echo phase2-done
";

fn lines(l: &str) -> Vec<u8> {
    l.repeat(MIB / l.len() + 1).into_bytes()[..MIB].to_vec()
}

fn start_daemon(image: &Path, sock: &Path) -> Child {
    let c = Command::new(workspace_binary("vhost-user-blk"))
        .arg("--socket-path")
        .arg(sock)
        .arg("--blk-file")
        .arg(image)
        .stdin(Stdio::null())
        .spawn()
        .expect("start vhost-user-blk");
    let t0 = Instant::now();
    while !sock.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "socket never appeared"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    c
}

fn stop(mut c: Child) {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
    let _ = c.wait();
}

#[test]
fn guest_survives_a_backend_restart() {
    let guest = match guest_or_skip() {
        Ok(g) => g,
        Err(_) => return, // recorded as skipped (no /dev/kvm) by guest_or_skip
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.raw");
    std::fs::write(&image, vec![0u8; 16 * MIB]).expect("image");
    let sock = dir.path().join("blk.sock");
    let mut daemon = Some(start_daemon(&image, &sock));
    let mut restarted_at = None;
    let run = Outboard::new(&guest)
        .disk(&format!("socket={}", sock.display()))
        .run_with(SCRIPT, Duration::from_secs(60), |l| {
            if l.trim_end() == "phase1-done" {
                // Stop the backend (it drains and exits), then start a new one.
                if let Some(d) = daemon.take() {
                    stop(d);
                }
                let _ = std::fs::remove_file(&sock);
                std::thread::sleep(Duration::from_millis(500));
                daemon = Some(start_daemon(&image, &sock));
                restarted_at = Some(Instant::now());
            }
        });
    if let Some(d) = daemon.take() {
        stop(d);
    }
    run.assert_ok("reconnect");
    assert!(restarted_at.is_some(), "the backend was never restarted");
    assert!(run.output.contains("phase2-done"), "{}", run.output);
    assert!(
        run.stderr.contains("backend reconnected, device resumed"),
        "the VMM did not report the reconnect:\n{}",
        run.stderr
    );
    let raw = std::fs::read(&image).expect("read image");
    assert_bytes_eq(&lines(LINE_A), &raw[..MIB], "written before the restart");
    assert_bytes_eq(
        &lines(LINE_B),
        &raw[2 * MIB..3 * MIB],
        "written after the restart",
    );
}
