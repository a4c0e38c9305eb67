//! The server's room core: shards of room sequencers driven by tokio tasks.
//!
//! Rooms are spread over [`Node::shards`] by room id. Each shard is one task
//! that owns its rooms' [`RoomSequencer`]s outright (no locks): it takes
//! commands from connections, sequences frames, hands them to the group
//! commit writer in batches, and, when a batch is durable, executes the
//! sequencer's effects — acknowledgements, fan-out to subscribers, Welcome
//! routing. Tickets complete in submission order (one writer thread), so a
//! shard waits only on the oldest.
//!
//! Storage failure is not retried in-process: every in-flight frame is
//! rejected, the node reports itself failed, and the process exits so that
//! recovery from durable state (snapshot plus log replay) happens on restart.

mod moderation;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use kalandra_proto::payload::{self, CreateRoom};
use kalandra_proto::{ErrorCode, Frame, FrameHeaderBuf, Opcode, Payload, RoomId, SenderId};
use tokio::sync::{mpsc, oneshot};

pub use self::moderation::{
    ModerationDone, ModerationFailure, ModerationReply, ModerationRequest, RoomInfo, RoomSummary,
    MODERATION_TICK_MS, MODERATION_WRITES_QUEUED_MAX, ROOMS_LIST_MAX,
};
use crate::metrics::Metrics;
use crate::mls_state::ServerSigner;
use crate::moderation::RoomRoles;
use crate::push::{PushNotification, PushQueue};
use crate::sequencer::{
    Effect, PendingServerProposals, PersistentGroup, ProposalRef, RecoveryPoint, RoomSequencer, SubmitError,
    SERVER_SENDER_ID,
};
use crate::store::group_commit::{AppendTicket, GroupCommit};
use crate::store::{EntryContent, LogEntry, RoomMetadata, Store, StoredEntry, WelcomeId};

/// Identifies one client connection for the life of the process.
pub type ConnectionId = u64;

/// Every bound of the room core, in one place.
pub mod limits {
    /// Commands a shard's inbox holds before senders wait.
    pub const SHARD_INBOX_COMMANDS_MAX: usize = 8192;
    /// Commands a shard handles before it flushes a batch to storage.
    pub const SHARD_COMMANDS_PER_BATCH_MAX: usize = 1024;
    /// Durable frames a room keeps in memory to hand subscribers over from
    /// history to live without a gap.
    pub const RECENT_FRAMES_PER_ROOM_MAX: usize = 1024;
    /// Connections subscribed to one room.
    pub const SUBSCRIBERS_PER_ROOM_MAX: usize = 100_000;
    /// Frames read from storage per history read.
    pub const HISTORY_READ_FRAMES_MAX: usize = 256;
    /// Commits after which a room's MLS state is snapshotted.
    pub const COMMITS_PER_SNAPSHOT: u32 = 16;
    /// Tickets (storage batches) a shard waits on at once.
    pub const TICKETS_IN_FLIGHT_MAX: usize = 64;

    const _: () = assert!(SHARD_COMMANDS_PER_BATCH_MAX <= SHARD_INBOX_COMMANDS_MAX);
    const _: () = assert!(HISTORY_READ_FRAMES_MAX <= RECENT_FRAMES_PER_ROOM_MAX);
    const _: () = assert!(
        HISTORY_READ_FRAMES_MAX <= crate::store::limits::READ_RANGE_ENTRIES_MAX,
        "one history read is one store read"
    );
}

use limits::*;

pub use crate::outbox::{Outbox, OutboxReceiver, Outgoing};

/// Builds an unsigned server frame carrying `payload`.
pub fn server_frame<P: Payload>(room_id: RoomId, request_id: u32, payload: &P) -> Bytes {
    let mut header = FrameHeaderBuf::new(P::OPCODE);
    header.set_room_id(room_id).set_request_id(request_id);
    Frame::with_payload(header, payload).expect("server payloads fit their opcode").to_bytes()
}

/// Builds an `Error` frame.
pub fn error_frame(room_id: RoomId, request_id: u32, code: ErrorCode, message: &str) -> Bytes {
    error_frame_with(room_id, request_id, code, message, None, None, None)
}

fn error_frame_with(
    room_id: RoomId,
    request_id: u32,
    code: ErrorCode,
    message: &str,
    current_epoch: Option<u64>,
    log_index: Option<u64>,
    retry_after_ms: Option<u64>,
) -> Bytes {
    let message: String = message.chars().take(kalandra_proto::limits::TEXT_BYTES_MAX / 4).collect();
    server_frame(
        room_id,
        request_id,
        &payload::Error { code: code.to_u16(), message, current_epoch, log_index, retry_after_ms },
    )
}

/// Builds the `Error` frame that refuses a submission (with the room's
/// epoch and index for `WrongEpoch`, a retry delay for overload).
pub fn rejection_frame(room_id: RoomId, request_id: u32, error: &SubmitError) -> Bytes {
    let (current_epoch, log_index) = match error {
        SubmitError::WrongEpoch { current_epoch, log_index, .. } => (Some(*current_epoch), Some(*log_index)),
        _ => (None, None),
    };
    let retry_after_ms = match error {
        SubmitError::Overloaded { .. } | SubmitError::TooManyServerProposals => {
            Some(crate::sequencer::IN_FLIGHT_RETRY_AFTER_MS)
        }
        _ => None,
    };
    error_frame_with(
        room_id,
        request_id,
        error.error_code(),
        &error.to_string(),
        current_epoch,
        log_index,
        retry_after_ms,
    )
}

/// A request to a room shard.
pub enum Command {
    /// Sequence a frame (create room, commit, proposal, application, external join).
    Submit {
        /// The submitting connection.
        outbox: Arc<Outbox>,
        /// The frame; its sender id was checked against the connection.
        frame: Frame,
    },
    /// Fan an ephemeral frame out to the room's live subscribers.
    Ephemeral {
        /// The submitting connection.
        outbox: Arc<Outbox>,
        /// The frame.
        frame: Frame,
    },
    /// Stream history from an index, then live frames (`live`), or a bounded range once.
    Subscribe {
        /// The subscribing connection.
        outbox: Arc<Outbox>,
        /// The room.
        room_id: RoomId,
        /// First index wanted.
        from_log_index: u64,
        /// The request's id.
        request_id: u32,
        /// Live subscription (`Subscribe`) or one-shot range (`Sync`).
        live: bool,
        /// For a one-shot range: most frames.
        count_max: u64,
    },
    /// Stop streaming a room.
    Unsubscribe {
        /// The connection.
        connection: ConnectionId,
        /// The room.
        room_id: RoomId,
    },
    /// Answer with the room's current GroupInfo and ratchet tree.
    GroupInfo {
        /// The asking connection.
        outbox: Arc<Outbox>,
        /// The room.
        room_id: RoomId,
        /// The request's id.
        request_id: u32,
    },
    /// The connection is gone: drop its subscriptions.
    ConnectionClosed {
        /// The connection.
        connection: ConnectionId,
    },
    /// A history reader reached `next_log_index`; switch to live or read more.
    CaughtUp {
        /// The room.
        room_id: RoomId,
        /// The subscription caught up.
        subscription: u64,
        /// First index not yet sent.
        next_log_index: u64,
    },
    /// A moderation act (kick, ban, unban, role change).
    Moderate {
        /// The act.
        request: ModerationRequest,
        /// Where the outcome goes, once durable.
        reply: ModerationReply,
    },
    /// Describe a room.
    RoomInfo {
        /// The room.
        room_id: RoomId,
        /// The answer (`None`: no such room).
        reply: oneshot::Sender<Option<RoomInfo>>,
    },
    /// List this shard's rooms with an id above `after`, in id order.
    ListRooms {
        /// Exclusive lower bound.
        after: Option<RoomId>,
        /// Most rooms.
        count_max: usize,
        /// The answer.
        reply: oneshot::Sender<Vec<RoomSummary>>,
    },
    /// Whether `member` moderates the room now: a current member (not
    /// banned, no removal pending) holding the admin or moderator role.
    ModeratesRoom {
        /// The room.
        room_id: RoomId,
        /// The member asking.
        member: SenderId,
        /// The answer (`None`: no such room).
        reply: oneshot::Sender<Option<bool>>,
    },
    /// Entries of the room are being erased: replace them in the in-memory
    /// recent frames by their placeholders before the store destroys them,
    /// so no subscriber catching up from memory gets the content.
    Erased {
        /// The room.
        room_id: RoomId,
        /// The entries being erased.
        log_indices: Vec<u64>,
        /// Replies once the recent frames no longer hold them.
        done: oneshot::Sender<()>,
    },
    /// Stop: flush, wait for storage, reply.
    Shutdown {
        /// Replies once everything accepted is durable and acknowledged.
        done: oneshot::Sender<()>,
    },
}

