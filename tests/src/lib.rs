//! Shared helpers of the outboard integration tests: running `qemu-img` /
//! `qemu-io` as the oracle, deterministic data, byte comparison with a useful
//! report, and header patching for malformed-image tests.
//!
//! The tests themselves live in `tests/*.rs`, one file per theme; the body of
//! the fuzz target lives in [`fuzz_body`] so that `cargo fuzz` and the stable
//! smoke test run the same code. [`blkio_client`] is the libblkio
//! (vhost-user-blk frontend) client and block conformance suite. A test that
//! cannot run here says so through [`skip`], which CI counts and prints.
//! [`raw_frontend`] is a minimal vhost-user frontend of raw messages for
//! tests that play a broken or hostile guest against a running daemon.
//! [`plot`] draws the benchmark charts.

pub mod blkio_client;
pub mod fuzz_blk;
pub mod fuzz_body;
pub mod guest;
pub mod netd;
pub mod netns;
pub mod plot;
pub mod raw_frontend;
pub mod skip;
pub mod testpmd;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use qcow2::{CreateOptions, OpenOptions, Qcow2};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

/// Where CI installs qemu-img (Debian's `qemu-utils`).
pub const QEMU_IMG: &str = "qemu-img";
/// The qemu-io tool from the same package.
pub const QEMU_IO: &str = "qemu-io";

