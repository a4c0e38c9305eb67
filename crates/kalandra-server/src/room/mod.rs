//! The room core, pure: a [`Shard`] of rooms takes inputs with the current
//! time and returns what to do as data. It never reads a clock, blocks,
//! spawns, or touches a socket or a disk; the tokio node
//! (`node`) and the simulation (`kalandra-harness`) drive it.
//! Nothing here imports tokio.

mod acts;
pub mod audit;
mod connections;
pub(crate) mod frames;
pub mod mls_state;
mod moderation;
mod recent;
mod replica;
mod request;
pub mod roles;
pub mod room_group;
pub mod sequencer;
mod shard;
mod snapshot;
mod void;

pub use self::acts::{
    Completion, ModerationDone, ModerationFailure, ModerationRequest, ModerationWrite, RoomInfo, RoomSummary,
    MODERATION_TICK_MS, MODERATION_WRITES_QUEUED_MAX, ROOMS_LIST_MAX,
};
#[cfg(test)]
pub(crate) use self::frames::erasure_notice;
pub(crate) use self::frames::error_frame_with;
pub use self::frames::{erased_placeholder, error_frame, reply_frame, server_frame};
pub use self::moderation::{moderation_reply, moderation_request};
pub use self::recent::RecentFrames;
pub use self::replica::{HeadCheck, HeadCheckError, ReplicaError};
pub use self::request::{DirectoryRequest, OtherRoute, RoomRequest, Routed};
pub use self::shard::{
    AppendBatch, ConnectionId, HistoryRead, Memberships, Output, Peer, RecoveredRoom, Shard, ShardConfig,
    Standing, WelcomeToStore,
};
pub(crate) use self::snapshot::RoomSnapshot;

/// Every bound of the room core, in one place.
pub mod limits {
    /// Commands a shard's inbox holds before senders wait.
    pub const SHARD_INBOX_COMMANDS_MAX: usize = 8192;
    /// Commands a shard handles before it flushes a batch to storage.
    pub const SHARD_COMMANDS_PER_BATCH_MAX: usize = 1024;
    /// Durable frames a room keeps in memory to hand subscribers over from
    /// history to live without a gap.
    pub const RECENT_FRAMES_PER_ROOM_MAX: usize = 1024;
    /// Bytes of those frames a room keeps at most (the newest frame is
    /// kept whatever its size): without it, 1,024 messages of 256 KiB held
    /// 256 MiB per room.
    pub const RECENT_BYTES_PER_ROOM_MAX: usize = 4 * 1024 * 1024;
    /// Connections subscribed to one room.
    pub const SUBSCRIBERS_PER_ROOM_MAX: usize = 100_000;
    /// Frames read from storage per history read.
    pub const HISTORY_READ_FRAMES_MAX: usize = 256;
    /// Commits after which a room's MLS state is snapshotted.
    pub const COMMITS_PER_SNAPSHOT: u32 = 16;
    /// Tickets (storage batches) a shard waits on at once.
    pub const TICKETS_IN_FLIGHT_MAX: usize = 64;
    /// One-shot `Sync` history readers one connection runs at once (over
    /// all rooms and shards); another `Sync` is refused with `RateLimited`.
    pub const SYNC_READERS_PER_CONNECTION_MAX: usize = 4;
    /// Delay suggested to a connection refused for its number of `Sync`
    /// readers.
    pub const SYNC_READER_RETRY_AFTER_MS: u64 = 100;
    /// Members being removed, or just removed, whose read bound a room
    /// remembers (so that their devices can read their own removal); the
    /// oldest bound is forgotten first, and that member is then refused.
    pub const DEPARTING_READERS_PER_ROOM_MAX: usize = 1024;
    /// How far past a replica's head a reader may subscribe there (it then
    /// waits for the replica): the replica lags its authority by at most a
    /// few batches.
    pub const REPLICA_LAG_FRAMES_MAX: u64 = 4096;
    /// Chain heads a replica keeps of the latest frames it took, to check
    /// the signed heads its authority sends between frames (a checkpoint
    /// follows the frames it covers, so it is checked a few frames late at
    /// most).
    pub const REPLICA_HEADS_KEPT_MAX: usize = 64;
    /// A room's live replica feeds get the authority's signed head (a
    /// checkpoint) after each durable run that reaches a multiple of this
    /// many frames: one signature check per this many frames at a replica.
    pub const REPLICA_CHECKPOINT_FRAMES: u64 = 32;

    const _: () = assert!(SHARD_COMMANDS_PER_BATCH_MAX <= SHARD_INBOX_COMMANDS_MAX);
    const _: () = assert!(
        REPLICA_HEADS_KEPT_MAX as u64 >= 2 * REPLICA_CHECKPOINT_FRAMES,
        "a checkpoint reached a little late still finds its head"
    );
    const _: () = assert!(HISTORY_READ_FRAMES_MAX <= RECENT_FRAMES_PER_ROOM_MAX);
    const _: () = assert!(
        RECENT_BYTES_PER_ROOM_MAX >= 16 * kalandra_proto::limits::APPLICATION_PAYLOAD_BYTES_MAX as usize,
        "the largest messages still hand a subscriber over from memory"
    );
    const _: () = assert!(
        HISTORY_READ_FRAMES_MAX <= crate::store::limits::READ_RANGE_ENTRIES_MAX,
        "one history read is one store read"
    );
}
