//! Kernel module dependency resolution without depmod.
//!
//! Debian's kernel package ships no `modules.dep` (depmod runs at install time), so the
//! dependencies are read from each module's ELF `.modinfo` section: NUL-separated `key=value`
//! strings, of which `depends=a,b` names the modules that must be loaded first.

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ModulesError {
    #[error(
        "cannot read the modules tree {path}: {source}; run `vhpc image kernel` to fetch the \
         kernel and its modules"
    )]
    ReadTree {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read kernel module {path}: {source}")]
    ReadModule {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("kernel module {path} is not a valid ELF64 module: {reason}")]
    BadElf { path: PathBuf, reason: ElfError },
    #[error("kernel module {name:?} (needed by {needed_by}) is not in {dir}")]
    NotFound {
        name: String,
        needed_by: String,
        dir: PathBuf,
    },
    #[error(
        "kernel module {name:?} is only available compressed ({path}); compressed modules are \
         not supported, use a kernel package with plain .ko files"
    )]
    Compressed { name: String, path: PathBuf },
    #[error("kernel modules depend on each other in a cycle: {chain}")]
    Cycle { chain: String },
}

/// Why a blob is not a usable ELF64 little-endian object with a `.modinfo` section.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ElfError {
    #[error("not an ELF file")]
    NotElf,
    #[error("not a 64-bit little-endian ELF file")]
    WrongClass,
    #[error("the ELF header or a section header lies outside the file")]
    Truncated,
    #[error("section header entries are smaller than 64 bytes")]
    BadEntrySize,
    #[error("the section name table index is out of range")]
    BadStringTable,
    #[error("there is no .modinfo section")]
    NoModinfo,
}

/// What `.modinfo` says about a module.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModInfo {
    /// `name=`, if present (newer kernels record it).
    pub name: Option<String>,
    /// `depends=`, module names; may use '-' where the file name has '_'.
    pub depends: Vec<String>,
}

/// Module names treat '-' and '_' as the same character; this maps both to '_'.
pub fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

fn read_u16(data: &[u8], at: usize) -> Result<u16, ElfError> {
    let bytes = data.get(at..at + 2).ok_or(ElfError::Truncated)?;
    Ok(u16::from_le_bytes([bytes[0], bytes[1]]))
}

fn read_u32(data: &[u8], at: usize) -> Result<u32, ElfError> {
    let bytes = data.get(at..at + 4).ok_or(ElfError::Truncated)?;
    Ok(u32::from_le_bytes(
        bytes.try_into().expect("slice of 4 bytes"),
    ))
}

fn read_u64(data: &[u8], at: usize) -> Result<u64, ElfError> {
    let bytes = data.get(at..at + 8).ok_or(ElfError::Truncated)?;
    Ok(u64::from_le_bytes(
        bytes.try_into().expect("slice of 8 bytes"),
    ))
}

/// `data[offset..offset+size]` with 64-bit, overflow-checked bounds.
fn range(data: &[u8], offset: u64, size: u64) -> Result<&[u8], ElfError> {
    let start = usize::try_from(offset).map_err(|_| ElfError::Truncated)?;
    let len = usize::try_from(size).map_err(|_| ElfError::Truncated)?;
    let end = start.checked_add(len).ok_or(ElfError::Truncated)?;
    data.get(start..end).ok_or(ElfError::Truncated)
}

/// Returns the contents of the `.modinfo` section of an ELF64 little-endian object.
pub fn modinfo_section(elf: &[u8]) -> Result<&[u8], ElfError> {
    if elf.get(..4) != Some(b"\x7fELF".as_slice()) {
        return Err(ElfError::NotElf);
    }
    if elf.get(4..6) != Some([2u8, 1].as_slice()) {
        return Err(ElfError::WrongClass);
    }
    let shoff = read_u64(elf, 0x28)?;
    let shentsize = u64::from(read_u16(elf, 0x3a)?);
    let shnum = u64::from(read_u16(elf, 0x3c)?);
    let shstrndx = u64::from(read_u16(elf, 0x3e)?);
    if shentsize < 64 {
        return Err(ElfError::BadEntrySize);
    }
    // Every section header: (sh_name, sh_offset, sh_size).
    let section = |index: u64| -> Result<(u32, u64, u64), ElfError> {
        let at = index
            .checked_mul(shentsize)
            .and_then(|rel| rel.checked_add(shoff))
            .ok_or(ElfError::Truncated)?;
        let header = range(elf, at, 64)?;
        Ok((
            read_u32(header, 0)?,
            read_u64(header, 24)?,
            read_u64(header, 32)?,
        ))
    };
    if shstrndx >= shnum {
        return Err(ElfError::BadStringTable);
    }
    let (_, strtab_offset, strtab_size) = section(shstrndx)?;
    let strtab = range(elf, strtab_offset, strtab_size)?;
    for index in 0..shnum {
        let (name_offset, offset, size) = section(index)?;
        let name = strtab
            .get(name_offset as usize..)
            .and_then(|rest| rest.split(|&b| b == 0).next());
        if name == Some(b".modinfo".as_slice()) {
            return range(elf, offset, size);
        }
    }
    Err(ElfError::NoModinfo)
}

