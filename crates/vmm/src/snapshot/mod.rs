//! Checkpoints on disk: save a VM into a directory (full or incremental), restore one into a
//! new VM with lazily mapped memory, fold a chain into one, inspect and verify one.
//! The format is documented in docs/snapshot-format.md.
//!
//! ```text
//! DIR/state.bin     header (magic, version, length, CRC-32) + body: meta (vhpc version,
//!                   host CPU and kernel, id, parent), VM config, memory layout and checksum,
//!                   disks, components (irqchip, vcpu.0, vcpu.1, ...)
//! DIR/memory.raw    full checkpoint: sparse image of guest RAM, zero pages are holes
//! DIR/memory.delta  incremental checkpoint: the pages dirtied since the parent, packed
//! ```
//!
//! Order, as crosvm does it: the vCPUs are paused first (their state is complete between two
//! instructions), then the interrupt controllers, PIT and clock are read, then memory; a new
//! VM gets memory, then interrupt controllers, then vCPUs.

mod atomic;
mod chain;
pub mod components;
pub mod format;
pub mod memfile;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use chain::{
    Checkpoint, Inspection, RestoreOptions, inspect, load_chain, map_chain, merge, restore,
};
pub use format::{FormatError, HostInfo, StateBody};

use crate::vm::{Vm, VmError};
use atomic::PendingDir;
use format::{Component, MemoryContents, MemoryRecord, Meta, ParentLink};
use memfile::{DELTA_FILE, FULL_FILE};

pub const STATE_FILE: &str = "state.bin";

/// The checkpoint a VM's dirty log counts from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointLink {
    pub id: String,
    pub dir: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckpointKind {
    /// All of guest memory (zero pages as holes).
    Full,
    /// Only the pages dirtied since this VM's previous checkpoint, which becomes the parent.
    Incremental,
}

/// What a checkpoint wrote.
#[derive(Clone, Debug)]
pub struct CheckpointInfo {
    pub id: String,
    pub dir: PathBuf,
    pub parent: Option<String>,
    /// Pages in the memory file (non-zero pages of a full one, dirty pages of a delta).
    pub memory_pages: u64,
    pub state_bytes: u64,
    /// From the vCPUs stopped to the checkpoint durable on disk.
    pub paused_for: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(
        "this VM has virtio disks or a vsock device, whose device state checkpoints do not \
         capture yet; checkpoint VMs without --disk or vsock for now"
    )]
    DevicesNotSupported,
    #[error("cannot {what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("checkpoint {}: {source}", dir.display())]
    Format { dir: PathBuf, source: FormatError },
    #[error(
        "an incremental checkpoint needs an earlier checkpoint of this VM, taken in this VMM process, to be the parent; take a full checkpoint first"
    )]
    NoParent,
    #[error(
        "an incremental checkpoint cannot replace its own parent {}; write it to another directory",
        .0.display()
    )]
    ReplacesParent(PathBuf),
    #[error("the checkpoint chain ending at {} is broken: {detail}", dir.display())]
    Chain { dir: PathBuf, detail: String },
    #[error(
        "the checkpoint was made on a host with CPU \"{saved}\", this host has \"{here}\": its vCPU state (CPUID, MSRs) may not fit this CPU. Restore on a host with the same CPU model, or force it (--force)"
    )]
    HostMismatch { saved: String, here: String },
    #[error(
        "a disk of the checkpointed VM is not as it was: {0}; the guest's view of it would be inconsistent. Restore the disk as it was, or force it (--force)"
    )]
    DiskChanged(String),
    #[error("the memory of checkpoint {} is damaged: {detail}", dir.display())]
    MemoryDamaged { dir: PathBuf, detail: String },
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let path = path.to_path_buf();
    move |source| SnapshotError::Io { what, path, source }
}

