//! What both daemons' `main` does the same way: logging set-up, one-line
//! error messages from an error's source chain, and the `ctl` client of the
//! JSON-lines control socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

/// Logs to stderr at `level`, without module targets.
pub fn init_logging(level: log::LevelFilter) {
    env_logger::Builder::new()
        .filter_level(level)
        .format_target(false)
        .init();
}

/// "outer: inner: innermost" from an error's source chain.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// `PROGRAM ctl SOCKET COMMAND`: sends one request line, prints the reply
/// (pretty JSON) when it says `"ok": true`, else its `error` on stderr.
/// Returns the process exit code: 0 if ok, 1 otherwise.
pub fn ctl(program: &str, socket: &Path, request: Result<serde_json::Value, String>) -> i32 {
    let run = || -> Result<serde_json::Value, String> {
        let req = request?;
        let mut s =
            UnixStream::connect(socket).map_err(|e| format!("{}: {e}", socket.display()))?;
        writeln!(s, "{req}").map_err(|e| format!("send: {e}"))?;
        let mut line = String::new();
        BufReader::new(&s)
            .read_line(&mut line)
            .map_err(|e| format!("receive: {e}"))?;
        serde_json::from_str(&line).map_err(|e| format!("bad reply {line:?}: {e}"))
    };
    match run() {
        Ok(reply) if reply.get("ok").and_then(serde_json::Value::as_bool) == Some(true) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&reply).unwrap_or_default()
            );
            0
        }
        Ok(reply) => {
            let err = reply
                .get("error")
                .and_then(serde_json::Value::as_str)
                .unwrap_or("failed");
            eprintln!("{program} ctl: {err}");
            1
        }
        Err(e) => {
            eprintln!("{program} ctl: {e}");
            1
        }
    }
}
