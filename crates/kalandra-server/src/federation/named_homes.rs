//! Homes a relaying domain named for the recipients of one room's Welcome
//! ([`super::recipient_homes`]), kept in memory by the room's authority
//! and used to route that room's Welcome for that user only.
//!
//! A naming is a domain's word, not a proof: it is never written as the
//! user's home (which a claim through the user's home records), so a
//! domain naming a wrong home misroutes at most the Welcome of the commit
//! it relayed itself, never another room's or a later one. Each entry is
//! forgotten once its Welcome is routed; each naming domain holds at most
//! [`NAMED_HOMES_PER_PEER_MAX`] (its oldest go); a restart forgets them
//! all (their Welcomes then stay at the authority).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};

use kalandra_proto::federation::DomainName;
use kalandra_proto::{RoomId, SenderId};

use crate::store::UserId;

/// (user, room) pairs one domain's namings hold at most.
pub const NAMED_HOMES_PER_PEER_MAX: usize = 4_096;

/// The homes named for Welcome recipients, by user and room.
#[derive(Debug, Default)]
pub struct NamedHomes {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    homes: BTreeMap<(UserId, RoomId), Named>,
    /// Per naming domain, its keys oldest first (some maybe forgotten).
    order: HashMap<DomainName, VecDeque<(UserId, RoomId)>>,
}

#[derive(Debug)]
struct Named {
    home: DomainName,
    by: DomainName,
}

/// One user's Welcome of one room to route to a named home.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedHome {
    /// The recipient.
    pub user: UserId,
    /// The room of the Welcome.
    pub room_id: RoomId,
    /// Where to route it.
    pub home: DomainName,
}

impl NamedHomes {
    /// Notes the homes `by` named for `pairs`, recipients of a Welcome of
    /// `room_id`, where none is named yet; returns the users newly named.
    pub fn name(&self, by: &DomainName, room_id: RoomId, pairs: &[(UserId, DomainName)]) -> Vec<SenderId> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let mut named = Vec::new();
        for (user, home) in pairs {
            let key = (*user, room_id);
            if state.homes.contains_key(&key) {
                continue;
            }
            state.make_room(by);
            state.homes.insert(key, Named { home: home.clone(), by: by.clone() });
            let order = state.order.entry(by.clone()).or_default();
            order.push_back(key);
            assert!(order.len() <= NAMED_HOMES_PER_PEER_MAX, "a domain's namings beyond their bound");
            named.push(SenderId(*user));
        }
        named
    }

    /// The rooms whose Welcome for `user` goes to a named home.
    pub fn of_user(&self, user: UserId) -> Vec<NamedHome> {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let range = (user, RoomId([0; 16]))..=(user, RoomId([0xff; 16]));
        state.homes.range(range).map(|((user, room_id), named)| named_home(*user, *room_id, named)).collect()
    }

    /// At most `count` namings after `after`, in (user, room) order.
    pub fn page(&self, after: Option<(UserId, RoomId)>, count: usize) -> Vec<NamedHome> {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let entries: Box<dyn Iterator<Item = _>> = match after {
            Some(key) => {
                Box::new(state.homes.range((std::ops::Bound::Excluded(key), std::ops::Bound::Unbounded)))
            }
            None => Box::new(state.homes.iter()),
        };
        entries.take(count).map(|((user, room_id), named)| named_home(*user, *room_id, named)).collect()
    }

    /// Forgets the naming for `user`'s Welcome of `room_id` (routed).
    pub fn forget(&self, user: UserId, room_id: RoomId) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.homes.remove(&(user, room_id));
    }
}

impl State {
    /// Drops `by`'s oldest namings while it holds its bound.
    fn make_room(&mut self, by: &DomainName) {
        let Some(order) = self.order.get_mut(by) else { return };
        while order.len() >= NAMED_HOMES_PER_PEER_MAX {
            let Some(oldest) = order.pop_front() else { break };
            if self.homes.get(&oldest).is_some_and(|named| named.by == *by) {
                self.homes.remove(&oldest);
            }
        }
    }
}

fn named_home(user: UserId, room_id: RoomId, named: &Named) -> NamedHome {
    NamedHome { user, room_id, home: named.home.clone() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domain(name: &str) -> DomainName {
        DomainName::parse(name).unwrap()
    }

    #[test]
    fn a_naming_holds_for_one_room_keeps_the_first_home_and_is_forgotten_once_routed() {
        let named = NamedHomes::default();
        let (b, c) = (domain("b.test"), domain("c.test"));
        let (one, two) = (RoomId([1; 16]), RoomId([2; 16]));
        assert_eq!(named.name(&b, one, &[(7, b.clone()), (8, c.clone())]), vec![SenderId(7), SenderId(8)]);
        assert_eq!(named.name(&c, one, &[(7, c.clone())]), Vec::<SenderId>::new(), "the first naming stays");
        named.name(&c, two, &[(7, c.clone())]);
        let homes: Vec<(RoomId, DomainName)> =
            named.of_user(7).into_iter().map(|named| (named.room_id, named.home)).collect();
        assert_eq!(homes, vec![(one, b.clone()), (two, c.clone())], "per room");
        assert_eq!(named.page(Some((7, one)), 10).len(), 2, "after (7, one): (7, two) and (8, one)");
        named.forget(7, one);
        assert_eq!(named.of_user(7).len(), 1);
        assert!(named.of_user(9).is_empty());
    }

    #[test]
    fn each_naming_domain_holds_its_bound_and_only_its_own_oldest_go() {
        let named = NamedHomes::default();
        let (b, c) = (domain("b.test"), domain("c.test"));
        let room = RoomId([3; 16]);
        named.name(&c, room, &[(u64::MAX, c.clone())]);
        let users: Vec<(UserId, DomainName)> =
            (0..=NAMED_HOMES_PER_PEER_MAX as u64).map(|user| (user, b.clone())).collect();
        named.name(&b, room, &users);
        assert!(named.of_user(0).is_empty(), "b's oldest went");
        assert_eq!(named.of_user(1).len(), 1);
        assert_eq!(named.of_user(u64::MAX).len(), 1, "c's naming stays");
        assert_eq!(named.page(None, usize::MAX).len(), NAMED_HOMES_PER_PEER_MAX + 1);
    }
}
