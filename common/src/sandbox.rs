//! Least privilege for the daemons: a seccomp filter (built with
//! `seccompiler`) that allows only the system calls a daemon needs once it
//! is serving, and dropping root for an unprivileged user.
//!
//! A daemon sets up everything that needs more (opening the image, binding
//! sockets, creating the tap) first, then calls [`drop_privileges`] and
//! [`apply`]. The filter covers every thread of the process (TSYNC), and the
//! threads started later inherit it.

use std::collections::BTreeMap;
use std::ffi::CString;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// What the filter does with a system call that is not allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeccompMode {
    /// The call fails with EPERM (the default: a missing entry breaks one
    /// operation, not the daemon).
    #[default]
    Errno,
    /// The process is killed with SIGSYS.
    Kill,
    /// Allowed, but logged by the kernel (to build the allow list).
    Log,
    /// No filter.
    Off,
}

impl std::str::FromStr for SeccompMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "errno" | "on" => SeccompMode::Errno,
            "kill" => SeccompMode::Kill,
            "log" => SeccompMode::Log,
            "off" => SeccompMode::Off,
            _ => return Err(format!("{s:?}: expected errno, kill, log or off")),
        })
    }
}

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The filter could not be built.
    #[error("building the seccomp filter")]
    Build(#[source] seccompiler::BackendError),
    /// The filter could not be compiled or installed.
    #[error("installing the seccomp filter")]
    Install(#[source] seccompiler::Error),
    /// The architecture has no syscall table here.
    #[error("seccomp: unsupported architecture")]
    Arch,
    /// No such user.
    #[error("user {0:?} not found")]
    NoUser(String),
    /// setgroups/setgid/setuid failed.
    #[error("dropping privileges to {user}")]
    Drop {
        /// The user.
        user: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// System calls every daemon needs while serving: memory, threads and
/// futexes, file and socket I/O, epoll/eventfd, signals, time, io_uring.
pub const BASE_SYSCALLS: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_brk,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_close,
    libc::SYS_dup,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_wait,
    libc::SYS_eventfd2,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_fallocate,
    libc::SYS_fcntl,
    libc::SYS_fdatasync,
    libc::SYS_fstat,
    libc::SYS_fsync,
    libc::SYS_ftruncate,
    libc::SYS_futex,
    libc::SYS_getpid,
    libc::SYS_getrandom,
    libc::SYS_getsockopt,
    libc::SYS_gettid,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_io_uring_setup,
    libc::SYS_lseek,
    libc::SYS_madvise,
    libc::SYS_memfd_create,
    libc::SYS_mmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_munmap,
    libc::SYS_nanosleep,
    libc::SYS_newfstatat,
    libc::SYS_openat,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_pread64,
    libc::SYS_preadv,
    libc::SYS_prctl,
    libc::SYS_pwrite64,
    libc::SYS_pwritev,
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    // The kernel's way to resume a sleep (clock_nanosleep, poll) that was
    // interrupted, e.g. by io_uring task work: without it such a sleep fails
    // with EPERM and std's thread::sleep panics.
    libc::SYS_restart_syscall,
    libc::SYS_rseq,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_yield,
    libc::SYS_sendmsg,
    libc::SYS_sendto,
    libc::SYS_set_robust_list,
    libc::SYS_shutdown,
    libc::SYS_sigaltstack,
    libc::SYS_statx,
    libc::SYS_tgkill,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_write,
    libc::SYS_writev,
];

/// `ioctl` requests allowed (the second argument): non-blocking and
/// close-on-exec flags on sockets, and the terminal check of the logger.
pub const IOCTLS: &[u64] = &[libc::FIONBIO, libc::FIOCLEX, libc::TCGETS];

fn ioctl_rules(requests: &[u64]) -> Result<Vec<SeccompRule>, SandboxError> {
    requests
        .iter()
        .map(|&r| {
            let c = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, r)
                .map_err(SandboxError::Build)?;
            SeccompRule::new(vec![c]).map_err(SandboxError::Build)
        })
        .collect()
}

/// Builds the filter: `BASE_SYSCALLS` plus `extra` are allowed, `ioctl`
/// only for [`IOCTLS`], anything else gets `mode`'s action. `None` for
/// [`SeccompMode::Off`].
pub fn build(mode: SeccompMode, extra: &[i64]) -> Result<Option<BpfProgram>, SandboxError> {
    build_with_ioctls(mode, extra, &[])
}

/// [`build`] that also allows the `ioctl` requests `ioctls` (a daemon's own
/// device requests, e.g. the tap's TUNSETOFFLOAD).
pub fn build_with_ioctls(
    mode: SeccompMode,
    extra: &[i64],
    ioctls: &[u64],
) -> Result<Option<BpfProgram>, SandboxError> {
    let mismatch = match mode {
        SeccompMode::Off => return Ok(None),
        SeccompMode::Errno => SeccompAction::Errno(libc::EPERM as u32),
        SeccompMode::Kill => SeccompAction::KillProcess,
        SeccompMode::Log => SeccompAction::Log,
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BASE_SYSCALLS
        .iter()
        .chain(extra)
        .map(|&nr| (nr, Vec::new()))
        .collect();
    let requests: Vec<u64> = IOCTLS.iter().chain(ioctls).copied().collect();
    rules.insert(libc::SYS_ioctl, ioctl_rules(&requests)?);
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(|_| SandboxError::Arch)?;
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch)
        .map_err(SandboxError::Build)?;
    let prog: BpfProgram = filter
        .try_into()
        .map_err(|e| SandboxError::Install(seccompiler::Error::Backend(e)))?;
    Ok(Some(prog))
}

/// Installs the filter on every thread of the process (no-op for `Off`).
pub fn apply(mode: SeccompMode, extra: &[i64]) -> Result<(), SandboxError> {
    if let Some(prog) = build(mode, extra)? {
        seccompiler::apply_filter_all_threads(&prog).map_err(SandboxError::Install)?;
    }
    Ok(())
}

/// [`apply`] with the extra `ioctl` requests of [`build_with_ioctls`].
pub fn apply_with_ioctls(
    mode: SeccompMode,
    extra: &[i64],
    ioctls: &[u64],
) -> Result<(), SandboxError> {
    if let Some(prog) = build_with_ioctls(mode, extra, ioctls)? {
        seccompiler::apply_filter_all_threads(&prog).map_err(SandboxError::Install)?;
    }
    Ok(())
}

/// Switches to `user` (its uid, primary gid, no supplementary groups).
/// Only meaningful when running as root; a no-op for the current user.
pub fn drop_privileges(user: &str) -> Result<(), SandboxError> {
    let name = CString::new(user).map_err(|_| SandboxError::NoUser(user.into()))?;
    // SAFETY: getpwnam returns NULL or a pointer to static storage valid
    // until the next getpw* call; we copy the two fields at once.
    let (uid, gid) = unsafe {
        let pw = libc::getpwnam(name.as_ptr());
        if pw.is_null() {
            return Err(SandboxError::NoUser(user.into()));
        }
        ((*pw).pw_uid, (*pw).pw_gid)
    };
    let fail = |source| SandboxError::Drop {
        user: user.into(),
        source,
    };
    // SAFETY: plain system calls with integer arguments (setgroups with an
    // empty list).
    unsafe {
        if libc::geteuid() == uid {
            return Ok(());
        }
        if libc::setgroups(0, std::ptr::null()) != 0 {
            return Err(fail(std::io::Error::last_os_error()));
        }
        if libc::setgid(gid) != 0 {
            return Err(fail(std::io::Error::last_os_error()));
        }
        if libc::setuid(uid) != 0 {
            return Err(fail(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// The `Seccomp:` mode of `/proc/self/status` (0 none, 2 filter).
pub fn current_seccomp_mode() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp:"))
        .and_then(|v| v.trim().parse().ok())
}
