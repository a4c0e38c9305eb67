//! The simulated server: a thin turmoil shell around the server's real room
//! core. Every decision is made by production code: [`Session`] for each
//! connection and [`RoomRequest::from_route`] for where its requests go,
//! the pure [`Shard`] (sequencers over real MLS state, the history-to-live
//! handover, Welcome routing, snapshots, moderation), the real [`Outbox`]
//! of every connection, the history reader ([`send_history`]), Welcome
//! storage, delivery and forgetting ([`store_welcome`],
//! [`deliver_pending_welcomes_with`], [`welcomes_used_by`]), the key-package
//! [`directory`], redaction ([`plan_redaction`]), the answer to a
//! moderation act ([`Completion::outcome`]), group commit's write step
//! ([`write_parts`]) and recovery ([`recover_rooms`]), over a
//! simulated disk. The shell only moves bytes, waits for the disk and
//! carries out the shard's outputs, as the tokio node does.
//!
//! Storage is driven as the node drives group commit: after every input
//! the shard's new entries are taken as a batch (up to
//! [`TICKETS_IN_FLIGHT_MAX`] batches in flight); one writer takes every
//! batch waiting, spends the disk's latency and writes them in one
//! transaction; each batch's Welcomes are stored when the batch is taken,
//! before it is written, and batches are reported durable in the order
//! they were taken.
//!
//! Every frame the shard releases to a connection passes a probe that
//! compares it with the disk: an acknowledgement, fan-out or Welcome of an
//! index that is not durable yet is recorded as an [`EarlyRelease`].
//!
//! Differences from the tokio node, all in I/O: one task owns every room
//! (one shard; the simulation is single-threaded), and storage calls are
//! made directly (the disk's latency is spent before each write) instead
//! of on blocking threads.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use kalandra_proto::federation::DomainName;
use kalandra_proto::payload;
use kalandra_proto::{Frame, Opcode, RoomId, SenderId};
use kalandra_server::sim::directory;
use kalandra_server::sim::{
    deliver_pending_welcomes_with, forget_welcomes_for_room, send_history, store_welcome, welcomes_used_by,
    WelcomeSource,
};
use kalandra_server::sim::{domain_keys, server_frame, HomeIssuer, Session, Step};
use kalandra_server::sim::{
    error_frame, moderation_reply, moderation_request, AppendBatch, Completion, ConnectionId, HistoryRead,
    ModerationDone, ModerationFailure, OtherRoute, Output, Peer, RecoveredRoom, RoomRequest, Routed, Shard,
    ShardConfig, TICKETS_IN_FLIGHT_MAX,
};
use kalandra_server::sim::{
    member_authority, plan_redaction, redact_reply, redact_request, store_redact_error, RedactAsk,
    RedactError, RedactPlan, RedactReport,
};
use kalandra_server::sim::{
    recover_rooms, FollowState, MlsRoomGroup, PersistentGroup, ServerSigner, OUTBOX_BYTES_MAX_DEFAULT,
};
use kalandra_server::sim::{Outbox, OutboxReceiver, Outgoing};
use kalandra_server::store::group_commit::write_parts;
use kalandra_server::store::limits::GROUP_COMMIT_BATCH_ENTRIES_MAX;
use kalandra_server::store::{PendingWelcome, Store, StoredEntry};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::sync::{mpsc, Notify};

use crate::disk::{Medium, SimDisk};
use crate::net::{spawn_writer, FrameReader, Loss, SERVER_PORT};

