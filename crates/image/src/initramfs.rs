//! The guest initramfs: our static `vhpc` as `/init`, a static busybox for commands, and the
//! kernel modules the cloud kernel needs for virtio devices.
//!
//! The initramfs is built once per kernel and reused by every VM; the command a VM runs is a
//! second, tiny archive ([`command_archive`]) that the VMM appends at boot (the kernel unpacks
//! concatenated archives in order).

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use thiserror::Error;
use vhpc_guest::protocol::{COMMAND_PATH, LOAD_ORDER_PATH, encode_argv};

use crate::cache::{Cache, CacheError};
use crate::cpio::{CpioError, CpioWriter};
use crate::modules::{self, ModulesError};

/// Modules the default guest loads (dependencies such as `virtio`, `virtio_ring` and `vsock`
/// are resolved from the modules themselves).
pub const GUEST_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "vmw_vsock_virtio_transport",
];

/// Directories every initramfs has (parents first): mount points for /init, PATH entries, the
/// module tree. `usr/local/bin` is where the lab links `vhpc`.
const BASE_DIRS: &[(&str, u32)] = &[
    ("bin", 0o755),
    ("dev", 0o755),
    ("etc", 0o755),
    ("lib", 0o755),
    ("lib/modules", 0o755),
    ("proc", 0o555),
    ("root", 0o700),
    ("run", 0o755),
    ("sbin", 0o755),
    ("sys", 0o555),
    ("tmp", 0o1777),
    ("usr", 0o755),
    ("usr/bin", 0o755),
    ("usr/local", 0o755),
    ("usr/local/bin", 0o755),
    ("usr/sbin", 0o755),
];

/// Busybox applets linked into /bin whatever `busybox --list` says (it is asked too, so the
/// guest gets every applet the binary has).
pub const BUSYBOX_APPLETS: &[&str] = &[
    "[",
    "awk",
    "basename",
    "cat",
    "chmod",
    "cmp",
    "cp",
    "cut",
    "date",
    "dd",
    "df",
    "diff",
    "dirname",
    "dmesg",
    "du",
    "echo",
    "env",
    "expr",
    "false",
    "find",
    "free",
    "grep",
    "head",
    "hexdump",
    "hostname",
    "id",
    "insmod",
    "ip",
    "kill",
    "less",
    "ln",
    "ls",
    "lsmod",
    "md5sum",
    "mkdir",
    "mknod",
    "modprobe",
    "mount",
    "mv",
    "nc",
    "nproc",
    "od",
    "ping",
    "poweroff",
    "printf",
    "ps",
    "reboot",
    "rm",
    "sed",
    "seq",
    "sh",
    "sha256sum",
    "sleep",
    "sort",
    "stat",
    "stty",
    "sync",
    "tail",
    "tee",
    "test",
    "time",
    "timeout",
    "touch",
    "tr",
    "true",
    "uname",
    "uptime",
    "vi",
    "wc",
    "wget",
    "which",
    "whoami",
    "xargs",
    "yes",
];

/// Applets never linked: `/init` is ours, and a busybox `init` in /bin would be the kernel's
/// fallback if ours failed, hiding the failure.
const SKIPPED_APPLETS: &[&str] = &["busybox", "init", "linuxrc"];

