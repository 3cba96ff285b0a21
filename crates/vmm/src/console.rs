//! The guest console's output sink: forwards bytes to the user's sink (stdout, a file, or
//! nothing), keeps a bounded tail of the log in memory, and watches for a kernel panic.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use crate::events::VmEvent;

/// How much of the console log is kept in memory (the tail).
pub const LOG_TAIL_BYTES: usize = 1 << 20;

const PANIC_START: &str = "Kernel panic - not syncing";
const PANIC_END: &str = "---[ end Kernel panic";

/// The shared tail of the console log, readable after the VM has stopped.
#[derive(Clone, Default)]
pub struct ConsoleLog(Arc<Mutex<LogState>>);

#[derive(Default)]
struct LogState {
    tail: VecDeque<u8>,
    panicked: bool,
}

impl ConsoleLog {
    /// The kept tail of the log.
    pub fn contents(&self) -> Vec<u8> {
        self.lock().tail.iter().copied().collect()
    }

    /// Whether the kernel printed a panic.
    pub fn panicked(&self) -> bool {
        self.lock().panicked
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LogState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A `Write` for the console serial port.
pub struct ConsoleSink {
    out: Box<dyn Write + Send>,
    log: ConsoleLog,
    line: Vec<u8>,
    events: Sender<VmEvent>,
}

impl ConsoleSink {
    pub fn new(out: Box<dyn Write + Send>, log: ConsoleLog, events: Sender<VmEvent>) -> Self {
        ConsoleSink {
            out,
            log,
            line: Vec::new(),
            events,
        }
    }

    fn end_of_line(&mut self) {
        let line = String::from_utf8_lossy(&self.line);
        if line.contains(PANIC_START) {
            self.log.lock().panicked = true;
        }
        // The end marker comes after the backtrace: the whole report is in the log by then.
        if line.contains(PANIC_END) {
            let _ = self.events.send(VmEvent::Panic);
        }
        self.line.clear();
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        {
            let mut log = self.log.lock();
            log.tail.extend(buf);
            let excess = log.tail.len().saturating_sub(LOG_TAIL_BYTES);
            log.tail.drain(..excess);
        }
        for &b in buf {
            if b == b'\n' {
                self.end_of_line();
            } else if self.line.len() < 4096 {
                self.line.push(b);
            }
        }
        // A console the user closed must not stop the guest: drop the output.
        let _ = self.out.write_all(buf);
        let _ = self.out.flush();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = self.out.flush();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    #[test]
    fn forwards_and_keeps_the_log() {
        let (tx, _rx) = channel();
        let log = ConsoleLog::default();
        let mut sink = ConsoleSink::new(Box::new(std::io::sink()), log.clone(), tx);
        sink.write_all(b"hello\nworld").expect("write");
        assert_eq!(log.contents(), b"hello\nworld");
        assert!(!log.panicked());
    }

    #[test]
    fn detects_a_panic_and_reports_it_at_its_end() {
        let (tx, rx) = channel();
        let log = ConsoleLog::default();
        let mut sink = ConsoleSink::new(Box::new(std::io::sink()), log.clone(), tx);
        sink.write_all(b"[    1.0] Kernel panic - not syncing: sysrq triggered crash\n")
            .expect("write");
        assert!(log.panicked());
        assert!(rx.try_recv().is_err(), "no event before the report ends");
        sink.write_all(b"[    1.1] ---[ end Kernel panic - not syncing: sysrq ]---\n")
            .expect("write");
        assert_eq!(rx.try_recv(), Ok(VmEvent::Panic));
    }

    #[test]
    fn log_tail_is_bounded() {
        let (tx, _rx) = channel();
        let log = ConsoleLog::default();
        let mut sink = ConsoleSink::new(Box::new(std::io::sink()), log.clone(), tx);
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..20 {
            sink.write_all(&chunk).expect("write");
        }
        assert_eq!(log.contents().len(), LOG_TAIL_BYTES);
    }
}
