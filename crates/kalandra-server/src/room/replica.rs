//! Replicas in a shard: rooms another domain orders, whose frames that
//! domain sends here once for all of this server's members. A replica is a
//! room like any other for reading (subscribe, sync, GroupInfo: members,
//! roles of the log, read bounds), but takes frames only from
//! [`Shard::handle_replicated`], in its authority's order, and refuses
//! everything only the authority may do (submit, ephemeral, moderation).

use kalandra_proto::chain::{LogHead, SignedLogHead};
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

/// What a replica found comparing a head its authority signed with its own chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadCheck {
    /// Same index, same head: the replica holds the authority's order.
    Matched,
    /// The replica is at another index; nothing to compare.
    NotComparable,
}

/// Why a replica distrusts its authority's statement of the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadCheckError {
    /// The room names no authority key to check with.
    #[error("the room names no key of its authority")]
    NoAuthorityKey,
    /// The head is not signed by the room's authority.
    #[error("the head at {log_index} is not signed by the room's authority")]
    BadSignature {
        /// The head's index.
        log_index: u64,
    },
    /// Signed by the authority, but not the head of the frames it sent:
    /// the authority showed this domain another order than it states (the
    /// signed head and the replica's frames are the proof).
    #[error("the authority signed head {signed:02x?} at {log_index}, its frames make {replica:02x?}")]
    Equivocation {
        /// The index.
        log_index: u64,
        /// The head the authority signed.
        signed: LogHead,
        /// The head of the frames it sent.
        replica: LogHead,
    },
}

/// Compares `signed`, a head of `room_id` its authority (key
/// `authority_key`) signed, with the replica's chain, which is at
/// `replica_head` (last index, head).
pub fn check_authority_head(
    room_id: RoomId,
    replica_head: Option<(u64, LogHead)>,
    signed: &SignedLogHead,
    authority_key: Option<[u8; 32]>,
) -> Result<HeadCheck, HeadCheckError> {
    let key = authority_key
        .and_then(|key| ed25519_dalek::VerifyingKey::from_bytes(&key).ok())
        .ok_or(HeadCheckError::NoAuthorityKey)?;
    signed.verify(room_id, &key).map_err(|_| HeadCheckError::BadSignature { log_index: signed.log_index })?;
    match replica_head {
        Some((last, head)) if last == signed.log_index && head == signed.head => Ok(HeadCheck::Matched),
        Some((last, head)) if last == signed.log_index => {
            Err(HeadCheckError::Equivocation { log_index: last, signed: signed.head, replica: head })
        }
        _ => Ok(HeadCheck::NotComparable),
    }
}

impl<G: PersistentGroup, P: Peer> Shard<G, P> {
    /// Checks a head the authority of `room_id` signed against the
    /// replica's chain at that index, among the latest frames it took or at
    /// its durable end (`None`: no replica of it here).
    pub fn check_replica_head(
        &self,
        room_id: RoomId,
        signed: &SignedLogHead,
    ) -> Option<Result<HeadCheck, HeadCheckError>> {
        let room = self.rooms.get(&room_id).filter(|room| room.replica)?;
        let key = room.sequencer.group().authority_key();
        let at_index = room.sequencer.head_at(signed.log_index).map(|head| (signed.log_index, head));
        Some(check_authority_head(room_id, at_index.or(room.sequencer.durable_log_head()), signed, key))
    }

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

#[cfg(test)]
mod tests {
    use ed25519_dalek::SigningKey;

    use super::*;

    const ROOM: RoomId = RoomId([9; 16]);

    #[test]
    fn a_replica_catches_an_authority_that_signs_another_head_than_its_frames_make() {
        let authority = SigningKey::from_bytes(&[1; 32]);
        let key = Some(authority.verifying_key().to_bytes());
        let (head, other) = ([7u8; 32], [8u8; 32]);
        let signed = SignedLogHead::sign(ROOM, 5, head, &authority);
        assert_eq!(check_authority_head(ROOM, Some((5, head)), &signed, key), Ok(HeadCheck::Matched));
        assert_eq!(check_authority_head(ROOM, Some((6, other)), &signed, key), Ok(HeadCheck::NotComparable));
        assert_eq!(
            check_authority_head(ROOM, Some((5, other)), &signed, key),
            Err(HeadCheckError::Equivocation { log_index: 5, signed: head, replica: other }),
            "the same index, another head: the signed head is the proof"
        );
        let forged = SignedLogHead::sign(ROOM, 5, head, &SigningKey::from_bytes(&[2; 32]));
        assert_eq!(
            check_authority_head(ROOM, Some((5, head)), &forged, key),
            Err(HeadCheckError::BadSignature { log_index: 5 }),
            "a head not signed by the room's authority proves nothing"
        );
        let elsewhere = SignedLogHead::sign(RoomId([3; 16]), 5, head, &authority);
        assert_eq!(
            check_authority_head(ROOM, Some((5, head)), &elsewhere, key),
            Err(HeadCheckError::BadSignature { log_index: 5 }),
            "another room's head"
        );
        assert_eq!(
            check_authority_head(ROOM, Some((5, head)), &signed, None),
            Err(HeadCheckError::NoAuthorityKey)
        );
    }
}
