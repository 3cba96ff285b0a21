//! An AF_VSOCK listening socket (the guest end of virtio-vsock): the agent's, and
//! `vhpc vsock-echo`'s. Accepted connections are plain [`File`]s: read and write work on
//! sockets as on any fd.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// A listening stream socket on a vsock port of this guest.
pub struct VsockListener(OwnedFd);

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

impl VsockListener {
    /// Listens on `port` for connections from any CID (the host).
    pub fn bind(port: u32) -> io::Result<VsockListener> {
        // SAFETY: socket() with constant arguments; it returns a new fd or -1.
        let fd = check(unsafe {
            libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0)
        })?;
        // SAFETY: `fd` was just returned by socket() and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value to fill in.
        let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_port = port;
        addr.svm_cid = libc::VMADDR_CID_ANY;
        let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
        // SAFETY: `addr` is a valid sockaddr_vm of `len` bytes for the duration of the call.
        check(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast::<libc::sockaddr>(),
                len,
            )
        })?;
        // SAFETY: listen on a bound socket fd we own.
        check(unsafe { libc::listen(fd.as_raw_fd(), 4) })?;
        Ok(VsockListener(fd))
    }

    /// Waits for the next connection.
    pub fn accept(&self) -> io::Result<File> {
        loop {
            // SAFETY: accept4 on our listening fd; null address pointers mean "don't tell".
            let rc = unsafe {
                libc::accept4(
                    self.0.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            match check(rc) {
                // SAFETY: accept4 returned a new fd that nothing else owns.
                Ok(fd) => return Ok(unsafe { File::from_raw_fd(fd) }),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// Echoes every connection on vsock `port` back to its sender, one connection at a time,
/// until killed: a guest service for testing the host's `CONNECT` path.
pub fn echo(port: u32) -> io::Result<()> {
    let listener = VsockListener::bind(port)?;
    loop {
        let mut conn = listener.accept()?;
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match conn.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if conn.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    }
}
