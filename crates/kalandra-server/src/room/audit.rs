//! The audit log: an append-only, hash-chained record of every moderation
//! and admin act (pure: encoding, chaining and verification; the store keeps
//! the records).
//!
//! Record `n` is stored as its canonical CBOR encoding (the fields of
//! [`AuditRecord`] in declaration order, binary values as lowercase hex);
//! its hash is SHA-256 over that encoding, and record `n + 1` carries it as
//! `prev_hash` (record 0 carries 32 zero bytes). The store also keeps the
//! head: the last record's sequence number and hash. [`verify`] walks the
//! records in order and detects an edited record (the next record's
//! `prev_hash`, or the head, no longer matches), a removed one (a gap in
//! the sequence numbers, or the head's count), and reordered ones (a
//! sequence number out of place).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Bytes of a record hash (SHA-256).
pub const AUDIT_HASH_BYTES: usize = 32;
/// Longest free text (a reason) kept in a record.
pub const AUDIT_TEXT_BYTES_MAX: usize = kalandra_proto::limits::TEXT_BYTES_MAX;
/// Largest encoded record.
pub const AUDIT_RECORD_BYTES_MAX: usize = 4 * 1024 + AUDIT_TEXT_BYTES_MAX;
/// Most records one export or read returns.
pub const AUDIT_PAGE_RECORDS_MAX: usize = 1024;

const _: () = assert!(AUDIT_RECORD_BYTES_MAX > AUDIT_TEXT_BYTES_MAX);

/// The `prev_hash` of the first record.
pub const GENESIS_HASH: [u8; AUDIT_HASH_BYTES] = [0; AUDIT_HASH_BYTES];

/// Who acted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActorKind {
    /// The operator, through the admin API.
    Operator,
    /// A room member, over the wire protocol (`actor_id` is the sender id).
    Member,
    /// The server itself (a ban that expired).
    Server,
}

/// What was done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditAction {
    /// A member was kicked: a server Remove proposal was sequenced.
    Kick,
    /// A user was banned (and kicked if a member).
    Ban,
    /// A ban was lifted.
    Unban,
    /// A timed ban ended.
    BanExpired,
    /// A role was granted.
    GrantRole,
    /// A role was revoked.
    RevokeRole,
    /// A log entry's content was erased (`room` and `log_index` name it,
    /// `target` its sender).
    Redact,
    /// A room's retention period was set or changed (`retention_ms`).
    SetRetention,
    /// A room's retention period was removed.
    ClearRetention,
}

/// What an act is about, before it is sealed into the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    /// Server time of the act, ms since the Unix epoch.
    pub time_ms: u64,
    /// Who acted.
    pub actor_kind: ActorKind,
    /// The acting member's sender id (for [`ActorKind::Member`]).
    pub actor_id: Option<u64>,
    /// What was done.
    pub action: AuditAction,
    /// The room, as 32 hex digits.
    pub room: Option<String>,
    /// The user acted upon (sender id).
    pub target: Option<u64>,
    /// The role granted or revoked.
    pub role: Option<String>,
    /// The reason given.
    pub reason: Option<String>,
    /// When a ban ends (ms since the Unix epoch); absent for a permanent ban.
    pub until_ms: Option<u64>,
    /// Log index of the frame the act sequenced (a kick's Remove proposal)
    /// or erased (a redaction).
    pub log_index: Option<u64>,
    /// A room's retention period, ms (for [`AuditAction::SetRetention`]).
    pub retention_ms: Option<u64>,
}

/// One record of the chain, exactly as hashed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRecord {
    /// Position in the log, from 0, dense.
    pub seq: u64,
    /// Hash of the previous record (hex); 64 zeros for the first.
    pub prev_hash: String,
    /// Server time of the act, ms since the Unix epoch.
    pub time_ms: u64,
    /// Who acted.
    pub actor_kind: ActorKind,
    /// The acting member's sender id (16 hex digits in JSON, see [`user_id_text`]).
    #[serde(default, with = "user_id_text")]
    pub actor_id: Option<u64>,
    /// What was done.
    pub action: AuditAction,
    /// The room (32 hex digits).
    pub room: Option<String>,
    /// The user acted upon (16 hex digits in JSON).
    #[serde(default, with = "user_id_text")]
    pub target: Option<u64>,
    /// The role granted or revoked.
    pub role: Option<String>,
    /// The reason given.
    pub reason: Option<String>,
    /// When a ban ends.
    pub until_ms: Option<u64>,
    /// Log index of the frame the act sequenced or erased.
    pub log_index: Option<u64>,
    /// A room's retention period, ms. Absent from the encoding when `None`,
    /// so records written before the field existed hash as they did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_ms: Option<u64>,
}

