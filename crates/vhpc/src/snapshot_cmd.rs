//! `vhpc snapshot inspect|merge` and `vhpc restore`: checkpoints on disk, without a running
//! VMM to talk to (taking a checkpoint of a running VM goes through its API).

use std::time::Duration;

use anyhow::Context;
use vhpc_vmm::snapshot::format::MemoryContents;
use vhpc_vmm::snapshot::{self, Inspection, RestoreOptions};
use vhpc_vmm::{VmIo, VmOutcome};

use crate::cli::{RestoreArgs, SnapshotArgs, SnapshotCommand};
use crate::exit_codes;

/// How long `vhpc restore --name` waits for the restored guest agent.
const RESTORE_READY_TIMEOUT: Duration = Duration::from_secs(120);

pub fn run(args: SnapshotArgs) -> anyhow::Result<i32> {
    let Some(cmd) = args.command else {
        let (Some(name), Some(dir)) = (args.name, args.dir) else {
            anyhow::bail!("give NAME and DIR (vhpc snapshot NAME DIR), or inspect/merge");
        };
        return crate::vm::commands::snapshot(&name, &dir, args.incremental, args.stop);
    };
    match cmd {
        SnapshotCommand::Inspect { dir } => {
            let inspection = snapshot::inspect(&dir)?;
            print!("{}", describe(&inspection));
            Ok(0)
        }
        SnapshotCommand::Merge { dir, out } => {
            let info = snapshot::merge(&dir, &out)
                .with_context(|| format!("cannot merge the chain ending at {}", dir.display()))?;
            println!(
                "merged into {}: full checkpoint {}, {} data pages",
                info.dir.display(),
                info.id,
                info.memory_pages
            );
            Ok(0)
        }
    }
}

fn mib(bytes: u64) -> String {
    if bytes < 1 << 20 {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    } else {
        format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
    }
}

/// The text `vhpc snapshot inspect` prints.
fn describe(i: &Inspection) -> String {
    let c = &i.checkpoint;
    let b = &c.body;
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<11} {v}\n"));
    line("checkpoint", c.dir.display().to_string());
    line(
        "format",
        format!(
            "VHPCSNAP version {}, state.bin {} bytes, header and body CRC-32 ok",
            snapshot::format::FORMAT_VERSION,
            c.state_bytes
        ),
    );
    line("id", b.meta.id.clone());
    line(
        "parent",
        b.meta
            .parent
            .as_ref()
            .map_or("none (full checkpoint)".into(), |p| {
                format!("{} at {}", p.id, p.dir.display())
            }),
    );
    line(
        "written by",
        format!(
            "vhpc {} at unix ms {}",
            b.meta.vhpc_version, b.meta.created_unix_ms
        ),
    );
    line(
        "host",
        format!(
            "CPU \"{}\", kernel {}",
            b.meta.host.cpu_model, b.meta.host.kernel_release
        ),
    );
    let cfg = &b.config;
    line(
        "vm",
        format!(
            "{} vCPUs, {} MiB, kernel {}, cmdline \"{}\"",
            cfg.vcpus,
            cfg.memory.size_mib,
            cfg.kernel.display(),
            cfg.cmdline
        ),
    );
    for r in &b.memory.regions {
        line(
            "region",
            format!(
                "guest {:#x} + {} at file offset {:#x}",
                r.guest_addr,
                mib(r.len),
                r.file_offset
            ),
        );
    }
    let (file, what) = match &b.memory.contents {
        MemoryContents::Full { file, .. } => (file, "non-zero pages"),
        MemoryContents::Delta { file, runs, .. } => {
            line("delta", format!("{} runs of dirty pages", runs.len()));
            (file, "dirty pages")
        }
    };
    line(
        "memory",
        format!(
            "{file}: {} apparent, {} allocated, {} {what}, CRC-32 ok",
            mib(i.memory_file_len),
            mib(i.memory_file_allocated),
            i.memory_pages
        ),
    );
    for comp in &b.components {
        line(
            "component",
            format!("{} v{}, {} bytes", comp.name, comp.version, comp.data.len()),
        );
    }
    // Where each vCPU was: the first thing to look at in a checkpoint of a guest that hung.
    match snapshot::components::decode(b) {
        Ok(machine) => {
            for (n, v) in machine.vcpus.iter().enumerate() {
                line(&format!("vcpu{n}"), vcpu_summary(v));
            }
        }
        Err(e) => line("vcpus", format!("cannot decode: {e}")),
    }
    line(
        "disks",
        if b.disks.is_empty() {
            "none".into()
        } else {
            format!("{}", b.disks.len())
        },
    );
    line(
        "chain",
        format!("{} checkpoint(s), every link checked", i.chain_len),
    );
    out
}

/// A vCPU's instruction and stack pointers and paging registers, on one line.
fn vcpu_summary(v: &vhpc_vmm::VcpuState) -> String {
    let (r, s) = (&v.regs, &v.sregs);
    format!(
        "rip={:#x} rsp={:#x} rflags={:#x} cs={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
        r.rip, r.rsp, r.rflags, s.cs.selector, s.cr0, s.cr2, s.cr3, s.cr4, s.efer
    )
}

/// `vhpc restore DIR`: a new VM from the checkpoint, run until the guest ends.
pub fn restore(args: RestoreArgs) -> anyhow::Result<i32> {
    if let Some(name) = &args.name {
        return crate::vm::commands::restore_named(
            &args.dir,
            name,
            args.force,
            args.prefault,
            RESTORE_READY_TIMEOUT,
        );
    }
    let io = VmIo {
        console: if args.console {
            Box::new(std::io::stderr())
        } else {
            Box::new(std::io::sink())
        },
        agent: Box::new(std::io::sink()),
        extra_initramfs: Vec::new(),
        vsock: None,
        timeout: None,
    };
    let opts = RestoreOptions {
        force: args.force,
        prefault: args.prefault,
    };
    let mut vm = snapshot::restore(&args.dir, io, opts)
        .with_context(|| format!("cannot restore {}", args.dir.display()))?;
    vm.start()?;
    let outcome = vm.wait(args.timeout.map(Duration::from_secs));
    Ok(match outcome {
        VmOutcome::PowerOff | VmOutcome::Reset => 0,
        VmOutcome::Exit(status) => i32::from(status),
        VmOutcome::Panic => {
            eprintln!("vhpc: the restored guest panicked");
            exit_codes::GUEST_PANIC
        }
        VmOutcome::TimedOut => {
            eprintln!("vhpc: the VM ran past --timeout and was stopped");
            exit_codes::TIMED_OUT
        }
        VmOutcome::Crash(reason) => {
            eprintln!("vhpc: the restored VM stopped: {reason}");
            exit_codes::VHPC_ERROR
        }
    })
}
