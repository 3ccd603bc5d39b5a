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
    qsd_available, BlkClient, BlkQueue, ClientOptions, Daemon, DaemonConfig, Done, Format,
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
    size: u64,
    direct: bool,
    keep: bool,
}

const USAGE: &str = "usage: blk-bench --file PATH [--formats raw,qcow2] [--daemon BIN] [--secs S] \
[--warmup-secs S] [--iodepths 1,32] [--size-mib M] [--direct] [--skip-ours] [--keep]

  --file PATH        scratch image path; PATH.raw and PATH.qcow2 are created
  --formats LIST     image formats to run (default raw,qcow2)
  --daemon BIN       our daemon (default target/release/vhost-user-blk)
  --secs S           measured seconds per run (default 10)
  --warmup-secs S    unmeasured seconds before each run (default 1)
  --iodepths LIST    queue depths (default 1,32)
  --size-mib M       image size (default 1024)
  --direct           O_DIRECT on every side instead of the page cache
  --skip-ours        do not run our daemon
  --keep             keep the images";

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
        size: 1 << 30,
        direct: false,
        keep: false,
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
            "--keep" => a.keep = true,
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
    backend: &'static str,
    format: Format,
    client: &mut BlkClient,
    rows: &mut Vec<Row>,
    notes: &mut Vec<String>,
) {
    let mut hist = Histogram::new();
    for wl in [Workload::RandRead, Workload::RandWrite] {
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

fn run_daemon(
    args: &Args,
    backend: &'static str,
    cfg: &DaemonConfig,
    rows: &mut Vec<Row>,
    notes: &mut Vec<String>,
) {
    let started = match backend {
        "qsd" => Daemon::qsd(cfg),
        _ => Daemon::ours(&args.daemon, cfg),
    };
    let mut daemon = match started {
        Ok(d) => d,
        Err(e) => {
            notes.push(format!("{backend} {}: cannot start: {e}", cfg.format));
            return;
        }
    };
    match daemon.connect(&client_opts(args)) {
        Ok(mut client) => {
            run_all(args, backend, cfg.format, &mut client, rows, notes);
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

fn ratio(v: f64, base: Option<f64>) -> String {
    match base {
        Some(b) if b > 0.0 => format!("{:.2}", v / b),
        _ => "-".into(),
    }
}

fn print_table(rows: &[Row]) {
    let find = |backend: &str, format: Format, wl: Workload, qd: usize| {
        rows.iter()
            .find(|r| r.backend == backend && r.format == format && r.wl == wl && r.qd == qd)
            .map(|r| r.stats.iops)
    };
    println!(
        "{:<8} {:<6} {:<9} {:>4} {:>10} {:>9} {:>9} {:>7} {:>9}",
        "backend", "format", "workload", "QD", "IOPS", "p50 us", "p99 us", "vs qsd", "vs native"
    );
    for r in rows {
        let qsd = find("qsd", r.format, r.wl, r.qd);
        let native = find("native", Format::Raw, r.wl, r.qd);
        println!(
            "{:<8} {:<6} {:<9} {:>4} {:>10.0} {:>9.1} {:>9.1} {:>7} {:>9}",
            r.backend,
            r.format.as_str(),
            r.wl.name(),
            r.qd,
            r.stats.iops,
            r.stats.p50_us,
            r.stats.p99_us,
            ratio(r.stats.iops, qsd),
            ratio(r.stats.iops, native),
        );
    }
}

fn main() {
    let args = parse_args();
    let sockdir = tempfile::tempdir().unwrap_or_else(|e| die(&format!("tempdir: {e}")));
    let mut rows = Vec::new();
    let mut notes = Vec::new();

    let qsd = qsd_available();
    if let Err(e) = &qsd {
        notes.push(format!("qsd skipped: {e}"));
    }
    let ours = if args.skip_ours {
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
    if let Err(e) = prepare_raw(&raw, args.size) {
        die(&e);
    }
    eprintln!("native io_uring on {}", raw.display());
    match BlkClient::open_io_uring(&raw, &client_opts(&args)) {
        Ok(mut c) => run_all(&args, "native", Format::Raw, &mut c, &mut rows, &mut notes),
        Err(e) => notes.push(format!("native: cannot open {}: {e}", raw.display())),
    }

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
        let cfg = DaemonConfig {
            image: image.clone(),
            format,
            socket: sockdir.path().join(format!("{format}.sock")),
            num_queues: 1,
            direct: args.direct,
        };
        if qsd.is_ok() {
            eprintln!("qemu-storage-daemon on {}", image.display());
            run_daemon(&args, "qsd", &cfg, &mut rows, &mut notes);
        }
        if ours {
            eprintln!("{} on {}", args.daemon.display(), image.display());
            run_daemon(&args, "ours", &cfg, &mut rows, &mut notes);
        }
    }

    if !args.keep {
        for f in [Format::Raw, Format::Qcow2] {
            let _ = fs::remove_file(image_path(&args.file, f));
        }
    }

    println!(
        "\nblk-bench: 4 KiB random I/O, 1 queue, {} s per run after {} s warm-up, {} MiB image, {}",
        args.secs,
        args.warmup,
        args.size >> 20,
        if args.direct {
            "O_DIRECT"
        } else {
            "page cache"
        }
    );
    print_table(&rows);
    println!("(native = io_uring on the raw file; qcow2 rows are compared with it too)");
    for n in &notes {
        println!("note: {n}");
    }
}
