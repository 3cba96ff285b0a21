//! PCI: the root bus with a host bridge at 00:00.0, reached through the legacy configuration
//! mechanism #1 (address latch at port 0xCF8, data at 0xCFC..0xCFF), which Linux probes by
//! itself; and the dispatch of guest MMIO accesses to device BARs.
//!
//! - [`config_space`] a type-0 configuration header with 64-bit memory BARs and capabilities;
//! - [`msix`] the MSI-X table and PBA, and the [`msix::MsiRouter`] the VMM implements with KVM.
//!
//! One bus (bus 0), one function per device. The device list is fixed before the vCPUs start;
//! each device has its own lock, so vCPUs touching different devices never contend.

pub mod config_space;
pub mod msix;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::PioDevice;
use crate::persist::{DeviceState, Persist, PersistError};

/// The configuration address port (mechanism #1); the data window follows at 0xCFC.
pub const PCI_CONFIG_PORT: u16 = 0xcf8;
/// Address latch (4 bytes) and data window (4 bytes).
pub const PCI_CONFIG_PORT_LEN: u16 = 8;
/// Devices on bus 0 (slots 0..31); slot 0 is the host bridge.
pub const MAX_SLOTS: usize = 32;

/// A PCI function as the bus sees it. Offsets are bytes into the 256-byte config space; an
/// access never crosses a dword. Every function saves and restores its state
/// ([`DeviceState`]) for checkpoints.
pub trait PciDevice: Send + DeviceState {
    /// The vCPUs are paused: finish every request in flight and stop touching guest memory
    /// (a device with a worker thread stops it), so the state can be saved.
    fn pause(&mut self);
    /// Start working again after [`PciDevice::pause`] or after a restore.
    fn resume(&mut self);
    fn config_read(&mut self, offset: u16, data: &mut [u8]);
    fn config_write(&mut self, offset: u16, data: &[u8]);
    /// A guest read at guest-physical `addr`; false if none of the device's decoded BARs
    /// covers it.
    fn mmio_read(&mut self, addr: u64, data: &mut [u8]) -> bool;
    /// A guest write at guest-physical `addr`; false if no decoded BAR covers it.
    fn mmio_write(&mut self, addr: u64, data: &[u8]) -> bool;
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciError {
    #[error("PCI bus 0 is full ({MAX_SLOTS} slots); attach fewer devices")]
    Full,
}

struct Slot {
    device: Arc<Mutex<dyn PciDevice>>,
    poison_logged: AtomicBool,
}

impl Slot {
    fn lock(&self) -> MutexGuard<'_, dyn PciDevice + 'static> {
        self.device.lock().unwrap_or_else(|poisoned| {
            if !self.poison_logged.swap(true, Ordering::Relaxed) {
                log::warn!("a PCI device panicked earlier; continuing with its state");
            }
            poisoned.into_inner()
        })
    }
}

/// PCI bus 0: the host bridge in slot 0 and up to 31 devices.
pub struct PciBus {
    slots: Vec<Slot>,
    /// The last value written to port 0xCF8.
    address: AtomicU32,
}

impl Default for PciBus {
    fn default() -> Self {
        let bridge: Arc<Mutex<dyn PciDevice>> = Arc::new(Mutex::new(HostBridge::new()));
        PciBus {
            slots: vec![Slot {
                device: bridge,
                poison_logged: AtomicBool::new(false),
            }],
            address: AtomicU32::new(0),
        }
    }
}

impl PciBus {
    /// Puts `device` in the next free slot; returns the slot number.
    pub fn add(&mut self, device: Arc<Mutex<dyn PciDevice>>) -> Result<u8, PciError> {
        if self.slots.len() >= MAX_SLOTS {
            return Err(PciError::Full);
        }
        self.slots.push(Slot {
            device,
            poison_logged: AtomicBool::new(false),
        });
        Ok((self.slots.len() - 1) as u8)
    }

