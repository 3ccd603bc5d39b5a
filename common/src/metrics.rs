//! The Prometheus endpoint both daemons serve with `--metrics`: a minimal
//! HTTP/1.0 responder on a tokio current-thread runtime on its own thread
//! (like the control socket), listening on unix socket paths and/or
//! loopback TCP addresses.
//!
//! `GET /metrics` answers `200` with the text the daemon's render closure
//! writes (text exposition format 0.0.4); any other path is `404`, any
//! other method `405`, an unparsable request `400`. Every connection is
//! closed after one answer. A client gets [`CLIENT_TIMEOUT`] for its whole
//! exchange and at most [`MAX_REQUEST`] bytes of request head; at most
//! [`MAX_CLIENTS`] are served at once (more are closed at once), so a
//! hostile client can neither hang the endpoint nor make it grow.
//!
//! The endpoint uses only what the control socket already needs under the
//! seccomp filter (accept4, read/recvfrom, write/sendto, close,
//! epoll_wait, clock_gettime, futex): no system call is added for it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Longest request head read (request line and headers).
pub const MAX_REQUEST: usize = 4096;
/// Time a client gets for its whole exchange.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Clients served at once.
pub const MAX_CLIENTS: usize = 16;

/// Where `--metrics` listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsListen {
    /// `unix:PATH`: a unix socket (a stale socket file is replaced).
    Unix(PathBuf),
    /// `ADDR:PORT`: a loopback TCP address (port 0 picks a free port,
    /// logged at start-up).
    Tcp(SocketAddr),
}

/// Parses a `--metrics` value: `unix:PATH` or a loopback `IP:PORT`
/// (`127.0.0.1:9100`, `[::1]:9100`).
pub fn parse_listen(s: &str) -> Result<MetricsListen, String> {
    if let Some(p) = s.strip_prefix("unix:") {
        if p.is_empty() {
            return Err("unix: needs a path, e.g. unix:/run/vm0-metrics.sock".into());
        }
        return Ok(MetricsListen::Unix(PathBuf::from(p)));
    }
    let addr: SocketAddr = s.parse().map_err(|_| {
        format!("{s:?}: expected unix:PATH or a loopback IP:PORT such as 127.0.0.1:9100")
    })?;
    if !addr.ip().is_loopback() {
        return Err(format!(
            "{s:?}: metrics are served on loopback addresses only (127.0.0.0/8, ::1); \
             use a unix socket or a proxy to publish them"
        ));
    }
    Ok(MetricsListen::Tcp(addr))
}

