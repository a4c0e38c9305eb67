//! The per-room sequencer: pure, sans-IO.
//!
//! One [`RoomSequencer`] per room gives every accepted frame the next log
//! index and a server timestamp, tracks the MLS epoch, and decides what is
//! accepted. It performs no I/O and reads no clock: the driver passes `now`,
//! persists what [`RoomSequencer::submit`] returns, and only once that is
//! durable calls [`RoomSequencer::durable`], which yields the
//! acknowledgements and the fan-out. If persisting fails the driver calls
//! [`RoomSequencer::storage_failed`]: every in-flight frame is rejected and
//! the room must be rebuilt from storage.
//!
//! MLS validation is behind the [`GroupState`] trait; the server's
//! implementation is OpenMLS's `PublicGroup` (`crate::room::mls_state`).

mod bans;
mod group;
mod replica;
mod void;

use std::collections::VecDeque;

use bytes::Bytes;
use kalandra_proto::chain::{log_entry_digest, LogChain, LogHead};
use kalandra_proto::limits::EPOCH_TAG_BYTES;
use kalandra_proto::payload::{Application, Commit, CreateRoom, ExternalJoin, Proposal};
use kalandra_proto::{ErrorCode, Frame, Opcode, PayloadError, RoomId, SenderId};

pub use group::{
    check_group_info_fits, CommitRules, CommitSummary, GroupError, GroupState, PersistentGroup, PolicyError,
    ProposalRef, Proposer, RoomPolicy, WELCOME_PAYLOAD_BYTES_MAX,
};
pub use void::{ReportError, ReportOutcome, VoidDecision};

/// Sender id the server uses for frames it originates (server-issued proposals).
pub const SERVER_SENDER_ID: SenderId = SenderId(0);

/// Most frames of one room sequenced but not yet durable.
///
/// Bounds the memory a room holds while its batch is being written; a
/// submission beyond it is refused with `RateLimited` (retry shortly).
pub const IN_FLIGHT_FRAMES_PER_ROOM_MAX: usize = 4096;

/// Most server-issued proposals pending in one room at once.
pub const SERVER_PROPOSALS_PENDING_MAX: usize = 256;

/// How long server-issued proposals may stay uncovered before the room's
/// members are reminded to commit them, and then again at this interval.
/// The room stays closed to application messages all along (see
/// `docs/MODERATION.md`).
pub const SERVER_PROPOSAL_REANNOUNCE_MS: u64 = 30_000;

/// Most users banned from one room at once.
pub const BANS_PER_ROOM_MAX: usize = 10_000;

/// Delay suggested to a sender refused because the room is at its in-flight limit.
pub const IN_FLIGHT_RETRY_AFTER_MS: u64 = 10;

/// Why a submitted frame was not sequenced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// Peer misbehaviour: the header's sender id is not the authenticated identity's.
    #[error("frame sender {claimed} is not the connection's identity {authenticated}")]
    SenderMismatch {
        /// The header's sender id.
        claimed: SenderId,
        /// The connection's identity.
        authenticated: SenderId,
    },
    /// Peer misbehaviour: this opcode is not something a room sequences.
    #[error("opcode {0:?} is not sequenced")]
    NotSequenced(Opcode),
    /// Peer misbehaviour: the payload does not decode.
    #[error("malformed payload: {0}")]
    MalformedPayload(#[from] PayloadError),
    /// The sender is not a member of the room.
    #[error("sender {0} is not a member of the room")]
    NotMember(SenderId),
    /// The frame is for another epoch.
    #[error("frame for epoch {frame_epoch}, room is at epoch {current_epoch} since log index {log_index}")]
    WrongEpoch {
        /// Epoch in the frame.
        frame_epoch: u64,
        /// The room's epoch.
        current_epoch: u64,
        /// Log index of the frame that began the current epoch.
        log_index: u64,
    },
    /// An `Application` names the room's epoch but was sealed in an
    /// instance of it a void undid (its `epoch_tag` is another's): no
    /// member could open it. Answered as `WrongEpoch`.
    #[error("message sealed in an epoch {epoch} a void undid; the room's epoch {epoch} began at log index {log_index}")]
    UndoneEpoch {
        /// The epoch (the frame's and the room's).
        epoch: u64,
        /// Log index of the frame that began the room's instance of it.
        log_index: u64,
    },
    /// The MLS commit was refused.
    #[error("invalid commit: {0}")]
    InvalidCommit(GroupError),
    /// The MLS proposal was refused.
    #[error("invalid proposal: {0}")]
    InvalidProposal(GroupError),
    /// Server-issued proposals are pending: messages wait until a commit covers them.
    #[error("{pending} server-issued proposals must be committed first")]
    PendingProposals {
        /// Proposals pending.
        pending: usize,
    },
    /// Limit: too many frames of this room are waiting for storage.
    #[error("room has {in_flight} frames waiting for storage")]
    Overloaded {
        /// Frames in flight.
        in_flight: usize,
    },
    /// The user is banned from the room (an external join by a banned user).
    #[error("user {0} is banned from the room")]
    Banned(SenderId),
    /// Limit: too many server proposals pending.
    #[error("too many server proposals pending")]
    TooManyServerProposals,
    /// Limit: too many users banned from the room.
    #[error("too many users banned from the room")]
    TooManyBans,
    /// Storage failed; the frame was not made durable.
    #[error("storage failed; the frame was not stored")]
    StorageFailed,
    /// A room with this id exists.
    #[error("a room with this id exists")]
    RoomExists,
    /// The room's initial GroupInfo or ratchet tree is invalid.
    #[error("invalid GroupInfo or ratchet tree: {0}")]
    InvalidGroupInfo(GroupError),
    /// Limit: the user is a member of too many rooms to create or join another.
    #[error("member of {rooms} rooms, the limit")]
    TooManyRooms {
        /// Rooms the user is a member of.
        rooms: u32,
    },
    /// Internal: the room's state is being rebuilt after a storage failure.
    #[error("room is recovering from a storage failure")]
    Recovering,
    /// The room's policy refuses the request (an external join to an
    /// invite-only room, a GroupInfo read by a non-member).
    #[error("forbidden: {0}")]
    Forbidden(PolicyError),
    /// The room must list exactly the server's key as its external sender
    /// (so that kicks and bans work).
    #[error("the room's external senders must be exactly the server's key")]
    ExternalSenders,
}

