//! The home side of replicas as a pure state machine: which rooms this
//! server follows, how far each follow is, and what to do with what the
//! room's authority sends. Events go in (the link came up or went down,
//! frames arrived, the replica became durable, a signed head was
//! checked); messages to send and frames to take come out as data.
//! `ReplicaFollower` (in `replica.rs`) drives it over the QUIC links and
//! the node; the simulation drives the same code over its own links.
//!
//! A follow starts `CatchingUp` from the replica's head; it becomes `Live`
//! only once the replica holds durably everything before the authority's
//! `SyncDone` and the head the authority signed there matches the
//! replica's own chain; a live follow checks each later checkpoint (a
//! `SyncDone` the authority sends after each durable run) the same way; a
//! refusal or a head that does not hold makes it `Refused` until the link
//! comes up again. Members read a live replica,
//! and any replica while its authority is unreachable.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use kalandra_proto::chain::SignedLogHead;
use kalandra_proto::{payload, ErrorCode, Frame, Opcode, RoomId};
use serde_bytes::ByteBuf;

use crate::federation::handshake::LinkMessage;
use crate::room::{HeadCheck, HeadCheckError};

/// How far a replica here is with its authority.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Following {
    /// Asked to follow; catching up.
    CatchingUp,
    /// Caught up once and receiving live frames.
    Live,
    /// The authority refused the follow, or stated a head the replica
    /// does not hold (until the link comes up again).
    Refused,
}

/// One thing the authority's feed asks of the replica, in feed order.
#[derive(Debug)]
pub enum FeedItem {
    /// Frames of one room, in the authority's order, for its replica.
    Frames(RoomId, Vec<Frame>),
    /// The follow of a room sent everything before `next_log_index`.
    CaughtUp {
        /// The room.
        room_id: RoomId,
        /// The first index not in the history sent.
        next_log_index: u64,
        /// The head the authority signed at `next_log_index - 1`.
        log_head: Option<SignedLogHead>,
    },
    /// The feed fell behind: follow the room again from the replica's head.
    FollowAgain(RoomId),
    /// The authority erased an entry of the room: the replica erases its
    /// copy once it holds it durably.
    Erased {
        /// The room.
        room_id: RoomId,
        /// The erased entry.
        log_index: u64,
    },
    /// The authority refused to feed the room.
    Refused {
        /// The room.
        room_id: RoomId,
        /// The error code.
        code: u16,
        /// Its message.
        message: String,
    },
    /// A frame dropped, by the reason's metric label
    /// ([`crate::federation::codes`]).
    Dropped(&'static str),
}

/// What to do about a follow that caught up, given the replica's durable head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LiveStep {
    /// No follow of the room waits to go live.
    Idle,
    /// The replica is not durable through the caught-up index yet: ask again later.
    NotDurable,
    /// Check this head the authority signed, then report it with
    /// [`FollowState::head_checked`].
    CheckHead(SignedLogHead),
    /// The replica is live: its members read it.
    Live,
}

/// The replicas of one server and their follows.
#[derive(Debug, Default)]
pub struct FollowState {
    following: BTreeMap<RoomId, Following>,
    /// Rooms with a replica here.
    held: BTreeSet<RoomId>,
    /// Follows that caught up, waiting for the replica to be durable there.
    going_live: BTreeMap<RoomId, (u64, Option<SignedLogHead>)>,
}

impl FollowState {
    /// No replicas, no follows.
    pub fn new() -> FollowState {
        FollowState::default()
    }

    /// A replica of `room_id` is held here (recovered, or taken frames).
    pub fn note_held(&mut self, room_id: RoomId) {
        self.held.insert(room_id);
    }

    /// Whether a replica of `room_id` is held here.
    pub fn holds(&self, room_id: RoomId) -> bool {
        self.held.contains(&room_id)
    }

    /// How far the follow of `room_id` is (`None`: not followed).
    pub fn following(&self, room_id: RoomId) -> Option<Following> {
        self.following.get(&room_id).copied()
    }

