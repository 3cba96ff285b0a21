//! One stream connection between a guest port and a host Unix socket, with virtio-vsock's
//! credit-based flow control in both directions:
//!
//! - guest → host: we advertise [`BUF_ALLOC`] bytes of buffer and count in `fwd_cnt` what we
//!   have written into the Unix socket; what the socket does not take at once waits in
//!   `to_socket`, which the guest can never overfill without breaking the protocol (it may
//!   have at most `BUF_ALLOC - (its tx count - our fwd_cnt)` bytes in flight);
//! - host → guest: the guest advertises its `buf_alloc`/`fwd_cnt` in every packet; we send at
//!   most that much more than it has consumed ([`Connection::peer_credit`]) and ask for an
//!   update (CREDIT_REQUEST) when we have data but no credit.

use std::io::{self, Read, Write};
use std::num::Wrapping;
use std::os::unix::net::UnixStream;

/// Receive buffer we advertise to the guest per connection.
pub const BUF_ALLOC: u32 = 256 << 10;
/// We tell the guest about freed buffer space once this much was forwarded since the last
/// time it heard our `fwd_cnt`.
const CREDIT_UPDATE_THRESHOLD: u32 = BUF_ALLOC / 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnState {
    /// Host-initiated: REQUEST sent, waiting for the guest's RESPONSE.
    Connecting,
    Established,
}

/// Why a connection must be reset.
#[derive(Debug, PartialEq, Eq)]
pub enum ConnFault {
    /// The guest sent more than the credit we gave it.
    CreditExceeded,
    /// The Unix socket is gone (EPIPE, ECONNRESET, ...).
    SocketGone,
}

pub struct Connection {
    pub stream: UnixStream,
    pub state: ConnState,
    /// The epoll token of `stream`.
    pub token: u64,
    // guest → host
    pub fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    to_socket: Vec<u8>,
    /// A line for the host client, written before any guest data; not counted in `fwd_cnt`.
    line: Vec<u8>,
    /// The guest will send no more (SHUTDOWN with SEND): once `to_socket` is empty the Unix
    /// socket's write side is shut.
    pub guest_done_sending: bool,
    /// The guest will receive no more.
    pub guest_done_receiving: bool,
    // host → guest
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    rx_cnt: Wrapping<u32>,
    pub credit_requested: bool,
    /// The socket's read side reached end of file.
    pub socket_eof: bool,
    /// Bytes read from the socket before the connection was established (after the
    /// CONNECT line), sent first.
    pub initial: Vec<u8>,
}

impl Connection {
    pub fn new(stream: UnixStream, state: ConnState, token: u64) -> Connection {
        Connection {
            stream,
            state,
            token,
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            to_socket: Vec::new(),
            line: Vec::new(),
            guest_done_sending: false,
            guest_done_receiving: false,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            credit_requested: false,
            socket_eof: false,
            initial: Vec::new(),
        }
    }

    /// Takes the guest's view of its receive buffer from any packet it sent.
    pub fn update_peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = Wrapping(fwd_cnt);
        if self.peer_credit() > 0 {
            self.credit_requested = false;
        }
    }

    /// How many more bytes the guest can take now. A guest reporting nonsense (more
    /// consumed than we sent) gets no credit rather than a huge one.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Whether we may read the socket and send its bytes to the guest.
    pub fn can_send_to_guest(&self) -> bool {
        self.state == ConnState::Established && !self.socket_eof && !self.guest_done_receiving
    }

    /// Counts `n` bytes sent to the guest.
    pub fn sent_to_guest(&mut self, n: u32) {
        self.rx_cnt += Wrapping(n);
    }

    /// Reads at most `buf.len()` bytes for the guest: pending initial bytes first, then the
    /// socket. `Ok(0)` is end of file.
    pub fn read_for_guest(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.initial.is_empty() {
            let n = self.initial.len().min(buf.len());
            buf[..n].copy_from_slice(&self.initial[..n]);
            self.initial.drain(..n);
            return Ok(n);
        }
        self.stream.read(buf)
    }

    /// Passes guest data on to the socket, keeping what it does not take now.
    pub fn write_from_guest(&mut self, data: &[u8]) -> Result<(), ConnFault> {
        let outstanding = self.to_socket.len() + data.len();
        if outstanding > BUF_ALLOC as usize {
            return Err(ConnFault::CreditExceeded);
        }
        self.to_socket.extend_from_slice(data);
        self.flush_to_socket()
    }

    /// Writes what is waiting for the socket (a line for the host client first, then guest
    /// data); stops when the socket is full.
    pub fn flush_to_socket(&mut self) -> Result<(), ConnFault> {
        write_some(&mut self.stream, &mut self.line)?;
        if self.line.is_empty() {
            let before = self.to_socket.len();
            let result = write_some(&mut self.stream, &mut self.to_socket);
            self.fwd_cnt += Wrapping((before - self.to_socket.len()) as u32);
            result?;
        }
        if self.guest_done_sending && self.line.is_empty() && self.to_socket.is_empty() {
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        Ok(())
    }

    /// Puts a text line for the host client (`OK <port>`) ahead of all guest data.
    pub fn queue_line(&mut self, line: &str) -> Result<(), ConnFault> {
        self.line.extend_from_slice(line.as_bytes());
        self.flush_to_socket()
    }

    /// Whether the guest should hear about freed buffer space now.
    pub fn wants_credit_update(&self) -> bool {
        (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD
    }

    /// The `fwd_cnt` to put into a packet to the guest (remembered as told).
    pub fn fwd_cnt_for_packet(&mut self) -> u32 {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.fwd_cnt.0
    }

    /// Bytes from the guest waiting for the socket.
    pub fn pending_to_socket(&self) -> usize {
        self.to_socket.len() + self.line.len()
    }
}

/// Writes the front of `buf` into `stream` until it is empty or the socket is full; removes
/// what was written.
fn write_some(stream: &mut UnixStream, buf: &mut Vec<u8>) -> Result<(), ConnFault> {
    let mut written = 0;
    let result = loop {
        if written == buf.len() {
            break Ok(());
        }
        match stream.write(&buf[written..]) {
            Ok(0) => break Err(ConnFault::SocketGone),
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(()),
            Err(_) => break Err(ConnFault::SocketGone),
        }
    };
    buf.drain(..written);
    result
}
