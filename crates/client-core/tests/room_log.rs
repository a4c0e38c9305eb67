//! `RoomLog`, the pure application of a room's log, on real MLS groups.

use std::time::{SystemTime, UNIX_EPOCH};

use client_core::mls::{generate_key_packages, Identity, MlsProvider, RoomGroup};
use client_core::room_log::{CommitRefusal, EntryBody, Intent, RoomLog, RoomLogError, SentMessage};
use client_core::state::ClientState;
use ed25519_dalek::SigningKey;
use kalandra_proto::payload::{self, Commit, CreateRoom, Welcome};
use kalandra_proto::{ErrorCode, Frame, FrameHeaderBuf, Payload, RoomId, SenderId};

const ROOM: RoomId = RoomId(*b"room-log-tests!!");

struct Device {
    provider: MlsProvider,
    identity: Identity,
    key: SigningKey,
}

impl Device {
    fn new(seed: u8) -> Device {
        let provider = MlsProvider::from_seed([seed; 32]);
        let identity = Identity::generate(&provider).unwrap();
        let key = SigningKey::from_bytes(&identity.secret_bytes());
        Device { provider, identity, key }
    }

    fn sender(&self) -> SenderId {
        SenderId::from_identity_key(self.identity.public_key())
    }

    /// A frame of ours as the server sequences it at `log_index`.
    fn sequenced<P: Payload>(&self, payload: &P, epoch: u64, log_index: u64) -> Frame {
        let mut header = FrameHeaderBuf::new(P::OPCODE);
        header.set_room_id(ROOM).set_sender_id(self.sender()).set_epoch(epoch);
        let mut frame = Frame::with_payload(header, payload).unwrap();
        frame.sign(&self.key);
        stamp(frame, log_index)
    }
}

fn stamp(mut frame: Frame, log_index: u64) -> Frame {
    frame.header_mut().set_log_index(log_index).set_server_timestamp_ms(1_000 + log_index);
    frame
}

fn now_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// Alice creates the room (log index 0) and adds Bob (index 1); both are
/// at epoch 1 with their cursors at 2.
fn two_members() -> ((Device, RoomLog), (Device, RoomLog)) {
    let (alice, bob) = (Device::new(1), Device::new(2));
    let server_key = SigningKey::from_bytes(&[42u8; 32]).verifying_key().to_bytes();
    let (group, created) =
        RoomGroup::create(&alice.provider, &alice.identity, ROOM.0, &server_key, now_s()).unwrap();
    let create = alice.sequenced(
        &CreateRoom { group_info: created.group_info, ratchet_tree: created.ratchet_tree, join_rule: None },
        0,
        0,
    );
    let mut alice_log = RoomLog::created(&alice.provider, group, create.to_bytes().to_vec()).unwrap();
    alice_log.creation_confirmed();
    assert_eq!(alice_log.next_log_index(), 1);

    let package = generate_key_packages(&bob.provider, &bob.identity, 1, now_s()).unwrap().remove(0).message;
    let output =
        alice_log.group_mut().unwrap().add_members(&alice.provider, &alice.identity, &[&package]).unwrap();
    let commit = Commit {
        commit: output.commit,
        welcome: output.welcome.clone(),
        welcome_recipients: vec![bob.sender().0],
        group_info: Some(output.group_info),
    };
    let frame = alice.sequenced(&commit, 0, 1);
    alice_log.commit_sent(frame.to_bytes().to_vec(), 0, Intent::Invite(vec![bob.sender().0])).unwrap();
    let entry = alice_log.apply(&alice.provider, alice.sender(), &frame, []).unwrap().unwrap();
    assert!(matches!(entry.body, EntryBody::Membership { epoch: 1, .. }), "{entry:?}");
    assert_eq!(alice_log.state(), ClientState::Synchronized { epoch: 1 });
    assert!(alice_log.pending_commit().is_none());

    let welcome =
        Welcome { welcome: output.welcome.unwrap(), ratchet_tree: Some(output.ratchet_tree), log_head: None };
    let mut header = FrameHeaderBuf::new(Welcome::OPCODE);
    header.set_room_id(ROOM).set_log_index(1);
    let welcome = Frame::with_payload(header, &welcome).unwrap();
    let bob_log = RoomLog::join_from_welcome(&bob.provider, ROOM, &welcome).unwrap();
    assert_eq!((bob_log.next_log_index(), bob_log.epoch()), (2, 1));
    ((alice, alice_log), (bob, bob_log))
}

