//! The long-running agent: listens on vsock port [`AGENT_VSOCK_PORT`] and serves
//! [`session`] requests on each connection, one connection and one request at a time, until
//! the host asks it to power off. A connection that ends or breaks is followed by the next
//! one (the host reconnects after an error on its side).

use std::io::{self, Read, Write};

use thiserror::Error;

use crate::files::{self, CopyIn};
use crate::freeze::Freezer;
use crate::kmsg;
use crate::protocol::session::{self, Decoder, Health, Message, Request, Response};
use crate::protocol::{AGENT_VSOCK_PORT, Frame, FrameDecoder, SERVE_FLAG};
use crate::relay::{self, Reap, RelayError};
use crate::vsock::VsockListener;

#[derive(Debug, Error)]
pub enum ServeError {
    #[error("cannot read the agent channel: {0}; the host end is gone")]
    Read(#[source] io::Error),
    #[error("the agent channel was hung up")]
    HungUp,
    #[error("cannot write to the agent channel: {0}; the host stopped listening")]
    Write(#[source] io::Error),
    #[error(transparent)]
    Relay(#[from] RelayError),
    #[error(
        "cannot listen on vsock port {AGENT_VSOCK_PORT}: {0}; the VM needs a virtio-vsock \
         device (`vhpc vm start` gives it one) and the initramfs the vsock modules"
    )]
    Listen(#[source] io::Error),
    #[error("cannot accept a vsock connection: {0}")]
    Accept(#[source] io::Error),
}

/// Serves connections on the agent's vsock port until one of them asks for power-off.
pub(crate) fn serve_vsock() -> Result<(), ServeError> {
    let listener = VsockListener::bind(AGENT_VSOCK_PORT).map_err(ServeError::Listen)?;
    let freezer = Freezer::default();
    loop {
        let mut conn = match listener.accept() {
            Ok(conn) => conn,
            // A connection that was reset before it was accepted (a VM restored from a
            // checkpoint resets the guest's vsock transport) costs only that connection.
            Err(e) if accept_error_is_transient(&e) => {
                kmsg::warn(&format!(
                    "agent: accepting a connection failed: {e}; waiting for the next"
                ));
                continue;
            }
            Err(e) => return Err(ServeError::Accept(e)),
        };
        let result = serve(&mut conn, &freezer);
        // A freeze never outlives the session that asked for it.
        let thawed = freezer.thaw();
        if !thawed.is_empty() {
            kmsg::warn(&format!(
                "agent: the host's session ended; thawed {}",
                thawed.join(", ")
            ));
        }
        match result {
            Ok(()) => {
                // Let the acknowledgement reach the host: it closes the connection when it
                // has it (bounded, so a host that went away cannot hold up the power-off).
                linger(&conn);
                return Ok(());
            }
            Err(ServeError::HungUp) => {}
            Err(e) => kmsg::warn(&format!("agent: session ended: {e}; waiting for the host")),
        }
    }
}

/// Errors of `accept` that concern one connection, not the listening socket.
fn accept_error_is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::Interrupted
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    ) || e.raw_os_error() == Some(libc::EPROTO)
}

/// Shuts our sending side and waits up to a second for the host to close.
fn linger(conn: &std::fs::File) {
    use std::os::fd::AsRawFd;
    let timeout = libc::timeval {
        tv_sec: 1,
        tv_usec: 0,
    };
    // SAFETY: shutdown and setsockopt on a socket fd we own, with a valid timeval of the
    // size passed; failures only shorten the wait.
    unsafe {
        libc::shutdown(conn.as_raw_fd(), libc::SHUT_WR);
        libc::setsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const timeout).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
    }
    let mut buf = [0u8; 256];
    let mut conn = conn;
    while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
}

/// Whether the kernel command line asks for the long-running agent.
pub(crate) fn requested(cmdline: &str) -> bool {
    cmdline.split_whitespace().any(|word| word == SERVE_FLAG)
}

