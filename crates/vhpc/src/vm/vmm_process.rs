//! The VMM process of one long-running VM (`vhpc vm serve`, started detached by
//! `vhpc vm start`): boots the VM with the agent in serve mode, serves the API on
//! `NAME/api.sock`, and when the guest is off removes the state directory and exits.

use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use vhpc_api::VsockConfig;
use vhpc_api::rest::{
    CopyInRequest, CopyOutRequest, CopyResult, ExecEvent, ExecRequest, FreezeRequest, FreezeResult,
    Health, MigrateEvent, MigrateRequest, SnapshotRequest, SnapshotResponse, ThawResult, VmInfo,
    VmRunState, VmSpec,
};
use vhpc_guest::protocol::session::{Request, Response};
use vhpc_vmm::snapshot::{self, CheckpointKind, RestoreOptions, SnapshotError};
use vhpc_vmm::{Vm, VmIo, VmOutcome};

use super::ServeArgs;
use super::agent_client::{self, AgentClient, AgentError};
use super::agent_files;
use super::agent_resume;
use super::api_server::{self, ApiError, Backend};
use super::migrate_vm::{self, AGENT_VERSION_LABEL, GUEST_CID_LABEL};
use super::state_dir::VmDir;

/// How long a power-off may take before the VMM stops the VM itself.
pub const POWER_OFF_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a health request may wait for the agent.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest stdin an exec request may carry (decoded).
pub const MAX_STDIN: usize = 512 << 10;

/// How long a checkpoint waits for a running `vhpc exec` to end before it gives up.
const SNAPSHOT_IDLE_WAIT: Duration = Duration::from_secs(10);

/// Runs the VM in `args.dir` until it ends: boots it, or restores `args.restore`. The lock
/// fd is the pid file's lock, inherited from `vhpc vm start` (or `vhpc restore --name`):
/// held for this process's whole life, it is what marks the VM alive.
pub fn run(args: ServeArgs) -> anyhow::Result<i32> {
    let (dir, lock_fd) = (args.dir.clone(), args.lock_fd);
    // SAFETY: `vhpc vm start` passes the number of the lock fd it left open (not close-on-exec)
    // for this process; nothing else in this process owns or closes that fd.
    let lock = unsafe { File::from_raw_fd(lock_fd) };
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dir = VmDir { name, path: dir };
    let console = File::create(dir.console_log())
        .with_context(|| format!("cannot create {}", dir.console_log().display()))?;
    let (agent, sink) = agent_client::channel_pair();
    let agent = Arc::new(agent);
    // The spec of a booted or restored VM is in its directory; a migrating VM's arrives with
    // it. Its vsock CID only matters for a boot: a restored or arriving vsock device takes the
    // CID its guest had from the saved device state.
    let spec: Option<VmSpec> = match &args.incoming {
        Some(_) => None,
        None => {
            let config = dir.config_json();
            Some(
                serde_json::from_slice(
                    &std::fs::read(&config)
                        .with_context(|| format!("cannot read {}", config.display()))?,
                )
                .with_context(|| format!("{} is not a valid VM spec", config.display()))?,
            )
        }
    };
    let vsock = VsockConfig {
        guest_cid: spec
            .as_ref()
            .map_or(vhpc_api::DEFAULT_GUEST_CID, |s| s.guest_cid),
        socket: dir.vsock_sock(),
    };
    let io = VmIo {
        console: Box::new(console),
        // The agent speaks over vsock; nothing is expected on COM2.
        agent: Box::new(io::sink()),
        extra_initramfs: Vec::new(),
        timeout: None,
        vsock: Some(vsock),
    };
    let (spec, vm, resumed_agent) = match (spec, &args.incoming) {
        (None, Some(listen)) => {
            let incoming = receive(&dir, listen, io, &args)?;
            let version = incoming
                .labels
                .iter()
                .find(|(k, _)| k == AGENT_VERSION_LABEL)
                .map(|(_, v)| v.clone());
            let guest_cid = incoming
                .labels
                .iter()
                .find(|(k, _)| k == GUEST_CID_LABEL)
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(vhpc_api::DEFAULT_GUEST_CID);
            let spec = VmSpec {
                name: dir.name.clone(),
                config: incoming.vm.config().clone(),
                guest_cid,
            };
            std::fs::write(dir.config_json(), serde_json::to_vec_pretty(&spec)?)
                .with_context(|| format!("cannot write {}", dir.config_json().display()))?;
            // Already running: the source's guest goes on here.
            (spec, incoming.vm, version)
        }
        (spec, _) => {
            let spec = spec.context("no VM spec")?;
            let (mut vm, resumed_agent) = match &args.restore {
                None => (Vm::boot(&spec.config, io)?, None),
                Some(checkpoint) => restore(checkpoint, io, &args)?,
            };
            vm.start()?;
            (spec, vm, resumed_agent)
        }
    };
    // The agent's session is a vsock connection, made afresh by this process in every case:
    // a restored or migrated guest's old connection was reset by its vsock device.
    agent
        .connect_in_background(sink, dir.vsock_sock())
        .context("cannot start the agent connection thread")?;
    if let Some(version) = resumed_agent {
        let agent = agent.clone();
        std::thread::spawn(move || {
            if let Err(e) = agent_resume::resume(&agent, version) {
                log::error!("{e:#}; `vhpc exec` will not work in this VM");
            }
        });
    }
    let backend = Arc::new(VmBackend {
        spec,
        vm: Arc::new(vm),
        agent,
        control: Mutex::new(()),
        stopping: AtomicBool::new(false),
        migrating: AtomicBool::new(false),
        dir: dir.clone(),
    });
    let sock = dir.api_sock();
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock)
        .with_context(|| format!("cannot listen on {}", sock.display()))?;
    let api: Arc<dyn Backend> = backend.clone();
    std::thread::Builder::new()
        .name("api-accept".into())
        .spawn(move || api_server::serve(listener, api))
        .context("cannot start the API thread")?;
    log::info!("VM {} booted; API on {}", dir.name, sock.display());
    let outcome = backend.vm.wait(None);
    log::info!("VM {} ended: {outcome:?}", dir.name);
    // A power-off that was asked for (or that the guest chose while healthy) ends the VM
    // cleanly; anything else (a panic, a crash, a guest that never got its agent up) keeps
    // the directory and its logs: `vhpc vm list` shows it as dead until `vhpc vm stop` or the
    // next `vhpc vm start` of that name removes it.
    let clean = backend.stopping.load(Ordering::SeqCst)
        || (outcome == VmOutcome::PowerOff && backend.agent.agent_version().is_some());
    if clean {
        if let Err(e) = dir.remove() {
            log::warn!("{e}");
        }
    } else {
        log::warn!(
            "VM {} ended unexpectedly ({outcome:?}); its console log {} is kept",
            dir.name,
            dir.console_log().display()
        );
    }
    drop(lock);
    Ok(0)
}

