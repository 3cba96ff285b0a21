//! `vhpc cp` and `vhpc vm freeze|thaw`: clients of a VM's copy and freeze routes;
//! `vhpc vm connect`: standard input and output to a guest vsock port.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;
use vhpc_api::rest::{
    CopyInRequest, CopyOutRequest, CopyResult, FreezeRequest, FreezeResult, ThawResult,
};

use super::commands::api_error;
use super::http;
use super::state_dir::{Runtime, validate_name};

#[derive(Args)]
pub struct CpArgs {
    /// A local file, or NAME:/guest/path.
    pub source: String,
    /// A local path (a directory: the file keeps its name), or NAME:/guest/path.
    pub destination: String,
}

#[derive(Args)]
pub struct FreezeArgs {
    /// The VM.
    pub name: String,
    /// Guest mount points; none: every mounted file system on a block device.
    pub mount_points: Vec<String>,
    /// The guest thaws by itself after this many seconds (at most 3600).
    #[arg(long, default_value_t = 60)]
    pub timeout: u32,
}

/// `NAME:/path` → (NAME, /path); anything else is a local path.
fn remote(arg: &str) -> Option<(&str, &str)> {
    let (name, path) = arg.split_once(':')?;
    (validate_name(name).is_ok() && path.starts_with('/')).then_some((name, path))
}

fn absolute(path: &str) -> anyhow::Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("cannot resolve the local path {path}"))
}

/// `vhpc cp SRC DST`: exactly one side is `NAME:/guest/path`.
pub fn cp(args: CpArgs) -> anyhow::Result<i32> {
    let (name, route, body) = match (remote(&args.source), remote(&args.destination)) {
        (None, Some((name, guest))) => {
            let host = absolute(&args.source)?;
            let mut guest = guest.to_owned();
            if guest.ends_with('/') {
                guest.push_str(&file_name(&host)?);
            }
            let body = serde_json::to_vec(&CopyInRequest {
                host_path: host.display().to_string(),
                guest_path: guest,
            })?;
            (name, "/vm/copy-in", body)
        }
        (Some((name, guest)), None) => {
            let mut host = absolute(&args.destination)?;
            if host.is_dir() {
                host.push(file_name(Path::new(guest))?);
            }
            let body = serde_json::to_vec(&CopyOutRequest {
                guest_path: guest.to_owned(),
                host_path: host.display().to_string(),
            })?;
            (name, "/vm/copy-out", body)
        }
        (Some(_), Some(_)) => bail!("both sides are in VMs; one must be a local path"),
        (None, None) => {
            bail!("neither side names a VM; write the guest side as NAME:/absolute/path")
        }
    };
    let _: CopyResult = call(name, route, &body)?;
    Ok(0)
}

fn file_name(path: &Path) -> anyhow::Result<String> {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .with_context(|| format!("{} has no file name", path.display()))
}

/// `vhpc vm freeze NAME [MOUNT...]`: prints the frozen mount points, one per line.
pub fn freeze(args: FreezeArgs) -> anyhow::Result<i32> {
    let body = serde_json::to_vec(&FreezeRequest {
        mount_points: args.mount_points,
        timeout_secs: Some(args.timeout),
    })?;
    let result: FreezeResult = call(&args.name, "/vm/fs/freeze", &body)?;
    for m in result.frozen {
        println!("{m}");
    }
    Ok(0)
}

/// `vhpc vm thaw NAME`: prints the thawed mount points, one per line.
pub fn thaw(name: &str) -> anyhow::Result<i32> {
    let result: ThawResult = call(name, "/vm/fs/thaw", b"")?;
    for m in result.thawed {
        println!("{m}");
    }
    Ok(0)
}

/// `vhpc vm connect NAME PORT`: relays stdin to the guest port and the port to stdout
/// until the guest closes; the end of stdin is passed on as a half-close.
pub fn connect(name: &str, port: u32) -> anyhow::Result<i32> {
    let dir = Runtime::from_env().existing(name)?;
    let stream = super::agent_client::connect(&dir.vsock_sock(), port)
        .with_context(|| format!("VM {name}: cannot connect to guest vsock port {port}"))?;
    let mut to_guest = stream.try_clone()?;
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut to_guest);
        let _ = to_guest.shutdown(std::net::Shutdown::Write);
    });
    let mut from_guest = stream;
    std::io::copy(&mut from_guest, &mut std::io::stdout().lock())
        .with_context(|| format!("VM {name}: the connection to port {port} failed"))?;
    Ok(0)
}

fn call<T: serde::de::DeserializeOwned>(name: &str, route: &str, body: &[u8]) -> anyhow::Result<T> {
    let dir = Runtime::from_env().existing(name)?;
    // No timeout: a large copy takes as long as it takes; the VMM bounds each agent step.
    let resp = http::call(&dir.api_sock(), "PUT", route, Some(body), None)?;
    let status = resp.status;
    let bytes = resp.into_bytes()?;
    if status != 200 {
        return Err(api_error(name, status, &bytes));
    }
    serde_json::from_slice(&bytes).with_context(|| format!("malformed answer from {route}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_paths() {
        assert_eq!(remote("a:/x/y"), Some(("a", "/x/y")));
        assert_eq!(remote("vm-1.b:/"), Some(("vm-1.b", "/")));
        assert_eq!(remote("a:x"), None, "guest paths are absolute");
        assert_eq!(remote("./a:/x"), None, "not a VM name");
        assert_eq!(remote("/tmp/f"), None);
    }
}
