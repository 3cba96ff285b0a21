//! One entry point for fuzzing the vsock queues and packet handling with arbitrary bytes: the
//! bytes become guest memory holding the receive and transmit queues (descriptor tables,
//! available rings, buffers), and the device's work runs against a muxer whose listening
//! socket is in the abstract namespace (nothing on disk) and whose port sockets do not exist
//! (every guest connect is reset). Used by the cargo-fuzz target in `fuzz/` and, with
//! pseudo-random inputs, by a unit test.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::muxer::Muxer;
use super::packet::MAX_PAYLOAD;
use super::rings;
use crate::virtio::GuestMemory;

pub const MEM_SIZE: usize = 0x10000;
/// (descriptor table, available ring, used ring) of the receive and transmit queues.
const RINGS: [(u64, u64, u64); 2] = [(0x0, 0x800, 0x1000), (0x2000, 0x2800, 0x3000)];
const QUEUE_SIZE: u16 = 16;
const GUEST_CID: u64 = 3;

/// Runs the device's work on the queues `data` describes. Returns normally whatever the
/// bytes are; a panic (or a hang) is a bug.
pub fn vsock_queues(data: &[u8]) {
    static RUN: AtomicU64 = AtomicU64::new(0);
    let Ok(mem) = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]) else {
        return;
    };
    let n = data.len().min(MEM_SIZE);
    if mem.write_slice(&data[..n], GuestAddress(0)).is_err() {
        return;
    }
    let mut queues = Vec::new();
    for (desc, avail, used) in RINGS {
        let Ok(mut q) = Queue::new(QUEUE_SIZE) else {
            return;
        };
        let setup = q
            .try_set_desc_table_address(GuestAddress(desc))
            .and_then(|()| q.try_set_avail_ring_address(GuestAddress(avail)))
            .and_then(|()| q.try_set_used_ring_address(GuestAddress(used)));
        if setup.is_err() {
            return;
        }
        q.set_ready(true);
        queues.push(q);
    }
    let name = format!(
        "vhpc-vsock-fuzz-{}-{}",
        std::process::id(),
        RUN.fetch_add(1, Ordering::Relaxed)
    );
    let Ok(addr) = SocketAddr::from_abstract_name(name.as_bytes()) else {
        return;
    };
    let Ok(listener) = UnixListener::bind_addr(&addr) else {
        return;
    };
    let Ok(mut muxer) = Muxer::new(GUEST_CID, Path::new("/nonexistent/vhpc-fuzz"), listener) else {
        return;
    };
    let mut scratch = vec![0u8; MAX_PAYLOAD as usize];
    // Twice: the second pass sees the used rings the first one wrote.
    for _ in 0..2 {
        if rings::exchange(&mut muxer, &mut queues, &mem, &mut scratch, GUEST_CID).is_err() {
            return;
        }
    }
}
