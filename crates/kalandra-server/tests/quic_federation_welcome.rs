//! Welcomes for users of another domain over real QUIC on loopback: two
//! in-process servers of domains a.test and b.test, linked. alice on a
//! claims key packages of bob and carol of b through a's server, creates a
//! room on a and adds them; the Welcome is routed to b, which records the
//! room as a's and holds the Welcome until each reads the room: bob,
//! connected, gets it at once, carol when she connects, and again after b
//! restarts. A Welcome whose commit is made while b is down reaches b once
//! the link is back. A peer's Welcome for a room b orders itself, for a
//! room recorded under another domain, that is not a Welcome of the room,
//! or whose recipients' key packages it names were not claimed through b,
//! is refused and counted.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use client_core::mls::{Identity, MlsProvider, RoomGroup};
use common::{decode_ok, default_limits, TestClient, TestServer};
use ed25519_dalek::SigningKey;
use kalandra_proto::federation::DomainName;
use kalandra_proto::payload::{Ack, Commit, KeyPackageClaim, KeyPackageClaimed, Sync, SyncDone, Welcome};
use kalandra_proto::{Frame, FrameHeaderBuf, Opcode, Payload, RoomId, SenderId};
use kalandra_server::{FederationConfig, PeerConfig, PeerKeyConfig, FEDERATION_KEY_FILE_NAME};

const TIMEOUT: Duration = Duration::from_secs(60);
const SEED_A: u8 = 0xa1;
const SEED_B: u8 = 0xb2;
const SEED_C: u8 = 0xc3;

fn free_address() -> SocketAddr {
    let socket = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    socket.local_addr().unwrap()
}

fn peer(domain: &str, address: Option<SocketAddr>, seed: u8) -> PeerConfig {
    let key = hex::encode(SigningKey::from_bytes(&[seed; 32]).verifying_key().to_bytes());
    PeerConfig {
        domain: DomainName::parse(domain).unwrap(),
        address: address.map(|address| address.to_string()),
        keys: vec![PeerKeyConfig { key, valid_until_ms: None }],
        refused: false,
    }
}

/// The server of `domain` in `data_dir`, with the federation key of
/// `seed`, linking on `federation` with `peers`.
async fn start(
    data_dir: &Path,
    domain: &str,
    seed: u8,
    federation: SocketAddr,
    peers: Vec<PeerConfig>,
) -> TestServer {
    std::fs::create_dir_all(data_dir).unwrap();
    std::fs::write(data_dir.join(FEDERATION_KEY_FILE_NAME), [seed; 32]).unwrap();
    TestServer::start_configured(data_dir, default_limits(), |config| {
        config.domain = DomainName::parse(domain).unwrap();
        config.federation = FederationConfig {
            listen: Some(federation),
            handshake_timeout_ms: 1_000,
            peers,
            ..Default::default()
        };
    })
    .await
}

/// Waits until `server` has a link with `peer` up.
async fn linked(server: &TestServer, peer: &str) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let view = server.running().federation_links().view();
        if view.peers.iter().any(|view| view.domain == peer && view.connected) {
            return;
        }
        assert!(Instant::now() < deadline, "no link with {peer}: {view:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn counter(server: &TestServer, name: &str, label: &str, value: &str) -> u64 {
    let page = server.metrics.render().unwrap();
    let series = format!("{name}{{{label}=\"{value}\"}} ");
    page.lines().find_map(|line| line.strip_prefix(series.as_str())).unwrap().parse().unwrap()
}

fn refusals(server: &TestServer, code: &str) -> u64 {
    counter(server, "kalandra_federation_refusals_total", "code", code)
}

fn welcomes(server: &TestServer, outcome: &str) -> u64 {
    counter(server, "kalandra_federation_welcomes_total", "outcome", outcome)
}

fn pending(server: &TestServer, user: SenderId) -> usize {
    server.store.pending_welcomes(user.0, None).unwrap().len()
}

/// Waits until `check` holds.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !check() {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The next Welcome `client` receives, joined: the log index it names.
async fn joins(client: &mut TestClient, room: RoomId) -> u64 {
    let name = client.name;
    tokio::time::timeout(TIMEOUT, client.join_from_welcome(room))
        .await
        .unwrap_or_else(|_| panic!("{name} got no Welcome"))
}

/// Two linked domains, their data in `dir`.
struct Domains {
    a: TestServer,
    b: TestServer,
    a_federation: SocketAddr,
    b_federation: SocketAddr,
}

