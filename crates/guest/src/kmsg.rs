//! Messages from /init to the kernel log (`/dev/kmsg`), which the host sees on the console.
//!
//! pid 1 has nowhere else to report problems: its stderr may be closed and the agent channel
//! carries only frames.

use std::fs::OpenOptions;
use std::io::Write;

/// Kernel log level of [`warn`] messages (KERN_WARNING).
const LEVEL_WARNING: u8 = 4;
/// Kernel log level of [`error`] messages (KERN_ERR).
const LEVEL_ERR: u8 = 3;

/// Logs a warning; boot continues.
pub(crate) fn warn(msg: &str) {
    write(LEVEL_WARNING, msg);
}

/// Logs a fatal problem, usually just before powering off.
pub(crate) fn error(msg: &str) {
    write(LEVEL_ERR, msg);
}

fn write(level: u8, msg: &str) {
    let line = format_line(level, msg);
    // One write() per record: /dev/kmsg treats each write as one log line.
    let written = OpenOptions::new()
        .write(true)
        .open("/dev/kmsg")
        .and_then(|mut kmsg| kmsg.write_all(line.as_bytes()));
    if written.is_err() {
        // Before /dev is mounted; stderr is the console if the kernel could open one.
        let _ = std::io::stderr().write_all(line.as_bytes());
    }
}

fn format_line(level: u8, msg: &str) -> String {
    // Multi-line messages would become separate records without the prefix; keep one line.
    let flat = msg.replace('\n', " | ");
    format!("<{level}>vhpc-init: {flat}\n")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn line_format() {
        assert_eq!(format_line(4, "a\nb"), "<4>vhpc-init: a | b\n");
    }
}
