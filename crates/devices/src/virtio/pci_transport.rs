//! The modern virtio-pci transport (virtio 1.x §4.1): one PCI function per device, with
//! everything in one 64-bit memory BAR.
//!
//! ```text
//! BAR0 + 0x0000  common configuration      (virtio cap type 1)
//!        0x1000  ISR status                (type 3; unused with MSI-X, reads 0)
//!        0x2000  device configuration      (type 4)
//!        0x3000  notify: queue i at +4*i   (type 2; KVM ioeventfds, see notify_address)
//!        0x4000  MSI-X table               (capability 0x11)
//!        0x5000  MSI-X pending bits
//! ```
//!
//! Register accesses run on the vCPU thread that made them; queue notifications go straight
//! from KVM to the device's worker thread through ioeventfds, and interrupts straight from the
//! worker to KVM through irqfds. A write to the notify area that reaches us anyway (no
//! ioeventfd there, e.g. after the guest moved the BAR) is passed on to the same eventfd.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::common_cfg::{COMMON_CFG_LEN, CommonConfig, StatusChange};
use super::worker::{Worker, WorkerParts};
use super::{GuestMemory, VIRTIO_F_VERSION_1, VirtioBackend, status};
use crate::pci::PciDevice;
use crate::pci::config_space::{ConfigSpace, Header};
use crate::pci::msix::{self, MsixVectors};
use crate::persist::PersistError;

pub const BAR_SIZE: u64 = 0x8000;
const COMMON_CFG: u64 = 0x0000;
const ISR: u64 = 0x1000;
const DEVICE_CFG: u64 = 0x2000;
const DEVICE_CFG_LEN: u64 = 0x1000;
const NOTIFY: u64 = 0x3000;
const NOTIFY_LEN: u64 = 0x1000;
/// Bytes between two queues' notify registers.
pub const NOTIFY_MULTIPLIER: u64 = 4;
const MSIX_TABLE: u64 = 0x4000;
const MSIX_PBA: u64 = 0x5000;
/// Vendor-specific capability: a virtio structure.
const CAP_VENDOR: u8 = 0x09;
const VIRTIO_PCI_VENDOR: u16 = 0x1af4;
/// Modern devices are 0x1040 + the virtio device type.
const VIRTIO_PCI_DEVICE_BASE: u16 = 0x1040;

/// Where the guest notifies queue `queue` of a device whose BAR0 is at `bar`: the address the
/// VMM registers an ioeventfd for.
pub fn notify_address(bar: u64, queue: usize) -> u64 {
    bar + NOTIFY + NOTIFY_MULTIPLIER * queue as u64
}

/// How many MSI-X vectors a device with `queues` queues gets: one per queue plus the
/// configuration-change vector (Linux then gives every queue its own interrupt).
pub fn msix_vector_count(queues: usize) -> usize {
    queues + 1
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("{0} queues do not fit in the notify area")]
    TooManyQueues(usize),
    #[error("cannot create a queue eventfd (check the open-files limit): {0}")]
    EventFd(std::io::Error),
}

pub struct VirtioPciDevice {
    pub(super) name: String,
    pub(super) config: ConfigSpace,
    msix_cap: usize,
    pub(super) common: CommonConfig,
    pub(super) backend: Box<dyn VirtioBackend>,
    pub(super) msix: Arc<MsixVectors>,
    queue_events: Vec<EventFd>,
    pub(super) needs_reset: Arc<AtomicBool>,
    pub(super) mem: GuestMemory,
    pub(super) worker: Option<Worker>,
    /// The worker's parts while the device is paused (see [`PciDevice::pause`]).
    pub(super) parked: Option<WorkerParts>,
    activation_failed_logged: bool,
}

