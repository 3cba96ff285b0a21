//! The guest-physical memory map every vhpc VM gets.
//!
//! ```text
//! 0x0000_0500  boot GDT                     0x0000_9000  PML4
//! 0x0000_0540  boot IDT (empty)             0x0000_a000  PDPT
//! 0x0000_6000  PVH hvm_start_info, module list, memory map (PVH boot only)
//! 0x0000_7000  boot_params ("zero page")    0x0000_b000  4 page directories (identity 0-4 GiB)
//! 0x0000_8ff0  boot stack top               0x0002_0000  kernel command line
//! 0x0009_fc00  EBDA .. 0x000f_ffff          reserved (ACPI tables at 0x000e_0000)
//! 0x0010_0000  kernel (bzImage protected-mode code, or vmlinux segments), then RAM
//! 0xc000_0000  MMIO hole to 4 GiB: PCI BARs to 0xfec0_0000, IOAPIC 0xfec0_0000, LAPIC 0xfee0_0000
//! 0x1_0000_0000  RAM above the hole, when the guest has more than 3 GiB
//! ```

pub const BOOT_GDT_START: u64 = 0x500;
/// Room for 8 descriptors: the Linux and PVH boot GDTs must fit below the IDT.
pub const BOOT_GDT_MAX_ENTRIES: u64 = 8;
pub const BOOT_IDT_START: u64 = 0x540;
/// PVH boot: the hvm_start_info (56 bytes), then one module entry (32 bytes), then the memory
/// map up to the zero page.
pub const PVH_START_INFO: u64 = 0x6000;
pub const PVH_MODLIST: u64 = 0x6040;
pub const PVH_MEMMAP: u64 = 0x6080;
pub const PVH_MEMMAP_END: u64 = 0x7000;
pub const ZERO_PAGE_START: u64 = 0x7000;
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
pub const PML4_START: u64 = 0x9000;
pub const PDPT_START: u64 = 0xa000;
pub const PD_START: u64 = 0xb000;
/// Page directories: one per GiB identity-mapped at boot.
pub const PD_COUNT: u64 = 4;
pub const CMDLINE_START: u64 = 0x20000;
/// Start of the Extended BIOS Data Area; RAM below it is usable by the guest.
pub const EBDA_START: u64 = 0x9fc00;
/// The ACPI tables: inside the BIOS area Linux scans for the RSDP.
pub const ACPI_TABLES_START: u64 = 0xe0000;
pub const ACPI_TABLES_MAX_LEN: u64 = 0x20000;
/// Where high memory (and the kernel) starts.
pub const HIGH_RAM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole; guest RAM stops here and resumes at 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// The window PCI BARs are placed in (and the host bridge's _CRS declares): the MMIO hole
/// below the IOAPIC.
pub const PCI_MMIO_START: u64 = MMIO_HOLE_START;
pub const PCI_MMIO_END: u64 = IOAPIC_ADDR as u64;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;

/// The guest RAM ranges (start, length) for a guest of `size` bytes.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    if size <= MMIO_HOLE_START {
        vec![(0, size)]
    } else {
        vec![
            (0, MMIO_HOLE_START),
            (MMIO_HOLE_END, size - MMIO_HOLE_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_range() {
        assert_eq!(ram_ranges(512 << 20), vec![(0, 512 << 20)]);
        assert_eq!(ram_ranges(MMIO_HOLE_START), vec![(0, MMIO_HOLE_START)]);
    }

    #[test]
    fn large_guest_skips_the_mmio_hole() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r, vec![(0, MMIO_HOLE_START), (1 << 32, 1 << 30)]);
        assert_eq!(r.iter().map(|(_, l)| l).sum::<u64>(), 4 << 30);
    }

    #[test]
    fn boot_structures_do_not_overlap() {
        let mut areas = [
            (BOOT_GDT_START, BOOT_GDT_MAX_ENTRIES * 8),
            (BOOT_IDT_START, 0x8),
            (PVH_START_INFO, PVH_MODLIST - PVH_START_INFO),
            (PVH_MODLIST, PVH_MEMMAP - PVH_MODLIST),
            (PVH_MEMMAP, PVH_MEMMAP_END - PVH_MEMMAP),
            (ZERO_PAGE_START, 0x1000),
            (PML4_START, 0x1000),
            (PDPT_START, 0x1000),
            (PD_START, PD_COUNT * 0x1000),
            (CMDLINE_START, 0x1000),
            (ACPI_TABLES_START, ACPI_TABLES_MAX_LEN),
        ];
        areas.sort();
        for w in areas.windows(2) {
            assert!(
                w[0].0 + w[0].1 <= w[1].0,
                "{:x?} overlaps {:x?}",
                w[0],
                w[1]
            );
        }
        const { assert!(PD_START + PD_COUNT * 0x1000 <= CMDLINE_START) };
        const { assert!(ACPI_TABLES_START + ACPI_TABLES_MAX_LEN <= HIGH_RAM_START) };
    }
}
