//! The simulated server: a thin turmoil shell (TCP, the production codec,
//! a simulated disk) around the server's pure cores — [`Session`] for each
//! connection, one [`RoomSequencer`] per room over a real MLS
//! [`GroupState`], the key-package [`directory`], and recovery through
//! [`recover_room_state`]. Every decision is the cores'; the shell only
//! moves bytes, waits for the disk and routes effects, in the order the
//! production driver (`node.rs`) does: Welcomes stored before the commit is
//! acknowledged, the sender acknowledged instead of echoed, fan-out only
//! after durability.
//!
//! Differences from `node.rs`, all in I/O: one task owns every room (the
//! simulation is single-threaded), history for a subscriber is read and
//! sent in one step (so the hand-over to live fan-out needs no recent-frame
//! window), MLS snapshots are not taken (recovery replays from the
//! `CreateRoom` frame), and a storage failure marks the process failed so
//! that the harness crashes and restarts it, as production exits and is
//! restarted.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use kalandra_proto::payload::{self, CreateRoom};
use kalandra_proto::{ErrorCode, Frame, Opcode, RoomId, SenderId};
use kalandra_server::directory;
use kalandra_server::node::{error_frame, recover_room_state, rejection_frame, server_frame, welcome_frame};
use kalandra_server::room_group::MlsRoomGroup;
use kalandra_server::sequencer::{Effect, PersistentGroup, RoomSequencer, SubmitError};
use kalandra_server::session::{Route, Session, Step};
use kalandra_server::store::{LogEntry, Store};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::sync::{mpsc, Notify};

use crate::disk::SimDisk;
use crate::net::{spawn_writer, FrameReader, Loss, SERVER_PORT};

/// A connection that sends nothing for this long is closed.
pub const IDLE_TIMEOUT_MS: u64 = 5_000;
/// Frames read from the disk per history page.
pub const HISTORY_PAGE_FRAMES: usize = 256;
/// The simulated clock is anchored to the wall clock rounded down to this
/// period. OpenMLS checks leaf-node lifetimes (84 days from creation)
/// against the operating system's clock, also inside the server's
/// `PublicGroup`, so simulated time cannot be a fixed date; within one
/// period every run of a seed produces the same bytes.
pub const CLOCK_PERIOD_MS: u64 = 28 * 24 * 3600 * 1000;

/// Server clock at simulated time zero (ms since the Unix epoch).
pub fn clock_base_ms() -> u64 {
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0));
    wall / CLOCK_PERIOD_MS * CLOCK_PERIOD_MS
}

thread_local! {
    static CLOCK_BASE: u64 = clock_base_ms();
}

/// The current time in the simulation (ms since the Unix epoch).
pub fn now_ms() -> u64 {
    let elapsed = turmoil::sim_elapsed().unwrap_or_default();
    CLOCK_BASE.with(|base| *base) + u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX / 2)
}

/// What the harness needs from a server-side group besides [`PersistentGroup`].
pub trait ServerGroup: PersistentGroup {
    /// The current tree hash (RFC 9420 §7.8).
    fn tree_hash(&self) -> Vec<u8>;
}

impl ServerGroup for MlsRoomGroup {
    fn tree_hash(&self) -> Vec<u8> {
        self.state().tree_hash().to_vec()
    }
}

/// Injected server bugs that live in the shell (see `bugs.rs` for the one
/// that wraps the group state).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShellBugs {
    /// Acknowledge and fan out a batch before writing it.
    pub ack_before_durable: bool,
    /// Drop the last durable frame of every room when restarting.
    pub drop_frame_on_restart: bool,
}

/// Counters of what the server did (across restarts).
#[derive(Debug, Clone, Copy, Default)]
pub struct ServerStats {
    /// Frames sequenced.
    pub sequenced: u64,
    /// Acknowledgements queued.
    pub acknowledged: u64,
    /// Frames queued to subscribers by fan-out.
    pub fanned_out: u64,
    /// Submissions refused by the sequencer.
    pub rejected: u64,
    /// Storage failures (each ends the process).
    pub storage_failures: u64,
    /// Connections accepted.
    pub connections: u64,
}

