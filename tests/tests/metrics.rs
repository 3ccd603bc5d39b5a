//! The Prometheus endpoint (`--metrics`, issue 11 part 2): vhost-user-blk
//! serves it on a unix socket and a loopback TCP port at once; after a
//! known workload (N writes, M reads, one flush of known sizes through
//! libblkio) both scrapes show exactly those counts and bytes (and as many
//! latency observations, nothing in flight), the text
//! passes `promtool check metrics`, other paths are 404, garbage is 400 and
//! an idle client is cut off after 5 s (kill mode). Run under the
//! seccomp filter in its default errno mode and in kill mode (a system call
//! the endpoint needs and the filter lacks would kill the daemon). A
//! non-loopback address is refused at start-up.
//!
//! vhost-user-net (in a network namespace): with no frontend, both
//! endpoints (unix and 127.0.0.1:0) pass promtool and agree with
//! `ctl stats`; after a dpdk-testpmd txonly load of 64-byte frames, TX
//! bytes are exactly 64 per frame counted, the daemon counted no more
//! frames than testpmd sent, and the scrape equals `ctl stats`.

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use outboard_tests::blkio_client::{
    create_image, ours_command, ClientOptions, Daemon, DaemonConfig, Format,
};
use outboard_tests::skip::{skip, Missing};

const WRITES: u64 = 5;
const WRITE_LEN: u64 = 12288;
const READS: u64 = 7;
const READ_LEN: u64 = 8192;

/// `promtool` if installed (scripts/test.sh installs Debian's prometheus).
fn promtool() -> Option<&'static str> {
    Command::new("promtool")
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|_| "promtool")
}

/// A free loopback port: bind port 0, note it, let it go.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").port()
}

/// Sends `request` over `s` and returns the whole answer (the server
/// closes after one).
fn exchange(mut s: impl Read + Write, request: &str) -> String {
    s.write_all(request.as_bytes()).expect("send request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read answer");
    out
}

fn get_unix(sock: &Path, path: &str) -> String {
    let s = std::os::unix::net::UnixStream::connect(sock).expect("connect metrics socket");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    exchange(s, &format!("GET {path} HTTP/1.0\r\n\r\n"))
}

fn get_tcp(port: u16, path: &str) -> String {
    let s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect metrics port");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    exchange(
        s,
        &format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: test\r\n\r\n"),
    )
}

