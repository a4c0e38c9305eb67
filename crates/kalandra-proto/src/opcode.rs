//! Opcodes: what a frame is, and how large its payload may be.

use crate::limits::{
    APPLICATION_PAYLOAD_BYTES_MAX, CONTROL_PAYLOAD_BYTES_MAX, EPHEMERAL_PAYLOAD_BYTES_MAX, PAYLOAD_BYTES_MAX,
};

/// First opcode of the range reserved for federation between domains.
pub const FEDERATION_OPCODE_FIRST: u16 = 0x1000;
/// Last opcode of the range reserved for federation between domains.
pub const FEDERATION_OPCODE_LAST: u16 = 0x1FFF;
/// First opcode of the range reserved for room-authority handover.
pub const HANDOVER_OPCODE_FIRST: u16 = 0x2000;
/// Last opcode of the range reserved for room-authority handover.
pub const HANDOVER_OPCODE_LAST: u16 = 0x2FFF;

const _: () = assert!(FEDERATION_OPCODE_LAST < HANDOVER_OPCODE_FIRST);

/// How the server treats frames of an opcode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpcodeClass {
    /// Session control between one client and its server; never sequenced.
    Control,
    /// Sequenced into a room's log and fanned out to its members.
    Sequenced,
    /// Fanned out to a room's connected members, never stored.
    Ephemeral,
    /// A request to the key-package / GroupInfo directory, or its reply.
    Directory,
    /// A moderation request; the server turns it into sequenced frames.
    Moderation,
}