/// The VM of a live migration arriving on `listen`, running. A failed migration leaves
/// nothing: the partial VM is dropped and the state directory removed.
fn receive(
    dir: &VmDir,
    listen: &str,
    io: VmIo,
    args: &ServeArgs,
) -> anyhow::Result<vhpc_vmm::migration::Incoming> {
    let name = dir.name.clone();
    let opts = vhpc_vmm::migration::ReceiveOptions {
        force: args.force,
        limits: Some(vhpc_vmm::vm::current_host_limits()?),
        // A bridge interface's TAP is named after the VM (the source's still exists while
        // the VM moves); its MAC, which the guest sees, stays.
        adapt_config: Some(Box::new(move |config| {
            config.nets = crate::net_names::retap_for_vm(&name, &config.nets);
        })),
    };
    let timeout = Duration::from_secs(args.incoming_timeout);
    migrate_vm::receive_in(dir, listen, io, &opts, timeout).inspect_err(|e| {
        log::error!("{e:#}");
        let _ = dir.remove();
    })
}

/// The VM of a checkpoint, and the agent version to resume its session with.
fn restore(
    checkpoint: &std::path::Path,
    io: VmIo,
    args: &ServeArgs,
) -> anyhow::Result<(Vm, Option<String>)> {
    let saved = snapshot::Checkpoint::load(checkpoint)?;
    let version = agent_resume::saved_version(&saved)?;
    if version.is_none() {
        log::warn!(
            "{} was not taken of a long-running VM (no agent session in it); `vhpc exec` will not answer",
            checkpoint.display()
        );
    }
    let opts = RestoreOptions {
        force: args.force,
        prefault: args.prefault,
    };
    let vm = snapshot::restore(checkpoint, io, opts)
        .with_context(|| format!("cannot restore {}", checkpoint.display()))?;
    log::info!("restored {}", checkpoint.display());
    Ok((vm, version))
}

