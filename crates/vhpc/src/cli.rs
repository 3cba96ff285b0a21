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
    /// Build guest images: the kernel, the initramfs, root file systems.
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
    /// Move a running VM to another VMM process (this host or another) while it runs; the
    /// destination waits with `vhpc vm receive NAME --listen HOST:PORT`.
    Migrate(crate::vm::MigrateArgs),
    /// Copy a file into or out of a long-running VM: `vhpc cp LOCAL NAME:/path` or
    /// `vhpc cp NAME:/path LOCAL` (streamed; permission bits kept).
    Cp(crate::vm::fs_commands::CpArgs),
    /// In a guest: echo every connection on a vsock port (a test service for `vhpc vm
    /// connect`; runs until killed).
    #[command(hide = true)]
    VsockEcho { port: u32 },
    /// Checkpoint a long-running VM (`vhpc snapshot NAME DIR`), or inspect and merge
    /// checkpoints on disk.
    Snapshot(SnapshotArgs),
    /// Start a new VM from a checkpoint (or the chain ending at it): with --name as a
    /// long-running VM, else run it until the guest ends and exit with its status, as
    /// `vhpc run` does.
    Restore(RestoreArgs),
    /// A test program for checkpoints (runs anywhere; in guests as `/init guest-memtest`):
    /// keeps rewriting N MiB and a running checksum, reports progress to a file.
    GuestMemtest(crate::guest_memtest::MemtestArgs),
    /// Inside a guest: send a numbered UDP datagram to a host address at a fixed interval,
    /// forever (used by `vhpc bench migrate` to see a migration's pause from outside).
    #[command(hide = true)]
    GuestTicker(crate::guest_ticker::TickerArgs),
    /// Inside a guest: measure block-device throughput with direct I/O (used by `vhpc bench blk`).
    #[command(hide = true)]
    GuestIo(GuestIoArgs),
}

#[derive(Args)]
pub struct GuestIoArgs {
    /// The block device (or file) to measure.
    #[arg(long)]
    pub dev: PathBuf,
    /// Request size in bytes (a power of two, at least 512).
    #[arg(long, default_value_t = 4096)]
    pub bs: usize,
    /// The span of the device the tests cover, from its start, in MiB.
    #[arg(long, default_value_t = 256)]
    pub size_mib: u64,
    /// How long each test runs.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// The tests, in order.
    #[arg(value_enum, required = true)]
    pub patterns: Vec<crate::guest_io::IoPattern>,
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    pub command: Option<SnapshotCommand>,
    /// The long-running VM to checkpoint (pause, save, resume).
    #[arg(required = true)]
    pub name: Option<String>,
    /// The checkpoint directory (replaced atomically if it exists).
    #[arg(required = true)]
    pub dir: Option<PathBuf>,
    /// Only the pages written since this VM's previous checkpoint (taken by the same VMM).
    #[arg(long)]
    pub incremental: bool,
    /// Stop the VM after the checkpoint (it stays paused, its VMM ends): its disks then stay
    /// as the checkpoint recorded them, so it can be restored.
    #[arg(long)]
    pub stop: bool,
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
    /// Restore as a long-running VM with this name (`vhpc exec NAME`, `vhpc vm ...`) and
    /// return once its guest agent answers.
    #[arg(long, conflicts_with_all = ["console", "timeout"])]
    pub name: Option<String>,
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

/// What a VM is made of: shared by `vhpc run` and `vhpc vm start`.
#[derive(Args)]
pub struct VmShapeArgs {
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 512)]
    pub memory: u64,
    /// Kernel (bzImage or ELF vmlinux); default: the cached Debian kernel.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Initramfs with the vhpc agent as /init; default: the one `vhpc image initramfs` built.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Back guest memory with 2 MiB hugepages (reserve them first).
    #[arg(long)]
    pub hugepages: bool,
    /// Attach a raw disk image as a virtio-blk disk (repeatable: /dev/vda, /dev/vdb, ...);
    /// `,ro` makes it read-only.
    #[arg(long = "disk", value_name = "PATH[,ro]")]
    pub disks: Vec<vhpc_api::DiskConfig>,
    /// Boot with this ext4 image (`vhpc image rootfs`) as the root file system: it becomes
    /// /dev/vda (before any --disk) and the guest's commands run inside it; `,ro` mounts it
    /// read-only.
    #[arg(long, value_name = "IMG[,ro]")]
    pub rootfs: Option<vhpc_api::DiskConfig>,
    /// Add a virtio-net interface (repeatable: eth0, eth1, ...): on TAP device NAME (used if
    /// it exists, else created), or on a new TAP attached to bridge BR (for `vhpc vm start`
    /// named vhpc-VM-N). Default MAC: derived from the TAP's name (`vhpc run`), or from the
    /// VM's name and the interface's index (`vhpc vm start`).
    #[arg(long = "net", value_name = "tap=NAME|bridge=BR[,mac=MAC]")]
    pub nets: Vec<vhpc_api::NetConfig>,
}

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub shape: VmShapeArgs,
    /// Kernel command line (replaces the default).
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Also show the guest's boot log (its serial console) on stderr.
    #[arg(long)]
    pub console: bool,
    /// Write the guest's console log to this file.
    #[arg(long)]
    pub console_log: Option<PathBuf>,
    /// Fault in all guest memory before the guest starts.
    #[arg(long)]
    pub prefault: bool,
    /// Stop the VM (exit status 124) if it runs longer than this many seconds.
    #[arg(long)]
    pub timeout: Option<u64>,
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
    /// Build an ext4 root file system image from Debian bookworm packages (debootstrap
    /// minbase + packages + the vhpc agent); needs root, debootstrap and e2fsprogs. Prints the
    /// image's path.
    Rootfs(RootfsArgs),
    /// Write vhpc's freestanding test guest (a PVH ELF that runs on any KVM) to a file.
    TestGuest {
        /// Output file.
        #[arg(long, default_value = "vhpc-testguest.elf")]
        out: PathBuf,
    },
}

