//! `vhpc bench migrate`: live migration of the Debian guest between two VMM processes in one
//! emulated host, vhpc (`vhpc vm receive` + `vhpc migrate`) against QEMU q35 (`-incoming
//! tcp:` + `migrate -d tcp:`), same kernel, initramfs, memory and downtime target, with the
//! guest idle and with the guest rewriting a tmpfs file over and over; interleaved runs.
//! Both VMMs report their own total time and downtime (from the source's stop to the
//! destination running). The guest's own view of the pause is measured from outside: the
//! guest runs `vhpc guest-ticker`, which sends a numbered UDP datagram every 20 ms over its
//! virtio-net NIC (on a bridge) to this process, which timestamps their arrival; the longest
//! gap between two arrivals around the migration is the downtime the guest's work saw (the
//! guest's clock cannot show it: its kvmclock is restored from the source's). The longest gap
//! in the seconds before the migration is reported too, as the ticker's baseline jitter.
//! Run it as `vhpc lab run --with-qemu --memory 3072 -- vhpc bench migrate`.

use std::io::BufRead;
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use vhpc_api::rest::{MigrateDone, MigrateEvent, MigrateRequest};
use vhpc_image::cache::Cache;

use crate::bench_bridge::BenchBridge;
use crate::bench_measure::{stats, write_initramfs_with_command};
use crate::bench_qemu::{LinuxGuest, Qemu};
use crate::cli::BenchMigrateArgs;
use crate::run_cmd::default_cmdline;
use crate::vm::http;
use crate::vm::state_dir::Runtime;

const QEMU: &str = "qemu-system-x86_64";
const BOOT_WAIT: Duration = Duration::from_secs(300);
const MIGRATE_WAIT: Duration = Duration::from_secs(600);

/// The bridge the guests' NICs are on, and the addresses on it.
const BRIDGE: &str = "vhpcmig0";
const BRIDGE_MAC: &str = "02:77:00:00:00:01";
const HOST_IP: &str = "10.77.0.1";
const GUEST_IP: &str = "10.77.0.2";
/// The QEMU guests' TAPs on the bridge (source and destination) and their MAC.
const QEMU_TAPS: [&str; 2] = ["vbmsrc", "vbmdst"];
const QEMU_MAC: &str = "52:54:00:77:01:02";
/// Where the guest's ticks go, and their interval.
const TICK_PORT: u16 = 5555;
const TICK_MS: u64 = 20;
/// How long the ticks are watched before the migration (the baseline) and after it.
const WATCH: Duration = Duration::from_secs(3);
/// How long to wait for the first tick after the guest started its ticker.
const FIRST_TICK_WAIT: Duration = Duration::from_secs(120);

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
    /// The guest's script: its NIC up, the ticker in the background, then the load in the
    /// foreground (until the VM ends).
    fn script(self) -> String {
        format!(
            "ip addr add {GUEST_IP}/24 dev eth0 && ip link set eth0 up; \
             /init guest-ticker --to {HOST_IP}:{TICK_PORT} --interval-ms {TICK_MS} \
             > /dev/null 2>&1 & {}",
            self.command()
        )
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
    /// The longest gap between two of the guest's ticks around the migration.
    guest_gap_ms: f64,
    /// The longest gap in the seconds before the migration (no pause): the ticker's jitter.
    baseline_gap_ms: f64,
}

