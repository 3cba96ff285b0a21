//! File copies and file-system freeze through the guest agent, for the API routes
//! `PUT /vm/copy-in`, `/vm/copy-out`, `/vm/fs/freeze` and `/vm/fs/thaw`. The VMM process
//! reads and writes the host side of a copy itself, in chunks, so a file of any size
//! streams through without being held in memory; a copy-out lands in a temporary file next
//! to its destination and is renamed over it only when complete.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use vhpc_api::rest::{
    CopyInRequest, CopyOutRequest, CopyResult, FreezeRequest, FreezeResult, ThawResult,
};
use vhpc_guest::protocol::session::{MAX_CHUNK, Request, Response};

use super::agent_client::{AgentClient, AgentError};
use super::api_server::ApiError;

/// How long one response of a copy may take (a copy-in's only answer comes after the
/// guest synced the file).
const COPY_WAIT: Duration = Duration::from_secs(120);
/// How long a freeze or thaw may take (the guest syncs first).
const FREEZE_WAIT: Duration = Duration::from_secs(120);

fn host_path(path: &str) -> Result<PathBuf, ApiError> {
    let p = PathBuf::from(path);
    if !p.is_absolute() {
        return Err(ApiError::new(
            400,
            format!("host_path {path:?} must be absolute"),
        ));
    }
    Ok(p)
}

/// A guest path is checked here too, so a bad one is a 400 before anything is sent.
fn guest_path(path: &str) -> Result<(), ApiError> {
    vhpc_guest::protocol::session::check_path(path)
        .map_err(|e| ApiError::new(400, format!("guest_path: {e}")))
}

/// The guest agent reported a failure (missing file, not freezable, ...).
fn guest_error(text: String) -> ApiError {
    ApiError::new(422, format!("in the guest: {text}"))
}

pub fn copy_in(
    agent: &AgentClient,
    req: &CopyInRequest,
    to_api: impl Fn(AgentError) -> ApiError,
) -> Result<CopyResult, ApiError> {
    let source = host_path(&req.host_path)?;
    guest_path(&req.guest_path)?;
    let open_err = |e: std::io::Error| {
        ApiError::new(
            400,
            format!("cannot read {} on the host: {e}", source.display()),
        )
    };
    let mut file = File::open(&source).map_err(open_err)?;
    let meta = file.metadata().map_err(open_err)?;
    if !meta.is_file() {
        return Err(ApiError::new(
            400,
            format!("{} on the host is not a regular file", source.display()),
        ));
    }
    let mode = meta.permissions().mode() & 0o7777;
    let size = meta.len();
    let mut frames = CopyInFrames {
        start: Some(Request::CopyInStart {
            path: req.guest_path.clone(),
            mode,
            size,
        }),
        file: &mut file,
        sent: 0,
        size,
        buf: vec![0; MAX_CHUNK],
        ended: false,
    };
    let mut answer = None;
    agent
        .request_frames(&mut frames, Some(COPY_WAIT), &mut |r| {
            answer = Some(r);
            false
        })
        .map_err(to_api)?;
    match answer {
        Some(Response::Done(bytes)) => Ok(CopyResult { bytes, mode }),
        Some(Response::Error(text)) => Err(guest_error(text)),
        other => Err(ApiError::new(
            502,
            format!("the guest agent answered a copy with {other:?}"),
        )),
    }
}

/// The frames of a copy-in, read from the host file as they are sent.
struct CopyInFrames<'a> {
    start: Option<Request>,
    file: &'a mut File,
    sent: u64,
    size: u64,
    buf: Vec<u8>,
    ended: bool,
}

impl Iterator for CopyInFrames<'_> {
    type Item = Result<Request, AgentError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(start) = self.start.take() {
            return Some(Ok(start));
        }
        if self.ended {
            return None;
        }
        if self.sent < self.size {
            let want = (self.size - self.sent).min(self.buf.len() as u64) as usize;
            return Some(match self.file.read(&mut self.buf[..want]) {
                Ok(0) => Err(AgentError::Local(format!(
                    "the host file shrank to {} bytes while being copied",
                    self.sent
                ))),
                Ok(n) => {
                    self.sent += n as u64;
                    Ok(Request::CopyInData(self.buf[..n].to_vec()))
                }
                Err(e) => Err(AgentError::Local(format!("cannot read the host file: {e}"))),
            });
        }
        self.ended = true;
        Some(Ok(Request::CopyInEnd))
    }
}

