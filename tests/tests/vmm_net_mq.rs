//! A multi-queue NIC in a real guest under the `outboard` VMM: 2 vCPUs, `vhost-user-net
//! --queue-pairs 2`, `--net socket=..,queues=2`. The VMM serves the control queue
//! (`vmm/src/pci/net_ctrl.rs`); the guest's virtio-net driver sets 2 pairs at probe
//! (MQ_VQ_PAIRS_SET) and its RX-mode / MAC commands when the link comes up.
//!
//! The guest pings the peer namespace from each vCPU (`taskset`): the driver picks the TX
//! queue of the sending CPU, so both TX queues carry frames (the daemon's per-queue
//! counters, and the guest's own `ethtool -S`). Then `ethtool -L eth0 combined 1`: the VMM
//! disables pair 1 on the backend (SET_VRING_ENABLE), the daemon detaches that tap queue
//! (`ip -d link`: numqueues 1), and a ping from vCPU 1 goes out through pair 0 (pair 1's TX
//! counter stays still). `ethtool -L eth0 combined 2` enables it again: its tap queue is
//! attached at its first kick and a ping from vCPU 1 goes through it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use outboard_tests::netd::NetDaemon;
use outboard_tests::vmm::{guest_or_skip, BridgedPeer, Outboard};

const GUEST_MAC: &str = "52:54:00:0b:00:09";
const TAP: &str = "obmqtap";

/// (phase marker, tap queues attached, pair 0 TX frames, pair 1 TX frames), sampled by
/// the host when the guest prints the marker.
type Sample = (String, String, u64, u64);

/// A guest `ethtool -S` counter, e.g. `tx_queue_1_packets`.
fn guest_stat(out: &str, marker: &str, key: &str) -> u64 {
    let section = out
        .split(marker)
        .nth(1)
        .unwrap_or_else(|| panic!("no {marker} in the guest output"));
    section
        .lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{key}:")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} after {marker}:\n{section}"))
}

