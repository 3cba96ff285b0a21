//! vhpc's test guest: a tiny freestanding PVH guest that runs on any KVM, including an
//! emulating backend such as kvm_pvm that kills guests at their first x87/SSE instruction.
//!
//! `build.rs` compiles `guest/` (assembly + C, `-mgeneral-regs-only`) with gcc and checks the
//! disassembly; this crate hands the ELF to host code ([`ELF`], [`elf_path`]) together with the
//! shared [`abi`] and the host side of the guest's arithmetic ([`expected_count`]).
//!
//! The guest enters at its PVH entry (32-bit, paging off, EBX = hvm_start_info), switches to
//! 64-bit mode on static identity page tables (2 MiB pages, 4 GiB), loads its own GDT, TSS and
//! IDT, prints `vhpc-testguest: up` on the serial port, then does what its kernel command
//! line says, in this order:
//!
//! | word | what the guest does |
//! |---|---|
//! | `smp=N` | waits until N vCPUs run (all enter at the PVH entry; vCPU = APIC ID), prints `smp: N vcpus running` |
//! | `exception` | raises #UD, #DE and #PF, handles each through its IDT, prints `exception: ...` |
//! | `dirty=MIB` `stride=K` | writes one word into every K-th 4 KiB page of MIB MiB from [`abi::DIRTY_BASE`] |
//! | `count=N` | N iterations of the checksum loop (`count=0`: forever), then prints counter, checksum and a checksum over the count buffer |
//! | `halt` | ends with `cli; hlt` instead of exiting |
//! | `exit=N` | exits with status N through the debug-exit port (default 0) |
//!
//! Progress is kept in the results page ([`abi::RESULTS_ADDR`]) for the host to read while
//! the guest is paused.

pub mod abi;
pub mod forbidden;

use std::path::Path;

/// The guest ELF, as built.
pub const ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/testguest.elf"));

/// Where the build left the guest ELF. Valid on the machine that built this crate (tests,
/// benchmarks run from the tree); other programs should write [`ELF`] to a file themselves.
pub fn elf_path() -> &'static Path {
    Path::new(concat!(env!("OUT_DIR"), "/testguest.elf"))
}

/// What the guest's `count=n` prints and leaves in memory: (checksum, checksum over the count
/// buffer). The same arithmetic as guest/main.c `count()`.
pub fn expected_count(n: u64) -> (u64, u64) {
    let mut buf = vec![0u64; abi::COUNT_BUF_WORDS as usize];
    let mut sum = 0u64;
    for i in 1..=n {
        sum = (sum ^ i).wrapping_mul(abi::CHECKSUM_PRIME);
        buf[(i % abi::COUNT_BUF_WORDS) as usize] = sum;
    }
    let memory = buf
        .iter()
        .fold(0u64, |m, w| (m ^ w).wrapping_mul(abi::CHECKSUM_PRIME));
    (sum, memory)
}

/// The line the guest prints at the end of `count=n`.
pub fn expected_count_line(n: u64) -> String {
    let (sum, memory) = expected_count(n);
    format!("count: {n} checksum {sum:#018x} memory {memory:#018x}")
}

/// The first line the guest prints.
pub const FIRST_LINE: &str = "vhpc-testguest: up";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_is_an_elf_with_both_notes() {
        assert_eq!(&ELF[..4], b"\x7fELF");
        let has = |needle: &[u8]| ELF.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"Xen\0"), "PVH note");
        assert!(has(b"vhpc\0"), "vhpc note");
        assert_eq!(std::fs::read(elf_path()).expect("built ELF"), ELF);
    }

    #[test]
    fn count_arithmetic_matches_a_hand_computed_value() {
        let (s, _) = expected_count(2);
        let s1 = 1u64.wrapping_mul(abi::CHECKSUM_PRIME);
        assert_eq!(s, (s1 ^ 2).wrapping_mul(abi::CHECKSUM_PRIME));
        assert!(expected_count_line(2).starts_with("count: 2 checksum 0x"));
    }

    #[test]
    fn the_built_guest_has_no_forbidden_instructions() {
        assert_eq!(forbidden::check_elf(elf_path()), Ok(Vec::new()));
    }
}
