//! The server's answers to our requests: acknowledgements, refusals, key
//! packages claimed, GroupInfo.

use client_core::mls::RoomGroup;
use client_core::room_log::{CommitRefusal, Intent, RoomLog};
use kalandra_proto::payload::{self, ExternalJoin};
use kalandra_proto::{ErrorCode, Frame, RoomId};

use super::{digest, Client, Leave, PendingJoin, Request, Seen, Work, WorkKind};
use crate::server::now_ms;

/// `frame` as the sequencer stored it: stamped with the acknowledgement's
/// index and time.
fn stamp(frame: &Frame, ack: &payload::Ack) -> Frame {
    let mut stamped = frame.clone();
    stamped.header_mut().set_log_index(ack.log_index).set_server_timestamp_ms(ack.server_time_ms);
    stamped
}

impl Client {
    pub(super) fn on_ack(&mut self, request_id: u32, ack: &payload::Ack) -> Result<(), String> {
        let Some(request) = self.in_flight.remove(&request_id) else {
            self.violation(format!("an acknowledgement for request {request_id}, which is not in flight"));
            return Ok(());
        };
        match request {
            Request::Create { room, frame } => {
                let stamped = stamp(&frame, ack);
                let stamped_digest = digest(&stamped.to_bytes());
                {
                    let mut record = self.trace();
                    let trace = record.rooms.entry(room).or_default();
                    trace.delivered.push((ack.log_index, stamped_digest));
                    trace.acknowledged.push((ack.log_index, stamped_digest));
                }
                self.creation_confirmed(room);
            }
            Request::Message { room, id, frame } => return self.message_acked(room, id, &frame, ack),
            Request::Commit { room, settled: false, frame } => {
                return self.own_acked(room, &Some(frame), ack)
            }
            Request::Commit { settled: true, .. } | Request::Moderation { .. } => {}
            Request::Leave { room, epoch, frame, .. } => {
                if let Some(room) = self.room_mut(room).filter(|room| room.member()) {
                    room.leave = Some(Leave::Sent { epoch });
                }
                return self.own_acked(room, &Some(frame), ack);
            }
            Request::Redact { room, log_index } => {
                if ack.log_index != log_index {
                    self.violation(format!(
                        "room {room}: redaction of {log_index} acknowledged as {}",
                        ack.log_index
                    ));
                }
                self.shared.cast.ledger.borrow_mut().redactions.insert((room, log_index));
            }
            Request::ExternalJoin { room, frame, .. } => {
                let stamped_digest = digest(&stamp(&frame, ack).to_bytes());
                self.trace()
                    .rooms
                    .entry(room)
                    .or_default()
                    .acknowledged
                    .push((ack.log_index, stamped_digest));
                self.joined_by_commit(room, ack.log_index, ack.epoch);
            }
            Request::Report { room, report } => self.report_acked(room, &report, ack),
            Request::Hostile { room, act, frame } => {
                self.hostile_answered(act, None);
                if act == super::HostileAct::ForgedApplication {
                    return self.own_acked(room, &Some(frame), ack);
                }
            }
            other => self.violation(format!("an acknowledgement answering {other:?}")),
        }
        Ok(())
    }

    /// One of our frames other than a message or commit was acknowledged:
    /// at the cursor (live), it is applied as the log holds it.
    fn own_acked(
        &mut self,
        room_id: RoomId,
        frame: &Option<Frame>,
        ack: &payload::Ack,
    ) -> Result<(), String> {
        let Some(frame) = frame else { return Ok(()) };
        let stamped = stamp(frame, ack);
        let (live, cursor) = self.cursor(room_id);
        self.trace()
            .rooms
            .entry(room_id)
            .or_default()
            .acknowledged
            .push((ack.log_index, digest(&stamped.to_bytes())));
        if live && ack.log_index != cursor {
            self.violation(format!(
                "room {room_id}: acknowledged at {} while {cursor} is next",
                ack.log_index
            ));
            return Err("acknowledgement out of order".into());
        }
        if ack.log_index == cursor {
            return self.apply_own(room_id, &stamped);
        }
        Ok(())
    }