/// A room's state as the server last saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomView {
    /// MLS epoch.
    pub epoch: u64,
    /// Tree hash.
    pub tree_hash: Vec<u8>,
    /// Next log index.
    pub next_log_index: u64,
}

/// State of the server host that outlives its crashes: the disk, switches
/// and observations.
pub struct ServerShared {
    /// The disk.
    pub disk: Arc<SimDisk>,
    /// Loss on the server's outgoing streams.
    pub loss: Rc<Cell<Loss>>,
    /// Simulated time a durable write takes.
    pub disk_latency_ms: Cell<u64>,
    /// Storage failed: the process must exit (the harness crashes it).
    pub failed: Cell<bool>,
    /// Times the server started.
    pub boots: Cell<u32>,
    /// Counters.
    pub stats: RefCell<ServerStats>,
    /// Rooms as the running server sees them.
    pub rooms: RefCell<BTreeMap<RoomId, RoomView>>,
    /// A recovery failure, if one happened.
    pub recovery_error: RefCell<Option<String>>,
    /// The server's signing key (rooms list it as external sender).
    pub server_key: [u8; 32],
    /// Seed of the server's randomness (nonces, loss draws).
    pub seed: u64,
    /// Injected bugs.
    pub bugs: ShellBugs,
}

impl ServerShared {
    /// A server whose disk and randomness come from `seed`.
    pub fn new(seed: u64, bugs: ShellBugs) -> ServerShared {
        let server_key = ed25519_dalek::SigningKey::from_bytes(&crate::derive_seed(seed, b"server-key", 0))
            .verifying_key()
            .to_bytes();
        ServerShared {
            disk: Arc::new(SimDisk::new(u64::from_le_bytes(
                crate::derive_seed(seed, b"disk", 0)[..8].try_into().expect("8 bytes"),
            ))),
            loss: Rc::new(Cell::new(Loss::default())),
            disk_latency_ms: Cell::new(2),
            failed: Cell::new(false),
            boots: Cell::new(0),
            stats: RefCell::new(ServerStats::default()),
            rooms: RefCell::new(BTreeMap::new()),
            recovery_error: RefCell::new(None),
            server_key,
            seed,
            bugs,
        }
    }
}

struct Conn {
    sender: Option<SenderId>,
    tx: mpsc::Sender<Bytes>,
}

struct SimRoom<G: PersistentGroup> {
    sequencer: RoomSequencer<G>,
    /// Connections waiting for an acknowledgement, aligned with the
    /// sequencer's in-flight frames.
    waiting: VecDeque<(u64, Option<u64>)>,
    /// Live subscribers: connection -> next index owed.
    subscribers: BTreeMap<u64, u64>,
}

struct Core<G: ServerGroup> {
    shared: Rc<ServerShared>,
    rooms: BTreeMap<RoomId, SimRoom<G>>,
    conns: BTreeMap<u64, Conn>,
    batch: Vec<LogEntry>,
    batch_rooms: Vec<(RoomId, u64)>,
    flush: Rc<Notify>,
}

