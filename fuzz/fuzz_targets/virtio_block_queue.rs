//! Arbitrary bytes as guest memory holding a virtqueue, processed by virtio-blk: must never
//! panic or hang. CI runs the same entry point with pseudo-random inputs
//! (`fuzz_entry_point_survives_pseudo_random_rings` in crates/devices).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vhpc_devices::virtio::block::fuzz::block_queue(data);
});
