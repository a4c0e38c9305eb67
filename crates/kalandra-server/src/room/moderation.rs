//! Moderation in the room core: kicks and bans become server-signed MLS
//! Remove proposals sequenced like any frame; roles and bans change in the
//! shard that owns the room; every act comes out as a write (the change
//! with its audit record) in the order the shard decided it.

use kalandra_proto::payload;
use kalandra_proto::{ErrorCode, Frame, FrameHeaderBuf, Opcode, RoomId, SenderId};

use super::acts::{
    ActAwaitingProposal, Completion, ModerationDone, ModerationFailure, ModerationRequest, ModerationWrite,
    RoomInfo, RoomSummary, ROOMS_LIST_MAX,
};
use super::frames::error_frame_with;
use super::shard::{room_standing, Output, Peer, Room, Shard, Standing};
use crate::room::audit::{ActorKind, AuditAction, AuditEvent};
use crate::room::mls_state::ServerSigner;
use crate::room::roles::{Act, Actor, ModerationError, Role};
use crate::room::sequencer::{GroupError, PersistentGroup, SubmitError, SERVER_SENDER_ID};
use crate::store::{ModerationChange, StoredBan};

/// The moderation act a `Kick`, `Ban`, `Unban` or `SetRole` frame from
/// `sender` asks for, or the error to answer with.
pub fn moderation_request(
    frame: &kalandra_proto::Frame,
    sender: SenderId,
) -> Result<ModerationRequest, (ErrorCode, String)> {
    let malformed = |error: kalandra_proto::PayloadError| (ErrorCode::MalformedPayload, error.to_string());
    let room_id = frame.header().room_id();
    let request = |target: u64, act: Act, reason: String| ModerationRequest {
        room_id,
        actor: Actor::Member(sender),
        target: SenderId(target),
        act,
        reason,
    };
    match frame.opcode() {
        Opcode::Kick => {
            let kick: payload::Kick = frame.decode_payload().map_err(malformed)?;
            Ok(request(kick.target, Act::Kick, kick.reason))
        }
        Opcode::Ban => {
            let ban: payload::Ban = frame.decode_payload().map_err(malformed)?;
            Ok(request(ban.target, Act::Ban { duration_ms: ban.duration_ms }, ban.reason))
        }
        Opcode::Unban => {
            let unban: payload::Unban = frame.decode_payload().map_err(malformed)?;
            Ok(request(unban.target, Act::Unban, unban.reason))
        }
        Opcode::SetRole => {
            let set: payload::SetRole = frame.decode_payload().map_err(malformed)?;
            let role = Role::parse(&set.role)
                .ok_or_else(|| (ErrorCode::Forbidden, format!("unknown role {:?}", set.role)))?;
            let act = if set.granted { Act::Grant(role) } else { Act::Revoke(role) };
            Ok(request(set.target, act, String::new()))
        }
        // `Redact` is answered by `Listener::redact`, before this is called.
        other => Err((ErrorCode::Internal, format!("opcode {other:?} is not a moderation act"))),
    }
}

/// The reply to a moderation frame: an `Ack` naming the Remove proposal's
/// index (`u64::MAX` when the act sequenced none), or an `Error`.
pub fn moderation_reply(
    room_id: RoomId,
    request_id: u32,
    outcome: &Result<ModerationDone, ModerationFailure>,
) -> bytes::Bytes {
    match outcome {
        Ok(done) => {
            let log_index = done.log_index.unwrap_or(u64::MAX);
            let ack = payload::Ack {
                log_index,
                epoch: done.epoch,
                server_time_ms: done.time_ms,
                log_head: None,
                signed_head: None,
            };
            super::frames::reply_frame(room_id, request_id, &ack)
        }
        Err(failure) => {
            super::frames::error_frame(room_id, request_id, failure.error_code(), &failure.to_string())
        }
    }
}

