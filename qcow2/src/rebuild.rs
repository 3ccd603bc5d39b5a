//! Whole-image metadata operations built on one primitive, [`commit`]:
//! write a complete new set of metadata roots (active L1 and L2 tables,
//! snapshot table, refcount table and blocks computed from the references)
//! to unused space, make it durable, then switch to it with a single write
//! of the header's fixed fields.
//!
//! Refcounts and COPIED flags can't be updated together on disk any other
//! way, and `qemu-img check` counts a mismatch between them as corruption,
//! so snapshot create/apply/delete, L1 growth, dirty-bit refcount rebuild and
//! `check -r` all go through here. Before the switch the old image is intact;
//! after it the new one is; old metadata becomes free space (punched out).
//!
//! Also home of [`check`]: the same reference walk compared with the stored
//! refcounts.

use std::fs::File;

use crate::check::{CheckReport, RepairMode};
use crate::entry::{self, L2Entry};
use crate::error::{Error, Result};
use crate::header::INCOMPAT_DIRTY;
use crate::io::punch_hole;
use crate::meta::{read_table, sync, write_table, Geo, Meta};
use crate::refcount::{rc_max, rc_set};
use crate::snapshot::{serialize_table, SnapshotInfo};

/// The logical content of an image: what [`commit`] writes.
#[derive(Debug, Clone)]
pub struct State {
    /// Active L1 entries; their L2 tables are copied.
    pub active_l1: Vec<u64>,
    /// Snapshots, kept as they are on disk.
    pub snapshots: Vec<SnapshotInfo>,
    /// Virtual disk size.
    pub size: u64,
}

impl State {
    /// The image's current state.
    pub fn current(m: &Meta) -> State {
        State {
            active_l1: m.l1.clone(),
            snapshots: m.snapshots.clone(),
            size: m.header.size,
        }
    }
}

/// Largest file (in clusters) whose refcounts are rebuilt in memory: 4 bytes
/// each, so 1 GiB of counters (16 TiB of image at 64 KiB clusters).
const MAX_WALK_CLUSTERS: u64 = 1 << 28;

/// Reference counts gathered by walking metadata.
struct Refs {
    counts: Vec<u32>,
    cluster_bits: u32,
    errors: Vec<String>,
}

impl Refs {
    fn new(end: u64, cluster_bits: u32) -> Result<Refs> {
        if end > MAX_WALK_CLUSTERS {
            return Err(Error::Unsupported(format!(
                "image file of {end} clusters is too large for a refcount walk"
            )));
        }
        Ok(Refs {
            counts: vec![0; end as usize],
            cluster_bits,
            errors: Vec::new(),
        })
    }

    fn add(&mut self, first: u64, n: u64, what: &str) {
        if first == 0 || first + n > self.counts.len() as u64 {
            self.errors.push(format!(
                "{what} at {:#x} is outside the image file or overlaps the header",
                first << self.cluster_bits
            ));
            return;
        }
        for c in first..first + n {
            self.counts[c as usize] = self.counts[c as usize].saturating_add(1);
        }
    }

    fn add_bytes(&mut self, off: u64, len: u64, what: &str) {
        let cs = 1u64 << self.cluster_bits;
        if !off.is_multiple_of(cs) {
            self.errors
                .push(format!("{what} at {off:#x} is not cluster aligned"));
            return;
        }
        self.add(off >> self.cluster_bits, len.div_ceil(cs).max(1), what);
    }
}

/// Reads an L2 table (whole cluster) if its offset is sane.
fn read_l2(file: &File, geo: &Geo, refs: &mut Refs, l1e: u64, l1i: usize) -> Option<Vec<u64>> {
    let off = l1e & entry::OFFSET_MASK;
    if l1e & entry::L1_RESERVED != 0 || !off.is_multiple_of(geo.cs) {
        refs.errors
            .push(format!("L1 entry {l1i} ({l1e:#x}) is invalid"));
        return None;
    }
    let before = refs.errors.len();
    refs.add(off >> geo.cluster_bits, 1, "L2 table");
    if refs.errors.len() > before {
        return None;
    }
    match read_table(file, off, geo.cs / 8) {
        Ok(t) => Some(t),
        Err(e) => {
            refs.errors
                .push(format!("cannot read L2 table at {off:#x}: {e}"));
            None
        }
    }
}

/// Counts the data clusters referenced by an L2 table.
fn add_l2_entries(geo: &Geo, refs: &mut Refs, table: &[u64]) {
    for &raw in table {
        if L2Entry::is_malformed(raw, geo.cluster_bits) {
            refs.errors.push(format!("L2 entry {raw:#x} is invalid"));
            continue;
        }
        if let Some((first, n)) = L2Entry::host_clusters(raw, geo.cluster_bits) {
            refs.add(first, n, "data cluster");
        }
    }
}

