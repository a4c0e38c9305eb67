//! Sender keys between members: round trips, the binding of every routing
//! field, replay and reordering rules, the skipped-key bounds, signatures,
//! and agreement between real MLS groups.

mod common;
use bytes::Bytes;
use client_core::sender_keys::{
    associated_data, open_application, seal_application, verify_sender, DecryptError, EncryptError,
    OpenError, SealError, Sealed, SenderError, SenderKeyState, GENERATION_JUMP_MAX, PLAINTEXT_BYTES_MAX,
    SKIPPED_KEYS_PER_EPOCH_MAX, SKIPPED_KEYS_PER_SENDER_MAX,
};
use ed25519_dalek::SigningKey;
use kalandra_proto::payload::{Application, Typing};
use kalandra_proto::{Frame, FrameHeaderBuf, Opcode, RoomId, SenderId, SignatureError};
use proptest::prelude::*;

const ROOM: RoomId = RoomId(*b"sender-keys-room");
const OTHER_ROOM: RoomId = RoomId(*b"another-room-id!");
const EPOCH: u64 = 4;
const SECRET: [u8; 32] = [0x5a; 32];
const ALICE: u32 = 0;
const BOB: u32 = 1;
const CAROL: u32 = 2;
const MEMBERS: [u32; 3] = [ALICE, BOB, CAROL];

fn signing_key(leaf: u32) -> SigningKey {
    let mut seed = [0x11u8; 32];
    seed[0] = u8::try_from(leaf).expect("small leaf");
    SigningKey::from_bytes(&seed)
}

fn identity_key(leaf: u32) -> [u8; 32] {
    signing_key(leaf).verifying_key().to_bytes()
}

fn sender_id(leaf: u32) -> SenderId {
    SenderId::from_identity_key(&identity_key(leaf))
}

fn member(leaf: u32) -> SenderKeyState {
    SenderKeyState::new(ROOM, EPOCH, &SECRET, leaf, MEMBERS)
}

/// `count` messages from `leaf`, the i-th with plaintext `[i as u8; 3]`.
fn messages(leaf: u32, count: usize) -> Vec<Sealed> {
    let mut sender = SenderKeyState::new(ROOM, EPOCH, &SECRET, leaf, 0..16);
    (0..count).map(|index| sender.encrypt(sender_id(leaf), &plaintext(index)).expect("encrypt")).collect()
}

fn plaintext(index: usize) -> Vec<u8> {
    vec![u8::try_from(index % 256).expect("modulo 256"); 3]
}

fn decrypt(state: &mut SenderKeyState, leaf: u32, sealed: &Sealed) -> Result<Vec<u8>, DecryptError> {
    state.decrypt(leaf, sender_id(leaf), sealed.generation, &sealed.ciphertext)
}

#[test]
fn members_derive_the_same_chains_and_round_trip_in_order() {
    let mut alice = member(ALICE);
    let mut bob = member(BOB);
    let mut carol = member(CAROL);
    for index in 0..5 {
        let sealed = alice.encrypt(sender_id(ALICE), &plaintext(index)).expect("encrypt");
        assert_eq!(sealed.generation, u32::try_from(index).expect("small"));
        assert_eq!(decrypt(&mut bob, ALICE, &sealed), Ok(plaintext(index)));
        assert_eq!(decrypt(&mut carol, ALICE, &sealed), Ok(plaintext(index)));
    }
    assert_eq!(alice.next_send_generation(), Some(5));
    let reply = bob.encrypt(sender_id(BOB), b"reply").expect("encrypt");
    assert_eq!(decrypt(&mut alice, BOB, &reply).as_deref(), Ok(&b"reply"[..]));
    assert_eq!(bob.stored_skipped_keys() + carol.stored_skipped_keys(), 0);
}

