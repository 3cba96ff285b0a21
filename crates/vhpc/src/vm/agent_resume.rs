//! The guest agent's session across a checkpoint: the one place that knows how a VM restored
//! as a long-running VM (`vhpc restore DIR --name NEW`) gets its agent back.
//!
//! The agent's channel is a virtio-vsock stream (guest port 1024), and a stream cannot
//! survive a checkpoint: its host end is a Unix socket of the process that took it. So
//!
//! 1. a checkpoint is taken only while the agent is idle ([`AgentClient::hold_idle`]): no
//!    request or response is half sent when the connection goes away;
//! 2. the agent's version goes into the checkpoint as component `vhpc.agent` (version 1), and
//!    into a live migration as a label;
//! 3. after restore (or on a migration's destination) the vsock device queues a transport
//!    reset for the guest driver, which resets the agent's old connection; the agent goes back
//!    to accepting on its port, and the new process's [`AgentClient`] connects afresh
//!    (`CONNECT 1024`) and gets a new Ready frame. [`resume`] waits for that Ready, and the VM
//!    counts as running from then on.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vhpc_vmm::snapshot::{Checkpoint, Component};

use super::agent_client::AgentClient;

/// The checkpoint component holding the agent session.
pub const COMPONENT: &str = "vhpc.agent";
const VERSION: u32 = 1;
/// How long a restored VM's agent may take to answer its first ping.
pub const RESUME_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Serialize, Deserialize)]
struct AgentSessionV1 {
    agent_version: String,
}

/// The component to store with a checkpoint of a VM whose agent announced `agent_version`.
pub fn component(agent_version: &str) -> anyhow::Result<Component> {
    let data = postcard::to_allocvec(&AgentSessionV1 {
        agent_version: agent_version.to_owned(),
    })?;
    Ok(Component {
        name: COMPONENT.into(),
        version: VERSION,
        data,
    })
}

/// The agent version a checkpoint recorded, if it was taken of a long-running VM.
pub fn saved_version(checkpoint: &Checkpoint) -> anyhow::Result<Option<String>> {
    if !checkpoint
        .body
        .components
        .iter()
        .any(|c| c.name == COMPONENT)
    {
        return Ok(None);
    }
    let data = checkpoint.body.component(COMPONENT, VERSION)?;
    let session: AgentSessionV1 = postcard::from_bytes(data)
        .map_err(|e| anyhow::anyhow!("component {COMPONENT} is damaged: {e}"))?;
    Ok(Some(session.agent_version))
}

/// Waits until a restored or migrated VM's agent accepted the new vsock connection and
/// announced itself (the vCPUs may take a moment to run again and the guest to process the
/// transport reset), or [`RESUME_TIMEOUT`] passes. `agent_version` is the version saved with
/// the checkpoint: the same guest answers with it again; anything else is logged.
pub fn resume(agent: &AgentClient, agent_version: String) -> anyhow::Result<()> {
    let deadline = Instant::now() + RESUME_TIMEOUT;
    loop {
        if let Some(version) = agent.agent_version() {
            if version == agent_version {
                log::info!("guest agent {version} reconnected after the restore");
            } else {
                log::warn!(
                    "guest agent {version} reconnected after the restore, but the checkpoint \
                     recorded version {agent_version}"
                );
            }
            return Ok(());
        }
        if Instant::now() >= deadline {
            anyhow::bail!(
                "the restored guest agent did not accept a new vsock connection within \
                 {RESUME_TIMEOUT:?}"
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
