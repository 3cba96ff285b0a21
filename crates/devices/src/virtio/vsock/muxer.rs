//! The host end of virtio-vsock: maps guest stream connections to Unix sockets.
//!
//! - Host-initiated: a client connects to the device's listening socket (`vsock.sock`),
//!   writes `CONNECT <port>\n`, and once the guest accepted gets `OK <host port>\n`; then the
//!   stream carries raw bytes both ways.
//! - Guest-initiated: a guest connection to host port P is connected to the Unix socket
//!   `<listening socket path>_P`; no such socket (or a refused connect) means RST.
//!
//! Everything is non-blocking and edge-triggered on the muxer's own epoll, whose fd the
//! device worker waits on: a socket's readiness is remembered (`readable`) until a read says
//! WouldBlock, so a connection whose guest has no buffer or credit left is simply not read,
//! and nothing spins. Packets for the guest wait in `control` (bounded: when it is full the
//! device stops taking packets from the guest until the guest gives receive buffers).

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::connection::{BUF_ALLOC, ConnState, Connection};
use super::packet::*;

/// Most connections at once; more are refused (RST to the guest, an error line to clients).
pub const MAX_CONNECTIONS: usize = 1024;
/// Host clients that connected but have not sent their CONNECT line yet.
const MAX_PENDING_CLIENTS: usize = 64;
/// Longest CONNECT line.
const MAX_CONNECT_LINE: usize = 32;
/// Control packets waiting for the guest beyond which guest packets are not taken.
const CONTROL_HIGH_WATER: usize = 256;
/// Host ports of host-initiated connections are taken from here up.
pub const FIRST_LOCAL_PORT: u32 = 1 << 30;
const LISTENER_TOKEN: u64 = 0;

/// A connection: (host port, guest port).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct ConnKey {
    pub local_port: u32,
    pub peer_port: u32,
}

/// A client of the listening socket that has not sent its CONNECT line yet.
struct PendingClient {
    stream: UnixStream,
    line: Vec<u8>,
}

enum Slot {
    Pending(PendingClient),
    Conn(ConnKey),
}

pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    next_token: u64,
    slots: HashMap<u64, Slot>,
    conns: HashMap<ConnKey, Connection>,
    /// Packets for the guest without payload, credit fields filled at delivery.
    control: VecDeque<Header>,
    /// Connections whose socket may have bytes for the guest.
    readable: VecDeque<ConnKey>,
    readable_set: HashSet<ConnKey>,
    /// Shared with the device, which saves it in checkpoints: a restored VM's new host
    /// connections never reuse the host port of one its guest may still hold.
    next_local_port: Arc<AtomicU32>,
    warned: bool,
}

