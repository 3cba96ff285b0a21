//! Guest artefacts: the kernel, its modules and the initramfs that boots our agent.
//!
//! The guest kernel is Debian's stock cloud kernel, fetched with `apt-get download` into a
//! local [`cache::Cache`] ([`kernel::fetch_kernel`]). The initramfs is an uncompressed newc
//! archive ([`cpio::CpioWriter`]) holding the static `vhpc` binary as `/init`, a static
//! busybox, and the virtio modules the cloud kernel builds as modules, with their dependencies
//! read from each module's `.modinfo` ([`modules::resolve`]). The command a VM runs travels as
//! a tiny second archive appended at boot ([`initramfs::command_archive`]), so one initramfs
//! serves every run.

pub mod cache;
pub mod cpio;
pub mod initramfs;
pub mod kernel;
pub mod modules;
pub mod rootfs;
