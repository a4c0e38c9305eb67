//! Moderation in the room core: kicks and bans become server-signed MLS
//! Remove proposals sequenced like any frame; roles and bans change in the
//! shard that owns the room; every act is written, with its audit record,
//! by one writer task in the order the shards decided them.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use kalandra_proto::payload;
use kalandra_proto::{ErrorCode, Frame, FrameHeaderBuf, Opcode, RoomId, SenderId};
use tokio::sync::{mpsc, oneshot};

use super::{error_frame_with, NodeHealth, PersistentGroup, Room, Shard};
use crate::audit::{ActorKind, AuditAction, AuditEvent, AuditRecord};
use crate::mls_state::ServerSigner;
use crate::moderation::{Act, Actor, ModerationError, Role};
use crate::sequencer::{GroupError, SubmitError, SERVER_SENDER_ID};
use crate::store::{LogEntry, ModerationChange, Store, StoredBan};

/// Moderation writes queued for the writer before acts are refused as busy.
pub const MODERATION_WRITES_QUEUED_MAX: usize = 256;
/// How often a shard checks for overdue server proposals and ended bans.
pub const MODERATION_TICK_MS: u64 = 1_000;
/// Most rooms one [`Node::list_rooms`](super::Node::list_rooms) call returns.
pub const ROOMS_LIST_MAX: usize = 1_000;

// A moderation act needs one writer slot; a full queue is refused, never waited on.
const _: () = assert!(MODERATION_WRITES_QUEUED_MAX > 0);
// Re-announcing is checked on the tick, so the bound must span several ticks.
const _: () = assert!(crate::sequencer::SERVER_PROPOSAL_REANNOUNCE_MS >= 10 * MODERATION_TICK_MS);

/// A moderation act asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModerationRequest {
    /// The room.
    pub room_id: RoomId,
    /// Who asks.
    pub actor: Actor,
    /// The user acted upon.
    pub target: SenderId,
    /// What to do.
    pub act: Act,
    /// The reason, for the audit log.
    pub reason: String,
}

/// A moderation act that is done and durable, with its audit record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModerationDone {
    /// Log index of the Remove proposal the act sequenced, if it sequenced one.
    pub log_index: Option<u64>,
    /// The room's epoch when the act was decided.
    pub epoch: u64,
    /// Server time of the act, ms since the Unix epoch.
    pub time_ms: u64,
    /// The act's audit record.
    pub audit: AuditRecord,
}

/// Why a moderation act was not done.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModerationFailure {
    /// The room does not exist.
    #[error("no such room")]
    UnknownRoom,
    /// The target of a kick is not a member of the room.
    #[error("user {0} is not a member of the room")]
    NotMember(SenderId),
    /// The actor may not do this, or the role change is not possible.
    #[error(transparent)]
    Refused(#[from] ModerationError),
    /// The target's removal is already pending: it waits for a covering commit.
    #[error("the removal of user {0} is already pending")]
    RemovalPending(SenderId),
    /// Unban of a user who is not banned.
    #[error("user {0} is not banned")]
    NotBanned(SenderId),
    /// The sequencer refused the Remove proposal (limits, storage recovery).
    #[error("the room refused the removal: {0}")]
    Sequencer(SubmitError),
    /// Too many moderation writes are queued; retry shortly.
    #[error("too many moderation acts in progress; retry shortly")]
    Busy,
    /// Storage failed: the act may not be durable.
    #[error("storage failed: {0}")]
    Storage(String),
    /// The node is shutting down.
    #[error("the server is shutting down")]
    Stopped,
}

impl ModerationFailure {
    /// The wire error code.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            ModerationFailure::UnknownRoom => ErrorCode::UnknownRoom,
            ModerationFailure::NotMember(_) => ErrorCode::NotMember,
            ModerationFailure::Refused(ModerationError::Forbidden(_) | ModerationError::SelfTarget) => {
                ErrorCode::Forbidden
            }
            ModerationFailure::Refused(ModerationError::TooManyRoles) => ErrorCode::QuotaExceeded,
            ModerationFailure::Refused(_) => ErrorCode::Forbidden,
            ModerationFailure::RemovalPending(_) => ErrorCode::PendingProposals,
            ModerationFailure::NotBanned(_) => ErrorCode::NotMember,
            ModerationFailure::Sequencer(error) => error.error_code(),
            ModerationFailure::Busy => ErrorCode::RateLimited,
            ModerationFailure::Storage(_) => ErrorCode::StorageUnavailable,
            ModerationFailure::Stopped => ErrorCode::ShuttingDown,
        }
    }
}

