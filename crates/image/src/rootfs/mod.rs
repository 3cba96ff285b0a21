//! Root file system images: Debian bookworm from packages, as an ext4 image file.
//!
//! `debootstrap --variant=minbase` (with the extra packages as `--include`) builds the tree
//! in a scratch folder beside the output; the guest agent (the static `vhpc` binary) goes to
//! `/usr/local/bin/vhpc`; apt's caches and package lists are removed; then `mkfs.ext4 -d`
//! writes the tree into an image sized from its content ([`size`]). No loop mount: only
//! debootstrap needs root, for its chroot. The image is written as `OUT.tmp` and renamed, so
//! `OUT` is always a complete image.

mod debootstrap;
pub mod mirror;
pub mod size;
pub mod spec;
mod workdir;

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Instant;

use thiserror::Error;

pub use spec::{DEFAULT_PACKAGES, RootfsSpec, cached_image_path};

/// The hostname of a guest booted from the image (its /etc/hostname).
pub const GUEST_HOSTNAME: &str = "vhpc-guest";

/// Where the guest agent goes inside the image.
pub const AGENT_PATH: &str = "usr/local/bin/vhpc";

#[derive(Debug, Error)]
pub enum RootfsError {
    #[error(
        "invalid package name {0:?}: Debian package names are lower-case letters, digits, \
         '+', '-' and '.' (at least two characters)"
    )]
    BadPackage(String),
    #[error(
        "invalid --mirror {0:?}: give a Debian mirror URL such as http://deb.debian.org/debian"
    )]
    BadMirror(String),
    #[error("invalid --size {0}: give the image size in GiB, from 0.125 to 1024 (e.g. --size 2)")]
    BadSize(f64),
    #[error(
        "building a root file system needs root: debootstrap chroots into the new tree; run \
         it as root (e.g. `sudo vhpc image rootfs ...`)"
    )]
    NotRoot,
    #[error(
        "{tool} not found: install it with `apt-get install {package}` (or run scripts/setup.sh)"
    )]
    MissingTool {
        tool: &'static str,
        package: &'static str,
    },
    #[error("cannot run {tool}: {source}")]
    Spawn {
        tool: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "debootstrap failed ({status}); check the package names and that the mirror is \
         reachable (--mirror); its output ends with:\n{tail}"
    )]
    Debootstrap { status: ExitStatus, tail: String },
    #[error(
        "--size {given_mib} MiB is too small: the content needs at least {needed_mib} MiB; \
         give a larger --size or leave it out to have it computed"
    )]
    TooSmall { given_mib: u64, needed_mib: u64 },
    #[error("mkfs.ext4 failed ({status}); its output ends with:\n{tail}")]
    Mkfs { status: ExitStatus, tail: String },
    #[error("{out} already exists; remove it or pass --force to rebuild it")]
    Exists { out: PathBuf },
    #[error("cannot {action} {path}: {source}; check that the folder is writable and has space")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl RootfsError {
    fn io(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Self {
        let path = path.to_owned();
        move |source| Self::Io {
            action,
            path,
            source,
        }
    }
}

/// What a finished build measured.
#[derive(Debug, Clone, Copy)]
pub struct BuildReport {
    pub content: size::Content,
    pub image_bytes: u64,
}

/// Finds an executable in the tool PATH debootstrap uses (root's sbin directories included).
fn find_tool(name: &'static str, package: &'static str) -> Result<PathBuf, RootfsError> {
    debootstrap::TOOL_PATH
        .split(':')
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file())
        .ok_or(RootfsError::MissingTool {
            tool: name,
            package,
        })
}