/// User ids in records: 16 lowercase hex digits in human-readable formats
/// (JSON: a 64-bit number would be rounded by JavaScript and `jq`), the
/// integer in CBOR, so that the hashed encoding is what it always was.
pub mod user_id_text {
    use serde::{Deserialize, Deserializer, Serializer};

    /// Serializes `id`.
    pub fn serialize<S: Serializer>(id: &Option<u64>, serializer: S) -> Result<S::Ok, S::Error> {
        match id {
            Some(id) if serializer.is_human_readable() => serializer.serialize_some(&format!("{id:016x}")),
            Some(id) => serializer.serialize_some(id),
            None => serializer.serialize_none(),
        }
    }

    /// An id as JSON carries it: text, or a number in exports written
    /// before ids became text (which still verify).
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Written {
        Text(String),
        Number(u64),
    }

    /// Deserializes an id written by [`serialize`] (or an older number).
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
        if !deserializer.is_human_readable() {
            return Option::<u64>::deserialize(deserializer);
        }
        match Option::<Written>::deserialize(deserializer)? {
            None => Ok(None),
            Some(Written::Number(id)) => Ok(Some(id)),
            Some(Written::Text(text))
                if text.len() == 16 && text.bytes().all(|byte| byte.is_ascii_hexdigit()) =>
            {
                u64::from_str_radix(&text, 16).map(Some).map_err(serde::de::Error::custom)
            }
            Some(Written::Text(text)) => {
                Err(serde::de::Error::custom(format!("a user id is 16 hex digits, not {text:?}")))
            }
        }
    }
}

/// The chain's end: the last record's sequence number and hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditHead {
    /// Sequence number of the last record.
    pub seq: u64,
    /// Its hash.
    pub hash: [u8; AUDIT_HASH_BYTES],
}

/// A record could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum AuditCodecError {
    /// The record does not decode (storage corruption or tampering).
    #[error("audit record does not decode: {0}")]
    Malformed(String),
    /// The encoded record exceeds [`AUDIT_RECORD_BYTES_MAX`] (a bug: fields are bounded).
    #[error("audit record of {bytes} bytes exceeds {bytes_max}")]
    TooLarge {
        /// Its size.
        bytes: usize,
        /// The limit.
        bytes_max: usize,
    },
}

impl AuditRecord {
    /// Seals `event` as record `seq` after a record whose hash is `prev_hash`.
    pub fn seal(event: &AuditEvent, seq: u64, prev_hash: &[u8; AUDIT_HASH_BYTES]) -> AuditRecord {
        AuditRecord {
            seq,
            prev_hash: hex::encode(prev_hash),
            time_ms: event.time_ms,
            actor_kind: event.actor_kind,
            actor_id: event.actor_id,
            action: event.action,
            room: event.room.clone(),
            target: event.target,
            role: event.role.clone(),
            reason: event.reason.as_ref().map(|reason| truncate(reason, AUDIT_TEXT_BYTES_MAX)),
            until_ms: event.until_ms,
            log_index: event.log_index,
            retention_ms: event.retention_ms,
        }
    }

    /// The canonical encoding (what is stored and hashed).
    pub fn encode(&self) -> Result<Vec<u8>, AuditCodecError> {
        let mut out = Vec::with_capacity(256);
        ciborium::into_writer(self, &mut out)
            .map_err(|error| AuditCodecError::Malformed(error.to_string()))?;
        if out.len() > AUDIT_RECORD_BYTES_MAX {
            return Err(AuditCodecError::TooLarge { bytes: out.len(), bytes_max: AUDIT_RECORD_BYTES_MAX });
        }
        Ok(out)
    }