/// Errors setting up the endpoint.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// A unix socket could not be bound.
    #[error("metrics socket")]
    Unix(#[source] crate::server::ServeError),
    /// A TCP address could not be bound.
    #[error("metrics address {addr}")]
    Tcp {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The runtime or thread could not start.
    #[error("metrics thread")]
    Runtime(#[source] std::io::Error),
}

enum Bound {
    Unix(std::os::unix::net::UnixListener),
    Tcp(std::net::TcpListener),
}

/// Binds every address of `listen` and serves them on a thread named
/// `metrics`; `render` appends the exposition text to the buffer it is
/// given (called once per scrape, on that thread). Returns what was bound,
/// as text for the log (TCP with the actual port).
pub fn spawn<R>(listen: &[MetricsListen], render: R) -> Result<Vec<String>, MetricsError>
where
    R: Fn(&mut String) + Send + Sync + 'static,
{
    let mut bound = Vec::with_capacity(listen.len());
    let mut names = Vec::with_capacity(listen.len());
    for l in listen {
        match l {
            MetricsListen::Unix(p) => {
                let s = crate::server::bind(p).map_err(MetricsError::Unix)?;
                s.set_nonblocking(true).map_err(MetricsError::Runtime)?;
                names.push(format!("unix:{}", p.display()));
                bound.push(Bound::Unix(s));
            }
            MetricsListen::Tcp(addr) => {
                let tcp_err = |source| MetricsError::Tcp {
                    addr: *addr,
                    source,
                };
                let s = std::net::TcpListener::bind(addr).map_err(tcp_err)?;
                s.set_nonblocking(true).map_err(tcp_err)?;
                let local = s.local_addr().map_err(tcp_err)?;
                names.push(local.to_string());
                bound.push(Bound::Tcp(s));
            }
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(MetricsError::Runtime)?;
    let render: Arc<dyn Fn(&mut String) + Send + Sync> = Arc::new(render);
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            rt.block_on(async move {
                let clients = Arc::new(AtomicUsize::new(0));
                let mut tasks = Vec::with_capacity(bound.len());
                for b in bound {
                    tasks.push(tokio::spawn(accept_loop(
                        b,
                        render.clone(),
                        clients.clone(),
                    )));
                }
                for t in tasks {
                    let _ = t.await;
                }
            })
        })
        .map_err(MetricsError::Runtime)?;
    Ok(names)
}

async fn accept_loop(
    b: Bound,
    render: Arc<dyn Fn(&mut String) + Send + Sync>,
    clients: Arc<AtomicUsize>,
) {
    enum L {
        U(tokio::net::UnixListener),
        T(tokio::net::TcpListener),
    }
    let l = match b {
        Bound::Unix(s) => tokio::net::UnixListener::from_std(s).map(L::U),
        Bound::Tcp(s) => tokio::net::TcpListener::from_std(s).map(L::T),
    };
    let l = match l {
        Ok(l) => l,
        Err(e) => return log::error!("metrics listener: {e}"),
    };
    loop {
        let accepted = match &l {
            L::U(l) => l.accept().await.map(|(s, _)| Client::U(s)),
            L::T(l) => l.accept().await.map(|(s, _)| Client::T(s)),
        };
        let stream = match accepted {
            Ok(s) => s,
            Err(e) => {
                log::warn!("metrics accept: {e}");
                // Out of fds and the like: do not spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if clients.fetch_add(1, Ordering::Relaxed) >= MAX_CLIENTS {
            clients.fetch_sub(1, Ordering::Relaxed);
            drop(stream);
            continue;
        }
        let render = render.clone();
        let clients = clients.clone();
        tokio::spawn(async move {
            let r = match stream {
                Client::U(s) => {
                    tokio::time::timeout(CLIENT_TIMEOUT, serve_client(s, &*render)).await
                }
                Client::T(s) => {
                    tokio::time::timeout(CLIENT_TIMEOUT, serve_client(s, &*render)).await
                }
            };
            if let Ok(Err(e)) = r {
                log::debug!("metrics client: {e}");
            }
            clients.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

enum Client {
    U(tokio::net::UnixStream),
    T(tokio::net::TcpStream),
}

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics,
    NotFound,
    BadMethod,
    BadRequest,
    TooLarge,
}

/// Routes a request head (the bytes up to the blank line).
fn route(head: &[u8]) -> Route {
    let line_end = head.iter().position(|&b| b == b'\n').unwrap_or(head.len());
    let Ok(line) = std::str::from_utf8(&head[..line_end]) else {
        return Route::BadRequest;
    };
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Route::BadRequest;
    };
    if !version.starts_with("HTTP/1.") {
        return Route::BadRequest;
    }
    if method != "GET" {
        return Route::BadMethod;
    }
    let path = target.split('?').next().unwrap_or(target);
    if path == "/metrics" {
        Route::Metrics
    } else {
        Route::NotFound
    }
}

/// Reads the request head: up to the first blank line, at most
/// [`MAX_REQUEST`] bytes. `Ok(None)`: the client closed first.
async fn read_head<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut [u8; MAX_REQUEST],
) -> std::io::Result<Option<Route>> {
    let mut len = 0;
    loop {
        if len == buf.len() {
            return Ok(Some(Route::TooLarge));
        }
        let n = s.read(&mut buf[len..]).await?;
        if n == 0 {
            return Ok(None);
        }
        len += n;
        let got = &buf[..len];
        if got.windows(4).any(|w| w == b"\r\n\r\n") || got.windows(2).any(|w| w == b"\n\n") {
            return Ok(Some(route(got)));
        }
    }
}

async fn serve_client<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    render: &(dyn Fn(&mut String) + Send + Sync),
) -> std::io::Result<()> {
    let mut buf = [0u8; MAX_REQUEST];
    let Some(route) = read_head(&mut s, &mut buf).await? else {
        return Ok(());
    };
    let (status, body) = match route {
        Route::Metrics => {
            let mut body = String::with_capacity(16 << 10);
            render(&mut body);
            ("200 OK", body)
        }
        Route::NotFound => ("404 Not Found", "not found; try /metrics\n".to_string()),
        Route::BadMethod => ("405 Method Not Allowed", "GET only\n".to_string()),
        Route::BadRequest => ("400 Bad Request", "bad request\n".to_string()),
        Route::TooLarge => (
            "431 Request Header Fields Too Large",
            "request too large\n".to_string(),
        ),
    };
    let ctype = if route == Route::Metrics {
        "text/plain; version=0.0.4; charset=utf-8"
    } else {
        "text/plain; charset=utf-8"
    };
    let head = format!(
        "HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body.as_bytes()).await?;
    s.flush().await?;
    s.shutdown().await
}

/// Appends `# HELP` and `# TYPE` lines for a metric family.
pub fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    use std::fmt::Write;
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_values() {
        assert_eq!(
            parse_listen("unix:/run/m.sock"),
            Ok(MetricsListen::Unix("/run/m.sock".into()))
        );
        assert!(matches!(
            parse_listen("127.0.0.1:9100"),
            Ok(MetricsListen::Tcp(a)) if a.port() == 9100
        ));
        assert!(parse_listen("[::1]:0").is_ok());
        assert!(parse_listen("127.1.2.3:80").is_ok());
        let e = parse_listen("0.0.0.0:9100").expect_err("not loopback");
        assert!(e.contains("loopback"), "{e}");
        assert!(parse_listen("192.168.1.1:9100").is_err());
        assert!(parse_listen("localhost:9100").is_err());
        assert!(parse_listen("unix:").is_err());
        assert!(parse_listen("9100").is_err());
    }

    #[test]
    fn routes() {
        assert_eq!(
            route(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Route::Metrics
        );
        assert_eq!(route(b"GET /metrics?x=1 HTTP/1.0\n\n"), Route::Metrics);
        assert_eq!(route(b"GET / HTTP/1.0\r\n\r\n"), Route::NotFound);
        assert_eq!(route(b"POST /metrics HTTP/1.0\r\n\r\n"), Route::BadMethod);
        assert_eq!(route(b"GET /metrics\r\n\r\n"), Route::BadRequest);
        assert_eq!(route(b"\xff\xfe\r\n\r\n"), Route::BadRequest);
    }

    fn exchange(path: &std::path::Path, req: &[u8]) -> String {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(path).expect("connect");
        s.write_all(req).expect("send");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("receive");
        out
    }

    #[test]
    fn serves_unix_and_tcp() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("m.sock");
        let names = spawn(
            &[
                MetricsListen::Unix(sock.clone()),
                MetricsListen::Tcp("127.0.0.1:0".parse().expect("addr")),
            ],
            |out: &mut String| {
                family(out, "x_total", "counter", "X.");
                out.push_str("x_total 7\n");
            },
        )
        .expect("spawn");
        assert_eq!(names.len(), 2);
        let r = exchange(&sock, b"GET /metrics HTTP/1.0\r\n\r\n");
        assert!(r.starts_with("HTTP/1.0 200 OK\r\n"), "{r}");
        assert!(r.contains("Content-Type: text/plain; version=0.0.4"), "{r}");
        assert!(
            r.ends_with("# HELP x_total X.\n# TYPE x_total counter\nx_total 7\n"),
            "{r}"
        );
        assert!(exchange(&sock, b"GET /nope HTTP/1.0\r\n\r\n").starts_with("HTTP/1.0 404"));
        // Exactly the limit, no blank line (more would be left unread and
        // reset the connection).
        let big = vec![b'a'; MAX_REQUEST];
        assert!(exchange(&sock, &big).starts_with("HTTP/1.0 431"));

        use std::io::{Read, Write};
        let mut t = std::net::TcpStream::connect(&names[1]).expect("tcp connect");
        t.write_all(b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n")
            .expect("send");
        let mut out = String::new();
        t.read_to_string(&mut out).expect("receive");
        assert!(out.ends_with("x_total 7\n"), "{out}");
    }
}
