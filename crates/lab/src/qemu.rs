//! Running one emulated host under QEMU TCG.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use vhpc_image::cache::Cache;

use crate::LabError;
use crate::host_image::build_host_initramfs;
use crate::network::{COMMAND_PORT, LabNetwork};

/// One emulated host's shape.
#[derive(Clone, Debug)]
pub struct LabHost {
    pub smp: u32,
    pub memory_mib: u64,
    /// Put qemu-system-x86_64 into the host too, to compare against it.
    pub with_qemu: bool,
    /// Copy the host's console to stderr as it runs.
    pub show_console: bool,
    /// Emulated hosts on one lab network ([`crate::network`]); the command runs on host 1.
    pub hosts: u32,
    /// Raw images attached as virtio disks (/dev/vda, /dev/vdb, ... in the host), each behind
    /// a copy-on-write overlay QEMU discards at exit: the files here are never changed.
    pub disks: Vec<PathBuf>,
    pub timeout: Duration,
}

#[derive(Debug, PartialEq, Eq)]
pub enum LabOutcome {
    /// The emulated host powered off (its agent reported the command's status on the way).
    Exited,
    TimedOut,
    /// The emulated host stopped making progress: nothing reached its console, not even the
    /// heartbeat it writes every [`HEARTBEAT_SECS`], for this long; it was stopped.
    Hung(Duration),
}

/// How a lab run ended, with the end of host 1's console (kernel messages: a panic, the OOM
/// killer) for when the command's status never came.
#[derive(Debug)]
pub struct LabRun {
    pub outcome: LabOutcome,
    pub console_tail: String,
}

/// Host 1 writes [`HEARTBEAT`] to its console this often while its command runs.
pub const HEARTBEAT_SECS: u64 = 20;
/// The heartbeat line (left out of [`LabRun::console_tail`]).
const HEARTBEAT: &str = "vhpc-lab-heartbeat";
/// A host whose console stays silent this long, heartbeat included, is taken as hung (QEMU's
/// emulation of nested SVM froze hosts twice in full lab runs on 2026-11-26: both vCPUs busy
/// in the emulator, the host's own timers dead). `VHPC_LAB_HANG_SECS` overrides it.
const HANG_SECS: u64 = 300;

/// How much of the console's end [`LabRun::console_tail`] keeps.
const CONSOLE_TAIL_BYTES: u64 = 6 * 1024;

const QEMU: &str = "qemu-system-x86_64";
/// Console on ttyS0; a panic reboots, which -no-reboot turns into QEMU's exit.
const HOST_CMDLINE: &str = "console=ttyS0 panic=-1 quiet";

/// A scratch directory removed on drop.
struct WorkDir(PathBuf);

impl WorkDir {
    fn new() -> Result<Self, LabError> {
        let base = std::env::temp_dir();
        let dir = base.join(format!("vhpc-lab-{}-{}", std::process::id(), unique()));
        std::fs::create_dir_all(&dir)
            .map_err(LabError::io(format!("cannot create {}", dir.display())))?;
        Ok(WorkDir(dir))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn unique() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
}

impl LabHost {
    /// Boots the emulated host(s), runs `shell_command` with /bin/sh on host 1, streams its
    /// agent channel into `agent`, and returns when host 1 has powered off (or timed out);
    /// the other hosts are then stopped. Every host serves `vhpc lab on K` commands.
    pub fn run(
        &self,
        cache: &Cache,
        vhpc_binary: &Path,
        shell_command: &str,
        agent: &mut dyn Write,
        progress: &mut dyn FnMut(&str),
    ) -> Result<LabRun, LabError> {
        if which(QEMU).is_none() {
            return Err(LabError::MissingTool(QEMU, "qemu-system-x86"));
        }
        for disk in &self.disks {
            if !disk.is_file() {
                return Err(LabError::MissingInput {
                    what: "the disk image",
                    path: disk.clone(),
                    fix: "vhpc image rootfs",
                });
            }
        }
        let network = LabNetwork::new(self.hosts)?;
        let work = WorkDir::new()?;
        let others = self.start_other_hosts(cache, vhpc_binary, &network, &work.0, progress)?;
        let command = if self.hosts == 1 {
            shell_command.to_string()
        } else {
            format!(
                "{}{}\n{shell_command}",
                network.setup_script(1),
                detached(&format!("vhpc lab serve --port {COMMAND_PORT}"))
            )
        };
        let heartbeat =
            format!("while :; do sleep {HEARTBEAT_SECS}; echo {HEARTBEAT} > /dev/console; done");
        let script = format!("{}\n{command}", detached(&heartbeat));
        let initrd = work.0.join("host.cpio");
        build_host_initramfs(
            cache,
            vhpc_binary,
            self.with_qemu,
            &sh(&script),
            &initrd,
            progress,
        )?;
        let console_log = work.0.join("console.log");
        progress(&format!(
            "booting {} emulated host(s) ({} vCPUs, {} MiB each)",
            self.hosts, self.smp, self.memory_mib
        ));
        let mut child = self.spawn(
            &cache.kernel_path(),
            &initrd,
            &console_log,
            Stdio::piped(),
            &network.qemu_args(1),
            true,
        )?;
        let outcome = self.supervise(&mut child, agent, &console_log);
        drop(others);
        if outcome != LabOutcome::Exited {
            let _ = std::fs::copy(
                &console_log,
                std::env::temp_dir().join("vhpc-lab-console.log"),
            );
        }
        Ok(LabRun {
            outcome,
            console_tail: without_heartbeats(&file_tail(&console_log, CONSOLE_TAIL_BYTES)),
        })
    }

