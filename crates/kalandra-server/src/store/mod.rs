//! Durable storage for the server: room logs, the key-package directory,
//! GroupInfo, pending Welcomes and room metadata.
//!
//! The [`Store`] trait is synchronous (redb is); the async
//! [`group_commit::GroupCommit`] driver batches appends from many tasks into
//! one durable transaction and acknowledges each request only once its batch
//! is durable. Two implementations share one semantics and one test suite:
//! [`RedbStore`] (embedded, the default) and [`MemoryStore`] (tests).
//!
//! Invariants the store enforces itself, in release builds too:
//! - a room's log is dense: an append batch must continue each room exactly
//!   from its stored head, with strictly increasing, gap-free indices; a batch
//!   that breaks this is refused as a whole and nothing is written;
//! - a range read returns dense indices starting at the requested index;
//! - every stored object and every per-user collection is bounded by a named
//!   constant in [`limits`];
//! - log entries are encrypted at rest, each under its own data key kept
//!   apart from the ciphertext ([`sealing`]); erasing an entry (redaction,
//!   retention) destroys its key and replaces its record by a tombstone, and
//!   never removes its index: the log stays dense.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use kalandra_proto::federation::DomainName;

use crate::room::audit::{AuditEvent, AuditHead, AuditRecord, GENESIS_HASH};
use crate::room::roles::Role;

pub mod backup;
pub mod group_commit;
pub mod memory;
pub mod redb;
pub mod retention;
pub mod sealing;

#[cfg(test)]
mod suite;

pub use self::group_commit::{
    AppendTicket, GroupCommit, GroupCommitConfig, GroupCommitError, GroupCommitStatsSnapshot, SubmitError,
};
pub use self::memory::MemoryStore;
pub use self::redb::{CompactError, CompactReport, OpenError, RedbOptions, RedbStore};
pub use self::sealing::{DataKey, Erasure, ErasureCause, Redaction};

/// Every size, count and queue bound of the storage layer, in one place.
pub mod limits {
    /// Largest encoded frame a log entry may hold: any valid frame.
    pub const LOG_ENTRY_BYTES_MAX: usize = kalandra_proto::limits::FRAME_BYTES_MAX;
    /// Most entries one [`read_range`](super::Store::read_range) returns.
    pub const READ_RANGE_ENTRIES_MAX: usize = 1024;
    /// Byte budget of one range read: entries are returned while the total
    /// stays within it, and the first entry is always returned.
    pub const READ_RANGE_BYTES_MAX: usize = 2 * LOG_ENTRY_BYTES_MAX;
    /// Most room heads one [`room_heads`](super::Store::room_heads) page returns.
    pub const ROOM_HEADS_PAGE_MAX: usize = 10_000;

    /// Most ordinary (single-use) key packages stored for one user.
    pub const KEY_PACKAGES_PER_USER_MAX: usize = 256;
    /// Largest key package (ordinary or last resort).
    pub const KEY_PACKAGE_BYTES_MAX: usize = 64 * 1024;
    /// Longest key-package reference (an MLS `KeyPackageRef` is a hash output,
    /// at most 64 bytes for the registered cipher suites).
    pub const KEY_PACKAGE_REF_BYTES_MAX: usize = 64;
    /// How long a record that a key package was handed out (to a local
    /// client or a peer domain) is kept: a peer's Welcome naming the package
    /// is taken within this time of the claim (the commit, its durability and the Welcome's routing,
    /// with the peer's retries while a link is down, fit in it).
    pub const HANDED_OUT_CLAIM_RECORD_MS: u64 = 7 * 24 * 60 * 60 * 1000;
    /// Most records of packages handed out kept for one user: enough
    /// for every ordinary package twice over and the last-resort one; when
    /// full, the oldest record goes.
    pub const HANDED_OUT_CLAIMS_PER_USER_MAX: usize = 2 * KEY_PACKAGES_PER_USER_MAX + 1;

    /// Largest GroupInfo (it may carry the ratchet tree: about 1.8 MB at
    /// 10,000 members).
    pub const GROUP_INFO_BYTES_MAX: usize = 8 * 1024 * 1024;
    /// Most Welcomes pending for one recipient. A commit's Welcome is not
    /// stored for a recipient who has this many (the commit stands; the
    /// other recipients get theirs): see `docs/SECURITY.md`.
    pub const WELCOMES_PER_RECIPIENT_MAX: usize = 128;
    /// Largest Welcome: a whole `Welcome` frame (header and payload).
    pub const WELCOME_BYTES_MAX: usize = kalandra_proto::limits::FRAME_BYTES_MAX;
    /// Most Welcomes one [`pending_welcomes`](super::Store::pending_welcomes)
    /// page returns.
    pub const WELCOMES_PAGE_ENTRIES_MAX: usize = 16;
    /// Byte budget of one pending-Welcome page: Welcomes are returned while
    /// the total stays within it, and the first is always returned.
    pub const WELCOMES_PAGE_BYTES_MAX: usize = WELCOME_BYTES_MAX;
    /// Largest MLS public-state snapshot kept in a room's metadata.
    pub const MLS_SNAPSHOT_BYTES_MAX: usize = 32 * 1024 * 1024;

    /// Requests the group-commit queue holds before submitters wait.
    pub const GROUP_COMMIT_QUEUE_REQUESTS_MAX: usize = 16_384;
    /// Frame bytes the group-commit queue holds (queued and being written)
    /// before submitters wait.
    pub const GROUP_COMMIT_QUEUE_BYTES_MAX: usize = 64 * 1024 * 1024;
    /// Most entries written in one group-commit transaction.
    pub const GROUP_COMMIT_BATCH_ENTRIES_MAX: usize = 8192;
    /// Most frame bytes written in one group-commit transaction.
    pub const GROUP_COMMIT_BATCH_BYTES_MAX: usize = 16 * 1024 * 1024;

    /// Most log indices one [`redact`](super::Store::redact) call erases.
    pub const REDACT_ENTRIES_PER_CALL_MAX: usize = 1024;
    /// Most journaled erasures one
    /// [`erasures_after`](super::Store::erasures_after) page returns.
    pub const ERASURES_PAGE_MAX: usize = 64;
    /// Shortest retention period a room may have, milliseconds.
    pub const RETENTION_MS_MIN: u64 = 1_000;
    /// Most rooms one [`retention_rooms`](super::Store::retention_rooms)
    /// page returns.
    pub const RETENTION_ROOMS_PAGE_MAX: usize = 10_000;

    /// redb page-cache size used by [`RedbStore::open`](super::RedbStore::open).
    pub const REDB_CACHE_BYTES_DEFAULT: usize = 256 * 1024 * 1024;

    /// Users of other domains whose home domain is recorded at most (the
    /// users this server's clients claimed key packages of, or whose frames
    /// were relayed); more are not recorded.
    pub const REMOTE_USERS_MAX: usize = 1 << 20;
    /// Remote users one [`Store::remote_users`](super::Store::remote_users)
    /// page returns at most.
    pub const REMOTE_USERS_PAGE_MAX: usize = 1024;
    /// Rooms of other domains whose authority is recorded at most.
    pub const REMOTE_ROOMS_MAX: usize = 1 << 20;

    /// Largest value redb stores (its limit is just under 4 GiB).
    const REDB_VALUE_BYTES_MAX: usize = 3 * 1024 * 1024 * 1024;

