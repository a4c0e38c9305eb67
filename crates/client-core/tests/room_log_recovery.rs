//! `RoomLog` recovering from a sequenced commit members cannot process, on
//! real MLS groups (`docs/RECOVERY.md`): stuck and report, void and
//! rollback, settlement by server timestamp, rejoin.

use std::time::{SystemTime, UNIX_EPOCH};

use client_core::mls::{generate_key_packages, Identity, MlsProvider, RoomGroup};
use client_core::room_log::{test_support, EntryBody, Intent, RoomLog, RoomLogError, RoomRecord};
use client_core::state::{ClientState, Resume};
use ed25519_dalek::SigningKey;
use kalandra_proto::limits::COMMIT_VOID_WINDOW_MS;
use kalandra_proto::payload::{self, Commit, CommitReportReason, CommitVoided, CreateRoom, Welcome};
use kalandra_proto::{ErrorCode, Frame, FrameHeaderBuf, Payload, RoomId, SenderId};

const ROOM: RoomId = RoomId(*b"room-recovery!!!");
/// Server time of the commits under test.
const AT: u64 = 1_000_000;

struct Device {
    provider: MlsProvider,
    identity: Identity,
    key: SigningKey,
    log: Option<RoomLog>,
}

impl Device {
    fn new(seed: u8) -> Device {
        let provider = MlsProvider::from_seed([seed; 32]);
        let identity = Identity::generate(&provider).unwrap();
        let key = SigningKey::from_bytes(&identity.secret_bytes());
        Device { provider, identity, key, log: None }
    }

    fn sender(&self) -> SenderId {
        SenderId::from_identity_key(self.identity.public_key())
    }

    fn log(&mut self) -> &mut RoomLog {
        self.log.as_mut().unwrap()
    }

    /// Our payload as the server sequences it at `log_index`, time `at_ms`.
    fn sequenced<P: Payload>(&self, payload: &P, epoch: u64, log_index: u64, at_ms: u64) -> Frame {
        let mut header = FrameHeaderBuf::new(P::OPCODE);
        header.set_room_id(ROOM).set_sender_id(self.sender()).set_epoch(epoch);
        let mut frame = Frame::with_payload(header, payload).unwrap();
        frame.sign(&self.key);
        stamp(frame, log_index, at_ms)
    }

    fn apply(&mut self, frame: &Frame) -> Result<Option<EntryBody>, RoomLogError> {
        let own = self.sender();
        let log = self.log.as_mut().unwrap();
        log.apply(&self.provider, own, frame, []).map(|entry| entry.map(|entry| entry.body))
    }

    /// A self-update commit of ours, sent (pending) and sequenced at `log_index`.
    fn update(&mut self, log_index: u64, at_ms: u64) -> (Frame, Vec<u8>) {
        let epoch = self.log().epoch();
        let output = {
            let (provider, identity) = (&self.provider, &self.identity);
            self.log.as_mut().unwrap().group_mut().unwrap().self_update(provider, identity).unwrap()
        };
        let commit = Commit {
            commit: output.commit.clone(),
            welcome: None,
            welcome_recipients: vec![],
            group_info: Some(output.group_info),
        };
        let frame = self.sequenced(&commit, epoch, log_index, at_ms);
        self.log().commit_sent(frame.to_bytes().to_vec(), epoch, Intent::Update).unwrap();
        (frame, output.commit)
    }

    fn seal(&mut self, text: &[u8]) -> client_core::room_log::Sealed {
        self.log.as_mut().unwrap().seal(text, &self.key).unwrap()
    }

    fn tree_hash(&self) -> Vec<u8> {
        self.log.as_ref().unwrap().group().unwrap().tree_hash()
    }
}

fn stamp(mut frame: Frame, log_index: u64, at_ms: u64) -> Frame {
    frame.header_mut().set_log_index(log_index).set_server_timestamp_ms(at_ms);
    frame
}

fn now_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// The server's `CommitVoided` for the commit at `log_index` that left `epoch`.
fn void(log_index: u64, epoch: u64, at: u64, at_ms: u64) -> Frame {
    let mut header = FrameHeaderBuf::new(CommitVoided::OPCODE);
    header.set_room_id(ROOM).set_sender_id(SenderId(0)).set_epoch(epoch);
    let payload = CommitVoided { log_index, epoch, reporters: vec![1] };
    stamp(Frame::with_payload(header, &payload).unwrap(), at, at_ms)
}

