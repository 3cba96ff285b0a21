//! The source side: pre-copy with KVM's dirty log, then stop-and-copy, then the handover.
//!
//! ```text
//! source                                   destination
//!   Hello (config, host, versions)  ──────►  checks, allocates guest memory
//!                                   ◄──────  Accept | Refuse
//!   round 0: every non-zero page    ──────►  written into guest memory
//!   round k: pages dirtied meanwhile ─────►  (until they fit the downtime target)
//!   pause; last dirty pages; State  ──────►  VM rebuilt, not running
//!                                   ◄──────  Restored
//!   Commit                          ──────►  vCPUs start
//!                                   ◄──────  Started
//! ```
//!
//! Until Commit is sent, any failure (stream broken, destination refuses or dies, a local
//! error) resumes the source as it was: it never stopped being the VM. After Commit the
//! source stays paused: whether the destination runs is then the destination's to say (a
//! missing Started is reported, never guessed at by resuming, which could run the guest twice
//! against the same disks).

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::wire::{self, FinalState, Hello, Kind, MAX_PAGES_PER_FRAME, PAGE_SIZE};
use super::{MigrationError, MigrationOptions, Phase, Progress};
use crate::snapshot::{HostInfo, components};
use crate::vm::Vm;

/// What a migration did.
#[derive(Clone, Debug)]
pub struct MigrationStats {
    /// Pre-copy rounds, the first (all of memory) included; the stop-and-copy is not a round.
    pub rounds: u32,
    pub pages_sent: u64,
    /// Pages sent while the VM was paused.
    pub final_pages: u64,
    pub total: Duration,
    /// From the source's vCPUs stopped to the destination's Started.
    pub downtime: Duration,
}

/// Migrates `vm` over `stream` (already connected to a receiver). On success the VM is left
/// paused and belongs to the destination: the caller ends it. On an error before the handover
/// it runs as before (if it was running); see [`MigrationError::handover_unknown`].
pub fn migrate<S: Read + Write>(
    vm: &Vm,
    stream: &mut S,
    opts: &MigrationOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<MigrationStats, MigrationError> {
    let was_paused = vm.is_paused();
    // Reading the dirty log clears it: the link to the last checkpoint no longer holds.
    vm.set_last_checkpoint(None);
    let mut run = Sender {
        vm,
        stream,
        opts,
        progress,
        start: Instant::now(),
        stats: MigrationStats {
            rounds: 0,
            pages_sent: 0,
            final_pages: 0,
            total: Duration::ZERO,
            downtime: Duration::ZERO,
        },
        committed: false,
    };
    let result = run.go();
    let committed = run.committed;
    match result {
        Ok(stats) => Ok(stats),
        Err(e) => {
            if !committed {
                // Tell the destination, if it still listens, to drop what it has.
                let _ = wire::write_frame(stream, Kind::Abort, e.to_string().as_bytes());
                if !was_paused && vm.is_paused() {
                    vm.resume().map_err(|r| {
                        MigrationError::Local(format!(
                            "{e}; and resuming the source failed too: {r}"
                        ))
                    })?;
                }
            }
            Err(e)
        }
    }
}

struct Sender<'a, S> {
    vm: &'a Vm,
    stream: &'a mut S,
    opts: &'a MigrationOptions,
    progress: &'a mut dyn FnMut(&Progress),
    start: Instant,
    stats: MigrationStats,
    committed: bool,
}

