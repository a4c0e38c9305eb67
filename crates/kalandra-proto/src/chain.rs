//! The room log's hash chain and the server's signed statement of its head.
//!
//! Every sequenced frame extends its room's running head:
//!
//! - `frame_digest_i = SHA-256(frame_i)`, over the whole encoded frame as
//!   sequenced (the 128-byte header with log index and server timestamp
//!   filled in, then the payload);
//! - `head_i = SHA-256("kalandra log head v1" ‖ room_id (16) ‖ i (u64 BE) ‖
//!   head_{i-1} (32) ‖ frame_digest_i (32))`, with `head_{-1}` 32 zero bytes.
//!
//! The head at index `i` is a function of the room's log through `i` and
//! nothing else: two parties holding the same head at the same index hold
//! the same log up to it. The server signs the heads it reaches
//! ([`SignedLogHead`]): the signing input is
//! `"kalandra signed log head v1" ‖ room_id (16) ‖ i (u64 BE) ‖ head_i (32)`,
//! Ed25519 over those bytes with the server's key (the room's MLS external
//! sender). Two valid signatures by one key over different heads for the
//! same room and index are a proof that the server showed two orders.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error_code::ErrorCode;
use crate::frame::Frame;
use crate::ids::RoomId;
use crate::opcode::Opcode;
use crate::payload;
use crate::sign::SignatureError;

/// Length of a frame digest and of a log head (SHA-256).
pub const LOG_HEAD_BYTES: usize = 32;
/// Length of the server's signature over a head (Ed25519).
pub const LOG_HEAD_SIGNATURE_BYTES: usize = 64;

/// A room log's running head after some index.
pub type LogHead = [u8; LOG_HEAD_BYTES];
/// The SHA-256 digest of one sequenced frame.
pub type FrameDigest = [u8; LOG_HEAD_BYTES];

/// The head before a room's first frame (`head_{-1}`).
pub const GENESIS_LOG_HEAD: LogHead = [0; LOG_HEAD_BYTES];

/// Domain separation of the head computation.
pub const LOG_HEAD_CONTEXT: &[u8] = b"kalandra log head v1";
/// Domain separation of the server's signature over a head.
pub const SIGNED_LOG_HEAD_CONTEXT: &[u8] = b"kalandra signed log head v1";

const HEAD_INPUT_BYTES: usize = LOG_HEAD_CONTEXT.len() + 16 + 8 + LOG_HEAD_BYTES + LOG_HEAD_BYTES;
const SIGNED_INPUT_BYTES: usize = SIGNED_LOG_HEAD_CONTEXT.len() + 16 + 8 + LOG_HEAD_BYTES;

// The two inputs never have the same prefix: a head input cannot be
// replayed as a signing input or the reverse.
const _: () = assert!(LOG_HEAD_CONTEXT.len() != SIGNED_LOG_HEAD_CONTEXT.len());

/// SHA-256 of a frame's encoding exactly as sequenced.
pub fn frame_digest(frame_bytes: &[u8]) -> FrameDigest {
    Sha256::digest(frame_bytes).into()
}

/// SHA-256 of a decoded frame's encoding (header, then payload), without
/// re-encoding it.
pub fn sequenced_frame_digest(frame: &Frame) -> FrameDigest {
    let mut hasher = Sha256::new();
    hasher.update(frame.header().as_bytes());
    hasher.update(frame.payload());
    hasher.finalize().into()
}

/// The digest a log entry contributes to its room's chain: the frame's own
/// ([`sequenced_frame_digest`]), except for the placeholder of an erased
/// entry (an unsolicited `Error` frame with code `Redacted`) that carries
/// the erased frame's digest, which stands in for it.
pub fn log_entry_digest(frame: &Frame) -> FrameDigest {
    if frame.opcode() == Opcode::Error && frame.header().request_id() == 0 {
        if let Ok(error) = frame.decode_payload::<payload::Error>() {
            if let (true, Some(digest)) = (error.code == ErrorCode::Redacted.to_u16(), error.frame_digest) {
                return digest;
            }
        }
    }
    sequenced_frame_digest(frame)
}

