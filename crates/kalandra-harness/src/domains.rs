//! Several domains: the server (host `server`) orders every room; the
//! server of each other domain (hosts `replica-0`, `replica-1`, …) keeps a
//! replica of each room and follows it over its own inter-domain link,
//! with faults of its own (loss, partitions between it and the authority,
//! crashes of either), independently of the other replicas.
//!
//! Both ends run production code. The authority serves a follow as the
//! node does: a replica-feed [`Outbox`] subscribed to the room in the real
//! shard (so the durability probe sees every frame it releases to the
//! other domain), its batches cut into `Replicate` link messages by
//! [`frame_messages`]. The replica's follows are the production
//! [`FollowState`]; what it is sent goes through the real shard's
//! `handle_replicated`, group commit, head check and, after a crash,
//! recovery. The shell adds only I/O: the link is a turmoil TCP stream
//! carrying the production link messages (length-prefixed CBOR,
//! [`encode_established`] / [`decode_established`]) with pings, without
//! the QUIC handshake.
//!
//! Not simulated: the relay of clients' frames through their home domain
//! (every client of the simulation connects to the authority), remote
//! Welcomes, and the follow's authorization (the authority serves any
//! follow of a room it orders); the QUIC tests cover those.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use kalandra_proto::{Frame, Opcode, RoomId};
use kalandra_server::sim::{
    decode_established, encode_established, frame_messages, plan_replica_erasure, ErasureRecord, FeedItem,
    FollowState, Following, LinkMessage, LiveStep, Outbox, OutboxReceiver, Outgoing, RoomRequest,
    ERASURE_PAGES_PER_FOLLOW_MAX, LINK_ESTABLISHED_LENGTH_PREFIX_BYTES, LINK_ESTABLISHED_MESSAGE_BYTES_MAX,
    REPLICA_ERASURE_TASKS_MAX, REPLICA_FEED_BYTES_MAX, REPLICA_FEED_FRAMES_MAX, SERVER_SENDER_ID,
};
use kalandra_server::store::limits::ERASURES_PAGE_MAX;
use kalandra_server::store::{ErasureCause, Redaction};
use serde_bytes::ByteBuf;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use turmoil::net::tcp::OwnedReadHalf;

use kalandra_server::store::Store;

use crate::net::spawn_writer;
use crate::server::{drive, Core, ServerGroup, SimPeer};

/// The port of the authority's inter-domain link.
pub const FEDERATION_PORT: u16 = 7100;
/// The turmoil host of the server of replica domain `index`.
pub fn replica_host(index: usize) -> String {
    format!("replica-{index}")
}
/// A link that carries nothing for this long is closed (either side).
pub const LINK_IDLE_MS: u64 = 3_000;
/// The replica pings the authority this often.
pub const LINK_PING_MS: u64 = 500;
/// Wait before the replica dials again after a link ended.
pub const RECONNECT_MS: u64 = 250;
/// Connection ids of the authority's feeds start here (apart from clients').
pub const FEED_CONNECTION_BASE: u64 = 1 << 61;
/// In the injected "equivocating authority" bug, application frames at
/// log indices with this remainder modulo 7 are altered on the feed.
pub const TAMPERED_INDEX_REMAINDER: u64 = 3;

const _: () = assert!(LINK_PING_MS * 3 <= LINK_IDLE_MS, "three pings fit in the idle timeout");

/// Reads length-prefixed link messages from a stream.
struct MessageReader {
    half: OwnedReadHalf,
}

impl MessageReader {
    async fn next(&mut self) -> Result<LinkMessage, String> {
        let mut prefix = [0u8; LINK_ESTABLISHED_LENGTH_PREFIX_BYTES];
        self.half.read_exact(&mut prefix).await.map_err(|error| error.to_string())?;
        let len = u32::from_be_bytes(prefix) as usize;
        if len > LINK_ESTABLISHED_MESSAGE_BYTES_MAX {
            return Err(format!("a link message of {len} bytes"));
        }
        let mut body = vec![0u8; len];
        self.half.read_exact(&mut body).await.map_err(|error| error.to_string())?;
        decode_established(&body).map_err(|error| error.to_string())
    }

