//! The simulated client: client-core's [`RoomLog`] for every room it is in
//! — the same code `client_core::client::Client` runs to apply a room's log
//! (cursor, commit settlement, outbox settlement by epoch and generation,
//! sender keys, the state machine) on the real MLS group with a seeded
//! provider — behind a turmoil TCP shell that replaces the QUIC
//! `connection.rs`. The shell authenticates, subscribes to each room from
//! its cursor, feeds every frame of each log (and our own frames, stamped
//! from their acknowledgement) to the room's log, keeps a persistent
//! outbox, and acts for a workload: messages (several in flight per room,
//! sent out of sealing order), self-updates, adds (key-package claim and
//! Welcome), removals, leaves, external joins of open rooms, kicks and bans
//! through the server's moderation acts, commits covering what they
//! propose, and redaction of its own messages.
//!
//! # Crash model
//!
//! A crash loses the connection and everything volatile: intents not yet
//! committed and requests in flight. What the client persisted survives,
//! written at the points a real client writes it before going on (after
//! every frame handled and every step of work, before anything that step
//! sends leaves):
//! - the identity secret;
//! - the OpenMLS storage (groups, key-package private keys, pending
//!   commits, a pending external join's group) together with each room
//!   log's checkpoint record ([`client_core::room_log::RoomRecord`]), as
//!   `Client` writes them in one transaction;
//! - the outbox: each message with its latest sealing (frame, epoch,
//!   generation), sealed and persisted before the frame leaves, so a
//!   restarted client never reuses a generation and resolves the entry by
//!   the log;
//! - the latest Welcome of each room, an external join whose answer was
//!   lost, and counters.

mod answers;
mod apply;
mod heads;
mod hostile;
mod recovery;
mod work;

pub use hostile::HostileAct;

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use client_core::mls::{Identity, MlsProvider, RoomGroup, SeededCrypto};
use client_core::room_log::{is_log_frame, RoomLog, RoomRecord, SentMessage};
use ed25519_dalek::SigningKey;
use kalandra_proto::payload::{self, AnyPayload};
use kalandra_proto::sign::sign_auth_challenge;
use kalandra_proto::{Frame, FrameHeaderBuf, Payload, RoomId, SenderId};
use openmls_memory_storage::MemoryStorage;
use openmls_traits::OpenMlsProvider as _;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::sync::mpsc;

use crate::ledger::Ledger;
use crate::net::{self, spawn_writer, FrameReader, Loss};
use crate::server::now_ms;
use crate::Transcript;

/// Time allowed to open a connection.
pub const CONNECT_TIMEOUT_MS: u64 = 1_000;
/// Time allowed for each handshake step.
pub const HANDSHAKE_STEP_TIMEOUT_MS: u64 = 3_000;
/// A Ping goes out after this much time without one.
pub const PING_INTERVAL_MS: u64 = 200;
/// Silence after which the connection is declared dead.
pub const SILENCE_TIMEOUT_MS: u64 = 3_000;
/// How often the client looks for work.
pub const TICK_MS: u64 = 20;
/// Shortest and longest pause before reconnecting.
pub const RECONNECT_BACKOFF_MIN_MS: u64 = 50;
/// See [`RECONNECT_BACKOFF_MIN_MS`].
pub const RECONNECT_BACKOFF_MAX_MS: u64 = 400;
/// Key packages uploaded by each client (besides its last-resort one).
pub const KEY_PACKAGES_UPLOADED: usize = 3;
/// Application messages one client writes in a run, at most.
pub const MESSAGES_PER_CLIENT_MAX: u64 = 40;
/// Self-updates one client asks for in a run, at most.
pub const UPDATES_PER_CLIENT_MAX: u64 = 6;
/// Membership acts (add, remove, kick, ban, leave, external join) one
/// client starts in a run, at most.
pub const MEMBERSHIP_ACTS_PER_CLIENT_MAX: u64 = 4;
/// Redactions one client asks for in a run, at most.
pub const REDACTIONS_PER_CLIENT_MAX: u64 = 2;
/// Messages of one room in flight at once (sealed and sent, unanswered).
pub const MESSAGES_IN_FLIGHT_PER_ROOM_MAX: usize = 4;
/// Shortest and longest ban a client's moderator act asks for.
pub const BAN_MS_MIN: u64 = 500;
/// See [`BAN_MS_MIN`].
pub const BAN_MS_MAX: u64 = 3_000;
/// Frames one search of a room's log for our external join reads.
pub const JOIN_SEARCH_FRAMES_MAX: u32 = 4_096;
/// Pause before asking again after a refusal that may pass later (a
/// GroupInfo not yet published, an external join not yet durable).
pub const RETRY_PAUSE_MS: u64 = 200;
/// Searches for our external join that read to the room's durable head
/// without finding it before the join is given up and made again (as
/// client-core's `Client` does at once): the server had that long, in
/// [`RETRY_PAUSE_MS`] steps, to make it durable. A join given up that lands
/// after all is removed by the next one (an external commit removes the
/// joiner's earlier leaf).
pub const JOIN_SEARCHES_AT_HEAD_MAX: u32 = 10;
/// Label of the exporter secret added to the transcript at each epoch.
pub const TRANSCRIPT_EXPORTER_LABEL: &str = "kalandra simulation transcript";

