//! Cutting a byte stream into frames, for both wire formats (the one-shot agent's frames and
//! the session protocol's messages): bytes arrive in pieces of any size, a frame is returned
//! once all of it is there.
//!
//! The stream is untrusted. Once it is found corrupt the decoder cannot resynchronise
//! (payload bytes can look like a header), so the error is sticky: every later `push` returns
//! it again. Frames decoded before the corruption are still returned first. To start over
//! after an error, make a new decoder.

use std::marker::PhantomData;

/// One wire format: how a frame starts, how long it is, what it means.
pub trait FrameFormat {
    type Frame;
    type Error: Clone;
    /// Parses the frame at the start of `bytes`, which begin at stream offset `offset` (for
    /// error messages): the frame and its length in bytes, `None` if more bytes are needed.
    fn parse(bytes: &[u8], offset: u64) -> Result<Option<(Self::Frame, usize)>, Self::Error>;
}

/// Incremental decoder of a stream of `F`'s frames.
pub struct StreamDecoder<F: FrameFormat> {
    buf: Vec<u8>,
    /// Stream offset of `buf[0]`, for error messages.
    offset: u64,
    failed: Option<F::Error>,
    _format: PhantomData<F>,
}

impl<F: FrameFormat> Default for StreamDecoder<F> {
    fn default() -> Self {
        StreamDecoder {
            buf: Vec::new(),
            offset: 0,
            failed: None,
            _format: PhantomData,
        }
    }
}

impl<F: FrameFormat> std::fmt::Debug for StreamDecoder<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamDecoder")
            .field("pending_bytes", &self.buf.len())
            .field("offset", &self.offset)
            .field("failed", &self.failed.is_some())
            .finish()
    }
}

impl<F: FrameFormat> StreamDecoder<F> {
    /// A decoder at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `bytes` and returns every frame completed by them, in order.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<F::Frame>, F::Error> {
        if let Some(err) = &self.failed {
            return Err(err.clone());
        }
        self.buf.extend_from_slice(bytes);
        let mut frames = Vec::new();
        let mut pos = 0;
        let result = loop {
            match F::parse(&self.buf[pos..], self.offset + pos as u64) {
                Ok(Some((frame, used))) => {
                    frames.push(frame);
                    pos += used;
                }
                Ok(None) => break Ok(()),
                Err(err) => break Err(err),
            }
        };
        self.buf.drain(..pos);
        self.offset += pos as u64;
        match result {
            Ok(()) => Ok(frames),
            Err(err) => {
                self.buf = Vec::new();
                self.failed = Some(err.clone());
                if frames.is_empty() {
                    Err(err)
                } else {
                    Ok(frames)
                }
            }
        }
    }

    /// Bytes of an incomplete frame still waiting for the rest; non-zero at the end of a
    /// stream means the sender stopped mid-frame.
    pub fn pending_bytes(&self) -> usize {
        self.buf.len()
    }
}