#[test]
fn ciphertexts_differ_per_generation_and_hide_the_plaintext() {
    let sealed = messages(ALICE, 2);
    assert_ne!(sealed[0].ciphertext, sealed[1].ciphertext);
    let mut again = member(ALICE);
    let first = again.encrypt(sender_id(ALICE), &[0; 3]).expect("encrypt");
    assert_eq!(first.ciphertext.len(), 3 + 16);
    assert_ne!(&first.ciphertext[..3], &[0; 3]);
}

#[test]
fn associated_data_has_the_documented_layout() {
    let aad = associated_data(
        RoomId([0xAA; 16]),
        SenderId(0x0102_0304_0506_0708),
        0x1112_1314_1516_1718,
        0x2122_2324,
    );
    let mut expected = vec![0xAA; 16];
    expected.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
    expected.extend_from_slice(&[0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18]);
    expected.extend_from_slice(&[0x01, 0x12]);
    expected.extend_from_slice(&[0x21, 0x22, 0x23, 0x24]);
    assert_eq!(aad.as_slice(), expected.as_slice());
}

#[test]
fn another_room_id_fails_authentication() {
    let sealed = messages(ALICE, 1);
    // Same epoch secret, so the chains are equal: only the associated data differs.
    let mut elsewhere = SenderKeyState::new(OTHER_ROOM, EPOCH, &SECRET, BOB, MEMBERS);
    assert_eq!(
        decrypt(&mut elsewhere, ALICE, &sealed[0]),
        Err(DecryptError::Authentication { leaf: ALICE, generation: 0 })
    );
    assert_eq!(decrypt(&mut member(BOB), ALICE, &sealed[0]), Ok(plaintext(0)));
}

#[test]
fn another_epoch_fails_authentication() {
    let sealed = messages(ALICE, 1);
    let mut later = SenderKeyState::new(ROOM, EPOCH + 1, &SECRET, BOB, MEMBERS);
    assert_eq!(
        decrypt(&mut later, ALICE, &sealed[0]),
        Err(DecryptError::Authentication { leaf: ALICE, generation: 0 })
    );
}

#[test]
fn another_sender_id_fails_authentication() {
    let sealed = messages(ALICE, 1);
    let mut bob = member(BOB);
    assert_eq!(
        bob.decrypt(ALICE, sender_id(CAROL), 0, &sealed[0].ciphertext),
        Err(DecryptError::Authentication { leaf: ALICE, generation: 0 })
    );
    assert_eq!(decrypt(&mut bob, ALICE, &sealed[0]), Ok(plaintext(0)));
}

#[test]
fn another_generation_fails_authentication_and_changes_nothing() {
    let sealed = messages(ALICE, 2);
    let mut bob = member(BOB);
    assert_eq!(
        bob.decrypt(ALICE, sender_id(ALICE), 1, &sealed[0].ciphertext),
        Err(DecryptError::Authentication { leaf: ALICE, generation: 1 })
    );
    assert_eq!(
        bob.decrypt(ALICE, sender_id(ALICE), 0, &sealed[1].ciphertext),
        Err(DecryptError::Authentication { leaf: ALICE, generation: 0 })
    );
    assert_eq!(bob.stored_skipped_keys(), 0);
    assert_eq!(decrypt(&mut bob, ALICE, &sealed[0]), Ok(plaintext(0)));
    assert_eq!(decrypt(&mut bob, ALICE, &sealed[1]), Ok(plaintext(1)));
}

#[test]
fn another_chain_or_epoch_secret_fails_authentication() {
    let sealed = messages(ALICE, 1);
    let mut bob = member(BOB);
    assert_eq!(
        bob.decrypt(CAROL, sender_id(ALICE), 0, &sealed[0].ciphertext),
        Err(DecryptError::Authentication { leaf: CAROL, generation: 0 })
    );
    let mut other_secret = SenderKeyState::new(ROOM, EPOCH, &[0x5b; 32], BOB, MEMBERS);
    assert_eq!(
        decrypt(&mut other_secret, ALICE, &sealed[0]),
        Err(DecryptError::Authentication { leaf: ALICE, generation: 0 })
    );
}

