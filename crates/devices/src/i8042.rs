//! A minimal i8042 keyboard controller.
//!
//! There is no keyboard: the controller exists for its CPU-reset command (Linux's default reboot
//! path on x86 tries it) and so that a probing driver sees an empty, idle controller and gives
//! up at once instead of waiting out its timeouts.

use std::sync::Arc;

use crate::persist::{NoState, Persist, PersistError};
use crate::{PioDevice, PowerEvent, PowerEventHandler, read_bytewise, write_bytewise};

/// Data port; the range also covers the status/command port at 0x64.
pub const I8042_PORT: u16 = 0x60;
/// Ports 0x60..=0x64.
pub const I8042_LEN: u16 = 5;

/// Offset of the data port (0x60).
const DATA: u16 = 0;
/// Offset of the status (read) / command (write) port (0x64).
const COMMAND: u16 = 4;
/// Pulse the CPU reset line.
const CMD_RESET_CPU: u8 = 0xfe;

/// Creating the controller cannot fail today; the type keeps the constructor's signature stable.
#[derive(Debug, thiserror::Error)]
pub enum I8042Error {}

/// The keyboard controller: always idle, no data, reset on command.
pub struct I8042 {
    power: Arc<dyn PowerEventHandler>,
}

impl I8042 {
    /// A controller that sends reset requests to `power`.
    pub fn new(power: Arc<dyn PowerEventHandler>) -> Result<I8042, I8042Error> {
        Ok(I8042 { power })
    }
}

/// Version 1: no guest-visible state (reads are constant; writes act at once).
impl Persist for I8042 {
    type State = NoState;
    const VERSION: u32 = 1;
    const NAME: &'static str = "i8042";

    fn save(&self) -> Result<NoState, PersistError> {
        Ok(NoState {})
    }

    fn restore(&mut self, _: NoState) -> Result<(), PersistError> {
        Ok(())
    }
}

impl PioDevice for I8042 {
    /// Status 0 means output buffer empty and input buffer empty: nothing to read and ready for
    /// commands. The data port and the ports between read 0 as well.
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        read_bytewise(offset, data, |_| 0);
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        write_bytewise(offset, data, |off, value| match (off, value) {
            (COMMAND, CMD_RESET_CPU) => self.power.power_event(PowerEvent::Reset),
            (DATA | COMMAND, _) => log::debug!("i8042: ignoring {value:#x} at offset {off}"),
            _ => {}
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::RecordingPower;

    fn controller() -> (I8042, Arc<RecordingPower>) {
        let power = Arc::new(RecordingPower::default());
        let dev = I8042::new(power.clone()).expect("infallible");
        (dev, power)
    }

    #[test]
    fn reset_command_requests_reset() {
        let (mut dev, power) = controller();
        dev.write(COMMAND, &[CMD_RESET_CPU]);
        assert_eq!(power.events(), vec![PowerEvent::Reset]);
    }

    #[test]
    fn other_writes_do_nothing() {
        let (mut dev, power) = controller();
        dev.write(DATA, &[CMD_RESET_CPU]);
        dev.write(COMMAND, &[0xaa]);
        dev.write(COMMAND, &[]);
        dev.write(1, &[CMD_RESET_CPU]);
        assert!(power.events().is_empty());
    }

    #[test]
    fn reads_show_an_idle_empty_controller() {
        let (mut dev, _) = controller();
        for offset in [DATA, 1, 2, 3, COMMAND] {
            let mut data = [0xffu8];
            dev.read(offset, &mut data);
            assert_eq!(data, [0], "offset {offset}");
        }
    }

    #[test]
    fn odd_accesses_do_not_panic() {
        let (mut dev, power) = controller();
        for offset in [0, 4, 5, 0xfffe, 0xffff] {
            for len in [0, 1, 2, 4] {
                let mut data = vec![0u8; len];
                dev.read(offset, &mut data);
                dev.write(offset, &data);
            }
        }
        assert!(power.events().is_empty());
    }
}
