//! Retention: which entries of a room have outlived its retention period
//! (pure; the node's retention task reads entries, asks [`expired`], and
//! erases what it names).
//!
//! A room's sweep walks its log from the stored sweep position in index
//! order and stops at the first entry younger than the period (server
//! timestamps never go backwards within a room, so everything after it is
//! younger too). Among the expired entries only application frames are
//! erased: handshake frames (`CreateRoom`, `Commit`, `Proposal`,
//! `ExternalJoin`) carry no application content, and recovery replays them
//! to rebuild the room's MLS public state, so they are swept past and kept.

use kalandra_proto::Opcode;

use super::{LogIndex, StoredEntry};
use kalandra_proto::header::offset;

use super::sealing::{routing_u16, routing_u64};

/// What one sweep of one room decided.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SweepPlan {
    /// Entries to erase, in index order.
    pub erase: Vec<LogIndex>,
    /// The sweep position after this plan: every entry below it is expired
    /// and handled (erased, already erased, or kept for good). `None` when
    /// the first entry looked at is not expired.
    pub swept_next_log_index: Option<LogIndex>,
}

/// Whether the erasure policy allows erasing an entry of this opcode:
/// application frames only.
pub fn erasable_opcode(opcode: Option<u16>) -> bool {
    opcode == Some(Opcode::Application.to_u16())
}

/// Decides, for `entries` read in index order from the room's sweep
/// position, which have expired at `now_ms` under `retention_ms` and must be
/// erased. An entry expires once `server_timestamp + retention_ms <= now`.
/// An entry whose timestamp cannot be read stops the sweep (it is never
/// erased by age).
pub fn expired(now_ms: u64, retention_ms: u64, entries: &[StoredEntry]) -> SweepPlan {
    let mut plan = SweepPlan::default();
    for entry in entries {
        let routing = entry.routing();
        let Some(timestamp_ms) = routing_u64(routing, offset::SERVER_TIMESTAMP) else { break };
        if timestamp_ms.saturating_add(retention_ms) > now_ms {
            break;
        }
        if entry.frame().is_some() && erasable_opcode(routing_u16(routing, offset::OPCODE)) {
            plan.erase.push(entry.log_index);
        }
        plan.swept_next_log_index = Some(entry.log_index + 1);
    }
    plan
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use kalandra_proto::{FrameHeaderBuf, RoomId};

    use super::*;
    use crate::store::sealing::{Erasure, ErasureCause, Redaction};
    use crate::store::EntryContent;

    fn entry(log_index: u64, opcode: Opcode, timestamp_ms: u64) -> StoredEntry {
        let mut header = FrameHeaderBuf::new(opcode);
        header.set_log_index(log_index).set_server_timestamp_ms(timestamp_ms);
        let mut frame = header.as_bytes().to_vec();
        frame.extend_from_slice(b"payload");
        StoredEntry { room_id: RoomId([1; 16]), log_index, content: EntryContent::Frame(Bytes::from(frame)) }
    }

    fn erased(log_index: u64, timestamp_ms: u64) -> StoredEntry {
        let StoredEntry { content: EntryContent::Frame(frame), .. } =
            entry(log_index, Opcode::Application, timestamp_ms)
        else {
            unreachable!()
        };
        StoredEntry {
            room_id: RoomId([1; 16]),
            log_index,
            content: EntryContent::Erased(Erasure {
                routing: frame.slice(..64),
                redaction: Redaction { erased_at_ms: 1, cause: ErasureCause::Sender { actor: 1 } },
                frame_digest: None,
            }),
        }
    }

    #[test]
    fn erases_expired_application_frames_and_sweeps_past_handshakes() {
        let entries = vec![
            entry(0, Opcode::CreateRoom, 100),
            entry(1, Opcode::Application, 200),
            erased(2, 250),
            entry(3, Opcode::Commit, 300),
            entry(4, Opcode::Application, 400),
            entry(5, Opcode::Application, 401),
        ];
        // Retention 100 ms at time 500: everything up to timestamp 400 expired.
        let plan = expired(500, 100, &entries);
        assert_eq!(plan.erase, vec![1, 4]);
        assert_eq!(plan.swept_next_log_index, Some(5));
        // The boundary is inclusive: timestamp + retention == now expires.
        assert_eq!(expired(501, 100, &entries).swept_next_log_index, Some(6));
    }

    #[test]
    fn nothing_expired_leaves_the_position() {
        let entries = vec![entry(7, Opcode::Application, 1_000)];
        assert_eq!(expired(1_500, 1_000, &entries), SweepPlan::default());
        assert_eq!(expired(0, 1, &[]), SweepPlan::default());
        // No overflow near the end of time.
        assert_eq!(expired(u64::MAX, u64::MAX, &[entry(0, Opcode::Application, 5)]).erase, vec![0]);
    }

    #[test]
    fn an_entry_without_a_readable_timestamp_stops_the_sweep() {
        let short = StoredEntry {
            room_id: RoomId([1; 16]),
            log_index: 0,
            content: EntryContent::Frame(Bytes::from_static(b"short")),
        };
        assert_eq!(expired(u64::MAX, 1, &[short, entry(1, Opcode::Application, 0)]), SweepPlan::default());
    }
}