#[test]
fn tampered_or_truncated_ciphertext_fails_without_consuming_the_key() {
    let sealed = messages(ALICE, 3);
    let mut bob = member(BOB);
    let mut flipped = sealed[2].ciphertext.clone();
    flipped[0] ^= 1;
    assert_eq!(
        bob.decrypt(ALICE, sender_id(ALICE), 2, &flipped),
        Err(DecryptError::Authentication { leaf: ALICE, generation: 2 })
    );
    assert_eq!(
        bob.decrypt(ALICE, sender_id(ALICE), 2, &sealed[2].ciphertext[..10]),
        Err(DecryptError::Authentication { leaf: ALICE, generation: 2 })
    );
    assert_eq!(bob.stored_skipped_keys(), 0, "a failed message stores nothing");
    assert_eq!(decrypt(&mut bob, ALICE, &sealed[2]), Ok(plaintext(2)));
    assert_eq!(bob.stored_skipped_keys(), 2);
    let mut flipped = sealed[0].ciphertext.clone();
    flipped[5] ^= 0x80;
    assert_eq!(
        bob.decrypt(ALICE, sender_id(ALICE), 0, &flipped),
        Err(DecryptError::Authentication { leaf: ALICE, generation: 0 })
    );
    assert!(bob.has_skipped_key(ALICE, 0), "a failed message does not consume a stored key");
    assert_eq!(decrypt(&mut bob, ALICE, &sealed[0]), Ok(plaintext(0)));
}

#[test]
fn a_replayed_message_is_rejected() {
    let sealed = messages(ALICE, 3);
    let mut bob = member(BOB);
    assert_eq!(decrypt(&mut bob, ALICE, &sealed[0]), Ok(plaintext(0)));
    assert_eq!(
        decrypt(&mut bob, ALICE, &sealed[0]),
        Err(DecryptError::Replay { leaf: ALICE, generation: 0 })
    );
    assert_eq!(decrypt(&mut bob, ALICE, &sealed[2]), Ok(plaintext(2)));
    assert_eq!(decrypt(&mut bob, ALICE, &sealed[1]), Ok(plaintext(1)));
    for message in &sealed {
        assert_eq!(
            decrypt(&mut bob, ALICE, message),
            Err(DecryptError::Replay { leaf: ALICE, generation: message.generation })
        );
    }
}

#[test]
fn out_of_order_delivery_within_the_window_works_and_used_keys_are_deleted() {
    let sealed = messages(ALICE, 10);
    let mut bob = member(BOB);
    assert_eq!(decrypt(&mut bob, ALICE, &sealed[9]), Ok(plaintext(9)));
    assert_eq!(bob.stored_skipped_keys(), 9);
    for index in (0..9).rev() {
        assert!(bob.has_skipped_key(ALICE, sealed[index].generation));
        assert_eq!(decrypt(&mut bob, ALICE, &sealed[index]), Ok(plaintext(index)));
        assert!(!bob.has_skipped_key(ALICE, sealed[index].generation), "used key is deleted");
        assert_eq!(bob.stored_skipped_keys(), index);
        assert_eq!(
            decrypt(&mut bob, ALICE, &sealed[index]),
            Err(DecryptError::Replay { leaf: ALICE, generation: sealed[index].generation })
        );
    }
}

#[test]
fn a_jump_of_at_most_the_limit_works_and_one_more_is_too_far_ahead() {
    let limit = usize::try_from(GENERATION_JUMP_MAX).expect("fits");
    let sealed = messages(ALICE, limit + 2);
    let mut bob = member(BOB);
    assert_eq!(
        decrypt(&mut bob, ALICE, &sealed[limit + 1]),
        Err(DecryptError::TooFarAhead {
            leaf: ALICE,
            generation: GENERATION_JUMP_MAX + 1,
            next_generation: 0
        })
    );
    assert_eq!(bob.stored_skipped_keys(), 0);
    assert_eq!(decrypt(&mut bob, ALICE, &sealed[limit]), Ok(plaintext(limit)));
    assert_eq!(bob.stored_skipped_keys(), limit);
    assert_eq!(decrypt(&mut bob, ALICE, &sealed[limit + 1]), Ok(plaintext(limit + 1)));
    assert_eq!(decrypt(&mut bob, ALICE, &sealed[0]), Ok(plaintext(0)));
}

