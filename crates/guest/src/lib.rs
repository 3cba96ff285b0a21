//! The guest side of vhpc: the static `/init` agent and its wire protocol.
//!
//! The single `vhpc` binary is copied into the guest initramfs as `/init`; running as pid 1 it
//! calls [`run_init`], which mounts the basic file systems, loads the kernel modules listed by
//! the host, brings up `lo`, runs the command from [`protocol::COMMAND_PATH`], streams its output and exit
//! status as [`protocol::Frame`]s over [`protocol::AGENT_TTY`], and powers the machine off.
//! With [`protocol::SERVE_FLAG`] on the kernel command line it instead serves
//! [`protocol::session`] requests (exec, health, file copy, freeze/thaw, power-off) on vsock
//! port [`protocol::AGENT_VSOCK_PORT`] until asked to power off.
//! With [`protocol::ROOT_FLAG`] it first makes a disk the root file system (stage one of a
//! two-stage boot: the initramfs loads the drivers, the disk holds the distribution).
//! The same agent serves as `/init` of the lab's emulated hosts.

mod files;
mod freeze;
mod hostname;
mod init;
mod kmsg;
mod loopback;
mod modules;
mod mounts;
pub mod protocol;
pub mod relay;
mod serve;
mod switch_root;
mod tty;
pub mod vsock;

pub use mounts::unescape_mount_field;

pub use init::{InitError, run_init};
