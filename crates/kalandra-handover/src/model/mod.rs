//! A stateright model that runs [`DomainRoom`] — the very core servers will
//! drive — as three domain actors (A creates the room; B takes it over; C
//! replicates it and relays for the client) and one client.
//!
//! What the model explores, from every reachable state:
//! - messages delivered in any order, any number of times, or never (an
//!   unordered duplicating network: as no property reads the network, a
//!   lost message is the same as one never delivered, and a partition is a
//!   stretch of such losses; `heal` then also drops everything in flight);
//! - any actor crashing at any step (one at a time) and restarting from
//!   what it persisted, losing everything volatile; a step's writes and
//!   sends are atomic, and a crash after the writes but before the sends is
//!   the same as a crash after both with the sends lost;
//! - operator decisions at any moment: begin a handover, abort it, and the
//!   new authority's consent (or refusal);
//! - clocks that disagree (B's is 600 ms behind A's).
//!
//! The driver of each domain is the model's: it carries outputs out in
//! order, keeps the log, stands in for the sequencer's validation (the
//! client's commit is accepted once, as the first commit of epoch 0) and
//! computes the group summary from the log.

mod heal;
mod properties;
#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::sync::Arc;

use sha2::{Digest as _, Sha256};
use stateright::actor::{model_timeout, Actor, ActorModel, Id, LossyNetwork, Network, Out};

use crate::chain::chain_start;
use crate::ids::{DomainId, Epoch, FrameDigest, Generation, LogIndex, RoomId, StateDigest};
use crate::message::{LogEntry, LogHead, Message, Refusal};
use crate::record::{GroupSummary, HandoverBody};
use crate::room::{Context, DomainRoom, Durable, Mutation, Output, Role, RoomRecord, Route};
use crate::sign::{Signature, SignatureError, Signer, Verifier};

/// Domains A, B, C are actors 0, 1, 2; the client is actor 3.
pub(crate) const DOMAINS: usize = 3;
pub(crate) const CLIENT: usize = 3;

/// The room of the model.
const ROOM: RoomId = RoomId([0x42; 16]);

/// The wire code of a commit for a past epoch (`WrongEpoch`).
const WRONG_EPOCH: u16 = 2002;

/// Each domain's clock: B's runs behind A's, C's ahead.
const CLOCKS_MS: [u64; DOMAINS] = [1_000, 400, 1_600];

/// The frames of the model: the room's `CreateRoom`, the client's commit
/// (epoch 0) and its application message, and the probe `heal` sends.
pub(crate) const CREATE: FrameDigest = FrameDigest([0xf0; 32]);
pub(crate) const COMMIT: FrameDigest = FrameDigest([0xf1; 32]);
pub(crate) const TEXT: FrameDigest = FrameDigest([0xf2; 32]);
pub(crate) const PROBE: FrameDigest = FrameDigest([0xf9; 32]);
const CLIENT_FRAMES: [FrameDigest; 2] = [COMMIT, TEXT];

impl ModelConfig {
    fn client_frame(&self, settled: usize) -> Option<FrameDigest> {
        CLIENT_FRAMES[..self.client_frames.min(CLIENT_FRAMES.len())].get(settled).copied()
    }
}

pub(crate) fn domain_id(actor: usize) -> DomainId {
    DomainId([[0xaa, 0xbb, 0xcc][actor]; 32])
}

fn actor_of(domain: DomainId) -> usize {
    (0..DOMAINS).find(|&actor| domain_id(actor) == domain).expect("the model has three domains")
}

/// The model's deterministic signer: SHA-256 keyed by the domain. Not a
/// signature scheme (any actor could compute any tag), but every actor
/// signs only through the core with its own domain, so a tag stands for a
/// signature here at a fraction of Ed25519's cost.
pub(crate) struct ModelKey(pub(crate) DomainId);

fn model_tag(domain: DomainId, message: &[u8]) -> Signature {
    let mut hasher = Sha256::new();
    hasher.update(b"kalandra-model-key");
    hasher.update(domain.0);
    hasher.update(message);
    let mut signature = [0; 64];
    signature[..32].copy_from_slice(&hasher.finalize());
    Signature(signature)
}