const _: () = assert!(PING_INTERVAL_MS * 4 <= SILENCE_TIMEOUT_MS);
const _: () = assert!(RECONNECT_BACKOFF_MIN_MS <= RECONNECT_BACKOFF_MAX_MS);
const _: () = assert!(BAN_MS_MIN <= BAN_MS_MAX);
const _: () = assert!(MESSAGES_IN_FLIGHT_PER_ROOM_MAX >= 2, "pipelining sends out of order");

/// How a simulated client behaves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Behaviour {
    /// Follows the protocol.
    #[default]
    Honest,
    /// Follows the protocol, and mixes hostile acts ([`HostileAct`]) into
    /// its work: forged, unsigned, replayed and misdirected frames, commits
    /// members cannot process, false reports.
    Hostile,
}

/// A room of the world, as every client knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomPlan {
    /// The room.
    pub room_id: RoomId,
    /// The client that creates it (its admin).
    pub creator: usize,
    /// Open to external joins.
    pub open: bool,
    /// The clients the creator adds at setup (itself excluded).
    pub initial: Vec<usize>,
}

/// What the clients of a world share: the rooms, every client's sender id,
/// the ledger the checkers read, and the transcript.
#[derive(Debug, Default)]
pub struct Cast {
    /// The rooms.
    pub rooms: Vec<RoomPlan>,
    /// Every client's sender id, by position.
    pub senders: RefCell<Vec<SenderId>>,
    /// What the clients wrote and meant.
    pub ledger: RefCell<Ledger>,
    /// Every frame written and every epoch secret, in order.
    pub transcript: RefCell<Transcript>,
}

/// How a client read one application entry of a room's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// Another member's message, decrypted (its id is its plaintext).
    Text(String),
    /// Our own message, sequenced here (acknowledged, or read back).
    Own(String),
    /// Erased before we read it.
    Redacted,
    /// A second copy of a frame already read (the same sealing sequenced
    /// twice), refused by sender keys as a replay.
    Replay,
}

/// What the harness observes of a client in one room (kept across crashes).
#[derive(Debug, Default, Clone)]
pub struct RoomTrace {
    /// Every log entry applied, in order: (index, SHA-256 of the bytes).
    pub delivered: Vec<(u64, [u8; 32])>,
    /// Positions in `delivered` where a membership (creation, join) began.
    pub stints: Vec<usize>,
    /// Entries acknowledged to this client: (index, SHA-256 of the stamped frame).
    pub acknowledged: Vec<(u64, [u8; 32])>,
    /// Application entries read: (index, sender, how).
    pub entries: Vec<(u64, SenderId, Seen)>,
    /// The log's hash-chain head after each index applied: (index, head).
    pub heads: Vec<(u64, [u8; 32])>,
    /// Client-core found the server's signed head violated (reported once).
    pub chain_violated: bool,
}

/// Where a client stands in a room, for the convergence check.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RoomStatus {
    /// A member (holds the room's group).
    pub member: bool,
    /// Following the live log.
    pub live: bool,
    /// The next index to apply.
    pub next_log_index: u64,
    /// Epoch and tree hash, while a member.
    pub epoch_and_tree: Option<(u64, Vec<u8>)>,
    /// An external join (or a Welcome) is still being resolved.
    pub joining: bool,
    /// While a member: each member's identity and the home certificate its
    /// leaf carries.
    pub home_certificates: Vec<(Vec<u8>, client_core::mls::LeafHome)>,
}

