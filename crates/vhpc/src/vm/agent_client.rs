//! The VMM process's end of the long-running guest agent's session, over virtio-vsock: a
//! connector thread connects to the VM's vsock socket, writes `CONNECT 1024\n` (the agent's
//! port), and once the guest accepted (`OK <port>`) reads responses into an [`AgentSink`],
//! which decodes them and routes them by request id. Requests are written to the same
//! connection. When the connection ends (the guest agent restarted its session, a corrupt
//! stream) the thread connects again and waits for the agent's next Ready.
//!
//! Requests are sent one at a time (the agent serves them sequentially): a second exec waits
//! for the first to end. Responses that match no waiting request (one whose client gave up)
//! are dropped.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use thiserror::Error;
use vhpc_guest::protocol::AGENT_VSOCK_PORT;
use vhpc_guest::protocol::session::{self, Decoder, Request, Response};

/// How long a request may take to go out before the connection counts as stuck.
const SEND_STALL: Duration = Duration::from_secs(10);
/// Pause between connection attempts while the guest agent is not listening yet (boot).
const RECONNECT_DELAY: Duration = Duration::from_millis(100);

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum AgentError {
    #[error("the guest agent has not answered yet; the VM is still booting (see console.log)")]
    NotReady,
    #[error("the guest agent's stream is corrupt ({0}); stop the VM (`vhpc vm stop`)")]
    Broken(String),
    #[error("the guest agent did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the guest agent is busy with another request; try again when it has finished")]
    Busy,
    #[error("cannot send to the guest agent: {0}")]
    Send(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("{0}")]
    Local(String),
}

#[derive(Default)]
struct State {
    agent_version: Option<String>,
    broken: Option<String>,
    /// The request waiting for responses, and where they go.
    waiter: Option<(u32, Sender<Response>)>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Decodes the agent's responses and routes them; fed by the connector thread.
pub struct AgentSink {
    decoder: Decoder<Response>,
    shared: Arc<Shared>,
}

impl AgentSink {
    /// A fresh decoder and a clean slate for a new session.
    fn reset(&mut self) {
        self.decoder = Decoder::new();
        let mut state = self.shared.lock();
        state.broken = None;
        state.agent_version = None;
    }

    /// Decodes what `conn` delivers until it ends or the stream turns out corrupt.
    fn read_from(&mut self, mut conn: UnixStream) {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match conn.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    let _ = self.write(&buf[..n]);
                    if self.shared.lock().broken.is_some() {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("reading from the guest agent failed: {e}");
                    return;
                }
            }
        }
    }
}

/// Connects to guest port `port` through the VM's vsock socket: `CONNECT`, then `OK` once
/// the guest accepted. A guest that is not listening closes the connection instead.
pub fn connect(socket: &Path, port: u32) -> io::Result<UnixStream> {
    let mut stream = UnixStream::connect(socket)?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
    let mut line = Vec::new();
    let mut byte = [0u8];
    // Byte by byte: whatever follows the line is the guest's and must stay in the socket.
    while line.len() < 64 {
        match stream.read(&mut byte)? {
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!("nothing listens on guest vsock port {port}"),
                ));
            }
            _ if byte[0] == b'\n' => break,
            _ => line.push(byte[0]),
        }
    }
    let line = String::from_utf8_lossy(&line);
    if line.starts_with("OK ") {
        Ok(stream)
    } else {
        Err(io::Error::other(format!(
            "the vsock socket answered {line:?} to CONNECT {port}"
        )))
    }
}

