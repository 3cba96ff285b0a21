//! Sparse files: where a file has data and where it has holes (SEEK_DATA / SEEK_HOLE).
//! Checkpoint memory images are sparse (zero pages are never written); restoring maps their
//! holes as anonymous memory, and writing or checking an image reads only its data.

use std::fs::File;
use std::os::fd::AsRawFd;

/// Data extents `(offset, length)` of `file` below `len`, in order; the whole range where
/// SEEK_DATA is not supported (every byte then counts as data, which is always safe).
pub fn data_extents(file: &File, len: u64) -> Vec<(u64, u64)> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = 0i64;
    while (pos as u64) < len {
        // SAFETY: lseek on an fd this function borrows; it only moves the file offset.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let errno = std::io::Error::last_os_error().raw_os_error();
            if errno == Some(libc::ENXIO) {
                break; // No data after pos.
            }
            return vec![(0, len)];
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let end = if hole < 0 { len as i64 } else { hole }.min(len as i64);
        if end > data {
            out.push((data as u64, (end - data) as u64));
        }
        pos = end.max(data + 1);
    }
    out
}

/// The holes of `file` within `[start, start + len)`, as ranges relative to `start`, shrunk
/// to whole `align`-byte units (a partial unit holds data) and at least `min_len` long.
pub fn holes(file: &File, start: u64, len: u64, align: u64, min_len: u64) -> Vec<(u64, u64)> {
    let end = start + len;
    let mut out = Vec::new();
    let mut at = start;
    let mut push = |from: u64, to: u64| {
        let (from, to) = (from.next_multiple_of(align), to - to % align);
        if to > from && to - from >= min_len {
            out.push((from - start, to - from));
        }
    };
    for (data, extent) in data_extents(file, end) {
        let data_end = data + extent;
        if data_end <= start {
            continue;
        }
        if data > at {
            push(at, data.min(end));
        }
        at = at.max(data_end);
        if at >= end {
            break;
        }
    }
    if at < end {
        push(at, end);
    }
    out
}

/// An empty in-memory file (a memfd: tmpfs, sparse) of `len` bytes, for tests.
#[cfg(test)]
pub(crate) fn memfd(len: u64) -> File {
    // SAFETY: memfd_create with a NUL-terminated name; the fd is owned right away.
    let fd = unsafe { libc::memfd_create(c"vhpc-test".as_ptr(), 0) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: fd was just returned to us and nothing else owns it.
    let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    file.set_len(len).expect("size");
    file
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// A 64-page sparse file (in memory: a memfd) with data in pages 3 and 40..42.
    fn sparse_file() -> File {
        let file = memfd(64 * 4096);
        file.write_all_at(&[1; 4096], 3 * 4096).expect("write");
        file.write_all_at(&[2; 2 * 4096], 40 * 4096).expect("write");
        file
    }

    #[test]
    fn data_extents_find_the_written_pages() {
        let f = sparse_file();
        assert_eq!(
            data_extents(&f, 64 * 4096),
            [(3 * 4096, 4096), (40 * 4096, 2 * 4096)]
        );
        assert_eq!(data_extents(&f, 2 * 4096), []);
    }

    #[test]
    fn holes_are_the_complement_clipped_aligned_and_filtered() {
        let f = sparse_file();
        let p = 4096;
        assert_eq!(
            holes(&f, 0, 64 * p, p, p),
            [(0, 3 * p), (4 * p, 36 * p), (42 * p, 22 * p)]
        );
        // A window from page 2: offsets are relative to it.
        assert_eq!(holes(&f, 2 * p, 10 * p, p, p), [(0, p), (2 * p, 8 * p)]);
        // Holes shorter than 4 pages are left out; 16 KiB alignment shrinks the rest.
        assert_eq!(
            holes(&f, 0, 64 * p, 4 * p, 4 * p),
            [(4 * p, 36 * p), (44 * p, 20 * p)]
        );
        assert_eq!(holes(&f, 40 * p, 2 * p, p, p), []);
    }
}
