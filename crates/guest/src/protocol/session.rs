//! The session protocol of a long-running guest agent: requests from the host, responses from
//! the guest, over any reliable byte stream (the agent serial port today, virtio-vsock later).
//!
//! Both directions use the same frame:
//!
//! ```text
//! +------+---------+------+-------+------------+-------------+-----------------+
//! | 0xA6 | version | kind | flags | id u32 LE  | len u32 LE  | payload (len B) |
//! +------+---------+------+-------+------------+-------------+-----------------+
//!    0       1        2      3       4..8          8..12        12..
//! ```
//!
//! `version` is [`VERSION`]; a peer speaking another version is refused with a clear error
//! (rebuild the initramfs with the same vhpc). `flags` is reserved and must be 0. `id` is
//! chosen by the host per request; every response carries its request's id, so a response
//! that arrives after the host gave up on its request is recognised and dropped (id 0 is the
//! guest's unsolicited [`Response::Ready`]). Payloads are bounded per direction
//! ([`MAX_REQUEST_PAYLOAD`], [`MAX_RESPONSE_PAYLOAD`]); the decoder checks the bound before
//! buffering, so a peer cannot make the other side allocate more.
//!
//! Payloads by kind (integers little-endian):
//!
//! | kind | direction | payload |
//! |---|---|---|
//! | 0x01 Ping | host → guest | empty; answered by Health |
//! | 0x02 Exec | host → guest | argv length u32, argv (NUL-terminated strings), stdin bytes |
//! | 0x03 PowerOff | host → guest | empty; answered by PowerOffAck, then the guest powers off |
//! | 0x04 CopyInStart | host → guest | mode u32 (permission bits), size u64, absolute guest path (UTF-8) |
//! | 0x05 CopyInData | host → guest | file bytes (≤ 64 KiB per frame), same id as the start |
//! | 0x06 CopyInEnd | host → guest | empty; answered by Done (file complete, mode set) or Error |
//! | 0x07 CopyOut | host → guest | absolute guest path; answered by FileInfo, FileData..., Done, or Error |
//! | 0x08 Freeze | host → guest | auto-thaw timeout s u32, mount points (each NUL-terminated; none = every freezable one); answered by Frozen or Error |
//! | 0x09 Thaw | host → guest | empty; answered by Thawed |
//! | 0x41 Ready | guest → host | agent version (UTF-8, ≤ 64 B); sent once when serving starts |
//! | 0x42 Health | guest → host | uptime ms u64, load ×1000 (1, 5, 15 min) 3×u32, MemTotal KiB u64, MemAvailable KiB u64 |
//! | 0x43 Stdout, 0x44 Stderr | guest → host | bytes of the command's output (≤ 4096 per frame) |
//! | 0x45 Exit | guest → host | status i32 (exactly 4 bytes); the last frame of an exec |
//! | 0x46 Error | guest → host | UTF-8 text; for exec followed by Exit |
//! | 0x47 PowerOffAck | guest → host | empty |
//! | 0x48 FileInfo | guest → host | mode u32, size u64 (a copy-out's first frame) |
//! | 0x49 FileData | guest → host | file bytes (≤ 64 KiB per frame) |
//! | 0x4A Done | guest → host | bytes copied u64; the last frame of a copy |
//! | 0x4B Frozen, 0x4C Thawed | guest → host | mount points (each NUL-terminated) |
//!
//! The guest serves one request at a time, in order; the host sends the next request only
//! after the previous one's last response (Exit, Health, PowerOffAck, Done, Frozen, Thawed or
//! a lone Error). A copy-in is one request made of several frames (start, data..., end)
//! with one id; its only response comes after the end.

use std::marker::PhantomData;

use thiserror::Error;

use super::stream::{FrameFormat, StreamDecoder};
use super::{decode_argv, encode_argv, validate_argv};

