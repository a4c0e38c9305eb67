//! What domains send each other about a room, and the log entries they carry.

use crate::ids::{ChainHead, DomainId, FrameDigest, Generation, LogIndex};
use crate::record::{AuthorityRecord, HandoverBody};
use crate::sign::Signature;

/// One sequenced entry of a room's log, as the handover core sees it (the
/// frame's bytes travel beside it).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LogEntry {
    /// Position in the log.
    pub index: LogIndex,
    /// The authority generation that sequenced it.
    pub generation: Generation,
    /// The frame as its sender signed it.
    pub frame: FrameDigest,
    /// The server time stamped on it.
    pub timestamp_ms: u64,
    /// The chain head after this entry.
    pub chain_head: ChainHead,
}

/// Where a domain's copy of a room's log ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LogHead {
    /// The index the next entry will have (the number of entries).
    pub next_index: LogIndex,
    /// The chain head after the last entry (the chain start when empty).
    pub chain_head: ChainHead,
    /// Server time of the last entry (0 when empty).
    pub last_timestamp_ms: u64,
}

/// The new authority's half of a certificate.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Acceptance {
    /// What it accepted.
    pub body: HandoverBody,
    /// Its signature over [`HandoverBody::certificate_bytes`].
    pub signature: Signature,
}

/// Why a domain did not sequence a frame. Every reason but `Rejected` is
/// retryable: the frame was not sequenced and may be sent again.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Refusal {
    /// The room is sealed for a handover to `to`, which will sequence it at
    /// `generation` (unless the handover is aborted, when the old authority
    /// sequences it again at that generation). Retry shortly.
    Moving {
        /// The domain the room is moving to.
        to: DomainId,
        /// The generation that will sequence the next frame.
        generation: Generation,
    },
    /// This domain does not sequence the room; as far as it knows, `authority` does.
    NotAuthority {
        /// The authority this domain knows.
        authority: DomainId,
        /// Its generation.
        generation: Generation,
    },
    /// The relay's route is older than this domain's records; it was sent
    /// the records it lacks. Retry.
    RouteStale {
        /// This domain's newest generation.
        generation: Generation,
    },
    /// The sequencer refused the frame itself (an error code of the wire
    /// protocol, such as a commit for a past epoch). Not retryable as is.
    Rejected {
        /// The wire error code.
        code: u16,
    },
}

impl Refusal {
    /// Whether sending the same frame again can succeed.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, Refusal::Rejected { .. })
    }
}

/// A message between two domains about one room. The transport
/// authenticates the sending domain.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Message {
    /// A relay's frame (from one of its users) for the authority, with the
    /// generation the relay believes current.
    Relay {
        /// The frame.
        frame: FrameDigest,
        /// The relay's newest generation.
        generation: Generation,
    },
    /// The authority sequenced a relayed frame durably.
    RelayAck {
        /// The frame.
        frame: FrameDigest,
        /// Where.
        index: LogIndex,
        /// By which generation.
        generation: Generation,
    },
    /// The frame was not sequenced.
    RelayRefused {
        /// The frame.
        frame: FrameDigest,
        /// Why.
        refusal: Refusal,
    },
    /// A sequenced entry: live fan-out from the authority, or an answer to `FetchLog`.
    Entry(LogEntry),
    /// Send me the entries from `from` on; my newest generation is `generation`.
    FetchLog {
        /// The first index wanted.
        from: LogIndex,
        /// The asker's newest generation (answered with the records it lacks).
        generation: Generation,
    },
    /// The old authority sealed the room and asks the addressee to take it over.
    Prepare(HandoverBody),
    /// The addressee signed its half of the certificate.
    Accept(Acceptance),
    /// The addressee will not take the room; the old authority resumes.
    Decline(HandoverBody),
    /// Authority records, in generation order.
    Records(Vec<AuthorityRecord>),
    /// Send me the records after `after`.
    RecordsWanted {
        /// The asker's newest generation.
        after: Generation,
    },
}
