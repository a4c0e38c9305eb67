//! Recovery at start: every stored room rebuilt from its snapshot (or its
//! `CreateRoom` frame) and the log after it. Blocks on storage.

use bytes::Bytes;
use kalandra_proto::chain::{frame_digest, log_entry_digest, FrameDigest, LogChain, LogHead};
use kalandra_proto::payload::CreateRoom;
use kalandra_proto::{Frame, RoomId, SenderId};

use crate::room::limits::HISTORY_READ_FRAMES_MAX;
use crate::room::roles::RoomRoles;
use crate::room::sequencer::{PendingServerProposals, PersistentGroup, RecoveryPoint, RoomSequencer};
use crate::room::RecentFrames;
use crate::room::{RecoveredRoom, RoomSnapshot};
use crate::store::{EntryContent, Store, StoredEntry};

/// Why the room core could not start.
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    /// Storage could not be read.
    #[error("reading storage: {0}")]
    Storage(String),
    /// The stored log does not replay: corruption or a bug.
    #[error("room {room_id}: {detail}")]
    Corrupt {
        /// The room.
        room_id: RoomId,
        /// What failed.
        detail: String,
    },
}

/// Rebuilds every stored room: MLS state from its snapshot (or its
/// `CreateRoom` frame), then replay of every later entry.
pub fn recover_rooms<G: PersistentGroup>(store: &dyn Store) -> Result<Vec<RecoveredRoom<G>>, RecoveryError> {
    let storage = |error: &dyn std::fmt::Display| RecoveryError::Storage(error.to_string());
    // Rooms other domains order: their logs here are replicas.
    let replicas: std::collections::BTreeSet<RoomId> =
        store.remote_rooms().map_err(|e| storage(&e))?.into_iter().map(|(room_id, _)| room_id).collect();
    let mut rooms = Vec::new();
    let mut after = None;
    loop {
        let heads =
            store.room_heads(after, crate::store::limits::ROOM_HEADS_PAGE_MAX).map_err(|e| storage(&e))?;
        let Some(last) = heads.last() else { break };
        after = Some(last.room_id);
        for head in heads {
            let mut room = recover_room_state::<G>(store, head.room_id, head.next_log_index)?;
            room.replica = replicas.contains(&head.room_id);
            rooms.push(room);
        }
    }
    Ok(rooms)
}

/// Rebuilds one stored room whose log holds `next_log_index` entries: MLS
/// state from its snapshot (or its `CreateRoom` frame), then replay of every
/// later entry through [`RoomSequencer::replay`]. Blocks on storage.
pub fn recover_room_state<G: PersistentGroup>(
    store: &dyn Store,
    room_id: RoomId,
    next_log_index: u64,
) -> Result<RecoveredRoom<G>, RecoveryError> {
    let corrupt = |detail: String| RecoveryError::Corrupt { room_id, detail };
    let storage = |error: &dyn std::fmt::Display| RecoveryError::Storage(error.to_string());
    let first = store.read_range(room_id, 0, 1).map_err(|e| storage(&e))?;
    let create_entry = first.first().ok_or_else(|| corrupt("log has no entry 0".into()))?;
    let create_bytes = create_entry.frame().ok_or_else(|| corrupt("entry 0 was erased".into()))?;
    let create_frame = Frame::decode(create_bytes).map_err(|e| corrupt(format!("entry 0: {e}")))?;
    let create: CreateRoom = create_frame.decode_payload().map_err(|e| corrupt(format!("entry 0: {e}")))?;
    let creator = create_frame.header().sender_id();
    let policy = crate::room::roles::RoomPolicy::new(creator, create.join_rule());
    let metadata = store.room_metadata(room_id).map_err(|e| storage(&e))?;
    let created_at_ms =
        metadata.as_ref().map_or(create_frame.header().server_timestamp_ms(), |m| m.created_at_ms);
    let (group, through, group_info, epoch_started_at_log_index, server_proposals, snapshot_head) =
        match metadata.filter(|m| m.mls_snapshot_log_index > 0 && !m.mls_snapshot.is_empty()) {
            Some(metadata) => {
                let snapshot = RoomSnapshot::decode(&metadata.mls_snapshot)
                    .ok_or_else(|| corrupt("malformed snapshot".into()))?;
                let group = G::restore(snapshot.group).map_err(|e| corrupt(format!("snapshot: {e}")))?;
                let through = metadata.mls_snapshot_log_index - 1;
                (
                    group,
                    through,
                    snapshot.group_info,
                    snapshot.epoch_started_at_log_index,
                    snapshot.server_proposals,
                    snapshot.log_head,
                )
            }
            None => {
                let group = G::from_create_room(&create.group_info, &create.ratchet_tree)
                    .map_err(|e| corrupt(format!("entry 0 group: {e}")))?;
                (group, 0, (0, Bytes::from(create.group_info)), 0, PendingServerProposals::default(), None)
            }
        };
    let point = RecoveryPoint {
        through_log_index: through,
        last_timestamp_ms: last_timestamp_ms(store, room_id, next_log_index)?,
        group_info,
        epoch_started_at_log_index,
        server_proposals,
        policy,
        log_head: match snapshot_head {
            Some(head) => head,
            None => chain_through(store, room_id, through)?,
        },
    };
    let mut sequencer = RoomSequencer::recover(room_id, group, point);
    let moderation = store.room_moderation(room_id).map_err(|e| storage(&e))?;
    for (user, ban) in &moderation.bans {
        sequencer.ban(SenderId(*user), ban.until_ms).map_err(|e| corrupt(format!("bans: {e}")))?;
    }
    let room_recent = replay_after(store, &mut sequencer, through + 1, next_log_index)?;
    if sequencer.next_log_index() != next_log_index {
        let replayed = sequencer.next_log_index();
        return Err(corrupt(format!("replay reached {replayed}, head says {next_log_index}")));
    }
    let roles = RoomRoles::new(creator, moderation.roles.iter().map(|(user, role)| (SenderId(*user), *role)));
    Ok(RecoveredRoom { sequencer, creator, created_at_ms, recent: room_recent, roles, replica: false })
}