#[test]
fn messages_are_read_by_others_and_settle_our_outbox_by_epoch_and_generation() {
    let ((alice, mut alice_log), (bob, mut bob_log)) = two_members();
    let sealed = alice_log.seal(b"hello", &alice.key).unwrap();
    let frame = stamp(sealed.frame.clone(), 2);
    let read = bob_log.apply(&bob.provider, bob.sender(), &frame, []).unwrap().unwrap();
    assert_eq!(read.body, EntryBody::Text(b"hello".to_vec()));
    assert_eq!((read.log_index, read.sender), (2, alice.sender()));

    let other = SentMessage { id: 6, epoch: 1, generation: sealed.generation + 1 };
    let ours = SentMessage { id: 7, epoch: sealed.epoch, generation: sealed.generation };
    let settled = alice_log.apply(&alice.provider, alice.sender(), &frame, [other, ours]).unwrap().unwrap();
    assert_eq!(settled.body, EntryBody::Own { outbox_id: 7 });
    // Applied already: the cursor ignores it.
    assert!(alice_log.apply(&alice.provider, alice.sender(), &frame, [ours]).unwrap().is_none());
    assert_eq!(alice_log.next_log_index(), 3);
}

#[test]
fn a_gap_in_the_log_is_a_protocol_error() {
    let ((alice, mut alice_log), (bob, mut bob_log)) = two_members();
    let sealed = alice_log.seal(b"late", &alice.key).unwrap();
    let error = bob_log.apply(&bob.provider, bob.sender(), &stamp(sealed.frame, 5), []).unwrap_err();
    assert!(matches!(&error, RoomLogError::Protocol(m) if m.contains("a gap")), "{error:?}");
    assert_eq!(bob_log.next_log_index(), 2);
}

#[test]
fn another_commit_for_our_epoch_discards_ours_and_keeps_the_intent_and_an_older_commit_is_a_fork() {
    let ((alice, mut alice_log), (bob, mut bob_log)) = two_members();
    let update = |device: &Device, log: &mut RoomLog, log_index| {
        let output = log.group_mut().unwrap().self_update(&device.provider, &device.identity).unwrap();
        let commit =
            Commit { commit: output.commit, welcome: None, welcome_recipients: vec![], group_info: None };
        let frame = device.sequenced(&commit, 1, log_index);
        log.commit_sent(frame.to_bytes().to_vec(), 1, Intent::Update).unwrap();
        frame
    };
    let alices = update(&alice, &mut alice_log, 3);
    let bobs = update(&bob, &mut bob_log, 2);
    // Bob's commit wins the epoch at index 2.
    bob_log.apply(&bob.provider, bob.sender(), &bobs, []).unwrap();
    let entry = alice_log.apply(&alice.provider, alice.sender(), &bobs, []).unwrap().unwrap();
    assert!(matches!(entry.body, EntryBody::Membership { epoch: 2, .. }), "{entry:?}");
    assert_eq!(alice_log.state(), ClientState::Synchronized { epoch: 2 });
    assert!(alice_log.pending_commit().is_none());
    assert_eq!(alice_log.take_redo(), Some(Intent::Update));
    assert_eq!(bob_log.state(), ClientState::Synchronized { epoch: 2 });
    // A server that sequenced Alice's commit of epoch 1 too forked the room.
    let error = bob_log.apply(&bob.provider, bob.sender(), &alices, []).unwrap_err();
    assert!(
        matches!(&error, RoomLogError::Protocol(m) if m.contains("two commits for one epoch")),
        "{error:?}"
    );
}

