//! Save → restore of a virtio-blk device on the virtio-pci transport, driven like a driver
//! would through its registers, with crafted rings in real guest memory: the restored device
//! continues at the saved queue positions, serves a request made available before the
//! checkpoint, routes its MSI-X vectors again; damaged states are refused.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::*;
use crate::pci::PciDevice;
use crate::pci::msix::{MsiMessage, MsiRouter, MsixVectors};
use crate::persist::{DeviceState, PersistError};
use crate::test_utils::XorShift;
use crate::virtio::GuestMemory;
use crate::virtio::block::Block;

const BAR: u64 = 0xc000_0000;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const HDR: u64 = 0x4000;
const DATA: u64 = 0x5000;
const STATUS: u64 = 0x6000;
const QSIZE: u16 = 16;

#[derive(Default)]
struct Routes(Mutex<Vec<(u32, MsiMessage)>>);

impl MsiRouter for Routes {
    fn route(&self, gsi: u32, message: MsiMessage) -> std::io::Result<()> {
        self.0.lock().unwrap().push((gsi, message));
        Ok(())
    }
}

struct Rig {
    mem: GuestMemory,
    image: tempfile::NamedTempFile,
}

impl Rig {
    fn new() -> Rig {
        let image = tempfile::NamedTempFile::new().unwrap();
        image.as_file().set_len(64 * 512).unwrap();
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        Rig { mem, image }
    }

    fn device(&self) -> (VirtioPciDevice, Arc<Routes>) {
        let block = Block::open(self.image.path(), false, "disk").unwrap();
        let routes = Arc::new(Routes::default());
        let fds = (0..2)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let msix = Arc::new(MsixVectors::new(fds, vec![24, 25], routes.clone()));
        let dev = VirtioPciDevice::new("blk".into(), Box::new(block), self.mem.clone(), BAR, msix)
            .unwrap();
        (dev, routes)
    }

