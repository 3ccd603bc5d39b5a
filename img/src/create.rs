//! `create`: make a new, empty raw or qcow2 image (qemu-img create).
//!
//! A qcow2 image is written to a temporary file next to the target and
//! renamed over it at the end, so a failed create never destroys an existing
//! file; a raw image is truncated in place, as qemu-img does.

use std::fs;
use std::path::{Path, PathBuf};

use qcow2::{ImageFormat, Qcow2};

use crate::size::{parse_options, parse_size, CreateSpec, Options};
use crate::size::{QCOW2_OPTIONS_HELP, RAW_OPTIONS_HELP};
use crate::{backing_format, parse_format, read_only_opts, CmdResult, Failure, Global};

const AFTER_HELP: &str = "\
SIZE takes qemu-img suffixes (b, k/K, M, G, T, P, E; 1024-based): 20G, 1.5T, 512M.
An existing FILE is replaced.

Examples:
  outboard-img create -f qcow2 disk.qcow2 20G
  outboard-img create -f qcow2 -o cluster_size=2M,refcount_bits=64 big.qcow2 1T
  outboard-img create -f qcow2 -o compat=0.10 old-qemu.qcow2 10G
  outboard-img create -f qcow2 -b base.qcow2 -F qcow2 overlay.qcow2
  outboard-img create -f raw disk.img 4G
  outboard-img create -f qcow2 -o help";

/// `create` arguments.
#[derive(Debug, clap::Args)]
#[command(after_help = AFTER_HELP)]
pub struct Args {
    /// Format of the new image: raw or qcow2 (default raw, as qemu-img).
    #[arg(short = 'f', long = "format", value_name = "FMT", value_parser = parse_format)]
    format: Option<ImageFormat>,
    /// Format options KEY=VALUE[,KEY=VALUE...] (`-o help` lists them); may be repeated.
    #[arg(short = 'o', long = "options", value_name = "OPTIONS")]
    options: Vec<String>,
    /// Stack the new image on top of BACKING_FILE (relative names resolve
    /// against the new image's directory).
    #[arg(short = 'b', long = "backing", value_name = "BACKING_FILE")]
    backing: Option<String>,
    /// Format of the backing file (raw or qcow2); recorded in the image.
    #[arg(short = 'F', long = "backing-format", value_name = "BACKING_FMT")]
    backing_format: Option<String>,
    /// Do not open the backing file (SIZE is then required).
    #[arg(short = 'u', long = "backing-unsafe")]
    unsafe_backing: bool,
    /// Do not print the "Formatting ..." line.
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// The image file to create.
    #[arg(value_name = "FILE")]
    filename: Option<PathBuf>,
    /// Virtual size; defaults to the backing file's size.
    #[arg(value_name = "SIZE")]
    size: Option<String>,
}

/// Runs `create`.
pub fn run(g: Global, args: Args) -> CmdResult {
    let fmt = args.format.unwrap_or(ImageFormat::Raw);
    let opts = parse_options(&args.options).map_err(Failure::msg)?;
    let pairs = match opts {
        Options::Help => {
            print!("{}", options_help(fmt));
            return Ok(0);
        }
        Options::Pairs(p) => p,
    };
    let Some(path) = args.filename else {
        return Err(Failure::msg(
            "Expecting image file name (see `outboard-img create --help`)",
        ));
    };
    let mut spec = CreateSpec::default();
    spec.apply_options(fmt.name(), &pairs)
        .map_err(|m| Failure::file(&path, m))?;
    if let Some(b) = args.backing {
        spec.backing_file = Some(b);
    }
    if let Some(f) = args.backing_format {
        spec.backing_fmt = Some(f);
    }
    if let Some(s) = &args.size {
        spec.size = Some(parse_size(s).map_err(|e| Failure::msg(e.to_string()))?);
    }
    if fmt == ImageFormat::Raw && spec.backing_file.is_some() {
        return Err(Failure::file(
            &path,
            "Backing file not supported for file format 'raw'",
        ));
    }
    spec.validate().map_err(|m| Failure::file(&path, m))?;

    if let Some(name) = spec.backing_file.clone() {
        let size = backing_size(g, &path, &name, &mut spec, args.unsafe_backing)?;
        spec.size = spec.size.or(size);
    }
    let Some(size) = spec.size else {
        return Err(Failure::file(
            &path,
            "Image creation needs a size parameter",
        ));
    };
    if !args.quiet {
        println!(
            "Formatting '{}', {}",
            path.display(),
            spec.describe(fmt.name(), size)
        );
    }
    create_image(&path, fmt, &spec, size)?;
    Ok(0)
}

