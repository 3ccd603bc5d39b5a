//! qcow2-bench: 4 KiB random reads and allocating random writes through
//! the qcow2 library vs. the same workload with pread/pwrite on a raw file.
//!
//! ```text
//! cargo run --release -p outboard-tests --bin qcow2-bench -- \
//!     [--threads N] [--secs S] [--size-mib M] [--cluster BYTES] [--dir DIR] [--direct]
//! ```
//!
//! Policy: both sides use the same open mode (buffered by default, O_DIRECT
//! with `--direct`); no fsync/flush inside the timed loops; after each write
//! phase one `flush()` / `fdatasync` is timed and reported separately.
//! Every operation counted was issued and completed inside the timed window.

use std::fs::{File, OpenOptions as FsOpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use qcow2::{CreateOptions, OpenOptions, Qcow2};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const BS: usize = 4096;
const O_DIRECT: i32 = 0o40000; // x86_64 / aarch64 Linux

#[derive(Debug, Clone)]
struct Args {
    threads: usize,
    secs: u64,
    size: u64,
    cluster: u64,
    dir: Option<PathBuf>,
    direct: bool,
}

fn parse_args() -> Args {
    let mut a = Args {
        threads: 1,
        secs: 5,
        size: 256 << 20,
        cluster: 65536,
        dir: None,
        direct: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = |name: &str| {
            it.next()
                .unwrap_or_else(|| die(&format!("{name} needs a value")))
        };
        match arg.as_str() {
            "--threads" => {
                a.threads = val("--threads")
                    .parse()
                    .unwrap_or_else(|_| die("bad --threads"))
            }
            "--secs" => a.secs = val("--secs").parse().unwrap_or_else(|_| die("bad --secs")),
            "--size-mib" => {
                a.size = val("--size-mib")
                    .parse::<u64>()
                    .unwrap_or_else(|_| die("bad --size-mib"))
                    << 20
            }
            "--cluster" => {
                a.cluster = val("--cluster")
                    .parse()
                    .unwrap_or_else(|_| die("bad --cluster"))
            }
            "--dir" => a.dir = Some(PathBuf::from(val("--dir"))),
            "--direct" => a.direct = true,
            "-h" | "--help" => {
                println!(
                    "usage: qcow2-bench [--threads N] [--secs S] [--size-mib M] [--cluster BYTES] [--dir DIR] [--direct]"
                );
                std::process::exit(0);
            }
            other => die(&format!("unknown argument {other}")),
        }
    }
    if a.threads == 0 || a.size < (BS as u64) * 16 {
        die("--threads must be >= 1 and --size-mib >= 1");
    }
    a
}

fn die(msg: &str) -> ! {
    eprintln!("qcow2-bench: {msg}");
    std::process::exit(2)
}

/// A 4 KiB buffer aligned for O_DIRECT.
struct Aligned {
    v: Vec<u8>,
    start: usize,
}

impl Aligned {
    fn new() -> Self {
        let v = vec![0u8; BS * 2];
        let start = v.as_ptr().align_offset(BS);
        Aligned { v, start }
    }
    fn buf(&mut self) -> &mut [u8] {
        &mut self.v[self.start..self.start + BS]
    }
}

/// Runs `op(thread, rng, buf)` on `threads` threads for `secs`; returns ops.
fn run_timed<F>(threads: usize, secs: u64, op: F) -> (u64, Duration)
where
    F: Fn(&mut StdRng, &mut [u8]) + Sync,
{
    let stop = AtomicBool::new(false);
    let total = AtomicU64::new(0);
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let (stop, total, op) = (&stop, &total, &op);
            s.spawn(move || {
                let mut rng = StdRng::seed_from_u64(0xbe4c + t as u64);
                let mut b = Aligned::new();
                rng.fill(b.buf());
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    op(&mut rng, b.buf());
                    n += 1;
                }
                total.fetch_add(n, Ordering::Relaxed);
            });
        }
        std::thread::sleep(Duration::from_secs(secs));
        stop.store(true, Ordering::Relaxed);
    });
    // Elapsed includes the last in-flight operations of each thread.
    (total.load(Ordering::Relaxed), start.elapsed())
}

fn open_raw(path: &Path, direct: bool, create: bool) -> File {
    let mut o = FsOpenOptions::new();
    o.read(true).write(true);
    if create {
        o.create(true).truncate(true);
    }
    if direct {
        o.custom_flags(O_DIRECT);
    }
    o.open(path)
        .unwrap_or_else(|e| die(&format!("open {}: {e}", path.display())))
}

fn fill_sequential(write: impl Fn(&[u8], u64), size: u64) {
    let mut rng = StdRng::seed_from_u64(1);
    let mut chunk = Aligned::new();
    let mut off = 0;
    while off < size {
        rng.fill(chunk.buf());
        write(chunk.buf(), off);
        off += BS as u64;
    }
}

fn report(name: &str, ops: u64, d: Duration) -> f64 {
    let iops = ops as f64 / d.as_secs_f64();
    println!(
        "{name:<34} {ops:>10} ops in {:>6.2} s = {iops:>12.0} IOPS",
        d.as_secs_f64()
    );
    iops
}

