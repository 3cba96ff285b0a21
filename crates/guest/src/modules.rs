//! Loading the kernel modules the host put into the initramfs.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ModuleLoadError {
    #[error("cannot read the module list {path}: {source}")]
    ReadList {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot open kernel module {path}: {source}; rebuild the initramfs")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot load kernel module {path}: {source}; the module may not match the kernel \
         (rebuild the initramfs after `vhpc image kernel`)"
    )]
    Load {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Loads every module named in `list_path`; a missing list means there is nothing to load.
/// Returns one error per module that failed; loading continues past failures.
pub(crate) fn load_listed(list_path: &Path) -> Vec<ModuleLoadError> {
    let list = match std::fs::read_to_string(list_path) {
        Ok(list) => list,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Vec::new(),
        Err(source) => {
            return vec![ModuleLoadError::ReadList {
                path: list_path.to_owned(),
                source,
            }];
        }
    };
    parse_list(&list)
        .filter_map(|path| load_one(Path::new(path)).err())
        .collect()
}

fn parse_list(list: &str) -> impl Iterator<Item = &str> {
    list.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
}

fn load_one(path: &Path) -> Result<(), ModuleLoadError> {
    let file = File::open(path).map_err(|source| ModuleLoadError::Open {
        path: path.to_owned(),
        source,
    })?;
    let no_params: &CStr = c"";
    // SAFETY: finit_module reads the open fd and the NUL-terminated (empty) parameter string,
    // both valid for the duration of the call; flags 0 asks for no special behaviour.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            file.as_raw_fd(),
            no_params.as_ptr(),
            0,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EEXIST) {
        return Ok(()); // already loaded or built in
    }
    Err(ModuleLoadError::Load {
        path: path.to_owned(),
        source: err,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn list_parsing_skips_blanks_and_comments() {
        let list = "/lib/modules/v/a.ko\n\n  # note\n /lib/modules/v/b.ko \n";
        let got: Vec<_> = parse_list(list).collect();
        assert_eq!(got, ["/lib/modules/v/a.ko", "/lib/modules/v/b.ko"]);
    }

    #[test]
    fn missing_list_loads_nothing() {
        assert!(load_listed(Path::new("/nonexistent/vhpc-load-order")).is_empty());
    }

    #[test]
    fn missing_module_is_reported() {
        let errs = load_one(Path::new("/nonexistent/x.ko")).unwrap_err();
        assert!(matches!(errs, ModuleLoadError::Open { .. }));
    }
}