/// Alice creates the room (index 0) and adds Bob and Carol (index 1): all
/// three at epoch 1, cursors at 2.
fn three_members() -> (Device, Device, Device) {
    let (mut alice, mut bob, mut carol) = (Device::new(11), Device::new(12), Device::new(13));
    let server_key = SigningKey::from_bytes(&[42u8; 32]).verifying_key().to_bytes();
    let (group, created) =
        RoomGroup::create(&alice.provider, &alice.identity, ROOM.0, &server_key, now_s()).unwrap();
    let create =
        CreateRoom { group_info: created.group_info, ratchet_tree: created.ratchet_tree, join_rule: None };
    let create = alice.sequenced(&create, 0, 0, AT - 10_000);
    let mut log = RoomLog::created(&alice.provider, group, create.to_bytes().to_vec()).unwrap();
    log.creation_confirmed();
    alice.log = Some(log);
    let packages: Vec<Vec<u8>> = [&bob, &carol]
        .iter()
        .map(|d| generate_key_packages(&d.provider, &d.identity, 1, now_s()).unwrap().remove(0).message)
        .collect();
    let refs: Vec<&[u8]> = packages.iter().map(Vec::as_slice).collect();
    let output = {
        let (provider, identity) = (&alice.provider, &alice.identity);
        alice.log.as_mut().unwrap().group_mut().unwrap().add_members(provider, identity, &refs).unwrap()
    };
    let ids = vec![bob.sender().0, carol.sender().0];
    let commit = Commit {
        commit: output.commit,
        welcome: output.welcome.clone(),
        welcome_recipients: ids.clone(),
        group_info: Some(output.group_info),
    };
    let frame = alice.sequenced(&commit, 0, 1, AT - 9_000);
    alice.log().commit_sent(frame.to_bytes().to_vec(), 0, Intent::Invite(ids)).unwrap();
    alice.apply(&frame).unwrap();
    let welcome =
        Welcome { welcome: output.welcome.unwrap(), ratchet_tree: Some(output.ratchet_tree), log_head: None };
    let mut header = FrameHeaderBuf::new(Welcome::OPCODE);
    header.set_room_id(ROOM).set_log_index(1);
    let welcome = Frame::with_payload(header, &welcome).unwrap();
    for device in [&mut bob, &mut carol] {
        device.log = Some(RoomLog::join_from_welcome(&device.provider, ROOM, &welcome).unwrap());
    }
    // A message settles the joins' commit: nothing before this test's commits can be voided.
    let sealed = alice.seal(b"settled");
    let settle = stamp(sealed.frame, 2, AT - 1_000);
    for device in [&mut alice, &mut bob, &mut carol] {
        device.apply(&settle).unwrap();
        assert_eq!(device.log().unsettled_commit(), None);
    }
    (alice, bob, carol)
}

/// Carol's self-update with an altered confirmation tag, at log index 3.
fn bad_update(carol: &mut Device) -> Frame {
    let (_, commit) = carol.update(3, AT);
    let corrupted = test_support::corrupt_confirmation_tag(&commit).expect("a member's commit");
    let payload = Commit { commit: corrupted, welcome: None, welcome_recipients: vec![], group_info: None };
    carol.sequenced(&payload, 1, 3, AT)
}

