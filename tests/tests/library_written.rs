//! Images written by the library pass `qemu-img check` with no errors and no
//! leaks, list the same snapshots in `qemu-img snapshot -l`, and compare
//! equal (`qemu-img compare`) with the content this test expects: random
//! (unaligned) writes, write_zeroes, discard, snapshots created / applied /
//! deleted, resize, backing overlays; snapshots cross over between the
//! library and qemu-img in both directions.

use std::fs;
use std::path::Path;
use std::process::Command;

use outboard_tests::*;
use qcow2::{CreateOptions, OpenOptions, Qcow2};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A random request range inside `size`, biased to cross cluster edges.
fn range(rng: &mut StdRng, size: u64, cluster: u64) -> (u64, u64) {
    let len = match rng.gen_range(0..4) {
        0 => rng.gen_range(1..=512),
        1 => rng.gen_range(1..=cluster * 2),
        2 => cluster * rng.gen_range(1..=3),
        _ => rng.gen_range(1..=(cluster * 4).min(256 << 10)),
    }
    .min(size);
    let off = if rng.gen_bool(0.3) {
        (rng.gen_range(0..=(size - len)) / cluster * cluster).min(size - len)
    } else {
        rng.gen_range(0..=(size - len))
    };
    (off, len)
}

/// Model of discard: only clusters fully inside the range read as zeros.
fn model_discard(model: &mut [u8], off: u64, len: u64, cluster: u64) {
    let start = off.next_multiple_of(cluster);
    let end = (off + len) / cluster * cluster;
    if end > start {
        model[start as usize..end as usize].fill(0);
    }
}

fn check_info(path: &Path, cluster: u64, rbits: u32, version: u32, size: u64, ctx: &str) {
    let info = qemu_info(path);
    assert_eq!(info["format"].as_str(), Some("qcow2"), "{ctx}: {info}");
    assert_eq!(
        info["virtual-size"].as_u64(),
        Some(size),
        "{ctx}: virtual size {info}"
    );
    assert_eq!(
        info["cluster-size"].as_u64(),
        Some(cluster),
        "{ctx}: cluster size {info}"
    );
    let fs = &info["format-specific"]["data"];
    let compat = if version == 2 { "0.10" } else { "1.1" };
    assert_eq!(fs["compat"].as_str(), Some(compat), "{ctx}: compat {info}");
    assert_eq!(
        fs["refcount-bits"].as_u64(),
        Some(rbits as u64),
        "{ctx}: refcount bits {info}"
    );
}