/// The `-o help` text for a format.
pub fn options_help(fmt: ImageFormat) -> &'static str {
    match fmt {
        ImageFormat::Qcow2 => QCOW2_OPTIONS_HELP,
        ImageFormat::Raw => RAW_OPTIONS_HELP,
    }
}

/// Checks the backing file (fills in a probed format when allowed) and
/// returns its virtual size; `None` with `-u`, where it is not opened.
fn backing_size(
    g: Global,
    image: &Path,
    name: &str,
    spec: &mut CreateSpec,
    unsafe_backing: bool,
) -> Result<Option<u64>, Failure> {
    if spec.backing_fmt.is_none() {
        let resolved = qcow2::backing::resolve_backing(image, name);
        if !g.probe_backing {
            let hint = match ImageFormat::probe(&resolved) {
                Ok(f) => format!(" (detected format of {}; pass -F {})", f.name(), f.name()),
                Err(_) => " (pass -F FMT)".into(),
            };
            return Err(Failure::file(
                image,
                format!("Backing file specified without backing format{hint}"),
            ));
        }
    }
    if unsafe_backing {
        return Ok(None);
    }
    let (path, fmt) = backing_format(g, image, name, spec.backing_fmt.as_deref())?;
    spec.backing_fmt
        .get_or_insert_with(|| fmt.name().to_string());
    let img = qcow2::open_image(&path, Some(fmt), &read_only_opts(g)).map_err(|e| {
        Failure::file(
            image,
            format!("Could not open backing image: {}", crate::error_chain(&e)),
        )
    })?;
    Ok(Some(img.size()))
}

/// Where a qcow2 image is built before it is renamed over `path`.
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.outboard-img-{}.tmp", std::process::id()))
}

/// The file to replace: `path`, or the file a symlink at `path` points to.
/// Existing files that are not regular files (devices, directories) are refused.
pub fn replace_target(path: &Path) -> Result<PathBuf, Failure> {
    let target = match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => {
            fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
        }
        _ => path.to_path_buf(),
    };
    match fs::metadata(&target) {
        Ok(m) if !m.is_file() => Err(Failure::file(
            path,
            "exists and is not a regular file; not replacing it",
        )),
        _ => Ok(target),
    }
}

/// Creates an empty image at exactly `path` (which must not exist for qcow2).
pub fn create_at(
    path: &Path,
    fmt: ImageFormat,
    spec: &CreateSpec,
    size: u64,
) -> Result<(), Failure> {
    match fmt {
        ImageFormat::Raw => {
            let f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(path)
                .map_err(|e| Failure::file(path, format!("Could not create image: {e}")))?;
            f.set_len(size)
                .map_err(|e| Failure::file(path, format!("Could not resize file: {e}")))
        }
        ImageFormat::Qcow2 => Qcow2::create(path, &spec.to_create_options(size))
            .map_err(|e| Failure::lib_ctx(path, "Could not create image", &e)),
    }
}

/// Creates an empty image, replacing an existing regular file at `path`.
pub fn create_image(
    path: &Path,
    fmt: ImageFormat,
    spec: &CreateSpec,
    size: u64,
) -> Result<(), Failure> {
    let target = replace_target(path)?;
    if fmt == ImageFormat::Raw {
        return create_at(&target, fmt, spec, size);
    }
    let tmp = temp_path(&target);
    let _ = fs::remove_file(&tmp);
    let result = create_at(&tmp, fmt, spec, size).and_then(|()| {
        fs::rename(&tmp, &target)
            .map_err(|e| Failure::file(path, format!("Could not create image: {e}")))
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(|mut f| {
        // Report the name the user gave, not the temporary one.
        f.file = Some(path.display().to_string());
        f
    })
}