    /// The slot and register offset the latched address selects, if it names a function of
    /// ours (bus 0, function 0, enable bit set).
    fn selected(&self, byte: u16) -> Option<(&Slot, u16)> {
        let address = self.address.load(Ordering::Relaxed);
        let enabled = address & 0x8000_0000 != 0;
        let bus = (address >> 16) & 0xff;
        let slot = ((address >> 11) & 0x1f) as usize;
        let function = (address >> 8) & 0x7;
        if !enabled || bus != 0 || function != 0 {
            return None;
        }
        let offset = (address & 0xfc) as u16 + byte;
        self.slots.get(slot).map(|s| (s, offset))
    }

    /// A read of the config ports (offset 0..8 from 0xCF8).
    fn config_port_read(&self, offset: u16, data: &mut [u8]) {
        match offset {
            0..=3 => {
                let bytes = self.address.load(Ordering::Relaxed).to_le_bytes();
                copy_from(&bytes, offset as usize, data);
            }
            _ => match self.selected(offset - 4) {
                // A dword-aligned window: an access must not run past it.
                Some((slot, reg)) if (offset - 4) as usize + data.len() <= 4 => {
                    slot.lock().config_read(reg, data)
                }
                _ => data.fill(0xff),
            },
        }
    }

    fn config_port_write(&self, offset: u16, data: &[u8]) {
        match offset {
            // Only whole-dword writes latch an address (byte writes to 0xCF8..0xCFB are other
            // chipset registers on real hardware).
            0 if data.len() == 4 => {
                let mut bytes = [0u8; 4];
                bytes.copy_from_slice(data);
                self.address
                    .store(u32::from_le_bytes(bytes), Ordering::Relaxed);
            }
            4..=7 => {
                if let Some((slot, reg)) = self.selected(offset - 4)
                    && (offset - 4) as usize + data.len() <= 4
                {
                    slot.lock().config_write(reg, data);
                }
            }
            _ => {}
        }
    }

    /// The configuration address latch (port 0xCF8), for checkpoints.
    pub fn address_latch(&self) -> u32 {
        self.address.load(Ordering::Relaxed)
    }

    pub fn set_address_latch(&self, value: u32) {
        self.address.store(value, Ordering::Relaxed);
    }

    /// How many functions are on the bus (the host bridge included).
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Pauses every device (see [`PciDevice::pause`]).
    pub fn pause_devices(&self) {
        self.slots.iter().for_each(|s| s.lock().pause());
    }

    /// Resumes every device.
    pub fn resume_devices(&self) {
        self.slots.iter().for_each(|s| s.lock().resume());
    }

    /// Each function's (version, encoded state), in slot order; the devices must be paused.
    pub fn save_devices(&self) -> Result<Vec<(u32, Vec<u8>)>, PersistError> {
        self.slots
            .iter()
            .map(|s| {
                let d = s.lock();
                Ok((d.state_version(), d.save_state()?))
            })
            .collect()
    }

    /// Restores the function in `slot` from its saved (version, state).
    pub fn restore_device(
        &self,
        slot: usize,
        version: u32,
        bytes: &[u8],
    ) -> Result<(), PersistError> {
        let s = self.slots.get(slot).ok_or(PersistError::Mismatch {
            device: "PCI bus",
            detail: format!("no function in slot {slot}"),
        })?;
        s.lock().restore_state(version, bytes)
    }

    /// A guest MMIO read; false if no device's BAR covers `addr`.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        self.slots.iter().any(|s| s.lock().mmio_read(addr, data))
    }

    /// A guest MMIO write; false if no device's BAR covers `addr`.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        self.slots.iter().any(|s| s.lock().mmio_write(addr, data))
    }
}