/// The reply channel of a moderation act.
pub type ModerationReply = oneshot::Sender<Result<ModerationDone, ModerationFailure>>;

/// A room as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomInfo {
    /// The room.
    pub room_id: RoomId,
    /// Its creator (admin).
    pub creator: SenderId,
    /// Creation time, ms since the Unix epoch.
    pub created_at_ms: u64,
    /// Current MLS epoch.
    pub epoch: u64,
    /// Index the next frame gets.
    pub next_log_index: u64,
    /// Members, by sender id.
    pub members: Vec<SenderId>,
    /// Users with a role, the creator first.
    pub roles: Vec<(SenderId, Role)>,
    /// Banned users and when their ban ends.
    pub bans: Vec<(SenderId, Option<u64>)>,
    /// Server-issued proposals waiting for a covering commit.
    pub server_proposals_pending: usize,
    /// Log index and time of the first of them.
    pub pending_since: Option<(u64, u64)>,
    /// Members whose removal those proposals ask for.
    pub removals_pending: Vec<SenderId>,
}

/// A room in a listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoomSummary {
    /// The room.
    pub room_id: RoomId,
    /// Its creator.
    pub creator: SenderId,
    /// Current MLS epoch.
    pub epoch: u64,
    /// Number of members.
    pub members: usize,
    /// Index the next frame gets.
    pub next_log_index: u64,
}

/// One write for the moderation writer.
pub(super) struct ModerationWrite {
    change: ModerationChange,
    event: AuditEvent,
    done: Option<(ModerationReply, Option<u64>, u64)>,
}

/// Starts the task that writes moderation changes and their audit records
/// in the order they were decided.
pub(super) fn start_writer(
    store: Arc<dyn Store>,
    health: Arc<NodeHealth>,
) -> (mpsc::Sender<ModerationWrite>, tokio::task::JoinHandle<()>) {
    let (sender, mut receiver) = mpsc::channel::<ModerationWrite>(MODERATION_WRITES_QUEUED_MAX);
    let task = tokio::spawn(async move {
        while let Some(write) = receiver.recv().await {
            let store = Arc::clone(&store);
            let ModerationWrite { change, event, done } = write;
            let result = tokio::task::spawn_blocking(move || store.record_moderation(&change, &event))
                .await
                .map_err(|error| error.to_string())
                .and_then(|result| result.map_err(|error| error.to_string()));
            if let Err(error) = &result {
                tracing::error!(%error, "storage failed writing a moderation act; the node stops and recovers on restart");
                health.failed.store(true, Ordering::Release);
            }
            if let Some((reply, log_index, epoch)) = done {
                let outcome = result
                    .map(|audit| ModerationDone { log_index, epoch, time_ms: audit.time_ms, audit })
                    .map_err(ModerationFailure::Storage);
                let _ = reply.send(outcome);
            }
        }
    });
    (sender, task)
}

/// An act waiting for its Remove proposal to become durable, with the
/// writer slot reserved for its audit record.
pub(super) struct ActAwaitingProposal {
    log_index: u64,
    change: ModerationChange,
    event: AuditEvent,
    epoch: u64,
    reply: ModerationReply,
    slot: mpsc::OwnedPermit<ModerationWrite>,
}

fn audit_event(request: &ModerationRequest, now_ms: u64) -> AuditEvent {
    let (actor_kind, actor_id) = match request.actor {
        Actor::Operator => (ActorKind::Operator, None),
        Actor::Member(member) => (ActorKind::Member, Some(member.0)),
    };
    let (action, role, until_ms) = match &request.act {
        Act::Kick => (AuditAction::Kick, None, None),
        Act::Ban { until_ms } => (AuditAction::Ban, None, *until_ms),
        Act::Unban => (AuditAction::Unban, None, None),
        Act::Grant(role) => (AuditAction::GrantRole, Some(role.as_str().to_owned()), None),
        Act::Revoke(role) => (AuditAction::RevokeRole, Some(role.as_str().to_owned()), None),
    };
    AuditEvent {
        time_ms: now_ms,
        actor_kind,
        actor_id,
        action,
        room: Some(request.room_id.to_string()),
        target: Some(request.target.0),
        role,
        reason: (!request.reason.is_empty()).then(|| request.reason.clone()),
        until_ms,
        log_index: None,
        retention_ms: None,
    }
}