    const _: () = {
        assert!(LOG_ENTRY_BYTES_MAX > 0);
        // A maximal entry fits in one batch, one read and the queue.
        assert!(GROUP_COMMIT_BATCH_BYTES_MAX >= LOG_ENTRY_BYTES_MAX);
        assert!(READ_RANGE_BYTES_MAX >= LOG_ENTRY_BYTES_MAX);
        assert!(GROUP_COMMIT_QUEUE_BYTES_MAX >= GROUP_COMMIT_BATCH_BYTES_MAX);
        // A full batch of one-entry requests can wait while another is written.
        assert!(GROUP_COMMIT_QUEUE_REQUESTS_MAX >= GROUP_COMMIT_BATCH_ENTRIES_MAX);
        // Queue bytes are counted with semaphore permits (u32).
        assert!(GROUP_COMMIT_QUEUE_BYTES_MAX <= u32::MAX as usize);
        assert!(GROUP_COMMIT_BATCH_ENTRIES_MAX > 0 && READ_RANGE_ENTRIES_MAX > 0);
        // The reference length is stored in one byte of the key.
        assert!(KEY_PACKAGE_REF_BYTES_MAX < u8::MAX as usize);
        assert!(KEY_PACKAGES_PER_USER_MAX > 0 && WELCOMES_PER_RECIPIENT_MAX > 0);
        // Everything stored as one redb value fits in one.
        assert!(LOG_ENTRY_BYTES_MAX <= REDB_VALUE_BYTES_MAX);
        assert!(GROUP_INFO_BYTES_MAX <= REDB_VALUE_BYTES_MAX);
        assert!(WELCOME_BYTES_MAX <= REDB_VALUE_BYTES_MAX);
        // Every Welcome frame the server builds can be stored, and a page
        // holds at least one.
        assert!(
            WELCOME_BYTES_MAX
                >= kalandra_proto::limits::HEADER_BYTES
                    + kalandra_proto::Opcode::Welcome.payload_bytes_max() as usize
        );
        assert!(WELCOMES_PAGE_BYTES_MAX >= WELCOME_BYTES_MAX && WELCOMES_PAGE_ENTRIES_MAX > 0);
        assert!(WELCOMES_PAGE_ENTRIES_MAX <= WELCOMES_PER_RECIPIENT_MAX);
        assert!(MLS_SNAPSHOT_BYTES_MAX <= REDB_VALUE_BYTES_MAX);
        assert!(KEY_PACKAGE_BYTES_MAX <= REDB_VALUE_BYTES_MAX);
        assert!(REDACT_ENTRIES_PER_CALL_MAX > 0 && RETENTION_ROOMS_PAGE_MAX > 0);
        assert!(REMOTE_USERS_PAGE_MAX > 0 && REMOTE_USERS_PAGE_MAX <= REMOTE_USERS_MAX);
        // A sealed entry (tag, prefix length, nonce, tag) still fits one value.
        assert!(LOG_ENTRY_BYTES_MAX + 64 <= REDB_VALUE_BYTES_MAX);
    };
}

use limits::*;

/// A room's 16-byte identifier: the wire protocol's own type, so frames and
/// storage share one.
pub use kalandra_proto::RoomId;

/// Position of an entry in its room's log; the first entry has index 0.
pub type LogIndex = u64;

/// A user's numeric identifier, as carried in the frame header's sender field.
pub type UserId = u64;

/// Identifier of a pending Welcome, unique in the store and increasing in
/// the order Welcomes were stored; never reused.
pub type WelcomeId = u64;

/// One sequenced frame of a room's log, as appended. Storage treats the
/// frame as opaque, except that its first
/// [`ROUTING_PREFIX_BYTES`](sealing::ROUTING_PREFIX_BYTES) bytes (the
/// header's routing fields) stay in clear at rest and survive an erasure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogEntry {
    /// The room the entry belongs to.
    pub room_id: RoomId,
    /// The entry's position in the room's log.
    pub log_index: LogIndex,
    /// The full encoded frame (header and payload).
    pub frame: Bytes,
}

/// A log entry as read back: its frame, or what is left after its content
/// was erased.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredEntry {
    /// The room the entry belongs to.
    pub room_id: RoomId,
    /// The entry's position in the room's log.
    pub log_index: LogIndex,
    /// The frame, or the erasure record.
    pub content: EntryContent,
}

/// The content of a [`StoredEntry`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryContent {
    /// The full frame, as appended.
    Frame(Bytes),
    /// The content was destroyed (redaction or retention); the index stays.
    Erased(Erasure),
}

impl StoredEntry {
    /// The frame, unless the entry was erased.
    pub fn frame(&self) -> Option<&Bytes> {
        match &self.content {
            EntryContent::Frame(frame) => Some(frame),
            EntryContent::Erased(_) => None,
        }
    }

    /// The clear routing prefix of the frame (present in both kinds).
    pub fn routing(&self) -> &[u8] {
        match &self.content {
            EntryContent::Frame(frame) => &frame[..frame.len().min(sealing::ROUTING_PREFIX_BYTES)],
            EntryContent::Erased(erasure) => &erasure.routing,
        }
    }
}

/// A stored entry equals an appended one when it holds the same frame.
impl PartialEq<LogEntry> for StoredEntry {
    fn eq(&self, other: &LogEntry) -> bool {
        self.room_id == other.room_id
            && self.log_index == other.log_index
            && self.frame() == Some(&other.frame)
    }
}

/// Outcome of erasing one entry with [`Store::redact`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RedactOutcome {
    /// The entry's key was destroyed and its record replaced by a tombstone.
    Erased,
    /// The entry had been erased before; nothing changed (erasure is
    /// idempotent).
    AlreadyErased,
}

/// A room's retention setting and how far its sweep has got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoomRetention {
    /// The room.
    pub room_id: RoomId,
    /// Entries older than this (by server timestamp) are erased.
    pub retention_ms: u64,
    /// Entries below this index have been swept (erased or kept for good:
    /// see [`retention`]); the next sweep starts here.
    pub swept_next_log_index: LogIndex,
}

/// One call's erasures in a room's erasure journal: what the room's
/// replicas at other domains erase in turn ([`Store::erasures_after`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JournaledErasure {
    /// The journal's position: 1 for the room's first erasure, one more for each.
    pub seq: u64,
    /// The entries that call erased, in the order asked.
    pub log_indices: Vec<LogIndex>,
}

/// A room and the index its next log entry will get.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoomHead {
    /// The room.
    pub room_id: RoomId,
    /// Number of entries in the room's log, i.e. the next index to append.
    pub next_log_index: LogIndex,
}

/// An ordinary (single-use) key package to store in a user's directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyPackageUpload {
    /// The package's MLS `KeyPackageRef` (1 to
    /// [`KEY_PACKAGE_REF_BYTES_MAX`] bytes). Uploading a reference that is
    /// already stored replaces that package.
    pub key_package_ref: Vec<u8>,
    /// The encoded key package, opaque to storage.
    pub key_package: Bytes,
}

/// A key package handed out by [`Store::claim_key_package`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimedKeyPackage {
    /// The encoded key package.
    pub key_package: Bytes,
    /// True when the user had no ordinary package left and this is the
    /// reusable last-resort package.
    pub is_last_resort: bool,
}

/// A key package recorded as handed out (to a local client or a peer domain).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandedOutClaim {
    /// The package's MLS `KeyPackageRef`.
    pub key_package_ref: Vec<u8>,
    /// When it was last handed out, ms since the Unix epoch.
    pub claimed_at_ms: u64,
}

/// How many key packages a user has in the directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct KeyPackageCount {
    /// Ordinary packages not yet claimed.
    pub ordinary: u64,
    /// Whether a last-resort package is stored.
    pub has_last_resort: bool,
}

/// A room's current GroupInfo and the epoch it describes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupInfoRecord {
    /// MLS epoch of the GroupInfo.
    pub epoch: u64,
    /// The encoded GroupInfo, opaque to storage.
    pub group_info: Bytes,
}

