//! The simulated client: client-core's [`RoomLog`] — the same code
//! `client_core::client::Client` runs to apply a room's log (cursor, commit
//! settlement, outbox settlement by epoch and generation, sender keys, the
//! state machine) on the real MLS group with a seeded provider — behind a
//! turmoil TCP shell that replaces the QUIC `connection.rs`: it
//! authenticates, subscribes from the room's cursor, feeds every frame of
//! the log (and our own frames, stamped from their acknowledgement) to the
//! room log, keeps a volatile outbox, and sends again what the log did not
//! settle.
//!
//! # Crash model
//!
//! A crash loses the connection and everything volatile: the outbox
//! (messages not yet acknowledged) and intents not yet committed. What the
//! client persisted survives, written at the points a real client writes
//! it before going on (after every frame handled and every step of work,
//! before anything that step sends leaves):
//! - the identity secret;
//! - the OpenMLS storage (group state, key-package private keys, our
//!   pending commit) together with the room log's checkpoint record
//!   ([`RoomRecord`]: cursor, sender-key chains, the pending commit frame
//!   and its intent, an intent to redo), as `Client` writes them in one
//!   transaction;
//! - counters (key packages uploaded, next message number).
//!
//! A message is sealed (its sending chain advanced) and the chain persisted
//! before the frame is sent, so a restarted client never reuses a
//! generation.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use client_core::mls::{
    generate_key_packages, generate_last_resort_key_package, Identity, MlsProvider, RoomGroup, SeededCrypto,
};
use client_core::room_log::{CommitRefusal, EntryBody, Intent, RoomLog, RoomRecord, SentMessage};
use client_core::state::{Action, ClientState, CommitKind};
use ed25519_dalek::SigningKey;
use kalandra_proto::payload::{self, AnyPayload};
use kalandra_proto::sign::sign_auth_challenge;
use kalandra_proto::{ErrorCode, Frame, FrameHeaderBuf, Opcode, Payload, RoomId, SenderId};
use openmls_memory_storage::MemoryStorage;
use openmls_traits::OpenMlsProvider as _;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

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
/// Key packages uploaded by each joining client.
pub const KEY_PACKAGES_UPLOADED: usize = 2;
/// Application messages one client writes in a run, at most.
pub const MESSAGES_PER_CLIENT_MAX: u64 = 40;
/// Self-updates one client asks for in a run, at most.
pub const UPDATES_PER_CLIENT_MAX: u64 = 6;
/// Label of the exporter secret added to the transcript at each epoch.
pub const TRANSCRIPT_EXPORTER_LABEL: &str = "kalandra simulation transcript";

const _: () = assert!(PING_INTERVAL_MS * 4 <= SILENCE_TIMEOUT_MS);
const _: () = assert!(RECONNECT_BACKOFF_MIN_MS <= RECONNECT_BACKOFF_MAX_MS);

/// The room every simulated client uses.
pub const ROOM: RoomId = RoomId(*b"simulation-room!");

/// What a client persisted.
#[derive(Default, Clone)]
pub struct Persisted {
    identity_secret: Option<[u8; 32]>,
    mls: HashMap<Vec<u8>, Vec<u8>>,
    /// The room log's checkpoint, written with `mls`.
    room: Option<RoomRecord>,
    uploaded: bool,
    next_message: u64,
    updates_asked: u64,
}

/// What the harness observes of a client (kept across its crashes).
#[derive(Debug, Default, Clone)]
pub struct ClientRecord {
    /// Every log entry applied, in order: (index, SHA-256 of the stamped frame).
    pub delivered: Vec<(u64, [u8; 32])>,
    /// Entries acknowledged to this client: (index, SHA-256 of the stamped frame).
    pub acknowledged: Vec<(u64, [u8; 32])>,
    /// Application plaintexts read from others, in order.
    pub plaintexts: Vec<String>,
    /// Broken rules: anything here fails the run.
    pub violations: Vec<String>,
    /// Current epoch and tree hash, once a member.
    pub epoch_and_tree: Option<(u64, Vec<u8>)>,
    /// Connection attempts.
    pub connections: u64,
    /// Connections that authenticated.
    pub sessions: u64,
    /// Frames written.
    pub frames_sent: u64,
    /// Live on a subscription right now.
    pub live: bool,
    /// Messages and intents not yet done, and whether a commit is pending.
    pub work_left: usize,
    /// Times the client started.
    pub boots: u32,
    /// The last log index applied (for a joiner, at first the commit that added it).
    pub last_applied: Option<u64>,
}

