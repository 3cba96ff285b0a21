//! `vhpc guest-io`: a block-device throughput measurer that runs *inside* a guest (the guest's
//! /init is this same binary, so `/init guest-io ...` works in any vhpc initramfs). `vhpc bench
//! blk` boots it under vhpc and QEMU alike, so both are timed by the same code with the same
//! clock, the guest's.
//!
//! Direct I/O (O_DIRECT, no guest page cache): every request reaches the virtio-blk device.
//! One request at a time (queue depth 1), the latency-bound case that shows a device model's
//! per-request cost; sequential tests use large requests and show its bandwidth.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::cli::GuestIoArgs;

/// Direct I/O needs buffers aligned to the logical block size; a page covers every device.
const ALIGN: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum IoPattern {
    SeqRead,
    SeqWrite,
    RandRead,
    RandWrite,
}

impl IoPattern {
    fn name(self) -> &'static str {
        match self {
            IoPattern::SeqRead => "seq-read",
            IoPattern::SeqWrite => "seq-write",
            IoPattern::RandRead => "rand-read",
            IoPattern::RandWrite => "rand-write",
        }
    }
    fn writes(self) -> bool {
        matches!(self, IoPattern::SeqWrite | IoPattern::RandWrite)
    }
    fn random(self) -> bool {
        matches!(self, IoPattern::RandRead | IoPattern::RandWrite)
    }
}

/// A zeroed heap buffer aligned for direct I/O.
struct AlignedBuf {
    ptr: *mut u8,
    layout: Layout,
}

impl AlignedBuf {
    fn new(len: usize) -> anyhow::Result<AlignedBuf> {
        let layout = Layout::from_size_align(len, ALIGN).context("bad buffer size")?;
        // SAFETY: the layout has a non-zero size (checked by the caller: bs >= 512).
        let ptr = unsafe { alloc_zeroed(layout) };
        if ptr.is_null() {
            bail!("cannot allocate a {len}-byte buffer");
        }
        Ok(AlignedBuf { ptr, layout })
    }
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr points to layout.size() initialised (zeroed) bytes we own exclusively.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this very layout, freed once.
        unsafe { dealloc(self.ptr, self.layout) }
    }
}

/// What one test measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct IoResult {
    pub bytes: u64,
    pub requests: u64,
    pub elapsed: Duration,
}

impl IoResult {
    pub fn mib_per_s(&self) -> f64 {
        self.bytes as f64 / (1024.0 * 1024.0) / self.elapsed.as_secs_f64()
    }
    pub fn iops(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }
}

/// The result line `vhpc bench blk` parses: `guest-io PATTERN bs=N bytes=N requests=N ns=N`.
pub fn format_result(pattern: &str, bs: usize, r: &IoResult) -> String {
    format!(
        "guest-io {pattern} bs={bs} bytes={} requests={} ns={} (MiB/s={:.1} iops={:.0})",
        r.bytes,
        r.requests,
        r.elapsed.as_nanos(),
        r.mib_per_s(),
        r.iops()
    )
}

/// Parses a result line back: (pattern, result).
pub fn parse_result(line: &str) -> Option<(String, IoResult)> {
    let mut words = line.strip_prefix("guest-io ")?.split_whitespace();
    let pattern = words.next()?.to_string();
    let mut field = |key: &str| -> Option<u64> {
        words
            .next()?
            .strip_prefix(key)?
            .strip_prefix('=')?
            .parse()
            .ok()
    };
    let _bs = field("bs")?;
    let bytes = field("bytes")?;
    let requests = field("requests")?;
    let ns = field("ns")?;
    (ns > 0).then(|| {
        (
            pattern,
            IoResult {
                bytes,
                requests,
                elapsed: Duration::from_nanos(ns),
            },
        )
    })
}

/// xorshift64*: cheap, deterministic offsets for the random tests.
struct Offsets(u64);

impl Offsets {
    fn next_block(&mut self, blocks: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % blocks
    }
}