/// A Welcome waiting for its recipient.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingWelcome {
    /// Identifier to acknowledge delivery with
    /// [`Store::delete_welcomes_through`]; every recipient of one stored
    /// Welcome sees the same id.
    pub welcome_id: WelcomeId,
    /// The room the Welcome joins.
    pub room_id: RoomId,
    /// The encoded Welcome, opaque to storage.
    pub welcome: Bytes,
}

/// A Welcome stored by [`Store::put_welcomes`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredWelcome {
    /// Its id (`None` when no recipient had room for it: nothing stored).
    pub welcome_id: Option<WelcomeId>,
    /// Recipients it was not stored for: they already had
    /// [`WELCOMES_PER_RECIPIENT_MAX`] pending Welcomes.
    pub full: Vec<UserId>,
}

/// How much the pending Welcomes take.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WelcomeCounts {
    /// Welcomes stored (each once, whatever its number of recipients).
    pub welcomes: u64,
    /// (recipient, Welcome) pairs pending.
    pub pending: u64,
}

/// Small per-room record kept beside the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoomMetadata {
    /// User who created the room.
    pub creator_user_id: UserId,
    /// Creation time, milliseconds since the Unix epoch (server clock).
    pub created_at_ms: u64,
    /// The server's MLS public group state, opaque to storage.
    pub mls_snapshot: Bytes,
    /// Log position the snapshot was taken at: it reflects exactly the
    /// entries with indices below this one. It may not exceed the room's
    /// stored next log index, so a snapshot never runs ahead of the log.
    pub mls_snapshot_log_index: LogIndex,
}

/// Which side is at fault for an error: the caller, the storage medium, or
/// this code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request broke a documented precondition (a caller bug or a
    /// client exceeding a limit); nothing was written.
    CallerMisuse,
    /// The storage medium failed (I/O, corruption, database closed).
    Storage,
    /// An internal invariant does not hold: a bug in the storage layer.
    Internal,
}

/// The storage medium failed. For a failed durable commit the outcome is
/// unknown (redb applies a transaction atomically, but a failed commit may
/// still have become durable): nothing must be acknowledged, and state must
/// be reloaded from storage after reopening it.
#[derive(Clone, Debug, thiserror::Error)]
#[error("storage failure in {operation}: {cause}")]
pub struct StorageFailure {
    /// The store operation that failed.
    pub operation: &'static str,
    /// The underlying error.
    pub cause: Arc<dyn std::error::Error + Send + Sync>,
}

impl StorageFailure {
    /// Wraps an underlying error raised during `operation`.
    pub fn new(operation: &'static str, cause: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self { operation, cause: Arc::new(cause) }
    }
}

/// An internal invariant of the storage layer does not hold (a bug, or data
/// altered behind the store's back).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("storage invariant violated: {0}")]
pub struct InvariantViolation(pub String);

/// Error of [`Store::append_batch`].
#[derive(Clone, Debug, thiserror::Error)]
pub enum AppendError {
    /// An entry does not continue its room's log densely: indices must start
    /// at the stored head and increase by one. Nothing was written.
    #[error("room {room_id}: log index {found_log_index} where {expected_log_index} was expected")]
    IndexNotDense {
        /// The room.
        room_id: RoomId,
        /// The index the entry should have had.
        expected_log_index: LogIndex,
        /// The index it had.
        found_log_index: LogIndex,
    },
    /// The room's log is full (its index space is exhausted). Nothing was
    /// written.
    #[error("room {room_id}: log index space exhausted")]
    IndexOverflow {
        /// The room.
        room_id: RoomId,
    },
    /// An entry's frame exceeds [`LOG_ENTRY_BYTES_MAX`]. Nothing was written.
    #[error("room {room_id} index {log_index}: frame of {frame_bytes} bytes exceeds {frame_bytes_max}")]
    EntryTooLarge {
        /// The room.
        room_id: RoomId,
        /// The entry's index.
        log_index: LogIndex,
        /// The frame's size.
        frame_bytes: usize,
        /// The limit.
        frame_bytes_max: usize,
    },
    /// The storage medium failed.
    #[error(transparent)]
    Storage(#[from] StorageFailure),
    /// An internal invariant does not hold.
    #[error(transparent)]
    Internal(#[from] InvariantViolation),
}

impl AppendError {
    /// Who is at fault.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::IndexNotDense { .. } | Self::IndexOverflow { .. } | Self::EntryTooLarge { .. } => {
                ErrorKind::CallerMisuse
            }
            Self::Storage(_) => ErrorKind::Storage,
            Self::Internal(_) => ErrorKind::Internal,
        }
    }

    /// The room whose entries caused a caller-misuse error, if any. The rest
    /// of the batch was valid as far as checked.
    pub fn offending_room(&self) -> Option<RoomId> {
        match self {
            Self::IndexNotDense { room_id, .. }
            | Self::IndexOverflow { room_id }
            | Self::EntryTooLarge { room_id, .. } => Some(*room_id),
            Self::Storage(_) | Self::Internal(_) => None,
        }
    }
}

/// Error of the read operations ([`Store::read_range`],
/// [`Store::next_log_index`], [`Store::room_heads`]).
#[derive(Clone, Debug, thiserror::Error)]
pub enum ReadError {
    /// The storage medium failed.
    #[error(transparent)]
    Storage(#[from] StorageFailure),
    /// An internal invariant does not hold (for example a gap in a log).
    #[error(transparent)]
    Internal(#[from] InvariantViolation),
}

impl ReadError {
    /// Who is at fault.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Storage(_) => ErrorKind::Storage,
            Self::Internal(_) => ErrorKind::Internal,
        }
    }
}

/// Error of [`Store::redact`]. On any error nothing was erased.
#[derive(Clone, Debug, thiserror::Error)]
pub enum RedactError {
    /// The room has no log.
    #[error("room {room_id} does not exist")]
    UnknownRoom {
        /// The room.
        room_id: RoomId,
    },
    /// The index is not in the room's log (yet).
    #[error("room {room_id}: log index {log_index} is beyond the head {next_log_index}")]
    IndexOutOfRange {
        /// The room.
        room_id: RoomId,
        /// The index asked for.
        log_index: LogIndex,
        /// The room's next log index.
        next_log_index: LogIndex,
    },
    /// More indices than [`REDACT_ENTRIES_PER_CALL_MAX`] in one call.
    #[error("{count} entries in one redaction exceed {max}")]
    TooMany {
        /// Indices in the call.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// The storage medium failed.
    #[error(transparent)]
    Storage(#[from] StorageFailure),
    /// An internal invariant does not hold (a sealed record without its key,
    /// a record that does not decode).
    #[error(transparent)]
    Internal(#[from] InvariantViolation),
}

impl RedactError {
    /// Who is at fault.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::UnknownRoom { .. } | Self::IndexOutOfRange { .. } | Self::TooMany { .. } => {
                ErrorKind::CallerMisuse
            }
            Self::Storage(_) => ErrorKind::Storage,
            Self::Internal(_) => ErrorKind::Internal,
        }
    }
}

