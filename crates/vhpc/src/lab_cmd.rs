//! `vhpc lab ...`: run commands inside emulated hosts with nested KVM.

use std::time::Duration;

use anyhow::Context;
use vhpc_image::cache::Cache;
use vhpc_lab::{LabHost, LabOutcome};

use crate::cli::LabCommand;
use crate::exit_codes;
use crate::relay::{AgentRelay, AgentReport};

pub fn run(cmd: LabCommand) -> anyhow::Result<i32> {
    let args = match cmd {
        LabCommand::Run(args) => args,
        LabCommand::On(args) => return crate::lab_on::run(args),
        LabCommand::Serve { port } => {
            vhpc_lab::command_service::serve(port)?;
            return Ok(0);
        }
    };
    let me = std::env::current_exe().context("cannot find the vhpc binary to put into the lab")?;
    let host = LabHost {
        smp: args.smp,
        memory_mib: args.memory,
        with_qemu: args.with_qemu,
        show_console: args.console,
        disks: args.disks,
        hosts: args.hosts,
        timeout: Duration::from_secs(args.timeout),
    };
    let report = AgentReport::default();
    let mut relay = AgentRelay::new(report.clone());
    let shell_command = args.command.join(" ");
    let run = host.run(
        &Cache::from_env(),
        &me,
        &shell_command,
        &mut relay,
        &mut |l| eprintln!("vhpc lab: {l}"),
    )?;
    Ok(match run.outcome {
        LabOutcome::Exited => match report.exit_status() {
            Some(status) => status,
            None => {
                // The command runs in a process of the emulated host and cannot end the host
                // without a status: its agent reports the status before powering off. So the
                // host's kernel panicked (its console says so) or the emulated machine reset.
                let what = if run.console_tail.contains("Kernel panic") {
                    "the emulated host's kernel panicked"
                } else {
                    "the emulated host reset or stopped (no kernel panic on its console)"
                };
                eprintln!(
                    "vhpc lab: {what} before the command reported its status (exit status {}); \
                     the end of its console:\n{}",
                    exit_codes::LAB_HOST_CRASHED,
                    run.console_tail
                );
                exit_codes::LAB_HOST_CRASHED
            }
        },
        LabOutcome::Hung(after) => {
            // Nothing reached the console, not even the heartbeat host 1 writes every 20 s:
            // the emulated machine froze (as QEMU's nested SVM emulation sometimes does), the
            // command did not end it.
            eprintln!(
                "vhpc lab: the emulated host stopped making progress (its console was silent for \
                 {} s, heartbeat included) and was stopped (exit status {}); the end of its \
                 console:\n{}",
                after.as_secs(),
                exit_codes::LAB_HOST_CRASHED,
                run.console_tail
            );
            exit_codes::LAB_HOST_CRASHED
        }
        LabOutcome::TimedOut => {
            eprintln!(
                "vhpc lab: the emulated host ran past --timeout and was stopped; the end of its \
                 console:\n{}",
                run.console_tail
            );
            exit_codes::TIMED_OUT
        }
    })
}
