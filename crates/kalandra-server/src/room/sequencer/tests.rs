//! Sequencer tests against a small, fully specified group double, so that
//! ordering rules are tested apart from OpenMLS (which the integration tests
//! and the simulation exercise with the real `PublicGroup`).
//!
//! Test group encoding: a commit is `b'C' | epoch: u64 BE | covers_all: u8 |
//! added sender ids: u64 BE each`; a proposal is `b'P' | id: u8`.

use std::collections::HashSet;

use bytes::Bytes;
use kalandra_proto::payload::{Application, Commit, CreateRoom, ExternalJoin, JoinRule, Proposal};
use kalandra_proto::{ErrorCode, FrameHeaderBuf, Payload};

use super::*;

#[derive(Debug, Clone)]
struct TestGroup {
    epoch: u64,
    members: HashSet<SenderId>,
    proposals: Vec<ProposalRef>,
    external_sender_ok: bool,
}

impl TestGroup {
    fn with_members(members: &[u64]) -> TestGroup {
        TestGroup {
            epoch: 0,
            members: members.iter().copied().map(SenderId).collect(),
            proposals: Vec::new(),
            external_sender_ok: true,
        }
    }
}

impl GroupState for TestGroup {
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
        let (must_cover, barred) = (rules.must_cover, rules.barred);
        if commit.len() < 10 || commit[0] != b'C' || !(commit.len() - 10).is_multiple_of(8) {
            return Err(GroupError::Invalid("not a test commit".into()));
        }
        let message_epoch = u64::from_be_bytes(commit[1..9].try_into().unwrap());
        if message_epoch != self.epoch {
            return Err(GroupError::WrongEpoch { message_epoch, group_epoch: self.epoch });
        }
        if commit[9] == 0 && !must_cover.is_empty() {
            return Err(GroupError::UncoveredProposals { missing: must_cover.len() });
        }
        let added: Vec<SenderId> =
            commit[10..].chunks(8).map(|id| SenderId(u64::from_be_bytes(id.try_into().unwrap()))).collect();
        if let Some(member) = added.iter().copied().find(|member| barred(*member)) {
            return Err(GroupError::Banned { member });
        }
        self.members.extend(added.iter().copied());
        self.epoch += 1;
        self.proposals.clear();
        let ratchet_tree = if rules.welcome.is_some() { Bytes::from_static(b"tree") } else { Bytes::new() };
        Ok(CommitSummary { epoch: self.epoch, added, removed: Vec::new(), ratchet_tree })
    }
    fn apply_proposal(&mut self, proposal: &[u8], _: Option<&RoomPolicy>) -> Result<ProposalRef, GroupError> {
        match proposal {
            [b'P', id] => {
                let reference = ProposalRef(vec![*id]);
                self.proposals.push(reference.clone());
                Ok(reference)
            }
            _ => Err(GroupError::Invalid("not a test proposal".into())),
        }
    }
    fn group_info_valid(&self, group_info: &[u8], _signer: SenderId) -> bool {
        group_info.starts_with(b"group-info-")
    }
    fn only_external_sender_is(&self, _server_key: &[u8; 32]) -> bool {
        self.external_sender_ok
    }
    fn ratchet_tree(&self) -> Bytes {
        Bytes::from_static(b"tree")
    }
}

const ROOM: RoomId = RoomId([1; 16]);
const ALICE: SenderId = SenderId(1);
const BOB: SenderId = SenderId(2);
const CAROL: SenderId = SenderId(3);

fn header(opcode: Opcode, sender: SenderId, epoch: u64, request_id: u32) -> FrameHeaderBuf {
    let mut header = FrameHeaderBuf::new(opcode);
    header.set_room_id(ROOM).set_sender_id(sender).set_epoch(epoch).set_request_id(request_id);
    header
}

fn application(sender: SenderId, epoch: u64, request_id: u32) -> Frame {
    let payload = Application {
        generation: request_id,
        ciphertext: Bytes::from_static(b"ciphertext"),
        push: None,
        epoch_tag: None,
    };
    Frame::with_payload(header(Opcode::Application, sender, epoch, request_id), &payload).unwrap()
}

