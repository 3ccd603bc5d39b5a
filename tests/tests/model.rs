//! Randomized model test: long seeded sequences of write / write_zeroes /
//! discard / snapshot create / apply / delete / flush / drop+reopen against
//! an in-memory model of the active disk and of every snapshot, checked after
//! each step; at the end `qemu-img check` must be clean and qemu-img must
//! read the active disk and every snapshot as the model says.
//!
//! A failure names the seed and the step and shows the last operations;
//! each seed is its own test (`cargo test -p outboard-tests --test model seed_3`).

use std::collections::VecDeque;
use std::path::Path;

use outboard_tests::*;
use qcow2::{OpenOptions, Qcow2};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone, Copy)]
struct Case {
    seed: u64,
    cluster: u64,
    rbits: u32,
    version: u32,
    size: u64,
    steps: u32,
    /// Open with tiny metadata caches, so that eviction write-back is used.
    small_cache: bool,
}

const CASES: &[Case] = &[
    Case {
        seed: 1,
        cluster: 512,
        rbits: 1,
        version: 3,
        size: 1 << 20,
        steps: 1500,
        small_cache: false,
    },
    Case {
        seed: 2,
        cluster: 4096,
        rbits: 16,
        version: 2,
        size: 4 << 20,
        steps: 1500,
        small_cache: true,
    },
    Case {
        seed: 3,
        cluster: 4096,
        rbits: 64,
        version: 3,
        size: 2 << 20,
        steps: 1500,
        small_cache: false,
    },
    Case {
        seed: 4,
        cluster: 65536,
        rbits: 8,
        version: 3,
        size: 8 << 20,
        steps: 1200,
        small_cache: true,
    },
    Case {
        seed: 5,
        cluster: 512,
        rbits: 16,
        version: 2,
        size: 1 << 20,
        steps: 1500,
        small_cache: true,
    },
    Case {
        seed: 6,
        cluster: 2 << 20,
        rbits: 2,
        version: 3,
        size: 8 << 20,
        steps: 450,
        small_cache: false,
    },
    Case {
        seed: 7,
        cluster: 1024,
        rbits: 4,
        version: 3,
        size: 3 << 20,
        steps: 1500,
        small_cache: true,
    },
    Case {
        seed: 8,
        cluster: 8192,
        rbits: 32,
        version: 3,
        size: 4 << 20,
        steps: 1500,
        small_cache: false,
    },
];

const MAX_SNAPSHOTS: usize = 5;

struct Model {
    active: Vec<u8>,
    /// (name, content) in creation order.
    snaps: Vec<(String, Vec<u8>)>,
}

/// Prints the seed if the test panics anywhere (including inside the library).
struct SeedGuard(Case);

impl Drop for SeedGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "model test FAILED for {:?}\n  rerun: cargo test -p outboard-tests --test model seed_{}_",
                self.0, self.0.seed
            );
        }
    }
}

fn open(path: &Path, case: &Case) -> Qcow2 {
    let opts = if case.small_cache {
        OpenOptions {
            l2_cache_bytes: Some(4 * case.cluster),
            refcount_cache_bytes: Some(2 * case.cluster),
            ..OpenOptions::default()
        }
    } else {
        OpenOptions::default()
    };
    Qcow2::open(path, &opts).unwrap_or_else(|e| panic!("{case:?}: open: {e}"))
}