    /// Boots hosts 2..N of a multi-host lab: each configures its network and serves commands.
    fn start_other_hosts(
        &self,
        cache: &Cache,
        vhpc_binary: &Path,
        network: &LabNetwork,
        work: &Path,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Others, LabError> {
        let mut others = Others(Vec::new());
        for k in 2..=self.hosts {
            let script = format!(
                "{}exec vhpc lab serve --port {COMMAND_PORT}",
                network.setup_script(k)
            );
            let initrd = work.join(format!("host{k}.cpio"));
            build_host_initramfs(
                cache,
                vhpc_binary,
                self.with_qemu,
                &sh(&script),
                &initrd,
                progress,
            )?;
            let agent_out = Stdio::from(
                std::fs::File::create(work.join(format!("agent{k}.log")))
                    .map_err(LabError::io("cannot create a lab log file"))?,
            );
            let console = work.join(format!("console{k}.log"));
            others.0.push(self.spawn(
                &cache.kernel_path(),
                &initrd,
                &console,
                agent_out,
                &network.qemu_args(k),
                false,
            )?);
        }
        Ok(others)
    }

    fn spawn(
        &self,
        kernel: &Path,
        initrd: &Path,
        console_log: &Path,
        agent_out: Stdio,
        network_args: &[String],
        with_disks: bool,
    ) -> Result<Child, LabError> {
        let mut cmd = Command::new(QEMU);
        cmd.args(["-machine", "q35,accel=tcg", "-cpu", "max"])
            .args([
                "-smp",
                &self.smp.to_string(),
                "-m",
                &self.memory_mib.to_string(),
            ])
            .args([
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-no-reboot",
            ])
            .arg("-kernel")
            .arg(kernel)
            .arg("-initrd")
            .arg(initrd)
            .args(["-append", HOST_CMDLINE])
            .arg("-serial")
            .arg(format!("file:{}", console_log.display()))
            .args(["-serial", "stdio"])
            .args(network_args)
            .stdin(Stdio::null())
            .stdout(agent_out)
            .stderr(Stdio::inherit());
        if with_disks {
            cmd.args(
                self.disks
                    .iter()
                    .flat_map(|d| ["-drive".into(), drive_arg(d)]),
            );
        }
        cmd.spawn().map_err(|e| LabError::Qemu(e.to_string()))
    }

    /// Relays the agent channel until QEMU exits; kills it at the deadline.
    fn supervise(
        &self,
        child: &mut Child,
        agent: &mut dyn Write,
        console_log: &Path,
    ) -> LabOutcome {
        let timed_out = Arc::new(AtomicBool::new(false));
        let hung = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicBool::new(false));
        let hang_after = hang_after();
        let watchdog = {
            let (timed_out, hung, done) = (timed_out.clone(), hung.clone(), done.clone());
            let pid = child.id() as libc::pid_t;
            let deadline = Instant::now() + self.timeout;
            let console_log = console_log.to_path_buf();
            let show = self.show_console;
            std::thread::spawn(move || {
                let mut shown = 0u64;
                let (mut console_len, mut last_output) = (0u64, Instant::now());
                while !done.load(Ordering::Acquire) {
                    if show {
                        shown = copy_new_console(&console_log, shown);
                    }
                    let len = std::fs::metadata(&console_log).map_or(0, |m| m.len());
                    if len != console_len {
                        (console_len, last_output) = (len, Instant::now());
                    }
                    let stop = if Instant::now() >= deadline {
                        Some(&timed_out)
                    } else if last_output.elapsed() >= hang_after {
                        Some(&hung)
                    } else {
                        None
                    };
                    if let Some(flag) = stop {
                        flag.store(true, Ordering::Release);
                        // SAFETY: plain kill(2) of our own child, which has not been reaped yet
                        // (the main thread reaps it only after this thread is told to stop).
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                if show {
                    copy_new_console(&console_log, shown);
                }
            })
        };
        if let Some(mut out) = child.stdout.take() {
            let mut buf = [0u8; 8192];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 || agent.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
        // Stop the watchdog before reaping, so it can never signal a recycled pid.
        done.store(true, Ordering::Release);
        let _ = watchdog.join();
        let _ = child.wait();
        if timed_out.load(Ordering::Acquire) {
            LabOutcome::TimedOut
        } else if hung.load(Ordering::Acquire) {
            LabOutcome::Hung(hang_after)
        } else {
            LabOutcome::Exited
        }
    }
}

/// How long a silent console means a hung host: [`HANG_SECS`], or `VHPC_LAB_HANG_SECS`.
fn hang_after() -> Duration {
    let secs = std::env::var("VHPC_LAB_HANG_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(HANG_SECS);
    Duration::from_secs(secs)
}

/// `command` started in the background so that it is not a job of the user's shell (a plain
/// `wait` in the lab script would wait for it forever: the last CI run's migration test hung
/// so) and with its own descriptors closed (so the agent does not wait for it to end).
fn detached(command: &str) -> String {
    format!("( ({command}) </dev/null >/dev/null 2>&1 & )")
}

/// The console text without the heartbeat's lines.
fn without_heartbeats(console: &str) -> String {
    console
        .lines()
        .filter(|l| l.trim() != HEARTBEAT)
        .map(|l| format!("{l}\n"))
        .collect()
}

/// `/bin/sh -c SCRIPT`.
fn sh(script: &str) -> Vec<String> {
    vec!["/bin/sh".into(), "-c".into(), script.into()]
}

/// The QEMU processes of hosts 2..N: killed and reaped when host 1 is done (or on error).
struct Others(Vec<Child>);

impl Drop for Others {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// QEMU's `-drive` value for a lab disk: raw, virtio, with a throwaway overlay (`snapshot=on`)
/// so the host's writes never reach the image. Commas in the path are doubled (QEMU's escape).
fn drive_arg(image: &Path) -> String {
    let path = image.to_string_lossy().replace(',', ",,");
    format!("file={path},format=raw,if=virtio,snapshot=on")
}

/// The last `bytes` of the file at `path`, lossily decoded (empty if it cannot be read).
fn file_tail(path: &Path, bytes: u64) -> String {
    use std::io::{Seek, SeekFrom};
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map_or(0, |m| m.len());
    let mut tail = Vec::new();
    if file
        .seek(SeekFrom::Start(len.saturating_sub(bytes)))
        .is_ok()
    {
        let _ = file.read_to_end(&mut tail);
    }
    String::from_utf8_lossy(&tail).into_owned()
}

/// Copies console bytes past `from` to stderr; returns the new position.
fn copy_new_console(path: &Path, from: u64) -> u64 {
    use std::io::Seek;
    let Ok(mut f) = std::fs::File::open(path) else {
        return from;
    };
    if f.seek(std::io::SeekFrom::Start(from)).is_err() {
        return from;
    }
    let mut buf = Vec::new();
    let n = f.read_to_end(&mut buf).unwrap_or(0);
    let _ = std::io::stderr().write_all(&buf[..n]);
    from + n as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_are_left_out_of_the_console_tail() {
        let console = format!("[ 1.0] boot\n{HEARTBEAT}\r\n[ 2.0] Kernel panic\n{HEARTBEAT}\n");
        assert_eq!(
            without_heartbeats(&console),
            "[ 1.0] boot\n[ 2.0] Kernel panic\n"
        );
    }

    #[test]
    fn lab_disks_are_copy_on_write_and_escaped() {
        assert_eq!(
            drive_arg(Path::new("/c/a,b.img")),
            "file=/c/a,,b.img,format=raw,if=virtio,snapshot=on"
        );
    }
}
