//! The `outboard` VMM boots the guest kernel to userspace on every vCPU, runs a script and
//! ends with the guest's power-off (exit 0); a reset ends it with status 3.

use std::time::Duration;

use outboard_tests::vmm::{guest_or_skip, Outboard};

#[test]
fn boots_to_userspace_on_all_vcpus_and_powers_off() {
    let guest = match guest_or_skip() {
        Ok(g) => g,
        Err(_) => return, // recorded as skipped (no /dev/kvm) by guest_or_skip
    };
    // The guest computes a value the host checks: proof that userspace ran.
    let run = Outboard::new(&guest).cpus(2).run(
        "echo sum=$((12345 + 54321)); echo cpus=$(grep -c ^processor /proc/cpuinfo); \
         echo online=$(cat /sys/devices/system/cpu/online)",
        Duration::from_secs(60),
    );
    run.assert_ok("boot");
    assert!(run.output.contains("sum=66666"), "output:\n{}", run.output);
    assert!(
        run.output.contains("cpus=2"),
        "both vCPUs visible:\n{}",
        run.output
    );
    assert!(
        run.output.contains("online=0-1"),
        "both vCPUs online:\n{}",
        run.output
    );
    eprintln!(
        "outboard: process start to guest userspace {:?}, to exit {:?}",
        run.to_userspace.expect("OB_START seen"),
        run.total
    );
}

#[test]
fn guest_reboot_ends_with_status_3() {
    let guest = match guest_or_skip() {
        Ok(g) => g,
        Err(_) => return, // recorded as skipped (no /dev/kvm) by guest_or_skip
    };
    // `reboot -f` goes through the ACPI reset register.
    let run = Outboard::new(&guest).run("sync; reboot -f; sleep 10", Duration::from_secs(60));
    assert_eq!(
        run.vmm_status,
        Some(3),
        "serial:\n{}\nstderr:\n{}",
        run.serial,
        run.stderr
    );
}

/// The VMM's error messages. Runs everywhere: without `/dev/kvm` the error that names
/// it is checked instead of the ones KVM must be opened for.
#[test]
fn clear_errors() {
    let bin = outboard_tests::workspace_binary("outboard");
    let run = |args: &[&str]| {
        let o = std::process::Command::new(&bin)
            .args(args)
            .output()
            .expect("run outboard");
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    // Argument errors come before KVM is opened.
    let (code, err) = run(&["--kernel", "/k", "--serial", "bogus"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("--serial bogus: expected stdio, file=PATH or off"),
        "{err}"
    );
    let (code, err) = run(&["--kernel", "/k", "--disk", "nonsense=1"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("nonsense"), "{err}");

    // A file that is not a kernel, for the checks that come after opening KVM.
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = dir.path().join("not-a-kernel");
    std::fs::write(&fake, b"not a kernel").expect("write");
    let fake = fake.to_str().expect("utf-8 path");
    if !std::path::Path::new("/dev/kvm").exists() {
        let (code, err) = run(&["--kernel", fake, "--serial", "off"]);
        assert_eq!(code, Some(1), "{err}");
        assert!(err.contains("/dev/kvm"), "names /dev/kvm: {err}");
        outboard_tests::skip::skip(
            outboard_tests::skip::Missing::Kvm,
            "/dev/kvm is absent: only the argument errors and the KVM error were checked",
        );
        return;
    }
    let (code, err) = run(&["--kernel", "/nonexistent/vmlinux", "--serial", "off"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("cannot open kernel /nonexistent/vmlinux"),
        "{err}"
    );
    let (code, err) = run(&["--kernel", fake, "--memory", "1M", "--serial", "off"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("guest memory size 1 MiB is invalid"), "{err}");
    let (code, err) = run(&["--kernel", fake, "--cpus", "0", "--serial", "off"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("--cpus 0 is out of range"), "{err}");
    let (code, err) = run(&["--kernel", fake, "--serial", "off"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("not-a-kernel"), "names the bad kernel: {err}");
}
