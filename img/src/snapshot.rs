//! `snapshot`: list, create, apply and delete internal snapshots
//! (qemu-img snapshot), and the snapshot table `info` prints too.

use std::path::PathBuf;

use clap::ArgGroup;
use qcow2::{ImageFormat, SnapshotInfo};

use crate::size::size_to_str;
use crate::{metadata_opts, open, parse_format, CmdResult, Failure, Global, Image};

const AFTER_HELP: &str = "\
Snapshots are identified by name or by numeric ID. Without an operation the
snapshots are listed. Apply, create and delete need the image opened
read-write: do not use them on an image a VM is running on.

Examples:
  outboard-img snapshot -l disk.qcow2
  outboard-img snapshot -c before-upgrade disk.qcow2
  outboard-img snapshot -a before-upgrade disk.qcow2
  outboard-img snapshot -d 1 disk.qcow2";

/// `snapshot` arguments.
#[derive(Debug, clap::Args)]
#[command(after_help = AFTER_HELP, group(ArgGroup::new("op").args(["list", "create", "apply", "delete"])))]
pub struct Args {
    /// Format of FILE (raw or qcow2); probed if omitted.
    #[arg(short = 'f', long = "format", value_name = "FMT", value_parser = parse_format)]
    format: Option<ImageFormat>,
    /// List the snapshots (the default).
    #[arg(short = 'l', long = "list")]
    list: bool,
    /// Create a snapshot named SNAPSHOT of the current disk state.
    #[arg(short = 'c', long = "create", value_name = "SNAPSHOT")]
    create: Option<String>,
    /// Revert the disk to SNAPSHOT (name or ID).
    #[arg(short = 'a', long = "apply", value_name = "SNAPSHOT")]
    apply: Option<String>,
    /// Delete SNAPSHOT (name or ID).
    #[arg(short = 'd', long = "delete", value_name = "SNAPSHOT")]
    delete: Option<String>,
    /// Accepted for qemu-img compatibility: images are never locked, so
    /// sharing them is always allowed (read-only uses only, as qemu-img).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Quiet operation.
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// The image file.
    #[arg(value_name = "FILE")]
    filename: PathBuf,
}

/// Runs `snapshot`.
pub fn run(_g: Global, args: Args) -> CmdResult {
    let path = &args.filename;
    let (op, name) = if let Some(n) = &args.create {
        ("create", n)
    } else if let Some(n) = &args.apply {
        ("apply", n)
    } else if let Some(n) = &args.delete {
        ("delete", n)
    } else {
        let img = open(path, args.format, &metadata_opts(true))?;
        if let Image::Qcow2(q) = img {
            let snaps = q.snapshots();
            if !snaps.is_empty() {
                print!("Snapshot list:\n{}", table(&snaps));
            }
        }
        return Ok(0);
    };
    if args.force_share {
        return Err(Failure::force_share_write(path));
    }
    let failed = |e: String| Failure::file(path, format!("Could not {op} snapshot '{name}': {e}"));
    let q = match open(path, args.format, &metadata_opts(false))? {
        Image::Qcow2(q) => q,
        Image::Raw(_) => return Err(failed("the raw format does not support snapshots".into())),
    };
    let result = match op {
        "create" => q.snapshot_create(name).map(|_| ()),
        "apply" => q.snapshot_apply(name),
        _ => q.snapshot_delete(name),
    };
    result
        .and_then(|()| q.flush())
        .map_err(|e| failed(crate::error_chain(&e)))?;
    let _ = args.quiet;
    Ok(0)
}

/// qemu's snapshot table: a header line and one row per snapshot.
pub fn table(snaps: &[SnapshotInfo]) -> String {
    let mut t = format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}\n",
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
    );
    for s in snaps {
        t.push_str(&table_row(s));
        t.push('\n');
    }
    t
}

/// One row of the snapshot table.
pub fn table_row(s: &SnapshotInfo) -> String {
    let secs = s.vm_clock_nsec / 1_000_000_000;
    let clock = format!(
        "{:04}:{:02}:{:02}.{:03}",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60,
        (s.vm_clock_nsec / 1_000_000) % 1000
    );
    let icount = s.icount.map_or_else(|| "--".to_string(), |i| i.to_string());
    format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
        s.id,
        s.name,
        size_to_str(s.vm_state_size),
        local_date(s.date_sec as i64),
        clock,
        icount
    )
}

/// `YYYY-MM-DD HH:MM:SS` in local time, as qemu prints snapshot dates.
pub fn local_date(sec: i64) -> String {
    let t = sec as libc::time_t;
    let mut tm = std::mem::MaybeUninit::<libc::tm>::zeroed();
    // SAFETY: `t` and `tm` are valid for the call; localtime_r writes only into `tm`.
    let ok = unsafe { !libc::localtime_r(&t, tm.as_mut_ptr()).is_null() };
    if !ok {
        return "????-??-?? ??:??:??".into();
    }
    // SAFETY: an all-zero `libc::tm` is a valid value and localtime_r filled it in.
    let tm = unsafe { tm.assume_init() };
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year as i64 + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_layout_matches_qemu() {
        let s = SnapshotInfo {
            id: "1".into(),
            name: "snap1".into(),
            l1_table_offset: 0,
            l1_size: 0,
            date_sec: 0,
            date_nsec: 0,
            vm_clock_nsec: 3_723_004_000_000,
            vm_state_size: 0,
            disk_size: 0,
            icount: Some(0),
            extra_tail: vec![],
        };
        let row = table_row(&s);
        assert!(
            row.starts_with("1       snap1                 0 B "),
            "{row:?}"
        );
        assert!(row.ends_with(" 0001:02:03.004          0"), "{row:?}");
    }
}
