//! `vhpc bench boot`: boot-to-/init time and memory of `vhpc run` against QEMU (microvm and
//! q35) booting the same kernel, initramfs and command line, interleaved, on this host's KVM.
//!
//! Meant to run inside an emulated host (`vhpc lab run --with-qemu -- vhpc bench boot`), where
//! only the ratios mean anything: the emulator slows everything down alike.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use vhpc_image::cache::Cache;

use crate::bench_measure::{Reap, reap, stats, vmm_rss_kib, write_initramfs_with_command};
use crate::bench_qemu::QEMU_BARE;
use crate::cli::BenchBootArgs;
use crate::run_cmd::default_cmdline;

/// The kernel's line when it starts the initramfs' /init: the end of "boot" for every VMM.
const INIT_LINE: &str = "Run /init as init process";
const QEMU: &str = "qemu-system-x86_64";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Contender {
    Vhpc,
    QemuMicrovm,
    QemuMicrovmRtc,
    QemuQ35,
}

impl Contender {
    const ALL: [Contender; 4] = [
        Contender::Vhpc,
        Contender::QemuMicrovm,
        Contender::QemuMicrovmRtc,
        Contender::QemuQ35,
    ];

    fn name(self) -> &'static str {
        match self {
            Contender::Vhpc => "vhpc run",
            Contender::QemuMicrovm => "qemu -M microvm",
            Contender::QemuMicrovmRtc => "qemu -M microvm,rtc=on",
            Contender::QemuQ35 => "qemu -M q35",
        }
    }
}

/// What the benchmark boots, identical for every contender.
struct Guest {
    kernel: PathBuf,
    /// The default initramfs with the command archive (`true`) appended.
    initramfs: PathBuf,
    cmdline: String,
    memory_mib: u64,
}

/// One boot's measurements.
#[derive(Clone, Copy, Debug)]
struct Sample {
    to_init: Duration,
    /// RSS of everything but guest RAM, sampled when /init starts.
    vmm_rss_kib: u64,
    /// Peak RSS of the process (guest pages it touched included), from wait4.
    peak_rss_kib: u64,
}

fn command(c: Contender, g: &Guest, vhpc: &Path) -> Command {
    if c == Contender::Vhpc {
        let mut cmd = Command::new(vhpc);
        cmd.args(["run", "--console", "--timeout", "300", "--memory"])
            .arg(g.memory_mib.to_string())
            .arg("--initrd")
            .arg(&g.initramfs)
            .args(["--cmdline", &g.cmdline, "--", "true"])
            // The console goes to stderr: make it the pipe we read.
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // Our own archive is appended too; the kernel takes the last /vhpc/argv, the same one.
        return cmd;
    }
    let machine = match c {
        Contender::QemuMicrovm => "microvm",
        Contender::QemuMicrovmRtc => "microvm,rtc=on",
        _ => "q35",
    };
    let mut cmd = Command::new(QEMU);
    cmd.args([
        "-accel", "kvm", "-cpu", "host", "-M", machine, "-smp", "1", "-m",
    ])
    .arg(g.memory_mib.to_string())
    .args(QEMU_BARE)
    .arg("-no-reboot")
    .arg("-kernel")
    .arg(&g.kernel)
    .arg("-initrd")
    .arg(&g.initramfs)
    .args(["-append", &g.cmdline, "-serial", "stdio", "-serial", "null"])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    cmd
}

fn boot_once(c: Contender, g: &Guest, vhpc: &Path) -> anyhow::Result<Sample> {
    let start = Instant::now();
    let mut child = command(c, g, vhpc)
        .spawn()
        .with_context(|| format!("cannot start {}", c.name()))?;
    let pid = child.id();
    let console: Box<dyn Read + Send> = match (child.stdout.take(), child.stderr.take()) {
        (Some(out), _) => Box::new(out),
        (None, Some(err)) => Box::new(err),
        (None, None) => bail!("no console pipe"),
    };
    let (tx, rx) = mpsc::channel();
    let guest_mib = g.memory_mib;
    let reader = std::thread::spawn(move || {
        let mut seen = false;
        for line in BufReader::new(console).lines() {
            let Ok(line) = line else { break };
            if !seen && line.contains(INIT_LINE) {
                seen = true;
                let _ = tx.send((start.elapsed(), vmm_rss_kib(pid, guest_mib).unwrap_or(0)));
            }
        }
    });
    let seen = rx.recv_timeout(Duration::from_secs(300));
    // After /init the guest runs `true` and powers off; a VMM that does not exit is killed.
    let grace = if seen.is_ok() {
        Duration::from_secs(120)
    } else {
        Duration::ZERO
    };
    let peak_rss_kib = reap(pid, Reap::KillAfter(Instant::now() + grace))?.peak_rss_kib;
    let _ = reader.join();
    drop(child); // reaped by wait4 above; dropping a Child does not wait
    let (to_init, vmm_rss_kib) =
        seen.map_err(|_| anyhow::anyhow!("{} never reached /init", c.name()))?;
    Ok(Sample {
        to_init,
        vmm_rss_kib,
        peak_rss_kib,
    })
}

