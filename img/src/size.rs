//! Sizes and `-o` option strings, spelled the way qemu-img spells them.
//!
//! - [`parse_size`]: `SIZE[bkKMGTPE]` (1024-based, decimal fractions allowed
//!   with a suffix: `1.5G`; hex without fraction: `0x1000`).
//! - [`parse_resize`]: `[+|-]SIZE` for `resize`.
//! - [`parse_options`]: `key=value,key=value` with `,,` escaping a comma,
//!   several `-o` joined; `help` / `?` ask for the option list.
//! - [`CreateSpec`]: the qcow2/raw creation options built from those pairs.
//! - [`size_to_str`]: qemu's human sizes ("64 MiB", "1.27 MiB", "0 B").

use std::fmt;

/// Largest size qemu-img accepts (`INT64_MAX`).
pub const MAX_SIZE: u64 = outboard_common::size::MAX_SIZE;

/// Why a size string was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SizeError {
    /// Not a number with an optional suffix.
    Invalid(String),
    /// Above `INT64_MAX`.
    TooLarge,
}

impl fmt::Display for SizeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SizeError::Invalid(s) => write!(f, "Invalid image size specified: '{s}'."),
            SizeError::TooLarge => {
                write!(
                    f,
                    "Invalid image size specified. Must be between 0 and {MAX_SIZE}."
                )
            }
        }
    }
}

/// Parses a qemu-img size: `1024`, `1000b`, `64k`, `1.5G`, `0x1000`, `2T`. The grammar is
/// the workspace's one size grammar (`outboard_common::size`); only the messages are
/// qemu-img's.
pub fn parse_size(input: &str) -> Result<u64, SizeError> {
    outboard_common::size::parse_size(input).map_err(|e| match e {
        outboard_common::size::SizeError::Invalid(_) => SizeError::Invalid(input.to_string()),
        outboard_common::size::SizeError::TooLarge(_) => SizeError::TooLarge,
    })
}

/// A `resize` argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resize {
    /// `SIZE`: the new size.
    Absolute(u64),
    /// `+SIZE`: grow by.
    Grow(u64),
    /// `-SIZE`: shrink by.
    Shrink(u64),
}

impl Resize {
    /// The new size given the current one; `None` if it would be negative or overflow.
    pub fn apply(self, current: u64) -> Option<u64> {
        match self {
            Resize::Absolute(n) => Some(n),
            Resize::Grow(n) => current.checked_add(n).filter(|&v| v <= MAX_SIZE),
            Resize::Shrink(n) => current.checked_sub(n),
        }
    }
}

/// Parses `[+|-]SIZE` for `resize`.
pub fn parse_resize(s: &str) -> Result<Resize, SizeError> {
    if let Some(rest) = s.strip_prefix('+') {
        parse_size(rest).map(Resize::Grow)
    } else if let Some(rest) = s.strip_prefix('-') {
        parse_size(rest).map(Resize::Shrink)
    } else {
        parse_size(s).map(Resize::Absolute)
    }
}

/// Parsed `-o` arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Options {
    /// `-o help` (or `-o ?`): list the options.
    Help,
    /// `key=value` pairs in order.
    Pairs(Vec<(String, String)>),
}

/// Parses one or more `-o` strings (qemu joins repeated `-o` with commas).
/// `,,` is a literal comma inside a value.
pub fn parse_options(args: &[String]) -> Result<Options, String> {
    let mut pairs = Vec::new();
    for arg in args {
        for item in split_escaped(arg) {
            if item.is_empty() {
                continue;
            }
            if item == "help" || item == "?" {
                return Ok(Options::Help);
            }
            match item.split_once('=') {
                Some((k, v)) if !k.is_empty() => pairs.push((k.to_string(), v.to_string())),
                _ => return Err(format!("Invalid parameter '{item}' (expected key=value)")),
            }
        }
    }
    Ok(Options::Pairs(pairs))
}

fn split_escaped(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                out.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    out.push(cur);
    out
}

/// Everything `create` (and `convert -O`) needs to make a new image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateSpec {
    /// Virtual size; `None` when not given (taken from the backing file).
    pub size: Option<u64>,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// Refcount width.
    pub refcount_bits: u32,
    /// 2 or 3.
    pub version: u32,
    /// The `compat=` value as the user spelled it (shown in "Formatting ...").
    pub compat: Option<String>,
    /// zstd instead of zlib.
    pub zstd: bool,
    /// Backing file name to store.
    pub backing_file: Option<String>,
    /// Backing file format to store.
    pub backing_fmt: Option<String>,
}

