//! The void rule against a group double that removes members and keeps the
//! state before its latest commit (the MLS-backed state is exercised by
//! the QUIC test `quic_recovery.rs`).
//!
//! Double encoding: a commit is `b'C' | epoch: u64 BE | added: u8 | removed:
//! u8 | sender ids: u64 BE each (added, then removed)`; a proposal is
//! `b'P' | id: u8`.

use std::collections::BTreeSet;

use bytes::Bytes;
use kalandra_proto::payload::{Application, Commit, CommitReport, CreateRoom, JoinRule, Proposal};
use kalandra_proto::{ErrorCode, FrameHeaderBuf, Payload, RoomId};

use super::super::*;
use super::{ReportError, ReportOutcome, VoidDecision, COMMIT_VOID_WINDOW_MS};

#[derive(Debug, Clone, Default)]
struct UndoGroup {
    epoch: u64,
    members: BTreeSet<SenderId>,
    proposals: Vec<ProposalRef>,
    before: Option<Box<UndoGroup>>,
    /// Stands for the confirmed transcript hash: the bytes of every commit
    /// merged, so epochs begun by different commits differ.
    transcript: Vec<u8>,
}

impl GroupState for UndoGroup {
    fn epoch(&self) -> u64 {
        self.epoch
    }
    fn is_member(&self, sender: SenderId) -> bool {
        self.members.contains(&sender)
    }
    fn members(&self) -> Vec<SenderId> {
        self.members.iter().copied().collect()
    }
    fn apply_commit(&mut self, commit: &[u8], rules: &CommitRules<'_>) -> Result<CommitSummary, GroupError> {
        let invalid = || GroupError::Invalid("not a test commit".into());
        let (&[b'C'], rest) = commit.split_at_checked(1).ok_or_else(invalid)? else { return Err(invalid()) };
        let (epoch, rest) = rest.split_first_chunk::<8>().ok_or_else(invalid)?;
        let (&[added, removed], ids) = rest.split_at_checked(2).ok_or_else(invalid)? else {
            return Err(invalid());
        };
        let message_epoch = u64::from_be_bytes(*epoch);
        if message_epoch != self.epoch {
            return Err(GroupError::WrongEpoch { message_epoch, group_epoch: self.epoch });
        }
        if rules.must_cover.iter().any(|r| !self.proposals.contains(r)) {
            return Err(GroupError::UncoveredProposals { missing: rules.must_cover.len() });
        }
        let ids: Vec<SenderId> = ids
            .chunks_exact(8)
            .map(|id| SenderId(u64::from_be_bytes(id.try_into().expect("8 bytes"))))
            .collect();
        if ids.len() != usize::from(added) + usize::from(removed) {
            return Err(invalid());
        }
        let (added, removed) = ids.split_at(usize::from(added));
        let mut before = self.clone();
        before.before = None;
        self.members.extend(added.iter().copied());
        for member in removed {
            self.members.remove(member);
        }
        self.epoch += 1;
        self.proposals.clear();
        self.before = Some(Box::new(before));
        self.transcript.extend_from_slice(commit);
        Ok(CommitSummary {
            epoch: self.epoch,
            added: added.to_vec(),
            removed: removed.to_vec(),
            ratchet_tree: Bytes::new(),
        })
    }
    fn apply_proposal(&mut self, proposal: &[u8], _: Option<&RoomPolicy>) -> Result<ProposalRef, GroupError> {
        match proposal {
            [b'P', id] => {
                self.proposals.push(ProposalRef(vec![*id]));
                Ok(ProposalRef(vec![*id]))
            }
            _ => Err(GroupError::Invalid("not a test proposal".into())),
        }
    }
    fn group_info_valid(&self, _: &[u8], _: SenderId) -> bool {
        true
    }
    fn only_external_sender_is(&self, _: &[u8; 32]) -> bool {
        true
    }
    fn ratchet_tree(&self) -> Bytes {
        Bytes::new()
    }
    fn confirmed_transcript_hash(&self) -> Option<&[u8]> {
        Some(&self.transcript)
    }
    fn undo_latest_commit(&mut self) -> Result<(), GroupError> {
        let before = self.before.take().ok_or_else(|| GroupError::Internal("nothing to undo".into()))?;
        *self = *before;
        Ok(())
    }
    fn settle_latest_commit(&mut self) {
        self.before = None;
    }
}