fn run_one(
    file: &std::fs::File,
    pattern: IoPattern,
    args: &GuestIoArgs,
) -> anyhow::Result<IoResult> {
    let bs = args.bs;
    let span = args.size_mib * 1024 * 1024;
    let blocks = span / bs as u64;
    let mut buf = AlignedBuf::new(bs)?;
    buf.as_mut()
        .iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = i as u8);
    let mut offsets = Offsets(0x9e37_79b9_7f4a_7c15);
    let limit = Duration::from_secs_f64(args.seconds);
    let (mut bytes, mut requests) = (0u64, 0u64);
    let start = Instant::now();
    while start.elapsed() < limit {
        let block = if pattern.random() {
            offsets.next_block(blocks)
        } else {
            requests % blocks
        };
        let at = block * bs as u64;
        let n = if pattern.writes() {
            file.write_at(buf.as_mut(), at)
        } else {
            file.read_at(buf.as_mut(), at)
        }
        .with_context(|| format!("{} at byte {at} of {}", pattern.name(), args.dev.display()))?;
        if n != bs {
            bail!("short {} at byte {at}: {n} of {bs} bytes", pattern.name());
        }
        bytes += n as u64;
        requests += 1;
    }
    Ok(IoResult {
        bytes,
        requests,
        elapsed: start.elapsed(),
    })
}

pub fn run(args: GuestIoArgs) -> anyhow::Result<i32> {
    if args.bs < 512 || !args.bs.is_power_of_two() {
        bail!("--bs must be a power of two of at least 512 bytes");
    }
    let span = args.size_mib * 1024 * 1024;
    if span < args.bs as u64 {
        bail!("--size-mib must hold at least one --bs block");
    }
    let writes = args.patterns.iter().any(|p| p.writes());
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(writes)
        .custom_flags(libc::O_DIRECT)
        .open(&args.dev)
        .with_context(|| format!("cannot open {} for direct I/O", args.dev.display()))?;
    for &pattern in &args.patterns {
        let r = run_one(&file, pattern, &args)?;
        println!("{}", format_result(pattern.name(), args.bs, &r));
    }
    Ok(0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn result_lines_round_trip() {
        let r = IoResult {
            bytes: 1 << 30,
            requests: 1024,
            elapsed: Duration::from_millis(2500),
        };
        let line = format_result("seq-read", 1 << 20, &r);
        assert_eq!(parse_result(&line), Some(("seq-read".to_string(), r)));
        assert!((r.mib_per_s() - 409.6).abs() < 1e-9);
        assert_eq!(
            parse_result("guest-io seq-read bs=1 bytes=2 requests=3 ns=0"),
            None
        );
        assert_eq!(parse_result("something else"), None);
    }

    #[test]
    fn random_offsets_stay_inside_and_spread() {
        let mut o = Offsets(0x9e37_79b9_7f4a_7c15);
        let seen: std::collections::HashSet<u64> = (0..1000).map(|_| o.next_block(64)).collect();
        assert!(seen.iter().all(|&b| b < 64));
        assert!(seen.len() > 60, "offsets cover the span: {}", seen.len());
    }

    /// Runs two patterns against a plain file (tmpfs may not do O_DIRECT, so a file beside the
    /// test binary in the target directory); checks that what was counted was moved.
    #[test]
    fn measures_a_file() {
        let exe = std::env::current_exe().unwrap();
        let dev = exe.with_file_name(format!("guest-io-test-{}.img", std::process::id()));
        std::fs::write(&dev, vec![0u8; 1 << 20]).unwrap();
        let args = GuestIoArgs {
            dev: dev.clone(),
            patterns: vec![IoPattern::SeqWrite, IoPattern::RandRead],
            bs: 4096,
            size_mib: 1,
            seconds: 0.05,
        };
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&dev)
        {
            Ok(f) => f,
            Err(e) => panic!("this test needs a filesystem with O_DIRECT for its target dir: {e}"),
        };
        let w = run_one(&file, IoPattern::SeqWrite, &args).unwrap();
        assert!(w.requests > 0 && w.bytes == w.requests * 4096);
        let on_disk = std::fs::read(&dev).unwrap();
        assert_eq!(on_disk[4096 + 1], 1, "the written pattern reached the file");
        let r = run_one(&file, IoPattern::RandRead, &args).unwrap();
        assert!(r.requests > 0 && r.bytes == r.requests * 4096);
        std::fs::remove_file(dev).unwrap();
    }
}