impl Default for CreateSpec {
    fn default() -> Self {
        CreateSpec {
            size: None,
            cluster_size: 65536,
            refcount_bits: 16,
            version: 3,
            compat: None,
            zstd: false,
            backing_file: None,
            backing_fmt: None,
        }
    }
}

/// The option list printed by `-o help` for qcow2.
pub const QCOW2_OPTIONS_HELP: &str = "\
Supported options:
  backing_file=<str>     - File name of a base image
  backing_fmt=<str>      - Image format of the base image
  cluster_size=<size>    - qcow2 cluster size (512 to 2M, a power of two; default 64k)
  compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1]; default v3)
  compression_type=<str> - Compression method used for image cluster compression (zlib, zstd)
  extended_l2=<bool (on/off)> - Extended L2 tables (only off is supported)
  lazy_refcounts=<bool (on/off)> - Postpone refcount updates (only off is supported)
  preallocation=<str>    - Preallocation mode (only off is supported)
  refcount_bits=<num>    - Width of a reference count entry in bits (1 to 64, a power of two; default 16)
  size=<size>            - Virtual disk size
";

/// The option list printed by `-o help` for raw.
pub const RAW_OPTIONS_HELP: &str = "\
Supported options:
  preallocation=<str>    - Preallocation mode (only off is supported)
  size=<size>            - Virtual disk size
";

fn parse_bool_off(key: &str, v: &str) -> Result<(), String> {
    match v {
        "off" | "false" | "no" => Ok(()),
        "on" | "true" | "yes" => Err(format!("{key}=on is not supported by outboard-img")),
        _ => Err(format!("Parameter '{key}' expects 'on' or 'off'")),
    }
}

impl CreateSpec {
    /// Applies `-o` pairs for format `fmt` ("qcow2" or "raw").
    pub fn apply_options(&mut self, fmt: &str, pairs: &[(String, String)]) -> Result<(), String> {
        for (k, v) in pairs {
            match (fmt, k.as_str()) {
                (_, "size") => {
                    self.size = Some(parse_size(v).map_err(|e| e.to_string())?);
                }
                (_, "preallocation") => {
                    if v != "off" {
                        return Err(format!(
                            "preallocation={v} is not supported by outboard-img"
                        ));
                    }
                }
                ("qcow2", "cluster_size") => {
                    let n = parse_size(v).map_err(|_| format!("Invalid cluster_size '{v}'"))?;
                    if !n.is_power_of_two() || !(512..=2 << 20).contains(&n) {
                        return Err(
                            "Cluster size must be a power of two between 512 and 2048k".into()
                        );
                    }
                    self.cluster_size = n;
                }
                ("qcow2", "refcount_bits") => {
                    let n: u32 = v
                        .parse()
                        .map_err(|_| format!("Invalid refcount_bits '{v}'"))?;
                    if !n.is_power_of_two() || n > 64 {
                        return Err(
                            "Refcount width must be a power of two and may not exceed 64 \
                                    bits"
                                .into(),
                        );
                    }
                    self.refcount_bits = n;
                }
                ("qcow2", "compat") => {
                    self.version = match v.as_str() {
                        "0.10" | "v2" => 2,
                        "1.1" | "v3" => 3,
                        _ => return Err(format!("Invalid compatibility level: '{v}'")),
                    };
                    self.compat = Some(v.clone());
                }
                ("qcow2", "compression_type") => {
                    self.zstd = match v.as_str() {
                        "zlib" => false,
                        "zstd" => true,
                        _ => return Err(format!("Invalid compression type '{v}' (zlib or zstd)")),
                    };
                }
                ("qcow2", "backing_file") => self.backing_file = Some(v.clone()),
                ("qcow2", "backing_fmt") => self.backing_fmt = Some(v.clone()),
                ("qcow2", "lazy_refcounts" | "extended_l2") => parse_bool_off(k, v)?,
                _ => return Err(format!("Invalid parameter '{k}'")),
            }
        }
        Ok(())
    }

    /// Cross-option checks qemu-img makes before creating anything.
    pub fn validate(&self) -> Result<(), String> {
        if self.version == 2 && self.refcount_bits != 16 {
            return Err(
                "Different refcount widths than 16 bits require compatibility level 1.1 \
                        or above (use version=v3 or greater)"
                    .into(),
            );
        }
        if self.version == 2 && self.zstd {
            return Err(
                "Compression type selection is only supported with compatibility level \
                        1.1 and above"
                    .into(),
            );
        }
        if self.backing_fmt.is_some() && self.backing_file.is_none() {
            return Err("Backing format cannot be used without backing file".into());
        }
        Ok(())
    }

