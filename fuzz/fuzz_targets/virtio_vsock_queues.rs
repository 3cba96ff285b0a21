//! Arbitrary bytes as guest memory holding the vsock receive and transmit queues, processed
//! by the vsock device's packet handling: must never panic or hang. CI runs the same entry
//! point with pseudo-random inputs (`random_rings_never_panic` in crates/devices).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vhpc_devices::virtio::vsock::fuzz::vsock_queues(data);
});
