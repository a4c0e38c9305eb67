//! The shell's part of recovering from a commit members cannot process
//! (`docs/RECOVERY.md`), as client-core's `Client` does it; the decisions
//! are [`RoomLog`]'s.
//!
//! - A room stuck on a commit reports it once per connection, and again
//!   once `COMMIT_REPORT_AGAIN_AFTER_MS` passed after the server
//!   acknowledged the report; a refusal that says the commit settled makes
//!   the room rejoin by external commit (driven like any external join).
//! - A `CommitVoided` makes every entry from the voided commit up to it
//!   dead: what the client read there is dropped from its observations, and
//!   its own messages among them go back into the outbox, sealed again in
//!   the epoch the room returned to.

use client_core::client::COMMIT_REPORT_AGAIN_AFTER_MS;
use client_core::room_log::RoomLog;
use kalandra_proto::payload::{self, CommitReport};
use kalandra_proto::ErrorCode;

use super::answers::transient;
use super::*;

impl Client {
    /// A room stuck on a commit: the report it owes, or owes again.
    pub(super) fn drive_stuck(&mut self, room_id: RoomId, now: u64) {
        if self.asking(room_id, |r| matches!(r, Request::Report { .. })) {
            return;
        }
        let Some(room) = self.rooms.get_mut(&room_id) else { return };
        let Some(log) = room.log.as_mut() else { return };
        if room.report_again_at_ms.is_some_and(|at| now >= at) {
            room.report_again_at_ms = None;
            log.report_again();
        }
        let Some(report) = log.take_report() else { return };
        let request = Request::Report { room: room_id, report: report.clone() };
        self.request(room_id, &report, report.epoch, request);
    }

    /// The server counted our report. The room's admin meets the rule
    /// alone, so an acknowledgement to the admin that does not say the room
    /// is back at the commit's epoch is noted for the checker (the void
    /// must then follow in the log).
    pub(super) fn report_acked(&mut self, room_id: RoomId, report: &CommitReport, ack: &payload::Ack) {
        let admin = self.room(room_id).is_some_and(|room| room.plan.creator == self.shared.index);
        if admin && ack.epoch != report.epoch {
            self.shared.cast.ledger.borrow_mut().admin_reports_unvoided.insert((room_id, report.log_index));
        }
        if let Some(room) = self.room_mut(room_id) {
            room.report_again_at_ms = Some(now_ms() + COMMIT_REPORT_AGAIN_AFTER_MS);
        }
    }

    /// The server refused our report; returns whether the refusal breaks a rule.
    pub(super) fn report_refused(&mut self, room_id: RoomId, error: &payload::Error) -> bool {
        let code = ErrorCode::from_u16(error.code);
        if let Some(log) = self.rooms.get_mut(&room_id).and_then(|room| room.log.as_mut()) {
            if let Err(refusal) = log.report_refused(&self.provider, error) {
                self.violation(format!("room {room_id}: a refused report: {refusal}"));
            }
        }
        let expected = matches!(
            code,
            Some(
                ErrorCode::CommitSettled
                    | ErrorCode::NoSuchCommit
                    | ErrorCode::NotMember
                    | ErrorCode::Banned
                    | ErrorCode::Forbidden
            )
        );
        !expected && !transient(code)
    }

    /// The server voided the commit at `voided_log_index`: every entry
    /// from it on is dead (the void is the entry being applied).
    pub(super) fn commit_voided(&mut self, room_id: RoomId, voided_log_index: u64) {
        // What the void made dead is no longer a replay of history.
        self.replayable
            .retain(|(room, frame)| *room != room_id || frame.header().log_index() < voided_log_index);
        self.last_commit.remove(&room_id);
        let own_dead: Vec<String> = {
            let mut record = self.trace();
            let Some(trace) = record.rooms.get_mut(&room_id) else { return };
            let (dead, live): (Vec<_>, Vec<_>) = std::mem::take(&mut trace.entries)
                .into_iter()
                .partition(|(index, _, _)| *index >= voided_log_index);
            trace.entries = live;
            dead.into_iter()
                .filter_map(|(_, _, seen)| match seen {
                    Seen::Own(text) => Some(text),
                    _ => None,
                })
                .collect()
        };
        let epoch = self.room(room_id).and_then(|room| room.log.as_ref()).map_or(0, RoomLog::epoch);
        self.note_dead_sealings(room_id, epoch);
        let mut persisted = self.shared.persisted.borrow_mut();
        for entry in persisted.outbox.values_mut().filter(|entry| entry.room == room_id) {
            // A refusal in the dead epoch said to wait for it: it is gone.
            entry.wait_for_epoch = entry.wait_for_epoch.min(epoch);
            // A sealing of the dead epoch is sealed again: the next epoch of
            // that number will have other keys.
            if entry.sealed.as_ref().is_some_and(|sealed| sealed.sent.epoch > epoch) {
                entry.sealed = None;
            }
        }
        for text in own_dead {
            let Some(id) = message_number(&text) else { continue };
            let entry = OutboxEntry { room: room_id, text, sealed: None, wait_for_epoch: 0 };
            persisted.outbox.insert(id, entry);
        }
    }
}

impl Client {
    /// Messages of the room sealed in an epoch after `epoch` (the voided
    /// one), in flight or kept to resend: noted as dead sealings.
    fn note_dead_sealings(&mut self, room_id: RoomId, epoch: u64) {
        let mut dead: Vec<[u8; 32]> = self
            .in_flight
            .values()
            .filter_map(|request| match request {
                Request::Message { room, frame, .. }
                    if *room == room_id && frame.header().epoch() > epoch =>
                {
                    Some(digest(frame.payload()))
                }
                _ => None,
            })
            .collect();
        let persisted = self.shared.persisted.borrow();
        for entry in persisted.outbox.values().filter(|entry| entry.room == room_id) {
            let Some(sealed) = entry.sealed.as_ref().filter(|sealed| sealed.sent.epoch > epoch) else {
                continue;
            };
            if let Ok(frame) = Frame::decode(&Bytes::copy_from_slice(&sealed.frame)) {
                dead.push(digest(frame.payload()));
            }
        }
        self.shared.cast.ledger.borrow_mut().dead_sealings.extend(dead);
    }

    /// Whether `frame` is a message sealed in an epoch a void undid.
    pub(super) fn dead_sealing(&self, frame: &Frame) -> bool {
        self.shared.cast.ledger.borrow().dead_sealings.contains(&digest(frame.payload()))
    }
}

/// The outbox id of message `c{client}-m{n}` (its number `n`).
fn message_number(text: &str) -> Option<u64> {
    text.rsplit_once("-m")?.1.parse().ok()
}