/// The API's view of the running VM.
struct VmBackend {
    spec: VmSpec,
    vm: Arc<Vm>,
    agent: Arc<AgentClient>,
    /// Serialises pause, resume, shutdown and the start of a migration.
    control: Mutex<()>,
    stopping: AtomicBool,
    migrating: AtomicBool,
    dir: VmDir,
}

fn agent_error(e: AgentError) -> ApiError {
    let status = match e {
        AgentError::NotReady | AgentError::Busy => 503,
        AgentError::Invalid(_) | AgentError::Local(_) => 400,
        AgentError::Broken(_) | AgentError::Timeout(_) | AgentError::Send(_) => 502,
    };
    ApiError::new(status, e.to_string())
}

impl VmBackend {
    fn state(&self) -> VmRunState {
        if self.stopping.load(Ordering::SeqCst) {
            VmRunState::Stopping
        } else if self.migrating.load(Ordering::SeqCst) {
            VmRunState::Migrating
        } else if self.vm.is_paused() {
            VmRunState::Paused
        } else if self.agent.agent_version().is_none() {
            VmRunState::Booting
        } else {
            VmRunState::Running
        }
    }

    /// Requests that need the guest to run and its agent to answer.
    fn require_running(&self) -> Result<(), ApiError> {
        match self.state() {
            VmRunState::Running => Ok(()),
            VmRunState::Booting => Err(agent_error(AgentError::NotReady)),
            VmRunState::Paused => Err(ApiError::new(
                409,
                format!(
                    "VM {} is paused; resume it first (`vhpc vm resume {0}`)",
                    self.spec.name
                ),
            )),
            VmRunState::Stopping => Err(ApiError::new(
                409,
                format!("VM {} is stopping", self.spec.name),
            )),
            VmRunState::Migrating => Err(ApiError::new(
                409,
                format!("VM {} is being migrated away", self.spec.name),
            )),
        }
    }

    fn lock_control(&self) -> std::sync::MutexGuard<'_, ()> {
        self.control.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The HTTP status for a failed checkpoint.
fn snapshot_error(e: SnapshotError) -> ApiError {
    let status = match e {
        SnapshotError::NoParent => 409,
        SnapshotError::ReplacesParent(_) => 400,
        _ => 500,
    };
    ApiError::new(status, e.to_string())
}

impl Backend for VmBackend {
    fn snapshot(&self, request: SnapshotRequest) -> Result<SnapshotResponse, ApiError> {
        let dir = PathBuf::from(&request.dir);
        if !dir.is_absolute() {
            return Err(ApiError::new(
                400,
                format!(
                    "dir {} must be an absolute path (the VMM runs elsewhere)",
                    request.dir
                ),
            ));
        }
        let _control = self.lock_control();
        let state = self.state();
        if matches!(state, VmRunState::Booting | VmRunState::Stopping) {
            return Err(ApiError::new(
                409,
                format!("cannot checkpoint: the VM is {}", state.as_str()),
            ));
        }
        let _idle = self.agent.hold_idle(SNAPSHOT_IDLE_WAIT).map_err(|_| {
            ApiError::new(
                409,
                format!(
                    "the guest agent is running a command (vhpc exec) and did not finish within {SNAPSHOT_IDLE_WAIT:?}; checkpoint when it has finished (run long jobs in the background)"
                ),
            )
        })?;
        let version = self.agent.agent_version().unwrap_or_default();
        let extra =
            [agent_resume::component(&version).map_err(|e| ApiError::new(500, e.to_string()))?];
        let kind = if request.incremental {
            CheckpointKind::Incremental
        } else {
            CheckpointKind::Full
        };
        if request.stop && !self.vm.is_paused() {
            self.vm
                .pause()
                .map_err(|e| ApiError::new(500, e.to_string()))?;
        }
        let result = snapshot::checkpoint_with(&self.vm, &dir, kind, &extra);
        let info = match result {
            Ok(info) => info,
            Err(e) => {
                if request.stop {
                    // The VM goes on: a failed checkpoint must not lose it.
                    let _ = self.vm.resume();
                }
                return Err(snapshot_error(e));
            }
        };
        if request.stop {
            self.stopping.store(true, Ordering::SeqCst);
        }
        log::info!(
            "checkpoint {} written to {} ({} pages, paused {:?})",
            info.id,
            info.dir.display(),
            info.memory_pages,
            info.paused_for
        );
        Ok(SnapshotResponse {
            id: info.id,
            dir: info.dir.display().to_string(),
            parent: info.parent,
            memory_pages: info.memory_pages,
            state_bytes: info.state_bytes,
            paused_ms: info.paused_for.as_secs_f64() * 1000.0,
            stopped: request.stop,
        })
    }

