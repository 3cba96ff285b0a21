//! Virtio 1.x devices on PCI.
//!
//! - [`pci_transport`] the modern virtio-pci transport (common, notify, ISR and device
//!   configuration capabilities in BAR0, MSI-X table and PBA in the same BAR);
//! - [`common_cfg`] the common configuration registers: feature negotiation, queue setup,
//!   device status;
//! - [`transport_state`] what a checkpoint keeps of a virtio-pci device;
//! - [`worker`] the thread that does a device's work, woken only by queue eventfds;
//! - [`block`] virtio-blk on raw image files;
//! - [`net`] virtio-net on a TAP device;
//! - [`vsock`] virtio-vsock with the VMM as the host end, connections mapped to Unix sockets.
//!
//! A device is a [`VirtioBackend`] (identity, features, config space) that hands a
//! [`QueueHandler`] to its worker thread when the driver sets DRIVER_OK. Everything the guest
//! puts in a queue is untrusted: a malformed request is an error for that request, a broken
//! ring an error for that device (DEVICE_NEEDS_RESET), never a panic.

pub mod block;
pub mod common_cfg;
pub mod net;
pub mod pci_transport;
pub mod transport_state;
pub mod vsock;
pub mod worker;

use std::os::fd::RawFd;

use virtio_queue::Queue;

use crate::persist::DeviceState;
use vm_memory::GuestMemoryMmap;
use vm_memory::bitmap::AtomicBitmap;

/// Guest memory as devices see it. The bitmap records every page the VMM's own threads write
/// through it (used rings, data read from disks): KVM's dirty log sees only the guest's
/// writes, and an incremental checkpoint needs both.
pub type GuestMemory = GuestMemoryMmap<AtomicBitmap>;

/// Feature bit: the device conforms to virtio 1.x (required by the modern transport).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Feature bit: the driver may use indirect descriptor tables (virtio-queue follows them).
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;

/// Device status bits (virtio 1.x §2.1).
pub mod status {
    pub const ACKNOWLEDGE: u8 = 1;
    pub const DRIVER: u8 = 2;
    pub const DRIVER_OK: u8 = 4;
    pub const FEATURES_OK: u8 = 8;
    pub const DEVICE_NEEDS_RESET: u8 = 0x40;
    pub const FAILED: u8 = 0x80;
}

/// "No MSI-X vector" in the vector registers.
pub const NO_VECTOR: u16 = 0xffff;

/// A ring the device cannot use: the device stops and asks the driver to reset it.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("the driver's queue is unusable ({0}); the device needs a reset")]
    Ring(virtio_queue::Error),
}

/// One virtio device type, independent of the transport. Its own state (what the guest
/// changed in it, and what identifies it) goes into checkpoints through [`DeviceState`]; the
/// transport saves feature negotiation, queues and MSI-X for it.
pub trait VirtioBackend: Send + DeviceState {
    /// The virtio device ID (1 = net, 2 = block, 19 = vsock).
    fn device_type(&self) -> u16;
    /// The PCI class code (24 bits) the function reports.
    fn pci_class(&self) -> u32;
    /// Device-specific and ring features offered (the transport adds VERSION_1).
    fn features(&self) -> u64;
    /// The largest size of each queue.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// A read of the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The driver set DRIVER_OK having accepted `features`: a handler for the worker thread.
    fn activate(&mut self, features: u64) -> std::io::Result<Box<dyn QueueHandler>>;
}

/// What a device's worker thread runs when a queue is notified.
pub trait QueueHandler: Send {
    /// Processes what the driver made available on queue `index`. Returns whether anything
    /// was put in the used ring (the driver is then interrupted).
    fn process(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemory,
    ) -> Result<bool, QueueError>;

    /// Host-side fds the worker also waits on (readable), e.g. a TAP device; none by default
    /// (a disk has nothing to wait for but its queue).
    fn backend_fds(&self) -> Vec<RawFd> {
        Vec::new()
    }

    /// Whether the worker should wait on backend fd `index` now. A device returns false while
    /// it could not use what the fd has (say, no receive buffers from the guest), so a ready
    /// fd never makes the worker spin; the worker asks again after every call into the
    /// handler.
    fn backend_wanted(&self, _index: usize) -> bool {
        true
    }

    /// Backend fd `index` is readable. Returns the queues that got used entries (their
    /// vectors are raised).
    fn backend_ready(
        &mut self,
        _index: usize,
        _queues: &mut [Queue],
        _mem: &GuestMemory,
    ) -> Result<Vec<usize>, QueueError> {
        Ok(Vec::new())
    }

    /// For devices with a host-side backend that they poll themselves (vsock's sockets,
    /// behind an epoll fd of the handler's): one fd the worker also waits on, readable when
    /// the backend has work. `None` (the default) for the others.
    fn backend_fd(&self) -> Option<RawFd> {
        None
    }

    /// Moves data between the backend and all of the device's `queues`; the worker calls it
    /// when [`Self::backend_fd`] is readable and after every wake-up (queue notifications
    /// included). Returns a bit mask of the queues that got used entries (their vectors are
    /// raised).
    fn process_backend(
        &mut self,
        _queues: &mut [Queue],
        _mem: &GuestMemory,
    ) -> Result<u64, QueueError> {
        Ok(0)
    }
}