/// What the harness observes of a client (kept across its crashes).
#[derive(Debug, Default, Clone)]
pub struct ClientRecord {
    /// Per room.
    pub rooms: BTreeMap<RoomId, RoomTrace>,
    /// Per room, now.
    pub status: BTreeMap<RoomId, RoomStatus>,
    /// Broken rules: anything here fails the run.
    pub violations: Vec<String>,
    /// Connection attempts.
    pub connections: u64,
    /// Connections that authenticated.
    pub sessions: u64,
    /// Frames written.
    pub frames_sent: u64,
    /// Other members' messages decrypted.
    pub plaintexts: u64,
    /// Messages opened with a key kept for a late message (out of order).
    pub opened_late: u64,
    /// Messages, intents and commits not yet done.
    pub work_left: usize,
    /// What they are, for a convergence failure.
    pub work: Vec<String>,
    /// Times the client started.
    pub boots: u32,
}

/// State of one client host that outlives its crashes.
pub struct ClientShared {
    /// Position among the clients.
    pub index: usize,
    /// Seed of this client's randomness.
    pub seed: u64,
    /// How it behaves.
    pub behaviour: Behaviour,
    /// Loss on this client's outgoing stream.
    pub loss: Rc<Cell<Loss>>,
    /// Whether the client takes on new work.
    pub workload: Cell<bool>,
    /// Write one message in every room we are a member of (once), to show
    /// that members still exchange messages.
    pub probe: Cell<bool>,
    /// Probability per tick of new work while the workload runs.
    pub work_rate: Cell<f64>,
    /// Share of new work that is a self-update rather than a message.
    pub update_share: Cell<f64>,
    /// Share of new work that changes membership (or redacts).
    pub membership_share: Cell<f64>,
    /// The world.
    pub cast: Rc<Cast>,
    /// Observations.
    pub record: RefCell<ClientRecord>,
    persisted: RefCell<Persisted>,
}

impl ClientShared {
    /// A client whose randomness comes from `seed`.
    pub fn new(index: usize, seed: u64, cast: Rc<Cast>) -> ClientShared {
        ClientShared {
            index,
            seed,
            behaviour: Behaviour::Honest,
            loss: Rc::new(Cell::new(Loss::default())),
            workload: Cell::new(false),
            probe: Cell::new(false),
            work_rate: Cell::new(0.05),
            update_share: Cell::new(0.15),
            membership_share: Cell::new(0.1),
            cast,
            record: RefCell::new(ClientRecord::default()),
            persisted: RefCell::new(Persisted::default()),
        }
    }

    /// The client's sender id (derived from its seed as its first boot does).
    pub fn sender_id(&self) -> SenderId {
        let provider = MlsProvider::from_seed(crate::derive_seed(self.seed, b"mls", 1));
        let identity = Identity::generate(&provider).expect("seeded identity");
        SenderId::from_identity_key(identity.public_key())
    }

    fn violation(&self, text: String) {
        self.record.borrow_mut().violations.push(format!("client {}: {text}", self.index));
    }
}

/// A message in the outbox, as persisted.
#[derive(Debug, Clone)]
struct OutboxEntry {
    room: RoomId,
    text: String,
    /// The latest sealing, sent or about to be: resent as is while its
    /// epoch holds, resealed after.
    sealed: Option<SealedEntry>,
    /// Do not send before the room reaches this epoch (the server said the
    /// room moved on, or waits for a commit).
    wait_for_epoch: u64,
}

#[derive(Debug, Clone)]
struct SealedEntry {
    frame: Vec<u8>,
    sent: SentMessage,
}

/// An external join sent and not answered: its fate is read from the log.
#[derive(Debug, Clone)]
struct PendingJoin {
    /// SHA-256 of the MLS commit sent.
    commit: [u8; 32],
}

/// Counters of work taken on (limits of the workload).
#[derive(Debug, Clone, Default)]
struct Counters {
    messages: u64,
    updates: u64,
    acts: u64,
    redactions: u64,
    labels: u64,
}

/// What a client persisted.
#[derive(Default, Clone)]
struct Persisted {
    identity_secret: Option<[u8; 32]>,
    mls: HashMap<Vec<u8>, Vec<u8>>,
    /// Each room log's checkpoint, written with `mls`.
    rooms: BTreeMap<RoomId, RoomRecord>,
    outbox: BTreeMap<u64, OutboxEntry>,
    /// The latest Welcome of each room, until used.
    welcomes: BTreeMap<RoomId, Vec<u8>>,
    joins: BTreeMap<RoomId, PendingJoin>,
    /// The intent of each room's pending or redone commit.
    commit_labels: BTreeMap<RoomId, String>,
    /// Sealings of others opened, per room: (sender, epoch, generation).
    opened: BTreeMap<RoomId, BTreeSet<(u64, u64, u32)>>,
    /// Rooms whose setup invitations the creator queued.
    setup_queued: BTreeSet<RoomId>,
    /// Where our leaving of each room stands (our leave proposal is in the
    /// MLS storage: a restarted client must finish leaving).
    leaves: BTreeMap<RoomId, Leave>,
    uploaded: bool,
    counters: Counters,
}