impl SubmitError {
    /// The wire error code for this rejection.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            SubmitError::SenderMismatch { .. } => ErrorCode::SenderMismatch,
            SubmitError::NotSequenced(_) => ErrorCode::UnexpectedFrame,
            SubmitError::MalformedPayload(_) => ErrorCode::MalformedPayload,
            SubmitError::NotMember(_) => ErrorCode::NotMember,
            SubmitError::WrongEpoch { .. } | SubmitError::UndoneEpoch { .. } => ErrorCode::WrongEpoch,
            SubmitError::InvalidCommit(GroupError::UncoveredProposals { .. }) => ErrorCode::PendingProposals,
            SubmitError::InvalidCommit(GroupError::WrongEpoch { .. }) => ErrorCode::WrongEpoch,
            SubmitError::InvalidCommit(GroupError::Banned { .. }) | SubmitError::Banned(_) => {
                ErrorCode::Banned
            }
            SubmitError::InvalidCommit(GroupError::Forbidden(_))
            | SubmitError::InvalidProposal(GroupError::Forbidden(_))
            | SubmitError::Forbidden(_) => ErrorCode::Forbidden,
            SubmitError::InvalidCommit(GroupError::WelcomeTooLarge { .. }) => ErrorCode::WelcomeTooLarge,
            SubmitError::InvalidCommit(
                GroupError::InvalidGroupInfo(_) | GroupError::GroupInfoTooLarge { .. },
            )
            | SubmitError::ExternalSenders => ErrorCode::InvalidGroupInfo,
            SubmitError::InvalidCommit(_) => ErrorCode::InvalidCommit,
            SubmitError::InvalidProposal(
                GroupError::TooManyProposals { .. } | GroupError::ProposalBytes { .. },
            ) => ErrorCode::QuotaExceeded,
            SubmitError::InvalidProposal(_) => ErrorCode::InvalidProposal,
            SubmitError::PendingProposals { .. } => ErrorCode::PendingProposals,
            SubmitError::Overloaded { .. } | SubmitError::TooManyServerProposals => ErrorCode::RateLimited,
            SubmitError::TooManyBans => ErrorCode::QuotaExceeded,
            SubmitError::StorageFailed => ErrorCode::StorageUnavailable,
            SubmitError::RoomExists => ErrorCode::RoomExists,
            SubmitError::InvalidGroupInfo(_) => ErrorCode::InvalidGroupInfo,
            SubmitError::TooManyRooms { .. } => ErrorCode::TooManyRooms,
            SubmitError::Recovering => ErrorCode::StorageUnavailable,
        }
    }
}

/// Why a stored log could not be replayed: the store holds something the
/// sequencer would never have accepted (corruption or a bug).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    /// The stored frame's index is not the next one.
    #[error("stored frame has log index {found}, expected {expected}")]
    NotDense {
        /// Expected index.
        expected: u64,
        /// Index found.
        found: u64,
    },
    /// A stored commit or proposal does not apply to the rebuilt state.
    #[error("stored frame at {log_index} does not apply: {error}")]
    DoesNotApply {
        /// Index of the frame.
        log_index: u64,
        /// Why.
        error: GroupError,
    },
    /// A stored payload does not decode.
    #[error("stored frame at {log_index} has a malformed payload: {error}")]
    Malformed {
        /// Index of the frame.
        log_index: u64,
        /// Why.
        error: PayloadError,
    },
}

/// Where a rebuilt room starts: what its snapshot (or `CreateRoom` frame) says.
#[derive(Debug, Clone)]
pub struct RecoveryPoint {
    /// The last stored frame the group state reflects.
    pub through_log_index: u64,
    /// The latest server timestamp at that point.
    pub last_timestamp_ms: u64,
    /// The GroupInfo current at that point, with its epoch.
    pub group_info: (u64, Bytes),
    /// Log index of the frame that began the epoch current at that point.
    pub epoch_started_at_log_index: u64,
    /// Server-issued proposals pending at that point (the next commit must
    /// cover them), with where and when the first of them was sequenced.
    pub server_proposals: PendingServerProposals,
    /// The room's policy (from its `CreateRoom` frame).
    pub policy: RoomPolicy,
    /// The log's hash-chain head at `through_log_index`
    /// ([`kalandra_proto::chain`]).
    pub log_head: LogHead,
}

/// Server-issued proposals that the next commit must cover.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PendingServerProposals {
    /// Their references, in log order.
    pub refs: Vec<ProposalRef>,
    /// Log index and server time of the first one (`None` when none is pending).
    pub since: Option<(u64, u64)>,
}

/// Server-issued proposals have waited too long for a covering commit:
/// remind the room's members (see [`RoomSequencer::commit_overdue`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitOverdue {
    /// Proposals pending.
    pub pending: usize,
    /// Log index of the first pending proposal.
    pub first_log_index: u64,
    /// How long the first one has been pending.
    pub pending_for_ms: u64,
}

/// A frame the sequencer accepted: persist it, then call [`RoomSequencer::durable`].
#[derive(Debug, Clone)]
pub struct Sequenced {
    /// The index assigned.
    pub log_index: u64,
    /// The frame with log index and server timestamp stamped in.
    pub frame: Frame,
}