/// Error of the retention operations.
#[derive(Clone, Debug, thiserror::Error)]
pub enum RetentionError {
    /// The room has no log.
    #[error("room {room_id} does not exist")]
    UnknownRoom {
        /// The room.
        room_id: RoomId,
    },
    /// The period is shorter than [`RETENTION_MS_MIN`].
    #[error("retention of {retention_ms} ms is below the minimum {retention_ms_min} ms")]
    PeriodTooShort {
        /// The period asked for.
        retention_ms: u64,
        /// The limit.
        retention_ms_min: u64,
    },
    /// The sweep position is beyond the room's log or moves backwards.
    #[error("room {room_id}: sweep position {swept_next_log_index} is invalid (stored {stored}, head {next_log_index})")]
    SweepPosition {
        /// The room.
        room_id: RoomId,
        /// The position asked for.
        swept_next_log_index: LogIndex,
        /// The stored position.
        stored: LogIndex,
        /// The room's next log index.
        next_log_index: LogIndex,
    },
    /// The storage medium failed.
    #[error(transparent)]
    Storage(#[from] StorageFailure),
    /// An internal invariant does not hold.
    #[error(transparent)]
    Internal(#[from] InvariantViolation),
}

impl RetentionError {
    /// Who is at fault.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::UnknownRoom { .. } | Self::PeriodTooShort { .. } | Self::SweepPosition { .. } => {
                ErrorKind::CallerMisuse
            }
            Self::Storage(_) => ErrorKind::Storage,
            Self::Internal(_) => ErrorKind::Internal,
        }
    }
}

/// Error of the key-package directory operations.
#[derive(Clone, Debug, thiserror::Error)]
pub enum KeyPackageError {
    /// Storing the upload would leave the user with more than
    /// [`KEY_PACKAGES_PER_USER_MAX`] ordinary packages. Nothing was written.
    #[error("user {user_id}: {stored} stored + {added} new key packages exceed {max}")]
    TooMany {
        /// The user.
        user_id: UserId,
        /// Ordinary packages already stored (0 when the upload alone exceeds
        /// the limit and the store was not consulted).
        stored: usize,
        /// Packages in the upload that are not stored yet.
        added: usize,
        /// The limit.
        max: usize,
    },
    /// A key package exceeds [`KEY_PACKAGE_BYTES_MAX`]. Nothing was written.
    #[error("key package of {bytes} bytes exceeds {bytes_max}")]
    PackageTooLarge {
        /// The package's size.
        bytes: usize,
        /// The limit.
        bytes_max: usize,
    },
    /// A reference is empty or longer than [`KEY_PACKAGE_REF_BYTES_MAX`].
    /// Nothing was written.
    #[error("key package reference of {bytes} bytes (must be 1 to {bytes_max})")]
    RefLength {
        /// The reference's size.
        bytes: usize,
        /// The limit.
        bytes_max: usize,
    },
    /// The same reference appears twice in one upload. Nothing was written.
    #[error("key package reference repeated within one upload")]
    DuplicateRef,
    /// The storage medium failed.
    #[error(transparent)]
    Storage(#[from] StorageFailure),
    /// An internal invariant does not hold.
    #[error(transparent)]
    Internal(#[from] InvariantViolation),
}

impl KeyPackageError {
    /// Who is at fault.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::TooMany { .. }
            | Self::PackageTooLarge { .. }
            | Self::RefLength { .. }
            | Self::DuplicateRef => ErrorKind::CallerMisuse,
            Self::Storage(_) => ErrorKind::Storage,
            Self::Internal(_) => ErrorKind::Internal,
        }
    }
}

/// Error of the GroupInfo operations.
#[derive(Clone, Debug, thiserror::Error)]
pub enum GroupInfoError {
    /// The GroupInfo exceeds [`GROUP_INFO_BYTES_MAX`]. Nothing was written.
    #[error("GroupInfo of {bytes} bytes exceeds {bytes_max}")]
    TooLarge {
        /// Its size.
        bytes: usize,
        /// The limit.
        bytes_max: usize,
    },
    /// The storage medium failed.
    #[error(transparent)]
    Storage(#[from] StorageFailure),
    /// An internal invariant does not hold.
    #[error(transparent)]
    Internal(#[from] InvariantViolation),
}

impl GroupInfoError {
    /// Who is at fault.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::TooLarge { .. } => ErrorKind::CallerMisuse,
            Self::Storage(_) => ErrorKind::Storage,
            Self::Internal(_) => ErrorKind::Internal,
        }
    }
}

/// Error of the pending-Welcome operations.
#[derive(Clone, Debug, thiserror::Error)]
pub enum WelcomeError {
    /// The recipient already has [`WELCOMES_PER_RECIPIENT_MAX`] pending
    /// Welcomes. Nothing was written.
    #[error("user {recipient_user_id} already has {max} pending Welcomes")]
    TooMany {
        /// The recipient.
        recipient_user_id: UserId,
        /// The limit.
        max: usize,
    },
    /// The Welcome exceeds [`WELCOME_BYTES_MAX`]. Nothing was written.
    #[error("Welcome of {bytes} bytes exceeds {bytes_max}")]
    TooLarge {
        /// Its size.
        bytes: usize,
        /// The limit.
        bytes_max: usize,
    },
    /// The storage medium failed.
    #[error(transparent)]
    Storage(#[from] StorageFailure),
    /// An internal invariant does not hold.
    #[error(transparent)]
    Internal(#[from] InvariantViolation),
}

impl WelcomeError {
    /// Who is at fault.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::TooMany { .. } | Self::TooLarge { .. } => ErrorKind::CallerMisuse,
            Self::Storage(_) => ErrorKind::Storage,
            Self::Internal(_) => ErrorKind::Internal,
        }
    }
}

/// Error of the records of other domains' users and rooms.
#[derive(Clone, Debug, thiserror::Error)]
pub enum RemoteRecordError {
    /// [`REMOTE_USERS_MAX`] users or [`REMOTE_ROOMS_MAX`] rooms are
    /// recorded already. Nothing was written.
    #[error("{max} remote {what} are recorded already")]
    Full {
        /// `users` or `rooms`.
        what: &'static str,
        /// The limit.
        max: usize,
    },
    /// The storage medium failed.
    #[error(transparent)]
    Storage(#[from] StorageFailure),
    /// An internal invariant does not hold (a stored domain that does not
    /// parse, a room recorded under another authority).
    #[error(transparent)]
    Internal(#[from] InvariantViolation),
}

impl RemoteRecordError {
    /// Who is at fault.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Full { .. } => ErrorKind::CallerMisuse,
            Self::Storage(_) => ErrorKind::Storage,
            Self::Internal(_) => ErrorKind::Internal,
        }
    }
}

/// A stored domain name, parsed again.
pub(crate) fn stored_domain(stored: &str) -> Result<DomainName, InvariantViolation> {
    DomainName::parse(stored)
        .map_err(|error| InvariantViolation(format!("stored domain {stored:?}: {error}")))
}

/// Error of the room-metadata operations.
#[derive(Clone, Debug, thiserror::Error)]
pub enum RoomMetadataError {
    /// The MLS snapshot exceeds [`MLS_SNAPSHOT_BYTES_MAX`]. Nothing was
    /// written.
    #[error("MLS snapshot of {bytes} bytes exceeds {bytes_max}")]
    SnapshotTooLarge {
        /// Its size.
        bytes: usize,
        /// The limit.
        bytes_max: usize,
    },
    /// The snapshot claims to reflect log entries that are not stored yet.
    /// Nothing was written.
    #[error("room {room_id}: snapshot at log index {snapshot_log_index} is ahead of the log (next index {next_log_index})")]
    SnapshotAheadOfLog {
        /// The room.
        room_id: RoomId,
        /// The snapshot's log index.
        snapshot_log_index: LogIndex,
        /// The room's stored next log index.
        next_log_index: LogIndex,
    },
    /// The storage medium failed.
    #[error(transparent)]
    Storage(#[from] StorageFailure),
    /// An internal invariant does not hold.
    #[error(transparent)]
    Internal(#[from] InvariantViolation),
}

impl RoomMetadataError {
    /// Who is at fault.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::SnapshotTooLarge { .. } | Self::SnapshotAheadOfLog { .. } => ErrorKind::CallerMisuse,
            Self::Storage(_) => ErrorKind::Storage,
            Self::Internal(_) => ErrorKind::Internal,
        }
    }
}

