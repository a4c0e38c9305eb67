//! A room's most recent durable frames, kept in memory so that a
//! subscriber is handed over from history to live fan-out without a gap.
//! Bounded in frames and in bytes: a member posting the largest messages
//! cannot make a room hold more than [`RECENT_BYTES_PER_ROOM_MAX`].

use std::collections::VecDeque;

use bytes::Bytes;
use kalandra_proto::payload::Proposal;
use kalandra_proto::{Frame, Opcode, SenderId};

use super::limits::{RECENT_BYTES_PER_ROOM_MAX, RECENT_FRAMES_PER_ROOM_MAX};

/// The most recent durable frames of a room: (log index, encoded frame),
/// in log order. At most [`RECENT_FRAMES_PER_ROOM_MAX`] frames and
/// [`RECENT_BYTES_PER_ROOM_MAX`] bytes, except that the newest frame is
/// always kept.
#[derive(Debug, Default)]
pub struct RecentFrames {
    frames: VecDeque<(u64, Bytes)>,
    bytes: usize,
}

impl RecentFrames {
    /// Keeps `frame` (at `log_index`, after every frame kept), dropping the
    /// oldest frames beyond the bounds.
    pub fn push(&mut self, log_index: u64, frame: Bytes) {
        assert!(
            self.frames.back().is_none_or(|(last, _)| *last < log_index),
            "recent frames are kept in log order"
        );
        self.bytes += frame.len();
        self.frames.push_back((log_index, frame));
        while self.frames.len() > 1
            && (self.frames.len() > RECENT_FRAMES_PER_ROOM_MAX || self.bytes > RECENT_BYTES_PER_ROOM_MAX)
        {
            if let Some((_, dropped)) = self.frames.pop_front() {
                self.bytes -= dropped.len();
            }
        }
    }

    /// The index of the oldest frame kept.
    pub fn oldest_log_index(&self) -> Option<u64> {
        self.frames.front().map(|(index, _)| *index)
    }

    /// The frames kept from `log_index` on, in log order.
    pub fn from(&self, log_index: u64) -> impl Iterator<Item = &(u64, Bytes)> {
        self.frames.iter().filter(move |(index, _)| *index >= log_index)
    }

    /// Replaces the frame at each of `log_indices` that is kept by what
    /// `replace` makes of it.
    pub fn replace(&mut self, log_indices: &[u64], replace: impl Fn(u64, &Bytes) -> Bytes) {
        for (index, frame) in self.frames.iter_mut().filter(|(index, _)| log_indices.contains(index)) {
            let replaced = replace(*index, frame);
            self.bytes = self.bytes - frame.len() + replaced.len();
            *frame = replaced;
        }
    }

    /// Where `sender`'s `Proposal` frame of `epoch` carrying exactly
    /// `proposal` (MLS bytes) is kept: its log index and server time. Read
    /// newest first, down to the first frame of an older epoch (a pending
    /// proposal is of the room's current epoch).
    pub fn proposal_of(&self, sender: SenderId, epoch: u64, proposal: &[u8]) -> Option<(u64, u64)> {
        for (log_index, bytes) in self.frames.iter().rev() {
            let Ok(frame) = Frame::decode(bytes) else { continue };
            let header = frame.header();
            if header.epoch() < epoch {
                return None;
            }
            if frame.opcode() != Opcode::Proposal || header.sender_id() != sender || header.epoch() != epoch {
                continue;
            }
            let Ok(kept) = frame.decode_payload::<Proposal>() else { continue };
            if kept.proposal == proposal {
                return Some((*log_index, header.server_timestamp_ms()));
            }
        }
        None
    }

    /// Frames kept.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.frames.len()
    }

    /// Bytes of the frames kept.
    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use kalandra_proto::payload::Application;
    use kalandra_proto::{FrameHeaderBuf, Payload};

    use super::*;

    fn frame<P: Payload>(sender: u64, epoch: u64, log_index: u64, payload: &P) -> Bytes {
        let mut header = FrameHeaderBuf::new(P::OPCODE);
        header.set_sender_id(SenderId(sender)).set_epoch(epoch).set_log_index(log_index);
        header.set_server_timestamp_ms(1_000 + log_index);
        Frame::with_payload(header, payload).unwrap().to_bytes()
    }

    #[test]
    fn a_kept_proposal_is_found_by_sender_epoch_and_bytes() {
        let proposal = |bytes: &[u8]| Proposal { proposal: bytes.to_vec() };
        let mut recent = RecentFrames::default();
        recent.push(0, frame(5, 1, 0, &proposal(b"leave")));
        recent.push(1, frame(5, 2, 1, &proposal(b"leave")));
        recent.push(2, frame(6, 2, 2, &proposal(b"update")));
        let message = Application {
            generation: 0,
            ciphertext: Bytes::from_static(b"leave"),
            push: None,
            epoch_tag: None,
        };
        recent.push(3, frame(5, 2, 3, &message));
        assert_eq!(recent.proposal_of(SenderId(5), 2, b"leave"), Some((1, 1_001)));
        assert_eq!(recent.proposal_of(SenderId(5), 1, b"leave"), Some((0, 1_000)), "older epochs too");
        assert_eq!(recent.proposal_of(SenderId(6), 2, b"leave"), None, "another sender's");
        assert_eq!(recent.proposal_of(SenderId(5), 2, b"update"), None, "other bytes");
        assert_eq!(recent.proposal_of(SenderId(5), 3, b"leave"), None, "not of that epoch");
    }

    #[test]
    fn recent_frames_are_bounded_in_bytes_as_well_as_in_count() {
        let mut recent = RecentFrames::default();
        let large = Bytes::from(vec![0; 256 * 1024]);
        for index in 0..1_024 {
            recent.push(index, large.clone());
        }
        assert!(recent.bytes() <= RECENT_BYTES_PER_ROOM_MAX, "{} bytes kept", recent.bytes());
        assert_eq!(recent.len(), RECENT_BYTES_PER_ROOM_MAX / large.len());
        assert_eq!(recent.oldest_log_index(), Some(1_024 - recent.len() as u64));
        // Small frames: the count bounds them.
        let mut small = RecentFrames::default();
        for index in 0..5_000 {
            small.push(index, Bytes::from_static(b"frame"));
        }
        assert_eq!(small.len(), RECENT_FRAMES_PER_ROOM_MAX);
        assert_eq!(small.from(4_998).map(|(index, _)| *index).collect::<Vec<_>>(), vec![4_998, 4_999]);
        // A frame larger than the byte bound is kept alone, as the newest.
        let mut huge = RecentFrames::default();
        huge.push(0, Bytes::from_static(b"x"));
        huge.push(1, Bytes::from(vec![0; RECENT_BYTES_PER_ROOM_MAX + 1]));
        assert_eq!((huge.len(), huge.oldest_log_index()), (1, Some(1)));
        // Replacing a frame (an erasure's placeholder) keeps the byte count true.
        huge.replace(&[1], |_, _| Bytes::from_static(b"placeholder"));
        assert_eq!(huge.bytes(), b"placeholder".len());
    }
}
