//! blk-bench: 4 KiB random read and random write through libblkio against
//! our `vhost-user-blk` daemon, qemu-storage-daemon (`aio=io_uring`) on the
//! same file, and the native io_uring baseline on the file, side by side.
//!
//! ```text
//! cargo build --release -p vhost-user-blk
//! cargo run --release -p outboard-tests --bin blk-bench -- \
//!     --file /var/tmp/blk-bench --formats raw,qcow2 \
//!     --daemon target/release/vhost-user-blk --secs 10 --iodepths 1,32 [--skip-ours]
//! ```
//!
//! - Images: `PATH.raw` (fully written) and `PATH.qcow2` (fully allocated:
//!   `qemu-img create -o preallocation=full` when qemu-img is installed,
//!   otherwise created and written once fully through the qcow2 library).
//!   Both are deleted at the end unless `--keep`.
//! - Every backend is driven by the same client: libblkio with one queue,
//!   the `virtio-blk-vhost-user` driver for the daemons and the `io_uring`
//!   driver on `PATH.raw` for the native baseline (native I/O on a qcow2
//!   container would overwrite its metadata, so the qcow2 rows are compared
//!   with the native raw numbers).
//! - Each run keeps QD requests in flight for `--secs` after a warm-up
//!   (`--warmup-secs`, default 1): a completion immediately resubmits its
//!   slot at a new random 4 KiB-aligned offset. Only requests submitted and
//!   completed inside the measured window are counted. Per-request latency
//!   (submission to reaping) goes into a log-linear histogram (~3%
//!   resolution); the loop allocates nothing.
//! - Page cache by default on every side (qsd `cache.direct=off`, io_uring
//!   buffered); `--direct` uses O_DIRECT everywhere (qsd `cache.direct=on`,
//!   our `--direct`, io_uring `direct=true`). No flushes in the loop.
//! - Daemons run as child processes with one queue, are stopped at the end
//!   of their runs (and on errors), and their logs are kept next to their
//!   sockets in a temporary directory that is removed at the end.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use outboard_tests::blkio_client::{
    ours_command, qsd_available, BlkClient, BlkQueue, ClientOptions, Daemon, DaemonConfig, Done,
    Format,
};

const BS: usize = 4096;

#[derive(Debug, Clone)]
struct Args {
    file: PathBuf,
    formats: Vec<Format>,
    daemon: PathBuf,
    secs: f64,
    warmup: f64,
    iodepths: Vec<usize>,
    skip_ours: bool,
    backends: Vec<String>,
    workloads: Vec<Workload>,
    ours_args: Vec<String>,
    ours_b_args: Vec<String>,
    size: u64,
    direct: bool,
    keep: bool,
    reuse: bool,
    rounds: usize,
    pin: Option<(usize, usize)>,
}

const USAGE: &str = "usage: blk-bench --file PATH [--formats raw,qcow2] [--daemon BIN] [--secs S] \
[--warmup-secs S] [--iodepths 1,32] [--size-mib M] [--direct] [--skip-ours] [--keep] [--reuse] [--rounds N] [--pin C,D]
       [--backends native,qsd,ours] [--workloads randread,randwrite] [--ours-arg ARG]...

  --file PATH        scratch image path; PATH.raw and PATH.qcow2 are created
  --formats LIST     image formats to run (default raw,qcow2)
  --daemon BIN       our daemon (default target/release/vhost-user-blk)
  --secs S           measured seconds per run (default 10)
  --warmup-secs S    unmeasured seconds before each run (default 1)
  --iodepths LIST    queue depths (default 1,32)
  --size-mib M       image size (default 1024)
  --direct           O_DIRECT on every side instead of the page cache
  --skip-ours        do not run our daemon
  --backends LIST    backends to run (default native,qsd,ours)
  --workloads LIST   workloads to run (default randread,randwrite)
  --ours-arg ARG     extra argument for our daemon (repeat), e.g. --ours-arg --poll-us=50
  --ours-b-arg ARG   extra argument for backend `ours-b`: our daemon again, for A/B runs
                     (--backends qsd,ours,ours-b --ours-b-arg --poll-us=50)
  --keep             keep the images
  --pin C,D          run the client on CPU C and every daemon thread on CPU D (the native
                     baseline then runs on C only)
  --rounds N         run every backend N times, interleaved (native, qsd, ours, native, ...);
                     the table shows medians, ratios are medians of same-round ratios
  --reuse            keep, and reuse a PATH.raw of the right size from an earlier --keep run";