/// Limits and options of the room core.
#[derive(Clone)]
pub struct NodeLimits {
    /// A user who is a member of this many rooms may not create or join
    /// (by external commit) another.
    pub rooms_per_user_max: u32,
    /// Where push payloads for members who are not connected go; `None`
    /// forwards none.
    pub push: Option<PushQueue>,
    /// The server's key, listed in every room's `external_senders`: it
    /// signs the Remove proposals of kicks and bans.
    pub server_signer: Arc<ServerSigner>,
}

/// Reports from the room core to the process.
#[derive(Debug, Default)]
pub struct NodeHealth {
    failed: AtomicBool,
}

impl NodeHealth {
    /// Whether storage failed: the process must exit and recover on restart.
    pub fn has_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }
}

/// How many rooms each user is a member of.
type Memberships = Arc<Mutex<HashMap<SenderId, u32>>>;

fn count_memberships(memberships: &Memberships, added: &[SenderId], removed: &[SenderId]) {
    let mut memberships = memberships.lock().expect("memberships lock");
    for sender in added {
        *memberships.entry(*sender).or_insert(0) += 1;
    }
    for sender in removed {
        if let Some(count) = memberships.get_mut(sender) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                memberships.remove(sender);
            }
        }
    }
}

/// Source of the current time for the room core (ms since the Unix epoch).
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// Handle to the room core.
#[derive(Clone)]
pub struct Node {
    shards: Arc<Vec<mpsc::Sender<Command>>>,
    online: Arc<Mutex<HashMap<SenderId, Vec<Arc<Outbox>>>>>,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) health: Arc<NodeHealth>,
    /// The moderation writer; it ends once every shard has stopped.
    writer_task: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
    pub(crate) clock: Clock,
}

/// Why the room core could not start.
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    /// Storage could not be read.
    #[error("reading storage: {0}")]
    Storage(String),
    /// The stored log does not replay: corruption or a bug.
    #[error("room {room_id}: {detail}")]
    Corrupt {
        /// The room.
        room_id: RoomId,
        /// What failed.
        detail: String,
    },
}

impl Node {
    /// Recovers every room from `store` and starts `shard_count` shards.
    pub async fn start<G: PersistentGroup>(
        store: Arc<dyn Store>,
        group_commit: GroupCommit,
        shard_count: usize,
        clock: Clock,
        metrics: Metrics,
        limits: NodeLimits,
    ) -> Result<Node, RecoveryError> {
        let shard_count = shard_count.max(1);
        let recovering = Arc::clone(&store);
        let rooms = tokio::task::spawn_blocking(move || recover_rooms::<G>(recovering.as_ref()))
            .await
            .map_err(|error| RecoveryError::Storage(error.to_string()))??;
        let mut per_shard: Vec<HashMap<RoomId, Room<G>>> = (0..shard_count).map(|_| HashMap::new()).collect();
        for room in rooms {
            per_shard[shard_of(room.sequencer.room_id(), shard_count)].insert(room.sequencer.room_id(), room);
        }
        let health = Arc::new(NodeHealth::default());
        let online = Arc::new(Mutex::new(HashMap::new()));
        let memberships: Memberships = Arc::new(Mutex::new(HashMap::new()));
        for room in per_shard.iter().flat_map(HashMap::values) {
            count_memberships(&memberships, &room.sequencer.group().members(), &[]);
        }
        let (moderation_writer, writer_task) =
            moderation::start_writer(Arc::clone(&store), Arc::clone(&health));
        let mut shards = Vec::with_capacity(shard_count);
        for rooms in per_shard {
            let watched = rooms
                .iter()
                .filter(|(_, room)| {
                    !room.sequencer.server_proposals_pending().is_empty() || room.sequencer.has_timed_bans()
                })
                .map(|(room_id, _)| *room_id)
                .collect();
            let (sender, receiver) = mpsc::channel(SHARD_INBOX_COMMANDS_MAX);
            let shard = Shard {
                rooms,
                store: Arc::clone(&store),
                group_commit: group_commit.clone(),
                inbox: sender.clone(),
                pending_entries: Vec::new(),
                pending_rooms: Vec::new(),
                tickets: VecDeque::new(),
                health: Arc::clone(&health),
                online: Arc::clone(&online),
                memberships: Arc::clone(&memberships),
                rooms_per_user_max: limits.rooms_per_user_max,
                push: limits.push.clone(),
                server_signer: Arc::clone(&limits.server_signer),
                moderation_writer: moderation_writer.clone(),
                watched,
                next_subscription: 0,
                clock: Arc::clone(&clock),
                effects: Vec::new(),
                metrics: metrics.clone(),
                background: tokio::task::JoinSet::new(),
            };
            tokio::spawn(shard.run(receiver));
            shards.push(sender);
        }
        drop(moderation_writer);
        let writer_task = Arc::new(Mutex::new(Some(writer_task)));
        Ok(Node { shards: Arc::new(shards), online, store, health, writer_task, clock })
    }

    /// Sends a command to the shard that owns `room_id`. `false` if the node stopped.
    pub async fn send(&self, room_id: RoomId, command: Command) -> bool {
        if let Command::Subscribe { outbox, .. } = &command {
            if outbox.welcomes_delivered.load(Ordering::Acquire) {
                forget_used_welcomes(Arc::clone(&self.store), outbox.sender(), room_id);
            }
        }
        self.shards[shard_of(room_id, self.shards.len())].send(command).await.is_ok()
    }

    /// Tells every shard a connection closed.
    pub async fn connection_closed(&self, outbox: &Arc<Outbox>) {
        {
            let mut online = self.online.lock().expect("online lock");
            if let Some(list) = online.get_mut(&outbox.sender()) {
                list.retain(|other| other.connection() != outbox.connection());
                if list.is_empty() {
                    online.remove(&outbox.sender());
                }
            }
        }
        for shard in self.shards.iter() {
            let _ = shard.send(Command::ConnectionClosed { connection: outbox.connection() }).await;
        }
    }

    /// Registers an authenticated connection for Welcome delivery and sends
    /// it the Welcomes waiting for it.
    pub async fn connection_authenticated(&self, outbox: &Arc<Outbox>) {
        self.online.lock().expect("online lock").entry(outbox.sender()).or_default().push(Arc::clone(outbox));
        deliver_pending_welcomes(Arc::clone(&self.store), Arc::clone(outbox)).await;
    }

    /// Marks the node failed after a storage failure outside the shards: the
    /// process exits and recovers on restart.
    pub(crate) fn storage_failed(&self) {
        self.health.failed.store(true, Ordering::Release);
    }

    /// The node's health counters.
    pub fn health(&self) -> &Arc<NodeHealth> {
        &self.health
    }

    /// The room core's current time, ms since the Unix epoch.
    pub fn now_ms(&self) -> u64 {
        (self.clock)()
    }

    /// The node's store (the admin API reads the audit log from it).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Performs a moderation act; returns once it is durable and audited.
    pub async fn moderate(&self, request: ModerationRequest) -> Result<ModerationDone, ModerationFailure> {
        let (reply, answer) = oneshot::channel();
        let room_id = request.room_id;
        if !self.send(room_id, Command::Moderate { request, reply }).await {
            return Err(ModerationFailure::Stopped);
        }
        answer.await.unwrap_or(Err(ModerationFailure::Stopped))
    }

    /// Describes a room (`None`: no such room, or the node stopped).
    pub async fn room_info(&self, room_id: RoomId) -> Option<RoomInfo> {
        let (reply, answer) = oneshot::channel();
        if !self.send(room_id, Command::RoomInfo { room_id, reply }).await {
            return None;
        }
        answer.await.ok().flatten()
    }

