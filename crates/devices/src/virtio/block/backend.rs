//! Where a disk's bytes live, and how they move to and from guest memory.
//!
//! A request's data buffers are guest memory ([`GuestSlice`]s, one or more per descriptor
//! where a buffer crosses a memory region). A raw image file moves them with one
//! `preadv`/`pwritev` per request straight into or out of guest memory: no bounce buffer, no
//! copy, one system call for a request of up to `IOV_MAX` pieces. Data read into guest memory
//! is marked in the VMM's dirty bitmap (KVM's dirty log sees only the guest's own writes).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use vm_memory::bitmap::{AtomicBitmap, BS, Bitmap};
use vm_memory::volatile_memory::VolatileSlice;

/// A piece of guest memory a request reads into or writes from.
pub type GuestSlice<'a> = VolatileSlice<'a, BS<'a, AtomicBitmap>>;

/// At most this many pieces go into one `preadv`/`pwritev` (Linux's `IOV_MAX`).
const IOV_MAX: usize = 1024;

/// A disk's storage.
pub trait BlockBackend: Send {
    /// Fills `bufs`, in order, from the bytes at `offset`; all of them or an error.
    fn read_into(&mut self, bufs: &[GuestSlice<'_>], offset: u64) -> io::Result<()>;
    /// Writes `bufs`, in order, at `offset`; all of them or an error.
    fn write_from(&mut self, bufs: &[GuestSlice<'_>], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable (on stable storage).
    fn flush(&mut self) -> io::Result<()>;
}

impl BlockBackend for File {
    fn read_into(&mut self, bufs: &[GuestSlice<'_>], offset: u64) -> io::Result<()> {
        vectored_at(bufs, offset, IOV_MAX, |iov, at| {
            // SAFETY: every iovec points into a mapped guest-memory region that outlives the
            // call (the slices borrow the guest memory), and covers only the slice's length.
            let n = unsafe { libc::preadv(self.as_raw_fd(), iov.as_ptr(), iov.len() as i32, at) };
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the image file ended before the request's last sector",
                ));
            }
            syscall_len(n)
        })?;
        for b in bufs {
            b.bitmap().mark_dirty(0, b.len());
        }
        Ok(())
    }

    fn write_from(&mut self, bufs: &[GuestSlice<'_>], offset: u64) -> io::Result<()> {
        vectored_at(bufs, offset, IOV_MAX, |iov, at| {
            // SAFETY: as in read_into; pwritev only reads the memory the iovecs describe.
            let n = unsafe { libc::pwritev(self.as_raw_fd(), iov.as_ptr(), iov.len() as i32, at) };
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::WriteZero));
            }
            syscall_len(n)
        })
    }

    fn flush(&mut self) -> io::Result<()> {
        self.sync_data()
    }
}