    /// The library's creation options.
    pub fn to_create_options(&self, size: u64) -> qcow2::CreateOptions {
        qcow2::CreateOptions {
            size,
            cluster_size: self.cluster_size,
            refcount_bits: self.refcount_bits,
            version: self.version,
            backing_file: self.backing_file.clone(),
            backing_format: self.backing_fmt.clone(),
            zstd: self.zstd,
        }
    }

    /// The option part of qemu-img's "Formatting 'FILE', fmt=..." line.
    pub fn describe(&self, fmt: &str, size: u64) -> String {
        if fmt != "qcow2" {
            return format!("fmt={fmt} size={size}");
        }
        let mut s = format!(
            "fmt=qcow2 cluster_size={} extended_l2=off compression_type={} size={size}",
            self.cluster_size,
            if self.zstd { "zstd" } else { "zlib" }
        );
        if let Some(b) = &self.backing_file {
            s.push_str(&format!(" backing_file={b}"));
        }
        if let Some(b) = &self.backing_fmt {
            s.push_str(&format!(" backing_fmt={b}"));
        }
        if let Some(c) = &self.compat {
            s.push_str(&format!(" compat={c}"));
        }
        s.push_str(&format!(
            " lazy_refcounts=off refcount_bits={}",
            self.refcount_bits
        ));
        s
    }
}

