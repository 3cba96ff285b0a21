//! The agent serial port: opened raw so frame bytes pass through untouched.

use std::fs::{File, OpenOptions};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum TtyError {
    #[error(
        "cannot open the agent serial port {path}: {source}; the VM needs a second serial port \
         (ttyS1) for the agent"
    )]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot configure the agent serial port {path} ({step}): {source}")]
    Configure {
        path: PathBuf,
        step: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Opens `path` read-write in raw mode (no echo, no `\n` → `\r\n`, 8-bit clean), ignoring
/// modem control lines so neither open nor write waits for a carrier.
pub(crate) fn open_raw(path: &Path) -> Result<File, TtyError> {
    // O_NONBLOCK only for the open itself: without CLOCAL, opening a serial port can block
    // until the (emulated) carrier-detect line rises.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(path)
        .map_err(|source| TtyError::Open {
            path: path.to_owned(),
            source,
        })?;
    let configure_err = |step, source| TtyError::Configure {
        path: path.to_owned(),
        step,
        source,
    };
    let fd = file.as_raw_fd();
    let mut termios = MaybeUninit::<libc::termios>::uninit();
    // SAFETY: fd is an open descriptor owned by `file`; tcgetattr fully initialises `termios`
    // on success, which is checked before use.
    if unsafe { libc::tcgetattr(fd, termios.as_mut_ptr()) } != 0 {
        return Err(configure_err("tcgetattr", io::Error::last_os_error()));
    }
    // SAFETY: tcgetattr succeeded, so `termios` is initialised.
    let mut termios = unsafe { termios.assume_init() };
    // SAFETY: cfmakeraw only modifies the struct it is given, which is valid and exclusive.
    unsafe { libc::cfmakeraw(&mut termios) };
    termios.c_cflag |= libc::CLOCAL | libc::CREAD;
    // SAFETY: fd is open; `termios` is a valid, initialised struct read by tcsetattr.
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &termios) } != 0 {
        return Err(configure_err("tcsetattr", io::Error::last_os_error()));
    }
    // Back to blocking I/O so writes wait for the port instead of failing with EAGAIN.
    // SAFETY: F_GETFL/F_SETFL on an open fd owned by `file`; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(configure_err("fcntl", io::Error::last_os_error()));
    }
    Ok(file)
}

/// Waits until everything written to the tty has been sent.
pub(crate) fn drain(file: &File) -> io::Result<()> {
    // SAFETY: the fd is open for the lifetime of `file`; tcdrain takes no pointers.
    if unsafe { libc::tcdrain(file.as_raw_fd()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn missing_tty_is_an_open_error() {
        let err = open_raw(Path::new("/nonexistent/ttyS1")).unwrap_err();
        assert!(matches!(err, TtyError::Open { .. }));
        assert!(err.to_string().contains("second serial port"));
    }

    #[test]
    fn non_tty_is_a_configure_error() {
        let err = open_raw(Path::new("/dev/null")).unwrap_err();
        assert!(matches!(
            err,
            TtyError::Configure {
                step: "tcgetattr",
                ..
            }
        ));
    }
}
