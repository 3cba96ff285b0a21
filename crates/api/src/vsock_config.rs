//! The VM's virtio-vsock device, as the user gives it.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The guest CID when none is given (0-2 are reserved: hypervisor, local, host).
pub const DEFAULT_GUEST_CID: u64 = 3;
/// `sun_path` holds 108 bytes including the terminating NUL; guest-initiated connections
/// use `<socket>_<port>` (up to 11 more bytes).
const MAX_SOCKET_PATH: usize = 107;

/// A virtio-vsock device whose host end is the Unix socket `socket`: host clients connect
/// there and write `CONNECT <port>\n`; guest connections to host port P go to `<socket>_P`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockConfig {
    #[serde(default = "default_cid")]
    pub guest_cid: u64,
    pub socket: PathBuf,
}

fn default_cid() -> u64 {
    DEFAULT_GUEST_CID
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VsockConfigError {
    #[error("guest CID {0} is reserved or too large; use a number from 3 to 4294967294")]
    Cid(u64),
    #[error(
        "vsock socket path {0} is too long for a Unix socket (at most {MAX_SOCKET_PATH} bytes); choose a shorter one"
    )]
    PathTooLong(PathBuf),
    #[error("the vsock socket path is empty")]
    EmptyPath,
}

impl VsockConfig {
    pub fn validate(&self) -> Result<(), VsockConfigError> {
        if !(3..u64::from(u32::MAX)).contains(&self.guest_cid) {
            return Err(VsockConfigError::Cid(self.guest_cid));
        }
        let len = self.socket.as_os_str().len();
        if len == 0 {
            return Err(VsockConfigError::EmptyPath);
        }
        if len > MAX_SOCKET_PATH {
            return Err(VsockConfigError::PathTooLong(self.socket.clone()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation() {
        let ok = VsockConfig {
            guest_cid: 3,
            socket: "/run/v.sock".into(),
        };
        assert_eq!(ok.validate(), Ok(()));
        let cid = |guest_cid| VsockConfig {
            guest_cid,
            ..ok.clone()
        };
        assert_eq!(cid(2).validate(), Err(VsockConfigError::Cid(2)));
        assert_eq!(
            cid(u64::from(u32::MAX)).validate(),
            Err(VsockConfigError::Cid(u64::from(u32::MAX)))
        );
        let long = VsockConfig {
            socket: PathBuf::from("/".repeat(108)),
            ..ok.clone()
        };
        assert!(matches!(
            long.validate(),
            Err(VsockConfigError::PathTooLong(_))
        ));
        let parsed: VsockConfig = serde_json::from_str(r#"{"socket": "/s"}"#).expect("json");
        assert_eq!(parsed.guest_cid, DEFAULT_GUEST_CID);
    }
}