/// 128 random bits, hex.
fn new_id() -> String {
    let mut bytes = [0u8; 16];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into the buffer it is given.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        // Unique enough without the kernel's randomness: time and process id.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        bytes = (t ^ (u128::from(std::process::id()) << 96)).to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Checkpoints `vm` into `dir` (atomically: an earlier checkpoint at `dir` stays whole until
/// the new one is complete). A running VM is paused for it and resumed after; a paused VM
/// stays paused (pause it first to stop it after the checkpoint). Every checkpoint turns on
/// KVM's dirty log, so that the next one can be incremental.
pub fn checkpoint(
    vm: &mut Vm,
    dir: &Path,
    kind: CheckpointKind,
) -> Result<CheckpointInfo, SnapshotError> {
    // Virtio queues, in-flight requests and PCI/MSI-X state are not saved yet: refuse rather
    // than write a checkpoint that would restore a broken guest.
    if !vm.config().disks.is_empty() || vm.has_vsock() {
        return Err(SnapshotError::DevicesNotSupported);
    }
    let was_paused = vm.is_paused();
    if !was_paused {
        vm.pause()?;
    }
    let start = Instant::now();
    let result = write_checkpoint(vm, dir, kind);
    if result.is_err() {
        // The dirty log may have been read and cleared: only a full checkpoint is safe next.
        vm.set_last_checkpoint(None);
    }
    let paused_for = start.elapsed();
    if !was_paused {
        vm.resume()?;
    }
    result.map(|info| CheckpointInfo { paused_for, ..info })
}

fn write_checkpoint(
    vm: &mut Vm,
    dir: &Path,
    kind: CheckpointKind,
) -> Result<CheckpointInfo, SnapshotError> {
    let dir = std::path::absolute(dir).map_err(io_err("resolve", dir))?;
    let parent = match kind {
        CheckpointKind::Full => None,
        CheckpointKind::Incremental => {
            let link = vm
                .last_checkpoint()
                .cloned()
                .ok_or(SnapshotError::NoParent)?;
            if !vm.dirty_logging() {
                return Err(SnapshotError::NoParent);
            }
            if link.dir == dir {
                return Err(SnapshotError::ReplacesParent(dir));
            }
            Some(link)
        }
    };
    let machine = vm.save_machine()?;
    let components = components::encode(&machine).map_err(|source| SnapshotError::Format {
        dir: dir.clone(),
        source,
    })?;
    let pending = PendingDir::create(&dir).map_err(io_err("create a directory beside", &dir))?;
    let (contents, pages) = if parent.is_some() {
        let runs = memfile::runs_of(&vm.dirty_pages()?);
        let path = pending.path().join(DELTA_FILE);
        let file = pending
            .create_file(DELTA_FILE)
            .map_err(io_err("create", &path))?;
        let stats = memfile::write_delta(vm.memory(), &runs, &file)
            .and_then(|s| file.sync_all().map(|()| s))
            .map_err(io_err("write", &path))?;
        let contents = MemoryContents::Delta {
            file: DELTA_FILE.into(),
            runs,
            crc32: stats.crc32,
        };
        (contents, stats.pages)
    } else {
        // A fresh dirty log from now on, for the next (incremental) checkpoint.
        if vm.dirty_logging() {
            vm.dirty_pages()?;
        } else {
            vm.set_dirty_logging(true)?;
        }
        write_full_memory(&pending, vm.memory())?
    };
    let meta = Meta {
        vhpc_version: env!("CARGO_PKG_VERSION").into(),
        host: HostInfo::current(),
        id: new_id(),
        parent: parent.map(|p| ParentLink {
            id: p.id,
            dir: p.dir,
        }),
        created_unix_ms: now_ms(),
    };
    let body = StateBody {
        meta,
        config: vm.config().clone(),
        memory: MemoryRecord {
            regions: memfile::regions(vm.memory()),
            contents,
        },
        // `DiskRecord::of` each disk once VmConfig has disks; restore already checks them.
        disks: Vec::new(),
        components,
    };
    let info = commit(pending, &dir, &body, pages)?;
    vm.set_last_checkpoint(Some(CheckpointLink {
        id: info.id.clone(),
        dir,
    }));
    Ok(info)
}

/// Writes a sparse `memory.raw` of `mem` into the pending directory.
fn write_full_memory(
    pending: &PendingDir,
    mem: &crate::memory::GuestMemory,
) -> Result<(MemoryContents, u64), SnapshotError> {
    let path = pending.path().join(FULL_FILE);
    let file = pending
        .create_file(FULL_FILE)
        .map_err(io_err("create", &path))?;
    let stats = memfile::write_full(mem, &file)
        .and_then(|s| file.sync_all().map(|()| s))
        .map_err(io_err("write", &path))?;
    let contents = MemoryContents::Full {
        file: FULL_FILE.into(),
        data_pages: stats.pages,
        crc32: stats.crc32,
    };
    Ok((contents, stats.pages))
}

/// Writes `state.bin` and renames the pending directory into place.
fn commit(
    pending: PendingDir,
    dir: &Path,
    body: &StateBody,
    memory_pages: u64,
) -> Result<CheckpointInfo, SnapshotError> {
    let bytes = format::encode(body).map_err(|source| SnapshotError::Format {
        dir: dir.to_path_buf(),
        source,
    })?;
    let path = pending.path().join(STATE_FILE);
    let write = |f: std::fs::File| {
        use std::io::Write;
        let mut f = f;
        f.write_all(&bytes)?;
        f.sync_all()
    };
    pending
        .create_file(STATE_FILE)
        .and_then(write)
        .map_err(io_err("write", &path))?;
    pending.commit().map_err(io_err("rename into place", dir))?;
    Ok(CheckpointInfo {
        id: body.meta.id.clone(),
        dir: dir.to_path_buf(),
        parent: body.meta.parent.as_ref().map(|p| p.id.clone()),
        memory_pages,
        state_bytes: bytes.len() as u64,
        paused_for: Duration::ZERO,
    })
}

/// Writes a full checkpoint of `components` and `mem` (already restored or mapped) into
/// `dir`: what a merge produces.
fn write_full_dir(
    dir: &Path,
    config: &vhpc_api::VmConfig,
    mem: &crate::memory::GuestMemory,
    components: Vec<Component>,
) -> Result<CheckpointInfo, SnapshotError> {
    let pending = PendingDir::create(dir).map_err(io_err("create a directory beside", dir))?;
    let (contents, pages) = write_full_memory(&pending, mem)?;
    let body = StateBody {
        meta: Meta {
            vhpc_version: env!("CARGO_PKG_VERSION").into(),
            host: HostInfo::current(),
            id: new_id(),
            parent: None,
            created_unix_ms: now_ms(),
        },
        config: config.clone(),
        memory: MemoryRecord {
            regions: memfile::regions(mem),
            contents,
        },
        disks: Vec::new(),
        components,
    };
    commit(pending, dir, &body, pages)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_128_bit_hex_and_differ() {
        let (a, b) = (new_id(), new_id());
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
