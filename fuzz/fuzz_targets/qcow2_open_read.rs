//! Fuzz target: open arbitrary bytes as a qcow2 image (read-only) and read
//! the whole disk in chunks, ignoring errors. The body is shared with the
//! stable smoke test: `outboard_tests::fuzz_body::open_and_read`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    outboard_tests::fuzz_body::open_and_read(data);
});
