//! Wire protocol between the guest agent (/init) and the host, spoken over the dedicated,
//! byte-transparent agent serial port ([`AGENT_TTY`]).
//!
//! The guest only ever sends; the host only ever receives. Each frame is
//!
//! ```text
//! +------+------+-----------+-----------------+
//! | 0xA5 | kind | len u16 LE| payload (len B) |
//! +------+------+-----------+-----------------+
//! ```
//!
//! with `kind` 1 = stdout bytes, 2 = stderr bytes, 3 = exit status (i32 LE, exactly 4 bytes),
//! 4 = agent-side error text (UTF-8). Payloads are at most [`MAX_PAYLOAD`] bytes; the encoder
//! splits longer output into several frames. The command to run reaches the guest as a file in
//! the initramfs ([`COMMAND_PATH`]), not over the wire.
//!
//! A long-running guest (kernel command line [`SERVE_FLAG`]) speaks the request/response
//! protocol of [`session`] on the same channel instead.

use thiserror::Error;

pub mod session;
pub mod stream;

use stream::{FrameFormat, StreamDecoder};

/// On the guest kernel's command line: /init serves [`session`] requests on the agent channel
/// instead of running [`COMMAND_PATH`] once (`vhpc vm start` sets it).
pub const SERVE_FLAG: &str = "vhpc.agent=serve";
/// The vsock port the long-running agent listens on (one session per connection).
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// On the guest kernel's command line as `vhpc.root=DEVICE`: /init mounts DEVICE (ext4) and
/// runs the command or the serve agent inside it (`vhpc run --rootfs IMG` sets it).
pub const ROOT_FLAG: &str = "vhpc.root";

/// First byte of every frame.
pub const MAGIC: u8 = 0xA5;
/// Largest payload one frame carries.
pub const MAX_PAYLOAD: usize = 4096;
/// Bytes in a frame header: magic, kind, u16 length.
pub const HEADER_LEN: usize = 4;
/// The command file the host puts into the initramfs: NUL-terminated argv strings.
pub const COMMAND_PATH: &str = "/vhpc/argv";
/// Kernel modules for /init to load: one absolute in-guest path per line, dependencies first.
pub const LOAD_ORDER_PATH: &str = "/lib/modules/vhpc-load-order";
/// The guest's end of the agent channel (the second 16550 port).
pub const AGENT_TTY: &str = "/dev/ttyS1";

const KIND_STDOUT: u8 = 1;
const KIND_STDERR: u8 = 2;
const KIND_EXIT: u8 = 3;
const KIND_ERROR: u8 = 4;

/// One message from the guest agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Bytes the command wrote to its stdout.
    Stdout(Vec<u8>),
    /// Bytes the command wrote to its stderr.
    Stderr(Vec<u8>),
    /// The command's status: exit code 0-255, or 128 + signal number if it was killed.
    /// Always the agent's last frame.
    Exit(i32),
    /// An agent-side failure (e.g. exec failed), followed by an `Exit` frame.
    Error(String),
}

/// Errors decoding frames or the argv file.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProtocolError {
    #[error(
        "agent stream is out of sync: expected frame magic 0xA5 at byte {offset}, got {byte:#04x}; \
         check that nothing else (kernel console, getty) writes to the agent serial port"
    )]
    BadMagic { offset: u64, byte: u8 },
    #[error(
        "agent sent a frame of unknown kind {kind} at byte {offset}; host and guest vhpc \
         versions probably differ, rebuild the initramfs with this vhpc"
    )]
    UnknownKind { offset: u64, kind: u8 },
    #[error("agent sent an exit frame with a {len}-byte payload at byte {offset} (expected 4)")]
    BadExitLength { offset: u64, len: usize },
    #[error(
        "agent sent a frame of {len} bytes at byte {offset}, more than the {MAX_PAYLOAD}-byte \
         limit; the stream is corrupt"
    )]
    Oversize { offset: u64, len: usize },
    #[error("agent sent an error frame that is not valid UTF-8 at byte {offset}")]
    ErrorNotUtf8 { offset: u64 },
    #[error("the command is empty; give at least the program to run")]
    EmptyArgv,
    #[error("the command file is not NUL-terminated; it was truncated or not written by vhpc")]
    ArgvNotTerminated,
    #[error("argument {index} of the command file is not valid UTF-8")]
    ArgvNotUtf8 { index: usize },
    #[error("argument {index} of the command contains a NUL byte, which cannot be passed to exec")]
    ArgvContainsNul { index: usize },
    #[error("the program name (argument 0) of the command is empty")]
    EmptyProgram,
}

