//! Crash test: a child process (this test binary re-executed in child mode)
//! writes, zeroes, discards and creates/deletes snapshots in seeded steps,
//! calling `flush()` after each step and printing `@@flushed <step>`; the
//! parent SIGKILLs it at a random moment and then checks that
//! - `qemu-img check` finds no corruption (exit 0, or 3 for leaks only) and
//!   `qemu-img check -r leaks` makes it clean;
//! - every byte written by a flushed step is there, except where a later
//!   (unflushed, possibly half-done) step touched it;
//! - snapshots created by flushed steps are listed (and deleted ones are
//!   not), and the newest one holds exactly its content;
//! - the library reads the same, and its own leak repair leaves the image
//!   clean for qemu-img.
//!
//! A SIGKILL loses nothing that reached the kernel, so this checks the
//! ordering of the library's writes as seen by a crash of the process (the
//! `fdatasync` barriers are what extends it to power loss).

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outboard_tests::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const CHILD_ENV: &str = "OUTBOARD_CRASH_CHILD";
const CHILD_TEST: &str = "crash_child";
const MARK: &str = "@@flushed ";
const MAX_STEPS: u32 = 300;
const SIZE: u64 = 4 << 20;

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: u64, stream: u64 },
    Zero { off: u64, len: u64 },
    Discard { off: u64, len: u64 },
    Snapshot(String),
    DeleteSnapshot(String),
}

/// The deterministic operations of one step. `live` is the list of
/// snapshots existing before the step (creation order).
fn step_ops(seed: u64, step: u32, cluster: u64, live: &[String]) -> Vec<Op> {
    let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(1_000_003).wrapping_add(step as u64));
    let mut ops = Vec::new();
    for k in 0..rng.gen_range(1..=4) {
        let len = match rng.gen_range(0..3) {
            0 => rng.gen_range(1..=4096u64),
            1 => cluster * rng.gen_range(1..=3u64),
            _ => rng.gen_range(1..=200_000u64),
        }
        .min(SIZE);
        let off = if rng.gen_bool(0.5) {
            rng.gen_range(0..=(SIZE - len) / cluster) * cluster
        } else {
            rng.gen_range(0..=SIZE - len)
        };
        ops.push(match rng.gen_range(0..10) {
            0 => Op::Zero { off, len },
            1 => Op::Discard { off, len },
            _ => Op::Write {
                off,
                len,
                stream: ((step as u64) << 8) | k,
            },
        });
    }
    if step % 6 == 5 {
        ops.push(Op::Snapshot(format!("c{step}")));
    }
    if step % 11 == 10 && live.len() > 2 {
        ops.push(Op::DeleteSnapshot(
            live[rng.gen_range(0..live.len())].clone(),
        ));
    }
    ops
}

/// Replays steps; returns the model and the live snapshots with content.
struct Replay {
    disk: Vec<u8>,
    snaps: Vec<(String, Vec<u8>)>,
    cluster: u64,
    seed: u64,
}

impl Replay {
    fn new(seed: u64, cluster: u64) -> Self {
        Replay {
            disk: vec![0; SIZE as usize],
            snaps: Vec::new(),
            cluster,
            seed,
        }
    }
    fn live(&self) -> Vec<String> {
        self.snaps.iter().map(|s| s.0.clone()).collect()
    }
    fn ops(&self, step: u32) -> Vec<Op> {
        step_ops(self.seed, step, self.cluster, &self.live())
    }
    fn apply(&mut self, ops: &[Op]) {
        for op in ops {
            match op {
                Op::Write { off, len, stream } => {
                    let d = pattern(self.seed, *stream, *len as usize);
                    self.disk[*off as usize..(*off + *len) as usize].copy_from_slice(&d);
                }
                Op::Zero { off, len } => self.disk[*off as usize..(*off + *len) as usize].fill(0),
                Op::Discard { off, len } => {
                    let s = off.next_multiple_of(self.cluster);
                    let e = (off + len) / self.cluster * self.cluster;
                    if e > s {
                        self.disk[s as usize..e as usize].fill(0);
                    }
                }
                Op::Snapshot(n) => self.snaps.push((n.clone(), self.disk.clone())),
                Op::DeleteSnapshot(n) => self.snaps.retain(|s| &s.0 != n),
            }
        }
    }
}

