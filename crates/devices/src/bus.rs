//! The port-I/O bus: maps guest port ranges to devices.
//!
//! Every `KVM_EXIT_IO` of every vCPU goes through [`PioBus::read`] or [`PioBus::write`], so the
//! lookup is a `BTreeMap` range search and each device has its own lock (vCPUs touching
//! different devices never contend). The bus is built once, before the vCPUs start, and is then
//! shared read-only.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::PioDevice;

/// Why a device could not be placed on the bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("port range at {base:#x} has length 0; a device needs at least one port")]
    ZeroLength { base: u16 },
    #[error("port range {base:#x}+{len:#x} runs past port 0xffff; move or shorten it")]
    Overflow { base: u16, len: u16 },
    #[error(
        "port range {base:#x}+{len:#x} overlaps the device at {other_base:#x}+{other_len:#x}; \
         give each device its own ports"
    )]
    Overlap {
        base: u16,
        len: u16,
        other_base: u16,
        other_len: u16,
    },
}

/// One device's port range.
struct Range {
    len: u16,
    device: Arc<Mutex<dyn PioDevice>>,
    /// Set once a poisoned lock has been reported, so a broken device is logged once.
    poison_logged: AtomicBool,
}

impl Range {
    /// Ports `base..base + len`, computed wide so the last port 0xffff is representable.
    fn contains(&self, base: u16, port: u16) -> bool {
        u32::from(port) < u32::from(base) + u32::from(self.len)
    }

    /// Locks the device even if an earlier access panicked while holding it: the guest should
    /// keep running with whatever state the device was left in rather than take the VMM down.
    fn lock(&self, base: u16) -> MutexGuard<'_, dyn PioDevice + 'static> {
        self.device.lock().unwrap_or_else(|poisoned| {
            if !self.poison_logged.swap(true, Ordering::Relaxed) {
                log::warn!("device at port {base:#x} panicked earlier; continuing with its state");
            }
            poisoned.into_inner()
        })
    }
}

/// Everything a vCPU exit can reach: the port-I/O devices and the PCI bus (its config ports
/// are on the port-I/O bus too; its devices' BARs are the MMIO space).
#[derive(Default)]
pub struct Buses {
    pub pio: PioBus,
    pub pci: Arc<crate::pci::PciBus>,
}

/// Port ranges, keyed by base port, never overlapping.
#[derive(Default)]
pub struct PioBus {
    ranges: BTreeMap<u16, Range>,
}

