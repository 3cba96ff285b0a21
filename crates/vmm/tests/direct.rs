//! Direct tests: the VMM's mechanics on this machine's own /dev/kvm, with vhpc's tiny test
//! guest (crates/testguest), in seconds and without the lab. They run on any /dev/kvm: on an
//! emulating backend (kvm_pvm, this project's machines) and on hardware KVM alike, since the
//! guest uses general-purpose registers only. Without /dev/kvm they fail and say so: a test
//! that cannot run must not pass.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use vhpc_api::{MemoryConfig, VmConfig};
use vhpc_testguest::abi;
use vhpc_vmm::host::{self, KvmKind};
use vhpc_vmm::{Vm, VmIo, VmOutcome};
use vm_memory::{Bytes, GuestAddress};

/// Generous: the guest is emulated instruction by instruction and the two cores are shared
/// with the other tests.
const WAIT: Duration = Duration::from_secs(60);

fn require_kvm() {
    match host::kvm_kind() {
        KvmKind::Missing => panic!(
            "the direct tests need /dev/kvm (any kind: hardware or kvm_pvm) and there is none \
             on this machine, or it is not accessible: load kvm, or run as a user in group kvm"
        ),
        kind => eprintln!("direct test on /dev/kvm of kind {kind:?}"),
    }
}

