//! Replicas of rooms between domains: the domain that orders a room (its
//! authority) sends each frame it sequences once per peer domain with
//! members in it, not once per member; each such domain keeps the room's
//! log as a replica ([`crate::room::Shard::handle_replicated`]) and serves
//! its own members' reads from it, also while the authority is
//! unreachable. Writes still go to the authority ([`super::relay`]).
//!
//! Authority side ([`ReplicaFeeds`]): a peer's `Follow` of a room is
//! served if the room is ordered here and a current member is a user of
//! that peer (its home recorded from a verified home certificate); the
//! peer then reads the room like a subscriber through one feed per peer:
//! history from the index asked, then live frames, each sent once, in
//! `Replicate` messages. A feed that falls behind gets the usual
//! `ResyncRequired` notice and is followed again from where it stopped.
//!
//! Home side ([`ReplicaFollower`]): follows the remote rooms of a peer
//! when its link comes up and when a member reads a room it holds no live
//! replica of; takes `Replicate` frames into the replica, in order, only
//! for rooms that peer orders.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use kalandra_proto::chain::SignedLogHead;
use kalandra_proto::federation::DomainName;
use kalandra_proto::{ErrorCode, RoomId};
use serde_bytes::ByteBuf;
use tokio::sync::{mpsc, OwnedSemaphorePermit};

use crate::admin::metrics::Metrics;
use crate::federation::follow::{FeedItem, FollowState, Following, LiveStep};
use crate::federation::handshake::{encode_established, ErasureRecord, LinkMessage};
use crate::federation::registry::LinkRegistry;
use crate::federation::relay::frame_messages;
use crate::federation::requests::LINK_ESTABLISHED_MESSAGE_BYTES_MAX;
use crate::federation::rooms::RemoteRooms;
use crate::node::{error_frame, Command, Node, Outbox, OutboxReceiver, Outgoing};
use crate::room::sequencer::SERVER_SENDER_ID;
use crate::room::RoomRequest;
use crate::store::limits::{ERASURES_PAGE_MAX, REDACT_ENTRIES_PER_CALL_MAX};
use crate::store::Store;

/// Frames a peer's feed queues before it is told to follow again.
pub const REPLICA_FEED_FRAMES_MAX: usize = 8192;
/// Bytes a peer's feed queues before it is told to follow again.
pub const REPLICA_FEED_BYTES_MAX: usize = 64 * 1024 * 1024;

/// Checks, `REPLICA_LIVE_WAIT_MS` apart, that a caught-up replica is durable
/// before its members read it (then its reads stay relayed until the next follow).
pub const REPLICA_LIVE_WAITS_MAX: u32 = 1_000;
/// Wait between two of those checks.
pub const REPLICA_LIVE_WAIT_MS: u64 = 5;

/// Journal pages (of [`ERASURES_PAGE_MAX`] records) sent in answer to one
/// follow at most; a home further behind gets the rest when it follows again.
pub const ERASURE_PAGES_PER_FOLLOW_MAX: usize = 64;
/// Follows of one link served at once; the link's read loop waits for one
/// to end before it takes another (each follow reads the store and asks
/// the room's shard, so a peer sending follows in a loop would otherwise
/// start tasks without end).
pub const FOLLOWS_IN_FLIGHT_PER_LINK_MAX: usize = 32;
/// Erasures a home applies at once (each waits for its entries to be
/// durable in the replica); a notice beyond it makes the home follow the
/// room again, which brings the journal.
pub const REPLICA_ERASURE_TASKS_MAX: usize = 64;

/// CBOR of one journaled index at most, bytes.
const ERASED_INDEX_CBOR_BYTES_MAX: usize = 9;

