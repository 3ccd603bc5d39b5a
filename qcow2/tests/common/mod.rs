//! Helpers shared by the qcow2 integration tests.
#![allow(dead_code)]

use std::process::Command;

/// Runs qemu-img; returns the exit code and stdout+stderr.
pub fn qemu_img(args: &[&str]) -> (i32, String) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img must be installed");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// Deterministic pseudo-random bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
