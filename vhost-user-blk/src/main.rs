//! `vhost-user-blk`: command line → [`Config`](vhost_user_blk::cli::Config) → serve.

use clap::Parser;
use vhost_user_blk::cli::{capabilities, Args, Config};

fn main() {
    let args = Args::parse();
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
        .and_then(|cfg| vhost_user_blk::run(cfg).map_err(|e| chain(&e)));
    if let Err(msg) = result {
        eprintln!("vhost-user-blk: {msg}");
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
