//! A bounded catch-up for hosts that get a short time slice in the
//! background (an Android foreground service or `WorkManager` job, an iOS
//! background task): the control plane first, then the data plane, stopping
//! when the time budget is spent and saying what is left.
//!
//! Within one room the log is applied in order, commits and messages alike
//! (a message can only be opened with its epoch's keys, so commits cannot
//! jump ahead of the messages before them). Across rooms the call orders the
//! work: first the rooms that wait on a commit (our pending commit to
//! settle, an intent to redo after another commit won, a proposal such as a
//! moderator's removal to cover, a creation to confirm), then every other
//! room, and only then the outbox. The budget is checked between rooms; a
//! room's catch-up that has started finishes (each request is bounded by
//! the request timeout), so the call can overrun its budget by one room.

use std::time::{Duration, Instant};

use kalandra_proto::RoomId;

use super::{Client, ClientError};

/// What a [`Client::background_sync`] call did and left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackgroundReport {
    /// Rooms caught up with the server, in the order they were handled.
    pub rooms_synced: Vec<RoomId>,
    /// Rooms the budget left for the next call (those waiting on a commit
    /// come first in `rooms_synced`, so they are the last to be left here).
    pub rooms_left: Vec<RoomId>,
    /// Outbox messages sent.
    pub outbox_sent: usize,
    /// Messages still in the outbox.
    pub outbox_left: usize,
    /// Whether the budget ran out before everything was done.
    pub budget_exhausted: bool,
}

impl BackgroundReport {
    /// Whether nothing is left for a later call.
    pub fn is_complete(&self) -> bool {
        self.rooms_left.is_empty() && self.outbox_left == 0
    }
}

impl Client {
    /// Catches up within `budget`: connects if needed (without reading any
    /// room), settles every room that waits on a commit or proposal, then
    /// catches up the other rooms, then sends the outbox, checking the
    /// budget before each room and before the outbox. Returns what was done
    /// and what is left; call again (with a new budget) for the rest. The key
    /// cache file follows every epoch change as usual.
    pub async fn background_sync(&mut self, budget: Duration) -> Result<BackgroundReport, ClientError> {
        let started = Instant::now();
        if self.connection.is_none() {
            self.open_connection().await?;
        }
        let mut rooms: Vec<(bool, RoomId)> = self
            .rooms
            .iter()
            .filter(|(_, entry)| !entry.record.removed)
            .map(|(room_id, entry)| {
                let record = &entry.record;
                let control = record.pending.is_some()
                    || record.redo.is_some()
                    || record.cover_proposals
                    || !record.confirmed;
                (!control, *room_id)
            })
            .collect();
        // Control-plane work first (false sorts before true), then room order.
        rooms.sort();
        let mut report = BackgroundReport {
            rooms_synced: Vec::new(),
            rooms_left: Vec::new(),
            outbox_sent: 0,
            outbox_left: 0,
            budget_exhausted: false,
        };
        for (_, room_id) in rooms {
            if started.elapsed() >= budget {
                report.rooms_left.push(room_id);
                continue;
            }
            self.resume_room(room_id).await?;
            report.rooms_synced.push(room_id);
        }
        if report.rooms_left.is_empty() && started.elapsed() < budget {
            report.outbox_sent = self.flush_outbox().await?;
        }
        report.outbox_left = self.outbox.len();
        report.budget_exhausted = !report.is_complete();
        Ok(report)
    }
}
