//! The tokio driver of the room core: shards of rooms, each one task that
//! feeds its pure [`Shard`] and carries out what it asks for.
//!
//! Rooms are spread over the shards by room id. Each task takes commands
//! from connections and hands them to its shard with the time; stores each
//! batch's Welcomes, then hands the batch the shard sequenced to the
//! group-commit writer; when a batch is durable, reports it (the shard
//! acknowledges and fans out); and runs the shard's other outputs — history readers,
//! Welcome delivery, snapshots, pushes, moderation writes. Tickets complete
//! in submission order (one writer thread), so a task waits only on the
//! oldest.
//!
//! Storage failure is not retried in-process: every in-flight frame is
//! rejected, the node reports itself failed, and the process exits so that
//! recovery from durable state (snapshot plus log replay) happens on restart.

pub mod erasure;
mod history;
mod moderation;
pub mod push;
mod recovery;
mod welcomes;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use kalandra_proto::chain::SignedLogHead;
use kalandra_proto::{Frame, RoomId, SenderId};
use tokio::sync::{mpsc, oneshot};

pub use self::history::{history_bytes, send_history};
use self::moderation::ModerationDesk;
pub use self::moderation::ModerationReply;
pub use self::recovery::{recover_room_state, recover_rooms, RecoveryError};
pub use self::welcomes::{deliver_pending_welcomes_with, welcome_standing, WelcomeSource, WelcomeStanding};
use crate::admin::metrics::Metrics;
use crate::node::push::{PushNotification, PushQueue};
use crate::room::limits::*;
use crate::room::mls_state::ServerSigner;
use crate::room::sequencer::PersistentGroup;
pub use crate::room::{
    error_frame, ConnectionId, ModerationDone, ModerationFailure, ModerationRequest, RecoveredRoom, RoomInfo,
    RoomSummary, Standing, MODERATION_TICK_MS, ROOMS_LIST_MAX,
};
use crate::room::{
    AppendBatch, HeadCheck, HeadCheckError, HistoryRead, Memberships, Output, ReplicaError, RoomRequest,
    Shard, ShardConfig, WelcomeToStore,
};
use crate::store::group_commit::{AppendTicket, GroupCommit};
use crate::store::{PendingWelcome, Store, StoredEntry};
pub use crate::transport::outbox::{Outbox, OutboxReceiver, Outgoing};