/// Walks an L1 table and everything below it.
fn walk_tree(file: &File, geo: &Geo, refs: &mut Refs, l1: &[u64]) {
    for (i, &e) in l1.iter().enumerate() {
        if e & entry::OFFSET_MASK == 0 {
            continue;
        }
        if let Some(t) = read_l2(file, geo, refs, e, i) {
            add_l2_entries(geo, refs, &t);
        }
    }
}

fn read_snapshot_l1(file: &File, s: &SnapshotInfo) -> Result<Vec<u64>> {
    if s.l1_size as u64 * 8 > crate::header::MAX_L1_BYTES {
        return Err(Error::corrupt(format!(
            "snapshot {:?} has an oversized L1 table",
            s.name
        )));
    }
    read_table(file, s.l1_table_offset, s.l1_size as u64)
}

/// Writes `state` as the image's new metadata and switches to it atomically.
pub fn commit(file: &File, m: &mut Meta, state: State) -> Result<()> {
    let geo = m.geo;
    let cs = geo.cs;
    let cb = geo.cluster_bits;
    let order = m.header.refcount_order;
    let base = m.rc.end().max(1);
    let mut refs = Refs::new(base, cb)?;
    refs.counts[0] = 1; // the header
    for s in &state.snapshots {
        refs.add_bytes(s.l1_table_offset, s.l1_size as u64 * 8, "snapshot L1 table");
        let l1 = read_snapshot_l1(file, s)?;
        walk_tree(file, &geo, &mut refs, &l1);
    }
    // Active L2 tables are read, their data counted, and copied below.
    let mut tables: Vec<(usize, Vec<u64>)> = Vec::new();
    let mut scratch = Refs::new(base, cb)?;
    for (i, &e) in state.active_l1.iter().enumerate() {
        if e & entry::OFFSET_MASK == 0 {
            continue;
        }
        if let Some(t) = read_l2(file, &geo, &mut scratch, e, i) {
            add_l2_entries(&geo, &mut refs, &t);
            tables.push((i, t));
        }
    }
    refs.errors.append(&mut scratch.errors);
    if let Some(e) = refs.errors.first() {
        return Err(Error::corrupt(format!(
            "{e} ({} problems)",
            refs.errors.len()
        )));
    }

    // Layout of the new metadata, all at or beyond `base`.
    let n_l2 = tables.len() as u64;
    let n_l1 = (state.active_l1.len() as u64 * 8).div_ceil(cs).max(1);
    let snap_raw = serialize_table(&state.snapshots);
    let n_sn = (snap_raw.len() as u64).div_ceil(cs);
    let per_block = (cs * 8) >> order;
    let (mut n_rb, mut n_rt) = (1u64, 1u64);
    loop {
        let total = base + n_l2 + n_l1 + n_sn + n_rb + n_rt;
        let rb = total.div_ceil(per_block);
        // Headroom: the table can describe twice the blocks.
        let rt = (rb * 2 * 8).div_ceil(cs);
        if rb <= n_rb && rt <= n_rt {
            break;
        }
        (n_rb, n_rt) = (rb.max(n_rb), rt.max(n_rt));
    }
    let l2_at = base;
    let l1_at = l2_at + n_l2;
    let sn_at = l1_at + n_l1;
    let rb_at = sn_at + n_sn;
    let rt_at = rb_at + n_rb;
    let total = rt_at + n_rt;
    refs.counts.resize(total as usize, 0);
    for c in base..total {
        refs.counts[c as usize] = 1;
    }
    let max = rc_max(order);
    if let Some(c) = refs.counts.iter().position(|&r| r as u64 > max) {
        return Err(Error::InvalidArgument(format!(
            "cluster {c} needs refcount {} but the image has {}-bit refcounts",
            refs.counts[c],
            1 << order
        )));
    }

    // Write the new tables.
    let mut new_l1 = vec![0u64; state.active_l1.len()];
    for (k, (i, t)) in tables.iter().enumerate() {
        let copy: Vec<u64> = t
            .iter()
            .map(|&raw| match L2Entry::decode(raw, cb) {
                L2Entry::Normal { host, .. } | L2Entry::Zero(Some(host)) => {
                    entry::with_copied(raw, refs.counts[(host >> cb) as usize] == 1)
                }
                _ => raw & !entry::COPIED,
            })
            .collect();
        let off = (l2_at + k as u64) << cb;
        write_table(file, off, &copy, cs)?;
        new_l1[*i] = off | entry::COPIED;
    }
    write_table(file, l1_at << cb, &new_l1, n_l1 * cs)?;
    if n_sn > 0 {
        let mut raw = snap_raw.clone();
        raw.resize((n_sn * cs) as usize, 0);
        std::os::unix::fs::FileExt::write_all_at(file, &raw, sn_at << cb)
            .map_err(|e| Error::io("write snapshot table", e))?;
    }
    let mut blocks = vec![0u8; (n_rb * cs) as usize];
    for (c, &r) in refs.counts.iter().enumerate() {
        if r > 0 {
            let b = c / per_block as usize;
            let i = c % per_block as usize;
            rc_set(
                &mut blocks[b * cs as usize..(b + 1) * cs as usize],
                i,
                order,
                r as u64,
            );
        }
    }
    std::os::unix::fs::FileExt::write_all_at(file, &blocks, rb_at << cb)
        .map_err(|e| Error::io("write refcount blocks", e))?;
    let table: Vec<u64> = (0..n_rb).map(|i| (rb_at + i) << cb).collect();
    write_table(file, rt_at << cb, &table, n_rt * cs)?;
    sync(file)?;

    // The switch.
    let h = &mut m.header;
    h.l1_table_offset = l1_at << cb;
    h.l1_size = new_l1.len() as u32;
    h.refcount_table_offset = rt_at << cb;
    h.refcount_table_clusters = n_rt as u32;
    h.nb_snapshots = state.snapshots.len() as u32;
    h.snapshots_offset = if n_sn > 0 { sn_at << cb } else { 0 };
    h.size = state.size;
    h.incompatible_features &= !INCOMPAT_DIRTY;
    m.write_header(file)?;
    sync(file)?;

    // Reload the in-memory state.
    m.l1 = new_l1;
    m.l1_dirty.clear();
    m.l2.clear();
    m.rc.reset(file, rt_at << cb, n_rt, total << cb)?;
    m.snapshots = state.snapshots;
    m.snapshots_len = snap_raw.len() as u64;
    m.pending_release.clear();

    // Old metadata is free now: give the space back.
    let mut c = 1u64;
    while c < base {
        if refs.counts[c as usize] == 0 {
            let start = c;
            while c < base && refs.counts[c as usize] == 0 {
                c += 1;
            }
            punch_hole(file, start << cb, (c - start) << cb)?;
        } else {
            c += 1;
        }
    }
    Ok(())
}

