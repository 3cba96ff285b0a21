//! TAP devices: `/dev/net/tun` with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, non-blocking.
//! Every frame read or written starts with a 12-byte `virtio_net_hdr_v1` (TUNSETVNETHDRSZ),
//! the same header the guest uses, so checksum and segmentation offloads pass straight
//! through; TUNSETOFFLOAD says which ones the TAP may hand us.
//!
//! A TAP this process creates is not persistent: the kernel removes it (and detaches it from
//! its bridge) when the last fd closes, so it vanishes with the VMM however the VMM ends.
//! An existing persistent TAP (made with `ip tuntap add`) is attached to and left in place.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::frames::FrameIo;
use super::host_if::{self, IfReq};

const TUN_PATH: &str = "/dev/net/tun";

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error(
        "cannot open {TUN_PATH}: {0}; load the tun module (modprobe tun) and run vhpc as root \
         or with CAP_NET_ADMIN"
    )]
    OpenTun(io::Error),
    #[error(
        "cannot create TAP device {name}: {source}; creating a TAP needs root or \
         CAP_NET_ADMIN (or create it beforehand: ip tuntap add {name} mode tap user $USER)"
    )]
    Create { name: String, source: io::Error },
    #[error("TAP device {0} is in use by another process (one VM interface per TAP)")]
    Busy(String),
    #[error(
        "{0} exists but is not a TAP device we may use (it may be a TUN device, a bridge or a \
         physical interface, or owned by another user); pick another name"
    )]
    NotATap(String),
    #[error("cannot attach to TAP device {name}: {source}")]
    Attach { name: String, source: io::Error },
    #[error("cannot configure TAP device {name}: {what}: {source}")]
    Configure {
        name: String,
        what: &'static str,
        source: io::Error,
    },
}

/// An open TAP device.
pub struct Tap {
    file: File,
    name: String,
    created: bool,
}

impl Tap {
    /// Attaches to TAP `name`, creating it if no interface has that name (then
    /// [`Tap::created`] is true).
    pub fn open(name: &str) -> Result<Tap, TapError> {
        let existed = host_if::exists(name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(TapError::OpenTun)?;
        let mut req = IfReq::new(name);
        req.set_flags((libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short);
        // SAFETY: TUNSETIFF reads and writes an ifreq; `req` is one, valid for the call, and
        // `file` is an open /dev/net/tun fd.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, req.as_mut_ptr()) };
        if rc < 0 {
            let source = io::Error::last_os_error();
            return Err(match (existed, source.raw_os_error()) {
                (true, Some(libc::EBUSY)) => TapError::Busy(name.to_string()),
                (true, Some(libc::EINVAL | libc::EPERM)) => TapError::NotATap(name.to_string()),
                (true, _) => TapError::Attach {
                    name: name.to_string(),
                    source,
                },
                (false, _) => TapError::Create {
                    name: name.to_string(),
                    source,
                },
            });
        }
        let tap = Tap {
            file,
            name: req.name(),
            created: !existed,
        };
        let hdr_len = super::frames::HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int, `hdr_len`, valid for the call.
        let rc = unsafe { libc::ioctl(tap.raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) };
        if rc < 0 {
            return Err(tap.config_err("set its virtio-net header size"));
        }
        tap.set_offload(0)?;
        Ok(tap)
    }

    fn config_err(&self, what: &'static str) -> TapError {
        TapError::Configure {
            name: self.name.clone(),
            what,
            source: io::Error::last_os_error(),
        }
    }

    /// Which offloaded frames (TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6) the TAP may hand us:
    /// those the guest driver accepted.
    pub fn set_offload(&self, flags: libc::c_uint) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its flags by value; no memory is passed.
        let rc = unsafe { libc::ioctl(self.raw_fd(), libc::TUNSETOFFLOAD, flags as libc::c_ulong) };
        if rc < 0 {
            return Err(self.config_err("set its offloads"));
        }
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether this process created the device (it vanishes when the VMM exits).
    pub fn created(&self) -> bool {
        self.created
    }

    /// Brings the interface up.
    pub fn set_up(&self) -> Result<(), TapError> {
        host_if::set_up(&self.name).map_err(|source| TapError::Configure {
            name: self.name.clone(),
            what: "bring it up",
            source,
        })
    }

    /// Whether the interface is up (an existing TAP someone left down passes no frames).
    pub fn is_up(&self) -> bool {
        host_if::is_up(&self.name).unwrap_or(false)
    }

    /// The fd the device's worker waits on.
    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Another handle on the same queue (for the worker thread).
    pub fn try_clone(&self) -> io::Result<Tap> {
        Ok(Tap {
            file: self.file.try_clone()?,
            name: self.name.clone(),
            created: self.created,
        })
    }
}

impl FrameIo for Tap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: reads at most buf.len() bytes into `buf`, which is valid for writes.
        let n = unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: writes frame.len() bytes from `frame`, which is valid for reads.
        let n = unsafe { libc::write(self.file.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n as usize != frame.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("the TAP took {n} of {} bytes", frame.len()),
            ));
        }
        Ok(())
    }
}
