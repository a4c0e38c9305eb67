//! A real server on loopback (the library the `kalandra-server` binary runs,
//! started in-process) and helpers to run the `kalandra` binary against it.
#![allow(dead_code, missing_docs)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use client_core::client::{Client, ServerAddress, ServerTarget, ServerTrust};
use client_core::connection::parse_fingerprint;
use client_core::store::StoreKey;
use kalandra_server::Node;
use kalandra_server::{RunningServer, Server as ServerCore, StartOptions};
use kalandra_server::{Secret, ServerConfig};

pub fn now_ms() -> u64 {
    u64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis()).unwrap()
}

/// The admin API's operator token of every test server.
pub const ADMIN_TOKEN: &str = "cli-operator-token-000001";

pub struct Server {
    pub address: SocketAddr,
    pub fingerprint_hex: String,
    pub data_dir: PathBuf,
    running: RunningServer,
}

impl Server {
    pub async fn start(data_dir: &Path) -> Server {
        Self::start_with_push(data_dir, None).await
    }

    /// A server that hands push notifications of members without a
    /// connection to `push`.
    pub async fn start_with_push(
        data_dir: &Path,
        push: Option<Arc<dyn kalandra_server::PushSink>>,
    ) -> Server {
        let config = ServerConfig {
            data_dir: data_dir.to_owned(),
            listen: "127.0.0.1:0".parse().unwrap(),
            admin_listen: "127.0.0.1:0".parse().unwrap(),
            admin_token: Some(Secret(ADMIN_TOKEN.to_owned())),
            ..ServerConfig::default()
        };
        let options = StartOptions { shard_count: Some(2), clock: None, push_sink: push };
        let running = ServerCore::start_with(config, options).await.unwrap();
        Server {
            address: running.quic_address(),
            fingerprint_hex: running.fingerprint_hex().to_owned(),
            data_dir: data_dir.to_owned(),
            running,
        }
    }

    /// The room core (the admin API acts on it).
    pub fn node(&self) -> &Node {
        self.running.node()
    }

    /// The admin listener (its API takes [`ADMIN_TOKEN`]).
    pub fn admin_address(&self) -> SocketAddr {
        self.running.admin_address()
    }

    /// How many Welcomes wait for `recipient` in the server's store.
    pub fn pending_welcomes(&self, recipient: kalandra_proto::SenderId) -> usize {
        self.running.store().pending_welcomes(recipient.0, None).unwrap().len()
    }

    pub async fn stop(self) {
        self.running.shutdown().await.unwrap();
    }
}

/// Time a federation link or a cross-domain delivery may take in tests.
pub const FEDERATION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// A loopback UDP address free right now.
pub fn free_address() -> SocketAddr {
    let socket = std::net::UdpSocket::bind((std::net::Ipv4Addr::LOCALHOST, 0)).unwrap();
    socket.local_addr().unwrap()
}

/// The federation public key (64 hex digits) of the server in
/// `data_dir`, its key file created from `seed` if there is none.
pub fn federation_key(data_dir: &Path, seed: u8) -> String {
    std::fs::create_dir_all(data_dir).unwrap();
    let (key, _) = kalandra_server::load_or_create_federation_key(data_dir, [seed; 32]).unwrap();
    hex::encode(key.verifying_key().to_bytes())
}

/// The peer `domain` at `address` (none: it only dials us), with
/// federation public key `key` (hex).
pub fn peer(domain: &str, address: Option<SocketAddr>, key: &str) -> kalandra_server::PeerConfig {
    kalandra_server::PeerConfig {
        domain: kalandra_proto::federation::DomainName::parse(domain).unwrap(),
        address: address.map(|address| address.to_string()),
        keys: vec![kalandra_server::PeerKeyConfig { key: key.to_owned(), valid_until_ms: None }],
        refused: false,
    }
}

impl Server {
    /// The server of `domain`, linking on `federation` with `peers` (its
    /// federation key: the file in `data_dir`, see [`federation_key`]).
    pub async fn start_federated(
        data_dir: &Path,
        domain: &str,
        federation: SocketAddr,
        peers: Vec<kalandra_server::PeerConfig>,
    ) -> Server {
        Server::start_federated_with(data_dir, domain, federation, peers, Vec::new()).await
    }

    /// As [`Server::start_federated`], listing `previous_keys` as the
    /// domain's earlier federation keys.
    pub async fn start_federated_with(
        data_dir: &Path,
        domain: &str,
        federation: SocketAddr,
        peers: Vec<kalandra_server::PeerConfig>,
        previous_keys: Vec<kalandra_server::PeerKeyConfig>,
    ) -> Server {
        std::fs::create_dir_all(data_dir).unwrap();
        let config = ServerConfig {
            data_dir: data_dir.to_owned(),
            listen: "127.0.0.1:0".parse().unwrap(),
            admin_listen: "127.0.0.1:0".parse().unwrap(),
            admin_token: Some(Secret(ADMIN_TOKEN.to_owned())),
            domain: kalandra_proto::federation::DomainName::parse(domain).unwrap(),
            federation: kalandra_server::FederationConfig {
                listen: Some(federation),
                handshake_timeout_ms: 1_000,
                peers,
                previous_keys,
            },
            ..ServerConfig::default()
        };
        let options = StartOptions { shard_count: Some(2), clock: None, push_sink: None };
        let running = ServerCore::start_with(config, options).await.unwrap();
        Server {
            address: running.quic_address(),
            fingerprint_hex: running.fingerprint_hex().to_owned(),
            data_dir: data_dir.to_owned(),
            running,
        }
    }