fn die(msg: &str) -> ! {
    eprintln!("blk-bench: {msg}\n{USAGE}");
    std::process::exit(2);
}

fn parse_args() -> Args {
    let mut a = Args {
        file: PathBuf::new(),
        formats: vec![Format::Raw, Format::Qcow2],
        daemon: PathBuf::from("target/release/vhost-user-blk"),
        secs: 10.0,
        warmup: 1.0,
        iodepths: vec![1, 32],
        skip_ours: false,
        backends: vec!["native".into(), "qsd".into(), "ours".into()],
        workloads: vec![Workload::RandRead, Workload::RandWrite],
        ours_args: Vec::new(),
        ours_b_args: Vec::new(),
        size: 1 << 30,
        direct: false,
        keep: false,
        reuse: false,
        rounds: 1,
        pin: None,
    };
    let mut file = None;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = |name: &str| {
            it.next()
                .unwrap_or_else(|| die(&format!("{name} needs a value")))
        };
        match arg.as_str() {
            "--file" => file = Some(PathBuf::from(val("--file"))),
            "--formats" => {
                a.formats = val("--formats")
                    .split(',')
                    .map(|f| Format::parse(f).unwrap_or_else(|| die(&format!("bad format {f}"))))
                    .collect()
            }
            "--daemon" => a.daemon = PathBuf::from(val("--daemon")),
            "--secs" => a.secs = val("--secs").parse().unwrap_or_else(|_| die("bad --secs")),
            "--warmup-secs" => {
                a.warmup = val("--warmup-secs")
                    .parse()
                    .unwrap_or_else(|_| die("bad --warmup-secs"))
            }
            "--iodepths" => {
                a.iodepths = val("--iodepths")
                    .split(',')
                    .map(|d| match d.parse::<usize>() {
                        Ok(n) if (1..=1024).contains(&n) => n,
                        _ => die(&format!("bad queue depth {d}")),
                    })
                    .collect()
            }
            "--size-mib" => {
                a.size = val("--size-mib")
                    .parse::<u64>()
                    .unwrap_or_else(|_| die("bad --size-mib"))
                    << 20
            }
            "--direct" => a.direct = true,
            "--skip-ours" => a.skip_ours = true,
            "--backends" => {
                a.backends = val("--backends")
                    .split(',')
                    .map(|b| match b {
                        "native" | "qsd" | "ours" | "ours-b" => b.to_string(),
                        _ => die(&format!("bad backend {b}")),
                    })
                    .collect()
            }
            "--workloads" => {
                a.workloads = val("--workloads")
                    .split(',')
                    .map(|w| match w {
                        "randread" => Workload::RandRead,
                        "randwrite" => Workload::RandWrite,
                        _ => die(&format!("bad workload {w}")),
                    })
                    .collect()
            }
            "--ours-arg" => a.ours_args.push(val("--ours-arg")),
            "--ours-b-arg" => a.ours_b_args.push(val("--ours-b-arg")),
            "--keep" => a.keep = true,
            "--reuse" => a.reuse = true,
            "--pin" => {
                let v = val("--pin");
                let cpus: Vec<usize> = v.split(',').filter_map(|c| c.parse().ok()).collect();
                match cpus[..] {
                    [c, d] if c < 1024 && d < 1024 => a.pin = Some((c, d)),
                    _ => die("bad --pin (CLIENT_CPU,DAEMON_CPU)"),
                }
            }
            "--rounds" => {
                a.rounds = match val("--rounds").parse::<usize>() {
                    Ok(n) if (1..=100).contains(&n) => n,
                    _ => die("bad --rounds"),
                }
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => die(&format!("unknown argument {other}")),
        }
    }
    a.file = file.unwrap_or_else(|| die("--file is required"));
    if a.secs <= 0.0 || a.warmup < 0.0 {
        die("--secs must be positive and --warmup-secs not negative");
    }
    if a.size < (16 << 20) {
        die("--size-mib must be at least 16");
    }
    a
}

// ---------------------------------------------------------------------------
// Latency histogram: log-linear buckets, 32 per power of two.
// ---------------------------------------------------------------------------

const SUB_BITS: u32 = 5;
const SUB: usize = 1 << SUB_BITS;

struct Histogram {
    buckets: Vec<u64>,
    count: u64,
}

impl Histogram {
    fn new() -> Self {
        Histogram {
            buckets: vec![0; (64 + 2) * SUB],
            count: 0,
        }
    }

