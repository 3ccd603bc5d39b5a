//! `check`: metadata consistency check and repair (qemu-img check), with
//! qemu-img's text, JSON and exit codes: 0 clean, 1 check not completed,
//! 2 corruptions, 3 leaked clusters only, 63 format without checks (raw).

use std::path::PathBuf;

use clap::ValueEnum;
use qcow2::{CheckReport, ImageFormat, RepairMode};
use serde::Serialize;

use crate::{format_of, metadata_opts, parse_format, print_json};
use crate::{CmdResult, Failure, Global, OutputFormat};

const AFTER_HELP: &str = "\
Exit status: 0 no problems, 1 the check could not be completed, 2 the image is
corrupt, 3 only leaked clusters (wasted space, no harm to data), 63 the format
(raw) has no metadata to check.

Examples:
  outboard-img check disk.qcow2
  outboard-img check -r leaks disk.qcow2
  outboard-img check --output json disk.qcow2";

/// `-r` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Repair {
    /// Free leaked clusters only.
    Leaks,
    /// Fix leaks and refcount errors.
    All,
}

/// `check` arguments.
#[derive(Debug, clap::Args)]
#[command(after_help = AFTER_HELP)]
pub struct Args {
    /// Format of FILE (raw or qcow2); probed if omitted.
    #[arg(short = 'f', long = "format", value_name = "FMT", value_parser = parse_format)]
    format: Option<ImageFormat>,
    /// Repair the image (opens it read-write; never while a VM uses it).
    #[arg(short = 'r', long = "repair", value_name = "leaks|all", value_enum)]
    repair: Option<Repair>,
    /// Output format.
    #[arg(
        long = "output",
        value_name = "FMT",
        value_enum,
        default_value = "human"
    )]
    output: OutputFormat,
    /// Accepted for qemu-img compatibility: images are never locked, so
    /// sharing them is always allowed (read-only uses only, as qemu-img).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Quiet: print nothing, only set the exit status.
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// The image file.
    #[arg(value_name = "FILE")]
    filename: PathBuf,
}

