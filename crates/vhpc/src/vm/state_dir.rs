//! Where long-running VMs live on the host: one directory per VM under a runtime directory.
//!
//! ```text
//! $VHPC_RUNTIME_DIR | $XDG_RUNTIME_DIR/vhpc | /run/vhpc (root) | /tmp/vhpc-$UID
//! └── NAME/
//!     ├── api.sock      the VMM process's REST API (HTTP/1.1 on a Unix socket)
//!     ├── config.json   the VmSpec it was started with
//!     ├── console.log   the guest's serial console
//!     ├── vmm.log       the VMM process's own log (its stderr)
//!     └── pid           the VMM's pid, flock()ed by the VMM for its whole life
//! ```
//!
//! A VM is alive exactly while someone holds the lock on its `pid` file: the lock dies with
//! the process, so a directory left by a crashed VMM is recognisably stale, and a reused pid
//! can never make a dead VM look alive.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Longest VM name.
pub const MAX_NAME_LEN: usize = 64;
/// Longest Unix socket path (sun_path holds 108 bytes with the terminating NUL).
const MAX_SOCKET_PATH: usize = 107;

#[derive(Debug, Error)]
pub enum StateError {
    #[error(
        "invalid VM name {name:?}: {reason}; use 1-{MAX_NAME_LEN} letters, digits, '.', '_' or '-', \
         not starting with '.' or '-'"
    )]
    BadName { name: String, reason: &'static str },
    #[error(
        "the VM's socket path {path} is longer than {MAX_SOCKET_PATH} bytes; set VHPC_RUNTIME_DIR \
         to a shorter directory or use a shorter VM name"
    )]
    SocketPathTooLong { path: PathBuf },
    #[error(
        "a VM named {name:?} is already running (pid {pid}); stop it with `vhpc vm stop {name}` or pick another name"
    )]
    Running { name: String, pid: u32 },
    #[error("no VM named {name:?} (looked in {dir}); `vhpc vm list` shows the VMs")]
    NoSuchVm { name: String, dir: PathBuf },
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StateError + 'a {
    move |source| StateError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Checks a VM name: it becomes a directory name and appears in socket paths.
pub fn validate_name(name: &str) -> Result<(), StateError> {
    let bad = |reason| {
        Err(StateError::BadName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad("it is too long");
    }
    if name.starts_with('.') || name.starts_with('-') {
        return bad("it starts with '.' or '-'");
    }
    if name.contains('/') {
        return bad("it contains a slash");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return bad("it contains a character other than letters, digits, '.', '_' and '-'");
    }
    Ok(())
}

/// The runtime directory from the environment (empty variables count as unset).
pub fn runtime_root(env: impl Fn(&str) -> Option<String>, uid: u32) -> PathBuf {
    let var = |name: &str| env(name).filter(|v| !v.is_empty());
    if let Some(dir) = var("VHPC_RUNTIME_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = var("XDG_RUNTIME_DIR") {
        return Path::new(&dir).join("vhpc");
    }
    if uid == 0 {
        PathBuf::from("/run/vhpc")
    } else {
        PathBuf::from(format!("/tmp/vhpc-{uid}"))
    }
}

/// The runtime directory holding every VM's state directory.
#[derive(Debug, Clone)]
pub struct Runtime {
    root: PathBuf,
}

impl Runtime {
    pub fn new(root: PathBuf) -> Self {
        Runtime { root }
    }

    pub fn from_env() -> Self {
        // SAFETY: getuid has no preconditions and cannot fail.
        let uid = unsafe { libc::getuid() };
        Runtime::new(runtime_root(|n| std::env::var(n).ok(), uid))
    }

    /// The state directory of VM `name` (which need not exist).
    pub fn vm(&self, name: &str) -> Result<VmDir, StateError> {
        validate_name(name)?;
        let dir = VmDir {
            name: name.to_owned(),
            path: self.root.join(name),
        };
        // The longer of the VM's two sockets.
        let sock = dir.vsock_sock();
        if sock.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(StateError::SocketPathTooLong { path: sock });
        }
        Ok(dir)
    }

    /// The state directory of an existing VM.
    pub fn existing(&self, name: &str) -> Result<VmDir, StateError> {
        let dir = self.vm(name)?;
        if !dir.path.is_dir() {
            return Err(StateError::NoSuchVm {
                name: name.to_owned(),
                dir: self.root.clone(),
            });
        }
        Ok(dir)
    }

    /// Every VM directory, sorted by name (entries that are not valid names are skipped).
    pub fn list(&self) -> Result<Vec<VmDir>, StateError> {
        let entries = match fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("read", &self.root)(e)),
        };
        let mut dirs: Vec<VmDir> = entries
            .filter_map(Result::ok)
            .filter(|e| e.path().is_dir())
            .filter_map(|e| self.vm(e.file_name().to_str()?).ok())
            .collect();
        dirs.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(dirs)
    }

    /// Creates the state directory for a new VM `name` and takes its lock. A directory left
    /// by a dead VM is removed first; a live VM of that name is an error.
    pub fn create(&self, name: &str) -> Result<(VmDir, File), StateError> {
        let dir = self.vm(name)?;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.root)
            .map_err(io_err("create the runtime directory", &self.root))?;
        if dir.path.exists() {
            if let Some(pid) = dir.running_pid() {
                return Err(StateError::Running {
                    name: name.to_owned(),
                    pid,
                });
            }
            log::info!("removing the stale state directory {}", dir.path.display());
            dir.remove()?;
        }
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir.path)
            .map_err(io_err("create the state directory", &dir.path))?;
        let lock = dir.lock()?.ok_or_else(|| StateError::Running {
            name: name.to_owned(),
            pid: 0,
        })?;
        Ok((dir, lock))
    }
}

