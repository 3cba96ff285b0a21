//! Crafted rings against real guest memory (vm-memory): well-formed requests work, malformed
//! ones get an error for that request or the device, never a panic.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

use super::fuzz;
use super::request::*;
use crate::test_utils::XorShift;
use crate::virtio::GuestMemory;

const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const SIZE: u16 = 16;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const HDR: u64 = 0x4000;
const DATA: u64 = 0x5000;
const STATUS: u64 = 0x8000;
const SECTORS: u64 = 64;

struct Rig {
    mem: GuestMemory,
    queue: Queue,
    disk: Disk<Vec<u8>>,
    avail: u16,
}

impl Rig {
    fn new(read_only: bool) -> Rig {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut queue = Queue::new(SIZE).unwrap();
        queue
            .try_set_desc_table_address(GuestAddress(DESC))
            .unwrap();
        queue
            .try_set_avail_ring_address(GuestAddress(AVAIL))
            .unwrap();
        queue.try_set_used_ring_address(GuestAddress(USED)).unwrap();
        queue.set_ready(true);
        let image = (0..SECTORS * 512).map(|i| (i / 512) as u8).collect();
        let disk = Disk::new(image, SECTORS, read_only, *b"test-id-123456789012");
        Rig {
            mem,
            queue,
            disk,
            avail: 0,
        }
    }

    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(DESC + 16 * u64::from(i));
        self.mem.write_obj(addr, at).unwrap();
        self.mem.write_obj(len, at.unchecked_add(8)).unwrap();
        self.mem.write_obj(flags, at.unchecked_add(12)).unwrap();
        self.mem.write_obj(next, at.unchecked_add(14)).unwrap();
    }

    /// A chain of (addr, len, writable) descriptors at table index 0.. with NEXT links.
    fn chain(&self, descs: &[(u64, u32, bool)]) {
        for (i, &(addr, len, w)) in descs.iter().enumerate() {
            let last = i + 1 == descs.len();
            let flags = if w { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            self.desc(i as u16, addr, len, flags, i as u16 + 1);
        }
    }

    fn header(&self, kind: u32, sector: u64) {
        self.mem.write_obj(kind, GuestAddress(HDR)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        self.mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
        self.mem.write_obj(0xaau8, GuestAddress(STATUS)).unwrap();
    }

    /// Makes head 0 available and processes the queue; returns (used len, status byte).
    fn run(&mut self) -> (u32, u8) {
        self.run_head(0).unwrap()
    }

    fn run_head(&mut self, head: u16) -> Result<(u32, u8), crate::virtio::QueueError> {
        let slot = AVAIL + 4 + 2 * u64::from(self.avail % SIZE);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail = self.avail.wrapping_add(1);
        self.mem
            .write_obj(self.avail, GuestAddress(AVAIL + 2))
            .unwrap();
        let used_before: u16 = self.mem.read_obj(GuestAddress(USED + 2)).unwrap();
        assert!(process_queue(&mut self.disk, &mut self.queue, &self.mem)?);
        let used_idx: u16 = self.mem.read_obj(GuestAddress(USED + 2)).unwrap();
        assert_eq!(used_idx, used_before.wrapping_add(1), "one chain used");
        let elem = USED + 4 + 8 * u64::from(used_before % SIZE);
        let len: u32 = self.mem.read_obj(GuestAddress(elem + 4)).unwrap();
        Ok((len, self.mem.read_obj(GuestAddress(STATUS)).unwrap()))
    }

    fn request(&mut self, kind: u32, sector: u64, data: &[(u64, u32, bool)]) -> (u32, u8) {
        self.header(kind, sector);
        let mut descs = vec![(HDR, 16, false)];
        descs.extend_from_slice(data);
        descs.push((STATUS, 1, true));
        self.chain(&descs);
        self.run()
    }
}

#[test]
fn write_then_read_back() {
    let mut r = Rig::new(false);
    r.mem
        .write_slice(&[0x5a; 1024], GuestAddress(DATA))
        .unwrap();
    let out = r.request(VIRTIO_BLK_T_OUT, 3, &[(DATA, 1024, false)]);
    assert_eq!(out, (1, VIRTIO_BLK_S_OK));
    assert!(r.disk.backend[3 * 512..5 * 512].iter().all(|&b| b == 0x5a));
    assert_eq!(r.disk.backend[5 * 512], 5, "nothing past the request");
    // Read sectors 4 and 5 in two descriptors.
    let read = r.request(
        VIRTIO_BLK_T_IN,
        4,
        &[(DATA + 0x1000, 512, true), (DATA + 0x2000, 512, true)],
    );
    assert_eq!(read, (1025, VIRTIO_BLK_S_OK));
    let mut a = [0u8; 512];
    r.mem
        .read_slice(&mut a, GuestAddress(DATA + 0x1000))
        .unwrap();
    assert_eq!(a, [0x5a; 512]);
    r.mem
        .read_slice(&mut a, GuestAddress(DATA + 0x2000))
        .unwrap();
    assert_eq!(a, [5; 512]);
}

#[test]
fn flush_get_id_and_unsupported() {
    let mut r = Rig::new(false);
    assert_eq!(r.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (1, VIRTIO_BLK_S_OK));
    let id = r.request(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 20, true)]);
    assert_eq!(id, (21, VIRTIO_BLK_S_OK));
    let mut got = [0u8; 20];
    r.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(&got, b"test-id-123456789012");
    // Discard (11) is not offered.
    assert_eq!(r.request(11, 0, &[]), (1, VIRTIO_BLK_S_UNSUPP));
}