/// Parses the NUL-separated `key=value` strings of a `.modinfo` section.
pub fn parse_modinfo(section: &[u8]) -> ModInfo {
    let mut info = ModInfo::default();
    for entry in section.split(|&b| b == 0) {
        let entry = String::from_utf8_lossy(entry);
        if let Some(name) = entry.strip_prefix("name=") {
            info.name = Some(name.to_owned());
        } else if let Some(deps) = entry.strip_prefix("depends=") {
            let names = deps.split(',').map(str::trim).filter(|d| !d.is_empty());
            info.depends.extend(names.map(str::to_owned));
        }
    }
    info
}

/// The modules of one `lib/modules/<version>` tree, indexed by normalised name.
struct ModuleIndex {
    dir: PathBuf,
    /// Name → path of the plain `.ko`, relative to `dir`.
    plain: HashMap<String, PathBuf>,
    /// Name → path of a compressed module, for a precise error.
    compressed: HashMap<String, PathBuf>,
    /// Names listed in `modules.builtin`: part of the kernel image, nothing to load.
    builtin: HashSet<String>,
}

impl ModuleIndex {
    fn build(dir: &Path) -> Result<Self, ModulesError> {
        let mut index = Self {
            dir: dir.to_owned(),
            plain: HashMap::new(),
            compressed: HashMap::new(),
            builtin: HashSet::new(),
        };
        index.walk(Path::new(""))?;
        if let Ok(list) = std::fs::read_to_string(dir.join("modules.builtin")) {
            index.builtin.extend(
                list.lines()
                    .filter_map(|line| module_name(line).map(|(n, _)| n)),
            );
        }
        Ok(index)
    }

    fn walk(&mut self, rel: &Path) -> Result<(), ModulesError> {
        let path = self.dir.join(rel);
        let tree_err = |source| ModulesError::ReadTree {
            path: path.clone(),
            source,
        };
        let mut entries = std::fs::read_dir(&path)
            .map_err(tree_err)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(tree_err)?;
        entries.sort_by_key(|entry| entry.file_name());
        for entry in entries {
            // file_type() does not follow symlinks: skips the `build`/`source` links.
            let file_type = entry.file_type().map_err(tree_err)?;
            let child = rel.join(entry.file_name());
            if file_type.is_dir() {
                self.walk(&child)?;
            } else if file_type.is_file()
                && let Some((name, compressed)) = module_name(&child.to_string_lossy())
            {
                let map = if compressed {
                    &mut self.compressed
                } else {
                    &mut self.plain
                };
                map.entry(name).or_insert(child);
            }
        }
        Ok(())
    }
}

/// The normalised module name of a module file path, and whether it is compressed.
fn module_name(path: &str) -> Option<(String, bool)> {
    let file = path.rsplit('/').next()?;
    if let Some(stem) = file.strip_suffix(".ko") {
        return Some((normalize(stem), false));
    }
    [".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .find_map(|ext| file.strip_suffix(ext))
        .map(|stem| (normalize(stem), true))
}

/// Returns the `.ko` files (relative to `modules_dir`, a `lib/modules/<version>` tree) needed
/// to load `wanted`, in load order: dependencies first, each module once. Modules built into
/// the kernel (`modules.builtin`) are skipped.
pub fn resolve(modules_dir: &Path, wanted: &[&str]) -> Result<Vec<PathBuf>, ModulesError> {
    let index = ModuleIndex::build(modules_dir)?;
    let mut walk = Resolver {
        index: &index,
        stack: Vec::new(),
        done: HashSet::new(),
        order: Vec::new(),
    };
    for name in wanted {
        walk.visit(name, "the request")?;
    }
    Ok(walk.order)
}

/// Depth-first walk state of [`resolve`].
struct Resolver<'a> {
    index: &'a ModuleIndex,
    /// Modules being visited, for cycle detection.
    stack: Vec<String>,
    done: HashSet<String>,
    order: Vec<PathBuf>,
}

