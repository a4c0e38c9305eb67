//! The simulated server: a thin turmoil shell around the server's real room
//! core. Every decision is made by production code: [`Session`] for each
//! connection, the pure [`Shard`] (sequencers over real MLS state, the
//! history-to-live handover, Welcome routing, snapshots, moderation),
//! the real [`Outbox`] of every connection, the history reader
//! ([`send_history`]), Welcome storage ([`store_welcome`]), the key-package
//! [`directory`] and recovery ([`recover_room_state`]), over a simulated
//! disk. The shell only moves bytes, waits for the disk and carries out the
//! shard's outputs, as the tokio node does.
//!
//! Every frame the shard releases to a connection passes a probe that
//! compares it with the disk: an acknowledgement, fan-out or Welcome of an
//! index that is not durable yet is recorded as an [`EarlyRelease`].
//!
//! Differences from the tokio node, all in I/O: one task owns every room
//! (one shard; the simulation is single-threaded), one storage batch is in
//! flight at a time, and storage calls are made directly (the disk's latency
//! is spent before each write) instead of on blocking threads.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use kalandra_proto::payload;
use kalandra_proto::{ErrorCode, Frame, Opcode, RoomId, SenderId};
use kalandra_server::sim::directory;
use kalandra_server::sim::MlsRoomGroup;
use kalandra_server::sim::PersistentGroup;
use kalandra_server::sim::ServerSigner;
use kalandra_server::sim::OUTBOX_BYTES_MAX_DEFAULT;
use kalandra_server::sim::{
    error_frame, moderation_reply, moderation_request, reply_frame, AppendBatch, ConnectionId, HistoryRead,
    ModerationDone, OtherRoute, Output, Peer, RecoveredRoom, RoomRequest, Routed, Shard, ShardConfig,
};
use kalandra_server::sim::{forget_welcomes_for_room, recover_room_state, send_history, store_welcome};
use kalandra_server::sim::{Outbox, OutboxReceiver, Outgoing};
use kalandra_server::sim::{Session, Step};
use kalandra_server::store::group_commit::write_parts;
use kalandra_server::store::Store;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::sync::{mpsc, Notify};

use crate::disk::{Medium, SimDisk};
use crate::net::{spawn_writer, FrameReader, Loss, SERVER_PORT};

/// A connection that sends nothing for this long is closed.
pub const IDLE_TIMEOUT_MS: u64 = 5_000;
/// Frames a connection's outbox holds (the production default).
pub const OUTBOX_FRAMES_MAX: usize = 1024;
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

/// Most the server's clock steps back at a restart (a wall clock corrected
/// by NTP, a VM restored): the room core must still never stamp a time
/// earlier than one it stamped before.
pub const CLOCK_STEP_BACK_MAX_MS: u64 = 5_000;

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

/// A frame handed to a connection before it was durable: what checker (a)
/// looks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EarlyRelease {
    /// The room.
    pub room_id: RoomId,
    /// What was released (acknowledgement, fan-out, Welcome).
    pub what: &'static str,
    /// Its log index.
    pub log_index: u64,
    /// The room's durable head (first index not on the disk) at that moment.
    pub durable_next: u64,
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
    /// What the disk keeps its data in.
    pub medium: Medium,
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
    /// Frames released before they were durable (should stay empty).
    pub early_releases: RefCell<Vec<EarlyRelease>>,
    /// How far this life's clock runs behind simulated time.
    pub clock_behind_ms: Cell<u64>,
}

impl ServerShared {
    /// The server's clock (ms since the Unix epoch): simulated time, behind
    /// by the step drawn at this boot.
    pub fn now_ms(&self) -> u64 {
        now_ms().saturating_sub(self.clock_behind_ms.get())
    }
}

/// One seed in this many keeps the server's data in the production redb
/// store (in a temporary directory) instead of the in-memory store.
pub const REDB_EVERY_SEEDS: u64 = 8;

impl ServerShared {
    /// A server whose disk and randomness come from `seed`.
    pub fn new(seed: u64, bugs: ShellBugs) -> ServerShared {
        let medium = if seed.is_multiple_of(REDB_EVERY_SEEDS) { Medium::Redb } else { Medium::Memory };
        let server_key = ed25519_dalek::SigningKey::from_bytes(&crate::derive_seed(seed, b"server-key", 0))
            .verifying_key()
            .to_bytes();
        ServerShared {
            disk: Arc::new(
                SimDisk::on(
                    medium,
                    u64::from_le_bytes(
                        crate::derive_seed(seed, b"disk", 0)[..8].try_into().expect("8 bytes"),
                    ),
                )
                .expect("a temporary directory for the simulated disk"),
            ),
            medium,
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
            early_releases: RefCell::new(Vec::new()),
            clock_behind_ms: Cell::new(0),
        }
    }
}