/// Random writes, zeroes and discards in every configuration; the result
/// passes qemu-img check and compares equal to the model.
#[test]
fn library_random_io_all_configs() {
    require_qemu_img();
    for (i, (cluster, rbits, version)) in configs().into_iter().enumerate() {
        let seed = 0x11b + i as u64;
        let ctx = format!("cluster {cluster} refcount_bits {rbits} v{version} seed {seed:#x}");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("lib.qcow2");
        // Not a multiple of the cluster size: the last cluster is partial.
        let size = if cluster >= 65536 {
            (9 << 20) + 512
        } else {
            (3 << 20) + 1536
        };
        lib_create(&path, size, cluster, rbits, version);
        assert_qemu_check_clean(&path, &format!("{ctx}: fresh image"));
        check_info(&path, cluster, rbits, version, size, &ctx);
        let mut model = vec![0u8; size as usize];
        let mut rng = StdRng::seed_from_u64(seed);
        {
            let img = open_rw(&path);
            assert_eq!(img.size(), size, "{ctx}: size");
            for step in 0..120 {
                let (off, len) = range(&mut rng, size, cluster);
                let what = match rng.gen_range(0..10) {
                    0..=6 => {
                        let data = pattern(seed, step, len as usize);
                        img.write_at(&data, off)
                            .unwrap_or_else(|e| panic!("{ctx}: write: {e}"));
                        model[off as usize..(off + len) as usize].copy_from_slice(&data);
                        "write"
                    }
                    7 => {
                        img.write_zeroes(off, len)
                            .unwrap_or_else(|e| panic!("{ctx}: zeroes: {e}"));
                        model[off as usize..(off + len) as usize].fill(0);
                        "write_zeroes"
                    }
                    8 => {
                        // Whether a discard reaching the end of a disk with a
                        // partial last cluster drops that cluster is left open;
                        // stop one byte short so the model is unambiguous.
                        let len = if off + len == size && size % cluster != 0 && len > 1 {
                            len - 1
                        } else {
                            len
                        };
                        img.discard(off, len)
                            .unwrap_or_else(|e| panic!("{ctx}: discard: {e}"));
                        model_discard(&mut model, off, len, cluster);
                        "discard"
                    }
                    _ => {
                        img.flush().unwrap_or_else(|e| panic!("{ctx}: flush: {e}"));
                        "flush"
                    }
                };
                // Read back the touched range plus a margin.
                let lo = off.saturating_sub(cluster);
                let hi = (off + len + cluster).min(size);
                let mut buf = vec![0u8; (hi - lo) as usize];
                img.read_at(&mut buf, lo)
                    .unwrap_or_else(|e| panic!("{ctx}: read: {e}"));
                assert_bytes_eq(
                    &model[lo as usize..hi as usize],
                    &buf,
                    &format!("{ctx}: step {step} after {what} {off}+{len}"),
                );
            }
            assert_bytes_eq(&model, &read_all(&img), &format!("{ctx}: whole disk"));
            img.flush().expect("flush");
        }
        assert_qemu_check_clean(&path, &ctx);
        assert_qemu_content(&path, &model, &ctx);
        // Reopened, the library still reads the same.
        assert_bytes_eq(
            &model,
            &read_all(&open_ro(&path)),
            &format!("{ctx}: reopened"),
        );
    }
}

