//! The boot vCPU's entry state for the Linux 64-bit boot protocol: flat GDT with __BOOT_CS
//! (0x10) and __BOOT_DS (0x18), identity-mapped page tables, long mode, RSI = boot_params.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use super::BootError;
use crate::layout;
use crate::memory::GuestMemory;

pub const BOOT_CS: u16 = 0x10;
pub const BOOT_DS: u16 = 0x18;
pub const BOOT_TSS: u16 = 0x20;

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const PAGE_PRESENT_RW: u64 = 0x3;
const PAGE_HUGE: u64 = 0x80;

/// A GDT descriptor from flags (access byte + granularity nibble), base and limit.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << 32)
        | ((u64::from(flags) & 0xf0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << 32)
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

/// The boot GDT: null, null, 64-bit code, data, TSS.
pub fn boot_gdt() -> [u64; 5] {
    [
        0,
        0,
        gdt_entry(0xa09b, 0, 0xfffff), // code: present, DPL0, exec/read, L=1, 4K granularity
        gdt_entry(0xc093, 0, 0xfffff), // data: present, read/write, D/B=1, 4K granularity
        gdt_entry(0x808b, 0, 0xfffff), // busy 64-bit TSS
    ]
}

/// The segment register KVM wants for a GDT entry.
pub fn segment(entry: u64, selector: u16) -> kvm_segment {
    let field = |shift: u32, bits: u32| ((entry >> shift) & ((1u64 << bits) - 1)) as u8;
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit_raw = (entry & 0xffff) | ((entry >> 32) & 0xf_0000);
    let g = field(55, 1);
    let limit = if g == 1 {
        (limit_raw << 12) | 0xfff
    } else {
        limit_raw
    };
    kvm_segment {
        base,
        limit: limit as u32,
        selector,
        type_: field(40, 4),
        present: field(47, 1),
        dpl: field(45, 2),
        db: field(54, 1),
        s: field(44, 1),
        l: field(53, 1),
        g,
        avl: field(52, 1),
        unusable: u8::from(field(47, 1) == 0),
        padding: 0,
    }
}

pub(crate) fn write_u64s(
    mem: &GuestMemory,
    at: u64,
    values: &[u64],
    what: &'static str,
) -> Result<(), BootError> {
    for (i, v) in values.iter().enumerate() {
        mem.write_obj(*v, GuestAddress(at + 8 * i as u64))
            .map_err(|e| BootError::GuestWrite {
                what,
                detail: e.to_string(),
            })?;
    }
    Ok(())
}

/// Identity-maps the first `PD_COUNT` GiB with 2 MiB pages.
fn write_page_tables(mem: &GuestMemory) -> Result<(), BootError> {
    write_u64s(
        mem,
        layout::PML4_START,
        &[layout::PDPT_START | PAGE_PRESENT_RW],
        "the PML4",
    )?;
    let pdpt: Vec<u64> = (0..layout::PD_COUNT)
        .map(|i| (layout::PD_START + i * 0x1000) | PAGE_PRESENT_RW)
        .collect();
    write_u64s(mem, layout::PDPT_START, &pdpt, "the PDPT")?;
    let pds: Vec<u64> = (0..512 * layout::PD_COUNT)
        .map(|i| (i << 21) | PAGE_PRESENT_RW | PAGE_HUGE)
        .collect();
    write_u64s(mem, layout::PD_START, &pds, "the page directories")
}

/// Writes the GDT, an empty IDT and the page tables, and returns the special registers that
/// put the boot vCPU in 64-bit mode on them. `base` is the vCPU's current sregs (KVM's reset
/// state), which keeps everything this function does not set.
pub fn setup_long_mode(mem: &GuestMemory, mut sregs: kvm_sregs) -> Result<kvm_sregs, BootError> {
    let gdt = boot_gdt();
    write_u64s(mem, layout::BOOT_GDT_START, &gdt, "the boot GDT")?;
    write_u64s(mem, layout::BOOT_IDT_START, &[0], "the boot IDT")?;
    write_page_tables(mem)?;

    sregs.gdt.base = layout::BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = layout::BOOT_IDT_START;
    sregs.idt.limit = 7;
    let code = segment(gdt[2], BOOT_CS);
    let data = segment(gdt[3], BOOT_DS);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(gdt[4], BOOT_TSS);

    sregs.cr3 = layout::PML4_START;
    sregs.cr4 |= CR4_PAE;
    sregs.cr0 |= CR0_PE | CR0_ET | CR0_NE | CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    Ok(sregs)
}

/// General registers at the 64-bit entry point.
pub fn entry_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: layout::BOOT_STACK_POINTER,
        rbp: layout::BOOT_STACK_POINTER,
        rsi: layout::ZERO_PAGE_START,
        ..Default::default()
    }
}

/// The FPU as a machine leaves reset: x87 control word and MXCSR at their defaults.
pub fn reset_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_gdts_fit_below_the_idt() {
        let room = layout::BOOT_GDT_MAX_ENTRIES as usize;
        assert!(boot_gdt().len() <= room);
        assert!(crate::boot::pvh::pvh_gdt().len() <= room);
        assert_eq!(
            layout::BOOT_GDT_START + room as u64 * 8,
            layout::BOOT_IDT_START
        );
    }
    use vhpc_api::MemoryConfig;

    #[test]
    fn gdt_entries_encode_flat_segments() {
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(0x808b, 0, 0xfffff), 0x008f_8b00_0000_ffff);
    }

    #[test]
    fn code_segment_is_64_bit_and_flat() {
        let cs = segment(boot_gdt()[2], BOOT_CS);
        assert_eq!((cs.l, cs.db, cs.present, cs.s, cs.type_), (1, 0, 1, 1, 0xb));
        assert_eq!((cs.base, cs.limit, cs.g), (0, 0xffff_ffff, 1));
        assert_eq!(cs.unusable, 0);
        let tr = segment(boot_gdt()[4], BOOT_TSS);
        assert_eq!((tr.s, tr.type_), (0, 0xb));
    }

    #[test]
    fn long_mode_state_and_identity_page_tables() {
        let mem = crate::memory::create(&MemoryConfig {
            size_mib: 64,
            hugepages: false,
            prefault: false,
        })
        .expect("memory");
        let s = setup_long_mode(&mem, kvm_sregs::default()).expect("setup");
        assert_eq!(s.cr0 & (CR0_PE | CR0_PG), CR0_PE | CR0_PG);
        assert_eq!(s.cr4 & CR4_PAE, CR4_PAE);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!((s.cs.selector, s.ds.selector), (BOOT_CS, BOOT_DS));
        let pml4: u64 = mem
            .read_obj(GuestAddress(layout::PML4_START))
            .expect("pml4");
        assert_eq!(pml4, layout::PDPT_START | 3);
        // The PDE for 3 GiB + 2 MiB maps exactly that address with a 2 MiB page.
        let index = (3u64 << 30) / (2 << 20) + 1;
        let pde: u64 = mem
            .read_obj(GuestAddress(layout::PD_START + 8 * index))
            .expect("pde");
        assert_eq!(pde, ((3u64 << 30) + (2 << 20)) | 0x83);
    }

    #[test]
    fn entry_registers_point_at_boot_params() {
        let r = entry_regs(0x100200);
        assert_eq!(
            (r.rip, r.rsi, r.rflags),
            (0x100200, layout::ZERO_PAGE_START, 2)
        );
    }
}