const _: () = assert!(REPLICA_FEED_BYTES_MAX >= 2 * kalandra_proto::limits::FRAME_BYTES_MAX);
const _: () = assert!(
    ERASURES_PAGE_MAX * (REDACT_ENTRIES_PER_CALL_MAX * ERASED_INDEX_CBOR_BYTES_MAX + 32) + 1024
        <= LINK_ESTABLISHED_MESSAGE_BYTES_MAX,
    "a page of the erasure journal fits in one link message"
);
const _: () = assert!(REPLICA_LIVE_WAITS_MAX as u64 * REPLICA_LIVE_WAIT_MS <= 10_000, "at most 10 s");

/// The authority side: one feed per peer domain.
pub struct ReplicaFeeds {
    node: Node,
    store: Arc<dyn Store>,
    rooms: Arc<RemoteRooms>,
    metrics: Metrics,
    feeds: Mutex<HashMap<DomainName, Arc<Outbox>>>,
    next_connection_id: AtomicU64,
}

impl ReplicaFeeds {
    /// Feeds of this server's rooms; `rooms` are the rooms other domains order.
    pub fn new(node: Node, store: Arc<dyn Store>, rooms: Arc<RemoteRooms>, metrics: Metrics) -> ReplicaFeeds {
        ReplicaFeeds {
            node,
            store,
            rooms,
            metrics,
            feeds: Mutex::new(HashMap::new()),
            // Apart from local connections and relayed ones.
            next_connection_id: AtomicU64::new(1 << 61),
        }
    }

    /// `peer` follows `room_id` from `from_log_index`, having applied the
    /// room's erasure journal through `erasures_after`: the frames, and the
    /// journal after it, go out on `outgoing` (the link's queue). Refusals
    /// are sent as `Error` frames. The follow holds `permit` (one of the
    /// link's [`FOLLOWS_IN_FLIGHT_PER_LINK_MAX`]) until it is served.
    pub fn follow(
        self: &Arc<Self>,
        peer: &DomainName,
        room_id: RoomId,
        (from_log_index, erasures_after): (u64, u64),
        outgoing: &mpsc::Sender<Vec<u8>>,
        permit: OwnedSemaphorePermit,
    ) {
        let (feeds, peer, outgoing) = (Arc::clone(self), peer.clone(), outgoing.clone());
        tokio::spawn(async move {
            let _permit = permit;
            if let Err((code, message)) = feeds.authorize(&peer, room_id).await {
                feeds.metrics.relay_refused(peer.as_str(), "not_followed_here");
                tracing::info!(%peer, %room_id, %message, "a follow was refused");
                let refusal = error_frame(room_id, 0, code, &message);
                if let Ok(bytes) = encode_established(&LinkMessage::Replicate {
                    frames: vec![ByteBuf::from(refusal.to_vec())],
                }) {
                    let _ = outgoing.try_send(bytes);
                }
                return;
            }
            let outbox = feeds.feed(&peer, &outgoing);
            let request = RoomRequest::Subscribe { room_id, from_log_index, request_id: 0 };
            feeds.node.send(room_id, Command::Room { outbox, request }).await;
            // Read once the subscription is queued in the shard: an erasure
            // durable later is told to the feed (`handle_erasure_durable`).
            feeds.send_erasures(room_id, (from_log_index, erasures_after), &outgoing).await;
        });
    }

    /// Sends the room's erasure journal after `after`, page by page, at
    /// most [`ERASURE_PAGES_PER_FOLLOW_MAX`] pages.
    async fn send_erasures(
        &self,
        room_id: RoomId,
        (from_log_index, mut after): (u64, u64),
        outgoing: &mpsc::Sender<Vec<u8>>,
    ) {
        for _ in 0..ERASURE_PAGES_PER_FOLLOW_MAX {
            let page = match self.node.erasures_after(room_id, after).await {
                Ok(page) => page,
                Err(error) => {
                    tracing::warn!(%room_id, %error, "reading the erasure journal failed");
                    return;
                }
            };
            let Some(last) = page.last().map(|record| record.seq) else { return };
            let erasures = page
                .into_iter()
                .map(|record| ErasureRecord { seq: record.seq, log_indices: record.log_indices })
                .collect();
            let message = LinkMessage::Erasures { room_id: room_id.0, from_log_index, erasures };
            let Ok(bytes) = encode_established(&message) else { return };
            if outgoing.send(bytes).await.is_err() {
                return;
            }
            after = last;
        }
    }