/// A signed `Proposal` frame from the server removing `target`.
fn remove_proposal_frame<G: PersistentGroup>(
    room_id: RoomId,
    room: &Room<G>,
    target: SenderId,
    signer: &ServerSigner,
) -> Result<Frame, ModerationFailure> {
    let proposal = room
        .sequencer
        .group()
        .remove_proposal(target, signer)
        .map_err(|error| ModerationFailure::Sequencer(SubmitError::InvalidProposal(error)))?;
    let mut header = FrameHeaderBuf::new(Opcode::Proposal);
    header.set_room_id(room_id).set_sender_id(SERVER_SENDER_ID).set_epoch(room.sequencer.epoch());
    let mut frame = Frame::with_payload(header, &payload::Proposal { proposal }).map_err(|error| {
        ModerationFailure::Sequencer(SubmitError::InvalidProposal(GroupError::Internal(error.to_string())))
    })?;
    frame.sign(signer.signing_key());
    Ok(frame)
}

impl<G: PersistentGroup> Shard<G> {
    /// Decides a moderation act; replies once it is durable (or refused).
    ///
    /// A slot in the writer's queue is reserved before anything changes, so
    /// that an act that is decided always gets its audit record written.
    pub(super) fn moderate(&mut self, request: ModerationRequest, reply: ModerationReply) {
        let now_ms = (self.clock)();
        let Ok(slot) = self.moderation_writer.clone().try_reserve_owned() else {
            tracing::warn!("moderation writer queue full");
            self.metrics.moderation_refused(&request.actor, ErrorCode::RateLimited);
            let _ = reply.send(Err(ModerationFailure::Busy));
            return;
        };
        let result = self.decide(&request, now_ms);
        match result {
            Ok(Decision::Write(change)) => {
                let epoch = self.rooms.get(&request.room_id).map_or(0, |room| room.sequencer.epoch());
                let event = audit_event(&request, now_ms);
                slot.send(ModerationWrite { change, event, done: Some((reply, None, epoch)) });
            }
            Ok(Decision::AfterProposal(change, log_index)) => {
                let room = self.rooms.get_mut(&request.room_id).expect("decided on an existing room");
                let mut event = audit_event(&request, now_ms);
                event.log_index = Some(log_index);
                let epoch = room.sequencer.epoch();
                room.acts_awaiting_proposal.push_back(ActAwaitingProposal {
                    log_index,
                    change,
                    event,
                    epoch,
                    reply,
                    slot,
                });
            }
            Err(failure) => {
                self.metrics.moderation_refused(&request.actor, failure.error_code());
                let _ = reply.send(Err(failure));
            }
        }
    }

    /// Whether `member` moderates `room_id` now: a current member holding
    /// the admin or moderator role (`None`: no such room).
    pub(super) fn moderates_room(&self, room_id: RoomId, member: SenderId) -> Option<bool> {
        let room = self.rooms.get(&room_id)?;
        let holds_role = matches!(room.roles.role_of(member), Some(Role::Admin | Role::Moderator));
        Some(holds_role && current_member(room, member, (self.clock)()).unwrap_or(false))
    }