#[test]
fn a_wrong_epoch_refusal_discards_our_commit_and_retries_its_intent_other_refusals_are_final() {
    let ((alice, mut alice_log), _) = two_members();
    let refuse = |log: &mut RoomLog, code: ErrorCode| {
        let output = log.group_mut().unwrap().self_update(&alice.provider, &alice.identity).unwrap();
        let commit =
            Commit { commit: output.commit, welcome: None, welcome_recipients: vec![], group_info: None };
        log.commit_sent(alice.sequenced(&commit, 1, 0).to_bytes().to_vec(), 1, Intent::Update).unwrap();
        let error = payload::Error {
            code: code.to_u16(),
            message: String::new(),
            current_epoch: Some(2),
            log_index: Some(2),
            retry_after_ms: None,
            frame_digest: None,
        };
        let refusal = log.commit_refused(&alice.provider, Some(&error)).unwrap();
        assert!(!log.group().unwrap().has_pending_commit());
        assert_eq!(log.state(), ClientState::Synchronized { epoch: 1 });
        refusal
    };
    assert_eq!(
        refuse(&mut alice_log, ErrorCode::WrongEpoch),
        CommitRefusal::Retry { intent: Intent::Update, sync_from: 2 }
    );
    assert_eq!(refuse(&mut alice_log, ErrorCode::Forbidden), CommitRefusal::Final);
    // No commit pending: an answer to one is a bug the state machine names.
    assert!(matches!(alice_log.commit_refused(&alice.provider, None), Err(RoomLogError::Internal(_))));
}

/// Found by the simulation: a member removed by a commit while a commit of
/// its own waits was refused by the room log as a disagreement between the
/// state machine and the MLS group. Removal discards the pending commit;
/// nothing is redone.
#[test]
fn a_removal_while_our_commit_is_pending_discards_it_and_redoes_nothing() {
    let ((alice, mut alice_log), (bob, mut bob_log)) = two_members();
    let output = bob_log.group_mut().unwrap().self_update(&bob.provider, &bob.identity).unwrap();
    let commit =
        Commit { commit: output.commit, welcome: None, welcome_recipients: vec![], group_info: None };
    let bobs = bob.sequenced(&commit, 1, 3);
    bob_log.commit_sent(bobs.to_bytes().to_vec(), 1, Intent::Update).unwrap();
    let bob_leaf = alice_log
        .group()
        .unwrap()
        .members()
        .into_iter()
        .find(|m| m.identity.as_slice() == bob.identity.public_key().as_slice())
        .unwrap()
        .leaf_index;
    let output =
        alice_log.group_mut().unwrap().remove_members(&alice.provider, &alice.identity, &[bob_leaf]).unwrap();
    let commit =
        Commit { commit: output.commit, welcome: None, welcome_recipients: vec![], group_info: None };
    let removal = alice.sequenced(&commit, 1, 2);
    alice_log.commit_sent(removal.to_bytes().to_vec(), 1, Intent::Remove(vec![bob.sender().0])).unwrap();
    alice_log.apply(&alice.provider, alice.sender(), &removal, []).unwrap();

    let entry = bob_log.apply(&bob.provider, bob.sender(), &removal, []).unwrap().unwrap();
    assert!(matches!(entry.body, EntryBody::Membership { epoch: 2, .. }), "{entry:?}");
    assert!(!bob_log.is_member());
    assert!(bob_log.pending_commit().is_none());
    assert_eq!(bob_log.take_redo(), None);
    assert_eq!(bob_log.state(), ClientState::PendingWelcome);
}

