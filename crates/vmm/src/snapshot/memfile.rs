//! Guest memory in a checkpoint: a sparse full image (`memory.raw`, zero pages are holes) or a
//! packed delta of the pages dirtied since the parent (`memory.delta`), each with a CRC-32.
//!
//! Writing a full image reads only pages that can hold data: for anonymous guest memory,
//! /proc/self/pagemap says which pages were ever touched (present or swapped), so an untouched
//! 4 GiB guest costs a page-table walk, not 4 GiB of reads. For memory that is a private
//! mapping of a checkpoint (a restored VM), pages the file has data for are read too.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend as _, GuestMemoryRegion as _};

use super::format::RegionRecord;
use crate::memory::GuestMemory;
use crate::sparse::data_extents;

pub const PAGE: u64 = 4096;
pub const FULL_FILE: &str = "memory.raw";
pub const DELTA_FILE: &str = "memory.delta";

/// What writing a memory file did.
#[derive(Clone, Copy, Debug, Default)]
pub struct WriteStats {
    /// Pages written (non-zero pages of a full image; every page of a delta).
    pub pages: u64,
    pub crc32: u32,
}

/// The guest RAM layout, and where each region goes in a full image (back to back).
pub fn regions(mem: &GuestMemory) -> Vec<RegionRecord> {
    let mut offset = 0;
    mem.iter()
        .map(|r| {
            let rec = RegionRecord {
                guest_addr: r.start_addr().0,
                len: r.len(),
                file_offset: offset,
            };
            offset += r.len();
            rec
        })
        .collect()
}

fn is_zero(page: &[u8]) -> bool {
    page.chunks_exact(16)
        .all(|c| u128::from_ne_bytes(c.try_into().unwrap_or([1; 16])) == 0)
}

/// For each page of `len` bytes at host address `addr`: whether it may hold data (it is
/// present or swapped out), from /proc/self/pagemap. `None` if pagemap is unreadable.
fn touched_pages(addr: u64, len: u64) -> Option<Vec<bool>> {
    let pagemap = File::open("/proc/self/pagemap").ok()?;
    let pages = (len / PAGE) as usize;
    let mut out = Vec::with_capacity(pages);
    let mut buf = vec![0u8; 8 * 65536];
    let first = addr / PAGE;
    while out.len() < pages {
        let n = (pages - out.len()).min(65536);
        let chunk = &mut buf[..8 * n];
        pagemap
            .read_exact_at(chunk, (first + out.len() as u64) * 8)
            .ok()?;
        out.extend(chunk.chunks_exact(8).map(|e| e[7] & 0xc0 != 0));
    }
    Some(out)
}

/// Marks the pages of `touched` that the file backing them (from `start`) has data for.
fn mark_file_data(touched: &mut [bool], file: &File, start: u64, len: u64) {
    for (at, extent) in data_extents(file, start + len) {
        let first = at.max(start) - start;
        let end = (at + extent).min(start + len).saturating_sub(start);
        for page in first / PAGE..end.div_ceil(PAGE) {
            if let Some(t) = touched.get_mut(page as usize) {
                *t = true;
            }
        }
    }
}

/// The host bytes of a region of paused guest memory.
fn region_bytes(region: &vm_memory::GuestRegionMmap<vm_memory::bitmap::AtomicBitmap>) -> &[u8] {
    // SAFETY: the mapping is `region.len()` bytes long and lives as long as `region`. The VM is
    // paused while a checkpoint is written (no vCPU writes it; the VMM's devices do not write
    // guest memory), so reading it as a byte slice does not race with a writer.
    unsafe { std::slice::from_raw_parts(region.as_ptr(), region.len() as usize) }
}

