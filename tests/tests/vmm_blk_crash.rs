//! Crash recovery under the `outboard` VMM: the guest runs a fio write+verify load on a raw
//! and a qcow2 disk, each served by its own `vhost-user-blk` (`--disk socket=`), while the
//! test SIGKILLs and restarts the daemons several times on the same sockets. The VMM
//! negotiates INFLIGHT_SHMFD, keeps the inflight region the first daemon handed out and
//! gives it to every restarted one (SET_INFLIGHT_FD) before the rings start, so requests
//! the killed daemon had taken are completed by the new one. The guest must see no I/O
//! error and fio's verify must pass; the qcow2 image must have no corruption (`qemu-img
//! check`; a SIGKILL may leak clusters, `check -r leaks` repairs).
//!
//! Requests are in flight at every kill by construction: the daemons run with the
//! test-only `--test-hold-completions-ms` ([`HOLD_MS`]): each wave of requests stays taken
//! (recorded in the inflight region) that long after its I/O, and the next wave is taken
//! before it is published. fio keeps more than two waves queued on each disk the whole
//! time (a reader at depth 24 besides the writer, which drains before each verify pass), so
//! a queue thread is holding requests most of the time. An instance is killed only once it
//! serves the VMM, and only while frozen (SIGSTOP) at a moment when one of its queue threads
//! is inside the hold ([`outboard_tests::stop_while_holding`]). So EVERY restarted daemon
//! must have resubmitted at least one request, and exactly as many as the VMM read in the
//! inflight region when it resumed the device (its log line).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use outboard_tests::vmm::{guest_with_fio_or_skip, Outboard};
use rand::{Rng, SeedableRng};

const KILLS: usize = 6;
const RUNTIME_SECS: u32 = 10;
/// The daemons' test-only completion hold: far longer than the guest takes to queue the
/// next requests, so fio always waits on the daemon.
const HOLD_MS: u32 = 40;

struct Daemon {
    child: Child,
    image: PathBuf,
    format: &'static str,
    sock: PathBuf,
    logs: Vec<PathBuf>,
    /// Per kill: SIGSTOP tries until a queue thread was caught holding requests.
    stop_tries: Vec<usize>,
}

impl Daemon {
    fn start(image: &Path, format: &'static str, sock: &Path) -> Daemon {
        let log = sock.with_extension("0.log");
        let mut d = Daemon {
            child: spawn(image, format, sock, &log),
            image: image.to_path_buf(),
            format,
            sock: sock.to_path_buf(),
            logs: vec![log],
            stop_tries: Vec::new(),
        };
        d.wait_listening();
        d
    }

    fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        // The socket file of a killed instance stays: wait for the new one to say it listens.
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

