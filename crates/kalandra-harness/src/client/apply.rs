//! Frames of a room's log, Welcomes and history markers: what the shell
//! feeds to client-core's [`RoomLog`] and what it records of them.

use client_core::room_log::{EntryBody, RoomLog, SentMessage};
use kalandra_proto::payload::{self, Application};
use kalandra_proto::{Frame, Opcode, RoomId, SenderId};

use super::{digest, Client, Leave, Request, Seen};
use crate::server::now_ms;

impl Client {
    /// A frame of a room's log from the server (history or live).
    pub(super) fn on_log_frame(&mut self, frame: &Frame) -> Result<(), String> {
        let room_id = frame.header().room_id();
        self.debug(|| {
            let header = frame.header();
            format!(
                "<- log {:?} room {room_id} idx {} from {} epoch {}",
                frame.opcode(),
                header.log_index(),
                header.sender_id(),
                header.epoch()
            )
        });
        let Some(room) = self.room(room_id) else {
            self.violation(format!("a log frame of unknown room {room_id}"));
            return Ok(());
        };
        if room.joining.is_some() && self.asking(room_id, |r| matches!(r, Request::JoinSearch { .. })) {
            self.search_frame(room_id, frame);
            return Ok(());
        }
        if !room.member() {
            // Frames a subscription still carried when we were removed.
            return Ok(());
        }
        if !room.subscribed {
            self.violation(format!("room {room_id}: a log frame without a subscription"));
            return Ok(());
        }
        let log_index = frame.header().log_index();
        let expected = room.log.as_ref().map_or(0, RoomLog::next_log_index);
        if log_index < expected {
            self.violation(format!(
                "room {room_id}: log index {log_index} delivered again (next is {expected})"
            ));
            return Ok(());
        }
        if log_index > expected {
            self.violation(format!("room {room_id}: log index {log_index} delivered, {expected} missing"));
            return Err("gap".into());
        }
        if frame.opcode() == Opcode::CreateRoom && log_index != 0 {
            self.violation(format!("room {room_id}: a CreateRoom at {log_index}"));
        }
        if let Some(room) = self.room_mut(room_id) {
            room.last_frame_ms = now_ms();
        }
        self.trace().rooms.entry(room_id).or_default().delivered.push((log_index, digest(&frame.to_bytes())));
        let sent = self.sent_messages(room_id);
        self.apply(room_id, frame, &sent)
    }

    /// The outbox entries of `room` sealed and not settled.
    fn sent_messages(&self, room: RoomId) -> Vec<SentMessage> {
        let persisted = self.shared.persisted.borrow();
        persisted
            .outbox
            .values()
            .filter(|e| e.room == room)
            .filter_map(|e| e.sealed.as_ref().map(|s| s.sent))
            .collect()
    }

    /// Our own frame, sequenced at the cursor (its acknowledgement said so).
    pub(super) fn apply_own(&mut self, room_id: RoomId, stamped: &Frame) -> Result<(), String> {
        let log_index = stamped.header().log_index();
        self.trace()
            .rooms
            .entry(room_id)
            .or_default()
            .delivered
            .push((log_index, digest(&stamped.to_bytes())));
        self.apply(room_id, stamped, &[])
    }

