//! A sequenced commit members cannot process, over real QUIC and the real
//! server (`docs/RECOVERY.md`): members on client-core's `RoomLog` report
//! it, the server voids it, everyone (its committer too) goes back to the
//! epoch and carries on; a false report voids nothing; a member stuck past
//! the window rejoins; the room next door on the same shard never notices.

mod common;

use client_core::mls::RoomGroup;
use client_core::room_log::{test_support, EntryBody, Intent, RoomLog};
use client_core::state::ClientState;
use common::*;
use kalandra_proto::limits::COMMIT_VOID_WINDOW_MS;
use kalandra_proto::payload::{
    Ack, Commit, CommitReport, CreateRoom, Error as ErrorPayload, ExternalJoin, GroupInfo, GroupInfoRequest,
    Subscribe, Welcome,
};
use kalandra_proto::{ErrorCode, Frame, Opcode, Payload, RoomId};

const ROOM: RoomId = RoomId(*b"room-for-voiding");
/// Shares the first eight bytes (which choose the shard) with [`ROOM`].
const NEIGHBOUR: RoomId = RoomId(*b"room-for-neighbr");

/// A device applying the room's log with client-core's `RoomLog`.
struct Member {
    client: TestClient,
    log: Option<RoomLog>,
}

impl Member {
    async fn connect(server: &TestServer, name: &'static str, seed: u8) -> Member {
        let mut client = TestClient::connect(server, name, seed).await;
        client.room = ROOM;
        client.upload_key_packages(2).await;
        Member { client, log: None }
    }

    fn log(&mut self) -> &mut RoomLog {
        self.log.as_mut().expect("a member")
    }

    fn epoch(&self) -> u64 {
        self.log.as_ref().map_or(0, RoomLog::epoch)
    }

    fn tree_hash(&self) -> Vec<u8> {
        self.log.as_ref().and_then(RoomLog::group).expect("a group").tree_hash()
    }

    /// A signed frame of ours for the room, in `epoch`.
    fn frame<P: Payload>(&mut self, payload: &P, epoch: u64) -> Frame {
        let request_id = self.client.conn().next_request_id();
        let sender = self.client.sender();
        let mut frame =
            Frame::with_payload(header(P::OPCODE, ROOM, sender, epoch, request_id), payload).unwrap();
        frame.sign(&self.client.key);
        frame
    }

    async fn request<P: Payload>(&mut self, payload: &P, epoch: u64) -> Frame {
        let frame = self.frame(payload, epoch);
        self.client.send_and_wait(&frame).await
    }

    /// Applies `frame` (sequenced) to our log.
    fn apply(&mut self, frame: &Frame) -> Option<EntryBody> {
        let own = self.client.sender();
        let provider = &self.client.provider;
        let log = self.log.as_mut().expect("a member");
        log.apply(provider, own, frame, [])
            .unwrap_or_else(|e| panic!("{}: {e}", self.client.name))
            .map(|e| e.body)
    }

    /// Our frame as the server sequenced it (its acknowledgement stands for the echo).
    fn apply_own(&mut self, frame: &Frame, ack: &Ack) -> Option<EntryBody> {
        let mut sequenced = frame.clone();
        sequenced.header_mut().set_log_index(ack.log_index).set_server_timestamp_ms(ack.server_time_ms);
        self.apply(&sequenced)
    }

    async fn subscribe(&mut self) {
        let from = self.log().next_log_index();
        let epoch = self.epoch();
        let frame = self.frame(&Subscribe { from_log_index: from }, epoch);
        self.client.conn().send(&frame).await.unwrap();
    }

    /// Reads and applies log frames until the cursor passes `log_index`;
    /// returns the entries made.
    async fn read_through(&mut self, log_index: u64) -> Vec<EntryBody> {
        let mut entries = Vec::new();
        while self.log().next_log_index() <= log_index {
            let name = self.client.name;
            let frame = self.client.conn().recv().await.unwrap_or_else(|e| panic!("{name}: {e}"));
            if client_core::room_log::is_log_frame(&frame) {
                entries.extend(self.apply(&frame));
            }
        }
        entries
    }

