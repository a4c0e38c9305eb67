//! Encryption at rest of log entries (pure: randomness comes in as an
//! argument).
//!
//! Every log entry is sealed under its own random 256-bit data key with
//! ChaCha20-Poly1305 (RFC 8439, ring's implementation) and a random 96-bit
//! nonce. A key seals exactly one record, so nonces cannot repeat under a
//! key whatever their length. The store keeps the data
//! key in a table of its own; the sealed record holds no key material.
//! Destroying the key (redaction, retention) leaves ciphertext that cannot
//! be read; the record itself is replaced by a [`Erasure`] tombstone.
//!
//! What stays in clear: the first [`ROUTING_PREFIX_BYTES`] bytes of the
//! frame, i.e. the header's routing fields (magic, version, flags, opcode,
//! payload length, request id, room, sender, log index, epoch, server
//! timestamp). Recovery replays a log from them and history keeps a typed
//! placeholder for an erased index. The header's signature and the payload
//! are sealed (the signature would otherwise let anyone confirm a guess of
//! the erased content).
//!
//! Record layout (value of a log-table row):
//! - sealed: `0x01 | prefix_len: u8 | prefix | nonce (12) | ciphertext | tag (16)`;
//! - erased: `0x03 | prefix_len: u8 | prefix | frame_digest (32) |
//!   erased_at_ms: u64 BE | cause: u8 | actor: u64 BE`, where
//!   `frame_digest` is the SHA-256 of the frame as appended, kept so that
//!   the room log's hash chain (`kalandra_proto::chain`) still runs through
//!   the erased entry. Tombstones written before the chain existed have tag
//!   `0x02` and no digest.
//!
//! The associated data binds a sealed record to its position: room id,
//! log index (big-endian) and the clear prefix, so a record moved to
//! another row, or a prefix altered, fails authentication.

use bytes::Bytes;
use kalandra_proto::chain::{frame_digest, FrameDigest, LOG_HEAD_BYTES};
use kalandra_proto::header::offset;
use rand::{CryptoRng, RngCore};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};

use super::{LogIndex, RoomId, UserId};

/// Bytes of a frame kept in clear: the header up to (not including) its
/// signature.
pub const ROUTING_PREFIX_BYTES: usize = offset::SIGNATURE;
/// Length of a data key.
pub const DATA_KEY_BYTES: usize = 32;
/// Length of a ChaCha20-Poly1305 nonce.
pub const NONCE_BYTES: usize = 12;
/// Length of a Poly1305 tag.
pub const TAG_BYTES: usize = 16;

const TAG_SEALED: u8 = 0x01;
/// A tombstone without the frame's digest (written before the log's hash chain).
const TAG_ERASED_UNCHAINED: u8 = 0x02;
const TAG_ERASED: u8 = 0x03;
/// Length of the erasure details after the prefix: time, cause, actor.
const ERASURE_BYTES: usize = 8 + 1 + 8;

const _: () = assert!(ROUTING_PREFIX_BYTES <= u8::MAX as usize, "the prefix length is one byte");
const _: () = assert!(NONCE_BYTES == ring::aead::NONCE_LEN && TAG_BYTES == ring::aead::MAX_TAG_LEN);
const _: () = assert!(offset::SERVER_TIMESTAMP + 8 <= ROUTING_PREFIX_BYTES);
const _: () = assert!(offset::OPCODE + 2 <= ROUTING_PREFIX_BYTES);
const _: () = assert!(offset::SENDER_ID + 8 <= ROUTING_PREFIX_BYTES);

/// A log entry's data key. Kept only in the store's key table.
#[derive(Clone, PartialEq, Eq)]
pub struct DataKey(pub [u8; DATA_KEY_BYTES]);

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(..)")
    }
}

impl DataKey {
    /// A fresh random key.
    pub fn generate(rng: &mut (impl RngCore + CryptoRng)) -> DataKey {
        let mut key = [0u8; DATA_KEY_BYTES];
        rng.fill_bytes(&mut key);
        DataKey(key)
    }
}

/// Length of one slot of a key run: a presence byte and a data key.
pub const KEY_SLOT_BYTES: usize = 1 + DATA_KEY_BYTES;
/// Most slots in one key run. Bounds what a redaction rewrites: erasing one
/// entry rewrites its run's row, at most this many slots.
pub const KEY_RUN_SLOTS_MAX: usize = 64;

