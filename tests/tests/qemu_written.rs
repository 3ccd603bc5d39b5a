//! Images written by qemu-img / qemu-io read byte-identically through the
//! library: every cluster size from 512 B to 2 MiB, every refcount width, v2
//! and v3, internal snapshots, compressed clusters (zlib, zstd), zero
//! clusters and backing chains. The expected bytes are the patterns this test
//! generated itself, never output of the library.

use std::fs;
use std::path::{Path, PathBuf};

use outboard_tests::*;
use qcow2::{OpenOptions, Qcow2};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Collects qemu-io commands and mirrors their effect on an expected buffer.
struct QemuWriter {
    image: PathBuf,
    scratch: PathBuf,
    cmds: Vec<String>,
    expected: Vec<u8>,
    n: usize,
    seed: u64,
}

impl QemuWriter {
    fn new(image: &Path, scratch: &Path, expected: Vec<u8>, seed: u64) -> Self {
        fs::create_dir_all(scratch).expect("scratch dir");
        QemuWriter {
            image: image.to_path_buf(),
            scratch: scratch.to_path_buf(),
            cmds: Vec::new(),
            expected,
            n: 0,
            seed,
        }
    }

    fn src_file(&mut self, data: &[u8]) -> String {
        self.n += 1;
        let p = self.scratch.join(format!("src{}", self.n));
        fs::write(&p, data).expect("write pattern source file");
        p.to_string_lossy().into_owned()
    }

    /// `write -s` of fresh pseudo-random bytes.
    fn write(&mut self, off: u64, len: usize) {
        let data = pattern(self.seed, self.n as u64 + 1000, len);
        let src = self.src_file(&data);
        self.cmds.push(format!("write -q -s {src} {off} {len}"));
        self.expected[off as usize..off as usize + len].copy_from_slice(&data);
    }

    /// `write -P byte`.
    fn fill(&mut self, off: u64, len: usize, byte: u8) {
        self.cmds.push(format!("write -q -P {byte:#x} {off} {len}"));
        self.expected[off as usize..off as usize + len].fill(byte);
    }

    /// `write -z [-u]`.
    fn zero(&mut self, off: u64, len: usize, unmap: bool) {
        let u = if unmap { "-u " } else { "" };
        self.cmds.push(format!("write -q -z {u}{off} {len}"));
        self.expected[off as usize..off as usize + len].fill(0);
    }

    /// `write -c -s` (compressed; `off` and `data.len()` cluster aligned).
    fn compressed(&mut self, off: u64, data: &[u8]) {
        let src = self.src_file(data);
        self.cmds
            .push(format!("write -q -c -s {src} {off} {}", data.len()));
        self.expected[off as usize..off as usize + data.len()].copy_from_slice(data);
    }

    /// Runs the collected commands in one qemu-io process.
    fn commit(&mut self, fmt: &str) {
        let cmds = std::mem::take(&mut self.cmds);
        qemu_io_ctx(
            fmt,
            &self.image,
            &cmds,
            &format!("qemu-io on {}", self.image.display()),
        );
    }
}

/// Compressible data: words from a small alphabet, with some repetition.
fn compressible(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    let words: [&[u8]; 6] = [
        b"qcow2 ",
        b"cluster ",
        b"refcount ",
        b"\0\0\0\0",
        b"snapshot ",
        b"L2 ",
    ];
    let mut v = Vec::with_capacity(len + 16);
    while v.len() < len {
        v.extend_from_slice(words[rng.gen_range(0..words.len())]);
        if rng.gen_bool(0.1) {
            v.push(rng.gen());
        }
    }
    v.truncate(len);
    v
}

