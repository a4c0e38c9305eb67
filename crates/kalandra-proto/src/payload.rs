//! CBOR payloads: one type per opcode.
//!
//! Payloads are CBOR maps with text keys (the field names below); byte
//! strings are CBOR byte strings (major type 2), never arrays of integers.
//! Optional fields are omitted when absent. Receivers ignore map keys they do
//! not know, so a later minor revision can add optional fields. Every payload
//! is checked against the limits in [`crate::limits`] after decoding.

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::chain::{SignedLogHead, LOG_HEAD_BYTES};
use crate::federation::{DomainName, HomeCertificate};
use crate::limits::{
    AUTH_NONCE_BYTES, COMMIT_VOID_REPORTERS_MAX, CONTROL_PAYLOAD_BYTES_MAX, EPOCH_TAG_BYTES,
    KEY_PACKAGES_PER_CLAIM_MAX, KEY_PACKAGES_PER_UPLOAD_MAX, PUBLIC_KEY_BYTES, PUSH_PAYLOAD_BYTES_MAX,
    SIGNATURE_BYTES, SYNC_FRAMES_PER_REQUEST_MAX, TEXT_BYTES_MAX, VERSIONS_OFFERED_MAX,
    WELCOME_RECIPIENTS_MAX,
};
use crate::opcode::Opcode;

/// A CBOR decoding error as plain words. ciborium's `Display` is its
/// `Debug` (`Io(Error { kind: UnexpectedEof, … })`), which would otherwise
/// reach peers in `Error` frames.
fn cbor_error_text(error: &ciborium::de::Error<std::io::Error>) -> String {
    match error {
        // Reading from a byte slice fails only when the slice ends.
        ciborium::de::Error::Io(_) => "the CBOR item ends before its last byte".to_owned(),
        ciborium::de::Error::Syntax(offset) => format!("CBOR syntax error at byte {offset}"),
        ciborium::de::Error::Semantic(Some(offset), message) => format!("{message} (at byte {offset})"),
        ciborium::de::Error::Semantic(None, message) => message.clone(),
        ciborium::de::Error::RecursionLimitExceeded => "CBOR nesting too deep".to_owned(),
    }
}

/// Why a payload could not be decoded or is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    /// The bytes are not a CBOR encoding of the opcode's payload type.
    #[error("malformed {} payload: {detail}", opcode.name())]
    Malformed {
        /// Opcode whose payload was expected.
        opcode: Opcode,
        /// What the CBOR decoder reported.
        detail: String,
    },
    /// Bytes follow the payload's CBOR item.
    #[error("{trailing_bytes} trailing bytes after {} payload", opcode.name())]
    TrailingBytes {
        /// Opcode of the payload.
        opcode: Opcode,
        /// Bytes left over.
        trailing_bytes: usize,
    },
    /// A text or byte field is longer than its limit.
    #[error("field {field} is {len_bytes} bytes, limit {max_bytes}")]
    FieldTooLong {
        /// Field name.
        field: &'static str,
        /// Length found.
        len_bytes: usize,
        /// Limit.
        max_bytes: usize,
    },
    /// A list has more items than its limit.
    #[error("field {field} has {count} items, limit {max}")]
    TooManyItems {
        /// Field name.
        field: &'static str,
        /// Items found.
        count: usize,
        /// Limit.
        max: usize,
    },
    /// A field holds a value outside its domain.
    #[error("field {field}: {detail}")]
    InvalidValue {
        /// Field name.
        field: &'static str,
        /// What is wrong.
        detail: &'static str,
    },
    /// The payload type does not belong to the frame's opcode.
    #[error("payload for {} given to a {} frame", expected.name(), found.name())]
    OpcodeMismatch {
        /// Opcode the payload type belongs to.
        expected: Opcode,
        /// Opcode of the frame.
        found: Opcode,
    },
}

/// A payload type bound to one opcode.
pub trait Payload: Serialize + DeserializeOwned + Sized {
    /// The opcode whose frames carry this payload.
    const OPCODE: Opcode;

    /// Checks limits and value domains that CBOR's types cannot express.
    fn validate(&self) -> Result<(), PayloadError> {
        Ok(())
    }

    /// Decodes and validates a payload from exactly `bytes`.
    fn decode(bytes: &[u8]) -> Result<Self, PayloadError> {
        let mut reader = bytes;
        let value: Self = ciborium::de::from_reader(&mut reader).map_err(|error| {
            PayloadError::Malformed { opcode: Self::OPCODE, detail: cbor_error_text(&error) }
        })?;
        if !reader.is_empty() {
            return Err(PayloadError::TrailingBytes { opcode: Self::OPCODE, trailing_bytes: reader.len() });
        }
        value.validate()?;
        Ok(value)
    }

    /// Appends the CBOR encoding to `out`.
    fn encode_into(&self, out: &mut Vec<u8>) {
        // Serializing these plain structs into a Vec cannot fail.
        ciborium::ser::into_writer(self, out).expect("CBOR encoding into a Vec is infallible");
    }

    /// The CBOR encoding.
    fn encode(&self) -> Bytes {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        Bytes::from(out)
    }
}

/// Strict byte-string decoding: a CBOR byte string (major type 2) only.
/// `serde_bytes` and `bytes` would also accept an array of integers, which the
/// specification forbids.
pub(crate) mod strict_bytes {
    use std::marker::PhantomData;

    use bytes::Bytes;
    use serde::de::{Deserializer, Error, Visitor};

    /// A type a CBOR byte string decodes into.
    pub trait FromByteString: Sized {
        fn from_vec<E: Error>(bytes: Vec<u8>) -> Result<Self, E>;
        fn from_slice<E: Error>(bytes: &[u8]) -> Result<Self, E> {
            Self::from_vec(bytes.to_vec())
        }
    }
    impl FromByteString for Vec<u8> {
        fn from_vec<E: Error>(bytes: Vec<u8>) -> Result<Self, E> {
            Ok(bytes)
        }
    }
    impl FromByteString for Bytes {
        fn from_vec<E: Error>(bytes: Vec<u8>) -> Result<Self, E> {
            Ok(Bytes::from(bytes))
        }
        fn from_slice<E: Error>(bytes: &[u8]) -> Result<Self, E> {
            Ok(Bytes::copy_from_slice(bytes))
        }
    }
    impl<const N: usize> FromByteString for [u8; N] {
        fn from_vec<E: Error>(bytes: Vec<u8>) -> Result<Self, E> {
            Self::from_slice(&bytes)
        }
        fn from_slice<E: Error>(bytes: &[u8]) -> Result<Self, E> {
            <[u8; N]>::try_from(bytes)
                .map_err(|_| E::invalid_length(bytes.len(), &"a byte string of fixed length"))
        }
    }

