//! `map`: where the guest data of an image lives (qemu-img map), as
//! qemu-img's human table of data extents or its JSON extent list.
//!
//! qcow2 extents come from [`qcow2::Qcow2::map`] (backing files opened, so
//! depth counts down the chain); raw files are mapped with
//! `SEEK_DATA`/`SEEK_HOLE`.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use qcow2::{BlockImage, ImageFormat, Qcow2};

use crate::size::parse_size;
use crate::{backing_format, format_of, metadata_opts, parse_format, read_only_opts};
use crate::{CmdResult, Failure, Global, OutputFormat};

const AFTER_HELP: &str = "\
The human output lists only extents holding data, with their offset in the
file named in the last column; JSON lists every extent with the fields
start, length, depth (0 this image, 1 its backing file, ...), present, zero,
data, compressed and offset.

Examples:
  outboard-img map disk.qcow2
  outboard-img map --output json overlay.qcow2
  outboard-img map --start-offset 1G --max-length 64M disk.qcow2";

/// `map` arguments.
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
    /// First guest byte to map (size suffixes allowed).
    #[arg(long = "start-offset", value_name = "OFFSET")]
    start_offset: Option<String>,
    /// Map at most this many bytes (size suffixes allowed).
    #[arg(long = "max-length", value_name = "LENGTH")]
    max_length: Option<String>,
    /// Accepted for qemu-img compatibility: images are never locked, so
    /// sharing them is always allowed (read-only uses only, as qemu-img).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image file.
    #[arg(value_name = "FILE")]
    filename: PathBuf,
}

/// One extent, as qemu-img's `MapEntry`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Guest offset.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Chain depth the data comes from.
    pub depth: u32,
    /// Allocated somewhere in the chain (data or explicit zeros).
    pub present: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Holds data.
    pub data: bool,
    /// Compressed.
    pub compressed: bool,
    /// Host offset in the file of `filename`.
    pub offset: Option<u64>,
    /// The file at `depth`.
    pub filename: Option<String>,
}

/// Runs `map`.
pub fn run(g: Global, args: Args) -> CmdResult {
    let _ = args.force_share; // nothing is locked
    let path = &args.filename;
    let fmt = format_of(path, args.format)?;
    let sz = |s: &Option<String>| -> Result<Option<u64>, Failure> {
        s.as_deref()
            .map(|v| {
                parse_size(v).map_err(|_| Failure::msg(format!("Invalid offset or length '{v}'")))
            })
            .transpose()
    };
    let start = sz(&args.start_offset)?.unwrap_or(0);
    let max_len = sz(&args.max_length)?;
    let size = match fmt {
        ImageFormat::Raw => qcow2::RawImage::open(path, true).map(|r| r.size()),
        ImageFormat::Qcow2 => Qcow2::open(path, &metadata_opts(true)).map(|q| q.size()),
    }
    .map_err(|e| Failure::lib(path, &e))?;
    let end = range_end(size, start, max_len);
    let mut entries = Vec::new();
    map_chain(g, path, fmt, start, end, 0, &mut entries)?;
    if entries.is_empty() {
        // An empty range (--max-length 0, or a start at or past the end):
        // qemu-img still prints its one zero-length, all-false entry.
        entries.push(Entry {
            start,
            length: 0,
            depth: 0,
            present: false,
            zero: false,
            data: false,
            compressed: false,
            offset: None,
            filename: None,
        });
    }
    // Like qemu-img, print what was rendered before an extent it cannot show.
    let (text, result) = render(entries, args.output);
    print!("{text}");
    result.map(|()| 0).map_err(Failure::msg)
}

fn range_end(size: u64, start: u64, max_len: Option<u64>) -> u64 {
    let end = match max_len {
        Some(l) => start.saturating_add(l).min(size),
        None => size,
    };
    end.max(start.min(size))
}

