//! Hostile images get errors, not panics, hangs or unbounded allocation.
//!
//! Every case starts from an image written by qemu-img and patches it. Each
//! open + read runs under `catch_unwind` (so one panic names its case and the
//! others still run) with a counting global allocator: a single allocation
//! above [`ABORT_ALLOC`] aborts the process with the case's name (an OOM
//! would kill us anyway), and a case whose peak exceeds [`PEAK_LIMIT`] fails.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::{Cell, RefCell};
use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use outboard_tests::*;
use qcow2::{Error, OpenOptions, Qcow2};

const ABORT_ALLOC: usize = 1 << 30;
const PEAK_LIMIT: usize = 200 << 20;

thread_local! {
    static CUR: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
    static CASE: RefCell<&'static str> = const { RefCell::new("") };
}

struct Counting;

fn on_alloc(size: usize) {
    let _ = CUR.try_with(|c| {
        let n = c.get() + size;
        c.set(n);
        let _ = PEAK.try_with(|p| p.set(p.get().max(n)));
    });
    if size > ABORT_ALLOC {
        let case = CASE
            .try_with(|c| c.try_borrow().map(|s| *s).unwrap_or("?"))
            .unwrap_or("?");
        // Not a panic: unwinding out of an allocator is not allowed.
        eprintln!("malformed case {case:?}: allocation of {size} bytes; aborting");
        std::process::abort();
    }
}

fn on_dealloc(size: usize) {
    let _ = CUR.try_with(|c| c.set(c.get().saturating_sub(size)));
}

// SAFETY: forwards to the system allocator; the bookkeeping only touches
// thread-local cells and never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        on_alloc(layout.size());
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        on_alloc(layout.size());
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        on_dealloc(layout.size());
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        on_dealloc(layout.size());
        on_alloc(new_size);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// What a case expects.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// Opening (read-only) must fail.
    OpenFails,
    /// Opening read-only succeeds; reading the given guest byte range fails.
    ReadFails(u64, u64),
    /// Anything but a panic (open may fail or succeed, reads may fail).
    NoPanic,
}

/// Result of one case, for the summary.
struct Outcome {
    failure: Option<String>,
}

