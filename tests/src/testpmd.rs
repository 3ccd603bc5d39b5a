//! `dpdk-testpmd` (Debian `dpdk-dev`) as a traffic source and sink: without
//! hugepages, two lcores, one virtual device (our daemon through
//! `net_virtio_user`, or a tap through `net_tap` as the native baseline).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::netns::Netns;

/// The MAC address testpmd's port uses.
pub const PMD_MAC: &str = "02:00:00:00:00:01";

/// A running testpmd.
#[derive(Debug)]
pub struct Testpmd {
    child: Child,
    log: PathBuf,
    prefix: String,
    _dir: tempfile::TempDir,
}

/// The vdev argument for our daemon's socket.
pub fn virtio_user(socket: &Path) -> String {
    format!(
        "net_virtio_user0,path={},mac={PMD_MAC},queue_size=256",
        socket.display()
    )
}

/// The vdev argument for our daemon's socket with `queues` queue pairs.
pub fn virtio_user_mq(socket: &Path, queues: u16) -> String {
    format!("{},queues={queues}", virtio_user(socket))
}

/// The vdev argument for a tap named `iface` that testpmd creates.
pub fn tap(iface: &str) -> String {
    format!("net_tap0,iface={iface},mac={PMD_MAC}")
}

impl Testpmd {
    /// Starts testpmd on `vdev` with forwarding arguments `mode` (e.g.
    /// `--forward-mode=txonly`), inside `ns` when given.
    pub fn start(vdev: &str, mode: &[&str], ns: Option<&Netns>) -> Testpmd {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("testpmd.log");
        static N: AtomicU32 = AtomicU32::new(0);
        let prefix = format!(
            "ob-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let mut cmd = match ns {
            Some(ns) => ns.command("dpdk-testpmd"),
            None => Command::new("dpdk-testpmd"),
        };
        let child = cmd
            .args([
                "-l",
                "0-1",
                "--no-huge",
                "-m",
                "256",
                "--no-pci",
                "--no-shconf",
            ])
            .args(["--file-prefix", &prefix])
            .args(["--vdev", vdev, "--"])
            .args([
                "--total-num-mbufs=4096",
                "--auto-start",
                "--stats-period",
                "1",
            ])
            .args(mode)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).expect("log"))
            .stderr(std::fs::File::create(dir.path().join("stderr")).expect("log"))
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run dpdk-testpmd: {e} (apt-get install dpdk-dev; scripts/test.sh does)"
                )
            });
        Testpmd {
            child,
            log,
            prefix,
            _dir: dir,
        }
    }

    /// Its output so far.
    pub fn log_text(&self) -> String {
        let err = self.log.with_file_name("stderr");
        std::fs::read_to_string(&self.log).unwrap_or_default()
            + &std::fs::read_to_string(err).unwrap_or_default()
    }

    /// SIGINT, wait, and the accumulated (RX, TX) packet counts it prints.
    pub fn stop(mut self) -> (u64, u64) {
        // SAFETY: signalling our own child process by its pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = self.log_text();
        let acc = log
            .rsplit("Accumulated forward statistics")
            .next()
            .unwrap_or_else(|| panic!("no statistics from testpmd:\n{log}"));
        let num = |key: &str| -> u64 {
            acc.split(key)
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("no {key} in testpmd output:\n{log}"))
        };
        (num("RX-packets:"), num("TX-packets:"))
    }
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(format!("/var/run/dpdk/{}", self.prefix));
    }
}
