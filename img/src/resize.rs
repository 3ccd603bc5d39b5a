//! `resize`: change the virtual size (qemu-img resize). Raw files and qcow2
//! images grow, or shrink with `--shrink` (the data past the new end is
//! dropped; qcow2 snapshots keep theirs).

use std::path::PathBuf;

use qcow2::{BlockImage, ImageFormat};

use crate::size::parse_resize;
use crate::{metadata_opts, open, parse_format, CmdResult, Failure, Global, Image};

const AFTER_HELP: &str = "\
SIZE is the new size, or with + / - the amount to grow or shrink by; it takes
qemu-img suffixes (b, k/K, M, G, T, P, E; 1024-based). Grow the file system
inside the guest afterwards.

Examples:
  outboard-img resize disk.qcow2 +10G
  outboard-img resize disk.qcow2 100G
  outboard-img resize -f raw --shrink disk.img -1G
  outboard-img resize --shrink disk.qcow2 10G";

/// `resize` arguments.
#[derive(Debug, clap::Args)]
#[command(after_help = AFTER_HELP)]
pub struct Args {
    /// Format of FILE (raw or qcow2); probed if omitted.
    #[arg(short = 'f', long = "format", value_name = "FMT", value_parser = parse_format)]
    format: Option<ImageFormat>,
    /// Allow making the image smaller (data past the new end is lost).
    #[arg(long = "shrink")]
    shrink: bool,
    /// Preallocation of the new area; only "off" is supported.
    #[arg(long = "preallocation", value_name = "PREALLOC")]
    preallocation: Option<String>,
    /// Do not print "Image resized.".
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// The image file.
    #[arg(value_name = "FILE")]
    filename: PathBuf,
    /// New size, or +SIZE / -SIZE relative to the current size.
    #[arg(value_name = "[+|-]SIZE", allow_hyphen_values = true)]
    size: String,
}

/// Runs `resize`.
pub fn run(_g: Global, args: Args) -> CmdResult {
    let path = &args.filename;
    if let Some(p) = args.preallocation.as_deref().filter(|p| *p != "off") {
        return Err(Failure::file(
            path,
            format!("preallocation={p} is not supported"),
        ));
    }
    let change = parse_resize(&args.size).map_err(|e| Failure::msg(e.to_string()))?;
    let img = open(path, args.format, &metadata_opts(false))?;
    let current = match &img {
        Image::Raw(r) => r.size(),
        Image::Qcow2(q) => q.size(),
    };
    let new_size = change
        .apply(current)
        .filter(|&n| n > 0)
        .ok_or_else(|| Failure::msg("New image size must be positive."))?;
    if new_size < current && !args.shrink {
        // As qemu-img: the error, then the warning, exit 1.
        eprintln!("outboard-img: Use the --shrink option to perform a shrink operation.");
        shrink_warning();
        return Ok(1);
    }
    match img {
        Image::Qcow2(q) => {
            q.resize(new_size)
                .and_then(|()| q.flush())
                .map_err(|e| Failure::lib_ctx(path, "Could not resize image", &e))?;
        }
        Image::Raw(_) => {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| Failure::file(path, format!("Could not open: {e}")))?;
            f.set_len(new_size)
                .and_then(|()| f.sync_all())
                .map_err(|e| Failure::file(path, format!("Could not resize file: {e}")))?;
        }
    }
    if !args.quiet {
        println!("Image resized.");
    }
    Ok(0)
}

/// qemu-img's warning when it refuses a shrink without --shrink.
fn shrink_warning() {
    eprintln!(
        "outboard-img: warning: Shrinking an image will delete all data beyond the shrunken \
         image's end. Before performing such an operation, make sure there is no important data \
         there."
    );
}