    /// Rooms with an id above `after`, in id order, at most `count_max`
    /// (and at most [`ROOMS_LIST_MAX`]).
    pub async fn list_rooms(&self, after: Option<RoomId>, count_max: usize) -> Vec<RoomSummary> {
        let count_max = count_max.min(ROOMS_LIST_MAX);
        let mut rooms = Vec::new();
        for shard in self.shards.iter() {
            let (reply, answer) = oneshot::channel();
            if shard.send(Command::ListRooms { after, count_max, reply }).await.is_ok() {
                rooms.extend(answer.await.unwrap_or_default());
            }
        }
        rooms.sort_by_key(|room| room.room_id.0);
        rooms.truncate(count_max);
        rooms
    }

    /// Stops every shard after flushing what was accepted.
    pub async fn shutdown(&self) {
        for shard in self.shards.iter() {
            let (done, wait) = oneshot::channel();
            if shard.send(Command::Shutdown { done }).await.is_ok() {
                let _ = wait.await;
            }
        }
        // The shards hold the writer's only senders: once they are gone it
        // has written every queued act and ends.
        let writer = self.writer_task.lock().expect("writer lock").take();
        if let Some(writer) = writer {
            let _ = writer.await;
        }
    }
}

fn shard_of(room_id: RoomId, shard_count: usize) -> usize {
    let mut prefix = [0u8; 8];
    prefix.copy_from_slice(&room_id.0[..8]);
    usize::try_from(u64::from_be_bytes(prefix) % shard_count as u64).expect("shard index fits usize")
}

/// Hands the recipient's pending Welcomes to its connection. They stay
/// stored: a connection can die before the client keeps them (it looks alive
/// to the server until its idle timeout), so a Welcome is deleted only once
/// its recipient reads the room it joins (see [`forget_used_welcomes`]) and
/// is delivered again on every authentication until then. Clients ignore a
/// Welcome for a room they are in.
async fn deliver_pending_welcomes(store: Arc<dyn Store>, outbox: Arc<Outbox>) {
    let recipient = outbox.sender().0;
    let Ok(Ok(pending)) = tokio::task::spawn_blocking(move || store.pending_welcomes(recipient)).await else {
        tracing::warn!(recipient, "could not read pending welcomes");
        return;
    };
    if pending.is_empty() {
        return;
    }
    outbox.welcomes_delivered.store(true, Ordering::Release);
    for welcome in pending {
        if !outbox.send(welcome.welcome).await {
            return;
        }
    }
}

/// The recipient reads `room_id` (subscribe or sync): it has used its
/// Welcome for the room, which can go.
fn forget_used_welcomes(store: Arc<dyn Store>, recipient: SenderId, room_id: RoomId) {
    tokio::task::spawn_blocking(move || {
        let Ok(pending) = store.pending_welcomes(recipient.0) else { return };
        let used: Vec<WelcomeId> = pending
            .iter()
            .filter(|welcome| {
                Frame::decode(&welcome.welcome).is_ok_and(|frame| frame.header().room_id() == room_id)
            })
            .map(|welcome| welcome.welcome_id)
            .collect();
        if !used.is_empty() {
            if let Err(error) = store.delete_welcomes(recipient.0, &used) {
                tracing::warn!(%recipient, %room_id, %error, "could not delete used welcomes");
            }
        }
    });
}

/// One connection subscribed to a room.
struct Subscriber {
    outbox: Arc<Outbox>,
    /// First index this subscriber has not been sent.
    next_log_index: u64,
    /// Receiving live fan-out (history is complete).
    live: bool,
    /// Identifies this subscription, so that a history reader of an earlier
    /// subscription of the same connection cannot report for this one.
    subscription: u64,
    /// Set when the subscription ends: its history reader stops sending.
    cancelled: Arc<AtomicBool>,
}

/// Removes the subscribers `remove` picks and stops their history readers.
fn drop_subscribers(subscribers: &mut Vec<Subscriber>, mut remove: impl FnMut(&Subscriber) -> bool) {
    subscribers.retain(|subscriber| {
        let removed = remove(subscriber);
        if removed {
            subscriber.cancelled.store(true, Ordering::Release);
        }
        !removed
    });
}

/// One frame between sequencing and durability.
struct Waiting {
    log_index: u64,
    /// `None` once the connection closed.
    outbox: Option<Arc<Outbox>>,
    encoded: Bytes,
}

struct Room<G: PersistentGroup> {
    sequencer: RoomSequencer<G>,
    creator: SenderId,
    created_at_ms: u64,
    /// Frames waiting for durability, aligned with the sequencer's in-flight
    /// frames: index, the connection to acknowledge, and the frame encoded
    /// once (for storage, and again for fan-out).
    waiting: VecDeque<Waiting>,
    subscribers: Vec<Subscriber>,
    /// The most recent durable frames: (log index, encoded frame).
    recent: VecDeque<(u64, Bytes)>,
    commits_since_snapshot: u32,
    /// A server proposal became durable: snapshot soon, so that a restart
    /// finds the pending proposal in the snapshot too.
    snapshot_due: bool,
    /// Who holds which role.
    roles: RoomRoles,
    /// Kicks and bans waiting for their Remove proposal to be durable.
    acts_awaiting_proposal: VecDeque<moderation::ActAwaitingProposal>,
}

impl<G: PersistentGroup> Room<G> {
    fn new(sequencer: RoomSequencer<G>, creator: SenderId, created_at_ms: u64) -> Room<G> {
        Room {
            sequencer,
            creator,
            created_at_ms,
            waiting: VecDeque::new(),
            subscribers: Vec::new(),
            recent: VecDeque::new(),
            commits_since_snapshot: 0,
            snapshot_due: false,
            roles: RoomRoles::new(creator, []),
            acts_awaiting_proposal: VecDeque::new(),
        }
    }
    /// First index not yet durable.
    fn durable_next(&self) -> u64 {
        self.sequencer.durable_through().map_or(0, |through| through + 1)
    }
}

/// Rebuilds every stored room: MLS state from its snapshot (or its
/// `CreateRoom` frame), then replay of every later entry.
fn recover_rooms<G: PersistentGroup>(store: &dyn Store) -> Result<Vec<Room<G>>, RecoveryError> {
    let storage = |error: &dyn std::fmt::Display| RecoveryError::Storage(error.to_string());
    let mut rooms = Vec::new();
    let mut after = None;
    loop {
        let heads =
            store.room_heads(after, crate::store::limits::ROOM_HEADS_PAGE_MAX).map_err(|e| storage(&e))?;
        let Some(last) = heads.last() else { break };
        after = Some(last.room_id);
        for head in heads {
            rooms.push(recover_room::<G>(store, head.room_id, head.next_log_index)?);
        }
    }
    Ok(rooms)
}

fn recover_room<G: PersistentGroup>(
    store: &dyn Store,
    room_id: RoomId,
    next_log_index: u64,
) -> Result<Room<G>, RecoveryError> {
    let recovered = recover_room_state::<G>(store, room_id, next_log_index)?;
    let mut room = Room::new(recovered.sequencer, recovered.creator, recovered.created_at_ms);
    room.recent = recovered.recent;
    room.roles = recovered.roles;
    Ok(room)
}

/// A room rebuilt from storage by [`recover_room_state`].
pub struct RecoveredRoom<G: PersistentGroup> {
    /// The sequencer, at the stored head.
    pub sequencer: RoomSequencer<G>,
    /// Who created the room.
    pub creator: SenderId,
    /// When (server clock, ms).
    pub created_at_ms: u64,
    /// The most recent stored frames (at most [`RECENT_FRAMES_PER_ROOM_MAX`]):
    /// (log index, encoded frame).
    pub recent: VecDeque<(u64, Bytes)>,
    /// Who holds a role in the room (the creator is its admin).
    pub roles: RoomRoles,
}