impl Muxer {
    /// A muxer for guest `guest_cid` serving `listener` (bound at `uds_path`).
    pub fn new(guest_cid: u64, uds_path: &Path, listener: UnixListener) -> io::Result<Muxer> {
        listener.set_nonblocking(true)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, LISTENER_TOKEN),
        )?;
        Ok(Muxer {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            epoll,
            next_token: 1,
            slots: HashMap::new(),
            conns: HashMap::new(),
            control: VecDeque::new(),
            readable: VecDeque::new(),
            readable_set: HashSet::new(),
            next_local_port: Arc::new(AtomicU32::new(FIRST_LOCAL_PORT)),
            warned: false,
        })
    }

    /// Takes host ports for host-initiated connections from `counter` (which the caller keeps
    /// to save) instead of a counter of its own.
    pub fn with_port_counter(mut self, counter: Arc<AtomicU32>) -> Muxer {
        if counter.load(Ordering::Relaxed) < FIRST_LOCAL_PORT {
            counter.store(FIRST_LOCAL_PORT, Ordering::Relaxed);
        }
        self.next_local_port = counter;
        self
    }

    /// The fd the device worker waits on: readable when a socket needs attention.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Whether the device should stop taking packets from the guest for now.
    pub fn tx_blocked(&self) -> bool {
        self.control.len() >= CONTROL_HIGH_WATER
    }

    /// Open connections (for tests and logs).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Handles every socket event that is ready, without blocking.
    pub fn handle_socket_events(&mut self) {
        let mut events = vec![EpollEvent::default(); 32];
        loop {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("virtio-vsock: epoll_wait failed: {e}");
                    return;
                }
            };
            for event in &events[..n] {
                self.handle_event(event.data(), event.event_set());
            }
            if n < events.len() {
                return;
            }
        }
    }

    fn handle_event(&mut self, token: u64, set: EventSet) {
        if token == LISTENER_TOKEN {
            self.accept_clients();
            return;
        }
        match self.slots.get(&token) {
            Some(Slot::Pending(_)) => self.read_connect_line(token),
            Some(Slot::Conn(key)) => {
                let key = *key;
                if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP) {
                    self.mark_readable(key);
                }
                if set.intersects(EventSet::OUT | EventSet::ERROR)
                    && let Some(conn) = self.conns.get_mut(&key)
                {
                    match conn.flush_to_socket() {
                        Ok(()) => {
                            // What the socket took now frees the guest's credit: a guest that
                            // used it all waits for this update and asks for nothing.
                            if conn.wants_credit_update() {
                                self.push_control(key, OP_CREDIT_UPDATE, 0);
                            }
                            self.close_if_done(key);
                        }
                        Err(fault) => self.reset(key, &format!("{fault:?}")),
                    }
                }
            }
            None => {}
        }
    }

    fn register(&mut self, fd: RawFd, slot: Slot) -> io::Result<u64> {
        let token = self.next_token;
        self.next_token += 1;
        let set = EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(set, token))?;
        self.slots.insert(token, slot);
        Ok(token)
    }

    fn unregister(&mut self, token: u64, fd: RawFd) {
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        self.slots.remove(&token);
    }

    fn accept_clients(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::warn!(
                        "virtio-vsock: cannot accept on {}: {e}",
                        self.uds_path.display()
                    );
                    return;
                }
            };
            let pending = self
                .slots
                .values()
                .filter(|s| matches!(s, Slot::Pending(_)))
                .count();
            if pending >= MAX_PENDING_CLIENTS {
                refuse(
                    stream,
                    "too many clients waiting to send CONNECT; try again",
                );
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let fd = stream.as_raw_fd();
            let client = PendingClient {
                stream,
                line: Vec::new(),
            };
            match self.register(fd, Slot::Pending(client)) {
                // Its line may be there already: an edge from before registering is not seen.
                Ok(token) => self.read_connect_line(token),
                Err(e) => log::warn!("virtio-vsock: cannot watch a new client: {e}"),
            }
        }
    }

    /// Reads a pending client's `CONNECT <port>\n`; once complete, asks the guest.
    fn read_connect_line(&mut self, token: u64) {
        let Some(Slot::Pending(client)) = self.slots.get_mut(&token) else {
            return;
        };
        let mut buf = [0u8; 64];
        let outcome = loop {
            match client.stream.read(&mut buf) {
                Ok(0) => break Err("the client closed before sending CONNECT <port>".to_owned()),
                Ok(n) => {
                    client.line.extend_from_slice(&buf[..n]);
                    if client.line.contains(&b'\n') {
                        break Ok(());
                    }
                    if client.line.len() > MAX_CONNECT_LINE {
                        break Err("expected `CONNECT <port>\\n` as the first line".to_owned());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => break Err(format!("read failed: {e}")),
            }
        };
        let Some(Slot::Pending(client)) = self.slots.remove(&token) else {
            return;
        };
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            client.stream.as_raw_fd(),
            EpollEvent::default(),
        );
        match outcome.and_then(|()| parse_connect_line(&client.line)) {
            Ok((port, rest)) => self.connect_to_guest(client.stream, port, rest),
            Err(reason) => refuse(client.stream, &reason),
        }
    }

    fn connect_to_guest(&mut self, stream: UnixStream, peer_port: u32, initial: Vec<u8>) {
        if self.conns.len() >= MAX_CONNECTIONS {
            refuse(stream, "too many vsock connections; close some");
            return;
        }
        let local_port = self.free_local_port(peer_port);
        let key = ConnKey {
            local_port,
            peer_port,
        };
        let fd = stream.as_raw_fd();
        let token = match self.register(fd, Slot::Conn(key)) {
            Ok(t) => t,
            Err(e) => {
                refuse(stream, &format!("cannot watch the connection: {e}"));
                return;
            }
        };
        let mut conn = Connection::new(stream, ConnState::Connecting, token);
        conn.initial = initial;
        self.conns.insert(key, conn);
        self.mark_readable(key);
        self.push_control(key, OP_REQUEST, 0);
    }

    fn free_local_port(&mut self, peer_port: u32) -> u32 {
        loop {
            let port = self.next_local_port.load(Ordering::Relaxed);
            self.next_local_port.store(
                port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT),
                Ordering::Relaxed,
            );
            let key = ConnKey {
                local_port: port,
                peer_port,
            };
            if !self.conns.contains_key(&key) {
                return port;
            }
        }
    }

    fn push_control(&mut self, key: ConnKey, op: u16, flags: u32) {
        let mut h = Header::to_guest(self.guest_cid, key.local_port, key.peer_port, op);
        h.flags = flags;
        self.control.push_back(h);
    }

    fn mark_readable(&mut self, key: ConnKey) {
        if self.readable_set.insert(key) {
            self.readable.push_back(key);
        }
    }

    /// Drops connection `key` and tells the guest (RST).
    fn reset(&mut self, key: ConnKey, why: &str) {
        log::debug!("virtio-vsock: reset {key:?}: {why}");
        self.close(key);
        self.push_control(key, OP_RST, 0);
    }

    fn close(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.remove(&key) {
            self.unregister(conn.token, conn.stream.as_raw_fd());
        }
        self.readable_set.remove(&key);
    }

    pub fn note_bad_packet(&mut self, what: &str) {
        if self.warned {
            log::debug!("virtio-vsock: dropped a packet from the guest: {what}");
        } else {
            self.warned = true;
            log::warn!(
                "virtio-vsock: dropped a packet from the guest: {what} (further ones are logged at debug level)"
            );
        }
    }

    /// Handles one packet the guest sent. `payload` holds the `len` bytes that followed a
    /// header whose addressing the caller has checked.
    pub fn recv_from_guest(&mut self, h: &Header, payload: &[u8]) {
        let key = ConnKey {
            local_port: h.dst_port,
            peer_port: h.src_port,
        };
        if h.type_ != TYPE_STREAM {
            self.note_bad_packet(&PacketError::Type(h.type_).to_string());
            if h.op != OP_RST {
                self.push_control(key, OP_RST, 0);
            }
            return;
        }
        if h.op == OP_REQUEST {
            self.guest_connect(key);
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            if h.op != OP_RST {
                self.push_control(key, OP_RST, 0);
            }
            return;
        };
        conn.update_peer_credit(h.buf_alloc, h.fwd_cnt);
        match (h.op, conn.state) {
            (OP_RESPONSE, ConnState::Connecting) => {
                conn.state = ConnState::Established;
                let line = format!("OK {}\n", key.local_port);
                if conn.queue_line(&line).is_err() {
                    self.reset(key, "the client went away during the handshake");
                    return;
                }
                self.mark_readable(key);
            }
            (OP_RST, _) => self.close(key),
            (OP_RW, ConnState::Established) => {
                if let Err(fault) = conn.write_from_guest(payload) {
                    self.reset(key, &format!("{fault:?}"));
                    return;
                }
                if conn.wants_credit_update() {
                    self.push_control(key, OP_CREDIT_UPDATE, 0);
                }
            }
            (OP_CREDIT_REQUEST, ConnState::Established) => {
                self.push_control(key, OP_CREDIT_UPDATE, 0);
            }
            (OP_CREDIT_UPDATE, ConnState::Established) => self.mark_readable(key),
            (OP_SHUTDOWN, ConnState::Established) => self.guest_shutdown(key, h.flags),
            (op, state) => {
                self.note_bad_packet(&format!("op {op} on a connection in state {state:?}"));
                self.reset(key, "unexpected packet");
            }
        }
    }

    fn guest_connect(&mut self, key: ConnKey) {
        if self.conns.contains_key(&key) {
            self.reset(key, "a second REQUEST on an open connection");
            return;
        }
        if self.conns.len() >= MAX_CONNECTIONS {
            self.push_control(key, OP_RST, 0);
            return;
        }
        let path = format!("{}_{}", self.uds_path.display(), key.local_port);
        let stream = match UnixStream::connect(&path) {
            Ok(s) => s,
            Err(e) => {
                log::debug!("virtio-vsock: guest connect to {path}: {e}");
                self.push_control(key, OP_RST, 0);
                return;
            }
        };
        if stream.set_nonblocking(true).is_err() {
            self.push_control(key, OP_RST, 0);
            return;
        }
        let fd = stream.as_raw_fd();
        match self.register(fd, Slot::Conn(key)) {
            Ok(token) => {
                self.conns
                    .insert(key, Connection::new(stream, ConnState::Established, token));
                self.mark_readable(key);
                self.push_control(key, OP_RESPONSE, 0);
            }
            Err(_) => self.push_control(key, OP_RST, 0),
        }
    }

    fn guest_shutdown(&mut self, key: ConnKey, flags: u32) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        conn.guest_done_sending |= flags & SHUTDOWN_SEND != 0;
        conn.guest_done_receiving |= flags & SHUTDOWN_RCV != 0;
        match conn.flush_to_socket() {
            Ok(()) => self.close_if_done(key),
            Err(fault) => self.reset(key, &format!("{fault:?}")),
        }
    }

    /// A connection the guest closed (SHUTDOWN with both flags) ends, confirmed with RST,
    /// once everything it sent has reached the socket.
    fn close_if_done(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.get(&key)
            && conn.guest_done_sending
            && conn.guest_done_receiving
            && conn.pending_to_socket() == 0
        {
            self.reset(key, "the guest closed the connection");
        }
    }

    /// The next packet for the guest; its payload (at most `payload.len()` bytes) is written
    /// into `payload`. `None`: nothing to send now.
    pub fn next_rx(&mut self, payload: &mut [u8]) -> Option<Header> {
        if let Some(mut h) = self.control.pop_front() {
            self.fill_credit(&mut h);
            return Some(h);
        }
        if payload.is_empty() {
            return None;
        }
        let mut tries = self.readable.len();
        while tries > 0 {
            tries -= 1;
            let key = self.readable.pop_front()?;
            if !self.readable_set.contains(&key) {
                continue;
            }
            match self.read_socket(key, payload) {
                SocketRead::Data(h) => {
                    self.readable.push_back(key);
                    return Some(h);
                }
                SocketRead::Packet(h) => {
                    if self.readable_set.contains(&key) {
                        self.readable.push_back(key);
                    }
                    return Some(h);
                }
                SocketRead::Later => self.readable.push_back(key),
                SocketRead::Drained => {
                    self.readable_set.remove(&key);
                }
            }
        }
        None
    }

    fn read_socket(&mut self, key: ConnKey, payload: &mut [u8]) -> SocketRead {
        let guest_cid = self.guest_cid;
        let Some(conn) = self.conns.get_mut(&key) else {
            return SocketRead::Drained;
        };
        if !conn.can_send_to_guest() {
            return if conn.state == ConnState::Connecting {
                SocketRead::Later
            } else {
                SocketRead::Drained
            };
        }
        let credit = conn.peer_credit() as usize;
        if credit == 0 {
            if conn.credit_requested {
                return SocketRead::Later;
            }
            conn.credit_requested = true;
            let mut h =
                Header::to_guest(guest_cid, key.local_port, key.peer_port, OP_CREDIT_REQUEST);
            h.buf_alloc = BUF_ALLOC;
            h.fwd_cnt = conn.fwd_cnt_for_packet();
            return SocketRead::Packet(h);
        }
        let max = payload.len().min(credit);
        match conn.read_for_guest(&mut payload[..max]) {
            Ok(0) => {
                conn.socket_eof = true;
                let mut h = Header::to_guest(guest_cid, key.local_port, key.peer_port, OP_SHUTDOWN);
                h.flags = SHUTDOWN_SEND;
                h.buf_alloc = BUF_ALLOC;
                h.fwd_cnt = conn.fwd_cnt_for_packet();
                SocketRead::Packet(h)
            }
            Ok(n) => {
                conn.sent_to_guest(n as u32);
                let mut h = Header::to_guest(guest_cid, key.local_port, key.peer_port, OP_RW);
                h.len = n as u32;
                h.buf_alloc = BUF_ALLOC;
                h.fwd_cnt = conn.fwd_cnt_for_packet();
                SocketRead::Data(h)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => SocketRead::Drained,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => SocketRead::Later,
            Err(e) => {
                self.reset(key, &format!("socket read failed: {e}"));
                self.control
                    .pop_back()
                    .map_or(SocketRead::Drained, SocketRead::Packet)
            }
        }
    }

    fn fill_credit(&mut self, h: &mut Header) {
        let key = ConnKey {
            local_port: h.src_port,
            peer_port: h.dst_port,
        };
        if let Some(conn) = self.conns.get_mut(&key) {
            h.buf_alloc = BUF_ALLOC;
            h.fwd_cnt = conn.fwd_cnt_for_packet();
        }
    }
}