/// Formats like C's `%0.3g`.
fn format_g3(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    // Round to 3 significant digits first, then decide on the notation.
    let sci = format!("{v:.2e}");
    let (mant, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if !(-4..3).contains(&exp) {
        let mant = strip_zeros(mant);
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{mant}e{sign}{:02}", exp.abs());
    }
    let decimals = (2 - exp).max(0) as usize;
    strip_zeros(&format!("{v:.decimals$}")).to_string()
}

fn strip_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

/// qemu's `size_to_str`: "0 B", "196 KiB", "1.27 MiB", "64 MiB".
pub fn size_to_str(val: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    // floor(log2(val * 1024 / 1000)) / 10, as qemu computes it with frexp.
    let scaled = val as f64 / (1000.0 / 1024.0);
    let exp2 = if scaled < 1.0 {
        0
    } else {
        scaled.log2().floor() as i64 + 1
    };
    let i = (((exp2 - 1).max(0)) / 10).min(6) as usize;
    let div = (1u64 << (i * 10)) as f64;
    format!("{} {}B", format_g3(val as f64 / div), SUFFIXES[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_suffixed_sizes() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert_eq!(parse_size("1000b"), Ok(1000));
        assert_eq!(parse_size("1000B"), Ok(1000));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("1m"), Ok(1 << 20));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert_eq!(parse_size("3P"), Ok(3 << 50));
        assert_eq!(parse_size("7E"), Ok(7 << 60));
        assert_eq!(parse_size(" 1M"), Ok(1 << 20));
    }

    #[test]
    fn fractions_and_hex() {
        assert_eq!(parse_size("1.5k"), Ok(1536));
        assert_eq!(parse_size("0.3k"), Ok(307));
        assert_eq!(parse_size("1.5G"), Ok(1610612736));
        assert_eq!(parse_size(".5M"), Ok(512 << 10));
        assert_eq!(parse_size("0x1000"), Ok(4096));
        assert_eq!(parse_size("0x10k"), Ok(16 << 10));
    }

    #[test]
    fn bad_sizes() {
        for s in [
            "", "x", "1.5", "1.5b", "1e3", "1Mi", "1MB", "-5", "1.5x", "k", "0x", "1 M",
        ] {
            assert!(
                matches!(parse_size(s), Err(SizeError::Invalid(_))),
                "{s:?} accepted"
            );
        }
        assert_eq!(parse_size("8E"), Err(SizeError::TooLarge));
        assert_eq!(parse_size("16E"), Err(SizeError::TooLarge));
        assert_eq!(
            parse_size("99999999999999999999999999999999999999999999"),
            Err(SizeError::TooLarge)
        );
        assert_eq!(parse_size("9223372036854775807"), Ok(MAX_SIZE));
        assert_eq!(parse_size("9223372036854775808"), Err(SizeError::TooLarge));
    }

    #[test]
    fn resize_arguments() {
        assert_eq!(parse_resize("+1G"), Ok(Resize::Grow(1 << 30)));
        assert_eq!(parse_resize("-1M"), Ok(Resize::Shrink(1 << 20)));
        assert_eq!(parse_resize("2G"), Ok(Resize::Absolute(2 << 30)));
        assert!(parse_resize("+").is_err());
        assert_eq!(Resize::Shrink(10).apply(5), None);
        assert_eq!(Resize::Shrink(5).apply(10), Some(5));
        assert_eq!(Resize::Grow(5).apply(10), Some(15));
        assert_eq!(Resize::Grow(MAX_SIZE).apply(1), None);
    }

    #[test]
    fn option_strings() {
        let o = parse_options(&[
            "cluster_size=4k,compat=0.10".into(),
            "refcount_bits=16".into(),
        ]);
        assert_eq!(
            o,
            Ok(Options::Pairs(vec![
                ("cluster_size".into(), "4k".into()),
                ("compat".into(), "0.10".into()),
                ("refcount_bits".into(), "16".into()),
            ]))
        );
        assert_eq!(
            parse_options(&["backing_file=a,,b.qcow2".into()]),
            Ok(Options::Pairs(vec![(
                "backing_file".into(),
                "a,b.qcow2".into()
            )]))
        );
        assert_eq!(parse_options(&["help".into()]), Ok(Options::Help));
        assert_eq!(parse_options(&["size=1M,?".into()]), Ok(Options::Help));
        assert!(parse_options(&["cluster_size".into()]).is_err());
        assert!(parse_options(&["=5".into()]).is_err());
    }

    #[test]
    fn create_spec_from_options() {
        let mut spec = CreateSpec::default();
        let pairs = vec![
            ("cluster_size".to_string(), "4096".to_string()),
            ("refcount_bits".to_string(), "8".to_string()),
            ("compat".to_string(), "v3".to_string()),
            ("compression_type".to_string(), "zstd".to_string()),
            ("backing_file".to_string(), "base.qcow2".to_string()),
            ("backing_fmt".to_string(), "qcow2".to_string()),
            ("size".to_string(), "1G".to_string()),
        ];
        assert_eq!(spec.apply_options("qcow2", &pairs), Ok(()));
        assert_eq!(spec.cluster_size, 4096);
        assert_eq!(spec.refcount_bits, 8);
        assert_eq!(spec.version, 3);
        assert!(spec.zstd);
        assert_eq!(spec.size, Some(1 << 30));
        assert_eq!(spec.validate(), Ok(()));
        let o = spec.to_create_options(5);
        assert_eq!((o.size, o.backing_format.as_deref()), (5, Some("qcow2")));

        let mut v2 = CreateSpec::default();
        assert_eq!(
            v2.apply_options("qcow2", &[("compat".into(), "0.10".into())]),
            Ok(())
        );
        assert_eq!(v2.version, 2);
        assert_eq!(v2.validate(), Ok(()));
        v2.refcount_bits = 8;
        assert!(v2.validate().is_err());

        let mut s = CreateSpec::default();
        for bad in [
            ("cluster_size", "1000"),
            ("cluster_size", "4M"),
            ("cluster_size", "256"),
            ("refcount_bits", "3"),
            ("refcount_bits", "128"),
            ("compat", "2"),
            ("compression_type", "lzo"),
            ("lazy_refcounts", "on"),
            ("foo", "bar"),
        ] {
            assert!(
                s.apply_options("qcow2", &[(bad.0.into(), bad.1.into())])
                    .is_err(),
                "{bad:?} accepted"
            );
        }
        assert!(s
            .apply_options("raw", &[("cluster_size".into(), "4k".into())])
            .is_err());
        assert_eq!(
            s.apply_options("raw", &[("size".into(), "4k".into())]),
            Ok(())
        );
    }

    #[test]
    fn describe_matches_qemu() {
        let mut spec = CreateSpec::default();
        assert_eq!(
            spec.describe("qcow2", 67108864),
            "fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zlib \
             size=67108864 lazy_refcounts=off refcount_bits=16"
        );
        spec.backing_file = Some("base.qcow2".into());
        spec.backing_fmt = Some("qcow2".into());
        assert_eq!(
            spec.describe("qcow2", 67108864),
            "fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zlib \
             size=67108864 backing_file=base.qcow2 backing_fmt=qcow2 lazy_refcounts=off \
             refcount_bits=16"
        );
        assert_eq!(spec.describe("raw", 1073741824), "fmt=raw size=1073741824");
    }

    #[test]
    fn human_sizes() {
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(512), "512 B");
        assert_eq!(size_to_str(1000), "0.977 KiB");
        assert_eq!(size_to_str(4096), "4 KiB");
        assert_eq!(size_to_str(200704), "196 KiB");
        assert_eq!(size_to_str(197120), "192 KiB");
        assert_eq!(size_to_str(1331200), "1.27 MiB");
        assert_eq!(size_to_str(1573376), "1.5 MiB");
        assert_eq!(size_to_str(64 << 20), "64 MiB");
        assert_eq!(size_to_str(1 << 30), "1 GiB");
        assert_eq!(size_to_str(1610612736), "1.5 GiB");
        assert_eq!(size_to_str(MAX_SIZE), "8 EiB");
    }
}