/// State of one client host that outlives its crashes.
pub struct ClientShared {
    /// Position among the clients; client 0 creates the room.
    pub index: usize,
    /// Seed of this client's randomness.
    pub seed: u64,
    /// Loss on this client's outgoing stream.
    pub loss: Rc<Cell<Loss>>,
    /// Whether the client writes new messages and asks for updates.
    pub workload: Cell<bool>,
    /// Probability per tick of new work while the workload runs.
    pub work_rate: Cell<f64>,
    /// Share of new work that is a self-update rather than a message.
    pub update_share: Cell<f64>,
    /// Other clients' sender ids (the creator adds them).
    pub others: RefCell<Vec<SenderId>>,
    /// Observations.
    pub record: RefCell<ClientRecord>,
    /// Every frame written and every epoch secret, in order.
    pub transcript: Rc<RefCell<Transcript>>,
    persisted: RefCell<Persisted>,
}

impl ClientShared {
    /// A client whose randomness comes from `seed`.
    pub fn new(index: usize, seed: u64, transcript: Rc<RefCell<Transcript>>) -> ClientShared {
        ClientShared {
            index,
            seed,
            loss: Rc::new(Cell::new(Loss::default())),
            workload: Cell::new(false),
            work_rate: Cell::new(0.05),
            update_share: Cell::new(0.15),
            others: RefCell::new(Vec::new()),
            record: RefCell::new(ClientRecord::default()),
            transcript,
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
        self.record.borrow_mut().violations.push(text);
    }
}

#[derive(Debug, Clone)]
enum Request {
    Upload,
    Create(Frame),
    Claim,
    /// Our pending commit; `superseded` once the log settled it otherwise
    /// (another commit won the epoch) before the answer came.
    Commit {
        superseded: bool,
    },
    Application {
        message: u64,
        frame: Frame,
        sent: SentMessage,
    },
}

struct Message {
    number: u64,
    text: String,
    /// The epoch the server said the room is at when it refused the last try.
    wait_for_epoch: u64,
    /// The latest sealing sent: the room log settles the message when this
    /// epoch and generation of ours reaches it.
    sealed: Option<SentMessage>,
}

struct Client {
    shared: Rc<ClientShared>,
    provider: MlsProvider,
    identity: Identity,
    key: SigningKey,
    sender: SenderId,
    /// The room, once created or joined: its log applied by client-core.
    room: Option<RoomLog>,
    /// The epoch last added to the transcript.
    transcript_epoch: Option<u64>,
    outbox: VecDeque<Message>,
    intents: u64,
    in_flight: Option<(u32, Request)>,
    rng: ChaCha8Rng,
    next_request_id: u32,
    live: bool,
    tx: Option<mpsc::Sender<Bytes>>,
    server_key: Option<[u8; 32]>,
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
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
            record.live = false;
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
        let room = persisted.room.map(|record| RoomLog::restore(&provider, record)).transpose()?;
        let rng = ChaCha8Rng::from_seed(crate::derive_seed(shared.seed, b"driver", u64::from(boot)));
        let mut client = Client {
            shared,
            provider,
            identity,
            key,
            sender,
            room,
            transcript_epoch: None,
            outbox: VecDeque::new(),
            intents: 0,
            in_flight: None,
            rng,
            next_request_id: 0,
            live: false,
            tx: None,
            server_key: None,
        };
        client.note_epoch();
        client.persist();
        Ok(client)
    }

