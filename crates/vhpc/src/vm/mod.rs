//! Long-running VMs: `vhpc vm start|list|pause|resume|stop|api|freeze|thaw`, `vhpc exec`
//! and `vhpc cp`.
//!
//! Each VM is its own VMM process ([`vmm_process`]) with a state directory ([`state_dir`]),
//! serving a REST/JSON API ([`api_server`] over [`http`]) on a Unix socket; it talks to the
//! guest agent through the session protocol ([`agent_client`]). The commands here are clients
//! of that API ([`commands`], [`fs_commands`]); file copies and freezes go through the agent
//! in [`agent_files`].

pub mod agent_client;
pub mod agent_files;
pub mod agent_resume;
pub mod api_server;
pub mod commands;
pub mod fs_commands;
pub mod http;
pub mod migrate_vm;
pub mod state_dir;
pub mod vmm_process;

use std::path::PathBuf;

use clap::{Args, Subcommand};

#[derive(Subcommand)]
pub enum VmCommand {
    /// Start a long-running VM in the background; returns once its guest agent answers.
    Start(StartArgs),
    /// List the VMs: name, state, vCPUs, memory, VMM pid.
    List,
    /// Pause every vCPU of a VM.
    Pause { name: String },
    /// Resume a paused VM.
    Resume { name: String },
    /// Power a VM off (its agent syncs and powers off), kill it after --timeout, remove its state.
    Stop {
        name: String,
        /// Seconds to wait for the guest to power off before killing the VMM.
        #[arg(long, default_value_t = 10)]
        timeout: u64,
    },
    /// Wait for a VM to arrive by live migration (`vhpc migrate NAME --to ADDR` on the
    /// source); returns once listening. The VM then runs here under NAME.
    Receive(ReceiveArgs),
    /// Call a VM's REST API: print the response body; exit 0 for a 2xx status, else 1.
    Api(ApiArgs),
    /// Sync and freeze guest file systems (writes block until thaw, or until --timeout).
    Freeze(fs_commands::FreezeArgs),
    /// Thaw the file systems `vhpc vm freeze` froze.
    Thaw { name: String },
    /// Connect standard input and output to a guest's vsock port (through NAME/vsock.sock).
    Connect {
        name: String,
        /// The guest's vsock port.
        port: u32,
    },
    /// The VMM process of one VM (started by `vhpc vm start`).
    #[command(hide = true)]
    Serve(ServeArgs),
}

#[derive(Args)]
pub struct StartArgs {
    /// The VM's name: letters, digits, '.', '_', '-'; unique among running VMs.
    pub name: String,
    #[command(flatten)]
    pub shape: crate::cli::VmShapeArgs,
    /// The guest's vsock CID (its agent is reached over virtio-vsock).
    #[arg(long, default_value_t = vhpc_api::DEFAULT_GUEST_CID)]
    pub cid: u64,
    /// Seconds to wait for the guest agent to answer.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
    /// Kernel command-line arguments added after vhpc's defaults, e.g. 'isolcpus=1
    /// nohz_full=1', or 'loglevel=7' to see the guest's boot in console.log.
    #[arg(long, value_name = "ARGS")]
    pub append: Option<String>,
}

#[derive(Args)]
pub struct ExecArgs {
    /// The VM to run the command in.
    pub name: String,
    /// Send our standard input to the command (at most 512 KiB); default: /dev/null.
    #[arg(long)]
    pub stdin: bool,
    /// The command to run in the guest.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

#[derive(Args)]
pub struct ApiArgs {
    /// The VM.
    pub name: String,
    /// HTTP method (GET, PUT, POST).
    #[arg(required_unless_present = "raw")]
    pub method: Option<String>,
    /// Path, e.g. /vm.
    #[arg(required_unless_present = "raw")]
    pub path: Option<String>,
    /// JSON request body.
    pub body: Option<String>,
    /// Send standard input as the whole raw HTTP request and print the raw response.
    #[arg(long, conflicts_with_all = ["method", "path", "body"])]
    pub raw: bool,
}

#[derive(Args)]
pub struct ServeArgs {
    /// The VM's state directory.
    #[arg(long)]
    pub dir: PathBuf,
    /// The inherited fd holding the lock on the state directory's pid file.
    #[arg(long)]
    pub lock_fd: i32,
    /// Restore this checkpoint instead of booting (`vhpc restore DIR --name NAME`).
    #[arg(long)]
    pub restore: Option<PathBuf>,
    /// With --restore or --incoming: accept another host CPU model or changed disks.
    #[arg(long)]
    pub force: bool,
    /// With --restore: read all guest memory now.
    #[arg(long, requires = "restore")]
    pub prefault: bool,
    /// Receive the VM by live migration on this HOST:PORT instead of booting it.
    #[arg(long, conflicts_with = "restore")]
    pub incoming: Option<String>,
    /// With --incoming: seconds to wait for the migration.
    #[arg(long, default_value_t = 600)]
    pub incoming_timeout: u64,
}

#[derive(Args)]
pub struct ReceiveArgs {
    /// The name the VM gets here.
    pub name: String,
    /// Where to listen, HOST:PORT (e.g. 0.0.0.0:7000).
    #[arg(long)]
    pub listen: String,
    /// Take the VM even from a host with another CPU model, or with disks that look changed.
    #[arg(long)]
    pub force: bool,
    /// Seconds to wait for the migration to arrive.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
}

#[derive(Args)]
pub struct MigrateArgs {
    /// The VM to move.
    pub name: String,
    /// The destination, HOST:PORT, where `vhpc vm receive` listens.
    #[arg(long)]
    pub to: String,
    /// The longest pause of the guest to aim for, in milliseconds.
    #[arg(long, default_value_t = 300)]
    pub downtime_ms: u64,
}

/// Runs a `vhpc vm` subcommand; returns the exit status.
pub fn run(command: VmCommand) -> anyhow::Result<i32> {
    match command {
        VmCommand::Start(args) => commands::start(args),
        VmCommand::List => commands::list(),
        VmCommand::Pause { name } => commands::put(&name, "/vm/pause"),
        VmCommand::Resume { name } => commands::put(&name, "/vm/resume"),
        VmCommand::Stop { name, timeout } => commands::stop(&name, timeout),
        VmCommand::Api(args) => commands::api(args),
        VmCommand::Receive(args) => commands::receive(args),
        VmCommand::Freeze(args) => fs_commands::freeze(args),
        VmCommand::Thaw { name } => fs_commands::thaw(&name),
        VmCommand::Connect { name, port } => fs_commands::connect(&name, port),
        VmCommand::Serve(args) => vmm_process::run(args),
    }
}
