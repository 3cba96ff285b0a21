//! The typed, versioned state of each component, as stored in `state.bin`: `vcpu.N` (one per
//! vCPU), `irqchip` (PIC, IOAPIC, PIT, kvmclock) and `dev.*` (one per device model, encoded
//! and versioned by the device itself: see `crate::device_state`). Each is its own serde type with its own
//! version, converted to and from the live state types; the KVM structures inside are
//! kvm-bindings' serde encodings (their raw bytes).
//!
//! A change to one of these types bumps that component's version and keeps a reader for the
//! old one; the file's format version changes only when the framing does.

use kvm_bindings::{
    CpuId, kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state,
    kvm_mp_state, kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave,
};
use kvm_ioctls::KvmNestedStateBuffer;
use serde::{Deserialize, Serialize};

use super::format::{Component, FormatError, StateBody};
use crate::device_state::{self, DeviceSnapshot};
use crate::vcpu_state::VcpuState;
use crate::vm_state::{IrqchipState, MachineState};

pub const VCPU_VERSION: u32 = 1;
pub const IRQCHIP_VERSION: u32 = 1;
pub const IRQCHIP: &str = "irqchip";

pub fn vcpu_name(index: usize) -> String {
    format!("vcpu.{index}")
}

/// kvm_fpu has no serde encoding in kvm-bindings: its fields, one by one.
#[derive(Serialize, Deserialize)]
struct FpuV1 {
    fpr: [[u8; 16]; 8],
    fcw: u16,
    fsw: u16,
    ftwx: u8,
    last_opcode: u16,
    last_ip: u64,
    last_dp: u64,
    xmm: [[u8; 16]; 16],
    mxcsr: u32,
}

impl From<&kvm_fpu> for FpuV1 {
    fn from(f: &kvm_fpu) -> Self {
        FpuV1 {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<FpuV1> for kvm_fpu {
    fn from(f: FpuV1) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// `vcpu.N` version 1, as read. [`VcpuV1Ref`] writes the same encoding from borrowed state
/// (some KVM structures cannot be cloned): keep the two in step, field by field.
#[derive(Deserialize)]
struct VcpuV1 {
    cpuid: Vec<kvm_cpuid_entry2>,
    regs: kvm_regs,
    sregs: kvm_sregs,
    fpu: FpuV1,
    xsave: Option<kvm_xsave>,
    xcrs: Option<kvm_xcrs>,
    debug_regs: Option<kvm_debugregs>,
    events: Option<kvm_vcpu_events>,
    mp_state: kvm_mp_state,
    lapic: Option<kvm_lapic_state>,
    msrs: Vec<kvm_msr_entry>,
    nested: Option<Box<KvmNestedStateBuffer>>,
}

#[derive(Serialize)]
struct VcpuV1Ref<'a> {
    cpuid: &'a [kvm_cpuid_entry2],
    regs: &'a kvm_regs,
    sregs: &'a kvm_sregs,
    fpu: FpuV1,
    xsave: Option<&'a kvm_xsave>,
    xcrs: Option<&'a kvm_xcrs>,
    debug_regs: Option<&'a kvm_debugregs>,
    events: Option<&'a kvm_vcpu_events>,
    mp_state: &'a kvm_mp_state,
    lapic: Option<&'a kvm_lapic_state>,
    msrs: &'a [kvm_msr_entry],
    nested: Option<&'a KvmNestedStateBuffer>,
}

#[derive(Serialize, Deserialize)]
struct IrqchipV1 {
    chips: Vec<kvm_irqchip>,
    pit: kvm_pit_state2,
    clock: kvm_clock_data,
}

fn enc<T: Serialize>(name: String, version: u32, value: &T) -> Result<Component, FormatError> {
    Ok(Component {
        name,
        version,
        data: postcard::to_allocvec(value).map_err(|e| FormatError::Decode(e.to_string()))?,
    })
}

fn dec<'a, T: Deserialize<'a>>(
    components: &'a [Component],
    name: &str,
    version: u32,
) -> Result<T, FormatError> {
    let data = super::format::find_component(components, name, version)?;
    postcard::from_bytes(data).map_err(|e| FormatError::Decode(format!("component {name}: {e}")))
}

/// The components of a machine state, in restore order.
pub fn encode(machine: &MachineState) -> Result<Vec<Component>, FormatError> {
    let mut out = Vec::with_capacity(machine.vcpus.len() + 1);
    let irq = &machine.irqchip;
    let chip = IrqchipV1 {
        chips: irq.chips.clone(),
        pit: irq.pit,
        clock: irq.clock,
    };
    out.push(enc(IRQCHIP.into(), IRQCHIP_VERSION, &chip)?);
    for (index, v) in machine.vcpus.iter().enumerate() {
        let state = VcpuV1Ref {
            cpuid: v.cpuid.as_slice(),
            regs: &v.regs,
            sregs: &v.sregs,
            fpu: FpuV1::from(&v.fpu),
            xsave: v.xsave.as_ref(),
            xcrs: v.xcrs.as_ref(),
            debug_regs: v.debug_regs.as_ref(),
            events: v.events.as_ref(),
            mp_state: &v.mp_state,
            lapic: v.lapic.as_ref(),
            msrs: &v.msrs,
            nested: v.nested.as_deref(),
        };
        out.push(enc(vcpu_name(index), VCPU_VERSION, &state)?);
    }
    out.extend(machine.devices.iter().map(|d| Component {
        name: d.name.clone(),
        version: d.version,
        data: d.data.clone(),
    }));
    Ok(out)
}

/// The machine state of a decoded body.
pub fn decode(body: &StateBody) -> Result<MachineState, FormatError> {
    decode_list(&body.components, body.config.vcpus)
}

/// The machine state in `components`, of a VM with `vcpus` vCPUs.
pub fn decode_list(components: &[Component], vcpus: u32) -> Result<MachineState, FormatError> {
    let chip: IrqchipV1 = dec(components, IRQCHIP, IRQCHIP_VERSION)?;
    let mut states = Vec::new();
    for index in 0..vcpus as usize {
        let v: VcpuV1 = dec(components, &vcpu_name(index), VCPU_VERSION)?;
        let cpuid = CpuId::from_entries(&v.cpuid).map_err(|_| {
            FormatError::Decode(format!("vcpu.{index}: {} CPUID entries", v.cpuid.len()))
        })?;
        states.push(VcpuState {
            cpuid,
            regs: v.regs,
            sregs: v.sregs,
            fpu: v.fpu.into(),
            xsave: v.xsave,
            xcrs: v.xcrs,
            debug_regs: v.debug_regs,
            events: v.events,
            mp_state: v.mp_state,
            lapic: v.lapic,
            msrs: v.msrs,
            nested: v.nested,
        });
    }
    // Device states are checked by the devices themselves when they are restored.
    let devices = components
        .iter()
        .filter(|c| c.name.starts_with(device_state::PREFIX))
        .map(|c| DeviceSnapshot {
            name: c.name.clone(),
            version: c.version,
            data: c.data.clone(),
        })
        .collect();
    Ok(MachineState {
        vcpus: states,
        devices,
        irqchip: IrqchipState {
            chips: chip.chips,
            pit: chip.pit,
            clock: chip.clock,
        },
    })
}
