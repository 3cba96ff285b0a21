//! What kind of guest a kernel file is, from its ELF notes: a Linux kernel, or a freestanding
//! guest such as vhpc's test guest.
//!
//! The distinction decides whether a guest can run on an emulating KVM backend (kvm_pvm): a
//! Linux kernel cannot (its early FPU and int3 code kills it), so vhpc refuses it there at
//! once. The test is on facts the file states about itself, not on its name or size:
//! - a bzImage is Linux (only Linux uses the "HdrS" x86 boot header);
//! - an ELF that carries a note owned by "Linux" (every vmlinux since 4.20 has at least the
//!   LINUX_ELFNOTE_BUILD_SALT note) is Linux;
//! - any other ELF is freestanding; a note owned by "vhpc" (type [`VHPC_NOTE_TYPE`], a u32 of
//!   flags) further declares that it uses general-purpose registers only and whether every
//!   vCPU enters at the PVH entry point.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use super::loader::{self, KernelFormat};

/// The vhpc note's type (owner "vhpc").
pub const VHPC_NOTE_TYPE: u32 = 0x5648_0001;
/// Flag: the guest uses general-purpose registers only; it runs on kvm_pvm.
pub const VHPC_NOTE_GENERAL_REGS_ONLY: u32 = 1;
/// Flag: every vCPU starts at the PVH entry point (no INIT/SIPI); vCPU i has APIC ID i.
pub const VHPC_NOTE_ALL_VCPUS_AT_ENTRY: u32 = 2;

/// Notes segments larger than this are not read (a vmlinux's are a few hundred bytes).
const MAX_NOTES_LEN: u64 = 64 * 1024;
const PT_NOTE: u32 = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestKind {
    /// A Linux kernel (bzImage, or ELF vmlinux with "Linux" notes).
    Linux,
    /// An ELF kernel that is not Linux.
    Freestanding {
        /// It declares (vhpc note) that it uses no x87/SSE/AVX, int3 or xgetbv.
        general_regs_only: bool,
        /// It declares (vhpc note) that all vCPUs enter at the PVH entry point.
        all_vcpus_at_entry: bool,
    },
}

/// One ELF note: owner name (without its NUL), type, descriptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ElfNote {
    pub name: Vec<u8>,
    pub kind: u32,
    pub desc: Vec<u8>,
}

/// Classifies the kernel at `path`; `None` if it is neither a bzImage nor an ELF.
pub fn classify(path: &Path) -> std::io::Result<Option<GuestKind>> {
    let mut file = File::open(path)?;
    match loader::detect_format(&mut file)? {
        None => Ok(None),
        Some(KernelFormat::BzImage) => Ok(Some(GuestKind::Linux)),
        Some(KernelFormat::Elf) => Ok(Some(classify_notes(&elf_notes(&mut file)?))),
    }
}

/// Classifies an ELF by its notes.
pub fn classify_notes(notes: &[ElfNote]) -> GuestKind {
    if notes.iter().any(|n| n.name == b"Linux") {
        return GuestKind::Linux;
    }
    let flags = notes
        .iter()
        .find(|n| n.name == b"vhpc" && n.kind == VHPC_NOTE_TYPE && n.desc.len() >= 4)
        .map_or(0, |n| {
            u32::from_le_bytes([n.desc[0], n.desc[1], n.desc[2], n.desc[3]])
        });
    GuestKind::Freestanding {
        general_regs_only: flags & VHPC_NOTE_GENERAL_REGS_ONLY != 0,
        all_vcpus_at_entry: flags & VHPC_NOTE_ALL_VCPUS_AT_ENTRY != 0,
    }
}

fn invalid(what: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("malformed ELF: {what}"),
    )
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from(u32_at(b, at)) | (u64::from(u32_at(b, at + 4)) << 32)
}

/// Every note of every PT_NOTE segment of a 64-bit little-endian ELF.
pub fn elf_notes<F: Read + Seek>(file: &mut F) -> std::io::Result<Vec<ElfNote>> {
    let mut ehdr = [0u8; 64];
    file.seek(SeekFrom::Start(0))?;
    file.read_exact(&mut ehdr)?;
    if &ehdr[..4] != b"\x7fELF" || ehdr[4] != 2 || ehdr[5] != 1 {
        return Err(invalid("not a 64-bit little-endian ELF"));
    }
    let phoff = u64_at(&ehdr, 0x20);
    let phentsize = u64::from(u16_at(&ehdr, 0x36));
    let phnum = u64::from(u16_at(&ehdr, 0x38));
    if phentsize < 0x38 {
        return Err(invalid("program header entries too small"));
    }
    let mut notes = Vec::new();
    for i in 0..phnum {
        let mut phdr = [0u8; 0x38];
        let at = phoff
            .checked_add(i * phentsize)
            .ok_or_else(|| invalid("program header offset overflows"))?;
        file.seek(SeekFrom::Start(at))?;
        file.read_exact(&mut phdr)?;
        if u32_at(&phdr, 0) != PT_NOTE {
            continue;
        }
        let (offset, size) = (u64_at(&phdr, 0x08), u64_at(&phdr, 0x20));
        if size > MAX_NOTES_LEN {
            return Err(invalid("notes segment too large"));
        }
        let mut segment = vec![0u8; size as usize];
        file.seek(SeekFrom::Start(offset))?;
        file.read_exact(&mut segment)?;
        parse_notes(&segment, &mut notes)?;
    }
    Ok(notes)
}