/// Rebuilds one stored room whose log holds `next_log_index` entries: MLS
/// state from its snapshot (or its `CreateRoom` frame), then replay of every
/// later entry through [`RoomSequencer::replay`]. Blocks on storage.
pub fn recover_room_state<G: PersistentGroup>(
    store: &dyn Store,
    room_id: RoomId,
    next_log_index: u64,
) -> Result<RecoveredRoom<G>, RecoveryError> {
    let corrupt = |detail: String| RecoveryError::Corrupt { room_id, detail };
    let storage = |error: &dyn std::fmt::Display| RecoveryError::Storage(error.to_string());
    let first = store.read_range(room_id, 0, 1).map_err(|e| storage(&e))?;
    let create_entry = first.first().ok_or_else(|| corrupt("log has no entry 0".into()))?;
    let create_bytes = create_entry.frame().ok_or_else(|| corrupt("entry 0 was erased".into()))?;
    let create_frame = Frame::decode(create_bytes).map_err(|e| corrupt(format!("entry 0: {e}")))?;
    let create: CreateRoom = create_frame.decode_payload().map_err(|e| corrupt(format!("entry 0: {e}")))?;
    let creator = create_frame.header().sender_id();
    let policy = crate::moderation::RoomPolicy::new(creator, create.join_rule());
    let metadata = store.room_metadata(room_id).map_err(|e| storage(&e))?;
    let created_at_ms =
        metadata.as_ref().map_or(create_frame.header().server_timestamp_ms(), |m| m.created_at_ms);
    let (group, through, group_info, epoch_started_at_log_index, server_proposals) =
        match metadata.filter(|m| m.mls_snapshot_log_index > 0 && !m.mls_snapshot.is_empty()) {
            Some(metadata) => {
                let snapshot = RoomSnapshot::decode(&metadata.mls_snapshot)
                    .ok_or_else(|| corrupt("malformed snapshot".into()))?;
                let group = G::restore(snapshot.group).map_err(|e| corrupt(format!("snapshot: {e}")))?;
                let through = metadata.mls_snapshot_log_index - 1;
                (
                    group,
                    through,
                    snapshot.group_info,
                    snapshot.epoch_started_at_log_index,
                    snapshot.server_proposals,
                )
            }
            None => {
                let group = G::from_create_room(&create.group_info, &create.ratchet_tree)
                    .map_err(|e| corrupt(format!("entry 0 group: {e}")))?;
                (group, 0, (0, Bytes::from(create.group_info)), 0, PendingServerProposals::default())
            }
        };
    let point = RecoveryPoint {
        through_log_index: through,
        last_timestamp_ms: create_frame.header().server_timestamp_ms(),
        group_info,
        epoch_started_at_log_index,
        server_proposals,
        policy,
    };
    let mut sequencer = RoomSequencer::recover(room_id, group, point);
    let moderation = store.room_moderation(room_id).map_err(|e| storage(&e))?;
    for (user, ban) in &moderation.bans {
        sequencer.ban(SenderId(*user), ban.until_ms).map_err(|e| corrupt(format!("bans: {e}")))?;
    }
    let mut room_recent = VecDeque::new();
    let mut from = through + 1;
    let mut reads = 0u64;
    while from < next_log_index {
        reads += 1;
        assert!(reads <= next_log_index, "replay makes progress on every read");
        let entries = store.read_range(room_id, from, HISTORY_READ_FRAMES_MAX).map_err(|e| storage(&e))?;
        if entries.is_empty() {
            return Err(corrupt(format!("log ends at {from}, head says {next_log_index}")));
        }
        for entry in entries {
            // An erased entry replays as its placeholder: only application
            // frames are ever erased, and replay needs nothing of them but
            // their index and timestamp.
            let bytes = match &entry.content {
                EntryContent::Erased(erasure) if crate::erasure::erasable(erasure.opcode()) => {
                    crate::erasure::erased_placeholder(room_id, entry.log_index, erasure)
                }
                EntryContent::Erased(_) => {
                    return Err(corrupt(format!("entry {}: a handshake frame was erased", entry.log_index)));
                }
                EntryContent::Frame(frame) => frame.clone(),
            };
            let frame =
                Frame::decode(&bytes).map_err(|e| corrupt(format!("entry {}: {e}", entry.log_index)))?;
            sequencer.replay(&frame).map_err(|e| corrupt(e.to_string()))?;
            if room_recent.len() == RECENT_FRAMES_PER_ROOM_MAX {
                room_recent.pop_front();
            }
            room_recent.push_back((entry.log_index, bytes));
            from = entry.log_index + 1;
        }
    }
    assert_eq!(sequencer.next_log_index(), next_log_index, "replay reached the stored head");
    let roles = RoomRoles::new(creator, moderation.roles.iter().map(|(user, role)| (SenderId(*user), *role)));
    Ok(RecoveredRoom { sequencer, creator, created_at_ms, recent: room_recent, roles })
}

/// One storage request in flight.
struct PendingBatch {
    ticket: AppendTicket,
    /// Rooms in the batch with their highest index.
    rooms: Vec<(RoomId, u64)>,
    entries: usize,
    submitted: std::time::Instant,
}

struct Shard<G: PersistentGroup> {
    rooms: HashMap<RoomId, Room<G>>,
    store: Arc<dyn Store>,
    group_commit: GroupCommit,
    inbox: mpsc::Sender<Command>,
    pending_entries: Vec<LogEntry>,
    /// Highest index per room in `pending_entries`.
    pending_rooms: Vec<(RoomId, u64)>,
    /// Storage requests in flight, oldest first.
    tickets: VecDeque<PendingBatch>,
    health: Arc<NodeHealth>,
    online: Arc<Mutex<HashMap<SenderId, Vec<Arc<Outbox>>>>>,
    memberships: Memberships,
    rooms_per_user_max: u32,
    push: Option<PushQueue>,
    server_signer: Arc<ServerSigner>,
    /// Moderation writes, in decision order.
    moderation_writer: mpsc::Sender<moderation::ModerationWrite>,
    /// Rooms with pending server proposals or timed bans.
    watched: HashSet<RoomId>,
    /// Last subscription id handed out.
    next_subscription: u64,
    clock: Clock,
    effects: Vec<Effect>,
    metrics: Metrics,
    /// Store writes and Welcome deliveries running in the background;
    /// shutdown waits for them.
    background: tokio::task::JoinSet<()>,
}

