//! Stage one → the root file system: with `vhpc.root=DEVICE` on the kernel command line, /init
//! mounts DEVICE (ext4), moves /dev, /proc, /sys, /tmp and /run into it, frees the initramfs
//! and makes DEVICE the root, then runs the command (or the serve agent) there.
//!
//! The initramfs is the kernel's rootfs, which cannot be pivoted away: like busybox's
//! switch_root we empty it, move the new root over `/` and chroot into it.

use std::ffi::CString;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::protocol::ROOT_FLAG;

/// Where the root device is mounted before it becomes `/`.
const NEW_ROOT: &str = "/newroot";
/// Mounts carried over into the new root (their submounts, like /dev/pts, come along).
const CARRIED: &[&str] = &["/dev", "/proc", "/sys", "/tmp", "/run"];
/// How long the root device may take to appear (virtio_blk probes while /init runs on).
const DEVICE_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum SwitchRootError {
    #[error(
        "the root device {0} did not appear within 10 s; the VM needs the image as its first \
         disk (vhpc run --rootfs IMG adds it as /dev/vda)"
    )]
    NoDevice(String),
    #[error(
        "cannot mount the root device {device} as ext4: {source}; is it an image built by \
         `vhpc image rootfs`?"
    )]
    Mount {
        device: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot mount the read-only root device {0}: its ext4 journal needs recovery (the last \
         guest that wrote it did not shut down cleanly); boot it read-write once"
    )]
    NeedsRecovery(String),
    #[error(
        "the root file system on {0} has no /bin/sh; is it an image built by `vhpc image rootfs`?"
    )]
    NotARoot(String),
    #[error("cannot {action} {path}: {source}")]
    Step {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The device named by `vhpc.root=` on the kernel command line, if any.
pub fn requested_device(cmdline: &str) -> Option<&str> {
    let prefix = format!("{ROOT_FLAG}=");
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix(prefix.as_str()))
        .filter(|d| !d.is_empty())
}

/// Makes `device` the root file system; afterwards `/` is the device and the initramfs' files
/// are gone (read everything needed from it first). Returns whether it was mounted read-only.
pub fn switch_to(device: &str) -> Result<bool, SwitchRootError> {
    wait_for(device)?;
    mkdir(Path::new(NEW_ROOT))?;
    let read_only = mount_root(device)?;
    if !Path::new(NEW_ROOT).join("bin/sh").exists() {
        let _ = umount(NEW_ROOT);
        return Err(SwitchRootError::NotARoot(device.to_owned()));
    }
    for &mount in CARRIED {
        let target = format!("{NEW_ROOT}{mount}");
        if !Path::new(&target).is_dir() {
            // A read-only root without the mount point cannot get one: leave that mount behind.
            if read_only || mkdir(Path::new(&target)).is_err() {
                continue;
            }
        }
        move_mount(mount, &target)?;
    }
    let root_dev = std::fs::symlink_metadata("/")
        .map_err(step("stat", "/"))?
        .dev();
    remove_initramfs(Path::new("/"), root_dev);
    std::env::set_current_dir(NEW_ROOT).map_err(step("enter", NEW_ROOT))?;
    move_mount(".", "/")?;
    let dot = c".";
    // SAFETY: `dot` is a valid NUL-terminated string; chroot only reads it.
    if unsafe { libc::chroot(dot.as_ptr()) } != 0 {
        return Err(step("chroot into", NEW_ROOT)(io::Error::last_os_error()));
    }
    std::env::set_current_dir("/").map_err(step("enter", "/"))?;
    Ok(read_only)
}

fn step(action: &'static str, path: &str) -> impl FnOnce(io::Error) -> SwitchRootError {
    let path = PathBuf::from(path);
    move |source| SwitchRootError::Step {
        action,
        path,
        source,
    }
}