/// The head after appending the frame with digest `frame_digest` at
/// `log_index` to a log whose head was `previous`.
pub fn next_log_head(
    room_id: RoomId,
    log_index: u64,
    previous: &LogHead,
    frame_digest: &FrameDigest,
) -> LogHead {
    let mut input = [0u8; HEAD_INPUT_BYTES];
    let mut at = 0;
    for part in [LOG_HEAD_CONTEXT, &room_id.0, &log_index.to_be_bytes(), previous, frame_digest] {
        input[at..at + part.len()].copy_from_slice(part);
        at += part.len();
    }
    debug_assert_eq!(at, HEAD_INPUT_BYTES);
    Sha256::digest(input).into()
}

/// The bytes the server signs to state that `room_id`'s log has head
/// `head` at `log_index`.
pub fn log_head_signing_input(room_id: RoomId, log_index: u64, head: &LogHead) -> [u8; SIGNED_INPUT_BYTES] {
    let mut input = [0u8; SIGNED_INPUT_BYTES];
    let mut at = 0;
    for part in [SIGNED_LOG_HEAD_CONTEXT, &room_id.0, &log_index.to_be_bytes(), head] {
        input[at..at + part.len()].copy_from_slice(part);
        at += part.len();
    }
    debug_assert_eq!(at, SIGNED_INPUT_BYTES);
    input
}

/// A room's running head as a reader extends it frame by frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogChain {
    /// The index the next frame must have.
    pub next_log_index: u64,
    /// The head after `next_log_index - 1` ([`GENESIS_LOG_HEAD`] at 0).
    pub head: LogHead,
}

impl LogChain {
    /// An empty log.
    pub const fn genesis() -> LogChain {
        LogChain { next_log_index: 0, head: GENESIS_LOG_HEAD }
    }

    /// A log known only by its head `head` at `log_index` (a reader joining
    /// mid-log).
    pub fn anchored(log_index: u64, head: LogHead) -> LogChain {
        LogChain { next_log_index: log_index.saturating_add(1), head }
    }

    /// Extends the chain by the frame with digest `digest` at the next
    /// index; returns the new head.
    pub fn extend(&mut self, room_id: RoomId, digest: &FrameDigest) -> LogHead {
        self.head = next_log_head(room_id, self.next_log_index, &self.head, digest);
        self.next_log_index = self.next_log_index.saturating_add(1);
        self.head
    }

    /// The index of the last frame in the chain, `None` when empty.
    pub fn last_log_index(&self) -> Option<u64> {
        self.next_log_index.checked_sub(1)
    }
}

/// The server's signed statement "room R's log has head `head` at
/// `log_index`" (the room is the frame header's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SignedLogHead {
    /// The index the head is after.
    pub log_index: u64,
    /// The head at that index.
    #[serde(with = "fixed_bytes")]
    pub head: LogHead,
    /// Ed25519 signature over [`log_head_signing_input`].
    #[serde(with = "fixed_bytes")]
    pub signature: [u8; LOG_HEAD_SIGNATURE_BYTES],
}

impl SignedLogHead {
    /// Signs `head` at `log_index` of `room_id` with `key`.
    pub fn sign(room_id: RoomId, log_index: u64, head: LogHead, key: &SigningKey) -> SignedLogHead {
        let signature = key.sign(&log_head_signing_input(room_id, log_index, &head)).to_bytes();
        SignedLogHead { log_index, head, signature }
    }

    /// Verifies the signature strictly against the server's `key`.
    pub fn verify(&self, room_id: RoomId, key: &VerifyingKey) -> Result<(), SignatureError> {
        let signature = Signature::from_bytes(&self.signature);
        key.verify_strict(&log_head_signing_input(room_id, self.log_index, &self.head), &signature)
            .map_err(|_| SignatureError::Invalid)
    }
}

/// Two statements by one server key about one room that cannot both be
/// true: proof that the server showed two different logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EquivocationProof {
    /// The room.
    pub room_id: RoomId,
    /// One signed head.
    pub first: SignedLogHead,
    /// Another signed head for the same index with a different head.
    pub second: SignedLogHead,
}

