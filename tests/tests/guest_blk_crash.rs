//! Crash recovery with a real guest: QEMU (TCG) runs a fio write+verify load
//! on a raw and a qcow2 disk, each served by its own `vhost-user-blk`, while
//! the test SIGKILLs and restarts the daemons several times. QEMU's chardev
//! reconnects (`reconnect=1`) and hands the restarted daemon the inflight
//! region; the guest must see no I/O error, fio's verify must pass, and the
//! qcow2 image must have no corruption (`qemu-img check`; a SIGKILL may leak
//! clusters, which `check -r leaks` repairs).
//!
//! Requests are in flight at every kill by construction: the daemons run
//! with the test-only `--test-hold-completions-ms` ([`HOLD_MS`]: each wave of
//! requests stays taken, recorded in the inflight region, that long after its
//! I/O, and the next wave is taken before it is published), fio runs one
//! time-based process for longer than the kills take, with a reader per disk
//! that keeps more than two daemon waves (8 each) queued besides the writer
//! (which drains before each verify pass), and an instance is killed only
//! once QEMU has connected to it, and only while frozen (SIGSTOP) at a moment
//! when one of its queue threads is inside the hold
//! ([`outboard_tests::stop_while_holding`]). So EVERY restarted daemon must
//! resubmit at least one request.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use outboard_tests::guest::{BlkDisk, GuestImage, Qemu};
use rand::{Rng, SeedableRng};

const KILLS: usize = 6;
/// The daemons' test-only completion hold: far longer than the guest takes
/// to queue the next requests, so fio always waits on the daemon.
const HOLD_MS: u32 = 40;
/// fio's run time: longer than the kills take (6 x at most 1.5 s + 0.6 s
/// pause + QEMU's 1 s reconnect), so the last kill finds fio running.
const RUNTIME_SECS: u32 = 30;

struct Daemon {
    child: Child,
    sock: PathBuf,
    logs: Vec<PathBuf>,
    /// Per kill: SIGSTOP tries until a queue thread was caught holding requests.
    stop_tries: Vec<usize>,
}

impl Daemon {
    fn start(image: &Path, format: &str, sock: &Path) -> Daemon {
        let mut d = Daemon {
            child: spawn(image, format, sock, &log_path(sock, 0)),
            sock: sock.to_path_buf(),
            logs: vec![log_path(sock, 0)],
            stop_tries: Vec::new(),
        };
        d.wait_listening();
        d
    }

    fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        // The socket file of a killed instance stays: wait for the new
        // instance to say it listens (a probe connection would be served).
        let log = self.logs.last().cloned().unwrap_or_default();
        while !fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("waiting for a frontend")
        {
            assert!(
                self.child.try_wait().expect("wait").is_none(),
                "vhost-user-blk exited: {}",
                self.log()
            );
            assert!(Instant::now() < deadline, "no listener after 10 s");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until QEMU has (re)connected to the current instance and set up
    /// the inflight region, so it tracks what it takes.
    fn wait_serving(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let log = self.logs.last().cloned().unwrap_or_default();
        while !fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("inflight tracking on")
        {
            assert!(
                Instant::now() < deadline,
                "QEMU did not reconnect within 20 s\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL (once QEMU uses the instance), then a new instance on the same
    /// socket and image.
    fn crash_and_restart(&mut self, image: &Path, format: &str, pause: Duration) {
        self.wait_serving();
        // Frozen while a queue thread holds requests (recorded in flight), then killed.
        let tries = outboard_tests::stop_while_holding(self.child.id(), Duration::from_secs(10));
        self.stop_tries.push(tries);
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reap");
        std::thread::sleep(pause);
        let log = log_path(&self.sock, self.logs.len());
        self.child = spawn(image, format, &self.sock, &log);
        self.logs.push(log);
        self.wait_listening();
    }

    fn log(&self) -> String {
        self.logs
            .iter()
            .enumerate()
            .map(|(i, p)| {
                format!(
                    "--- instance {i} ---\n{}",
                    fs::read_to_string(p).unwrap_or_default()
                )
            })
            .collect()
    }

    /// Requests resubmitted by each restarted instance (all queues), from
    /// their logs.
    fn resubmitted(&self) -> Vec<u64> {
        self.logs[1..]
            .iter()
            .map(|p| {
                fs::read_to_string(p)
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|l| {
                        let rest = l.split("resubmitting ").nth(1)?;
                        rest.split(' ').next()?.parse::<u64>().ok()
                    })
                    .sum()
            })
            .collect()
    }

    fn terminate(mut self) -> String {
        // SIGTERM: drain, flush, exit 0.
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().expect("wait");
        assert!(status.success(), "SIGTERM exit: {status}\n{}", self.log());
        self.log()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn log_path(sock: &Path, i: usize) -> PathBuf {
    sock.with_extension(format!("{i}.log"))
}

fn spawn(image: &Path, format: &str, sock: &Path, log: &Path) -> Child {
    let log = fs::File::create(log).expect("log");
    Command::new(outboard_tests::workspace_binary("vhost-user-blk"))
        .arg("--socket-path")
        .arg(sock)
        .arg("--blk-file")
        .arg(image)
        .args(["--format", format, "--num-queues", "2"])
        .arg(format!("--test-hold-completions-ms={HOLD_MS}"))
        // Raw writes reach the page cache before they complete, which a
        // SIGKILL cannot lose; qcow2 metadata is written back on FLUSH, so
        // with a write-back cache a crash may drop unflushed writes, as a
        // volatile disk cache may. fio does not flush: serve qcow2 with a
        // write-through cache (every completed write is durable).
        // Raw goes O_DIRECT + write-through so that writes stay in flight
        // long enough for a kill to hit some (page-cache writes complete in
        // microseconds, and a test whose kills hit nothing proves nothing).
        .args(if format == "qcow2" {
            &["--cache", "writethrough"][..]
        } else {
            &["--direct", "--cache", "writethrough"][..]
        })
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn vhost-user-blk")
}

#[test]
fn guest_io_survives_daemon_sigkill_and_restart() {
    let image = GuestImage::ensure().unwrap_or_else(|e| panic!("building the test guest: {e}"));
    let dir = tempfile::tempdir().expect("tempdir");
    let raw = dir.path().join("a.raw");
    fs::File::create(&raw)
        .and_then(|f| f.set_len(64 << 20))
        .expect("raw disk");
    let qc = dir.path().join("b.qcow2");
    let q = qc.to_str().expect("utf8 path");
    outboard_tests::qemu_img(["create", "-q", "-f", "qcow2", q, "64M"]);
    let (sa, sb) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let mut da = Daemon::start(&raw, "raw", &sa);
    let mut db = Daemon::start(&qc, "qcow2", &sb);

    // fio, one process for RUNTIME_SECS (separate short fio runs spend most
    // of their time starting up in this guest), on each disk: job a/b random
    // 4 KiB writes at depth 16 over 8 MiB, every block read back and checked
    // (crc32c) after each 256 written (verify_backlog); job ra/rb random 4 KiB
    // reads at depth 24 (more than two daemon waves), which never drain. "ready" once fio's writes reached
    // both disks (write I/Os in /sys/block/vdX/stat).
    let script = format!(
        "set -e\n\
         fio --ioengine=libaio --direct=1 --time_based --runtime={RUNTIME_SECS} \
         --name=a --filename=/dev/vda --rw=randwrite --bs=4k --iodepth=16 --size=8m \
         --verify=crc32c --verify_backlog=256 --verify_fatal=1 \
         --name=b --filename=/dev/vdb --rw=randwrite --bs=4k --iodepth=16 --size=8m \
         --verify=crc32c --verify_backlog=256 --verify_fatal=1 \
         --name=ra --filename=/dev/vda --rw=randread --bs=4k --iodepth=24 --size=8m \
         --name=rb --filename=/dev/vdb --rw=randread --bs=4k --iodepth=24 --size=8m \
         >/tmp/f 2>&1 &\n\
         fio_pid=$!\n\
         for d in vda vdb; do n=0\n\
         while read -r _ _ _ _ w _ </sys/block/$d/stat && [ \"$w\" = 0 ]; do\n\
         n=$((n+1)); [ $n -lt 6000 ] || {{ echo no-io-on-$d; tail -40 /tmp/f; exit 3; }}\n\
         sleep 0.01; done; done\n\
         echo ready\n\
         echo fio-running-at-uptime $(cut -d' ' -f1 /proc/uptime)\n\
         wait $fio_pid || {{ tail -40 /tmp/f; exit 1; }}\n\
         grep -E 'err=|read:|write:' /tmp/f\n\
         echo fio-done-at-uptime $(cut -d' ' -f1 /proc/uptime)\n\
         if dmesg | grep -i 'error'; then echo guest-saw-errors; exit 2; fi\n\
         echo all-ok\n"
    );
    let reconnect = |s: &Path| {
        let mut d = BlkDisk::new(s, 2);
        d.reconnect_secs = Some(1);
        d
    };
    let mut guest = Qemu::new(&image)
        .disk(reconnect(&sa))
        .disk(reconnect(&sb))
        .spawn(&script)
        .expect("start guest");
    guest
        .wait_for_output("ready", Duration::from_secs(180))
        .unwrap_or_else(|e| panic!("guest did not start: {e}"));

    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let started = Instant::now();
    for k in 0..KILLS {
        std::thread::sleep(Duration::from_millis(rng.gen_range(700..1500)));
        let pause = Duration::from_millis(rng.gen_range(0..600));
        if k % 2 == 0 {
            da.crash_and_restart(&raw, "raw", pause);
        } else {
            db.crash_and_restart(&qc, "qcow2", pause);
        }
        eprintln!("kill {} done at {:?}", k + 1, started.elapsed());
    }
    let kills_took = started.elapsed();
    let run = guest.wait(Duration::from_secs(240)).unwrap_or_else(|e| {
        panic!(
            "guest did not finish: {e}\nraw daemon:\n{}\nqcow2 daemon:\n{}",
            da.log(),
            db.log()
        )
    });
    eprintln!("{}", run.output);
    // Kill k hit daemon k % 2; its restart is that daemon's instance k / 2 + 1.
    let resubmitted = [da.resubmitted(), db.resubmitted()];
    let per_kill: Vec<u64> = (0..KILLS).map(|k| resubmitted[k % 2][k / 2]).collect();
    let tries = [&da.stop_tries, &db.stop_tries];
    for (k, n) in per_kill.iter().enumerate() {
        eprintln!(
            "kill {}: {} daemon (stopped holding after {} SIGSTOP tries): {n} request(s) \
             resubmitted by the restarted daemon",
            k + 1,
            ["raw", "qcow2"][k % 2],
            tries[k % 2][k / 2]
        );
    }
    eprintln!(
        "per-kill resubmissions: {per_kill:?}; kills took {kills_took:?}; guest run {:?}",
        run.total
    );
    assert!(
        run.exit_code == 0 && run.output.contains("all-ok"),
        "guest saw an error (exit {}):\n{}\nraw daemon:\n{}\nqcow2 daemon:\n{}",
        run.exit_code,
        run.output,
        da.log(),
        db.log()
    );
    assert!(
        kills_took < Duration::from_secs(u64::from(RUNTIME_SECS) - 2),
        "the kills took {kills_took:?}, fio may have ended before the last: raise RUNTIME_SECS"
    );
    for (k, &n) in per_kill.iter().enumerate() {
        assert!(
            n >= 1,
            "kill {} ({} daemon) hit no request in flight: the restart resubmitted \
             nothing\n{}\n{}",
            k + 1,
            ["raw", "qcow2"][k % 2],
            da.log(),
            db.log()
        );
    }
    da.terminate();
    db.terminate();
    let c = outboard_tests::qemu_check(&qc, &[]);
    assert!(
        (c.code == 0 || c.code == 3) && !c.text.contains("ERROR"),
        "qemu-img check finds corruption (exit {}):\n{}",
        c.code,
        c.text
    );
    eprintln!("qemu-img check after the crashes: exit {}", c.code);
    let r = outboard_tests::qemu_check(&qc, &["-r", "leaks"]);
    assert!(r.code == 0, "check -r leaks: {}", r.text);
    outboard_tests::assert_qemu_check_clean(&qc, "after repairing leaks");
}