    struct ByteStringVisitor<T>(PhantomData<T>);

    impl<'de, T: FromByteString> Visitor<'de> for ByteStringVisitor<T> {
        type Value = T;
        fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            formatter.write_str("a CBOR byte string")
        }
        fn visit_bytes<E: Error>(self, bytes: &[u8]) -> Result<T, E> {
            T::from_slice(bytes)
        }
        fn visit_byte_buf<E: Error>(self, bytes: Vec<u8>) -> Result<T, E> {
            T::from_vec(bytes)
        }
    }

    struct OptionVisitor<T>(PhantomData<T>);

    impl<'de, T: FromByteString> Visitor<'de> for OptionVisitor<T> {
        type Value = Option<T>;
        fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            formatter.write_str("a CBOR byte string or null")
        }
        fn visit_none<E: Error>(self) -> Result<Option<T>, E> {
            Ok(None)
        }
        fn visit_unit<E: Error>(self) -> Result<Option<T>, E> {
            Ok(None)
        }
        fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Option<T>, D::Error> {
            required(deserializer).map(Some)
        }
    }

    /// Decodes a byte string. `deserialize_byte_buf`, not `deserialize_bytes`:
    /// ciborium's `deserialize_bytes` only accepts byte strings that fit its
    /// 4 KiB scratch buffer.
    pub fn required<'de, D: Deserializer<'de>, T: FromByteString>(deserializer: D) -> Result<T, D::Error> {
        deserializer.deserialize_byte_buf(ByteStringVisitor(PhantomData))
    }

    /// Decodes an optional byte string (null or absent is `None`).
    pub fn option<'de, D: Deserializer<'de>, T: FromByteString>(
        deserializer: D,
    ) -> Result<Option<T>, D::Error> {
        deserializer.deserialize_option(OptionVisitor(PhantomData))
    }
}

/// Decodes a fixed-length byte array from a CBOR byte string only (for
/// types outside this module, such as [`crate::chain::SignedLogHead`]).
pub(crate) fn strict_byte_array<'de, D: serde::Deserializer<'de>, const N: usize>(
    deserializer: D,
) -> Result<[u8; N], D::Error> {
    strict_bytes::required(deserializer)
}

/// A byte string inside a list (CBOR major type 2, decoded strictly).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ByteString(
    #[serde(serialize_with = "serde_bytes::serialize", deserialize_with = "strict_bytes::required")]
    pub  Vec<u8>,
);

