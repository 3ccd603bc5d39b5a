//! The `outboard` VMM with a virtio-pci disk served over vhost-user, against our
//! `vhost-user-blk` (started by the VMM for `--disk path=`) and against
//! `qemu-storage-daemon` (`--disk socket=`). In the guest: a text pattern is written to
//! `/dev/vda` with O_DIRECT and read back, then an ext4 file system is made in the first
//! 32 MiB, mounted, and a file written. On the host, independently of the VMM: the image
//! (converted to raw by qemu-img) holds the pattern at 48 MiB, debugfs reads the file back,
//! and `qemu-img check` finds the qcow2 image clean.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use outboard_tests::vmm::{guest_or_skip, Outboard, VmmGuest};
use outboard_tests::{assert_bytes_eq, assert_qemu_check_clean, qemu_img, qemu_read_all};

const MIB: usize = 1 << 20;
const PATTERN_OFF: usize = 48 * MIB;
const PATTERN_LINE: &str = "outboard-vmm-pattern-0123456789abcdefghijklmnopqrstuvwxyz-XYZ\n";

const SCRIPT: &str = "set -e
yes outboard-vmm-pattern-0123456789abcdefghijklmnopqrstuvwxyz-XYZ | head -c 1048576 >/tmp/p
dd if=/tmp/p of=/dev/vda bs=65536 seek=768 oflag=direct conv=fsync 2>/dev/null
dd if=/dev/vda bs=65536 skip=768 count=16 iflag=direct 2>/dev/null | cmp - /tmp/p
echo readback-ok
/usr/sbin/mke2fs -q -t ext4 -F /dev/vda 32M
mount -t ext4 /dev/vda /mnt
echo hello-from-outboard >/mnt/hello.txt
sync
umount /mnt
echo fs-ok
";

fn expected_pattern() -> Vec<u8> {
    PATTERN_LINE
        .repeat(MIB / PATTERN_LINE.len() + 1)
        .into_bytes()[..MIB]
        .to_vec()
}

fn guest() -> Option<VmmGuest> {
    match guest_or_skip() {
        Ok(g) => Some(g),
        Err(why) => {
            eprintln!("SKIPPED: {why}");
            None
        }
    }
}

fn check_image(image: &Path, what: &str) {
    let raw = qemu_read_all(image, "qcow2");
    assert_bytes_eq(
        &expected_pattern(),
        &raw[PATTERN_OFF..PATTERN_OFF + MIB],
        &format!("{what}: pattern at 48 MiB"),
    );
    assert_eq!(
        &raw[0x438..0x43a],
        &[0x53, 0xef],
        "{what}: ext4 superblock magic"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let rawf = dir.path().join("disk.raw");
    fs::write(&rawf, &raw).expect("write raw copy");
    let o = Command::new("debugfs")
        .arg("-R")
        .arg("cat /hello.txt")
        .arg(&rawf)
        .output()
        .expect("run debugfs (e2fsprogs)");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "hello-from-outboard\n",
        "{what}: file written in the guest, read by debugfs: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = Command::new("debugfs")
        .arg("-R")
        .arg("features")
        .arg(&rawf)
        .output()
        .expect("run debugfs");
    let feats = String::from_utf8_lossy(&o.stdout);
    assert!(
        feats.contains("extent") && feats.contains("has_journal"),
        "{what}: not an ext4 file system: {feats}"
    );
    assert_qemu_check_clean(image, what);
}

fn run_guest(guest: &VmmGuest, disk: &str, what: &str) {
    let run = Outboard::new(guest)
        .cpus(2)
        .disk(disk)
        .run(SCRIPT, Duration::from_secs(120));
    run.assert_ok(what);
    assert!(
        run.output.contains("readback-ok") && run.output.contains("fs-ok"),
        "{what}: {}",
        run.output
    );
    eprintln!(
        "{what}: process start to guest userspace {:?}, to exit {:?}",
        run.to_userspace.expect("OB_START"),
        run.total
    );
}

#[test]
fn qcow2_disk_served_by_our_vhost_user_blk() {
    let Some(guest) = guest() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.qcow2");
    qemu_img([
        "create",
        "-q",
        "-f",
        "qcow2",
        image.to_str().expect("utf-8"),
        "64M",
    ]);
    let what = "outboard + vhost-user-blk (child)";
    // The VMM stops its vhost-user-blk (SIGTERM: drain and flush) before it exits.
    run_guest(
        &guest,
        &format!("path={},format=qcow2", image.display()),
        what,
    );
    check_image(&image, what);
}

struct Qsd(Child);

impl Drop for Qsd {
    fn drop(&mut self) {
        // SIGTERM: qemu-storage-daemon flushes its qcow2 caches on the way out.
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM) };
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn qcow2_disk_served_by_qemu_storage_daemon() {
    let Some(guest) = guest() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.qcow2");
    let sock = dir.path().join("qsd.sock");
    qemu_img([
        "create",
        "-q",
        "-f",
        "qcow2",
        image.to_str().expect("utf-8"),
        "64M",
    ]);
    let log = fs::File::create(dir.path().join("qsd.log")).expect("log");
    let qsd = Qsd(Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=f,filename={}",
            image.display()
        ))
        .arg("--blockdev")
        .arg("driver=qcow2,node-name=q,file=f")
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e,node-name=q,addr.type=unix,addr.path={},writable=on",
            sock.display()
        ))
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup"))
        .stderr(log)
        .spawn()
        .expect("start qemu-storage-daemon (apt-get install qemu-system-x86)"));
    let t0 = Instant::now();
    while !sock.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "qsd socket never appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let what = "outboard + qemu-storage-daemon";
    run_guest(&guest, &format!("socket={}", sock.display()), what);
    drop(qsd);
    check_image(&image, what);
}
