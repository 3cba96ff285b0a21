//! vhpc-vmm: one virtual machine on KVM. The only crate that talks to KVM.
//!
//! - [`memory`] guest RAM; [`layout`] the guest-physical map;
//! - [`boot`] Linux direct boot (kernel, initramfs, boot_params, 64-bit entry state);
//! - [`cpuid`], [`vcpu_setup`] per-vCPU configuration; [`vcpu`] the vCPU threads;
//! - [`acpi`] the ACPI tables; [`console`] the console sink that watches for panics;
//! - [`vm`] ties it together: config in, outcome out.

pub mod acpi;
pub mod boot;
pub mod console;
pub mod cpuid;
pub mod events;
pub mod host;
pub mod layout;
pub mod memory;
pub mod vcpu;
pub mod vcpu_setup;
pub mod vm;

pub use vm::{VmError, VmIo, VmOutcome, run};
