//! What a checkpoint keeps of a virtio-pci device (`virtio-pci` component version 1): the
//! config space as the guest programmed it (BAR, command register, MSI-X control), the common
//! configuration (status, negotiated features, queue setup), each started queue's position
//! (virtio-queue's `QueueState`: next_avail, next_used, ring addresses), the MSI-X table and
//! pending bits, and the backend's own state (versioned separately).
//!
//! Saving needs the device paused ([`crate::pci::PciDevice::pause`]): its worker thread has
//! then finished every request it took, so none is in flight and the queue positions are
//! final. Restoring goes into a freshly built device of the same kind; a device the driver
//! had started is started again at the saved queue positions, and each queue is kicked once
//! so requests made available before the checkpoint but not yet taken are served.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

use super::common_cfg::CommonConfigStateV1;
use super::pci_transport::VirtioPciDevice;
use super::status;
use crate::pci::msix::MsixStateV1;
use crate::persist::PersistError;

/// virtio-queue's `QueueState`, which has no serde encoding of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueStateV1 {
    pub max_size: u16,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<QueueState> for QueueStateV1 {
    fn from(q: QueueState) -> Self {
        QueueStateV1 {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<QueueStateV1> for QueueState {
    fn from(q: QueueStateV1) -> Self {
        QueueState {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// `virtio-pci` version 1.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioPciStateV1 {
    pub config_space: Vec<u8>,
    pub common: CommonConfigStateV1,
    /// The device had found a ring unusable and waits for the driver to reset it.
    pub needs_reset: bool,
    /// The queues' positions, if the driver had started the device.
    pub queues: Option<Vec<QueueStateV1>>,
    pub msix: MsixStateV1,
    /// The backend's (e.g. virtio-blk's) state and its version.
    pub backend_version: u32,
    pub backend: Vec<u8>,
}

impl VirtioPciDevice {
    pub(super) fn save_transport(&self) -> Result<VirtioPciStateV1, PersistError> {
        if self.worker.is_some() {
            return Err(PersistError::Encode {
                device: "virtio-pci device",
                detail: format!("{} is running; pause it before saving its state", self.name),
            });
        }
        let queues = self
            .parked
            .as_ref()
            .map(|p| p.queues.iter().map(|q| q.state().into()).collect());
        Ok(VirtioPciStateV1 {
            config_space: self.config.save(),
            common: self.common.save(),
            needs_reset: self.needs_reset.load(std::sync::atomic::Ordering::Relaxed),
            queues,
            msix: self.msix.save(),
            backend_version: self.backend.state_version(),
            backend: self.backend.save_state()?,
        })
    }

    pub(super) fn restore_transport(&mut self, s: VirtioPciStateV1) -> Result<(), PersistError> {
        let mismatch = |detail: String| PersistError::Mismatch {
            device: "virtio-pci device",
            detail,
        };
        self.backend.restore_state(s.backend_version, &s.backend)?;
        self.config.restore(&s.config_space).map_err(mismatch)?;
        self.common.restore(s.common).map_err(mismatch)?;
        self.msix
            .restore(s.msix)
            .map_err(super::pci_transport::state_err)?;
        self.needs_reset
            .store(s.needs_reset, std::sync::atomic::Ordering::Relaxed);
        let started = self.common.status & status::DRIVER_OK != 0
            && self.common.status & status::FEATURES_OK != 0;
        let Some(saved) = s.queues.filter(|_| started) else {
            return Ok(());
        };
        let queues = self.restored_queues(saved)?;
        self.start_worker(queues)
            .map_err(super::pci_transport::state_err)?;
        for event in self.queue_events() {
            // Serve what the driver made available before the checkpoint.
            let _ = event.write(1);
        }
        Ok(())
    }

    fn restored_queues(&self, saved: Vec<QueueStateV1>) -> Result<Vec<Queue>, PersistError> {
        if saved.len() != self.common.queues.len() {
            return Err(PersistError::Mismatch {
                device: "virtio-pci device",
                detail: format!(
                    "{} queues saved, the device has {}",
                    saved.len(),
                    self.common.queues.len()
                ),
            });
        }
        let mut queues = Vec::with_capacity(saved.len());
        for (i, q) in saved.into_iter().enumerate() {
            let bad = |detail: String| PersistError::Decode {
                device: "virtio-pci device",
                detail: format!("queue {i}: {detail}"),
            };
            if q.max_size != self.common.queues[i].max_size {
                return Err(bad(format!("maximum size {}", q.max_size)));
            }
            let queue = Queue::try_from(QueueState::from(q)).map_err(|e| bad(e.to_string()))?;
            if queue.ready() && !queue.is_valid(&self.mem) {
                return Err(bad("its rings lie outside guest memory".into()));
            }
            queues.push(queue);
        }
        Ok(queues)
    }
}

#[cfg(test)]
#[path = "transport_state_tests.rs"]
mod tests;
