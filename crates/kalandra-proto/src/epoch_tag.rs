//! The tag of an epoch's instance: which of the epochs with one number a
//! message was sealed in. A `CommitVoided` returns a room to the epoch
//! before the voided commit, and a later commit begins an epoch of the
//! number the voided one had, with other secrets; a message sealed in the
//! undone one names the same epoch in its header but no member can open
//! it. The tag tells them apart: it hashes the epoch's confirmed
//! transcript hash (RFC 9420 §8.2), which differs for epochs two different
//! commits began and which the server knows from the group's public state.

use sha2::{Digest, Sha256};

use crate::limits::EPOCH_TAG_BYTES;
use crate::RoomId;

/// Domain separation of [`epoch_tag`].
const EPOCH_TAG_LABEL: &[u8] = b"kalandra-epoch-tag-v1";

/// The tag of `room_id`'s epoch `epoch` whose group context has
/// `confirmed_transcript_hash`: the first [`EPOCH_TAG_BYTES`] bytes of
/// SHA-256("kalandra-epoch-tag-v1" || room_id || epoch (u64, big-endian) ||
/// confirmed_transcript_hash).
pub fn epoch_tag(room_id: RoomId, epoch: u64, confirmed_transcript_hash: &[u8]) -> [u8; EPOCH_TAG_BYTES] {
    let mut hasher = Sha256::new();
    hasher.update(EPOCH_TAG_LABEL);
    hasher.update(room_id.0);
    hasher.update(epoch.to_be_bytes());
    hasher.update(confirmed_transcript_hash);
    let digest = hasher.finalize();
    let mut tag = [0u8; EPOCH_TAG_BYTES];
    tag.copy_from_slice(&digest[..EPOCH_TAG_BYTES]);
    tag
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_of_one_number_begun_by_different_commits_have_different_tags() {
        let room = RoomId([3; 16]);
        let tag = epoch_tag(room, 4, &[1; 32]);
        assert_eq!(tag, epoch_tag(room, 4, &[1; 32]));
        assert_ne!(tag, epoch_tag(room, 4, &[2; 32]), "another commit began it");
        assert_ne!(tag, epoch_tag(room, 5, &[1; 32]));
        assert_ne!(tag, epoch_tag(RoomId([4; 16]), 4, &[1; 32]));
        // Pinned (computed independently): integrators compute it with their own code.
        assert_eq!(tag, [0x4f, 0x80, 0x9a, 0x4a, 0x4b, 0xed, 0x06, 0x40]);
    }
}