    fn decide(&mut self, request: &ModerationRequest, now_ms: u64) -> Result<Decision, ModerationFailure> {
        let room_id = request.room_id;
        let target = request.target;
        let room = self.rooms.get_mut(&room_id).ok_or(ModerationFailure::UnknownRoom)?;
        if let Actor::Member(member) = request.actor {
            if !current_member(room, member, now_ms)? {
                return Err(ModerationError::Forbidden("only current members of the room moderate it").into());
            }
        }
        room.roles.authorize(request.actor, target, &request.act)?;
        match &request.act {
            Act::Kick => {
                if !room.sequencer.is_member(target) {
                    return Err(ModerationFailure::NotMember(target));
                }
                let log_index = self.propose_removal(room_id, target, now_ms)?;
                Ok(Decision::AfterProposal(ModerationChange::None, log_index))
            }
            Act::Ban { until_ms } => {
                let removal_pending = room
                    .sequencer
                    .group()
                    .pending_server_removals()
                    .map_err(|error| ModerationFailure::Sequencer(SubmitError::InvalidProposal(error)))?
                    .contains(&target);
                let removal_needed = room.sequencer.is_member(target) && !removal_pending;
                let previous = room.sequencer.ban_of(target);
                room.sequencer.ban(target, *until_ms).map_err(ModerationFailure::Sequencer)?;
                let change = ModerationChange::SetBan {
                    room_id,
                    user_id: target.0,
                    ban: Some(StoredBan { until_ms: *until_ms }),
                };
                self.watched.insert(room_id);
                if !removal_needed {
                    return Ok(Decision::Write(change));
                }
                match self.propose_removal(room_id, target, now_ms) {
                    Ok(log_index) => Ok(Decision::AfterProposal(change, log_index)),
                    Err(failure) => {
                        let room = self.rooms.get_mut(&room_id).expect("room exists");
                        match previous {
                            Some(until_ms) => room.sequencer.ban(target, until_ms).expect("was banned"),
                            None => {
                                room.sequencer.unban(target);
                            }
                        }
                        Err(failure)
                    }
                }
            }
            Act::Unban => {
                if !room.sequencer.unban(target) {
                    return Err(ModerationFailure::NotBanned(target));
                }
                Ok(Decision::Write(ModerationChange::SetBan { room_id, user_id: target.0, ban: None }))
            }
            Act::Grant(role) => {
                room.roles.apply(target, &request.act);
                Ok(Decision::Write(ModerationChange::SetRole {
                    room_id,
                    user_id: target.0,
                    role: Some(*role),
                }))
            }
            Act::Revoke(_) => {
                room.roles.apply(target, &request.act);
                Ok(Decision::Write(ModerationChange::SetRole { room_id, user_id: target.0, role: None }))
            }
        }
    }

    /// Sequences a server Remove proposal for `target`; returns its log index.
    fn propose_removal(
        &mut self,
        room_id: RoomId,
        target: SenderId,
        now_ms: u64,
    ) -> Result<u64, ModerationFailure> {
        let room = self.rooms.get_mut(&room_id).ok_or(ModerationFailure::UnknownRoom)?;
        let pending = room
            .sequencer
            .group()
            .pending_server_removals()
            .map_err(|error| ModerationFailure::Sequencer(SubmitError::InvalidProposal(error)))?;
        if pending.contains(&target) {
            return Err(ModerationFailure::RemovalPending(target));
        }
        let frame = remove_proposal_frame(room_id, room, target, &self.server_signer)?;
        let sequenced =
            room.sequencer.submit_server_proposal(frame, now_ms).map_err(ModerationFailure::Sequencer)?;
        self.watched.insert(room_id);
        let encoded = sequenced.frame.to_bytes();
        self.pending_entries.push(LogEntry { room_id, log_index: sequenced.log_index, frame: encoded });
        match self.pending_rooms.iter_mut().find(|(room, _)| *room == room_id) {
            Some((_, through)) => *through = sequenced.log_index,
            None => self.pending_rooms.push((room_id, sequenced.log_index)),
        }
        Ok(sequenced.log_index)
    }

    /// The room's frames through `through` are durable: write the acts
    /// whose Remove proposal is among them.
    pub(super) fn proposals_durable(&mut self, room_id: RoomId, through: u64) {
        let Some(room) = self.rooms.get_mut(&room_id) else { return };
        let mut ready = Vec::new();
        while room.acts_awaiting_proposal.front().is_some_and(|act| act.log_index <= through) {
            ready.push(room.acts_awaiting_proposal.pop_front().expect("front exists"));
        }
        for act in ready {
            let ActAwaitingProposal { log_index, change, event, epoch, reply, slot } = act;
            slot.send(ModerationWrite { change, event, done: Some((reply, Some(log_index), epoch)) });
        }
    }

    /// Storage failed: acts waiting on their proposal are not done.
    pub(super) fn proposals_failed(&mut self, room_id: RoomId, error: &str) {
        let Some(room) = self.rooms.get_mut(&room_id) else { return };
        for act in room.acts_awaiting_proposal.drain(..) {
            let _ = act.reply.send(Err(ModerationFailure::Storage(error.to_owned())));
        }
    }

