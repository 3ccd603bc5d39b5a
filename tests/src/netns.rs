//! Network namespaces for the network tests: each test creates its own
//! (`ip netns add`), wires them with veth pairs and bridges, runs code inside
//! them (a thread that `setns`es), and deletes them on drop, also when the
//! test fails. No traffic leaves these namespaces.

use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// Panics with an installation hint unless `ip` (iproute2) runs.
pub fn require_ip() {
    match Command::new("ip").arg("-V").output() {
        Ok(o) if o.status.success() => {}
        _ => panic!("the network tests need `ip` (apt-get install iproute2; scripts/test.sh does)"),
    }
}

/// A network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl Netns {
    /// Creates `ob-<tag>-<pid>-<n>` with loopback up and IPv6 off (no
    /// neighbour-discovery noise on the test links).
    pub fn new(tag: &str) -> Netns {
        require_ip();
        let name = format!(
            "ob-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns.exec(&[
            "sh",
            "-c",
            "echo 1 >/proc/sys/net/ipv6/conf/all/disable_ipv6 && \
             echo 1 >/proc/sys/net/ipv6/conf/default/disable_ipv6",
        ]);
        ns
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n NAME ARGS...` and panics on failure.
    pub fn ip(&self, args: &[&str]) {
        let mut a = vec!["-n", self.name.as_str()];
        a.extend_from_slice(args);
        run("ip", &a);
    }

    /// Runs a command inside the namespace (`ip netns exec`) and panics on failure.
    pub fn exec(&self, cmd: &[&str]) -> String {
        let mut a = vec!["netns", "exec", self.name.as_str()];
        a.extend_from_slice(cmd);
        run("ip", &a)
    }

    /// A `Command` that runs `program` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Creates a veth pair: `a` here, `b` in `other`; both up.
    pub fn veth(&self, a: &str, other: &Netns, b: &str) {
        self.ip(&[
            "link",
            "add",
            a,
            "type",
            "veth",
            "peer",
            "name",
            b,
            "netns",
            &other.name,
        ]);
        self.ip(&["link", "set", a, "up"]);
        other.ip(&["link", "set", b, "up"]);
    }

    /// Runs `f` on a thread that has entered this namespace; sockets and
    /// taps it creates belong to the namespace and can be used anywhere.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            let fd: OwnedFd = file.into();
            // SAFETY: setns on a namespace fd we hold; it only changes this
            // thread's network namespace.
            let r = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }

    /// The MAC address of `dev`.
    pub fn mac(&self, dev: &str) -> [u8; 6] {
        let s = self.exec(&["cat", &format!("/sys/class/net/{dev}/address")]);
        let mut mac = [0u8; 6];
        for (m, p) in mac.iter_mut().zip(s.trim().split(':')) {
            *m = u8::from_str_radix(p, 16).expect("mac");
        }
        mac
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "`{program} {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Internet checksum (RFC 1071) of `data`, starting from `sum`.
pub fn csum_add(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [b] = chunks.remainder() {
        sum += u32::from(*b) << 8;
    }
    sum
}

/// Folds a running sum into the 16-bit one's complement.
pub fn csum_fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The IPv4 pseudo-header sum of a TCP/UDP segment of `len` bytes.
pub fn pseudo_v4(src: [u8; 4], dst: [u8; 4], proto: u8, len: usize) -> u32 {
    let mut s = csum_add(0, &src);
    s = csum_add(s, &dst);
    s + u32::from(proto) + len as u32
}

/// Builds an Ethernet + IPv4 frame around an L4 payload (`l4` includes the
/// TCP/UDP header); the IPv4 header checksum is filled in.
pub fn ipv4_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    proto: u8,
    l4: &[u8],
) -> Vec<u8> {
    let mut f = Vec::with_capacity(34 + l4.len());
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + l4.len()) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    let c = !csum_fold(csum_add(0, &ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(l4);
    f
}
