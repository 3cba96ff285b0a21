//! `vhpc bench net`: VM ↔ VM round-trip latency (ping) and TCP throughput (busybox nc) of two
//! vhpc VMs on one bridge, against two QEMU q35 VMs with virtio-net-pci on TAPs on the same
//! bridge: QEMU as it comes (vnet header: checksum and segmentation offloads, as vhpc) and
//! QEMU without the vnet header (no offloads) for scale.
//!
//! Meant to run inside an emulated host (`vhpc lab run --with-qemu --memory 3072 -- vhpc bench
//! net`), where only the ratios mean anything. Every contender boots the same kernel and
//! initramfs; each pair is a server (nc listening, then its link up) and a client that waits
//! for the server to answer a ping, pings it N times, sends M MiB of zeros over TCP, timing
//! itself with /proc/uptime, and writes its results to its console.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use vhpc_image::cache::Cache;

use crate::bench_bridge::BenchBridge;
use crate::bench_measure::stats;
use crate::bench_qemu::QEMU_BARE;
use crate::bench_qemu::tap_nic_args;
use crate::cli::BenchNetArgs;
use crate::run_cmd::default_cmdline;

const QEMU: &str = "qemu-system-x86_64";
const BRIDGE: &str = "vhpcbench0";
const ROLES: [&str; 2] = ["server", "client"];

/// The persistent TAP a QEMU guest in `role` attaches to.
fn qemu_tap(role: &str) -> String {
    format!("vbq{role}")
}
const SERVER_IP: &str = "10.77.0.2";
const CLIENT_IP: &str = "10.77.0.1";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Contender {
    Vhpc,
    QemuNoOffload,
    Qemu,
}

impl Contender {
    const ALL: [Contender; 3] = [Contender::Vhpc, Contender::QemuNoOffload, Contender::Qemu];

    fn name(self) -> &'static str {
        match self {
            Contender::Vhpc => "vhpc (offloads)",
            Contender::QemuNoOffload => "qemu q35, tap vnet_hdr=off (no offloads)",
            Contender::Qemu => "qemu q35, tap default (offloads)",
        }
    }
}

/// One client run's results.
#[derive(Clone, Copy, Debug)]
struct Sample {
    rtt_ms: f64,
    mib_per_s: f64,
}

/// What the client printed: average round trip (ms) and seconds the transfer took.
struct ClientLine {
    rtt_ms: f64,
    secs: f64,
}

fn server_script() -> String {
    // Listen first, then bring the link up: once the server answers a ping, nc is listening.
    // `sleep |` keeps nc's stdin open (busybox nc ends the connection at its stdin's EOF).
    format!(
        "ip addr add {SERVER_IP}/24 dev eth0; (sleep 3600 | nc -l -p 5000 > /dev/null) & \
         sleep 1; ip link set eth0 up; sleep 3600"
    )
}

fn client_script(pings: u32, mib: u32) -> String {
    format!(
        "ip addr add {CLIENT_IP}/24 dev eth0; ip link set eth0 up; \
         i=0; until ping -c 1 -W 1 {SERVER_IP} > /dev/null 2>&1; do i=$((i+1)); \
           [ $i -gt 300 ] && echo BENCH error=no-server > /dev/console && exit 1; done; \
         rtt=$(ping -c {pings} {SERVER_IP} | sed -n 's|.*min/avg/max = [0-9.]*/\\([0-9.]*\\)/.*|\\1|p'); \
         t0=$(cut -d' ' -f1 /proc/uptime); \
         dd if=/dev/zero bs=64k count={count} 2>/dev/null | nc {SERVER_IP} 5000; st=$?; \
         t1=$(cut -d' ' -f1 /proc/uptime); \
         echo BENCH rtt_ms=$rtt secs=$(awk \"BEGIN{{print $t1-$t0}}\") nc=$st > /dev/console",
        count = mib * 16
    )
}

