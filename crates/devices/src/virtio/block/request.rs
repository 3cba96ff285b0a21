//! virtio-blk requests (virtio 1.x §5.2.6): parse a descriptor chain, do the I/O, write the
//! status. Everything here comes from the guest: a malformed request gets an error status
//! (or, when even the status byte is unusable, is returned unused), never a panic.
//!
//! A request is a 16-byte header (type, reserved, sector) in the first, device-readable
//! descriptor; then the data descriptors (device-writable for reads and GET_ID,
//! device-readable for writes); then the 1-byte status in the last, device-writable one.

use std::io;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

pub use super::backend::BlockBackend;
use crate::virtio::{GuestMemory, QueueError};

pub const SECTOR_SIZE: u64 = 512;
pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;
/// Length of the GET_ID answer.
pub const ID_BYTES: usize = 20;
const HEADER_LEN: u32 = 16;
/// A disk as the request code sees it.
pub struct Disk<B> {
    pub backend: B,
    /// Capacity in 512-byte sectors.
    pub sectors: u64,
    pub read_only: bool,
    /// The GET_ID answer (NUL-padded).
    pub id: [u8; ID_BYTES],
    /// The first malformed request is logged as a warning, later ones at debug level.
    malformed_seen: bool,
}

impl<B: BlockBackend> Disk<B> {
    pub fn new(backend: B, sectors: u64, read_only: bool, id: [u8; ID_BYTES]) -> Self {
        Disk {
            backend,
            sectors,
            read_only,
            id,
            malformed_seen: false,
        }
    }
}

/// Why a chain is not a request we can answer at all.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("a request needs at least a header and a status descriptor, got {0} descriptor(s)")]
    TooFewDescriptors(usize),
    #[error("the header descriptor is device-writable; it must be device-readable")]
    WritableHeader,
    #[error("the header descriptor has {0} bytes; it needs {HEADER_LEN}")]
    ShortHeader(u32),
    #[error("the header at {0:#x} is outside guest memory")]
    HeaderOutsideMemory(u64),
    #[error("the status descriptor is not device-writable or has no room")]
    BadStatusDescriptor,
}

/// A parsed request.
#[derive(Debug)]
pub struct Request {
    pub kind: u32,
    pub sector: u64,
    pub data: Vec<Descriptor>,
    pub status: GuestAddress,
}

/// Parses one descriptor chain.
pub fn parse(
    chain: impl Iterator<Item = Descriptor>,
    mem: &GuestMemory,
) -> Result<Request, RequestError> {
    let mut descs: Vec<Descriptor> = chain.collect();
    if descs.len() < 2 {
        return Err(RequestError::TooFewDescriptors(descs.len()));
    }
    let header = descs.remove(0);
    let status = descs.pop().ok_or(RequestError::TooFewDescriptors(1))?;
    if header.is_write_only() {
        return Err(RequestError::WritableHeader);
    }
    if header.len() < HEADER_LEN {
        return Err(RequestError::ShortHeader(header.len()));
    }
    let outside = || RequestError::HeaderOutsideMemory(header.addr().raw_value());
    let kind: u32 = mem.read_obj(header.addr()).map_err(|_| outside())?;
    let sector_addr = header.addr().checked_add(8).ok_or_else(outside)?;
    let sector: u64 = mem.read_obj(sector_addr).map_err(|_| outside())?;
    if !status.is_write_only() || status.len() == 0 {
        return Err(RequestError::BadStatusDescriptor);
    }
    Ok(Request {
        kind: u32::from_le(kind),
        sector: u64::from_le(sector),
        data: descs,
        status: status.addr(),
    })
}

