//! `--rootfs IMG[,ro]` (`vhpc run`, `vhpc vm start`): boot with an ext4 image built by
//! `vhpc image rootfs` as the root file system. The image becomes the first virtio-blk disk
//! (/dev/vda) and the kernel command line tells /init to switch to it; the initramfs stays
//! stage one (it loads the virtio drivers).

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use anyhow::bail;
use vhpc_api::{DiskConfig, VmConfig};
use vhpc_guest::protocol::ROOT_FLAG;

/// The device the first virtio-blk disk becomes in the guest.
pub const ROOT_DEVICE: &str = "/dev/vda";

/// Byte offset of the ext4 superblock's magic number (superblock at 1024, magic at +56).
const EXT4_MAGIC_AT: u64 = 1024 + 56;
const EXT4_MAGIC: [u8; 2] = [0x53, 0xEF];

/// Makes `rootfs` the VM's first disk and root file system.
pub fn attach(config: &mut VmConfig, rootfs: &DiskConfig) -> anyhow::Result<()> {
    check_ext4(&rootfs.path)?;
    config.disks.insert(0, rootfs.clone());
    config
        .cmdline
        .push_str(&format!(" {ROOT_FLAG}={ROOT_DEVICE}"));
    Ok(())
}

/// A clear error, before any VM starts, for a missing image or one that is not ext4.
fn check_ext4(path: &Path) -> anyhow::Result<()> {
    let shown = path.display();
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "root file system image {shown} does not exist; build one with `vhpc image rootfs {shown}`"
        ),
        Err(e) => bail!("cannot read root file system image {shown}: {e}"),
    };
    let mut magic = [0u8; 2];
    let read = file
        .seek(SeekFrom::Start(EXT4_MAGIC_AT))
        .and_then(|_| file.read_exact(&mut magic));
    if read.is_err() || magic != EXT4_MAGIC {
        bail!(
            "{shown} is not an ext4 file system image (no ext4 superblock); --rootfs needs an \
             image built by `vhpc image rootfs`"
        );
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use std::path::PathBuf;
    use vhpc_api::MemoryConfig;

    fn config() -> VmConfig {
        VmConfig {
            vcpus: 1,
            memory: MemoryConfig {
                size_mib: 512,
                hugepages: false,
                prefault: false,
            },
            kernel: PathBuf::from("/k"),
            initramfs: None,
            cmdline: "console=ttyS0".into(),
            disks: vec!["/data.img".parse().unwrap()],
            nets: Vec::new(),
        }
    }

    #[test]
    fn the_root_image_becomes_vda_and_the_flag_is_set() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("r.img");
        let mut bytes = vec![0u8; 4096];
        bytes[1080..1082].copy_from_slice(&EXT4_MAGIC);
        std::fs::write(&img, bytes).unwrap();
        let mut c = config();
        let root: DiskConfig = format!("{},ro", img.display()).parse().unwrap();
        attach(&mut c, &root).unwrap();
        assert_eq!(c.disks[0], root);
        assert_eq!(c.disks[1].path, PathBuf::from("/data.img"));
        assert_eq!(c.cmdline, "console=ttyS0 vhpc.root=/dev/vda");
    }

    #[test]
    fn missing_or_foreign_images_are_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let missing: DiskConfig = dir
            .path()
            .join("nope.img")
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let err = attach(&mut config(), &missing).unwrap_err().to_string();
        assert!(
            err.contains("does not exist") && err.contains("vhpc image rootfs"),
            "{err}"
        );
        for bytes in [vec![0u8; 4096], vec![0u8; 100]] {
            let img = dir.path().join("zero.img");
            std::fs::write(&img, bytes).unwrap();
            let disk: DiskConfig = img.to_str().unwrap().parse().unwrap();
            let mut c = config();
            let err = attach(&mut c, &disk).unwrap_err().to_string();
            assert!(err.contains("not an ext4"), "{err}");
            assert_eq!(c.disks.len(), 1, "nothing attached on error");
        }
    }
}