#[derive(Debug, Error)]
pub enum InitramfsError {
    #[error(transparent)]
    Cpio(#[from] CpioError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(
        "cannot resolve the guest's kernel modules: {0}; run `vhpc image kernel` to fetch the \
         kernel and its modules again"
    )]
    Modules(#[from] ModulesError),
    #[error(
        "{path} is dynamically linked (it names an ELF interpreter), but the initramfs has no \
         C library; install a static busybox with `apt-get install busybox-static` (it \
         installs /bin/busybox)"
    )]
    BusyboxNotStatic { path: PathBuf },
    #[error(
        "{path} is dynamically linked (it names an ELF interpreter), but it must run as the \
         guest's /init without a C library; build vhpc static (the workspace's \
         .cargo/config.toml sets crt-static)"
    )]
    InitNotStatic { path: PathBuf },
    #[error(
        "{path} is not a 64-bit ELF executable ({reason}); give the path of a static x86-64 \
         busybox (`apt-get install busybox-static` installs /bin/busybox)"
    )]
    BusyboxNotElf { path: PathBuf, reason: &'static str },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("kernel module path {path} is not valid UTF-8 and cannot go into the initramfs")]
    NonUtf8Path { path: PathBuf },
    #[error("cannot {action} {path}: {source}; check that the directory is writable")]
    Write {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// How an ELF executable is linked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Linkage {
    Static,
    /// Has a `PT_INTERP` program header: needs ld.so and a C library.
    Dynamic,
}

/// Bytes of a file read to find its program headers (they follow the 64-byte ELF header).
const ELF_PREFIX_BYTES: u64 = 64 * 1024;

/// Reads the program headers of an ELF64 little-endian file from its first bytes.
fn elf_linkage(prefix: &[u8]) -> Result<Linkage, &'static str> {
    const PT_INTERP: u32 = 3;
    const TRUNCATED: &str = "its program headers lie outside the file";
    if prefix.get(..4) != Some(b"\x7fELF".as_slice()) {
        return Err("no ELF magic");
    }
    if prefix.get(4..6) != Some([2u8, 1].as_slice()) {
        return Err("not 64-bit little-endian");
    }
    let number = |at: usize, len: usize| -> Result<u64, &'static str> {
        let end = at.checked_add(len).ok_or(TRUNCATED)?;
        let bytes = prefix.get(at..end).ok_or(TRUNCATED)?;
        Ok(bytes.iter().rev().fold(0, |n, &b| (n << 8) | u64::from(b)))
    };
    let phoff = number(0x20, 8)?;
    let phentsize = number(0x36, 2)?;
    let phnum = number(0x38, 2)?;
    if phnum > 0 && phentsize < 56 {
        return Err("its program header entries are too small");
    }
    for index in 0..phnum {
        let at = index
            .checked_mul(phentsize)
            .and_then(|rel| rel.checked_add(phoff))
            .and_then(|at| usize::try_from(at).ok())
            .ok_or(TRUNCATED)?;
        if number(at, 4)? == u64::from(PT_INTERP) {
            return Ok(Linkage::Dynamic);
        }
    }
    Ok(Linkage::Static)
}

fn read_prefix(path: &Path) -> Result<Vec<u8>, InitramfsError> {
    let read_err = |source| InitramfsError::Read {
        path: path.to_owned(),
        source,
    };
    let mut prefix = Vec::new();
    File::open(path)
        .and_then(|file| file.take(ELF_PREFIX_BYTES).read_to_end(&mut prefix))
        .map_err(read_err)?;
    Ok(prefix)
}

/// Busybox must be a static ELF: the initramfs has no C library.
fn check_busybox(path: &Path) -> Result<(), InitramfsError> {
    match elf_linkage(&read_prefix(path)?) {
        Ok(Linkage::Static) => Ok(()),
        Ok(Linkage::Dynamic) => Err(InitramfsError::BusyboxNotStatic {
            path: path.to_owned(),
        }),
        Err(reason) => Err(InitramfsError::BusyboxNotElf {
            path: path.to_owned(),
            reason,
        }),
    }
}

/// A dynamically linked /init would only show as a kernel panic in the guest; catch it here.
/// Anything that is not an ELF64 (a `#!` script in a test, say) is left to the kernel.
fn check_init(path: &Path) -> Result<(), InitramfsError> {
    match elf_linkage(&read_prefix(path)?) {
        Ok(Linkage::Dynamic) => Err(InitramfsError::InitNotStatic {
            path: path.to_owned(),
        }),
        _ => Ok(()),
    }
}

/// The applets to link: [`BUSYBOX_APPLETS`] plus whatever `busybox --list` prints.
fn applets(busybox: &Path) -> BTreeSet<String> {
    let mut names: BTreeSet<String> = BUSYBOX_APPLETS.iter().map(|&n| n.to_owned()).collect();
    match Command::new(busybox).arg("--list").output() {
        Ok(out) if out.status.success() => {
            let listed = String::from_utf8_lossy(&out.stdout);
            names.extend(listed.lines().map(str::trim).map(str::to_owned));
        }
        Ok(out) => log::warn!(
            "`{} --list` failed ({}); linking only the standard applets",
            busybox.display(),
            out.status
        ),
        Err(err) => log::warn!(
            "cannot run `{} --list` ({err}); linking only the standard applets",
            busybox.display()
        ),
    }
    names.retain(|name| {
        !name.is_empty() && !name.contains('/') && !SKIPPED_APPLETS.contains(&name.as_str())
    });
    names
}