impl<G: PersistentGroup> Shard<G> {
    async fn run(mut self, mut inbox: mpsc::Receiver<Command>) {
        let mut shutdown: Option<oneshot::Sender<()>> = None;
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(MODERATION_TICK_MS));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if shutdown.is_some() && self.tickets.is_empty() && self.pending_entries.is_empty() {
                break;
            }
            let accepting = shutdown.is_none() && self.tickets.len() < TICKETS_IN_FLIGHT_MAX;
            tokio::select! {
                biased;
                result = async { (&mut self.tickets.front_mut().expect("guarded").ticket).await }, if !self.tickets.is_empty() => {
                    let batch = self.tickets.pop_front().expect("guarded");
                    self.metrics.storage_batch(batch.entries, batch.submitted.elapsed().as_secs_f64());
                    self.persisted(batch.rooms, result.map_err(|error| error.to_string())).await;
                }
                _ = tick.tick(), if shutdown.is_none() && !self.watched.is_empty() => self.moderation_tick(),
                command = inbox.recv(), if accepting => {
                    let Some(command) = command else { break };
                    self.handle(command, &mut shutdown);
                    for _ in 0..SHARD_COMMANDS_PER_BATCH_MAX {
                        match inbox.try_recv() {
                            Ok(command) => self.handle(command, &mut shutdown),
                            Err(_) => break,
                        }
                    }
                }
            }
            self.flush().await;
            while self.background.try_join_next().is_some() {}
        }
        while self.background.join_next().await.is_some() {}
        if let Some(done) = shutdown {
            let _ = done.send(());
        }
    }

    fn handle(&mut self, command: Command, shutdown: &mut Option<oneshot::Sender<()>>) {
        match command {
            Command::Submit { outbox, frame } => self.submit(outbox, frame),
            Command::Ephemeral { outbox, frame } => self.ephemeral(&outbox, frame),
            Command::Subscribe { outbox, room_id, from_log_index, request_id, live, count_max } => {
                self.subscribe(outbox, room_id, from_log_index, request_id, live, count_max)
            }
            Command::Unsubscribe { connection, room_id } => {
                if let Some(room) = self.rooms.get_mut(&room_id) {
                    drop_subscribers(&mut room.subscribers, |s| s.outbox.connection() == connection);
                }
            }
            Command::GroupInfo { outbox, room_id, request_id } => {
                self.group_info(&outbox, room_id, request_id)
            }
            Command::ConnectionClosed { connection } => {
                for room in self.rooms.values_mut() {
                    drop_subscribers(&mut room.subscribers, |s| s.outbox.connection() == connection);
                    for waiting in room.waiting.iter_mut() {
                        if waiting.outbox.as_ref().is_some_and(|o| o.connection() == connection) {
                            waiting.outbox = None;
                        }
                    }
                }
            }
            Command::CaughtUp { room_id, subscription, next_log_index } => {
                self.caught_up(room_id, subscription, next_log_index)
            }
            Command::Moderate { request, reply } => self.moderate(request, reply),
            Command::ModeratesRoom { room_id, member, reply } => {
                let _ = reply.send(self.moderates_room(room_id, member));
            }
            Command::RoomInfo { room_id, reply } => {
                let _ = reply.send(self.room_info(room_id));
            }
            Command::ListRooms { after, count_max, reply } => {
                let _ = reply.send(self.list_rooms(after, count_max));
            }
            Command::Erased { room_id, log_indices, done } => {
                if let Some(room) = self.rooms.get_mut(&room_id) {
                    hide_erased(room_id, &mut room.recent, &log_indices);
                }
                let _ = done.send(());
            }
            Command::Shutdown { done } => *shutdown = Some(done),
        }
    }

    /// Sends a reply (acknowledgement, error, sync marker). Replies are never
    /// dropped: with the frame queue full they wait as notices, written after
    /// the queued frames; if those overflow too, the connection is closed.
    fn reply(outbox: &Outbox, frame: Bytes) {
        if !outbox.try_reply(frame.clone()) {
            outbox.notice(frame);
        }
    }

    fn submit(&mut self, outbox: Arc<Outbox>, frame: Frame) {
        let room_id = frame.header().room_id();
        let request_id = frame.header().request_id();
        let now_ms = (self.clock)();
        let validates_mls =
            matches!(frame.opcode(), Opcode::CreateRoom | Opcode::Commit | Opcode::ExternalJoin);
        let started = validates_mls.then(std::time::Instant::now);
        let result = if frame.opcode() == Opcode::CreateRoom {
            self.create_room(&outbox, frame, now_ms)
        } else {
            match self.rooms.get_mut(&room_id) {
                None => {
                    self.refuse(&outbox, room_id, request_id, ErrorCode::UnknownRoom, "no such room");
                    return;
                }
                Some(room) => {
                    let rooms =
                        self.memberships.lock().expect("memberships lock").get(&outbox.sender()).copied();
                    match rooms {
                        // An external join while at the limit (joins in flight are not yet counted).
                        Some(rooms)
                            if frame.opcode() == Opcode::ExternalJoin && rooms >= self.rooms_per_user_max =>
                        {
                            Err(SubmitError::TooManyRooms { rooms })
                        }
                        _ => room.sequencer.submit(outbox.sender(), frame, now_ms),
                    }
                }
            }
        };
        if let Some(started) = started {
            self.metrics.commit_validated(started.elapsed().as_secs_f64());
        }
        match result {
            Ok(sequenced) => {
                let room = self.rooms.get_mut(&room_id).expect("room exists after sequencing");
                let encoded = sequenced.frame.to_bytes();
                room.waiting.push_back(Waiting {
                    log_index: sequenced.log_index,
                    outbox: Some(Arc::clone(&outbox)),
                    encoded: encoded.clone(),
                });
                self.pending_entries.push(LogEntry {
                    room_id,
                    log_index: sequenced.log_index,
                    frame: encoded,
                });
                match self.pending_rooms.iter_mut().find(|(room, _)| *room == room_id) {
                    Some((_, through)) => *through = sequenced.log_index,
                    None => self.pending_rooms.push((room_id, sequenced.log_index)),
                }
            }
            Err(error) => {
                self.metrics.rejected(error.error_code());
                Self::reply(&outbox, rejection_frame(room_id, request_id, &error));
            }
        }
    }

    /// Answers a request with an `Error` frame and counts the rejection.
    fn refuse(&self, outbox: &Outbox, room_id: RoomId, request_id: u32, code: ErrorCode, message: &str) {
        self.metrics.rejected(code);
        Self::reply(outbox, error_frame(room_id, request_id, code, message));
    }

    fn create_room(
        &mut self,
        outbox: &Arc<Outbox>,
        frame: Frame,
        now_ms: u64,
    ) -> Result<crate::sequencer::Sequenced, SubmitError> {
        let room_id = frame.header().room_id();
        if self.rooms.contains_key(&room_id) {
            return Err(SubmitError::RoomExists);
        }
        let create: CreateRoom = frame.decode_payload()?;
        let group = G::from_create_room(&create.group_info, &create.ratchet_tree)
            .map_err(SubmitError::InvalidGroupInfo)?;
        // Check and count the creator's membership in one step, so that
        // creates pipelined on several shards cannot pass the limit together.
        let mut memberships = self.memberships.lock().expect("memberships lock");
        let rooms = memberships.get(&outbox.sender()).copied().unwrap_or(0);
        if rooms >= self.rooms_per_user_max {
            return Err(SubmitError::TooManyRooms { rooms });
        }
        let server_key = self.server_signer.public_key();
        let (sequencer, sequenced) =
            RoomSequencer::create(room_id, group, outbox.sender(), frame, now_ms, &server_key)?;
        *memberships.entry(outbox.sender()).or_insert(0) += 1;
        drop(memberships);
        self.rooms.insert(room_id, Room::new(sequencer, outbox.sender(), now_ms));
        Ok(sequenced)
    }

    fn ephemeral(&mut self, outbox: &Arc<Outbox>, frame: Frame) {
        let room_id = frame.header().room_id();
        let request_id = frame.header().request_id();
        let Some(room) = self.rooms.get_mut(&room_id) else {
            self.refuse(outbox, room_id, request_id, ErrorCode::UnknownRoom, "no such room");
            return;
        };
        if !room.sequencer.is_member(outbox.sender()) {
            self.refuse(outbox, room_id, request_id, ErrorCode::NotMember, "not a member");
            return;
        }
        let bytes = frame.to_bytes();
        for subscriber in room.subscribers.iter().filter(|s| s.live) {
            if subscriber.outbox.connection() != outbox.connection() {
                // Ephemeral frames may be dropped for a slow reader; they are never owed.
                let _ = subscriber.outbox.try_send(bytes.clone());
            }
        }
    }

    fn subscribe(
        &mut self,
        outbox: Arc<Outbox>,
        room_id: RoomId,
        from_log_index: u64,
        request_id: u32,
        live: bool,
        count_max: u64,
    ) {
        let Some(room) = self.rooms.get_mut(&room_id) else {
            self.refuse(&outbox, room_id, request_id, ErrorCode::UnknownRoom, "no such room");
            return;
        };
        if !room.sequencer.is_member(outbox.sender()) {
            self.refuse(&outbox, room_id, request_id, ErrorCode::NotMember, "not a member");
            return;
        }
        let durable_next = room.durable_next();
        if from_log_index > durable_next {
            let message = format!("log index {from_log_index} is beyond the room's head {durable_next}");
            self.refuse(&outbox, room_id, request_id, ErrorCode::UnknownLogIndex, &message);
            return;
        }
        if live {
            if room.subscribers.len() >= SUBSCRIBERS_PER_ROOM_MAX {
                self.metrics.rejected(ErrorCode::RateLimited);
                Self::reply(
                    &outbox,
                    error_frame(room_id, request_id, ErrorCode::RateLimited, "room has too many subscribers"),
                );
                return;
            }
            drop_subscribers(&mut room.subscribers, |s| s.outbox.connection() == outbox.connection());
            self.next_subscription += 1;
            let subscription = self.next_subscription;
            room.subscribers.push(Subscriber {
                outbox: Arc::clone(&outbox),
                next_log_index: from_log_index,
                live: false,
                subscription,
                cancelled: Arc::new(AtomicBool::new(false)),
            });
            self.caught_up(room_id, subscription, from_log_index);
        } else {
            let through = durable_next.min(from_log_index.saturating_add(count_max));
            let reader = HistoryReader {
                store: Arc::clone(&self.store),
                room_id,
                outbox,
                request_id,
                subscription: 0,
                cancelled: Arc::new(AtomicBool::new(false)),
            };
            tokio::spawn(reader.send_range(from_log_index, through, None));
        }
    }

    /// A subscriber has been sent everything below `next_log_index`: hand it
    /// over to live fan-out if the rest is in memory and fits its queue now,
    /// else send more history (with backpressure) and come back here.
    fn caught_up(&mut self, room_id: RoomId, subscription: u64, next_log_index: u64) {
        let Some(room) = self.rooms.get_mut(&room_id) else { return };
        let durable_next = room.durable_next();
        let oldest_recent = room.recent.front().map_or(durable_next, |(index, _)| *index);
        let Some(subscriber) = room.subscribers.iter_mut().find(|s| s.subscription == subscription) else {
            return;
        };
        let backlog = durable_next.saturating_sub(next_log_index);
        let fits = usize::try_from(backlog).is_ok_and(|backlog| backlog <= subscriber.outbox.free_capacity());
        if next_log_index >= oldest_recent && fits {
            let mut delivered = true;
            for (index, bytes) in room.recent.iter().filter(|(index, _)| *index >= next_log_index) {
                if !subscriber.outbox.try_send(bytes.clone()) {
                    delivered = false;
                    subscriber.next_log_index = *index;
                    break;
                }
            }
            if delivered {
                subscriber.next_log_index = durable_next;
                subscriber.live = true;
                let done =
                    server_frame(room_id, 0, &payload::SyncDone { next_log_index: durable_next, live: true });
                Self::reply(&subscriber.outbox, done);
            } else {
                lagged(room_id, subscriber);
                drop_subscribers(&mut room.subscribers, |s| s.subscription == subscription);
            }
        } else {
            let reader = HistoryReader {
                store: Arc::clone(&self.store),
                room_id,
                outbox: Arc::clone(&subscriber.outbox),
                request_id: 0,
                subscription,
                cancelled: Arc::clone(&subscriber.cancelled),
            };
            tokio::spawn(reader.send_range(next_log_index, durable_next, Some(self.inbox.clone())));
        }
    }

    fn group_info(&mut self, outbox: &Arc<Outbox>, room_id: RoomId, request_id: u32) {
        let Some(room) = self.rooms.get(&room_id) else {
            self.refuse(outbox, room_id, request_id, ErrorCode::UnknownRoom, "no such room");
            return;
        };
        match room.sequencer.group_info_for(outbox.sender(), (self.clock)()) {
            Err(error) => self.refuse(outbox, room_id, request_id, error.error_code(), &error.to_string()),
            Ok(Some((epoch, group_info))) => {
                let payload = payload::GroupInfo {
                    epoch: *epoch,
                    group_info: group_info.to_vec(),
                    ratchet_tree: room.sequencer.group().ratchet_tree().to_vec(),
                };
                Self::reply(outbox, server_frame(room_id, request_id, &payload));
            }
            _ => self.refuse(
                outbox,
                room_id,
                request_id,
                ErrorCode::InvalidGroupInfo,
                "no GroupInfo published for the current epoch",
            ),
        }
    }

    /// Hands the accumulated entries to the group-commit writer as one request.
    async fn flush(&mut self) {
        if self.pending_entries.is_empty() {
            return;
        }
        let entries = std::mem::take(&mut self.pending_entries);
        let rooms = std::mem::take(&mut self.pending_rooms);
        let (count, submitted) = (entries.len(), std::time::Instant::now());
        match self.group_commit.submit(entries).await {
            Ok(ticket) => self.tickets.push_back(PendingBatch { ticket, rooms, entries: count, submitted }),
            Err(error) => self.persisted(rooms, Err(error.to_string())).await,
        }
    }

    async fn persisted(&mut self, rooms: Vec<(RoomId, u64)>, result: Result<(), String>) {
        let mut effects = std::mem::take(&mut self.effects);
        for (room_id, through) in rooms {
            let Some(room) = self.rooms.get_mut(&room_id) else { continue };
            effects.clear();
            match &result {
                Ok(()) if !room.sequencer.is_recovering() => room.sequencer.durable(through, &mut effects),
                Ok(()) => {}
                Err(error) => {
                    tracing::error!(%room_id, %error, "storage failed; the node stops and recovers on restart");
                    self.health.failed.store(true, Ordering::Release);
                    room.sequencer.storage_failed(&mut effects);
                }
            }
            // A commit's Welcomes are stored before its acknowledgement goes
            // out, so an acknowledged add never loses its Welcome in a crash.
            for effect in &effects {
                if let Effect::DeliverWelcome { recipients, welcome, ratchet_tree, log_index } = effect {
                    let frame = welcome_frame(room_id, welcome, ratchet_tree, *log_index);
                    if let Err(error) = store_welcomes(Arc::clone(&self.store), recipients, frame).await {
                        tracing::error!(%room_id, %error, "storage failed storing Welcomes; the node stops and recovers on restart");
                        self.health.failed.store(true, Ordering::Release);
                    }
                }
            }
            let mut context = EffectContext {
                online: &self.online,
                store: &self.store,
                memberships: &self.memberships,
                metrics: &self.metrics,
                background: &mut self.background,
                push: self.push.as_ref(),
            };
            apply_effects(room_id, room, &mut effects, &mut context);
            match &result {
                Ok(()) => {
                    maybe_snapshot(room_id, room, &self.store, &mut self.background);
                    self.proposals_durable(room_id, through);
                }
                Err(error) => self.proposals_failed(room_id, error),
            }
        }
        self.effects = effects;
    }
}