#[test]
fn keys_beyond_the_per_sender_window_are_dropped_and_too_old() {
    let window = SKIPPED_KEYS_PER_SENDER_MAX;
    let jump = usize::try_from(GENERATION_JUMP_MAX).expect("fits");
    // Two maximal jumps skip 2 * jump keys, more than the window keeps.
    assert!(2 * jump > window && jump <= window);
    let sealed = messages(ALICE, 2 * jump + 2);
    let mut bob = member(BOB);
    assert_eq!(decrypt(&mut bob, ALICE, &sealed[jump]), Ok(plaintext(jump)));
    assert_eq!(bob.stored_skipped_keys(), jump);
    assert_eq!(decrypt(&mut bob, ALICE, &sealed[2 * jump + 1]), Ok(plaintext(2 * jump + 1)));
    assert_eq!(bob.stored_skipped_keys(), window);
    // The oldest skipped keys (generations 0 .. dropped) went first.
    let dropped = 2 * jump - window;
    let oldest_kept = u32::try_from(dropped).expect("fits");
    for index in [0, dropped - 1] {
        assert_eq!(
            decrypt(&mut bob, ALICE, &sealed[index]),
            Err(DecryptError::TooOld {
                leaf: ALICE,
                generation: u32::try_from(index).expect("fits"),
                oldest_kept
            })
        );
    }
    assert_eq!(
        decrypt(&mut bob, ALICE, &sealed[jump]),
        Err(DecryptError::Replay { leaf: ALICE, generation: u32::try_from(jump).expect("fits") })
    );
    let first_kept = if dropped < jump { dropped } else { jump + 1 };
    assert!(bob.has_skipped_key(ALICE, u32::try_from(first_kept).expect("fits")));
    assert_eq!(decrypt(&mut bob, ALICE, &sealed[first_kept]), Ok(plaintext(first_kept)));
    assert_eq!(decrypt(&mut bob, ALICE, &sealed[2 * jump]), Ok(plaintext(2 * jump)));
    assert_eq!(bob.stored_skipped_keys(), window - 2);
}

#[test]
fn keys_beyond_the_epoch_bound_are_dropped_oldest_first() {
    let jump = usize::try_from(GENERATION_JUMP_MAX).expect("fits");
    let senders = SKIPPED_KEYS_PER_EPOCH_MAX / jump + 1;
    let leaves: Vec<u32> = (1..=u32::try_from(senders).expect("fits")).collect();
    let mut receiver =
        SenderKeyState::new(ROOM, EPOCH, &SECRET, 0, 0..=u32::try_from(senders).expect("fits"));
    let mut first_of_each = Vec::new();
    for &leaf in &leaves {
        let sealed = messages(leaf, jump + 1);
        assert_eq!(decrypt(&mut receiver, leaf, &sealed[jump]), Ok(plaintext(jump)));
        assert!(receiver.stored_skipped_keys() <= SKIPPED_KEYS_PER_EPOCH_MAX);
        first_of_each.push(sealed.into_iter().next().expect("one message"));
    }
    assert_eq!(receiver.stored_skipped_keys(), SKIPPED_KEYS_PER_EPOCH_MAX);
    let overflow = senders * jump - SKIPPED_KEYS_PER_EPOCH_MAX;
    assert!(overflow > 0 && overflow <= jump, "only the first sender's keys are dropped");
    // The first sender's keys were stored first, so they went first.
    assert_eq!(
        decrypt(&mut receiver, leaves[0], &first_of_each[0]),
        Err(DecryptError::TooOld {
            leaf: leaves[0],
            generation: 0,
            oldest_kept: u32::try_from(overflow).expect("fits")
        })
    );
    for (leaf, first) in leaves.iter().zip(&first_of_each).skip(1) {
        assert_eq!(decrypt(&mut receiver, *leaf, first), Ok(plaintext(0)));
    }
}