/// Writes `mem` as a sparse image into `file`: its size is all of RAM, only non-zero pages
/// are written.
pub fn write_full(mem: &GuestMemory, file: &File) -> std::io::Result<WriteStats> {
    let layout = regions(mem);
    let total: u64 = layout.iter().map(|r| r.len).sum();
    file.set_len(total)?;
    let mut hasher = crc32fast::Hasher::new();
    let mut stats = WriteStats::default();
    for (region, rec) in mem.iter().zip(&layout) {
        let bytes = region_bytes(region);
        let touched = touched_pages(region.as_ptr() as u64, region.len()).map(|mut t| {
            if let Some(backing) = region.file_offset() {
                // A private file mapping: a page never touched reads from the file.
                mark_file_data(&mut t, backing.file(), backing.start(), region.len());
            }
            t
        });
        // A run of consecutive non-zero pages is written with one call.
        let mut run: Option<(usize, usize)> = None;
        for (i, page) in bytes.chunks_exact(PAGE as usize).enumerate() {
            let data = touched.as_ref().is_none_or(|t| t[i]) && !is_zero(page);
            if data {
                let offset = rec.file_offset + i as u64 * PAGE;
                hasher.update(&offset.to_le_bytes());
                hasher.update(page);
                stats.pages += 1;
                run = Some(run.map_or((i, i + 1), |(s, _)| (s, i + 1)));
            } else if let Some((s, e)) = run.take() {
                write_run(file, bytes, rec.file_offset, s, e)?;
            }
        }
        if let Some((s, e)) = run {
            write_run(file, bytes, rec.file_offset, s, e)?;
        }
    }
    stats.crc32 = hasher.finalize();
    Ok(stats)
}

fn write_run(
    file: &File,
    bytes: &[u8],
    base: u64,
    start: usize,
    end: usize,
) -> std::io::Result<()> {
    let p = PAGE as usize;
    file.write_all_at(&bytes[start * p..end * p], base + (start * p) as u64)
}

/// Runs of consecutive pages: (first guest address, pages).
pub fn runs_of(pages: &[u64]) -> Vec<(u64, u32)> {
    let mut runs: Vec<(u64, u32)> = Vec::new();
    for &addr in pages {
        match runs.last_mut() {
            Some((start, n)) if *start + u64::from(*n) * PAGE == addr && *n < u32::MAX => *n += 1,
            _ => runs.push((addr, 1)),
        }
    }
    runs
}

/// Writes the pages of `runs` from `mem`, packed in order, into `file`.
pub fn write_delta(
    mem: &GuestMemory,
    runs: &[(u64, u32)],
    file: &File,
) -> std::io::Result<WriteStats> {
    let mut hasher = crc32fast::Hasher::new();
    let mut stats = WriteStats::default();
    let mut offset = 0u64;
    let mut buf = Vec::new();
    for &(start, pages) in runs {
        buf.resize((u64::from(pages) * PAGE) as usize, 0);
        mem.read_slice(&mut buf, GuestAddress(start))
            .map_err(|e| std::io::Error::other(format!("guest page {start:#x}: {e}")))?;
        for (i, page) in buf.chunks_exact(PAGE as usize).enumerate() {
            hasher.update(&(start + i as u64 * PAGE).to_le_bytes());
            hasher.update(page);
        }
        file.write_all_at(&buf, offset)?;
        offset += buf.len() as u64;
        stats.pages += u64::from(pages);
    }
    stats.crc32 = hasher.finalize();
    Ok(stats)
}

/// Copies a delta's pages into `mem` (or only reads them, without), checking its CRC; returns
/// the pages read. On a CRC mismatch `mem` holds damaged pages: the caller drops it.
pub fn apply_delta(
    mem: Option<&GuestMemory>,
    runs: &[(u64, u32)],
    file: &File,
    crc32: u32,
) -> Result<u64, String> {
    let mut hasher = crc32fast::Hasher::new();
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
    let mut buf = vec![0u8; PAGE as usize];
    let mut copied = 0;
    for &(start, pages) in runs {
        for i in 0..u64::from(pages) {
            let addr = start
                .checked_add(i * PAGE)
                .ok_or_else(|| format!("run at {start:#x} overflows the address space"))?;
            reader
                .read_exact(&mut buf)
                .map_err(|e| format!("reading page {addr:#x}: {e} (the delta is truncated)"))?;
            hasher.update(&addr.to_le_bytes());
            hasher.update(&buf);
            if let Some(mem) = mem {
                mem.write_slice(&buf, GuestAddress(addr))
                    .map_err(|e| format!("page {addr:#x} is outside guest memory: {e}"))?;
            }
            copied += 1;
        }
    }
    let computed = hasher.finalize();
    if computed != crc32 {
        return Err(format!(
            "CRC-32 {computed:#010x}, the checkpoint says {crc32:#010x}"
        ));
    }
    Ok(copied)
}

