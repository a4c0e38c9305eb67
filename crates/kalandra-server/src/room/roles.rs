//! Room roles and who may moderate whom (pure).
//!
//! A room's creator is its admin, for the life of the room. Admins grant
//! and revoke the moderator role. Admins and moderators kick, ban and unban
//! members who hold no role; only an admin acts on a moderator; nobody
//! acts on the admin except the operator (the admin API), and nobody on
//! themselves. The operator may do everything.

use std::collections::HashMap;

use kalandra_proto::SenderId;

pub use kalandra_mls::{PolicyError, Proposer, Role, RoomPolicy};

/// Most users holding a role in one room (the admin excepted).
pub const ROLES_PER_ROOM_MAX: usize = 1_000;

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
    /// Remove (if a member) and refuse their return for `duration_ms`
    /// (`None`: until lifted).
    Ban {
        /// How long the ban lasts, from the room's time when it is decided.
        duration_ms: Option<u64>,
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
            two.authorize(Actor::Member(MODERATOR), OTHER, &Act::Ban { duration_ms: None }),
            Err(ModerationError::Forbidden(_))
        ));
        assert_eq!(kick(Actor::Member(MODERATOR), MODERATOR), Err(ModerationError::SelfTarget));
        assert_eq!(kick(Actor::Operator, ADMIN), Ok(()));
    }
}
