//! The `outboard` VMM boots the guest kernel to userspace on every vCPU, runs a script and
//! ends with the guest's power-off (exit 0); a reset ends it with status 3.

use std::time::Duration;

use outboard_tests::vmm::{guest_or_skip, Outboard};

#[test]
fn boots_to_userspace_on_all_vcpus_and_powers_off() {
    let guest = match guest_or_skip() {
        Ok(g) => g,
        Err(why) => {
            eprintln!("SKIPPED: {why}");
            return;
        }
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
        Err(why) => {
            eprintln!("SKIPPED: {why}");
            return;
        }
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

#[test]
fn clear_errors() {
    let guest = match guest_or_skip() {
        Ok(g) => g,
        Err(why) => {
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
    let bin = outboard_tests::workspace_binary("outboard");
    let o = std::process::Command::new(&bin)
        .args(["--kernel", "/nonexistent/vmlinux", "--serial", "off"])
        .output()
        .expect("run outboard");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err.contains("cannot open kernel /nonexistent/vmlinux"),
        "{err}"
    );

    let o = std::process::Command::new(&bin)
        .arg("--kernel")
        .arg(&guest.kernel)
        .args(["--memory", "1M", "--serial", "off"])
        .output()
        .expect("run outboard");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("guest memory size 1 MiB is invalid"), "{err}");

    let o = std::process::Command::new(&bin)
        .arg("--kernel")
        .arg(&guest.kernel)
        .args(["--cpus", "0", "--serial", "off"])
        .output()
        .expect("run outboard");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--cpus 0 is out of range"), "{err}");
}
