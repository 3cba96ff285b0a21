//! The host's way into the guest agent's channel: bytes into the receive FIFO of COM2, the
//! port that carries only the agent protocol. A long-running guest's agent reads its
//! requests there ([`vhpc_guest`'s session protocol]); a one-shot `vhpc run` never writes.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vhpc_devices::serial::SerialPort;

/// How long the writer sleeps while the guest has not yet read a full FIFO. Only while there
/// is input to deliver: an idle channel costs nothing.
const FIFO_FULL_BACKOFF: Duration = Duration::from_micros(500);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AgentInputError {
    #[error(
        "the guest read nothing from its agent channel for {0:?}: its agent is not running, \
         or the VM is paused (resume it first)"
    )]
    Stalled(Duration),
}

/// A cloneable handle that writes to the guest agent's channel.
#[derive(Clone)]
pub struct AgentInput {
    port: Arc<Mutex<SerialPort>>,
}

impl AgentInput {
    pub fn new(port: Arc<Mutex<SerialPort>>) -> Self {
        AgentInput { port }
    }

    /// Delivers all of `bytes`, as fast as the guest reads them; fails if the guest takes
    /// nothing for `stall_timeout`.
    pub fn write_all(
        &self,
        mut bytes: &[u8],
        stall_timeout: Duration,
    ) -> Result<(), AgentInputError> {
        let mut progress = Instant::now();
        while !bytes.is_empty() {
            let taken = self
                .port
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .enqueue_input(bytes);
            if taken > 0 {
                bytes = &bytes[taken..];
                progress = Instant::now();
                continue;
            }
            if progress.elapsed() >= stall_timeout {
                return Err(AgentInputError::Stalled(stall_timeout));
            }
            std::thread::sleep(FIFO_FULL_BACKOFF);
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use vhpc_devices::PioDevice;

    #[test]
    fn delivers_more_than_a_fifo_while_the_guest_reads() {
        let port = Arc::new(Mutex::new(
            SerialPort::new(Box::new(std::io::sink())).unwrap(),
        ));
        let input = AgentInput::new(port.clone());
        let sent: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        let guest = std::thread::spawn(move || {
            let mut got = Vec::new();
            while got.len() < 1000 {
                let mut lsr = [0u8];
                port.lock().unwrap().read(5, &mut lsr);
                if lsr[0] & 1 != 0 {
                    let mut byte = [0u8];
                    port.lock().unwrap().read(0, &mut byte);
                    got.push(byte[0]);
                } else {
                    std::thread::yield_now();
                }
            }
            got
        });
        input.write_all(&sent, Duration::from_secs(10)).unwrap();
        assert_eq!(guest.join().unwrap(), sent);
    }

    #[test]
    fn a_guest_that_never_reads_stalls() {
        let port = Arc::new(Mutex::new(
            SerialPort::new(Box::new(std::io::sink())).unwrap(),
        ));
        let input = AgentInput::new(port);
        let err = input
            .write_all(&[0; 100], Duration::from_millis(20))
            .unwrap_err();
        assert!(err.to_string().contains("paused"));
    }
}