    /// Decodes a stored record.
    pub fn decode(bytes: &[u8]) -> Result<AuditRecord, AuditCodecError> {
        if bytes.len() > AUDIT_RECORD_BYTES_MAX {
            return Err(AuditCodecError::TooLarge { bytes: bytes.len(), bytes_max: AUDIT_RECORD_BYTES_MAX });
        }
        ciborium::from_reader(bytes).map_err(|error| AuditCodecError::Malformed(error.to_string()))
    }

    /// SHA-256 of the canonical encoding.
    pub fn hash(&self) -> Result<[u8; AUDIT_HASH_BYTES], AuditCodecError> {
        Ok(Sha256::digest(self.encode()?).into())
    }
}

fn truncate(text: &str, bytes_max: usize) -> String {
    let mut end = text.len().min(bytes_max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// How the audit chain is broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuditVerifyError {
    /// A record does not decode.
    #[error("record at position {position} does not decode: {detail}")]
    Malformed {
        /// Position in the walk (from 0).
        position: u64,
        /// Why.
        detail: String,
    },
    /// A record's sequence number is not its position: a record was
    /// removed before it, or records were reordered.
    #[error("record at position {position} has sequence number {found}")]
    OutOfSequence {
        /// Position in the walk.
        position: u64,
        /// The sequence number it carries.
        found: u64,
    },
    /// A record's `prev_hash` is not the previous record's hash: the
    /// previous record was edited (or removed, or the order changed).
    #[error("record {seq} does not chain to the record before it")]
    BrokenChain {
        /// The record whose `prev_hash` does not match.
        seq: u64,
    },
    /// The last record is not the head the store recorded: the last record
    /// was edited or records at the end were removed.
    #[error("the log ends at record {last:?} but the head is record {head:?}")]
    HeadMismatch {
        /// Sequence number of the last record walked (`None`: no record).
        last: Option<u64>,
        /// Sequence number of the recorded head (`None`: no head).
        head: Option<u64>,
    },
}

/// What a successful verification saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditVerified {
    /// Records checked.
    pub records: u64,
    /// The head they end at (`None` for an empty log).
    pub head: Option<AuditHead>,
}

/// Incremental verifier: feed records in stored order, then [`AuditVerifier::finish`].
#[derive(Debug, Clone)]
pub struct AuditVerifier {
    position: u64,
    last_hash: [u8; AUDIT_HASH_BYTES],
}

impl Default for AuditVerifier {
    fn default() -> Self {
        AuditVerifier { position: 0, last_hash: GENESIS_HASH }
    }
}

impl AuditVerifier {
    /// Checks the next record.
    pub fn push(&mut self, record: &AuditRecord) -> Result<(), AuditVerifyError> {
        let position = self.position;
        if record.seq != position {
            return Err(AuditVerifyError::OutOfSequence { position, found: record.seq });
        }
        if record.prev_hash != hex::encode(self.last_hash) {
            return Err(AuditVerifyError::BrokenChain { seq: record.seq });
        }
        self.last_hash = record
            .hash()
            .map_err(|error| AuditVerifyError::Malformed { position, detail: error.to_string() })?;
        self.position += 1;
        Ok(())
    }

    /// Checks the next record from its stored bytes.
    pub fn push_encoded(&mut self, bytes: &[u8]) -> Result<(), AuditVerifyError> {
        let record = AuditRecord::decode(bytes).map_err(|error| AuditVerifyError::Malformed {
            position: self.position,
            detail: error.to_string(),
        })?;
        self.push(&record)
    }

    /// Checks that the records walked end at `head`.
    pub fn finish(self, head: Option<AuditHead>) -> Result<AuditVerified, AuditVerifyError> {
        let last = self.position.checked_sub(1).map(|seq| AuditHead { seq, hash: self.last_hash });
        if last != head {
            return Err(AuditVerifyError::HeadMismatch {
                last: last.map(|h| h.seq),
                head: head.map(|h| h.seq),
            });
        }
        Ok(AuditVerified { records: self.position, head })
    }
}