/// What the driver must do once frames are durable (or have failed).
#[derive(Debug, Clone)]
pub enum Effect {
    /// Tell the sender its frame is durable at `log_index`.
    Acknowledge {
        /// The sender.
        sender: SenderId,
        /// The sender's request id.
        request_id: u32,
        /// Assigned index.
        log_index: u64,
        /// The room's epoch after the frame.
        epoch: u64,
        /// Server timestamp stamped into the frame.
        server_time_ms: u64,
        /// The log's head at `log_index`.
        log_head: LogHead,
    },
    /// Send the frame to every subscribed member except `sender`, who gets
    /// the acknowledgement instead of an echo.
    FanOut {
        /// The original sender.
        sender: SenderId,
        /// The sequenced frame.
        frame: Frame,
    },
    /// Hold a Welcome for each recipient until it connects.
    DeliverWelcome {
        /// Recipients' sender ids.
        recipients: Vec<SenderId>,
        /// The Welcome (MLSMessage encoding).
        welcome: Bytes,
        /// Ratchet tree of the epoch the Welcome joins.
        ratchet_tree: Bytes,
        /// Log index of the commit that made the Welcome.
        log_index: u64,
        /// The log's head at that index.
        log_head: LogHead,
    },
    /// The room's membership changed: update who may read.
    MembershipChanged {
        /// Members added.
        added: Vec<SenderId>,
        /// Members removed.
        removed: Vec<SenderId>,
    },
    /// The frame was not made durable: tell the sender.
    Reject {
        /// The sender.
        sender: SenderId,
        /// The sender's request id.
        request_id: u32,
        /// Why.
        error: SubmitError,
    },
}

/// What a commit in flight still has to do once durable.
#[derive(Debug, Clone)]
struct CommitFollowUp {
    summary: CommitSummary,
    welcome: Option<(Bytes, Vec<SenderId>)>,
    ratchet_tree: Bytes,
}

#[derive(Debug, Clone)]
struct InFlight {
    log_index: u64,
    /// The log's head at `log_index`.
    log_head: LogHead,
    sender: SenderId,
    request_id: u32,
    epoch_after: u64,
    frame: Frame,
    commit: Option<Box<CommitFollowUp>>,
}

/// The sequencer of one room.
pub struct RoomSequencer<G: GroupState> {
    room_id: RoomId,
    group: G,
    next_log_index: u64,
    epoch_started_at_log_index: u64,
    /// The tag of the last epoch instance a message was checked against,
    /// with the epoch and transcript hash it was computed from (computed
    /// again only when the group's differ).
    epoch_tag_cache: Option<(u64, Vec<u8>, [u8; EPOCH_TAG_BYTES])>,
    last_timestamp_ms: u64,
    server_proposals_pending: Vec<ProposalRef>,
    /// Members that rejoined while server proposals waited, since a commit
    /// last covered them: each may do so once (see
    /// [`RoomSequencer::is_rejoin_while_closed`]).
    rejoined_while_closed: Vec<SenderId>,
    /// Log index and server time of the first pending server proposal.
    server_proposals_since: Option<(u64, u64)>,
    /// When to remind members of uncovered server proposals next.
    reannounce_at_ms: u64,
    /// Banned users and when their ban ends (`None`: never).
    bans: bans::Bans,
    in_flight: VecDeque<InFlight>,
    durable_through: Option<u64>,
    /// The hash chain through the last stamped frame.
    chain: LogChain,
    /// The head at `durable_through`.
    durable_log_head: LogHead,
    recovering: bool,
    group_info: Option<(u64, Bytes)>,
    policy: RoomPolicy,
    /// The latest commit while it can be voided (`void.rs`).
    void: void::VoidState,
    /// Of a replica: the chain's head after each of the latest frames taken
    /// (at most [`REPLICA_HEADS_KEPT_MAX`]), to check the authority's signed
    /// heads against while frames keep coming.
    replica_heads: VecDeque<(u64, LogHead)>,
}

impl<G: GroupState> RoomSequencer<G> {
    /// A new room whose epoch-0 state is `group`, created by `creator` with
    /// the `CreateRoom` frame `frame`, which becomes log index 0. The room
    /// must list exactly `server_key` as its external sender.
    pub fn create(
        room_id: RoomId,
        group: G,
        creator: SenderId,
        mut frame: Frame,
        now_ms: u64,
        server_key: &[u8; 32],
    ) -> Result<(RoomSequencer<G>, Sequenced), SubmitError> {
        check_sender(&frame, creator)?;
        if frame.opcode() != Opcode::CreateRoom {
            return Err(SubmitError::NotSequenced(frame.opcode()));
        }
        if !group.is_member(creator) {
            return Err(SubmitError::NotMember(creator));
        }
        if !group.only_external_sender_is(server_key) {
            return Err(SubmitError::ExternalSenders);
        }
        let create: CreateRoom = frame.decode_payload()?;
        check_group_info_fits(group.epoch(), create.group_info.len(), group.ratchet_tree().len())
            .map_err(SubmitError::InvalidGroupInfo)?;
        let policy = RoomPolicy::new(creator, create.join_rule());
        let mut room = RoomSequencer {
            room_id,
            next_log_index: 0,
            epoch_started_at_log_index: 0,
            epoch_tag_cache: None,
            last_timestamp_ms: 0,
            server_proposals_pending: Vec::new(),
            rejoined_while_closed: Vec::new(),
            server_proposals_since: None,
            reannounce_at_ms: 0,
            bans: bans::Bans::default(),
            in_flight: VecDeque::new(),
            durable_through: None,
            chain: LogChain::genesis(),
            durable_log_head: kalandra_proto::chain::GENESIS_LOG_HEAD,
            recovering: false,
            group_info: Some((group.epoch(), Bytes::from(create.group_info))),
            policy,
            group,
            void: void::VoidState::default(),
            replica_heads: VecDeque::new(),
        };
        let epoch = room.group.epoch();
        let sequenced = room.stamp(&mut frame, now_ms);
        room.in_flight.push_back(InFlight {
            log_index: sequenced,
            log_head: room.chain.head,
            sender: creator,
            request_id: frame.header().request_id(),
            epoch_after: epoch,
            frame: frame.clone(),
            commit: None,
        });
        Ok((room, Sequenced { log_index: sequenced, frame }))
    }

