//! Moderation end to end over real QUIC on loopback: kicks and bans as
//! server-signed Remove proposals, the room closed until a covering commit,
//! what a kicked member can still read, bans against re-adding and
//! rejoining, roles and their errors, and all of it across a restart.

mod common;

use client_core::mls::{HandshakeOutcome, RoomGroup};
use client_core::moderation::{commit_for_server_proposal, commit_payload, ServerProposalResponse};
use client_core::sender_keys::{open_application, seal_application, SenderKeyState};
use common::*;
use ed25519_dalek::SigningKey;
use kalandra_proto::opcode::OpcodeClass;
use kalandra_proto::payload::{
    Ack, Application, Ban, Commit, Error as ErrorPayload, ExternalJoin, GroupInfo, GroupInfoRequest, Kick,
    Proposal, Redact, SetRole, Sync, SyncDone, Unban,
};
use kalandra_proto::{ErrorCode, Frame, Opcode, RoomId, SenderId};
use kalandra_server::sim::{SERVER_PROPOSAL_REANNOUNCE_MS, SERVER_SENDER_ID};
use kalandra_server::Role;

const ROOM: RoomId = RoomId(*b"moderated-room-1");

/// Alice creates the room and adds Bob and Carol; all three subscribed live.
async fn three_member_room(server: &TestServer) -> (TestClient, TestClient, TestClient) {
    let mut alice = TestClient::connect(server, "alice", 1).await;
    let mut bob = TestClient::connect(server, "bob", 2).await;
    let mut carol = TestClient::connect(server, "carol", 3).await;
    bob.upload_key_packages(3).await;
    carol.upload_key_packages(3).await;
    alice.create_room(ROOM).await;
    alice.subscribe(1).await;
    alice.next_of(Opcode::SyncDone).await;
    let (bob_id, carol_id) = (bob.sender(), carol.sender());
    decode_ok::<Ack>(&alice.add(&[bob_id, carol_id]).await);
    bob.join_from_welcome(ROOM).await;
    carol.join_from_welcome(ROOM).await;
    for member in [&mut bob, &mut carol] {
        member.subscribe(2).await;
        member.next_of(Opcode::SyncDone).await;
    }
    (alice, bob, carol)
}

fn code(frame: &Frame) -> ErrorCode {
    ErrorCode::from_u16(error_code(frame)).expect("a defined error code")
}

/// Every frame of the room's log from `from`, read over a fresh connection.
async fn log_from(server: &TestServer, key: &SigningKey, from: u64) -> Vec<Frame> {
    let mut conn = server.connect(key).await.unwrap();
    let request_id = conn.next_request_id();
    let mut sync = Frame::with_payload(
        header(Opcode::Sync, ROOM, conn.sender_id(), 0, request_id),
        &Sync { from_log_index: from, count_max: 4096 },
    )
    .unwrap();
    sync.sign(key);
    conn.send(&sync).await.unwrap();
    let mut log = Vec::new();
    loop {
        let frame = conn.recv().await.unwrap();
        match frame.opcode() {
            Opcode::SyncDone if frame.header().request_id() == request_id => {
                let done: SyncDone = decode_ok(&frame);
                assert_eq!(done.next_log_index, from + u64::try_from(log.len()).unwrap());
                break;
            }
            Opcode::Error => panic!("reading the log: {:?}", frame.decode_payload::<ErrorPayload>()),
            _ if frame.opcode().class() == OpcodeClass::Sequenced => log.push(frame),
            _ => {}
        }
    }
    conn.close().await;
    log
}

/// Seals `text` with the member's sender keys and sends it; the server's reply.
async fn send_sealed(client: &mut TestClient, keys: &mut SenderKeyState, text: &str) -> Frame {
    let mut frame = seal_application(keys, text.as_bytes(), &client.key).unwrap();
    let request_id = client.conn().next_request_id();
    frame.header_mut().set_request_id(request_id);
    frame.sign(&client.key);
    client.send_and_wait(&frame).await
}

fn leaf_of(group: &RoomGroup, member: &TestClient) -> u32 {
    let key = member.key.verifying_key().to_bytes();
    group.members().into_iter().find(|m| m.identity == key).expect("a member").leaf_index
}