/// Announces itself, then serves requests until a power-off request (returns `Ok`) or a
/// broken channel. A malformed request is answered with an error and the stream restarted.
pub(crate) fn serve(
    channel: &mut (impl Read + Write),
    freezer: &Freezer,
) -> Result<(), ServeError> {
    let ready = Response::Ready {
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    respond(channel, 0, &ready)?;
    let mut decoder = Decoder::<Request>::new();
    let mut session = Session {
        freezer,
        copy_in: None,
    };
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match channel.read(&mut buf) {
            Ok(0) => return Err(ServeError::HungUp),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ServeError::Read(e)),
        };
        match decoder.push(&buf[..n]) {
            Ok(messages) => {
                for message in messages {
                    if session.handle(channel, message)? == Next::PowerOff {
                        return Ok(());
                    }
                }
            }
            Err(err) => {
                kmsg::warn(&format!("agent: bad request from the host: {err}"));
                respond(channel, 0, &Response::Error(err.to_string()))?;
                decoder = Decoder::new();
            }
        }
    }
}

#[derive(PartialEq, Eq)]
enum Next {
    Serve,
    PowerOff,
}

/// What a session remembers between requests.
struct Session<'a> {
    freezer: &'a Freezer,
    /// A copy-in whose end has not arrived yet.
    copy_in: Option<CopyIn>,
}

impl Session<'_> {
    fn handle(
        &mut self,
        channel: &mut impl Write,
        message: Message<Request>,
    ) -> Result<Next, ServeError> {
        let id = message.id;
        match message.body {
            Request::Ping => respond(channel, id, &Response::Health(health()))?,
            Request::Exec { argv, stdin } => {
                let mut sink = SessionSink {
                    inner: channel,
                    id,
                    frames: FrameDecoder::new(),
                };
                // pid 1 inherits every orphan and must reap them; elsewhere (tests) reaping
                // any child would steal other threads' children.
                let reap = if std::process::id() == 1 {
                    Reap::All
                } else {
                    Reap::Child
                };
                relay::run_command_with_stdin(&argv, &stdin, &mut sink, reap)?;
            }
            Request::PowerOff => {
                respond(channel, id, &Response::PowerOffAck)?;
                return Ok(Next::PowerOff);
            }
            Request::CopyInStart { path, mode, size } => {
                if let Some(old) = self.copy_in.take() {
                    let text = "a new copy started before this one ended; it was abandoned";
                    respond(channel, old.id, &Response::Error(text.into()))?;
                }
                self.copy_in = Some(CopyIn::start(id, &path, mode, size));
            }
            Request::CopyInData(data) => match self.copy_in.as_mut() {
                Some(copy) if copy.id == id => copy.data(&data),
                _ => {
                    let text = "file data for a copy that was not started";
                    respond(channel, id, &Response::Error(text.into()))?;
                }
            },
            Request::CopyInEnd => {
                let response = match self.copy_in.take_if(|c| c.id == id) {
                    Some(copy) => match copy.finish() {
                        Ok(bytes) => Response::Done(bytes),
                        Err(e) => Response::Error(e),
                    },
                    None => Response::Error("the end of a copy that was not started".into()),
                };
                respond(channel, id, &response)?;
            }
            Request::CopyOut { path } => {
                files::copy_out(&path, &mut |r| send(channel, id, &r))
                    .map_err(ServeError::Write)?;
            }
            Request::Freeze {
                mount_points,
                timeout_secs,
            } => {
                let response = match self.freezer.freeze(&mount_points, timeout_secs) {
                    Ok(frozen) => Response::Frozen(frozen),
                    Err(e) => Response::Error(e),
                };
                respond(channel, id, &response)?;
            }
            Request::Thaw => respond(channel, id, &Response::Thawed(self.freezer.thaw()))?,
        }
        Ok(Next::Serve)
    }
}

fn respond(channel: &mut impl Write, id: u32, response: &Response) -> Result<(), ServeError> {
    send(channel, id, response).map_err(ServeError::Write)
}

fn send(channel: &mut impl Write, id: u32, response: &Response) -> io::Result<()> {
    let mut out = Vec::new();
    session::encode_response(id, response, &mut out);
    channel.write_all(&out).and_then(|()| channel.flush())
}

