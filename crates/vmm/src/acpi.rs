//! ACPI tables (acpi_tables crate): RSDP → XSDT → {FADT → DSDT, MADT}.
//!
//! The platform is ACPI "hardware-reduced", as in Cloud Hypervisor and Firecracker: no legacy
//! PM1 blocks or SCI, just the sleep-control, sleep-status and reset registers of
//! [`vhpc_devices::acpi_pm`]. A stock kernel then finds every CPU in the MADT, powers off by
//! writing the DSDT's `_S5_` sleep type with SLP_EN to the sleep-control register, and reboots
//! through the FADT's reset register.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, MADT, ProcessorLocalApic,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, aml};
use vhpc_devices::acpi_pm;
use vhpc_devices::rtc::{RTC_IRQ, RTC_PORT};
use vhpc_devices::serial::{COM1_IRQ, COM1_PORT, COM2_IRQ, COM2_PORT};

const OEM_ID: [u8; 6] = *b"VHPC  ";
const OEM_TABLE_ID: [u8; 8] = *b"VHPCVMM ";
const OEM_REVISION: u32 = 1;

/// IA-PC boot architecture flag: no VGA hardware, so the kernel does not probe for it. The
/// "8042 present" flag stays clear: the kernel then skips the keyboard controller probe.
const IAPC_BOOT_ARCH_NO_VGA: u16 = 1 << 2;

/// What the tables describe.
#[derive(Clone, Debug)]
pub struct AcpiConfig {
    /// The local APIC ID of each vCPU, in vCPU order.
    pub cpu_apic_ids: Vec<u8>,
    pub ioapic_addr: u32,
    pub ioapic_id: u8,
    pub lapic_addr: u32,
}

/// The tables as one blob to copy to `base` in guest memory.
pub struct AcpiTables {
    pub bytes: Vec<u8>,
    /// Guest-physical address of the RSDP (handed to the kernel in boot_params).
    pub rsdp_addr: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("{0} vCPUs do not fit in the MADT (at most 255 with 8-bit APIC IDs)")]
    TooManyCpus(usize),
    #[error("the ACPI tables ({len} bytes) do not fit in the {max} bytes reserved for them")]
    TooBig { len: usize, max: u64 },
}

fn io_register(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// A legacy ISA device in `\_SB_`: PNP ID, I/O ports and one edge-triggered IRQ. Declaring
/// them is what makes the kernel map their IRQs on a hardware-reduced platform (it sets up no
/// legacy ISA IRQs by itself), so the 8250 and rtc_cmos drivers can request them.
fn isa_device(path: &str, pnp_id: &str, uid: u8, port: u16, len: u8, irq: u32) -> Vec<u8> {
    let io = aml::IO::new(port, port, 1, len);
    let irq = aml::Interrupt::new(true, true, false, false, irq);
    let crs = aml::ResourceTemplate::new(vec![&io, &irq]);
    let hid = aml::EISAName::new(pnp_id);
    let hid = aml::Name::new("_HID".into(), &hid);
    let uid = aml::Name::new("_UID".into(), &uid);
    let crs = aml::Name::new("_CRS".into(), &crs);
    to_bytes(&aml::Device::new(path.into(), vec![&hid, &uid, &crs]))
}

/// The PCI host bridge `\_SB_.PCI0` (PNP0A03). With ACPI on, Linux finds PCI root buses only
/// through the DSDT (it does not fall back to probing bus 0 by itself), then reaches their
/// config space through mechanism #1 at 0xCF8 (no MCFG: no ECAM). `_CRS` gives the bus
/// range, the config ports and the MMIO window our BARs lie in, so the kernel keeps them where
/// the VMM put them. No `_PRT`: our devices use MSI-X only (interrupt pin 0).
fn pci_host_bridge(mmio_start: u64, mmio_end: u64) -> Vec<u8> {
    let buses = aml::AddressSpace::new_bus_number(0u16, 0u16);
    let config_ports = aml::IO::new(0xcf8, 0xcf8, 1, 8);
    let window = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        mmio_start as u32,
        (mmio_end - 1) as u32,
        None,
    );
    let crs = aml::ResourceTemplate::new(vec![&buses, &config_ports, &window]);
    let hid = aml::EISAName::new("PNP0A03");
    let hid = aml::Name::new("_HID".into(), &hid);
    let adr = aml::Name::new("_ADR".into(), &aml::ZERO);
    let seg = aml::Name::new("_SEG".into(), &aml::ZERO);
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let bbn = aml::Name::new("_BBN".into(), &aml::ZERO);
    let crs = aml::Name::new("_CRS".into(), &crs);
    to_bytes(&aml::Device::new(
        "_SB_.PCI0".into(),
        vec![&hid, &adr, &seg, &uid, &bbn, &crs],
    ))
}

