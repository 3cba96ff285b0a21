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
                .args(["-nodefaults", "-no-user-config", "-display", "none"])
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
fn vmm_rss_kib(pid: u32, guest_mib: u64) -> anyhow::Result<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .with_context(|| format!("cannot read /proc/{pid}/smaps"))?;
    Ok(vmm_rss_from_smaps(&smaps, guest_mib * 1024))
}

fn vmm_rss_from_smaps(smaps: &str, guest_kib: u64) -> u64 {
    let (mut total, mut size) = (0, 0);
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        match (
            words.next(),
            words.next().and_then(|v| v.parse::<u64>().ok()),
        ) {
            (Some("Size:"), Some(v)) => size = v,
            (Some("Rss:"), Some(v)) if size < guest_kib => total += v,
            _ => {}
        }
    }
    total
}

/// Kills (if asked) and reaps our child `pid`; returns its CPU time (user + system).
fn reap(pid: u32, kill: bool) -> anyhow::Result<Duration> {
    if kill {
        // SAFETY: kill(2) of our own child, which is not reaped yet.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
    let mut status = 0;
    // SAFETY: all-zero is a valid rusage; wait4 fills it in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own unreaped child; both out-pointers are valid for the call.
    let r = unsafe { libc::wait4(pid as libc::pid_t, &mut status, 0, &mut usage) };
    if r < 0 {
        bail!("wait4 failed: {}", std::io::Error::last_os_error());
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    Ok(tv(usage.ru_utime) + tv(usage.ru_stime))
}

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
            let _ = reap(child.id(), true);
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
    reap(child.id(), true)?;
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
    let cpu = reap(child.id(), false)?;
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
    };
    let io = VmIo {
        console: Box::new(std::io::sink()),
        agent: Box::new(std::io::sink()),
        extra_initramfs: Vec::new(),
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

/// (median, min, max).
fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (median, v[0], v[n - 1])
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_are_median_min_max() {
        assert_eq!(stats(vec![3.0, 1.0, 2.0]), (2.0, 1.0, 3.0));
        assert_eq!(stats(vec![4.0, 1.0, 3.0, 2.0]), (2.5, 1.0, 4.0));
        assert!(stats(vec![]).0.is_nan());
    }

    #[test]
    fn guest_memory_is_left_out_of_vmm_rss() {
        let smaps = "55d0-55e0 r-xp 0 00:00 0 /vhpc\nSize: 64 kB\nRss: 60 kB\n\
                     7f00-7f10 rw-p 0 00:00 0\nSize: 262144 kB\nRss: 1024 kB\n\
                     7f20-7f30 rw-p 0 00:00 0\nSize: 132 kB\nRss: 12 kB\n";
        assert_eq!(vmm_rss_from_smaps(smaps, 256 * 1024), 72);
    }
}