impl Signer for ModelKey {
    fn domain(&self) -> DomainId {
        self.0
    }
    fn sign(&self, message: &[u8]) -> Signature {
        model_tag(self.0, message)
    }
}

pub(crate) struct ModelDirectory;

impl Verifier for ModelDirectory {
    fn verify(&self, domain: DomainId, message: &[u8], signature: &Signature) -> Result<(), SignatureError> {
        if !(0..DOMAINS).any(|actor| domain_id(actor) == domain) {
            return Err(SignatureError::UnknownDomain(domain));
        }
        if model_tag(domain, message) != *signature {
            return Err(SignatureError::Invalid(domain));
        }
        Ok(())
    }
}

/// What the model explores.
#[derive(Clone, Debug)]
pub(crate) struct ModelConfig {
    /// The client's home domain (an actor index).
    pub client_home: usize,
    /// Frames the client sends, one after the other: its commit, then
    /// (with 2) an application message.
    pub client_frames: usize,
    /// Authority records beyond genesis the operators may create (each
    /// handover, completed or aborted, is one).
    pub generations_max: u64,
    /// After A → B, B hands the room back to A (otherwise on to C).
    pub hand_back: bool,
    /// The old authority's operator may abort while the handover is undecided.
    pub aborts: bool,
    /// The new authority may decline instead of accepting.
    pub declines: bool,
    /// Actors crashed at once.
    pub max_crashes: usize,
    /// Boundary: no log grows longer (duplicated relays append copies).
    pub log_entries_max: usize,
    /// A deliberate bug in the core.
    pub mutation: Option<Mutation>,
    /// A deliberate bug in the driver: sends leave before the writes that
    /// precede them are durable (a crash loses those writes).
    pub sends_before_persist: bool,
    /// Check from every state that the system heals (`heal.rs`).
    pub check_healing: bool,
    /// Arm the retry timers while checking. Off by default: in a duplicating
    /// network a message once sent stays deliverable, so resending what was
    /// sent adds no behaviour; a crash loses nothing in flight. Resends
    /// matter for liveness, and `heal` fires them whether armed or not.
    pub retries_armed: bool,
}

impl ModelConfig {
    /// The handover the operators may start from `authority` at `generation`.
    fn planned_target(&self, authority: usize, generation: Generation) -> Option<usize> {
        if generation.0 >= self.generations_max {
            return None;
        }
        match authority {
            0 => Some(1),
            1 => Some(if self.hand_back { 0 } else { 2 }),
            _ => Some(0),
        }
    }
}

/// Messages between actors.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Msg {
    /// Between domains (shared: the checker clones the network at every step).
    Fed(Arc<Message>),
    /// Client to home domain.
    Submit(FrameDigest),
    /// Home domain to client: sequenced.
    Ack { frame: FrameDigest, index: LogIndex },
    /// Home domain to client: not sequenced.
    Refused { frame: FrameDigest, refusal: Refusal },
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Timer {
    /// The driver's periodic `retry_tick` (and the client's resend).
    Retry,
    /// The operator begins the planned handover.
    Handover,
    /// The operator aborts the undecided handover.
    Abort,
    /// The new authority's driver accepts the offer it was told is ready.
    Consent,
    /// ... or declines it.
    Decline,
}

/// What a domain has durably (the log as a vector), and a ghost count of
/// messages its core refused as peer faults (kept across crashes, never
/// read by the core).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct DomainStorage {
    pub record: RoomRecord,
    pub log: Vec<LogEntry>,
    pub faults: u8,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct DomainState {
    pub room: DomainRoom,
    /// What is durable.
    pub storage: Arc<DomainStorage>,
    /// Writes not yet durable (only when sends leave before writes).
    pub unsynced: Option<Arc<DomainStorage>>,
    /// An offer the core reported ready, waiting for the driver's consent.
    pub consent: Option<HandoverBody>,
}

