//! Replicas in a shard: rooms another domain orders, whose frames that
//! domain sends here once for all of this server's members. A replica is a
//! room like any other for reading (subscribe, sync, GroupInfo: members,
//! roles of the log, read bounds), but takes frames only from
//! [`Shard::handle_replicated`], in its authority's order, and refuses
//! everything only the authority may do (submit, ephemeral, moderation).

use kalandra_proto::{Frame, RoomId};

use super::sequencer::{PersistentGroup, ReplayError, RoomSequencer};
use super::shard::{Peer, Room, Shard};

/// Why a frame from a room's authority was not taken into its replica.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// The room is ordered here, not by the sender.
    #[error("room {0} is ordered here")]
    LocalRoom(RoomId),
    /// The frame does not continue the replica: a gap, or a frame that does
    /// not apply (the authority diverged, or sent what it must not).
    #[error("room {room_id}: {error}")]
    DoesNotApply {
        /// The room.
        room_id: RoomId,
        /// Why.
        error: ReplayError,
    },
    /// The node stopped.
    #[error("the room core stopped")]
    Stopped,
    /// The first frame of a new replica is not a room's `CreateRoom`.
    #[error("room {room_id}: {error}")]
    NoCreateRoom {
        /// The room.
        room_id: RoomId,
        /// Why its state could not be built.
        error: String,
    },
}

impl<G: PersistentGroup, P: Peer> Shard<G, P> {
    /// A frame the room's authority sequenced, in its order. Frames the
    /// replica holds already (a catch-up overlapping the live stream) are
    /// skipped; the first frame of a room not known here must be its
    /// `CreateRoom`. Taken frames are stored and fanned out to this
    /// server's readers like sequenced ones, and never acknowledged.
    pub fn handle_replicated(&mut self, frame: Frame) -> Result<(), ReplicaError> {
        let room_id = frame.header().room_id();
        let log_index = frame.header().log_index();
        let sequenced = match self.rooms.get_mut(&room_id) {
            Some(room) if !room.replica => return Err(ReplicaError::LocalRoom(room_id)),
            Some(room) if log_index < room.sequencer.next_log_index() => return Ok(()),
            Some(room) => room
                .sequencer
                .replicate(frame)
                .map_err(|error| ReplicaError::DoesNotApply { room_id, error })?,
            None => {
                let create: kalandra_proto::payload::CreateRoom = frame
                    .decode_payload()
                    .map_err(|error| ReplicaError::NoCreateRoom { room_id, error: error.to_string() })?;
                let group = G::from_create_room(&create.group_info, &create.ratchet_tree)
                    .map_err(|error| ReplicaError::NoCreateRoom { room_id, error: error.to_string() })?;
                let (creator, created_at_ms) =
                    (frame.header().sender_id(), frame.header().server_timestamp_ms());
                let (sequencer, sequenced) = RoomSequencer::replica(room_id, group, frame)
                    .map_err(|error| ReplicaError::DoesNotApply { room_id, error })?;
                let mut room = Room::new(sequencer, creator, created_at_ms);
                room.replica = true;
                self.rooms.insert(room_id, room);
                sequenced
            }
        };
        self.sequenced(room_id, None, sequenced);
        Ok(())
    }

    /// The next index the replica of `room_id` expects (`None`: no replica
    /// of it here), for following its authority from there.
    pub fn replica_next_log_index(&self, room_id: RoomId) -> Option<u64> {
        self.rooms.get(&room_id).filter(|room| room.replica).map(|room| room.sequencer.next_log_index())
    }

    /// The first index not yet durable in the replica of `room_id` (`None`:
    /// no replica of it here).
    pub fn replica_durable_next(&self, room_id: RoomId) -> Option<u64> {
        let room = self.rooms.get(&room_id).filter(|room| room.replica)?;
        Some(room.sequencer.durable_through().map_or(0, |through| through + 1))
    }

    /// Readers of the replica that waited for it to reach their index go
    /// on once it is durable there.
    pub(super) fn wake_replica_readers(&mut self, room_id: RoomId) {
        let Some(room) = self.rooms.get_mut(&room_id) else { return };
        let durable_next = room.sequencer.durable_through().map_or(0, |through| through + 1);
        let mut ready = Vec::new();
        for subscriber in room.subscribers.iter_mut().filter(|s| s.awaiting_replica) {
            if subscriber.next_log_index <= durable_next {
                subscriber.awaiting_replica = false;
                ready.push((subscriber.subscription, subscriber.next_log_index));
            }
        }
        for (subscription, next_log_index) in ready {
            self.handle_caught_up(room_id, subscription, next_log_index);
        }
    }
}