fn wait_for(device: &str) -> Result<(), SwitchRootError> {
    let deadline = Instant::now() + DEVICE_WAIT;
    while !Path::new(device).exists() {
        if Instant::now() >= deadline {
            return Err(SwitchRootError::NoDevice(device.to_owned()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn mkdir(path: &Path) -> Result<(), SwitchRootError> {
    match std::fs::create_dir(path) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(SwitchRootError::Step {
            action: "create",
            path: path.to_owned(),
            source: e,
        }),
        _ => Ok(()),
    }
}

fn cstring(s: &str) -> CString {
    CString::new(s).unwrap_or_default()
}

/// Mounts read-write, or read-only if the disk is (a `,ro` disk refuses writes).
fn mount_root(device: &str) -> Result<bool, SwitchRootError> {
    let (dev, target, fstype) = (cstring(device), cstring(NEW_ROOT), c"ext4");
    let mut last = io::Error::from(io::ErrorKind::InvalidInput);
    for (flags, read_only) in [(0, false), (libc::MS_RDONLY, true)] {
        // SAFETY: every pointer is a valid NUL-terminated string that outlives the call;
        // mount(2) only reads them; no data argument.
        let rc = unsafe {
            libc::mount(
                dev.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                flags,
                std::ptr::null(),
            )
        };
        if rc == 0 {
            return Ok(read_only);
        }
        last = io::Error::last_os_error();
        let readonly_disk = matches!(last.raw_os_error(), Some(libc::EROFS | libc::EACCES));
        if read_only && last.raw_os_error() == Some(libc::EROFS) {
            // ext4 refuses a read-only mount only when its journal must be replayed first.
            return Err(SwitchRootError::NeedsRecovery(device.to_owned()));
        }
        if !readonly_disk {
            break;
        }
    }
    Err(SwitchRootError::Mount {
        device: device.to_owned(),
        source: last,
    })
}

fn move_mount(from: &str, to: &str) -> Result<(), SwitchRootError> {
    let (src, dst) = (cstring(from), cstring(to));
    // SAFETY: both are valid NUL-terminated strings that outlive the call; with MS_MOVE the
    // type and data arguments are ignored and may be null.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            std::ptr::null(),
            libc::MS_MOVE,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(SwitchRootError::Step {
            action: "move the mount to",
            path: PathBuf::from(to),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

fn umount(path: &str) -> io::Result<()> {
    let p = cstring(path);
    // SAFETY: `p` is a valid NUL-terminated string; umount only reads it.
    if unsafe { libc::umount(p.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Remounts `/` read-only before power-off, so a root disk is left clean (an ext4 journal
/// that needs no recovery; a read-only disk could not recover it at the next boot). Fails
/// harmlessly (EBUSY) while some process still holds a file open for writing.
pub fn remount_root_read_only() {
    let root = c"/";
    // SAFETY: `root` is a valid NUL-terminated string; with MS_REMOUNT the source, type and
    // data arguments are ignored and may be null.
    let rc = unsafe {
        libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REMOUNT | libc::MS_RDONLY,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let err = io::Error::last_os_error();
        crate::kmsg::warn(&format!(
            "cannot remount / read-only before power-off: {err}"
        ));
    }
}

/// Deletes the initramfs' files to give their memory back: everything under `dir` on the
/// device `dev`, never crossing into another file system (the new root and the moved mounts
/// are on other devices) and never following symlinks. Failures only cost memory.
fn remove_initramfs(dir: &Path, dev: u64) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.dev() != dev {
            continue;
        }
        if meta.is_dir() {
            remove_initramfs(&path, dev);
            let _ = std::fs::remove_dir(&path);
        } else {
            let _ = std::fs::remove_file(&path);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn root_device_from_the_command_line() {
        let line = "console=ttyS0 quiet vhpc.root=/dev/vda vhpc.agent=serve";
        assert_eq!(requested_device(line), Some("/dev/vda"));
        assert_eq!(requested_device("console=ttyS0 vhpc.root="), None);
        assert_eq!(requested_device("console=ttyS0 xvhpc.root=/dev/vdb"), None);
        assert_eq!(requested_device(""), None);
    }

    #[test]
    fn initramfs_removal_stays_on_its_device_and_skips_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let keep = tempfile::tempdir().unwrap();
        std::fs::write(keep.path().join("precious"), b"x").unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(root.join("a/b/f"), b"x").unwrap();
        std::os::unix::fs::symlink(keep.path(), root.join("link")).unwrap();
        let dev = std::fs::metadata(root).unwrap().dev();
        remove_initramfs(root, dev);
        assert_eq!(std::fs::read_dir(root).unwrap().count(), 0);
        assert!(
            keep.path().join("precious").exists(),
            "a symlink is not followed"
        );
        // Entries on another device (here: everything, by pretending / is elsewhere) stay.
        std::fs::write(root.join("other-dev"), b"x").unwrap();
        remove_initramfs(root, dev.wrapping_add(1));
        assert!(root.join("other-dev").exists());
    }
}
