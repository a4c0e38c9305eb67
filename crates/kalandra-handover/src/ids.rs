//! Identifiers and counters: rooms, domains, generations, log positions, digests.

use std::fmt;

use sha2::{Digest as _, Sha256};

macro_rules! byte_id {
    ($(#[$doc:meta])* $name:ident, $len:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; $len]);

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}(", stringify!($name))?;
                for byte in &self.0[..4] {
                    write!(f, "{byte:02x}")?;
                }
                write!(f, "..)")
            }
        }
    };
}

byte_id!(
    /// A room, as in the frame header (16 bytes).
    RoomId,
    16
);
byte_id!(
    /// A federated domain: SHA-256 of its DNS name (see [`DomainId::from_name`]).
    DomainId,
    32
);
byte_id!(
    /// SHA-256 of a frame as its sender signed it (the server-assigned header
    /// fields zeroed): what the log's hash chain commits to.
    FrameDigest,
    32
);
byte_id!(
    /// The head of a room log's hash chain after some entry (see [`crate::chain`]).
    ChainHead,
    32
);
byte_id!(
    /// A digest of server-side room state (the MLS public group state, or
    /// the room policy: roles, bans, retention, erased indices).
    StateDigest,
    32
);

impl DomainId {
    /// The identifier of the domain with this DNS name.
    pub fn from_name(name: &str) -> DomainId {
        let mut hasher = Sha256::new();
        hasher.update(b"kalandra-domain-v1\0");
        hasher.update(name.as_bytes());
        DomainId(hasher.finalize().into())
    }
}

impl FrameDigest {
    /// The digest of a frame's signed bytes.
    pub fn of(signed_frame: &[u8]) -> FrameDigest {
        let mut hasher = Sha256::new();
        hasher.update(b"kalandra-frame-v1\0");
        hasher.update(signed_frame);
        FrameDigest(hasher.finalize().into())
    }
}

impl StateDigest {
    /// The digest of a canonical encoding of some room state, under a label
    /// naming what it is.
    pub fn of(label: &[u8], encoded_state: &[u8]) -> StateDigest {
        let mut hasher = Sha256::new();
        hasher.update(b"kalandra-state-v1\0");
        hasher.update(u64::try_from(label.len()).unwrap_or(u64::MAX).to_be_bytes());
        hasher.update(label);
        hasher.update(encoded_state);
        StateDigest(hasher.finalize().into())
    }
}

macro_rules! counter {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub u64);

        impl $name {
            /// The next value, or `None` at the end of the range.
            pub fn next(self) -> Option<$name> {
                self.0.checked_add(1).map($name)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{}"), self.0)
            }
        }
    };
}

counter!(
    /// An authority generation of a room: 0 at creation, one more with every
    /// authority record (a handover certificate or a resume record).
    Generation,
    "g"
);
counter!(
    /// A position in a room's log, dense from 0 (the `CreateRoom` frame).
    LogIndex,
    "#"
);
counter!(
    /// An MLS epoch.
    Epoch,
    "e"
);
