//! Moderation acts as data: what is asked, what is decided, what is
//! written, and what the asker is told.

use kalandra_proto::{ErrorCode, RoomId, SenderId};

use crate::room::audit::{AuditEvent, AuditRecord};
use crate::room::roles::{Act, Actor, ModerationError, Role};
use crate::room::sequencer::SubmitError;
use crate::store::ModerationChange;

/// Moderation writes queued for the writer before acts are refused as busy.
pub const MODERATION_WRITES_QUEUED_MAX: usize = 256;
/// How often a shard checks for overdue server proposals and ended bans.
pub const MODERATION_TICK_MS: u64 = 1_000;
/// Most rooms one room listing returns.
pub const ROOMS_LIST_MAX: usize = 1_000;

// A moderation act needs one writer slot; a full queue is refused, never waited on.
const _: () = assert!(MODERATION_WRITES_QUEUED_MAX > 0);
// Re-announcing is checked on the tick, so the bound must span several ticks.
const _: () = assert!(crate::room::sequencer::SERVER_PROPOSAL_REANNOUNCE_MS >= 10 * MODERATION_TICK_MS);

/// A moderation act asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModerationRequest {
    /// The room.
    pub room_id: RoomId,
    /// Who asks.
    pub actor: Actor,
    /// The user acted upon.
    pub target: SenderId,
    /// What to do.
    pub act: Act,
    /// The reason, for the audit log.
    pub reason: String,
}

/// A moderation act that is done and durable, with its audit record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModerationDone {
    /// Log index of the Remove proposal the act sequenced, if it sequenced one.
    pub log_index: Option<u64>,
    /// The room's epoch when the act was decided.
    pub epoch: u64,
    /// Server time of the act, ms since the Unix epoch.
    pub time_ms: u64,
    /// The act's audit record.
    pub audit: AuditRecord,
}

/// Why a moderation act was not done.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModerationFailure {
    /// The room does not exist.
    #[error("no such room")]
    UnknownRoom,
    /// The target of a kick is not a member of the room.
    #[error("user {0} is not a member of the room")]
    NotMember(SenderId),
    /// The actor may not do this, or the role change is not possible.
    #[error(transparent)]
    Refused(#[from] ModerationError),
    /// The target's removal is already pending: it waits for a covering commit.
    #[error("the removal of user {0} is already pending")]
    RemovalPending(SenderId),
    /// Unban of a user who is not banned.
    #[error("user {0} is not banned")]
    NotBanned(SenderId),
    /// The sequencer refused the Remove proposal (limits, storage recovery).
    #[error("the room refused the removal: {0}")]
    Sequencer(SubmitError),
    /// Too many moderation writes are queued; retry shortly.
    #[error("too many moderation acts in progress; retry shortly")]
    Busy,
    /// Storage failed: the act may not be durable.
    #[error("storage failed: {0}")]
    Storage(String),
    /// The node is shutting down.
    #[error("the server is shutting down")]
    Stopped,
}

impl ModerationFailure {
    /// The wire error code.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            ModerationFailure::UnknownRoom => ErrorCode::UnknownRoom,
            ModerationFailure::NotMember(_) => ErrorCode::NotMember,
            ModerationFailure::Refused(ModerationError::Forbidden(_) | ModerationError::SelfTarget) => {
                ErrorCode::Forbidden
            }
            ModerationFailure::Refused(ModerationError::TooManyRoles) => ErrorCode::QuotaExceeded,
            ModerationFailure::Refused(_) => ErrorCode::Forbidden,
            ModerationFailure::RemovalPending(_) => ErrorCode::PendingProposals,
            ModerationFailure::NotBanned(_) => ErrorCode::NotMember,
            ModerationFailure::Sequencer(error) => error.error_code(),
            ModerationFailure::Busy => ErrorCode::RateLimited,
            ModerationFailure::Storage(_) => ErrorCode::StorageUnavailable,
            ModerationFailure::Stopped => ErrorCode::ShuttingDown,
        }
    }
}

/// A room as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomInfo {
    /// The room.
    pub room_id: RoomId,
    /// Its creator (admin).
    pub creator: SenderId,
    /// Creation time, ms since the Unix epoch.
    pub created_at_ms: u64,
    /// Current MLS epoch.
    pub epoch: u64,
    /// Index the next frame gets.
    pub next_log_index: u64,
    /// Members, by sender id.
    pub members: Vec<SenderId>,
    /// Users with a role, the creator first.
    pub roles: Vec<(SenderId, Role)>,
    /// Banned users and when their ban ends.
    pub bans: Vec<(SenderId, Option<u64>)>,
    /// Server-issued proposals waiting for a covering commit.
    pub server_proposals_pending: usize,
    /// Log index and time of the first of them.
    pub pending_since: Option<(u64, u64)>,
    /// Members whose removal those proposals ask for.
    pub removals_pending: Vec<SenderId>,
}

/// A room in a listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoomSummary {
    /// The room.
    pub room_id: RoomId,
    /// Its creator.
    pub creator: SenderId,
    /// Current MLS epoch.
    pub epoch: u64,
    /// Number of members.
    pub members: usize,
    /// Index the next frame gets.
    pub next_log_index: u64,
}

/// One write for the moderation writer: a change and its audit record.
pub struct ModerationWrite {
    /// The change.
    pub change: ModerationChange,
    /// Its audit record, still to be chained.
    pub event: AuditEvent,
    /// The act to answer once written (`None`: nobody waits).
    pub completion: Option<Completion>,
}

/// Who waits for a moderation write, and what to tell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// The act's token (see [`super::Shard::handle_moderate`]).
    pub token: u64,
    /// Log index of the Remove proposal the act sequenced, if any.
    pub log_index: Option<u64>,
    /// The room's epoch when the act was decided.
    pub epoch: u64,
}

impl Completion {
    /// What the act's asker is told once its write finished: `written` is
    /// the audit record the store chained, or why the write failed.
    pub fn outcome(&self, written: Result<AuditRecord, String>) -> Result<ModerationDone, ModerationFailure> {
        written
            .map(|audit| ModerationDone {
                log_index: self.log_index,
                epoch: self.epoch,
                time_ms: audit.time_ms,
                audit,
            })
            .map_err(ModerationFailure::Storage)
    }
}

/// An act waiting for its Remove proposal to become durable.
pub(super) struct ActAwaitingProposal {
    pub(super) log_index: u64,
    pub(super) change: ModerationChange,
    pub(super) event: AuditEvent,
    pub(super) epoch: u64,
    pub(super) token: u64,
}
