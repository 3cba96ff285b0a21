//! Moving packets between the vsock queues and the [`Muxer`]: the guest's transmit queue
//! (header + payload in device-readable descriptors) and its receive queue (device-writable
//! buffers we fill with a header and payload). Everything in a chain is untrusted: a packet
//! that cannot be read or is malformed is dropped (returned unused) and logged; only a broken
//! ring stops the device.

use std::io::{Read, Write};

use virtio_queue::{Queue, QueueOwnedT, QueueT};

use super::muxer::Muxer;
use super::packet::{HEADER_LEN, Header, OP_RW, PacketError};
use crate::virtio::{GuestMemory, QueueError};

/// Queue indexes.
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const EVENT_QUEUE: usize = 2;

/// Lets the muxer handle its sockets, then moves packets both ways until neither queue
/// makes progress. Returns the mask of queues with new used entries.
pub fn exchange(
    muxer: &mut Muxer,
    queues: &mut [Queue],
    mem: &GuestMemory,
    scratch: &mut [u8],
    guest_cid: u64,
) -> Result<u64, QueueError> {
    muxer.handle_socket_events();
    let mut used = 0u64;
    loop {
        let mut progress = false;
        if let Some(tx) = queues.get_mut(TX_QUEUE).filter(|q| q.ready())
            && process_tx(muxer, tx, mem, scratch, guest_cid)?
        {
            used |= 1 << TX_QUEUE;
            progress = true;
        }
        if let Some(rx) = queues.get_mut(RX_QUEUE).filter(|q| q.ready())
            && fill_rx(muxer, rx, mem, scratch)?
        {
            used |= 1 << RX_QUEUE;
            progress = true;
        }
        if !progress {
            return Ok(used);
        }
    }
}

/// Takes the guest's packets until the queue is empty or the muxer has too many answers
/// waiting for receive buffers.
pub fn process_tx(
    muxer: &mut Muxer,
    queue: &mut Queue,
    mem: &GuestMemory,
    scratch: &mut [u8],
    guest_cid: u64,
) -> Result<bool, QueueError> {
    let mut used = false;
    while !muxer.tx_blocked() {
        let Some(chain) = queue.iter(mem).map_err(QueueError::Ring)?.next() else {
            break;
        };
        let head = chain.head_index();
        let mut reader = match chain.reader(mem) {
            Ok(r) => r,
            Err(e) => {
                muxer.note_bad_packet(&PacketError::Descriptors(e.to_string()).to_string());
                queue.add_used(mem, head, 0).map_err(QueueError::Ring)?;
                used = true;
                continue;
            }
        };
        match read_packet(&mut reader, scratch, guest_cid) {
            Ok((h, n)) => muxer.recv_from_guest(&h, &scratch[..n]),
            Err(e) => muxer.note_bad_packet(&e.to_string()),
        }
        queue.add_used(mem, head, 0).map_err(QueueError::Ring)?;
        used = true;
    }
    Ok(used)
}

fn read_packet(
    reader: &mut impl ReadableChain,
    scratch: &mut [u8],
    guest_cid: u64,
) -> Result<(Header, usize), PacketError> {
    let available = reader.available();
    if available < HEADER_LEN {
        return Err(PacketError::ShortHeader(available));
    }
    let mut bytes = [0u8; HEADER_LEN];
    reader
        .read_exact(&mut bytes)
        .map_err(|e| PacketError::Descriptors(e.to_string()))?;
    let h = Header::parse(&bytes);
    h.check_from_guest(guest_cid, reader.available())?;
    let n = if h.op == OP_RW { h.len as usize } else { 0 };
    let Some(buf) = scratch.get_mut(..n) else {
        return Err(PacketError::Oversize(h.len));
    };
    reader
        .read_exact(buf)
        .map_err(|e| PacketError::Descriptors(e.to_string()))?;
    Ok((h, n))
}