    fn cursor(&self, room_id: RoomId) -> (bool, u64) {
        let room = self.room(room_id);
        let cursor = room.and_then(|r| r.log.as_ref()).map_or(0, RoomLog::next_log_index);
        (room.is_some_and(|r| r.live), cursor)
    }

    fn creation_confirmed(&mut self, room_id: RoomId) {
        if let Some(log) = self.rooms.get_mut(&room_id).and_then(|r| r.log.as_mut()) {
            log.creation_confirmed();
        }
        self.persist();
        self.subscribe(room_id);
    }

    /// Our message is sequenced at the acknowledgement's index: its outbox
    /// entry is done (as `Client` settles it on the acknowledgement), and
    /// at the cursor the frame is applied as the log holds it.
    fn message_acked(
        &mut self,
        room_id: RoomId,
        id: u64,
        frame: &Frame,
        ack: &payload::Ack,
    ) -> Result<(), String> {
        let stamped = stamp(frame, ack);
        let stamped_digest = digest(&stamped.to_bytes());
        // Sealed in an epoch a void undid: members cannot open this copy;
        // the entry stays in the outbox, sealed again.
        let dead = self.dead_sealing(frame);
        let entry = if dead { None } else { self.shared.persisted.borrow_mut().outbox.remove(&id) };
        let sender = self.sender;
        {
            let mut record = self.trace();
            let trace = record.rooms.entry(room_id).or_default();
            trace.acknowledged.push((ack.log_index, stamped_digest));
            // Without an entry the log settled it already: this is a second copy.
            if let Some(entry) = entry {
                trace.entries.push((ack.log_index, sender, Seen::Own(entry.text)));
            }
        }
        let (live, cursor) = self.cursor(room_id);
        if live && ack.log_index != cursor {
            self.violation(format!(
                "room {room_id}: acknowledged at {} while {cursor} is next",
                ack.log_index
            ));
            return Err("acknowledgement out of order".into());
        }
        if ack.log_index < cursor {
            self.violation(format!(
                "room {room_id}: acknowledged at {}, behind the cursor {cursor}",
                ack.log_index
            ));
            return Ok(());
        }
        if ack.log_index == cursor {
            return self.apply_own(room_id, &stamped);
        }
        // Ahead of the cursor (catching up): the log brings it and settles nothing.
        Ok(())
    }

    pub(super) fn on_error(&mut self, frame: &Frame, error: &payload::Error) -> Result<(), String> {
        let request_id = frame.header().request_id();
        let code = ErrorCode::from_u16(error.code);
        let room_id = frame.header().room_id();
        self.debug(|| format!("error {code:?} {}", error.message));
        if request_id == 0 {
            return self.on_notice(room_id, code, error);
        }
        let Some(request) = self.in_flight.remove(&request_id) else {
            self.violation(format!(
                "error {code:?} for request {request_id}, not in flight: {}",
                error.message
            ));
            return Ok(());
        };
        let answering: String = format!("{request:?}").chars().take(60).collect();
        let unexpected = match request {
            Request::Message { room, id, frame } => self.message_refused(room, id, &frame, code, error),
            Request::Commit { settled: true, .. } => false,
            Request::Commit { room, settled: false, frame } => {
                let damaged = self.damaged_commit_refused(&frame, code);
                self.commit_refused(room, code, error) && !damaged
            }
            Request::Create { room, .. } => match code {
                Some(ErrorCode::RoomExists) => {
                    self.creation_confirmed(room);
                    false
                }
                _ => !transient(code),
            },
            Request::Leave { room, voids_applied, .. } => {
                let voided_since = self.room(room).is_some_and(|r| r.voids_applied > voids_applied);
                if let Some(room) = self.room_mut(room).filter(|room| room.member()) {
                    room.leave = Some(Leave::Want);
                }
                // A proposal made in an epoch a void undid, whose number the
                // room reached again with other keys, does not verify there.
                let stale = voided_since && code == Some(ErrorCode::InvalidProposal);
                !matches!(code, Some(ErrorCode::WrongEpoch | ErrorCode::NotMember | ErrorCode::Banned))
                    && !transient(code)
                    && !stale
            }
            Request::Moderation { .. } => {
                !matches!(
                    code,
                    Some(
                        ErrorCode::NotMember
                            | ErrorCode::Banned
                            | ErrorCode::PendingProposals
                            | ErrorCode::Forbidden
                    )
                ) && !transient(code)
            }
            // Only current members redact: not one being removed or banned.
            Request::Redact { .. } => {
                !matches!(code, Some(ErrorCode::NotMember | ErrorCode::Banned)) && !transient(code)
            }
            Request::Claim { .. } | Request::Upload => !transient(code),
            Request::GroupInfo { room, .. } => {
                self.pause(room);
                // `NotMember`: our removal is still pending; try again later.
                !matches!(code, Some(ErrorCode::Banned | ErrorCode::NotMember | ErrorCode::InvalidGroupInfo))
                    && !transient(code)
            }
            Request::ExternalJoin { room, label, group_info, .. } => {
                self.join_refused(room, label, group_info, code)
            }
            Request::Subscribe { room } => self.subscribe_refused(room, code),
            Request::JoinSearch { room } => {
                if matches!(code, Some(ErrorCode::NotMember | ErrorCode::Banned)) {
                    // Not in the group: our join was never sequenced (or we were removed since).
                    self.drop_join(room);
                } else {
                    self.pause(room);
                }
                !matches!(code, Some(ErrorCode::NotMember | ErrorCode::Banned)) && !transient(code)
            }
            Request::Report { room, .. } => self.report_refused(room, error),
            Request::Hostile { act, .. } => {
                self.hostile_answered(act, code);
                false
            }
        };
        if unexpected {
            self.violation(format!("room {room_id}: {answering} refused with {code:?}: {}", error.message));
        }
        Ok(())
    }