const ROOM: RoomId = RoomId([7; 16]);
const ADMIN: SenderId = SenderId(1);
const B: SenderId = SenderId(2);
const C: SenderId = SenderId(3);
const D: SenderId = SenderId(4);
const E: SenderId = SenderId(5);
const F: SenderId = SenderId(6);
const STRANGER: SenderId = SenderId(99);
/// When the commits under test are sequenced (server time, ms).
const AT: u64 = 50_000;

fn frame<P: Payload>(sender: SenderId, epoch: u64, payload: &P) -> Frame {
    let mut header = FrameHeaderBuf::new(P::OPCODE);
    header.set_room_id(ROOM).set_sender_id(sender).set_epoch(epoch).set_request_id(1);
    Frame::with_payload(header, payload).unwrap()
}

fn commit(sender: SenderId, epoch: u64, added: &[SenderId], removed: &[SenderId]) -> Frame {
    let mut bytes = vec![b'C'];
    bytes.extend_from_slice(&epoch.to_be_bytes());
    bytes.extend_from_slice(&[u8::try_from(added.len()).unwrap(), u8::try_from(removed.len()).unwrap()]);
    for id in added.iter().chain(removed) {
        bytes.extend_from_slice(&id.0.to_be_bytes());
    }
    let group_info = Some(format!("group-info-{}", epoch + 1).into_bytes());
    frame(sender, epoch, &Commit { commit: bytes, welcome: None, welcome_recipients: vec![], group_info })
}

fn text(sender: SenderId, epoch: u64) -> Frame {
    frame(
        sender,
        epoch,
        &Application { generation: 0, ciphertext: Bytes::from_static(b"c"), push: None, epoch_tag: None },
    )
}

fn report(log_index: u64, epoch: u64) -> CommitReport {
    CommitReport { log_index, epoch, reason: 2 }
}

/// A room of `members` created by `ADMIN` at time 1,000.
fn room_of(members: &[SenderId]) -> RoomSequencer<UndoGroup> {
    let group = UndoGroup { members: members.iter().copied().collect(), ..UndoGroup::default() };
    let create = CreateRoom { group_info: b"gi-0".to_vec(), ratchet_tree: b"t".to_vec(), join_rule: None };
    let (mut room, _) =
        RoomSequencer::create(ROOM, group, ADMIN, frame(ADMIN, 0, &create), 1_000, &[0; 32]).unwrap();
    room.durable(0, &mut Vec::new());
    room
}

/// The server's `CommitVoided` for `decision`.
fn void_frame(decision: &VoidDecision) -> Frame {
    frame(SERVER_SENDER_ID, decision.epoch, &decision.payload())
}

fn voided(outcome: Result<ReportOutcome, ReportError>) -> VoidDecision {
    match outcome {
        Ok(ReportOutcome::Void(decision)) => decision,
        other => panic!("expected a void, got {other:?}"),
    }
}

#[test]
fn a_strict_majority_of_the_remaining_members_voids_and_the_committer_does_not_vote() {
    // Six members; B's commit removes nobody: the electorate is 6, voters exclude B.
    let mut room = room_of(&[ADMIN, B, C, D, E, F]);
    let l = room.submit(B, commit(B, 0, &[], &[]), AT).unwrap().log_index;
    let forbidden = room.report_commit(B, &report(l, 0), AT + 1).unwrap_err();
    assert_eq!(forbidden.error_code(), ErrorCode::Forbidden, "the committer does not vote");
    assert_eq!(
        room.report_commit(C, &report(l, 0), AT + 1),
        Ok(ReportOutcome::Counted { reports: 1, electorate: 6 })
    );
    assert_eq!(
        room.report_commit(D, &report(l, 0), AT + 2),
        Ok(ReportOutcome::Counted { reports: 2, electorate: 6 })
    );
    assert_eq!(
        room.report_commit(E, &report(l, 0), AT + 3),
        Ok(ReportOutcome::Counted { reports: 3, electorate: 6 }),
        "half is not a majority"
    );
    let decision = voided(room.report_commit(F, &report(l, 0), AT + 4));
    assert_eq!(decision, VoidDecision { log_index: l, epoch: 0, reporters: vec![C, D, E, F] });
    assert_eq!(room.epoch(), 1, "nothing changes before the void is sequenced");
    let sequenced = room.sequence_void(void_frame(&decision), AT + 4).unwrap();
    assert_eq!(sequenced.log_index, l + 1);
    assert_eq!(room.epoch(), 0);
    assert_eq!(room.epoch_started_at_log_index(), 0);
    assert!(!room.commit_unsettled());
    assert_eq!(
        room.group_info(),
        Some(&(0, Bytes::from_static(b"gi-0"))),
        "epoch 0's GroupInfo is served again"
    );
    assert_eq!(room.report_commit(C, &report(l, 0), AT + 5), Ok(ReportOutcome::AlreadyVoided));
}