#[test]
fn own_and_unknown_senders_are_refused() {
    let mut bob = member(BOB);
    let own = bob.encrypt(sender_id(BOB), b"mine").expect("encrypt");
    assert_eq!(decrypt(&mut bob, BOB, &own), Err(DecryptError::OwnMessage { leaf: BOB }));
    let stranger = messages(7, 1);
    assert_eq!(decrypt(&mut bob, 7, &stranger[0]), Err(DecryptError::UnknownSender { leaf: 7 }));
}

#[test]
fn plaintext_size_is_bounded_and_a_refusal_uses_no_generation() {
    let mut alice = member(ALICE);
    let too_large = vec![0u8; PLAINTEXT_BYTES_MAX + 1];
    assert_eq!(
        seal_application(&mut alice, &too_large, &signing_key(ALICE)).unwrap_err(),
        SealError::Encrypt(EncryptError::PlaintextTooLarge { len_bytes: PLAINTEXT_BYTES_MAX + 1 })
    );
    assert_eq!(
        alice.encrypt(sender_id(ALICE), &too_large),
        Err(EncryptError::PlaintextTooLarge { len_bytes: PLAINTEXT_BYTES_MAX + 1 })
    );
    assert_eq!(alice.next_send_generation(), Some(0));
    let largest = vec![0x33u8; PLAINTEXT_BYTES_MAX];
    let frame =
        seal_application(&mut alice, &largest, &signing_key(ALICE)).expect("the largest plaintext fits");
    let mut bob = member(BOB);
    assert_eq!(open_application(&mut bob, &frame, ALICE, &identity_key(ALICE)), Ok(largest));
}

#[test]
fn sealed_frames_open_once() {
    let mut alice = member(ALICE);
    let mut bob = member(BOB);
    let frame = seal_application(&mut alice, b"hello", &signing_key(ALICE)).expect("seal");
    let header = frame.header();
    assert_eq!(header.opcode(), Opcode::Application);
    assert_eq!((header.room_id(), header.sender_id(), header.epoch()), (ROOM, sender_id(ALICE), EPOCH));
    assert_eq!(frame.decode_payload::<Application>().expect("payload").generation, 0);
    let received = Frame::decode(&frame.to_bytes()).expect("decode");
    assert_eq!(
        open_application(&mut bob, &received, ALICE, &identity_key(ALICE)).as_deref(),
        Ok(&b"hello"[..])
    );
    assert_eq!(
        open_application(&mut bob, &received, ALICE, &identity_key(ALICE)),
        Err(OpenError::Decrypt(DecryptError::Replay { leaf: ALICE, generation: 0 }))
    );
}

#[test]
fn sequencer_fields_do_not_affect_opening() {
    let mut alice = member(ALICE);
    let mut frame = seal_application(&mut alice, b"hello", &signing_key(ALICE)).expect("seal");
    frame.header_mut().set_log_index(991).set_server_timestamp_ms(1_790_000_000_000).set_request_id(7);
    let mut bob = member(BOB);
    // The request id is signed, so changing it after signing needs a new
    // signature; the log index and timestamp are not signed.
    assert_eq!(
        open_application(&mut bob, &frame, ALICE, &identity_key(ALICE)),
        Err(OpenError::Sender(SenderError::Signature(SignatureError::Invalid)))
    );
    frame.header_mut().set_request_id(0);
    assert_eq!(open_application(&mut bob, &frame, ALICE, &identity_key(ALICE)).as_deref(), Ok(&b"hello"[..]));
}