/// Maps `[start, end)` of the image at `path` (clipped to its size) into
/// `out`, following the backing chain for what this image does not hold;
/// `level` is the image's depth in the chain. Returns the end it covered.
fn map_chain(
    g: Global,
    path: &Path,
    fmt: ImageFormat,
    start: u64,
    end: u64,
    level: u32,
    out: &mut Vec<Entry>,
) -> Result<u64, Failure> {
    if level > qcow2::OpenOptions::default().max_backing_depth {
        return Err(Failure::file(path, "backing chain too deep"));
    }
    if fmt == ImageFormat::Raw {
        let size = qcow2::RawImage::open(path, true)
            .map_err(|e| Failure::lib(path, &e))?
            .size();
        let end = end.min(size);
        out.extend(
            raw_entries(path, start, end)?
                .into_iter()
                .map(|e| Entry { depth: level, ..e }),
        );
        return Ok(end);
    }
    let q = Qcow2::open(path, &read_only_opts(g)).map_err(|e| Failure::lib(path, &e))?;
    let end = end.min(q.size());
    if start >= end {
        return Ok(end);
    }
    let info = q.info();
    let backing = match &info.backing_file {
        Some(name) => Some(backing_format(
            g,
            path,
            name,
            info.backing_format.as_deref(),
        )?),
        None => None,
    };
    let extents = q
        .map(start, end - start)
        .map_err(|e| Failure::lib_ctx(path, "Could not map", &e))?;
    drop(q);
    let name = path.display().to_string();
    for e in extents {
        let here = |start: u64, length: u64, present: bool| Entry {
            start,
            length,
            depth: level,
            present,
            zero: e.zero,
            data: e.data,
            compressed: e.compressed,
            offset: e.offset,
            filename: Some(name.clone()),
        };
        match &backing {
            Some((bpath, bfmt)) if e.depth > 0 => {
                let e_end = e.start + e.length;
                let covered = map_chain(g, bpath, *bfmt, e.start, e_end, level + 1, out)?;
                let from = covered.max(e.start);
                if from < e_end {
                    // Past the end of the backing file: unallocated zeros.
                    out.push(Entry {
                        zero: true,
                        data: false,
                        compressed: false,
                        offset: None,
                        ..here(from, e_end - from, false)
                    });
                }
            }
            // Present: allocated in this image, explicit zero clusters included
            // (with or without a backing file, as qemu-img reports them).
            _ => out.push(here(e.start, e.length, e.allocated)),
        }
    }
    Ok(end)
}

fn raw_entry(start: u64, length: u64, data: bool, file: &Path) -> Entry {
    Entry {
        start,
        length,
        depth: 0,
        present: true,
        zero: !data,
        data,
        compressed: false,
        offset: Some(start),
        filename: Some(file.display().to_string()),
    }
}

/// `lseek(fd, pos, whence)`, `None` on error (errno in the io::Error).
fn seek(file: &File, pos: u64, whence: libc::c_int) -> Result<u64, std::io::Error> {
    // SAFETY: lseek only takes integer arguments; the fd is owned by `file`.
    let r = unsafe { libc::lseek(file.as_raw_fd(), pos as libc::off_t, whence) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}

/// Data and hole extents of a raw file between `start` and `end`.
fn raw_entries(path: &Path, start: u64, end: u64) -> Result<Vec<Entry>, Failure> {
    let f = File::open(path).map_err(|e| Failure::open(path, &e))?;
    let mut out = Vec::new();
    let mut pos = start;
    while pos < end {
        match seek(&f, pos, libc::SEEK_DATA) {
            Ok(d) if d > pos => {
                let d = d.min(end);
                out.push(raw_entry(pos, d - pos, false, path));
                pos = d;
            }
            Ok(_) => {
                let h = seek(&f, pos, libc::SEEK_HOLE)
                    .unwrap_or(end)
                    .clamp(pos + 1, end);
                out.push(raw_entry(pos, h - pos, true, path));
                pos = h;
            }
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                out.push(raw_entry(pos, end - pos, false, path));
                pos = end;
            }
            Err(_) => {
                out.push(raw_entry(pos, end - pos, true, path));
                pos = end;
            }
        }
    }
    Ok(out)
}

fn mergeable(a: &Entry, b: &Entry) -> bool {
    a.length != 0
        && a.zero == b.zero
        && a.data == b.data
        && a.compressed == b.compressed
        && a.depth == b.depth
        && a.present == b.present
        && a.filename == b.filename
        && match (a.offset, b.offset) {
            (None, None) => true,
            (Some(x), Some(y)) => x + a.length == y,
            _ => false,
        }
}

/// `%#-16x` of C.
fn hex16(v: u64) -> String {
    let s = if v == 0 {
        "0".to_string()
    } else {
        format!("{v:#x}")
    };
    format!("{s:<16}")
}

