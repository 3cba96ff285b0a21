//! `vhpc`: the one binary. On the host it is the command line (`vhpc run|vm|exec|image|lab ...`);
//! copied into an initramfs and started by the kernel as pid 1, it is the guest's /init agent.

mod bench_blk;
mod bench_boot;
mod bench_bridge;
mod bench_direct;
mod bench_measure;
mod bench_migrate;
mod bench_net;
mod bench_qemu;
mod bench_snapshot;
mod cli;
mod exit_codes;
mod guest_io;
mod guest_memtest;
mod guest_ticker;
mod image_cmd;
mod lab_cmd;
mod lab_on;
mod net_names;
mod relay;
mod rootfs_arg;
mod run_cmd;
mod snapshot_cmd;
mod vm;

use clap::Parser;

fn main() {
    if std::process::id() == 1 {
        vhpc_guest::run_init();
    }
    init_logging();
    let cli = cli::Cli::parse();
    let status = match cli.command {
        cli::Command::Run(args) => run_cmd::run(args),
        cli::Command::Image(cmd) => image_cmd::run(cmd),
        cli::Command::Lab(cmd) => lab_cmd::run(cmd),
        cli::Command::Bench(cli::BenchCommand::Boot(args)) => bench_boot::run(args),
        cli::Command::Bench(cli::BenchCommand::Direct(args)) => bench_direct::run(args),
        cli::Command::Vm(cmd) => vm::run(cmd),
        cli::Command::Exec(args) => vm::commands::exec(args),
        cli::Command::Migrate(args) => vm::commands::migrate(args),
        cli::Command::GuestIo(args) => guest_io::run(args),
        cli::Command::Bench(cli::BenchCommand::Blk(args)) => bench_blk::run(args),
        cli::Command::Cp(args) => vm::fs_commands::cp(args),
        cli::Command::VsockEcho { port } => vhpc_guest::vsock::echo(port)
            .map(|()| 0)
            .map_err(|e| anyhow::anyhow!("vsock echo on port {port}: {e}")),
        cli::Command::Bench(cli::BenchCommand::Snapshot(args)) => bench_snapshot::run(args),
        cli::Command::Snapshot(args) => snapshot_cmd::run(args),
        cli::Command::Bench(cli::BenchCommand::Net(args)) => bench_net::run(args),
        cli::Command::Restore(args) => snapshot_cmd::restore(args),
        cli::Command::GuestMemtest(args) => guest_memtest::run(args),
        cli::Command::GuestTicker(args) => guest_ticker::run(args),
        cli::Command::Bench(cli::BenchCommand::Migrate(args)) => bench_migrate::run(args),
    };
    match status {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("vhpc: error: {e:#}");
            std::process::exit(exit_codes::VHPC_ERROR);
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VHPC_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a VMM's stderr is its vmm.log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .init();
}