    fn index(v: u64) -> usize {
        if v < 2 * SUB as u64 {
            return v as usize;
        }
        let msb = 63 - v.leading_zeros();
        let exp = msb - SUB_BITS;
        let mantissa = (v >> exp) as usize; // in [SUB, 2 * SUB)
        exp as usize * SUB + mantissa
    }

    /// Midpoint of bucket `i`.
    fn value(i: usize) -> u64 {
        if i < 2 * SUB {
            return i as u64;
        }
        let exp = (i / SUB - 1) as u32;
        let mantissa = (i % SUB + SUB) as u64;
        let lo = mantissa << exp;
        let hi = ((mantissa + 1) << exp) - 1;
        lo + (hi - lo) / 2
    }

    fn record(&mut self, ns: u64) {
        self.buckets[Self::index(ns)] += 1;
        self.count += 1;
    }

    fn clear(&mut self) {
        self.buckets.fill(0);
        self.count = 0;
    }

    /// The value at quantile `q` (0..=1), in nanoseconds.
    fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let target = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (i, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= target {
                return Self::value(i);
            }
        }
        Self::value(self.buckets.len() - 1)
    }
}

// ---------------------------------------------------------------------------
// The submission loop
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Workload {
    RandRead,
    RandWrite,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::RandRead => "randread",
            Workload::RandWrite => "randwrite",
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Stats {
    iops: f64,
    p50_us: f64,
    p99_us: f64,
}

/// xorshift64*: a tiny allocation-free generator for the offsets.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn submit(q: &mut BlkQueue, wl: Workload, rng: &mut Rng, blocks: u64, slot: usize) {
    let off = (rng.next() % blocks) * BS as u64;
    let r = match wl {
        Workload::RandRead => q.submit_read(off, slot * BS, BS, slot),
        Workload::RandWrite => q.submit_write(off, slot * BS, BS, slot, false),
    };
    if let Err(e) = r {
        panic!("submit {} at {off}: {e}", wl.name());
    }
}

/// Keeps `qd` requests in flight on queue 0 for `warmup + secs` seconds and
/// measures the last `secs`.
fn run(
    client: &mut BlkClient,
    wl: Workload,
    qd: usize,
    warmup: Duration,
    secs: Duration,
    hist: &mut Histogram,
) -> Result<Stats, String> {
    let blocks = client.capacity() / BS as u64;
    let q = client.queue(0);
    if q.buf_len() < qd * BS {
        return Err(format!(
            "queue buffer {} too small for QD {qd}",
            q.buf_len()
        ));
    }
    // Distinct, non-zero data in every slot for writes.
    for (i, b) in q.buf_mut()[..qd * BS].iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31).wrapping_add(7);
    }
    hist.clear();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (qd as u64) << 8 ^ wl as u64);
    let mut started = vec![Instant::now(); qd];
    let mut done: Vec<Done> = Vec::with_capacity(qd.max(256));
    let t0 = Instant::now();
    let measure_from = t0 + warmup;
    let end = measure_from + secs;
    for (slot, s) in started.iter_mut().enumerate() {
        *s = Instant::now();
        submit(q, wl, &mut rng, blocks, slot);
    }
    let mut errors = 0u64;
    let mut stopping = false;
    while q.in_flight() > 0 {
        // A backend that died would never complete: give up after 10 s.
        q.reap(1, &mut done, Some(Duration::from_secs(10)))
            .map_err(|e| format!("{} QD{qd}: {e}", wl.name()))?;
        let now = Instant::now();
        if !stopping && now >= end {
            stopping = true;
        }
        for d in done.iter() {
            let slot = d.user_data;
            if d.ret < 0 {
                errors += 1;
            } else if started[slot] >= measure_from && now <= end {
                let ns = now.duration_since(started[slot]).as_nanos();
                hist.record(u64::try_from(ns).unwrap_or(u64::MAX));
            }
            if !stopping {
                started[slot] = now;
                submit(q, wl, &mut rng, blocks, slot);
            }
        }
    }
    if errors > 0 {
        return Err(format!("{} QD{qd}: {errors} requests failed", wl.name()));
    }
    Ok(Stats {
        iops: hist.count as f64 / secs.as_secs_f64(),
        p50_us: hist.quantile(0.50) as f64 / 1000.0,
        p99_us: hist.quantile(0.99) as f64 / 1000.0,
    })
}

// ---------------------------------------------------------------------------
// Images
// ---------------------------------------------------------------------------

fn image_path(base: &Path, f: Format) -> PathBuf {
    let mut s = base.as_os_str().to_owned();
    s.push(".");
    s.push(f.as_str());
    PathBuf::from(s)
}