    /// A peer may follow a room this server orders in which a current
    /// member is one of its users.
    async fn authorize(&self, peer: &DomainName, room_id: RoomId) -> Result<(), (ErrorCode, String)> {
        if self.rooms.authority_of(room_id).is_some() {
            return Err((ErrorCode::Forbidden, format!("room {room_id} is not ordered here")));
        }
        let info = self
            .node
            .room_info(room_id)
            .await
            .ok_or_else(|| (ErrorCode::UnknownRoom, format!("no room {room_id}")))?;
        let (store, home) = (Arc::clone(&self.store), peer.clone());
        let homed = tokio::task::spawn_blocking(move || {
            info.members
                .iter()
                .any(|member| store.remote_user_home(member.0).ok().flatten().as_ref() == Some(&home))
        })
        .await
        .unwrap_or(false);
        if homed {
            Ok(())
        } else {
            Err((ErrorCode::NotMember, format!("no user of {peer} is a member of room {room_id}")))
        }
    }

    /// The feed of `peer`, opened on first use with a pump over `outgoing`.
    fn feed(&self, peer: &DomainName, outgoing: &mpsc::Sender<Vec<u8>>) -> Arc<Outbox> {
        let mut feeds = lock(&self.feeds);
        if let Some(feed) = feeds.get(peer).filter(|feed| !feed.is_closing()) {
            return Arc::clone(feed);
        }
        let id = self.next_connection_id.fetch_add(1, Ordering::Relaxed);
        let (outbox, receiver) =
            Outbox::replica_feed(id, SERVER_SENDER_ID, REPLICA_FEED_FRAMES_MAX, REPLICA_FEED_BYTES_MAX);
        feeds.insert(peer.clone(), Arc::clone(&outbox));
        let (node, feed, outgoing) = (self.node.clone(), Arc::clone(&outbox), outgoing.clone());
        let (metrics, peer) = (self.metrics.clone(), peer.clone());
        tokio::spawn(async move {
            pump(receiver, outgoing, &feed, &metrics, &peer).await;
            feed.close();
            node.connection_closed(&feed).await;
        });
        outbox
    }

    /// The link with `peer` went down: its feed ends (it follows again).
    pub fn link_down(&self, peer: &DomainName) {
        if let Some(feed) = lock(&self.feeds).remove(peer) {
            feed.close();
        }
    }
}

/// Sends what a feed gathers as `Replicate` messages until it closes or
/// the link is gone; the frames still queued for the peer after each batch
/// are its feed's gauge.
async fn pump(
    mut receiver: OutboxReceiver,
    outgoing: mpsc::Sender<Vec<u8>>,
    feed: &Outbox,
    metrics: &Metrics,
    peer: &DomainName,
) {
    let mut batch = std::collections::VecDeque::new();
    let queued = |taken: usize| (taken + feed.bulk_frames_max().saturating_sub(feed.free_capacity())) as u64;
    loop {
        let next = receiver.next_batch(&mut batch).await;
        metrics.federation_feed_queued(peer.as_str(), queued(batch.len()));
        for message in frame_messages(batch.drain(..), |frames| LinkMessage::Replicate { frames }) {
            if outgoing.send(message).await.is_err() {
                return;
            }
        }
        metrics.federation_feed_queued(peer.as_str(), queued(0));
        if next == Outgoing::Close {
            return;
        }
    }
}

/// The home side: this server's replicas of other domains' rooms, a
/// [`FollowState`] driven over the links and the node.
pub struct ReplicaFollower {
    node: Node,
    rooms: Arc<RemoteRooms>,
    registry: Arc<LinkRegistry>,
    metrics: Metrics,
    state: Mutex<FollowState>,
    /// Erasures under way (at most [`REPLICA_ERASURE_TASKS_MAX`]).
    erasing: Arc<AtomicUsize>,
}

