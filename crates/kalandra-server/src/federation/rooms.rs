//! Rooms of other domains that this server's users take part in: for
//! each, the domain whose sequencer orders it (its authority). A client's
//! frames for such a room are relayed there; the authority's answers and
//! fan-out come back over the link.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};

use kalandra_proto::federation::DomainName;
use kalandra_proto::RoomId;

/// Remote rooms one server keeps track of at most.
pub const REMOTE_ROOMS_MAX: usize = 1 << 20;

/// Why a room could not be recorded as another domain's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RemoteRoomError {
    /// The room is already recorded under another authority.
    #[error("room {room_id} is already ordered by {authority}")]
    OtherAuthority {
        /// The room.
        room_id: RoomId,
        /// Its recorded authority.
        authority: DomainName,
    },
    /// [`REMOTE_ROOMS_MAX`] rooms are recorded already.
    #[error("{REMOTE_ROOMS_MAX} remote rooms are recorded already")]
    Full,
}

/// The remote rooms and their authorities.
#[derive(Debug, Default)]
pub struct RemoteRooms {
    rooms: Mutex<BTreeMap<RoomId, DomainName>>,
}

impl RemoteRooms {
    /// The known remote rooms.
    pub fn new(rooms: impl IntoIterator<Item = (RoomId, DomainName)>) -> RemoteRooms {
        RemoteRooms { rooms: Mutex::new(rooms.into_iter().collect()) }
    }

    /// The domain ordering `room_id`, if it is a known remote room.
    pub fn authority_of(&self, room_id: RoomId) -> Option<DomainName> {
        self.lock().get(&room_id).cloned()
    }

    /// Records `room_id` as ordered by `authority` (again, if it is already).
    pub fn record(&self, room_id: RoomId, authority: &DomainName) -> Result<(), RemoteRoomError> {
        let mut rooms = self.lock();
        match rooms.get(&room_id) {
            Some(known) if known == authority => Ok(()),
            Some(known) => Err(RemoteRoomError::OtherAuthority { room_id, authority: known.clone() }),
            None if rooms.len() >= REMOTE_ROOMS_MAX => Err(RemoteRoomError::Full),
            None => {
                rooms.insert(room_id, authority.clone());
                Ok(())
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<RoomId, DomainName>> {
        self.rooms.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_remote_room_keeps_its_first_authority() {
        let (a, b) = (DomainName::parse("a.example").unwrap(), DomainName::parse("b.example").unwrap());
        let rooms = RemoteRooms::default();
        let room_id = RoomId([7; 16]);
        assert_eq!(rooms.authority_of(room_id), None);
        rooms.record(room_id, &a).unwrap();
        rooms.record(room_id, &a).unwrap();
        assert_eq!(
            rooms.record(room_id, &b),
            Err(RemoteRoomError::OtherAuthority { room_id, authority: a.clone() })
        );
        assert_eq!(rooms.authority_of(room_id), Some(a));
    }
}
