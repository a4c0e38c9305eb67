//! Reports of commits members cannot process, and their voids, in the room
//! core (`docs/RECOVERY.md`). The rule is the sequencer's
//! ([`RoomSequencer::report_commit`](crate::sequencer::RoomSequencer::report_commit));
//! here a decided void becomes a server-signed `CommitVoided` sequenced like
//! any frame, and the Remove proposals the server issued in the voided epoch
//! are issued again in the epoch the room returns to.

use kalandra_proto::payload::{self, CommitReport};
use kalandra_proto::{ErrorCode, Frame, FrameHeaderBuf, Opcode, RoomId, SenderId};

use super::frames::reply_frame;
use super::shard::{Peer, Shard};
use crate::room::sequencer::{PersistentGroup, ReportError, ReportOutcome, VoidDecision, SERVER_SENDER_ID};

impl<G: PersistentGroup, P: Peer> Shard<G, P> {
    /// A member reports that it cannot process the commit `report` names:
    /// counted (answered with an `Ack` naming the commit), refused with a
    /// typed `Error`, or, when the rule is met, the commit is voided.
    pub fn handle_commit_report(
        &mut self,
        peer: &P,
        room_id: RoomId,
        request_id: u32,
        report: &CommitReport,
        now_ms: u64,
    ) {
        let Some(room) = self.rooms.get_mut(&room_id) else {
            self.refuse(peer, room_id, request_id, ErrorCode::UnknownRoom, "no such room");
            return;
        };
        match room.sequencer.report_commit(peer.sender(), report, now_ms) {
            Err(error) => {
                let (code, message) = (error.error_code(), error.to_string());
                self.refuse(peer, room_id, request_id, code, &message);
                return;
            }
            Ok(ReportOutcome::Void(decision)) => {
                if let Err(error) = self.void_commit(room_id, &decision, now_ms) {
                    // Counted: the void is sequenced by the next report or tick.
                    tracing::warn!(%room_id, log_index = decision.log_index, %error, "void deferred");
                }
            }
            Ok(ReportOutcome::Counted { reports, electorate }) => {
                tracing::info!(%room_id, log_index = report.log_index, reports, electorate, "commit reported");
            }
            Ok(ReportOutcome::Duplicate | ReportOutcome::AlreadyVoided) => {}
        }
        let epoch = self.rooms.get(&room_id).map_or(0, |room| room.sequencer.epoch());
        let ack = payload::Ack {
            log_index: report.log_index,
            epoch,
            server_time_ms: now_ms,
            log_head: None,
            signed_head: None,
        };
        Self::reply(peer, reply_frame(room_id, request_id, &ack));
    }

    /// Sequences the `CommitVoided` of `decision` and issues again the
    /// Remove proposals the server issued in the voided epoch.
    fn void_commit(
        &mut self,
        room_id: RoomId,
        decision: &VoidDecision,
        now_ms: u64,
    ) -> Result<(), ReportError> {
        #[cfg(feature = "injected-bugs")]
        if crate::bugs::planted().never_void_commit {
            return Ok(());
        }
        let room = self.rooms.get_mut(&room_id).ok_or(ReportError::Recovering)?;
        // Kicks and bans issued after the voided commit: their proposals die
        // with its epoch, their removals must not.
        let issued_after = room.sequencer.group().pending_server_removals().unwrap_or_default();
        let mut header = FrameHeaderBuf::new(Opcode::CommitVoided);
        header.set_room_id(room_id).set_sender_id(SERVER_SENDER_ID).set_epoch(decision.epoch);
        let mut frame = Frame::with_payload(header, &decision.payload())
            .map_err(|error| ReportError::Internal(error.to_string()))?;
        frame.sign(self.config.server_signer.signing_key());
        let sequenced = room.sequencer.sequence_void(frame, now_ms)?;
        tracing::warn!(%room_id, log_index = decision.log_index, void_index = sequenced.log_index,
            reporters = decision.reporters.len(), "commit voided");
        self.sequenced(room_id, None, sequenced);
        self.reissue_removals(room_id, &issued_after, now_ms);
        Ok(())
    }

    /// Issues a Remove proposal again for each of `targets` that is a member
    /// of the epoch the room returned to and has none pending there.
    pub(super) fn reissue_removals(&mut self, room_id: RoomId, targets: &[SenderId], now_ms: u64) {
        for target in targets {
            let Some(room) = self.rooms.get(&room_id) else { return };
            let pending = room.sequencer.group().pending_server_removals().unwrap_or_default();
            if !room.sequencer.is_member(*target) || pending.contains(target) {
                continue;
            }
            if let Err(error) = self.propose_removal(room_id, *target, now_ms) {
                tracing::error!(%room_id, %target, %error, "a removal voided with its epoch was not issued again");
            }
        }
    }

    /// Periodic work of unsettled commits: a commit whose window ended
    /// settles (and a snapshot it deferred is taken); a quorum whose void
    /// could not be sequenced earlier is sequenced now. Returns whether the
    /// room still has an unsettled commit.
    pub(super) fn tick_unsettled_commit(&mut self, room_id: RoomId, now_ms: u64) -> bool {
        let Some(room) = self.rooms.get_mut(&room_id) else { return false };
        if let Some(decision) = room.sequencer.void_due(now_ms) {
            if let Err(error) = self.void_commit(room_id, &decision, now_ms) {
                tracing::warn!(%room_id, log_index = decision.log_index, %error, "void deferred");
            }
        }
        let Some(room) = self.rooms.get_mut(&room_id) else { return false };
        room.sequencer.settle_commit_if_due(now_ms);
        if room.sequencer.commit_unsettled() {
            return true;
        }
        // Settled now, or by a report since the last tick: a snapshot
        // deferred meanwhile may be taken.
        self.maybe_snapshot(room_id);
        false
    }
}
