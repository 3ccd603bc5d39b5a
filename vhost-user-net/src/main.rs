//! `vhost-user-net`: command line → [`Config`](vhost_user_net::cli::Config) → serve.

use clap::Parser;
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
    outboard_common::cli::init_logging(args.log_level);
    let result = Config::try_from(args)
        .map_err(|e| e.to_string())
        .and_then(|cfg| {
            vhost_user_net::run(cfg).map_err(|e| outboard_common::cli::error_chain(&e))
        });
    if let Err(msg) = result {
        eprintln!("vhost-user-net: {msg}");
        std::process::exit(1);
    }
}

/// `vhost-user-net ctl SOCKET COMMAND`: one request, one reply; exit 0 if ok.
fn ctl(socket: &Path, cmd: &CtlCmd) -> i32 {
    outboard_common::cli::ctl("vhost-user-net", socket, Ok(cmd.request()))
}
