//! `vhpc image ...`: the guest kernel and initramfs, and the test guest.

use anyhow::Context;
use vhpc_image::cache::Cache;

use crate::cli::ImageCommand;

fn progress(line: &str) {
    eprintln!("vhpc image: {line}");
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
        ImageCommand::TestGuest { out } => {
            std::fs::write(&out, vhpc_testguest::ELF)
                .with_context(|| format!("cannot write {}", out.display()))?;
            println!("{}", out.display());
        }
    }
    Ok(0)
}
