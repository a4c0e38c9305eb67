//! End to end over real QUIC on loopback: rooms, members, messages, commit
//! races and catching up, with real OpenMLS clients and the server's
//! `PublicGroup` validation.

mod common;

use common::*;
use kalandra_proto::payload::{Ack, Application, Commit, JoinRule};
use kalandra_proto::{ErrorCode, Opcode, RoomId};
use kalandra_server::ConnectionLimits;

const ROOM: RoomId = RoomId(*b"room-for-testing");

/// Alice creates the (invite-only) room and adds Bob and Carol; all three subscribed.
async fn three_member_room(server: &TestServer) -> (TestClient, TestClient, TestClient) {
    three_member_room_with(server, None).await
}

/// [`three_member_room`] with the join rule `join_rule`.
async fn three_member_room_with(
    server: &TestServer,
    join_rule: Option<JoinRule>,
) -> (TestClient, TestClient, TestClient) {
    let mut alice = TestClient::connect(server, "alice", 1).await;
    let mut bob = TestClient::connect(server, "bob", 2).await;
    let mut carol = TestClient::connect(server, "carol", 3).await;
    assert_eq!(bob.upload_key_packages(3).await.available, 3);
    assert_eq!(carol.upload_key_packages(3).await.available, 3);

    let created = alice.create_room_with(ROOM, join_rule).await;
    assert_eq!(created.log_index, 0);
    alice.subscribe(1).await;
    assert_eq!(sync_done(&alice.next_of(Opcode::SyncDone).await).next_log_index, 1);

    let (bob_id, carol_id) = (bob.sender(), carol.sender());
    let reply = alice.add(&[bob_id, carol_id]).await;
    let ack: Ack = decode_ok(&reply);
    assert_eq!((ack.log_index, ack.epoch), (1, 1));
    // A Welcome names the log index of the commit that made it.
    assert_eq!(bob.join_from_welcome(ROOM).await, ack.log_index);
    assert_eq!(carol.join_from_welcome(ROOM).await, ack.log_index);
    for member in [&mut bob, &mut carol] {
        member.subscribe(2).await;
        assert_eq!(sync_done(&member.next_of(Opcode::SyncDone).await).next_log_index, 2);
    }
    (alice, bob, carol)
}

