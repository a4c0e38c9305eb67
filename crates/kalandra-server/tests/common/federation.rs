//! Servers of several domains on loopback, linked as federation peers.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use kalandra_proto::federation::DomainName;
use kalandra_proto::payload::KeyPackageClaim;
use kalandra_proto::{Frame, SenderId};
use kalandra_server::{FederationConfig, PeerConfig, PeerKeyConfig, FEDERATION_KEY_FILE_NAME};

use super::{default_limits, TestClient, TestServer};

/// Time a link or a cross-domain delivery may take in these tests.
pub const FEDERATION_TIMEOUT: Duration = Duration::from_secs(60);
/// Federation key seed of a.test.
pub const SEED_A: u8 = 0xa1;
/// Federation key seed of b.test.
pub const SEED_B: u8 = 0xb2;
/// Federation key seed of c.test.
pub const SEED_C: u8 = 0xc3;

/// A loopback UDP address free right now.
pub fn free_address() -> SocketAddr {
    let socket = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    socket.local_addr().unwrap()
}

/// `domain` at `address`, with the federation key of `seed`.
pub fn peer(domain: &str, address: SocketAddr, seed: u8) -> PeerConfig {
    let key = hex::encode(SigningKey::from_bytes(&[seed; 32]).verifying_key().to_bytes());
    PeerConfig {
        domain: DomainName::parse(domain).unwrap(),
        address: Some(address.to_string()),
        keys: vec![PeerKeyConfig { key, valid_until_ms: None }],
        refused: false,
    }
}

/// The server of `domain` in `data_dir`, with the federation key of
/// `seed`, linking on `federation` with `peers`.
pub async fn start_domain(
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
pub async fn linked(server: &TestServer, peer: &str) {
    let deadline = Instant::now() + FEDERATION_TIMEOUT;
    loop {
        let view = server.running().federation_links().view();
        if view.peers.iter().any(|view| view.domain == peer && view.connected) {
            return;
        }
        assert!(Instant::now() < deadline, "no link with {peer}: {view:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value of the counter `name` with `label="value"` on `server`.
pub fn counter(server: &TestServer, name: &str, label: &str, value: &str) -> u64 {
    let page = server.metrics.render().unwrap();
    let series = format!("{name}{{{label}=\"{value}\"}} ");
    page.lines().find_map(|line| line.strip_prefix(series.as_str())).unwrap().parse().unwrap()
}

/// `client` claims one key package of each of `users` of `domain`.
pub async fn claim_at(client: &mut TestClient, domain: &str, users: &[SenderId]) -> Frame {
    let claim = KeyPackageClaim {
        sender_ids: users.iter().map(|user| user.0).collect(),
        domain: Some(DomainName::parse(domain).unwrap()),
    };
    client.request(&claim).await
}

/// Two linked domains, a.test and b.test, their data under one directory.
pub struct Domains {
    pub a: TestServer,
    pub b: TestServer,
    pub a_federation: SocketAddr,
    pub b_federation: SocketAddr,
}

impl Domains {
    /// Starts both and waits for their link.
    pub async fn start(dir: &Path) -> Domains {
        let (a_federation, b_federation) = (free_address(), free_address());
        let a = Domains::start_a(dir, a_federation, b_federation).await;
        let b = Domains::start_b(dir, b_federation, a_federation).await;
        linked(&a, "b.test").await;
        linked(&b, "a.test").await;
        Domains { a, b, a_federation, b_federation }
    }

    /// a.test, in `dir`/a.
    pub async fn start_a(dir: &Path, a_federation: SocketAddr, b_federation: SocketAddr) -> TestServer {
        start_domain(
            &dir.join("a"),
            "a.test",
            SEED_A,
            a_federation,
            vec![peer("b.test", b_federation, SEED_B)],
        )
        .await
    }

    /// b.test, in `dir`/b.
    pub async fn start_b(dir: &Path, b_federation: SocketAddr, a_federation: SocketAddr) -> TestServer {
        start_domain(
            &dir.join("b"),
            "b.test",
            SEED_B,
            b_federation,
            vec![peer("a.test", a_federation, SEED_A)],
        )
        .await
    }
}

/// a.test, b.test and c.test, each a peer of the other two (each dials
/// both), their data under `dir`; returns once every link is up.
pub async fn start_three_domains(dir: &Path) -> (TestServer, TestServer, TestServer) {
    let (fa, fb, fc) = (free_address(), free_address(), free_address());
    let a_peers = vec![peer("b.test", fb, SEED_B), peer("c.test", fc, SEED_C)];
    let a = start_domain(&dir.join("a"), "a.test", SEED_A, fa, a_peers).await;
    let b_peers = vec![peer("a.test", fa, SEED_A), peer("c.test", fc, SEED_C)];
    let b = start_domain(&dir.join("b"), "b.test", SEED_B, fb, b_peers).await;
    let c_peers = vec![peer("a.test", fa, SEED_A), peer("b.test", fb, SEED_B)];
    let c = start_domain(&dir.join("c"), "c.test", SEED_C, fc, c_peers).await;
    for (server, peers) in
        [(&a, ["b.test", "c.test"]), (&b, ["a.test", "c.test"]), (&c, ["a.test", "b.test"])]
    {
        for peer in peers {
            linked(server, peer).await;
        }
    }
    (a, b, c)
}

/// The responder's side of a link handshake as b.test (holding b's key)
/// with a.test: the streams of the established link.
pub async fn accept_link_as_b(
    connection: &quinn::Connection,
) -> Result<(quinn::SendStream, quinn::RecvStream), Box<dyn std::error::Error>> {
    use kalandra_proto::federation::{PeerKey, PeerKeys, LINK_TLS_EXPORTER_LABEL};
    use kalandra_server::federation_link as link;

    let (mut send, mut recv) = connection.accept_bi().await?;
    let mut binding = [0u8; 32];
    connection
        .export_keying_material(&mut binding, LINK_TLS_EXPORTER_LABEL, b"")
        .map_err(|_| "no exporter")?;
    let a_domain = DomainName::parse("a.test").unwrap();
    let a_key = PeerKey { key: SigningKey::from_bytes(&[SEED_A; 32]).verifying_key(), valid_until_ms: None };
    let peers: link::PeerTable =
        [(a_domain.clone(), PeerKeys::new(a_domain, vec![a_key]).unwrap())].into_iter().collect();
    let b_key = SigningKey::from_bytes(&[SEED_B; 32]);
    let mut handshake =
        link::LinkHandshake::responder(b_key, DomainName::parse("b.test").unwrap(), rand::random(), binding);
    loop {
        let mut prefix = [0u8; link::LINK_LENGTH_PREFIX_BYTES];
        recv.read_exact(&mut prefix).await?;
        let mut body = vec![0u8; link::body_len(prefix)?];
        recv.read_exact(&mut body).await?;
        match handshake.receive(link::decode(&body)?, &peers, super::now_ms())? {
            link::Step::Send(messages) => {
                for message in messages {
                    send.write_all(&link::encode(&message)).await?;
                }
            }
            link::Step::Established(established) => {
                for message in established.send {
                    send.write_all(&link::encode(&message)).await?;
                }
                return Ok((send, recv));
            }
        }
    }
}
