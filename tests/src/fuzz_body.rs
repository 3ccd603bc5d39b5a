//! The body of the `qcow2_open_read` fuzz target, shared by the cargo-fuzz
//! crate (`fuzz/`) and the stable smoke test (`tests/fuzz_smoke.rs`).
//!
//! It writes the input to a file in a fresh temporary directory, opens it
//! read-only with the library and reads the disk in chunks, ignoring errors:
//! what it looks for is panics, hangs and unbounded allocation.

use std::path::Path;

use qcow2::{OpenOptions, Qcow2};

/// Name of the image file inside its private directory. A fuzzed backing
/// name equal to it makes the image its own backing file (a loop).
pub const IMAGE_NAME: &str = "img";

/// Bytes read per call.
const CHUNK: usize = 64 << 10;
/// Disks up to this size are read whole; bigger ones are sampled.
const READ_ALL_LIMIT: u64 = 16 << 20;

/// A backing file name that can only resolve inside the private directory
/// (so a fuzzed image cannot make us open `/dev/stdin` or a FIFO).
fn contained_backing_name(data: &[u8]) -> bool {
    let field = |o: usize, n: usize| data.get(o..o + n);
    let (Some(off), Some(len)) = (field(8, 8), field(16, 4)) else {
        return true; // too short to name a backing file at all
    };
    let off = u64::from_be_bytes(off.try_into().unwrap_or([0; 8]));
    let len = u32::from_be_bytes(len.try_into().unwrap_or([0; 4]));
    if off == 0 {
        return true;
    }
    let (Ok(off), Ok(len)) = (usize::try_from(off), usize::try_from(len)) else {
        return true; // the library must reject it; no file is named
    };
    match off.checked_add(len).and_then(|end| data.get(off..end)) {
        Some(name) => !name.is_empty() && !name.contains(&b'/') && name != b"." && name != b"..",
        None => true,
    }
}

fn exercise(img: &Qcow2) {
    let size = img.size();
    let _ = img.info();
    let _ = img.snapshots();
    let mut buf = vec![0u8; CHUNK];
    let mut read = |off: u64| {
        let len = (size - off).min(CHUNK as u64) as usize;
        let _ = img.read_at(&mut buf[..len], off);
    };
    if size <= READ_ALL_LIMIT {
        let mut off = 0;
        while off < size {
            read(off);
            off += CHUNK as u64;
        }
    } else {
        // First 8 MiB, 64 chunks spread over the disk, and the last chunk.
        let mut off = 0;
        while off < 8 << 20 {
            read(off);
            off += CHUNK as u64;
        }
        for i in 0..64u64 {
            read((size / 64 * i) / CHUNK as u64 * CHUNK as u64);
        }
        read(size.saturating_sub(CHUNK as u64));
    }
    // Out-of-range and odd-sized requests must be errors, not panics.
    let _ = img.read_at(&mut [0u8; 3], size.saturating_sub(1));
    let _ = img.read_at(&mut [0u8; 1], u64::MAX);
    let _ = img.map(0, size.min(64 << 20));
    let _ = img.check(None);
}

/// Opens `data` as a qcow2 image (read-only) and reads it. Never panics on
/// its own; the library must not either.
pub fn open_and_read(data: &[u8]) {
    open_and_read_opened(data);
}

/// [`open_and_read`], returning whether the library accepted the image (for
/// the smoke test's statistics).
pub fn open_and_read_opened(data: &[u8]) -> bool {
    let Ok(dir) = tempfile::tempdir() else {
        return false;
    };
    let path = dir.path().join(IMAGE_NAME);
    if std::fs::write(&path, data).is_err() {
        return false;
    }
    open_and_read_path(&path, contained_backing_name(data))
}

/// Like [`open_and_read`] for an existing file; returns whether it opened.
pub fn open_and_read_path(path: &Path, follow_backing: bool) -> bool {
    let small_caches = OpenOptions {
        read_only: true,
        open_backing: false,
        l2_cache_bytes: Some(256 << 10),
        refcount_cache_bytes: Some(64 << 10),
        ..OpenOptions::default()
    };
    let opened = match Qcow2::open(path, &small_caches) {
        Ok(img) => {
            exercise(&img);
            true
        }
        Err(_) => false,
    };
    if follow_backing {
        let opts = OpenOptions {
            open_backing: true,
            probe_backing_format: true,
            max_backing_depth: 4,
            ..small_caches
        };
        if let Ok(img) = Qcow2::open(path, &opts) {
            exercise(&img);
        }
    }
    opened
}