/// A change to a room's moderation state, stored in the same transaction
/// as its audit record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModerationChange {
    /// No state changes (a kick): only the audit record is appended.
    None,
    /// `user` holds `role` in the room from now on (`None`: no role).
    SetRole {
        /// The room.
        room_id: RoomId,
        /// The user.
        user_id: UserId,
        /// The role, or `None` to revoke.
        role: Option<Role>,
    },
    /// `user` is banned from the room (`Some`) or no longer (`None`).
    SetBan {
        /// The room.
        room_id: RoomId,
        /// The user.
        user_id: UserId,
        /// The ban, or `None` to lift it.
        ban: Option<StoredBan>,
    },
}

/// A stored ban.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoredBan {
    /// When it ends, ms since the Unix epoch; `None`: until lifted.
    pub until_ms: Option<u64>,
}

/// A room's stored roles and bans.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoomModeration {
    /// Users with a granted role, by user id.
    pub roles: Vec<(UserId, Role)>,
    /// Banned users, by user id.
    pub bans: Vec<(UserId, StoredBan)>,
}

/// Error of the moderation and audit operations.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ModerationStoreError {
    /// Limit: the room has [`ROLES_PER_ROOM_MAX`](crate::room::roles::ROLES_PER_ROOM_MAX)
    /// roles or [`BANS_PER_ROOM_MAX`](crate::room::sequencer::BANS_PER_ROOM_MAX)
    /// bans. Nothing was written.
    #[error("room {room_id}: too many {what}")]
    TooMany {
        /// The room.
        room_id: RoomId,
        /// "roles" or "bans".
        what: &'static str,
    },
    /// The storage medium failed.
    #[error(transparent)]
    Storage(#[from] StorageFailure),
    /// An internal invariant does not hold (an undecodable stored record).
    #[error(transparent)]
    Internal(#[from] InvariantViolation),
}

impl ModerationStoreError {
    /// Who is at fault.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::TooMany { .. } => ErrorKind::CallerMisuse,
            Self::Storage(_) => ErrorKind::Storage,
            Self::Internal(_) => ErrorKind::Internal,
        }
    }
}

/// Seals `event` after `head` (the chain's current end): the record and its hash.
pub(crate) fn seal_audit(
    head: Option<AuditHead>,
    event: &AuditEvent,
) -> Result<(AuditRecord, Vec<u8>, AuditHead), InvariantViolation> {
    let (seq, prev_hash) = match head {
        Some(head) => (
            head.seq.checked_add(1).ok_or_else(|| InvariantViolation("audit sequence exhausted".into()))?,
            head.hash,
        ),
        None => (0, GENESIS_HASH),
    };
    let record = AuditRecord::seal(event, seq, &prev_hash);
    let encoded = record.encode().map_err(|error| InvariantViolation(error.to_string()))?;
    let hash: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(&encoded).into();
    Ok((record, encoded, AuditHead { seq, hash }))
}

/// Key of a (room, user) moderation entry: room id, then user id big-endian.
pub(crate) fn moderation_key(room_id: RoomId, user_id: UserId) -> [u8; 24] {
    let mut key = [0u8; 24];
    key[..16].copy_from_slice(&room_id.0);
    key[16..].copy_from_slice(&user_id.to_be_bytes());
    key
}