fn find_snapshot(m: &Meta, id_or_name: &str) -> Result<usize> {
    m.snapshots
        .iter()
        .position(|s| s.id == id_or_name)
        .or_else(|| m.snapshots.iter().position(|s| s.name == id_or_name))
        .ok_or_else(|| Error::NoSnapshot(id_or_name.to_string()))
}

/// Creates a snapshot: the current L1 table becomes the snapshot's, the
/// active layer gets fresh copies of its L2 tables.
pub fn snapshot_create(file: &File, m: &mut Meta, name: &str) -> Result<SnapshotInfo> {
    if name.is_empty() || name.len() > 1024 {
        return Err(Error::InvalidArgument(
            "snapshot name must be 1 to 1024 bytes".into(),
        ));
    }
    if m.snapshots.iter().any(|s| s.name == name) {
        return Err(Error::SnapshotExists(name.to_string()));
    }
    let next_id = m
        .snapshots
        .iter()
        .filter_map(|s| s.id.parse::<u64>().ok())
        .max()
        .unwrap_or(0)
        + 1;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let sn = SnapshotInfo {
        id: next_id.to_string(),
        name: name.to_string(),
        l1_table_offset: m.header.l1_table_offset,
        l1_size: m.l1.len() as u32,
        date_sec: now.as_secs() as u32,
        date_nsec: now.subsec_nanos(),
        vm_clock_nsec: 0,
        vm_state_size: 0,
        disk_size: m.header.size,
        icount: None,
        extra_tail: Vec::new(),
    };
    let mut state = State::current(m);
    state.snapshots.push(sn.clone());
    commit(file, m, state)?;
    Ok(sn)
}

/// Reverts the active layer to a snapshot (and the disk to its size).
pub fn snapshot_apply(file: &File, m: &mut Meta, id_or_name: &str) -> Result<()> {
    let i = find_snapshot(m, id_or_name)?;
    let s = &m.snapshots[i];
    let mut l1 = read_snapshot_l1(file, s)?;
    let needed = m.geo.l1_entries_for(s.disk_size) as usize;
    if l1.len() < needed {
        l1.resize(needed, 0);
    }
    let mut state = State::current(m);
    state.size = s.disk_size;
    state.active_l1 = l1;
    commit(file, m, state)
}

/// Deletes a snapshot.
pub fn snapshot_delete(file: &File, m: &mut Meta, id_or_name: &str) -> Result<()> {
    let i = find_snapshot(m, id_or_name)?;
    let mut state = State::current(m);
    state.snapshots.remove(i);
    commit(file, m, state)
}