/// Adds the skeleton every vhpc initramfs shares: the standard directories, `dev/console`,
/// `init` = `vhpc_binary`, `bin/busybox` (must be static) and `/bin` links for its applets.
pub fn add_base<W: Write>(
    w: &mut CpioWriter<W>,
    vhpc_binary: &Path,
    busybox: &Path,
) -> Result<(), InitramfsError> {
    check_init(vhpc_binary)?;
    check_busybox(busybox)?;
    for &(dir, mode) in BASE_DIRS {
        w.add_dir(dir, mode)?;
    }
    // The kernel opens /dev/console for /init's stdio before /init can mount devtmpfs.
    w.add_char_device("dev/console", 0o600, 5, 1)?;
    w.add_file_from_path("init", 0o755, vhpc_binary)?;
    w.add_file_from_path("bin/busybox", 0o755, busybox)?;
    let names = applets(busybox);
    for name in &names {
        w.add_symlink(&format!("bin/{name}"), "busybox")?;
    }
    log::debug!("linked {} busybox applets into /bin", names.len());
    Ok(())
}

/// Adds the cached kernel's modules `names` and their dependencies under
/// `lib/modules/<version>/`, and the load-order list /init reads ([`LOAD_ORDER_PATH`]).
/// Call after [`add_base`], which creates `lib/modules`. Returns how many modules were added.
pub fn add_modules<W: Write>(
    w: &mut CpioWriter<W>,
    cache: &Cache,
    names: &[&str],
) -> Result<usize, InitramfsError> {
    let version = cache.kernel_version()?;
    let host_dir = cache.modules_dir(&version);
    let order = modules::resolve(&host_dir, names)?;
    let guest_dir = format!("lib/modules/{version}");
    w.add_dir(&guest_dir, 0o755)?;
    let mut dirs = BTreeSet::new();
    let mut load_order = String::new();
    for rel in &order {
        let rel_str = rel.to_str().ok_or_else(|| InitramfsError::NonUtf8Path {
            path: host_dir.join(rel),
        })?;
        // Parents of the module, outermost first, each added once.
        let mut parents: Vec<&Path> = rel.ancestors().skip(1).collect();
        parents.reverse();
        for parent in parents.iter().filter(|p| !p.as_os_str().is_empty()) {
            let parent = format!("{guest_dir}/{}", parent.to_string_lossy());
            if dirs.insert(parent.clone()) {
                w.add_dir(&parent, 0o755)?;
            }
        }
        let guest_path = format!("{guest_dir}/{rel_str}");
        w.add_file_from_path(&guest_path, 0o644, &host_dir.join(rel))?;
        load_order.push_str(&format!("/{guest_path}\n"));
    }
    let list_path = LOAD_ORDER_PATH.trim_start_matches('/');
    w.add_file(list_path, 0o644, load_order.as_bytes())?;
    log::info!("added {} kernel modules for {version}", order.len());
    Ok(order.len())
}

/// Writes the default guest initramfs to `out` (uncompressed newc): [`add_base`] plus
/// [`GUEST_MODULES`]. Written to `out.tmp` and renamed, so `out` is always complete.
pub fn build_guest_initramfs(
    cache: &Cache,
    vhpc_binary: &Path,
    busybox: &Path,
    out: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<(), InitramfsError> {
    let write_err = |action, path: &Path| {
        let path = path.to_owned();
        move |source| InitramfsError::Write {
            action,
            path,
            source,
        }
    };
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(write_err("create", parent))?;
    }
    let mut tmp_name = OsString::from(out.as_os_str());
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);

    progress(&format!("building the guest initramfs {}", out.display()));
    let result = write_archive(cache, vhpc_binary, busybox, &tmp, progress);
    let result =
        result.and_then(|()| std::fs::rename(&tmp, out).map_err(write_err("rename", &tmp)));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    let size = std::fs::metadata(out).map(|m| m.len()).unwrap_or(0);
    progress(&format!(
        "wrote {} ({:.1} MiB)",
        out.display(),
        size as f64 / (1024.0 * 1024.0)
    ));
    Ok(())
}

