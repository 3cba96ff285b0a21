//! Writing a checkpoint directory atomically: everything goes into `DIR.tmp-PID` beside it,
//! every file and the directory are fsynced, then the directory is renamed into place (an
//! existing checkpoint at DIR is swapped out with RENAME_EXCHANGE and removed only after).
//! A checkpoint that fails half-way is removed and leaves DIR as it was.

use std::ffi::CString;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// A checkpoint directory being written.
pub struct PendingDir {
    tmp: PathBuf,
    dest: PathBuf,
    committed: bool,
}

fn c_path(p: &Path) -> std::io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The directory `path` is in (`.` for a bare name).
pub fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

impl PendingDir {
    /// Starts writing the checkpoint that will be `dest`.
    pub fn create(dest: &Path) -> std::io::Result<PendingDir> {
        let name = dest
            .file_name()
            .ok_or_else(|| std::io::Error::other("the checkpoint path has no directory name"))?;
        let mut tmp_name = name.to_os_string();
        tmp_name.push(format!(".tmp-{}", std::process::id()));
        let tmp = parent_of(dest).join(tmp_name);
        if tmp.exists() {
            // Left by an earlier failed checkpoint of this process id.
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir(&tmp)?;
        Ok(PendingDir {
            tmp,
            dest: dest.to_path_buf(),
            committed: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Creates a new file in the pending directory.
    pub fn create_file(&self, name: &str) -> std::io::Result<File> {
        File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(self.tmp.join(name))
    }

    /// Makes the checkpoint durable and visible at its destination.
    pub fn commit(mut self) -> std::io::Result<()> {
        sync_dir(&self.tmp)?;
        if self.dest.exists() {
            let (tmp, dest) = (c_path(&self.tmp)?, c_path(&self.dest)?);
            // SAFETY: two valid NUL-terminated paths; renameat2 does not keep them.
            let ret = unsafe {
                libc::renameat2(
                    libc::AT_FDCWD,
                    tmp.as_ptr(),
                    libc::AT_FDCWD,
                    dest.as_ptr(),
                    libc::RENAME_EXCHANGE,
                )
            };
            if ret != 0 {
                return Err(std::io::Error::last_os_error());
            }
            sync_dir(&parent_of(&self.dest))?;
            self.committed = true;
            // The previous checkpoint is now at the temporary name.
            std::fs::remove_dir_all(&self.tmp)?;
        } else {
            std::fs::rename(&self.tmp, &self.dest)?;
            self.committed = true;
            sync_dir(&parent_of(&self.dest))?;
        }
        Ok(())
    }
}

impl Drop for PendingDir {
    fn drop(&mut self) {
        if !self.committed
            && let Err(e) = std::fs::remove_dir_all(&self.tmp)
        {
            log::warn!(
                "cannot remove the unfinished checkpoint {}: {e}",
                self.tmp.display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(p: &PendingDir, name: &str, data: &[u8]) {
        let mut f = p.create_file(name).expect("create");
        f.write_all(data).expect("write");
        f.sync_all().expect("sync");
    }

    #[test]
    fn a_new_checkpoint_replaces_the_old_one_whole() {
        let root = tempfile::tempdir().expect("tempdir");
        let dest = root.path().join("ckpt");
        let p = PendingDir::create(&dest).expect("pending");
        write(&p, "a", b"first");
        write(&p, "old-only", b"x");
        p.commit().expect("commit");
        let p = PendingDir::create(&dest).expect("pending");
        write(&p, "a", b"second");
        p.commit().expect("commit");
        assert_eq!(std::fs::read(dest.join("a")).expect("read"), b"second");
        assert!(!dest.join("old-only").exists());
        let left: Vec<_> = std::fs::read_dir(root.path()).expect("ls").collect();
        assert_eq!(left.len(), 1, "only the checkpoint remains");
    }

    #[test]
    fn an_unfinished_checkpoint_leaves_the_previous_one_untouched() {
        let root = tempfile::tempdir().expect("tempdir");
        let dest = root.path().join("ckpt");
        let p = PendingDir::create(&dest).expect("pending");
        write(&p, "a", b"first");
        p.commit().expect("commit");
        {
            let p = PendingDir::create(&dest).expect("pending");
            write(&p, "a", b"half");
            // Dropped without commit: the checkpoint failed.
        }
        assert_eq!(std::fs::read(dest.join("a")).expect("read"), b"first");
        let left: Vec<_> = std::fs::read_dir(root.path()).expect("ls").collect();
        assert_eq!(left.len(), 1, "the temporary directory is gone");
    }
}
