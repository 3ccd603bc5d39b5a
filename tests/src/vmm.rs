//! Harness for the `outboard` VMM tests: picks the guest kernel for this host, builds the
//! small initramfs, runs `outboard` with a script (same `ob_script` protocol as
//! [`crate::guest`]) and returns the serial output, the script's status and timings.
//!
//! Kernel choice: on a PVM host (`/sys/module/kvm_pvm`, this project's machines) only the
//! PVM guest kernel boots: `OUTBOARD_PVM_KERNEL`, else `../shared/guest/vmlinux` next to the
//! workspace root (CI has `shared/` beside the clone), with the busybox initramfs from
//! `scripts/guest/build-pvm-initramfs.sh`. On hardware KVM the Debian test guest of
//! [`crate::guest`] (bzImage + modules) is used instead.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::guest::{base64, workspace_root, GuestImage, EXIT_MARKER, START_MARKER};
use crate::workspace_binary;

/// Kernel + initramfs for `outboard`.
#[derive(Debug, Clone)]
pub struct VmmGuest {
    /// Kernel (ELF vmlinux or bzImage).
    pub kernel: PathBuf,
    /// Initramfs.
    pub initramfs: PathBuf,
    /// Whether the host is PVM.
    pub pvm: bool,
}

/// Why a VMM test cannot run here, or the guest to use. A missing `/dev/kvm` is recorded
/// as the calling test's skip ([`crate::skip`]); nothing else makes it skip.
pub fn guest_or_skip() -> Result<VmmGuest, String> {
    guest_or_skip_with(false)
}

/// [`guest_or_skip`] with `fio` in the guest (on a PVM host the initramfs of
/// `OB_PVM_FIO=1 scripts/guest/build-pvm-initramfs.sh`; the Debian test guest has it).
pub fn guest_with_fio_or_skip() -> Result<VmmGuest, String> {
    guest_or_skip_with(true)
}

