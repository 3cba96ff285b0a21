//! The debug-exit port: a write ends the VM with a status, so a freestanding test guest can
//! report success or failure without ACPI. Same port and semantics as QEMU's isa-debug-exit
//! (`-device isa-debug-exit,iobase=0xf4,iosize=4`), except for the status: QEMU exits with
//! `(value << 1) | 1`, vhpc with the low byte of the value itself.

use std::sync::Arc;

use crate::{PioDevice, PowerEvent, PowerEventHandler};

/// The port (QEMU's default iobase for isa-debug-exit in common use).
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// One 32-bit register.
pub const DEBUG_EXIT_LEN: u16 = 4;

/// Turns the guest's write into [`PowerEvent::Exit`].
pub struct DebugExit {
    power: Arc<dyn PowerEventHandler>,
}

impl DebugExit {
    pub fn new(power: Arc<dyn PowerEventHandler>) -> DebugExit {
        DebugExit { power }
    }
}

impl PioDevice for DebugExit {
    /// Reads return zero: there is nothing to read.
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(0);
    }

    /// A write at the register's start, of any width, ends the VM with the low byte of the
    /// value written; writes into the middle of the register are ignored.
    fn write(&mut self, offset: u16, data: &[u8]) {
        if offset == 0
            && let Some(&status) = data.first()
        {
            self.power.power_event(PowerEvent::Exit { status });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::RecordingPower;

    fn device() -> (DebugExit, Arc<RecordingPower>) {
        let power = Arc::new(RecordingPower::default());
        (DebugExit::new(power.clone()), power)
    }

    #[test]
    fn a_write_exits_with_its_low_byte() {
        let (mut dev, power) = device();
        dev.write(0, &[7]);
        dev.write(0, &0x0000_0103u32.to_le_bytes());
        assert_eq!(
            power.events(),
            vec![
                PowerEvent::Exit { status: 7 },
                PowerEvent::Exit { status: 3 }
            ]
        );
    }

    #[test]
    fn odd_accesses_do_nothing_and_reads_are_zero() {
        let (mut dev, power) = device();
        dev.write(0, &[]);
        dev.write(2, &[1]);
        let mut data = [0xffu8; 4];
        dev.read(0, &mut data);
        assert_eq!(data, [0; 4]);
        assert!(power.events().is_empty());
    }
}