/// Reads the disk in chunks (bounded: the first 64 MiB and the last chunk).
fn read_some(img: &Qcow2) -> Result<(), Error> {
    let size = img.size();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    let mut first_err = None;
    while off < size.min(64 << 20) {
        let n = (size - off).min(buf.len() as u64) as usize;
        if let Err(e) = img.read_at(&mut buf[..n], off) {
            first_err.get_or_insert(e);
        }
        off += n as u64;
    }
    if size > 64 << 20 {
        let n = 4096.min(size) as usize;
        if let Err(e) = img.read_at(&mut buf[..n], size - n as u64) {
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}

fn run_case(name: &'static str, path: &Path, opts: &OpenOptions, expect: Expect) -> Outcome {
    CASE.with(|c| *c.borrow_mut() = name);
    CUR.with(|c| c.set(0));
    PEAK.with(|p| p.set(0));
    let r = catch_unwind(AssertUnwindSafe(|| -> Result<(), String> {
        let opened = Qcow2::open(path, opts);
        match (expect, opened) {
            (Expect::OpenFails, Ok(img)) => {
                let read = read_some(&img);
                Err(format!(
                    "open succeeded (size {}), full read: {read:?}",
                    img.size()
                ))
            }
            (Expect::OpenFails, Err(_)) => Ok(()),
            (Expect::ReadFails(..), Err(e)) => {
                Err(format!("open failed ({e}); expected the read to fail"))
            }
            (Expect::ReadFails(off, len), Ok(img)) => {
                let mut buf = vec![0u8; len as usize];
                match img.read_at(&mut buf, off) {
                    Ok(()) => Err(format!("read {off}+{len} succeeded")),
                    Err(_) => {
                        let _ = read_some(&img);
                        Ok(())
                    }
                }
            }
            (Expect::NoPanic, Ok(img)) => {
                let _ = img.info();
                let _ = img.snapshots();
                let _ = read_some(&img);
                let _ = img.check(None);
                Ok(())
            }
            (Expect::NoPanic, Err(_)) => Ok(()),
        }
    }));
    let peak = PEAK.with(|p| p.get());
    let mut failure = match r {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(format!("{name}: {e}")),
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Some(format!("{name}: PANIC: {msg}"))
        }
    };
    if peak > PEAK_LIMIT && failure.is_none() {
        failure = Some(format!("{name}: peak allocation {} MiB", peak >> 20));
    }
    CASE.with(|c| *c.borrow_mut() = "");
    Outcome { failure }
}

struct Base {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    /// v3, 64 KiB clusters, 8 MiB, data, one snapshot, compressed clusters.
    v3: PathBuf,
    /// v2, 4 KiB clusters, 4 MiB, data, one snapshot.
    v2: PathBuf,
    cluster_v3: u64,
}

fn base() -> Base {
    require_qemu_img();
    let d = tempfile::tempdir().expect("tempdir");
    let dir = d.path().to_path_buf();
    let raw = dir.join("seed.raw");
    let mut data = pattern(1, 1, 8 << 20);
    for b in data[1 << 20..3 << 20].iter_mut() {
        *b &= 0x3; // compressible
    }
    data[5 << 20..6 << 20].fill(0);
    fs::write(&raw, &data).expect("write raw");
    let v3 = dir.join("v3.qcow2");
    qemu_img([
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=65536,compat=1.1",
        raw.to_str().expect("utf8"),
        v3.to_str().expect("utf8"),
    ]);
    qemu_img(["snapshot", "-c", "snap", v3.to_str().expect("utf8")]);
    qemu_io("qcow2", &v3, &["write -q -P 0x42 0 200k".to_string()]);
    let v2 = dir.join("v2.qcow2");
    qemu_create(&v2, "cluster_size=4096,compat=0.10", 4 << 20);
    qemu_io("qcow2", &v2, &["write -q -P 0x17 0 1M".to_string()]);
    qemu_img(["snapshot", "-c", "snap", v2.to_str().expect("utf8")]);
    Base {
        _dir: d,
        dir,
        v3,
        v2,
        cluster_v3: 65536,
    }
}

fn variant(b: &Base, src: &Path, name: &str, f: impl FnOnce(&Path)) -> PathBuf {
    let p = copy_to(src, &b.dir, &format!("{name}.qcow2"));
    f(&p);
    p
}

fn report(failures: Vec<String>) {
    assert!(
        failures.is_empty(),
        "{} malformed-image cases failed:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
}

/// The unpatched bases open and read (test sanity).
#[test]
fn bases_are_valid() {
    let b = base();
    for p in [&b.v3, &b.v2] {
        let img = open_ro(p);
        read_some(&img).expect("read base");
    }
}

#[test]
fn header_fields() {
    let b = base();
    let ro = OpenOptions::read_only();
    let mut failures = Vec::new();
    type Patch = Box<dyn Fn(&Path)>;
    let cases: Vec<(&'static str, &PathBuf, Patch)> = vec![
        (
            "bad magic",
            &b.v3,
            Box::new(|p| patch_be32(p, hdr::MAGIC, 0x5146_49fa)),
        ),
        (
            "zero magic",
            &b.v3,
            Box::new(|p| patch_be32(p, hdr::MAGIC, 0)),
        ),
        (
            "version 1",
            &b.v3,
            Box::new(|p| patch_be32(p, hdr::VERSION, 1)),
        ),
        (
            "version 4",
            &b.v3,
            Box::new(|p| patch_be32(p, hdr::VERSION, 4)),
        ),
        (
            "v2 version 4",
            &b.v2,
            Box::new(|p| patch_be32(p, hdr::VERSION, 4)),
        ),
        (
            "cluster_bits 8",
            &b.v3,
            Box::new(|p| patch_be32(p, hdr::CLUSTER_BITS, 8)),
        ),
        (
            "cluster_bits 22",
            &b.v3,
            Box::new(|p| patch_be32(p, hdr::CLUSTER_BITS, 22)),
        ),
        (
            "cluster_bits 0",
            &b.v3,
            Box::new(|p| patch_be32(p, hdr::CLUSTER_BITS, 0)),
        ),
        (
            "cluster_bits 255",
            &b.v3,
            Box::new(|p| patch_be32(p, hdr::CLUSTER_BITS, 255)),
        ),
        (
            "size 2^62",
            &b.v3,
            Box::new(|p| patch_be64(p, hdr::SIZE, 1 << 62)),
        ),
        (
            "size u64::MAX",
            &b.v3,
            Box::new(|p| patch_be64(p, hdr::SIZE, u64::MAX)),
        ),
        (
            "size 2^61 with matching huge l1_size",
            &b.v3,
            Box::new(|p| {
                patch_be64(p, hdr::SIZE, 1 << 61);
                patch_be32(p, hdr::L1_SIZE, u32::MAX);
            }),
        ),
        (
            "size 64 TiB, L1 too small for it",
            &b.v3,
            Box::new(|p| patch_be64(p, hdr::SIZE, 1 << 46)),
        ),
        (
            "l1_size 2^31-1",
            &b.v3,
            Box::new(|p| patch_be32(p, hdr::L1_SIZE, (1 << 31) - 1)),
        ),
        (
            "l1_size u32::MAX",
            &b.v3,
            Box::new(|p| patch_be32(p, hdr::L1_SIZE, u32::MAX)),
        ),
        (
            "l1 offset beyond EOF",
            &b.v3,
            Box::new(|p| patch_be64(p, hdr::L1_OFFSET, 1 << 40)),
        ),
        (
            "l1 offset near u64::MAX",
            &b.v3,
            Box::new(|p| patch_be64(p, hdr::L1_OFFSET, u64::MAX - 0xffff)),
        ),
        (
            "l1 offset unaligned",
            &b.v3,
            Box::new(|p| {
                let o = read_be64(p, hdr::L1_OFFSET);
                patch_be64(p, hdr::L1_OFFSET, o + 8);
            }),
        ),
        (
            "l1 offset 0 (overlaps header)",
            &b.v3,
            Box::new(|p| patch_be64(p, hdr::L1_OFFSET, 0)),
        ),
        (
            "refcount table beyond EOF",
            &b.v3,
            Box::new(|p| patch_be64(p, hdr::REFTABLE_OFFSET, 1 << 40)),
        ),
        (
            "refcount table offset 0",
            &b.v3,
            Box::new(|p| patch_be64(p, hdr::REFTABLE_OFFSET, 0)),
        ),
        (
            "refcount table unaligned",
            &b.v3,
            Box::new(|p| {
                let o = read_be64(p, hdr::REFTABLE_OFFSET);
                patch_be64(p, hdr::REFTABLE_OFFSET, o + 512);
            }),
        ),
        (
            "refcount table clusters u32::MAX",
            &b.v3,
            Box::new(|p| patch_be32(p, hdr::REFTABLE_CLUSTERS, u32::MAX)),
        ),
        (
            "refcount table clusters 0",
            &b.v3,
            Box::new(|p| patch_be32(p, hdr::REFTABLE_CLUSTERS, 0)),
        ),
        (
            "refcount table clusters past EOF",
            &b.v3,
            Box::new(|p| {
                let clusters = fs::metadata(p).expect("stat").len() / 65536 + 2;
                patch_be32(p, hdr::REFTABLE_CLUSTERS, clusters as u32);
            }),
        ),
        (
            "crypt_method 1 (AES)",
            &b.v3,
            Box::new(|p| patch_be32(p, hdr::CRYPT_METHOD, 1)),
        ),
        (
            "crypt_method 2 (LUKS)",
            &b.v3,
            Box::new(|p| patch_be32(p, hdr::CRYPT_METHOD, 2)),
        ),
        (
            "v2 crypt_method 1",
            &b.v2,
            Box::new(|p| patch_be32(p, hdr::CRYPT_METHOD, 1)),
        ),
        (
            "unknown incompatible bit 5",
            &b.v3,
            Box::new(|p| patch_be64(p, hdr::INCOMPAT, 1 << 5)),
        ),
        (
            "unknown incompatible bit 63",
            &b.v3,
            Box::new(|p| patch_be64(p, hdr::INCOMPAT, 1 << 63)),
        ),
        (
            "extended L2 bit",
            &b.v3,
            Box::new(|p| patch_be64(p, hdr::INCOMPAT, 1 << 4)),
        ),
        (
            "external data file bit",
            &b.v3,
            Box::new(|p| patch_be64(p, hdr::INCOMPAT, 1 << 2)),
        ),
        (
            "refcount_order 7",
            &b.v3,
            Box::new(|p| patch_be32(p, hdr::REFCOUNT_ORDER, 7)),
        ),
        (
            "refcount_order 255",
            &b.v3,
            Box::new(|p| patch_be32(p, hdr::REFCOUNT_ORDER, 255)),
        ),
        (
            "header_length 0",
            &b.v3,
            Box::new(|p| patch_be32(p, hdr::HEADER_LENGTH, 0)),
        ),
        (
            "header_length 2^31",
            &b.v3,
            Box::new(|p| patch_be32(p, hdr::HEADER_LENGTH, 1 << 31)),
        ),
        (
            "header_length > cluster",
            &b.v3,
            Box::new(|p| patch_be32(p, hdr::HEADER_LENGTH, 65536 + 8)),
        ),
        (
            "header extension length overflows",
            &b.v3,
            Box::new(|p| {
                let hl = read_be32(p, hdr::HEADER_LENGTH) as u64;
                patch_be32(p, hl + 4, 0xffff_fff0);
            }),
        ),
        (
            "compression type 7",
            &b.v3,
            Box::new(|p| {
                patch_be64(p, hdr::INCOMPAT, 1 << 3);
                patch(p, 104, &[7]);
            }),
        ),
        (
            "nb_snapshots u32::MAX",
            &b.v3,
            Box::new(|p| patch_be32(p, hdr::NB_SNAPSHOTS, u32::MAX)),
        ),
        (
            "nb_snapshots 65535 (table truncated)",
            &b.v3,
            Box::new(|p| patch_be32(p, hdr::NB_SNAPSHOTS, 65535)),
        ),
        (
            "snapshot table beyond EOF",
            &b.v3,
            Box::new(|p| patch_be64(p, hdr::SNAPSHOTS_OFFSET, 1 << 40)),
        ),
        (
            "snapshot table unaligned",
            &b.v3,
            Box::new(|p| {
                let o = read_be64(p, hdr::SNAPSHOTS_OFFSET);
                patch_be64(p, hdr::SNAPSHOTS_OFFSET, o + 3);
            }),
        ),
        (
            "snapshot table offset 0",
            &b.v3,
            Box::new(|p| patch_be64(p, hdr::SNAPSHOTS_OFFSET, 0)),
        ),
        (
            "snapshot extra_data_size huge",
            &b.v3,
            Box::new(|p| {
                let o = read_be64(p, hdr::SNAPSHOTS_OFFSET);
                patch_be32(p, o + 36, u32::MAX);
            }),
        ),
        (
            "backing name outside the cluster",
            &b.v3,
            Box::new(|p| {
                patch_be64(p, hdr::BACKING_OFFSET, 65536 - 4);
                patch_be32(p, hdr::BACKING_SIZE, 100);
            }),
        ),
        (
            "backing name offset u64::MAX",
            &b.v3,
            Box::new(|p| {
                patch_be64(p, hdr::BACKING_OFFSET, u64::MAX);
                patch_be32(p, hdr::BACKING_SIZE, 10);
            }),
        ),
        (
            "backing name size u32::MAX",
            &b.v3,
            Box::new(|p| {
                patch_be64(p, hdr::BACKING_OFFSET, 512);
                patch_be32(p, hdr::BACKING_SIZE, u32::MAX);
            }),
        ),
    ];
    for (name, src, f) in cases {
        let p = variant(&b, src, &name.replace(' ', "_"), f);
        if let Some(e) = run_case(name, &p, &ro, Expect::OpenFails).failure {
            failures.push(e);
        }
    }
    // Correct variant of the most common errors.
    let bad = variant(&b, &b.v3, "magic2", |p| {
        patch_be32(p, hdr::MAGIC, 0xdead_beef)
    });
    match Qcow2::open(&bad, &ro) {
        Err(Error::NotQcow2) => {}
        other => failures.push(format!(
            "bad magic: expected Error::NotQcow2, got {other:?}"
        )),
    }
    report(failures);
}

/// Cluster-level damage: open succeeds, the damaged range reads as an
/// error, the rest still reads.
#[test]
fn damaged_tables() {
    let b = base();
    let ro = OpenOptions::read_only();
    let cs = b.cluster_v3;
    let l1 = read_be64(&b.v3, hdr::L1_OFFSET);
    let l2 = read_be64(&b.v3, l1) & 0x00ff_ffff_ffff_fe00;
    assert!(l2 != 0, "setup: first L2 table allocated");
    let mut failures = Vec::new();
    type Patch = Box<dyn Fn(&Path)>;
    let cases: Vec<(&'static str, Patch, Expect)> = vec![
        (
            "L2 entry past EOF",
            Box::new(move |p| patch_be64(p, l2, (1 << 63) | (1 << 40))),
            Expect::ReadFails(0, 4096),
        ),
        (
            "L2 entry at the top of the offset range",
            Box::new(move |p| patch_be64(p, l2 + 8, (1 << 63) | 0x00ff_ffff_ffff_0000)),
            Expect::ReadFails(cs, 4096),
        ),
        (
            "L2 entry unaligned",
            Box::new(move |p| {
                let e = read_be64(p, l2 + 16);
                patch_be64(p, l2 + 16, e | 0x200);
            }),
            Expect::ReadFails(2 * cs, 512),
        ),
        (
            "L2 entry with reserved bits",
            Box::new(move |p| {
                let e = read_be64(p, l2 + 24);
                patch_be64(p, l2 + 24, e | (1 << 56));
            }),
            Expect::NoPanic,
        ),
        (
            "L1 entry past EOF",
            Box::new(move |p| patch_be64(p, l1, (1 << 63) | (1 << 40))),
            Expect::ReadFails(0, 512),
        ),
        (
            "L1 entry unaligned",
            Box::new(move |p| patch_be64(p, l1, (1 << 63) | (l2 + 8))),
            Expect::ReadFails(0, 512),
        ),
        (
            "compressed entry with huge sector count at EOF",
            Box::new(move |p| {
                // Find a compressed L2 entry (bit 62) and point it at the end
                // of the file with the largest size field.
                let f = fs::read(p).expect("read");
                let entries = (cs / 8) as usize;
                let l2u = l2 as usize;
                let idx = (0..entries)
                    .find(|i| {
                        let e = u64::from_be_bytes(
                            f[l2u + i * 8..l2u + i * 8 + 8].try_into().expect("8"),
                        );
                        e & (1 << 62) != 0
                    })
                    .expect("setup: a compressed cluster in the first L2 table");
                let len = f.len() as u64;
                // 64 KiB clusters: 62 - (16 - 8) = 54 offset bits, then 8 bits of sectors.
                let e = (1 << 62) | (0xffu64 << 54) | (len - 16);
                patch_be64(p, l2 + idx as u64 * 8, e);
            }),
            Expect::NoPanic,
        ),
        (
            "compressed data garbage",
            Box::new(move |p| {
                let f = fs::read(p).expect("read");
                let l2u = l2 as usize;
                for i in 0..(cs / 8) as usize {
                    let e =
                        u64::from_be_bytes(f[l2u + i * 8..l2u + i * 8 + 8].try_into().expect("8"));
                    if e & (1 << 62) != 0 {
                        let host = e & ((1 << 54) - 1);
                        patch(p, host, &[0xff; 64]);
                    }
                }
            }),
            Expect::NoPanic,
        ),
        (
            "refcount table entry past EOF",
            Box::new(|p| {
                let rt = read_be64(p, hdr::REFTABLE_OFFSET);
                patch_be64(p, rt, 1 << 40);
            }),
            Expect::NoPanic,
        ),
        (
            "snapshot L1 size u32::MAX",
            Box::new(|p| {
                let o = read_be64(p, hdr::SNAPSHOTS_OFFSET);
                patch_be32(p, o + 8, u32::MAX);
            }),
            Expect::NoPanic,
        ),
        (
            // qemu-img opens this too (it reads a 64 KiB id from the file).
            "snapshot id_str_size 65535",
            Box::new(|p| {
                let o = read_be64(p, hdr::SNAPSHOTS_OFFSET);
                patch(p, o + 12, &[0xff, 0xff]);
            }),
            Expect::NoPanic,
        ),
        (
            "L2 table overlapping the header",
            Box::new(move |p| patch_be64(p, l1, 1 << 63)),
            Expect::NoPanic,
        ),
    ];
    for (name, f, expect) in cases {
        let p = variant(&b, &b.v3, &name.replace(' ', "_"), f);
        if let Some(e) = run_case(name, &p, &ro, expect).failure {
            failures.push(e);
        }
        // Read-write open + write + flush must not panic either.
        let r = catch_unwind(AssertUnwindSafe(|| {
            if let Ok(img) = Qcow2::open(&p, &OpenOptions::default()) {
                let _ = img.write_at(&[1; 5000], 100);
                let _ = img.snapshot_apply("snap");
                let _ = img.flush();
            }
        }));
        if r.is_err() {
            failures.push(format!("{name}: PANIC on read-write open/write/apply"));
        }
    }
    report(failures);
}

/// The corrupt bit: read-only open works, read-write open is refused.
#[test]
fn corrupt_bit() {
    let b = base();
    let p = variant(&b, &b.v3, "corrupt", |p| {
        patch_be64(p, hdr::INCOMPAT, 1 << 1)
    });
    let img = Qcow2::open(&p, &OpenOptions::read_only())
        .expect("read-only open of an image marked corrupt");
    read_some(&img).expect("reads of an image marked corrupt");
    assert!(img.info().corrupt, "info().corrupt");
    drop(img);
    match Qcow2::open(&p, &OpenOptions::default()) {
        Err(Error::MarkedCorrupt) => {}
        other => panic!(
            "read-write open of an image marked corrupt: expected MarkedCorrupt, got {other:?}"
        ),
    }
}

/// Truncated at many lengths: errors or zeros, never a panic; truncated
/// inside the header or the L1/refcount tables: open fails.
#[test]
fn truncated_files() {
    let b = base();
    let full = fs::read(&b.v3).expect("read base");
    let ro = OpenOptions::read_only();
    let mut failures = Vec::new();
    let mut lengths: Vec<usize> = vec![
        0, 1, 3, 4, 8, 20, 71, 72, 73, 100, 103, 104, 111, 112, 200, 511, 512, 4095,
    ];
    lengths.extend((1..full.len() / 4096).map(|i| i * 4096 + (i * 37) % 4096));
    lengths.push(full.len() - 1);
    let l1 = read_be64(&b.v3, hdr::L1_OFFSET) as usize;
    let rt = read_be64(&b.v3, hdr::REFTABLE_OFFSET) as usize;
    for len in lengths {
        let p = b.dir.join(format!("trunc-{len}.qcow2"));
        fs::write(&p, &full[..len]).expect("write truncated");
        // A file that ends before the L1 table or the refcount table starts
        // cannot be opened; otherwise anything but a panic is fine.
        let expect = if len < 104 || len <= l1 || len <= rt {
            Expect::OpenFails
        } else {
            Expect::NoPanic
        };
        if let Some(e) = run_case("truncated", &p, &ro, expect).failure {
            failures.push(format!("length {len}: {e}"));
        }
        fs::remove_file(&p).expect("rm");
    }
    report(failures);
}

/// Backing chains: loops hit the depth limit, a missing format is refused
/// unless probing is on, a missing backing file is an error.
#[test]
fn backing_problems() {
    let b = base();
    let mut failures = Vec::new();
    let ro = OpenOptions::read_only();
    let a = b.dir.join("A.qcow2");
    let bb = b.dir.join("B.qcow2");
    qemu_create(&a, "", 1 << 20);
    qemu_img([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "A.qcow2",
        "-F",
        "qcow2",
        bb.to_str().expect("utf8"),
    ]);
    qemu_img([
        "rebase",
        "-u",
        "-b",
        "B.qcow2",
        "-F",
        "qcow2",
        a.to_str().expect("utf8"),
    ]);
    if let Some(e) = run_case("A backs B backs A", &bb, &ro, Expect::OpenFails).failure {
        failures.push(e);
    }
    let selfp = b.dir.join("self.qcow2");
    qemu_create(&selfp, "", 1 << 20);
    qemu_img([
        "rebase",
        "-u",
        "-b",
        "self.qcow2",
        "-F",
        "qcow2",
        selfp.to_str().expect("utf8"),
    ]);
    if let Some(e) = run_case("image backs itself", &selfp, &ro, Expect::OpenFails).failure {
        failures.push(e);
    }
    // No backing format: patch the backing-format extension into an unknown one.
    let base_raw = b.dir.join("plain.raw");
    fs::write(&base_raw, pattern(3, 3, 1 << 20)).expect("write raw");
    let ov = b.dir.join("noformat.qcow2");
    qemu_img([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "plain.raw",
        "-F",
        "raw",
        ov.to_str().expect("utf8"),
    ]);
    let head = fs::read(&ov).expect("read");
    let pos = head[..4096]
        .windows(4)
        .position(|w| w == [0xe2, 0x79, 0x2a, 0xca])
        .expect("setup: backing format extension present");
    patch_be32(&ov, pos as u64, 0x1234_5678);
    if let Some(e) = run_case(
        "backing without format, probing off",
        &ov,
        &ro,
        Expect::OpenFails,
    )
    .failure
    {
        failures.push(e);
    }
    let probe = OpenOptions {
        probe_backing_format: true,
        ..OpenOptions::read_only()
    };
    match Qcow2::open(&ov, &probe) {
        Ok(img) => {
            let mut buf = vec![0u8; 1 << 20];
            match img.read_at(&mut buf, 0) {
                Ok(()) if buf == pattern(3, 3, 1 << 20) => {}
                Ok(()) => failures.push("probing on: backing content wrong".into()),
                Err(e) => failures.push(format!("probing on: read failed: {e}")),
            }
        }
        Err(e) => failures.push(format!("probing on: open failed: {e}")),
    }
    // The unknown extension survives a read-write open + write (kept on rewrite).
    {
        let p2 = copy_to(&ov, &b.dir, "noformat2.qcow2");
        match Qcow2::open(
            &p2,
            &OpenOptions {
                probe_backing_format: true,
                ..OpenOptions::default()
            },
        ) {
            Ok(img) => {
                let _ = img.write_at(&[9; 100], 0);
                let _ = img.flush();
            }
            Err(e) => failures.push(format!("probing on, read-write: open failed: {e}")),
        }
        let after = fs::read(&p2).expect("read");
        if !after[..4096]
            .windows(4)
            .any(|w| w == [0x12, 0x34, 0x56, 0x78])
        {
            failures.push("unknown header extension lost after a read-write open".into());
        }
    }
    // Missing backing file.
    let miss = b.dir.join("missing.qcow2");
    qemu_img([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "plain.raw",
        "-F",
        "raw",
        miss.to_str().expect("utf8"),
    ]);
    qemu_img([
        "rebase",
        "-u",
        "-b",
        "does-not-exist.raw",
        "-F",
        "raw",
        miss.to_str().expect("utf8"),
    ]);
    if let Some(e) = run_case("missing backing file", &miss, &ro, Expect::OpenFails).failure {
        failures.push(e);
    }
    // Unknown backing format name.
    let badfmt = b.dir.join("badfmt.qcow2");
    qemu_img([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "plain.raw",
        "-F",
        "raw",
        badfmt.to_str().expect("utf8"),
    ]);
    let head = fs::read(&badfmt).expect("read");
    let pos = head[..4096]
        .windows(3)
        .position(|w| w == b"raw")
        .expect("setup: format name");
    patch(&badfmt, pos as u64, b"vmd");
    if let Some(e) = run_case("backing format \"vmd\"", &badfmt, &ro, Expect::OpenFails).failure {
        failures.push(e);
    }
    report(failures);
}

const CHILD_ENV: &str = "OUTBOARD_MALFORMED_CHILD";

/// A backing loop with a user-raised depth limit (1000) must still end in an
/// error, not a stack overflow. Run in a child process (this test binary
/// re-executed) because a stack overflow aborts the whole process.
#[test]
fn backing_loop_with_depth_limit_1000() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        let bb = Path::new(&dir).join("B.qcow2");
        let deep = OpenOptions {
            max_backing_depth: 1000,
            ..OpenOptions::read_only()
        };
        let r = Qcow2::open(&bb, &deep);
        assert!(r.is_err(), "backing loop with depth limit 1000 opened");
        return;
    }
    require_qemu_img();
    let d = tempfile::tempdir().expect("tempdir");
    let a = d.path().join("A.qcow2");
    let bb = d.path().join("B.qcow2");
    qemu_create(&a, "", 1 << 20);
    qemu_img([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "A.qcow2",
        "-F",
        "qcow2",
        bb.to_str().expect("utf8"),
    ]);
    qemu_img([
        "rebase",
        "-u",
        "-b",
        "B.qcow2",
        "-F",
        "qcow2",
        a.to_str().expect("utf8"),
    ]);
    let o = std::process::Command::new(std::env::current_exe().expect("current_exe"))
        .args([
            "--exact",
            "backing_loop_with_depth_limit_1000",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, d.path())
        .output()
        .expect("run child");
    assert!(
        o.status.success(),
        "opening an A->B->A backing loop with max_backing_depth 1000 failed in the child \
         (a stack overflow aborts it): {}",
        show(&o)
    );
}

/// A file that ends inside its last allocated data cluster (what a crash
/// right after an allocating write can leave, since the rest of a fresh
/// cluster need not be written): qemu-img check is clean and qemu reads the
/// missing tail as zeros; the library must read the same.
#[test]
fn file_ending_inside_a_data_cluster() {
    require_qemu_img();
    let d = tempfile::tempdir().expect("tempdir");
    for cluster in [512u64, 65536] {
        let p = d.path().join(format!("short-{cluster}.qcow2"));
        qemu_create(&p, &format!("cluster_size={cluster}"), 1 << 20);
        qemu_io("qcow2", &p, &["write -q -P 0x61 0 100".to_string()]);
        let map = qemu_img(["map", "--output=json", p.to_str().expect("utf8")]);
        let map: serde_json::Value = serde_json::from_str(&map).expect("map json");
        let host = map[0]["offset"]
            .as_u64()
            .expect("setup: data cluster offset");
        let f = fs::OpenOptions::new().write(true).open(&p).expect("open");
        f.set_len(host + 100).expect("truncate");
        drop(f);
        let c = qemu_check(&p, &[]);
        assert_eq!(c.code, 0, "setup: qemu-img check:\n{}", c.text);
        let mut want = vec![0u8; 1 << 20];
        want[..100].fill(0x61);
        assert_bytes_eq(&want, &qemu_read_all(&p, "qcow2"), "setup: qemu-img reads");
        let img = open_ro(&p);
        let mut got = vec![0u8; 1 << 20];
        img.read_at(&mut got, 0).unwrap_or_else(|e| {
            panic!("cluster {cluster}: library read of a cluster cut short by EOF failed: {e}")
        });
        assert_bytes_eq(&want, &got, &format!("cluster {cluster}: library read"));
    }
}