/// Alice adds Carol to `two_members`' room (log index 2, epoch 2).
fn three_members() -> ((Device, RoomLog), (Device, RoomLog), (Device, RoomLog)) {
    let ((alice, mut alice_log), (bob, mut bob_log)) = two_members();
    let carol = Device::new(3);
    let package =
        generate_key_packages(&carol.provider, &carol.identity, 1, now_s()).unwrap().remove(0).message;
    let output =
        alice_log.group_mut().unwrap().add_members(&alice.provider, &alice.identity, &[&package]).unwrap();
    let commit = Commit {
        commit: output.commit,
        welcome: output.welcome.clone(),
        welcome_recipients: vec![carol.sender().0],
        group_info: Some(output.group_info),
    };
    let frame = alice.sequenced(&commit, 1, 2);
    alice_log.commit_sent(frame.to_bytes().to_vec(), 1, Intent::Invite(vec![carol.sender().0])).unwrap();
    alice_log.apply(&alice.provider, alice.sender(), &frame, []).unwrap();
    bob_log.apply(&bob.provider, bob.sender(), &frame, []).unwrap();
    let welcome =
        Welcome { welcome: output.welcome.unwrap(), ratchet_tree: Some(output.ratchet_tree), log_head: None };
    let mut header = FrameHeaderBuf::new(Welcome::OPCODE);
    header.set_room_id(ROOM).set_log_index(2);
    let welcome = Frame::with_payload(header, &welcome).unwrap();
    let carol_log = RoomLog::join_from_welcome(&carol.provider, ROOM, &welcome).unwrap();
    assert_eq!([alice_log.epoch(), bob_log.epoch(), carol_log.epoch()], [2, 2, 2]);
    ((alice, alice_log), (bob, bob_log), (carol, carol_log))
}

#[test]
fn a_member_whose_removal_is_proposed_never_covers_proposals_even_beside_others() {
    let ((alice, mut alice_log), (bob, mut bob_log), (carol, mut carol_log)) = three_members();
    // Bob leaves, then Carol: two pending Remove proposals.
    for (index, leaver) in (3..).zip([&bob, &carol]) {
        let log = if std::ptr::eq(leaver, &bob) { &mut bob_log } else { &mut carol_log };
        let output = log.group_mut().unwrap().leave(&leaver.provider, &leaver.identity).unwrap();
        let frame = leaver.sequenced(&payload::Proposal { proposal: output.proposal }, 2, index);
        for (device, log) in [(&alice, &mut alice_log), (&bob, &mut bob_log), (&carol, &mut carol_log)] {
            log.apply(&device.provider, device.sender(), &frame, []).unwrap();
        }
    }
    assert!(alice_log.proposals_to_cover(), "Alice commits both removals");
    for log in [&bob_log, &carol_log] {
        assert!(log.own_removal_pending());
        assert!(!log.proposals_to_cover(), "a commit of ours would carry our own removal");
    }
}

/// The server's key in [`two_members`]: the room's external sender.
fn server_signing_key() -> SigningKey {
    SigningKey::from_bytes(&[42u8; 32])
}

