//! Live migration of a running VM to another VMM process, on this host or another, over any
//! byte stream (TCP in practice): pre-copy with KVM's dirty log until what is left fits the
//! downtime target, then stop-and-copy and a two-step handover. The protocol is documented in
//! docs/migration-protocol.md; [`wire`] holds its frames, [`send`] the source, [`receive`] the
//! destination.

mod receive;
mod send;
pub mod wire;

use std::time::Duration;

pub use receive::{Incoming, receive};
pub use send::{MigrationStats, migrate};
use vhpc_api::{HostLimits, VmConfig};

use crate::vm::VmError;

/// How the source migrates.
#[derive(Clone, Debug)]
pub struct MigrationOptions {
    /// Stop-and-copy once the pages left would take at most this long to send.
    pub downtime: Duration,
    /// Stop-and-copy after this many pre-copy rounds whatever is left (a guest dirtying
    /// memory faster than the stream carries it never converges otherwise).
    pub max_rounds: u32,
    /// Passed to the destination with the Hello (see [`wire::Hello::labels`]).
    pub labels: Vec<(String, String)>,
}

impl Default for MigrationOptions {
    fn default() -> Self {
        MigrationOptions {
            downtime: Duration::from_millis(300),
            max_rounds: 30,
            labels: Vec::new(),
        }
    }
}

/// How the destination receives.
#[derive(Default)]
pub struct ReceiveOptions {
    /// Take the VM even from a host with another CPU model, or with disks that look changed.
    pub force: bool,
    /// Refuse a VM that does not fit these limits (this host's).
    pub limits: Option<HostLimits>,
    /// Adapts the source's config to this side before the VM is built (e.g. the names of the
    /// TAP devices its interfaces get here); what the guest sees (memory, vCPUs, MACs, disks)
    /// must stay as it was.
    pub adapt_config: Option<ConfigAdapter>,
}

/// See [`ReceiveOptions::adapt_config`].
pub type ConfigAdapter = Box<dyn Fn(&mut VmConfig) + Send + Sync>;

/// Where a migration is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Round 0: all of memory.
    FirstRound,
    /// A pre-copy round of dirtied pages ended.
    Round,
    /// The VM is paused; the last pages and its state are on their way.
    StopAndCopy,
    /// The destination runs the VM.
    Done,
}

/// A progress report.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    pub phase: Phase,
    pub round: u32,
    /// Pages of the round that just ended (or of round 0 so far).
    pub round_pages: u64,
    pub pages_sent: u64,
    /// Round 0: the pages of guest memory not looked at yet; stop-and-copy: the dirty pages
    /// left.
    pub remaining_pages: u64,
    pub elapsed: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error(transparent)]
    Wire(#[from] wire::WireError),
    #[error("the destination refused the VM: {0}")]
    Refused(String),
    #[error("the other side gave up: {0}")]
    PeerAborted(String),
    #[error("migration protocol violation: {0}")]
    Protocol(String),
    #[error("{0}")]
    Local(String),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(
        "the destination was told to run the VM but did not confirm it ({0}); the source stays paused so that the guest never runs twice. Check the destination: if the VM does not run there, resume the source"
    )]
    HandoverUnknown(String),
}

impl MigrationError {
    /// Whether the error left it unknown which side runs the VM (the source stays paused).
    pub fn handover_unknown(&self) -> bool {
        matches!(self, MigrationError::HandoverUnknown(_))
    }
}
