//! `vhpc bench migrate`: live migration of the Debian guest between two VMM processes in one
//! emulated host, vhpc (`vhpc vm receive` + `vhpc migrate`) against QEMU q35 (`-incoming
//! tcp:` + `migrate -d tcp:`), same kernel, initramfs, memory and downtime target, with the
//! guest idle and with the guest rewriting a tmpfs file over and over; interleaved runs.
//! Both VMMs report their own total time and downtime (from the source's stop to the
//! destination running). Run it as `vhpc lab run --with-qemu --memory 3072 -- vhpc bench
//! migrate`.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use vhpc_api::rest::{MigrateDone, MigrateEvent, MigrateRequest};
use vhpc_image::cache::Cache;

use crate::bench_measure::{stats, write_initramfs_with_command};
use crate::bench_qemu::Qemu;
use crate::cli::BenchMigrateArgs;
use crate::run_cmd::default_cmdline;
use crate::vm::http;
use crate::vm::state_dir::Runtime;

const QEMU: &str = "qemu-system-x86_64";
const BOOT_WAIT: Duration = Duration::from_secs(300);
const MIGRATE_WAIT: Duration = Duration::from_secs(600);

/// The guest's work while it migrates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Load {
    Idle,
    /// Rewrites a tmpfs file of this many MiB in a loop.
    Dirtying(u64),
}