    /// Whether this server's members read `room_id` here: a replica that
    /// is live, or any replica while its authority is unreachable.
    pub fn reads_here(&self, room_id: RoomId, authority_up: bool) -> bool {
        match self.following.get(&room_id) {
            Some(Following::Live) => true,
            _ => !authority_up && self.holds(room_id),
        }
    }

    /// Starts following `room_id` from `replica_next` (the replica's next
    /// index; `None`: no replica yet), with the replica's cursor of the
    /// authority's erasure journal: the message to send its authority.
    pub fn start(&mut self, room_id: RoomId, replica_next: Option<u64>, erasures_after: u64) -> LinkMessage {
        if replica_next.is_some() {
            self.held.insert(room_id);
        }
        self.following.insert(room_id, Following::CatchingUp);
        self.going_live.remove(&room_id);
        LinkMessage::Follow { room_id: room_id.0, from_log_index: replica_next.unwrap_or(0), erasures_after }
    }

    /// The follow message of `room_id` could not be sent: it is asked
    /// again when the link comes up.
    pub fn not_sent(&mut self, room_id: RoomId) {
        self.following.remove(&room_id);
        self.going_live.remove(&room_id);
    }

    /// The link with the authority of `rooms` went down: none of them is
    /// live (a refusal is asked again on the next link).
    pub fn link_down(&mut self, rooms: impl IntoIterator<Item = RoomId>) {
        for room_id in rooms {
            self.not_sent(room_id);
        }
    }

    /// Sorts what an authority sent in one `Replicate` message into what
    /// to do, in order; `ordered_by_sender` says whether a room is one the
    /// sender orders (frames of any other room are dropped).
    pub fn sort_feed(frames: Vec<ByteBuf>, ordered_by_sender: impl Fn(RoomId) -> bool) -> Vec<FeedItem> {
        let mut items = Vec::new();
        let mut batch: Vec<Frame> = Vec::new();
        for bytes in frames {
            let Ok(frame) = Frame::decode(&Bytes::from(bytes.into_vec())) else {
                items.push(FeedItem::Dropped("malformed_frame"));
                continue;
            };
            let room_id = frame.header().room_id();
            if !ordered_by_sender(room_id) {
                items.push(FeedItem::Dropped("foreign_room"));
                continue;
            }
            let notice = match frame.opcode() {
                Opcode::SyncDone => true,
                // The placeholder of an erased entry is the log's entry there.
                Opcode::Error => !is_erased_entry(&frame),
                _ => false,
            };
            if batch.first().is_some_and(|first| first.header().room_id() != room_id) || notice {
                flush(&mut items, &mut batch);
            }
            match frame.opcode() {
                Opcode::SyncDone => items.extend(caught_up(room_id, &frame)),
                Opcode::Error if notice => items.extend(refusal(room_id, &frame)),
                _ => batch.push(frame),
            }
        }
        flush(&mut items, &mut batch);
        items
    }

    /// The replica took a room's frames (`true`) or they did not apply
    /// (`false`: the room must be followed again from the replica's head).
    pub fn taken(&mut self, room_id: RoomId, applied: bool) {
        if applied {
            self.held.insert(room_id);
        }
    }

    /// The follow of `room_id` caught up at `next_log_index` (or, live,
    /// the authority sent a checkpoint: its signed head after a durable
    /// run). Returns whether a check must start: none was waiting for the
    /// room (one waiting takes the newest head instead).
    pub fn caught_up(
        &mut self,
        room_id: RoomId,
        next_log_index: u64,
        log_head: Option<SignedLogHead>,
    ) -> bool {
        match self.following.get(&room_id) {
            Some(Following::CatchingUp) => {}
            Some(Following::Live) if log_head.is_some() => {}
            _ => return false,
        }
        self.going_live.insert(room_id, (next_log_index, log_head)).is_none()
    }

    /// The authority refused to feed `room_id`.
    pub fn refused(&mut self, room_id: RoomId) {
        self.following.insert(room_id, Following::Refused);
        self.going_live.remove(&room_id);
    }

