//! Hostile participants over real QUIC: each attack is refused with a typed
//! error before it is sequenced, and the room, and another room on the same
//! shard, keep working. See `docs/SECURITY.md`.

mod common;

use common::*;
use kalandra_proto::limits::PAYLOAD_BYTES_MAX;
use kalandra_proto::payload::{
    Ack, Commit, CreateRoom, Error as ErrorPayload, ExternalJoin, GroupInfo, GroupInfoRequest, JoinRule,
    Proposal,
};
use kalandra_proto::{ErrorCode, Frame, Opcode, Payload, RoomId};
use openmls::prelude::OpenMlsProvider as _;
use openmls::prelude::{
    BasicCredential, Capabilities, CredentialType, Extension, ExtensionType, Extensions, ExternalSender,
    GroupId, LeafNodeIndex, LeafNodeParameters, MlsGroup, MlsMessageOut, NewSignerBundle, ProtocolVersion,
    SignaturePublicKey, UnknownExtension, PURE_PLAINTEXT_WIRE_FORMAT_POLICY,
};
use tls_codec::Serialize as _;

const ROOM: RoomId = RoomId(*b"room-for-testing");
/// Shares the first eight bytes (which choose the shard) with [`ROOM`]:
/// on the same shard whatever the shard count.
const NEIGHBOUR: RoomId = RoomId(*b"room-for-neighbr");

fn assert_refused(reply: &Frame, code: ErrorCode, what: &str) {
    assert_eq!(reply.opcode(), Opcode::Error, "{what}: expected a refusal, got {reply:?}");
    let error: ErrorPayload = reply.decode_payload().unwrap();
    assert_eq!(error.code, code as u16, "{what}: {}", error.message);
}

/// Another room on the same shard, its creator subscribed.
async fn neighbour(server: &TestServer) -> TestClient {
    let mut dan = TestClient::connect(server, "dan", 40).await;
    assert_eq!(dan.create_room(NEIGHBOUR).await.log_index, 0);
    dan
}

/// The room and its shard still answer: a message in each room is acknowledged.
async fn still_working(member: &mut TestClient, neighbour: &mut TestClient) {
    decode_ok::<Ack>(&member.send_text("still here").await);
    decode_ok::<Ack>(&neighbour.send_text("and here").await);
}

/// Alice creates `ROOM` and adds the others (who had uploaded key packages).
async fn room_with(server: &TestServer, others: &mut [&mut TestClient]) -> TestClient {
    let mut alice = TestClient::connect(server, "alice", 1).await;
    assert_eq!(alice.create_room(ROOM).await.log_index, 0);
    let ids: Vec<_> = others.iter().map(|o| o.sender()).collect();
    decode_ok::<Ack>(&alice.add(&ids).await);
    for other in others.iter_mut() {
        other.join_from_welcome(ROOM).await;
    }
    alice
}

/// The client's OpenMLS group as stored by its provider: `RoomGroup` builds
/// only well-formed messages, these tests build hostile ones from it.
fn mls_group(client: &TestClient) -> MlsGroup {
    MlsGroup::load(client.provider.storage(), &GroupId::from_slice(&client.room.0)).unwrap().unwrap()
}

/// Drops a crafted commit the server refused and reloads the client's
/// `RoomGroup` from storage.
fn forget_crafted_commit(client: &mut TestClient, mut group: MlsGroup) {
    group.clear_pending_commit(client.provider.storage()).unwrap();
    client.group = Some(client_core::mls::RoomGroup::load(&client.provider, client.room.0).unwrap().unwrap());
}

fn encode(message: &MlsMessageOut) -> Vec<u8> {
    message.tls_serialize_detached().unwrap()
}

async fn client_with_key_packages(server: &TestServer, name: &'static str, seed: u8) -> TestClient {
    let mut client = TestClient::connect(server, name, seed).await;
    client.upload_key_packages(3).await;
    client
}