/// qemu-img's `ImageCheck` JSON object, fields in the order qemu-img prints
/// them; zero counters are left out as qemu does.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
struct JsonCheck {
    #[serde(skip_serializing_if = "is_zero")]
    image_end_offset: u64,
    #[serde(skip_serializing_if = "is_zero")]
    compressed_clusters: u64,
    #[serde(skip_serializing_if = "is_zero")]
    total_clusters: u64,
    #[serde(skip_serializing_if = "is_zero")]
    corruptions: u64,
    #[serde(skip_serializing_if = "is_zero")]
    corruptions_fixed: u64,
    check_errors: u64,
    #[serde(skip_serializing_if = "is_zero")]
    leaks: u64,
    #[serde(skip_serializing_if = "is_zero")]
    leaks_fixed: u64,
    #[serde(skip_serializing_if = "is_zero")]
    allocated_clusters: u64,
    filename: String,
    format: &'static str,
    #[serde(skip_serializing_if = "is_zero")]
    fragmented_clusters: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// Runs `check`.
pub fn run(_g: Global, args: Args) -> CmdResult {
    let path = &args.filename;
    if format_of(path, args.format)? == ImageFormat::Raw {
        return Err(Failure::msg("This image format does not support checks").with_code(63));
    }
    let repair = args.repair.map(|r| match r {
        Repair::Leaks => RepairMode::Leaks,
        Repair::All => RepairMode::All,
    });
    if repair.is_some() && args.force_share {
        return Err(Failure::force_share_write(path));
    }
    let opts = qcow2::OpenOptions {
        // An image marked corrupt may be opened read-write for repair only.
        repair: repair.is_some(),
        ..metadata_opts(repair.is_none())
    };
    let q = qcow2::Qcow2::open(path, &opts).map_err(|e| Failure::lib(path, &e))?;
    let checked = |r: Option<RepairMode>| {
        q.check(r)
            .map_err(|e| Failure::lib_ctx(path, "Check failed", &e))
    };
    let mut report = checked(repair)?;
    print_messages(&report, args.quiet, report.leaks_fixed > 0);
    if report.leaks_fixed > 0 || report.corruptions_fixed > 0 {
        if args.output == OutputFormat::Human && !args.quiet {
            println!(
                "The following inconsistencies were found and repaired:\n\n    {} leaked \
                 clusters\n    {} corruptions\n\nDouble checking the fixed image now...",
                report.leaks_fixed, report.corruptions_fixed
            );
        }
        q.flush()
            .map_err(|e| Failure::lib_ctx(path, "Repair failed", &e))?;
        let (leaks_fixed, corruptions_fixed) = (report.leaks_fixed, report.corruptions_fixed);
        report = checked(None)?;
        print_messages(&report, args.quiet, false);
        report.leaks_fixed = leaks_fixed;
        report.corruptions_fixed = corruptions_fixed;
    }
    if !args.quiet {
        match args.output {
            OutputFormat::Human => print!("{}", human(&report)),
            OutputFormat::Json => print_json(&JsonCheck {
                image_end_offset: report.image_end_offset,
                total_clusters: report.total_clusters,
                check_errors: report.check_errors,
                leaks: report.leaks,
                corruptions: report.corruptions,
                leaks_fixed: report.leaks_fixed,
                corruptions_fixed: report.corruptions_fixed,
                allocated_clusters: report.allocated_clusters,
                fragmented_clusters: report.fragmented_clusters,
                compressed_clusters: report.compressed_clusters,
                filename: path.display().to_string(),
                format: "qcow2",
            })?,
        }
    }
    if report.check_errors > 0 {
        return Err(Failure::msg("Check failed"));
    }
    // After a repair the double check decides, as in qemu-img.
    Ok(if report.corruptions > 0 {
        2
    } else if report.leaks > 0 {
        3
    } else {
        0
    })
}

/// Per-problem lines go to stderr, as qemu-img prints them; when the leaks
/// were repaired, qemu-img's "Repairing cluster" line for each leaked
/// cluster follows them (the rebuild freed them all at once).
fn print_messages(report: &CheckReport, quiet: bool, leaks_repaired: bool) {
    if quiet {
        return;
    }
    for m in &report.messages {
        eprintln!("{m}");
    }
    if leaks_repaired {
        for m in &report.messages {
            if let Some(rest) = m.strip_prefix("Leaked cluster ") {
                eprintln!("Repairing cluster {rest}");
            }
        }
    }
}

/// qemu-img's human check summary.
pub fn human(r: &CheckReport) -> String {
    let mut s = String::new();
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        s.push_str("No errors were found on the image.\n");
    } else {
        if r.corruptions > 0 {
            s.push_str(&format!(
                "\n{} errors were found on the image.\nData may be corrupted, or further \
                 writes to the image may corrupt it.\n",
                r.corruptions
            ));
        }
        if r.leaks > 0 {
            s.push_str(&format!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk \
                 space, but no harm to data.\n",
                r.leaks
            ));
        }
        if r.check_errors > 0 {
            s.push_str(&format!(
                "\n{} internal errors have occurred during the check.\n",
                r.check_errors
            ));
        }
    }
    if r.total_clusters != 0 && r.allocated_clusters != 0 {
        let alloc = r.allocated_clusters as f64;
        s.push_str(&format!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
            r.allocated_clusters,
            r.total_clusters,
            alloc * 100.0 / r.total_clusters as f64,
            r.fragmented_clusters as f64 * 100.0 / alloc,
            r.compressed_clusters as f64 * 100.0 / alloc
        ));
    }
    if r.image_end_offset != 0 {
        s.push_str(&format!("Image end offset: {}\n", r.image_end_offset));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_report_text() {
        let r = CheckReport {
            allocated_clusters: 16,
            total_clusters: 1024,
            image_end_offset: 1638400,
            ..Default::default()
        };
        assert_eq!(
            human(&r),
            "No errors were found on the image.\n16/1024 = 1.56% allocated, 0.00% fragmented, \
             0.00% compressed clusters\nImage end offset: 1638400\n"
        );
    }

    #[test]
    fn leaks_and_corruptions_text() {
        let r = CheckReport {
            leaks: 3,
            corruptions: 2,
            ..Default::default()
        };
        assert_eq!(
            human(&r),
            "\n2 errors were found on the image.\nData may be corrupted, or further writes to \
             the image may corrupt it.\n\n3 leaked clusters were found on the image.\nThis \
             means waste of disk space, but no harm to data.\n"
        );
    }
}
