//! Server-to-server links over real QUIC on loopback: two in-process
//! servers of different domains link up and keep their link alive; peers
//! with a key not configured, a key past its overlap, another domain than
//! the one dialed or another domain than configured, and a client speaking
//! the server-to-server ALPN without a proof are refused with their typed
//! error and counted while the good link stays up; a peer rotates its key
//! within the overlap and the other side accepts it without a restart.

mod process;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use kalandra_proto::federation::DomainName;
use kalandra_server::{
    federation_client_config, FederationConfig, FederationView, PeerConfig, PeerKeyConfig, PeerLinkView,
    RunningServer, Secret, Server, ServerConfig, StartOptions, FEDERATION_KEY_FILE_NAME,
};

const TIMEOUT: Duration = Duration::from_secs(30);
const HANDSHAKE_TIMEOUT_MS: u64 = 1_000;
const ADMIN_TOKEN: &str = "operator-token-for-federation-01";

fn key_hex(seed: u8) -> String {
    hex::encode(SigningKey::from_bytes(&[seed; 32]).verifying_key().to_bytes())
}

/// A loopback UDP address no one is bound to right now.
fn free_address() -> SocketAddr {
    let socket = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    socket.local_addr().unwrap()
}

fn peer(domain: &str, address: Option<SocketAddr>, keys: &[(u8, Option<u64>)]) -> PeerConfig {
    PeerConfig {
        domain: DomainName::parse(domain).unwrap(),
        address: address.map(|address| address.to_string()),
        keys: keys
            .iter()
            .map(|(seed, valid_until_ms)| PeerKeyConfig {
                key: key_hex(*seed),
                valid_until_ms: *valid_until_ms,
            })
            .collect(),
        refused: false,
    }
}

/// Starts the server of `domain` in `data_dir`, its federation key made
/// from `seed` (the file is replaced), linking on `federation` with `peers`.
async fn start(
    data_dir: &Path,
    domain: &str,
    seed: u8,
    federation: SocketAddr,
    peers: Vec<PeerConfig>,
) -> RunningServer {
    std::fs::create_dir_all(data_dir).unwrap();
    std::fs::write(data_dir.join(FEDERATION_KEY_FILE_NAME), [seed; 32]).unwrap();
    let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let config = ServerConfig {
        data_dir: data_dir.to_owned(),
        listen: loopback,
        admin_listen: loopback,
        domain: DomainName::parse(domain).unwrap(),
        admin_token: Some(Secret(ADMIN_TOKEN.to_owned())),
        federation: FederationConfig {
            listen: Some(federation),
            handshake_timeout_ms: HANDSHAKE_TIMEOUT_MS,
            peers,
            ..Default::default()
        },
        ..ServerConfig::default()
    };
    config.validate().unwrap();
    // A restarted server's address may take a moment to be released.
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let options = StartOptions { shard_count: Some(1), ..StartOptions::default() };
        match Server::start_with(config.clone(), options).await {
            Ok(server) => return server,
            Err(error) if error.is_configuration() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => panic!("starting {domain}: {error:?}"),
        }
    }
}

fn peer_view<'a>(view: &'a FederationView, domain: &str) -> &'a PeerLinkView {
    view.peers.iter().find(|peer| peer.domain == domain).unwrap()
}

