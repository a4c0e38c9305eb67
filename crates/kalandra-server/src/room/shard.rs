//! A shard of rooms, as a pure state machine.
//!
//! [`Shard`] owns its rooms' [`RoomSequencer`]s outright. Inputs come in
//! through `handle_*` calls with the current time; what must happen outside
//! — append a batch, read history, store a snapshot, forward pushes, write
//! a moderation act — comes out as data: [`Shard::take_batch`] and
//! [`Shard::poll_output`]. Replies and fan-out go straight into each
//! connection's bounded queue through the [`Peer`] trait, so that a reader
//! whose queue is full is dropped from fan-out at the exact index it missed.
//!
//! The shard never reads a clock, never blocks, never spawns and never
//! touches a socket or a disk: the tokio node and the simulation drive the
//! same code.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use kalandra_proto::chain::{LogHead, SignedLogHead};
use kalandra_proto::payload::{self, CreateRoom};
use kalandra_proto::{ErrorCode, Frame, Opcode, RoomId, SenderId};

use super::acts::{ActAwaitingProposal, ModerationFailure, ModerationWrite};
use super::frames::{
    error_frame, error_frame_with, rejection_frame, reply_frame, server_frame, welcome_frame,
};
use super::limits::*;
use super::snapshot::RoomSnapshot;
use crate::room::mls_state::ServerSigner;
use crate::room::roles::RoomRoles;
use crate::room::sequencer::{
    Effect, GroupError, PersistentGroup, RoomSequencer, Sequenced, SubmitError, SERVER_SENDER_ID,
};
use crate::store::{LogEntry, RoomMetadata};

/// Why a replica refuses what only its authority may do.
pub(super) const REPLICA_REFUSAL: &str = "the room is ordered by another domain; its frames go there";

/// Identifies one client connection for the life of the process.
pub type ConnectionId = u64;

/// A connection as the room core sees it: a bounded outbound queue that
/// takes frames without waiting.
pub trait Peer: Clone {
    /// The connection's id.
    fn connection(&self) -> ConnectionId;
    /// The identity the connection authenticated as.
    fn sender(&self) -> SenderId;
    /// Queues a fan-out or history frame; `false` if the queue is full.
    fn try_send(&self, frame: Bytes) -> bool;
    /// Queues a reply in the part of the queue kept for replies; `false`
    /// if even that is full.
    fn try_reply(&self, frame: Bytes) -> bool;
    /// Queues a control notice, written after the queued frames (too many
    /// close the connection).
    fn notice(&self, frame: Bytes);
    /// Fan-out or history frames the queue takes right now.
    fn free_capacity(&self) -> usize;
    /// Bytes of fan-out or history the queue takes right now.
    fn free_bytes(&self) -> usize;
    /// The connection's count of one-shot history readers running (shared
    /// by every shard), for [`ReaderSlot`].
    fn sync_readers(&self) -> &Arc<AtomicUsize>;
    /// A peer domain's feed for its replicas: it reads whole rooms (its
    /// server enforces each of its members' reads), never as a member.
    fn reads_everything(&self) -> bool {
        false
    }
}

/// One of a connection's [`SYNC_READERS_PER_CONNECTION_MAX`] one-shot
/// history readers; the slot is free again when this is dropped (the
/// reader finished or was abandoned).
#[derive(Debug)]
pub struct ReaderSlot(Arc<AtomicUsize>);

impl ReaderSlot {
    /// A slot of `readers` if fewer than `max` are taken.
    pub fn try_take(readers: &Arc<AtomicUsize>, max: usize) -> Option<ReaderSlot> {
        readers
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |taken| (taken < max).then_some(taken + 1))
            .ok()
            .map(|_| ReaderSlot(Arc::clone(readers)))
    }
}

impl Drop for ReaderSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How many rooms each user is a member of, shared by the shards of a node
/// so that the per-user room limit holds across them.
pub type Memberships = Arc<Mutex<HashMap<SenderId, u32>>>;

