//! The pseudo file systems a minimal Linux userland needs, mounted by pid 1.

use std::ffi::CString;
use std::fs::DirBuilder;
use std::io;
use std::os::unix::fs::DirBuilderExt;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum MountError {
    #[error("cannot create mount point {target}: {source}")]
    Mkdir {
        target: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot mount {fstype} on {target}: {source}; the guest kernel may lack {fstype} support"
    )]
    Mount {
        fstype: &'static str,
        target: &'static str,
        #[source]
        source: io::Error,
    },
}

/// One mount done at boot.
struct MountSpec {
    fstype: &'static str,
    target: &'static str,
    flags: libc::c_ulong,
    data: &'static str,
}

/// In order: /dev first, so /dev/kmsg is there to report later failures.
const MOUNTS: &[MountSpec] = &[
    MountSpec {
        fstype: "devtmpfs",
        target: "/dev",
        flags: libc::MS_NOSUID,
        data: "mode=0755",
    },
    MountSpec {
        fstype: "proc",
        target: "/proc",
        flags: libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        data: "",
    },
    MountSpec {
        fstype: "sysfs",
        target: "/sys",
        flags: libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        data: "",
    },
    MountSpec {
        fstype: "devpts",
        target: "/dev/pts",
        flags: libc::MS_NOSUID | libc::MS_NOEXEC,
        data: "gid=5,mode=0620,ptmxmode=0666",
    },
    MountSpec {
        fstype: "tmpfs",
        target: "/tmp",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: "mode=1777",
    },
    MountSpec {
        fstype: "tmpfs",
        target: "/run",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: "mode=0755",
    },
];

/// Mounts everything in [`MOUNTS`], continuing past failures; returns the failures.
pub(crate) fn mount_all() -> Vec<MountError> {
    MOUNTS
        .iter()
        .filter_map(|spec| mount_one(spec).err())
        .collect()
}

fn mount_one(spec: &MountSpec) -> Result<(), MountError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(spec.target)
        .map_err(|source| MountError::Mkdir {
            target: spec.target,
            source,
        })?;
    let mount_err = |source| MountError::Mount {
        fstype: spec.fstype,
        target: spec.target,
        source,
    };
    let invalid = || mount_err(io::Error::from(io::ErrorKind::InvalidInput));
    let fstype = CString::new(spec.fstype).map_err(|_| invalid())?;
    let target = CString::new(spec.target).map_err(|_| invalid())?;
    let data = CString::new(spec.data).map_err(|_| invalid())?;
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call; mount(2)
    // only reads them.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            spec.flags,
            data.as_ptr().cast(),
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    // EBUSY: already mounted (e.g. a kernel built with CONFIG_DEVTMPFS_MOUNT); that is fine.
    if err.raw_os_error() == Some(libc::EBUSY) {
        return Ok(());
    }
    Err(mount_err(err))
}

/// A field of /proc/mounts or /proc/self/mountinfo as it really is: the kernel writes space,
/// tab, newline and backslash in paths as `\ooo` octal escapes.
pub fn unescape_mount_field(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            let s = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(s, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn dev_is_mounted_before_devpts() {
        let pos = |t: &str| MOUNTS.iter().position(|m| m.target == t);
        assert!(pos("/dev") < pos("/dev/pts"));
        assert_eq!(pos("/dev"), Some(0));
    }
}