/// A request to a room shard.
pub enum Command {
    /// A connection's request to a room.
    Room {
        /// The asking connection.
        outbox: Arc<Outbox>,
        /// What it asks.
        request: RoomRequest,
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
    /// On what standing `member` may redact in the room now: a moderator
    /// (a current member, not banned, no removal pending, holding the admin
    /// or moderator role), a member, or neither.
    RedactStanding {
        /// The room.
        room_id: RoomId,
        /// The member asking.
        member: SenderId,
        /// The answer (`None`: no such room).
        reply: oneshot::Sender<Option<Standing>>,
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
    /// Entries of the room this server orders were erased durably (and
    /// journaled): its replica feeds are told.
    ErasureDurable {
        /// The room.
        room_id: RoomId,
        /// The entries erased.
        log_indices: Vec<u64>,
    },
    /// Frames of a room another domain orders, as it sequenced them, for
    /// its replica here.
    Replicated {
        /// The frames, of one room, in order.
        frames: Vec<Frame>,
        /// Whether the replica took them (it may hold some already).
        reply: oneshot::Sender<Result<(), ReplicaError>>,
    },
    /// The next index the replica of a room expects, and the first not
    /// yet durable there (`None`: no replica).
    ReplicaNext {
        /// The room.
        room_id: RoomId,
        /// The answer.
        reply: oneshot::Sender<Option<(u64, u64)>>,
    },
    /// Check a head the authority of a room signed against its replica here.
    CheckReplicaHead {
        /// The room.
        room_id: RoomId,
        /// The head.
        signed: SignedLogHead,
        /// The outcome (`None`: no replica of it here).
        reply: oneshot::Sender<Option<Result<HeadCheck, HeadCheckError>>>,
    },
    /// Stop: flush, wait for storage, reply.
    Shutdown {
        /// Replies once everything accepted is durable and acknowledged.
        done: oneshot::Sender<()>,
    },
    /// Panics the shard task (tests of the watchdog).
    #[cfg(test)]
    Panic,
}

/// The rooms other domains order, as far as the node needs them: their
/// Welcomes are held here for this server's users, and delivered at once.
pub trait RemoteRoomSet: Send + Sync {
    /// Whether another domain orders `room_id`.
    fn is_remote(&self, room_id: RoomId) -> bool;
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
    /// The rooms other domains order: their stored Welcomes are delivered
    /// at once (their commits are in the authority's log, not here).
    pub remote_rooms: Arc<dyn RemoteRoomSet>,
    /// Where the recipients of each durable commit's Welcome are sent to be
    /// routed to other domains; `None` routes none.
    pub welcome_routing: Option<mpsc::Sender<Vec<SenderId>>>,
}

/// Reports from the room core to the process.
#[derive(Debug, Default)]
pub struct NodeHealth {
    failed: AtomicBool,
    /// A shard task panicked (besides `failed`, which it sets too).
    shard_panicked: AtomicBool,
}

impl NodeHealth {
    /// Whether the room core failed (storage failed, or a shard task
    /// panicked and its rooms are gone): the process must exit non-zero and
    /// recover on restart, and is not ready meanwhile.
    pub fn has_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Whether the failure is a shard task that panicked.
    pub fn shard_panicked(&self) -> bool {
        self.shard_panicked.load(Ordering::Acquire)
    }

    fn fail(&self) {
        self.failed.store(true, Ordering::Release);
    }

    fn fail_shard(&self) {
        self.shard_panicked.store(true, Ordering::Release);
        self.fail();
    }
}

/// Waits for shard `index`'s task: should it panic, its rooms stop
/// answering while the process would look healthy, so the node is marked
/// failed (the process exits non-zero, as after a storage failure, and
/// recovers every room from storage on restart).
async fn watch_shard(index: usize, task: tokio::task::JoinHandle<()>, health: Arc<NodeHealth>) {
    if let Err(error) = task.await {
        if error.is_panic() {
            tracing::error!(shard = index, "a shard task panicked; the node stops and recovers on restart");
            health.fail_shard();
        }
    }
}

/// Source of the current time for the room core (ms since the Unix epoch).
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// Authenticated connections by identity, for Welcome delivery and pushes.
type Online = Arc<Mutex<HashMap<SenderId, Vec<Arc<Outbox>>>>>;

/// Handle to the room core.
#[derive(Clone)]
pub struct Node {
    shards: Arc<Vec<mpsc::Sender<Command>>>,
    online: Online,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) health: Arc<NodeHealth>,
    /// The moderation writer; it ends once every shard has stopped.
    writer_task: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
    pub(crate) clock: Clock,
    remote_rooms: Arc<dyn RemoteRoomSet>,
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
        let rooms = tokio::task::spawn_blocking(move || recovery::recover_rooms::<G>(recovering.as_ref()))
            .await
            .map_err(|error| RecoveryError::Storage(error.to_string()))??;
        let mut per_shard: Vec<Vec<RecoveredRoom<G>>> = (0..shard_count).map(|_| Vec::new()).collect();
        for room in rooms {
            per_shard[shard_of(room.sequencer.room_id(), shard_count)].push(room);
        }
        let health = Arc::new(NodeHealth::default());
        let online: Online = Arc::new(Mutex::new(HashMap::new()));
        let memberships: Memberships = Arc::new(Mutex::new(HashMap::new()));
        let config = ShardConfig {
            rooms_per_user_max: limits.rooms_per_user_max,
            server_signer: Arc::clone(&limits.server_signer),
        };
        let (moderation_writer, writer_task) =
            moderation::start_writer(Arc::clone(&store), Arc::clone(&health));
        let mut shards = Vec::with_capacity(shard_count);
        for (index, rooms) in per_shard.into_iter().enumerate() {
            let (sender, receiver) = mpsc::channel(SHARD_INBOX_COMMANDS_MAX);
            let task = ShardTask {
                shard: Shard::new(config.clone(), Arc::clone(&memberships), rooms),
                store: Arc::clone(&store),
                group_commit: group_commit.clone(),
                inbox: sender.clone(),
                tickets: VecDeque::new(),
                health: Arc::clone(&health),
                online: Arc::clone(&online),
                push: limits.push.clone(),
                moderation: ModerationDesk::new(moderation_writer.clone()),
                clock: Arc::clone(&clock),
                metrics: metrics.clone(),
                background: tokio::task::JoinSet::new(),
                remote_rooms: Arc::clone(&limits.remote_rooms),
                welcome_routing: limits.welcome_routing.clone(),
            };
            let running = tokio::spawn(task.run(receiver));
            tokio::spawn(watch_shard(index, running, Arc::clone(&health)));
            shards.push(sender);
        }
        drop(moderation_writer);
        let writer_task = Arc::new(Mutex::new(Some(writer_task)));
        let remote_rooms = limits.remote_rooms;
        Ok(Node { shards: Arc::new(shards), online, store, health, writer_task, clock, remote_rooms })
    }