/// Child mode: run the steps until killed (or done).
#[test]
#[ignore = "started as a child process by crash_at_random_points"]
fn crash_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return; // a normal test run: nothing to do
    };
    let mut parts = spec.split(';');
    let path = parts.next().expect("path").to_string();
    let seed: u64 = parts.next().expect("seed").parse().expect("seed");
    let cluster: u64 = parts.next().expect("cluster").parse().expect("cluster");
    let img = open_rw(Path::new(&path));
    let mut replay = Replay::new(seed, cluster);
    for step in 0..MAX_STEPS {
        let ops = replay.ops(step);
        for op in &ops {
            let r = match op {
                Op::Write { off, len, stream } => {
                    img.write_at(&pattern(seed, *stream, *len as usize), *off)
                }
                Op::Zero { off, len } => img.write_zeroes(*off, *len),
                Op::Discard { off, len } => img.discard(*off, *len),
                Op::Snapshot(n) => img.snapshot_create(n).map(|_| ()),
                Op::DeleteSnapshot(n) => img.snapshot_delete(n),
            };
            r.unwrap_or_else(|e| panic!("child step {step}: {op:?}: {e}"));
        }
        replay.apply(&ops);
        img.flush()
            .unwrap_or_else(|e| panic!("child step {step}: flush: {e}"));
        println!("{MARK}{step}");
    }
}

struct ChildRun {
    last_flushed: Option<u32>,
    exited_by_itself: bool,
}