impl std::ops::Deref for ByteString {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl From<Vec<u8>> for ByteString {
    fn from(bytes: Vec<u8>) -> Self {
        ByteString(bytes)
    }
}

fn check_text(field: &'static str, text: &str) -> Result<(), PayloadError> {
    if text.len() > TEXT_BYTES_MAX {
        return Err(PayloadError::FieldTooLong { field, len_bytes: text.len(), max_bytes: TEXT_BYTES_MAX });
    }
    Ok(())
}

fn check_count(field: &'static str, count: usize, max: usize) -> Result<(), PayloadError> {
    if count > max {
        return Err(PayloadError::TooManyItems { field, count, max });
    }
    Ok(())
}

fn check_nonempty(field: &'static str, bytes: &[u8]) -> Result<(), PayloadError> {
    if bytes.is_empty() {
        return Err(PayloadError::InvalidValue { field, detail: "must not be empty" });
    }
    Ok(())
}

macro_rules! payload {
    ($(#[$doc:meta])* $name:ident => $opcode:ident { $($body:tt)* }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
        pub struct $name { $($body)* }
    };
}

payload!(
    /// `Hello` (0x0001): the client's first frame.
    Hello => Hello {
        /// Protocol versions the client speaks, most preferred first.
        #[serde(serialize_with = "serde_bytes::serialize", deserialize_with = "strict_bytes::required")]
        pub versions: Vec<u8>,
        /// The client's Ed25519 identity key.
        #[serde(serialize_with = "serde_bytes::serialize", deserialize_with = "strict_bytes::required")]
        pub identity_key: [u8; PUBLIC_KEY_BYTES],
        /// Free-form client software name, for logs.
        pub client_name: String,
    }
);
impl Payload for Hello {
    const OPCODE: Opcode = Opcode::Hello;
    fn validate(&self) -> Result<(), PayloadError> {
        check_count("versions", self.versions.len(), VERSIONS_OFFERED_MAX)?;
        if self.versions.is_empty() {
            return Err(PayloadError::InvalidValue { field: "versions", detail: "must offer a version" });
        }
        check_text("client_name", &self.client_name)
    }
}

payload!(
    /// `AuthChallenge` (0x0002): the server's nonce for the client to sign.
    AuthChallenge => AuthChallenge {
        /// Random nonce.
        #[serde(serialize_with = "serde_bytes::serialize", deserialize_with = "strict_bytes::required")]
        pub nonce: [u8; AUTH_NONCE_BYTES],
        /// The protocol version the server selected.
        pub version: u8,
        /// Server clock, ms since the Unix epoch.
        pub server_time_ms: u64,
    }
);
impl Payload for AuthChallenge {
    const OPCODE: Opcode = Opcode::AuthChallenge;
}

payload!(
    /// `AuthResponse` (0x0003): Ed25519 signature by the identity key over
    /// [`crate::sign::AUTH_CONTEXT`] `|| nonce || identity_key`.
    AuthResponse => AuthResponse {
        /// The signature.
        #[serde(serialize_with = "serde_bytes::serialize", deserialize_with = "strict_bytes::required")]
        pub signature: [u8; SIGNATURE_BYTES],
    }
);
impl Payload for AuthResponse {
    const OPCODE: Opcode = Opcode::AuthResponse;
}

payload!(
    /// `AuthOk` (0x0004): the connection is bound to the identity.
    AuthOk => AuthOk {
        /// The sender id every frame on this connection must carry.
        pub sender_id: u64,
        /// Server clock, ms since the Unix epoch.
        pub server_time_ms: u64,
        /// The server's Ed25519 signing key: rooms list it in their MLS
        /// `external_senders` so the server can issue proposals (removals).
        #[serde(serialize_with = "serde_bytes::serialize", deserialize_with = "strict_bytes::required")]
        pub server_key: [u8; PUBLIC_KEY_BYTES],
        /// The server's domain certifying the client's identity key as its
        /// user's, for the client's MLS leaves ([`crate::home`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub home_certificate: Option<HomeCertificate>,
    }
);
impl Payload for AuthOk {
    const OPCODE: Opcode = Opcode::AuthOk;
}

payload!(
    /// `Error` (0x0005): a request failed. `request_id` in the header names it.
    Error => Error {
        /// Stable numeric code, see [`crate::ErrorCode`].
        pub code: u16,
        /// Human-readable detail; not for program logic.
        pub message: String,
        /// For `WrongEpoch`: the room's current epoch.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub current_epoch: Option<u64>,
        /// For `WrongEpoch` and resync: the relevant log index.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub log_index: Option<u64>,
        /// For rate limits: when to retry.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub retry_after_ms: Option<u64>,
        /// For `Redacted` placeholders: the SHA-256 digest of the erased
        /// frame as sequenced, so that readers can extend the log's hash
        /// chain over it ([`crate::chain`]).
        #[serde(default, skip_serializing_if = "Option::is_none", serialize_with = "serde_bytes::serialize", deserialize_with = "strict_bytes::option")]
        pub frame_digest: Option<[u8; LOG_HEAD_BYTES]>,
    }
);
impl Payload for Error {
    const OPCODE: Opcode = Opcode::Error;
    fn validate(&self) -> Result<(), PayloadError> {
        check_text("message", &self.message)
    }
}

payload!(
    /// `Ping` (0x0006).
    Ping => Ping {
        /// Echoed in the `Pong`.
        pub nonce: u64,
    }
);
impl Payload for Ping {
    const OPCODE: Opcode = Opcode::Ping;
}

payload!(
    /// `Pong` (0x0007).
    Pong => Pong {
        /// The ping's nonce.
        pub nonce: u64,
    }
);
impl Payload for Pong {
    const OPCODE: Opcode = Opcode::Pong;
}

payload!(
    /// `Goodbye` (0x0008): orderly close.
    Goodbye => Goodbye {
        /// An [`crate::ErrorCode`] value, or 0 for a normal close.
        pub code: u16,
        /// Human-readable reason.
        pub reason: String,
    }
);
impl Payload for Goodbye {
    const OPCODE: Opcode = Opcode::Goodbye;
    fn validate(&self) -> Result<(), PayloadError> {
        check_text("reason", &self.reason)
    }
}

payload!(
    /// `Subscribe` (0x0100): stream the header's room from `from_log_index`, then live.
    Subscribe => Subscribe {
        /// First log index wanted.
        pub from_log_index: u64,
    }
);
impl Payload for Subscribe {
    const OPCODE: Opcode = Opcode::Subscribe;
}

payload!(
    /// `Unsubscribe` (0x0101): an empty map.
    Unsubscribe => Unsubscribe {}
);
impl Payload for Unsubscribe {
    const OPCODE: Opcode = Opcode::Unsubscribe;
}

payload!(
    /// `Sync` (0x0102): send up to `count_max` frames from `from_log_index` once.
    Sync => Sync {
        /// First log index wanted.
        pub from_log_index: u64,
        /// Most frames wanted (at most [`SYNC_FRAMES_PER_REQUEST_MAX`]).
        pub count_max: u32,
    }
);
impl Payload for Sync {
    const OPCODE: Opcode = Opcode::Sync;
    fn validate(&self) -> Result<(), PayloadError> {
        if self.count_max == 0 || self.count_max > SYNC_FRAMES_PER_REQUEST_MAX {
            return Err(PayloadError::InvalidValue {
                field: "count_max",
                detail: "must be 1..=SYNC_FRAMES_PER_REQUEST_MAX",
            });
        }
        Ok(())
    }
}

payload!(
    /// `SyncDone` (0x0103): history up to `next_log_index` (exclusive) was sent.
    SyncDone => SyncDone {
        /// The next index the client will receive.
        pub next_log_index: u64,
        /// Whether live frames follow (subscribe) or not (sync).
        pub live: bool,
        /// The server's signed head at `next_log_index - 1`, when the
        /// history sent ends at the room's durable head.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub log_head: Option<SignedLogHead>,
    }
);
impl Payload for SyncDone {
    const OPCODE: Opcode = Opcode::SyncDone;
}

payload!(
    /// `CreateRoom` (0x0104): the creator's epoch-0 group state.
    CreateRoom => CreateRoom {
        /// MLS `GroupInfo` (MLSMessage encoding).
        #[serde(serialize_with = "serde_bytes::serialize", deserialize_with = "strict_bytes::required")]
        pub group_info: Vec<u8>,
        /// MLS ratchet tree (TLS encoding).
        #[serde(serialize_with = "serde_bytes::serialize", deserialize_with = "strict_bytes::required")]
        pub ratchet_tree: Vec<u8>,
        /// Who may join without an invitation (absent: [`JoinRule::InviteOnly`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub join_rule: Option<JoinRule>,
    }
);

/// A room's join rule: who may join by external commit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JoinRule {
    /// Only members add members (by commit and Welcome); the GroupInfo and
    /// the ratchet tree are given to members only.
    #[default]
    InviteOnly,
    /// Any authenticated user who is not banned may fetch the GroupInfo and
    /// join by external commit.
    Open,
}

impl CreateRoom {
    /// The room's join rule (invite-only when absent).
    pub fn join_rule(&self) -> JoinRule {
        self.join_rule.unwrap_or_default()
    }
}

impl Payload for CreateRoom {
    const OPCODE: Opcode = Opcode::CreateRoom;
    fn validate(&self) -> Result<(), PayloadError> {
        check_nonempty("group_info", &self.group_info)?;
        check_nonempty("ratchet_tree", &self.ratchet_tree)
    }
}

/// Why a member cannot process a sequenced commit ([`CommitReport::reason`]).
/// Receivers treat an unknown value as [`CommitReportReason::DoesNotApply`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum CommitReportReason {
    /// The membership tag does not verify.
    MembershipTag = 1,
    /// The confirmation tag does not match the epoch the commit creates.
    ConfirmationTag = 2,
    /// The update path does not apply (a path secret does not decrypt, or
    /// does not derive the public keys the path names).
    UpdatePath = 3,
    /// Anything else that makes the commit not apply to the member's state.
    DoesNotApply = 4,
}