/// An intent of ours, not yet done (volatile: a crash loses it).
#[derive(Debug, Clone)]
struct Work {
    label: String,
    kind: WorkKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum WorkKind {
    Update,
    Invite(Vec<u64>),
    Remove(u64),
    Leave,
    Kick(u64),
    Ban { target: u64, duration_ms: u64 },
    Redact(u64),
    ExternalJoin,
}

/// A request in flight, by request id.
#[derive(Debug, Clone)]
enum Request {
    Upload,
    Claim {
        room: RoomId,
        work: Work,
    },
    Create {
        room: RoomId,
        frame: Frame,
    },
    /// `settled` once the log settled it before the answer came.
    Commit {
        room: RoomId,
        settled: bool,
        frame: Frame,
    },
    Message {
        room: RoomId,
        id: u64,
        frame: Frame,
    },
    Leave {
        room: RoomId,
        epoch: u64,
        frame: Frame,
        /// The room's `voids_applied` when it was sent.
        voids_applied: u64,
    },
    Moderation {
        room: RoomId,
    },
    Redact {
        room: RoomId,
        log_index: u64,
    },
    GroupInfo {
        room: RoomId,
        label: String,
    },
    ExternalJoin {
        room: RoomId,
        label: String,
        frame: Frame,
        /// SHA-256 of the GroupInfo the join was built on.
        group_info: [u8; 32],
    },
    Subscribe {
        room: RoomId,
    },
    JoinSearch {
        room: RoomId,
    },
    /// Our report of a commit we cannot process.
    Report {
        room: RoomId,
        report: payload::CommitReport,
    },
    /// A hostile act's frame.
    Hostile {
        room: RoomId,
        act: HostileAct,
        frame: Frame,
    },
}

impl Request {
    fn room(&self) -> Option<RoomId> {
        match self {
            Request::Upload => None,
            Request::Claim { room, .. }
            | Request::Create { room, .. }
            | Request::Commit { room, .. }
            | Request::Message { room, .. }
            | Request::Leave { room, .. }
            | Request::Moderation { room }
            | Request::Redact { room, .. }
            | Request::GroupInfo { room, .. }
            | Request::ExternalJoin { room, .. }
            | Request::Subscribe { room }
            | Request::JoinSearch { room }
            | Request::Report { room, .. }
            | Request::Hostile { room, .. } => Some(*room),
        }
    }
}

/// One room as this life of the client drives it.
struct Room {
    plan: RoomPlan,
    /// The room's log, once created or joined (kept after a removal, for
    /// its cursor).
    log: Option<RoomLog>,
    /// A Subscribe was sent on this connection.
    subscribed: bool,
    /// Its history is read: frames are live.
    live: bool,
    work: VecDeque<Work>,
    /// Where our leaving stands.
    leave: Option<Leave>,
    /// When the subscription last carried a frame (or was asked for).
    last_frame_ms: u64,
    /// The group our external commit made, its fate pending.
    joining: Option<RoomGroup>,
    /// Where a search of the log found our external join.
    join_found: Option<u64>,
    /// Where the next search for our external join reads from: the end of
    /// the last search that found nothing (a former member may read only up
    /// to its removal, so a search from 0 would end there again and again).
    join_search_from: u64,
    /// A search saw another commit for our join's epoch or a later one.
    join_passed_over: bool,
    /// Searches that read to the durable head without finding our join.
    join_searches_at_head: u32,
    /// The GroupInfo (SHA-256) an external join of ours was built on and
    /// refused `InvalidCommit` for: acceptable only if the room's GroupInfo
    /// is another one now (the first was of an epoch a void undid, whose
    /// number the room reached again with other keys).
    join_refused_on: Option<[u8; 32]>,
    /// Nothing that may pass later is asked before this time.
    retry_at_ms: u64,
    /// The epoch last added to the transcript.
    transcript_epoch: Option<u64>,
    /// When to report again the commit the room is stuck on.
    report_again_at_ms: Option<u64>,
    /// `CommitVoided` entries applied (in this life).
    voids_applied: u64,
}

/// Where a member's leaving stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leave {
    /// Propose our removal.
    Want,
    /// Proposed in `epoch`, not yet read back from the log.
    Sent { epoch: u64 },
    /// Our proposal is in the log in `epoch`: a member's commit removes us.
    Proposed { epoch: u64 },
}

