//! Direct tests of checkpoints on disk (crates/vmm/src/snapshot), with vhpc's test guest on
//! this machine's /dev/kvm: a guest counting and checksumming its memory continues exactly
//! after checkpoint → drop the VM → restore from disk; after a chain of incremental
//! checkpoints; after a merge. And damaged checkpoints are refused, never a panic.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use vhpc_api::{MemoryConfig, VmConfig};
use vhpc_testguest::abi;
use vhpc_vmm::host::{self, KvmKind};
use vhpc_vmm::snapshot::{self, CheckpointKind, RestoreOptions, SnapshotError};
use vhpc_vmm::{Vm, VmIo, VmOutcome};
use vm_memory::{Bytes, GuestAddress};

const WAIT: Duration = Duration::from_secs(60);

fn config(vcpus: u32, memory_mib: u64, cmdline: &str) -> VmConfig {
    assert_ne!(
        host::kvm_kind(),
        KvmKind::Missing,
        "the direct tests need /dev/kvm (hardware or kvm_pvm)"
    );
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

fn console(vm: &Vm) -> String {
    String::from_utf8_lossy(&vm.console_log().contents()).into_owned()
}

fn counter(vm: &Vm) -> u64 {
    vm.memory()
        .read_obj(GuestAddress(abi::RESULTS_ADDR + 8 * abi::RES_COUNTER))
        .unwrap()
}

fn wait_for_count(vm: &Vm, at_least: u64) {
    let start = Instant::now();
    while counter(vm) < at_least {
        assert!(start.elapsed() < WAIT, "console:\n{}", console(vm));
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Restores `dir` into a new VM, runs it to the end and checks the guest's final line: the
/// count, its checksum and the checksum over the count buffer in memory.
fn restore_and_finish(dir: &Path, n: u64, paused_at: u64) {
    let mut vm = snapshot::restore(dir, io(), RestoreOptions::default()).unwrap();
    assert_eq!(counter(&vm), paused_at, "memory is the checkpoint's");
    vm.start().unwrap();
    assert_eq!(vm.wait(Some(WAIT)), VmOutcome::Exit(0), "{}", console(&vm));
    let expected = vhpc_testguest::expected_count_line(n);
    assert!(
        console(&vm).contains(&expected),
        "{expected} in:\n{}",
        console(&vm)
    );
    assert!(
        !console(&vm).contains(vhpc_testguest::FIRST_LINE),
        "no reboot"
    );
}

#[test]
fn a_checkpoint_on_disk_restores_into_a_new_vm_and_continues_exactly() {
    let n = 30_000;
    let config = config(2, 64, &format!("smp=2 dirty=8 count={n}"));
    let mut vm = Vm::boot(&config, io()).unwrap();
    vm.start().unwrap();
    wait_for_count(&vm, n / 10);
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("ckpt");
    let info = snapshot::checkpoint(&vm, &dir, CheckpointKind::Full).unwrap();
    vm.pause().unwrap();
    let paused_at = counter(&vm);
    drop(vm);
    eprintln!("{info:?}");

    let raw = std::fs::metadata(dir.join("memory.raw")).unwrap();
    assert_eq!(raw.len(), 64 << 20, "the file is the size of guest RAM");
    assert!(
        raw.blocks() * 512 < 16 << 20,
        "sparse: {} bytes allocated",
        raw.blocks() * 512
    );
    let inspection = snapshot::inspect(&dir).unwrap();
    assert_eq!(inspection.chain_len, 1);
    assert_eq!(inspection.memory_pages, info.memory_pages);
    // The VM ran on after the checkpoint; the checkpoint holds the moment it was taken.
    let mut vm = snapshot::restore(&dir, io(), RestoreOptions::default()).unwrap();
    let at_checkpoint = counter(&vm);
    assert!(at_checkpoint <= paused_at && at_checkpoint < n);
    vm.start().unwrap();
    assert_eq!(vm.wait(Some(WAIT)), VmOutcome::Exit(0), "{}", console(&vm));
    assert!(console(&vm).contains(&vhpc_testguest::expected_count_line(n)));
}

#[test]
fn five_incremental_checkpoints_restore_as_a_chain_and_merge_into_one() {
    let n = 60_000;
    let config = config(1, 32, &format!("count={n}"));
    let mut vm = Vm::boot(&config, io()).unwrap();
    vm.start().unwrap();
    let root = tempfile::tempdir().unwrap();
    wait_for_count(&vm, 2_000);
    snapshot::checkpoint(&vm, &root.path().join("c0"), CheckpointKind::Full).unwrap();
    let mut last = 0;
    for k in 1..=5 {
        wait_for_count(&vm, counter(&vm) + 2_000);
        let info = snapshot::checkpoint(
            &vm,
            &root.path().join(format!("c{k}")),
            CheckpointKind::Incremental,
        )
        .unwrap();
        assert!(info.parent.is_some());
        assert!(info.memory_pages > 0 && info.memory_pages < 64, "{info:?}");
        last = k;
    }
    vm.pause().unwrap();
    let paused_at = counter(&vm);
    assert!(paused_at < n, "the guest was still counting");
    drop(vm);

    let dir = root.path().join(format!("c{last}"));
    let chain = snapshot::load_chain(&dir).unwrap();
    assert_eq!(chain.len(), 6);
    let at_checkpoint = {
        let vm = snapshot::restore(&dir, io(), RestoreOptions::default()).unwrap();
        counter(&vm)
    };
    restore_and_finish(&dir, n, at_checkpoint);

    let merged = root.path().join("merged");
    snapshot::merge(&dir, &merged).unwrap();
    assert_eq!(snapshot::inspect(&merged).unwrap().chain_len, 1);
    restore_and_finish(&merged, n, at_checkpoint);

    // Merging into a link of the chain is refused.
    let err = snapshot::merge(&root.path().join("c2"), &root.path().join("c1")).unwrap_err();
    assert!(err.to_string().contains("part of the chain"), "{err}");
    // A chain whose middle link was replaced is refused, with the link named.
    std::fs::remove_dir_all(root.path().join("c2")).unwrap();
    std::fs::rename(&merged, root.path().join("c2")).unwrap();
    let err = snapshot::load_chain(&dir).unwrap_err();
    assert!(err.to_string().contains("overwritten"), "{err}");
}

fn checkpoint_of_a_counting_guest(root: &Path) -> std::path::PathBuf {
    let config = config(1, 32, "count=0");
    let mut vm = Vm::boot(&config, io()).unwrap();
    vm.start().unwrap();
    wait_for_count(&vm, 100);
    let dir = root.join("ckpt");
    snapshot::checkpoint(&vm, &dir, CheckpointKind::Full).unwrap();
    dir
}

fn load_err(dir: &Path, bytes: &[u8]) -> String {
    let err = snapshot::Checkpoint::from_bytes(dir, bytes)
        .and_then(|c| c.machine().map(|_| ()))
        .unwrap_err();
    err.to_string()
}

#[test]
fn damaged_checkpoints_are_refused_with_clear_errors_and_never_panic() {
    let root = tempfile::tempdir().unwrap();
    let dir = checkpoint_of_a_counting_guest(root.path());
    let good = std::fs::read(dir.join("state.bin")).unwrap();
    snapshot::Checkpoint::from_bytes(&dir, &good)
        .unwrap()
        .machine()
        .unwrap();

    let mut wrong_magic = good.clone();
    wrong_magic[..4].copy_from_slice(b"QEVM");
    assert!(load_err(&dir, &wrong_magic).contains("not a vhpc checkpoint"));
    let mut wrong_version = good.clone();
    wrong_version[8] = 9;
    assert!(load_err(&dir, &wrong_version).contains("version 9 is not supported"));
    assert!(load_err(&dir, &good[..good.len() / 2]).contains("truncated"));
    assert!(load_err(&dir, &good[..20]).contains("truncated"));
    let mut flipped = good.clone();
    flipped[good.len() - 100] ^= 0x10;
    assert!(load_err(&dir, &flipped).contains("damaged"));

    // Hundreds of random corruptions and truncations: an error each time, never a panic.
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for round in 0..400 {
        let mut bytes = good.clone();
        match round % 3 {
            0 => bytes.truncate((rand() % bytes.len() as u64) as usize),
            1 => {
                for _ in 0..1 + rand() % 8 {
                    let at = (rand() % bytes.len() as u64) as usize;
                    bytes[at] ^= 1 << (rand() % 8);
                }
            }
            _ => {
                let at = (rand() % bytes.len() as u64) as usize;
                let len = (rand() % 64) as usize;
                for b in bytes.iter_mut().skip(at).take(len) {
                    *b = rand() as u8;
                }
            }
        }
        if bytes != good {
            assert!(!load_err(&dir, &bytes).is_empty());
        }
    }

    // A damaged memory image is found by inspect.
    let raw = dir.join("memory.raw");
    let file = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
    use std::os::unix::fs::FileExt;
    file.write_all_at(b"\x5a", abi::RESULTS_ADDR + 8 * abi::RES_COUNTER)
        .unwrap();
    let err = snapshot::inspect(&dir).unwrap_err();
    assert!(err.to_string().contains("memory of checkpoint"), "{err}");
}

#[test]
fn restore_refuses_another_cpu_model_unless_forced() {
    let root = tempfile::tempdir().unwrap();
    let dir = checkpoint_of_a_counting_guest(root.path());
    let bytes = std::fs::read(dir.join("state.bin")).unwrap();
    let mut body = snapshot::format::decode(&bytes).unwrap();
    body.meta.host.cpu_model = "Imaginary CPU 9000".into();
    std::fs::write(
        dir.join("state.bin"),
        snapshot::format::encode(&body).unwrap(),
    )
    .unwrap();
    let err = match snapshot::restore(&dir, io(), RestoreOptions::default()) {
        Err(e) => e,
        Ok(_) => panic!("restored a checkpoint of another CPU model"),
    };
    assert!(matches!(err, SnapshotError::HostMismatch { .. }), "{err}");
    assert!(err.to_string().contains("--force"), "{err}");
    let forced = RestoreOptions {
        force: true,
        ..Default::default()
    };
    let mut vm = snapshot::restore(&dir, io(), forced).unwrap();
    vm.start().unwrap();
    let before = counter(&vm);
    wait_for_count(&vm, before + 100);
}

#[test]
fn a_failed_checkpoint_leaves_the_previous_one_untouched() {
    let root = tempfile::tempdir().unwrap();
    let config = config(1, 32, "count=0");
    let mut vm = Vm::boot(&config, io()).unwrap();
    vm.start().unwrap();
    wait_for_count(&vm, 100);
    let dir = root.path().join("ckpt");
    // No parent yet: refused before anything is written.
    let err = snapshot::checkpoint(&vm, &dir, CheckpointKind::Incremental).unwrap_err();
    assert!(err.to_string().contains("full checkpoint first"), "{err}");
    assert!(!dir.exists());
    let first = snapshot::checkpoint(&vm, &dir, CheckpointKind::Full).unwrap();
    // The next checkpoint's temporary directory cannot be made (a file is in its way).
    let blocker = root.path().join(format!("ckpt.tmp-{}", std::process::id()));
    std::fs::write(&blocker, b"").unwrap();
    snapshot::checkpoint(&vm, &dir, CheckpointKind::Full).unwrap_err();
    let kept = snapshot::Checkpoint::load(&dir).unwrap();
    assert_eq!(
        kept.body.meta.id, first.id,
        "the previous checkpoint is whole"
    );
    snapshot::inspect(&dir).unwrap();
    // The VM is running again, and a failed checkpoint forces the next one to be full.
    wait_for_count(&vm, counter(&vm) + 100);
    std::fs::remove_file(&blocker).unwrap();
    let err = snapshot::checkpoint(&vm, &root.path().join("next"), CheckpointKind::Incremental)
        .unwrap_err();
    assert!(err.to_string().contains("full checkpoint first"), "{err}");
}

#[test]
fn a_restored_vm_checkpoints_again_sparsely_and_exactly() {
    let n = 40_000;
    let config = config(1, 256, &format!("dirty=4 count={n}"));
    let mut vm = Vm::boot(&config, io()).unwrap();
    vm.start().unwrap();
    wait_for_count(&vm, n / 10);
    let root = tempfile::tempdir().unwrap();
    let (first, second) = (root.path().join("first"), root.path().join("second"));
    snapshot::checkpoint(&vm, &first, CheckpointKind::Full).unwrap();
    drop(vm);

    // Its memory is now a private mapping of first/memory.raw.
    let mut vm = snapshot::restore(&first, io(), RestoreOptions::default()).unwrap();
    vm.start().unwrap();
    wait_for_count(&vm, counter(&vm) + 1_000);
    let info = snapshot::checkpoint(&vm, &second, CheckpointKind::Full).unwrap();
    vm.pause().unwrap();
    drop(vm);
    let allocated = std::fs::metadata(second.join("memory.raw"))
        .unwrap()
        .blocks()
        * 512;
    assert!(allocated < 16 << 20, "sparse again: {allocated} bytes");
    eprintln!("second checkpoint: {info:?}, {allocated} bytes allocated");
    let mut vm = snapshot::restore(&second, io(), RestoreOptions::default()).unwrap();
    vm.start().unwrap();
    assert_eq!(vm.wait(Some(WAIT)), VmOutcome::Exit(0), "{}", console(&vm));
    assert!(console(&vm).contains(&vhpc_testguest::expected_count_line(n)));
}

#[test]
fn well_framed_but_absurd_checkpoints_are_errors_not_panics() {
    let root = tempfile::tempdir().unwrap();
    let dir = checkpoint_of_a_counting_guest(root.path());
    let bytes = std::fs::read(dir.join("state.bin")).unwrap();
    let good = snapshot::format::decode(&bytes).unwrap();
    let mut bodies = Vec::new();
    let mut b = good.clone();
    b.memory.regions[0].len = u64::MAX;
    bodies.push(("region length", b));
    let mut b = good.clone();
    b.memory.regions[0].file_offset = u64::MAX - 1;
    bodies.push(("region offset", b));
    let mut b = good.clone();
    b.config.vcpus = 3;
    bodies.push(("vCPU count", b));
    let mut b = good.clone();
    b.components.retain(|c| c.name != "irqchip");
    bodies.push(("missing component", b));
    let mut b = good.clone();
    b.components[0].version = 7;
    bodies.push(("component version", b));
    let mut b = good.clone();
    b.components[1].data.truncate(100);
    bodies.push(("short component", b));
    for (what, body) in bodies {
        std::fs::write(
            dir.join("state.bin"),
            snapshot::format::encode(&body).unwrap(),
        )
        .unwrap();
        match snapshot::restore(&dir, io(), RestoreOptions::default()) {
            Err(e) => eprintln!("{what}: {e}"),
            Ok(_) => panic!("{what}: restored"),
        }
    }
}

/// A 1-vCPU counting guest with a virtio disk.
fn config_with_disk(root: &Path, cmdline: &str) -> VmConfig {
    let image = root.join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let mut config = config(1, 32, cmdline);
    config.disks.push(vhpc_api::DiskConfig {
        path: image,
        read_only: false,
    });
    config
}

fn device_components(dir: &Path) -> Vec<snapshot::format::Component> {
    let c = snapshot::Checkpoint::load(dir).unwrap();
    c.body
        .components
        .into_iter()
        .filter(|c| c.name.starts_with("dev."))
        .collect()
}

#[test]
fn every_device_state_round_trips_and_a_vm_with_a_disk_checkpoints() {
    let root = tempfile::tempdir().unwrap();
    let n = 20_000;
    let config = config_with_disk(root.path(), &format!("count={n}"));
    let vm = Vm::boot(&config, io()).unwrap();
    let mut vm = vm;
    vm.start().unwrap();
    wait_for_count(&vm, n / 10);
    let first = root.path().join("c0");
    snapshot::checkpoint(&vm, &first, CheckpointKind::Full).unwrap();
    drop(vm);
    let names: Vec<String> = device_components(&first)
        .iter()
        .map(|c| format!("{} v{}", c.name, c.version))
        .collect();
    assert_eq!(
        names,
        [
            "dev.com1 v1",
            "dev.com2 v1",
            "dev.i8042 v1",
            "dev.rtc v1",
            "dev.acpi_pm v1",
            "dev.pci.bus v1",
            "dev.pci.0 v1",
            "dev.pci.1 v1"
        ]
    );
    let disk = &snapshot::Checkpoint::load(&first).unwrap().body.disks;
    assert_eq!(disk.len(), 1);
    assert_eq!(disk[0].path, config.disks[0].path);

    // Restore, checkpoint the restored VM at once (started and paused straight away; the
    // counting guest touches no device meanwhile): every device's state is what was
    // restored into it.
    let mut vm = snapshot::restore(&first, io(), RestoreOptions::default()).unwrap();
    vm.start().unwrap();
    vm.pause().unwrap();
    let second = root.path().join("c1");
    snapshot::checkpoint(&vm, &second, CheckpointKind::Full).unwrap();
    drop(vm);
    assert_eq!(device_components(&first), device_components(&second));

    // And the restored guest finishes its count exactly.
    restore_and_finish(&second, n, {
        let vm = snapshot::restore(&second, io(), RestoreOptions::default()).unwrap();
        counter(&vm)
    });
}

#[test]
fn a_programmed_msix_table_is_routed_again_on_real_kvm() {
    use vhpc_devices::persist::Persist;
    use vhpc_devices::virtio::pci_transport::VirtioPciDevice;
    let root = tempfile::tempdir().unwrap();
    let config = config_with_disk(root.path(), "count=0");
    let mut vm = Vm::boot(&config, io()).unwrap();
    vm.start().unwrap();
    let dir = root.path().join("c0");
    snapshot::checkpoint(&vm, &dir, CheckpointKind::Full).unwrap();
    drop(vm);
    // What a driver would have programmed: MSI-X on, both vectors routed to CPU 0.
    let mut c = snapshot::Checkpoint::load(&dir).unwrap();
    let comp = c
        .body
        .components
        .iter_mut()
        .find(|c| c.name == "dev.pci.1")
        .unwrap();
    let mut state = vhpc_devices::persist::decode::<VirtioPciDevice>(&comp.data).unwrap();
    state.msix.enabled = true;
    state.msix.entries = vec![[0xfee0_0000, 0, 0x31, 0], [0xfee0_0000, 0, 0x32, 0]];
    comp.data = vhpc_devices::persist::encode::<VirtioPciDevice>(&state).unwrap();
    assert_eq!(<VirtioPciDevice as Persist>::VERSION, comp.version);
    std::fs::write(
        dir.join("state.bin"),
        snapshot::format::encode(&c.body).unwrap(),
    )
    .unwrap();
    let mut vm = snapshot::restore(&dir, io(), RestoreOptions::default()).unwrap();
    vm.start().unwrap();
    vm.pause().unwrap();
    let again = root.path().join("c1");
    snapshot::checkpoint(&vm, &again, CheckpointKind::Full).unwrap();
    let saved = device_components(&again)
        .into_iter()
        .find(|c| c.name == "dev.pci.1")
        .unwrap();
    let restored = vhpc_devices::persist::decode::<VirtioPciDevice>(&saved.data).unwrap();
    assert_eq!(restored.msix, state.msix, "KVM accepted both routes");
}

#[test]
fn damaged_device_state_is_refused_with_clear_errors() {
    let root = tempfile::tempdir().unwrap();
    let config = config_with_disk(root.path(), "count=0");
    let mut vm = Vm::boot(&config, io()).unwrap();
    vm.start().unwrap();
    let dir = root.path().join("c0");
    snapshot::checkpoint(&vm, &dir, CheckpointKind::Full).unwrap();
    drop(vm);
    let good = snapshot::Checkpoint::load(&dir).unwrap().body;
    let index = |name: &str| good.components.iter().position(|c| c.name == name).unwrap();
    let mut bodies = Vec::new();
    let mut b = good.clone();
    b.components[index("dev.com2")].data.truncate(3);
    bodies.push(("truncated serial state", b));
    let mut b = good.clone();
    b.components[index("dev.rtc")].data.push(0);
    bodies.push(("trailing bytes in the RTC state", b));
    let mut b = good.clone();
    b.components[index("dev.pci.1")].version = 9;
    bodies.push(("newer virtio-pci state", b));
    let mut b = good.clone();
    b.components.remove(index("dev.i8042"));
    bodies.push(("missing i8042", b));
    let mut b = good.clone();
    let mut extra = b.components[index("dev.rtc")].clone();
    extra.name = "dev.pci.7".into();
    b.components.push(extra);
    bodies.push(("a device this VM does not have", b));
    let mut b = good.clone();
    b.components[index("dev.pci.bus")].data = vec![1, 2];
    bodies.push(("short PCI latch", b));
    let mut b = good.clone();
    let bridge = b.components[index("dev.pci.0")].data.clone();
    b.components[index("dev.pci.1")].data = bridge;
    bodies.push(("host bridge state in the disk's slot", b));
    for (what, body) in bodies {
        std::fs::write(
            dir.join("state.bin"),
            snapshot::format::encode(&body).unwrap(),
        )
        .unwrap();
        match snapshot::restore(&dir, io(), RestoreOptions::default()) {
            Err(e) => eprintln!("{what}: {e}"),
            Ok(_) => panic!("{what}: restored"),
        }
    }
}

#[test]
fn a_disk_changed_since_the_checkpoint_is_refused_unless_forced() {
    let root = tempfile::tempdir().unwrap();
    let config = config_with_disk(root.path(), "count=0");
    let mut vm = Vm::boot(&config, io()).unwrap();
    vm.start().unwrap();
    let dir = root.path().join("c0");
    snapshot::checkpoint(&vm, &dir, CheckpointKind::Full).unwrap();
    drop(vm);
    snapshot::restore(&dir, io(), RestoreOptions::default()).expect("unchanged disk");
    std::thread::sleep(Duration::from_millis(20));
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&config.disks[0].path)
            .unwrap();
        f.write_all_at(b"changed", 4096).unwrap();
    }
    let err = snapshot::restore(&dir, io(), RestoreOptions::default()).err();
    let err = err.expect("a changed disk is refused");
    assert!(matches!(err, SnapshotError::DiskChanged(_)), "{err}");
    assert!(err.to_string().contains("--force"), "{err}");
    let forced = RestoreOptions {
        force: true,
        ..RestoreOptions::default()
    };
    snapshot::restore(&dir, io(), forced).expect("forced");
}

#[test]
fn pages_the_vmm_writes_are_in_the_next_incremental_checkpoint() {
    // Virtio devices write guest memory from their threads (used rings, disk reads); KVM's
    // dirty log does not see those writes, vm-memory's bitmap does.
    let root = tempfile::tempdir().unwrap();
    let config = config(1, 32, "halt");
    let mut vm = Vm::boot(&config, io()).unwrap();
    vm.start().unwrap();
    let (c0, c1) = (root.path().join("c0"), root.path().join("c1"));
    snapshot::checkpoint(&vm, &c0, CheckpointKind::Full).unwrap();
    let addr = GuestAddress(0x30_0000);
    vm.memory().write_obj(0x1234_5678_u64, addr).unwrap();
    let info = snapshot::checkpoint(&vm, &c1, CheckpointKind::Incremental).unwrap();
    assert!(info.memory_pages >= 1);
    let body = snapshot::Checkpoint::load(&c1).unwrap().body;
    let snapshot::format::MemoryContents::Delta { runs, .. } = &body.memory.contents else {
        panic!("incremental");
    };
    assert!(
        runs.iter()
            .any(|(start, pages)| (*start..*start + 4096 * u64::from(*pages)).contains(&addr.0)),
        "{runs:?}"
    );
    drop(vm);
    let vm = snapshot::restore(&c1, io(), RestoreOptions::default()).unwrap();
    assert_eq!(vm.memory().read_obj::<u64>(addr).unwrap(), 0x1234_5678);
}