/// A descriptor chain's readable bytes.
trait ReadableChain: Read {
    fn available(&self) -> usize;
}

impl<B: vm_memory::bitmap::BitmapSlice> ReadableChain for virtio_queue::Reader<'_, B> {
    fn available(&self) -> usize {
        self.available_bytes()
    }
}

/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` (virtio 1.x §5.10.6.7): the event's `id`.
pub const EVENT_TRANSPORT_RESET: u32 = 0;
/// `struct virtio_vsock_event`: one le32.
pub const EVENT_LEN: usize = 4;

/// Puts a transport reset event into the guest's next event buffer. Returns (whether it was
/// delivered, whether any used entry was written): a buffer that is not a device-writable
/// buffer of at least 4 bytes is returned unused (length 0) and the next one tried; with no
/// buffer left the event waits for the driver to give one.
pub fn send_transport_reset(
    queue: &mut Queue,
    mem: &GuestMemory,
) -> Result<(bool, bool), QueueError> {
    let mut used = false;
    loop {
        let Some(chain) = queue.iter(mem).map_err(QueueError::Ring)?.next() else {
            return Ok((false, used));
        };
        let head = chain.head_index();
        let written = match chain.writer(mem) {
            Ok(mut w) if w.available_bytes() >= EVENT_LEN => w
                .write_all(&EVENT_TRANSPORT_RESET.to_le_bytes())
                .map_err(|e| e.to_string()),
            Ok(w) => Err(format!(
                "an event buffer of {} bytes cannot hold an event",
                w.available_bytes()
            )),
            Err(e) => Err(e.to_string()),
        };
        match written {
            Ok(()) => {
                queue
                    .add_used(mem, head, EVENT_LEN as u32)
                    .map_err(QueueError::Ring)?;
                log::info!("virtio-vsock: transport reset sent to the guest");
                return Ok((true, true));
            }
            Err(e) => {
                log::warn!("virtio-vsock: unusable event buffer ({e}); trying the next one");
                queue.add_used(mem, head, 0).map_err(QueueError::Ring)?;
                used = true;
            }
        }
    }
}

/// Gives the guest's receive buffers the muxer's packets until either runs out.
pub fn fill_rx(
    muxer: &mut Muxer,
    queue: &mut Queue,
    mem: &GuestMemory,
    scratch: &mut [u8],
) -> Result<bool, QueueError> {
    let mut used = false;
    loop {
        let Some(chain) = queue.iter(mem).map_err(QueueError::Ring)?.next() else {
            return Ok(used);
        };
        let head = chain.head_index();
        let mut writer = match chain.writer(mem) {
            Ok(w) if w.available_bytes() >= HEADER_LEN => w,
            Ok(w) => {
                muxer.note_bad_packet(&format!(
                    "a receive buffer of {} bytes cannot hold a packet header",
                    w.available_bytes()
                ));
                queue.add_used(mem, head, 0).map_err(QueueError::Ring)?;
                used = true;
                continue;
            }
            Err(e) => {
                muxer.note_bad_packet(&PacketError::Descriptors(e.to_string()).to_string());
                queue.add_used(mem, head, 0).map_err(QueueError::Ring)?;
                used = true;
                continue;
            }
        };
        let room = (writer.available_bytes() - HEADER_LEN).min(scratch.len());
        let Some(h) = muxer.next_rx(&mut scratch[..room]) else {
            queue.go_to_previous_position();
            return Ok(used);
        };
        let len = h.len as usize;
        let written = writer
            .write_all(&h.to_bytes())
            .and_then(|()| writer.write_all(&scratch[..len]));
        let used_len = match written {
            Ok(()) => (HEADER_LEN + len) as u32,
            Err(e) => {
                muxer.note_bad_packet(&format!("cannot write a receive buffer: {e}"));
                0
            }
        };
        queue
            .add_used(mem, head, used_len)
            .map_err(QueueError::Ring)?;
        used = true;
    }
}