    /// An unsolicited notice.
    fn on_notice(
        &mut self,
        room_id: RoomId,
        code: Option<ErrorCode>,
        error: &payload::Error,
    ) -> Result<(), String> {
        match code {
            Some(ErrorCode::ResyncRequired) => {
                // Dropped from fan-out: read the rest again.
                if let Some(room) = self.room_mut(room_id) {
                    room.subscribed = false;
                    room.live = false;
                }
            }
            // A reminder that a removal waits for a commit: members cover it.
            Some(ErrorCode::PendingProposals | ErrorCode::ShuttingDown) => {}
            _ => self.violation(format!("unsolicited error {code:?}: {}", error.message)),
        }
        Ok(())
    }

    /// Our message was refused; it is sent again (resealed once the room
    /// moved on). Returns whether the refusal breaks a rule.
    fn message_refused(
        &mut self,
        room_id: RoomId,
        id: u64,
        frame: &Frame,
        code: Option<ErrorCode>,
        error: &payload::Error,
    ) -> bool {
        let ours = frame.header().epoch();
        // A commit we applied and that may still be voided: the room may
        // have gone back below the epoch we sealed in.
        let log = self.room(room_id).and_then(|r| r.log.as_ref());
        let current_here = log.map_or(0, RoomLog::epoch);
        let voidable = log.and_then(RoomLog::unsettled_commit).is_some();
        let mut persisted = self.shared.persisted.borrow_mut();
        let Some(entry) = persisted.outbox.get_mut(&id) else { return false };
        match code {
            Some(ErrorCode::WrongEpoch) => {
                let current = error.current_epoch.unwrap_or(0);
                entry.wait_for_epoch = current;
                // Not a broken rule once a void took us back to `current`.
                if current <= ours && !voidable && current_here > current {
                    drop(persisted);
                    self.violation(format!(
                        "room {room_id}: server says epoch {current} for a message at our epoch {ours}"
                    ));
                }
                false
            }
            // Sent again in the epoch the covering commit begins.
            Some(ErrorCode::PendingProposals) => {
                entry.wait_for_epoch = ours + 1;
                false
            }
            // Removed from the room, or being removed (the log will say so).
            Some(ErrorCode::NotMember | ErrorCode::Banned) => false,
            code => !transient(code),
        }
    }