    /// A room rebuilt from storage: `group` is its MLS state after the
    /// stored frame `point.through_log_index` (from a snapshot or the
    /// `CreateRoom` frame); call [`RoomSequencer::replay`] with every later
    /// stored frame.
    pub fn recover(room_id: RoomId, group: G, point: RecoveryPoint) -> RoomSequencer<G> {
        RoomSequencer {
            room_id,
            next_log_index: point.through_log_index + 1,
            epoch_started_at_log_index: point.epoch_started_at_log_index,
            epoch_tag_cache: None,
            last_timestamp_ms: point.last_timestamp_ms,
            reannounce_at_ms: point
                .server_proposals
                .since
                .map_or(0, |(_, at_ms)| at_ms.saturating_add(SERVER_PROPOSAL_REANNOUNCE_MS)),
            server_proposals_pending: point.server_proposals.refs,
            rejoined_while_closed: Vec::new(),
            server_proposals_since: point.server_proposals.since,
            bans: bans::Bans::default(),
            in_flight: VecDeque::new(),
            durable_through: Some(point.through_log_index),
            chain: LogChain::anchored(point.through_log_index, point.log_head),
            durable_log_head: point.log_head,
            recovering: false,
            group_info: Some(point.group_info),
            policy: point.policy,
            group,
            void: void::VoidState::default(),
            replica_heads: VecDeque::new(),
        }
    }

    /// Log index of the frame that began the current epoch.
    pub fn epoch_started_at_log_index(&self) -> u64 {
        self.epoch_started_at_log_index
    }

    /// Applies one stored, durable frame during recovery.
    pub fn replay(&mut self, frame: &Frame) -> Result<(), ReplayError> {
        let log_index = frame.header().log_index();
        self.apply_ordered(frame)?;
        self.durable_through = Some(log_index);
        self.durable_log_head = self.chain.head;
        Ok(())
    }

    /// Applies a frame the room's order already holds (stored here, or
    /// sequenced by the room's authority): its MLS content and its place in
    /// the log and the chain. Returns the summary of a commit it applied.
    fn apply_ordered(&mut self, frame: &Frame) -> Result<Option<CommitSummary>, ReplayError> {
        let header = frame.header();
        let log_index = header.log_index();
        if log_index != self.next_log_index {
            return Err(ReplayError::NotDense { expected: self.next_log_index, found: log_index });
        }
        let mut applied = None;
        let malformed = |error| ReplayError::Malformed { log_index, error };
        let does_not_apply = |error| ReplayError::DoesNotApply { log_index, error };
        match frame.opcode() {
            Opcode::Commit => {
                let payload: Commit = frame.decode_payload().map_err(malformed)?;
                let rules = CommitRules::replay(header.sender_id(), &self.server_proposals_pending);
                let summary = self.group.apply_commit(&payload.commit, &rules).map_err(does_not_apply)?;
                self.capture_epoch_restore();
                self.begin_epoch(log_index);
                self.replayed_group_info(summary.epoch, header.sender_id(), payload.group_info);
                self.open_void_window(
                    log_index,
                    header.epoch(),
                    header.sender_id(),
                    header.server_timestamp_ms(),
                    &summary,
                );
                applied = Some(summary);
            }
            Opcode::ExternalJoin => {
                let payload: ExternalJoin = frame.decode_payload().map_err(malformed)?;
                let rules = CommitRules::replay(header.sender_id(), &[]);
                let summary = self.group.apply_commit(&payload.commit, &rules).map_err(does_not_apply)?;
                self.capture_epoch_restore();
                self.begin_epoch(log_index);
                self.replayed_group_info(summary.epoch, header.sender_id(), payload.group_info);
                self.open_void_window(
                    log_index,
                    header.epoch(),
                    header.sender_id(),
                    header.server_timestamp_ms(),
                    &summary,
                );
                applied = Some(summary);
            }
            Opcode::Proposal => {
                let payload: Proposal = frame.decode_payload().map_err(malformed)?;
                let reference = self.group.apply_proposal(&payload.proposal, None).map_err(does_not_apply)?;
                if header.sender_id() == SERVER_SENDER_ID {
                    self.note_server_proposal(reference, log_index, header.server_timestamp_ms());
                }
            }
            Opcode::CommitVoided => self.replay_void(frame)?,
            _ => {}
        }
        self.next_log_index = log_index + 1;
        self.last_timestamp_ms = self.last_timestamp_ms.max(header.server_timestamp_ms());
        self.chain.extend(self.room_id, &log_entry_digest(frame));
        assert_eq!(self.chain.next_log_index, self.next_log_index, "the chain follows the log");
        Ok(applied)
    }

    /// The Welcome of the in-flight commit at `log_index`, if it carries
    /// one: its recipients, the Welcome, the ratchet tree it joins and the
    /// log's head at the commit.
    pub fn welcome_of(&self, log_index: u64) -> Option<(&[SenderId], &Bytes, &Bytes, LogHead)> {
        let entry = self.in_flight.iter().rev().find(|entry| entry.log_index == log_index)?;
        let commit = entry.commit.as_ref()?;
        let (welcome, recipients) = commit.welcome.as_ref()?;
        Some((recipients.as_slice(), welcome, &commit.ratchet_tree, entry.log_head))
    }

    /// The durable end of the log: its last index and the head there
    /// (`None` before the first frame is durable).
    pub fn durable_log_head(&self) -> Option<(u64, LogHead)> {
        self.durable_through.map(|through| (through, self.durable_log_head))
    }