    /// How many of `rooms` are followed catching up, live, and refused
    /// (the order of [`crate::admin::metrics::REPLICA_STATES`]).
    pub fn counts(&self, rooms: impl IntoIterator<Item = RoomId>) -> [u64; 3] {
        let mut counts = [0u64; 3];
        for room_id in rooms {
            let slot = match self.following.get(&room_id) {
                Some(Following::CatchingUp) => 0,
                Some(Following::Live) => 1,
                Some(Following::Refused) => 2,
                None => continue,
            };
            counts[slot] += 1;
        }
        counts
    }

    /// Rooms whose follow caught up (or got a checkpoint) and waits for
    /// the replica to be durable there.
    pub fn going_live(&self) -> Vec<RoomId> {
        self.going_live.keys().copied().collect()
    }

    /// The replica of `room_id` is durable up to `durable_next`
    /// (exclusive; `None`: no replica of it here).
    pub fn durable(&mut self, room_id: RoomId, durable_next: Option<u64>) -> LiveStep {
        let Some(&(next_log_index, log_head)) = self.going_live.get(&room_id) else { return LiveStep::Idle };
        let Some(durable_next) = durable_next else {
            self.going_live.remove(&room_id);
            return LiveStep::Idle;
        };
        if durable_next < next_log_index {
            return LiveStep::NotDurable;
        }
        match log_head {
            Some(signed) => LiveStep::CheckHead(signed),
            None => self.go_live(room_id),
        }
    }

    /// The outcome of checking the head [`LiveStep::CheckHead`] named
    /// (`None`: no replica of the room here); its metric label
    /// ([`crate::federation::codes`]) and whether the replica went live.
    pub fn head_checked(
        &mut self,
        room_id: RoomId,
        outcome: Option<Result<HeadCheck, HeadCheckError>>,
    ) -> (Option<&'static str>, LiveStep) {
        match outcome {
            None => {
                self.going_live.remove(&room_id);
                (None, LiveStep::Idle)
            }
            Some(Ok(check)) => {
                let label = match check {
                    HeadCheck::Matched => "matched",
                    HeadCheck::NotComparable => "not_comparable",
                };
                (Some(label), self.go_live(room_id))
            }
            Some(Err(error)) => {
                self.refused(room_id);
                let label = match error {
                    HeadCheckError::Equivocation { .. } => "equivocation",
                    HeadCheckError::BadSignature { .. } => "bad_signature",
                    HeadCheckError::NoAuthorityKey => "no_authority_key",
                };
                (Some(label), LiveStep::Idle)
            }
        }
    }

    fn go_live(&mut self, room_id: RoomId) -> LiveStep {
        self.going_live.remove(&room_id);
        if self.following.get(&room_id) == Some(&Following::CatchingUp) {
            self.following.insert(room_id, Following::Live);
            LiveStep::Live
        } else {
            LiveStep::Idle
        }
    }
}

fn flush(items: &mut Vec<FeedItem>, batch: &mut Vec<Frame>) {
    if let Some(room_id) = batch.first().map(|frame| frame.header().room_id()) {
        items.push(FeedItem::Frames(room_id, std::mem::take(batch)));
    }
}

/// Whether `frame` is the placeholder history carries for an erased entry
/// (`Redacted`, naming its index), not a notice.
fn is_erased_entry(frame: &Frame) -> bool {
    frame.decode_payload::<payload::Error>().is_ok_and(|error| {
        error.code == ErrorCode::Redacted.to_u16() && error.log_index == Some(frame.header().log_index())
    })
}

fn caught_up(room_id: RoomId, frame: &Frame) -> Option<FeedItem> {
    let done = frame.decode_payload::<payload::SyncDone>().ok()?;
    done.live.then_some(FeedItem::CaughtUp {
        room_id,
        next_log_index: done.next_log_index,
        log_head: done.log_head,
    })
}

