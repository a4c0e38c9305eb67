//! The relay between domains over real QUIC on loopback: a user of b.test
//! is invited to a room of a.test, gets the Welcome from its own server,
//! and reads and writes the room through b.test, which countersigns its
//! frames to a.test; a.test's answers and fan-out come back the same way.
//! A fake b.test sends what a dishonest or broken domain could (forged or
//! foreign countersignatures and certificates, replays, frames of other
//! users, frames for other destinations): each is refused with its typed
//! error, counted, and the room goes on with nothing accepted lost.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::federation::{
    accept_link_as_b, claim_at, counter, free_address, linked, peer, start_domain, Domains,
    FEDERATION_TIMEOUT, SEED_A, SEED_B,
};
use common::{decode_ok, error_code, header, TestClient};
use ed25519_dalek::SigningKey;
use kalandra_proto::federation::{DomainName, HomeCertificate, RelayEnvelope};
use kalandra_proto::payload::{Ack, Application, Commit, KeyPackageClaimed, Subscribe, SyncDone};
use kalandra_proto::{ErrorCode, Frame, Opcode, Payload, RoomId, SenderId};
use tokio::sync::mpsc;

const RELAYED: &str = "kalandra_federation_relayed_frames_total";
const RELAY_REFUSALS: &str = "kalandra_federation_relay_refusals_total";

/// Reads frames until the `SyncDone` of a subscription; returns it and the
/// log frames before it (an erased entry's placeholder among them).
async fn read_to_sync_done(client: &mut TestClient) -> (SyncDone, Vec<Frame>) {
    let mut frames = Vec::new();
    loop {
        let frame = tokio::time::timeout(FEDERATION_TIMEOUT, client.conn().recv()).await.unwrap().unwrap();
        match frame.opcode() {
            Opcode::SyncDone => return (decode_ok(&frame), frames),
            Opcode::Error if error_code(&frame) == ErrorCode::Redacted.to_u16() => frames.push(frame),
            Opcode::Error => panic!("{}: error {} while reading", client.name, error_code(&frame)),
            _ => frames.push(frame),
        }
    }
}

/// alice (a.test) makes a room and invites bob (b.test), claimed through a.
async fn invite_bob(alice: &mut TestClient, bob: &TestClient, room: RoomId) {
    alice.create_room(room).await;
    let claimed: KeyPackageClaimed = decode_ok(&claim_at(alice, "b.test", &[bob.sender()]).await);
    let package = claimed.key_packages[0].key_package.clone().expect("bob's key package");
    let group = alice.group.as_mut().unwrap();
    let output = group.add_members(&alice.provider, &alice.identity, &[package.as_slice()]).unwrap();
    let commit = Commit {
        commit: output.commit,
        welcome: output.welcome,
        welcome_recipients: vec![bob.sender().0],
        group_info: Some(output.group_info),
    };
    let reply = alice.request(&commit).await;
    assert_eq!(reply.opcode(), Opcode::Ack, "alice adds bob: {}", error_code(&reply));
    alice.settle_commit(&reply);
}

