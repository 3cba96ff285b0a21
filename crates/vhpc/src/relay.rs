//! The host end of the guest agent's channel: decodes frames, writes the command's stdout and
//! stderr to ours, and remembers its exit status.

use std::io::Write;
use std::sync::{Arc, Mutex};

use vhpc_guest::protocol::{Frame, FrameDecoder};

/// What the agent reported, shared with whoever waits for the VM.
#[derive(Clone, Default)]
pub struct AgentReport(Arc<Mutex<Option<i32>>>);

impl AgentReport {
    pub fn exit_status(&self) -> Option<i32> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A `Write` for the agent's serial port.
pub struct AgentRelay {
    decoder: FrameDecoder,
    report: AgentReport,
    broken: bool,
}

impl AgentRelay {
    pub fn new(report: AgentReport) -> Self {
        AgentRelay {
            decoder: FrameDecoder::new(),
            report,
            broken: false,
        }
    }

    fn deliver(&self, frame: Frame) {
        match frame {
            Frame::Stdout(data) => {
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(&data);
                let _ = out.flush();
            }
            Frame::Stderr(data) => {
                let _ = std::io::stderr().write_all(&data);
            }
            Frame::Exit(status) => {
                *self.report.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(status);
            }
            Frame::Error(msg) => eprintln!("vhpc: guest agent: {msg}"),
        }
    }
}

impl Write for AgentRelay {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.broken {
            return Ok(buf.len());
        }
        match self.decoder.push(buf) {
            Ok(frames) => frames.into_iter().for_each(|f| self.deliver(f)),
            Err(e) => {
                // The guest is untrusted: a corrupt stream ends the relay, never the VMM.
                eprintln!("vhpc: the guest agent's stream is corrupt ({e}); ignoring the rest");
                self.broken = true;
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
