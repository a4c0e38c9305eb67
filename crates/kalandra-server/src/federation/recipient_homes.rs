//! The homes of a relayed commit's Welcome recipients.
//!
//! A room's authority routes a Welcome to a remote recipient's home only
//! if it knows that home. It learns it when the recipient's key package is
//! claimed through the authority itself ([`super::directory`]), but not
//! when a member of another domain invites a user of its own domain, or
//! one it claimed through a third domain. So the relaying home names, with
//! such a commit, the recipients' homes it knows ([`recipient_homes_of`]):
//! users whose package was handed out here are this domain's; users
//! claimed through another domain are that domain's. The authority keeps
//! of them what concerns the commit ([`named_recipient_homes`]: recipients
//! of its Welcome, homes that are peers), holds them until the commit is
//! answered ([`PendingHomes`]), and, once it is acknowledged, keeps the
//! homes of users it knows nothing of ([`users_unknown_here`]: no home
//! recorded, none of its own) for that room's Welcome only
//! ([`super::named_homes`]).
//!
//! The relaying domain's word is not otherwise checked, and so it is never
//! recorded as a user's home: a domain naming a wrong home misroutes only
//! the Welcome of the commit it relayed itself (which it could equally
//! have withheld).

use std::collections::{BTreeMap, HashSet, VecDeque};

use kalandra_proto::federation::DomainName;
use kalandra_proto::limits::WELCOME_RECIPIENTS_MAX;
use kalandra_proto::payload::Commit;
use kalandra_proto::{Frame, Opcode, RoomId};

use crate::federation::handshake::{PeerTable, RecipientHomes, RefusedDomains};
use crate::store::{Store, UserId};

/// Home domains one relayed commit names recipients of, at most; the
/// authority reads no further.
pub const RECIPIENT_HOME_DOMAINS_MAX: usize = 64;
/// Commits of one remote connection whose recipient homes wait for the
/// commit's answer; the oldest is forgotten past this.
pub const RECIPIENT_HOMES_PENDING_PER_CONNECTION_MAX: usize = 16;

/// The recipients of `frame`'s Welcome, when it is a commit with one.
pub fn welcome_recipients_of(frame: &Frame) -> Option<Vec<u64>> {
    if frame.opcode() != Opcode::Commit {
        return None;
    }
    let commit = frame.decode_payload::<Commit>().ok()?;
    (commit.welcome.is_some() && !commit.welcome_recipients.is_empty()).then_some(commit.welcome_recipients)
}

/// Home side (blocks on storage): the homes this server knows of
/// `recipients`, for a commit relayed from domain `own` to `authority`.
/// A user with a package handed out here is `own`'s; else a user recorded
/// as another domain's is that domain's. Users of the authority and users
/// of unknown home are left out; so are homes past
/// [`RECIPIENT_HOME_DOMAINS_MAX`].
pub fn recipient_homes_of(
    store: &dyn Store,
    own: &DomainName,
    authority: &DomainName,
    recipients: &[u64],
) -> Result<Vec<RecipientHomes>, String> {
    let mut homes: BTreeMap<DomainName, Vec<u64>> = BTreeMap::new();
    for &user in recipients.iter().take(WELCOME_RECIPIENTS_MAX) {
        let handed_out_here = !store.handed_out_claims(user).map_err(|error| error.to_string())?.is_empty();
        let home = match handed_out_here {
            true => own.clone(),
            false => match store.remote_user_home(user).map_err(|error| error.to_string())? {
                Some(home) => home,
                None => continue,
            },
        };
        if home == *authority || (!homes.contains_key(&home) && homes.len() == RECIPIENT_HOME_DOMAINS_MAX) {
            continue;
        }
        homes.entry(home).or_default().push(user);
    }
    Ok(homes.into_iter().map(|(home, users)| RecipientHomes { home, users }).collect())
}

/// Authority side (pure): the (user, home) pairs of `named` worth noting
/// for a commit whose Welcome goes to `recipients`: users among them, each
/// once (the first naming), and homes that are peers of `own` not refused
/// (never `own`). Reads at most [`RECIPIENT_HOME_DOMAINS_MAX`] homes.
pub fn named_recipient_homes(
    named: &[RecipientHomes],
    recipients: &[u64],
    own: &DomainName,
    peers: &PeerTable,
    refused: &RefusedDomains,
) -> Vec<(UserId, DomainName)> {
    let mut unnamed: HashSet<u64> = recipients.iter().copied().collect();
    let mut pairs = Vec::new();
    for group in named.iter().take(RECIPIENT_HOME_DOMAINS_MAX) {
        if group.home == *own || refused.contains(&group.home) || !peers.contains_key(&group.home) {
            continue;
        }
        for user in &group.users {
            if unnamed.remove(user) {
                pairs.push((*user, group.home.clone()));
            }
        }
    }
    pairs
}

