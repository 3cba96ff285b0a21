//! Fetching Debian's cloud kernel and its modules into the cache.
//!
//! `linux-image-cloud-amd64` is a metapackage depending on today's versioned image package
//! (`linux-image-6.1.0-NN-cloud-amd64`). We resolve it with `apt-cache depends`, fetch the
//! `.deb` with `apt-get download` (no installation, nothing touches the host's /boot), unpack
//! it with `dpkg-deb -x`, and move `vmlinuz` and the modules tree into the cache. The version
//! file is written last, so an interrupted fetch is never mistaken for a complete one.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};

use thiserror::Error;

use crate::cache::Cache;

/// The metapackage that always depends on the current cloud kernel.
pub const META_PACKAGE: &str = "linux-image-cloud-amd64";

/// How much of a failing command's stderr an error quotes.
const STDERR_TAIL_BYTES: usize = 2000;

#[derive(Debug, Error)]
pub enum KernelError {
    #[error(
        "cannot run `{command}`: {source}; fetching the guest kernel needs apt-get, apt-cache \
         and dpkg-deb (a Debian host)"
    )]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` failed ({status}); {hint}; its error output ends with:\n{stderr}")]
    Failed {
        command: String,
        status: ExitStatus,
        stderr: String,
        hint: &'static str,
    },
    #[error(
        "apt-cache does not know which kernel {META_PACKAGE} depends on; run `apt-get update` \
         (as root) and check that a Debian bookworm `main` source is configured \
         (apt-cache printed: {output:?})"
    )]
    NotResolved { output: String },
    #[error(
        "{META_PACKAGE} depends on {package:?}, whose version is not a plain kernel release \
         string; report this, the package naming has changed"
    )]
    BadVersion { package: String },
    #[error("`apt-get download {package}` succeeded but left no .deb file in {dir}; try again")]
    NoDeb { package: String, dir: PathBuf },
    #[error(
        "package {package} has no {what} (looked for {tried}); the Debian package layout has \
         changed, report this"
    )]
    MissingInPackage {
        package: String,
        what: &'static str,
        tried: String,
    },
    #[error(
        "cannot {action} {path}: {source}; check that the cache directory is writable and has \
         space (set VHPC_CACHE_DIR to use another)"
    )]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A kernel in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelInfo {
    /// The kernel release, e.g. `6.1.0-56-cloud-amd64` (what `uname -r` prints in the guest).
    pub version: String,
    /// The bzImage.
    pub kernel: PathBuf,
    /// Its `lib/modules/<version>` tree.
    pub modules_dir: PathBuf,
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> KernelError {
    let path = path.to_owned();
    move |source| KernelError::Io {
        action,
        path,
        source,
    }
}

/// Makes sure the cache holds the current Debian cloud kernel and its modules, downloading
/// them if needed; replaces any other cached version.
pub fn fetch_kernel(
    cache: &Cache,
    progress: &mut dyn FnMut(&str),
) -> Result<KernelInfo, KernelError> {
    progress(&format!("resolving {META_PACKAGE}"));
    let package = resolve_package()?;
    let version = version_of(&package)?;
    let info = KernelInfo {
        kernel: cache.kernel_path(),
        modules_dir: cache.modules_dir(&version),
        version,
    };
    if is_cached(cache, &info.version) {
        progress(&format!(
            "kernel {} is already cached in {}",
            info.version,
            cache.root().display()
        ));
        return Ok(info);
    }

    std::fs::create_dir_all(cache.root()).map_err(io_err("create", cache.root()))?;
    // Inside the cache so the unpacked files can be renamed into place.
    let work = tempfile::Builder::new()
        .prefix(".kernel-fetch-")
        .tempdir_in(cache.root())
        .map_err(io_err("create a temporary directory in", cache.root()))?;

    progress(&format!("downloading {package} (apt-get download)"));
    let deb = download(&package, work.path())?;
    progress("extracting");
    let tree = work.path().join("extracted");
    run(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree),
        "the downloaded package may be corrupt; run `vhpc image kernel` again",
    )?;
    let (vmlinuz, modules) = locate(&tree, &package, &info.version)?;
    decompress_modules(&modules, progress)?;
    install(cache, &info.version, &vmlinuz, &modules)?;
    progress(&format!(
        "cached kernel {} in {}",
        info.version,
        cache.root().display()
    ));
    Ok(info)
}

/// Asks apt which versioned image package the metapackage depends on.
fn resolve_package() -> Result<String, KernelError> {
    let mut command = Command::new("apt-cache");
    command.args(["depends", META_PACKAGE]);
    let output = spawn(&mut command)?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    match parse_depends(&stdout) {
        Some(package) if output.status.success() => Ok(package),
        _ => Err(KernelError::NotResolved {
            output: tail(format!("{stdout}{}", String::from_utf8_lossy(&output.stderr)).as_bytes()),
        }),
    }
}

/// Finds `linux-image-<version>-cloud-amd64` in `apt-cache depends linux-image-cloud-amd64`
/// output, e.g. the line `  Depends: linux-image-6.1.0-56-cloud-amd64`.
pub fn parse_depends(output: &str) -> Option<String> {
    output.lines().find_map(|line| {
        let dep = line
            .trim()
            .trim_start_matches('|')
            .strip_prefix("Depends:")?;
        let dep = dep.trim().trim_start_matches('<').trim_end_matches('>');
        let version = dep.strip_prefix("linux-image-")?;
        let is_versioned = version.ends_with("-cloud-amd64") && version != "cloud-amd64";
        is_versioned.then(|| dep.to_owned())
    })
}

/// `linux-image-6.1.0-56-cloud-amd64` → `6.1.0-56-cloud-amd64`, checked to be safe as a file
/// name (it becomes a directory in the cache and in the guest).
fn version_of(package: &str) -> Result<String, KernelError> {
    let version = package.strip_prefix("linux-image-").unwrap_or_default();
    let valid = version.starts_with(|c: char| c.is_ascii_digit())
        && version
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-_+~".contains(c));
    if !valid {
        return Err(KernelError::BadVersion {
            package: package.to_owned(),
        });
    }
    Ok(version.to_owned())
}

/// The cache already holds `version` completely.
fn is_cached(cache: &Cache, version: &str) -> bool {
    cache.kernel_version().is_ok_and(|cached| cached == version)
        && cache.kernel_path().is_file()
        && cache.modules_dir(version).is_dir()
}

/// Downloads `package` into `dir/deb` and returns the `.deb` path.
fn download(package: &str, dir: &Path) -> Result<PathBuf, KernelError> {
    let deb_dir = dir.join("deb");
    std::fs::create_dir(&deb_dir).map_err(io_err("create", &deb_dir))?;
    run(
        Command::new("apt-get")
            // As root, apt-get drops to the `_apt` user, who cannot write into our private
            // temporary directory, and warns; staying root avoids both (no-op for other users).
            .args(["-q", "-o", "APT::Sandbox::User=root", "download", package])
            .current_dir(&deb_dir),
        "run `apt-get update` (as root) if the package is no longer available, and check the \
         network",
    )?;
    let entries = std::fs::read_dir(&deb_dir).map_err(io_err("list", &deb_dir))?;
    for entry in entries {
        let path = entry.map_err(io_err("list", &deb_dir))?.path();
        if path.extension().is_some_and(|ext| ext == "deb") {
            return Ok(path);
        }
    }
    Err(KernelError::NoDeb {
        package: package.to_owned(),
        dir: deb_dir,
    })
}

/// Finds `boot/vmlinuz-<version>` and the `lib/modules/<version>` tree (`usr/lib/...` on
/// merged-/usr packages) in an unpacked package.
fn locate(tree: &Path, package: &str, version: &str) -> Result<(PathBuf, PathBuf), KernelError> {
    let vmlinuz = tree.join("boot").join(format!("vmlinuz-{version}"));
    if !vmlinuz.is_file() {
        return Err(KernelError::MissingInPackage {
            package: package.to_owned(),
            what: "kernel image",
            tried: format!("boot/vmlinuz-{version}"),
        });
    }
    let candidates = ["lib/modules", "usr/lib/modules"].map(|dir| Path::new(dir).join(version));
    let Some(modules) = candidates
        .iter()
        .map(|rel| tree.join(rel))
        .find(|p| p.is_dir())
    else {
        return Err(KernelError::MissingInPackage {
            package: package.to_owned(),
            what: "modules tree",
            tried: candidates
                .map(|rel| rel.display().to_string())
                .join(" and "),
        });
    };
    if !modules.join("modules.builtin").is_file() {
        log::warn!(
            "{package} has no modules.builtin; built-in modules will be reported as missing"
        );
    }
    Ok((vmlinuz, modules))
}

/// Every module file below `dir` compressed with xz, relative paths sorted.
fn xz_modules(dir: &Path) -> Result<Vec<PathBuf>, KernelError> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(current) = pending.pop() {
        for entry in std::fs::read_dir(&current).map_err(io_err("list", &current))? {
            let entry = entry.map_err(io_err("list", &current))?;
            let file_type = entry
                .file_type()
                .map_err(io_err("inspect", &entry.path()))?;
            if file_type.is_dir() {
                pending.push(entry.path());
            } else if file_type.is_file() && entry.file_name().to_string_lossy().ends_with(".ko.xz")
            {
                found.push(entry.path());
            }
        }
    }
    found.sort();
    Ok(found)
}

/// Our module loader reads plain `.ko` files only; unpacks any `.ko.xz` in place with `xz`.
fn decompress_modules(dir: &Path, progress: &mut dyn FnMut(&str)) -> Result<(), KernelError> {
    let compressed = xz_modules(dir)?;
    if compressed.is_empty() {
        return Ok(());
    }
    progress(&format!("decompressing {} modules (xz)", compressed.len()));
    for batch in compressed.chunks(256) {
        run(
            Command::new("xz").args(["-d", "-q", "--"]).args(batch),
            "install xz-utils",
        )?;
    }
    Ok(())
}

/// Moves an unpacked kernel into the cache, replacing whatever was there.
fn install(
    cache: &Cache,
    version: &str,
    vmlinuz: &Path,
    modules: &Path,
) -> Result<(), KernelError> {
    // First forget the old version, so a crash below leaves "no kernel", not a mix.
    let version_path = cache.kernel_version_path();
    match std::fs::remove_file(&version_path) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => {
            return Err(io_err("remove", &version_path)(err));
        }
        _ => {}
    }
    let modules_root = cache.modules_root();
    if modules_root.exists() {
        std::fs::remove_dir_all(&modules_root).map_err(io_err("remove", &modules_root))?;
    }
    let target = cache.modules_dir(version);
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(io_err("create", parent))?;
    }
    std::fs::rename(modules, &target).map_err(io_err("move the modules into", &target))?;

    let kernel = cache.kernel_path();
    File::open(vmlinuz)
        .and_then(|file| file.sync_all())
        .map_err(io_err("sync", vmlinuz))?;
    std::fs::rename(vmlinuz, &kernel).map_err(io_err("move the kernel to", &kernel))?;

    let tmp = version_path.with_extension("tmp");
    File::create(&tmp)
        .and_then(|mut file| {
            file.write_all(format!("{version}\n").as_bytes())?;
            file.sync_all()
        })
        .map_err(io_err("write", &tmp))?;
    std::fs::rename(&tmp, &version_path).map_err(io_err("write", &version_path))
}

/// `program arg...` for messages.
fn describe(command: &Command) -> String {
    let mut parts = vec![command.get_program().to_string_lossy().into_owned()];
    parts.extend(
        command
            .get_args()
            .map(|arg| arg.to_string_lossy().into_owned()),
    );
    parts.join(" ")
}

/// The last [`STDERR_TAIL_BYTES`] of a command's output, trimmed.
fn tail(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim();
    let mut start = text.len().saturating_sub(STDERR_TAIL_BYTES);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].to_owned()
}

/// Runs `command` to completion, capturing its output; a failed start is an error.
fn spawn(command: &mut Command) -> Result<Output, KernelError> {
    log::debug!("running {}", describe(command));
    command
        .stdin(Stdio::null())
        .output()
        .map_err(|source| KernelError::Spawn {
            command: describe(command),
            source,
        })
}

/// Like [`spawn`], and a non-zero exit is an error too, quoting stderr and `hint`.
fn run(command: &mut Command, hint: &'static str) -> Result<Output, KernelError> {
    let output = spawn(command)?;
    if !output.status.success() {
        return Err(KernelError::Failed {
            command: describe(command),
            status: output.status,
            stderr: tail(&output.stderr),
            hint,
        });
    }
    Ok(output)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    const SAMPLE: &str = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n";

    #[test]
    fn parses_apt_cache_depends() {
        let package = parse_depends(SAMPLE).unwrap();
        assert_eq!(package, "linux-image-6.1.0-56-cloud-amd64");
        assert_eq!(version_of(&package).unwrap(), "6.1.0-56-cloud-amd64");
        let alternatives = "linux-image-cloud-amd64\n  PreDepends: dpkg\n \
                            |Depends: <linux-image-6.1.0-9-cloud-amd64>\n  \
                            Depends: linux-image-6.1.0-10-cloud-amd64\n";
        assert_eq!(
            parse_depends(alternatives).unwrap(),
            "linux-image-6.1.0-9-cloud-amd64"
        );
        for nothing in [
            "",
            "N: Unable to locate package linux-image-cloud-amd64\n",
            "linux-image-cloud-amd64\n  Depends: linux-image-cloud-amd64\n",
            "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64-dbg\n",
            "linux-image-cloud-amd64\n  Recommends: linux-image-6.1.0-56-cloud-amd64\n",
        ] {
            assert_eq!(parse_depends(nothing), None, "{nothing:?}");
        }
    }

    #[test]
    fn rejects_odd_versions() {
        for bad in [
            "linux-image-../x-cloud-amd64",
            "linux-image-",
            "linux-image-a b",
            "foo",
        ] {
            assert!(
                matches!(version_of(bad), Err(KernelError::BadVersion { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn error_quotes_the_stderr_tail() {
        let err = run(
            Command::new("sh").args(["-c", "echo first >&2; echo 'it broke' >&2; exit 3"]),
            "do something",
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("`sh -c"), "{text}");
        assert!(text.contains("do something"), "{text}");
        assert!(text.ends_with("first\nit broke"), "{text}");
        let err = run(&mut Command::new("/nonexistent/apt-get"), "x").unwrap_err();
        assert!(matches!(err, KernelError::Spawn { .. }));
        assert_eq!(tail(&[b'a'; 5000]).len(), STDERR_TAIL_BYTES);
        assert_eq!(tail("é".repeat(1500).as_bytes()).chars().count(), 1000);
    }

    /// Writes what `dpkg-deb -x` of a kernel package would produce.
    fn fake_package(tree: &Path, version: &str, modules_in: &str, marker: &str) {
        let modules = tree.join(modules_in).join(version);
        std::fs::create_dir_all(modules.join("kernel/drivers")).unwrap();
        std::fs::write(modules.join("kernel/drivers/a.ko"), marker).unwrap();
        std::fs::write(modules.join("modules.builtin"), "kernel/b.ko\n").unwrap();
        std::fs::create_dir_all(tree.join("boot")).unwrap();
        std::fs::write(tree.join(format!("boot/vmlinuz-{version}")), marker).unwrap();
    }

    #[test]
    fn installs_and_replaces_versions() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path().join("cache"));
        std::fs::create_dir_all(cache.root()).unwrap();
        assert!(!is_cached(&cache, "6.1.0-1-cloud-amd64"));

        for (n, (version, layout)) in [
            ("6.1.0-1-cloud-amd64", "lib/modules"),
            ("6.1.0-2-cloud-amd64", "usr/lib/modules"),
        ]
        .into_iter()
        .enumerate()
        {
            let tree = dir.path().join(format!("x{n}"));
            fake_package(&tree, version, layout, version);
            let (vmlinuz, modules) = locate(&tree, "pkg", version).unwrap();
            install(&cache, version, &vmlinuz, &modules).unwrap();
            assert!(is_cached(&cache, version));
            assert_eq!(cache.kernel_version().unwrap(), version);
            assert_eq!(
                std::fs::read_to_string(cache.kernel_path()).unwrap(),
                version
            );
            let module = cache.modules_dir(version).join("kernel/drivers/a.ko");
            assert_eq!(std::fs::read_to_string(module).unwrap(), version);
            assert!(cache.modules_dir(version).join("modules.builtin").is_file());
        }
        // The first version is gone, not left beside the second.
        let versions = std::fs::read_dir(cache.modules_root().join("lib/modules")).unwrap();
        assert_eq!(versions.count(), 1);
        assert!(!is_cached(&cache, "6.1.0-1-cloud-amd64"));
        // A version file without the files behind it is not a cached kernel.
        std::fs::remove_file(cache.kernel_path()).unwrap();
        assert!(!is_cached(&cache, "6.1.0-2-cloud-amd64"));
    }

    #[test]
    fn locate_reports_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let err = locate(dir.path(), "pkg", "6.1").unwrap_err();
        assert!(matches!(
            err,
            KernelError::MissingInPackage {
                what: "kernel image",
                ..
            }
        ));
        std::fs::create_dir_all(dir.path().join("boot")).unwrap();
        std::fs::write(dir.path().join("boot/vmlinuz-6.1"), b"").unwrap();
        let err = locate(dir.path(), "pkg", "6.1").unwrap_err();
        assert!(
            err.to_string()
                .contains("lib/modules/6.1 and usr/lib/modules/6.1"),
            "{err}"
        );
    }

    #[test]
    fn decompresses_xz_modules() {
        if Command::new("xz").arg("--version").output().is_err() {
            eprintln!("WARNING: `xz` not found; skipping the module decompression test");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("kernel/net");
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(sub.join("m.ko"), b"module bytes").unwrap();
        run(Command::new("xz").arg(sub.join("m.ko")), "").unwrap();
        std::fs::write(dir.path().join("plain.ko"), b"plain").unwrap();
        let mut lines = Vec::new();
        decompress_modules(dir.path(), &mut |line| lines.push(line.to_owned())).unwrap();
        assert_eq!(lines, ["decompressing 1 modules (xz)"]);
        assert_eq!(std::fs::read(sub.join("m.ko")).unwrap(), b"module bytes");
        assert!(xz_modules(dir.path()).unwrap().is_empty());
    }

    /// The real thing: `VHPC_CACHE_DIR=/tmp/kc cargo test -p vhpc-image -- --ignored real_fetch`.
    #[test]
    #[ignore = "downloads the Debian cloud kernel with apt-get (network, Debian host)"]
    fn real_fetch() {
        let cache = Cache::from_env();
        let mut show = |line: &str| eprintln!("{line}");
        let info = fetch_kernel(&cache, &mut show).unwrap();
        eprintln!("{info:?}");
        assert!(info.kernel.is_file() && info.modules_dir.is_dir());
        // A second fetch finds the cached copy.
        let mut lines = Vec::new();
        let again = fetch_kernel(&cache, &mut |line| lines.push(line.to_owned())).unwrap();
        assert_eq!(again, info);
        assert!(
            lines.iter().any(|line| line.contains("already cached")),
            "{lines:?}"
        );
    }
}
