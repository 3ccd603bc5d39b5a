//! Crash recovery under the `outboard` VMM: the guest runs a fio write+verify load on a raw
//! and a qcow2 disk, each served by its own `vhost-user-blk` (`--disk socket=`), while the
//! test SIGKILLs and restarts the daemons several times on the same sockets. The VMM
//! negotiates INFLIGHT_SHMFD, keeps the inflight region the first daemon handed out and
//! gives it to every restarted one (SET_INFLIGHT_FD) before the rings start, so requests
//! the killed daemon had taken are completed by the new one. The guest must see no I/O
//! error and fio's verify must pass; the restarted daemons must have resubmitted requests
//! (else no kill hit I/O in flight and the test proved nothing); the qcow2 image must have
//! no corruption (`qemu-img check`; a SIGKILL may leak clusters, `check -r leaks` repairs).

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

struct Daemon {
    child: Child,
    image: PathBuf,
    format: &'static str,
    sock: PathBuf,
    logs: Vec<PathBuf>,
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

    /// SIGKILL, then a new instance on the same socket and image.
    fn crash_and_restart(&mut self, pause: Duration) {
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

    /// Requests resubmitted by restarted instances, from their logs.
    fn resubmitted(&self) -> u64 {
        self.logs
            .iter()
            .filter_map(|p| fs::read_to_string(p).ok())
            .flat_map(|t| {
                t.lines()
                    .filter_map(|l| {
                        let rest = l.split("resubmitting ").nth(1)?;
                        rest.split(' ').next()?.parse::<u64>().ok()
                    })
                    .collect::<Vec<_>>()
            })
            .sum()
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

fn spawn(image: &Path, format: &str, sock: &Path, log: &Path) -> Child {
    let log = fs::File::create(log).expect("log");
    Command::new(outboard_tests::workspace_binary("vhost-user-blk"))
        .arg("--socket-path")
        .arg(sock)
        .arg("--blk-file")
        .arg(image)
        .args(["--format", format, "--num-queues", "2"])
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

    // fio: random 64 KiB writes at depth 16 (submitted in batches of 16) over 32 MiB of
    // each disk for RUNTIME_SECS, every block read back and checked (crc32c) after each
    // 256 written (verify_backlog): one fio process, so I/O runs the whole time (a new fio
    // per round spends most of its time starting up in this guest).
    let script = format!(
        "set -e\necho ready\n\
         fio --ioengine=libaio --direct=1 --bssplit=4k/50:1m/50 --rw=randwrite --iodepth=16 \
         --iodepth_batch_submit=16 --size=32m --time_based --runtime={RUNTIME_SECS} \
         --verify=crc32c --verify_backlog=256 --verify_fatal=1 \
         --name=a --filename=/dev/vda --name=b --filename=/dev/vdb >/tmp/f 2>&1 \
         || {{ tail -40 /tmp/f; exit 1; }}\n\
         grep -E 'err=|read:|write:' /tmp/f\n\
         if dmesg | grep -i -e error -e 'not a head'; then echo guest-saw-errors; exit 2; fi\n\
         echo all-ok\n"
    );

    // The killer waits for the guest's "ready", then kills and restarts the daemons
    // alternately at random moments; it stops early if the guest finished.
    let (ready_tx, ready_rx) = mpsc::channel::<()>();
    let finished = Arc::new(AtomicBool::new(false));
    let fin = finished.clone();
    let killer = std::thread::spawn(move || {
        let mut daemons = [da, db];
        let mut kills = Vec::new();
        if ready_rx.recv_timeout(Duration::from_secs(60)).is_err() {
            return (daemons, kills);
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
    });
    let run = Outboard::new(&guest)
        .cpus(2)
        .memory_mib(512)
        .disk(&format!("socket={}", sa.display()))
        .disk(&format!("socket={}", sb.display()))
        .run_with(&script, Duration::from_secs(60), |l| {
            let l = l.trim_end();
            if l == "ready" {
                let _ = ready_tx.send(());
            } else if l.starts_with("OB_EXIT") || l == "all-ok" {
                finished.store(true, Ordering::SeqCst);
            }
        });
    finished.store(true, Ordering::SeqCst);
    drop(ready_tx);
    let (daemons, kills) = killer.join().expect("killer thread");
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
    // What the guest had outstanding when the VMM resumed each device (VMM log).
    let outstanding: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.contains("not completed"))
        .collect();
    eprintln!("{}", outstanding.join("\n"));
    let resubmitted = (da.resubmitted(), db.resubmitted());
    let reconnects = run
        .stderr
        .matches("backend reconnected, device resumed")
        .count();
    eprintln!(
        "kills at {kills:?}; VMM reconnects {reconnects}; requests resubmitted after \
         restarts: raw {}, qcow2 {}; guest run {:?}",
        resubmitted.0, resubmitted.1, run.total
    );
    assert_eq!(reconnects, KILLS, "VMM reconnects:\n{}", run.stderr);
    assert!(
        resubmitted.0 + resubmitted.1 > 0,
        "no kill hit a request in flight: the test proved nothing\n{logs}"
    );
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
