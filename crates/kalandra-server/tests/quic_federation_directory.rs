//! The key-package directory across domains over real QUIC on loopback:
//! two in-process servers of domains a.test and b.test, linked; a client on
//! a claims key packages of a user of b through a's server, claim-once as
//! locally; a claim naming an unknown domain, or a domain whose server is
//! down, is refused with its typed error and counted, and works again once
//! the peer is back, with nothing already claimed lost or given twice; a
//! peer presenting another domain's user, a forged or an expired home
//! certificate, or not answering in time, is refused with its typed error
//! and counted, and its link goes on serving honest answers.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::federation::{
    accept_link_as_b, claim_at, counter, free_address, linked, peer, start_domain as start, Domains,
    FEDERATION_TIMEOUT, SEED_A, SEED_B,
};
use common::{decode_ok, error_code, TestClient, TestServer};
use ed25519_dalek::SigningKey;
use kalandra_proto::federation::DomainName;
use kalandra_proto::payload::KeyPackageClaimed;
use kalandra_proto::{ErrorCode, SenderId};

const TIMEOUT: Duration = FEDERATION_TIMEOUT;

fn refusals(server: &TestServer, code: &str) -> u64 {
    counter(server, "kalandra_federation_refusals_total", "code", code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federation_client_claims_a_remote_users_key_packages_once_each() {
    let dir = tempfile::tempdir().unwrap();
    let domains = Domains::start(dir.path()).await;
    let mut bob = TestClient::connect(&domains.b, "bob", 2).await;
    assert_eq!(bob.upload_key_packages(2).await.available, 2);
    let mut alice = TestClient::connect(&domains.a, "alice", 1).await;
    let nobody = SenderId(42);

    let mut claimed = Vec::new();
    for _ in 0..4 {
        let reply = claim_at(&mut alice, "b.test", &[bob.sender(), nobody]).await;
        let answer: KeyPackageClaimed = decode_ok(&reply);
        assert_eq!(answer.key_packages[0].sender_id, bob.sender().0);
        assert_eq!(answer.key_packages[1].key_package, None, "a user without packages, as locally");
        claimed.push(answer.key_packages[0].key_package.clone().expect("a key package of bob"));
    }
    assert_ne!(claimed[0], claimed[1], "each ordinary package is claimed once");
    assert!(!claimed[..2].contains(&claimed[2]), "then the last-resort package");
    assert_eq!(claimed[2], claimed[3], "the last-resort package is given again");
    let stock = domains.b.store.count_key_packages(bob.sender().0).unwrap();
    assert_eq!((stock.ordinary, stock.has_last_resort), (0, true), "b's own stock was taken from");

    // The claimed package makes bob a member of alice's room.
    alice.create_room(kalandra_proto::RoomId([7; 16])).await;
    let group = alice.group.as_mut().unwrap();
    group.add_members(&alice.provider, &alice.identity, &[claimed[0].as_slice()]).unwrap();
    assert_eq!(refusals(&domains.a, "foreign_user"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federation_claim_refusals_are_typed_and_the_claim_works_once_the_peer_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let Domains { a, b, b_federation, a_federation } = Domains::start(dir.path()).await;
    let mut bob = TestClient::connect(&b, "bob", 2).await;
    bob.upload_key_packages(1).await;
    let mut alice = TestClient::connect(&a, "alice", 1).await;

    let reply = claim_at(&mut alice, "c.test", &[bob.sender()]).await;
    assert_eq!(error_code(&reply), ErrorCode::UnknownDomain.to_u16(), "a domain that is not a peer");
    assert_eq!(refusals(&a, "unknown_domain"), 1);
    let reply = claim_at(&mut alice, "a.test", &[bob.sender()]).await;
    let own: KeyPackageClaimed = decode_ok(&reply);
    assert_eq!(own.key_packages[0].key_package, None, "naming its own domain claims locally");

    bob.disconnect().await;
    let b_data = b.stop().await;
    assert!(b_data.is_none(), "b's data stays in the test's directory");
    let reply = claim_at(&mut alice, "b.test", &[bob.sender()]).await;
    assert_eq!(error_code(&reply), ErrorCode::DomainUnreachable.to_u16(), "b is down: retry later");
    let error: kalandra_proto::payload::Error = reply.decode_payload().unwrap();
    assert!(error.retry_after_ms.is_some(), "and when: {error:?}");

    let b = Domains::start_b(dir.path(), b_federation, a_federation).await;
    linked(&a, "b.test").await;
    // The link state may show b's old link until a notices it is gone:
    // DomainUnreachable is retryable, so retry as a client would.
    let deadline = Instant::now() + TIMEOUT;
    let reply = loop {
        let reply = claim_at(&mut alice, "b.test", &[bob.sender()]).await;
        let unreachable = reply.opcode() == kalandra_proto::Opcode::Error
            && error_code(&reply) == ErrorCode::DomainUnreachable.to_u16();
        if !unreachable || Instant::now() > deadline {
            break reply;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let answer: KeyPackageClaimed = decode_ok(&reply);
    let first = answer.key_packages[0].key_package.clone().expect("bob's package, kept by b");
    let reply = claim_at(&mut alice, "b.test", &[bob.sender()]).await;
    let answer: KeyPackageClaimed = decode_ok(&reply);
    assert_ne!(answer.key_packages[0].key_package.as_ref(), Some(&first), "then the last-resort one");
    drop(b);
}

/// What the fake b.test answers to the n-th claim.
#[derive(Clone, Copy, Debug)]
enum Answer {
    /// carol's package, certified by c.test with c's own key.
    ForeignUser,
    /// carol's package, certified as b.test's with another key than b's.
    Forged,
    /// carol's package, certified by b.test, expired.
    Expired,
    /// carol's package, certified by b.test: what b may say.
    Honest,
    /// No answer at all.
    Silent,
}

/// A server that speaks for b.test (it holds b's federation key) and
/// answers claims as `answers` say, one after the other.
async fn fake_b(dir: &Path, listen: SocketAddr, carol: (Vec<u8>, [u8; 32]), answers: Vec<Answer>) {
    use kalandra_server::federation_link as link;

    let identity = kalandra_server::load_or_create_server_identity(dir, None, None).unwrap();
    let endpoint = quinn::Endpoint::server(link::server_config(&identity).unwrap(), listen).unwrap();
    let mut answers = answers.into_iter();
    // An attempt of a's may time out before this end is up: serve the next.
    while let Some(incoming) = endpoint.accept().await {
        let Ok(connection) = incoming.await else { continue };
        let _ = fake_link(&connection, &carol, &mut answers).await;
    }
}

/// One link of the fake b.test, until it fails.
async fn fake_link(
    connection: &quinn::Connection,
    carol: &(Vec<u8>, [u8; 32]),
    answers: &mut impl Iterator<Item = Answer>,
) -> Result<(), Box<dyn std::error::Error>> {
    use kalandra_proto::federation::HomeCertificate;
    use kalandra_server::federation_link as link;

    let (mut send, mut recv) = accept_link_as_b(connection).await?;
    let b_key = SigningKey::from_bytes(&[SEED_B; 32]);
    let b_domain = DomainName::parse("b.test").unwrap();
    let (package, carol_key) = (&carol.0, carol.1);
    loop {
        let mut prefix = [0u8; link::LINK_ESTABLISHED_LENGTH_PREFIX_BYTES];
        recv.read_exact(&mut prefix).await?;
        let mut body = vec![0u8; link::established_body_len(prefix)?];
        recv.read_exact(&mut body).await?;
        let reply = match link::decode_established(&body)? {
            link::LinkMessage::Ping { sequence } => link::LinkMessage::Pong { sequence },
            link::LinkMessage::Request {
                id,
                request: link::LinkRequest::ClaimKeyPackages { sender_ids },
            } => {
                let now_ms = common::now_ms();
                let valid_ms = now_ms + 3_600_000;
                let answer = answers.next().unwrap();
                if matches!(answer, Answer::Silent) {
                    continue;
                }
                let certificate = match answer {
                    Answer::Silent => unreachable!("not answered"),
                    Answer::ForeignUser => HomeCertificate::issue(
                        &SigningKey::from_bytes(&[0xc3; 32]),
                        DomainName::parse("c.test").unwrap(),
                        carol_key,
                        valid_ms,
                    ),
                    Answer::Forged => HomeCertificate::issue(
                        &SigningKey::from_bytes(&[0xee; 32]),
                        b_domain.clone(),
                        carol_key,
                        valid_ms,
                    ),
                    Answer::Expired => {
                        HomeCertificate::issue(&b_key, b_domain.clone(), carol_key, now_ms - 1)
                    }
                    Answer::Honest => HomeCertificate::issue(&b_key, b_domain.clone(), carol_key, valid_ms),
                };
                let entry = link::RemoteKeyPackage {
                    sender_id: sender_ids[0],
                    key_package: Some(package.clone()),
                    home_certificate: Some(certificate),
                };
                link::LinkMessage::Response {
                    id,
                    response: link::LinkResponse::Claimed { key_packages: vec![entry] },
                }
            }
            other => panic!("unexpected {other:?}"),
        };
        send.write_all(&link::encode_established(&reply).unwrap()).await?;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federation_answers_for_another_domains_user_or_with_bad_certificates_are_refused_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let b_federation = free_address();
    let a = start(
        &dir.path().join("a"),
        "a.test",
        SEED_A,
        free_address(),
        vec![peer("b.test", b_federation, SEED_B)],
    )
    .await;
    // carol: a user whose package the fake b presents.
    let provider = client_core::mls::MlsProvider::from_seed([3; 32]);
    let identity = client_core::mls::Identity::generate(&provider).unwrap();
    let package = client_core::mls::generate_key_packages(&provider, &identity, 1, common::now_ms() / 1000)
        .unwrap()
        .remove(0)
        .message;
    let carol_key = *identity.public_key();
    let carol = SenderId::from_identity_key(&carol_key);
    let answers = vec![Answer::ForeignUser, Answer::Forged, Answer::Expired, Answer::Silent, Answer::Honest];
    let fake_dir = dir.path().join("fake-b");
    std::fs::create_dir_all(&fake_dir).unwrap();
    let fake =
        tokio::spawn(async move { fake_b(&fake_dir, b_federation, (package, carol_key), answers).await });
    linked(&a, "b.test").await;
    let mut alice = TestClient::connect(&a, "alice", 1).await;

    for (what, code) in [
        ("a user certified by another domain", "foreign_user"),
        ("a certificate not signed by b", "bad_home_certificate"),
        ("an expired certificate", "bad_home_certificate"),
    ] {
        let before = refusals(&a, code);
        let reply = claim_at(&mut alice, "b.test", &[carol]).await;
        assert_eq!(error_code(&reply), ErrorCode::FederationRefused.to_u16(), "{what}");
        assert_eq!(refusals(&a, code), before + 1, "{what} is counted");
    }
    let reply = claim_at(&mut alice, "b.test", &[carol]).await;
    assert_eq!(error_code(&reply), ErrorCode::DomainUnreachable.to_u16(), "no answer in time: retry");
    let reply = claim_at(&mut alice, "b.test", &[carol]).await;
    let answer: KeyPackageClaimed = decode_ok(&reply);
    assert!(answer.key_packages[0].key_package.is_some(), "the link still serves b's honest answers");
    fake.abort();
}