impl Domains {
    async fn start(dir: &Path) -> Domains {
        let (a_federation, b_federation) = (free_address(), free_address());
        let a_peers = vec![peer("b.test", Some(b_federation), SEED_B)];
        let a = start(&dir.join("a"), "a.test", SEED_A, a_federation, a_peers).await;
        let b = Domains::start_b(dir, b_federation, a_federation).await;
        linked(&a, "b.test").await;
        linked(&b, "a.test").await;
        Domains { a, b, a_federation, b_federation }
    }

    async fn start_b(dir: &Path, b_federation: SocketAddr, a_federation: SocketAddr) -> TestServer {
        let b_peers = vec![peer("a.test", Some(a_federation), SEED_A)];
        start(&dir.join("b"), "b.test", SEED_B, b_federation, b_peers).await
    }
}

/// `alice` claims one key package of each of `users` of b.test through her server.
async fn claim_remote(alice: &mut TestClient, users: &[SenderId]) -> Vec<Vec<u8>> {
    let claim = KeyPackageClaim {
        sender_ids: users.iter().map(|user| user.0).collect(),
        domain: Some(DomainName::parse("b.test").unwrap()),
    };
    let claimed: KeyPackageClaimed = decode_ok(&alice.request(&claim).await);
    claimed.key_packages.into_iter().map(|entry| entry.key_package.expect("a key package")).collect()
}

