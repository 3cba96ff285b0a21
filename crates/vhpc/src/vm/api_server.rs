//! The VM's REST/JSON API (docs/api/openapi.yaml) on its Unix socket: a blocking HTTP/1.1
//! server, one thread per connection, one request per connection. The routes act on a
//! [`Backend`], so the server is tested without a VM.

use std::io::{self, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use vhpc_api::rest::{
    CopyInRequest, CopyOutRequest, CopyResult, ErrorBody, ExecEvent, ExecRequest, FreezeRequest,
    FreezeResult, Health, MigrateEvent, MigrateRequest, SnapshotRequest, SnapshotResponse,
    ThawResult, VmInfo,
};

use super::http::{self, Request};

/// Every route the server answers: path and methods. The spec test checks this against
/// docs/api/openapi.yaml in both directions.
pub const ROUTES: &[(&str, &[&str])] = &[
    ("/vm", &["GET"]),
    ("/vm/pause", &["PUT"]),
    ("/vm/resume", &["PUT"]),
    ("/vm/shutdown", &["PUT"]),
    ("/vm/snapshot", &["PUT"]),
    ("/vm/migrate", &["PUT"]),
    ("/exec", &["POST"]),
    ("/health", &["GET"]),
    ("/vm/copy-in", &["PUT"]),
    ("/vm/copy-out", &["PUT"]),
    ("/vm/fs/freeze", &["PUT"]),
    ("/vm/fs/thaw", &["PUT"]),
];

/// Connections served at once; more get 503 (a misbehaving client cannot exhaust threads).
const MAX_CONNECTIONS: usize = 32;
/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A failure with the HTTP status that reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

/// What the routes act on: the VM (or a fake in tests).
pub trait Backend: Send + Sync {
    fn info(&self) -> VmInfo;
    fn pause(&self) -> Result<(), ApiError>;
    fn resume(&self) -> Result<(), ApiError>;
    /// Starts an orderly power-off; the process exits once the guest is off.
    fn shutdown(&self) -> Result<(), ApiError>;
    fn health(&self) -> Result<Health, ApiError>;
    /// Migrates the VM to another VMM process, handing progress and finally the outcome to
    /// `event`; on success the process ends once the response is out.
    fn migrate(
        &self,
        request: MigrateRequest,
        event: &mut dyn FnMut(MigrateEvent) -> io::Result<()>,
    ) -> Result<(), ApiError>;
    /// Checkpoints the VM (pause, save, resume; or stay paused with `stop`).
    fn snapshot(&self, request: SnapshotRequest) -> Result<SnapshotResponse, ApiError>;
    /// After a `stop` snapshot's response is sent: end the VMM (the guest never runs again).
    fn end_after_snapshot(&self);
    /// Runs a command, handing each output piece and finally the status to `event`.
    fn exec(
        &self,
        request: ExecRequest,
        event: &mut dyn FnMut(ExecEvent) -> io::Result<()>,
    ) -> Result<(), ApiError>;
    /// Copies a host file into the guest.
    fn copy_in(&self, request: CopyInRequest) -> Result<CopyResult, ApiError>;
    /// Copies a guest file to the host.
    fn copy_out(&self, request: CopyOutRequest) -> Result<CopyResult, ApiError>;
    /// Syncs and freezes guest file systems (they thaw by themselves after a timeout).
    fn freeze(&self, request: FreezeRequest) -> Result<FreezeResult, ApiError>;
    fn thaw(&self) -> Result<ThawResult, ApiError>;
}

/// Accepts connections until the listener fails.
pub fn serve(listener: UnixListener, backend: Arc<dyn Backend>) {
    let active = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) => {
                log::warn!("API: accept failed: {e}");
                continue;
            }
        };
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::SeqCst);
            let _ = send_error(
                &mut stream,
                &ApiError::new(503, "too many API connections; retry"),
            );
            continue;
        }
        let (backend, active) = (backend.clone(), active.clone());
        let spawned = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                if let Err(e) = handle_connection(stream, backend.as_ref()) {
                    log::debug!("API connection: {e}");
                }
                active.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            log::warn!("API: cannot start a connection thread: {e}");
        }
    }
}

