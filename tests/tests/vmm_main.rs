//! The VMM's main test (issue #6), in one boot: `outboard` starts our `vhost-user-blk` on a
//! qcow2 image (`--disk path=`) and our `vhost-user-net` on a tap attached to a bridge
//! (`--net tap=,bridge=`), both as its children. In the guest: a pattern written to
//! `/dev/vda` and read back, an ext4 file system made, mounted and written, and a ping to a
//! host in another network namespace through the bridge. On the host, independently of the
//! VMM: the pattern and the file in the image (qemu-img, debugfs), `qemu-img check` clean,
//! and the guest's MAC in the peer's neighbour table. Prints the time to guest userspace.

use std::time::Duration;

use outboard_tests::vmm::{
    disk_check, guest_or_skip, vhost_user_net_binary, BridgedPeer, Outboard,
};

const GUEST_MAC: &str = "52:54:00:0b:00:01";

#[test]
fn qcow2_disk_and_bridged_nic_served_by_our_daemons() {
    let guest = match guest_or_skip() {
        Ok(g) => g,
        Err(_) => return, // recorded as skipped (no /dev/kvm) by guest_or_skip
    };
    let net_bin = vhost_user_net_binary().unwrap_or_else(|e| panic!("vhost-user-net: {e}"));
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.qcow2");
    outboard_tests::qemu_img([
        "create",
        "-q",
        "-f",
        "qcow2",
        image.to_str().expect("utf-8"),
        "64M",
    ]);
    let net = BridgedPeer::new();
    let script = format!(
        "set -e\n{}{}ping -c 3 -W 5 {}\n",
        disk_check::SCRIPT,
        BridgedPeer::guest_setup(),
        BridgedPeer::PEER_IP
    );
    let run = Outboard::new(&guest)
        .cpus(2)
        .netns(net.vm.name())
        .disk(&format!("path={},format=qcow2", image.display()))
        .net(&format!(
            "tap=obtap0,bridge={},mac={GUEST_MAC}",
            BridgedPeer::BRIDGE
        ))
        .run_with_env(
            &script,
            Duration::from_secs(120),
            &[("OUTBOARD_VHOST_USER_NET", net_bin.as_os_str())],
        );
    let what = "outboard + vhost-user-blk (qcow2) + vhost-user-net (bridged tap)";
    run.assert_ok(what);
    for want in ["readback-ok", "fs-ok", GUEST_MAC, "3 packets received"] {
        assert!(
            run.output.contains(want),
            "{what}: no {want:?} in\n{}",
            run.output
        );
    }
    net.assert_peer_learned(GUEST_MAC);
    // The VMM stopped its vhost-user-blk (SIGTERM: drain and flush) before it exited.
    disk_check::check_image(&image, what);
    eprintln!(
        "{what}: process start to guest userspace {:?}, to exit {:?}",
        run.to_userspace.expect("OB_START"),
        run.total
    );
}
