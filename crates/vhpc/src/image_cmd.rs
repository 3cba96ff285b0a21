//! `vhpc image ...`: the guest kernel and initramfs, and the test guest.

use anyhow::Context;
use vhpc_image::cache::Cache;

use crate::cli::{ImageCommand, RootfsArgs};

fn progress(text: &str) {
    for line in text.lines() {
        eprintln!("vhpc image: {line}");
    }
}

pub fn run(cmd: ImageCommand) -> anyhow::Result<i32> {
    let cache = Cache::from_env();
    match cmd {
        ImageCommand::Kernel => {
            let info = vhpc_image::kernel::fetch_kernel(&cache, &mut progress)?;
            println!("{}", info.version);
        }
        ImageCommand::Initramfs { out, busybox } => {
            let out = out.unwrap_or_else(|| cache.initramfs_path());
            let me =
                std::env::current_exe().context("cannot find the vhpc binary to use as /init")?;
            vhpc_image::initramfs::build_guest_initramfs(
                &cache,
                &me,
                &busybox,
                &out,
                &mut progress,
            )?;
            println!("{}", out.display());
        }
        ImageCommand::Rootfs(args) => rootfs(&cache, args)?,
        ImageCommand::TestGuest { out } => {
            std::fs::write(&out, vhpc_testguest::ELF)
                .with_context(|| format!("cannot write {}", out.display()))?;
            println!("{}", out.display());
        }
    }
    Ok(0)
}

/// `vhpc image rootfs`: an explicit OUT that exists is an error without --force; the cached
/// image of a package set is reused (its name is the package set's hash).
fn rootfs(cache: &Cache, args: RootfsArgs) -> anyhow::Result<()> {
    use vhpc_image::rootfs::{self, RootfsError, RootfsSpec};
    let spec = RootfsSpec::new(
        &args.packages,
        args.no_default_packages,
        args.mirror,
        args.size,
    )?;
    let out = match args.out {
        Some(out) if out.exists() && !args.force => {
            return Err(RootfsError::Exists { out }.into());
        }
        Some(out) => out,
        None => {
            let cached = rootfs::cached_image_path(cache.root(), &spec);
            if cached.exists() && !args.force {
                progress(&format!(
                    "{} is already built for this package set; keeping it (--force rebuilds)",
                    cached.display()
                ));
                println!("{}", cached.display());
                return Ok(());
            }
            cached
        }
    };
    let me = std::env::current_exe().context("cannot find the vhpc binary to install as agent")?;
    rootfs::build_rootfs(&spec, &me, &out, &mut progress)?;
    println!("{}", out.display());
    Ok(())
}