#[test]
fn guest_uses_two_queue_pairs_and_ethtool_changes_them() {
    let guest = match guest_or_skip() {
        Ok(g) => g,
        Err(_) => return, // recorded as skipped (no /dev/kvm) by guest_or_skip
    };
    let net = BridgedPeer::new();
    let d = NetDaemon::spawn(
        &net.vm,
        &[
            "--tap",
            TAP,
            "--bridge",
            BridgedPeer::BRIDGE,
            "--mac",
            GUEST_MAC,
            "--queue-pairs",
            "2",
        ],
    );
    let peer = BridgedPeer::PEER_IP;
    // Each phase ends with a marker line; the host samples the daemon there while the
    // guest sleeps.
    let script = format!(
        "set -e\n{setup}\
         ethtool -l eth0 | sed -n '/Current/,$p'\n\
         ping -c 2 -W 5 {peer} >/dev/null\n\
         taskset -c 0 ping -c 20 -i 0.05 -W 5 {peer} >/dev/null\n\
         taskset -c 1 ping -c 20 -i 0.05 -W 5 {peer} >/dev/null\n\
         echo phase-two-pairs; sleep 2\n\
         echo stats-two; ethtool -S eth0\n\
         ethtool -L eth0 combined 1\n\
         ethtool -l eth0 | sed -n '/Current/,$p'\n\
         echo phase-one-pair; sleep 2\n\
         taskset -c 1 ping -c 20 -i 0.05 -W 5 {peer} >/dev/null\n\
         echo phase-one-pair-traffic; sleep 2\n\
         echo stats-one; ethtool -S eth0\n\
         ethtool -L eth0 combined 2\n\
         echo phase-two-again; sleep 2\n\
         taskset -c 1 ping -c 5 -i 0.05 -W 5 {peer} >/dev/null\n\
         echo phase-final; sleep 1\n\
         echo done\n",
        setup = BridgedPeer::guest_setup(),
    );
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let s2 = samples.clone();
    let ctl = d.control.clone();
    let sock = d.socket.clone();
    let vm_ns = net.vm.name().to_string();
    let run = Outboard::new(&guest)
        .cpus(2)
        .netns(net.vm.name())
        .net(&format!(
            "socket={},mac={GUEST_MAC},queues=2",
            sock.display()
        ))
        .run_with(&script, Duration::from_secs(120), move |l| {
            let l = l.trim_end();
            if l.starts_with("phase-") {
                let stats = outboard_tests::netd::control(&ctl, r#"{"cmd":"stats"}"#);
                let tx = |p: usize| {
                    stats["queues"]
                        .as_array()
                        .and_then(|qs| qs.iter().find(|q| q["queue"] == 2 * p + 1))
                        .and_then(|q| q["packets"].as_u64())
                        .unwrap_or(u64::MAX)
                };
                let link = std::process::Command::new("ip")
                    .args(["-n", &vm_ns, "-d", "link", "show", "dev", TAP])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
                    .unwrap_or_default();
                let nq = link
                    .split("numqueues ")
                    .nth(1)
                    .and_then(|s| s.split_whitespace().next())
                    .unwrap_or("?")
                    .to_string();
                s2.lock()
                    .expect("samples")
                    .push((l.to_string(), nq, tx(0), tx(1)));
            }
        });
    run.assert_ok(&format!("multi-queue guest\n{}", d.log_text()));
    let samples = samples.lock().expect("samples").clone();
    eprintln!("samples (phase, tap queues, pair 0 TX, pair 1 TX): {samples:?}");
    eprintln!("VMM log:\n{}", run.stderr);
    let at = |m: &str| {
        samples
            .iter()
            .find(|s| s.0 == m)
            .cloned()
            .unwrap_or_else(|| panic!("no sample at {m}: {samples:?}"))
    };
    let two = at("phase-two-pairs");
    let one = at("phase-one-pair");
    let one_traffic = at("phase-one-pair-traffic");
    let again = at("phase-two-again");
    let last = at("phase-final");

    // The guest runs 2 pairs from the start, each CPU sends on its own TX queue.
    assert!(
        run.output.contains("Combined:\t2"),
        "guest did not start with 2 pairs:\n{}",
        run.output
    );
    assert_eq!(two.1, "2", "both tap queues attached with 2 pairs");
    assert!(
        two.2 >= 20 && two.3 >= 20,
        "both TX queues carried the pings (pair 0: {}, pair 1: {})",
        two.2,
        two.3
    );
    let g0 = guest_stat(&run.output, "stats-two", "tx_queue_0_packets");
    let g1 = guest_stat(&run.output, "stats-two", "tx_queue_1_packets");
    assert!(g0 >= 20 && g1 >= 20, "guest's TX queues: {g0}, {g1}");

    // ethtool -L combined 1: pair 1 detached, its counter still, pair 0 carries CPU 1.
    assert_eq!(one.1, "1", "tap queue of the disabled pair still attached");
    assert_eq!(
        one_traffic.3, one.3,
        "pair 1 sent frames while disabled ({} -> {})",
        one.3, one_traffic.3
    );
    assert!(
        one_traffic.2 >= one.2 + 20,
        "pair 0 did not carry vCPU 1's pings ({} -> {})",
        one.2,
        one_traffic.2
    );
    let g0_after = guest_stat(&run.output, "stats-one", "tx_queue_0_packets");
    assert!(
        g0_after >= g0 + 20,
        "guest's queue 0 did not carry vCPU 1's pings ({g0} -> {g0_after})"
    );

    // And back to 2: pair 1 attaches its tap queue again at its first kick.
    assert!(run.output.contains("done"));
    assert!(
        last.3 >= again.3 + 5,
        "pair 1 unused after it was enabled again ({} -> {})",
        again.3,
        last.3
    );
    assert_eq!(last.1, "2", "tap queue not attached again");
    net.assert_peer_learned(GUEST_MAC);
}