impl<S: Read + Write> Sender<'_, S> {
    fn go(&mut self) -> Result<MigrationStats, MigrationError> {
        self.handshake()?;
        // Start a fresh log: everything written from here on is sent again later.
        if self.vm.dirty_logging() {
            self.vm.dirty_pages()?;
        } else {
            self.vm.set_dirty_logging(true)?;
        }
        let mut round_rate = self.send_all_memory()?;
        let target = self.opts.downtime;
        let mut dirty = self.vm.dirty_pages()?;
        let mut not_shrinking = 0;
        loop {
            let expected = expected_time(dirty.len() as u64, round_rate);
            if expected <= target || self.stats.rounds >= self.opts.max_rounds || not_shrinking >= 3
            {
                break;
            }
            let before = dirty.len();
            round_rate = self.send_round(&dirty)?;
            dirty = self.vm.dirty_pages()?;
            not_shrinking = if dirty.len() >= before {
                not_shrinking + 1
            } else {
                0
            };
        }
        // Stop-and-copy.
        let paused_at = Instant::now();
        if !self.vm.is_paused() {
            self.vm.pause()?;
        }
        self.report(Phase::StopAndCopy, 0, dirty.len() as u64);
        let mut last = dirty;
        last.extend(self.vm.dirty_pages()?);
        last.sort_unstable();
        last.dedup();
        self.send_pages(&last)?;
        self.stats.final_pages = last.len() as u64;
        self.send_state()?;
        expect(self.stream, Kind::Restored)?;
        wire::write_frame(self.stream, Kind::Commit, &[])?;
        self.committed = true;
        expect(self.stream, Kind::Started)
            .map_err(|e| MigrationError::HandoverUnknown(e.to_string()))?;
        self.stats.downtime = paused_at.elapsed();
        self.stats.total = self.start.elapsed();
        self.report(Phase::Done, 0, 0);
        Ok(self.stats.clone())
    }

    fn report(&mut self, phase: Phase, round_pages: u64, remaining: u64) {
        (self.progress)(&Progress {
            phase,
            // The round that ended (or runs): round 0 is all of memory.
            round: self.stats.rounds.saturating_sub(1),
            round_pages,
            pages_sent: self.stats.pages_sent,
            remaining_pages: remaining,
            elapsed: self.start.elapsed(),
        });
    }

    fn handshake(&mut self) -> Result<(), MigrationError> {
        let hello = Hello {
            protocol: wire::PROTOCOL_VERSION,
            vhpc_version: env!("CARGO_PKG_VERSION").into(),
            host: HostInfo::current(),
            config: self.vm.config().clone(),
            labels: self.opts.labels.clone(),
        };
        wire::write_postcard(self.stream, Kind::Hello, &hello)?;
        let reply = wire::read_frame(self.stream)?;
        match reply.kind {
            Kind::Accept => Ok(()),
            Kind::Refuse => Err(MigrationError::Refused(reply.text())),
            other => Err(unexpected(other, "Accept")),
        }
    }

    /// Round 0: every page that is not all zeroes (the destination's memory starts zeroed).
    /// Returns the rate it achieved, in pages per second.
    fn send_all_memory(&mut self) -> Result<f64, MigrationError> {
        let started = Instant::now();
        let mut sent = 0u64;
        let regions: Vec<(u64, u64)> = self
            .vm
            .memory()
            .iter()
            .map(|r| (r.start_addr().0, r.len()))
            .collect();
        let total: u64 = regions.iter().map(|(_, len)| len / PAGE_SIZE as u64).sum();
        let mut chunk = vec![0u8; MAX_PAGES_PER_FRAME * PAGE_SIZE];
        let mut scanned = 0u64;
        for (base, len) in regions {
            let mut at = 0;
            while at < len {
                let n = (len - at).min(chunk.len() as u64) as usize;
                let buf = &mut chunk[..n];
                self.vm
                    .memory()
                    .read_slice(buf, GuestAddress(base + at))
                    .map_err(|e| MigrationError::Local(format!("reading guest memory: {e}")))?;
                let pages = self.send_nonzero_runs(base + at, buf)?;
                sent += pages;
                self.stats.pages_sent += pages;
                at += n as u64;
                scanned += n as u64 / PAGE_SIZE as u64;
                if at % (64 << 20) == 0 {
                    self.report(Phase::FirstRound, sent, total - scanned);
                }
            }
        }
        self.stats.rounds = 1;
        self.end_round(sent)?;
        Ok(rate(sent, started.elapsed()))
    }

    /// Sends the runs of non-zero pages of `buf` (guest memory at `gpa`); how many pages.
    fn send_nonzero_runs(&mut self, gpa: u64, buf: &[u8]) -> Result<u64, MigrationError> {
        let pages = buf.len() / PAGE_SIZE;
        let zero = |i: usize| {
            buf[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]
                .iter()
                .all(|&b| b == 0)
        };
        let (mut i, mut sent) = (0, 0u64);
        while i < pages {
            if zero(i) {
                i += 1;
                continue;
            }
            let first = i;
            while i < pages && !zero(i) {
                i += 1;
            }
            let data = &buf[first * PAGE_SIZE..i * PAGE_SIZE];
            let payload = wire::pages_payload(gpa + (first * PAGE_SIZE) as u64, data);
            wire::write_frame(self.stream, Kind::Pages, &payload)?;
            sent += (i - first) as u64;
        }
        Ok(sent)
    }

    fn end_round(&mut self, pages: u64) -> Result<(), MigrationError> {
        let mut p = Vec::with_capacity(12);
        p.extend_from_slice(&self.stats.rounds.to_le_bytes());
        p.extend_from_slice(&pages.to_le_bytes());
        wire::write_frame(self.stream, Kind::RoundEnd, &p)?;
        Ok(())
    }

    /// A pre-copy round over `dirty`; returns its rate in pages per second.
    fn send_round(&mut self, dirty: &[u64]) -> Result<f64, MigrationError> {
        let started = Instant::now();
        self.stats.rounds += 1;
        self.send_pages(dirty)?;
        self.end_round(dirty.len() as u64)?;
        self.report(Phase::Round, dirty.len() as u64, 0);
        Ok(rate(dirty.len() as u64, started.elapsed()))
    }

    /// Sends the pages at the guest-physical addresses `pages` (ascending), runs together.
    fn send_pages(&mut self, pages: &[u64]) -> Result<(), MigrationError> {
        let mut buf = vec![0u8; MAX_PAGES_PER_FRAME * PAGE_SIZE];
        for (gpa, count) in crate::snapshot::memfile::runs_of(pages) {
            let mut done = 0usize;
            while done < count as usize {
                let n = (count as usize - done).min(MAX_PAGES_PER_FRAME);
                let at = gpa + (done * PAGE_SIZE) as u64;
                let data = &mut buf[..n * PAGE_SIZE];
                self.vm
                    .memory()
                    .read_slice(data, GuestAddress(at))
                    .map_err(|e| MigrationError::Local(format!("reading guest memory: {e}")))?;
                wire::write_frame(self.stream, Kind::Pages, &wire::pages_payload(at, data))?;
                done += n;
            }
        }
        self.stats.pages_sent += pages.len() as u64;
        Ok(())
    }

    fn send_state(&mut self) -> Result<(), MigrationError> {
        let machine = self.vm.save_machine()?;
        let components = components::encode(&machine)
            .map_err(|e| MigrationError::Local(format!("encoding the VM state: {e}")))?;
        // The devices are paused (their requests done): make the disks durable for the
        // destination, which opens the same files (shared storage).
        let disks = crate::snapshot::sync_disks(self.vm.config())
            .map_err(|e| MigrationError::Local(e.to_string()))?;
        wire::write_postcard(self.stream, Kind::State, &FinalState { components, disks })?;
        Ok(())
    }
}

