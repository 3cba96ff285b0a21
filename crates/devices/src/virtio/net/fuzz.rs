//! One entry point for fuzzing virtio-net's queue handling with arbitrary bytes: the bytes
//! become guest memory holding a receive and a transmit queue (descriptor tables, available
//! rings, buffers); the transmit queue is processed, then frames are delivered into the
//! receive queue. Used by the cargo-fuzz target in `fuzz/` and, with pseudo-random inputs, by
//! a unit test in CI.

use std::collections::VecDeque;
use std::io;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::frames::{BackendHeader, FrameIo, NetPort, Offloads, fill_rx, process_tx};
use crate::virtio::GuestMemory;

/// Guest memory size for one run.
pub const MEM_SIZE: usize = 0x10000;
/// (descriptor table, available ring, used ring) of the receive and transmit queues.
const RX_RINGS: [u64; 3] = [0x0, 0x1000, 0x2000];
const TX_RINGS: [u64; 3] = [0x3000, 0x4000, 0x5000];
const QUEUE_SIZE: u16 = 16;

/// A backend in memory: frames to deliver, frames sent.
#[derive(Default)]
pub struct MemoryBackend {
    pub inbound: VecDeque<Vec<u8>>,
    pub sent: Vec<Vec<u8>>,
}

impl FrameIo for MemoryBackend {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let frame = self
            .inbound
            .pop_front()
            .ok_or_else(|| io::Error::from(io::ErrorKind::WouldBlock))?;
        let n = frame.len().min(buf.len());
        buf[..n].copy_from_slice(&frame[..n]);
        Ok(n)
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        self.sent.push(frame.to_vec());
        Ok(())
    }
}

fn queue_at(rings: [u64; 3]) -> Option<Queue> {
    let mut q = Queue::new(QUEUE_SIZE).ok()?;
    q.try_set_desc_table_address(GuestAddress(rings[0])).ok()?;
    q.try_set_avail_ring_address(GuestAddress(rings[1])).ok()?;
    q.try_set_used_ring_address(GuestAddress(rings[2])).ok()?;
    q.set_ready(true);
    Some(q)
}

/// Processes the queues that `data` describes. Returns normally whatever the bytes are; a
/// panic (or a hang) is a bug.
pub fn net_queues(data: &[u8]) {
    let Ok(mem) = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]) else {
        return;
    };
    let n = data.len().min(MEM_SIZE);
    if mem.write_slice(&data[..n], GuestAddress(0)).is_err() {
        return;
    }
    let (Some(mut rx), Some(mut tx)) = (queue_at(RX_RINGS), queue_at(TX_RINGS)) else {
        return;
    };
    let mut backend = MemoryBackend::default();
    // Frames of several sizes, some larger than a small buffer, one a runt.
    for len in [60usize, 1514, 9000, 3, 64] {
        backend
            .inbound
            .push_back((0..len).map(|i| i as u8).collect());
    }
    // The first byte picks the header mode and offloads (it is also descriptor 0's address).
    let mode = data.first().copied().unwrap_or(0);
    let header = if mode & 1 == 0 {
        BackendHeader::None
    } else {
        BackendHeader::Vnet(Offloads {
            guest_csum: mode & 2 != 0,
            tx_csum: mode & 4 != 0,
            tx_tso: mode & 8 != 0,
        })
    };
    let mut port = NetPort::new(backend, header);
    let _ = process_tx(&mut port, &mut tx, &mem);
    let _ = fill_rx(&mut port, &mut rx, &mem);
    port.rx_buffers_added();
    let _ = fill_rx(&mut port, &mut rx, &mem);
}
