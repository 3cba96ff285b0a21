//! The PVH boot protocol (Xen's `XEN_ELFNOTE_PHYS32_ENTRY`, used by every modern VMM): the
//! kernel is an ELF whose note names a 32-bit entry point; the vCPU enters it in 32-bit
//! protected mode with paging off, flat segments, and EBX pointing at an `hvm_start_info` that
//! describes the memory map, the command line, the modules (the initramfs) and the ACPI RSDP.
//!
//! ```text
//! PVH_START_INFO  hvm_start_info { magic, version 1, nr_modules, modlist, cmdline, rsdp, memmap }
//! PVH_MODLIST     hvm_modlist_entry for the initramfs (when there is one)
//! PVH_MEMMAP      hvm_memmap_table_entry[]: the e820 map (RAM, reserved BIOS area)
//! BOOT_GDT_START  null, 0x08 32-bit code, 0x10 data, 0x18 32-bit TSS
//! ```

use kvm_bindings::{kvm_regs, kvm_sregs};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Bytes, GuestAddress};

use super::BootError;
use super::cpu_state::{gdt_entry, load_flat_segments, segment, write_u64s};
use super::params::e820_map;
use crate::layout;
use crate::memory::GuestMemory;

/// `hvm_start_info.magic`: "xEn3" with the top bit set.
pub const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// Version 1 has the memory map fields.
const START_INFO_VERSION: u32 = 1;

pub const PVH_CS: u16 = 0x08;
pub const PVH_DS: u16 = 0x10;
pub const PVH_TSS: u16 = 0x18;

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;

/// What the start info describes besides memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PvhInfo {
    /// Guest-physical address of the NUL-terminated command line.
    pub cmdline_addr: u64,
    /// The initramfs, passed as the first module: (address, size).
    pub initramfs: Option<(u64, u64)>,
    /// The ACPI RSDP, 0 if there are no ACPI tables.
    pub rsdp_addr: u64,
}

/// The start info, its module list and its memory map for guest memory `mem`.
pub fn start_info(
    mem: &GuestMemory,
    info: &PvhInfo,
) -> Result<
    (
        hvm_start_info,
        Vec<hvm_modlist_entry>,
        Vec<hvm_memmap_table_entry>,
    ),
    BootError,
> {
    let memmap: Vec<hvm_memmap_table_entry> = e820_map(mem)
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.r#type,
            reserved: 0,
        })
        .collect();
    let capacity = (layout::PVH_MEMMAP_END - layout::PVH_MEMMAP) as usize
        / std::mem::size_of::<hvm_memmap_table_entry>();
    if memmap.len() > capacity {
        return Err(BootError::GuestWrite {
            what: "the PVH memory map",
            detail: format!("{} entries do not fit (at most {capacity})", memmap.len()),
        });
    }
    let modules: Vec<hvm_modlist_entry> = info
        .initramfs
        .map(|(paddr, size)| hvm_modlist_entry {
            paddr,
            size,
            cmdline_paddr: 0,
            reserved: 0,
        })
        .into_iter()
        .collect();
    let start = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: START_INFO_VERSION,
        flags: 0,
        nr_modules: modules.len() as u32,
        modlist_paddr: if modules.is_empty() {
            0
        } else {
            layout::PVH_MODLIST
        },
        cmdline_paddr: info.cmdline_addr,
        rsdp_paddr: info.rsdp_addr,
        memmap_paddr: layout::PVH_MEMMAP,
        memmap_entries: memmap.len() as u32,
        reserved: 0,
    };
    Ok((start, modules, memmap))
}

/// Writes the start info, module list, memory map and the PVH GDT into guest memory.
pub fn write(mem: &GuestMemory, info: &PvhInfo) -> Result<(), BootError> {
    let (start, modules, memmap) = start_info(mem, info)?;
    let err = |what| {
        move |e: vm_memory::GuestMemoryError| BootError::GuestWrite {
            what,
            detail: e.to_string(),
        }
    };
    mem.write_obj(start, GuestAddress(layout::PVH_START_INFO))
        .map_err(err("the PVH start info"))?;
    for (i, m) in modules.iter().enumerate() {
        let at = layout::PVH_MODLIST + (i * std::mem::size_of::<hvm_modlist_entry>()) as u64;
        mem.write_obj(*m, GuestAddress(at))
            .map_err(err("the PVH module list"))?;
    }
    for (i, e) in memmap.iter().enumerate() {
        let at = layout::PVH_MEMMAP + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        mem.write_obj(*e, GuestAddress(at))
            .map_err(err("the PVH memory map"))?;
    }
    write_u64s(mem, layout::BOOT_GDT_START, &pvh_gdt(), "the PVH GDT")
}

/// The GDT the PVH entry state refers to: flat 32-bit code and data, a 32-bit TSS.
pub fn pvh_gdt() -> [u64; 4] {
    [
        0,
        gdt_entry(0xc09b, 0, 0xfffff), // code: present, exec/read, D=1, 4K granularity
        gdt_entry(0xc093, 0, 0xfffff), // data: present, read/write, B=1, 4K granularity
        gdt_entry(0x008b, 0, 0x67),    // busy 32-bit TSS
    ]
}