fn config(vcpus: u32, memory_mib: u64, cmdline: &str) -> VmConfig {
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

fn io() -> VmIo {
    VmIo {
        console: Box::new(std::io::sink()),
        agent: Box::new(std::io::sink()),
        extra_initramfs: Vec::new(),
        vsock: None,
        timeout: None,
    }
}

fn boot(config: &VmConfig) -> Vm {
    require_kvm();
    let mut vm = Vm::boot(config, io()).unwrap();
    vm.start().unwrap();
    vm
}

fn console(vm: &Vm) -> String {
    String::from_utf8_lossy(&vm.console_log().contents()).into_owned()
}

fn result(vm: &Vm, word: u64) -> u64 {
    vm.memory()
        .read_obj(GuestAddress(abi::RESULTS_ADDR + 8 * word))
        .unwrap()
}

/// Polls until `done` holds; fails with the console log after `WAIT`.
fn wait_until(vm: &Vm, what: &str, done: impl Fn(&Vm) -> bool) {
    let start = Instant::now();
    while !done(vm) {
        assert!(
            start.elapsed() < WAIT,
            "timed out waiting for {what}; console:\n{}",
            console(vm)
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn assert_exit(vm: &Vm, status: u8) {
    let outcome = vm.wait(Some(WAIT));
    assert_eq!(
        outcome,
        VmOutcome::Exit(status),
        "console:\n{}",
        console(vm)
    );
}

#[test]
fn boots_to_the_first_line_and_exits_with_its_status() {
    let start = Instant::now();
    let vm = boot(&config(1, 32, "exit=42"));
    assert_exit(&vm, 42);
    assert!(
        console(&vm).starts_with(vhpc_testguest::FIRST_LINE),
        "{}",
        console(&vm)
    );
    assert_eq!(result(&vm, abi::RES_MAGIC), abi::RESULTS_MAGIC);
    eprintln!("boot to exit: {:?}", start.elapsed());
}

#[test]
fn every_vcpu_starts_and_runs() {
    let vcpus = 4;
    let vm = boot(&config(vcpus, 32, "smp=4"));
    assert_exit(&vm, 0);
    assert!(
        console(&vm).contains("smp: 4 vcpus running"),
        "{}",
        console(&vm)
    );
    assert_eq!(result(&vm, abi::RES_VCPUS_UP), u64::from(vcpus));
    for i in 1..u64::from(vcpus) {
        assert!(
            result(&vm, abi::RES_VCPU_COUNTERS + i) >= 100,
            "vcpu{i} ran"
        );
    }
}

#[test]
fn exceptions_go_through_the_guest_idt() {
    let vm = boot(&config(1, 32, "exception exit=7"));
    assert_exit(&vm, 7);
    // #DE (0), #UD (6), #PF (14), each raised, handled and returned from with iretq.
    assert_eq!(
        result(&vm, abi::RES_EXCEPTIONS),
        (1 << 0) | (1 << 6) | (1 << 14)
    );
    assert!(console(&vm).contains("exception: #UD #DE #PF handled"));
}

#[test]
fn pause_resume_and_exit_under_load() {
    let vm = boot(&config(2, 32, "smp=2 count=0"));
    wait_until(&vm, "the count loop", |vm| {
        result(vm, abi::RES_COUNTER) > 100
    });
    for round in 0..5 {
        vm.pause().unwrap();
        let counters = |vm: &Vm| {
            (
                result(vm, abi::RES_COUNTER),
                result(vm, abi::RES_VCPU_COUNTERS + 1),
            )
        };
        let paused = counters(&vm);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(counters(&vm), paused, "round {round}: a paused vCPU ran");
        vm.pause().unwrap(); // pausing a paused VM is a no-op
        vm.resume().unwrap();
        wait_until(&vm, "both vCPUs to run again", |vm| {
            let now = counters(vm);
            now.0 > paused.0 && now.1 > paused.1
        });
    }
    // Exit while both vCPUs are busy: every thread stops and is joined promptly.
    let start = Instant::now();
    vm.shutdown();
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn dirty_log_is_exact_for_a_known_write_pattern() {
    require_kvm();
    let (mib, stride) = (4u64, 3u64);
    let config = config(1, 64, &format!("dirty={mib} stride={stride}"));
    let mut vm = Vm::boot(&config, io()).unwrap();
    vm.set_dirty_logging(true).unwrap();
    vm.start().unwrap();
    assert_exit(&vm, 0);

    let dirty: BTreeSet<u64> = vm.dirty_pages().unwrap().into_iter().collect();
    let area = abi::DIRTY_BASE..abi::DIRTY_BASE + (mib << 20);
    let expected: BTreeSet<u64> = area
        .clone()
        .step_by((stride * abi::PAGE_SIZE) as usize)
        .collect();
    let in_area: BTreeSet<u64> = dirty.iter().copied().filter(|a| area.contains(a)).collect();
    assert_eq!(
        in_area, expected,
        "exactly every {stride}rd page of the area"
    );
    assert_eq!(result(&vm, abi::RES_DIRTY_PAGES), expected.len() as u64);
    // Elsewhere the guest only wrote its own image (stacks, GDT, page-table A/D bits) and the
    // results page, and the VMM's own loading is not in the log.
    let elsewhere: Vec<u64> = dirty.difference(&in_area).copied().collect();
    eprintln!(
        "{} pages dirty in the area, outside it: {elsewhere:x?}",
        in_area.len()
    );
    assert!(
        elsewhere
            .iter()
            .all(|a| (abi::IMAGE_START..abi::COUNT_BUF_ADDR).contains(a)),
        "{elsewhere:x?}"
    );
    assert!(elsewhere.len() < 16, "{elsewhere:x?}");
    // Reading the log cleared it, and the guest has stopped.
    assert_eq!(vm.dirty_pages().unwrap(), Vec::<u64>::new());
}

#[test]
fn saved_state_restored_into_a_new_vm_continues_exactly() {
    let n = 20_000;
    let cmdline = format!("smp=2 count={n}");
    let config = config(2, 32, &cmdline);
    let a = boot(&config);
    wait_until(&a, "the count loop", |vm| {
        result(vm, abi::RES_COUNTER) > n / 10
    });
    a.pause().unwrap();
    let state = a.save_state().unwrap();
    let counter = result(&a, abi::RES_COUNTER);
    assert!(counter < n, "paused before the end: {counter}");
    eprintln!(
        "paused at {counter} of {n}; vcpu0: {:?}, nested state: {}",
        state.vcpus[0],
        state.vcpus[0].nested.is_some()
    );
    assert_eq!(state.vcpus.len(), 2);
    assert!(
        state.vcpus[0].msrs.len() > 10,
        "MSRs saved: {}",
        state.vcpus[0].msrs.len()
    );

    // The new VM starts from the saved state, not from the entry point: the guest's counter
    // and checksum go on from where they were, and its memory is the saved memory.
    let mut b = Vm::restore(&config, io(), &state).unwrap();
    assert_eq!(result(&b, abi::RES_COUNTER), counter);
    let paused_sum = result(&a, abi::RES_CHECKSUM);
    assert_eq!(
        result(&b, abi::RES_CHECKSUM),
        paused_sum,
        "checksum at the pause"
    );
    // The guest stores the checksum of step i before the counter i: a pause can fall between.
    let consistent = [counter, counter + 1]
        .map(|c| vhpc_testguest::expected_count(c).0)
        .contains(&paused_sum);
    assert!(
        consistent,
        "checksum {paused_sum:#x} fits neither step {counter} nor the next"
    );
    b.start().unwrap();
    assert_exit(&b, 0);
    let expected = vhpc_testguest::expected_count_line(n);
    assert!(
        console(&b).contains(&expected),
        "{expected} in:\n{}",
        console(&b)
    );
    assert!(
        !console(&b).contains(vhpc_testguest::FIRST_LINE),
        "it did not reboot"
    );
    assert_eq!(
        result(&b, abi::RES_VCPUS_UP),
        2,
        "no vCPU went through the entry again"
    );

    // The original, resumed, ends the same way.
    a.resume().unwrap();
    assert_exit(&a, 0);
    assert!(console(&a).contains(&expected), "{}", console(&a));
}

#[test]
fn saving_a_running_vm_is_refused() {
    let vm = boot(&config(1, 32, "count=0"));
    let err = vm.save_state().unwrap_err();
    assert!(err.to_string().contains("pause it first"), "{err}");
}

#[test]
fn a_vcpu_halted_in_the_kernel_pauses_saves_and_restores() {
    // With the in-kernel irqchip, `cli; hlt` blocks inside KVM_RUN: only the kick gets the
    // thread out.
    let config = config(1, 32, "halt");
    let a = boot(&config);
    wait_until(&a, "the guest to halt", |vm| {
        result(vm, abi::RES_PHASE) == abi::PHASE_HALTED
    });
    let start = Instant::now();
    a.pause().unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    let state = a.save_state().unwrap();
    assert_eq!(
        state.vcpus[0].mp_state.mp_state,
        kvm_bindings::KVM_MP_STATE_HALTED,
        "saved as halted"
    );
    a.resume().unwrap();
    let mut b = Vm::restore(&config, io(), &state).unwrap();
    b.start().unwrap();
    // Still halted, nothing new printed, and the VM does not end by itself.
    assert_eq!(
        b.wait(Some(Duration::from_millis(200))),
        VmOutcome::TimedOut
    );
    assert_eq!(console(&b), "");
    b.pause().unwrap();
    let again = b.save_state().unwrap();
    assert_eq!(again.vcpus[0].regs.rip, state.vcpus[0].regs.rip);
}
