//! Moving Ethernet frames between virtqueues and a backend (virtio 1.x §5.1.6).
//!
//! Every buffer the driver posts starts with a 12-byte `virtio_net_hdr_v1` (with VERSION_1
//! the header always has `num_buffers`). Transmit chains (queue 1) are device-readable:
//! header then frame, in any split across descriptors. Receive chains (queue 0) are
//! device-writable: the device writes a header and one frame into one chain (no
//! MRG_RXBUF). A plain backend ([`BackendHeader::None`]) sees bare frames: the header is
//! stripped on transmit and written as zeros (`num_buffers` = 1) on receive. A backend that
//! speaks the header itself (a TAP with IFF_VNET_HDR, [`BackendHeader::Vnet`]) gets and
//! gives it unchanged, which is how checksum and segmentation offloads pass through: the
//! device only checks that a transmit header asks for no offload the driver did not accept,
//! and clears receive flags the driver did not ask for.
//!
//! Everything in a queue comes from the guest: a malformed chain is returned to the driver
//! (used length 0) and logged, never a panic; only an unusable ring stops the device.

use std::io;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes};

use crate::virtio::{GuestMemory, QueueError};

/// `virtio_net_hdr_v1`: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset,
/// num_buffers.
pub const HDR_LEN: usize = 12;
/// Offset of `num_buffers` in the header.
const NUM_BUFFERS: usize = 10;
/// `flags`: the driver left the checksum to the device (needs VIRTIO_NET_F_CSUM).
pub const HDR_F_NEEDS_CSUM: u8 = 1;
/// `flags`: the checksum is known good (only with GUEST_CSUM).
pub const HDR_F_DATA_VALID: u8 = 2;
/// `gso_type` values: none, TCP over IPv4, TCP over IPv6; the ECN bit.
pub const HDR_GSO_NONE: u8 = 0;
pub const HDR_GSO_TCPV4: u8 = 1;
pub const HDR_GSO_TCPV6: u8 = 4;
pub const HDR_GSO_ECN: u8 = 0x80;
/// The largest frame either way: a 64 KiB packet plus Ethernet and VLAN headers.
pub const MAX_FRAME_LEN: usize = 65_536 + 18;
/// The shortest frame: an Ethernet header.
pub const MIN_FRAME_LEN: usize = 14;

/// Where frames go to and come from: a TAP device, or memory in tests and fuzzing.
pub trait FrameIo: Send {
    /// Reads one frame into `buf`; `WouldBlock` when none is waiting.
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Sends one frame.
    fn write_frame(&mut self, frame: &[u8]) -> io::Result<()>;
}

/// The offloads the driver accepted (virtio-net feature bits), as far as frames care.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Offloads {
    /// GUEST_CSUM: received frames may carry partial checksums (NEEDS_CSUM, DATA_VALID).
    pub guest_csum: bool,
    /// CSUM: the driver may leave transmit checksums to the device.
    pub tx_csum: bool,
    /// HOST_TSO4/HOST_TSO6: the driver may send TCP segmentation frames.
    pub tx_tso: bool,
}

/// Whether frames carry the virtio-net header on the backend side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendHeader {
    /// Bare Ethernet frames (no offloads possible).
    None,
    /// The backend reads and writes the header itself (TAP with IFF_VNET_HDR, its offloads
    /// set to what the driver accepted).
    Vnet(Offloads),
}

/// Counters, for the debug log and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    pub tx_frames: u64,
    pub rx_frames: u64,
    /// Transmit chains that were not a frame we could send (malformed, or refused by the
    /// backend).
    pub tx_dropped: u64,
    /// Received frames that fitted no buffer the guest gave.
    pub rx_dropped: u64,
}

/// One interface's data path: the backend plus receive state.
pub struct NetPort<B> {
    pub backend: B,
    header: BackendHeader,
    /// A received frame, header first, waiting for a guest buffer (`rx_len` bytes).
    rx_buf: Vec<u8>,
    rx_len: Option<usize>,
    /// The guest had no receive buffer: don't read the backend until it posts some.
    rx_blocked: bool,
    /// Reading the backend failed for good: stop watching it.
    backend_failed: bool,
    tx_buf: Vec<u8>,
    pub stats: NetStats,
    /// The first of each kind of problem is a warning, later ones are debug lines.
    malformed_seen: bool,
    backend_error_seen: bool,
}

impl<B: FrameIo> NetPort<B> {
    pub fn new(backend: B, header: BackendHeader) -> Self {
        NetPort {
            backend,
            header,
            rx_buf: vec![0; HDR_LEN + MAX_FRAME_LEN],
            rx_len: None,
            rx_blocked: false,
            backend_failed: false,
            tx_buf: vec![0; HDR_LEN + MAX_FRAME_LEN],
            stats: NetStats::default(),
            malformed_seen: false,
            backend_error_seen: false,
        }
    }

