//! Loading a bzImage or ELF vmlinux (linux-loader) and placing the initramfs.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::bootparam::setup_header;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{KernelLoader, bzimage::BzImage};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend as _, GuestMemoryRegion as _};

use super::BootError;
use crate::layout;
use crate::memory::GuestMemory;

/// The two kernel formats vhpc boots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// A bzImage: real-mode setup + protected-mode kernel (what distros ship as vmlinuz).
    BzImage,
    /// An uncompressed ELF vmlinux.
    Elf,
}

/// Where the kernel landed and how to enter it.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    pub format: KernelFormat,
    /// 64-bit entry point (guest-physical).
    pub entry: u64,
    /// First byte after the kernel image.
    pub end: u64,
    /// The bzImage's setup header, handed to the kernel in boot_params.
    pub setup_header: Option<setup_header>,
    /// The ELF's PVH entry point (`XEN_ELFNOTE_PHYS32_ENTRY`), if it has one: such kernels
    /// are booted through PVH rather than the Linux 64-bit entry.
    pub pvh_entry: Option<u64>,
}

/// Offset of the "HdrS" magic in a bzImage.
const BZIMAGE_MAGIC_OFFSET: u64 = 0x202;
/// The 64-bit entry point sits this far into a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// Recognises the kernel format from its first bytes.
pub fn detect_format(file: &mut File) -> std::io::Result<Option<KernelFormat>> {
    let mut elf_magic = [0u8; 4];
    file.seek(SeekFrom::Start(0))?;
    if file.read_exact(&mut elf_magic).is_ok() && elf_magic == *b"\x7fELF" {
        return Ok(Some(KernelFormat::Elf));
    }
    let mut hdrs = [0u8; 4];
    file.seek(SeekFrom::Start(BZIMAGE_MAGIC_OFFSET))?;
    if file.read_exact(&mut hdrs).is_ok() && hdrs == *b"HdrS" {
        return Ok(Some(KernelFormat::BzImage));
    }
    Ok(None)
}

/// Loads the kernel at `path` into guest memory.
pub fn load_kernel(mem: &GuestMemory, path: &Path) -> Result<LoadedKernel, BootError> {
    let open_err = |source| BootError::OpenKernel {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(open_err)?;
    let format =
        detect_format(&mut file)
            .map_err(open_err)?
            .ok_or_else(|| BootError::NotAKernel {
                path: path.to_path_buf(),
            })?;
    let load_err = |e: linux_loader::loader::Error| BootError::LoadKernel {
        path: path.to_path_buf(),
        detail: e.to_string(),
    };
    let highmem = Some(GuestAddress(layout::HIGH_RAM_START));
    match format {
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, &mut file, highmem).map_err(load_err)?;
            Ok(LoadedKernel {
                format,
                entry: r.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
                end: r.kernel_end,
                setup_header: r.setup_header,
                pvh_entry: None,
            })
        }
        KernelFormat::Elf => {
            let r = Elf::load(mem, None, &mut file, highmem).map_err(load_err)?;
            Ok(LoadedKernel {
                format,
                entry: r.kernel_load.0,
                end: r.kernel_end,
                setup_header: None,
                pvh_entry: match r.pvh_boot_cap {
                    PvhBootCapability::PvhEntryPresent(addr) => Some(addr.0),
                    _ => None,
                },
            })
        }
    }
}

/// Reads the initramfs (plus `extra`, a further cpio archive appended 4-byte aligned) and
/// places it as high in low memory as the kernel allows. Returns (address, size).
pub fn load_initramfs(
    mem: &GuestMemory,
    path: Option<&Path>,
    extra: &[u8],
    kernel: &LoadedKernel,
) -> Result<Option<(u64, u64)>, BootError> {
    let mut image = match path {
        Some(p) => std::fs::read(p).map_err(|source| BootError::ReadInitramfs {
            path: p.to_path_buf(),
            source,
        })?,
        None => Vec::new(),
    };
    if !extra.is_empty() {
        image.resize(image.len().next_multiple_of(4), 0);
        image.extend_from_slice(extra);
    }
    if image.is_empty() {
        return Ok(None);
    }
    let addr = initramfs_address(mem, kernel, image.len() as u64)?;
    mem.write_slice(&image, GuestAddress(addr))
        .map_err(|e| BootError::GuestWrite {
            what: "the initramfs",
            detail: e.to_string(),
        })?;
    Ok(Some((addr, image.len() as u64)))
}