/// Waits until `check` holds of `server`'s federation view.
async fn wait_for(
    server: &RunningServer,
    what: &str,
    check: impl Fn(&FederationView) -> bool,
) -> FederationView {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let view = server.federation_links().view();
        if check(&view) {
            return view;
        }
        assert!(Instant::now() < deadline, "{what}: {view:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn failures(server: &RunningServer, code: &str) -> u64 {
    let page = server.metrics().render().unwrap();
    let series = format!("kalandra_federation_handshake_failures_total{{code=\"{code}\"}} ");
    page.lines().find_map(|line| line.strip_prefix(series.as_str())).unwrap().parse().unwrap()
}

fn linked_both_ways(peer: &PeerLinkView) -> bool {
    peer.connected && peer.dialed_up && peer.inbound_links >= 1
}

/// Connects to `address` with the server-to-server ALPN and sends `bytes`
/// (none: opens nothing) instead of a hello; returns the close reason.
async fn speak_without_proof(address: SocketAddr, bytes: &[u8]) -> String {
    let mut endpoint = quinn::Endpoint::client(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).unwrap();
    endpoint.set_default_client_config(federation_client_config().unwrap());
    let connection = endpoint.connect(address, "a.test").unwrap().await.unwrap();
    if !bytes.is_empty() {
        let (mut send, _recv) = connection.open_bi().await.unwrap();
        send.write_all(bytes).await.unwrap();
    }
    let reason = match tokio::time::timeout(TIMEOUT, connection.closed()).await.unwrap() {
        quinn::ConnectionError::ApplicationClosed(close) => {
            String::from_utf8_lossy(&close.reason).into_owned()
        }
        other => other.to_string(),
    };
    endpoint.close(quinn::VarInt::from_u32(0), b"");
    reason
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federation_links_up_and_refuses_bad_peers_while_the_good_link_stays_up() {
    let dir = tempfile::tempdir().unwrap();
    let (a_address, b_address) = (free_address(), free_address());
    let a_peers = vec![
        peer("b.test", Some(b_address), &[(2, None)]),
        // Its only key's acceptance ended long ago.
        peer("c.test", None, &[(3, Some(1))]),
        // Configured at B's address: the server there is b.test.
        peer("d.test", Some(b_address), &[(4, None)]),
    ];
    let a = start(&dir.path().join("a"), "a.test", 1, a_address, a_peers).await;
    let b = start(
        &dir.path().join("b"),
        "b.test",
        2,
        b_address,
        vec![peer("a.test", Some(a_address), &[(1, None)])],
    )
    .await;

    let view = wait_for(&a, "a linked with b", |view| linked_both_ways(peer_view(view, "b.test"))).await;
    assert_eq!(view.domain, "a.test");
    assert_eq!(view.public_key, key_hex(1));
    assert_eq!(peer_view(&view, "b.test").proven_key.as_deref(), Some(key_hex(2).as_str()));
    let view = wait_for(&b, "b linked with a", |view| linked_both_ways(peer_view(view, "a.test"))).await;
    assert_eq!(peer_view(&view, "a.test").proven_key.as_deref(), Some(key_hex(1).as_str()));
    let linked_since = peer_view(&a.federation_links().view(), "b.test").since_ms;

    // A server claiming b.test with a key A does not know for it.
    let impostor = start(
        &dir.path().join("impostor"),
        "b.test",
        9,
        free_address(),
        vec![peer("a.test", Some(a_address), &[(1, None)])],
    )
    .await;
    // c.test with the key whose overlap is over.
    let c = start(
        &dir.path().join("c"),
        "c.test",
        3,
        free_address(),
        vec![peer("a.test", Some(a_address), &[(1, None)])],
    )
    .await;
    // A domain A has no peer entry for.
    let x = start(
        &dir.path().join("x"),
        "x.test",
        5,
        free_address(),
        vec![peer("a.test", Some(a_address), &[(1, None)])],
    )
    .await;

    let view = wait_for(&impostor, "the impostor refused", |view| {
        peer_view(view, "a.test")
            .last_error
            .as_ref()
            .is_some_and(|error| error.message.contains("key_not_accepted"))
    })
    .await;
    assert!(!peer_view(&view, "a.test").connected);
    wait_for(&c, "c refused", |view| {
        peer_view(view, "a.test").last_error.as_ref().is_some_and(|error| error.code == "refused_by_peer")
    })
    .await;
    wait_for(&x, "x refused", |view| {
        peer_view(view, "a.test")
            .last_error
            .as_ref()
            .is_some_and(|error| error.message.contains("unknown_domain"))
    })
    .await;
    let view = wait_for(&a, "a refused d's stand-in and c's expired key", |view| {
        let code = |domain| peer_view(view, domain).last_error.as_ref().map(|error| error.code.clone());
        code("d.test").as_deref() == Some("wrong_domain")
            && code("c.test").as_deref() == Some("key_not_accepted")
    })
    .await;
    assert!(!peer_view(&view, "c.test").connected && !peer_view(&view, "d.test").connected);

    // A client speaking the server-to-server ALPN: garbage, then silence.
    assert_eq!(speak_without_proof(a_address, b"\x00\x04junk").await, "malformed");
    assert_eq!(speak_without_proof(a_address, b"").await, "timeout");

    for code in ["key_not_accepted", "unknown_domain", "wrong_domain", "malformed", "timeout"] {
        assert!(failures(&a, code) >= 1, "{code} is counted");
    }
    assert!(failures(&a, "key_not_accepted") >= 2, "the impostor's key and c's expired key");

    // The good link never dropped, and keeps exchanging keepalives.
    let before = peer_view(&a.federation_links().view(), "b.test").keepalives;
    let view =
        wait_for(&a, "keepalives with b", |view| peer_view(view, "b.test").keepalives >= before + 2).await;
    let b_link = peer_view(&view, "b.test");
    assert!(linked_both_ways(b_link));
    assert_eq!(b_link.since_ms, linked_since, "the link with b never went down");
    let page = a.metrics().render().unwrap();
    assert!(page.contains("kalandra_federation_link_up{peer=\"b.test\"} 1\n"), "{page}");
    assert!(page.contains("kalandra_federation_link_up{peer=\"c.test\"} 0\n"), "{page}");

    // The admin API shows the same.
    let admin = a.admin_address();
    let (status, _, body) = tokio::task::spawn_blocking(move || {
        process::http_get(admin, "/v1/federation", &[("Authorization", &format!("Bearer {ADMIN_TOKEN}"))])
    })
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let shown: FederationView = serde_json::from_str(&body).unwrap();
    assert_eq!(shown.listen, Some(a_address.to_string()));
    assert!(peer_view(&shown, "b.test").connected);
    assert_eq!(
        peer_view(&shown, "d.test").last_error.as_ref().map(|e| e.code.as_str()),
        Some("wrong_domain")
    );

    for server in [impostor, c, x, b, a] {
        server.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federation_key_rotation_within_the_overlap_needs_no_restart_of_the_other_side() {
    let dir = tempfile::tempdir().unwrap();
    let (a_address, b_address) = (free_address(), free_address());
    let (old_key, new_key) = (2, 12);
    let far_future_ms = u64::MAX / 2;
    let a_peers = vec![peer("b.test", Some(b_address), &[(old_key, Some(far_future_ms)), (new_key, None)])];
    let a = start(&dir.path().join("a"), "a.test", 1, a_address, a_peers).await;
    let b_peers = || vec![peer("a.test", Some(a_address), &[(1, None)])];
    let b = start(&dir.path().join("b"), "b.test", old_key, b_address, b_peers()).await;
    wait_for(&a, "linked with b's old key", |view| {
        let b = peer_view(view, "b.test");
        linked_both_ways(b) && b.proven_key.as_deref() == Some(key_hex(old_key).as_str())
    })
    .await;

    // B switches to its new key (and restarts to load it); A keeps running.
    b.shutdown().await.unwrap();
    let b = start(&dir.path().join("b"), "b.test", new_key, b_address, b_peers()).await;
    assert_eq!(b.federation_public_key().to_vec(), hex::decode(key_hex(new_key)).unwrap());
    wait_for(&a, "linked again with b's new key", |view| {
        let b = peer_view(view, "b.test");
        linked_both_ways(b) && b.proven_key.as_deref() == Some(key_hex(new_key).as_str())
    })
    .await;
    wait_for(&b, "b linked with a", |view| linked_both_ways(peer_view(view, "a.test"))).await;
    b.shutdown().await.unwrap();
    a.shutdown().await.unwrap();
}

/// b's operator switched b to a key a's configuration does not list yet:
/// a's operator adds it and reloads (what SIGHUP does), and the link comes
/// up without a restart of a. A peer the new configuration adds is
/// reported, not applied; a configuration with an unusable key changes
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federation_a_peers_new_key_is_taken_on_reload_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let a_address = free_address();
    let a =
        start(&dir.path().join("a"), "a.test", 1, a_address, vec![peer("b.test", None, &[(2, None)])]).await;
    let a_peers = vec![peer("a.test", Some(a_address), &[(1, None)])];
    let b = start(&dir.path().join("b"), "b.test", 12, free_address(), a_peers).await;
    wait_for(&a, "b's new key refused", |view| {
        peer_view(view, "b.test").last_error.as_ref().is_some_and(|error| error.code == "key_not_accepted")
    })
    .await;
    assert!(!peer_view(&a.federation_links().view(), "b.test").connected);

    let mut config = a.config().clone();
    config.federation.peers =
        vec![peer("b.test", None, &[(2, Some(1)), (12, None)]), peer("n.test", None, &[(13, None)])];
    let reload = a.reload_federation_keys(&config).unwrap();
    let domain = |name: &str| DomainName::parse(name).unwrap();
    assert_eq!((reload.changed, reload.not_applied), (vec![domain("b.test")], vec![domain("n.test")]));
    let view =
        wait_for(&a, "linked with b under its new key", |view| peer_view(view, "b.test").connected).await;
    assert_eq!(peer_view(&view, "b.test").proven_key.as_deref(), Some(key_hex(12).as_str()));

    let mut unusable = peer("b.test", None, &[(12, None)]);
    unusable.keys[0].key = "not a key".to_owned();
    config.federation.peers = vec![unusable];
    assert!(a.reload_federation_keys(&config).is_err(), "an unusable key is refused");
    let view = a.federation_links().view();
    assert!(peer_view(&view, "b.test").connected, "the keys in force stay");
    drop(b);
}
