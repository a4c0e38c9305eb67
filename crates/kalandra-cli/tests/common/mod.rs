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
use kalandra_server::connection::{ConnectionLimits, Listener, ShutdownPhase};
use kalandra_server::metrics::Metrics;
use kalandra_server::node::{Clock, Node, NodeLimits};
use kalandra_server::room_group::MlsRoomGroup;
use kalandra_server::store::group_commit::{GroupCommit, GroupCommitConfig};
use kalandra_server::store::{RedbStore, Store};
use kalandra_server::tls::{load_or_create_server_identity, quinn_server_config};
use tokio::sync::watch;

pub fn now_ms() -> u64 {
    u64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis()).unwrap()
}

pub struct Server {
    pub address: SocketAddr,
    pub fingerprint_hex: String,
    pub data_dir: PathBuf,
    store: Arc<dyn Store>,
    node: Node,
    stop: watch::Sender<ShutdownPhase>,
    serving: tokio::task::JoinHandle<()>,
    group_commit: GroupCommit,
}

impl Server {
    pub async fn start(data_dir: &Path) -> Server {
        Self::start_with_push(data_dir, None).await
    }

    /// A server that hands push notifications of members without a
    /// connection to `push`.
    pub async fn start_with_push(
        data_dir: &Path,
        push: Option<Arc<dyn kalandra_server::push::PushSink>>,
    ) -> Server {
        let store: Arc<dyn Store> = Arc::new(RedbStore::open(data_dir.join("kalandra.redb")).unwrap());
        let group_commit = GroupCommit::start(Arc::clone(&store), GroupCommitConfig::default()).unwrap();
        let identity = load_or_create_server_identity(data_dir, None, None).unwrap();
        let (server_key, _) = kalandra_server::server_key::load_or_create(data_dir, [42; 32]).unwrap();
        let clock: Clock = Arc::new(now_ms);
        let metrics = Metrics::new().unwrap();
        let limits = ConnectionLimits::default();
        let node = Node::start::<MlsRoomGroup>(
            Arc::clone(&store),
            group_commit.clone(),
            2,
            Arc::clone(&clock),
            metrics.clone(),
            NodeLimits {
                rooms_per_user_max: limits.rooms_per_user_max,
                push: push.map(kalandra_server::push::PushQueue::start),
                server_signer: Arc::new(kalandra_server::mls_state::ServerSigner::new(server_key.clone())),
            },
        )
        .await
        .unwrap();
        let endpoint = quinn::Endpoint::server(
            quinn_server_config(&identity, 30_000).unwrap(),
            "127.0.0.1:0".parse().unwrap(),
        )
        .unwrap();
        let address = endpoint.local_addr().unwrap();
        let listener = Listener::new(
            node.clone(),
            Arc::clone(&store),
            limits,
            clock,
            metrics,
            server_key.verifying_key().to_bytes(),
        );
        let (stop, stopped) = watch::channel(ShutdownPhase::Running);
        let serving = tokio::spawn(listener.serve(endpoint, stopped));
        Server {
            address,
            fingerprint_hex: identity.fingerprint_sha256_hex(),
            data_dir: data_dir.to_owned(),
            store,
            node,
            stop,
            serving,
            group_commit,
        }
    }

    /// The room core (the admin API acts on it).
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// How many Welcomes wait for `recipient` in the server's store.
    pub fn pending_welcomes(&self, recipient: kalandra_proto::SenderId) -> usize {
        self.store.pending_welcomes(recipient.0, None).unwrap().len()
    }

    pub async fn stop(self) {
        let _ = self.stop.send(ShutdownPhase::Draining);
        self.node.shutdown().await;
        let _ = self.stop.send(ShutdownPhase::Drained);
        let _ = self.serving.await;
        self.group_commit.shutdown().await.unwrap();
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
