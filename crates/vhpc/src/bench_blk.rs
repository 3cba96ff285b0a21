//! `vhpc bench blk`: virtio-blk throughput seen from inside the guest, vhpc against QEMU's
//! virtio-blk-pci, same kernel, initramfs, disk file and measuring code (`vhpc guest-io`, run
//! in the guest), interleaved boots in one emulated host:
//! `vhpc lab run --with-qemu --memory 3072 -- vhpc bench blk`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use vhpc_guest::protocol::{Frame, FrameDecoder};
use vhpc_image::cache::Cache;

use crate::bench_measure::{Reap, reap, stats, write_initramfs_with_command};
use crate::bench_qemu::QEMU_BARE;
use crate::cli::BenchBlkArgs;
use crate::guest_io::{IoResult, parse_result};
use crate::run_cmd::default_cmdline;

const QEMU: &str = "qemu-system-x86_64";
const PATTERNS: [&str; 4] = ["seq-read", "seq-write", "rand-read", "rand-write"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Contender {
    Vhpc,
    Qemu,
}

impl Contender {
    fn name(self) -> &'static str {
        match self {
            Contender::Vhpc => "vhpc",
            Contender::Qemu => "qemu q35 virtio-blk-pci",
        }
    }
}

struct Setup {
    kernel: PathBuf,
    initramfs: PathBuf,
    disk: PathBuf,
    vhpc: PathBuf,
    argv: Vec<String>,
    cmdline: String,
    memory_mib: u64,
    dir: PathBuf,
}

/// The guest command: sequential tests with 1 MiB requests, random ones with 4 KiB.
fn guest_command(args: &BenchBlkArgs) -> Vec<String> {
    let io = |bs: u32, patterns: &str| {
        format!(
            "/init guest-io --dev /dev/vda --size-mib {} --seconds {} --bs {bs} {patterns}",
            args.disk_mib, args.seconds
        )
    };
    let script = format!(
        "{} && {}",
        io(1 << 20, "seq-read seq-write"),
        io(4096, "rand-read rand-write")
    );
    vec!["sh".into(), "-c".into(), script]
}

fn prepare(args: &BenchBlkArgs) -> anyhow::Result<Setup> {
    let cache = Cache::from_env();
    let dir = args.dir.clone();
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let initramfs_path = dir.join("bench-blk-initramfs.cpio");
    write_initramfs_with_command(&cache, &guest_command(args), &initramfs_path)?;
    // Every byte written (no sparse holes): reads then come from the file, not from zeroes.
    let disk = dir.join("bench-blk-disk.img");
    let chunk: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    let mut data = Vec::with_capacity((args.disk_mib as usize) << 20);
    (0..args.disk_mib).for_each(|_| data.extend_from_slice(&chunk));
    std::fs::write(&disk, data).with_context(|| format!("cannot write {}", disk.display()))?;
    Ok(Setup {
        kernel: cache.kernel_path(),
        initramfs: initramfs_path,
        disk,
        vhpc: std::env::current_exe().context("cannot find the vhpc binary")?,
        argv: guest_command(args),
        cmdline: default_cmdline(false),
        memory_mib: args.memory,
        dir,
    })
}

fn command(c: Contender, s: &Setup, argv: &[String], agent_file: &Path) -> Command {
    match c {
        Contender::Vhpc => {
            let mut cmd = Command::new(&s.vhpc);
            cmd.args(["run", "--timeout", "600", "--memory"])
                .arg(s.memory_mib.to_string())
                .arg("--initrd")
                .arg(&s.initramfs)
                .arg("--disk")
                .arg(&s.disk)
                .args(["--cmdline", &s.cmdline, "--"])
                // vhpc appends its own archive for the command after --initrd's: the same one.
                .args(argv)
                .stdout(Stdio::piped());
            cmd
        }
        Contender::Qemu => {
            let mut cmd = Command::new(QEMU);
            cmd.args([
                "-accel", "kvm", "-cpu", "host", "-M", "q35", "-smp", "1", "-m",
            ])
            .arg(s.memory_mib.to_string())
            .args(QEMU_BARE)
            .arg("-no-reboot")
            .arg("-kernel")
            .arg(&s.kernel)
            .arg("-initrd")
            .arg(&s.initramfs)
            .args(["-append", &s.cmdline])
            .args(["-serial", "null", "-serial"])
            .arg(format!("file:{}", agent_file.display()))
            .arg("-drive")
            .arg(format!(
                "file={},if=none,id=d0,format=raw,cache=writeback",
                s.disk.display()
            ))
            .args(["-device", "virtio-blk-pci,drive=d0"])
            .stdout(Stdio::null());
            cmd
        }
    }
}

