//! The migration stream's frames (docs/migration-protocol.md):
//!
//! ```text
//! [magic "VHMG"][kind u8][flags u8 = 0][payload length u32 LE][payload CRC-32 u32 LE][payload]
//! ```
//!
//! Either end treats the other as untrusted: the header is checked (magic, known kind, zero
//! flags, a length within the kind's bound) before any payload byte is buffered, and the
//! payload's checksum before it is interpreted. Any violation ends the migration with an error
//! that names it; nothing panics, whatever arrives.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};
use vhpc_api::VmConfig;

use crate::snapshot::HostInfo;
use crate::snapshot::format::{Component, DiskRecord};

pub const MAGIC: [u8; 4] = *b"VHMG";
/// The protocol version a Hello carries; a receiver refuses any other.
pub const PROTOCOL_VERSION: u32 = 1;
pub const HEADER_LEN: usize = 14;
/// Pages per Pages frame at most (1 MiB of 4 KiB pages).
pub const MAX_PAGES_PER_FRAME: usize = 256;
pub const PAGE_SIZE: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Source → destination: who is coming (postcard [`Hello`]).
    Hello = 1,
    /// Destination → source: ready to take it.
    Accept = 2,
    /// Destination → source: will not take it (UTF-8 reason).
    Refuse = 3,
    /// Source → destination: guest pages (`[gpa u64 LE]` + whole pages).
    Pages = 4,
    /// Source → destination: a pre-copy round ended (`[round u32][pages u64]`).
    RoundEnd = 5,
    /// Source → destination: the paused VM's state (postcard [`FinalState`]).
    State = 6,
    /// Destination → source: the VM is rebuilt, ready to run.
    Restored = 7,
    /// Source → destination: run it (the source will not resume).
    Commit = 8,
    /// Destination → source: it runs.
    Started = 9,
    /// Either way: giving up (UTF-8 reason).
    Abort = 10,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Hello,
            2 => Kind::Accept,
            3 => Kind::Refuse,
            4 => Kind::Pages,
            5 => Kind::RoundEnd,
            6 => Kind::State,
            7 => Kind::Restored,
            8 => Kind::Commit,
            9 => Kind::Started,
            10 => Kind::Abort,
            _ => return None,
        })
    }

    /// The largest payload this kind may carry.
    fn max_len(self) -> usize {
        match self {
            Kind::Hello => 1 << 20,
            Kind::Pages => 8 + MAX_PAGES_PER_FRAME * PAGE_SIZE,
            Kind::RoundEnd => 12,
            Kind::State => 64 << 20,
            Kind::Refuse | Kind::Abort => 4096,
            Kind::Accept | Kind::Restored | Kind::Commit | Kind::Started => 0,
        }
    }
}

/// What the source announces first.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Hello {
    pub protocol: u32,
    pub vhpc_version: String,
    pub host: HostInfo,
    pub config: VmConfig,
    /// What the source's VMM process passes on to the destination's (e.g. the guest agent's
    /// version): opaque to the migration itself.
    pub labels: Vec<(String, String)>,
}

/// What the source sends once the VM is paused for good.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FinalState {
    /// The machine's components, as a checkpoint's state.bin holds them.
    pub components: Vec<Component>,
    /// The disks' identity at the source when it stopped: the destination checks it sees the
    /// same files (shared storage).
    pub disks: Vec<DiskRecord>,
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("the migration stream broke: {0}")]
    Io(#[from] std::io::Error),
    #[error("the other side closed the migration stream")]
    Closed,
    #[error("the migration stream is not vhpc's (magic {0:02x?})")]
    Magic([u8; 4]),
    #[error("unknown frame kind {0} in the migration stream")]
    UnknownKind(u8),
    #[error("frame {kind:?} has flags {flags:#x}; none are defined")]
    Flags { kind: Kind, flags: u8 },
    #[error("frame {kind:?} claims {len} bytes, more than its limit of {max}")]
    TooLong { kind: Kind, len: usize, max: usize },
    #[error("frame {kind:?} is damaged (checksum mismatch)")]
    Checksum { kind: Kind },
    #[error("frame {kind:?} does not decode: {detail}")]
    Payload { kind: Kind, detail: String },
}

/// One frame as read.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub payload: Vec<u8>,
}

pub fn write_frame(out: &mut impl Write, kind: Kind, payload: &[u8]) -> Result<(), WireError> {
    debug_assert!(payload.len() <= kind.max_len());
    let mut header = [0u8; HEADER_LEN];
    header[..4].copy_from_slice(&MAGIC);
    header[4] = kind as u8;
    header[6..10].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    header[10..14].copy_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.write_all(&header)?;
    out.write_all(payload)?;
    Ok(())
}

pub fn write_postcard<T: Serialize>(
    out: &mut impl Write,
    kind: Kind,
    value: &T,
) -> Result<(), WireError> {
    let bytes = postcard::to_allocvec(value).map_err(|e| WireError::Payload {
        kind,
        detail: e.to_string(),
    })?;
    if bytes.len() > kind.max_len() {
        return Err(WireError::TooLong {
            kind,
            len: bytes.len(),
            max: kind.max_len(),
        });
    }
    write_frame(out, kind, &bytes)
}

/// `read_exact`, with the end of the stream told apart from other failures.
fn read_all(input: &mut impl Read, buf: &mut [u8]) -> Result<(), WireError> {
    input.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => WireError::Closed,
        _ => WireError::Io(e),
    })
}

