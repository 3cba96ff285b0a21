//! The virtio-vsock device (virtio 1.x §5.10, device ID 19): the guest's CID in the config
//! space, receive, transmit and event queues, and the VMM as the host end of every
//! connection ([`Muxer`]). The listening Unix socket is bound when the device is created, so
//! host clients can connect before the guest driver is up; it is removed with the device.

use std::io;
use std::os::fd::RawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::{Queue, QueueT};

use super::muxer::{FIRST_LOCAL_PORT, Muxer};
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
    /// The host port the next host-initiated connection gets (shared with the muxer).
    pub(super) next_local_port: Arc<AtomicU32>,
    /// Restored from a checkpoint: tell the guest driver its connections are gone when the
    /// queues start (see [`super::persist`]).
    pub(super) reset_on_activate: bool,
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
            next_local_port: Arc::new(AtomicU32::new(FIRST_LOCAL_PORT)),
            reset_on_activate: false,
        })
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    pub(super) fn set_guest_cid(&mut self, guest_cid: u64) {
        self.guest_cid = guest_cid;
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
        let muxer = Muxer::new(self.guest_cid, &self.uds_path, self.listener.try_clone()?)?
            .with_port_counter(self.next_local_port.clone());
        Ok(Box::new(VsockHandler {
            muxer,
            guest_cid: self.guest_cid,
            scratch: vec![0; MAX_PAYLOAD as usize],
            transport_reset: std::mem::take(&mut self.reset_on_activate)
                .then_some(ResetEvent::Owed),
        }))
    }
}

/// The worker thread's side: all work happens in `process_backend`, which sees every queue.
pub(super) struct VsockHandler {
    muxer: Muxer,
    guest_cid: u64,
    scratch: Vec<u8>,
    /// Where the transport reset a restored device owes the guest is.
    transport_reset: Option<ResetEvent>,
}

/// The transport reset of a restored device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ResetEvent {
    /// Not sent yet (no event buffer so far).
    Owed,
    /// Sent when the event queue's avail index was `avail`. The guest handles an event and then
    /// gives the buffer back (Linux: `virtio_vsock_event_fill_one` after
    /// `virtio_vsock_event_handle`), so a new available buffer means the guest's old
    /// connections are gone and new ones can be offered.
    Sent { avail: u16 },
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
        let mut used = 0;
        if let Some(reset) = self.transport_reset {
            let event = queues
                .get_mut(rings::EVENT_QUEUE)
                .filter(|q| q.ready())
                .map(|q| (q.avail_idx(mem, Ordering::Acquire).map(|i| i.0), q));
            self.transport_reset = match (reset, event) {
                // No event queue: no driver to tell (and nothing to wait for).
                (_, None) | (_, Some((Err(_), _))) => None,
                (ResetEvent::Owed, Some((Ok(_), q))) => {
                    let (sent, any_used) = rings::send_transport_reset(q, mem)?;
                    if any_used {
                        used |= 1 << rings::EVENT_QUEUE;
                    }
                    let avail = q
                        .avail_idx(mem, Ordering::Acquire)
                        .map_err(QueueError::Ring)?;
                    Some(if sent {
                        ResetEvent::Sent { avail: avail.0 }
                    } else {
                        ResetEvent::Owed
                    })
                }
                (ResetEvent::Sent { avail }, Some((Ok(now), _))) if now != avail => None,
                (sent, Some(_)) => {
                    // Raise the event queue's interrupt again on every wake-up until the guest
                    // answers: the first one may have gone before the vCPUs' saved LAPIC
                    // state was put back over it (a restored device starts first). A
                    // spurious one costs the guest a look at the used ring.
                    used |= 1 << rings::EVENT_QUEUE;
                    Some(sent)
                }
            };
            if self.transport_reset.is_some() {
                // Until the guest has handled the reset, a new connection's REQUEST could
                // reach it first and be reset with the old ones: clients wait (their CONNECT
                // lines are read), guest packets stay in the tx queue.
                self.muxer.handle_socket_events();
                return Ok(used);
            }
        }
        let exchanged = rings::exchange(
            &mut self.muxer,
            queues,
            mem,
            &mut self.scratch,
            self.guest_cid,
        )?;
        Ok(used | exchanged)
    }
}