#[test]
fn the_admin_alone_voids_a_latest_commit_a_hostile_minority_never_does() {
    let mut room = room_of(&[ADMIN, B, C, D, E]);
    let l = room.submit(B, commit(B, 0, &[], &[]), AT).unwrap().log_index;
    // C and D are a minority of the five (the committer counted in the base).
    room.report_commit(C, &report(l, 0), AT + 1).unwrap();
    assert_eq!(
        room.report_commit(D, &report(l, 0), AT + 2),
        Ok(ReportOutcome::Counted { reports: 2, electorate: 5 })
    );
    assert_eq!(
        room.report_commit(D, &report(l, 0), AT + 3),
        Ok(ReportOutcome::Duplicate),
        "a report counts once"
    );
    let settled = room.report_commit(E, &report(l, 0), AT + COMMIT_VOID_WINDOW_MS).unwrap_err();
    assert_eq!(settled, ReportError::Settled { log_index: l });
    assert_eq!(settled.error_code(), ErrorCode::CommitSettled);
    assert_eq!(room.epoch(), 1, "the valid commit stands");

    let l = room.submit(C, commit(C, 1, &[], &[]), AT + 10_000).unwrap().log_index;
    let decision = voided(room.report_commit(ADMIN, &report(l, 1), AT + 10_001));
    assert_eq!(decision.reporters, vec![ADMIN]);
    room.sequence_void(void_frame(&decision), AT + 10_001).unwrap();
    assert_eq!(room.epoch(), 1);
}

#[test]
fn members_the_commit_removes_do_not_vote_and_do_not_count() {
    let mut room = room_of(&[ADMIN, B, C, D, E, F]);
    // C's commit removes E and F: the electorate is ADMIN, B, C, D.
    let l = room.submit(C, commit(C, 0, &[], &[E, F]), AT).unwrap().log_index;
    for removed in [E, F] {
        let error = room.report_commit(removed, &report(l, 0), AT + 1).unwrap_err();
        assert!(matches!(error, ReportError::DoesNotVote(_)), "{error:?}");
    }
    room.report_commit(B, &report(l, 0), AT + 2).unwrap();
    assert_eq!(
        room.report_commit(D, &report(l, 0), AT + 3),
        Ok(ReportOutcome::Counted { reports: 2, electorate: 4 })
    );
    let decision = voided(room.report_commit(ADMIN, &report(l, 0), AT + 4));
    room.sequence_void(void_frame(&decision), AT + 4).unwrap();
    let mut effects = Vec::new();
    room.durable(room.next_log_index() - 1, &mut effects);
    let membership = effects.iter().rev().find_map(|effect| match effect {
        Effect::MembershipChanged { added, removed } => Some((added.clone(), removed.clone())),
        _ => None,
    });
    assert_eq!(membership, Some((vec![E, F], vec![])), "the void makes E and F members again");
    assert!(room.is_member(E) && room.is_member(F));
}

#[test]
fn members_a_commit_adds_and_strangers_are_not_members_of_the_epoch_it_left() {
    let mut room = room_of(&[ADMIN, B, C]);
    let l = room.submit(B, commit(B, 0, &[D], &[]), AT).unwrap().log_index;
    for outsider in [D, STRANGER] {
        let error = room.report_commit(outsider, &report(l, 0), AT + 1).unwrap_err();
        assert_eq!(error, ReportError::NotMember(outsider));
        assert_eq!(error.error_code(), ErrorCode::NotMember);
    }
    // The electorate is ADMIN, B, C: C alone is not a majority.
    assert_eq!(
        room.report_commit(C, &report(l, 0), AT + 2),
        Ok(ReportOutcome::Counted { reports: 1, electorate: 3 })
    );
}