/// The command's stdout from the agent's one-shot frames.
fn stdout_of_frames(bytes: &[u8]) -> anyhow::Result<String> {
    let mut out = Vec::new();
    for frame in FrameDecoder::new()
        .push(bytes)
        .context("QEMU guest's agent output")?
    {
        if let Frame::Stdout(data) = frame {
            out.extend(data);
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

fn boot_once(c: Contender, s: &Setup) -> anyhow::Result<Vec<(String, IoResult)>> {
    let agent_file = s.dir.join("bench-blk-agent.bin");
    let _ = std::fs::remove_file(&agent_file);
    let mut child = command(c, s, &s.argv, &agent_file)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {}", c.name()))?;
    let stdout = child.stdout.take();
    let pid = child.id();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut out) = stdout {
            let _ = std::io::Read::read_to_string(&mut out, &mut text);
        }
        text
    });
    reap(
        pid,
        Reap::KillAfter(Instant::now() + Duration::from_secs(900)),
    )?;
    drop(child);
    let text = match c {
        Contender::Vhpc => reader.join().unwrap_or_default(),
        Contender::Qemu => {
            let _ = reader.join();
            let bytes = std::fs::read(&agent_file).unwrap_or_default();
            stdout_of_frames(&bytes)?
        }
    };
    let results: Vec<_> = text.lines().filter_map(parse_result).collect();
    if results.len() != PATTERNS.len() {
        bail!(
            "{}: expected {} results from the guest, got: {text:?}",
            c.name(),
            PATTERNS.len()
        );
    }
    Ok(results)
}

pub fn run(args: BenchBlkArgs) -> anyhow::Result<i32> {
    if !Path::new("/usr/bin").join(QEMU).exists() {
        bail!("{QEMU} not found: run this inside `vhpc lab run --with-qemu -- vhpc bench blk`");
    }
    let setup = prepare(&args)?;
    let mut samples: Vec<(Contender, String, IoResult)> = Vec::new();
    let mut failures = 0;
    for round in 1..=args.runs {
        for c in [Contender::Vhpc, Contender::Qemu] {
            match boot_once(c, &setup) {
                Ok(results) => {
                    for (pattern, r) in results {
                        eprintln!(
                            "vhpc bench blk: round {round}/{}: {:<24} {pattern:<10} {:>8.1} MiB/s {:>8.0} IOPS",
                            args.runs,
                            c.name(),
                            r.mib_per_s(),
                            r.iops()
                        );
                        samples.push((c, pattern, r));
                    }
                }
                Err(e) => {
                    eprintln!("vhpc bench blk: round {round}/{}: {e:#}", args.runs);
                    failures += 1;
                }
            }
        }
    }
    let _ = std::fs::remove_file(&setup.disk);
    let _ = std::fs::remove_file(&setup.initramfs);
    print_table(&samples, &args);
    if failures > 0 {
        eprintln!("vhpc bench blk: {failures} boot(s) failed (see above)");
    }
    Ok(if failures == 0 { 0 } else { 1 })
}

fn print_table(samples: &[(Contender, String, IoResult)], args: &BenchBlkArgs) {
    let median = |c: Contender, pattern: &str, f: fn(&IoResult) -> f64| {
        let v: Vec<f64> = samples
            .iter()
            .filter(|(k, p, _)| *k == c && p == pattern)
            .map(|(_, _, r)| f(r))
            .collect();
        if v.is_empty() { f64::NAN } else { stats(v).0 }
    };
    println!(
        "medians of {} interleaved boots, {} s per test, {} MiB disk, queue depth 1, O_DIRECT in the guest\n",
        args.runs, args.seconds, args.disk_mib
    );
    println!("| test | vhpc MiB/s | QEMU MiB/s | vhpc / QEMU | vhpc IOPS | QEMU IOPS |");
    println!("|---|---|---|---|---|---|");
    for p in PATTERNS {
        let (v, q) = (
            median(Contender::Vhpc, p, IoResult::mib_per_s),
            median(Contender::Qemu, p, IoResult::mib_per_s),
        );
        println!(
            "| {p} | {v:.1} | {q:.1} | {:.2}× | {:.0} | {:.0} |",
            v / q,
            median(Contender::Vhpc, p, IoResult::iops),
            median(Contender::Qemu, p, IoResult::iops)
        );
    }
}