/// F5: a Welcome that with the server's ratchet tree would exceed the
/// Welcome payload limit used to pass, be made durable, and then panic the
/// shard; now it is refused before it gets a log index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_welcome_that_would_not_fit_is_refused_before_sequencing_and_the_shard_keeps_working() {
    let server = TestServer::start(default_limits()).await;
    let mut dan = neighbour(&server).await;
    // Members already in the tree make the tree larger than a commit that adds one more.
    let mut members = Vec::new();
    for (name, seed) in [("bob", 2), ("carol", 3), ("frank", 6), ("gina", 7)] {
        members.push(client_with_key_packages(&server, name, seed).await);
    }
    let mut refs: Vec<&mut TestClient> = members.iter_mut().collect();
    let mut alice = room_with(&server, &mut refs).await;
    let mut hal = client_with_key_packages(&server, "hal", 8).await;

    let key_packages = alice.claim(&[hal.sender()]).await;
    let output = alice
        .group
        .as_mut()
        .unwrap()
        .add_members(&alice.provider, &alice.identity, &[&key_packages[0]])
        .unwrap();
    assert!(output.ratchet_tree.len() > output.commit.len() + 256, "the tree outgrows the commit");
    // The largest Welcome the Commit frame itself can carry.
    let filler = PAYLOAD_BYTES_MAX as usize - output.commit.len() - 128;
    let oversize = Commit {
        commit: output.commit.clone(),
        welcome: Some(vec![0x5a; filler]),
        welcome_recipients: vec![hal.sender().0],
        group_info: None,
    };
    let reply = alice.request(&oversize).await;
    assert_refused(&reply, ErrorCode::WelcomeTooLarge, "oversize Welcome");
    still_working(&mut alice, &mut dan).await;

    // The same commit with its real Welcome is still the next one: nothing was merged.
    let fitting = Commit { welcome: output.welcome, group_info: Some(output.group_info), ..oversize };
    let ack: Ack = decode_ok(&alice.request(&fitting).await);
    alice.group.as_mut().unwrap().confirm_pending_commit(&alice.provider).unwrap();
    assert_eq!(ack.epoch, 2);
    assert_eq!(hal.join_from_welcome(ROOM).await, ack.log_index);
    assert_eq!(hal.epoch(), 2);
    still_working(&mut hal, &mut dan).await;
    server.stop().await;
}

/// A proposal sent again while the first is pending (its acknowledgement
/// was lost on the way) gets the first one's acknowledgement, not an error;
/// the same bytes from another member are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proposal_sent_again_while_pending_is_acknowledged_with_the_first_index() {
    let server = TestServer::start(default_limits()).await;
    let mut bob = client_with_key_packages(&server, "bob", 2).await;
    let mut carol = client_with_key_packages(&server, "carol", 3).await;
    let _alice = room_with(&server, &mut [&mut bob, &mut carol]).await;
    let left = bob.group.as_mut().unwrap().leave(&bob.provider, &bob.identity).unwrap();
    let first: Ack = decode_ok(&bob.request(&Proposal { proposal: left.proposal.clone() }).await);
    assert!(first.log_head.is_some());
    let again: Ack = decode_ok(&bob.request(&Proposal { proposal: left.proposal.clone() }).await);
    assert_eq!(
        (again.log_index, again.epoch, again.server_time_ms),
        (first.log_index, first.epoch, first.server_time_ms)
    );
    assert_eq!(again.log_head, None, "the head at the first one's index is not kept");
    let signed = again.signed_head.expect("a signed head");
    assert!(signed.log_index >= first.log_index, "signed at or after the proposal");
    let copied = carol.request(&Proposal { proposal: left.proposal.clone() }).await;
    assert_refused(&copied, ErrorCode::InvalidProposal, "bob's proposal sent by carol");
    server.stop().await;
}

/// F1: the admin's leaf used to be removable by any member's commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_cannot_remove_the_admin_or_each_other_but_may_leave() {
    let server = TestServer::start(default_limits()).await;
    let mut dan = neighbour(&server).await;
    let mut bob = client_with_key_packages(&server, "bob", 2).await;
    let mut carol = client_with_key_packages(&server, "carol", 3).await;
    let mut alice = room_with(&server, &mut [&mut bob, &mut carol]).await;
    let leaf_of = |client: &TestClient| client.group.as_ref().unwrap().own_leaf_index();
    let (alice_leaf, carol_leaf) = (leaf_of(&alice), leaf_of(&carol));

    for (target, what) in [(alice_leaf, "Bob removes the admin"), (carol_leaf, "Bob removes Carol")] {
        let output =
            bob.group.as_mut().unwrap().remove_members(&bob.provider, &bob.identity, &[target]).unwrap();
        let commit =
            Commit { commit: output.commit, welcome: None, welcome_recipients: vec![], group_info: None };
        let reply = bob.request(&commit).await;
        bob.settle_commit(&reply);
        assert_refused(&reply, ErrorCode::Forbidden, what);
    }
    still_working(&mut alice, &mut dan).await;

    // Bob may always leave: his own Remove proposal, which Alice commits.
    let left = bob.group.as_mut().unwrap().leave(&bob.provider, &bob.identity).unwrap();
    decode_ok::<Ack>(&bob.request(&Proposal { proposal: left.proposal.clone() }).await);
    alice.group.as_mut().unwrap().process_handshake(&alice.provider, &left.proposal).unwrap();
    let output =
        alice.group.as_mut().unwrap().commit_pending_proposals(&alice.provider, &alice.identity).unwrap();
    let commit = Commit {
        commit: output.commit,
        welcome: None,
        welcome_recipients: vec![],
        group_info: Some(output.group_info),
    };
    let reply = alice.request(&commit).await;
    alice.settle_commit(&reply);
    assert_eq!(decode_ok::<Ack>(&reply).epoch, 2);
    // And the admin removes whom she likes.
    let output = alice
        .group
        .as_mut()
        .unwrap()
        .remove_members(&alice.provider, &alice.identity, &[carol_leaf])
        .unwrap();
    let commit = Commit {
        commit: output.commit,
        welcome: None,
        welcome_recipients: vec![],
        group_info: Some(output.group_info),
    };
    let reply = alice.request(&commit).await;
    alice.settle_commit(&reply);
    assert_eq!(decode_ok::<Ack>(&reply).epoch, 3);
    assert_eq!(alice.group.as_ref().unwrap().members().len(), 1);
    still_working(&mut alice, &mut dan).await;
    server.stop().await;
}

