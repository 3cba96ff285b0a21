//! The `vhpc vm ...` and `vhpc exec` commands: clients of a VM's API socket (and, for
//! `start`, the launcher of its VMM process).

use std::fs::File;
use std::io::{self, BufRead, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use vhpc_api::rest::{
    ErrorBody, ExecEvent, ExecRequest, MigrateEvent, MigrateRequest, VmInfo, VmRunState, VmSpec,
};
use vhpc_api::{MemoryConfig, VmConfig};
use vhpc_guest::protocol::SERVE_FLAG;

use super::http;
use super::migrate_vm::incoming_file;
use super::state_dir::{Runtime, VmDir};
use super::vmm_process::MAX_STDIN;
use super::{ApiArgs, ExecArgs, MigrateArgs, ReceiveArgs, StartArgs};

/// Timeout for API calls that do not run guest commands.
const API_TIMEOUT: Duration = Duration::from_secs(30);

fn vm_config(args: &StartArgs) -> anyhow::Result<VmConfig> {
    let shape = &args.shape;
    let kernel = crate::run_cmd::kernel_or_default(shape.kernel.as_deref())?;
    let initramfs = crate::run_cmd::initramfs_or_default(shape.initrd.as_deref())?;
    // Absolute paths: the VMM process may resolve them from another directory.
    let absolute = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
    let absolute_disk = |d: &vhpc_api::DiskConfig| vhpc_api::DiskConfig {
        path: absolute(d.path.clone()),
        read_only: d.read_only,
    };
    let mut config = VmConfig {
        vcpus: shape.vcpus,
        memory: MemoryConfig {
            size_mib: shape.memory,
            hugepages: shape.hugepages,
            prefault: false,
        },
        kernel: absolute(kernel),
        initramfs: Some(absolute(initramfs)),
        cmdline: start_cmdline(args.append.as_deref())?,
        disks: shape.disks.iter().map(absolute_disk).collect(),
        nets: crate::net_names::for_vm(&args.name, &shape.nets),
    };
    if let Some(rootfs) = &shape.rootfs {
        crate::rootfs_arg::attach(&mut config, &absolute_disk(rootfs))?;
    }
    // Here, not only in the VMM process: bad input fails before a state directory exists.
    config.validate(&vhpc_vmm::vm::current_host_limits()?)?;
    Ok(config)
}

/// The guest kernel's command line of a long-running VM: vhpc's defaults, the agent's serve
/// flag, then the user's `--append` arguments (later arguments win, as `loglevel=7` over
/// the default `quiet`).
fn start_cmdline(append: Option<&str>) -> anyhow::Result<String> {
    let mut cmdline = format!("{} {SERVE_FLAG}", crate::run_cmd::default_cmdline(false));
    if let Some(extra) = append {
        if extra.chars().any(|c| c.is_control()) {
            bail!("--append: kernel arguments cannot contain control characters (newlines, tabs)");
        }
        if extra.split_whitespace().any(|w| w == "--") {
            bail!(
                "--append: '--' would hand the rest of the command line to the guest's init, not the kernel"
            );
        }
        cmdline.push(' ');
        cmdline.push_str(extra.trim());
    }
    Ok(cmdline)
}

/// `vhpc vm start`: state directory, detached VMM process, wait for the agent.
pub fn start(args: StartArgs) -> anyhow::Result<i32> {
    let config = vm_config(&args)?;
    if !(vhpc_api::DEFAULT_GUEST_CID..u64::from(u32::MAX)).contains(&args.cid) {
        return Err(vhpc_api::VsockConfigError::Cid(args.cid).into());
    }
    let runtime = Runtime::from_env();
    let (dir, lock) = runtime.create(&args.name)?;
    let spec = VmSpec {
        name: args.name.clone(),
        config,
        guest_cid: args.cid,
    };
    std::fs::write(dir.config_json(), serde_json::to_vec_pretty(&spec)?)
        .with_context(|| format!("cannot write {}", dir.config_json().display()))?;
    let mut child = spawn_vmm(&dir, &lock, &[])?;
    let mut pid_file = &lock;
    pid_file.set_len(0)?;
    writeln!(pid_file, "{}", child.id())?;
    drop(lock); // the VMM holds its own copy of the locked file
    wait_until_ready(&dir, &mut child, Duration::from_secs(args.timeout))?;
    Ok(0)
}

fn spawn_vmm(dir: &VmDir, lock: &File, extra: &[std::ffi::OsString]) -> anyhow::Result<Child> {
    let exe = std::env::current_exe().context("cannot find the vhpc binary to start the VMM")?;
    let log = File::create(dir.vmm_log())
        .with_context(|| format!("cannot create {}", dir.vmm_log().display()))?;
    let fd = lock.as_raw_fd();
    let mut cmd = Command::new(exe);
    cmd.args(["vm", "serve", "--lock-fd", &fd.to_string(), "--dir"])
        .arg(&dir.path)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    if std::env::var_os("VHPC_LOG").is_none() {
        cmd.env("VHPC_LOG", "info");
    }
    // SAFETY: the closure runs in the child between fork and exec and calls only
    // async-signal-safe functions (setsid, fcntl) on an fd that is open in the child.
    unsafe {
        cmd.pre_exec(move || {
            // Its own session: the VM outlives this command and its terminal.
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            // Keep the lock fd open across exec.
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().context("cannot start the VMM process")
}

/// `vhpc vm receive`: state directory, detached VMM process listening for the migration;
/// returns once it listens.
pub fn receive(args: ReceiveArgs) -> anyhow::Result<i32> {
    let runtime = Runtime::from_env();
    let (dir, lock) = runtime.create(&args.name)?;
    let mut extra: Vec<std::ffi::OsString> = vec![
        "--incoming".into(),
        args.listen.clone().into(),
        "--incoming-timeout".into(),
        args.timeout.to_string().into(),
    ];
    if args.force {
        extra.push("--force".into());
    }
    let mut child = spawn_vmm(&dir, &lock, &extra)?;
    let mut pid_file = &lock;
    pid_file.set_len(0)?;
    writeln!(pid_file, "{}", child.id())?;
    drop(lock);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(addr) = std::fs::read_to_string(incoming_file(&dir)) {
            eprintln!(
                "vhpc: VM {} waits for a migration on {} (for {}s)",
                args.name,
                addr.trim(),
                args.timeout
            );
            return Ok(0);
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "the VMM process for VM {} exited ({status}) before it listened.\nVMM log {}:\n{}",
                args.name,
                dir.vmm_log().display(),
                tail(&dir.vmm_log(), 20)
            );
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "the VMM process for VM {} did not start listening within 30s",
                args.name
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `vhpc migrate NAME --to ADDR`: shows progress; the VM runs at ADDR when it returns 0.
pub fn migrate(args: MigrateArgs) -> anyhow::Result<i32> {
    let dir = Runtime::from_env().existing(&args.name)?;
    let body = serde_json::to_vec(&MigrateRequest {
        to: args.to.clone(),
        downtime_ms: Some(args.downtime_ms),
    })?;
    let resp = http::call(&dir.api_sock(), "PUT", "/vm/migrate", Some(&body), None)?;
    if resp.status != 200 {
        let status = resp.status;
        let e = api_error(&args.name, status, &resp.into_bytes()?);
        bail!("migration failed: {e}");
    }
    let mut body = resp.body;
    let mut line = String::new();
    loop {
        line.clear();
        if body.read_line(&mut line)? == 0 {
            bail!(
                "VM {}: the migration stream ended without an outcome; check `vhpc vm list` here and at {}",
                args.name,
                args.to
            );
        }
        let event: MigrateEvent = serde_json::from_str(&line)
            .with_context(|| format!("malformed migration event {line:?}"))?;
        if let Some(p) = event.progress {
            let mib = p.pages_sent as f64 * 4096.0 / (1024.0 * 1024.0);
            let secs = p.elapsed_ms as f64 / 1e3;
            let what = match p.phase.as_str() {
                "first-round" => format!(
                    "round 0 (all of memory): {mib:.1} MiB sent, {} pages still to look at",
                    p.remaining_pages
                ),
                "round" => format!("round {} done: {mib:.1} MiB sent in all", p.round),
                "stop-and-copy" => format!(
                    "guest paused: copying the last {} dirty pages and the VM state",
                    p.remaining_pages
                ),
                _ => continue,
            };
            eprintln!("vhpc: migrating {}: {what} ({secs:.1} s)", args.name);
        }
        if let Some(d) = event.done {
            eprintln!(
                "vhpc: VM {} migrated to {} in {:.0} ms ({} rounds, {} pages, downtime {:.1} ms)",
                args.name, args.to, d.total_ms, d.rounds, d.pages_sent, d.downtime_ms
            );
            return Ok(0);
        }
        if let Some(error) = event.error {
            bail!("VM {}: migration failed: {error}", args.name);
        }
    }
}

/// `vhpc restore DIR --name NAME`: a long-running VM from a checkpoint, in its own VMM
/// process and state directory, as `vhpc vm start` makes one; returns once the restored guest
/// agent answers.
pub fn restore_named(
    checkpoint: &Path,
    name: &str,
    force: bool,
    prefault: bool,
    timeout: Duration,
) -> anyhow::Result<i32> {
    let checkpoint = std::path::absolute(checkpoint)
        .with_context(|| format!("cannot resolve {}", checkpoint.display()))?;
    // Refuse a checkpoint that cannot be restored here before making a state directory.
    let chain = vhpc_vmm::snapshot::preflight(&checkpoint, force)
        .with_context(|| format!("cannot restore {}", checkpoint.display()))?;
    let saved = chain.last().context("an empty checkpoint chain")?;
    let runtime = Runtime::from_env();
    let (dir, lock) = runtime.create(name)?;
    let spec = VmSpec {
        name: name.to_owned(),
        config: saved.body.config.clone(),
        // Not in the checkpoint's config: the restored vsock device keeps the CID its guest
        // had (from its saved state), whatever this says.
        guest_cid: vhpc_api::DEFAULT_GUEST_CID,
    };
    std::fs::write(dir.config_json(), serde_json::to_vec_pretty(&spec)?)
        .with_context(|| format!("cannot write {}", dir.config_json().display()))?;
    let mut extra: Vec<std::ffi::OsString> = vec!["--restore".into(), checkpoint.clone().into()];
    if force {
        extra.push("--force".into());
    }
    if prefault {
        extra.push("--prefault".into());
    }
    let mut child = spawn_vmm(&dir, &lock, &extra)?;
    let mut pid_file = &lock;
    pid_file.set_len(0)?;
    writeln!(pid_file, "{}", child.id())?;
    drop(lock);
    wait_until_ready(&dir, &mut child, timeout)?;
    eprintln!(
        "vhpc: VM {name} restored from {} and running (its memory is mapped from the checkpoint: keep it, and the chain it ends, while the VM runs)",
        checkpoint.display()
    );
    Ok(0)
}

/// `vhpc snapshot NAME DIR [--incremental] [--stop]`: a checkpoint of a long-running VM
/// through its API, with the elapsed time shown while it is written.
pub fn snapshot(name: &str, dir: &Path, incremental: bool, stop: bool) -> anyhow::Result<i32> {
    let vm = Runtime::from_env().existing(name)?;
    let dir =
        std::path::absolute(dir).with_context(|| format!("cannot resolve {}", dir.display()))?;
    let body = serde_json::to_vec(&vhpc_api::rest::SnapshotRequest {
        dir: dir.display().to_string(),
        incremental,
        stop,
    })?;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let progress = {
        let (done, name, dir) = (done.clone(), name.to_owned(), dir.clone());
        std::thread::spawn(move || {
            let start = Instant::now();
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(100));
                let secs = start.elapsed().as_secs();
                if secs >= 2 && start.elapsed().subsec_millis() < 100 {
                    eprintln!(
                        "vhpc: checkpointing VM {name} to {} ... {secs} s",
                        dir.display()
                    );
                }
            }
        })
    };
    let result = http::call(&vm.api_sock(), "PUT", "/vm/snapshot", Some(&body), None);
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = progress.join();
    let resp = result?;
    let status = resp.status;
    let bytes = resp.into_bytes()?;
    if status != 200 {
        return Err(api_error(name, status, &bytes));
    }
    let info: vhpc_api::rest::SnapshotResponse = serde_json::from_slice(&bytes)?;
    println!(
        "checkpoint {} of VM {name} in {}: {} {} memory pages, state {} bytes, vCPUs paused {:.1} ms{}",
        info.id,
        info.dir,
        info.memory_pages,
        if info.parent.is_some() {
            "dirty"
        } else {
            "non-zero"
        },
        info.state_bytes,
        info.paused_ms,
        if info.stopped {
            "; the VM is stopped"
        } else {
            ""
        }
    );
    if stop {
        // The VMM ends after its answer; wait for it, so the name is free when we return.
        let deadline = Instant::now() + Duration::from_secs(30);
        while vm.running_pid().is_some() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(0)
}

fn wait_until_ready(dir: &VmDir, child: &mut Child, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "the VMM process of VM {} exited ({status}) before its guest agent answered.\n\
                 VMM log {}:\n{}the end of the console log {}:\n{}",
                dir.name,
                dir.vmm_log().display(),
                tail(&dir.vmm_log(), 20),
                dir.console_log().display(),
                tail(&dir.console_log(), 20)
            );
        }
        if let Ok(info) = get_info(dir, Duration::from_secs(2))
            && info.state != VmRunState::Booting
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "VM {}: the guest agent did not answer within {}s, so the VM was stopped. Its \
                 console log {} shows how far the guest got (kept until `vhpc vm stop {0}` or \
                 the next `vhpc vm start {0}`); its end:\n{}the VMM log {}:\n{}",
                dir.name,
                timeout.as_secs(),
                dir.console_log().display(),
                tail(&dir.console_log(), 30),
                dir.vmm_log().display(),
                tail(&dir.vmm_log(), 10)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..]
        .iter()
        .map(|l| format!("  | {l}\n"))
        .collect()
}

fn get_info(dir: &VmDir, timeout: Duration) -> anyhow::Result<VmInfo> {
    let resp = http::call(&dir.api_sock(), "GET", "/vm", None, Some(timeout))?;
    let status = resp.status;
    let body = resp.into_bytes()?;
    if status != 200 {
        bail!("GET /vm answered {status}");
    }
    Ok(serde_json::from_slice(&body)?)
}

/// Turns a non-2xx API response into an error with the server's message.
pub(super) fn api_error(name: &str, status: u16, body: &[u8]) -> anyhow::Error {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(e) => anyhow::anyhow!("VM {name}: {}", e.error),
        Err(_) => anyhow::anyhow!("VM {name}: the API answered {status}"),
    }
}