/// The highest page-aligned address where `size` bytes fit below both the end of the first RAM
/// region and the kernel's `initrd_addr_max`, and above the kernel.
fn initramfs_address(
    mem: &GuestMemory,
    kernel: &LoadedKernel,
    size: u64,
) -> Result<u64, BootError> {
    let low_ram_end = mem
        .find_region(GuestAddress(0))
        .map(|r| r.len())
        .unwrap_or(0);
    let addr_max = kernel
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|&m| m != 0)
        .unwrap_or(0x7fff_ffff);
    let limit = low_ram_end.min(addr_max + 1);
    let too_big = || BootError::InitramfsTooBig {
        initrd_mib: size >> 20,
        limit,
    };
    let start = limit.checked_sub(size).ok_or_else(too_big)? & !0xfff;
    if start < kernel.end.next_multiple_of(0x1000) {
        return Err(too_big());
    }
    Ok(start)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::test_memory as memory;
    use std::io::Write;

    fn temp_file(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        f.write_all(bytes).expect("write temp file");
        f
    }

    #[test]
    fn rejects_a_file_that_is_not_a_kernel() {
        let f = temp_file(b"#!/bin/sh\necho not a kernel\n");
        let err = load_kernel(&memory(64), f.path()).expect_err("must reject");
        assert!(matches!(err, BootError::NotAKernel { .. }), "{err}");
        assert!(err.to_string().contains("not a Linux kernel"));
    }

    #[test]
    fn rejects_a_missing_kernel() {
        let err = load_kernel(&memory(64), Path::new("/nonexistent/vmlinuz")).expect_err("missing");
        assert!(matches!(err, BootError::OpenKernel { .. }), "{err}");
    }

    #[test]
    fn rejects_a_truncated_bzimage() {
        let mut bytes = vec![0u8; 0x300];
        bytes[0x202..0x206].copy_from_slice(b"HdrS");
        let f = temp_file(&bytes);
        let err = load_kernel(&memory(64), f.path()).expect_err("truncated");
        assert!(matches!(err, BootError::LoadKernel { .. }), "{err}");
    }

    fn fake_kernel() -> LoadedKernel {
        LoadedKernel {
            format: KernelFormat::BzImage,
            entry: 0x100200,
            end: 0x80_0000,
            setup_header: None,
            pvh_entry: None,
        }
    }

    #[test]
    fn the_test_guest_is_loaded_with_its_pvh_entry() {
        let mem = memory(64);
        let k = load_kernel(&mem, vhpc_testguest::elf_path()).expect("load the test guest");
        assert_eq!(k.format, KernelFormat::Elf);
        let entry = k.pvh_entry.expect("the test guest has a PVH note");
        assert!(
            entry > vhpc_testguest::abi::IMAGE_START && entry < k.end,
            "{entry:#x}"
        );
        // The image is in guest memory: it starts with its PT_NOTE (the "Xen" note).
        let mut name = [0u8; 4];
        mem.read_slice(
            &mut name,
            GuestAddress(vhpc_testguest::abi::IMAGE_START + 12),
        )
        .expect("read");
        assert_eq!(&name, b"Xen\0");
    }

    #[test]
    fn initramfs_goes_to_the_top_of_low_memory_and_is_padded() {
        let mem = memory(64);
        let f = temp_file(b"abc");
        let (addr, size) = load_initramfs(&mem, Some(f.path()), b"EXTRA", &fake_kernel())
            .expect("load")
            .expect("some");
        assert_eq!(size, 4 + 5);
        assert_eq!(addr % 0x1000, 0);
        assert!(addr + size <= 64 << 20);
        let mut buf = [0u8; 9];
        mem.read_slice(&mut buf, GuestAddress(addr)).expect("read");
        assert_eq!(&buf, b"abc\0EXTRA");
    }

    #[test]
    fn initramfs_that_does_not_fit_is_a_clear_error() {
        let mem = memory(16);
        let big = vec![0u8; 12 << 20];
        let err = load_initramfs(&mem, None, &big, &fake_kernel()).expect_err("too big");
        assert!(err.to_string().contains("more --memory"), "{err}");
    }

    #[test]
    fn missing_initramfs_is_reported_with_its_path() {
        let err = load_initramfs(
            &memory(64),
            Some(Path::new("/no/initrd")),
            &[],
            &fake_kernel(),
        )
        .expect_err("missing");
        assert!(err.to_string().contains("/no/initrd"), "{err}");
    }
}