fn parse_notes(mut b: &[u8], notes: &mut Vec<ElfNote>) -> std::io::Result<()> {
    let pad = |n: usize| n.next_multiple_of(4);
    while b.len() >= 12 {
        let namesz = u32_at(b, 0) as usize;
        let descsz = u32_at(b, 4) as usize;
        let kind = u32_at(b, 8);
        let name_end = 12 + pad(namesz);
        let desc_end = name_end + pad(descsz);
        if desc_end > b.len() {
            return Err(invalid("note runs past its segment"));
        }
        let name = &b[12..12 + namesz];
        notes.push(ElfNote {
            name: name.strip_suffix(b"\0").unwrap_or(name).to_vec(),
            kind,
            desc: b[name_end..name_end + descsz].to_vec(),
        });
        b = &b[desc_end..];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn note(name: &str, kind: u32, desc: &[u8]) -> Vec<u8> {
        let mut n = Vec::new();
        n.extend_from_slice(&(name.len() as u32 + 1).to_le_bytes());
        n.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        n.extend_from_slice(&kind.to_le_bytes());
        n.extend_from_slice(name.as_bytes());
        n.push(0);
        n.resize(n.len().next_multiple_of(4), 0);
        n.extend_from_slice(desc);
        n.resize(n.len().next_multiple_of(4), 0);
        n
    }

    /// A minimal ELF64: header, one PT_LOAD and one PT_NOTE program header, then the notes.
    fn elf(notes: &[u8]) -> Vec<u8> {
        let mut e = vec![0u8; 64 + 2 * 0x38];
        e[..6].copy_from_slice(b"\x7fELF\x02\x01");
        e[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        e[0x36..0x38].copy_from_slice(&0x38u16.to_le_bytes());
        e[0x38..0x3a].copy_from_slice(&2u16.to_le_bytes());
        e[64..68].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        let ph = 64 + 0x38;
        e[ph..ph + 4].copy_from_slice(&PT_NOTE.to_le_bytes());
        let notes_at = e.len() as u64;
        e[ph + 8..ph + 16].copy_from_slice(&notes_at.to_le_bytes());
        e[ph + 0x20..ph + 0x28].copy_from_slice(&(notes.len() as u64).to_le_bytes());
        e.extend_from_slice(notes);
        e
    }

    #[test]
    fn reads_every_note() {
        let mut n = note("Xen", 18, &0x10_0000u32.to_le_bytes());
        n.extend(note("GNU", 3, b"build-id-bytes"));
        let notes = elf_notes(&mut Cursor::new(elf(&n))).expect("parse");
        assert_eq!(notes.len(), 2);
        assert_eq!((notes[0].name.as_slice(), notes[0].kind), (&b"Xen"[..], 18));
        assert_eq!(notes[0].desc, 0x10_0000u32.to_le_bytes());
        assert_eq!(notes[1].desc, b"build-id-bytes");
    }

    #[test]
    fn a_vmlinux_is_linux() {
        let mut n = note("Xen", 18, &[0; 4]);
        n.extend(note("Linux", 0x100, b"salt"));
        let notes = elf_notes(&mut Cursor::new(elf(&n))).expect("parse");
        assert_eq!(classify_notes(&notes), GuestKind::Linux);
    }

    #[test]
    fn the_vhpc_note_declares_a_freestanding_guest() {
        let flags = VHPC_NOTE_GENERAL_REGS_ONLY | VHPC_NOTE_ALL_VCPUS_AT_ENTRY;
        let n = note("vhpc", VHPC_NOTE_TYPE, &flags.to_le_bytes());
        let notes = elf_notes(&mut Cursor::new(elf(&n))).expect("parse");
        assert_eq!(
            classify_notes(&notes),
            GuestKind::Freestanding {
                general_regs_only: true,
                all_vcpus_at_entry: true
            }
        );
        assert_eq!(
            classify_notes(&[]),
            GuestKind::Freestanding {
                general_regs_only: false,
                all_vcpus_at_entry: false
            }
        );
    }

    #[test]
    fn malformed_notes_are_errors_not_panics() {
        let mut n = note("vhpc", 1, &[1, 2, 3, 4]);
        n[4] = 0xff; // descsz runs past the segment
        assert!(elf_notes(&mut Cursor::new(elf(&n))).is_err());
        assert!(elf_notes(&mut Cursor::new(b"\x7fELF\x01\x01".to_vec())).is_err());
        let mut huge = elf(&[]);
        huge[64 + 0x38 + 0x20..64 + 0x38 + 0x28].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(elf_notes(&mut Cursor::new(huge)).is_err());
    }

    #[test]
    fn the_test_guest_and_a_bzimage_are_told_apart() {
        let guest = classify(vhpc_testguest::elf_path()).expect("read the test guest");
        assert_eq!(
            guest,
            Some(GuestKind::Freestanding {
                general_regs_only: true,
                all_vcpus_at_entry: true
            })
        );
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        let f = tempfile::NamedTempFile::new().expect("temp");
        std::fs::write(f.path(), &bz).expect("write");
        assert_eq!(classify(f.path()).expect("read"), Some(GuestKind::Linux));
    }
}