/// Recomputes a full image's CRC the way [`write_full`] did (reading only its data extents);
/// returns (non-zero pages, CRC-32).
pub fn checksum_full(file: &File, len: u64) -> std::io::Result<(u64, u32)> {
    let mut hasher = crc32fast::Hasher::new();
    let mut pages = 0;
    let mut buf = vec![0u8; 1 << 20];
    for (start, extent) in data_extents(file, len) {
        let start = start - start % PAGE;
        let end = (start + extent).min(len);
        let mut pos = start;
        while pos < end {
            let n = ((end - pos) as usize).min(buf.len());
            let n = n - n % PAGE as usize;
            if n == 0 {
                break;
            }
            file.read_exact_at(&mut buf[..n], pos)?;
            for (i, page) in buf[..n].chunks_exact(PAGE as usize).enumerate() {
                if !is_zero(page) {
                    hasher.update(&(pos + (i as u64) * PAGE).to_le_bytes());
                    hasher.update(page);
                    pages += 1;
                }
            }
            pos += n as u64;
        }
    }
    Ok((pages, hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::test_memory;

    #[test]
    fn runs_coalesce_consecutive_pages() {
        assert_eq!(
            runs_of(&[0, 0x1000, 0x2000, 0x5000, 0x6000, 0x10000]),
            vec![(0, 3), (0x5000, 2), (0x10000, 1)]
        );
        assert_eq!(runs_of(&[]), vec![]);
    }

    #[test]
    fn a_full_image_is_sparse_and_its_crc_recomputes() {
        let mem = test_memory(64);
        for addr in [0x1000u64, 0x2000, 0x30_0000, 0x3ff_f000] {
            mem.write_obj(addr ^ 0x5a5a, GuestAddress(addr))
                .expect("write");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let file = File::create_new(dir.path().join(FULL_FILE)).expect("create");
        let stats = write_full(&mem, &file).expect("write");
        assert_eq!(stats.pages, 4);
        let file = File::open(dir.path().join(FULL_FILE)).expect("open");
        let meta = file.metadata().expect("stat");
        assert_eq!(meta.len(), 64 << 20);
        use std::os::unix::fs::MetadataExt;
        assert!(meta.blocks() * 512 < 1 << 20, "{} blocks", meta.blocks());
        assert_eq!(
            checksum_full(&file, 64 << 20).expect("crc"),
            (4, stats.crc32)
        );
    }

    #[test]
    fn a_delta_applies_and_detects_damage() {
        let a = test_memory(16);
        a.write_obj(0xabcdu64, GuestAddress(0x5008)).expect("write");
        a.write_obj(0x1234u64, GuestAddress(0x9000)).expect("write");
        let runs = runs_of(&[0x5000, 0x6000, 0x9000]);
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(DELTA_FILE);
        let stats = write_delta(&a, &runs, &File::create(&path).expect("create")).expect("write");
        assert_eq!(stats.pages, 3);
        let b = test_memory(16);
        let f = File::open(&path).expect("open");
        assert_eq!(apply_delta(Some(&b), &runs, &f, stats.crc32), Ok(3));
        assert_eq!(
            b.read_obj::<u64>(GuestAddress(0x5008)).expect("read"),
            0xabcd
        );
        let f = File::open(&path).expect("open");
        let err = apply_delta(None, &runs, &f, stats.crc32 ^ 1).expect_err("bad crc");
        assert!(err.contains("CRC-32"), "{err}");
    }
}
