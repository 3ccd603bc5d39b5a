//! `vhost-user-net`: command line → [`Config`](vhost_user_net::cli::Config) → serve.

use clap::Parser;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use vhost_user_net::cli::{capabilities, Args, Config, CtlCmd, Sub};

fn main() {
    let args = Args::parse();
    if let Some(Sub::Ctl { socket, cmd }) = &args.ctl {
        std::process::exit(ctl(socket, cmd));
    }
    if args.print_capabilities {
        println!("{}", capabilities());
        return;
    }
    env_logger::Builder::new()
        .filter_level(args.log_level)
        .format_target(false)
        .init();
    let result = Config::try_from(args)
        .map_err(|e| e.to_string())
        .and_then(|cfg| vhost_user_net::run(cfg).map_err(|e| chain(&e)));
    if let Err(msg) = result {
        eprintln!("vhost-user-net: {msg}");
        std::process::exit(1);
    }
}

/// "outer: inner: innermost" from an error's source chain.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// `vhost-user-net ctl SOCKET COMMAND`: one request, one reply; exit 0 if ok.
fn ctl(socket: &Path, cmd: &CtlCmd) -> i32 {
    let run = || -> Result<serde_json::Value, String> {
        let mut s =
            UnixStream::connect(socket).map_err(|e| format!("{}: {e}", socket.display()))?;
        writeln!(s, "{}", cmd.request()).map_err(|e| format!("send: {e}"))?;
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
            eprintln!("vhost-user-net ctl: {err}");
            1
        }
        Err(e) => {
            eprintln!("vhost-user-net ctl: {e}");
            1
        }
    }
}