    /// Periodic work: remind members of uncovered server proposals, and
    /// record bans that ended.
    pub(super) fn moderation_tick(&mut self) {
        let now_ms = (self.clock)();
        let watched: Vec<RoomId> = self.watched.iter().copied().collect();
        for room_id in watched {
            let Some(room) = self.rooms.get_mut(&room_id) else {
                self.watched.remove(&room_id);
                continue;
            };
            if let Some(overdue) = room.sequencer.commit_overdue(now_ms) {
                self.metrics.rejected(ErrorCode::PendingProposals);
                tracing::warn!(%room_id, pending = overdue.pending, pending_for_ms = overdue.pending_for_ms, "server proposals still uncovered; reminding members");
                let message = format!(
                    "{} server-issued proposals since log index {} wait for a commit",
                    overdue.pending, overdue.first_log_index
                );
                let notice = error_frame_with(
                    room_id,
                    0,
                    ErrorCode::PendingProposals,
                    &message,
                    Some(room.sequencer.epoch()),
                    Some(overdue.first_log_index),
                    None,
                );
                let removed = room.sequencer.group().pending_server_removals().unwrap_or_default();
                for subscriber in room.subscribers.iter().filter(|s| s.live) {
                    if !removed.contains(&subscriber.outbox.sender()) {
                        subscriber.outbox.notice(notice.clone());
                    }
                }
            }
            let ended = room.sequencer.expire_bans(now_ms);
            let keep =
                !room.sequencer.server_proposals_pending().is_empty() || room.sequencer.has_timed_bans();
            for user in ended {
                let event = AuditEvent {
                    time_ms: now_ms,
                    actor_kind: ActorKind::Server,
                    actor_id: None,
                    action: AuditAction::BanExpired,
                    room: Some(room_id.to_string()),
                    target: Some(user.0),
                    role: None,
                    reason: None,
                    until_ms: None,
                    log_index: None,
                    retention_ms: None,
                };
                let change = ModerationChange::SetBan { room_id, user_id: user.0, ban: None };
                // With the queue full the ended ban stays stored; it is no
                // longer enforced, and the next start expires it again.
                if self.moderation_writer.try_send(ModerationWrite { change, event, done: None }).is_err() {
                    tracing::warn!(%room_id, user = user.0, "moderation writer queue full; ban end not recorded");
                }
            }
            if !keep {
                self.watched.remove(&room_id);
            }
        }
    }

    pub(super) fn room_info(&self, room_id: RoomId) -> Option<RoomInfo> {
        let room = self.rooms.get(&room_id)?;
        let mut members = room.sequencer.group().members();
        members.sort_by_key(|member| member.0);
        let pending = room.sequencer.pending_server_proposals();
        Some(RoomInfo {
            room_id,
            creator: room.creator,
            created_at_ms: room.created_at_ms,
            epoch: room.sequencer.epoch(),
            next_log_index: room.sequencer.next_log_index(),
            members,
            roles: room.roles.all(),
            bans: room.sequencer.bans(),
            server_proposals_pending: pending.refs.len(),
            pending_since: pending.since,
            removals_pending: room.sequencer.group().pending_server_removals().unwrap_or_default(),
        })
    }

    pub(super) fn list_rooms(&self, after: Option<RoomId>, count_max: usize) -> Vec<RoomSummary> {
        let mut rooms: Vec<RoomSummary> = self
            .rooms
            .iter()
            .filter(|(room_id, _)| after.is_none_or(|after| room_id.0 > after.0))
            .map(|(room_id, room)| RoomSummary {
                room_id: *room_id,
                creator: room.creator,
                epoch: room.sequencer.epoch(),
                members: room.sequencer.group().members().len(),
                next_log_index: room.sequencer.next_log_index(),
            })
            .collect();
        rooms.sort_by_key(|room| room.room_id.0);
        rooms.truncate(count_max.min(ROOMS_LIST_MAX));
        rooms
    }
}

/// Only current members moderate: not a removed or banned moderator, nor
/// one whose removal is pending.
fn current_member<G: PersistentGroup>(
    room: &Room<G>,
    member: SenderId,
    now_ms: u64,
) -> Result<bool, ModerationFailure> {
    let leaving = room
        .sequencer
        .group()
        .pending_server_removals()
        .map_err(|error| ModerationFailure::Sequencer(SubmitError::InvalidProposal(error)))?
        .contains(&member);
    Ok(room.sequencer.is_member(member) && !leaving && !room.sequencer.is_banned(member, now_ms))
}

/// What a decided act still needs.
enum Decision {
    /// Write the change now.
    Write(ModerationChange),
    /// Write the change once the Remove proposal at this index is durable.
    AfterProposal(ModerationChange, u64),
}