/// Reads the whole disk with the library and compares; then random
/// unaligned sub-ranges, which cross cluster and L2 boundaries.
fn verify_library_reads(path: &Path, expected: &[u8], context: &str, seed: u64) {
    let img = open_ro(path);
    assert_eq!(img.size(), expected.len() as u64, "{context}: virtual size");
    let all = read_all(&img);
    assert_bytes_eq(expected, &all, &format!("{context}: whole-disk read"));
    let mut rng = StdRng::seed_from_u64(seed);
    for _ in 0..64 {
        let len = rng.gen_range(1..=expected.len().min(300_000));
        let off = rng.gen_range(0..=expected.len() - len);
        let mut buf = vec![0xa5u8; len];
        img.read_at(&mut buf, off as u64)
            .unwrap_or_else(|e| panic!("{context}: read_at({off}, {len}) failed: {e}"));
        assert_bytes_eq(
            &expected[off..off + len],
            &buf,
            &format!("{context}: read {off}+{len}"),
        );
    }
    // One byte at each end.
    let mut b = [0u8; 1];
    img.read_at(&mut b, expected.len() as u64 - 1)
        .expect("read last byte");
    assert_eq!(b[0], expected[expected.len() - 1], "{context}: last byte");
    // Reads past the end are errors.
    assert!(
        img.read_at(&mut [0u8; 2], expected.len() as u64 - 1)
            .is_err(),
        "{context}: read crossing the end of the disk must fail"
    );
}

fn disk_size_for(cluster: u64) -> u64 {
    // Several L2 tables for small clusters, several clusters for big ones.
    match cluster {
        512 => 3 << 20,
        4096 => 5 << 20,
        65536 => 6 << 20,
        _ => 12 << 20,
    }
}

/// Random unaligned writes, fills, zeroes and compressed clusters by qemu-io
/// in every configuration.
#[test]
fn qemu_io_patterns_all_configs() {
    require_qemu_img();
    for (i, (cluster, rbits, version)) in configs().into_iter().enumerate() {
        let seed = 0x5eed_0000 + i as u64;
        let ctx = format!("cluster {cluster} refcount_bits {rbits} v{version} seed {seed:#x}");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qemu.qcow2");
        let size = disk_size_for(cluster);
        qemu_create(&path, &qemu_opts(cluster, rbits, version), size);
        let mut w = QemuWriter::new(&path, &dir.path().join("src"), vec![0; size as usize], seed);
        let mut rng = StdRng::seed_from_u64(seed);
        // Compressed clusters first: qemu only writes compressed data into
        // unallocated clusters; later writes partly overwrite them.
        let third = size / cluster / 3;
        for k in 0..3 {
            let n = if third >= 3 {
                rng.gen_range(1..=2u64)
            } else {
                1
            };
            let c = k * third + rng.gen_range(0..=third - n);
            let data = compressible(rng.gen(), (n * cluster) as usize);
            w.compressed(c * cluster, &data);
        }
        for _ in 0..40 {
            let len = rng.gen_range(1..=(cluster as usize * 3).min(200_000));
            let off = rng.gen_range(0..=size - len as u64);
            match rng.gen_range(0..10) {
                0..=5 => w.write(off, len),
                6 | 7 => w.fill(off, len, rng.gen()),
                8 => w.zero(off, len, false),
                _ => w.zero(off, len, true),
            }
        }
        eprintln!("{ctx}");
        w.commit("qcow2");
        let c = qemu_check(&path, &[]);
        assert_eq!(
            c.code, 0,
            "{ctx}: qemu's own image is not clean:\n{}",
            c.text
        );
        verify_library_reads(&path, &w.expected, &ctx, seed);
        // The independent reader agrees with the expected bytes (test sanity).
        assert_qemu_content(&path, &w.expected, &ctx);
    }
}