#[test]
fn only_the_latest_commit_can_be_reported_and_only_within_its_window() {
    let mut room = room_of(&[ADMIN, B, C]);
    let first = room.submit(B, commit(B, 0, &[], &[]), AT).unwrap().log_index;
    let second = room.submit(C, commit(C, 1, &[], &[]), AT + 1).unwrap().log_index;
    let message = room.submit(B, text(B, 2), AT + 2).unwrap().log_index;
    let error = room.report_commit(ADMIN, &report(first, 0), AT + 3).unwrap_err();
    assert_eq!(error, ReportError::Settled { log_index: first }, "a later commit settled it");
    for (log_index, epoch) in [(second, 0), (message, 2), (message + 1, 2), (0, 0)] {
        let error = room.report_commit(ADMIN, &report(log_index, epoch), AT + 3).unwrap_err();
        assert_eq!(error, ReportError::NoSuchCommit { log_index, epoch });
        assert_eq!(error.error_code(), ErrorCode::NoSuchCommit);
    }
    let last_moment = AT + 1 + COMMIT_VOID_WINDOW_MS - 1;
    assert!(matches!(
        room.report_commit(B, &report(second, 1), last_moment),
        Ok(ReportOutcome::Counted { .. })
    ));
    // The window is judged by the sequencer's clock, which never goes back.
    room.submit(B, text(B, 2), last_moment + 1).unwrap();
    assert_eq!(
        room.report_commit(ADMIN, &report(second, 1), 0),
        Err(ReportError::Settled { log_index: second })
    );
    assert!(!room.commit_unsettled());
}

#[test]
fn a_void_drops_the_voided_epoch_and_the_next_commit_of_the_old_epoch_wins() {
    let mut room = room_of(&[ADMIN, B, C]);
    // A kick pending in epoch 0, covered by B's commit.
    room.submit_server_proposal(frame(SERVER_SENDER_ID, 0, &Proposal { proposal: vec![b'P', 9] }), AT - 10)
        .unwrap();
    let l = room.submit(B, commit(B, 0, &[], &[]), AT).unwrap().log_index;
    assert!(room.server_proposals_pending().is_empty());
    room.submit(B, text(B, 1), AT + 1).unwrap();
    room.submit_server_proposal(frame(SERVER_SENDER_ID, 1, &Proposal { proposal: vec![b'P', 10] }), AT + 2)
        .unwrap();
    room.report_commit(C, &report(l, 0), AT + 3).unwrap();
    let decision = voided(room.report_commit(ADMIN, &report(l, 0), AT + 4));
    let void = room.sequence_void(void_frame(&decision), AT + 4).unwrap();
    assert_eq!(void.frame.header().server_timestamp_ms(), AT + 4);
    assert_eq!(room.server_proposals_pending(), &[ProposalRef(vec![9])], "epoch 0's kick is pending again");
    let stale = room.submit(B, text(B, 1), AT + 5).unwrap_err();
    assert_eq!(stale, SubmitError::WrongEpoch { frame_epoch: 1, current_epoch: 0, log_index: 0 });
    let next = room.submit(C, commit(C, 0, &[], &[]), AT + 7).unwrap();
    assert_eq!(next.log_index, void.log_index + 1);
    assert_eq!((room.epoch(), room.epoch_started_at_log_index()), (1, next.log_index));
}

fn tagged_text(sender: SenderId, epoch: u64, epoch_tag: [u8; 8]) -> Frame {
    let payload = Application {
        generation: 0,
        ciphertext: Bytes::from_static(b"c"),
        push: None,
        epoch_tag: Some(epoch_tag),
    };
    frame(sender, epoch, &payload)
}