/// A disk in memory, for tests and fuzzing.
impl BlockBackend for Vec<u8> {
    fn read_into(&mut self, bufs: &[GuestSlice<'_>], offset: u64) -> io::Result<()> {
        let mut pos = usize::try_from(offset).map_err(io::Error::other)?;
        for b in bufs {
            let src = pos
                .checked_add(b.len())
                .and_then(|end| self.get(pos..end))
                .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
            b.copy_from(src);
            pos += b.len();
        }
        Ok(())
    }

    fn write_from(&mut self, bufs: &[GuestSlice<'_>], offset: u64) -> io::Result<()> {
        let mut pos = usize::try_from(offset).map_err(io::Error::other)?;
        for b in bufs {
            let dst = pos
                .checked_add(b.len())
                .and_then(|end| self.get_mut(pos..end))
                .ok_or_else(|| io::Error::from(io::ErrorKind::WriteZero))?;
            b.copy_to(dst);
            pos += b.len();
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The byte count a `preadv`/`pwritev` returned, or its error.
fn syscall_len(n: isize) -> io::Result<usize> {
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Moves all of `bufs` with `op(iovecs, file offset) -> bytes moved`, at most `max_iov`
/// pieces per call, resuming after short transfers and retrying on EINTR.
fn vectored_at(
    bufs: &[GuestSlice<'_>],
    offset: u64,
    max_iov: usize,
    mut op: impl FnMut(&[libc::iovec], libc::off_t) -> io::Result<usize>,
) -> io::Result<()> {
    let mut at = offset;
    // The first piece not fully moved, and how much of it is.
    let (mut first, mut skip) = (0usize, 0usize);
    let mut iov = Vec::with_capacity(bufs.len().min(max_iov));
    loop {
        // Empty pieces need no call (a call with nothing to move would look like an end of
        // file).
        while first < bufs.len() && bufs[first].len() == skip {
            first += 1;
            skip = 0;
        }
        if first == bufs.len() {
            return Ok(());
        }
        iov.clear();
        iov.extend(
            bufs[first..]
                .iter()
                .take(max_iov)
                .enumerate()
                .map(|(i, b)| {
                    let from = if i == 0 { skip } else { 0 };
                    libc::iovec {
                        // SAFETY: `from` <= the slice's length, so the pointer stays inside it (or
                        // one past its end for an empty rest, which the length 0 makes harmless).
                        iov_base: unsafe { b.ptr_guard_mut().as_ptr().add(from) }.cast(),
                        iov_len: b.len() - from,
                    }
                }),
        );
        let pos = libc::off_t::try_from(at).map_err(io::Error::other)?;
        let mut moved = match op(&iov, pos) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        at += moved as u64;
        // Step past the pieces this call finished.
        while moved > 0 && first < bufs.len() {
            let rest = bufs[first].len() - skip;
            if moved >= rest {
                moved -= rest;
                first += 1;
                skip = 0;
            } else {
                skip += moved;
                moved = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

    use std::io::{Read, Seek, SeekFrom, Write};

    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

    use super::*;
    use crate::virtio::GuestMemory;

    /// Two regions with a hole between, so a buffer at 0xF000.. crosses into the second.
    fn memory() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000), (GuestAddress(0x10000), 0x10000)])
            .unwrap()
    }

    fn slices<'a>(mem: &'a GuestMemory, ranges: &[(u64, usize)]) -> Vec<GuestSlice<'a>> {
        ranges
            .iter()
            .flat_map(|&(addr, len)| mem.get_slices(GuestAddress(addr), len))
            .map(Result::unwrap)
            .collect()
    }

    fn image(len: usize) -> File {
        let mut f = tempfile::tempfile().unwrap();
        let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        f.write_all(&bytes).unwrap();
        f
    }

    #[test]
    fn a_file_reads_straight_into_guest_memory_across_regions_and_marks_it_dirty() {
        let mem = memory();
        let mut file = image(64 << 10);
        // 8 KiB crossing the region boundary, then 1 KiB elsewhere.
        let bufs = slices(&mem, &[(0xF000, 0x2000), (0x4000, 0x400)]);
        assert_eq!(
            bufs.len(),
            3,
            "the first buffer is split at the region boundary"
        );
        file.read_into(&bufs, 512).unwrap();
        let mut got = vec![0u8; 0x2000];
        mem.read_slice(&mut got, GuestAddress(0xF000)).unwrap();
        let want: Vec<u8> = (512..512 + 0x2000).map(|i| (i % 251) as u8).collect();
        assert_eq!(got, want);
        let mut tail = vec![0u8; 0x400];
        mem.read_slice(&mut tail, GuestAddress(0x4000)).unwrap();
        let want: Vec<u8> = (512 + 0x2000..512 + 0x2400)
            .map(|i| (i % 251) as u8)
            .collect();
        assert_eq!(tail, want);
        for r in mem.iter() {
            let dirty = |page: usize| r.bitmap().dirty_at(page * 4096);
            match r.start_addr().0 {
                0 => assert!(dirty(0xF) && dirty(0x4) && !dirty(0x3) && !dirty(0x5)),
                _ => assert!(dirty(0) && !dirty(1)),
            }
        }
    }

    #[test]
    fn a_file_writes_straight_from_guest_memory() {
        let mem = memory();
        mem.write_slice(&[7u8; 0x2000], GuestAddress(0xF000))
            .unwrap();
        let mut file = image(64 << 10);
        let bufs = slices(&mem, &[(0xF000, 0x2000)]);
        file.write_from(&bufs, 1024).unwrap();
        let mut back = vec![0u8; 0x2002];
        file.seek(SeekFrom::Start(1023)).unwrap();
        file.read_exact(&mut back).unwrap();
        assert_eq!(back[0], (1023 % 251) as u8, "the byte before is untouched");
        assert!(back[1..0x2001].iter().all(|&b| b == 7));
        assert_eq!(
            back[0x2001],
            ((1024 + 0x2000) % 251) as u8,
            "the byte after too"
        );
    }

    #[test]
    fn reading_past_the_end_of_the_file_is_an_error() {
        let mem = memory();
        let mut file = image(4096);
        let bufs = slices(&mem, &[(0, 0x2000)]);
        let err = file.read_into(&bufs, 0).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    /// Short transfers, EINTR and more pieces than one call takes all end with every byte
    /// moved once, in order.
    #[test]
    fn vectored_transfers_resume_after_short_calls_and_split_at_the_iov_limit() {
        let mem = memory();
        let mut bufs = slices(&mem, &[(0, 3), (0x200, 5), (0x300, 1), (0x400, 7)]);
        // Empty pieces first and in the middle are skipped, never handed to a call alone.
        let empty = || mem.get_slice(GuestAddress(0x100), 0).unwrap();
        bufs.insert(1, empty());
        bufs.insert(0, empty());
        let mut calls = Vec::new();
        let mut moved = Vec::new();
        vectored_at(&bufs, 100, 2, |iov, at| {
            assert!(iov.len() <= 2);
            assert!(iov.iter().any(|v| v.iov_len > 0), "a call moves something");
            calls.push(at);
            if calls.len() == 2 {
                return Err(io::Error::from(io::ErrorKind::Interrupted));
            }
            // At most 4 bytes per call: most calls are short.
            let mut left = 4usize;
            for v in iov {
                let n = v.iov_len.min(left);
                moved.push((v.iov_base as usize, n));
                left -= n;
            }
            Ok(4 - left)
        })
        .unwrap();
        let host = |addr: u64| mem.get_host_address(GuestAddress(addr)).unwrap() as usize;
        let total: usize = moved.iter().map(|m| m.1).sum();
        assert_eq!(total, 16);
        // Byte by byte, the order is the buffers' order.
        let flat: Vec<usize> = moved
            .iter()
            .flat_map(|&(base, n)| (0..n).map(move |i| base + i))
            .collect();
        let want: Vec<usize> = [(0, 3), (0x200, 5), (0x300, 1), (0x400, 7)]
            .iter()
            .flat_map(|&(a, n)| (0..n).map(move |i| host(a) + i))
            .collect();
        assert_eq!(flat, want);
        // Offsets advance by what was moved; the interrupted call is retried at the same one.
        // The first call takes the 3-byte piece and an empty one (two pieces at most).
        assert_eq!(calls, [100, 103, 103, 107, 109, 113]);
    }
}