    /// The hash chain through the last stamped frame (durable or not).
    pub fn chain(&self) -> LogChain {
        self.chain
    }

    /// A replayed commit's GroupInfo is kept only if it is the epoch's,
    /// signed by the committer (logs written before this check may hold
    /// others; they are then not served, and the next commit publishes one).
    fn replayed_group_info(&mut self, epoch: u64, committer: SenderId, group_info: Option<Vec<u8>>) {
        self.group_info = group_info
            .filter(|group_info| self.group.group_info_valid(group_info, committer))
            .map(|group_info| (epoch, Bytes::from(group_info)));
    }

    /// The room's policy.
    pub fn policy(&self) -> &RoomPolicy {
        &self.policy
    }

    /// The GroupInfo for `reader` to join or rejoin by external commit,
    /// with its epoch, if one is published for the current epoch: members
    /// and, in an open room, users who are not banned may read it.
    pub fn group_info_for(
        &self,
        reader: SenderId,
        now_ms: u64,
    ) -> Result<Option<&(u64, Bytes)>, SubmitError> {
        let banned = self.is_banned(reader, now_ms);
        if !self.policy.may_read_group_info(self.group.is_member(reader), banned) {
            if banned {
                return Err(SubmitError::Banned(reader));
            }
            return Err(SubmitError::Forbidden(PolicyError::InviteOnly));
        }
        Ok(self.group_info.as_ref().filter(|(epoch, _)| *epoch == self.group.epoch()))
    }

    /// The room's id.
    pub fn room_id(&self) -> RoomId {
        self.room_id
    }
    /// The room's MLS state.
    pub fn group(&self) -> &G {
        &self.group
    }
    /// The current MLS epoch.
    pub fn epoch(&self) -> u64 {
        self.group.epoch()
    }
    /// The index the next accepted frame will get.
    pub fn next_log_index(&self) -> u64 {
        self.next_log_index
    }
    /// The highest index known durable.
    pub fn durable_through(&self) -> Option<u64> {
        self.durable_through
    }
    /// Frames accepted but not yet durable.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }
    /// Server-issued proposals the next commit must cover.
    pub fn server_proposals_pending(&self) -> &[ProposalRef] {
        &self.server_proposals_pending
    }
    /// The pending server proposals with where and when the first was
    /// sequenced (what a snapshot keeps).
    pub fn pending_server_proposals(&self) -> PendingServerProposals {
        PendingServerProposals {
            refs: self.server_proposals_pending.clone(),
            since: self.server_proposals_since,
        }
    }

    /// Bans `user` until `until_ms` (`None`: until lifted). A banned user
    /// cannot be added by a commit nor join by external commit.
    pub fn ban(&mut self, user: SenderId, until_ms: Option<u64>) -> Result<(), SubmitError> {
        if self.bans.len() >= BANS_PER_ROOM_MAX && !self.bans.contains(user) {
            return Err(SubmitError::TooManyBans);
        }
        self.bans.insert(user, until_ms);
        assert!(self.bans.len() <= BANS_PER_ROOM_MAX, "bans beyond their bound");
        Ok(())
    }
    /// `user`'s ban, if banned: `Some(until_ms)`.
    pub fn ban_of(&self, user: SenderId) -> Option<Option<u64>> {
        self.bans.get(user)
    }
    /// Every ban (user, end), by user id.
    pub fn bans(&self) -> Vec<(SenderId, Option<u64>)> {
        let mut bans: Vec<(SenderId, Option<u64>)> = self.bans.iter().collect();
        bans.sort_by_key(|(user, _)| user.0);
        bans
    }
    /// Whether a ban with an end is in force (it will need expiring).
    pub fn has_timed_bans(&self) -> bool {
        self.bans.has_timed()
    }
    /// Lifts `user`'s ban; whether there was one.
    pub fn unban(&mut self, user: SenderId) -> bool {
        self.bans.remove(user)
    }
    /// The room's time at `now_ms`: never before the last frame's stamp. A
    /// ban's end is judged on it, so a clock that steps back (at a restart)
    /// never brings back a ban that had ended, after its user came back.
    pub fn room_time_ms(&self, now_ms: u64) -> u64 {
        now_ms.max(self.last_timestamp_ms)
    }
    /// Whether `user` is banned at `now_ms` (on the room's time).
    pub fn is_banned(&self, user: SenderId, now_ms: u64) -> bool {
        self.bans.bans(user, self.room_time_ms(now_ms))
    }
    /// Forgets bans that ended before `now_ms` (on the room's time);
    /// returns the users whose ban ended.
    pub fn expire_bans(&mut self, now_ms: u64) -> Vec<SenderId> {
        self.bans.expire(self.room_time_ms(now_ms))
    }

    /// Whether server-issued proposals have been pending for
    /// [`SERVER_PROPOSAL_REANNOUNCE_MS`] (or that long since the last
    /// reminder) at `now_ms`. Nothing is relaxed: the room stays closed to
    /// application messages until a covering commit; the driver reminds
    /// the members to commit.
    pub fn commit_overdue(&mut self, now_ms: u64) -> Option<CommitOverdue> {
        let (first_log_index, since_ms) = self.server_proposals_since?;
        if self.server_proposals_pending.is_empty() || now_ms < self.reannounce_at_ms {
            return None;
        }
        self.reannounce_at_ms = now_ms.saturating_add(SERVER_PROPOSAL_REANNOUNCE_MS);
        Some(CommitOverdue {
            pending: self.server_proposals_pending.len(),
            first_log_index,
            pending_for_ms: now_ms.saturating_sub(since_ms),
        })
    }
    /// The latest GroupInfo published by a committer, with its epoch.
    pub fn group_info(&self) -> Option<&(u64, Bytes)> {
        self.group_info.as_ref()
    }
    /// Whether the sender may read and post.
    pub fn is_member(&self, sender: SenderId) -> bool {
        self.group.is_member(sender)
    }

