//! Link state and MTU the guest sees (issue 12, part 3), under the `outboard` VMM with
//! our `vhost-user-net` on a bridge: the daemon offers `--mtu 1400` and the guest's eth0
//! gets MTU 1400; `ctl link down` clears VIRTIO_NET_S_LINK_UP in the config space and
//! sends a config-change message, so the guest's `ip link` shows NO-CARRIER (and the tap
//! loses its carrier on the host); `ctl link up` brings both back, and the guest then
//! reaches the peer again (ping replies, and a 1372-byte ping that fills the 1400 MTU
//! without fragmenting).

use std::fs;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use outboard_tests::netd::control;
use outboard_tests::vmm::{guest_or_skip, vhost_user_net_binary, BridgedPeer, Outboard};

const GUEST_MAC: &str = "52:54:00:0c:00:02";
const TAP: &str = "obtapl";

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits up to 10 s for `/sys/class/net/TAP/carrier` in the VM namespace to read `want`.
fn wait_tap_carrier(net: &BridgedPeer, want: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let o = net
            .vm
            .command("cat")
            .arg(format!("/sys/class/net/{TAP}/carrier"))
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        if o == want {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn guest_sees_link_down_and_up_and_the_daemons_mtu() {
    let guest = match guest_or_skip() {
        Ok(g) => g,
        Err(_) => return, // recorded as skipped (no /dev/kvm) by guest_or_skip
    };
    let bin = vhost_user_net_binary().unwrap_or_else(|e| panic!("vhost-user-net: {e}"));
    let net = BridgedPeer::new();
    net.vm
        .ip(&["link", "set", BridgedPeer::BRIDGE, "mtu", "1400"]);
    net.vm.ip(&["link", "set", "vm-side", "mtu", "1400"]);
    net.peer.ip(&["link", "set", "peer-side", "mtu", "1400"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("net.sock");
    let ctl = dir.path().join("ctl.sock");
    let log = dir.path().join("daemon.log");
    let child = Command::new("ip")
        .args(["netns", "exec", net.vm.name()])
        .arg(&bin)
        .arg("--socket-path")
        .arg(&sock)
        .arg("--control-socket")
        .arg(&ctl)
        .args([
            "--tap",
            TAP,
            "--bridge",
            BridgedPeer::BRIDGE,
            "--mac",
            GUEST_MAC,
        ])
        .args(["--mtu", "1400", "--log-level", "debug"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn vhost-user-net");
    let _daemon = Daemon(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(sock.exists() && ctl.exists()) {
        assert!(Instant::now() < deadline, "no daemon sockets");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The guest waits for each change with a timeout and prints what `ip link` says (the
    // flags follow the operstate, which the kernel's link watch updates up to a second
    // after the carrier).
    let script = format!(
        "set -e\n{setup}\
         echo mtu=$(cat /sys/class/net/eth0/mtu)\n\
         ping -c 2 -W 5 {peer} >/dev/null\n\
         echo carrier=$(cat /sys/class/net/eth0/carrier)\n\
         echo want-down\n\
         i=0; while [ $(cat /sys/class/net/eth0/carrier) != 0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done\n\
         echo carrier=$(cat /sys/class/net/eth0/carrier)\n\
         i=0; while ! ip link show eth0 | grep -q NO-CARRIER && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done\n\
         echo down-link: $(ip link show eth0 | head -1)\n\
         echo want-up\n\
         i=0; while [ $(cat /sys/class/net/eth0/carrier) != 1 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done\n\
         echo carrier=$(cat /sys/class/net/eth0/carrier)\n\
         i=0; while ! ip link show eth0 | grep -q LOWER_UP && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done\n\
         echo up-link: $(ip link show eth0 | head -1)\n\
         ping -c 3 -W 5 {peer}\n\
         ping -c 2 -W 5 -s 1372 {peer}\n",
        setup = BridgedPeer::guest_setup(),
        peer = BridgedPeer::PEER_IP
    );
    let (tx, rx) = mpsc::channel::<&'static str>();
    let host = std::thread::spawn({
        let ctl = ctl.clone();
        move || {
            let mut replies = Vec::new();
            while let Ok(state) = rx.recv_timeout(Duration::from_secs(90)) {
                let r = control(&ctl, &format!(r#"{{"cmd":"link","state":"{state}"}}"#));
                replies.push((state, r));
                if state == "up" {
                    break;
                }
            }
            replies
        }
    });
    let tap_down = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let run = Outboard::new(&guest)
        .netns(net.vm.name())
        .net(&format!("socket={},mac={GUEST_MAC}", sock.display()))
        .run_with(&script, Duration::from_secs(90), |l| match l.trim_end() {
            "want-down" => {
                let _ = tx.send("down");
            }
            "want-up" => {
                tap_down.store(
                    wait_tap_carrier(&net, "0"),
                    std::sync::atomic::Ordering::Relaxed,
                );
                let _ = tx.send("up");
            }
            _ => {}
        });
    drop(tx);
    let replies = host.join().expect("host thread");
    let daemon_log = fs::read_to_string(&log).unwrap_or_default();
    run.assert_ok(&format!(
        "link down/up in the guest\nreplies: {replies:?}\n{daemon_log}"
    ));
    let out = &run.output;
    eprintln!("guest output:\n{out}\nctl replies: {replies:?}");
    assert!(out.contains("mtu=1400"), "the guest's MTU:\n{out}");
    assert_eq!(replies.len(), 2, "ctl link down and up: {replies:?}");
    for (state, r) in &replies {
        assert_eq!(r["ok"], true, "ctl link {state}: {r}");
        assert_eq!(r["notified"], true, "config change sent for {state}: {r}");
    }
    let lines: Vec<&str> = out.lines().collect();
    let carrier: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("carrier="))
        .collect();
    assert_eq!(
        carrier,
        ["1", "0", "1"],
        "eth0 carrier up, down, up:\n{out}"
    );
    let down = lines
        .iter()
        .find(|l| l.starts_with("down-link:"))
        .expect("down-link line");
    assert!(down.contains("NO-CARRIER"), "ip link while down: {down}");
    let up = lines
        .iter()
        .find(|l| l.starts_with("up-link:"))
        .expect("up-link line");
    assert!(!up.contains("NO-CARRIER"), "ip link after up: {up}");
    assert!(
        tap_down.load(std::sync::atomic::Ordering::Relaxed),
        "the tap kept its carrier while the link was down"
    );
    assert!(
        out.contains("3 packets received"),
        "ping after link up:\n{out}"
    );
    assert!(
        out.contains("1380 bytes from") && out.contains("2 packets received"),
        "a full-MTU ping without fragmentation:\n{out}"
    );
    net.assert_peer_learned(GUEST_MAC);
}