/// Opening read-write and closing without writes leaves qemu's image clean.
#[test]
fn qemu_image_survives_library_rw_open() {
    require_qemu_img();
    for (cluster, rbits, version) in [(512, 1, 3), (65536, 16, 2), (65536, 64, 3)] {
        let ctx = format!("cluster {cluster} refcount_bits {rbits} v{version}");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.qcow2");
        qemu_create(&path, &qemu_opts(cluster, rbits, version), 2 << 20);
        let mut w = QemuWriter::new(&path, &dir.path().join("src"), vec![0; 2 << 20], 7);
        w.write(1000, 300_000);
        w.commit("qcow2");
        {
            let img = open_rw(&path);
            assert_bytes_eq(&w.expected, &read_all(&img), &ctx);
            img.flush().expect("flush");
        }
        assert_qemu_check_clean(&path, &ctx);
        assert_qemu_content(&path, &w.expected, &ctx);
    }
}

/// Internal snapshots made by qemu-img: the library reads the active state,
/// lists the snapshots, and applying one yields its content (checked by
/// reading through the library and by qemu-img compare afterwards).
#[test]
fn qemu_internal_snapshots() {
    require_qemu_img();
    let cfgs = [
        (512, 16, 2),
        (4096, 2, 3),
        (65536, 16, 3),
        (65536, 64, 3),
        (65536, 16, 2),
        (2 << 20, 8, 3),
    ];
    for (i, (cluster, rbits, version)) in cfgs.into_iter().enumerate() {
        let seed = 0xa11ce + i as u64;
        let ctx = format!("cluster {cluster} refcount_bits {rbits} v{version}");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("snap.qcow2");
        let size = disk_size_for(cluster);
        qemu_create(&path, &qemu_opts(cluster, rbits, version), size);
        let mut w = QemuWriter::new(&path, &dir.path().join("src"), vec![0; size as usize], seed);
        let mut rng = StdRng::seed_from_u64(seed);
        let mut states = Vec::new();
        for s in 0..3 {
            for _ in 0..12 {
                let len = rng.gen_range(1..=(cluster as usize * 2).min(150_000));
                let off = rng.gen_range(0..=size - len as u64);
                match rng.gen_range(0..6) {
                    0..=3 => w.write(off, len),
                    4 => w.zero(off, len, rng.gen()),
                    _ => w.fill(off, len, rng.gen()),
                }
            }
            w.commit("qcow2");
            if s < 2 {
                let name = format!("snap-{s}");
                qemu_img(["snapshot", "-c", &name, path.to_str().expect("utf8 path")]);
                states.push((name, w.expected.clone()));
            }
        }
        let active = w.expected.clone();
        // Sanity of the oracle: qemu-img itself agrees on every state.
        for (name, data) in &states {
            assert_bytes_eq(
                data,
                &qemu_snapshot_content(&path, name),
                &format!("{ctx}: qemu {name}"),
            );
        }
        {
            let img = open_ro(&path);
            let names: Vec<String> = img.snapshots().into_iter().map(|s| s.name).collect();
            assert_eq!(
                names,
                vec!["snap-0".to_string(), "snap-1".to_string()],
                "{ctx}: snapshot list"
            );
            for s in img.snapshots() {
                assert_eq!(s.disk_size, size, "{ctx}: disk size of snapshot {}", s.name);
            }
        }
        verify_library_reads(&path, &active, &format!("{ctx}: active"), seed);
        // Apply snap-0 by name with the library.
        {
            let img = open_rw(&path);
            img.snapshot_apply("snap-0")
                .unwrap_or_else(|e| panic!("{ctx}: apply snap-0: {e}"));
            assert_bytes_eq(
                &states[0].1,
                &read_all(&img),
                &format!("{ctx}: after applying snap-0"),
            );
            img.flush().expect("flush");
        }
        assert_qemu_check_clean(&path, &format!("{ctx}: after library applied snap-0"));
        assert_qemu_content(
            &path,
            &states[0].1,
            &format!("{ctx}: after library applied snap-0"),
        );
        // The snapshots are still there and intact; apply the second by id.
        {
            let img = open_rw(&path);
            let id = img
                .snapshots()
                .into_iter()
                .find(|s| s.name == "snap-1")
                .expect("snap-1 still listed")
                .id;
            img.snapshot_apply(&id)
                .unwrap_or_else(|e| panic!("{ctx}: apply id {id}: {e}"));
            assert_bytes_eq(
                &states[1].1,
                &read_all(&img),
                &format!("{ctx}: after applying snap-1"),
            );
        }
        assert_qemu_check_clean(&path, &format!("{ctx}: after library applied snap-1"));
        assert_qemu_content(
            &path,
            &states[1].1,
            &format!("{ctx}: after library applied snap-1"),
        );
        assert_eq!(
            qemu_snapshot_names(&path),
            vec!["snap-0", "snap-1"],
            "{ctx}"
        );
    }
}