impl DomainState {
    /// The driver's view of its storage, unsynced writes included.
    pub(crate) fn view(&self) -> &DomainStorage {
        self.unsynced.as_ref().unwrap_or(&self.storage)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct ClientState {
    /// Frames settled so far (acknowledged or refused for good).
    pub settled: usize,
}

// The checker keeps each actor's state behind an `Arc`, so the variants'
// sizes do not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum NodeState {
    Domain(DomainState),
    Client(ClientState),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum NodeStorage {
    Domain(Arc<DomainStorage>),
    Client(usize),
}

/// An actor: a domain's driver around its core, or the client.
#[derive(Clone)]
pub(crate) struct Node {
    pub actor: usize,
    pub config: ModelConfig,
}

/// What the model remembers of everything sent (ghost state for properties).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub(crate) struct Ghost {
    /// Every entry any domain sent: (index, generation, frame).
    pub assigned: BTreeSet<(LogIndex, Generation, FrameDigest)>,
    /// Every acknowledgement the client was sent: (index, frame).
    pub acked: BTreeSet<(LogIndex, FrameDigest)>,
}

pub(crate) type HandoverModel = ActorModel<Node, ModelConfig, Ghost>;
pub(crate) type ModelState = stateright::actor::ActorModelState<Node, Ghost>;

fn head_of(log: &[LogEntry]) -> LogHead {
    match log.last() {
        Some(last) => LogHead {
            next_index: LogIndex(log.len() as u64),
            chain_head: last.chain_head,
            last_timestamp_ms: last.timestamp_ms,
        },
        None => LogHead { next_index: LogIndex(0), chain_head: chain_start(ROOM), last_timestamp_ms: 0 },
    }
}

/// The group summary after the log (the model's stand-in for MLS).
pub(crate) fn group_summary(log: &[LogEntry]) -> GroupSummary {
    let epoch = log.iter().filter(|entry| entry.frame == COMMIT).count() as u64;
    GroupSummary {
        epoch: Epoch(epoch),
        group_state: StateDigest::of(b"model group", &epoch.to_be_bytes()),
        policy_state: StateDigest::of(b"model policy", &[]),
    }
}

/// The model's stand-in for the sequencer's validation.
fn validate(log: &[LogEntry], frame: FrameDigest) -> Result<(), u16> {
    if frame == COMMIT && log.iter().any(|entry| entry.frame == COMMIT) {
        return Err(WRONG_EPOCH);
    }
    Ok(())
}

/// The durable state every domain starts from: A created the room and
/// sequenced its `CreateRoom`; B and C replicated it.
fn initial_storages() -> Vec<DomainStorage> {
    let directory = ModelDirectory;
    let keys: Vec<ModelKey> = (0..DOMAINS).map(|actor| ModelKey(domain_id(actor))).collect();
    let ctx_a = Context::new(&keys[0], &directory);
    let (mut creator, _) = DomainRoom::create(ROOM, &ctx_a);
    let entry = creator.sequence(CREATE, None, CLOCKS_MS[0], &ctx_a).expect("the creator sequences").entry;
    let mut storages =
        vec![DomainStorage { record: creator.record().clone(), log: vec![entry.clone()], faults: 0 }];
    for key in &keys[1..] {
        let ctx = Context::new(key, &directory);
        let (mut replica, _) = DomainRoom::join(creator.top().clone(), &ctx).expect("the genesis verifies");
        replica.handle_message(domain_id(0), Message::Entry(entry.clone()), &ctx).expect("entry 0 applies");
        storages.push(DomainStorage {
            record: replica.record().clone(),
            log: vec![entry.clone()],
            faults: 0,
        });
    }
    storages
}

pub(crate) fn build_model(config: ModelConfig) -> HandoverModel {
    let nodes = (0..=CLIENT).map(|actor| Node { actor, config: config.clone() });
    let mut model = ActorModel::new(config.clone(), Ghost::default())
        .actors(nodes)
        .init_network(Network::new_unordered_duplicating([]))
        .lossy_network(LossyNetwork::No)
        .max_crashes(config.max_crashes)
        .record_msg_out(record_sent)
        .within_boundary(within_boundary);
    for property in properties::all(&config) {
        model = model.property(property.0, property.1, property.2);
    }
    model
}

fn record_sent(_: &ModelConfig, ghost: &Ghost, envelope: stateright::actor::Envelope<&Msg>) -> Option<Ghost> {
    let mut next = ghost.clone();
    let changed = match envelope.msg {
        Msg::Fed(message) => match &**message {
            Message::Entry(entry) => next.assigned.insert((entry.index, entry.generation, entry.frame)),
            _ => false,
        },
        Msg::Ack { frame, index } => next.acked.insert((*index, *frame)),
        _ => false,
    };
    changed.then_some(next)
}

fn within_boundary(config: &ModelConfig, state: &ModelState) -> bool {
    state.actor_states.iter().all(|node| match &**node {
        NodeState::Domain(domain) => domain.view().log.len() <= config.log_entries_max,
        NodeState::Client(_) => true,
    })
}

impl Node {
    fn key(&self) -> ModelKey {
        ModelKey(domain_id(self.actor))
    }

