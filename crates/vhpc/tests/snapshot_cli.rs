//! `vhpc snapshot inspect|merge` and `vhpc restore` in new processes, on checkpoints of vhpc's
//! test guest taken in this process on this machine's /dev/kvm.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use vhpc_api::{MemoryConfig, VmConfig};
use vhpc_testguest::abi;
use vhpc_vmm::host::{self, KvmKind};
use vhpc_vmm::snapshot::{self, CheckpointKind};
use vhpc_vmm::{Vm, VmIo};
use vm_memory::{Bytes, GuestAddress};

fn vhpc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vhpc"))
        .args(args)
        .output()
        .expect("run vhpc")
}

fn counter(vm: &Vm) -> u64 {
    vm.memory()
        .read_obj(GuestAddress(abi::RESULTS_ADDR + 8 * abi::RES_COUNTER))
        .expect("results page")
}

fn wait_for_count(vm: &Vm, at_least: u64) {
    let start = Instant::now();
    while counter(vm) < at_least {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the guest stopped counting"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A full checkpoint `c0` and an incremental one `c1` of a guest counting to `n`.
fn chain_of_a_counting_guest(root: &Path, n: u64) {
    assert_ne!(
        host::kvm_kind(),
        KvmKind::Missing,
        "this test needs /dev/kvm"
    );
    let config = VmConfig {
        vcpus: 1,
        memory: MemoryConfig {
            size_mib: 32,
            hugepages: false,
            prefault: false,
        },
        kernel: vhpc_testguest::elf_path().to_path_buf(),
        initramfs: None,
        cmdline: format!("count={n}"),
        disks: Vec::new(),
        nets: Vec::new(),
    };
    let io = VmIo {
        console: Box::new(std::io::sink()),
        agent: Box::new(std::io::sink()),
        extra_initramfs: Vec::new(),
        vsock: None,
        timeout: None,
    };
    let mut vm = Vm::boot(&config, io).expect("boot");
    vm.start().expect("start");
    wait_for_count(&vm, n / 10);
    snapshot::checkpoint(&vm, &root.join("c0"), CheckpointKind::Full).expect("full");
    wait_for_count(&vm, counter(&vm) + 1000);
    snapshot::checkpoint(&vm, &root.join("c1"), CheckpointKind::Incremental).expect("incremental");
    vm.pause().expect("pause");
    assert!(counter(&vm) < n, "checkpointed before the end");
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn restore_inspect_and_merge_through_the_cli() {
    let n = 40_000;
    let root = tempfile::tempdir().expect("tempdir");
    chain_of_a_counting_guest(root.path(), n);
    let (c0, c1, merged) = (
        root.path().join("c0"),
        root.path().join("c1"),
        root.path().join("merged"),
    );

    let out = vhpc(&["snapshot", "inspect", path(&c1)]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "VHPCSNAP version 2",
        "vcpu.0 v1",
        "vcpu0       rip=0x",
        " cr3=0x",
        "irqchip v1",
        "CRC-32 ok",
        "2 checkpoint(s)",
    ] {
        assert!(text.contains(needle), "{needle} in:\n{text}");
    }
    eprintln!("{text}");

    let out = vhpc(&["snapshot", "merge", path(&c1), path(&merged)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let expected = vhpc_testguest::expected_count_line(n);
    for dir in [&c1, &merged] {
        let out = vhpc(&["restore", path(dir), "--console", "--timeout", "60"]);
        let console = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{}: {console}", dir.display());
        assert!(console.contains(&expected), "{expected} in: {console}");
        assert!(
            !console.contains(vhpc_testguest::FIRST_LINE),
            "no reboot: {console}"
        );
    }

    // A damaged checkpoint: a clear error and vhpc's error status.
    let state = c0.join("state.bin");
    let mut bytes = std::fs::read(&state).expect("read");
    bytes.truncate(bytes.len() - 7);
    std::fs::write(&state, bytes).expect("write");
    let out = vhpc(&["restore", path(&c1)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert!(stderr.contains("truncated"), "{stderr}");
}
