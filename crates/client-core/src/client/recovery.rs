//! The device's part of recovering from a commit members cannot process
//! (`docs/RECOVERY.md`); the decisions are [`RoomLog`]'s.
//!
//! - A room stuck on a commit reports it (`CommitReport`) once per
//!   connection, and again once the report window has passed on this
//!   device's clock: the server then answers `CommitSettled` unless it
//!   voided the commit meanwhile, and the room rejoins by external commit.
//! - A `CommitVoided` makes every history entry from the voided commit up
//!   to it unreadable (those frames are dead), and our own messages among
//!   them go back into the outbox, sealed again in the epoch the room
//!   returned to; so do messages waiting in the outbox sealed in the
//!   voided epoch.

use std::time::Duration;

use kalandra_proto::limits::COMMIT_VOID_WINDOW_MS;
use kalandra_proto::payload;
use kalandra_proto::{Opcode, RoomId};

use super::{decode, encode, Client, ClientError, Message, MessageBody, OUTBOX_ENTRIES_MAX};
use crate::room_log::RoomLog;
use crate::store::MESSAGES_PER_READ_MAX;

/// How long after the server acknowledged a report a stuck room reports
/// again (the window plus a margin for the two clocks' start).
pub const COMMIT_REPORT_AGAIN_AFTER_MS: u64 = COMMIT_VOID_WINDOW_MS + 500;

const _: () = assert!(COMMIT_REPORT_AGAIN_AFTER_MS > COMMIT_VOID_WINDOW_MS);

impl Client {
    /// Sends the report a stuck room owes, and joins again a room that must.
    pub(super) async fn drive_recovery(&mut self, room_id: RoomId) -> Result<(), ClientError> {
        let report = self.rooms.get_mut(&room_id).and_then(RoomLog::take_report);
        if let Some(report) = report {
            let frame = self.frame(room_id, report.epoch, &report)?;
            let reply = self.request(&frame).await?;
            if reply.opcode() == Opcode::Error {
                let error = reply
                    .decode_payload::<payload::Error>()
                    .map_err(|e| ClientError::Protocol(format!("Error payload: {e}")))?;
                self.mls_clean = false;
                if let Some(room) = self.rooms.get_mut(&room_id) {
                    room.report_refused(&self.provider, &error)?;
                }
                self.recovery_reports.remove(&room_id);
                self.checkpoint()?;
            } else {
                let again = tokio::time::Instant::now() + Duration::from_millis(COMMIT_REPORT_AGAIN_AFTER_MS);
                self.recovery_reports.insert(room_id, again);
            }
        }
        if self.rooms.get(&room_id).is_some_and(RoomLog::rejoin_needed) {
            self.recovery_reports.remove(&room_id);
            self.join_external(room_id).await?;
        }
        Ok(())
    }

    /// When [`Client::next_message`] must wake at the latest: `deadline`, or
    /// earlier for a stuck room whose report is to be sent again.
    pub(super) fn recovery_wake(&self, deadline: tokio::time::Instant) -> tokio::time::Instant {
        self.recovery_reports.values().copied().fold(deadline, std::cmp::Ord::min)
    }

    /// Reports again for the stuck rooms whose window has passed; whether
    /// there was any.
    pub(super) async fn report_overdue(&mut self) -> Result<bool, ClientError> {
        let now = tokio::time::Instant::now();
        let due: Vec<RoomId> =
            self.recovery_reports.iter().filter(|(_, at)| **at <= now).map(|(room, _)| *room).collect();
        for room_id in &due {
            self.recovery_reports.remove(room_id);
            let still_stuck = match self.rooms.get_mut(room_id) {
                Some(room) => room.report_again(),
                None => false,
            };
            if still_stuck {
                self.drive_recovery(*room_id).await?;
            }
        }
        Ok(!due.is_empty())
    }

    /// The server voided the commit at `voided` with the `CommitVoided` at
    /// `void_index`, and the room is back at `epoch`: the history between
    /// them is dead, and our messages in it are sealed again into the
    /// outbox, as are those waiting there sealed in the voided epoch (the
    /// next epoch of that number has other keys, so they would be
    /// sequenced and nobody could open them). Staged with the void's
    /// checkpoint.
    pub(super) fn commit_voided(
        &mut self,
        room_id: RoomId,
        voided: u64,
        void_index: u64,
        epoch: u64,
    ) -> Result<(), ClientError> {
        let mut from = voided;
        let mut resend = Vec::new();
        while from < void_index {
            let page = self.store.messages(room_id, from, MESSAGES_PER_READ_MAX)?;
            let Some(&(last, _)) = page.last() else { break };
            for (log_index, bytes) in page.into_iter().take_while(|(index, _)| *index < void_index) {
                let mut message: Message = decode(&bytes, "message")?;
                if message.sender == self.sender_id().0 && log_index > voided {
                    if let MessageBody::Text(text) = &message.body {
                        resend.push(text.clone());
                    }
                }
                message.body = MessageBody::Unreadable(format!(
                    "voided: the server voided the commit at log index {voided} and this with it"
                ));
                self.pending_batch.message(room_id, log_index, encode(&message));
            }
            from = last + 1;
        }
        if self.rooms.get(&room_id).is_none_or(|room| !room.is_member()) {
            return Ok(());
        }
        let dead_sealings: Vec<u64> = self
            .outbox
            .values()
            .filter(|entry| entry.room_id == room_id.0 && entry.epoch > epoch)
            .map(|entry| entry.id)
            .collect();
        for id in dead_sealings {
            let Some(entry) = self.outbox.remove(&id) else { continue };
            let resealed = self.seal_entry(room_id, id, entry.plaintext, entry.push, entry.attempts)?;
            self.outbox.insert(id, resealed);
        }
        for text in resend {
            if self.outbox.len() >= OUTBOX_ENTRIES_MAX {
                break;
            }
            let id = self.outbox.last_key_value().map_or(1, |(id, _)| id + 1);
            let entry = self.seal_entry(room_id, id, text, None, 0)?;
            self.outbox.insert(id, entry);
        }
        Ok(())
    }
}