    fn context<'a>(&self, key: &'a ModelKey, directory: &'a ModelDirectory) -> Context<'a> {
        let mut ctx = Context::new(key, directory);
        ctx.mutation = self.config.mutation;
        ctx
    }
}

impl Actor for Node {
    type Msg = Msg;
    type Timer = Timer;
    type State = NodeState;
    type Storage = NodeStorage;
    type Random = ();

    fn on_start(&self, _: Id, storage: &Option<NodeStorage>, o: &mut Out<Self>) -> NodeState {
        if self.actor == CLIENT {
            let settled = match storage {
                Some(NodeStorage::Client(settled)) => *settled,
                _ => 0,
            };
            return NodeState::Client(self.client_start(settled, o));
        }
        let storage = match storage {
            Some(NodeStorage::Domain(storage)) => storage.clone(),
            _ => {
                let storage = Arc::new(initial_storages().swap_remove(self.actor));
                o.save(NodeStorage::Domain(storage.clone()));
                storage
            }
        };
        let room = DomainRoom::recover(domain_id(self.actor), storage.record.clone(), head_of(&storage.log))
            .expect("the model's durable state recovers");
        let state = DomainState { room, storage, unsynced: None, consent: None };
        self.arm_retry(o);
        self.sync_timers(&state, o);
        NodeState::Domain(state)
    }

    fn on_msg(&self, _: Id, state: &mut Cow<NodeState>, src: Id, msg: Msg, o: &mut Out<Self>) {
        match (&**state, msg) {
            (NodeState::Client(_), msg) => self.client_on_msg(state, msg, o),
            (NodeState::Domain(_), Msg::Fed(message)) => {
                let message = Arc::unwrap_or_clone(message);
                let from = domain_id(usize::from(src));
                self.domain_step(state, o, |node, domain, o| node.on_federation(domain, from, message, o));
            }
            (NodeState::Domain(_), Msg::Submit(frame)) => {
                self.domain_step(state, o, |node, domain, o| node.on_submit(domain, frame, o));
            }
            (NodeState::Domain(_), _) => {}
        }
    }

    fn on_timeout(&self, _: Id, state: &mut Cow<NodeState>, timer: &Timer, o: &mut Out<Self>) {
        if let NodeState::Client(_) = **state {
            return self.client_on_retry(state, o);
        }
        let timer = timer.clone();
        self.domain_step(state, o, |node, domain, o| node.on_domain_timer(domain, timer, o));
    }
}

impl Node {
    /// Runs one domain step on a copy of the state; keeps the copy only if
    /// the step changed it, and then re-arms the operator timers.
    fn domain_step(
        &self,
        state: &mut Cow<NodeState>,
        o: &mut Out<Self>,
        step: impl FnOnce(&Node, &mut DomainState, &mut Out<Self>),
    ) {
        let NodeState::Domain(before) = &**state else { return };
        let mut domain = before.clone();
        if self.config.sends_before_persist {
            // The previous step's writes complete now.
            if let Some(unsynced) = domain.unsynced.take() {
                domain.storage = unsynced;
                o.save(NodeStorage::Domain(domain.storage.clone()));
            }
        }
        step(self, &mut domain, o);
        if &domain != before {
            self.sync_timers(&domain, o);
            *state.to_mut() = NodeState::Domain(domain);
        }
    }

