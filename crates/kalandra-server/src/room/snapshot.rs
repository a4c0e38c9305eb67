//! Room snapshots: what a restart needs besides the log.

use bytes::Bytes;
use kalandra_proto::chain::{LogHead, LOG_HEAD_BYTES};

use crate::room::sequencer::{PendingServerProposals, ProposalRef};

/// What a room snapshot holds besides the log: the MLS group state, the
/// GroupInfo current with it, where the current epoch began, and the
/// server-issued proposals pending at that point.
///
/// Layout: `"KRS3" | log_head (32) | group_len: u32 BE | group | epoch_started_at_log_index:
/// u64 BE | pending_count: u16 BE | (ref_len: u8 | ref) * pending_count |
/// pending_since_log_index: u64 BE | pending_since_ms: u64 BE |
/// group_info_epoch: u64 BE | group_info`, where `log_head` is the log's
/// hash-chain head at the snapshot's last index. Snapshots written before
/// the chain have the magic `"KRS2"` and no head (recovery recomputes it
/// from the log); before pending proposals were kept they lack the magic
/// and the pending part (and hold none).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct RoomSnapshot<'a> {
    pub(crate) group: &'a [u8],
    pub(crate) epoch_started_at_log_index: u64,
    pub(crate) group_info: (u64, Bytes),
    pub(crate) server_proposals: PendingServerProposals,
    /// The log's head at the snapshot's last index (`None` in snapshots
    /// written before the chain).
    pub(crate) log_head: Option<LogHead>,
}

const ROOM_SNAPSHOT_MAGIC: &[u8; 4] = b"KRS3";
const ROOM_SNAPSHOT_MAGIC_UNCHAINED: &[u8; 4] = b"KRS2";
// The snapshot counts pending server proposals in a u16.
const _: () = assert!(crate::room::sequencer::SERVER_PROPOSALS_PENDING_MAX <= u16::MAX as usize);

impl<'a> RoomSnapshot<'a> {
    /// The encoded snapshot; `None` when a part does not fit its length
    /// field (a group state of 4 GiB, a reference longer than 255 bytes):
    /// the room is then not snapshotted and recovers from its log.
    pub(crate) fn encode(&self) -> Option<Bytes> {
        let refs = &self.server_proposals.refs;
        let mut out = Vec::with_capacity(
            4 + 4
                + self.group.len()
                + 8
                + 2
                + refs.iter().map(|r| 1 + r.0.len()).sum::<usize>()
                + 32
                + LOG_HEAD_BYTES
                + self.group_info.1.len(),
        );
        out.extend_from_slice(ROOM_SNAPSHOT_MAGIC);
        out.extend_from_slice(&self.log_head?);
        out.extend_from_slice(&u32::try_from(self.group.len()).ok()?.to_be_bytes());
        out.extend_from_slice(self.group);
        out.extend_from_slice(&self.epoch_started_at_log_index.to_be_bytes());
        let count = u16::try_from(refs.len()).ok()?;
        out.extend_from_slice(&count.to_be_bytes());
        for reference in refs {
            out.push(u8::try_from(reference.0.len()).ok()?);
            out.extend_from_slice(&reference.0);
        }
        let (since_log_index, since_ms) = self.server_proposals.since.unwrap_or((u64::MAX, u64::MAX));
        out.extend_from_slice(&since_log_index.to_be_bytes());
        out.extend_from_slice(&since_ms.to_be_bytes());
        out.extend_from_slice(&self.group_info.0.to_be_bytes());
        out.extend_from_slice(&self.group_info.1);
        Some(Bytes::from(out))
    }

