//! The VMM process's end of the long-running guest agent's session: requests go into the
//! agent channel through [`AgentInput`], responses come back through [`AgentSink`] (the
//! `Write` the agent serial port's output is given to) and are routed by request id.
//!
//! Requests are sent one at a time (the agent serves them sequentially): a second exec waits
//! for the first to end. Responses that match no waiting request (one whose client gave up)
//! are dropped.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use thiserror::Error;
use vhpc_guest::protocol::session::{self, Decoder, Request, Response};
use vhpc_vmm::agent_input::AgentInput;

/// How long the guest may take to read a request from the channel before it counts as stuck.
const INPUT_STALL: Duration = Duration::from_secs(10);

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

/// The `Write` for the agent serial port's output: decodes and routes responses. It runs on
/// a vCPU thread and never blocks.
pub struct AgentSink {
    decoder: Decoder<Response>,
    shared: Arc<Shared>,
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
                // The guest is untrusted: a corrupt stream ends the session, never the VMM.
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
    input: Mutex<Option<AgentInput>>,
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
        input: Mutex::new(None),
        busy: Mutex::new(()),
        next_id: AtomicU32::new(1),
    };
    (client, sink)
}

impl AgentClient {
    /// Where requests go (known once the VM exists).
    pub fn set_input(&self, input: AgentInput) {
        *self.input.lock().unwrap_or_else(|p| p.into_inner()) = Some(input);
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
        let _busy = self.acquire(wait)?;
        self.request_held(request, wait, on_response, true)
    }

    /// Waits (at most `wait`) until no request is in progress and keeps it so while the
    /// guard lives: the agent is idle, and nothing is half sent in either direction.
    pub fn hold_idle(&self, wait: Duration) -> Result<MutexGuard<'_, ()>, AgentError> {
        self.acquire(Some(wait))
    }

    /// Pings an agent that announced itself before this process existed (a VM restored
    /// from a checkpoint): when it answers, the session counts as established with
    /// `agent_version`, as a Ready frame would have made it.
    pub fn ping_resumed(&self, agent_version: String, wait: Duration) -> Result<(), AgentError> {
        let _busy = self.acquire(Some(wait))?;
        let mut answered = false;
        self.request_held(
            &Request::Ping,
            Some(wait),
            &mut |r| {
                answered = matches!(r, Response::Health(_));
                false
            },
            false,
        )?;
        if !answered {
            return Err(AgentError::Broken(
                "the agent did not answer the ping with its health".into(),
            ));
        }
        self.shared.lock().agent_version = Some(agent_version);
        Ok(())
    }

    fn request_held(
        &self,
        request: &Request,
        wait: Option<Duration>,
        on_response: &mut dyn FnMut(Response) -> bool,
        require_ready: bool,
    ) -> Result<(), AgentError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed).max(1);
        let mut bytes = Vec::new();
        session::encode_request(id, request, &mut bytes)
            .map_err(|e| AgentError::Invalid(e.to_string()))?;
        let rx = self.register(id, require_ready)?;
        let result = self.send_and_collect(&bytes, &rx, wait, on_response);
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

    fn register(&self, id: u32, require_ready: bool) -> Result<Receiver<Response>, AgentError> {
        let mut state = self.shared.lock();
        if let Some(e) = &state.broken {
            return Err(AgentError::Broken(e.clone()));
        }
        if require_ready && state.agent_version.is_none() {
            return Err(AgentError::NotReady);
        }
        let (tx, rx) = channel();
        state.waiter = Some((id, tx));
        Ok(rx)
    }

    fn send_and_collect(
        &self,
        bytes: &[u8],
        rx: &Receiver<Response>,
        wait: Option<Duration>,
        on_response: &mut dyn FnMut(Response) -> bool,
    ) -> Result<(), AgentError> {
        let input = self
            .input
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(AgentError::NotReady)?;
        input
            .write_all(bytes, INPUT_STALL)
            .map_err(|e| AgentError::Send(e.to_string()))?;
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

    /// A guest on the other side of a real 16550: reads requests from its receive FIFO,
    /// answers each with a stale response (an earlier id) first, then the real ones.
    fn fake_guest(
        port: Arc<Mutex<vhpc_devices::serial::SerialPort>>,
        sink: Arc<Mutex<AgentSink>>,
        requests: usize,
    ) -> std::thread::JoinHandle<Vec<Request>> {
        use vhpc_devices::PioDevice;
        std::thread::spawn(move || {
            let mut decoder = Decoder::<Request>::new();
            let mut seen = Vec::new();
            while seen.len() < requests {
                let mut lsr = [0u8];
                port.lock().unwrap().read(5, &mut lsr);
                if lsr[0] & 1 == 0 {
                    std::thread::yield_now();
                    continue;
                }
                let mut byte = [0u8];
                port.lock().unwrap().read(0, &mut byte);
                for m in decoder.push(&byte).unwrap() {
                    let replies = match &m.body {
                        Request::Exec { argv, stdin } => vec![
                            (m.id - 1, Response::Stdout(b"stale".to_vec())),
                            (m.id, Response::Stdout(argv.join(" ").into_bytes())),
                            (m.id, Response::Stdout(stdin.clone())),
                            (m.id, Response::Exit(7)),
                        ],
                        _ => vec![(m.id, Response::Health(session::Health::default()))],
                    };
                    sink.lock().unwrap().write_all(&frames(&replies)).unwrap();
                    seen.push(m.body);
                }
            }
            seen
        })
    }

    #[test]
    fn requests_travel_through_the_serial_port_and_responses_route_by_id() {
        let port = Arc::new(Mutex::new(
            vhpc_devices::serial::SerialPort::new(Box::new(io::sink())).unwrap(),
        ));
        let (client, sink) = channel_pair();
        client.set_input(AgentInput::new(port.clone()));
        let sink = Arc::new(Mutex::new(sink));
        let ready = Response::Ready {
            agent_version: "1".into(),
        };
        sink.lock()
            .unwrap()
            .write_all(&frames(&[(0, ready)]))
            .unwrap();
        let guest = fake_guest(port, sink, 2);
        let exec = Request::Exec {
            argv: vec!["echo".into(), "x".into()],
            stdin: vec![b'i'; 300], // several FIFOs' worth
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
        let mut health = None;
        client
            .request(&Request::Ping, Some(Duration::from_secs(10)), &mut |r| {
                health = Some(r);
                false
            })
            .unwrap();
        assert!(matches!(health, Some(Response::Health(_))));
        assert_eq!(guest.join().unwrap(), vec![exec, Request::Ping]);
    }
}