/// The default initramfs with a command archive running `script`.
fn initramfs_with(script: &str, path: &Path) -> anyhow::Result<()> {
    let cache = Cache::from_env();
    let mut bytes = std::fs::read(cache.initramfs_path()).with_context(|| {
        format!(
            "cannot read {}; run `vhpc image initramfs`",
            cache.initramfs_path().display()
        )
    })?;
    bytes.resize(bytes.len().next_multiple_of(4), 0);
    bytes.extend(vhpc_image::initramfs::command_archive(&[
        "sh".to_string(),
        "-c".to_string(),
        script.to_string(),
    ]));
    std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

struct Files {
    dir: PathBuf,
    server_script: String,
    client_script: String,
    server_initrd: PathBuf,
    client_initrd: PathBuf,
}

fn spawn(c: Contender, role: &str, f: &Files, memory: u64) -> anyhow::Result<Child> {
    let console = f.dir.join(format!("{role}.console"));
    let _ = std::fs::remove_file(&console);
    let (initrd, script) = if role == "server" {
        (&f.server_initrd, &f.server_script)
    } else {
        (&f.client_initrd, &f.client_script)
    };
    let mac = if role == "server" {
        "52:54:00:77:00:02"
    } else {
        "52:54:00:77:00:01"
    };
    let mut cmd;
    if c == Contender::Vhpc {
        let vhpc = std::env::current_exe().context("cannot find the vhpc binary")?;
        cmd = Command::new(vhpc);
        // The same script as the QEMU guests' command archive, as vhpc run's command.
        cmd.args(["run", "--memory", &memory.to_string(), "--console-log"])
            .arg(&console)
            .args(["--net", &format!("bridge={BRIDGE},mac={mac}")])
            .args(["--", "sh", "-c", script]);
    } else {
        let tap = qemu_tap(role);
        cmd = Command::new(QEMU);
        cmd.args([
            "-accel", "kvm", "-cpu", "host", "-M", "q35", "-smp", "1", "-m",
        ])
        .arg(memory.to_string())
        // A guest that crashes or reboots ends its QEMU (as it ends vhpc's VMM): the round
        // fails and says so, instead of the guest booting again and running its script twice.
        .args(QEMU_BARE)
        .arg("-no-reboot")
        .arg("-kernel")
        .arg(Cache::from_env().kernel_path())
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", &default_cmdline(false)])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .args(["-serial", "null"])
        .args(tap_nic_args(&tap, mac, c == Contender::Qemu));
    }
    let stderr = std::fs::File::create(f.dir.join(format!("{role}.stderr")))
        .context("cannot create the VMM's stderr file")?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .with_context(|| format!("cannot start {}", c.name()))
}

/// Reads the client's `BENCH ...` line from its console, waiting at most `timeout`; fails at
/// once when either VMM exits first (saying what it printed).
fn client_result(
    dir: &Path,
    client: &mut Child,
    server: &mut Child,
    timeout: Duration,
) -> anyhow::Result<ClientLine> {
    let start = Instant::now();
    let console = dir.join("client.console");
    let result = || {
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        text.lines()
            .find(|l| l.starts_with("BENCH "))
            .map(parse_result)
    };
    loop {
        if let Some(r) = result() {
            return r;
        }
        for (role, child) in [("client", &mut *client), ("server", &mut *server)] {
            if let Ok(Some(status)) = child.try_wait() {
                // The client powers off right after writing its result: look once more.
                if let Some(r) = result() {
                    return r;
                }
                let err =
                    std::fs::read_to_string(dir.join(format!("{role}.stderr"))).unwrap_or_default();
                // QEMU runs with -no-reboot: a guest that reset (a triple fault) ends it
                // with status 0, as a power-off would.
                bail!(
                    "the {role} VMM exited ({status}) before the client's result (its guest crashed, reset or powered off): {}; console {}",
                    err.trim(),
                    dir.join(format!("{role}.console")).display()
                );
            }
        }
        if start.elapsed() > timeout {
            bail!(
                "no result within {timeout:?}; console {}",
                console.display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn parse_result(line: &str) -> anyhow::Result<ClientLine> {
    let get = |key: &str| {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
            .with_context(|| format!("no {key}= in {line:?}"))
    };
    if let Ok(e) = get("error") {
        bail!("the client failed: {e}");
    }
    if get("nc")? != "0" {
        bail!("nc failed in the client: {line}");
    }
    let rtt_ms = get("rtt_ms")?
        .parse()
        .with_context(|| format!("no ping average in {line:?}"))?;
    let secs: f64 = get("secs")?
        .parse()
        .with_context(|| format!("no transfer time in {line:?}"))?;
    if secs <= 0.0 {
        bail!("a transfer time of {secs} s is not a measurement: {line:?}");
    }
    Ok(ClientLine { rtt_ms, secs })
}

fn run_pair(
    c: Contender,
    f: &Files,
    args: &BenchNetArgs,
    bridge: &mut BenchBridge,
) -> anyhow::Result<Sample> {
    if c != Contender::Vhpc {
        // QEMU attaches to persistent TAPs on the bridge (it has no bridge of its own here).
        for role in ROLES {
            bridge.add_tap(&qemu_tap(role))?;
        }
    }
    let mut server = spawn(c, "server", f, args.memory)?;
    let client = spawn(c, "client", f, args.memory);
    let result = client.and_then(|mut client| {
        let r = client_result(&f.dir, &mut client, &mut server, Duration::from_secs(600));
        let _ = client.kill();
        let _ = client.wait();
        r
    });
    let _ = server.kill();
    let _ = server.wait();
    for role in ROLES {
        bridge.remove_tap(&qemu_tap(role));
    }
    result.map(|l| Sample {
        rtt_ms: l.rtt_ms,
        mib_per_s: f64::from(args.mib) / l.secs,
    })
}

pub fn run(args: BenchNetArgs) -> anyhow::Result<i32> {
    if !Path::new("/usr/bin").join(QEMU).exists() {
        bail!(
            "{QEMU} not found: run this inside `vhpc lab run --with-qemu --memory 3072 -- vhpc bench net`"
        );
    }
    let dir = std::env::temp_dir().join("vhpc-bench-net");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let files = Files {
        server_script: server_script(),
        client_script: client_script(args.pings, args.mib),
        server_initrd: dir.join("server.cpio"),
        client_initrd: dir.join("client.cpio"),
        dir,
    };
    initramfs_with(&files.server_script, &files.server_initrd)?;
    initramfs_with(&files.client_script, &files.client_initrd)?;
    let mut bridge = BenchBridge::create(BRIDGE, None, None)?;
    let mut samples: Vec<(Contender, Sample)> = Vec::new();
    let mut failures = 0;
    for round in 1..=args.runs {
        for c in Contender::ALL {
            match run_pair(c, &files, &args, &mut bridge) {
                Ok(s) => {
                    eprintln!(
                        "vhpc bench: round {round}/{}: {:<42} ping avg {:>8.3} ms, TCP {:>7.2} MiB/s",
                        args.runs,
                        c.name(),
                        s.rtt_ms,
                        s.mib_per_s
                    );
                    samples.push((c, s));
                }
                Err(e) => {
                    failures += 1;
                    eprintln!(
                        "vhpc bench: round {round}/{}: {}: {e:#}",
                        args.runs,
                        c.name()
                    );
                }
            }
        }
    }
    drop(bridge);
    print_table(&samples, &args);
    Ok(if failures == 0 { 0 } else { 1 })
}

fn print_table(samples: &[(Contender, Sample)], args: &BenchNetArgs) {
    let median = |c: Contender, f: fn(&Sample) -> f64| {
        let v: Vec<f64> = samples
            .iter()
            .filter(|(k, _)| *k == c)
            .map(|(_, s)| f(s))
            .collect();
        (!v.is_empty()).then(|| stats(v).0)
    };
    let rtt = |s: &Sample| s.rtt_ms;
    let tput = |s: &Sample| s.mib_per_s;
    let base = Contender::Qemu;
    println!(
        "medians of {} run(s): ping -c {} between the VMs, {} MiB over TCP (busybox nc)\n",
        args.runs, args.pings, args.mib
    );
    println!("| VMM | ping avg (ms) | vs qemu | TCP (MiB/s) | vs qemu |");
    println!("|---|---|---|---|---|");
    for c in Contender::ALL {
        let cell = |v: Option<f64>, b: Option<f64>, unit_digits: usize| match (v, b) {
            (Some(v), Some(b)) => (format!("{v:.unit_digits$}"), format!("{:.2}×", v / b)),
            (Some(v), None) => (format!("{v:.unit_digits$}"), "-".into()),
            _ => ("failed".into(), "-".into()),
        };
        let (r, rr) = cell(median(c, rtt), median(base, rtt), 3);
        let (t, tr) = cell(median(c, tput), median(base, tput), 2);
        println!("| {} | {r} | {rr} | {t} | {tr} |", c.name());
    }
}