fn test_commit(epoch: u64, covers_all: bool, added: &[u64]) -> Vec<u8> {
    let mut bytes = vec![b'C'];
    bytes.extend_from_slice(&epoch.to_be_bytes());
    bytes.push(u8::from(covers_all));
    for id in added {
        bytes.extend_from_slice(&id.to_be_bytes());
    }
    bytes
}

fn commit(sender: SenderId, epoch: u64, covers_all: bool, added: &[u64], request_id: u32) -> Frame {
    let (welcome, welcome_recipients) =
        if added.is_empty() { (None, Vec::new()) } else { (Some(b"welcome".to_vec()), added.to_vec()) };
    let payload = Commit {
        commit: test_commit(epoch, covers_all, added),
        welcome,
        welcome_recipients,
        group_info: Some(format!("group-info-{}", epoch + 1).into_bytes()),
    };
    Frame::with_payload(header(Opcode::Commit, sender, epoch, request_id), &payload).unwrap()
}

fn proposal(sender: SenderId, epoch: u64, id: u8) -> Frame {
    Frame::with_payload(header(Opcode::Proposal, sender, epoch, 0), &Proposal { proposal: vec![b'P', id] })
        .unwrap()
}

/// An open room: the tests below join it by external commit.
fn create_frame() -> Frame {
    create_frame_with(Some(JoinRule::Open))
}

fn create_frame_with(join_rule: Option<JoinRule>) -> Frame {
    let payload = CreateRoom { group_info: b"gi".to_vec(), ratchet_tree: b"tree".to_vec(), join_rule };
    Frame::with_payload(header(Opcode::CreateRoom, ALICE, 0, 1), &payload).unwrap()
}

fn recovery_point(last_timestamp_ms: u64) -> RecoveryPoint {
    RecoveryPoint {
        through_log_index: 0,
        last_timestamp_ms,
        group_info: (0, Bytes::from_static(b"gi")),
        epoch_started_at_log_index: 0,
        server_proposals: PendingServerProposals::default(),
        policy: RoomPolicy::new(ALICE, JoinRule::Open),
        log_head: [0; 32],
    }
}

fn new_room(members: &[u64]) -> RoomSequencer<TestGroup> {
    let (mut room, sequenced) =
        RoomSequencer::create(ROOM, TestGroup::with_members(members), ALICE, create_frame(), 1_000, &[0; 32])
            .unwrap();
    assert_eq!(sequenced.log_index, 0);
    let mut effects = Vec::new();
    room.durable(0, &mut effects);
    room
}