fn lagged(room_id: RoomId, subscriber: &Subscriber) {
    let message = "reader fell behind; resubscribe from log_index";
    let notice = error_frame_with(
        room_id,
        0,
        ErrorCode::ResyncRequired,
        message,
        None,
        Some(subscriber.next_log_index),
        None,
    );
    subscriber.outbox.notice(notice);
}

/// What executing effects touches besides the room.
struct EffectContext<'a> {
    online: &'a Mutex<HashMap<SenderId, Vec<Arc<Outbox>>>>,
    store: &'a Arc<dyn Store>,
    memberships: &'a Memberships,
    metrics: &'a Metrics,
    background: &'a mut tokio::task::JoinSet<()>,
    push: Option<&'a PushQueue>,
}

fn apply_effects<G: PersistentGroup>(
    room_id: RoomId,
    room: &mut Room<G>,
    effects: &mut Vec<Effect>,
    context: &mut EffectContext<'_>,
) {
    // The sequencer acknowledges a frame right before fanning it out; the
    // submitting connection gets the acknowledgement instead of an echo, and
    // the fan-out reuses the encoding made for storage.
    let mut acknowledged: Option<(u64, Option<ConnectionId>, Bytes)> = None;
    for effect in effects.drain(..) {
        match effect {
            Effect::Acknowledge { log_index, epoch, server_time_ms, request_id, .. } => {
                let waiting = pop_waiting(room, log_index);
                let outbox = waiting.outbox;
                acknowledged = Some((log_index, outbox.as_ref().map(|o| o.connection()), waiting.encoded));
                if let Some(outbox) = outbox {
                    let ack =
                        server_frame(room_id, request_id, &payload::Ack { log_index, epoch, server_time_ms });
                    Shard::<G>::reply(&outbox, ack);
                }
                context.metrics.ack();
            }
            Effect::FanOut { frame, .. } => {
                let log_index = frame.header().log_index();
                if frame.opcode() == Opcode::Commit || frame.opcode() == Opcode::ExternalJoin {
                    room.commits_since_snapshot += 1;
                }
                if frame.header().sender_id() == SERVER_SENDER_ID {
                    room.snapshot_due = true;
                }
                if let Some(push) = context.push {
                    offer_pushes(push, room_id, room, &frame, context.online);
                }
                let (submitter, bytes) = match acknowledged.take() {
                    Some((acked, connection, encoded)) if acked == log_index => (connection, encoded),
                    _ => (None, frame.to_bytes()),
                };
                if room.recent.len() == RECENT_FRAMES_PER_ROOM_MAX {
                    room.recent.pop_front();
                }
                room.recent.push_back((log_index, bytes.clone()));
                let mut lagging = Vec::new();
                for subscriber in room.subscribers.iter_mut().filter(|s| s.live) {
                    if Some(subscriber.outbox.connection()) == submitter {
                        subscriber.next_log_index = log_index + 1;
                        continue;
                    }
                    debug_assert_eq!(
                        subscriber.next_log_index, log_index,
                        "live subscribers see every index"
                    );
                    if subscriber.outbox.try_send(bytes.clone()) {
                        subscriber.next_log_index = log_index + 1;
                    } else {
                        lagged(room_id, subscriber);
                        lagging.push(subscriber.outbox.connection());
                    }
                }
                if !lagging.is_empty() {
                    drop_subscribers(&mut room.subscribers, |s| lagging.contains(&s.outbox.connection()));
                }
            }
            Effect::Reject { request_id, error, .. } => {
                context.metrics.rejected(error.error_code());
                let waiting = room.waiting.pop_front().and_then(|waiting| waiting.outbox);
                if let Some(outbox) = waiting {
                    Shard::<G>::reply(&outbox, rejection_frame(room_id, request_id, &error));
                }
            }
            Effect::MembershipChanged { added, removed } => {
                count_memberships(context.memberships, &added, &removed);
                drop_subscribers(&mut room.subscribers, |s| removed.contains(&s.outbox.sender()));
            }
            Effect::DeliverWelcome { recipients, .. } => {
                // Stored already (see `persisted`); hand them to recipients online now.
                let online: Vec<Arc<Outbox>> = {
                    let online = context.online.lock().expect("online lock");
                    recipients.iter().filter_map(|r| online.get(r)).flatten().cloned().collect()
                };
                let store = Arc::clone(context.store);
                context.background.spawn(async move {
                    for outbox in online {
                        deliver_pending_welcomes(Arc::clone(&store), outbox).await;
                    }
                });
            }
        }
    }
}