impl Resolver<'_> {
    fn visit(&mut self, name: &str, needed_by: &str) -> Result<(), ModulesError> {
        let key = normalize(name);
        if self.done.contains(&key) {
            return Ok(());
        }
        if self.stack.contains(&key) {
            let mut chain = self.stack.clone();
            chain.push(key);
            return Err(ModulesError::Cycle {
                chain: chain.join(" -> "),
            });
        }
        if self.index.builtin.contains(&key) {
            log::debug!("kernel module {key} is built in");
            self.done.insert(key);
            return Ok(());
        }
        let Some(rel) = self.index.plain.get(&key) else {
            return Err(match self.index.compressed.get(&key) {
                Some(path) => ModulesError::Compressed {
                    name: key,
                    path: self.index.dir.join(path),
                },
                None => ModulesError::NotFound {
                    name: key,
                    needed_by: needed_by.to_owned(),
                    dir: self.index.dir.clone(),
                },
            });
        };
        let path = self.index.dir.join(rel);
        let elf = std::fs::read(&path).map_err(|source| ModulesError::ReadModule {
            path: path.clone(),
            source,
        })?;
        let section = modinfo_section(&elf).map_err(|reason| ModulesError::BadElf {
            path: path.clone(),
            reason,
        })?;
        let info = parse_modinfo(section);
        self.stack.push(key.clone());
        for dep in &info.depends {
            self.visit(dep, &key)?;
        }
        self.stack.pop();
        self.done.insert(key);
        self.order.push(rel.clone());
        Ok(())
    }
}

