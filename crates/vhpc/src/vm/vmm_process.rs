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
    Health, ThawResult, VmInfo, VmRunState, VmSpec,
};
use vhpc_guest::protocol::session::{Request, Response};
use vhpc_vmm::{Vm, VmIo, VmOutcome};

use super::agent_client::{self, AgentClient, AgentError};
use super::agent_files;
use super::api_server::{self, ApiError, Backend};
use super::state_dir::VmDir;

/// How long a power-off may take before the VMM stops the VM itself.
pub const POWER_OFF_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a health request may wait for the agent.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest stdin an exec request may carry (decoded).
pub const MAX_STDIN: usize = 512 << 10;

/// Runs the VM in `dir` until it ends. `lock_fd` is the pid file's lock, inherited from
/// `vhpc vm start`: held for this process's whole life, it is what marks the VM alive.
pub fn run(dir: PathBuf, lock_fd: i32) -> anyhow::Result<i32> {
    // SAFETY: `vhpc vm start` passes the number of the lock fd it left open (not close-on-exec)
    // for this process; nothing else in this process owns or closes that fd.
    let lock = unsafe { File::from_raw_fd(lock_fd) };
    let config = dir.join("config.json");
    let spec: VmSpec = serde_json::from_slice(
        &std::fs::read(&config).with_context(|| format!("cannot read {}", config.display()))?,
    )
    .with_context(|| format!("{} is not a valid VM spec", config.display()))?;
    let dir = VmDir {
        name: spec.name.clone(),
        path: dir,
    };
    let console = File::create(dir.console_log())
        .with_context(|| format!("cannot create {}", dir.console_log().display()))?;
    let (agent, sink) = agent_client::channel_pair();
    let agent = Arc::new(agent);
    let vsock = VsockConfig {
        guest_cid: spec.guest_cid,
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
    let mut vm = Vm::boot(&spec.config, io)?;
    vm.start()?;
    agent
        .connect_in_background(sink, dir.vsock_sock())
        .context("cannot start the agent connection thread")?;
    let backend = Arc::new(VmBackend {
        spec,
        vm: Arc::new(vm),
        agent,
        control: Mutex::new(()),
        stopping: AtomicBool::new(false),
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

/// The API's view of the running VM.
struct VmBackend {
    spec: VmSpec,
    vm: Arc<Vm>,
    agent: Arc<AgentClient>,
    /// Serialises pause, resume and shutdown.
    control: Mutex<()>,
    stopping: AtomicBool,
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
        }
    }

    fn lock_control(&self) -> std::sync::MutexGuard<'_, ()> {
        self.control.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Backend for VmBackend {
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
