//! Rooms of other domains that this server's users take part in: for
//! each, the domain whose sequencer orders it (its authority). A client's
//! frames for such a room are relayed there; the authority's answers and
//! fan-out come back over the link.
//!
//! The table is kept in the store too ([`RemoteRooms::load`],
//! [`RemoteRooms::record_durably`]): a room learnt from a peer's Welcome
//! stays known across restarts.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, PoisonError};

use kalandra_proto::federation::DomainName;
use kalandra_proto::RoomId;

use crate::node::RemoteRoomSet;
use crate::store::{RemoteRecordError, Store};

/// Remote rooms one server keeps track of at most (as many as its store
/// records).
pub const REMOTE_ROOMS_MAX: usize = crate::store::limits::REMOTE_ROOMS_MAX;
/// Remote rooms one authority may have recorded here at most: no peer
/// domain fills the table the others share.
pub const REMOTE_ROOMS_PER_AUTHORITY_MAX: usize = REMOTE_ROOMS_MAX / 4;

const _: () = assert!(REMOTE_ROOMS_PER_AUTHORITY_MAX < REMOTE_ROOMS_MAX, "a peer leaves room for the others");

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
    /// [`REMOTE_ROOMS_PER_AUTHORITY_MAX`] rooms of this authority are
    /// recorded already.
    #[error("{REMOTE_ROOMS_PER_AUTHORITY_MAX} rooms of {authority} are recorded already")]
    AuthorityFull {
        /// The authority.
        authority: DomainName,
    },
}