impl CommitReportReason {
    /// The reason for a wire value (unknown values read as `DoesNotApply`).
    pub const fn from_u8(value: u8) -> CommitReportReason {
        match value {
            1 => CommitReportReason::MembershipTag,
            2 => CommitReportReason::ConfirmationTag,
            3 => CommitReportReason::UpdatePath,
            _ => CommitReportReason::DoesNotApply,
        }
    }

    /// The wire value.
    pub const fn to_u8(self) -> u8 {
        self as u8
    }
}

payload!(
    /// `CommitReport` (0x0105): the sender, a member of the epoch the
    /// reported commit left, cannot process the commit at `log_index`.
    /// Answered with `Ack` (the report counts, or counted already) or an
    /// `Error`; see `docs/RECOVERY.md`.
    CommitReport => CommitReport {
        /// Log index of the commit.
        pub log_index: u64,
        /// The epoch the commit was made in (its header's epoch).
        pub epoch: u64,
        /// A [`CommitReportReason`] value.
        pub reason: u8,
    }
);
impl Payload for CommitReport {
    const OPCODE: Opcode = Opcode::CommitReport;
}

payload!(
    /// `CommitVoided` (0x0115, sequenced by the server): the commit at
    /// `log_index`, which left `epoch`, is void, and so is every frame after
    /// it up to this one. The room is at `epoch` again.
    CommitVoided => CommitVoided {
        /// Log index of the voided commit.
        pub log_index: u64,
        /// The epoch the room returns to (the voided commit's header epoch).
        pub epoch: u64,
        /// Sender ids whose reports voided the commit, in the order they came.
        pub reporters: Vec<u64>,
    }
);
impl Payload for CommitVoided {
    const OPCODE: Opcode = Opcode::CommitVoided;
    fn validate(&self) -> Result<(), PayloadError> {
        check_count("reporters", self.reporters.len(), COMMIT_VOID_REPORTERS_MAX)?;
        if self.reporters.is_empty() {
            return Err(PayloadError::InvalidValue { field: "reporters", detail: "must not be empty" });
        }
        Ok(())
    }
}

payload!(
    /// `Commit` (0x0110): an MLS commit as a PublicMessage.
    Commit => Commit {
        /// The commit (MLSMessage encoding, wire format PublicMessage).
        #[serde(serialize_with = "serde_bytes::serialize", deserialize_with = "strict_bytes::required")]
        pub commit: Vec<u8>,
        /// A Welcome for members the commit adds (MLSMessage encoding).
        #[serde(default, skip_serializing_if = "Option::is_none", serialize_with = "serde_bytes::serialize", deserialize_with = "strict_bytes::option")]
        pub welcome: Option<Vec<u8>>,
        /// Sender ids of the Welcome's recipients.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub welcome_recipients: Vec<u64>,
        /// The GroupInfo of the epoch the commit creates (MLSMessage encoding).
        #[serde(default, skip_serializing_if = "Option::is_none", serialize_with = "serde_bytes::serialize", deserialize_with = "strict_bytes::option")]
        pub group_info: Option<Vec<u8>>,
    }
);
impl Payload for Commit {
    const OPCODE: Opcode = Opcode::Commit;
    fn validate(&self) -> Result<(), PayloadError> {
        check_nonempty("commit", &self.commit)?;
        check_count("welcome_recipients", self.welcome_recipients.len(), WELCOME_RECIPIENTS_MAX)?;
        if self.welcome.is_some() == self.welcome_recipients.is_empty() {
            return Err(PayloadError::InvalidValue {
                field: "welcome_recipients",
                detail: "present exactly when a welcome is",
            });
        }
        Ok(())
    }
}

payload!(
    /// `Proposal` (0x0111): an MLS proposal as a PublicMessage, committed later by reference.
    Proposal => Proposal {
        /// The proposal (MLSMessage encoding).
        #[serde(serialize_with = "serde_bytes::serialize", deserialize_with = "strict_bytes::required")]
        pub proposal: Vec<u8>,
    }
);
impl Payload for Proposal {
    const OPCODE: Opcode = Opcode::Proposal;
    fn validate(&self) -> Result<(), PayloadError> {
        check_nonempty("proposal", &self.proposal)
    }
}

payload!(
    /// `Application` (0x0112): a message encrypted under the sender's key chain.
    Application => Application {
        /// Position in the sender's chain for this epoch.
        pub generation: u32,
        /// XChaCha20-Poly1305 ciphertext with tag.
        #[serde(deserialize_with = "strict_bytes::required")]
        pub ciphertext: Bytes,
        /// A push notification sealed with the room's push key (PCEK), which
        /// the server forwards to members who are not connected.
        #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "strict_bytes::option")]
        pub push: Option<Bytes>,
        /// The instance of the header's epoch the message was sealed in
        /// ([`crate::epoch_tag`]). An epoch a `CommitVoided` undid and a
        /// later epoch of the same number have different tags; the server
        /// refuses a tag that is not the room's with `WrongEpoch`, so a
        /// message no member could open is never sequenced. Absent: not
        /// checked.
        #[serde(default, skip_serializing_if = "Option::is_none", serialize_with = "serde_bytes::serialize", deserialize_with = "strict_bytes::option")]
        pub epoch_tag: Option<[u8; EPOCH_TAG_BYTES]>,
    }
);

/// The head of the CBOR item at the start of `bytes` (major type and
/// argument), consumed; `None` for an indefinite length or reserved value.
fn cbor_head(bytes: &mut &[u8]) -> Option<(u8, u64)> {
    let (&first, rest) = bytes.split_first()?;
    let (major, info) = (first >> 5, first & 0x1f);
    let (argument, rest) = match info {
        0..=23 => (u64::from(info), rest),
        24 => rest.split_first().map(|(byte, rest)| (u64::from(*byte), rest))?,
        25 => rest.split_first_chunk::<2>().map(|(b, rest)| (u64::from(u16::from_be_bytes(*b)), rest))?,
        26 => rest.split_first_chunk::<4>().map(|(b, rest)| (u64::from(u32::from_be_bytes(*b)), rest))?,
        27 => rest.split_first_chunk::<8>().map(|(b, rest)| (u64::from_be_bytes(*b), rest))?,
        _ => return None,
    };
    *bytes = rest;
    Some((major, argument))
}

/// `len` bytes from the start of `bytes`, consumed.
fn cbor_take<'a>(bytes: &mut &'a [u8], len: u64) -> Option<&'a [u8]> {
    let len = usize::try_from(len).ok()?;
    let (taken, rest) = bytes.split_at_checked(len)?;
    *bytes = rest;
    Some(taken)
}

