//! A virtio-blk disk as the user gives it: `--disk PATH[,ro]`.

use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// One raw disk image attached to a VM (the guest sees them as /dev/vda, /dev/vdb, ... in
/// order).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    /// A raw image file (or a block device).
    pub path: PathBuf,
    /// The guest may only read it (virtio-blk RO feature; writes fail).
    #[serde(default)]
    pub read_only: bool,
}

/// A disk the user has to fix.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DiskConfigError {
    #[error("--disk needs a path: --disk PATH[,ro]")]
    EmptyPath,
    #[error("unknown --disk option {0:?}: the only option is ro (--disk PATH,ro)")]
    UnknownOption(String),
    #[error("disk image {0} does not exist; create one, e.g. truncate -s 1G {0}")]
    Missing(String),
    #[error("disk image {0} is not a regular file or block device")]
    NotAFile(String),
    #[error(
        "cannot open disk image {path} {mode}: {reason}; fix its permissions, or add ,ro to attach it read-only"
    )]
    NoAccess {
        path: String,
        mode: &'static str,
        reason: String,
    },
    #[error(
        "disk image {0} is smaller than one 512-byte sector; give it a size (truncate -s 64M {0})"
    )]
    TooSmall(String),
}

impl FromStr for DiskConfig {
    type Err = DiskConfigError;

    /// `PATH` or `PATH,ro`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (path, read_only) = match s.rsplit_once(',') {
            Some((path, "ro")) => (path, true),
            Some((_, other)) => return Err(DiskConfigError::UnknownOption(other.into())),
            None => (s, false),
        };
        if path.is_empty() {
            return Err(DiskConfigError::EmptyPath);
        }
        Ok(DiskConfig {
            path: PathBuf::from(path),
            read_only,
        })
    }
}

impl DiskConfig {
    /// Checks the image exists, is big enough and can be opened as the disk needs.
    pub fn validate(&self) -> Result<(), DiskConfigError> {
        let shown = self.path.display().to_string();
        let meta = std::fs::metadata(&self.path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => DiskConfigError::Missing(shown.clone()),
            _ => DiskConfigError::NoAccess {
                path: shown.clone(),
                mode: "at all",
                reason: e.to_string(),
            },
        })?;
        use std::os::unix::fs::FileTypeExt;
        let kind = meta.file_type();
        if !kind.is_file() && !kind.is_block_device() {
            return Err(DiskConfigError::NotAFile(shown));
        }
        if kind.is_file() && meta.len() < 512 {
            return Err(DiskConfigError::TooSmall(shown));
        }
        let mode = if self.read_only {
            "read-only"
        } else {
            "read-write"
        };
        std::fs::OpenOptions::new()
            .read(true)
            .write(!self.read_only)
            .open(&self.path)
            .map_err(|e| DiskConfigError::NoAccess {
                path: shown,
                mode,
                reason: e.to_string(),
            })?;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_path_and_ro() {
        let d: DiskConfig = "/a/b.img".parse().unwrap();
        assert_eq!((d.path, d.read_only), (PathBuf::from("/a/b.img"), false));
        let d: DiskConfig = "/a/b,c.img,ro".parse().unwrap();
        assert_eq!((d.path, d.read_only), (PathBuf::from("/a/b,c.img"), true));
        assert_eq!(
            "x.img,rw".parse::<DiskConfig>(),
            Err(DiskConfigError::UnknownOption("rw".into()))
        );
        assert_eq!(",ro".parse::<DiskConfig>(), Err(DiskConfigError::EmptyPath));
    }

    #[test]
    fn validation_says_what_is_wrong() {
        let dir = std::env::temp_dir().join(format!("vhpc-disk-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = DiskConfig {
            path: dir.join("missing.img"),
            read_only: false,
        };
        let err = missing.validate().unwrap_err();
        assert!(matches!(err, DiskConfigError::Missing(_)));
        assert!(err.to_string().contains("truncate -s"), "{err}");
        let tiny = dir.join("tiny.img");
        std::fs::write(&tiny, [0u8; 100]).unwrap();
        let tiny = DiskConfig {
            path: tiny,
            read_only: true,
        };
        assert!(matches!(tiny.validate(), Err(DiskConfigError::TooSmall(_))));
        let ok = dir.join("ok.img");
        std::fs::write(&ok, vec![0u8; 4096]).unwrap();
        let ok = DiskConfig {
            path: ok,
            read_only: false,
        };
        assert_eq!(ok.validate(), Ok(()));
        let dir_disk = DiskConfig {
            path: dir.clone(),
            read_only: true,
        };
        assert!(matches!(
            dir_disk.validate(),
            Err(DiskConfigError::NotAFile(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