#[test]
fn an_altered_confirmation_tag_makes_members_stuck_they_report_and_read_on() {
    let (mut alice, mut bob, mut carol) = three_members();
    let bad = bad_update(&mut carol);
    for device in [&mut alice, &mut bob] {
        let body = device.apply(&bad).expect("stuck, not failed");
        assert!(
            matches!(body, Some(EntryBody::Unreadable(ref why)) if why.contains("cannot process")),
            "{body:?}"
        );
        assert_eq!(
            device.log().state(),
            ClientState::Stuck { epoch: 1, log_index: 3, pending_commit: false }
        );
        assert_eq!(device.log().stuck_on(), Some(3));
        let report = device.log().take_report().expect("a report is due");
        assert_eq!((report.log_index, report.epoch), (3, 1));
        let reason = CommitReportReason::from_u8(report.reason);
        assert!(
            matches!(reason, CommitReportReason::MembershipTag | CommitReportReason::ConfirmationTag),
            "{reason:?}"
        );
        assert!(device.log().take_report().is_none(), "once per connection");
    }
    // The committer merged its own commit; it keeps an undo record.
    assert_eq!(carol.apply(&bad).unwrap().map(|_| ()), Some(()));
    assert_eq!(carol.log().epoch(), 2);
    assert_eq!(carol.log().unsettled_commit(), Some(3));
    // Frames of epoch 2 are unreadable for now, not errors.
    let sealed = carol.seal(b"in the bad epoch");
    let message = stamp(sealed.frame, 4, AT + 10);
    let body = alice.apply(&message).unwrap();
    assert!(matches!(body, Some(EntryBody::Unreadable(ref why)) if why.contains("epoch 2")), "{body:?}");
    assert_eq!(alice.log().next_log_index(), 5);
    // Reconnecting makes the report due again.
    alice.log().connection_lost().unwrap();
    alice.log().connected().unwrap();
    assert_eq!(alice.log().take_report().map(|r| r.log_index), Some(3));
    // The state survives a restart, stuck.
    let record: RoomRecord = roundtrip(alice.log().checkpoint_record());
    let mut restored = RoomLog::restore(&alice.provider, record).unwrap();
    assert_eq!(
        restored.state(),
        ClientState::Disconnected {
            resume: client_core::state::Resume::Stuck { epoch: 1, log_index: 3, pending_commit: false }
        }
    );
    restored.connected().unwrap();
    assert_eq!(restored.take_report().map(|r| r.log_index), Some(3));
}

fn roundtrip(record: &RoomRecord) -> RoomRecord {
    let mut bytes = Vec::new();
    ciborium::into_writer(record, &mut bytes).unwrap();
    ciborium::from_reader(bytes.as_slice()).unwrap()
}

#[test]
fn a_void_returns_everyone_to_the_epoch_and_the_next_commit_works_for_all() {
    let (mut alice, mut bob, mut carol) = three_members();
    let bad = bad_update(&mut carol);
    for device in [&mut alice, &mut bob, &mut carol] {
        device.apply(&bad).unwrap();
    }
    let sealed = carol.seal(b"dies with the epoch");
    let dead = stamp(sealed.frame, 4, AT + 10);
    for device in [&mut alice, &mut bob, &mut carol] {
        device.apply(&dead).unwrap();
    }
    let voided = void(3, 1, 5, AT + 20);
    for device in [&mut alice, &mut bob, &mut carol] {
        let body = device.apply(&voided).unwrap();
        assert!(
            matches!(body, Some(EntryBody::CommitVoided { voided_log_index: 3, epoch: 1, .. })),
            "{body:?}"
        );
        assert_eq!(device.log().state(), ClientState::Synchronized { epoch: 1 });
        assert_eq!((device.log().stuck_on(), device.log().unsettled_commit()), (None, None));
    }
    // The committer rolled back and redoes its intent.
    assert_eq!(carol.log().take_redo(), Some(Intent::Update));
    assert!(alice.tree_hash() == bob.tree_hash() && bob.tree_hash() == carol.tree_hash());
    // The next commit for epoch 1 wins, and everyone applies it.
    let (next, _) = bob.update(6, AT + 30);
    for device in [&mut alice, &mut bob, &mut carol] {
        let body = device.apply(&next).unwrap();
        assert!(matches!(body, Some(EntryBody::Membership { epoch: 2, .. })), "{body:?}");
    }
    assert!(alice.tree_hash() == bob.tree_hash() && bob.tree_hash() == carol.tree_hash());
    let sealed = carol.seal(b"back in business");
    let message = stamp(sealed.frame, 7, AT + 40);
    for device in [&mut alice, &mut bob] {
        assert_eq!(device.apply(&message).unwrap(), Some(EntryBody::Text(b"back in business".to_vec())));
    }
}

