//! The simulated client: client-core's real MLS [`RoomGroup`] (seeded
//! provider), [`SenderKeyState`] and the [`ClientState`] machine, behind a
//! turmoil TCP shell that replaces the QUIC `connection.rs`: it
//! authenticates, subscribes from the last applied index, applies the log in
//! order, keeps a volatile outbox, and resends after reconnecting.
//!
//! # Crash model
//!
//! A crash loses the connection and everything volatile: the outbox
//! (messages not yet acknowledged), intents not yet committed, sender-key
//! chains. What the client persisted survives, written at the points a
//! real client would write it before going on:
//! - the identity secret;
//! - the OpenMLS storage (group state, key-package private keys, our
//!   pending commit) together with the last applied log index, after every
//!   applied frame, every join and every commit created (before it is sent);
//! - the commit frame awaiting an answer, so that it can be resent;
//! - counters (key packages uploaded, next message number).
//!
//! Sender-key chains are derived again from the MLS exporter after a restart;
//! because the sending chain would restart at generation 0 and reuse message
//! keys, a restarted client commits a fresh epoch before it sends any
//! application message.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use client_core::mls::{
    generate_key_packages, generate_last_resort_key_package, HandshakeOutcome, Identity, MlsProvider,
    RoomGroup, SeededCrypto,
};
use client_core::sender_keys::{open_application, seal_application, SenderKeyState};
use client_core::state::{Action, ClientState, CommitKind, Event, Resume};
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
    member: bool,
    last_applied: Option<u64>,
    /// The encoded commit frame (unstamped) awaiting the server's answer,
    /// with the epoch it creates.
    pending_commit: Option<(Bytes, u64)>,
    uploaded: bool,
    created: bool,
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
    Commit { superseded: bool },
    Application { message: u64, frame: Frame },
}

struct Message {
    number: u64,
    text: String,
    /// The epoch the server said the room is at when it refused the last try.
    wait_for_epoch: u64,
}

