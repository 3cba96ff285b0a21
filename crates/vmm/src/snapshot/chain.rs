//! Reading checkpoints: one (load, verify), a chain (a full base and its incremental
//! children, checked link by link), restoring a chain into a new VM with the base's memory
//! mapped lazily, and merging a chain into one full checkpoint.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::format::{self, MemoryContents, StateBody};
use super::memfile;
use super::{STATE_FILE, SnapshotError, io_err};
use crate::memory::{self, FileRegion, GuestMemory};
use crate::vm::{Vm, VmIo};
use crate::vm_state::MachineState;

/// Longer chains are refused: a loop of parent links, or a chain to merge first.
const MAX_CHAIN: usize = 1000;

/// One checkpoint directory, its `state.bin` decoded and checked.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub body: StateBody,
    /// Size of `state.bin`.
    pub state_bytes: u64,
}

impl Checkpoint {
    /// Reads and checks `dir/state.bin` (header, checksum, body, component versions).
    pub fn load(dir: &Path) -> Result<Checkpoint, SnapshotError> {
        let path = dir.join(STATE_FILE);
        let bytes = std::fs::read(&path).map_err(io_err("read", &path))?;
        let checkpoint = Checkpoint::from_bytes(dir, &bytes)?;
        checkpoint.machine()?;
        Ok(checkpoint)
    }

    /// Decodes the bytes of a `state.bin` (never panics, whatever they are).
    pub fn from_bytes(dir: &Path, bytes: &[u8]) -> Result<Checkpoint, SnapshotError> {
        let body = format::decode(bytes).map_err(|source| SnapshotError::Format {
            dir: dir.to_path_buf(),
            source,
        })?;
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            body,
            state_bytes: bytes.len() as u64,
        })
    }

    /// The vCPU and interrupt-controller state.
    pub fn machine(&self) -> Result<MachineState, SnapshotError> {
        super::components::decode(&self.body).map_err(|source| SnapshotError::Format {
            dir: self.dir.clone(),
            source,
        })
    }

    fn memory_file(&self) -> PathBuf {
        let name = match &self.body.memory.contents {
            MemoryContents::Full { file, .. } | MemoryContents::Delta { file, .. } => file,
        };
        // Only a plain name inside the checkpoint directory.
        let name = Path::new(name).file_name().unwrap_or_default();
        self.dir.join(name)
    }
}

fn broken(dir: &Path, detail: String) -> SnapshotError {
    SnapshotError::Chain {
        dir: dir.to_path_buf(),
        detail,
    }
}

/// Where a parent link points: the recorded directory, else a sibling of the child's
/// directory with the same name (the chain was moved as a whole).
fn parent_dir(child: &Checkpoint, recorded: &Path) -> PathBuf {
    if recorded.join(STATE_FILE).exists() {
        return recorded.to_path_buf();
    }
    let sibling = child.dir.parent().zip(recorded.file_name());
    sibling.map_or_else(|| recorded.to_path_buf(), |(p, n)| p.join(n))
}

/// The chain ending at `dir`, base first: every parent's id is the one its child names, every
/// checkpoint has the same memory layout and vCPU count, only the base is full.
pub fn load_chain(dir: &Path) -> Result<Vec<Checkpoint>, SnapshotError> {
    let mut chain = vec![Checkpoint::load(dir)?];
    loop {
        let child = chain.last().ok_or_else(|| broken(dir, "empty".into()))?;
        let Some(link) = child.body.meta.parent.clone() else {
            break;
        };
        if chain.len() >= MAX_CHAIN {
            return Err(broken(dir, format!("more than {MAX_CHAIN} links")));
        }
        let pdir = parent_dir(child, &link.dir);
        let parent = Checkpoint::load(&pdir).map_err(|e| {
            broken(
                dir,
                format!("parent {} of {}: {e}", pdir.display(), child.dir.display()),
            )
        })?;
        if parent.body.meta.id != link.id {
            return Err(broken(
                dir,
                format!(
                    "{} names parent {} but {} is {} (it was overwritten)",
                    child.dir.display(),
                    link.id,
                    pdir.display(),
                    parent.body.meta.id
                ),
            ));
        }
        if parent.body.memory.regions != child.body.memory.regions
            || parent.body.config.vcpus != child.body.config.vcpus
        {
            return Err(broken(
                dir,
                format!(
                    "{} and its parent differ in memory layout or vCPUs",
                    child.dir.display()
                ),
            ));
        }
        chain.push(parent);
    }
    chain.reverse();
    for (i, c) in chain.iter().enumerate() {
        let full = matches!(c.body.memory.contents, MemoryContents::Full { .. });
        if full != (i == 0) {
            return Err(broken(
                dir,
                format!(
                    "{} is not where a {} checkpoint belongs",
                    c.dir.display(),
                    if full { "full" } else { "delta" }
                ),
            ));
        }
    }
    Ok(chain)
}

