//! Identifiers carried in the frame header.

use sha2::{Digest, Sha256};

use crate::limits::PUBLIC_KEY_BYTES;

/// A room's 16-byte identifier (also its MLS group id).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct RoomId(pub [u8; 16]);

impl std::fmt::Debug for RoomId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RoomId(")?;
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        write!(f, ")")
    }
}

impl std::fmt::Display for RoomId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

/// A sender's 8-byte identifier, derived from its Ed25519 identity key with
/// [`SenderId::from_identity_key`]. The server binds each connection to one.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Debug)]
pub struct SenderId(pub u64);

/// Domain separation prefix for [`SenderId::from_identity_key`].
pub const SENDER_ID_DERIVATION_LABEL: &[u8] = b"kalandra-sender-id-v1";

impl SenderId {
    /// The sender id of an identity key: the first 8 bytes, big-endian, of
    /// `SHA-256("kalandra-sender-id-v1" || identity_key)`.
    pub fn from_identity_key(identity_key: &[u8; PUBLIC_KEY_BYTES]) -> SenderId {
        let mut hasher = Sha256::new();
        hasher.update(SENDER_ID_DERIVATION_LABEL);
        hasher.update(identity_key);
        let digest = hasher.finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        SenderId(u64::from_be_bytes(first))
    }
}

impl std::fmt::Display for SenderId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}
