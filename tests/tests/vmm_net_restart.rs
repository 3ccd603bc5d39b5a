//! NIC backend restart under the `outboard` VMM: the guest pings a host in another network
//! namespace (through a bridge) in a steady stream while the test SIGKILLs `vhost-user-net`
//! twice and starts it again with the same `--tap/--bridge/--mac` on the same socket. The
//! VMM reconnects and replays the rings; the stream must resume (the last replies of the
//! stream arrive after the last restart, and a ping after the stream gets every reply), the
//! restarted daemon's tap must be on the bridge again, and the peer must still know the
//! guest's MAC.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use outboard_tests::vmm::{guest_or_skip, vhost_user_net_binary, BridgedPeer, Outboard};

const GUEST_MAC: &str = "52:54:00:0b:00:02";
const TAP: &str = "obtap1";
/// Stream length (pings every 0.2 s).
const STREAM_SECS: u32 = 8;

struct NetDaemon {
    child: Child,
    bin: PathBuf,
    sock: PathBuf,
    logs: Vec<PathBuf>,
}

impl NetDaemon {
    fn start(bin: &Path, ns: &str, sock: &Path) -> NetDaemon {
        let mut d = NetDaemon {
            child: spawn(bin, ns, sock, &sock.with_extension("0.log")),
            bin: bin.to_path_buf(),
            sock: sock.to_path_buf(),
            logs: vec![sock.with_extension("0.log")],
        };
        d.wait_listening();
        d
    }

    fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let log = self.logs.last().cloned().unwrap_or_default();
        while !fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("waiting for a frontend")
        {
            assert!(
                self.child.try_wait().expect("wait").is_none(),
                "vhost-user-net exited: {}",
                self.log()
            );
            assert!(Instant::now() < deadline, "no listener after 10 s");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn crash_and_restart(&mut self, ns: &str) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reap");
        let log = self.sock.with_extension(format!("{}.log", self.logs.len()));
        self.child = spawn(&self.bin, ns, &self.sock, &log);
        self.logs.push(log);
        self.wait_listening();
    }

    fn log(&self) -> String {
        self.logs
            .iter()
            .map(|p| fs::read_to_string(p).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("--- next instance ---\n")
    }
}

impl Drop for NetDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the daemon in network namespace `ns`.
fn spawn(bin: &Path, ns: &str, sock: &Path, log: &Path) -> Child {
    Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(bin)
        .arg("--socket-path")
        .arg(sock)
        .args([
            "--tap",
            TAP,
            "--bridge",
            BridgedPeer::BRIDGE,
            "--mac",
            GUEST_MAC,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(log).expect("log"))
        .spawn()
        .expect("spawn vhost-user-net")
}

/// `seq=N` of each echo reply line of busybox ping.
fn reply_seqs(out: &str) -> Vec<u32> {
    out.lines()
        .filter(|l| l.contains("bytes from"))
        .filter_map(|l| l.split("seq=").nth(1)?.split(' ').next()?.parse().ok())
        .collect()
}

#[test]
fn ping_stream_resumes_across_net_daemon_restarts() {
    let guest = match guest_or_skip() {
        Ok(g) => g,
        Err(_) => return, // recorded as skipped (no /dev/kvm) by guest_or_skip
    };
    let bin = vhost_user_net_binary().unwrap_or_else(|e| panic!("vhost-user-net: {e}"));
    let net = BridgedPeer::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("net.sock");
    let daemon = NetDaemon::start(&bin, net.vm.name(), &sock);
    let script = format!(
        "set -e\n{}ping -c 2 -W 5 {peer} >/dev/null\necho stream-start\n\
         ping -i 0.2 -w {STREAM_SECS} {peer} || true\necho stream-end\n\
         ping -c 3 -W 5 {peer}\n",
        BridgedPeer::guest_setup(),
        peer = BridgedPeer::PEER_IP
    );
    let (tx, rx) = mpsc::channel::<()>();
    let vm_ns = net.vm.name().to_string();
    let killer = std::thread::spawn(move || {
        let mut daemon = daemon;
        let mut kills = Vec::new();
        if rx.recv_timeout(Duration::from_secs(60)).is_ok() {
            let t0 = Instant::now();
            for at in [Duration::from_millis(1500), Duration::from_millis(3500)] {
                std::thread::sleep(at.saturating_sub(t0.elapsed()));
                daemon.crash_and_restart(&vm_ns);
                kills.push(t0.elapsed());
            }
        }
        (daemon, kills)
    });
    let run = Outboard::new(&guest)
        .netns(net.vm.name())
        .net(&format!("socket={},mac={GUEST_MAC}", sock.display()))
        .run_with(&script, Duration::from_secs(60), |l| {
            if l.trim_end() == "stream-start" {
                let _ = tx.send(());
            }
        });
    drop(tx);
    let (daemon, kills) = killer.join().expect("killer thread");
    run.assert_ok(&format!("ping across restarts\n{}", daemon.log()));
    let stream = run
        .output
        .split("stream-start")
        .nth(1)
        .and_then(|s| s.split("stream-end").next())
        .unwrap_or_default();
    let seqs = reply_seqs(stream);
    let sent = STREAM_SECS * 5;
    eprintln!(
        "kills at {kills:?} after the stream started; {} of ~{sent} replies, last seq {:?}; \
         VMM reconnects {}",
        seqs.len(),
        seqs.last(),
        run.stderr
            .matches("backend reconnected, device resumed")
            .count()
    );
    assert_eq!(kills.len(), 2, "the daemon was not restarted twice");
    assert_eq!(
        run.stderr
            .matches("backend reconnected, device resumed")
            .count(),
        2,
        "VMM reconnects:\n{}",
        run.stderr
    );
    // The last restart is done ~4 s into an 8 s stream: replies in its last two seconds
    // (seq >= 30 at 5 per second) came through the restarted daemon.
    let late = seqs.iter().filter(|&&s| s >= sent - 10).count();
    assert!(
        late >= 5,
        "the ping stream did not resume after the restarts: {seqs:?}\n{stream}"
    );
    assert!(
        run.output.contains("3 packets received"),
        "ping after the stream:\n{}",
        run.output
    );
    assert_eq!(
        net.master_of(TAP).as_deref(),
        Some(BridgedPeer::BRIDGE),
        "the restarted daemon's tap is not on the bridge"
    );
    net.assert_peer_learned(GUEST_MAC);
}
