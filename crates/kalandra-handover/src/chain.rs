//! The hash chain over a room's log.
//!
//! ```text
//! head(-1) = SHA-256("kalandra-log-chain-v1" || 0x00 || room_id)
//! head(k)  = SHA-256("kalandra-log-chain-v1" || 0x01 || head(k-1) || k (u64) || generation (u64)
//!                    || server_timestamp_ms (u64) || frame_digest)
//! ```
//!
//! Every integer is big-endian. The chain binds each entry's position, the
//! authority generation that sequenced it, the server time it was stamped
//! with and the frame itself, so two logs with the same head at `k` agree
//! on everything up to `k`.

use sha2::{Digest as _, Sha256};

use crate::ids::{ChainHead, FrameDigest, Generation, LogIndex, RoomId};

const CHAIN_LABEL: &[u8] = b"kalandra-log-chain-v1";

/// The head before the first entry of a room's log.
pub fn chain_start(room: RoomId) -> ChainHead {
    let mut hasher = Sha256::new();
    hasher.update(CHAIN_LABEL);
    hasher.update([0x00]);
    hasher.update(room.0);
    ChainHead(hasher.finalize().into())
}

/// The head after appending one entry to a log whose head was `previous`.
pub fn chain_extend(
    previous: ChainHead,
    index: LogIndex,
    generation: Generation,
    timestamp_ms: u64,
    frame: FrameDigest,
) -> ChainHead {
    let mut hasher = Sha256::new();
    hasher.update(CHAIN_LABEL);
    hasher.update([0x01]);
    hasher.update(previous.0);
    hasher.update(index.0.to_be_bytes());
    hasher.update(generation.0.to_be_bytes());
    hasher.update(timestamp_ms.to_be_bytes());
    hasher.update(frame.0);
    ChainHead(hasher.finalize().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_changes_the_head() {
        let start = chain_start(RoomId([1; 16]));
        let frame = FrameDigest::of(b"frame");
        let base = chain_extend(start, LogIndex(3), Generation(1), 10, frame);
        assert_ne!(start, chain_start(RoomId([2; 16])));
        assert_ne!(base, chain_extend(chain_start(RoomId([2; 16])), LogIndex(3), Generation(1), 10, frame));
        assert_ne!(base, chain_extend(start, LogIndex(4), Generation(1), 10, frame));
        assert_ne!(base, chain_extend(start, LogIndex(3), Generation(2), 10, frame));
        assert_ne!(base, chain_extend(start, LogIndex(3), Generation(1), 11, frame));
        assert_ne!(base, chain_extend(start, LogIndex(3), Generation(1), 10, FrameDigest::of(b"other")));
        assert_eq!(base, chain_extend(start, LogIndex(3), Generation(1), 10, frame));
    }
}