/// A connection as the shard sees it: its real outbox, behind the
/// durability probe.
#[derive(Clone)]
pub struct SimPeer {
    outbox: Arc<Outbox>,
    shared: Rc<ServerShared>,
}

impl SimPeer {
    /// Records `frame` if it releases an index the disk does not hold yet.
    fn probe(&self, frame: &Bytes) {
        let Ok(frame) = Frame::decode(frame) else { return };
        let header = frame.header();
        let (what, log_index) = match frame.opcode() {
            Opcode::Ack => match frame.decode_payload::<payload::Ack>() {
                // A moderation act that sequenced nothing names no index.
                Ok(ack) if ack.log_index != u64::MAX => ("acknowledgement", ack.log_index),
                _ => return,
            },
            Opcode::Welcome => ("Welcome", header.log_index()),
            Opcode::CreateRoom
            | Opcode::Commit
            | Opcode::Proposal
            | Opcode::Application
            | Opcode::ExternalJoin => ("fan-out", header.log_index()),
            _ => return,
        };
        if what == "acknowledgement" {
            self.shared.stats.borrow_mut().acknowledged += 1;
        }
        let room_id = header.room_id();
        let durable_next = self.shared.disk.next_log_index(room_id).unwrap_or(0);
        if log_index >= durable_next {
            let release = EarlyRelease { room_id, what, log_index, durable_next };
            self.shared.early_releases.borrow_mut().push(release);
        }
    }
}

impl Peer for SimPeer {
    fn connection(&self) -> ConnectionId {
        self.outbox.connection()
    }
    fn sender(&self) -> SenderId {
        self.outbox.sender()
    }
    fn try_send(&self, frame: Bytes) -> bool {
        self.probe(&frame);
        let sent = self.outbox.try_send(frame);
        if sent {
            self.shared.stats.borrow_mut().fanned_out += 1;
        }
        sent
    }
    fn try_reply(&self, frame: Bytes) -> bool {
        self.probe(&frame);
        self.outbox.try_reply(frame)
    }
    fn notice(&self, frame: Bytes) {
        self.probe(&frame);
        self.outbox.notice(frame)
    }
    fn free_capacity(&self) -> usize {
        self.outbox.free_capacity()
    }
    fn free_bytes(&self) -> usize {
        self.outbox.free_bytes()
    }
    fn sync_readers(&self) -> &Arc<std::sync::atomic::AtomicUsize> {
        Peer::sync_readers(&self.outbox)
    }
}

struct Conn {
    /// The socket's writer, until the outbox takes it over at authentication.
    tx: Option<mpsc::Sender<Bytes>>,
    /// The authenticated connection.
    peer: Option<SimPeer>,
}

/// A moderation act waiting for the shard's answer.
struct PendingAct {
    conn: u64,
    room_id: RoomId,
    request_id: u32,
}