/// First byte of every session frame (the one-shot frames of `vhpc run` use 0xA5).
pub const MAGIC: u8 = 0xA6;
/// The protocol version both sides must speak.
pub const VERSION: u8 = 2;
/// Header bytes: magic, version, kind, flags, id, length.
pub const HEADER_LEN: usize = 12;
/// Largest request payload (an exec's argv and stdin together).
pub const MAX_REQUEST_PAYLOAD: usize = 1 << 20;
/// Largest response payload.
pub const MAX_RESPONSE_PAYLOAD: usize = 64 << 10;
/// Largest agent version string in a Ready frame.
const MAX_VERSION_LEN: usize = 64;
/// Bytes of a Health payload.
const HEALTH_LEN: usize = 36;
/// Largest file chunk in one CopyInData or FileData frame.
pub const MAX_CHUNK: usize = 64 << 10;
/// Largest guest path in a copy or freeze request.
pub const MAX_PATH: usize = 4096;
/// Most mount points in one freeze request or its answer.
pub const MAX_MOUNTS: usize = 256;

const PING: u8 = 0x01;
const EXEC: u8 = 0x02;
const POWER_OFF: u8 = 0x03;
const COPY_IN_START: u8 = 0x04;
const COPY_IN_DATA: u8 = 0x05;
const COPY_IN_END: u8 = 0x06;
const COPY_OUT: u8 = 0x07;
const FREEZE: u8 = 0x08;
const THAW: u8 = 0x09;
const READY: u8 = 0x41;
const HEALTH: u8 = 0x42;
const STDOUT: u8 = 0x43;
const STDERR: u8 = 0x44;
const EXIT: u8 = 0x45;
const ERROR: u8 = 0x46;
const POWER_OFF_ACK: u8 = 0x47;
const FILE_INFO: u8 = 0x48;
const FILE_DATA: u8 = 0x49;
const DONE: u8 = 0x4A;
const FROZEN: u8 = 0x4B;
const THAWED: u8 = 0x4C;

/// What the host asks the guest agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Report health.
    Ping,
    /// Run `argv` with `stdin` as its standard input (empty: /dev/null).
    Exec { argv: Vec<String>, stdin: Vec<u8> },
    /// Sync and power the machine off.
    PowerOff,
    /// Start writing `size` bytes to the absolute guest `path`, with permission bits `mode`.
    CopyInStart { path: String, mode: u32, size: u64 },
    /// The next bytes of the file a CopyInStart with the same id began.
    CopyInData(Vec<u8>),
    /// All bytes sent: finish the file.
    CopyInEnd,
    /// Send the regular file at the absolute guest `path`.
    CopyOut { path: String },
    /// Sync and freeze `mount_points` (empty: every freezable mounted file system); thaw
    /// by itself after `timeout_secs` unless thawed before.
    Freeze {
        mount_points: Vec<String>,
        timeout_secs: u32,
    },
    /// Thaw whatever is frozen.
    Thaw,
}

/// The guest's health, read from /proc.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Health {
    pub uptime_ms: u64,
    /// Load averages over 1, 5 and 15 minutes, times 1000.
    pub load_milli: [u32; 3],
    pub mem_total_kib: u64,
    pub mem_available_kib: u64,
}

/// What the guest agent answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    Ready {
        agent_version: String,
    },
    Health(Health),
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exit(i32),
    Error(String),
    PowerOffAck,
    /// A copy-out's file: permission bits and size.
    FileInfo {
        mode: u32,
        size: u64,
    },
    FileData(Vec<u8>),
    /// A copy finished: bytes copied.
    Done(u64),
    Frozen(Vec<String>),
    Thawed(Vec<String>),
}

/// One frame: a request id and its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message<T> {
    pub id: u32,
    pub body: T,
}