    /// Sends a command to the shard that owns `room_id`. `false` if the node stopped.
    pub async fn send(&self, room_id: RoomId, command: Command) -> bool {
        if let Command::Room { outbox, request } = &command {
            if let Some(room_id) = welcomes_used_by(request, outbox) {
                forget_used_welcomes(Arc::clone(&self.store), outbox.sender(), room_id);
            }
        }
        self.shards[shard_of(room_id, self.shards.len())].send(command).await.is_ok()
    }

    /// The connection reads `room_id`, a room of another domain: its
    /// Welcomes for the room are used, as when it reads a room here.
    pub(crate) fn room_read_remotely(&self, outbox: &Outbox, room_id: RoomId) {
        if outbox.welcomes_delivered() {
            forget_used_welcomes(Arc::clone(&self.store), outbox.sender(), room_id);
        }
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
        let source = StoreWelcomes(Arc::clone(&self.store), Arc::clone(&self.remote_rooms));
        deliver_pending_welcomes(source, Arc::clone(outbox)).await;
    }

    /// Hands their pending Welcomes to those of `recipients` who are
    /// connected (Welcomes of a remote room just stored for them).
    pub async fn deliver_welcomes_to(&self, recipients: &[SenderId]) {
        let online = online_of(&self.online, recipients);
        for outbox in online {
            let source = StoreWelcomes(Arc::clone(&self.store), Arc::clone(&self.remote_rooms));
            deliver_pending_welcomes(source, outbox).await;
        }
    }