/// `qemu-img convert -c` with zlib (v2 and v3) and zstd: compressed
/// clusters, incompressible clusters stored plainly, and zero runs.
#[test]
fn qemu_compressed_clusters() {
    require_qemu_img();
    let cases: [(u64, &str, &str); 8] = [
        (512, "zlib", "1.1"),
        (4096, "zlib", "1.1"),
        (65536, "zlib", "1.1"),
        (65536, "zlib", "0.10"),
        (2 << 20, "zlib", "1.1"),
        (4096, "zstd", "1.1"),
        (65536, "zstd", "1.1"),
        (2 << 20, "zstd", "1.1"),
    ];
    for (i, (cluster, ctype, compat)) in cases.into_iter().enumerate() {
        let ctx = format!("cluster {cluster} compression {ctype} compat {compat}");
        let dir = tempfile::tempdir().expect("tempdir");
        let size = disk_size_for(cluster) as usize;
        let mut data = vec![0u8; size];
        let mut rng = StdRng::seed_from_u64(0xc0 + i as u64);
        // Runs of compressible text, random bytes and zeros, unaligned.
        let mut off = 0;
        while off < size {
            let len = rng.gen_range(1..=(cluster as usize * 3)).min(size - off);
            match rng.gen_range(0..4) {
                0 | 1 => data[off..off + len].copy_from_slice(&compressible(rng.gen(), len)),
                2 => data[off..off + len].copy_from_slice(&pattern(rng.gen(), 0, len)),
                _ => {}
            }
            off += len;
        }
        let raw = dir.path().join("src.raw");
        fs::write(&raw, &data).expect("write raw");
        let path = dir.path().join("c.qcow2");
        let mut opts = format!("cluster_size={cluster},compat={compat}");
        if compat != "0.10" {
            opts.push_str(&format!(",compression_type={ctype}"));
        }
        qemu_img([
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            &opts,
            raw.to_str().expect("utf8"),
            path.to_str().expect("utf8"),
        ]);
        let c = qemu_check(&path, &[]);
        assert_eq!(c.code, 0, "{ctx}: {}", c.text);
        assert!(
            c.text
                .lines()
                .any(|l| l.contains("compressed clusters") && !l.contains(" 0.00% compressed")),
            "{ctx}: qemu-img did not produce compressed clusters (test setup):\n{}",
            c.text
        );
        if ctype == "zstd" {
            let info = qemu_info(&path);
            assert_eq!(
                info["format-specific"]["data"]["compression-type"].as_str(),
                Some("zstd"),
                "{ctx}: test setup"
            );
        }
        verify_library_reads(&path, &data, &ctx, i as u64);
        // Overwriting part of a compressed cluster through the library
        // (read-modify-write of compressed data) keeps the rest intact.
        {
            let img = open_rw(&path);
            let patch_off = cluster as usize / 3;
            let p = pattern(99, i as u64, 100);
            img.write_at(&p, patch_off as u64)
                .unwrap_or_else(|e| panic!("{ctx}: write: {e}"));
            data[patch_off..patch_off + 100].copy_from_slice(&p);
            assert_bytes_eq(
                &data,
                &read_all(&img),
                &format!("{ctx}: after partial overwrite"),
            );
        }
        assert_qemu_check_clean(&path, &format!("{ctx}: after partial overwrite"));
        assert_qemu_content(&path, &data, &format!("{ctx}: after partial overwrite"));
    }
}