pub fn read_frame(input: &mut impl Read) -> Result<Frame, WireError> {
    let mut header = [0u8; HEADER_LEN];
    read_all(input, &mut header)?;
    let mut magic = [0u8; 4];
    magic.copy_from_slice(&header[..4]);
    if magic != MAGIC {
        return Err(WireError::Magic(magic));
    }
    let kind = Kind::from_u8(header[4]).ok_or(WireError::UnknownKind(header[4]))?;
    if header[5] != 0 {
        return Err(WireError::Flags {
            kind,
            flags: header[5],
        });
    }
    let word = |at: usize| {
        u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
    };
    let len = word(6) as usize;
    if len > kind.max_len() {
        return Err(WireError::TooLong {
            kind,
            len,
            max: kind.max_len(),
        });
    }
    let mut payload = vec![0u8; len];
    read_all(input, &mut payload)?;
    if crc32fast::hash(&payload) != word(10) {
        return Err(WireError::Checksum { kind });
    }
    Ok(Frame { kind, payload })
}

impl Frame {
    pub fn postcard<'a, T: Deserialize<'a>>(&'a self) -> Result<T, WireError> {
        postcard::from_bytes(&self.payload).map_err(|e| WireError::Payload {
            kind: self.kind,
            detail: e.to_string(),
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }

    /// A Pages frame's guest-physical address and page data (whole pages, at least one).
    pub fn pages(&self) -> Result<(u64, &[u8]), WireError> {
        let bad = |detail: &str| WireError::Payload {
            kind: self.kind,
            detail: detail.into(),
        };
        let (gpa, data) = self
            .payload
            .split_at_checked(8)
            .ok_or_else(|| bad("shorter than its address"))?;
        let gpa = u64::from_le_bytes(gpa.try_into().map_err(|_| bad("address"))?);
        if data.is_empty() || data.len() % PAGE_SIZE != 0 || gpa % PAGE_SIZE as u64 != 0 {
            return Err(bad("not whole, aligned pages"));
        }
        Ok((gpa, data))
    }
}

/// A Pages payload for the run of pages at `gpa`.
pub fn pages_payload(gpa: u64, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + data.len());
    out.extend_from_slice(&gpa.to_le_bytes());
    out.extend_from_slice(data);
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    fn frame_bytes(kind: Kind, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        write_frame(&mut v, kind, payload).unwrap();
        v
    }

    #[test]
    fn frames_round_trip() {
        let page = vec![7u8; PAGE_SIZE];
        let bytes = frame_bytes(Kind::Pages, &pages_payload(0x2000, &page));
        let f = read_frame(&mut bytes.as_slice()).unwrap();
        assert_eq!(f.kind, Kind::Pages);
        assert_eq!(f.pages().unwrap(), (0x2000, page.as_slice()));
        let f = read_frame(&mut frame_bytes(Kind::Commit, &[]).as_slice()).unwrap();
        assert_eq!(
            f,
            Frame {
                kind: Kind::Commit,
                payload: vec![]
            }
        );
    }

    #[test]
    fn damaged_frames_are_refused_with_their_reason() {
        let good = frame_bytes(Kind::Refuse, b"no");
        let mut b = good.clone();
        b[0] = b'X';
        assert!(matches!(
            read_frame(&mut b.as_slice()),
            Err(WireError::Magic(_))
        ));
        let mut b = good.clone();
        b[4] = 99;
        assert!(matches!(
            read_frame(&mut b.as_slice()),
            Err(WireError::UnknownKind(99))
        ));
        let mut b = good.clone();
        b[5] = 1;
        assert!(matches!(
            read_frame(&mut b.as_slice()),
            Err(WireError::Flags { .. })
        ));
        let mut b = good.clone();
        b[HEADER_LEN] ^= 1;
        assert!(matches!(
            read_frame(&mut b.as_slice()),
            Err(WireError::Checksum { .. })
        ));
        // A length over the kind's bound is refused before anything is allocated.
        let mut b = frame_bytes(Kind::Commit, &[]);
        b[6..10].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            read_frame(&mut b.as_slice()),
            Err(WireError::TooLong { .. })
        ));
        // Cut anywhere: the stream ended, never a panic.
        for cut in 0..good.len() {
            assert!(matches!(
                read_frame(&mut &good[..cut]),
                Err(WireError::Closed)
            ));
        }
    }

    #[test]
    fn page_frames_must_hold_whole_aligned_pages() {
        for payload in [
            pages_payload(0x1000, &[1u8; 100]),
            pages_payload(0x1001, &[1u8; PAGE_SIZE]),
            pages_payload(0x1000, &[]),
            vec![1, 2, 3],
        ] {
            let bytes = frame_bytes(Kind::Pages, &payload);
            let f = read_frame(&mut bytes.as_slice()).unwrap();
            assert!(f.pages().is_err(), "{} bytes", payload.len());
        }
    }

    #[test]
    fn random_streams_never_panic() {
        let mut seed = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let valid = frame_bytes(Kind::RoundEnd, &[0u8; 12]);
        for _ in 0..2000 {
            let mut b = valid.clone();
            let flips = next() % 4;
            for _ in 0..flips {
                let at = (next() as usize) % b.len();
                b[at] = next() as u8;
            }
            b.truncate((next() as usize) % (b.len() + 1));
            if let Ok(f) = read_frame(&mut b.as_slice()) {
                let _ = f.pages();
                let _ = f.postcard::<Hello>();
            }
        }
    }
}
