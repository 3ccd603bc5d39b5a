//! The block conformance suite of `outboard_tests::blkio_client`, driven by
//! libblkio (`virtio-blk-vhost-user`), against qemu-storage-daemon serving a
//! raw file and a qcow2 image. This validates the client and the suite
//! themselves; the same case functions are pointed at our `vhost-user-blk`
//! daemon by swapping the daemon started in `run_case`.
//!
//! Every test starts its own qemu-storage-daemon on a fresh 64 MiB image.
//! When qemu-storage-daemon is not installed the tests are recorded as skipped
//! with the reason (`outboard_tests::skip`); under CI=true that fails instead
//! (Debian 12: `qemu-system-common`, pulled in by `qemu-system-x86`).

use std::path::Path;

use outboard_tests::blkio_client::{
    self as bc, create_image, qsd_available, Case, Daemon, DaemonConfig, Expect, Format,
};

const SIZE: u64 = 64 << 20;
const QUEUES: usize = 2;

fn run_case(format: Format, case: Case) {
    if let Err(why) = qsd_available() {
        outboard_tests::skip::skip(
            outboard_tests::skip::Missing::Installed,
            &format!("qemu-storage-daemon is not available: {why}"),
        );
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir for the image and the socket");
    let image = dir.path().join(format!("disk.{format}"));
    create_image(&image, format, SIZE);
    let cfg = DaemonConfig {
        image: image.clone(),
        format,
        socket: dir.path().join("vhost.sock"),
        num_queues: QUEUES,
        direct: false,
    };
    let mut daemon = Daemon::qsd(&cfg).unwrap_or_else(|e| panic!("{e}"));
    let expect = Expect {
        capacity: SIZE,
        num_queues: QUEUES,
        image: Some((image, format)),
    };
    case(daemon.socket(), &expect);
    assert!(
        daemon.is_running(),
        "qemu-storage-daemon died during the case:\n{}",
        daemon.log_text()
    );
    daemon.stop();
    if format == Format::Qcow2 {
        check_qcow2(&cfg.image);
    }
}

/// The image qemu-storage-daemon wrote is consistent (checked with the
/// workspace's qcow2 library, so that no qemu-img is needed).
fn check_qcow2(image: &Path) {
    let img = outboard_tests::open_ro(image);
    let report = img
        .check(None)
        .unwrap_or_else(|e| panic!("check {}: {e}", image.display()));
    assert!(
        report.corruptions == 0 && report.check_errors == 0 && report.leaks == 0,
        "qcow2 image written by qemu-storage-daemon is corrupt: {report:?}"
    );
}

macro_rules! qsd_cases {
    ($($name:ident),* $(,)?) => {
        mod raw {
            $(
                #[test]
                fn $name() {
                    super::run_case(super::Format::Raw, super::bc::$name);
                }
            )*
        }
        mod qcow2 {
            $(
                #[test]
                fn $name() {
                    super::run_case(super::Format::Qcow2, super::bc::$name);
                }
            )*
        }
    };
}

qsd_cases!(
    case_capacity,
    case_write_read_patterns,
    case_flush,
    case_discard,
    case_write_zeroes,
    case_deep_queue,
    case_parallel_queues,
    case_out_of_range,
);

/// The whole suite in one go on one image and one daemon, as it will be run
/// against another backend.
#[test]
fn whole_suite_raw() {
    if let Err(why) = qsd_available() {
        outboard_tests::skip::skip(
            outboard_tests::skip::Missing::Installed,
            &format!("qemu-storage-daemon is not available: {why}"),
        );
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.raw");
    create_image(&image, Format::Raw, SIZE);
    let cfg = DaemonConfig {
        image: image.clone(),
        format: Format::Raw,
        socket: dir.path().join("vhost.sock"),
        num_queues: QUEUES,
        direct: false,
    };
    let daemon = Daemon::qsd(&cfg).unwrap_or_else(|e| panic!("{e}"));
    let expect = Expect {
        capacity: SIZE,
        num_queues: QUEUES,
        image: Some((image, Format::Raw)),
    };
    bc::conformance_suite(daemon.socket(), &expect);
}

/// A read-only export (`writable=off`): see `case_read_only`.
fn run_read_only(format: Format) {
    if let Err(why) = qsd_available() {
        outboard_tests::skip::skip(
            outboard_tests::skip::Missing::Installed,
            &format!("qemu-storage-daemon is not available: {why}"),
        );
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join(format!("ro.{format}"));
    bc::read_only_image(&image, format, SIZE);
    let cfg = DaemonConfig {
        image: image.clone(),
        format,
        socket: dir.path().join("ro.sock"),
        num_queues: 1,
        direct: false,
    };
    let daemon = Daemon::qsd_read_only(&cfg).unwrap_or_else(|e| panic!("{e}"));
    let expect = Expect {
        capacity: SIZE,
        num_queues: 1,
        image: Some((image, format)),
    };
    bc::case_read_only(daemon.socket(), &expect);
}

#[test]
fn read_only_raw() {
    run_read_only(Format::Raw);
}

#[test]
fn read_only_qcow2() {
    run_read_only(Format::Qcow2);
}

/// Every case in `CASES` has a test above (a new case must be added to the
/// macro invocation too).
#[test]
fn every_case_is_listed() {
    let listed = [
        "capacity",
        "write_read_patterns",
        "flush",
        "discard",
        "write_zeroes",
        "deep_queue",
        "parallel_queues",
        "out_of_range",
    ];
    let names: Vec<&str> = bc::CASES.iter().map(|(n, _)| *n).collect();
    assert_eq!(names, listed, "CASES and the qsd_cases! list differ");
}
