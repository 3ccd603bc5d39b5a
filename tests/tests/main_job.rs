//! The main job (issue 14): `scripts/main.sh` without a terminal, as CI and a new user run it.
//!
//! It boots the real Debian 12 base image (built by `scripts/guest/build-debian.sh` on the
//! first run and cached in `target/debian/`: a fresh CI machine builds it here) through a
//! fresh qcow2 overlay served by `vhost-user-blk`, under `outboard` with the PVM guest kernel.
//! The demo must show, from the guest: `/etc/debian_version` 12.x, `outboard-init` as PID 1,
//! dpkg and apt, the NIC pinging the bridge, fio's crc32c-verified writes; from the host: a
//! live internal snapshot taken through the control socket while the guest writes (the
//! daemon's write counter grows after it), the guest's file read back out of the overlay,
//! and clean checks. The test then checks the overlay itself, with qemu-img as the
//! independent oracle (snapshot listed, `qemu-img check` clean, a backing chain to the
//! base). A COMMAND's exit status comes back (`exit 7` -> 7, `false` -> 1), and the clear
//! error messages of item 4 are provoked for real: not root, no /dev/kvm, a kernel that is
//! not the PVM one, no network to the package registry.
//!
//! main.sh uses the binaries this test run built (`OUTBOARD_BIN_DIR`, the `ci` profile)
//! instead of building release binaries, and a temporary output directory
//! (`OUTBOARD_OUT_DIR`). Its network namespace `outboard-main` is fixed, so everything runs
//! in this one test, one main.sh at a time.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use outboard_tests::guest::workspace_root;
use outboard_tests::netns::Netns;
use outboard_tests::skip::{skip, Missing};
use outboard_tests::workspace_binary;

struct Run {
    status: Option<i32>,
    output: String,
}

/// Runs `scripts/main.sh ARGS` with stdin not a terminal; stdout and stderr merged.
fn main_sh(bin_dir: &Path, out_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Run {
    let root = workspace_root();
    let mut cmd = Command::new("bash");
    cmd.arg(root.join("scripts/main.sh"))
        .args(args)
        .current_dir(&root)
        .env("OUTBOARD_BIN_DIR", bin_dir)
        .env("OUTBOARD_OUT_DIR", out_dir)
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    sh_output(cmd)
}

fn sh_output(mut cmd: Command) -> Run {
    // One pipe for both streams keeps the order of the host's and the guest's lines.
    let (reader, writer) = std::io::pipe().expect("pipe");
    cmd.stdout(writer.try_clone().expect("dup")).stderr(writer);
    let mut child = cmd.spawn().expect("spawn main.sh");
    drop(cmd);
    let mut output = String::new();
    let mut reader = reader;
    std::io::Read::read_to_string(&mut reader, &mut output).expect("read main.sh output");
    let status = child.wait().expect("wait main.sh").code();
    Run { status, output }
}

fn expect(run: &Run, what: &str, want: &str) {
    assert!(
        run.output.contains(want),
        "{what}: no {want:?} in the output of main.sh:\n{}",
        run.output
    );
}

/// The line of `text` that starts with `prefix`, without it.
fn line_after<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.trim_end_matches('\r').strip_prefix(prefix))
}

fn mib(s: &str) -> f64 {
    s.trim()
        .trim_end_matches("MiB")
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("not a MiB figure: {s:?}: {e}"))
}

fn tool(prog: &str, args: &[&str]) -> String {
    let o = Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "{prog} {args:?} failed: {text}");
    text
}