/// Snapshots created, applied and deleted by the library; qemu-img lists
/// them, reads each one's content, and applies one of them.
#[test]
fn library_snapshots_cross_check() {
    require_qemu_img();
    let cfgs = [
        (512u64, 16u32, 2u32),
        (4096, 4, 3),
        (65536, 16, 3),
        (65536, 64, 3),
        (2 << 20, 8, 3),
    ];
    for (i, (cluster, rbits, version)) in cfgs.into_iter().enumerate() {
        let seed = 0x5a + i as u64;
        let ctx = format!("cluster {cluster} refcount_bits {rbits} v{version}");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("snap.qcow2");
        let size: u64 = if cluster == 2 << 20 {
            10 << 20
        } else {
            3 << 20
        };
        lib_create(&path, size, cluster, rbits, version);
        let mut rng = StdRng::seed_from_u64(seed);
        let mut model = vec![0u8; size as usize];
        let mut snaps: Vec<(String, Vec<u8>)> = Vec::new();
        let scribble = |img: &Qcow2, model: &mut Vec<u8>, rng: &mut StdRng, n: u64| {
            for k in 0..n {
                let (off, len) = range(rng, size, cluster);
                let data = pattern(seed, rng.gen::<u64>() ^ k, len as usize);
                img.write_at(&data, off)
                    .unwrap_or_else(|e| panic!("{ctx}: write: {e}"));
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
        };
        {
            let img = open_rw(&path);
            for s in 0..4 {
                scribble(&img, &mut model, &mut rng, 15);
                let name = format!("lib-{s}");
                let info = img
                    .snapshot_create(&name)
                    .unwrap_or_else(|e| panic!("{ctx}: create: {e}"));
                assert_eq!(info.name, name, "{ctx}");
                assert_eq!(info.disk_size, size, "{ctx}: snapshot disk size");
                snaps.push((name, model.clone()));
            }
            // Duplicate names are refused.
            assert!(
                img.snapshot_create("lib-0").is_err(),
                "{ctx}: duplicate snapshot name accepted"
            );
            scribble(&img, &mut model, &mut rng, 15);
            // Apply lib-1, check, write on top (copy-on-write of shared clusters).
            img.snapshot_apply("lib-1")
                .unwrap_or_else(|e| panic!("{ctx}: apply: {e}"));
            model = snaps[1].1.clone();
            assert_bytes_eq(
                &model,
                &read_all(&img),
                &format!("{ctx}: after apply lib-1"),
            );
            scribble(&img, &mut model, &mut rng, 15);
            // Delete lib-2 (by id) and lib-0 (by name).
            let id2 = img
                .snapshots()
                .into_iter()
                .find(|s| s.name == "lib-2")
                .expect("lib-2")
                .id;
            img.snapshot_delete(&id2)
                .unwrap_or_else(|e| panic!("{ctx}: delete lib-2: {e}"));
            img.snapshot_delete("lib-0")
                .unwrap_or_else(|e| panic!("{ctx}: delete lib-0: {e}"));
            assert!(
                img.snapshot_delete("lib-0").is_err(),
                "{ctx}: deleting twice succeeded"
            );
            assert!(
                img.snapshot_apply("nope").is_err(),
                "{ctx}: applying a missing snapshot"
            );
            snaps.retain(|(n, _)| n != "lib-0" && n != "lib-2");
            let names: Vec<String> = img.snapshots().into_iter().map(|s| s.name).collect();
            assert_eq!(
                names,
                vec!["lib-1", "lib-3"],
                "{ctx}: library snapshot list"
            );
            assert_bytes_eq(
                &model,
                &read_all(&img),
                &format!("{ctx}: active after deletes"),
            );
            img.flush().expect("flush");
        }
        assert_qemu_check_clean(&path, &ctx);
        assert_eq!(
            qemu_snapshot_names(&path),
            vec!["lib-1", "lib-3"],
            "{ctx}: qemu-img snapshot -l"
        );
        assert_qemu_content(&path, &model, &format!("{ctx}: active"));
        for (name, data) in &snaps {
            assert_bytes_eq(
                data,
                &qemu_snapshot_content(&path, name),
                &format!("{ctx}: qemu reads {name}"),
            );
        }
        // qemu-img applies a library snapshot.
        qemu_img(["snapshot", "-a", "lib-3", path.to_str().expect("utf8")]);
        assert_qemu_check_clean(&path, &format!("{ctx}: after qemu-img snapshot -a lib-3"));
        assert_qemu_content(
            &path,
            &snaps[1].1,
            &format!("{ctx}: after qemu-img snapshot -a lib-3"),
        );
        // qemu-img deletes one; the library still sees the other.
        qemu_img(["snapshot", "-d", "lib-1", path.to_str().expect("utf8")]);
        let img = open_ro(&path);
        let names: Vec<String> = img.snapshots().into_iter().map(|s| s.name).collect();
        assert_eq!(names, vec!["lib-3"], "{ctx}: after qemu-img deleted lib-1");
        assert_bytes_eq(
            &snaps[1].1,
            &read_all(&img),
            &format!("{ctx}: library after qemu apply"),
        );
    }
}

/// qemu-img creates a snapshot on a library-written image; the library
/// writes on, then applies it.
#[test]
fn qemu_snapshot_applied_by_library() {
    require_qemu_img();
    for (cluster, rbits, version) in [(4096u64, 16u32, 2u32), (65536, 2, 3)] {
        let ctx = format!("cluster {cluster} refcount_bits {rbits} v{version}");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.qcow2");
        lib_create(&path, 2 << 20, cluster, rbits, version);
        let a = pattern(1, 1, 2 << 20);
        {
            let img = open_rw(&path);
            img.write_at(&a, 0).expect("write");
            img.flush().expect("flush");
        }
        qemu_img(["snapshot", "-c", "by-qemu", path.to_str().expect("utf8")]);
        let mut b = a.clone();
        {
            let img = open_rw(&path);
            let p = pattern(2, 2, 700_000);
            img.write_at(&p, 12_345).expect("write");
            b[12_345..12_345 + 700_000].copy_from_slice(&p);
            img.write_zeroes(1 << 20, 100_000).expect("zeroes");
            b[1 << 20..(1 << 20) + 100_000].fill(0);
            assert_bytes_eq(&b, &read_all(&img), &ctx);
            img.snapshot_create("by-lib").expect("snapshot");
            img.snapshot_apply("by-qemu")
                .unwrap_or_else(|e| panic!("{ctx}: apply: {e}"));
            assert_bytes_eq(
                &a,
                &read_all(&img),
                &format!("{ctx}: library applied qemu's snapshot"),
            );
        }
        assert_qemu_check_clean(&path, &ctx);
        assert_qemu_content(&path, &a, &ctx);
        assert_eq!(
            qemu_snapshot_names(&path),
            vec!["by-qemu", "by-lib"],
            "{ctx}"
        );
        assert_bytes_eq(
            &b,
            &qemu_snapshot_content(&path, "by-lib"),
            &format!("{ctx}: by-lib"),
        );
    }
}

/// Growing resize: new space reads as zeros, writes there work, L1 growth
/// (small clusters), and a snapshot taken before the resize keeps its size.
#[test]
fn library_resize() {
    require_qemu_img();
    for (cluster, rbits, version) in [
        (512u64, 16u32, 3u32),
        (4096, 16, 2),
        (65536, 64, 3),
        (2 << 20, 2, 3),
    ] {
        let ctx = format!("cluster {cluster} refcount_bits {rbits} v{version}");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("r.qcow2");
        let small: u64 = 1 << 20;
        // 512 B clusters: one L2 table maps 32 KiB, so 24 MiB needs an L1 of
        // 768 entries (more than one cluster of L1).
        let big: u64 = (24 << 20) + 512;
        lib_create(&path, small, cluster, rbits, version);
        let mut model = pattern(3, cluster, small as usize);
        {
            let img = open_rw(&path);
            img.write_at(&model, 0).expect("write");
            img.snapshot_create("small").expect("snapshot");
            img.flush().expect("flush");
        }
        // qemu-img refuses to resize a v2 image that has snapshots; the
        // library must make the same decision (tried on a copy).
        let qemu_resizes = {
            let d2 = tempfile::tempdir().expect("tempdir");
            let copy = copy_to(&path, d2.path(), "copy.qcow2");
            let o = qemu_img_output([
                "resize",
                "-q",
                copy.to_str().expect("utf8"),
                &big.to_string(),
            ]);
            o.status.success()
        };
        let has_snapshot;
        {
            let img = open_rw(&path);
            match (img.resize(big), qemu_resizes) {
                (Ok(()), true) => has_snapshot = true,
                (Err(_), false) => {
                    img.snapshot_delete("small").expect("delete snapshot");
                    img.resize(big)
                        .unwrap_or_else(|e| panic!("{ctx}: resize without snapshots: {e}"));
                    has_snapshot = false;
                }
                (r, q) => {
                    panic!("{ctx}: library resize -> {r:?}, but qemu-img resize succeeds: {q}")
                }
            }
            assert_eq!(img.size(), big, "{ctx}: size after resize");
            model.resize(big as usize, 0);
            assert_bytes_eq(&model, &read_all(&img), &format!("{ctx}: after resize"));
            let tail = pattern(4, 4, 300_000);
            img.write_at(&tail, big - 300_000)
                .expect("write at the new end");
            model[(big - 300_000) as usize..].copy_from_slice(&tail);
            img.write_at(&tail[..1000], small - 500)
                .expect("write across the old end");
            model[(small - 500) as usize..(small + 500) as usize].copy_from_slice(&tail[..1000]);
            assert!(
                img.write_at(&[1], big).is_err(),
                "{ctx}: write past the end accepted"
            );
            img.flush().expect("flush");
        }
        assert_qemu_check_clean(&path, &ctx);
        assert_qemu_content(&path, &model, &ctx);
        if !has_snapshot {
            continue;
        }
        // qemu-img applies the pre-resize snapshot (on a copy): the disk size
        // reverts to the size recorded in it.
        {
            let d2 = tempfile::tempdir().expect("tempdir");
            let copy = copy_to(&path, d2.path(), "copy.qcow2");
            qemu_img(["snapshot", "-a", "small", copy.to_str().expect("utf8")]);
            let c = format!("{ctx}: qemu-img applied the pre-resize snapshot");
            assert_qemu_check_clean(&copy, &c);
            assert_qemu_content(&copy, &pattern(3, cluster, small as usize), &c);
        }
        // Reopen and resize again, then apply the old snapshot with the
        // library: like QEMU, the disk size reverts to the snapshot's.
        {
            let img = open_rw(&path);
            assert_eq!(img.size(), big, "{ctx}: size after reopen");
            img.resize(big * 2)
                .unwrap_or_else(|e| panic!("{ctx}: second resize: {e}"));
            img.snapshot_apply("small")
                .unwrap_or_else(|e| panic!("{ctx}: apply: {e}"));
            assert_eq!(
                img.size(),
                small,
                "{ctx}: size after applying the pre-resize snapshot"
            );
        }
        let c = format!("{ctx}: after the library applied the pre-resize snapshot");
        assert_qemu_check_clean(&path, &c);
        assert_qemu_content(&path, &pattern(3, cluster, small as usize), &c);
    }
}

/// A library-created overlay over a qemu-img-created qcow2 base (over a raw
/// base): partial writes copy the rest of the cluster from the backing
/// file, zeroes hide backing data, the backing files stay untouched.
#[test]
fn library_overlay_over_qemu_base() {
    require_qemu_img();
    for (i, (c_base, c_top, version)) in [
        (65536u64, 4096u64, 3u32),
        (4096, 65536, 3),
        (65536, 512, 2),
        (512, 2 << 20, 3),
    ]
    .into_iter()
    .enumerate()
    {
        let ctx = format!("base cluster {c_base} overlay cluster {c_top} v{version}");
        let dir = tempfile::tempdir().expect("tempdir");
        let size: u64 = 4 << 20;
        let raw = dir.path().join("base.raw");
        let raw_data = pattern(20, i as u64, size as usize / 2);
        fs::write(&raw, &raw_data).expect("write raw");
        let base = dir.path().join("base.qcow2");
        qemu_img([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("cluster_size={c_base}"),
            "-b",
            "base.raw",
            "-F",
            "raw",
            base.to_str().expect("utf8"),
            &size.to_string(),
        ]);
        let mut model = raw_data.clone();
        model.resize(size as usize, 0);
        let p = pattern(21, i as u64, 1 << 20);
        qemu_io(
            "qcow2",
            &base,
            &[format!("write -q -P 0x3c {} {}", 3 << 20, 1 << 20)],
        );
        model[3 << 20..4 << 20].fill(0x3c);
        let base_bytes = fs::read(&base).expect("read base");
        let top = dir.path().join("sub").join("top.qcow2");
        fs::create_dir_all(top.parent().expect("parent")).expect("mkdir");
        let opts = CreateOptions {
            size,
            cluster_size: c_top,
            version,
            backing_file: Some("../base.qcow2".into()),
            backing_format: Some("qcow2".into()),
            ..Default::default()
        };
        Qcow2::create(&top, &opts).unwrap_or_else(|e| panic!("{ctx}: create overlay: {e}"));
        let info = qemu_info(&top);
        assert_eq!(
            info["backing-filename"].as_str(),
            Some("../base.qcow2"),
            "{ctx}: {info}"
        );
        assert_eq!(
            info["backing-filename-format"].as_str(),
            Some("qcow2"),
            "{ctx}: {info}"
        );
        {
            let img = open_rw(&top);
            assert_bytes_eq(&model, &read_all(&img), &format!("{ctx}: fresh overlay"));
            let mut rng = StdRng::seed_from_u64(i as u64);
            for k in 0..40 {
                let (off, len) = range(&mut rng, size, c_top);
                if rng.gen_bool(0.8) {
                    let d = &p[..len.min(p.len() as u64) as usize];
                    let len = d.len() as u64;
                    img.write_at(d, off)
                        .unwrap_or_else(|e| panic!("{ctx}: write: {e}"));
                    model[off as usize..(off + len) as usize].copy_from_slice(d);
                } else {
                    img.write_zeroes(off, len)
                        .unwrap_or_else(|e| panic!("{ctx}: zeroes: {e}"));
                    model[off as usize..(off + len) as usize].fill(0);
                }
                if k % 10 == 0 {
                    img.flush().expect("flush");
                }
            }
            assert_bytes_eq(&model, &read_all(&img), &format!("{ctx}: overlay"));
            img.snapshot_create("ov").expect("snapshot in overlay");
            img.flush().expect("flush");
        }
        assert_eq!(
            base_bytes,
            fs::read(&base).expect("read base"),
            "{ctx}: base was modified"
        );
        assert_qemu_check_clean(&top, &ctx);
        assert_qemu_content(&top, &model, &ctx);
        assert_eq!(qemu_snapshot_names(&top), vec!["ov"], "{ctx}");
    }
}

/// Discard over backing data: every fully covered cluster reads as zeros or
/// as the backing data (the library's documented contract), partial clusters
/// are unchanged, and qemu-img reads the same as the library.
#[test]
fn library_discard_in_overlay() {
    require_qemu_img();
    for version in [2u32, 3] {
        let ctx = format!("v{version}");
        let dir = tempfile::tempdir().expect("tempdir");
        let size: u64 = 1 << 20;
        let cluster: u64 = 4096;
        let base = dir.path().join("base.raw");
        let base_data = pattern(30, 0, size as usize);
        fs::write(&base, &base_data).expect("write base");
        let top = dir.path().join("top.qcow2");
        let opts = CreateOptions {
            size,
            cluster_size: cluster,
            version,
            backing_file: Some("base.raw".into()),
            backing_format: Some("raw".into()),
            ..Default::default()
        };
        Qcow2::create(&top, &opts).unwrap_or_else(|e| panic!("{ctx}: create: {e}"));
        let mine = pattern(31, 0, size as usize);
        let (doff, dlen) = (10_000u64, 300_000u64);
        let seen = {
            let img = open_rw(&top);
            img.write_at(&mine, 0).expect("write");
            img.discard(doff, dlen)
                .unwrap_or_else(|e| panic!("{ctx}: discard: {e}"));
            let seen = read_all(&img);
            img.flush().expect("flush");
            seen
        };
        for c in 0..size / cluster {
            let (s, e) = ((c * cluster) as usize, ((c + 1) * cluster) as usize);
            let full = c * cluster >= doff && (c + 1) * cluster <= doff + dlen;
            if full {
                assert!(
                    seen[s..e] == base_data[s..e] || seen[s..e].iter().all(|&b| b == 0),
                    "{ctx}: discarded cluster {c} reads neither zeros nor backing data"
                );
            } else {
                assert_bytes_eq(
                    &mine[s..e],
                    &seen[s..e],
                    &format!("{ctx}: cluster {c} not fully discarded"),
                );
            }
        }
        assert_qemu_check_clean(&top, &ctx);
        assert_bytes_eq(
            &seen,
            &qemu_read_all(&top, "qcow2"),
            &format!("{ctx}: qemu-img vs library"),
        );
    }
}

/// A dirty image (lazy refcounts, writer killed) is repaired on read-write
/// open like QEMU does: afterwards qemu-img check is clean.
#[test]
fn dirty_lazy_refcount_image_is_repaired_on_open() {
    require_qemu_img();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("dirty.qcow2");
    qemu_create(&path, "lazy_refcounts=on,cluster_size=4096", 4 << 20);
    // `abort` kills qemu-io without flushing refcounts: the dirty bit stays.
    let o = Command::new(QEMU_IO)
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -q -P 0x11 0 1M",
            "-c",
            "write -q -P 0x22 2M 5000",
            "-c",
            "abort",
        ])
        .arg(&path)
        .output()
        .expect("run qemu-io");
    assert!(
        !o.status.success(),
        "qemu-io abort should kill it: {}",
        show(&o)
    );
    assert_eq!(
        read_be64(&path, hdr::INCOMPAT) & 1,
        1,
        "setup: dirty bit not set"
    );
    assert_eq!(
        qemu_check(&path, &[]).code,
        2,
        "setup: qemu-img should see refcount errors"
    );
    let mut model = vec![0u8; 4 << 20];
    model[..1 << 20].fill(0x11);
    model[2 << 20..(2 << 20) + 5000].fill(0x22);
    // Read-only: readable as is, file unchanged.
    let before = fs::read(&path).expect("read");
    {
        let img =
            Qcow2::open(&path, &OpenOptions::read_only()).expect("read-only open of a dirty image");
        assert!(img.info().dirty, "info().dirty for a dirty image");
        assert_bytes_eq(&model, &read_all(&img), "dirty image, read-only");
    }
    assert_eq!(
        before,
        fs::read(&path).expect("read"),
        "read-only open modified the file"
    );
    // Read-write: refcounts rebuilt, then new writes.
    {
        let img = open_rw(&path);
        img.write_at(&[0x33; 10_000], 3 << 20).expect("write");
        model[3 << 20..(3 << 20) + 10_000].fill(0x33);
        img.flush().expect("flush");
    }
    assert_qemu_check_clean(&path, "dirty image after library open");
    assert_qemu_content(&path, &model, "dirty image after library open");
}