/// Runs one life of the server (until the harness crashes it).
pub async fn run<G: ServerGroup>(shared: Rc<ServerShared>) -> turmoil::Result {
    let boot = shared.boots.get() + 1;
    shared.boots.set(boot);
    shared.failed.set(false);
    if boot > 1 && shared.bugs.drop_frame_on_restart {
        shared.disk.drop_last_entries();
    }
    let mut rooms = BTreeMap::new();
    for room_id in shared.disk.rooms() {
        let head = shared.disk.next_log_index(room_id)?;
        match recover_room_state::<G>(shared.disk.as_ref(), room_id, head) {
            Ok(recovered) => {
                rooms.insert(
                    room_id,
                    SimRoom {
                        sequencer: recovered.sequencer,
                        waiting: VecDeque::new(),
                        subscribers: BTreeMap::new(),
                    },
                );
            }
            Err(error) => {
                *shared.recovery_error.borrow_mut() = Some(format!("room {room_id}: {error}"));
                return Err(format!("recovery failed: room {room_id}: {error}").into());
            }
        }
    }
    let flush = Rc::new(Notify::new());
    let core = Rc::new(RefCell::new(Core {
        shared: Rc::clone(&shared),
        rooms,
        conns: BTreeMap::new(),
        batch: Vec::new(),
        batch_rooms: Vec::new(),
        flush: Rc::clone(&flush),
    }));
    core.borrow().publish();
    tokio::task::spawn_local(flusher(Rc::clone(&core), flush));
    let listener = turmoil::net::TcpListener::bind(("0.0.0.0", SERVER_PORT)).await?;
    let mut rng = ChaCha8Rng::from_seed(crate::derive_seed(shared.seed, b"server-boot", u64::from(boot)));
    let mut next_conn = 0u64;
    loop {
        let (stream, _) = listener.accept().await?;
        if shared.failed.get() {
            continue;
        }
        next_conn += 1;
        shared.stats.borrow_mut().connections += 1;
        let mut nonce = [0u8; 32];
        rng.fill_bytes(&mut nonce);
        let writer_seed = rng.next_u64();
        tokio::task::spawn_local(connection(Rc::clone(&core), stream, next_conn, nonce, writer_seed));
    }
}

async fn connection<G: ServerGroup>(
    core: Rc<RefCell<Core<G>>>,
    stream: turmoil::net::TcpStream,
    conn: u64,
    nonce: [u8; 32],
    writer_seed: u64,
) {
    let shared = Rc::clone(&core.borrow().shared);
    let (read, write) = stream.into_split();
    let tx = spawn_writer(write, Rc::clone(&shared.loss), writer_seed);
    core.borrow_mut().conns.insert(conn, Conn { sender: None, tx });
    let mut reader = FrameReader::new(read);
    let mut session = Session::new(nonce, shared.server_key);
    loop {
        let frame = match tokio::time::timeout(Duration::from_millis(IDLE_TIMEOUT_MS), reader.next()).await {
            Ok(Ok(frame)) => frame,
            _ => break,
        };
        if shared.failed.get() {
            break;
        }
        let step = session.on_frame(frame, now_ms());
        let mut core = core.borrow_mut();
        match step {
            Step::Reply(bytes) => core.send(conn, bytes),
            Step::Authenticated { sender, reply } => {
                core.send(conn, reply);
                if let Some(entry) = core.conns.get_mut(&conn) {
                    entry.sender = Some(sender);
                }
                core.deliver_pending_welcomes(conn, sender);
            }
            Step::Route(sender, route) => core.route(conn, sender, route),
            Step::Close(bytes) => {
                core.send(conn, bytes);
                break;
            }
            Step::Goodbye => break,
            Step::Ignore => {}
        }
        if !core.conns.contains_key(&conn) {
            break;
        }
    }
    core.borrow_mut().closed(conn);
}

async fn flusher<G: ServerGroup>(core: Rc<RefCell<Core<G>>>, flush: Rc<Notify>) {
    loop {
        flush.notified().await;
        loop {
            let (entries, rooms, latency_ms, early_ack, disk) = {
                let mut core = core.borrow_mut();
                if core.batch.is_empty() || core.shared.failed.get() {
                    break;
                }
                let entries = std::mem::take(&mut core.batch);
                let rooms = std::mem::take(&mut core.batch_rooms);
                let shared = &core.shared;
                (
                    entries,
                    rooms,
                    shared.disk_latency_ms.get(),
                    shared.bugs.ack_before_durable,
                    Arc::clone(&shared.disk),
                )
            };
            if early_ack {
                // Injected bug: acknowledge first, write later.
                core.borrow_mut().persisted(&rooms, Ok(()));
                tokio::time::sleep(Duration::from_millis(latency_ms)).await;
                let result = disk.append_batch(&entries).map_err(|e| e.to_string());
                if result.is_err() {
                    core.borrow_mut().storage_failed();
                }
            } else {
                // The write and its sync take this long; a crash meanwhile loses the batch.
                tokio::time::sleep(Duration::from_millis(latency_ms)).await;
                let result = disk.append_batch(&entries).map_err(|e| e.to_string());
                core.borrow_mut().persisted(&rooms, result);
            }
        }
    }
}