/// Builds the image `spec` describes at `out`, with `agent` (a static `vhpc`) inside.
pub fn build_rootfs(
    spec: &RootfsSpec,
    agent: &Path,
    out: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<BuildReport, RootfsError> {
    let debootstrap = find_tool("debootstrap", "debootstrap")?;
    let mkfs = find_tool("mkfs.ext4", "e2fsprogs")?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(RootfsError::NotRoot);
    }
    let work =
        workdir::WorkDir::create(out).map_err(RootfsError::io("create a folder for", out))?;
    let started = Instant::now();
    let packages: Vec<&str> = spec.packages.iter().map(String::as_str).collect();
    progress(&format!(
        "[1/4] debootstrap {} ({}) from {} with {} extra package(s): {}",
        spec::SUITE,
        spec::VARIANT,
        spec.mirror,
        packages.len(),
        packages.join(" ")
    ));
    debootstrap::run(&debootstrap, spec, &work.root, progress)?;
    progress(&format!(
        "[2/4] installing the guest agent as /{AGENT_PATH}, cleaning apt caches ({:.0} s so far)",
        started.elapsed().as_secs_f64()
    ));
    install_agent(agent, &work.root)?;
    set_identity(&work.root)?;
    clean_apt(&work.root)?;
    let content =
        size::measure(&work.root).map_err(RootfsError::io("measure the tree", &work.root))?;
    let image_bytes = choose_size(spec, &content)?;
    progress(&format!(
        "[3/4] mkfs.ext4 -d: {} MiB of content, {} inodes, into a {} MiB image",
        content.data_bytes >> 20,
        content.inodes,
        image_bytes >> 20
    ));
    make_ext4(&mkfs, &work.root, &work.image, image_bytes, &content)?;
    std::fs::rename(&work.image, out).map_err(RootfsError::io("rename the image to", out))?;
    progress(&format!(
        "[4/4] wrote {} ({} MiB) in {:.0} s",
        out.display(),
        image_bytes >> 20,
        started.elapsed().as_secs_f64()
    ));
    Ok(BuildReport {
        content,
        image_bytes,
    })
}

fn choose_size(spec: &RootfsSpec, content: &size::Content) -> Result<u64, RootfsError> {
    let needed = content.minimum_image_bytes();
    match spec.size_bytes {
        None => Ok(content.image_bytes()),
        Some(given) if given < needed => Err(RootfsError::TooSmall {
            given_mib: given >> 20,
            needed_mib: needed >> 20,
        }),
        Some(given) => Ok(given),
    }
}

fn install_agent(agent: &Path, root: &Path) -> Result<(), RootfsError> {
    use std::os::unix::fs::PermissionsExt;
    let dest = root.join(AGENT_PATH);
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir).map_err(RootfsError::io("create", dir))?;
    }
    std::fs::copy(agent, &dest).map_err(RootfsError::io("copy the agent to", &dest))?;
    std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o755))
        .map_err(RootfsError::io("make executable", &dest))
}

/// The guest's name, so nothing of the build host's (debootstrap copies its /etc/hosts) ends
/// up in the image: /etc/hostname (which the guest's /init sets) and a matching /etc/hosts.
fn set_identity(root: &Path) -> Result<(), RootfsError> {
    let write = |rel: &str, text: String| {
        let path = root.join(rel);
        std::fs::write(&path, text).map_err(RootfsError::io("write", &path))
    };
    write("etc/hostname", format!("{GUEST_HOSTNAME}\n"))?;
    write(
        "etc/hosts",
        format!(
            "127.0.0.1\tlocalhost\n127.0.1.1\t{GUEST_HOSTNAME}\n\
             ::1\tlocalhost ip6-localhost ip6-loopback\n"
        ),
    )
}

/// Removes the downloaded .debs, apt's binary caches and the package lists (an `apt-get
/// update` in the guest brings the lists back).
fn clean_apt(root: &Path) -> Result<(), RootfsError> {
    let remove_files_in = |dir: &Path, keep: &dyn Fn(&str) -> bool| -> Result<(), RootfsError> {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Ok(()); // nothing there to clean
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let is_file = entry.file_type().is_ok_and(|t| t.is_file());
            if is_file && !keep(&name.to_string_lossy()) {
                std::fs::remove_file(entry.path())
                    .map_err(RootfsError::io("remove", &entry.path()))?;
            }
        }
        Ok(())
    };
    remove_files_in(&root.join("var/cache/apt/archives"), &|n| {
        !n.ends_with(".deb")
    })?;
    remove_files_in(&root.join("var/cache/apt"), &|n| !n.ends_with(".bin"))?;
    remove_files_in(&root.join("var/lib/apt/lists"), &|n| n == "lock")
}

