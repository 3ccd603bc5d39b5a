//! Real-guest test harness: boots a Debian kernel + busybox/fio initramfs under QEMU with
//! vhost-user block and network devices, runs a short shell script in the guest and returns
//! its output and exit status.
//!
//! The guest is built by `scripts/guest/build-guest.sh` (cached in `target/guest/`, see
//! `scripts/guest/README.md`). QEMU runs with `-accel tcg` by default (stock kernels hang on
//! this project's paravirtual KVM); set `OUTBOARD_GUEST_ACCEL=kvm` to change that.
//!
//! ```no_run
//! use std::time::Duration;
//! use outboard_tests::guest::{GuestImage, Qemu};
//!
//! let image = GuestImage::ensure()?;
//! let run = Qemu::new(&image)
//!     .vhost_user_blk("/tmp/blk.sock", 1)
//!     .run("dd if=/dev/vda bs=512 count=1 | od -An -tx1 | head -n1", Duration::from_secs(120))?
//!     .check()?;
//! println!("{} (booted in {:?})", run.output, run.boot_to_marker);
//! # Ok::<(), outboard_tests::guest::GuestError>(())
//! ```
//!
//! The script travels base64-encoded on the kernel command line, which Linux limits to 2047
//! bytes: keep scripts under about 1.2 KiB ([`MAX_SCRIPT_LEN`]). Longer logic belongs on the
//! host (generate data there, check it there) or in several runs.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Linux's `COMMAND_LINE_SIZE` on x86 (including the terminating NUL).
pub const KERNEL_CMDLINE_MAX: usize = 2048;
/// A conservative bound on the raw script length that still fits the command line with the
/// default parameters (base64 grows it by 4/3).
pub const MAX_SCRIPT_LEN: usize = 1200;
/// Printed by the guest's init just before the script runs.
pub const START_MARKER: &str = "OB_START";
/// Printed by the guest's init after the script, followed by its exit status.
pub const EXIT_MARKER: &str = "OB_EXIT=";

/// The QEMU binary; `OUTBOARD_QEMU` overrides it.
pub fn qemu_binary() -> OsString {
    std::env::var_os("OUTBOARD_QEMU").unwrap_or_else(|| "qemu-system-x86_64".into())
}

/// What went wrong while building or running a guest.
#[derive(Debug)]
pub enum GuestError {
    /// A tool the harness needs is missing (QEMU, bash, the build script's tools).
    MissingTool(String),
    /// `build-guest.sh` failed; the message holds its output.
    Build(String),
    /// The guest could not be started or its configuration is invalid.
    Setup(String),
    /// The guest did not finish in time; QEMU was killed.
    Timeout {
        /// The time limit.
        timeout: Duration,
        /// The serial console log (tail) and QEMU's stderr.
        log: String,
    },
    /// QEMU exited without the guest reporting an exit status.
    NoExitMarker {
        /// QEMU's exit status.
        status: String,
        /// The serial console log (tail) and QEMU's stderr.
        log: String,
    },
    /// The script ran but exited non-zero (from [`GuestRun::check`]).
    ScriptFailed {
        /// The script's exit status.
        exit_code: i32,
        /// The serial console log of the run (includes the script's output).
        output: String,
    },
    /// An I/O error on a host file of the harness.
    Io(String),
}

impl fmt::Display for GuestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuestError::MissingTool(m) | GuestError::Build(m) | GuestError::Setup(m) => {
                f.write_str(m)
            }
            GuestError::Io(m) => write!(f, "guest harness I/O error: {m}"),
            GuestError::Timeout { timeout, log } => {
                write!(
                    f,
                    "guest did not finish within {timeout:?}; QEMU killed\n{log}"
                )
            }
            GuestError::NoExitMarker { status, log } => write!(
                f,
                "QEMU exited ({status}) without the guest printing {EXIT_MARKER}<status>\n{log}"
            ),
            GuestError::ScriptFailed { exit_code, output } => write!(
                f,
                "guest script exited with status {exit_code}\n--- serial console ---\n{output}"
            ),
        }
    }
}

impl std::error::Error for GuestError {}

/// Result type of the harness.
pub type Result<T> = std::result::Result<T, GuestError>;

fn io_err(what: &str, e: std::io::Error) -> GuestError {
    GuestError::Io(format!("{what}: {e}"))
}

/// The workspace root (parent of `tests/`).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// A built guest: kernel and initramfs.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// The kernel (`vmlinuz`).
    pub kernel: PathBuf,
    /// The initramfs (`initramfs.cpio.gz`).
    pub initrd: PathBuf,
}