    /// Whether the backend is worth watching: the guest has room (as far as we know) and the
    /// backend still works.
    pub fn wants_backend(&self) -> bool {
        !self.rx_blocked && !self.backend_failed
    }

    /// The guest posted receive buffers (a notification on the receive queue).
    pub fn rx_buffers_added(&mut self) {
        self.rx_blocked = false;
    }

    /// Nothing can take frames now: stop reading the backend until buffers are added.
    pub fn block_rx(&mut self) {
        self.rx_blocked = true;
    }

    /// Reads one frame from the backend into `rx_buf`; false when none is waiting.
    fn read_backend(&mut self) -> bool {
        let with_hdr = self.header != BackendHeader::None;
        let start = if with_hdr { 0 } else { HDR_LEN };
        match self.backend.read_frame(&mut self.rx_buf[start..]) {
            Ok(n) if with_hdr && n < HDR_LEN => {
                self.backend_problem(&format!("the backend gave {n} bytes, less than a header"));
                true
            }
            Ok(n) => {
                match self.header {
                    BackendHeader::None => self.rx_buf[..HDR_LEN].fill(0),
                    // Checksum flags are for a driver that asked for them.
                    BackendHeader::Vnet(o) if !o.guest_csum => self.rx_buf[0] = 0,
                    BackendHeader::Vnet(_) => {}
                }
                // One buffer per frame (no MRG_RXBUF), which the header must say.
                self.rx_buf[NUM_BUFFERS..HDR_LEN].copy_from_slice(&1u16.to_le_bytes());
                self.rx_len = Some(start + n);
                true
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => true,
            Err(e) => {
                log::warn!(
                    "virtio-net: reading frames from the backend failed ({e}); the interface \
                     receives nothing more"
                );
                self.backend_failed = true;
                false
            }
        }
    }

    fn backend_problem(&mut self, what: &str) {
        if self.backend_error_seen {
            log::debug!("virtio-net: {what}");
        } else {
            self.backend_error_seen = true;
            log::warn!("virtio-net: {what} (further ones are logged at debug level)");
        }
    }

    fn note_malformed(&mut self, what: &str) {
        if self.malformed_seen {
            log::debug!("virtio-net: malformed buffer: {what}");
        } else {
            self.malformed_seen = true;
            log::warn!(
                "virtio-net: malformed buffer from the guest driver: {what} (further ones are \
                 logged at debug level)"
            );
        }
    }
}

/// Why a chain is not a buffer we can use.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("a transmit buffer has a device-writable descriptor")]
    WritableTx,
    #[error("a receive buffer has a device-readable descriptor")]
    ReadableRx,
    #[error("a transmit buffer of {0} bytes is shorter than the header plus an Ethernet header")]
    ShortTx(usize),
    #[error("a transmit buffer of more than {max} bytes", max = HDR_LEN + MAX_FRAME_LEN)]
    LongTx,
    #[error("a descriptor at {0:#x} is outside guest memory")]
    Memory(u64),
    #[error(
        "a transmit header asks for offloads that were not negotiated (flags {flags:#x}, gso_type {gso})"
    )]
    Offload { flags: u8, gso: u8 },
    #[error("a receive buffer of {room} bytes is too small for a {len}-byte frame with its header")]
    RxTooSmall { room: usize, len: usize },
}

/// Gathers a transmit chain's bytes into `buf`; returns their length.
fn gather(
    chain: impl Iterator<Item = virtio_queue::desc::split::Descriptor>,
    mem: &GuestMemory,
    buf: &mut [u8],
) -> Result<usize, ChainError> {
    let mut len = 0usize;
    for d in chain {
        if d.is_write_only() {
            return Err(ChainError::WritableTx);
        }
        let n = d.len() as usize;
        let end = len
            .checked_add(n)
            .filter(|&e| e <= buf.len())
            .ok_or(ChainError::LongTx)?;
        mem.read_slice(&mut buf[len..end], d.addr())
            .map_err(|_| ChainError::Memory(d.addr().raw_value()))?;
        len = end;
    }
    Ok(len)
}

