//! `vhpc run`: boot a fresh VM, run one command in it, exit with the command's status.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use vhpc_api::{MemoryConfig, VmConfig, VsockConfig};
use vhpc_image::cache::Cache;
use vhpc_vmm::boot::GuestKind;
use vhpc_vmm::{VmIo, VmOutcome};

use crate::cli::RunArgs;
use crate::exit_codes;
use crate::relay::{AgentRelay, AgentReport};

/// Console on COM1, reboot on panic (the VMM then reports the panic), reboot through the ACPI
/// reset register (`reboot=a`: without it the Debian kernel on our hardware-reduced platform
/// tries a real-mode BIOS reboot, and there is no BIOS), quiet unless the user watches the
/// console: every console byte is a VM exit.
pub fn default_cmdline(console: bool) -> String {
    let mut c =
        String::from("console=ttyS0 panic=-1 reboot=a i8042.noaux i8042.nomux i8042.dumbkbd");
    if !console {
        c.push_str(" quiet");
    }
    c
}

/// `path`, if it is a readable file; else an error that says what is wrong with it.
fn existing(path: PathBuf, what: &str, fix: &str) -> anyhow::Result<PathBuf> {
    if !path.exists() {
        bail!("{what} {} does not exist{fix}", path.display());
    }
    if path.is_dir() {
        bail!("{what} {} is a directory, not a file", path.display());
    }
    std::fs::File::open(&path).with_context(|| format!("cannot read {what} {}", path.display()))?;
    Ok(path)
}

/// The kernel to boot: `given`, else the cached Debian kernel.
pub fn kernel_or_default(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    match given {
        Some(k) => existing(k.to_path_buf(), "kernel", ""),
        None => existing(
            Cache::from_env().kernel_path(),
            "the default kernel",
            "; fetch it with `vhpc image kernel`",
        ),
    }
}

/// The initramfs: `given`, else the default one `vhpc image initramfs` built.
pub fn initramfs_or_default(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    match given {
        Some(i) => existing(i.to_path_buf(), "initramfs", ""),
        None => existing(
            Cache::from_env().initramfs_path(),
            "the default initramfs",
            "; build it with `vhpc image initramfs`",
        ),
    }
}

/// Whether `kernel` is a freestanding guest (an ELF that is not Linux, such as vhpc's test
/// guest): it runs no /init, so it needs no initramfs and gets no command archive.
fn is_freestanding(kernel: &Path) -> bool {
    matches!(
        vhpc_vmm::boot::guest_kind::classify(kernel),
        Ok(Some(GuestKind::Freestanding { .. }))
    )
}

fn vm_config(args: &RunArgs) -> anyhow::Result<VmConfig> {
    let shape = &args.shape;
    let kernel = kernel_or_default(shape.kernel.as_deref())?;
    let freestanding = is_freestanding(&kernel);
    let initramfs = match &shape.initrd {
        None if freestanding => None,
        initrd => Some(initramfs_or_default(initrd.as_deref())?),
    };
    let mut config = VmConfig {
        vcpus: shape.vcpus,
        memory: MemoryConfig {
            size_mib: shape.memory,
            hugepages: shape.hugepages,
            prefault: args.prefault,
        },
        kernel,
        initramfs,
        cmdline: args
            .cmdline
            .clone()
            .unwrap_or_else(|| default_cmdline(args.console)),
        disks: shape.disks.clone(),
        nets: crate::net_names::for_run(&shape.nets),
    };
    if let Some(rootfs) = &shape.rootfs {
        if freestanding {
            bail!("--rootfs needs a Linux guest: a freestanding kernel runs no /init to mount it");
        }
        crate::rootfs_arg::attach(&mut config, rootfs)?;
    }
    Ok(config)
}

fn vsock_config(args: &RunArgs) -> anyhow::Result<Option<VsockConfig>> {
    let Some(socket) = &args.vsock else {
        return Ok(None);
    };
    let config = VsockConfig {
        guest_cid: args.vsock_cid,
        socket: socket.clone(),
    };
    config.validate()?;
    Ok(Some(config))
}

fn console_sink(args: &RunArgs) -> anyhow::Result<Box<dyn Write + Send>> {
    let file = match &args.console_log {
        Some(p) => Some(
            std::fs::File::create(p)
                .with_context(|| format!("cannot create console log {}", p.display()))?,
        ),
        None => None,
    };
    Ok(match (args.console, file) {
        (true, Some(f)) => Box::new(Tee(std::io::stderr(), f)),
        (true, None) => Box::new(std::io::stderr()),
        (false, Some(f)) => Box::new(f),
        (false, None) => Box::new(std::io::sink()),
    })
}

struct Tee<A, B>(A, B);
impl<A: Write, B: Write> Write for Tee<A, B> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write_all(buf)?;
        self.1.write_all(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()?;
        self.1.flush()
    }
}

pub fn run(args: RunArgs) -> anyhow::Result<i32> {
    let config = vm_config(&args)?;
    let report = AgentReport::default();
    let extra_initramfs = if is_freestanding(&config.kernel) {
        Vec::new()
    } else {
        vhpc_image::initramfs::command_archive(&args.command)
    };
    let io = VmIo {
        console: console_sink(&args)?,
        agent: Box::new(AgentRelay::new(report.clone())),
        extra_initramfs,
        timeout: args.timeout.map(Duration::from_secs),
        vsock: vsock_config(&args)?,
    };
    let (outcome, log) = vhpc_vmm::run(&config, io)?;
    Ok(match outcome {
        VmOutcome::PowerOff | VmOutcome::Reset => match report.exit_status() {
            Some(status) => status,
            None => {
                // The command itself powered off or rebooted the guest (that is status 0), or
                // the guest went down on its own: either way, say so rather than stay silent.
                let how = if outcome == VmOutcome::Reset {
                    "rebooted"
                } else {
                    "powered off"
                };
                eprintln!("vhpc: the guest {how} before the command reported a status");
                0
            }
        },
        VmOutcome::Exit(status) => i32::from(status),
        VmOutcome::Panic => {
            let saved = save_log(&log.contents());
            eprintln!("vhpc: the guest kernel panicked; console log: {saved}");
            print_panic_report(&log.contents(), 40);
            exit_codes::GUEST_PANIC
        }
        VmOutcome::TimedOut => {
            eprintln!("vhpc: the VM ran past --timeout and was stopped");
            exit_codes::TIMED_OUT
        }
        VmOutcome::Crash(reason) => {
            let saved = save_log(&log.contents());
            eprintln!("vhpc: the VM stopped: {reason}; console log: {saved}");
            exit_codes::VHPC_ERROR
        }
    })
}

/// Keeps the console log of a failed VM in a file, and says where.
fn save_log(contents: &[u8]) -> String {
    let path =
        Path::new(&std::env::temp_dir()).join(format!("vhpc-console-{}.log", std::process::id()));
    match std::fs::write(&path, contents) {
        Ok(()) => path.display().to_string(),
        Err(e) => format!("(could not save it to {}: {e})", path.display()),
    }
}

/// Prints the panic report from its "Kernel panic" line on (the reason, then the backtrace),
/// at most `max` lines; the whole log is in the kept file.
fn print_panic_report(contents: &[u8], max: usize) {
    let text = String::from_utf8_lossy(contents);
    let all: Vec<&str> = text.lines().collect();
    let start = all
        .iter()
        .rposition(|l| l.contains("Kernel panic - not syncing"))
        .unwrap_or(all.len().saturating_sub(max));
    for line in all[start..].iter().take(max) {
        eprintln!("  | {line}");
    }
}
