//! A guest that breaks its ring, against the running block daemon: the test
//! is the vhost-user frontend (raw messages, guest memory in a file it maps
//! itself) of a `vhost-user-blk` with one queue and a control socket.
//!
//! After a good write, the driver publishes an available index far past
//! the ring and kicks again and again: each pass is counted in the queue's
//! `ring_errors`, the log explains it (rate-limited: a few lines, not one
//! per kick) and the daemon stays up. The driver then repairs the index and
//! kicks: the queue serves again (before, the error ended the queue's
//! thread until the frontend reconnected). A read past the end of the disk
//! is counted as `err_malformed` and logged with its reason.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use outboard_tests::blkio_client::{create_image, ours_command, Daemon, DaemonConfig, Format};
use outboard_tests::raw_frontend::{connect, kick, GuestMem, NEXT, WRITE};

const MEM_SIZE: usize = 1 << 20;
const QSIZE: u16 = 16;
const HDR: u64 = 0x1_0000;
const DATA: u64 = 0x2_0000;
const STATUS: u64 = 0x3_0000;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const DISK: u64 = 1 << 20;

/// Request `n` on queue 0: header, one data descriptor, status; head `3n`.
fn request(mem: &GuestMem, n: u16, ty: u32, sector: u64, len: u32) -> u16 {
    let head = 3 * n;
    let hdr = HDR + 16 * u64::from(n);
    let mut h = Vec::new();
    h.extend_from_slice(&ty.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&sector.to_le_bytes());
    mem.write(hdr, &h);
    mem.write(STATUS + u64::from(n), &[0xff]);
    let data_flags = if ty == T_IN { WRITE } else { 0 };
    mem.desc(0, head, hdr, 16, NEXT, head + 1);
    mem.desc(
        0,
        head + 1,
        DATA + 0x1000 * u64::from(n),
        len,
        data_flags | NEXT,
        head + 2,
    );
    mem.desc(0, head + 2, STATUS + u64::from(n), 1, WRITE, 0);
    head
}

/// The status byte of request `n`.
fn status(mem: &GuestMem, n: u16) -> u8 {
    mem.read(STATUS + u64::from(n), 1)[0]
}

/// Queue 0's counters from the control socket.
fn queue_stats(ctl: &Path) -> serde_json::Value {
    let mut s = UnixStream::connect(ctl).expect("control socket");
    s.write_all(b"{\"cmd\":\"stats\"}\n")
        .expect("stats request");
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).expect("stats reply");
    let v: serde_json::Value = serde_json::from_str(&line).expect("stats json");
    v["queues"][0].clone()
}

fn counter(ctl: &Path, name: &str) -> u64 {
    queue_stats(ctl)[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name:?}"))
}

fn wait_until(what: &str, d: &mut Daemon, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ok() {
        assert!(d.is_running(), "daemon died:\n{}", d.log_text());
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_broken_ring_is_counted_and_logged_and_the_queue_serves_again_once_repaired() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.raw");
    create_image(&image, Format::Raw, DISK);
    let cfg = DaemonConfig {
        image,
        format: Format::Raw,
        socket: dir.path().join("vhost.sock"),
        num_queues: 1,
        direct: false,
    };
    let ctl = dir.path().join("ctl.sock");
    let mut cmd = ours_command(&outboard_tests::workspace_binary("vhost-user-blk"), &cfg);
    cmd.arg("--control-socket").arg(&ctl);
    let mut d = Daemon::spawn("vhost-user-blk", cmd, &cfg.socket, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}"));
    let mem = GuestMem::new(MEM_SIZE, QSIZE);
    // One queue; no EVENT_IDX: the device signals every batch it completes.
    let (_conn, kicks, _calls) = connect(&cfg.socket, &mem, 1, 0, Duration::from_secs(5));

    // A good write of 4 KiB to sector 8.
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i % 253) as u8).collect();
    mem.write(DATA, &pattern);
    let h = request(&mem, 0, T_OUT, 8, 4096);
    mem.avail(0, 0, &[h], 1);
    kick(&kicks[0]);
    wait_until("the write", &mut d, || mem.used_idx(0) == 1);
    assert_eq!(status(&mem, 0), 0, "write status");

    // The driver breaks its ring: an available index 1000 entries ahead.
    mem.avail(0, 0, &[], 1001);
    let kicks_sent = 20u64;
    for i in 1..=kicks_sent {
        kick(&kicks[0]);
        wait_until("the broken ring counted", &mut d, || {
            counter(&ctl, "ring_errors") >= i
        });
    }
    assert!(d.is_running(), "daemon died:\n{}", d.log_text());
    let log = d.log_text();
    let lines = log
        .lines()
        .filter(|l| l.contains("queue 0: virtqueue") && l.contains("InvalidAvailRingIndex"))
        .count();
    assert!(lines >= 1, "the broken ring is logged:\n{log}");
    assert!(
        lines <= 5,
        "{kicks_sent} kicks on a broken ring, {lines} log lines (rate-limited to 5 per window):\n{log}"
    );
    // Refused before `virtio-queue` would log it on every pop.
    assert!(!log.contains("Iterator error"), "{log}");
    assert_eq!(mem.used_idx(0), 1, "nothing used from a broken ring");

    // The driver repairs the ring (its next request at slot 1) and kicks:
    // the same queue, on the same connection, serves it.
    let h = request(&mem, 1, T_IN, 8, 4096);
    mem.avail(0, 1, &[h], 2);
    kick(&kicks[0]);
    wait_until("the read after the repair", &mut d, || mem.used_idx(0) == 2);
    assert_eq!(status(&mem, 1), 0, "read status");
    assert!(
        mem.read(DATA + 0x1000, 4096) == pattern,
        "the read returns what was written"
    );

    // A read past the end of the disk: IOERR, counted as malformed (the
    // guest's fault, not the host's) and explained in the log.
    let before = queue_stats(&ctl);
    let h = request(&mem, 2, T_IN, DISK / 512, 4096);
    mem.avail(0, 2, &[h], 3);
    kick(&kicks[0]);
    wait_until("the out-of-range read", &mut d, || mem.used_idx(0) == 3);
    assert_eq!(status(&mem, 2), 1, "IOERR for a read past the end");
    let after = queue_stats(&ctl);
    let delta = |k: &str| after[k].as_u64().unwrap_or(0) - before[k].as_u64().unwrap_or(0);
    assert_eq!(
        (delta("io_errors"), delta("err_malformed"), delta("err_io")),
        (1, 1, 0),
        "{after}"
    );
    let log = d.log_text();
    assert!(
        log.contains("failed: sector 2048, 4096 bytes: not aligned or beyond the disk"),
        "{log}"
    );
    assert!(d.is_running(), "{}", d.log_text());
    d.stop();
}