struct Core<G: ServerGroup> {
    shared: Rc<ServerShared>,
    shard: Shard<G, SimPeer>,
    conns: BTreeMap<u64, Conn>,
    acts: BTreeMap<u64, PendingAct>,
    next_token: u64,
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
    let mut clock_rng =
        ChaCha8Rng::from_seed(crate::derive_seed(shared.seed, b"server-clock", u64::from(boot)));
    if boot > 1 {
        // Each restart may find the clock stepped back from where the last life left it.
        let behind = shared.clock_behind_ms.get() + clock_rng.next_u64() % (CLOCK_STEP_BACK_MAX_MS + 1);
        shared.clock_behind_ms.set(behind);
    }
    let rooms = recover::<G>(&shared)?;
    let signing_key =
        ed25519_dalek::SigningKey::from_bytes(&crate::derive_seed(shared.seed, b"server-key", 0));
    let config = ShardConfig {
        rooms_per_user_max: kalandra_server::sim::ROOMS_PER_USER_MAX_DEFAULT,
        server_signer: Arc::new(ServerSigner::new(signing_key)),
    };
    let flush = Rc::new(Notify::new());
    let core = Rc::new(RefCell::new(Core {
        shared: Rc::clone(&shared),
        shard: Shard::new(config, Arc::new(Mutex::new(HashMap::new())), rooms),
        conns: BTreeMap::new(),
        acts: BTreeMap::new(),
        next_token: 0,
        flush: Rc::clone(&flush),
    }));
    core.borrow().publish();
    tokio::task::spawn_local(flusher(Rc::clone(&core), flush));
    tokio::task::spawn_local(ticker(Rc::clone(&core)));
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

/// Every stored room, rebuilt by the production recovery.
fn recover<G: ServerGroup>(
    shared: &ServerShared,
) -> Result<Vec<RecoveredRoom<G>>, Box<dyn std::error::Error>> {
    let mut rooms = Vec::new();
    for room_id in shared.disk.rooms() {
        let head = shared.disk.next_log_index(room_id)?;
        match recover_room_state::<G>(shared.disk.as_ref(), room_id, head) {
            Ok(recovered) => rooms.push(recovered),
            Err(error) => {
                *shared.recovery_error.borrow_mut() = Some(format!("room {room_id}: {error}"));
                return Err(format!("recovery failed: room {room_id}: {error}").into());
            }
        }
    }
    Ok(rooms)
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
    core.borrow_mut().conns.insert(conn, Conn { tx: Some(tx), peer: None });
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
        let step = session.on_frame(frame, shared.now_ms());
        let close = {
            let mut core = core.borrow_mut();
            match step {
                Step::Reply(bytes) => core.reply(conn, bytes),
                Step::Authenticated { sender, reply } => core.authenticated(conn, sender, reply),
                Step::Route(sender, route) => core.route(conn, sender, route),
                Step::Close(bytes) => {
                    core.reply(conn, bytes);
                    core.closed(conn);
                }
                Step::Goodbye => core.closed(conn),
                Step::Ignore => {}
            }
            core.conns.get(&conn).is_none_or(|c| c.peer.as_ref().is_some_and(|p| p.outbox.is_closing()))
        };
        drive(&core);
        if close {
            break;
        }
    }
    core.borrow_mut().closed(conn);
    drive(&core);
}

/// Moves what the outbox queues to the socket's writer, as the QUIC
/// writer does.
async fn pump(mut receiver: OutboxReceiver, tx: mpsc::Sender<Bytes>) {
    let mut batch = VecDeque::new();
    loop {
        let next = receiver.next_batch(&mut batch).await;
        for frame in batch.drain(..) {
            if tx.send(frame).await.is_err() {
                return;
            }
        }
        if next == Outgoing::Close {
            return;
        }
    }
}

async fn flusher<G: ServerGroup>(core: Rc<RefCell<Core<G>>>, flush: Rc<Notify>) {
    loop {
        flush.notified().await;
        loop {
            let (batch, latency_ms, early_ack, disk) = {
                let mut core = core.borrow_mut();
                if core.shared.failed.get() {
                    break;
                }
                let Some(batch) = core.shard.take_batch() else { break };
                let shared = &core.shared;
                shared.stats.borrow_mut().sequenced += batch.entries.len() as u64;
                (
                    batch,
                    shared.disk_latency_ms.get(),
                    shared.bugs.ack_before_durable,
                    Arc::clone(&shared.disk),
                )
            };
            if early_ack {
                // Injected bug: report the batch durable first, write it later.
                core.borrow_mut().shard.handle_durable(batch.id, Ok(()));
                drive(&core);
                tokio::time::sleep(Duration::from_millis(latency_ms)).await;
                if write_batch(&disk, &batch).is_err() {
                    core.borrow_mut().storage_failed();
                }
            } else {
                // The write and its sync take this long; a crash meanwhile loses the batch.
                tokio::time::sleep(Duration::from_millis(latency_ms)).await;
                let result = write_batch(&disk, &batch);
                core.borrow_mut().shard.handle_durable(batch.id, result);
            }
            drive(&core);
        }
    }
}

/// Appends a batch with group commit's write step, then stores its
/// Welcomes, as the node does.
fn write_batch(disk: &SimDisk, batch: &AppendBatch) -> Result<(), String> {
    let report = write_parts(disk, vec![batch], |batch| &batch.entries);
    for (_, outcome) in report.outcomes {
        outcome.map_err(|error| error.to_string())?;
    }
    batch.welcomes.iter().try_for_each(|welcome| store_welcome(disk, welcome))
}

