//! The virtio-vsock packet header (virtio 1.x §5.10.6) and what is valid in it.
//!
//! Every packet in both directions starts with a 44-byte little-endian header; `len` payload
//! bytes follow (only in OP_RW packets). Headers from the guest are untrusted: [`Header::parse`]
//! never panics and [`Header::check_from_guest`] says what is wrong with one.

/// Bytes of a packet header.
pub const HEADER_LEN: usize = 44;
/// The host's CID (virtio-vsock's well-known address of the host).
pub const HOST_CID: u64 = 2;
/// The only socket type: stream.
pub const TYPE_STREAM: u16 = 1;
/// Largest payload we accept in one packet from the guest (Linux sends at most 64 KiB).
pub const MAX_PAYLOAD: u32 = 64 << 10;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flags: the sender will receive no more / send no more.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

/// A packet header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

/// Why a header from the guest cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("the packet has only {0} readable bytes, less than a {HEADER_LEN}-byte header")]
    ShortHeader(usize),
    #[error("source CID {got} is not the guest's ({expected})")]
    SourceCid { got: u64, expected: u64 },
    #[error("destination CID {0} is not the host's ({HOST_CID})")]
    DestinationCid(u64),
    #[error("payload length {0} exceeds {MAX_PAYLOAD} bytes")]
    Oversize(u32),
    #[error("payload length {len} but only {available} bytes follow the header")]
    ShortPayload { len: u32, available: usize },
    #[error("socket type {0} is not stream (1)")]
    Type(u16),
    #[error("the descriptor chain cannot be read: {0}")]
    Descriptors(String),
}

fn u16_at(b: &[u8; HEADER_LEN], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8; HEADER_LEN], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8; HEADER_LEN], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

impl Header {
    pub fn parse(b: &[u8; HEADER_LEN]) -> Header {
        Header {
            src_cid: u64_at(b, 0),
            dst_cid: u64_at(b, 8),
            src_port: u32_at(b, 16),
            dst_port: u32_at(b, 20),
            len: u32_at(b, 24),
            type_: u16_at(b, 28),
            op: u16_at(b, 30),
            flags: u32_at(b, 32),
            buf_alloc: u32_at(b, 36),
            fwd_cnt: u32_at(b, 40),
        }
    }

    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// Checks the addressing and length of a packet the guest sent; `available` is how many
    /// bytes follow the header in its descriptor chain. Type and op are the muxer's business
    /// (it answers them with RST).
    pub fn check_from_guest(&self, guest_cid: u64, available: usize) -> Result<(), PacketError> {
        if self.src_cid != guest_cid {
            return Err(PacketError::SourceCid {
                got: self.src_cid,
                expected: guest_cid,
            });
        }
        if self.dst_cid != HOST_CID {
            return Err(PacketError::DestinationCid(self.dst_cid));
        }
        if self.len > MAX_PAYLOAD {
            return Err(PacketError::Oversize(self.len));
        }
        if self.len as usize > available {
            return Err(PacketError::ShortPayload {
                len: self.len,
                available,
            });
        }
        Ok(())
    }

    /// A header from the host (`src` port) to the guest (`dst` port) with no credit fields
    /// filled in yet.
    pub fn to_guest(guest_cid: u64, src_port: u32, dst_port: u32, op: u16) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port,
            dst_port,
            type_: TYPE_STREAM,
            op,
            ..Header::default()
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_field_offsets() {
        let h = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 0x1111,
            dst_port: 0x2222,
            len: 5,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: 0,
            buf_alloc: 0x10000,
            fwd_cnt: 7,
        };
        let b = h.to_bytes();
        assert_eq!(b[0], 3);
        assert_eq!(b[8], 2);
        assert_eq!(&b[16..18], &[0x11, 0x11]);
        assert_eq!(b[30], OP_RW as u8);
        assert_eq!(Header::parse(&b), h);
    }

    #[test]
    fn guest_headers_are_checked() {
        let mut h = Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            len: 10,
            ..Header::default()
        };
        assert_eq!(h.check_from_guest(3, 10), Ok(()));
        assert_eq!(
            h.check_from_guest(3, 9),
            Err(PacketError::ShortPayload {
                len: 10,
                available: 9
            })
        );
        assert!(matches!(
            h.check_from_guest(4, 10),
            Err(PacketError::SourceCid { .. })
        ));
        h.dst_cid = 7;
        assert_eq!(
            h.check_from_guest(3, 10),
            Err(PacketError::DestinationCid(7))
        );
        h.dst_cid = HOST_CID;
        h.len = MAX_PAYLOAD + 1;
        assert_eq!(
            h.check_from_guest(3, usize::MAX),
            Err(PacketError::Oversize(MAX_PAYLOAD + 1))
        );
    }
}