fn handle_connection(stream: UnixStream, backend: &dyn Backend) -> io::Result<()> {
    stream.set_read_timeout(Some(READ_TIMEOUT))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    match http::read_request(&mut reader) {
        Ok(Some(request)) => respond(&request, backend, &mut writer),
        Ok(None) => Ok(()),
        Err(e) => match e.status() {
            Some(status) => send_error(&mut writer, &ApiError::new(status, e.to_string())),
            None => Err(io::Error::other(e.to_string())),
        },
    }
}

fn send_json(w: &mut impl Write, status: u16, body: &impl Serialize) -> io::Result<()> {
    let bytes = serde_json::to_vec(body).map_err(io::Error::other)?;
    http::write_response(w, status, &[], "application/json", &bytes)
}

fn send_error(w: &mut impl Write, e: &ApiError) -> io::Result<()> {
    send_json(
        w,
        e.status,
        &ErrorBody {
            error: e.message.clone(),
        },
    )
}

/// Answers one request.
pub fn respond(req: &Request, backend: &dyn Backend, w: &mut impl Write) -> io::Result<()> {
    let Some((_, methods)) = ROUTES.iter().find(|(path, _)| *path == req.path) else {
        let known: Vec<&str> = ROUTES.iter().map(|(p, _)| *p).collect();
        let msg = format!(
            "no such path {}; the API has {}",
            req.path,
            known.join(", ")
        );
        return send_error(w, &ApiError::new(404, msg));
    };
    if !methods.contains(&req.method.as_str()) {
        let allow = methods.join(", ");
        let body = serde_json::to_vec(&ErrorBody {
            error: format!("{} does not allow {}; use {allow}", req.path, req.method),
        })
        .map_err(io::Error::other)?;
        return http::write_response(w, 405, &[("Allow", &allow)], "application/json", &body);
    }
    let result = match req.path.as_str() {
        "/vm" => return send_json(w, 200, &backend.info()),
        "/health" => backend.health().map(|h| send_json(w, 200, &h)),
        "/vm/pause" => backend.pause().map(|()| no_content(w, 204)),
        "/vm/resume" => backend.resume().map(|()| no_content(w, 204)),
        "/vm/shutdown" => backend.shutdown().map(|()| no_content(w, 202)),
        "/exec" => return exec(req, backend, w),
        "/vm/snapshot" => return snapshot(req, backend, w),
        "/vm/migrate" => return migrate(req, backend, w),
        "/vm/copy-in" => body(req, "{\"host_path\": \"/abs\", \"guest_path\": \"/abs\"}")
            .and_then(|r| backend.copy_in(r))
            .map(|r| send_json(w, 200, &r)),
        "/vm/copy-out" => body(req, "{\"guest_path\": \"/abs\", \"host_path\": \"/abs\"}")
            .and_then(|r| backend.copy_out(r))
            .map(|r| send_json(w, 200, &r)),
        "/vm/fs/freeze" => freeze_body(req)
            .and_then(|r| backend.freeze(r))
            .map(|r| send_json(w, 200, &r)),
        "/vm/fs/thaw" => backend.thaw().map(|r| send_json(w, 200, &r)),
        _ => Err(ApiError::new(500, "route table and handlers disagree")),
    };
    match result {
        Ok(written) => written,
        Err(e) => send_error(w, &e),
    }
}

/// `PUT /vm/snapshot`: checks the body, checkpoints, answers; a `stop` checkpoint ends the
/// VMM once the answer is out.
fn snapshot(req: &Request, backend: &dyn Backend, w: &mut impl Write) -> io::Result<()> {
    let request: SnapshotRequest = match serde_json::from_slice(&req.body) {
        Ok(r) => r,
        Err(e) => {
            let msg = format!(
                "invalid snapshot request body: {e}; expected {{\"dir\": \"/absolute/path\", \"incremental\": false, \"stop\": false}}"
            );
            return send_error(w, &ApiError::new(400, msg));
        }
    };
    let stop = request.stop;
    match backend.snapshot(request) {
        Ok(info) => {
            let sent = send_json(w, 200, &info);
            if stop {
                let _ = w.flush();
                backend.end_after_snapshot();
            }
            sent
        }
        Err(e) => send_error(w, &e),
    }
}

