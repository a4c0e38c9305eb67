//! Users of two domains in one room, each connected only to its own
//! server: two servers linked as federation peers on loopback, invited
//! with `kalandra invite --domain` and with `Client::invite_remote`, and
//! the typed errors of a claim that cannot go through.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use client_core::client::{ClientError, DomainName};
use common::{device, federation_key, free_address, kalandra, ok, peer, Server, FEDERATION_TIMEOUT};
use kalandra_proto::{ErrorCode, SenderId};

/// Federation key seeds of a.test and b.test.
const SEED_A: u8 = 0xa1;
const SEED_B: u8 = 0xb2;

/// a.test and b.test, linked; a.test also knows c.test, refused.
struct Domains {
    a: Server,
    b: Server,
    a_federation: SocketAddr,
    b_federation: SocketAddr,
}

impl Domains {
    async fn start(dir: &Path) -> Domains {
        let (a_federation, b_federation) = (free_address(), free_address());
        let a = Domains::start_a(dir, a_federation, b_federation).await;
        let b_dir = dir.join("b");
        let a_key = federation_key(&dir.join("a"), SEED_A);
        let b = Server::start_federated(
            &b_dir,
            "b.test",
            b_federation,
            vec![peer("a.test", Some(a_federation), &a_key)],
        )
        .await;
        a.linked("b.test").await;
        b.linked("a.test").await;
        Domains { a, b, a_federation, b_federation }
    }

    /// a.test, in `dir`/a.
    async fn start_a(dir: &Path, a_federation: SocketAddr, b_federation: SocketAddr) -> Server {
        let b_key = federation_key(&dir.join("b"), SEED_B);
        let mut refused = peer("c.test", None, &b_key);
        refused.keys.clear();
        refused.refused = true;
        Server::start_federated(
            &dir.join("a"),
            "a.test",
            a_federation,
            vec![peer("b.test", Some(b_federation), &b_key), refused],
        )
        .await
    }
}

async fn init(dir: &Path, server: &Server) -> String {
    let address = server.address.to_string();
    ok(dir, &["init", "--server", &address, "--fingerprint", &server.fingerprint_hex]).await.trim().to_owned()
}