fn tool_version(tool: &str) -> Result<String, String> {
    match Command::new(tool).arg("--version").output() {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .to_string()),
        Ok(o) => Err(format!(
            "`{tool} --version` failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        )),
        Err(e) => Err(format!("cannot run `{tool}`: {e}")),
    }
}

/// Panics with a clear message unless `qemu-img` and `qemu-io` can be run.
/// These tests use them as the oracle, so they must not be skipped silently.
pub fn require_qemu_img() {
    static CHECK: OnceLock<Result<String, String>> = OnceLock::new();
    let r = CHECK.get_or_init(|| {
        let img = tool_version(QEMU_IMG)?;
        tool_version(QEMU_IO)?;
        Ok(img)
    });
    if let Err(e) = r {
        panic!(
            "{e}\nThese tests need qemu-img and qemu-io as the reference implementation; \
             install them with `apt-get install qemu-utils`."
        );
    }
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn run(mut cmd: Command) -> Output {
    require_qemu_img();
    let what = describe(&cmd);
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run `{what}`: {e}"))
}

/// Formats an output for a failure message.
pub fn show(o: &Output) -> String {
    format!(
        "exit status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs `qemu-img ARGS` and returns its output whatever the exit status.
pub fn qemu_img_output<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut c = Command::new(QEMU_IMG);
    c.args(args);
    run(c)
}

/// Runs `qemu-img ARGS`, panicking with its output unless it exits 0.
pub fn qemu_img<I, S>(args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut c = Command::new(QEMU_IMG);
    c.args(args);
    let what = describe(&c);
    let o = run(c);
    assert!(o.status.success(), "`{what}` failed:\n{}", show(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs `qemu-io -f FMT IMAGE -c CMD...` (all commands in one process),
/// panicking unless it succeeds and printed no error.
pub fn qemu_io(fmt: &str, image: &Path, cmds: &[String]) {
    qemu_io_ctx(fmt, image, cmds, "");
}

/// [`qemu_io`] with a context line for the failure message.
pub fn qemu_io_ctx(fmt: &str, image: &Path, cmds: &[String], context: &str) {
    if cmds.is_empty() {
        return;
    }
    let mut c = Command::new(QEMU_IO);
    c.arg("-f").arg(fmt);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    c.arg(image);
    let what = describe(&c);
    let o = run(c);
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    // qemu-io exits 0 even when a command fails; it reports on stdout/stderr.
    let failed = !o.status.success()
        || out.lines().chain(err.lines()).any(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("failed") || l.contains("error") || l.contains("invalid")
        });
    assert!(!failed, "{context}: `{what}` failed:\n{}", show(&o));
}

/// `qemu-img create -f qcow2 -o OPTS PATH SIZE`.
pub fn qemu_create(path: &Path, opts: &str, size: u64) {
    let mut args: Vec<String> = vec!["create".into(), "-q".into(), "-f".into(), "qcow2".into()];
    if !opts.is_empty() {
        args.push("-o".into());
        args.push(opts.into());
    }
    args.push(path.to_string_lossy().into_owned());
    args.push(size.to_string());
    qemu_img(&args);
}

/// Result of `qemu-img check`.
#[derive(Debug)]
pub struct QemuCheck {
    /// Exit code (0 clean, 2 corruption, 3 leaks only, 1 check error).
    pub code: i32,
    /// Combined stdout and stderr.
    pub text: String,
}

/// Runs `qemu-img check [extra] PATH` (qcow2) and returns the exit code and text.
pub fn qemu_check(path: &Path, extra: &[&str]) -> QemuCheck {
    let mut args: Vec<&OsStr> = vec![OsStr::new("check"), OsStr::new("-f"), OsStr::new("qcow2")];
    args.extend(extra.iter().map(OsStr::new));
    args.push(path.as_os_str());
    let o = qemu_img_output(&args);
    QemuCheck {
        code: o.status.code().unwrap_or(-1),
        text: format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    }
}

/// Asserts `qemu-img check` finds no errors and no leaks.
pub fn assert_qemu_check_clean(path: &Path, context: &str) {
    let c = qemu_check(path, &[]);
    assert!(
        c.code == 0 && c.text.contains("No errors were found"),
        "{context}: `qemu-img check {}` is not clean (exit {}):\n{}",
        path.display(),
        c.code,
        c.text
    );
    assert!(
        !c.text.contains("leaked"),
        "{context}: qemu-img check reports leaks:\n{}",
        c.text
    );
}

/// `qemu-img compare -f qcow2 -F raw IMAGE RAW`: panics unless they are equal
/// (and the virtual sizes are the same).
pub fn assert_qemu_compare(image: &Path, raw: &Path, context: &str) {
    let o = qemu_img_output([
        OsStr::new("compare"),
        OsStr::new("-f"),
        OsStr::new("qcow2"),
        OsStr::new("-F"),
        OsStr::new("raw"),
        image.as_os_str(),
        raw.as_os_str(),
    ]);
    assert!(
        o.status.code() == Some(0),
        "{context}: `qemu-img compare {} {}` says they differ:\n{}",
        image.display(),
        raw.display(),
        show(&o)
    );
    let raw_len = fs::metadata(raw).expect("stat raw file").len();
    let vsize = qemu_virtual_size(image);
    assert_eq!(
        vsize, raw_len,
        "{context}: qemu-img reports virtual size {vsize}, expected {raw_len}"
    );
}

/// Writes `data` to a fresh raw file and compares `image` with it.
pub fn assert_qemu_content(image: &Path, data: &[u8], context: &str) {
    let dir = tempfile::tempdir().expect("tempdir for the expected raw file");
    let raw = dir.path().join("expected.raw");
    fs::write(&raw, data).expect("write expected raw file");
    assert_qemu_compare(image, &raw, context);
}

/// `qemu-img info --output json`, parsed.
pub fn qemu_info(image: &Path) -> serde_json::Value {
    let out = qemu_img([
        OsStr::new("info"),
        OsStr::new("--output=json"),
        OsStr::new("-U"),
        image.as_os_str(),
    ]);
    serde_json::from_str(&out).expect("qemu-img info prints JSON")
}

/// Virtual size according to qemu-img.
pub fn qemu_virtual_size(image: &Path) -> u64 {
    qemu_info(image)["virtual-size"]
        .as_u64()
        .expect("virtual-size in qemu-img info")
}

/// Snapshot names as `qemu-img snapshot -l` lists them, in table order.
pub fn qemu_snapshot_names(image: &Path) -> Vec<String> {
    let out = qemu_img([OsStr::new("snapshot"), OsStr::new("-l"), image.as_os_str()]);
    // "Snapshot list:" / "ID  TAG  VM_SIZE  DATE  VM_CLOCK  ICOUNT" / rows
    out.lines()
        .skip_while(|l| !l.trim_start().starts_with("ID"))
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
        .collect()
}

/// Extracts the content of internal snapshot `name` with qemu-img.
pub fn qemu_snapshot_content(image: &Path, name: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("snap.raw");
    qemu_img([
        OsStr::new("convert"),
        OsStr::new("-U"),
        OsStr::new("-f"),
        OsStr::new("qcow2"),
        OsStr::new("-l"),
        OsStr::new(&format!("snapshot.name={name}")),
        OsStr::new("-O"),
        OsStr::new("raw"),
        image.as_os_str(),
        out.as_os_str(),
    ]);
    fs::read(&out).expect("read converted snapshot")
}

/// Converts any image to raw bytes with qemu-img (an independent reader).
pub fn qemu_read_all(image: &Path, fmt: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("all.raw");
    qemu_img([
        OsStr::new("convert"),
        OsStr::new("-U"),
        OsStr::new("-f"),
        OsStr::new(fmt),
        OsStr::new("-O"),
        OsStr::new("raw"),
        image.as_os_str(),
        out.as_os_str(),
    ]);
    fs::read(&out).expect("read converted image")
}

/// Deterministic pseudo-random bytes for `(seed, stream)`.
pub fn pattern(seed: u64, stream: u64, len: usize) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed ^ stream.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v);
    v
}

/// Panics with the first differing offset and some context unless equal.
pub fn assert_bytes_eq(expected: &[u8], actual: &[u8], context: &str) {
    assert_eq!(
        expected.len(),
        actual.len(),
        "{context}: length differs (expected {}, got {})",
        expected.len(),
        actual.len()
    );
    if expected == actual {
        return;
    }
    let first = expected
        .iter()
        .zip(actual)
        .position(|(a, b)| a != b)
        .unwrap_or(0);
    let last = expected
        .iter()
        .zip(actual)
        .rposition(|(a, b)| a != b)
        .unwrap_or(first);
    let ndiff = expected.iter().zip(actual).filter(|(a, b)| a != b).count();
    let end = (first + 16).min(expected.len());
    panic!(
        "{context}: {ndiff} bytes differ, first at offset {first} ({first:#x}), last at {last} \
         ({last:#x})\n expected[{first:#x}..]: {:02x?}\n   actual[{first:#x}..]: {:02x?}",
        &expected[first..end],
        &actual[first..end]
    );
}

/// Reads the whole virtual disk through the library, in 1 MiB chunks.
pub fn read_all(img: &Qcow2) -> Vec<u8> {
    let size = img.size();
    let mut out = vec![0u8; usize::try_from(size).expect("disk fits in memory")];
    for (i, chunk) in out.chunks_mut(1 << 20).enumerate() {
        let off = i as u64 * (1 << 20);
        img.read_at(chunk, off)
            .unwrap_or_else(|e| panic!("library read_at({off}) failed: {e}"));
    }
    out
}

/// Opens an image read-write through the library.
pub fn open_rw(path: &Path) -> Qcow2 {
    Qcow2::open(path, &OpenOptions::default())
        .unwrap_or_else(|e| panic!("library cannot open {} read-write: {e}", path.display()))
}

/// Opens an image read-only through the library.
pub fn open_ro(path: &Path) -> Qcow2 {
    Qcow2::open(path, &OpenOptions::read_only())
        .unwrap_or_else(|e| panic!("library cannot open {} read-only: {e}", path.display()))
}

/// Creates an image through the library.
pub fn lib_create(path: &Path, size: u64, cluster_size: u64, refcount_bits: u32, version: u32) {
    let opts = CreateOptions {
        size,
        cluster_size,
        refcount_bits,
        version,
        ..Default::default()
    };
    Qcow2::create(path, &opts).unwrap_or_else(|e| {
        panic!(
            "library cannot create {} (size {size}, cluster {cluster_size}, refcount_bits \
             {refcount_bits}, v{version}): {e}",
            path.display()
        )
    });
}

/// The qemu-img `-o` option string for a configuration.
pub fn qemu_opts(cluster_size: u64, refcount_bits: u32, version: u32) -> String {
    let compat = if version == 2 { "0.10" } else { "1.1" };
    format!("cluster_size={cluster_size},refcount_bits={refcount_bits},compat={compat}")
}

/// Image configurations covered by the cross-checks: every cluster size from
/// 512 B to 2 MiB, every refcount width, v2 (refcount_bits 16 only) and v3.
pub fn configs() -> Vec<(u64, u32, u32)> {
    vec![
        (512, 16, 2),
        (512, 1, 3),
        (512, 64, 3),
        (4096, 8, 3),
        (4096, 2, 3),
        (4096, 16, 2),
        (65536, 16, 3),
        (65536, 32, 3),
        (65536, 4, 3),
        (65536, 16, 2),
        (2 << 20, 16, 3),
        (2 << 20, 64, 3),
        (2 << 20, 16, 2),
    ]
}

/// Reads a big-endian u32 of a file.
pub fn read_be32(path: &Path, off: u64) -> u32 {
    let f = fs::File::open(path).expect("open for reading a header field");
    let mut b = [0u8; 4];
    f.read_exact_at(&mut b, off).expect("read header field");
    u32::from_be_bytes(b)
}

/// Reads a big-endian u64 of a file.
pub fn read_be64(path: &Path, off: u64) -> u64 {
    let f = fs::File::open(path).expect("open for reading a header field");
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, off).expect("read header field");
    u64::from_be_bytes(b)
}

/// Overwrites bytes of a file.
pub fn patch(path: &Path, off: u64, bytes: &[u8]) {
    let f = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open for patching");
    f.write_all_at(bytes, off).expect("patch file");
}

/// Overwrites a big-endian u32 of a file.
pub fn patch_be32(path: &Path, off: u64, v: u32) {
    patch(path, off, &v.to_be_bytes());
}

/// Overwrites a big-endian u64 of a file.
pub fn patch_be64(path: &Path, off: u64, v: u64) {
    patch(path, off, &v.to_be_bytes());
}

/// Copies a file to `dir/name` and returns the new path.
pub fn copy_to(src: &Path, dir: &Path, name: &str) -> PathBuf {
    let dst = dir.join(name);
    fs::copy(src, &dst).expect("copy image");
    dst
}

/// Offsets of qcow2 header fields (see docs/interop/qcow2.txt in QEMU).
/// A child process that is killed (SIGKILL) and reaped when dropped, also while unwinding
/// from a panic, so a failing test leaves no VMM, QEMU or daemon running.
#[derive(Debug)]
pub struct KillOnDrop(Child);

impl KillOnDrop {
    /// Guards `child`.
    pub fn new(child: Child) -> Self {
        KillOnDrop(child)
    }
}

impl std::ops::Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // Already exited (and reaped) is fine: kill then fails and wait returns at once.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Stops our child `pid` (SIGSTOP) and waits until all its threads are stopped: from then on
/// it publishes nothing (e.g. no completion) until [`thaw`] or SIGKILL.
pub fn freeze(pid: u32) {
    let pid = i32::try_from(pid).expect("pid");
    // SAFETY: kill(2) on the caller's own child, not yet reaped.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let tasks = PathBuf::from(format!("/proc/{pid}/task"));
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        let all_stopped = fs::read_dir(&tasks)
            .expect("/proc/PID/task")
            .flatten()
            .all(|t| {
                let stat = fs::read_to_string(t.path().join("stat")).unwrap_or_default();
                // "tid (comm) S ...": the state follows the last ')'.
                let state = stat
                    .rsplit(')')
                    .next()
                    .and_then(|r| r.split_whitespace().next())
                    .unwrap_or("");
                state == "T" || state == "t"
            });
        if all_stopped {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "process {pid} did not stop on SIGSTOP"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Resumes a child stopped by [`freeze`] (SIGCONT).
pub fn thaw(pid: u32) {
    let pid = i32::try_from(pid).expect("pid");
    // SAFETY: kill(2) on the caller's own child, not yet reaped.
    unsafe { libc::kill(pid, libc::SIGCONT) };
}

/// Freezes our `vhost-user-blk` child `pid` (SIGSTOP) at a moment when one of its queue
/// threads (`vring_worker`) is inside the test-only completion hold
/// (`--test-hold-completions-ms`): in hold mode that is its only `clock_nanosleep`, and it
/// sleeps there only with requests taken and not yet in the used ring, so they are recorded
/// in flight in the inflight region. Tries again (SIGCONT, a short pause, SIGSTOP) until
/// then; panics after `timeout`. Returns how many tries it took. The caller then SIGKILLs
/// the stopped daemon: the kill hits requests in flight by construction, not by chance.
pub fn stop_while_holding(pid: u32, timeout: Duration) -> usize {
    let pid = i32::try_from(pid).expect("pid");
    let deadline = std::time::Instant::now() + timeout;
    let tasks = PathBuf::from(format!("/proc/{pid}/task"));
    for attempt in 1.. {
        // SAFETY: kill(2) on the caller's own child, not yet reaped.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        // Wait until every thread is stopped ('T' in /proc/PID/task/TID/stat).
        let stop_deadline = std::time::Instant::now() + Duration::from_secs(2);
        let holding = loop {
            let mut all_stopped = true;
            let mut holding = false;
            for t in fs::read_dir(&tasks).expect("/proc/PID/task").flatten() {
                let dir = t.path();
                let stat = fs::read_to_string(dir.join("stat")).unwrap_or_default();
                // "tid (comm) S ...": the state follows the last ')'.
                let state = stat
                    .rsplit(')')
                    .next()
                    .and_then(|r| r.split_whitespace().next())
                    .unwrap_or("");
                if state != "T" && state != "t" {
                    all_stopped = false;
                    break;
                }
                let comm = fs::read_to_string(dir.join("comm")).unwrap_or_default();
                let sys = fs::read_to_string(dir.join("syscall")).unwrap_or_default();
                let nr = sys.split_whitespace().next().unwrap_or("");
                if comm.trim_end() == "vring_worker" && nr == libc::SYS_clock_nanosleep.to_string()
                {
                    holding = true;
                }
            }
            if all_stopped {
                break holding;
            }
            assert!(
                std::time::Instant::now() < stop_deadline,
                "vhost-user-blk {pid} did not stop on SIGSTOP"
            );
            std::thread::sleep(Duration::from_micros(200));
        };
        if holding {
            return attempt;
        }
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGCONT) };
        assert!(
            std::time::Instant::now() < deadline,
            "vhost-user-blk {pid}: no queue thread was holding requests in {timeout:?} \
             ({attempt} tries)"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    unreachable!("the loop returns or panics")
}

pub mod hdr {
    /// Magic.
    pub const MAGIC: u64 = 0;
    /// Version.
    pub const VERSION: u64 = 4;
    /// Backing file name offset.
    pub const BACKING_OFFSET: u64 = 8;
    /// Backing file name length.
    pub const BACKING_SIZE: u64 = 16;
    /// log2 cluster size.
    pub const CLUSTER_BITS: u64 = 20;
    /// Virtual size.
    pub const SIZE: u64 = 24;
    /// Encryption method.
    pub const CRYPT_METHOD: u64 = 32;
    /// L1 entries.
    pub const L1_SIZE: u64 = 36;
    /// L1 table offset.
    pub const L1_OFFSET: u64 = 40;
    /// Refcount table offset.
    pub const REFTABLE_OFFSET: u64 = 48;
    /// Refcount table clusters.
    pub const REFTABLE_CLUSTERS: u64 = 56;
    /// Number of snapshots.
    pub const NB_SNAPSHOTS: u64 = 60;
    /// Snapshot table offset.
    pub const SNAPSHOTS_OFFSET: u64 = 64;
    /// Incompatible features (v3).
    pub const INCOMPAT: u64 = 72;
    /// Compatible features (v3).
    pub const COMPAT: u64 = 80;
    /// Autoclear features (v3).
    pub const AUTOCLEAR: u64 = 88;
    /// Refcount order (v3).
    pub const REFCOUNT_ORDER: u64 = 96;
    /// Header length (v3).
    pub const HEADER_LENGTH: u64 = 100;
}

/// A binary of this workspace built alongside the running test
/// (`target/<profile>/NAME`); panics with the build command when missing.
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let bin = dir.join(name);
    // target/<profile>: "debug" is the dev profile, anything else is named.
    let profile = match dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => String::new(),
        Some("release") => " --release".to_string(),
        Some(p) => format!(" --profile {p}"),
    };
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build{profile} --bins` (scripts/test.sh builds \
         every binary of the workspace before the tests)",
        bin.display()
    );
    bin
}
pub mod fuzz_net;
pub mod vmm;
