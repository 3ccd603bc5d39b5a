//! Daemon crash loop: a libblkio client writes 4 KiB blocks (each stamped
//! with a unique sequence number) and flushes every few writes while, for
//! qcow2, another thread takes internal snapshots through the control
//! socket; after a random number of requests the daemon is SIGKILLed while a
//! write is in flight, restarted, and the image checked, many times, for raw
//! and qcow2.
//!
//! The write is in flight at the kill by construction: the daemon runs with
//! the test-only `--test-hold-completions-ms` ([`HOLD`]), the daemon is
//! frozen (SIGSTOP) a random time shorter than that after the write was sent,
//! and killed only if the client has seen no completion for it by then (else
//! the write counts as an ordinary one, the daemon resumes and another write
//! is sent). The test counts a kill as hitting the write only if no
//! completion appears after the kill either (libblkio does
//! not reconnect, so nothing is resubmitted here; `vmm_blk_crash` and
//! `guest_blk_crash` check that). Every kill must hit. Checks after each kill:
//! - `qemu-img check` finds no corruption (leaks are allowed after a kill);
//! - every block holds its version from before the last completed FLUSH or
//!   one written after it (acknowledged or in flight), never anything older
//!   or anything else.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outboard_tests::blkio_client::{
    create_image, ours_command, BlkClient, ClientOptions, Daemon, DaemonConfig, Format,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const DISK: u64 = 16 << 20;
const BLOCK: usize = 4096;
const BLOCKS: u64 = 1024; // the first 4 MiB
const ROUNDS: usize = 24;
/// The daemon's test-only completion hold; kills come 2 to 30 ms after the
/// write was sent, well within it.
const HOLD: Duration = Duration::from_millis(60);

fn block(seq: u64, b: u64) -> Vec<u8> {
    let mut v = vec![0u8; BLOCK];
    for (i, chunk) in v.chunks_mut(16).enumerate() {
        chunk[..8].copy_from_slice(&seq.to_le_bytes());
        chunk[8..16].copy_from_slice(&(b ^ (i as u64) << 40).to_le_bytes());
    }
    v
}

fn start(cfg: &DaemonConfig, ctl: &Path) -> Daemon {
    let mut cmd = ours_command(&outboard_tests::workspace_binary("vhost-user-blk"), cfg);
    cmd.arg("--control-socket").arg(ctl);
    cmd.arg(format!("--test-hold-completions-ms={}", HOLD.as_millis()));
    Daemon::spawn("vhost-user-blk", cmd, &cfg.socket, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}"))
}

fn snapshot(ctl: &Path, name: &str) -> bool {
    let Ok(mut s) = UnixStream::connect(ctl) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if writeln!(s, r#"{{"cmd":"snapshot-create","name":"{name}"}}"#).is_err() {
        return false;
    }
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).is_ok() && line.contains("\"ok\":true")
}

/// One write of `(block, seq)` (or a flush for `None`), waited for: `Err` with
/// the reason unless it completed successfully. The client's synchronous
/// calls would wait 30 s for a completion from a dead daemon; this waits in
/// short steps (a step that ends without a completion is ETIME, not an error:
/// the daemon may be slow on a busy machine, e.g. in fdatasync, and holds
/// completions anyway) and checks the process in between.
fn io(
    client: &mut BlkClient,
    daemon: &mut Daemon,
    write: Option<(u64, u64)>,
) -> Result<(), String> {
    let q = client.queue(0);
    match write {
        Some((b, s)) => {
            q.buf_mut()[..BLOCK].copy_from_slice(&block(s, b));
            q.submit_write(b * BLOCK as u64, 0, BLOCK, 0, false)
                .map_err(|e| format!("queueing the write: {e}"))?;
        }
        None => q.submit_flush(0),
    }
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match q.reap(1, &mut out, Some(Duration::from_millis(200))) {
            Ok(n) if n > 0 && out[0].ret >= 0 => return Ok(()),
            Ok(n) if n > 0 => return Err(format!("completed with {}", out[0].ret)),
            Ok(_) => {}
            Err(e) if e.errno() == Some(libc::ETIME) => {}
            Err(e) => return Err(format!("waiting for the completion: {e}")),
        }
        if !daemon.is_running() {
            return Err("the daemon exited".into());
        }
        assert!(
            Instant::now() < deadline,
            "the daemon is alive but a request did not complete in 20 s:\n{}",
            daemon.log_text()
        );
    }
}

