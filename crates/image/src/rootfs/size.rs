//! How big the ext4 image must be for a folder's content, with room to spare.
//!
//! `mkfs.ext4 -d` copies a folder into a fresh file system of a size given up front, so the
//! size is computed from the content: data blocks (every file rounded up to 4 KiB, directories
//! at least one block), inode tables for the inodes we ask for, the journal, and headroom for
//! what the guest writes.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// ext4 block size mkfs uses for images of this size.
pub const BLOCK: u64 = 4096;
/// Bytes per inode in the inode tables (mkfs.ext4's default inode size).
const INODE_SIZE: u64 = 256;
/// The journal mkfs.ext4 makes for file systems between 1 GiB and 16 GiB (64 MiB), charged
/// to every image: a smaller file system gets a smaller journal, never a bigger one.
const JOURNAL: u64 = 64 << 20;
/// Group descriptors, bitmaps, superblock copies: generously 2 % of the data.
const METADATA_PERCENT: u64 = 2;
/// Free space left for the guest: a quarter of the content, at least 256 MiB.
const HEADROOM_PERCENT: u64 = 25;
const MIN_HEADROOM: u64 = 256 << 20;
/// Images are whole multiples of this.
const ROUND: u64 = 16 << 20;

/// What a folder holds, as ext4 will store it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Content {
    /// Data blocks, in bytes.
    pub data_bytes: u64,
    /// Files, directories, links and device nodes (hard links counted once).
    pub inodes: u64,
}

/// Walks `root` without following symlinks or crossing into other file systems.
pub fn measure(root: &Path) -> io::Result<Content> {
    let top = std::fs::symlink_metadata(root)?;
    let mut content = Content::default();
    let mut seen_links = std::collections::HashSet::new();
    let mut stack = vec![root.to_path_buf()];
    content.add(&top);
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let meta = entry.metadata()?; // of the entry itself: DirEntry does not follow links
            if meta.dev() != top.dev() {
                continue;
            }
            if meta.nlink() > 1 && !meta.is_dir() && !seen_links.insert(meta.ino()) {
                continue;
            }
            content.add(&meta);
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Ok(content)
}

impl Content {
    fn add(&mut self, meta: &std::fs::Metadata) {
        self.inodes += 1;
        let len = meta.len();
        let blocks = if meta.is_dir() {
            len.div_ceil(BLOCK).max(1)
        } else if meta.file_type().is_symlink() && len < 60 {
            0 // fast symlink: the target lives in the inode
        } else {
            len.div_ceil(BLOCK)
        };
        self.data_bytes += blocks * BLOCK;
    }

    /// Inodes to ask mkfs for: the content's and half as many again for the guest's files.
    pub fn inodes_to_reserve(&self) -> u64 {
        self.inodes + self.inodes / 2 + 1024
    }

    /// The least an image can be for this content to fit (no headroom).
    pub fn minimum_image_bytes(&self) -> u64 {
        let data = self.data_bytes;
        let fixed = JOURNAL + self.inodes_to_reserve() * INODE_SIZE;
        round_up(data + data * METADATA_PERCENT / 100 + fixed)
    }

    /// The image size chosen when none is given: the minimum plus headroom.
    pub fn image_bytes(&self) -> u64 {
        let headroom = (self.data_bytes * HEADROOM_PERCENT / 100).max(MIN_HEADROOM);
        round_up(self.minimum_image_bytes() + headroom)
    }
}

fn round_up(bytes: u64) -> u64 {
    bytes.div_ceil(ROUND) * ROUND
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn sizes_from_content() {
        let small = Content {
            data_bytes: 10 * MIB,
            inodes: 100,
        };
        // 10 MiB + 2 % + 64 MiB journal + 1174 inodes * 256 B -> 80 MiB; + 256 MiB headroom.
        assert_eq!(small.minimum_image_bytes(), 80 * MIB);
        assert_eq!(small.image_bytes(), 336 * MIB);
        let debian = Content {
            data_bytes: 200 * MIB,
            inodes: 8000,
        };
        let min = debian.minimum_image_bytes();
        assert!(min > 200 * MIB + JOURNAL && min < 290 * MIB, "{min}");
        assert_eq!(min % ROUND, 0);
        assert!(debian.image_bytes() >= min + MIN_HEADROOM);
        let big = Content {
            data_bytes: 4096 * MIB,
            inodes: 100_000,
        };
        // A quarter of the content as headroom once that exceeds the minimum headroom.
        assert!(big.image_bytes() >= big.minimum_image_bytes() + 1024 * MIB);
        assert_eq!(big.inodes_to_reserve(), 151_024);
    }

    #[test]
    fn measures_a_tree() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/one-byte"), b"x").unwrap();
        std::fs::write(root.join("block-and-a-bit"), vec![7u8; 4097]).unwrap();
        std::fs::write(root.join("empty"), b"").unwrap();
        std::fs::hard_link(root.join("block-and-a-bit"), root.join("hard")).unwrap();
        std::os::unix::fs::symlink("sub/one-byte", root.join("short-link")).unwrap();
        std::os::unix::fs::symlink("x".repeat(100), root.join("long-link")).unwrap();
        let c = measure(root).unwrap();
        // root, sub, one-byte, block-and-a-bit (+ its hard link once), empty, two links.
        assert_eq!(c.inodes, 7);
        let dirs = 2 * BLOCK; // tmpfs/ext4 directories this small report <= one block
        assert_eq!(c.data_bytes, dirs + BLOCK + 2 * BLOCK + BLOCK);
        assert!(measure(&root.join("missing")).is_err());
    }
}
