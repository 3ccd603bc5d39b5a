//! The net daemon's seccomp filter (`vhost_user_net::apply_seccomp`),
//! applied in a child process (this test binary re-executed, in a network
//! namespace of its own) that holds a real multi-queue tap: what the daemon
//! does to the tap while serving keeps working (queue detach/attach,
//! carrier, offloads, vnet header, persist), while creating another tap
//! (TUNSETIFF), changing the tap's owner and opening a netlink socket are
//! refused with EPERM (`errno` mode) or kill the process (`kill` mode).

use std::os::unix::process::ExitStatusExt;
use std::process::Command;

use vhost_user_net::tap::Tap;

const CHILD_ENV: &str = "OB_NET_SANDBOX_CHILD";

fn errno_of(r: libc::c_int) -> String {
    if r >= 0 {
        "ok".into()
    } else {
        format!(
            "errno{}",
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
        )
    }
}

/// Runs in the child: prints one `name=result` line per operation.
#[test]
fn sandbox_child() {
    let Ok(mode) = std::env::var(CHILD_ENV) else {
        return;
    };
    // SAFETY: unshare with a flag only changes this process's namespaces.
    let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "unshare: {}", std::io::Error::last_os_error());
    let tap = Tap::open("obsb0", 2).expect("tap");
    vhost_user_net::apply_seccomp(mode.parse().expect("mode")).expect("filter");
    let ok = |r: Result<(), vhost_user_net::tap::TapError>| match r {
        Ok(()) => "ok".to_string(),
        Err(e) => format!("{e:?}"),
    };
    println!("detach={}", ok(tap.set_queue_attached(1, false)));
    println!("attach={}", ok(tap.set_queue_attached(1, true)));
    println!("carrier={}", ok(tap.set_carrier(true)));
    println!("offload={}", ok(tap.set_offload(libc::TUN_F_CSUM)));
    println!("hdrlen={}", ok(tap.set_vnet_hdr_len(10)));
    println!("persist={}", ok(tap.set_persist(false)));
    let fd = tap.fd(0).expect("fd");
    let uid: libc::c_ulong = 65534;
    // SAFETY: TUNSETOWNER takes its argument by value.
    let r = unsafe { libc::ioctl(fd, libc::TUNSETOWNER, uid) };
    println!("setowner={}", errno_of(r));
    let other = Tap::open("obsb1", 1);
    println!(
        "newtap={}",
        match other {
            Ok(_) => "ok".to_string(),
            Err(e) => std::error::Error::source(&e)
                .and_then(|s| s.downcast_ref::<std::io::Error>())
                .and_then(std::io::Error::raw_os_error)
                .map_or("err".into(), |n| format!("errno{n}")),
        }
    );
    // SAFETY: plain socket(2); closed right away if it was created.
    let r = unsafe {
        let s = libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_ROUTE);
        let e = errno_of(s);
        if s >= 0 {
            libc::close(s);
        }
        e
    };
    println!("netlink={r}");
}

fn run_child(mode: &str) -> std::process::Output {
    Command::new(std::env::current_exe().expect("exe"))
        .args([
            "--exact",
            "sandbox_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, mode)
        .output()
        .expect("run child")
}

fn lines(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_filter_allows_the_tap_requests_and_refuses_the_rest() {
    let out = run_child("errno");
    let text = lines(&out);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for op in [
        "detach", "attach", "carrier", "offload", "hdrlen", "persist",
    ] {
        assert!(text.contains(&format!("{op}=ok")), "{op}: {text}");
    }
    let eperm = format!("errno{}", libc::EPERM);
    for op in ["setowner", "newtap", "netlink"] {
        assert!(
            text.contains(&format!("{op}={eperm}")),
            "{op} refused: {text}"
        );
    }
}

#[test]
fn without_the_filter_the_same_calls_go_through() {
    let out = run_child("off");
    let text = lines(&out);
    assert!(out.status.success(), "{text}");
    for op in ["setowner", "newtap", "netlink"] {
        assert!(text.contains(&format!("{op}=ok")), "{op}: {text}");
    }
}

#[test]
fn kill_mode_kills_on_the_first_forbidden_call() {
    let out = run_child("kill");
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGSYS),
        "{:?}: {}",
        out.status,
        lines(&out)
    );
    let text = lines(&out);
    assert!(text.contains("persist=ok"), "allowed calls ran: {text}");
    assert!(!text.contains("setowner="), "killed at TUNSETOWNER: {text}");
}
