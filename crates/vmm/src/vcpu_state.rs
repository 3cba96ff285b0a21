//! A vCPU's complete architectural state, as KVM exposes it, saved from one VM and restored
//! into another: the snapshot half of pause → save → restore.
//!
//! Saved: CPUID, regs, sregs, fpu, xsave, xcrs, debug registers, pending events, mp_state, the
//! local APIC (with an in-kernel irqchip), every MSR KVM lists as saveable, and nested state
//! where KVM_CAP_NESTED_STATE says there is any (kvm_pvm has none: KVM_GET_NESTED_STATE fails
//! there). Restored in the order KVM needs: CPUID first (it decides which MSRs and xsave
//! features exist), events last (they refer to the rest).

use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES, Msrs, kvm_debugregs, kvm_fpu,
    kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave,
};
use kvm_ioctls::{Cap, Kvm, KvmNestedStateBuffer, VcpuFd};

/// MSRs that KVM lists as saveable but refuses to restore; skipped on restore.
/// 0x4b564d06 is MSR_KVM_ASYNC_PF_INT: KVM_SET_MSRS stops at it (measured on kvm_pvm, see
/// ENVIRONMENT.md §1); the guest re-arms async page faults itself if it uses them.
pub const MSRS_NOT_RESTORED: &[u32] = &[0x4b56_4d06];

#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    #[error("{what} failed: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(
        "KVM refused to restore MSR {index:#x}; the snapshot was probably taken on a different kind of host (restore on the same host type)"
    )]
    MsrRejected { index: u32 },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuStateError {
    move |source| VcpuStateError::Kvm { what, source }
}

/// What this host's KVM can save, decided once per VM.
#[derive(Clone, Debug, Default)]
pub struct VcpuStateCaps {
    pub xsave: bool,
    pub xcrs: bool,
    pub debug_regs: bool,
    pub vcpu_events: bool,
    pub nested_state: bool,
    /// The VM has an in-kernel irqchip, hence a local APIC per vCPU.
    pub lapic: bool,
    /// KVM_GET_MSR_INDEX_LIST.
    pub msr_indices: Vec<u32>,
}

impl VcpuStateCaps {
    /// Fails only if KVM_GET_MSR_INDEX_LIST fails.
    pub fn probe(kvm: &Kvm, lapic: bool) -> Result<Self, kvm_ioctls::Error> {
        let msr_indices = kvm.get_msr_index_list()?.as_slice().to_vec();
        Ok(VcpuStateCaps {
            xsave: kvm.check_extension(Cap::Xsave),
            xcrs: kvm.check_extension(Cap::Xcrs),
            debug_regs: kvm.check_extension(Cap::Debugregs),
            vcpu_events: kvm.check_extension(Cap::VcpuEvents),
            nested_state: kvm.check_extension(Cap::NestedState),
            lapic,
            msr_indices,
        })
    }
}

/// One vCPU's state. The optional parts are `None` where the host's KVM lacks them.
pub struct VcpuState {
    pub cpuid: CpuId,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: kvm_fpu,
    pub xsave: Option<kvm_xsave>,
    pub xcrs: Option<kvm_xcrs>,
    pub debug_regs: Option<kvm_debugregs>,
    pub events: Option<kvm_vcpu_events>,
    pub mp_state: kvm_mp_state,
    pub lapic: Option<kvm_lapic_state>,
    pub msrs: Vec<kvm_msr_entry>,
    pub nested: Option<Box<KvmNestedStateBuffer>>,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("msrs", &self.msrs.len())
            .finish_non_exhaustive()
    }
}

impl VcpuState {
    /// Reads the state of a vCPU that is not running (its thread is paused).
    pub fn save(fd: &VcpuFd, caps: &VcpuStateCaps) -> Result<Self, VcpuStateError> {
        let mp_state = fd.get_mp_state().map_err(kvm_err("KVM_GET_MP_STATE"))?;
        let nested = if caps.nested_state {
            let mut buffer = Box::new(KvmNestedStateBuffer::empty());
            let len = fd
                .nested_state(&mut buffer)
                .map_err(kvm_err("KVM_GET_NESTED_STATE"))?;
            len.map(|_| buffer)
        } else {
            None
        };
        Ok(VcpuState {
            cpuid: fd
                .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
                .map_err(kvm_err("KVM_GET_CPUID2"))?,
            regs: fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?,
            fpu: fd.get_fpu().map_err(kvm_err("KVM_GET_FPU"))?,
            xsave: caps
                .xsave
                .then(|| fd.get_xsave().map_err(kvm_err("KVM_GET_XSAVE")))
                .transpose()?,
            xcrs: caps
                .xcrs
                .then(|| fd.get_xcrs().map_err(kvm_err("KVM_GET_XCRS")))
                .transpose()?,
            debug_regs: caps
                .debug_regs
                .then(|| fd.get_debug_regs().map_err(kvm_err("KVM_GET_DEBUGREGS")))
                .transpose()?,
            lapic: caps
                .lapic
                .then(|| fd.get_lapic().map_err(kvm_err("KVM_GET_LAPIC")))
                .transpose()?,
            msrs: read_msrs(fd, &caps.msr_indices)?,
            // Last: reading the rest must not change what is pending.
            events: caps
                .vcpu_events
                .then(|| fd.get_vcpu_events().map_err(kvm_err("KVM_GET_VCPU_EVENTS")))
                .transpose()?,
            mp_state,
            nested,
        })
    }

