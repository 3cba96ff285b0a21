//! Direct Linux boot: load the kernel, the initramfs and the command line into guest memory,
//! write boot_params with the e820 map, and give the boot vCPU its 64-bit entry state.

pub mod cpu_state;
pub mod loader;
pub mod params;

pub use loader::{KernelFormat, LoadedKernel};

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel {path}: {source}")]
    OpenKernel {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a Linux kernel: expected a bzImage (\"HdrS\" header) or an ELF vmlinux")]
    NotAKernel { path: std::path::PathBuf },
    #[error("cannot load kernel {path}: {detail}")]
    LoadKernel {
        path: std::path::PathBuf,
        detail: String,
    },
    #[error("cannot read initramfs {path}: {source}")]
    ReadInitramfs {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the initramfs ({initrd_mib} MiB) does not fit in guest memory below {limit:#x} after the kernel; give the VM more --memory"
    )]
    InitramfsTooBig { initrd_mib: u64, limit: u64 },
    #[error("the kernel command line is {len} bytes, but this kernel accepts at most {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("cannot write {what} into guest memory: {detail}")]
    GuestWrite { what: &'static str, detail: String },
}