impl Load {
    fn name(self) -> String {
        match self {
            Load::Idle => "idle".into(),
            Load::Dirtying(mib) => format!("rewriting {mib} MiB"),
        }
    }
    /// The guest shell command that makes the load (runs until the VM ends).
    fn command(self) -> String {
        match self {
            Load::Idle => "sleep 1000000".into(),
            Load::Dirtying(mib) => format!(
                "while :; do dd if=/dev/zero of=/dev/shm/d bs=1M count={mib} conv=notrunc 2>/dev/null; done"
            ),
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Sample {
    total_ms: f64,
    downtime_ms: f64,
}

fn vhpc(args: &[&str]) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("cannot find the vhpc binary")?;
    let out = Command::new(exe)
        .args(args)
        .output()
        .with_context(|| format!("cannot run vhpc {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "vhpc {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// One vhpc migration of a fresh VM under `load`.
fn vhpc_once(args: &BenchMigrateArgs, load: Load, port: u16) -> anyhow::Result<Sample> {
    let memory = args.memory.to_string();
    vhpc(&["vm", "start", "bench-src", "--memory", &memory])?;
    let result = (|| {
        let background = format!("{} > /dev/null 2>&1 &", load.command());
        vhpc(&["exec", "bench-src", "--", "sh", "-c", &background])?;
        std::thread::sleep(Duration::from_secs(2));
        let listen = format!("127.0.0.1:{port}");
        vhpc(&["vm", "receive", "bench-dst", "--listen", &listen])?;
        let done = migrate_api("bench-src", &listen, args.downtime_ms)?;
        Ok(Sample {
            total_ms: done.total_ms,
            downtime_ms: done.downtime_ms,
        })
    })();
    let _ = vhpc(&["vm", "stop", "bench-src", "--timeout", "5"]);
    let _ = vhpc(&["vm", "stop", "bench-dst", "--timeout", "5"]);
    result
}

/// `PUT /vm/migrate` on `name`'s API; the outcome.
fn migrate_api(name: &str, to: &str, downtime_ms: u64) -> anyhow::Result<MigrateDone> {
    let dir = Runtime::from_env().existing(name)?;
    let body = serde_json::to_vec(&MigrateRequest {
        to: to.into(),
        downtime_ms: Some(downtime_ms),
    })?;
    let resp = http::call(&dir.api_sock(), "PUT", "/vm/migrate", Some(&body), None)?;
    if resp.status != 200 {
        let status = resp.status;
        bail!(
            "PUT /vm/migrate answered {status}: {}",
            String::from_utf8_lossy(&resp.into_bytes()?)
        );
    }
    for line in resp.body.lines() {
        let event: MigrateEvent = serde_json::from_str(&line?)?;
        if let Some(done) = event.done {
            return Ok(done);
        }
        if let Some(e) = event.error {
            bail!("migration failed: {e}");
        }
    }
    bail!("the migration stream ended without an outcome")
}

struct QemuGuest {
    kernel: PathBuf,
    /// Per load: the initramfs with that load as the command.
    initramfs: Vec<(Load, PathBuf)>,
}

fn qemu_guest(loads: &[Load], dir: &Path) -> anyhow::Result<QemuGuest> {
    let cache = Cache::from_env();
    let mut initramfs = Vec::new();
    for (i, &load) in loads.iter().enumerate() {
        let argv = ["sh".to_string(), "-c".to_string(), load.command()];
        let path = dir.join(format!("bench-migrate-{i}.cpio"));
        write_initramfs_with_command(&cache, &argv, &path)?;
        initramfs.push((load, path));
    }
    Ok(QemuGuest {
        kernel: cache.kernel_path(),
        initramfs,
    })
}

/// One QEMU migration of a fresh guest running `load`.
fn qemu_once(
    args: &BenchMigrateArgs,
    guest: &QemuGuest,
    load: Load,
    port: u16,
    dir: &Path,
) -> anyhow::Result<Sample> {
    let initramfs = guest
        .initramfs
        .iter()
        .find(|(l, _)| *l == load)
        .map(|(_, p)| p.clone())
        .context("no initramfs for this load")?;
    let cmdline = default_cmdline(true);
    let mut src = Qemu::boot_linux(&guest.kernel, &initramfs, &cmdline, args.memory, dir, None)?;
    let dst = Qemu::boot_linux(
        &guest.kernel,
        &initramfs,
        &cmdline,
        args.memory,
        dir,
        Some(port),
    );
    let result = (|| {
        let dst = dst?;
        let sample = (|| {
            src.wait_console("Run /init as init process", BOOT_WAIT)?;
            std::thread::sleep(Duration::from_secs(4));
            let (total_ms, downtime_ms) = src.migrate_tcp(port, args.downtime_ms, MIGRATE_WAIT)?;
            Ok(Sample {
                total_ms,
                downtime_ms,
            })
        })();
        dst.quit();
        sample
    })();
    src.quit();
    result
}

pub fn run(args: BenchMigrateArgs) -> anyhow::Result<i32> {
    if !Path::new("/usr/bin").join(QEMU).exists() {
        bail!(
            "{QEMU} not found: run this inside `vhpc lab run --with-qemu --memory 3072 -- vhpc bench migrate`"
        );
    }
    let dir = std::env::temp_dir();
    let loads = [Load::Idle, Load::Dirtying(args.dirty_mib)];
    let guest = qemu_guest(&loads, &dir)?;
    let mut samples: Vec<(bool, Load, Sample)> = Vec::new();
    let mut failures = 0;
    let mut port = 7100;
    for round in 1..=args.runs {
        for load in loads {
            for is_vhpc in [true, false] {
                port += 1;
                let who = if is_vhpc { "vhpc" } else { "qemu q35" };
                let result = if is_vhpc {
                    vhpc_once(&args, load, port)
                } else {
                    qemu_once(&args, &guest, load, port, &dir)
                };
                match result {
                    Ok(s) => {
                        eprintln!(
                            "vhpc bench migrate: round {round}/{}: {who:<9} {:<16} total {:>8.0} ms, downtime {:>7.1} ms",
                            args.runs,
                            load.name(),
                            s.total_ms,
                            s.downtime_ms
                        );
                        samples.push((is_vhpc, load, s));
                    }
                    Err(e) => {
                        eprintln!(
                            "vhpc bench migrate: round {round}/{}: {who} {}: {e:#}",
                            args.runs,
                            load.name()
                        );
                        failures += 1;
                    }
                }
            }
        }
    }
    for (_, path) in &guest.initramfs {
        let _ = std::fs::remove_file(path);
    }
    print_table(&samples, &loads, &args);
    Ok(if failures == 0 { 0 } else { 1 })
}

fn print_table(samples: &[(bool, Load, Sample)], loads: &[Load], args: &BenchMigrateArgs) {
    let median = |v: bool, load: Load, f: fn(&Sample) -> f64| {
        let xs: Vec<f64> = samples
            .iter()
            .filter(|(w, l, _)| *w == v && *l == load)
            .map(|(_, _, s)| f(s))
            .collect();
        if xs.is_empty() { f64::NAN } else { stats(xs).0 }
    };
    println!(
        "medians of {} interleaved runs, {} MiB guests, downtime target {} ms\n",
        args.runs, args.memory, args.downtime_ms
    );
    println!(
        "| guest | vhpc total (ms) | QEMU total (ms) | vhpc / QEMU | vhpc downtime (ms) | QEMU downtime (ms) | vhpc / QEMU |"
    );
    println!("|---|---|---|---|---|---|---|");
    for &load in loads {
        let (vt, qt) = (
            median(true, load, |s| s.total_ms),
            median(false, load, |s| s.total_ms),
        );
        let (vd, qd) = (
            median(true, load, |s| s.downtime_ms),
            median(false, load, |s| s.downtime_ms),
        );
        println!(
            "| {} | {vt:.0} | {qt:.0} | {:.2}× | {vd:.1} | {qd:.1} | {:.2}× |",
            load.name(),
            vt / qt,
            vd / qd
        );
    }
}

#[cfg(test)]
mod tests {
    use crate::bench_qemu::migrate_ms;

    #[test]
    fn qemu_migration_times_are_read_in_both_formats() {
        let old =
            "Migration status: completed\ntotal time: 1234 ms\ndowntime: 56 ms\nsetup: 3 ms\n";
        assert_eq!(migrate_ms(old, "total time:", "total"), Some(1234.0));
        assert_eq!(migrate_ms(old, "downtime:", "down"), Some(56.0));
        let new = "Status: completed\nTime (ms): total=2345, setup=4, down=67\n";
        assert_eq!(migrate_ms(new, "total time:", "total"), Some(2345.0));
        assert_eq!(migrate_ms(new, "downtime:", "down"), Some(67.0));
        assert_eq!(migrate_ms("Status: active", "downtime:", "down"), None);
    }
}