pub fn copy_out(
    agent: &AgentClient,
    req: &CopyOutRequest,
    to_api: impl Fn(AgentError) -> ApiError,
) -> Result<CopyResult, ApiError> {
    let target = host_path(&req.host_path)?;
    guest_path(&req.guest_path)?;
    let mut out = HostFile::new(&target);
    let request = Request::CopyOut {
        path: req.guest_path.clone(),
    };
    // What ended the copy: its result, or the first failure.
    let mut outcome: Option<Result<CopyResult, ApiError>> = None;
    let mut mode = 0;
    agent
        .request(&request, Some(COPY_WAIT), &mut |r| {
            let step = match r {
                Response::FileInfo { mode: m, .. } => {
                    mode = m;
                    out.create()
                }
                Response::FileData(data) => out.write(&data),
                Response::Done(bytes) => {
                    let done = out.finish(mode, bytes).map(|()| CopyResult { bytes, mode });
                    outcome.get_or_insert(done);
                    return false;
                }
                Response::Error(text) => Err(guest_error(text)),
                other => Err(ApiError::new(
                    502,
                    format!("the guest agent answered a copy with {other:?}"),
                )),
            };
            match step {
                Ok(()) => true,
                // Keep reading to the copy's last frame (the guest sends them anyway),
                // remembering the first failure; a guest error is the last frame.
                Err(e) => {
                    let last = e.status == 422 || e.status == 502;
                    outcome.get_or_insert(Err(e));
                    !last
                }
            }
        })
        .map_err(to_api)?;
    outcome.unwrap_or_else(|| Err(ApiError::new(502, "the guest agent ended the copy early")))
}

/// The host side of a copy-out: a temporary file renamed into place when complete,
/// removed otherwise.
struct HostFile {
    target: PathBuf,
    tmp: PathBuf,
    file: Option<File>,
    error: Option<ApiError>,
    written: u64,
}

impl HostFile {
    fn new(target: &Path) -> HostFile {
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        HostFile {
            target: target.to_path_buf(),
            tmp: target.with_file_name(format!(".{name}.vhpc-copy")),
            file: None,
            error: None,
            written: 0,
        }
    }

    fn fail(&mut self, what: &str, e: std::io::Error) -> ApiError {
        let err = ApiError::new(400, format!("cannot {what} {}: {e}", self.target.display()));
        self.error = Some(err.clone());
        self.file = None;
        err
    }

    fn create(&mut self) -> Result<(), ApiError> {
        match OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&self.tmp)
        {
            Ok(f) => {
                self.file = Some(f);
                Ok(())
            }
            Err(e) => Err(self.fail("create", e)),
        }
    }

    fn write(&mut self, data: &[u8]) -> Result<(), ApiError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        let Some(file) = self.file.as_mut() else {
            return Err(ApiError::new(
                502,
                "file data before the file's description",
            ));
        };
        match file.write_all(data) {
            Ok(()) => {
                self.written += data.len() as u64;
                Ok(())
            }
            Err(e) => Err(self.fail("write", e)),
        }
    }

    fn finish(&mut self, mode: u32, bytes: u64) -> Result<(), ApiError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        let Some(file) = self.file.take() else {
            return Err(ApiError::new(502, "the copy ended before it started"));
        };
        if bytes != self.written {
            return Err(ApiError::new(
                502,
                format!(
                    "the guest agent reported {bytes} bytes but sent {}",
                    self.written
                ),
            ));
        }
        let done = file
            .sync_all()
            .and_then(|()| file.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777)))
            .and_then(|()| std::fs::rename(&self.tmp, &self.target));
        done.map_err(|e| self.fail("complete", e))
    }
}

impl Drop for HostFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.tmp);
    }
}

pub fn freeze(
    agent: &AgentClient,
    req: &FreezeRequest,
    to_api: impl Fn(AgentError) -> ApiError,
) -> Result<FreezeResult, ApiError> {
    for m in &req.mount_points {
        vhpc_guest::protocol::session::check_path(m)
            .map_err(|e| ApiError::new(400, format!("mount point: {e}")))?;
    }
    let request = Request::Freeze {
        mount_points: req.mount_points.clone(),
        timeout_secs: req.timeout_secs.unwrap_or(0),
    };
    match single_answer(agent, &request, to_api)? {
        Response::Frozen(frozen) => Ok(FreezeResult { frozen }),
        Response::Error(text) => Err(guest_error(text)),
        other => Err(ApiError::new(
            502,
            format!("the guest agent answered a freeze with {other:?}"),
        )),
    }
}

pub fn thaw(
    agent: &AgentClient,
    to_api: impl Fn(AgentError) -> ApiError,
) -> Result<ThawResult, ApiError> {
    match single_answer(agent, &Request::Thaw, to_api)? {
        Response::Thawed(thawed) => Ok(ThawResult { thawed }),
        other => Err(ApiError::new(
            502,
            format!("the guest agent answered a thaw with {other:?}"),
        )),
    }
}

fn single_answer(
    agent: &AgentClient,
    request: &Request,
    to_api: impl Fn(AgentError) -> ApiError,
) -> Result<Response, ApiError> {
    let mut answer = None;
    agent
        .request(request, Some(FREEZE_WAIT), &mut |r| {
            answer = Some(r);
            false
        })
        .map_err(to_api)?;
    answer.ok_or_else(|| ApiError::new(502, "the guest agent did not answer"))
}
