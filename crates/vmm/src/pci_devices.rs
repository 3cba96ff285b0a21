//! The VMM's side of PCI: builds the PCI bus with the VM's virtio devices and wires each one
//! to KVM, which the devices crate never touches.
//!
//! ```text
//!  guest writes notify reg ──KVM_IOEVENTFD──► queue eventfd ──► device worker thread
//!  device worker raises vector ──► irqfd eventfd ──KVM_IRQFD──► GSI ──GSI route──► MSI
//!  guest programs MSI-X entry (MMIO exit) ──► MsixVectors ──► GsiRouter ──KVM_SET_GSI_ROUTING
//! ```
//!
//! Each device gets one GSI per MSI-X vector from 24 up (0-23 are the IOAPIC pins). BARs are
//! placed in the 32-bit MMIO hole from [`layout::PCI_MMIO_START`], as firmware would; Linux
//! keeps them because they lie inside the host bridge window the DSDT declares.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KvmIrqRouting, kvm_irq_routing_entry, kvm_irq_routing_irqchip,
    kvm_irq_routing_msi,
};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vhpc_api::{DiskConfig, NetConfig, VsockConfig};
use vhpc_devices::bus::PioBus;
use vhpc_devices::pci::msix::{MsiMessage, MsiRouter, MsixVectors};
use vhpc_devices::pci::{PCI_CONFIG_PORT, PCI_CONFIG_PORT_LEN, PciBus, PciConfigIo};
use vhpc_devices::virtio::VirtioBackend;
use vhpc_devices::virtio::block::Block;
use vhpc_devices::virtio::pci_transport::{
    BAR_SIZE, VirtioPciDevice, msix_vector_count, notify_address,
};
use vhpc_devices::virtio::vsock::Vsock;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::layout;
use crate::memory::GuestMemory;
use crate::vm::VmError;

/// The first GSI for MSI routes: 0-23 are the in-kernel IOAPIC's pins.
pub const FIRST_MSI_GSI: u32 = 24;
/// GSIs the in-kernel PIC and IOAPIC route by default.
const IOAPIC_PINS: u32 = 24;
const PIC_PINS: u32 = 16;

/// Keeps the VM's whole GSI routing table: KVM_SET_GSI_ROUTING replaces it at once, so the
/// default IOAPIC/PIC routes (the serial ports' irqfds use them) are re-sent with every MSI
/// route.
pub struct GsiRouter {
    vm: Arc<VmFd>,
    msi: Mutex<BTreeMap<u32, MsiMessage>>,
}

impl GsiRouter {
    pub fn new(vm: Arc<VmFd>) -> Self {
        GsiRouter {
            vm,
            msi: Mutex::new(BTreeMap::new()),
        }
    }

    /// The routing table KVM gets: its own defaults for GSIs 0-23, then the MSI routes.
    fn table(msi: &BTreeMap<u32, MsiMessage>) -> Vec<kvm_irq_routing_entry> {
        let mut entries = Vec::new();
        for gsi in 0..IOAPIC_PINS {
            entries.push(irqchip_entry(gsi, KVM_IRQCHIP_IOAPIC, gsi));
            if gsi < PIC_PINS {
                let chip = if gsi < 8 {
                    KVM_IRQCHIP_PIC_MASTER
                } else {
                    KVM_IRQCHIP_PIC_SLAVE
                };
                entries.push(irqchip_entry(gsi, chip, gsi % 8));
            }
        }
        for (&gsi, m) in msi {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi = kvm_irq_routing_msi {
                address_lo: m.address as u32,
                address_hi: (m.address >> 32) as u32,
                data: m.data,
                ..Default::default()
            };
            entries.push(e);
        }
        entries
    }
}

fn irqchip_entry(gsi: u32, irqchip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip = kvm_irq_routing_irqchip { irqchip, pin };
    e
}