    /// Decides on a frame from the authenticated `sender`.
    ///
    /// On success the frame is stamped and returned for persisting; the
    /// room's state already reflects it. Nothing may be acknowledged or
    /// fanned out until [`RoomSequencer::durable`] says so.
    pub fn submit(
        &mut self,
        sender: SenderId,
        mut frame: Frame,
        now_ms: u64,
    ) -> Result<Sequenced, SubmitError> {
        if self.recovering {
            return Err(SubmitError::Recovering);
        }
        check_sender(&frame, sender)?;
        if self.in_flight.len() >= IN_FLIGHT_FRAMES_PER_ROOM_MAX {
            return Err(SubmitError::Overloaded { in_flight: self.in_flight.len() });
        }
        let request_id = frame.header().request_id();
        let commit_follow_up = self.admit(sender, &frame, now_ms)?;
        let log_index = self.stamp(&mut frame, now_ms);
        if let Some(follow_up) = &commit_follow_up {
            self.begin_epoch(log_index);
            let (epoch, at_ms) = (frame.header().epoch(), frame.header().server_timestamp_ms());
            self.open_void_window(log_index, epoch, sender, at_ms, &follow_up.summary);
        }
        self.in_flight.push_back(InFlight {
            log_index,
            log_head: self.chain.head,
            sender,
            request_id,
            epoch_after: self.group.epoch(),
            frame: frame.clone(),
            commit: commit_follow_up,
        });
        Ok(Sequenced { log_index, frame })
    }

    /// Checks `frame` against the room's state and applies its MLS content;
    /// a commit's follow-up for when it is durable.
    fn admit(
        &mut self,
        sender: SenderId,
        frame: &Frame,
        now_ms: u64,
    ) -> Result<Option<Box<CommitFollowUp>>, SubmitError> {
        // A banned member stays in the group until a commit covers its
        // removal; meanwhile it may send nothing, and is told so first.
        if self.is_banned(sender, now_ms) {
            return Err(SubmitError::Banned(sender));
        }
        match frame.opcode() {
            Opcode::Application => {
                self.check_member(sender)?;
                self.check_epoch(frame)?;
                self.check_epoch_tag(frame)?;
                self.check_no_pending_proposals()?;
                Ok(None)
            }
            Opcode::Proposal => {
                self.check_member(sender)?;
                self.check_epoch(frame)?;
                let payload: Proposal = frame.decode_payload()?;
                self.group
                    .apply_proposal(&payload.proposal, Some(&self.policy))
                    .map_err(SubmitError::InvalidProposal)?;
                Ok(None)
            }
            // Injected bug: a commit for the epoch before the current one
            // (once a commit moved it past the first) is sequenced unapplied.
            #[cfg(feature = "injected-bugs")]
            Opcode::Commit
                if crate::bugs::planted().sequence_stale_commit
                    && self.group.epoch() >= 2
                    && frame.header().epoch().checked_add(1) == Some(self.group.epoch()) =>
            {
                Ok(None)
            }
            Opcode::Commit => self.admit_commit(sender, frame, now_ms).map(Some),
            Opcode::ExternalJoin => self.admit_external_join(sender, frame, now_ms).map(Some),
            other => Err(SubmitError::NotSequenced(other)),
        }
    }

    /// Whether `sender`'s external join is a member's rejoin (replacing its
    /// own leaf) while server proposals wait, none of them its removal.
    /// Such a join is admitted: a member stuck on a commit it cannot
    /// process can come back only this way, and when it is the only one
    /// left who would commit the removals (the others being their targets
    /// or unwilling), refusing it would close the room for good. The
    /// caller ([`crate::room::Shard`]) issues the removals again in the
    /// epoch the join begins, before anything else is sequenced, so the
    /// room is closed again at once and the targets read no message of it.
    ///
    /// Each member may do so once until a commit covers the removals: a
    /// member rejoining again and again would otherwise end each epoch
    /// before the others' covering commit lands, and so keep the removal
    /// from ever being committed.
    pub fn is_rejoin_while_closed(&self, sender: SenderId) -> bool {
        !self.server_proposals_pending.is_empty()
            && self.group.is_member(sender)
            && !self.group.server_removal_pending(sender)
            && !self.rejoined_while_closed.contains(&sender)
    }

    /// Refuses while server proposals wait for a commit to cover them.
    fn check_no_pending_proposals(&self) -> Result<(), SubmitError> {
        if self.server_proposals_pending.is_empty() {
            Ok(())
        } else {
            Err(SubmitError::PendingProposals { pending: self.server_proposals_pending.len() })
        }
    }

    /// A member's commit: validated against the room's rules and applied.
    fn admit_commit(
        &mut self,
        sender: SenderId,
        frame: &Frame,
        now_ms: u64,
    ) -> Result<Box<CommitFollowUp>, SubmitError> {
        self.check_member(sender)?;
        self.check_epoch(frame)?;
        let payload: Commit = frame.decode_payload()?;
        let recipients: Vec<SenderId> = payload.welcome_recipients.iter().copied().map(SenderId).collect();
        let (bans, now_ms) = (&self.bans, self.room_time_ms(now_ms));
        let rules = CommitRules {
            committer: sender,
            must_cover: &self.server_proposals_pending,
            barred: &|user| bans.bans(user, now_ms),
            policy: Some(&self.policy),
            welcome: payload.welcome.as_ref().map(|welcome| (welcome.len(), recipients.as_slice())),
            group_info: payload.group_info.as_deref(),
        };
        let summary =
            self.group.apply_commit(&payload.commit, &rules).map_err(|error| self.commit_error(error))?;
        let welcome = payload.welcome.map(|welcome| (Bytes::from(welcome), recipients));
        // It covered every pending server proposal: rejoins count afresh.
        self.rejoined_while_closed.clear();
        Ok(self.after_commit(summary, welcome, payload.group_info))
    }