/// F4: `welcome_recipients` used to be taken as given (a store amplifier,
/// and a way to flood another user's Welcome queue).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn welcome_recipients_must_be_exactly_the_members_the_commit_adds() {
    let server = TestServer::start(default_limits()).await;
    let mut dan = neighbour(&server).await;
    let mut bob = client_with_key_packages(&server, "bob", 2).await;
    let carol = TestClient::connect(&server, "carol", 3).await;
    let mut alice = TestClient::connect(&server, "alice", 1).await;
    assert_eq!(alice.create_room(ROOM).await.log_index, 0);
    let key_packages = alice.claim(&[bob.sender()]).await;
    let output = alice
        .group
        .as_mut()
        .unwrap()
        .add_members(&alice.provider, &alice.identity, &[&key_packages[0]])
        .unwrap();
    let with = |recipients: Vec<u64>| Commit {
        commit: output.commit.clone(),
        welcome: output.welcome.clone(),
        welcome_recipients: recipients,
        group_info: Some(output.group_info.clone()),
    };
    let (bob_id, carol_id) = (bob.sender().0, carol.sender().0);
    for (recipients, what) in [
        (vec![bob_id, 12_345], "a recipient the commit does not add"),
        (vec![bob_id, bob_id], "a recipient named twice"),
        (vec![carol_id], "someone else instead"),
        ((1..=200).collect(), "200 made-up ids"),
    ] {
        assert_refused(&alice.request(&with(recipients)).await, ErrorCode::InvalidCommit, what);
    }
    still_working(&mut alice, &mut dan).await;
    let ack: Ack = decode_ok(&alice.request(&with(vec![bob_id])).await);
    alice.group.as_mut().unwrap().confirm_pending_commit(&alice.provider).unwrap();
    assert_eq!(bob.join_from_welcome(ROOM).await, ack.log_index);
    still_working(&mut bob, &mut dan).await;
    server.stop().await;
}

/// F3: a commit's GroupInfo used to be stored and served unchecked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commits_group_info_must_be_the_new_epochs_signed_by_the_committer() {
    let server = TestServer::start(default_limits()).await;
    let mut dan = neighbour(&server).await;
    let mut bob = client_with_key_packages(&server, "bob", 2).await;
    let mut alice = room_with(&server, &mut [&mut bob]).await;
    let stale = alice.group.as_ref().unwrap().group_info(&alice.provider, &alice.identity).unwrap();
    let output = alice.group.as_mut().unwrap().self_update(&alice.provider, &alice.identity).unwrap();
    let with = |group_info: Vec<u8>| Commit {
        commit: output.commit.clone(),
        welcome: None,
        welcome_recipients: vec![],
        group_info: Some(group_info),
    };
    for (group_info, what) in [(b"garbage".to_vec(), "garbage"), (stale, "the previous epoch's")] {
        assert_refused(&alice.request(&with(group_info)).await, ErrorCode::InvalidGroupInfo, what);
    }
    still_working(&mut alice, &mut dan).await;
    let ack: Ack = decode_ok(&alice.request(&with(output.group_info.clone())).await);
    alice.group.as_mut().unwrap().confirm_pending_commit(&alice.provider).unwrap();
    let info: GroupInfo = decode_ok(&bob.request(&GroupInfoRequest {}).await);
    assert_eq!((info.epoch, info.group_info), (ack.epoch, output.group_info));
    server.stop().await;
}

/// F2: in an invite-only room (the default) a stranger gets neither the
/// GroupInfo nor in by external commit, even with a GroupInfo a member leaked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_neither_read_nor_join_an_invite_only_room() {
    let server = TestServer::start(default_limits()).await;
    let mut dan = neighbour(&server).await;
    let mut bob = client_with_key_packages(&server, "bob", 2).await;
    let mut alice = room_with(&server, &mut [&mut bob]).await;
    let mut erin = TestClient::connect(&server, "erin", 5).await;
    erin.room = ROOM;
    assert_refused(
        &erin.request(&GroupInfoRequest {}).await,
        ErrorCode::Forbidden,
        "stranger reads GroupInfo",
    );

    let leaked: GroupInfo = decode_ok(&bob.request(&GroupInfoRequest {}).await);
    let (group, output) = client_core::mls::RoomGroup::join_by_external_commit(
        &erin.provider,
        &erin.identity,
        &leaked.group_info,
        Some(&leaked.ratchet_tree),
    )
    .unwrap();
    erin.group = Some(group);
    let mut frame = erin.frame(&ExternalJoin { commit: output.commit, group_info: Some(output.group_info) });
    frame.header_mut().set_epoch(leaked.epoch);
    frame.sign(&erin.key);
    assert_refused(&erin.send_and_wait(&frame).await, ErrorCode::Forbidden, "stranger joins");
    assert_refused(&erin.send_text("let me in").await, ErrorCode::NotMember, "stranger posts");
    still_working(&mut alice, &mut dan).await;
    server.stop().await;
}

