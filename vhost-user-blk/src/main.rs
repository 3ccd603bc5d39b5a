//! `vhost-user-blk`: command line → [`Config`](vhost_user_blk::cli::Config) → serve.

use clap::Parser;

use outboard_common::cli::{ctl, error_chain};
use vhost_user_blk::cli::{capabilities, Args, Config, Sub};

fn main() {
    let args = Args::parse();
    if let Some(Sub::Ctl { socket, cmd }) = &args.ctl {
        // `vhost-user-blk ctl SOCKET COMMAND`: one request, one reply; exit 0 if ok.
        std::process::exit(ctl("vhost-user-blk", socket, cmd.request()));
    }
    let opts = args.daemon.clone();
    outboard_common::daemon::main("vhost-user-blk", capabilities(), &opts, || {
        let cfg = Config::try_from(args).map_err(|e| e.to_string())?;
        vhost_user_blk::run(cfg).map_err(|e| error_chain(&e))
    });
}
