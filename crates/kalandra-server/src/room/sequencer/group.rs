//! What the sequencer needs from a room's MLS state.

use bytes::Bytes;
use kalandra_proto::{Opcode, SenderId};

pub use crate::room::roles::{PolicyError, Proposer, RoomPolicy};

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
    /// The ratchet tree of the new epoch, when the commit carried a Welcome
    /// (empty otherwise).
    pub ratchet_tree: Bytes,
}

/// What a commit must satisfy besides the MLS rules.
pub struct CommitRules<'a> {
    /// The authenticated sender, who must be the committer.
    pub committer: SenderId,
    /// Proposals the commit must cover (server-issued ones).
    pub must_cover: &'a [ProposalRef],
    /// Users who may not be added (nor join by external commit).
    pub barred: &'a dyn Fn(SenderId) -> bool,
    /// The room's policy, checked on every proposal the commit applies
    /// (`None` on replay: a stored commit was accepted under the rules of
    /// its time and is not judged again).
    pub policy: Option<&'a RoomPolicy>,
    /// The Welcome the commit carries: its length and its recipients, who
    /// must be exactly the members it adds, once each; the Welcome with the
    /// new ratchet tree must fit [`WELCOME_PAYLOAD_BYTES_MAX`].
    pub welcome: Option<(usize, &'a [SenderId])>,
    /// The GroupInfo the commit publishes, which must be the new epoch's,
    /// signed by the committer, and fit [`GROUP_INFO_PAYLOAD_BYTES_MAX`]
    /// with the new ratchet tree.
    pub group_info: Option<&'a [u8]>,
}

impl CommitRules<'_> {
    /// Rules for replaying a stored commit: it was accepted under the rules
    /// of its time, so only what the state needs is checked again.
    pub fn replay(committer: SenderId, must_cover: &[ProposalRef]) -> CommitRules<'_> {
        CommitRules {
            committer,
            must_cover,
            barred: &|_| false,
            policy: None,
            welcome: None,
            group_info: None,
        }
    }
}

/// The largest `Welcome` payload (client Welcome plus the server's ratchet tree).
pub const WELCOME_PAYLOAD_BYTES_MAX: usize = Opcode::Welcome.payload_bytes_max() as usize;

/// The largest `GroupInfo` reply payload (a committer's GroupInfo plus the
/// server's ratchet tree): a commit whose GroupInfo would not fit it with
/// the new tree is refused, so every GroupInfo request can be answered.
pub const GROUP_INFO_PAYLOAD_BYTES_MAX: usize = Opcode::GroupInfo.payload_bytes_max() as usize;