/// Zero clusters (v3 zero flag, with and without an allocation behind it) and
/// zeroes over shared (snapshotted) clusters.
#[test]
fn qemu_zero_clusters() {
    require_qemu_img();
    for (cluster, rbits) in [(512u64, 16u32), (4096, 2), (65536, 16), (2 << 20, 64)] {
        let ctx = format!("cluster {cluster} refcount_bits {rbits}");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("z.qcow2");
        let size = disk_size_for(cluster).max(16 * cluster);
        qemu_create(&path, &qemu_opts(cluster, rbits, 3), size);
        let mut w = QemuWriter::new(
            &path,
            &dir.path().join("src"),
            vec![0; size as usize],
            cluster,
        );
        w.fill(0, size as usize, 0x77);
        w.commit("qcow2");
        qemu_img(["snapshot", "-c", "full", path.to_str().expect("utf8")]);
        let full = w.expected.clone();
        // Aligned zeroes (zero flag), unmapping zeroes, unaligned zeroes.
        w.zero(cluster, cluster as usize * 2, false);
        w.zero(cluster * 5, cluster as usize * 3, true);
        w.zero(cluster * 10 + 17, cluster as usize + 100, false);
        w.zero(size - cluster, cluster as usize, true);
        w.commit("qcow2");
        let map = qemu_img(["map", "--output=json", path.to_str().expect("utf8")]);
        assert!(
            map.contains("\"zero\": true"),
            "{ctx}: qemu-img made no zero clusters (setup)\n{map}"
        );
        verify_library_reads(&path, &w.expected, &ctx, 3);
        {
            let img = open_rw(&path);
            img.snapshot_apply("full")
                .unwrap_or_else(|e| panic!("{ctx}: apply: {e}"));
            assert_bytes_eq(
                &full,
                &read_all(&img),
                &format!("{ctx}: snapshot behind zeroes"),
            );
        }
        assert_qemu_check_clean(&path, &ctx);
    }
    // A raw file with zero runs converted into a v3 image (no -S: zero
    // detection of convert leaves holes that must read as zeros).
    let dir = tempfile::tempdir().expect("tempdir");
    let mut data = pattern(5, 5, 3 << 20);
    data[4096..200_000].fill(0);
    data[1 << 20..(2 << 20) + 1].fill(0);
    let raw = dir.path().join("z.raw");
    fs::write(&raw, &data).expect("write raw");
    let path = dir.path().join("conv.qcow2");
    qemu_img([
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=4096,compat=1.1",
        raw.to_str().expect("utf8"),
        path.to_str().expect("utf8"),
    ]);
    verify_library_reads(&path, &data, "converted raw with zero runs", 4);
}

