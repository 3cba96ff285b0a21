//! Loading the kernel modules the host put into the initramfs.
//!
//! Parameters come from the kernel command line as modprobe takes them: `NAME.PARAM=VALUE`
//! (with `-` and `_` alike in NAME) is given to module NAME when it loads. The kernel itself
//! only applies such arguments to built-in code, so without this a module loaded by /init
//! could not be configured at boot (e.g. `vhpc run --cmdline '... virtio_net.napi_tx=0'`).

use std::ffi::CString;
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

/// Loads every module named in `list_path`, each with its parameters from `cmdline`; a missing
/// list means there is nothing to load. Returns one error per module that failed; loading
/// continues past failures.
pub(crate) fn load_listed(list_path: &Path, cmdline: &str) -> Vec<ModuleLoadError> {
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
        .filter_map(|path| {
            let path = Path::new(path);
            load_one(path, &params_for(cmdline, &module_name(path))).err()
        })
        .collect()
}

/// The module's name as the kernel knows it: the file name up to its first dot, with `-` as
/// `_` (`kvm-amd.ko` is `kvm_amd`).
fn module_name(path: &Path) -> String {
    let file = path.file_name().and_then(|f| f.to_str()).unwrap_or("");
    file.split('.').next().unwrap_or("").replace('-', "_")
}

/// The `PARAM=VALUE` arguments of `cmdline` addressed to module `name` (`name.PARAM=VALUE`),
/// space-separated, as finit_module takes them. Quoted values are not supported (none are
/// used); an argument with a quote is left out rather than split wrongly.
fn params_for(cmdline: &str, name: &str) -> String {
    cmdline
        .split_whitespace()
        .filter(|arg| !arg.contains('"'))
        .filter_map(|arg| {
            let (module, param) = arg.split_once('.')?;
            (module.replace('-', "_") == name && param.contains('=')).then_some(param)
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn parse_list(list: &str) -> impl Iterator<Item = &str> {
    list.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
}

fn load_one(path: &Path, params: &str) -> Result<(), ModuleLoadError> {
    let file = File::open(path).map_err(|source| ModuleLoadError::Open {
        path: path.to_owned(),
        source,
    })?;
    // A command line has no NUL bytes; should one get here, load without parameters.
    let params = CString::new(params).unwrap_or_default();
    // SAFETY: finit_module reads the open fd and the NUL-terminated parameter string, both
    // valid for the duration of the call; flags 0 asks for no special behaviour.
    let rc = unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), params.as_ptr(), 0) };
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
    fn parameters_come_from_the_command_line_as_modprobe_takes_them() {
        let cmdline = "console=ttyS0 kvm_amd.vgif=0 kvm-amd.npt=1 kvm.halt_poll_ns=0 \
                       kvm_amd.nested quiet bridge.x=\"a b\" tun.debug=1\n";
        let name = module_name(Path::new("/lib/modules/6.1/kernel/arch/x86/kvm/kvm-amd.ko"));
        assert_eq!(name, "kvm_amd");
        assert_eq!(params_for(cmdline, &name), "vgif=0 npt=1");
        assert_eq!(params_for(cmdline, "kvm"), "halt_poll_ns=0");
        assert_eq!(
            params_for(cmdline, "bridge"),
            "",
            "quoted values are left out"
        );
        assert_eq!(params_for(cmdline, "virtio_net"), "");
    }

    #[test]
    fn list_parsing_skips_blanks_and_comments() {
        let list = "/lib/modules/v/a.ko\n\n  # note\n /lib/modules/v/b.ko \n";
        let got: Vec<_> = parse_list(list).collect();
        assert_eq!(got, ["/lib/modules/v/a.ko", "/lib/modules/v/b.ko"]);
    }

    #[test]
    fn missing_list_loads_nothing() {
        assert!(load_listed(Path::new("/nonexistent/vhpc-load-order"), "").is_empty());
    }

    #[test]
    fn missing_module_is_reported() {
        let errs = load_one(Path::new("/nonexistent/x.ko"), "").unwrap_err();
        assert!(matches!(errs, ModuleLoadError::Open { .. }));
    }
}