/// Why a well-formed request failed (the guest gets IOERR).
#[derive(Debug, thiserror::Error)]
enum IoFailure {
    #[error("data descriptors in the wrong direction for request type {0}")]
    Direction(u32),
    #[error("{0} data bytes is not a whole number of sectors")]
    Partial(u64),
    #[error("sectors {start}..+{len} run past the end of the disk")]
    PastEnd { start: u64, len: u64 },
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("a data buffer is outside guest memory")]
    Memory,
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Runs a request; returns the status and how many bytes were written into guest memory.
pub fn execute<B: BlockBackend>(disk: &mut Disk<B>, req: &Request, mem: &GuestMemory) -> (u8, u32) {
    let result = match req.kind {
        VIRTIO_BLK_T_IN => transfer(disk, req, mem, true),
        VIRTIO_BLK_T_OUT => transfer(disk, req, mem, false).map(|_| 0),
        VIRTIO_BLK_T_FLUSH => disk.backend.flush().map(|()| 0).map_err(IoFailure::from),
        VIRTIO_BLK_T_GET_ID => get_id(disk, req, mem),
        other => {
            log::debug!("virtio-blk: unsupported request type {other}");
            return (VIRTIO_BLK_S_UNSUPP, 0);
        }
    };
    match result {
        Ok(written) => (VIRTIO_BLK_S_OK, written),
        Err(e) => {
            log::debug!("virtio-blk: request type {} failed: {e}", req.kind);
            (VIRTIO_BLK_S_IOERR, 0)
        }
    }
}

/// Reads (`into_guest`) or writes the request's sectors; returns the bytes written to guest
/// memory.
fn transfer<B: BlockBackend>(
    disk: &mut Disk<B>,
    req: &Request,
    mem: &GuestMemory,
    into_guest: bool,
) -> Result<u32, IoFailure> {
    if !into_guest && disk.read_only {
        return Err(IoFailure::ReadOnly);
    }
    if req.data.iter().any(|d| d.is_write_only() != into_guest) {
        return Err(IoFailure::Direction(req.kind));
    }
    let total: u64 = req.data.iter().map(|d| u64::from(d.len())).sum();
    if !total.is_multiple_of(SECTOR_SIZE) {
        return Err(IoFailure::Partial(total));
    }
    let past_end = IoFailure::PastEnd {
        start: req.sector,
        len: total / SECTOR_SIZE,
    };
    let end = req.sector.checked_add(total / SECTOR_SIZE);
    if end.is_none_or(|end| end > disk.sectors) {
        return Err(past_end);
    }
    let mut bufs = Vec::with_capacity(req.data.len());
    for d in &req.data {
        for slice in mem.get_slices(d.addr(), d.len() as usize) {
            bufs.push(slice.map_err(|_| IoFailure::Memory)?);
        }
    }
    let pos = req.sector * SECTOR_SIZE;
    if into_guest {
        disk.backend.read_into(&bufs, pos)?;
    } else {
        disk.backend.write_from(&bufs, pos)?;
    }
    Ok(if into_guest { total as u32 } else { 0 })
}

fn get_id<B>(disk: &Disk<B>, req: &Request, mem: &GuestMemory) -> Result<u32, IoFailure> {
    if req.data.iter().any(|d| !d.is_write_only()) {
        return Err(IoFailure::Direction(req.kind));
    }
    let mut written = 0usize;
    for d in &req.data {
        let n = (d.len() as usize).min(ID_BYTES - written);
        mem.write_slice(&disk.id[written..written + n], d.addr())
            .map_err(|_| IoFailure::Memory)?;
        written += n;
    }
    Ok(written as u32)
}

/// Processes every request the driver made available; returns whether any was used. A
/// malformed request is returned to the driver (with IOERR when its status byte is usable);
/// only a broken ring stops the device.
pub fn process_queue<B: BlockBackend>(
    disk: &mut Disk<B>,
    queue: &mut Queue,
    mem: &GuestMemory,
) -> Result<bool, QueueError> {
    let mut used_any = false;
    loop {
        let chain = queue.iter(mem).map_err(QueueError::Ring)?.next();
        let Some(chain) = chain else {
            return Ok(used_any);
        };
        let head = chain.head_index();
        let used = match parse(chain, mem) {
            Ok(req) => {
                let (status, written) = execute(disk, &req, mem);
                match mem.write_obj(status, req.status) {
                    Ok(()) => written.saturating_add(1),
                    Err(_) => {
                        disk.note_malformed("the status byte is outside guest memory");
                        0
                    }
                }
            }
            Err(e) => {
                disk.note_malformed(&e.to_string());
                0
            }
        };
        queue.add_used(mem, head, used).map_err(QueueError::Ring)?;
        used_any = true;
    }
}

impl<B> Disk<B> {
    fn note_malformed(&mut self, what: &str) {
        if self.malformed_seen {
            log::debug!("virtio-blk: malformed request: {what}");
        } else {
            self.malformed_seen = true;
            log::warn!(
                "virtio-blk: malformed request from the guest driver: {what} (further ones are logged at debug level)"
            );
        }
    }
}