fn run_case(case: Case) {
    let _guard = SeedGuard(case);
    let Case {
        seed,
        cluster,
        size,
        ..
    } = case;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("model.qcow2");
    lib_create(&path, size, cluster, case.rbits, case.version);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut m = Model {
        active: vec![0; size as usize],
        snaps: Vec::new(),
    };
    let mut img = Some(open(&path, &case));
    let mut history: VecDeque<String> = VecDeque::new();
    let mut next_snap = 0u32;
    let mut counts = std::collections::BTreeMap::<String, u32>::new();
    for step in 0..case.steps {
        let cur = img.as_ref().expect("image open");
        let ctx = |history: &VecDeque<String>| {
            format!(
                "seed {seed} ({case:?}) step {step}; last operations:\n  {}",
                history.iter().cloned().collect::<Vec<_>>().join("\n  ")
            )
        };
        let len = match rng.gen_range(0..3) {
            0 => rng.gen_range(1..=cluster.min(4096)),
            1 => rng.gen_range(1..=cluster * 3),
            _ => cluster * rng.gen_range(1..=4u64),
        }
        .min(size)
        .min(512 << 10);
        let off = if rng.gen_bool(0.4) {
            rng.gen_range(0..=(size - len) / cluster) * cluster
        } else {
            rng.gen_range(0..=size - len)
        };
        let (o, l) = (off as usize, len as usize);
        let op = rng.gen_range(0..100);
        let desc = match op {
            0..=44 => {
                let data = pattern(seed, step as u64, l);
                cur.write_at(&data, off)
                    .unwrap_or_else(|e| panic!("write_at({off}, {len}): {e}\n{}", ctx(&history)));
                m.active[o..o + l].copy_from_slice(&data);
                format!("write {off}+{len}")
            }
            45..=54 => {
                cur.write_zeroes(off, len).unwrap_or_else(|e| {
                    panic!("write_zeroes({off}, {len}): {e}\n{}", ctx(&history))
                });
                m.active[o..o + l].fill(0);
                format!("write_zeroes {off}+{len}")
            }
            55..=64 => {
                cur.discard(off, len)
                    .unwrap_or_else(|e| panic!("discard({off}, {len}): {e}\n{}", ctx(&history)));
                let s = off.next_multiple_of(cluster) as usize;
                let e = ((off + len) / cluster * cluster) as usize;
                if e > s {
                    m.active[s..e].fill(0);
                }
                format!("discard {off}+{len}")
            }
            65..=71 if m.snaps.len() < MAX_SNAPSHOTS => {
                let name = format!("s{next_snap}");
                next_snap += 1;
                // A cluster can be shared by the active layer and every
                // snapshot: creation must succeed while that fits the
                // refcount width; beyond it, refusing (as qemu-img does) is
                // allowed, and the image must be unchanged.
                let max_ref = if case.rbits >= 64 {
                    u64::MAX
                } else {
                    (1u64 << case.rbits) - 1
                };
                let needed = m.snaps.len() as u64 + 2;
                match cur.snapshot_create(&name) {
                    Ok(_) => {
                        m.snaps.push((name.clone(), m.active.clone()));
                        format!("snapshot_create {name}")
                    }
                    Err(e) if needed > max_ref => format!("snapshot_create {name} refused: {e}"),
                    Err(e) => panic!("snapshot_create({name}): {e}\n{}", ctx(&history)),
                }
            }
            72..=78 if !m.snaps.is_empty() => {
                let i = rng.gen_range(0..m.snaps.len());
                let name = m.snaps[i].0.clone();
                cur.snapshot_apply(&name)
                    .unwrap_or_else(|e| panic!("snapshot_apply({name}): {e}\n{}", ctx(&history)));
                m.active = m.snaps[i].1.clone();
                format!("snapshot_apply {name}")
            }
            79..=84 if !m.snaps.is_empty() => {
                let i = rng.gen_range(0..m.snaps.len());
                let name = m.snaps.remove(i).0;
                cur.snapshot_delete(&name)
                    .unwrap_or_else(|e| panic!("snapshot_delete({name}): {e}\n{}", ctx(&history)));
                format!("snapshot_delete {name}")
            }
            85..=91 => {
                cur.flush()
                    .unwrap_or_else(|e| panic!("flush: {e}\n{}", ctx(&history)));
                "flush".to_string()
            }
            92..=95 => {
                drop(img.take());
                img = Some(open(&path, &case));
                "drop + reopen".to_string()
            }
            _ => {
                // Whole disk check below.
                "read whole disk".to_string()
            }
        };
        let kind = match desc.split(' ').next() {
            Some(k) if desc.contains("refused") => format!("{k} refused"),
            Some(k) => k.to_string(),
            None => String::new(),
        };
        *counts.entry(kind).or_default() += 1;
        history.push_back(desc.clone());
        if history.len() > 12 {
            history.pop_front();
        }
        let cur = img.as_ref().expect("image open");
        // Read back a random range (and the range just touched).
        let rl = rng.gen_range(1..=(cluster * 3).min(size).min(256 << 10));
        let ro = rng.gen_range(0..=size - rl);
        for (ro, rl) in [(ro, rl), (off, len)] {
            let mut buf = vec![0u8; rl as usize];
            cur.read_at(&mut buf, ro)
                .unwrap_or_else(|e| panic!("read_at({ro}, {rl}): {e}\n{}", ctx(&history)));
            assert_bytes_eq(
                &m.active[ro as usize..(ro + rl) as usize],
                &buf,
                &format!("read {ro}+{rl} after {desc}\n{}", ctx(&history)),
            );
        }
        if op >= 96 || step % 50 == 49 {
            assert_bytes_eq(
                &m.active,
                &read_all(cur),
                &format!("whole disk\n{}", ctx(&history)),
            );
            let names: Vec<String> = cur.snapshots().into_iter().map(|s| s.name).collect();
            let want: Vec<String> = m.snaps.iter().map(|s| s.0.clone()).collect();
            assert_eq!(names, want, "snapshot list\n{}", ctx(&history));
        }
    }
    {
        let cur = img.take().expect("image open");
        cur.flush().expect("final flush");
        assert_bytes_eq(
            &m.active,
            &read_all(&cur),
            &format!("seed {seed}: final whole disk"),
        );
    }
    let ctx = format!("seed {seed} ({case:?}) after {} steps", case.steps);
    eprintln!("{ctx}: {counts:?}");
    assert_qemu_check_clean(&path, &ctx);
    assert_qemu_content(&path, &m.active, &ctx);
    let want: Vec<String> = m.snaps.iter().map(|s| s.0.clone()).collect();
    assert_eq!(
        qemu_snapshot_names(&path),
        want,
        "{ctx}: qemu-img snapshot -l"
    );
    for (name, data) in &m.snaps {
        assert_bytes_eq(
            data,
            &qemu_snapshot_content(&path, name),
            &format!("{ctx}: snapshot {name}"),
        );
    }
}

fn run(seed: u64) {
    require_qemu_img();
    run_case(*CASES.iter().find(|c| c.seed == seed).expect("known seed"));
}

#[test]
fn model_seed_1_c512_r1_v3() {
    run(1);
}
#[test]
fn model_seed_2_c4k_r16_v2_small_cache() {
    run(2);
}
#[test]
fn model_seed_3_c4k_r64_v3() {
    run(3);
}
#[test]
fn model_seed_4_c64k_r8_v3_small_cache() {
    run(4);
}
#[test]
fn model_seed_5_c512_r16_v2_small_cache() {
    run(5);
}
#[test]
fn model_seed_6_c2m_r2_v3() {
    run(6);
}
#[test]
fn model_seed_7_c1k_r4_v3_small_cache() {
    run(7);
}
#[test]
fn model_seed_8_c8k_r32_v3() {
    run(8);
}