impl ReplicaFollower {
    /// Replicas of the rooms in `rooms`, followed over `registry`'s links.
    pub fn new(
        node: Node,
        rooms: Arc<RemoteRooms>,
        registry: Arc<LinkRegistry>,
        metrics: Metrics,
    ) -> ReplicaFollower {
        let erasing = Arc::new(AtomicUsize::new(0));
        ReplicaFollower { node, rooms, registry, metrics, state: Mutex::new(FollowState::new()), erasing }
    }

    /// Notes the replicas recovered at start (read while their authority
    /// is unreachable, before it is followed again).
    pub async fn load_held(&self) {
        for room_id in self.rooms.all() {
            if self.node.replica_position(room_id).await.is_some() {
                lock(&self.state).note_held(room_id);
            }
        }
    }

    /// Whether this server's members read `room_id` here: a replica that
    /// is live, or any replica while its authority is unreachable.
    pub fn reads_here(&self, room_id: RoomId, authority: &DomainName) -> bool {
        lock(&self.state).reads_here(room_id, self.registry.is_up(authority))
    }

    /// Follows `room_id` from the replica's head, unless that is under way.
    pub fn follow_if_idle(self: &Arc<Self>, room_id: RoomId) {
        if lock(&self.state).following(room_id).is_some() {
            return;
        }
        let follower = Arc::clone(self);
        tokio::spawn(async move { follower.follow(room_id).await });
    }

    /// Asks the room's authority for its frames from the replica's head.
    pub async fn follow(&self, room_id: RoomId) {
        let Some(authority) = self.rooms.authority_of(room_id) else { return };
        let next = self.node.replica_position(room_id).await.map(|(next, _)| next);
        let erasures_after = self.node.replica_erasure_cursor(room_id).await.unwrap_or(0);
        let message = lock(&self.state).start(room_id, next, erasures_after);
        let sent = encode_established(&message).map(|bytes| self.registry.try_send(&authority, bytes));
        if !matches!(sent, Ok(Ok(()))) {
            lock(&self.state).not_sent(room_id);
        }
        self.publish(&authority);
    }

    /// Publishes how many replicas of `peer`'s rooms are in each state.
    fn publish(&self, peer: &DomainName) {
        let counts = lock(&self.state).counts(self.rooms.ordered_by(peer));
        self.metrics.federation_replicas(peer.as_str(), counts);
    }

    /// A link with `peer` is up: every room it orders that is not followed
    /// yet (or was refused) is followed. A second link with the same peer
    /// leaves follows under way or live alone.
    pub fn link_up(self: &Arc<Self>, peer: &DomainName) {
        let follower = Arc::clone(self);
        let rooms: Vec<RoomId> = {
            let state = lock(&self.state);
            let idle =
                |room_id: &RoomId| matches!(state.following(*room_id), None | Some(Following::Refused));
            self.rooms.ordered_by(peer).into_iter().filter(idle).collect()
        };
        tokio::spawn(async move {
            for room_id in rooms {
                follower.follow(room_id).await;
            }
        });
    }

    /// The link with `peer` went down: its rooms are no longer live.
    pub fn link_down(&self, peer: &DomainName) {
        lock(&self.state).link_down(self.rooms.ordered_by(peer));
        self.publish(peer);
    }