/// Errors in a session stream or in a message to encode.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SessionError {
    #[error(
        "agent stream out of sync: expected magic 0xA6 at byte {offset}, got {byte:#04x}; \
         check that nothing else writes to the agent channel"
    )]
    BadMagic { offset: u64, byte: u8 },
    #[error(
        "the peer speaks agent protocol version {got}, this vhpc speaks {VERSION}; rebuild the \
         guest initramfs with this vhpc (`vhpc image initramfs`)"
    )]
    Version { got: u8 },
    #[error("frame at byte {offset} has reserved flags {flags:#04x} set; the stream is corrupt")]
    Flags { offset: u64, flags: u8 },
    #[error("frame at byte {offset} has unknown kind {kind:#04x} for this direction")]
    UnknownKind { offset: u64, kind: u8 },
    #[error("frame at byte {offset} announces {len} bytes, more than the {max}-byte limit")]
    Oversize { offset: u64, len: u64, max: usize },
    #[error("frame at byte {offset} (kind {kind:#04x}) has a malformed payload: {detail}")]
    BadPayload {
        offset: u64,
        kind: u8,
        detail: String,
    },
    #[error("the exec request is too large: {len} bytes of argv and stdin, at most {max}")]
    RequestTooLarge { len: usize, max: usize },
    #[error("invalid command: {0}")]
    Argv(#[from] super::ProtocolError),
    #[error("invalid {what}: {detail}")]
    Invalid { what: &'static str, detail: String },
}

/// A message body that can be framed; implemented by [`Request`] and [`Response`].
pub trait Body: Sized {
    /// The payload limit for this direction.
    const MAX_PAYLOAD: usize;
    /// Parses a payload of `kind`; `Err` holds the reason for [`SessionError::BadPayload`].
    fn parse(kind: u8, payload: &[u8]) -> Result<Option<Self>, String>;
}

fn push_frame(id: u32, kind: u8, payload: &[u8], out: &mut Vec<u8>) {
    let len = u32::try_from(payload.len()).expect("payloads are bounded far below 4 GiB");
    out.reserve(HEADER_LEN + payload.len());
    out.extend_from_slice(&[MAGIC, VERSION, kind, 0]);
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(payload);
}

/// Appends the frame of request `id` to `out`; checks argv and the size limit first.
pub fn encode_request(id: u32, request: &Request, out: &mut Vec<u8>) -> Result<(), SessionError> {
    match request {
        Request::Ping => push_frame(id, PING, &[], out),
        Request::PowerOff => push_frame(id, POWER_OFF, &[], out),
        Request::CopyInStart { path, mode, size } => {
            check_path(path).map_err(invalid("guest path"))?;
            let mut p = Vec::with_capacity(12 + path.len());
            p.extend_from_slice(&mode.to_le_bytes());
            p.extend_from_slice(&size.to_le_bytes());
            p.extend_from_slice(path.as_bytes());
            push_frame(id, COPY_IN_START, &p, out);
        }
        Request::CopyInData(data) => {
            if data.len() > MAX_CHUNK {
                return Err(invalid("file chunk")(format!(
                    "{} bytes, at most {MAX_CHUNK}",
                    data.len()
                )));
            }
            push_frame(id, COPY_IN_DATA, data, out);
        }
        Request::CopyInEnd => push_frame(id, COPY_IN_END, &[], out),
        Request::CopyOut { path } => {
            check_path(path).map_err(invalid("guest path"))?;
            push_frame(id, COPY_OUT, path.as_bytes(), out);
        }
        Request::Freeze {
            mount_points,
            timeout_secs,
        } => {
            for m in mount_points {
                check_path(m).map_err(invalid("mount point"))?;
            }
            if mount_points.len() > MAX_MOUNTS {
                return Err(invalid("mount point list")(format!(
                    "{} mount points, at most {MAX_MOUNTS}",
                    mount_points.len()
                )));
            }
            let mut p = timeout_secs.to_le_bytes().to_vec();
            p.extend_from_slice(&encode_paths(mount_points));
            push_frame(id, FREEZE, &p, out);
        }
        Request::Thaw => push_frame(id, THAW, &[], out),
        Request::Exec { argv, stdin } => {
            validate_argv(argv)?;
            let argv = encode_argv(argv);
            let len = 4 + argv.len() + stdin.len();
            if len > MAX_REQUEST_PAYLOAD {
                return Err(SessionError::RequestTooLarge {
                    len,
                    max: MAX_REQUEST_PAYLOAD,
                });
            }
            let mut payload = Vec::with_capacity(len);
            let argv_len = u32::try_from(argv.len()).expect("bounded by MAX_REQUEST_PAYLOAD");
            payload.extend_from_slice(&argv_len.to_le_bytes());
            payload.extend_from_slice(&argv);
            payload.extend_from_slice(stdin);
            push_frame(id, EXEC, &payload, out);
        }
    }
    Ok(())
}

/// Appends the frame(s) of response `id` to `out`: output longer than 4096 bytes becomes
/// several frames, text longer than the limit is cut at a character boundary.
pub fn encode_response(id: u32, response: &Response, out: &mut Vec<u8>) {
    match response {
        Response::Ready { agent_version } => {
            push_frame(id, READY, truncate(agent_version, MAX_VERSION_LEN), out)
        }
        Response::Health(h) => {
            let mut p = Vec::with_capacity(HEALTH_LEN);
            p.extend_from_slice(&h.uptime_ms.to_le_bytes());
            for load in h.load_milli {
                p.extend_from_slice(&load.to_le_bytes());
            }
            p.extend_from_slice(&h.mem_total_kib.to_le_bytes());
            p.extend_from_slice(&h.mem_available_kib.to_le_bytes());
            push_frame(id, HEALTH, &p, out);
        }
        Response::Stdout(data) => push_chunks(id, STDOUT, data, out),
        Response::Stderr(data) => push_chunks(id, STDERR, data, out),
        Response::Exit(status) => push_frame(id, EXIT, &status.to_le_bytes(), out),
        Response::Error(text) => push_frame(id, ERROR, truncate(text, MAX_RESPONSE_PAYLOAD), out),
        Response::PowerOffAck => push_frame(id, POWER_OFF_ACK, &[], out),
        Response::FileInfo { mode, size } => {
            let mut p = mode.to_le_bytes().to_vec();
            p.extend_from_slice(&size.to_le_bytes());
            push_frame(id, FILE_INFO, &p, out);
        }
        Response::FileData(data) => {
            for chunk in data.chunks(MAX_CHUNK) {
                push_frame(id, FILE_DATA, chunk, out);
            }
        }
        Response::Done(bytes) => push_frame(id, DONE, &bytes.to_le_bytes(), out),
        Response::Frozen(list) => push_frame(id, FROZEN, &encode_paths(bounded(list)), out),
        Response::Thawed(list) => push_frame(id, THAWED, &encode_paths(bounded(list)), out),
    }
}

/// At most as many paths as fit in a response (the guest never has that many mounts).
fn bounded(list: &[String]) -> &[String] {
    let mut total = 0;
    let n = list
        .iter()
        .take(MAX_MOUNTS)
        .take_while(|p| {
            total += p.len() + 1;
            total <= MAX_RESPONSE_PAYLOAD
        })
        .count();
    &list[..n]
}

fn invalid(what: &'static str) -> impl Fn(String) -> SessionError {
    move |detail| SessionError::Invalid { what, detail }
}

/// A guest path: absolute, not empty, no NUL, at most [`MAX_PATH`] bytes.
pub fn check_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("{path:?} is not an absolute path"));
    }
    if path.contains('\0') {
        return Err("the path contains a NUL byte".into());
    }
    if path.len() > MAX_PATH {
        return Err(format!("{} bytes, at most {MAX_PATH}", path.len()));
    }
    Ok(())
}

