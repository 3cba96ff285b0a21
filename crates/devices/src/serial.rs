//! 16550 UARTs on the legacy COM ports, built on `vm_superio::Serial`.
//!
//! The guest's output goes to a `Write` sink; its interrupt leaves through an eventfd that the
//! VMM registers as a KVM irqfd, so raising it never needs the VMM's attention.

use std::io::{self, Write};

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::persist::{Persist, PersistError};
use crate::{PioDevice, read_bytewise, write_bytewise};

/// COM1 base port (the console).
pub const COM1_PORT: u16 = 0x3f8;
/// COM2 base port.
pub const COM2_PORT: u16 = 0x2f8;
/// COM1's ISA interrupt line.
pub const COM1_IRQ: u32 = 4;
/// COM2's ISA interrupt line.
pub const COM2_IRQ: u32 = 3;
/// A 16550 decodes eight consecutive ports.
pub const SERIAL_PORT_LEN: u16 = 8;

/// Why a serial port could not be created.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error("cannot create the serial port's interrupt eventfd (check the open-files limit): {0}")]
    InterruptEvent(#[source] io::Error),
}

/// Raises the UART's interrupt by signalling the irqfd.
struct IrqTrigger(EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// A 16550 UART whose transmitter writes to a host sink.
pub struct SerialPort {
    uart: Serial<IrqTrigger, NoEvents, Box<dyn Write + Send>>,
    /// Set once a failure has been logged: a broken sink would fail on every byte.
    error_logged: bool,
}

impl SerialPort {
    /// A UART in its power-on state, writing what the guest transmits to `out`.
    pub fn new(out: Box<dyn Write + Send>) -> Result<SerialPort, SerialError> {
        let evt = EventFd::new(EFD_NONBLOCK).map_err(SerialError::InterruptEvent)?;
        Ok(SerialPort {
            uart: Serial::new(IrqTrigger(evt), out),
            error_logged: false,
        })
    }

    /// The eventfd signalled when the UART raises its interrupt; register it as an irqfd.
    pub fn interrupt_evt(&self) -> &EventFd {
        &self.uart.interrupt_evt().0
    }

    /// Puts host bytes into the receive FIFO (raising the data-ready interrupt) as far as the
    /// 64-byte FIFO has room; returns how many were taken. The guest drains the FIFO as its
    /// driver reads it.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        if bytes.is_empty() || self.uart.fifo_capacity() == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("serial port: cannot queue input: {e}");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u16, value: u8) {
        let Some(reg) = register(offset) else {
            return;
        };
        // The guest cannot be stalled on a full or broken sink: the byte is dropped and the
        // UART keeps reporting its transmitter empty.
        if let Err(e) = self.uart.write(reg, value)
            && !std::mem::replace(&mut self.error_logged, true)
        {
            log::warn!("serial port: {e}; dropping output it cannot deliver (logged once)");
        }
    }
}

/// The 16550's registers and receive FIFO (`serial.com1`/`serial.com2` version 1): the
/// fields of vm-superio's `SerialState`, which has no serde encoding of its own.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialStateV1 {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    /// Received bytes the guest has not read yet (at most 64).
    pub in_buffer: Vec<u8>,
}

impl Persist for SerialPort {
    type State = SerialStateV1;
    const VERSION: u32 = 1;
    const NAME: &'static str = "serial port";

    fn save(&self) -> Result<SerialStateV1, PersistError> {
        let s = self.uart.state();
        Ok(SerialStateV1 {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        })
    }

