//! boot_params (the "zero page") and its e820 memory map.

use linux_loader::bootparam::{boot_e820_entry, boot_params};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend as _, GuestMemoryRegion as _};

use super::{BootError, LoadedKernel};
use crate::layout;
use crate::memory::GuestMemory;

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// "HdrS", the setup-header magic.
const SETUP_HEADER_MAGIC: u32 = 0x5372_6448;
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// type_of_loader: "undefined" boot loader.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// loadflags bit: the kernel is loaded high (at 1 MiB).
const LOADED_HIGH: u8 = 0x01;
/// Largest command line kernels without a `cmdline_size` field accept.
const DEFAULT_CMDLINE_MAX: usize = 255;

/// What goes into boot_params besides the kernel's own header.
pub struct BootInfo<'a> {
    pub kernel: &'a LoadedKernel,
    pub cmdline_len: usize,
    pub initramfs: Option<(u64, u64)>,
    pub rsdp_addr: u64,
}

/// The e820 map for guest memory `mem`: low RAM up to the EBDA, the BIOS area reserved (it holds
/// the ACPI tables), then every RAM region from 1 MiB on.
pub fn e820_map(mem: &GuestMemory) -> Vec<boot_e820_entry> {
    let mut map = vec![
        entry(0, layout::EBDA_START, E820_RAM),
        entry(
            layout::EBDA_START,
            layout::HIGH_RAM_START - layout::EBDA_START,
            E820_RESERVED,
        ),
    ];
    for region in mem.iter() {
        let start = region.start_addr().0.max(layout::HIGH_RAM_START);
        let end = region.start_addr().0 + region.len();
        if end > start {
            map.push(entry(start, end - start, E820_RAM));
        }
    }
    map
}

fn entry(addr: u64, size: u64, type_: u32) -> boot_e820_entry {
    boot_e820_entry {
        addr,
        size,
        r#type: type_,
    }
}

/// Largest command line (without its NUL) the kernel accepts.
pub fn cmdline_max(kernel: &LoadedKernel) -> usize {
    match kernel.setup_header {
        Some(h) if h.version >= 0x0206 && h.cmdline_size > 0 => h.cmdline_size as usize,
        Some(_) => DEFAULT_CMDLINE_MAX,
        // An ELF vmlinux has no header to ask; Linux x86 accepts 2048 bytes.
        None => 2047,
    }
}