    /// Makes, sends and settles a self-update; returns its acknowledgement.
    async fn self_update(&mut self) -> Ack {
        let epoch = self.epoch();
        let output = {
            let (provider, identity) = (&self.client.provider, &self.client.identity);
            self.log.as_mut().unwrap().group_mut().unwrap().self_update(provider, identity).unwrap()
        };
        let commit = Commit {
            commit: output.commit,
            welcome: None,
            welcome_recipients: vec![],
            group_info: Some(output.group_info),
        };
        let frame = self.frame(&commit, epoch);
        self.log().commit_sent(frame.to_bytes().to_vec(), epoch, Intent::Update).unwrap();
        let ack: Ack = decode_ok(&self.client.send_and_wait(&frame).await);
        self.apply_own(&frame, &ack);
        ack
    }

    /// Seals and sends `text`; returns its acknowledgement.
    async fn say(&mut self, text: &str) -> Ack {
        let key = self.client.key.clone();
        let sealed = self.log().seal(text.as_bytes(), &key).unwrap();
        let mut frame = sealed.frame;
        frame.header_mut().set_request_id(self.client.conn().next_request_id());
        frame.sign(&self.client.key);
        let ack: Ack = decode_ok(&self.client.send_and_wait(&frame).await);
        self.apply_own(&frame, &ack);
        ack
    }

    /// Sends the report our log says is due; returns the server's answer.
    async fn report(&mut self) -> Frame {
        let report: CommitReport = self.log().take_report().expect("a report is due");
        let reply = self.request(&report, report.epoch).await;
        if reply.opcode() == Opcode::Error {
            let error: ErrorPayload = reply.decode_payload().unwrap();
            let provider = &self.client.provider;
            self.log.as_mut().unwrap().report_refused(provider, &error).unwrap();
        }
        reply
    }
}

/// Alice creates the room and adds Bob and Carol; all three subscribe.
async fn room_of_three(server: &TestServer) -> (Member, Member, Member) {
    let mut alice = Member::connect(server, "alice", 1).await;
    let mut bob = Member::connect(server, "bob", 2).await;
    let mut carol = Member::connect(server, "carol", 3).await;
    let server_key = alice.client.conn().server_key();
    let (group, created) = RoomGroup::create(
        &alice.client.provider,
        &alice.client.identity,
        ROOM.0,
        &server_key,
        now_ms() / 1000,
    )
    .unwrap();
    let create =
        CreateRoom { group_info: created.group_info, ratchet_tree: created.ratchet_tree, join_rule: None };
    let create = alice.frame(&create, 0);
    decode_ok::<Ack>(&alice.client.send_and_wait(&create).await);
    let mut log = RoomLog::created(&alice.client.provider, group, create.to_bytes().to_vec()).unwrap();
    log.creation_confirmed();
    alice.log = Some(log);

    let members = [bob.client.sender(), carol.client.sender()];
    let packages = alice.client.claim(&members).await;
    let refs: Vec<&[u8]> = packages.iter().map(Vec::as_slice).collect();
    let output = {
        let (provider, identity) = (&alice.client.provider, &alice.client.identity);
        alice.log.as_mut().unwrap().group_mut().unwrap().add_members(provider, identity, &refs).unwrap()
    };
    let ids: Vec<u64> = members.iter().map(|s| s.0).collect();
    let commit = Commit {
        commit: output.commit,
        welcome: output.welcome,
        welcome_recipients: ids.clone(),
        group_info: Some(output.group_info),
    };
    let frame = alice.frame(&commit, 0);
    alice.log().commit_sent(frame.to_bytes().to_vec(), 0, Intent::Invite(ids)).unwrap();
    let ack: Ack = decode_ok(&alice.client.send_and_wait(&frame).await);
    alice.apply_own(&frame, &ack);
    for member in [&mut bob, &mut carol] {
        let welcome = member.client.next_of(Opcode::Welcome).await;
        let _: Welcome = welcome.decode_payload().unwrap();
        member.log = Some(RoomLog::join_from_welcome(&member.client.provider, ROOM, &welcome).unwrap());
    }
    for member in [&mut alice, &mut bob, &mut carol] {
        member.subscribe().await;
        member.client.next_of(Opcode::SyncDone).await;
    }
    (alice, bob, carol)
}