const SLOT_PRESENT: u8 = 0x01;
const SLOT_ERASED: u8 = 0x00;

/// The data keys of a run of consecutive log entries of one room appended
/// in one transaction, stored as one key-table row: slot `i` belongs to the
/// run's first index plus `i`. A slot is `0x01 ‖ key` while the entry's
/// content exists and `0x00 ‖ 32 zero bytes` once it is erased, so erasing
/// one entry destroys exactly its own key and leaves its neighbours'.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct KeyRun(Vec<u8>);

impl std::fmt::Debug for KeyRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyRun({} slots)", self.slots())
    }
}

impl KeyRun {
    /// An empty run with room for `slots` keys.
    pub fn with_capacity(slots: usize) -> KeyRun {
        KeyRun(Vec::with_capacity(slots.min(KEY_RUN_SLOTS_MAX) * KEY_SLOT_BYTES))
    }

    /// A stored row, checked for layout.
    pub fn from_stored(row: &[u8]) -> Result<KeyRun, OpenError> {
        if row.is_empty()
            || !row.len().is_multiple_of(KEY_SLOT_BYTES)
            || row.len() / KEY_SLOT_BYTES > KEY_RUN_SLOTS_MAX
        {
            return Err(OpenError::Malformed("key run length"));
        }
        if row.chunks_exact(KEY_SLOT_BYTES).any(|slot| slot[0] != SLOT_PRESENT && slot[0] != SLOT_ERASED) {
            return Err(OpenError::Malformed("key slot flag"));
        }
        Ok(KeyRun(row.to_vec()))
    }

    /// The row's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Number of slots (present or erased).
    pub fn slots(&self) -> usize {
        self.0.len() / KEY_SLOT_BYTES
    }

    /// Whether another key fits ([`KEY_RUN_SLOTS_MAX`]).
    pub fn is_full(&self) -> bool {
        self.slots() >= KEY_RUN_SLOTS_MAX
    }

    /// Appends the key of the run's next entry.
    pub fn push(&mut self, key: &DataKey) {
        assert!(!self.is_full(), "key run beyond {KEY_RUN_SLOTS_MAX} slots");
        self.0.push(SLOT_PRESENT);
        self.0.extend_from_slice(&key.0);
    }

    /// The key in slot `slot`: `None` if erased or beyond the run.
    pub fn key(&self, slot: usize) -> Option<DataKey> {
        let bytes = self.0.get(slot * KEY_SLOT_BYTES..(slot + 1) * KEY_SLOT_BYTES)?;
        if bytes[0] != SLOT_PRESENT {
            return None;
        }
        let mut key = [0u8; DATA_KEY_BYTES];
        key.copy_from_slice(&bytes[1..]);
        Some(DataKey(key))
    }

    /// Erases slot `slot`'s key (flag and key bytes zeroed); returns whether
    /// a key was there.
    pub fn erase(&mut self, slot: usize) -> bool {
        match self.0.get_mut(slot * KEY_SLOT_BYTES..(slot + 1) * KEY_SLOT_BYTES) {
            Some(bytes) if bytes[0] == SLOT_PRESENT => {
                bytes.fill(0);
                true
            }
            _ => false,
        }
    }

    /// Whether every slot is erased (the row can go).
    pub fn all_erased(&self) -> bool {
        self.0.chunks_exact(KEY_SLOT_BYTES).all(|slot| slot[0] == SLOT_ERASED)
    }
}

/// Why an entry's content was destroyed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErasureCause {
    /// The frame's own sender redacted it.
    Sender {
        /// The sender.
        actor: UserId,
    },
    /// A moderator of the room redacted it.
    Moderator {
        /// The moderator.
        actor: UserId,
    },
    /// The room's retention period passed.
    Retention,
    /// The operator erased it through the admin API.
    Operator,
    /// The room's authority, another domain, erased it, and this server
    /// erased its replica's copy in turn.
    Authority,
}