/// Adds and removes memberships from the count.
pub(super) fn count_memberships(memberships: &Memberships, added: &[SenderId], removed: &[SenderId]) {
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

/// Options of a shard.
#[derive(Clone)]
pub struct ShardConfig {
    /// A user who is a member of this many rooms may not create or join
    /// (by external commit) another.
    pub rooms_per_user_max: u32,
    /// The server's key, listed in every room's `external_senders`: it
    /// signs the Remove proposals of kicks and bans.
    pub server_signer: Arc<ServerSigner>,
}

/// A room rebuilt from storage, ready for a shard.
pub struct RecoveredRoom<G: PersistentGroup> {
    /// The sequencer, at the stored head.
    pub sequencer: RoomSequencer<G>,
    /// Who created the room.
    pub creator: SenderId,
    /// When (server clock, ms).
    pub created_at_ms: u64,
    /// The most recent stored frames, within [`super::RecentFrames`]' bounds.
    pub recent: super::RecentFrames,
    /// Who holds a role in the room (the creator is its admin).
    pub roles: RoomRoles,
    /// A replica of a room another domain orders.
    pub replica: bool,
}

/// Entries to make durable in one storage request, then report with
/// [`Shard::handle_durable`].
#[derive(Debug)]
pub struct AppendBatch {
    /// Identifies the batch; batches complete in the order they were taken.
    pub id: u64,
    /// The log entries, in log order per room.
    pub entries: Vec<LogEntry>,
    /// Welcomes of commits in the batch: store them once the entries are
    /// durable and before reporting the batch, so that an acknowledged add
    /// never loses its Welcome.
    pub welcomes: Vec<WelcomeToStore>,
}

/// A commit's Welcome, for each of its recipients.
#[derive(Debug, Clone)]
pub struct WelcomeToStore {
    /// The room.
    pub room_id: RoomId,
    /// Who it is for.
    pub recipients: Vec<SenderId>,
    /// The `Welcome` frame.
    pub frame: Bytes,
}

/// Read stored frames `[from, through)` of a room and send them to `peer`,
/// waiting for room in its queue; then report
/// [`Shard::handle_caught_up`] (a live subscription) or send `SyncDone`
/// (a one-shot range, `subscription == 0`).
pub struct HistoryRead<P> {
    /// The room.
    pub room_id: RoomId,
    /// Where the frames go.
    pub peer: P,
    /// First index to send.
    pub from: u64,
    /// First index not to send.
    pub through: u64,
    /// The request's id (for `SyncDone` and errors).
    pub request_id: u32,
    /// The live subscription being caught up, 0 for a one-shot range.
    pub subscription: u64,
    /// Set when the subscription ends: stop sending.
    pub cancelled: Arc<AtomicBool>,
    /// For a one-shot range, the connection's reader slot it holds until
    /// it is dropped.
    pub slot: Option<ReaderSlot>,
    /// The server's signed head at `through - 1`, when `through` is the
    /// room's durable end: the `SyncDone` of a one-shot range that gets
    /// there carries it.
    pub end_head: Option<SignedLogHead>,
}

/// What the shard asks its driver to do, in order.
pub enum Output<P> {
    /// See [`HistoryRead`].
    ReadHistory(HistoryRead<P>),
    /// Hand these recipients' stored Welcomes to their connections.
    DeliverWelcomes {
        /// Recipients.
        recipients: Vec<SenderId>,
    },
    /// Store the room's MLS snapshot (best effort).
    Snapshot {
        /// The room.
        room_id: RoomId,
        /// What to store.
        metadata: RoomMetadata,
    },
    /// Forward a push payload to the members not connected.
    Push {
        /// The room.
        room_id: RoomId,
        /// The message's log index.
        log_index: u64,
        /// The sender, who gets no push.
        sender: SenderId,
        /// The room's members.
        members: Vec<SenderId>,
        /// The sealed push payload.
        payload: Bytes,
    },
    /// Write a moderation change with its audit record, in this order.
    RecordModeration(ModerationWrite),
    /// A moderation act was refused or failed.
    ModerationRefused {
        /// The act's token (see [`Shard::handle_moderate`]).
        token: u64,
        /// Why.
        failure: ModerationFailure,
    },
    /// Storage failed: the process must stop and recover on restart.
    StorageFailed {
        /// What failed.
        reason: String,
    },
}

/// One connection subscribed to a room.
pub(super) struct Subscriber<P> {
    pub(super) peer: P,
    /// First index this subscriber has not been sent.
    pub(super) next_log_index: u64,
    /// Receiving live fan-out (history is complete).
    pub(super) live: bool,
    /// Identifies this subscription, so that a history reader of an earlier
    /// subscription of the same connection cannot report for this one.
    pub(super) subscription: u64,
    /// Set when the subscription ends: its history reader stops sending.
    cancelled: Arc<AtomicBool>,
    /// The `Subscribe` request's id, which its `SyncDone` answers.
    request_id: u32,
    /// Of a replica: waits for the replica to reach `next_log_index`.
    pub(super) awaiting_replica: bool,
}

/// Removes the subscribers `remove` picks and stops their history readers.
fn drop_subscribers<P>(subscribers: &mut Vec<Subscriber<P>>, mut remove: impl FnMut(&Subscriber<P>) -> bool) {
    subscribers.retain(|subscriber| {
        let removed = remove(subscriber);
        if removed {
            subscriber.cancelled.store(true, Ordering::Release);
        }
        !removed
    });
}

/// One frame between sequencing and durability.
struct Waiting<P> {
    log_index: u64,
    /// `None` once the connection closed.
    peer: Option<P>,
    encoded: Bytes,
}

pub(super) struct Room<G: PersistentGroup, P> {
    pub(super) sequencer: RoomSequencer<G>,
    pub(super) creator: SenderId,
    pub(super) created_at_ms: u64,
    /// Frames waiting for durability, aligned with the sequencer's in-flight
    /// frames: index, the connection to acknowledge, and the frame encoded
    /// once (for storage, and again for fan-out).
    waiting: VecDeque<Waiting<P>>,
    pub(super) subscribers: Vec<Subscriber<P>>,
    /// The most recent durable frames: (log index, encoded frame).
    recent: super::RecentFrames,
    commits_since_snapshot: u32,
    /// A server proposal became durable: snapshot soon, so that a restart
    /// finds the pending proposal in the snapshot too.
    snapshot_due: bool,
    /// Who holds which role.
    pub(super) roles: RoomRoles,
    /// Kicks and bans waiting for their Remove proposal to be durable.
    pub(super) acts_awaiting_proposal: VecDeque<ActAwaitingProposal>,
    /// How far members being removed (or just removed) may still read:
    /// the first index after the latest server proposal while their
    /// removal is pending, after the commit that removed them once it is.
    /// Bounded by [`DEPARTING_READERS_PER_ROOM_MAX`]; not persisted (after
    /// a restart such a member is refused outright).
    pub(super) departing: BTreeMap<SenderId, u64>,
    /// A replica of a room another domain orders: frames come from that
    /// domain (`replica.rs`), none is sequenced here.
    pub(super) replica: bool,
}

impl<G: PersistentGroup, P> Room<G, P> {
    pub(super) fn new(sequencer: RoomSequencer<G>, creator: SenderId, created_at_ms: u64) -> Room<G, P> {
        Room {
            replica: false,
            sequencer,
            creator,
            created_at_ms,
            waiting: VecDeque::new(),
            subscribers: Vec::new(),
            recent: super::RecentFrames::default(),
            commits_since_snapshot: 0,
            snapshot_due: false,
            roles: RoomRoles::new(creator, []),
            acts_awaiting_proposal: VecDeque::new(),
            departing: BTreeMap::new(),
        }
    }

    /// Whether `connection` subscribes here or has a frame waiting to be
    /// acknowledged.
    fn holds_state_of(&self, connection: ConnectionId) -> bool
    where
        P: Peer,
    {
        self.subscribers.iter().any(|s| s.peer.connection() == connection)
            || self.waiting.iter().any(|w| w.peer.as_ref().is_some_and(|p| p.connection() == connection))
    }

    /// `user` may read the room below `read_next` (and no further).
    pub(super) fn note_departing(&mut self, user: SenderId, read_next: u64) {
        if self.departing.len() >= DEPARTING_READERS_PER_ROOM_MAX && !self.departing.contains_key(&user) {
            let oldest = self.departing.iter().min_by_key(|(_, next)| **next).map(|(user, _)| *user);
            if let Some(oldest) = oldest {
                self.departing.remove(&oldest);
            }
        }
        self.departing.insert(user, read_next);
    }

    /// A server proposal was sequenced at `log_index`: members whose removal
    /// is pending may read it (and every pending proposal before it).
    pub(super) fn server_proposal_sequenced(&mut self, target: SenderId, log_index: u64) {
        let pending: Vec<SenderId> =
            self.departing.keys().copied().filter(|user| self.sequencer.is_member(*user)).collect();
        for user in pending {
            self.departing.insert(user, log_index + 1);
        }
        self.note_departing(target, log_index + 1);
    }

    /// First index not yet durable.
    fn durable_next(&self) -> u64 {
        self.sequencer.durable_through().map_or(0, |through| through + 1)
    }

    /// The durable end's head signed by `signer`, if the log ends right
    /// before `next_log_index`.
    fn signed_head_before(
        &self,
        room_id: RoomId,
        next_log_index: u64,
        signer: &ServerSigner,
    ) -> Option<SignedLogHead> {
        // A replica's heads are its authority's to sign.
        if self.replica {
            return None;
        }
        let (last, head) = self.sequencer.durable_log_head()?;
        (last.checked_add(1) == Some(next_log_index)).then(|| sign_head(room_id, last, head, signer))
    }
}

/// The server's signed statement of `room_id`'s head at `log_index`.
fn sign_head(room_id: RoomId, log_index: u64, head: LogHead, signer: &ServerSigner) -> SignedLogHead {
    #[cfg(feature = "injected-bugs")]
    let head = if crate::bugs::planted().sign_wrong_head_for_odd_indices && log_index % 2 == 1 {
        // Injected bug: the head stated for odd indices is not the log's.
        let mut wrong = head;
        wrong[0] ^= 1;
        wrong
    } else {
        head
    };
    SignedLogHead::sign(room_id, log_index, head, signer.signing_key())
}

/// Entries accumulated for the next batch.
#[derive(Default)]
struct PendingBatch {
    entries: Vec<LogEntry>,
    welcomes: Vec<WelcomeToStore>,
    /// Highest index per room in `entries`.
    rooms: Vec<(RoomId, u64)>,
}

/// Counts the driver turns into metrics.
#[derive(Debug, Default)]
pub struct ShardCounters {
    /// Frames acknowledged.
    pub acks: u64,
    /// Requests refused, by code.
    pub rejections: Vec<ErrorCode>,
    /// Moderation acts refused, by who asked and code.
    pub moderation_refusals: Vec<(crate::room::roles::Actor, ErrorCode)>,
}

/// A shard of rooms. See the module documentation.
pub struct Shard<G: PersistentGroup, P: Peer> {
    pub(super) rooms: BTreeMap<RoomId, Room<G, P>>,
    pub(super) config: ShardConfig,
    memberships: Memberships,
    pending: PendingBatch,
    /// Batches taken and not yet reported durable, oldest first.
    batches_in_flight: VecDeque<(u64, Vec<(RoomId, u64)>)>,
    next_batch: u64,
    /// Rooms with pending server proposals or timed bans.
    pub(super) watched: BTreeSet<RoomId>,
    /// Last subscription id handed out.
    next_subscription: u64,
    /// Where each connection subscribes or awaits an acknowledgement.
    connection_rooms: super::connections::ConnectionRooms,
    pub(super) outputs: VecDeque<Output<P>>,
    effects: Vec<Effect>,
    pub(super) counters: ShardCounters,
}

impl<G: PersistentGroup, P: Peer> Shard<G, P> {
    /// A shard owning `rooms`, counting their members in `memberships`.
    pub fn new(config: ShardConfig, memberships: Memberships, rooms: Vec<RecoveredRoom<G>>) -> Shard<G, P> {
        let mut shard = Shard {
            rooms: BTreeMap::new(),
            config,
            memberships,
            pending: PendingBatch::default(),
            batches_in_flight: VecDeque::new(),
            next_batch: 0,
            watched: BTreeSet::new(),
            next_subscription: 0,
            connection_rooms: super::connections::ConnectionRooms::default(),
            outputs: VecDeque::new(),
            effects: Vec::new(),
            counters: ShardCounters::default(),
        };
        for recovered in rooms {
            let room_id = recovered.sequencer.room_id();
            count_memberships(&shard.memberships, &recovered.sequencer.group().members(), &[]);
            let mut room = Room::new(recovered.sequencer, recovered.creator, recovered.created_at_ms);
            room.recent = recovered.recent;
            room.roles = recovered.roles;
            room.replica = recovered.replica;
            let watch = !room.sequencer.server_proposals_pending().is_empty()
                || room.sequencer.has_timed_bans()
                || room.sequencer.commit_unsettled();
            // A replica's authority settles, voids and reminds.
            if watch && !room.replica {
                shard.watched.insert(room_id);
            }
            shard.rooms.insert(room_id, room);
        }
        shard
    }

    /// The next thing to do, in order.
    pub fn poll_output(&mut self) -> Option<Output<P>> {
        self.outputs.pop_front()
    }

    /// The entries sequenced since the last call, as one storage request.
    pub fn take_batch(&mut self) -> Option<AppendBatch> {
        if self.pending.entries.is_empty() {
            return None;
        }
        let pending = std::mem::take(&mut self.pending);
        self.next_batch += 1;
        #[cfg(feature = "injected-bugs")]
        if crate::bugs::planted().release_batch_when_taken {
            self.release_before_durable(&pending.rooms);
        }
        self.batches_in_flight.push_back((self.next_batch, pending.rooms));
        Some(AppendBatch { id: self.next_batch, entries: pending.entries, welcomes: pending.welcomes })
    }

    /// Injected bug: the batch's frames are acknowledged and fanned out as
    /// it is handed to storage (reporting it durable later changes nothing).
    #[cfg(feature = "injected-bugs")]
    fn release_before_durable(&mut self, rooms: &[(RoomId, u64)]) {
        let mut effects = std::mem::take(&mut self.effects);
        for &(room_id, through) in rooms {
            let Some(room) = self.rooms.get_mut(&room_id) else { continue };
            if room.sequencer.is_recovering() {
                continue;
            }
            effects.clear();
            room.sequencer.durable(through, &mut effects);
            self.apply_effects(room_id, &mut effects);
        }
        self.effects = effects;
    }

    /// Storage requests taken and not yet reported.
    pub fn batches_in_flight(&self) -> usize {
        self.batches_in_flight.len()
    }

    /// Whether anything accepted is not yet durable.
    pub fn is_idle(&self) -> bool {
        self.pending.entries.is_empty() && self.batches_in_flight.is_empty()
    }

    /// Whether periodic work is due ([`Shard::handle_tick`]).
    pub fn wants_ticks(&self) -> bool {
        !self.watched.is_empty()
    }

    /// The rooms' sequencers, in room id order (for observers).
    pub fn sequencers(&self) -> impl Iterator<Item = &RoomSequencer<G>> {
        self.rooms.values().map(|room| &room.sequencer)
    }

    /// Counts since the last call.
    pub fn take_counters(&mut self) -> ShardCounters {
        std::mem::take(&mut self.counters)
    }

    /// Sends a reply (acknowledgement, error, sync marker). Replies are never
    /// dropped: with the frame queue full they wait as notices, written after
    /// the queued frames; if those overflow too, the connection is closed.
    pub(super) fn reply(peer: &P, frame: Bytes) {
        if !peer.try_reply(frame.clone()) {
            peer.notice(frame);
        }
    }

    /// Answers a request with an `Error` frame and counts the rejection.
    pub(super) fn refuse(
        &mut self,
        peer: &P,
        room_id: RoomId,
        request_id: u32,
        code: ErrorCode,
        message: &str,
    ) {
        self.counters.rejections.push(code);
        Self::reply(peer, error_frame(room_id, request_id, code, message));
    }

    /// A frame to sequence (create room, commit, proposal, application,
    /// external join); its sender id was checked against the connection.
    pub fn handle_submit(&mut self, peer: &P, frame: Frame, now_ms: u64) {
        let room_id = frame.header().room_id();
        let request_id = frame.header().request_id();
        let removals_to_reissue = self.removals_a_rejoin_ends(room_id, peer.sender(), &frame);
        let proposal = (frame.opcode() == Opcode::Proposal).then(|| frame.clone());
        let result = if frame.opcode() == Opcode::CreateRoom {
            self.create_room(peer, frame, now_ms)
        } else {
            let rooms = self.memberships.lock().expect("memberships lock").get(&peer.sender()).copied();
            let Some(room) = self.rooms.get_mut(&room_id) else {
                self.refuse(peer, room_id, request_id, ErrorCode::UnknownRoom, "no such room");
                return;
            };
            if room.replica {
                self.refuse(peer, room_id, request_id, ErrorCode::Forbidden, REPLICA_REFUSAL);
                return;
            }
            match rooms {
                // An external join while at the limit (joins in flight are not yet counted).
                Some(rooms)
                    if frame.opcode() == Opcode::ExternalJoin && rooms >= self.config.rooms_per_user_max =>
                {
                    Err(SubmitError::TooManyRooms { rooms })
                }
                _ => room.sequencer.submit(peer.sender(), frame, now_ms),
            }
        };
        match result {
            Ok(sequenced) => {
                self.sequenced(room_id, Some(peer.clone()), sequenced);
                self.reissue_removals(room_id, &removals_to_reissue, now_ms);
            }
            Err(SubmitError::InvalidProposal(GroupError::AlreadyPending))
                if proposal.as_ref().is_some_and(|sent| self.acknowledge_again(peer, room_id, sent)) => {}
            Err(error) => {
                self.counters.rejections.push(error.error_code());
                Self::reply(peer, rejection_frame(room_id, request_id, &error));
            }
        }
    }

    /// Answers a proposal sent again while the first is pending (its
    /// acknowledgement was lost) with the first one's acknowledgement, when
    /// it is still among the recent frames: its index and time, and the
    /// signed head at the end of the durable log; the head at its index is
    /// not kept, so `log_head` is left out. `false` when it is not found.
    fn acknowledge_again(&mut self, peer: &P, room_id: RoomId, sent: &Frame) -> bool {
        let Some(room) = self.rooms.get(&room_id) else { return false };
        let Ok(payload) = sent.decode_payload::<payload::Proposal>() else { return false };
        let epoch = sent.header().epoch();
        let Some((log_index, server_time_ms)) =
            room.recent.proposal_of(peer.sender(), epoch, &payload.proposal)
        else {
            return false;
        };
        let signed_head = room
            .sequencer
            .durable_log_head()
            .map(|(last, head)| sign_head(room_id, last, head, &self.config.server_signer));
        let ack = payload::Ack { log_index, epoch, server_time_ms, log_head: None, signed_head };
        Self::reply(peer, reply_frame(room_id, sent.header().request_id(), &ack));
        self.counters.acks += 1;
        true
    }

    /// The server removals an external join of `sender` would end: those
    /// waiting when it is a member's rejoin
    /// ([`RoomSequencer::is_rejoin_while_closed`]), issued again as soon as
    /// the join is sequenced.
    fn removals_a_rejoin_ends(&self, room_id: RoomId, sender: SenderId, frame: &Frame) -> Vec<SenderId> {
        if frame.opcode() != Opcode::ExternalJoin {
            return Vec::new();
        }
        let Some(room) = self.rooms.get(&room_id).filter(|room| !room.replica) else { return Vec::new() };
        if !room.sequencer.is_rejoin_while_closed(sender) {
            return Vec::new();
        }
        room.sequencer.group().pending_server_removals().unwrap_or_default()
    }

    /// Queues a frame the room's sequencer accepted for the next batch;
    /// `peer` is the connection to acknowledge, `None` for the server's own
    /// proposals (never acknowledged).
    pub(super) fn sequenced(&mut self, room_id: RoomId, peer: Option<P>, sequenced: Sequenced) {
        let room = self.rooms.get_mut(&room_id).expect("room exists after sequencing");
        let log_index = sequenced.log_index;
        let encoded = sequenced.frame.to_bytes();
        if let Some((recipients, welcome, ratchet_tree, log_head)) = room.sequencer.welcome_of(log_index) {
            let stamped_ms = sequenced.frame.header().server_timestamp_ms();
            match welcome_frame(room_id, welcome, ratchet_tree, (log_index, stamped_ms), &log_head) {
                Ok(frame) => self.pending.welcomes.push(WelcomeToStore {
                    room_id,
                    recipients: recipients.to_vec(),
                    frame,
                }),
                Err(error) => tracing::error!(%room_id, log_index, %error, "a sequenced Welcome was dropped"),
            }
        }
        let acknowledged = peer.as_ref().map(P::connection);
        if peer.is_some() {
            room.waiting.push_back(Waiting { log_index, peer, encoded: encoded.clone() });
        }
        if room.sequencer.commit_unsettled() && !room.replica {
            // Ticks settle the commit when its report window ends.
            self.watched.insert(room_id);
        }
        self.pending.entries.push(LogEntry { room_id, log_index, frame: encoded });
        match self.pending.rooms.iter_mut().find(|(room, _)| *room == room_id) {
            Some((_, through)) => *through = log_index,
            None => self.pending.rooms.push((room_id, log_index)),
        }
        if let Some(connection) = acknowledged {
            self.note_connection(connection, room_id);
        }
    }

    /// `connection` holds state (a subscriber, a frame to acknowledge) in
    /// `room_id`: it is cleaned up there when it closes.
    fn note_connection(&mut self, connection: ConnectionId, room_id: RoomId) {
        let rooms = &self.rooms;
        self.connection_rooms.note(connection, room_id, |noted| {
            rooms.get(&noted).is_some_and(|room| room.holds_state_of(connection))
        });
    }

    fn create_room(&mut self, peer: &P, frame: Frame, now_ms: u64) -> Result<Sequenced, SubmitError> {
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
        let rooms = memberships.get(&peer.sender()).copied().unwrap_or(0);
        if rooms >= self.config.rooms_per_user_max {
            return Err(SubmitError::TooManyRooms { rooms });
        }
        let server_key = self.config.server_signer.public_key();
        let (sequencer, sequenced) =
            RoomSequencer::create(room_id, group, peer.sender(), frame, now_ms, &server_key)?;
        *memberships.entry(peer.sender()).or_insert(0) += 1;
        drop(memberships);
        self.rooms.insert(room_id, Room::new(sequencer, peer.sender(), now_ms));
        Ok(sequenced)
    }

    /// An ephemeral frame: fan it out to the room's live subscribers now
    /// (not to members being removed).
    pub fn handle_ephemeral(&mut self, peer: &P, frame: Frame, now_ms: u64) {
        let room_id = frame.header().room_id();
        let request_id = frame.header().request_id();
        let Some(room) = self.rooms.get(&room_id) else {
            self.refuse(peer, room_id, request_id, ErrorCode::UnknownRoom, "no such room");
            return;
        };
        if room.replica {
            self.refuse(peer, room_id, request_id, ErrorCode::Forbidden, REPLICA_REFUSAL);
            return;
        }
        if let Err((code, message)) = may_read(room, peer.sender(), now_ms) {
            self.refuse(peer, room_id, request_id, code, message);
            return;
        }
        let bytes = frame.to_bytes();
        let removals: std::collections::HashSet<SenderId> = removals_pending(room).into_iter().collect();
        for subscriber in room.subscribers.iter().filter(|s| s.live && !removals.contains(&s.peer.sender())) {
            if subscriber.peer.connection() != peer.connection() {
                // Ephemeral frames may be dropped for a slow reader; they are never owed.
                let _ = subscriber.peer.try_send(bytes.clone());
            }
        }
    }

    /// Stream history from `from_log_index`, then live frames (`live`), or
    /// a bounded range once (at most `count_max` frames).
    #[allow(clippy::too_many_arguments)]
    pub fn handle_subscribe(
        &mut self,
        peer: &P,
        room_id: RoomId,
        from_log_index: u64,
        request_id: u32,
        live: bool,
        count_max: u64,
        now_ms: u64,
    ) {
        let Some(room) = self.rooms.get(&room_id) else {
            self.refuse(peer, room_id, request_id, ErrorCode::UnknownRoom, "no such room");
            return;
        };
        let bound = if peer.reads_everything() {
            Ok(u64::MAX)
        } else {
            read_bound(room, peer.sender(), live, now_ms)
        };
        let read_next = match bound {
            Ok(read_next) => read_next,
            Err((code, message)) => {
                self.refuse(peer, room_id, request_id, code, message);
                return;
            }
        };
        let durable_next = room.durable_next();
        // A replica may lag its authority: a reader there waits for it.
        let beyond_replica = room.replica && from_log_index <= durable_next + REPLICA_LAG_FRAMES_MAX;
        if from_log_index > durable_next && beyond_replica && !live {
            // The replica has nothing from there yet: nothing to read now.
            let done = payload::SyncDone { next_log_index: from_log_index, live: false, log_head: None };
            Self::reply(peer, reply_frame(room_id, request_id, &done));
            return;
        }
        if from_log_index > durable_next && !beyond_replica {
            let message = format!("log index {from_log_index} is beyond the room's head {durable_next}");
            self.refuse(peer, room_id, request_id, ErrorCode::UnknownLogIndex, &message);
            return;
        }
        #[cfg(feature = "injected-bugs")]
        assert!(
            !(live && from_log_index > 0 && crate::bugs::planted().panic_on_resubscribe),
            "injected bug: panic on resubscribe"
        );
        if !live {
            let Some(slot) = ReaderSlot::try_take(peer.sync_readers(), SYNC_READERS_PER_CONNECTION_MAX)
            else {
                let message =
                    format!("{SYNC_READERS_PER_CONNECTION_MAX} syncs of this connection are running");
                self.counters.rejections.push(ErrorCode::RateLimited);
                let error = error_frame_with(
                    room_id,
                    request_id,
                    ErrorCode::RateLimited,
                    &message,
                    None,
                    None,
                    Some(SYNC_READER_RETRY_AFTER_MS),
                );
                Self::reply(peer, error);
                return;
            };
            let through = durable_next.min(from_log_index.saturating_add(count_max)).min(read_next);
            if read_next <= from_log_index {
                // A departing member has read all it may.
                let done = payload::SyncDone { next_log_index: from_log_index, live: false, log_head: None };
                if room.sequencer.is_banned(peer.sender(), now_ms) {
                    self.refuse(peer, room_id, request_id, ErrorCode::Banned, "banned from the room");
                } else if room.sequencer.is_member(peer.sender()) {
                    Self::reply(peer, reply_frame(room_id, request_id, &done));
                } else {
                    let message = "not a member: your removal has been read";
                    self.refuse(peer, room_id, request_id, ErrorCode::NotMember, message);
                }
                return;
            }
            let end_head = room.signed_head_before(room_id, through, &self.config.server_signer);
            self.outputs.push_back(Output::ReadHistory(HistoryRead {
                room_id,
                peer: peer.clone(),
                from: from_log_index,
                through,
                request_id,
                subscription: 0,
                cancelled: Arc::new(AtomicBool::new(false)),
                slot: Some(slot),
                end_head,
            }));
            return;
        }
        if room.subscribers.len() >= SUBSCRIBERS_PER_ROOM_MAX {
            self.refuse(peer, room_id, request_id, ErrorCode::RateLimited, "room has too many subscribers");
            return;
        }
        self.next_subscription += 1;
        let subscription = self.next_subscription;
        let room = self.rooms.get_mut(&room_id).expect("looked up above");
        drop_subscribers(&mut room.subscribers, |s| s.peer.connection() == peer.connection());
        room.subscribers.push(Subscriber {
            peer: peer.clone(),
            next_log_index: from_log_index,
            live: false,
            subscription,
            cancelled: Arc::new(AtomicBool::new(false)),
            request_id,
            awaiting_replica: from_log_index > durable_next,
        });
        self.note_connection(peer.connection(), room_id);
        if from_log_index <= durable_next {
            self.handle_caught_up(room_id, subscription, from_log_index);
        }
    }

    /// Stop streaming a room to a connection.
    pub fn handle_unsubscribe(&mut self, connection: ConnectionId, room_id: RoomId) {
        if let Some(room) = self.rooms.get_mut(&room_id) {
            drop_subscribers(&mut room.subscribers, |s| s.peer.connection() == connection);
        }
    }

    /// The connection is gone: drop its subscriptions and forget it as the
    /// one to acknowledge.
    pub fn handle_connection_closed(&mut self, connection: ConnectionId) {
        for room_id in self.connection_rooms.take(connection) {
            let Some(room) = self.rooms.get_mut(&room_id) else { continue };
            drop_subscribers(&mut room.subscribers, |s| s.peer.connection() == connection);
            for waiting in room.waiting.iter_mut() {
                if waiting.peer.as_ref().is_some_and(|p| p.connection() == connection) {
                    waiting.peer = None;
                }
            }
        }
        // Tests and the simulation (debug builds) check that no room was
        // missed; release builds trust the index.
        debug_assert!(
            self.rooms.values().all(|room| !room.holds_state_of(connection)),
            "a closed connection's state is left in a room not noted for it"
        );
    }

    /// A subscriber has been sent everything below `next_log_index`: hand it
    /// over to live fan-out if the rest is in memory and fits its queue now,
    /// else read more history (with backpressure) and come back here.
    pub fn handle_caught_up(&mut self, room_id: RoomId, subscription: u64, next_log_index: u64) {
        let Some(room) = self.rooms.get_mut(&room_id) else { return };
        let durable_next = room.durable_next();
        let oldest_recent = room.recent.oldest_log_index().unwrap_or(durable_next);
        let Some(subscriber) = room.subscribers.iter_mut().find(|s| s.subscription == subscription) else {
            return;
        };
        let backlog = durable_next.saturating_sub(next_log_index);
        let backlog_bytes: usize = room.recent.from(next_log_index).map(|(_, bytes)| bytes.len()).sum();
        let fits = usize::try_from(backlog).is_ok_and(|backlog| backlog <= subscriber.peer.free_capacity())
            && backlog_bytes <= subscriber.peer.free_bytes();
        if next_log_index < oldest_recent || !fits {
            self.outputs.push_back(Output::ReadHistory(HistoryRead {
                room_id,
                peer: subscriber.peer.clone(),
                from: next_log_index,
                through: durable_next,
                request_id: subscriber.request_id,
                subscription,
                cancelled: Arc::clone(&subscriber.cancelled),
                slot: None,
                end_head: None,
            }));
            return;
        }
        let mut delivered = true;
        for (index, bytes) in room.recent.from(next_log_index) {
            if !subscriber.peer.try_send(bytes.clone()) {
                delivered = false;
                subscriber.next_log_index = *index;
                break;
            }
        }
        if delivered {
            subscriber.next_log_index = durable_next;
            subscriber.live = true;
            let (last, head) = room.sequencer.durable_log_head().unwrap_or_default();
            let log_head = (durable_next > 0 && !room.replica)
                .then(|| sign_head(room_id, last, head, &self.config.server_signer));
            let done = reply_frame(
                room_id,
                subscriber.request_id,
                &payload::SyncDone { next_log_index: durable_next, live: true, log_head },
            );
            Self::reply(&subscriber.peer, done);
        } else {
            lagged(room_id, subscriber);
            drop_subscribers(&mut room.subscribers, |s| s.subscription == subscription);
        }
    }

    /// Answer with the room's current GroupInfo and ratchet tree.
    pub fn handle_group_info(&mut self, peer: &P, room_id: RoomId, request_id: u32, now_ms: u64) {
        let Some(room) = self.rooms.get(&room_id) else {
            self.refuse(peer, room_id, request_id, ErrorCode::UnknownRoom, "no such room");
            return;
        };
        if room_standing(room, peer.sender(), now_ms) == Standing::NotMember
            && room.sequencer.is_member(peer.sender())
        {
            let message = "your removal from the room is pending";
            self.refuse(peer, room_id, request_id, ErrorCode::NotMember, message);
            return;
        }
        match room.sequencer.group_info_for(peer.sender(), now_ms) {
            Err(error) => {
                let (code, message) = (error.error_code(), error.to_string());
                self.refuse(peer, room_id, request_id, code, &message)
            }
            Ok(Some((epoch, group_info))) => {
                let payload = payload::GroupInfo {
                    epoch: *epoch,
                    group_info: group_info.to_vec(),
                    ratchet_tree: room.sequencer.group().ratchet_tree().to_vec(),
                };
                match server_frame(room_id, request_id, &payload) {
                    Ok(reply) => Self::reply(peer, reply),
                    // Commits are refused when their GroupInfo would not fit
                    // with the tree; a log written before that check may
                    // still hold one: refused until the next commit.
                    Err(error) => self.refuse(
                        peer,
                        room_id,
                        request_id,
                        ErrorCode::InvalidGroupInfo,
                        &error.to_string(),
                    ),
                }
            }
            _ => self.refuse(
                peer,
                room_id,
                request_id,
                ErrorCode::InvalidGroupInfo,
                "no GroupInfo published for the current epoch",
            ),
        }
    }

    /// Entries of the room are being erased: replace them in the recent
    /// frames by their placeholders before the store destroys them, so no
    /// subscriber catching up from memory gets the content.
    pub fn handle_erased(&mut self, room_id: RoomId, log_indices: &[u64]) {
        let Some(room) = self.rooms.get_mut(&room_id) else { return };
        room.recent
            .replace(log_indices, |index, bytes| super::frames::placeholder_for_frame(room_id, index, bytes));
    }

    /// Entries of a room ordered here were erased durably, and journaled:
    /// each peer domain's feed of the room is told, after what it was sent
    /// already, so that its replica erases them too. A feed that cannot
    /// take the notice is told it fell behind, as by fan-out; its replica
    /// follows again and is sent the room's erasure journal. (A follow reads
    /// the journal after its feed subscribed, so an erasure is either in
    /// what it reads or told to its feed.)
    pub fn handle_erasure_durable(&mut self, room_id: RoomId, log_indices: &[u64]) {
        let Some(room) = self.rooms.get_mut(&room_id).filter(|room| !room.replica) else { return };
        let mut lagging = Vec::new();
        for feed in room.subscribers.iter().filter(|s| s.peer.reads_everything()) {
            let told = log_indices
                .iter()
                .all(|&log_index| feed.peer.try_send(super::frames::erasure_notice(room_id, log_index)));
            if !told {
                lagged(room_id, feed);
                lagging.push(feed.subscription);
            }
        }
        if !lagging.is_empty() {
            drop_subscribers(&mut room.subscribers, |s| lagging.contains(&s.subscription));
        }
    }

    /// The batch `batch_id` (the oldest taken) is durable, or failed.
    pub fn handle_durable(&mut self, batch_id: u64, result: Result<(), String>) {
        let (oldest, rooms) = self.batches_in_flight.pop_front().expect("a batch was in flight");
        assert_eq!(oldest, batch_id, "batches complete in the order they were taken");
        if let Err(reason) = &result {
            tracing::error!(%reason, "storage failed; the node stops and recovers on restart");
            self.outputs.push_back(Output::StorageFailed { reason: reason.clone() });
        }
        let mut effects = std::mem::take(&mut self.effects);
        for (room_id, through) in rooms {
            let Some(room) = self.rooms.get_mut(&room_id) else { continue };
            effects.clear();
            #[cfg(feature = "injected-bugs")]
            let through = if crate::bugs::planted().release_one_past_durable {
                through.saturating_add(1).min(room.sequencer.next_log_index().saturating_sub(1))
            } else {
                through
            };
            #[cfg(feature = "injected-bugs")]
            let through = if crate::bugs::planted().release_batch_when_taken {
                // Released when taken: a later batch may have been released already.
                through.max(room.sequencer.durable_through().unwrap_or(0))
            } else {
                through
            };
            match &result {
                Ok(()) if !room.sequencer.is_recovering() => room.sequencer.durable(through, &mut effects),
                Ok(()) => {}
                Err(_) => room.sequencer.storage_failed(&mut effects),
            }
            self.apply_effects(room_id, &mut effects);
            match &result {
                Ok(()) => {
                    self.maybe_snapshot(room_id);
                    self.proposals_durable(room_id, through);
                    if self.rooms.get(&room_id).is_some_and(|room| room.replica) {
                        self.wake_replica_readers(room_id);
                    }
                }
                Err(reason) => self.proposals_failed(room_id, reason),
            }
        }
        self.effects = effects;
    }

    fn apply_effects(&mut self, room_id: RoomId, effects: &mut Vec<Effect>) {
        let room = self.rooms.get_mut(&room_id).expect("effects of an existing room");
        // One signature per room and durable run: every acknowledgement of
        // the run carries the head at its end.
        let run_head = effects
            .iter()
            .any(|effect| matches!(effect, Effect::Acknowledge { .. }))
            .then(|| room.sequencer.durable_log_head())
            .flatten()
            .map(|(last, head)| sign_head(room_id, last, head, &self.config.server_signer));
        // The sequencer acknowledges a frame right before fanning it out; the
        // submitting connection gets the acknowledgement instead of an echo,
        // and the fan-out reuses the encoding made for storage.
        let mut acknowledged: Option<(u64, Option<ConnectionId>, Bytes)> = None;
        let mut fanned_out = None;
        let mut first_fanned_out = None;
        for effect in effects.drain(..) {
            match effect {
                Effect::Acknowledge { log_index, epoch, server_time_ms, request_id, log_head, .. } => {
                    let waiting = pop_waiting(room, log_index);
                    acknowledged =
                        Some((log_index, waiting.peer.as_ref().map(P::connection), waiting.encoded));
                    if let Some(peer) = waiting.peer {
                        let ack = payload::Ack {
                            log_index,
                            epoch,
                            server_time_ms,
                            log_head: Some(log_head),
                            signed_head: run_head,
                        };
                        Self::reply(&peer, reply_frame(room_id, request_id, &ack));
                    }
                    self.counters.acks += 1;
                }
                Effect::FanOut { frame, .. } => {
                    let log_index = frame.header().log_index();
                    fanned_out = Some(log_index);
                    first_fanned_out.get_or_insert(log_index);
                    let (submitter, bytes) = match acknowledged.take() {
                        Some((acked, connection, encoded)) if acked == log_index => (connection, encoded),
                        // The server's own proposals are not acknowledged.
                        _ => (None, frame.to_bytes()),
                    };
                    fan_out(room_id, room, &frame, submitter, bytes, &mut self.outputs);
                }
                Effect::Reject { request_id, error, .. } => {
                    self.counters.rejections.push(error.error_code());
                    if let Some(peer) = room.waiting.pop_front().and_then(|waiting| waiting.peer) {
                        Self::reply(&peer, rejection_frame(room_id, request_id, &error));
                    }
                }
                Effect::MembershipChanged { added, removed } => {
                    count_memberships(&self.memberships, &added, &removed);
                    drop_subscribers(&mut room.subscribers, |s| removed.contains(&s.peer.sender()));
                    // The commit (fanned out just before) is the last frame
                    // the removed may read; the added read everything again.
                    let commit_next = fanned_out.map_or(room.durable_next(), |index| index + 1);
                    for user in removed {
                        room.note_departing(user, commit_next);
                    }
                    for user in &added {
                        room.departing.remove(user);
                    }
                }
                Effect::DeliverWelcome { recipients, .. } => {
                    // Stored with the batch; hand them to recipients online now.
                    self.outputs.push_back(Output::DeliverWelcomes { recipients });
                }
            }
        }
        if let (Some(first), Some(last)) = (first_fanned_out, fanned_out) {
            // Every REPLICA_CHECKPOINT_FRAMES frames: the run holds a checkpoint index.
            if (last + 1) / REPLICA_CHECKPOINT_FRAMES > first / REPLICA_CHECKPOINT_FRAMES {
                checkpoint_replica_feeds(room_id, room, last + 1, run_head, &self.config.server_signer);
            }
        }
    }

    pub(super) fn maybe_snapshot(&mut self, room_id: RoomId) {
        let Some(room) = self.rooms.get_mut(&room_id) else { return };
        let due = room.commits_since_snapshot >= COMMITS_PER_SNAPSHOT || room.snapshot_due;
        // Not while the latest commit can be voided: a snapshot holds no
        // state to undo it with (`docs/RECOVERY.md`).
        if !due || room.sequencer.in_flight() > 0 || room.sequencer.commit_unsettled() {
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
        let snapshot = RoomSnapshot {
            group: &group,
            epoch_started_at_log_index: room.sequencer.epoch_started_at_log_index(),
            group_info,
            server_proposals: room.sequencer.pending_server_proposals(),
            log_head: room.sequencer.durable_log_head().map(|(_, head)| head),
        };
        let Some(mls_snapshot) = snapshot.encode() else {
            tracing::warn!(%room_id, "MLS state too large for a snapshot; the room recovers from its log");
            return;
        };
        let metadata = RoomMetadata {
            creator_user_id: room.creator.0,
            created_at_ms: room.created_at_ms,
            mls_snapshot,
            mls_snapshot_log_index: room.sequencer.next_log_index(),
        };
        self.outputs.push_back(Output::Snapshot { room_id, metadata });
    }
}

/// Sends a durable frame to the room's live subscribers (the submitter,
/// acknowledged instead, excepted) and keeps it among the recent frames.
fn fan_out<G: PersistentGroup, P: Peer>(
    room_id: RoomId,
    room: &mut Room<G, P>,
    frame: &Frame,
    submitter: Option<ConnectionId>,
    bytes: Bytes,
    outputs: &mut VecDeque<Output<P>>,
) {
    let log_index = frame.header().log_index();
    if frame.opcode() == Opcode::Commit || frame.opcode() == Opcode::ExternalJoin {
        room.commits_since_snapshot += 1;
    }
    if frame.header().sender_id() == SERVER_SENDER_ID {
        room.snapshot_due = true;
    }
    offer_push(room_id, room, frame, outputs);
    room.recent.push(log_index, bytes.clone());
    let mut lagging = Vec::new();
    for subscriber in room.subscribers.iter_mut().filter(|s| s.live) {
        assert_eq!(subscriber.next_log_index, log_index, "live subscribers see every index");
        if Some(subscriber.peer.connection()) == submitter || subscriber.peer.try_send(bytes.clone()) {
            subscriber.next_log_index = log_index + 1;
        } else {
            lagged(room_id, subscriber);
            lagging.push(subscriber.subscription);
        }
    }
    if !lagging.is_empty() {
        drop_subscribers(&mut room.subscribers, |s| lagging.contains(&s.subscription));
    }
}

/// After a durable run that reaches a multiple of
/// [`REPLICA_CHECKPOINT_FRAMES`] frames, each live replica feed of the room
/// (another domain's follow) gets the authority's signed head at the run's
/// end, as a `SyncDone` (`live`), so that replicas check the log's order as
/// frames keep coming, not only when a follow catches up. `run_head` is reused
/// when it is that head. A feed too full to take it misses this one.
fn checkpoint_replica_feeds<G: PersistentGroup, P: Peer>(
    room_id: RoomId,
    room: &Room<G, P>,
    next_log_index: u64,
    run_head: Option<SignedLogHead>,
    signer: &ServerSigner,
) {
    let feeds = || room.subscribers.iter().filter(|s| s.live && s.peer.reads_everything());
    if feeds().next().is_none() {
        return;
    }
    let signed = run_head
        .filter(|head| head.log_index.checked_add(1) == Some(next_log_index))
        .or_else(|| room.signed_head_before(room_id, next_log_index, signer));
    let Some(signed) = signed else { return };
    let done = payload::SyncDone { next_log_index, live: true, log_head: Some(signed) };
    let frame = reply_frame(room_id, 0, &done);
    for feed in feeds() {
        let _ = feed.peer.try_send(frame.clone());
    }
}

/// Asks for the frame's push payload, if it has one, to be forwarded.
fn offer_push<G: PersistentGroup, P>(
    room_id: RoomId,
    room: &Room<G, P>,
    frame: &Frame,
    outputs: &mut VecDeque<Output<P>>,
) {
    if frame.opcode() != Opcode::Application {
        return;
    }
    let Ok(payload::Application { push: Some(payload), .. }) = frame.decode_payload::<payload::Application>()
    else {
        return;
    };
    outputs.push_back(Output::Push {
        room_id,
        log_index: frame.header().log_index(),
        sender: frame.header().sender_id(),
        members: room.sequencer.group().members(),
        payload,
    });
}

/// Whether `user` may read the room (subscribe, sync, send and receive
/// ephemeral frames): a current member, neither banned nor being removed.
fn may_read<G: PersistentGroup, P>(
    room: &Room<G, P>,
    user: SenderId,
    now_ms: u64,
) -> Result<(), (ErrorCode, &'static str)> {
    match room_standing(room, user, now_ms) {
        Standing::Member | Standing::Moderator => Ok(()),
        Standing::Banned => Err((ErrorCode::Banned, "banned from the room")),
        Standing::NotMember if room.sequencer.is_member(user) => {
            Err((ErrorCode::NotMember, "your removal from the room is pending"))
        }
        Standing::NotMember => Err((ErrorCode::NotMember, "not a member")),
    }
}

/// How far `user` may read the room: to its head (`u64::MAX`) for a
/// current member; for a one-shot read (`live` false) by a member being
/// removed (kicked or banned), or just removed, up to its bound in
/// [`Room::departing`], so that its device reads its own removal and
/// nothing after it. Once that is read: `NotMember`, or `Banned`.
fn read_bound<G: PersistentGroup, P>(
    room: &Room<G, P>,
    user: SenderId,
    live: bool,
    now_ms: u64,
) -> Result<u64, (ErrorCode, &'static str)> {
    match may_read(room, user, now_ms) {
        Ok(()) => Ok(u64::MAX),
        Err((ErrorCode::NotMember | ErrorCode::Banned, _)) if !live && room.departing.contains_key(&user) => {
            Ok(room.departing.get(&user).copied().unwrap_or(0))
        }
        Err(refusal) => Err(refusal),
    }
}

/// Members whose removal by the server is pending (none when no server
/// proposal is).
fn removals_pending<G: PersistentGroup, P>(room: &Room<G, P>) -> Vec<SenderId> {
    if room.sequencer.server_proposals_pending().is_empty() {
        return Vec::new();
    }
    room.sequencer.group().pending_server_removals().unwrap_or_default()
}

/// Tells a subscriber it fell behind and where to resubscribe from.
fn lagged<P: Peer>(room_id: RoomId, subscriber: &Subscriber<P>) {
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
    subscriber.peer.notice(notice);
}

/// Removes and returns the frame waiting on `log_index`.
fn pop_waiting<G: PersistentGroup, P>(room: &mut Room<G, P>, log_index: u64) -> Waiting<P> {
    let waiting = room.waiting.pop_front().expect("every durable frame was waiting");
    assert_eq!(waiting.log_index, log_index, "durability follows log order");
    waiting
}

/// Where a user stands in a room, for reading it and redacting in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// A current member holding the admin or moderator role.
    Moderator,
    /// A current member.
    Member,
    /// Not a member, or a member whose removal by the server is pending.
    NotMember,
    /// Banned from the room.
    Banned,
}

/// Where `user` stands in `room` at `now_ms` (roles aside: `Member` for
/// every current member). The pending removals are read only when the
/// room has server proposals pending.
pub(super) fn room_standing<G: PersistentGroup, P>(
    room: &Room<G, P>,
    user: SenderId,
    now_ms: u64,
) -> Standing {
    if room.sequencer.is_banned(user, now_ms) {
        return Standing::Banned;
    }
    if !room.sequencer.is_member(user) {
        return Standing::NotMember;
    }
    if room.sequencer.server_proposals_pending().is_empty() {
        return Standing::Member;
    }
    match room.sequencer.group().pending_server_removals() {
        Ok(removals) if !removals.contains(&user) => Standing::Member,
        // Being removed, or unknown: refused (safe side).
        _ => Standing::NotMember,
    }
}