/// A copy of `frame` with its header changed by `change`, re-signed by `signer`.
fn altered(frame: &Frame, signer: &SigningKey, change: impl FnOnce(&mut FrameHeaderBuf)) -> Frame {
    let mut header = frame.header().to_buf();
    change(&mut header);
    let mut copy = Frame::new(header, frame.payload().clone()).expect("same payload");
    copy.sign(signer);
    copy
}

#[test]
fn changed_routing_fields_fail_even_when_re_signed_by_the_sender() {
    let mut alice = member(ALICE);
    let frame = seal_application(&mut alice, b"hello", &signing_key(ALICE)).expect("seal");
    let key = identity_key(ALICE);

    // Unsigned changes break the signature.
    let mut unsigned = frame.clone();
    unsigned.header_mut().set_room_id(OTHER_ROOM);
    assert_eq!(
        open_application(&mut member(BOB), &unsigned, ALICE, &key),
        Err(OpenError::Sender(SenderError::Signature(SignatureError::Invalid)))
    );

    // Re-signed: a state of the frame's (other) room with the same epoch
    // secret still refuses it, through the associated data.
    let moved = altered(&frame, &signing_key(ALICE), |header| {
        header.set_room_id(OTHER_ROOM);
    });
    assert_eq!(
        open_application(&mut member(BOB), &moved, ALICE, &key),
        Err(OpenError::WrongRoom { frame_room: OTHER_ROOM, state_room: ROOM })
    );
    let mut other_room = SenderKeyState::new(OTHER_ROOM, EPOCH, &SECRET, BOB, MEMBERS);
    assert_eq!(
        open_application(&mut other_room, &moved, ALICE, &key),
        Err(OpenError::Decrypt(DecryptError::Authentication { leaf: ALICE, generation: 0 }))
    );

    let later = altered(&frame, &signing_key(ALICE), |header| {
        header.set_epoch(EPOCH + 1);
    });
    assert_eq!(
        open_application(&mut member(BOB), &later, ALICE, &key),
        Err(OpenError::WrongEpoch { frame_epoch: EPOCH + 1, state_epoch: EPOCH })
    );
    let mut next_epoch = SenderKeyState::new(ROOM, EPOCH + 1, &SECRET, BOB, MEMBERS);
    assert_eq!(
        open_application(&mut next_epoch, &later, ALICE, &key),
        Err(OpenError::Decrypt(DecryptError::Authentication { leaf: ALICE, generation: 0 }))
    );

    // Another generation in the payload, re-signed.
    let payload: Application = frame.decode_payload().expect("payload");
    let mut header = frame.header().to_buf();
    header.set_signature_flags(false, false);
    let mut shifted = Frame::with_payload(
        header,
        &Application { generation: 1, ciphertext: payload.ciphertext.clone(), push: None, epoch_tag: None },
    )
    .expect("frame");
    shifted.sign(&signing_key(ALICE));
    let mut bob = member(BOB);
    assert_eq!(
        open_application(&mut bob, &shifted, ALICE, &key),
        Err(OpenError::Decrypt(DecryptError::Authentication { leaf: ALICE, generation: 1 }))
    );
    assert_eq!(open_application(&mut bob, &frame, ALICE, &key).as_deref(), Ok(&b"hello"[..]));
}