/// The server's durable state. All writes are durable when the call returns
/// `Ok`; a call that returns a caller-misuse error wrote nothing.
///
/// Calls block (on disk I/O and on the single writer lock); call them from a
/// dedicated thread or `spawn_blocking`, or append through
/// [`GroupCommit`].
pub trait Store: Send + Sync + 'static {
    /// Appends `entries` (from any number of rooms) in one durable
    /// transaction. For each room, the entries' indices must continue the
    /// stored log densely (first = stored next index, then +1 each, in slice
    /// order); otherwise nothing is written. An empty slice is a no-op.
    fn append_batch(&self, entries: &[LogEntry]) -> Result<(), AppendError>;

    /// Reads up to `count_max` entries of `room_id`'s log starting at
    /// `from_log_index`, capped at [`READ_RANGE_ENTRIES_MAX`] entries and
    /// [`READ_RANGE_BYTES_MAX`] bytes (at least one entry is returned if any
    /// exists). Returns fewer (possibly none) at the end of the log. An
    /// erased entry is returned as [`EntryContent::Erased`], in its place.
    fn read_range(
        &self,
        room_id: RoomId,
        from_log_index: LogIndex,
        count_max: usize,
    ) -> Result<Vec<StoredEntry>, ReadError>;

    /// Erases the content of `room_id`'s entries at `log_indices` in one
    /// durable transaction: destroys each entry's data key and replaces its
    /// sealed record by a tombstone holding the clear routing prefix and
    /// `redaction`. Returns one outcome per index, in order. Refused as a
    /// whole (nothing erased) for an unknown room, an index beyond the head
    /// or more than [`REDACT_ENTRIES_PER_CALL_MAX`] indices. Which entries
    /// may be erased is the caller's policy: the store erases any.
    ///
    /// The freed pages may still hold the key until the file is compacted
    /// ([`RedbStore::compact_file`]).
    fn redact(
        &self,
        room_id: RoomId,
        log_indices: &[LogIndex],
        redaction: &Redaction,
    ) -> Result<Vec<RedactOutcome>, RedactError>;

    /// [`Store::redact`] with an audit record: when this call erases at
    /// least one entry, `event` is appended to the audit log, chained to the
    /// current head, in the same durable transaction, and returned. A call
    /// that erases nothing (every entry already erased) appends nothing.
    fn redact_audited(
        &self,
        room_id: RoomId,
        log_indices: &[LogIndex],
        redaction: &Redaction,
        event: &AuditEvent,
    ) -> Result<(Vec<RedactOutcome>, Option<AuditRecord>), RedactError>;

    /// The erasures of `room_id` journaled after position `after_seq`, in
    /// order, at most `count_max` capped at [`ERASURES_PAGE_MAX`]. Every
    /// call of [`Store::redact`] (or its variants) that erases something
    /// appends one record to the room's journal, in the same transaction.
    fn erasures_after(
        &self,
        room_id: RoomId,
        after_seq: u64,
        count_max: usize,
    ) -> Result<Vec<JournaledErasure>, ReadError>;

    /// How far this server's replica of `room_id` has applied the erasure
    /// journal of the room's authority (0: nothing yet).
    fn replica_erasure_cursor(&self, room_id: RoomId) -> Result<u64, ReadError>;

    /// [`Store::redact`] of a replica applying its authority's journal
    /// record `cursor`: also moves the replica's erasure cursor there, in
    /// the same durable transaction (even when every entry was erased
    /// already), if it is the record right after the cursor; otherwise the
    /// cursor stays (records are applied in journal order, so that the
    /// cursor never passes one that was not).
    fn redact_replicated(
        &self,
        room_id: RoomId,
        log_indices: &[LogIndex],
        redaction: &Redaction,
        cursor: u64,
    ) -> Result<Vec<RedactOutcome>, RedactError>;

    /// The data key of an entry, `None` once erased (or if absent). Meant
    /// for verifying erasure (tests, audits); the server never needs it.
    fn data_key(&self, room_id: RoomId, log_index: LogIndex) -> Result<Option<DataKey>, ReadError>;

    /// Sets (`Some`) or removes (`None`) the room's retention period. The
    /// sweep position is kept when a period is replaced.
    fn set_retention(&self, room_id: RoomId, retention_ms: Option<u64>) -> Result<(), RetentionError>;

    /// [`Store::set_retention`] with an audit record: `event` is appended
    /// to the audit log in the same durable transaction and returned. A
    /// refused change appends nothing.
    fn set_retention_audited(
        &self,
        room_id: RoomId,
        retention_ms: Option<u64>,
        event: &AuditEvent,
    ) -> Result<AuditRecord, RetentionError>;

    /// The room's retention setting, if it has one.
    fn retention(&self, room_id: RoomId) -> Result<Option<RoomRetention>, RetentionError>;

    /// Rooms with a retention period, in room-id order after `after`, at
    /// most `count_max` capped at [`RETENTION_ROOMS_PAGE_MAX`].
    fn retention_rooms(
        &self,
        after: Option<RoomId>,
        count_max: usize,
    ) -> Result<Vec<RoomRetention>, RetentionError>;

    /// Records that the room's entries below `swept_next_log_index` have
    /// been swept. The position never moves backwards or past the head.
    fn advance_retention(
        &self,
        room_id: RoomId,
        swept_next_log_index: LogIndex,
    ) -> Result<(), RetentionError>;

    /// The index the room's next entry will get (0 for an unknown room).
    fn next_log_index(&self, room_id: RoomId) -> Result<LogIndex, ReadError>;

    /// Rooms that have a log, in room-id order, starting after `after` (from
    /// the first room when `None`), at most `count_max` capped at
    /// [`ROOM_HEADS_PAGE_MAX`]. Page through all rooms on startup by passing
    /// the last room returned until a page comes back empty.
    fn room_heads(&self, after: Option<RoomId>, count_max: usize) -> Result<Vec<RoomHead>, ReadError>;

    /// Adds ordinary key packages to `user_id`'s directory and, when
    /// `last_resort` is `Some`, replaces the user's last-resort package; one
    /// durable transaction. A reference already stored is replaced.
    fn put_key_packages(
        &self,
        user_id: UserId,
        packages: &[KeyPackageUpload],
        last_resort: Option<Bytes>,
    ) -> Result<(), KeyPackageError>;

    /// Hands out one of `user_id`'s ordinary key packages, deleting it in the
    /// same durable transaction so it is never handed out twice; when none is
    /// left, returns the last-resort package (which stays stored); `None`
    /// when the user has neither.
    fn claim_key_package(&self, user_id: UserId) -> Result<Option<ClaimedKeyPackage>, KeyPackageError>;

    /// Records durably, in one transaction, that each (user, package
    /// reference) of `claims` was handed out at `now_ms`, to a local client
    /// or a peer domain (a Welcome a peer sends for the user must name such
    /// a package, and the user is known as this domain's). A
    /// user's records older than [`HANDED_OUT_CLAIM_RECORD_MS`] are dropped, then
    /// the oldest while it has [`HANDED_OUT_CLAIMS_PER_USER_MAX`]. A reference of
    /// the wrong length writes nothing.
    fn record_handed_out_claims(
        &self,
        claims: &[(UserId, Vec<u8>)],
        now_ms: u64,
    ) -> Result<(), KeyPackageError>;

    /// The packages of `user_id` recorded as handed out (at most
    /// [`HANDED_OUT_CLAIMS_PER_USER_MAX`]), in reference order.
    fn handed_out_claims(&self, user_id: UserId) -> Result<Vec<HandedOutClaim>, KeyPackageError>;

    /// How many packages `user_id` has.
    fn count_key_packages(&self, user_id: UserId) -> Result<KeyPackageCount, KeyPackageError>;

    /// Stores (replacing any previous one) the room's current GroupInfo. The
    /// epoch is not required to increase: rolling a voided commit back
    /// restores an earlier GroupInfo.
    fn put_group_info(&self, room_id: RoomId, record: &GroupInfoRecord) -> Result<(), GroupInfoError>;

    /// The room's current GroupInfo, if any.
    fn group_info(&self, room_id: RoomId) -> Result<Option<GroupInfoRecord>, GroupInfoError>;

    /// Queues a Welcome to `room_id` for `recipient_user_id`, durably, and
    /// returns its id; `TooMany` when the recipient's queue is full.
    fn put_welcome(
        &self,
        recipient_user_id: UserId,
        room_id: RoomId,
        welcome: Bytes,
    ) -> Result<WelcomeId, WelcomeError> {
        match self.put_welcomes(room_id, &[recipient_user_id], welcome)? {
            StoredWelcome { welcome_id: Some(welcome_id), .. } => Ok(welcome_id),
            StoredWelcome { .. } => {
                Err(WelcomeError::TooMany { recipient_user_id, max: WELCOMES_PER_RECIPIENT_MAX })
            }
        }
    }

    /// Stores a Welcome to `room_id` once, for every one of
    /// `recipient_user_ids` (a repeated id counts once), in one durable
    /// transaction: one copy of the bytes and one small index row per
    /// recipient. A recipient whose queue is full
    /// ([`WELCOMES_PER_RECIPIENT_MAX`]) is left out and reported; the others
    /// get it. The bytes go once the last recipient's row is deleted.
    fn put_welcomes(
        &self,
        room_id: RoomId,
        recipient_user_ids: &[UserId],
        welcome: Bytes,
    ) -> Result<StoredWelcome, WelcomeError>;

    /// One page of the Welcomes pending for `recipient_user_id` with an id
    /// above `after` (all when `None`), oldest first: at most
    /// [`WELCOMES_PAGE_ENTRIES_MAX`], within [`WELCOMES_PAGE_BYTES_MAX`]
    /// (the first always). Nothing is removed: after the recipient has them,
    /// call [`Store::delete_welcomes_through`] or
    /// [`Store::delete_welcomes_for_room`]. A crash between the two
    /// redelivers them (at-least-once), never loses one; clients ignore a
    /// Welcome for a group they already joined.
    fn pending_welcomes(
        &self,
        recipient_user_id: UserId,
        after: Option<WelcomeId>,
    ) -> Result<Vec<PendingWelcome>, WelcomeError>;

    /// Removes `recipient_user_id`'s pending Welcomes to `room_id` (the
    /// recipient reads the room: it has used them), reading no Welcome's
    /// bytes. Returns how many were removed.
    fn delete_welcomes_for_room(
        &self,
        recipient_user_id: UserId,
        room_id: RoomId,
    ) -> Result<usize, WelcomeError>;

    /// How many Welcomes are stored and pending.
    fn welcome_counts(&self) -> Result<WelcomeCounts, WelcomeError>;

    /// Removes the listed pending Welcomes of `recipient_user_id` (those the
    /// recipient has shown it used); ids that are not pending are skipped.
    /// Returns how many were removed.
    fn delete_welcomes(
        &self,
        recipient_user_id: UserId,
        welcome_ids: &[WelcomeId],
    ) -> Result<usize, WelcomeError>;

    /// Removes `recipient_user_id`'s pending Welcomes with ids up to and
    /// including `through_welcome_id` (delivered ones); Welcomes stored
    /// after the listing have larger ids and stay. Returns how many were
    /// removed.
    fn delete_welcomes_through(
        &self,
        recipient_user_id: UserId,
        through_welcome_id: WelcomeId,
    ) -> Result<usize, WelcomeError>;

    /// Stores (replacing any previous one) the room's metadata. Refused when
    /// the snapshot's log index is beyond the room's stored log.
    fn put_room_metadata(&self, room_id: RoomId, metadata: &RoomMetadata) -> Result<(), RoomMetadataError>;

    /// The room's metadata, if any.
    fn room_metadata(&self, room_id: RoomId) -> Result<Option<RoomMetadata>, RoomMetadataError>;

    /// Records, durably, that `user_id` is a user of the other domain
    /// `home` (replacing an earlier record). `Full` when
    /// [`REMOTE_USERS_MAX`] other users are recorded.
    fn record_remote_user(&self, user_id: UserId, home: &DomainName) -> Result<(), RemoteRecordError>;

    /// The home domain recorded for `user_id`, if it is another domain's user.
    fn remote_user_home(&self, user_id: UserId) -> Result<Option<DomainName>, RemoteRecordError>;

    /// The recorded remote users with an id above `after` (all when
    /// `None`), in id order, at most `count_max` (capped at
    /// [`REMOTE_USERS_PAGE_MAX`]).
    fn remote_users(
        &self,
        after: Option<UserId>,
        count_max: usize,
    ) -> Result<Vec<(UserId, DomainName)>, RemoteRecordError>;

    /// Records, durably, that `room_id` is ordered by the other domain
    /// `authority` (again, if it is already). A room recorded under another
    /// authority is an `Internal` error and stays as it was; `Full` when
    /// [`REMOTE_ROOMS_MAX`] rooms are recorded.
    fn record_remote_room(&self, room_id: RoomId, authority: &DomainName) -> Result<(), RemoteRecordError>;

    /// Every recorded remote room with its authority, in room id order (at
    /// most [`REMOTE_ROOMS_MAX`]).
    fn remote_rooms(&self) -> Result<Vec<(RoomId, DomainName)>, RemoteRecordError>;

    /// Applies `change` and appends `event` to the audit log, chained to the
    /// current head, in one durable transaction; returns the sealed record.
    fn record_moderation(
        &self,
        change: &ModerationChange,
        event: &AuditEvent,
    ) -> Result<AuditRecord, ModerationStoreError>;

    /// The room's granted roles and bans.
    fn room_moderation(&self, room_id: RoomId) -> Result<RoomModeration, ModerationStoreError>;

    /// Stored audit records (their exact bytes) from key `from_seq`, at most
    /// `count_max` (capped at [`AUDIT_PAGE_RECORDS_MAX`](crate::room::audit::AUDIT_PAGE_RECORDS_MAX)), in key order.
    fn audit_records(
        &self,
        from_seq: u64,
        count_max: usize,
    ) -> Result<Vec<(u64, Bytes)>, ModerationStoreError>;

    /// The audit log's head: the last record's sequence number and hash.
    fn audit_head(&self) -> Result<Option<AuditHead>, ModerationStoreError>;

    /// Writes a consistent copy of the whole store, as of one moment that
    /// follows every completed write, into `file` (empty, opened for
    /// reading and writing), durably. Writers are not blocked meanwhile.
    /// Stores that are not a database file answer
    /// [`BackupError::Unsupported`]; see [`backup`].
    fn write_snapshot(&self, file: std::fs::File) -> Result<backup::SnapshotCopy, backup::BackupError> {
        drop(file);
        Err(backup::BackupError::Unsupported)
    }
}

