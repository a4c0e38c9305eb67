//! Room roles and who may moderate whom (pure).
//!
//! A room's creator is its admin, for the life of the room. Admins grant
//! and revoke the moderator role. Admins and moderators kick, ban and unban
//! members who hold no role; only an admin acts on a moderator; nobody
//! acts on the admin except the operator (the admin API), and nobody on
//! themselves. The operator may do everything.

use std::collections::HashMap;

use kalandra_proto::payload::JoinRule;
use kalandra_proto::SenderId;

/// Most users holding a role in one room (the admin excepted).
pub const ROLES_PER_ROOM_MAX: usize = 1_000;

/// A role in a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The room's creator: grants and revokes the moderator role, moderates.
    Admin,
    /// Kicks, bans and unbans members without a role.
    Moderator,
}

impl Role {
    /// The role's name in the wire protocol, the admin API and the audit log.
    pub const fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Moderator => "moderator",
        }
    }

    /// The role with this name.
    pub fn parse(name: &str) -> Option<Role> {
        match name {
            "admin" => Some(Role::Admin),
            "moderator" => Some(Role::Moderator),
            _ => None,
        }
    }

    /// The stored code of the role.
    pub const fn code(self) -> u8 {
        match self {
            Role::Admin => 1,
            Role::Moderator => 2,
        }
    }

    /// The role a stored code stands for.
    pub const fn from_code(code: u8) -> Option<Role> {
        match code {
            1 => Some(Role::Admin),
            2 => Some(Role::Moderator),
            _ => None,
        }
    }
}

/// Who asks for a moderation act.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Actor {
    /// The operator, through the admin API: may do everything.
    Operator,
    /// A member, over the wire protocol.
    Member(SenderId),
}

/// A moderation act on one user of one room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Act {
    /// Remove a member.
    Kick,
    /// Remove (if a member) and refuse their return until `until_ms` (`None`: until lifted).
    Ban {
        /// When the ban ends, ms since the Unix epoch.
        until_ms: Option<u64>,
    },
    /// Lift a ban.
    Unban,
    /// Grant a role.
    Grant(Role),
    /// Revoke a role.
    Revoke(Role),
}

/// Why a moderation act was refused. Each has a stable code in the admin
/// API and a wire error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModerationError {
    /// The actor lacks the role the act needs.
    #[error("{0}")]
    Forbidden(&'static str),
    /// The act targets the actor itself.
    #[error("moderators cannot act on themselves; leave the room instead")]
    SelfTarget,
    /// The role cannot be granted or revoked this way.
    #[error("the admin role belongs to the room's creator and is not granted or revoked")]
    AdminRoleFixed,
    /// The target already holds the role.
    #[error("the user already holds this role")]
    RoleHeld,
    /// The target does not hold the role.
    #[error("the user does not hold this role")]
    RoleNotHeld,
    /// Limit: too many users hold a role in the room.
    #[error("{ROLES_PER_ROOM_MAX} users hold a role in this room, the limit")]
    TooManyRoles,
}

/// The roles of one room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomRoles {
    creator: SenderId,
    granted: HashMap<SenderId, Role>,
}

impl RoomRoles {
    /// The roles of a room created by `creator`, with `granted` roles.
    pub fn new(creator: SenderId, granted: impl IntoIterator<Item = (SenderId, Role)>) -> RoomRoles {
        let granted = granted.into_iter().filter(|(user, _)| *user != creator).collect();
        RoomRoles { creator, granted }
    }

    /// The room's creator (its admin).
    pub fn creator(&self) -> SenderId {
        self.creator
    }

    /// The role `user` holds, if any.
    pub fn role_of(&self, user: SenderId) -> Option<Role> {
        if user == self.creator {
            Some(Role::Admin)
        } else {
            self.granted.get(&user).copied()
        }
    }

    /// Every user with a role, the creator first, then by sender id.
    pub fn all(&self) -> Vec<(SenderId, Role)> {
        let mut granted: Vec<(SenderId, Role)> = self.granted.iter().map(|(u, r)| (*u, *r)).collect();
        granted.sort_by_key(|(user, _)| user.0);
        let mut all = vec![(self.creator, Role::Admin)];
        all.extend(granted);
        all
    }

