//! The `outboard` VMM with a virtio-pci disk served over vhost-user by another project's
//! backend, `qemu-storage-daemon` (`--disk socket=`); the same disk checks as the main test
//! (`vmm_main.rs`, which uses our `vhost-user-blk`): in the guest a text pattern is written to
//! `/dev/vda` with O_DIRECT and read back, then an ext4 file system is made in the first
//! 32 MiB, mounted, and a file written. On the host, independently of the VMM: the image
//! (converted to raw by qemu-img) holds the pattern at 48 MiB, debugfs reads the file back,
//! and `qemu-img check` finds the qcow2 image clean.

use std::fs;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use outboard_tests::qemu_img;
use outboard_tests::vmm::{disk_check, guest_or_skip, Outboard, VmmGuest};

fn guest() -> Option<VmmGuest> {
    // A missing /dev/kvm is recorded as this test's skip by guest_or_skip.
    guest_or_skip().ok()
}

fn run_guest(guest: &VmmGuest, disk: &str, what: &str) {
    let run = Outboard::new(guest).cpus(2).disk(disk).run(
        &format!("set -e\n{}", disk_check::SCRIPT),
        Duration::from_secs(120),
    );
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
    disk_check::check_image(&image, what);
}
