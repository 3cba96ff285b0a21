//! `vhpc guest-memtest`: a guest-side program for checkpoint tests (the guest initramfs has
//! busybox and our static binary, no compiler). It fills N MiB, then for a fixed number of
//! rounds rewrites every word of it from its previous value and folds each new value into a
//! running checksum, writing `round=R checksum=C` to a file after every round (atomically:
//! write beside, rename) and `done rounds=R checksum=C` at the end.
//!
//! The result depends on every word of the buffer in every round and on the registers of the
//! loop, so a checkpoint that loses or mixes up a single page, a register or the file the
//! program writes shows as another final checksum; the same command run anywhere without
//! interruption gives the expected one.

use std::path::{Path, PathBuf};

use anyhow::Context;

/// Arguments of `vhpc guest-memtest`.
#[derive(clap::Args)]
pub struct MemtestArgs {
    /// MiB of memory to keep rewriting.
    #[arg(long, default_value_t = 64)]
    pub mib: usize,
    /// Rounds over the whole buffer.
    #[arg(long, default_value_t = 20)]
    pub rounds: u64,
    /// Progress file; default: only the final line on stdout.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// A 64-bit mixer (splitmix64's finaliser).
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// One round: every word rewritten from its old value, its index and the round; the new
/// values folded into `checksum` in order.
fn round(buf: &mut [u64], r: u64, checksum: u64) -> u64 {
    let mut c = checksum;
    for (j, word) in buf.iter_mut().enumerate() {
        let x = mix(*word ^ r.rotate_left(32) ^ j as u64);
        *word = x;
        c = mix(c ^ x);
    }
    c
}

fn report(out: Option<&Path>, line: &str) -> anyhow::Result<()> {
    let Some(path) = out else {
        return Ok(());
    };
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{line}\n"))
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Runs the program; prints the final line.
pub fn run(args: MemtestArgs) -> anyhow::Result<i32> {
    let words = args.mib << 17;
    let mut buf: Vec<u64> = (0..words as u64).map(mix).collect();
    let mut checksum = 0;
    report(args.out.as_deref(), "round=0 checksum=0")?;
    for r in 1..=args.rounds {
        checksum = round(&mut buf, r, checksum);
        report(
            args.out.as_deref(),
            &format!("round={r} checksum={checksum:016x}"),
        )?;
    }
    let line = format!("done rounds={} checksum={checksum:016x}", args.rounds);
    report(args.out.as_deref(), &line)?;
    println!("{line}");
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_word_and_round_matters() {
        let base: Vec<u64> = (0..1024u64).map(mix).collect();
        let run = |buf: &mut Vec<u64>, rounds: u64| (1..=rounds).fold(0, |c, r| round(buf, r, c));
        let reference = run(&mut base.clone(), 3);
        assert_eq!(reference, run(&mut base.clone(), 3), "deterministic");
        for flip in [0, 511, 1023] {
            let mut b = base.clone();
            b[flip] ^= 1;
            assert_ne!(run(&mut b, 3), reference, "word {flip}");
        }
        assert_ne!(run(&mut base.clone(), 4), reference);
        // A lost round in the middle (a checkpoint restoring an older buffer with a newer
        // checksum, or the other way round) changes the end result too.
        let mut b = base.clone();
        let c = round(&mut b, 1, 0);
        let mut older = b.clone();
        let newer_checksum = round(&mut older, 2, c);
        let skipped = round(&mut b, 3, newer_checksum);
        assert_ne!(skipped, reference);
    }
}