fn run_child(path: &Path, seed: u64, cluster: u64, kill_after: Duration) -> ChildRun {
    let exe = std::env::current_exe().expect("current_exe");
    let mut child = Command::new(exe)
        .args([
            "--exact",
            CHILD_TEST,
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, format!("{};{seed};{cluster}", path.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn child");
    let last = Arc::new(Mutex::new(None::<u32>));
    let out = child.stdout.take().expect("stdout");
    let last2 = Arc::clone(&last);
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if let Some(i) = line.find(MARK) {
                let n: String = line[i + MARK.len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_digit())
                    .collect();
                if let Ok(n) = n.parse() {
                    *last2.lock().expect("lock") = Some(n);
                }
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let mut err = child.stderr.take().expect("stderr");
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let mut exited = None;
    while start.elapsed() < kill_after {
        if let Some(st) = child.try_wait().expect("try_wait") {
            exited = Some(st);
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    if exited.is_none() {
        child.kill().expect("SIGKILL child"); // std sends SIGKILL on Unix
    }
    child.wait().expect("wait child");
    let stdout = reader.join().expect("stdout reader");
    let stderr = err_reader.join().expect("stderr reader");
    if let Some(st) = exited {
        assert!(
            st.success(),
            "crash child failed on its own ({st}):\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
        );
    }
    let last_flushed = *last.lock().expect("lock");
    ChildRun {
        last_flushed,
        exited_by_itself: exited.is_some(),
    }
}

fn check_after_crash(path: &Path, seed: u64, cluster: u64, run: &ChildRun, ctx: &str) {
    // 1. qemu-img: no corruption (leaks allowed).
    let c = qemu_check(path, &[]);
    assert!(
        c.code == 0 || c.code == 3,
        "{ctx}: qemu-img check after the crash (exit {}):\n{}",
        c.code,
        c.text
    );
    // 2. Expected content: flushed steps, minus what unflushed steps touched.
    let mut replay = Replay::new(seed, cluster);
    let flushed_steps = run.last_flushed.map_or(0, |k| k + 1);
    for step in 0..flushed_steps {
        let ops = replay.ops(step);
        replay.apply(&ops);
    }
    let mut dont_care = vec![false; SIZE as usize];
    let mut maybe_snaps = Vec::new();
    let mut speculative = Replay {
        disk: Vec::new(),
        snaps: replay.snaps.clone(),
        cluster,
        seed,
    };
    for step in flushed_steps..(flushed_steps + 2).min(MAX_STEPS) {
        let ops = speculative.ops(step);
        for op in &ops {
            match op {
                Op::Write { off, len, .. } | Op::Zero { off, len } | Op::Discard { off, len } => {
                    dont_care[*off as usize..(*off + *len) as usize].fill(true);
                }
                Op::Snapshot(n) | Op::DeleteSnapshot(n) => maybe_snaps.push(n.clone()),
            }
        }
        for op in &ops {
            match op {
                Op::Snapshot(n) => speculative.snaps.push((n.clone(), Vec::new())),
                Op::DeleteSnapshot(n) => speculative.snaps.retain(|s| &s.0 != n),
                _ => {}
            }
        }
    }
    let compare = |actual: &[u8], who: &str| {
        let mut expected = replay.disk.clone();
        let mut got = actual.to_vec();
        for (i, dc) in dont_care.iter().enumerate() {
            if *dc {
                expected[i] = 0;
                got[i] = 0;
            }
        }
        assert_bytes_eq(
            &expected,
            &got,
            &format!(
                "{ctx}: {who} content after the crash (flushed steps masked by unflushed ones)"
            ),
        );
    };
    compare(&qemu_read_all(path, "qcow2"), "qemu-img");
    // 3. Snapshots: every one live after the last flushed step is listed;
    // only snapshots touched by unflushed steps may differ.
    let names = qemu_snapshot_names(path);
    for (n, _) in &replay.snaps {
        if !maybe_snaps.contains(n) {
            assert!(
                names.contains(n),
                "{ctx}: flushed snapshot {n} missing; qemu-img lists {names:?}"
            );
        }
    }
    let live = replay.live();
    for n in &names {
        assert!(
            live.contains(n) || maybe_snaps.contains(n),
            "{ctx}: snapshot {n} listed but it was deleted by a flushed step (or never made); live: {live:?}"
        );
    }
    if let Some((n, data)) = replay
        .snaps
        .iter()
        .rev()
        .find(|(n, _)| !maybe_snaps.contains(n))
    {
        assert_bytes_eq(
            data,
            &qemu_snapshot_content(path, n),
            &format!("{ctx}: content of snapshot {n}"),
        );
    }
    // 4. The library reads the same (read-only: no repair yet).
    {
        let img = open_ro(path);
        let mut all = vec![0u8; SIZE as usize];
        for (i, chunk) in all.chunks_mut(64 << 10).enumerate() {
            let off = i as u64 * (64 << 10);
            img.read_at(chunk, off).unwrap_or_else(|e| {
                panic!(
                    "{ctx}: library read_at({off}, 64 KiB) of the crashed image failed: {e} \
                     (file length {}; qemu-img reads it)",
                    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
                )
            });
        }
        compare(&all, "library");
    }
    // 5. The library's leak repair (on a copy) satisfies qemu-img.
    let dir = tempfile::tempdir().expect("tempdir");
    let copy = copy_to(path, dir.path(), "copy.qcow2");
    {
        let img = open_rw(&copy);
        let r = img
            .check(Some(qcow2::RepairMode::Leaks))
            .unwrap_or_else(|e| panic!("{ctx}: library check -r leaks: {e}"));
        assert_eq!(
            r.exit_code(),
            0,
            "{ctx}: library repair left problems: {r:?}"
        );
    }
    assert_qemu_check_clean(&copy, &format!("{ctx}: after the library repaired leaks"));
    // 6. qemu-img repairs leaks; the result is clean and writable.
    let r = qemu_check(path, &["-r", "leaks"]);
    assert_eq!(r.code, 0, "{ctx}: qemu-img check -r leaks:\n{}", r.text);
    assert_qemu_check_clean(path, &format!("{ctx}: after qemu-img check -r leaks"));
}

#[test]
fn crash_at_random_points() {
    require_qemu_img();
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let configs = [
        (4096u64, 16u32, 3u32),
        (512, 32, 3),
        (65536, 16, 2),
        (1024, 64, 3),
        (8192, 8, 3),
    ];
    let budget = Duration::from_secs(60);
    let start = Instant::now();
    let mut master = StdRng::seed_from_u64(0xc4a5);
    let mut iterations = 0;
    let mut kills = 0;
    let mut flushed_total = 0u64;
    for iter in 0..60u64 {
        if iter >= 12 && start.elapsed() > budget {
            break;
        }
        let (cluster, rbits, version) = configs[iter as usize % configs.len()];
        let seed = 1000 + iter;
        let kill_ms = master.gen_range(5..400u64);
        let ctx = format!(
            "iteration {iter} seed {seed} cluster {cluster} refcount_bits {rbits} v{version} killed after {kill_ms} ms"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("crash.qcow2");
        lib_create(&path, SIZE, cluster, rbits, version);
        let run = run_child(&path, seed, cluster, Duration::from_millis(kill_ms));
        let ctx = format!("{ctx}, last flushed step {:?}", run.last_flushed);
        if !run.exited_by_itself {
            kills += 1;
        }
        flushed_total += run.last_flushed.map_or(0, |k| k as u64 + 1);
        let saved = dir.path().join("as-crashed.qcow2");
        std::fs::copy(&path, &saved).expect("keep a copy of the crashed image");
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            check_after_crash(&path, seed, cluster, &run, &ctx)
        }));
        if let Err(p) = r {
            // Keep the image as the crash left it, for a reproduction.
            let keep = Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .unwrap_or(Path::new("."))
                .join("target")
                .join("crash-failures");
            let _ = std::fs::create_dir_all(&keep);
            let f = keep.join(format!(
                "iter{iter}-seed{seed}-c{cluster}-r{rbits}-v{version}.qcow2"
            ));
            let _ = std::fs::copy(&saved, &f);
            eprintln!("crashed image kept at {}", f.display());
            std::panic::resume_unwind(p);
        }
        iterations += 1;
    }
    eprintln!(
        "crash test: {iterations} iterations, {kills} killed mid-run, {flushed_total} flushed steps in all, {:.1} s",
        start.elapsed().as_secs_f64()
    );
    assert!(
        kills * 2 >= iterations,
        "most children should be killed mid-run ({kills}/{iterations})"
    );
}