/// The shard's periodic work (reminders of uncovered server proposals,
/// ended bans).
async fn ticker<G: ServerGroup>(core: Rc<RefCell<Core<G>>>) {
    loop {
        tokio::time::sleep(Duration::from_millis(kalandra_server::sim::MODERATION_TICK_MS)).await;
        {
            let mut core = core.borrow_mut();
            if core.shared.failed.get() || !core.shard.wants_ticks() {
                continue;
            }
            let now_ms = core.shared.now_ms();
            core.shard.handle_tick(now_ms);
        }
        drive(&core);
    }
}

/// Carries out the shard's outputs and starts the history readers it asks for.
fn drive<G: ServerGroup>(core: &Rc<RefCell<Core<G>>>) {
    let reads = core.borrow_mut().carry_out();
    for read in reads {
        tokio::task::spawn_local(read_history(Rc::clone(core), read));
    }
}

/// The production history reader over the simulated disk.
async fn read_history<G: ServerGroup>(core: Rc<RefCell<Core<G>>>, read: HistoryRead<SimPeer>) {
    let disk = Arc::clone(&core.borrow().shared.disk);
    let outbox = Arc::clone(&read.peer.outbox);
    let room_id = read.room_id;
    let reached = send_history(&read, &outbox, |from, count| {
        let result = disk.read_range(room_id, from, count).map_err(|error| error.to_string());
        async move { result }
    })
    .await;
    if let Some(next_log_index) = reached {
        core.borrow_mut().shard.handle_caught_up(room_id, read.subscription, next_log_index);
        drive(&core);
    }
}

impl<G: ServerGroup> Core<G> {
    /// A reply to the connection: through its outbox once authenticated
    /// (never dropped), straight to the socket's writer before.
    fn reply(&mut self, conn: u64, bytes: Bytes) {
        let Some(entry) = self.conns.get(&conn) else { return };
        if let Some(peer) = &entry.peer {
            if !peer.try_reply(bytes.clone()) {
                peer.notice(bytes);
            }
        } else if entry.tx.as_ref().is_none_or(|tx| tx.try_send(bytes).is_err()) {
            self.closed(conn);
        }
    }

    fn authenticated(&mut self, conn: u64, sender: SenderId, reply: Bytes) {
        let Some(entry) = self.conns.get_mut(&conn) else { return };
        let Some(tx) = entry.tx.take() else { return };
        if tx.try_send(reply).is_err() {
            self.closed(conn);
            return;
        }
        let (outbox, receiver) = Outbox::new(conn, sender, OUTBOX_FRAMES_MAX, OUTBOX_BYTES_MAX_DEFAULT);
        tokio::task::spawn_local(pump(receiver, tx));
        entry.peer = Some(SimPeer { outbox, shared: Rc::clone(&self.shared) });
        self.deliver_pending_welcomes(conn);
    }

    /// Hands the recipient's stored Welcomes to its connection; they stay
    /// stored until it reads the room, as the node keeps them.
    fn deliver_pending_welcomes(&mut self, conn: u64) {
        let Some(peer) = self.conns.get(&conn).and_then(|c| c.peer.clone()) else { return };
        let mut after = None;
        loop {
            let Ok(page) = self.shared.disk.pending_welcomes(peer.sender().0, after) else { return };
            if page.is_empty() {
                return;
            }
            peer.outbox.mark_welcomes_delivered();
            for welcome in page {
                after = Some(welcome.welcome_id);
                if !peer.try_send(welcome.welcome) {
                    return;
                }
            }
        }
    }

    fn closed(&mut self, conn: u64) {
        if let Some(Conn { peer: Some(peer), .. }) = self.conns.remove(&conn) {
            peer.outbox.close();
            self.shard.handle_connection_closed(conn);
        }
    }

    fn route(&mut self, conn: u64, sender: SenderId, route: kalandra_server::sim::Route) {
        let Some(peer) = self.conns.get(&conn).and_then(|c| c.peer.clone()) else { return };
        match RoomRequest::from_route(route) {
            Routed::Room(request) => {
                if request.reads_room() && peer.outbox.welcomes_delivered() {
                    forget_welcomes_for_room(self.shared.disk.as_ref(), sender, request.room_id());
                }
                self.shard.handle_request(&peer, request, self.shared.now_ms());
                self.flush.notify_one();
            }
            Routed::Other(OtherRoute::KeyPackageUpload { request_id, upload }) => {
                let reply = match directory::upload(self.shared.disk.as_ref(), sender, &upload) {
                    Ok(status) => reply_frame(RoomId::default(), request_id, &status),
                    Err(error) => {
                        error_frame(RoomId::default(), request_id, error.error_code(), &error.to_string())
                    }
                };
                self.reply(conn, reply);
            }
            Routed::Other(OtherRoute::KeyPackageClaim { request_id, claim }) => {
                let reply = match directory::claim(self.shared.disk.as_ref(), &claim) {
                    Ok(claimed) => reply_frame(RoomId::default(), request_id, &claimed),
                    Err(error) => {
                        error_frame(RoomId::default(), request_id, error.error_code(), &error.to_string())
                    }
                };
                self.reply(conn, reply);
            }
            Routed::Other(OtherRoute::Moderation(frame)) => self.moderate(conn, sender, &frame),
        }
    }

