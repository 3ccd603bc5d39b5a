//! Fuzz target: an RX and a TX virtqueue made of arbitrary bytes
//! (descriptor tables, available rings, buffers), arbitrary negotiated
//! features and arbitrary frames on the tap, processed by the net engines.
//! The body is shared with the stable smoke test:
//! `outboard_tests::fuzz_net::virtio_net_queues`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    outboard_tests::fuzz_net::virtio_net_queues(data);
});