/// Offers the frame's push payload, if it has one, for every member without
/// an authenticated connection (the sender excepted).
fn offer_pushes<G: PersistentGroup>(
    push: &PushQueue,
    room_id: RoomId,
    room: &Room<G>,
    frame: &Frame,
    online: &Mutex<HashMap<SenderId, Vec<Arc<Outbox>>>>,
) {
    if frame.opcode() != Opcode::Application {
        return;
    }
    let Ok(payload::Application { push: Some(payload), .. }) = frame.decode_payload::<payload::Application>()
    else {
        return;
    };
    let sender = frame.header().sender_id();
    let offline: Vec<SenderId> = {
        let online = online.lock().expect("online lock");
        room.sequencer
            .group()
            .members()
            .into_iter()
            .filter(|m| *m != sender && !online.contains_key(m))
            .collect()
    };
    for recipient in offline {
        let notification = PushNotification {
            recipient,
            room_id,
            log_index: frame.header().log_index(),
            payload: payload.clone(),
        };
        if !push.offer(notification) {
            tracing::warn!(%room_id, recipient = recipient.0, "push queue full; notification dropped");
        }
    }
}

/// Builds the `Welcome` frame stored for, and sent to, a commit's
/// recipients. Its header carries the log index of the commit that made
/// it, so that the joiner subscribes from the next index: nothing before
/// it belongs to the epoch it joins, and nothing after it is skipped.
pub fn welcome_frame(room_id: RoomId, welcome: &Bytes, ratchet_tree: &Bytes, log_index: u64) -> Bytes {
    let payload = payload::Welcome {
        welcome: welcome.to_vec(),
        ratchet_tree: (!ratchet_tree.is_empty()).then(|| ratchet_tree.to_vec()),
    };
    let mut header = FrameHeaderBuf::new(payload::Welcome::OPCODE);
    header.set_room_id(room_id).set_log_index(log_index);
    Frame::with_payload(header, &payload).expect("server payloads fit their opcode").to_bytes()
}

/// Stores a Welcome for every recipient in one durable transaction. A
/// recipient whose queue is full (a flooded mailbox) does not cost the
/// others theirs: they are then stored one by one, and the full one skipped.
async fn store_welcomes(store: Arc<dyn Store>, recipients: &[SenderId], frame: Bytes) -> Result<(), String> {
    let ids: Vec<u64> = recipients.iter().map(|r| r.0).collect();
    let result = tokio::task::spawn_blocking(move || match store.put_welcomes(&ids, frame.clone()) {
        Err(crate::store::WelcomeError::TooMany { .. }) => {
            for id in ids {
                match store.put_welcome(id, frame.clone()) {
                    Ok(_) => {}
                    Err(crate::store::WelcomeError::TooMany { .. }) => {
                        tracing::warn!(
                            recipient = id,
                            "Welcome queue full; the Welcome is dropped for this recipient"
                        );
                    }
                    Err(error) => return Err(error.to_string()),
                }
            }
            Ok(())
        }
        other => other.map(|_| ()).map_err(|error| error.to_string()),
    })
    .await;
    result.map_err(|error| error.to_string())?
}

/// Removes and returns the frame waiting on `log_index`.
fn pop_waiting<G: PersistentGroup>(room: &mut Room<G>, log_index: u64) -> Waiting {
    let waiting = room.waiting.pop_front().expect("every acknowledged frame was waiting");
    assert_eq!(waiting.log_index, log_index, "acknowledgements follow log order");
    waiting
}

fn maybe_snapshot<G: PersistentGroup>(
    room_id: RoomId,
    room: &mut Room<G>,
    store: &Arc<dyn Store>,
    background: &mut tokio::task::JoinSet<()>,
) {
    let due = room.commits_since_snapshot >= COMMITS_PER_SNAPSHOT || room.snapshot_due;
    if !due || room.sequencer.in_flight() > 0 {
        return;
    }
    room.commits_since_snapshot = 0;
    room.snapshot_due = false;
    let group = match room.sequencer.group().snapshot() {
        Ok(snapshot) => snapshot,
        Err(error) => {
            tracing::warn!(%room_id, %error, "could not snapshot MLS state");
            return;
        }
    };
    let group_info = room.sequencer.group_info().cloned().unwrap_or_default();
    let metadata = RoomMetadata {
        creator_user_id: room.creator.0,
        created_at_ms: room.created_at_ms,
        mls_snapshot: RoomSnapshot {
            group: &group,
            epoch_started_at_log_index: room.sequencer.epoch_started_at_log_index(),
            group_info,
            server_proposals: room.sequencer.pending_server_proposals(),
        }
        .encode(),
        mls_snapshot_log_index: room.sequencer.next_log_index(),
    };
    let store = Arc::clone(store);
    background.spawn_blocking(move || {
        if let Err(error) = store.put_room_metadata(room_id, &metadata) {
            tracing::warn!(%room_id, %error, "could not store MLS snapshot");
        }
    });
}

/// What a room snapshot holds besides the log: the MLS group state, the
/// GroupInfo current with it, where the current epoch began, and the
/// server-issued proposals pending at that point.
///
/// Layout: `"KRS2" | group_len: u32 BE | group | epoch_started_at_log_index:
/// u64 BE | pending_count: u16 BE | (ref_len: u8 | ref) * pending_count |
/// pending_since_log_index: u64 BE | pending_since_ms: u64 BE |
/// group_info_epoch: u64 BE | group_info`. Snapshots written before
/// pending proposals were kept lack the magic and the pending part (and
/// hold none).
#[derive(Debug, PartialEq, Eq)]
struct RoomSnapshot<'a> {
    group: &'a [u8],
    epoch_started_at_log_index: u64,
    group_info: (u64, Bytes),
    server_proposals: PendingServerProposals,
}

const ROOM_SNAPSHOT_MAGIC: &[u8; 4] = b"KRS2";
// The snapshot counts pending server proposals in a u16.
const _: () = assert!(crate::sequencer::SERVER_PROPOSALS_PENDING_MAX <= u16::MAX as usize);