    /// Whether `actor` may perform `act` on `target`; role changes are also
    /// checked against the current roles.
    pub fn authorize(&self, actor: Actor, target: SenderId, act: &Act) -> Result<(), ModerationError> {
        match act {
            Act::Grant(role) | Act::Revoke(role) => {
                if *role == Role::Admin {
                    return Err(ModerationError::AdminRoleFixed);
                }
                if target == self.creator {
                    return Err(ModerationError::AdminRoleFixed);
                }
                if let Actor::Member(member) = actor {
                    if self.role_of(member) != Some(Role::Admin) {
                        return Err(ModerationError::Forbidden(
                            "only the room's admin grants and revokes roles",
                        ));
                    }
                }
                let held = self.role_of(target) == Some(*role);
                match act {
                    Act::Grant(_) if held => Err(ModerationError::RoleHeld),
                    Act::Grant(_) if self.granted.len() >= ROLES_PER_ROOM_MAX => {
                        Err(ModerationError::TooManyRoles)
                    }
                    Act::Revoke(_) if !held => Err(ModerationError::RoleNotHeld),
                    _ => Ok(()),
                }
            }
            Act::Kick | Act::Ban { .. } | Act::Unban => {
                let Actor::Member(member) = actor else { return Ok(()) };
                if member == target {
                    return Err(ModerationError::SelfTarget);
                }
                match (self.role_of(member), self.role_of(target)) {
                    (None, _) => Err(ModerationError::Forbidden("the moderator role is required")),
                    (Some(_), Some(Role::Admin)) => Err(ModerationError::Forbidden(
                        "the room's admin can only be acted on by the operator",
                    )),
                    (Some(Role::Moderator), Some(Role::Moderator)) => {
                        Err(ModerationError::Forbidden("only the admin acts on a moderator"))
                    }
                    (Some(_), _) => Ok(()),
                }
            }
        }
    }

    /// Applies an authorized role change.
    pub fn apply(&mut self, target: SenderId, act: &Act) {
        match act {
            Act::Grant(role) => {
                self.granted.insert(target, *role);
            }
            Act::Revoke(_) => {
                self.granted.remove(&target);
            }
            Act::Kick | Act::Ban { .. } | Act::Unban => {}
        }
        assert!(self.granted.len() <= ROLES_PER_ROOM_MAX, "roles per room are bounded");
        assert!(!self.granted.contains_key(&self.creator), "the creator's role is fixed");
    }
}

/// A room's policy for MLS handshakes: who may propose what in a commit or
/// a proposal, and who may join by external commit. Fixed at creation (the
/// creator is the admin; the join rule comes from `CreateRoom`), so that
/// every member can check it from the room's first log entry; moderators
/// act through the server (a kick or ban becomes a server proposal), not
/// by removing members with their own commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoomPolicy {
    /// The room's admin (its creator).
    pub admin: SenderId,
    /// Who may join by external commit.
    pub join_rule: JoinRule,
}

/// Who proposes a change inside a commit or a proposal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proposer {
    /// The server, as the room's external sender (a kick, ban or operator act
    /// the moderation rules already authorized).
    Server,
    /// A member.
    Member(SenderId),
    /// The joiner of an external commit.
    Joiner(SenderId),
}

/// Why the room's policy refused a proposal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// A member removes the admin.
    #[error("only the admin (or the operator) removes the admin")]
    RemovesAdmin,
    /// A member other than the admin removes someone else.
    #[error("only the admin removes other members by commit; moderators kick through the server")]
    RemovesOther,
    /// An external commit removes a leaf that is not the joiner's own.
    #[error("an external commit may remove only the joiner's own earlier leaf")]
    JoinerRemovesOther,
    /// The room does not admit external joins by this user.
    #[error("the room is invite-only")]
    InviteOnly,
    /// The proposal type is not allowed in Kalandra rooms.
    #[error("proposal type {0} is not allowed in this room")]
    ProposalType(&'static str),
    /// An Update proposal or a commit's update path gives a member's leaf
    /// another signature key or credential: another identity (sender ids
    /// derive from the key), which an update may not do.
    #[error("an update may not change a member's signature key or credential")]
    IdentityChange,
}

