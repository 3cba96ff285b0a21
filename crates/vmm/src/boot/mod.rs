//! Direct kernel boot: load the kernel, the initramfs and the command line into guest memory,
//! then either the Linux 64-bit boot protocol (boot_params with the e820 map, long mode; for a
//! bzImage or an ELF without a PVH note) or the PVH boot protocol (hvm_start_info, 32-bit
//! protected mode; for an ELF with a PVH note, such as a vmlinux or vhpc's test guest).

pub mod cpu_state;
pub mod guest_kind;
pub mod loader;
pub mod params;
pub mod pvh;

pub use guest_kind::GuestKind;
pub use loader::{KernelFormat, LoadedKernel};

/// How a vCPU enters the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootEntry {
    /// Linux 64-bit boot protocol: long mode, RSI = boot_params.
    Linux64 { entry: u64 },
    /// PVH: 32-bit protected mode, paging off, EBX = hvm_start_info.
    Pvh { entry: u64 },
}

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel {path}: {source}")]
    OpenKernel {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is not a Linux kernel: expected a bzImage (\"HdrS\" header), an ELF vmlinux, or an ELF with a PVH entry note"
    )]
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