/// Carol's self-update with an altered confirmation tag, and the GroupInfo
/// to match (signed again): the server accepts both.
async fn bad_commit(carol: &mut Member) -> (Frame, Ack) {
    let epoch = carol.epoch();
    let output = {
        let (provider, identity) = (&carol.client.provider, &carol.client.identity);
        carol.log.as_mut().unwrap().group_mut().unwrap().self_update(provider, identity).unwrap()
    };
    let (commit, group_info) = test_support::corrupt_confirmation_tag_and_group_info(
        &output.commit,
        &output.group_info,
        &carol.client.key,
    )
    .unwrap();
    let payload = Commit { commit, welcome: None, welcome_recipients: vec![], group_info: Some(group_info) };
    let frame = carol.frame(&payload, epoch);
    carol.log().commit_sent(frame.to_bytes().to_vec(), epoch, Intent::Update).unwrap();
    let reply = carol.client.send_and_wait(&frame).await;
    let ack: Ack = decode_ok(&reply);
    assert_eq!(ack.epoch, epoch + 1, "the server cannot tell");
    carol.apply_own(&frame, &ack);
    (frame, ack)
}

fn assert_code(reply: &Frame, code: ErrorCode, what: &str) {
    assert_eq!(reply.opcode(), Opcode::Error, "{what}: expected a refusal, got {reply:?}");
    let error: ErrorPayload = reply.decode_payload().unwrap();
    assert_eq!(error.code, code.to_u16(), "{what}: {}", error.message);
}

