//! The fixed 128-byte frame header: a validated, zero-copy view over bytes
//! ([`FrameHeader`]) and an owned, always-valid buffer to build one
//! ([`FrameHeaderBuf`]).

use crate::ids::{RoomId, SenderId};
use crate::limits::{HEADER_BYTES, SIGNATURE_BYTES};
use crate::opcode::{is_reserved_opcode, Opcode, OpcodeClass};

/// Magic number at offset 0 (`"SUND"`).
pub const MAGIC: u32 = 0x5355_4E44;
/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u8 = 0x01;

/// Byte offsets of the header fields. All integers are big-endian.
pub mod offset {
    /// `u32` magic.
    pub const MAGIC: usize = 0;
    /// `u8` protocol version.
    pub const VERSION: usize = 4;
    /// `u8` flags.
    pub const FLAGS: usize = 5;
    /// `u16` opcode.
    pub const OPCODE: usize = 6;
    /// `u32` payload length in bytes.
    pub const PAYLOAD_LEN: usize = 8;
    /// `u32` request id (0 for pushes).
    pub const REQUEST_ID: usize = 12;
    /// 16-byte room id.
    pub const ROOM_ID: usize = 16;
    /// `u64` sender id.
    pub const SENDER_ID: usize = 32;
    /// `u64` log index, assigned by the sequencer.
    pub const LOG_INDEX: usize = 40;
    /// `u64` MLS epoch.
    pub const EPOCH: usize = 48;
    /// `u64` server timestamp in milliseconds since the Unix epoch, assigned by the sequencer.
    pub const SERVER_TIMESTAMP: usize = 56;
    /// 64-byte Ed25519 signature.
    pub const SIGNATURE: usize = 64;
}

const _: () = assert!(offset::VERSION == offset::MAGIC + 4);
const _: () = assert!(offset::FLAGS == offset::VERSION + 1);
const _: () = assert!(offset::OPCODE == offset::FLAGS + 1);
const _: () = assert!(offset::PAYLOAD_LEN == offset::OPCODE + 2);
const _: () = assert!(offset::REQUEST_ID == offset::PAYLOAD_LEN + 4);
const _: () = assert!(offset::ROOM_ID == offset::REQUEST_ID + 4);
const _: () = assert!(offset::SENDER_ID == offset::ROOM_ID + 16);
const _: () = assert!(offset::LOG_INDEX == offset::SENDER_ID + 8);
const _: () = assert!(offset::EPOCH == offset::LOG_INDEX + 8);
const _: () = assert!(offset::SERVER_TIMESTAMP == offset::EPOCH + 8);
const _: () = assert!(offset::SIGNATURE == offset::SERVER_TIMESTAMP + 8);
const _: () = assert!(offset::SIGNATURE + SIGNATURE_BYTES == HEADER_BYTES);
/// The signed part of the header is everything before the signature.
pub const SIGNED_HEADER_BYTES: usize = offset::SIGNATURE;

/// Header flags (byte 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Flags(u8);

impl Flags {
    /// The frame carries the sender's signature in bytes 64..128.
    pub const SIGNED: Flags = Flags(0x01);
    /// The frame carries an origin server's countersignature (federation).
    pub const COUNTERSIGNED: Flags = Flags(0x02);
    /// The frame is ephemeral: fanned out, never stored. Set exactly for ephemeral opcodes.
    pub const EPHEMERAL: Flags = Flags(0x04);
    /// Bits that must be zero in this version.
    pub const RESERVED_MASK: u8 = 0xF8;

    /// No flags.
    pub const fn empty() -> Flags {
        Flags(0)
    }
    /// Flags from a wire byte, or `None` if a reserved bit is set.
    pub const fn from_bits(bits: u8) -> Option<Flags> {
        if bits & Self::RESERVED_MASK == 0 {
            Some(Flags(bits))
        } else {
            None
        }
    }
    /// The wire byte.
    pub const fn bits(self) -> u8 {
        self.0
    }
    /// Whether every flag of `other` is set.
    pub const fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }
    /// These flags plus `other`.
    #[must_use]
    pub const fn with(self, other: Flags) -> Flags {
        Flags(self.0 | other.0)
    }
    /// These flags without `other`.
    #[must_use]
    pub const fn without(self, other: Flags) -> Flags {
        Flags(self.0 & !other.0)
    }
}

