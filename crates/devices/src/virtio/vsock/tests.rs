//! The vsock device against crafted rings in real guest memory and real Unix sockets: both
//! connection directions, data both ways, credit in both directions, shutdown and reset,
//! and malformed packets that must be dropped without a panic.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::connection::BUF_ALLOC;
use super::muxer::Muxer;
use super::packet::*;
use super::rings::{self, RX_QUEUE, TX_QUEUE};
use crate::test_utils::XorShift;
use crate::virtio::GuestMemory;

const SIZE: u16 = 16;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
/// (descriptor table, available ring, used ring) per queue.
const RINGS: [(u64, u64, u64); 2] = [(0x0, 0x1000, 0x2000), (0x3000, 0x4000, 0x5000)];
const RX_BUFS: u64 = 0x10000;
const RX_BUF_LEN: u32 = 0x1000;
const TX_BUFS: u64 = 0x30000;
pub const CID: u64 = 3;

pub struct Guest {
    pub mem: GuestMemory,
    pub queues: Vec<Queue>,
    pub muxer: Muxer,
    scratch: Vec<u8>,
    avail: [u16; 2],
    used_seen: u16,
    tx_slot: u16,
    /// Buffer size the guest advertises in its packets.
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Guest {
    pub fn new(muxer: Muxer) -> Guest {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
        let mut queues = Vec::new();
        for (desc, avail, used) in RINGS {
            let mut q = Queue::new(SIZE).unwrap();
            q.try_set_desc_table_address(GuestAddress(desc)).unwrap();
            q.try_set_avail_ring_address(GuestAddress(avail)).unwrap();
            q.try_set_used_ring_address(GuestAddress(used)).unwrap();
            q.set_ready(true);
            queues.push(q);
        }
        queues.push(Queue::new(SIZE).unwrap()); // event queue, never enabled here
        Guest {
            mem,
            queues,
            muxer,
            scratch: vec![0; MAX_PAYLOAD as usize],
            avail: [0; 2],
            used_seen: 0,
            tx_slot: 0,
            buf_alloc: 1 << 20,
            fwd_cnt: 0,
        }
    }

    fn desc(&self, queue: usize, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = RINGS[queue].0 + 16 * u64::from(i);
        self.mem.write_obj(addr, GuestAddress(at)).unwrap();
        self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        self.mem.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    fn publish(&mut self, queue: usize, head: u16) {
        let avail = RINGS[queue].1;
        let slot = avail + 4 + 2 * u64::from(self.avail[queue] % SIZE);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail[queue] = self.avail[queue].wrapping_add(1);
        self.mem
            .write_obj(self.avail[queue], GuestAddress(avail + 2))
            .unwrap();
    }

    /// Gives the device `n` receive buffers of `len` bytes (descriptors 0..n).
    pub fn post_rx_len(&mut self, n: u16, len: u32) {
        for _ in 0..n {
            let d = self.avail[RX_QUEUE] % SIZE;
            let addr = RX_BUFS + u64::from(d) * u64::from(RX_BUF_LEN);
            self.desc(RX_QUEUE, d, addr, len, F_WRITE, 0);
            self.publish(RX_QUEUE, d);
        }
    }

    pub fn post_rx(&mut self, n: u16) {
        self.post_rx_len(n, RX_BUF_LEN);
    }

    /// Runs the device's work as its worker thread would; returns the used-queue mask.
    pub fn exchange(&mut self) -> u64 {
        rings::exchange(
            &mut self.muxer,
            &mut self.queues,
            &self.mem,
            &mut self.scratch,
            CID,
        )
        .unwrap()
    }

    /// Sends raw bytes as one TX packet (a header and payload split over two descriptors
    /// when `split`).
    pub fn send_raw(&mut self, bytes: &[u8], split: Option<usize>) {
        let d = self.tx_slot % (SIZE / 2) * 2;
        self.tx_slot = self.tx_slot.wrapping_add(1);
        let addr = TX_BUFS + u64::from(d) * 0x10000;
        self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
        match split {
            Some(at) if at < bytes.len() => {
                self.desc(TX_QUEUE, d, addr, at as u32, F_NEXT, d + 1);
                let rest = (bytes.len() - at) as u32;
                self.desc(TX_QUEUE, d + 1, addr + at as u64, rest, 0, 0);
            }
            _ => self.desc(TX_QUEUE, d, addr, bytes.len() as u32, 0, 0),
        }
        self.publish(TX_QUEUE, d);
        self.exchange();
    }

    pub fn header(&self, src_port: u32, dst_port: u32, op: u16, len: u32) -> Header {
        Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: self.buf_alloc,
            fwd_cnt: self.fwd_cnt,
        }
    }

    pub fn send(&mut self, h: Header, payload: &[u8]) {
        let mut bytes = h.to_bytes().to_vec();
        bytes.extend_from_slice(payload);
        self.send_raw(&bytes, Some(HEADER_LEN));
    }

    /// Packets the device put into receive buffers since the last call, with used lengths.
    pub fn received(&mut self) -> Vec<(Header, Vec<u8>, u32)> {
        let used = RINGS[RX_QUEUE].2;
        let idx: u16 = self.mem.read_obj(GuestAddress(used + 2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let elem = used + 4 + 8 * u64::from(self.used_seen % SIZE);
            let id: u32 = self.mem.read_obj(GuestAddress(elem)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(elem + 4)).unwrap();
            self.used_seen = self.used_seen.wrapping_add(1);
            let addr = RX_BUFS + u64::from(id) * u64::from(RX_BUF_LEN);
            let mut hb = [0u8; HEADER_LEN];
            self.mem.read_slice(&mut hb, GuestAddress(addr)).unwrap();
            let h = Header::parse(&hb);
            let mut payload = vec![0u8; len.saturating_sub(HEADER_LEN as u32) as usize];
            self.mem
                .read_slice(&mut payload, GuestAddress(addr + HEADER_LEN as u64))
                .unwrap();
            out.push((h, payload, len));
        }
        out
    }
}

pub fn socket_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("v.sock")
}

fn rig() -> (tempfile::TempDir, Guest, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir);
    let listener = UnixListener::bind(&path).unwrap();
    let muxer = Muxer::new(CID, &path, listener).unwrap();
    (dir, Guest::new(muxer), path)
}