impl PioBus {
    /// Places `device` at ports `base..base + len`.
    pub fn insert(
        &mut self,
        base: u16,
        len: u16,
        device: Arc<Mutex<dyn PioDevice>>,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength { base });
        }
        let end = u32::from(base) + u32::from(len);
        if end > 0x1_0000 {
            return Err(BusError::Overflow { base, len });
        }
        let before = self.ranges.range(..=base).next_back();
        let after = self.ranges.range(base..).next();
        let clash = before
            .filter(|(b, r)| r.contains(**b, base))
            .or(after.filter(|(b, _)| u32::from(**b) < end));
        if let Some((&other_base, other)) = clash {
            return Err(BusError::Overlap {
                base,
                len,
                other_base,
                other_len: other.len,
            });
        }
        let range = Range {
            len,
            device,
            poison_logged: AtomicBool::new(false),
        };
        self.ranges.insert(base, range);
        Ok(())
    }

    /// The range owning `port`, with its base.
    fn find(&self, port: u16) -> Option<(u16, &Range)> {
        let (&base, range) = self.ranges.range(..=port).next_back()?;
        range.contains(base, port).then_some((base, range))
    }

    /// Passes a guest read of `port` to its device; false if no device owns the port.
    ///
    /// An access that starts inside a range but runs past its end still goes to that device,
    /// which ignores the offsets it does not have.
    pub fn read(&self, port: u16, data: &mut [u8]) -> bool {
        match self.find(port) {
            Some((base, range)) => {
                range.lock(base).read(port - base, data);
                true
            }
            None => false,
        }
    }

    /// Passes a guest write of `port` to its device; false if no device owns the port.
    pub fn write(&self, port: u16, data: &[u8]) -> bool {
        match self.find(port) {
            Some((base, range)) => {
                range.lock(base).write(port - base, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records accesses; reads return the offset.
    #[derive(Default)]
    struct Probe {
        writes: Vec<(u16, Vec<u8>)>,
    }

    impl PioDevice for Probe {
        fn read(&mut self, offset: u16, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u16, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    fn probe() -> Arc<Mutex<Probe>> {
        Arc::new(Mutex::new(Probe::default()))
    }

    #[test]
    fn dispatches_with_offset_from_base() {
        let mut bus = PioBus::default();
        let dev = probe();
        bus.insert(0x3f8, 8, dev.clone()).expect("insert");
        let mut data = [0u8; 2];
        assert!(bus.read(0x3fd, &mut data));
        assert_eq!(data, [5, 5]);
        assert!(bus.write(0x3f8, b"A"));
        assert!(bus.write(0x3ff, &[]));
        let writes = dev.lock().expect("lock").writes.clone();
        assert_eq!(writes, vec![(0, b"A".to_vec()), (7, vec![])]);
    }

    #[test]
    fn unowned_ports_are_not_handled() {
        let mut bus = PioBus::default();
        bus.insert(0x60, 5, probe()).expect("insert");
        bus.insert(0x70, 2, probe()).expect("insert");
        let mut data = [0u8; 4];
        for port in [0, 0x5f, 0x65, 0x6f, 0x72, 0xffff] {
            assert!(!bus.read(port, &mut data), "port {port:#x}");
            assert!(!bus.write(port, &data), "port {port:#x}");
        }
        assert!(bus.read(0x64, &mut data));
        assert!(bus.read(0x71, &mut data));
    }

    #[test]
    fn refuses_bad_ranges() {
        let mut bus = PioBus::default();
        bus.insert(0x100, 0x10, probe()).expect("insert");
        assert_eq!(
            bus.insert(0x200, 0, probe()),
            Err(BusError::ZeroLength { base: 0x200 })
        );
        assert_eq!(
            bus.insert(0xfff0, 0x11, probe()),
            Err(BusError::Overflow {
                base: 0xfff0,
                len: 0x11
            })
        );
        let overlap = |base, len| BusError::Overlap {
            base,
            len,
            other_base: 0x100,
            other_len: 0x10,
        };
        assert_eq!(bus.insert(0x10f, 1, probe()), Err(overlap(0x10f, 1)));
        assert_eq!(bus.insert(0xf0, 0x11, probe()), Err(overlap(0xf0, 0x11)));
        assert_eq!(bus.insert(0x100, 1, probe()), Err(overlap(0x100, 1)));
        assert_eq!(bus.insert(0x0, 0xffff, probe()), Err(overlap(0x0, 0xffff)));
        // Neighbours on both sides and the very last port are fine.
        bus.insert(0xf0, 0x10, probe()).expect("below");
        bus.insert(0x110, 1, probe()).expect("above");
        bus.insert(0xfff0, 0x10, probe()).expect("last port");
        assert!(bus.read(0xffff, &mut [0u8; 4]));
    }

    #[test]
    fn poisoned_device_keeps_working() {
        let mut bus = PioBus::default();
        let dev = probe();
        bus.insert(0x10, 1, dev.clone()).expect("insert");
        let poisoner = dev.clone();
        let _ = std::thread::spawn(move || {
            let _guard = poisoner.lock().expect("lock");
            panic!("poison the device lock");
        })
        .join();
        assert!(dev.is_poisoned());
        let mut data = [0xaau8];
        assert!(bus.read(0x10, &mut data));
        assert_eq!(data, [0]);
        assert!(bus.write(0x10, &[1]));
    }

    #[test]
    fn bus_is_shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<PioBus>();
    }
}
