//! Online resize under the `outboard` VMM: while the guest runs, `vhost-user-blk ctl CTL
//! resize` grows the disk; the daemon sends a config-change message on the backend channel
//! the VMM opened (BACKEND_REQ), the VMM raises the config interrupt, and the guest's
//! virtio-blk driver re-reads the capacity: `/sys/block/vda/size` changes without a reboot.
//! The guest then writes past the old end, and the host finds those bytes in the file.

use std::fs;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use outboard_tests::vmm::{guest_or_skip, Outboard};
use outboard_tests::{assert_bytes_eq, workspace_binary};

const MIB: usize = 1 << 20;
const LINE: &str = "written-past-the-old-end-of-the-disk\n";

const SCRIPT: &str = "set -e
echo old-size $(cat /sys/block/vda/size)
echo waiting-for-resize
i=0
while [ \"$(cat /sys/block/vda/size)\" = 32768 ]; do
  i=$((i+1)); [ $i -lt 100 ] || { echo no-resize-seen; exit 1; }; sleep 0.1
done
echo new-size $(cat /sys/block/vda/size)
yes written-past-the-old-end-of-the-disk | head -c 1048576 >/tmp/r
dd if=/tmp/r of=/dev/vda bs=65536 seek=384 oflag=direct conv=fsync 2>/dev/null
echo wrote-new-area
";

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid (SIGTERM: drain, flush, exit).
        unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

#[test]
fn guest_sees_an_online_resize() {
    let guest = match guest_or_skip() {
        Ok(g) => g,
        Err(_) => return, // recorded as skipped (no /dev/kvm) by guest_or_skip
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.raw");
    fs::File::create(&image)
        .and_then(|f| f.set_len(16 * MIB as u64))
        .expect("image");
    let (sock, ctl) = (dir.path().join("blk.sock"), dir.path().join("ctl.sock"));
    let bin = workspace_binary("vhost-user-blk");
    let daemon = Daemon(
        Command::new(&bin)
            .arg("--socket-path")
            .arg(&sock)
            .arg("--blk-file")
            .arg(&image)
            .arg("--control-socket")
            .arg(&ctl)
            .stdin(Stdio::null())
            .spawn()
            .expect("start vhost-user-blk"),
    );
    let t0 = Instant::now();
    while !(sock.exists() && ctl.exists()) {
        assert!(t0.elapsed() < Duration::from_secs(10), "no sockets");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut reply = String::new();
    let run = Outboard::new(&guest)
        .disk(&format!("socket={}", sock.display()))
        .run_with(SCRIPT, Duration::from_secs(60), |l| {
            if l.trim_end() == "waiting-for-resize" {
                let o = Command::new(&bin)
                    .arg("ctl")
                    .arg(&ctl)
                    .args(["resize", "32M"])
                    .output()
                    .expect("vhost-user-blk ctl");
                reply = String::from_utf8_lossy(&o.stdout).into_owned();
            }
        });
    drop(daemon);
    run.assert_ok("online resize");
    eprintln!("ctl reply: {reply}\n{}", run.output);
    let reply: serde_json::Value = serde_json::from_str(&reply).expect("JSON reply from ctl");
    assert_eq!(
        reply["guest_notified"], true,
        "the daemon could not notify the frontend: {reply}"
    );
    assert!(run.output.contains("old-size 32768"), "{}", run.output);
    assert!(run.output.contains("new-size 65536"), "{}", run.output);
    let raw = fs::read(&image).expect("read image");
    assert_eq!(raw.len(), 32 * MIB, "image size after the resize");
    let want = LINE.repeat(MIB / LINE.len() + 1).into_bytes();
    assert_bytes_eq(
        &want[..MIB],
        &raw[24 * MIB..25 * MIB],
        "guest write past the old end",
    );
}
