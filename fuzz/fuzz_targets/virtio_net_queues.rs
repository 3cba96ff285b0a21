//! Arbitrary bytes as guest memory holding virtio-net's receive and transmit queues, processed
//! against an in-memory backend: must never panic or hang. CI runs the same entry point with
//! pseudo-random inputs (`virtio::net::tests::fuzz_entry_point_survives_pseudo_random_rings`
//! in crates/devices).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vhpc_devices::virtio::net::fuzz::net_queues(data);
});
