//! Live migration in a VM's VMM process: the source side behind `PUT /vm/migrate` (connect to
//! the destination, run [`vhpc_vmm::migration::migrate`], stream progress, exit once the
//! destination runs the VM) and the destination side of `vhpc vm serve --incoming ADDR`
//! (listen, accept one connection, receive the VM).

use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use vhpc_api::rest::{MigrateDone, MigrateEvent, MigrateProgress, MigrateRequest};
use vhpc_vmm::VmIo;
use vhpc_vmm::migration::{
    self, Incoming, MigrationError, MigrationOptions, Phase, Progress, ReceiveOptions,
};

use super::api_server::ApiError;
use super::state_dir::VmDir;

/// How long connecting to the destination may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long either side waits for the other's next frame (the destination rebuilding the VM
/// is the longest step).
const STREAM_TIMEOUT: Duration = Duration::from_secs(120);
/// The label that carries the guest agent's version to the destination.
pub const AGENT_VERSION_LABEL: &str = "agent_version";
/// The label that carries the guest's vsock CID (for the destination's spec; the device itself
/// takes the CID from its saved state).
pub const GUEST_CID_LABEL: &str = "guest_cid";

fn progress_event(p: &Progress) -> MigrateEvent {
    let phase = match p.phase {
        Phase::FirstRound => "first-round",
        Phase::Round => "round",
        Phase::StopAndCopy => "stop-and-copy",
        Phase::Done => "done",
    };
    MigrateEvent {
        progress: Some(MigrateProgress {
            phase: phase.into(),
            round: p.round,
            pages_sent: p.pages_sent,
            remaining_pages: p.remaining_pages,
            elapsed_ms: p.elapsed.as_millis() as u64,
        }),
        ..MigrateEvent::default()
    }
}

/// Connects to `to` and migrates `vm` there. Progress goes to `event` (a client that went
/// away does not stop the migration).
pub fn migrate_out(
    vm: &vhpc_vmm::Vm,
    request: &MigrateRequest,
    labels: Vec<(String, String)>,
    event: &mut dyn FnMut(MigrateEvent) -> std::io::Result<()>,
) -> Result<(), ApiError> {
    let addr = request
        .to
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| {
            ApiError::new(
                400,
                format!("destination {:?} is not a HOST:PORT address", request.to),
            )
        })?;
    let mut stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(|e| {
        ApiError::new(
            502,
            format!(
                "cannot reach the destination {}: {e}; is `vhpc vm receive NAME --listen {0}` waiting there?",
                request.to
            ),
        )
    })?;
    let configure = stream
        .set_nodelay(true)
        .and_then(|()| stream.set_read_timeout(Some(STREAM_TIMEOUT)))
        .and_then(|()| stream.set_write_timeout(Some(STREAM_TIMEOUT)));
    configure.map_err(|e| ApiError::new(500, format!("cannot set up the connection: {e}")))?;
    let opts = MigrationOptions {
        downtime: Duration::from_millis(request.downtime_ms.unwrap_or(300)),
        labels,
        ..MigrationOptions::default()
    };
    let mut client_gone = false;
    let mut report = |p: &Progress| {
        if !client_gone && event(progress_event(p)).is_err() {
            client_gone = true;
            log::warn!("migration: the client went away; migrating on");
        }
    };
    let stats = migration::migrate(vm, &mut stream, &opts, &mut report).map_err(|e| {
        let status = match e {
            MigrationError::Refused(_) => 409,
            MigrationError::HandoverUnknown(_) => 504,
            _ => 502,
        };
        log::error!("migration to {} failed: {e}", request.to);
        ApiError::new(status, e.to_string())
    })?;
    log::info!("migrated to {}: {stats:?}", request.to);
    let _ = event(MigrateEvent {
        done: Some(MigrateDone {
            rounds: stats.rounds,
            pages_sent: stats.pages_sent,
            final_pages: stats.final_pages,
            total_ms: stats.total.as_secs_f64() * 1e3,
            downtime_ms: stats.downtime.as_secs_f64() * 1e3,
        }),
        ..MigrateEvent::default()
    });
    Ok(())
}

/// The file in the state directory that says where an incoming VM's VMM listens.
pub fn incoming_file(dir: &VmDir) -> std::path::PathBuf {
    dir.path.join("incoming")
}

/// Listens on `addr`, says where in the state directory, accepts one connection within
/// `timeout` and receives the VM over it.
pub fn receive_in(
    dir: &VmDir,
    addr: &str,
    io: VmIo,
    opts: &ReceiveOptions,
    timeout: Duration,
) -> anyhow::Result<Incoming> {
    let listener = TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))?;
    let local = listener.local_addr()?;
    // Written aside and renamed: whoever sees the file sees the whole address.
    let aside = dir.path.join("incoming.tmp");
    std::fs::write(&aside, format!("{local}\n"))
        .and_then(|()| std::fs::rename(&aside, incoming_file(dir)))
        .with_context(|| format!("cannot write {}", incoming_file(dir).display()))?;
    log::info!("VM {}: waiting for a migration on {local}", dir.name);
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    let (mut stream, peer) = loop {
        match listener.accept() {
            Ok(conn) => break conn,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    bail!(
                        "no migration arrived on {local} within {}s",
                        timeout.as_secs()
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e).context("accepting the migration connection"),
        }
    };
    drop(listener);
    log::info!("VM {}: migration from {peer}", dir.name);
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(STREAM_TIMEOUT))?;
    stream.set_write_timeout(Some(STREAM_TIMEOUT))?;
    let mut log_progress = |p: &Progress| {
        log::info!(
            "migration: {:?} round {} pages {} after {:?}",
            p.phase,
            p.round,
            p.pages_sent,
            p.elapsed
        );
    };
    let incoming = migration::receive(&mut stream, io, opts, &mut log_progress)
        .with_context(|| format!("receiving the VM from {peer}"))?;
    let _ = std::fs::remove_file(incoming_file(dir));
    Ok(incoming)
}
