//! The command line.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "vhpc", version, about = "System-level virtualization for HPC")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Boot a fresh VM, run a command in it, print its output and exit with its status.
    Run(RunArgs),
    /// Build guest images: the kernel and the initramfs.
    #[command(subcommand)]
    Image(ImageCommand),
    /// The nested-KVM test lab: emulated hosts (QEMU TCG with nested SVM).
    #[command(subcommand)]
    Lab(LabCommand),
    /// Benchmarks: vhpc side by side with QEMU on the same guest.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Long-running VMs: start, list, pause, resume, stop, and their REST API.
    #[command(subcommand)]
    Vm(crate::vm::VmCommand),
    /// Run a command in a long-running VM; its output streams here, its status is ours.
    Exec(crate::vm::ExecArgs),
    /// Copy a file into or out of a long-running VM: `vhpc cp LOCAL NAME:/path` or
    /// `vhpc cp NAME:/path LOCAL` (streamed; permission bits kept).
    Cp(crate::vm::fs_commands::CpArgs),
    /// In a guest: echo every connection on a vsock port (a test service for `vhpc vm
    /// connect`; runs until killed).
    #[command(hide = true)]
    VsockEcho { port: u32 },
    /// Checkpoints on disk: inspect and verify one, merge a chain into one.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Start a new VM from a checkpoint (or the chain ending at it) and run it until the guest
    /// ends; exit with the guest's status, as `vhpc run` does.
    Restore(RestoreArgs),
}

#[derive(Subcommand)]
pub enum SnapshotCommand {
    /// Print a checkpoint's header, host, VM config, components and sizes; verify its
    /// checksums (state and memory) and the chain it ends.
    Inspect {
        /// The checkpoint directory.
        dir: PathBuf,
    },
    /// Fold the chain ending at DIR (a full checkpoint and its incremental children) into one
    /// full checkpoint OUT.
    Merge {
        /// The last checkpoint of the chain.
        dir: PathBuf,
        /// Where the merged checkpoint goes (a new directory, or one to replace atomically).
        out: PathBuf,
    },
}

#[derive(Args)]
pub struct RestoreArgs {
    /// The checkpoint directory.
    pub dir: PathBuf,
    /// Show the guest's serial console on stderr.
    #[arg(long)]
    pub console: bool,
    /// Restore even if the checkpoint was made on a host with another CPU model, or its disks
    /// changed since.
    #[arg(long)]
    pub force: bool,
    /// Read all guest memory now instead of on first touch.
    #[arg(long)]
    pub prefault: bool,
    /// Stop the VM (exit status 124) if it runs longer than this many seconds.
    #[arg(long)]
    pub timeout: Option<u64>,
}

#[derive(Args)]
pub struct RunArgs {
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 512)]
    pub memory: u64,
    /// Kernel (bzImage or ELF vmlinux); default: the cached Debian kernel.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Initramfs; default: the one `vhpc image initramfs` built.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line (replaces the default).
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Also show the guest's boot log (its serial console) on stderr.
    #[arg(long)]
    pub console: bool,
    /// Write the guest's console log to this file.
    #[arg(long)]
    pub console_log: Option<PathBuf>,
    /// Back guest memory with 2 MiB hugepages (reserve them first).
    #[arg(long)]
    pub hugepages: bool,
    /// Fault in all guest memory before the guest starts.
    #[arg(long)]
    pub prefault: bool,
    /// Stop the VM (exit status 124) if it runs longer than this many seconds.
    #[arg(long)]
    pub timeout: Option<u64>,
    /// Attach a raw disk image as a virtio-blk disk (repeatable: /dev/vda, /dev/vdb, ...);
    /// `,ro` makes it read-only.
    #[arg(long = "disk", value_name = "PATH[,ro]")]
    pub disks: Vec<vhpc_api::DiskConfig>,
    /// Give the guest a virtio-vsock device whose host end is this Unix socket: clients
    /// connect and write `CONNECT <port>\n`; guest connections to host port P go to
    /// `PATH_P`.
    #[arg(long, value_name = "PATH")]
    pub vsock: Option<PathBuf>,
    /// The guest's vsock CID (with --vsock).
    #[arg(long, default_value_t = vhpc_api::DEFAULT_GUEST_CID, requires = "vsock")]
    pub vsock_cid: u64,
    /// The command to run in the guest.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Fetch Debian's cloud kernel (linux-image-cloud-amd64) into the cache.
    Kernel,
    /// Build the default guest initramfs (our /init, busybox, virtio modules).
    Initramfs {
        /// Output file; default: the cache's initramfs.cpio.
        #[arg(long)]
        out: Option<PathBuf>,
        /// busybox binary to include (a static one).
        #[arg(long, default_value = "/bin/busybox")]
        busybox: PathBuf,
    },
    /// Write vhpc's freestanding test guest (a PVH ELF that runs on any KVM) to a file.
    TestGuest {
        /// Output file.
        #[arg(long, default_value = "vhpc-testguest.elf")]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum LabCommand {
    /// Boot an emulated host, run SHELL-COMMAND in it with /bin/sh, relay output and status.
    Run(LabRunArgs),
}

#[derive(Args)]
pub struct LabRunArgs {
    /// vCPUs of the emulated host.
    #[arg(long, default_value_t = 2)]
    pub smp: u32,
    /// Memory of the emulated host in MiB.
    #[arg(long, default_value_t = 2048)]
    pub memory: u64,
    /// Also put qemu-system-x86_64 into the emulated host (for side-by-side benchmarks).
    #[arg(long)]
    pub with_qemu: bool,
    /// Show the emulated host's console on stderr.
    #[arg(long)]
    pub console: bool,
    /// Stop the emulated host (exit status 124) after this many seconds.
    #[arg(long, default_value_t = 1800)]
    pub timeout: u64,
    /// The shell command to run in the emulated host.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Boot-to-/init time and memory of `vhpc run` vs QEMU microvm and q35, same kernel and
    /// initramfs (run it in the lab: `vhpc lab run --with-qemu -- vhpc bench boot`).
    Boot(BenchBootArgs),
    /// The VMM's own costs on this host's /dev/kvm with vhpc's test guest, vs QEMU microvm:
    /// start → first line, VMM-only RSS, VM lifecycles per second.
    Direct(BenchDirectArgs),
    /// Checkpoint size and time against guest memory touched, restore latency against guest
    /// memory size (lazy mapping), with vhpc's test guest on this host's /dev/kvm; QEMU's
    /// migrate-to-file and -incoming on the same guest beside it.
    Snapshot(BenchSnapshotArgs),
}

#[derive(Args)]
pub struct BenchSnapshotArgs {
    /// Measured runs per point (after one warm-up round).
    #[arg(long, default_value_t = 5)]
    pub runs: u32,
    /// Where the checkpoints are written (a directory on the disk to measure).
    #[arg(long, default_value = "/var/tmp")]
    pub dir: PathBuf,
    /// Skip QEMU.
    #[arg(long)]
    pub no_qemu: bool,
}

#[derive(Args)]
pub struct BenchBootArgs {
    /// Measured boots per VMM (after one warm-up round).
    #[arg(long, default_value_t = 10)]
    pub runs: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 512)]
    pub memory: u64,
}

#[derive(Args)]
pub struct BenchDirectArgs {
    /// Measured runs per VMM (after one warm-up round).
    #[arg(long, default_value_t = 20)]
    pub runs: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    pub memory: u64,
}