fn make_ext4(
    mkfs: &Path,
    root: &Path,
    image: &Path,
    bytes: u64,
    content: &size::Content,
) -> Result<(), RootfsError> {
    let file = std::fs::File::create(image).map_err(RootfsError::io("create", image))?;
    file.set_len(bytes)
        .map_err(RootfsError::io("size (sparse)", image))?;
    let out = Command::new(mkfs)
        .args(["-q", "-F", "-L", "vhpc-root", "-m", "1", "-b", "4096"])
        .arg("-N")
        .arg(content.inodes_to_reserve().to_string())
        .arg("-d")
        .arg(root)
        .arg(image)
        .env("PATH", debootstrap::TOOL_PATH)
        .output()
        .map_err(|source| RootfsError::Spawn {
            tool: mkfs.display().to_string(),
            source,
        })?;
    if !out.status.success() {
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(20)..].join("\n");
        return Err(RootfsError::Mkfs {
            status: out.status,
            tail,
        });
    }
    file.sync_all().map_err(RootfsError::io("sync", image))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn a_missing_tool_names_its_package() {
        let err = find_tool("vhpc-no-such-tool", "some-package").unwrap_err();
        assert_eq!(
            err.to_string(),
            "vhpc-no-such-tool not found: install it with `apt-get install some-package` (or \
             run scripts/setup.sh)"
        );
    }

    #[test]
    fn a_given_size_must_hold_the_content() {
        let content = size::Content {
            data_bytes: 300 << 20,
            inodes: 9000,
        };
        let mut spec = RootfsSpec::new(&[], false, Some("http://m".into()), Some(0.25)).unwrap();
        let err = choose_size(&spec, &content).unwrap_err();
        assert!(
            matches!(err, RootfsError::TooSmall { given_mib: 256, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("leave it out"), "{err}");
        spec.size_bytes = Some(1 << 30);
        assert_eq!(choose_size(&spec, &content).unwrap(), 1 << 30);
        spec.size_bytes = None;
        assert_eq!(choose_size(&spec, &content).unwrap(), content.image_bytes());
    }

    #[test]
    fn the_image_names_its_guest() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::fs::write(dir.path().join("etc/hosts"), "10.1.2.3 buildhost\n").unwrap();
        set_identity(dir.path()).unwrap();
        let read = |p: &str| std::fs::read_to_string(dir.path().join(p)).unwrap();
        assert_eq!(read("etc/hostname"), "vhpc-guest\n");
        let hosts = read("etc/hosts");
        assert!(hosts.contains("127.0.1.1\tvhpc-guest\n") && !hosts.contains("buildhost"));
    }

    #[test]
    fn apt_caches_are_cleaned_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for (path, body) in [
            ("var/cache/apt/archives/a_1_amd64.deb", "deb"),
            ("var/cache/apt/archives/lock", ""),
            ("var/cache/apt/pkgcache.bin", "bin"),
            (
                "var/lib/apt/lists/deb.debian.org_dists_bookworm_InRelease",
                "x",
            ),
            ("var/lib/apt/lists/lock", ""),
            ("etc/os-release", "ID=debian"),
        ] {
            let path = root.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, body).unwrap();
        }
        std::fs::create_dir_all(root.join("var/cache/apt/archives/partial")).unwrap();
        clean_apt(root).unwrap();
        let left = |p: &str| root.join(p).exists();
        assert!(!left("var/cache/apt/archives/a_1_amd64.deb"));
        assert!(!left("var/cache/apt/pkgcache.bin"));
        assert!(!left(
            "var/lib/apt/lists/deb.debian.org_dists_bookworm_InRelease"
        ));
        assert!(left("var/cache/apt/archives/lock") && left("var/lib/apt/lists/lock"));
        assert!(left("var/cache/apt/archives/partial") && left("etc/os-release"));
    }

    #[test]
    fn mkfs_writes_a_folder_into_an_ext4_image() {
        let Ok(mkfs) = find_tool("mkfs.ext4", "e2fsprogs") else {
            panic!("this test needs mkfs.ext4: apt-get install e2fsprogs (scripts/setup.sh)");
        };
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/os-release"), "ID=debian\n").unwrap();
        let content = size::measure(&root).unwrap();
        let image = dir.path().join("r.img");
        make_ext4(&mkfs, &root, &image, content.image_bytes(), &content).unwrap();
        let bytes = std::fs::read(&image).unwrap();
        assert_eq!(bytes.len() as u64, content.image_bytes());
        // The ext4 superblock starts at 1024; its magic 0xEF53 is at offset 56 in it.
        assert_eq!(&bytes[1024 + 56..1024 + 58], &[0x53, 0xEF]);
        // Too small a file: mkfs fails and says why.
        let err = make_ext4(&mkfs, &root, &image, 64 * 1024, &content).unwrap_err();
        assert!(matches!(err, RootfsError::Mkfs { .. }), "{err}");
    }
}
