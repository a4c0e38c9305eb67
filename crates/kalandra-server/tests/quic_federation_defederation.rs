//! Defederation over real QUIC on loopback: three in-process servers of
//! domains a.test, b.test and c.test; a refuses b (`refused = true`). b's
//! attempts to link with a are refused with `refused_domain` and counted
//! at a, a never dials b, a's client claiming a b user's key package gets
//! `FederationRefused`, and b's client cannot claim a's users; c, which a
//! does not refuse, keeps its link and its claims working.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use common::{decode_ok, default_limits, error_code, TestClient, TestServer};
use ed25519_dalek::SigningKey;
use kalandra_proto::federation::DomainName;
use kalandra_proto::payload::{KeyPackageClaim, KeyPackageClaimed};
use kalandra_proto::{ErrorCode, SenderId};
use kalandra_server::{
    FederationConfig, FederationView, PeerConfig, PeerKeyConfig, FEDERATION_KEY_FILE_NAME,
};

const TIMEOUT: Duration = Duration::from_secs(60);
const SEED_A: u8 = 0xa1;
const SEED_B: u8 = 0xb2;
const SEED_C: u8 = 0xc3;

fn free_address() -> SocketAddr {
    let socket = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    socket.local_addr().unwrap()
}

fn peer(domain: &str, address: SocketAddr, seed: u8, refused: bool) -> PeerConfig {
    let key = hex::encode(SigningKey::from_bytes(&[seed; 32]).verifying_key().to_bytes());
    PeerConfig {
        domain: DomainName::parse(domain).unwrap(),
        address: Some(address.to_string()),
        keys: vec![PeerKeyConfig { key, valid_until_ms: None }],
        refused,
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

/// Waits until `check` holds of `server`'s federation view.
async fn wait_for(
    server: &TestServer,
    what: &str,
    check: impl Fn(&FederationView) -> bool,
) -> FederationView {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let view = server.running().federation_links().view();
        if check(&view) {
            return view;
        }
        assert!(Instant::now() < deadline, "{what}: {view:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn counter(server: &TestServer, name: &str, code: &str) -> u64 {
    let page = server.metrics.render().unwrap();
    let series = format!("{name}{{code=\"{code}\"}} ");
    page.lines().find_map(|line| line.strip_prefix(series.as_str())).unwrap().parse().unwrap()
}

async fn claim_at(client: &mut TestClient, domain: &str, users: &[SenderId]) -> kalandra_proto::Frame {
    let claim = KeyPackageClaim {
        sender_ids: users.iter().map(|user| user.0).collect(),
        domain: Some(DomainName::parse(domain).unwrap()),
    };
    client.request(&claim).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federation_refused_domain_is_neither_linked_nor_claimed_while_another_domain_stays_up() {
    let dir = tempfile::tempdir().unwrap();
    let (a_federation, b_federation, c_federation) = (free_address(), free_address(), free_address());
    let a_peers =
        vec![peer("b.test", b_federation, SEED_B, true), peer("c.test", c_federation, SEED_C, false)];
    let a = start(&dir.path().join("a"), "a.test", SEED_A, a_federation, a_peers).await;
    let a_peer = |refused| vec![peer("a.test", a_federation, SEED_A, refused)];
    let b = start(&dir.path().join("b"), "b.test", SEED_B, b_federation, a_peer(false)).await;
    let c = start(&dir.path().join("c"), "c.test", SEED_C, c_federation, a_peer(false)).await;

    // c links with a both ways; b's attempts are refused with the code.
    let connected = |domain: &'static str| {
        move |view: &FederationView| view.peers.iter().any(|peer| peer.domain == domain && peer.connected)
    };
    wait_for(&a, "a linked with c", connected("c.test")).await;
    wait_for(&c, "c linked with a", connected("a.test")).await;
    let b_view = wait_for(&b, "b refused by a", |view| {
        view.peers.iter().any(|peer| {
            peer.domain == "a.test"
                && peer.last_error.as_ref().is_some_and(|error| {
                    error.code == "refused_by_peer" && error.message.contains("refused_domain")
                })
        })
    })
    .await;
    let b_at_a = &b_view.peers[0];
    assert!(!b_at_a.connected && !b_at_a.refused, "b does not refuse a, a refuses b: {b_at_a:?}");
    assert!(counter(&a, "kalandra_federation_handshake_failures_total", "refused_domain") >= 1);
    let view = a.running().federation_links().view();
    let b_seen = view.peers.iter().find(|peer| peer.domain == "b.test").expect("b listed");
    assert!(b_seen.refused && !b_seen.connected, "{b_seen:?}");
    assert_eq!((b_seen.address.as_deref(), b_seen.dialed_up, b_seen.inbound_links), (None, false, 0));
    assert_eq!(b_seen.last_error.as_ref().map(|error| error.code.as_str()), Some("refused_domain"));
    let c_seen = view.peers.iter().find(|peer| peer.domain == "c.test").expect("c listed");
    assert!(!c_seen.refused && c_seen.connected, "{c_seen:?}");
    assert_eq!(b.running().federation_links().view().peers[0].inbound_links, 0, "a never dials b");

    // Claims towards b are refused, finally; towards c they work.
    let mut bob = TestClient::connect(&b, "bob", 2).await;
    assert_eq!(bob.upload_key_packages(1).await.available, 1);
    let mut carol = TestClient::connect(&c, "carol", 3).await;
    assert_eq!(carol.upload_key_packages(1).await.available, 1);
    let mut alice = TestClient::connect(&a, "alice", 1).await;
    assert_eq!(alice.upload_key_packages(1).await.available, 1);
    let reply = claim_at(&mut alice, "b.test", &[bob.sender()]).await;
    assert_eq!(error_code(&reply), ErrorCode::FederationRefused.to_u16(), "final, not DomainUnreachable");
    assert_eq!(counter(&a, "kalandra_federation_refusals_total", "refused_domain"), 1);
    let stock = b.store.count_key_packages(bob.sender().0).unwrap();
    assert_eq!(stock.ordinary, 1, "nothing taken from b");
    let reply = claim_at(&mut alice, "c.test", &[carol.sender()]).await;
    let answer: KeyPackageClaimed = decode_ok(&reply);
    assert!(answer.key_packages[0].key_package.is_some(), "carol's package, through c");

    // b cannot claim a's users: it has no link with a.
    let reply = claim_at(&mut bob, "a.test", &[alice.sender()]).await;
    assert_eq!(error_code(&reply), ErrorCode::DomainUnreachable.to_u16());
    let stock = a.store.count_key_packages(alice.sender().0).unwrap();
    assert_eq!(stock.ordinary, 1, "nothing taken from a");
}
