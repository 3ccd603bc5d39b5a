//! Stable-toolchain smoke runs of the block daemon's fuzz targets
//! ([`outboard_tests::fuzz_blk`]): seeded, reproducible inputs, half of
//! them structured (well-formed descriptor chains and vhost-user messages
//! with mutated fields), half raw random bytes, for `FUZZ_SMOKE_SECS`
//! seconds each (default 5). A panicking input is saved under
//! `target/fuzz-smoke-failures/` (replay it with `cargo fuzz run TARGET FILE`),
//! and every file in `fuzz/regressions/TARGET/` is replayed first.

use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use outboard_tests::fuzz_blk::{vhost_user_messages, virtio_blk_queue, MEM_SIZE};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

fn budget() -> Duration {
    let secs = std::env::var("FUZZ_SMOKE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    Duration::from_secs(secs)
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Set by a panic in any thread (the daemon's handler and vring threads
/// are not the caller's, so `catch_unwind` alone would miss their panics).
static PANICKED: AtomicBool = AtomicBool::new(false);

fn run(target: &str, body: fn(&[u8]) -> u64, gen: fn(&mut StdRng) -> Vec<u8>) -> u64 {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICKED.store(true, Ordering::SeqCst);
        default(info);
    }));
    let regressions = root().join("fuzz/regressions").join(target);
    if let Ok(dir) = fs::read_dir(&regressions) {
        for e in dir.flatten() {
            let data = fs::read(e.path()).expect("read regression input");
            body(&data);
            assert!(!PANICKED.load(Ordering::SeqCst), "{}", e.path().display());
        }
    }
    let deadline = Instant::now() + budget();
    let mut rng = StdRng::seed_from_u64(0xb1c5_f022);
    let (mut n, mut work) = (0u64, 0u64);
    while Instant::now() < deadline {
        let input = gen(&mut rng);
        let r = catch_unwind(AssertUnwindSafe(|| body(&input)));
        if let Ok(w) = r {
            work += w;
        }
        if r.is_err() || PANICKED.load(Ordering::SeqCst) {
            let dir = root().join("target/fuzz-smoke-failures");
            let _ = fs::create_dir_all(&dir);
            let path = dir.join(format!("{target}-{n}"));
            let _ = fs::write(&path, &input);
            panic!(
                "{target} panicked on input {n}, saved to {}",
                path.display()
            );
        }
        n += 1;
    }
    eprintln!("{target}: {n} inputs, {work} units of work");
    assert!(n > 0);
    work
}

fn desc(out: &mut [u8], i: usize, addr: u64, len: u32, flags: u16, next: u16) {
    let o = i * 16;
    out[o..o + 8].copy_from_slice(&addr.to_le_bytes());
    out[o + 8..o + 12].copy_from_slice(&len.to_le_bytes());
    out[o + 12..o + 14].copy_from_slice(&flags.to_le_bytes());
    out[o + 14..o + 16].copy_from_slice(&next.to_le_bytes());
}

/// A queue of mostly well-formed requests, then random corruption.
fn gen_queue(rng: &mut StdRng) -> Vec<u8> {
    if rng.gen_bool(0.3) {
        let mut v = vec![0u8; rng.gen_range(4..MEM_SIZE / 4)];
        rng.fill_bytes(&mut v);
        return v;
    }
    let size: u16 = 1 << rng.gen_range(1..=8u32);
    let mut mem = vec![0u8; 0x8000];
    let chains = rng.gen_range(1..=size.min(16)) as usize;
    let mut avail = Vec::new();
    for c in 0..chains {
        let head = (c * 3) % usize::from(size);
        let base = 0x3000 + c as u64 * 0x200;
        let ty: u32 = *[0u32, 1, 4, 8, 11, 13, 99]
            .get(rng.gen_range(0..7))
            .unwrap_or(&0);
        let sector: u64 = rng.gen_range(0..2100);
        let hdr = (base - 0x3000) as usize + 0x3000;
        if hdr + 16 <= mem.len() {
            mem[hdr..hdr + 4].copy_from_slice(&ty.to_le_bytes());
            mem[hdr + 8..hdr + 16].copy_from_slice(&sector.to_le_bytes());
        }
        let n1 = (head + 1) % usize::from(size);
        let n2 = (head + 2) % usize::from(size);
        let write = if ty == 0 || ty == 8 { 2 } else { 0 };
        if n2 * 16 + 16 <= 0x1000 {
            desc(&mut mem, head, base, 16, 1, n1 as u16);
            desc(&mut mem, n1, base + 16, 512, 1 | write, n2 as u16);
            desc(&mut mem, n2, base + 0x1f0, 1, 2, 0);
        }
        avail.push(head as u16);
    }
    for (i, h) in avail.iter().enumerate() {
        let o = 0x1000 + 4 + 2 * i;
        mem[o..o + 2].copy_from_slice(&h.to_le_bytes());
    }
    for _ in 0..rng.gen_range(0..6) {
        let i = rng.gen_range(0..mem.len());
        mem[i] = rng.gen();
    }
    let mut v = vec![
        rng.gen::<u8>(),
        size.trailing_zeros() as u8,
        avail.len() as u8,
        0,
    ];
    if v[0] & 4 != 0 {
        let k = rng.gen_range(0..4u8);
        v.push(k);
        for _ in 0..k {
            v.push(rng.gen_range(0..size.min(255)) as u8);
        }
    }
    v.extend_from_slice(&mem);
    v
}