/// One VM's state directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmDir {
    pub name: String,
    pub path: PathBuf,
}

impl VmDir {
    pub fn api_sock(&self) -> PathBuf {
        self.path.join("api.sock")
    }
    /// The host end of the VM's virtio-vsock device (`CONNECT <port>`).
    pub fn vsock_sock(&self) -> PathBuf {
        self.path.join("vsock.sock")
    }
    pub fn config_json(&self) -> PathBuf {
        self.path.join("config.json")
    }
    pub fn console_log(&self) -> PathBuf {
        self.path.join("console.log")
    }
    pub fn vmm_log(&self) -> PathBuf {
        self.path.join("vmm.log")
    }
    pub fn pid_file(&self) -> PathBuf {
        self.path.join("pid")
    }

    /// Opens the pid file (creating it) and takes its exclusive lock; `None` if someone else
    /// holds it. The lock lasts while the returned file (or a descendant's copy) is open.
    pub fn lock(&self) -> Result<Option<File>, StateError> {
        let path = self.pid_file();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io_err("open", &path))?;
        // SAFETY: flock on an fd owned by `file`; no memory is passed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(Some(file));
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            Ok(None)
        } else {
            Err(io_err("lock", &path)(err))
        }
    }

    /// The VMM's pid if it is alive (it holds the lock); `None` for a dead or unstarted VM.
    pub fn running_pid(&self) -> Option<u32> {
        let mut file = File::open(self.pid_file()).ok()?;
        // SAFETY: flock on an fd owned by `file`; no memory is passed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) };
        if rc == 0 {
            // Nobody holds it: dead. Our shared lock ends when `file` closes.
            return None;
        }
        let mut text = String::new();
        file.read_to_string(&mut text).ok()?;
        // Locked but the pid not written yet (a VM being started): 0.
        Some(text.trim().parse().unwrap_or(0))
    }

    /// Removes the directory and everything in it.
    pub fn remove(&self) -> Result<(), StateError> {
        match fs::remove_dir_all(&self.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("remove", &self.path)(e)),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["a", "vm-1", "job_2.node3", &"x".repeat(MAX_NAME_LEN)] {
            validate_name(good).unwrap();
        }
        for bad in [
            "",
            "a/b",
            "..",
            ".hidden",
            "-x",
            "a b",
            "é",
            "a\0",
            &"x".repeat(65),
        ] {
            let err = validate_name(bad).unwrap_err();
            assert!(err.to_string().contains("invalid VM name"), "{bad:?}");
        }
    }

    #[test]
    fn runtime_root_precedence() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |n: &str| {
                vars.iter()
                    .find(|(k, _)| *k == n)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(
            runtime_root(
                env(&[("VHPC_RUNTIME_DIR", "/a"), ("XDG_RUNTIME_DIR", "/b")]),
                0
            ),
            PathBuf::from("/a")
        );
        assert_eq!(
            runtime_root(
                env(&[("VHPC_RUNTIME_DIR", ""), ("XDG_RUNTIME_DIR", "/b")]),
                0
            ),
            PathBuf::from("/b/vhpc")
        );
        assert_eq!(runtime_root(env(&[]), 0), PathBuf::from("/run/vhpc"));
        assert_eq!(
            runtime_root(env(&[]), 1000),
            PathBuf::from("/tmp/vhpc-1000")
        );
    }

    #[test]
    fn socket_path_length_is_checked() {
        let rt = Runtime::new(PathBuf::from(format!("/{}", "d".repeat(60))));
        let err = rt.vm(&"n".repeat(50)).unwrap_err();
        assert!(matches!(err, StateError::SocketPathTooLong { .. }));
    }

    #[test]
    fn create_lock_list_and_clean_stale() {
        let tmp = tempfile::tempdir().unwrap();
        let rt = Runtime::new(tmp.path().join("rt"));
        assert!(rt.list().unwrap().is_empty());
        let (dir, lock) = rt.create("a").unwrap();
        std::fs::write(dir.pid_file(), "4242\n").unwrap();
        assert_eq!(dir.running_pid(), Some(4242));
        let err = rt.create("a").unwrap_err();
        assert!(
            matches!(err, StateError::Running { pid: 4242, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("vhpc vm stop a"));
        std::fs::write(dir.console_log(), "boot log").unwrap();
        assert_eq!(rt.list().unwrap(), vec![dir.clone()]);
        // The VMM dies: its lock goes with it, the directory is stale and is replaced.
        drop(lock);
        assert_eq!(dir.running_pid(), None);
        let (again, _lock) = rt.create("a").unwrap();
        assert!(!again.console_log().exists(), "stale files are gone");
        assert_eq!(again.running_pid(), Some(0), "locked, pid not yet written");
        again.remove().unwrap();
        assert!(rt.existing("a").is_err());
        again.remove().unwrap();
    }
}