    /// Waits until the current instance serves the VMM (the inflight region is set up, so
    /// it tracks what it takes).
    fn wait_serving(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let log = self.logs.last().cloned().unwrap_or_default();
        while !fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("inflight tracking on")
        {
            assert!(
                Instant::now() < deadline,
                "the VMM did not reconnect to the {} daemon within 10 s\n{}",
                self.format,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL (once the instance serves the VMM), then a new instance on the same socket
    /// and image.
    fn crash_and_restart(&mut self, pause: Duration) {
        self.wait_serving();
        // Frozen while a queue thread holds requests (recorded in flight), then killed.
        let tries = outboard_tests::stop_while_holding(self.child.id(), Duration::from_secs(10));
        self.stop_tries.push(tries);
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reap");
        std::thread::sleep(pause);
        let log = self.sock.with_extension(format!("{}.log", self.logs.len()));
        self.child = spawn(&self.image, self.format, &self.sock, &log);
        self.logs.push(log);
        self.wait_listening();
    }

    fn log(&self) -> String {
        self.logs
            .iter()
            .enumerate()
            .map(|(i, p)| {
                format!(
                    "--- {} instance {i} ---\n{}",
                    self.format,
                    fs::read_to_string(p).unwrap_or_default()
                )
            })
            .collect()
    }

    /// Requests resubmitted by each restarted instance (all queues), from their logs.
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

    fn terminate(mut self) {
        // SIGTERM: drain, flush, exit 0.
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().expect("wait");
        assert!(status.success(), "SIGTERM exit: {status}\n{}", self.log());
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Joins a thread when dropped, also while unwinding from a panic of the test thread, after
/// setting its stop flag: the daemons the thread owns are then dropped (killed and reaped)
/// before the test process exits, which would otherwise leave them running.
struct JoinOnDrop<T> {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<T>>,
}

impl<T> JoinOnDrop<T> {
    fn new(stop: Arc<AtomicBool>, handle: std::thread::JoinHandle<T>) -> Self {
        JoinOnDrop {
            stop,
            handle: Some(handle),
        }
    }

    /// The thread's result (panics if it panicked).
    fn join(mut self) -> T {
        let h = self.handle.take().expect("joined once");
        h.join().expect("killer thread")
    }
}

impl<T> Drop for JoinOnDrop<T> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The VMM's resume lines for the device on `sock`, in order: (requests outstanding in the
/// available ring, requests recorded in flight in the inflight region).
fn vmm_resumes(stderr: &str, sock: &Path) -> Vec<(u64, u64)> {
    let sock = format!("{}:", sock.display());
    let number_before = |l: &str, what: &str| -> Option<u64> {
        l.split(what).next()?.rsplit(' ').next()?.parse().ok()
    };
    stderr
        .lines()
        .filter(|l| l.contains(&sock) && l.contains("resuming after a reconnect"))
        .map(|l| {
            let o = number_before(l, " request(s) outstanding");
            let r = number_before(l, " recorded in flight");
            match (o, r) {
                (Some(o), Some(r)) => (o, r),
                _ => panic!("unexpected VMM resume line: {l}"),
            }
        })
        .collect()
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
        // fio does not flush: serve qcow2 write-through so every completed write is
        // durable across a SIGKILL. Raw writes would be in the page cache when they
        // complete; served with O_DIRECT and write-through they take device time, so
        // several are in flight (and complete out of order) when a kill comes.
        .args(if format == "qcow2" {
            &["--cache", "writethrough"][..]
        } else {
            &["--direct", "--cache", "writethrough"][..]
        })
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn vhost-user-blk")
}

#[test]
fn guest_io_survives_daemon_sigkill_and_restart_under_the_vmm() {
    let guest = match guest_with_fio_or_skip() {
        Ok(g) => g,
        Err(why) => {
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let raw = dir.path().join("a.raw");
    fs::File::create(&raw)
        .and_then(|f| f.set_len(64 << 20))
        .expect("raw disk");
    let qc = dir.path().join("b.qcow2");
    let q = qc.to_str().expect("utf8 path");
    outboard_tests::qemu_img(["create", "-q", "-f", "qcow2", q, "64M"]);
    let (sa, sb) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let da = Daemon::start(&raw, "raw", &sa);
    let db = Daemon::start(&qc, "qcow2", &sb);

    // fio, one process for RUNTIME_SECS (a new fio per round spends most of its time
    // starting up in this guest), on each disk: job a/b random 4 KiB / 1 MiB writes at depth
    // 16 (submitted in batches of 16) over 32 MiB, every block read back and checked
    // (crc32c) after each 256 written (verify_backlog); job ra/rb random 4 KiB reads at depth
    // 24. The writer drains its queue before each verify pass; the reader never drains and
    // keeps more than two daemon waves (8 each) queued, so while fio runs each daemon always
    // has a wave taken and held (HOLD_MS) and the next one queued. "ready" comes once fio's
    // writes have reached both disks (write I/Os in /sys/block/vdX/stat), so every kill finds
    // fio running.
    let script = format!(
        "set -e\n\
         fio --ioengine=libaio --direct=1 --time_based --runtime={RUNTIME_SECS} \
         --name=a --filename=/dev/vda --rw=randwrite --bssplit=4k/50:1m/50 --iodepth=16 \
         --iodepth_batch_submit=16 --size=32m \
         --verify=crc32c --verify_backlog=256 --verify_fatal=1 \
         --name=b --filename=/dev/vdb --rw=randwrite --bssplit=4k/50:1m/50 --iodepth=16 \
         --iodepth_batch_submit=16 --size=32m \
         --verify=crc32c --verify_backlog=256 --verify_fatal=1 \
         --name=ra --filename=/dev/vda --rw=randread --bs=4k --iodepth=24 --size=32m \
         --name=rb --filename=/dev/vdb --rw=randread --bs=4k --iodepth=24 --size=32m \
         >/tmp/f 2>&1 &\n\
         fio_pid=$!\n\
         for d in vda vdb; do n=0\n\
         while read -r _ _ _ _ w _ </sys/block/$d/stat && [ \"$w\" = 0 ]; do\n\
         n=$((n+1)); [ $n -lt 3000 ] || {{ echo no-io-on-$d; tail -40 /tmp/f; exit 3; }}\n\
         sleep 0.01; done; done\n\
         echo ready\n\
         echo fio-running-at-uptime $(cut -d' ' -f1 /proc/uptime)\n\
         wait $fio_pid || {{ tail -40 /tmp/f; exit 1; }}\n\
         grep -E 'err=|read:|write:' /tmp/f\n\
         if dmesg | grep -i -e error -e 'not a head'; then echo guest-saw-errors; exit 2; fi\n\
         echo all-ok\n"
    );

    // The killer waits for the guest's "ready", then kills and restarts the daemons
    // alternately at random moments; it stops early if the guest finished.
    let (ready_tx, ready_rx) = mpsc::channel::<()>();
    let finished = Arc::new(AtomicBool::new(false));
    let fin = finished.clone();
    let killer = JoinOnDrop::new(
        finished.clone(),
        std::thread::spawn(move || {
            let mut daemons = [da, db];
            let mut kills = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(150);
            loop {
                match ready_rx.recv_timeout(Duration::from_millis(100)) {
                    Ok(()) => break,
                    Err(mpsc::RecvTimeoutError::Timeout)
                        if !fin.load(Ordering::SeqCst) && Instant::now() < deadline => {}
                    Err(_) => return (daemons, kills),
                }
            }
            let t0 = Instant::now();
            let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
            for k in 0..KILLS {
                std::thread::sleep(Duration::from_millis(rng.gen_range(500..1000)));
                if fin.load(Ordering::SeqCst) {
                    break;
                }
                let pause = Duration::from_millis(rng.gen_range(0..300));
                daemons[k % 2].crash_and_restart(pause);
                kills.push(t0.elapsed());
            }
            (daemons, kills)
        }),
    );
    let run = Outboard::new(&guest)
        .cpus(2)
        .memory_mib(512)
        .disk(&format!("socket={}", sa.display()))
        .disk(&format!("socket={}", sb.display()))
        // Generous: the hold slows the guest's boot-time disk probing, and the machine may
        // be busy; a hang still fails.
        .run_with(&script, Duration::from_secs(150), |l| {
            let l = l.trim_end();
            if l == "ready" {
                let _ = ready_tx.send(());
            } else if l.starts_with("OB_EXIT") || l == "all-ok" {
                finished.store(true, Ordering::SeqCst);
            }
        });
    finished.store(true, Ordering::SeqCst);
    drop(ready_tx);
    let (daemons, kills) = killer.join();
    let [da, db] = daemons;
    let logs = format!("{}{}", da.log(), db.log());
    eprintln!("{}", run.output);
    run.assert_ok(&format!("guest I/O across daemon crashes\n{logs}"));
    assert!(run.output.contains("all-ok"), "{}\n{logs}", run.output);
    assert_eq!(
        kills.len(),
        KILLS,
        "the guest finished before every kill (kills at {kills:?}): raise RUNTIME_SECS\n{}",
        run.output
    );
    let reconnects = run
        .stderr
        .matches("backend reconnected, device resumed")
        .count();
    assert_eq!(reconnects, KILLS, "VMM reconnects:\n{}", run.stderr);
    // Per kill: what the VMM found when it resumed the device (outstanding in the available
    // ring, recorded in flight in the inflight region) and what the restarted daemon
    // resubmitted. Kill k hit daemon k % 2; its restart is that daemon's instance k / 2 + 1.
    let resume_lines: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.contains("resuming after a reconnect"))
        .collect();
    eprintln!("{}", resume_lines.join("\n"));
    let daemons = [&da, &db];
    let resumes = [vmm_resumes(&run.stderr, &sa), vmm_resumes(&run.stderr, &sb)];
    let resubmitted = [da.resubmitted(), db.resubmitted()];
    let mut per_kill = Vec::new();
    for (k, at) in kills.iter().enumerate() {
        let (d, i) = (k % 2, k / 2);
        let (outstanding, recorded) = *resumes[d].get(i).unwrap_or_else(|| {
            panic!(
                "no VMM resume line for restart {} of the {} daemon:\n{}",
                i + 1,
                daemons[d].format,
                run.stderr
            )
        });
        let n = resubmitted[d][i];
        eprintln!(
            "kill {} at {at:?}: {} daemon (stopped holding after {} SIGSTOP tries): \
             {outstanding} outstanding in the available ring, {recorded} recorded in flight, \
             {n} resubmitted by the restarted daemon",
            k + 1,
            daemons[d].format,
            daemons[d].stop_tries[i]
        );
        per_kill.push((daemons[d].format, outstanding, recorded, n));
    }
    eprintln!(
        "per-kill resubmissions: {:?}; guest run {:?}",
        per_kill.iter().map(|p| p.3).collect::<Vec<_>>(),
        run.total
    );
    for (k, &(format, _, recorded, n)) in per_kill.iter().enumerate() {
        assert!(
            n >= 1,
            "kill {} ({format} daemon) hit no request in flight: the restart resubmitted \
             nothing\n{logs}\n{}",
            k + 1,
            run.stderr
        );
        assert_eq!(
            n,
            recorded,
            "kill {} ({format} daemon): the restarted daemon resubmitted {n}, the inflight \
             region recorded {recorded} in flight\n{logs}\n{}",
            k + 1,
            run.stderr
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
    let r = outboard_tests::qemu_check(&qc, &["-r", "leaks"]);
    assert!(r.code == 0, "check -r leaks: {}", r.text);
    outboard_tests::assert_qemu_check_clean(&qc, "after repairing leaks");
}