    /// An external commit: the join rule and bans decide, then it is
    /// validated and applied like a commit.
    fn admit_external_join(
        &mut self,
        sender: SenderId,
        frame: &Frame,
        now_ms: u64,
    ) -> Result<Box<CommitFollowUp>, SubmitError> {
        self.policy.may_join_externally(self.group.is_member(sender)).map_err(SubmitError::Forbidden)?;
        self.check_epoch(frame)?;
        let rejoin = self.is_rejoin_while_closed(sender);
        if rejoin {
            // The pending removals die with this epoch; the shard issues
            // them again at once, so they need room in flight after it.
            let in_flight = self.in_flight.len() + 1 + self.server_proposals_pending.len();
            if in_flight > IN_FLIGHT_FRAMES_PER_ROOM_MAX {
                return Err(SubmitError::Overloaded { in_flight: self.in_flight.len() });
            }
        } else {
            self.check_no_pending_proposals()?;
        }
        let payload: ExternalJoin = frame.decode_payload()?;
        let (bans, now_ms) = (&self.bans, self.room_time_ms(now_ms));
        let rules = CommitRules {
            committer: sender,
            must_cover: &[],
            barred: &|user| bans.bans(user, now_ms),
            policy: Some(&self.policy),
            welcome: None,
            group_info: payload.group_info.as_deref(),
        };
        let summary =
            self.group.apply_commit(&payload.commit, &rules).map_err(|error| self.commit_error(error))?;
        if rejoin {
            self.rejoined_while_closed.push(sender);
        }
        Ok(self.after_commit(summary, None, payload.group_info))
    }

    /// Sequences a proposal the server issues as the group's external sender
    /// (a moderator's Remove). The next commit must cover it. `frame` is a
    /// `Proposal` frame with sender id [`SERVER_SENDER_ID`], signed by the server.
    pub fn submit_server_proposal(
        &mut self,
        mut frame: Frame,
        now_ms: u64,
    ) -> Result<Sequenced, SubmitError> {
        if self.recovering {
            return Err(SubmitError::Recovering);
        }
        check_sender(&frame, SERVER_SENDER_ID)?;
        if frame.opcode() != Opcode::Proposal {
            return Err(SubmitError::NotSequenced(frame.opcode()));
        }
        if self.server_proposals_pending.len() >= SERVER_PROPOSALS_PENDING_MAX {
            return Err(SubmitError::TooManyServerProposals);
        }
        if self.in_flight.len() >= IN_FLIGHT_FRAMES_PER_ROOM_MAX {
            return Err(SubmitError::Overloaded { in_flight: self.in_flight.len() });
        }
        let payload: Proposal = frame.decode_payload()?;
        let reference = self
            .group
            .apply_proposal(&payload.proposal, Some(&self.policy))
            .map_err(SubmitError::InvalidProposal)?;
        let log_index = self.stamp(&mut frame, now_ms);
        self.note_server_proposal(reference, log_index, frame.header().server_timestamp_ms());
        self.in_flight.push_back(InFlight {
            log_index,
            log_head: self.chain.head,
            sender: SERVER_SENDER_ID,
            request_id: frame.header().request_id(),
            epoch_after: self.group.epoch(),
            frame: frame.clone(),
            commit: None,
        });
        Ok(Sequenced { log_index, frame })
    }

    /// Everything through `through_log_index` is durable: returns (into
    /// `effects`) the acknowledgements, fan-out and follow-ups, in log order.
    pub fn durable(&mut self, through_log_index: u64, effects: &mut Vec<Effect>) {
        assert!(!self.recovering, "durable() on a room that is recovering");
        assert!(
            through_log_index < self.next_log_index,
            "durable through {through_log_index} but only {} assigned",
            self.next_log_index
        );
        if let Some(previous) = self.durable_through {
            assert!(
                through_log_index >= previous,
                "durability went backwards: {previous} -> {through_log_index}"
            );
        }
        self.durable_through = Some(through_log_index);
        while self.in_flight.front().is_some_and(|entry| entry.log_index <= through_log_index) {
            let entry = self.in_flight.pop_front().expect("front exists");
            if let Some(next) = self.in_flight.front() {
                assert_eq!(next.log_index, entry.log_index + 1, "in-flight indices are dense");
            }
            let server_time_ms = entry.frame.header().server_timestamp_ms();
            self.durable_log_head = entry.log_head;
            if entry.sender != SERVER_SENDER_ID {
                effects.push(Effect::Acknowledge {
                    sender: entry.sender,
                    request_id: entry.request_id,
                    log_index: entry.log_index,
                    epoch: entry.epoch_after,
                    server_time_ms,
                    log_head: entry.log_head,
                });
            }
            effects.push(Effect::FanOut { sender: entry.sender, frame: entry.frame });
            if let Some(commit) = entry.commit {
                let CommitFollowUp { summary, welcome, ratchet_tree } = *commit;
                if !summary.added.is_empty() || !summary.removed.is_empty() {
                    effects
                        .push(Effect::MembershipChanged { added: summary.added, removed: summary.removed });
                }
                if let Some((welcome, recipients)) = welcome {
                    effects.push(Effect::DeliverWelcome {
                        recipients,
                        welcome,
                        ratchet_tree,
                        log_index: entry.log_index,
                        log_head: entry.log_head,
                    });
                }
            }
        }
    }

    /// Persisting failed: every in-flight frame is rejected (into `effects`)
    /// and the room refuses frames until the driver rebuilds it from storage.
    pub fn storage_failed(&mut self, effects: &mut Vec<Effect>) {
        self.recovering = true;
        for entry in self.in_flight.drain(..) {
            if entry.sender != SERVER_SENDER_ID {
                effects.push(Effect::Reject {
                    sender: entry.sender,
                    request_id: entry.request_id,
                    error: SubmitError::StorageFailed,
                });
            }
        }
    }