fn rate(pages: u64, took: Duration) -> f64 {
    pages as f64 / took.as_secs_f64().max(1e-6)
}

/// How long sending `pages` takes at `rate` pages per second.
fn expected_time(pages: u64, rate: f64) -> Duration {
    if pages == 0 {
        return Duration::ZERO;
    }
    Duration::from_secs_f64(pages as f64 / rate.max(1.0))
}

/// Reads the next frame and insists it is `kind` (an Abort or Refuse says why it is not).
pub(super) fn expect<S: Read>(stream: &mut S, kind: Kind) -> Result<wire::Frame, MigrationError> {
    let frame = wire::read_frame(stream)?;
    match frame.kind {
        k if k == kind => Ok(frame),
        Kind::Abort | Kind::Refuse => Err(MigrationError::PeerAborted(frame.text())),
        other => Err(unexpected(other, &format!("{kind:?}"))),
    }
}

pub(super) fn unexpected(got: Kind, wanted: &str) -> MigrationError {
    MigrationError::Protocol(format!("got a {got:?} frame where {wanted} belongs"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_time_follows_the_rate() {
        assert_eq!(expected_time(0, 0.0), Duration::ZERO);
        assert_eq!(expected_time(1000, 10_000.0), Duration::from_millis(100));
        // A round too fast to time does not divide by zero.
        assert!(expected_time(10, 0.0) > Duration::ZERO);
    }
}