/// Arrival times at the host of the guest's ticks (`vhpc guest-ticker`), from a thread.
struct TickWatch {
    arrivals: Arc<Mutex<Vec<Instant>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TickWatch {
    fn start() -> anyhow::Result<TickWatch> {
        let socket = UdpSocket::bind((HOST_IP, TICK_PORT))
            .with_context(|| format!("cannot listen for ticks on {HOST_IP}:{TICK_PORT}"))?;
        socket.set_read_timeout(Some(Duration::from_millis(100)))?;
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (arrivals, stop) = (arrivals.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(n) = socket.recv(&mut buf)
                        && crate::guest_ticker::parse_tick(&buf[..n]).is_some()
                    {
                        let now = Instant::now();
                        arrivals.lock().unwrap_or_else(|e| e.into_inner()).push(now);
                    }
                }
            })
        };
        Ok(TickWatch {
            arrivals,
            stop,
            thread: Some(thread),
        })
    }

    fn arrivals(&self) -> Vec<Instant> {
        self.arrivals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn wait_first(&self) -> anyhow::Result<()> {
        let start = Instant::now();
        while self.arrivals().is_empty() {
            if start.elapsed() > FIRST_TICK_WAIT {
                bail!(
                    "no tick from the guest reached {HOST_IP}:{TICK_PORT} within {FIRST_TICK_WAIT:?} \
                     (is its NIC up on {BRIDGE}?)"
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Watches the ticks for [`WATCH`], runs `migrate`, watches for [`WATCH`] again; returns
    /// what `migrate` returned (total, downtime) with the longest tick gaps before and around.
    fn around(
        &self,
        migrate: impl FnOnce() -> anyhow::Result<(f64, f64)>,
    ) -> anyhow::Result<Sample> {
        let before = Instant::now();
        std::thread::sleep(WATCH);
        let start = Instant::now();
        let (total_ms, downtime_ms) = migrate()?;
        let done = Instant::now();
        std::thread::sleep(WATCH);
        let end = Instant::now();
        let ms = |t: Instant| t.duration_since(before).as_secs_f64() * 1000.0;
        let arrivals: Vec<f64> = self
            .arrivals()
            .into_iter()
            .filter(|&t| t >= before)
            .map(ms)
            .collect();
        if !arrivals.iter().any(|&t| t > ms(done)) {
            bail!("the guest's ticks did not come back after the migration");
        }
        let gap = |from: Instant, to: Instant| longest_gap(&arrivals, ms(from), ms(to));
        Ok(Sample {
            total_ms,
            downtime_ms,
            guest_gap_ms: gap(start, end).context("no ticks around the migration")?,
            baseline_gap_ms: gap(before, start).context("no ticks before the migration")?,
        })
    }
}

impl Drop for TickWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The longest gap between consecutive `times` (sorted, ms) that overlaps `[from, to]`.
fn longest_gap(times: &[f64], from: f64, to: f64) -> Option<f64> {
    times
        .windows(2)
        .filter(|w| w[1] >= from && w[0] <= to)
        .map(|w| w[1] - w[0])
        .reduce(f64::max)
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
    let watch = TickWatch::start()?;
    let net = format!("bridge={BRIDGE}");
    vhpc(&[
        "vm",
        "start",
        "bench-src",
        "--memory",
        &memory,
        "--net",
        &net,
    ])?;
    let result = (|| {
        let background = format!("({}) > /dev/null 2>&1 &", load.script());
        vhpc(&["exec", "bench-src", "--", "sh", "-c", &background])?;
        watch.wait_first()?;
        let listen = format!("127.0.0.1:{port}");
        vhpc(&["vm", "receive", "bench-dst", "--listen", &listen])?;
        watch.around(|| {
            let done = migrate_api("bench-src", &listen, args.downtime_ms)?;
            Ok((done.total_ms, done.downtime_ms))
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
        let argv = ["sh".to_string(), "-c".to_string(), load.script()];
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
    let linux = |tap| LinuxGuest {
        kernel: &guest.kernel,
        initramfs: &initramfs,
        cmdline: &cmdline,
        memory_mib: args.memory,
        nic: Some((tap, QEMU_MAC)),
    };
    let watch = TickWatch::start()?;
    let mut src = Qemu::boot_linux(&linux(QEMU_TAPS[0]), dir, None)?;
    let dst = Qemu::boot_linux(&linux(QEMU_TAPS[1]), dir, Some(port));
    let result = (|| {
        let dst = dst?;
        let sample = (|| {
            src.wait_console("Run /init as init process", BOOT_WAIT)?;
            watch.wait_first()?;
            watch.around(|| src.migrate_tcp(port, args.downtime_ms, MIGRATE_WAIT))
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
    let _network = network_setup()?;
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
                            "vhpc bench migrate: round {round}/{}: {who:<9} {:<16} total {:>8.0} ms, downtime {:>7.1} ms, guest-seen gap {:>7.1} ms (before: {:.1} ms)",
                            args.runs,
                            load.name(),
                            s.total_ms,
                            s.downtime_ms,
                            s.guest_gap_ms,
                            s.baseline_gap_ms
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

/// The bridge with the host's address (and a fixed MAC: see [`BenchBridge::create`]), and
/// the QEMU guests' TAPs on it (vhpc makes its own).
fn network_setup() -> anyhow::Result<BenchBridge> {
    let mut bridge = BenchBridge::create(BRIDGE, Some(BRIDGE_MAC), Some(&format!("{HOST_IP}/24")))?;
    for tap in QEMU_TAPS {
        bridge.add_tap(tap)?;
    }
    Ok(bridge)
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
    println!(
        "\nthe longest gap between the guest's {TICK_MS} ms ticks as the host received them: \
         around the migration, and in the {} s before it\n",
        WATCH.as_secs()
    );
    println!(
        "| guest | vhpc guest-seen (ms) | QEMU guest-seen (ms) | vhpc / QEMU | before: vhpc / QEMU (ms) |"
    );
    println!("|---|---|---|---|---|");
    for &load in loads {
        let (vg, qg) = (
            median(true, load, |s| s.guest_gap_ms),
            median(false, load, |s| s.guest_gap_ms),
        );
        let (vb, qb) = (
            median(true, load, |s| s.baseline_gap_ms),
            median(false, load, |s| s.baseline_gap_ms),
        );
        println!(
            "| {} | {vg:.0} | {qg:.0} | {:.2}× | {vb:.0} / {qb:.0} |",
            load.name(),
            vg / qg
        );
    }
}

#[cfg(test)]
mod tests {
    use super::longest_gap;
    use crate::bench_qemu::migrate_ms;

    #[test]
    fn the_longest_tick_gap_is_the_one_overlapping_the_window() {
        let ticks = [0.0, 20.0, 40.0, 60.0, 400.0, 420.0, 440.0, 900.0];
        // The 340 ms pause overlaps [50, 450]; the 460 ms gap after 440 starts after it.
        assert_eq!(longest_gap(&ticks, 50.0, 430.0), Some(340.0));
        // A window inside one gap still sees that gap.
        assert_eq!(longest_gap(&ticks, 100.0, 200.0), Some(340.0));
        assert_eq!(longest_gap(&ticks, 0.0, 45.0), Some(20.0));
        assert_eq!(longest_gap(&ticks, 0.0, 1000.0), Some(460.0));
        assert_eq!(longest_gap(&[5.0], 0.0, 10.0), None);
    }

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
