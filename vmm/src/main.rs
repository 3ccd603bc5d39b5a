//! `outboard`: parse the command line, start the backends and the VM, wait
//! for the guest to stop and exit with its status (0 power-off, 1 VMM error,
//! 2 triple fault, 3 reset).

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use vmm::backends::{self, Children};
use vmm::cli::{self, Args};
use vmm::devices::legacy::ExitReason;
use vmm::vm::{self, SerialOut, VmConfig};

fn main() -> ExitCode {
    let t0 = Instant::now();
    let args = Args::parse();
    env_logger::Builder::new()
        .parse_filters(&args.log_level)
        .format_timestamp_millis()
        .init();
    match run(args, t0) {
        Ok(reason) => {
            match &reason {
                ExitReason::Error(e) => eprintln!("outboard: {e}"),
                r => log::info!("guest stopped: {r:?} after {} ms", t0.elapsed().as_millis()),
            }
            ExitCode::from(reason.status() as u8)
        }
        Err(e) => {
            eprint!("outboard: error: {e}");
            let mut src = std::error::Error::source(&*e);
            while let Some(s) = src {
                eprint!(": {s}");
                src = s.source();
            }
            eprintln!();
            ExitCode::from(1)
        }
    }
}

fn run(args: Args, t0: Instant) -> Result<ExitReason, Box<dyn std::error::Error>> {
    let serial = match args.serial.as_str() {
        "stdio" => SerialOut::Stdio,
        "off" => SerialOut::Off,
        s => match s.strip_prefix("file=") {
            Some(p) => SerialOut::File(p.into()),
            None => return Err(format!("--serial {s}: expected stdio, file=PATH or off").into()),
        },
    };
    let mut children = Children::default();
    let mut devices = Vec::new();
    for (i, d) in args.disks.iter().enumerate() {
        let spec = cli::parse_disk(d)?;
        devices.push(backends::disk(&mut children, &spec, i)?);
    }
    for (i, n) in args.nets.iter().enumerate() {
        let spec = cli::parse_net(n)?;
        devices.push(backends::net(&mut children, &spec, i)?);
    }
    log::info!(
        "{} backend(s) connected ({} ms)",
        devices.len(),
        t0.elapsed().as_millis()
    );
    let cfg = VmConfig {
        kernel: args.kernel,
        initramfs: args.initramfs,
        cmdline: args.cmdline,
        cpus: args.cpus,
        memory: args.memory,
        serial,
        devices,
    };
    let vm = vm::start(cfg, t0)?;
    let reason = vm.wait();
    children.stop();
    Ok(reason)
}