/// A minimal ELF64 LE module for tests: null section, `.shstrtab`, `.text`, `.modinfo`.
#[cfg(test)]
pub(crate) fn test_module_elf(modinfo: &[u8]) -> Vec<u8> {
    let shstrtab = b"\0.shstrtab\0.text\0.modinfo\0";
    let mut elf = vec![0u8; 64];
    elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
    let strtab_off = elf.len() as u64;
    elf.extend_from_slice(shstrtab);
    let modinfo_off = elf.len() as u64;
    elf.extend_from_slice(modinfo);
    while !elf.len().is_multiple_of(8) {
        elf.push(0);
    }
    let shoff = elf.len() as u64;
    let sections: [(u32, u64, u64); 4] = [
        (0, 0, 0),
        (1, strtab_off, shstrtab.len() as u64),
        (11, 0, 0),
        (17, modinfo_off, modinfo.len() as u64),
    ];
    for (name, offset, size) in sections {
        let mut header = [0u8; 64];
        header[0..4].copy_from_slice(&name.to_le_bytes());
        header[24..32].copy_from_slice(&offset.to_le_bytes());
        header[32..40].copy_from_slice(&size.to_le_bytes());
        elf.extend_from_slice(&header);
    }
    elf[0x28..0x30].copy_from_slice(&shoff.to_le_bytes());
    elf[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
    elf[0x3c..0x3e].copy_from_slice(&4u16.to_le_bytes());
    elf[0x3e..0x40].copy_from_slice(&1u16.to_le_bytes());
    elf
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn reads_modinfo_from_crafted_elf() {
        let modinfo = b"license=GPL\0depends=virtio-ring,virtio\0name=virtio_net\0";
        let elf = test_module_elf(modinfo);
        assert_eq!(modinfo_section(&elf).unwrap(), modinfo);
        let info = parse_modinfo(modinfo);
        assert_eq!(info.name.as_deref(), Some("virtio_net"));
        assert_eq!(info.depends, ["virtio-ring", "virtio"]);
        assert_eq!(parse_modinfo(b"depends=\0").depends, Vec::<String>::new());
    }

    #[test]
    fn malformed_elf_never_panics() {
        let elf = test_module_elf(b"depends=a\0");
        for len in 0..elf.len() {
            assert!(modinfo_section(&elf[..len]).is_err(), "truncated at {len}");
        }
        assert_eq!(modinfo_section(b"MZ\0\0"), Err(ElfError::NotElf));
        let mut bad = elf.clone();
        bad[4] = 1;
        assert_eq!(modinfo_section(&bad), Err(ElfError::WrongClass));
        let mut bad = elf.clone();
        bad[0x28..0x30].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(modinfo_section(&bad), Err(ElfError::Truncated));
        let mut bad = elf.clone();
        bad[0x3e] = 9;
        assert_eq!(modinfo_section(&bad), Err(ElfError::BadStringTable));
        // Corrupt every byte of the section headers in turn.
        let shoff = elf.len() - 4 * 64;
        for at in shoff..elf.len() {
            let mut bad = elf.clone();
            bad[at] ^= 0xff;
            let _ = modinfo_section(&bad);
        }
    }

    fn write_module(dir: &Path, rel: &str, modinfo: &str) {
        let path = dir.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, test_module_elf(modinfo.as_bytes())).unwrap();
    }

    #[test]
    fn resolves_dependencies_first_once() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write_module(d, "kernel/a/top.ko", "depends=mid-one,base\0");
        write_module(d, "kernel/b/mid_one.ko", "depends=base,builtin-thing\0");
        write_module(d, "kernel/c/base.ko", "depends=\0");
        write_module(d, "kernel/c/other.ko", "depends=base\0");
        std::fs::write(d.join("modules.builtin"), "kernel/x/builtin_thing.ko\n").unwrap();
        let got = resolve(d, &["top", "other", "base"]).unwrap();
        let want: Vec<PathBuf> = [
            "kernel/c/base.ko",
            "kernel/b/mid_one.ko",
            "kernel/a/top.ko",
            "kernel/c/other.ko",
        ]
        .iter()
        .map(PathBuf::from)
        .collect();
        assert_eq!(got, want);
        assert!(resolve(d, &["builtin_thing"]).unwrap().is_empty());
    }

    #[test]
    fn resolve_errors() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write_module(d, "kernel/a.ko", "depends=b\0");
        write_module(d, "kernel/b.ko", "depends=a\0");
        write_module(d, "kernel/c.ko", "depends=missing\0");
        std::fs::write(d.join("kernel/z.ko.xz"), b"xz").unwrap();
        std::fs::write(d.join("kernel/junk.ko"), b"not elf").unwrap();
        let err = resolve(d, &["a"]).unwrap_err();
        assert!(matches!(&err, ModulesError::Cycle { chain } if chain == "a -> b -> a"));
        let err = resolve(d, &["c"]).unwrap_err();
        assert!(
            matches!(&err, ModulesError::NotFound { name, needed_by, .. } if name == "missing" && needed_by == "c")
        );
        assert!(matches!(
            resolve(d, &["z"]),
            Err(ModulesError::Compressed { .. })
        ));
        assert!(matches!(
            resolve(d, &["junk"]),
            Err(ModulesError::BadElf { .. })
        ));
        assert!(matches!(
            resolve(&d.join("nope"), &["a"]),
            Err(ModulesError::ReadTree { .. })
        ));
    }

    /// Against a real Debian kernel extracted to /tmp/kdl/x (not available everywhere).
    #[test]
    #[ignore = "needs a Debian cloud kernel extracted at /tmp/kdl/x"]
    fn resolves_real_debian_modules() {
        let base = Path::new("/tmp/kdl/x/lib/modules");
        let version = std::fs::read_dir(base).unwrap().next().unwrap().unwrap();
        let got = resolve(&version.path(), crate::initramfs::GUEST_MODULES).unwrap();
        let names: Vec<String> = got
            .iter()
            .map(|p| module_name(&p.to_string_lossy()).unwrap().0)
            .collect();
        eprintln!("{names:?}");
        let pos = |n: &str| names.iter().position(|m| m == n).unwrap();
        assert!(pos("virtio") < pos("virtio_pci"));
        assert!(pos("virtio_ring") < pos("virtio_net"));
        assert!(pos("vsock") < pos("vmw_vsock_virtio_transport"));
    }
}