/// Verifies a whole log: `records` in stored order, ending at `head`.
pub fn verify<'a>(
    records: impl IntoIterator<Item = &'a AuditRecord>,
    head: Option<AuditHead>,
) -> Result<AuditVerified, AuditVerifyError> {
    let mut verifier = AuditVerifier::default();
    for record in records {
        verifier.push(record)?;
    }
    verifier.finish(head)
}

/// An exported log: its records and the head the server recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditExport {
    /// The head (`null` for an empty log).
    pub head: Option<ExportedHead>,
    /// The records, from `seq` 0.
    pub records: Vec<AuditRecord>,
}

/// The head in an export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportedHead {
    /// Sequence number of the last record.
    pub seq: u64,
    /// Its hash (hex).
    pub hash: String,
}

impl ExportedHead {
    /// The head in binary form, if its hash is 64 hex digits.
    pub fn parse(&self) -> Option<AuditHead> {
        let bytes = hex::decode(&self.hash).ok()?;
        Some(AuditHead { seq: self.seq, hash: bytes.try_into().ok()? })
    }
}

impl From<AuditHead> for ExportedHead {
    fn from(head: AuditHead) -> Self {
        ExportedHead { seq: head.seq, hash: hex::encode(head.hash) }
    }
}

/// Verifies an export (as written by the admin API's audit export).
pub fn verify_export(export: &AuditExport) -> Result<AuditVerified, AuditVerifyError> {
    let head = match &export.head {
        Some(head) => Some(head.parse().ok_or(AuditVerifyError::HeadMismatch {
            last: export.records.last().map(|r| r.seq),
            head: Some(head.seq),
        })?),
        None => None,
    };
    verify(&export.records, head)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(i: u64) -> AuditEvent {
        AuditEvent {
            time_ms: 1_000 + i,
            actor_kind: if i.is_multiple_of(2) { ActorKind::Operator } else { ActorKind::Member },
            actor_id: (i % 2 == 1).then_some(i),
            action: AuditAction::Kick,
            room: Some("00".repeat(16)),
            target: Some(100 + i),
            role: None,
            reason: Some(format!("reason {i}")),
            until_ms: None,
            log_index: Some(i),
            retention_ms: None,
        }
    }

    /// Records written before `retention_ms` existed keep their encoding
    /// (and so their hash); a record with it round-trips.
    #[test]
    fn retention_ms_is_encoded_only_when_present() {
        let old = AuditRecord::seal(&event(1), 1, &GENESIS_HASH);
        let encoded = old.encode().unwrap();
        assert!(!encoded.windows(12).any(|window| window == b"retention_ms"));
        assert_eq!(AuditRecord::decode(&encoded).unwrap(), old);
        let mut set = event(2);
        set.action = AuditAction::SetRetention;
        set.retention_ms = Some(86_400_000);
        let record = AuditRecord::seal(&set, 2, &old.hash().unwrap());
        let decoded = AuditRecord::decode(&record.encode().unwrap()).unwrap();
        assert_eq!(decoded.retention_ms, Some(86_400_000));
        assert_eq!(decoded, record);
    }

    /// JSON carries user ids as 16 hex digits; the hashed CBOR encoding
    /// keeps the integers it always had.
    #[test]
    fn user_ids_are_text_in_json_and_integers_in_cbor() {
        #[derive(Serialize)]
        struct Plain<'a> {
            seq: u64,
            prev_hash: &'a str,
            time_ms: u64,
            actor_kind: ActorKind,
            actor_id: Option<u64>,
            action: AuditAction,
            room: &'a Option<String>,
            target: Option<u64>,
            role: &'a Option<String>,
            reason: &'a Option<String>,
            until_ms: Option<u64>,
            log_index: Option<u64>,
        }
        let mut large = event(1);
        large.actor_id = Some(u64::MAX - 100);
        large.target = Some(u64::MAX);
        let record = AuditRecord::seal(&large, 7, &GENESIS_HASH);
        let plain = Plain {
            seq: record.seq,
            prev_hash: &record.prev_hash,
            time_ms: record.time_ms,
            actor_kind: record.actor_kind,
            actor_id: record.actor_id,
            action: record.action,
            room: &record.room,
            target: record.target,
            role: &record.role,
            reason: &record.reason,
            until_ms: record.until_ms,
            log_index: record.log_index,
        };
        let mut expected = Vec::new();
        ciborium::into_writer(&plain, &mut expected).unwrap();
        assert_eq!(record.encode().unwrap(), expected);

        let json = serde_json::to_value(&record).unwrap();
        assert_eq!(json["actor_id"], serde_json::json!(format!("{:016x}", u64::MAX - 100)));
        assert_eq!(json["target"], serde_json::json!("ffffffffffffffff"));
        let back: AuditRecord = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(back, record);
        // An export written when ids were numbers still reads the same.
        let mut number = json.clone();
        number["actor_id"] = serde_json::json!(u64::MAX - 100);
        number["target"] = serde_json::json!(u64::MAX);
        assert_eq!(serde_json::from_value::<AuditRecord>(number).unwrap(), record);
        let mut bad = json;
        bad["target"] = serde_json::json!("12");
        assert!(serde_json::from_value::<AuditRecord>(bad).is_err(), "short text is refused");
    }

    fn chain(count: u64) -> (Vec<AuditRecord>, Option<AuditHead>) {
        let mut records = Vec::new();
        let mut prev = GENESIS_HASH;
        for seq in 0..count {
            let record = AuditRecord::seal(&event(seq), seq, &prev);
            prev = record.hash().unwrap();
            records.push(record);
        }
        let head = count.checked_sub(1).map(|seq| AuditHead { seq, hash: prev });
        (records, head)
    }

    #[test]
    fn an_intact_chain_verifies_and_round_trips() {
        let (records, head) = chain(5);
        assert_eq!(verify(&records, head).unwrap(), AuditVerified { records: 5, head });
        for record in &records {
            assert_eq!(&AuditRecord::decode(&record.encode().unwrap()).unwrap(), record);
        }
        assert_eq!(verify(&[], None).unwrap().records, 0);
    }

    #[test]
    fn an_edited_record_is_detected() {
        let (mut records, head) = chain(5);
        records[2].reason = Some("nothing happened".into());
        assert_eq!(verify(&records, head).unwrap_err(), AuditVerifyError::BrokenChain { seq: 3 });
        let (mut records, head) = chain(5);
        records[4].target = Some(1);
        assert_eq!(
            verify(&records, head).unwrap_err(),
            AuditVerifyError::HeadMismatch { last: Some(4), head: Some(4) }
        );
    }

    #[test]
    fn a_removed_record_is_detected() {
        let (mut records, head) = chain(5);
        records.remove(1);
        assert_eq!(
            verify(&records, head).unwrap_err(),
            AuditVerifyError::OutOfSequence { position: 1, found: 2 }
        );
        let (mut records, head) = chain(5);
        records.pop();
        assert_eq!(
            verify(&records, head).unwrap_err(),
            AuditVerifyError::HeadMismatch { last: Some(3), head: Some(4) }
        );
    }

    #[test]
    fn reordered_records_are_detected() {
        let (mut records, head) = chain(5);
        records.swap(1, 3);
        assert_eq!(
            verify(&records, head).unwrap_err(),
            AuditVerifyError::OutOfSequence { position: 1, found: 3 }
        );
        // Renumbered to hide the swap, the chain still breaks.
        let (mut records, head) = chain(5);
        records.swap(1, 3);
        records[1].seq = 1;
        records[3].seq = 3;
        assert_eq!(verify(&records, head).unwrap_err(), AuditVerifyError::BrokenChain { seq: 1 });
    }

    #[test]
    fn long_reasons_are_truncated_on_a_character_boundary() {
        let mut long = event(0);
        long.reason = Some("é".repeat(AUDIT_TEXT_BYTES_MAX));
        let record = AuditRecord::seal(&long, 0, &GENESIS_HASH);
        let reason = record.reason.as_deref().unwrap();
        assert!(reason.len() <= AUDIT_TEXT_BYTES_MAX && reason.len() >= AUDIT_TEXT_BYTES_MAX - 1);
        assert!(record.encode().unwrap().len() <= AUDIT_RECORD_BYTES_MAX);
    }
}