    /// Frames `peer` sent for the replicas: each room's log frames go to
    /// its replica in order; a frame of a room `peer` does not order is
    /// dropped and counted.
    pub async fn replicated(self: &Arc<Self>, peer: &DomainName, frames: Vec<ByteBuf>) {
        let ordered_by_peer = |room_id| self.rooms.authority_of(room_id).as_ref() == Some(peer);
        let mut erased: BTreeMap<RoomId, Vec<u64>> = BTreeMap::new();
        for item in FollowState::sort_feed(frames, ordered_by_peer) {
            match item {
                FeedItem::Frames(room_id, frames) => {
                    let newest_ms = frames.last().map_or(0, |frame| frame.header().server_timestamp_ms());
                    let taken = self.node.replicate(room_id, frames).await;
                    lock(&self.state).taken(room_id, taken.is_ok());
                    if taken.is_ok() {
                        self.metrics.federation_replica_lag(
                            peer.as_str(),
                            self.node.now_ms().saturating_sub(newest_ms),
                        );
                    }
                    if let Err(error) = taken {
                        tracing::warn!(%room_id, %error, "frames from the room's authority not taken; following again");
                        self.metrics.relay_refused(peer.as_str(), "replica_diverged");
                        self.follow(room_id).await;
                    }
                }
                FeedItem::CaughtUp { room_id, next_log_index, log_head } => {
                    if lock(&self.state).caught_up(room_id, next_log_index, log_head) {
                        let follower = Arc::clone(self);
                        tokio::spawn(async move { follower.go_live(room_id).await });
                    }
                }
                FeedItem::FollowAgain(room_id) => self.follow(room_id).await,
                FeedItem::Erased { room_id, log_index } => erased.entry(room_id).or_default().push(log_index),
                FeedItem::Refused { room_id, code, message } => {
                    tracing::info!(%room_id, code, %message, "the room's authority refused to feed its replica");
                    lock(&self.state).refused(room_id);
                    self.publish(peer);
                }
                FeedItem::Dropped(label) => self.metrics.relay_refused(peer.as_str(), label),
            }
        }
        for (room_id, log_indices) in erased {
            for chunk in log_indices.chunks(REDACT_ENTRIES_PER_CALL_MAX) {
                self.erase_later(room_id, chunk.to_vec());
            }
        }
    }

    /// A page of the erasure journal of `room_id`, answering this server's
    /// follow from `from_log_index`: applied in order, each record moving
    /// the replica's cursor once its entries before `from_log_index` are
    /// erased here (those from there on come with the follow).
    pub fn erasures(
        self: &Arc<Self>,
        peer: &DomainName,
        room_id: RoomId,
        from_log_index: u64,
        records: Vec<ErasureRecord>,
    ) {
        if self.rooms.authority_of(room_id).as_ref() != Some(peer) {
            self.metrics.relay_refused(peer.as_str(), "foreign_room");
            return;
        }
        // An authority sends at most a page, of records one redaction could write.
        let oversized = |record: &ErasureRecord| record.log_indices.len() > REDACT_ENTRIES_PER_CALL_MAX;
        if records.len() > ERASURES_PAGE_MAX || records.iter().any(oversized) {
            self.metrics.replica_erasures("refused", 1);
            return;
        }
        let follower = Arc::clone(self);
        let Some(slot) = ErasureSlot::take(&self.erasing) else {
            self.metrics.replica_erasures("dropped", 1);
            return;
        };
        tokio::spawn(async move {
            let _slot = slot;
            for record in records {
                let wanted = record.log_indices.into_iter().filter(|index| *index < from_log_index).collect();
                if !follower.erase_when_held(room_id, wanted, Some(record.seq)).await {
                    return;
                }
            }
        });
    }

    /// Erases entries of the replica of `room_id` the authority's notices
    /// named, once they are durable here, in a task of its own (at most
    /// [`REPLICA_ERASURE_TASKS_MAX`] run). When that cannot be done (no
    /// task free, the entries not durable in time, the store failed), the
    /// room is followed again, which brings the journal.
    fn erase_later(self: &Arc<Self>, room_id: RoomId, log_indices: Vec<u64>) {
        let follower = Arc::clone(self);
        let Some(slot) = ErasureSlot::take(&self.erasing) else {
            self.metrics.replica_erasures("dropped", 1);
            tokio::spawn(async move { follower.follow(room_id).await });
            return;
        };
        tokio::spawn(async move {
            let erased = follower.erase_when_held(room_id, log_indices, None).await;
            drop(slot);
            if !erased {
                follower.follow(room_id).await;
            }
        });
    }

