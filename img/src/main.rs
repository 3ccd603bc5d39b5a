//! `outboard-img`: a qemu-img compatible tool for qcow2 and raw images.
//!
//! The subcommands, flags and output follow qemu-img so that habits and
//! scripts carry over: `create`, `info`, `check`, `snapshot`, `resize`,
//! `convert` and `map`. It is a thin command line over the `qcow2` library
//! crate and lives in its own crate so that users of the library do not pull
//! in clap, indicatif or serde.
//!
//! # Modules
//! - `main.rs` (this file): the command line (clap derive), the dispatch,
//!   and the helpers every subcommand shares: error reporting ([`Failure`],
//!   exit codes), format selection and opening images, qemu-style JSON.
//! - [`create`]: `create` (qcow2 built under a temporary name, raw in place).
//! - [`info`]: `info`, human and `--output json`, `--backing-chain`.
//! - [`check`]: `check` and `check -r leaks|all`, with qemu-img's exit codes.
//! - [`snapshot`]: `snapshot -l/-c/-a/-d`, and the snapshot table of `info`.
//! - [`resize`]: `resize [+|-]SIZE`.
//! - [`convert`]: `convert` between raw and qcow2, with `-p` progress.
//! - [`map`]: `map`, human table and `--output json`.
//! - [`size`]: sizes with qemu-img's suffixes, `-o` option strings, human
//!   size printing.

mod check;
mod convert;
mod create;
mod info;
mod map;
mod resize;
mod size;
mod snapshot;

use std::error::Error as StdError;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use qcow2::{ImageFormat, OpenOptions, Qcow2, RawImage};

const ABOUT: &str = "qemu-img compatible disk image tool for qcow2 and raw images";

const LONG_ABOUT: &str = "\
qemu-img compatible disk image tool for qcow2 (v2/v3) and raw images.

Subcommands, flags and output follow qemu-img: `outboard-img info disk.qcow2`
prints what `qemu-img info disk.qcow2` prints. Sizes take qemu-img suffixes
(b, k/K, M, G, T, P, E; 1024-based, e.g. 10G or 1.5G).

Formats: -f FMT names the format (raw or qcow2); without it the format of the
file you name is probed. Backing files are never probed unless you pass
--probe-backing: an image must record its backing format (create it with
-F FMT), because guessing it lets a guest that wrote a qcow2 header into a raw
backing file read host files.";

const AFTER_HELP: &str = "\
Examples:
  outboard-img create -f qcow2 disk.qcow2 20G
  outboard-img create -f qcow2 -b base.qcow2 -F qcow2 overlay.qcow2
  outboard-img info --output json disk.qcow2
  outboard-img check -r leaks disk.qcow2
  outboard-img snapshot -c before-upgrade disk.qcow2
  outboard-img convert -p -O qcow2 disk.raw disk.qcow2
  outboard-img resize disk.qcow2 +10G
  outboard-img map --output json disk.qcow2

Run `outboard-img COMMAND --help` for the options of a command.";

#[derive(Debug, Parser)]
#[command(
    name = "outboard-img",
    version,
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_help = AFTER_HELP,
    propagate_version = true,
    disable_help_subcommand = true
)]
struct Cli {
    /// Allow guessing the format of backing files that do not record it
    /// (unsafe with untrusted images; prefer recreating them with -F).
    #[arg(long, global = true)]
    probe_backing: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create and format a new image file.
    Create(create::Args),
    /// Display information about an image.
    Info(info::Args),
    /// Check the metadata of an image for consistency (and repair it).
    Check(check::Args),
    /// List, create, apply or delete internal snapshots.
    Snapshot(snapshot::Args),
    /// Change the virtual size of an image.
    Resize(resize::Args),
    /// Copy an image to another, optionally in another format.
    Convert(convert::Args),
    /// Show where the guest data of an image lives.
    Map(map::Args),
}

/// Settings that apply to every subcommand.
#[derive(Debug, Clone, Copy)]
pub struct Global {
    /// `--probe-backing`.
    pub probe_backing: bool,
}

/// `--output human|json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Text for people (default).
    Human,
    /// JSON for programs, with qemu-img's field names.
    Json,
}

/// A failed command: what to print and the exit code.
#[derive(Debug)]
pub struct Failure {
    /// The file the message is about.
    pub file: Option<String>,
    /// The message.
    pub msg: String,
    /// Exit code (1 unless said otherwise).
    pub code: u8,
}

impl Failure {
    /// A failure about no particular file.
    pub fn msg(msg: impl Into<String>) -> Self {
        Failure {
            file: None,
            msg: msg.into(),
            code: 1,
        }
    }

