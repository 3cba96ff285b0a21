//! The local cache of guest kernel, modules and initramfs.

use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum CacheError {
    #[error(
        "no guest kernel in the cache ({path} is missing); run `vhpc image kernel` to fetch one"
    )]
    NoKernel { path: PathBuf },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is empty or malformed; run `vhpc image kernel` to fetch the kernel again")]
    BadVersion { path: PathBuf },
}

/// Where vhpc keeps downloaded and built guest artefacts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cache {
    root: PathBuf,
}

impl Cache {
    /// A cache rooted at `root` (created on demand by the functions that write to it).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// `$VHPC_CACHE_DIR`, else `$XDG_CACHE_HOME/vhpc`, else `$HOME/.cache/vhpc`, else
    /// `/root/.cache/vhpc`. Empty variables count as unset.
    pub fn from_env() -> Self {
        Self::new(root_from(|name| std::env::var_os(name)))
    }

    /// The cache directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The default guest kernel (`vmlinuz`).
    pub fn kernel_path(&self) -> PathBuf {
        self.root.join("vmlinuz")
    }

    /// The default guest initramfs, uncompressed cpio.
    pub fn initramfs_path(&self) -> PathBuf {
        self.root.join("initramfs.cpio")
    }

    /// The extracted modules tree; holds `lib/modules/<version>/...`.
    pub fn modules_root(&self) -> PathBuf {
        self.root.join("modules")
    }

    /// `lib/modules/<version>` of the cached kernel.
    pub fn modules_dir(&self, version: &str) -> PathBuf {
        self.modules_root().join("lib/modules").join(version)
    }

    /// The file recording the cached kernel's version; written last by a fetch.
    pub fn kernel_version_path(&self) -> PathBuf {
        self.root.join("kernel-version")
    }

    /// The version of the cached kernel, e.g. `6.1.0-56-cloud-amd64`.
    pub fn kernel_version(&self) -> Result<String, CacheError> {
        let path = self.kernel_version_path();
        let text = std::fs::read_to_string(&path).map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                CacheError::NoKernel { path: path.clone() }
            } else {
                CacheError::Read {
                    path: path.clone(),
                    source,
                }
            }
        })?;
        let version = text.trim();
        let valid = !version.is_empty()
            && !version.starts_with('.')
            && version
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ".-_+~".contains(c));
        if !valid {
            return Err(CacheError::BadVersion { path });
        }
        Ok(version.to_owned())
    }
}

fn root_from(var: impl Fn(&str) -> Option<std::ffi::OsString>) -> PathBuf {
    let var = |name| {
        var(name)
            .filter(|value| !value.is_empty())
            .map(PathBuf::from)
    };
    if let Some(dir) = var("VHPC_CACHE_DIR") {
        return dir;
    }
    if let Some(dir) = var("XDG_CACHE_HOME") {
        return dir.join("vhpc");
    }
    var("HOME")
        .unwrap_or_else(|| PathBuf::from("/root"))
        .join(".cache/vhpc")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use std::ffi::OsString;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| OsString::from(v))
        }
    }

    #[test]
    fn root_precedence() {
        let all = [
            ("VHPC_CACHE_DIR", "/c"),
            ("XDG_CACHE_HOME", "/x"),
            ("HOME", "/h"),
        ];
        assert_eq!(root_from(env(&all)), PathBuf::from("/c"));
        assert_eq!(root_from(env(&all[1..])), PathBuf::from("/x/vhpc"));
        assert_eq!(root_from(env(&all[2..])), PathBuf::from("/h/.cache/vhpc"));
        assert_eq!(root_from(env(&[])), PathBuf::from("/root/.cache/vhpc"));
        let empty = [("VHPC_CACHE_DIR", ""), ("HOME", "/h")];
        assert_eq!(root_from(env(&empty)), PathBuf::from("/h/.cache/vhpc"));
    }

    #[test]
    fn paths_and_version() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path());
        assert_eq!(cache.kernel_path(), dir.path().join("vmlinuz"));
        assert_eq!(cache.initramfs_path(), dir.path().join("initramfs.cpio"));
        assert_eq!(
            cache.modules_dir("6.1"),
            dir.path().join("modules/lib/modules/6.1")
        );
        assert!(matches!(
            cache.kernel_version(),
            Err(CacheError::NoKernel { .. })
        ));
        std::fs::write(cache.kernel_version_path(), "6.1.0-56-cloud-amd64\n").unwrap();
        assert_eq!(cache.kernel_version().unwrap(), "6.1.0-56-cloud-amd64");
        std::fs::write(cache.kernel_version_path(), "../etc\n").unwrap();
        assert!(matches!(
            cache.kernel_version(),
            Err(CacheError::BadVersion { .. })
        ));
    }
}