    /// Waits (at most [`REPLICA_LIVE_WAITS_MAX`] times
    /// [`REPLICA_LIVE_WAIT_MS`]) for the replica to hold `log_indices`
    /// durably, then erases them (moving the journal cursor to `cursor`);
    /// whether it did.
    async fn erase_when_held(&self, room_id: RoomId, log_indices: Vec<u64>, cursor: Option<u64>) -> bool {
        let needed = log_indices.iter().max().map_or(0, |last| last.saturating_add(1));
        for _ in 0..REPLICA_LIVE_WAITS_MAX {
            // No replica yet: its first frames may be on their way.
            let durable_next = self.node.replica_position(room_id).await.map_or(0, |(_, durable)| durable);
            if durable_next < needed {
                tokio::time::sleep(std::time::Duration::from_millis(REPLICA_LIVE_WAIT_MS)).await;
                continue;
            }
            return match self.node.erase_in_replica(room_id, log_indices, cursor).await {
                Ok(plan) => {
                    self.metrics.replica_erasures("erased", plan.erase.len() as u64);
                    if !plan.refused.is_empty() {
                        tracing::warn!(%room_id, refused = ?plan.refused, "the room's authority asked to erase entries without content");
                        self.metrics.replica_erasures("refused", plan.refused.len() as u64);
                    }
                    true
                }
                Err(error) => {
                    tracing::warn!(%room_id, %error, "erasing the replica's copies failed");
                    false
                }
            };
        }
        self.metrics.replica_erasures("not_held", 1);
        false
    }

    /// A caught-up follow goes live once the replica is durable through
    /// the caught-up index and the authority's signed head there holds.
    async fn go_live(&self, room_id: RoomId) {
        for _ in 0..REPLICA_LIVE_WAITS_MAX {
            let durable_next = self.node.replica_position(room_id).await.map(|(_, durable)| durable);
            let step = lock(&self.state).durable(room_id, durable_next);
            match step {
                LiveStep::NotDurable => {
                    tokio::time::sleep(std::time::Duration::from_millis(REPLICA_LIVE_WAIT_MS)).await
                }
                LiveStep::CheckHead(signed) => return self.check_head(room_id, signed).await,
                LiveStep::Live => {
                    if let Some(peer) = self.rooms.authority_of(room_id) {
                        self.publish(&peer);
                    }
                    return;
                }
                LiveStep::Idle => return,
            }
        }
        tracing::warn!(%room_id, "the replica did not become durable in time; reads stay relayed");
    }

    /// Checks a head the authority signed against the replica; a head that
    /// does not hold stops the replica from serving reads (logged with the
    /// signed head, the proof of the authority's other order).
    async fn check_head(&self, room_id: RoomId, signed: SignedLogHead) {
        let outcome = self.node.check_replica_head(room_id, signed).await;
        if let Some(Err(error)) = &outcome {
            tracing::error!(%room_id, %error, ?signed, "the room's authority does not stand by its replica here");
        }
        let (label, _) = lock(&self.state).head_checked(room_id, outcome);
        if let Some(label) = label {
            self.metrics.replica_head(label);
        }
        if let Some(peer) = self.rooms.authority_of(room_id) {
            self.publish(&peer);
        }
    }
}

/// One of the follower's [`REPLICA_ERASURE_TASKS_MAX`] erasure tasks,
/// free again when dropped.
struct ErasureSlot(Arc<AtomicUsize>);

impl ErasureSlot {
    fn take(erasing: &Arc<AtomicUsize>) -> Option<ErasureSlot> {
        erasing
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |taken| {
                (taken < REPLICA_ERASURE_TASKS_MAX).then_some(taken + 1)
            })
            .ok()
            .map(|_| ErasureSlot(Arc::clone(erasing)))
    }
}

impl Drop for ErasureSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
