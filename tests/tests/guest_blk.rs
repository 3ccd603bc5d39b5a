//! A real Linux guest (QEMU, TCG) on our `vhost-user-blk` daemon: raw and
//! qcow2 disks, a second QEMU run against the same daemons (the frontend
//! restarts, the daemon listens again), and a live internal snapshot taken
//! through the control socket while the guest writes.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use outboard_tests::guest::{GuestImage, Qemu};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 32 * MIB;

/// The daemon binary built with the tests.
fn daemon_binary() -> PathBuf {
    outboard_tests::workspace_binary("vhost-user-blk")
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(image: &Path, format: &str, sock: &Path, ctl: Option<&Path>) -> Daemon {
    let mut cmd = Command::new(daemon_binary());
    cmd.arg("--socket-path")
        .arg(sock)
        .arg("--blk-file")
        .arg(image)
        .args(["--format", format, "--num-queues", "2"]);
    if let Some(c) = ctl {
        cmd.arg("--control-socket").arg(c);
    }
    let log = fs::File::create(sock.with_extension("log")).expect("log");
    let child = cmd
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn vhost-user-blk");
    let mut d = Daemon(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() || ctl.is_some_and(|c| !c.exists()) {
        assert!(
            d.0.try_wait().expect("wait").is_none(),
            "vhost-user-blk exited: {}",
            log_text(sock)
        );
        assert!(Instant::now() < deadline, "no socket after 10 s");
        std::thread::sleep(Duration::from_millis(10));
    }
    d
}

fn log_text(sock: &Path) -> String {
    fs::read_to_string(sock.with_extension("log")).unwrap_or_default()
}

/// 16384 lines of 64 bytes; busybox awk prints the same (values < 2^31).
fn pattern(seed: u64) -> Vec<u8> {
    let mut s = String::new();
    for i in 0..16384u64 {
        let v = (i * i * 48_271 + i + seed) % 2_147_483_647;
        s.push_str(&format!("ob-blk-pattern-{seed} {i:08} {v:037}\n"));
    }
    s.into_bytes()
}

/// Guest shell that writes pattern `seed` to DEV at 1 MiB and verifies it.
fn write_script(dev: &str, seed: u64) -> String {
    format!(
        "awk 'BEGIN{{for(i=0;i<16384;i++)printf \"ob-blk-pattern-{seed} %08d %037d\\n\",i,(i*i*48271+i+{seed})%2147483647}}' >/tmp/p{seed}\n\
         dd if=/tmp/p{seed} of={dev} bs=64k seek=16 oflag=direct conv=fsync 2>/dev/null\n\
         dd if={dev} of=/tmp/r bs=64k skip=16 count=16 iflag=direct 2>/dev/null\n\
         cmp /tmp/p{seed} /tmp/r\n"
    )
}

fn qemu_img(args: &[&str]) -> (bool, String) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn guest_uses_raw_and_qcow2_disks_and_reconnects_after_qemu_restarts() {
    let image = GuestImage::ensure().unwrap_or_else(|e| panic!("building the test guest: {e}"));
    let dir = tempfile::tempdir().expect("tempdir");
    let raw = dir.path().join("a.raw");
    fs::File::create(&raw)
        .and_then(|f| f.set_len(SIZE))
        .expect("raw disk");
    let qc = dir.path().join("b.qcow2");
    let q = qc.to_str().expect("utf8");
    assert!(
        qemu_img(&[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=65536",
            q,
            "32M"
        ])
        .0
    );
    let (sa, sb) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let _da = start(&raw, "raw", &sa, None);
    let _db = start(&qc, "qcow2", &sb, None);

    let script = format!(
        "set -e\n{}{}fio --name=v --filename=/dev/vdb --offset=8m --size=4m --bs=4k --rw=randwrite --direct=1 --ioengine=libaio --iodepth=8 --verify=crc32c >/dev/null\necho first-boot-ok\n",
        write_script("/dev/vda", 1),
        write_script("/dev/vdb", 2)
    );
    let run = Qemu::new(&image)
        .vhost_user_blk(&sa, 2)
        .vhost_user_blk(&sb, 2)
        .run(&script, Duration::from_secs(180))
        .and_then(|r| r.check())
        .unwrap_or_else(|e| {
            panic!(
                "first boot: {e}\ndaemon logs:\n{}\n{}",
                log_text(&sa),
                log_text(&sb)
            )
        });
    assert!(run.output.contains("first-boot-ok"), "{}", run.output);
    eprintln!(
        "guest boot to userspace: {:?}, whole run {:?}",
        run.boot_to_marker, run.total
    );

    // QEMU restarts against the same daemons, which listened again.
    let run2 = Qemu::new(&image)
        .vhost_user_blk(&sa, 1)
        .vhost_user_blk(&sb, 1)
        .run(
            "set -e\nawk 'BEGIN{for(i=0;i<16384;i++)printf \"ob-blk-pattern-1 %08d %037d\\n\",i,(i*i*48271+i+1)%2147483647}' >/tmp/p\n\
             dd if=/dev/vda of=/tmp/r bs=64k skip=16 count=16 iflag=direct 2>/dev/null\ncmp /tmp/p /tmp/r\necho second-boot-ok\n",
            Duration::from_secs(120),
        )
        .and_then(|r| r.check())
        .unwrap_or_else(|e| panic!("second boot: {e}\ndaemon logs:\n{}", log_text(&sa)));
    assert!(run2.output.contains("second-boot-ok"));

    // The host sees the guest's bytes.
    let disk = fs::read(&raw).expect("raw image");
    let want = pattern(1);
    assert!(
        disk[MIB as usize..MIB as usize + want.len()] == want[..],
        "raw image holds the pattern"
    );
    outboard_tests::assert_qemu_check_clean(&qc, "after the guest wrote the image");
    let img = qcow2::Qcow2::open(&qc, &qcow2::OpenOptions::read_only()).expect("open qcow2");
    let want = pattern(2);
    let mut back = vec![0u8; want.len()];
    img.read_at(&mut back, MIB).expect("read qcow2");
    assert!(back == want, "qcow2 image holds the pattern");
}

#[test]
fn live_snapshot_while_the_guest_writes() {
    let image = GuestImage::ensure().unwrap_or_else(|e| panic!("building the test guest: {e}"));
    let dir = tempfile::tempdir().expect("tempdir");
    let qc = dir.path().join("live.qcow2");
    let q = qc.to_str().expect("utf8");
    assert!(qemu_img(&["create", "-f", "qcow2", q, "32M"]).0);
    let (sock, ctl) = (dir.path().join("l.sock"), dir.path().join("ctl.sock"));
    let _d = start(&qc, "qcow2", &sock, Some(&ctl));
    // Pattern 3 goes in first; then the guest keeps overwriting the same
    // region with pattern 4 until the host has taken the snapshot.
    let script = format!(
        "set -e\n{}echo before-done\nawk 'BEGIN{{for(i=0;i<16384;i++)printf \"%063d\\n\",i}}' >/tmp/q\n\
         for i in $(seq 1 40); do dd if=/tmp/q of=/dev/vda bs=64k seek=16 oflag=direct 2>/dev/null; done\necho writes-done\n",
        write_script("/dev/vda", 3)
    );
    let mut guest = Qemu::new(&image)
        .vhost_user_blk(&sock, 2)
        .spawn(&script)
        .expect("start guest");
    guest
        .wait_for_output("before-done", Duration::from_secs(120))
        .expect("guest wrote the first pattern");
    let out = Command::new(daemon_binary())
        .arg("ctl")
        .arg(&ctl)
        .args(["snapshot-create", "live"])
        .output()
        .expect("ctl");
    assert!(
        out.status.success(),
        "snapshot: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = guest
        .wait(Duration::from_secs(180))
        .and_then(|r| r.check())
        .expect("guest finished");
    assert!(
        run.output.contains("writes-done"),
        "the guest saw no I/O error: {}",
        run.output
    );
    drop(_d);
    let (ok, list) = qemu_img(&["snapshot", "-l", q]);
    assert!(ok && list.contains("live"), "{list}");
    outboard_tests::assert_qemu_check_clean(&qc, "after the guest wrote the image");
    let (ok, text) = qemu_img(&["snapshot", "-a", "live", q]);
    assert!(ok, "{text}");
    let img = qcow2::Qcow2::open(&qc, &qcow2::OpenOptions::read_only()).expect("open");
    let want = pattern(3);
    let mut back = vec![0u8; want.len()];
    img.read_at(&mut back, MIB).expect("read");
    assert!(
        back == want,
        "the snapshot holds the bytes written before it"
    );
}
