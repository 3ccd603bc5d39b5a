//! Stable-toolchain smoke run of the net daemon's fuzz target
//! ([`outboard_tests::fuzz_net::virtio_net_queues`]): seeded, reproducible
//! inputs for `FUZZ_SMOKE_SECS` seconds (default 5). Most are structured:
//! well-formed RX and TX rings (direct and indirect chains, frames waiting
//! on the tap) with hostile edits (descriptor loops, addresses outside
//! memory, gigantic lengths, bogus available indexes, random bytes); the
//! rest are raw random bytes. Each input runs on a helper thread with a
//! deadline, so a hang fails the test too. A failing input is saved under
//! `target/fuzz-smoke-failures/` (replay it with `cargo fuzz run
//! virtio_net_queues FILE`), and every file in
//! `fuzz/regressions/virtio_net_queues/` is replayed first.

use std::fs;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use outboard_tests::fuzz_net::{virtio_net_queues, MEM_SIZE, RX_RING, TX_RING};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

const TARGET: &str = "virtio_net_queues";

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

fn save(input: &[u8], n: u64) -> PathBuf {
    let dir = root().join("target/fuzz-smoke-failures");
    let _ = fs::create_dir_all(&dir);
    let path = dir.join(format!("{TARGET}-{n}"));
    let _ = fs::write(&path, input);
    path
}

/// Runs the body on a worker thread fed through a channel; `Err` if it
/// panicked or did not answer within 10 s (a hang).
struct Runner {
    tx: mpsc::Sender<Vec<u8>>,
    rx: mpsc::Receiver<Result<u64, ()>>,
}

impl Runner {
    fn new() -> Runner {
        let (tx, in_rx) = mpsc::channel::<Vec<u8>>();
        let (out_tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for input in in_rx {
                let r = std::panic::catch_unwind(|| virtio_net_queues(&input)).map_err(|_| ());
                if out_tx.send(r).is_err() {
                    break;
                }
            }
        });
        Runner { tx, rx }
    }

    fn run(&self, input: &[u8]) -> Result<u64, String> {
        self.tx.send(input.to_vec()).map_err(|_| "worker gone")?;
        match self.rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(w)) => Ok(w),
            Ok(Err(())) => Err("panicked".into()),
            Err(_) => Err("hung (no answer in 10 s)".into()),
        }
    }
}

fn desc(mem: &mut [u8], at: u64, addr: u64, len: u32, flags: u16, next: u16) {
    let o = at as usize;
    if o + 16 > mem.len() {
        return;
    }
    mem[o..o + 8].copy_from_slice(&addr.to_le_bytes());
    mem[o + 8..o + 12].copy_from_slice(&len.to_le_bytes());
    mem[o + 12..o + 14].copy_from_slice(&flags.to_le_bytes());
    mem[o + 14..o + 16].copy_from_slice(&next.to_le_bytes());
}

const NEXT: u16 = 1;
const WRITE: u16 = 2;
const INDIRECT: u16 = 4;
/// Indirect tables live here; buffers from BUF on.
const INDIRECT_AT: u64 = 0x6000;
const BUF: u64 = 0x8000;

/// Writes `chains` (lists of (len, flags)) into the ring at `ring`, some
/// through an indirect table; returns how many were made available.
fn fill_ring(
    rng: &mut StdRng,
    mem: &mut [u8],
    ring: [u64; 3],
    size: u16,
    chains: &[Vec<u32>],
    flags: u16,
    ind_slot: &mut u64,
) -> u16 {
    let mut slot = 0u16;
    let mut avail = 0u16;
    for chain in chains {
        let n = chain.len() as u16;
        let buf = |rng: &mut StdRng| BUF + rng.gen_range(0..0x7000u64);
        if rng.gen_bool(0.2) {
            // One head descriptor pointing at an indirect table.
            let table = INDIRECT_AT + *ind_slot * 0x100;
            *ind_slot += 1;
            for (i, &len) in chain.iter().enumerate() {
                let more = if i + 1 < chain.len() { NEXT } else { 0 };
                desc(
                    mem,
                    table + 16 * i as u64,
                    buf(rng),
                    len,
                    flags | more,
                    i as u16 + 1,
                );
            }
            if slot >= size {
                break;
            }
            desc(
                mem,
                ring[0] + 16 * u64::from(slot),
                table,
                16 * u32::from(n),
                INDIRECT,
                0,
            );
            put_avail(mem, ring, avail, slot);
            slot += 1;
        } else {
            if slot + n > size {
                break;
            }
            for (i, &len) in chain.iter().enumerate() {
                let more = if i + 1 < chain.len() { NEXT } else { 0 };
                let at = slot + i as u16;
                desc(
                    mem,
                    ring[0] + 16 * u64::from(at),
                    buf(rng),
                    len,
                    flags | more,
                    at + 1,
                );
            }
            put_avail(mem, ring, avail, slot);
            slot += n;
        }
        avail += 1;
    }
    avail
}

fn put_avail(mem: &mut [u8], ring: [u64; 3], i: u16, head: u16) {
    let o = (ring[1] + 4 + 2 * u64::from(i)) as usize;
    if o + 2 <= mem.len() {
        mem[o..o + 2].copy_from_slice(&head.to_le_bytes());
    }
}