    /// A failure about `file`.
    pub fn file(file: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Failure {
            file: Some(file.as_ref().display().to_string()),
            msg: msg.into(),
            code: 1,
        }
    }

    /// `file` could not be opened (or looked at): qemu-img's wording, with
    /// strerror's text only.
    pub fn open(file: impl AsRef<Path>, e: &std::io::Error) -> Self {
        let file = file.as_ref();
        Failure::file(
            file,
            format!("Could not open '{}': {}", file.display(), error_chain(e)),
        )
    }

    /// `-U` given to a command that would write `file` (qemu-img refuses it).
    pub fn force_share_write(file: impl AsRef<Path>) -> Self {
        let file = file.as_ref();
        Failure::file(
            file,
            format!(
                "Could not open '{}': force-share=on can only be used with read-only images",
                file.display()
            ),
        )
    }

    /// A library error about `file`, with its `source()` chain.
    pub fn lib(file: impl AsRef<Path>, e: &qcow2::Error) -> Self {
        let file = file.as_ref();
        match e {
            // Not "FILE: cannot open FILE: ...".
            qcow2::Error::Open { path, source } if path == file => Failure::file(
                file,
                format!(
                    "Could not open '{}': {}",
                    file.display(),
                    error_chain(source)
                ),
            ),
            _ => {
                let mut msg = error_chain(e);
                if msg.contains("probing is off") {
                    msg.push_str(" [outboard-img: --probe-backing allows probing]");
                }
                Failure::file(file, msg)
            }
        }
    }

    /// A library error about `file`, prefixed with what was being done.
    pub fn lib_ctx(file: impl AsRef<Path>, what: &str, e: &qcow2::Error) -> Self {
        Failure::file(file, format!("{what}: {}", error_chain(e)))
    }

    /// Sets the exit code.
    pub fn with_code(mut self, code: u8) -> Self {
        self.code = code;
        self
    }
}

/// An error and its sources, joined with ": ", skipping a source whose text
/// its parent already shows.
pub fn error_chain(e: &dyn StdError) -> String {
    let mut msg = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let t = s.to_string();
        if !msg.contains(&t) {
            msg.push_str(": ");
            msg.push_str(&t);
        }
        cur = s.source();
    }
    strip_os_error(&msg)
}

/// Drops std's " (os error N)" suffixes: qemu-img shows only strerror's text.
fn strip_os_error(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut rest = msg;
    while let Some(i) = rest.find(" (os error ") {
        out.push_str(&rest[..i]);
        match rest[i..].find(')') {
            Some(j) => rest = &rest[i + j + 1..],
            None => {
                rest = &rest[i..];
                break;
            }
        }
    }
    out.push_str(rest);
    out
}

/// What a subcommand returns: its exit code, or a failure to report.
pub type CmdResult = Result<u8, Failure>;

/// Parses `-f FMT` for clap.
pub fn parse_format(s: &str) -> Result<ImageFormat, String> {
    ImageFormat::parse(s).map_err(|_| format!("Unknown file format '{s}' (supported: raw, qcow2)"))
}

/// The format of a file the user named: `-f` if given, else probed.
pub fn format_of(path: &Path, given: Option<ImageFormat>) -> Result<ImageFormat, Failure> {
    match given {
        Some(f) => Ok(f),
        None => ImageFormat::probe(path).map_err(|e| Failure::lib(path, &e)),
    }
}

/// An open image of either format.
#[derive(Debug)]
pub enum Image {
    /// A raw file or block device.
    Raw(RawImage),
    /// A qcow2 image.
    Qcow2(Box<Qcow2>),
}

/// Opens `path` as `format` (probed when `None`).
pub fn open(
    path: &Path,
    format: Option<ImageFormat>,
    opts: &OpenOptions,
) -> Result<Image, Failure> {
    let fmt = format_of(path, format)?;
    match fmt {
        ImageFormat::Raw => RawImage::open(path, opts.read_only)
            .map(Image::Raw)
            .map_err(|e| Failure::lib(path, &e)),
        ImageFormat::Qcow2 => Qcow2::open(path, opts)
            .map(|q| Image::Qcow2(Box::new(q)))
            .map_err(|e| Failure::lib(path, &e)),
    }
}

/// Open options for reading an image with its backing chain.
pub fn read_only_opts(g: Global) -> OpenOptions {
    OpenOptions {
        probe_backing_format: g.probe_backing,
        ..OpenOptions::read_only()
    }
}

/// Open options for looking at one image's own metadata (no backing files).
pub fn metadata_opts(read_only: bool) -> OpenOptions {
    OpenOptions {
        read_only,
        open_backing: false,
        ..OpenOptions::default()
    }
}