/// Why a room could not be recorded durably.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RecordRoomError {
    /// The table refuses it.
    #[error(transparent)]
    Room(#[from] RemoteRoomError),
    /// The store failed or refused it; nothing was recorded.
    #[error("storing the remote room: {0}")]
    Store(#[from] RemoteRecordError),
}

/// The remote rooms and their authorities.
#[derive(Debug, Default)]
pub struct RemoteRooms {
    table: Mutex<Table>,
}

/// The rooms by id, and the same by authority (so that a peer's rooms are
/// found without a scan of every room: a link coming up follows each).
#[derive(Debug, Default)]
struct Table {
    rooms: BTreeMap<RoomId, DomainName>,
    by_authority: BTreeMap<DomainName, BTreeSet<RoomId>>,
}

impl RemoteRooms {
    /// The known remote rooms.
    pub fn new(rooms: impl IntoIterator<Item = (RoomId, DomainName)>) -> RemoteRooms {
        let mut table = Table::default();
        for (room_id, authority) in rooms {
            table.by_authority.entry(authority.clone()).or_default().insert(room_id);
            table.rooms.insert(room_id, authority);
        }
        RemoteRooms { table: Mutex::new(table) }
    }

    /// The domain ordering `room_id`, if it is a known remote room.
    pub fn authority_of(&self, room_id: RoomId) -> Option<DomainName> {
        self.lock().rooms.get(&room_id).cloned()
    }

    /// The rooms `authority` orders, in id order.
    pub fn ordered_by(&self, authority: &DomainName) -> Vec<RoomId> {
        self.lock().by_authority.get(authority).map_or_else(Vec::new, |rooms| rooms.iter().copied().collect())
    }

    /// Every remote room, in id order.
    pub fn all(&self) -> Vec<RoomId> {
        self.lock().rooms.keys().copied().collect()
    }

    /// Records `room_id` as ordered by `authority` (again, if it is already).
    pub fn record(&self, room_id: RoomId, authority: &DomainName) -> Result<(), RemoteRoomError> {
        let mut table = self.lock();
        if table.admits(room_id, authority)? {
            table.rooms.insert(room_id, authority.clone());
            table.by_authority.entry(authority.clone()).or_default().insert(room_id);
        }
        Ok(())
    }

    /// The remote rooms the store records (blocks on storage).
    pub fn load(store: &dyn Store) -> Result<RemoteRooms, RemoteRecordError> {
        Ok(RemoteRooms::new(store.remote_rooms()?))
    }

    /// Records `room_id` as ordered by `authority` in the store, then in
    /// the table (blocks on storage). A room known under another authority
    /// is refused without a write.
    pub fn record_durably(
        &self,
        store: &dyn Store,
        room_id: RoomId,
        authority: &DomainName,
    ) -> Result<(), RecordRoomError> {
        if !self.lock().admits(room_id, authority)? {
            return Ok(());
        }
        store.record_remote_room(room_id, authority)?;
        Ok(self.record(room_id, authority)?)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Table {
    /// Whether `room_id` is new and may be recorded under `authority`
    /// (`false`: it is recorded under it already).
    fn admits(&self, room_id: RoomId, authority: &DomainName) -> Result<bool, RemoteRoomError> {
        match self.rooms.get(&room_id) {
            Some(known) if known == authority => Ok(false),
            Some(known) => Err(RemoteRoomError::OtherAuthority { room_id, authority: known.clone() }),
            None if self.rooms.len() >= REMOTE_ROOMS_MAX => Err(RemoteRoomError::Full),
            None if self.by_authority.get(authority).map_or(0, BTreeSet::len)
                >= REMOTE_ROOMS_PER_AUTHORITY_MAX =>
            {
                Err(RemoteRoomError::AuthorityFull { authority: authority.clone() })
            }
            None => Ok(true),
        }
    }
}

impl RemoteRoomSet for RemoteRooms {
    fn is_remote(&self, room_id: RoomId) -> bool {
        self.authority_of(room_id).is_some()
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
        rooms.record(RoomId([8; 16]), &b).unwrap();
        assert_eq!(rooms.ordered_by(&a), vec![room_id]);
        assert_eq!(rooms.ordered_by(&b), vec![RoomId([8; 16])]);
        assert_eq!(rooms.ordered_by(&DomainName::parse("c.example").unwrap()), vec![]);
        assert_eq!(
            rooms.record(room_id, &b),
            Err(RemoteRoomError::OtherAuthority { room_id, authority: a.clone() })
        );
        assert_eq!(rooms.authority_of(room_id), Some(a));
    }

    #[test]
    fn one_authority_fills_at_most_its_share_of_the_table() {
        let (a, b) = (DomainName::parse("a.example").unwrap(), DomainName::parse("b.example").unwrap());
        let room = |n: usize| {
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&(n as u64).to_be_bytes());
            RoomId(id)
        };
        let rooms = RemoteRooms::new((0..REMOTE_ROOMS_PER_AUTHORITY_MAX).map(|n| (room(n), a.clone())));
        let store = crate::store::MemoryStore::new();
        let next = room(REMOTE_ROOMS_PER_AUTHORITY_MAX);
        assert_eq!(rooms.record(next, &a), Err(RemoteRoomError::AuthorityFull { authority: a.clone() }));
        let refused = rooms.record_durably(&store, next, &a).unwrap_err();
        assert!(matches!(refused, RecordRoomError::Room(RemoteRoomError::AuthorityFull { .. })));
        assert!(store.remote_rooms().unwrap().is_empty(), "refused before the store is written");
        rooms.record(room(0), &a).unwrap();
        rooms.record_durably(&store, next, &b).unwrap();
        assert_eq!(rooms.authority_of(next), Some(b), "another authority still has room");
    }

    #[test]
    fn a_remote_room_recorded_durably_is_loaded_again() {
        let (a, b) = (DomainName::parse("a.example").unwrap(), DomainName::parse("b.example").unwrap());
        let store = crate::store::MemoryStore::new();
        let rooms = RemoteRooms::default();
        let room_id = RoomId([9; 16]);
        rooms.record_durably(&store, room_id, &a).unwrap();
        let refused = rooms.record_durably(&store, room_id, &b).unwrap_err();
        assert!(matches!(refused, RecordRoomError::Room(RemoteRoomError::OtherAuthority { .. })));
        let loaded = RemoteRooms::load(&store).unwrap();
        assert_eq!(loaded.authority_of(room_id), Some(a.clone()));
        assert_eq!(loaded.ordered_by(&a), vec![room_id], "the index is rebuilt on load");
        assert_eq!(loaded.authority_of(RoomId([1; 16])), None);
    }
}
