//! Kalandra's wire protocol, without I/O.
//!
//! A frame is a fixed 128-byte big-endian header ([`FrameHeader`]) followed by
//! a CBOR payload ([`payload`]). This crate parses and validates headers
//! without copying or allocating, encodes frames, decodes them from a byte
//! stream cut anywhere ([`FrameDecoder`]), signs and verifies them
//! ([`sign`]), and defines the stable error codes ([`ErrorCode`]) and every
//! limit ([`limits`]). It has no sockets, no clock and no global randomness.
//!
//! The normative description is `docs/wire-protocol.md`.
#![forbid(unsafe_code)]

pub mod chain;
mod epoch_tag;
pub mod error_code;
pub mod federation;
pub mod frame;
pub mod header;
pub mod home;
pub mod ids;
pub mod limits;
pub mod opcode;
pub mod payload;
pub mod sign;

pub use epoch_tag::epoch_tag;
pub use error_code::{ErrorClass, ErrorCode};
pub use frame::{DecodeError, Frame, FrameDecoder, FrameError};
pub use header::{Flags, FrameHeader, FrameHeaderBuf, HeaderError, MAGIC, PROTOCOL_VERSION};
pub use ids::{RoomId, SenderId};
pub use opcode::{Opcode, OpcodeClass};
pub use payload::{AnyPayload, Payload, PayloadError};
pub use sign::SignatureError;
