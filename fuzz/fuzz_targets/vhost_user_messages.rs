//! Fuzz target: arbitrary vhost-user messages (with fds attached on request)
//! to the block daemon's message handler after a valid handshake. The body is
//! shared with the stable smoke test:
//! `outboard_tests::fuzz_blk::vhost_user_messages`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    outboard_tests::fuzz_blk::vhost_user_messages(data);
});
