//! `convert`: copy the virtual contents of an image into a new image,
//! optionally in another format (qemu-img convert).
//!
//! The source is read through its backing chain, so the copy is a
//! standalone image. All-zero chunks are not written: the target stays
//! sparse (raw) or unallocated (qcow2). The target is built under a
//! temporary name and renamed over FILE only once the copy is complete.

use std::fs;
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use qcow2::{BlockImage, ImageFormat};

use crate::create::{create_at, replace_target, temp_path};
use crate::size::{parse_options, CreateSpec, Options};
use crate::{format_of, parse_format, read_only_opts, CmdResult, Failure, Global};

/// Bytes copied per read.
const CHUNK: usize = 2 << 20;

const AFTER_HELP: &str = "\
The source is read through its backing chain, so the target is a standalone
image. Zero areas are not written, so the target stays sparse. An existing
TARGET is replaced once the copy is complete.

Examples:
  outboard-img convert -O qcow2 disk.img disk.qcow2
  outboard-img convert -p -f qcow2 -O raw overlay.qcow2 flat.img
  outboard-img convert -O qcow2 -o cluster_size=2M,compression_type=zstd in.qcow2 out.qcow2";

/// `convert` arguments.
#[derive(Debug, clap::Args)]
#[command(after_help = AFTER_HELP)]
pub struct Args {
    /// Format of SOURCE (raw or qcow2); probed if omitted.
    #[arg(short = 'f', long = "source-format", value_name = "SRC_FMT", value_parser = parse_format)]
    format: Option<ImageFormat>,
    /// Format of TARGET: raw (default, as qemu-img) or qcow2.
    #[arg(short = 'O', long = "target-format", value_name = "TGT_FMT", value_parser = parse_format)]
    target_format: Option<ImageFormat>,
    /// Options of the target format, as for `create -o` (`-o help` lists them).
    #[arg(short = 'o', long = "target-options", value_name = "TGT_OPTS")]
    options: Vec<String>,
    /// Show a progress bar on stderr.
    /// Accepted for qemu-img compatibility: images are never locked, so
    /// sharing them is always allowed (read-only uses only, as qemu-img).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    #[arg(short = 'p', long = "progress")]
    progress: bool,
    /// Quiet operation.
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// The image to copy.
    #[arg(value_name = "SOURCE")]
    source: PathBuf,
    /// The image to write.
    #[arg(value_name = "TARGET")]
    target: Option<PathBuf>,
}

/// Runs `convert`.
pub fn run(g: Global, args: Args) -> CmdResult {
    let _ = args.force_share; // nothing is locked
    let out_fmt = args.target_format.unwrap_or(ImageFormat::Raw);
    let pairs = match parse_options(&args.options).map_err(Failure::msg)? {
        Options::Help => {
            print!("{}", crate::create::options_help(out_fmt));
            return Ok(0);
        }
        Options::Pairs(p) => p,
    };
    let Some(dst) = args.target.as_deref() else {
        return Err(Failure::msg(
            "Expecting SOURCE and TARGET (see `outboard-img convert --help`)",
        ));
    };
    let src = args.source.as_path();
    let mut spec = CreateSpec::default();
    spec.apply_options(out_fmt.name(), &pairs)
        .map_err(|m| Failure::file(dst, m))?;
    spec.validate().map_err(|m| Failure::file(dst, m))?;
    if spec.backing_file.is_some() {
        return Err(Failure::file(
            dst,
            "convert does not support a backing file for the target",
        ));
    }
    if same_file(src, dst) {
        return Err(Failure::file(dst, "source and target are the same file"));
    }

    let in_fmt = format_of(src, args.format)?;
    let input = qcow2::open_image(src, Some(in_fmt), &read_only_opts(g))
        .map_err(|e| Failure::lib(src, &e))?;
    let size = input.size();
    if spec.size.is_some_and(|s| s != size) {
        return Err(Failure::file(
            dst,
            "size= does not apply to convert (the source size is used)",
        ));
    }

    let target = replace_target(dst)?;
    let tmp = temp_path(&target);
    let _ = fs::remove_file(&tmp);
    // Zero runs are skipped at the target's allocation granularity.
    let granule = match out_fmt {
        ImageFormat::Qcow2 => spec.cluster_size as usize,
        ImageFormat::Raw => 4096,
    };
    let progress = args.progress && !args.quiet;
    let result = create_at(&tmp, out_fmt, &spec, size)
        .and_then(|()| copy(input.as_ref(), &tmp, out_fmt, granule, src, dst, progress))
        .and_then(|()| {
            fs::rename(&tmp, &target).map_err(|e| Failure::file(dst, format!("rename: {e}")))
        });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map(|()| 0)
}

