//! A type-0 PCI configuration header: IDs, command register, one 64-bit memory BAR (BAR0/1),
//! a capability list and a write mask that decides which bits the guest may change.
//!
//! BAR sizing works as on hardware: the address bits below the BAR's size are read-only zero,
//! so writing all-ones and reading back gives the size.

use super::copy_from;

pub const CONFIG_SPACE_LEN: usize = 256;
const COMMAND: usize = 0x04;
const STATUS: usize = 0x06;
const BAR0: usize = 0x10;
const SUBSYSTEM_VENDOR: usize = 0x2c;
const CAPABILITIES_POINTER: usize = 0x34;
const INTERRUPT_LINE: usize = 0x3c;
/// Capabilities start right after the standard header.
const FIRST_CAPABILITY: usize = 0x40;
/// Command register: memory space decoding enabled.
const COMMAND_MEMORY: u8 = 1 << 1;
/// Status register: the function has a capability list.
const STATUS_CAPABILITIES: u8 = 1 << 4;
/// BAR flags: memory, 64-bit, not prefetchable.
const BAR_MEM64: u32 = 0b100;

/// The identity of a function.
#[derive(Clone, Copy, Debug)]
pub struct Header {
    pub vendor: u16,
    pub device: u16,
    pub revision: u8,
    /// Class code, subclass and programming interface (24 bits).
    pub class: u32,
    pub subsystem_vendor: u16,
    pub subsystem: u16,
}

pub struct ConfigSpace {
    regs: [u8; CONFIG_SPACE_LEN],
    writable: [u8; CONFIG_SPACE_LEN],
    /// Where the next capability goes, and the previous one's "next" pointer.
    cap_end: usize,
    last_next_ptr: usize,
}

impl ConfigSpace {
    pub fn new(h: Header) -> Self {
        let mut s = ConfigSpace {
            regs: [0; CONFIG_SPACE_LEN],
            writable: [0; CONFIG_SPACE_LEN],
            cap_end: FIRST_CAPABILITY,
            last_next_ptr: CAPABILITIES_POINTER,
        };
        s.put(0, &h.vendor.to_le_bytes());
        s.put(2, &h.device.to_le_bytes());
        s.put(8, &(h.class << 8 | u32::from(h.revision)).to_le_bytes());
        s.put(SUBSYSTEM_VENDOR, &h.subsystem_vendor.to_le_bytes());
        s.put(SUBSYSTEM_VENDOR + 2, &h.subsystem.to_le_bytes());
        // I/O and memory decoding, bus mastering; interrupt disable. Interrupt line: scratch.
        s.writable[COMMAND] = 0x07;
        s.writable[COMMAND + 1] = 0x04;
        s.writable[INTERRUPT_LINE] = 0xff;
        s
    }

    fn put(&mut self, offset: usize, bytes: &[u8]) {
        self.regs[offset..offset + bytes.len()].copy_from_slice(bytes);
    }

    /// Makes BAR0 (with BAR1 as its high half) a 64-bit memory BAR of `size` bytes (a power of
    /// two, at least 16) at `addr`.
    pub fn set_bar0_mem64(&mut self, addr: u64, size: u64) {
        debug_assert!(size.is_power_of_two() && size >= 16 && addr.is_multiple_of(size));
        self.put(BAR0, &((addr as u32) | BAR_MEM64).to_le_bytes());
        self.put(BAR0 + 4, &((addr >> 32) as u32).to_le_bytes());
        let mask = !(size - 1);
        self.writable[BAR0..BAR0 + 4].copy_from_slice(&((mask as u32) & !0xf).to_le_bytes());
        self.writable[BAR0 + 4..BAR0 + 8].copy_from_slice(&((mask >> 32) as u32).to_le_bytes());
    }

    /// Where BAR0 points, if memory decoding is on.
    pub fn bar0(&self) -> Option<u64> {
        if self.regs[COMMAND] & COMMAND_MEMORY == 0 {
            return None;
        }
        let mut lo = [0u8; 4];
        let mut hi = [0u8; 4];
        lo.copy_from_slice(&self.regs[BAR0..BAR0 + 4]);
        hi.copy_from_slice(&self.regs[BAR0 + 4..BAR0 + 8]);
        let lo = u64::from(u32::from_le_bytes(lo) & !0xf);
        Some(u64::from(u32::from_le_bytes(hi)) << 32 | lo)
    }

    /// Appends a capability (`id`, then `body` after the id and next-pointer bytes); returns
    /// its offset. `writable` (same length as `body`) says which body bits the guest may change.
    pub fn add_capability(&mut self, id: u8, body: &[u8], writable: &[u8]) -> usize {
        let offset = self.cap_end;
        assert!(
            offset + 2 + body.len() <= CONFIG_SPACE_LEN,
            "capabilities overflow the config space: a device bug, not a guest's"
        );
        self.regs[offset] = id;
        self.put(offset + 2, body);
        let w = &mut self.writable[offset + 2..offset + 2 + writable.len()];
        w.copy_from_slice(writable);
        self.regs[self.last_next_ptr] = offset as u8;
        self.regs[STATUS] |= STATUS_CAPABILITIES;
        self.last_next_ptr = offset + 1;
        self.cap_end = (offset + 2 + body.len()).next_multiple_of(4);
        offset
    }

