//! A writer for "newc" cpio archives, the format the Linux kernel unpacks as initramfs.
//!
//! Every entry is a 110-byte ASCII header (`070701` and thirteen 8-digit hex fields), the
//! NUL-terminated path padded to a multiple of 4 bytes, then the data padded likewise. The
//! archive ends with an entry named `TRAILER!!!`. Timestamps and owners are zero so archives
//! are reproducible. Archives written here are always a multiple of 4 bytes long, so they can
//! be concatenated directly (the kernel requires each archive to start 4-byte aligned).

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use thiserror::Error;

const MAGIC: &[u8; 6] = b"070701";
const HEADER_LEN: u64 = 110;
const TRAILER: &str = "TRAILER!!!";

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;
const PERMISSION_BITS: u32 = 0o7777;

#[derive(Debug, Error)]
pub enum CpioError {
    #[error("cannot write the cpio archive: {0}")]
    Write(#[source] io::Error),
    #[error("cannot read {path} to add it to the cpio archive: {source}")]
    ReadSource {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} changed size while being added to the cpio archive; retry when it is stable")]
    SourceChanged { path: PathBuf },
    #[error(
        "invalid path {path:?} in cpio archive: paths must be non-empty, relative (no leading \
         '/') and free of NUL bytes"
    )]
    InvalidPath { path: String },
    #[error("{path} is {size} bytes; a newc cpio entry holds at most 4 GiB")]
    TooLarge { path: String, size: u64 },
}

/// The fields of one header that vary between entries.
struct Entry<'a> {
    path: &'a str,
    mode: u32,
    nlink: u32,
    size: u64,
    rdev: (u32, u32),
}

/// Writes a newc cpio archive to `W`. Call [`CpioWriter::finish`] to write the trailer.
pub struct CpioWriter<W: Write> {
    out: W,
    /// Bytes written so far, for alignment padding.
    offset: u64,
    next_ino: u32,
}

impl<W: Write> CpioWriter<W> {
    /// Starts an archive; nothing is written until the first entry.
    pub fn new(out: W) -> Self {
        Self {
            out,
            offset: 0,
            next_ino: 1,
        }
    }

    /// Adds a directory; `mode` gives the permission bits (e.g. 0o755).
    pub fn add_dir(&mut self, path: &str, mode: u32) -> Result<(), CpioError> {
        self.header(&Entry {
            path,
            mode: S_IFDIR | (mode & PERMISSION_BITS),
            nlink: 2,
            size: 0,
            rdev: (0, 0),
        })
    }

    /// Adds a regular file with the given contents.
    pub fn add_file(&mut self, path: &str, mode: u32, data: &[u8]) -> Result<(), CpioError> {
        self.header(&Entry {
            path,
            mode: S_IFREG | (mode & PERMISSION_BITS),
            nlink: 1,
            size: data.len() as u64,
            rdev: (0, 0),
        })?;
        self.write(data)?;
        self.pad()
    }

