//! `vhpc bench snapshot`: checkpoint and restore on this host's /dev/kvm with vhpc's test
//! guest, QEMU (microvm, migrate to a file and `-incoming "exec:cat FILE"`) beside it.
//!
//! 1. Checkpoint size and time against guest memory touched: a 1 GiB guest writes one word
//!    into every page of `dirty=MIB` MiB, then halts; a full checkpoint is timed from pause to
//!    durable on disk (vhpc) or from `stop` to `Migration status: completed` (QEMU).
//!    Then full against incremental checkpoints of a guest that keeps rewriting a few pages.
//! 2. Restore latency against guest memory size (256 MiB, 1 GiB, 4 GiB, 64 MiB touched):
//!    vhpc in-process (checkpoint read and checked, memory mapped, VM created, vCPUs
//!    restored and started) and as a new process (`vhpc restore --timeout 0`: start, restore,
//!    tear down); also with `--prefault` to show what the lazy mapping saves; QEMU from spawn
//!    to `VM status: running`.
//!
//! One discarded warm-up round per point: this machine runs its first large memory
//! operations several times slower (ENVIRONMENT.md §1).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use vhpc_api::{MemoryConfig, VmConfig};
use vhpc_testguest::abi;
use vhpc_vmm::snapshot::{self, CheckpointKind, RestoreOptions};
use vhpc_vmm::{Vm, VmIo};
use vm_memory::{Bytes, GuestAddress};

use crate::bench_measure::stats;
use crate::bench_qemu::Qemu;
use crate::cli::BenchSnapshotArgs;

const TOUCHED_MIB: [u64; 4] = [0, 64, 256, 768];
const SIZES_MIB: [u64; 3] = [256, 1024, 4096];
const RESTORE_TOUCHED_MIB: u64 = 64;
const WAIT: Duration = Duration::from_secs(120);