#[test]
fn read_only_disk_rejects_writes() {
    let mut r = Rig::new(true);
    let out = r.request(VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, false)]);
    assert_eq!(out, (1, VIRTIO_BLK_S_IOERR));
    assert_eq!(r.disk.backend[0], 0);
    assert_eq!(
        r.request(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, true)]),
        (513, VIRTIO_BLK_S_OK)
    );
}

#[test]
fn out_of_range_sectors_and_addresses_are_io_errors() {
    let mut r = Rig::new(false);
    let past_end = r.request(VIRTIO_BLK_T_IN, SECTORS, &[(DATA, 512, true)]);
    assert_eq!(past_end, (1, VIRTIO_BLK_S_IOERR));
    let overflow = r.request(VIRTIO_BLK_T_IN, u64::MAX, &[(DATA, 512, true)]);
    assert_eq!(overflow, (1, VIRTIO_BLK_S_IOERR));
    let outside = r.request(VIRTIO_BLK_T_IN, 0, &[(0x10_0000_0000, 512, true)]);
    assert_eq!(outside, (1, VIRTIO_BLK_S_IOERR));
    let wraps = r.request(VIRTIO_BLK_T_OUT, 0, &[(u64::MAX - 10, 512, false)]);
    assert_eq!(wraps, (1, VIRTIO_BLK_S_IOERR));
    let partial = r.request(VIRTIO_BLK_T_IN, 0, &[(DATA, 100, true)]);
    assert_eq!(partial, (1, VIRTIO_BLK_S_IOERR));
}

#[test]
fn direction_mismatches_are_io_errors() {
    let mut r = Rig::new(false);
    // A read into a device-readable buffer, a write from a device-writable one.
    assert_eq!(
        r.request(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, false)]),
        (1, VIRTIO_BLK_S_IOERR)
    );
    assert_eq!(
        r.request(VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, true)]),
        (1, VIRTIO_BLK_S_IOERR)
    );
    assert_eq!(
        r.request(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 20, false)]),
        (1, VIRTIO_BLK_S_IOERR)
    );
}

#[test]
fn malformed_headers_and_status_are_returned_unused() {
    let mut r = Rig::new(false);
    // Header too short.
    r.header(VIRTIO_BLK_T_IN, 0);
    r.chain(&[(HDR, 8, false), (DATA, 512, true), (STATUS, 1, true)]);
    assert_eq!(r.run(), (0, 0xaa));
    // Header device-writable.
    r.chain(&[(HDR, 16, true), (DATA, 512, true), (STATUS, 1, true)]);
    assert_eq!(r.run(), (0, 0xaa));
    // Header outside guest memory.
    r.chain(&[(0xffff_fff8, 16, false), (STATUS, 1, true)]);
    assert_eq!(r.run(), (0, 0xaa));
    // Status device-readable, or zero-length.
    r.chain(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, false)]);
    assert_eq!(r.run(), (0, 0xaa));
    r.chain(&[(HDR, 16, false), (STATUS, 0, true)]);
    assert_eq!(r.run(), (0, 0xaa));
    // A lone descriptor.
    r.chain(&[(HDR, 16, false)]);
    assert_eq!(r.run(), (0, 0xaa));
    // Status outside guest memory: nothing to report into.
    r.chain(&[(HDR, 16, false), (0x10_0000_0000, 1, true)]);
    assert_eq!(r.run(), (0, 0xaa));
    // And the device still works afterwards.
    assert_eq!(r.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (1, VIRTIO_BLK_S_OK));
}