/// The library's own check agrees with qemu-img on a clean image, and
/// `exit_code` maps to qemu-img's codes.
#[test]
fn library_check_on_clean_image() {
    require_qemu_img();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("c.qcow2");
    lib_create(&path, 4 << 20, 4096, 16, 3);
    {
        let img = open_rw(&path);
        img.write_at(&pattern(8, 8, 1 << 20), 4096).expect("write");
        img.snapshot_create("s").expect("snapshot");
        img.write_at(&pattern(9, 9, 8192), 0).expect("write");
        img.flush().expect("flush");
        let r = img.check(None).expect("check");
        assert_eq!(
            (r.corruptions, r.leaks, r.check_errors),
            (0, 0, 0),
            "library check: {r:?}"
        );
        assert_eq!(r.exit_code(), 0);
        assert_eq!(r.total_clusters, (4 << 20) / 4096, "total clusters: {r:?}");
    }
    assert_qemu_check_clean(&path, "library check");
    // Leak a data cluster by clearing its L2 entry: qemu-img reports a leak
    // (exit 3); the library must agree and repair it with RepairMode::Leaks.
    let leak = dir.path().join("leak.qcow2");
    qemu_create(&leak, "cluster_size=4096", 4 << 20);
    qemu_io("qcow2", &leak, &["write -q -P 0x11 0 64k".to_string()]);
    let l1 = read_be64(&leak, hdr::L1_OFFSET);
    let l2 = read_be64(&leak, l1) & 0x00ff_ffff_ffff_fe00;
    assert_ne!(l2, 0, "setup: L2 table allocated");
    patch_be64(&leak, l2 + 8, 0); // guest cluster 1 now unreferenced
    let q = qemu_check(&leak, &[]);
    assert_eq!(
        q.code, 3,
        "setup: qemu-img should report a leak:\n{}",
        q.text
    );
    {
        let img = Qcow2::open(&leak, &OpenOptions::read_only()).expect("open");
        let r = img.check(None).expect("check");
        assert_eq!(
            (r.corruptions, r.leaks),
            (0, 1),
            "library check of a 1-cluster leak: {r:?}"
        );
        assert_eq!(r.exit_code(), 3, "{r:?}");
    }
    {
        let img = open_rw(&leak);
        let r = img.check(Some(qcow2::RepairMode::Leaks)).expect("repair");
        assert_eq!(r.leaks_fixed, 1, "{r:?}");
        assert_eq!(r.exit_code(), 0, "{r:?}");
    }
    assert_qemu_check_clean(&leak, "after library repaired the leak");
}