/// Sends every frame the driver made available on the transmit queue; returns whether any
/// chain was used. A malformed chain is returned unsent; only a broken ring is an error.
pub fn process_tx<B: FrameIo>(
    port: &mut NetPort<B>,
    queue: &mut Queue,
    mem: &GuestMemory,
) -> Result<bool, QueueError> {
    let mut used_any = false;
    loop {
        let chain = queue.iter(mem).map_err(QueueError::Ring)?.next();
        let Some(chain) = chain else {
            return Ok(used_any);
        };
        let head = chain.head_index();
        match gather(chain, mem, &mut port.tx_buf).and_then(|len| check_tx(port, len)) {
            Ok(len) => {
                let frame = if port.header != BackendHeader::None {
                    &port.tx_buf[..len]
                } else {
                    &port.tx_buf[HDR_LEN..len]
                };
                match port.backend.write_frame(frame) {
                    Ok(()) => port.stats.tx_frames += 1,
                    Err(e) => {
                        port.stats.tx_dropped += 1;
                        port.backend_problem(&format!("the backend refused a frame: {e}"));
                    }
                }
            }
            Err(e) => {
                port.stats.tx_dropped += 1;
                port.note_malformed(&e.to_string());
            }
        }
        // The device writes nothing into a transmit buffer.
        queue.add_used(mem, head, 0).map_err(QueueError::Ring)?;
        used_any = true;
    }
}

/// Checks a gathered transmit buffer of `len` bytes.
fn check_tx<B>(port: &NetPort<B>, len: usize) -> Result<usize, ChainError> {
    if len < HDR_LEN + MIN_FRAME_LEN {
        return Err(ChainError::ShortTx(len));
    }
    let (flags, gso) = (port.tx_buf[0], port.tx_buf[1]);
    // A frame that still needs a checksum or segmentation can only be sent by a backend that
    // does them, and only if the driver accepted that offload.
    let offloads = match port.header {
        BackendHeader::None => Offloads::default(),
        BackendHeader::Vnet(o) => o,
    };
    let csum_ok = flags & HDR_F_NEEDS_CSUM == 0 || offloads.tx_csum;
    let gso_ok = match gso {
        HDR_GSO_NONE => true,
        HDR_GSO_TCPV4 | HDR_GSO_TCPV6 => offloads.tx_tso,
        _ => false, // UDP fragmentation and ECN are not offered
    };
    if !csum_ok || !gso_ok {
        return Err(ChainError::Offload { flags, gso });
    }
    Ok(len)
}

/// Scatters the pending frame into a receive chain; returns the bytes written.
fn scatter(
    chain: impl Iterator<Item = virtio_queue::desc::split::Descriptor>,
    mem: &GuestMemory,
    frame: &[u8],
) -> Result<u32, ChainError> {
    let descs: Vec<_> = chain.collect();
    if descs.iter().any(|d| !d.is_write_only()) {
        return Err(ChainError::ReadableRx);
    }
    let room: usize = descs.iter().map(|d| d.len() as usize).sum();
    if room < frame.len() {
        return Err(ChainError::RxTooSmall {
            room,
            len: frame.len(),
        });
    }
    let mut done = 0usize;
    for d in descs {
        if done == frame.len() {
            break;
        }
        let n = (d.len() as usize).min(frame.len() - done);
        mem.write_slice(&frame[done..done + n], d.addr())
            .map_err(|_| ChainError::Memory(d.addr().raw_value()))?;
        done += n;
    }
    Ok(done as u32)
}

/// Moves frames from the backend into the guest's receive buffers until the backend has none
/// or the guest has no room (then the port is blocked until [`NetPort::rx_buffers_added`]).
/// Returns whether any chain was used.
pub fn fill_rx<B: FrameIo>(
    port: &mut NetPort<B>,
    queue: &mut Queue,
    mem: &GuestMemory,
) -> Result<bool, QueueError> {
    let mut used_any = false;
    loop {
        if port.rx_len.is_none() && (port.backend_failed || !port.read_backend()) {
            return Ok(used_any);
        }
        let Some(len) = port.rx_len else {
            continue; // an interrupted read or a runt from the backend: read again
        };
        let chain = queue.iter(mem).map_err(QueueError::Ring)?.next();
        let Some(chain) = chain else {
            port.rx_blocked = true;
            return Ok(used_any);
        };
        let head = chain.head_index();
        let written = match scatter(chain, mem, &port.rx_buf[..len]) {
            Ok(n) => {
                port.stats.rx_frames += 1;
                port.rx_len = None;
                n
            }
            Err(e @ ChainError::RxTooSmall { .. }) => {
                // The frame fits no buffer this driver posts (an MTU above the guest's):
                // drop the frame, give the buffer back empty.
                port.stats.rx_dropped += 1;
                port.rx_len = None;
                port.note_malformed(&e.to_string());
                0
            }
            Err(e) => {
                // Keep the frame for the next, hopefully well-formed, buffer.
                port.note_malformed(&e.to_string());
                0
            }
        };
        queue
            .add_used(mem, head, written)
            .map_err(QueueError::Ring)?;
        used_any = true;
    }
}