    /// Writes what a real client checkpoints: the MLS storage and the room
    /// log's record together.
    fn persist(&mut self) {
        let mut persisted = self.shared.persisted.borrow_mut();
        persisted.identity_secret = Some(self.identity.secret_bytes());
        persisted.mls = self.provider.storage().values.read().expect("storage lock").clone();
        persisted.room = self.room.as_mut().map(|room| room.checkpoint_record().clone());
        let mut record = self.shared.record.borrow_mut();
        let room = self.room.as_ref();
        record.epoch_and_tree = room.and_then(RoomLog::group).map(|g| (g.epoch(), g.tree_hash()));
        record.work_left = self.outbox.len()
            + usize::try_from(self.intents).unwrap_or(usize::MAX)
            + room.map_or(0, |r| usize::from(r.pending_commit().is_some()) + usize::from(r.redo().is_some()));
        record.live = self.live;
        record.last_applied = room.and_then(|r| r.next_log_index().checked_sub(1));
    }

    fn violation(&self, text: impl Into<String>) {
        self.shared.violation(text.into());
    }

    fn next_index(&self) -> u64 {
        self.room.as_ref().map_or(0, RoomLog::next_log_index)
    }

    fn send_frame(&mut self, frame: &Frame) {
        let bytes = frame.to_bytes();
        self.shared.transcript.borrow_mut().add(b"frame", &bytes);
        self.shared.record.borrow_mut().frames_sent += 1;
        if let Some(tx) = &self.tx {
            let _ = tx.try_send(bytes);
        }
    }

    fn frame<P: Payload>(&mut self, payload: &P, epoch: u64) -> (u32, Frame) {
        self.next_request_id = self.next_request_id.wrapping_add(1).max(1);
        let mut header = FrameHeaderBuf::new(P::OPCODE);
        header
            .set_room_id(ROOM)
            .set_sender_id(self.sender)
            .set_epoch(epoch)
            .set_request_id(self.next_request_id);
        let mut frame = Frame::with_payload(header, payload).expect("client payloads fit");
        frame.sign(&self.key);
        (self.next_request_id, frame)
    }