/// Another room on the same shard, its creator connected.
async fn neighbour(server: &TestServer) -> TestClient {
    let mut dan = TestClient::connect(server, "dan", 40).await;
    assert_eq!(dan.create_room(NEIGHBOUR).await.log_index, 0);
    dan
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_members_cannot_process_is_voided_and_everyone_carries_on_in_its_epoch() {
    let server = TestServer::start(default_limits()).await;
    let mut dan = neighbour(&server).await;
    let (mut alice, mut bob, mut carol) = room_of_three(&server).await;
    let (_, bad) = bad_commit(&mut carol).await;
    assert_eq!(carol.log().unsettled_commit(), Some(bad.log_index));
    // Carol speaks in the epoch her commit made; that message dies with it.
    let dead = carol.say("in an epoch nobody else has").await;
    for member in [&mut alice, &mut bob] {
        let entries = member.read_through(dead.log_index).await;
        assert!(entries.iter().all(|e| matches!(e, EntryBody::Unreadable(_))), "{entries:?}");
        assert_eq!(member.log().stuck_on(), Some(bad.log_index));
    }
    decode_ok::<Ack>(&dan.send_text("next door, unaffected").await);

    // Bob's report counts; Alice's makes the quorum (and she is the admin).
    let counted: Ack = decode_ok(&bob.report().await);
    assert_eq!((counted.log_index, counted.epoch), (bad.log_index, bad.epoch));
    decode_ok::<Ack>(&alice.report().await);
    let void_index = dead.log_index + 1;
    for member in [&mut alice, &mut bob, &mut carol] {
        let entries = member.read_through(void_index).await;
        let voided = entries.last().expect("the void");
        assert!(
            matches!(voided, EntryBody::CommitVoided { voided_log_index, epoch: 1, .. } if *voided_log_index == bad.log_index),
            "{voided:?}"
        );
        assert_eq!(member.log().state(), ClientState::Synchronized { epoch: 1 });
    }
    assert_eq!(carol.log().take_redo(), Some(Intent::Update), "the committer redoes its intent");
    assert!(alice.tree_hash() == bob.tree_hash() && bob.tree_hash() == carol.tree_hash());
    // The server serves epoch 1's GroupInfo again and refuses epoch 2's frames.
    let info: GroupInfo = decode_ok(&alice.request(&GroupInfoRequest {}, 1).await);
    assert_eq!(info.epoch, 1);
    let stale = carol.request(&CommitReport { log_index: bad.log_index, epoch: 1, reason: 2 }, 1).await;
    decode_ok::<Ack>(&stale);

    // The next commit of epoch 1 wins; everyone applies it and talks.
    let update = carol.self_update().await;
    for member in [&mut alice, &mut bob] {
        member.read_through(update.log_index).await;
    }
    assert_eq!((alice.epoch(), bob.epoch(), carol.epoch()), (2, 2, 2));
    assert!(alice.tree_hash() == bob.tree_hash() && bob.tree_hash() == carol.tree_hash());
    let said = bob.say("all back").await;
    for member in [&mut alice, &mut carol] {
        let entries = member.read_through(said.log_index).await;
        assert_eq!(entries, vec![EntryBody::Text(b"all back".to_vec())]);
    }

    // A false report of a valid commit by one member voids nothing.
    let honest = alice.self_update().await;
    for member in [&mut bob, &mut carol] {
        member.read_through(honest.log_index).await;
    }
    let report = CommitReport { log_index: honest.log_index, epoch: honest.epoch - 1, reason: 2 };
    decode_ok::<Ack>(&carol.request(&report, honest.epoch - 1).await);
    decode_ok::<Ack>(&carol.request(&report, honest.epoch - 1).await);
    let forbidden = alice.request(&report, honest.epoch - 1).await;
    assert_code(&forbidden, ErrorCode::Forbidden, "the committer reports its own commit");
    let said = carol.say("still epoch 3").await;
    for member in [&mut alice, &mut bob] {
        let entries = member.read_through(said.log_index).await;
        assert_eq!(entries, vec![EntryBody::Text(b"still epoch 3".to_vec())], "no void came first");
        assert_eq!(member.epoch(), 3);
    }
    decode_ok::<Ack>(&dan.send_text("next door, still unaffected").await);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_stuck_past_the_window_rejoin_by_external_commit() {
    let server = TestServer::start(default_limits()).await;
    let mut dan = neighbour(&server).await;
    let (mut alice, mut bob, mut carol) = room_of_three(&server).await;
    let (_, bad) = bad_commit(&mut carol).await;
    bob.read_through(bad.log_index).await;
    alice.read_through(bad.log_index).await;
    // Bob alone is no majority (and Alice never reports): no void.
    decode_ok::<Ack>(&bob.report().await);
    server.advance_clock(COMMIT_VOID_WINDOW_MS);
    bob.log().connection_lost().unwrap();
    bob.log().connected().unwrap();
    assert_code(&bob.report().await, ErrorCode::CommitSettled, "a report after the window");
    assert!(bob.log().take_rejoin());
    assert!(bob.log().group().is_none(), "the unusable group is gone");

    // Bob joins again from the GroupInfo the server holds; his old leaf goes.
    let info: GroupInfo = decode_ok(&bob.request(&GroupInfoRequest {}, 0).await);
    assert_eq!(info.epoch, bad.epoch);
    let (group, output) = RoomGroup::join_by_external_commit(
        &bob.client.provider,
        &bob.client.identity,
        &info.group_info,
        Some(&info.ratchet_tree),
    )
    .unwrap();
    let join = ExternalJoin { commit: output.commit, group_info: Some(output.group_info) };
    let ack: Ack = decode_ok(&bob.request(&join, info.epoch).await);
    bob.log = Some(
        RoomLog::joined_by_external_commit(
            &bob.client.provider,
            ROOM,
            group,
            ack.log_index,
            ack.epoch,
            Some(ack.server_time_ms),
        )
        .unwrap(),
    );
    bob.subscribe().await;

    // Alice, still stuck, sees a later commit: the bad one settled; she rejoins too.
    alice.read_through(ack.log_index).await;
    assert!(alice.log().take_rejoin());
    let info: GroupInfo = decode_ok(&alice.request(&GroupInfoRequest {}, 0).await);
    let (group, output) = RoomGroup::join_by_external_commit(
        &alice.client.provider,
        &alice.client.identity,
        &info.group_info,
        Some(&info.ratchet_tree),
    )
    .unwrap();
    let join = ExternalJoin { commit: output.commit, group_info: Some(output.group_info) };
    let ack: Ack = decode_ok(&alice.request(&join, info.epoch).await);
    alice.log = Some(
        RoomLog::joined_by_external_commit(
            &alice.client.provider,
            ROOM,
            group,
            ack.log_index,
            ack.epoch,
            Some(ack.server_time_ms),
        )
        .unwrap(),
    );
    alice.subscribe().await;
    bob.read_through(ack.log_index).await;
    assert_eq!(alice.epoch(), bob.epoch());
    assert_eq!(alice.tree_hash(), bob.tree_hash());
    let said = alice.say("we are back").await;
    let entries = bob.read_through(said.log_index).await;
    assert_eq!(entries, vec![EntryBody::Text(b"we are back".to_vec())]);
    decode_ok::<Ack>(&dan.send_text("next door, unaffected").await);
    server.stop().await;
}

mod devices {
    //! The same, with `Client` devices driving reports, rollbacks and resends by themselves.

    use std::time::Duration;

    use client_core::client::{
        Client, ClientError, Message, MessageBody, ServerAddress, ServerTarget, ServerTrust,
    };
    use client_core::store::StoreKey;

    use super::*;

    async fn device(server: &TestServer, dir: &std::path::Path, byte: u8) -> Client {
        let mut client = Client::init(dir, &StoreKey::from_bytes([byte; 32])).unwrap();
        client
            .set_server(ServerTarget {
                address: ServerAddress::parse(&server.address.to_string()).unwrap(),
                server_name: "localhost".into(),
                trust: ServerTrust::Fingerprint(server.fingerprint),
            })
            .unwrap();
        client.connect().await.unwrap();
        client
    }

    /// The next history entry `client` reads that `keep` accepts (others skipped).
    async fn next_where(client: &mut Client, keep: impl Fn(&Message) -> bool) -> Message {
        for _ in 0..50 {
            if let Some(message) = client.next_message(Duration::from_secs(10)).await.unwrap() {
                if keep(&message) {
                    return message;
                }
            }
        }
        panic!("no such entry");
    }

    fn text(message: &Message) -> Option<&[u8]> {
        match &message.body {
            MessageBody::Text(text) => Some(text),
            _ => None,
        }
    }

    /// Alice and Bob on `Client` devices in `dirs`; Carol, on a bare
    /// `RoomLog`, creates the room (she is its admin) and invites them.
    async fn room_of_devices(
        server: &TestServer,
        dirs: (&std::path::Path, &std::path::Path),
    ) -> (Client, Client, Member) {
        let mut alice = device(server, dirs.0, 21).await;
        let mut bob = device(server, dirs.1, 22).await;
        let mut carol = Member::connect(server, "carol", 3).await;
        let server_key = carol.client.conn().server_key();
        let (group, created) = RoomGroup::create(
            &carol.client.provider,
            &carol.client.identity,
            ROOM.0,
            &server_key,
            now_ms() / 1000,
        )
        .unwrap();
        let create = CreateRoom {
            group_info: created.group_info,
            ratchet_tree: created.ratchet_tree,
            join_rule: None,
        };
        let create = carol.frame(&create, 0);
        decode_ok::<Ack>(&carol.client.send_and_wait(&create).await);
        let mut log = RoomLog::created(&carol.client.provider, group, create.to_bytes().to_vec()).unwrap();
        log.creation_confirmed();
        carol.log = Some(log);
        let members = [alice.sender_id(), bob.sender_id()];
        let packages = carol.client.claim(&members).await;
        let refs: Vec<&[u8]> = packages.iter().map(Vec::as_slice).collect();
        let output = {
            let (provider, identity) = (&carol.client.provider, &carol.client.identity);
            carol.log.as_mut().unwrap().group_mut().unwrap().add_members(provider, identity, &refs).unwrap()
        };
        let ids: Vec<u64> = members.iter().map(|s| s.0).collect();
        let commit = Commit {
            commit: output.commit,
            welcome: output.welcome,
            welcome_recipients: ids.clone(),
            group_info: Some(output.group_info),
        };
        let frame = carol.frame(&commit, 0);
        carol.log().commit_sent(frame.to_bytes().to_vec(), 0, Intent::Invite(ids)).unwrap();
        let ack: Ack = decode_ok(&carol.client.send_and_wait(&frame).await);
        carol.apply_own(&frame, &ack);
        carol.subscribe().await;
        for device in [&mut alice, &mut bob] {
            assert_eq!(device.join(ROOM, Duration::from_secs(10)).await.unwrap(), 1);
            device.subscribe(ROOM).await.unwrap();
        }

        (alice, bob, carol)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn devices_report_roll_back_and_send_again_by_themselves() {
        let server = TestServer::start(default_limits()).await;
        let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (mut alice, mut bob, mut carol) = room_of_devices(&server, (dirs.0.path(), dirs.1.path())).await;
        // Bob's valid commit, and a message in its epoch; Alice and Carol apply both.
        assert_eq!(bob.self_update(ROOM).await.unwrap(), 2);
        let dead = bob.send(ROOM, b"said in epoch 2").await.unwrap();
        let read = next_where(&mut alice, |m| text(m).is_some()).await;
        assert_eq!((read.log_index, text(&read)), (dead, Some(&b"said in epoch 2"[..])));
        carol.read_through(dead).await;

        // The admin voids it. Both devices roll back; Bob sends his message again, in epoch 1.
        let report = CommitReport { log_index: dead - 1, epoch: 1, reason: 4 };
        decode_ok::<Ack>(&carol.request(&report, 1).await);
        let voided =
            next_where(&mut bob, |m| matches!(m.body, MessageBody::Membership { epoch: 1, .. })).await;
        assert_eq!(voided.log_index, dead + 1);
        assert_eq!(bob.outbox_len(), 1, "the voided message waits to be sent again");
        assert_eq!(bob.flush_outbox().await.unwrap(), 1);
        next_where(&mut alice, |m| matches!(m.body, MessageBody::Membership { epoch: 1, .. })).await;
        let again = next_where(&mut alice, |m| text(m).is_some()).await;
        assert_eq!(text(&again), Some(&b"said in epoch 2"[..]));
        assert!(again.log_index > voided.log_index);
        let history = alice.history(ROOM, dead, 1).unwrap();
        assert!(
            matches!(&history[0].body, MessageBody::Unreadable(why) if why.starts_with("voided")),
            "{history:?}"
        );
        carol.read_through(again.log_index).await;
        assert_eq!(carol.epoch(), 1);

        // Carol's bad commit: both devices get stuck, report by themselves, and the majority voids it.
        let (_, bad) = bad_commit(&mut carol).await;
        for device in [&mut alice, &mut bob] {
            let stuck = next_where(device, |m| m.log_index == bad.log_index).await;
            assert!(matches!(stuck.body, MessageBody::Unreadable(_)), "{stuck:?}");
        }
        for device in [&mut alice, &mut bob] {
            next_where(device, |m| matches!(m.body, MessageBody::Membership { epoch: 1, .. })).await;
        }
        let said = alice.send(ROOM, b"carried on").await.unwrap();
        let read = next_where(&mut bob, |m| text(m).is_some()).await;
        assert_eq!((read.log_index, text(&read)), (said, Some(&b"carried on"[..])));
        server.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_message_waiting_sealed_in_a_voided_epoch_is_sealed_again_before_it_is_sent() {
        let server = TestServer::start(default_limits()).await;
        let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (mut alice, mut bob, mut carol) = room_of_devices(&server, (dirs.0.path(), dirs.1.path())).await;
        // Bob's commit to epoch 2; Alice applies it, then writes while offline.
        assert_eq!(bob.self_update(ROOM).await.unwrap(), 2);
        next_where(&mut alice, |m| matches!(m.body, MessageBody::Membership { epoch: 2, .. })).await;
        alice.disconnect().await;
        let offline = alice.send(ROOM, b"written in the epoch that dies").await;
        assert!(offline.as_ref().is_err_and(ClientError::is_transient), "{offline:?}");
        assert_eq!(alice.outbox_len(), 1);
        // The admin voids Bob's commit; Bob commits again: the room is at an epoch 2 with other keys.
        carol.read_through(2).await;
        let report = CommitReport { log_index: 2, epoch: 1, reason: 4 };
        decode_ok::<Ack>(&carol.request(&report, 1).await);
        next_where(&mut bob, |m| matches!(m.body, MessageBody::Membership { epoch: 1, .. })).await;
        let again = bob.self_update(ROOM).await.unwrap();
        assert_eq!(again, 2, "the same epoch number again");
        // Alice reconnects: the void, the new commit, then her message, sealed again.
        alice.connect().await.unwrap();
        alice.subscribe(ROOM).await.unwrap();
        let read = next_where(&mut bob, |m| m.sender == alice.sender_id().0).await;
        assert_eq!(text(&read), Some(&b"written in the epoch that dies"[..]), "{read:?}");
        assert_eq!(alice.outbox_len(), 0);
        server.stop().await;
    }
}