fn dsdt() -> Vec<u8> {
    // _S5_: {SLP_TYPa, SLP_TYPb, reserved, reserved}; the kernel writes SLP_TYPa.
    let s5_type = acpi_pm::S5_SLEEP_TYPE;
    let s5 = aml::Package::new(vec![&s5_type, &s5_type, &aml::ZERO, &aml::ZERO]);
    let mut body = Vec::new();
    aml::Name::new("_S5_".into(), &s5).to_aml_bytes(&mut body);
    body.extend(isa_device(
        "_SB_.COM1",
        "PNP0501",
        0,
        COM1_PORT,
        8,
        COM1_IRQ,
    ));
    body.extend(isa_device(
        "_SB_.COM2",
        "PNP0501",
        1,
        COM2_PORT,
        8,
        COM2_IRQ,
    ));
    body.extend(isa_device("_SB_.RTC_", "PNP0B00", 0, RTC_PORT, 2, RTC_IRQ));
    body.extend(pci_host_bridge(
        crate::layout::PCI_MMIO_START,
        crate::layout::PCI_MMIO_END,
    ));
    let header_len = 36;
    let mut sdt = Sdt::new(
        *b"DSDT",
        (header_len + body.len()) as u32,
        6,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    sdt.write_bytes(header_len, &body);
    sdt.update_checksum();
    sdt.as_slice().to_vec()
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut builder = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    builder.iapc_boot_arch = IAPC_BOOT_ARCH_NO_VGA.into();
    builder.reset_reg = io_register(acpi_pm::RESET_PORT);
    builder.reset_value = acpi_pm::RESET_VALUE;
    builder.sleep_control_reg = io_register(acpi_pm::SLEEP_CONTROL_PORT);
    builder.sleep_status_reg = io_register(acpi_pm::SLEEP_STATUS_PORT);
    to_bytes(&builder.finalize())
}

fn madt(config: &AcpiConfig) -> Result<Vec<u8>, AcpiError> {
    if config.cpu_apic_ids.len() > 255 {
        return Err(AcpiError::TooManyCpus(config.cpu_apic_ids.len()));
    }
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(config.lapic_addr),
    );
    for (uid, &apic_id) in config.cpu_apic_ids.iter().enumerate() {
        madt.add_structure(ProcessorLocalApic::new(
            uid as u8,
            apic_id,
            EnabledStatus::Enabled,
        ));
    }
    madt.add_structure(IoApic::new(config.ioapic_id, config.ioapic_addr, 0));
    Ok(to_bytes(&madt))
}

/// Appends `table` to `blob` 16-byte aligned; returns its guest address.
fn place(blob: &mut Vec<u8>, base: u64, table: &[u8]) -> u64 {
    blob.resize(blob.len().next_multiple_of(16), 0);
    let addr = base + blob.len() as u64;
    blob.extend_from_slice(table);
    addr
}

