//! The virtio-vsock device (virtio 1.x §5.10, device ID 19): the guest's CID in the config
//! space, receive, transmit and event queues, and the VMM as the host end of every
//! connection ([`Muxer`]). The listening Unix socket is bound when the device is created, so
//! host clients can connect before the guest driver is up; it is removed with the device.

use std::io;
use std::os::fd::RawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use virtio_queue::Queue;

use super::muxer::Muxer;
use super::packet::MAX_PAYLOAD;
use super::rings;
use crate::virtio::{GuestMemory, QueueError, QueueHandler, VirtioBackend};

pub const VIRTIO_ID_VSOCK: u16 = 19;
/// Communication controller, "other".
const PCI_CLASS_COMMUNICATION_OTHER: u32 = 0x07_80_00;
pub const QUEUE_SIZE: u16 = 256;
/// CIDs 0-2 are reserved (hypervisor, local, host); u32::MAX is VMADDR_CID_ANY.
pub const MIN_GUEST_CID: u64 = 3;

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest CID {0} is reserved; use 3 or more (below 4294967295)")]
    Cid(u64),
    #[error("{0} exists and is not a socket; remove it or choose another vsock socket path")]
    NotASocket(PathBuf),
    #[error("cannot listen on the vsock socket {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
}

pub struct Vsock {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
}

impl Vsock {
    /// A device for guest `guest_cid` whose host clients connect to `uds_path` (an old socket
    /// there is replaced).
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Vsock, VsockError> {
        if !(MIN_GUEST_CID..u64::from(u32::MAX)).contains(&guest_cid) {
            return Err(VsockError::Cid(guest_cid));
        }
        match std::fs::symlink_metadata(uds_path) {
            Ok(m) if m.file_type().is_socket() => {
                let _ = std::fs::remove_file(uds_path);
            }
            Ok(_) => return Err(VsockError::NotASocket(uds_path.to_path_buf())),
            Err(_) => {}
        }
        let listener = UnixListener::bind(uds_path).map_err(|source| VsockError::Bind {
            path: uds_path.to_path_buf(),
            source,
        })?;
        Ok(Vsock {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            listener,
        })
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

impl VirtioBackend for Vsock {
    fn device_type(&self) -> u16 {
        VIRTIO_ID_VSOCK
    }

    fn pci_class(&self) -> u32 {
        PCI_CLASS_COMMUNICATION_OTHER
    }

    fn features(&self) -> u64 {
        0 // stream sockets only (no SEQPACKET)
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 3]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let bytes = self.guest_cid.to_le_bytes();
        crate::pci::copy_from(&bytes, offset.min(bytes.len() as u64) as usize, data);
    }

    fn activate(&mut self, _features: u64) -> io::Result<Box<dyn QueueHandler>> {
        let muxer = Muxer::new(self.guest_cid, &self.uds_path, self.listener.try_clone()?)?;
        Ok(Box::new(VsockHandler {
            muxer,
            guest_cid: self.guest_cid,
            scratch: vec![0; MAX_PAYLOAD as usize],
        }))
    }
}

/// The worker thread's side: all work happens in `process_backend`, which sees every queue.
struct VsockHandler {
    muxer: Muxer,
    guest_cid: u64,
    scratch: Vec<u8>,
}

impl QueueHandler for VsockHandler {
    fn process(&mut self, _: usize, _: &mut Queue, _: &GuestMemory) -> Result<bool, QueueError> {
        Ok(false) // process_backend follows every notification
    }

    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.muxer.epoll_fd())
    }

    fn process_backend(
        &mut self,
        queues: &mut [Queue],
        mem: &GuestMemory,
    ) -> Result<u64, QueueError> {
        rings::exchange(
            &mut self.muxer,
            queues,
            mem,
            &mut self.scratch,
            self.guest_cid,
        )
    }
}

/// Checkpoints of a VM with vsock are refused until the device saves its state (the merge of
/// checkpoints and vsock; the next commit implements it).
impl crate::persist::Persist for Vsock {
    type State = crate::persist::NoState;
    const VERSION: u32 = 0;
    const NAME: &'static str = "virtio-vsock";

    fn save(&self) -> Result<Self::State, crate::persist::PersistError> {
        Err(crate::persist::PersistError::Encode {
            device: Self::NAME,
            detail: "checkpoints of a VM with vsock are not supported yet".into(),
        })
    }

    fn restore(&mut self, _: Self::State) -> Result<(), crate::persist::PersistError> {
        Err(crate::persist::PersistError::Restore {
            device: Self::NAME,
            detail: "checkpoints of a VM with vsock are not supported yet".into(),
        })
    }
}