/// `alice` commits adding `users` (their `packages`) with a Welcome; the ack.
async fn add_remote(alice: &mut TestClient, users: &[SenderId], packages: &[Vec<u8>]) -> Ack {
    let refs: Vec<&[u8]> = packages.iter().map(Vec::as_slice).collect();
    let group = alice.group.as_mut().unwrap();
    let output = group.add_members(&alice.provider, &alice.identity, &refs).unwrap();
    let commit = Commit {
        commit: output.commit,
        welcome: output.welcome,
        welcome_recipients: users.iter().map(|user| user.0).collect(),
        group_info: Some(output.group_info),
    };
    let reply = alice.request(&commit).await;
    alice.settle_commit(&reply);
    decode_ok(&reply)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federation_welcome_is_held_at_the_recipients_home_until_read() {
    let dir = tempfile::tempdir().unwrap();
    let Domains { a, b, a_federation, b_federation } = Domains::start(dir.path()).await;
    let mut bob = TestClient::connect(&b, "bob", 2).await;
    bob.upload_key_packages(1).await;
    let mut carol = TestClient::connect(&b, "carol", 3).await;
    carol.upload_key_packages(1).await;
    carol.disconnect().await;
    let mut alice = TestClient::connect(&a, "alice", 1).await;
    let room = RoomId([0x77; 16]);

    let users = [bob.sender(), carol.sender()];
    let packages = claim_remote(&mut alice, &users).await;
    alice.create_room(room).await;
    let ack = add_remote(&mut alice, &users, &packages).await;

    assert_eq!(joins(&mut bob, room).await, ack.log_index, "bob, connected at home, is welcomed");
    assert_eq!(b.running().remote_room_authority(room).map(|d| d.to_string()).as_deref(), Some("a.test"));
    eventually("a deletes its copies once b stored them", || {
        pending(&a, bob.sender()) == 0 && pending(&a, carol.sender()) == 0
    })
    .await;
    assert_eq!(welcomes(&a, "forwarded"), 1, "one Welcome for both recipients");
    assert_eq!(welcomes(&b, "received"), 1);

    carol.reconnect(&b).await;
    assert_eq!(joins(&mut carol, room).await, ack.log_index, "held for carol until she connects");
    carol.disconnect().await;
    bob.disconnect().await;
    drop(a);
    let data = b.stop().await;
    assert!(data.is_none(), "b's data stays in the test's directory");
    let b = Domains::start_b(dir.path(), b_federation, a_federation).await;
    let authority = b.running().remote_room_authority(room).map(|d| d.to_string());
    assert_eq!(authority.as_deref(), Some("a.test"), "the remote room is recorded across a restart");
    carol.reconnect(&b).await;
    // Her client already joined with it (a client ignores it then); b still
    // holds it since she has not read the room.
    let again =
        tokio::time::timeout(TIMEOUT, carol.next_of(Opcode::Welcome)).await.expect("held across the restart");
    assert_eq!((again.header().room_id(), again.header().log_index()), (room, ack.log_index));
    // Reading the room uses the Welcome up, as locally.
    carol.subscribe(0).await;
    eventually("carol's Welcome is used once she reads the room", || pending(&b, carol.sender()) == 0).await;
    assert_eq!(pending(&b, bob.sender()), 1, "bob's stays: he has not read the room");
}

/// A member of b.test invites, into a room a.test orders and b replicates,
/// dave of b (claimed at b) and erin of c.test (claimed through b): a
/// learns their homes only from b's relay of the commit, and routes the
/// Welcome to each; b takes it although it holds a log of the room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federation_welcome_for_users_a_remote_member_invites_reaches_their_homes() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = common::federation::start_three_domains(dir.path()).await;
    let mut bob = TestClient::connect(&b, "bob", 2).await;
    bob.upload_key_packages(1).await;
    let mut dave = TestClient::connect(&b, "dave", 4).await;
    dave.upload_key_packages(1).await;
    let mut erin = TestClient::connect(&c, "erin", 5).await;
    erin.upload_key_packages(1).await;
    let mut alice = TestClient::connect(&a, "alice", 1).await;
    let room = RoomId([0x3d; 16]);
    let bobs = claim_remote(&mut alice, &[bob.sender()]).await;
    alice.create_room(room).await;
    add_remote(&mut alice, &[bob.sender()], &bobs).await;
    joins(&mut bob, room).await;
    // bob reads the room: b follows it and keeps its replica (so b holds a
    // log of the room, which is still a's).
    bob.subscribe(0).await;
    eventually("b keeps a replica of the room", || b.store.next_log_index(room).unwrap() > 0).await;

    let mut packages = bob.claim(&[dave.sender()]).await;
    let claimed: KeyPackageClaimed =
        decode_ok(&common::federation::claim_at(&mut bob, "c.test", &[erin.sender()]).await);
    packages.extend(claimed.key_packages.into_iter().map(|entry| entry.key_package.expect("erin's")));
    assert_eq!(a.store.remote_user_home(dave.sender().0).unwrap(), None, "a knows nothing of dave");
    assert_eq!(a.store.remote_user_home(erin.sender().0).unwrap(), None, "nor of erin");
    let ack = add_remote(&mut bob, &[dave.sender(), erin.sender()], &packages).await;
    // Read at once, b serves the room from its replica only once that holds
    // bob's acknowledged commit.
    let sync = bob.frame(&Sync { from_log_index: ack.log_index, count_max: 16 });
    let done: SyncDone = decode_ok(&bob.send_and_wait(&sync).await);
    assert!(done.next_log_index > ack.log_index, "bob's read reaches his own commit: {done:?}");

    assert_eq!(joins(&mut dave, room).await, ack.log_index, "dave is welcomed at his home, b");
    assert_eq!(joins(&mut erin, room).await, ack.log_index, "erin is welcomed at her home, c");
    // b's naming served this room's Welcome only: it is not recorded as
    // their home (only a claim through the home is).
    assert_eq!(a.store.remote_user_home(dave.sender().0).unwrap(), None);
    assert_eq!(a.store.remote_user_home(erin.sender().0).unwrap(), None);
    eventually("a deletes its copies once the homes stored them", || {
        pending(&a, dave.sender()) == 0 && pending(&a, erin.sender()) == 0
    })
    .await;
    assert_eq!(welcomes(&b, "received"), 2, "bob's and dave's");
    assert_eq!(welcomes(&c, "received"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federation_welcome_of_a_commit_made_while_the_link_is_down_arrives_once_it_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let Domains { a, b, a_federation, b_federation } = Domains::start(dir.path()).await;
    let mut bob = TestClient::connect(&b, "bob", 2).await;
    bob.upload_key_packages(1).await;
    let mut alice = TestClient::connect(&a, "alice", 1).await;
    let room = RoomId([0x55; 16]);
    let packages = claim_remote(&mut alice, &[bob.sender()]).await;
    bob.disconnect().await;
    assert!(b.stop().await.is_none());

    alice.create_room(room).await;
    let ack = add_remote(&mut alice, &[bob.sender()], &packages).await;
    eventually("the Welcome could not be routed", || welcomes(&a, "deferred") >= 1).await;
    assert_eq!(pending(&a, bob.sender()), 1, "a keeps it while b is away");

    let b = Domains::start_b(dir.path(), b_federation, a_federation).await;
    linked(&a, "b.test").await;
    let back = Instant::now();
    bob.reconnect(&b).await;
    assert_eq!(joins(&mut bob, room).await, ack.log_index, "routed once the link is back");
    // Sent when the link came up, not left to the periodic retry.
    let retry = Duration::from_millis(kalandra_server::WELCOME_RETRY_INTERVAL_MS);
    assert!(back.elapsed() < retry / 2, "routed {:?} after the link came back", back.elapsed());
    eventually("a deletes its copy", || pending(&a, bob.sender()) == 0).await;
    assert_eq!(welcomes(&a, "dropped"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federation_welcome_for_a_user_of_a_domain_the_operator_then_refuses_is_dropped_not_kept_for_ever() {
    let dir = tempfile::tempdir().unwrap();
    let Domains { a, b, a_federation, b_federation } = Domains::start(dir.path()).await;
    let mut bob = TestClient::connect(&b, "bob", 2).await;
    bob.upload_key_packages(1).await;
    let mut alice = TestClient::connect(&a, "alice", 1).await;
    let room = RoomId([0x56; 16]);
    let packages = claim_remote(&mut alice, &[bob.sender()]).await;
    bob.disconnect().await;
    assert!(b.stop().await.is_none());
    alice.create_room(room).await;
    add_remote(&mut alice, &[bob.sender()], &packages).await;
    eventually("the Welcome could not be routed", || welcomes(&a, "deferred") >= 1).await;
    assert_eq!(pending(&a, bob.sender()), 1, "a keeps it while b is away");

    // a's operator refuses b: the Welcome can never be taken, and goes.
    alice.disconnect().await;
    assert!(a.stop().await.is_none());
    let refused_b = PeerConfig { refused: true, ..peer("b.test", Some(b_federation), SEED_B) };
    // (b is down: a listens elsewhere, its old socket may linger a moment.)
    let _ = a_federation;
    let a = start(&dir.path().join("a"), "a.test", SEED_A, free_address(), vec![refused_b]).await;
    eventually("a drops the Welcome for b's user", || pending(&a, bob.sender()) == 0).await;
    assert_eq!(welcomes(&a, "dropped"), 1);
    assert_eq!(welcomes(&a, "forwarded"), 0);
}

/// A Welcome frame of `room` whose payload is no MLS Welcome.
fn welcome_frame(room: RoomId) -> Vec<u8> {
    let payload = Welcome { welcome: vec![1, 2, 3], ratchet_tree: None, log_head: None };
    let mut header = FrameHeaderBuf::new(Welcome::OPCODE);
    header.set_room_id(room).set_log_index(1).set_server_timestamp_ms(common::now_ms());
    Frame::with_payload(header, &payload).unwrap().to_bytes().to_vec()
}

/// A peer of b (`domain`, federation key of `seed`) that dials b and
/// sends requests over its link.
struct FakePeer {
    endpoint: quinn::Endpoint,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    next_id: u64,
}

impl FakePeer {
    async fn dial(b_federation: SocketAddr, domain: &str, seed: u8) -> FakePeer {
        use kalandra_proto::federation::{PeerKey, PeerKeys, LINK_TLS_EXPORTER_LABEL};
        use kalandra_server::federation_link as link;

        let mut endpoint = quinn::Endpoint::client(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).unwrap();
        endpoint.set_default_client_config(kalandra_server::federation_client_config().unwrap());
        let connection = endpoint.connect(b_federation, "b.test").unwrap().await.unwrap();
        let mut binding = [0u8; 32];
        connection.export_keying_material(&mut binding, LINK_TLS_EXPORTER_LABEL, b"").unwrap();
        let (mut send, mut recv) = connection.open_bi().await.unwrap();
        let b_domain = DomainName::parse("b.test").unwrap();
        let b_key =
            PeerKey { key: SigningKey::from_bytes(&[SEED_B; 32]).verifying_key(), valid_until_ms: None };
        let peers: link::PeerTable =
            [(b_domain.clone(), PeerKeys::new(b_domain.clone(), vec![b_key]).unwrap())].into_iter().collect();
        let (mut handshake, hello) = link::LinkHandshake::initiator(
            SigningKey::from_bytes(&[seed; 32]),
            DomainName::parse(domain).unwrap(),
            rand::random(),
            binding,
            b_domain,
        );
        send.write_all(&link::encode(&hello)).await.unwrap();
        loop {
            let mut prefix = [0u8; link::LINK_LENGTH_PREFIX_BYTES];
            recv.read_exact(&mut prefix).await.unwrap();
            let mut body = vec![0u8; link::body_len(prefix).unwrap()];
            recv.read_exact(&mut body).await.unwrap();
            match handshake.receive(link::decode(&body).unwrap(), &peers, common::now_ms()).unwrap() {
                link::Step::Send(messages) => {
                    for message in messages {
                        send.write_all(&link::encode(&message)).await.unwrap();
                    }
                }
                link::Step::Established(established) => {
                    for message in established.send {
                        send.write_all(&link::encode(&message)).await.unwrap();
                    }
                    break;
                }
            }
        }
        FakePeer { endpoint, send, recv, next_id: 1 }
    }

    /// Sends `request` over the link and returns b's answer.
    async fn request(
        &mut self,
        request: kalandra_server::federation_link::LinkRequest,
    ) -> kalandra_server::federation_link::LinkResponse {
        use kalandra_server::federation_link as link;

        let id = self.next_id;
        self.next_id += 1;
        let message = link::LinkMessage::Request { id, request };
        self.send.write_all(&link::encode_established(&message).unwrap()).await.unwrap();
        loop {
            let mut prefix = [0u8; link::LINK_ESTABLISHED_LENGTH_PREFIX_BYTES];
            tokio::time::timeout(TIMEOUT, self.recv.read_exact(&mut prefix)).await.unwrap().unwrap();
            let mut body = vec![0u8; link::established_body_len(prefix).unwrap()];
            self.recv.read_exact(&mut body).await.unwrap();
            match link::decode_established(&body).unwrap() {
                link::LinkMessage::Response { id: answered, response } if answered == id => return response,
                _ => continue,
            }
        }
    }

    /// Claims one key package of each of `users` of b; the packages.
    async fn claim(&mut self, users: &[SenderId]) -> Vec<Vec<u8>> {
        use kalandra_server::federation_link as link;

        let request =
            link::LinkRequest::ClaimKeyPackages { sender_ids: users.iter().map(|user| user.0).collect() };
        match self.request(request).await {
            link::LinkResponse::Claimed { key_packages } => {
                key_packages.into_iter().map(|entry| entry.key_package.expect("a key package")).collect()
            }
            other => panic!("claim answered {other:?}"),
        }
    }

    /// Sends `DeliverWelcome` and returns b's answer.
    async fn deliver(&mut self, room: RoomId, recipients: &[SenderId], welcome: Vec<u8>) -> String {
        use kalandra_server::federation_link as link;

        let request = link::LinkRequest::DeliverWelcome {
            room_id: room.0,
            recipients: recipients.iter().map(|user| user.0).collect(),
            welcome,
        };
        match self.request(request).await {
            link::LinkResponse::WelcomeStored {} => "stored".to_owned(),
            link::LinkResponse::Refused { code, .. } => code.as_str().to_owned(),
            other => format!("{other:?}"),
        }
    }
}

/// A real Welcome frame of `room` adding the owners of `packages`, made by
/// a client of the test's own.
fn mls_welcome(room: RoomId, packages: &[Vec<u8>]) -> Vec<u8> {
    let provider = MlsProvider::from_seed([0xee; 32]);
    let identity = Identity::generate(&provider).unwrap();
    let server_key = SigningKey::from_bytes(&[7; 32]).verifying_key().to_bytes();
    let (mut group, _) =
        RoomGroup::create(&provider, &identity, room.0, &server_key, common::now_ms() / 1000).unwrap();
    let packages: Vec<&[u8]> = packages.iter().map(Vec::as_slice).collect();
    let welcome = group.add_members(&provider, &identity, &packages).unwrap().welcome.unwrap();
    let payload = Welcome { welcome, ratchet_tree: None, log_head: None };
    let mut header = FrameHeaderBuf::new(Welcome::OPCODE);
    header.set_room_id(room).set_log_index(1).set_server_timestamp_ms(common::now_ms());
    Frame::with_payload(header, &payload).unwrap().to_bytes().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federation_welcome_for_a_local_room_or_another_domains_room_is_refused_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let b_federation = free_address();
    // b accepts links from a.test and c.test (both played by this test).
    let b_peers = vec![peer("a.test", None, SEED_A), peer("c.test", None, SEED_C)];
    let b = start(&dir.path().join("b"), "b.test", SEED_B, b_federation, b_peers).await;
    let mut bob = TestClient::connect(&b, "bob", 2).await;
    bob.upload_key_packages(1).await;
    let own = RoomId([0x0b; 16]);
    bob.create_room(own).await;
    let mut carol = TestClient::connect(&b, "carol", 3).await;
    carol.upload_key_packages(1).await;
    carol.disconnect().await;
    let carol = carol.sender();
    let mut fake_a = FakePeer::dial(b_federation, "a.test", SEED_A).await;
    let mut fake_c = FakePeer::dial(b_federation, "c.test", SEED_C).await;
    let carols = fake_c.claim(&[carol]).await;

    let to_carol = mls_welcome(own, &carols);
    assert_eq!(fake_a.deliver(own, &[carol], to_carol).await, "bad_request", "b orders it");
    assert_eq!(refusals(&b, "local_room"), 1);

    let c_room = RoomId([0x0c; 16]);
    assert_eq!(fake_c.deliver(c_room, &[carol], mls_welcome(c_room, &carols)).await, "stored");
    assert_eq!(
        fake_a.deliver(c_room, &[carol], mls_welcome(c_room, &carols)).await,
        "bad_request",
        "c orders it"
    );
    assert_eq!(refusals(&b, "other_authority"), 1);
    let authority = b.running().remote_room_authority(c_room).map(|d| d.to_string());
    assert_eq!(authority.as_deref(), Some("c.test"), "the first authority stays");

    let a_room = RoomId([0x0a; 16]);
    let wrong = fake_a.deliver(a_room, &[carol], mls_welcome(c_room, &carols)).await;
    assert_eq!(wrong, "bad_request", "a Welcome of another room");
    let not_mls = fake_a.deliver(a_room, &[bob.sender()], welcome_frame(a_room)).await;
    assert_eq!(not_mls, "bad_request", "a Welcome frame without an MLS Welcome");
    assert_eq!(refusals(&b, "bad_welcome"), 2);
    // Recipients whose key packages the Welcome does not name, or were
    // never handed out: nothing stored, no room recorded.
    let made_up = SenderId(0xca201);
    let unclaimed = fake_a.deliver(a_room, &[made_up], mls_welcome(a_room, &carols)).await;
    assert_eq!(unclaimed, "bad_request", "a made-up recipient");
    let not_named = fake_a.deliver(a_room, &[bob.sender()], mls_welcome(a_room, &carols)).await;
    assert_eq!(not_named, "bad_request", "bob named on a Welcome to carol's package");
    assert_eq!(refusals(&b, "unclaimed_recipient"), 2);
    assert_eq!(b.running().remote_room_authority(a_room), None, "nothing recorded for a refusal");
    assert_eq!(pending(&b, carol), 1, "only c's Welcome is held for carol");
    assert_eq!(pending(&b, made_up), 0);

    // A peer's Welcome for a connected user is handed over at once.
    let bobs = fake_a.claim(&[bob.sender()]).await;
    let sent = mls_welcome(a_room, &bobs);
    assert_eq!(fake_a.deliver(a_room, &[bob.sender()], sent.clone()).await, "stored");
    let frame = tokio::time::timeout(TIMEOUT, bob.next_of(Opcode::Welcome)).await.expect("bob is welcomed");
    assert_eq!(frame.to_bytes().to_vec(), sent, "the frame exactly as the room's server sent it");
    assert_eq!(welcomes(&b, "received"), 2);
    fake_a.endpoint.close(quinn::VarInt::from_u32(0), b"");
    fake_c.endpoint.close(quinn::VarInt::from_u32(0), b"");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federation_welcome_refused_for_good_by_the_home_is_dropped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let Domains { a, b, .. } = Domains::start(dir.path()).await;
    let mut bob = TestClient::connect(&b, "bob", 2).await;
    bob.upload_key_packages(1).await;
    // The same room id on both sides: b orders its own room of that id.
    let room = RoomId([0x99; 16]);
    bob.create_room(room).await;
    let mut alice = TestClient::connect(&a, "alice", 1).await;
    let packages = claim_remote(&mut alice, &[bob.sender()]).await;
    alice.create_room(room).await;
    add_remote(&mut alice, &[bob.sender()], &packages).await;

    eventually("a drops the Welcome b refused for good", || welcomes(&a, "dropped") == 1).await;
    assert_eq!(refusals(&b, "local_room"), 1);
    eventually("a's copy is deleted", || pending(&a, bob.sender()) == 0).await;
    assert_eq!(pending(&b, bob.sender()), 0, "b stored nothing");
    assert_eq!(welcomes(&a, "forwarded"), 0);
    assert_eq!(b.running().remote_room_authority(room), None);
}