impl EquivocationProof {
    /// Whether this is a proof against `key`: both heads are for the same
    /// index, differ, and carry valid signatures by `key`.
    pub fn holds_against(&self, key: &VerifyingKey) -> bool {
        self.first.log_index == self.second.log_index
            && self.first.head != self.second.head
            && self.first.verify(self.room_id, key).is_ok()
            && self.second.verify(self.room_id, key).is_ok()
    }
}

/// Fixed-length byte arrays as strict CBOR byte strings.
mod fixed_bytes {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer, const N: usize>(
        bytes: &[u8; N],
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>, const N: usize>(
        deserializer: D,
    ) -> Result<[u8; N], D::Error> {
        crate::payload::strict_byte_array(deserializer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOM: RoomId = RoomId([0x11; 16]);

    /// The head binds the room, the index, the previous head and the frame:
    /// changing any one changes it.
    #[test]
    fn the_head_binds_room_index_previous_head_and_frame() {
        let digest = frame_digest(b"frame");
        let head = next_log_head(ROOM, 0, &GENESIS_LOG_HEAD, &digest);
        assert_ne!(head, next_log_head(RoomId([0x12; 16]), 0, &GENESIS_LOG_HEAD, &digest));
        assert_ne!(head, next_log_head(ROOM, 1, &GENESIS_LOG_HEAD, &digest));
        assert_ne!(head, next_log_head(ROOM, 0, &[1; 32], &digest));
        assert_ne!(head, next_log_head(ROOM, 0, &GENESIS_LOG_HEAD, &frame_digest(b"other")));
    }

    /// Two orders of the same frames end at different heads.
    #[test]
    fn reordering_frames_changes_the_head() {
        let (a, b) = (frame_digest(b"a"), frame_digest(b"b"));
        let mut first = LogChain::genesis();
        first.extend(ROOM, &a);
        first.extend(ROOM, &b);
        let mut second = LogChain::genesis();
        second.extend(ROOM, &b);
        second.extend(ROOM, &a);
        assert_eq!(first.next_log_index, 2);
        assert_ne!(first.head, second.head);
    }

    #[test]
    fn a_signed_head_verifies_only_for_its_room_index_head_and_key() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let signed = SignedLogHead::sign(ROOM, 5, [9; 32], &key);
        assert_eq!(signed.verify(ROOM, &key.verifying_key()), Ok(()));
        assert!(signed.verify(RoomId([0x12; 16]), &key.verifying_key()).is_err());
        assert!(SignedLogHead { log_index: 6, ..signed }.verify(ROOM, &key.verifying_key()).is_err());
        assert!(SignedLogHead { head: [8; 32], ..signed }.verify(ROOM, &key.verifying_key()).is_err());
        let other = SigningKey::from_bytes(&[8; 32]);
        assert!(signed.verify(ROOM, &other.verifying_key()).is_err());
    }

    #[test]
    fn an_equivocation_proof_needs_two_valid_different_heads_for_one_index() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let first = SignedLogHead::sign(ROOM, 5, [1; 32], &key);
        let second = SignedLogHead::sign(ROOM, 5, [2; 32], &key);
        let proof = EquivocationProof { room_id: ROOM, first, second };
        assert!(proof.holds_against(&key.verifying_key()));
        assert!(!EquivocationProof { second: first, ..proof }.holds_against(&key.verifying_key()));
        let elsewhere = SignedLogHead::sign(ROOM, 6, [2; 32], &key);
        assert!(!EquivocationProof { second: elsewhere, ..proof }.holds_against(&key.verifying_key()));
        let forged = SignedLogHead { signature: [0; 64], ..second };
        assert!(!EquivocationProof { second: forged, ..proof }.holds_against(&key.verifying_key()));
    }

    #[test]
    fn signed_heads_encode_their_fields_as_byte_strings() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let signed = SignedLogHead::sign(ROOM, 5, [9; 32], &key);
        let mut encoded = Vec::new();
        ciborium::into_writer(&signed, &mut encoded).unwrap();
        // head: byte string of 32 (0x58 0x20), signature: byte string of 64 (0x58 0x40).
        assert!(encoded.windows(2).any(|w| w == [0x58, 0x20]));
        assert!(encoded.windows(2).any(|w| w == [0x58, 0x40]));
        let decoded: SignedLogHead = ciborium::from_reader(encoded.as_slice()).unwrap();
        assert_eq!(decoded, signed);
    }
}
