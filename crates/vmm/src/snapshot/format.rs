//! `state.bin`: a fixed 32-byte header that frames and checks a postcard-encoded body.
//!
//! ```text
//! offset size
//!  0      8   magic "VHPCSNAP"
//!  8      4   format version, u32 little-endian (FORMAT_VERSION)
//! 12      4   flags, u32 (0; reserved)
//! 16      8   body length in bytes, u64
//! 24      4   CRC-32 (IEEE) of the body
//! 28      4   CRC-32 of header bytes 0..28
//! 32      ..  body: StateBody, postcard
//! ```
//!
//! Checked in this order, so every kind of damage gets its own message: length, magic,
//! version (before the header CRC, so a future format is reported as such, not as damage),
//! header CRC, body length, body CRC, decoding, component versions.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use vhpc_api::VmConfig;

pub const MAGIC: [u8; 8] = *b"VHPCSNAP";
/// 2: the body's VmConfig has `nets` (virtio-net interfaces); version 1 bodies lack it.
pub const FORMAT_VERSION: u32 = 2;
pub const HEADER_LEN: usize = 32;
/// A body larger than this is damage, not a checkpoint (vCPU state is a few KiB per vCPU).
const MAX_BODY_LEN: u64 = 1 << 30;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error(
        "the file is truncated: {len} bytes, at least {need} needed; the checkpoint is incomplete, use another one"
    )]
    Truncated { len: usize, need: usize },
    #[error("not a vhpc checkpoint (wrong magic {found:02x?}, expected \"VHPCSNAP\")")]
    WrongMagic { found: [u8; 8] },
    #[error(
        "checkpoint format version {found} is not supported by this vhpc (it reads version {supported}); restore it with the vhpc that wrote it"
    )]
    UnsupportedVersion { found: u32, supported: u32 },
    #[error("the header is damaged (its checksum does not match); the checkpoint cannot be used")]
    HeaderChecksum,
    #[error(
        "the body is {actual} bytes but the header says {declared}; the file was truncated or appended to"
    )]
    BodyLength { declared: u64, actual: u64 },
    #[error(
        "the body is damaged: CRC-32 {computed:#010x}, the header says {stored:#010x}; the checkpoint cannot be used"
    )]
    BodyChecksum { stored: u32, computed: u32 },
    #[error(
        "the body cannot be decoded ({0}); the checkpoint is damaged or from an incompatible vhpc"
    )]
    Decode(String),
    #[error(
        "component {name} has version {found}, this vhpc reads version {supported}; restore with the vhpc that wrote it"
    )]
    ComponentVersion {
        name: String,
        found: u32,
        supported: u32,
    },
    #[error("component {0} is missing; the checkpoint is incomplete")]
    MissingComponent(String),
}