/// Builds boot_params for the kernel.
pub fn build(mem: &GuestMemory, info: &BootInfo) -> Result<boot_params, BootError> {
    let max = cmdline_max(info.kernel);
    if info.cmdline_len > max {
        return Err(BootError::CmdlineTooLong {
            len: info.cmdline_len,
            max,
        });
    }
    let mut params = boot_params::default();
    if let Some(header) = info.kernel.setup_header {
        params.hdr = header;
    } else {
        params.hdr.header = SETUP_HEADER_MAGIC;
        params.hdr.boot_flag = BOOT_FLAG_MAGIC;
        params.hdr.kernel_alignment = 0x0100_0000;
    }
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.loadflags |= LOADED_HIGH;
    params.hdr.cmd_line_ptr = layout::CMDLINE_START as u32;
    params.hdr.cmdline_size = info.cmdline_len as u32;
    if let Some((addr, size)) = info.initramfs {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    params.acpi_rsdp_addr = info.rsdp_addr;
    let map = e820_map(mem);
    if map.len() > params.e820_table.len() {
        return Err(BootError::GuestWrite {
            what: "the e820 map",
            detail: format!("{} entries do not fit", map.len()),
        });
    }
    params.e820_entries = map.len() as u8;
    params.e820_table[..map.len()].copy_from_slice(&map);
    Ok(params)
}

/// Writes boot_params into the zero page.
pub fn write(mem: &GuestMemory, params: &boot_params) -> Result<(), BootError> {
    mem.write_obj(*params, GuestAddress(layout::ZERO_PAGE_START))
        .map_err(|e| BootError::GuestWrite {
            what: "boot_params",
            detail: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::KernelFormat;
    use crate::memory::test_memory as memory;
    use linux_loader::bootparam::setup_header;

    fn bzimage_kernel() -> LoadedKernel {
        let hdr = setup_header {
            version: 0x020f,
            cmdline_size: 2047,
            header: SETUP_HEADER_MAGIC,
            initrd_addr_max: 0x7fff_ffff,
            ..Default::default()
        };
        LoadedKernel {
            format: KernelFormat::BzImage,
            entry: 0x100200,
            end: 0x90_0000,
            setup_header: Some(hdr),
            pvh_entry: None,
        }
    }

    #[test]
    fn e820_of_a_small_guest() {
        let map = e820_map(&memory(512));
        let got: Vec<(u64, u64, u32)> = map.iter().map(|e| (e.addr, e.size, e.r#type)).collect();
        assert_eq!(
            got,
            vec![
                (0, 0x9fc00, E820_RAM),
                (0x9fc00, 0x100000 - 0x9fc00, E820_RESERVED),
                (0x100000, (512 << 20) - 0x100000, E820_RAM),
            ]
        );
    }

    #[test]
    fn e820_of_a_large_guest_skips_the_hole() {
        let map = e820_map(&memory(4096));
        let ram: u64 = map
            .iter()
            .filter(|e| e.r#type == E820_RAM)
            .map(|e| e.size)
            .sum();
        // Everything but the 384 KiB BIOS area is usable RAM.
        assert_eq!(ram, (4096 << 20) - (0x100000 - 0x9fc00));
        let last = map.last().expect("entries");
        assert_eq!((last.addr, last.size), (1 << 32, 1 << 30));
        assert!(
            map.iter()
                .all(|e| e.addr + e.size <= layout::MMIO_HOLE_START || e.addr >= 1 << 32)
        );
    }

    #[test]
    fn boot_params_carry_cmdline_initramfs_and_rsdp() {
        let mem = memory(256);
        let kernel = bzimage_kernel();
        let info = BootInfo {
            kernel: &kernel,
            cmdline_len: 20,
            initramfs: Some((0x0f00_0000, 0x1234)),
            rsdp_addr: layout::ACPI_TABLES_START,
        };
        let p = build(&mem, &info).expect("build");
        write(&mem, &p).expect("write");
        let back: boot_params = mem
            .read_obj(GuestAddress(layout::ZERO_PAGE_START))
            .expect("read back");
        assert_eq!({ back.hdr.cmd_line_ptr }, layout::CMDLINE_START as u32);
        assert_eq!({ back.hdr.cmdline_size }, 20);
        assert_eq!({ back.hdr.ramdisk_image }, 0x0f00_0000);
        assert_eq!({ back.hdr.ramdisk_size }, 0x1234);
        assert_eq!({ back.hdr.type_of_loader }, LOADER_TYPE_UNDEFINED);
        assert_eq!({ back.acpi_rsdp_addr }, layout::ACPI_TABLES_START);
        assert_eq!(back.e820_entries, 3);
        // The zero page's e820 table sits at its architectural offset 0x2d0.
        let first_addr: u64 = mem
            .read_obj(GuestAddress(layout::ZERO_PAGE_START + 0x2d0 + 20))
            .expect("read entry 1");
        assert_eq!(first_addr, layout::EBDA_START);
    }

    #[test]
    fn elf_kernels_get_a_synthesised_header() {
        let mem = memory(64);
        let kernel = LoadedKernel {
            format: KernelFormat::Elf,
            entry: 0x1000000,
            end: 0x2000000,
            setup_header: None,
            pvh_entry: None,
        };
        let info = BootInfo {
            kernel: &kernel,
            cmdline_len: 5,
            initramfs: None,
            rsdp_addr: 0,
        };
        let p = build(&mem, &info).expect("build");
        assert_eq!({ p.hdr.header }, SETUP_HEADER_MAGIC);
        assert_eq!({ p.hdr.boot_flag }, BOOT_FLAG_MAGIC);
        assert_eq!({ p.hdr.ramdisk_image }, 0);
    }

    #[test]
    fn too_long_cmdline_is_rejected() {
        let mem = memory(64);
        let kernel = bzimage_kernel();
        let info = BootInfo {
            kernel: &kernel,
            cmdline_len: 5000,
            initramfs: None,
            rsdp_addr: 0,
        };
        let err = build(&mem, &info).expect_err("too long");
        assert!(err.to_string().contains("at most 2047"), "{err}");
    }
}