/// The domain of the simulated server that clients connect to.
pub const SIM_DOMAIN: &str = "authority.sim.test";
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
    /// Storage transactions of log entries (each holding one batch or more).
    pub transactions: u64,
    /// Most batches in flight at once.
    pub batches_in_flight_max: u64,
    /// Moderation acts answered (done or refused).
    pub moderation_acts: u64,
    /// Redactions that erased an entry.
    pub redactions: u64,
    /// Welcomes stored ahead of a batch whose write then failed (it may
    /// have become durable all the same: then they are delivered, else
    /// forgotten as orphans).
    pub welcomes_of_failed_batches: u64,
    /// Stored Welcomes forgotten because their index holds another frame.
    pub welcomes_orphaned: u64,
    /// Of a replica: inter-domain links that came up.
    pub links: u64,
    /// Of a replica: follows asked.
    pub follows: u64,
    /// Of a replica: batches of the authority's frames that did not apply
    /// (a gap after a feed fell behind; followed again).
    pub replica_refusals: u64,
    /// Of a replica: entries it erased after its authority did.
    pub replica_erased: u64,
}

/// What a simulated server is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Orders every room; clients connect to it.
    Authority,
    /// Another domain: keeps a replica of every room (`crate::domains`).
    Replica,
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
    /// Members, by sender id, in id order.
    pub members: Vec<SenderId>,
    /// Server proposals waiting for a covering commit.
    pub proposals_pending: usize,
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
    /// The disk loses each room's last entry at every restart (injected bug).
    pub drop_frame_on_restart: bool,
    /// Frames released before they were durable (should stay empty).
    pub early_releases: RefCell<Vec<EarlyRelease>>,
    /// How far this life's clock runs behind simulated time.
    pub clock_behind_ms: Cell<u64>,
    /// What this server is.
    pub role: Role,
    /// Of an authority: its replica feeds alter frames (injected bug).
    pub tamper_feed: bool,
    /// Of a replica: it ignores its authority's erasures (injected bug).
    pub ignore_erasures: bool,
    /// Of a replica: the rooms whose follow is live.
    pub live_replicas: RefCell<std::collections::BTreeSet<RoomId>>,
    /// Of a replica: outcomes of checking the authority's signed heads.
    pub head_checks: RefCell<BTreeMap<&'static str, u64>>,
    /// Of a replica: signed heads that did not hold (should stay empty).
    pub equivocations: RefCell<Vec<String>>,
    /// Of a replica: refusals and dropped frames from the authority's feed
    /// (should stay empty).
    pub feed_refusals: RefCell<Vec<String>>,
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
    pub fn new(seed: u64, drop_frame_on_restart: bool) -> ServerShared {
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
            drop_frame_on_restart,
            early_releases: RefCell::new(Vec::new()),
            clock_behind_ms: Cell::new(0),
            role: Role::Authority,
            tamper_feed: false,
            ignore_erasures: false,
            live_replicas: RefCell::new(std::collections::BTreeSet::new()),
            head_checks: RefCell::new(BTreeMap::new()),
            equivocations: RefCell::new(Vec::new()),
            feed_refusals: RefCell::new(Vec::new()),
        }
    }

    /// The server of another domain, keeping a replica of each room its
    /// disk records as ordered by another domain.
    pub fn replica(seed: u64, drop_frame_on_restart: bool) -> ServerShared {
        ServerShared { role: Role::Replica, ..ServerShared::new(seed, drop_frame_on_restart) }
    }

    /// What certifies this server's clients as users of its domain
    /// ([`SIM_DOMAIN`], with a federation key of its seed).
    pub fn home_issuer(&self) -> HomeIssuer {
        let key = ed25519_dalek::SigningKey::from_bytes(&crate::derive_seed(self.seed, b"federation-key", 0));
        let domain = DomainName::parse(SIM_DOMAIN).expect("a valid domain name");
        HomeIssuer { domain, key: Arc::new(key) }
    }

    /// The keys this server lists for its domain (its federation key).
    pub fn own_keys(&self) -> kalandra_proto::federation::PeerKeys {
        let home = self.home_issuer();
        let key = kalandra_proto::federation::PeerKey { key: home.key.verifying_key(), valid_until_ms: None };
        kalandra_proto::federation::PeerKeys::new(home.domain, vec![key])
            .expect("one strong key is a valid key list")
    }

    /// Records `frame` if it releases an index the disk does not hold yet.
    fn probe(&self, frame: &Bytes) {
        let Ok(frame) = Frame::decode(frame) else { return };
        let header = frame.header();
        let (what, log_index) = match frame.opcode() {
            Opcode::Ack => match frame.decode_payload::<payload::Ack>() {
                // A moderation act that sequenced nothing names no index;
                // a redaction's names an entry already durable.
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
            self.stats.borrow_mut().acknowledged += 1;
        }
        let room_id = header.room_id();
        let durable_next = self.disk.next_log_index(room_id).unwrap_or(0);
        if log_index >= durable_next {
            let release = EarlyRelease { room_id, what, log_index, durable_next };
            self.early_releases.borrow_mut().push(release);
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
    /// `outbox` behind `shared`'s durability probe.
    pub fn new(outbox: Arc<Outbox>, shared: Rc<ServerShared>) -> SimPeer {
        SimPeer { outbox, shared }
    }

    /// The connection's outbox.
    pub fn outbox(&self) -> &Arc<Outbox> {
        &self.outbox
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
        self.shared.probe(&frame);
        let sent = self.outbox.try_send(frame);
        if sent {
            self.shared.stats.borrow_mut().fanned_out += 1;
        }
        sent
    }
    fn try_reply(&self, frame: Bytes) -> bool {
        self.shared.probe(&frame);
        self.outbox.try_reply(frame)
    }
    fn notice(&self, frame: Bytes) {
        self.shared.probe(&frame);
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
    fn reads_everything(&self) -> bool {
        self.outbox.reads_everything()
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

/// A batch's fate from the writer, for the shard side to report in order.
struct Written {
    batch: AppendBatch,
    result: Result<(), String>,
}

pub(crate) struct Core<G: ServerGroup> {
    pub(crate) shared: Rc<ServerShared>,
    pub(crate) shard: Shard<G, SimPeer>,
    conns: BTreeMap<u64, Conn>,
    acts: BTreeMap<u64, PendingAct>,
    next_token: u64,
    /// Batches taken and not yet reported durable.
    tickets: usize,
    /// Batches handed to the writer and not yet taken by it, with the
    /// outcome of storing their Welcomes (a batch whose Welcomes could not
    /// be stored is failed, never written).
    to_write: VecDeque<(AppendBatch, Result<(), String>)>,
    /// Batches written (or failed), oldest first, to report.
    written: VecDeque<Written>,
    writer_wake: Rc<Notify>,
    durable_wake: Rc<Notify>,
    /// Tasks to start once the core is released.
    tasks: Vec<Task>,
    /// Of an authority: replica feeds opened in this life.
    pub(crate) feeds_opened: u64,
    /// Of a replica: the rooms it keeps (recorded on its disk).
    pub(crate) remote_rooms: Vec<RoomId>,
    /// Of a replica: its follows (the production state machine).
    pub(crate) follows: FollowState,
    /// Of a replica: its authority's erasures waiting for their entries
    /// to be durable here, in order.
    pub(crate) erasures: VecDeque<crate::domains::PendingErasure>,
}

/// Runs one life of the server (until the harness crashes it).
pub async fn run<G: ServerGroup>(shared: Rc<ServerShared>) -> turmoil::Result {
    let boot = shared.boots.get() + 1;
    shared.boots.set(boot);
    shared.failed.set(false);
    if boot > 1 && shared.drop_frame_on_restart {
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
    let remote_rooms: Vec<RoomId> =
        shared.disk.remote_rooms()?.into_iter().map(|(room_id, _)| room_id).collect();
    let mut follows = FollowState::new();
    for room in rooms.iter().filter(|room| room.replica) {
        follows.note_held(room.sequencer.room_id());
    }
    if shared.role == Role::Replica {
        // What this life recovered, not what the last one published.
        shared.rooms.borrow_mut().clear();
        shared.live_replicas.borrow_mut().clear();
    }
    let signing_key =
        ed25519_dalek::SigningKey::from_bytes(&crate::derive_seed(shared.seed, b"server-key", 0));
    let config = ShardConfig {
        rooms_per_user_max: kalandra_server::sim::ROOMS_PER_USER_MAX_DEFAULT,
        server_signer: Arc::new(ServerSigner::new(signing_key)),
    };
    let core = Rc::new(RefCell::new(Core {
        shared: Rc::clone(&shared),
        shard: Shard::new(config, Arc::new(Mutex::new(HashMap::new())), rooms),
        conns: BTreeMap::new(),
        acts: BTreeMap::new(),
        next_token: 0,
        tickets: 0,
        to_write: VecDeque::new(),
        written: VecDeque::new(),
        writer_wake: Rc::new(Notify::new()),
        durable_wake: Rc::new(Notify::new()),
        tasks: Vec::new(),
        feeds_opened: 0,
        remote_rooms,
        follows,
        erasures: VecDeque::new(),
    }));
    core.borrow().publish();
    tokio::task::spawn_local(group_commit_writer(Rc::clone(&core)));
    tokio::task::spawn_local(durability_reporter(Rc::clone(&core)));
    tokio::task::spawn_local(ticker(Rc::clone(&core)));
    if shared.role == Role::Replica {
        crate::domains::follow_authority(core).await?;
        return Ok(());
    }
    tokio::task::spawn_local(crate::domains::serve_links(Rc::clone(&core)));
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

/// Every stored room, rebuilt by the production recovery (rooms recorded
/// as ordered by another domain come back as replicas).
fn recover<G: ServerGroup>(
    shared: &ServerShared,
) -> Result<Vec<RecoveredRoom<G>>, Box<dyn std::error::Error>> {
    recover_rooms::<G>(shared.disk.as_ref()).map_err(|error| {
        *shared.recovery_error.borrow_mut() = Some(error.to_string());
        format!("recovery failed: {error}").into()
    })
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
    let mut session = Session::new(nonce, shared.server_key).with_home(shared.home_issuer());
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

/// Group commit's writer: takes every batch waiting (up to one
/// transaction's entries), spends the disk's latency (a crash meanwhile
/// loses them all), writes them with [`write_parts`] in one transaction and
/// hands their fates to the reporter.
async fn group_commit_writer<G: ServerGroup>(core: Rc<RefCell<Core<G>>>) {
    let wake = Rc::clone(&core.borrow().writer_wake);
    loop {
        wake.notified().await;
        loop {
            let (parts, unwritten, latency_ms, disk) = {
                let mut core = core.borrow_mut();
                if core.shared.failed.get() || core.to_write.is_empty() {
                    break;
                }
                let mut parts = Vec::new();
                let mut unwritten = Vec::new();
                let mut entries = 0;
                while let Some((batch, _)) = core.to_write.front() {
                    if !parts.is_empty() && entries + batch.entries.len() > GROUP_COMMIT_BATCH_ENTRIES_MAX {
                        break;
                    }
                    entries += batch.entries.len();
                    match core.to_write.pop_front().expect("front exists") {
                        (batch, Ok(())) => parts.push(batch),
                        (batch, Err(error)) => unwritten.push(Written { batch, result: Err(error) }),
                    }
                }
                (parts, unwritten, core.shared.disk_latency_ms.get(), Arc::clone(&core.shared.disk))
            };
            tokio::time::sleep(Duration::from_millis(latency_ms)).await;
            if core.borrow().shared.failed.get() {
                break;
            }
            let report = write_parts(disk.as_ref(), parts, |batch| &batch.entries);
            let mut written: Vec<Written> = report
                .outcomes
                .into_iter()
                .map(|(batch, outcome)| Written { batch, result: outcome.map_err(|error| error.to_string()) })
                .chain(unwritten)
                .collect();
            written.sort_by_key(|w| w.batch.id);
            let mut core = core.borrow_mut();
            let mut stats = core.shared.stats.borrow_mut();
            stats.transactions += 1;
            stats.welcomes_of_failed_batches += written
                .iter()
                .filter(|w| w.result.is_err())
                .map(|w| w.batch.welcomes.len() as u64)
                .sum::<u64>();
            drop(stats);
            core.written.extend(written);
            core.durable_wake.notify_one();
        }
    }
}

/// The node's side of a finished ticket, oldest first: report the batch
/// to the shard (its Welcomes were stored before it was written).
async fn durability_reporter<G: ServerGroup>(core: Rc<RefCell<Core<G>>>) {
    let wake = Rc::clone(&core.borrow().durable_wake);
    loop {
        wake.notified().await;
        loop {
            let Written { batch, result } = {
                let mut core = core.borrow_mut();
                if core.shared.failed.get() {
                    break;
                }
                let Some(written) = core.written.pop_front() else { break };
                written
            };
            {
                let mut core = core.borrow_mut();
                core.tickets -= 1;
                core.shard.handle_durable(batch.id, result);
                if core.shared.role == Role::Replica {
                    core.go_live_all();
                    core.apply_erasures();
                }
            }
            drive(&core);
        }
    }
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

/// Carries out the shard's outputs, starts the history readers and Welcome
/// deliveries they need, and hands new entries to storage.
pub(crate) fn drive<G: ServerGroup>(core: &Rc<RefCell<Core<G>>>) {
    let tasks = {
        let mut core = core.borrow_mut();
        core.carry_out();
        core.flush();
        std::mem::take(&mut core.tasks)
    };
    for task in tasks {
        match task {
            Task::History(read) => tokio::task::spawn_local(read_history(Rc::clone(core), read)),
            Task::Welcomes(peer) => tokio::task::spawn_local(deliver_welcomes(Rc::clone(core), peer)),
            Task::Redact { conn, sender, frame } => {
                tokio::task::spawn_local(redact(Rc::clone(core), conn, sender, frame))
            }
        };
    }
}

/// Work the shell starts as its own task, as the node does.
enum Task {
    History(HistoryRead<SimPeer>),
    Welcomes(SimPeer),
    Redact { conn: u64, sender: SenderId, frame: Frame },
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

/// The node's Welcome delivery over the simulated disk; every Welcome read
/// passes the durability probe.
async fn deliver_welcomes<G: ServerGroup>(core: Rc<RefCell<Core<G>>>, peer: SimPeer) {
    let shared = Rc::clone(&core.borrow().shared);
    deliver_pending_welcomes_with(&peer.outbox, &mut DiskWelcomes(shared)).await;
}

/// The node's Welcome reading over the simulated disk; every Welcome handed
/// over passes the durability probe.
struct DiskWelcomes(Rc<ServerShared>);

impl WelcomeSource for DiskWelcomes {
    async fn page(&mut self, recipient: u64, after: Option<u64>) -> Result<Vec<PendingWelcome>, String> {
        self.0.disk.pending_welcomes(recipient, after).map_err(|error| error.to_string())
    }

    async fn entry(&mut self, room_id: RoomId, log_index: u64) -> Result<Option<StoredEntry>, String> {
        let entries = self.0.disk.read_range(room_id, log_index, 1).map_err(|error| error.to_string())?;
        Ok(entries.into_iter().next())
    }

    async fn forget(&mut self, recipient: u64, welcome_id: u64) {
        let _ = self.0.disk.delete_welcomes(recipient, &[welcome_id]);
        self.0.stats.borrow_mut().welcomes_orphaned += 1;
    }

    fn delivering(&mut self, welcome: &Bytes) {
        self.0.probe(welcome);
    }
}

/// A member's `Redact`, as the node answers it: the shard says whether the
/// member moderates the room, [`plan_redaction`] decides over the stored
/// entry, the shard hides it from its recent frames, and the store erases it
/// with its audit record (a durable write).
async fn redact<G: ServerGroup>(core: Rc<RefCell<Core<G>>>, conn: u64, sender: SenderId, frame: Frame) {
    let (room_id, request_id) = (frame.header().room_id(), frame.header().request_id());
    let redact = match redact_request(&frame) {
        Ok(redact) => redact,
        Err(reply) => return core.borrow_mut().reply(conn, reply),
    };
    let result = redact_entry(&core, room_id, redact.log_index, sender, &redact.reason).await;
    if result.as_ref().is_ok_and(|report| report.audit.is_some()) {
        core.borrow().shared.stats.borrow_mut().redactions += 1;
    }
    if matches!(result, Err(RedactError::Storage(_))) {
        core.borrow_mut().storage_failed();
    }
    core.borrow_mut().reply(conn, redact_reply(room_id, request_id, &result));
    drive(&core);
}

async fn redact_entry<G: ServerGroup>(
    core: &Rc<RefCell<Core<G>>>,
    room_id: RoomId,
    log_index: u64,
    member: SenderId,
    reason: &str,
) -> Result<RedactReport, RedactError> {
    let (disk, latency_ms, now_ms, standing) = {
        let core = core.borrow();
        let now_ms = core.shared.now_ms();
        let standing = core.shard.redact_standing(room_id, member, now_ms);
        (Arc::clone(&core.shared.disk), core.shared.disk_latency_ms.get(), now_ms, standing)
    };
    let authority = member_authority(room_id, member, standing)?;
    let storage = |error: &dyn std::fmt::Display| RedactError::Storage(error.to_string());
    let entry = disk.read_range(room_id, log_index, 1).map_err(|e| storage(&e))?.into_iter().next();
    let next_log_index = disk.next_log_index(room_id).map_err(|e| storage(&e))?;
    let ask = RedactAsk { room_id, log_index, actor: member, authority, reason };
    let erasure = match plan_redaction(&ask, entry, next_log_index, now_ms)? {
        RedactPlan::AlreadyErased(report) => return Ok(report),
        RedactPlan::Erase(erasure) => erasure,
    };
    core.borrow_mut().shard.handle_erased(room_id, &[log_index]);
    tokio::time::sleep(Duration::from_millis(latency_ms)).await;
    if core.borrow().shared.failed.get() {
        return Err(RedactError::Internal("the server stopped".into()));
    }
    let (outcomes, audit) = disk
        .redact_audited(room_id, &[log_index], &erasure.redaction, &erasure.event)
        .map_err(store_redact_error)?;
    if outcomes.contains(&kalandra_server::store::RedactOutcome::Erased) {
        core.borrow_mut().shard.handle_erasure_durable(room_id, &[log_index]);
        drive(core);
    }
    erasure.report(&outcomes, audit)
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
        let peer = SimPeer { outbox, shared: Rc::clone(&self.shared) };
        entry.peer = Some(peer.clone());
        self.tasks.push(Task::Welcomes(peer));
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
                if let Some(room_id) = welcomes_used_by(&request, &peer.outbox) {
                    forget_welcomes_for_room(self.shared.disk.as_ref(), sender, room_id);
                }
                self.shard.handle_request(&peer, request, self.shared.now_ms());
            }
            Routed::Other(OtherRoute::Directory(request)) => {
                let own_keys = self.shared.own_keys();
                let reply = directory::answer(
                    self.shared.disk.as_ref(),
                    &own_keys,
                    sender,
                    &request,
                    self.shared.now_ms(),
                );
                self.reply(conn, reply.frame);
            }
            Routed::Other(OtherRoute::Redact(frame)) => self.tasks.push(Task::Redact { conn, sender, frame }),
            Routed::Other(OtherRoute::Moderation(frame)) => self.moderate(conn, sender, &frame),
            Routed::Other(OtherRoute::DomainKeys { request_id, request }) => {
                let own = self.shared.own_keys();
                let keys = domain_keys(&own, &Default::default(), &Default::default(), &request);
                let reply = server_frame(RoomId::default(), request_id, &keys)
                    .expect("a DomainKeys answer for at most 16 domains fits a control frame");
                self.reply(conn, reply);
            }
        }
    }

    fn moderate(&mut self, conn: u64, sender: SenderId, frame: &Frame) {
        let (room_id, request_id) = (frame.header().room_id(), frame.header().request_id());
        match moderation_request(frame, sender) {
            Err((code, message)) => self.reply(conn, error_frame(room_id, request_id, code, &message)),
            Ok(request) => {
                self.next_token += 1;
                self.acts.insert(self.next_token, PendingAct { conn, room_id, request_id });
                self.shard.handle_moderate(request, self.next_token, self.shared.now_ms());
            }
        }
    }

    /// Hands the shard's new entries to storage as a batch, as the node
    /// does after every command, while fewer than
    /// [`TICKETS_IN_FLIGHT_MAX`] batches are in flight.
    fn flush(&mut self) {
        if self.shared.failed.get() || self.tickets >= TICKETS_IN_FLIGHT_MAX {
            return;
        }
        let Some(batch) = self.shard.take_batch() else { return };
        self.tickets += 1;
        // As the node: a batch's Welcomes are stored before the batch.
        let welcomes_stored = batch
            .welcomes
            .iter()
            .try_for_each(|welcome| store_welcome(self.shared.disk.as_ref(), welcome))
            .map_err(|error| format!("storing Welcomes: {error}"));
        let mut stats = self.shared.stats.borrow_mut();
        stats.sequenced += batch.entries.len() as u64;
        stats.batches_in_flight_max = stats.batches_in_flight_max.max(self.tickets as u64);
        drop(stats);
        self.to_write.push_back((batch, welcomes_stored));
        self.writer_wake.notify_one();
    }

    /// Carries out the shard's outputs (the tasks to start go to `tasks`).
    fn carry_out(&mut self) {
        while let Some(output) = self.shard.poll_output() {
            match output {
                Output::ReadHistory(read) => self.tasks.push(Task::History(read)),
                Output::DeliverWelcomes { recipients } => self.tasks.extend(
                    self.conns
                        .values()
                        .filter_map(|c| c.peer.clone())
                        .filter(|peer| recipients.contains(&peer.sender()))
                        .map(Task::Welcomes),
                ),
                Output::Snapshot { room_id, metadata } => {
                    // Best effort, as in the node: a failed snapshot only means a longer replay.
                    let _ = self.shared.disk.put_room_metadata(room_id, &metadata);
                }
                Output::Push { .. } => {}
                Output::RecordModeration(write) => {
                    let result = self.shared.disk.record_moderation(&write.change, &write.event);
                    let failed = result.is_err();
                    if let Some(completion) = write.completion {
                        let written = result.map_err(|error| error.to_string());
                        self.answer_act(&completion, written);
                    }
                    if failed {
                        self.storage_failed();
                    }
                }
                Output::ModerationRefused { token, failure } => self.answer(token, &Err(failure)),
                Output::StorageFailed { .. } => self.storage_failed(),
            }
        }
        let counters = self.shard.take_counters();
        self.shared.stats.borrow_mut().rejected += counters.rejections.len() as u64;
        self.publish();
    }

    fn answer_act(
        &mut self,
        completion: &Completion,
        written: Result<kalandra_server::audit::AuditRecord, String>,
    ) {
        let outcome = completion.outcome(written);
        self.answer(completion.token, &outcome);
    }

    fn answer(&mut self, token: u64, outcome: &Result<ModerationDone, ModerationFailure>) {
        if let Some(act) = self.acts.remove(&token) {
            self.shared.stats.borrow_mut().moderation_acts += 1;
            self.reply(act.conn, moderation_reply(act.room_id, act.request_id, outcome));
        }
    }

    fn publish(&self) {
        let mut views = self.shared.rooms.borrow_mut();
        for sequencer in self.shard.sequencers() {
            let mut members = sequencer.group().members();
            members.sort_by_key(|member| member.0);
            views.insert(
                sequencer.room_id(),
                RoomView {
                    epoch: sequencer.epoch(),
                    tree_hash: sequencer.group().tree_hash(),
                    next_log_index: sequencer.durable_through().map_or(0, |t| t + 1),
                    members,
                    proposals_pending: sequencer.server_proposals_pending().len(),
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
