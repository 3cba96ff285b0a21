//! `vhpc bench direct`: the VMM's own costs on this host's /dev/kvm, side by side with QEMU
//! (`-accel kvm -M microvm`), both booting vhpc's test guest (the same ELF, PVH entry):
//!
//! - start → first line: from spawning the VMM process to the guest's first serial line;
//! - VMM-only RSS: the process's RSS minus its guest-memory mapping, read when the guest has
//!   printed its line and halted (`halt`: it sits in `hlt`, the VMM is idle);
//! - VM lifecycle: spawn → boot → the guest exits through the debug-exit port → the process is
//!   reaped; wall time and CPU time (user + system) per VM, so VMs per second per core;
//! - for vhpc also the in-process lifecycle through the `Vm` API (create, boot, exit, tear
//!   down), the cost without process start-up.
//!
//! Every measurement is interleaved (vhpc and QEMU take turns, the order alternating by round)
//! after one discarded warm-up round: this machine runs its first large memory operations
//! several times slower (ENVIRONMENT.md §1).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use vhpc_api::{MemoryConfig, VmConfig};
use vhpc_vmm::{Vm, VmIo, VmOutcome};

use crate::bench_measure::{Reap, reap, stats, vmm_rss_kib};
use crate::bench_qemu::QEMU_BARE;
use crate::cli::BenchDirectArgs;

const QEMU: &str = "qemu-system-x86_64";
const TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Contender {
    Vhpc,
    QemuMicrovm,
}

impl Contender {
    fn name(self) -> &'static str {
        match self {
            Contender::Vhpc => "vhpc run",
            Contender::QemuMicrovm => "qemu -M microvm",
        }
    }

    /// Both orders in turn, so neither always runs right after the other.
    fn order(round: u32) -> [Contender; 2] {
        if round.is_multiple_of(2) {
            [Contender::Vhpc, Contender::QemuMicrovm]
        } else {
            [Contender::QemuMicrovm, Contender::Vhpc]
        }
    }
}

struct Setup {
    vhpc: PathBuf,
    guest: PathBuf,
    memory_mib: u64,
}

fn command(c: Contender, s: &Setup, cmdline: &str) -> Command {
    match c {
        Contender::Vhpc => {
            let mut cmd = Command::new(&s.vhpc);
            cmd.args(["run", "--console", "--timeout", "60", "--memory"])
                .arg(s.memory_mib.to_string())
                .arg("--kernel")
                .arg(&s.guest)
                .args(["--cmdline", cmdline, "--", "true"])
                // The console goes to stderr: that is the pipe to read.
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            cmd
        }
        Contender::QemuMicrovm => {
            let mut cmd = Command::new(QEMU);
            // QEMU's default CPU model: `-cpu host` aborts on kvm_pvm (an MSR it sets is refused).
            cmd.args(["-accel", "kvm", "-M", "microvm", "-smp", "1", "-m"])
                .arg(s.memory_mib.to_string())
                .args(QEMU_BARE)
                .args(["-no-reboot", "-serial", "stdio", "-kernel"])
                .arg(&s.guest)
                .args(["-append", cmdline])
                .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null());
            cmd
        }
    }
}

/// RSS of the process minus the RSS of its guest-memory mapping (the mappings at least as
/// large as guest RAM), in KiB.
/// Spawns the contender, returns when its console shows `until` (or fails after TIMEOUT):
/// (time of the first guest line, pid, the child).
fn spawn_until(
    c: Contender,
    s: &Setup,
    cmdline: &str,
    until: &'static str,
) -> anyhow::Result<(Duration, std::process::Child)> {
    let start = Instant::now();
    let mut child = command(c, s, cmdline)
        .spawn()
        .with_context(|| format!("cannot start {}", c.name()))?;
    let pipe: Box<dyn std::io::Read + Send> = match (child.stdout.take(), child.stderr.take()) {
        (Some(out), _) => Box::new(out),
        (None, Some(err)) => Box::new(err),
        (None, None) => bail!("no console pipe"),
    };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut first = None;
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if first.is_none() && line.contains(vhpc_testguest::FIRST_LINE) {
                first = Some(start.elapsed());
            }
            if let Some(t) = first
                && line.contains(until)
            {
                let _ = tx.send(t);
            }
        }
    });
    match rx.recv_timeout(TIMEOUT) {
        Ok(t) => Ok((t, child)),
        Err(_) => {
            let _ = reap(child.id(), Reap::Kill);
            bail!("{} did not print {until:?} within {TIMEOUT:?}", c.name())
        }
    }
}

struct BootSample {
    first_line: Duration,
    vmm_rss_kib: u64,
}

fn boot_sample(c: Contender, s: &Setup) -> anyhow::Result<BootSample> {
    let (first_line, child) = spawn_until(c, s, "halt", "halt")?;
    let rss = vmm_rss_kib(child.id(), s.memory_mib);
    reap(child.id(), Reap::Kill)?;
    Ok(BootSample {
        first_line,
        vmm_rss_kib: rss?,
    })
}

struct LifecycleSample {
    wall: Duration,
    cpu: Duration,
}

fn lifecycle_sample(c: Contender, s: &Setup) -> anyhow::Result<LifecycleSample> {
    let start = Instant::now();
    let (_, child) = spawn_until(c, s, "exit=0", vhpc_testguest::FIRST_LINE)?;
    let cpu = reap(child.id(), Reap::Wait)?.cpu;
    Ok(LifecycleSample {
        wall: start.elapsed(),
        cpu,
    })
}