fn acks(effects: &[Effect]) -> Vec<(SenderId, u32, u64)> {
    effects
        .iter()
        .filter_map(|effect| match effect {
            Effect::Acknowledge { sender, request_id, log_index, .. } => {
                Some((*sender, *request_id, *log_index))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn log_index_is_dense_from_zero_and_timestamps_never_go_back() {
    let mut room = new_room(&[1, 2]);
    let mut last_timestamp = 0;
    for (i, now) in [5_000u64, 4_000, 6_000, 6_000, 1].into_iter().enumerate() {
        let request_id = u32::try_from(i).unwrap() + 10;
        let sequenced = room.submit(BOB, application(BOB, 0, request_id), now).unwrap();
        assert_eq!(sequenced.log_index, i as u64 + 1);
        let header = sequenced.frame.header();
        assert_eq!(header.log_index(), sequenced.log_index);
        assert!(header.server_timestamp_ms() >= last_timestamp);
        last_timestamp = header.server_timestamp_ms();
    }
    assert_eq!(last_timestamp, 6_000);
    assert_eq!(room.next_log_index(), 6);
}

#[test]
fn nothing_is_acknowledged_before_it_is_durable() {
    let mut room = new_room(&[1, 2]);
    room.submit(BOB, application(BOB, 0, 1), 10).unwrap();
    room.submit(ALICE, application(ALICE, 0, 2), 11).unwrap();
    room.submit(BOB, application(BOB, 0, 3), 12).unwrap();
    assert_eq!(room.in_flight(), 3);
    let mut effects = Vec::new();
    room.durable(2, &mut effects);
    assert_eq!(acks(&effects), vec![(BOB, 1, 1), (ALICE, 2, 2)]);
    let fanned: Vec<u64> = effects
        .iter()
        .filter_map(|effect| match effect {
            Effect::FanOut { frame, .. } => Some(frame.header().log_index()),
            _ => None,
        })
        .collect();
    assert_eq!(fanned, vec![1, 2]);
    effects.clear();
    room.durable(3, &mut effects);
    assert_eq!(acks(&effects), vec![(BOB, 3, 3)]);
    assert_eq!(room.in_flight(), 0);
}

#[test]
fn first_commit_for_an_epoch_wins_and_the_second_gets_wrong_epoch() {
    let mut room = new_room(&[1, 2]);
    let winner = room.submit(ALICE, commit(ALICE, 0, true, &[], 1), 10).unwrap();
    assert_eq!(room.epoch(), 1);
    let loser = room.submit(BOB, commit(BOB, 0, true, &[], 2), 11).unwrap_err();
    assert_eq!(
        loser,
        SubmitError::WrongEpoch { frame_epoch: 0, current_epoch: 1, log_index: winner.log_index }
    );
    assert_eq!(loser.error_code(), ErrorCode::WrongEpoch);
    // The loser rebases onto epoch 1 and succeeds.
    let rebased = room.submit(BOB, commit(BOB, 1, true, &[], 3), 12).unwrap();
    assert_eq!(rebased.log_index, winner.log_index + 1);
    assert_eq!(room.epoch(), 2);
}

#[test]
fn application_messages_only_in_the_current_epoch() {
    let mut room = new_room(&[1, 2]);
    room.submit(ALICE, commit(ALICE, 0, true, &[], 1), 10).unwrap();
    let error = room.submit(BOB, application(BOB, 0, 2), 11).unwrap_err();
    assert!(matches!(error, SubmitError::WrongEpoch { frame_epoch: 0, current_epoch: 1, .. }));
    let error = room.submit(BOB, application(BOB, 2, 3), 11).unwrap_err();
    assert!(matches!(error, SubmitError::WrongEpoch { frame_epoch: 2, current_epoch: 1, .. }));
    room.submit(BOB, application(BOB, 1, 4), 12).unwrap();
}

#[test]
fn non_members_and_impostors_are_refused() {
    let mut room = new_room(&[1, 2]);
    assert_eq!(room.submit(CAROL, application(CAROL, 0, 1), 10).unwrap_err(), SubmitError::NotMember(CAROL));
    assert_eq!(
        room.submit(ALICE, application(BOB, 0, 1), 10).unwrap_err(),
        SubmitError::SenderMismatch { claimed: BOB, authenticated: ALICE }
    );
    let ping = Frame::new(header(Opcode::Ping, ALICE, 0, 1), Bytes::new()).unwrap();
    assert_eq!(room.submit(ALICE, ping, 10).unwrap_err(), SubmitError::NotSequenced(Opcode::Ping));
    assert_eq!(room.next_log_index(), 1, "nothing was sequenced");
}

#[test]
fn malformed_and_invalid_handshake_payloads_are_refused() {
    let mut room = new_room(&[1, 2]);
    let garbage = Frame::new(header(Opcode::Commit, ALICE, 0, 1), Bytes::from_static(&[0xFF])).unwrap();
    assert!(matches!(room.submit(ALICE, garbage, 10), Err(SubmitError::MalformedPayload(_))));
    let bad_commit = Frame::with_payload(
        header(Opcode::Commit, ALICE, 0, 1),
        &Commit { commit: b"nonsense".to_vec(), welcome: None, welcome_recipients: vec![], group_info: None },
    )
    .unwrap();
    let error = room.submit(ALICE, bad_commit, 10).unwrap_err();
    assert!(matches!(error, SubmitError::InvalidCommit(GroupError::Invalid(_))));
    assert_eq!(error.error_code(), ErrorCode::InvalidCommit);
    let bad_proposal =
        Frame::with_payload(header(Opcode::Proposal, ALICE, 0, 1), &Proposal { proposal: b"x".to_vec() })
            .unwrap();
    let error = room.submit(ALICE, bad_proposal, 10).unwrap_err();
    assert_eq!(error.error_code(), ErrorCode::InvalidProposal);
    // An MLS epoch that disagrees with the header's is the group's call.
    let mismatched = Frame::with_payload(
        header(Opcode::Commit, ALICE, 0, 1),
        &Commit {
            commit: test_commit(7, true, &[]),
            welcome: None,
            welcome_recipients: vec![],
            group_info: None,
        },
    )
    .unwrap();
    assert_eq!(room.submit(ALICE, mismatched, 10).unwrap_err().error_code(), ErrorCode::WrongEpoch);
    assert_eq!(room.epoch(), 0);
    assert_eq!(room.next_log_index(), 1);
}

#[test]
fn pending_server_proposals_block_messages_until_a_covering_commit() {
    let mut room = new_room(&[1, 2, 3]);
    let kick = proposal(SERVER_SENDER_ID, 0, 9);
    let sequenced = room.submit_server_proposal(kick, 10).unwrap();
    assert_eq!(sequenced.log_index, 1);
    assert_eq!(room.server_proposals_pending().len(), 1);

    let error = room.submit(BOB, application(BOB, 0, 1), 11).unwrap_err();
    assert_eq!(error, SubmitError::PendingProposals { pending: 1 });
    assert_eq!(error.error_code(), ErrorCode::PendingProposals);

    let error = room.submit(BOB, commit(BOB, 0, false, &[], 2), 12).unwrap_err();
    assert_eq!(error, SubmitError::InvalidCommit(GroupError::UncoveredProposals { missing: 1 }));
    assert_eq!(error.error_code(), ErrorCode::PendingProposals);

    let external = Frame::with_payload(
        header(Opcode::ExternalJoin, SenderId(77), 0, 3),
        &ExternalJoin { commit: test_commit(0, false, &[77]), group_info: None },
    )
    .unwrap();
    assert_eq!(
        room.submit(SenderId(77), external, 12).unwrap_err(),
        SubmitError::PendingProposals { pending: 1 }
    );

    room.submit(BOB, commit(BOB, 0, true, &[], 4), 13).unwrap();
    assert!(room.server_proposals_pending().is_empty());
    room.submit(BOB, application(BOB, 1, 5), 14).unwrap();

    // The server proposal is fanned out but not acknowledged to anyone.
    let mut effects = Vec::new();
    room.durable(room.next_log_index() - 1, &mut effects);
    assert_eq!(acks(&effects), vec![(BOB, 4, 2), (BOB, 5, 3)]);
    assert!(effects
        .iter()
        .any(|e| matches!(e, Effect::FanOut { sender, .. } if *sender == SERVER_SENDER_ID)));
}

#[test]
fn proposals_by_reference_are_sequenced_before_their_commit() {
    let mut room = new_room(&[1, 2]);
    let sequenced_proposal = room.submit(BOB, proposal(BOB, 0, 4), 10).unwrap();
    let sequenced_commit = room.submit(ALICE, commit(ALICE, 0, true, &[], 2), 11).unwrap();
    assert!(sequenced_proposal.log_index < sequenced_commit.log_index);
    assert!(room.group().proposals.is_empty(), "the commit consumed the proposal");
    // A proposal for an old epoch is refused.
    assert!(matches!(room.submit(BOB, proposal(BOB, 0, 5), 12), Err(SubmitError::WrongEpoch { .. })));
}

#[test]
fn commits_emit_membership_welcome_and_group_info_after_durability() {
    let mut room = new_room(&[1]);
    let sequenced = room.submit(ALICE, commit(ALICE, 0, true, &[2, 3], 7), 10).unwrap();
    assert!(room.is_member(BOB) && room.is_member(CAROL));
    let mut effects = Vec::new();
    room.durable(sequenced.log_index, &mut effects);
    assert!(matches!(&effects[0], Effect::Acknowledge { epoch: 1, log_index: 1, .. }));
    assert!(matches!(&effects[1], Effect::FanOut { .. }));
    assert!(matches!(&effects[2], Effect::MembershipChanged { added, .. } if *added == vec![BOB, CAROL]));
    assert!(
        matches!(&effects[3], Effect::DeliverWelcome { recipients, log_index: 1, ratchet_tree, .. } if *recipients == vec![BOB, CAROL] && &ratchet_tree[..] == b"tree")
    );
    assert_eq!(effects.len(), 4);
    assert_eq!(
        room.group_info().map(|(epoch, info)| (*epoch, info.to_vec())),
        Some((1, b"group-info-1".to_vec()))
    );
}

#[test]
fn storage_failure_rejects_everything_in_flight_and_stops_the_room() {
    let mut room = new_room(&[1, 2]);
    room.submit(BOB, application(BOB, 0, 1), 10).unwrap();
    room.submit(ALICE, application(ALICE, 0, 2), 10).unwrap();
    let mut effects = Vec::new();
    room.storage_failed(&mut effects);
    let rejected: Vec<_> = effects
        .iter()
        .map(|effect| match effect {
            Effect::Reject { sender, request_id, error } => (*sender, *request_id, error.error_code()),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(
        rejected,
        vec![(BOB, 1, ErrorCode::StorageUnavailable), (ALICE, 2, ErrorCode::StorageUnavailable)]
    );
    assert!(room.is_recovering());
    assert_eq!(room.submit(BOB, application(BOB, 0, 3), 11).unwrap_err(), SubmitError::Recovering);
}

#[test]
fn in_flight_frames_are_bounded() {
    let mut room = new_room(&[1, 2]);
    for i in 0..IN_FLIGHT_FRAMES_PER_ROOM_MAX {
        room.submit(BOB, application(BOB, 0, u32::try_from(i).unwrap()), 10).unwrap();
    }
    let error = room.submit(BOB, application(BOB, 0, 0), 10).unwrap_err();
    assert_eq!(error, SubmitError::Overloaded { in_flight: IN_FLIGHT_FRAMES_PER_ROOM_MAX });
    assert_eq!(error.error_code(), ErrorCode::RateLimited);
    let mut effects = Vec::new();
    room.durable(room.next_log_index() - 1, &mut effects);
    room.submit(BOB, application(BOB, 0, 0), 10).unwrap();
}

#[test]
#[should_panic(expected = "only 1 assigned")]
fn durability_beyond_what_was_assigned_is_a_bug() {
    let mut room = new_room(&[1]);
    room.durable(1, &mut Vec::new());
}

#[test]
fn replaying_the_log_rebuilds_the_same_state() {
    let mut room = new_room(&[1, 2]);
    let log = vec![
        room.submit(BOB, application(BOB, 0, 1), 10).unwrap().frame,
        room.submit(BOB, proposal(BOB, 0, 1), 11).unwrap().frame,
        room.submit(ALICE, commit(ALICE, 0, true, &[3], 2), 12).unwrap().frame,
        room.submit_server_proposal(proposal(SERVER_SENDER_ID, 1, 2), 13).unwrap().frame,
        room.submit(CAROL, proposal(CAROL, 1, 3), 14).unwrap().frame,
    ];
    room.durable(room.next_log_index() - 1, &mut Vec::new());

    let mut rebuilt = RoomSequencer::recover(ROOM, TestGroup::with_members(&[1, 2]), recovery_point(1_000));
    for frame in &log {
        rebuilt.replay(frame).unwrap();
    }
    assert_eq!(rebuilt.next_log_index(), room.next_log_index());
    assert_eq!(rebuilt.epoch(), room.epoch());
    assert_eq!(rebuilt.server_proposals_pending(), room.server_proposals_pending());
    assert_eq!(rebuilt.group_info(), room.group_info());
    assert_eq!(rebuilt.group().members, room.group().members);
    assert_eq!(rebuilt.group().proposals, room.group().proposals);
    // And it continues where the original would.
    assert_eq!(rebuilt.epoch_started_at_log_index(), room.epoch_started_at_log_index());
    let next = rebuilt.submit(BOB, commit(BOB, 1, true, &[], 5), 20).unwrap();
    assert_eq!(next.log_index, room.next_log_index());
    assert!(next.frame.header().server_timestamp_ms() >= 14);

    // A gap in the stored log is detected.
    let mut gapped = RoomSequencer::recover(ROOM, TestGroup::with_members(&[1, 2]), recovery_point(0));
    assert_eq!(gapped.replay(&log[1]).unwrap_err(), ReplayError::NotDense { expected: 1, found: 2 });
}

#[test]
fn creating_a_room_requires_the_creator_to_be_a_member() {
    let result =
        RoomSequencer::create(ROOM, TestGroup::with_members(&[2]), ALICE, create_frame(), 0, &[0; 32]);
    assert_eq!(result.err(), Some(SubmitError::NotMember(ALICE)));
    let result = RoomSequencer::create(ROOM, TestGroup::with_members(&[1]), BOB, create_frame(), 0, &[0; 32]);
    assert!(matches!(result.err(), Some(SubmitError::SenderMismatch { .. })));
}

#[test]
fn payload_helper_round_trips() {
    // The test encodings above go through the real payload codec.
    let frame = commit(ALICE, 3, true, &[5], 1);
    let decoded: Commit = frame.decode_payload().unwrap();
    assert_eq!(decoded.welcome_recipients, vec![5]);
    assert_eq!(Commit::decode(frame.payload()).unwrap(), decoded);
}

#[test]
fn a_ban_refuses_adding_the_user_and_their_external_join_until_lifted_or_expired() {
    let mut room = new_room(&[1, 2]);
    room.ban(SenderId(77), None).unwrap();
    room.ban(SenderId(78), Some(1_500)).unwrap();
    let error = room.submit(ALICE, commit(ALICE, 0, true, &[77], 1), 10).unwrap_err();
    assert_eq!(error, SubmitError::InvalidCommit(GroupError::Banned { member: SenderId(77) }));
    assert_eq!(error.error_code(), ErrorCode::Banned);
    let join = |joiner: u64, epoch: u64| {
        Frame::with_payload(
            header(Opcode::ExternalJoin, SenderId(joiner), epoch, 3),
            &ExternalJoin { commit: test_commit(epoch, false, &[joiner]), group_info: None },
        )
        .unwrap()
    };
    let error = room.submit(SenderId(77), join(77, 0), 11).unwrap_err();
    assert_eq!((error.clone(), error.error_code()), (SubmitError::Banned(SenderId(77)), ErrorCode::Banned));
    assert_eq!(room.submit(SenderId(78), join(78, 0), 999).unwrap_err(), SubmitError::Banned(SenderId(78)));
    assert_eq!((room.epoch(), room.next_log_index()), (0, 1), "nothing was sequenced");

    // The timed ban has ended at its end time; the permanent one holds until lifted.
    assert!(!room.is_banned(SenderId(78), 1_500));
    room.submit(SenderId(78), join(78, 0), 1_500).unwrap();
    assert_eq!(room.expire_bans(1_500), vec![SenderId(78)]);
    assert!(room.is_banned(SenderId(77), u64::MAX));
    assert!(room.unban(SenderId(77)));
    assert!(!room.unban(SenderId(77)), "nothing left to lift");
    room.submit(ALICE, commit(ALICE, 1, true, &[77], 4), 1_501).unwrap();
    assert!(room.is_member(SenderId(77)));
}

/// A restarted server's clock may step back. Bans are judged on the
/// room's time (never before the last stamp): a ban that ended, whose user
/// then came back, does not come back with the clock.
#[test]
fn a_ban_that_ended_stays_ended_when_the_clock_steps_back() {
    let mut room = new_room(&[1, 2]);
    room.ban(SenderId(78), Some(2_000)).unwrap();
    assert!(room.is_banned(SenderId(78), 1_999));
    room.submit(ALICE, application(ALICE, 0, 1), 5_000).unwrap();
    assert!(!room.is_banned(SenderId(78), 1_000), "the room's time is 5,000");
    assert_eq!(room.room_time_ms(1_000), 5_000);
    assert_eq!(room.expire_bans(1_000), vec![SenderId(78)]);
    // A ban still running is still judged on the room's time.
    room.ban(SenderId(79), Some(6_000)).unwrap();
    assert!(room.is_banned(SenderId(79), 1_000) && !room.is_banned(SenderId(79), 6_000));
}

#[test]
fn bans_per_room_are_bounded() {
    let mut room = new_room(&[1]);
    for user in 0..BANS_PER_ROOM_MAX as u64 {
        room.ban(SenderId(1_000 + user), None).unwrap();
    }
    assert_eq!(room.ban(SenderId(5), None).unwrap_err(), SubmitError::TooManyBans);
    room.ban(SenderId(1_000), Some(7)).unwrap();
}

/// A server time after every test room's creation.
const T0: u64 = 10_000;

#[test]
fn uncovered_server_proposals_are_reannounced_at_the_bound_and_stay_enforced() {
    let mut room = new_room(&[1, 2, 3]);
    assert_eq!(room.commit_overdue(u64::MAX), None, "nothing pending");
    room.submit_server_proposal(proposal(SERVER_SENDER_ID, 0, 9), T0).unwrap();
    room.submit_server_proposal(proposal(SERVER_SENDER_ID, 0, 8), T0 + 50).unwrap();
    assert_eq!(room.commit_overdue(T0 + SERVER_PROPOSAL_REANNOUNCE_MS - 1), None);
    let overdue = room.commit_overdue(T0 + SERVER_PROPOSAL_REANNOUNCE_MS).unwrap();
    assert_eq!(
        overdue,
        CommitOverdue { pending: 2, first_log_index: 1, pending_for_ms: SERVER_PROPOSAL_REANNOUNCE_MS }
    );
    // Once per interval, and the room stays closed meanwhile.
    assert_eq!(room.commit_overdue(T0 + SERVER_PROPOSAL_REANNOUNCE_MS + 1), None);
    assert!(room.commit_overdue(T0 + 2 * SERVER_PROPOSAL_REANNOUNCE_MS).is_some());
    let late = T0 + 10 * SERVER_PROPOSAL_REANNOUNCE_MS;
    assert_eq!(
        room.submit(BOB, application(BOB, 0, 1), late).unwrap_err(),
        SubmitError::PendingProposals { pending: 2 }
    );
    room.submit(BOB, commit(BOB, 0, true, &[], 2), late).unwrap();
    assert_eq!(room.commit_overdue(u64::MAX), None, "covered");
}

#[test]
fn a_recovery_point_carries_pending_server_proposals() {
    let mut room = new_room(&[1, 2]);
    room.submit_server_proposal(proposal(SERVER_SENDER_ID, 0, 9), T0).unwrap();
    room.durable(room.next_log_index() - 1, &mut Vec::new());
    let pending = room.pending_server_proposals();
    assert_eq!(pending.since, Some((1, T0)));

    let mut group = TestGroup::with_members(&[1, 2]);
    group.proposals.push(ProposalRef(vec![9]));
    let point = RecoveryPoint {
        through_log_index: 1,
        last_timestamp_ms: T0,
        group_info: (0, Bytes::from_static(b"gi")),
        epoch_started_at_log_index: 0,
        server_proposals: pending.clone(),
        policy: RoomPolicy::new(ALICE, JoinRule::Open),
        log_head: [0; 32],
    };
    let mut rebuilt = RoomSequencer::recover(ROOM, group, point);
    assert_eq!(rebuilt.pending_server_proposals(), pending);
    assert_eq!(
        rebuilt.submit(BOB, application(BOB, 0, 1), T0 + 10).unwrap_err(),
        SubmitError::PendingProposals { pending: 1 }
    );
    assert!(rebuilt.commit_overdue(T0 + SERVER_PROPOSAL_REANNOUNCE_MS).is_some());
    assert!(matches!(
        rebuilt.submit(BOB, commit(BOB, 0, false, &[], 2), T0 + 10),
        Err(SubmitError::InvalidCommit(GroupError::UncoveredProposals { missing: 1 }))
    ));
    rebuilt.submit(BOB, commit(BOB, 0, true, &[], 3), T0 + 11).unwrap();
}

#[test]
fn an_invite_only_room_refuses_external_joins_and_its_group_info_to_strangers() {
    let (mut room, _) = RoomSequencer::create(
        ROOM,
        TestGroup::with_members(&[1, 2]),
        ALICE,
        create_frame_with(None),
        1_000,
        &[0; 32],
    )
    .unwrap();
    room.durable(0, &mut Vec::new());
    let join = Frame::with_payload(
        header(Opcode::ExternalJoin, SenderId(77), 0, 3),
        &ExternalJoin { commit: test_commit(0, false, &[77]), group_info: None },
    )
    .unwrap();
    let refused = room.submit(SenderId(77), join, 2_000).unwrap_err();
    assert_eq!(refused, SubmitError::Forbidden(PolicyError::InviteOnly));
    assert_eq!(refused.error_code(), ErrorCode::Forbidden);
    assert_eq!(room.next_log_index(), 1, "nothing sequenced");
    assert!(matches!(room.group_info_for(SenderId(77), 2_000), Err(SubmitError::Forbidden(_))));
    assert!(room.group_info_for(BOB, 2_000).unwrap().is_some(), "members read it");
    room.ban(BOB, None).unwrap();
    assert_eq!(room.group_info_for(BOB, 2_000), Err(SubmitError::Banned(BOB)));
}

#[test]
fn a_banned_member_sends_nothing_until_its_removal_is_committed() {
    let (mut room, _) =
        RoomSequencer::create(ROOM, TestGroup::with_members(&[1, 2]), ALICE, create_frame(), 1_000, &[0; 32])
            .unwrap();
    room.ban(BOB, None).unwrap();
    // Still in the group until a commit removes it: whatever the frame and
    // its epoch, the answer is the ban, and nothing is sequenced.
    for (request_id, frame) in [application(BOB, 0, 4), application(BOB, 1, 5), commit(BOB, 0, false, &[], 6)]
        .into_iter()
        .enumerate()
    {
        let refused = room.submit(BOB, frame, 2_000).unwrap_err();
        assert_eq!(refused, SubmitError::Banned(BOB), "frame {request_id}");
        assert_eq!(refused.error_code(), ErrorCode::Banned);
    }
    assert_eq!(room.next_log_index(), 1, "nothing sequenced");
    room.submit(ALICE, application(ALICE, 0, 7), 2_000).unwrap();
}

#[test]
fn a_room_must_list_exactly_the_server_key_as_external_sender() {
    let mut wrong = TestGroup::with_members(&[1]);
    wrong.external_sender_ok = false;
    let result = RoomSequencer::create(ROOM, wrong, ALICE, create_frame(), 0, &[0; 32]);
    assert!(matches!(result, Err(SubmitError::ExternalSenders)));
}

/// Each acknowledgement carries the log's head at its index, which is the
/// chain over the frames exactly as sequenced (what a member computes),
/// and a room rebuilt by replaying those frames reaches the same head.
#[test]
fn acknowledged_heads_chain_the_frames_as_sequenced_and_replay_rebuilds_them() {
    use kalandra_proto::chain::{frame_digest, LogChain};
    let create = create_frame();
    let (mut room, created) =
        RoomSequencer::create(ROOM, TestGroup::with_members(&[1, 2]), ALICE, create, 1_000, &[0; 32])
            .unwrap();
    let mut sequenced = vec![created.frame];
    for request_id in 1..=4 {
        sequenced.push(room.submit(BOB, application(BOB, 0, request_id), 2_000).unwrap().frame);
    }
    let mut effects = Vec::new();
    room.durable(4, &mut effects);
    let mut chain = LogChain::genesis();
    let expected: Vec<_> =
        sequenced.iter().map(|frame| chain.extend(ROOM, &frame_digest(&frame.to_bytes()))).collect();
    let acked: Vec<_> = effects
        .iter()
        .filter_map(|effect| match effect {
            Effect::Acknowledge { log_index, log_head, .. } => Some((*log_index, *log_head)),
            _ => None,
        })
        .collect();
    let want: Vec<_> = (0..=4u64).map(|i| (i, expected[usize::try_from(i).unwrap()])).collect();
    assert_eq!(acked, want);
    assert_eq!(room.durable_log_head(), Some((4, expected[4])));

    let point = RecoveryPoint { log_head: expected[0], ..recovery_point(1_000) };
    let mut rebuilt = RoomSequencer::recover(ROOM, TestGroup::with_members(&[1, 2]), point);
    for frame in &sequenced[1..] {
        rebuilt.replay(frame).unwrap();
    }
    assert_eq!(rebuilt.durable_log_head(), Some((4, expected[4])));
    // A different order of the same frames is a different head.
    let mut swapped = LogChain::anchored(0, expected[0]);
    for frame in [&sequenced[2], &sequenced[1]] {
        swapped.extend(ROOM, &frame_digest(&frame.to_bytes()));
    }
    assert_ne!(swapped.head, expected[2]);
}

#[test]
fn proposals_beyond_their_bound_are_a_quota_not_an_invalid_proposal() {
    let full = SubmitError::InvalidProposal(GroupError::TooManyProposals { pending: 16, max_pending: 16 });
    assert_eq!(full.error_code(), ErrorCode::QuotaExceeded);
    let invalid = SubmitError::InvalidProposal(GroupError::Invalid("bad".into()));
    assert_eq!(invalid.error_code(), ErrorCode::InvalidProposal);
}