impl RoomPolicy {
    /// The policy of a room created by `creator` with `join_rule`.
    pub fn new(creator: SenderId, join_rule: JoinRule) -> RoomPolicy {
        RoomPolicy { admin: creator, join_rule }
    }

    /// Whether `proposer` may add a member: any member, the server never
    /// (an external commit cannot add in MLS).
    pub fn may_add(&self, proposer: Proposer) -> Result<(), PolicyError> {
        match proposer {
            Proposer::Member(_) => Ok(()),
            Proposer::Server | Proposer::Joiner(_) => Err(PolicyError::ProposalType("add by a non-member")),
        }
    }

    /// Whether `proposer` may remove `target`: anyone removes itself (a
    /// member by a Remove proposal of its own leaf, which another member
    /// commits); the server removes anyone; the admin removes anyone; nobody
    /// else removes the admin or another member; a joiner removes only its
    /// own earlier leaf.
    pub fn may_remove(&self, proposer: Proposer, target: SenderId) -> Result<(), PolicyError> {
        match proposer {
            Proposer::Server => Ok(()),
            Proposer::Joiner(joiner) if joiner == target => Ok(()),
            Proposer::Joiner(_) => Err(PolicyError::JoinerRemovesOther),
            Proposer::Member(member) if member == target || member == self.admin => Ok(()),
            Proposer::Member(_) if target == self.admin => Err(PolicyError::RemovesAdmin),
            Proposer::Member(_) => Err(PolicyError::RemovesOther),
        }
    }

    /// Whether `joiner` may join by external commit: in an open room
    /// anyone not banned (the caller checks bans), in an invite-only room
    /// only a current member replacing its own leaf (a device that lost
    /// its state).
    pub fn may_join_externally(&self, is_member: bool) -> Result<(), PolicyError> {
        if is_member || self.join_rule == JoinRule::Open {
            Ok(())
        } else {
            Err(PolicyError::InviteOnly)
        }
    }