fn guest_or_skip_with(fio: bool) -> Result<VmmGuest, String> {
    if !Path::new("/dev/kvm").exists() {
        let why = "/dev/kvm is absent (the VMM needs KVM)";
        crate::skip::skip(crate::skip::Missing::Kvm, why);
        return Err(why.into());
    }
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    if !pvm {
        let img = GuestImage::ensure()
            .map_err(|e| format!("building the test guest: {e}"))
            .unwrap_or_else(|e| panic!("{e}"));
        return Ok(VmmGuest {
            kernel: img.kernel.clone(),
            initramfs: img.initrd.clone(),
            pvm,
        });
    }
    let kernel = std::env::var_os("OUTBOARD_PVM_KERNEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("../shared/guest/vmlinux"));
    assert!(
        kernel.is_file(),
        "PVM host but no PVM guest kernel at {} (set OUTBOARD_PVM_KERNEL)",
        kernel.display()
    );
    let out = workspace_root().join("target/guest");
    let script = workspace_root().join("scripts/guest/build-pvm-initramfs.sh");
    let o = Command::new("bash")
        .arg(&script)
        .arg(&out)
        .env("OB_PVM_FIO", if fio { "1" } else { "0" })
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        o.status.success(),
        "{} failed:\n{}",
        script.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(VmmGuest {
        kernel,
        initramfs: out.join(if fio {
            "pvm-initramfs-fio.cpio.gz"
        } else {
            "pvm-initramfs.cpio.gz"
        }),
        pvm,
    })
}

/// One `outboard` invocation.
#[derive(Debug, Clone)]
pub struct Outboard {
    guest: VmmGuest,
    cpus: u32,
    memory_mib: u64,
    disks: Vec<String>,
    nets: Vec<String>,
    wait: Vec<String>,
    extra_cmdline: Vec<String>,
    netns: Option<String>,
}

/// What a run produced.
#[derive(Debug, Clone)]
pub struct OutboardRun {
    /// All serial output.
    pub serial: String,
    /// The script's output (between the markers).
    pub output: String,
    /// The script's exit status (None when the marker never came).
    pub script_status: Option<i32>,
    /// `outboard`'s exit status.
    pub vmm_status: Option<i32>,
    /// Process start to `OB_START` (guest userspace running the script).
    pub to_userspace: Option<Duration>,
    /// Process start to process exit.
    pub total: Duration,
    /// `outboard`'s stderr.
    pub stderr: String,
}

impl OutboardRun {
    /// Panics with the serial log unless the script ran and exited 0 and the VMM exited 0.
    pub fn assert_ok(&self, what: &str) {
        assert!(
            self.script_status == Some(0) && self.vmm_status == Some(0),
            "{what}: script status {:?}, outboard status {:?}\n--- serial ---\n{}\n--- stderr ---\n{}",
            self.script_status,
            self.vmm_status,
            self.serial,
            self.stderr
        );
    }
}

impl Outboard {
    /// 1 vCPU, 256 MiB, no devices.
    pub fn new(guest: &VmmGuest) -> Self {
        Outboard {
            guest: guest.clone(),
            cpus: 1,
            memory_mib: 256,
            disks: vec![],
            nets: vec![],
            wait: vec![],
            extra_cmdline: vec![],
            netns: None,
        }
    }

    /// vCPUs.
    pub fn cpus(mut self, n: u32) -> Self {
        self.cpus = n;
        self
    }

    /// RAM in MiB.
    pub fn memory_mib(mut self, m: u64) -> Self {
        self.memory_mib = m;
        self
    }

    /// A `--disk` value; the guest waits for the next vdX.
    pub fn disk(mut self, spec: &str) -> Self {
        self.wait.push(crate::guest::disk_name(self.disks.len()));
        self.disks.push(spec.to_string());
        self
    }

    /// A `--net` value; the guest waits for a NIC.
    pub fn net(mut self, spec: &str) -> Self {
        if self.nets.is_empty() {
            self.wait.push("net".into());
        }
        self.nets.push(spec.to_string());
        self
    }

    /// Runs `outboard` inside network namespace `name` (`ip netns exec`).
    pub fn netns(mut self, name: &str) -> Self {
        self.netns = Some(name.to_string());
        self
    }

    /// Extra kernel parameters.
    pub fn cmdline(mut self, p: &str) -> Self {
        self.extra_cmdline.push(p.to_string());
        self
    }

    /// The `outboard` command for `script`.
    pub fn command(&self, script: &str) -> Command {
        let mut cmdline = vec![
            "console=ttyS0".to_string(),
            "panic=-1".into(),
            "quiet".into(),
            "8250.nr_uarts=1".into(),
        ];
        if !self.wait.is_empty() {
            cmdline.push(format!("ob_wait={}", self.wait.join(",")));
            cmdline.push("ob_wait_secs=20".into());
        }
        cmdline.extend(self.extra_cmdline.iter().cloned());
        cmdline.push(format!("ob_script={}", base64(script.as_bytes())));
        let mut c = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns])
                    .arg(workspace_binary("outboard"));
                c
            }
            None => Command::new(workspace_binary("outboard")),
        };
        c.arg("--kernel")
            .arg(&self.guest.kernel)
            .arg("--initramfs")
            .arg(&self.guest.initramfs)
            .arg("--cpus")
            .arg(self.cpus.to_string())
            .arg("--memory")
            .arg(format!("{}M", self.memory_mib))
            .arg("--cmdline")
            .arg(cmdline.join(" "));
        for d in &self.disks {
            c.arg("--disk").arg(d);
        }
        for n in &self.nets {
            c.arg("--net").arg(n);
        }
        c
    }

    /// Runs the guest until it powers off (killed after `timeout`).
    pub fn run(&self, script: &str, timeout: Duration) -> OutboardRun {
        self.run_with(script, timeout, |_| {})
    }

    /// [`Self::run`], calling `on_line` with each serial line as it arrives (to act on
    /// the host while the guest runs).
    pub fn run_with(
        &self,
        script: &str,
        timeout: Duration,
        on_line: impl FnMut(&str),
    ) -> OutboardRun {
        self.run_full(script, timeout, &[], on_line)
    }

    /// [`Self::run`] with extra environment variables for `outboard`.
    pub fn run_with_env(
        &self,
        script: &str,
        timeout: Duration,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> OutboardRun {
        self.run_full(script, timeout, env, |_| {})
    }

    fn run_full(
        &self,
        script: &str,
        timeout: Duration,
        env: &[(&str, &std::ffi::OsStr)],
        mut on_line: impl FnMut(&str),
    ) -> OutboardRun {
        let t0 = Instant::now();
        let mut cmd = self.command(script);
        for (k, v) in env {
            cmd.env(k, v);
        }
        // Killed and reaped on every path, also if `on_line` panics.
        let mut child = crate::KillOnDrop::new(
            cmd.stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn outboard"),
        );
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel::<(Instant, String)>();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(l) = line else { break };
                if tx.send((Instant::now(), l)).is_err() {
                    break;
                }
            }
        });
        let err_thread = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut s);
            s
        });
        let mut serial = String::new();
        let mut to_userspace = None;
        let deadline = t0 + timeout;
        loop {
            let now = Instant::now();
            if now >= deadline {
                let _ = child.kill();
                serial.push_str("\n[harness: timed out, outboard killed]\n");
                break;
            }
            match rx.recv_timeout(deadline - now) {
                Ok((at, l)) => {
                    on_line(&l);
                    if to_userspace.is_none() && l.trim_end() == START_MARKER {
                        to_userspace = Some(at - t0);
                    }
                    serial.push_str(&l);
                    serial.push('\n');
                }
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let status = child.wait().expect("wait outboard");
        let total = t0.elapsed();
        let stderr = err_thread.join().unwrap_or_default();
        let mut output = String::new();
        let mut script_status = None;
        let mut inside = false;
        for l in serial.lines() {
            let t = l.trim_end();
            if t == START_MARKER {
                inside = true;
            } else if let Some(s) = t.strip_prefix(EXIT_MARKER) {
                script_status = s.trim().parse().ok();
                inside = false;
            } else if inside {
                output.push_str(t);
                output.push('\n');
            }
        }
        OutboardRun {
            serial,
            output,
            script_status,
            vmm_status: status.code(),
            to_userspace,
            total,
            stderr,
        }
    }
}