fn refusal(room_id: RoomId, frame: &Frame) -> Option<FeedItem> {
    let error = frame.decode_payload::<payload::Error>().ok()?;
    Some(if error.code == ErrorCode::ResyncRequired.to_u16() {
        FeedItem::FollowAgain(room_id)
    } else if let (true, Some(log_index)) = (error.code == ErrorCode::Redacted.to_u16(), error.log_index) {
        // Not the entry's placeholder (that names its own index): a notice.
        FeedItem::Erased { room_id, log_index }
    } else {
        FeedItem::Refused { room_id, code: error.code, message: error.message }
    })
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::SigningKey;
    use kalandra_proto::chain::LogHead;

    use super::*;
    use crate::room::{error_frame, reply_frame};

    const ROOM: RoomId = RoomId([7; 16]);
    const OTHER: RoomId = RoomId([8; 16]);

    fn bytes(frame: Bytes) -> ByteBuf {
        ByteBuf::from(frame.to_vec())
    }

    fn sync_done(room_id: RoomId, next_log_index: u64, log_head: Option<SignedLogHead>) -> ByteBuf {
        bytes(reply_frame(room_id, 0, &payload::SyncDone { next_log_index, live: true, log_head }))
    }

    fn signed(log_index: u64, head: LogHead) -> SignedLogHead {
        SignedLogHead::sign(ROOM, log_index, head, &SigningKey::from_bytes(&[1; 32]))
    }

    #[test]
    fn a_feed_is_sorted_into_per_room_batches_and_notices_in_order() {
        let feed = vec![
            bytes(reply_frame(
                ROOM,
                0,
                &payload::Ack {
                    log_index: 1,
                    epoch: 0,
                    server_time_ms: 0,
                    log_head: None,
                    signed_head: None,
                },
            )),
            sync_done(ROOM, 2, None),
            ByteBuf::from(vec![1, 2, 3]),
            bytes(error_frame(OTHER, 0, ErrorCode::Forbidden, "no")),
            bytes(error_frame(ROOM, 0, ErrorCode::ResyncRequired, "behind")),
            bytes(error_frame(ROOM, 0, ErrorCode::NotMember, "no user of yours")),
        ];
        let items = FollowState::sort_feed(feed, |room_id| room_id == ROOM);
        let kinds: Vec<String> = items
            .iter()
            .map(|item| match item {
                FeedItem::Frames(room_id, frames) => format!("frames {} {}", room_id.0[0], frames.len()),
                FeedItem::CaughtUp { next_log_index, .. } => format!("caught up {next_log_index}"),
                FeedItem::FollowAgain(_) => "again".to_owned(),
                FeedItem::Erased { log_index, .. } => format!("erased {log_index}"),
                FeedItem::Refused { code, .. } => format!("refused {code}"),
                FeedItem::Dropped(label) => format!("dropped {label}"),
            })
            .collect();
        let not_member = ErrorCode::NotMember.to_u16();
        assert_eq!(
            kinds,
            [
                "frames 7 1".to_owned(),
                "caught up 2".to_owned(),
                "dropped malformed_frame".to_owned(),
                "dropped foreign_room".to_owned(),
                "again".to_owned(),
                format!("refused {not_member}"),
            ]
        );
    }

    #[test]
    fn the_placeholder_of_an_erased_entry_is_taken_as_the_logs_entry_not_as_a_refusal() {
        let mut header = kalandra_proto::FrameHeaderBuf::new(Opcode::Error);
        header.set_room_id(ROOM).set_log_index(5);
        let error = payload::Error {
            code: ErrorCode::Redacted.to_u16(),
            message: "content erased".to_owned(),
            current_epoch: None,
            log_index: Some(5),
            retry_after_ms: None,
            frame_digest: Some([3; 32]),
        };
        let placeholder = Frame::with_payload(header, &error).expect("fits").to_bytes();
        let items = FollowState::sort_feed(vec![bytes(placeholder)], |_| true);
        assert!(matches!(items.as_slice(), [FeedItem::Frames(_, frames)] if frames.len() == 1), "{items:?}");
    }

    #[test]
    fn an_erasure_notice_is_neither_an_entry_nor_a_refusal() {
        let notice = crate::room::erasure_notice(ROOM, 5);
        let items = FollowState::sort_feed(vec![bytes(notice)], |_| true);
        assert!(matches!(items.as_slice(), [FeedItem::Erased { room_id: ROOM, log_index: 5 }]), "{items:?}");
    }

    #[test]
    fn a_follow_goes_live_only_once_durable_through_the_caught_up_index_and_its_head_holds() {
        let mut state = FollowState::new();
        let _ = state.start(ROOM, Some(3), 0);
        assert!(state.holds(ROOM));
        assert!(!state.reads_here(ROOM, true), "catching up: reads go to the authority");
        assert!(state.reads_here(ROOM, false), "the authority unreachable: the replica is read");
        let head = signed(9, [5; 32]);
        assert!(state.caught_up(ROOM, 10, Some(head)));
        assert_eq!(state.durable(ROOM, Some(9)), LiveStep::NotDurable);
        assert_eq!(state.durable(ROOM, Some(10)), LiveStep::CheckHead(head));
        assert_eq!(state.head_checked(ROOM, Some(Ok(HeadCheck::Matched))), (Some("matched"), LiveStep::Live));
        assert!(state.reads_here(ROOM, true));
        assert_eq!(state.durable(ROOM, Some(10)), LiveStep::Idle, "nothing waits any more");
        assert_eq!(state.counts([ROOM, OTHER]), [0, 1, 0]);
    }

    #[test]
    fn a_head_that_does_not_hold_refuses_the_replica_until_followed_again() {
        let mut state = FollowState::new();
        let _ = state.start(ROOM, Some(10), 0);
        assert!(state.caught_up(ROOM, 10, Some(signed(9, [5; 32]))));
        let equivocation = HeadCheckError::Equivocation { log_index: 9, signed: [5; 32], replica: [6; 32] };
        assert_eq!(state.head_checked(ROOM, Some(Err(equivocation))), (Some("equivocation"), LiveStep::Idle));
        assert_eq!(state.following(ROOM), Some(Following::Refused));
        assert!(!state.reads_here(ROOM, true));
        state.link_down([ROOM]);
        assert_eq!(state.following(ROOM), None, "asked again on the next link");
    }

    #[test]
    fn a_live_follow_checks_each_checkpoint_and_one_that_does_not_hold_refuses_it() {
        let mut state = FollowState::new();
        let _ = state.start(ROOM, Some(10), 0);
        assert!(state.caught_up(ROOM, 10, None), "caught up: a check starts");
        assert_eq!(state.durable(ROOM, Some(10)), LiveStep::Live);
        let first = signed(11, [5; 32]);
        assert!(state.caught_up(ROOM, 12, Some(first)), "a live checkpoint starts a check");
        let newer = signed(13, [6; 32]);
        assert!(!state.caught_up(ROOM, 14, Some(newer)), "the waiting check takes the newest head");
        assert_eq!(state.durable(ROOM, Some(14)), LiveStep::CheckHead(newer));
        assert_eq!(state.head_checked(ROOM, Some(Ok(HeadCheck::Matched))), (Some("matched"), LiveStep::Idle));
        assert_eq!(state.following(ROOM), Some(Following::Live), "still live");
        assert!(!state.caught_up(ROOM, 15, None), "a live notice without a head checks nothing");
        assert!(state.caught_up(ROOM, 16, Some(signed(15, [7; 32]))));
        let equivocation = HeadCheckError::Equivocation { log_index: 15, signed: [7; 32], replica: [8; 32] };
        assert_eq!(state.head_checked(ROOM, Some(Err(equivocation))), (Some("equivocation"), LiveStep::Idle));
        assert_eq!(state.following(ROOM), Some(Following::Refused));
        assert!(!state.reads_here(ROOM, true), "members no longer read it");
    }

    #[test]
    fn a_link_lost_while_catching_up_never_goes_live_on_the_old_follow() {
        let mut state = FollowState::new();
        let message = state.start(ROOM, None, 0);
        assert!(matches!(message, LinkMessage::Follow { from_log_index: 0, .. }));
        assert!(!state.holds(ROOM));
        assert!(state.caught_up(ROOM, 4, None));
        state.link_down([ROOM]);
        assert_eq!(state.durable(ROOM, Some(4)), LiveStep::Idle);
        assert_eq!(state.following(ROOM), None);
        // A caught-up notice of a follow not asked is ignored.
        assert!(!state.caught_up(ROOM, 4, None));
        assert!(state.going_live().is_empty());
    }
}