/// Processes a sequenced server proposal and, unless it removes us,
/// commits it; returns the server's answer to the commit, if one was sent.
async fn answer_server_proposal(client: &mut TestClient, proposal: &Frame) -> Option<Frame> {
    assert_eq!(proposal.header().sender_id(), SERVER_SENDER_ID);
    let payload: Proposal = proposal.decode_payload().unwrap();
    let group = client.group.as_mut().unwrap();
    let outcome = group.process_handshake(&client.provider, &payload.proposal).unwrap();
    match commit_for_server_proposal(group, &client.provider, &client.identity, &outcome).unwrap() {
        ServerProposalResponse::Commit(output) => {
            let reply = client.request(&commit_payload(&output)).await;
            client.settle_commit(&reply);
            Some(reply)
        }
        ServerProposalResponse::WeAreRemoved => None,
        ServerProposalResponse::NotAServerProposal => panic!("{}: not a server proposal", client.name),
    }
}

fn apply_commit_frame(client: &mut TestClient, frame: &Frame) -> HandshakeOutcome {
    let commit: Commit = frame.decode_payload().unwrap();
    client.group.as_mut().unwrap().process_handshake(&client.provider, &commit.commit).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kicked_member_cannot_decrypt_anything_sequenced_after_the_kick() {
    let server = TestServer::start(default_limits()).await;
    let (mut alice, mut bob, mut carol) = three_member_room(&server).await;
    let mut bob_keys = SenderKeyState::from_group(&bob.provider, bob.group.as_ref().unwrap()).unwrap();
    let mut carol_keys = SenderKeyState::from_group(&carol.provider, carol.group.as_ref().unwrap()).unwrap();

    // Before the kick Bob reads Carol's messages.
    decode_ok::<Ack>(&send_sealed(&mut carol, &mut carol_keys, "before the kick").await);
    let before = bob.next_of(Opcode::Application).await;
    let carol_leaf = leaf_of(bob.group.as_ref().unwrap(), &carol);
    let carol_identity = carol.key.verifying_key().to_bytes();
    assert_eq!(
        open_application(&mut bob_keys, &before, carol_leaf, &carol_identity).unwrap(),
        b"before the kick"
    );

    // Bob keeps everything he has: his MLS group and his sender keys.
    let bob_old_group_epoch = bob.epoch();
    let bob_id = bob.sender();
    let kick: Ack = decode_ok(&alice.request(&Kick { target: bob_id.0, reason: "spam".into() }).await);
    let kick_index = kick.log_index;
    assert_eq!(kick.epoch, bob_old_group_epoch, "a kick is a proposal: no new epoch yet");

    // From the kick on, nobody posts in the epoch Bob can read.
    let refused = send_sealed(&mut carol, &mut carol_keys, "during the kick").await;
    assert_eq!(code(&refused), ErrorCode::PendingProposals);
    let refused = send_sealed(&mut bob, &mut bob_keys, "bob's last word").await;
    assert_eq!(code(&refused), ErrorCode::PendingProposals);

    // Everyone receives the server's proposal; Carol commits it first.
    let proposal = carol.next_of(Opcode::Proposal).await;
    assert_eq!(proposal.header().log_index(), kick_index);
    let reply = answer_server_proposal(&mut carol, &proposal).await.expect("Carol commits");
    let covering: Ack = decode_ok(&reply);
    assert_eq!((covering.log_index, covering.epoch), (kick_index + 1, bob_old_group_epoch + 1));
    // Alice processes the proposal too, then Carol's commit.
    let for_alice = alice.next_of(Opcode::Proposal).await;
    let payload: Proposal = for_alice.decode_payload().unwrap();
    alice.group.as_mut().unwrap().process_handshake(&alice.provider, &payload.proposal).unwrap();
    let commit = alice.next_of(Opcode::Commit).await;
    apply_commit_frame(&mut alice, &commit);
    assert_eq!(alice.epoch(), carol.epoch());
    assert!(!alice
        .group
        .as_ref()
        .unwrap()
        .members()
        .iter()
        .any(|m| m.identity == bob.key.verifying_key().to_bytes()));

    // Bob sees his removal proposal and learns nothing from it.
    let for_bob = bob.next_of(Opcode::Proposal).await;
    assert_eq!(answer_server_proposal(&mut bob, &for_bob).await, None, "Bob cannot commit his own removal");

    // The room lives on: messages in two new epochs.
    let mut alice_keys = SenderKeyState::from_group(&alice.provider, alice.group.as_ref().unwrap()).unwrap();
    let mut carol_keys = SenderKeyState::from_group(&carol.provider, carol.group.as_ref().unwrap()).unwrap();
    for round in 0..3 {
        decode_ok::<Ack>(&send_sealed(&mut alice, &mut alice_keys, &format!("alice {round}")).await);
        decode_ok::<Ack>(&send_sealed(&mut carol, &mut carol_keys, &format!("carol {round}")).await);
    }
    let update = alice.self_update().await;
    decode_ok::<Ack>(&update);
    let commit = carol.next_of(Opcode::Commit).await;
    apply_commit_frame(&mut carol, &commit);
    let mut alice_keys = SenderKeyState::from_group(&alice.provider, alice.group.as_ref().unwrap()).unwrap();
    let mut carol_keys = SenderKeyState::from_group(&carol.provider, carol.group.as_ref().unwrap()).unwrap();
    decode_ok::<Ack>(&send_sealed(&mut alice, &mut alice_keys, "alice later").await);
    decode_ok::<Ack>(&send_sealed(&mut carol, &mut carol_keys, "carol later").await);
    // Carol can read Alice (the members are fine).
    let from_alice = carol.next_of(Opcode::Application).await;
    let alice_leaf = leaf_of(carol.group.as_ref().unwrap(), &alice);
    assert_eq!(
        open_application(&mut carol_keys, &from_alice, alice_leaf, &alice.key.verifying_key().to_bytes())
            .unwrap(),
        b"alice later"
    );

    // Bob gets every frame sequenced after the kick (as if the server
    // leaked them) and tries them all with his old state.
    let after = log_from(&server, &alice.key, kick_index + 1).await;
    assert_eq!(after.len(), 1 + 6 + 1 + 2, "covering commit, six messages, a commit, two messages");
    let mut applications = 0;
    let mut handshakes = 0;
    let alice_identity = alice.key.verifying_key().to_bytes();
    let alice_old_leaf = leaf_of(bob.group.as_ref().unwrap(), &alice);
    for frame in &after {
        assert!(frame.header().epoch() > bob_old_group_epoch || frame.opcode() == Opcode::Commit);
        match frame.opcode() {
            Opcode::Application => {
                applications += 1;
                let (leaf, identity) = if frame.header().sender_id() == alice.sender() {
                    (alice_old_leaf, alice_identity)
                } else {
                    (carol_leaf, carol_identity)
                };
                assert!(open_application(&mut bob_keys, frame, leaf, &identity).is_err());
                // Even ignoring the epoch in the header, his keys do not open it.
                let payload: Application = frame.decode_payload().unwrap();
                assert!(
                    bob_keys
                        .decrypt(leaf, frame.header().sender_id(), payload.generation, &payload.ciphertext)
                        .is_err(),
                    "Bob's old sender keys must not open a message sequenced after the kick"
                );
            }
            Opcode::Commit => {
                handshakes += 1;
                let commit: Commit = frame.decode_payload().unwrap();
                let group = bob.group.as_mut().unwrap();
                match group.process_handshake(&bob.provider, &commit.commit) {
                    // The covering commit only tells Bob he is out: no secret of the new epoch.
                    Ok(HandshakeOutcome::CommitApplied(applied)) => {
                        assert!(applied.self_removed, "Bob learns only that he was removed");
                        assert!(!group.is_active());
                        assert!(SenderKeyState::from_group(&bob.provider, group).is_err());
                    }
                    Ok(other) => panic!("unexpected {other:?}"),
                    Err(_) => {}
                }
            }
            other => panic!("unexpected {other:?} after the kick"),
        }
    }
    assert_eq!((applications, handshakes), (8, 2));
    // The server lets him read his removal (the proposal and the commit
    // that covers it) and nothing after it.
    let sync = bob.frame(&Sync { from_log_index: kick_index, count_max: 10 });
    let done = bob.send_and_wait(&sync).await;
    assert_eq!(decode_ok::<SyncDone>(&done).next_log_index, kick_index + 2, "read through his removal");
    let sync = bob.frame(&Sync { from_log_index: kick_index + 2, count_max: 10 });
    assert_eq!(code(&bob.send_and_wait(&sync).await), ErrorCode::NotMember);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_leaves_the_removal_out_is_refused() {
    let server = TestServer::start(default_limits()).await;
    let (mut alice, mut bob, mut carol) = three_member_room(&server).await;
    let kick: Ack = decode_ok(&alice.request(&Kick { target: bob.sender().0, reason: String::new() }).await);
    // Carol commits without having processed the proposal: it is left out.
    let reply = carol.self_update().await;
    assert_eq!(code(&reply), ErrorCode::PendingProposals);
    // Bob, still a member until then, cannot dodge it either.
    let reply = bob.self_update().await;
    assert_eq!(code(&reply), ErrorCode::PendingProposals);
    let proposal = carol.next_of(Opcode::Proposal).await;
    assert_eq!(proposal.header().log_index(), kick.log_index);
    let reply = answer_server_proposal(&mut carol, &proposal).await.unwrap();
    decode_ok::<Ack>(&reply);
    decode_ok::<Ack>(&carol.send_text("open again").await);
    server.stop().await;
}

/// Builds `client`'s external join of the room from `info` (not sent).
fn external_join_frame(client: &mut TestClient, info: &GroupInfo) -> (RoomGroup, Frame) {
    let (group, output) = RoomGroup::join_by_external_commit(
        &client.provider,
        &client.identity,
        &info.group_info,
        Some(&info.ratchet_tree),
    )
    .unwrap();
    let mut frame =
        client.frame(&ExternalJoin { commit: output.commit, group_info: Some(output.group_info) });
    frame.header_mut().set_epoch(info.epoch);
    frame.sign(&client.key);
    (group, frame)
}

/// A member stuck on a commit it cannot process comes back only by an
/// external join. If that were refused while a removal waits, a room whose
/// only member willing to commit the removal is that member would stay
/// closed for good. The rejoin is sequenced, the removal is issued again in
/// the epoch it begins (before anything else), and the room stays closed
/// until the rejoined member covers it; the removal's target still may not
/// join, nor may the same member rejoin a second time before a commit
/// covers the removal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_rejoins_while_a_removal_waits_and_the_removal_is_issued_again() {
    let server = TestServer::start(default_limits()).await;
    let (mut alice, mut bob, mut carol) = three_member_room(&server).await;
    let kick: Ack = decode_ok(&alice.request(&Kick { target: bob.sender().0, reason: String::new() }).await);
    let info: GroupInfo = decode_ok(&carol.request(&GroupInfoRequest {}).await);

    // Bob, the target, may not come back by the same door.
    let (_, bob_join) = external_join_frame(&mut bob, &info);
    assert_eq!(code(&bob.send_and_wait(&bob_join).await), ErrorCode::PendingProposals);

    // Carol replaces her own leaf.
    let (group, carol_join) = external_join_frame(&mut carol, &info);
    let joined: Ack = decode_ok(&carol.send_and_wait(&carol_join).await);
    assert_eq!(joined.log_index, kick.log_index + 1);
    carol.group = Some(group);

    let log = log_from(&server, &alice.key, joined.log_index).await;
    assert_eq!(log.len(), 2, "the join and the removal issued again, nothing else");
    assert_eq!(log[0].opcode(), Opcode::ExternalJoin);
    let reissued = &log[1];
    assert_eq!((reissued.opcode(), reissued.header().sender_id()), (Opcode::Proposal, SERVER_SENDER_ID));
    assert_eq!(reissued.header().epoch(), carol.epoch(), "issued in the epoch the join began");

    // Closed again at once: no message, and Bob still cannot join.
    assert_eq!(code(&carol.send_text("too early").await), ErrorCode::PendingProposals);
    let info: GroupInfo = decode_ok(&carol.request(&GroupInfoRequest {}).await);
    let (_, bob_join) = external_join_frame(&mut bob, &info);
    assert_eq!(code(&bob.send_and_wait(&bob_join).await), ErrorCode::PendingProposals);

    // Once is enough: a member rejoining again and again would end every
    // epoch before anyone's covering commit lands.
    let mut carol_again = TestClient::connect(&server, "carol again", 3).await;
    carol_again.room = ROOM;
    let (_, again) = external_join_frame(&mut carol_again, &info);
    assert_eq!(code(&carol_again.send_and_wait(&again).await), ErrorCode::PendingProposals);

    // Carol covers it: Bob is out, the room open again.
    let reply = answer_server_proposal(&mut carol, reissued).await.unwrap();
    decode_ok::<Ack>(&reply);
    assert!(carol
        .group
        .as_ref()
        .unwrap()
        .members()
        .iter()
        .all(|m| m.identity != bob.key.verifying_key().to_bytes()));
    decode_ok::<Ack>(&carol.send_text("open again").await);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncovered_removals_are_reannounced_to_members_after_the_bound() {
    let server = TestServer::start(default_limits()).await;
    let (mut alice, bob, mut carol) = three_member_room(&server).await;
    let kick: Ack = decode_ok(&alice.request(&Kick { target: bob.sender().0, reason: String::new() }).await);
    carol.next_of(Opcode::Proposal).await;
    server.advance_clock(SERVER_PROPOSAL_REANNOUNCE_MS);
    // Within a tick of the shard, the members are reminded; nothing else changed.
    let notice = carol.next_of(Opcode::Error).await;
    let error: ErrorPayload = notice.decode_payload().unwrap();
    assert_eq!(error.code, ErrorCode::PendingProposals.to_u16());
    assert_eq!(error.log_index, Some(kick.log_index));
    assert_eq!(code(&carol.send_text("still closed").await), ErrorCode::PendingProposals);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ban_refuses_re_adding_and_rejoining_until_lifted_and_timed_bans_end() {
    let server = TestServer::start(default_limits()).await;
    let (mut alice, mut bob, mut carol) = three_member_room(&server).await;
    let bob_id = bob.sender();
    bob.upload_key_packages(4).await;
    let ban: Ack =
        decode_ok(&alice.request(&Ban { target: bob_id.0, reason: "abuse".into(), duration_ms: None }).await);
    let proposal = carol.next_of(Opcode::Proposal).await;
    assert_eq!(proposal.header().log_index(), ban.log_index);
    decode_ok::<Ack>(&answer_server_proposal(&mut carol, &proposal).await.unwrap());
    let proposal = alice.next_of(Opcode::Proposal).await;
    let payload: Proposal = proposal.decode_payload().unwrap();
    alice.group.as_mut().unwrap().process_handshake(&alice.provider, &payload.proposal).unwrap();
    let commit = alice.next_of(Opcode::Commit).await;
    apply_commit_frame(&mut alice, &commit);

    // Re-adding Bob is refused.
    assert_eq!(code(&alice.add(&[bob_id]).await), ErrorCode::Banned);
    // So is his external join.
    let mut rejoin = TestClient::connect(&server, "bob again", 2).await;
    rejoin.room = ROOM;
    let info: GroupInfo = {
        let mut reader = TestClient::connect(&server, "carol reads", 3).await;
        reader.room = ROOM;
        decode_ok(&reader.request(&GroupInfoRequest {}).await)
    };
    let (_, output) = RoomGroup::join_by_external_commit(
        &rejoin.provider,
        &rejoin.identity,
        &info.group_info,
        Some(&info.ratchet_tree),
    )
    .unwrap();
    let mut frame = rejoin
        .frame(&ExternalJoin { commit: output.commit.clone(), group_info: Some(output.group_info.clone()) });
    frame.header_mut().set_epoch(info.epoch);
    frame.sign(&rejoin.key);
    assert_eq!(code(&rejoin.send_and_wait(&frame).await), ErrorCode::Banned);

    // Unban, and Alice can add him back.
    decode_ok::<Ack>(&alice.request(&Unban { target: bob_id.0, reason: "appeal".into() }).await);
    assert_eq!(
        code(&alice.request(&Unban { target: bob_id.0, reason: String::new() }).await),
        ErrorCode::NotMember
    );
    decode_ok::<Ack>(&alice.add(&[bob_id]).await);
    let commit = carol.next_of(Opcode::Commit).await;
    apply_commit_frame(&mut carol, &commit);

    // A timed ban ends by itself: Carol is banned for an hour, removed, and
    // can be re-added once the server's clock has passed the hour.
    let carol_id = carol.sender();
    carol.upload_key_packages(2).await;
    decode_ok::<Ack>(
        &alice
            .request(&Ban { target: carol_id.0, reason: "cool down".into(), duration_ms: Some(3_600_000) })
            .await,
    );
    let proposal = alice.next_of(Opcode::Proposal).await;
    decode_ok::<Ack>(&answer_server_proposal(&mut alice, &proposal).await.unwrap());
    assert_eq!(code(&alice.add(&[carol_id]).await), ErrorCode::Banned);
    server.advance_clock(3_600_000);
    decode_ok::<Ack>(&alice.add(&[carol_id]).await);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_decide_who_moderates_and_every_refusal_has_its_code() {
    let server = TestServer::start(default_limits()).await;
    let (mut alice, mut bob, carol) = three_member_room(&server).await;
    let (alice_id, bob_id, carol_id) = (alice.sender(), bob.sender(), carol.sender());

    // Without a role Bob can do nothing.
    assert_eq!(
        code(&bob.request(&Kick { target: carol_id.0, reason: String::new() }).await),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code(&bob.request(&Ban { target: carol_id.0, reason: String::new(), duration_ms: None }).await),
        ErrorCode::Forbidden
    );
    let grant = SetRole { target: carol_id.0, role: "moderator".into(), granted: true };
    assert_eq!(code(&bob.request(&grant).await), ErrorCode::Forbidden);
    assert_eq!(
        code(&bob.request(&Redact { log_index: 1, reason: String::new() }).await),
        ErrorCode::Forbidden
    );

    // The admin grants Bob the moderator role.
    let set = SetRole { target: bob_id.0, role: "moderator".into(), granted: true };
    decode_ok::<Ack>(&alice.request(&set).await);
    assert_eq!(code(&alice.request(&set).await), ErrorCode::Forbidden, "already a moderator");
    let admin = SetRole { target: bob_id.0, role: "admin".into(), granted: true };
    assert_eq!(code(&alice.request(&admin).await), ErrorCode::Forbidden, "the admin role is the creator's");
    let unknown = SetRole { target: bob_id.0, role: "owner".into(), granted: true };
    assert_eq!(code(&alice.request(&unknown).await), ErrorCode::Forbidden);

    // A moderator cannot act on the admin, on himself, or grant roles.
    assert_eq!(
        code(&bob.request(&Kick { target: alice_id.0, reason: String::new() }).await),
        ErrorCode::Forbidden
    );
    assert_eq!(
        code(&bob.request(&Kick { target: bob_id.0, reason: String::new() }).await),
        ErrorCode::Forbidden
    );
    assert_eq!(code(&bob.request(&grant).await), ErrorCode::Forbidden);
    // Unknown targets and rooms.
    assert_eq!(
        code(&bob.request(&Kick { target: 12345, reason: String::new() }).await),
        ErrorCode::NotMember
    );
    assert_eq!(
        code(&bob.request(&Unban { target: 12345, reason: String::new() }).await),
        ErrorCode::NotMember
    );
    let mut elsewhere = bob.frame(&Kick { target: carol_id.0, reason: String::new() });
    elsewhere.header_mut().set_room_id(RoomId([9; 16]));
    elsewhere.sign(&bob.key);
    assert_eq!(code(&bob.send_and_wait(&elsewhere).await), ErrorCode::UnknownRoom);

    // Bob kicks Carol; a second kick while the first is pending is a conflict.
    let kick: Ack = decode_ok(&bob.request(&Kick { target: carol_id.0, reason: "off topic".into() }).await);
    assert_eq!(
        code(&bob.request(&Kick { target: carol_id.0, reason: String::new() }).await),
        ErrorCode::PendingProposals
    );
    // Revoked, Bob is powerless again.
    let revoke = SetRole { target: bob_id.0, role: "moderator".into(), granted: false };
    decode_ok::<Ack>(&alice.request(&revoke).await);
    assert_eq!(code(&alice.request(&revoke).await), ErrorCode::Forbidden, "no role left to revoke");
    assert_eq!(
        code(&bob.request(&Ban { target: carol_id.0, reason: String::new(), duration_ms: None }).await),
        ErrorCode::Forbidden
    );

    let info = server.node.room_info(ROOM).await.unwrap();
    assert_eq!(info.roles, vec![(alice_id, Role::Admin)]);
    assert_eq!(info.server_proposals_pending, 1);
    assert_eq!(info.pending_since.map(|(index, _)| index), Some(kick.log_index));
    let audit = server.node.store().audit_records(0, 100).unwrap();
    assert_eq!(audit.len(), 3, "grant, kick, revoke: refusals are not acts");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_bans_and_a_pending_removal_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_in(dir.path(), default_limits()).await;
    let (mut alice, mut bob, mut carol) = three_member_room(&server).await;
    let (bob_id, carol_id) = (bob.sender(), carol.sender());
    let stranger = SenderId(0x5157_0000_0000_0001);
    decode_ok::<Ack>(
        &alice.request(&SetRole { target: bob_id.0, role: "moderator".into(), granted: true }).await,
    );
    decode_ok::<Ack>(
        &alice.request(&Ban { target: stranger.0, reason: "spam bot".into(), duration_ms: None }).await,
    );
    let kick: Ack = decode_ok(&bob.request(&Kick { target: carol_id.0, reason: "off topic".into() }).await);
    let proposal = alice.next_of(Opcode::Proposal).await;
    for client in [&mut alice, &mut bob, &mut carol] {
        client.disconnect().await;
    }
    server.stop().await;

    let server = TestServer::start_in(dir.path(), default_limits()).await;
    for client in [&mut alice, &mut bob, &mut carol] {
        client.reconnect(&server).await;
    }
    let info = server.node.room_info(ROOM).await.unwrap();
    assert_eq!(info.roles, vec![(alice.sender(), Role::Admin), (bob_id, Role::Moderator)]);
    assert_eq!(info.bans, vec![(stranger, None)]);
    assert_eq!(info.pending_since.map(|(index, _)| index), Some(kick.log_index));
    // The pending removal is still enforced: no message, no commit that leaves it out.
    assert_eq!(code(&bob.send_text("hello?").await), ErrorCode::PendingProposals);
    assert_eq!(code(&bob.self_update().await), ErrorCode::PendingProposals);
    // Bob is still a moderator, and the covering commit opens the room.
    assert_eq!(
        code(&bob.request(&Kick { target: carol_id.0, reason: String::new() }).await),
        ErrorCode::PendingProposals
    );
    decode_ok::<Ack>(&answer_server_proposal(&mut alice, &proposal).await.unwrap());
    decode_ok::<Ack>(&alice.send_text("open again").await);
    let audit = server.node.store().audit_records(0, 100).unwrap();
    assert_eq!(audit.len(), 3);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moderator_being_removed_or_removed_moderates_no_more() {
    let server = TestServer::start(default_limits()).await;
    let (mut alice, mut bob, mut carol) = three_member_room(&server).await;
    let (bob_id, carol_id) = (bob.sender(), carol.sender());
    decode_ok::<Ack>(
        &alice.request(&SetRole { target: bob_id.0, role: "moderator".into(), granted: true }).await,
    );
    // The admin removes the moderator; while that is pending he cannot strike back.
    decode_ok::<Ack>(&alice.request(&Kick { target: bob_id.0, reason: "rogue".into() }).await);
    let reply = bob.request(&Kick { target: carol_id.0, reason: String::new() }).await;
    assert_eq!(code(&reply), ErrorCode::Forbidden);
    let proposal = carol.next_of(Opcode::Proposal).await;
    decode_ok::<Ack>(&answer_server_proposal(&mut carol, &proposal).await.unwrap());
    // Removed, he still holds the role on the server but cannot use it.
    let reply = bob.request(&Ban { target: carol_id.0, reason: String::new(), duration_ms: None }).await;
    assert_eq!(code(&reply), ErrorCode::Forbidden);
    let info = server.node.room_info(ROOM).await.unwrap();
    assert!(!info.members.contains(&bob_id) && info.members.contains(&carol_id));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moderators_redact_any_message_and_members_only_their_own() {
    use kalandra_server::audit::{self, ActorKind, AuditAction, AuditRecord};
    use kalandra_server::store::{EntryContent, ErasureCause};
    let server = TestServer::start(default_limits()).await;
    let (mut alice, mut bob, mut carol) = three_member_room(&server).await;
    let (alice_id, bob_id, carol_id) = (alice.sender(), bob.sender(), carol.sender());
    let bobs: Ack = decode_ok(&bob.send_text("bob's message").await);
    let carols: Ack = decode_ok(&carol.send_text("carol's message").await);
    let alices: Ack = decode_ok(&alice.send_text("alice's message").await);
    let redact = |log_index| Redact { log_index, reason: "cleanup".into() };
    let store = server.node.store();

    // A plain member may not redact someone else's message: nothing is erased.
    assert_eq!(code(&carol.request(&redact(bobs.log_index)).await), ErrorCode::Forbidden);
    assert!(store.data_key(ROOM, bobs.log_index).unwrap().is_some(), "still readable");
    // Her own, she may.
    let own: Ack = decode_ok(&carol.request(&redact(carols.log_index)).await);
    assert_eq!(own.log_index, carols.log_index);
    // The admin (the room's creator) redacts Bob's message.
    let erased: Ack = decode_ok(&alice.request(&redact(bobs.log_index)).await);
    assert_eq!(erased.log_index, bobs.log_index);
    // A moderator redacts the admin's; handshake frames stay whatever the role.
    decode_ok::<Ack>(
        &alice.request(&SetRole { target: bob_id.0, role: "moderator".into(), granted: true }).await,
    );
    decode_ok::<Ack>(&bob.request(&redact(alices.log_index)).await);
    assert_eq!(code(&bob.request(&redact(1)).await), ErrorCode::Forbidden, "the add commit");
    assert_eq!(code(&bob.request(&redact(999)).await), ErrorCode::UnknownLogIndex);
    let mut elsewhere = bob.frame(&redact(2));
    elsewhere.header_mut().set_room_id(RoomId([9; 16]));
    elsewhere.sign(&bob.key);
    assert_eq!(code(&bob.send_and_wait(&elsewhere).await), ErrorCode::UnknownRoom);
    // Revoked, Bob is a plain member again.
    decode_ok::<Ack>(
        &alice.request(&SetRole { target: bob_id.0, role: "moderator".into(), granted: false }).await,
    );
    let later: Ack = decode_ok(&carol.send_text("another one").await);
    assert_eq!(code(&bob.request(&redact(later.log_index)).await), ErrorCode::Forbidden);
    assert!(store.data_key(ROOM, later.log_index).unwrap().is_some());

    // The tombstones name who erased what.
    let cause = |log_index| match &store.read_range(ROOM, log_index, 1).unwrap()[0].content {
        EntryContent::Erased(erasure) => erasure.redaction.cause,
        EntryContent::Frame(_) => panic!("index {log_index} was not erased"),
    };
    assert_eq!(cause(carols.log_index), ErasureCause::Sender { actor: carol_id.0 });
    assert_eq!(cause(bobs.log_index), ErasureCause::Moderator { actor: alice_id.0 });
    assert_eq!(cause(alices.log_index), ErasureCause::Moderator { actor: bob_id.0 });

    // Every redaction is in the audit log with its actor, target and index;
    // refusals are not.
    let records: Vec<AuditRecord> = store
        .audit_records(0, 100)
        .unwrap()
        .iter()
        .map(|(_, bytes)| AuditRecord::decode(bytes).unwrap())
        .collect();
    let summary: Vec<_> =
        records.iter().map(|r| (r.action, r.actor_kind, r.actor_id, r.target, r.log_index)).collect();
    let member = ActorKind::Member;
    assert_eq!(
        summary,
        [
            (AuditAction::Redact, member, Some(carol_id.0), Some(carol_id.0), Some(carols.log_index)),
            (AuditAction::Redact, member, Some(alice_id.0), Some(bob_id.0), Some(bobs.log_index)),
            (AuditAction::GrantRole, member, Some(alice_id.0), Some(bob_id.0), None),
            (AuditAction::Redact, member, Some(bob_id.0), Some(alice_id.0), Some(alices.log_index)),
            (AuditAction::RevokeRole, member, Some(alice_id.0), Some(bob_id.0), None),
        ]
    );
    assert_eq!(records[0].reason.as_deref(), Some("cleanup"));
    assert_eq!(records[1].room.as_deref(), Some(ROOM.to_string().as_str()));
    assert!(records[1].time_ms > 0);
    let head = store.audit_head().unwrap();
    assert_eq!(audit::verify(&records, head).unwrap().records, 5);
    server.stop().await;
}