/// F6: a room without the server's key as its only external sender could
/// never be moderated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_must_list_exactly_the_server_key_as_its_external_sender() {
    let server = TestServer::start(default_limits()).await;
    let mut dan = neighbour(&server).await;
    let mut alice = TestClient::connect(&server, "alice", 1).await;
    alice.room = ROOM;
    let not_the_server = [7u8; 32];
    let (group, created) = client_core::mls::RoomGroup::create(
        &alice.provider,
        &alice.identity,
        ROOM.0,
        &ed25519_dalek::SigningKey::from_bytes(&not_the_server).verifying_key().to_bytes(),
        now_ms() / 1000,
    )
    .unwrap();
    let create = CreateRoom {
        group_info: created.group_info,
        ratchet_tree: created.ratchet_tree,
        join_rule: Some(JoinRule::Open),
    };
    assert_refused(&alice.request(&create).await, ErrorCode::InvalidGroupInfo, "foreign external sender");
    group.delete(&alice.provider).unwrap();
    assert_eq!(alice.create_room(ROOM).await.log_index, 0, "the id is still free");
    still_working(&mut alice, &mut dan).await;
    server.stop().await;
}

/// A self-update commit whose GroupInfo carries an unknown extension of
/// `padding_bytes`: (commit, GroupInfo, ratchet tree of the new epoch).
fn padded_group_info_commit(
    client: &TestClient,
    padding_bytes: usize,
) -> (MlsGroup, Vec<u8>, Vec<u8>, usize) {
    let mut group = mls_group(client);
    let padding = Extension::Unknown(0xff00, UnknownExtension(vec![0x5a; padding_bytes]));
    let provider = &client.provider;
    let bundle = group
        .commit_builder()
        .force_self_update(true)
        .load_psks(provider.storage())
        .unwrap()
        .create_group_info_with_extensions([padding])
        .unwrap()
        .build(provider.rand(), provider.crypto(), client.identity.signer(), |_| true)
        .unwrap()
        .stage_commit(provider)
        .unwrap();
    let (commit, _, group_info) = bundle.into_messages();
    let staged = group.pending_commit().unwrap();
    let tree = staged.export_ratchet_tree(provider.crypto(), group.export_ratchet_tree()).unwrap().unwrap();
    let tree_bytes = tree.tls_serialize_detached().unwrap().len();
    (group, encode(&commit), encode(&group_info.unwrap()), tree_bytes)
}

/// A GroupInfo that fits the Commit frame but not, with the room's ratchet
/// tree, the GroupInfo reply used to be sequenced; every later GroupInfo
/// request then panicked the shard. Now the commit is refused before it
/// gets a log index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_info_that_could_not_be_served_with_the_tree_is_refused_before_sequencing() {
    let server = TestServer::start(default_limits()).await;
    let mut dan = neighbour(&server).await;
    let mut members = Vec::new();
    for (name, seed) in
        [("bob", 2), ("carol", 3), ("frank", 6), ("gina", 7), ("hal", 8), ("ian", 9), ("jo", 10)]
    {
        members.push(client_with_key_packages(&server, name, seed).await);
    }
    let mut refs: Vec<&mut TestClient> = members.iter_mut().collect();
    let mut alice = room_with(&server, &mut refs).await;
    let bob = &mut members[0];

    // Fill the Commit frame exactly: the commit and its GroupInfo fit it.
    let payload = |commit: Vec<u8>, group_info: Vec<u8>| Commit {
        commit,
        welcome: None,
        welcome_recipients: vec![],
        group_info: Some(group_info),
    };
    let mut padding = 1024;
    let (group, oversize, group_info, tree_bytes) = loop {
        let (mut group, commit, group_info, tree_bytes) = padded_group_info_commit(&alice, padding);
        let commit = payload(commit, group_info.clone());
        let len = commit.encode().len();
        if len == PAYLOAD_BYTES_MAX as usize {
            break (group, commit, group_info, tree_bytes);
        }
        group.clear_pending_commit(alice.provider.storage()).unwrap();
        // Length fields grow with the padding: converge in a few rounds.
        padding = (padding + PAYLOAD_BYTES_MAX as usize).checked_sub(len).unwrap();
    };
    let reply_bytes = GroupInfo::encoded_len(2, group_info.len(), tree_bytes);
    assert!(reply_bytes > Opcode::GroupInfo.payload_bytes_max() as usize, "but the reply would not fit");

    let reply = alice.request(&oversize).await;
    assert_refused(&reply, ErrorCode::InvalidGroupInfo, "a GroupInfo the server could not serve");
    forget_crafted_commit(&mut alice, group);
    // The room still serves its GroupInfo, and it and its shard keep working.
    let info: GroupInfo = decode_ok(&bob.request(&GroupInfoRequest {}).await);
    assert_eq!(info.epoch, 1);
    still_working(&mut alice, &mut dan).await;
    let ack: Ack = decode_ok(&alice.self_update().await);
    assert_eq!(ack.epoch, 2);
    let info: GroupInfo = decode_ok(&bob.request(&GroupInfoRequest {}).await);
    assert_eq!(info.epoch, 2);
    still_working(&mut alice, &mut dan).await;
    server.stop().await;
}