/// What reading a connection's socket gave.
enum SocketRead {
    /// Data for the guest (an RW header; the payload is in the caller's buffer).
    Data(Header),
    /// A control packet instead (credit request, shutdown, reset).
    Packet(Header),
    /// Nothing now, but the socket may still have bytes (no credit yet, not connected yet).
    Later,
    /// The socket has nothing more until epoll says so.
    Drained,
}

/// Parses `CONNECT <port>\n`; returns the port and any bytes after the line.
fn parse_connect_line(line: &[u8]) -> Result<(u32, Vec<u8>), String> {
    let end = line
        .iter()
        .position(|&b| b == b'\n')
        .ok_or("expected `CONNECT <port>\\n` as the first line")?;
    let text = std::str::from_utf8(&line[..end]).map_err(|_| "the CONNECT line is not text")?;
    let port = text
        .trim_end_matches('\r')
        .strip_prefix("CONNECT ")
        .and_then(|p| p.trim().parse::<u32>().ok())
        .ok_or_else(|| format!("expected `CONNECT <port>` (a port 0-4294967295), got {text:?}"))?;
    Ok((port, line[end + 1..].to_vec()))
}

/// Tells a host client why it cannot connect and closes it.
fn refuse(mut stream: UnixStream, reason: &str) {
    log::debug!("virtio-vsock: refusing a client: {reason}");
    let _ = stream.write_all(format!("ERROR {reason}\n").as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect_line(b"CONNECT 1024\n"), Ok((1024, vec![])));
        assert_eq!(
            parse_connect_line(b"CONNECT 5\r\nxy"),
            Ok((5, b"xy".to_vec()))
        );
        assert!(parse_connect_line(b"CONNECT x\n").is_err());
        assert!(parse_connect_line(b"LISTEN 5\n").is_err());
        assert!(parse_connect_line(b"CONNECT 99999999999\n").is_err());
        assert!(parse_connect_line(b"\xff\n").is_err());
    }
}