fn write_archive(
    cache: &Cache,
    vhpc_binary: &Path,
    busybox: &Path,
    path: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<(), InitramfsError> {
    let write_err = |action| {
        move |source| InitramfsError::Write {
            action,
            path: path.to_owned(),
            source,
        }
    };
    let file = File::create(path).map_err(write_err("create"))?;
    let mut w = CpioWriter::new(BufWriter::new(file));
    add_base(&mut w, vhpc_binary, busybox)?;
    let version = cache.kernel_version()?;
    progress(&format!("adding kernel modules for {version}"));
    let count = add_modules(&mut w, cache, GUEST_MODULES)?;
    progress(&format!("added {count} modules"));
    let file = w
        .finish()?
        .into_inner()
        .map_err(|err| write_err("write")(err.into_error()))?;
    file.sync_all().map_err(write_err("sync"))
}

/// A complete newc archive holding only the command file ([`COMMAND_PATH`]) for `argv`; the
/// VMM appends it, 4-byte aligned, to the initramfs.
pub fn command_archive(argv: &[String]) -> Vec<u8> {
    let path = COMMAND_PATH.trim_start_matches('/');
    let dir = path.rsplit_once('/').map_or("", |(dir, _)| dir);
    let mut w = CpioWriter::new(Vec::new());
    // Writing to a Vec cannot fail and the paths are constants, valid by construction.
    let written = (|| {
        if !dir.is_empty() {
            w.add_dir(dir, 0o755)?;
        }
        w.add_file(path, 0o644, &encode_argv(argv))?;
        w.finish()
    })();
    written.expect("a cpio archive of constant paths written to memory")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use crate::cpio::tests::parse;
    use vhpc_guest::protocol::decode_argv;

    /// A minimal ELF64 header plus program headers of the given types.
    fn craft_elf(types: &[u32]) -> Vec<u8> {
        let mut elf = vec![0u8; 64];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        elf[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        elf[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        elf[0x38..0x3a].copy_from_slice(&(types.len() as u16).to_le_bytes());
        for &t in types {
            let mut header = [0u8; 56];
            header[..4].copy_from_slice(&t.to_le_bytes());
            elf.extend_from_slice(&header);
        }
        elf
    }

    #[test]
    fn elf_linkage_from_program_headers() {
        assert_eq!(elf_linkage(&craft_elf(&[1, 1, 4])), Ok(Linkage::Static));
        assert_eq!(elf_linkage(&craft_elf(&[6, 3, 1])), Ok(Linkage::Dynamic));
        assert_eq!(elf_linkage(&craft_elf(&[])), Ok(Linkage::Static));
        assert!(elf_linkage(b"#!/bin/sh\n").is_err());
        let elf = craft_elf(&[1, 3]);
        for len in 0..elf.len() - 56 {
            assert!(elf_linkage(&elf[..len]).is_err(), "truncated at {len}");
        }
        let mut bad = elf.clone();
        bad[0x20..0x28].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(elf_linkage(&bad).is_err());
    }

    #[test]
    fn real_binaries() {
        // The test binary itself: static with this workspace's crt-static, else dynamic.
        let me = std::env::current_exe().unwrap();
        assert!(elf_linkage(&read_prefix(&me).unwrap()).is_ok());
        let busybox = Path::new("/bin/busybox");
        if busybox.exists() && check_busybox(busybox).is_err() {
            eprintln!("WARNING: /bin/busybox is not static (install busybox-static)");
        }
        let dir = tempfile::tempdir().unwrap();
        let dynamic = dir.path().join("dyn");
        std::fs::write(&dynamic, craft_elf(&[3])).unwrap();
        let err = check_busybox(&dynamic).unwrap_err();
        assert!(
            err.to_string().contains("apt-get install busybox-static"),
            "{err}"
        );
        assert!(matches!(
            check_init(&dynamic),
            Err(InitramfsError::InitNotStatic { .. })
        ));
        let script = dir.path().join("script");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        assert!(matches!(
            check_busybox(&script),
            Err(InitramfsError::BusyboxNotElf { .. })
        ));
        check_init(&script).unwrap();
    }

    #[test]
    fn command_archive_parses_back() {
        let argv = vec!["sh".to_owned(), "-c".to_owned(), "echo hi".to_owned()];
        let archive = command_archive(&argv);
        assert_eq!(&archive[..6], b"070701");
        assert_eq!(archive.len() % 4, 0);
        let entries = parse(&archive);
        assert_eq!(entries.len(), 2);
        assert_eq!((entries[0].0.as_str(), entries[0].1), ("vhpc", 0o040_755));
        assert_eq!(entries[1].0, COMMAND_PATH.trim_start_matches('/'));
        assert_eq!(decode_argv(&entries[1].4).unwrap(), argv);
    }

    /// A fake static ELF for `init`, a `busybox` that is a static ELF too (its `--list` fails,
    /// so the standard applets are linked), and a cache with a tiny modules tree.
    struct Fixture {
        dir: tempfile::TempDir,
        cache: Cache,
        init: PathBuf,
        busybox: PathBuf,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let init = dir.path().join("vhpc");
        std::fs::write(&init, craft_elf(&[1])).unwrap();
        let busybox = dir.path().join("busybox");
        std::fs::write(&busybox, craft_elf(&[1])).unwrap();
        let cache = Cache::new(dir.path().join("cache"));
        let version = "6.1.0-9-cloud-amd64";
        let mods = cache.modules_dir(version);
        std::fs::create_dir_all(&mods).unwrap();
        std::fs::write(cache.kernel_version_path(), format!("{version}\n")).unwrap();
        // Module ELFs with only a .modinfo section, built by the modules tests' helper shape.
        for (rel, depends) in [
            ("kernel/drivers/virtio/virtio_pci.ko", "virtio,virtio_ring"),
            ("kernel/drivers/virtio/virtio_ring.ko", ""),
            ("kernel/drivers/block/virtio_blk.ko", "virtio,virtio_ring"),
            ("kernel/drivers/net/virtio_net.ko", "virtio_ring,virtio"),
            (
                "kernel/drivers/char/virtio_console.ko",
                "virtio,virtio_ring",
            ),
            ("kernel/net/vmw_vsock/vsock.ko", ""),
            (
                "kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko",
                "vsock",
            ),
            (
                "kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko",
                "vmw_vsock_virtio_transport_common,virtio,virtio_ring,vsock",
            ),
        ] {
            let path = mods.join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, modinfo_elf(&format!("depends={depends}\0"))).unwrap();
        }
        std::fs::write(
            mods.join("modules.builtin"),
            "kernel/drivers/virtio/virtio.ko\n",
        )
        .unwrap();
        Fixture {
            dir,
            cache,
            init,
            busybox,
        }
    }

    fn modinfo_elf(modinfo: &str) -> Vec<u8> {
        crate::modules::test_module_elf(modinfo.as_bytes())
    }

    #[test]
    fn guest_initramfs_layout() {
        let f = fixture();
        let out = f.dir.path().join("out/sub/initramfs.cpio");
        let mut lines = Vec::new();
        let mut progress = |line: &str| lines.push(line.to_owned());
        build_guest_initramfs(&f.cache, &f.init, &f.busybox, &out, &mut progress).unwrap();
        assert!(!out.with_extension("cpio.tmp").exists());
        assert!(lines.iter().any(|l| l == "added 8 modules"), "{lines:?}");

        let entries = parse(&std::fs::read(&out).unwrap());
        let find = |name: &str| {
            entries
                .iter()
                .find(|e| e.0 == name)
                .unwrap_or_else(|| panic!("{name} missing"))
        };
        // Every entry's parent directory comes before it (the kernel creates no parents).
        let mut seen_dirs = BTreeSet::new();
        for (name, mode, ..) in &entries {
            if let Some((parent, _)) = name.rsplit_once('/') {
                assert!(seen_dirs.contains(parent), "{name} before its directory");
            }
            if mode & 0o170_000 == 0o040_000 {
                seen_dirs.insert(name.clone());
            }
        }
        for dir in [
            "dev", "proc", "sys", "tmp", "root", "bin", "sbin", "usr/bin", "usr/sbin",
        ] {
            assert!(seen_dirs.contains(dir), "{dir}");
        }
        assert_eq!(find("init").1, 0o100_755);
        assert_eq!(find("init").4, std::fs::read(&f.init).unwrap());
        assert_eq!(find("bin/busybox").1, 0o100_755);
        let console = find("dev/console");
        assert_eq!((console.1, console.2, console.3), (0o020_600, 5, 1));
        for applet in BUSYBOX_APPLETS {
            let link = find(&format!("bin/{applet}"));
            assert_eq!(
                (link.1, link.4.as_slice()),
                (0o120_777, b"busybox".as_slice())
            );
        }
        assert!(entries.iter().all(|e| e.0 != "bin/init"));

        let list = String::from_utf8(find("lib/modules/vhpc-load-order").4.clone()).unwrap();
        let list: Vec<&str> = list.lines().collect();
        let base = "/lib/modules/6.1.0-9-cloud-amd64/kernel";
        let pos = |m: &str| {
            list.iter()
                .position(|l| l.ends_with(&format!("/{m}.ko")))
                .unwrap()
        };
        assert_eq!(list.len(), 8, "{list:?}");
        assert_eq!(list[0], format!("{base}/drivers/virtio/virtio_ring.ko"));
        assert!(pos("vsock") < pos("vmw_vsock_virtio_transport_common"));
        assert!(pos("vmw_vsock_virtio_transport_common") < pos("vmw_vsock_virtio_transport"));
        for path in list {
            assert_eq!(find(path.trim_start_matches('/')).1, 0o100_644);
        }
    }

    #[test]
    fn build_errors_leave_no_file() {
        let f = fixture();
        let out = f.dir.path().join("initramfs.cpio");
        let dynamic = f.dir.path().join("dyn-busybox");
        std::fs::write(&dynamic, craft_elf(&[3])).unwrap();
        let err = build_guest_initramfs(&f.cache, &f.init, &dynamic, &out, &mut |_| {});
        assert!(matches!(err, Err(InitramfsError::BusyboxNotStatic { .. })));
        let empty = Cache::new(f.dir.path().join("empty-cache"));
        let err = build_guest_initramfs(&empty, &f.init, &f.busybox, &out, &mut |_| {});
        let err = err.unwrap_err();
        assert!(err.to_string().contains("vhpc image kernel"), "{err}");
        assert!(!out.exists());
        assert!(
            std::fs::read_dir(f.dir.path())
                .unwrap()
                .all(|e| { !e.unwrap().file_name().to_string_lossy().ends_with(".tmp") })
        );
    }

    /// With a fetched kernel: `VHPC_CACHE_DIR=/tmp/kc cargo test -p vhpc-image -- --ignored
    /// real_guest_initramfs` (after the kernel module's `real_fetch`).
    #[test]
    #[ignore = "needs a fetched kernel in the cache and /bin/busybox from busybox-static"]
    fn real_guest_initramfs() {
        let cache = Cache::from_env();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("initramfs.cpio");
        let me = std::env::current_exe().unwrap();
        let mut show = |line: &str| eprintln!("{line}");
        build_guest_initramfs(&cache, &me, Path::new("/bin/busybox"), &out, &mut show).unwrap();
        let entries = parse(&std::fs::read(&out).unwrap());
        let list = &entries
            .iter()
            .find(|e| e.0 == "lib/modules/vhpc-load-order")
            .unwrap()
            .4;
        eprintln!("{}", String::from_utf8_lossy(list));
        eprintln!("{} entries", entries.len());
    }

    #[test]
    fn real_busybox_lists_applets() {
        let busybox = Path::new("/bin/busybox");
        if !busybox.exists() {
            eprintln!("WARNING: no /bin/busybox; skipping");
            return;
        }
        let names = applets(busybox);
        assert!(names.contains("sh") && names.contains("ls"));
        assert!(!names.contains("init") && !names.contains("busybox"));
    }
}