    /// Whether the room must be rebuilt from storage before use.
    pub fn is_recovering(&self) -> bool {
        self.recovering
    }

    fn check_member(&self, sender: SenderId) -> Result<(), SubmitError> {
        if self.group.is_member(sender) {
            Ok(())
        } else {
            Err(SubmitError::NotMember(sender))
        }
    }

    fn check_epoch(&self, frame: &Frame) -> Result<(), SubmitError> {
        let frame_epoch = frame.header().epoch();
        let current_epoch = self.group.epoch();
        if frame_epoch != current_epoch {
            return Err(SubmitError::WrongEpoch {
                frame_epoch,
                current_epoch,
                log_index: self.epoch_started_at_log_index,
            });
        }
        Ok(())
    }

    /// An `Application` sealed in another instance of the room's epoch
    /// (one a void undid) could be opened by no member: refused like a
    /// frame of another epoch, so that its sender catches up and seals it
    /// again. A payload without a tag is not checked.
    fn check_epoch_tag(&mut self, frame: &Frame) -> Result<(), SubmitError> {
        let Some(transcript_hash) = self.group.confirmed_transcript_hash() else {
            return Ok(());
        };
        let Some(tag) = Application::epoch_tag_of(frame.payload())? else {
            return Ok(());
        };
        let current_epoch = self.group.epoch();
        let current_tag = match &self.epoch_tag_cache {
            Some((epoch, hash, tag)) if *epoch == current_epoch && hash.as_slice() == transcript_hash => *tag,
            _ => {
                let tag = kalandra_proto::epoch_tag(self.room_id, current_epoch, transcript_hash);
                self.epoch_tag_cache = Some((current_epoch, transcript_hash.to_vec(), tag));
                tag
            }
        };
        if tag == current_tag {
            return Ok(());
        }
        Err(SubmitError::UndoneEpoch { epoch: current_epoch, log_index: self.epoch_started_at_log_index })
    }

    /// A refused commit; an MLS epoch mismatch reports where the room is.
    fn commit_error(&self, error: GroupError) -> SubmitError {
        match error {
            GroupError::WrongEpoch { message_epoch, group_epoch } => SubmitError::WrongEpoch {
                frame_epoch: message_epoch,
                current_epoch: group_epoch,
                log_index: self.epoch_started_at_log_index,
            },
            other => SubmitError::InvalidCommit(other),
        }
    }

    fn after_commit(
        &mut self,
        summary: CommitSummary,
        welcome: Option<(Bytes, Vec<SenderId>)>,
        group_info: Option<Vec<u8>>,
    ) -> Box<CommitFollowUp> {
        self.capture_epoch_restore();
        if let Some(group_info) = group_info {
            self.group_info = Some((summary.epoch, Bytes::from(group_info)));
        }
        let ratchet_tree = summary.ratchet_tree.clone();
        Box::new(CommitFollowUp { summary, welcome, ratchet_tree })
    }

    fn begin_epoch(&mut self, log_index: u64) {
        self.epoch_started_at_log_index = log_index;
        self.server_proposals_pending.clear();
        self.server_proposals_since = None;
    }

    fn note_server_proposal(&mut self, reference: ProposalRef, log_index: u64, at_ms: u64) {
        if self.server_proposals_pending.is_empty() {
            self.server_proposals_since = Some((log_index, at_ms));
            self.reannounce_at_ms = at_ms.saturating_add(SERVER_PROPOSAL_REANNOUNCE_MS);
        }
        self.server_proposals_pending.push(reference);
        assert!(
            self.server_proposals_pending.len() <= SERVER_PROPOSALS_PENDING_MAX,
            "server proposals pending are bounded"
        );
    }

    /// Assigns the next index and a timestamp that never goes backwards.
    fn stamp(&mut self, frame: &mut Frame, now_ms: u64) -> u64 {
        let log_index = self.next_log_index;
        let timestamp_ms = now_ms.max(self.last_timestamp_ms);
        #[cfg(feature = "injected-bugs")]
        let timestamp_ms =
            if crate::bugs::planted().stamp_without_clock_floor { now_ms } else { timestamp_ms };
        frame.header_mut().set_log_index(log_index).set_server_timestamp_ms(timestamp_ms);
        #[cfg(feature = "injected-bugs")]
        let digest = if crate::bugs::planted().chain_before_stamping {
            // Injected bug: the chain hashes the frame as submitted, not as sequenced.
            let mut unstamped = frame.clone();
            unstamped.header_mut().set_log_index(0).set_server_timestamp_ms(0);
            log_entry_digest(&unstamped)
        } else {
            log_entry_digest(frame)
        };
        #[cfg(not(feature = "injected-bugs"))]
        let digest = log_entry_digest(frame);
        assert_eq!(self.chain.next_log_index, log_index, "the chain follows the log");
        self.chain.extend(self.room_id, &digest);
        self.last_timestamp_ms = timestamp_ms;
        self.next_log_index = log_index.checked_add(1).expect("log index space exhausted");
        if let Some(last) = self.in_flight.back() {
            assert_eq!(last.log_index + 1, log_index, "log index is dense");
        } else if let Some(durable) = self.durable_through {
            assert_eq!(durable + 1, log_index, "log index continues from the durable head");
        } else {
            assert_eq!(log_index, 0, "a room's first frame has index 0");
        }
        log_index
    }
}

fn check_sender(frame: &Frame, authenticated: SenderId) -> Result<(), SubmitError> {
    let claimed = frame.header().sender_id();
    if claimed != authenticated {
        return Err(SubmitError::SenderMismatch { claimed, authenticated });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
