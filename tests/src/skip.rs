//! Skips that can't hide.
//!
//! A test that cannot run here calls [`skip`] with what is missing and why, then returns.
//! The skip is appended to the file named by `OUTBOARD_SKIP_LOG` (scripts/test.sh sets it
//! and prints the list in its summary), and printed on stderr.
//!
//! Under `CI=true` only a missing `/dev/kvm` may skip a test: everything else a test needs
//! (QEMU, qemu-storage-daemon, DPDK, ...) is installed by scripts/test.sh, so its absence
//! there is a failure, not a skip, and [`skip`] panics.

use std::fs::OpenOptions;
use std::io::Write;

/// What a skipped test lacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    /// `/dev/kvm` (the only reason that may skip a test in CI).
    Kvm,
    /// A program or service that scripts/test.sh installs.
    Installed,
}

/// The running test as `BINARY::NAME`: libtest names the test's thread after the test;
/// when it runs on the main thread instead, the name is the argument after `--exact`.
pub fn current_test_name() -> String {
    let args: Vec<String> = std::env::args().collect();
    let exe = args
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Test binaries are named NAME-HASH.
    let bin = exe.rsplit_once('-').map_or(exe.as_str(), |(b, _)| b);
    let name = match std::thread::current().name() {
        Some(n) if n != "main" => n.to_string(),
        _ => args
            .iter()
            .position(|a| a == "--exact")
            .and_then(|i| args.get(i + 1))
            .cloned()
            .unwrap_or_else(|| "?".into()),
    };
    format!("{bin}::{name}")
}

/// Records that the current test is skipped because `missing` is absent (`why` says what
/// and how to get it). Panics instead under `CI=true`, unless `missing` is [`Missing::Kvm`].
pub fn skip(missing: Missing, why: &str) {
    let test = current_test_name();
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    if ci && missing != Missing::Kvm {
        panic!(
            "{test}: a prerequisite that scripts/test.sh installs is missing under CI=true \
             (not a reason to skip): {why}"
        );
    }
    eprintln!("SKIPPED: {test}: {why}");
    if let Some(path) = std::env::var_os("OUTBOARD_SKIP_LOG") {
        let line = format!("{test}\t{why}\n");
        // One write of one line with O_APPEND: concurrent tests don't interleave.
        let r = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = r {
            panic!(
                "cannot record the skip in {}: {e}",
                std::path::Path::new(&path).display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Each test runs in its own process under nextest; under `cargo test` they share one,
    // so this test only sets CI (it never unsets it) and runs in a thread of its own.
    #[test]
    fn installed_prerequisite_is_not_a_reason_to_skip_in_ci() {
        std::env::set_var("CI", "true");
        std::env::remove_var("OUTBOARD_SKIP_LOG");
        let r = std::thread::Builder::new()
            .name("skip-under-ci".into())
            .spawn(|| skip(Missing::Installed, "qemu-storage-daemon missing"))
            .expect("spawn")
            .join();
        let msg = r.expect_err("skip must panic under CI=true");
        let msg = msg.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(msg.contains("::skip-under-ci"), "names the test: {msg}");
        assert!(msg.contains("qemu-storage-daemon missing"), "{msg}");
        // A missing /dev/kvm is still a skip, recorded in the log.
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("skips");
        std::env::set_var("OUTBOARD_SKIP_LOG", &log);
        std::thread::Builder::new()
            .name("kvm-skip".into())
            .spawn(|| skip(Missing::Kvm, "no /dev/kvm"))
            .expect("spawn")
            .join()
            .expect("a KVM skip does not panic");
        std::env::remove_var("OUTBOARD_SKIP_LOG");
        let text = std::fs::read_to_string(&log).expect("skip log");
        assert!(
            text.ends_with("::kvm-skip\tno /dev/kvm\n") && text.lines().count() == 1,
            "{text:?}"
        );
    }
}
