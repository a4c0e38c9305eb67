//! One error enum per operation. Peer misbehaviour, caller misuse and
//! corrupted durable state are separate variants; an error never leaves a
//! change behind.

use crate::ids::{ChainHead, DomainId, Generation, LogIndex};
use crate::message::Refusal;
use crate::record::{GroupSummary, RecordError};

/// `sequence` was called where `route` would not have said `SequenceHere` (caller misuse).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SequenceError {
    /// This domain may not sequence the room now.
    #[error("not sequencing this room: {0:?}")]
    NotSequencing(Refusal),
    /// The log is at the last possible index.
    #[error("the log index space is exhausted")]
    IndexExhausted,
}

/// Why a handover cannot begin (caller misuse or a limit).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BeginError {
    /// Only the authority can hand the room over.
    #[error("this domain is not the room's authority")]
    NotAuthority,
    /// A handover is already prepared and undecided.
    #[error("the room is already sealed for a handover to {to:?}")]
    AlreadySealed {
        /// Its target.
        to: DomainId,
    },
    /// A domain cannot hand a room to itself.
    #[error("a handover to this domain itself")]
    TargetIsSelf,
    /// The room has no entry yet (not even its `CreateRoom`).
    #[error("the room's log is empty")]
    EmptyLog,
    /// The room reached [`crate::limits::AUTHORITY_RECORDS_MAX`].
    #[error("the room has reached its limit of authority records")]
    TooManyRecords,
}

/// Why a handover cannot be aborted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AbortError {
    /// Nothing is sealed here, or the decision is already taken (a signed
    /// certificate can never be taken back).
    #[error("no undecided handover to abort")]
    NotSealed,
}

/// Why this domain cannot sign its acceptance of a handover.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AcceptError {
    /// The body is not a current offer to this domain from the room's authority.
    #[error("not a current handover offer to this domain")]
    NotOffered,
    /// Another body of the same generation is already accepted.
    #[error("another handover of this generation is already accepted")]
    AlreadyAccepted,
    /// This replica's log does not end at the sealed index.
    #[error("the local log ends before {next:?}, the seal is at {sealed:?}")]
    LogNotAtSeal {
        /// The local next index.
        next: LogIndex,
        /// The body's sealed index.
        sealed: LogIndex,
    },
    /// The local log ends at the sealed index with another chain head.
    #[error("the local chain head {local:?} differs from the sealed one")]
    ChainHeadMismatch {
        /// The local head.
        local: ChainHead,
    },
    /// The local group or policy state differs from the sealed one.
    #[error("the local group state {local:?} differs from the sealed one")]
    GroupMismatch {
        /// The local summary.
        local: GroupSummary,
    },
}

/// Why this domain cannot decline a handover.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeclineError {
    /// This domain signed its acceptance: only the old authority decides now.
    #[error("already accepted; ask the old authority to abort")]
    AlreadyAccepted,
    /// The body is not a current offer to this domain.
    #[error("not a current handover offer to this domain")]
    NotOffered,
}

/// Why a message from another domain was refused. Every variant but
/// `Internal` is the sender's fault; nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    /// An authority record does not verify or does not continue the chain.
    #[error("authority record refused: {0}")]
    Record(#[from] RecordError),
    /// Two different records for one generation.
    #[error("two different records for generation {0:?}")]
    Equivocation(Generation),
    /// The message must come from another domain.
    #[error("{found:?} sent what only {expected:?} may send")]
    WrongSender {
        /// Who may send it.
        expected: DomainId,
        /// Who did.
        found: DomainId,
    },
    /// An entry, acknowledgement or handover outside its generation's range (fencing).
    #[error("generation {generation:?} does not cover index {index:?}")]
    Fenced {
        /// The claimed generation.
        generation: Generation,
        /// The index.
        index: LogIndex,
    },
    /// A generation this domain has no record of, where one is required.
    #[error("unknown generation {0:?}")]
    UnknownGeneration(Generation),
    /// An entry that does not continue this domain's chain, or a log that
    /// runs past a certified seal.
    #[error("log fork at index {0:?}")]
    ForkedLog(LogIndex),
    /// An entry stamped before its predecessor.
    #[error("entry {0:?} stamped before its predecessor")]
    TimestampRegressed(LogIndex),
    /// A handover offer addressed to another domain or room.
    #[error("handover offer not for this domain and room")]
    Misaddressed,
    /// A second, different offer for a generation this domain accepted.
    #[error("a different handover offer for an accepted generation")]
    ConflictingOffer,
    /// A records page longer than [`crate::limits::RECORDS_PAGE_MAX`].
    #[error("too many records in one message")]
    TooManyRecords,
    /// This domain's own state is inconsistent (a bug or corrupted storage).
    #[error("internal: {0}")]
    Internal(&'static str),
}

impl MessageError {
    /// Whether the sending domain is at fault (as opposed to this one).
    pub fn is_peer_fault(&self) -> bool {
        !matches!(self, MessageError::Internal(_))
    }
}

/// Why a room's durable state does not load (corrupted or foreign storage).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecoverError {
    /// The stored records do not form a chain.
    #[error("stored authority records: {0}")]
    Record(#[from] RecordError),
    /// The stored state breaks an invariant.
    #[error("stored handover state is inconsistent: {0}")]
    Inconsistent(&'static str),
}

/// Why a domain cannot join a room as a replica.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinError {
    /// The genesis record does not verify.
    #[error("genesis record: {0}")]
    Record(#[from] RecordError),
    /// This domain created the room.
    #[error("this domain is the room's creator")]
    OwnRoom,
}
