//! vhpc-vmm: one virtual machine on KVM. The only crate that talks to KVM.
//!
//! - [`memory`] guest RAM; [`layout`] the guest-physical map;
//! - [`boot`] direct boot: Linux 64-bit (bzImage) or PVH (ELF with a PVH note), initramfs;
//! - [`cpuid`], [`vcpu_setup`] per-vCPU configuration; [`vcpu`] the vCPU threads;
//! - [`vcpu_state`], [`vm_state`] the state of a vCPU and of a VM, for save → restore;
//!   [`device_state`] the device models' part of it;
//! - [`pci_devices`] the PCI bus and virtio devices, wired to KVM (irqfd, ioeventfd, MSI
//!   routes); [`net_backend`] the host side of a network interface (TAP, bridge);
//! - [`snapshot`] checkpoints on disk (full, incremental), lazy restore, merge, inspect;
//! - [`migration`] live migration to another VMM process over a stream (pre-copy);
//! - [`acpi`] the ACPI tables; [`console`] the console sink that watches for panics;
//! - [`vm`] ties it together: config in, outcome out, and the [`Vm`] handle in between.

pub mod acpi;
pub mod boot;
pub mod console;
pub mod cpuid;
pub mod device_state;
pub mod events;
pub mod host;
pub mod layout;
pub mod memory;
pub mod migration;
pub mod net_backend;
pub mod pci_devices;
pub mod snapshot;
pub mod sparse;
pub mod vcpu;
pub mod vcpu_setup;
pub mod vcpu_state;
pub mod vm;
pub mod vm_state;

pub use vcpu_state::VcpuState;
pub use vm::{Vm, VmError, VmIo, VmOutcome, run};
pub use vm_state::VmState;