    fn request<P: Payload>(&mut self, payload: &P, epoch: u64, request: Request) {
        let (id, frame) = self.frame(payload, epoch);
        self.in_flight = Some((id, request));
        self.send_frame(&frame);
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
                        if let Err(error) = self.handle(frame) {
                            return error;
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
                        let (_, ping) = self.frame(&payload::Ping { nonce: now }, 0);
                        self.send_frame(&ping);
                    }
                    self.drive();
                    self.persist();
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
        let (_, frame) = self.frame(&hello, 0);
        self.send_frame(&frame);
        let challenge = match tokio::time::timeout(step, reader.next()).await {
            Ok(Ok(frame)) => {
                frame.decode_payload::<payload::AuthChallenge>().map_err(|e| format!("challenge: {e}"))?
            }
            Ok(Err(error)) => return Err(format!("handshake: {error}")),
            Err(_) => return Err("handshake timed out".into()),
        };
        let response = payload::AuthResponse { signature: sign_auth_challenge(&self.key, &challenge.nonce) };
        let (_, frame) = self.frame(&response, 0);
        self.send_frame(&frame);
        match tokio::time::timeout(step, reader.next()).await {
            Ok(Ok(frame)) => {
                let ok = frame.decode_payload::<payload::AuthOk>().map_err(|e| format!("auth: {e}"))?;
                self.server_key = Some(ok.server_key);
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
        self.live = false;
        self.in_flight = None;
        if let Some(room) = self.room.as_mut() {
            if let Err(error) = room.connection_lost() {
                let text = format!("client {}: {error}", self.shared.index);
                self.violation(text);
            }
        }
        self.persist();
    }

    fn on_connected(&mut self) {
        let Some(room) = self.room.as_mut() else {
            if self.shared.index == 0 {
                self.create_room();
            } else if !self.shared.persisted.borrow().uploaded {
                self.upload_key_packages();
            }
            return;
        };
        let actions = match room.connected() {
            Ok(actions) => actions,
            Err(error) => {
                self.violation(format!("client {}: {error}", self.shared.index));
                return;
            }
        };
        if !room.is_confirmed() {
            // Created before a crash, its fate unknown: ask again.
            self.resend_creation();
        } else if actions.contains(&Action::Subscribe) {
            self.subscribe();
        }
    }

    fn subscribe(&mut self) {
        self.live = false;
        let from_log_index = self.next_index();
        let (_, frame) = self.frame(&payload::Subscribe { from_log_index }, 0);
        self.send_frame(&frame);
    }

    fn create_room(&mut self) {
        let Some(server_key) = self.server_key else { return };
        let (group, created) =
            match RoomGroup::create(&self.provider, &self.identity, ROOM.0, &server_key, now_ms() / 1000) {
                Ok(created) => created,
                Err(error) => {
                    self.violation(format!("create room: {error}"));
                    return;
                }
            };
        let payload = payload::CreateRoom {
            group_info: created.group_info,
            ratchet_tree: created.ratchet_tree,
            join_rule: None,
        };
        let (id, frame) = self.frame(&payload, 0);
        match RoomLog::created(&self.provider, group, frame.to_bytes().to_vec()) {
            Ok(room) => self.room = Some(room),
            Err(error) => {
                self.violation(format!("create room: {error}"));
                return;
            }
        }
        self.note_epoch();
        self.persist();
        self.in_flight = Some((id, Request::Create(frame.clone())));
        self.send_frame(&frame);
    }

    fn resend_creation(&mut self) {
        let Some(pending) = self.room.as_ref().and_then(RoomLog::pending_commit) else { return };
        match Frame::decode(&Bytes::copy_from_slice(pending.frame())) {
            Ok(frame) => {
                self.in_flight = Some((frame.header().request_id(), Request::Create(frame.clone())));
                self.send_frame(&frame);
            }
            Err(error) => self.violation(format!("stored CreateRoom: {error}")),
        }
    }

    fn upload_key_packages(&mut self) {
        let now = now_ms() / 1000;
        let packages = match generate_key_packages(&self.provider, &self.identity, KEY_PACKAGES_UPLOADED, now)
        {
            Ok(packages) => packages,
            Err(error) => {
                self.violation(format!("key packages: {error}"));
                return;
            }
        };
        let last_resort = match generate_last_resort_key_package(&self.provider, &self.identity, now) {
            Ok(package) => package,
            Err(error) => {
                self.violation(format!("last-resort key package: {error}"));
                return;
            }
        };
        self.persist();
        let upload = payload::KeyPackageUpload {
            key_packages: packages.into_iter().map(|p| p.message.into()).collect(),
            last_resort: Some(last_resort.message),
        };
        self.request(&upload, 0, Request::Upload);
    }

    /// Starts the next piece of work if nothing is in flight.
    fn drive(&mut self) {
        if self.in_flight.is_some() || !self.live {
            return;
        }
        let Some(room) = self.room.as_ref() else { return };
        if !room.is_confirmed() {
            return;
        }
        let members = room.group().map_or(0, |g| g.members().len());
        match room.state() {
            ClientState::PendingCommit { kind: CommitKind::Member, .. } => self.resend_commit(),
            ClientState::Synchronized { epoch } => {
                if self.shared.index == 0 && members == 1 {
                    self.claim_key_packages();
                    return;
                }
                if let Some(intent) = self.room.as_mut().and_then(RoomLog::take_redo) {
                    // Another commit won the epoch of ours: redo it in this one.
                    self.commit_intent(epoch, intent);
                    return;
                }
                if self.intents > 0 {
                    self.intents -= 1;
                    self.commit_intent(epoch, Intent::Update);
                    return;
                }
                if self.outbox.front().is_some_and(|message| message.wait_for_epoch <= epoch) {
                    self.send_message();
                    return;
                }
                self.new_work();
            }
            _ => {}
        }
    }

    /// Our commit's fate is unknown and the log (read to its head) did not
    /// settle it: send it again.
    fn resend_commit(&mut self) {
        let Some(bytes) = self.room.as_ref().and_then(RoomLog::commit_to_resend) else { return };
        match Frame::decode(&Bytes::copy_from_slice(bytes)) {
            Ok(frame) => {
                self.in_flight = Some((frame.header().request_id(), Request::Commit { superseded: false }));
                self.send_frame(&frame);
            }
            Err(error) => self.violation(format!("stored commit: {error}")),
        }
    }

    fn claim_key_packages(&mut self) {
        if !self.shared.others.borrow().is_empty() {
            let others: Vec<u64> = self.shared.others.borrow().iter().map(|s| s.0).collect();
            self.request(&payload::KeyPackageClaim { sender_ids: others }, 0, Request::Claim);
        }
    }

    /// Seals the outbox's first message with the room's sender keys (the
    /// chain position is persisted before the frame leaves) and sends it.
    fn send_message(&mut self) {
        let Some(message) = self.outbox.front_mut() else { return };
        let (number, text) = (message.number, message.text.clone());
        let Some(room) = self.room.as_mut() else { return };
        match room.seal(text.as_bytes(), &self.key) {
            Ok(sealed) => {
                let mut frame = sealed.frame;
                self.next_request_id = self.next_request_id.wrapping_add(1).max(1);
                frame.header_mut().set_request_id(self.next_request_id);
                frame.sign(&self.key);
                let sent = SentMessage { id: number, epoch: sealed.epoch, generation: sealed.generation };
                // Only the latest attempt can be in the log unseen: an earlier
                // one was refused, or read back from the log before this one.
                message.sealed = Some(sent);
                self.in_flight = Some((
                    self.next_request_id,
                    Request::Application { message: number, frame: frame.clone(), sent },
                ));
                self.persist();
                self.send_frame(&frame);
            }
            Err(error) => self.violation(format!("seal: {error}")),
        }
    }

    fn new_work(&mut self) {
        if !self.shared.workload.get() || !self.rng.gen_bool(self.shared.work_rate.get()) {
            return;
        }
        let mut persisted = self.shared.persisted.borrow_mut();
        if self.rng.gen_bool(self.shared.update_share.get()) {
            if persisted.updates_asked < UPDATES_PER_CLIENT_MAX {
                persisted.updates_asked += 1;
                self.intents += 1;
            }
        } else if persisted.next_message < MESSAGES_PER_CLIENT_MAX {
            let number = persisted.next_message;
            persisted.next_message += 1;
            let text = format!("client {} message {number}", self.shared.index);
            self.outbox.push_back(Message { number, text, wait_for_epoch: 0, sealed: None });
        }
    }

    /// Makes the commit for `intent` in `epoch` and sends it.
    fn commit_intent(&mut self, epoch: u64, intent: Intent) {
        let output = match &intent {
            Intent::Update => {
                let Some(group) = self.room.as_mut().and_then(RoomLog::group_mut) else { return };
                group.self_update(&self.provider, &self.identity)
            }
            // The adds are made from freshly claimed key packages.
            Intent::Invite(_) => return self.claim_key_packages(),
            other => {
                self.violation(format!("intent {other:?}, which the workload never has"));
                return;
            }
        };
        match output {
            Ok(output) => {
                let commit = payload::Commit {
                    commit: output.commit,
                    welcome: None,
                    welcome_recipients: vec![],
                    group_info: Some(output.group_info),
                };
                self.send_commit(&commit, epoch, intent);
            }
            Err(error) => self.violation(format!("self update: {error}")),
        }
    }

    fn send_commit(&mut self, commit: &payload::Commit, epoch: u64, intent: Intent) {
        let (id, frame) = self.frame(commit, epoch);
        let Some(room) = self.room.as_mut() else { return };
        if let Err(error) = room.commit_sent(frame.to_bytes().to_vec(), epoch, intent) {
            self.violation(format!("client {}: {error}", self.shared.index));
            return;
        }
        self.persist();
        self.in_flight = Some((id, Request::Commit { superseded: false }));
        self.send_frame(&frame);
    }

    /// Adds a new epoch (and its exporter secret) to the transcript.
    fn note_epoch(&mut self) {
        let Some(group) = self.room.as_ref().and_then(RoomLog::group) else { return };
        if self.transcript_epoch == Some(group.epoch()) {
            return;
        }
        self.transcript_epoch = Some(group.epoch());
        if let Ok(secret) = group.export_secret(&self.provider, TRANSCRIPT_EXPORTER_LABEL, &[], 32) {
            let mut transcript = self.shared.transcript.borrow_mut();
            transcript.add(b"epoch", &group.epoch().to_be_bytes());
            transcript.add(b"exporter", &secret);
        }
    }

    fn record_delivered(&mut self, log_index: u64, frame_digest: [u8; 32], acknowledged: bool) {
        let mut record = self.shared.record.borrow_mut();
        record.delivered.push((log_index, frame_digest));
        if acknowledged {
            record.acknowledged.push((log_index, frame_digest));
        }
    }

    fn handle(&mut self, frame: Frame) -> Result<(), String> {
        let payload = match AnyPayload::decode(frame.opcode(), frame.payload()) {
            Ok(payload) => payload,
            Err(error) => {
                self.violation(format!("undecodable {:?} from the server: {error}", frame.opcode()));
                return Err("bad payload".into());
            }
        };
        let request_id = frame.header().request_id();
        let result = match payload {
            AnyPayload::Ack(ack) => self.on_ack(request_id, &ack),
            AnyPayload::Error(error) => self.on_error(request_id, &error),
            AnyPayload::SyncDone(done) => self.on_history_done(done.next_log_index),
            AnyPayload::Welcome(_) => {
                self.on_welcome(&frame);
                Ok(())
            }
            AnyPayload::KeyPackageStatus(_) => {
                if matches!(self.in_flight, Some((id, Request::Upload)) if id == request_id) {
                    self.in_flight = None;
                    self.shared.persisted.borrow_mut().uploaded = true;
                }
                Ok(())
            }
            AnyPayload::KeyPackageClaimed(claimed) => {
                self.on_claimed(request_id, claimed);
                Ok(())
            }
            AnyPayload::Application(_)
            | AnyPayload::Commit(_)
            | AnyPayload::CreateRoom(_)
            | AnyPayload::Proposal(_)
            | AnyPayload::ExternalJoin(_)
            | AnyPayload::CommitVoided(_) => self.on_log_frame(&frame),
            _ => Ok(()),
        };
        self.note_epoch();
        self.persist();
        result
    }

    fn on_history_done(&mut self, next_log_index: u64) -> Result<(), String> {
        let checked = self.room.as_ref().map(|room| room.history_ended(next_log_index));
        if let Some(Err(error)) = checked {
            self.violation(format!("client {}: {error}", self.shared.index));
            return Err("history gap".into());
        }
        if next_log_index != self.next_index() {
            self.violation(format!(
                "client {}: history ended at {next_log_index} but {} was applied last",
                self.shared.index,
                self.next_index()
            ));
            return Err("history gap".into());
        }
        self.live = true;
        Ok(())
    }

    fn on_ack(&mut self, request_id: u32, ack: &payload::Ack) -> Result<(), String> {
        let Some((id, request)) = self.in_flight.take() else {
            self.violation(format!("client {}: acknowledgement with nothing in flight", self.shared.index));
            return Ok(());
        };
        if id != request_id {
            self.violation(format!(
                "client {}: acknowledgement for request {request_id}, {id} in flight",
                self.shared.index
            ));
            return Ok(());
        }
        if ack.log_index != self.next_index() && !matches!(request, Request::Create(_)) {
            self.violation(format!(
                "client {}: acknowledged at {} but next index is {}",
                self.shared.index,
                ack.log_index,
                self.next_index()
            ));
            return Err("acknowledgement out of order".into());
        }
        let stamp = |frame: &Frame| {
            let mut stamped = frame.clone();
            stamped.header_mut().set_log_index(ack.log_index).set_server_timestamp_ms(ack.server_time_ms);
            stamped
        };
        match request {
            Request::Create(frame) => {
                self.record_delivered(ack.log_index, digest(&stamp(&frame).to_bytes()), true);
                self.creation_confirmed();
            }
            Request::Application { frame, sent, .. } => {
                // The sender gets the acknowledgement instead of its frame:
                // the frame as sequenced goes through the room log like any other.
                self.apply_own(&stamp(&frame), Some(sent))?;
            }
            Request::Commit { superseded } => {
                let pending =
                    self.room.as_ref().and_then(RoomLog::pending_commit).map(|p| p.frame().to_vec());
                let Some(bytes) = pending.filter(|_| !superseded) else {
                    self.violation("commit acknowledged with none pending");
                    return Ok(());
                };
                let frame = Frame::decode(&Bytes::from(bytes)).map_err(|e| e.to_string())?;
                self.apply_own(&stamp(&frame), None)?;
            }
            Request::Upload | Request::Claim => {
                self.violation("acknowledgement for a directory request");
            }
        }
        Ok(())
    }

    /// Our own frame, sequenced at the acknowledgement's index.
    fn apply_own(&mut self, stamped: &Frame, sent: Option<SentMessage>) -> Result<(), String> {
        let frame_digest = digest(&stamped.to_bytes());
        self.record_delivered(stamped.header().log_index(), frame_digest, true);
        self.apply(stamped, sent)
    }

    fn creation_confirmed(&mut self) {
        if let Some(room) = self.room.as_mut() {
            room.creation_confirmed();
        }
        self.persist();
        self.subscribe();
    }

    fn on_error(&mut self, request_id: u32, error: &payload::Error) -> Result<(), String> {
        let code = ErrorCode::from_u16(error.code);
        let Some((id, request)) = self.in_flight.clone() else {
            return match code {
                Some(ErrorCode::ResyncRequired) => Err("resync".into()),
                _ => {
                    self.violation(format!(
                        "client {}: unsolicited error {:?}: {}",
                        self.shared.index, code, error.message
                    ));
                    Ok(())
                }
            };
        };
        if id != request_id {
            self.violation(format!(
                "client {}: error {:?} for request {request_id}: {}",
                self.shared.index, code, error.message
            ));
            return Ok(());
        }
        self.in_flight = None;
        match (request, code) {
            (Request::Application { frame, .. }, Some(ErrorCode::WrongEpoch)) => {
                let current = error.current_epoch.unwrap_or(0);
                let ours = frame.header().epoch();
                if current <= ours {
                    self.violation(format!(
                        "client {}: server says epoch {current} for a message at our epoch {ours}",
                        self.shared.index
                    ));
                }
                if let Some(message) = self.outbox.front_mut() {
                    message.wait_for_epoch = current;
                }
            }
            (Request::Application { .. }, Some(ErrorCode::StorageUnavailable | ErrorCode::RateLimited)) => {}
            (Request::Commit { superseded: true }, _) => {}
            (Request::Commit { .. }, Some(ErrorCode::WrongEpoch)) => self.commit_refused(error),
            // Fate unknown (the write may be durable): the log settles it after reconnecting.
            (Request::Commit { .. }, Some(ErrorCode::StorageUnavailable)) => {}
            // Sequenced before a crash: the log holds it.
            (Request::Create(_), Some(ErrorCode::RoomExists)) => self.creation_confirmed(),
            (Request::Upload | Request::Claim, _) => {}
            (request, code) => {
                self.violation(format!(
                    "client {}: {:?} refused with {:?}: {}",
                    self.shared.index,
                    std::mem::discriminant(&request),
                    code,
                    error.message
                ));
            }
        }
        Ok(())
    }

    /// Another commit won our commit's epoch: the room log discards ours
    /// and keeps its intent, which [`Client::drive`] redoes.
    fn commit_refused(&mut self, error: &payload::Error) {
        let Some(room) = self.room.as_mut() else { return };
        match room.commit_refused(&self.provider, Some(error)) {
            Ok(CommitRefusal::Retry { intent, .. }) => room.redo_later(intent),
            Ok(CommitRefusal::Final) => self.violation("a WrongEpoch refusal settled as final"),
            Err(error) => self.violation(format!("client {}: {error}", self.shared.index)),
        }
    }

    fn on_welcome(&mut self, frame: &Frame) {
        if self.room.is_some() {
            return;
        }
        match RoomLog::join_from_welcome(&self.provider, ROOM, frame) {
            Ok(room) => {
                self.room = Some(room);
                self.note_epoch();
                self.persist();
                self.subscribe();
            }
            Err(error) => self.violation(format!("client {}: join from Welcome: {error}", self.shared.index)),
        }
    }

    fn on_claimed(&mut self, request_id: u32, claimed: payload::KeyPackageClaimed) {
        if !matches!(self.in_flight, Some((id, Request::Claim)) if id == request_id) {
            return;
        }
        self.in_flight = None;
        let packages: Option<Vec<Vec<u8>>> =
            claimed.key_packages.into_iter().map(|entry| entry.key_package).collect();
        let Some(packages) = packages else { return };
        let others: Vec<u64> = self.shared.others.borrow().iter().map(|s| s.0).collect();
        let refs: Vec<&[u8]> = packages.iter().map(Vec::as_slice).collect();
        let Some(group) = self.room.as_mut().and_then(RoomLog::group_mut) else { return };
        let epoch = group.epoch();
        match group.add_members(&self.provider, &self.identity, &refs) {
            Ok(output) => {
                let commit = payload::Commit {
                    commit: output.commit,
                    welcome: output.welcome,
                    welcome_recipients: others.clone(),
                    group_info: Some(output.group_info),
                };
                self.send_commit(&commit, epoch, Intent::Invite(others));
            }
            Err(error) => self.violation(format!("add members: {error}")),
        }
    }

    /// A frame of the log from the server (history or live).
    fn on_log_frame(&mut self, frame: &Frame) -> Result<(), String> {
        let log_index = frame.header().log_index();
        let expected = self.next_index();
        if log_index < expected {
            self.violation(format!(
                "client {}: log index {log_index} delivered again (next is {expected})",
                self.shared.index
            ));
            return Ok(());
        }
        if log_index > expected {
            self.violation(format!(
                "client {}: log index {log_index} delivered, {expected} missing",
                self.shared.index
            ));
            return Err("gap".into());
        }
        let own = frame.header().sender_id() == self.sender;
        let expected_opcode = match frame.opcode() {
            Opcode::Application | Opcode::Commit => true,
            Opcode::CreateRoom => own,
            _ => false,
        };
        if !expected_opcode {
            self.violation(format!(
                "client {}: unexpected {:?} in the log at {log_index}",
                self.shared.index,
                frame.opcode()
            ));
        }
        self.record_delivered(log_index, digest(&frame.to_bytes()), false);
        let sent = self.outbox.front().and_then(|message| message.sealed);
        self.apply(frame, sent)
    }

    /// Feeds one sequenced frame to the room log and acts on what it says.
    fn apply(&mut self, frame: &Frame, sent: Option<SentMessage>) -> Result<(), String> {
        let log_index = frame.header().log_index();
        let Some(room) = self.room.as_mut() else { return Err("a log frame before joining".into()) };
        let had_pending = room.pending_commit().is_some();
        let applied = room.apply(&self.provider, self.sender, frame, sent);
        let settled = had_pending && room.pending_commit().is_none();
        let member = room.is_member();
        let entry = match applied {
            Ok(entry) => entry,
            Err(error) => {
                self.violation(format!(
                    "client {}: sequenced {:?} at {log_index} does not apply: {error}",
                    self.shared.index,
                    frame.opcode()
                ));
                return Ok(());
            }
        };
        if settled && frame.opcode() == Opcode::Commit {
            self.commit_settled(frame.header().sender_id() == self.sender);
        }
        if !member {
            self.violation(format!(
                "client {}: removed from the room, which the workload never does",
                self.shared.index
            ));
        }
        match entry.map(|entry| entry.body) {
            Some(EntryBody::Text(plaintext)) => {
                let text = String::from_utf8_lossy(&plaintext).into_owned();
                self.shared.record.borrow_mut().plaintexts.push(text);
            }
            Some(EntryBody::Own { outbox_id }) => {
                // Ours, sequenced (acknowledged, or the acknowledgement never came).
                if matches!(self.in_flight, Some((_, Request::Application { message, .. })) if message == outbox_id)
                {
                    self.in_flight = None;
                }
                if self.outbox.front().is_some_and(|m| m.number == outbox_id) {
                    self.outbox.pop_front();
                }
            }
            Some(EntryBody::Unreadable(why)) => {
                self.violation(format!("client {}: open message at {log_index}: {why}", self.shared.index));
            }
            Some(EntryBody::Membership { .. } | EntryBody::Redacted | EntryBody::CommitVoided { .. })
            | None => {}
        }
        Ok(())
    }

    /// The log settled our pending commit: merged (`ours`) or beaten by
    /// another commit (its intent is kept to be redone).
    fn commit_settled(&mut self, ours: bool) {
        if let Some((_, Request::Commit { superseded })) = self.in_flight.as_mut() {
            if ours {
                self.in_flight = None;
            } else {
                *superseded = true;
            }
        }
    }
}