    /// Our commit was refused. Returns whether the refusal breaks a rule.
    fn commit_refused(&mut self, room_id: RoomId, code: Option<ErrorCode>, error: &payload::Error) -> bool {
        // Fate unknown (the write may be durable), or try again: the log settles it.
        if matches!(code, Some(ErrorCode::StorageUnavailable | ErrorCode::RateLimited)) {
            return false;
        }
        let Some(log) = self.rooms.get_mut(&room_id).and_then(|r| r.log.as_mut()) else { return false };
        if log.pending_commit().is_none() {
            // The log settled our commit first (another's commit for its
            // epoch came before this refusal): nothing is left to refuse.
            return false;
        }
        let intent = log.pending_commit().map(|p| p.intent().clone());
        let refusal = match log.commit_refused(&self.provider, Some(error)) {
            Ok(refusal) => refusal,
            Err(error) => {
                self.violation(format!("room {room_id}: settling a refused commit: {error}"));
                return false;
            }
        };
        match (refusal, code) {
            (CommitRefusal::Retry { intent, .. }, _) => {
                log.redo_later(intent);
                false
            }
            // A server proposal we had not read yet: cover it, then redo ours.
            (CommitRefusal::Final, Some(ErrorCode::PendingProposals)) => {
                self.requeue(room_id, intent);
                false
            }
            // An add of a banned user; a commit of ours after we were removed.
            (CommitRefusal::Final, Some(ErrorCode::Banned | ErrorCode::NotMember)) => false,
            (CommitRefusal::Final, _) => true,
        }
    }

    /// Puts the intent of a refused commit back in the room's work.
    fn requeue(&mut self, room_id: RoomId, intent: Option<Intent>) {
        let label = self.shared.persisted.borrow_mut().commit_labels.remove(&room_id);
        let (Some(intent), Some(label)) = (intent, label) else { return };
        let kind = match intent {
            Intent::Update => WorkKind::Update,
            Intent::Invite(members) => WorkKind::Invite(members),
            Intent::Remove(members) => match members.first() {
                Some(member) => WorkKind::Remove(*member),
                None => return,
            },
            // The simulation has one domain: it never invites across domains.
            Intent::InviteAt { .. } | Intent::CoverProposals | Intent::Create => return,
        };
        if let Some(room) = self.room_mut(room_id) {
            room.work.push_front(Work { label, kind });
        }
    }

    fn subscribe_refused(&mut self, room_id: RoomId, code: Option<ErrorCode>) -> bool {
        if let Some(room) = self.room_mut(room_id) {
            room.subscribed = false;
        }
        match code {
            // Removed while we were away, or being removed (kicked or banned).
            Some(ErrorCode::NotMember | ErrorCode::Banned) => {
                self.removed(room_id);
                false
            }
            code => !transient(code),
        }
    }

    /// Our external join, built on the GroupInfo `group_info` (SHA-256),
    /// was refused: its group goes; a join that lost its epoch is tried
    /// again, and so is one refused as invalid, once the room's GroupInfo
    /// is another (see `join_refused_on`). Returns whether the refusal
    /// breaks a rule.
    fn join_refused(
        &mut self,
        room_id: RoomId,
        label: String,
        group_info: [u8; 32],
        code: Option<ErrorCode>,
    ) -> bool {
        match code {
            Some(ErrorCode::InvalidCommit) => {
                self.drop_join(room_id);
                if let Some(room) = self.room_mut(room_id) {
                    room.join_refused_on = Some(group_info);
                    room.work.push_front(Work { label, kind: WorkKind::ExternalJoin });
                }
                self.pause(room_id);
                false
            }
            // Fate unknown: the log says whether it was sequenced.
            Some(ErrorCode::StorageUnavailable) => false,
            Some(ErrorCode::WrongEpoch | ErrorCode::PendingProposals | ErrorCode::RateLimited) => {
                self.drop_join(room_id);
                if let Some(room) = self.room_mut(room_id) {
                    room.work.push_front(Work { label, kind: WorkKind::ExternalJoin });
                }
                self.pause(room_id);
                false
            }
            Some(ErrorCode::Banned) => {
                self.drop_join(room_id);
                false
            }
            code => {
                self.drop_join(room_id);
                !transient(code)
            }
        }
    }

    /// Gives up an external join: its group is deleted.
    pub(super) fn drop_join(&mut self, room_id: RoomId) {
        self.shared.persisted.borrow_mut().joins.remove(&room_id);
        let group = self.room_mut(room_id).and_then(|room| room.joining.take());
        if let Some(group) = group {
            if let Err(error) = group.delete(&self.provider) {
                self.violation(format!("room {room_id}: deleting a join's group: {error}"));
            }
        }
    }

