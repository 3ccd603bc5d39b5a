//! Leaks, repair and the dirty bit, with qemu-img as the judge.

mod common;

use std::os::unix::fs::FileExt;

use common::{pattern, qemu_img};
use qcow2::{CreateOptions, OpenOptions, Qcow2, RepairMode};

fn leaky_image(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("leak.qcow2");
    let opts = CreateOptions {
        size: 4 << 20,
        cluster_size: 4096,
        ..Default::default()
    };
    Qcow2::create(&path, &opts).expect("create");
    let img = Qcow2::open(&path, &OpenOptions::default()).expect("open");
    img.write_at(&pattern(100_000, 1), 0).expect("write");
    drop(img);
    // Plant leaks as a crash between refcount and L2 writeback leaves them:
    // refcount 1 on clusters 1000..1003 that nothing references.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open file");
    let mut hdr = [0u8; 104];
    f.read_exact_at(&mut hdr, 0).expect("header");
    let rt = u64::from_be_bytes(hdr[48..56].try_into().expect("8 bytes"));
    let mut e = [0u8; 8];
    f.read_exact_at(&mut e, rt).expect("reftable");
    let rb = u64::from_be_bytes(e);
    f.set_len(1003 * 4096).expect("grow file");
    for c in 1000u64..1003 {
        f.write_all_at(&1u16.to_be_bytes(), rb + 2 * c)
            .expect("plant leak");
    }
    path
}

#[test]
fn check_agrees_with_qemu_img_on_a_crashed_image_and_repairs_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = leaky_image(dir.path());
    let p = path.to_str().expect("utf8");
    let (qcode, qtext) = qemu_img(&["check", p]);
    let ours = Qcow2::open(&path, &OpenOptions::read_only())
        .expect("open ro")
        .check(None)
        .expect("check");
    assert_eq!(qcode, 3, "qemu-img should see leaks: {qtext}");
    assert!(qtext.contains("3 leaked clusters"), "{qtext}");
    assert_eq!(
        ours.exit_code(),
        qcode,
        "qemu-img said: {qtext}\nwe said: {ours:?}"
    );
    assert_eq!((ours.corruptions, ours.leaks), (0, 3), "{ours:?}");
    let img = Qcow2::open(&path, &OpenOptions::default()).expect("open");
    let fixed = img.check(Some(RepairMode::Leaks)).expect("repair");
    assert_eq!((fixed.exit_code(), fixed.leaks_fixed), (0, 3), "{fixed:?}");
    drop(img);
    let (code, text) = qemu_img(&["check", p]);
    assert_eq!(code, 0, "{text}");
    let img = Qcow2::open(&path, &OpenOptions::read_only()).expect("open");
    let mut back = vec![0u8; 100_000];
    img.read_at(&mut back, 0).expect("read");
    assert!(back == pattern(100_000, 1), "flushed data lost by repair");
}

#[test]
fn dirty_image_gets_refcounts_rebuilt_on_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("dirty.qcow2");
    let p = path.to_str().expect("utf8");
    let (code, text) = qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on,cluster_size=4096",
        p,
        "4M",
    ]);
    assert_eq!(code, 0, "{text}");
    {
        let img = Qcow2::open(&path, &OpenOptions::default()).expect("open");
        img.write_at(&pattern(300_000, 5), 4096).expect("write");
        img.flush().expect("flush");
    }
    // Wreck the refcounts (zero the first refcount block) and set the dirty bit,
    // which is what a crash with lazy refcounts leaves behind.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open file");
    let mut hdr = [0u8; 104];
    f.read_exact_at(&mut hdr, 0).expect("header");
    let rt = u64::from_be_bytes(hdr[48..56].try_into().expect("8 bytes"));
    let mut e = [0u8; 8];
    f.read_exact_at(&mut e, rt).expect("reftable");
    let rb = u64::from_be_bytes(e);
    f.write_all_at(&[0u8; 4096], rb).expect("wreck");
    let mut inc = u64::from_be_bytes(hdr[72..80].try_into().expect("8 bytes"));
    inc |= 1;
    f.write_all_at(&inc.to_be_bytes(), 72).expect("dirty bit");
    drop(f);
    let (code, _) = qemu_img(&["check", "--force-share", "-r", "none", p]);
    assert_ne!(code, 0, "the wrecked image should not be clean yet");
    let img = Qcow2::open(&path, &OpenOptions::default()).expect("open dirty");
    assert!(img.info().dirty);
    let mut back = vec![0u8; 300_000];
    img.read_at(&mut back, 4096).expect("read");
    assert!(back == pattern(300_000, 5));
    drop(img);
    let (code, text) = qemu_img(&["check", p]);
    assert_eq!(code, 0, "{text}");
    assert!(
        !Qcow2::open(&path, &OpenOptions::read_only())
            .expect("open")
            .info()
            .dirty
    );
}

#[test]
fn image_marked_corrupt_is_repaired_only_through_check() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = leaky_image(dir.path());
    let p = path.to_str().expect("utf8");
    // Set the corrupt bit, as QEMU does when it finds overlapping metadata.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open file");
    let mut inc = [0u8; 8];
    f.read_exact_at(&mut inc, 72).expect("read features");
    let bits = u64::from_be_bytes(inc) | 2;
    f.write_all_at(&bits.to_be_bytes(), 72)
        .expect("set corrupt bit");
    drop(f);
    assert!(matches!(
        Qcow2::open(&path, &OpenOptions::default()),
        Err(qcow2::Error::MarkedCorrupt)
    ));
    let opts = OpenOptions {
        repair: true,
        ..Default::default()
    };
    let img = Qcow2::open(&path, &opts).expect("open for repair");
    assert!(matches!(
        img.write_at(&[1], 0),
        Err(qcow2::Error::MarkedCorrupt)
    ));
    let report = img.check(Some(RepairMode::All)).expect("repair");
    assert_eq!(report.exit_code(), 0, "{report:?}");
    img.write_at(&[1], 0).expect("writable after repair");
    drop(img);
    let (code, text) = qemu_img(&["check", p]);
    assert_eq!(code, 0, "{text}");
    let (_, info) = qemu_img(&["info", p]);
    assert!(info.contains("corrupt: false"), "{info}");
}