    /// Feeds one sequenced frame to the room's log and acts on what it says.
    fn apply(&mut self, room_id: RoomId, frame: &Frame, sent: &[SentMessage]) -> Result<(), String> {
        let log_index = frame.header().log_index();
        let sender = self.sender;
        let Some(room) = self.rooms.get_mut(&room_id) else { return Ok(()) };
        let Some(log) = room.log.as_mut() else { return Err("a log frame before joining".into()) };
        let had_pending = log.pending_commit().is_some();
        let applied = log.apply(&self.provider, sender, frame, sent.iter().copied());
        let settled = had_pending && log.pending_commit().is_none();
        let entry = match applied {
            Ok(entry) => entry,
            Err(error) => {
                self.violation(format!(
                    "room {room_id}: sequenced {:?} at {log_index} does not apply: {error}",
                    frame.opcode()
                ));
                return Ok(());
            }
        };
        self.keep_for_replay(room_id, frame);
        match frame.opcode() {
            Opcode::Commit | Opcode::ExternalJoin => {
                self.note_commit(room_id, frame);
                self.after_commit(room_id, settled);
            }
            Opcode::CommitVoided => self.after_void(room_id, frame),
            Opcode::Proposal if frame.header().sender_id() == sender => {
                if let Some(room) = self.room_mut(room_id) {
                    if matches!(room.leave, Some(Leave::Sent { .. } | Leave::Want)) {
                        room.leave = Some(Leave::Proposed { epoch: frame.header().epoch() });
                    }
                }
            }
            _ => {}
        }
        let Some(body) = entry.map(|entry| entry.body) else { return Ok(()) };
        let frame_sender = frame.header().sender_id();
        let seen = match body {
            EntryBody::Text(plaintext) => {
                self.note_opened(room_id, frame);
                self.trace().plaintexts += 1;
                Seen::Text(String::from_utf8_lossy(&plaintext).into_owned())
            }
            EntryBody::Own { outbox_id } => {
                let entry = self.shared.persisted.borrow_mut().outbox.remove(&outbox_id);
                let Some(entry) = entry else {
                    self.violation(format!("room {room_id}: outbox entry {outbox_id} settled twice"));
                    return Ok(());
                };
                Seen::Own(entry.text)
            }
            EntryBody::Redacted => Seen::Redacted,
            EntryBody::Unreadable(_) if self.opened_before(room_id, frame) => Seen::Replay,
            // The commit we are stuck on, and frames of its epoch.
            EntryBody::Unreadable(_) if self.stuck(room_id) => return Ok(()),
            // A hostile client's forgery, refused as it must be.
            EntryBody::Unreadable(_)
                if self.shared.cast.ledger.borrow().forged_payloads.contains(&digest(frame.payload())) =>
            {
                return Ok(())
            }
            // Sealed in an epoch a void undid, sequenced in a later epoch of that number.
            EntryBody::Unreadable(_) if self.dead_sealing(frame) => return Ok(()),
            EntryBody::Unreadable(why) => {
                self.violation(format!("room {room_id}: open message at {log_index}: {why}"));
                return Ok(());
            }
            EntryBody::Membership { .. } | EntryBody::CommitVoided { .. } => return Ok(()),
        };
        self.trace().rooms.entry(room_id).or_default().entries.push((log_index, frame_sender, seen));
        Ok(())
    }

    /// A commit was applied: ours settled, or we were removed, or a leave
    /// of ours was passed over.
    fn after_commit(&mut self, room_id: RoomId, settled: bool) {
        if settled {
            for request in self.in_flight.values_mut() {
                if let Request::Commit { room, settled, .. } = request {
                    if *room == room_id {
                        *settled = true;
                    }
                }
            }
        }
        let Some(room) = self.room_mut(room_id) else { return };
        if !room.member() {
            // Stuck past the window: the room is joined again, not left.
            if !room.log.as_ref().is_some_and(RoomLog::rejoin_needed) {
                self.removed(room_id);
            }
            return;
        }
        let epoch = room.log.as_ref().map_or(0, RoomLog::epoch);
        if let Some(Leave::Proposed { epoch: proposed }) = room.leave {
            if proposed < epoch {
                // Our proposal was not in the commit that ended its epoch.
                room.leave = Some(Leave::Want);
            }
        }
    }

    /// Whether the room is stuck on a commit it cannot process.
    fn stuck(&self, room_id: RoomId) -> bool {
        self.room(room_id).and_then(|room| room.log.as_ref()).and_then(RoomLog::stuck_on).is_some()
    }

    /// A commit applied (or the room got stuck on it): the latest one a
    /// hostile client may falsely report, when it processed it.
    fn note_commit(&mut self, room_id: RoomId, frame: &Frame) {
        if self.stuck(room_id) {
            self.last_commit.remove(&room_id);
        } else {
            let header = frame.header();
            self.last_commit.insert(room_id, (header.log_index(), header.epoch()));
        }
    }