/// A JSON request body; `shape` shows what was expected.
fn body<T: DeserializeOwned>(req: &Request, shape: &str) -> Result<T, ApiError> {
    serde_json::from_slice(&req.body).map_err(|e| {
        ApiError::new(
            400,
            format!("invalid {} request body: {e}; expected {shape}", req.path),
        )
    })
}

/// A freeze body is optional: none freezes everything with the default timeout.
fn freeze_body(req: &Request) -> Result<FreezeRequest, ApiError> {
    if req.body.iter().all(u8::is_ascii_whitespace) {
        return Ok(FreezeRequest::default());
    }
    body(
        req,
        "{\"mount_points\": [\"/mnt\"] (optional), \"timeout_secs\": 60 (optional)}",
    )
}

fn no_content(w: &mut impl Write, status: u16) -> io::Result<()> {
    http::write_response(w, status, &[], "application/json", b"")
}

/// `POST /exec`: checks the body, then streams newline-delimited JSON events.
fn exec(req: &Request, backend: &dyn Backend, w: &mut impl Write) -> io::Result<()> {
    let request: ExecRequest = match serde_json::from_slice(&req.body) {
        Ok(r) => r,
        Err(e) => {
            let msg = format!(
                "invalid exec request body: {e}; expected {{\"argv\": [\"program\", \"arg\", ...], \"stdin\": \"<base64>\" (optional)}}"
            );
            return send_error(w, &ApiError::new(400, msg));
        }
    };
    stream_events(
        w,
        "the exec produced no status",
        |event| backend.exec(request, event),
        |error| ExecEvent {
            error: Some(error),
            ..ExecEvent::default()
        },
    )
}

/// `PUT /vm/migrate`: checks the body, then streams newline-delimited JSON events.
fn migrate(req: &Request, backend: &dyn Backend, w: &mut impl Write) -> io::Result<()> {
    let request: MigrateRequest = match serde_json::from_slice(&req.body) {
        Ok(r) => r,
        Err(e) => {
            let msg = format!(
                "invalid migrate request body: {e}; expected {{\"to\": \"HOST:PORT\", \"downtime_ms\": N (optional)}}"
            );
            return send_error(w, &ApiError::new(400, msg));
        }
    };
    stream_events(
        w,
        "the migration reported no outcome",
        |event| backend.migrate(request, event),
        |error| MigrateEvent {
            error: Some(error),
            ..MigrateEvent::default()
        },
    )
}

/// Runs `action`, streaming the events it hands over as newline-delimited JSON (the response
/// head goes out with the first one). An error before the first event is a plain error
/// response; an error after it is one last event made by `error_event`.
fn stream_events<E: Serialize>(
    w: &mut impl Write,
    silent: &str,
    action: impl FnOnce(&mut dyn FnMut(E) -> io::Result<()>) -> Result<(), ApiError>,
    error_event: impl FnOnce(String) -> E,
) -> io::Result<()> {
    let mut started = false;
    let write_event = |w: &mut dyn Write, event: &E| -> io::Result<()> {
        let mut line = serde_json::to_vec(event).map_err(io::Error::other)?;
        line.push(b'\n');
        w.write_all(&line)?;
        w.flush()
    };
    let result = action(&mut |event| {
        if !started {
            http::write_stream_head(w, 200, "application/x-ndjson")?;
            started = true;
        }
        write_event(w, &event)
    });
    match result {
        Ok(()) if started => Ok(()),
        Ok(()) => send_error(w, &ApiError::new(500, silent)),
        Err(e) if !started => send_error(w, &e),
        Err(e) => write_event(w, &error_event(e.message)),
    }
}

#[cfg(test)]
#[path = "api_server_tests.rs"]
mod tests;
