//! A bounded catch-up for hosts that get a short time slice in the
//! background (an Android foreground service or `WorkManager` job, an iOS
//! background task): the control plane of every room first, then the
//! messages of every room, then the outbox, stopping when the budget is
//! spent and saying what is left.
//!
//! # Control plane first, across rooms
//!
//! The first pass brings every room to its current epoch and settles what
//! waits on a commit: it reads the room's log in short batches
//! ([`CONTROL_FRAMES_PER_REQUEST`]) and applies each batch up to its last
//! handshake frame (commit, proposal, external join); the messages after
//! that frame are left to the second pass. Messages *before* a commit are
//! applied in this pass, in order: a message can only be opened with its
//! epoch's keys, which the commit replaces. The pass stops reading a room
//! at the first batch with no handshake frame, so it costs at most one
//! batch of messages read twice per room. When it reached the end of the
//! log, it also resends our pending commit, redoes an intent whose commit
//! lost and covers proposals that wait (a moderator's removal blocks the
//! room's messages until someone commits it); otherwise the second pass
//! does that once the log is read to its end. So when the budget runs out
//! after the first pass, every room is at its newest epoch the pass could
//! reach, and the key cache a Notification Service Extension reads has its
//! keys.
//!
//! The second pass catches every room up in full (its messages). Rooms
//! that wait on a commit of ours come first in both passes. The budget is
//! asked before each room of each pass and before the outbox; a room's
//! step that has started finishes (each request is bounded by the request
//! timeout), so a call can overrun its budget by one step.
//!
//! A room that fails is reported in [`BackgroundReport::rooms_failed`] and
//! skipped; the others go on. Only the whole device's failures (the
//! connection, the store) end the call with an error.

use std::time::{Duration, Instant};

use kalandra_proto::payload::{Sync, SyncDone};
use kalandra_proto::{Frame, Opcode, RoomId};

use super::{expect, refused_membership, room_failure, Client, ClientError, RoomFailure};

/// Frames asked for per `Sync` request in the control-plane pass (the
/// messages after a batch's last handshake frame are read again later).
pub const CONTROL_FRAMES_PER_REQUEST: u32 = 64;
/// `Sync` rounds of one room's control-plane pass at most.
pub const CONTROL_ROUNDS_MAX: usize = 64;

const _: () = assert!(CONTROL_FRAMES_PER_REQUEST <= super::SYNC_FRAMES_PER_REQUEST);
const _: () = assert!(CONTROL_ROUNDS_MAX <= super::CATCH_UP_ROUNDS_MAX);

/// A step of [`Client::background_sync_with`] that its budget is asked about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackgroundStep {
    /// Bring the room to its current epoch and settle what waits on a commit.
    ControlPlane(RoomId),
    /// Read the room's messages to the end of its log.
    Messages(RoomId),
    /// Send the outbox.
    Outbox,
}

/// What a [`Client::background_sync`] call did and left.
#[derive(Debug, Default)]
pub struct BackgroundReport {
    /// Rooms whose control plane was brought up to date, in order.
    pub rooms_settled: Vec<RoomId>,
    /// Rooms caught up with the server (or found left), in order.
    pub rooms_synced: Vec<RoomId>,
    /// Rooms the budget left (not all their messages read) for the next call.
    pub rooms_left: Vec<RoomId>,
    /// Rooms that failed; the others went on.
    pub rooms_failed: Vec<RoomFailure>,
    /// Outbox messages sent.
    pub outbox_sent: usize,
    /// Messages still in the outbox.
    pub outbox_left: usize,
    /// Whether the budget ran out before everything was done.
    pub budget_exhausted: bool,
}

impl BackgroundReport {
    /// Whether nothing is left for a later call (failed rooms aside).
    pub fn is_complete(&self) -> bool {
        self.rooms_left.is_empty() && self.outbox_left == 0
    }

    fn failed(&self, room_id: RoomId) -> bool {
        self.rooms_failed.iter().any(|failure| failure.room_id == room_id)
    }
}

impl Client {
    /// Catches up within `budget` (see the module documentation): connects
    /// if needed (without reading any room), brings every room's control
    /// plane up to date, then reads every room's messages, then sends the
    /// outbox. Returns what was done and what is left; call again (with a
    /// new budget) for the rest. The key cache file follows every epoch
    /// change as usual.
    pub async fn background_sync(&mut self, budget: Duration) -> Result<BackgroundReport, ClientError> {
        let started = Instant::now();
        self.background_sync_with(|_| started.elapsed() < budget).await
    }