impl MsiRouter for GsiRouter {
    fn route(&self, gsi: u32, message: MsiMessage) -> std::io::Result<()> {
        let mut msi = self.msi.lock().unwrap_or_else(|p| p.into_inner());
        msi.insert(gsi, message);
        let routing = KvmIrqRouting::from_entries(&Self::table(&msi))
            .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        self.vm
            .set_gsi_routing(&routing)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}

fn device_err(what: &'static str) -> impl FnOnce(&dyn std::fmt::Display) -> VmError {
    move |e| VmError::Device {
        what,
        detail: e.to_string(),
    }
}

/// Builds PCI bus 0 (host bridge, one virtio-blk function per disk in order, so the first
/// disk is /dev/vda, then one virtio-net function per interface, eth0 first, then the vsock
/// device if there is one), wires every device to KVM and puts the config ports on `pio`.
pub fn build(
    vm: &Arc<VmFd>,
    mem: &GuestMemory,
    disks: &[DiskConfig],
    nets: &[NetConfig],
    vsock: Option<&VsockConfig>,
    pio: &mut PioBus,
) -> Result<Arc<PciBus>, VmError> {
    let mut wiring = Wiring {
        vm,
        mem,
        router: Arc::new(GsiRouter::new(vm.clone())),
        bus: PciBus::default(),
        next_bar: layout::PCI_MMIO_START,
        next_gsi: FIRST_MSI_GSI,
    };
    for (index, disk) in disks.iter().enumerate() {
        let id = disk
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let block = Block::open(&disk.path, disk.read_only, &id)
            .map_err(|e| device_err("virtio-blk")(&e))?;
        log::debug!(
            "virtio-blk{index}: {} ({} sectors{})",
            disk.path.display(),
            block.sectors(),
            if disk.read_only { ", read-only" } else { "" }
        );
        wiring.add("virtio-blk", format!("virtio-blk{index}"), Box::new(block))?;
    }
    for (index, net) in nets.iter().enumerate() {
        let device = crate::net_backend::open(net, index)?;
        wiring.add("virtio-net", format!("virtio-net{index}"), Box::new(device))?;
    }
    if let Some(config) = vsock {
        let device = Vsock::new(config.guest_cid, &config.socket)
            .map_err(|e| device_err("virtio-vsock")(&e))?;
        log::debug!(
            "virtio-vsock: guest CID {}, host socket {}",
            config.guest_cid,
            config.socket.display()
        );
        wiring.add("virtio-vsock", "virtio-vsock".into(), Box::new(device))?;
    }
    let bus = Arc::new(wiring.bus);
    pio.insert(
        PCI_CONFIG_PORT,
        PCI_CONFIG_PORT_LEN,
        Arc::new(Mutex::new(PciConfigIo(bus.clone()))),
    )
    .map_err(|e| device_err("PCI config ports")(&e))?;
    Ok(bus)
}

/// What placing virtio devices on the bus needs: BARs and GSIs are handed out in order.
struct Wiring<'a> {
    vm: &'a Arc<VmFd>,
    mem: &'a GuestMemory,
    router: Arc<dyn MsiRouter>,
    bus: PciBus,
    next_bar: u64,
    next_gsi: u32,
}

impl Wiring<'_> {
    /// Puts `backend` on the bus as a virtio-pci function: its BAR, one irqfd per MSI-X
    /// vector, one ioeventfd per queue.
    fn add(
        &mut self,
        what: &'static str,
        name: String,
        backend: Box<dyn VirtioBackend>,
    ) -> Result<(), VmError> {
        let vm = self.vm;
        let queues = backend.queue_max_sizes().len();
        let vectors = msix_vector_count(queues);
        let mut irqfds = Vec::new();
        let mut gsis = Vec::new();
        for _ in 0..vectors {
            let fd = EventFd::new(EFD_NONBLOCK).map_err(|e| device_err("an MSI-X irqfd")(&e))?;
            vm.register_irqfd(&fd, self.next_gsi)
                .map_err(|source| VmError::Kvm {
                    what: "KVM_IRQFD",
                    source,
                })?;
            irqfds.push(fd);
            gsis.push(self.next_gsi);
            self.next_gsi += 1;
        }
        let msix = Arc::new(MsixVectors::new(irqfds, gsis, self.router.clone()));
        let bar = self.next_bar;
        self.next_bar += BAR_SIZE;
        if self.next_bar > layout::PCI_MMIO_END {
            return Err(device_err(what)(&"the PCI MMIO window is full"));
        }
        let device = VirtioPciDevice::new(name, backend, self.mem.clone(), bar, msix)
            .map_err(|e| device_err(what)(&e))?;
        for (queue, event) in device.queue_events().iter().enumerate() {
            vm.register_ioevent(
                event,
                &IoEventAddress::Mmio(notify_address(bar, queue)),
                NoDatamatch,
            )
            .map_err(|source| VmError::Kvm {
                what: "KVM_IOEVENTFD",
                source,
            })?;
        }
        self.bus
            .add(Arc::new(Mutex::new(device)))
            .map_err(|e| device_err(what)(&e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_table_keeps_the_irqchip_defaults() {
        let mut msi = BTreeMap::new();
        msi.insert(
            24,
            MsiMessage {
                address: 0xfee0_0000,
                data: 0x41,
            },
        );
        let t = GsiRouter::table(&msi);
        assert_eq!(t.len(), 24 + 16 + 1);
        let last = t.last().expect("MSI entry");
        assert_eq!((last.gsi, last.type_), (24, KVM_IRQ_ROUTING_MSI));
        // SAFETY: the entry was built as an MSI route, so `msi` is the union's live field.
        let m = unsafe { last.u.msi };
        assert_eq!((m.address_lo, m.data), (0xfee0_0000, 0x41));
        let com1 = t.iter().filter(|e| e.gsi == 4).count();
        assert_eq!(com1, 2, "IOAPIC pin and PIC pin for IRQ 4");
    }
}
