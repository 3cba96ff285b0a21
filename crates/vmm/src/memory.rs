//! Guest RAM: anonymous mappings (optionally hugetlbfs-backed and prefaulted) registered with
//! vm-memory, so loaders and devices access it through one bounds-checked interface; or, for a
//! restored checkpoint, private mappings of the checkpoint's memory file ([`map_file`]).

use std::fs::File;
use std::sync::Arc;

use std::num::NonZeroUsize;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::layout;
use vhpc_api::MemoryConfig;

/// Guest RAM with a bitmap of the pages the VMM itself wrote (see
/// `vhpc_devices::virtio::GuestMemory`, the same type).
pub type GuestMemory = GuestMemoryMmap<AtomicBitmap>;

/// The granularity of the VMM's own dirty bitmap: one bit per 4 KiB page, as KVM's log.
const PAGE_SIZE: NonZeroUsize = NonZeroUsize::new(4096).expect("4096 is not zero");

/// A dirty bitmap for a region of `len` bytes.
fn bitmap(len: u64) -> AtomicBitmap {
    AtomicBitmap::new(len as usize, PAGE_SIZE)
}

const HUGEPAGE_SIZE: u64 = 2 << 20;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error(
        "--hugepages needs guest memory in whole 2 MiB pages, but {0} MiB is not a multiple of 2"
    )]
    HugepageSize(u64),
    #[error("cannot map {mib} MiB of guest memory{hint}: {source}")]
    Map {
        mib: u64,
        hint: &'static str,
        source: std::io::Error,
    },
    #[error("cannot register guest memory: {0}")]
    Register(String),
}

/// Allocates guest RAM as described by `config`.
pub fn create(config: &MemoryConfig) -> Result<GuestMemory, MemoryError> {
    let size = config.size_mib << 20;
    if config.hugepages && !size.is_multiple_of(HUGEPAGE_SIZE) {
        return Err(MemoryError::HugepageSize(config.size_mib));
    }
    let mut regions = Vec::new();
    for (start, len) in layout::ram_ranges(size) {
        regions.push(map_region(start, len, config)?);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Register(e.to_string()))
}

fn map_region(
    start: u64,
    len: u64,
    config: &MemoryConfig,
) -> Result<GuestRegionMmap<AtomicBitmap>, MemoryError> {
    let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    if config.hugepages {
        flags |= libc::MAP_HUGETLB | libc::MAP_HUGE_2MB;
    }
    if config.prefault {
        flags |= libc::MAP_POPULATE;
    }
    let hint = if config.hugepages {
        " with 2 MiB hugepages (reserve them first: echo N > /proc/sys/vm/nr_hugepages)"
    } else {
        ""
    };
    let region = MmapRegionBuilder::new_with_bitmap(len as usize, bitmap(len))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(flags)
        .build()
        .map_err(|e| MemoryError::Map {
            mib: len >> 20,
            hint,
            source: std::io::Error::other(e.to_string()),
        })?;
    if config.hugepages && config.prefault {
        // MAP_POPULATE on MAP_NORESERVE hugetlb memory can silently leave pages unbacked; the
        // guest would then die with SIGBUS later. Fail now, with a clear message, instead.
        check_hugepages_backed(&region, len).map_err(|source| MemoryError::Map {
            mib: len >> 20,
            hint,
            source,
        })?;
    }
    GuestRegionMmap::new(region, GuestAddress(start))
        .ok_or_else(|| MemoryError::Register(format!("region at {start:#x} overflows")))
}

/// One RAM region backed by part of a file: its guest address, length and offset in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileRegion {
    pub guest_addr: u64,
    pub len: u64,
    pub file_offset: u64,
}

/// Maps guest RAM lazily from `file`: a private (copy-on-write) mapping per region, so nothing
/// is read until the guest (or the VMM) touches a page and the guest's writes never reach the
/// file. The cost does not grow with the memory size. With `prefault` every page is read now.
pub fn map_file(
    file: &Arc<File>,
    regions: &[FileRegion],
    prefault: bool,
) -> Result<GuestMemory, MemoryError> {
    let mut mapped = Vec::with_capacity(regions.len());
    for r in regions {
        let mut flags = libc::MAP_PRIVATE | libc::MAP_NORESERVE;
        if prefault {
            flags |= libc::MAP_POPULATE;
        }
        let region = MmapRegionBuilder::new_with_bitmap(r.len as usize, bitmap(r.len))
            .with_file_offset(FileOffset::from_arc(file.clone(), r.file_offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(flags)
            .build()
            .map_err(|e| MemoryError::Map {
                mib: r.len >> 20,
                hint: " from the checkpoint's memory file",
                source: std::io::Error::other(e.to_string()),
            })?;
        let start = r.guest_addr;
        mapped.push(
            GuestRegionMmap::new(region, GuestAddress(start))
                .ok_or_else(|| MemoryError::Register(format!("region at {start:#x} overflows")))?,
        );
    }
    GuestMemoryMmap::from_regions(mapped).map_err(|e| MemoryError::Register(e.to_string()))
}

fn check_hugepages_backed(
    region: &vm_memory::mmap::MmapRegion<AtomicBitmap>,
    len: u64,
) -> Result<(), std::io::Error> {
    // SAFETY: the range is exactly the mapping `region` owns and keeps alive; MADV_POPULATE_WRITE
    // only faults pages in and reports whether that succeeded.
    let ret = unsafe {
        libc::madvise(
            region.as_ptr().cast(),
            len as usize,
            libc::MADV_POPULATE_WRITE,
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A plain guest memory of `mib` MiB for unit tests.
#[cfg(test)]
pub(crate) fn test_memory(mib: u64) -> GuestMemory {
    create(&MemoryConfig {
        size_mib: mib,
        hugepages: false,
        prefault: false,
    })
    .expect("map guest memory")
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend as _};

    fn cfg(size_mib: u64) -> MemoryConfig {
        MemoryConfig {
            size_mib,
            hugepages: false,
            prefault: false,
        }
    }

    #[test]
    fn small_memory_is_one_region() {
        let mem = create(&cfg(64)).expect("map");
        assert_eq!(mem.num_regions(), 1);
        mem.write_obj(0xdead_beefu32, GuestAddress(0x1000))
            .expect("write");
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x1000)).expect("read"),
            0xdead_beef
        );
    }

    #[test]
    fn large_memory_skips_the_hole() {
        let mem = create(&cfg(4096)).expect("map");
        assert_eq!(mem.num_regions(), 2);
        assert!(mem.address_in_range(GuestAddress(0x1_0000_0000)));
        assert!(!mem.address_in_range(GuestAddress(layout::MMIO_HOLE_START)));
    }

    #[test]
    fn hugepages_need_whole_pages() {
        let mut c = cfg(3);
        c.hugepages = true;
        assert!(matches!(create(&c), Err(MemoryError::HugepageSize(3))));
    }
}