impl<G: ServerGroup> Core<G> {
    fn send(&mut self, conn: u64, bytes: Bytes) {
        let Some(entry) = self.conns.get(&conn) else { return };
        if entry.tx.try_send(bytes).is_err() {
            // A reader this far behind is dropped; it resubscribes.
            self.closed(conn);
        }
    }

    fn closed(&mut self, conn: u64) {
        self.conns.remove(&conn);
        for room in self.rooms.values_mut() {
            room.subscribers.remove(&conn);
            for waiting in room.waiting.iter_mut() {
                if waiting.1 == Some(conn) {
                    waiting.1 = None;
                }
            }
        }
    }

    fn publish(&self) {
        let mut views = self.shared.rooms.borrow_mut();
        for (room_id, room) in &self.rooms {
            views.insert(
                *room_id,
                RoomView {
                    epoch: room.sequencer.epoch(),
                    tree_hash: room.sequencer.group().tree_hash(),
                    next_log_index: room.sequencer.durable_through().map_or(0, |t| t + 1),
                },
            );
        }
    }

    fn storage_failed(&mut self) {
        self.shared.failed.set(true);
        self.shared.stats.borrow_mut().storage_failures += 1;
        let conns: Vec<u64> = self.conns.keys().copied().collect();
        for conn in conns {
            self.closed(conn);
        }
    }

    fn route(&mut self, conn: u64, sender: SenderId, route: Route) {
        match route {
            Route::Sequence(frame) => self.submit(conn, sender, frame),
            Route::Subscribe { room_id, from_log_index, request_id } => {
                self.subscribe(conn, sender, room_id, from_log_index, request_id)
            }
            Route::Unsubscribe { room_id } => {
                if let Some(room) = self.rooms.get_mut(&room_id) {
                    room.subscribers.remove(&conn);
                }
            }
            Route::KeyPackageUpload { request_id, upload } => {
                let reply = match directory::upload(self.shared.disk.as_ref(), sender, &upload) {
                    Ok(status) => server_frame(RoomId::default(), request_id, &status),
                    Err(error) => {
                        error_frame(RoomId::default(), request_id, error.error_code(), &error.to_string())
                    }
                };
                self.send(conn, reply);
            }
            Route::KeyPackageClaim { request_id, claim } => {
                let reply = match directory::claim(self.shared.disk.as_ref(), &claim) {
                    Ok(claimed) => server_frame(RoomId::default(), request_id, &claimed),
                    Err(error) => {
                        error_frame(RoomId::default(), request_id, error.error_code(), &error.to_string())
                    }
                };
                self.send(conn, reply);
            }
            Route::Sync { room_id, request_id, .. } | Route::GroupInfo { room_id, request_id } => {
                let message = "not offered by this server";
                self.send(conn, error_frame(room_id, request_id, ErrorCode::UnexpectedFrame, message));
            }
            Route::Ephemeral(frame) | Route::Moderation(frame) => {
                let header = frame.header();
                let message = "not offered by this server";
                let reply =
                    error_frame(header.room_id(), header.request_id(), ErrorCode::UnexpectedFrame, message);
                self.send(conn, reply);
            }
        }
    }

