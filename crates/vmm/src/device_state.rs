//! The device models' part of a VM's saved state: every port-I/O device (COM1, COM2, i8042,
//! CMOS RTC, ACPI PM registers), the PCI configuration address latch and every PCI function
//! (host bridge, virtio-pci devices with their backends), each as a named, versioned,
//! postcard-encoded [`DeviceSnapshot`] (a `dev.*` component of a checkpoint).
//!
//! Devices implement `vhpc_devices::persist::Persist`; this module only knows their names.
//! A device added to the VM later is saved by being on one of the two lists below: the PCI
//! bus lists its functions itself.

use std::sync::{Arc, Mutex, MutexGuard};

use vhpc_devices::pci::PciBus;
use vhpc_devices::persist::{DeviceState, PersistError};

use crate::vm::VmError;

/// One device's saved state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceSnapshot {
    /// `dev.com1`, `dev.com2`, `dev.i8042`, `dev.rtc`, `dev.acpi_pm`, `dev.pci.bus`,
    /// `dev.pci.N` (slot N; 0 is the host bridge).
    pub name: String,
    pub version: u32,
    pub data: Vec<u8>,
}

/// Component names of device state start with this.
pub const PREFIX: &str = "dev.";
const PCI_BUS: &str = "dev.pci.bus";
const PCI_BUS_VERSION: u32 = 1;

/// A device on the port-I/O bus whose state is saved.
pub type SavedDevice = Arc<Mutex<dyn DeviceState + Send>>;

/// The port-I/O devices with state, by component name (the debug-exit port has none).
#[derive(Default)]
pub struct LegacyDevices(pub Vec<(&'static str, SavedDevice)>);

fn lock(device: &SavedDevice) -> MutexGuard<'_, dyn DeviceState + Send + 'static> {
    device.lock().unwrap_or_else(|p| p.into_inner())
}

fn state_err(name: &str) -> impl FnOnce(PersistError) -> VmError + '_ {
    move |source| VmError::DeviceState {
        name: name.to_string(),
        source,
    }
}

fn pci_name(slot: usize) -> String {
    format!("dev.pci.{slot}")
}

/// Every device's state; the VM must be paused (PCI devices quiesced).
pub fn save(legacy: &LegacyDevices, pci: &PciBus) -> Result<Vec<DeviceSnapshot>, VmError> {
    let mut out = Vec::new();
    for (name, device) in &legacy.0 {
        let d = lock(device);
        out.push(DeviceSnapshot {
            name: (*name).to_string(),
            version: d.state_version(),
            data: d.save_state().map_err(state_err(name))?,
        });
    }
    out.push(DeviceSnapshot {
        name: PCI_BUS.into(),
        version: PCI_BUS_VERSION,
        data: pci.address_latch().to_le_bytes().to_vec(),
    });
    let functions = pci.save_devices().map_err(state_err("dev.pci"))?;
    for (slot, (version, data)) in functions.into_iter().enumerate() {
        out.push(DeviceSnapshot {
            name: pci_name(slot),
            version,
            data,
        });
    }
    Ok(out)
}

/// Puts saved states into a VM's freshly built devices: every device must have exactly one
/// state, and every state a device. An empty list (a checkpoint written before vhpc saved
/// devices) leaves the devices fresh.
pub fn restore(
    legacy: &LegacyDevices,
    pci: &PciBus,
    saved: &[DeviceSnapshot],
) -> Result<(), VmError> {
    if saved.is_empty() {
        log::warn!(
            "the saved state has no device state (an older checkpoint): devices start fresh"
        );
        return Ok(());
    }
    let mut expected: Vec<String> = legacy.0.iter().map(|(n, _)| (*n).to_string()).collect();
    expected.push(PCI_BUS.into());
    expected.extend((0..pci.len()).map(pci_name));
    let mut names: Vec<&str> = saved.iter().map(|s| s.name.as_str()).collect();
    names.sort_unstable();
    let mut wanted: Vec<&str> = expected.iter().map(String::as_str).collect();
    wanted.sort_unstable();
    if names != wanted {
        return Err(VmError::RestoreMismatch(format!(
            "the saved devices are [{}], this VM has [{}]",
            names.join(", "),
            wanted.join(", ")
        )));
    }
    let find = |name: &str| saved.iter().find(|s| s.name == name);
    for (name, device) in &legacy.0 {
        let s = find(name).ok_or_else(|| VmError::RestoreMismatch(format!("no {name}")))?;
        lock(device)
            .restore_state(s.version, &s.data)
            .map_err(state_err(name))?;
    }
    let bus = find(PCI_BUS).ok_or_else(|| VmError::RestoreMismatch(format!("no {PCI_BUS}")))?;
    let latch: [u8; 4] = bus
        .data
        .as_slice()
        .try_into()
        .map_err(|_| VmError::DeviceState {
            name: PCI_BUS.into(),
            source: PersistError::Decode {
                device: "PCI bus",
                detail: format!("{} bytes, expected 4", bus.data.len()),
            },
        })?;
    if bus.version != PCI_BUS_VERSION {
        return Err(VmError::DeviceState {
            name: PCI_BUS.into(),
            source: PersistError::Version {
                device: "PCI bus",
                found: bus.version,
                expected: PCI_BUS_VERSION,
            },
        });
    }
    pci.set_address_latch(u32::from_le_bytes(latch));
    for slot in 0..pci.len() {
        let name = pci_name(slot);
        let s = find(&name).ok_or_else(|| VmError::RestoreMismatch(format!("no {name}")))?;
        pci.restore_device(slot, s.version, &s.data)
            .map_err(state_err(&name))?;
    }
    Ok(())
}