/// One VM through the `Vm` API in this process: create, boot, the guest exits, tear down.
fn in_process_lifecycle(s: &Setup) -> anyhow::Result<Duration> {
    let config = VmConfig {
        vcpus: 1,
        memory: MemoryConfig {
            size_mib: s.memory_mib,
            hugepages: false,
            prefault: false,
        },
        kernel: s.guest.clone(),
        initramfs: None,
        cmdline: "exit=0".into(),
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
    let start = Instant::now();
    let mut vm = Vm::boot(&config, io)?;
    vm.start()?;
    let outcome = vm.wait(Some(TIMEOUT));
    vm.shutdown();
    let took = start.elapsed();
    if outcome != VmOutcome::Exit(0) {
        bail!("in-process VM ended with {outcome:?}");
    }
    Ok(took)
}

/// The test guest embedded in this binary, as a file QEMU can read too.
fn write_guest() -> anyhow::Result<PathBuf> {
    let path = std::env::temp_dir().join(format!("vhpc-testguest-{}.elf", std::process::id()));
    std::fs::write(&path, vhpc_testguest::ELF)
        .with_context(|| format!("cannot write the test guest to {}", path.display()))?;
    Ok(path)
}

pub fn run(args: BenchDirectArgs) -> anyhow::Result<i32> {
    if Command::new(QEMU).arg("--version").output().is_err() {
        bail!("{QEMU} not found: install qemu-system-x86 (bash scripts/setup.sh does)");
    }
    let setup = Setup {
        vhpc: std::env::current_exe().context("cannot find the vhpc binary")?,
        guest: write_guest()?,
        memory_mib: args.memory,
    };
    let result = measure(&args, &setup);
    let _ = std::fs::remove_file(&setup.guest);
    result
}

fn measure(args: &BenchDirectArgs, setup: &Setup) -> anyhow::Result<i32> {
    let mut boots: Vec<(Contender, BootSample)> = Vec::new();
    let mut lives: Vec<(Contender, LifecycleSample)> = Vec::new();
    let mut in_process = Vec::new();
    // Round 0 warms up and is discarded.
    for round in 0..=args.runs {
        for c in Contender::order(round) {
            let b = boot_sample(c, setup)?;
            let l = lifecycle_sample(c, setup)?;
            eprintln!(
                "vhpc bench direct: round {round}/{}: {:<16} first line {:>6.2} ms, VMM RSS {:>6} KiB, lifecycle {:>6.2} ms wall {:>6.2} ms CPU",
                args.runs,
                c.name(),
                ms(b.first_line),
                b.vmm_rss_kib,
                ms(l.wall),
                ms(l.cpu)
            );
            if round > 0 {
                boots.push((c, b));
                lives.push((c, l));
            }
        }
        let t = in_process_lifecycle(setup)?;
        if round > 0 {
            in_process.push(ms(t));
        }
    }
    print_results(args, &boots, &lives, in_process);
    Ok(0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn print_results(
    args: &BenchDirectArgs,
    boots: &[(Contender, BootSample)],
    lives: &[(Contender, LifecycleSample)],
    in_process: Vec<f64>,
) {
    let of_boot = |c, f: fn(&BootSample) -> f64| {
        stats(
            boots
                .iter()
                .filter(|(k, _)| *k == c)
                .map(|(_, s)| f(s))
                .collect(),
        )
    };
    let of_life = |c, f: fn(&LifecycleSample) -> f64| {
        stats(
            lives
                .iter()
                .filter(|(k, _)| *k == c)
                .map(|(_, s)| f(s))
                .collect(),
        )
    };
    type Stats = (f64, f64, f64);
    let both = |f: &dyn Fn(Contender) -> Stats| (f(Contender::Vhpc), f(Contender::QemuMicrovm));
    let rows: [(&str, (Stats, Stats), usize); 4] = [
        (
            "start → first line (ms)",
            both(&|c| of_boot(c, |s| ms(s.first_line))),
            2,
        ),
        (
            "VMM-only RSS (MiB)",
            both(&|c| of_boot(c, |s| s.vmm_rss_kib as f64 / 1024.0)),
            1,
        ),
        (
            "VM lifecycle, wall (ms)",
            both(&|c| of_life(c, |s| ms(s.wall))),
            2,
        ),
        (
            "VM lifecycle, CPU (ms)",
            both(&|c| of_life(c, |s| ms(s.cpu))),
            2,
        ),
    ];
    println!(
        "{} interleaved runs each after one warm-up round; 1 vCPU, {} MiB; median (min–max)\n",
        args.runs, args.memory
    );
    println!("| measure | vhpc | QEMU microvm | QEMU / vhpc |");
    println!("|---|---|---|---|");
    for (name, (v, q), digits) in rows {
        let cell = |(m, lo, hi): Stats| format!("{m:.digits$} ({lo:.digits$}–{hi:.digits$})");
        println!("| {name} | {} | {} | {:.1}× |", cell(v), cell(q), q.0 / v.0);
    }
    let (v_cpu, q_cpu) = (
        of_life(Contender::Vhpc, |s| ms(s.cpu)).0,
        of_life(Contender::QemuMicrovm, |s| ms(s.cpu)).0,
    );
    println!(
        "| VMs per second per core (1000 / median CPU ms) | {:.0} | {:.0} | {:.2}× |",
        1000.0 / v_cpu,
        1000.0 / q_cpu,
        v_cpu / q_cpu
    );
    let (m, lo, hi) = stats(in_process);
    println!(
        "\nvhpc in-process VM lifecycle (Vm::boot → guest exit → teardown, no process start): {m:.2} ms ({lo:.2}–{hi:.2}), {:.0} VMs/s on one thread",
        1000.0 / m
    );
}