/// Authority side (blocks on storage, reads only): the pairs of `pairs`
/// whose users this server knows nothing of — no home recorded (a claim
/// through the user's home), no key package stocked or handed out here
/// (its own user).
pub fn users_unknown_here(
    store: &dyn Store,
    pairs: Vec<(UserId, DomainName)>,
) -> Result<Vec<(UserId, DomainName)>, String> {
    let mut unknown = Vec::new();
    for (user, home) in pairs {
        let failed = |error: &dyn std::fmt::Display| error.to_string();
        if store.remote_user_home(user).map_err(|e| failed(&e))?.is_some() {
            continue;
        }
        let stock = store.count_key_packages(user).map_err(|e| failed(&e))?;
        if stock.ordinary > 0 || stock.has_last_resort {
            continue;
        }
        if !store.handed_out_claims(user).map_err(|e| failed(&e))?.is_empty() {
            continue;
        }
        unknown.push((user, home));
    }
    Ok(unknown)
}

/// One remote connection's commits whose recipient homes wait for the
/// commit's answer, by room and request id (at most
/// [`RECIPIENT_HOMES_PENDING_PER_CONNECTION_MAX`]; the oldest goes).
#[derive(Debug, Default)]
pub struct PendingHomes {
    waiting: VecDeque<HeldHomes>,
}

/// The recipient homes of one commit, waiting for its answer.
#[derive(Debug)]
struct HeldHomes {
    room_id: RoomId,
    request_id: u32,
    named_by: DomainName,
    pairs: Vec<(UserId, DomainName)>,
}

/// The homes a domain named for an acknowledged commit's recipients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnsweredHomes {
    /// The commit's room.
    pub room_id: RoomId,
    /// The domain that relayed it and named them.
    pub named_by: DomainName,
    /// The recipients and their named homes.
    pub pairs: Vec<(UserId, DomainName)>,
}

impl PendingHomes {
    /// Holds `pairs`, named by `named_by`, until the answer to request
    /// `request_id` in `room_id`.
    pub fn hold(
        &mut self,
        room_id: RoomId,
        request_id: u32,
        named_by: DomainName,
        pairs: Vec<(UserId, DomainName)>,
    ) {
        self.waiting.retain(|held| (held.room_id, held.request_id) != (room_id, request_id));
        if self.waiting.len() == RECIPIENT_HOMES_PENDING_PER_CONNECTION_MAX {
            self.waiting.pop_front();
        }
        self.waiting.push_back(HeldHomes { room_id, request_id, named_by, pairs });
        assert!(self.waiting.len() <= RECIPIENT_HOMES_PENDING_PER_CONNECTION_MAX);
    }