fn text_of(frame: &Frame) -> Vec<u8> {
    let application: Application = frame.decode_payload().unwrap();
    application.ciphertext.to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federation_users_of_two_domains_talk_in_one_room_each_through_its_own_server() {
    let dir = tempfile::tempdir().unwrap();
    let domains = Domains::start(dir.path()).await;
    let mut bob = TestClient::connect(&domains.b, "bob", 2).await;
    bob.upload_key_packages(1).await;
    let mut alice = TestClient::connect(&domains.a, "alice", 1).await;
    let room = RoomId([0x51; 16]);
    invite_bob(&mut alice, &bob, room).await;

    // The Welcome reaches bob from b.test; bob reads the room through b.test.
    let welcome_index = tokio::time::timeout(FEDERATION_TIMEOUT, bob.join_from_welcome(room)).await.unwrap();
    assert_eq!(welcome_index, 1);
    bob.subscribe(0).await;
    let (done, history) = read_to_sync_done(&mut bob).await;
    assert_eq!(done.next_log_index, 2);
    assert!(done.live);
    let indices: Vec<u64> = history.iter().map(|frame| frame.header().log_index()).collect();
    assert_eq!(indices, vec![0, 1], "bob reads the room's history from a.test through b.test");
    alice.subscribe(2).await;
    read_to_sync_done(&mut alice).await;

    // bob writes through b.test: a.test sequences and acknowledges it.
    let reply = bob.send_text("hello from b").await;
    let ack: Ack = decode_ok(&reply);
    assert_eq!(ack.log_index, 2);
    assert!(ack.signed_head.is_some(), "the authority's signed head comes back with the ack");
    let seen = alice.next_of(Opcode::Application).await;
    assert_eq!((seen.header().log_index(), seen.header().sender_id()), (2, bob.sender()));
    assert_eq!(text_of(&seen), b"hello from b");
    assert!(
        !seen.header().flags().contains(kalandra_proto::Flags::COUNTERSIGNED),
        "sequenced as its client sent it: the relay's flag is not part of the log"
    );
    assert!(seen.verify(&bob.key.verifying_key()).is_ok(), "bob's own signature still verifies");

    // alice's message reaches bob through b.test.
    let ack: Ack = decode_ok(&alice.send_text("hello from a").await);
    assert_eq!(ack.log_index, 3);
    let seen = bob.next_of(Opcode::Application).await;
    assert_eq!((seen.header().log_index(), seen.header().sender_id()), (3, alice.sender()));
    assert_eq!(text_of(&seen), b"hello from a");

    assert!(counter(&domains.b, RELAYED, "direction", "out") >= 2, "subscribe and message relayed");
    assert!(counter(&domains.a, RELAYED, "direction", "in") >= 2);
    assert_eq!(counter(&domains.a, RELAY_REFUSALS, "code", "bad_countersignature"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federation_a_remote_member_gets_a_retryable_error_while_the_rooms_domain_is_down_and_nothing_acknowledged_is_lost(
) {
    let dir = tempfile::tempdir().unwrap();
    let Domains { a, b, a_federation, b_federation } = Domains::start(dir.path()).await;
    let mut bob = TestClient::connect(&b, "bob", 2).await;
    bob.upload_key_packages(1).await;
    let mut alice = TestClient::connect(&a, "alice", 1).await;
    let room = RoomId([0x52; 16]);
    invite_bob(&mut alice, &bob, room).await;
    tokio::time::timeout(FEDERATION_TIMEOUT, bob.join_from_welcome(room)).await.unwrap();
    let ack: Ack = decode_ok(&bob.send_text("before").await);
    assert_eq!(ack.log_index, 2);

    alice.disconnect().await;
    assert!(a.stop().await.is_none(), "a's data stays in the test's directory");
    // The stopped server's links drain for a moment before its socket is free.
    let started = Instant::now();
    while std::net::UdpSocket::bind(a_federation).is_err() {
        assert!(started.elapsed() < FEDERATION_TIMEOUT, "a's federation socket stays bound");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // b notices the link is gone; until then a send may still be queued on it.
    let deadline = Instant::now() + FEDERATION_TIMEOUT;
    loop {
        if bob.connection.is_none() {
            bob.reconnect(&b).await;
        }
        let frame = bob.frame(&Application {
            generation: 0,
            ciphertext: bytes::Bytes::from_static(b"while down"),
            push: None,
            epoch_tag: None,
        });
        let reply = match bob.conn().request(&frame).await {
            Ok(reply) => reply,
            Err(_) => {
                bob.connection = None;
                continue;
            }
        };
        if reply.opcode() == Opcode::Error && error_code(&reply) == ErrorCode::DomainUnreachable.to_u16() {
            let error: kalandra_proto::payload::Error = reply.decode_payload().unwrap();
            assert!(error.retry_after_ms.is_some(), "a retryable error says when to retry");
            break;
        }
        assert!(Instant::now() < deadline, "no DomainUnreachable while a is down: {:?}", reply.opcode());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let a = Domains::start_a(dir.path(), a_federation, b_federation).await;
    linked(&a, "b.test").await;
    linked(&b, "a.test").await;
    let deadline = Instant::now() + FEDERATION_TIMEOUT;
    let ack = loop {
        if bob.connection.is_none() {
            bob.reconnect(&b).await;
        }
        let frame = bob.frame(&Application {
            generation: 0,
            ciphertext: bytes::Bytes::from_static(b"after"),
            push: None,
            epoch_tag: None,
        });
        match bob.conn().request(&frame).await {
            Ok(reply) if reply.opcode() == Opcode::Ack => break decode_ok::<Ack>(&reply),
            Ok(_) => {}
            Err(_) => bob.connection = None,
        }
        assert!(Instant::now() < deadline, "bob cannot send after a came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(ack.log_index, 3, "the frame acknowledged before the outage kept its place");
    if bob.connection.is_none() {
        bob.reconnect(&b).await;
    }
    bob.subscribe(0).await;
    let (done, history) = read_to_sync_done(&mut bob).await;
    // The Welcome, not yet used, comes again on the new connection.
    let mut history: Vec<Frame> =
        history.into_iter().filter(|frame| frame.opcode() != Opcode::Welcome).collect();
    // b's replica may be a moment behind a's acknowledgement: the rest
    // comes live.
    assert!(done.next_log_index <= 4);
    while history.len() < 4 {
        history.push(tokio::time::timeout(FEDERATION_TIMEOUT, bob.conn().recv()).await.unwrap().unwrap());
    }
    let indices: Vec<u64> = history.iter().map(|frame| frame.header().log_index()).collect();
    assert_eq!(indices, vec![0, 1, 2, 3]);
    let texts: Vec<Vec<u8>> =
        history.iter().filter(|frame| frame.opcode() == Opcode::Application).map(text_of).collect();
    assert_eq!(texts, vec![b"before".to_vec(), b"after".to_vec()]);
}

/// The connection the fake b.test files `Replicate`d frames under.
const REPLICATED: u64 = u64::MAX;

/// What the fake b.test's link gets from a.test: `Deliver`ed frames (by
/// connection) and `Replicate`d ones (under [`REPLICATED`]).
type Delivered = mpsc::Receiver<(u64, Frame)>;

/// A server that speaks for b.test (it holds b's federation key): it
/// accepts a.test's link, then sends the envelopes it is given and passes
/// on the frames a.test delivers.
async fn fake_b(
    dir: &Path,
    listen: SocketAddr,
) -> (mpsc::Sender<kalandra_server::federation_link::LinkMessage>, Delivered) {
    use kalandra_server::federation_link as link;

    let identity = kalandra_server::load_or_create_server_identity(dir, None, None).unwrap();
    let endpoint = quinn::Endpoint::server(link::server_config(&identity).unwrap(), listen).unwrap();
    let (envelopes, mut to_send) = mpsc::channel::<link::LinkMessage>(64);
    let (delivered, received) = mpsc::channel(256);
    tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            let Ok(connection) = incoming.await else { continue };
            let Ok((mut send, mut recv)) = accept_link_as_b(&connection).await else { continue };
            let delivered = delivered.clone();
            let reader = tokio::spawn(async move {
                loop {
                    let mut prefix = [0u8; link::LINK_ESTABLISHED_LENGTH_PREFIX_BYTES];
                    if recv.read_exact(&mut prefix).await.is_err() {
                        return;
                    }
                    let mut body = vec![0u8; link::established_body_len(prefix).unwrap()];
                    recv.read_exact(&mut body).await.unwrap();
                    let (connection, frames) = match link::decode_established(&body).unwrap() {
                        link::LinkMessage::Deliver { connection, frames } => (connection, frames),
                        link::LinkMessage::Replicate { frames } => (REPLICATED, frames),
                        _ => continue,
                    };
                    for frame in frames {
                        let frame = Frame::decode(&bytes::Bytes::from(frame.into_vec())).unwrap();
                        let _ = delivered.send((connection, frame)).await;
                    }
                }
            });
            while let Some(message) = to_send.recv().await {
                send.write_all(&link::encode_established(&message).unwrap()).await.unwrap();
            }
            reader.abort();
            return;
        }
    });
    (envelopes, received)
}

/// carol's subscription to `room`, signed by `signer`, with `request_id`.
fn subscribe_frame(carol: &SigningKey, signer: &SigningKey, room: RoomId, request_id: u32) -> Frame {
    let sender = SenderId::from_identity_key(carol.verifying_key().as_bytes());
    let mut frame = Frame::with_payload(
        header(Subscribe::OPCODE, room, sender, 0, request_id),
        &Subscribe { from_log_index: 0 },
    )
    .unwrap();
    frame.sign(signer);
    frame
}

fn certificate(issuer: u8, domain: &str, user: &SigningKey) -> HomeCertificate {
    let not_after_ms = common::now_ms() + 3_600_000;
    HomeCertificate::issue(
        &SigningKey::from_bytes(&[issuer; 32]),
        DomainName::parse(domain).unwrap(),
        user.verifying_key().to_bytes(),
        not_after_ms,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federation_relayed_frames_a_domain_could_forge_are_refused_typed_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let b_federation = free_address();
    let a = start_domain(
        &dir.path().join("a"),
        "a.test",
        SEED_A,
        free_address(),
        vec![peer("b.test", b_federation, SEED_B)],
    )
    .await;
    let fake_dir = dir.path().join("fake-b");
    std::fs::create_dir_all(&fake_dir).unwrap();
    let (envelopes, mut delivered) = fake_b(&fake_dir, b_federation).await;
    linked(&a, "b.test").await;
    let mut alice = TestClient::connect(&a, "alice", 1).await;
    let room = RoomId([0x53; 16]);
    alice.create_room(room).await;
    alice.subscribe(0).await;
    read_to_sync_done(&mut alice).await;

    let (carol, dave) = (SigningKey::from_bytes(&[0xc1; 32]), SigningKey::from_bytes(&[0xd1; 32]));
    let (a_name, b_name, c_name) = (
        DomainName::parse("a.test").unwrap(),
        DomainName::parse("b.test").unwrap(),
        DomainName::parse("c.test").unwrap(),
    );
    let b_key = SigningKey::from_bytes(&[SEED_B; 32]);
    let envelope =
        |key: &SigningKey, destination: &DomainName, sequence: u64, cert: HomeCertificate, frame: Frame| {
            RelayEnvelope::countersign(key, b_name.clone(), destination.clone(), sequence, cert, frame)
        };
    let honest = envelope(
        &b_key,
        &a_name,
        10,
        certificate(SEED_B, "b.test", &carol),
        subscribe_frame(&carol, &carol, room, 1),
    );
    let cases: Vec<(&str, RelayEnvelope, u32, Option<&str>, ErrorCode)> = vec![
        ("a stranger of b reads an invite-only room", honest.clone(), 1, None, ErrorCode::NotMember),
        ("the same envelope again", honest, 1, Some("replayed"), ErrorCode::FederationRefused),
        (
            "a countersignature not by b",
            envelope(
                &SigningKey::from_bytes(&[0xee; 32]),
                &a_name,
                11,
                certificate(SEED_B, "b.test", &carol),
                subscribe_frame(&carol, &carol, room, 2),
            ),
            2,
            Some("bad_countersignature"),
            ErrorCode::FederationRefused,
        ),
        (
            "b speaks for a user of c",
            envelope(
                &b_key,
                &a_name,
                12,
                certificate(0xc3, "c.test", &carol),
                subscribe_frame(&carol, &carol, room, 3),
            ),
            3,
            Some("foreign_user"),
            ErrorCode::FederationRefused,
        ),
        (
            "a frame of dave with carol's certificate",
            envelope(
                &b_key,
                &a_name,
                13,
                certificate(SEED_B, "b.test", &carol),
                subscribe_frame(&dave, &dave, room, 4),
            ),
            4,
            Some("sender_mismatch"),
            ErrorCode::SenderMismatch,
        ),
        (
            "carol's frame signed by someone else",
            envelope(
                &b_key,
                &a_name,
                14,
                certificate(SEED_B, "b.test", &carol),
                subscribe_frame(&carol, &dave, room, 5),
            ),
            5,
            Some("client_signature"),
            ErrorCode::BadSignature,
        ),
        (
            "a frame for another domain",
            envelope(
                &b_key,
                &c_name,
                15,
                certificate(SEED_B, "b.test", &carol),
                subscribe_frame(&carol, &carol, room, 6),
            ),
            6,
            Some("wrong_destination"),
            ErrorCode::FederationRefused,
        ),
        (
            "a room a.test does not order",
            envelope(
                &b_key,
                &a_name,
                16,
                certificate(SEED_B, "b.test", &carol),
                subscribe_frame(&carol, &carol, RoomId([0x99; 16]), 7),
            ),
            7,
            None,
            ErrorCode::UnknownRoom,
        ),
    ];
    for (what, envelope, request_id, counted, code) in cases {
        let before = counted.map(|code| counter(&a, RELAY_REFUSALS, "code", code));
        let message = kalandra_server::federation_link::LinkMessage::Relay {
            connection: 77,
            envelope,
            recipient_homes: Vec::new(),
        };
        envelopes.send(message).await.unwrap();
        let (connection, frame) =
            tokio::time::timeout(FEDERATION_TIMEOUT, delivered.recv()).await.unwrap().unwrap();
        assert_eq!(connection, 77, "{what}: answered for the relayed connection");
        assert_eq!(frame.opcode(), Opcode::Error, "{what}");
        assert_eq!(frame.header().request_id(), request_id, "{what}: the client's request id");
        assert_eq!(error_code(&frame), code.to_u16(), "{what}");
        if let (Some(counted), Some(before)) = (counted, before) {
            assert_eq!(counter(&a, RELAY_REFUSALS, "code", counted), before + 1, "{what} is counted");
        }
    }

    // b follows a room none of its users is in: refused, nothing of the room sent.
    let before = counter(&a, RELAY_REFUSALS, "code", "not_followed_here");
    let follow = kalandra_server::federation_link::LinkMessage::Follow {
        room_id: room.0,
        from_log_index: 0,
        erasures_after: 0,
    };
    envelopes.send(follow).await.unwrap();
    let (connection, frame) =
        tokio::time::timeout(FEDERATION_TIMEOUT, delivered.recv()).await.unwrap().unwrap();
    assert_eq!((connection, frame.opcode()), (REPLICATED, Opcode::Error), "no frame of the room");
    assert_eq!(error_code(&frame), ErrorCode::NotMember.to_u16());
    assert_eq!(counter(&a, RELAY_REFUSALS, "code", "not_followed_here"), before + 1);

    // Follows in a burst, more than a link serves at once: each is served
    // in its turn (a follow's permit goes back when it ends), none is lost.
    let burst = 3 * kalandra_server::federation_link::FOLLOWS_IN_FLIGHT_PER_LINK_MAX;
    for _ in 0..burst {
        let follow = kalandra_server::federation_link::LinkMessage::Follow {
            room_id: room.0,
            from_log_index: 0,
            erasures_after: 0,
        };
        envelopes.send(follow).await.unwrap();
    }
    for _ in 0..burst {
        let (connection, frame) =
            tokio::time::timeout(FEDERATION_TIMEOUT, delivered.recv()).await.unwrap().unwrap();
        assert_eq!((connection, error_code(&frame)), (REPLICATED, ErrorCode::NotMember.to_u16()));
    }
    let refused = before + 1 + burst as u64;
    assert_eq!(counter(&a, RELAY_REFUSALS, "code", "not_followed_here"), refused);

    // The operator of a sees each refusal under b, in the admin view and the per-peer series.
    let view = a.running().federation_links().view();
    let shown = &view.peers.iter().find(|peer| peer.domain == "b.test").unwrap().rooms.refusals;
    for code in ["replayed", "bad_countersignature", "foreign_user", "sender_mismatch", "not_followed_here"] {
        assert!(shown.get(code).is_some_and(|count| *count >= 1), "{code} under b.test: {shown:?}");
        let series = format!("kalandra_federation_peer_refusals_total{{peer=\"b.test\",code=\"{code}\"}} ");
        let page = a.metrics.render().unwrap();
        let value: u64 =
            page.lines().find_map(|line| line.strip_prefix(series.as_str())).unwrap().parse().unwrap();
        assert_eq!(value, shown[code], "{code}");
    }

    // The room goes on, and the link with b stays up.
    let ack: Ack = decode_ok(&alice.send_text("still here").await);
    assert_eq!(ack.log_index, 1);
    linked(&a, "b.test").await;
}

/// A live replica checks a's signed head every
/// `REPLICA_CHECKPOINT_FRAMES` frames (a checkpoint on the feed), not only
/// when its follow catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federation_a_live_replica_checks_the_authoritys_signed_head_as_frames_keep_coming() {
    const HEADS: &str = "kalandra_federation_replica_heads_total";
    let dir = tempfile::tempdir().unwrap();
    let domains = Domains::start(dir.path()).await;
    let mut bob = TestClient::connect(&domains.b, "bob", 2).await;
    bob.upload_key_packages(1).await;
    let mut alice = TestClient::connect(&domains.a, "alice", 1).await;
    let room = RoomId([0x5c; 16]);
    invite_bob(&mut alice, &bob, room).await;
    tokio::time::timeout(FEDERATION_TIMEOUT, bob.join_from_welcome(room)).await.unwrap();
    bob.subscribe(0).await;
    read_to_sync_done(&mut bob).await;
    let checked = |outcome| counter(&domains.b, HEADS, "outcome", outcome);
    let deadline = Instant::now() + FEDERATION_TIMEOUT;
    while checked("matched") + checked("not_comparable") == 0 {
        assert!(Instant::now() < deadline, "b's follow never caught up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after_catch_up = checked("matched");
    // One frame at a time, past the next multiple of 32: a checkpoint, checked live.
    for n in 0..33 {
        let ack: Ack = decode_ok(&alice.send_text(&format!("m{n}")).await);
        assert_eq!(bob.next_of(Opcode::Application).await.header().log_index(), ack.log_index);
    }
    let deadline = Instant::now() + FEDERATION_TIMEOUT;
    while checked("matched") <= after_catch_up {
        assert!(Instant::now() < deadline, "b checked no head while live");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for outcome in ["equivocation", "bad_signature", "no_authority_key"] {
        assert_eq!(checked(outcome), 0, "{outcome}");
    }
    replica_equal(&domains, room).await;
}

/// The frames of `room` a server stores, in log order.
fn stored_frames(server: &common::TestServer, room: RoomId) -> Vec<bytes::Bytes> {
    let entries = server.store.read_range(room, 0, 10_000).unwrap();
    entries
        .into_iter()
        .enumerate()
        .map(|(index, entry)| {
            assert_eq!(entry.log_index, index as u64, "a dense log");
            entry.frame().cloned().expect("nothing erased")
        })
        .collect()
}

/// Waits until b's replica of `room` holds every frame a stores.
async fn replica_equal(domains: &Domains, room: RoomId) -> Vec<bytes::Bytes> {
    let deadline = Instant::now() + FEDERATION_TIMEOUT;
    loop {
        let (authority, replica) = (stored_frames(&domains.a, room), stored_frames(&domains.b, room));
        if authority == replica {
            return replica;
        }
        assert!(
            Instant::now() < deadline,
            "b's replica holds {} frames, a's log {}; equal prefix: {}",
            replica.len(),
            authority.len(),
            authority.iter().zip(&replica).take_while(|(a, b)| a == b).count()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federation_a_domain_keeps_a_replica_equal_to_the_authoritys_log_and_its_users_read_it_while_the_authority_is_down(
) {
    let dir = tempfile::tempdir().unwrap();
    let domains = Domains::start(dir.path()).await;
    let mut bob = TestClient::connect(&domains.b, "bob", 2).await;
    bob.upload_key_packages(1).await;
    let mut alice = TestClient::connect(&domains.a, "alice", 1).await;
    let room = RoomId([0x54; 16]);
    invite_bob(&mut alice, &bob, room).await;
    tokio::time::timeout(FEDERATION_TIMEOUT, bob.join_from_welcome(room)).await.unwrap();
    // bob's first read is relayed to a, and b starts following the room.
    bob.subscribe(0).await;
    read_to_sync_done(&mut bob).await;
    for text in ["one", "two", "three"] {
        let ack: Ack = decode_ok(&alice.send_text(text).await);
        let seen = bob.next_of(Opcode::Application).await;
        assert_eq!(seen.header().log_index(), ack.log_index);
    }
    let replica = replica_equal(&domains, room).await;
    assert_eq!(replica.len(), 5, "create, add, three messages: the same bytes at every index");

    // Once the replica is live, bob's reads are served by b alone.
    bob.disconnect().await;
    bob.reconnect(&domains.b).await;
    let relayed_before = counter(&domains.b, RELAYED, "direction", "out");
    bob.subscribe(0).await;
    let (done, history) = read_to_sync_done(&mut bob).await;
    assert_eq!((done.next_log_index, history.len()), (5, 5));
    assert_eq!(counter(&domains.b, RELAYED, "direction", "out"), relayed_before, "read from b's replica");
    // b checked the head a signed when the follow caught up against its own chain.
    const HEADS: &str = "kalandra_federation_replica_heads_total";
    let checked = counter(&domains.b, HEADS, "outcome", "matched")
        + counter(&domains.b, HEADS, "outcome", "not_comparable");
    assert!(checked >= 1, "the authority's head was checked");
    for outcome in ["equivocation", "bad_signature", "no_authority_key"] {
        assert_eq!(counter(&domains.b, HEADS, "outcome", outcome), 0, "{outcome}");
    }
    // b's operator sees one live replica of a's rooms, fed with no refusals.
    let view = domains.b.running().federation_links().view();
    let shared = &view.peers.iter().find(|peer| peer.domain == "a.test").unwrap().rooms;
    assert_eq!((shared.replicas_live, shared.replicas_catching_up, shared.replicas_refused), (1, 0, 0));
    assert!(shared.refusals.is_empty(), "{shared:?}");
    let page = domains.b.metrics.render().unwrap();
    assert!(page.contains("kalandra_federation_peer_replicas{peer=\"a.test\",state=\"live\"} 1\n"), "{page}");
    let ack: Ack = decode_ok(&alice.send_text("four").await);
    let seen = bob.next_of(Opcode::Application).await;
    assert_eq!((seen.header().log_index(), text_of(&seen)), (ack.log_index, b"four".to_vec()));
    replica_equal(&domains, room).await;

    // a goes down: bob still reads the room's whole history from b.
    let Domains { a, b, .. } = domains;
    alice.disconnect().await;
    assert!(a.stop().await.is_none());
    let deadline = Instant::now() + FEDERATION_TIMEOUT;
    let (done, history) = loop {
        if bob.connection.is_none() {
            bob.reconnect(&b).await;
        }
        let frame = bob.frame(&kalandra_proto::payload::Sync { from_log_index: 0, count_max: 100 });
        match bob.conn().send(&frame).await {
            Ok(()) => {}
            Err(_) => {
                bob.connection = None;
                continue;
            }
        }
        let mut history = Vec::new();
        let answer = loop {
            match tokio::time::timeout(FEDERATION_TIMEOUT, bob.conn().recv()).await.unwrap() {
                Ok(frame) if frame.opcode() == Opcode::SyncDone => break Some(decode_ok::<SyncDone>(&frame)),
                Ok(frame) if frame.opcode() == Opcode::Error => break None,
                Ok(frame) => history.push(frame),
                Err(_) => {
                    bob.connection = None;
                    break None;
                }
            }
        };
        if let Some(done) = answer {
            break (done, history);
        }
        assert!(Instant::now() < deadline, "bob cannot read the replica while a is down");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(done.next_log_index, 6);
    let texts: Vec<Vec<u8>> =
        history.iter().filter(|frame| frame.opcode() == Opcode::Application).map(text_of).collect();
    assert_eq!(texts, vec![b"one".to_vec(), b"two".to_vec(), b"three".to_vec(), b"four".to_vec()]);
    let reply = bob.send_text("while a is down").await;
    assert_eq!(error_code(&reply), ErrorCode::DomainUnreachable.to_u16(), "writes wait for a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federation_the_rooms_admin_kicks_a_member_of_another_domain_who_then_reads_nothing_more() {
    use kalandra_proto::payload::{Kick, Proposal, Sync};
    let dir = tempfile::tempdir().unwrap();
    let domains = Domains::start(dir.path()).await;
    let mut bob = TestClient::connect(&domains.b, "bob", 2).await;
    bob.upload_key_packages(1).await;
    let mut alice = TestClient::connect(&domains.a, "alice", 1).await;
    let room = RoomId([0x55; 16]);
    invite_bob(&mut alice, &bob, room).await;
    tokio::time::timeout(FEDERATION_TIMEOUT, bob.join_from_welcome(room)).await.unwrap();
    bob.subscribe(0).await;
    read_to_sync_done(&mut bob).await;
    alice.subscribe(2).await;
    read_to_sync_done(&mut alice).await;
    replica_equal(&domains, room).await;

    // The admin on a kicks bob of b: the server proposes his removal, the
    // admin commits it, and then writes on.
    let kick =
        decode_ok::<Ack>(&alice.request(&Kick { target: bob.sender().0, reason: "spam".into() }).await);
    let proposal = alice.next_of(Opcode::Proposal).await;
    assert_eq!(proposal.header().log_index(), kick.log_index);
    let proposal: Proposal = proposal.decode_payload().unwrap();
    let group = alice.group.as_mut().unwrap();
    group.process_handshake(&alice.provider, &proposal.proposal).unwrap();
    let output = group.commit_pending_proposals(&alice.provider, &alice.identity).unwrap();
    let commit = Commit {
        commit: output.commit,
        welcome: None,
        welcome_recipients: vec![],
        group_info: Some(output.group_info),
    };
    let reply = alice.request(&commit).await;
    alice.settle_commit(&reply);
    let removed_at = decode_ok::<Ack>(&reply).log_index;
    let after = decode_ok::<Ack>(&alice.send_text("after bob").await).log_index;
    replica_equal(&domains, room).await;

    // bob's subscription carried his removal and nothing after it.
    loop {
        let frame = tokio::time::timeout(FEDERATION_TIMEOUT, bob.conn().recv()).await.unwrap().unwrap();
        assert!(
            frame.header().log_index() <= removed_at || frame.opcode() == Opcode::Error,
            "{:?}",
            frame.opcode()
        );
        if frame.opcode() == Opcode::Commit {
            assert_eq!(frame.header().log_index(), removed_at);
            break;
        }
    }
    // Through b, he reads up to his removal and no further: b's replica and
    // a agree.
    let reply = bob.request(&Sync { from_log_index: removed_at, count_max: 10 }).await;
    assert_eq!(decode_ok::<SyncDone>(&reply).next_log_index, removed_at + 1, "he reads his removal");
    let reply = bob.request(&Sync { from_log_index: after, count_max: 10 }).await;
    assert_eq!(error_code(&reply), ErrorCode::NotMember.to_u16(), "nothing after it");
    let reply = bob.request(&Subscribe { from_log_index: 0 }).await;
    assert_eq!(error_code(&reply), ErrorCode::NotMember.to_u16());
    let reply = bob.send_text("still here?").await;
    assert_eq!(error_code(&reply), ErrorCode::NotMember.to_u16(), "nor writes");
}

/// The frames of `room` on `authority` and on each of `replicas` are the
/// same bytes at every index (waits for the replicas to catch up).
async fn replicas_equal(
    authority: &common::TestServer,
    replicas: &[&common::TestServer],
    room: RoomId,
) -> usize {
    let deadline = Instant::now() + FEDERATION_TIMEOUT;
    loop {
        let log = stored_frames(authority, room);
        if replicas.iter().all(|replica| stored_frames(replica, room) == log) {
            return log.len();
        }
        assert!(
            Instant::now() < deadline,
            "a replica differs from the authority's log of {} frames",
            log.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federation_users_of_three_domains_share_one_room_and_each_domain_keeps_an_equal_replica() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = common::federation::start_three_domains(dir.path()).await;
    let mut bob = TestClient::connect(&b, "bob", 2).await;
    bob.upload_key_packages(1).await;
    let mut carol = TestClient::connect(&c, "carol", 3).await;
    carol.upload_key_packages(1).await;
    let mut alice = TestClient::connect(&a, "alice", 1).await;
    let room = RoomId([0x56; 16]);
    alice.create_room(room).await;
    let mut packages = Vec::new();
    for (domain, user) in [("b.test", bob.sender()), ("c.test", carol.sender())] {
        let claimed: KeyPackageClaimed = decode_ok(&claim_at(&mut alice, domain, &[user]).await);
        packages.push(claimed.key_packages[0].key_package.clone().expect("a key package"));
    }
    let refs: Vec<&[u8]> = packages.iter().map(Vec::as_slice).collect();
    let group = alice.group.as_mut().unwrap();
    let output = group.add_members(&alice.provider, &alice.identity, &refs).unwrap();
    let commit = Commit {
        commit: output.commit,
        welcome: output.welcome,
        welcome_recipients: vec![bob.sender().0, carol.sender().0],
        group_info: Some(output.group_info),
    };
    let reply = alice.request(&commit).await;
    assert_eq!(reply.opcode(), Opcode::Ack, "alice adds bob of b and carol of c");
    alice.settle_commit(&reply);

    for member in [&mut bob, &mut carol] {
        tokio::time::timeout(FEDERATION_TIMEOUT, member.join_from_welcome(room)).await.unwrap();
        member.subscribe(0).await;
        read_to_sync_done(member).await;
    }
    alice.subscribe(2).await;
    read_to_sync_done(&mut alice).await;

    // Each writes through its own server; every other member reads it.
    let mut sent = Vec::new();
    for writer in 0..3 {
        let (name, ack) = match writer {
            0 => ("alice", decode_ok::<Ack>(&alice.send_text("from a").await)),
            1 => ("bob", decode_ok::<Ack>(&bob.send_text("from b").await)),
            _ => ("carol", decode_ok::<Ack>(&carol.send_text("from c").await)),
        };
        sent.push((name, ack.log_index));
    }
    let indices: Vec<u64> = sent.iter().map(|(_, index)| *index).collect();
    assert_eq!(indices, vec![2, 3, 4], "one order for the three domains");
    for (reader, writers) in [(&mut alice, [3, 4]), (&mut bob, [2, 4]), (&mut carol, [2, 3])] {
        let mut seen = Vec::new();
        while seen.len() < 2 {
            let frame = reader.next_of(Opcode::Application).await;
            seen.push(frame.header().log_index());
        }
        assert_eq!(seen, writers.to_vec(), "{} reads the others' messages in the room's order", reader.name);
    }
    assert_eq!(replicas_equal(&a, &[&b, &c], room).await, 5, "b's and c's replicas are a's log");
}

/// Waits until `server`'s copy of `room` holds `log_index` erased.
async fn erased_at(server: &common::TestServer, room: RoomId, log_index: u64) {
    let deadline = Instant::now() + FEDERATION_TIMEOUT;
    loop {
        let entry = server.store.read_range(room, log_index, 1).unwrap().into_iter().next();
        if matches!(entry.map(|entry| entry.content), Some(kalandra_server::store::EntryContent::Erased(_))) {
            return;
        }
        assert!(Instant::now() < deadline, "index {log_index} of room {room} is not erased");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federation_an_entry_erased_at_the_authority_is_erased_in_the_replica_live_and_after_the_replicas_domain_was_down(
) {
    use kalandra_server::store::{EntryContent, ErasureCause};
    use kalandra_server::RedactAuthority;
    const ERASURES: &str = "kalandra_federation_replica_erasures_total";

    let dir = tempfile::tempdir().unwrap();
    let domains = Domains::start(dir.path()).await;
    let mut bob = TestClient::connect(&domains.b, "bob", 2).await;
    bob.upload_key_packages(1).await;
    let mut alice = TestClient::connect(&domains.a, "alice", 1).await;
    let room = RoomId([0x57; 16]);
    invite_bob(&mut alice, &bob, room).await;
    tokio::time::timeout(FEDERATION_TIMEOUT, bob.join_from_welcome(room)).await.unwrap();
    bob.subscribe(0).await;
    read_to_sync_done(&mut bob).await;
    let mut acked = Vec::new();
    for text in ["one", "two", "three"] {
        let ack: Ack = decode_ok(&alice.send_text(text).await);
        bob.next_of(Opcode::Application).await;
        acked.push(ack.log_index);
    }
    replica_equal(&domains, room).await;
    assert!(domains.b.store.data_key(room, acked[0]).unwrap().is_some(), "b holds the content");

    // Live: the authority's notice follows the frames b was sent.
    domains.a.node.redact(room, acked[0], alice.sender(), RedactAuthority::Sender).await.unwrap();
    erased_at(&domains.b, room, acked[0]).await;
    assert_eq!(domains.b.store.data_key(room, acked[0]).unwrap(), None, "b destroyed its key too");
    let entry = domains.b.store.read_range(room, acked[0], 1).unwrap().remove(0);
    let EntryContent::Erased(erasure) = entry.content else { panic!("not erased") };
    assert_eq!(erasure.redaction.cause, ErasureCause::Authority);
    assert_eq!(counter(&domains.b, ERASURES, "outcome", "erased"), 1);
    // The notice is no refusal: b's replica stays live, and the rest is intact.
    let view = domains.b.running().federation_links().view();
    let shared = &view.peers.iter().find(|peer| peer.domain == "a.test").unwrap().rooms;
    assert_eq!((shared.replicas_live, shared.replicas_refused), (1, 0), "{shared:?}");
    assert!(domains.b.store.data_key(room, acked[1]).unwrap().is_some());
    // bob reads the placeholder from his own server.
    bob.disconnect().await;
    bob.reconnect(&domains.b).await;
    bob.subscribe(0).await;
    let (_, history) = read_to_sync_done(&mut bob).await;
    let at_erased = history.iter().find(|frame| frame.header().log_index() == acked[0]).unwrap();
    assert_eq!(error_code(at_erased), ErrorCode::Redacted.to_u16());

    // b down while a erases: b learns it from a's journal when it follows again.
    let Domains { a, b, a_federation, b_federation } = domains;
    bob.disconnect().await;
    assert!(b.stop().await.is_none());
    a.node.redact(room, acked[1], alice.sender(), RedactAuthority::Sender).await.unwrap();
    let b = Domains::start_b(dir.path(), b_federation, a_federation).await;
    linked(&b, "a.test").await;
    erased_at(&b, room, acked[1]).await;
    assert_eq!(b.store.data_key(room, acked[1]).unwrap(), None);
    let deadline = Instant::now() + FEDERATION_TIMEOUT;
    while b.store.replica_erasure_cursor(room).unwrap() < 2 {
        assert!(Instant::now() < deadline, "b's cursor of a's erasure journal stays behind");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(a.store.erasures_after(room, 0, 10).unwrap().len(), 2, "a journaled both erasures");
    assert!(b.store.data_key(room, acked[2]).unwrap().is_some(), "what a did not erase stays");
    let _ = a.stop().await;
    let _ = b.stop().await;
}