/// The special registers at the PVH entry: protected mode, paging off, flat segments. `sregs`
/// is the vCPU's current (reset) state; what the protocol does not fix is kept.
pub fn entry_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let gdt = pvh_gdt();
    sregs.gdt.base = layout::BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    load_flat_segments(
        &mut sregs,
        segment(gdt[1], PVH_CS),
        segment(gdt[2], PVH_DS),
        segment(gdt[3], PVH_TSS),
    );
    sregs.cr0 = CR0_PE | CR0_ET;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    sregs
}

/// The general registers at the PVH entry: EBX = start info, interrupts off.
pub fn entry_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rbx: layout::PVH_START_INFO,
        rflags: 0x2,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::test_memory as memory;

    #[test]
    fn start_info_has_the_abi_layout() {
        // Offsets from xen/include/public/arch-x86/hvm/start_info.h.
        assert_eq!(std::mem::size_of::<hvm_start_info>(), 56);
        assert_eq!(std::mem::size_of::<hvm_modlist_entry>(), 32);
        assert_eq!(std::mem::size_of::<hvm_memmap_table_entry>(), 24);
        let mem = memory(64);
        let info = PvhInfo {
            cmdline_addr: layout::CMDLINE_START,
            initramfs: Some((0x300_0000, 0x1234)),
            rsdp_addr: layout::ACPI_TABLES_START,
        };
        write(&mem, &info).expect("write");
        let at = |off: u64| GuestAddress(layout::PVH_START_INFO + off);
        let u32_at = |off| mem.read_obj::<u32>(at(off)).expect("read");
        let u64_at = |off| mem.read_obj::<u64>(at(off)).expect("read");
        assert_eq!(u32_at(0), XEN_HVM_START_MAGIC);
        assert_eq!(u32_at(4), 1);
        assert_eq!(u32_at(12), 1, "nr_modules");
        assert_eq!(u64_at(16), layout::PVH_MODLIST);
        assert_eq!(u64_at(24), layout::CMDLINE_START);
        assert_eq!(u64_at(32), layout::ACPI_TABLES_START);
        assert_eq!(u64_at(40), layout::PVH_MEMMAP);
        assert_eq!(u32_at(48), 3, "memmap_entries");
        let module: hvm_modlist_entry = mem
            .read_obj(GuestAddress(layout::PVH_MODLIST))
            .expect("module");
        assert_eq!((module.paddr, module.size), (0x300_0000, 0x1234));
    }

    #[test]
    fn memmap_entries_cover_ram_and_reserve_the_bios_area() {
        let mem = memory(64);
        write(&mem, &PvhInfo::default()).expect("write");
        let entry = |i: u64| -> hvm_memmap_table_entry {
            mem.read_obj(GuestAddress(layout::PVH_MEMMAP + 24 * i))
                .expect("entry")
        };
        let got: Vec<(u64, u64, u32)> = (0..3)
            .map(|i| {
                let e = entry(i);
                (e.addr, e.size, e.type_)
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (0, layout::EBDA_START, 1),
                (
                    layout::EBDA_START,
                    layout::HIGH_RAM_START - layout::EBDA_START,
                    2
                ),
                (
                    layout::HIGH_RAM_START,
                    (64 << 20) - layout::HIGH_RAM_START,
                    1
                ),
            ]
        );
        let (start, modules, _) = start_info(&mem, &PvhInfo::default()).expect("info");
        assert!(modules.is_empty());
        assert_eq!((start.nr_modules, start.modlist_paddr), (0, 0));
    }

    #[test]
    fn large_guests_get_a_map_around_the_hole() {
        let (start, _, memmap) = start_info(&memory(4096), &PvhInfo::default()).expect("info");
        assert_eq!(start.memmap_entries, 4);
        let last = memmap.last().expect("entries");
        assert_eq!((last.addr, last.size, last.type_), (1 << 32, 1 << 30, 1));
    }

    #[test]
    fn entry_state_is_32_bit_protected_mode_without_paging() {
        let s = entry_sregs(kvm_sregs::default());
        assert_eq!(s.cr0 & (1 | 1 << 31), 1, "PE on, PG off");
        assert_eq!((s.cr4, s.efer), (0, 0));
        assert_eq!((s.cs.selector, s.cs.db, s.cs.l), (PVH_CS, 1, 0));
        assert_eq!((s.cs.base, s.cs.limit), (0, 0xffff_ffff));
        assert_eq!((s.ss.selector, s.ss.db, s.ss.type_), (PVH_DS, 1, 3));
        assert_eq!((s.tr.type_, s.tr.s, s.tr.limit), (0xb, 0, 0x67));
        let r = entry_regs(0x10_002c);
        assert_eq!(
            (r.rip, r.rbx, r.rflags),
            (0x10_002c, layout::PVH_START_INFO, 2)
        );
    }
}