/// `vhpc vm list`.
pub fn list() -> anyhow::Result<i32> {
    let runtime = Runtime::from_env();
    let mut out = io::stdout().lock();
    writeln!(
        out,
        "{:<20} {:<9} {:>5} {:>10} {:>8}",
        "NAME", "STATE", "VCPUS", "MEMORY", "PID"
    )?;
    for dir in runtime.list()? {
        let Some(pid) = dir.running_pid() else {
            writeln!(
                out,
                "{:<20} {:<9} {:>5} {:>10} {:>8}",
                dir.name, "dead", "-", "-", "-"
            )?;
            continue;
        };
        match get_info(&dir, Duration::from_secs(5)) {
            Ok(info) => writeln!(
                out,
                "{:<20} {:<9} {:>5} {:>10} {:>8}",
                info.name,
                info.state.as_str(),
                info.config.vcpus,
                format!("{}MiB", info.config.memory.size_mib),
                info.pid
            )?,
            Err(_) => {
                let state = if incoming_file(&dir).exists() {
                    "incoming"
                } else {
                    "starting"
                };
                writeln!(
                    out,
                    "{:<20} {:<9} {:>5} {:>10} {:>8}",
                    dir.name, state, "-", "-", pid
                )?
            }
        }
    }
    Ok(0)
}