/// Why bytes are not a valid frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Fewer than 128 bytes were given.
    #[error("header needs {HEADER_BYTES} bytes, got {len_bytes}")]
    TooShort {
        /// Bytes available.
        len_bytes: usize,
    },
    /// The magic number is not `0x53554E44`.
    #[error("bad magic {found:#010x}")]
    BadMagic {
        /// The value found.
        found: u32,
    },
    /// The version byte is not one this implementation speaks.
    #[error("unsupported protocol version {found}")]
    UnsupportedVersion {
        /// The value found.
        found: u8,
    },
    /// The opcode is not defined.
    #[error("unknown opcode {found:#06x}")]
    UnknownOpcode {
        /// The value found.
        found: u16,
    },
    /// The opcode lies in a range reserved for federation or authority handover.
    #[error("opcode {found:#06x} is in a reserved range")]
    ReservedOpcode {
        /// The value found.
        found: u16,
    },
    /// A reserved flag bit is set.
    #[error("reserved flag bits set in {flags:#04x}")]
    ReservedFlags {
        /// The flags byte found.
        flags: u8,
    },
    /// The ephemeral flag disagrees with the opcode's class.
    #[error("ephemeral flag does not match opcode {opcode:#06x}")]
    EphemeralFlagMismatch {
        /// The opcode.
        opcode: u16,
    },
    /// The payload length exceeds the opcode's limit.
    #[error("payload of {len_bytes} bytes exceeds the limit of {max_bytes} for opcode {opcode:#06x}")]
    PayloadTooLarge {
        /// The opcode.
        opcode: u16,
        /// The declared length.
        len_bytes: u32,
        /// The opcode's limit.
        max_bytes: u32,
    },
}