#[test]
fn main_job_boots_debian_snapshots_live_and_propagates_status() {
    if !Path::new("/dev/kvm").exists() {
        skip(
            Missing::Kvm,
            "/dev/kvm is absent: scripts/main.sh boots a VM",
        );
        return;
    }
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "scripts/main.sh needs root (netns, tap, debootstrap); scripts/test.sh runs as root"
    );
    let bin_dir: PathBuf = workspace_binary("outboard")
        .parent()
        .expect("target/<profile>")
        .to_path_buf();
    for b in ["outboard-img", "vhost-user-blk", "vhost-user-net"] {
        workspace_binary(b);
    }
    let out = tempfile::tempdir().expect("tempdir");
    let out_dir = out.path();

    // 1. The demo. The first run on a machine builds the base image (debootstrap).
    let t = Instant::now();
    let demo = main_sh(&bin_dir, out_dir, &[], &[]);
    let demo_secs = t.elapsed().as_secs_f64();
    assert_eq!(demo.status, Some(0), "demo failed:\n{}", demo.output);
    let what = "demo";
    let version = line_after(
        &demo.output,
        "guest: Debian GNU/Linux 12 (bookworm), /etc/debian_version ",
    )
    .unwrap_or_else(|| panic!("{what}: no Debian version line:\n{}", demo.output));
    let version = version.split(",").next().unwrap_or_default();
    assert!(
        version.starts_with("12."),
        "{what}: /etc/debian_version {version}"
    );
    expect(&demo, what, "PID 1 outboard-init");
    expect(&demo, what, "guest: root /dev/vda ext4");
    expect(&demo, what, "packages installed; apt 2.");
    expect(&demo, what, "10.0.77.2/24");
    expect(
        &demo,
        what,
        "2 packets transmitted, 2 received, 0% packet loss",
    );
    expect(
        &demo,
        what,
        "blocks written read back, crc32c verified, 0 errors",
    );
    // The live snapshot, taken while fio wrote: accepted, and writes went on after it.
    let snap = line_after(&demo.output, "==> host: vhost-user-blk ctl ")
        .unwrap_or_else(|| panic!("{what}: no snapshot-create line:\n{}", demo.output));
    assert!(snap.ends_with("snapshot-create live-demo -> {"), "{snap}");
    expect(&demo, what, "\"name\": \"live-demo\",\n  \"ok\": true");
    let served = line_after(&demo.output, "==> host: guest writes served: ")
        .unwrap_or_else(|| panic!("{what}: no write counters:\n{}", demo.output));
    let (before, after) = served
        .split_once(" before the snapshot, ")
        .unwrap_or_else(|| panic!("{served}"));
    let (before, after) = (mib(before), mib(after.trim_end_matches(" after it")));
    assert!(
        after > before,
        "{what}: the snapshot was not taken while the guest wrote: {served}\n{}",
        demo.output
    );
    // main.sh's own checks and the host's read-back of the guest's file.
    expect(&demo, what, "==> outboard-img snapshot -l");
    assert_eq!(
        demo.output
            .matches("No errors were found on the image.")
            .count(),
        2,
        "{what}: outboard-img check and qemu-img check must both be clean:\n{}",
        demo.output
    );
    let written = line_after(&demo.output, "guest: wrote /root/outboard-demo.txt: ")
        .unwrap_or_else(|| panic!("{what}: no demo file line:\n{}", demo.output));
    assert!(
        written.starts_with("outboard demo, guest boot "),
        "{written}"
    );
    expect(&demo, what, &format!("(convert + debugfs): {written}"));
    expect(&demo, what, "guest command exited with status 0");

    // The overlay, checked here independently of main.sh: a backing chain to the base, the
    // live snapshot in it, clean by qemu-img.
    let overlay = out_dir.join("overlay.qcow2");
    let overlay = overlay.to_str().expect("utf-8");
    let info = tool("qemu-img", &["info", "-U", overlay]);
    assert!(
        info.contains("backing file: ") && info.contains("debian-base.qcow2"),
        "overlay has no backing file: {info}"
    );
    let snaps = tool("qemu-img", &["snapshot", "-U", "-l", overlay]);
    assert!(snaps.contains("live-demo"), "qemu-img snapshot -l: {snaps}");
    let ours = tool(
        &bin_dir.join("outboard-img").to_string_lossy(),
        &["snapshot", "-l", overlay],
    );
    assert!(
        ours.contains("live-demo"),
        "outboard-img snapshot -l: {ours}"
    );
    let check = tool("qemu-img", &["check", overlay]);
    assert!(check.contains("No errors were found"), "{check}");

    // 2. A COMMAND's status comes back.
    let t = Instant::now();
    let seven = main_sh(&bin_dir, out_dir, &["cat /etc/debian_version; exit 7"], &[]);
    let command_secs = t.elapsed().as_secs_f64();
    assert_eq!(seven.status, Some(7), "`exit 7`:\n{}", seven.output);
    expect(&seven, "exit 7", "guest command exited with status 7");
    expect(&seven, "exit 7", &format!("\n{version}"));
    let f = main_sh(&bin_dir, out_dir, &["false"], &[]);
    assert_eq!(f.status, Some(1), "`false`:\n{}", f.output);
    expect(&f, "false", "guest command exited with status 1");

    // 3. Clear errors (item 4), each provoked for real.
    clear_errors(&bin_dir, out_dir);
    eprintln!(
        "main job: demo {demo_secs:.1} s (with building the base image when target/debian/ had none), \
         a command {command_secs:.1} s; writes {before} -> {after} MiB around the live snapshot"
    );
}