/// Our `vhost-user-net` binary (`OUTBOARD_VHOST_USER_NET`, else next to the test binaries),
/// or why there is none.
pub fn vhost_user_net_binary() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("OUTBOARD_VHOST_USER_NET") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let p = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("vhost-user-net"))
        .ok_or("no target directory")?;
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!("{} is not built", p.display()))
    }
}

/// The disk part of the VMM's main test (issue #6), shared by the tests that boot with a
/// disk: a 1 MiB text pattern written to `/dev/vda` at 48 MiB with O_DIRECT and read back,
/// then an ext4 file system made in the first 32 MiB, mounted, and a file written.
pub mod disk_check {
    use std::fs;
    use std::path::Path;
    use std::process::Command;

    use crate::{assert_bytes_eq, assert_qemu_check_clean, qemu_read_all};

    const MIB: usize = 1 << 20;
    /// Where the guest writes the pattern.
    pub const PATTERN_OFF: usize = 48 * MIB;
    const PATTERN_LINE: &str = "outboard-vmm-pattern-0123456789abcdefghijklmnopqrstuvwxyz-XYZ\n";

    /// Guest script (busybox sh, `set -e` expected); prints `readback-ok` and `fs-ok`.
    pub const SCRIPT: &str = "
yes outboard-vmm-pattern-0123456789abcdefghijklmnopqrstuvwxyz-XYZ | head -c 1048576 >/tmp/p
dd if=/tmp/p of=/dev/vda bs=65536 seek=768 oflag=direct conv=fsync 2>/dev/null
dd if=/dev/vda bs=65536 skip=768 count=16 iflag=direct 2>/dev/null | cmp - /tmp/p
echo readback-ok
/usr/sbin/mke2fs -q -t ext4 -F /dev/vda 32M
mount -t ext4 /dev/vda /mnt
echo hello-from-outboard >/mnt/hello.txt
sync
umount /mnt
echo fs-ok
";

    /// The pattern as the host expects it (built here, not by the guest).
    pub fn expected_pattern() -> Vec<u8> {
        PATTERN_LINE
            .repeat(MIB / PATTERN_LINE.len() + 1)
            .into_bytes()[..MIB]
            .to_vec()
    }