/// `vhpc vm pause|resume`: a PUT without a body.
pub fn put(name: &str, path: &str) -> anyhow::Result<i32> {
    let dir = Runtime::from_env().existing(name)?;
    let resp = http::call(&dir.api_sock(), "PUT", path, None, Some(API_TIMEOUT))?;
    let status = resp.status;
    let body = resp.into_bytes()?;
    if !(200..300).contains(&status) {
        return Err(api_error(name, status, &body));
    }
    Ok(0)
}

/// `vhpc vm stop`: ask for power-off, wait, kill, remove the state directory.
pub fn stop(name: &str, timeout: u64) -> anyhow::Result<i32> {
    let dir = Runtime::from_env().existing(name)?;
    let Some(pid) = dir.running_pid() else {
        // The VMM ended without being asked (a clean power-off removes the directory itself):
        // its logs are about to go, so show how it ended first.
        eprintln!(
            "vhpc: VM {name} was not running: its VMM had ended unexpectedly. The end of its \
             VMM log:\n{}the end of its console:\n{}vhpc: removed its state directory",
            tail(&dir.vmm_log(), 20),
            tail(&dir.console_log(), 20)
        );
        dir.remove()?;
        return Ok(0);
    };
    if let Err(e) = put(name, "/vm/shutdown") {
        log::warn!("power-off request failed ({e:#}); killing VM {name}");
    }
    let gone = |within: Duration| {
        let deadline = Instant::now() + within;
        while dir.running_pid().is_some() {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        true
    };
    if !gone(Duration::from_secs(timeout)) && pid > 0 {
        eprintln!(
            "vhpc: VM {name} did not power off within {timeout}s; killing its VMM (pid {pid})"
        );
        // SAFETY: kill with a pid read from the VM's locked pid file (the lock is still held,
        // so the pid is the live VMM's) and a valid signal number.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        if !gone(Duration::from_secs(5)) {
            bail!("VM {name}: the VMM (pid {pid}) is still alive after SIGKILL");
        }
    }
    // The lock goes when the VMM closes its files, which it does one by one: wait until it
    // has closed them all, so its TAP devices are gone too (a `vm start` of the same name
    // right after needs their names).
    if pid > 0 && !process_exited(pid, Duration::from_secs(5)) {
        log::warn!("VM {name}: the VMM (pid {pid}) released its lock but has not exited yet");
    }
    dir.remove()?;
    Ok(0)
}