#[test]
fn a_member_cannot_pass_off_a_frame_as_another_members() {
    // Alice holds every chain of the epoch, Bob's included: she builds a
    // state that sends on Bob's chain and signs the frame with her own key.
    let mut forger = SenderKeyState::new(ROOM, EPOCH, &SECRET, BOB, MEMBERS);
    let sealed = forger.encrypt(sender_id(BOB), b"from bob, really").expect("encrypt");
    let mut header = FrameHeaderBuf::new(Opcode::Application);
    header.set_room_id(ROOM).set_sender_id(sender_id(BOB)).set_epoch(EPOCH);
    let payload = Application {
        generation: sealed.generation,
        ciphertext: Bytes::from(sealed.ciphertext),
        push: None,
        epoch_tag: None,
    };
    let mut forged = Frame::with_payload(header, &payload).expect("frame");
    forged.sign(&signing_key(ALICE));

    assert_eq!(
        verify_sender(&forged, &identity_key(BOB)),
        Err(SenderError::Signature(SignatureError::Invalid))
    );
    assert_eq!(
        verify_sender(&forged, &identity_key(ALICE)),
        Err(SenderError::SenderMismatch { frame_sender: sender_id(BOB), member_sender: sender_id(ALICE) })
    );
    let mut carol = member(CAROL);
    assert_eq!(
        open_application(&mut carol, &forged, BOB, &identity_key(BOB)),
        Err(OpenError::Sender(SenderError::Signature(SignatureError::Invalid)))
    );
    // The forgery consumed nothing: Bob's real first message still opens.
    let mut bob = member(BOB);
    let genuine = seal_application(&mut bob, b"really from bob", &signing_key(BOB)).expect("seal");
    assert_eq!(
        open_application(&mut carol, &genuine, BOB, &identity_key(BOB)).as_deref(),
        Ok(&b"really from bob"[..])
    );
    // Alice's own frame with her sender id is accepted from her only.
    let mut alice = member(ALICE);
    let own = seal_application(&mut alice, b"alice", &signing_key(ALICE)).expect("seal");
    assert_eq!(verify_sender(&own, &identity_key(ALICE)), Ok(()));
    assert!(matches!(verify_sender(&own, &identity_key(BOB)), Err(SenderError::SenderMismatch { .. })));
    assert_eq!(
        open_application(&mut carol, &own, BOB, &identity_key(BOB)),
        Err(OpenError::Sender(SenderError::SenderMismatch {
            frame_sender: sender_id(ALICE),
            member_sender: sender_id(BOB)
        }))
    );
}

#[test]
fn unsigned_and_non_application_frames_are_refused() {
    let mut alice = member(ALICE);
    let frame = seal_application(&mut alice, b"x", &signing_key(ALICE)).expect("seal");
    let mut header = frame.header().to_buf();
    header.set_signature_flags(false, false).set_signature(&[0; 64]);
    let unsigned = Frame::new(header, frame.payload().clone()).expect("frame");
    assert_eq!(
        open_application(&mut member(BOB), &unsigned, ALICE, &identity_key(ALICE)),
        Err(OpenError::Sender(SenderError::Signature(SignatureError::NotSigned)))
    );

    let mut header = FrameHeaderBuf::new(Opcode::Typing);
    header.set_room_id(ROOM).set_sender_id(sender_id(ALICE)).set_epoch(EPOCH);
    let mut typing = Frame::with_payload(header, &Typing { active: true }).expect("frame");
    typing.sign(&signing_key(ALICE));
    assert_eq!(
        open_application(&mut member(BOB), &typing, ALICE, &identity_key(ALICE)),
        Err(OpenError::NotApplication { opcode: Opcode::Typing })
    );
}

proptest! {
    #[test]
    fn any_delivery_order_opens_each_message_exactly_once(
        order in proptest::collection::vec(0usize..48, 1..160),
    ) {
        let sealed = messages(ALICE, 48);
        let mut bob = member(BOB);
        let mut opened = [false; 48];
        for index in order {
            let outcome = decrypt(&mut bob, ALICE, &sealed[index]);
            if opened[index] {
                prop_assert_eq!(
                    outcome,
                    Err(DecryptError::Replay { leaf: ALICE, generation: sealed[index].generation })
                );
            } else {
                prop_assert_eq!(outcome, Ok(plaintext(index)));
                opened[index] = true;
            }
            let highest = opened.iter().rposition(|&done| done).expect("one opened");
            let waiting = opened[..highest].iter().filter(|&&done| !done).count();
            prop_assert_eq!(bob.stored_skipped_keys(), waiting);
        }
    }
}

