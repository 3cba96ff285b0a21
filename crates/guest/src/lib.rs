//! The guest side of vhpc: the static `/init` agent and its wire protocol.
//!
//! The single `vhpc` binary is copied into the guest initramfs as `/init`; running as pid 1 it
//! calls [`run_init`], which mounts the basic file systems, loads the kernel modules listed by
//! the host, runs the command from [`protocol::COMMAND_PATH`], streams its output and exit
//! status as [`protocol::Frame`]s over [`protocol::AGENT_TTY`], and powers the machine off.
//! With [`protocol::SERVE_FLAG`] on the kernel command line it instead serves
//! [`protocol::session`] requests (exec, health, file copy, freeze/thaw, power-off) on vsock
//! port [`protocol::AGENT_VSOCK_PORT`] until asked to power off.
//! The same agent serves as `/init` of the lab's emulated hosts.

mod files;
mod freeze;
mod init;
mod kmsg;
mod modules;
mod mounts;
pub mod protocol;
pub mod relay;
mod serve;
mod tty;
pub mod vsock;

pub use init::{InitError, run_init};
