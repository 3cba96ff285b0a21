//! The virtual test lab: emulated hosts (QEMU's TCG emulator with nested SVM) that boot the
//! Debian cloud kernel, load kvm-amd, and run the VMM inside with hardware-KVM semantics.
//!
//! An emulated host's /init is the same `vhpc` agent the VMM's guests use: the shell command
//! travels in an appended cpio archive, its output and status come back framed on the host's
//! second serial port (QEMU's stdout here), and the console goes to a log file. Several hosts
//! can share one lab network ([`network`]) and run commands on each other
//! ([`command_service`]).

pub mod command_service;
mod host_image;
pub mod network;
mod qemu;

pub use host_image::{HOST_MODULES, build_host_initramfs};
pub use qemu::{LabHost, LabOutcome, LabRun};

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("{0} not found: install it with `apt-get install -y {1}`")]
    MissingTool(&'static str, &'static str),
    #[error("{what} {path} is missing: run `{fix}` first")]
    MissingInput {
        what: &'static str,
        path: std::path::PathBuf,
        fix: &'static str,
    },
    #[error("building the emulated host's initramfs failed: {0}")]
    Image(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("--hosts {0}: a lab has 1 to 8 hosts")]
    Hosts(u32),
    #[error("no free UDP ports on 127.0.0.1 for the lab network; try again")]
    NoPorts,
    #[error("the emulated host (QEMU) failed to start: {0}")]
    Qemu(String),
}

impl LabError {
    fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LabError {
        let what = what.into();
        move |source| LabError::Io { what, source }
    }
}