    /// Adds a regular file, streaming its contents from `host_path`.
    pub fn add_file_from_path(
        &mut self,
        path: &str,
        mode: u32,
        host_path: &Path,
    ) -> Result<(), CpioError> {
        let read_err = |source| CpioError::ReadSource {
            path: host_path.to_owned(),
            source,
        };
        let file = File::open(host_path).map_err(read_err)?;
        let size = file.metadata().map_err(read_err)?.len();
        self.header(&Entry {
            path,
            mode: S_IFREG | (mode & PERMISSION_BITS),
            nlink: 1,
            size,
            rdev: (0, 0),
        })?;
        let mut source = file.take(size);
        let mut buf = vec![0u8; 64 * 1024];
        let mut copied = 0u64;
        loop {
            let n = match source.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(read_err(err)),
            };
            self.write(&buf[..n])?;
            copied += n as u64;
        }
        if copied != size {
            return Err(CpioError::SourceChanged {
                path: host_path.to_owned(),
            });
        }
        self.pad()
    }

    /// Adds a symbolic link at `path` pointing to `target`.
    pub fn add_symlink(&mut self, path: &str, target: &str) -> Result<(), CpioError> {
        self.header(&Entry {
            path,
            mode: S_IFLNK | 0o777,
            nlink: 1,
            size: target.len() as u64,
            rdev: (0, 0),
        })?;
        self.write(target.as_bytes())?;
        self.pad()
    }

    /// Adds a character device node (the kernel creates it with mknod when unpacking), e.g.
    /// `dev/console` 5:1 so the kernel can give /init a console before /dev is mounted.
    pub fn add_char_device(
        &mut self,
        path: &str,
        mode: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), CpioError> {
        self.header(&Entry {
            path,
            mode: S_IFCHR | (mode & PERMISSION_BITS),
            nlink: 1,
            size: 0,
            rdev: (major, minor),
        })
    }

    /// Writes the trailer, flushes, and returns the underlying writer.
    pub fn finish(mut self) -> Result<W, CpioError> {
        self.header(&Entry {
            path: TRAILER,
            mode: 0,
            nlink: 1,
            size: 0,
            rdev: (0, 0),
        })?;
        self.out.flush().map_err(CpioError::Write)?;
        Ok(self.out)
    }

    fn header(&mut self, entry: &Entry<'_>) -> Result<(), CpioError> {
        let path = entry.path;
        if path.is_empty() || path.starts_with('/') || path.contains('\0') {
            return Err(CpioError::InvalidPath {
                path: path.to_owned(),
            });
        }
        let size = u32::try_from(entry.size).map_err(|_| CpioError::TooLarge {
            path: path.to_owned(),
            size: entry.size,
        })?;
        let ino = self.next_ino;
        self.next_ino += 1;
        let fields = [
            ino,
            entry.mode,
            0, // uid
            0, // gid
            entry.nlink,
            0, // mtime
            size,
            0, // devmajor
            0, // devminor
            entry.rdev.0,
            entry.rdev.1,
            (path.len() + 1) as u32, // name size, with the NUL
            0,                       // check (unused by newc)
        ];
        let mut header = Vec::with_capacity(HEADER_LEN as usize + path.len() + 1);
        header.extend_from_slice(MAGIC);
        for field in fields {
            header.extend_from_slice(format!("{field:08x}").as_bytes());
        }
        header.extend_from_slice(path.as_bytes());
        header.push(0);
        self.write(&header)?;
        self.pad()
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), CpioError> {
        self.out.write_all(bytes).map_err(CpioError::Write)?;
        self.offset += bytes.len() as u64;
        Ok(())
    }

    /// Pads with NULs to the next multiple of 4 bytes.
    fn pad(&mut self) -> Result<(), CpioError> {
        let padding = (4 - (self.offset % 4) as usize) % 4;
        self.write(&[0u8; 3][..padding])
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
pub(crate) mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    /// One parsed entry: (path, mode, rdev major, rdev minor, data).
    pub(crate) type Parsed = (String, u32, u32, u32, Vec<u8>);

    /// A minimal newc reader for tests; also checks header syntax and alignment.
    pub(crate) fn parse(archive: &[u8]) -> Vec<Parsed> {
        let field = |h: &[u8], i: usize| {
            let text = std::str::from_utf8(&h[6 + 8 * i..14 + 8 * i]).unwrap();
            u32::from_str_radix(text, 16).unwrap()
        };
        let align = |n: usize| n.div_ceil(4) * 4;
        let mut pos = 0;
        let mut entries = Vec::new();
        let mut inodes = std::collections::HashSet::new();
        loop {
            let h = &archive[pos..pos + 110];
            assert_eq!(&h[..6], MAGIC);
            assert!(inodes.insert(field(h, 0)), "duplicate inode");
            let (mode, size, namesize) = (field(h, 1), field(h, 6) as usize, field(h, 11) as usize);
            let name_start = pos + 110;
            let name = &archive[name_start..name_start + namesize];
            assert_eq!(name.last(), Some(&0));
            let name = String::from_utf8(name[..namesize - 1].to_vec()).unwrap();
            let data_start = align(name_start + namesize);
            pos = align(data_start + size);
            if name == TRAILER {
                assert_eq!(pos, archive.len(), "data after the trailer");
                return entries;
            }
            let data = archive[data_start..data_start + size].to_vec();
            entries.push((name, mode, field(h, 9), field(h, 10), data));
        }
    }

    fn sample() -> Vec<u8> {
        let mut w = CpioWriter::new(Vec::new());
        w.add_dir("bin", 0o755).unwrap();
        w.add_file("bin/hello", 0o755, b"#!/bin/sh\necho hi\n")
            .unwrap();
        w.add_file("empty", 0o644, b"").unwrap();
        w.add_symlink("bin/sh", "/bin/busybox").unwrap();
        w.add_char_device("console", 0o600, 5, 1).unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn header_fields_by_hand() {
        let archive = sample();
        assert_eq!(archive.len() % 4, 0);
        let first = std::str::from_utf8(&archive[..110]).unwrap();
        // magic, ino 1, mode dir|0755, uid, gid, nlink 2, mtime, size 0, dev, rdev, namesize 4
        assert_eq!(
            first,
            "070701\
             00000001000041ed0000000000000000000000020000000000000000\
             00000000000000000000000000000000\
             0000000400000000"
        );
        assert_eq!(&archive[110..116], b"bin\0\0\0"); // 110 + 4 -> padded to 116
        let entries = parse(&archive);
        let names: Vec<_> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(names, ["bin", "bin/hello", "empty", "bin/sh", "console"]);
        assert_eq!(entries[1].1, 0o100_755);
        assert_eq!(entries[1].4, b"#!/bin/sh\necho hi\n");
        assert_eq!(entries[3].1, 0o120_777);
        assert_eq!(entries[3].4, b"/bin/busybox");
        assert_eq!(
            (entries[4].1, entries[4].2, entries[4].3),
            (0o020_600, 5, 1)
        );
    }

    #[test]
    fn file_from_path_streams_contents() {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("data");
        let data: Vec<u8> = (0..200_001u32).map(|i| (i * 7) as u8).collect();
        std::fs::write(&host, &data).unwrap();
        let mut w = CpioWriter::new(Vec::new());
        w.add_file_from_path("data", 0o600, &host).unwrap();
        let entries = parse(&w.finish().unwrap());
        assert_eq!(entries[0].4, data);
        let missing =
            CpioWriter::new(Vec::new()).add_file_from_path("x", 0o600, &dir.path().join("nope"));
        assert!(matches!(missing, Err(CpioError::ReadSource { .. })));
    }

    #[test]
    fn invalid_paths_are_rejected() {
        let mut w = CpioWriter::new(Vec::new());
        for bad in ["", "/abs", "a\0b"] {
            assert!(matches!(
                w.add_dir(bad, 0o755),
                Err(CpioError::InvalidPath { .. })
            ));
        }
    }

    #[test]
    fn system_cpio_lists_the_archive() {
        let child = Command::new("cpio")
            .args(["-t", "--quiet"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn();
        let Ok(mut child) = child else {
            eprintln!("WARNING: `cpio` not found; skipping the cross-check against GNU cpio");
            return;
        };
        child.stdin.take().unwrap().write_all(&sample()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "cpio -t failed: {out:?}");
        let listing = String::from_utf8(out.stdout).unwrap();
        assert_eq!(
            listing.lines().collect::<Vec<_>>(),
            ["bin", "bin/hello", "empty", "bin/sh", "console"]
        );
    }
}