/// The text entries of a `history` output (membership lines left out).
fn texts(history: &str) -> Vec<String> {
    history.lines().filter(|line| !line.contains("\t* ")).map(str::to_owned).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_users_of_two_domains_chat_in_one_room_each_through_its_own_server() {
    let dir = tempfile::tempdir().unwrap();
    let Domains { a, b, .. } = Domains::start(dir.path()).await;
    let (alice, bob) = (dir.path().join("alice"), dir.path().join("bob"));
    let alice_id = init(&alice, &a).await;
    let bob_id = init(&bob, &b).await;

    let room = ok(&alice, &["room", "create"]).await.trim().to_owned();
    // Without --domain, bob is looked for on a.test, where he has no key package.
    let output = kalandra(&alice, &["invite", "--room", &room, &bob_id]).await;
    assert_eq!(output.status.code(), Some(4), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("no key package"), "{output:?}");

    let invited = ok(&alice, &["invite", "--room", &room, "--domain", "b.test", &bob_id]).await;
    assert_eq!(invited.trim(), "epoch 1");
    let joined = ok(&bob, &["join", "--room", &room, "--wait-ms", "30000"]).await;
    assert!(joined.contains("epoch 1"), "{joined}");

    // Each checks the other's home itself, with its own server's keys.
    for (device, name) in [(&alice, "alice"), (&bob, "bob")] {
        let members = ok(device, &["room", "members", "--room", &room]).await;
        let line =
            |id: &str| members.lines().find(|line| line.starts_with(id)).unwrap_or_default().to_owned();
        assert!(line(&alice_id).contains("\ta.test\tcertified until"), "{name}: {members}");
        assert!(line(&bob_id).contains("\tb.test\tcertified until"), "{name}: {members}");
    }

    ok(&alice, &["send", "--room", &room, "hello from a.test"]).await;
    ok(&bob, &["send", "--room", &room, "hello from b.test"]).await;
    let alice_history = texts(&ok(&alice, &["history", "--room", &room]).await);
    let bob_history = texts(&ok(&bob, &["history", "--room", &room]).await);
    assert_eq!(alice_history.len(), 2, "{alice_history:?}");
    assert_eq!(alice_history, bob_history, "one order for both");
    assert!(alice_history[0].ends_with(&format!("{alice_id}\thello from a.test")), "{alice_history:?}");
    assert!(alice_history[1].ends_with(&format!("{bob_id}\thello from b.test")), "{alice_history:?}");
    // The Welcome b.test held for bob was read (and is no longer held).
    assert_eq!(b.pending_welcomes(SenderId(u64::from_str_radix(&bob_id, 16).unwrap())), 0);

    // A domain that is no peer of a.test, and a malformed one.
    let output = kalandra(&alice, &["invite", "--room", &room, "--domain", "x.test", &bob_id]).await;
    assert_eq!(output.status.code(), Some(4), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("unknown domain"), "{output:?}");
    let output = kalandra(&alice, &["invite", "--room", &room, "--domain", "B.Test", &bob_id]).await;
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("--domain"), "{output:?}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_invite_remote_adds_a_user_of_another_domain_and_says_which_claims_cannot_go_through() {
    let dir = tempfile::tempdir().unwrap();
    let Domains { a, b, .. } = Domains::start(dir.path()).await;
    let mut bob = device(&dir.path().join("bob"), 2, &b).await;
    let mut carol = device(&dir.path().join("carol"), 3, &b).await;
    let mut alice = device(&dir.path().join("alice"), 1, &a).await;
    let b_test = DomainName::parse("b.test").unwrap();

    let room = alice.create_room().await.unwrap();
    assert_eq!(alice.invite_remote(room, &b_test, &[bob.sender_id()]).await.unwrap(), 1);
    assert_eq!(bob.join(room, FEDERATION_TIMEOUT).await.unwrap(), 1);
    bob.send(room, b"from bob").await.unwrap();
    alice.sync(room).await.unwrap();
    let seen = alice.history(room, 0, 100).unwrap();
    assert!(
        seen.iter().any(|m| m.sender == bob.sender_id().0
            && matches!(&m.body, client_core::client::MessageBody::Text(t) if t == b"from bob")),
        "{seen:?}"
    );

    // Not a peer of a.test: final.
    let error = alice
        .invite_remote(room, &DomainName::parse("x.test").unwrap(), &[carol.sender_id()])
        .await
        .unwrap_err();
    assert!(matches!(error, ClientError::UnknownDomain { .. }), "{error:?}");
    assert_eq!(error.code(), Some(ErrorCode::UnknownDomain.to_u16()));
    assert!(!error.is_retryable());
    // A peer a.test refuses: final.
    let error = alice
        .invite_remote(room, &DomainName::parse("c.test").unwrap(), &[carol.sender_id()])
        .await
        .unwrap_err();
    assert!(matches!(error, ClientError::FederationRefused { .. }), "{error:?}");
    assert!(!error.is_retryable());

    // b.test down: retryable, and the room did not move.
    carol.disconnect().await;
    bob.disconnect().await;
    b.stop().await;
    let deadline = Instant::now() + FEDERATION_TIMEOUT;
    let error = loop {
        let error = alice.invite_remote(room, &b_test, &[carol.sender_id()]).await.unwrap_err();
        if matches!(error, ClientError::DomainUnreachable { .. }) || Instant::now() > deadline {
            break error;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(matches!(error, ClientError::DomainUnreachable { .. }), "{error:?}");
    assert!(error.is_retryable());
    assert!(!error.is_transient(), "this device's own connection is fine");
    assert_eq!(alice.rooms().iter().find(|r| r.room_id == room).map(|r| r.epoch), Some(1));
    alice.disconnect().await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_members_message_waits_in_the_outbox_while_the_rooms_domain_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let Domains { a, b, a_federation, b_federation } = Domains::start(dir.path()).await;
    let mut bob = device(&dir.path().join("bob"), 2, &b).await;
    let mut alice = device(&dir.path().join("alice"), 1, &a).await;
    let room = alice.create_room().await.unwrap();
    alice.invite_remote(room, &DomainName::parse("b.test").unwrap(), &[bob.sender_id()]).await.unwrap();
    bob.join(room, FEDERATION_TIMEOUT).await.unwrap();
    bob.send(room, b"before").await.unwrap();

    alice.disconnect().await;
    a.stop().await;
    b.unlinked("a.test").await;
    // b.test may end bob's connection as its link goes: the message waits
    // in the outbox as for any lost connection.
    let error = bob.send(room, b"while a.test is down").await.unwrap_err();
    assert!(error.is_retryable(), "{error:?}");
    if error.is_transient() {
        let failures = bob.connect().await.unwrap();
        assert!(
            failures.iter().all(|f| matches!(f.error, ClientError::DomainUnreachable { .. })),
            "{failures:?}"
        );
    }
    // Connected to b.test, a.test down: the room's domain is unreachable,
    // and the message waits in the outbox too.
    let error = bob.send(room, b"still down").await.unwrap_err();
    assert!(matches!(error, ClientError::DomainUnreachable { .. }), "{error:?}");
    assert!(error.is_retryable() && !error.is_transient());

    // The stopped server's links drain for a moment before its socket is free.
    let started = Instant::now();
    while std::net::UdpSocket::bind(a_federation).is_err() {
        assert!(started.elapsed() < FEDERATION_TIMEOUT, "a's federation socket stays bound");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let a = Domains::start_a(dir.path(), a_federation, b_federation).await;
    a.linked("b.test").await;
    b.linked("a.test").await;
    // Each waits out the retry time the refusal named, then goes.
    let deadline = Instant::now() + FEDERATION_TIMEOUT;
    let mut sent = 0;
    while sent < 2 {
        assert!(Instant::now() < deadline, "{sent} of the two waiting messages sent");
        sent += bob.flush_outbox().await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(sent, 2, "both messages waited in the outbox");

    // a.test came back on new client ports.
    alice.set_server(a.target()).unwrap();
    alice.connect().await.unwrap();
    alice.sync(room).await.unwrap();
    let texts: Vec<Vec<u8>> = alice
        .history(room, 0, 100)
        .unwrap()
        .into_iter()
        .filter_map(|m| match m.body {
            client_core::client::MessageBody::Text(text) => Some(text),
            _ => None,
        })
        .collect();
    let expected: Vec<Vec<u8>> =
        [&b"before"[..], b"while a.test is down", b"still down"].iter().map(|t| t.to_vec()).collect();
    assert_eq!(texts, expected);
    alice.disconnect().await;
    bob.disconnect().await;
    a.stop().await;
    b.stop().await;
}

/// Each member checks the other's home domain with its own server's keys:
/// alice (a.test) and bob (b.test) each find the other certified by its
/// domain, whatever the room's server says; a member of a domain its
/// server does not know shows as such.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_of_two_domains_each_check_the_others_home_certificate() {
    use client_core::client::HomeCheck;
    let dir = tempfile::tempdir().unwrap();
    let Domains { a, b, .. } = Domains::start(dir.path()).await;
    let mut bob = device(&dir.path().join("bob"), 2, &b).await;
    let mut alice = device(&dir.path().join("alice"), 1, &a).await;
    let room = alice.create_room().await.unwrap();
    alice.invite_remote(room, &DomainName::parse("b.test").unwrap(), &[bob.sender_id()]).await.unwrap();
    bob.join(room, FEDERATION_TIMEOUT).await.unwrap();

    let (a_id, b_id) = (alice.sender_id(), bob.sender_id());
    for (viewer, name) in [(&mut alice, "alice"), (&mut bob, "bob")] {
        let homes = viewer.member_homes(room).await.unwrap();
        assert_eq!(homes.len(), 2, "{name}: {homes:?}");
        let of =
            |sender: SenderId| homes.iter().find(|home| home.sender == Some(sender)).unwrap().home.clone();
        assert!(
            matches!(of(a_id), HomeCheck::Certified { domain, .. } if domain.as_str() == "a.test"),
            "{name}: {homes:?}"
        );
        assert!(
            matches!(of(b_id), HomeCheck::Certified { domain, .. } if domain.as_str() == "b.test"),
            "{name}: {homes:?}"
        );
    }
    a.stop().await;
    b.stop().await;
}

/// A domain rotates its federation key: while it lists the earlier key
/// (`previous_keys`), members' leaves certified under it stay certified,
/// and a device that connects renews its leaf's certificate under the new
/// key (a self-update); once the old key is no longer listed, a leaf not
/// renewed shows as invalid until its device connects and renews it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_key_rotation_devices_renew_their_leaves_certificates_on_connecting() {
    use client_core::client::{Client, HomeCheck};
    let dir = tempfile::tempdir().unwrap();
    let a_dir = dir.path().join("a");
    let old_key = federation_key(&a_dir, SEED_A);
    let a = Server::start_federated(&a_dir, "a.test", free_address(), Vec::new()).await;
    let mut alice = device(&dir.path().join("alice"), 1, &a).await;
    let mut bob = device(&dir.path().join("bob"), 2, &a).await;
    let room = alice.create_room().await.unwrap();
    alice.invite(room, &[bob.sender_id()]).await.unwrap();
    assert_eq!(bob.join(room, FEDERATION_TIMEOUT).await.unwrap(), 1);

    async fn homes(client: &mut Client, room: kalandra_proto::RoomId) -> Vec<HomeCheck> {
        client.member_homes(room).await.unwrap().into_iter().map(|member| member.home).collect()
    }
    fn all_certified(homes: &[HomeCheck]) -> bool {
        homes.len() == 2 && homes.iter().all(|home| matches!(home, HomeCheck::Certified { .. }))
    }
    assert!(all_certified(&homes(&mut alice, room).await));

    // The new key, the old one listed until an hour from now.
    alice.disconnect().await;
    bob.disconnect().await;
    a.stop().await;
    std::fs::remove_file(a_dir.join(kalandra_server::FEDERATION_KEY_FILE_NAME)).unwrap();
    let new_key = federation_key(&a_dir, 0xa3);
    assert_ne!(new_key, old_key);
    let now_ms = u64::try_from(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis(),
    )
    .unwrap();
    let previous =
        vec![kalandra_server::PeerKeyConfig { key: old_key, valid_until_ms: Some(now_ms + 3_600_000) }];
    let a = Server::start_federated_with(&a_dir, "a.test", free_address(), Vec::new(), previous).await;
    alice.set_server(a.target()).unwrap();
    assert!(alice.connect().await.unwrap().is_empty());
    assert_eq!(alice.rooms()[0].epoch, 2, "alice renewed her leaf under the new key on connecting");
    assert!(all_certified(&homes(&mut alice, room).await), "bob's under the earlier key, still listed");

    // The overlap over: only the new key.
    alice.disconnect().await;
    a.stop().await;
    let a = Server::start_federated(&a_dir, "a.test", free_address(), Vec::new()).await;
    alice.set_server(a.target()).unwrap();
    assert!(alice.connect().await.unwrap().is_empty());
    assert_eq!(alice.rooms()[0].epoch, 2, "nothing more to renew for alice");
    let seen = homes(&mut alice, room).await;
    assert_eq!(seen.iter().filter(|home| matches!(home, HomeCheck::Certified { .. })).count(), 1, "{seen:?}");
    assert!(
        seen.iter().any(|home| matches!(home, HomeCheck::Invalid { .. })),
        "bob's, under the old key: {seen:?}"
    );
    bob.set_server(a.target()).unwrap();
    assert!(bob.connect().await.unwrap().is_empty());
    assert_eq!(bob.rooms()[0].epoch, 3, "bob renewed his on connecting");
    alice.sync(room).await.unwrap();
    assert!(all_certified(&homes(&mut alice, room).await));
    a.stop().await;
}
