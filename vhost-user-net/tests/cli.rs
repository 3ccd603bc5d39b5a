//! The command line as QEMU and users meet it.

use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vhost-user-net"))
}

#[test]
fn print_capabilities_is_the_json_qemu_expects() {
    let out = bin().arg("--print-capabilities").output().expect("run");
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    assert_eq!(v["type"], "net");
    assert!(v["features"].is_array(), "{v}");
}

#[test]
fn help_shows_examples_and_every_switch() {
    let out = bin().arg("--help").output().expect("run");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for s in [
        "--socket-path",
        "--fd",
        "--tap",
        "--bridge",
        "--create-bridge",
        "--mac",
        "--mtu",
        "--queue-pairs",
        "--queue-size",
        "--csum",
        "--tso4",
        "--tso6",
        "--ufo",
        "--mrg-rxbuf",
        "--event-idx",
        "--ip",
        "--netmask",
        "--control-socket",
        "--seccomp",
        "--user",
        "--socket-mode",
        "Examples:",
    ] {
        assert!(help.contains(s), "--help lacks {s}:\n{help}");
    }
}

#[test]
fn bad_values_get_clear_errors_and_exit_nonzero() {
    let cases: &[(&[&str], &str)] = &[
        (&["--tap", "x"], "--socket-path"),
        (
            &["--socket-path", "s", "--queue-size", "100"],
            "power of two",
        ),
        (&["--socket-path", "s", "--queue-pairs", "0"], "queue-pairs"),
        (
            &["--socket-path", "s", "--mac", "01:00:5e:00:00:01"],
            "--mac",
        ),
        (&["--socket-path", "s", "--mac", "nonsense"], "--mac"),
        (
            &["--socket-path", "s", "--tap", "a-very-long-tap-name"],
            "--tap",
        ),
        (&["--socket-path", "s", "--csum", "maybe"], "csum"),
        (
            &[
                "--socket-path",
                "s",
                "--ip",
                "10.0.0.1",
                "--netmask",
                "255.0.255.0",
            ],
            "--netmask",
        ),
        (&["--socket-path", "s", "--create-bridge"], "--bridge"),
        (&["--socket-path", "s", "--mtu", "20"], "mtu"),
    ];
    for (args, needle) in cases {
        let out = bin().args(*args).output().expect("run");
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}