/// How long `vhpc exec` waits for a VM whose agent is not answering yet (just started,
/// arriving by migration, restored).
const AGENT_WAIT: Duration = Duration::from_secs(60);

/// Waits while the VM is alive but its agent not ready yet (no API socket yet, state
/// `booting`), at most `timeout`; the request that follows reports whatever is still wrong.
fn wait_for_agent(dir: &VmDir, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline && dir.running_pid().is_some() {
        match get_info(dir, Duration::from_secs(2)) {
            Ok(info) if info.state != VmRunState::Booting => return,
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Waits until process `pid` has closed its files: it is gone, or a zombie whose other
/// threads have all exited too. (A multi-threaded process's leader turns zombie while its
/// other threads are still exiting, and the last of them closes the shared fds, TAPs
/// included.)
fn process_exited(pid: u32, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        // /proc/PID/stat: "PID (COMM) STATE ..."; COMM may hold spaces and parentheses.
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .and_then(|(_, rest)| rest.trim_start().chars().next())
            });
        let threads = std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, Iterator::count);
        match state {
            None => return true,
            Some('Z' | 'X') if threads <= 1 => return true,
            _ => {}
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `vhpc exec NAME -- CMD...`: streams CMD's output, returns its status.
pub fn exec(args: ExecArgs) -> anyhow::Result<i32> {
    let dir = Runtime::from_env().existing(&args.name)?;
    wait_for_agent(&dir, AGENT_WAIT);
    let stdin = if args.stdin {
        let mut bytes = Vec::new();
        io::stdin()
            .take(MAX_STDIN as u64 + 1)
            .read_to_end(&mut bytes)?;
        if bytes.len() > MAX_STDIN {
            bail!("--stdin: more than {MAX_STDIN} bytes on standard input");
        }
        Some(BASE64.encode(bytes))
    } else {
        None
    };
    let body = serde_json::to_vec(&ExecRequest {
        argv: args.command,
        stdin,
    })?;
    let resp = http::call(&dir.api_sock(), "POST", "/exec", Some(&body), None)?;
    if resp.status != 200 {
        let status = resp.status;
        return Err(api_error(&args.name, status, &resp.into_bytes()?));
    }
    relay_events(resp.body)
}

/// Writes the events' output to our stdout/stderr; the exit status ends the stream.
fn relay_events(mut body: impl BufRead) -> anyhow::Result<i32> {
    let mut line = String::new();
    loop {
        line.clear();
        if body.read_line(&mut line)? == 0 {
            bail!("the VM's API ended the exec stream without an exit status");
        }
        let event: ExecEvent = serde_json::from_str(&line)
            .with_context(|| format!("malformed exec event {line:?}"))?;
        if let Some(data) = event.stdout {
            let mut out = io::stdout().lock();
            out.write_all(&BASE64.decode(data)?)?;
            out.flush()?;
        }
        if let Some(data) = event.stderr {
            io::stderr().write_all(&BASE64.decode(data)?)?;
        }
        if let Some(error) = event.error {
            eprintln!("vhpc: {error}");
        }
        if let Some(status) = event.exit_status {
            return Ok(status);
        }
    }
}

/// `vhpc vm api`: one request, the body printed.
pub fn api(args: ApiArgs) -> anyhow::Result<i32> {
    let dir = Runtime::from_env().existing(&args.name)?;
    if args.raw {
        let mut request = Vec::new();
        io::stdin().read_to_end(&mut request)?;
        let mut stream = std::os::unix::net::UnixStream::connect(dir.api_sock())
            .with_context(|| format!("cannot connect to {}", dir.api_sock().display()))?;
        stream.set_read_timeout(Some(API_TIMEOUT))?;
        stream.write_all(&request)?;
        stream.shutdown(std::net::Shutdown::Write)?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response)?;
        io::stdout().write_all(&response)?;
        return Ok(0);
    }
    let (Some(method), Some(path)) = (args.method, args.path) else {
        bail!("give METHOD and PATH, or --raw");
    };
    let body = args.body.as_deref().map(str::as_bytes);
    let resp = http::call(&dir.api_sock(), &method, &path, body, None)?;
    let status = resp.status;
    let mut out = io::stdout().lock();
    out.write_all(&resp.into_bytes()?)?;
    out.flush()?;
    Ok(if (200..300).contains(&status) { 0 } else { 1 })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn events_are_relayed_until_the_status() {
        let lines = "{\"stdout\":\"aGkK\"}\n{\"error\":\"guest agent: x\"}\n{\"exit_status\":3}\n";
        assert_eq!(relay_events(io::Cursor::new(lines)).unwrap(), 3);
        let err = relay_events(io::Cursor::new("{\"stdout\":\"aGkK\"}\n")).unwrap_err();
        assert!(err.to_string().contains("without an exit status"));
        assert!(relay_events(io::Cursor::new("not json\n")).is_err());
    }

    #[test]
    fn appended_kernel_arguments_come_last() {
        let plain = start_cmdline(None).unwrap();
        assert!(plain.contains(SERVE_FLAG) && plain.contains(" quiet"));
        let more = start_cmdline(Some("  isolcpus=1 loglevel=7 ")).unwrap();
        assert_eq!(more, format!("{plain} isolcpus=1 loglevel=7"));
        assert!(start_cmdline(Some("x\ty")).is_err());
        assert!(start_cmdline(Some("a -- b")).is_err());
    }
}
