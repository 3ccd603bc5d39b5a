//! Fuzz target: a virtqueue made of arbitrary bytes (descriptor table,
//! available ring, buffers, inflight heads) processed by the block engine.
//! The body is shared with the stable smoke test:
//! `outboard_tests::fuzz_blk::virtio_blk_queue`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    outboard_tests::fuzz_blk::virtio_blk_queue(data);
});