/// The audit record of `request`, decided as `change` (a ban's end as stored).
fn audit_event(request: &ModerationRequest, change: &ModerationChange, now_ms: u64) -> AuditEvent {
    let (actor_kind, actor_id) = match request.actor {
        Actor::Operator => (ActorKind::Operator, None),
        Actor::Member(member) => (ActorKind::Member, Some(member.0)),
    };
    let (action, role, until_ms) = match &request.act {
        Act::Kick => (AuditAction::Kick, None, None),
        Act::Ban { .. } => {
            let until_ms = match change {
                ModerationChange::SetBan { ban: Some(ban), .. } => ban.until_ms,
                _ => None,
            };
            (AuditAction::Ban, None, until_ms)
        }
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
fn remove_proposal_frame<G: PersistentGroup, P>(
    room_id: RoomId,
    room: &Room<G, P>,
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

impl<G: PersistentGroup, P: Peer> Shard<G, P> {
    /// Decides a moderation act. The outcome comes out as
    /// [`Output::RecordModeration`] (with a completion for `token`) once
    /// any Remove proposal it needs is durable, or as
    /// [`Output::ModerationRefused`]. The driver reserves the writer's
    /// slot before asking, so that an act that is decided always gets its
    /// audit record written.
    pub fn handle_moderate(&mut self, request: ModerationRequest, token: u64, now_ms: u64) {
        match self.decide(&request, now_ms) {
            Ok(Decision::Write(change)) => {
                let epoch = self.rooms.get(&request.room_id).map_or(0, |room| room.sequencer.epoch());
                let event = audit_event(&request, &change, now_ms);
                let completion = Some(Completion { token, log_index: None, epoch });
                self.outputs.push_back(Output::RecordModeration(ModerationWrite {
                    change,
                    event,
                    completion,
                }));
            }
            Ok(Decision::AfterProposal(change, log_index)) => {
                let room = self.rooms.get_mut(&request.room_id).expect("decided on an existing room");
                let mut event = audit_event(&request, &change, now_ms);
                event.log_index = Some(log_index);
                let epoch = room.sequencer.epoch();
                room.acts_awaiting_proposal.push_back(ActAwaitingProposal {
                    log_index,
                    change,
                    event,
                    epoch,
                    token,
                });
            }
            Err(failure) => {
                self.counters.moderation_refusals.push((request.actor, failure.error_code()));
                self.outputs.push_back(Output::ModerationRefused { token, failure });
            }
        }
    }

    /// On what standing `member` may redact in `room_id` now (`None`: no
    /// such room): a current member holding the admin or moderator role
    /// redacts any erasable frame, another current member its own; someone
    /// banned, being removed or not a member, nothing.
    pub fn redact_standing(&self, room_id: RoomId, member: SenderId, now_ms: u64) -> Option<Standing> {
        let room = self.rooms.get(&room_id)?;
        let standing = room_standing(room, member, now_ms);
        let holds_role = matches!(room.roles.role_of(member), Some(Role::Admin | Role::Moderator));
        Some(match standing {
            Standing::Member if holds_role => Standing::Moderator,
            other => other,
        })
    }

    fn decide(&mut self, request: &ModerationRequest, now_ms: u64) -> Result<Decision, ModerationFailure> {
        let room_id = request.room_id;
        let target = request.target;
        let room = self.rooms.get_mut(&room_id).ok_or(ModerationFailure::UnknownRoom)?;
        if room.replica {
            return Err(ModerationError::Forbidden(
                "the room is ordered by another domain; moderate it there",
            )
            .into());
        }
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
            Act::Ban { duration_ms } => self.decide_ban(room_id, target, *duration_ms, now_ms),
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

    /// A ban: recorded in the room's sequencer at once; a member still in
    /// the group is removed by a server proposal first (the ban is undone
    /// if that proposal cannot be sequenced).
    fn decide_ban(
        &mut self,
        room_id: RoomId,
        target: SenderId,
        duration_ms: Option<u64>,
        now_ms: u64,
    ) -> Result<Decision, ModerationFailure> {
        let room = self.rooms.get_mut(&room_id).ok_or(ModerationFailure::UnknownRoom)?;
        let removal_pending = room
            .sequencer
            .group()
            .pending_server_removals()
            .map_err(|error| ModerationFailure::Sequencer(SubmitError::InvalidProposal(error)))?
            .contains(&target);
        let removal_needed = room.sequencer.is_member(target) && !removal_pending;
        // Bans are judged on the room's time, which a server clock stepped
        // back at a restart runs behind: the end is reckoned on it too.
        let room_time_ms = room.sequencer.room_time_ms(now_ms);
        let until_ms = duration_ms.map(|duration_ms| room_time_ms.saturating_add(duration_ms));
        let previous = room.sequencer.ban_of(target);
        room.sequencer.ban(target, until_ms).map_err(ModerationFailure::Sequencer)?;
        let change =
            ModerationChange::SetBan { room_id, user_id: target.0, ban: Some(StoredBan { until_ms }) };
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

    /// Sequences a server Remove proposal for `target`; returns its log index.
    pub(super) fn propose_removal(
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
        let frame = remove_proposal_frame(room_id, room, target, &self.config.server_signer)?;
        let sequenced =
            room.sequencer.submit_server_proposal(frame, now_ms).map_err(ModerationFailure::Sequencer)?;
        self.watched.insert(room_id);
        let log_index = sequenced.log_index;
        room.server_proposal_sequenced(target, log_index);
        self.sequenced(room_id, None, sequenced);
        Ok(log_index)
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
            let ActAwaitingProposal { log_index, change, event, epoch, token } = act;
            let completion = Some(Completion { token, log_index: Some(log_index), epoch });
            self.outputs.push_back(Output::RecordModeration(ModerationWrite { change, event, completion }));
        }
    }

    /// Storage failed: acts waiting on their proposal are not done.
    pub(super) fn proposals_failed(&mut self, room_id: RoomId, error: &str) {
        let Some(room) = self.rooms.get_mut(&room_id) else { return };
        for act in room.acts_awaiting_proposal.drain(..) {
            let failure = ModerationFailure::Storage(error.to_owned());
            self.outputs.push_back(Output::ModerationRefused { token: act.token, failure });
        }
    }

    /// Periodic work (every [`MODERATION_TICK_MS`] while
    /// [`Shard::wants_ticks`]): remind members of uncovered server
    /// proposals, and record bans that ended.
    pub fn handle_tick(&mut self, now_ms: u64) {
        let watched: Vec<RoomId> = self.watched.iter().copied().collect();
        for room_id in watched {
            let unsettled = self.tick_unsettled_commit(room_id, now_ms);
            let Some(room) = self.rooms.get_mut(&room_id) else {
                self.watched.remove(&room_id);
                continue;
            };
            if let Some(overdue) = room.sequencer.commit_overdue(now_ms) {
                self.counters.rejections.push(ErrorCode::PendingProposals);
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
                    if !removed.contains(&subscriber.peer.sender()) {
                        subscriber.peer.notice(notice.clone());
                    }
                }
            }
            let ended = room.sequencer.expire_bans(now_ms);
            let keep = unsettled
                || !room.sequencer.server_proposals_pending().is_empty()
                || room.sequencer.has_timed_bans();
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
                // Nobody waits: with the writer's queue full the driver drops
                // it, the ended ban stays stored, it is no longer enforced,
                // and the next start expires it again.
                self.outputs.push_back(Output::RecordModeration(ModerationWrite {
                    change,
                    event,
                    completion: None,
                }));
            }
            if !keep {
                self.watched.remove(&room_id);
            }
        }
    }

    /// Describes a room (`None`: no such room).
    pub fn room_info(&self, room_id: RoomId) -> Option<RoomInfo> {
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

    /// This shard's rooms with an id above `after`, in id order.
    pub fn list_rooms(&self, after: Option<RoomId>, count_max: usize) -> Vec<RoomSummary> {
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
fn current_member<G: PersistentGroup, P>(
    room: &Room<G, P>,
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