/// Checks a batch against the stored heads before anything is written and
/// returns each touched room's new next index. `stored_head` is asked once
/// per room.
pub(crate) fn validate_batch<E>(
    entries: &[LogEntry],
    mut stored_head: impl FnMut(RoomId) -> Result<LogIndex, E>,
) -> Result<HashMap<RoomId, LogIndex>, AppendError>
where
    AppendError: From<E>,
{
    let mut next_by_room: HashMap<RoomId, LogIndex> = HashMap::new();
    for entry in entries {
        if entry.frame.len() > LOG_ENTRY_BYTES_MAX {
            return Err(AppendError::EntryTooLarge {
                room_id: entry.room_id,
                log_index: entry.log_index,
                frame_bytes: entry.frame.len(),
                frame_bytes_max: LOG_ENTRY_BYTES_MAX,
            });
        }
        let expected = match next_by_room.get(&entry.room_id) {
            Some(next) => *next,
            None => stored_head(entry.room_id)?,
        };
        if entry.log_index != expected {
            return Err(AppendError::IndexNotDense {
                room_id: entry.room_id,
                expected_log_index: expected,
                found_log_index: entry.log_index,
            });
        }
        let next = expected.checked_add(1).ok_or(AppendError::IndexOverflow { room_id: entry.room_id })?;
        next_by_room.insert(entry.room_id, next);
    }
    Ok(next_by_room)
}

/// Checks that a range read returned dense indices from `from_log_index`.
pub(crate) fn check_read_dense(
    room_id: RoomId,
    from_log_index: LogIndex,
    entries: &[StoredEntry],
) -> Result<(), InvariantViolation> {
    let mut expected = from_log_index;
    for entry in entries {
        if entry.room_id != room_id || entry.log_index != expected {
            return Err(InvariantViolation(format!(
                "read of room {room_id} from {from_log_index}: got room {} index {} where index {expected} was expected",
                entry.room_id, entry.log_index
            )));
        }
        expected = expected.saturating_add(1);
    }
    Ok(())
}

/// The number of entries a range read may return for `count_max`.
pub(crate) fn read_count_cap(count_max: usize) -> usize {
    count_max.min(READ_RANGE_ENTRIES_MAX)
}

/// Whether a range read that has gathered `bytes_so_far` (in `entries_so_far`
/// entries) may add an entry of `entry_bytes`.
pub(crate) fn read_bytes_allow(entries_so_far: usize, bytes_so_far: usize, entry_bytes: usize) -> bool {
    entries_so_far == 0 || bytes_so_far.saturating_add(entry_bytes) <= READ_RANGE_BYTES_MAX
}

/// Whether a pending-Welcome page with `entries_so_far` Welcomes of
/// `bytes_so_far` bytes takes one more of `entry_bytes`.
pub(crate) fn welcome_page_allows(entries_so_far: usize, bytes_so_far: usize, entry_bytes: usize) -> bool {
    entries_so_far == 0
        || (entries_so_far < WELCOMES_PAGE_ENTRIES_MAX
            && bytes_so_far.saturating_add(entry_bytes) <= WELCOMES_PAGE_BYTES_MAX)
}

/// Recipients of one Welcome, each once, in the order first named.
pub(crate) fn distinct_recipients(recipient_user_ids: &[UserId]) -> Vec<UserId> {
    let mut seen = std::collections::HashSet::with_capacity(recipient_user_ids.len());
    recipient_user_ids.iter().copied().filter(|id| seen.insert(*id)).collect()
}

/// Checks a redaction request against the room's head before anything is
/// written.
pub(crate) fn validate_redaction(
    room_id: RoomId,
    log_indices: &[LogIndex],
    next_log_index: LogIndex,
) -> Result<(), RedactError> {
    if log_indices.len() > REDACT_ENTRIES_PER_CALL_MAX {
        return Err(RedactError::TooMany { count: log_indices.len(), max: REDACT_ENTRIES_PER_CALL_MAX });
    }
    if next_log_index == 0 {
        return Err(RedactError::UnknownRoom { room_id });
    }
    if let Some(&log_index) = log_indices.iter().find(|&&index| index >= next_log_index) {
        return Err(RedactError::IndexOutOfRange { room_id, log_index, next_log_index });
    }
    Ok(())
}

/// The indices a redaction erased (not those erased already), in the
/// order asked: what the room's erasure journal records of it.
pub(crate) fn erased_indices(log_indices: &[LogIndex], outcomes: &[RedactOutcome]) -> Vec<LogIndex> {
    log_indices
        .iter()
        .zip(outcomes)
        .filter(|(_, outcome)| **outcome == RedactOutcome::Erased)
        .map(|(log_index, _)| *log_index)
        .collect()
}

/// Checks a retention period.
pub(crate) fn validate_retention_period(retention_ms: u64) -> Result<(), RetentionError> {
    if retention_ms < RETENTION_MS_MIN {
        return Err(RetentionError::PeriodTooShort { retention_ms, retention_ms_min: RETENTION_MS_MIN });
    }
    Ok(())
}