    fn end_after_snapshot(&self) {
        log::info!("VM {}: stopped after its checkpoint", self.spec.name);
        self.vm.stop();
    }

    fn info(&self) -> VmInfo {
        VmInfo {
            name: self.spec.name.clone(),
            state: self.state(),
            pid: std::process::id(),
            agent_version: self.agent.agent_version(),
            config: self.spec.config.clone(),
        }
    }

    fn pause(&self) -> Result<(), ApiError> {
        let _control = self.lock_control();
        match self.state() {
            VmRunState::Running | VmRunState::Booting => {}
            other => {
                return Err(ApiError::new(
                    409,
                    format!("cannot pause: the VM is {}", other.as_str()),
                ));
            }
        }
        self.vm
            .pause()
            .map_err(|e| ApiError::new(500, e.to_string()))
    }

    fn resume(&self) -> Result<(), ApiError> {
        let _control = self.lock_control();
        if self.state() != VmRunState::Paused {
            return Err(ApiError::new(
                409,
                format!("cannot resume: the VM is {}", self.state().as_str()),
            ));
        }
        self.vm
            .resume()
            .map_err(|e| ApiError::new(500, e.to_string()))
    }

    fn shutdown(&self) -> Result<(), ApiError> {
        let _control = self.lock_control();
        if self.migrating.load(Ordering::SeqCst) {
            return Err(ApiError::new(409, "the VM is being migrated away"));
        }
        if self.stopping.swap(true, Ordering::SeqCst) {
            return Err(ApiError::new(409, "the VM is already stopping"));
        }
        if self.vm.is_paused() {
            self.vm
                .resume()
                .map_err(|e| ApiError::new(500, e.to_string()))?;
        }
        let (agent, dir) = (self.agent.clone(), self.dir.clone());
        std::thread::spawn(move || power_off(agent, dir));
        Ok(())
    }

    fn health(&self) -> Result<Health, ApiError> {
        self.require_running()?;
        let mut health = None;
        self.agent
            .request(&Request::Ping, Some(HEALTH_TIMEOUT), &mut |r| {
                health = Some(r);
                false
            })
            .map_err(agent_error)?;
        match health {
            Some(Response::Health(h)) => Ok(Health {
                agent_version: self.agent.agent_version().unwrap_or_default(),
                uptime_secs: h.uptime_ms as f64 / 1000.0,
                load: h.load_milli.map(|l| f64::from(l) / 1000.0),
                mem_total_kib: h.mem_total_kib,
                mem_available_kib: h.mem_available_kib,
            }),
            other => Err(ApiError::new(
                502,
                format!("the guest agent answered a ping with {other:?}"),
            )),
        }
    }

    fn copy_in(&self, request: CopyInRequest) -> Result<CopyResult, ApiError> {
        self.require_running()?;
        agent_files::copy_in(&self.agent, &request, agent_error)
    }

    fn copy_out(&self, request: CopyOutRequest) -> Result<CopyResult, ApiError> {
        self.require_running()?;
        agent_files::copy_out(&self.agent, &request, agent_error)
    }

    fn freeze(&self, request: FreezeRequest) -> Result<FreezeResult, ApiError> {
        self.require_running()?;
        agent_files::freeze(&self.agent, &request, agent_error)
    }

    fn thaw(&self) -> Result<ThawResult, ApiError> {
        self.require_running()?;
        agent_files::thaw(&self.agent, agent_error)
    }