/// The `epoch_tag` of an `Application` payload that is one map of text
/// keys to unsigned integers and byte or text strings, all of definite
/// length, each key once, and nothing after it; `None` for any other
/// shape (left to the full decoder, which refuses or reads it).
fn scan_epoch_tag(mut bytes: &[u8]) -> Option<Option<[u8; EPOCH_TAG_BYTES]>> {
    const UINT: u8 = 0;
    const BYTES: u8 = 2;
    const TEXT: u8 = 3;
    const MAP: u8 = 5;
    let (major, entries) = cbor_head(&mut bytes)?;
    if major != MAP || entries > 8 {
        return None;
    }
    let mut keys: [&[u8]; 8] = [&[]; 8];
    let mut tag = None;
    for entry in 0..usize::try_from(entries).ok()? {
        let (key_major, key_len) = cbor_head(&mut bytes)?;
        let key = if key_major == TEXT { cbor_take(&mut bytes, key_len)? } else { return None };
        if keys[..entry].contains(&key) {
            return None;
        }
        keys[entry] = key;
        let (value_major, argument) = cbor_head(&mut bytes)?;
        let value = match value_major {
            UINT => None,
            BYTES | TEXT => Some(cbor_take(&mut bytes, argument)?),
            _ => return None,
        };
        if key == b"epoch_tag" {
            match (value_major, value) {
                (BYTES, Some(value)) => tag = Some(<[u8; EPOCH_TAG_BYTES]>::try_from(value).ok()?),
                _ => return None,
            }
        }
    }
    bytes.is_empty().then_some(tag)
}

/// The `epoch_tag` of an `Application` payload, read without copying its
/// ciphertext (the sequencer's check). Other fields are not validated.
#[derive(Deserialize)]
struct ApplicationEpochTag {
    #[serde(default, deserialize_with = "strict_bytes::option")]
    epoch_tag: Option<[u8; EPOCH_TAG_BYTES]>,
}

impl Application {
    /// The `epoch_tag` of the `Application` payload `bytes`, or why it
    /// cannot be read. A payload of plain definite-length items (as every
    /// encoder here writes them) is walked without decoding; anything else
    /// goes through the full decoder.
    pub fn epoch_tag_of(bytes: &[u8]) -> Result<Option<[u8; EPOCH_TAG_BYTES]>, PayloadError> {
        if let Some(tag) = scan_epoch_tag(bytes) {
            return Ok(tag);
        }
        let mut reader = bytes;
        let tag: ApplicationEpochTag = ciborium::de::from_reader(&mut reader).map_err(|error| {
            PayloadError::Malformed { opcode: Opcode::Application, detail: cbor_error_text(&error) }
        })?;
        Ok(tag.epoch_tag)
    }
}

impl Payload for Application {
    const OPCODE: Opcode = Opcode::Application;
    fn validate(&self) -> Result<(), PayloadError> {
        check_nonempty("ciphertext", &self.ciphertext)?;
        if let Some(push) = &self.push {
            check_nonempty("push", push)?;
            if push.len() > PUSH_PAYLOAD_BYTES_MAX {
                return Err(PayloadError::FieldTooLong {
                    field: "push",
                    len_bytes: push.len(),
                    max_bytes: PUSH_PAYLOAD_BYTES_MAX,
                });
            }
        }
        Ok(())
    }
}

payload!(
    /// `ExternalJoin` (0x0113): an external commit by a joiner.
    ExternalJoin => ExternalJoin {
        /// The external commit (MLSMessage encoding, PublicMessage).
        #[serde(serialize_with = "serde_bytes::serialize", deserialize_with = "strict_bytes::required")]
        pub commit: Vec<u8>,
        /// The GroupInfo of the epoch the commit creates.
        #[serde(default, skip_serializing_if = "Option::is_none", serialize_with = "serde_bytes::serialize", deserialize_with = "strict_bytes::option")]
        pub group_info: Option<Vec<u8>>,
    }
);
impl Payload for ExternalJoin {
    const OPCODE: Opcode = Opcode::ExternalJoin;
    fn validate(&self) -> Result<(), PayloadError> {
        check_nonempty("commit", &self.commit)
    }
}

/// Length of a CBOR unsigned integer's encoding.
const fn cbor_uint_len(value: u64) -> usize {
    if value < 24 {
        1
    } else if value < 0x100 {
        2
    } else if value < 0x1_0000 {
        3
    } else if value < 0x1_0000_0000 {
        5
    } else {
        9
    }
}

/// Length of the CBOR head of a byte string of `len` bytes.
const fn cbor_bytes_head_len(len: usize) -> usize {
    if len < 24 {
        1
    } else if len < 0x100 {
        2
    } else if len < 0x1_0000 {
        3
    } else if len < 0x1_0000_0000 {
        5
    } else {
        9
    }
}

impl Welcome {
    /// The encoded length of a `Welcome` payload with a `welcome` of
    /// `welcome_bytes` and a ratchet tree of `ratchet_tree_bytes` (none when
    /// 0) and a `log_head`, without building it: what a server checks
    /// before it accepts the commit the Welcome belongs to (the server's
    /// Welcomes always carry the head).
    pub const fn encoded_len(welcome_bytes: usize, ratchet_tree_bytes: usize) -> usize {
        // A map head, then "welcome" and its bytes, then "ratchet_tree" and
        // its bytes, then "log_head" and its 32 bytes.
        let welcome = 1 + 7 + cbor_bytes_head_len(welcome_bytes) + welcome_bytes;
        let tree = if ratchet_tree_bytes == 0 {
            0
        } else {
            1 + 12 + cbor_bytes_head_len(ratchet_tree_bytes) + ratchet_tree_bytes
        };
        let log_head = 1 + 8 + cbor_bytes_head_len(LOG_HEAD_BYTES) + LOG_HEAD_BYTES;
        1 + welcome + tree + log_head
    }
}