    /// The next message, or `None` when the link ended or stayed idle.
    async fn next_within_idle(&mut self) -> Option<LinkMessage> {
        tokio::time::timeout(Duration::from_millis(LINK_IDLE_MS), self.next()).await.ok()?.ok()
    }
}

fn send(tx: &mpsc::Sender<Bytes>, message: &LinkMessage) -> bool {
    encode_established(message).is_ok_and(|bytes| tx.try_send(Bytes::from(bytes)).is_ok())
}

/// The authority's side: accepts the replica's links for as long as the
/// server lives.
pub(crate) async fn serve_links<G: ServerGroup>(core: Rc<RefCell<Core<G>>>) -> std::io::Result<()> {
    let listener = turmoil::net::TcpListener::bind(("0.0.0.0", FEDERATION_PORT)).await?;
    let mut links = 0u64;
    loop {
        let (stream, _) = listener.accept().await?;
        if core.borrow().shared.failed.get() {
            continue;
        }
        links += 1;
        tokio::task::spawn_local(serve_link(Rc::clone(&core), stream, links));
    }
}

async fn serve_link<G: ServerGroup>(core: Rc<RefCell<Core<G>>>, stream: turmoil::net::TcpStream, link: u64) {
    let shared = Rc::clone(&core.borrow().shared);
    let (read, write) = stream.into_split();
    let seed = u64::from_be_bytes(
        crate::derive_seed(shared.seed, b"link-writer", link)[..8].try_into().unwrap_or_default(),
    );
    let tx = spawn_writer(write, Rc::clone(&shared.loss), seed);
    let mut reader = MessageReader { half: read };
    let mut feed: Option<SimPeer> = None;
    while let Some(message) = reader.next_within_idle().await {
        if shared.failed.get() {
            break;
        }
        match message {
            LinkMessage::Ping { sequence } => {
                send(&tx, &LinkMessage::Pong { sequence });
            }
            LinkMessage::Follow { room_id, from_log_index, erasures_after } => {
                let peer = match feed.as_ref().filter(|peer| !peer.outbox().is_closing()) {
                    Some(peer) => peer.clone(),
                    None => open_feed(&core, &tx),
                };
                feed = Some(peer.clone());
                let request =
                    RoomRequest::Subscribe { room_id: RoomId(room_id), from_log_index, request_id: 0 };
                {
                    let mut core = core.borrow_mut();
                    let now_ms = core.shared.now_ms();
                    core.shard.handle_request(&peer, request, now_ms);
                }
                // Read once the feed subscribed, as the node's feeds read it.
                send_erasures(&shared, RoomId(room_id), (from_log_index, erasures_after), &tx);
                drive(&core);
            }
            // Nothing else travels on this link.
            _ => {}
        }
    }
    if let Some(peer) = feed {
        peer.outbox().close();
        core.borrow_mut().shard.handle_connection_closed(peer.outbox().connection());
        drive(&core);
    }
}

/// The room's erasure journal after `after`, page by page, as the node's
/// replica feeds send it.
fn send_erasures(
    shared: &crate::server::ServerShared,
    room_id: RoomId,
    (from_log_index, mut after): (u64, u64),
    tx: &mpsc::Sender<Bytes>,
) {
    for _ in 0..ERASURE_PAGES_PER_FOLLOW_MAX {
        let Ok(page) = shared.disk.erasures_after(room_id, after, ERASURES_PAGE_MAX) else { return };
        let Some(last) = page.last().map(|record| record.seq) else { return };
        let erasures = page
            .into_iter()
            .map(|record| ErasureRecord { seq: record.seq, log_indices: record.log_indices })
            .collect();
        if !send(tx, &LinkMessage::Erasures { room_id: room_id.0, from_log_index, erasures }) {
            return;
        }
        after = last;
    }
}