struct Client {
    shared: Rc<ClientShared>,
    provider: MlsProvider,
    identity: Identity,
    key: SigningKey,
    sender: SenderId,
    group: Option<RoomGroup>,
    state: ClientState,
    keys: Option<SenderKeyState>,
    leaves: BTreeMap<SenderId, (u32, [u8; 32])>,
    outbox: VecDeque<Message>,
    intents: u64,
    in_flight: Option<(u32, Request)>,
    fresh_epoch_needed: bool,
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
        let group = if persisted.member { RoomGroup::load(&provider, ROOM.0)? } else { None };
        let resume = match (&group, &persisted.pending_commit) {
            (None, _) => Resume::Join,
            (Some(_), Some((_, target_epoch))) => Resume::PendingCommit { target_epoch: *target_epoch },
            (Some(group), None) => Resume::Synchronized { epoch: group.epoch() },
        };
        let rng = ChaCha8Rng::from_seed(crate::derive_seed(shared.seed, b"driver", u64::from(boot)));
        let mut client = Client {
            shared,
            provider,
            identity,
            key,
            sender,
            group,
            state: ClientState::Disconnected { resume },
            keys: None,
            leaves: BTreeMap::new(),
            outbox: VecDeque::new(),
            intents: 0,
            in_flight: None,
            fresh_epoch_needed: boot > 1,
            rng,
            next_request_id: 0,
            live: false,
            tx: None,
            server_key: None,
        };
        if client.group.is_some() {
            client.enter_epoch();
        }
        client.persist();
        Ok(client)
    }

    fn persist(&self) {
        let mut persisted = self.shared.persisted.borrow_mut();
        persisted.identity_secret = Some(self.identity.secret_bytes());
        persisted.mls = self.provider.storage().values.read().expect("storage lock").clone();
        persisted.member = self.group.is_some();
        let mut record = self.shared.record.borrow_mut();
        record.epoch_and_tree = self.group.as_ref().map(|g| (g.epoch(), g.tree_hash()));
        record.work_left = self.outbox.len()
            + usize::try_from(self.intents).unwrap_or(usize::MAX)
            + usize::from(persisted.pending_commit.is_some());
        record.live = self.live;
        record.last_applied = persisted.last_applied;
    }

    fn violation(&self, text: impl Into<String>) {
        self.shared.violation(text.into());
    }

    fn last_applied(&self) -> Option<u64> {
        self.shared.persisted.borrow().last_applied
    }

    fn next_index(&self) -> u64 {
        self.last_applied().map_or(0, |last| last + 1)
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

    fn transition(&mut self, event: Event) -> Vec<Action> {
        match self.state.apply(event) {
            Ok((next, actions)) => {
                self.state = next;
                actions
            }
            Err(illegal) => {
                self.violation(format!("client {}: {illegal}", self.shared.index));
                Vec::new()
            }
        }
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
        self.transition(Event::Connected);
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
        if self.state.is_connected() {
            let actions = self.transition(Event::ConnectionLost);
            debug_assert!(actions.is_empty(), "a member's state survives a lost connection");
        }
        self.persist();
    }

    fn on_connected(&mut self) {
        if self.group.is_some() {
            self.subscribe();
        } else if self.shared.index == 0 {
            if !self.shared.persisted.borrow().created {
                self.create_room();
            }
        } else if !self.shared.persisted.borrow().uploaded {
            self.upload_key_packages();
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
        self.group = Some(group);
        let payload = payload::CreateRoom {
            group_info: created.group_info,
            ratchet_tree: created.ratchet_tree,
            join_rule: None,
        };
        let (id, frame) = self.frame(&payload, 0);
        self.in_flight = Some((id, Request::Create(frame.clone())));
        self.send_frame(&frame);
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
        if self.in_flight.is_some() || !self.live || self.group.is_none() {
            return;
        }
        let members = self.group.as_ref().map_or(0, |g| g.members().len());
        match self.state {
            ClientState::PendingCommit { kind: CommitKind::Member, .. } => {
                // Our commit's fate is unknown and the log did not settle it: send it again.
                let pending = self.shared.persisted.borrow().pending_commit.clone();
                if let Some((bytes, _)) = pending {
                    if let Ok(frame) = Frame::decode(&bytes) {
                        self.in_flight =
                            Some((frame.header().request_id(), Request::Commit { superseded: false }));
                        self.send_frame(&frame);
                    }
                }
            }
            ClientState::Synchronized { epoch } => {
                if self.shared.index == 0 && members == 1 {
                    if !self.shared.others.borrow().is_empty() {
                        let others: Vec<u64> = self.shared.others.borrow().iter().map(|s| s.0).collect();
                        self.request(&payload::KeyPackageClaim { sender_ids: others }, 0, Request::Claim);
                    }
                    return;
                }
                let wants_to_send = !self.outbox.is_empty();
                if self.intents > 0 || (self.fresh_epoch_needed && wants_to_send) {
                    self.commit_update(epoch);
                    return;
                }
                if let Some(message) = self.outbox.front() {
                    if message.wait_for_epoch > epoch {
                        return;
                    }
                    let (number, text) = (message.number, message.text.clone());
                    let Some(keys) = self.keys.as_mut() else { return };
                    match seal_application(keys, text.as_bytes(), &self.key) {
                        Ok(mut frame) => {
                            self.next_request_id = self.next_request_id.wrapping_add(1).max(1);
                            frame.header_mut().set_request_id(self.next_request_id);
                            frame.sign(&self.key);
                            self.in_flight = Some((
                                self.next_request_id,
                                Request::Application { message: number, frame: frame.clone() },
                            ));
                            self.send_frame(&frame);
                        }
                        Err(error) => self.violation(format!("seal: {error}")),
                    }
                    return;
                }
                if self.shared.workload.get() && self.rng.gen_bool(self.shared.work_rate.get()) {
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
                        self.outbox.push_back(Message { number, text, wait_for_epoch: 0 });
                    }
                }
            }
            _ => {}
        }
    }

    fn commit_update(&mut self, epoch: u64) {
        let Some(group) = self.group.as_mut() else { return };
        let output = match group.self_update(&self.provider, &self.identity) {
            Ok(output) => output,
            Err(error) => {
                self.violation(format!("self update: {error}"));
                return;
            }
        };
        let commit = payload::Commit {
            commit: output.commit,
            welcome: None,
            welcome_recipients: vec![],
            group_info: Some(output.group_info),
        };
        self.send_commit(&commit, epoch, output.new_epoch);
    }

    fn send_commit(&mut self, commit: &payload::Commit, epoch: u64, new_epoch: u64) {
        let (id, frame) = self.frame(commit, epoch);
        self.shared.persisted.borrow_mut().pending_commit = Some((frame.to_bytes(), new_epoch));
        self.transition(Event::CommitSent { target_epoch: new_epoch });
        self.persist();
        self.in_flight = Some((id, Request::Commit { superseded: false }));
        self.send_frame(&frame);
    }

    fn enter_epoch(&mut self) {
        let Some(group) = self.group.as_ref() else { return };
        match SenderKeyState::from_group(&self.provider, group) {
            Ok(keys) => self.keys = Some(keys),
            Err(error) => self.violation(format!("sender keys: {error}")),
        }
        self.leaves.clear();
        for member in group.members() {
            if let Ok(key) = <[u8; 32]>::try_from(member.identity.as_slice()) {
                self.leaves.insert(SenderId::from_identity_key(&key), (member.leaf_index, key));
            }
        }
        if let Ok(secret) = group.export_secret(&self.provider, TRANSCRIPT_EXPORTER_LABEL, &[], 32) {
            let mut transcript = self.shared.transcript.borrow_mut();
            transcript.add(b"epoch", &group.epoch().to_be_bytes());
            transcript.add(b"exporter", &secret);
        }
    }

    fn apply_actions(&mut self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::MergePendingCommit => {
                    if let Some(group) = self.group.as_mut() {
                        if let Err(error) = group.confirm_pending_commit(&self.provider) {
                            self.violation(format!("confirm commit: {error}"));
                        }
                    }
                    self.shared.persisted.borrow_mut().pending_commit = None;
                }
                Action::DiscardPendingCommit => {
                    if let Some(group) = self.group.as_mut() {
                        if group.has_pending_commit() {
                            if let Err(error) = group.discard_pending_commit(&self.provider) {
                                self.violation(format!("discard commit: {error}"));
                            }
                        }
                    }
                    self.shared.persisted.borrow_mut().pending_commit = None;
                }
                Action::EnterEpoch { .. } => {
                    self.enter_epoch();
                    self.fresh_epoch_needed = false;
                }
                Action::Subscribe => self.subscribe(),
                // Live subscription already delivers everything from our index on.
                Action::SyncFrom { .. } => {}
                Action::ReapplyIntent => {}
                Action::DeleteGroup => {
                    self.violation("removed from the room, which the workload never does");
                }
            }
        }
    }

    fn record_delivered(&mut self, log_index: u64, frame_digest: [u8; 32], acknowledged: bool) {
        {
            let mut record = self.shared.record.borrow_mut();
            record.delivered.push((log_index, frame_digest));
            if acknowledged {
                record.acknowledged.push((log_index, frame_digest));
            }
        }
        self.shared.persisted.borrow_mut().last_applied = Some(log_index);
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
            AnyPayload::SyncDone(done) => {
                if done.next_log_index != self.next_index() {
                    self.violation(format!(
                        "client {}: history ended at {} but {} was applied last",
                        self.shared.index,
                        done.next_log_index,
                        self.next_index()
                    ));
                    return Err("history gap".into());
                }
                self.live = true;
                Ok(())
            }
            AnyPayload::Welcome(welcome) => {
                self.on_welcome(&welcome, frame.header().log_index());
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
            | AnyPayload::ExternalJoin(_) => self.apply_log_frame(&frame),
            _ => Ok(()),
        };
        self.persist();
        result
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
            digest(&stamped.to_bytes())
        };
        match request {
            Request::Create(frame) => {
                self.shared.persisted.borrow_mut().created = true;
                self.record_delivered(ack.log_index, stamp(&frame), true);
                self.state = ClientState::Synchronized { epoch: 0 };
                self.enter_epoch();
                self.persist();
                self.subscribe();
            }
            Request::Application { message, frame } => {
                self.record_delivered(ack.log_index, stamp(&frame), true);
                if self.outbox.front().is_some_and(|m| m.number == message) {
                    self.outbox.pop_front();
                }
            }
            Request::Commit { .. } => {
                let pending = self.shared.persisted.borrow().pending_commit.clone();
                let Some((bytes, _)) = pending else {
                    self.violation("commit acknowledged with none pending");
                    return Ok(());
                };
                let frame = Frame::decode(&bytes).map_err(|e| e.to_string())?;
                self.record_delivered(ack.log_index, stamp(&frame), true);
                let actions = self.transition(Event::CommitAcked { epoch: ack.epoch });
                self.apply_actions(actions);
                self.intents = self.intents.saturating_sub(1);
            }
            Request::Upload | Request::Claim => {
                self.violation("acknowledgement for a directory request");
            }
        }
        Ok(())
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
            (Request::Commit { .. }, Some(ErrorCode::WrongEpoch)) => {
                let current_epoch = error.current_epoch.unwrap_or(0);
                let log_index = error.log_index.unwrap_or(0);
                let actions = self.transition(Event::WrongEpoch { current_epoch, log_index });
                self.apply_actions(actions);
            }
            // Fate unknown (the write may be durable): the log settles it after reconnecting.
            (Request::Commit { .. }, Some(ErrorCode::StorageUnavailable)) => {}
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

    fn on_welcome(&mut self, welcome: &payload::Welcome, commit_log_index: u64) {
        if self.group.is_some() {
            return;
        }
        match RoomGroup::join_from_welcome(&self.provider, &welcome.welcome, welcome.ratchet_tree.as_deref())
        {
            Ok(group) => {
                let epoch = group.epoch();
                self.group = Some(group);
                self.shared.persisted.borrow_mut().last_applied = Some(commit_log_index);
                let actions = self.transition(Event::WelcomeReceived { epoch });
                self.persist();
                self.apply_actions(actions);
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
        let Some(group) = self.group.as_mut() else { return };
        let epoch = group.epoch();
        match group.add_members(&self.provider, &self.identity, &refs) {
            Ok(output) => {
                let commit = payload::Commit {
                    commit: output.commit,
                    welcome: output.welcome,
                    welcome_recipients: others,
                    group_info: Some(output.group_info),
                };
                self.send_commit(&commit, epoch, output.new_epoch);
            }
            Err(error) => self.violation(format!("add members: {error}")),
        }
    }

    fn apply_log_frame(&mut self, frame: &Frame) -> Result<(), String> {
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
        let frame_digest = digest(&frame.to_bytes());
        let own = frame.header().sender_id() == self.sender;
        match frame.opcode() {
            Opcode::Application => {
                if own {
                    // Ours, sequenced though its acknowledgement never came.
                    let ciphertext =
                        frame.decode_payload::<payload::Application>().map(|p| p.ciphertext).ok();
                    if let Some((_, Request::Application { frame: sent, message })) = &self.in_flight {
                        let sent_ct =
                            sent.decode_payload::<payload::Application>().map(|p| p.ciphertext).ok();
                        if sent_ct == ciphertext {
                            let message = *message;
                            self.in_flight = None;
                            if self.outbox.front().is_some_and(|m| m.number == message) {
                                self.outbox.pop_front();
                            }
                        }
                    }
                    self.record_delivered(log_index, frame_digest, false);
                    return Ok(());
                }
                let Some(&(leaf, identity_key)) = self.leaves.get(&frame.header().sender_id()) else {
                    self.violation(format!(
                        "client {}: message at {log_index} from a non-member",
                        self.shared.index
                    ));
                    self.record_delivered(log_index, frame_digest, false);
                    return Ok(());
                };
                let Some(keys) = self.keys.as_mut() else { return Err("no keys".into()) };
                match open_application(keys, frame, leaf, &identity_key) {
                    Ok(plaintext) => {
                        let text = String::from_utf8_lossy(&plaintext).into_owned();
                        self.shared.record.borrow_mut().plaintexts.push(text);
                    }
                    Err(error) => self.violation(format!(
                        "client {}: open message at {log_index}: {error}",
                        self.shared.index
                    )),
                }
                self.record_delivered(log_index, frame_digest, false);
            }
            Opcode::Commit => {
                let commit: payload::Commit = frame.decode_payload().map_err(|e| e.to_string())?;
                if own {
                    let pending = self.shared.persisted.borrow().pending_commit.clone();
                    let ours = pending
                        .as_ref()
                        .and_then(|(bytes, _)| Frame::decode(bytes).ok())
                        .and_then(|f| f.decode_payload::<payload::Commit>().ok())
                        .is_some_and(|p| p.commit == commit.commit);
                    if !ours {
                        self.violation(format!(
                            "client {}: own commit at {log_index} is not the pending one",
                            self.shared.index
                        ));
                        self.record_delivered(log_index, frame_digest, false);
                        return Ok(());
                    }
                    self.in_flight = None;
                    let epoch = frame.header().epoch() + 1;
                    self.record_delivered(log_index, frame_digest, false);
                    let actions = self.transition(Event::CommitAcked { epoch });
                    self.apply_actions(actions);
                    self.intents = self.intents.saturating_sub(1);
                    return Ok(());
                }
                let Some(group) = self.group.as_mut() else { return Err("no group".into()) };
                match group.process_handshake(&self.provider, &commit.commit) {
                    Ok(HandshakeOutcome::CommitApplied(applied)) => {
                        if applied.own_commit_discarded {
                            self.shared.persisted.borrow_mut().pending_commit = None;
                            if let Some((_, Request::Commit { superseded })) = self.in_flight.as_mut() {
                                *superseded = true;
                            }
                        }
                        self.record_delivered(log_index, frame_digest, false);
                        let actions = self.transition(Event::CommitFromOthers { epoch: applied.epoch });
                        self.apply_actions(actions);
                    }
                    Ok(other) => {
                        self.violation(format!(
                            "client {}: commit at {log_index} processed as {other:?}",
                            self.shared.index
                        ));
                        self.record_delivered(log_index, frame_digest, false);
                    }
                    Err(error) => {
                        self.violation(format!(
                            "client {}: sequenced commit at {log_index} does not apply: {error}",
                            self.shared.index
                        ));
                        self.record_delivered(log_index, frame_digest, false);
                    }
                }
            }
            other => {
                if !(other == Opcode::CreateRoom && own) {
                    self.violation(format!(
                        "client {}: unexpected {other:?} in the log at {log_index}",
                        self.shared.index
                    ));
                }
                self.record_delivered(log_index, frame_digest, false);
            }
        }
        Ok(())
    }
}