/// Both members anchor their chains on the head the server states where
/// they stand, extend it with every frame they apply, and take a signed
/// head only when it is the head of what they applied: a second head for
/// one index, or a head that does not match the frames, is a violation
/// carrying the server's signature(s), kept in the room's record.
#[test]
fn signed_heads_are_checked_against_the_frames_applied() {
    use client_core::room_log::{ChainViolation, LogHeadError};
    use kalandra_proto::chain::{frame_digest, next_log_head, SignedLogHead};
    let server = server_signing_key();
    let ((alice, mut alice_log), (bob, mut bob_log)) = two_members();
    let head_1 = [1u8; 32];
    let ack_1 = payload::Ack {
        log_index: 1,
        epoch: 1,
        server_time_ms: 1_001,
        log_head: Some(head_1),
        signed_head: None,
    };
    alice_log.acknowledged(&ack_1).unwrap();
    bob_log.check_signed_head(&SignedLogHead::sign(ROOM, 1, head_1, &server)).unwrap();

    let message = stamp(alice_log.seal(b"hello", &alice.key).unwrap().frame, 2);
    let head_2 = next_log_head(ROOM, 2, &head_1, &frame_digest(&message.to_bytes()));
    // Bob hears of index 2's head before he applies it: checked once he has.
    let signed_2 = SignedLogHead::sign(ROOM, 2, head_2, &server);
    bob_log.check_signed_head(&signed_2).unwrap();
    assert_eq!(bob_log.log_head().map(|s| s.log_index), Some(1));
    bob_log.apply(&bob.provider, bob.sender(), &message, []).unwrap();
    alice_log.step_over_own(&message);
    alice_log.check_signed_head(&signed_2).unwrap();
    for log in [&alice_log, &bob_log] {
        assert_eq!(log.applied_chain().map(|c| (c.next_log_index, c.head)), Some((3, head_2)));
        assert_eq!(log.log_head(), Some(signed_2));
        assert_eq!(log.chain_violation(), None);
    }

    // A forged signature is refused and changes nothing.
    let forged = SignedLogHead { signature: [7; 64], ..SignedLogHead::sign(ROOM, 2, [9; 32], &server) };
    assert_eq!(bob_log.check_signed_head(&forged), Err(LogHeadError::BadSignature { room_id: ROOM }));
    // Two signed heads for index 2: the proof is both signatures.
    let other_2 = SignedLogHead::sign(ROOM, 2, [9; 32], &server);
    let expected = ChainViolation::Equivocation { first: signed_2, second: other_2 };
    assert_eq!(
        bob_log.check_signed_head(&other_2),
        Err(LogHeadError::Violation { room_id: ROOM, violation: Box::new(expected) })
    );
    assert_eq!(bob_log.chain_violation(), Some(expected));

    // A head for index 3 that the frame then applied there does not produce.
    let lie_3 = SignedLogHead::sign(ROOM, 3, [3; 32], &server);
    alice_log.check_signed_head(&lie_3).unwrap();
    let next = stamp(bob_log.seal(b"again", &bob.key).unwrap().frame, 3);
    alice_log.apply(&alice.provider, alice.sender(), &next, []).unwrap();
    let applied = next_log_head(ROOM, 3, &head_2, &frame_digest(&next.to_bytes()));
    assert_eq!(alice_log.chain_violation(), Some(ChainViolation::Mismatch { signed: lie_3, applied }));
    // The record keeps the proof across a checkpoint.
    let record = alice_log.checkpoint_record().clone();
    let restored = RoomLog::restore(&alice.provider, record).unwrap();
    assert_eq!(restored.chain_violation(), alice_log.chain_violation());
}

/// An erased entry's placeholder carries the erased frame's digest: a
/// device that reads the placeholder reaches the same head as one that
/// read the frame.
#[test]
fn a_placeholder_extends_the_chain_with_the_erased_frames_digest() {
    use kalandra_proto::chain::{frame_digest, SignedLogHead};
    let server = server_signing_key();
    let ((alice, mut alice_log), (bob, mut bob_log)) = two_members();
    for log in [&mut alice_log, &mut bob_log] {
        log.check_signed_head(&SignedLogHead::sign(ROOM, 1, [1; 32], &server)).unwrap();
    }
    let message = stamp(alice_log.seal(b"to be erased", &alice.key).unwrap().frame, 2);
    alice_log.step_over_own(&message);
    let error = payload::Error {
        code: ErrorCode::Redacted.to_u16(),
        message: "content erased".into(),
        current_epoch: None,
        log_index: Some(2),
        retry_after_ms: None,
        frame_digest: Some(frame_digest(&message.to_bytes())),
    };
    let mut header = FrameHeaderBuf::new(payload::Error::OPCODE);
    header.set_room_id(ROOM).set_log_index(2).set_sender_id(alice.sender());
    let placeholder = Frame::with_payload(header, &error).unwrap();
    bob_log.apply(&bob.provider, bob.sender(), &placeholder, []).unwrap();
    assert_eq!(bob_log.applied_chain(), alice_log.applied_chain());
    assert_eq!(bob_log.applied_chain().map(|c| c.next_log_index), Some(3));
}