/// How a write sent just before a kill ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Victim {
    /// Frozen and killed with the write sent and not completed: no completion
    /// before the freeze, none after the kill.
    Hit,
    /// The write completed before the daemon was frozen (this thread was
    /// late, e.g. on a busy machine); the daemon was resumed, not killed.
    Late,
    /// A completion appeared after the kill of the frozen daemon (a broken
    /// freeze): counted as a kill that did not hit a write in flight.
    Miss,
}

/// Sends the write of `(block, seq)`, waits `delay`, freezes the daemon
/// (SIGSTOP, all threads stopped: it publishes nothing from then on) and
/// looks for the write's completion: if there is none, SIGKILLs the frozen
/// daemon, reaps it and looks again.
fn write_and_kill(
    client: &mut BlkClient,
    daemon: &mut Daemon,
    (b, s): (u64, u64),
    delay: Duration,
) -> Victim {
    let pid = daemon.pid().expect("pid");
    let q = client.queue(0);
    q.buf_mut()[..BLOCK].copy_from_slice(&block(s, b));
    q.submit_write(b * BLOCK as u64, 0, BLOCK, 0, false)
        .expect("queue the write");
    let mut out = Vec::new();
    // Sends it (and collects nothing: it cannot have completed yet).
    let sent = q.reap(0, &mut out, Some(Duration::ZERO));
    assert!(sent.is_ok(), "sending the write: {sent:?}");
    let mut completed = !out.is_empty();
    std::thread::sleep(delay);
    outboard_tests::freeze(pid);
    if let Ok(n) = q.reap(0, &mut out, Some(Duration::ZERO)) {
        completed |= n > 0;
    }
    if completed {
        outboard_tests::thaw(pid);
        return Victim::Late;
    }
    // SAFETY: kill(2) on our own child, not reaped yet (`daemon` reaps it).
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while daemon.is_running() {
        assert!(Instant::now() < deadline, "SIGKILLed daemon still running");
        std::thread::sleep(Duration::from_millis(1));
    }
    // The daemon is gone: nothing it published is left unseen.
    match q.reap(0, &mut out, Some(Duration::ZERO)) {
        Ok(n) if n > 0 => Victim::Miss,
        _ => Victim::Hit,
    }
}

/// Reads the whole image as the guest sees it.
fn image_bytes(image: &Path, format: Format) -> Vec<u8> {
    match format {
        Format::Raw => std::fs::read(image).expect("read raw"),
        Format::Qcow2 => outboard_tests::qemu_read_all(image, "qcow2"),
    }
}