/// The format to open the backing file `name` of `image` with: the recorded
/// one, or probed when `--probe-backing` allows it.
pub fn backing_format(
    g: Global,
    image: &Path,
    name: &str,
    recorded: Option<&str>,
) -> Result<(PathBuf, ImageFormat), Failure> {
    let path = qcow2::backing::resolve_backing(image, name);
    let fmt = match recorded {
        Some(f) => ImageFormat::parse(f).map_err(|e| Failure::lib(&path, &e))?,
        None if g.probe_backing => {
            ImageFormat::probe(&path).map_err(|e| Failure::lib(&path, &e))?
        }
        None => {
            return Err(Failure::file(
                image,
                format!(
                    "the image does not record the format of its backing file '{name}'; \
                     pass --probe-backing to guess it"
                ),
            ))
        }
    };
    Ok((path, fmt))
}

/// Prints JSON laid out as qemu-img lays it out: four-space indents, and
/// empty arrays and objects still split over two lines.
pub fn print_json<T: serde::Serialize>(value: &T) -> Result<(), Failure> {
    println!(
        "{}",
        to_qemu_json(value).map_err(|e| Failure::msg(format!("JSON output: {e}")))?
    );
    Ok(())
}

/// `value` as qemu-style JSON text (no trailing newline).
pub fn to_qemu_json<T: serde::Serialize>(value: &T) -> serde_json::Result<String> {
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, QemuFormatter { indent: 0 });
    value.serialize(&mut ser)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// serde_json formatter reproducing QEMU's JSON pretty printer.
struct QemuFormatter {
    indent: usize,
}

impl QemuFormatter {
    fn newline<W: ?Sized + std::io::Write>(&self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b"\n")?;
        for _ in 0..self.indent {
            w.write_all(b"    ")?;
        }
        Ok(())
    }
}

impl serde_json::ser::Formatter for QemuFormatter {
    fn begin_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.indent += 1;
        w.write_all(b"[")
    }
    fn end_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.indent -= 1;
        self.newline(w)?;
        w.write_all(b"]")
    }
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if !first {
            w.write_all(b",")?;
        }
        self.newline(w)
    }
    fn end_array_value<W: ?Sized + std::io::Write>(&mut self, _w: &mut W) -> std::io::Result<()> {
        Ok(())
    }
    fn begin_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.indent += 1;
        w.write_all(b"{")
    }
    fn end_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.indent -= 1;
        self.newline(w)?;
        w.write_all(b"}")
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if !first {
            w.write_all(b",")?;
        }
        self.newline(w)
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
    fn end_object_value<W: ?Sized + std::io::Write>(&mut self, _w: &mut W) -> std::io::Result<()> {
        Ok(())
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // qemu-img exits 1 on usage errors; help and version exit 0.
            return if e.use_stderr() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let g = Global {
        probe_backing: cli.probe_backing,
    };
    let result = match cli.command {
        Command::Create(a) => create::run(g, a),
        Command::Info(a) => info::run(g, a),
        Command::Check(a) => check::run(g, a),
        Command::Snapshot(a) => snapshot::run(g, a),
        Command::Resize(a) => resize::run(g, a),
        Command::Convert(a) => convert::run(g, a),
        Command::Map(a) => map::run(g, a),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            match &f.file {
                Some(file) => eprintln!("outboard-img: {file}: {}", f.msg),
                None => eprintln!("outboard-img: {}", f.msg),
            }
            ExitCode::from(f.code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_layout_is_qemus() {
        let v = serde_json::json!({"a": [], "b": {}, "c": [1, {"d": true}]});
        assert_eq!(
            to_qemu_json(&v).ok().as_deref(),
            Some(
                "{\n    \"a\": [\n    ],\n    \"b\": {\n    },\n    \"c\": [\n        1,\n        \
                 {\n            \"d\": true\n        }\n    ]\n}"
            )
        );
    }

    #[test]
    fn os_error_suffix_is_dropped() {
        assert_eq!(
            strip_os_error("read: No such file or directory (os error 2)"),
            "read: No such file or directory"
        );
        assert_eq!(strip_os_error("a (os error 5): b (os error 28)"), "a: b");
        assert_eq!(strip_os_error("no suffix"), "no suffix");
    }

    #[test]
    fn source_chain_is_not_repeated() {
        let e = qcow2::Error::io("read", std::io::Error::from_raw_os_error(libc::EIO));
        assert_eq!(error_chain(&e), "read: Input/output error");
        let e = qcow2::Error::BackingOpen {
            path: "base.qcow2".into(),
            source: Box::new(qcow2::Error::NotQcow2),
        };
        assert_eq!(
            error_chain(&e),
            "backing file base.qcow2: not a qcow2 image (bad magic)"
        );
    }
}
