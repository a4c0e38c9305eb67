//! Frames (header plus payload), encoding, and a streaming decoder.

use bytes::{BufMut, Bytes, BytesMut};

use crate::header::{FrameHeader, FrameHeaderBuf, HeaderError};
use crate::limits::{HEADER_BYTES, PAYLOAD_BYTES_MAX};
use crate::opcode::Opcode;
use crate::payload::{Payload, PayloadError};
use crate::ErrorCode;

/// Why a frame could not be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The payload exceeds the opcode's limit.
    #[error("payload of {len_bytes} bytes exceeds {max_bytes} for {}", opcode.name())]
    PayloadTooLarge {
        /// The frame's opcode.
        opcode: Opcode,
        /// Payload length.
        len_bytes: usize,
        /// The opcode's limit.
        max_bytes: u32,
    },
    /// The payload type belongs to another opcode.
    #[error("payload for {} given to a {} header", expected.name(), found.name())]
    OpcodeMismatch {
        /// Opcode of the payload type.
        expected: Opcode,
        /// Opcode of the header.
        found: Opcode,
    },
}

/// Why bytes could not be decoded into frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The header is invalid.
    #[error(transparent)]
    Header(#[from] HeaderError),
    /// The payload exceeds the decoder's configured limit (lower than the protocol's).
    #[error("payload of {len_bytes} bytes exceeds this endpoint's limit of {max_bytes}")]
    PayloadTooLarge {
        /// Declared length.
        len_bytes: u32,
        /// The decoder's limit.
        max_bytes: u32,
    },
    /// The input ended inside a frame (only for whole-buffer decoding).
    #[error("input ends {missing_bytes} bytes before the end of the frame")]
    Truncated {
        /// Bytes missing.
        missing_bytes: usize,
    },
    /// Bytes follow the frame (only for whole-buffer decoding).
    #[error("{trailing_bytes} bytes after the frame")]
    TrailingBytes {
        /// Extra bytes.
        trailing_bytes: usize,
    },
    /// An earlier error left the stream unframed; no more frames can be read from it.
    #[error("the stream failed earlier and cannot be resynchronised")]
    Poisoned,
}

impl HeaderError {
    /// The error code to send a peer whose header failed this way.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            HeaderError::TooShort { .. }
            | HeaderError::BadMagic { .. }
            | HeaderError::ReservedFlags { .. }
            | HeaderError::EphemeralFlagMismatch { .. } => ErrorCode::MalformedHeader,
            HeaderError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            HeaderError::UnknownOpcode { .. } | HeaderError::ReservedOpcode { .. } => {
                ErrorCode::UnknownOpcode
            }
            HeaderError::PayloadTooLarge { .. } => ErrorCode::PayloadTooLarge,
        }
    }
}

impl DecodeError {
    /// The error code to send a peer whose stream failed this way.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            DecodeError::Header(header) => header.error_code(),
            DecodeError::PayloadTooLarge { .. } => ErrorCode::PayloadTooLarge,
            DecodeError::Truncated { .. } | DecodeError::TrailingBytes { .. } | DecodeError::Poisoned => {
                ErrorCode::MalformedHeader
            }
        }
    }
}

/// A frame: a valid header and its payload.
#[derive(Clone, PartialEq, Eq)]
pub struct Frame {
    header: FrameHeaderBuf,
    payload: Bytes,
}

impl Frame {
    /// A frame with `payload`; sets the header's payload length.
    pub fn new(mut header: FrameHeaderBuf, payload: Bytes) -> Result<Frame, FrameError> {
        let opcode = header.opcode();
        let max_bytes = opcode.payload_bytes_max();
        if payload.len() > max_bytes as usize {
            return Err(FrameError::PayloadTooLarge { opcode, len_bytes: payload.len(), max_bytes });
        }
        let len_bytes = u32::try_from(payload.len()).expect("checked against a u32 limit above");
        header.set_payload_len(len_bytes);
        Ok(Frame { header, payload })
    }

    /// A frame carrying `payload` encoded as CBOR.
    pub fn with_payload<P: Payload>(header: FrameHeaderBuf, payload: &P) -> Result<Frame, FrameError> {
        if header.opcode() != P::OPCODE {
            return Err(FrameError::OpcodeMismatch { expected: P::OPCODE, found: header.opcode() });
        }
        Frame::new(header, payload.encode())
    }

    /// Decodes exactly one frame occupying all of `data`, without copying the payload.
    pub fn decode(data: &Bytes) -> Result<Frame, DecodeError> {
        let header = FrameHeader::parse(data)?;
        let frame_bytes = HEADER_BYTES + header.payload_len() as usize;
        if data.len() < frame_bytes {
            return Err(DecodeError::Truncated { missing_bytes: frame_bytes - data.len() });
        }
        if data.len() > frame_bytes {
            return Err(DecodeError::TrailingBytes { trailing_bytes: data.len() - frame_bytes });
        }
        Ok(Frame { header: header.to_buf(), payload: data.slice(HEADER_BYTES..frame_bytes) })
    }