fn assert_converged(members: &[&TestClient]) {
    let first = members[0].group.as_ref().unwrap();
    for member in &members[1..] {
        let group = member.group.as_ref().unwrap();
        assert_eq!(group.epoch(), first.epoch(), "{} epoch", member.name);
        assert_eq!(group.tree_hash(), first.tree_hash(), "{} tree hash", member.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_clients_join_by_welcome_and_exchange_messages_in_one_order() {
    let server = TestServer::start(default_limits()).await;
    let (mut alice, mut bob, mut carol) = three_member_room(&server).await;
    assert_converged(&[&alice, &bob, &carol]);

    let mut acked = Vec::new();
    for round in 0..4 {
        let client = match round % 3 {
            0 => &mut alice,
            1 => &mut bob,
            _ => &mut carol,
        };
        let reply = client.send_text(&format!("message {round} from {}", client.name)).await;
        acked.push((client.name, decode_ok::<Ack>(&reply).log_index));
    }
    assert_eq!(
        acked.iter().map(|(_, index)| *index).collect::<Vec<_>>(),
        vec![2, 3, 4, 5],
        "dense, in order"
    );

    // Everyone sees the others' messages, in log order, exactly once; its own come back as acknowledgements.
    for client in [&mut alice, &mut bob, &mut carol] {
        let expected: Vec<u64> =
            acked.iter().filter(|(name, _)| *name != client.name).map(|(_, i)| *i).collect();
        let mut seen = Vec::new();
        for _ in 0..expected.len() {
            let frame = client.next_of(Opcode::Application).await;
            let payload: Application = frame.decode_payload().unwrap();
            let text = String::from_utf8(payload.ciphertext.to_vec()).unwrap();
            assert!(text.starts_with("message "), "{text}");
            assert_ne!(frame.header().sender_id(), client.sender());
            let key = sender_key(&[&alice_key(), &bob_key(), &carol_key()], frame.header().sender_id());
            frame
                .verify(&ed25519_dalek::VerifyingKey::from_bytes(&key).unwrap())
                .expect("signed by its sender");
            seen.push(frame.header().log_index());
        }
        assert_eq!(seen, expected, "{}", client.name);
    }
    server.stop().await;
}

// Keys are derived from the fixed seeds TestClient uses, so tests can check signatures.
fn client_key(seed: u8) -> ed25519_dalek::SigningKey {
    let provider = client_core::mls::MlsProvider::from_seed([seed; 32]);
    let identity = client_core::mls::Identity::generate(&provider).unwrap();
    ed25519_dalek::SigningKey::from_bytes(&identity.secret_bytes())
}
fn alice_key() -> ed25519_dalek::SigningKey {
    client_key(1)
}
fn bob_key() -> ed25519_dalek::SigningKey {
    client_key(2)
}
fn carol_key() -> ed25519_dalek::SigningKey {
    client_key(3)
}
fn sender_key(keys: &[&ed25519_dalek::SigningKey], sender: kalandra_proto::SenderId) -> [u8; 32] {
    keys.iter()
        .map(|key| key.verifying_key().to_bytes())
        .find(|key| kalandra_proto::SenderId::from_identity_key(key) == sender)
        .expect("a known sender")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_commits_one_wins_and_the_loser_rebases() {
    let server = TestServer::start(default_limits()).await;
    let (mut alice, mut bob, mut carol) = three_member_room(&server).await;

    // Both commit for epoch 1 without waiting for each other.
    let alice_update = alice.group.as_mut().unwrap().self_update(&alice.provider, &alice.identity).unwrap();
    let bob_update = bob.group.as_mut().unwrap().self_update(&bob.provider, &bob.identity).unwrap();
    let alice_frame = alice.frame(&Commit {
        commit: alice_update.commit,
        welcome: None,
        welcome_recipients: vec![],
        group_info: Some(alice_update.group_info),
    });
    let bob_frame = bob.frame(&Commit {
        commit: bob_update.commit,
        welcome: None,
        welcome_recipients: vec![],
        group_info: Some(bob_update.group_info),
    });
    alice.conn().send(&alice_frame).await.unwrap();
    bob.conn().send(&bob_frame).await.unwrap();
    let alice_reply = alice.conn().wait_reply(alice_frame.header().request_id()).await.unwrap();
    let bob_reply = bob.conn().wait_reply(bob_frame.header().request_id()).await.unwrap();

    let (winner, winner_reply, loser, loser_reply) = match (alice_reply.opcode(), bob_reply.opcode()) {
        (Opcode::Ack, Opcode::Error) => (&mut alice, alice_reply, &mut bob, bob_reply),
        (Opcode::Error, Opcode::Ack) => (&mut bob, bob_reply, &mut alice, alice_reply),
        other => panic!("exactly one commit must win, got {other:?}"),
    };
    winner.settle_commit(&winner_reply);
    let error: kalandra_proto::payload::Error = loser_reply.decode_payload().unwrap();
    assert_eq!(error.code, ErrorCode::WrongEpoch.to_u16());
    assert_eq!(error.current_epoch, Some(2));
    assert_eq!(error.log_index, Some(2), "the winning commit is at index 2");
    loser.settle_commit(&loser_reply);

    // The loser catches up with the winning commit, then re-applies its intent.
    let winning = loser.next_of(Opcode::Commit).await;
    assert_eq!(winning.header().log_index(), 2);
    loser.apply(&winning);
    let retried = loser.self_update().await;
    let ack: Ack = decode_ok(&retried);
    assert_eq!((ack.log_index, ack.epoch), (3, 3));

    // Everyone else applies both commits; all converge.
    for _ in 0..2 {
        let commit = carol.next_of(Opcode::Commit).await;
        carol.apply(&commit);
    }
    let retried_commit = winner.next_of(Opcode::Commit).await;
    assert_eq!(retried_commit.header().log_index(), 3);
    winner.apply(&retried_commit);
    assert_converged(&[&alice, &bob, &carol]);
    assert_eq!(alice.epoch(), 3);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_member_catches_up_without_gaps_or_duplicates() {
    let server = TestServer::start(default_limits()).await;
    let (mut alice, mut bob, mut carol) = three_member_room(&server).await;
    let carol_last_seen = 1u64;
    carol.disconnect().await;

    let mut sent = Vec::new();
    for i in 0..5 {
        sent.push(decode_ok::<Ack>(&alice.send_text(&format!("while carol is away {i}")).await).log_index);
    }
    let update = bob.self_update().await;
    sent.push(decode_ok::<Ack>(&update).log_index);
    sent.push(decode_ok::<Ack>(&bob.send_text("after the update").await).log_index);
    let commit = alice.next_of(Opcode::Commit).await;
    alice.apply(&commit);

    carol.reconnect(&server).await;
    carol.subscribe(carol_last_seen + 1).await;
    let mut received = Vec::new();
    loop {
        let frame = carol.conn().recv().await.unwrap();
        match frame.opcode() {
            Opcode::SyncDone => break,
            Opcode::Commit => {
                carol.apply(&frame);
                received.push(frame.header().log_index());
            }
            Opcode::Application => received.push(frame.header().log_index()),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(received, sent, "history is complete, ordered, without duplicates");
    assert_converged(&[&alice, &bob, &carol]);

    // And live frames follow the history.
    let live = decode_ok::<Ack>(&alice.send_text("live again").await).log_index;
    let frame = carol.next_of(Opcode::Application).await;
    assert_eq!(frame.header().log_index(), live);
    assert_eq!(live, sent.last().unwrap() + 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_falls_behind_is_told_to_resync_and_loses_nothing() {
    let limits = ConnectionLimits { send_queue_frames_max: 4, ..default_limits() };
    falls_behind_then_resyncs(limits, 100 * 1024, 80).await;
}

/// The outbox is bounded in bytes as well as frames: with room for many
/// frames, a reader that stops reading large ones is told to resync once
/// its share of the bytes is queued, and loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_behind_by_bytes_is_told_to_resync_and_loses_nothing() {
    use kalandra_server::sim::OUTBOX_BYTES_MAX_MIN;
    let limits = ConnectionLimits {
        send_queue_frames_max: 65_536,
        send_queue_bytes_max: OUTBOX_BYTES_MAX_MIN,
        ..default_limits()
    };
    // More bytes than the fan-out share and the QUIC send window, far fewer
    // frames than the frame bound.
    let count = OUTBOX_BYTES_MAX_MIN / (200 * 1024) + 40;
    falls_behind_then_resyncs(limits, 200 * 1024, count).await;
}

/// Bob stops reading while Alice sends `count` messages of `bytes`; he is
/// told where to resume, resubscribes from there, and has every message
/// once, in order.
async fn falls_behind_then_resyncs(limits: ConnectionLimits, bytes: usize, count: usize) {
    let server = TestServer::start(limits).await;
    let (mut alice, mut bob, _carol) = three_member_room(&server).await;

    // Bob stops reading while Alice sends far more than his queue and the
    // QUIC stream window hold.
    let big = "x".repeat(bytes);
    let mut sent = Vec::new();
    for _ in 0..count {
        sent.push(decode_ok::<Ack>(&alice.send_text(&big).await).log_index);
    }

    // Bob reads: live frames, then a resync notice naming where to resume.
    let mut received = Vec::new();
    let resume_from = loop {
        let frame = tokio::time::timeout(TIMEOUT, bob.conn().recv())
            .await
            .unwrap_or_else(|_| panic!("no resync notice after {} frames", received.len()))
            .unwrap();
        match frame.opcode() {
            Opcode::Application => received.push(frame.header().log_index()),
            Opcode::Error => {
                let error: kalandra_proto::payload::Error = frame.decode_payload().unwrap();
                assert_eq!(error.code, ErrorCode::ResyncRequired.to_u16());
                break error.log_index.expect("resync names a log index");
            }
            other => panic!("unexpected {other:?}"),
        }
    };
    assert!(received.len() < sent.len(), "Bob fell behind");
    assert_eq!(received, sent[..received.len()].to_vec(), "what arrived before the notice is in order");
    assert_eq!(resume_from, sent[0] + received.len() as u64, "resume exactly after the last frame received");

    bob.subscribe(resume_from).await;
    loop {
        let frame = bob.conn().recv().await.unwrap();
        match frame.opcode() {
            Opcode::Application => received.push(frame.header().log_index()),
            Opcode::SyncDone => break,
            Opcode::Error => {
                panic!("unexpected error {:?}", frame.decode_payload::<kalandra_proto::payload::Error>())
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(received, sent, "after resubscribing nothing is missing or repeated");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ephemeral_frames_reach_members_and_are_never_stored() {
    let server = TestServer::start(default_limits()).await;
    let (mut alice, mut bob, mut carol) = three_member_room(&server).await;
    let typing = alice.frame(&kalandra_proto::payload::Typing { active: true });
    alice.conn().send(&typing).await.unwrap();
    for member in [&mut bob, &mut carol] {
        let frame = member.next_of(Opcode::Typing).await;
        assert_eq!(frame.header().sender_id(), alice.sender());
        assert_eq!(frame.header().log_index(), 0, "ephemeral frames get no log index");
    }
    // The next stored frame still gets the next index.
    let ack: Ack = decode_ok(&alice.send_text("after typing").await);
    assert_eq!(ack.log_index, 2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_the_server_rebuilds_the_same_mls_state_from_snapshot_and_log() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_in(dir.path(), default_limits()).await;
    let (mut alice, mut bob, mut carol) = three_member_room(&server).await;
    // With the add, exactly the snapshot interval of commits: the last one
    // triggers a snapshot, and only messages follow it in the log (the
    // crash-recovery test covers commits replayed after a snapshot).
    let commits = kalandra_server::sim::COMMITS_PER_SNAPSHOT - 1;
    let mut last_commit_index = 0;
    for round in 0..commits {
        let (committer, others) = if round % 2 == 0 {
            (&mut alice, [&mut bob, &mut carol])
        } else {
            (&mut bob, [&mut alice, &mut carol])
        };
        last_commit_index = decode_ok::<Ack>(&committer.self_update().await).log_index;
        for other in others {
            let commit = other.next_of(Opcode::Commit).await;
            other.apply(&commit);
        }
    }
    assert_converged(&[&alice, &bob, &carol]);
    // No snapshot while the last commit can still be voided
    // (docs/RECOVERY.md): once its window is over, the next tick takes it.
    server.advance_clock(kalandra_proto::limits::COMMIT_VOID_WINDOW_MS);
    let snapshot_at = |server: &TestServer| {
        server.store.room_metadata(ROOM).unwrap().map_or(0, |metadata| metadata.mls_snapshot_log_index)
    };
    for _ in 0..200 {
        if snapshot_at(&server) == last_commit_index + 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(snapshot_at(&server), last_commit_index + 1, "the snapshot once the commit settled");
    for i in 0..3 {
        decode_ok::<Ack>(&alice.send_text(&format!("after the snapshot {i}")).await);
    }
    let epoch_before = alice.epoch();
    server.stop().await;
    {
        use kalandra_server::store::Store as _;
        let store = kalandra_server::store::RedbStore::open(dir.path().join("kalandra.redb")).unwrap();
        let metadata = store.room_metadata(ROOM).unwrap().expect("a snapshot was stored");
        assert_eq!(
            metadata.mls_snapshot_log_index,
            last_commit_index + 1,
            "snapshot right after the last commit"
        );
        assert_eq!(store.next_log_index(ROOM).unwrap(), last_commit_index + 4, "three messages follow it");
    }

    let server = TestServer::start_in(dir.path(), default_limits()).await;
    for client in [&mut alice, &mut bob, &mut carol] {
        client.reconnect(&server).await;
    }
    // A frame for an old epoch learns where the current epoch began, from
    // the snapshot.
    let mut stale = alice.frame(&kalandra_proto::payload::Application {
        generation: 0,
        ciphertext: bytes::Bytes::from_static(b"stale"),
        push: None,
        epoch_tag: None,
    });
    stale.header_mut().set_epoch(epoch_before - 1);
    stale.sign(&alice.key);
    let reply = alice.send_and_wait(&stale).await;
    let error: kalandra_proto::payload::Error = reply.decode_payload().unwrap();
    assert_eq!(error.code, ErrorCode::WrongEpoch.to_u16());
    assert_eq!((error.current_epoch, error.log_index), (Some(epoch_before), Some(last_commit_index)));
    // The GroupInfo for external joins is the current epoch's.
    let reply = carol.request(&kalandra_proto::payload::GroupInfoRequest {}).await;
    let group_info: kalandra_proto::payload::GroupInfo = decode_ok(&reply);
    assert_eq!(group_info.epoch, epoch_before);
    // A commit only validates against the same epoch and tree: the server's
    // rebuilt PublicGroup accepts Carol's update, and everyone follows it.
    let ack: Ack = decode_ok(&carol.self_update().await);
    assert_eq!(ack.epoch, epoch_before + 1);
    for other in [&mut alice, &mut bob] {
        other.subscribe(ack.log_index).await;
        let commit = other.next_of(Opcode::Commit).await;
        assert_eq!(commit.header().log_index(), ack.log_index);
        other.apply(&commit);
    }
    assert_converged(&[&alice, &bob, &carol]);
    // A stale commit (for the old epoch) is refused by the rebuilt state.
    let stale = alice.group.as_mut().unwrap().self_update(&alice.provider, &alice.identity).unwrap();
    let mut frame = alice.frame(&Commit {
        commit: stale.commit,
        welcome: None,
        welcome_recipients: vec![],
        group_info: None,
    });
    frame.header_mut().set_epoch(epoch_before);
    frame.sign(&alice.key);
    let reply = alice.send_and_wait(&frame).await;
    assert_eq!(error_code(&reply), ErrorCode::WrongEpoch.to_u16());
    alice.group.as_mut().unwrap().discard_pending_commit(&alice.provider).unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_welcome_waits_for_an_offline_recipient_and_external_joins_use_the_published_group_info() {
    let server = TestServer::start(default_limits()).await;
    // External joins by users who were not invited: only where the room's join rule is open.
    let (mut alice, mut bob, mut carol) = three_member_room_with(&server, Some(JoinRule::Open)).await;

    // Dave uploads key packages and goes offline; Alice adds him.
    let mut dave = TestClient::connect(&server, "dave", 4).await;
    dave.upload_key_packages(2).await;
    dave.disconnect().await;
    let dave_id = dave.sender();
    let ack: Ack = decode_ok(&alice.add(&[dave_id]).await);
    for other in [&mut bob, &mut carol] {
        let commit = other.next_of(Opcode::Commit).await;
        other.apply(&commit);
    }
    // On connecting, Dave gets the Welcome that waited for him.
    dave.reconnect(&server).await;
    dave.join_from_welcome(ROOM).await;
    assert_eq!(dave.epoch(), ack.epoch);
    assert_converged(&[&alice, &bob, &carol, &dave]);

    // Erin joins without a Welcome: GroupInfo from the server, external commit.
    let mut erin = TestClient::connect(&server, "erin", 5).await;
    erin.room = ROOM;
    let reply = erin.request(&kalandra_proto::payload::GroupInfoRequest {}).await;
    let info: kalandra_proto::payload::GroupInfo = decode_ok(&reply);
    assert_eq!(info.epoch, ack.epoch);
    let (group, output) = client_core::mls::RoomGroup::join_by_external_commit(
        &erin.provider,
        &erin.identity,
        &info.group_info,
        Some(&info.ratchet_tree),
    )
    .unwrap();
    erin.group = Some(group);
    let mut frame = erin.frame(&kalandra_proto::payload::ExternalJoin {
        commit: output.commit,
        group_info: Some(output.group_info),
    });
    frame.header_mut().set_epoch(info.epoch);
    frame.sign(&erin.key);
    let joined: Ack = decode_ok(&erin.send_and_wait(&frame).await);
    assert_eq!(joined.epoch, info.epoch + 1);
    for member in [&mut alice, &mut bob, &mut carol, &mut dave] {
        member.subscribe(joined.log_index).await;
        let commit = member.next_of(Opcode::ExternalJoin).await;
        let external: kalandra_proto::payload::ExternalJoin = commit.decode_payload().unwrap();
        member.group.as_mut().unwrap().process_handshake(&member.provider, &external.commit).unwrap();
    }
    assert_converged(&[&alice, &bob, &carol, &dave, &erin]);
    // Erin is a member for the server too: she can post.
    decode_ok::<Ack>(&erin.send_text("hello from erin").await);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_who_are_not_connected_get_the_push_payload_and_decrypt_it_with_their_key_cache() {
    use client_core::push::{
        decrypt_push, export_notification_keys, seal_push, NotificationKey, NotificationKeyFromGroup as _,
    };
    let server = TestServer::start(default_limits()).await;
    let (mut alice, bob, mut carol) = three_member_room(&server).await;
    // Carol keeps the room's push key in her cache, then goes offline.
    let carol_key = NotificationKey::from_group(&carol.provider, carol.group.as_ref().unwrap()).unwrap();
    let cache = export_notification_keys(&[carol_key]).unwrap();
    carol.disconnect().await;

    let alice_key = NotificationKey::from_group(&alice.provider, alice.group.as_ref().unwrap()).unwrap();
    let sealed = seal_push(&alice_key, b"Alice: lunch?", &[7; 24]).unwrap();
    let with_push = Application {
        generation: 0,
        ciphertext: bytes::Bytes::from_static(b"the message itself"),
        push: Some(bytes::Bytes::from(sealed.clone())),
        epoch_tag: None,
    };
    let ack: Ack = decode_ok(&alice.request(&with_push).await);
    // A message without a push payload produces no notification.
    decode_ok::<Ack>(&alice.send_text("no push for this one").await);

    let mut delivered = Vec::new();
    for _ in 0..100 {
        delivered.extend(server.push_sink.take());
        if !delivered.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    delivered.extend(server.push_sink.take());
    // Exactly Carol: Bob is connected, Alice sent it.
    assert_eq!(delivered.len(), 1, "{delivered:?}");
    let notification = &delivered[0];
    assert_eq!(notification.recipient, carol.sender());
    assert_ne!(notification.recipient, bob.sender());
    assert_eq!((notification.room_id, notification.log_index), (ROOM, ack.log_index));
    assert_eq!(notification.payload.to_vec(), sealed, "forwarded byte for byte");
    // What a Notification Service Extension does: the cache and the payload, nothing else.
    let message = decrypt_push(cache.as_bytes(), &notification.payload).unwrap();
    assert_eq!(message.plaintext, b"Alice: lunch?");
    assert_eq!((message.room_id, message.epoch), (ROOM, alice.epoch()));
    server.stop().await;
}
