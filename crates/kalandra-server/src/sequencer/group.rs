//! What the sequencer needs from a room's MLS state.

use bytes::Bytes;
use kalandra_proto::SenderId;

/// A reference to a proposal (the MLS `ProposalRef` bytes).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProposalRef(pub Vec<u8>);

/// What a validated and merged commit did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitSummary {
    /// The epoch the commit created.
    pub epoch: u64,
    /// Members the commit added (by sender id of their credential).
    pub added: Vec<SenderId>,
    /// Members the commit removed.
    pub removed: Vec<SenderId>,
}

/// Why the MLS state refused a commit or proposal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GroupError {
    /// The message is not valid for this group (peer misbehaviour).
    #[error("{0}")]
    Invalid(String),
    /// The message is for another epoch.
    #[error("message for epoch {message_epoch}, group at {group_epoch}")]
    WrongEpoch {
        /// Epoch in the message.
        message_epoch: u64,
        /// Group's epoch.
        group_epoch: u64,
    },
    /// The commit was made by someone other than the authenticated sender.
    #[error("commit is signed by another member than the sender")]
    CommitterMismatch,
    /// The commit adds a member who is banned from the room.
    #[error("commit adds banned user {member}")]
    Banned {
        /// The banned user's sender id.
        member: SenderId,
    },
    /// The commit leaves server-issued proposals uncovered.
    #[error("commit leaves {missing} server-issued proposals uncovered")]
    UncoveredProposals {
        /// How many are left out.
        missing: usize,
    },
    /// The state itself failed (a bug, not the peer's fault).
    #[error("internal MLS state error: {0}")]
    Internal(String),
}

/// A room's MLS group state as the sequencer sees it.
///
/// `apply_*` methods validate fully and, on success, merge: the state has
/// moved on. On error the state is unchanged.
pub trait GroupState {
    /// Current epoch.
    fn epoch(&self) -> u64;
    /// Whether `sender` is a member (its credential's identity key derives `sender`).
    fn is_member(&self, sender: SenderId) -> bool;
    /// Every member's sender id.
    fn members(&self) -> Vec<SenderId>;
    /// Validates and merges a commit (MLSMessage bytes, PublicMessage) made
    /// by `committer`, which must cover every proposal in `must_cover` and
    /// must not add (or, as an external commit, be made by) anyone for whom
    /// `barred` is true. External commits (a joiner's) go through here too.
    fn apply_commit(
        &mut self,
        commit: &[u8],
        committer: SenderId,
        must_cover: &[ProposalRef],
        barred: &dyn Fn(SenderId) -> bool,
    ) -> Result<CommitSummary, GroupError>;
    /// Validates and stores a proposal (MLSMessage bytes, PublicMessage) for
    /// a later commit to reference; returns its reference.
    fn apply_proposal(&mut self, proposal: &[u8]) -> Result<ProposalRef, GroupError>;
    /// The current ratchet tree (TLS encoding), for Welcome recipients and joiners.
    fn ratchet_tree(&self) -> Bytes;
}

/// A [`GroupState`] that can be created from a room's `CreateRoom` payload
/// and saved to and restored from a snapshot, so that a restarted server
/// rebuilds it (snapshot plus replay of later log entries).
pub trait PersistentGroup: GroupState + Sized + Send + 'static {
    /// The epoch-0 state from the creator's GroupInfo and ratchet tree.
    fn from_create_room(group_info: &[u8], ratchet_tree: &[u8]) -> Result<Self, GroupError>;
    /// The state as bytes.
    fn snapshot(&self) -> Result<Bytes, GroupError>;
    /// The state a snapshot describes.
    fn restore(snapshot: &[u8]) -> Result<Self, GroupError>;
    /// A Remove proposal for `member`, issued and signed by the server as
    /// the room's external sender, for the current epoch. The state is not
    /// changed: sequence it with
    /// [`RoomSequencer::submit_server_proposal`](super::RoomSequencer::submit_server_proposal).
    fn remove_proposal(
        &self,
        member: SenderId,
        signer: &crate::mls_state::ServerSigner,
    ) -> Result<Vec<u8>, GroupError>;
    /// Members whose removal the server proposed and no commit covered yet.
    fn pending_server_removals(&self) -> Result<Vec<SenderId>, GroupError>;
}