#[test]
fn zero_length_data_is_an_empty_transfer() {
    let mut r = Rig::new(false);
    assert_eq!(
        r.request(VIRTIO_BLK_T_IN, 0, &[(DATA, 0, true)]),
        (1, VIRTIO_BLK_S_OK)
    );
}

#[test]
fn loops_and_bad_indices_end() {
    let mut r = Rig::new(false);
    r.header(VIRTIO_BLK_T_IN, 0);
    // 0 -> 1 -> 0 -> ...: the chain is cut at the queue size (16 descriptors), then judged:
    // the last one (a data buffer) serves as status, and a read-only header among the data
    // buffers makes it IOERR.
    r.desc(0, HDR, 16, F_NEXT, 1);
    r.desc(1, DATA, 512, F_NEXT | F_WRITE, 0);
    assert_eq!(r.run(), (1, 0xaa));
    assert_eq!(
        r.mem.read_obj::<u8>(GuestAddress(DATA)).unwrap(),
        VIRTIO_BLK_S_IOERR
    );
    // next points outside the table: the chain ends there.
    r.desc(0, HDR, 16, F_NEXT, 999);
    assert_eq!(r.run(), (0, 0xaa));
    // A head index outside the table: no chain at all; the ring stays usable.
    let head = r.run_head(999);
    assert!(head.is_err() || head.unwrap().0 == 0);
}

#[test]
fn a_runaway_avail_index_is_a_device_error() {
    let mut r = Rig::new(false);
    r.mem.write_obj(500u16, GuestAddress(AVAIL + 2)).unwrap();
    assert!(process_queue(&mut r.disk, &mut r.queue, &r.mem).is_err());
}

#[test]
fn used_ring_outside_memory_is_a_device_error() {
    let mut r = Rig::new(false);
    r.queue
        .try_set_used_ring_address(GuestAddress(0x10_0000))
        .unwrap();
    r.header(VIRTIO_BLK_T_FLUSH, 0);
    r.chain(&[(HDR, 16, false), (STATUS, 1, true)]);
    r.mem.write_obj(0u16, GuestAddress(AVAIL + 4)).unwrap();
    r.mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
    assert!(process_queue(&mut r.disk, &mut r.queue, &r.mem).is_err());
}

/// The fuzz target's entry point with pseudo-random inputs: raw noise, and noise shaped like
/// a ring (small descriptor indices, addresses inside memory, plausible flags and types).
#[test]
fn fuzz_entry_point_survives_pseudo_random_rings() {
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    for round in 0..400 {
        let len = (rng.next() % fuzz::MEM_SIZE as u64) as usize;
        let mut data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        if round % 2 == 1 && data.len() > 0x1100 {
            for i in 0..16usize {
                let at = i * 16;
                let addr = (0x4000 + (rng.next() % 0xc000)) & !0x1ff;
                let len = [0u32, 1, 16, 512, 1024, 0xffff_ffff][(rng.next() % 6) as usize];
                let flags = (rng.next() % 8) as u16;
                let next = (rng.next() % 20) as u16;
                data[at..at + 8].copy_from_slice(&addr.to_le_bytes());
                data[at + 8..at + 12].copy_from_slice(&len.to_le_bytes());
                data[at + 12..at + 14].copy_from_slice(&flags.to_le_bytes());
                data[at + 14..at + 16].copy_from_slice(&next.to_le_bytes());
            }
            let idx = (rng.next() % 20) as u16;
            data[0x1002..0x1004].copy_from_slice(&idx.to_le_bytes());
            for slot in 0..16usize {
                let head = (rng.next() % 18) as u16;
                data[0x1004 + 2 * slot..0x1006 + 2 * slot].copy_from_slice(&head.to_le_bytes());
            }
        }
        fuzz::block_queue(&data);
    }
}