/// Compares the stored refcounts with the references; repairs on request.
pub fn check(file: &File, m: &mut Meta, repair: Option<RepairMode>) -> Result<CheckReport> {
    let mut report = scan(file, m)?;
    let Some(mode) = repair else {
        return Ok(report);
    };
    let fixable = report.check_errors == 0
        && !report
            .messages
            .iter()
            .any(|s| s.starts_with("ERROR structure"));
    let wanted = match mode {
        RepairMode::Leaks => report.leaks > 0 && report.corruptions == 0,
        RepairMode::All => report.leaks > 0 || report.corruptions > 0,
    };
    if wanted && fixable {
        let state = State::current(m);
        commit(file, m, state)?;
        let after = scan(file, m)?;
        report.leaks_fixed = report.leaks.saturating_sub(after.leaks);
        report.corruptions_fixed = report.corruptions.saturating_sub(after.corruptions);
        report
            .messages
            .extend(after.messages.iter().map(|s| format!("after repair: {s}")));
        report.allocated_clusters = after.allocated_clusters;
        report.image_end_offset = after.image_end_offset;
    }
    Ok(report)
}

fn scan(file: &File, m: &mut Meta) -> Result<CheckReport> {
    let geo = m.geo;
    let cb = geo.cluster_bits;
    let mut r = CheckReport::default();
    let end = m.rc.end().max(1);
    let mut refs = Refs::new(end, cb)?;
    refs.counts[0] = 1;
    let h = m.header.clone();
    refs.add_bytes(h.l1_table_offset, h.l1_size as u64 * 8, "L1 table");
    walk_tree(file, &geo, &mut refs, &m.l1.clone());
    if h.nb_snapshots > 0 {
        refs.add_bytes(h.snapshots_offset, m.snapshots_len, "snapshot table");
    }
    for s in m.snapshots.clone() {
        refs.add_bytes(s.l1_table_offset, s.l1_size as u64 * 8, "snapshot L1 table");
        match read_snapshot_l1(file, &s) {
            Ok(l1) => walk_tree(file, &geo, &mut refs, &l1),
            Err(e) => refs.errors.push(e.to_string()),
        }
    }
    let (rt_off, rt_clusters) = m.rc.table_location();
    refs.add_bytes(rt_off, rt_clusters << cb, "refcount table");
    let blocks = m.rc.block_offsets();
    for b in &blocks {
        refs.add_bytes(*b, 1, "refcount block");
    }
    for e in refs.errors.drain(..) {
        r.corruptions += 1;
        r.messages.push(format!("ERROR structure: {e}"));
    }
    // Stored vs computed refcounts over the file (as qemu-img: refcounts
    // past the end of the file are not looked at).
    let mut last_used = 0u64;
    for c in 0..end {
        let stored = m.rc.get(file, c)?;
        let want = refs.counts.get(c as usize).copied().unwrap_or(0) as u64;
        if stored > 0 || want > 0 {
            last_used = c;
        }
        if stored < want {
            r.corruptions += 1;
            r.messages.push(format!(
                "ERROR cluster {c} refcount={stored} reference={want}"
            ));
        } else if stored > want {
            r.leaks += 1;
            r.messages.push(format!(
                "Leaked cluster {c} refcount={stored} reference={want}"
            ));
        }
    }
    // COPIED flags in the active layer.
    let mut prev_host = 0u64;
    for (i, &e) in m.l1.clone().iter().enumerate() {
        let off = e & entry::OFFSET_MASK;
        if off == 0 {
            continue;
        }
        let rc = m.rc.get(file, off >> cb)?;
        if (rc == 1) != (e & entry::COPIED != 0) {
            r.corruptions += 1;
            r.messages.push(format!(
                "ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x} refcount={rc}"
            ));
        }
        let Ok(t) = read_table(file, off, geo.cs / 8) else {
            continue;
        };
        for &raw in &t {
            match L2Entry::decode(raw, cb) {
                L2Entry::Normal { host, .. } | L2Entry::Zero(Some(host))
                    if !L2Entry::is_malformed(raw, cb) =>
                {
                    let copied = raw & entry::COPIED != 0;
                    let rc = m.rc.get(file, host >> cb)?;
                    if (rc == 1) != copied {
                        r.corruptions += 1;
                        r.messages.push(format!(
                            "ERROR OFLAG_COPIED data cluster: l2_entry={raw:x} refcount={rc}"
                        ));
                    }
                    if matches!(L2Entry::decode(raw, cb), L2Entry::Normal { .. }) {
                        r.allocated_clusters += 1;
                        if prev_host != 0 && host != prev_host + geo.cs {
                            r.fragmented_clusters += 1;
                        }
                        prev_host = host;
                    }
                }
                L2Entry::Compressed { .. } => {
                    r.allocated_clusters += 1;
                    r.compressed_clusters += 1;
                }
                _ => {}
            }
        }
    }
    r.total_clusters = h.size.div_ceil(geo.cs);
    r.image_end_offset = (last_used + 1) << cb;
    Ok(r)
}
