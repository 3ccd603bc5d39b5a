//! The shipped systemd units (`vhost-user-blk/share/outboard-vhost-user-blk@.service`,
//! `vhost-user-net/share/outboard-vhost-user-net@.service`):
//!
//! - `systemd-analyze verify` accepts them with no warning (unknown keys, bad values, an
//!   `ExecStart` binary that does not exist: the binary path is pointed at this build);
//! - `systemd-analyze security --offline` finds the hardening the README promises
//!   (NoNewPrivileges, ProtectSystem=strict, PrivateTmp, a capability bounding set without
//!   CAP_SYS_ADMIN, ...) and an overall exposure of at most 4.5 ("OK"; `--threshold` counts
//!   tenths);
//! - the unit's own `ExecStart` command line, with its paths moved into a temporary
//!   directory, starts the daemon as root, which then runs as the unprivileged `--user`
//!   with its seccomp filter, and serves: a libblkio client writes and reads back bytes
//!   through the block unit's daemon; the net unit's daemon creates its tap on the bridge.
//!
//! (There is no systemd as PID 1 here, so the units are not started by systemd itself.)

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use outboard_tests::blkio_client::{BlkClient, ClientOptions};
use outboard_tests::netns::Netns;
use outboard_tests::KillOnDrop;

const BLK_UNIT: &str = include_str!("../../vhost-user-blk/share/outboard-vhost-user-blk@.service");
const NET_UNIT: &str = include_str!("../../vhost-user-net/share/outboard-vhost-user-net@.service");

/// Where the units expect the binaries.
const LIBEXEC: &str = "/usr/local/libexec/outboard/";

/// The directory of this build's binaries.
fn bin_dir() -> PathBuf {
    let bin = outboard_tests::workspace_binary("vhost-user-blk");
    bin.parent().expect("bin dir").to_path_buf()
}

/// Writes `unit` as `dir/NAME` with the binaries of this build.
fn install(unit: &str, dir: &Path, name: &str) -> PathBuf {
    let text = unit.replace(LIBEXEC, &format!("{}/", bin_dir().display()));
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write unit");
    path
}

fn systemd_analyze(args: &[&str], dir: &Path) -> std::process::Output {
    Command::new("systemd-analyze")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("systemd-analyze (package systemd; scripts/test.sh installs it)")
}

fn verify_and_score(unit: &str, name: &str, expect_caps: &[&str]) {
    let dir = tempfile::tempdir().expect("tempdir");
    install(unit, dir.path(), name);
    let local = format!("./{name}");
    let out = systemd_analyze(&["verify", "--man=no", &local], dir.path());
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.trim().is_empty(),
        "systemd-analyze verify {name}: {}\n{text}",
        out.status
    );

    let out = systemd_analyze(
        &["security", "--offline=true", "--json=short", &local],
        dir.path(),
    );
    assert!(out.status.success(), "systemd-analyze security {name}");
    let checks: Vec<serde_json::Value> =
        serde_json::from_slice(&out.stdout).expect("security JSON");
    let set = |field: &str| {
        checks
            .iter()
            .find(|c| c["json_field"] == field)
            .unwrap_or_else(|| panic!("{name}: systemd-analyze has no check {field}"))["set"]
            == true
    };
    for field in [
        "NoNewPrivileges",
        "ProtectSystem",
        "PrivateTmp",
        "ProtectHome",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectControlGroups",
        "RestrictSUIDSGID",
        "RestrictNamespaces_user",
        "MemoryDenyWriteExecute",
        "LockPersonality",
        "SystemCallArchitectures",
        "CapabilityBoundingSet_CAP_SYS_ADMIN",
        "CapabilityBoundingSet_CAP_SYS_PTRACE",
        "CapabilityBoundingSet_CAP_SYS_MODULE",
        "RestrictAddressFamilies_AF_PACKET",
    ] {
        assert!(set(field), "{name}: {field} is not hardened");
    }
    // What the daemon needs until it switches user is all that is left.
    for cap in expect_caps {
        assert!(!set(cap), "{name}: {cap} expected in the bounding set");
    }
    let out = systemd_analyze(
        &["security", "--offline=true", "--threshold=45", &local],
        dir.path(),
    );
    assert!(
        out.status.success(),
        "{name}: exposure above 4.5\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn units_pass_systemd_analyze_verify_and_security() {
    verify_and_score(
        BLK_UNIT,
        "outboard-vhost-user-blk@vm0.service",
        &["CapabilityBoundingSet_CAP_SET_UID_GID_PCAP"],
    );
    verify_and_score(
        NET_UNIT,
        "outboard-vhost-user-net@vm0.service",
        &[
            "CapabilityBoundingSet_CAP_SET_UID_GID_PCAP",
            "CapabilityBoundingSet_CAP_NET_ADMIN",
        ],
    );
}