    fn submit(&mut self, conn: u64, sender: SenderId, frame: Frame) {
        let room_id = frame.header().room_id();
        let request_id = frame.header().request_id();
        let now = now_ms();
        let result = if frame.opcode() == Opcode::CreateRoom {
            match self.rooms.entry(room_id) {
                std::collections::btree_map::Entry::Occupied(_) => Err(SubmitError::RoomExists),
                std::collections::btree_map::Entry::Vacant(slot) => {
                    create_room::<G>(room_id, sender, frame, now, &self.shared.server_key).map(
                        |(sequencer, sequenced)| {
                            slot.insert(SimRoom {
                                sequencer,
                                waiting: VecDeque::new(),
                                subscribers: BTreeMap::new(),
                            });
                            sequenced
                        },
                    )
                }
            }
        } else {
            match self.rooms.get_mut(&room_id) {
                Some(room) => room.sequencer.submit(sender, frame, now),
                None => {
                    self.send(conn, error_frame(room_id, request_id, ErrorCode::UnknownRoom, "no such room"));
                    return;
                }
            }
        };
        match result {
            Ok(sequenced) => {
                let room = self.rooms.get_mut(&room_id).expect("sequenced into an existing room");
                room.waiting.push_back((sequenced.log_index, Some(conn)));
                self.batch.push(LogEntry {
                    room_id,
                    log_index: sequenced.log_index,
                    frame: sequenced.frame.to_bytes(),
                });
                match self.batch_rooms.iter_mut().find(|(room, _)| *room == room_id) {
                    Some((_, through)) => *through = sequenced.log_index,
                    None => self.batch_rooms.push((room_id, sequenced.log_index)),
                }
                self.shared.stats.borrow_mut().sequenced += 1;
                self.flush.notify_one();
            }
            Err(error) => {
                self.shared.stats.borrow_mut().rejected += 1;
                self.send(conn, rejection_frame(room_id, request_id, &error));
            }
        }
    }

    fn subscribe(&mut self, conn: u64, sender: SenderId, room_id: RoomId, from: u64, request_id: u32) {
        let Some(room) = self.rooms.get(&room_id) else {
            self.send(conn, error_frame(room_id, request_id, ErrorCode::UnknownRoom, "no such room"));
            return;
        };
        if !room.sequencer.is_member(sender) {
            self.send(conn, error_frame(room_id, request_id, ErrorCode::NotMember, "not a member"));
            return;
        }
        let durable_next = room.sequencer.durable_through().map_or(0, |t| t + 1);
        if from > durable_next {
            let message = format!("log index {from} is beyond the room's head {durable_next}");
            self.send(conn, error_frame(room_id, request_id, ErrorCode::UnknownLogIndex, &message));
            return;
        }
        let mut next = from;
        while next < durable_next {
            let count = usize::try_from(durable_next - next).unwrap_or(usize::MAX).min(HISTORY_PAGE_FRAMES);
            let page = match self.shared.disk.read_range(room_id, next, count) {
                Ok(page) if !page.is_empty() => page,
                _ => break,
            };
            for entry in page {
                next = entry.log_index + 1;
                self.send(conn, kalandra_server::node::history_bytes(room_id, entry));
            }
        }
        self.send(
            conn,
            server_frame(room_id, 0, &payload::SyncDone { next_log_index: durable_next, live: true }),
        );
        if self.conns.contains_key(&conn) {
            if let Some(room) = self.rooms.get_mut(&room_id) {
                room.subscribers.insert(conn, durable_next);
            }
        }
    }

    fn deliver_pending_welcomes(&mut self, conn: u64, recipient: SenderId) {
        let Ok(pending) = self.shared.disk.pending_welcomes(recipient.0) else { return };
        let Some(last) = pending.last().map(|welcome| welcome.welcome_id) else { return };
        for welcome in pending {
            self.send(conn, welcome.welcome);
        }
        let _ = self.shared.disk.delete_welcomes_through(recipient.0, last);
    }

    fn persisted(&mut self, rooms: &[(RoomId, u64)], result: Result<(), String>) {
        if result.is_err() {
            self.shared.failed.set(true);
        }
        let mut effects = Vec::new();
        for &(room_id, through) in rooms {
            effects.clear();
            {
                let Some(room) = self.rooms.get_mut(&room_id) else { continue };
                match &result {
                    Ok(()) if !room.sequencer.is_recovering() => {
                        room.sequencer.durable(through, &mut effects)
                    }
                    Ok(()) => {}
                    Err(_) => room.sequencer.storage_failed(&mut effects),
                }
            }
            // A commit's Welcomes are stored before it is acknowledged.
            for effect in &effects {
                if let Effect::DeliverWelcome { recipients, welcome, ratchet_tree, log_index } = effect {
                    let frame = welcome_frame(room_id, welcome, ratchet_tree, *log_index);
                    let ids: Vec<u64> = recipients.iter().map(|r| r.0).collect();
                    if self.shared.disk.put_welcomes(&ids, frame).is_err() {
                        self.shared.failed.set(true);
                    }
                }
            }
            self.apply_effects(room_id, &mut effects);
        }
        self.publish();
        if self.shared.failed.get() {
            self.storage_failed();
        }
    }