fn client(path: &PathBuf) -> UnixStream {
    let s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// A host client connected to guest port 1024, the guest accepted; returns the host port.
fn connected(g: &mut Guest, path: &PathBuf) -> (UnixStream, u32) {
    let mut c = client(path);
    c.write_all(b"CONNECT 1024\n").unwrap();
    g.post_rx(8);
    g.exchange();
    let got = g.received();
    assert_eq!(got.len(), 1, "{got:?}");
    let req = got[0].0;
    assert_eq!((req.op, req.dst_port, req.dst_cid), (OP_REQUEST, 1024, CID));
    assert_eq!((req.src_cid, req.buf_alloc), (HOST_CID, BUF_ALLOC));
    assert!(req.src_port >= 1 << 30);
    g.send(g.header(1024, req.src_port, OP_RESPONSE, 0), &[]);
    let mut line = String::new();
    BufReader::new(&mut c).read_line(&mut line).unwrap();
    assert_eq!(line, format!("OK {}\n", req.src_port));
    (c, req.src_port)
}

#[test]
fn host_initiated_connection_carries_data_both_ways_and_closes() {
    let (_dir, mut g, path) = rig();
    let (mut c, port) = connected(&mut g, &path);
    c.write_all(b"hello guest").unwrap();
    g.exchange();
    let got = g.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0.op, OP_RW);
    assert_eq!((got[0].0.src_port, got[0].0.dst_port), (port, 1024));
    assert_eq!(got[0].1, b"hello guest");
    assert_eq!(got[0].2, HEADER_LEN as u32 + 11);
    g.send(g.header(1024, port, OP_RW, 10), b"hello host");
    let mut buf = [0u8; 10];
    c.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello host");
    // The guest closes: the client sees end of file, the device confirms with RST.
    g.send(g.header(1024, port, OP_SHUTDOWN, 0).with_flags(3), &[]);
    assert_eq!(c.read(&mut buf).unwrap(), 0);
    let got = g.received();
    assert_eq!(got.last().unwrap().0.op, OP_RST);
    assert_eq!(g.muxer.connection_count(), 0);
}