/// Message records: a plausible start (memory table, vring setup) with
/// mutated fields, or random records.
fn gen_messages(rng: &mut StdRng) -> Vec<u8> {
    let mut v = Vec::new();
    let rec = |v: &mut Vec<u8>, req: u8, fds: u8, payload: &[u8]| {
        v.push(req);
        v.push(fds);
        v.push(payload.len().min(255) as u8);
        v.extend_from_slice(&payload[..payload.len().min(255)]);
    };
    let mutate = |rng: &mut StdRng, p: &mut Vec<u8>| {
        if rng.gen_bool(0.3) && !p.is_empty() {
            let i = rng.gen_range(0..p.len());
            p[i] = rng.gen();
        }
    };
    let region = |gpa: u64, size: u64, hva: u64| {
        let mut p = vec![1, 0, 0, 0, 0, 0, 0, 0];
        for x in [gpa, size, hva, 0u64] {
            p.extend_from_slice(&x.to_le_bytes());
        }
        p
    };
    for _ in 0..rng.gen_range(1..12) {
        let (req, fds, mut p): (u8, u8, Vec<u8>) = match rng.gen_range(0..10) {
            0 => (5, 1, region(0, MEM_SIZE as u64, 0x7000_0000)),
            1 => (8, 0, [0u32.to_le_bytes(), 16u32.to_le_bytes()].concat()),
            2 => {
                let mut p = vec![0u8; 8];
                for x in [0x7000_0000u64, 0x7000_1000, 0x7000_0800, 0] {
                    p.extend_from_slice(&x.to_le_bytes());
                }
                (9, 0, p)
            }
            3 => (12, 2, 0u64.to_le_bytes().to_vec()),
            4 => (13, 2, 0u64.to_le_bytes().to_vec()),
            5 => (18, 0, [0u32.to_le_bytes(), 1u32.to_le_bytes()].concat()),
            6 => (31, 0, {
                let mut p = vec![0u8; 16];
                p.extend_from_slice(&2u16.to_le_bytes());
                p.extend_from_slice(&64u16.to_le_bytes());
                p.extend_from_slice(&[0; 4]);
                p
            }),
            7 => (
                37,
                1,
                region(0x10_0000, MEM_SIZE as u64, 0x7100_0000)[8..].to_vec(),
            ),
            8 => (24, 0, {
                let mut p = vec![0u8; 12];
                p[4] = 60;
                p.extend_from_slice(&[0; 60]);
                p
            }),
            _ => {
                let mut p = vec![0u8; rng.gen_range(0..64)];
                rng.fill_bytes(&mut p);
                (rng.gen(), rng.gen(), p)
            }
        };
        mutate(rng, &mut p);
        rec(&mut v, req, fds, &p);
    }
    v
}

#[test]
fn virtio_blk_queue_smoke() {
    let completed = run("virtio_blk_queue", virtio_blk_queue, gen_queue);
    assert!(
        completed > 1000,
        "only {completed} requests completed: the inputs are too shallow"
    );
}

#[test]
fn vhost_user_messages_smoke() {
    let replies = run("vhost_user_messages", vhost_user_messages, gen_messages);
    assert!(replies > 0, "no reply bytes: the handshake never worked");
}
