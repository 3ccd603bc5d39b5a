//! `info`: what an image is (qemu-img info), in qemu-img's human text or
//! JSON, optionally for every image of the backing chain.
//!
//! Images are opened without their backing files, as qemu-img does, so a
//! missing backing file does not stop `info`.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use qcow2::{BlockImage, ImageFormat, SnapshotInfo};
use serde::Serialize;

use crate::size::size_to_str;
use crate::{backing_format, format_of, metadata_opts, open, parse_format, print_json};
use crate::{CmdResult, Failure, Global, Image, OutputFormat};

const AFTER_HELP: &str = "\
Examples:
  outboard-img info disk.qcow2
  outboard-img info --output json disk.qcow2
  outboard-img info --backing-chain overlay.qcow2";

/// `info` arguments.
#[derive(Debug, clap::Args)]
#[command(after_help = AFTER_HELP)]
pub struct Args {
    /// Format of FILE (raw or qcow2); probed if omitted.
    #[arg(short = 'f', long = "format", value_name = "FMT", value_parser = parse_format)]
    format: Option<ImageFormat>,
    /// Output format.
    #[arg(
        long = "output",
        value_name = "FMT",
        value_enum,
        default_value = "human"
    )]
    output: OutputFormat,
    /// Also show every image of the backing chain (backing formats must be
    /// recorded in the images, or pass --probe-backing).
    #[arg(short = 'b', long = "backing-chain")]
    backing_chain: bool,
    /// Accepted for qemu-img compatibility (images are always opened read-only).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image file.
    #[arg(value_name = "FILE")]
    filename: PathBuf,
}

/// One image as qemu-img's `ImageInfo` JSON object (fields in qemu's order).
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Info {
    children: Vec<Child>,
    #[serde(skip_serializing_if = "Option::is_none")]
    backing_filename_format: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    snapshots: Option<Vec<JsonSnapshot>>,
    virtual_size: u64,
    filename: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster_size: Option<u64>,
    format: &'static str,
    actual_size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    format_specific: Option<FormatSpecific>,
    #[serde(skip_serializing_if = "Option::is_none")]
    full_backing_filename: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    backing_filename: Option<String>,
    dirty_flag: bool,
}

/// The protocol ("file") child node.
#[derive(Debug, Serialize)]
struct Child {
    name: &'static str,
    info: FileInfo,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
struct FileInfo {
    children: Vec<Child>,
    virtual_size: u64,
    filename: String,
    format: &'static str,
    actual_size: u64,
    format_specific: FileSpecific,
    dirty_flag: bool,
}

#[derive(Debug, Serialize)]
struct FileSpecific {
    #[serde(rename = "type")]
    kind: &'static str,
    data: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Serialize)]
struct FormatSpecific {
    #[serde(rename = "type")]
    kind: &'static str,
    data: Qcow2Specific,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
struct Qcow2Specific {
    compat: &'static str,
    compression_type: &'static str,
    // The v3-only fields are absent for v2 (compat 0.10) images, as in qemu.
    #[serde(skip_serializing_if = "Option::is_none")]
    lazy_refcounts: Option<bool>,
    refcount_bits: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    corrupt: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    extended_l2: Option<bool>,
}

/// A snapshot as qemu-img's `SnapshotInfo` JSON object.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct JsonSnapshot {
    #[serde(skip_serializing_if = "Option::is_none")]
    icount: Option<u64>,
    vm_clock_nsec: u64,
    name: String,
    date_sec: u64,
    date_nsec: u64,
    vm_clock_sec: u64,
    id: String,
    vm_state_size: u64,
}

impl From<&SnapshotInfo> for JsonSnapshot {
    fn from(s: &SnapshotInfo) -> Self {
        JsonSnapshot {
            icount: s.icount,
            vm_clock_nsec: s.vm_clock_nsec % 1_000_000_000,
            name: s.name.clone(),
            date_sec: s.date_sec.into(),
            date_nsec: s.date_nsec.into(),
            vm_clock_sec: s.vm_clock_nsec / 1_000_000_000,
            id: s.id.clone(),
            vm_state_size: s.vm_state_size,
        }
    }
}

/// Runs `info`.
pub fn run(g: Global, args: Args) -> CmdResult {
    let _ = args.force_share;
    let mut chain = Vec::new();
    let mut path = args.filename.clone();
    let mut fmt = format_of(&path, args.format)?;
    loop {
        let (info, snaps) = collect(&path, fmt)?;
        let next = match (&info.backing_filename, args.backing_chain) {
            (Some(name), true) => {
                if chain.len() >= qcow2::OpenOptions::default().max_backing_depth as usize {
                    return Err(Failure::file(&args.filename, "backing chain too deep"));
                }
                Some(backing_format(
                    g,
                    &path,
                    name,
                    info.backing_filename_format.as_deref(),
                )?)
            }
            _ => None,
        };
        chain.push((info, snaps));
        match next {
            Some((p, f)) => {
                path = p;
                fmt = f;
            }
            None => break,
        }
    }
    match args.output {
        OutputFormat::Json if args.backing_chain => {
            let infos: Vec<&Info> = chain.iter().map(|(i, _)| i).collect();
            print_json(&infos)?;
        }
        OutputFormat::Json => {
            if let Some((info, _)) = chain.first() {
                print_json(info)?;
            }
        }
        OutputFormat::Human => {
            for (n, (info, snaps)) in chain.iter().enumerate() {
                if n > 0 {
                    println!();
                }
                print!("{}", human(info, snaps));
            }
        }
    }
    Ok(0)
}