    fn sync_timers(&self, domain: &DomainState, o: &mut Out<Self>) {
        let key = self.key();
        let directory = ModelDirectory;
        let ctx = self.context(&key, &directory);
        let handover = matches!(domain.room.role(), Role::Authority { .. })
            && self.config.planned_target(self.actor, domain.room.generation()).is_some();
        let abort = self.config.aborts && domain.room.may_abort(&ctx);
        let consent = domain.consent.is_some();
        for (timer, wanted) in [
            (Timer::Handover, handover),
            (Timer::Abort, abort),
            (Timer::Consent, consent),
            (Timer::Decline, consent && self.config.declines),
        ] {
            if wanted {
                o.set_timer(timer, model_timeout());
            } else {
                o.cancel_timer(timer);
            }
        }
    }

    fn on_federation(&self, domain: &mut DomainState, from: DomainId, message: Message, o: &mut Out<Self>) {
        let key = self.key();
        let directory = ModelDirectory;
        let ctx = self.context(&key, &directory);
        match domain.room.handle_message(from, message, &ctx) {
            Ok(outputs) => self.execute(domain, outputs, &ctx, o),
            Err(_) => self.count_fault(domain, o),
        }
    }

    fn count_fault(&self, domain: &mut DomainState, o: &mut Out<Self>) {
        let faults = domain.storage.faults.saturating_add(1);
        Arc::make_mut(&mut domain.storage).faults = faults;
        if let Some(unsynced) = &mut domain.unsynced {
            Arc::make_mut(unsynced).faults = faults;
        }
        o.save(NodeStorage::Domain(domain.storage.clone()));
    }

    fn on_submit(&self, domain: &mut DomainState, frame: FrameDigest, o: &mut Out<Self>) {
        let key = self.key();
        let directory = ModelDirectory;
        let ctx = self.context(&key, &directory);
        let client = Id::from(CLIENT);
        match domain.room.route(&ctx) {
            Route::SequenceHere => match validate(&domain.view().log, frame) {
                Ok(()) => {
                    let sequenced = domain.room.sequence(frame, None, CLOCKS_MS[self.actor], &ctx);
                    let sequenced = sequenced.expect("route said this domain sequences");
                    self.execute(domain, sequenced.outputs, &ctx, o);
                    o.send(client, Msg::Ack { frame, index: sequenced.entry.index });
                }
                Err(code) => o.send(client, Msg::Refused { frame, refusal: Refusal::Rejected { code } }),
            },
            Route::Forward { to, generation } => {
                o.send(Id::from(actor_of(to)), Msg::Fed(Arc::new(Message::Relay { frame, generation })));
            }
            Route::Refuse(refusal) => o.send(client, Msg::Refused { frame, refusal }),
        }
    }

    fn on_domain_timer(&self, domain: &mut DomainState, timer: Timer, o: &mut Out<Self>) {
        let key = self.key();
        let directory = ModelDirectory;
        let ctx = self.context(&key, &directory);
        let outputs = match timer {
            Timer::Retry => {
                self.arm_retry(o);
                Ok(domain.room.retry_tick(&ctx))
            }
            Timer::Handover => match self.config.planned_target(self.actor, domain.room.generation()) {
                Some(target) => {
                    let group = group_summary(&domain.view().log);
                    domain.room.begin_handover(domain_id(target), group).map_err(|_| ())
                }
                None => Err(()),
            },
            Timer::Abort => domain.room.abort_handover(&ctx).map_err(|_| ()),
            Timer::Consent => match domain.consent.take() {
                Some(body) => {
                    let group = group_summary(&domain.view().log);
                    domain.room.accept_handover(&body, group, &ctx).map_err(|_| ())
                }
                None => Err(()),
            },
            Timer::Decline => match domain.consent.take() {
                Some(body) => domain.room.decline_handover(&body).map_err(|_| ()),
                None => Err(()),
            },
        };
        // A refused operator action is a race the operator loses; nothing changes.
        if let Ok(outputs) = outputs {
            self.execute(domain, outputs, &ctx, o);
        }
    }