/// A member's sender id derives from its signature key: an Update proposal
/// or a commit's update path that installed another key in its leaf used
/// to be accepted, and the server's member index never learned of the new
/// identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_that_change_a_members_identity_are_refused() {
    let server = TestServer::start(default_limits()).await;
    let mut dan = neighbour(&server).await;
    let mut bob = client_with_key_packages(&server, "bob", 2).await;
    let mut alice = room_with(&server, &mut [&mut bob]).await;
    let other = client_core::mls::Identity::generate(&bob.provider).unwrap();
    let new_signer =
        || NewSignerBundle { signer: other.signer(), credential_with_key: other.credential_with_key() };

    let mut group = mls_group(&bob);
    let (proposal, _) = group
        .propose_self_update_with_new_signer(
            &bob.provider,
            bob.identity.signer(),
            new_signer(),
            LeafNodeParameters::default(),
        )
        .unwrap();
    let reply = bob.request(&Proposal { proposal: encode(&proposal) }).await;
    assert_refused(&reply, ErrorCode::Forbidden, "an Update proposal with another key");
    group.clear_pending_proposals(bob.provider.storage()).unwrap();

    let (commit, _, group_info) = group
        .self_update_with_new_signer(
            &bob.provider,
            bob.identity.signer(),
            new_signer(),
            LeafNodeParameters::default(),
        )
        .unwrap()
        .into_messages();
    let commit = Commit {
        commit: encode(&commit),
        welcome: None,
        welcome_recipients: vec![],
        group_info: group_info.as_ref().map(encode),
    };
    assert_refused(&bob.request(&commit).await, ErrorCode::Forbidden, "an update path with another key");
    forget_crafted_commit(&mut bob, group);
    still_working(&mut alice, &mut dan).await;

    // Bob's own updates still go through, under his identity.
    assert_eq!(decode_ok::<Ack>(&bob.self_update().await).epoch, 2);
    still_working(&mut bob, &mut dan).await;
    server.stop().await;
}

/// A commit's Welcome used to be stored once per recipient (a 1 MiB
/// Welcome to 50 members cost 50 MiB); now once, with a row per
/// recipient, and the bytes go when the last recipient has used it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commits_welcome_is_stored_once_for_all_its_recipients() {
    let server = TestServer::start(default_limits()).await;
    let mut dan = neighbour(&server).await;
    let mut members = Vec::new();
    for (name, seed) in [("bob", 2), ("carol", 3), ("frank", 6)] {
        members.push(client_with_key_packages(&server, name, seed).await);
    }
    let mut alice = TestClient::connect(&server, "alice", 1).await;
    assert_eq!(alice.create_room(ROOM).await.log_index, 0);
    let ids: Vec<_> = members.iter().map(TestClient::sender).collect();
    let ack: Ack = decode_ok(&alice.add(&ids).await);
    let counts = server.store.welcome_counts().unwrap();
    assert_eq!((counts.welcomes, counts.pending), (1, 3), "one copy, three recipients");
    for (done, member) in members.iter_mut().enumerate() {
        assert_eq!(member.join_from_welcome(ROOM).await, ack.log_index);
        // Reading the room shows the Welcome was used.
        member.subscribe(ack.log_index + 1).await;
        member.next_of(Opcode::SyncDone).await;
        let left = 3 - done as u64 - 1;
        for _ in 0..200 {
            if server.store.welcome_counts().unwrap().pending == left {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let counts = server.store.welcome_counts().unwrap();
        assert_eq!((counts.welcomes, counts.pending), (u64::from(left > 0), left));
    }
    still_working(&mut members[0], &mut dan).await;
    server.stop().await;
}

/// Each one-shot Sync used to start a history reader with no bound per
/// connection: a member could hold the server to any number of them. Now a
/// connection runs at most `SYNC_READERS_PER_CONNECTION_MAX`; another Sync
/// is refused with `RateLimited` and a retry delay, and works once a reader
/// is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_readers_per_connection_are_bounded() {
    use kalandra_proto::payload::{Sync, SyncDone};
    use kalandra_server::sim::SYNC_READERS_PER_CONNECTION_MAX;
    let limits = kalandra_server::ConnectionLimits { send_queue_frames_max: 4, ..default_limits() };
    let server = TestServer::start(limits).await;
    let mut dan = neighbour(&server).await;
    let mut bob = client_with_key_packages(&server, "bob", 2).await;
    let mut alice = room_with(&server, &mut [&mut bob]).await;
    // More history than the outbox and the QUIC stream window hold: a
    // reader waits for Bob to read.
    let big = "x".repeat(100 * 1024);
    for _ in 0..40 {
        decode_ok::<Ack>(&alice.send_text(&big).await);
    }
    let mut request_ids = Vec::new();
    for _ in 0..=SYNC_READERS_PER_CONNECTION_MAX {
        let frame = bob.frame(&Sync { from_log_index: 0, count_max: 100 });
        request_ids.push(frame.header().request_id());
        bob.conn().send(&frame).await.unwrap();
    }
    let refused = *request_ids.last().unwrap();
    let (mut done, mut refusals) = (Vec::new(), Vec::new());
    while done.len() < SYNC_READERS_PER_CONNECTION_MAX || refusals.is_empty() {
        let frame = tokio::time::timeout(TIMEOUT, bob.conn().recv())
            .await
            .unwrap_or_else(|_| panic!("no refusal; {} syncs done", done.len()))
            .unwrap();
        match frame.opcode() {
            Opcode::SyncDone => done.push(frame.header().request_id()),
            Opcode::Error => {
                let error: ErrorPayload = frame.decode_payload().unwrap();
                assert_eq!(error.code, ErrorCode::RateLimited as u16, "{}", error.message);
                assert!(error.retry_after_ms.is_some());
                refusals.push(frame.header().request_id());
            }
            _ => {}
        }
    }
    assert_eq!(refusals, vec![refused], "the reader beyond the bound is refused");
    done.sort_unstable();
    assert_eq!(done, request_ids[..SYNC_READERS_PER_CONNECTION_MAX].to_vec());
    // Readers done, a Sync works again; the room and its shard work on.
    let reply = bob.request(&Sync { from_log_index: 0, count_max: 1 }).await;
    assert_eq!(decode_ok::<SyncDone>(&reply).next_log_index, 1);
    still_working(&mut alice, &mut dan).await;
    server.stop().await;
}