    /// Host-side checks of a qcow2 image after [`SCRIPT`] ran on it, independent of the
    /// VMM and the daemon: the pattern at 48 MiB (image converted by qemu-img), the ext4
    /// superblock, the file read back by debugfs, and `qemu-img check` clean.
    pub fn check_image(image: &Path, what: &str) {
        let raw = qemu_read_all(image, "qcow2");
        assert_bytes_eq(
            &expected_pattern(),
            &raw[PATTERN_OFF..PATTERN_OFF + MIB],
            &format!("{what}: pattern at 48 MiB"),
        );
        assert_eq!(
            &raw[0x438..0x43a],
            &[0x53, 0xef],
            "{what}: ext4 superblock magic"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let rawf = dir.path().join("disk.raw");
        fs::write(&rawf, &raw).expect("write raw copy");
        let debugfs = |req: &str| {
            let o = Command::new("debugfs")
                .arg("-R")
                .arg(req)
                .arg(&rawf)
                .output()
                .expect("run debugfs (e2fsprogs)");
            (
                String::from_utf8_lossy(&o.stdout).into_owned(),
                String::from_utf8_lossy(&o.stderr).into_owned(),
            )
        };
        let (out, err) = debugfs("cat /hello.txt");
        assert_eq!(
            out, "hello-from-outboard\n",
            "{what}: file written in the guest, read by debugfs: {err}"
        );
        let (feats, _) = debugfs("features");
        assert!(
            feats.contains("extent") && feats.contains("has_journal"),
            "{what}: not an ext4 file system: {feats}"
        );
        assert_qemu_check_clean(image, what);
    }
}

/// Two network namespaces for the VMM's NIC tests: `vm` holds the bridge `obbr0` (where
/// the daemon attaches its tap) and one end of a veth pair whose other end, in `peer`, has
/// 10.77.0.1/24. The guest takes 10.77.0.2/24. Both are deleted on drop.
#[derive(Debug)]
pub struct BridgedPeer {
    /// Where `outboard` and the net daemon run.
    pub vm: crate::netns::Netns,
    /// The "host in another network".
    pub peer: crate::netns::Netns,
}

impl BridgedPeer {
    /// The bridge's name in `vm`.
    pub const BRIDGE: &'static str = "obbr0";
    /// The peer's address.
    pub const PEER_IP: &'static str = "10.77.0.1";
    /// The guest's address.
    pub const GUEST_IP: &'static str = "10.77.0.2";

    /// Creates and wires both namespaces.
    pub fn new() -> Self {
        let vm = crate::netns::Netns::new("vmm");
        let peer = crate::netns::Netns::new("peer");
        vm.ip(&["link", "add", Self::BRIDGE, "type", "bridge"]);
        vm.ip(&["link", "set", Self::BRIDGE, "up"]);
        vm.veth("vm-side", &peer, "peer-side");
        vm.ip(&["link", "set", "vm-side", "master", Self::BRIDGE]);
        peer.ip(&["addr", "add", "10.77.0.1/24", "dev", "peer-side"]);
        BridgedPeer { vm, peer }
    }

    /// Guest script lines: eth0 up with [`Self::GUEST_IP`], its MAC printed.
    pub fn guest_setup() -> String {
        format!(
            "ip link set eth0 up\nip addr add {}/24 dev eth0\ncat /sys/class/net/eth0/address\n",
            Self::GUEST_IP
        )
    }

    /// Panics unless the peer's neighbour table holds `mac` for the guest (evidence
    /// independent of the guest's own report).
    pub fn assert_peer_learned(&self, mac: &str) {
        let o = self
            .peer
            .exec(&["ip", "neigh", "show", Self::GUEST_IP])
            .to_lowercase();
        assert!(
            o.contains(mac),
            "the peer namespace never learned the guest's MAC {mac}: {o:?}"
        );
    }

    /// The bridge `dev` is attached to in `vm` (None: not on a bridge).
    pub fn master_of(&self, dev: &str) -> Option<String> {
        let o = self.vm.exec(&["ip", "-o", "link", "show", "dev", dev]);
        let mut words = o.split_whitespace();
        while let Some(w) = words.next() {
            if w == "master" {
                return words.next().map(str::to_string);
            }
        }
        None
    }
}

impl Default for BridgedPeer {
    fn default() -> Self {
        Self::new()
    }
}