impl Write for AgentSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let result = self.decoder.push(buf);
        let mut state = self.shared.lock();
        if state.broken.is_some() {
            return Ok(buf.len());
        }
        match result {
            Ok(messages) => {
                for m in messages {
                    match (m.body, &state.waiter) {
                        (Response::Ready { agent_version }, _) if m.id == 0 => {
                            log::info!("guest agent {agent_version} is ready");
                            state.agent_version = Some(agent_version);
                        }
                        (body, Some((id, tx))) if *id == m.id => {
                            let _ = tx.send(body);
                        }
                        (body, _) => log::debug!("dropping agent response {}: {body:?}", m.id),
                    }
                }
            }
            Err(e) => {
                // The guest is untrusted: a corrupt stream ends the session, never the VMM
                // (the connector then starts a new one).
                log::error!("the guest agent's stream is corrupt: {e}");
                state.broken = Some(e.to_string());
                state.waiter = None;
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Sends requests to the guest agent and collects their responses.
pub struct AgentClient {
    shared: Arc<Shared>,
    /// The connection requests are written to, while there is one.
    conn: Mutex<Option<UnixStream>>,
    /// Held for the whole of a request: the agent serves one at a time.
    busy: Mutex<()>,
    next_id: AtomicU32,
}

/// A client and the sink to give the VM as its agent channel output.
pub fn channel_pair() -> (AgentClient, AgentSink) {
    let shared = Arc::new(Shared::default());
    let sink = AgentSink {
        decoder: Decoder::new(),
        shared: shared.clone(),
    };
    let client = AgentClient {
        shared,
        conn: Mutex::new(None),
        busy: Mutex::new(()),
        next_id: AtomicU32::new(1),
    };
    (client, sink)
}

impl AgentClient {
    /// Starts the thread that keeps a session with the agent through the VM's vsock
    /// socket `socket`, for as long as the process lives.
    pub fn connect_in_background(
        self: &Arc<Self>,
        sink: AgentSink,
        socket: PathBuf,
    ) -> io::Result<()> {
        let client = self.clone();
        std::thread::Builder::new()
            .name("agent-conn".into())
            .spawn(move || client.keep_connected(sink, &socket))
            .map(|_| ())
    }

    fn keep_connected(&self, mut sink: AgentSink, socket: &Path) {
        let mut logged = false;
        loop {
            let stream = match connect(socket, AGENT_VSOCK_PORT) {
                Ok(s) => s,
                Err(e) => {
                    if !logged {
                        log::debug!("guest agent not reachable yet: {e}");
                        logged = true;
                    }
                    std::thread::sleep(RECONNECT_DELAY);
                    continue;
                }
            };
            logged = false;
            log::debug!("connected to the guest agent's vsock port");
            let reader = match stream.try_clone() {
                Ok(r) => r,
                Err(e) => {
                    log::warn!("cannot use the agent connection: {e}");
                    std::thread::sleep(RECONNECT_DELAY);
                    continue;
                }
            };
            sink.reset();
            *self.lock_conn() = Some(stream);
            sink.read_from(reader);
            // The session ended: forget it, fail the waiting request, connect again.
            if let Some(s) = self.lock_conn().take() {
                let _ = s.shutdown(Shutdown::Both);
            }
            let mut state = self.shared.lock();
            state.agent_version = None;
            state.waiter = None;
            drop(state);
            log::info!("the guest agent's session ended; reconnecting");
        }
    }

    fn lock_conn(&self) -> MutexGuard<'_, Option<UnixStream>> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ends the current session (after a power-off acknowledgement: the guest waits for it).
    pub fn disconnect(&self) {
        if let Some(s) = self.lock_conn().as_ref() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// The agent's version once it has announced itself.
    pub fn agent_version(&self) -> Option<String> {
        self.shared.lock().agent_version.clone()
    }

    /// Sends `request` and hands every response to `on_response` until it returns `false`
    /// (the request's last response). `wait` bounds getting the agent's attention (the wait
    /// for an earlier request) and each response; `None` waits as long as it takes.
    pub fn request(
        &self,
        request: &Request,
        wait: Option<Duration>,
        on_response: &mut dyn FnMut(Response) -> bool,
    ) -> Result<(), AgentError> {
        self.request_frames(&mut std::iter::once(Ok(request.clone())), wait, on_response)
    }

    /// Waits (at most `wait`) until no request is in progress and keeps it so while the
    /// guard lives: the agent is idle, and nothing is half sent in either direction.
    pub fn hold_idle(&self, wait: Duration) -> Result<MutexGuard<'_, ()>, AgentError> {
        self.acquire(Some(wait))
    }

    /// Like [`Self::request`] for a request made of several frames with one id (a copy-in:
    /// start, data..., end), produced one at a time so a large file is never in memory.
    pub fn request_frames(
        &self,
        frames: &mut dyn Iterator<Item = Result<Request, AgentError>>,
        wait: Option<Duration>,
        on_response: &mut dyn FnMut(Response) -> bool,
    ) -> Result<(), AgentError> {
        let _busy = self.acquire(wait)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed).max(1);
        let rx = self.register(id)?;
        let result = self
            .send(id, frames)
            .and_then(|()| self.collect(&rx, wait, on_response));
        self.shared.lock().waiter = None;
        result
    }

    fn acquire(&self, wait: Option<Duration>) -> Result<MutexGuard<'_, ()>, AgentError> {
        let Some(wait) = wait else {
            return Ok(self.busy.lock().unwrap_or_else(|p| p.into_inner()));
        };
        let deadline = Instant::now() + wait;
        loop {
            match self.busy.try_lock() {
                Ok(guard) => return Ok(guard),
                Err(std::sync::TryLockError::Poisoned(p)) => return Ok(p.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) if Instant::now() >= deadline => {
                    return Err(AgentError::Busy);
                }
                Err(std::sync::TryLockError::WouldBlock) => {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    fn register(&self, id: u32) -> Result<Receiver<Response>, AgentError> {
        let mut state = self.shared.lock();
        if let Some(e) = &state.broken {
            return Err(AgentError::Broken(e.clone()));
        }
        if state.agent_version.is_none() {
            return Err(AgentError::NotReady);
        }
        let (tx, rx) = channel();
        state.waiter = Some((id, tx));
        Ok(rx)
    }

    fn send(
        &self,
        id: u32,
        frames: &mut dyn Iterator<Item = Result<Request, AgentError>>,
    ) -> Result<(), AgentError> {
        let mut conn = self
            .lock_conn()
            .as_ref()
            .map(UnixStream::try_clone)
            .transpose()
            .map_err(|e| AgentError::Send(e.to_string()))?
            .ok_or(AgentError::NotReady)?;
        conn.set_write_timeout(Some(SEND_STALL))
            .map_err(|e| AgentError::Send(e.to_string()))?;
        let mut bytes = Vec::new();
        for frame in frames {
            bytes.clear();
            session::encode_request(id, &frame?, &mut bytes)
                .map_err(|e| AgentError::Invalid(e.to_string()))?;
            conn.write_all(&bytes)
                .map_err(|e| AgentError::Send(e.to_string()))?;
        }
        Ok(())
    }

    fn collect(
        &self,
        rx: &Receiver<Response>,
        wait: Option<Duration>,
        on_response: &mut dyn FnMut(Response) -> bool,
    ) -> Result<(), AgentError> {
        loop {
            let response = match wait {
                Some(t) => rx.recv_timeout(t).map_err(|e| match e {
                    RecvTimeoutError::Timeout => AgentError::Timeout(t),
                    RecvTimeoutError::Disconnected => self.broken_error(),
                })?,
                None => rx.recv().map_err(|_| self.broken_error())?,
            };
            if !on_response(response) {
                return Ok(());
            }
        }
    }

    fn broken_error(&self) -> AgentError {
        AgentError::Broken(
            self.shared
                .lock()
                .broken
                .clone()
                .unwrap_or_else(|| "the channel closed".into()),
        )
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    fn frames(responses: &[(u32, Response)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (id, r) in responses {
            session::encode_response(*id, r, &mut out);
        }
        out
    }

    #[test]
    fn ready_is_recorded_and_stray_responses_are_dropped() {
        let (client, mut sink) = channel_pair();
        assert_eq!(client.agent_version(), None);
        let ready = Response::Ready {
            agent_version: "9.9".into(),
        };
        sink.write_all(&frames(&[(5, Response::Exit(0)), (0, ready)]))
            .unwrap();
        assert_eq!(client.agent_version().as_deref(), Some("9.9"));
    }

    #[test]
    fn requests_before_ready_or_after_corruption_fail_clearly() {
        let (client, mut sink) = channel_pair();
        let err = client
            .request(&Request::Ping, Some(Duration::from_secs(1)), &mut |_| false)
            .unwrap_err();
        assert_eq!(err, AgentError::NotReady);
        sink.write_all(b"garbage").unwrap();
        let err = client
            .request(&Request::Ping, Some(Duration::from_secs(1)), &mut |_| false)
            .unwrap_err();
        assert!(
            matches!(&err, AgentError::Broken(m) if m.contains("magic")),
            "{err}"
        );
    }

    /// A fake VM vsock socket with the agent behind it: answers the CONNECT line with OK,
    /// says Ready, then answers each request with a stale response (an earlier id) first,
    /// then the real ones. The first session is cut after one request (the client must
    /// reconnect); the second serves `requests` more.
    fn fake_vm(
        listener: std::os::unix::net::UnixListener,
        requests: usize,
    ) -> std::thread::JoinHandle<Vec<Request>> {
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            for session in 0..2 {
                let (mut conn, _) = listener.accept().unwrap();
                let mut line = [0u8; 13];
                conn.read_exact(&mut line).unwrap();
                assert_eq!(&line, b"CONNECT 1024\n");
                conn.write_all(b"OK 1073741824\n").unwrap();
                let ready = Response::Ready {
                    agent_version: format!("v{session}"),
                };
                conn.write_all(&frames(&[(0, ready)])).unwrap();
                let mut decoder = Decoder::<Request>::new();
                let mut served = 0;
                let limit = if session == 0 { 1 } else { requests };
                let mut buf = [0u8; 4096];
                while served < limit {
                    let n = conn.read(&mut buf).unwrap();
                    assert!(n > 0, "the client hung up");
                    for m in decoder.push(&buf[..n]).unwrap() {
                        let replies = match &m.body {
                            Request::Exec { argv, stdin } => vec![
                                (m.id - 1, Response::Stdout(b"stale".to_vec())),
                                (m.id, Response::Stdout(argv.join(" ").into_bytes())),
                                (m.id, Response::Stdout(stdin.clone())),
                                (m.id, Response::Exit(7)),
                            ],
                            _ => vec![(m.id, Response::Health(session::Health::default()))],
                        };
                        conn.write_all(&frames(&replies)).unwrap();
                        seen.push(m.body);
                        served += 1;
                    }
                }
            }
            seen
        })
    }

    fn wait_ready(client: &AgentClient, version: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while client.agent_version().as_deref() != Some(version) {
            assert!(
                Instant::now() < deadline,
                "agent {version} never became ready"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn requests_travel_over_the_vsock_socket_and_the_client_reconnects() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let vm = fake_vm(listener, 2);
        let (client, sink) = channel_pair();
        let client = Arc::new(client);
        client.connect_in_background(sink, path).unwrap();
        wait_ready(&client, "v0");
        let ping = |client: &AgentClient| {
            let mut health = None;
            client
                .request(&Request::Ping, Some(Duration::from_secs(10)), &mut |r| {
                    health = Some(r);
                    false
                })
                .map(|()| health)
        };
        assert!(matches!(ping(&client), Ok(Some(Response::Health(_)))));
        // The fake agent ends its first session: the client connects again.
        wait_ready(&client, "v1");
        let exec = Request::Exec {
            argv: vec!["echo".into(), "x".into()],
            stdin: vec![b'i'; 300],
        };
        let mut got = Vec::new();
        client
            .request(&exec, Some(Duration::from_secs(10)), &mut |r| {
                let last = matches!(r, Response::Exit(_));
                got.push(r);
                !last
            })
            .unwrap();
        assert_eq!(
            got,
            vec![
                Response::Stdout(b"echo x".to_vec()),
                Response::Stdout(vec![b'i'; 300]),
                Response::Exit(7)
            ]
        );
        assert!(matches!(ping(&client), Ok(Some(Response::Health(_)))));
        assert_eq!(vm.join().unwrap(), vec![Request::Ping, exec, Request::Ping]);
    }

    #[test]
    fn connect_reports_a_guest_that_does_not_listen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let vm = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut line = [0u8; 13];
            conn.read_exact(&mut line).unwrap();
            // The guest answered RST: the VMM closes the client's connection.
        });
        let err = connect(&path, 5000).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
        assert!(err.to_string().contains("port 5000"), "{err}");
        vm.join().unwrap();
    }
}