impl GuestImage {
    /// Where [`GuestImage::ensure`] builds the guest: `OUTBOARD_GUEST_DIR`, or `target/guest`
    /// in the workspace.
    pub fn default_dir() -> PathBuf {
        match std::env::var_os("OUTBOARD_GUEST_DIR") {
            Some(d) => PathBuf::from(d),
            None => workspace_root().join("target").join("guest"),
        }
    }

    /// Builds the guest into [`GuestImage::default_dir`] unless it is up to date (runs
    /// `scripts/guest/build-guest.sh`, which caches by package version and locks against
    /// concurrent builds). Runs at most once per process.
    pub fn ensure() -> Result<GuestImage> {
        static IMAGE: OnceLock<std::result::Result<GuestImage, String>> = OnceLock::new();
        IMAGE
            .get_or_init(|| Self::build_in(&Self::default_dir()).map_err(|e| e.to_string()))
            .clone()
            .map_err(GuestError::Build)
    }

    /// Runs the build script into `dir` (cached) and returns the image.
    pub fn build_in(dir: &Path) -> Result<GuestImage> {
        let script = workspace_root().join("scripts/guest/build-guest.sh");
        if !script.is_file() {
            return Err(GuestError::Build(format!("{} not found", script.display())));
        }
        let out = Command::new("bash")
            .arg(&script)
            .arg(dir)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| {
                GuestError::MissingTool(format!("cannot run bash {}: {e}", script.display()))
            })?;
        if !out.status.success() {
            return Err(GuestError::Build(format!(
                "`{} {}` failed ({}):\n{}{}",
                script.display(),
                dir.display(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Self::from_dir(dir)
    }

    /// Uses an already built guest in `dir`.
    pub fn from_dir(dir: &Path) -> Result<GuestImage> {
        let image = GuestImage {
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initramfs.cpio.gz"),
        };
        for f in [&image.kernel, &image.initrd] {
            if !f.is_file() {
                return Err(GuestError::Build(format!(
                    "{} missing (run scripts/guest/build-guest.sh {})",
                    f.display(),
                    dir.display()
                )));
            }
        }
        Ok(image)
    }
}

/// Checks that QEMU can be run, with an installation hint otherwise.
pub fn require_qemu() -> Result<String> {
    static CHECK: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    CHECK
        .get_or_init(|| {
            let bin = qemu_binary();
            let hint = "the real-guest tests need QEMU: apt-get install qemu-system-x86 \
                        (scripts/test.sh installs it), or set OUTBOARD_QEMU";
            match Command::new(&bin).arg("--version").output() {
                Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string()),
                Ok(o) => Err(format!(
                    "`{} --version` failed ({}): {}\n{hint}",
                    bin.to_string_lossy(),
                    o.status,
                    String::from_utf8_lossy(&o.stderr)
                )),
                Err(e) => Err(format!(
                    "cannot run `{}`: {e}\n{hint}",
                    bin.to_string_lossy()
                )),
            }
        })
        .clone()
        .map_err(GuestError::MissingTool)
}

/// A vhost-user-blk disk of the guest.
#[derive(Debug, Clone)]
pub struct BlkDisk {
    /// The backend's unix socket.
    pub socket: PathBuf,
    /// `num-queues` of the device.
    pub num_queues: u16,
    /// `reconnect=N` on the chardev: QEMU reconnects to a restarted backend after N seconds.
    pub reconnect_secs: Option<u32>,
    /// More `-device vhost-user-blk-pci` properties (`"queue-size=256"`, ...).
    pub device_props: Vec<String>,
}

impl BlkDisk {
    /// A disk on `socket` with `num_queues` queues, no reconnect.
    pub fn new(socket: impl Into<PathBuf>, num_queues: u16) -> Self {
        BlkDisk {
            socket: socket.into(),
            num_queues,
            reconnect_secs: None,
            device_props: Vec::new(),
        }
    }
}

/// A vhost-user-net NIC of the guest.
#[derive(Debug, Clone)]
pub struct NetNic {
    /// The backend's unix socket.
    pub socket: PathBuf,
    /// The guest MAC address (`52:54:00:12:34:56`).
    pub mac: String,
    /// Queue pairs (`queues=` of the netdev; `mq=on` when more than one).
    pub queue_pairs: u16,
    /// `reconnect=N` on the chardev.
    pub reconnect_secs: Option<u32>,
    /// More `-device virtio-net-pci` properties (`"ctrl_vq=off"`, ...).
    pub device_props: Vec<String>,
}

impl NetNic {
    /// A single-queue-pair NIC.
    pub fn new(socket: impl Into<PathBuf>, mac: impl Into<String>) -> Self {
        NetNic {
            socket: socket.into(),
            mac: mac.into(),
            queue_pairs: 1,
            reconnect_secs: None,
            device_props: Vec::new(),
        }
    }
}

/// Builder of one QEMU run of the test guest.
#[derive(Debug, Clone)]
pub struct Qemu {
    image: GuestImage,
    binary: OsString,
    accel: String,
    memory_mib: u64,
    cpus: u32,
    disks: Vec<BlkDisk>,
    nics: Vec<NetNic>,
    append: Vec<String>,
    wait_secs: u32,
    extra: Vec<OsString>,
}

fn socket_opts(path: &Path, reconnect: Option<u32>) -> Result<String> {
    let p = path
        .to_str()
        .ok_or_else(|| GuestError::Setup(format!("socket path {} is not UTF-8", path.display())))?;
    if p.contains(',') {
        return Err(GuestError::Setup(format!(
            "socket path {p} contains a comma, which QEMU's option syntax cannot take"
        )));
    }
    Ok(match reconnect {
        Some(s) => format!("path={p},reconnect={s}"),
        None => format!("path={p}"),
    })
}

impl Qemu {
    /// One vCPU, 512 MiB of shared memfd memory, TCG (or `OUTBOARD_GUEST_ACCEL`), no devices.
    pub fn new(image: &GuestImage) -> Self {
        Qemu {
            image: image.clone(),
            binary: qemu_binary(),
            accel: std::env::var("OUTBOARD_GUEST_ACCEL").unwrap_or_else(|_| "tcg".into()),
            memory_mib: 512,
            cpus: 1,
            disks: Vec::new(),
            nics: Vec::new(),
            append: Vec::new(),
            wait_secs: 30,
            extra: Vec::new(),
        }
    }

    /// Guest memory in MiB (a shared memfd: vhost-user backends map it).
    pub fn memory_mib(mut self, mib: u64) -> Self {
        self.memory_mib = mib;
        self
    }

    /// Number of vCPUs.
    pub fn cpus(mut self, n: u32) -> Self {
        self.cpus = n;
        self
    }

    /// The accelerator (`tcg`, `kvm`).
    pub fn accel(mut self, accel: &str) -> Self {
        self.accel = accel.to_string();
        self
    }

    /// Adds a vhost-user-blk disk; disks appear as `/dev/vda`, `/dev/vdb`, ... in order, and
    /// the guest waits for all of them before running the script.
    pub fn vhost_user_blk(self, socket: impl Into<PathBuf>, num_queues: u16) -> Self {
        self.disk(BlkDisk::new(socket, num_queues))
    }

    /// Adds a disk with every option spelled out.
    pub fn disk(mut self, disk: BlkDisk) -> Self {
        self.disks.push(disk);
        self
    }

    /// Adds a vhost-user-net NIC; the guest waits for a NIC before running the script.
    pub fn vhost_user_net(self, socket: impl Into<PathBuf>, mac: &str) -> Self {
        self.nic(NetNic::new(socket, mac))
    }

    /// Adds a NIC with every option spelled out.
    pub fn nic(mut self, nic: NetNic) -> Self {
        self.nics.push(nic);
        self
    }

    /// Appends a kernel command line parameter.
    pub fn append(mut self, param: &str) -> Self {
        self.append.push(param.to_string());
        self
    }

    /// How long the guest's init waits for the disks and NICs (default 30 s).
    pub fn device_wait_secs(mut self, secs: u32) -> Self {
        self.wait_secs = secs;
        self
    }

    /// Adds raw QEMU arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.extra
            .extend(args.into_iter().map(|a| a.as_ref().to_os_string()));
        self
    }

    /// The kernel command line for `script` (`None`: interactive shell).
    pub fn kernel_cmdline(&self, script: Option<&str>) -> Result<String> {
        let mut parts: Vec<String> = vec![
            "console=ttyS0".into(),
            "panic=-1".into(),
            "quiet".into(),
            "8250.nr_uarts=1".into(),
        ];
        let mut wait: Vec<String> = (0..self.disks.len()).map(disk_name).collect();
        if !self.nics.is_empty() {
            wait.push("net".into());
        }
        if !wait.is_empty() {
            parts.push(format!("ob_wait={}", wait.join(",")));
            parts.push(format!("ob_wait_secs={}", self.wait_secs));
        }
        parts.extend(self.append.iter().cloned());
        if let Some(s) = script {
            parts.push(format!("ob_script={}", base64(s.as_bytes())));
        }
        let line = parts.join(" ");
        if line.len() >= KERNEL_CMDLINE_MAX {
            return Err(GuestError::Setup(format!(
                "kernel command line is {} bytes, over Linux's limit of {}: the script is {} \
                 bytes (base64 adds a third); keep guest scripts short (about {MAX_SCRIPT_LEN} \
                 bytes) and do the heavy lifting on the host",
                line.len(),
                KERNEL_CMDLINE_MAX - 1,
                script.map_or(0, str::len)
            )));
        }
        Ok(line)
    }

    /// The full QEMU argument list (serial console into `serial_log`).
    pub fn qemu_args(&self, script: Option<&str>, serial_log: &Path) -> Result<Vec<OsString>> {
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |s: &str| a.push(s.into());
        let mem = format!("{}M", self.memory_mib);
        push("-accel");
        push(&self.accel);
        push("-nodefaults");
        push("-display");
        push("none");
        push("-no-reboot");
        push("-m");
        push(&mem);
        push("-smp");
        push(&self.cpus.to_string());
        push("-object");
        push(&format!("memory-backend-memfd,id=m,size={mem},share=on"));
        push("-machine");
        push("q35,memory-backend=m");
        let mut serial = OsString::from("file:");
        serial.push(serial_log);
        a.push("-serial".into());
        a.push(serial);
        a.push("-kernel".into());
        a.push(self.image.kernel.clone().into());
        a.push("-initrd".into());
        a.push(self.image.initrd.clone().into());
        a.push("-append".into());
        a.push(self.kernel_cmdline(script)?.into());
        for (i, d) in self.disks.iter().enumerate() {
            a.push("-chardev".into());
            a.push(
                format!(
                    "socket,id=blk{i},{}",
                    socket_opts(&d.socket, d.reconnect_secs)?
                )
                .into(),
            );
            let mut dev = format!(
                "vhost-user-blk-pci,chardev=blk{i},num-queues={}",
                d.num_queues
            );
            for p in &d.device_props {
                dev.push(',');
                dev.push_str(p);
            }
            a.push("-device".into());
            a.push(dev.into());
        }
        for (i, n) in self.nics.iter().enumerate() {
            a.push("-chardev".into());
            a.push(
                format!(
                    "socket,id=netc{i},{}",
                    socket_opts(&n.socket, n.reconnect_secs)?
                )
                .into(),
            );
            a.push("-netdev".into());
            a.push(
                format!(
                    "vhost-user,id=net{i},chardev=netc{i},queues={}",
                    n.queue_pairs
                )
                .into(),
            );
            let mut dev = format!("virtio-net-pci,netdev=net{i},mac={}", n.mac);
            if n.queue_pairs > 1 {
                dev.push_str(&format!(
                    ",mq=on,vectors={}",
                    2 * u32::from(n.queue_pairs) + 2
                ));
            }
            for p in &n.device_props {
                dev.push(',');
                dev.push_str(p);
            }
            a.push("-device".into());
            a.push(dev.into());
        }
        a.extend(self.extra.iter().cloned());
        Ok(a)
    }

    /// Starts QEMU running `script` in the guest and returns at once; see [`RunningGuest`].
    pub fn spawn(&self, script: &str) -> Result<RunningGuest> {
        require_qemu()?;
        let dir = tempfile::Builder::new()
            .prefix("outboard-guest-")
            .tempdir()
            .map_err(|e| io_err("creating the run directory", e))?;
        let serial = dir.path().join("serial.log");
        let stderr_path = dir.path().join("qemu.stderr");
        fs::write(&serial, b"").map_err(|e| io_err("creating the serial log", e))?;
        let stderr = fs::File::create(&stderr_path)
            .map_err(|e| io_err("creating the QEMU stderr log", e))?;
        let args = self.qemu_args(Some(script), &serial)?;
        let mut cmd = Command::new(&self.binary);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let started = Instant::now();
        let child = cmd.spawn().map_err(|e| {
            GuestError::MissingTool(format!(
                "cannot start {}: {e} (apt-get install qemu-system-x86)",
                self.binary.to_string_lossy()
            ))
        })?;
        Ok(RunningGuest {
            child: Some(child),
            dir,
            serial,
            stderr: stderr_path,
            started,
            boot_to_marker: None,
            command: describe(&self.binary, &args),
        })
    }

    /// Boots the guest, runs `script` (busy box `sh`; stdout and stderr are captured) and
    /// waits for it to power off, killing QEMU after `timeout`.
    pub fn run(&self, script: &str, timeout: Duration) -> Result<GuestRun> {
        self.spawn(script)?.wait(timeout)
    }
}

fn describe(bin: &OsStr, args: &[OsString]) -> String {
    let mut s = bin.to_string_lossy().into_owned();
    for a in args {
        s.push(' ');
        let a = a.to_string_lossy();
        if a.contains(' ') {
            s.push('\'');
            s.push_str(&a);
            s.push('\'');
        } else {
            s.push_str(&a);
        }
    }
    s
}

/// `/dev` name of the `i`-th virtio disk (`vda`, ..., `vdz`, `vdaa`, ...).
pub fn disk_name(i: usize) -> String {
    let letters = b"abcdefghijklmnopqrstuvwxyz";
    let mut suffix = Vec::new();
    let mut n = i + 1;
    while n > 0 {
        n -= 1;
        suffix.push(letters[n % 26]);
        n /= 26;
    }
    suffix.reverse();
    format!("vd{}", String::from_utf8_lossy(&suffix))
}

/// Standard base64 with padding (what busybox `base64 -d` reads).
pub fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (k, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            if k <= c.len() {
                out.push(char::from(T[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The outcome of a guest run.
#[derive(Debug, Clone)]
pub struct GuestRun {
    /// The script's exit status.
    pub exit_code: i32,
    /// What the script printed (stdout and stderr, `\r` removed), between the markers.
    pub output: String,
    /// From starting QEMU to the guest printing [`START_MARKER`] (boot time).
    pub boot_to_marker: Duration,
    /// From starting QEMU to QEMU exiting.
    pub total: Duration,
    /// The whole serial console log.
    pub serial: String,
}

impl GuestRun {
    /// `Ok(self)` when the script exited 0, [`GuestError::ScriptFailed`] otherwise.
    pub fn check(self) -> Result<Self> {
        if self.exit_code == 0 {
            Ok(self)
        } else {
            Err(GuestError::ScriptFailed {
                exit_code: self.exit_code,
                output: self.serial,
            })
        }
    }
}

/// A QEMU process running the guest. Dropping it kills QEMU.
#[derive(Debug)]
pub struct RunningGuest {
    child: Option<Child>,
    dir: tempfile::TempDir,
    serial: PathBuf,
    stderr: PathBuf,
    started: Instant,
    boot_to_marker: Option<Duration>,
    command: String,
}

const LOG_TAIL: usize = 16 * 1024;

fn tail(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

impl RunningGuest {
    /// The serial console log so far (`\r` removed).
    pub fn serial(&self) -> String {
        let mut buf = Vec::new();
        if let Ok(mut f) = fs::File::open(&self.serial) {
            // A best-effort snapshot of a growing file: errors leave what was read.
            let _ = f.seek(SeekFrom::Start(0));
            let _ = f.read_to_end(&mut buf);
        }
        String::from_utf8_lossy(&buf).replace('\r', "")
    }

    /// The directory holding the serial log and QEMU's stderr (deleted on drop).
    pub fn run_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The QEMU command line, for error messages.
    pub fn command(&self) -> &str {
        &self.command
    }

    fn diagnostics(&self) -> String {
        let serial = self.serial();
        let stderr = fs::read_to_string(&self.stderr).unwrap_or_default();
        format!(
            "--- QEMU command ---\n{}\n--- serial console (last {} KiB) ---\n{}\n--- QEMU stderr \
             ---\n{}",
            self.command,
            LOG_TAIL / 1024,
            tail(&serial, LOG_TAIL),
            tail(&stderr, LOG_TAIL)
        )
    }

    fn note_marker(&mut self, serial: &str) {
        if self.boot_to_marker.is_none() && has_line(serial, START_MARKER) {
            self.boot_to_marker = Some(self.started.elapsed());
        }
    }

    /// Waits until the serial console shows a line containing `needle` (e.g. something the
    /// script prints when it reaches a point where the host should act). Errors when the
    /// guest exits first or on timeout (QEMU keeps running in that case).
    pub fn wait_for_output(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let serial = self.serial();
            self.note_marker(&serial);
            let after_start = serial
                .find(&format!("{START_MARKER}\n"))
                .map_or("", |i| &serial[i..]);
            if after_start.contains(needle) {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(GuestError::NoExitMarker {
                        status: format!("{status}, before printing {needle:?}"),
                        log: self.diagnostics(),
                    });
                }
            }
            if Instant::now() >= deadline {
                return Err(GuestError::Timeout {
                    timeout,
                    log: format!(
                        "(waiting for {needle:?}; QEMU still running)\n{}",
                        self.diagnostics()
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for QEMU to exit (the guest powers off after the script) and parses the result;
    /// kills QEMU after `timeout` (counted from now).
    pub fn wait(mut self, timeout: Duration) -> Result<GuestRun> {
        let deadline = Instant::now() + timeout;
        let status = loop {
            let serial = self.serial();
            self.note_marker(&serial);
            let Some(child) = self.child.as_mut() else {
                return Err(GuestError::Setup("QEMU already reaped".into()));
            };
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) => {}
                Err(e) => return Err(io_err("waiting for QEMU", e)),
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(GuestError::Timeout {
                    timeout,
                    log: self.diagnostics(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let total = self.started.elapsed();
        self.child = None;
        let serial = self.serial();
        self.note_marker(&serial);
        match parse_serial(&serial) {
            Some((exit_code, output)) => Ok(GuestRun {
                exit_code,
                output,
                boot_to_marker: self.boot_to_marker.unwrap_or(total),
                total,
                serial,
            }),
            None => Err(GuestError::NoExitMarker {
                status: status.to_string(),
                log: self.diagnostics(),
            }),
        }
    }

    /// Kills QEMU now (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Already exited is fine; nothing else can go wrong that we could handle.
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RunningGuest {
    fn drop(&mut self) {
        self.kill();
    }
}

fn has_line(serial: &str, line: &str) -> bool {
    serial.lines().any(|l| l.trim_end() == line)
}

/// Splits a serial log into (exit status, script output): the lines after the last
/// [`START_MARKER`] line up to the last `OB_EXIT=<n>` line.
pub fn parse_serial(serial: &str) -> Option<(i32, String)> {
    let lines: Vec<&str> = serial.lines().map(str::trim_end).collect();
    let start = lines.iter().rposition(|l| *l == START_MARKER)?;
    let (end, code) = (start + 1..lines.len()).rev().find_map(|i| {
        let rest = lines[i].strip_prefix(EXIT_MARKER)?;
        rest.parse::<i32>().ok().map(|c| (i, c))
    })?;
    let mut output = lines[start + 1..end].join("\n");
    if end > start + 1 {
        output.push('\n');
    }
    Some((code, output))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648() {
        let cases: [(&str, &str); 7] = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (raw, enc) in cases {
            assert_eq!(base64(raw.as_bytes()), enc, "{raw:?}");
        }
        assert_eq!(base64(&[0xff, 0xfe, 0x00]), "//4A");
    }

    #[test]
    fn disk_names() {
        assert_eq!(disk_name(0), "vda");
        assert_eq!(disk_name(25), "vdz");
        assert_eq!(disk_name(26), "vdaa");
    }

    #[test]
    fn serial_parsing() {
        let log = "boot noise\r\nOB_START\r\nhello\r\nworld\r\nOB_EXIT=3\r\n[ 1.0] reboot: Power down\r\n";
        let (code, out) = parse_serial(&log.replace('\r', "")).expect("parses");
        assert_eq!(code, 3);
        assert_eq!(out, "hello\nworld\n");
        assert_eq!(
            parse_serial("OB_START\nOB_EXIT=0\n"),
            Some((0, String::new()))
        );
        assert_eq!(parse_serial("OB_START\nno end\n"), None);
        assert_eq!(parse_serial("OB_EXIT=0\n"), None);
    }

    #[test]
    fn cmdline_limit_is_enforced() {
        let image = GuestImage {
            kernel: "k".into(),
            initrd: "i".into(),
        };
        let q = Qemu::new(&image).vhost_user_blk("/tmp/s", 1);
        let line = q
            .kernel_cmdline(Some("echo hi"))
            .expect("short script fits");
        assert!(line.contains("ob_wait=vda"), "{line}");
        assert!(
            line.contains(&format!("ob_script={}", base64(b"echo hi"))),
            "{line}"
        );
        assert!(q.kernel_cmdline(Some(&"x".repeat(MAX_SCRIPT_LEN))).is_ok());
        assert!(q.kernel_cmdline(Some(&"x".repeat(1600))).is_err());
    }
}