/// Whether the GroupInfo of `epoch` and the ratchet tree fit one GroupInfo
/// reply (what a member or joiner asking for them gets).
pub fn check_group_info_fits(
    epoch: u64,
    group_info_bytes: usize,
    tree_bytes: usize,
) -> Result<(), GroupError> {
    let bytes = kalandra_proto::payload::GroupInfo::encoded_len(epoch, group_info_bytes, tree_bytes);
    if bytes > GROUP_INFO_PAYLOAD_BYTES_MAX {
        return Err(GroupError::GroupInfoTooLarge { bytes, max_bytes: GROUP_INFO_PAYLOAD_BYTES_MAX });
    }
    Ok(())
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
    /// The room's policy forbids a proposal of the commit (or the proposal).
    #[error("forbidden: {0}")]
    Forbidden(#[from] PolicyError),
    /// The Welcome with the new ratchet tree would not fit a Welcome frame.
    #[error("the Welcome with the ratchet tree would be {bytes} bytes, the limit is {max_bytes}")]
    WelcomeTooLarge {
        /// Encoded size of the Welcome payload.
        bytes: usize,
        /// The limit.
        max_bytes: usize,
    },
    /// The Welcome's recipients are not exactly the members the commit adds.
    #[error("welcome_recipients must be exactly the {added} members the commit adds, once each")]
    WelcomeRecipients {
        /// How many members the commit adds.
        added: usize,
    },
    /// The GroupInfo is not the new epoch's, signed by the committer.
    #[error("invalid GroupInfo: {0}")]
    InvalidGroupInfo(String),
    /// The GroupInfo with the ratchet tree would not fit a GroupInfo reply.
    #[error("the GroupInfo with the ratchet tree would be {bytes} bytes, the limit is {max_bytes}")]
    GroupInfoTooLarge {
        /// Encoded size of the GroupInfo reply payload.
        bytes: usize,
        /// The limit.
        max_bytes: usize,
    },
    /// The commit leaves server-issued proposals uncovered.
    #[error("commit leaves {missing} server-issued proposals uncovered")]
    UncoveredProposals {
        /// How many are left out.
        missing: usize,
    },
    /// The same proposal is already pending (a retry of one sequenced).
    #[error("proposal already pending")]
    AlreadyPending,
    /// Members' proposals pending in this epoch are at their bound (the
    /// room's or the sender's); a commit clears them.
    #[error("{pending} proposals pending, at most {max_pending}: commit them first")]
    TooManyProposals {
        /// Pending proposals that count against the bound hit.
        pending: usize,
        /// The bound.
        max_pending: usize,
    },
    /// Members' proposals pending in this epoch would be larger than their
    /// bound (the room's or the sender's); a commit clears them.
    #[error("{pending_bytes} bytes of proposals would be pending, at most {max_bytes}: commit them first")]
    ProposalBytes {
        /// Bytes pending with the new proposal, against the bound hit.
        pending_bytes: usize,
        /// The bound.
        max_bytes: usize,
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
    /// Validates and merges a commit (MLSMessage bytes, PublicMessage) under
    /// `rules` (see [`CommitRules`]); on any refusal the state is as before.
    /// External commits (a joiner's) go through here too.
    fn apply_commit(&mut self, commit: &[u8], rules: &CommitRules<'_>) -> Result<CommitSummary, GroupError>;
    /// Validates and stores a proposal (MLSMessage bytes, PublicMessage) for
    /// a later commit to reference, after checking it against `policy`
    /// (`None` on replay); returns its reference.
    fn apply_proposal(
        &mut self,
        proposal: &[u8],
        policy: Option<&RoomPolicy>,
    ) -> Result<ProposalRef, GroupError>;
    /// Whether `group_info` is the current epoch's GroupInfo, signed by `signer`.
    fn group_info_valid(&self, group_info: &[u8], signer: SenderId) -> bool;
    /// Whether exactly `server_key` is the room's external sender.
    fn only_external_sender_is(&self, server_key: &[u8; 32]) -> bool;
    /// The key of the room's external sender (the server of its
    /// authority), which signs its log heads; `None` if unknown.
    fn authority_key(&self) -> Option<[u8; 32]> {
        None
    }
    /// The current ratchet tree (TLS encoding), for Welcome recipients and joiners.
    fn ratchet_tree(&self) -> Bytes;
    /// The current epoch's confirmed transcript hash, which tells apart
    /// epochs of one number that different commits began (after a void);
    /// `None` from a state that does not know it, which then checks no
    /// `Application`'s `epoch_tag`.
    fn confirmed_transcript_hash(&self) -> Option<&[u8]> {
        None
    }
    /// Whether the server proposed `member`'s removal and no commit
    /// covered it yet. A state that cannot tell says yes (the default),
    /// which keeps a room closed by server proposals closed to every joiner.
    fn server_removal_pending(&self, _member: SenderId) -> bool {
        true
    }
    /// Returns to the state before the latest commit [`GroupState::apply_commit`]
    /// merged (dropping the proposals stored since), which a state that can
    /// void commits keeps until [`GroupState::settle_latest_commit`]. A state
    /// that keeps nothing cannot void: the default refuses.
    fn undo_latest_commit(&mut self) -> Result<(), GroupError> {
        Err(GroupError::Internal("this group state keeps no state to undo a commit".into()))
    }
    /// The latest commit can no longer be voided: drop what undoing it needed.
    fn settle_latest_commit(&mut self) {}
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
        signer: &crate::room::mls_state::ServerSigner,
    ) -> Result<Vec<u8>, GroupError>;
    /// Members whose removal the server proposed and no commit covered yet.
    fn pending_server_removals(&self) -> Result<Vec<SenderId>, GroupError>;
}
