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
        populate_write(&region, len).map_err(|source| MemoryError::Map {
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

/// Holes of a checkpoint's memory file shorter than this stay file-backed: each remapped hole
/// is one more mapping (the kernel allows ~65 000 per process), and a short hole costs little.
const MIN_ANONYMOUS_HOLE: u64 = 64 << 10;

/// At most this many holes per region are remapped anonymously; the rest stay file-backed.
const MAX_ANONYMOUS_HOLES: usize = 8192;

/// Maps guest RAM lazily from `file`: a private (copy-on-write) mapping per region, so nothing
/// is read until the guest (or the VMM) touches a page and the guest's writes never reach the
/// file. The cost does not grow with the memory size. The file's holes (pages that were zero)
/// are mapped as anonymous memory instead: touching one must not allocate it in the file,
/// which a read fault does when the checkpoint lies on tmpfs (it would grow to the full guest
/// size). With `prefault` every page is faulted in (and copied) now.
pub fn map_file(
    file: &Arc<File>,
    regions: &[FileRegion],
    prefault: bool,
) -> Result<GuestMemory, MemoryError> {
    let mut mapped = Vec::with_capacity(regions.len());
    for r in regions {
        let map_err = |source| MemoryError::Map {
            mib: r.len >> 20,
            hint: " from the checkpoint's memory file",
            source,
        };
        let region = MmapRegionBuilder::new_with_bitmap(r.len as usize, bitmap(r.len))
            .with_file_offset(FileOffset::from_arc(file.clone(), r.file_offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| map_err(std::io::Error::other(e.to_string())))?;
        map_holes_anonymously(&region, file, r).map_err(map_err)?;
        if prefault {
            populate_write(&region, r.len).map_err(map_err)?;
        }
        let start = r.guest_addr;
        mapped.push(
            GuestRegionMmap::new(region, GuestAddress(start))
                .ok_or_else(|| MemoryError::Register(format!("region at {start:#x} overflows")))?,
        );
    }
    GuestMemoryMmap::from_regions(mapped).map_err(|e| MemoryError::Register(e.to_string()))
}

/// Replaces the parts of `region` that lie over holes of `file` with anonymous zero memory.
fn map_holes_anonymously(
    region: &vm_memory::mmap::MmapRegion<AtomicBitmap>,
    file: &File,
    r: &FileRegion,
) -> std::io::Result<()> {
    let holes = crate::sparse::holes(
        file,
        r.file_offset,
        r.len,
        PAGE_SIZE.get() as u64,
        MIN_ANONYMOUS_HOLE,
    );
    for &(offset, len) in holes.iter().take(MAX_ANONYMOUS_HOLES) {
        // SAFETY: [offset, offset + len) lies inside the mapping `region` owns (holes() only
        // returns ranges within the region's length, page-aligned), which was just created and
        // is not shared with anything yet. MAP_FIXED replaces those pages with anonymous ones
        // that read as zero, as the file's hole did, so the guest sees the same contents;
        // `region` still unmaps its whole range when dropped.
        let ret = unsafe {
            libc::mmap(
                region.as_ptr().add(offset as usize).cast(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ret == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Faults every page of `region` in for writing now (a private file page is copied).
fn populate_write(
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

    /// A checkpoint-like memory file on tmpfs (a memfd): 4 MiB with two data pages.
    fn sparse_memfd() -> Arc<File> {
        use std::os::unix::fs::FileExt;
        let file = crate::sparse::memfd(4 << 20);
        file.write_all_at(&[0xaa; 4096], 0x10_0000).expect("write");
        file.write_all_at(&[0xbb; 4096], 0x20_0000).expect("write");
        Arc::new(file)
    }

    fn allocated_bytes(file: &File) -> u64 {
        use std::os::unix::fs::MetadataExt;
        file.metadata().expect("stat").blocks() * 512
    }

    #[test]
    fn a_mapped_checkpoint_reads_right_and_its_holes_stay_holes() {
        for prefault in [false, true] {
            let file = sparse_memfd();
            let regions = [FileRegion {
                guest_addr: 0,
                len: 4 << 20,
                file_offset: 0,
            }];
            let mem = map_file(&file, &regions, prefault).expect("map");
            let mut all = vec![0u8; 4 << 20];
            mem.read_slice(&mut all, GuestAddress(0)).expect("read");
            for (page, bytes) in all.chunks(4096).enumerate() {
                let want = match page {
                    0x100 => 0xaa,
                    0x200 => 0xbb,
                    _ => 0,
                };
                assert!(bytes.iter().all(|&b| b == want), "page {page}");
            }
            mem.write_obj(7u64, GuestAddress(0x30_0000)).expect("write");
            mem.write_obj(9u64, GuestAddress(0x10_0000)).expect("write");
            assert_eq!(
                allocated_bytes(&file),
                2 * 4096,
                "reading and writing guest memory allocated nothing in the file \
                 (prefault {prefault})"
            );
            let mut first = [0u8; 8];
            std::os::unix::fs::FileExt::read_exact_at(&*file, &mut first, 0x10_0000).expect("read");
            assert_eq!(first, [0xaa; 8], "the guest's write stayed private");
        }
    }

    #[test]
    fn hugepages_need_whole_pages() {
        let mut c = cfg(3);
        c.hugepages = true;
        assert!(matches!(create(&c), Err(MemoryError::HugepageSize(3))));
    }
}