#[inline(always)]
fn read_u16(bytes: &[u8; HEADER_BYTES], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

#[inline(always)]
fn read_u32(bytes: &[u8; HEADER_BYTES], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

#[inline(always)]
fn read_u64(bytes: &[u8; HEADER_BYTES], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_be_bytes(word)
}

/// Validates a header and returns its opcode.
#[inline]
fn validate(bytes: &[u8; HEADER_BYTES]) -> Result<Opcode, HeaderError> {
    let magic = read_u32(bytes, offset::MAGIC);
    if magic != MAGIC {
        return Err(HeaderError::BadMagic { found: magic });
    }
    let version = bytes[offset::VERSION];
    if version != PROTOCOL_VERSION {
        return Err(HeaderError::UnsupportedVersion { found: version });
    }
    let flags = bytes[offset::FLAGS];
    if flags & Flags::RESERVED_MASK != 0 {
        return Err(HeaderError::ReservedFlags { flags });
    }
    let opcode_value = read_u16(bytes, offset::OPCODE);
    let Some(opcode) = Opcode::from_u16(opcode_value) else {
        if is_reserved_opcode(opcode_value) {
            return Err(HeaderError::ReservedOpcode { found: opcode_value });
        }
        return Err(HeaderError::UnknownOpcode { found: opcode_value });
    };
    let ephemeral_flag = flags & Flags::EPHEMERAL.bits() != 0;
    if ephemeral_flag != (opcode.class() == OpcodeClass::Ephemeral) {
        return Err(HeaderError::EphemeralFlagMismatch { opcode: opcode_value });
    }
    let len_bytes = read_u32(bytes, offset::PAYLOAD_LEN);
    let max_bytes = opcode.payload_bytes_max();
    if len_bytes > max_bytes {
        return Err(HeaderError::PayloadTooLarge { opcode: opcode_value, len_bytes, max_bytes });
    }
    Ok(opcode)
}

/// A validated, zero-copy, allocation-free view of a 128-byte frame header.
///
/// Obtained with [`FrameHeader::parse`], which checks magic, version, reserved
/// flag bits, opcode and payload length before anything else is read.
#[derive(Clone, Copy)]
pub struct FrameHeader<'a> {
    bytes: &'a [u8; HEADER_BYTES],
    opcode: Opcode,
}

impl<'a> FrameHeader<'a> {
    /// Size of a header in bytes.
    pub const SIZE: usize = HEADER_BYTES;

    /// Parses and validates the first 128 bytes of `data`; the rest is ignored.
    #[inline]
    pub fn parse(data: &'a [u8]) -> Result<FrameHeader<'a>, HeaderError> {
        let Some(prefix) = data.first_chunk::<HEADER_BYTES>() else {
            return Err(HeaderError::TooShort { len_bytes: data.len() });
        };
        let opcode = validate(prefix)?;
        Ok(FrameHeader { bytes: prefix, opcode })
    }

    /// The raw 128 bytes.
    #[inline]
    pub fn as_bytes(&self) -> &'a [u8; HEADER_BYTES] {
        self.bytes
    }
    /// Protocol version (byte 4).
    #[inline]
    pub fn version(&self) -> u8 {
        self.bytes[offset::VERSION]
    }
    /// Flags (byte 5).
    #[inline]
    pub fn flags(&self) -> Flags {
        Flags(self.bytes[offset::FLAGS])
    }
    /// Opcode (bytes 6..8).
    #[inline]
    pub fn opcode(&self) -> Opcode {
        self.opcode
    }
    /// Payload length in bytes (bytes 8..12).
    #[inline]
    pub fn payload_len(&self) -> u32 {
        read_u32(self.bytes, offset::PAYLOAD_LEN)
    }
    /// Request id (bytes 12..16); 0 for pushes.
    #[inline]
    pub fn request_id(&self) -> u32 {
        read_u32(self.bytes, offset::REQUEST_ID)
    }
    /// Room id (bytes 16..32).
    #[inline]
    pub fn room_id(&self) -> RoomId {
        let mut room = [0u8; 16];
        room.copy_from_slice(&self.bytes[offset::ROOM_ID..offset::ROOM_ID + 16]);
        RoomId(room)
    }
    /// Sender id (bytes 32..40).
    #[inline]
    pub fn sender_id(&self) -> SenderId {
        SenderId(read_u64(self.bytes, offset::SENDER_ID))
    }
    /// Log index (bytes 40..48), assigned by the sequencer.
    #[inline]
    pub fn log_index(&self) -> u64 {
        read_u64(self.bytes, offset::LOG_INDEX)
    }
    /// MLS epoch (bytes 48..56).
    #[inline]
    pub fn epoch(&self) -> u64 {
        read_u64(self.bytes, offset::EPOCH)
    }
    /// Server timestamp in ms since the Unix epoch (bytes 56..64), assigned by the sequencer.
    #[inline]
    pub fn server_timestamp_ms(&self) -> u64 {
        read_u64(self.bytes, offset::SERVER_TIMESTAMP)
    }
    /// Signature (bytes 64..128).
    #[inline]
    pub fn signature(&self) -> &'a [u8; SIGNATURE_BYTES] {
        self.bytes.last_chunk::<SIGNATURE_BYTES>().expect("header is longer than a signature")
    }
    /// An owned copy.
    #[inline]
    pub fn to_buf(&self) -> FrameHeaderBuf {
        FrameHeaderBuf { bytes: *self.bytes, opcode: self.opcode }
    }
}

impl std::fmt::Debug for FrameHeader<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameHeader")
            .field("version", &self.version())
            .field("flags", &self.flags())
            .field("opcode", &self.opcode())
            .field("payload_len", &self.payload_len())
            .field("request_id", &self.request_id())
            .field("room_id", &self.room_id())
            .field("sender_id", &self.sender_id())
            .field("log_index", &self.log_index())
            .field("epoch", &self.epoch())
            .field("server_timestamp_ms", &self.server_timestamp_ms())
            .finish_non_exhaustive()
    }
}

/// An owned header that is valid at all times: every setter keeps it valid.
///
/// The payload length is set by [`crate::Frame::new`], which checks it
/// against the opcode's limit.
#[derive(Clone, PartialEq, Eq)]
pub struct FrameHeaderBuf {
    bytes: [u8; HEADER_BYTES],
    opcode: Opcode,
}

