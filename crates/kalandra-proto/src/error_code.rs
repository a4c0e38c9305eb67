//! Stable numeric error codes shared by server and clients.

macro_rules! error_codes {
    ($( $(#[$doc:meta])* $name:ident = $value:literal, $class:ident; )*) => {
        /// A stable error code carried in an `Error` frame. Values never change meaning.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(u16)]
        pub enum ErrorCode {
            $( $(#[$doc])* $name = $value, )*
        }

        impl ErrorCode {
            /// Every defined code, in numeric order.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$name,)*];

            /// The code for a wire value, if defined. Receivers must treat an
            /// unknown code by its class: the thousands digit (see [`ErrorClass::of_value`]).
            pub const fn from_u16(value: u16) -> Option<ErrorCode> {
                match value {
                    $( $value => Some(ErrorCode::$name), )*
                    _ => None,
                }
            }

            /// Who is at fault.
            pub const fn class(self) -> ErrorClass {
                match self {
                    $( ErrorCode::$name => ErrorClass::$class, )*
                }
            }

            /// The code's name as used in the specification.
            pub const fn name(self) -> &'static str {
                match self {
                    $( ErrorCode::$name => stringify!($name), )*
                }
            }
        }
    };
}

/// Who caused an error, and what the connection does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// 1xxx: the peer broke the protocol; the connection is closed after the Error frame.
    Protocol,
    /// 2xxx: the request was well-formed but cannot be done; the connection stays open.
    Request,
    /// 3xxx: a limit was exceeded; retry later (see `retry_after_ms`); the connection stays open.
    Limit,
    /// 5xxx: the server failed; the request may be retried.
    Server,
}

impl ErrorClass {
    /// The class of any wire value by its thousands digit, or `None` outside the defined classes.
    pub const fn of_value(value: u16) -> Option<ErrorClass> {
        match value / 1000 {
            1 => Some(ErrorClass::Protocol),
            2 => Some(ErrorClass::Request),
            3 => Some(ErrorClass::Limit),
            5 => Some(ErrorClass::Server),
            _ => None,
        }
    }
}

error_codes! {
    /// The header is invalid (bad magic, reserved bits, flag/opcode mismatch).
    MalformedHeader = 1000, Protocol;
    /// The protocol version is not supported.
    UnsupportedVersion = 1001, Protocol;
    /// The opcode is unknown or reserved.
    UnknownOpcode = 1002, Protocol;
    /// The payload exceeds its limit.
    PayloadTooLarge = 1003, Protocol;
    /// The payload does not decode or violates a payload limit.
    MalformedPayload = 1004, Protocol;
    /// The signature is missing or does not verify.
    BadSignature = 1005, Protocol;
    /// The header's sender id is not the authenticated identity's.
    SenderMismatch = 1006, Protocol;
    /// A frame other than the handshake arrived before authentication.
    NotAuthenticated = 1007, Protocol;
    /// The authentication response did not verify.
    AuthenticationFailed = 1008, Protocol;
    /// The frame is not valid in this direction or state (e.g. a client sent an Ack).
    UnexpectedFrame = 1009, Protocol;

    /// The room does not exist.
    UnknownRoom = 2000, Request;
    /// The sender is not a member of the room.
    NotMember = 2001, Request;
    /// The frame is for another epoch; `current_epoch` and `log_index` say where the room is.
    WrongEpoch = 2002, Request;
    /// The MLS commit failed validation.
    InvalidCommit = 2003, Request;
    /// The MLS proposal failed validation.
    InvalidProposal = 2004, Request;
    /// A room with this id exists.
    RoomExists = 2005, Request;
    /// The MLS GroupInfo or ratchet tree is invalid.
    InvalidGroupInfo = 2006, Request;
    /// Server-issued proposals are pending: application messages wait, and the next commit must cover them.
    PendingProposals = 2007, Request;
    /// The user is banned from the room.
    Banned = 2008, Request;
    /// The sender lacks the role the request needs.
    Forbidden = 2009, Request;
    /// The requested frame's content was destroyed.
    Redacted = 2010, Request;
    /// The log index does not exist (yet).
    UnknownLogIndex = 2011, Request;
    /// The key-package upload is invalid.
    InvalidKeyPackage = 2012, Request;
    /// A `CommitReport` names no commit that can be reported (beyond the head, not a commit, or another epoch).
    NoSuchCommit = 2013, Request;
    /// A `CommitReport` names a settled commit (its report window is over, or a later commit was sequenced): rejoin.
    CommitSettled = 2014, Request;
    /// The request names a domain that is not a configured peer domain.
    UnknownDomain = 2015, Request;
    /// The peer domain refused the request, or answered with what does not verify (a user it does not speak for).
    FederationRefused = 2016, Request;

    /// Too many frames: the token bucket is empty.
    RateLimited = 3000, Limit;
    /// The user is in too many rooms.
    TooManyRooms = 3001, Limit;
    /// Too many connections from this address.
    TooManyConnections = 3002, Limit;
    /// The reader fell behind its send queue; resubscribe from `log_index`.
    ResyncRequired = 3003, Limit;
    /// Too many stored items (key packages, pending welcomes) for this user.
    QuotaExceeded = 3004, Limit;
    /// A commit's Welcome with the room's ratchet tree would exceed the Welcome payload limit.
    WelcomeTooLarge = 3005, Limit;

    /// An internal error.
    Internal = 5000, Server;
    /// Storage failed; nothing was acknowledged.
    StorageUnavailable = 5001, Server;
    /// The server is shutting down.
    ShuttingDown = 5002, Server;
    /// The peer domain cannot be reached now (no link up, or no answer in time); retry later.
    DomainUnreachable = 5003, Server;
}

impl ErrorCode {
    /// The wire value.
    pub const fn to_u16(self) -> u16 {
        self as u16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_match_their_class_digit() {
        for &code in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_u16(code.to_u16()), Some(code));
            assert_eq!(ErrorClass::of_value(code.to_u16()), Some(code.class()), "{code:?}");
        }
        assert_eq!(ErrorCode::from_u16(0), None);
        assert_eq!(ErrorClass::of_value(4000), None);
    }
}
