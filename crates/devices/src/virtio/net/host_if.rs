//! Host network interfaces through ioctls on a plain socket: look one up, bring it up,
//! attach it to a bridge. A few ioctls rather than netlink or the `ip` command: the VMM needs
//! no other program and no netlink library for this.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// linux/sockios.h: add a port to a bridge (the libc crate has it for Android only).
const SIOCBRADDIF: libc::Ioctl = 0x89a2;

/// A `struct ifreq` with its name set.
pub struct IfReq(libc::ifreq);

impl IfReq {
    /// `name` is cut to IFNAMSIZ - 1 bytes (callers validate names beforehand).
    pub fn new(name: &str) -> IfReq {
        // SAFETY: ifreq is plain old data (a name array and a union of integers and
        // addresses); all zeros is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req
            .ifr_name
            .iter_mut()
            .zip(name.bytes().take(libc::IFNAMSIZ - 1))
        {
            *dst = src as libc::c_char;
        }
        IfReq(req)
    }

    pub fn set_flags(&mut self, flags: libc::c_short) {
        self.0.ifr_ifru.ifru_flags = flags;
    }

    pub fn flags(&self) -> libc::c_short {
        // SAFETY: every variant of the union is plain integers; reading the flags of an
        // ifreq that SIOCGIFFLAGS filled (or that we zeroed) reads initialised bytes.
        unsafe { self.0.ifr_ifru.ifru_flags }
    }

    pub fn set_ifindex(&mut self, index: libc::c_int) {
        self.0.ifr_ifru.ifru_ifindex = index;
    }

    /// The name, as the kernel may have rewritten it.
    pub fn name(&self) -> String {
        let bytes: Vec<u8> = self
            .0
            .ifr_name
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    pub fn as_mut_ptr(&mut self) -> *mut libc::ifreq {
        &mut self.0
    }
}

/// The interface's index, if an interface by that name exists.
pub fn index(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (index != 0).then_some(index)
}

pub fn exists(name: &str) -> bool {
    index(name).is_some()
}

/// A socket to send interface ioctls through.
fn control_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket takes no pointers; a non-negative result is a new fd we own.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ioctl(request: libc::Ioctl, req: &mut IfReq) -> io::Result<()> {
    let sock = control_socket()?;
    // SAFETY: the interface ioctls used here read and write one ifreq, which `req` is,
    // valid for the call; `sock` is an open socket.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), request, req.as_mut_ptr()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub fn is_up(name: &str) -> io::Result<bool> {
    let mut req = IfReq::new(name);
    ioctl(libc::SIOCGIFFLAGS, &mut req)?;
    Ok(req.flags() & libc::IFF_UP as libc::c_short != 0)
}

/// Sets IFF_UP on the interface (what `ip link set NAME up` does).
pub fn set_up(name: &str) -> io::Result<()> {
    let mut req = IfReq::new(name);
    ioctl(libc::SIOCGIFFLAGS, &mut req)?;
    let flags = req.flags() | libc::IFF_UP as libc::c_short;
    req.set_flags(flags);
    ioctl(libc::SIOCSIFFLAGS, &mut req)
}

#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error(
        "bridge {0} does not exist; create it first, e.g. ip link add {0} type bridge && ip link set {0} up"
    )]
    Missing(String),
    #[error("{0} is not a bridge; give --net bridge= the name of a Linux bridge")]
    NotABridge(String),
    #[error("cannot attach {port} to bridge {bridge}: {source}; that needs root or CAP_NET_ADMIN")]
    Attach {
        bridge: String,
        port: String,
        source: io::Error,
    },
}

/// Makes interface `port` a port of bridge `bridge` (SIOCBRADDIF, what `ip link set PORT
/// master BRIDGE` does for a bridge).
pub fn add_to_bridge(bridge: &str, port: &str) -> Result<(), BridgeError> {
    if !exists(bridge) {
        return Err(BridgeError::Missing(bridge.to_string()));
    }
    let attach = |source| BridgeError::Attach {
        bridge: bridge.to_string(),
        port: port.to_string(),
        source,
    };
    let port_index = index(port).ok_or_else(|| attach(io::ErrorKind::NotFound.into()))?;
    let mut req = IfReq::new(bridge);
    req.set_ifindex(port_index as libc::c_int);
    ioctl(SIOCBRADDIF, &mut req).map_err(|e| match e.raw_os_error() {
        Some(libc::EOPNOTSUPP | libc::EINVAL) => BridgeError::NotABridge(bridge.to_string()),
        _ => attach(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_cut_and_read_back() {
        assert_eq!(IfReq::new("br0").name(), "br0");
        assert_eq!(IfReq::new("0123456789abcdefgh").name(), "0123456789abcde");
    }

    #[test]
    fn loopback_exists_and_nonsense_does_not() {
        assert!(exists("lo"), "every Linux host has lo");
        assert!(!exists("vhpc-no-such"));
        assert!(matches!(
            add_to_bridge("vhpc-no-such", "lo"),
            Err(BridgeError::Missing(_))
        ));
    }
}