impl ErasureCause {
    fn encode(self) -> (u8, u64) {
        match self {
            ErasureCause::Sender { actor } => (1, actor),
            ErasureCause::Moderator { actor } => (2, actor),
            ErasureCause::Retention => (3, 0),
            ErasureCause::Operator => (4, 0),
            ErasureCause::Authority => (5, 0),
        }
    }

    fn decode(code: u8, actor: u64) -> Option<ErasureCause> {
        match code {
            1 => Some(ErasureCause::Sender { actor }),
            2 => Some(ErasureCause::Moderator { actor }),
            3 => Some(ErasureCause::Retention),
            4 => Some(ErasureCause::Operator),
            5 => Some(ErasureCause::Authority),
            _ => None,
        }
    }
}

/// A request to erase entries: when and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Redaction {
    /// Server time of the erasure, milliseconds since the Unix epoch.
    pub erased_at_ms: u64,
    /// Who or what erased it.
    pub cause: ErasureCause,
}

/// What is left of an erased entry: its clear routing prefix and the
/// erasure's details. Its content and data key are gone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Erasure {
    /// The frame's first bytes (at most [`ROUTING_PREFIX_BYTES`]): the
    /// header's routing fields.
    pub routing: Bytes,
    /// When and why the content was destroyed.
    pub redaction: Redaction,
    /// SHA-256 of the frame as appended (`None` for tombstones written
    /// before the log's hash chain).
    pub frame_digest: Option<FrameDigest>,
}

impl Erasure {
    /// The frame's opcode value, if the prefix holds it.
    pub fn opcode(&self) -> Option<u16> {
        routing_u16(&self.routing, offset::OPCODE)
    }
    /// The frame's sender id, if the prefix holds it.
    pub fn sender_id(&self) -> Option<u64> {
        routing_u64(&self.routing, offset::SENDER_ID)
    }
    /// The frame's MLS epoch, if the prefix holds it.
    pub fn epoch(&self) -> Option<u64> {
        routing_u64(&self.routing, offset::EPOCH)
    }
    /// The frame's server timestamp, if the prefix holds it.
    pub fn server_timestamp_ms(&self) -> Option<u64> {
        routing_u64(&self.routing, offset::SERVER_TIMESTAMP)
    }
}

/// Reads a big-endian `u16` at `at` of a routing prefix.
pub fn routing_u16(routing: &[u8], at: usize) -> Option<u16> {
    routing.get(at..at + 2).map(|bytes| u16::from_be_bytes([bytes[0], bytes[1]]))
}

/// Reads a big-endian `u64` at `at` of a routing prefix.
pub fn routing_u64(routing: &[u8], at: usize) -> Option<u64> {
    let bytes: [u8; 8] = routing.get(at..at + 8)?.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

/// A stored record does not decode or authenticate: corruption, or data
/// altered behind the store's back (never the result of an erasure).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// The record's layout is not one this build writes.
    #[error("malformed log record: {0}")]
    Malformed(&'static str),
    /// The ciphertext does not authenticate under the stored key.
    #[error("log record does not authenticate under its data key")]
    Unauthentic,
    /// The record is sealed but its data key is missing.
    #[error("sealed log record without its data key")]
    KeyMissing,
}

/// A decoded stored record.
#[derive(Debug)]
pub enum Record<'a> {
    /// Content present, sealed.
    Sealed {
        /// The clear routing prefix.
        routing: &'a [u8],
        /// Nonce, ciphertext and tag.
        sealed: &'a [u8],
    },
    /// Content destroyed.
    Erased(Erasure),
}

/// Length of the associated data before the routing prefix.
const AAD_POSITION_BYTES: usize = 16 + 8;

/// Associated data of a record, built on the stack.
struct AssociatedData {
    bytes: [u8; AAD_POSITION_BYTES + ROUTING_PREFIX_BYTES],
    len: usize,
}

impl AssociatedData {
    fn new(room_id: RoomId, log_index: LogIndex, routing: &[u8]) -> AssociatedData {
        let routing = &routing[..routing.len().min(ROUTING_PREFIX_BYTES)];
        let mut bytes = [0u8; AAD_POSITION_BYTES + ROUTING_PREFIX_BYTES];
        bytes[..16].copy_from_slice(&room_id.0);
        bytes[16..AAD_POSITION_BYTES].copy_from_slice(&log_index.to_be_bytes());
        bytes[AAD_POSITION_BYTES..AAD_POSITION_BYTES + routing.len()].copy_from_slice(routing);
        AssociatedData { bytes, len: AAD_POSITION_BYTES + routing.len() }
    }

    fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

fn prefix_len(frame: &[u8]) -> u8 {
    // At most ROUTING_PREFIX_BYTES (const-asserted to fit a byte).
    u8::try_from(frame.len().min(ROUTING_PREFIX_BYTES)).unwrap_or(u8::MAX)
}

/// Seals `frame` for position (`room_id`, `log_index`) under a fresh key
/// and nonce drawn from `rng`; returns the key and the record.
pub fn seal(
    rng: &mut (impl RngCore + CryptoRng),
    room_id: RoomId,
    log_index: LogIndex,
    frame: &[u8],
) -> (DataKey, Vec<u8>) {
    let mut record = Vec::new();
    let key = seal_into(rng, room_id, log_index, frame, &mut record);
    (key, record)
}

/// [`seal`] into a caller's buffer (cleared first), so that a batch reuses
/// one allocation; returns the key.
pub fn seal_into(
    rng: &mut (impl RngCore + CryptoRng),
    room_id: RoomId,
    log_index: LogIndex,
    frame: &[u8],
    record: &mut Vec<u8>,
) -> DataKey {
    let key = DataKey::generate(rng);
    let mut nonce = [0u8; NONCE_BYTES];
    rng.fill_bytes(&mut nonce);
    seal_with_into(&key, &nonce, room_id, log_index, frame, record);
    key
}

/// Seals `frame` with the given key and nonce (deterministic; [`seal`]
/// draws both at random).
pub fn seal_with(
    key: &DataKey,
    nonce: &[u8; NONCE_BYTES],
    room_id: RoomId,
    log_index: LogIndex,
    frame: &[u8],
) -> Vec<u8> {
    let mut record = Vec::new();
    seal_with_into(key, nonce, room_id, log_index, frame, &mut record);
    record
}

fn seal_with_into(
    key: &DataKey,
    nonce: &[u8; NONCE_BYTES],
    room_id: RoomId,
    log_index: LogIndex,
    frame: &[u8],
    record: &mut Vec<u8>,
) {
    let prefix = usize::from(prefix_len(frame));
    let (routing, content) = frame.split_at(prefix);
    record.clear();
    record.reserve(2 + prefix + NONCE_BYTES + content.len() + TAG_BYTES);
    record.push(TAG_SEALED);
    record.push(prefix_len(frame));
    record.extend_from_slice(routing);
    record.extend_from_slice(nonce);
    let body = record.len();
    record.extend_from_slice(content);
    let aad = AssociatedData::new(room_id, log_index, routing);
    let tag = cipher(key)
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(*nonce),
            Aad::from(aad.as_slice()),
            &mut record[body..],
        )
        // Only fails for messages beyond 256 GiB; entries are bounded far below.
        .expect("log entries are far below the AEAD's message limit");
    record.extend_from_slice(tag.as_ref());
}

/// The tombstone record of an erased entry whose frame had digest `frame_digest`.
pub fn erased_record(routing: &[u8], frame_digest: &FrameDigest, redaction: &Redaction) -> Vec<u8> {
    let prefix = &routing[..routing.len().min(ROUTING_PREFIX_BYTES)];
    let mut record = Vec::with_capacity(2 + prefix.len() + LOG_HEAD_BYTES + ERASURE_BYTES);
    record.push(TAG_ERASED);
    record.push(prefix_len(prefix));
    record.extend_from_slice(prefix);
    record.extend_from_slice(frame_digest);
    let (cause, actor) = redaction.cause.encode();
    record.extend_from_slice(&redaction.erased_at_ms.to_be_bytes());
    record.push(cause);
    record.extend_from_slice(&actor.to_be_bytes());
    record
}

/// The size a record's content counts for in read budgets: the appended
/// frame's length for a sealed record, the prefix's for a tombstone.
pub fn content_len(record: &[u8]) -> usize {
    match record.first() {
        Some(&TAG_ERASED_UNCHAINED) => record.len().saturating_sub(2 + ERASURE_BYTES),
        Some(&TAG_ERASED) => record.len().saturating_sub(2 + LOG_HEAD_BYTES + ERASURE_BYTES),
        _ => record.len().saturating_sub(2 + NONCE_BYTES + TAG_BYTES),
    }
}