impl VirtioPciDevice {
    /// A device with BAR0 at `bar` (aligned to [`BAR_SIZE`]) and the given MSI-X vectors
    /// ([`msix_vector_count`] of them).
    pub fn new(
        name: String,
        backend: Box<dyn VirtioBackend>,
        mem: GuestMemory,
        bar: u64,
        msix: Arc<MsixVectors>,
    ) -> Result<Self, TransportError> {
        let queues = backend.queue_max_sizes();
        if queues.len() as u64 * NOTIFY_MULTIPLIER > NOTIFY_LEN {
            return Err(TransportError::TooManyQueues(queues.len()));
        }
        let queue_events = (0..queues.len())
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(TransportError::EventFd)?;
        let device_type = backend.device_type();
        let mut config = ConfigSpace::new(Header {
            vendor: VIRTIO_PCI_VENDOR,
            device: VIRTIO_PCI_DEVICE_BASE + device_type,
            revision: 1,
            class: backend.pci_class(),
            subsystem_vendor: VIRTIO_PCI_VENDOR,
            subsystem: 0x40,
        });
        config.set_bar0_mem64(bar, BAR_SIZE);
        let (body, writable) =
            MsixVectors::capability(msix.count(), MSIX_TABLE as u32, MSIX_PBA as u32);
        let msix_cap = config.add_capability(msix::CAPABILITY_ID, &body, &writable);
        for (cfg_type, offset, len) in [
            (1u8, COMMON_CFG, COMMON_CFG_LEN),
            (3, ISR, 1),
            (4, DEVICE_CFG, DEVICE_CFG_LEN),
        ] {
            let body = virtio_cap(cfg_type, offset, len, 16);
            config.add_capability(CAP_VENDOR, &body, &[]);
        }
        let mut notify = virtio_cap(2, NOTIFY, NOTIFY_LEN, 20).to_vec();
        notify.extend_from_slice(&(NOTIFY_MULTIPLIER as u32).to_le_bytes());
        config.add_capability(CAP_VENDOR, &notify, &[]);
        let features = backend.features() | VIRTIO_F_VERSION_1;
        let common = CommonConfig::new(features, &queues, msix.count());
        Ok(VirtioPciDevice {
            name,
            config,
            msix_cap,
            common,
            backend,
            msix,
            queue_events,
            needs_reset: Arc::new(AtomicBool::new(false)),
            mem,
            worker: None,
            parked: None,
            activation_failed_logged: false,
        })
    }

    /// The eventfd signalled when the guest notifies queue `index` (for KVM_IOEVENTFD).
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn status(&self) -> u8 {
        let broken = self.needs_reset.load(Ordering::Relaxed);
        self.common.status
            | if broken {
                status::DEVICE_NEEDS_RESET
            } else {
                0
            }
    }

    fn activate(&mut self) {
        if let Err(e) = self.try_activate() {
            self.needs_reset.store(true, Ordering::Relaxed);
            if !self.activation_failed_logged {
                self.activation_failed_logged = true;
                log::warn!("{}: cannot start the device: {e}", self.name);
            }
        }
    }

    fn try_activate(&mut self) -> Result<(), String> {
        let queues = self.configured_queues()?;
        self.start_worker(queues)
    }

    /// The queues as the driver configured them, at their start positions.
    fn configured_queues(&self) -> Result<Vec<Queue>, String> {
        let mut queues = Vec::new();
        for (i, q) in self.common.queues.iter().enumerate() {
            let mut queue = Queue::new(q.max_size).map_err(|e| e.to_string())?;
            if q.enabled {
                queue
                    .try_set_size(q.size)
                    .and_then(|()| queue.try_set_desc_table_address(GuestAddress(q.desc)))
                    .and_then(|()| queue.try_set_avail_ring_address(GuestAddress(q.avail)))
                    .and_then(|()| queue.try_set_used_ring_address(GuestAddress(q.used)))
                    .map_err(|e| format!("queue {i}: {e}"))?;
                queue.set_ready(true);
                if !queue.is_valid(&self.mem) {
                    return Err(format!("queue {i} lies outside guest memory"));
                }
            }
            queues.push(queue);
        }
        Ok(queues)
    }

    /// Starts the worker thread on `queues` (fresh, or restored with their positions).
    pub(super) fn start_worker(&mut self, queues: Vec<Queue>) -> Result<(), String> {
        let events = self
            .queue_events
            .iter()
            .map(EventFd::try_clone)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        let handler = self
            .backend
            .activate(self.common.driver_features)
            .map_err(|e| e.to_string())?;
        let worker = Worker::spawn(WorkerParts {
            name: self.name.clone(),
            mem: self.mem.clone(),
            queues,
            events,
            vectors: self.common.queues.iter().map(|q| q.msix_vector).collect(),
            config_vector: self.common.config_msix_vector,
            msix: self.msix.clone(),
            handler,
            needs_reset: self.needs_reset.clone(),
        })
        .map_err(|e| format!("cannot start its worker thread: {e}"))?;
        self.worker = Some(worker);
        log::debug!("{}: started", self.name);
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None; // Stops and joins the thread.
        self.parked = None;
        self.needs_reset.store(false, Ordering::Relaxed);
        self.msix.reset();
        for e in &self.queue_events {
            let _ = e.read();
        }
        log::debug!("{}: reset", self.name);
    }