/// A kicked member (its removal pending, not yet committed) or a banned one
/// could still subscribe, sync, read the GroupInfo, send and receive
/// ephemeral frames, and redact; now it reads its own removal (a one-shot
/// Sync stops there) and gets nothing else of the room. A live
/// subscription it already had carries the handshakes up to the commit that
/// removes it (so its device learns it is out), no ephemeral frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_being_removed_or_banned_gets_nothing_of_the_room() {
    use kalandra_proto::payload::{Ban, Kick, Redact, Subscribe, Sync, SyncDone, Typing};
    let server = TestServer::start(default_limits()).await;
    let mut dan = neighbour(&server).await;
    let mut bob = client_with_key_packages(&server, "bob", 2).await;
    let mut carol = client_with_key_packages(&server, "carol", 3).await;
    let mut alice = room_with(&server, &mut [&mut bob, &mut carol]).await;
    for member in [&mut alice, &mut bob, &mut carol] {
        member.subscribe(2).await;
        member.next_of(Opcode::SyncDone).await;
    }
    let bobs = decode_ok::<Ack>(&bob.send_text("bob's").await).log_index;
    let carols = decode_ok::<Ack>(&carol.send_text("carol's").await).log_index;

    let kick =
        decode_ok::<Ack>(&alice.request(&Kick { target: bob.sender().0, reason: "spam".into() }).await);
    let redact = |log_index| Redact { log_index, reason: "mine".into() };
    // A one-shot Sync reads up to his removal proposal, so that his device
    // learns it; nothing sequenced after it.
    let reply = bob.request(&Sync { from_log_index: kick.log_index, count_max: 10 }).await;
    assert_eq!(decode_ok::<SyncDone>(&reply).next_log_index, kick.log_index + 1, "sync stops at the kick");
    let reply = bob.request(&Sync { from_log_index: kick.log_index + 1, count_max: 10 }).await;
    assert_eq!(decode_ok::<SyncDone>(&reply).next_log_index, kick.log_index + 1, "nothing further");
    assert_refused(&bob.request(&Subscribe { from_log_index: 0 }).await, ErrorCode::NotMember, "subscribe");
    assert_refused(&bob.request(&GroupInfoRequest {}).await, ErrorCode::NotMember, "GroupInfo");
    assert_refused(&bob.request(&Typing { active: true }).await, ErrorCode::NotMember, "typing");
    assert_refused(&bob.request(&redact(bobs)).await, ErrorCode::NotMember, "redacting his own");
    // Carol types: Alice sees it, Bob (still subscribed) does not.
    let typing = carol.frame(&Typing { active: true });
    carol.conn().send(&typing).await.unwrap();
    let mut proposals = Vec::new();
    loop {
        let frame = alice.conn().recv().await.unwrap();
        match frame.opcode() {
            Opcode::Proposal => proposals.push(frame),
            Opcode::Typing => break assert_eq!(frame.header().sender_id(), carol.sender()),
            _ => {}
        }
    }

    // Banned, Carol may not read nor redact her own messages either.
    let ban = decode_ok::<Ack>(
        &alice.request(&Ban { target: carol.sender().0, reason: "spam".into(), duration_ms: None }).await,
    );
    let reply = carol.request(&Sync { from_log_index: ban.log_index, count_max: 10 }).await;
    assert_eq!(decode_ok::<SyncDone>(&reply).next_log_index, ban.log_index + 1, "she reads her ban");
    assert_refused(
        &carol.request(&Sync { from_log_index: ban.log_index + 1, count_max: 10 }).await,
        ErrorCode::Banned,
        "sync",
    );
    assert_refused(&carol.request(&GroupInfoRequest {}).await, ErrorCode::Banned, "GroupInfo");
    assert_refused(&carol.request(&redact(carols)).await, ErrorCode::Banned, "redacting her own");
    assert!(server.store.data_key(ROOM, carols).unwrap().is_some(), "nothing erased");

    // Alice commits both removals.
    while proposals.len() < 2 {
        proposals.push(alice.next_of(Opcode::Proposal).await);
    }
    for frame in proposals {
        let proposal: Proposal = frame.decode_payload().unwrap();
        alice.group.as_mut().unwrap().process_handshake(&alice.provider, &proposal.proposal).unwrap();
    }
    let output =
        alice.group.as_mut().unwrap().commit_pending_proposals(&alice.provider, &alice.identity).unwrap();
    let commit = Commit {
        commit: output.commit,
        welcome: None,
        welcome_recipients: vec![],
        group_info: Some(output.group_info),
    };
    let reply = alice.request(&commit).await;
    alice.settle_commit(&reply);
    let removed_at = decode_ok::<Ack>(&reply).log_index;
    // Bob's subscription carried the handshakes up to his removal, no typing.
    loop {
        let frame = bob.conn().recv().await.unwrap();
        assert_ne!(frame.opcode(), Opcode::Typing, "an ephemeral frame reached a member being removed");
        if frame.opcode() == Opcode::Commit {
            assert_eq!(frame.header().log_index(), removed_at);
            break;
        }
    }
    assert_refused(&bob.request(&redact(bobs)).await, ErrorCode::NotMember, "redacting after removal");
    // Removed, he may read through the commit that removed him, no further.
    let reply = bob.request(&Sync { from_log_index: removed_at, count_max: 10 }).await;
    assert_eq!(decode_ok::<SyncDone>(&reply).next_log_index, removed_at + 1);
    assert_refused(
        &bob.request(&Sync { from_log_index: removed_at + 1, count_max: 10 }).await,
        ErrorCode::NotMember,
        "sync after the removal was read",
    );
    still_working(&mut alice, &mut dan).await;
    server.stop().await;
}

