//! Kalandra's MLS policy: what server and client must agree on to accept
//! the same handshakes. No I/O, no async, no state beyond its arguments.
//!
//! - [`CIPHERSUITE`]: the only ciphersuite of Kalandra rooms;
//! - [`credential_matches_key`]: a leaf's credential is a BasicCredential
//!   whose identity is the leaf's Ed25519 signature key;
//! - [`sender_of`]: the wire protocol's sender id of a credential identity;
//! - [`ALLOWED_PROPOSAL_TYPES`]: the proposal types rooms admit;
//! - [`Role`] and [`RoomPolicy`]: who may add and remove whom in a commit or
//!   proposal and who may join by external commit, decided from the room's
//!   creator and join rule alone;
//! - [`HOME_CERTIFICATE_EXTENSION_TYPE`], [`home_certificate_extension`] and
//!   [`leaf_home_certificate`]: the member's home certificate in its leaf
//!   (`docs/wire-protocol.md` §10, "Members' home certificates").
#![forbid(unsafe_code)]

use kalandra_proto::federation::HomeCertificate;
use kalandra_proto::home::HomeCertificateDecodeError;
use kalandra_proto::SenderId;
use openmls::prelude::{
    BasicCredential, Ciphersuite, Extension, ExtensionType, LeafNode, ProposalType, UnknownExtension,
};

/// The leaf-node extension that carries a member's home certificate (a
/// private-use type, RFC 9420 §17.3).
pub const HOME_CERTIFICATE_EXTENSION_TYPE: u16 = 0xF0C1;

const _: () = assert!(HOME_CERTIFICATE_EXTENSION_TYPE >= 0xF000, "in the private-use range");

/// The extension type, as the capabilities of a leaf that carries it list it.
pub fn home_certificate_extension_type() -> ExtensionType {
    ExtensionType::Unknown(HOME_CERTIFICATE_EXTENSION_TYPE)
}

/// The leaf-node extension carrying `certificate`.
pub fn home_certificate_extension(certificate: &HomeCertificate) -> Extension {
    Extension::Unknown(HOME_CERTIFICATE_EXTENSION_TYPE, UnknownExtension(certificate.to_cbor()))
}

/// The home certificate a leaf carries: none, or one read (or not) from it.
pub type LeafHomeCertificate = Option<Result<HomeCertificate, HomeCertificateDecodeError>>;

/// The home certificate `leaf` carries, if it carries one.
pub fn leaf_home_certificate(leaf: &LeafNode) -> LeafHomeCertificate {
    leaf.extensions().iter().find_map(|extension| match extension {
        Extension::Unknown(HOME_CERTIFICATE_EXTENSION_TYPE, UnknownExtension(bytes)) => {
            Some(HomeCertificate::from_cbor(bytes))
        }
        _ => None,
    })
}

pub use kalandra_proto::payload::JoinRule;

/// The only ciphersuite Kalandra rooms use:
/// MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519 (0x0001).
pub const CIPHERSUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;

/// The proposal types a Kalandra room admits, in a commit or on their own.
/// Refused: `GroupContextExtensions` (the room's extensions, among them the
/// external senders, are fixed at creation), `PreSharedKey`, `ReInit`,
/// `AppAck` and custom types.
pub const ALLOWED_PROPOSAL_TYPES: [ProposalType; 4] =
    [ProposalType::Add, ProposalType::Update, ProposalType::Remove, ProposalType::ExternalInit];

/// Whether a room admits proposals of this type.
pub fn proposal_type_allowed(proposal_type: ProposalType) -> bool {
    ALLOWED_PROPOSAL_TYPES.contains(&proposal_type)
}

/// Kalandra's credential policy: a BasicCredential whose identity is the
/// leaf's Ed25519 signature key.
pub fn credential_matches_key(leaf: &LeafNode) -> bool {
    BasicCredential::try_from(leaf.credential().clone())
        .is_ok_and(|basic| basic.identity() == leaf.signature_key().as_slice())
}

/// The sender id of an MLS credential's identity (an Ed25519 public key);
/// `None` if it is not 32 bytes.
pub fn sender_of(identity: &[u8]) -> Option<SenderId> {
    let key: &[u8; 32] = identity.try_into().ok()?;
    Some(SenderId::from_identity_key(key))
}

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

    #[test]
    fn only_add_update_remove_and_external_init_are_allowed() {
        for allowed in
            [ProposalType::Add, ProposalType::Update, ProposalType::Remove, ProposalType::ExternalInit]
        {
            assert!(proposal_type_allowed(allowed), "{allowed:?}");
        }
        for refused in [
            ProposalType::GroupContextExtensions,
            ProposalType::PreSharedKey,
            ProposalType::Reinit,
            ProposalType::Custom(0xf000),
        ] {
            assert!(!proposal_type_allowed(refused), "{refused:?}");
        }
    }

    #[test]
    fn sender_ids_come_from_32_byte_identities_only() {
        let key = [7; 32];
        assert_eq!(sender_of(&key), Some(SenderId::from_identity_key(&key)));
        assert_eq!(sender_of(&key[..31]), None);
        assert_eq!(sender_of(&[7; 33]), None);
    }
}
