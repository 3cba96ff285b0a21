//! Freezing file systems for a consistent checkpoint: sync, then FIFREEZE on each mount
//! point (new writes block in the kernel until FITHAW). A freeze never outlives its
//! timeout: a watchdog thread thaws by itself if the host does not, and the agent thaws
//! when the host's session ends.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::kmsg;
use crate::mounts::unescape_mount_field;

/// `_IOWR('X', 119, int)` and `_IOWR('X', 120, int)` from linux/fs.h.
const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;
/// Auto-thaw timeout when the host gives 0.
pub(crate) const DEFAULT_TIMEOUT_SECS: u32 = 60;
/// Longest auto-thaw timeout.
const MAX_TIMEOUT_SECS: u32 = 3600;

#[derive(Default)]
struct State {
    /// Frozen mount points and the open directories the ioctls went to.
    frozen: Vec<(String, File)>,
    /// Bumped by every freeze and thaw, so a watchdog knows whether its freeze is current.
    generation: u64,
}

/// The agent's frozen file systems; cheap to clone (shared with the watchdog thread).
#[derive(Clone, Default)]
pub(crate) struct Freezer(Arc<Mutex<State>>);

impl Freezer {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Syncs and freezes `mount_points` (empty: every mounted file system on a block
    /// device that supports freezing). All or nothing: on an error, what was frozen is
    /// thawed. Returns the frozen mount points.
    pub(crate) fn freeze(
        &self,
        mount_points: &[String],
        timeout_secs: u32,
    ) -> Result<Vec<String>, String> {
        let mut state = self.lock();
        if !state.frozen.is_empty() {
            let list: Vec<&str> = state.frozen.iter().map(|(m, _)| m.as_str()).collect();
            return Err(format!("already frozen: {}; thaw first", list.join(", ")));
        }
        let all = mount_points.is_empty();
        let targets = if all {
            freezable_mounts(&std::fs::read_to_string("/proc/mounts").unwrap_or_default())
        } else {
            mount_points.to_vec()
        };
        // SAFETY: sync has no preconditions.
        unsafe { libc::sync() };
        let mut frozen = Vec::new();
        for target in targets {
            match freeze_one(&target) {
                Ok(dir) => frozen.push((target, dir)),
                // Looking at every mount, skip the ones that cannot be frozen.
                Err(e) if all && unsupported(&e) => {}
                Err(e) => {
                    for (m, dir) in &frozen {
                        thaw_one(m, dir);
                    }
                    return Err(format!("cannot freeze {target}: {e}"));
                }
            }
        }
        let names: Vec<String> = frozen.iter().map(|(m, _)| m.clone()).collect();
        state.frozen = frozen;
        state.generation += 1;
        let generation = state.generation;
        drop(state);
        let secs = match timeout_secs {
            0 => DEFAULT_TIMEOUT_SECS,
            s => s.min(MAX_TIMEOUT_SECS),
        };
        let watchdog = self.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(u64::from(secs)));
            let thawed = watchdog.thaw_if(generation);
            if !thawed.is_empty() {
                kmsg::warn(&format!(
                    "agent: no thaw within {secs} s; thawed {} by itself",
                    thawed.join(", ")
                ));
            }
        });
        Ok(names)
    }

    /// Thaws everything frozen; returns the mount points.
    pub(crate) fn thaw(&self) -> Vec<String> {
        let generation = self.lock().generation;
        self.thaw_if(generation)
    }

    fn thaw_if(&self, generation: u64) -> Vec<String> {
        let mut state = self.lock();
        if state.generation != generation {
            return Vec::new();
        }
        state.generation += 1;
        let frozen = std::mem::take(&mut state.frozen);
        frozen
            .iter()
            .rev()
            .map(|(m, dir)| {
                thaw_one(m, dir);
                m.clone()
            })
            .collect()
    }
}

fn freeze_one(mount_point: &str) -> io::Result<File> {
    let dir = File::open(mount_point)?;
    // SAFETY: FIFREEZE on an fd we own; its int argument is unused by the kernel.
    let rc = unsafe { libc::ioctl(dir.as_raw_fd(), FIFREEZE, 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(dir)
}

fn thaw_one(mount_point: &str, dir: &File) {
    // SAFETY: FITHAW on an fd we own; its int argument is unused by the kernel.
    let rc = unsafe { libc::ioctl(dir.as_raw_fd(), FITHAW, 0) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        kmsg::warn(&format!("agent: cannot thaw {mount_point}: {e}"));
    }
}

/// Errors that mean "this file system cannot be frozen" rather than a failure.
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::ENOTTY | libc::EINVAL | libc::EBUSY)
    )
}

/// Mount points of file systems on block devices, from /proc/mounts text, each once.
fn freezable_mounts(mounts: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in mounts.lines() {
        let mut fields = line.split_whitespace();
        let (Some(source), Some(target)) = (fields.next(), fields.next()) else {
            continue;
        };
        let target = unescape_mount_field(target);
        if source.starts_with("/dev/") && !out.contains(&target) {
            out.push(target);
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn mount_list_keeps_block_devices_once() {
        let mounts = "rootfs / rootfs rw 0 0\n\
                      proc /proc proc rw 0 0\n\
                      /dev/vda /mnt ext4 rw 0 0\n\
                      /dev/vdb /mnt/with\\040space ext4 rw 0 0\n\
                      /dev/vda /mnt ext4 rw 0 0\n\
                      tmpfs /tmp tmpfs rw 0 0\n";
        assert_eq!(freezable_mounts(mounts), ["/mnt", "/mnt/with space"]);
        assert_eq!(unescape_mount_field("a\\134b\\011"), "a\\b\t");
        assert_eq!(unescape_mount_field("trailing\\04"), "trailing\\04");
    }

    #[test]
    fn freezing_what_cannot_be_frozen_is_a_clear_error() {
        // Never freeze a real file system here: the test may run as root on the build
        // machine's own disk. The lab test freezes a guest disk.
        let f = Freezer::default();
        let err = f.freeze(&["/nonexistent/mnt".to_owned()], 1).unwrap_err();
        assert!(err.starts_with("cannot freeze /nonexistent/mnt"), "{err}");
        assert!(f.thaw().is_empty(), "nothing left frozen");
    }
}
