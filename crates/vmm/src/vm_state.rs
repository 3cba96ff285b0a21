//! A whole VM's state for save → restore into a brand-new VM: every vCPU ([`VcpuState`]), the
//! in-kernel interrupt controllers, PIT and clock, and guest memory.
//!
//! Kept in memory (tests; the snapshot writer and the migration stream build on it). The
//! device models' state is in [`crate::device_state`].

use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, kvm_clock_data, kvm_irqchip,
    kvm_pit_state2,
};
use kvm_ioctls::VmFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend as _, GuestMemoryRegion as _};

use crate::device_state::DeviceSnapshot;
use crate::memory::GuestMemory;
use crate::vcpu_state::VcpuState;

/// The state of one VM.
#[derive(Debug)]
pub struct VmState {
    pub vcpus: Vec<VcpuState>,
    pub irqchip: IrqchipState,
    pub devices: Vec<DeviceSnapshot>,
    pub memory: Vec<MemoryRegionState>,
}

/// A VM's state without its memory: what a checkpoint stores beside the memory file.
#[derive(Debug)]
pub struct MachineState {
    pub vcpus: Vec<VcpuState>,
    pub irqchip: IrqchipState,
    pub devices: Vec<DeviceSnapshot>,
}

/// PIC master and slave, IOAPIC, PIT and kvmclock.
#[derive(Clone)]
pub struct IrqchipState {
    pub chips: Vec<kvm_irqchip>,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

impl std::fmt::Debug for IrqchipState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IrqchipState")
            .field("chips", &self.chips.len())
            .field("clock", &self.clock.clock)
            .finish_non_exhaustive()
    }
}

/// The contents of one guest RAM region.
#[derive(Clone)]
pub struct MemoryRegionState {
    pub guest_addr: u64,
    pub data: Vec<u8>,
}

impl std::fmt::Debug for MemoryRegionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "MemoryRegionState({:#x}+{:#x})",
            self.guest_addr,
            self.data.len()
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VmStateError {
    #[error("{what} failed: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(
        "the saved memory ({saved}) does not match the new VM's ({new}); restore with the same --memory"
    )]
    MemoryLayout { saved: String, new: String },
    #[error("cannot copy guest memory: {0}")]
    Memory(String),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmStateError {
    move |source| VmStateError::Kvm { what, source }
}

const CHIP_IDS: [u32; 3] = [
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQCHIP_IOAPIC,
];

impl IrqchipState {
    pub fn save(vm: &VmFd) -> Result<Self, VmStateError> {
        let mut chips = Vec::new();
        for chip_id in CHIP_IDS {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            vm.get_irqchip(&mut chip)
                .map_err(kvm_err("KVM_GET_IRQCHIP"))?;
            chips.push(chip);
        }
        Ok(IrqchipState {
            chips,
            pit: vm.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?,
            clock: vm.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?,
        })
    }

    /// Restores into a VM whose irqchip and PIT have been created.
    pub fn restore(&self, vm: &VmFd) -> Result<(), VmStateError> {
        for chip in &self.chips {
            vm.set_irqchip(chip).map_err(kvm_err("KVM_SET_IRQCHIP"))?;
        }
        vm.set_pit2(&self.pit).map_err(kvm_err("KVM_SET_PIT2"))?;
        // Only the clock value: the flags KVM_GET_CLOCK reports describe the source host.
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock).map_err(kvm_err("KVM_SET_CLOCK"))
    }
}

fn layout_of(regions: impl Iterator<Item = (u64, u64)>) -> String {
    regions
        .map(|(start, len)| format!("{start:#x}+{} MiB", len >> 20))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Copies every RAM region.
pub fn save_memory(mem: &GuestMemory) -> Result<Vec<MemoryRegionState>, VmStateError> {
    mem.iter()
        .map(|region| {
            let mut data = vec![0u8; region.len() as usize];
            mem.read_slice(&mut data, region.start_addr())
                .map_err(|e| VmStateError::Memory(e.to_string()))?;
            Ok(MemoryRegionState {
                guest_addr: region.start_addr().0,
                data,
            })
        })
        .collect()
}

/// Writes saved regions into a memory with the same layout.
pub fn restore_memory(mem: &GuestMemory, saved: &[MemoryRegionState]) -> Result<(), VmStateError> {
    let new: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
    let old: Vec<(u64, u64)> = saved
        .iter()
        .map(|r| (r.guest_addr, r.data.len() as u64))
        .collect();
    if new != old {
        return Err(VmStateError::MemoryLayout {
            saved: layout_of(old.into_iter()),
            new: layout_of(new.into_iter()),
        });
    }
    for region in saved {
        mem.write_slice(&region.data, GuestAddress(region.guest_addr))
            .map_err(|e| VmStateError::Memory(e.to_string()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::test_memory as memory;

    #[test]
    fn memory_round_trips() {
        let a = memory(16);
        a.write_obj(0x1234_5678u32, GuestAddress(0xabc000))
            .expect("write");
        let saved = save_memory(&a).expect("save");
        let b = memory(16);
        restore_memory(&b, &saved).expect("restore");
        assert_eq!(
            b.read_obj::<u32>(GuestAddress(0xabc000)).expect("read"),
            0x1234_5678
        );
    }

    #[test]
    fn memory_of_another_size_is_refused() {
        let saved = save_memory(&memory(16)).expect("save");
        let err = restore_memory(&memory(32), &saved).expect_err("sizes differ");
        assert!(err.to_string().contains("same --memory"), "{err}");
    }
}