/// Replays the stored entries `[from, next_log_index)` into `sequencer`;
/// returns the most recent of them ([`RecentFrames`]' bounds).
fn replay_after<G: PersistentGroup>(
    store: &dyn Store,
    sequencer: &mut RoomSequencer<G>,
    mut from: u64,
    next_log_index: u64,
) -> Result<RecentFrames, RecoveryError> {
    let room_id = sequencer.room_id();
    let corrupt = |detail: String| RecoveryError::Corrupt { room_id, detail };
    let mut recent = RecentFrames::default();
    let mut reads = 0u64;
    while from < next_log_index {
        reads += 1;
        assert!(reads <= next_log_index, "replay makes progress on every read");
        let entries = store
            .read_range(room_id, from, HISTORY_READ_FRAMES_MAX)
            .map_err(|e| RecoveryError::Storage(e.to_string()))?;
        if entries.is_empty() {
            return Err(corrupt(format!("log ends at {from}, head says {next_log_index}")));
        }
        for entry in entries {
            // An erased entry replays as its placeholder: only application
            // frames are ever erased, and replay needs nothing of them but
            // their index and timestamp.
            let bytes = match &entry.content {
                EntryContent::Erased(erasure)
                    if crate::store::retention::erasable_opcode(erasure.opcode()) =>
                {
                    crate::room::erased_placeholder(room_id, entry.log_index, erasure)
                }
                EntryContent::Erased(_) => {
                    return Err(corrupt(format!("entry {}: a handshake frame was erased", entry.log_index)));
                }
                EntryContent::Frame(frame) => frame.clone(),
            };
            let frame =
                Frame::decode(&bytes).map_err(|e| corrupt(format!("entry {}: {e}", entry.log_index)))?;
            sequencer.replay(&frame).map_err(|e| corrupt(e.to_string()))?;
            recent.push(entry.log_index, bytes);
            from = entry.log_index + 1;
        }
    }
    Ok(recent)
}

/// The log's head at `through`, computed from the stored entries
/// `[0, through]` (a room recovered from its `CreateRoom` frame, or from a
/// snapshot written before the chain).
fn chain_through(store: &dyn Store, room_id: RoomId, through: u64) -> Result<LogHead, RecoveryError> {
    let corrupt = |detail: String| RecoveryError::Corrupt { room_id, detail };
    let mut chain = LogChain::genesis();
    while chain.next_log_index <= through {
        let from = chain.next_log_index;
        let count = usize::try_from(through - from + 1).unwrap_or(usize::MAX).min(HISTORY_READ_FRAMES_MAX);
        let entries =
            store.read_range(room_id, from, count).map_err(|e| RecoveryError::Storage(e.to_string()))?;
        if entries.is_empty() {
            return Err(corrupt(format!("log ends at {from}, a snapshot says {through}")));
        }
        for entry in entries.into_iter().take_while(|entry| entry.log_index <= through) {
            assert_eq!(entry.log_index, chain.next_log_index, "a range read is dense");
            chain.extend(room_id, &entry_digest(room_id, &entry).map_err(corrupt)?);
        }
    }
    Ok(chain.head)
}

/// The digest an entry contributes to its room's chain.
fn entry_digest(room_id: RoomId, entry: &StoredEntry) -> Result<FrameDigest, String> {
    let bytes = match &entry.content {
        EntryContent::Frame(frame) => return Ok(frame_digest(frame)),
        EntryContent::Erased(erasure) => crate::room::erased_placeholder(room_id, entry.log_index, erasure),
    };
    let frame = Frame::decode(&bytes).map_err(|e| format!("entry {}: {e}", entry.log_index))?;
    Ok(log_entry_digest(&frame))
}

/// The time stamped into the room's last stored entry: the sequencer never
/// stamps an earlier one, even when the clock stepped back across the
/// restart and no entry is replayed (a snapshot at the head).
fn last_timestamp_ms(store: &dyn Store, room_id: RoomId, next_log_index: u64) -> Result<u64, RecoveryError> {
    let corrupt = |detail: String| RecoveryError::Corrupt { room_id, detail };
    let last = next_log_index.checked_sub(1).ok_or_else(|| corrupt("log is empty".into()))?;
    let entries = store.read_range(room_id, last, 1).map_err(|e| RecoveryError::Storage(e.to_string()))?;
    let entry = entries.first().ok_or_else(|| corrupt(format!("entry {last} is missing")))?;
    let bytes = match &entry.content {
        EntryContent::Frame(frame) => frame.clone(),
        EntryContent::Erased(erasure) => crate::room::erased_placeholder(room_id, last, erasure),
    };
    let frame = Frame::decode(&bytes).map_err(|e| corrupt(format!("entry {last}: {e}")))?;
    Ok(frame.header().server_timestamp_ms())
}