/// Snapshots that would overflow a narrow refcount (1 bit: max 1; 2 bits:
/// max 3) are refused by qemu-img; the library must refuse exactly the same
/// ones and leave the image clean.
#[test]
fn snapshot_refcount_overflow_matches_qemu() {
    require_qemu_img();
    for rbits in [1u32, 2] {
        let dir = tempfile::tempdir().expect("tempdir");
        let lib = dir.path().join("lib.qcow2");
        let qem = dir.path().join("qemu.qcow2");
        lib_create(&lib, 1 << 20, 4096, rbits, 3);
        qemu_create(&qem, &qemu_opts(4096, rbits, 3), 1 << 20);
        let data = pattern(40, rbits as u64, 100_000);
        {
            let img = open_rw(&lib);
            img.write_at(&data, 5000).expect("write");
            img.flush().expect("flush");
        }
        qemu_io("qcow2", &qem, &["write -q -P 0x55 5000 100000".to_string()]);
        for k in 0..4 {
            let name = format!("s{k}");
            let q = qemu_img_output(["snapshot", "-c", &name, qem.to_str().expect("utf8")]);
            let l = {
                let img = open_rw(&lib);
                let r = img.snapshot_create(&name);
                img.flush().expect("flush");
                r
            };
            let ctx = format!("refcount_bits {rbits}, snapshot #{k}");
            assert_eq!(
                l.is_ok(),
                q.status.success(),
                "{ctx}: library snapshot_create -> {l:?}, qemu-img snapshot -c -> {}",
                show(&q)
            );
            assert_qemu_check_clean(&lib, &ctx);
            let mut want = vec![0u8; 1 << 20];
            want[5000..105_000].copy_from_slice(&data);
            assert_qemu_content(&lib, &want, &ctx);
        }
        assert_eq!(
            qemu_snapshot_names(&lib),
            qemu_snapshot_names(&qem),
            "refcount_bits {rbits}: snapshot lists"
        );
    }
}