fn crash_loop(format: Format) {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join(format!("disk.{format}"));
    create_image(&image, format, DISK);
    let cfg = DaemonConfig {
        image: image.clone(),
        format,
        socket: dir.path().join("vhost.sock"),
        num_queues: 1,
        direct: false,
    };
    let ctl = dir.path().join("ctl.sock");
    let mut rng = StdRng::seed_from_u64(0xc0a5_4000 + format as u64);
    // Per block: the versions it may hold (the durable one first, then those
    // written since the last completed flush).
    let mut allowed: HashMap<u64, Vec<u64>> = HashMap::new();
    let mut seq = 1u64;
    let mut snapshots_taken = 0u32;
    let mut flushed_writes = 0u64;
    let mut in_flight_kills = 0usize;
    let mut late_writes = 0usize;
    for round in 0..ROUNDS {
        let mut daemon = start(&cfg, &ctl);
        let mut client = daemon
            .connect(&ClientOptions::queues(1))
            .unwrap_or_else(|e| panic!("round {round}: connect: {e}\n{}", daemon.log_text()));
        let stop = Arc::new(AtomicBool::new(false));
        let taken = Arc::new(AtomicU32::new(0));
        let snapper = (format == Format::Qcow2).then(|| {
            let (stop, taken, ctl) = (stop.clone(), taken.clone(), ctl.clone());
            std::thread::spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::SeqCst) {
                    if snapshot(&ctl, &format!("r{round}-{i}")) {
                        taken.fetch_add(1, Ordering::SeqCst);
                    }
                    i += 1;
                    std::thread::sleep(Duration::from_millis(40));
                }
            })
        });
        // A random number of writes (and flushes), then the write the kill hits.
        let before_kill = rng.gen_range(0..12);
        let mut pending: Vec<(u64, u64)> = Vec::new();
        for _ in 0..before_kill {
            let b = rng.gen_range(0..BLOCKS);
            let s = seq;
            seq += 1;
            // A write that fails may still have reached the image.
            allowed.entry(b).or_insert_with(|| vec![0]).push(s);
            pending.push((b, s));
            if let Err(e) = io(&mut client, &mut daemon, Some((b, s))) {
                panic!(
                    "round {round}: write failed before the kill: {e}\n{}",
                    daemon.log_text()
                );
            }
            if pending.len() >= rng.gen_range(1..8) {
                if let Err(e) = io(&mut client, &mut daemon, None) {
                    panic!(
                        "round {round}: flush failed before the kill: {e}\n{}",
                        daemon.log_text()
                    );
                }
                // Durable now: each block's latest version is the only one allowed.
                for &(b, s) in &pending {
                    allowed.insert(b, vec![s]);
                }
                flushed_writes += pending.len() as u64;
                pending.clear();
            }
        }
        // The write the kill hits; another one if this thread was so late
        // that the write had completed before the daemon was frozen.
        let delay = Duration::from_millis(rng.gen_range(2..30));
        let mut tries = 0;
        let hit = loop {
            let b = rng.gen_range(0..BLOCKS);
            let s = seq;
            seq += 1;
            allowed.entry(b).or_insert_with(|| vec![0]).push(s);
            pending.push((b, s));
            tries += 1;
            match write_and_kill(&mut client, &mut daemon, (b, s), delay) {
                Victim::Late => {
                    late_writes += 1;
                    assert!(
                        tries < 10,
                        "round {round}: 10 writes in a row completed within {delay:?} and a \
                         SIGSTOP; the daemon holds completions {HOLD:?}: is the hold working?"
                    );
                }
                v => break v == Victim::Hit,
            }
        };
        in_flight_kills += usize::from(hit);
        eprintln!(
            "{format} round {round}: kill {delay:?} after a write was sent (try {tries}), after \
             {before_kill} earlier write(s): {}",
            if hit {
                "hit the write in flight"
            } else {
                "a completion came after the kill"
            }
        );
        stop.store(true, Ordering::SeqCst);
        if let Some(t) = snapper {
            t.join().expect("snapshot thread");
        }
        snapshots_taken += taken.load(Ordering::SeqCst);
        drop(client);
        daemon.stop();
        if format == Format::Qcow2 {
            let c = outboard_tests::qemu_check(&image, &[]);
            assert!(
                (c.code == 0 || c.code == 3) && !c.text.contains("ERROR"),
                "round {round}: qemu-img check finds corruption (exit {}):\n{}",
                c.code,
                c.text
            );
        }
        let data = image_bytes(&image, format);
        for (&b, versions) in allowed.iter_mut() {
            let got = &data[(b as usize) * BLOCK..(b as usize + 1) * BLOCK];
            let found = versions.iter().copied().find(|&v| {
                if v == 0 {
                    got.iter().all(|&x| x == 0)
                } else {
                    got == block(v, b).as_slice()
                }
            });
            let Some(v) = found else {
                panic!(
                    "round {round}: block {b} holds none of the versions {versions:?} \
                     (first bytes {:02x?})",
                    &got[..16]
                );
            };
            // What is on disk now is what the next round starts from.
            *versions = vec![v];
        }
    }
    eprintln!(
        "{format}: {ROUNDS} kills, {in_flight_kills} of them with a write in flight, \
         {late_writes} write(s) completed before the freeze (sent again), \
         {flushed_writes} writes flushed, {snapshots_taken} snapshots"
    );
    assert_eq!(
        in_flight_kills, ROUNDS,
        "{format}: some kills did not hit a write in flight (a completion came after the kill)"
    );
    assert!(flushed_writes > 0);
    if format == Format::Qcow2 {
        assert!(
            snapshots_taken > 0,
            "no snapshot was taken during the rounds"
        );
        let r = outboard_tests::qemu_check(&image, &["-r", "leaks"]);
        assert!(r.code == 0, "check -r leaks: {}", r.text);
        outboard_tests::assert_qemu_check_clean(&image, "after the crash loop");
    }
}

#[test]
fn raw_crash_loop_keeps_flushed_writes() {
    crash_loop(Format::Raw);
}

#[test]
fn qcow2_crash_loop_with_concurrent_snapshots_keeps_flushed_writes() {
    crash_loop(Format::Qcow2);
}