// --- Real MLS groups ---

#[test]
fn two_real_groups_derive_the_same_sender_keys() {
    let room = *b"real-mls-room-01";
    let ((alice_provider, alice_identity, mut alice_group), (bob_provider, bob_identity, mut bob_group)) =
        common::two_members(1, 2, room);

    let mut alice = SenderKeyState::from_group(&alice_provider, &alice_group).expect("alice keys");
    let mut bob = SenderKeyState::from_group(&bob_provider, &bob_group).expect("bob keys");
    assert_eq!((alice.room_id(), alice.epoch()), (RoomId(room), 1));
    assert_eq!((bob.room_id(), bob.epoch()), (RoomId(room), 1));
    assert_ne!(alice.own_leaf(), bob.own_leaf());

    let alice_key = SigningKey::from_bytes(&alice_identity.secret_bytes());
    let bob_key = SigningKey::from_bytes(&bob_identity.secret_bytes());
    let alice_member = bob_group
        .members()
        .into_iter()
        .find(|member| member.identity == alice_identity.public_key().to_vec())
        .expect("alice is a member");
    let alice_identity_key: [u8; 32] = alice_member.identity.as_slice().try_into().expect("32-byte identity");

    let frame = seal_application(&mut alice, b"over real MLS", &alice_key).expect("seal");
    assert_eq!(
        open_application(&mut bob, &frame, alice_member.leaf_index, &alice_identity_key).as_deref(),
        Ok(&b"over real MLS"[..])
    );
    // The payload names the epoch's instance, as the server computes it
    // from the group's public state.
    let sealed: Application = frame.decode_payload().expect("payload");
    let tag = kalandra_proto::epoch_tag(RoomId(room), 1, alice_group.confirmed_transcript_hash());
    assert_eq!(sealed.epoch_tag, Some(tag));
    assert_eq!(bob.epoch_tag(), Some(tag));
    let reply = seal_application(&mut bob, b"reply", &bob_key).expect("seal");
    assert_eq!(
        open_application(&mut alice, &reply, bob_group.own_leaf_index(), bob_identity.public_key())
            .as_deref(),
        Ok(&b"reply"[..])
    );

    // A new epoch gives new keys: both move on, the old state refuses.
    let mut bob_epoch_one = SenderKeyState::from_group(&bob_provider, &bob_group).expect("bob keys");
    let update = alice_group.self_update(&alice_provider, &alice_identity).expect("update");
    alice_group.confirm_pending_commit(&alice_provider).expect("confirm");
    bob_group.process_handshake(&bob_provider, &update.commit).expect("bob applies the commit");
    assert_eq!((alice_group.epoch(), bob_group.epoch()), (2, 2));
    let mut alice_next = SenderKeyState::from_group(&alice_provider, &alice_group).expect("alice keys");
    let mut bob_next = SenderKeyState::from_group(&bob_provider, &bob_group).expect("bob keys");
    let frame = seal_application(&mut alice_next, b"epoch 2", &alice_key).expect("seal");
    assert_eq!(
        open_application(&mut bob, &frame, alice_member.leaf_index, &alice_identity_key),
        Err(OpenError::WrongEpoch { frame_epoch: 2, state_epoch: 1 })
    );
    assert_eq!(
        open_application(&mut bob_next, &frame, alice_member.leaf_index, &alice_identity_key).as_deref(),
        Ok(&b"epoch 2"[..])
    );
    // The previous epoch's keys (a fresh state, no generation used) cannot open it.
    let payload: Application = frame.decode_payload().expect("payload");
    assert_eq!(
        bob_epoch_one.decrypt(alice_member.leaf_index, frame.header().sender_id(), 0, &payload.ciphertext),
        Err(DecryptError::Authentication { leaf: alice_member.leaf_index, generation: 0 })
    );
}