    /// Whether no commit's homes are held.
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// The homes to keep when `frame` acknowledges a held commit; an error
    /// answering one forgets it.
    pub fn answered(&mut self, frame: &Frame) -> Option<AnsweredHomes> {
        if self.waiting.is_empty() || !matches!(frame.opcode(), Opcode::Ack | Opcode::Error) {
            return None;
        }
        let key = (frame.header().room_id(), frame.header().request_id());
        let position = self.waiting.iter().position(|held| (held.room_id, held.request_id) == key)?;
        let held = self.waiting.remove(position)?;
        let HeldHomes { room_id, named_by, pairs, .. } = held;
        (frame.opcode() == Opcode::Ack).then_some(AnsweredHomes { room_id, named_by, pairs })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use kalandra_proto::federation::{PeerKey, PeerKeys};
    use kalandra_proto::payload::Ack;
    use kalandra_proto::ErrorCode;

    use super::*;
    use crate::store::{KeyPackageUpload, MemoryStore};

    fn domain(name: &str) -> DomainName {
        DomainName::parse(name).unwrap()
    }

    fn peers(names: &[&str]) -> PeerTable {
        let key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]).verifying_key();
        names
            .iter()
            .map(|name| {
                let keys = PeerKeys::new(domain(name), vec![PeerKey { key, valid_until_ms: None }]).unwrap();
                (domain(name), keys)
            })
            .collect()
    }

    fn group(home: &str, users: &[u64]) -> RecipientHomes {
        RecipientHomes { home: domain(home), users: users.to_vec() }
    }

    #[test]
    fn the_home_names_its_own_users_and_those_it_claimed_elsewhere_not_the_authoritys() {
        let store = MemoryStore::new();
        // 1 and 2 had packages claimed here; 3 was claimed through c, 4
        // through a (the authority); 5 is unknown.
        store.record_handed_out_claims(&[(1, vec![1; 32]), (2, vec![2; 32])], 1_000).unwrap();
        store.record_remote_user(3, &domain("c.test")).unwrap();
        store.record_remote_user(4, &domain("a.test")).unwrap();
        let homes =
            recipient_homes_of(&store, &domain("b.test"), &domain("a.test"), &[1, 2, 3, 4, 5]).unwrap();
        assert_eq!(homes, vec![group("b.test", &[1, 2]), group("c.test", &[3])]);
    }

    #[test]
    fn the_authority_keeps_only_recipients_of_the_commit_at_homes_that_are_peers() {
        let (own, refused) = (domain("a.test"), RefusedDomains::from([domain("r.test")]));
        let peers = peers(&["b.test", "c.test", "r.test"]);
        let named = [
            group("b.test", &[1, 2, 99]),
            group("a.test", &[3]),
            group("r.test", &[4]),
            group("x.test", &[5]),
            group("c.test", &[1, 6]),
        ];
        let pairs = named_recipient_homes(&named, &[1, 2, 3, 4, 5, 6], &own, &peers, &refused);
        let expected = vec![(1, domain("b.test")), (2, domain("b.test")), (6, domain("c.test"))];
        assert_eq!(pairs, expected, "99 is no recipient; a, r and x not peers to note; 1 named once");
        let many: Vec<RecipientHomes> =
            (0..=RECIPIENT_HOME_DOMAINS_MAX as u64).map(|n| group("b.test", &[n])).collect();
        let recipients: Vec<u64> = (0..=RECIPIENT_HOME_DOMAINS_MAX as u64).collect();
        let pairs = named_recipient_homes(&many, &recipients, &own, &peers, &refused);
        assert_eq!(pairs.len(), RECIPIENT_HOME_DOMAINS_MAX, "no more groups are read");
    }

    #[test]
    fn a_named_home_counts_only_for_users_with_no_recorded_home_that_are_not_local() {
        let store = Arc::new(MemoryStore::new());
        let (b, c) = (domain("b.test"), domain("c.test"));
        store.record_remote_user(1, &c).unwrap();
        store.record_handed_out_claims(&[(2, vec![2; 32])], 1_000).unwrap();
        let package =
            KeyPackageUpload { key_package_ref: vec![3; 32], key_package: Bytes::from_static(b"kp") };
        store.put_key_packages(3, &[package], None).unwrap();
        let pairs = [(1, b.clone()), (2, b.clone()), (3, b.clone()), (4, b.clone())];
        let unknown = users_unknown_here(store.as_ref(), pairs.to_vec()).unwrap();
        // 1 has a recorded home, 2 had a package handed out here, 3 has one stocked.
        assert_eq!(unknown, vec![(4, b)]);
        assert_eq!(store.remote_user_home(1).unwrap(), Some(c), "a recorded home stays");
        assert_eq!(store.remote_user_home(4).unwrap(), None, "a naming is never recorded");
    }

    fn answer(opcode: Opcode, room_id: RoomId, request_id: u32) -> Frame {
        let bytes = match opcode {
            Opcode::Ack => {
                let ack =
                    Ack { log_index: 1, epoch: 1, server_time_ms: 1, log_head: None, signed_head: None };
                crate::room::server_frame(room_id, request_id, &ack).unwrap()
            }
            _ => crate::room::error_frame(room_id, request_id, ErrorCode::Forbidden, "refused"),
        };
        Frame::decode(&bytes).unwrap()
    }

    #[test]
    fn held_homes_are_released_by_the_commits_ack_and_forgotten_on_its_error() {
        let (room, other) = (RoomId([1; 16]), RoomId([2; 16]));
        let (b, pairs) = (domain("b.test"), vec![(7, domain("b.test"))]);
        let answered = AnsweredHomes { room_id: room, named_by: b.clone(), pairs: pairs.clone() };
        let mut pending = PendingHomes::default();
        pending.hold(room, 5, b.clone(), pairs.clone());
        pending.hold(room, 6, b.clone(), pairs.clone());
        assert_eq!(pending.answered(&answer(Opcode::Ack, other, 5)), None, "another room's request 5");
        assert_eq!(pending.answered(&answer(Opcode::Ack, room, 5)), Some(answered.clone()));
        assert_eq!(pending.answered(&answer(Opcode::Ack, room, 5)), None, "released once");
        assert_eq!(pending.answered(&answer(Opcode::Error, room, 6)), None, "refused: forgotten");
        assert_eq!(pending.answered(&answer(Opcode::Ack, room, 6)), None);
        for request_id in 0..=u32::try_from(RECIPIENT_HOMES_PENDING_PER_CONNECTION_MAX).unwrap() {
            pending.hold(room, 100 + request_id, b.clone(), pairs.clone());
        }
        assert_eq!(pending.answered(&answer(Opcode::Ack, room, 100)), None, "the oldest went");
        assert_eq!(pending.answered(&answer(Opcode::Ack, room, 101)), Some(answered));
    }
}
