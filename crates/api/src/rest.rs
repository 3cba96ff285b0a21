//! The REST/JSON API of one VM's VMM process, served on its Unix socket
//! (docs/api/openapi.yaml is the specification), and the state-directory files that describe
//! the VM. Bytes (a command's stdin and output) travel base64-encoded (standard alphabet,
//! padded), so binary output arrives exactly.

use serde::{Deserialize, Serialize};

use crate::VmConfig;

/// `NAME/config.json` in a VM's state directory: what `vhpc vm start` asked for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub name: String,
    pub config: VmConfig,
    /// The guest's vsock CID (the VM's agent channel is virtio-vsock).
    #[serde(default = "default_guest_cid")]
    pub guest_cid: u64,
}

fn default_guest_cid() -> u64 {
    crate::DEFAULT_GUEST_CID
}

/// Where a long-running VM is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmRunState {
    /// Booted, but its guest agent has not answered yet.
    Booting,
    Running,
    Paused,
    /// Power-off requested; the process exits when the guest is off.
    Stopping,
    /// Being migrated away (`vhpc migrate`); the process exits once the destination runs it.
    Migrating,
}

impl VmRunState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmRunState::Booting => "booting",
            VmRunState::Running => "running",
            VmRunState::Paused => "paused",
            VmRunState::Stopping => "stopping",
            VmRunState::Migrating => "migrating",
        }
    }
}

/// `GET /vm`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    pub name: String,
    pub state: VmRunState,
    /// The VMM process.
    pub pid: u32,
    /// The guest agent's version, once it has answered.
    pub agent_version: Option<String>,
    pub config: VmConfig,
}

/// `POST /exec` request body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// The program and its arguments; the program is looked up in the guest's PATH.
    pub argv: Vec<String>,
    /// Standard input for the command, base64; absent: /dev/null.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
}

/// One line of the `POST /exec` response (newline-delimited JSON): exactly one field is set.
/// Output lines come as the command writes; the last line has `exit_status` (or `error`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecEvent {
    /// A piece of the command's stdout, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout: Option<String>,
    /// A piece of the command's stderr, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr: Option<String>,
    /// The command's status: exit code, or 128 + signal number. The last line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_status: Option<i32>,
    /// A failure of the agent or of the VM (after the response started), or the agent's
    /// report that the command could not be started (then an exit_status line follows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `GET /health`: the guest's own view, read by the agent from /proc.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Health {
    pub agent_version: String,
    pub uptime_secs: f64,
    /// Load averages over 1, 5 and 15 minutes.
    pub load: [f64; 3],
    pub mem_total_kib: u64,
    pub mem_available_kib: u64,
}

/// `PUT /vm/snapshot` request body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// The checkpoint directory, an absolute path on the VMM's host (replaced atomically if
    /// it exists).
    pub dir: String,
    /// Only the pages written since this VM's previous checkpoint (taken by this VMM).
    #[serde(default)]
    pub incremental: bool,
    /// Leave the VM paused after the checkpoint and end its VMM (the guest never runs
    /// again, so its disks stay as the checkpoint recorded them).
    #[serde(default)]
    pub stop: bool,
}

/// `PUT /vm/snapshot` response: what was written.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapshotResponse {
    pub id: String,
    pub dir: String,
    /// The parent checkpoint's id (incremental checkpoints).
    pub parent: Option<String>,
    /// Pages in the memory file: non-zero pages (full) or dirty pages (incremental).
    pub memory_pages: u64,
    pub state_bytes: u64,
    /// How long the vCPUs were stopped, until the checkpoint was durable on disk.
    pub paused_ms: f64,
    /// Whether the VMM is ending (`stop`).
    pub stopped: bool,
}

/// The body of every error response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong and what to do about it.
    pub error: String,
}

/// `PUT /vm/migrate` request body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// The destination, `HOST:PORT`, where `vhpc vm receive` listens.
    pub to: String,
    /// The longest pause of the guest to aim for, in milliseconds (default 300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
}

/// One line of the `PUT /vm/migrate` response (newline-delimited JSON): exactly one field is
/// set; progress lines come as rounds end, the last line has `done` or `error`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrateEvent {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<MigrateProgress>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub done: Option<MigrateDone>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Where a migration is.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MigrateProgress {
    /// `first-round` (all of memory), `round` (dirtied pages), `stop-and-copy`.
    pub phase: String,
    pub round: u32,
    pub pages_sent: u64,
    /// First round: the pages of guest memory; stop-and-copy: the dirty pages left.
    pub remaining_pages: u64,
    pub elapsed_ms: u64,
}

/// What a finished migration did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MigrateDone {
    pub rounds: u32,
    pub pages_sent: u64,
    /// Pages sent while the guest was paused.
    pub final_pages: u64,
    pub total_ms: f64,
    /// From the source's vCPUs stopped to the destination's confirmation that it runs.
    pub downtime_ms: f64,
}

/// `PUT /vm/copy-in` body: the VMM process reads `host_path` and writes it to `guest_path`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CopyInRequest {
    /// An absolute path on the host (the VMM process reads it).
    pub host_path: String,
    /// An absolute path in the guest; replaced when the whole file has arrived.
    pub guest_path: String,
}

/// `PUT /vm/copy-out` body: the guest's `guest_path` is written to `host_path`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CopyOutRequest {
    /// An absolute path of a regular file in the guest.
    pub guest_path: String,
    /// An absolute path on the host (the VMM process writes it); replaced when complete.
    pub host_path: String,
}

/// What a copy in either direction did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyResult {
    pub bytes: u64,
    /// The permission bits the copy has (those of its source).
    pub mode: u32,
}

/// `PUT /vm/fs/freeze` body (optional: no body freezes every freezable file system).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FreezeRequest {
    /// Mount points in the guest; empty: every mounted file system on a block device.
    #[serde(default)]
    pub mount_points: Vec<String>,
    /// The agent thaws by itself after this many seconds (default 60, at most 3600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u32>,
}

/// `PUT /vm/fs/freeze` answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FreezeResult {
    pub frozen: Vec<String>,
}

/// `PUT /vm/fs/thaw` answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThawResult {
    pub thawed: Vec<String>,
}