impl<'a> RoomSnapshot<'a> {
    fn encode(&self) -> Bytes {
        let refs = &self.server_proposals.refs;
        let mut out = Vec::with_capacity(
            4 + 4
                + self.group.len()
                + 8
                + 2
                + refs.iter().map(|r| 1 + r.0.len()).sum::<usize>()
                + 32
                + self.group_info.1.len(),
        );
        out.extend_from_slice(ROOM_SNAPSHOT_MAGIC);
        out.extend_from_slice(
            &u32::try_from(self.group.len()).expect("snapshots are far below 4 GiB").to_be_bytes(),
        );
        out.extend_from_slice(self.group);
        out.extend_from_slice(&self.epoch_started_at_log_index.to_be_bytes());
        let count = u16::try_from(refs.len()).expect("server proposals pending are bounded below 65,536");
        out.extend_from_slice(&count.to_be_bytes());
        for reference in refs {
            out.push(u8::try_from(reference.0.len()).expect("a proposal reference is a hash"));
            out.extend_from_slice(&reference.0);
        }
        let (since_log_index, since_ms) = self.server_proposals.since.unwrap_or((u64::MAX, u64::MAX));
        out.extend_from_slice(&since_log_index.to_be_bytes());
        out.extend_from_slice(&since_ms.to_be_bytes());
        out.extend_from_slice(&self.group_info.0.to_be_bytes());
        out.extend_from_slice(&self.group_info.1);
        Bytes::from(out)
    }

    /// The parts of an encoded snapshot, or `None` if it is malformed.
    fn decode(snapshot: &'a [u8]) -> Option<RoomSnapshot<'a>> {
        let (current, snapshot) = match snapshot.strip_prefix(ROOM_SNAPSHOT_MAGIC) {
            Some(rest) => (true, rest),
            None => (false, snapshot),
        };
        let (len, rest) = snapshot.split_first_chunk::<4>()?;
        let len = usize::try_from(u32::from_be_bytes(*len)).ok()?;
        if rest.len() < len {
            return None;
        }
        let (group, rest) = rest.split_at(len);
        let (epoch_started, mut rest) = rest.split_first_chunk::<8>()?;
        let mut server_proposals = PendingServerProposals::default();
        if current {
            let (count, mut pending) = rest.split_first_chunk::<2>()?;
            for _ in 0..u16::from_be_bytes(*count) {
                let (len, tail) = pending.split_first()?;
                if tail.len() < usize::from(*len) {
                    return None;
                }
                let (reference, tail) = tail.split_at(usize::from(*len));
                server_proposals.refs.push(ProposalRef(reference.to_vec()));
                pending = tail;
            }
            let (since_log_index, tail) = pending.split_first_chunk::<8>()?;
            let (since_ms, tail) = tail.split_first_chunk::<8>()?;
            if !server_proposals.refs.is_empty() {
                server_proposals.since =
                    Some((u64::from_be_bytes(*since_log_index), u64::from_be_bytes(*since_ms)));
            }
            rest = tail;
        }
        let (epoch, group_info) = rest.split_first_chunk::<8>()?;
        Some(RoomSnapshot {
            group,
            epoch_started_at_log_index: u64::from_be_bytes(*epoch_started),
            group_info: (u64::from_be_bytes(*epoch), Bytes::copy_from_slice(group_info)),
            server_proposals,
        })
    }
}

/// What history sends for a stored entry: its frame, or for an erased
/// entry a typed placeholder at its index.
pub fn history_bytes(room_id: RoomId, entry: StoredEntry) -> Bytes {
    match entry.content {
        EntryContent::Frame(frame) => frame,
        EntryContent::Erased(erasure) => {
            crate::erasure::erased_placeholder(room_id, entry.log_index, &erasure)
        }
    }
}

/// Replaces the recent frames at `log_indices` by their erasure
/// placeholders.
fn hide_erased(room_id: RoomId, recent: &mut VecDeque<(u64, Bytes)>, log_indices: &[u64]) {
    for (index, bytes) in recent.iter_mut().filter(|(index, _)| log_indices.contains(index)) {
        *bytes = crate::erasure::placeholder_for_frame(room_id, *index, bytes);
    }
}

/// Streams stored frames of one room to one connection.
struct HistoryReader {
    store: Arc<dyn Store>,
    room_id: RoomId,
    outbox: Arc<Outbox>,
    request_id: u32,
    /// The live subscription being caught up (0 for a one-shot range).
    subscription: u64,
    /// Stop sending once set (the subscription ended or was replaced).
    cancelled: Arc<AtomicBool>,
}

impl HistoryReader {
    /// Sends `[from, through)`; then reports to the shard (live subscription)
    /// or sends `SyncDone` (one-shot range).
    async fn send_range(self, from: u64, through: u64, shard: Option<mpsc::Sender<Command>>) {
        let mut next = from;
        while next < through {
            let (store, room_id) = (Arc::clone(&self.store), self.room_id);
            let count = usize::try_from(through - next).unwrap_or(usize::MAX).min(HISTORY_READ_FRAMES_MAX);
            let read = tokio::task::spawn_blocking(move || store.read_range(room_id, next, count)).await;
            let entries = match read {
                Ok(Ok(entries)) if !entries.is_empty() => entries,
                _ => {
                    self.outbox.notice(error_frame(
                        self.room_id,
                        self.request_id,
                        ErrorCode::StorageUnavailable,
                        "history read failed",
                    ));
                    return;
                }
            };
            for entry in entries {
                assert_eq!(entry.log_index, next, "history is dense");
                let bytes = history_bytes(self.room_id, entry);
                if self.cancelled.load(Ordering::Acquire) || !self.outbox.send(bytes).await {
                    return;
                }
                next += 1;
                if next >= through {
                    break;
                }
            }
        }
        match shard {
            Some(shard) => {
                let _ = shard
                    .send(Command::CaughtUp {
                        room_id: self.room_id,
                        subscription: self.subscription,
                        next_log_index: next,
                    })
                    .await;
            }
            None => {
                let done = server_frame(
                    self.room_id,
                    self.request_id,
                    &payload::SyncDone { next_log_index: next, live: false },
                );
                let _ = self.outbox.send(done).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_snapshots_carry_pending_server_proposals() {
        let snapshot = RoomSnapshot {
            group: b"group state",
            epoch_started_at_log_index: 7,
            group_info: (3, Bytes::from_static(b"group info")),
            server_proposals: PendingServerProposals {
                refs: vec![ProposalRef(vec![1; 32]), ProposalRef(vec![2; 32])],
                since: Some((9, 1_234)),
            },
        };
        let encoded = snapshot.encode();
        assert_eq!(RoomSnapshot::decode(&encoded), Some(snapshot));
        let none = RoomSnapshot {
            group: b"g",
            epoch_started_at_log_index: 0,
            group_info: (0, Bytes::new()),
            server_proposals: PendingServerProposals::default(),
        };
        assert_eq!(RoomSnapshot::decode(&none.encode()), Some(none));
        for cut in [5, 20, encoded.len() - 20] {
            let truncated = &encoded[..cut];
            assert!(RoomSnapshot::decode(truncated).is_none_or(|decoded| decoded.group_info.1.len() < 10));
        }
    }

    #[test]
    fn snapshots_without_pending_proposals_still_decode() {
        // The layout before pending proposals were kept.
        let mut legacy = Vec::new();
        legacy.extend_from_slice(&5u32.to_be_bytes());
        legacy.extend_from_slice(b"group");
        legacy.extend_from_slice(&4u64.to_be_bytes());
        legacy.extend_from_slice(&2u64.to_be_bytes());
        legacy.extend_from_slice(b"info");
        let decoded = RoomSnapshot::decode(&legacy).unwrap();
        assert_eq!(decoded.group, b"group");
        assert_eq!(decoded.epoch_started_at_log_index, 4);
        assert_eq!(decoded.group_info, (2, Bytes::from_static(b"info")));
        assert_eq!(decoded.server_proposals, PendingServerProposals::default());
    }

    /// A joiner learns from the Welcome's header where the epoch it joins
    /// begins; without it, it cannot know which index to subscribe from.
    #[test]
    fn welcome_frames_carry_the_log_index_of_their_commit() {
        let room_id = RoomId([3; 16]);
        let bytes = welcome_frame(room_id, &Bytes::from_static(b"welcome"), &Bytes::from_static(b"tree"), 7);
        let frame = Frame::decode(&bytes).unwrap();
        assert_eq!(frame.opcode(), Opcode::Welcome);
        assert_eq!(frame.header().room_id(), room_id);
        assert_eq!(frame.header().log_index(), 7);
        let payload: payload::Welcome = frame.decode_payload().unwrap();
        assert_eq!(payload.welcome, b"welcome");
        assert_eq!(payload.ratchet_tree.as_deref(), Some(&b"tree"[..]));
    }
}