#[test]
fn a_member_that_applied_a_voided_commit_rolls_back_its_group_and_sender_keys() {
    let (mut alice, mut bob, mut carol) = three_members();
    // Carol speaks in epoch 1 before the commit.
    let sealed = carol.seal(b"before");
    let before = sealed.generation;
    let early = stamp(sealed.frame, 3, AT - 100);
    for device in [&mut alice, &mut bob, &mut carol] {
        device.apply(&early).unwrap();
    }
    // Bob's valid commit; everyone applies it; Carol speaks in epoch 2.
    let (commit, _) = bob.update(4, AT);
    for device in [&mut alice, &mut bob, &mut carol] {
        device.apply(&commit).unwrap();
        assert_eq!(device.log().unsettled_commit(), Some(4));
    }
    let sealed = carol.seal(b"in epoch 2");
    let late = stamp(sealed.frame, 5, AT + 10);
    assert!(matches!(alice.apply(&late).unwrap(), Some(EntryBody::Text(_))));
    bob.apply(&late).unwrap();
    carol.apply(&late).unwrap();
    // The server voids it (say, its admin asked): everyone rolls back.
    let voided = void(4, 1, 6, AT + 20);
    for device in [&mut alice, &mut bob, &mut carol] {
        device.apply(&voided).unwrap();
        assert_eq!(device.log().epoch(), 1);
    }
    assert_eq!(bob.log().take_redo(), Some(Intent::Update), "the committer redoes its intent");
    assert_eq!(alice.log().take_redo(), None);
    // Carol's sending chain of epoch 1 goes on where it was: no generation is used twice.
    let resent = carol.seal(b"in epoch 2");
    assert_eq!((resent.epoch, resent.generation), (1, before + 1));
    let message = stamp(resent.frame, 7, AT + 30);
    for device in [&mut alice, &mut bob] {
        assert_eq!(device.apply(&message).unwrap(), Some(EntryBody::Text(b"in epoch 2".to_vec())));
    }
    assert!(alice.tree_hash() == bob.tree_hash() && bob.tree_hash() == carol.tree_hash());
}

#[test]
fn a_frame_stamped_after_the_window_or_a_later_commit_settles_the_commit() {
    let (mut alice, mut bob, _carol) = three_members();
    let (commit, _) = bob.update(3, AT);
    alice.apply(&commit).unwrap();
    bob.apply(&commit).unwrap();
    let message = |device: &mut Device, log_index, at_ms| {
        let sealed = device.seal(b"tick");
        stamp(sealed.frame, log_index, at_ms)
    };
    let inside = message(&mut bob, 4, AT + COMMIT_VOID_WINDOW_MS - 1);
    alice.apply(&inside).unwrap();
    assert_eq!(alice.log().unsettled_commit(), Some(3), "still voidable");
    let after = message(&mut bob, 5, AT + COMMIT_VOID_WINDOW_MS);
    alice.apply(&after).unwrap();
    assert_eq!(alice.log().unsettled_commit(), None, "settled: the undo record is gone");
    // No void can follow a settled commit: one would be a broken server.
    let error = alice.apply(&void(3, 1, 6, AT + 1)).unwrap_err();
    assert!(matches!(&error, RoomLogError::Protocol(m) if m.contains("CommitVoided")), "{error:?}");

    // A later commit settles too, whatever its time.
    let (mut alice, mut bob, _carol) = three_members();
    let (first, _) = bob.update(3, AT);
    alice.apply(&first).unwrap();
    bob.apply(&first).unwrap();
    let (second, _) = bob.update(4, AT + 1);
    alice.apply(&second).unwrap();
    assert_eq!(alice.log().unsettled_commit(), Some(4));
}

#[test]
fn a_member_stuck_past_the_window_drops_its_group_and_rejoins() {
    let (mut alice, mut bob, mut carol) = three_members();
    let bad = bad_update(&mut carol);
    alice.apply(&bad).unwrap();
    bob.apply(&bad).unwrap();
    carol.apply(&bad).unwrap();
    // Nobody voided it; a frame stamped after the window settles it.
    let sealed = carol.seal(b"later");
    let late = stamp(sealed.frame, 4, AT + COMMIT_VOID_WINDOW_MS);
    assert!(alice.apply(&late).unwrap().is_none());
    assert_eq!(alice.log().state(), ClientState::PendingWelcome);
    assert!(alice.log().group().is_none());
    assert!(alice.log().rejoin_needed());
    assert!(alice.log().take_rejoin());
    assert!(!alice.log().take_rejoin());
    // Bob learns it from the server's answer to his report instead.
    bob.log().take_report().unwrap();
    let settled = payload::Error {
        code: ErrorCode::CommitSettled.to_u16(),
        message: String::new(),
        current_epoch: None,
        log_index: None,
        retry_after_ms: None,
        frame_digest: None,
    };
    let log = bob.log.as_mut().unwrap();
    log.report_refused(&bob.provider, &settled).unwrap();
    assert!(bob.log().rejoin_needed());
    assert_eq!(bob.log().state(), ClientState::PendingWelcome);
    // Rejoining: the old group is gone from storage, so a new one can take its place.
    assert!(RoomGroup::load(&bob.provider, ROOM.0).unwrap().is_none());
}

