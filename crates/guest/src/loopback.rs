//! The loopback interface, brought up at boot as every distribution's init does: programs
//! that talk to themselves over 127.0.0.1 need it (Open MPI's launcher and PMIx server fail
//! with "unable to find network interfaces" without it). Linux gives `lo` 127.0.0.1/8 itself
//! once it is up.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::raw::c_char;

/// Sets IFF_UP on `lo`.
pub(crate) fn bring_up() -> io::Result<()> {
    let socket = inet_socket()?;
    let mut request = lo_request();
    let flags = get_flags(&socket, &mut request)?;
    request.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    let fd = socket.as_raw_fd();
    // SAFETY: SIOCSIFFLAGS reads the name and flags from `request`, valid for the call.
    if unsafe { libc::ioctl(fd, libc::SIOCSIFFLAGS, &request) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn inet_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; it returns a new fd or -1.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a valid fd we just opened and own exclusively.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// An interface request naming `lo`.
fn lo_request() -> libc::ifreq {
    // SAFETY: ifreq is plain old data; all-zero bytes are a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(b"lo\0") {
        *slot = *byte as c_char;
    }
    request
}

/// The interface flags of the interface `request` names.
fn get_flags(socket: &OwnedFd, request: &mut libc::ifreq) -> io::Result<libc::c_short> {
    // SAFETY: SIOCGIFFLAGS reads the NUL-terminated name from `request` and writes the flags
    // into it; `request` is a valid, writable ifreq for the duration of the call.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut *request) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just filled the flags member of the union.
    Ok(unsafe { request.ifr_ifru.ifru_flags })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    /// Read-only on the machine running the tests: its `lo` is a loopback interface.
    #[test]
    fn reads_the_loopback_flags() {
        let socket = inet_socket().unwrap();
        let flags = get_flags(&socket, &mut lo_request()).unwrap();
        assert_ne!(flags & libc::IFF_LOOPBACK as libc::c_short, 0, "{flags:#x}");
    }
}