payload!(
    /// `Welcome` (0x0114): a Welcome routed to its recipient.
    Welcome => Welcome {
        /// The Welcome (MLSMessage encoding).
        #[serde(serialize_with = "serde_bytes::serialize", deserialize_with = "strict_bytes::required")]
        pub welcome: Vec<u8>,
        /// The room's ratchet tree at the Welcome's epoch (TLS encoding).
        #[serde(default, skip_serializing_if = "Option::is_none", serialize_with = "serde_bytes::serialize", deserialize_with = "strict_bytes::option")]
        pub ratchet_tree: Option<Vec<u8>>,
        /// The log's head at the commit that made the Welcome (the header's
        /// log index): where the joiner's hash chain starts.
        #[serde(default, skip_serializing_if = "Option::is_none", serialize_with = "serde_bytes::serialize", deserialize_with = "strict_bytes::option")]
        pub log_head: Option<[u8; LOG_HEAD_BYTES]>,
    }
);
impl Payload for Welcome {
    const OPCODE: Opcode = Opcode::Welcome;
    fn validate(&self) -> Result<(), PayloadError> {
        check_nonempty("welcome", &self.welcome)
    }
}

payload!(
    /// `Ack` (0x0120): the request in the header's `request_id` succeeded.
    Ack => Ack {
        /// Log index assigned to the frame (for sequenced frames).
        pub log_index: u64,
        /// The room's epoch after the frame.
        pub epoch: u64,
        /// Server time of sequencing, ms since the Unix epoch.
        pub server_time_ms: u64,
        /// The log's head at `log_index` (sequenced frames).
        #[serde(default, skip_serializing_if = "Option::is_none", serialize_with = "serde_bytes::serialize", deserialize_with = "strict_bytes::option")]
        pub log_head: Option<[u8; LOG_HEAD_BYTES]>,
        /// The server's signed head at an index at or after `log_index`:
        /// the last frame of the room made durable with this one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub signed_head: Option<SignedLogHead>,
    }
);
impl Payload for Ack {
    const OPCODE: Opcode = Opcode::Ack;
}

payload!(
    /// `KeyPackageUpload` (0x0200).
    KeyPackageUpload => KeyPackageUpload {
        /// Key packages (MLSMessage encoding), each handed out once.
        pub key_packages: Vec<ByteString>,
        /// A last-resort key package, handed out when none is left.
        #[serde(default, skip_serializing_if = "Option::is_none", serialize_with = "serde_bytes::serialize", deserialize_with = "strict_bytes::option")]
        pub last_resort: Option<Vec<u8>>,
    }
);
impl Payload for KeyPackageUpload {
    const OPCODE: Opcode = Opcode::KeyPackageUpload;
    fn validate(&self) -> Result<(), PayloadError> {
        check_count("key_packages", self.key_packages.len(), KEY_PACKAGES_PER_UPLOAD_MAX)?;
        if self.key_packages.is_empty() && self.last_resort.is_none() {
            return Err(PayloadError::InvalidValue { field: "key_packages", detail: "nothing to upload" });
        }
        self.key_packages.iter().try_for_each(|package| check_nonempty("key_packages", package))
    }
}

payload!(
    /// `KeyPackageStatus` (0x0201): the caller's key-package stock.
    KeyPackageStatus => KeyPackageStatus {
        /// Ordinary key packages left.
        pub available: u32,
        /// Whether a last-resort package is stored.
        pub last_resort: bool,
    }
);
impl Payload for KeyPackageStatus {
    const OPCODE: Opcode = Opcode::KeyPackageStatus;
}

payload!(
    /// `KeyPackageClaim` (0x0202): claim one key package for each listed identity.
    KeyPackageClaim => KeyPackageClaim {
        /// Sender ids whose key packages are wanted.
        pub sender_ids: Vec<u64>,
        /// The users' home domain when it is not the server's own: the
        /// server claims through that peer domain (absent: its own users).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub domain: Option<DomainName>,
    }
);
impl Payload for KeyPackageClaim {
    const OPCODE: Opcode = Opcode::KeyPackageClaim;
    fn validate(&self) -> Result<(), PayloadError> {
        check_count("sender_ids", self.sender_ids.len(), KEY_PACKAGES_PER_CLAIM_MAX as usize)?;
        if self.sender_ids.is_empty() {
            return Err(PayloadError::InvalidValue { field: "sender_ids", detail: "must not be empty" });
        }
        Ok(())
    }
}

/// One entry of [`KeyPackageClaimed`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimedKeyPackage {
    /// Whose package this is.
    pub sender_id: u64,
    /// The package, or absent if the identity has none (not even last-resort).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "serde_bytes::serialize",
        deserialize_with = "strict_bytes::option"
    )]
    pub key_package: Option<Vec<u8>>,
}

payload!(
    /// `KeyPackageClaimed` (0x0203): the answer to a claim, in request order.
    KeyPackageClaimed => KeyPackageClaimed {
        /// One entry per requested sender id.
        pub key_packages: Vec<ClaimedKeyPackage>,
    }
);
impl Payload for KeyPackageClaimed {
    const OPCODE: Opcode = Opcode::KeyPackageClaimed;
    fn validate(&self) -> Result<(), PayloadError> {
        check_count("key_packages", self.key_packages.len(), KEY_PACKAGES_PER_CLAIM_MAX as usize)
    }
}

payload!(
    /// `GroupInfoRequest` (0x0204): an empty map; the room is in the header.
    GroupInfoRequest => GroupInfoRequest {}
);
impl Payload for GroupInfoRequest {
    const OPCODE: Opcode = Opcode::GroupInfoRequest;
}

payload!(
    /// `DomainKeysRequest` (0x0206): the federation keys the server accepts
    /// for these domains (its own among them), to check members' home
    /// certificates ([`crate::home`]).
    DomainKeysRequest => DomainKeysRequest {
        /// The domains, 1 to [`DOMAINS_PER_KEYS_REQUEST_MAX`].
        pub domains: Vec<DomainName>,
    }
);
impl Payload for DomainKeysRequest {
    const OPCODE: Opcode = Opcode::DomainKeysRequest;
    fn validate(&self) -> Result<(), PayloadError> {
        check_count("domains", self.domains.len(), DOMAINS_PER_KEYS_REQUEST_MAX)?;
        if self.domains.is_empty() {
            return Err(PayloadError::InvalidValue { field: "domains", detail: "must not be empty" });
        }
        Ok(())
    }
}

/// One key of [`DomainKeysOf`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainKey {
    /// The domain's Ed25519 federation key.
    #[serde(serialize_with = "serde_bytes::serialize", deserialize_with = "strict_bytes::required")]
    pub key: [u8; PUBLIC_KEY_BYTES],
    /// End of its acceptance (exclusive), ms since the Unix epoch; absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_until_ms: Option<u64>,
}

/// One entry of [`DomainKeys`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainKeysOf {
    /// The domain asked.
    pub domain: DomainName,
    /// The keys the server accepts for it: none for a domain it does not
    /// know or refuses, at most [`crate::federation::PEER_KEYS_MAX`].
    pub keys: Vec<DomainKey>,
}