    /// A `CommitVoided` applied: the dead entries go; a membership the
    /// voided commit gave us is gone (we rejoin if it was our external join).
    fn after_void(&mut self, room_id: RoomId, frame: &Frame) {
        match frame.decode_payload::<payload::CommitVoided>() {
            Ok(void) => self.commit_voided(room_id, void.log_index),
            Err(error) => {
                self.violation(format!("room {room_id}: a CommitVoided that does not decode: {error}"))
            }
        }
        let Some(room) = self.room_mut(room_id) else { return };
        room.voids_applied += 1;
        let epoch = room.log.as_ref().map_or(0, RoomLog::epoch);
        if let Some(Leave::Sent { epoch: ours } | Leave::Proposed { epoch: ours }) = room.leave {
            // A leave proposed in an epoch the void took back died with it; one
            // of the epoch the room is back in is still pending (proposing it
            // again would be refused as a duplicate).
            if ours > epoch {
                room.leave = Some(Leave::Want);
            }
        }
        if !room.member() && !room.log.as_ref().is_some_and(RoomLog::rejoin_needed) {
            self.removed(room_id);
        }
    }

    /// We are no longer a member of `room_id`: its group goes, its
    /// intents and unsent messages are given up.
    pub(super) fn removed(&mut self, room_id: RoomId) {
        let index = self.shared.index;
        let Some(room) = self.rooms.get_mut(&room_id) else { return };
        room.leave = None;
        room.work.clear();
        room.live = false;
        if let Some(log) = room.log.as_mut() {
            if let Err(error) = log.mark_removed(&self.provider) {
                self.shared.violation(format!("room {room_id}: {error}"));
            }
        }
        let mut persisted = self.shared.persisted.borrow_mut();
        persisted.commit_labels.remove(&room_id);
        let abandoned: Vec<u64> =
            persisted.outbox.iter().filter(|(_, e)| e.room == room_id).map(|(id, _)| *id).collect();
        let mut ledger = self.shared.cast.ledger.borrow_mut();
        for id in abandoned {
            if let Some(entry) = persisted.outbox.remove(&id) {
                if let Some(written) = ledger.messages.get_mut(&entry.text) {
                    written.abandoned = true;
                }
            }
        }
        let _ = index;
    }

    fn sealing_of(frame: &Frame) -> Option<(u64, u64, u32)> {
        let generation = frame.decode_payload::<Application>().ok()?.generation;
        Some((frame.header().sender_id().0, frame.header().epoch(), generation))
    }

    /// Remembers a sealing opened (and counts it if it came after a later one).
    fn note_opened(&mut self, room_id: RoomId, frame: &Frame) {
        let Some(sealing) = Self::sealing_of(frame) else { return };
        let late = {
            let mut persisted = self.shared.persisted.borrow_mut();
            let opened = persisted.opened.entry(room_id).or_default();
            let (sender, epoch, generation) = sealing;
            let late = opened.range((sender, epoch, generation)..=(sender, epoch, u32::MAX)).next().is_some();
            opened.insert(sealing);
            late
        };
        if late {
            self.trace().opened_late += 1;
        }
    }

    fn opened_before(&self, room_id: RoomId, frame: &Frame) -> bool {
        let Some(sealing) = Self::sealing_of(frame) else { return false };
        self.shared.persisted.borrow().opened.get(&room_id).is_some_and(|opened| opened.contains(&sealing))
    }

    /// A frame of a search of the log for our external join.
    fn search_frame(&mut self, room_id: RoomId, frame: &Frame) {
        let commit = matches!(frame.opcode(), Opcode::Commit | Opcode::ExternalJoin);
        if commit && frame.header().sender_id() != self.sender {
            // Another commit for the epoch our join was made for (or a
            // later one): our join can no longer be sequenced.
            if let Some(room) = self.room_mut(room_id) {
                let join_epoch = room.joining.as_ref().map(|g| g.epoch().saturating_sub(1));
                if join_epoch.is_some_and(|epoch| frame.header().epoch() >= epoch) {
                    room.join_passed_over = true;
                }
            }
            return;
        }
        if frame.opcode() != Opcode::ExternalJoin {
            return;
        }
        let Ok(join) = frame.decode_payload::<payload::ExternalJoin>() else { return };
        let ours = self.shared.persisted.borrow().joins.get(&room_id).map(|j| j.commit);
        if ours == Some(digest(&join.commit)) {
            if let Some(room) = self.room_mut(room_id) {
                room.join_found = Some(frame.header().log_index());
            }
        }
    }