    /// Rebuilds the UART from the state around this port's own interrupt eventfd and sink;
    /// an interrupt the saved registers say is pending is raised again.
    fn restore(&mut self, s: SerialStateV1) -> Result<(), PersistError> {
        let err = |detail: String| PersistError::Restore {
            device: Self::NAME,
            detail,
        };
        let state = SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        };
        if state.in_buffer.len() > 64 {
            return Err(PersistError::Mismatch {
                device: Self::NAME,
                detail: format!("{} bytes in a 64-byte FIFO", state.in_buffer.len()),
            });
        }
        let clone = || {
            self.interrupt_evt()
                .try_clone()
                .map(IrqTrigger)
                .map_err(|e| err(format!("cannot duplicate its interrupt eventfd: {e}")))
        };
        let (placeholder, trigger) = (clone()?, clone()?);
        let old = std::mem::replace(
            &mut self.uart,
            Serial::new(placeholder, Box::new(io::sink())),
        );
        match Serial::from_state(&state, trigger, NoEvents, old.into_writer()) {
            Ok(uart) => {
                self.uart = uart;
                Ok(())
            }
            Err(e) => Err(err(format!("{e:?}"))),
        }
    }
}

/// The register an offset selects, if it is one of the UART's eight.
fn register(offset: u16) -> Option<u8> {
    u8::try_from(offset)
        .ok()
        .filter(|reg| u16::from(*reg) < SERIAL_PORT_LEN)
}

impl PioDevice for SerialPort {
    /// Registers are 8 bits wide; a wider access touches consecutive registers, as on ISA.
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        read_bytewise(offset, data, |off| match register(off) {
            Some(reg) => self.uart.read(reg),
            None => 0xff,
        });
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        write_bytewise(offset, data, |off, value| self.write_register(off, value));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    const THR: u16 = 0;
    const IER: u16 = 1;
    const IIR: u16 = 2;
    const LSR: u16 = 5;
    const IER_THR_EMPTY: u8 = 0x02;
    const LSR_THR_EMPTY: u8 = 0x20;
    const LSR_IDLE: u8 = 0x40;