/// Turns the one-shot frames the command relay writes into session responses of request `id`.
struct SessionSink<'a, W: Write> {
    inner: &'a mut W,
    id: u32,
    frames: FrameDecoder,
}

impl<W: Write> Write for SessionSink<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let frames = self
            .frames
            .push(buf)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let mut out = Vec::new();
        for frame in frames {
            let response = match frame {
                Frame::Stdout(d) => Response::Stdout(d),
                Frame::Stderr(d) => Response::Stderr(d),
                Frame::Exit(s) => Response::Exit(s),
                Frame::Error(t) => Response::Error(t),
            };
            session::encode_response(self.id, &response, &mut out);
        }
        self.inner.write_all(&out)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Uptime, load and memory from /proc; what cannot be read is reported as 0.
fn health() -> Health {
    let read = |path| std::fs::read_to_string(path).unwrap_or_default();
    parse_health(
        &read("/proc/uptime"),
        &read("/proc/loadavg"),
        &read("/proc/meminfo"),
    )
}

fn parse_health(uptime: &str, loadavg: &str, meminfo: &str) -> Health {
    let seconds = |s: &str| s.parse::<f64>().map_or(0, |v| (v * 1000.0) as u64);
    let mut load_milli = [0u32; 3];
    for (slot, word) in load_milli.iter_mut().zip(loadavg.split_whitespace()) {
        *slot = seconds(word) as u32;
    }
    let mem = |key: &str| {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    Health {
        uptime_ms: seconds(uptime.split_whitespace().next().unwrap_or("")),
        load_milli,
        mem_total_kib: mem("MemTotal"),
        mem_available_kib: mem("MemAvailable"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn a_reset_or_aborted_connection_does_not_stop_accepting() {
        for errno in [
            libc::ECONNRESET,
            libc::ECONNABORTED,
            libc::EINTR,
            libc::EPROTO,
        ] {
            assert!(
                accept_error_is_transient(&io::Error::from_raw_os_error(errno)),
                "{errno}"
            );
        }
        for errno in [libc::EBADF, libc::EINVAL, libc::ENOTSOCK, libc::EMFILE] {
            assert!(
                !accept_error_is_transient(&io::Error::from_raw_os_error(errno)),
                "{errno}"
            );
        }
    }

    /// A channel whose input arrives in fixed pieces and whose output is collected.
    struct Pipe {
        input: std::collections::VecDeque<Vec<u8>>,
        output: Vec<u8>,
    }
    impl Read for Pipe {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let Some(mut piece) = self.input.pop_front() else {
                return Ok(0);
            };
            let n = piece.len().min(buf.len());
            buf[..n].copy_from_slice(&piece[..n]);
            if n < piece.len() {
                self.input.push_front(piece.split_off(n));
            }
            Ok(n)
        }
    }
    impl Write for Pipe {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Serves `garbage` (one read) and then `requests` (one read each).
    fn serve_requests(requests: &[(u32, Request)], garbage: &[u8]) -> Vec<Message<Response>> {
        let mut input = std::collections::VecDeque::new();
        if !garbage.is_empty() {
            input.push_back(garbage.to_vec());
        }
        for (id, request) in requests {
            let mut bytes = Vec::new();
            session::encode_request(*id, request, &mut bytes).unwrap();
            input.push_back(bytes);
        }
        let mut pipe = Pipe {
            input,
            output: Vec::new(),
        };
        serve(&mut pipe, &Freezer::default()).unwrap();
        Decoder::<Response>::new().push(&pipe.output).unwrap()
    }

    #[test]
    fn ready_exec_with_stdin_ping_power_off() {
        let exec = Request::Exec {
            argv: vec!["sh".into(), "-c".into(), "cat; echo err >&2; exit 5".into()],
            stdin: b"from stdin\n".to_vec(),
        };
        let got = serve_requests(
            &[(7, exec), (8, Request::Ping), (9, Request::PowerOff)],
            &[],
        );
        assert!(matches!(
            &got[0],
            Message {
                id: 0,
                body: Response::Ready { .. }
            }
        ));
        let out: Vec<u8> = got
            .iter()
            .filter(|m| m.id == 7)
            .flat_map(|m| match &m.body {
                Response::Stdout(d) => d.clone(),
                _ => Vec::new(),
            })
            .collect();
        assert_eq!(out, b"from stdin\n");
        assert!(
            got.iter()
                .any(|m| m.id == 7 && m.body == Response::Stderr(b"err\n".to_vec()))
        );
        let exit = got
            .iter()
            .position(|m| m.body == Response::Exit(5))
            .unwrap();
        assert!(matches!(
            got[exit + 1],
            Message {
                id: 8,
                body: Response::Health(_)
            }
        ));
        assert_eq!(got.last().unwrap().body, Response::PowerOffAck);
    }

    #[test]
    fn copy_in_then_out_and_freeze_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("copied").to_str().unwrap().to_owned();
        let data: Vec<u8> = (0..150_000u32).map(|i| (i * 7) as u8).collect();
        let mut requests = vec![(
            4,
            Request::CopyInStart {
                path: path.clone(),
                mode: 0o640,
                size: data.len() as u64,
            },
        )];
        for chunk in data.chunks(session::MAX_CHUNK) {
            requests.push((4, Request::CopyInData(chunk.to_vec())));
        }
        requests.extend([
            (4, Request::CopyInEnd),
            (5, Request::CopyOut { path: path.clone() }),
            (6, Request::CopyInData(vec![1])),
            (
                7,
                Request::Freeze {
                    mount_points: vec!["/nonexistent/m".into()],
                    timeout_secs: 5,
                },
            ),
            (8, Request::Thaw),
            (9, Request::PowerOff),
        ]);
        let got = serve_requests(&requests, &[]);
        let of = |id| got.iter().filter(move |m| m.id == id).map(|m| &m.body);
        assert_eq!(of(4).collect::<Vec<_>>(), [&Response::Done(150_000)]);
        let out: Vec<_> = of(5).collect();
        assert_eq!(
            out[0],
            &Response::FileInfo {
                mode: 0o640,
                size: 150_000
            }
        );
        assert_eq!(crate::files::file_bytes(out.iter().copied()), data);
        assert_eq!(out.last(), Some(&&Response::Done(150_000)));
        assert!(matches!(of(6).next(), Some(Response::Error(e)) if e.contains("not started")));
        assert!(
            matches!(of(7).next(), Some(Response::Error(e)) if e.contains("cannot freeze /nonexistent/m"))
        );
        assert_eq!(of(8).next(), Some(&Response::Thawed(vec![])));
    }

    #[test]
    fn garbage_is_answered_and_serving_goes_on() {
        let got = serve_requests(&[(3, Request::PowerOff)], b"junk");
        assert!(
            matches!(&got[1], Message { id: 0, body: Response::Error(e) } if e.contains("magic"))
        );
        assert_eq!(
            got.last().unwrap(),
            &Message {
                id: 3,
                body: Response::PowerOffAck
            }
        );
    }

    #[test]
    fn hang_up_is_an_error() {
        let mut pipe = Pipe {
            input: Default::default(),
            output: Vec::new(),
        };
        assert!(matches!(
            serve(&mut pipe, &Freezer::default()),
            Err(ServeError::HungUp)
        ));
    }

    #[test]
    fn serve_flag_and_health_parsing() {
        assert!(requested("console=ttyS0 vhpc.agent=serve quiet\n"));
        assert!(!requested("console=ttyS0 vhpc.agent=servex"));
        let h = parse_health(
            "12.34 5.00\n",
            "0.50 1.25 2.00 1/80 99\n",
            "MemTotal:        1000 kB\nMemFree: 5 kB\nMemAvailable:     600 kB\n",
        );
        assert_eq!(h.uptime_ms, 12_340);
        assert_eq!(h.load_milli, [500, 1250, 2000]);
        assert_eq!((h.mem_total_kib, h.mem_available_kib), (1000, 600));
        assert_eq!(parse_health("", "x", ""), Health::default());
    }
}