    /// The parts of an encoded snapshot, or `None` if it is malformed.
    pub(crate) fn decode(snapshot: &'a [u8]) -> Option<RoomSnapshot<'a>> {
        let (current, log_head, snapshot) = if let Some(rest) = snapshot.strip_prefix(ROOM_SNAPSHOT_MAGIC) {
            let (head, rest) = rest.split_first_chunk::<LOG_HEAD_BYTES>()?;
            (true, Some(*head), rest)
        } else if let Some(rest) = snapshot.strip_prefix(ROOM_SNAPSHOT_MAGIC_UNCHAINED) {
            (true, None, rest)
        } else {
            (false, None, snapshot)
        };
        let (len, rest) = snapshot.split_first_chunk::<4>()?;
        let len = usize::try_from(u32::from_be_bytes(*len)).ok()?;
        if rest.len() < len {
            return None;
        }
        let (group, rest) = rest.split_at(len);
        let (epoch_started, mut rest) = rest.split_first_chunk::<8>()?;
        let mut server_proposals = PendingServerProposals::default();
        if current {
            let (count, mut pending) = rest.split_first_chunk::<2>()?;
            for _ in 0..u16::from_be_bytes(*count) {
                let (len, tail) = pending.split_first()?;
                if tail.len() < usize::from(*len) {
                    return None;
                }
                let (reference, tail) = tail.split_at(usize::from(*len));
                server_proposals.refs.push(ProposalRef(reference.to_vec()));
                pending = tail;
            }
            let (since_log_index, tail) = pending.split_first_chunk::<8>()?;
            let (since_ms, tail) = tail.split_first_chunk::<8>()?;
            if !server_proposals.refs.is_empty() {
                server_proposals.since =
                    Some((u64::from_be_bytes(*since_log_index), u64::from_be_bytes(*since_ms)));
            }
            rest = tail;
        }
        let (epoch, group_info) = rest.split_first_chunk::<8>()?;
        Some(RoomSnapshot {
            group,
            epoch_started_at_log_index: u64::from_be_bytes(*epoch_started),
            group_info: (u64::from_be_bytes(*epoch), Bytes::copy_from_slice(group_info)),
            server_proposals,
            log_head,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_snapshots_carry_pending_server_proposals() {
        let snapshot = RoomSnapshot {
            group: b"group state",
            epoch_started_at_log_index: 7,
            group_info: (3, Bytes::from_static(b"group info")),
            server_proposals: PendingServerProposals {
                refs: vec![ProposalRef(vec![1; 32]), ProposalRef(vec![2; 32])],
                since: Some((9, 1_234)),
            },
            log_head: Some([6; 32]),
        };
        let encoded = snapshot.encode().unwrap();
        assert_eq!(RoomSnapshot::decode(&encoded), Some(snapshot));
        let none = RoomSnapshot {
            group: b"g",
            epoch_started_at_log_index: 0,
            group_info: (0, Bytes::new()),
            server_proposals: PendingServerProposals::default(),
            log_head: Some([0; 32]),
        };
        assert_eq!(RoomSnapshot::decode(&none.encode().unwrap()), Some(none));
        for cut in [5, 20, encoded.len() - 20] {
            let truncated = &encoded[..cut];
            assert!(RoomSnapshot::decode(truncated).is_none_or(|decoded| decoded.group_info.1.len() < 10));
        }
    }

    #[test]
    fn snapshots_without_pending_proposals_still_decode() {
        // The layout before pending proposals were kept.
        let mut legacy = Vec::new();
        legacy.extend_from_slice(&5u32.to_be_bytes());
        legacy.extend_from_slice(b"group");
        legacy.extend_from_slice(&4u64.to_be_bytes());
        legacy.extend_from_slice(&2u64.to_be_bytes());
        legacy.extend_from_slice(b"info");
        let decoded = RoomSnapshot::decode(&legacy).unwrap();
        assert_eq!(decoded.group, b"group");
        assert_eq!(decoded.epoch_started_at_log_index, 4);
        assert_eq!(decoded.group_info, (2, Bytes::from_static(b"info")));
        assert_eq!(decoded.server_proposals, PendingServerProposals::default());
        assert_eq!(decoded.log_head, None);
    }

    /// A snapshot written before the chain (`KRS2`) decodes without a head.
    #[test]
    fn snapshots_before_the_chain_decode_without_a_head() {
        let snapshot = RoomSnapshot {
            group: b"group state",
            epoch_started_at_log_index: 7,
            group_info: (3, Bytes::from_static(b"group info")),
            server_proposals: PendingServerProposals::default(),
            log_head: Some([6; 32]),
        };
        let encoded = snapshot.encode().unwrap();
        let mut unchained = b"KRS2".to_vec();
        unchained.extend_from_slice(&encoded[4 + LOG_HEAD_BYTES..]);
        let decoded = RoomSnapshot::decode(&unchained).unwrap();
        assert_eq!(decoded.log_head, None);
        assert_eq!(RoomSnapshot { log_head: None, ..decoded }, RoomSnapshot { log_head: None, ..snapshot });
    }
}
