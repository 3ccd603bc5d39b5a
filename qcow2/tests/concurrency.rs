//! Several threads on one image: data I/O of distinct clusters in parallel.

mod common;

use std::sync::Arc;

use common::{pattern, qemu_img};
use qcow2::{CreateOptions, OpenOptions, Qcow2};

#[test]
fn parallel_writers_and_readers_keep_every_byte() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("p.qcow2");
    let size = 32u64 << 20;
    let opts = CreateOptions {
        size,
        cluster_size: 4096,
        ..Default::default()
    };
    Qcow2::create(&path, &opts).expect("create");
    let img = Arc::new(Qcow2::open(&path, &OpenOptions::default()).expect("open"));
    let threads = 4u64;
    let region = size / threads;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let img = Arc::clone(&img);
            std::thread::spawn(move || {
                // Each thread owns a region; writes are unaligned and cross clusters.
                let base = t * region;
                let mut model = vec![0u8; region as usize];
                for i in 0..300u64 {
                    let len = 1 + ((i * 7717 + t * 13) % 9000) as usize;
                    let off = (i * 104_729 + t * 31) % (region - len as u64);
                    let data = pattern(len, t * 1000 + i);
                    img.write_at(&data, base + off).expect("write");
                    model[off as usize..off as usize + len].copy_from_slice(&data);
                    if i % 37 == 0 {
                        img.flush().expect("flush");
                    }
                    let mut back = vec![0u8; len];
                    img.read_at(&mut back, base + off).expect("read");
                    assert!(
                        back == data,
                        "thread {t} step {i}: read-after-write mismatch"
                    );
                }
                let mut all = vec![0u8; region as usize];
                img.read_at(&mut all, base).expect("read region");
                assert!(all == model, "thread {t}: region content differs");
            })
        })
        .collect();
    for h in handles {
        h.join().expect("thread panicked");
    }
    img.flush().expect("flush");
    drop(img);
    let (code, text) = qemu_img(&["check", path.to_str().expect("utf8")]);
    assert_eq!(code, 0, "{text}");
}

#[test]
fn racing_writes_to_one_unallocated_cluster_allocate_it_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("r.qcow2");
    let opts = CreateOptions {
        size: 1 << 20,
        cluster_size: 65536,
        ..Default::default()
    };
    Qcow2::create(&path, &opts).expect("create");
    let img = Arc::new(Qcow2::open(&path, &OpenOptions::default()).expect("open"));
    // 16 threads each write a distinct 4 KiB piece of the same fresh cluster.
    let handles: Vec<_> = (0..16u64)
        .map(|t| {
            let img = Arc::clone(&img);
            std::thread::spawn(move || {
                img.write_at(&pattern(4096, t), t * 4096).expect("write");
            })
        })
        .collect();
    for h in handles {
        h.join().expect("thread panicked");
    }
    for t in 0..16u64 {
        let mut back = vec![0u8; 4096];
        img.read_at(&mut back, t * 4096).expect("read");
        assert!(back == pattern(4096, t), "piece {t} lost");
    }
    let map = img.map(0, 65536).expect("map");
    assert_eq!(map.len(), 1, "one cluster, one extent: {map:?}");
    drop(img);
    let (code, text) = qemu_img(&["check", path.to_str().expect("utf8")]);
    assert_eq!(code, 0, "{text}");
}
