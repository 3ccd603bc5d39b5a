//! Proves the real-guest harness (`outboard_tests::guest`) end to end with a vhost-user-blk
//! backend that exists independently of Outboard: `qemu-storage-daemon`.
//!
//! One boot of the Debian test guest under QEMU (TCG): the guest writes a deterministic
//! text pattern to `/dev/vda` with `dd` (O_DIRECT + fsync), reads it back and compares it, and
//! runs a short `fio` random-write job with verification in another region. The host then reads
//! the raw image and checks it against an independently computed expectation: the pattern
//! bytes, fio's verify headers in its region, and zeros everywhere else.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use outboard_tests::assert_bytes_eq;
use outboard_tests::guest::{GuestImage, Qemu};

const MIB: usize = 1 << 20;
const IMAGE_SIZE: usize = 16 * MIB;
/// The text pattern: 16384 lines of 64 bytes at 1 MiB.
const PATTERN_OFF: usize = MIB;
const PATTERN_LINES: u64 = 16384;
/// fio's region: 4 MiB at 8 MiB, 4 KiB blocks.
const FIO_OFF: usize = 8 * MIB;
const FIO_SIZE: usize = 4 * MIB;
const FIO_BS: usize = 4096;

/// The guest script. Must stay short: it travels on the kernel command line.
const SCRIPT: &str = r#"set -e
awk 'BEGIN{for(i=0;i<16384;i++)printf "ob-guest-pattern %08d %037d\n",i,(i*i*48271+i)%2147483647}' >/tmp/p
dd if=/tmp/p of=/dev/vda bs=64k seek=16 oflag=direct conv=fsync 2>/dev/null
dd if=/dev/vda of=/tmp/r bs=64k skip=16 count=16 iflag=direct 2>/dev/null
cmp /tmp/p /tmp/r
echo pattern-readback-ok
fio --name=v --filename=/dev/vda --offset=8m --size=4m --bs=4k --rw=randwrite --direct=1 --ioengine=libaio --iodepth=8 --verify=crc32c --output=/tmp/fio.log || { cat /tmp/fio.log; exit 1; }
echo fio-verify-ok
"#;

/// The pattern as the guest's awk prints it, computed independently on the host.
fn expected_pattern() -> Vec<u8> {
    let mut s = String::new();
    for i in 0..PATTERN_LINES {
        // < 2^31: busybox awk's %d is a 32-bit conversion.
        let v = (i * i * 48_271 + i) % 2_147_483_647;
        s.push_str(&format!("ob-guest-pattern {i:08} {v:037}\n"));
    }
    s.into_bytes()
}