    fn apply_effects(&mut self, room_id: RoomId, effects: &mut Vec<Effect>) {
        let mut submitter: Option<(u64, Option<u64>)> = None;
        for effect in effects.drain(..) {
            match effect {
                Effect::Acknowledge { log_index, epoch, server_time_ms, request_id, .. } => {
                    let room = self.rooms.get_mut(&room_id).expect("room");
                    let (waiting_index, conn) =
                        room.waiting.pop_front().expect("every acknowledged frame waits");
                    assert_eq!(waiting_index, log_index, "acknowledgements follow log order");
                    submitter = Some((log_index, conn));
                    if let Some(conn) = conn {
                        let ack = server_frame(
                            room_id,
                            request_id,
                            &payload::Ack { log_index, epoch, server_time_ms },
                        );
                        self.shared.stats.borrow_mut().acknowledged += 1;
                        self.send(conn, ack);
                    }
                }
                Effect::FanOut { frame, .. } => {
                    let log_index = frame.header().log_index();
                    let skip = match submitter.take() {
                        Some((acked, conn)) if acked == log_index => conn,
                        _ => None,
                    };
                    let bytes = frame.to_bytes();
                    let room = self.rooms.get_mut(&room_id).expect("room");
                    let targets: Vec<u64> = room.subscribers.keys().copied().collect();
                    for conn in targets {
                        let room = self.rooms.get_mut(&room_id).expect("room");
                        let Some(next) = room.subscribers.get_mut(&conn) else { continue };
                        assert_eq!(*next, log_index, "live subscribers see every index");
                        *next = log_index + 1;
                        if Some(conn) != skip {
                            self.shared.stats.borrow_mut().fanned_out += 1;
                            self.send(conn, bytes.clone());
                        }
                    }
                }
                Effect::Reject { request_id, error, .. } => {
                    let room = self.rooms.get_mut(&room_id).expect("room");
                    if let Some((_, Some(conn))) = room.waiting.pop_front() {
                        self.send(conn, rejection_frame(room_id, request_id, &error));
                    }
                }
                Effect::MembershipChanged { removed, .. } => {
                    let gone: Vec<u64> = self
                        .conns
                        .iter()
                        .filter(|(_, c)| c.sender.is_some_and(|s| removed.contains(&s)))
                        .map(|(id, _)| *id)
                        .collect();
                    if let Some(room) = self.rooms.get_mut(&room_id) {
                        for conn in gone {
                            room.subscribers.remove(&conn);
                        }
                    }
                }
                Effect::DeliverWelcome { recipients, .. } => {
                    let online: Vec<(u64, SenderId)> = self
                        .conns
                        .iter()
                        .filter_map(|(id, c)| c.sender.filter(|s| recipients.contains(s)).map(|s| (*id, s)))
                        .collect();
                    for (conn, recipient) in online {
                        self.deliver_pending_welcomes(conn, recipient);
                    }
                }
            }
        }
    }
}

fn create_room<G: ServerGroup>(
    room_id: RoomId,
    sender: SenderId,
    frame: Frame,
    now: u64,
    server_key: &[u8; 32],
) -> Result<(RoomSequencer<G>, kalandra_server::sequencer::Sequenced), SubmitError> {
    let create: CreateRoom = frame.decode_payload()?;
    let group = G::from_create_room(&create.group_info, &create.ratchet_tree)
        .map_err(SubmitError::InvalidGroupInfo)?;
    RoomSequencer::create(room_id, group, sender, frame, now, server_key)
}