    /// A write request of one sector (`byte` repeated) in descriptors 3*slot.., published as
    /// avail entry `slot` (avail idx becomes slot + 1).
    fn publish_write(&self, slot: u16, sector: u64, byte: u8) {
        let off = 0x100 * u64::from(slot);
        let head = 3 * slot;
        let descs = [
            (HDR + off, 16u32, 1u16, head + 1),
            (DATA + 0x200 * u64::from(slot), 512, 1, head + 2),
            (STATUS + off, 1, 2, 0),
        ];
        self.mem.write_obj(1u32, GuestAddress(HDR + off)).unwrap(); // VIRTIO_BLK_T_OUT
        self.mem
            .write_obj(sector, GuestAddress(HDR + off + 8))
            .unwrap();
        let data = GuestAddress(DATA + 0x200 * u64::from(slot));
        self.mem.write_slice(&[byte; 512], data).unwrap();
        self.mem
            .write_obj(0xffu8, GuestAddress(STATUS + off))
            .unwrap();
        for (i, (addr, len, flags, next)) in descs.into_iter().enumerate() {
            let at = DESC + 16 * u64::from(head + i as u16);
            self.mem.write_obj(addr, GuestAddress(at)).unwrap();
            self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            self.mem.write_obj(next, GuestAddress(at + 14)).unwrap();
        }
        let ring = GuestAddress(AVAIL + 4 + 2 * u64::from(slot % QSIZE));
        self.mem.write_obj(head, ring).unwrap();
        self.mem
            .write_obj(slot + 1, GuestAddress(AVAIL + 2))
            .unwrap();
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    fn wait_used(&self, idx: u16) {
        let start = Instant::now();
        while self.used_idx() != idx {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "used idx {} never became {idx}",
                self.used_idx()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn sector(&self, sector: u64) -> Vec<u8> {
        let mut f = std::fs::File::open(self.image.path()).unwrap();
        let mut all = Vec::new();
        f.read_to_end(&mut all).unwrap();
        all[(sector * 512) as usize..(sector * 512 + 512) as usize].to_vec()
    }
}

fn common(dev: &mut VirtioPciDevice, offset: u64, value: u64, len: usize) {
    assert!(dev.mmio_write(BAR + offset, &value.to_le_bytes()[..len]));
}

/// What Linux's virtio_pci does up to DRIVER_OK, with MSI-X vector 1 for the queue.
fn drive_to_driver_ok(dev: &mut VirtioPciDevice) {
    dev.config_write(0x04, &[0x06, 0x00]); // memory decoding, bus master
    let msix_control = 0x40 + 2;
    dev.config_write(msix_control, &0x8000u16.to_le_bytes()); // MSI-X enable
    common(dev, 0x14, 0x03, 1); // ACKNOWLEDGE | DRIVER
    common(dev, 0x08, 0, 4);
    common(dev, 0x0c, 1 << 9, 4); // FLUSH
    common(dev, 0x08, 1, 4);
    common(dev, 0x0c, 1, 4); // VERSION_1
    common(dev, 0x14, 0x0b, 1); // FEATURES_OK
    common(dev, 0x16, 0, 2);
    common(dev, 0x18, u64::from(QSIZE), 2);
    common(dev, 0x1a, 1, 2);
    common(dev, 0x20, DESC, 8);
    common(dev, 0x28, AVAIL, 8);
    common(dev, 0x30, USED, 8);
    common(dev, 0x1c, 1, 2);
    // MSI-X table entry 1: address, data, unmasked.
    assert!(dev.mmio_write(BAR + 0x4000 + 16, &0xfee0_0000u32.to_le_bytes()));
    assert!(dev.mmio_write(BAR + 0x4000 + 24, &0x41u32.to_le_bytes()));
    assert!(dev.mmio_write(BAR + 0x4000 + 28, &0u32.to_le_bytes()));
    common(dev, 0x14, 0x0f, 1); // DRIVER_OK: the worker starts
}

fn notify(dev: &mut VirtioPciDevice) {
    assert!(dev.mmio_write(BAR + 0x3000, &0u16.to_le_bytes()));
}

fn decode(bytes: &[u8]) -> VirtioPciStateV1 {
    crate::persist::decode::<VirtioPciDevice>(bytes).unwrap()
}

#[test]
fn a_restored_device_continues_at_the_saved_queue_positions() {
    let rig = Rig::new();
    let (mut dev, _) = rig.device();
    drive_to_driver_ok(&mut dev);
    rig.publish_write(0, 1, 0xa1);
    notify(&mut dev);
    rig.wait_used(1);
    // Made available but not notified before the pause: no worker has taken it.
    rig.publish_write(1, 2, 0xb2);
    dev.pause();
    assert!(dev.save_state().is_ok(), "a paused device saves its state");
    let bytes = dev.save_state().unwrap();
    let saved = decode(&bytes);
    let queues = saved.queues.clone().expect("the device was started");
    assert_eq!((queues[0].next_avail, queues[0].next_used), (1, 1));
    assert_eq!(queues[0].desc_table, DESC);
    assert!(saved.msix.enabled);
    assert_eq!(saved.msix.entries[1], [0xfee0_0000, 0, 0x41, 0]);
    drop(dev); // the old VMM is gone

    let (mut fresh, routes) = rig.device();
    fresh.restore_state(1, &bytes).unwrap();
    assert_eq!(
        routes.0.lock().unwrap().as_slice(),
        &[(
            25,
            MsiMessage {
                address: 0xfee0_0000,
                data: 0x41
            }
        )],
        "vector 1 is routed again"
    );
    rig.wait_used(2); // the request made available before the checkpoint is served
    assert_eq!(rig.sector(1), vec![0xa1; 512]);
    assert_eq!(rig.sector(2), vec![0xb2; 512]);
    rig.publish_write(2, 3, 0xc3);
    notify(&mut fresh);
    rig.wait_used(3);
    assert_eq!(rig.sector(3), vec![0xc3; 512]);
    assert_eq!(
        rig.mem
            .read_obj::<u8>(GuestAddress(STATUS + 0x200))
            .unwrap(),
        0,
        "status OK"
    );

    fresh.pause();
    let again = decode(&fresh.save_state().unwrap());
    let q = again.queues.clone().unwrap();
    assert_eq!((q[0].next_avail, q[0].next_used), (3, 3));
    assert_eq!(again.config_space, saved.config_space);
    assert_eq!(again.common, saved.common);
    assert_eq!(again.msix, saved.msix);
    assert_eq!(again.backend, saved.backend);
    // A running device refuses to be saved (its queue positions are moving).
    fresh.resume();
    assert!(fresh.save_state().is_err());
}

#[test]
fn a_device_never_started_round_trips_without_queues() {
    let rig = Rig::new();
    let (mut dev, _) = rig.device();
    dev.config_write(0x04, &[0x02, 0x00]);
    common(&mut dev, 0x14, 0x03, 1);
    dev.pause();
    let bytes = dev.save_state().unwrap();
    assert_eq!(decode(&bytes).queues, None);
    let (mut fresh, routes) = rig.device();
    fresh.restore_state(1, &bytes).unwrap();
    assert!(routes.0.lock().unwrap().is_empty());
    assert_eq!(fresh.save_state().unwrap(), bytes);
    let mut status = [0u8];
    assert!(fresh.mmio_read(BAR + 0x14, &mut status));
    assert_eq!(status, [0x03]);
}

#[test]
fn damaged_or_foreign_states_are_refused() {
    let rig = Rig::new();
    let (mut dev, _) = rig.device();
    drive_to_driver_ok(&mut dev);
    dev.pause();
    let bytes = dev.save_state().unwrap();
    let good = decode(&bytes);
    let restore = |state: &VirtioPciStateV1| -> PersistError {
        let (mut fresh, _) = rig.device();
        let bytes = crate::persist::encode::<VirtioPciDevice>(state).unwrap();
        fresh.restore_state(1, &bytes).unwrap_err()
    };
    let mut cases: Vec<(&str, VirtioPciStateV1)> = Vec::new();
    let mut s = good.clone();
    s.queues.as_mut().unwrap()[0].used_ring = 0xffff_0000;
    cases.push(("used ring outside memory", s));
    let mut s = good.clone();
    s.queues.as_mut().unwrap()[0].size = 17;
    cases.push(("queue size not a power of two", s));
    let mut s = good.clone();
    let first = s.queues.as_ref().unwrap()[0];
    s.queues.as_mut().unwrap().push(first);
    cases.push(("extra queue", s));
    let mut s = good.clone();
    s.common.device_features ^= 1 << 5;
    cases.push(("other features", s));
    let mut s = good.clone();
    s.common.queues[0].msix_vector = 9;
    cases.push(("vector beyond the table", s));
    let mut s = good.clone();
    s.msix.entries.pop();
    cases.push(("short MSI-X table", s));
    let mut s = good.clone();
    s.config_space[2] ^= 0xff;
    cases.push(("another device ID", s));
    let mut s = good.clone();
    s.config_space.truncate(64);
    cases.push(("short config space", s));
    let mut s = good.clone();
    s.backend_version = 2;
    cases.push(("backend version", s));
    let mut s = good.clone();
    s.backend.truncate(3);
    cases.push(("short backend state", s));
    let mut s = good.clone();
    let mut block = crate::persist::decode::<Block>(&s.backend).unwrap();
    block.sectors += 1;
    s.backend = crate::persist::encode::<Block>(&block).unwrap();
    cases.push(("another disk size", s));
    for (what, state) in &cases {
        eprintln!("{what}: {}", restore(state));
    }
    let (mut fresh, _) = rig.device();
    assert!(fresh.restore_state(1, &bytes[..bytes.len() / 2]).is_err());
    assert!(fresh.restore_state(2, &bytes).is_err());
    // Pseudo-random damage: an error or a state that restores, never a panic.
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    for _ in 0..300 {
        let x = rng.next();
        let mut damaged = bytes.clone();
        let at = (x as usize) % damaged.len();
        damaged[at] ^= (x >> 32) as u8 | 1;
        let (mut fresh, _) = rig.device();
        let _ = fresh.restore_state(1, &damaged);
    }
}