    /// The end of a history read: a subscription is live, or a search for
    /// our external join ended.
    pub(super) fn on_sync_done(&mut self, request_id: u32, done: &payload::SyncDone) -> Result<(), String> {
        match self.in_flight.remove(&request_id) {
            Some(Request::Subscribe { room }) => self.caught_up(room, done.next_log_index),
            Some(Request::JoinSearch { room }) => {
                self.search_ended(room, done.next_log_index, done.log_head.is_some());
                Ok(())
            }
            other => {
                self.violation(format!("SyncDone answering {other:?}"));
                Ok(())
            }
        }
    }

    fn caught_up(&mut self, room_id: RoomId, next_log_index: u64) -> Result<(), String> {
        let Some(room) = self.room_mut(room_id) else { return Ok(()) };
        let Some(log) = room.log.as_ref().filter(|log| log.is_member()) else { return Ok(()) };
        if let Err(error) = log.history_ended(next_log_index) {
            self.violation(format!("room {room_id}: {error}"));
            return Err("history gap".into());
        }
        let next = log.next_log_index();
        if next_log_index != next {
            self.violation(format!("room {room_id}: history ended at {next_log_index} but {next} is next"));
            return Err("history gap".into());
        }
        room.live = true;
        if matches!(room.leave, Some(Leave::Sent { .. })) {
            // Read to the head without finding our leave proposal: it was not sequenced.
            room.leave = Some(Leave::Want);
        }
        Ok(())
    }

    /// A search for our external join ended at `next_log_index` (at the
    /// room's durable head if `at_head`): joined where it was found, else
    /// asked again later from where it ended, or given up.
    fn search_ended(&mut self, room_id: RoomId, next_log_index: u64, at_head: bool) {
        let Some(room) = self.room_mut(room_id) else { return };
        if at_head && room.join_found.is_none() {
            room.join_searches_at_head += 1;
        }
        let quiet_too_long = room.join_searches_at_head >= super::JOIN_SEARCHES_AT_HEAD_MAX;
        match room.join_found.take() {
            Some(log_index) => {
                room.join_search_from = 0;
                room.join_passed_over = false;
                room.join_searches_at_head = 0;
                let epoch = room.joining.as_ref().map_or(0, client_core::mls::RoomGroup::epoch);
                self.joined_by_commit(room_id, log_index, epoch);
            }
            // The log moved past the epoch our join was made for without
            // it (we may have been added meanwhile), or a quiet room's head
            // has not held it for long: it is given up.
            None if room.join_passed_over || quiet_too_long => {
                room.join_passed_over = false;
                room.join_search_from = 0;
                room.join_searches_at_head = 0;
                self.drop_join(room_id);
            }
            // A member whose join is not durable yet, or a former member
            // that read up to its removal (the server lets it read no
            // further; from there it is refused as not a member).
            None => {
                room.join_search_from = room.join_search_from.max(next_log_index);
                room.retry_at_ms = now_ms() + super::RETRY_PAUSE_MS;
            }
        }
    }

    /// Our external commit is in the log at `log_index`: the room is ours.
    pub(super) fn joined_by_commit(&mut self, room_id: RoomId, log_index: u64, epoch: u64) {
        let Some(room) = self.rooms.get_mut(&room_id) else { return };
        let Some(group) = room.joining.take() else { return };
        self.shared.persisted.borrow_mut().joins.remove(&room_id);
        match RoomLog::joined_by_external_commit(&self.provider, room_id, group, log_index, epoch, None) {
            Ok(log) => self.member_again(room_id, log),
            Err(error) => self.violation(format!("room {room_id}: joining by external commit: {error}")),
        }
    }