impl Room {
    fn member(&self) -> bool {
        self.log.as_ref().is_some_and(RoomLog::is_member)
    }
}

struct Client {
    shared: Rc<ClientShared>,
    provider: MlsProvider,
    identity: Identity,
    key: SigningKey,
    sender: SenderId,
    rooms: BTreeMap<RoomId, Room>,
    in_flight: BTreeMap<u32, Request>,
    rng: ChaCha8Rng,
    next_request_id: u32,
    tx: Option<mpsc::Sender<Bytes>>,
    server_key: Option<[u8; 32]>,
    /// Why the connection must be started over, if it must.
    reconnect: Option<String>,
    /// Sequenced frames a hostile client may replay.
    replayable: VecDeque<(RoomId, Frame)>,
    /// The latest commit applied in each room: (log index, its epoch).
    last_commit: BTreeMap<RoomId, (u64, u64)>,
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    crate::ledger::digest(bytes)
}

/// Runs one life of a client (until the harness crashes it).
pub async fn run(shared: Rc<ClientShared>) -> turmoil::Result {
    let mut client = Client::start(Rc::clone(&shared))?;
    loop {
        shared.record.borrow_mut().connections += 1;
        let ended = client.session().await;
        client.connection_lost(ended);
        let pause = client.rng.gen_range(RECONNECT_BACKOFF_MIN_MS..=RECONNECT_BACKOFF_MAX_MS);
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}

impl Client {
    fn start(shared: Rc<ClientShared>) -> Result<Client, Box<dyn std::error::Error>> {
        let boot = {
            let mut record = shared.record.borrow_mut();
            record.boots += 1;
            record.status.values_mut().for_each(|status| status.live = false);
            record.boots
        };
        let persisted = shared.persisted.borrow().clone();
        let crypto = SeededCrypto::from_seed(crate::derive_seed(shared.seed, b"mls", u64::from(boot)));
        let storage = MemoryStorage { values: std::sync::RwLock::new(persisted.mls.clone()) };
        let provider = MlsProvider::with_storage(crypto, storage);
        let identity = match persisted.identity_secret {
            Some(secret) => Identity::from_secret_bytes(&secret)?,
            None => Identity::generate(&provider)?,
        };
        let key = SigningKey::from_bytes(&identity.secret_bytes());
        let sender = SenderId::from_identity_key(identity.public_key());
        let mut rooms = BTreeMap::new();
        for plan in &shared.cast.rooms {
            let log = persisted.rooms.get(&plan.room_id).cloned().map(|r| RoomLog::restore(&provider, r));
            let joining = match persisted.joins.contains_key(&plan.room_id) {
                true => RoomGroup::load(&provider, plan.room_id.0)?,
                false => None,
            };
            let room = Room {
                plan: plan.clone(),
                log: log.transpose()?,
                subscribed: false,
                live: false,
                work: VecDeque::new(),
                leave: persisted.leaves.get(&plan.room_id).copied(),
                last_frame_ms: 0,
                joining,
                join_found: None,
                join_search_from: 0,
                join_passed_over: false,
                join_searches_at_head: 0,
                join_refused_on: None,
                retry_at_ms: 0,
                transcript_epoch: None,
                report_again_at_ms: None,
                voids_applied: 0,
            };
            rooms.insert(plan.room_id, room);
        }
        let rng = ChaCha8Rng::from_seed(crate::derive_seed(shared.seed, b"driver", u64::from(boot)));
        let mut client = Client {
            shared,
            provider,
            identity,
            key,
            sender,
            rooms,
            in_flight: BTreeMap::new(),
            rng,
            next_request_id: 0,
            tx: None,
            server_key: None,
            reconnect: None,
            replayable: VecDeque::new(),
            last_commit: BTreeMap::new(),
        };
        client.note_epochs();
        client.persist();
        Ok(client)
    }

    /// Writes what a real client checkpoints: the MLS storage and every
    /// room log's record together (the outbox and the other persisted
    /// parts are written where they change), then publishes the status.
    fn persist(&mut self) {
        {
            let mut persisted = self.shared.persisted.borrow_mut();
            persisted.identity_secret = Some(self.identity.secret_bytes());
            persisted.mls = self.provider.storage().values.read().expect("storage lock").clone();
            persisted.leaves.clear();
            for (room_id, room) in &mut self.rooms {
                if let Some(log) = room.log.as_mut() {
                    persisted.rooms.insert(*room_id, log.checkpoint_record().clone());
                }
                if let Some(leave) = room.leave {
                    persisted.leaves.insert(*room_id, leave);
                }
            }
        }
        self.publish_status();
    }

    fn publish_status(&self) {
        let persisted = self.shared.persisted.borrow();
        let mut work: Vec<String> =
            persisted.outbox.values().map(|e| format!("{} in {}", e.text, e.room)).collect();
        work.extend(persisted.joins.keys().map(|room| format!("join of {room}")));
        // A join asked for (its GroupInfo on the way) is work too.
        work.extend(self.in_flight.values().filter_map(|request| match request {
            Request::GroupInfo { room, label } => Some(format!("{label} in {room}")),
            _ => None,
        }));
        let mut status = BTreeMap::new();
        for (room_id, room) in &self.rooms {
            let log = room.log.as_ref();
            work.extend(room.work.iter().map(|w| format!("{:?} in {room_id}", w.kind)));
            work.extend(room.leave.iter().map(|l| format!("{l:?} in {room_id}")));
            work.extend(
                log.and_then(RoomLog::pending_commit)
                    .map(|p| format!("commit {:?} in {room_id}", p.intent())),
            );
            work.extend(log.and_then(RoomLog::redo).map(|i| format!("redo {i:?} in {room_id}")));
            // A device removed meanwhile has nothing left to recover.
            let stuck_on = log.filter(|_| room.member()).and_then(RoomLog::stuck_on);
            work.extend(stuck_on.map(|l| format!("stuck on {l} in {room_id}")));
            work.extend(log.filter(|l| l.rejoin_needed()).map(|_| format!("rejoin of {room_id}")));
            let member = room.member();
            status.insert(
                *room_id,
                RoomStatus {
                    member,
                    live: room.live,
                    next_log_index: log.map_or(0, RoomLog::next_log_index),
                    epoch_and_tree: log
                        .filter(|_| member)
                        .and_then(RoomLog::group)
                        .map(|g| (g.epoch(), g.tree_hash())),
                    joining: room.joining.is_some() || persisted.joins.contains_key(room_id),
                    home_certificates: log
                        .filter(|_| member)
                        .and_then(RoomLog::group)
                        .map(|group| {
                            let leaves = group.member_home_certificates();
                            leaves
                                .into_iter()
                                .map(|(member, certificate)| (member.identity, certificate))
                                .collect()
                        })
                        .unwrap_or_default(),
                },
            );
        }
        let mut record = self.shared.record.borrow_mut();
        record.status = status;
        record.work_left = work.len();
        record.work = work;
    }

    fn violation(&self, text: impl Into<String>) {
        self.shared.violation(text.into());
    }

    /// With `SIM_DEBUG` set, prints what the client asks and is answered
    /// (for replaying a failing seed).
    fn debug(&self, text: impl FnOnce() -> String) {
        if std::env::var_os("SIM_DEBUG").is_some() {
            eprintln!("{} c{}: {}", now_ms() % 100_000, self.shared.index, text());
        }
    }

    fn trace(&self) -> std::cell::RefMut<'_, ClientRecord> {
        self.shared.record.borrow_mut()
    }

    fn send_frame(&mut self, frame: &Frame) {
        let bytes = frame.to_bytes();
        self.shared.cast.transcript.borrow_mut().add(b"frame", &bytes);
        self.shared.record.borrow_mut().frames_sent += 1;
        if let Some(tx) = &self.tx {
            let _ = tx.try_send(bytes);
        }
    }

    fn next_request(&mut self) -> u32 {
        self.next_request_id = self.next_request_id.wrapping_add(1).max(1);
        self.next_request_id
    }

    /// A frame of ours, signed.
    fn frame<P: Payload>(&mut self, room: RoomId, payload: &P, epoch: u64) -> (u32, Frame) {
        let request_id = self.next_request();
        let mut header = FrameHeaderBuf::new(P::OPCODE);
        header.set_room_id(room).set_sender_id(self.sender).set_epoch(epoch).set_request_id(request_id);
        let mut frame = Frame::with_payload(header, payload).expect("client payloads fit");
        frame.sign(&self.key);
        (request_id, frame)
    }

    fn request<P: Payload>(&mut self, room: RoomId, payload: &P, epoch: u64, request: Request) -> Frame {
        let (id, frame) = self.frame(room, payload, epoch);
        self.debug(|| format!("-> {id} {request:?}").chars().take(200).collect());
        self.in_flight.insert(id, request);
        self.send_frame(&frame);
        frame
    }

    /// A stored signed frame under a fresh request id (signed again), as
    /// `Client` resends it.
    fn fresh_request(&mut self, stored: &[u8]) -> Option<(u32, Frame)> {
        let mut frame = match Frame::decode(&Bytes::copy_from_slice(stored)) {
            Ok(frame) => frame,
            Err(error) => {
                self.violation(format!("a stored frame does not decode: {error}"));
                return None;
            }
        };
        let request_id = self.next_request();
        frame.header_mut().set_request_id(request_id);
        frame.sign(&self.key);
        Some((request_id, frame))
    }

    /// One connection, until it fails.
    async fn session(&mut self) -> String {
        let stream =
            match tokio::time::timeout(Duration::from_millis(CONNECT_TIMEOUT_MS), net::connect()).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(error)) => return format!("connect: {error}"),
                Err(_) => return "connect timed out".into(),
            };
        let (read, write) = stream.into_split();
        let writer_seed = self.rng.gen();
        self.tx = Some(spawn_writer(write, Rc::clone(&self.shared.loss), writer_seed));
        let mut reader = FrameReader::new(read);
        if let Err(error) = self.authenticate(&mut reader).await {
            return error;
        }
        self.shared.record.borrow_mut().sessions += 1;
        self.on_connected();
        self.persist();
        let mut last_heard = now_ms();
        let mut last_ping = now_ms();
        loop {
            // Biased: tokio's own branch choice is random unless built with
            // `tokio_unstable`, which would make runs of one seed differ.
            tokio::select! {
                biased;
                frame = reader.next() => match frame {
                    Ok(frame) => {
                        last_heard = now_ms();
                        let handled = self.handle(frame);
                        self.note_epochs();
                        self.persist();
                        if let Err(error) = handled {
                            return error;
                        }
                        if let Some(why) = self.reconnect.take() {
                            return why;
                        }
                    }
                    Err(error) => return format!("read: {error}"),
                },
                _ = tokio::time::sleep(Duration::from_millis(TICK_MS)) => {
                    let now = now_ms();
                    if now.saturating_sub(last_heard) > SILENCE_TIMEOUT_MS {
                        return "silence".into();
                    }
                    if now.saturating_sub(last_ping) >= PING_INTERVAL_MS {
                        last_ping = now;
                        let (_, ping) = self.frame(RoomId::default(), &payload::Ping { nonce: now }, 0);
                        self.send_frame(&ping);
                    }
                    self.drive();
                    self.note_epochs();
                    self.persist();
                    if let Some(why) = self.reconnect.take() {
                        return why;
                    }
                }
            }
        }
    }

    async fn authenticate(&mut self, reader: &mut FrameReader) -> Result<(), String> {
        let step = Duration::from_millis(HANDSHAKE_STEP_TIMEOUT_MS);
        let hello = payload::Hello {
            versions: vec![kalandra_proto::PROTOCOL_VERSION],
            identity_key: *self.identity.public_key(),
            client_name: "simulated client".into(),
        };
        let (_, frame) = self.frame(RoomId::default(), &hello, 0);
        self.send_frame(&frame);
        let challenge = match tokio::time::timeout(step, reader.next()).await {
            Ok(Ok(frame)) => {
                frame.decode_payload::<payload::AuthChallenge>().map_err(|e| format!("challenge: {e}"))?
            }
            Ok(Err(error)) => return Err(format!("handshake: {error}")),
            Err(_) => return Err("handshake timed out".into()),
        };
        let response = payload::AuthResponse { signature: sign_auth_challenge(&self.key, &challenge.nonce) };
        let (_, frame) = self.frame(RoomId::default(), &response, 0);
        self.send_frame(&frame);
        match tokio::time::timeout(step, reader.next()).await {
            Ok(Ok(frame)) => {
                let ok = frame.decode_payload::<payload::AuthOk>().map_err(|e| format!("auth: {e}"))?;
                self.server_key = Some(ok.server_key);
                // Its leaves from now on carry the home certificate, as client-core's do.
                self.identity.set_home_certificate(ok.home_certificate);
                if SenderId(ok.sender_id) != self.sender {
                    self.violation("server bound another sender id");
                }
                Ok(())
            }
            Ok(Err(error)) => Err(format!("handshake: {error}")),
            Err(_) => Err("handshake timed out".into()),
        }
    }

    fn connection_lost(&mut self, _why: String) {
        self.tx = None;
        self.in_flight.clear();
        for room in self.rooms.values_mut() {
            room.subscribed = false;
            room.live = false;
            if let Some(log) = room.log.as_mut() {
                if let Err(error) = log.connection_lost() {
                    let text = format!("room {}: {error}", room.plan.room_id);
                    self.shared.violation(text);
                }
            }
        }
        self.persist();
    }

    fn on_connected(&mut self) {
        for room in self.rooms.values_mut() {
            if let Some(log) = room.log.as_mut() {
                if let Err(error) = log.connected() {
                    let text = format!("room {}: {error}", room.plan.room_id);
                    self.shared.violation(text);
                }
            }
        }
    }

    /// Handles one frame from the server.
    fn handle(&mut self, frame: Frame) -> Result<(), String> {
        let room_id = frame.header().room_id();
        let header = frame.clone();
        let handled = self.handle_frame(frame);
        self.after_frame(room_id, &header);
        handled
    }

    fn handle_frame(&mut self, frame: Frame) -> Result<(), String> {
        if is_log_frame(&frame) {
            return self.on_log_frame(&frame);
        }
        let payload = match AnyPayload::decode(frame.opcode(), frame.payload()) {
            Ok(payload) => payload,
            Err(error) => {
                self.violation(format!("undecodable {:?} from the server: {error}", frame.opcode()));
                return Err("bad payload".into());
            }
        };
        let request_id = frame.header().request_id();
        self.debug(|| {
            format!(
                "<- {:?} req {request_id} room {} idx {}",
                frame.opcode(),
                frame.header().room_id(),
                frame.header().log_index()
            )
        });
        match payload {
            AnyPayload::Ack(ack) => self.on_ack(request_id, &ack),
            AnyPayload::Error(error) => self.on_error(&frame, &error),
            AnyPayload::SyncDone(done) => self.on_sync_done(request_id, &done),
            AnyPayload::Welcome(_) => {
                self.on_welcome(&frame);
                Ok(())
            }
            AnyPayload::KeyPackageStatus(_) => {
                if matches!(self.in_flight.remove(&request_id), Some(Request::Upload)) {
                    self.shared.persisted.borrow_mut().uploaded = true;
                }
                Ok(())
            }
            AnyPayload::KeyPackageClaimed(claimed) => {
                self.on_claimed(request_id, claimed);
                Ok(())
            }
            AnyPayload::GroupInfo(info) => {
                self.on_group_info(request_id, info);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Adds each room's new epoch (and its exporter secret) to the transcript.
    fn note_epochs(&mut self) {
        for room in self.rooms.values_mut() {
            let Some(group) = room.log.as_ref().filter(|l| l.is_member()).and_then(RoomLog::group) else {
                continue;
            };
            if room.transcript_epoch == Some(group.epoch()) {
                continue;
            }
            room.transcript_epoch = Some(group.epoch());
            if let Ok(secret) = group.export_secret(&self.provider, TRANSCRIPT_EXPORTER_LABEL, &[], 32) {
                let mut transcript = self.shared.cast.transcript.borrow_mut();
                transcript.add(b"room", &room.plan.room_id.0);
                transcript.add(b"epoch", &group.epoch().to_be_bytes());
                transcript.add(b"exporter", &secret);
            }
        }
    }

    /// A fresh intent label of this client.
    fn label(&mut self, kind: &str) -> String {
        let mut persisted = self.shared.persisted.borrow_mut();
        persisted.counters.labels += 1;
        format!("c{}-{kind}{}", self.shared.index, persisted.counters.labels)
    }

    fn room(&self, room: RoomId) -> Option<&Room> {
        self.rooms.get(&room)
    }

    fn room_mut(&mut self, room: RoomId) -> Option<&mut Room> {
        self.rooms.get_mut(&room)
    }

    /// Whether a request of this kind for `room` is in flight.
    fn asking(&self, room: RoomId, matches: impl Fn(&Request) -> bool) -> bool {
        self.in_flight.values().any(|request| request.room() == Some(room) && matches(request))
    }
}