fn prepare_raw(path: &Path, size: u64) -> Result<(), String> {
    let f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)
        .map_err(|e| format!("create {}: {e}", path.display()))?;
    let mut chunk = vec![0u8; 1 << 20];
    for (i, b) in chunk.iter_mut().enumerate() {
        *b = (i as u8) ^ 0x5a;
    }
    let mut off = 0;
    while off < size {
        chunk[..8].copy_from_slice(&off.to_le_bytes());
        let n = (size - off).min(chunk.len() as u64) as usize;
        f.write_all_at(&chunk[..n], off)
            .map_err(|e| format!("write {}: {e}", path.display()))?;
        off += n as u64;
    }
    f.sync_all()
        .map_err(|e| format!("sync {}: {e}", path.display()))?;
    Ok(())
}

fn prepare_qcow2(path: &Path, size: u64) -> Result<String, String> {
    let _ = fs::remove_file(path);
    let qemu = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o", "preallocation=full"])
        .arg(path)
        .arg(size.to_string())
        .output();
    match qemu {
        Ok(o) if o.status.success() => {
            return Ok("qemu-img create -o preallocation=full".into());
        }
        Ok(o) => eprintln!(
            "qemu-img create failed ({}), writing the image through the qcow2 library: {}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(_) => eprintln!("qemu-img not found; writing the image through the qcow2 library"),
    }
    let _ = fs::remove_file(path);
    let opts = qcow2::CreateOptions {
        size,
        ..Default::default()
    };
    qcow2::Qcow2::create(path, &opts).map_err(|e| format!("create {}: {e}", path.display()))?;
    let img = qcow2::Qcow2::open(path, &qcow2::OpenOptions::default())
        .map_err(|e| format!("open {}: {e}", path.display()))?;
    let mut chunk = vec![0u8; 1 << 20];
    for (i, b) in chunk.iter_mut().enumerate() {
        *b = (i as u8) ^ 0xa5;
    }
    let mut off = 0;
    while off < size {
        let n = (size - off).min(chunk.len() as u64) as usize;
        img.write_at(&chunk[..n], off)
            .map_err(|e| format!("write {} at {off}: {e}", path.display()))?;
        off += n as u64;
    }
    img.flush()
        .map_err(|e| format!("flush {}: {e}", path.display()))?;
    Ok("written once fully through the qcow2 library".into())
}

// ---------------------------------------------------------------------------
// Runs and the table
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Row {
    round: usize,
    backend: &'static str,
    format: Format,
    wl: Workload,
    qd: usize,
    stats: Stats,
}

fn client_opts(args: &Args) -> ClientOptions {
    let maxqd = args.iodepths.iter().copied().max().unwrap_or(1);
    ClientOptions {
        num_queues: 1,
        // 3 descriptors per request without indirect descriptors.
        queue_size: Some(((maxqd * 4).next_power_of_two()).clamp(128, 32768) as u32),
        buf_size: maxqd * BS,
        read_only: false,
        direct: args.direct,
    }
}

/// Runs every workload and depth on `client`, appending rows.
fn run_all(
    args: &Args,
    round: usize,
    backend: &'static str,
    format: Format,
    client: &mut BlkClient,
    rows: &mut Vec<Row>,
    notes: &mut Vec<String>,
) {
    let mut hist = Histogram::new();
    for &wl in &args.workloads {
        for &qd in &args.iodepths {
            eprint!("  {backend:<8} {format:<5} {:<9} QD{qd:<3} ... ", wl.name());
            let _ = std::io::stderr().flush();
            match run(
                client,
                wl,
                qd,
                Duration::from_secs_f64(args.warmup),
                Duration::from_secs_f64(args.secs),
                &mut hist,
            ) {
                Ok(stats) => {
                    eprintln!(
                        "{:.0} IOPS, p50 {:.1} us, p99 {:.1} us",
                        stats.iops, stats.p50_us, stats.p99_us
                    );
                    rows.push(Row {
                        round,
                        backend,
                        format,
                        wl,
                        qd,
                        stats,
                    });
                }
                Err(e) => {
                    eprintln!("failed");
                    notes.push(format!("{backend} {format}: {e}"));
                    return;
                }
            }
        }
    }
}

/// Restricts thread or process `tid` (0: the calling thread) to `cpu`.
fn pin_to(tid: libc::pid_t, cpu: usize) -> std::io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET stays in
    // bounds for cpu < 1024 (checked when parsing --pin).
    let r = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn run_daemon(
    args: &Args,
    round: usize,
    backend: &'static str,
    cfg: &DaemonConfig,
    rows: &mut Vec<Row>,
    notes: &mut Vec<String>,
) {
    // A child inherits the CPU affinity of the thread that starts it, and
    // its threads that of their creator: start the daemon from CPU D.
    if let Some((_, cpu)) = args.pin {
        if let Err(e) = pin_to(0, cpu) {
            notes.push(format!("{backend}: cannot pin to CPU {cpu}: {e}"));
        }
    }
    let started = match backend {
        "qsd" => Daemon::qsd(cfg),
        _ => {
            let mut c = ours_command(&args.daemon, cfg);
            c.args(if backend == "ours-b" {
                &args.ours_b_args
            } else {
                &args.ours_args
            });
            Daemon::spawn("vhost-user-blk", c, &cfg.socket, Duration::from_secs(10))
        }
    };
    if let Some((cpu, _)) = args.pin {
        if let Err(e) = pin_to(0, cpu) {
            die(&format!("cannot pin the client back to CPU {cpu}: {e}"));
        }
    }
    let mut daemon = match started {
        Ok(d) => d,
        Err(e) => {
            notes.push(format!("{backend} {}: cannot start: {e}", cfg.format));
            return;
        }
    };
    match daemon.connect(&client_opts(args)) {
        Ok(mut client) => {
            run_all(args, round, backend, cfg.format, &mut client, rows, notes);
        }
        Err(e) => notes.push(format!(
            "{backend} {}: cannot connect: {e}\n{}",
            cfg.format,
            daemon.log_text()
        )),
    }
    if let Some(st) = daemon.stop() {
        if !st.success() && st.code().is_some() {
            notes.push(format!("{backend} {} exited with {st}", cfg.format));
        }
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn print_table(rows: &[Row]) {
    let same = |a: &Row, b: &Row| {
        a.backend == b.backend && a.format == b.format && a.wl == b.wl && a.qd == b.qd
    };
    let find = |round: usize, backend: &str, format: Format, wl: Workload, qd: usize| {
        rows.iter()
            .find(|r| {
                r.round == round
                    && r.backend == backend
                    && r.format == format
                    && r.wl == wl
                    && r.qd == qd
            })
            .map(|r| r.stats.iops)
    };
    // Same-round ratios against `base`, and their median.
    let ratios = |r: &Row, base: &str, format: Format| {
        let v: Vec<f64> = rows
            .iter()
            .filter(|x| same(x, r))
            .filter_map(|x| {
                let b = find(x.round, base, format, x.wl, x.qd)?;
                (b > 0.0).then(|| x.stats.iops / b)
            })
            .collect();
        let m = median(v.clone());
        (v, m)
    };
    let fmt = |m: Option<f64>| m.map_or("-".to_string(), |m| format!("{m:.2}"));
    let rounds = rows.iter().map(|r| r.round).max().map_or(0, |m| m + 1);
    println!(
        "{:<8} {:<6} {:<9} {:>4} {:>10} {:>9} {:>9} {:>7} {:>9}",
        "backend", "format", "workload", "QD", "IOPS", "p50 us", "p99 us", "vs qsd", "vs native"
    );
    let mut per_round = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        if rows[..i].iter().any(|x| same(x, r)) {
            continue;
        }
        let all: Vec<&Row> = rows.iter().filter(|x| same(x, r)).collect();
        let med = |f: fn(&Stats) -> f64| median(all.iter().map(|x| f(&x.stats)).collect());
        let (vq, mq) = ratios(r, "qsd", r.format);
        let (vn, mn) = ratios(r, "native", Format::Raw);
        println!(
            "{:<8} {:<6} {:<9} {:>4} {:>10.0} {:>9.1} {:>9.1} {:>7} {:>9}",
            r.backend,
            r.format.as_str(),
            r.wl.name(),
            r.qd,
            med(|s| s.iops).unwrap_or(0.0),
            med(|s| s.p50_us).unwrap_or(0.0),
            med(|s| s.p99_us).unwrap_or(0.0),
            fmt(mq),
            fmt(mn),
        );
        if rounds > 1 && r.backend.starts_with("ours") {
            let list = |v: &[f64]| {
                v.iter()
                    .map(|x| format!("{x:.2}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            per_round.push(format!(
                "{} {} {} QD{}: vs qsd [{}], vs native [{}]",
                r.backend,
                r.format.as_str(),
                r.wl.name(),
                r.qd,
                list(&vq),
                list(&vn)
            ));
        }
    }
    if rounds > 1 {
        println!("({rounds} rounds: medians; ratios are medians of same-round ratios)");
        for l in per_round {
            println!("{l}");
        }
    }
}

fn main() {
    let args = parse_args();
    let sockdir = tempfile::tempdir().unwrap_or_else(|e| die(&format!("tempdir: {e}")));
    let mut rows = Vec::new();
    let mut notes = Vec::new();

    let run_native = args.backends.iter().any(|b| b == "native");
    let qsd = if args.backends.iter().any(|b| b == "qsd") {
        qsd_available()
    } else {
        Err("not in --backends".into())
    };
    if let Err(e) = &qsd {
        notes.push(format!("qsd skipped: {e}"));
    }
    let ours_b = args.daemon.is_file() && args.backends.iter().any(|b| b == "ours-b");
    let ours = if args.skip_ours || !args.backends.iter().any(|b| b == "ours") {
        notes.push("ours skipped: --skip-ours".into());
        false
    } else if !args.daemon.is_file() {
        notes.push(format!(
            "ours skipped: {} not found (cargo build --release -p vhost-user-blk)",
            args.daemon.display()
        ));
        false
    } else {
        true
    };

    // The native baseline always runs on the raw image.
    let raw = image_path(&args.file, Format::Raw);
    eprintln!(
        "preparing {} ({} MiB, fully written)",
        raw.display(),
        args.size >> 20
    );
    let reusable = args.reuse && fs::metadata(&raw).is_ok_and(|m| m.len() == args.size);
    if !reusable {
        if let Err(e) = prepare_raw(&raw, args.size) {
            die(&e);
        }
    }
    if let Some((cpu, _)) = args.pin {
        if let Err(e) = pin_to(0, cpu) {
            die(&format!("cannot pin the client to CPU {cpu}: {e}"));
        }
    }
    let mut daemons = Vec::new();
    for &format in &args.formats {
        let image = image_path(&args.file, format);
        if format == Format::Qcow2 {
            eprintln!("preparing {} ({} MiB)", image.display(), args.size >> 20);
            match prepare_qcow2(&image, args.size) {
                Ok(how) => notes.push(format!("qcow2 image: {how}")),
                Err(e) => {
                    notes.push(format!("qcow2 skipped: {e}"));
                    continue;
                }
            }
        }
        daemons.push(DaemonConfig {
            image: image.clone(),
            format,
            socket: sockdir.path().join(format!("{format}.sock")),
            num_queues: 1,
            direct: args.direct,
        });
    }

    for round in 0..args.rounds {
        if args.rounds > 1 {
            eprintln!("round {}/{}", round + 1, args.rounds);
        }
        if run_native {
            eprintln!("native io_uring on {}", raw.display());
            match BlkClient::open_io_uring(&raw, &client_opts(&args)) {
                Ok(mut c) => run_all(
                    &args,
                    round,
                    "native",
                    Format::Raw,
                    &mut c,
                    &mut rows,
                    &mut notes,
                ),
                Err(e) => notes.push(format!("native: cannot open {}: {e}", raw.display())),
            }
        }
        for cfg in &daemons {
            if qsd.is_ok() {
                eprintln!("qemu-storage-daemon on {}", cfg.image.display());
                run_daemon(&args, round, "qsd", cfg, &mut rows, &mut notes);
            }
            if ours {
                eprintln!("{} on {}", args.daemon.display(), cfg.image.display());
                run_daemon(&args, round, "ours", cfg, &mut rows, &mut notes);
            }
            if ours_b {
                eprintln!("{} (b) on {}", args.daemon.display(), cfg.image.display());
                run_daemon(&args, round, "ours-b", cfg, &mut rows, &mut notes);
            }
        }
    }

    if !args.keep && !args.reuse {
        for f in [Format::Raw, Format::Qcow2] {
            let _ = fs::remove_file(image_path(&args.file, f));
        }
    }

    println!(
        "\nblk-bench: 4 KiB random I/O, 1 queue, {} s per run after {} s warm-up, {} MiB image, {}, {} round(s)",
        args.secs,
        args.warmup,
        args.size >> 20,
        if args.direct {
            "O_DIRECT"
        } else {
            "page cache"
        },
        args.rounds
    );
    print_table(&rows);
    println!("(native = io_uring on the raw file; qcow2 rows are compared with it too)");
    for n in &notes {
        println!("note: {n}");
    }
}