    /// A Welcome: kept (the latest of each room) until we join with it.
    pub(super) fn on_welcome(&mut self, frame: &Frame) {
        let room_id = frame.header().room_id();
        let Some(room) = self.room(room_id) else {
            self.violation(format!("a Welcome for unknown room {room_id}"));
            return;
        };
        let index = frame.header().log_index();
        if room.log.as_ref().is_some_and(|log| index < log.next_log_index()) {
            // Its commit is behind us: we joined with it, or were removed after it.
            return;
        }
        let mut persisted = self.shared.persisted.borrow_mut();
        let newer = persisted.welcomes.get(&room_id).is_none_or(|kept| {
            Frame::decode(&bytes::Bytes::copy_from_slice(kept))
                .is_ok_and(|kept| kept.header().log_index() < index)
        });
        if newer {
            persisted.welcomes.insert(room_id, frame.to_bytes().to_vec());
        }
    }

    /// Joins a room with its kept Welcome, if it is not behind us.
    pub(super) fn join_from_welcome(&mut self, room_id: RoomId) {
        let Some(bytes) = self.shared.persisted.borrow_mut().welcomes.remove(&room_id) else { return };
        let Ok(frame) = Frame::decode(&bytes::Bytes::from(bytes)) else { return };
        let cursor = self.room(room_id).and_then(|r| r.log.as_ref()).map_or(0, RoomLog::next_log_index);
        if frame.header().log_index() < cursor {
            return;
        }
        match RoomLog::join_from_welcome(&self.provider, room_id, &frame) {
            Ok(log) => self.member_again(room_id, log),
            Err(error) => self.violation(format!("room {room_id}: join from Welcome: {error}")),
        }
    }

    /// A new membership of `room_id` begins with `log`.
    fn member_again(&mut self, room_id: RoomId, log: RoomLog) {
        let Some(room) = self.rooms.get_mut(&room_id) else { return };
        let resubscribing = room.subscribed;
        room.log = Some(log);
        room.leave = None;
        room.live = false;
        {
            let mut record = self.shared.record.borrow_mut();
            let trace = record.rooms.entry(room_id).or_default();
            let start = trace.delivered.len();
            trace.stints.push(start);
        }
        self.persist();
        if resubscribing {
            // A subscription of this connection may still carry frames of
            // the room from before: start over on a fresh connection.
            self.reconnect = Some(format!("room {room_id}: joined again while subscribed"));
        } else {
            self.subscribe(room_id);
        }
    }

    /// Subscribes to a room from its cursor.
    pub(super) fn subscribe(&mut self, room_id: RoomId) {
        let Some(room) = self.rooms.get_mut(&room_id) else { return };
        let from_log_index = room.log.as_ref().map_or(0, RoomLog::next_log_index);
        room.subscribed = true;
        room.live = false;
        room.last_frame_ms = now_ms();
        let request = Request::Subscribe { room: room_id };
        self.request(room_id, &payload::Subscribe { from_log_index }, 0, request);
    }

    /// The sender id of a group member, by leaf.
    pub(super) fn leaf_of(&self, room_id: RoomId, member: SenderId) -> Option<u32> {
        let group = self.room(room_id)?.log.as_ref()?.group()?;
        group.members().into_iter().find_map(|m| {
            let key: [u8; 32] = m.identity.as_slice().try_into().ok()?;
            (SenderId::from_identity_key(&key) == member).then_some(m.leaf_index)
        })
    }

    /// Members of a room as our group has them, by sender id.
    pub(super) fn members(&self, room_id: RoomId) -> Vec<u64> {
        let Some(group) = self
            .room(room_id)
            .and_then(|r| r.log.as_ref())
            .filter(|l| l.is_member())
            .and_then(RoomLog::group)
        else {
            return Vec::new();
        };
        group
            .members()
            .into_iter()
            .filter_map(|m| {
                let key: [u8; 32] = m.identity.as_slice().try_into().ok()?;
                Some(SenderId::from_identity_key(&key).0)
            })
            .collect()
    }
}