payload!(
    /// `DomainKeys` (0x0207): the answer to a `DomainKeysRequest`, in request order.
    DomainKeys => DomainKeys {
        /// One entry per domain asked.
        pub domains: Vec<DomainKeysOf>,
    }
);
impl Payload for DomainKeys {
    const OPCODE: Opcode = Opcode::DomainKeys;
    fn validate(&self) -> Result<(), PayloadError> {
        check_count("domains", self.domains.len(), DOMAINS_PER_KEYS_REQUEST_MAX)?;
        for entry in &self.domains {
            check_count("keys", entry.keys.len(), crate::federation::PEER_KEYS_MAX)?;
        }
        Ok(())
    }
}

/// Domains one `DomainKeysRequest` may name.
pub const DOMAINS_PER_KEYS_REQUEST_MAX: usize = 16;

/// The longest `DomainKeys` answer: each domain with its longest name and
/// every key with an end (CBOR heads included).
pub const DOMAIN_KEYS_ENCODED_BYTES_MAX: usize = 1
    + (1 + 7 + 1)
    + DOMAINS_PER_KEYS_REQUEST_MAX
        * (1 + (1 + 6 + 2 + crate::federation::DOMAIN_NAME_BYTES_MAX)
            + (1 + 4 + 1)
            + crate::federation::PEER_KEYS_MAX * (1 + (1 + 3 + 2 + PUBLIC_KEY_BYTES) + (1 + 14 + 9)));

const _: () = assert!(
    DOMAIN_KEYS_ENCODED_BYTES_MAX <= CONTROL_PAYLOAD_BYTES_MAX as usize,
    "the longest DomainKeys answer fits a control frame"
);

payload!(
    /// `GroupInfo` (0x0205): a room's current GroupInfo and ratchet tree.
    GroupInfo => GroupInfo {
        /// Epoch of the GroupInfo.
        pub epoch: u64,
        /// MLS `GroupInfo` (MLSMessage encoding).
        #[serde(serialize_with = "serde_bytes::serialize", deserialize_with = "strict_bytes::required")]
        pub group_info: Vec<u8>,
        /// MLS ratchet tree (TLS encoding).
        #[serde(serialize_with = "serde_bytes::serialize", deserialize_with = "strict_bytes::required")]
        pub ratchet_tree: Vec<u8>,
    }
);
impl GroupInfo {
    /// The encoded length of a `GroupInfo` payload for `epoch` with a
    /// `group_info` of `group_info_bytes` and a ratchet tree of
    /// `ratchet_tree_bytes`, without building it: what a server checks
    /// before it accepts the commit that publishes the GroupInfo.
    pub const fn encoded_len(epoch: u64, group_info_bytes: usize, ratchet_tree_bytes: usize) -> usize {
        // A map head, then "epoch" and its integer, "group_info" and its
        // bytes, "ratchet_tree" and its bytes.
        let epoch_len = 1 + 5 + cbor_uint_len(epoch);
        let group_info = 1 + 10 + cbor_bytes_head_len(group_info_bytes) + group_info_bytes;
        let tree = 1 + 12 + cbor_bytes_head_len(ratchet_tree_bytes) + ratchet_tree_bytes;
        1 + epoch_len + group_info + tree
    }
}

impl Payload for GroupInfo {
    const OPCODE: Opcode = Opcode::GroupInfo;
    fn validate(&self) -> Result<(), PayloadError> {
        check_nonempty("group_info", &self.group_info)?;
        check_nonempty("ratchet_tree", &self.ratchet_tree)
    }
}

payload!(
    /// `Kick` (0x0300): remove a member of the header's room.
    Kick => Kick {
        /// Sender id of the member to remove.
        pub target: u64,
        /// Reason, recorded in the audit log.
        pub reason: String,
    }
);
impl Payload for Kick {
    const OPCODE: Opcode = Opcode::Kick;
    fn validate(&self) -> Result<(), PayloadError> {
        check_text("reason", &self.reason)
    }
}

payload!(
    /// `Ban` (0x0301): remove a member and refuse their return.
    Ban => Ban {
        /// Sender id of the member to ban.
        pub target: u64,
        /// Reason, recorded in the audit log.
        pub reason: String,
        /// Ban length; absent for a permanent ban.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub duration_ms: Option<u64>,
    }
);
impl Payload for Ban {
    const OPCODE: Opcode = Opcode::Ban;
    fn validate(&self) -> Result<(), PayloadError> {
        check_text("reason", &self.reason)
    }
}

payload!(
    /// `Redact` (0x0302): destroy the content of a stored frame.
    Redact => Redact {
        /// Log index of the frame to redact.
        pub log_index: u64,
        /// Reason, recorded in the audit log.
        pub reason: String,
    }
);
impl Payload for Redact {
    const OPCODE: Opcode = Opcode::Redact;
    fn validate(&self) -> Result<(), PayloadError> {
        check_text("reason", &self.reason)
    }
}

payload!(
    /// `Unban` (0x0303): lift a user's ban from the header's room.
    Unban => Unban {
        /// Sender id of the banned user.
        pub target: u64,
        /// Reason, recorded in the audit log.
        pub reason: String,
    }
);
impl Payload for Unban {
    const OPCODE: Opcode = Opcode::Unban;
    fn validate(&self) -> Result<(), PayloadError> {
        check_text("reason", &self.reason)
    }
}

payload!(
    /// `SetRole` (0x0304): grant or revoke a role in the header's room.
    SetRole => SetRole {
        /// Sender id of the user.
        pub target: u64,
        /// The role's name (`"moderator"`).
        pub role: String,
        /// Grant (`true`) or revoke (`false`).
        pub granted: bool,
    }
);
impl Payload for SetRole {
    const OPCODE: Opcode = Opcode::SetRole;
    fn validate(&self) -> Result<(), PayloadError> {
        check_text("role", &self.role)
    }
}

payload!(
    /// `Typing` (0x0400, ephemeral).
    Typing => Typing {
        /// Whether the sender is typing.
        pub active: bool,
    }
);
impl Payload for Typing {
    const OPCODE: Opcode = Opcode::Typing;
}

/// Highest defined [`Presence::status`] value.
pub const PRESENCE_STATUS_MAX: u8 = 3;

