//! The `outboard` VMM with a virtio-pci NIC: `--net tap=T,bridge=BR,mac=M` starts our
//! `vhost-user-net` on a tap attached to a bridge; the guest pings a "host" that lives in
//! another network namespace, reached through a veth pair on that bridge. Everything runs
//! in namespaces this test creates and deletes. The host side checks its neighbour table
//! for the guest's MAC (evidence independent of the guest's own report).

use std::process::Command;
use std::time::Duration;

use outboard_tests::vmm::{guest_or_skip, vhost_user_net_binary, Outboard};

const GUEST_MAC: &str = "52:54:00:0b:00:01";

struct Netns(Vec<String>);

impl Drop for Netns {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn ip(args: &[&str]) {
    let o = Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (iproute2)");
    assert!(
        o.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn guest_pings_a_host_in_another_namespace_through_the_bridge() {
    let guest = match guest_or_skip() {
        Ok(g) => g,
        Err(why) => {
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
    let net_bin = match vhost_user_net_binary() {
        Ok(b) => b,
        Err(why) => {
            eprintln!("SKIPPED: no vhost-user-net daemon: {why}");
            return;
        }
    };
    let pid = std::process::id();
    let (vm_ns, peer_ns) = (format!("obvmm-vm-{pid}"), format!("obvmm-peer-{pid}"));
    ip(&["netns", "add", &vm_ns]);
    let _guard = Netns(vec![vm_ns.clone(), peer_ns.clone()]);
    ip(&["netns", "add", &peer_ns]);
    for ns in [&vm_ns, &peer_ns] {
        ip(&["-n", ns, "link", "set", "lo", "up"]);
    }
    ip(&["-n", &vm_ns, "link", "add", "obbr0", "type", "bridge"]);
    ip(&["-n", &vm_ns, "link", "set", "obbr0", "up"]);
    ip(&[
        "-n",
        &vm_ns,
        "link",
        "add",
        "vm-side",
        "type",
        "veth",
        "peer",
        "name",
        "peer-side",
    ]);
    ip(&["-n", &vm_ns, "link", "set", "peer-side", "netns", &peer_ns]);
    ip(&["-n", &vm_ns, "link", "set", "vm-side", "master", "obbr0"]);
    ip(&["-n", &vm_ns, "link", "set", "vm-side", "up"]);
    ip(&[
        "-n",
        &peer_ns,
        "addr",
        "add",
        "10.77.0.1/24",
        "dev",
        "peer-side",
    ]);
    ip(&["-n", &peer_ns, "link", "set", "peer-side", "up"]);

    let run = Outboard::new(&guest)
        .netns(&vm_ns)
        .net(&format!("tap=obtap0,bridge=obbr0,mac={GUEST_MAC}"))
        .run_with_env(
            "set -e; ip link set eth0 up; ip addr add 10.77.0.2/24 dev eth0; \
             cat /sys/class/net/eth0/address; ping -c 3 -W 5 10.77.0.1",
            Duration::from_secs(60),
            &[("OUTBOARD_VHOST_USER_NET", net_bin.as_os_str())],
        );
    run.assert_ok("ping through the bridge");
    assert!(run.output.contains(GUEST_MAC), "guest MAC:\n{}", run.output);
    assert!(
        run.output.contains("3 packets received"),
        "ping:\n{}",
        run.output
    );
    let o = Command::new("ip")
        .args(["-n", &peer_ns, "neigh", "show", "10.77.0.2"])
        .output()
        .expect("ip neigh");
    let neigh = String::from_utf8_lossy(&o.stdout);
    assert!(
        neigh.contains(GUEST_MAC),
        "the peer namespace never learned the guest's MAC: {neigh:?}"
    );
}