/// Gathers the information about one image (its backing files not opened).
pub fn collect(path: &Path, fmt: ImageFormat) -> Result<(Info, Vec<SnapshotInfo>), Failure> {
    let meta = std::fs::metadata(path).map_err(|e| Failure::open(path, &e))?;
    let host_blocks = meta.blocks() * 512;
    // qemu reports file lengths (and raw sizes) in whole 512-byte sectors.
    let sectors = |n: u64| n.div_ceil(512) * 512;
    let file_length = if meta.is_file() {
        Some(sectors(meta.len()))
    } else {
        None
    };
    let filename = path.display().to_string();
    let file_child = |length: u64, actual: u64| Child {
        name: "file",
        info: FileInfo {
            children: Vec::new(),
            virtual_size: length,
            filename: filename.clone(),
            format: "file",
            actual_size: actual,
            format_specific: FileSpecific {
                kind: "file",
                data: serde_json::Map::new(),
            },
            dirty_flag: false,
        },
    };
    match open(path, Some(fmt), &metadata_opts(true))? {
        Image::Raw(raw) => {
            let size = sectors(raw.size());
            let info = Info {
                children: vec![file_child(size, host_blocks)],
                backing_filename_format: None,
                snapshots: None,
                virtual_size: size,
                filename: filename.clone(),
                cluster_size: None,
                format: "raw",
                actual_size: host_blocks,
                format_specific: None,
                full_backing_filename: None,
                backing_filename: None,
                dirty_flag: false,
            };
            Ok((info, Vec::new()))
        }
        Image::Qcow2(q) => {
            let i = q.info();
            let v3 = i.version >= 3;
            let full_backing = i.backing_file.as_ref().map(|b| {
                qcow2::backing::resolve_backing(path, b)
                    .display()
                    .to_string()
            });
            let snapshots = (!i.snapshots.is_empty())
                .then(|| i.snapshots.iter().map(JsonSnapshot::from).collect());
            let info = Info {
                children: vec![file_child(
                    file_length.unwrap_or(i.file_length),
                    i.actual_size,
                )],
                backing_filename_format: i.backing_format.clone(),
                snapshots,
                virtual_size: i.virtual_size,
                filename: filename.clone(),
                cluster_size: Some(i.cluster_size),
                format: "qcow2",
                actual_size: i.actual_size,
                format_specific: Some(FormatSpecific {
                    kind: "qcow2",
                    data: Qcow2Specific {
                        compat: if i.version >= 3 { "1.1" } else { "0.10" },
                        compression_type: i.compression_type,
                        lazy_refcounts: v3.then_some(i.lazy_refcounts),
                        refcount_bits: i.refcount_bits,
                        corrupt: v3.then_some(i.corrupt),
                        extended_l2: v3.then_some(false),
                    },
                }),
                full_backing_filename: full_backing,
                backing_filename: i.backing_file.clone(),
                dirty_flag: i.dirty,
            };
            Ok((info, i.snapshots))
        }
    }
}

/// qemu-img's human `info` text for one image.
pub fn human(info: &Info, snaps: &[SnapshotInfo]) -> String {
    let mut s = format!(
        "image: {}\nfile format: {}\nvirtual size: {} ({} bytes)\ndisk size: {}\n",
        info.filename,
        info.format,
        size_to_str(info.virtual_size),
        info.virtual_size,
        size_to_str(info.actual_size)
    );
    if let Some(c) = info.cluster_size {
        s.push_str(&format!("cluster_size: {c}\n"));
    }
    if info.dirty_flag {
        s.push_str("cleanly shut down: no\n");
    }
    if let Some(b) = &info.backing_filename {
        s.push_str(&format!("backing file: {b}"));
        match &info.full_backing_filename {
            Some(full) if full != b => s.push_str(&format!(" (actual path: {full})")),
            _ => {}
        }
        s.push('\n');
    }
    if let Some(f) = &info.backing_filename_format {
        s.push_str(&format!("backing file format: {f}\n"));
    }
    if !snaps.is_empty() {
        s.push_str("Snapshot list:\n");
        s.push_str(&crate::snapshot::table(snaps));
    }
    if let Some(fs) = &info.format_specific {
        let d = &fs.data;
        s.push_str(&format!(
            "Format specific information:\n    compat: {}\n    compression type: {}\n",
            d.compat, d.compression_type
        ));
        if let Some(v) = d.lazy_refcounts {
            s.push_str(&format!("    lazy refcounts: {v}\n"));
        }
        s.push_str(&format!("    refcount bits: {}\n", d.refcount_bits));
        if let Some(v) = d.corrupt {
            s.push_str(&format!("    corrupt: {v}\n"));
        }
        if let Some(v) = d.extended_l2 {
            s.push_str(&format!("    extended l2: {v}\n"));
        }
    }
    for child in &info.children {
        let c = &child.info;
        s.push_str(&format!(
            "Child node '/{}':\n    filename: {}\n    protocol type: {}\n    \
             file length: {} ({} bytes)\n    disk size: {}\n",
            child.name,
            c.filename,
            c.format,
            size_to_str(c.virtual_size),
            c.virtual_size,
            size_to_str(c.actual_size)
        ));
    }
    s
}