    /// Waits until this server has a link with `peer` up.
    pub async fn linked(&self, peer: &str) {
        self.link_is(peer, true).await;
    }

    /// Waits until this server has no link with `peer` up.
    pub async fn unlinked(&self, peer: &str) {
        self.link_is(peer, false).await;
    }

    async fn link_is(&self, peer: &str, connected: bool) {
        let deadline = std::time::Instant::now() + FEDERATION_TIMEOUT;
        loop {
            let view = self.running.federation_links().view();
            if view.peers.iter().any(|view| view.domain == peer && view.connected == connected) {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "link with {peer} not {connected}: {view:#?}");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

/// Runs `kalandra --dir <dir> <args>` to completion (off the async runtime).
pub async fn kalandra(dir: &Path, args: &[&str]) -> Output {
    let dir = dir.to_owned();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_kalandra"))
            .arg("--dir")
            .arg(&dir)
            .args(&args)
            .env_remove("KALANDRA_STORE_KEY")
            .env_remove("KALANDRA_CLIENT_DIR")
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

/// Runs the command and returns its standard output; panics with its stderr if it failed.
pub async fn ok(dir: &Path, args: &[&str]) -> String {
    let output = kalandra(dir, args).await;
    assert!(
        output.status.success(),
        "kalandra {args:?} failed ({:?}): {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

impl Server {
    /// Where a device finds this server.
    pub fn target(&self) -> ServerTarget {
        ServerTarget {
            address: ServerAddress::parse(&self.address.to_string()).unwrap(),
            server_name: "localhost".into(),
            trust: ServerTrust::Fingerprint(parse_fingerprint(&self.fingerprint_hex).unwrap()),
        }
    }
}

/// The store key of test device `byte`.
pub fn key(byte: u8) -> StoreKey {
    StoreKey::from_bytes([byte; 32])
}

/// A new device in `dir`, connected to `server`.
pub async fn device(dir: &Path, byte: u8, server: &Server) -> Client {
    let mut client = Client::init(dir, &key(byte)).unwrap();
    client.set_server(server.target()).unwrap();
    client.connect().await.unwrap();
    client
}

/// The server's admin API on loopback, and the file holding its token.
pub struct Admin {
    pub address: SocketAddr,
    pub token_file: PathBuf,
}

/// Serves `server`'s admin API with operator token `token` (written to a
/// file in `dir`).
pub async fn start_admin(server: &Server, token: &str, dir: &Path) -> Admin {
    assert_eq!(token, ADMIN_TOKEN, "the test server's admin API takes ADMIN_TOKEN");
    let token_file = dir.join("admin-token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    Admin { address: server.admin_address(), token_file }
}

/// Runs `kalandra admin --url <admin> --token-file <file> <args>`.
pub async fn admin_at(address: SocketAddr, token_file: &Path, args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kalandra"));
    command
        .arg("admin")
        .arg("--url")
        .arg(format!("http://{address}"))
        .arg("--token-file")
        .arg(token_file)
        .args(args)
        .env_remove("KALANDRA_ADMIN_TOKEN")
        .env_remove("KALANDRA_ADMIN_URL");
    tokio::task::spawn_blocking(move || command.output().unwrap()).await.unwrap()
}

/// `kalandra admin <args>` that must succeed; its JSON answer.
pub async fn admin_ok_at(address: SocketAddr, token_file: &Path, args: &[&str]) -> serde_json::Value {
    let output = admin_at(address, token_file, args).await;
    assert!(
        output.status.success(),
        "kalandra admin {args:?} failed ({:?}): {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

impl Admin {
    /// `kalandra admin <args>`.
    pub async fn run(&self, args: &[&str]) -> Output {
        admin_at(self.address, &self.token_file, args).await
    }

    /// `kalandra admin <args>` that must succeed; its JSON answer.
    pub async fn ok(&self, args: &[&str]) -> serde_json::Value {
        admin_ok_at(self.address, &self.token_file, args).await
    }
}

/// Creates a device with `kalandra init` against `server`; its sender id.
pub async fn init_device(dir: &Path, server: &Server) -> String {
    let address = server.address.to_string();
    ok(dir, &["init", "--server", &address, "--fingerprint", &server.fingerprint_hex]).await.trim().to_owned()
}