/// Paths, each NUL-terminated.
fn encode_paths(paths: &[String]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in paths {
        out.extend_from_slice(p.as_bytes());
        out.push(0);
    }
    out
}

fn decode_paths(bytes: &[u8]) -> Result<Vec<String>, String> {
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    let Some(body) = bytes.strip_suffix(&[0]) else {
        return Err("the path list does not end with NUL".into());
    };
    let paths = body
        .split(|&b| b == 0)
        .map(|p| {
            let p = std::str::from_utf8(p).map_err(|_| "a path is not valid UTF-8".to_owned())?;
            check_path(p)?;
            Ok(p.to_owned())
        })
        .collect::<Result<Vec<_>, String>>()?;
    if paths.len() > MAX_MOUNTS {
        return Err(format!("{} paths, at most {MAX_MOUNTS}", paths.len()));
    }
    Ok(paths)
}

fn path_payload(payload: &[u8]) -> Result<String, String> {
    let path = utf8(payload)?;
    check_path(&path)?;
    Ok(path)
}

fn push_chunks(id: u32, kind: u8, data: &[u8], out: &mut Vec<u8>) {
    if data.is_empty() {
        push_frame(id, kind, data, out);
    }
    for chunk in data.chunks(super::MAX_PAYLOAD) {
        push_frame(id, kind, chunk, out);
    }
}

