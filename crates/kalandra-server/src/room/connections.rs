//! Which rooms of a shard each connection subscribes to or awaits an
//! acknowledgement in, so that a closed connection is cleaned up in those
//! rooms only, not in every room of the shard.

use std::collections::{BTreeSet, HashMap};

use kalandra_proto::RoomId;

use super::shard::ConnectionId;

/// A connection's noted rooms are checked against the rooms' state once
/// they are this many (and then each time they double).
pub const CONNECTION_ROOMS_PRUNE_MIN: usize = 1_024;

/// The rooms noted for one connection: a superset of those where it has a
/// subscriber or a frame waiting to be acknowledged.
#[derive(Debug, Default)]
struct Noted {
    rooms: BTreeSet<RoomId>,
    /// Prune when `rooms` grows past this.
    prune_at: usize,
}

/// For each connection, the rooms where it may hold state.
#[derive(Debug, Default)]
pub struct ConnectionRooms {
    by_connection: HashMap<ConnectionId, Noted>,
}

impl ConnectionRooms {
    /// `connection` now holds state in `room_id`. When its noted rooms grow
    /// past their pruning point, those where `holds(room)` is false go; the
    /// point then doubles over what is left (amortized work per note: O(1)
    /// checks).
    pub fn note(&mut self, connection: ConnectionId, room_id: RoomId, holds: impl Fn(RoomId) -> bool) {
        let noted = self.by_connection.entry(connection).or_default();
        noted.rooms.insert(room_id);
        if noted.rooms.len() > noted.prune_at.max(CONNECTION_ROOMS_PRUNE_MIN) {
            noted.rooms.retain(|room| *room == room_id || holds(*room));
            noted.prune_at = 2 * noted.rooms.len();
        }
    }

    /// The rooms to clean up for `connection`, which is gone.
    pub fn take(&mut self, connection: ConnectionId) -> BTreeSet<RoomId> {
        self.by_connection.remove(&connection).map(|noted| noted.rooms).unwrap_or_default()
    }

    /// Connections with rooms noted.
    #[cfg(test)]
    pub fn connections(&self) -> usize {
        self.by_connection.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(n: usize) -> RoomId {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&(n as u64).to_be_bytes());
        RoomId(id)
    }

    #[test]
    fn a_connections_rooms_are_kept_until_it_closes_and_pruned_of_those_it_left() {
        let mut noted = ConnectionRooms::default();
        noted.note(7, room(1), |_| true);
        noted.note(7, room(1), |_| true);
        noted.note(8, room(2), |_| true);
        assert_eq!(noted.take(7), BTreeSet::from([room(1)]));
        assert_eq!(noted.take(7), BTreeSet::new(), "taken once");
        assert_eq!(noted.connections(), 1);
        // Past the pruning point only the rooms it still holds state in stay.
        let still_held = |room_id: RoomId| room_id.0[7].is_multiple_of(2);
        for n in 0..=CONNECTION_ROOMS_PRUNE_MIN {
            noted.note(9, room(n), still_held);
        }
        let left = noted.take(9);
        assert!(left.len() <= CONNECTION_ROOMS_PRUNE_MIN / 2 + 1, "{} rooms noted", left.len());
        assert!(left.contains(&room(CONNECTION_ROOMS_PRUNE_MIN)), "the room just noted stays");
        assert!(left.contains(&room(2)) && !left.contains(&room(3)));
    }
}