/// Kills (and reaps) qemu-storage-daemon when the test ends, however it ends.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_qsd(image: &Path, socket: &Path, log: &Path) -> Daemon {
    let log_file = fs::File::create(log).expect("create the qemu-storage-daemon log");
    let child = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=f,filename={}",
            image.display()
        ))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable=on",
            socket.display()
        ))
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().expect("dup the log fd"))
        .stderr(log_file)
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start qemu-storage-daemon: {e}\nThis test needs it as a reference \
                 vhost-user-blk backend: apt-get install qemu-system-x86 (qemu-system-common)."
            )
        });
    let mut daemon = Daemon(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if let Ok(Some(status)) = daemon.0.try_wait() {
            panic!(
                "qemu-storage-daemon exited ({status}) before listening:\n{}",
                fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "qemu-storage-daemon did not create {} within 10 s",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    daemon
}

/// Checks fio's region: every 4 KiB block starts with a verify header (magic 0xacca, length
/// 4096, its own disk offset), i.e. fio wrote every block exactly where it meant to.
fn check_fio_region(disk: &[u8]) {
    for off in (FIO_OFF..FIO_OFF + FIO_SIZE).step_by(FIO_BS) {
        let b = &disk[off..off + FIO_BS];
        let magic = u16::from_le_bytes([b[0], b[1]]);
        let len = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        let mut o = [0u8; 8];
        o.copy_from_slice(&b[16..24]);
        let hdr_off = u64::from_le_bytes(o);
        assert!(
            magic == 0xacca && len == FIO_BS as u32 && hdr_off == off as u64,
            "block at {off:#x} has no fio verify header for itself: magic {magic:#x}, len {len}, \
             offset {hdr_off:#x}; first bytes {:02x?}",
            &b[..32]
        );
    }
}

#[test]
fn guest_writes_through_qemu_storage_daemon() {
    let t0 = Instant::now();
    let image = GuestImage::ensure().unwrap_or_else(|e| panic!("building the test guest: {e}"));
    let build_time = t0.elapsed();

    let dir = tempfile::tempdir().expect("tempdir");
    let disk: PathBuf = dir.path().join("disk.raw");
    let socket = dir.path().join("blk.sock");
    fs::File::create(&disk)
        .and_then(|f| f.set_len(IMAGE_SIZE as u64))
        .expect("create the raw disk");
    let daemon = start_qsd(&disk, &socket, &dir.path().join("qsd.log"));

    let run = Qemu::new(&image)
        .vhost_user_blk(&socket, 1)
        .run(SCRIPT, Duration::from_secs(150))
        .unwrap_or_else(|e| panic!("guest run failed: {e}"));
    drop(daemon);
    eprintln!(
        "guest: build/cache check {build_time:?}, boot to marker {:?}, QEMU total {:?}\n--- guest \
         output ---\n{}",
        run.boot_to_marker, run.total, run.output
    );
    assert_eq!(
        run.exit_code, 0,
        "guest script failed; serial console:\n{}",
        run.serial
    );
    assert!(run.output.contains("pattern-readback-ok"), "{}", run.output);
    assert!(run.output.contains("fio-verify-ok"), "{}", run.output);

    let bytes = fs::read(&disk).expect("read the raw disk");
    assert_eq!(bytes.len(), IMAGE_SIZE, "the disk changed size");
    let pattern = expected_pattern();
    assert_eq!(pattern.len(), MIB);
    let mut expected = vec![0u8; IMAGE_SIZE];
    expected[PATTERN_OFF..PATTERN_OFF + MIB].copy_from_slice(&pattern);
    check_fio_region(&bytes);
    // fio's region is checked above; compare everything else byte for byte.
    expected[FIO_OFF..FIO_OFF + FIO_SIZE].copy_from_slice(&bytes[FIO_OFF..FIO_OFF + FIO_SIZE]);
    assert_bytes_eq(&expected, &bytes, "raw disk written by the guest");
    eprintln!("guest harness test: {:?} in all", t0.elapsed());
}

/// The harness's failure paths (two more boots, so not in CI): a failing script's status comes
/// back, and a guest that never finishes is killed with its serial log in the error.
/// `cargo test -p outboard-tests --test guest_harness -- --ignored`
#[test]
#[ignore = "two extra guest boots; run by hand when changing the harness"]
fn harness_reports_exit_status_and_timeouts() {
    use outboard_tests::guest::GuestError;
    let image = GuestImage::ensure().unwrap_or_else(|e| panic!("building the test guest: {e}"));
    let run = Qemu::new(&image)
        .run("echo before; exit 7", Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("guest run failed: {e}"));
    assert_eq!((run.exit_code, run.output.as_str()), (7, "before\n"));
    assert!(matches!(
        run.check(),
        Err(GuestError::ScriptFailed { exit_code: 7, .. })
    ));

    let t = Instant::now();
    let err = Qemu::new(&image)
        .run("echo stuck; sleep 1000", Duration::from_secs(20))
        .expect_err("a guest that never powers off must time out");
    assert!(
        t.elapsed() < Duration::from_secs(40),
        "took {:?}",
        t.elapsed()
    );
    match &err {
        GuestError::Timeout { log, .. } => assert!(log.contains("stuck"), "{err}"),
        other => panic!("expected a timeout, got: {other}"),
    }
}