    /// The offset into BAR0 of `addr`, if BAR0 is decoded and covers `addr..addr+len`.
    fn bar_offset(&self, addr: u64, len: usize) -> Option<u64> {
        let bar = self.config.bar0()?;
        let offset = addr.checked_sub(bar)?;
        (offset.checked_add(len as u64)? <= BAR_SIZE).then_some(offset)
    }
}

/// A device error for checkpoints, with this transport's name.
pub(super) fn state_err(detail: String) -> PersistError {
    PersistError::Restore {
        device: "virtio-pci device",
        detail,
    }
}

/// A virtio_pci_cap body after ID and next pointer: cap_len, cfg_type, bar, id, padding,
/// offset, length.
fn virtio_cap(cfg_type: u8, offset: u64, len: u64, cap_len: u8) -> [u8; 14] {
    let mut b = [0u8; 14];
    b[0] = cap_len;
    b[1] = cfg_type;
    b[6..10].copy_from_slice(&(offset as u32).to_le_bytes());
    b[10..14].copy_from_slice(&(len as u32).to_le_bytes());
    b
}

impl crate::persist::Persist for VirtioPciDevice {
    type State = super::transport_state::VirtioPciStateV1;
    const VERSION: u32 = 1;
    const NAME: &'static str = "virtio-pci device";

    fn save(&self) -> Result<Self::State, PersistError> {
        self.save_transport()
    }

    fn restore(&mut self, state: Self::State) -> Result<(), PersistError> {
        self.restore_transport(state)
    }
}

impl PciDevice for VirtioPciDevice {
    fn pause(&mut self) {
        if let Some(worker) = self.worker.take() {
            self.parked = worker.stop();
            if self.parked.is_none() {
                log::warn!(
                    "{}: its worker thread had died; the device needs a reset",
                    self.name
                );
                self.needs_reset.store(true, Ordering::Relaxed);
            }
        }
    }

    fn resume(&mut self) {
        let Some(parts) = self.parked.take() else {
            return;
        };
        match Worker::spawn(parts) {
            Ok(worker) => self.worker = Some(worker),
            Err(e) => {
                log::warn!("{}: cannot restart its worker thread: {e}", self.name);
                self.needs_reset.store(true, Ordering::Relaxed);
            }
        }
    }

    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) {
        self.config.write(offset, data);
        let control = self.msix_cap + 2;
        let end = usize::from(offset) + data.len();
        if usize::from(offset) < control + 2 && end > control {
            let b = self.config.bytes(control, 2);
            self.msix.set_control(u16::from_le_bytes([b[0], b[1]]));
        }
    }

    fn mmio_read(&mut self, addr: u64, data: &mut [u8]) -> bool {
        let Some(offset) = self.bar_offset(addr, data.len()) else {
            return false;
        };
        match offset {
            o if o < COMMON_CFG_LEN => {
                self.common.read(o, data);
                if o == 0x14 && data.len() == 1 {
                    data[0] = self.status();
                }
            }
            o if (DEVICE_CFG..DEVICE_CFG + DEVICE_CFG_LEN).contains(&o) => {
                self.backend.read_config(o - DEVICE_CFG, data);
            }
            o if (MSIX_TABLE..MSIX_PBA).contains(&o) => self.msix.table_read(o - MSIX_TABLE, data),
            o if o >= MSIX_PBA => self.msix.pba_read(o - MSIX_PBA, data),
            _ => data.fill(0),
        }
        true
    }

    fn mmio_write(&mut self, addr: u64, data: &[u8]) -> bool {
        let Some(offset) = self.bar_offset(addr, data.len()) else {
            return false;
        };
        match offset {
            o if o < COMMON_CFG_LEN => match self.common.write(o, data) {
                StatusChange::Activate if self.worker.is_none() => self.activate(),
                StatusChange::Reset => self.reset(),
                _ => {}
            },
            o if (NOTIFY..NOTIFY + NOTIFY_LEN).contains(&o) => {
                let queue = ((o - NOTIFY) / NOTIFY_MULTIPLIER) as usize;
                if let Some(e) = self.queue_events.get(queue) {
                    let _ = e.write(1);
                }
            }
            o if (MSIX_TABLE..MSIX_PBA).contains(&o) => self.msix.table_write(o - MSIX_TABLE, data),
            _ => {}
        }
        true
    }
}