/// Decodes a stored record without opening it.
pub fn decode(record: &[u8]) -> Result<Record<'_>, OpenError> {
    let (&tag, rest) = record.split_first().ok_or(OpenError::Malformed("empty record"))?;
    let (&prefix, rest) = rest.split_first().ok_or(OpenError::Malformed("no prefix length"))?;
    let prefix = usize::from(prefix);
    if prefix > ROUTING_PREFIX_BYTES || rest.len() < prefix {
        return Err(OpenError::Malformed("prefix length"));
    }
    let (routing, rest) = rest.split_at(prefix);
    match tag {
        TAG_SEALED => {
            if rest.len() < NONCE_BYTES + TAG_BYTES {
                return Err(OpenError::Malformed("sealed record too short"));
            }
            Ok(Record::Sealed { routing, sealed: rest })
        }
        TAG_ERASED_UNCHAINED | TAG_ERASED => {
            let (frame_digest, rest) = if tag == TAG_ERASED {
                let (digest, rest) =
                    rest.split_first_chunk::<LOG_HEAD_BYTES>().ok_or(OpenError::Malformed("frame digest"))?;
                (Some(*digest), rest)
            } else {
                (None, rest)
            };
            if rest.len() != ERASURE_BYTES {
                return Err(OpenError::Malformed("erasure record length"));
            }
            let erased_at_ms = routing_u64(rest, 0).ok_or(OpenError::Malformed("erasure time"))?;
            let actor = routing_u64(rest, 9).ok_or(OpenError::Malformed("erasure actor"))?;
            let cause = ErasureCause::decode(rest[8], actor).ok_or(OpenError::Malformed("erasure cause"))?;
            Ok(Record::Erased(Erasure {
                routing: Bytes::copy_from_slice(routing),
                redaction: Redaction { erased_at_ms, cause },
                frame_digest,
            }))
        }
        _ => Err(OpenError::Malformed("unknown record tag")),
    }
}

/// The tombstone of a sealed record: opened with its key to keep the
/// digest of the frame it held.
pub fn erase_sealed(
    key: &DataKey,
    room_id: RoomId,
    log_index: LogIndex,
    routing: &[u8],
    sealed: &[u8],
    redaction: &Redaction,
) -> Result<Vec<u8>, OpenError> {
    let frame = open(key, room_id, log_index, routing, sealed)?;
    Ok(erased_record(routing, &frame_digest(&frame), redaction))
}

/// Opens a sealed record's parts with its key: the frame as appended.
pub fn open(
    key: &DataKey,
    room_id: RoomId,
    log_index: LogIndex,
    routing: &[u8],
    sealed: &[u8],
) -> Result<Bytes, OpenError> {
    let (nonce, ciphertext_and_tag) = sealed.split_at(NONCE_BYTES);
    let nonce: [u8; NONCE_BYTES] = nonce.try_into().map_err(|_| OpenError::Malformed("nonce"))?;
    let mut frame = Vec::with_capacity(routing.len() + ciphertext_and_tag.len());
    frame.extend_from_slice(routing);
    frame.extend_from_slice(ciphertext_and_tag);
    let aad = AssociatedData::new(room_id, log_index, routing);
    let plain_len = cipher(key)
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad.as_slice()),
            &mut frame[routing.len()..],
        )
        .map_err(|_| OpenError::Unauthentic)?
        .len();
    frame.truncate(routing.len() + plain_len);
    Ok(Bytes::from(frame))
}

/// The AEAD keyed with `key`.
fn cipher(key: &DataKey) -> LessSafeKey {
    // A 32-byte key is the only length ChaCha20-Poly1305 takes, and the
    // type guarantees it.
    LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &key.0).expect("a 32-byte ChaCha20-Poly1305 key"))
}

