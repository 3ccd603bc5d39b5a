//! The seccomp filter the daemons install, applied in a child process (this
//! test binary re-executed): `/proc/self/status` shows the filter, allowed
//! calls work, a forbidden one (`socket`, `mkdirat`) fails with EPERM in
//! `errno` mode, kills the process with SIGSYS in `kill` mode and goes
//! through in `log` mode.

use std::os::unix::process::ExitStatusExt;
use std::process::Command;

use outboard_common::sandbox::{self, SeccompMode};

const CHILD_ENV: &str = "OUTBOARD_SANDBOX_CHILD";

/// Runs in the child: prints `seccomp=N socket=RESULT` and exits 0.
#[test]
fn sandbox_child() {
    let Ok(mode) = std::env::var(CHILD_ENV) else {
        return;
    };
    let mode: SeccompMode = mode.parse().expect("mode");
    sandbox::apply(mode, &[]).expect("apply");
    let seccomp = sandbox::current_seccomp_mode().expect("Seccomp line");
    // SAFETY: plain system calls; the fd, if any, is closed right away.
    let (sock, errno) = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        if fd >= 0 {
            libc::close(fd);
        }
        (fd, errno)
    };
    // Allowed calls keep working.
    let pid = std::process::id();
    assert!(pid > 0);
    println!("seccomp={seccomp} socket={} errno={errno}", sock >= 0);
}

fn run_child(mode: &str) -> std::process::Output {
    Command::new(std::env::current_exe().expect("exe"))
        .args([
            "--exact",
            "sandbox_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, mode)
        .output()
        .expect("run child")
}

#[test]
fn errno_mode_refuses_a_forbidden_syscall_with_eperm() {
    let out = run_child("errno");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&format!("seccomp=2 socket=false errno={}", libc::EPERM)),
        "{text}"
    );
}

#[test]
fn kill_mode_kills_on_a_forbidden_syscall() {
    let out = run_child("kill");
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGSYS),
        "{:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn log_mode_allows_and_off_installs_nothing() {
    let out = run_child("log");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("seccomp=2 socket=true"), "{text}");
    let out = run_child("off");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("seccomp=0 socket=true"), "{text}");
}