/// Several threads write 512-byte blocks that interleave inside the same
/// clusters (thread t owns the blocks with index % 4 == t), so allocations
/// and copy-on-write of one cluster race between threads; a snapshot taken
/// before makes every first write a COW. The result must hold every block.
#[test]
fn concurrent_writers_share_clusters() {
    require_qemu_img();
    for (cluster, version) in [(4096u64, 3u32), (65536, 2)] {
        let ctx = format!("cluster {cluster} v{version}");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("mt.qcow2");
        let size: u64 = 2 << 20;
        lib_create(&path, size, cluster, 16, version);
        let base = pattern(50, cluster, size as usize);
        let img = open_rw(&path);
        img.write_at(&base, 0).expect("write base");
        img.snapshot_create("before").expect("snapshot");
        let threads = 4u64;
        let blocks = size / 512;
        let results: Vec<Vec<(u64, Vec<u8>)>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let img = &img;
                    s.spawn(move || {
                        let mut rng = StdRng::seed_from_u64(t);
                        let mut mine = Vec::new();
                        for k in 0..600u64 {
                            let b = rng.gen_range(0..blocks / threads) * threads + t;
                            let data = pattern(51 + t, k, 512);
                            img.write_at(&data, b * 512).expect("concurrent write");
                            let mut back = vec![0u8; 512];
                            img.read_at(&mut back, b * 512).expect("concurrent read");
                            assert_eq!(back, data, "thread {t} reads back its own block {b}");
                            mine.push((b, data));
                        }
                        mine
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("writer thread"))
                .collect()
        });
        let mut model = base.clone();
        for (b, data) in results.into_iter().flatten() {
            model[(b * 512) as usize..(b * 512 + 512) as usize].copy_from_slice(&data);
        }
        assert_bytes_eq(
            &model,
            &read_all(&img),
            &format!("{ctx}: after concurrent writes"),
        );
        img.flush().expect("flush");
        drop(img);
        assert_qemu_check_clean(&path, &ctx);
        assert_qemu_content(&path, &model, &ctx);
        assert_bytes_eq(
            &base,
            &qemu_snapshot_content(&path, "before"),
            &format!("{ctx}: snapshot"),
        );
    }
}
