//! The command line as QEMU and users meet it.

use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vhost-user-blk"))
}

#[test]
fn print_capabilities_is_the_json_qemu_expects() {
    let out = bin().arg("--print-capabilities").output().expect("run");
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    assert_eq!(v["type"], "block");
    let features: Vec<&str> = v["features"]
        .as_array()
        .expect("features array")
        .iter()
        .filter_map(|f| f.as_str())
        .collect();
    assert!(
        features.contains(&"read-only") && features.contains(&"blk-file"),
        "{v}"
    );
}

#[test]
fn bad_values_get_clear_errors_and_exit_nonzero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("s");
    let img = dir.path().join("img");
    std::fs::write(&img, vec![0u8; 4096]).expect("image");
    let cases: &[(&[&str], &str)] = &[
        (&["--blk-file", "x"], "--socket-path"),
        (&["--socket-path", "s"], "--blk-file"),
        (
            &[
                "--socket-path",
                "s",
                "--blk-file",
                "x",
                "--queue-size",
                "100",
            ],
            "power of two",
        ),
        (
            &["--socket-path", "s", "--blk-file", "x", "--num-queues", "0"],
            "num-queues",
        ),
        (
            &[
                "--socket-path",
                "s",
                "--blk-file",
                "x",
                "--serial",
                "123456789012345678901",
            ],
            "20",
        ),
        (
            &["--socket-path", "s", "--blk-file", "x", "--format", "vmdk"],
            "vmdk",
        ),
        (
            &["--socket-path", "s", "--blk-file", "/nonexistent/img"],
            "/nonexistent/img",
        ),
    ];
    for (args, needle) in cases {
        let out = bin()
            .current_dir(dir.path())
            .args(*args)
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(
            err.contains(needle),
            "{args:?}: error should mention {needle:?}: {err}"
        );
    }
    // qcow2 requested on a raw file: the library says what is wrong.
    let out = bin()
        .args(["--socket-path"])
        .arg(&sock)
        .arg("--blk-file")
        .arg(&img)
        .args(["--format", "qcow2"])
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("not a qcow2 image"),
        "{err}"
    );
}

#[test]
fn refuses_a_socket_path_another_backend_listens_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("busy.sock");
    let _l = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
    let img = dir.path().join("img");
    std::fs::write(&img, vec![0u8; 4096]).expect("image");
    let out = bin()
        .arg("--socket-path")
        .arg(&sock)
        .arg("--blk-file")
        .arg(&img)
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("another backend is listening"),
        "{err}"
    );
    assert!(
        sock.exists(),
        "the other backend's socket must not be unlinked"
    );
}