    /// The header.
    #[inline]
    pub fn header(&self) -> FrameHeader<'_> {
        self.header.view()
    }
    /// The header, for setting its fields.
    #[inline]
    pub fn header_mut(&mut self) -> &mut FrameHeaderBuf {
        &mut self.header
    }
    /// The opcode.
    #[inline]
    pub fn opcode(&self) -> Opcode {
        self.header.opcode()
    }
    /// The payload bytes.
    #[inline]
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }
    /// Decodes the payload as `P`, which must belong to this frame's opcode.
    pub fn decode_payload<P: Payload>(&self) -> Result<P, PayloadError> {
        if self.opcode() != P::OPCODE {
            return Err(PayloadError::OpcodeMismatch { expected: P::OPCODE, found: self.opcode() });
        }
        P::decode(&self.payload)
    }
    /// Encoded length in bytes.
    #[inline]
    pub fn encoded_len(&self) -> usize {
        HEADER_BYTES + self.payload.len()
    }
    /// Appends the encoding to `out`.
    #[inline]
    pub fn encode_into(&self, out: &mut impl BufMut) {
        out.put_slice(self.header.as_bytes());
        out.put_slice(&self.payload);
    }
    /// The encoding as one buffer.
    pub fn to_bytes(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(self.encoded_len());
        self.encode_into(&mut out);
        out.freeze()
    }
}

impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Frame")
            .field("header", &self.header)
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

/// Where the decoder is inside the current frame.
enum DecodeState {
    /// Collecting header bytes; `filled` of 128 are in the scratch buffer.
    Header { filled: usize },
    /// Header valid; collecting exactly the payload's bytes.
    Payload { header: FrameHeaderBuf, payload: BytesMut, len_bytes: usize },
    /// A previous error: the stream cannot be reframed.
    Poisoned,
}

/// Decodes frames from a byte stream cut into chunks of any size.
///
/// It holds at most one partial frame. The header is validated as soon as its
/// 128 bytes are in, so an oversized length is refused before any of its
/// payload is buffered. After an error every call returns
/// [`DecodeError::Poisoned`]: a byte stream cannot be reframed.
pub struct FrameDecoder {
    scratch: [u8; HEADER_BYTES],
    state: DecodeState,
    payload_bytes_max: u32,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        FrameDecoder::new()
    }
}

impl FrameDecoder {
    /// A decoder that accepts the protocol's limits.
    pub fn new() -> FrameDecoder {
        FrameDecoder::with_payload_bytes_max(PAYLOAD_BYTES_MAX)
    }

    /// A decoder that refuses payloads above `payload_bytes_max` (capped at the protocol's limit).
    pub fn with_payload_bytes_max(payload_bytes_max: u32) -> FrameDecoder {
        FrameDecoder {
            scratch: [0; HEADER_BYTES],
            state: DecodeState::Header { filled: 0 },
            payload_bytes_max: payload_bytes_max.min(PAYLOAD_BYTES_MAX),
        }
    }

    /// Changes the payload limit for the frames whose header is still to come
    /// (capped at the protocol's limit), for example once a connection
    /// authenticates.
    pub fn set_payload_bytes_max(&mut self, payload_bytes_max: u32) {
        self.payload_bytes_max = payload_bytes_max.min(PAYLOAD_BYTES_MAX);
    }

    /// After a header error: the refused frame's request id, when its magic
    /// and version were valid (so bytes 12..16 are a request id in this
    /// layout); `None` otherwise, and while the decoder has not failed.
    pub fn failed_request_id(&self) -> Option<u32> {
        if !matches!(self.state, DecodeState::Poisoned) {
            return None;
        }
        let field =
            |range: std::ops::Range<usize>| -> Option<[u8; 4]> { self.scratch.get(range)?.try_into().ok() };
        let magic = u32::from_be_bytes(field(0..4)?);
        let version = self.scratch[4];
        (magic == crate::header::MAGIC && version == crate::header::PROTOCOL_VERSION)
            .then(|| field(12..16).map(u32::from_be_bytes))
            .flatten()
    }

    /// Whether the decoder is between frames (no partial frame buffered).
    pub fn is_idle(&self) -> bool {
        matches!(self.state, DecodeState::Header { filled: 0 })
    }

    /// Consumes bytes from the front of `input` and returns the next complete
    /// frame, or `None` once `input` is exhausted without completing one.
    /// Call it again while `input` is not empty.
    pub fn decode(&mut self, input: &mut &[u8]) -> Result<Option<Frame>, DecodeError> {
        loop {
            match &mut self.state {
                DecodeState::Poisoned => return Err(DecodeError::Poisoned),
                DecodeState::Header { filled } => {
                    let take = (HEADER_BYTES - *filled).min(input.len());
                    self.scratch[*filled..*filled + take].copy_from_slice(&input[..take]);
                    *input = &input[take..];
                    *filled += take;
                    if *filled < HEADER_BYTES {
                        return Ok(None);
                    }
                    let header = match FrameHeader::parse(&self.scratch) {
                        Ok(header) => header,
                        Err(error) => {
                            self.state = DecodeState::Poisoned;
                            return Err(error.into());
                        }
                    };
                    let len = header.payload_len();
                    if len > self.payload_bytes_max {
                        self.state = DecodeState::Poisoned;
                        return Err(DecodeError::PayloadTooLarge {
                            len_bytes: len,
                            max_bytes: self.payload_bytes_max,
                        });
                    }
                    let header = header.to_buf();
                    if len == 0 {
                        self.state = DecodeState::Header { filled: 0 };
                        return Ok(Some(Frame { header, payload: Bytes::new() }));
                    }
                    let len_bytes = len as usize;
                    self.state = DecodeState::Payload {
                        header,
                        payload: BytesMut::with_capacity(len_bytes),
                        len_bytes,
                    };
                }
                DecodeState::Payload { header, payload, len_bytes } => {
                    let take = (*len_bytes - payload.len()).min(input.len());
                    payload.extend_from_slice(&input[..take]);
                    *input = &input[take..];
                    if payload.len() < *len_bytes {
                        return Ok(None);
                    }
                    let frame = Frame { header: header.clone(), payload: std::mem::take(payload).freeze() };
                    self.state = DecodeState::Header { filled: 0 };
                    return Ok(Some(frame));
                }
            }
        }
    }
}