payload!(
    /// `Presence` (0x0401, ephemeral).
    Presence => Presence {
        /// 0 offline, 1 online, 2 away, 3 busy.
        pub status: u8,
    }
);
impl Payload for Presence {
    const OPCODE: Opcode = Opcode::Presence;
    fn validate(&self) -> Result<(), PayloadError> {
        if self.status > PRESENCE_STATUS_MAX {
            return Err(PayloadError::InvalidValue { field: "status", detail: "unknown presence status" });
        }
        Ok(())
    }
}

macro_rules! any_payload {
    ($($name:ident),* $(,)?) => {
        /// Any payload, tagged by its opcode. Serializes as the bare payload (for tooling).
        #[derive(Debug, Clone, PartialEq, Eq, Serialize)]
        #[serde(untagged)]
        pub enum AnyPayload {
            $(
                #[doc = concat!("A `", stringify!($name), "` payload.")]
                $name($name),
            )*
        }

        impl AnyPayload {
            /// Decodes and validates the payload of an `opcode` frame.
            pub fn decode(opcode: Opcode, bytes: &[u8]) -> Result<AnyPayload, PayloadError> {
                match opcode {
                    $( Opcode::$name => <$name as Payload>::decode(bytes).map(AnyPayload::$name), )*
                }
            }

            /// The payload's opcode.
            pub fn opcode(&self) -> Opcode {
                match self {
                    $( AnyPayload::$name(_) => Opcode::$name, )*
                }
            }

            /// The CBOR encoding.
            pub fn encode(&self) -> Bytes {
                match self {
                    $( AnyPayload::$name(payload) => payload.encode(), )*
                }
            }
        }
    };
}

any_payload!(
    Hello,
    AuthChallenge,
    AuthResponse,
    AuthOk,
    Error,
    Ping,
    Pong,
    Goodbye,
    Subscribe,
    Unsubscribe,
    Sync,
    SyncDone,
    CreateRoom,
    CommitReport,
    Commit,
    Proposal,
    Application,
    ExternalJoin,
    Welcome,
    CommitVoided,
    Ack,
    KeyPackageUpload,
    KeyPackageStatus,
    KeyPackageClaim,
    KeyPackageClaimed,
    GroupInfoRequest,
    GroupInfo,
    DomainKeysRequest,
    DomainKeys,
    Kick,
    Ban,
    Redact,
    Unban,
    SetRole,
    Typing,
    Presence,
);

#[cfg(test)]
mod welcome_len_tests {
    use super::*;

    #[test]
    fn welcome_encoded_len_is_the_length_of_the_encoding() {
        for welcome_bytes in [1usize, 23, 24, 255, 256, 65_535, 65_536, 300_000] {
            for tree_bytes in [0usize, 1, 23, 24, 255, 256, 65_535, 65_536, 200_000] {
                let payload = Welcome {
                    welcome: vec![7; welcome_bytes],
                    ratchet_tree: (tree_bytes > 0).then(|| vec![9; tree_bytes]),
                    log_head: Some([3; LOG_HEAD_BYTES]),
                };
                assert_eq!(
                    payload.encode().len(),
                    Welcome::encoded_len(welcome_bytes, tree_bytes),
                    "welcome {welcome_bytes} B, tree {tree_bytes} B"
                );
            }
        }
    }

    #[test]
    fn group_info_encoded_len_is_the_length_of_the_encoding() {
        for epoch in [0u64, 23, 24, 255, 256, 65_535, 65_536, u64::from(u32::MAX), u64::MAX] {
            for (info_bytes, tree_bytes) in
                [(1usize, 1usize), (23, 24), (255, 256), (65_536, 65_535), (300_000, 7)]
            {
                let payload =
                    GroupInfo { epoch, group_info: vec![7; info_bytes], ratchet_tree: vec![9; tree_bytes] };
                assert_eq!(
                    payload.encode().len(),
                    GroupInfo::encoded_len(epoch, info_bytes, tree_bytes),
                    "epoch {epoch}, GroupInfo {info_bytes} B, tree {tree_bytes} B"
                );
            }
        }
    }

    #[test]
    fn the_join_rule_is_invite_only_unless_a_room_says_open() {
        let mut create = CreateRoom { group_info: vec![1], ratchet_tree: vec![2], join_rule: None };
        assert_eq!(create.join_rule(), JoinRule::InviteOnly);
        let bytes = create.encode();
        assert_eq!(CreateRoom::decode(&bytes).unwrap(), create, "absent stays absent");
        create.join_rule = Some(JoinRule::Open);
        let decoded = CreateRoom::decode(&create.encode()).unwrap();
        assert_eq!(decoded.join_rule(), JoinRule::Open);
    }

    #[test]
    fn the_epoch_tag_walk_reads_what_the_decoder_reads_and_leaves_odd_shapes_to_it() {
        let tag = [0xA7; EPOCH_TAG_BYTES];
        for (ciphertext_bytes, push, epoch_tag) in [
            (1, None, None),
            (23, None, Some(tag)),
            (300, Some(Bytes::from(vec![9; 2000])), Some(tag)),
            (70_000, None, Some(tag)),
            (70_000, Some(Bytes::from(vec![9; 10])), None),
        ] {
            let payload = Application {
                generation: 70_000,
                ciphertext: Bytes::from(vec![5; ciphertext_bytes]),
                push,
                epoch_tag,
            };
            let bytes = payload.encode();
            assert_eq!(scan_epoch_tag(&bytes), Some(epoch_tag), "{ciphertext_bytes} bytes of ciphertext");
            assert_eq!(
                Application::epoch_tag_of(&bytes).unwrap(),
                Application::decode(&bytes).unwrap().epoch_tag
            );
        }
        let plain = Application {
            generation: 1,
            ciphertext: Bytes::from_static(b"c"),
            push: None,
            epoch_tag: Some(tag),
        }
        .encode();
        // An indefinite-length map, a key twice, trailing bytes: not walked.
        let mut indefinite = plain.to_vec();
        indefinite[0] = 0xBF;
        indefinite.push(0xFF);
        assert_eq!(scan_epoch_tag(&indefinite), None);
        let mut twice = plain.to_vec();
        twice[0] += 1;
        twice.extend_from_slice(&plain[plain.len() - 19..]);
        assert_eq!(scan_epoch_tag(&twice), None);
        assert!(Application::epoch_tag_of(&twice).is_err(), "the decoder refuses a key twice");
        let mut trailing = plain.to_vec();
        trailing.push(0);
        assert_eq!(scan_epoch_tag(&trailing), None);
    }
}