/// A feed for the link's replicas: reads whole rooms, as the server.
fn open_feed<G: ServerGroup>(core: &Rc<RefCell<Core<G>>>, tx: &mpsc::Sender<Bytes>) -> SimPeer {
    let mut borrowed = core.borrow_mut();
    borrowed.feeds_opened += 1;
    let id = FEED_CONNECTION_BASE + borrowed.feeds_opened;
    let (outbox, receiver) =
        Outbox::replica_feed(id, SERVER_SENDER_ID, REPLICA_FEED_FRAMES_MAX, REPLICA_FEED_BYTES_MAX);
    let peer = SimPeer::new(outbox, Rc::clone(&borrowed.shared));
    let tamper = borrowed.shared.tamper_feed;
    drop(borrowed);
    tokio::task::spawn_local(pump_feed(Rc::clone(core), peer.clone(), receiver, tx.clone(), tamper));
    peer
}

/// Sends what a feed gathers as `Replicate` messages, as the node's pump
/// does; when the feed closes (it fell behind, or the link ended) the shard
/// forgets it.
async fn pump_feed<G: ServerGroup>(
    core: Rc<RefCell<Core<G>>>,
    peer: SimPeer,
    mut receiver: OutboxReceiver,
    tx: mpsc::Sender<Bytes>,
    tamper: bool,
) {
    let mut batch = VecDeque::new();
    loop {
        let next = receiver.next_batch(&mut batch).await;
        let frames = batch.drain(..).map(|frame| if tamper { tampered(frame) } else { frame });
        let mut sent = true;
        for message in frame_messages(frames, |frames| LinkMessage::Replicate { frames }) {
            if tx.send(Bytes::from(message)).await.is_err() {
                sent = false;
                break;
            }
        }
        if !sent || next == Outgoing::Close {
            break;
        }
    }
    peer.outbox().close();
    core.borrow_mut().shard.handle_connection_closed(peer.outbox().connection());
    drive(&core);
}

/// An erasure of the authority's, waiting for its entries to be durable in
/// the replica.
#[derive(Debug)]
pub(crate) struct PendingErasure {
    room_id: RoomId,
    log_indices: Vec<u64>,
    /// The journal record's position, for an erasure from the journal.
    cursor: Option<u64>,
}

/// The injected "equivocating authority": some application frames reach
/// the other domain with their last byte altered.
fn tampered(frame: Bytes) -> Bytes {
    let Ok(decoded) = Frame::decode(&frame) else { return frame };
    if decoded.opcode() != Opcode::Application || decoded.header().log_index() % 7 != TAMPERED_INDEX_REMAINDER
    {
        return frame;
    }
    let mut bytes = frame.to_vec();
    if let Some(last) = bytes.last_mut() {
        *last ^= 0x01;
    }
    Bytes::from(bytes)
}