/// Copies `bytes[offset..]` into `data` (as far as both reach), the rest of `data` zero.
pub(crate) fn copy_from(bytes: &[u8], offset: usize, data: &mut [u8]) {
    data.fill(0);
    if let Some(src) = bytes.get(offset..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

/// The config ports 0xCF8..0xCFF as a port-I/O device.
pub struct PciConfigIo(pub Arc<PciBus>);

impl PioDevice for PciConfigIo {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        self.0.config_port_read(offset, data);
    }
    fn write(&mut self, offset: u16, data: &[u8]) {
        self.0.config_port_write(offset, data);
    }
}

/// The host bridge at 00:00.0: a header with class "host bridge" and nothing else. Linux's
/// mechanism-#1 sanity check looks for one on bus 0 before it trusts the config ports.
struct HostBridge(config_space::ConfigSpace);

/// Red Hat's vendor ID with the generic host bridge device ID QEMU also uses.
const HOST_BRIDGE_VENDOR: u16 = 0x1b36;
const HOST_BRIDGE_DEVICE: u16 = 0x0008;
const CLASS_HOST_BRIDGE: u32 = 0x06_00_00;

impl HostBridge {
    fn new() -> Self {
        HostBridge(config_space::ConfigSpace::new(config_space::Header {
            vendor: HOST_BRIDGE_VENDOR,
            device: HOST_BRIDGE_DEVICE,
            revision: 0,
            class: CLASS_HOST_BRIDGE,
            subsystem_vendor: 0,
            subsystem: 0,
        }))
    }
}

/// The host bridge's config space: version 1.
impl Persist for HostBridge {
    type State = Vec<u8>;
    const VERSION: u32 = 1;
    const NAME: &'static str = "PCI host bridge";

    fn save(&self) -> Result<Vec<u8>, PersistError> {
        Ok(self.0.save())
    }

    fn restore(&mut self, state: Vec<u8>) -> Result<(), PersistError> {
        self.0
            .restore(&state)
            .map_err(|detail| PersistError::Mismatch {
                device: Self::NAME,
                detail,
            })
    }
}

impl PciDevice for HostBridge {
    fn pause(&mut self) {}
    fn resume(&mut self) {}

    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        self.0.read(offset, data);
    }
    fn config_write(&mut self, offset: u16, data: &[u8]) {
        self.0.write(offset, data);
    }
    fn mmio_read(&mut self, _: u64, _: &mut [u8]) -> bool {
        false
    }
    fn mmio_write(&mut self, _: u64, _: &[u8]) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn select(io: &mut PciConfigIo, slot: u32, reg: u32) {
        io.write(0, &(0x8000_0000 | (slot << 11) | reg).to_le_bytes());
    }

    fn read32(io: &mut PciConfigIo, slot: u32, reg: u32) -> u32 {
        select(io, slot, reg);
        let mut data = [0u8; 4];
        io.read(4, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn host_bridge_answers_and_empty_slots_read_all_ones() {
        let mut io = PciConfigIo(Arc::new(PciBus::default()));
        assert_eq!(read32(&mut io, 0, 0), 0x0008_1b36);
        assert_eq!(read32(&mut io, 0, 8) >> 8, CLASS_HOST_BRIDGE);
        assert_eq!(read32(&mut io, 5, 0), 0xffff_ffff);
        // The latch reads back.
        let mut latch = [0u8; 4];
        io.read(0, &mut latch);
        assert_eq!(u32::from_le_bytes(latch), 0x8000_2800);
        // Disabled addresses and other buses or functions read all-ones.
        io.write(0, &0x0000_0000u32.to_le_bytes());
        let mut data = [0u8; 4];
        io.read(4, &mut data);
        assert_eq!(data, [0xff; 4]);
        io.write(0, &0x8001_0000u32.to_le_bytes());
        io.read(4, &mut data);
        assert_eq!(data, [0xff; 4]);
    }

    #[test]
    fn byte_and_word_reads_inside_the_dword() {
        let mut io = PciConfigIo(Arc::new(PciBus::default()));
        select(&mut io, 0, 0);
        let mut w = [0u8; 2];
        io.read(6, &mut w);
        assert_eq!(u16::from_le_bytes(w), HOST_BRIDGE_DEVICE);
        let mut b = [0u8; 1];
        io.read(4, &mut b);
        assert_eq!(b[0], 0x36);
        // A word read at 0xCFF would cross the dword: all-ones, no panic.
        io.read(7, &mut w);
        assert_eq!(w, [0xff; 2]);
    }

    #[test]
    fn bus_fills_up() {
        let mut bus = PciBus::default();
        for _ in 1..MAX_SLOTS {
            bus.add(Arc::new(Mutex::new(HostBridge::new())))
                .expect("slot");
        }
        assert_eq!(
            bus.add(Arc::new(Mutex::new(HostBridge::new()))),
            Err(PciError::Full)
        );
    }
}