    fn exec(
        &self,
        request: ExecRequest,
        event: &mut dyn FnMut(ExecEvent) -> io::Result<()>,
    ) -> Result<(), ApiError> {
        let stdin = match &request.stdin {
            Some(b64) => BASE64
                .decode(b64)
                .map_err(|e| ApiError::new(400, format!("stdin is not valid base64: {e}")))?,
            None => Vec::new(),
        };
        if stdin.len() > MAX_STDIN {
            return Err(ApiError::new(
                400,
                format!("stdin has {} bytes, at most {MAX_STDIN}", stdin.len()),
            ));
        }
        vhpc_guest::protocol::validate_argv(&request.argv)
            .map_err(|e| ApiError::new(400, format!("invalid argv: {e}")))?;
        self.require_running()?;
        let exec = Request::Exec {
            argv: request.argv,
            stdin,
        };
        self.agent
            .request(&exec, None, &mut |response| {
                let (last, e) = exec_event(response);
                // A client that went away stops the wait; the command still runs to its end
                // in the guest, and its late responses are dropped by request id.
                event(e).is_ok() && !last
            })
            .map_err(agent_error)
    }

    fn migrate(
        &self,
        request: MigrateRequest,
        event: &mut dyn FnMut(MigrateEvent) -> io::Result<()>,
    ) -> Result<(), ApiError> {
        {
            let _control = self.lock_control();
            match self.state() {
                VmRunState::Running | VmRunState::Paused => {}
                other => {
                    return Err(ApiError::new(
                        409,
                        format!("cannot migrate: the VM is {}", other.as_str()),
                    ));
                }
            }
            self.migrating.store(true, Ordering::SeqCst);
        }
        // As for a checkpoint: the agent session moves between two requests, never inside one.
        let idle = self.agent.hold_idle(SNAPSHOT_IDLE_WAIT);
        let Ok(_idle) = idle else {
            self.migrating.store(false, Ordering::SeqCst);
            return Err(ApiError::new(
                409,
                format!(
                    "the guest agent is running a command (vhpc exec) and did not finish within {SNAPSHOT_IDLE_WAIT:?}; migrate when it has finished (run long jobs in the background)"
                ),
            ));
        };
        let mut labels = vec![(GUEST_CID_LABEL.to_string(), self.spec.guest_cid.to_string())];
        if let Some(v) = self.agent.agent_version() {
            labels.push((AGENT_VERSION_LABEL.to_string(), v));
        }
        let result = migrate_vm::migrate_out(&self.vm, &request, labels, event);
        if result.is_ok() {
            // The destination runs the VM; the outcome went out with the last event. The main
            // thread sees a clean end, removes the state directory and exits.
            log::info!("VM {} now runs at the destination", self.spec.name);
            self.stopping.store(true, Ordering::SeqCst);
            self.vm.stop();
        } else {
            self.migrating.store(false, Ordering::SeqCst);
        }
        result
    }
}

/// Turns an agent response to an exec into an API event; `true` for the last one.
fn exec_event(response: Response) -> (bool, ExecEvent) {
    let mut e = ExecEvent::default();
    let last = match response {
        Response::Stdout(d) => {
            e.stdout = Some(BASE64.encode(d));
            false
        }
        Response::Stderr(d) => {
            e.stderr = Some(BASE64.encode(d));
            false
        }
        Response::Exit(status) => {
            e.exit_status = Some(status);
            true
        }
        // The agent reports a command it could not start; its Exit follows.
        Response::Error(text) => {
            e.error = Some(format!("guest agent: {text}"));
            false
        }
        other => {
            e.error = Some(format!("the guest agent answered an exec with {other:?}"));
            true
        }
    };
    (last, e)
}

/// Asks the agent to power the guest off; if the guest is not off within
/// [`POWER_OFF_TIMEOUT`] (the main thread exits the process when it is), stops it here.
fn power_off(agent: Arc<AgentClient>, dir: VmDir) {
    let started = std::time::Instant::now();
    let result = agent.request(&Request::PowerOff, Some(POWER_OFF_TIMEOUT), &mut |r| {
        log::info!("power-off: the agent answered {r:?}");
        false
    });
    // The agent powers off once we close the session (or after a second).
    agent.disconnect();
    if let Err(e) = result {
        log::warn!("power-off request failed: {e}; stopping the VM after the timeout");
    }
    std::thread::sleep(POWER_OFF_TIMEOUT.saturating_sub(started.elapsed()));
    log::warn!(
        "VM {}: the guest did not power off within {POWER_OFF_TIMEOUT:?}; stopping it",
        dir.name
    );
    if let Err(e) = dir.remove() {
        log::warn!("{e}");
    }
    std::process::exit(0);
}