    pub(super) fn pause(&mut self, room_id: RoomId) {
        if let Some(room) = self.room_mut(room_id) {
            room.retry_at_ms = now_ms() + super::RETRY_PAUSE_MS;
        }
    }

    /// Key packages for an invitation: the commit that adds them.
    pub(super) fn on_claimed(&mut self, request_id: u32, claimed: payload::KeyPackageClaimed) {
        let Some(Request::Claim { room, work }) = self.in_flight.remove(&request_id) else {
            self.violation(format!("key packages answering request {request_id}"));
            return;
        };
        let WorkKind::Invite(members) = &work.kind else { return };
        let packages: Option<Vec<Vec<u8>>> =
            claimed.key_packages.into_iter().map(|entry| entry.key_package).collect();
        let Some(packages) = packages.filter(|p| p.len() == members.len()) else {
            // Someone has not uploaded yet: ask again later.
            if let Some(state) = self.room_mut(room) {
                state.work.push_front(work);
                state.retry_at_ms = now_ms() + super::RETRY_PAUSE_MS;
            }
            return;
        };
        let epoch = match self.room(room).and_then(|r| r.log.as_ref()).map(RoomLog::state) {
            Some(client_core::state::ClientState::Synchronized { epoch }) => epoch,
            _ => {
                // The room moved under us (a commit of ours pending): invite later.
                if let Some(state) = self.room_mut(room) {
                    state.work.push_front(work);
                }
                return;
            }
        };
        // Someone may have joined meanwhile: add only who is still out.
        let current = self.members(room);
        let (members, packages): (Vec<u64>, Vec<Vec<u8>>) =
            members.iter().copied().zip(packages).filter(|(m, _)| !current.contains(m)).unzip();
        if !members.is_empty() {
            self.invite(room, epoch, work.label, members, &packages);
        }
    }

    /// The room's GroupInfo: our external commit joining it.
    pub(super) fn on_group_info(&mut self, request_id: u32, info: payload::GroupInfo) {
        let Some(Request::GroupInfo { room, label }) = self.in_flight.remove(&request_id) else {
            self.violation(format!("a GroupInfo answering request {request_id}"));
            return;
        };
        if self.room(room).is_none_or(|r| r.member() || r.joining.is_some()) {
            return;
        }
        let refused_on = self.room_mut(room).and_then(|r| r.join_refused_on.take());
        if refused_on == Some(digest(&info.group_info)) {
            self.violation(format!(
                "room {room}: an external join built on the room's current GroupInfo was refused InvalidCommit"
            ));
        }
        let joined = RoomGroup::join_by_external_commit(
            &self.provider,
            &self.identity,
            &info.group_info,
            Some(&info.ratchet_tree),
        );
        let (group, output) = match joined {
            Ok(joined) => joined,
            Err(error) => {
                self.violation(format!("room {room}: external commit: {error}"));
                return;
            }
        };
        let commit_digest = digest(&output.commit);
        {
            let mut ledger = self.shared.cast.ledger.borrow_mut();
            ledger.intent(&label, self.shared.index, room, "join by external commit".into());
            ledger.commit_made(&output.commit, &label);
        }
        let payload = ExternalJoin { commit: output.commit, group_info: Some(output.group_info) };
        self.shared.persisted.borrow_mut().joins.insert(room, PendingJoin { commit: commit_digest });
        if let Some(state) = self.room_mut(room) {
            state.joining = Some(group);
        }
        // The join's group and its record are persisted before the commit leaves.
        self.persist();
        let (id, frame) = self.frame(room, &payload, info.epoch);
        let group_info = digest(&info.group_info);
        self.in_flight.insert(id, Request::ExternalJoin { room, label, frame: frame.clone(), group_info });
        self.send_frame(&frame);
    }
}

/// Refusals that say "not now": the request is made again.
pub(super) fn transient(code: Option<ErrorCode>) -> bool {
    matches!(code, Some(ErrorCode::StorageUnavailable | ErrorCode::RateLimited | ErrorCode::ShuttingDown))
}