/// True if both names refer to the same existing file.
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// Copies every non-zero chunk of `input` into the new image at `tmp`.
fn copy(
    input: &dyn BlockImage,
    tmp: &Path,
    fmt: ImageFormat,
    granule: usize,
    src: &Path,
    dst: &Path,
    progress: bool,
) -> Result<(), Failure> {
    let opts = qcow2::OpenOptions {
        open_backing: false,
        ..Default::default()
    };
    let output = qcow2::open_image(tmp, Some(fmt), &opts).map_err(|e| Failure::lib(dst, &e))?;
    let size = input.size();
    let bar = progress.then(|| progress_bar(size));
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(CHUNK as u64) as usize;
        let chunk = &mut buf[..n];
        input
            .read_at(chunk, off)
            .map_err(|e| Failure::lib_ctx(src, "error while reading", &e))?;
        for (at, run) in nonzero_runs(chunk, granule) {
            output
                .write_at(run, off + at as u64)
                .map_err(|e| Failure::lib_ctx(dst, "error while writing", &e))?;
        }
        off += n as u64;
        if let Some(b) = &bar {
            b.set_position(off);
        }
    }
    output
        .flush()
        .map_err(|e| Failure::lib_ctx(dst, "error while flushing", &e))?;
    if let Some(b) = bar {
        b.finish();
    }
    Ok(())
}

/// The runs of `buf` (as offset and bytes) made of `granule`-sized pieces
/// that are not all zeros; all-zero pieces between them are left out.
fn nonzero_runs(buf: &[u8], granule: usize) -> Vec<(usize, &[u8])> {
    let granule = granule.max(1);
    let mut runs = Vec::new();
    let mut start: Option<usize> = None;
    let mut pos = 0;
    while pos < buf.len() {
        let end = (pos + granule).min(buf.len());
        let zero = buf[pos..end].iter().all(|&b| b == 0);
        match (zero, start) {
            (false, None) => start = Some(pos),
            (true, Some(s)) => {
                runs.push((s, &buf[s..pos]));
                start = None;
            }
            _ => {}
        }
        pos = end;
    }
    if let Some(s) = start {
        runs.push((s, &buf[s..]));
    }
    runs
}

fn progress_bar(size: u64) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(size), ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template(
        "    ({percent_precise}/100%) [{bar:30}] {binary_bytes}/{binary_total_bytes} eta {eta}",
    )
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_granules_are_skipped() {
        let mut buf = vec![0u8; 10];
        assert!(nonzero_runs(&buf, 2).is_empty());
        buf[3] = 1;
        buf[4] = 1;
        buf[9] = 1;
        let runs: Vec<(usize, usize)> = nonzero_runs(&buf, 2)
            .into_iter()
            .map(|(o, r)| (o, r.len()))
            .collect();
        assert_eq!(runs, vec![(2, 4), (8, 2)]);
        let runs: Vec<(usize, usize)> = nonzero_runs(&buf[..9], 4)
            .into_iter()
            .map(|(o, r)| (o, r.len()))
            .collect();
        assert_eq!(runs, vec![(0, 8)]);
    }
}
