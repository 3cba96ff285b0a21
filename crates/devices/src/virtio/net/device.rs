//! The virtio-net device: one receive and one transmit queue on a TAP device.
//!
//! Features: MAC (the address the VMM chose is in the config space), indirect descriptors,
//! and checksum and TCP segmentation offloads both ways (CSUM, HOST_TSO4/6 for what the
//! guest sends; GUEST_CSUM, GUEST_TSO4/6 for what it receives), which the TAP's vnet header
//! carries through; no control queue, no multiqueue, no MRG_RXBUF (with GUEST_TSO Linux
//! posts 64 KiB receive buffers). The link is always up (no STATUS feature).

use std::os::fd::RawFd;

use virtio_queue::{Queue, QueueT};

use super::frames::{BackendHeader, FrameIo, NetPort, Offloads, fill_rx, process_tx};
use super::tap::Tap;
use crate::virtio::{
    GuestMemory, QueueError, QueueHandler, VIRTIO_RING_F_INDIRECT_DESC, VirtioBackend,
};

pub const VIRTIO_ID_NET: u16 = 1;
use virtio_bindings::virtio_net as vn;

/// The device has a MAC address in its config space.
pub const VIRTIO_NET_F_MAC: u64 = 1 << vn::VIRTIO_NET_F_MAC;
/// The offloads offered (see the module comment).
pub const OFFLOAD_FEATURES: u64 = 1 << vn::VIRTIO_NET_F_CSUM
    | 1 << vn::VIRTIO_NET_F_GUEST_CSUM
    | 1 << vn::VIRTIO_NET_F_GUEST_TSO4
    | 1 << vn::VIRTIO_NET_F_GUEST_TSO6
    | 1 << vn::VIRTIO_NET_F_HOST_TSO4
    | 1 << vn::VIRTIO_NET_F_HOST_TSO6;
/// Network controller, Ethernet.
const PCI_CLASS_ETHERNET: u32 = 0x02_00_00;
pub const QUEUE_SIZE: u16 = 256;
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;

pub struct Net {
    tap: Tap,
    mac: [u8; 6],
    /// Restored into a new VMM: announce the MAC on the new TAP when the queues start.
    announce: bool,
}

impl Net {
    pub fn new(tap: Tap, mac: [u8; 6]) -> Net {
        Net {
            tap,
            mac,
            announce: false,
        }
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    pub(super) fn announce_on_activate(&mut self) {
        self.announce = true;
    }
}

impl VirtioBackend for Net {
    fn device_type(&self) -> u16 {
        VIRTIO_ID_NET
    }

    fn pci_class(&self) -> u32 {
        PCI_CLASS_ETHERNET
    }

    fn features(&self) -> u64 {
        VIRTIO_NET_F_MAC | VIRTIO_RING_F_INDIRECT_DESC | OFFLOAD_FEATURES
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }

    /// `virtio_net_config`: only `mac` (bytes 0..6) is meaningful with our features.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::pci::copy_from(&self.mac, offset.min(self.mac.len() as u64) as usize, data);
    }

    fn activate(&mut self, features: u64) -> std::io::Result<Box<dyn QueueHandler>> {
        let (offloads, tun_flags) = negotiated_offloads(features);
        self.tap
            .set_offload(tun_flags)
            .map_err(std::io::Error::other)?;
        let mut tap = self.tap.try_clone()?;
        if std::mem::take(&mut self.announce) {
            // Best effort, as on a real network: a lost announcement only means peers learn
            // the new port from the guest's next frame.
            if let Err(e) = tap.write_frame(&super::persist::announcement(&self.mac)) {
                log::warn!(
                    "virtio-net: cannot announce the moved MAC on {}: {e}",
                    self.tap.name()
                );
            }
        }
        let fd = tap.raw_fd();
        let port = NetPort::new(tap, BackendHeader::Vnet(offloads));
        Ok(Box::new(NetHandler::new(port, fd)))
    }
}

/// What the driver accepted: the offloads frames may use, and the TAP's TUNSETOFFLOAD flags
/// (which frames it may hand the guest).
pub fn negotiated_offloads(features: u64) -> (Offloads, libc::c_uint) {
    let has = |bit: u32| features & (1u64 << bit) != 0;
    let offloads = Offloads {
        guest_csum: has(vn::VIRTIO_NET_F_GUEST_CSUM),
        tx_csum: has(vn::VIRTIO_NET_F_CSUM),
        tx_tso: has(vn::VIRTIO_NET_F_HOST_TSO4) || has(vn::VIRTIO_NET_F_HOST_TSO6),
    };
    let mut tun = 0;
    // Segmented frames need partial checksums too (the kernel refuses TSO without CSUM).
    if offloads.guest_csum {
        tun |= libc::TUN_F_CSUM;
        if has(vn::VIRTIO_NET_F_GUEST_TSO4) {
            tun |= libc::TUN_F_TSO4;
        }
        if has(vn::VIRTIO_NET_F_GUEST_TSO6) {
            tun |= libc::TUN_F_TSO6;
        }
    }
    (offloads, tun)
}

/// The worker thread's side: queue notifications and the backend fd.
pub struct NetHandler<B> {
    pub port: NetPort<B>,
    fd: RawFd,
}

impl<B: FrameIo> NetHandler<B> {
    /// `fd` is what the worker waits on for received frames (the backend's own fd).
    pub fn new(port: NetPort<B>, fd: RawFd) -> Self {
        NetHandler { port, fd }
    }
}

impl<B: FrameIo> QueueHandler for NetHandler<B> {
    fn process(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemory,
    ) -> Result<bool, QueueError> {
        match index {
            RX_QUEUE => {
                // New receive buffers: deliver what waited for them, watch the backend again.
                self.port.rx_buffers_added();
                fill_rx(&mut self.port, queue, mem)
            }
            TX_QUEUE => process_tx(&mut self.port, queue, mem),
            _ => Ok(false),
        }
    }

    fn backend_fds(&self) -> Vec<RawFd> {
        vec![self.fd]
    }

    fn backend_wanted(&self, _index: usize) -> bool {
        self.port.wants_backend()
    }

    fn backend_ready(
        &mut self,
        _index: usize,
        queues: &mut [Queue],
        mem: &GuestMemory,
    ) -> Result<Vec<usize>, QueueError> {
        let Some(rx) = queues.get_mut(RX_QUEUE).filter(|q| q.ready()) else {
            // The driver has not set up its receive queue: nothing can take frames, so stop
            // watching the backend until it notifies that queue.
            self.port.block_rx();
            return Ok(Vec::new());
        };
        Ok(if fill_rx(&mut self.port, rx, mem)? {
            vec![RX_QUEUE]
        } else {
            Vec::new()
        })
    }
}