    /// Carries outputs out in order: writes first become durable (or, with
    /// the driver bug, merely pending), then messages leave.
    fn execute(&self, domain: &mut DomainState, outputs: Vec<Output>, ctx: &Context<'_>, o: &mut Out<Self>) {
        let mut wrote = false;
        for output in outputs {
            match output {
                Output::Persist(durable) => {
                    self.write(domain, durable);
                    wrote = true;
                }
                Output::Send { to, message } => o.send(Id::from(actor_of(to)), Msg::Fed(Arc::new(message))),
                Output::Broadcast(message) => {
                    let message = Arc::new(message);
                    for peer in (0..DOMAINS).filter(|&peer| peer != self.actor) {
                        o.send(Id::from(peer), Msg::Fed(Arc::clone(&message)));
                    }
                }
                Output::SendLog { to, from, through } => {
                    let position = |index: LogIndex| usize::try_from(index.0).expect("model logs are short");
                    let entries = &domain.view().log[position(from)..=position(through)];
                    for entry in entries {
                        o.send(Id::from(actor_of(to)), Msg::Fed(Arc::new(Message::Entry(entry.clone()))));
                    }
                }
                Output::ValidateRelayed { origin, frame } => {
                    self.sequence_relayed(domain, origin, frame, ctx, o)
                }
                Output::Acknowledged { frame, index, .. } => {
                    o.send(Id::from(CLIENT), Msg::Ack { frame, index })
                }
                Output::Refused { frame, refusal } => {
                    o.send(Id::from(CLIENT), Msg::Refused { frame, refusal })
                }
                Output::ReadyToAccept(body) => domain.consent = Some(body),
            }
        }
        if wrote && !self.config.sends_before_persist {
            o.save(NodeStorage::Domain(domain.storage.clone()));
        }
    }

    fn write(&self, domain: &mut DomainState, durable: Durable) {
        let target = if self.config.sends_before_persist {
            Arc::make_mut(domain.unsynced.get_or_insert_with(|| Arc::clone(&domain.storage)))
        } else {
            Arc::make_mut(&mut domain.storage)
        };
        match durable {
            Durable::Record(record) => target.record = *record,
            Durable::Append(entry) => {
                assert_eq!(entry.index.0, target.log.len() as u64, "appends continue the stored log densely");
                target.log.push(entry);
            }
        }
    }

    fn sequence_relayed(
        &self,
        domain: &mut DomainState,
        origin: DomainId,
        frame: FrameDigest,
        ctx: &Context<'_>,
        o: &mut Out<Self>,
    ) {
        if let Err(code) = validate(&domain.view().log, frame) {
            let refusal = Refusal::Rejected { code };
            o.send(Id::from(actor_of(origin)), Msg::Fed(Arc::new(Message::RelayRefused { frame, refusal })));
            return;
        }
        let sequenced = domain.room.sequence(frame, Some(origin), CLOCKS_MS[self.actor], ctx);
        let sequenced = sequenced.expect("the core asked for validation, so it sequences");
        self.execute(domain, sequenced.outputs, ctx, o);
    }

    fn arm_retry(&self, o: &mut Out<Self>) {
        if self.config.retries_armed {
            o.set_timer(Timer::Retry, model_timeout());
        }
    }

    fn client_start(&self, settled: usize, o: &mut Out<Self>) -> ClientState {
        if let Some(frame) = self.config.client_frame(settled) {
            o.send(Id::from(self.config.client_home), Msg::Submit(frame));
            self.arm_retry(o);
        }
        ClientState { settled }
    }

    fn client_on_msg(&self, state: &mut Cow<NodeState>, msg: Msg, o: &mut Out<Self>) {
        let NodeState::Client(client) = &**state else { return };
        let Some(current) = self.config.client_frame(client.settled) else { return };
        let settles = match msg {
            Msg::Ack { frame, .. } => frame == current,
            Msg::Refused { frame, refusal } => frame == current && !refusal.is_retryable(),
            _ => false,
        };
        if settles {
            let settled = client.settled + 1;
            o.save(NodeStorage::Client(settled));
            let next = self.client_start(settled, o);
            if self.config.client_frame(settled).is_none() {
                o.cancel_timer(Timer::Retry);
            }
            *state.to_mut() = NodeState::Client(next);
        }
    }

    fn client_on_retry(&self, state: &mut Cow<NodeState>, o: &mut Out<Self>) {
        let NodeState::Client(client) = &**state else { return };
        if let Some(frame) = self.config.client_frame(client.settled) {
            o.send(Id::from(self.config.client_home), Msg::Submit(frame));
            self.arm_retry(o);
        }
    }
}