/// The clear routing prefix of a stored record of either kind.
pub fn routing_of(record: &[u8]) -> Result<&[u8], OpenError> {
    match decode(record)? {
        Record::Sealed { routing, .. } => Ok(routing),
        Record::Erased(_) => {
            // Same position in both layouts.
            let prefix = usize::from(record[1]);
            Ok(&record[2..2 + prefix])
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    use super::*;

    fn frame(bytes: usize) -> Vec<u8> {
        (0..bytes).map(|i| u8::try_from(i % 251).unwrap()).collect()
    }

    fn open_record(
        key: &DataKey,
        room_id: RoomId,
        log_index: LogIndex,
        record: &[u8],
    ) -> Result<Bytes, OpenError> {
        match decode(record)? {
            Record::Sealed { routing, sealed } => open(key, room_id, log_index, routing, sealed),
            Record::Erased(_) => panic!("not sealed"),
        }
    }

    #[test]
    fn seal_and_open_round_trip_for_every_length_around_the_prefix() {
        let mut rng = ChaCha20Rng::from_seed([7; 32]);
        let room = RoomId([3; 16]);
        for len in [0, 1, 63, 64, 65, 128, 1000] {
            let plain = frame(len);
            let (key, record) = seal(&mut rng, room, 9, &plain);
            assert_eq!(open_record(&key, room, 9, &record).unwrap().as_ref(), plain.as_slice());
            // Everything after the prefix is unreadable in the record.
            if len > ROUTING_PREFIX_BYTES + 8 {
                let content = &plain[ROUTING_PREFIX_BYTES..];
                assert!(!record.windows(8).any(|w| w == &content[..8]));
            }
        }
    }

    #[test]
    fn a_record_does_not_open_elsewhere_or_altered_or_under_another_key() {
        let mut rng = ChaCha20Rng::from_seed([8; 32]);
        let room = RoomId([3; 16]);
        let (key, record) = seal(&mut rng, room, 9, &frame(200));
        assert_eq!(open_record(&key, room, 10, &record), Err(OpenError::Unauthentic));
        assert_eq!(open_record(&key, RoomId([4; 16]), 9, &record), Err(OpenError::Unauthentic));
        let other = DataKey::generate(&mut rng);
        assert_eq!(open_record(&other, room, 9, &record), Err(OpenError::Unauthentic));
        for at in [2, 40, 2 + ROUTING_PREFIX_BYTES + 3, record.len() - 1] {
            let mut altered = record.clone();
            altered[at] ^= 1;
            assert_eq!(open_record(&key, room, 9, &altered), Err(OpenError::Unauthentic), "byte {at}");
        }
    }

    #[test]
    fn fresh_keys_and_nonces_for_every_entry() {
        let mut rng = ChaCha20Rng::from_seed([9; 32]);
        let room = RoomId([3; 16]);
        let (key_a, record_a) = seal(&mut rng, room, 1, &frame(100));
        let (key_b, record_b) = seal(&mut rng, room, 1, &frame(100));
        assert_ne!(key_a, key_b);
        assert_ne!(record_a, record_b);
    }

    #[test]
    fn erasure_records_round_trip_and_keep_only_the_prefix() {
        let plain = frame(300);
        for cause in [
            ErasureCause::Sender { actor: 5 },
            ErasureCause::Moderator { actor: u64::MAX },
            ErasureCause::Retention,
            ErasureCause::Operator,
        ] {
            let redaction = Redaction { erased_at_ms: 1234, cause };
            let record = erased_record(&plain, &[5; 32], &redaction);
            assert_eq!(record.len(), 2 + ROUTING_PREFIX_BYTES + LOG_HEAD_BYTES + ERASURE_BYTES);
            match decode(&record).unwrap() {
                Record::Erased(erasure) => {
                    assert_eq!(erasure.routing.as_ref(), &plain[..ROUTING_PREFIX_BYTES]);
                    assert_eq!(erasure.redaction, redaction);
                    assert_eq!(erasure.frame_digest, Some([5; 32]));
                }
                other => panic!("{other:?}"),
            }
            assert_eq!(routing_of(&record).unwrap(), &plain[..ROUTING_PREFIX_BYTES]);
        }
    }

    /// Erasing a sealed record keeps the digest of the frame it held, so
    /// the log's hash chain runs through the erased entry; tombstones of
    /// the earlier layout still decode, without a digest.
    #[test]
    fn erasing_a_sealed_record_keeps_its_frame_digest() {
        let mut rng = ChaCha20Rng::from_seed([11; 32]);
        let plain = frame(300);
        let (key, record) = seal(&mut rng, RoomId([1; 16]), 4, &plain);
        let Record::Sealed { routing, sealed } = decode(&record).unwrap() else { panic!("sealed") };
        let redaction = Redaction { erased_at_ms: 9, cause: ErasureCause::Retention };
        let tombstone = erase_sealed(&key, RoomId([1; 16]), 4, routing, sealed, &redaction).unwrap();
        let Record::Erased(erasure) = decode(&tombstone).unwrap() else { panic!("erased") };
        assert_eq!(erasure.frame_digest, Some(frame_digest(&plain)));
        let mut unchained = vec![TAG_ERASED_UNCHAINED, 10];
        unchained.extend_from_slice(&plain[..10]);
        unchained.extend_from_slice(&tombstone[tombstone.len() - ERASURE_BYTES..]);
        let Record::Erased(old) = decode(&unchained).unwrap() else { panic!("erased") };
        assert_eq!((old.frame_digest, old.redaction), (None, redaction));
    }

    #[test]
    fn erasing_one_slot_of_a_key_run_destroys_that_key_alone() {
        let mut rng = ChaCha20Rng::from_seed([10; 32]);
        let keys: Vec<DataKey> = (0..5).map(|_| DataKey::generate(&mut rng)).collect();
        let mut run = KeyRun::with_capacity(keys.len());
        for key in &keys {
            run.push(key);
        }
        let mut run = KeyRun::from_stored(run.as_bytes()).unwrap();
        assert_eq!(run.slots(), 5);
        assert!(run.erase(2));
        assert!(!run.erase(2), "an erased slot is not erased twice");
        assert!(!run.erase(5), "beyond the run");
        for (slot, key) in keys.iter().enumerate() {
            let expected = (slot != 2).then(|| key.clone());
            assert_eq!(run.key(slot), expected, "slot {slot}");
        }
        assert!(!run.as_bytes().windows(DATA_KEY_BYTES).any(|w| w == keys[2].0));
        assert!(run.as_bytes().windows(DATA_KEY_BYTES).any(|w| w == keys[3].0));
        assert!(!run.all_erased());
        for slot in [0, 1, 3, 4] {
            assert!(run.erase(slot));
        }
        assert!(run.all_erased());
        assert!(run.as_bytes().iter().all(|&b| b == 0));
    }

    #[test]
    fn key_runs_are_bounded_and_malformed_rows_are_typed_errors() {
        let mut run = KeyRun::default();
        for _ in 0..KEY_RUN_SLOTS_MAX {
            assert!(!run.is_full());
            run.push(&DataKey([1; DATA_KEY_BYTES]));
        }
        assert!(run.is_full());
        let mut longer = run.as_bytes().to_vec();
        longer.extend_from_slice(&[SLOT_PRESENT; KEY_SLOT_BYTES]);
        assert!(matches!(KeyRun::from_stored(&longer), Err(OpenError::Malformed(_))));
        assert!(matches!(KeyRun::from_stored(&[]), Err(OpenError::Malformed(_))));
        assert!(matches!(KeyRun::from_stored(&[SLOT_PRESENT; 32]), Err(OpenError::Malformed(_))));
        assert!(matches!(KeyRun::from_stored(&[7; KEY_SLOT_BYTES]), Err(OpenError::Malformed(_))));
    }

    #[test]
    fn malformed_records_are_typed_errors() {
        assert!(matches!(decode(&[]), Err(OpenError::Malformed(_))));
        assert!(matches!(decode(&[TAG_SEALED]), Err(OpenError::Malformed(_))));
        assert!(matches!(decode(&[TAG_SEALED, 65]), Err(OpenError::Malformed(_))));
        assert!(matches!(decode(&[TAG_SEALED, 0, 1, 2]), Err(OpenError::Malformed(_))));
        assert!(matches!(decode(&[9, 0]), Err(OpenError::Malformed(_))));
        let mut erased = erased_record(
            &frame(10),
            &[0; 32],
            &Redaction { erased_at_ms: 1, cause: ErasureCause::Retention },
        );
        erased[2 + 10 + LOG_HEAD_BYTES + 8] = 77;
        assert!(matches!(decode(&erased), Err(OpenError::Malformed(_))));
    }
}