/// Checks a new sweep position against the stored one and the head.
pub(crate) fn validate_sweep_position(
    room_id: RoomId,
    swept_next_log_index: LogIndex,
    stored: LogIndex,
    next_log_index: LogIndex,
) -> Result<(), RetentionError> {
    if swept_next_log_index < stored || swept_next_log_index > next_log_index {
        return Err(RetentionError::SweepPosition { room_id, swept_next_log_index, stored, next_log_index });
    }
    Ok(())
}

/// Checks a key-package reference's length.
pub(crate) fn validate_key_package_ref(key_package_ref: &[u8]) -> Result<(), KeyPackageError> {
    let bytes = key_package_ref.len();
    if bytes == 0 || bytes > KEY_PACKAGE_REF_BYTES_MAX {
        return Err(KeyPackageError::RefLength { bytes, bytes_max: KEY_PACKAGE_REF_BYTES_MAX });
    }
    Ok(())
}

/// Which of a user's peer-claim records (key, ms claimed) to delete before
/// `new_key` is written at `now_ms`: the expired ones, then the oldest
/// while the rest and the new one would exceed [`HANDED_OUT_CLAIMS_PER_USER_MAX`].
pub(crate) fn handed_out_claims_to_drop(
    records: &[([u8; KEY_PACKAGE_KEY_BYTES], u64)],
    new_key: &[u8; KEY_PACKAGE_KEY_BYTES],
    now_ms: u64,
) -> Vec<[u8; KEY_PACKAGE_KEY_BYTES]> {
    let expired = |claimed_ms: u64| claimed_ms.saturating_add(HANDED_OUT_CLAIM_RECORD_MS) < now_ms;
    let others = records.iter().filter(|(key, _)| key != new_key);
    let (mut dropped, mut kept): (Vec<&(_, u64)>, Vec<&(_, u64)>) =
        others.partition(|(_, claimed_ms)| expired(*claimed_ms));
    kept.sort_by_key(|(key, claimed_ms)| (*claimed_ms, *key));
    let excess = (kept.len() + 1).saturating_sub(HANDED_OUT_CLAIMS_PER_USER_MAX);
    dropped.extend(kept.into_iter().take(excess));
    dropped.into_iter().map(|(key, _)| *key).collect()
}

/// Validates a key-package upload (sizes, reference lengths, duplicates).
pub(crate) fn validate_key_package_upload(
    user_id: UserId,
    packages: &[KeyPackageUpload],
    last_resort: Option<&Bytes>,
) -> Result<(), KeyPackageError> {
    if packages.len() > KEY_PACKAGES_PER_USER_MAX {
        // Checked again against the stored count; this bounds the work below.
        return Err(KeyPackageError::TooMany {
            user_id,
            stored: 0,
            added: packages.len(),
            max: KEY_PACKAGES_PER_USER_MAX,
        });
    }
    for package in packages {
        validate_key_package_ref(&package.key_package_ref)?;
        if package.key_package.len() > KEY_PACKAGE_BYTES_MAX {
            return Err(KeyPackageError::PackageTooLarge {
                bytes: package.key_package.len(),
                bytes_max: KEY_PACKAGE_BYTES_MAX,
            });
        }
    }
    if let Some(last_resort) = last_resort {
        if last_resort.len() > KEY_PACKAGE_BYTES_MAX {
            return Err(KeyPackageError::PackageTooLarge {
                bytes: last_resort.len(),
                bytes_max: KEY_PACKAGE_BYTES_MAX,
            });
        }
    }
    let mut refs: Vec<&[u8]> = packages.iter().map(|p| p.key_package_ref.as_slice()).collect();
    refs.sort_unstable();
    if refs.windows(2).any(|pair| pair[0] == pair[1]) {
        return Err(KeyPackageError::DuplicateRef);
    }
    Ok(())
}

/// Length of an encoded key-package key: user id, reference length, and the
/// reference zero-padded to [`KEY_PACKAGE_REF_BYTES_MAX`].
pub(crate) const KEY_PACKAGE_KEY_BYTES: usize = 8 + 1 + KEY_PACKAGE_REF_BYTES_MAX;

/// Encodes a key-package key. Keys of one user are contiguous and ordered by
/// (reference length, reference); both stores hand packages out in this
/// order. The reference must already be validated.
pub(crate) fn key_package_key(user_id: UserId, key_package_ref: &[u8]) -> [u8; KEY_PACKAGE_KEY_BYTES] {
    let mut key = [0u8; KEY_PACKAGE_KEY_BYTES];
    key[..8].copy_from_slice(&user_id.to_be_bytes());
    // Validated to be at most KEY_PACKAGE_REF_BYTES_MAX (< 255).
    key[8] = u8::try_from(key_package_ref.len()).unwrap_or(u8::MAX);
    key[9..9 + key_package_ref.len()].copy_from_slice(key_package_ref);
    key
}

/// The reference a key-package key holds.
pub(crate) fn key_package_ref_of(key: &[u8; KEY_PACKAGE_KEY_BYTES]) -> Result<Vec<u8>, InvariantViolation> {
    let length = usize::from(key[8]);
    if length == 0 || length > KEY_PACKAGE_REF_BYTES_MAX {
        return Err(InvariantViolation(format!(
            "a stored key-package key holds a reference of {length} bytes"
        )));
    }
    Ok(key[9..9 + length].to_vec())
}

/// The lowest and highest possible key-package keys of a user.
pub(crate) fn key_package_key_bounds(
    user_id: UserId,
) -> ([u8; KEY_PACKAGE_KEY_BYTES], [u8; KEY_PACKAGE_KEY_BYTES]) {
    let mut low = [0u8; KEY_PACKAGE_KEY_BYTES];
    low[..8].copy_from_slice(&user_id.to_be_bytes());
    let mut high = [0xffu8; KEY_PACKAGE_KEY_BYTES];
    high[..8].copy_from_slice(&user_id.to_be_bytes());
    (low, high)
}

/// Checks the size of a Welcome.
pub(crate) fn validate_welcome(welcome: &Bytes) -> Result<(), WelcomeError> {
    if welcome.len() > WELCOME_BYTES_MAX {
        return Err(WelcomeError::TooLarge { bytes: welcome.len(), bytes_max: WELCOME_BYTES_MAX });
    }
    Ok(())
}

/// Checks the size of a GroupInfo.
pub(crate) fn validate_group_info(record: &GroupInfoRecord) -> Result<(), GroupInfoError> {
    if record.group_info.len() > GROUP_INFO_BYTES_MAX {
        return Err(GroupInfoError::TooLarge {
            bytes: record.group_info.len(),
            bytes_max: GROUP_INFO_BYTES_MAX,
        });
    }
    Ok(())
}

/// Checks room metadata against the room's stored next log index.
pub(crate) fn validate_room_metadata(
    room_id: RoomId,
    metadata: &RoomMetadata,
    next_log_index: LogIndex,
) -> Result<(), RoomMetadataError> {
    if metadata.mls_snapshot.len() > MLS_SNAPSHOT_BYTES_MAX {
        return Err(RoomMetadataError::SnapshotTooLarge {
            bytes: metadata.mls_snapshot.len(),
            bytes_max: MLS_SNAPSHOT_BYTES_MAX,
        });
    }
    if metadata.mls_snapshot_log_index > next_log_index {
        return Err(RoomMetadataError::SnapshotAheadOfLog {
            room_id,
            snapshot_log_index: metadata.mls_snapshot_log_index,
            next_log_index,
        });
    }
    Ok(())
}
