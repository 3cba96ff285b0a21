//! What the benchmarks measure of a VMM process: its own memory (guest RAM left out), its CPU
//! time and peak RSS when reaped, and the statistics over runs.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// RSS of process `pid` in KiB, without guest RAM: every mapping at least as large as guest
/// RAM is taken to be guest memory and left out.
pub fn vmm_rss_kib(pid: u32, guest_mib: u64) -> anyhow::Result<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .with_context(|| format!("cannot read /proc/{pid}/smaps"))?;
    Ok(vmm_rss_from_smaps(&smaps, guest_mib * 1024))
}

fn vmm_rss_from_smaps(smaps: &str, guest_kib: u64) -> u64 {
    let (mut total, mut size) = (0, 0);
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        match (
            words.next(),
            words.next().and_then(|v| v.parse::<u64>().ok()),
        ) {
            (Some("Size:"), Some(v)) => size = v,
            (Some("Rss:"), Some(v)) if size < guest_kib => total += v,
            _ => {}
        }
    }
    total
}

/// Writes to `path` the cached guest initramfs with the command archive for `argv` appended:
/// what `vhpc run -- ARGV` gives its guest, as a file another VMM (QEMU) can boot too.
pub fn write_initramfs_with_command(
    cache: &vhpc_image::cache::Cache,
    argv: &[String],
    path: &std::path::Path,
) -> anyhow::Result<()> {
    let mut initramfs = std::fs::read(cache.initramfs_path()).with_context(|| {
        format!(
            "cannot read {}; run `vhpc image initramfs`",
            cache.initramfs_path().display()
        )
    })?;
    initramfs.resize(initramfs.len().next_multiple_of(4), 0);
    initramfs.extend(vhpc_image::initramfs::command_archive(argv));
    std::fs::write(path, &initramfs).with_context(|| format!("cannot write {}", path.display()))
}

/// Runs a host command of a benchmark's network set-up (busybox ip/brctl/tunctl in the lab).
pub fn host_sh(cmd: &str) -> anyhow::Result<()> {
    let st = std::process::Command::new("/bin/sh")
        .args(["-c", cmd])
        .status()
        .with_context(|| format!("cannot run {cmd}"))?;
    if !st.success() {
        anyhow::bail!("`{cmd}` failed ({st})");
    }
    Ok(())
}

/// What a reaped process used.
#[derive(Clone, Copy, Debug)]
pub struct Usage {
    /// User + system CPU time.
    pub cpu: Duration,
    /// Peak RSS in KiB (guest pages it touched included).
    pub peak_rss_kib: u64,
}

/// How to reap a child.
#[derive(Clone, Copy, Debug)]
pub enum Reap {
    /// Wait as long as it takes.
    Wait,
    /// Kill it now.
    Kill,
    /// Let it exit by itself until then, kill it after.
    KillAfter(Instant),
}

/// Reaps our child `pid` as `how` says and returns what it used (wait4's rusage).
pub fn reap(pid: u32, how: Reap) -> anyhow::Result<Usage> {
    let mut status = 0;
    // SAFETY: all-zero is a valid rusage; wait4 fills it in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let mut kill = matches!(how, Reap::Kill);
    loop {
        if let Reap::KillAfter(deadline) = how {
            kill |= Instant::now() >= deadline;
        }
        if kill {
            // SAFETY: kill(2) of our own child, which is not reaped yet.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
        let polling = matches!(how, Reap::KillAfter(_)) && !kill;
        let flags = if polling { libc::WNOHANG } else { 0 };
        // SAFETY: waits for our own unreaped child; both out-pointers are valid for the call.
        let r = unsafe { libc::wait4(pid as libc::pid_t, &mut status, flags, &mut usage) };
        match r {
            0 => std::thread::sleep(Duration::from_millis(20)),
            r if r < 0 => bail!("wait4 failed: {}", std::io::Error::last_os_error()),
            _ => break,
        }
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    Ok(Usage {
        cpu: tv(usage.ru_utime) + tv(usage.ru_stime),
        peak_rss_kib: usage.ru_maxrss as u64,
    })
}

/// (median, min, max); NaN for no values.
pub fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (median, v[0], v[n - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_are_median_min_max() {
        assert_eq!(stats(vec![3.0, 1.0, 2.0]), (2.0, 1.0, 3.0));
        assert_eq!(stats(vec![4.0, 1.0, 3.0, 2.0]), (2.5, 1.0, 4.0));
        assert!(stats(vec![]).0.is_nan());
    }

    #[test]
    fn guest_memory_is_left_out_of_vmm_rss() {
        let smaps = "55d0-55e0 r-xp 0 00:00 0 /vhpc\nSize: 64 kB\nRss: 60 kB\n\
                     7f00-7f10 rw-p 0 00:00 0\nSize: 262144 kB\nRss: 1024 kB\n\
                     7f20-7f30 rw-p 0 00:00 0\nSize: 132 kB\nRss: 12 kB\n";
        assert_eq!(vmm_rss_from_smaps(smaps, 256 * 1024), 72);
    }

    #[test]
    fn own_rss_is_read_from_proc() {
        let rss = vmm_rss_kib(std::process::id(), 1 << 20).expect("own smaps");
        assert!(rss > 100, "own RSS {rss} KiB");
    }

    #[test]
    #[allow(clippy::zombie_processes)] // reap() is what waits for them
    fn reaps_a_child_that_exits_and_kills_one_that_does_not() {
        let quick = std::process::Command::new("true")
            .spawn()
            .expect("spawn true");
        let far = Instant::now() + Duration::from_secs(30);
        reap(quick.id(), Reap::KillAfter(far)).expect("reap true");
        let slow = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let start = Instant::now();
        reap(
            slow.id(),
            Reap::KillAfter(Instant::now() + Duration::from_millis(100)),
        )
        .expect("reap sleep");
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "killed at the deadline"
        );
    }
}