    fn moderate(&mut self, conn: u64, sender: SenderId, frame: &Frame) {
        let (room_id, request_id) = (frame.header().room_id(), frame.header().request_id());
        if frame.opcode() == Opcode::Redact {
            let message = "not offered by this server";
            self.reply(conn, error_frame(room_id, request_id, ErrorCode::UnexpectedFrame, message));
            return;
        }
        match moderation_request(frame, sender, self.shared.now_ms()) {
            Err((code, message)) => self.reply(conn, error_frame(room_id, request_id, code, &message)),
            Ok(request) => {
                self.next_token += 1;
                self.acts.insert(self.next_token, PendingAct { conn, room_id, request_id });
                self.shard.handle_moderate(request, self.next_token, self.shared.now_ms());
                self.flush.notify_one();
            }
        }
    }

    /// Carries out the shard's outputs; returns the history reads to start.
    fn carry_out(&mut self) -> Vec<HistoryRead<SimPeer>> {
        let mut reads = Vec::new();
        while let Some(output) = self.shard.poll_output() {
            match output {
                Output::ReadHistory(read) => reads.push(read),
                Output::DeliverWelcomes { recipients } => {
                    let online: Vec<u64> = self
                        .conns
                        .iter()
                        .filter(|(_, c)| c.peer.as_ref().is_some_and(|p| recipients.contains(&p.sender())))
                        .map(|(id, _)| *id)
                        .collect();
                    for conn in online {
                        self.deliver_pending_welcomes(conn);
                    }
                }
                Output::Snapshot { room_id, metadata } => {
                    // Best effort, as in the node: a failed snapshot only means a longer replay.
                    let _ = self.shared.disk.put_room_metadata(room_id, &metadata);
                }
                Output::Push { .. } => {}
                Output::RecordModeration(write) => {
                    let result = self.shared.disk.record_moderation(&write.change, &write.event);
                    let failed = result.is_err();
                    if let Some(completion) = write.completion {
                        let outcome = result
                            .map(|audit| ModerationDone {
                                log_index: completion.log_index,
                                epoch: completion.epoch,
                                time_ms: audit.time_ms,
                                audit,
                            })
                            .map_err(|error| {
                                kalandra_server::sim::ModerationFailure::Storage(error.to_string())
                            });
                        self.answer_act(completion.token, &outcome);
                    }
                    if failed {
                        self.storage_failed();
                    }
                }
                Output::ModerationRefused { token, failure } => self.answer_act(token, &Err(failure)),
                Output::StorageFailed { .. } => self.storage_failed(),
            }
        }
        let counters = self.shard.take_counters();
        self.shared.stats.borrow_mut().rejected += counters.rejections.len() as u64;
        self.publish();
        reads
    }

    fn answer_act(
        &mut self,
        token: u64,
        outcome: &Result<ModerationDone, kalandra_server::sim::ModerationFailure>,
    ) {
        if let Some(act) = self.acts.remove(&token) {
            self.reply(act.conn, moderation_reply(act.room_id, act.request_id, outcome));
        }
    }

    fn publish(&self) {
        let mut views = self.shared.rooms.borrow_mut();
        for sequencer in self.shard.sequencers() {
            views.insert(
                sequencer.room_id(),
                RoomView {
                    epoch: sequencer.epoch(),
                    tree_hash: sequencer.group().tree_hash(),
                    next_log_index: sequencer.durable_through().map_or(0, |t| t + 1),
                },
            );
        }
    }

    fn storage_failed(&mut self) {
        if self.shared.failed.replace(true) {
            return;
        }
        self.shared.stats.borrow_mut().storage_failures += 1;
        let conns: Vec<u64> = self.conns.keys().copied().collect();
        for conn in conns {
            self.closed(conn);
        }
    }
}
