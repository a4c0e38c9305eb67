//! What the clients of a run wrote and meant, for the end-to-end checker:
//! every message (its unique id is its plaintext), every commit intent
//! (add, remove, update, leave, cover, join) with the MLS commits made for
//! it, and every redaction the server acknowledged.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use kalandra_proto::RoomId;

/// A message a client wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenMessage {
    /// The writer.
    pub client: usize,
    /// The room.
    pub room: RoomId,
    /// The writer gave it up (removed from the room before it was
    /// sequenced): it may appear once or not at all.
    pub abandoned: bool,
}

/// An intent a client acted on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntentRecord {
    /// Who.
    pub client: usize,
    /// Where.
    pub room: RoomId,
    /// What, for reports.
    pub what: String,
}

/// Everything the clients wrote, by id.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Messages by id (`c{client}-m{n}`, also their plaintext).
    pub messages: BTreeMap<String, WrittenMessage>,
    /// Intents by label (`c{client}-{kind}{n}`).
    pub intents: BTreeMap<String, IntentRecord>,
    /// SHA-256 of each MLS commit a client made, to the intent it is for.
    pub commits: HashMap<[u8; 32], String>,
    /// Entries whose redaction the server acknowledged.
    pub redactions: BTreeSet<(RoomId, u64)>,
    /// SHA-256 of each MLS commit a hostile client damaged so that members
    /// cannot process it: the only commits a void may name.
    pub bad_commits: BTreeSet<[u8; 32]>,
    /// SHA-256 of the payload of each hostile frame the server must refuse,
    /// with the copies the log may hold (a replay's original: one).
    pub refused_payloads: BTreeMap<[u8; 32], usize>,
    /// SHA-256 of each sequenced frame's payload a hostile client forged
    /// (members refuse to open it).
    pub forged_payloads: BTreeSet<[u8; 32]>,
    /// SHA-256 of the payload of each message sealed in an epoch that a
    /// void then undid: if it is still sequenced (the room reached an
    /// epoch of that number again), members cannot open it, and its writer
    /// sends it again.
    pub dead_sealings: BTreeSet<[u8; 32]>,
    /// Reports by a room's admin that the server counted without voiding:
    /// (room, log index of the reported commit). The admin's report alone
    /// meets the rule, so each such commit must be voided in the log.
    pub admin_reports_unvoided: BTreeSet<(RoomId, u64)>,
    /// Hostile acts by kind and outcome, with counts.
    pub hostile: BTreeMap<(String, String), u64>,
    /// Messages written after convergence to show that honest members
    /// still exchange messages: (room, id).
    pub probes: Vec<(RoomId, String)>,
}

impl Ledger {
    /// Records a message written.
    pub fn wrote(&mut self, id: &str, client: usize, room: RoomId) {
        let written = WrittenMessage { client, room, abandoned: false };
        assert!(self.messages.insert(id.to_owned(), written).is_none(), "message ids are unique");
    }

    /// Records an intent acted on.
    pub fn intent(&mut self, label: &str, client: usize, room: RoomId, what: String) {
        self.intents.entry(label.to_owned()).or_insert(IntentRecord { client, room, what });
    }

    /// Counts one outcome of a hostile act.
    pub fn hostile_outcome(&mut self, act: &str, outcome: &str) {
        *self.hostile.entry((act.to_owned(), outcome.to_owned())).or_default() += 1;
    }

    /// Records that `commit` (its MLS bytes) was made for intent `label`.
    pub fn commit_made(&mut self, commit: &[u8], label: &str) {
        self.commits.insert(digest(commit), label.to_owned());
    }
}

/// SHA-256.
pub fn digest(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes).into()
}