fn truncate(text: &str, max: usize) -> &[u8] {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text.as_bytes()[..end]
}

fn u32_at(p: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&p[at..at + 4]);
    u32::from_le_bytes(b)
}

fn u64_at(p: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&p[at..at + 8]);
    u64::from_le_bytes(b)
}

fn expect_empty(payload: &[u8]) -> Result<(), String> {
    if payload.is_empty() {
        Ok(())
    } else {
        Err(format!("expected no payload, got {} bytes", payload.len()))
    }
}

fn utf8(payload: &[u8]) -> Result<String, String> {
    String::from_utf8(payload.to_vec()).map_err(|_| "text is not valid UTF-8".to_owned())
}

impl Body for Request {
    const MAX_PAYLOAD: usize = MAX_REQUEST_PAYLOAD;

    fn parse(kind: u8, payload: &[u8]) -> Result<Option<Self>, String> {
        Ok(Some(match kind {
            PING => expect_empty(payload).map(|()| Request::Ping)?,
            POWER_OFF => expect_empty(payload).map(|()| Request::PowerOff)?,
            COPY_IN_START if payload.len() < 12 => {
                return Err(format!(
                    "{} bytes, expected mode, size and a path",
                    payload.len()
                ));
            }
            COPY_IN_START => Request::CopyInStart {
                mode: u32_at(payload, 0),
                size: u64_at(payload, 4),
                path: path_payload(&payload[12..])?,
            },
            COPY_IN_DATA if payload.len() > MAX_CHUNK => {
                return Err(format!("file chunk larger than {MAX_CHUNK}"));
            }
            COPY_IN_DATA => Request::CopyInData(payload.to_vec()),
            COPY_IN_END => expect_empty(payload).map(|()| Request::CopyInEnd)?,
            COPY_OUT => Request::CopyOut {
                path: path_payload(payload)?,
            },
            FREEZE if payload.len() < 4 => {
                return Err("shorter than its timeout field".into());
            }
            FREEZE => Request::Freeze {
                timeout_secs: u32_at(payload, 0),
                mount_points: decode_paths(&payload[4..])?,
            },
            THAW => expect_empty(payload).map(|()| Request::Thaw)?,
            EXEC => {
                if payload.len() < 4 {
                    return Err("shorter than its argv length field".into());
                }
                let argv_len = u32_at(payload, 0) as usize;
                let Some(argv) = payload.get(4..4usize.saturating_add(argv_len)) else {
                    return Err(format!("argv length {argv_len} runs past the payload"));
                };
                let argv = decode_argv(argv).map_err(|e| e.to_string())?;
                let stdin = payload[4 + argv_len..].to_vec();
                Request::Exec { argv, stdin }
            }
            _ => return Ok(None),
        }))
    }
}

impl Body for Response {
    const MAX_PAYLOAD: usize = MAX_RESPONSE_PAYLOAD;