/// Builds the tables for guest address `base` (16-byte aligned, inside the BIOS area the
/// kernel scans, so even a kernel that ignores boot_params' RSDP pointer finds them).
pub fn build(config: &AcpiConfig, base: u64) -> Result<AcpiTables, AcpiError> {
    let rsdp_len = Rsdp::len();
    let mut blob = vec![0u8; rsdp_len];
    let dsdt_addr = place(&mut blob, base, &dsdt());
    let fadt_addr = place(&mut blob, base, &fadt(dsdt_addr));
    let madt_addr = place(&mut blob, base, &madt(config)?);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt_addr = place(&mut blob, base, &to_bytes(&xsdt));
    blob[..rsdp_len].copy_from_slice(&to_bytes(&Rsdp::new(OEM_ID, xsdt_addr)));
    let max = crate::layout::ACPI_TABLES_MAX_LEN;
    if blob.len() as u64 > max {
        return Err(AcpiError::TooBig {
            len: blob.len(),
            max,
        });
    }
    Ok(AcpiTables {
        bytes: blob,
        rsdp_addr: base,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    const BASE: u64 = 0xe0000;

    fn config(cpus: u8) -> AcpiConfig {
        AcpiConfig {
            cpu_apic_ids: (0..cpus).collect(),
            ioapic_addr: 0xfec0_0000,
            ioapic_id: cpus,
            lapic_addr: 0xfee0_0000,
        }
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    /// The table at guest address `addr`, by its own length field.
    fn table(t: &AcpiTables, addr: u64) -> &[u8] {
        let off = (addr - BASE) as usize;
        let len = u32_at(&t.bytes, off + 4) as usize;
        &t.bytes[off..off + len]
    }

    fn sums_to_zero(b: &[u8]) -> bool {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x)) == 0
    }

    #[test]
    fn rsdp_leads_to_every_table_and_checksums_hold() {
        let t = build(&config(2), BASE).unwrap();
        assert_eq!(t.rsdp_addr, BASE);
        let rsdp = &t.bytes[..36];
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert!(sums_to_zero(&rsdp[..20]) && sums_to_zero(rsdp));
        let xsdt = table(&t, u64_at(rsdp, 24));
        assert_eq!(&xsdt[..4], b"XSDT");
        assert!(sums_to_zero(xsdt));
        let entries: Vec<u64> = (36..xsdt.len())
            .step_by(8)
            .map(|o| u64_at(xsdt, o))
            .collect();
        let sigs: Vec<&[u8]> = entries.iter().map(|&a| &table(&t, a)[..4]).collect();
        assert_eq!(sigs, [b"FACP", b"APIC"]);
        for &a in &entries {
            assert!(
                sums_to_zero(table(&t, a)),
                "checksum of {:?}",
                &table(&t, a)[..4]
            );
        }
        let fadt = table(&t, entries[0]);
        let dsdt = table(&t, u64_at(fadt, 140)); // X_DSDT
        assert_eq!(&dsdt[..4], b"DSDT");
        assert!(sums_to_zero(dsdt));
    }

    #[test]
    fn fadt_is_hardware_reduced_with_our_registers() {
        let t = build(&config(1), BASE).unwrap();
        let xsdt = table(&t, u64_at(&t.bytes, 24));
        let fadt = table(&t, u64_at(xsdt, 36));
        let flags = u32_at(fadt, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        // RESET_REG: a GAS in system I/O space at our reset port, then the reset value.
        assert_eq!(fadt[116], 1);
        assert_eq!(u64_at(fadt, 120), u64::from(acpi_pm::RESET_PORT));
        assert_eq!(fadt[128], acpi_pm::RESET_VALUE);
        // SLEEP_CONTROL_REG at 244, SLEEP_STATUS_REG at 256.
        assert_eq!(u64_at(fadt, 248), u64::from(acpi_pm::SLEEP_CONTROL_PORT));
        assert_eq!(u64_at(fadt, 260), u64::from(acpi_pm::SLEEP_STATUS_PORT));
    }

    #[test]
    fn madt_lists_every_cpu_and_the_ioapic() {
        let t = build(&config(4), BASE).unwrap();
        let xsdt = table(&t, u64_at(&t.bytes, 24));
        let madt = table(&t, u64_at(xsdt, 44));
        assert_eq!(u32_at(madt, 36), 0xfee0_0000);
        let mut off = 44;
        let (mut apic_ids, mut ioapics) = (Vec::new(), Vec::new());
        while off < madt.len() {
            let (kind, len) = (madt[off], madt[off + 1] as usize);
            match kind {
                0 => apic_ids.push((madt[off + 2], madt[off + 3], u32_at(madt, off + 4))),
                1 => ioapics.push((madt[off + 2], u32_at(madt, off + 4))),
                other => panic!("unexpected MADT entry {other}"),
            }
            off += len;
        }
        assert_eq!(apic_ids, [(0, 0, 1), (1, 1, 1), (2, 2, 1), (3, 3, 1)]);
        assert_eq!(ioapics, [(4, 0xfec0_0000)]);
        assert_eq!(off, madt.len(), "entries fill the table exactly");
    }

    #[test]
    fn dsdt_declares_s5() {
        let t = build(&config(1), BASE).unwrap();
        let xsdt = table(&t, u64_at(&t.bytes, 24));
        let fadt = table(&t, u64_at(xsdt, 36));
        let dsdt = table(&t, u64_at(fadt, 140));
        let body = &dsdt[36..];
        let at = body
            .windows(4)
            .position(|w| w == b"_S5_")
            .expect("_S5_ in the DSDT");
        // NameOp, "_S5_", PackageOp, PkgLength, 4 elements, BytePrefix S5 type.
        assert_eq!(body[at - 1], 0x08);
        assert_eq!(body[at + 4], 0x12);
        assert_eq!(body[at + 6], 4);
        assert_eq!(&body[at + 7..at + 9], &[0x0a, acpi_pm::S5_SLEEP_TYPE]);
    }

    #[test]
    fn dsdt_declares_the_isa_devices_with_their_irqs() {
        let t = build(&config(1), BASE).unwrap();
        let xsdt = table(&t, u64_at(&t.bytes, 24));
        let fadt = table(&t, u64_at(xsdt, 36));
        let body = &table(&t, u64_at(fadt, 140))[36..];
        for (name, port, irq) in [
            (b"COM1", 0x3f8u16, 4u8),
            (b"COM2", 0x2f8, 3),
            (b"RTC_", 0x70, 8),
        ] {
            let at = body.windows(4).position(|w| w == name).expect("device");
            let rest = &body[at..];
            // IO descriptor (0x47, decode16, min, max) and an extended IRQ descriptor (0x89).
            let io = [
                0x47,
                1,
                port as u8,
                (port >> 8) as u8,
                port as u8,
                (port >> 8) as u8,
            ];
            assert!(rest.windows(6).any(|w| w == io), "{name:?} ports");
            let ext_irq = [0x89, 6, 0, 0x03, 1, irq, 0, 0, 0];
            assert!(rest.windows(9).any(|w| w == ext_irq), "{name:?} irq");
        }
    }

    #[test]
    fn dsdt_declares_the_pci_host_bridge_and_its_window() {
        let t = build(&config(1), BASE).unwrap();
        let xsdt = table(&t, u64_at(&t.bytes, 24));
        let fadt = table(&t, u64_at(xsdt, 36));
        let body = &table(&t, u64_at(fadt, 140))[36..];
        let at = body.windows(4).position(|w| w == b"PCI0").expect("PCI0");
        let rest = &body[at..];
        // EISA ID of PNP0A03, compressed: 0x41d0, 0x0a03.
        assert!(
            rest.windows(4).any(|w| w == [0x41, 0xd0, 0x0a, 0x03]),
            "_HID"
        );
        // DWord memory descriptor (0x87) with min 0xc0000000 and max 0xfebfffff.
        let min = 0xc000_0000u32.to_le_bytes();
        let max = 0xfebf_ffffu32.to_le_bytes();
        let window = rest
            .windows(18)
            .any(|w| w[0] == 0x87 && w[10..14] == min && w[14..18] == max);
        assert!(window, "MMIO window in _CRS");
        // The config ports 0xcf8..0xcff.
        assert!(
            rest.windows(8)
                .any(|w| w == [0x47, 1, 0xf8, 0x0c, 0xf8, 0x0c, 1, 8])
        );
    }

    #[test]
    fn too_many_cpus_is_an_error() {
        let mut c = config(1);
        c.cpu_apic_ids = vec![0; 300];
        assert!(matches!(build(&c, BASE), Err(AcpiError::TooManyCpus(300))));
    }
}