/// The leaf capabilities client-core's members advertise.
fn leaf_capabilities() -> Capabilities {
    Capabilities::new(
        Some(&[ProtocolVersion::Mls10]),
        Some(&[client_core::mls::CIPHERSUITE]),
        Some(&[ExtensionType::LastResort]),
        None,
        Some(&[CredentialType::Basic]),
    )
}

/// A member may propose only its own removal: a Remove proposal of the
/// admin's leaf or another member's, sent as a Proposal frame, is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proposal_to_remove_the_admin_or_another_member_is_refused() {
    let server = TestServer::start(default_limits()).await;
    let mut dan = neighbour(&server).await;
    let mut bob = client_with_key_packages(&server, "bob", 2).await;
    let mut carol = client_with_key_packages(&server, "carol", 3).await;
    let mut alice = room_with(&server, &mut [&mut bob, &mut carol]).await;
    let leaf_of = |client: &TestClient| client.group.as_ref().unwrap().own_leaf_index();
    for (target, what) in [(leaf_of(&alice), "the admin"), (leaf_of(&carol), "another member")] {
        let mut group = mls_group(&bob);
        let (proposal, _) = group
            .propose_remove_member(&bob.provider, bob.identity.signer(), LeafNodeIndex::new(target))
            .unwrap();
        let reply = bob.request(&Proposal { proposal: encode(&proposal) }).await;
        assert_refused(&reply, ErrorCode::Forbidden, what);
        group.clear_pending_proposals(bob.provider.storage()).unwrap();
    }
    still_working(&mut alice, &mut dan).await;
    // Nothing is pending: Alice's next commit covers nothing of Bob's.
    assert_eq!(decode_ok::<Ack>(&alice.self_update().await).epoch, 2);
    assert_eq!(alice.group.as_ref().unwrap().members().len(), 3);
    server.stop().await;
}