/// Guest memory for a chain: the base's image mapped privately (lazily), then each delta's
/// pages copied in, in order (their cost grows with the deltas, not with memory size).
pub fn map_chain(chain: &[Checkpoint], prefault: bool) -> Result<GuestMemory, SnapshotError> {
    let base = chain
        .first()
        .ok_or_else(|| broken(Path::new("."), "empty".into()))?;
    let path = base.memory_file();
    let file = File::open(&path).map_err(io_err("open", &path))?;
    let expected: u64 = base
        .body
        .memory
        .regions
        .iter()
        .map(|r| r.file_offset.saturating_add(r.len))
        .max()
        .unwrap_or(0);
    let len = file.metadata().map_err(io_err("stat", &path))?.len();
    if len != expected {
        return Err(SnapshotError::MemoryDamaged {
            dir: base.dir.clone(),
            detail: format!(
                "{} is {len} bytes, the layout needs {expected}",
                path.display()
            ),
        });
    }
    let regions: Vec<FileRegion> = base
        .body
        .memory
        .regions
        .iter()
        .map(|r| FileRegion {
            guest_addr: r.guest_addr,
            len: r.len,
            file_offset: r.file_offset,
        })
        .collect();
    let mem = memory::map_file(&Arc::new(file), &regions, prefault)?;
    for delta in &chain[1..] {
        let MemoryContents::Delta { runs, crc32, .. } = &delta.body.memory.contents else {
            continue;
        };
        let path = delta.memory_file();
        let file = File::open(&path).map_err(io_err("open", &path))?;
        memfile::apply_delta(Some(&mem), runs, &file, *crc32).map_err(|detail| {
            SnapshotError::MemoryDamaged {
                dir: delta.dir.clone(),
                detail,
            }
        })?;
    }
    Ok(mem)
}

/// How to restore.
#[derive(Clone, Copy, Debug, Default)]
pub struct RestoreOptions {
    /// Restore even on a host with another CPU model, or with disks changed since.
    pub force: bool,
    /// Read all of memory now instead of on first touch.
    pub prefault: bool,
}

/// Loads the chain ending at `dir` and checks that it can be restored here: the host's CPU
/// model and every disk are as the checkpoint recorded them (unless `force`).
pub fn preflight(dir: &Path, force: bool) -> Result<Vec<Checkpoint>, SnapshotError> {
    let chain = load_chain(dir)?;
    let last = chain.last().ok_or_else(|| broken(dir, "empty".into()))?;
    let here = super::HostInfo::current();
    let saved = &last.body.meta.host;
    if saved.cpu_model != here.cpu_model && !force {
        return Err(SnapshotError::HostMismatch {
            saved: saved.cpu_model.clone(),
            here: here.cpu_model,
        });
    }
    if !force && let Some(change) = last.body.disks.iter().find_map(|d| d.changed()) {
        return Err(SnapshotError::DiskChanged(change));
    }
    Ok(chain)
}

/// A new VM from the checkpoint (chain) at `dir`, ready to [`Vm::start`]. Its memory is the
/// base image mapped copy-on-write: nothing is read until the guest touches it.
pub fn restore(dir: &Path, io: VmIo, opts: RestoreOptions) -> Result<Vm, SnapshotError> {
    let chain = preflight(dir, opts.force)?;
    let last = chain.last().ok_or_else(|| broken(dir, "empty".into()))?;
    let machine = last.machine()?;
    let mem = map_chain(&chain, opts.prefault)?;
    let mut config = last.body.config.clone();
    // A private file mapping is not hugetlbfs memory.
    config.memory.hugepages = false;
    Ok(Vm::restore_machine(&config, io, &machine, mem)?)
}

/// Folds the chain ending at `dir` into one full checkpoint at `out` (reads all of memory).
pub fn merge(dir: &Path, out: &Path) -> Result<super::CheckpointInfo, SnapshotError> {
    let chain = load_chain(dir)?;
    let last = chain.last().ok_or_else(|| broken(dir, "empty".into()))?;
    let mem = map_chain(&chain, false)?;
    let out = std::path::absolute(out).map_err(io_err("resolve", out))?;
    if chain
        .iter()
        .any(|c| std::path::absolute(&c.dir).is_ok_and(|d| d == out))
    {
        return Err(broken(
            dir,
            format!(
                "{} is part of the chain; merge into a new directory",
                out.display()
            ),
        ));
    }
    super::write_full_dir(
        &out,
        &last.body.config,
        &mem,
        last.body.components.clone(),
        last.body.disks.clone(),
    )
}

/// What `vhpc snapshot inspect` shows: the checkpoint, its memory verified, its chain.
#[derive(Clone, Debug)]
pub struct Inspection {
    pub checkpoint: Checkpoint,
    /// Apparent size and allocated bytes of the memory file.
    pub memory_file_len: u64,
    pub memory_file_allocated: u64,
    /// Pages the memory checksum covered; it matched.
    pub memory_pages: u64,
    /// Checkpoints in the chain ending here (1 for a full one), all checked.
    pub chain_len: usize,
}

/// Loads `dir`, verifies the memory file's checksum and the chain it ends.
pub fn inspect(dir: &Path) -> Result<Inspection, SnapshotError> {
    use std::os::unix::fs::MetadataExt;
    let chain = load_chain(dir)?;
    let checkpoint = chain
        .last()
        .cloned()
        .ok_or_else(|| broken(dir, "empty".into()))?;
    let path = checkpoint.memory_file();
    let file = File::open(&path).map_err(io_err("open", &path))?;
    let meta = file.metadata().map_err(io_err("stat", &path))?;
    let damaged = |detail: String| SnapshotError::MemoryDamaged {
        dir: dir.to_path_buf(),
        detail,
    };
    let memory_pages = match &checkpoint.body.memory.contents {
        MemoryContents::Full {
            data_pages, crc32, ..
        } => {
            let (pages, crc) =
                memfile::checksum_full(&file, meta.len()).map_err(io_err("read", &path))?;
            if (pages, crc) != (*data_pages, *crc32) {
                return Err(damaged(format!(
                    "{pages} data pages with CRC-32 {crc:#010x}, state.bin says {data_pages} with {crc32:#010x}"
                )));
            }
            pages
        }
        MemoryContents::Delta { runs, crc32, .. } => {
            memfile::apply_delta(None, runs, &file, *crc32).map_err(damaged)?
        }
    };
    Ok(Inspection {
        memory_file_len: meta.len(),
        memory_file_allocated: meta.blocks() * 512,
        memory_pages,
        chain_len: chain.len(),
        checkpoint,
    })
}
