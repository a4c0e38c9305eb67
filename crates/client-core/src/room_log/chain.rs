//! The room log's hash chain as this device applies it
//! ([`kalandra_proto::chain`]), and the server's signed heads checked
//! against it.
//!
//! The device extends the chain with every frame it applies (an erased
//! entry's placeholder contributes the erased frame's digest). It starts
//! at the genesis head for a room it created or reads from index 0, and
//! otherwise at the head the server stated where it joined (the Welcome's
//! `log_head`, the acknowledgement of its external commit); a device
//! restored from a record written before the chain adopts the first
//! signed head at its cursor. Every server-signed head (in an `Ack` or a
//! `SyncDone`) is verified with the server's key (the room's MLS external
//! sender) and compared with the device's own head at that index, now or
//! once the device has applied that far. A signed head that does not match
//! the frames the device applied, or two signed heads for one index, is a
//! [`ChainViolation`]: kept in the room's record (the first one) and
//! reported, never silently dropped.

use kalandra_proto::chain::{log_entry_digest, LogChain, LogHead, SignedLogHead};
use kalandra_proto::{Frame, RoomId};
use serde::{Deserialize, Serialize};

/// Signed heads kept after they were checked (to catch a second,
/// different one for the same index).
pub const SIGNED_HEADS_KEPT_MAX: usize = 16;
/// Signed heads kept for indices the device has not applied yet.
pub const SIGNED_HEADS_PENDING_MAX: usize = 16;

const _: () = assert!(SIGNED_HEADS_KEPT_MAX >= 1 && SIGNED_HEADS_PENDING_MAX >= 1);

/// Proof that the server showed this device a log it cannot stand behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChainViolation {
    /// Two heads the server signed for the same index differ.
    Equivocation {
        /// One signed head.
        first: SignedLogHead,
        /// Another for the same index.
        second: SignedLogHead,
    },
    /// A head the server signed is not the head of the frames this device
    /// applied up to that index.
    Mismatch {
        /// What the server signed.
        signed: SignedLogHead,
        /// The head of the frames the device applied.
        applied: LogHead,
    },
}

impl std::fmt::Display for ChainViolation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChainViolation::Equivocation { first, .. } => {
                write!(f, "the server signed two different heads for log index {}", first.log_index)
            }
            ChainViolation::Mismatch { signed, .. } => write!(
                f,
                "the server's signed head at log index {} is not the head of the frames applied",
                signed.log_index
            ),
        }
    }
}

/// Why a signed head was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogHeadError {
    /// The signature does not verify under the room's server key.
    #[error("room {room_id}: a log head whose signature does not verify")]
    BadSignature {
        /// The room.
        room_id: RoomId,
    },
    /// The room's group lists no usable server key (external sender).
    #[error("room {0}: no server key to check a log head with")]
    NoServerKey(RoomId),
    /// The server equivocated or lied about the log (the proof is kept).
    #[error("room {room_id}: {violation}")]
    Violation {
        /// The room.
        room_id: RoomId,
        /// The proof.
        violation: Box<ChainViolation>,
    },
}

/// What a room's record keeps of the chain.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ChainRecord {
    /// The chain through the last applied frame; `None` until anchored.
    pub(crate) chain: Option<LogChain>,
    /// Signed heads checked against the chain, most recent last.
    pub(crate) checked: Vec<SignedLogHead>,
    /// Signed heads (signature verified) at indices not yet applied.
    pub(crate) pending: Vec<SignedLogHead>,
    /// The first violation found.
    pub(crate) violation: Option<ChainViolation>,
}

impl ChainRecord {
    /// A chain that starts after `log_index`, whose head the server stated.
    pub(crate) fn anchored(log_index: u64, head: Option<LogHead>) -> ChainRecord {
        ChainRecord { chain: head.map(|head| LogChain::anchored(log_index, head)), ..ChainRecord::default() }
    }

    /// Extends the chain with the frame applied at its next index; checks
    /// the signed heads that were waiting for it. Without an anchor, a
    /// signed head waiting for this index becomes it.
    pub(crate) fn applied(&mut self, room_id: RoomId, frame: &Frame) -> Result<(), Box<ChainViolation>> {
        let log_index = frame.header().log_index();
        let due: Vec<SignedLogHead> =
            self.pending.iter().filter(|s| s.log_index == log_index).copied().collect();
        self.pending.retain(|s| s.log_index > log_index);
        match self.chain.as_mut() {
            Some(chain) if chain.next_log_index == log_index => {
                chain.extend(room_id, &log_entry_digest(frame));
            }
            // Not contiguous with what the chain holds: it restarts at the
            // next signed head.
            Some(_) => self.chain = None,
            None => {}
        }
        if self.chain.is_none() {
            if let Some(anchor) = due.first() {
                self.chain = Some(LogChain::anchored(anchor.log_index, anchor.head));
            }
        }
        due.into_iter().try_for_each(|signed| self.compare(signed))
    }

    /// Takes a signed head whose signature was verified; `next_log_index`
    /// is the device's cursor.
    pub(crate) fn signed(
        &mut self,
        signed: SignedLogHead,
        next_log_index: u64,
    ) -> Result<(), Box<ChainViolation>> {
        if let Some(first) =
            self.checked.iter().chain(&self.pending).find(|s| s.log_index == signed.log_index)
        {
            if first.head != signed.head {
                return self.violated(ChainViolation::Equivocation { first: *first, second: signed });
            }
            return Ok(());
        }
        if signed.log_index >= next_log_index {
            if self.pending.len() == SIGNED_HEADS_PENDING_MAX {
                self.pending.remove(0);
            }
            self.pending.push(signed);
            return Ok(());
        }
        match self.chain {
            // Not anchored and at the cursor: the signed head is the anchor.
            None if signed.log_index.checked_add(1) == Some(next_log_index) => {
                self.chain = Some(LogChain::anchored(signed.log_index, signed.head));
                self.keep_checked(signed);
                Ok(())
            }
            Some(chain) if chain.last_log_index() == Some(signed.log_index) => self.compare(signed),
            // Behind the chain's end, or no chain: nothing to compare with.
            _ => Ok(()),
        }
    }

    /// Without an anchor, the head the server stated at `log_index` (the
    /// device's last applied index) becomes it.
    pub(crate) fn anchor_if_unknown(&mut self, log_index: u64, head: LogHead, next_log_index: u64) {
        if self.chain.is_none() && log_index.checked_add(1) == Some(next_log_index) {
            self.chain = Some(LogChain::anchored(log_index, head));
        }
    }

    fn compare(&mut self, signed: SignedLogHead) -> Result<(), Box<ChainViolation>> {
        let applied = self.chain.map(|chain| chain.head);
        match applied {
            Some(applied) if applied != signed.head => {
                self.violated(ChainViolation::Mismatch { signed, applied })
            }
            _ => {
                self.keep_checked(signed);
                Ok(())
            }
        }
    }

    fn keep_checked(&mut self, signed: SignedLogHead) {
        if self.checked.len() == SIGNED_HEADS_KEPT_MAX {
            self.checked.remove(0);
        }
        self.checked.push(signed);
    }

    fn violated(&mut self, violation: ChainViolation) -> Result<(), Box<ChainViolation>> {
        self.violation.get_or_insert(violation);
        Err(Box::new(violation))
    }

    /// The latest signed head that matched the frames applied.
    pub(crate) fn latest_checked(&self) -> Option<SignedLogHead> {
        self.checked.iter().max_by_key(|s| s.log_index).copied()
    }
}