/// A hostile edit of one descriptor of `ring`.
fn hostile(rng: &mut StdRng, mem: &mut [u8], ring: [u64; 3], size: u16) {
    let i = u64::from(rng.gen_range(0..size));
    let at = (ring[0] + 16 * i) as usize;
    if at + 16 > mem.len() {
        return;
    }
    match rng.gen_range(0..5) {
        // A loop: NEXT back to itself or to the chain's head.
        0 => {
            let flags = u16::from_le_bytes([mem[at + 12], mem[at + 13]]) | NEXT;
            mem[at + 12..at + 14].copy_from_slice(&flags.to_le_bytes());
            let next = rng.gen_range(0..=i) as u16;
            mem[at + 14..at + 16].copy_from_slice(&next.to_le_bytes());
        }
        // Outside guest memory.
        1 => mem[at..at + 8]
            .copy_from_slice(&rng.gen_range(MEM_SIZE as u64 - 8..u64::MAX).to_le_bytes()),
        // Gigantic length.
        2 => {
            mem[at + 8..at + 12].copy_from_slice(&rng.gen_range(0x1_0000..=u32::MAX).to_le_bytes())
        }
        // Next index past the table.
        3 => {
            mem[at + 12] |= NEXT as u8;
            mem[at + 14..at + 16].copy_from_slice(&rng.gen_range(size..=u16::MAX).to_le_bytes());
        }
        // Indirect inside indirect, or a bad indirect table.
        _ => {
            mem[at + 12] |= INDIRECT as u8;
            let t = INDIRECT_AT + 16 * u64::from(rng.gen_range(0..16u16));
            mem[at..at + 8].copy_from_slice(&t.to_le_bytes());
            mem[at + 8..at + 12].copy_from_slice(&rng.gen_range(0..0x2000u32).to_le_bytes());
        }
    }
}

fn gen(rng: &mut StdRng) -> Vec<u8> {
    if rng.gen_bool(0.2) {
        let mut v = vec![0u8; rng.gen_range(7..MEM_SIZE / 2)];
        rng.fill_bytes(&mut v);
        return v;
    }
    let flags: u8 = rng.gen();
    let qlog = rng.gen_range(1..=8u32);
    let size = 1u16 << qlog;
    let mut mem = vec![0u8; MEM_SIZE];
    rng.fill_bytes(&mut mem[BUF as usize..]);
    let mut ind = 0u64;
    // RX: writable chains of one to three buffers.
    let rx_chains: Vec<Vec<u32>> = (0..rng.gen_range(0..=size.min(24)))
        .map(|_| {
            (0..rng.gen_range(1..=3))
                .map(|_| {
                    *[6u32, 12, 64, 256, 1500, 2048]
                        .get(rng.gen_range(0..6))
                        .unwrap_or(&64)
                })
                .collect()
        })
        .collect();
    let rx_avail = fill_ring(rng, &mut mem, RX_RING, size, &rx_chains, WRITE, &mut ind);
    // TX: a header and a frame (sometimes split, sometimes too short).
    let tx_chains: Vec<Vec<u32>> = (0..rng.gen_range(0..=size.min(24)))
        .map(|_| match rng.gen_range(0..4) {
            0 => vec![12 + rng.gen_range(0..1600)],
            1 => vec![10, rng.gen_range(14..1600)],
            2 => vec![12, rng.gen_range(14..800), rng.gen_range(1..800)],
            _ => vec![rng.gen_range(0..16)],
        })
        .collect();
    let tx_avail = fill_ring(rng, &mut mem, TX_RING, size, &tx_chains, 0, &mut ind);
    for _ in 0..rng.gen_range(0..3) {
        let ring = if rng.gen() { RX_RING } else { TX_RING };
        hostile(rng, &mut mem, ring, size);
    }
    for _ in 0..rng.gen_range(0..4) {
        let i = rng.gen_range(0..BUF as usize);
        mem[i] = rng.gen();
    }
    let bogus = |rng: &mut StdRng, n: u16| {
        if rng.gen_bool(0.05) {
            rng.gen()
        } else {
            n
        }
    };
    let rx_idx = bogus(rng, rx_avail);
    let tx_idx = bogus(rng, tx_avail);
    let nframes = rng.gen_range(0..=8u8);
    let mut v = vec![flags, qlog as u8];
    v.extend_from_slice(&rx_idx.to_le_bytes());
    v.extend_from_slice(&tx_idx.to_le_bytes());
    v.push(nframes);
    for _ in 0..nframes {
        let len: u16 = *[8u16, 12, 60, 600, 1514, 1600, 3000]
            .get(rng.gen_range(0..7))
            .unwrap_or(&60);
        v.extend_from_slice(&len.to_le_bytes());
        let mut f = vec![0u8; usize::from(len)];
        rng.fill_bytes(&mut f);
        // Mostly a plain header (no offload flags).
        if rng.gen_bool(0.7) {
            f.iter_mut().take(12).for_each(|b| *b = 0);
        }
        v.extend_from_slice(&f);
    }
    v.extend_from_slice(&mem);
    v
}

#[test]
fn virtio_net_queues_smoke() {
    let runner = Runner::new();
    let regressions = root().join("fuzz/regressions").join(TARGET);
    if let Ok(dir) = fs::read_dir(&regressions) {
        for e in dir.flatten() {
            let data = fs::read(e.path()).expect("read regression input");
            if let Err(why) = runner.run(&data) {
                panic!("regression {} {why}", e.path().display());
            }
        }
    }
    let deadline = Instant::now() + budget();
    let mut rng = StdRng::seed_from_u64(0x0e7_f022);
    let (mut n, mut work) = (0u64, 0u64);
    while Instant::now() < deadline {
        let input = gen(&mut rng);
        match runner.run(&input) {
            Ok(w) => work += w,
            Err(why) => {
                let path = save(&input, n);
                panic!("{TARGET} {why} on input {n}, saved to {}", path.display());
            }
        }
        n += 1;
    }
    eprintln!("{TARGET}: {n} inputs, {work} used entries");
    assert!(
        work > 1000,
        "only {work} used entries in {n} inputs: the inputs are too shallow"
    );
}
