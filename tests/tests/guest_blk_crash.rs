//! Crash recovery with a real guest: QEMU (TCG) runs fio write+verify loops
//! on a raw and a qcow2 disk, each served by its own `vhost-user-blk`, while
//! the test SIGKILLs and restarts the daemons several times. QEMU's chardev
//! reconnects (`reconnect=1`) and hands the restarted daemon the inflight
//! region; the guest must see no I/O error, fio's verify must pass, the
//! restarted daemons must have resubmitted requests left in flight, and the
//! qcow2 image must have no corruption (`qemu-img check`; a SIGKILL may leak
//! clusters, which `check -r leaks` repairs).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use outboard_tests::guest::{BlkDisk, GuestImage, Qemu};
use rand::{Rng, SeedableRng};

const KILLS: usize = 6;

struct Daemon {
    child: Child,
    sock: PathBuf,
    logs: Vec<PathBuf>,
}

impl Daemon {
    fn start(image: &Path, format: &str, sock: &Path) -> Daemon {
        let mut d = Daemon {
            child: spawn(image, format, sock, &log_path(sock, 0)),
            sock: sock.to_path_buf(),
            logs: vec![log_path(sock, 0)],
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

    /// SIGKILL, then a new instance on the same socket and image.
    fn crash_and_restart(&mut self, image: &Path, format: &str, pause: Duration) {
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

    // fio: random 4 KiB writes at depth 16 over 8 MiB of each disk, then a
    // read-back verify (crc32c) of every block; a new seed per round.
    let script = "set -e\necho ready\n\
        for i in 1 2 3 4 5 6; do\n\
        fio --ioengine=libaio --direct=1 --bs=4k --rw=randwrite --iodepth=16 --size=8m \
        --verify=crc32c --verify_fatal=1 --randseed=$i \
        --name=a --filename=/dev/vda --name=b --filename=/dev/vdb >/tmp/f 2>&1 \
        || { tail -40 /tmp/f; exit 1; }\n\
        echo round-$i-ok $(cut -d' ' -f1 /proc/uptime)\ndone\n\
        if dmesg | grep -i 'error'; then echo guest-saw-errors; exit 2; fi\necho all-ok\n";
    let reconnect = |s: &Path| {
        let mut d = BlkDisk::new(s, 2);
        d.reconnect_secs = Some(1);
        d
    };
    let mut guest = Qemu::new(&image)
        .disk(reconnect(&sa))
        .disk(reconnect(&sb))
        .spawn(script)
        .expect("start guest");
    guest
        .wait_for_output("ready", Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("guest did not start: {e}"));

    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let started = Instant::now();
    for k in 0..KILLS {
        std::thread::sleep(Duration::from_millis(rng.gen_range(700..2500)));
        let pause = Duration::from_millis(rng.gen_range(0..600));
        if k % 2 == 0 {
            da.crash_and_restart(&raw, "raw", pause);
        } else {
            db.crash_and_restart(&qc, "qcow2", pause);
        }
        eprintln!("kill {} done at {:?}", k + 1, started.elapsed());
    }
    let run = guest.wait(Duration::from_secs(120)).unwrap_or_else(|e| {
        panic!(
            "guest did not finish: {e}\nraw daemon:\n{}\nqcow2 daemon:\n{}",
            da.log(),
            db.log()
        )
    });
    eprintln!("{}", run.output);
    let resubmitted = (da.resubmitted(), db.resubmitted());
    eprintln!(
        "guest run {:?}; requests resubmitted after restarts: raw {}, qcow2 {}",
        run.total, resubmitted.0, resubmitted.1
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
        resubmitted.0 + resubmitted.1 > 0,
        "no kill hit a request in flight: the test proved nothing\n{}\n{}",
        da.log(),
        db.log()
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
    eprintln!("qemu-img check after the crashes: exit {}", c.code);
    let r = outboard_tests::qemu_check(&qc, &["-r", "leaks"]);
    assert!(r.code == 0, "check -r leaks: {}", r.text);
    outboard_tests::assert_qemu_check_clean(&qc, "after repairing leaks");
}
