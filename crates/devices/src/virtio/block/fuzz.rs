//! One entry point for fuzzing the virtqueue and virtio-blk request parsing with arbitrary
//! bytes: the bytes become guest memory holding a queue (descriptor table, available ring,
//! buffers) and the queue is processed against a small in-memory disk. Used by the
//! cargo-fuzz target in `fuzz/` and, with pseudo-random inputs, by a unit test in CI.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::request::{Disk, process_queue};
use crate::virtio::GuestMemory;

/// Guest memory size for one run.
pub const MEM_SIZE: usize = 0x10000;
const DESC_TABLE: u64 = 0x0;
const AVAIL_RING: u64 = 0x1000;
const USED_RING: u64 = 0x2000;
const QUEUE_SIZE: u16 = 16;
const DISK_SECTORS: u64 = 16;

/// Processes the queue that `data` describes. Returns normally whatever the bytes are; a
/// panic (or a hang) is a bug.
pub fn block_queue(data: &[u8]) {
    let Ok(mem) = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]) else {
        return;
    };
    let n = data.len().min(MEM_SIZE);
    if mem.write_slice(&data[..n], GuestAddress(0)).is_err() {
        return;
    }
    // The used ring must be the device's to write: keep its index where the driver left it.
    let Ok(mut queue) = Queue::new(QUEUE_SIZE) else {
        return;
    };
    let setup = queue
        .try_set_desc_table_address(GuestAddress(DESC_TABLE))
        .and_then(|()| queue.try_set_avail_ring_address(GuestAddress(AVAIL_RING)))
        .and_then(|()| queue.try_set_used_ring_address(GuestAddress(USED_RING)));
    if setup.is_err() {
        return;
    }
    queue.set_ready(true);
    let read_only = data.first().is_some_and(|b| b & 1 == 1);
    let image = vec![0u8; (DISK_SECTORS * 512) as usize];
    let mut disk = Disk::new(
        image,
        DISK_SECTORS,
        read_only,
        *b"fuzz-disk\0\0\0\0\0\0\0\0\0\0\0",
    );
    let _ = process_queue(&mut disk, &mut queue, &mem);
}
