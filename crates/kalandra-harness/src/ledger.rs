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
