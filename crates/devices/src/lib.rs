//! vhpc-devices: the emulated devices of a vhpc guest.
//!
//! For now the legacy x86 port-I/O devices a stock distro kernel expects:
//! - [`serial`] 16550 UARTs (COM1 console, COM2 binary channel), via `vm-superio`;
//! - [`i8042`] the keyboard controller, kept for the reset command and a fast, clean probe;
//! - [`rtc`] the CMOS real-time clock (without it Linux spends seconds probing);
//! - [`acpi_pm`] the ACPI hardware-reduced sleep and reset registers (power-off, reboot);
//! - [`debug_exit`] the debug-exit port test guests end the VM through, with a status;
//! - [`bus`] the port-I/O bus the vCPU threads dispatch `KVM_EXIT_IO` to;
//! - [`persist`] the state every device saves into a checkpoint and restores from;
//!
//! and on PCI:
//! - [`pci`] the root bus with its host bridge (config mechanism #1 at 0xCF8), MSI-X;
//! - [`virtio`] the virtio-pci transport and virtio-blk.
//!
//! Nothing here talks to KVM: interrupts leave as eventfds (the VMM registers them as irqfds,
//! and routes MSI-X vectors through [`pci::msix::MsiRouter`]), queue notifications arrive as
//! eventfds (the VMM registers them as ioeventfds), and power requests leave as
//! [`PowerEvent`]s.
//!
//! Every register access comes from the guest, so no access may panic: unexpected accesses are
//! ignored (reads return all-ones or zero as real hardware would), and failures are logged once
//! per device rather than per access.

pub mod acpi_pm;
pub mod bus;
pub mod debug_exit;
pub mod i8042;
pub mod pci;
pub mod persist;
pub mod rtc;
pub mod serial;
pub mod virtio;

/// A device on the port-I/O bus.
pub trait PioDevice: Send {
    /// The guest reads `data.len()` bytes at `offset` from the device's base port.
    fn read(&mut self, offset: u16, data: &mut [u8]);
    /// The guest writes `data` at `offset` from the device's base port.
    fn write(&mut self, offset: u16, data: &[u8]);
}

/// A request from the guest to change the machine's power state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerEvent {
    /// The guest asked to be switched off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset (i8042 command 0xFE or the ACPI reset register).
    Reset,
    /// The guest asked to stop with an exit status (the debug-exit port).
    Exit { status: u8 },
}

/// Receives the guest's power requests; called from a vCPU thread while the device is locked,
/// so it should only record the request or send it on a channel.
pub trait PowerEventHandler: Send + Sync {
    fn power_event(&self, event: PowerEvent);
}

/// Reads a multi-byte access as consecutive byte registers, as an 8-bit ISA device decodes a
/// 16- or 32-bit `in` (byte `i` comes from register `offset + i`).
pub(crate) fn read_bytewise(offset: u16, data: &mut [u8], mut read: impl FnMut(u16) -> u8) {
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = read(offset.wrapping_add(i as u16));
    }
}

/// The write counterpart of [`read_bytewise`].
pub(crate) fn write_bytewise(offset: u16, data: &[u8], mut write: impl FnMut(u16, u8)) {
    for (i, byte) in data.iter().enumerate() {
        write(offset.wrapping_add(i as u16), *byte);
    }
}

/// Shared test helpers.
#[cfg(test)]
pub(crate) mod test_utils {
    use std::sync::Mutex;

    use super::{PowerEvent, PowerEventHandler};

    /// Records every power event it receives.
    #[derive(Default)]
    pub struct RecordingPower(pub Mutex<Vec<PowerEvent>>);

    impl RecordingPower {
        pub fn events(&self) -> Vec<PowerEvent> {
            self.0.lock().expect("test mutex poisoned").clone()
        }
    }

    impl PowerEventHandler for RecordingPower {
        fn power_event(&self, event: PowerEvent) {
            self.0.lock().expect("test mutex poisoned").push(event);
        }
    }

    /// xorshift64: a small deterministic generator, so every CI run feeds the same
    /// pseudo-random inputs to the parsers under test.
    pub struct XorShift(pub u64);

    impl XorShift {
        pub fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }
}