    /// A sink the test can look into after handing it to the UART.
    #[derive(Clone, Default)]
    struct SharedSink(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedSink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A sink that always fails.
    struct BrokenSink;

    impl Write for BrokenSink {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::other("sink closed"))
        }
        fn flush(&mut self) -> io::Result<()> {
            Err(io::Error::other("sink closed"))
        }
    }

    fn read_byte(port: &mut SerialPort, offset: u16) -> u8 {
        let mut data = [0u8];
        port.read(offset, &mut data);
        data[0]
    }

    #[test]
    fn transmitted_bytes_reach_the_sink() {
        let sink = SharedSink::default();
        let mut port = SerialPort::new(Box::new(sink.clone())).unwrap();
        for byte in b"hello\n" {
            port.write(THR, &[*byte]);
        }
        assert_eq!(sink.0.lock().unwrap().as_slice(), b"hello\n");
    }

    #[test]
    fn transmitter_reads_empty() {
        let mut port = SerialPort::new(Box::new(io::sink())).unwrap();
        port.write(THR, b"x");
        let lsr = read_byte(&mut port, LSR);
        assert_eq!(lsr & (LSR_THR_EMPTY | LSR_IDLE), LSR_THR_EMPTY | LSR_IDLE);
    }

    #[test]
    fn thr_empty_interrupt_signals_the_eventfd() {
        let mut port = SerialPort::new(Box::new(io::sink())).unwrap();
        port.write(THR, b"a");
        assert!(
            port.interrupt_evt().read().is_err(),
            "no interrupt while IER is clear"
        );

        port.write(IER, &[IER_THR_EMPTY]);
        // Enabling it with the transmitter already empty raises it at once; reading IIR acks it.
        assert_eq!(port.interrupt_evt().read().unwrap(), 1);
        assert_eq!(read_byte(&mut port, IIR) & 0x0f, 0x02);

        port.write(THR, b"b");
        assert_eq!(port.interrupt_evt().read().unwrap(), 1);
    }

    #[test]
    fn broken_sink_does_not_stop_the_guest() {
        let mut port = SerialPort::new(Box::new(BrokenSink)).unwrap();
        port.write(IER, &[IER_THR_EMPTY]);
        port.interrupt_evt().read().unwrap();
        read_byte(&mut port, IIR);
        port.write(THR, b"a");
        port.write(THR, b"b");
        assert!(port.error_logged);
        // The guest still sees its bytes go out.
        assert_eq!(port.interrupt_evt().read().unwrap(), 1);
        assert_ne!(read_byte(&mut port, LSR) & LSR_THR_EMPTY, 0);
    }

    #[test]
    fn odd_accesses_do_not_panic() {
        let mut port = SerialPort::new(Box::new(io::sink())).unwrap();
        for offset in [0, 7, 8, 0xff, 0x100, 0xfffe, 0xffff] {
            for len in [0, 1, 2, 4] {
                let mut data = vec![0u8; len];
                port.read(offset, &mut data);
                port.write(offset, &data);
            }
        }
        let mut data = [0u8; 2];
        port.read(8, &mut data);
        assert_eq!(data, [0xff, 0xff]);
    }

    #[test]
    fn wide_access_touches_consecutive_registers() {
        let mut port = SerialPort::new(Box::new(io::sink())).unwrap();
        // Bytes land in LCR (3) and MCR (4).
        port.write(3, &[0x03, 0x0b]);
        let mut data = [0u8; 2];
        port.read(3, &mut data);
        assert_eq!(data, [0x03, 0x0b]);
    }

    #[test]
    fn state_round_trips_with_registers_fifo_and_pending_interrupt() {
        use crate::persist::DeviceState;
        let sink = SharedSink::default();
        let mut port = SerialPort::new(Box::new(sink.clone())).unwrap();
        port.write(3, &[0x80]); // DLAB: divisor latch
        port.write(0, &[0x0c]);
        port.write(1, &[0x00]);
        port.write(3, &[0x03]); // 8N1
        port.write(4, &[0x0b]);
        port.write(7, &[0x5a]); // scratch
        port.write(IER, &[0x01]); // received-data interrupt
        assert_eq!(port.enqueue_input(b"abc"), 3);
        port.interrupt_evt().read().unwrap();
        let bytes = port.save_state().unwrap();

        let sink2 = SharedSink::default();
        let mut fresh = SerialPort::new(Box::new(sink2.clone())).unwrap();
        fresh.restore_state(1, &bytes).unwrap();
        assert_eq!(fresh.save_state().unwrap(), bytes);
        assert_eq!(
            fresh.interrupt_evt().read().unwrap(),
            1,
            "the pending data interrupt is raised again"
        );
        assert_eq!(read_byte(&mut fresh, 7), 0x5a);
        assert_eq!(read_byte(&mut fresh, 3), 0x03);
        assert_eq!(read_byte(&mut fresh, THR), b'a');
        assert_eq!(read_byte(&mut fresh, THR), b'b');
        fresh.write(THR, b"z");
        assert_eq!(
            sink2.0.lock().unwrap().as_slice(),
            b"z",
            "its own sink is kept"
        );
        assert!(sink.0.lock().unwrap().is_empty());

        // Damaged states are errors.
        assert!(fresh.restore_state(2, &bytes).is_err(), "version");
        assert!(fresh.restore_state(1, &bytes[..4]).is_err(), "truncated");
        let mut long = bytes.clone();
        long.push(0);
        assert!(fresh.restore_state(1, &long).is_err(), "trailing bytes");
        let mut too_full = port.save().unwrap();
        too_full.in_buffer = vec![0; 65];
        let encoded = crate::persist::encode::<SerialPort>(&too_full).unwrap();
        assert!(fresh.restore_state(1, &encoded).is_err(), "FIFO overflow");
    }

    #[test]
    fn input_fills_the_fifo_and_the_guest_reads_it() {
        let mut port = SerialPort::new(Box::new(io::sink())).unwrap();
        assert_eq!(port.enqueue_input(&[]), 0);
        let bytes: Vec<u8> = (0..100u8).collect();
        let taken = port.enqueue_input(&bytes);
        assert_eq!(taken, 64, "a 16550 FIFO holds 64 bytes");
        assert_eq!(port.enqueue_input(&bytes[taken..]), 0, "full");
        assert_ne!(read_byte(&mut port, LSR) & 0x01, 0, "data ready");
        assert_eq!(read_byte(&mut port, THR), 0);
        assert_eq!(read_byte(&mut port, THR), 1);
        assert_eq!(port.enqueue_input(&bytes[taken..]), 2);
    }
}