#[test]
fn a_refused_connect_closes_the_client_and_bad_lines_get_an_error() {
    let (_dir, mut g, path) = rig();
    let mut c = client(&path);
    c.write_all(b"CONNECT 77\n").unwrap();
    g.post_rx(4);
    g.exchange();
    let req = g.received()[0].0;
    g.send(g.header(77, req.src_port, OP_RST, 0), &[]);
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "no OK line: {rest:?}");
    let mut bad = client(&path);
    bad.write_all(b"HELLO\n").unwrap();
    g.exchange();
    let mut text = String::new();
    bad.read_to_string(&mut text).unwrap();
    assert!(
        text.starts_with("ERROR expected `CONNECT <port>`"),
        "{text}"
    );
    assert_eq!(g.muxer.connection_count(), 0);
}

#[test]
fn guest_initiated_connections_reach_the_port_socket_or_are_reset() {
    let (_dir, mut g, path) = rig();
    let service = UnixListener::bind(format!("{}_5000", path.display())).unwrap();
    g.post_rx(8);
    g.send(g.header(40000, 5000, OP_REQUEST, 0), &[]);
    let got = g.received();
    assert_eq!(got[0].0.op, OP_RESPONSE);
    assert_eq!((got[0].0.src_port, got[0].0.dst_port), (5000, 40000));
    let (mut s, _) = service.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    g.send(g.header(40000, 5000, OP_RW, 4), b"ping");
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    s.write_all(b"pong").unwrap();
    g.exchange();
    let got = g.received();
    assert_eq!((got[0].0.op, got[0].1.as_slice()), (OP_RW, &b"pong"[..]));
    // The service closes: the guest hears SHUTDOWN (no more data from the host).
    drop(s);
    g.exchange();
    let got = g.received();
    assert_eq!(got[0].0.op, OP_SHUTDOWN);
    assert_eq!(got[0].0.flags & SHUTDOWN_SEND, SHUTDOWN_SEND);
    // No socket for port 5001.
    g.send(g.header(40001, 5001, OP_REQUEST, 0), &[]);
    assert_eq!(g.received()[0].0.op, OP_RST);
}

#[test]
fn host_to_guest_data_respects_the_guests_credit() {
    let (_dir, mut g, path) = rig();
    g.buf_alloc = 8;
    let (mut c, port) = connected(&mut g, &path);
    c.write_all(&[7u8; 20]).unwrap();
    g.exchange();
    let got = g.received();
    assert_eq!(got[0].0.op, OP_RW);
    assert_eq!(got[0].1.len(), 8, "no more than the guest's buffer");
    assert_eq!(got[1].0.op, OP_CREDIT_REQUEST, "{got:?}");
    assert_eq!(got.len(), 2, "nothing more until credit arrives");
    g.exchange();
    assert!(g.received().is_empty(), "no repeated credit requests");
    g.fwd_cnt = 8;
    g.send(g.header(1024, port, OP_CREDIT_UPDATE, 0), &[]);
    let got = g.received();
    assert_eq!(got[0].1.len(), 8);
}

#[test]
fn guest_data_beyond_our_credit_resets_the_connection() {
    let (_dir, mut g, path) = rig();
    let (c, port) = connected(&mut g, &path);
    // Nobody reads the client: the socket buffer fills, then our BUF_ALLOC.
    let chunk = vec![1u8; MAX_PAYLOAD as usize];
    let mut reset = false;
    for _ in 0..((BUF_ALLOC as usize + (8 << 20)) / chunk.len()) {
        g.post_rx(1);
        g.send(g.header(1024, port, OP_RW, chunk.len() as u32), &chunk);
        if g.received().iter().any(|p| p.0.op == OP_RST) {
            reset = true;
            break;
        }
    }
    assert!(reset, "sending past the credit resets");
    assert_eq!(g.muxer.connection_count(), 0);
    drop(c);
}