    /// [`Client::background_sync`] with the budget as a function, asked
    /// before each step: `false` ends the call there (and it is not asked
    /// again). For hosts whose budget is not only time.
    pub async fn background_sync_with(
        &mut self,
        mut budget: impl FnMut(BackgroundStep) -> bool,
    ) -> Result<BackgroundReport, ClientError> {
        if self.connection.is_none() {
            self.open_connection().await?;
        }
        let rooms = self.rooms_in_background_order();
        let mut report = BackgroundReport::default();
        let mut spent = false;
        for &room_id in &rooms {
            spent = spent || !budget(BackgroundStep::ControlPlane(room_id));
            if spent {
                break;
            }
            match self.settle_control_plane(room_id).await {
                Ok(()) => report.rooms_settled.push(room_id),
                Err(error) => report.rooms_failed.push(room_failure(room_id, error)?),
            }
        }
        for &room_id in &rooms {
            if report.failed(room_id) {
                continue;
            }
            spent = spent || !budget(BackgroundStep::Messages(room_id));
            if spent {
                report.rooms_left.push(room_id);
                continue;
            }
            match self.resume_room(room_id).await {
                Ok(()) => report.rooms_synced.push(room_id),
                Err(error) => report.rooms_failed.push(room_failure(room_id, error)?),
            }
        }
        if !spent && budget(BackgroundStep::Outbox) {
            report.outbox_sent = self.flush_outbox_into(&mut report.rooms_failed).await?;
        }
        self.take_deferred_failures(&mut report.rooms_failed);
        report.outbox_left = self.outbox.len();
        report.budget_exhausted = !report.is_complete();
        Ok(report)
    }

    /// The rooms still ours, those waiting on a commit first (our pending
    /// commit, an intent to redo, a proposal to cover, a creation to
    /// confirm), then in room order.
    fn rooms_in_background_order(&self) -> Vec<RoomId> {
        let mut rooms: Vec<(bool, RoomId)> = self
            .rooms
            .iter()
            .filter(|(_, entry)| !entry.record.removed)
            .map(|(room_id, entry)| {
                let record = &entry.record;
                let control = record.pending.is_some()
                    || record.redo.is_some()
                    || entry.proposals_to_cover()
                    || !record.confirmed;
                (!control, *room_id)
            })
            .collect();
        // Control-plane work first (false sorts before true), then room order.
        rooms.sort();
        rooms.into_iter().map(|(_, room_id)| room_id).collect()
    }

    /// The first pass for one room: confirm its creation, or apply its log
    /// up to the last handshake frame found, and when that reached the end
    /// of the log settle what waits on a commit of ours.
    async fn settle_control_plane(&mut self, room_id: RoomId) -> Result<(), ClientError> {
        let Some(entry) = self.rooms.get(&room_id) else { return Ok(()) };
        if entry.record.removed {
            return Ok(());
        }
        if !entry.record.confirmed {
            return self.confirm_creation(room_id).await;
        }
        let at_end = match self.sync_control_plane(room_id).await {
            Err(ClientError::NotMember(_)) => return Ok(()),
            other => other?,
        };
        if at_end {
            self.settle_room(room_id).await
        } else {
            self.settle_own_removal(room_id).map(|_| ())
        }
    }

    /// Reads the room's log in batches of [`CONTROL_FRAMES_PER_REQUEST`],
    /// applying each up to its last handshake frame, until a batch has none
    /// or the log ends. Returns whether every frame of the log was applied.
    async fn sync_control_plane(&mut self, room_id: RoomId) -> Result<bool, ClientError> {
        for _ in 0..CONTROL_ROUNDS_MAX {
            let from =
                self.rooms.get(&room_id).ok_or(ClientError::UnknownRoom(room_id))?.record.next_log_index;
            let epoch = self.epoch_of(room_id);
            let sync = Sync { from_log_index: from, count_max: CONTROL_FRAMES_PER_REQUEST };
            let frame = self.frame(room_id, epoch, &sync)?;
            let reply = self.request(&frame).await?;
            if refused_membership(&reply) {
                self.mark_removed(room_id)?;
                return Err(ClientError::NotMember(room_id));
            }
            let done: SyncDone = expect(&reply)?;
            if let Some(room) = self.rooms.get_mut(&room_id) {
                // Beyond the cursor until the frames below are applied: checked then.
                room.sync_done(&done)?;
            }
            let frames = self.connection()?.take_buffered();
            let last_handshake = frames
                .iter()
                .filter(|f| f.header().room_id() == room_id && is_handshake(f))
                .map(|f| f.header().log_index())
                .max();
            // This room's frames after its last handshake frame wait for the
            // second pass (all of them when the batch has none).
            let (now, later): (Vec<Frame>, Vec<Frame>) = frames.into_iter().partition(|f| {
                f.header().room_id() != room_id
                    || !crate::room_log::is_log_frame(f)
                    || last_handshake.is_some_and(|last| f.header().log_index() <= last)
            });
            let handled = self.handle_frames(now, Some(room_id));
            self.checkpoint()?;
            handled?;
            let read_all = done.next_log_index.saturating_sub(from) < u64::from(CONTROL_FRAMES_PER_REQUEST);
            if !later.is_empty() || last_handshake.is_none() {
                return Ok(later.is_empty() && read_all);
            }
            if read_all {
                let room = self.rooms.get(&room_id).ok_or(ClientError::UnknownRoom(room_id))?;
                room.history_ended(done.next_log_index)?;
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// A frame that changes the room's group: a commit, a proposal, an external
/// join or the room's creation.
fn is_handshake(frame: &Frame) -> bool {
    matches!(frame.opcode(), Opcode::Commit | Opcode::Proposal | Opcode::ExternalJoin | Opcode::CreateRoom)
}