#[derive(Args)]
pub struct RootfsArgs {
    /// Extra Debian packages, comma-separated (repeatable); added to the default set
    /// (openmpi-bin) unless --no-default-packages.
    #[arg(long, value_name = "A,B,...")]
    pub packages: Vec<String>,
    /// Leave out the default packages: minbase plus --packages only.
    #[arg(long)]
    pub no_default_packages: bool,
    /// Image size in GiB (may be fractional); default: the content plus headroom.
    #[arg(long, value_name = "GIB")]
    pub size: Option<f64>,
    /// Debian mirror; default: the one apt's sources name for bookworm, else deb.debian.org.
    #[arg(long, value_name = "URL")]
    pub mirror: Option<String>,
    /// Rebuild even if the output exists.
    #[arg(long)]
    pub force: bool,
    /// Output image; default: rootfs-<hash of the package set>.img in the cache, kept and
    /// reused if it is already there.
    pub out: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum LabCommand {
    /// Boot an emulated host, run SHELL-COMMAND in it with /bin/sh, relay output and status.
    Run(LabRunArgs),
    /// Inside a multi-host lab: run CMD on host K over the lab network; its stdout, stderr
    /// and exit status come back here.
    On(LabOnArgs),
    /// The command service every host of a multi-host lab runs (started by `lab run`).
    #[command(hide = true)]
    Serve {
        #[arg(long, default_value_t = vhpc_lab::network::COMMAND_PORT)]
        port: u16,
    },
}

#[derive(Args)]
pub struct LabOnArgs {
    /// The host: 1..N (hostK, address 10.0.2.(10+K)).
    pub host: u32,
    /// Seconds to keep trying to reach the host (it may still be booting).
    #[arg(long, default_value_t = 300)]
    pub wait: u64,
    /// The command to run there.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

#[derive(Args)]
pub struct LabRunArgs {
    /// vCPUs of the emulated host.
    #[arg(long, default_value_t = 2)]
    pub smp: u32,
    /// Emulated hosts on one lab network (1-8): hostK at 10.0.2.(10+K); SHELL-COMMAND runs
    /// on host1 and reaches the others with `vhpc lab on K -- CMD`.
    #[arg(long, default_value_t = 1)]
    pub hosts: u32,
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
    /// Attach a raw image to the emulated host as a virtio disk (repeatable: /dev/vda,
    /// /dev/vdb, ... there), behind a copy-on-write overlay: the file is never changed.
    /// E.g. a root file system: `--disk IMG -- vhpc run --rootfs /dev/vda -- CMD`.
    #[arg(long = "disk", value_name = "IMG")]
    pub disks: Vec<PathBuf>,
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
    /// virtio-blk throughput in the guest (sequential 1 MiB, random 4 KiB, direct I/O, queue
    /// depth 1), vhpc vs QEMU q35 virtio-blk-pci on the same disk file
    /// (`vhpc lab run --with-qemu --memory 3072 -- vhpc bench blk`).
    Blk(BenchBlkArgs),
    /// Live migration total time and downtime, idle and dirtying guest, vhpc vs QEMU q35 in
    /// one emulated host (`vhpc lab run --with-qemu --memory 3072 -- vhpc bench migrate`).
    Migrate(BenchMigrateArgs),
    /// VM ↔ VM ping round trip and TCP throughput: two vhpc VMs on a bridge vs two QEMU q35
    /// VMs with virtio-net on TAPs on the same bridge (run it in the lab: `vhpc lab run
    /// --with-qemu --memory 3072 -- vhpc bench net`).
    Net(BenchNetArgs),
}

#[derive(Args)]
pub struct BenchMigrateArgs {
    /// Migrations per VMM and guest load, interleaved.
    #[arg(long, default_value_t = 3)]
    pub runs: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 512)]
    pub memory: u64,
    /// How much the dirtying guest keeps rewriting, in MiB.
    #[arg(long, default_value_t = 64)]
    pub dirty_mib: u64,
    /// The downtime target given to both VMMs, in ms.
    #[arg(long, default_value_t = 300)]
    pub downtime_ms: u64,
}

#[derive(Args)]
pub struct BenchBlkArgs {
    /// Boots per VMM, interleaved.
    #[arg(long, default_value_t = 3)]
    pub runs: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 512)]
    pub memory: u64,
    /// Size of the disk (fully written) the tests run over, in MiB.
    #[arg(long, default_value_t = 256)]
    pub disk_mib: u64,
    /// Seconds per test.
    #[arg(long, default_value_t = 5)]
    pub seconds: u32,
    /// Where the disk file goes (a directory on the disk to measure).
    #[arg(long, default_value = "/var/tmp")]
    pub dir: PathBuf,
}

#[derive(Args)]
pub struct BenchNetArgs {
    /// Measured runs per contender (interleaved).
    #[arg(long, default_value_t = 3)]
    pub runs: u32,
    /// Pings per run (one a second).
    #[arg(long, default_value_t = 10)]
    pub pings: u32,
    /// MiB sent over TCP per run.
    #[arg(long, default_value_t = 16)]
    pub mib: u32,
    /// Memory of each VM in MiB.
    #[arg(long, default_value_t = 256)]
    pub memory: u64,
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