/// qcow2 over qcow2 over raw, relative backing names (resolved against the
/// overlay's directory, not the cwd), `-F` given, overlay larger than its
/// backing file, zeroes in the overlay hiding backing data.
#[test]
fn qemu_backing_chain() {
    require_qemu_img();
    for (i, (c_mid, c_top, version)) in [
        (65536u64, 4096u64, 3u32),
        (512, 65536, 3),
        (4096, 2 << 20, 3),
        (65536, 65536, 2),
    ]
    .into_iter()
    .enumerate()
    {
        let ctx = format!("mid cluster {c_mid} top cluster {c_top} v{version}");
        let dir = tempfile::tempdir().expect("tempdir");
        let sub = dir.path().join("a").join("b");
        fs::create_dir_all(&sub).expect("mkdir");
        let base_size = 3 << 20;
        let top_size = 5 << 20;
        // Base: raw, in the top directory.
        let base = dir.path().join("base.raw");
        let base_data = pattern(11, i as u64, base_size);
        fs::write(&base, &base_data).expect("write base");
        // Mid: qcow2 in a/, backing "../base.raw".
        let mid = dir.path().join("a").join("mid.qcow2");
        let compat = if version == 2 { "0.10" } else { "1.1" };
        qemu_img([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("cluster_size={c_mid},compat={compat}"),
            "-b",
            "../base.raw",
            "-F",
            "raw",
            mid.to_str().expect("utf8"),
            &base_size.to_string(),
        ]);
        let mut expected = base_data.clone();
        expected.resize(top_size, 0);
        let mut wm = QemuWriter::new(&mid, &dir.path().join("src1"), expected, 100 + i as u64);
        let mut rng = StdRng::seed_from_u64(i as u64);
        for _ in 0..15 {
            let len = rng.gen_range(1..100_000usize);
            let off = rng.gen_range(0..base_size as u64 - len as u64);
            if rng.gen_bool(0.8) {
                wm.write(off, len);
            } else if version == 3 {
                wm.zero(off, len, rng.gen());
            } else {
                wm.fill(off, len, 0);
            }
        }
        wm.commit("qcow2");
        // Top: qcow2 in a/b/, backing "../mid.qcow2", bigger than mid.
        let top = sub.join("top.qcow2");
        qemu_img([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("cluster_size={c_top},compat={compat}"),
            "-b",
            "../mid.qcow2",
            "-F",
            "qcow2",
            top.to_str().expect("utf8"),
            &top_size.to_string(),
        ]);
        let mut wt = QemuWriter::new(
            &top,
            &dir.path().join("src2"),
            wm.expected.clone(),
            200 + i as u64,
        );
        for _ in 0..15 {
            let len = rng.gen_range(1..100_000usize);
            let off = rng.gen_range(0..top_size as u64 - len as u64);
            match rng.gen_range(0..5) {
                0..=2 => wt.write(off, len),
                3 => wt.fill(off, len, rng.gen()),
                // Zeroes over backing data (v3: zero flag; v2: explicit zeros).
                _ => wt.zero(off, len, false),
            }
        }
        wt.commit("qcow2");
        assert_bytes_eq(
            &wt.expected,
            &qemu_read_all(&top, "qcow2"),
            &format!("{ctx}: setup"),
        );
        verify_library_reads(&top, &wt.expected, &ctx, i as u64);
        // Through the generic entry point too.
        let img = qcow2::open_image(&top, None, &OpenOptions::read_only()).expect("open_image");
        let mut buf = vec![0u8; 1 << 20];
        img.read_at(&mut buf, (base_size - (1 << 19)) as u64)
            .expect("read across backing end");
        let o = base_size - (1 << 19);
        assert_bytes_eq(
            &wt.expected[o..o + (1 << 20)],
            &buf,
            &format!("{ctx}: across backing end"),
        );
        // Writing to the overlay keeps the backing files untouched.
        drop(img);
        let mid_before = fs::read(&mid).expect("read mid");
        {
            let img = open_rw(&top);
            img.write_at(&[0xee; 5000], 12345).expect("write overlay");
            img.flush().expect("flush");
        }
        assert_eq!(
            mid_before,
            fs::read(&mid).expect("read mid"),
            "{ctx}: backing file modified"
        );
        assert_eq!(
            base_data,
            fs::read(&base).expect("read base"),
            "{ctx}: base modified"
        );
        wt.expected[12345..12345 + 5000].fill(0xee);
        assert_qemu_check_clean(&top, &ctx);
        assert_bytes_eq(
            &wt.expected,
            &qemu_read_all(&top, "qcow2"),
            &format!("{ctx}: after write"),
        );
        // Without backing files, unallocated clusters read as zeros.
        let nob = Qcow2::open(
            &top,
            &OpenOptions {
                open_backing: false,
                ..OpenOptions::read_only()
            },
        )
        .expect("open without backing");
        let mut b = vec![0u8; 4096];
        nob.read_at(&mut b, (top_size - 4096) as u64).expect("read");
        assert!(
            b.iter().all(|&x| x == 0),
            "{ctx}: no-backing read of unallocated cluster"
        );
    }
}