#[test]
fn credit_updates_follow_forwarded_data() {
    let (_dir, mut g, path) = rig();
    let (mut c, port) = connected(&mut g, &path);
    let chunk = vec![2u8; 32 << 10];
    for _ in 0..3 {
        g.send(g.header(1024, port, OP_RW, chunk.len() as u32), &chunk);
    }
    let mut buf = vec![0u8; 3 * chunk.len()];
    c.read_exact(&mut buf).unwrap();
    let updates: Vec<_> = g
        .received()
        .into_iter()
        .filter(|p| p.0.op == OP_CREDIT_UPDATE)
        .collect();
    assert_eq!(updates.len(), 1, "one update per quarter of the buffer");
    assert_eq!(updates[0].0.fwd_cnt, 64 << 10);
    // A credit request is answered at once.
    g.send(g.header(1024, port, OP_CREDIT_REQUEST, 0), &[]);
    let got = g.received();
    assert_eq!(got[0].0.op, OP_CREDIT_UPDATE);
    assert_eq!(got[0].0.fwd_cnt, 96 << 10);
}

/// The guest sends all its credit (256 KiB) to a client that reads only later: the rest waits
/// for the socket and is written when it becomes writable, and the guest must then hear that
/// the space is free. Linux's driver does not ask (no CREDIT_REQUEST): without the update it
/// waits for credit forever, which stalled a 10 MiB `vhpc cp` out of a guest in the lab.
#[test]
fn credit_freed_when_a_slow_client_reads_reaches_the_guest() {
    let (_dir, mut g, path) = rig();
    let (mut c, port) = connected(&mut g, &path);
    g.post_rx(8);
    let chunk = vec![7u8; MAX_PAYLOAD as usize];
    for _ in 0..4 {
        g.send(g.header(1024, port, OP_RW, chunk.len() as u32), &chunk);
    }
    let total = 4 * chunk.len();
    c.set_nonblocking(true).unwrap();
    let (mut read, mut told) = (0, 0);
    let mut buf = vec![0u8; 8192];
    for _ in 0..100_000 {
        match c.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => read += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
        g.exchange();
        for p in g.received() {
            if p.0.op == OP_CREDIT_UPDATE {
                told = p.0.fwd_cnt;
            }
        }
        if read == total && told == total as u32 {
            break;
        }
    }
    assert_eq!(read, total, "every byte reached the client");
    assert_eq!(
        told, total as u32,
        "the guest heard that all it sent was forwarded"
    );
}

/// 256 KiB (all the credit) then a close, to a client that has not read yet: more than the
/// Unix socket takes at once, so the close must wait for the rest to be written.
#[test]
fn a_guest_close_waits_until_its_data_reached_the_client() {
    let (_dir, mut g, path) = rig();
    let (mut c, port) = connected(&mut g, &path);
    let chunk: Vec<u8> = (0..MAX_PAYLOAD).map(|i| (i % 251) as u8).collect();
    for _ in 0..4 {
        g.send(g.header(1024, port, OP_RW, chunk.len() as u32), &chunk);
    }
    g.send(g.header(1024, port, OP_SHUTDOWN, 0).with_flags(3), &[]);
    c.set_nonblocking(true).unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 8192];
    let mut rst = false;
    for _ in 0..100_000 {
        match c.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
        g.exchange();
        rst |= g.received().iter().any(|p| p.0.op == OP_RST);
    }
    assert_eq!(got.len(), 4 * chunk.len(), "every byte reached the client");
    assert!(got.chunks(chunk.len()).all(|c| c == chunk.as_slice()));
    assert!(rst, "the close is confirmed with RST");
    assert_eq!(g.muxer.connection_count(), 0, "closed after the data");
}