    /// Marks the node failed after a storage failure outside the shards: the
    /// process exits and recovers on restart.
    pub(crate) fn storage_failed(&self) {
        self.health.fail();
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

    /// Takes frames `room_id`'s authority sequenced into its replica here.
    pub async fn replicate(&self, room_id: RoomId, frames: Vec<Frame>) -> Result<(), ReplicaError> {
        let (reply, answer) = oneshot::channel();
        if !self.send(room_id, Command::Replicated { frames, reply }).await {
            return Err(ReplicaError::Stopped);
        }
        answer.await.unwrap_or(Err(ReplicaError::Stopped))
    }

    /// Checks a head `room_id`'s authority signed against the replica here.
    pub async fn check_replica_head(
        &self,
        room_id: RoomId,
        signed: SignedLogHead,
    ) -> Option<Result<HeadCheck, HeadCheckError>> {
        let (reply, answer) = oneshot::channel();
        if !self.send(room_id, Command::CheckReplicaHead { room_id, signed, reply }).await {
            return None;
        }
        answer.await.ok().flatten()
    }

    /// The next index the replica of `room_id` expects, and the first not
    /// yet durable there (`None`: no replica of it here).
    pub async fn replica_position(&self, room_id: RoomId) -> Option<(u64, u64)> {
        let (reply, answer) = oneshot::channel();
        if !self.send(room_id, Command::ReplicaNext { room_id, reply }).await {
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

/// Hands the recipient's pending Welcomes to its connection (see
/// [`deliver_pending_welcomes_with`]), reading the store on blocking
/// threads.
async fn deliver_pending_welcomes(mut source: StoreWelcomes, outbox: Arc<Outbox>) {
    deliver_pending_welcomes_with(&outbox, &mut source).await;
}

/// The connections of those of `recipients` who are connected.
fn online_of(online: &Online, recipients: &[SenderId]) -> Vec<Arc<Outbox>> {
    let online = online.lock().expect("online lock");
    recipients.iter().filter_map(|r| online.get(r)).flatten().cloned().collect()
}

/// The node's [`WelcomeSource`]: the store, on blocking threads, and the
/// rooms other domains order.
struct StoreWelcomes(Arc<dyn Store>, Arc<dyn RemoteRoomSet>);

impl WelcomeSource for StoreWelcomes {
    async fn page(&mut self, recipient: u64, after: Option<u64>) -> Result<Vec<PendingWelcome>, String> {
        let store = Arc::clone(&self.0);
        tokio::task::spawn_blocking(move || store.pending_welcomes(recipient, after))
            .await
            .map_err(|error| error.to_string())?
            .map_err(|error| error.to_string())
    }

    async fn entry(&mut self, room_id: RoomId, log_index: u64) -> Result<Option<StoredEntry>, String> {
        let store = Arc::clone(&self.0);
        let entries = tokio::task::spawn_blocking(move || store.read_range(room_id, log_index, 1))
            .await
            .map_err(|error| error.to_string())?
            .map_err(|error| error.to_string())?;
        Ok(entries.into_iter().next())
    }

    fn remote_room(&self, room_id: RoomId) -> bool {
        self.1.is_remote(room_id)
    }

    async fn forget(&mut self, recipient: u64, welcome_id: u64) {
        let store = Arc::clone(&self.0);
        let deleted =
            tokio::task::spawn_blocking(move || store.delete_welcomes(recipient, &[welcome_id])).await;
        if !matches!(deleted, Ok(Ok(_))) {
            tracing::warn!(recipient, welcome_id, "could not forget an orphaned welcome");
        }
    }
}

/// The room whose stored Welcomes `request` lets go: a recipient that was
/// handed its Welcomes and now reads a room (subscribe or sync) has used
/// its Welcome for it.
pub fn welcomes_used_by(request: &RoomRequest, outbox: &Outbox) -> Option<RoomId> {
    (request.reads_room() && outbox.welcomes_delivered()).then(|| request.room_id())
}

/// The recipient reads `room_id`: delete its Welcomes for the room.
fn forget_used_welcomes(store: Arc<dyn Store>, recipient: SenderId, room_id: RoomId) {
    tokio::task::spawn_blocking(move || forget_welcomes_for_room(store.as_ref(), recipient, room_id));
}

/// Deletes the recipient's stored Welcomes for `room_id` (blocks on
/// storage; reads the pending list, not the Welcomes).
pub fn forget_welcomes_for_room(store: &dyn Store, recipient: SenderId, room_id: RoomId) {
    if let Err(error) = store.delete_welcomes_for_room(recipient.0, room_id) {
        tracing::warn!(%recipient, %room_id, %error, "could not delete used welcomes");
    }
}

/// Stores a commit's Welcome once for all its recipients, in one durable
/// transaction. A recipient whose queue is full (a flooded mailbox) does
/// not cost the others theirs: it is left out, and logged. Only a storage
/// failure is an error (the node then stops); a Welcome the store refuses
/// as too large (the shard checks its size before sequencing the commit)
/// is logged and dropped, never fatal.
pub fn store_welcome(store: &dyn Store, welcome: &WelcomeToStore) -> Result<(), String> {
    let ids: Vec<u64> = welcome.recipients.iter().map(|r| r.0).collect();
    match store.put_welcomes(welcome.room_id, &ids, welcome.frame.clone()) {
        Ok(stored) => {
            for recipient in stored.full {
                tracing::warn!(recipient, room_id = %welcome.room_id, "Welcome queue full; the Welcome is not stored for this recipient");
            }
            Ok(())
        }
        Err(
            error
            @ (crate::store::WelcomeError::TooLarge { .. } | crate::store::WelcomeError::TooMany { .. }),
        ) => {
            tracing::error!(room_id = %welcome.room_id, %error, "a Welcome was not stored");
            Ok(())
        }
        Err(error) => Err(error.to_string()),
    }
}

/// Stores a batch's Welcomes (on a blocking thread).
async fn store_welcomes(store: Arc<dyn Store>, welcomes: Vec<WelcomeToStore>) -> Result<(), String> {
    if welcomes.is_empty() {
        return Ok(());
    }
    tokio::task::spawn_blocking(move || {
        welcomes.iter().try_for_each(|welcome| store_welcome(store.as_ref(), welcome))
    })
    .await
    .unwrap_or_else(|error| Err(error.to_string()))
    .map_err(|error| format!("storing Welcomes: {error}"))
}

/// A storage request in flight.
struct Ticket {
    batch_id: u64,
    /// The group-commit ticket, or why the batch could not be submitted.
    ticket: Result<AppendTicket, String>,
    entries: usize,
    submitted: std::time::Instant,
}

/// One shard's task: the pure shard and what it needs to act.
struct ShardTask<G: PersistentGroup> {
    shard: Shard<G, Arc<Outbox>>,
    store: Arc<dyn Store>,
    group_commit: GroupCommit,
    /// The shard's own inbox, for history readers reporting back.
    inbox: mpsc::Sender<Command>,
    /// Storage requests in flight, oldest first.
    tickets: VecDeque<Ticket>,
    health: Arc<NodeHealth>,
    online: Online,
    push: Option<PushQueue>,
    moderation: ModerationDesk,
    clock: Clock,
    metrics: Metrics,
    /// Store writes and Welcome deliveries running in the background;
    /// shutdown waits for them.
    background: tokio::task::JoinSet<()>,
    remote_rooms: Arc<dyn RemoteRoomSet>,
    welcome_routing: Option<mpsc::Sender<Vec<SenderId>>>,
}

impl<G: PersistentGroup> ShardTask<G> {
    async fn run(mut self, mut inbox: mpsc::Receiver<Command>) {
        let mut shutdown: Option<oneshot::Sender<()>> = None;
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(MODERATION_TICK_MS));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if shutdown.is_some() && self.tickets.is_empty() && self.shard.is_idle() {
                break;
            }
            let accepting = shutdown.is_none() && self.tickets.len() < TICKETS_IN_FLIGHT_MAX;
            tokio::select! {
                biased;
                result = wait_oldest(&mut self.tickets), if !self.tickets.is_empty() => {
                    let ticket = self.tickets.pop_front().expect("guarded");
                    self.durable(ticket, result).await;
                }
                _ = tick.tick(), if shutdown.is_none() && self.shard.wants_ticks() => {
                    self.shard.handle_tick((self.clock)());
                }
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
            self.carry_out();
            self.flush().await;
            while self.background.try_join_next().is_some() {}
        }
        while self.background.join_next().await.is_some() {}
        if let Some(done) = shutdown {
            let _ = done.send(());
        }
    }

    fn handle(&mut self, command: Command, shutdown: &mut Option<oneshot::Sender<()>>) {
        let now_ms = (self.clock)();
        match command {
            Command::Room { outbox, request } => {
                let started = request.validates_mls().then(std::time::Instant::now);
                self.shard.handle_request(&outbox, request, now_ms);
                if let Some(started) = started {
                    self.metrics.commit_validated(started.elapsed().as_secs_f64());
                }
            }
            Command::ConnectionClosed { connection } => self.shard.handle_connection_closed(connection),
            Command::CaughtUp { room_id, subscription, next_log_index } => {
                self.shard.handle_caught_up(room_id, subscription, next_log_index)
            }
            Command::Moderate { request, reply } => match self.moderation.admit(reply) {
                Some(token) => self.shard.handle_moderate(request, token, now_ms),
                None => {
                    self.metrics.moderation_refused(&request.actor, kalandra_proto::ErrorCode::RateLimited)
                }
            },
            Command::RedactStanding { room_id, member, reply } => {
                let _ = reply.send(self.shard.redact_standing(room_id, member, now_ms));
            }
            Command::RoomInfo { room_id, reply } => {
                let _ = reply.send(self.shard.room_info(room_id));
            }
            Command::Replicated { frames, reply } => {
                let taken = frames.into_iter().try_for_each(|frame| self.shard.handle_replicated(frame));
                let _ = reply.send(taken);
            }
            Command::CheckReplicaHead { room_id, signed, reply } => {
                let _ = reply.send(self.shard.check_replica_head(room_id, &signed));
            }
            Command::ReplicaNext { room_id, reply } => {
                let next = self.shard.replica_next_log_index(room_id);
                let durable = self.shard.replica_durable_next(room_id);
                let _ = reply.send(next.zip(durable));
            }
            Command::ListRooms { after, count_max, reply } => {
                let _ = reply.send(self.shard.list_rooms(after, count_max));
            }
            Command::Erased { room_id, log_indices, done } => {
                self.shard.handle_erased(room_id, &log_indices);
                let _ = done.send(());
            }
            Command::ErasureDurable { room_id, log_indices } => {
                self.shard.handle_erasure_durable(room_id, &log_indices);
            }
            Command::Shutdown { done } => *shutdown = Some(done),
            #[cfg(test)]
            Command::Panic => panic!("a panic planted by a test"),
        }
        // Counted before the next command: a connection that has its reply
        // already sees the count.
        self.record_counters();
    }

    fn record_counters(&mut self) {
        let counters = self.shard.take_counters();
        if counters.acks > 0 {
            self.metrics.acks(counters.acks);
        }
        for code in counters.rejections {
            self.metrics.rejected(code);
        }
        for (actor, code) in counters.moderation_refusals {
            self.metrics.moderation_refused(&actor, code);
        }
    }

    /// Hands what the shard sequenced to the group-commit writer as one
    /// request, its Welcomes stored first: were they stored after it, a
    /// write that fails with an unknown outcome could leave the commit
    /// durable and its Welcome lost. A Welcome stored ahead of its commit
    /// is delivered only once the commit is durable ([`welcomes`]).
    async fn flush(&mut self) {
        let Some(AppendBatch { id, entries, welcomes }) = self.shard.take_batch() else { return };
        let count = entries.len();
        let submitted = std::time::Instant::now();
        let ticket = match store_welcomes(Arc::clone(&self.store), welcomes).await {
            Ok(()) => self.group_commit.submit(entries).await.map_err(|error| error.to_string()),
            Err(error) => Err(error),
        };
        self.tickets.push_back(Ticket { batch_id: id, ticket, entries: count, submitted });
    }

    /// The oldest batch finished: report it to the shard.
    async fn durable(&mut self, ticket: Ticket, result: Result<(), String>) {
        self.metrics.storage_batch(ticket.entries, ticket.submitted.elapsed().as_secs_f64());
        self.shard.handle_durable(ticket.batch_id, result);
    }

    /// Carries out the shard's outputs, in order.
    fn carry_out(&mut self) {
        while let Some(output) = self.shard.poll_output() {
            match output {
                Output::ReadHistory(read) => self.read_history(read),
                Output::DeliverWelcomes { recipients } => self.deliver_welcomes(&recipients),
                Output::Snapshot { room_id, metadata } => {
                    let store = Arc::clone(&self.store);
                    self.background.spawn_blocking(move || {
                        if let Err(error) = store.put_room_metadata(room_id, &metadata) {
                            tracing::warn!(%room_id, %error, "could not store MLS snapshot");
                        }
                    });
                }
                Output::Push { room_id, log_index, sender, members, payload } => {
                    self.offer_pushes(room_id, log_index, sender, &members, &payload)
                }
                Output::RecordModeration(write) => self.moderation.write(write),
                Output::ModerationRefused { token, failure } => self.moderation.refused(token, failure),
                Output::StorageFailed { .. } => self.health.fail(),
            }
        }
        self.record_counters();
    }

    fn read_history(&mut self, read: HistoryRead<Arc<Outbox>>) {
        let store = Arc::clone(&self.store);
        let inbox = self.inbox.clone();
        tokio::spawn(async move {
            let room_id = read.room_id;
            let reached = send_history(&read, &read.peer, |from, count| {
                let store = Arc::clone(&store);
                async move {
                    tokio::task::spawn_blocking(move || store.read_range(room_id, from, count))
                        .await
                        .map_err(|error| error.to_string())?
                        .map_err(|error| error.to_string())
                }
            })
            .await;
            if let Some(next_log_index) = reached {
                let subscription = read.subscription;
                let _ = inbox.send(Command::CaughtUp { room_id, subscription, next_log_index }).await;
            }
        });
    }

    /// Delivers a durable commit's Welcome to its connected recipients and
    /// hands the recipients to the router (those of other domains are
    /// routed to their home; a full queue leaves them to its retry).
    fn deliver_welcomes(&mut self, recipients: &[SenderId]) {
        if let Some(routing) = &self.welcome_routing {
            if routing.try_send(recipients.to_vec()).is_err() {
                tracing::debug!("Welcome routing queue full; the periodic retry routes them");
            }
        }
        let online = online_of(&self.online, recipients);
        let (store, rooms) = (Arc::clone(&self.store), Arc::clone(&self.remote_rooms));
        self.background.spawn(async move {
            for outbox in online {
                let source = StoreWelcomes(Arc::clone(&store), Arc::clone(&rooms));
                deliver_pending_welcomes(source, outbox).await;
            }
        });
    }

    /// Offers a push payload for every member without an authenticated
    /// connection (the sender excepted).
    fn offer_pushes(
        &self,
        room_id: RoomId,
        log_index: u64,
        sender: SenderId,
        members: &[SenderId],
        payload: &Bytes,
    ) {
        let Some(push) = &self.push else { return };
        let offline: Vec<SenderId> = {
            let online = self.online.lock().expect("online lock");
            members.iter().copied().filter(|m| *m != sender && !online.contains_key(m)).collect()
        };
        for recipient in offline {
            let notification = PushNotification { recipient, room_id, log_index, payload: payload.clone() };
            if !push.offer(notification) {
                tracing::warn!(%room_id, recipient = recipient.0, "push queue full; notification dropped");
            }
        }
    }
}

/// Waits for the oldest storage request.
async fn wait_oldest(tickets: &mut VecDeque<Ticket>) -> Result<(), String> {
    match &mut tickets.front_mut().expect("guarded").ticket {
        Ok(ticket) => ticket.await.map_err(|error| error.to_string()),
        Err(error) => Err(error.clone()),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::admin::api::AdminApi;
    use crate::admin::api::AdminState;
    use crate::room::room_group::MlsRoomGroup;
    use crate::store::group_commit::GroupCommitConfig;
    use crate::store::MemoryStore;

    /// A shard task that panics used to leave its rooms unanswered while
    /// the process looked healthy; now the node is marked failed, which
    /// turns `/readyz` unready and makes the process exit non-zero (the
    /// path a storage failure takes, `main.rs`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_shard_that_panics_marks_the_node_failed_and_unready() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let group_commit = GroupCommit::start(Arc::clone(&store), GroupCommitConfig::default()).unwrap();
        let metrics = Metrics::new().unwrap();
        let limits = NodeLimits {
            rooms_per_user_max: 10,
            push: None,
            server_signer: Arc::new(ServerSigner::new(ed25519_dalek::SigningKey::from_bytes(&[7; 32]))),
            remote_rooms: Arc::new(crate::federation::rooms::RemoteRooms::default()),
            welcome_routing: None,
        };
        let clock: Clock = Arc::new(|| 1_000);
        let node =
            Node::start::<MlsRoomGroup>(store, group_commit.clone(), 2, clock, metrics.clone(), limits)
                .await
                .unwrap();
        let admin = AdminState::new(metrics, Arc::new(AtomicBool::new(true)));
        admin.set_api(AdminApi::new(node.clone(), "operator-token", None));
        assert!(admin.is_ready() && !node.health().has_failed());

        let (room, neighbour) = (RoomId([0; 16]), RoomId([1; 16]));
        assert_ne!(shard_of(room, 2), shard_of(neighbour, 2));
        assert!(node.send(room, Command::Panic).await);
        tokio::time::timeout(Duration::from_secs(10), async {
            while !node.health().has_failed() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the watchdog reports the panic");
        assert!(node.health().shard_panicked());
        assert!(!admin.is_ready(), "/readyz turns unready");
        // The other shard still answers while the process stops.
        assert!(node.room_info(neighbour).await.is_none());
        tokio::time::timeout(Duration::from_secs(10), node.shutdown()).await.expect("shutdown completes");
        group_commit.shutdown().await.unwrap();
    }
}
