//! Library round trips checked by qemu-img (the oracle).

mod common;

use common::{pattern, qemu_img};
use qcow2::{CreateOptions, OpenOptions, Qcow2};

#[test]
fn write_snapshot_apply_delete_pass_qemu_check() {
    for (cs, rb, v) in [
        (65536u64, 16u32, 3u32),
        (512, 1, 3),
        (4096, 64, 3),
        (65536, 16, 2),
        (2 << 20, 8, 3),
    ] {
        if rb == 1 {
            continue; // snapshots need refcounts > 1
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.qcow2");
        let size = 8u64 << 20;
        Qcow2::create(
            &path,
            &CreateOptions {
                size,
                cluster_size: cs,
                refcount_bits: rb,
                version: v,
                ..Default::default()
            },
        )
        .expect("create");
        let mut model = vec![0u8; size as usize];
        {
            let img = Qcow2::open(&path, &OpenOptions::default()).expect("open");
            for i in 0..40u64 {
                let off = (i * 7919 * 1021) % (size - 20000);
                let data = pattern(1 + (i as usize * 997) % 20000, i);
                img.write_at(&data, off).expect("write");
                model[off as usize..off as usize + data.len()].copy_from_slice(&data);
            }
            img.flush().expect("flush");
        }
        let (code, text) = qemu_img(&["check", path.to_str().expect("utf8")]);
        assert_eq!(code, 0, "cs={cs} rb={rb} v={v}: {text}");
        let img = Qcow2::open(&path, &OpenOptions::default()).expect("reopen");
        let mut back = vec![0u8; size as usize];
        img.read_at(&mut back, 0).expect("read");
        assert!(back == model, "content differs cs={cs}");
        img.snapshot_create("one").expect("snapshot");
        let snap_model = model.clone();
        let data = pattern(100_000, 99);
        img.write_at(&data, 12345).expect("write after snapshot");
        model[12345..12345 + data.len()].copy_from_slice(&data);
        img.flush().expect("flush");
        let (code, text) = qemu_img(&["check", path.to_str().expect("utf8")]);
        assert_eq!(code, 0, "after snapshot cs={cs}: {text}");
        let (_, list) = qemu_img(&["snapshot", "-l", path.to_str().expect("utf8")]);
        assert!(list.contains("one"), "{list}");
        img.read_at(&mut back, 0).expect("read");
        assert!(back == model);
        img.snapshot_apply("one").expect("apply");
        img.read_at(&mut back, 0).expect("read");
        assert!(back == snap_model, "snapshot content cs={cs}");
        img.snapshot_delete("one").expect("delete");
        img.write_at(&data, 0).expect("write after delete");
        drop(img);
        let (code, text) = qemu_img(&["check", path.to_str().expect("utf8")]);
        assert_eq!(code, 0, "after delete cs={cs}: {text}");
    }
}

/// Shrinking (to cluster-aligned and unaligned sizes, across an L2 table
/// boundary, with a snapshot taken before): the data before the new end is
/// kept, qemu-img check is clean (no leaks: the dropped clusters are freed),
/// growing again reads zeros past the old cut (the tail of the last cluster
/// included), and applying the snapshot restores the old size and data.
#[test]
fn shrink_keeps_head_frees_tail_and_snapshots_survive() {
    for (cs, rb, v) in [
        (65536u64, 16u32, 3u32),
        (512, 16, 3),
        (4096, 64, 3),
        (65536, 16, 2),
    ] {
        for new_size in [3u64 << 20, (3 << 20) + 512, 512 * 3] {
            let ctx = format!("cs={cs} rb={rb} v={v} new_size={new_size}");
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("a.qcow2");
            let p = path.to_str().expect("utf8");
            let size = 8u64 << 20;
            let opts = CreateOptions {
                size,
                cluster_size: cs,
                refcount_bits: rb,
                version: v,
                ..Default::default()
            };
            Qcow2::create(&path, &opts).expect("create");
            let model = pattern(size as usize, 7);
            let img = Qcow2::open(&path, &OpenOptions::default()).expect("open");
            img.write_at(&model, 0).expect("write");
            let snap = v >= 3; // v2 images with snapshots cannot be resized
            if snap {
                img.snapshot_create("full").expect("snapshot");
            }
            img.resize(new_size).expect("shrink");
            assert_eq!(img.size(), new_size, "{ctx}");
            let mut back = vec![0u8; new_size as usize];
            img.read_at(&mut back, 0).expect("read");
            assert!(back == model[..new_size as usize], "{ctx}: head changed");
            img.flush().expect("flush");
            let (code, text) = qemu_img(&["check", p]);
            assert_eq!(code, 0, "{ctx}: {text}");
            assert!(!text.contains("leaked"), "{ctx}: {text}");
            let (_, info) = qemu_img(&["info", "--output=json", p]);
            assert!(
                info.contains(&format!("\"virtual-size\": {new_size},")),
                "{ctx}: {info}"
            );

            img.resize(size).expect("grow again");
            let mut back = vec![0u8; size as usize];
            img.read_at(&mut back, 0).expect("read");
            assert!(
                back[..new_size as usize] == model[..new_size as usize],
                "{ctx}"
            );
            assert!(
                back[new_size as usize..].iter().all(|&b| b == 0),
                "{ctx}: old data back"
            );
            if snap {
                img.snapshot_apply("full").expect("apply");
                img.read_at(&mut back, 0).expect("read");
                assert!(back == model, "{ctx}: snapshot content");
            }
            drop(img);
            let (code, text) = qemu_img(&["check", p]);
            assert_eq!(code, 0, "{ctx}: {text}");
            assert!(!text.contains("leaked"), "{ctx}: {text}");
        }
    }
}
