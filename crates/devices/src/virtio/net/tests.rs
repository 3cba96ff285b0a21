//! Crafted rings against real guest memory (vm-memory) and an in-memory backend: frames go
//! both ways intact, the header is right, malformed chains are returned and logged, the
//! receive side stops reading the backend when the guest has no buffers.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

use super::device::{NetHandler, RX_QUEUE, TX_QUEUE};
use super::frames::*;
use super::fuzz::{self, MemoryBackend};
use crate::test_utils::XorShift;
use crate::virtio::{GuestMemory, QueueHandler};

const SIZE: u16 = 16;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
/// (descriptor table, available ring, used ring) per queue.
const RINGS: [[u64; 3]; 2] = [[0x0, 0x1000, 0x2000], [0x3000, 0x4000, 0x5000]];
const BUF: u64 = 0x10000;

struct Rig {
    mem: GuestMemory,
    queues: Vec<Queue>,
    avail: [u16; 2],
    handler: NetHandler<MemoryBackend>,
}

impl Rig {
    fn new() -> Rig {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x40000)]).unwrap();
        let queues = RINGS
            .iter()
            .map(|r| {
                let mut q = Queue::new(SIZE).unwrap();
                q.try_set_desc_table_address(GuestAddress(r[0])).unwrap();
                q.try_set_avail_ring_address(GuestAddress(r[1])).unwrap();
                q.try_set_used_ring_address(GuestAddress(r[2])).unwrap();
                q.set_ready(true);
                q
            })
            .collect();
        let port = NetPort::new(MemoryBackend::default(), BackendHeader::None);
        Rig {
            mem,
            queues,
            avail: [0, 0],
            handler: NetHandler::new(port, -1),
        }
    }

    fn backend(&mut self) -> &mut MemoryBackend {
        &mut self.handler.port.backend
    }

    /// Writes descriptor `i` of queue `q`.
    fn desc(&self, q: usize, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(RINGS[q][0] + 16 * u64::from(i));
        self.mem.write_obj(addr, at).unwrap();
        self.mem.write_obj(len, at.unchecked_add(8)).unwrap();
        self.mem.write_obj(flags, at.unchecked_add(12)).unwrap();
        self.mem.write_obj(next, at.unchecked_add(14)).unwrap();
    }

    /// A chain of (addr, len, writable) descriptors from table index `first`, made available.
    fn post(&mut self, q: usize, first: u16, descs: &[(u64, u32, bool)]) {
        for (k, &(addr, len, w)) in descs.iter().enumerate() {
            let i = first + k as u16;
            let last = k + 1 == descs.len();
            let flags = if w { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            self.desc(q, i, addr, len, flags, i + 1);
        }
        let slot = RINGS[q][1] + 4 + 2 * u64::from(self.avail[q] % SIZE);
        self.mem.write_obj(first, GuestAddress(slot)).unwrap();
        self.avail[q] = self.avail[q].wrapping_add(1);
        self.mem
            .write_obj(self.avail[q], GuestAddress(RINGS[q][1] + 2))
            .unwrap();
    }

    /// The guest's notification of queue `q` (what the worker does on its eventfd).
    fn kick(&mut self, q: usize) -> bool {
        self.handler
            .process(q, &mut self.queues[q], &self.mem)
            .unwrap()
    }

    /// The backend fd turned readable.
    fn backend_ready(&mut self) -> Vec<usize> {
        self.handler
            .backend_ready(0, &mut self.queues, &self.mem)
            .unwrap()
    }

    fn used_idx(&self, q: usize) -> u16 {
        self.mem.read_obj(GuestAddress(RINGS[q][2] + 2)).unwrap()
    }

    /// (head, len) of used element `n` of queue `q`.
    fn used(&self, q: usize, n: u16) -> (u32, u32) {
        let at = RINGS[q][2] + 4 + 8 * u64::from(n % SIZE);
        (
            self.mem.read_obj(GuestAddress(at)).unwrap(),
            self.mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect()
}

/// A transmit buffer: zero header then `frame`, written at `addr`.
fn tx_buffer(r: &Rig, addr: u64, frame: &[u8]) {
    r.mem
        .write_slice(&[0; HDR_LEN], GuestAddress(addr))
        .unwrap();
    r.mem
        .write_slice(frame, GuestAddress(addr + HDR_LEN as u64))
        .unwrap();
}

#[test]
fn transmit_strips_the_header_whatever_the_split() {
    let mut r = Rig::new();
    let f = frame(1514, 1);
    tx_buffer(&r, BUF, &f);
    // Header and frame in one descriptor (how Linux sends with VERSION_1).
    r.post(TX_QUEUE, 0, &[(BUF, (HDR_LEN + f.len()) as u32, false)]);
    // The same bytes split in three, across the header boundary.
    r.post(
        TX_QUEUE,
        1,
        &[
            (BUF, 5, false),
            (BUF + 5, 100, false),
            (BUF + 105, 1421, false),
        ],
    );
    assert!(r.kick(TX_QUEUE));
    assert_eq!(r.used_idx(TX_QUEUE), 2);
    assert_eq!(
        r.used(TX_QUEUE, 0),
        (0, 0),
        "nothing written into a TX buffer"
    );
    assert_eq!(r.used(TX_QUEUE, 1), (1, 0));
    assert_eq!(r.backend().sent, vec![f.clone(), f]);
    assert_eq!(r.handler.port.stats.tx_frames, 2);
}

#[test]
fn malformed_transmit_chains_are_returned_unsent() {
    let mut r = Rig::new();
    let f = frame(100, 2);
    tx_buffer(&r, BUF, &f);
    let full = (HDR_LEN + f.len()) as u32;
    // A device-writable descriptor in a TX chain.
    r.post(TX_QUEUE, 0, &[(BUF, 12, false), (BUF + 12, 100, true)]);
    // Header only, no Ethernet header.
    r.post(TX_QUEUE, 2, &[(BUF, 20, false)]);
    // Outside guest memory, and wrapping the address space.
    r.post(TX_QUEUE, 3, &[(0x10_0000_0000, full, false)]);
    r.post(TX_QUEUE, 4, &[(u64::MAX - 4, full, false)]);
    // Longer than any frame (two huge descriptors would overflow a naive sum).
    r.post(
        TX_QUEUE,
        5,
        &[(BUF, u32::MAX, false), (BUF, u32::MAX, false)],
    );
    assert!(r.kick(TX_QUEUE));
    assert_eq!(r.used_idx(TX_QUEUE), 5, "every chain returned");
    for n in 0..5 {
        assert_eq!(r.used(TX_QUEUE, n).1, 0);
    }
    assert!(r.backend().sent.is_empty());
    assert_eq!(r.handler.port.stats.tx_dropped, 5);
    // Offloads nobody negotiated: a checksum left to the device, a GSO frame.
    r.mem
        .write_obj(HDR_F_NEEDS_CSUM, GuestAddress(BUF))
        .unwrap();
    r.post(TX_QUEUE, 6, &[(BUF, full, false)]);
    r.mem.write_obj(0u8, GuestAddress(BUF)).unwrap();
    r.mem.write_obj(1u8, GuestAddress(BUF + 1)).unwrap();
    r.post(TX_QUEUE, 7, &[(BUF, full, false)]);
    assert!(r.kick(TX_QUEUE));
    assert!(r.backend().sent.is_empty());
    // And a good frame still goes out afterwards.
    tx_buffer(&r, BUF, &f);
    r.post(TX_QUEUE, 8, &[(BUF, full, false)]);
    assert!(r.kick(TX_QUEUE));
    assert_eq!(r.backend().sent, vec![f]);
}

#[test]
fn receive_writes_header_and_frame() {
    let mut r = Rig::new();
    let f = frame(60, 3);
    r.backend().inbound.push_back(f.clone());
    r.mem.write_slice(&[0xee; 64], GuestAddress(BUF)).unwrap();
    // One buffer split in two descriptors.
    r.post(RX_QUEUE, 0, &[(BUF, 30, true), (BUF + 30, 1600, true)]);
    assert_eq!(r.backend_ready(), vec![RX_QUEUE]);
    assert_eq!(r.used_idx(RX_QUEUE), 1);
    assert_eq!(r.used(RX_QUEUE, 0), (0, (HDR_LEN + f.len()) as u32));
    let mut hdr = [0u8; HDR_LEN];
    hdr[10] = 1; // num_buffers
    assert_eq!(r.read(BUF, HDR_LEN), hdr);
    assert_eq!(r.read(BUF + HDR_LEN as u64, f.len()), f);
    assert_eq!(r.handler.port.stats.rx_frames, 1);
}

#[test]
fn no_receive_buffers_stops_watching_the_backend_until_some_are_posted() {
    let mut r = Rig::new();
    let frames: Vec<_> = (0..3).map(|i| frame(100 + i, i as u8)).collect();
    r.backend().inbound.extend(frames.iter().cloned());
    assert!(r.handler.backend_wanted(0));
    // A frame arrives, the guest has no buffer: keep it, stop watching.
    assert!(r.backend_ready().is_empty());
    assert!(
        !r.handler.backend_wanted(0),
        "no busy loop on a readable TAP"
    );
    assert_eq!(
        r.backend().inbound.len(),
        2,
        "one frame read and held, not dropped"
    );
    // The guest posts two buffers and notifies: the held frame and the next are delivered.
    r.post(RX_QUEUE, 0, &[(BUF, 2048, true)]);
    r.post(RX_QUEUE, 1, &[(BUF + 0x1000, 2048, true)]);
    assert!(r.kick(RX_QUEUE));
    assert_eq!(r.used_idx(RX_QUEUE), 2);
    assert_eq!(r.read(BUF + HDR_LEN as u64, 100), frames[0]);
    assert_eq!(r.read(BUF + 0x1000 + HDR_LEN as u64, 101), frames[1]);
    assert!(
        !r.handler.backend_wanted(0),
        "third frame waits for a buffer"
    );
    r.post(RX_QUEUE, 2, &[(BUF + 0x2000, 2048, true)]);
    assert!(r.kick(RX_QUEUE));
    assert_eq!(r.read(BUF + 0x2000 + HDR_LEN as u64, 102), frames[2]);
    // Backend empty, a buffer left over: watching again.
    r.post(RX_QUEUE, 3, &[(BUF + 0x3000, 2048, true)]);
    assert!(!r.kick(RX_QUEUE));
    assert!(r.handler.backend_wanted(0));
    assert_eq!(r.handler.port.stats.rx_dropped, 0);
}

#[test]
fn malformed_receive_chains_are_returned_and_the_frame_kept() {
    let mut r = Rig::new();
    let f = frame(200, 4);
    r.backend().inbound.push_back(f.clone());
    // Device-readable, then outside memory, then a good one.
    r.post(RX_QUEUE, 0, &[(BUF, 2048, false)]);
    r.post(RX_QUEUE, 1, &[(0x10_0000_0000, 2048, true)]);
    r.post(RX_QUEUE, 2, &[(BUF, 2048, true)]);
    assert_eq!(r.backend_ready(), vec![RX_QUEUE]);
    assert_eq!(r.used_idx(RX_QUEUE), 3);
    assert_eq!(r.used(RX_QUEUE, 0), (0, 0));
    assert_eq!(r.used(RX_QUEUE, 1), (1, 0));
    assert_eq!(r.used(RX_QUEUE, 2), (2, (HDR_LEN + f.len()) as u32));
    assert_eq!(r.read(BUF + HDR_LEN as u64, f.len()), f);
}

#[test]
fn a_frame_larger_than_the_buffers_is_dropped_not_stuck() {
    let mut r = Rig::new();
    let big = frame(9000, 5);
    let small = frame(64, 6);
    r.backend().inbound.extend([big, small.clone()]);
    r.post(RX_QUEUE, 0, &[(BUF, 1526, true)]);
    r.post(RX_QUEUE, 1, &[(BUF + 0x1000, 1526, true)]);
    assert_eq!(r.backend_ready(), vec![RX_QUEUE]);
    assert_eq!(
        r.used(RX_QUEUE, 0),
        (0, 0),
        "the 9000-byte frame fits no buffer"
    );
    assert_eq!(r.used(RX_QUEUE, 1), (1, (HDR_LEN + 64) as u32));
    assert_eq!(r.read(BUF + 0x1000 + HDR_LEN as u64, 64), small);
    assert_eq!(r.handler.port.stats.rx_dropped, 1);
}

#[test]
fn a_receive_queue_not_set_up_blocks_instead_of_spinning() {
    let mut r = Rig::new();
    r.backend().inbound.push_back(frame(60, 7));
    r.queues[RX_QUEUE].set_ready(false);
    assert!(r.backend_ready().is_empty());
    assert!(!r.handler.backend_wanted(0));
}

#[test]
fn a_runaway_avail_index_is_a_device_error() {
    let mut r = Rig::new();
    r.mem
        .write_obj(500u16, GuestAddress(RINGS[TX_QUEUE][1] + 2))
        .unwrap();
    assert!(
        r.handler
            .process(TX_QUEUE, &mut r.queues[TX_QUEUE], &r.mem)
            .is_err()
    );
    r.backend().inbound.push_back(frame(60, 8));
    r.mem
        .write_obj(500u16, GuestAddress(RINGS[RX_QUEUE][1] + 2))
        .unwrap();
    assert!(r.handler.backend_ready(0, &mut r.queues, &r.mem).is_err());
}

fn vnet(guest_csum: bool, tx_csum: bool, tx_tso: bool) -> NetHandler<MemoryBackend> {
    let o = Offloads {
        guest_csum,
        tx_csum,
        tx_tso,
    };
    NetHandler::new(
        NetPort::new(MemoryBackend::default(), BackendHeader::Vnet(o)),
        -1,
    )
}

#[test]
fn a_backend_with_the_header_gets_and_gives_it_unchanged() {
    let mut r = Rig::new();
    r.handler = vnet(true, true, true);
    let f = frame(80, 9);
    tx_buffer(&r, BUF, &f);
    // A TSO frame whose checksum is left to the device: both accepted by the driver.
    r.mem
        .write_slice(
            &[
                HDR_F_NEEDS_CSUM,
                HDR_GSO_TCPV4,
                54,
                0,
                0xa8,
                5,
                34,
                0,
                16,
                0,
            ],
            GuestAddress(BUF),
        )
        .unwrap();
    r.post(TX_QUEUE, 0, &[(BUF, (HDR_LEN + f.len()) as u32, false)]);
    assert!(r.kick(TX_QUEUE));
    let sent = r.backend().sent[0].clone();
    assert_eq!(sent.len(), HDR_LEN + f.len());
    assert_eq!(
        &sent[..10],
        &[
            HDR_F_NEEDS_CSUM,
            HDR_GSO_TCPV4,
            54,
            0,
            0xa8,
            5,
            34,
            0,
            16,
            0
        ]
    );
    assert_eq!(&sent[HDR_LEN..], f.as_slice());
    // Received with DATA_VALID set: kept for a driver with GUEST_CSUM, num_buffers made 1.
    let mut with_hdr = vec![HDR_F_DATA_VALID, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];
    with_hdr.extend_from_slice(&f);
    r.backend().inbound.push_back(with_hdr);
    r.post(RX_QUEUE, 0, &[(BUF + 0x1000, 2048, true)]);
    assert_eq!(r.backend_ready(), vec![RX_QUEUE]);
    let got = r.read(BUF + 0x1000, HDR_LEN + f.len());
    assert_eq!(got[0], HDR_F_DATA_VALID);
    assert_eq!(&got[10..12], &[1, 0]);
    assert_eq!(&got[HDR_LEN..], f.as_slice());
}

#[test]
fn offloads_the_driver_did_not_accept_are_refused_or_cleared() {
    let mut r = Rig::new();
    r.handler = vnet(false, true, false);
    let f = frame(80, 10);
    let full = (HDR_LEN + f.len()) as u32;
    tx_buffer(&r, BUF, &f);
    // Checksum offload accepted, TSO not: a TSO frame is refused, a NEEDS_CSUM one goes.
    r.mem
        .write_slice(&[HDR_F_NEEDS_CSUM, HDR_GSO_TCPV6], GuestAddress(BUF))
        .unwrap();
    r.post(TX_QUEUE, 0, &[(BUF, full, false)]);
    assert!(r.kick(TX_QUEUE));
    assert!(r.backend().sent.is_empty());
    // UDP fragmentation (3) and the ECN bit are never offered.
    for gso in [3u8, HDR_GSO_ECN] {
        r.mem.write_slice(&[0, gso], GuestAddress(BUF)).unwrap();
        r.post(TX_QUEUE, 0, &[(BUF, full, false)]);
        assert!(r.kick(TX_QUEUE));
    }
    assert!(r.backend().sent.is_empty());
    assert_eq!(r.handler.port.stats.tx_dropped, 3);
    r.mem
        .write_slice(&[HDR_F_NEEDS_CSUM, HDR_GSO_NONE], GuestAddress(BUF))
        .unwrap();
    r.post(TX_QUEUE, 0, &[(BUF, full, false)]);
    assert!(r.kick(TX_QUEUE));
    assert_eq!(r.backend().sent.len(), 1);
    // Without GUEST_CSUM the driver gets no checksum flags, whatever the backend says.
    let mut with_hdr = vec![HDR_F_DATA_VALID; 1];
    with_hdr.extend_from_slice(&[0; HDR_LEN - 1]);
    with_hdr.extend_from_slice(&f);
    r.backend().inbound.push_back(with_hdr);
    r.post(RX_QUEUE, 0, &[(BUF + 0x1000, 2048, true)]);
    assert_eq!(r.backend_ready(), vec![RX_QUEUE]);
    assert_eq!(r.read(BUF + 0x1000, 1), [0]);
    // And a plain backend refuses any offload request.
    let mut p = Rig::new();
    tx_buffer(&p, BUF, &f);
    p.mem
        .write_obj(HDR_F_NEEDS_CSUM, GuestAddress(BUF))
        .unwrap();
    p.post(TX_QUEUE, 0, &[(BUF, full, false)]);
    assert!(p.kick(TX_QUEUE));
    assert!(p.backend().sent.is_empty());
}

/// The fuzz target's entry point with pseudo-random inputs: raw noise, and noise shaped like
/// rings (small indices, addresses inside memory, plausible flags).
#[test]
fn fuzz_entry_point_survives_pseudo_random_rings() {
    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
    for round in 0..400 {
        let len = (rng.next() % fuzz::MEM_SIZE as u64) as usize;
        let mut data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        if round % 2 == 1 && data.len() > 0x4100 {
            for table in [0x0usize, 0x3000] {
                for i in 0..16usize {
                    let at = table + i * 16;
                    let addr = (0x6000 + (rng.next() % 0xa000)) & !0xff;
                    let len = [0u32, 1, 12, 60, 1526, 0xffff_ffff][(rng.next() % 6) as usize];
                    let flags = (rng.next() % 8) as u16;
                    let next = (rng.next() % 20) as u16;
                    data[at..at + 8].copy_from_slice(&addr.to_le_bytes());
                    data[at + 8..at + 12].copy_from_slice(&len.to_le_bytes());
                    data[at + 12..at + 14].copy_from_slice(&flags.to_le_bytes());
                    data[at + 14..at + 16].copy_from_slice(&next.to_le_bytes());
                }
                let avail = table + 0x1000;
                let idx = (rng.next() % 20) as u16;
                data[avail + 2..avail + 4].copy_from_slice(&idx.to_le_bytes());
                for slot in 0..16usize {
                    let head = (rng.next() % 18) as u16;
                    let at = avail + 4 + 2 * slot;
                    data[at..at + 2].copy_from_slice(&head.to_le_bytes());
                }
            }
        }
        fuzz::net_queues(&data);
    }
}

#[test]
fn the_tap_gets_only_the_offloads_the_driver_accepted() {
    use super::device::negotiated_offloads;
    use virtio_bindings::virtio_net as vn;
    let bits = |list: &[u32]| list.iter().fold(0u64, |f, b| f | 1 << b);
    let (o, tun) = negotiated_offloads(0);
    assert_eq!((o, tun), (Offloads::default(), 0));
    let all = bits(&[
        vn::VIRTIO_NET_F_CSUM,
        vn::VIRTIO_NET_F_GUEST_CSUM,
        vn::VIRTIO_NET_F_GUEST_TSO4,
        vn::VIRTIO_NET_F_GUEST_TSO6,
        vn::VIRTIO_NET_F_HOST_TSO4,
    ]);
    let (o, tun) = negotiated_offloads(all);
    assert!(o.guest_csum && o.tx_csum && o.tx_tso);
    assert_eq!(tun, libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6);
    // TSO without GUEST_CSUM (a driver the spec forbids): no segmented frames for it.
    let (_, tun) = negotiated_offloads(bits(&[vn::VIRTIO_NET_F_GUEST_TSO4]));
    assert_eq!(tun, 0);
}