#[test]
fn malformed_packets_are_dropped_and_unknown_connections_reset() {
    let (_dir, mut g, _path) = rig();
    g.post_rx(8);
    g.send_raw(&[0u8; 10], None); // shorter than a header
    let mut wrong_cid = g.header(1, 2, OP_REQUEST, 0);
    wrong_cid.src_cid = 9;
    g.send(wrong_cid, &[]);
    let mut wrong_dst = g.header(1, 2, OP_REQUEST, 0);
    wrong_dst.dst_cid = 5;
    g.send(wrong_dst, &[]);
    g.send(g.header(1, 2, OP_RW, 100), &[0; 10]); // len beyond the chain
    g.send(g.header(1, 2, OP_RW, MAX_PAYLOAD + 1), &[]);
    assert!(g.received().is_empty(), "dropped without an answer");
    let used: u16 = g.mem.read_obj(GuestAddress(RINGS[TX_QUEUE].2 + 2)).unwrap();
    assert_eq!(used, 5, "every bad packet is returned to the guest");
    // Well-formed but for no connection, or of an unknown type: RST.
    g.send(g.header(1, 2, OP_RW, 3), b"abc");
    let mut dgram = g.header(1, 2, OP_REQUEST, 0);
    dgram.type_ = 2;
    g.send(dgram, &[]);
    g.send(g.header(1, 2, 99, 0), &[]);
    let got = g.received();
    assert_eq!(got.len(), 3);
    assert!(got.iter().all(|p| p.0.op == OP_RST && p.0.dst_port == 1));
    // A receive buffer too small for a header is returned unused.
    g.post_rx_len(1, 8);
    g.send(g.header(1, 2, OP_RW, 3), b"abc");
}

#[test]
fn no_receive_buffers_means_answers_wait_and_the_guest_is_throttled() {
    let (_dir, mut g, _path) = rig();
    // 262 requests to closed ports with no receive buffers: the answers queue up to the
    // high-water mark (256), then the device stops taking packets until the guest gives
    // buffers.
    for i in 0..262u32 {
        g.send(g.header(i, 9, OP_REQUEST, 0), &[]);
    }
    let used: u16 = g.mem.read_obj(GuestAddress(RINGS[TX_QUEUE].2 + 2)).unwrap();
    assert_eq!(used, 256, "packets taken without room for their answers");
    let mut answers = 0;
    for _ in 0..100 {
        if answers == 262 {
            break;
        }
        g.post_rx(8);
        g.exchange();
        answers += g.received().len();
    }
    assert_eq!(answers, 262, "every request answered once buffers came");
}

impl Header {
    fn with_flags(mut self, flags: u32) -> Header {
        self.flags = flags;
        self
    }
}

#[test]
fn random_rings_never_panic() {
    let mut rng = XorShift(0x1234_5678_9abc_def0);
    for _ in 0..300 {
        let mut data = vec![0u8; super::fuzz::MEM_SIZE];
        for b in data.iter_mut() {
            *b = rng.next() as u8;
        }
        // Plausible available indexes (at most a ring's worth ahead) and an empty used ring,
        // so the random descriptors get parsed instead of the ring being refused at once.
        for (avail, used) in [(0x800usize, 0x1000usize), (0x2800, 0x3000)] {
            data[avail + 2] %= 17;
            data[avail + 3] = 0;
            data[used + 2..used + 4].fill(0);
        }
        // Descriptors point into memory (low 16 address bits random, the rest zero).
        for table in [0usize, 0x2000] {
            for d in 0..16 {
                let at = table + 16 * d;
                data[at + 2..at + 8].fill(0);
                data[at + 9] %= 0x20; // len < 8 KiB
                data[at + 10..at + 12].fill(0);
                data[at + 12] &= 3;
                data[at + 14] %= 16;
                data[at + 15] = 0;
            }
        }
        super::fuzz::vsock_queues(&data);
    }
}