/// Appends the wire encoding of `frame` to `out`.
///
/// Stdout/stderr payloads longer than [`MAX_PAYLOAD`] become several frames; an empty payload
/// becomes one empty frame. Error text longer than [`MAX_PAYLOAD`] is truncated (at a character
/// boundary) because a reader would otherwise see several errors.
pub fn encode(frame: &Frame, out: &mut Vec<u8>) {
    match frame {
        Frame::Stdout(data) => encode_chunks(KIND_STDOUT, data, out),
        Frame::Stderr(data) => encode_chunks(KIND_STDERR, data, out),
        Frame::Exit(status) => push_frame(KIND_EXIT, &status.to_le_bytes(), out),
        Frame::Error(text) => {
            let mut end = text.len().min(MAX_PAYLOAD);
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            push_frame(KIND_ERROR, &text.as_bytes()[..end], out);
        }
    }
}

fn encode_chunks(kind: u8, data: &[u8], out: &mut Vec<u8>) {
    if data.is_empty() {
        push_frame(kind, data, out);
    }
    for chunk in data.chunks(MAX_PAYLOAD) {
        push_frame(kind, chunk, out);
    }
}

fn push_frame(kind: u8, payload: &[u8], out: &mut Vec<u8>) {
    let len = u16::try_from(payload.len()).expect("payload is at most MAX_PAYLOAD (4096) bytes");
    out.reserve(HEADER_LEN + payload.len());
    out.push(MAGIC);
    out.push(kind);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(payload);
}

/// Incremental decoder of the agent's frames: feed it bytes as they arrive, in pieces of any
/// size ([`stream`] has the rules, among them that a corrupt stream's error is sticky).
pub type FrameDecoder = StreamDecoder<AgentFrames>;

/// The one-shot agent's wire format, as a [`FrameFormat`].
#[derive(Debug)]
pub enum AgentFrames {}

impl FrameFormat for AgentFrames {
    type Frame = Frame;
    type Error = ProtocolError;

    fn parse(rest: &[u8], offset: u64) -> Result<Option<(Frame, usize)>, ProtocolError> {
        let Some(&magic) = rest.first() else {
            return Ok(None);
        };
        if magic != MAGIC {
            return Err(ProtocolError::BadMagic {
                offset,
                byte: magic,
            });
        }
        let Some(&kind) = rest.get(1) else {
            return Ok(None);
        };
        if !(KIND_STDOUT..=KIND_ERROR).contains(&kind) {
            return Err(ProtocolError::UnknownKind { offset, kind });
        }
        let Some(len_bytes) = rest.get(2..HEADER_LEN) else {
            return Ok(None);
        };
        let len = usize::from(u16::from_le_bytes([len_bytes[0], len_bytes[1]]));
        if len > MAX_PAYLOAD {
            return Err(ProtocolError::Oversize { offset, len });
        }
        if kind == KIND_EXIT && len != 4 {
            return Err(ProtocolError::BadExitLength { offset, len });
        }
        let Some(payload) = rest.get(HEADER_LEN..HEADER_LEN + len) else {
            return Ok(None);
        };
        let frame = match kind {
            KIND_STDOUT => Frame::Stdout(payload.to_vec()),
            KIND_STDERR => Frame::Stderr(payload.to_vec()),
            KIND_EXIT => Frame::Exit(i32::from_le_bytes([
                payload[0], payload[1], payload[2], payload[3],
            ])),
            _ => match std::str::from_utf8(payload) {
                Ok(text) => Frame::Error(text.to_owned()),
                Err(_) => return Err(ProtocolError::ErrorNotUtf8 { offset }),
            },
        };
        Ok(Some((frame, HEADER_LEN + len)))
    }
}

