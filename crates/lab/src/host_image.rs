//! The emulated host's initramfs: our agent as /init, busybox, the KVM modules, `vhpc` on
//! PATH, the cached guest kernel and initramfs at their default paths, optionally QEMU, and
//! the command to run.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::process::Command;

use vhpc_image::cache::Cache;
use vhpc_image::cpio::CpioWriter;
use vhpc_image::initramfs;

use crate::LabError;

/// Modules the emulated host loads (their dependencies are resolved from the modules):
/// KVM, virtio-blk for the disks `vhpc lab run --disk` attaches, virtio-net for the lab
/// network of `--hosts N`, and TAP devices and bridges (with stp and llc) for VM networks.
pub const HOST_MODULES: &[&str] = &[
    "kvm-amd",
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "tun",
    "bridge",
];

/// Where the guest kernel and initramfs go inside the host: the cache of root's home.
const HOST_CACHE_DIR: &str = "root/.cache/vhpc";

fn image_err(e: impl std::fmt::Display) -> LabError {
    LabError::Image(e.to_string())
}

/// Writes the host initramfs for running `argv` to `out`. Uncompressed: decompressing it under
/// the emulator would cost seconds at every boot.
pub fn build_host_initramfs(
    cache: &Cache,
    vhpc_binary: &Path,
    with_qemu: bool,
    argv: &[String],
    out: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<(), LabError> {
    let kernel = cache.kernel_path();
    if !kernel.exists() {
        return Err(LabError::MissingInput {
            what: "the guest kernel",
            path: kernel,
            fix: "vhpc image kernel",
        });
    }
    progress("building the emulated host's initramfs");
    let file =
        File::create(out).map_err(LabError::io(format!("cannot create {}", out.display())))?;
    let mut w = CpioWriter::new(BufWriter::new(file));
    initramfs::add_base(&mut w, vhpc_binary, Path::new("/bin/busybox")).map_err(image_err)?;
    initramfs::add_modules(&mut w, cache, HOST_MODULES).map_err(image_err)?;
    w.add_symlink("usr/local/bin/vhpc", "/init")
        .map_err(image_err)?;
    add_guest_images(&mut w, cache, vhpc_binary, out)?;
    if with_qemu {
        progress("adding qemu-system-x86_64 and its libraries");
        add_qemu(&mut w)?;
    }
    let mut inner = w.finish().map_err(image_err)?;
    // The command archive follows the main one, 4-byte aligned (newc archives end aligned).
    inner
        .write_all(&initramfs::command_archive(argv))
        .and_then(|()| inner.flush())
        .map_err(LabError::io(format!("cannot write {}", out.display())))
}

/// The guest kernel from the cache, and a guest initramfs built afresh around `vhpc_binary`
/// (the host's own /init): a cached initramfs made by an older build would run an older agent
/// in the guests, and the lab must test the code at hand.
fn add_guest_images<W: Write>(
    w: &mut CpioWriter<W>,
    cache: &Cache,
    vhpc_binary: &Path,
    out: &Path,
) -> Result<(), LabError> {
    let mut dir = String::new();
    for part in HOST_CACHE_DIR.split('/') {
        if !dir.is_empty() {
            dir.push('/');
        }
        dir.push_str(part);
        w.add_dir(&dir, 0o755).map_err(image_err)?;
    }
    w.add_file_from_path(
        &format!("{HOST_CACHE_DIR}/vmlinuz"),
        0o644,
        &cache.kernel_path(),
    )
    .map_err(image_err)?;
    let guest_initramfs = out.with_extension("guest.cpio");
    initramfs::build_guest_initramfs(
        cache,
        vhpc_binary,
        Path::new("/bin/busybox"),
        &guest_initramfs,
        &mut |_| {},
    )
    .map_err(image_err)?;
    let added = w.add_file_from_path(
        &format!("{HOST_CACHE_DIR}/initramfs.cpio"),
        0o644,
        &guest_initramfs,
    );
    let _ = std::fs::remove_file(&guest_initramfs);
    added.map_err(image_err)
}

/// QEMU, every shared library `ldd` names, and its firmware, so QEMU runs in the host too.
fn add_qemu<W: Write>(w: &mut CpioWriter<W>) -> Result<(), LabError> {
    let qemu = Path::new("/usr/bin/qemu-system-x86_64");
    let ldd = Command::new("ldd")
        .arg(qemu)
        .output()
        .map_err(LabError::io("cannot run ldd on qemu-system-x86_64"))?;
    let mut files = vec![qemu.to_path_buf()];
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        // "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = line
            .split("=>")
            .last()
            .unwrap_or("")
            .split_whitespace()
            .next();
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            files.push(p.into());
        }
    }
    let mut dirs = std::collections::BTreeSet::new();
    for f in &files {
        add_parent_dirs(w, f, &mut dirs)?;
        let real = std::fs::canonicalize(f)
            .map_err(LabError::io(format!("cannot resolve {}", f.display())))?;
        let name = f.to_string_lossy();
        w.add_file_from_path(name.trim_start_matches('/'), 0o755, &real)
            .map_err(image_err)?;
    }
    for share in ["/usr/share/qemu", "/usr/share/seabios"] {
        add_tree(w, Path::new(share), &mut dirs)?;
    }
    Ok(())
}

fn add_parent_dirs<W: Write>(
    w: &mut CpioWriter<W>,
    path: &Path,
    done: &mut std::collections::BTreeSet<String>,
) -> Result<(), LabError> {
    let mut parents: Vec<&Path> = path.ancestors().skip(1).collect();
    parents.reverse();
    for p in parents {
        let rel = p.to_string_lossy().trim_start_matches('/').to_string();
        if !rel.is_empty() && done.insert(rel.clone()) {
            w.add_dir(&rel, 0o755).map_err(image_err)?;
        }
    }
    Ok(())
}

/// Adds a directory tree, following symlinks to files (Debian links firmware between packages).
fn add_tree<W: Write>(
    w: &mut CpioWriter<W>,
    dir: &Path,
    done: &mut std::collections::BTreeSet<String>,
) -> Result<(), LabError> {
    add_parent_dirs(w, &dir.join("x"), done)?;
    let entries =
        std::fs::read_dir(dir).map_err(LabError::io(format!("cannot list {}", dir.display())))?;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            add_tree(w, &path, done)?;
        } else if path.is_file() {
            let name = path.to_string_lossy();
            w.add_file_from_path(name.trim_start_matches('/'), 0o644, &path)
                .map_err(image_err)?;
        }
    }
    Ok(())
}