    /// Writes this state into a fresh vCPU (created, not yet run).
    pub fn restore(&self, fd: &VcpuFd) -> Result<(), VcpuStateError> {
        fd.set_cpuid2(&self.cpuid)
            .map_err(kvm_err("KVM_SET_CPUID2"))?;
        fd.set_mp_state(self.mp_state)
            .map_err(kvm_err("KVM_SET_MP_STATE"))?;
        fd.set_regs(&self.regs).map_err(kvm_err("KVM_SET_REGS"))?;
        fd.set_sregs(&self.sregs)
            .map_err(kvm_err("KVM_SET_SREGS"))?;
        fd.set_fpu(&self.fpu).map_err(kvm_err("KVM_SET_FPU"))?;
        if let Some(xsave) = &self.xsave {
            // SAFETY: `xsave` is a complete kvm_xsave read by KVM_GET_XSAVE (the legacy 4 KiB
            // area that KVM_SET_XSAVE reads), not a larger KVM_GET_XSAVE2 buffer.
            unsafe { fd.set_xsave(xsave) }.map_err(kvm_err("KVM_SET_XSAVE"))?;
        }
        if let Some(xcrs) = &self.xcrs {
            fd.set_xcrs(xcrs).map_err(kvm_err("KVM_SET_XCRS"))?;
        }
        if let Some(debug_regs) = &self.debug_regs {
            fd.set_debug_regs(debug_regs)
                .map_err(kvm_err("KVM_SET_DEBUGREGS"))?;
        }
        if let Some(lapic) = &self.lapic {
            fd.set_lapic(lapic).map_err(kvm_err("KVM_SET_LAPIC"))?;
        }
        write_msrs(fd, &self.msrs)?;
        if let Some(nested) = &self.nested {
            fd.set_nested_state(nested)
                .map_err(kvm_err("KVM_SET_NESTED_STATE"))?;
        }
        if let Some(events) = &self.events {
            fd.set_vcpu_events(events)
                .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
        }
        Ok(())
    }
}

const MSR_CHUNK: usize = 64;
const _: () = assert!(MSR_CHUNK <= KVM_MAX_MSR_ENTRIES);

fn msr_list(entries: &[kvm_msr_entry]) -> Result<Msrs, VcpuStateError> {
    Msrs::from_entries(entries).map_err(|_| VcpuStateError::Kvm {
        what: "building an MSR list",
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })
}

/// Reads every listed MSR. KVM_GET_MSRS stops at the first MSR it cannot read; that one is
/// left out (KVM lists some MSRs that only exist with guest features this VM lacks).
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, VcpuStateError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut pending: Vec<kvm_msr_entry> = indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    while !pending.is_empty() {
        let take = pending.len().min(MSR_CHUNK);
        let mut msrs = msr_list(&pending[..take])?;
        let read = fd.get_msrs(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))?;
        out.extend_from_slice(&msrs.as_slice()[..read]);
        let skip = usize::from(read < take);
        if skip == 1 {
            log::debug!("MSR {:#x} is not readable; not saved", pending[read].index);
        }
        pending.drain(..read + skip);
    }
    Ok(out)
}

/// Writes MSRs, except [`MSRS_NOT_RESTORED`]; any other refusal is an error.
fn write_msrs(fd: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<(), VcpuStateError> {
    let wanted: Vec<kvm_msr_entry> = entries
        .iter()
        .filter(|e| !MSRS_NOT_RESTORED.contains(&e.index))
        .copied()
        .collect();
    for chunk in wanted.chunks(MSR_CHUNK) {
        let written = fd
            .set_msrs(&msr_list(chunk)?)
            .map_err(kvm_err("KVM_SET_MSRS"))?;
        if written < chunk.len() {
            return Err(VcpuStateError::MsrRejected {
                index: chunk[written].index,
            });
        }
    }
    Ok(())
}
