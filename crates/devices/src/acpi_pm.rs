//! ACPI hardware-reduced sleep control, sleep status and reset registers on port I/O.
//!
//! The FADT points the guest's ACPI driver here: writing S5 with SLP_EN powers the VM off and
//! writing [`RESET_VALUE`] to the reset register resets it. The constants are shared with the
//! FADT and DSDT (`_S5_`), so they must not change independently.

use std::sync::Arc;

use crate::persist::{NoState, Persist, PersistError};
use crate::{PioDevice, PowerEvent, PowerEventHandler, read_bytewise, write_bytewise};

/// Base of the register block.
pub const ACPI_PM_PORT: u16 = 0x600;
/// Sleep control, sleep status, reset, and one spare port.
pub const ACPI_PM_LEN: u16 = 4;
/// FADT SLEEP_CONTROL_REG.
pub const SLEEP_CONTROL_PORT: u16 = 0x600;
/// FADT SLEEP_STATUS_REG.
pub const SLEEP_STATUS_PORT: u16 = 0x601;
/// FADT RESET_REG.
pub const RESET_PORT: u16 = 0x602;
/// FADT RESET_VALUE.
pub const RESET_VALUE: u8 = 0x06;
/// The sleep type of the DSDT's `_S5_` package.
pub const S5_SLEEP_TYPE: u8 = 5;

const SLEEP_CONTROL: u16 = SLEEP_CONTROL_PORT - ACPI_PM_PORT;
const RESET: u16 = RESET_PORT - ACPI_PM_PORT;
/// SLP_EN: the sleep happens when it is written as 1 together with SLP_TYP.
const SLP_EN: u8 = 0x20;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;

/// The sleep and reset registers.
pub struct AcpiPmDevice {
    power: Arc<dyn PowerEventHandler>,
    /// Set once an unsupported sleep request has been reported.
    sleep_logged: bool,
}

impl AcpiPmDevice {
    /// Registers that send power-off and reset requests to `power`.
    pub fn new(power: Arc<dyn PowerEventHandler>) -> AcpiPmDevice {
        AcpiPmDevice {
            power,
            sleep_logged: false,
        }
    }

    fn write_sleep_control(&mut self, value: u8) {
        if value & SLP_EN == 0 {
            return;
        }
        let sleep_type = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
        if sleep_type == S5_SLEEP_TYPE {
            self.power.power_event(PowerEvent::PowerOff);
        } else if !std::mem::replace(&mut self.sleep_logged, true) {
            log::warn!("ACPI: guest asked for sleep type {sleep_type}; only S5 (off) is supported");
        }
    }
}

/// Version 1: no guest-visible state (reads are constant; writes act at once).
impl Persist for AcpiPmDevice {
    type State = NoState;
    const VERSION: u32 = 1;
    const NAME: &'static str = "ACPI PM registers";

    fn save(&self) -> Result<NoState, PersistError> {
        Ok(NoState {})
    }

    fn restore(&mut self, _: NoState) -> Result<(), PersistError> {
        Ok(())
    }
}

impl PioDevice for AcpiPmDevice {
    /// Everything reads 0; in particular WAK_STS in the sleep status register is never set,
    /// since the guest never sleeps.
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        read_bytewise(offset, data, |_| 0);
    }

    /// The registers are 8 bits wide; a wider write reaches consecutive registers.
    fn write(&mut self, offset: u16, data: &[u8]) {
        write_bytewise(offset, data, |off, value| match off {
            SLEEP_CONTROL => self.write_sleep_control(value),
            RESET if value == RESET_VALUE => self.power.power_event(PowerEvent::Reset),
            _ => {}
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::RecordingPower;

    const SLEEP_STATUS: u16 = SLEEP_STATUS_PORT - ACPI_PM_PORT;

    fn device() -> (AcpiPmDevice, Arc<RecordingPower>) {
        let power = Arc::new(RecordingPower::default());
        (AcpiPmDevice::new(power.clone()), power)
    }

    fn sleep_value(sleep_type: u8, enable: bool) -> u8 {
        (sleep_type << SLP_TYP_SHIFT) | if enable { SLP_EN } else { 0 }
    }

    #[test]
    fn s5_with_slp_en_powers_off() {
        let (mut dev, power) = device();
        dev.write(SLEEP_CONTROL, &[sleep_value(S5_SLEEP_TYPE, true)]);
        assert_eq!(power.events(), vec![PowerEvent::PowerOff]);
    }

    #[test]
    fn slp_typ_without_slp_en_does_nothing() {
        let (mut dev, power) = device();
        dev.write(SLEEP_CONTROL, &[sleep_value(S5_SLEEP_TYPE, false)]);
        assert!(power.events().is_empty());
    }

    #[test]
    fn other_sleep_types_are_ignored() {
        let (mut dev, power) = device();
        for sleep_type in (0..=SLP_TYP_MASK).filter(|t| *t != S5_SLEEP_TYPE) {
            dev.write(SLEEP_CONTROL, &[sleep_value(sleep_type, true)]);
        }
        assert!(power.events().is_empty());
        assert!(dev.sleep_logged);
    }

    #[test]
    fn reset_value_resets() {
        let (mut dev, power) = device();
        dev.write(RESET, &[RESET_VALUE]);
        assert_eq!(power.events(), vec![PowerEvent::Reset]);
    }

    #[test]
    fn other_reset_values_do_nothing() {
        let (mut dev, power) = device();
        dev.write(RESET, &[0x00]);
        dev.write(RESET, &[0x0e]);
        dev.write(RESET, &[0xff]);
        // The reset value at other registers is not a reset.
        dev.write(SLEEP_STATUS, &[RESET_VALUE]);
        dev.write(3, &[RESET_VALUE]);
        assert!(power.events().is_empty());
    }

    #[test]
    fn registers_read_zero() {
        let (mut dev, _) = device();
        dev.write(SLEEP_STATUS, &[0xff]);
        let mut data = [0xffu8; 4];
        dev.read(SLEEP_CONTROL, &mut data);
        assert_eq!(data, [0; 4]);
    }

    #[test]
    fn odd_accesses_do_not_panic() {
        let (mut dev, power) = device();
        for offset in [0, 3, 4, 0xfffe, 0xffff] {
            for len in [0, 1, 2, 4] {
                let mut data = vec![0u8; len];
                dev.read(offset, &mut data);
                dev.write(offset, &data);
            }
        }
        assert!(power.events().is_empty());
    }
}