/// `CreateRoom` must list exactly the server's key as external sender: the
/// server's key plus another one would let that other key propose too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_listing_another_external_sender_besides_the_server_is_refused() {
    let server = TestServer::start(default_limits()).await;
    let mut dan = neighbour(&server).await;
    let mut alice = TestClient::connect(&server, "alice", 1).await;
    alice.room = ROOM;
    let server_key = alice.conn().server_key();
    let other = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]).verifying_key().to_bytes();
    let sender = |key: &[u8]| {
        ExternalSender::new(SignaturePublicKey::from(key.to_vec()), BasicCredential::new(key.to_vec()).into())
    };
    let extensions =
        Extensions::single(Extension::ExternalSenders(vec![sender(&server_key), sender(&other)])).unwrap();
    let provider = &alice.provider;
    let mut group = MlsGroup::builder()
        .with_group_id(GroupId::from_slice(&ROOM.0))
        .ciphersuite(client_core::mls::CIPHERSUITE)
        .with_wire_format_policy(PURE_PLAINTEXT_WIRE_FORMAT_POLICY)
        .use_ratchet_tree_extension(false)
        .with_capabilities(leaf_capabilities())
        .with_group_context_extensions(extensions)
        .build(provider, alice.identity.signer(), alice.identity.credential_with_key())
        .unwrap();
    let group_info = group.export_group_info(provider.crypto(), alice.identity.signer(), false).unwrap();
    let create = CreateRoom {
        group_info: encode(&group_info),
        ratchet_tree: group.export_ratchet_tree().tls_serialize_detached().unwrap(),
        join_rule: None,
    };
    assert_refused(&alice.request(&create).await, ErrorCode::InvalidGroupInfo, "a second external sender");
    group.delete(alice.provider.storage()).unwrap();
    assert_eq!(alice.create_room(ROOM).await.log_index, 0, "the id is still free");
    still_working(&mut alice, &mut dan).await;
    server.stop().await;
}

/// Appends to the stored log, while the server is down, a self-update
/// commit of `client`'s (valid MLS) publishing `group_info` (its own when
/// `None`); returns the GroupInfo of the new epoch. Every other member
/// applies the commit.
fn append_commit(
    dir: &std::path::Path,
    client: &mut TestClient,
    others: &mut [&mut TestClient],
    group_info: Option<Vec<u8>>,
) -> Vec<u8> {
    use kalandra_server::store::{LogEntry, RedbStore, Store as _};
    let store = RedbStore::open(dir.join("kalandra.redb")).unwrap();
    let output = client.group.as_mut().unwrap().self_update(&client.provider, &client.identity).unwrap();
    client.group.as_mut().unwrap().confirm_pending_commit(&client.provider).unwrap();
    for other in others.iter_mut() {
        other.group.as_mut().unwrap().process_handshake(&other.provider, &output.commit).unwrap();
    }
    let log_index = store.next_log_index(ROOM).unwrap();
    let commit = Commit {
        commit: output.commit,
        welcome: None,
        welcome_recipients: vec![],
        group_info: Some(group_info.unwrap_or(output.group_info.clone())),
    };
    let mut header = header(Opcode::Commit, ROOM, client.sender(), client.epoch() - 1, 0);
    header.set_log_index(log_index).set_server_timestamp_ms(now_ms());
    let mut frame = Frame::with_payload(header, &commit).unwrap();
    frame.sign(&client.key);
    store.append_batch(&[LogEntry { room_id: ROOM, log_index, frame: frame.to_bytes() }]).unwrap();
    output.group_info
}

/// After a restart the server rebuilds the room from its log, and serves
/// only a replayed GroupInfo that is the epoch's, signed by the committer:
/// one stored unchecked (a log written before the check; here put in the
/// store directly) is not served, a valid one is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_group_info_is_validated_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_in(dir.path(), default_limits()).await;
    let mut bob = client_with_key_packages(&server, "bob", 2).await;
    let mut alice = room_with(&server, &mut [&mut bob]).await;
    let stale = alice.group.as_ref().unwrap().group_info(&alice.provider, &alice.identity).unwrap();
    server.stop().await;

    // A commit whose GroupInfo is the previous epoch's.
    append_commit(dir.path(), &mut alice, &mut [&mut bob], Some(stale));
    let server = TestServer::start_in(dir.path(), default_limits()).await;
    bob.reconnect(&server).await;
    let reply = bob.request(&GroupInfoRequest {}).await;
    assert_refused(&reply, ErrorCode::InvalidGroupInfo, "a replayed GroupInfo of another epoch");
    server.stop().await;

    // A commit with its own GroupInfo: replayed and served.
    let valid = append_commit(dir.path(), &mut bob, &mut [&mut alice], None);
    let server = TestServer::start_in(dir.path(), default_limits()).await;
    for client in [&mut alice, &mut bob] {
        client.reconnect(&server).await;
    }
    let info: GroupInfo = decode_ok(&alice.request(&GroupInfoRequest {}).await);
    assert_eq!((info.epoch, info.group_info), (3, valid));
    let mut dan = neighbour(&server).await;
    still_working(&mut alice, &mut dan).await;
    assert_eq!(decode_ok::<Ack>(&alice.self_update().await).epoch, 4);
    server.stop().await;
}
