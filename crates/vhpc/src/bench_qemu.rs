//! QEMU as the reference in the benchmarks, driven through its human monitor on stdio:
//! `vhpc bench snapshot` boots the test guest in `-M microvm` and saves with `stop` +
//! `migrate "exec:cat > FILE"`, restores with `-incoming "exec:cat FILE"`; `vhpc bench
//! migrate` boots the Debian kernel in `-M q35` and migrates live over TCP to a second QEMU
//! started with `-incoming tcp:...`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

const QEMU: &str = "qemu-system-x86_64";
/// QEMU with no default devices, no user configuration and no display: only what the command
/// line adds (every benchmark's QEMU starts with these).
pub const QEMU_BARE: [&str; 4] = ["-nodefaults", "-no-user-config", "-display", "none"];

pub struct Qemu {
    child: Child,
    stdin: ChildStdin,
    out: Arc<Mutex<String>>,
    serial: PathBuf,
}

fn command(guest: &Path, memory_mib: u64, cmdline: &str, serial: &Path) -> Command {
    let mut cmd = Command::new(QEMU);
    // QEMU's default CPU model: `-cpu host` aborts on kvm_pvm (an MSR it sets is refused).
    cmd.args(["-accel", "kvm", "-M", "microvm", "-smp", "1", "-m"])
        .arg(memory_mib.to_string())
        .args(QEMU_BARE)
        .arg("-no-reboot")
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .arg("-kernel")
        .arg(guest)
        .args(["-append", cmdline])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
        .args(["-monitor", "stdio"]);
    cmd
}

/// QEMU arguments for a virtio-net-pci NIC on the existing TAP `tap` with `mac`; with
/// `vnet_hdr` false, without the vnet header (no offloads).
pub fn tap_nic_args(tap: &str, mac: &str, vnet_hdr: bool) -> [String; 4] {
    let vnet = if vnet_hdr { "" } else { ",vnet_hdr=off" };
    [
        "-netdev".into(),
        format!("tap,id=n0,ifname={tap},script=no,downscript=no{vnet}"),
        "-device".into(),
        // No option ROM: nothing network-boots, and Debian keeps efi-virtio.rom in another
        // package (ipxe-qemu) that the lab does not copy.
        format!("virtio-net-pci,netdev=n0,mac={mac},romfile="),
    ]
}

/// A Debian guest for [`Qemu::boot_linux`]: kernel, initramfs, command line, memory, and
/// optionally a NIC on an existing TAP (`(tap, mac)`).
pub struct LinuxGuest<'a> {
    pub kernel: &'a Path,
    pub initramfs: &'a Path,
    pub cmdline: &'a str,
    pub memory_mib: u64,
    pub nic: Option<(&'a str, &'a str)>,
}

/// The Debian guest in q35 (1 vCPU, `-cpu host`), console into `serial`, the agent's port
/// discarded; listening for an incoming migration on `incoming` if given.
fn linux_command(guest: &LinuxGuest, serial: &Path, incoming: Option<u16>) -> Command {
    let LinuxGuest {
        kernel,
        initramfs,
        cmdline,
        memory_mib,
        nic,
    } = *guest;
    let mut cmd = Command::new(QEMU);
    cmd.args([
        "-accel", "kvm", "-cpu", "host", "-M", "q35", "-smp", "1", "-m",
    ])
    .arg(memory_mib.to_string())
    .args(QEMU_BARE)
    .arg("-serial")
    .arg(format!("file:{}", serial.display()))
    .args(["-serial", "null", "-kernel"])
    .arg(kernel)
    .arg("-initrd")
    .arg(initramfs)
    .args(["-append", cmdline, "-monitor", "stdio"]);
    if let Some((tap, mac)) = nic {
        cmd.args(tap_nic_args(tap, mac, true));
    }
    if let Some(port) = incoming {
        cmd.arg("-incoming").arg(format!("tcp:127.0.0.1:{port}"));
    }
    cmd
}

/// Milliseconds after `key` in QEMU's `info migrate` text: `total time: 123 ms` (older
/// QEMUs) or `total=123` on a `Time (ms):` line (newer ones).
pub fn migrate_ms(info: &str, old_key: &str, new_key: &str) -> Option<f64> {
    let number = |rest: &str| -> Option<f64> {
        let digits: String = rest
            .trim_start()
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.')
            .collect();
        digits.parse().ok()
    };
    if let Some(at) = info.find(old_key) {
        return number(&info[at + old_key.len()..]);
    }
    info.lines()
        .filter(|l| l.contains("(ms)"))
        .flat_map(|l| l.split([',', ':']))
        .find_map(|part| number(part.trim().strip_prefix(new_key)?.strip_prefix('=')?))
}

impl Qemu {
    /// Boots the Debian kernel and initramfs (see [`linux_command`]).
    pub fn boot_linux(
        guest: &LinuxGuest,
        root: &Path,
        incoming: Option<u16>,
    ) -> anyhow::Result<Qemu> {
        let name = match incoming {
            Some(_) => "qemu-serial-dst.log",
            None => "qemu-serial-src.log",
        };
        let serial = root.join(name);
        let _ = std::fs::remove_file(&serial);
        let cmd = linux_command(guest, &serial, incoming);
        Qemu::spawn(cmd, serial)
    }