    fn parse(kind: u8, payload: &[u8]) -> Result<Option<Self>, String> {
        Ok(Some(match kind {
            READY if payload.len() > MAX_VERSION_LEN => {
                return Err(format!("version longer than {MAX_VERSION_LEN} bytes"));
            }
            READY => Response::Ready {
                agent_version: utf8(payload)?,
            },
            HEALTH if payload.len() != HEALTH_LEN => {
                return Err(format!("{} bytes, expected {HEALTH_LEN}", payload.len()));
            }
            HEALTH => Response::Health(Health {
                uptime_ms: u64_at(payload, 0),
                load_milli: [u32_at(payload, 8), u32_at(payload, 12), u32_at(payload, 16)],
                mem_total_kib: u64_at(payload, 20),
                mem_available_kib: u64_at(payload, 28),
            }),
            STDOUT | STDERR if payload.len() > super::MAX_PAYLOAD => {
                return Err(format!("output chunk larger than {}", super::MAX_PAYLOAD));
            }
            STDOUT => Response::Stdout(payload.to_vec()),
            STDERR => Response::Stderr(payload.to_vec()),
            EXIT if payload.len() != 4 => {
                return Err(format!("{} bytes, expected 4", payload.len()));
            }
            EXIT => Response::Exit(u32_at(payload, 0) as i32),
            ERROR => Response::Error(utf8(payload)?),
            POWER_OFF_ACK => expect_empty(payload).map(|()| Response::PowerOffAck)?,
            FILE_INFO if payload.len() != 12 => {
                return Err(format!("{} bytes, expected 12", payload.len()));
            }
            FILE_INFO => Response::FileInfo {
                mode: u32_at(payload, 0),
                size: u64_at(payload, 4),
            },
            FILE_DATA if payload.len() > MAX_CHUNK => {
                return Err(format!("file chunk larger than {MAX_CHUNK}"));
            }
            FILE_DATA => Response::FileData(payload.to_vec()),
            DONE if payload.len() != 8 => {
                return Err(format!("{} bytes, expected 8", payload.len()));
            }
            DONE => Response::Done(u64_at(payload, 0)),
            FROZEN => Response::Frozen(decode_paths(payload)?),
            THAWED => Response::Thawed(decode_paths(payload)?),
            _ => return Ok(None),
        }))
    }
}

/// Incremental decoder of one direction of a session stream; bytes may arrive in pieces of
/// any size. The stream is untrusted: every field is checked, lengths are bounded before any
/// buffering, nothing panics. The first error is sticky ([`super::stream`]); to start over
/// after an error (the guest does, to keep serving), make a new decoder.
pub type Decoder<T> = StreamDecoder<SessionFrames<T>>;

/// The session wire format with bodies of type `T`, as a [`FrameFormat`].
#[derive(Debug)]
pub struct SessionFrames<T>(PhantomData<T>);

impl<T: Body> FrameFormat for SessionFrames<T> {
    type Frame = Message<T>;
    type Error = SessionError;

    fn parse(rest: &[u8], offset: u64) -> Result<Option<(Message<T>, usize)>, SessionError> {
        // Check each header byte as soon as it is there, so garbage fails fast.
        if let Some(&byte) = rest.first()
            && byte != MAGIC
        {
            return Err(SessionError::BadMagic { offset, byte });
        }
        if let Some(&got) = rest.get(1)
            && got != VERSION
        {
            return Err(SessionError::Version { got });
        }
        if let Some(&flags) = rest.get(3)
            && flags != 0
        {
            return Err(SessionError::Flags { offset, flags });
        }
        if rest.len() < HEADER_LEN {
            return Ok(None);
        }
        let kind = rest[2];
        let id = u32_at(rest, 4);
        let len = u64::from(u32_at(rest, 8));
        if len > T::MAX_PAYLOAD as u64 {
            return Err(SessionError::Oversize {
                offset,
                len,
                max: T::MAX_PAYLOAD,
            });
        }
        let Some(payload) = rest.get(HEADER_LEN..HEADER_LEN + len as usize) else {
            return Ok(None);
        };
        match T::parse(kind, payload) {
            Ok(Some(body)) => Ok(Some((Message { id, body }, HEADER_LEN + payload.len()))),
            Ok(None) => Err(SessionError::UnknownKind { offset, kind }),
            Err(detail) => Err(SessionError::BadPayload {
                offset,
                kind,
                detail,
            }),
        }
    }
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