fn cmdline(touched_mib: u64) -> String {
    if touched_mib == 0 {
        "halt".into()
    } else {
        format!("dirty={touched_mib} stride=1 halt")
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

/// Boots the test guest and waits until it has written its pages and halted.
fn boot_halted(guest: &Path, memory_mib: u64, touched_mib: u64) -> anyhow::Result<Vm> {
    let config = VmConfig {
        vcpus: 1,
        memory: MemoryConfig {
            size_mib: memory_mib,
            hugepages: false,
            prefault: false,
        },
        kernel: guest.to_path_buf(),
        initramfs: None,
        cmdline: cmdline(touched_mib),
        disks: Vec::new(),
        nets: Vec::new(),
    };
    let mut vm = Vm::boot(&config, io())?;
    vm.start()?;
    let start = Instant::now();
    let phase = GuestAddress(abi::RESULTS_ADDR + 8 * abi::RES_PHASE);
    while vm.memory().read_obj::<u64>(phase)? != abi::PHASE_HALTED {
        if start.elapsed() > WAIT {
            bail!("the test guest did not halt within {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(vm)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn cell(v: Vec<f64>) -> String {
    let (m, lo, hi) = stats(v);
    format!("{m:.1} ({lo:.1}–{hi:.1})")
}

fn median(v: &[f64]) -> f64 {
    stats(v.to_vec()).0
}

/// Flushes the page cache's dirty data, so one measurement's writeback does not land in the
/// next one's time.
fn settle() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

/// Part 1: checkpoint time and size against memory touched.
fn checkpoint_rows(args: &BenchSnapshotArgs, guest: &Path, root: &Path) -> anyhow::Result<()> {
    println!(
        "\n### Checkpoint of a 1 GiB guest against memory touched (median (min–max) of {} runs)\n",
        args.runs
    );
    println!(
        "| touched | vhpc checkpoint ms (fsynced) | vhpc on disk (allocated / apparent) | QEMU stop → migrate-to-file completed ms (page cache) | same + fsync of the file ms | QEMU file | QEMU+fsync / vhpc |"
    );
    println!("|---|---|---|---|---|---|---|");
    for touched in TOUCHED_MIB {
        let vm = boot_halted(guest, 1024, touched)?;
        let dir = root.join("ckpt");
        let mut times = Vec::new();
        let mut allocated = 0;
        for round in 0..=args.runs {
            settle();
            let info = snapshot::checkpoint(&vm, &dir, CheckpointKind::Full)?;
            let meta = std::fs::metadata(dir.join("memory.raw"))?;
            allocated = meta.blocks() * 512;
            if round > 0 {
                times.push(ms(info.paused_for));
            }
        }
        drop(vm);
        std::fs::remove_dir_all(&dir)?;
        let (q_times, q_synced, q_size) = if args.no_qemu {
            (Vec::new(), Vec::new(), 0)
        } else {
            qemu_checkpoints(args, guest, root, touched)?
        };
        let opt = |v: Vec<f64>| if v.is_empty() { "—".into() } else { cell(v) };
        let ratio = if q_synced.is_empty() {
            "—".into()
        } else {
            format!("{:.2}×", median(&q_synced) / median(&times))
        };
        println!(
            "| {touched} MiB | {} | {:.1} / 1024 MiB | {} | {} | {:.1} MiB | {ratio} |",
            cell(times),
            allocated as f64 / 1048576.0,
            opt(q_times),
            opt(q_synced),
            q_size as f64 / 1048576.0
        );
    }
    Ok(())
}

fn qemu_checkpoints(
    args: &BenchSnapshotArgs,
    guest: &Path,
    root: &Path,
    touched: u64,
) -> anyhow::Result<(Vec<f64>, Vec<f64>, u64)> {
    let file = root.join("qemu.mig");
    let (mut times, mut synced) = (Vec::new(), Vec::new());
    for round in 0..=args.runs {
        let mut q = Qemu::boot(guest, 1024, &cmdline(touched), root)?;
        q.wait_console("halt\n", WAIT)?;
        settle();
        let t = q.save(&file, WAIT)?;
        let s = Instant::now();
        std::fs::File::open(&file)?.sync_all()?;
        let sync = s.elapsed();
        q.quit();
        if round > 0 {
            times.push(ms(t));
            synced.push(ms(t + sync));
        }
    }
    let size = std::fs::metadata(&file)?.len();
    std::fs::remove_file(&file)?;
    Ok((times, synced, size))
}

/// Part 1b: full against incremental checkpoints of a guest that touched 256 MiB and keeps
/// rewriting its 64 KiB count buffer.
fn incremental_rows(args: &BenchSnapshotArgs, guest: &Path, root: &Path) -> anyhow::Result<()> {
    let config = VmConfig {
        vcpus: 1,
        memory: MemoryConfig {
            size_mib: 1024,
            hugepages: false,
            prefault: false,
        },
        kernel: guest.to_path_buf(),
        initramfs: None,
        cmdline: "dirty=256 stride=1 count=0".into(),
        disks: Vec::new(),
        nets: Vec::new(),
    };
    let mut vm = Vm::boot(&config, io())?;
    vm.start()?;
    let start = Instant::now();
    let counter = GuestAddress(abi::RESULTS_ADDR + 8 * abi::RES_COUNTER);
    while vm.memory().read_obj::<u64>(counter)? == 0 {
        if start.elapsed() > WAIT {
            bail!("the test guest did not start counting within {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let (mut full, mut inc, mut pages) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..=args.runs {
        settle();
        let f = snapshot::checkpoint(&vm, &root.join("inc-base"), CheckpointKind::Full)?;
        std::thread::sleep(Duration::from_millis(100));
        settle();
        let dir = root.join(format!("inc-{round}"));
        let i = snapshot::checkpoint(&vm, &dir, CheckpointKind::Incremental)?;
        std::fs::remove_dir_all(&dir)?;
        if round > 0 {
            full.push(ms(f.paused_for));
            inc.push(ms(i.paused_for));
            pages.push(i.memory_pages as f64);
        }
    }
    std::fs::remove_dir_all(root.join("inc-base"))?;
    println!(
        "\n### Full vs incremental checkpoint: 1 GiB guest, 256 MiB touched, then counting (it rewrites a 64 KiB buffer); the incremental one 100 ms after the full one\n"
    );
    println!("| full checkpoint ms | incremental checkpoint ms | pages in the delta |");
    println!("|---|---|---|");
    println!("| {} | {} | {} |", cell(full), cell(inc), cell(pages));
    Ok(())
}

fn vhpc_process_restore(dir: &Path) -> anyhow::Result<Duration> {
    let exe = std::env::current_exe().context("cannot find the vhpc binary")?;
    let start = Instant::now();
    let out = Command::new(exe)
        .args(["restore", "--timeout", "0"])
        .arg(dir)
        .output()
        .context("cannot run vhpc restore")?;
    let took = start.elapsed();
    if out.status.code() != Some(crate::exit_codes::TIMED_OUT) {
        bail!(
            "vhpc restore failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(took)
}

fn in_process_restore(dir: &Path, prefault: bool) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let opts = RestoreOptions {
        prefault,
        ..Default::default()
    };
    let mut vm = snapshot::restore(dir, io(), opts)?;
    vm.start()?;
    let took = start.elapsed();
    drop(vm);
    Ok(took)
}

/// Part 2: restore latency against guest memory size.
fn restore_rows(args: &BenchSnapshotArgs, guest: &Path, root: &Path) -> anyhow::Result<()> {
    println!(
        "\n### Restore against guest memory size ({RESTORE_TOUCHED_MIB} MiB touched; median (min–max) of {} runs, ms)\n",
        args.runs
    );
    println!(
        "| guest memory | vhpc restore, in-process (lazy) | same with --prefault (eager) | `vhpc restore` process start → restored → exit | QEMU -incoming, spawn → running | QEMU / vhpc process |"
    );
    println!("|---|---|---|---|---|---|");
    for size in SIZES_MIB {
        let dir = root.join(format!("restore-{size}"));
        {
            let vm = boot_halted(guest, size, RESTORE_TOUCHED_MIB)?;
            snapshot::checkpoint(&vm, &dir, CheckpointKind::Full)?;
        }
        let qemu_file = root.join(format!("qemu-{size}.mig"));
        if !args.no_qemu {
            let mut q = Qemu::boot(guest, size, &cmdline(RESTORE_TOUCHED_MIB), root)?;
            q.wait_console("halt\n", WAIT)?;
            q.save(&qemu_file, WAIT)?;
            q.quit();
        }
        settle();
        let (mut lazy, mut eager, mut process, mut qemu) = (vec![], vec![], vec![], vec![]);
        for round in 0..=args.runs {
            let l = in_process_restore(&dir, false)?;
            let e = in_process_restore(&dir, true)?;
            let p = vhpc_process_restore(&dir)?;
            let q = if args.no_qemu {
                None
            } else {
                Some(Qemu::restore(guest, size, &qemu_file, root, WAIT)?)
            };
            if round > 0 {
                lazy.push(ms(l));
                eager.push(ms(e));
                process.push(ms(p));
                qemu.extend(q.map(ms));
            }
        }
        let ratio = if qemu.is_empty() {
            "—".into()
        } else {
            format!("{:.2}×", median(&qemu) / median(&process))
        };
        let q_cell = if qemu.is_empty() {
            "—".into()
        } else {
            cell(qemu)
        };
        println!(
            "| {size} MiB | {} | {} | {} | {q_cell} | {ratio} |",
            cell(lazy),
            cell(eager),
            cell(process)
        );
        std::fs::remove_dir_all(&dir)?;
        let _ = std::fs::remove_file(&qemu_file);
    }
    Ok(())
}

pub fn run(args: BenchSnapshotArgs) -> anyhow::Result<i32> {
    let root: PathBuf = args
        .dir
        .join(format!("vhpc-bench-snapshot-{}", std::process::id()));
    std::fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    let guest = root.join("testguest.elf");
    std::fs::write(&guest, vhpc_testguest::ELF)?;
    println!(
        "vhpc bench snapshot: test guest on this host's /dev/kvm, 1 vCPU, checkpoints in {}",
        args.dir.display()
    );
    let result = checkpoint_rows(&args, &guest, &root)
        .and_then(|()| incremental_rows(&args, &guest, &root))
        .and_then(|()| restore_rows(&args, &guest, &root));
    let _ = std::fs::remove_dir_all(&root);
    result.map(|()| 0)
}
