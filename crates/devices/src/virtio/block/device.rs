//! The virtio-blk device: a raw image file, read-write or read-only, one request queue.
//!
//! Features: FLUSH (the guest's cache flushes become fdatasync on the image, so data the guest
//! synced survives the VMM being killed), RO for read-only disks, SEG_MAX (so Linux sends
//! many segments per request), indirect descriptors. Requests are served on the device's
//! worker thread with positional reads and writes on the image.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use virtio_queue::Queue;

use super::request::{self, Disk, ID_BYTES, SECTOR_SIZE};
use crate::persist::{Persist, PersistError};
use crate::virtio::{
    GuestMemory, QueueError, QueueHandler, VIRTIO_RING_F_INDIRECT_DESC, VirtioBackend,
};

pub const VIRTIO_ID_BLOCK: u16 = 2;
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
/// Mass storage controller, "other".
const PCI_CLASS_STORAGE_OTHER: u32 = 0x01_80_00;
pub const QUEUE_SIZE: u16 = 256;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error(
        "cannot open disk image {path} {mode}: {source}; check that it exists and its permissions (add ,ro for a read-only disk)"
    )]
    Open {
        path: PathBuf,
        mode: &'static str,
        source: std::io::Error,
    },
    #[error(
        "disk image {0} is smaller than one 512-byte sector; give it a size (truncate -s 64M FILE)"
    )]
    Empty(PathBuf),
}

pub struct Block {
    file: File,
    sectors: u64,
    read_only: bool,
    id: [u8; ID_BYTES],
}

impl Block {
    /// Opens the raw image at `path`; `id` becomes the GET_ID answer (cut to 20 bytes).
    pub fn open(path: &Path, read_only: bool, id: &str) -> Result<Block, BlockError> {
        let mode = if read_only { "read-only" } else { "read-write" };
        let open_err = |source| BlockError::Open {
            path: path.to_path_buf(),
            mode,
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(open_err)?;
        let len = file.metadata().map_err(open_err)?.len();
        let len = if len == 0 {
            // A block device reports 0 in its metadata: ask it by seeking.
            use std::io::Seek;
            (&file).seek(std::io::SeekFrom::End(0)).map_err(open_err)?
        } else {
            len
        };
        let sectors = len / SECTOR_SIZE;
        if sectors == 0 {
            return Err(BlockError::Empty(path.to_path_buf()));
        }
        let mut id_bytes = [0u8; ID_BYTES];
        let n = id.len().min(ID_BYTES);
        id_bytes[..n].copy_from_slice(&id.as_bytes()[..n]);
        Ok(Block {
            file,
            sectors,
            read_only,
            id: id_bytes,
        })
    }

    /// Capacity in 512-byte sectors (a partial last sector is not exposed).
    pub fn sectors(&self) -> u64 {
        self.sectors
    }
}

/// The virtio-blk config space fields we fill: capacity (u64 at 0), size_max (u32 at 8,
/// 0 = no limit), seg_max (u32 at 12).
fn config_bytes(sectors: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..8].copy_from_slice(&sectors.to_le_bytes());
    b[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
    b
}

impl VirtioBackend for Block {
    fn device_type(&self) -> u16 {
        VIRTIO_ID_BLOCK
    }

    fn pci_class(&self) -> u32 {
        PCI_CLASS_STORAGE_OTHER
    }

    fn features(&self) -> u64 {
        let ro = if self.read_only { VIRTIO_BLK_F_RO } else { 0 };
        VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_FLUSH | VIRTIO_RING_F_INDIRECT_DESC | ro
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let bytes = config_bytes(self.sectors);
        crate::pci::copy_from(&bytes, offset.min(bytes.len() as u64) as usize, data);
    }

    fn activate(&mut self, _features: u64) -> std::io::Result<Box<dyn QueueHandler>> {
        let disk = Disk::new(
            self.file.try_clone()?,
            self.sectors,
            self.read_only,
            self.id,
        );
        Ok(Box::new(BlockHandler(disk)))
    }
}

/// `virtio-blk` backend state version 1: nothing the guest can change lives in the device
/// (the data is in the image file, whose identity the VMM records beside the checkpoint);
/// what identifies the disk is kept to refuse restoring onto a different one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockStateV1 {
    pub sectors: u64,
    pub read_only: bool,
    pub id: Vec<u8>,
}

impl Persist for Block {
    type State = BlockStateV1;
    const VERSION: u32 = 1;
    const NAME: &'static str = "virtio-blk";

    fn save(&self) -> Result<BlockStateV1, PersistError> {
        Ok(BlockStateV1 {
            sectors: self.sectors,
            read_only: self.read_only,
            id: self.id.to_vec(),
        })
    }

    fn restore(&mut self, s: BlockStateV1) -> Result<(), PersistError> {
        if (s.sectors, s.read_only) != (self.sectors, self.read_only) {
            return Err(PersistError::Mismatch {
                device: Self::NAME,
                detail: format!(
                    "the checkpoint's disk had {} sectors{}, this one has {}{}",
                    s.sectors,
                    if s.read_only { " (read-only)" } else { "" },
                    self.sectors,
                    if self.read_only { " (read-only)" } else { "" }
                ),
            });
        }
        Ok(())
    }
}

struct BlockHandler(Disk<File>);

impl QueueHandler for BlockHandler {
    fn process(
        &mut self,
        _: usize,
        queue: &mut Queue,
        mem: &GuestMemory,
    ) -> Result<bool, QueueError> {
        request::process_queue(&mut self.0, queue, mem)
    }
}