fn clear_errors(bin_dir: &Path, out_dir: &Path) {
    let root = workspace_root();
    // Not root: a copy of the scripts nobody can read, run as nobody.
    let copy = tempfile::tempdir().expect("tempdir");
    let scripts = copy.path().join("scripts");
    std::fs::create_dir_all(&scripts).expect("mkdir");
    for f in ["main.sh", "lib.sh"] {
        std::fs::copy(root.join("scripts").join(f), scripts.join(f)).expect("copy");
    }
    tool("chmod", &["-R", "a+rX", &copy.path().to_string_lossy()]);
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "bash"])
        .arg(scripts.join("main.sh"))
        .current_dir("/")
        .stdin(Stdio::null());
    let r = sh_output(cmd);
    assert_eq!(r.status, Some(1), "not root:\n{}", r.output);
    expect(&r, "not root", "error: scripts/main.sh must run as root");

    // No /dev/kvm: an empty /dev in a private mount namespace.
    let mut cmd = Command::new("unshare");
    cmd.args(["-m", "--propagation", "private", "sh", "-c"])
        .arg("mount -t tmpfs none /dev && exec bash scripts/main.sh")
        .current_dir(&root)
        .stdin(Stdio::null());
    let r = sh_output(cmd);
    assert_eq!(r.status, Some(1), "no /dev/kvm:\n{}", r.output);
    expect(&r, "no /dev/kvm", "error: /dev/kvm is missing");

    // A kernel that is not the PVM guest kernel, on a PVM host.
    if Path::new("/sys/module/kvm_pvm").exists() {
        let r = main_sh(
            bin_dir,
            out_dir,
            &["true"],
            &[("OUTBOARD_KERNEL", "/bin/true")],
        );
        assert_eq!(r.status, Some(1), "non-PVM kernel:\n{}", r.output);
        expect(&r, "non-PVM kernel", "/bin/true is not the PVM guest");
    }

    // No network to the package registry: the base image built in an empty namespace.
    let ns = Netns::new("mainjob");
    let base = tempfile::tempdir().expect("tempdir");
    let mut cmd = ns.command("bash");
    cmd.arg(root.join("scripts/guest/build-debian.sh"))
        .args(["--rebuild", "--img"])
        .arg(bin_dir.join("outboard-img"))
        .arg(base.path())
        .stdin(Stdio::null());
    let r = sh_output(cmd);
    assert_eq!(r.status, Some(1), "no network:\n{}", r.output);
    expect(&r, "no network", "could not be reached");
    expect(
        &r,
        "no network",
        "error: build-debian: the package registry ",
    );
}
