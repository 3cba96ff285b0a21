//! The build's scratch space next to the output: the debootstrap tree and the image being
//! written. Removed however the build ends, so a failed build leaves no half image and no
//! tree behind (a killed build's leftovers are removed by the next build into that folder).

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};

/// `.NAME.build-PID/` (holding `root/`) and `NAME.tmp` beside `out`.
pub struct WorkDir {
    pub dir: PathBuf,
    pub root: PathBuf,
    pub image: PathBuf,
}

const BUILD_MARK: &str = ".build-";

fn build_prefix(out: &Path) -> OsString {
    let mut prefix = OsString::from(".");
    prefix.push(out.file_name().unwrap_or_default());
    prefix.push(BUILD_MARK);
    prefix
}

impl WorkDir {
    /// Creates the scratch directory for building `out`, after removing the leftovers of
    /// builds of `out` whose process is gone.
    pub fn create(out: &Path) -> io::Result<Self> {
        let parent = out
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent)?;
        remove_stale(parent, out);
        let mut name = build_prefix(out);
        name.push(std::process::id().to_string());
        let dir = parent.join(name);
        remove_tree(&dir)?;
        std::fs::create_dir(&dir)?;
        let mut image = OsString::from(out.as_os_str());
        image.push(".tmp");
        Ok(Self {
            root: dir.join("root"),
            dir,
            image: PathBuf::from(image),
        })
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if let Err(err) = remove_tree(&self.dir) {
            log::warn!(
                "cannot remove the build folder {}: {err}",
                self.dir.display()
            );
        }
        let _ = std::fs::remove_file(&self.image);
    }
}

/// Removes `.NAME.build-PID` folders (and `NAME.tmp`) of builds whose PID no longer runs.
fn remove_stale(parent: &Path, out: &Path) {
    let prefix = build_prefix(out);
    let Some(prefix) = prefix.to_str() else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(prefix)) else {
            continue;
        };
        let alive = pid
            .parse::<u32>()
            .is_ok_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
        if !alive && remove_tree(&entry.path()).is_ok() {
            let mut image = OsString::from(out.as_os_str());
            image.push(".tmp");
            let _ = std::fs::remove_file(image);
            log::info!("removed the leftovers of an interrupted build: {name:?}");
        }
    }
}

/// Unmounts whatever is mounted below `dir` (debootstrap mounts /proc and /sys in the tree
/// while it configures packages; a killed debootstrap leaves them), then removes it. Never
/// deletes through a mount point.
pub fn remove_tree(dir: &Path) -> io::Result<()> {
    if std::fs::symlink_metadata(dir).is_err() {
        return Ok(());
    }
    let dir = std::fs::canonicalize(dir)?;
    let mut below = mounts_below(&dir)?;
    below.sort_by_key(|m| std::cmp::Reverse(m.as_os_str().len()));
    for mount in &below {
        let path = std::ffi::CString::new(mount.as_os_str().as_encoded_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: `path` is a valid NUL-terminated string for the duration of the call;
        // umount2 only reads it.
        if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } != 0 {
            return Err(io::Error::other(format!(
                "cannot unmount {} ({}); unmount it by hand, then remove {}",
                mount.display(),
                io::Error::last_os_error(),
                dir.display()
            )));
        }
    }
    std::fs::remove_dir_all(&dir)
}

/// Mount points strictly below `dir`, from /proc/self/mountinfo.
fn mounts_below(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(parse_mount_points(&info)
        .into_iter()
        .filter(|m| m.starts_with(dir) && m != dir)
        .collect())
}

/// The mount point (5th field) of each mountinfo line, with `\040`-style escapes decoded.
fn parse_mount_points(info: &str) -> Vec<PathBuf> {
    info.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(vhpc_guest::unescape_mount_field(field)))
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn mountinfo_mount_points() {
        let info = "22 1 8:1 / / rw - ext4 /dev/vda rw\n\
                    90 22 0:5 / /tmp/a\\040b/root/proc rw - proc proc rw\n";
        assert_eq!(
            parse_mount_points(info),
            [PathBuf::from("/"), PathBuf::from("/tmp/a b/root/proc")]
        );
    }

    #[test]
    fn workdir_is_removed_with_its_image_and_stale_ones_too() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("r.img");
        let stale = dir.path().join(".r.img.build-999999999");
        std::fs::create_dir_all(stale.join("root/etc")).unwrap();
        std::fs::write(dir.path().join("r.img.tmp"), b"half").unwrap();
        let other = dir.path().join(".other.img.build-999999999");
        std::fs::create_dir(&other).unwrap();
        let work = WorkDir::create(&out).unwrap();
        assert!(!stale.exists(), "a dead build's folder is removed");
        assert!(other.exists(), "another image's build is left alone");
        std::fs::create_dir_all(work.root.join("usr/bin")).unwrap();
        std::fs::write(&work.image, b"partial").unwrap();
        let (scratch, image) = (work.dir.clone(), work.image.clone());
        assert!(scratch.starts_with(dir.path()));
        drop(work);
        assert!(!scratch.exists() && !image.exists() && !out.exists());
    }
}