/// The body of a 200 answer with the exposition content type.
fn body(answer: &str) -> &str {
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {answer:?}"));
    assert!(head.starts_with("HTTP/1.0 200 OK\r\n"), "{head}");
    assert!(
        head.contains("\r\nContent-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    body
}

/// The value of the sample `series` (name and labels exactly as printed).
fn sample(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
        .parse()
        .unwrap_or_else(|e| panic!("{series}: {e}"))
}

fn promtool_check(tool: &str, text: &str) {
    let mut child = Command::new(tool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start promtool");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics failed ({}):\n{}{}\non:\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn blk_workload(seccomp: &str) {
    let Some(tool) = promtool() else {
        return skip(
            Missing::Installed,
            "promtool (Debian package prometheus) is not installed",
        );
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.raw");
    create_image(&image, Format::Raw, 8 << 20);
    let cfg = DaemonConfig {
        image,
        format: Format::Raw,
        socket: dir.path().join("vhost.sock"),
        num_queues: 1,
        direct: false,
    };
    let msock = dir.path().join("metrics.sock");
    let port = free_port();
    let mut cmd = ours_command(&outboard_tests::workspace_binary("vhost-user-blk"), &cfg);
    cmd.arg("--seccomp")
        .arg(seccomp)
        .arg("--metrics")
        .arg(format!("unix:{}", msock.display()))
        .arg("--metrics")
        .arg(format!("127.0.0.1:{port}"));
    let mut daemon = Daemon::spawn("vhost-user-blk", cmd, &cfg.socket, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}"));
    // The prologue binds the vhost-user socket first, then the endpoint.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !msock.exists() {
        assert!(
            daemon.is_running() && std::time::Instant::now() < deadline,
            "no metrics socket:\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(5));
    }

    // Before any I/O: all zero, and valid.
    let before = get_unix(&msock, "/metrics");
    let text = body(&before);
    promtool_check(tool, text);
    assert_eq!(
        sample(text, r#"outboard_blk_requests_total{queue="0",op="write"}"#),
        0
    );

    let mut c = daemon
        .connect(&ClientOptions::queues(1))
        .unwrap_or_else(|e| panic!("connect: {e}\n{}", daemon.log_text()));
    for i in 0..WRITES {
        let data = vec![i as u8 + 1; WRITE_LEN as usize];
        c.write(i * WRITE_LEN, &data).expect("write");
    }
    for i in 0..READS {
        c.read(i * READ_LEN, READ_LEN as usize).expect("read");
    }
    c.flush().expect("flush");

    for answer in [get_unix(&msock, "/metrics"), get_tcp(port, "/metrics")] {
        let text = body(&answer);
        promtool_check(tool, text);
        let q = |name: &str, labels: &str| sample(text, &format!("{name}{{queue=\"0\",{labels}}}"));
        assert_eq!(q("outboard_blk_requests_total", r#"op="write""#), WRITES);
        assert_eq!(q("outboard_blk_requests_total", r#"op="read""#), READS);
        assert_eq!(q("outboard_blk_requests_total", r#"op="flush""#), 1);
        assert_eq!(q("outboard_blk_requests_total", r#"op="discard""#), 0);
        assert_eq!(q("outboard_blk_requests_total", r#"op="write_zeroes""#), 0);
        // libblkio sends nothing else (no get-id): nothing outside the workload.
        assert_eq!(q("outboard_blk_requests_total", r#"op="other""#), 0);
        assert_eq!(
            q("outboard_blk_bytes_total", r#"op="write""#),
            WRITES * WRITE_LEN
        );
        assert_eq!(
            q("outboard_blk_bytes_total", r#"op="read""#),
            READS * READ_LEN
        );
        for kind in ["io", "no_space", "corrupt", "malformed"] {
            assert_eq!(
                q("outboard_blk_errors_total", &format!("kind=\"{kind}\"")),
                0,
                "{kind}"
            );
        }
        // Latency histograms: one observation per disk operation, the
        // buckets cumulative up to +Inf = _count.
        for (op, n) in [
            ("read", READS),
            ("write", WRITES),
            ("flush", 1),
            ("discard", 0),
        ] {
            let labels = format!("queue=\"0\",op=\"{op}\"");
            let count = sample(
                text,
                &format!("outboard_blk_request_duration_seconds_count{{{labels}}}"),
            );
            assert_eq!(count, n, "{op}");
            let buckets: Vec<u64> = text
                .lines()
                .filter(|l| {
                    l.starts_with(&format!(
                        "outboard_blk_request_duration_seconds_bucket{{{labels},"
                    ))
                })
                .map(|l| {
                    l.rsplit(' ')
                        .next()
                        .and_then(|v| v.parse().ok())
                        .expect("value")
                })
                .collect();
            assert_eq!(buckets.len(), 14, "{op}");
            assert!(
                buckets.windows(2).all(|w| w[0] <= w[1]),
                "{op}: {buckets:?}"
            );
            assert_eq!(buckets.last(), Some(&n), "{op}");
        }
        assert_eq!(sample(text, r#"outboard_blk_in_flight{queue="0"}"#), 0);
        assert!(text.contains("# TYPE outboard_blk_in_flight gauge\n"));
        assert!(text.contains("# TYPE outboard_blk_request_duration_seconds histogram\n"));
        for name in [
            "outboard_blk_ring_errors_total",
            "outboard_blk_resubmitted_total",
            "outboard_blk_status_errors_total",
        ] {
            assert_eq!(sample(text, &format!("{name}{{queue=\"0\"}}")), 0, "{name}");
            assert!(text.contains(&format!("# TYPE {name} counter\n")), "{name}");
        }
    }

    assert!(get_unix(&msock, "/").starts_with("HTTP/1.0 404 "));
    assert!(get_tcp(port, "/metricsx").starts_with("HTTP/1.0 404 "));
    // A client that sends nothing and one that sends garbage do not stop
    // the endpoint.
    let idle = std::os::unix::net::UnixStream::connect(&msock).expect("idle client");
    assert!(get_unix(&msock, "/nope").starts_with("HTTP/1.0 404 "));
    let bad = exchange(
        std::os::unix::net::UnixStream::connect(&msock).expect("connect"),
        "\x01\x02 nonsense\r\n\r\n",
    );
    assert!(bad.starts_with("HTTP/1.0 400 "), "{bad}");
    if seccomp == "kill" {
        // The idle client is cut off after the endpoint's 5 s (its timer
        // firing under the filter too), without an answer.
        let t0 = std::time::Instant::now();
        let mut idle = idle;
        idle.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let mut rest = Vec::new();
        idle.read_to_end(&mut rest).expect("closed by the endpoint");
        let waited = t0.elapsed();
        assert!(rest.is_empty(), "{rest:?}");
        assert!(
            waited >= Duration::from_secs(3) && waited < Duration::from_secs(15),
            "idle client closed after {waited:?}"
        );
    } else {
        drop(idle);
    }
    // I/O still works and is still counted.
    c.write(0, &[9u8; 4096]).expect("write after scrapes");
    let text = get_tcp(port, "/metrics");
    assert_eq!(
        sample(
            body(&text),
            r#"outboard_blk_requests_total{queue="0",op="write"}"#
        ),
        WRITES + 1
    );
    drop(c);
    // The scrapes above ran under the filter (it is on once I/O is served).
    let pid = daemon.pid().expect("pid");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    assert!(
        status
            .lines()
            .any(|l| l.split_whitespace().eq(["Seccomp:", "2"])),
        "seccomp filter not on:\n{status}"
    );
    assert!(
        daemon.is_running(),
        "daemon died (seccomp {seccomp}):\n{}",
        daemon.log_text()
    );
    daemon.stop();
}

#[test]
fn blk_counts_a_known_workload_seccomp_errno() {
    blk_workload("errno");
}

#[test]
fn blk_counts_a_known_workload_seccomp_kill() {
    blk_workload("kill");
}

#[test]
fn non_loopback_address_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(outboard_tests::workspace_binary("vhost-user-blk"))
        .arg("--socket-path")
        .arg(dir.path().join("s.sock"))
        .arg("--blk-file")
        .arg(dir.path().join("none.raw"))
        .args(["--metrics", "0.0.0.0:9100"])
        .output()
        .expect("run vhost-user-blk");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("loopback"), "{err}");
}

/// vhost-user-net in its own namespace with `--metrics` on a unix socket and
/// on `127.0.0.1:0` (the namespace's loopback; the bound port is read from
/// the log), under `--seccomp kill`: both scrapes pass promtool, show every
/// queue of both pairs with its direction, and agree with `ctl stats` (no
/// frontend: all zero).
#[test]
fn net_daemon_serves_metrics() {
    let Some(tool) = promtool() else {
        return skip(
            Missing::Installed,
            "promtool (Debian package prometheus) is not installed",
        );
    };
    let ns = outboard_tests::netns::Netns::new("met");
    let dir = tempfile::tempdir().expect("tempdir");
    let msock = dir.path().join("net-metrics.sock");
    let unix_arg = format!("unix:{}", msock.display());
    let d = outboard_tests::netd::NetDaemon::spawn(
        &ns,
        &[
            "--tap",
            "obmtap0",
            "--queue-pairs",
            "2",
            "--seccomp",
            "kill",
            "--metrics",
            &unix_arg,
            "--metrics",
            "127.0.0.1:0",
        ],
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let port: u16 = loop {
        let log = d.log_text();
        let found = log
            .lines()
            .find_map(|l| l.split("metrics on ").nth(1))
            .and_then(|rest| rest.split("127.0.0.1:").nth(1))
            .and_then(|p| p.trim().parse().ok());
        if let (Some(p), true) = (found, d.status_field("Seccomp:").as_deref() == Some("2")) {
            break p;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no metrics port:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let over_tcp = ns.run(move || get_tcp(port, "/metrics"));
    let stats = d.stats();
    for answer in [get_unix(&msock, "/metrics"), over_tcp] {
        let text = body(&answer);
        promtool_check(tool, text);
        for (family, key) in [
            ("outboard_net_packets_total", "packets"),
            ("outboard_net_bytes_total", "bytes"),
            ("outboard_net_errors_total", "errors"),
            ("outboard_net_rx_holes_total", "holes"),
        ] {
            assert!(
                text.contains(&format!("# TYPE {family} counter\n")),
                "{family}"
            );
            for q in 0..4u64 {
                let dir = if q % 2 == 0 { "rx" } else { "tx" };
                let v = sample(
                    text,
                    &format!(
                        "{family}{{queue=\"{q}\",pair=\"{}\",direction=\"{dir}\"}}",
                        q / 2
                    ),
                );
                assert_eq!(
                    Some(v),
                    stats["queues"][q as usize][key].as_u64(),
                    "{family} {q}"
                );
            }
        }
        // Drops by reason: each matches its ctl stats counter, and they add up.
        assert!(text.contains("# TYPE outboard_net_drops_total counter\n"));
        for q in 0..4u64 {
            let dir = if q % 2 == 0 { "rx" } else { "tx" };
            let mut sum = 0;
            for reason in ["too_large", "runt", "tap_full", "tap_down"] {
                let series = format!(
                    "outboard_net_drops_total{{queue=\"{q}\",pair=\"{}\",direction=\"{dir}\",\
                     reason=\"{reason}\"}}",
                    q / 2
                );
                let v = sample(text, &series);
                assert_eq!(
                    Some(v),
                    stats["queues"][q as usize][format!("drop_{reason}")].as_u64(),
                    "{series}"
                );
                sum += v;
            }
            assert_eq!(
                Some(sum),
                stats["queues"][q as usize]["drops"].as_u64(),
                "{q}"
            );
        }
    }
    let mut d = d;
    assert!(d.is_running(), "daemon died:\n{}", d.log_text());
    assert!(d.terminate().success());
}

/// vhost-user-net under a workload: dpdk-testpmd (virtio-user) sends
/// 64-byte frames (`txonly`) for a second through the daemon to its tap on
/// a bridge; afterwards the scrape passes promtool, TX bytes are exactly 64
/// per frame counted, the daemon counted no more frames (written, dropped
/// or refused) than testpmd sent, and every value equals `ctl stats`.
#[test]
fn net_daemon_counts_a_testpmd_workload() {
    let Some(tool) = promtool() else {
        return skip(
            Missing::Installed,
            "promtool (Debian package prometheus) is not installed",
        );
    };
    if !Command::new("dpdk-testpmd")
        .arg("-h")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return skip(
            Missing::Installed,
            "dpdk-testpmd (Debian package dpdk) is not installed",
        );
    }
    let ns = outboard_tests::netns::Netns::new("metp");
    let dir = tempfile::tempdir().expect("tempdir");
    let msock = dir.path().join("net-metrics.sock");
    let unix_arg = format!("unix:{}", msock.display());
    let d = outboard_tests::netd::NetDaemon::spawn(
        &ns,
        &[
            "--tap",
            "obmtap1",
            "--bridge",
            "obmbr1",
            "--create-bridge",
            "--seccomp",
            "kill",
            "--metrics",
            &unix_arg,
        ],
    );
    let pmd = outboard_tests::testpmd::Testpmd::start(
        &outboard_tests::testpmd::virtio_user(&d.socket),
        &["--forward-mode=txonly", "--txpkts=64"],
        None,
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while d.stats()["link_up"] != true {
        assert!(
            std::time::Instant::now() < deadline,
            "testpmd did not start the queues\n{}\n{}",
            pmd.log_text(),
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_secs(1));
    let (_, pmd_tx) = pmd.stop();
    // The frontend is gone: the counters no longer move.
    d.wait_link(false, Duration::from_secs(10));
    let stats = d.stats();
    let text = get_unix(&msock, "/metrics");
    let text = body(&text);
    promtool_check(tool, text);
    let tx = |family: &str| {
        sample(
            text,
            &format!("{family}{{queue=\"1\",pair=\"0\",direction=\"tx\"}}"),
        )
    };
    let packets = tx("outboard_net_packets_total");
    let bytes = tx("outboard_net_bytes_total");
    let errors = tx("outboard_net_errors_total");
    let drops: u64 = ["too_large", "runt", "tap_full", "tap_down"]
        .iter()
        .map(|r| {
            sample(
                text,
                &format!(
                    "outboard_net_drops_total{{queue=\"1\",pair=\"0\",direction=\"tx\",reason=\"{r}\"}}"
                ),
            )
        })
        .sum();
    eprintln!("testpmd sent {pmd_tx}; daemon: {packets} frames, {bytes} bytes, {drops} drops, {errors} errors");
    assert!(packets >= 100, "only {packets} frames written to the tap");
    assert_eq!(bytes, 64 * packets, "64-byte frames");
    assert!(
        packets + drops + errors <= pmd_tx,
        "daemon counted {} frames, testpmd sent {pmd_tx}",
        packets + drops + errors
    );
    let q1 = &stats["queues"][1];
    assert_eq!(q1["packets"].as_u64(), Some(packets));
    assert_eq!(q1["bytes"].as_u64(), Some(bytes));
    assert_eq!(q1["drops"].as_u64(), Some(drops));
    assert_eq!(q1["errors"].as_u64(), Some(errors));
    let mut d = d;
    assert!(d.is_running(), "daemon died:\n{}", d.log_text());
    assert!(d.terminate().success());
}

/// The net rendering itself, with a known count.
#[test]
fn net_metrics_pass_promtool() {
    let Some(tool) = promtool() else {
        return skip(
            Missing::Installed,
            "promtool (Debian package prometheus) is not installed",
        );
    };
    let mut out = String::new();
    let queues: Vec<vhost_user_net::stats::QueueStats> =
        (0..4).map(|_| Default::default()).collect();
    vhost_user_net::stats::QueueStats::add(&queues[1].packets, 3);
    vhost_user_net::stats::render(&queues, &mut out);
    promtool_check(tool, &out);
    assert!(out.contains("outboard_net_packets_total{queue=\"1\",pair=\"0\",direction=\"tx\"} 3\n"));
    for name in [
        "outboard_net_packets_total",
        "outboard_net_bytes_total",
        "outboard_net_errors_total",
        "outboard_net_rx_holes_total",
    ] {
        assert!(out.contains(&format!("# TYPE {name} counter\n")), "{name}");
    }
}