macro_rules! opcodes {
    ($( $(#[$doc:meta])* $name:ident = $value:literal, $class:ident, $max:expr; )*) => {
        /// A frame's opcode (header bytes 6..8).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(u16)]
        pub enum Opcode {
            $( $(#[$doc])* $name = $value, )*
        }

        impl Opcode {
            /// Every defined opcode, in numeric order.
            pub const ALL: &'static [Opcode] = &[$(Opcode::$name,)*];

            /// The opcode for a wire value, if it is defined.
            #[inline]
            pub const fn from_u16(value: u16) -> Option<Opcode> {
                match value {
                    $( $value => Some(Opcode::$name), )*
                    _ => None,
                }
            }

            /// Largest payload a frame of this opcode may carry, in bytes.
            #[inline]
            pub const fn payload_bytes_max(self) -> u32 {
                match self {
                    $( Opcode::$name => $max, )*
                }
            }

            /// How the server treats frames of this opcode.
            #[inline]
            pub const fn class(self) -> OpcodeClass {
                match self {
                    $( Opcode::$name => OpcodeClass::$class, )*
                }
            }

            /// The opcode's name as used in the specification.
            pub const fn name(self) -> &'static str {
                match self {
                    $( Opcode::$name => stringify!($name), )*
                }
            }
        }
    };
}

opcodes! {
    // 0x0001..0x00FF: session.
    /// Client → server: first frame of a connection; offers versions and the identity key.
    Hello = 0x0001, Control, CONTROL_PAYLOAD_BYTES_MAX;
    /// Server → client: nonce to sign, and the selected version.
    AuthChallenge = 0x0002, Control, CONTROL_PAYLOAD_BYTES_MAX;
    /// Client → server: signature over the challenge.
    AuthResponse = 0x0003, Control, CONTROL_PAYLOAD_BYTES_MAX;
    /// Server → client: the connection is bound to the identity.
    AuthOk = 0x0004, Control, CONTROL_PAYLOAD_BYTES_MAX;
    /// Either direction: a request failed, or the connection is about to close.
    Error = 0x0005, Control, CONTROL_PAYLOAD_BYTES_MAX;
    /// Either direction: liveness probe.
    Ping = 0x0006, Control, CONTROL_PAYLOAD_BYTES_MAX;
    /// Either direction: answer to a ping.
    Pong = 0x0007, Control, CONTROL_PAYLOAD_BYTES_MAX;
    /// Either direction: orderly close.
    Goodbye = 0x0008, Control, CONTROL_PAYLOAD_BYTES_MAX;

    // 0x0100..0x01FF: rooms and their logs.
    /// Client → server: stream a room's log from an index, then live frames.
    Subscribe = 0x0100, Control, CONTROL_PAYLOAD_BYTES_MAX;
    /// Client → server: stop streaming a room.
    Unsubscribe = 0x0101, Control, CONTROL_PAYLOAD_BYTES_MAX;
    /// Client → server: send a bounded range of a room's log once.
    Sync = 0x0102, Control, CONTROL_PAYLOAD_BYTES_MAX;
    /// Server → client: the history part of a subscribe or sync is complete.
    SyncDone = 0x0103, Control, CONTROL_PAYLOAD_BYTES_MAX;
    /// Client → server: create a room from the creator's GroupInfo and ratchet tree.
    CreateRoom = 0x0104, Sequenced, PAYLOAD_BYTES_MAX;
    /// Member → server: a sequenced commit this member cannot process (see `docs/RECOVERY.md`).
    CommitReport = 0x0105, Control, CONTROL_PAYLOAD_BYTES_MAX;
    /// Sequenced: an MLS commit (PublicMessage) with optional Welcome and GroupInfo.
    Commit = 0x0110, Sequenced, PAYLOAD_BYTES_MAX;
    /// Sequenced: an MLS proposal (PublicMessage), by reference.
    Proposal = 0x0111, Sequenced, PAYLOAD_BYTES_MAX;
    /// Sequenced: an application message encrypted with the sender's key.
    Application = 0x0112, Sequenced, APPLICATION_PAYLOAD_BYTES_MAX;
    /// Sequenced: an external commit by a joiner who is not yet a member.
    ExternalJoin = 0x0113, Sequenced, PAYLOAD_BYTES_MAX;
    /// Server → client: a Welcome addressed to this client.
    Welcome = 0x0114, Control, PAYLOAD_BYTES_MAX;
    /// Sequenced by the server: a reported commit is void; the room is back in its epoch.
    CommitVoided = 0x0115, Sequenced, APPLICATION_PAYLOAD_BYTES_MAX;
    /// Server → client: acknowledgement of a sequenced frame or a request.
    Ack = 0x0120, Control, CONTROL_PAYLOAD_BYTES_MAX;

    // 0x0200..0x02FF: directory.
    /// Client → server: upload key packages (and a last-resort one).
    KeyPackageUpload = 0x0200, Directory, PAYLOAD_BYTES_MAX;
    /// Server → client: how many key packages the server holds for the caller.
    KeyPackageStatus = 0x0201, Directory, CONTROL_PAYLOAD_BYTES_MAX;
    /// Client → server: claim key packages of a user.
    KeyPackageClaim = 0x0202, Directory, CONTROL_PAYLOAD_BYTES_MAX;
    /// Server → client: the claimed key packages.
    KeyPackageClaimed = 0x0203, Directory, PAYLOAD_BYTES_MAX;
    /// Client → server: fetch a room's GroupInfo for an external join.
    GroupInfoRequest = 0x0204, Directory, CONTROL_PAYLOAD_BYTES_MAX;
    /// Server → client: a room's current GroupInfo and ratchet tree.
    GroupInfo = 0x0205, Directory, PAYLOAD_BYTES_MAX;
    /// Client → server: the federation keys the server accepts for some domains.
    DomainKeysRequest = 0x0206, Directory, CONTROL_PAYLOAD_BYTES_MAX;
    /// Server → client: those keys.
    DomainKeys = 0x0207, Directory, CONTROL_PAYLOAD_BYTES_MAX;

    // 0x0300..0x03FF: moderation.
    /// Moderator → server: remove a member (becomes a server-issued Remove proposal).
    Kick = 0x0300, Moderation, CONTROL_PAYLOAD_BYTES_MAX;
    /// Moderator → server: remove a member and refuse their return.
    Ban = 0x0301, Moderation, CONTROL_PAYLOAD_BYTES_MAX;
    /// Sender or moderator → server: destroy a stored frame's content.
    Redact = 0x0302, Moderation, CONTROL_PAYLOAD_BYTES_MAX;
    /// Moderator → server: lift a ban.
    Unban = 0x0303, Moderation, CONTROL_PAYLOAD_BYTES_MAX;
    /// Room admin → server: grant or revoke a member's role.
    SetRole = 0x0304, Moderation, CONTROL_PAYLOAD_BYTES_MAX;

    // 0x0400..0x04FF: ephemeral, never stored.
    /// Ephemeral: typing indicator.
    Typing = 0x0400, Ephemeral, EPHEMERAL_PAYLOAD_BYTES_MAX;
    /// Ephemeral: presence status.
    Presence = 0x0401, Ephemeral, EPHEMERAL_PAYLOAD_BYTES_MAX;
}

impl Opcode {
    /// The opcode's wire value.
    #[inline]
    pub const fn to_u16(self) -> u16 {
        self as u16
    }
}

/// Whether a wire value falls in a range reserved for a later protocol part
/// (federation or authority handover).
#[inline]
pub const fn is_reserved_opcode(value: u16) -> bool {
    (value >= FEDERATION_OPCODE_FIRST && value <= FEDERATION_OPCODE_LAST)
        || (value >= HANDOVER_OPCODE_FIRST && value <= HANDOVER_OPCODE_LAST)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_opcode_round_trips_and_none_is_reserved() {
        let mut previous = 0u16;
        for &op in Opcode::ALL {
            assert_eq!(Opcode::from_u16(op.to_u16()), Some(op));
            assert!(!is_reserved_opcode(op.to_u16()), "{op:?} in a reserved range");
            assert!(op.to_u16() > previous, "opcodes listed in numeric order");
            assert!(op.payload_bytes_max() <= PAYLOAD_BYTES_MAX);
            previous = op.to_u16();
        }
        assert_eq!(Opcode::from_u16(0), None);
        assert!(is_reserved_opcode(0x1000) && is_reserved_opcode(0x2FFF));
        assert!(!is_reserved_opcode(0x3000) && !is_reserved_opcode(0x0FFF));
    }
}