/// A rejoin builds its group under the room's id before the server has
/// answered; the device may stop (or checkpoint) in between. The log that
/// dropped its group must not take that group for its own when restored:
/// it would read the room at the join's epoch from its old cursor.
#[test]
fn a_log_to_be_rejoined_is_restored_without_a_group_stored_under_the_room_since() {
    let (mut alice, mut bob, mut carol) = three_members();
    let bad = bad_update(&mut carol);
    alice.apply(&bad).unwrap();
    bob.apply(&bad).unwrap();
    let sealed = bob.seal(b"later");
    alice.apply(&stamp(sealed.frame, 4, AT + COMMIT_VOID_WINDOW_MS)).unwrap();
    assert!(alice.log().rejoin_needed() && alice.log().group().is_none());
    // Another group under the room's id (in the device, a rejoin's own).
    let server_key = SigningKey::from_bytes(&[42u8; 32]).verifying_key().to_bytes();
    RoomGroup::create(&alice.provider, &alice.identity, ROOM.0, &server_key, now_s()).unwrap();
    assert!(RoomGroup::load(&alice.provider, ROOM.0).unwrap().is_some());

    let record: RoomRecord = roundtrip(alice.log().checkpoint_record());
    let restored = RoomLog::restore(&alice.provider, record).unwrap();
    assert!(restored.group().is_none(), "the stored group is not this log's");
    assert!(restored.rejoin_needed() && !restored.is_member());
    assert_eq!(restored.state(), ClientState::Disconnected { resume: Resume::Join });
    assert_eq!(restored.next_log_index(), 5);
}

#[test]
fn a_commit_pending_when_the_room_got_stuck_is_merged_if_the_server_sequences_it_after_the_void() {
    // Bob's update for epoch 1 is on its way when Carol's damaged commit
    // for epoch 1 is sequenced; the void makes the room take Bob's after all.
    let (mut alice, mut bob, mut carol) = three_members();
    let (bobs, _) = bob.update(5, AT + 30);
    let bad = bad_update(&mut carol);
    for device in [&mut alice, &mut bob, &mut carol] {
        device.apply(&bad).unwrap();
    }
    assert_eq!(bob.log().state(), ClientState::Stuck { epoch: 1, log_index: 3, pending_commit: true });
    assert!(bob.log().pending_commit().is_some(), "kept while stuck");
    // It survives a restart, stuck and pending.
    let record: RoomRecord = roundtrip(bob.log().checkpoint_record());
    let restored = RoomLog::restore(&bob.provider, record).unwrap();
    assert_eq!(
        restored.state(),
        ClientState::Disconnected {
            resume: client_core::state::Resume::Stuck { epoch: 1, log_index: 3, pending_commit: true }
        }
    );
    let voided = void(3, 1, 4, AT + 20);
    for device in [&mut alice, &mut bob, &mut carol] {
        device.apply(&voided).unwrap();
    }
    assert_eq!(
        bob.log().state(),
        ClientState::PendingCommit { target_epoch: 2, kind: client_core::state::CommitKind::Member }
    );
    for device in [&mut alice, &mut bob, &mut carol] {
        let body = device.apply(&bobs).unwrap();
        assert!(matches!(body, Some(EntryBody::Membership { epoch: 2, .. })), "{body:?}");
        assert_eq!(device.log().state(), ClientState::Synchronized { epoch: 2 });
    }
    assert!(bob.log().pending_commit().is_none());
    assert_eq!(bob.log().take_redo(), None, "merged, nothing to redo");
    assert_eq!(carol.log().take_redo(), Some(Intent::Update), "the voided committer redoes");
    assert!(alice.tree_hash() == bob.tree_hash() && bob.tree_hash() == carol.tree_hash());
    let sealed = bob.seal(b"after all");
    let message = stamp(sealed.frame, 6, AT + 40);
    for device in [&mut alice, &mut carol] {
        assert_eq!(device.apply(&message).unwrap(), Some(EntryBody::Text(b"after all".to_vec())));
    }
}