fn median(v: Vec<f64>) -> f64 {
    stats(v).0
}

fn prepare_guest(args: &BenchBootArgs, dir: &Path) -> anyhow::Result<Guest> {
    let cache = Cache::from_env();
    let path = dir.join("bench-initramfs.cpio");
    write_initramfs_with_command(&cache, &["true".to_string()], &path)?;
    Ok(Guest {
        kernel: cache.kernel_path(),
        initramfs: path,
        cmdline: default_cmdline(true),
        memory_mib: args.memory,
    })
}

pub fn run(args: BenchBootArgs) -> anyhow::Result<i32> {
    if !Path::new("/usr/bin").join(QEMU).exists() {
        bail!("{QEMU} not found: run this inside `vhpc lab run --with-qemu -- vhpc bench boot`");
    }
    let vhpc = std::env::current_exe().context("cannot find the vhpc binary")?;
    let dir = std::env::temp_dir();
    let guest = prepare_guest(&args, &dir)?;
    let mut samples: Vec<(Contender, Sample)> = Vec::new();
    let mut failures: Vec<Contender> = Vec::new();
    // Round 0 warms caches up and is discarded; the contenders take turns in every round.
    for round in 0..=args.runs {
        for c in Contender::ALL {
            // A boot that fails (never reaches /init) is counted and reported, not fatal: one
            // stuck VMM must not throw away the other runs.
            let s = match boot_once(c, &guest, &vhpc) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("vhpc bench: round {round}/{}: {e:#}", args.runs);
                    if round > 0 {
                        failures.push(c);
                    }
                    continue;
                }
            };
            eprintln!(
                "vhpc bench: round {round}/{}: {:<24} /init after {:>7.1} ms, VMM RSS {:>6} KiB, peak RSS {:>7} KiB",
                args.runs,
                c.name(),
                s.to_init.as_secs_f64() * 1e3,
                s.vmm_rss_kib,
                s.peak_rss_kib
            );
            if round > 0 {
                samples.push((c, s));
            }
        }
    }
    let _ = std::fs::remove_file(&guest.initramfs);
    print_table(&samples, &failures, args.runs);
    Ok(if failures.is_empty() { 0 } else { 1 })
}

fn print_table(samples: &[(Contender, Sample)], failures: &[Contender], runs: u32) {
    let of = |c: Contender, f: fn(&Sample) -> f64| {
        median(
            samples
                .iter()
                .filter(|(k, _)| *k == c)
                .map(|(_, s)| f(s))
                .collect(),
        )
    };
    let to_init = |s: &Sample| s.to_init.as_secs_f64() * 1e3;
    let vmm_rss = |s: &Sample| s.vmm_rss_kib as f64 / 1024.0;
    let peak = |s: &Sample| s.peak_rss_kib as f64 / 1024.0;
    let (q35_t, q35_m) = (
        of(Contender::QemuQ35, to_init),
        of(Contender::QemuQ35, vmm_rss),
    );
    println!("medians of {runs} interleaved boots (after one warm-up round)\n");
    println!(
        "| VMM | start → /init (ms) | vs q35 | VMM-only RSS at /init (MiB) | vs q35 | peak RSS incl. guest (MiB) | failed boots |"
    );
    println!("|---|---|---|---|---|---|---|");
    for c in Contender::ALL {
        let (t, m, p) = (of(c, to_init), of(c, vmm_rss), of(c, peak));
        let failed = failures.iter().filter(|&&f| f == c).count();
        println!(
            "| {} | {t:.0} | {:.2}× | {m:.1} | {:.2}× | {p:.0} | {failed} |",
            c.name(),
            t / q35_t,
            m / q35_m
        );
    }
}