    /// The register bytes at `offset`, as the guest would read them.
    pub fn bytes(&self, offset: usize, len: usize) -> &[u8] {
        let end = (offset + len).min(CONFIG_SPACE_LEN);
        &self.regs[offset.min(end)..end]
    }

    pub fn read(&self, offset: u16, data: &mut [u8]) {
        copy_from(&self.regs, usize::from(offset), data);
    }

    /// Every register byte (what a checkpoint keeps: BARs and command as the guest set them).
    pub fn save(&self) -> Vec<u8> {
        self.regs.to_vec()
    }

    /// Puts saved register bytes back. Only bits the guest could write may differ from this
    /// function's own (so a saved state of another device type is refused).
    pub fn restore(&mut self, saved: &[u8]) -> Result<(), String> {
        let saved: [u8; CONFIG_SPACE_LEN] = saved
            .try_into()
            .map_err(|_| format!("{} config bytes, expected {CONFIG_SPACE_LEN}", saved.len()))?;
        let foreign =
            (0..CONFIG_SPACE_LEN).find(|&i| (saved[i] ^ self.regs[i]) & !self.writable[i] != 0);
        if let Some(at) = foreign {
            return Err(format!(
                "read-only config byte {at:#x} is {:#04x}, this device has {:#04x}",
                saved[at], self.regs[at]
            ));
        }
        self.regs = saved;
        Ok(())
    }

    /// Applies a guest write through the write mask; bytes past the end are ignored.
    pub fn write(&mut self, offset: u16, data: &[u8]) {
        for (i, &byte) in data.iter().enumerate() {
            let at = usize::from(offset) + i;
            if at < CONFIG_SPACE_LEN {
                let mask = self.writable[at];
                self.regs[at] = (self.regs[at] & !mask) | (byte & mask);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space() -> ConfigSpace {
        ConfigSpace::new(Header {
            vendor: 0x1af4,
            device: 0x1042,
            revision: 1,
            class: 0x01_80_00,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        })
    }

    fn read32(s: &ConfigSpace, offset: u16) -> u32 {
        let mut d = [0u8; 4];
        s.read(offset, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn header_fields() {
        let s = space();
        assert_eq!(read32(&s, 0), 0x1042_1af4);
        assert_eq!(read32(&s, 8), 0x0180_0001);
        assert_eq!(read32(&s, 0x2c), 0x0040_1af4);
        assert_eq!(
            read32(&s, 0xfe),
            0,
            "reads past the end are zero, not a panic"
        );
    }

    #[test]
    fn bar_sizing_and_decoding() {
        let mut s = space();
        s.set_bar0_mem64(0xc000_8000, 0x8000);
        assert_eq!(s.bar0(), None, "memory decoding starts off");
        s.write(0x10, &[0xff; 4]);
        s.write(0x14, &[0xff; 4]);
        assert_eq!(read32(&s, 0x10), 0xffff_8004);
        assert_eq!(read32(&s, 0x14), 0xffff_ffff);
        s.write(0x10, &0xc000_8000u32.to_le_bytes());
        s.write(0x14, &0u32.to_le_bytes());
        s.write(0x04, &[0x06, 0]);
        assert_eq!(s.bar0(), Some(0xc000_8000));
    }

    #[test]
    fn save_restore_keeps_guest_writes_and_refuses_other_devices() {
        let mut s = space();
        s.set_bar0_mem64(0xc000_0000, 0x8000);
        s.write(0x10, &0xc001_0000u32.to_le_bytes());
        s.write(0x04, &[0x06, 0]);
        let saved = s.save();
        let mut fresh = space();
        fresh.set_bar0_mem64(0xc000_0000, 0x8000);
        fresh.restore(&saved).expect("same device");
        assert_eq!(fresh.bar0(), Some(0xc001_0000));
        assert_eq!(fresh.save(), saved);
        let mut other = saved.clone();
        other[0] ^= 1; // vendor ID
        assert!(
            fresh
                .restore(&other)
                .expect_err("another device")
                .contains("read-only")
        );
        assert!(fresh.restore(&saved[..10]).is_err());
    }

    #[test]
    fn capabilities_are_chained_and_read_only_where_masked() {
        let mut s = space();
        let a = s.add_capability(0x09, &[1, 2, 3], &[0, 0, 0]);
        let b = s.add_capability(0x11, &[0, 0], &[0, 0xc0]);
        assert_eq!((a, b), (0x40, 0x48));
        assert_eq!(read32(&s, 0x34) & 0xff, 0x40);
        assert_ne!(read32(&s, 4) & (1 << 20), 0, "capability list bit");
        assert_eq!(s.bytes(0x40, 2), &[0x09, 0x48]);
        s.write(0x4a, &[0xff, 0xff]);
        assert_eq!(s.bytes(0x4a, 2), &[0, 0xc0]);
        s.write(0x0, &[0, 0]);
        assert_eq!(read32(&s, 0) & 0xffff, 0x1af4, "IDs are read-only");
    }
}