fn main() {
    let a = parse_args();
    let tmp;
    let dir = match &a.dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::tempdir_in(".").unwrap_or_else(|e| die(&format!("tempdir: {e}")));
            tmp.path().to_path_buf()
        }
    };
    let blocks = a.size / BS as u64;
    println!(
        "qcow2-bench: {} thread(s), {} s per case, {} MiB disk, qcow2 cluster {} B, {} I/O, \
         no fsync in the timed loops, dir {}",
        a.threads,
        a.secs,
        a.size >> 20,
        a.cluster,
        if a.direct { "O_DIRECT" } else { "buffered" },
        dir.display()
    );

    // ---- reads: both files fully written first ----
    let raw_path = dir.join("bench.raw");
    let raw = open_raw(&raw_path, a.direct, true);
    raw.set_len(a.size)
        .unwrap_or_else(|e| die(&format!("set_len: {e}")));
    fill_sequential(
        |b, o| {
            raw.write_all_at(b, o)
                .unwrap_or_else(|e| die(&format!("raw fill: {e}")))
        },
        a.size,
    );
    raw.sync_data()
        .unwrap_or_else(|e| die(&format!("fdatasync: {e}")));
    let qpath = dir.join("bench.qcow2");
    let copts = CreateOptions {
        size: a.size,
        cluster_size: a.cluster,
        ..Default::default()
    };
    Qcow2::create(&qpath, &copts).unwrap_or_else(|e| die(&format!("create: {e}")));
    let oopts = OpenOptions {
        direct: a.direct,
        ..OpenOptions::default()
    };
    let q = Qcow2::open(&qpath, &oopts).unwrap_or_else(|e| die(&format!("open: {e}")));
    fill_sequential(
        |b, o| {
            q.write_at(b, o)
                .unwrap_or_else(|e| die(&format!("qcow2 fill: {e}")))
        },
        a.size,
    );
    q.flush().unwrap_or_else(|e| die(&format!("flush: {e}")));

    let (n, d) = run_timed(a.threads, a.secs, |rng, buf| {
        let off = rng.gen_range(0..blocks) * BS as u64;
        raw.read_exact_at(buf, off)
            .unwrap_or_else(|e| die(&format!("raw read: {e}")));
    });
    let raw_read = report("raw   4k random read (pread)", n, d);
    let (n, d) = run_timed(a.threads, a.secs, |rng, buf| {
        let off = rng.gen_range(0..blocks) * BS as u64;
        q.read_at(buf, off)
            .unwrap_or_else(|e| die(&format!("qcow2 read: {e}")));
    });
    let q_read = report("qcow2 4k random read", n, d);
    drop(q);
    drop(raw);
    let _ = std::fs::remove_file(&raw_path);
    let _ = std::fs::remove_file(&qpath);

    // ---- allocating writes: fresh sparse raw file vs fresh qcow2 ----
    // 64x the disk size so that nearly every write lands in a new cluster.
    let wsize = a.size * 64;
    let wblocks = wsize / BS as u64;
    let raw = open_raw(&raw_path, a.direct, true);
    raw.set_len(wsize)
        .unwrap_or_else(|e| die(&format!("set_len: {e}")));
    let (n, d) = run_timed(a.threads, a.secs, |rng, buf| {
        let off = rng.gen_range(0..wblocks) * BS as u64;
        raw.write_all_at(buf, off)
            .unwrap_or_else(|e| die(&format!("raw write: {e}")));
    });
    let raw_write = report("raw   4k random write (sparse)", n, d);
    let t = Instant::now();
    raw.sync_data()
        .unwrap_or_else(|e| die(&format!("fdatasync: {e}")));
    println!(
        "{:<34} {:>8.1} ms",
        "raw   fdatasync after writes",
        t.elapsed().as_secs_f64() * 1e3
    );
    drop(raw);
    let _ = std::fs::remove_file(&raw_path);

    let copts = CreateOptions {
        size: wsize,
        cluster_size: a.cluster,
        ..Default::default()
    };
    Qcow2::create(&qpath, &copts).unwrap_or_else(|e| die(&format!("create: {e}")));
    let q = Arc::new(Qcow2::open(&qpath, &oopts).unwrap_or_else(|e| die(&format!("open: {e}"))));
    let (n, d) = run_timed(a.threads, a.secs, |rng, buf| {
        let off = rng.gen_range(0..wblocks) * BS as u64;
        q.write_at(buf, off)
            .unwrap_or_else(|e| die(&format!("qcow2 write: {e}")));
    });
    let q_write = report("qcow2 4k allocating random write", n, d);
    let t = Instant::now();
    q.flush().unwrap_or_else(|e| die(&format!("flush: {e}")));
    println!(
        "{:<34} {:>8.1} ms",
        "qcow2 flush after writes",
        t.elapsed().as_secs_f64() * 1e3
    );
    drop(q);
    let _ = std::fs::remove_file(&qpath);

    println!(
        "ratio qcow2/raw: random read {:.2}, allocating random write {:.2}",
        q_read / raw_read,
        q_write / raw_write
    );
}