/// Checks that `argv` can be encoded faithfully by [`encode_argv`].
pub fn validate_argv(argv: &[String]) -> Result<(), ProtocolError> {
    let Some(program) = argv.first() else {
        return Err(ProtocolError::EmptyArgv);
    };
    if program.is_empty() {
        return Err(ProtocolError::EmptyProgram);
    }
    match argv.iter().position(|arg| arg.contains('\0')) {
        Some(index) => Err(ProtocolError::ArgvContainsNul { index }),
        None => Ok(()),
    }
}

/// Encodes argv as NUL-terminated strings for [`COMMAND_PATH`].
///
/// Arguments must not contain NUL bytes (check with [`validate_argv`] first): a NUL inside an
/// argument would split it in two when decoded.
pub fn encode_argv(argv: &[String]) -> Vec<u8> {
    let mut out = Vec::with_capacity(argv.iter().map(|arg| arg.len() + 1).sum());
    for arg in argv {
        out.extend_from_slice(arg.as_bytes());
        out.push(0);
    }
    out
}

/// Decodes the contents of [`COMMAND_PATH`].
pub fn decode_argv(bytes: &[u8]) -> Result<Vec<String>, ProtocolError> {
    let Some(body) = bytes.strip_suffix(&[0]) else {
        return Err(if bytes.is_empty() {
            ProtocolError::EmptyArgv
        } else {
            ProtocolError::ArgvNotTerminated
        });
    };
    let argv = body
        .split(|&b| b == 0)
        .enumerate()
        .map(|(index, arg)| {
            String::from_utf8(arg.to_vec()).map_err(|_| ProtocolError::ArgvNotUtf8 { index })
        })
        .collect::<Result<Vec<_>, _>>()?;
    validate_argv(&argv)?;
    Ok(argv)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    fn sample_frames() -> Vec<Frame> {
        vec![
            Frame::Stdout(b"hello\n".to_vec()),
            Frame::Stderr(Vec::new()),
            Frame::Stderr(vec![0xA5, 0, 1, 2, 3, 4, 0xff]),
            Frame::Error("exec failed: é".to_owned()),
            Frame::Exit(-1),
            Frame::Exit(137),
        ]
    }

    fn encode_all(frames: &[Frame]) -> Vec<u8> {
        let mut out = Vec::new();
        for frame in frames {
            encode(frame, &mut out);
        }
        out
    }

    #[test]
    fn header_layout() {
        let mut out = Vec::new();
        encode(&Frame::Exit(3), &mut out);
        assert_eq!(out, [0xA5, 3, 4, 0, 3, 0, 0, 0]);
        out.clear();
        encode(&Frame::Stdout(vec![7; 300]), &mut out);
        assert_eq!(&out[..4], &[0xA5, 1, 0x2c, 0x01]);
        assert_eq!(out.len(), 304);
    }

    #[test]
    fn roundtrip_in_one_push() {
        let frames = sample_frames();
        let mut dec = FrameDecoder::new();
        assert_eq!(dec.push(&encode_all(&frames)).unwrap(), frames);
        assert_eq!(dec.pending_bytes(), 0);
    }

    #[test]
    fn split_at_every_offset() {
        let frames = sample_frames();
        let bytes = encode_all(&frames);
        for cut in 0..=bytes.len() {
            let mut dec = FrameDecoder::new();
            let mut got = dec.push(&bytes[..cut]).unwrap();
            got.extend(dec.push(&bytes[cut..]).unwrap());
            assert_eq!(got, frames, "split at {cut}");
        }
    }

    #[test]
    fn byte_at_a_time() {
        let frames = sample_frames();
        let mut dec = FrameDecoder::new();
        let mut got = Vec::new();
        for b in encode_all(&frames) {
            got.extend(dec.push(&[b]).unwrap());
        }
        assert_eq!(got, frames);
    }

    #[test]
    fn large_output_is_split() {
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let mut out = Vec::new();
        encode(&Frame::Stdout(data.clone()), &mut out);
        let frames = FrameDecoder::new().push(&out).unwrap();
        assert_eq!(frames.len(), 3);
        let mut joined = Vec::new();
        for frame in frames {
            let Frame::Stdout(chunk) = frame else {
                panic!("unexpected frame {frame:?}")
            };
            assert!(chunk.len() <= MAX_PAYLOAD);
            joined.extend(chunk);
        }
        assert_eq!(joined, data);
    }

    #[test]
    fn long_error_is_truncated_on_char_boundary() {
        let text = "é".repeat(3000);
        let mut out = Vec::new();
        encode(&Frame::Error(text), &mut out);
        let frames = FrameDecoder::new().push(&out).unwrap();
        let [Frame::Error(got)] = frames.as_slice() else {
            panic!("unexpected frames {frames:?}")
        };
        assert_eq!(got.len(), MAX_PAYLOAD);
    }

    #[test]
    fn garbage_is_rejected() {
        type Check = fn(&ProtocolError) -> bool;
        let cases: &[(&[u8], Check)] = &[
            (b"hello", |e| {
                matches!(
                    e,
                    ProtocolError::BadMagic {
                        offset: 0,
                        byte: b'h'
                    }
                )
            }),
            (&[0xA5, 9], |e| {
                matches!(e, ProtocolError::UnknownKind { kind: 9, .. })
            }),
            (&[0xA5, 0], |e| {
                matches!(e, ProtocolError::UnknownKind { kind: 0, .. })
            }),
            (&[0xA5, 3, 2, 0, 1, 2], |e| {
                matches!(e, ProtocolError::BadExitLength { len: 2, .. })
            }),
            (&[0xA5, 1, 0x01, 0x10], |e| {
                matches!(e, ProtocolError::Oversize { len: 4097, .. })
            }),
            (&[0xA5, 4, 1, 0, 0xff], |e| {
                matches!(e, ProtocolError::ErrorNotUtf8 { .. })
            }),
        ];
        for (bytes, check) in cases {
            let err = FrameDecoder::new().push(bytes).unwrap_err();
            assert!(check(&err), "{bytes:?} gave {err:?}");
        }
    }

    #[test]
    fn error_after_good_frames_is_sticky() {
        let mut bytes = encode_all(&[Frame::Exit(0)]);
        bytes.push(0x00);
        let mut dec = FrameDecoder::new();
        assert_eq!(dec.push(&bytes).unwrap(), vec![Frame::Exit(0)]);
        let err = dec.push(&[]).unwrap_err();
        assert_eq!(err, ProtocolError::BadMagic { offset: 8, byte: 0 });
        assert!(dec.push(&encode_all(&[Frame::Exit(1)])).is_err());
    }

    #[test]
    fn pseudo_random_garbage_never_panics() {
        // A cheap stand-in for a fuzzer: xorshift bytes, biased towards valid headers.
        let mut state = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..2000 {
            let len = (next() % 64) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|i| match (i % 6, next() % 4) {
                    (0, 0..=2) => MAGIC,
                    (1, 0..=2) => (next() % 5) as u8,
                    _ => next() as u8,
                })
                .collect();
            let mut dec = FrameDecoder::new();
            for chunk in bytes.chunks(1 + (next() % 7) as usize) {
                let _ = dec.push(chunk);
            }
            assert!(dec.pending_bytes() <= HEADER_LEN + MAX_PAYLOAD);
        }
    }

    #[test]
    fn argv_roundtrip() {
        let argv = vec![
            "sh".to_owned(),
            "-c".to_owned(),
            String::new(),
            "é x".to_owned(),
        ];
        let bytes = encode_argv(&argv);
        assert_eq!(bytes, b"sh\0-c\0\0\xc3\xa9 x\0");
        assert_eq!(decode_argv(&bytes).unwrap(), argv);
    }

    #[test]
    fn argv_errors() {
        assert_eq!(decode_argv(b""), Err(ProtocolError::EmptyArgv));
        assert_eq!(decode_argv(b"\0"), Err(ProtocolError::EmptyProgram));
        assert_eq!(decode_argv(b"ls"), Err(ProtocolError::ArgvNotTerminated));
        assert_eq!(
            decode_argv(b"ls\0\xff\0"),
            Err(ProtocolError::ArgvNotUtf8 { index: 1 })
        );
        assert_eq!(validate_argv(&[]), Err(ProtocolError::EmptyArgv));
        assert_eq!(
            validate_argv(&["a".to_owned(), "b\0c".to_owned()]),
            Err(ProtocolError::ArgvContainsNul { index: 1 })
        );
    }
}
