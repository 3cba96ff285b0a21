//! `vhpc run` with vhpc's freestanding test guest on this machine's own /dev/kvm, and the
//! refusal of Linux kernels where /dev/kvm is kvm_pvm (which cannot run them).

use std::io::Write;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use vhpc_vmm::host::{self, KvmKind};

fn require_kvm() -> KvmKind {
    let kind = host::kvm_kind();
    assert_ne!(
        kind,
        KvmKind::Missing,
        "this test needs /dev/kvm (hardware or kvm_pvm); none is accessible on this machine"
    );
    kind
}

fn vhpc(args: &[&str]) -> (Output, Duration) {
    let start = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_vhpc"))
        .args(args)
        .output()
        .expect("run vhpc");
    (out, start.elapsed())
}

#[test]
fn the_test_guest_boots_and_its_exit_status_is_vhpcs() {
    require_kvm();
    let guest = vhpc_testguest::elf_path().to_str().expect("utf-8 path");
    let (out, took) = vhpc(&[
        "run",
        "--kernel",
        guest,
        "--cmdline",
        "exit=9",
        "--console",
        "--timeout",
        "30",
        "--",
        "true",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(9), "{stderr}");
    assert!(stderr.contains(vhpc_testguest::FIRST_LINE), "{stderr}");
    assert!(took < Duration::from_secs(20), "{took:?}");
}

#[test]
fn the_default_command_line_boots_the_test_guest_to_status_0() {
    require_kvm();
    let guest = vhpc_testguest::elf_path().to_str().expect("utf-8 path");
    let (out, _) = vhpc(&["run", "--kernel", guest, "--console", "--", "true"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains(vhpc_testguest::FIRST_LINE), "{stderr}");
}

/// An ELF64 with one PT_NOTE segment holding a "Linux" note, as every vmlinux has.
fn fake_vmlinux() -> Vec<u8> {
    let mut note = Vec::new();
    note.extend_from_slice(&6u32.to_le_bytes()); // "Linux\0"
    note.extend_from_slice(&4u32.to_le_bytes());
    note.extend_from_slice(&0x100u32.to_le_bytes()); // LINUX_ELFNOTE_BUILD_SALT
    note.extend_from_slice(b"Linux\0\0\0salt");
    let mut e = vec![0u8; 64 + 0x38];
    e[..6].copy_from_slice(b"\x7fELF\x02\x01");
    e[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
    e[0x36..0x38].copy_from_slice(&0x38u16.to_le_bytes());
    e[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
    e[64..68].copy_from_slice(&4u32.to_le_bytes()); // PT_NOTE
    let at = e.len() as u64;
    e[72..80].copy_from_slice(&at.to_le_bytes());
    e[96..104].copy_from_slice(&(note.len() as u64).to_le_bytes());
    e.extend_from_slice(&note);
    e
}

fn fake_bzimage() -> Vec<u8> {
    let mut bz = vec![0u8; 0x400];
    bz[0x202..0x206].copy_from_slice(b"HdrS");
    bz
}

#[test]
fn linux_kernels_are_refused_at_once_on_kvm_pvm() {
    let kind = require_kvm();
    for (what, bytes) in [("bzImage", fake_bzimage()), ("vmlinux", fake_vmlinux())] {
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        f.write_all(&bytes).expect("write");
        let path = f.path().to_str().expect("utf-8 path");
        let (out, took) = vhpc(&[
            "run",
            "--kernel",
            path,
            "--initrd",
            "/dev/null",
            "--",
            "true",
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{what}: {stderr}");
        assert!(
            took < Duration::from_secs(5),
            "{what}: at once, took {took:?}"
        );
        if kind == KvmKind::Pvm {
            assert!(
                stderr.contains("kvm_pvm") && stderr.contains("vhpc lab run"),
                "{what}: the refusal says why and what to do: {stderr}"
            );
        } else {
            eprintln!(
                "hardware KVM: no refusal to check, the fake {what} just fails to load: {stderr}"
            );
        }
    }
}

#[test]
fn image_test_guest_writes_a_guest_that_runs() {
    require_kvm();
    let dir = tempfile::tempdir().expect("temp dir");
    let elf = dir.path().join("g.elf");
    let elf = elf.to_str().expect("utf-8 path");
    let (out, _) = vhpc(&["image", "test-guest", "--out", elf]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(elf).expect("written"), vhpc_testguest::ELF);
    let (out, _) = vhpc(&[
        "run",
        "--kernel",
        elf,
        "--console",
        "--cmdline",
        "exception exit=3",
        "--",
        "true",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("exception: #UD #DE #PF handled"),
        "{stderr}"
    );
}