/// The replica's side: dials the authority, follows every room it orders,
/// takes what it sends; dials again whenever the link ends.
pub(crate) async fn follow_authority<G: ServerGroup>(core: Rc<RefCell<Core<G>>>) -> std::io::Result<()> {
    let shared = Rc::clone(&core.borrow().shared);
    let mut links = 0u64;
    loop {
        let dial = turmoil::net::TcpStream::connect(("server", FEDERATION_PORT));
        if let Ok(Ok(stream)) = tokio::time::timeout(Duration::from_millis(LINK_IDLE_MS), dial).await {
            if !shared.failed.get() {
                links += 1;
                shared.stats.borrow_mut().links += 1;
                run_link(&core, stream, links).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(RECONNECT_MS)).await;
    }
}

async fn run_link<G: ServerGroup>(core: &Rc<RefCell<Core<G>>>, stream: turmoil::net::TcpStream, link: u64) {
    let shared = Rc::clone(&core.borrow().shared);
    let (read, write) = stream.into_split();
    let seed = u64::from_be_bytes(
        crate::derive_seed(shared.seed, b"link-writer", link)[..8].try_into().unwrap_or_default(),
    );
    let tx = spawn_writer(write, Rc::clone(&shared.loss), seed);
    let rooms = core.borrow().remote_rooms.clone();
    for room_id in &rooms {
        core.borrow_mut().follow_room(*room_id, &tx);
    }
    let pinger = tokio::task::spawn_local(ping(Rc::clone(core), tx.clone()));
    let mut reader = MessageReader { half: read };
    while let Some(message) = reader.next_within_idle().await {
        if shared.failed.get() {
            break;
        }
        match message {
            LinkMessage::Replicate { frames } => {
                core.borrow_mut().replicated(frames, &tx);
                drive(core);
            }
            LinkMessage::Erasures { room_id, from_log_index, erasures } => {
                let mut core = core.borrow_mut();
                for record in erasures {
                    let log_indices = record.log_indices.into_iter().filter(|index| *index < from_log_index);
                    core.erase_when_held(RoomId(room_id), log_indices.collect(), Some(record.seq), None);
                }
                core.apply_erasures();
            }
            _ => {}
        }
    }
    pinger.abort();
    let mut core = core.borrow_mut();
    let rooms = core.remote_rooms.clone();
    core.follows.link_down(rooms);
    core.publish_follows();
}

/// Pings the authority, and follows the rooms recorded since the link came
/// up (a member's Welcome records a room, and its first read follows it).
async fn ping<G: ServerGroup>(core: Rc<RefCell<Core<G>>>, tx: mpsc::Sender<Bytes>) {
    for sequence in 0u64.. {
        if !send(&tx, &LinkMessage::Ping { sequence }) && tx.is_closed() {
            return;
        }
        core.borrow_mut().follow_recorded_rooms(&tx);
        tokio::time::sleep(Duration::from_millis(LINK_PING_MS)).await;
    }
}

impl<G: ServerGroup> Core<G> {
    /// Follows every room recorded on the disk since the last look.
    fn follow_recorded_rooms(&mut self, tx: &mpsc::Sender<Bytes>) {
        let Ok(recorded) = self.shared.disk.remote_rooms() else { return };
        for (room_id, _) in recorded {
            if !self.remote_rooms.contains(&room_id) {
                self.remote_rooms.push(room_id);
                self.follow_room(room_id, tx);
            }
        }
    }

    /// Follows `room_id` from the replica's head.
    fn follow_room(&mut self, room_id: RoomId, tx: &mpsc::Sender<Bytes>) {
        let erasures_after = self.shared.disk.replica_erasure_cursor(room_id).unwrap_or(0);
        let message = self.follows.start(room_id, self.shard.replica_next_log_index(room_id), erasures_after);
        self.shared.stats.borrow_mut().follows += 1;
        if !send(tx, &message) {
            self.follows.not_sent(room_id);
        }
        self.publish_follows();
    }

    /// One `Replicate` message from the authority, as the node's follower
    /// takes it.
    fn replicated(&mut self, frames: Vec<ByteBuf>, tx: &mpsc::Sender<Bytes>) {
        let remote = self.remote_rooms.clone();
        for item in FollowState::sort_feed(frames, |room_id| remote.contains(&room_id)) {
            match item {
                FeedItem::Frames(room_id, frames) => {
                    let taken = frames.into_iter().try_for_each(|frame| self.shard.handle_replicated(frame));
                    self.follows.taken(room_id, taken.is_ok());
                    if taken.is_err() {
                        self.shared.stats.borrow_mut().replica_refusals += 1;
                        self.follow_room(room_id, tx);
                    }
                }
                FeedItem::CaughtUp { room_id, next_log_index, log_head } => {
                    if self.follows.caught_up(room_id, next_log_index, log_head) {
                        self.go_live(room_id);
                    }
                }
                FeedItem::FollowAgain(room_id) => self.follow_room(room_id, tx),
                FeedItem::Erased { room_id, log_index } => {
                    self.erase_when_held(room_id, vec![log_index], None, Some(tx))
                }
                FeedItem::Refused { room_id, code, message } => {
                    self.follows.refused(room_id);
                    self.shared.feed_refusals.borrow_mut().push(format!("room {room_id}: {code} {message}"));
                }
                FeedItem::Dropped(label) => {
                    self.shared.feed_refusals.borrow_mut().push(format!("a frame dropped: {label}"))
                }
            }
        }
        self.apply_erasures();
        self.publish_follows();
    }

    /// Queues an erasure of the authority's for when its entries are
    /// durable here (at most [`REPLICA_ERASURE_TASKS_MAX`] wait, as in the
    /// node's follower; beyond, a notice makes the room be followed again).
    pub(crate) fn erase_when_held(
        &mut self,
        room_id: RoomId,
        log_indices: Vec<u64>,
        cursor: Option<u64>,
        notice_link: Option<&mpsc::Sender<Bytes>>,
    ) {
        if self.shared.ignore_erasures {
            return;
        }
        if self.erasures.len() >= REPLICA_ERASURE_TASKS_MAX {
            if let Some(tx) = notice_link {
                self.follow_room(room_id, tx);
            }
            return;
        }
        self.erasures.push_back(PendingErasure { room_id, log_indices, cursor });
    }

    /// Applies, in order, the queued erasures whose entries are durable
    /// here (one not yet durable holds back the later ones of its room), as
    /// the node's follower does: [`plan_replica_erasure`] over the stored
    /// entries, the shard hides them, the store erases them (moving the
    /// journal cursor).
    pub(crate) fn apply_erasures(&mut self) {
        let mut waiting = VecDeque::new();
        let mut held_back: Vec<RoomId> = Vec::new();
        while let Some(pending) = self.erasures.pop_front() {
            if self.shared.failed.get() {
                return;
            }
            let needed = pending.log_indices.iter().max().map_or(0, |last| last + 1);
            let durable_next = self.shard.replica_durable_next(pending.room_id);
            if held_back.contains(&pending.room_id) || durable_next.is_some_and(|durable| durable < needed) {
                held_back.push(pending.room_id);
                waiting.push_back(pending);
                continue;
            }
            if durable_next.is_some() {
                self.erase_in_replica(&pending);
            }
        }
        self.erasures = waiting;
    }

    fn erase_in_replica(&mut self, pending: &PendingErasure) {
        let disk = Arc::clone(&self.shared.disk);
        let mut entries = Vec::with_capacity(pending.log_indices.len());
        for &log_index in &pending.log_indices {
            match disk.read_range(pending.room_id, log_index, 1) {
                Ok(read) => entries.extend(read.into_iter().take(1)),
                Err(_) => return,
            }
        }
        let plan = plan_replica_erasure(&entries);
        if !plan.erase.is_empty() {
            self.shard.handle_erased(pending.room_id, &plan.erase);
        }
        let redaction = Redaction { erased_at_ms: self.shared.now_ms(), cause: ErasureCause::Authority };
        let erased = match pending.cursor {
            Some(cursor) => disk.redact_replicated(pending.room_id, &plan.erase, &redaction, cursor).is_ok(),
            None if plan.erase.is_empty() => false,
            None => disk.redact(pending.room_id, &plan.erase, &redaction).is_ok(),
        };
        if erased {
            self.shared.stats.borrow_mut().replica_erased += plan.erase.len() as u64;
        }
    }

    /// Every follow that caught up goes live once the replica is durable
    /// there and the authority's signed head holds.
    pub(crate) fn go_live_all(&mut self) {
        for room_id in self.follows.going_live() {
            self.go_live(room_id);
        }
        self.publish_follows();
    }

    fn go_live(&mut self, room_id: RoomId) {
        let durable_next = self.shard.replica_durable_next(room_id);
        if let LiveStep::CheckHead(signed) = self.follows.durable(room_id, durable_next) {
            let outcome = self.shard.check_replica_head(room_id, &signed);
            if let Some(Err(error)) = &outcome {
                self.shared.equivocations.borrow_mut().push(format!("room {room_id}: {error}"));
            }
            let (label, _) = self.follows.head_checked(room_id, outcome);
            if let Some(label) = label {
                *self.shared.head_checks.borrow_mut().entry(label).or_default() += 1;
            }
        }
    }

    /// Publishes which replicas are live, for the convergence check.
    pub(crate) fn publish_follows(&self) {
        let live = self
            .remote_rooms
            .iter()
            .copied()
            .filter(|room_id| self.follows.following(*room_id) == Some(Following::Live))
            .collect();
        *self.shared.live_replicas.borrow_mut() = live;
    }
}