/// Everything in `state.bin` after the header.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct StateBody {
    pub meta: Meta,
    pub config: VmConfig,
    pub memory: MemoryRecord,
    /// The VM's disk files and their identity at checkpoint time (none until VMs have disks).
    pub disks: Vec<DiskRecord>,
    /// Typed, versioned state per component, in restore order.
    pub components: Vec<Component>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Meta {
    /// The vhpc version that wrote it.
    pub vhpc_version: String,
    pub host: HostInfo,
    /// 128 random bits, hex: what an incremental checkpoint's parent link names.
    pub id: String,
    /// Set for an incremental checkpoint: the checkpoint its memory is a delta against.
    pub parent: Option<ParentLink>,
    pub created_unix_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct HostInfo {
    /// `model name` from /proc/cpuinfo.
    pub cpu_model: String,
    /// /proc/sys/kernel/osrelease.
    pub kernel_release: String,
}

impl HostInfo {
    /// This host.
    pub fn current() -> HostInfo {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| {
                let (key, value) = l.split_once(':')?;
                (key.trim() == "model name").then(|| value.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let kernel_release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        HostInfo {
            cpu_model,
            kernel_release,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ParentLink {
    pub id: String,
    /// The parent's directory as given when the child was written (absolute); restore also
    /// looks for a sibling of the child's directory with the same name.
    pub dir: PathBuf,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MemoryRecord {
    /// Guest RAM regions and where each lives in a full memory file.
    pub regions: Vec<RegionRecord>,
    pub contents: MemoryContents,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RegionRecord {
    pub guest_addr: u64,
    pub len: u64,
    pub file_offset: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum MemoryContents {
    /// `file` is a sparse image of all regions back to back; zero pages are holes.
    /// `crc32` covers (file offset, page) of every non-zero page in file order.
    Full {
        file: String,
        data_pages: u64,
        crc32: u32,
    },
    /// `file` holds the pages of `runs` (guest address, pages) packed in that order;
    /// `crc32` covers (guest address, page) of each.
    Delta {
        file: String,
        runs: Vec<(u64, u32)>,
        crc32: u32,
    },
}

/// A disk file's identity: restore refuses one that changed since (unless forced).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskRecord {
    pub path: PathBuf,
    pub size: u64,
    pub mtime_ns: i64,
    pub dev: u64,
    pub ino: u64,
}

impl DiskRecord {
    /// The identity of the disk file at `path` now.
    pub fn of(path: &std::path::Path) -> std::io::Result<DiskRecord> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path)?;
        Ok(DiskRecord {
            path: path.to_path_buf(),
            size: m.len(),
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            dev: m.dev(),
            ino: m.ino(),
        })
    }

    /// How the disk file differs from this record now (`None`: unchanged).
    pub fn changed(&self) -> Option<String> {
        match DiskRecord::of(&self.path) {
            Err(e) => Some(format!("{} cannot be read: {e}", self.path.display())),
            Ok(now) if now != *self => Some(format!(
                "{} changed since the checkpoint (size {} → {}, mtime {} → {} ns, inode {} → {})",
                self.path.display(),
                self.size,
                now.size,
                self.mtime_ns,
                now.mtime_ns,
                self.ino,
                now.ino
            )),
            Ok(_) => None,
        }
    }
}

/// One component's state: its own name, version and postcard encoding.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Component {
    pub name: String,
    pub version: u32,
    pub data: Vec<u8>,
}

impl StateBody {
    /// The component called `name`, checked to be of `version`.
    pub fn component(&self, name: &str, version: u32) -> Result<&[u8], FormatError> {
        find_component(&self.components, name, version)
    }
}

/// The component called `name` in `components`, checked to be of `version`.
pub fn find_component<'a>(
    components: &'a [Component],
    name: &str,
    version: u32,
) -> Result<&'a [u8], FormatError> {
    {
        let c = components
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| FormatError::MissingComponent(name.into()))?;
        if c.version != version {
            return Err(FormatError::ComponentVersion {
                name: name.into(),
                found: c.version,
                supported: version,
            });
        }
        Ok(&c.data)
    }
}

/// The bytes of `state.bin` for `body`.
pub fn encode(body: &StateBody) -> Result<Vec<u8>, FormatError> {
    let payload = postcard::to_allocvec(body).map_err(|e| FormatError::Decode(e.to_string()))?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    let header_crc = crc32fast::hash(&out);
    out.extend_from_slice(&header_crc.to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// Checks the header and the body's checksum, then decodes the body. Never panics, whatever
/// the bytes.
pub fn decode(bytes: &[u8]) -> Result<StateBody, FormatError> {
    if bytes.len() < HEADER_LEN {
        return Err(FormatError::Truncated {
            len: bytes.len(),
            need: HEADER_LEN,
        });
    }
    if bytes[..8] != MAGIC {
        let mut found = [0u8; 8];
        found.copy_from_slice(&bytes[..8]);
        return Err(FormatError::WrongMagic { found });
    }
    let version = le_u32(bytes, 8);
    if version != FORMAT_VERSION {
        return Err(FormatError::UnsupportedVersion {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    if crc32fast::hash(&bytes[..28]) != le_u32(bytes, 28) {
        return Err(FormatError::HeaderChecksum);
    }
    let declared = le_u64(bytes, 16);
    let body = &bytes[HEADER_LEN..];
    if declared > MAX_BODY_LEN || declared != body.len() as u64 {
        return Err(FormatError::BodyLength {
            declared,
            actual: body.len() as u64,
        });
    }
    let stored = le_u32(bytes, 24);
    let computed = crc32fast::hash(body);
    if stored != computed {
        return Err(FormatError::BodyChecksum { stored, computed });
    }
    postcard::from_bytes(body).map_err(|e| FormatError::Decode(e.to_string()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use vhpc_api::MemoryConfig;

    pub(crate) fn sample_body() -> StateBody {
        StateBody {
            meta: Meta {
                vhpc_version: "0.1.0".into(),
                host: HostInfo::current(),
                id: "00112233445566778899aabbccddeeff".into(),
                parent: None,
                created_unix_ms: 1,
            },
            config: VmConfig {
                vcpus: 2,
                memory: MemoryConfig {
                    size_mib: 32,
                    hugepages: false,
                    prefault: false,
                },
                kernel: "/guest.elf".into(),
                initramfs: None,
                cmdline: "count=0".into(),
                disks: Vec::new(),
                nets: Vec::new(),
            },
            memory: MemoryRecord {
                regions: vec![RegionRecord {
                    guest_addr: 0,
                    len: 32 << 20,
                    file_offset: 0,
                }],
                contents: MemoryContents::Full {
                    file: "memory.raw".into(),
                    data_pages: 3,
                    crc32: 7,
                },
            },
            disks: Vec::new(),
            components: vec![Component {
                name: "irqchip".into(),
                version: 1,
                data: vec![1, 2, 3],
            }],
        }
    }

    #[test]
    fn a_body_round_trips() {
        let body = sample_body();
        let bytes = encode(&body).expect("encode");
        assert_eq!(&bytes[..8], b"VHPCSNAP");
        assert_eq!(decode(&bytes).expect("decode"), body);
    }

    #[test]
    fn each_kind_of_damage_has_its_error() {
        let good = encode(&sample_body()).expect("encode");
        let err = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut b = good.clone();
            f(&mut b);
            decode(&b).expect_err("damaged")
        };
        assert!(matches!(
            err(&|b| b.truncate(10)),
            FormatError::Truncated { .. }
        ));
        assert!(matches!(
            err(&|b| b[0] = b'X'),
            FormatError::WrongMagic { .. }
        ));
        assert_eq!(
            err(&|b| b[8] = 3),
            FormatError::UnsupportedVersion {
                found: 3,
                supported: 2
            }
        );
        assert_eq!(err(&|b| b[17] ^= 1), FormatError::HeaderChecksum);
        assert!(matches!(
            err(&|b| b.truncate(b.len() - 1)),
            FormatError::BodyLength { .. }
        ));
        assert!(matches!(
            err(&|b| *b.last_mut().expect("body") ^= 0x40),
            FormatError::BodyChecksum { .. }
        ));
    }

    #[test]
    fn component_versions_are_checked() {
        let body = sample_body();
        assert_eq!(body.component("irqchip", 1).expect("v1"), &[1, 2, 3]);
        assert!(matches!(
            body.component("irqchip", 2),
            Err(FormatError::ComponentVersion { found: 1, .. })
        ));
        assert!(matches!(
            body.component("vcpu.0", 1),
            Err(FormatError::MissingComponent(_))
        ));
    }

    #[test]
    fn a_changed_disk_is_noticed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = dir.path().join("disk.img");
        std::fs::write(&disk, b"data").expect("write");
        let record = DiskRecord::of(&disk).expect("stat");
        assert_eq!(record.changed(), None);
        std::fs::write(&disk, b"other data").expect("write");
        let change = record.changed().expect("changed");
        assert!(change.contains("size 4 → 10"), "{change}");
        std::fs::remove_file(&disk).expect("rm");
        assert!(record.changed().expect("gone").contains("cannot be read"));
    }

    #[test]
    fn host_info_names_this_host() {
        let host = HostInfo::current();
        assert!(!host.cpu_model.is_empty());
        assert!(
            host.kernel_release
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_digit())
        );
    }
}
