//! Per-vCPU configuration before the first KVM_RUN: CPUID, boot MSRs, local APIC LVTs, and
//! for vCPUs that start at the kernel's entry their entry state (Linux 64-bit or PVH).

use kvm_bindings::{
    CpuId, KVM_MP_STATE_RUNNABLE, Msrs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
};
use kvm_ioctls::VcpuFd;

use crate::boot::{BootEntry, cpu_state, pvh};
use crate::cpuid;
use crate::memory::GuestMemory;

#[derive(Debug, thiserror::Error)]
pub enum VcpuSetupError {
    #[error("vcpu{index}: {what} failed: {source}")]
    Kvm {
        index: u32,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vcpu{index}: {source}")]
    Boot {
        index: u32,
        #[source]
        source: crate::boot::BootError,
    },
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;

const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default memory type write-back: without it Linux maps RAM uncached.
const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;

/// The MSR values a machine has when Linux is entered.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
    ]
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(state: &kvm_lapic_state, offset: usize) -> u32 {
    let bytes: [u8; 4] = std::array::from_fn(|i| state.regs[offset + i] as u8);
    u32::from_le_bytes(bytes)
}

fn set_lapic_reg(state: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        state.regs[offset + i] = *b as _;
    }
}

/// LINT0 delivers the PIC's interrupts (ExtINT), LINT1 delivers NMIs, as a PC BIOS leaves them.
pub fn set_lint_modes(state: &mut kvm_lapic_state) {
    let with_mode = |reg: u32, mode: u32| (reg & !0x700) | (mode << 8);
    let lvt0 = lapic_reg(state, APIC_LVT0);
    set_lapic_reg(state, APIC_LVT0, with_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = lapic_reg(state, APIC_LVT1);
    set_lapic_reg(state, APIC_LVT1, with_mode(lvt1, APIC_MODE_NMI));
}

/// Configures vCPU `index` of `count`. A vCPU given a `boot` entry starts there; the others
/// wait for INIT/SIPI from the guest, in the in-kernel local APIC. Normally only the boot vCPU
/// (index 0) gets an entry; a guest that declares it (see `boot::guest_kind`) gets every vCPU
/// started at its PVH entry, which also works where INIT/SIPI does not (kvm_pvm).
pub fn configure(
    fd: &VcpuFd,
    index: u32,
    count: u32,
    supported_cpuid: &CpuId,
    boot: Option<(&GuestMemory, BootEntry)>,
) -> Result<(), VcpuSetupError> {
    let kvm = |what| {
        move |source| VcpuSetupError::Kvm {
            index,
            what,
            source,
        }
    };
    fd.set_cpuid2(&cpuid::for_vcpu(supported_cpuid, index, count))
        .map_err(kvm("KVM_SET_CPUID2"))?;
    let msrs = Msrs::from_entries(&boot_msrs()).map_err(|_| VcpuSetupError::Kvm {
        index,
        what: "building the MSR list",
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })?;
    let written = fd.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    if written != msrs.as_slice().len() {
        log::warn!(
            "vcpu{index}: KVM accepted only {written} of {} boot MSRs",
            msrs.as_slice().len()
        );
    }
    let mut lapic = fd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    set_lint_modes(&mut lapic);
    fd.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))?;

    let Some((mem, entry)) = boot else {
        return Ok(());
    };
    fd.set_fpu(&cpu_state::reset_fpu())
        .map_err(kvm("KVM_SET_FPU"))?;
    let sregs = fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let (sregs, regs) = match entry {
        BootEntry::Linux64 { entry } => (
            cpu_state::setup_long_mode(mem, sregs)
                .map_err(|source| VcpuSetupError::Boot { index, source })?,
            cpu_state::entry_regs(entry),
        ),
        BootEntry::Pvh { entry } => (pvh::entry_sregs(sregs), pvh::entry_regs(entry)),
    };
    fd.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;
    fd.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))?;
    if index > 0 {
        // With an in-kernel local APIC a secondary vCPU waits for INIT/SIPI unless told to run.
        let runnable = kvm_mp_state {
            mp_state: KVM_MP_STATE_RUNNABLE,
        };
        fd.set_mp_state(runnable).map_err(kvm("KVM_SET_MP_STATE"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lint_modes_follow_the_pc_convention() {
        let mut s = kvm_lapic_state::default();
        set_lapic_reg(&mut s, APIC_LVT0, 0x0001_0000); // masked, fixed
        set_lint_modes(&mut s);
        assert_eq!(lapic_reg(&s, APIC_LVT0), 0x0001_0700);
        assert_eq!(lapic_reg(&s, APIC_LVT1), 0x0000_0400);
    }

    #[test]
    fn boot_msrs_enable_write_back_mtrrs_and_fast_strings() {
        let msrs = boot_msrs();
        let get = |i| msrs.iter().find(|e| e.index == i).map(|e| e.data);
        assert_eq!(get(MSR_MTRR_DEF_TYPE), Some(0x806));
        assert_eq!(get(MSR_IA32_MISC_ENABLE), Some(1));
    }
}