#[test]
fn a_message_sealed_in_an_epoch_a_void_undid_is_refused_in_the_next_epoch_of_its_number() {
    let mut room = room_of(&[ADMIN, B, C]);
    let l = room.submit(B, commit(B, 0, &[], &[]), AT).unwrap().log_index;
    let undone = kalandra_proto::epoch_tag(ROOM, 1, &room.group().transcript);
    room.submit(B, tagged_text(B, 1, undone), AT + 1).expect("sealed in the room's epoch 1");
    let decision = voided(room.report_commit(ADMIN, &report(l, 0), AT + 2));
    room.sequence_void(void_frame(&decision), AT + 2).unwrap();
    // C begins another epoch 1; B, cut off, still seals in the undone one.
    let next = room.submit(C, commit(C, 0, &[D], &[]), AT + 3).unwrap();
    let current = kalandra_proto::epoch_tag(ROOM, 1, &room.group().transcript);
    assert_ne!(current, undone);
    let refused = room.submit(B, tagged_text(B, 1, undone), AT + 4).unwrap_err();
    assert_eq!(refused, SubmitError::UndoneEpoch { epoch: 1, log_index: next.log_index });
    assert_eq!(refused.error_code(), ErrorCode::WrongEpoch, "its sender catches up and seals again");
    let head = room.next_log_index();
    room.submit(B, tagged_text(B, 1, current), AT + 5).expect("sealed in the room's epoch 1");
    room.submit(B, text(B, 1), AT + 6).expect("a message without a tag is not checked");
    assert_eq!(room.next_log_index(), head + 2, "the refused message took no index");
}

#[test]
fn a_void_is_sequenced_only_for_the_unsettled_commit_it_names() {
    let mut room = room_of(&[ADMIN, B, C]);
    let l = room.submit(B, commit(B, 0, &[], &[]), AT).unwrap().log_index;
    let decision = voided(room.report_commit(ADMIN, &report(l, 0), AT + 1));
    let wrong = VoidDecision { log_index: l + 5, ..decision.clone() };
    assert!(room.sequence_void(void_frame(&wrong), AT + 1).is_err());
    let mut forged = void_frame(&decision);
    forged.header_mut().set_sender_id(C);
    assert!(matches!(room.sequence_void(forged, AT + 1), Err(ReportError::Internal(_))));
    let late = room.sequence_void(void_frame(&decision), AT + COMMIT_VOID_WINDOW_MS);
    assert_eq!(late.unwrap_err(), ReportError::Settled { log_index: l });
    assert_eq!(room.epoch(), 1);
}

#[test]
fn replay_keeps_the_latest_commit_voidable_and_reproduces_a_stored_void() {
    let mut room = room_of(&[ADMIN, B, C]);
    let mut log: Vec<Frame> = Vec::new();
    let l = room.submit(B, commit(B, 0, &[D], &[]), AT).unwrap();
    log.push(l.frame.clone());
    log.push(room.submit(B, text(B, 1), AT + 1).unwrap().frame);
    let decision = voided(room.report_commit(ADMIN, &report(l.log_index, 0), AT + 2));
    log.push(room.sequence_void(void_frame(&decision), AT + 2).unwrap().frame);
    let after_void = room.submit(C, commit(C, 0, &[], &[]), AT + 3).unwrap();
    log.push(after_void.frame.clone());

    let recovered = |log: &[Frame]| {
        let group = UndoGroup { members: [ADMIN, B, C].into_iter().collect(), ..UndoGroup::default() };
        let point = RecoveryPoint {
            through_log_index: 0,
            last_timestamp_ms: 1_000,
            group_info: (0, Bytes::from_static(b"gi-0")),
            epoch_started_at_log_index: 0,
            server_proposals: PendingServerProposals::default(),
            policy: RoomPolicy::new(ADMIN, JoinRule::InviteOnly),
            log_head: [0; 32],
        };
        let mut replayed = RoomSequencer::recover(ROOM, group, point);
        for frame in log {
            replayed.replay(frame).unwrap();
        }
        replayed
    };
    // Restarted before the void: the commit is still voidable.
    let mut replayed = recovered(&log[..2]);
    assert!(replayed.commit_unsettled());
    assert!(replayed.is_member(D));
    assert!(matches!(
        replayed.report_commit(ADMIN, &report(l.log_index, 0), AT + 2),
        Ok(ReportOutcome::Void(_))
    ));
    // Restarted after it: the void is replayed, and what followed it applies.
    let replayed = recovered(&log);
    assert_eq!((replayed.epoch(), replayed.epoch_started_at_log_index()), (1, after_void.log_index));
    assert!(!replayed.is_member(D));
    assert_eq!(replayed.next_log_index(), room.next_log_index());

    // A stored void that names anything but the latest commit does not replay.
    let mut replayed = recovered(&log[..1]);
    let mut wrong = void_frame(&VoidDecision { log_index: l.log_index + 1, ..decision });
    wrong.header_mut().set_log_index(l.log_index + 1);
    assert!(matches!(replayed.replay(&wrong), Err(ReplayError::DoesNotApply { .. })));
}