/// Prints one entry as qemu-img's `dump_map_entry` does; in human mode it
/// also folds `next` into "zero" when it has no plain data, to coalesce.
fn dump(
    out: &mut String,
    fmt: OutputFormat,
    e: &Entry,
    next: Option<&mut Entry>,
) -> Result<(), String> {
    match fmt {
        OutputFormat::Human => {
            if e.data && e.offset.is_none() {
                return Err("File contains external, encrypted or compressed clusters.".into());
            }
            if e.data && !e.zero {
                out.push_str(&format!(
                    "{}{}{}{}\n",
                    hex16(e.start),
                    hex16(e.length),
                    hex16(e.offset.unwrap_or(0)),
                    e.filename.as_deref().unwrap_or("")
                ));
            }
            if let Some(n) = next {
                if !n.data || n.zero {
                    n.data = false;
                    n.zero = true;
                }
            }
        }
        OutputFormat::Json => {
            out.push_str(&format!(
                "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \
                 \"data\": {}, \"compressed\": {}",
                e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
            ));
            if let Some(o) = e.offset {
                out.push_str(&format!(", \"offset\": {o}"));
            }
            out.push('}');
            if next.is_some() {
                out.push_str(",\n");
            }
        }
    }
    Ok(())
}

/// The whole `map` output, merging adjacent extents as qemu-img does; on an
/// extent the human format cannot show, the text so far and the error.
pub fn render(entries: Vec<Entry>, fmt: OutputFormat) -> (String, Result<(), String>) {
    let mut out = String::new();
    let result = render_into(&mut out, entries, fmt);
    (out, result)
}

fn render_into(out: &mut String, entries: Vec<Entry>, fmt: OutputFormat) -> Result<(), String> {
    match fmt {
        OutputFormat::Human => out.push_str(&format!(
            "{:<16}{:<16}{:<16}{}\n",
            "Offset", "Length", "Mapped to", "File"
        )),
        OutputFormat::Json => out.push('['),
    }
    let mut curr: Option<Entry> = None;
    for mut next in entries {
        if let Some(c) = curr.as_mut() {
            if mergeable(c, &next) {
                c.length += next.length;
                continue;
            }
            dump(out, fmt, c, Some(&mut next))?;
        }
        curr = Some(next);
    }
    if let Some(c) = &curr {
        dump(out, fmt, c, None)?;
    }
    if fmt == OutputFormat::Json {
        out.push_str("]\n");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(
        start: u64,
        length: u64,
        depth: u32,
        data: bool,
        zero: bool,
        offset: Option<u64>,
    ) -> Entry {
        Entry {
            start,
            length,
            depth,
            present: data || zero,
            zero,
            data,
            compressed: false,
            offset,
            filename: Some(
                if depth == 0 {
                    "top.qcow2"
                } else {
                    "base.qcow2"
                }
                .into(),
            ),
        }
    }

    #[test]
    fn json_and_human_like_qemu() {
        let list = vec![
            e(0, 0x80000, 0, true, false, Some(0x50000)),
            e(0x80000, 0x80000, 0, true, false, Some(0xd0000)),
            e(0x100000, 0x100000, 1, false, true, None),
            e(0x800000, 0x20000, 1, true, false, Some(0x50000)),
        ];
        assert_eq!(
            render(list.clone(), OutputFormat::Human),
            (
                "Offset          Length          Mapped to       File\n\
                0               0x100000        0x50000         top.qcow2\n\
                0x800000        0x20000         0x50000         base.qcow2\n"
                    .to_string(),
                Ok(())
            )
        );
        assert_eq!(
            render(list, OutputFormat::Json),
            (
                "[{ \"start\": 0, \"length\": 1048576, \"depth\": 0, \"present\": true, \"zero\": \
                false, \"data\": true, \"compressed\": false, \"offset\": 327680},\n\
                { \"start\": 1048576, \"length\": 1048576, \"depth\": 1, \"present\": true, \
                \"zero\": true, \"data\": false, \"compressed\": false},\n\
                { \"start\": 8388608, \"length\": 131072, \"depth\": 1, \"present\": true, \
                \"zero\": false, \"data\": true, \"compressed\": false, \"offset\": 327680}]\n"
                    .to_string(),
                Ok(())
            )
        );
    }

    #[test]
    fn human_refuses_compressed_data() {
        let mut c = e(0, 0x10000, 0, true, false, None);
        c.compressed = true;
        let (text, result) = render(vec![c], OutputFormat::Human);
        assert!(text.starts_with("Offset"));
        assert!(result.is_err());
    }
}