/// The unit's `ExecStart` as arguments, with systemd's line continuations joined and
/// `subst` applied to each argument.
fn exec_start(unit: &str, subst: &[(&str, String)]) -> Vec<String> {
    let mut line = String::new();
    let mut inside = false;
    for l in unit.lines() {
        if let Some(rest) = l.strip_prefix("ExecStart=") {
            inside = true;
            line.push_str(rest);
        } else if inside {
            line.push(' ');
            line.push_str(l.trim());
        } else {
            continue;
        }
        if line.ends_with('\\') {
            line.pop();
        } else {
            break;
        }
    }
    assert!(!line.is_empty(), "no ExecStart");
    line.split_whitespace()
        .map(|a| {
            let mut a = a.to_string();
            for (from, to) in subst {
                a = a.replace(from, to);
            }
            a
        })
        .collect()
}

/// The real and effective uid of `pid`.
fn uids(pid: u32) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .expect("Uid line")
        .split_whitespace()
        .map(|u| u.parse().expect("uid"))
        .collect()
}

fn field(pid: u32, key: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn wait_for(path: &Path, child: &mut KillOnDrop, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("{what} exited before creating {}: {st}", path.display());
        }
        assert!(Instant::now() < deadline, "{what}: no {}", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs as the unit's user: `nobody` stands in for `outboard`.
fn nobody_uid() -> u32 {
    let out = Command::new("id")
        .args(["-u", "nobody"])
        .output()
        .expect("id");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("uid of nobody")
}

#[test]
fn blk_unit_command_line_serves_as_its_user() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = dir.path().join("run");
    std::fs::create_dir(&run).expect("run dir");
    let image = dir.path().join("vm0.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(16 << 20))
        .expect("image");
    let args = exec_start(
        BLK_UNIT,
        &[
            (LIBEXEC, format!("{}/", bin_dir().display())),
            ("/run/outboard", run.display().to_string()),
            ("%i", "vm0".into()),
            ("${IMAGE}", image.display().to_string()),
            ("${FORMAT}", "raw".into()),
            ("outboard", "nobody".into()),
        ],
    );
    let mut child = KillOnDrop::new(
        Command::new(&args[0])
            .args(&args[1..])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the unit's ExecStart"),
    );
    let sock = run.join("blk-vm0.sock");
    wait_for(&sock, &mut child, "vhost-user-blk");
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(10);
    while field(pid, "Seccomp:") != "2" {
        assert!(Instant::now() < deadline, "no seccomp filter installed");
        std::thread::sleep(Duration::from_millis(20));
    }
    let nobody = nobody_uid();
    assert!(
        uids(pid).iter().all(|&u| u == nobody),
        "runs as {:?}, not nobody ({nobody})",
        uids(pid)
    );
    assert_eq!(
        field(pid, "CapEff:"),
        "0000000000000000",
        "capabilities kept"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&sock)
        .expect("socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o660, "socket mode");

    let mut client =
        BlkClient::connect_vhost_user(&sock, &ClientOptions::queues(1)).expect("connect");
    let q = client.queue(0);
    let data = outboard_tests::pattern(7, 0, 64 << 10);
    q.write(1 << 20, &data).expect("write");
    q.flush().expect("flush");
    let back = q.read(1 << 20, data.len()).expect("read");
    outboard_tests::assert_bytes_eq(&data, &back, "through the unit's daemon");
    drop(client);
    let on_disk = std::fs::read(&image).expect("image");
    outboard_tests::assert_bytes_eq(
        &data,
        &on_disk[1 << 20..(1 << 20) + data.len()],
        "in the image file",
    );
}

#[test]
fn net_unit_command_line_sets_up_its_tap_then_runs_as_its_user() {
    let ns = Netns::new("unit");
    ns.ip(&["link", "add", "br0", "type", "bridge"]);
    ns.ip(&["link", "set", "br0", "up"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let run = dir.path().join("run");
    std::fs::create_dir(&run).expect("run dir");
    let args = exec_start(
        NET_UNIT,
        &[
            (LIBEXEC, format!("{}/", bin_dir().display())),
            ("/run/outboard", run.display().to_string()),
            ("%i", "vm0".into()),
            ("${BRIDGE}", "br0".into()),
            ("${MAC}", "52:54:00:12:34:56".into()),
            ("outboard", "nobody".into()),
        ],
    );
    let mut cmd = ns.command(&args[0]);
    cmd.args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let mut child = KillOnDrop::new(cmd.spawn().expect("spawn the unit's ExecStart"));
    let sock = run.join("net-vm0.sock");
    wait_for(&sock, &mut child, "vhost-user-net");
    let ctl = run.join("net-vm0.ctl");
    wait_for(&ctl, &mut child, "vhost-user-net");
    // `ip netns exec` execs the daemon: same process.
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(10);
    while field(pid, "Seccomp:") != "2" {
        assert!(Instant::now() < deadline, "no seccomp filter installed");
        std::thread::sleep(Duration::from_millis(20));
    }
    let nobody = nobody_uid();
    assert!(
        uids(pid).iter().all(|&u| u == nobody),
        "runs as {:?}, not nobody ({nobody})",
        uids(pid)
    );
    assert_eq!(
        field(pid, "CapEff:"),
        "0000000000000000",
        "capabilities kept"
    );
    let link = ns.exec(&["ip", "-d", "link", "show", "ob-vm0"]);
    assert!(link.contains("master br0"), "tap not on the bridge: {link}");
    assert!(link.contains("tun type tap"), "not a tap: {link}");
}
