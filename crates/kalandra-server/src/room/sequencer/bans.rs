//! A room's bans, with their ends kept in order: the periodic expiry reads
//! only the bans that ended, not every ban of the room.

use std::collections::{BTreeSet, HashMap};

use kalandra_proto::SenderId;

/// Banned users and when each ban ends (`None`: never).
#[derive(Debug, Default, Clone)]
pub(super) struct Bans {
    by_user: HashMap<SenderId, Option<u64>>,
    /// The timed bans, by end then user.
    ends: BTreeSet<(u64, SenderId)>,
}

impl Bans {
    pub(super) fn len(&self) -> usize {
        self.by_user.len()
    }

    pub(super) fn contains(&self, user: SenderId) -> bool {
        self.by_user.contains_key(&user)
    }

    /// `user`'s ban, if banned: `Some(until_ms)`.
    pub(super) fn get(&self, user: SenderId) -> Option<Option<u64>> {
        self.by_user.get(&user).copied()
    }

    /// Bans `user` until `until_ms`, replacing an earlier ban of the user.
    pub(super) fn insert(&mut self, user: SenderId, until_ms: Option<u64>) {
        if let Some(Some(previous_end)) = self.by_user.insert(user, until_ms) {
            self.ends.remove(&(previous_end, user));
        }
        if let Some(end) = until_ms {
            self.ends.insert((end, user));
        }
        self.assert_consistent();
    }

    /// Lifts `user`'s ban; whether there was one.
    pub(super) fn remove(&mut self, user: SenderId) -> bool {
        let removed = self.by_user.remove(&user);
        if let Some(Some(end)) = removed {
            self.ends.remove(&(end, user));
        }
        self.assert_consistent();
        removed.is_some()
    }

    /// Every ban (user, end), in no order.
    pub(super) fn iter(&self) -> impl Iterator<Item = (SenderId, Option<u64>)> + '_ {
        self.by_user.iter().map(|(user, until)| (*user, *until))
    }

    /// Whether a ban with an end is in force.
    pub(super) fn has_timed(&self) -> bool {
        !self.ends.is_empty()
    }

    /// Whether `user` is banned at `now_ms`.
    pub(super) fn bans(&self, user: SenderId, now_ms: u64) -> bool {
        self.by_user.get(&user).is_some_and(|until| until.is_none_or(|until| now_ms < until))
    }

    /// Forgets the bans that ended at or before `now_ms`; their users, in
    /// order of end.
    pub(super) fn expire(&mut self, now_ms: u64) -> Vec<SenderId> {
        let mut ended = Vec::new();
        while let Some(&(end, user)) = self.ends.first() {
            if end > now_ms {
                break;
            }
            self.ends.pop_first();
            self.by_user.remove(&user);
            ended.push(user);
        }
        self.assert_consistent();
        ended
    }

    /// No more ends than bans (each timed ban has exactly one end).
    fn assert_consistent(&self) {
        assert!(self.ends.len() <= self.by_user.len(), "a ban's end without its ban");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bans_end_in_order_and_a_new_ban_replaces_the_old_end() {
        let mut bans = Bans::default();
        bans.insert(SenderId(1), Some(300));
        bans.insert(SenderId(2), Some(100));
        bans.insert(SenderId(3), None);
        bans.insert(SenderId(4), Some(200));
        assert!(bans.has_timed());
        assert!(bans.bans(SenderId(2), 99) && !bans.bans(SenderId(2), 100));
        // A ban again moves its end; one for good leaves the timed ones.
        bans.insert(SenderId(4), Some(400));
        bans.insert(SenderId(1), None);
        assert_eq!(bans.expire(250), vec![SenderId(2)]);
        assert_eq!(bans.expire(250), vec![]);
        assert!(bans.remove(SenderId(4)));
        assert!(!bans.remove(SenderId(4)));
        assert!(!bans.has_timed(), "no timed ban left");
        assert_eq!(bans.expire(u64::MAX), vec![]);
        assert_eq!((bans.len(), bans.get(SenderId(1)), bans.get(SenderId(3))), (2, Some(None), Some(None)));
    }
}