    /// Whether a user may read the room's GroupInfo and ratchet tree (every
    /// member's identity key): members, and in an open room whoever may join.
    pub fn may_read_group_info(&self, is_member: bool, is_banned: bool) -> bool {
        !is_banned && (is_member || self.join_rule == JoinRule::Open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADMIN: SenderId = SenderId(1);
    const MODERATOR: SenderId = SenderId(2);
    const MEMBER: SenderId = SenderId(3);
    const OTHER: SenderId = SenderId(4);

    fn roles() -> RoomRoles {
        RoomRoles::new(ADMIN, [(MODERATOR, Role::Moderator)])
    }

    #[test]
    fn the_creator_is_admin_and_grants_and_revokes_the_moderator_role() {
        let mut roles = roles();
        assert_eq!(roles.role_of(ADMIN), Some(Role::Admin));
        assert_eq!(roles.role_of(MEMBER), None);
        roles.authorize(Actor::Member(ADMIN), MEMBER, &Act::Grant(Role::Moderator)).unwrap();
        roles.apply(MEMBER, &Act::Grant(Role::Moderator));
        assert_eq!(roles.role_of(MEMBER), Some(Role::Moderator));
        assert_eq!(
            roles.authorize(Actor::Member(ADMIN), MEMBER, &Act::Grant(Role::Moderator)),
            Err(ModerationError::RoleHeld)
        );
        roles.authorize(Actor::Member(ADMIN), MEMBER, &Act::Revoke(Role::Moderator)).unwrap();
        roles.apply(MEMBER, &Act::Revoke(Role::Moderator));
        assert_eq!(
            roles.authorize(Actor::Operator, MEMBER, &Act::Revoke(Role::Moderator)),
            Err(ModerationError::RoleNotHeld)
        );
        assert_eq!(roles.all(), vec![(ADMIN, Role::Admin), (MODERATOR, Role::Moderator)]);
    }

    #[test]
    fn moderators_cannot_grant_and_the_admin_role_is_fixed() {
        let roles = roles();
        assert!(matches!(
            roles.authorize(Actor::Member(MODERATOR), MEMBER, &Act::Grant(Role::Moderator)),
            Err(ModerationError::Forbidden(_))
        ));
        assert_eq!(
            roles.authorize(Actor::Operator, MEMBER, &Act::Grant(Role::Admin)),
            Err(ModerationError::AdminRoleFixed)
        );
        assert_eq!(
            roles.authorize(Actor::Operator, ADMIN, &Act::Revoke(Role::Moderator)),
            Err(ModerationError::AdminRoleFixed)
        );
    }

    #[test]
    fn who_may_kick_whom() {
        let roles = roles();
        let kick = |actor, target| roles.authorize(actor, target, &Act::Kick);
        assert_eq!(kick(Actor::Member(ADMIN), MODERATOR), Ok(()));
        assert_eq!(kick(Actor::Member(MODERATOR), MEMBER), Ok(()));
        assert!(matches!(kick(Actor::Member(MEMBER), OTHER), Err(ModerationError::Forbidden(_))));
        assert!(matches!(kick(Actor::Member(MODERATOR), ADMIN), Err(ModerationError::Forbidden(_))));
        let mut two = roles.clone();
        two.apply(OTHER, &Act::Grant(Role::Moderator));
        assert!(matches!(
            two.authorize(Actor::Member(MODERATOR), OTHER, &Act::Ban { until_ms: None }),
            Err(ModerationError::Forbidden(_))
        ));
        assert_eq!(kick(Actor::Member(MODERATOR), MODERATOR), Err(ModerationError::SelfTarget));
        assert_eq!(kick(Actor::Operator, ADMIN), Ok(()));
    }

    #[test]
    fn role_codes_and_names_round_trip() {
        for role in [Role::Admin, Role::Moderator] {
            assert_eq!(Role::from_code(role.code()), Some(role));
            assert_eq!(Role::parse(role.as_str()), Some(role));
        }
        assert_eq!(Role::from_code(0), None);
        assert_eq!(Role::parse("owner"), None);
    }

    #[test]
    fn who_may_remove_whom_by_commit() {
        let policy = RoomPolicy::new(ADMIN, JoinRule::InviteOnly);
        assert_eq!(policy.may_remove(Proposer::Member(MEMBER), MEMBER), Ok(()), "leave");
        assert_eq!(policy.may_remove(Proposer::Member(ADMIN), MEMBER), Ok(()));
        assert_eq!(policy.may_remove(Proposer::Member(ADMIN), ADMIN), Ok(()));
        assert_eq!(policy.may_remove(Proposer::Server, ADMIN), Ok(()), "the operator");
        assert_eq!(policy.may_remove(Proposer::Member(MEMBER), ADMIN), Err(PolicyError::RemovesAdmin));
        assert_eq!(policy.may_remove(Proposer::Member(MODERATOR), ADMIN), Err(PolicyError::RemovesAdmin));
        assert_eq!(policy.may_remove(Proposer::Member(MEMBER), OTHER), Err(PolicyError::RemovesOther));
        assert_eq!(policy.may_remove(Proposer::Joiner(OTHER), OTHER), Ok(()));
        assert_eq!(policy.may_remove(Proposer::Joiner(OTHER), ADMIN), Err(PolicyError::JoinerRemovesOther));
        assert_eq!(policy.may_add(Proposer::Member(MEMBER)), Ok(()));
        assert!(policy.may_add(Proposer::Server).is_err());
    }

    #[test]
    fn join_rules_decide_external_joins_and_group_info_reads() {
        let invite = RoomPolicy::new(ADMIN, JoinRule::InviteOnly);
        let open = RoomPolicy::new(ADMIN, JoinRule::Open);
        assert_eq!(invite.may_join_externally(false), Err(PolicyError::InviteOnly));
        assert_eq!(invite.may_join_externally(true), Ok(()));
        assert_eq!(open.may_join_externally(false), Ok(()));
        assert!(!invite.may_read_group_info(false, false));
        assert!(invite.may_read_group_info(true, false));
        assert!(open.may_read_group_info(false, false));
        assert!(!open.may_read_group_info(false, true), "banned users read nothing");
        assert!(!invite.may_read_group_info(true, true));
    }
}