#[test]
fn a_commit_pending_when_the_room_got_stuck_is_redone_once_refused_or_once_the_stuck_commit_settles() {
    let refusal = |code: ErrorCode, current_epoch| payload::Error {
        code: code.to_u16(),
        message: String::new(),
        current_epoch,
        log_index: Some(3),
        retry_after_ms: None,
        frame_digest: None,
    };
    // Refused while stuck (the room was at epoch 2 when it arrived).
    let (_, mut bob, mut carol) = three_members();
    bob.update(4, AT + 30);
    let bad = bad_update(&mut carol);
    bob.apply(&bad).unwrap();
    let log = bob.log.as_mut().unwrap();
    let refused = log.commit_refused(&bob.provider, Some(&refusal(ErrorCode::WrongEpoch, Some(2)))).unwrap();
    assert!(matches!(refused, client_core::room_log::CommitRefusal::Retry { intent: Intent::Update, .. }));
    assert_eq!(bob.log().state(), ClientState::Stuck { epoch: 1, log_index: 3, pending_commit: false });
    assert!(bob.log().pending_commit().is_none());
    assert!(!bob.log().group().unwrap().has_pending_commit());

    // Never answered, and the stuck commit settles: rejoin, and redo the intent.
    let (_, mut bob, mut carol) = three_members();
    bob.update(4, AT + 30);
    let bad = bad_update(&mut carol);
    bob.apply(&bad).unwrap();
    carol.apply(&bad).unwrap();
    let sealed = carol.seal(b"later");
    let late = stamp(sealed.frame, 4, AT + COMMIT_VOID_WINDOW_MS);
    bob.apply(&late).unwrap();
    assert_eq!(bob.log().state(), ClientState::PendingWelcome);
    assert!(bob.log().rejoin_needed());
    assert!(bob.log().pending_commit().is_none());
    assert_eq!(bob.log().take_redo(), Some(Intent::Update));
}

#[test]
fn the_helper_alters_only_a_members_commit() {
    assert!(test_support::corrupt_confirmation_tag(b"short").is_none());
    let (_, _, mut carol) = three_members();
    let (_, commit) = carol.update(3, AT);
    let corrupted = test_support::corrupt_confirmation_tag(&commit).unwrap();
    assert_eq!(corrupted.len(), commit.len());
    let differing: Vec<usize> = (0..commit.len()).filter(|i| commit[*i] != corrupted[*i]).collect();
    assert_eq!(differing, vec![commit.len() - 34]);
}

#[test]
fn the_forged_group_info_carries_the_altered_tag_under_a_valid_signature() {
    let (mut alice, _, _) = three_members();
    let output = {
        let (provider, identity) = (&alice.provider, &alice.identity);
        alice.log.as_mut().unwrap().group_mut().unwrap().self_update(provider, identity).unwrap()
    };
    let (commit, group_info) =
        test_support::corrupt_confirmation_tag_and_group_info(&output.commit, &output.group_info, &alice.key)
            .unwrap();
    assert_eq!(commit, test_support::corrupt_confirmation_tag(&output.commit).unwrap());
    let changed: Vec<usize> =
        (0..group_info.len() - 66).filter(|i| group_info[*i] != output.group_info[*i]).collect();
    assert_eq!(changed, vec![group_info.len() - 66 - 5], "only the tag's last byte, before the signer");
    // A joiner verifies the GroupInfo's signature: the forged one passes, a
    // tampered one without the new signature does not.
    let joiner = Device::new(30);
    let tree = Some(output.ratchet_tree.as_slice());
    RoomGroup::join_by_external_commit(&joiner.provider, &joiner.identity, &group_info, tree).unwrap();
    let mut unsigned = output.group_info.clone();
    unsigned[group_info.len() - 66 - 5] ^= 0x01;
    let other = Device::new(31);
    assert!(RoomGroup::join_by_external_commit(&other.provider, &other.identity, &unsigned, tree).is_err());
}
