//! The guest agent's session across a checkpoint: the one place that knows how a VM restored
//! as a long-running VM (`vhpc restore DIR --name NEW`) gets its agent back.
//!
//! The agent in the guest never notices a checkpoint: it keeps waiting for requests on its
//! channel. Today that channel is COM2, whose 16550 state (registers, receive FIFO, pending
//! interrupt) is in the checkpoint, so the guest's tty driver continues where it was. Only the
//! host side is new: a fresh [`AgentClient`] that never saw the agent's Ready frame. So
//!
//! 1. a checkpoint is taken only while the agent is idle ([`AgentClient::hold_idle`]): no
//!    request or response is half sent, and the restored client's decoder starts at a frame
//!    boundary;
//! 2. the agent's version goes into the checkpoint as component `vhpc.agent` (version 1);
//! 3. after restore, the client pings the agent ([`AgentClient::ping_resumed`]); its answer
//!    establishes the session with the saved version, and the VM counts as running.
//!
//! When the agent moves to virtio-vsock, step 3 becomes "reconnect the vsock stream" (the
//! guest side sees its connection reset and reconnects); steps 1-2 stay as they are.

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

/// Re-establishes the session of a restored VM's agent: pings until it answers (the vCPUs
/// may take a moment to run again) or [`RESUME_TIMEOUT`] passes.
pub fn resume(agent: &AgentClient, agent_version: String) -> anyhow::Result<()> {
    let deadline = Instant::now() + RESUME_TIMEOUT;
    loop {
        match agent.ping_resumed(agent_version.clone(), Duration::from_secs(5)) {
            Ok(()) => {
                log::info!("guest agent {agent_version} answered after the restore");
                return Ok(());
            }
            Err(e) if Instant::now() >= deadline => {
                anyhow::bail!(
                    "the restored guest agent did not answer within {RESUME_TIMEOUT:?}: {e}"
                )
            }
            Err(e) => log::debug!("restored agent not answering yet: {e}"),
        }
    }
}