impl FrameHeaderBuf {
    /// A header for `opcode` with every other field zero (and the ephemeral
    /// flag set if the opcode is ephemeral).
    pub fn new(opcode: Opcode) -> FrameHeaderBuf {
        let mut bytes = [0u8; HEADER_BYTES];
        bytes[offset::MAGIC..offset::MAGIC + 4].copy_from_slice(&MAGIC.to_be_bytes());
        bytes[offset::VERSION] = PROTOCOL_VERSION;
        bytes[offset::OPCODE..offset::OPCODE + 2].copy_from_slice(&opcode.to_u16().to_be_bytes());
        if opcode.class() == OpcodeClass::Ephemeral {
            bytes[offset::FLAGS] = Flags::EPHEMERAL.bits();
        }
        FrameHeaderBuf { bytes, opcode }
    }

    /// A validated view.
    #[inline]
    pub fn view(&self) -> FrameHeader<'_> {
        FrameHeader { bytes: &self.bytes, opcode: self.opcode }
    }
    /// The raw 128 bytes.
    #[inline]
    pub fn as_bytes(&self) -> &[u8; HEADER_BYTES] {
        &self.bytes
    }
    /// Opcode.
    #[inline]
    pub fn opcode(&self) -> Opcode {
        self.opcode
    }

    fn put_u64(&mut self, at: usize, value: u64) {
        self.bytes[at..at + 8].copy_from_slice(&value.to_be_bytes());
    }

    /// Sets or clears [`Flags::SIGNED`] and [`Flags::COUNTERSIGNED`]; the
    /// ephemeral flag follows the opcode and is not changed here.
    pub fn set_signature_flags(&mut self, signed: bool, countersigned: bool) -> &mut Self {
        let mut flags = Flags(self.bytes[offset::FLAGS]).without(Flags::SIGNED).without(Flags::COUNTERSIGNED);
        if signed {
            flags = flags.with(Flags::SIGNED);
        }
        if countersigned {
            flags = flags.with(Flags::COUNTERSIGNED);
        }
        self.bytes[offset::FLAGS] = flags.bits();
        self
    }
    /// Sets the request id.
    pub fn set_request_id(&mut self, request_id: u32) -> &mut Self {
        self.bytes[offset::REQUEST_ID..offset::REQUEST_ID + 4].copy_from_slice(&request_id.to_be_bytes());
        self
    }
    /// Sets the room id.
    pub fn set_room_id(&mut self, room_id: RoomId) -> &mut Self {
        self.bytes[offset::ROOM_ID..offset::ROOM_ID + 16].copy_from_slice(&room_id.0);
        self
    }
    /// Sets the sender id.
    pub fn set_sender_id(&mut self, sender_id: SenderId) -> &mut Self {
        self.put_u64(offset::SENDER_ID, sender_id.0);
        self
    }
    /// Sets the log index (the sequencer's field).
    pub fn set_log_index(&mut self, log_index: u64) -> &mut Self {
        self.put_u64(offset::LOG_INDEX, log_index);
        self
    }
    /// Sets the MLS epoch.
    pub fn set_epoch(&mut self, epoch: u64) -> &mut Self {
        self.put_u64(offset::EPOCH, epoch);
        self
    }
    /// Sets the server timestamp (the sequencer's field).
    pub fn set_server_timestamp_ms(&mut self, server_timestamp_ms: u64) -> &mut Self {
        self.put_u64(offset::SERVER_TIMESTAMP, server_timestamp_ms);
        self
    }
    /// Sets the signature bytes.
    pub fn set_signature(&mut self, signature: &[u8; SIGNATURE_BYTES]) -> &mut Self {
        self.bytes[offset::SIGNATURE..].copy_from_slice(signature);
        self
    }
    /// Sets the payload length. Crate-private: [`crate::Frame::new`] checks it.
    pub(crate) fn set_payload_len(&mut self, len_bytes: u32) {
        debug_assert!(len_bytes <= self.opcode.payload_bytes_max());
        self.bytes[offset::PAYLOAD_LEN..offset::PAYLOAD_LEN + 4].copy_from_slice(&len_bytes.to_be_bytes());
    }
}

impl std::fmt::Debug for FrameHeaderBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.view().fmt(f)
    }
}