    /// Live migration to the QEMU listening on `port`, aiming at `downtime_ms`: (total,
    /// downtime) as QEMU reports them once the status is `completed`.
    pub fn migrate_tcp(
        &mut self,
        port: u16,
        downtime_ms: u64,
        timeout: Duration,
    ) -> anyhow::Result<(f64, f64)> {
        self.send("migrate_set_parameter max-bandwidth 100G")?;
        self.send(&format!(
            "migrate_set_parameter downtime-limit {downtime_ms}"
        ))?;
        self.send(&format!("migrate -d tcp:127.0.0.1:{port}"))?;
        let start = Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(100));
            let from = self.output().len();
            self.send("info migrate")?;
            let status = self.wait_output("tatus:", from, timeout)?;
            let first = status.lines().next().unwrap_or("");
            if first.contains("completed") {
                // The rest of the report follows the status line.
                std::thread::sleep(Duration::from_millis(200));
                let info = self.output()[from..].to_string();
                let total = migrate_ms(&info, "total time:", "total");
                let down = migrate_ms(&info, "downtime:", "down");
                return match (total, down) {
                    (Some(t), Some(d)) => Ok((t, d)),
                    _ => bail!("cannot read QEMU's migration times from: {info}"),
                };
            }
            if first.contains("failed") || first.contains("cancelled") {
                bail!("QEMU's migration failed: {status}");
            }
            if start.elapsed() > timeout {
                bail!("QEMU's migration did not complete within {timeout:?}: {status}");
            }
        }
    }

    fn spawn(mut cmd: Command, serial: PathBuf) -> anyhow::Result<Qemu> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {QEMU}: install qemu-system-x86"))?;
        let (Some(stdin), Some(mut stdout)) = (child.stdin.take(), child.stdout.take()) else {
            bail!("{QEMU}: no monitor pipes");
        };
        let out = Arc::new(Mutex::new(String::new()));
        let sink = out.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let mut s = sink.lock().unwrap_or_else(|p| p.into_inner());
                s.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Ok(Qemu {
            child,
            stdin,
            out,
            serial,
        })
    }

    /// Boots the test guest with `cmdline`; its console goes to a file in `root`.
    pub fn boot(guest: &Path, memory_mib: u64, cmdline: &str, root: &Path) -> anyhow::Result<Qemu> {
        let serial = root.join("qemu-serial.log");
        let _ = std::fs::remove_file(&serial);
        Qemu::spawn(command(guest, memory_mib, cmdline, &serial), serial)
    }

    fn output(&self) -> String {
        self.out.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn send(&mut self, line: &str) -> anyhow::Result<()> {
        writeln!(self.stdin, "{line}").context("QEMU's monitor is gone")
    }

    /// Waits until the monitor's output after byte `from` contains `needle`; returns it.
    fn wait_output(&self, needle: &str, from: usize, timeout: Duration) -> anyhow::Result<String> {
        let start = Instant::now();
        loop {
            let out = self.output();
            let new = out.get(from..).unwrap_or("");
            if let Some(at) = new.find(needle) {
                return Ok(new[at..].to_string());
            }
            if start.elapsed() > timeout {
                bail!("QEMU's monitor did not print {needle:?} within {timeout:?}: {new}");
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Waits until the guest's console contains `needle`.
    pub fn wait_console(&self, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        while !std::fs::read_to_string(&self.serial).is_ok_and(|s| s.contains(needle)) {
            if start.elapsed() > timeout {
                bail!("QEMU's guest did not print {needle:?} within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// `stop`, then migrate to `file`; the time until QEMU reports the migration completed.
    /// Without a bandwidth limit (QEMU's default is 128 MiB/s) and detached (`-d`: the
    /// monitor's own wait polls only once a second), polling `info migrate`.
    pub fn save(&mut self, file: &Path, timeout: Duration) -> anyhow::Result<Duration> {
        let _ = std::fs::remove_file(file);
        self.send("migrate_set_parameter max-bandwidth 100G")?;
        let start = Instant::now();
        self.send("stop")?;
        self.send(&format!("migrate -d \"exec:cat > {}\"", file.display()))?;
        loop {
            let from = self.output().len();
            self.send("info migrate")?;
            let status = self.wait_output("Migration status:", from, timeout)?;
            if status.starts_with("Migration status: completed") {
                return Ok(start.elapsed());
            }
            if status.starts_with("Migration status: failed") || start.elapsed() > timeout {
                bail!("QEMU's migration to a file did not complete: {status}");
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    }

    /// Spawns QEMU with `-incoming "exec:cat FILE"`; the time until the monitor reports the
    /// VM out of `inmigrate` (paused as it was saved, or running).
    pub fn restore(
        guest: &Path,
        memory_mib: u64,
        file: &Path,
        root: &Path,
        timeout: Duration,
    ) -> anyhow::Result<Duration> {
        let serial = root.join("qemu-serial-in.log");
        let start = Instant::now();
        let mut cmd = command(guest, memory_mib, "halt", &serial);
        cmd.arg("-incoming")
            .arg(format!("exec:cat {}", file.display()));
        let mut q = Qemu::spawn(cmd, serial)?;
        loop {
            let from = q.output().len();
            q.send("info status")?;
            let status = q.wait_output("VM status:", from, timeout)?;
            let line = status.lines().next().unwrap_or("");
            if !line.contains("inmigrate") {
                let took = start.elapsed();
                q.quit();
                return Ok(took);
            }
            if start.elapsed() > timeout {
                q.quit();
                bail!("QEMU's incoming migration did not finish within {timeout:?}");
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    }

    /// Quits QEMU (kills it if it does not exit within 5 s) and reaps it.
    pub fn quit(mut self) {
        let _ = self.send("quit");
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
