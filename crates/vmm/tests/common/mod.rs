//! What the direct tests share: a VM config for vhpc's test guest, silent VM I/O, and reading
//! the guest's progress from its results page.

#![allow(dead_code)] // each test file uses its own part of this

use std::time::{Duration, Instant};

use vhpc_api::{MemoryConfig, VmConfig};
use vhpc_testguest::abi;
use vhpc_vmm::host::{self, KvmKind};
use vhpc_vmm::{Vm, VmIo};
use vm_memory::{Bytes, GuestAddress};

pub const WAIT: Duration = Duration::from_secs(60);

/// Fails the test, saying why, where there is no usable /dev/kvm: a test that cannot run
/// must not pass.
pub fn require_kvm() {
    match host::kvm_kind() {
        KvmKind::Missing => panic!(
            "the direct tests need /dev/kvm (any kind: hardware or kvm_pvm) and there is none \
             on this machine, or it is not accessible: load kvm, or run as a user in group kvm"
        ),
        kind => eprintln!("direct test on /dev/kvm of kind {kind:?}"),
    }
}

/// The test guest with `vcpus`, `memory_mib` and its command line `cmdline`.
pub fn config(vcpus: u32, memory_mib: u64, cmdline: &str) -> VmConfig {
    require_kvm();
    VmConfig {
        vcpus,
        memory: MemoryConfig {
            size_mib: memory_mib,
            hugepages: false,
            prefault: false,
        },
        kernel: vhpc_testguest::elf_path().to_path_buf(),
        initramfs: None,
        cmdline: cmdline.into(),
        disks: Vec::new(),
        nets: Vec::new(),
    }
}

/// Console and agent into the void (the console log keeps what the guest printed).
pub fn io() -> VmIo {
    VmIo {
        console: Box::new(std::io::sink()),
        agent: Box::new(std::io::sink()),
        extra_initramfs: Vec::new(),
        timeout: None,
        vsock: None,
    }
}

pub fn console(vm: &Vm) -> String {
    String::from_utf8_lossy(&vm.console_log().contents()).into_owned()
}

/// The guest's `count=` progress.
pub fn counter(vm: &Vm) -> u64 {
    vm.memory()
        .read_obj(GuestAddress(abi::RESULTS_ADDR + 8 * abi::RES_COUNTER))
        .unwrap_or(0)
}

/// Waits until the guest counted to `at_least` (panics with its console after [`WAIT`]).
pub fn wait_for_count(vm: &Vm, at_least: u64) {
    let start = Instant::now();
    while counter(vm) < at_least {
        assert!(start.elapsed() < WAIT, "console:\n{}", console(vm));
        std::thread::sleep(Duration::from_millis(2));
    }
}
