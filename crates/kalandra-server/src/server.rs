//! The composition root: [`Server::start`] assembles a running server from
//! a [`ServerConfig`] — the listeners bound first (so a configuration the
//! machine refuses creates nothing), then the store, recovery, the room
//! core, group commit, the admin HTTP and the QUIC listener — and
//! [`RunningServer`] drains it again. The binary, the in-process test
//! servers and the command-line tests all start the server through here.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin::api::{AdminApi, AdminState};
use crate::admin::http::{gauge_loop, serve_admin};
use crate::admin::metrics::{Metrics, MetricsError};
use crate::config::{load_or_create_admin_token, ConfigError, ServerConfig};
use crate::federation::directory::HomeDirectory;
use crate::federation::directory::RemoteDirectory;
use crate::federation::handshake::{PeerTable, RefusedDomains};
use crate::federation::links::FederationLinks;
use crate::federation::named_homes::NamedHomes;
use crate::federation::peers::{PeerKeysReload, SharedPeers};
use crate::federation::quic::{FederationTasks, LinkContext};
use crate::federation::registry::LinkRegistry;
use crate::federation::relay::{RelayAuthority, RelayHome};
use crate::federation::replica::{ReplicaFeeds, ReplicaFollower};
use crate::federation::rooms::RemoteRooms;
use crate::federation::welcomes::{WelcomeInbox, WelcomeRouter, WelcomesArrived, WELCOME_ROUTING_QUEUE_MAX};
use crate::node::erasure::{limits::RETENTION_INTERVAL_MS_DEFAULT, retention_loop};
use crate::node::push::{PushError, PushQueue, PushSink, WebhookSink};
use crate::node::{Clock, Node, NodeHealth, NodeLimits, RecoveryError, RemoteRoomSet};
use crate::protocol::session::HomeIssuer;
use crate::room::mls_state::ServerSigner;
use crate::room::room_group::MlsRoomGroup;
use crate::server_key::ServerKeyError;
use crate::store::group_commit::{self, GroupCommit, GroupCommitConfig, GroupCommitError};
use crate::store::redb::OpenError;
use crate::store::{RedbStore, Store};
use crate::transport::connection::{reached, Listener, ListenerFederation, ListenerHost, ShutdownPhase};
use crate::transport::tls::{
    bind_quic_socket, load_or_create_server_identity, quinn_server_config, quinn_server_endpoint_on,
    ServerTlsIdentity, TlsError,
};

/// Name of the database file inside the data directory.
pub const DATABASE_FILE_NAME: &str = "kalandra.redb";

/// Why a server did not start. Nothing is left running.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The admin HTTP address cannot be bound (in use, not local).
    #[error("binding admin HTTP on {address}")]
    AdminBind {
        /// The configured address.
        address: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The QUIC address cannot be bound.
    #[error("binding QUIC on {address}")]
    QuicBind {
        /// The configured address.
        address: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The TLS certificate or key does not load.
    #[error("loading the TLS certificate")]
    Tls(#[source] TlsError),
    /// The data directory cannot be created.
    #[error("creating data directory {}", path.display())]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The configured backup directory cannot be created.
    #[error("creating backup directory {}", path.display())]
    BackupDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The database does not open (damaged, in use, another schema).
    #[error("opening database {}", path.display())]
    OpenDatabase {
        /// The database file.
        path: PathBuf,
        /// Why.
        #[source]
        source: OpenError,
    },
    /// The group-commit writer does not start.
    #[error("starting the storage writer")]
    StorageWriter(#[source] group_commit::StartError),
    /// The server's signing key does not load.
    #[error("loading the server signing key")]
    ServerKey(#[source] ServerKeyError),
    /// The admin API token does not load.
    #[error("loading the admin API token")]
    AdminToken(#[source] ConfigError),
    /// The metrics registry cannot be built.
    #[error("setting up metrics")]
    Metrics(#[source] MetricsError),
    /// The push webhook is not usable.
    #[error("push webhook")]
    PushWebhook(#[source] PushError),
    /// Rooms cannot be recovered from storage.
    #[error("recovering rooms from storage")]
    Recovery(#[source] RecoveryError),
    /// The QUIC configuration cannot be built from the certificate.
    #[error("QUIC configuration")]
    QuicConfig(#[source] TlsError),
    /// The QUIC endpoint does not start.
    #[error("starting QUIC on {address}")]
    Quic {
        /// The configured address.
        address: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An address the operating system gave cannot be read back.
    #[error("reading the bound address")]
    LocalAddress(#[source] std::io::Error),
    /// The server-to-server QUIC address cannot be bound.
    #[error("binding the federation listener on {address}")]
    FederationBind {
        /// The configured address.
        address: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The federation key does not load.
    #[error("loading the federation key")]
    FederationKey(#[source] ServerKeyError),
    /// A configured peer's keys are not usable.
    #[error("federation peer {domain}: {reason}")]
    FederationPeer {
        /// The peer.
        domain: String,
        /// Why.
        reason: String,
    },
    /// The federation listener does not start.
    #[error("starting the federation listener")]
    Federation(#[source] TlsError),
}

impl StartError {
    /// Whether the configuration was refused (an address in use, a
    /// certificate or database that cannot be used as configured) before
    /// anything was changed.
    pub fn is_configuration(&self) -> bool {
        match self {
            StartError::AdminBind { .. }
            | StartError::QuicBind { .. }
            | StartError::FederationBind { .. }
            | StartError::FederationPeer { .. }
            | StartError::Tls(_)
            | StartError::BackupDir { .. } => true,
            StartError::OpenDatabase { source, .. } => {
                matches!(source, OpenError::InUse | OpenError::SchemaVersion { .. })
            }
            _ => false,
        }
    }

    /// Whether the database is damaged (restore it from a backup).
    pub fn is_damaged_database(&self) -> bool {
        matches!(self, StartError::OpenDatabase { source: OpenError::Damaged { .. }, .. })
    }
}

/// Why a drained server did not stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum ShutdownError {
    /// Flushing storage failed: what was acknowledged is durable, what
    /// was not may be lost.
    #[error("flushing storage")]
    Flush(#[source] GroupCommitError),
}

/// What may differ from the defaults of [`Server::start`]; production uses
/// [`StartOptions::default`].
#[derive(Default)]
pub struct StartOptions {
    /// Shards the rooms are spread over; default: one per available core.
    pub shard_count: Option<usize>,
    /// The clock the room core reads (ms since the Unix epoch); default:
    /// the wall clock.
    pub clock: Option<Clock>,
    /// Where push payloads of members without a connection go; default:
    /// the configured webhook, if any.
    pub push_sink: Option<Arc<dyn PushSink>>,
}

/// Starts servers.
pub struct Server;

impl Server {
    /// Starts a server as configured, with default [`StartOptions`].
    pub async fn start(config: ServerConfig) -> Result<RunningServer, StartError> {
        Server::start_with(config, StartOptions::default()).await
    }

    /// Starts a server as configured. Everything that can be refused
    /// (the listen addresses, a configured certificate) is checked before
    /// anything is created.
    pub async fn start_with(
        config: ServerConfig,
        options: StartOptions,
    ) -> Result<RunningServer, StartError> {
        let admin_listener = tokio::net::TcpListener::bind(config.admin_listen)
            .await
            .map_err(|source| StartError::AdminBind { address: config.admin_listen, source })?;
        let quic_socket = bind_quic_socket(config.listen)
            .map_err(|source| StartError::QuicBind { address: config.listen, source })?;
        let federation_socket = match config.federation.listen {
            Some(address) => Some(
                bind_quic_socket(address).map_err(|source| StartError::FederationBind { address, source })?,
            ),
            None => None,
        };
        peer_table(&config)?;
        if config.tls_cert_path.is_some() {
            load_identity(&config).map_err(StartError::Tls)?;
        }
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|source| StartError::DataDir { path: config.data_dir.clone(), source })?;
        if let Some(dir) = &config.backup_dir {
            crate::store::backup::prepare_backup_dir(dir)
                .map_err(|source| StartError::BackupDir { path: dir.clone(), source })?;
        }
        let database = config.data_dir.join(DATABASE_FILE_NAME);
        let store: Arc<dyn Store> = Arc::new(
            RedbStore::open(&database)
                .map_err(|source| StartError::OpenDatabase { path: database.clone(), source })?,
        );
        let group_commit = GroupCommit::start(Arc::clone(&store), GroupCommitConfig::default())
            .map_err(StartError::StorageWriter)?;
        let listeners = Listeners { admin: admin_listener, quic: quic_socket, federation: federation_socket };
        match assemble(config, options, store, group_commit.clone(), database, listeners).await {
            Ok(running) => Ok(running),
            Err(error) => {
                let _ = group_commit.shutdown().await;
                Err(error)
            }
        }
    }
}

/// The sockets bound before anything was created.
struct Listeners {
    admin: tokio::net::TcpListener,
    quic: std::net::UdpSocket,
    federation: Option<std::net::UdpSocket>,
}

/// The configured peers that are not refused and the keys accepted for each.
fn peer_table(config: &ServerConfig) -> Result<PeerTable, StartError> {
    configured_peers(config)
        .map_err(|ReloadKeysError::Peer { domain, reason }| StartError::FederationPeer { domain, reason })
}

fn configured_peers(config: &ServerConfig) -> Result<PeerTable, ReloadKeysError> {
    config
        .federation
        .peers
        .iter()
        .filter(|peer| !peer.refused)
        .map(|peer| {
            let keys = peer
                .peer_keys()
                .map_err(|reason| ReloadKeysError::Peer { domain: peer.domain.to_string(), reason })?;
            Ok((peer.domain.clone(), keys))
        })
        .collect()
}

/// Why the peers' keys were not reloaded (the keys in force stay).
#[derive(Debug, thiserror::Error)]
pub enum ReloadKeysError {
    /// A configured peer's keys are not usable (operator misuse).
    #[error("federation peer {domain}: {reason}")]
    Peer {
        /// The peer.
        domain: String,
        /// Why.
        reason: String,
    },
}

/// The peer domains the operator refuses.
fn refused_domains(config: &ServerConfig) -> RefusedDomains {
    config.federation.peers.iter().filter(|peer| peer.refused).map(|peer| peer.domain.clone()).collect()
}

/// Loads the keys, serves the admin HTTP (health at once, the API once the
/// rooms are recovered), recovers the rooms and starts the QUIC listener.
async fn assemble(
    config: ServerConfig,
    options: StartOptions,
    store: Arc<dyn Store>,
    group_commit: GroupCommit,
    database: PathBuf,
    listeners: Listeners,
) -> Result<RunningServer, StartError> {
    let keys = Keys::load(&config)?;
    let peers = SharedPeers::new(peer_table(&config)?);
    let refused = refused_domains(&config);
    let metrics = Metrics::new().map_err(StartError::Metrics)?;
    let admin_address = listeners.admin.local_addr().map_err(StartError::LocalAddress)?;
    let (stop, stopped) = watch::channel(ShutdownPhase::Running);
    let ready = Arc::new(AtomicBool::new(false));
    let admin_state = AdminState::new(metrics.clone(), Arc::clone(&ready));
    let admin_stop = {
        let mut stopped = stopped.clone();
        async move { reached(&mut stopped, ShutdownPhase::Drained).await }
    };
    let admin = tokio::spawn(serve_admin(listeners.admin, admin_state.clone(), admin_stop));

    let push = push_queue(&config, options.push_sink, &metrics)?;
    let clock = options.clock.unwrap_or_else(wall_clock);
    let shard_count =
        options.shard_count.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
    let remote_rooms = load_remote_rooms(&store).await?;
    let (welcome_routing, routed) = tokio::sync::mpsc::channel(WELCOME_ROUTING_QUEUE_MAX);
    let recovering = std::time::Instant::now();
    let node = Node::start::<MlsRoomGroup>(
        Arc::clone(&store),
        group_commit.clone(),
        shard_count,
        Arc::clone(&clock),
        metrics.clone(),
        NodeLimits {
            rooms_per_user_max: config.limits.rooms_per_user_max,
            push,
            server_signer: Arc::new(ServerSigner::new(keys.server_key.clone())),
            remote_rooms: Arc::clone(&remote_rooms) as Arc<dyn RemoteRoomSet>,
            welcome_routing: Some(welcome_routing.clone()),
        },
    )
    .await
    .map_err(StartError::Recovery)?;
    tracing::info!(
        elapsed_ms = u64::try_from(recovering.elapsed().as_millis()).unwrap_or(u64::MAX),
        "rooms recovered"
    );
    let federation_links = FederationLinks::new(
        config.domain.clone(),
        keys.federation_key.verifying_key().to_bytes(),
        config
            .federation
            .peers
            .iter()
            .filter(|peer| !peer.refused)
            .map(|peer| (peer.domain.clone(), peer.address.clone())),
        metrics.clone(),
        clock(),
    );
    federation_links.set_refused(refused.iter().cloned(), clock());
    let admin_read_token = config.admin_read_token.as_ref().map(|token| token.0.as_str());
    admin_state.set_api(
        AdminApi::new(node.clone(), &keys.admin_token, admin_read_token)
            .with_backup_dir(config.backup_dir.clone())
            .with_federation(federation_links.clone()),
    );

    let (endpoint, quic_address) = match quic_endpoint(&config, &keys.identity, listeners.quic) {
        Ok(started) => started,
        Err(error) => {
            node.shutdown().await;
            return Err(error);
        }
    };
    let server_public_key = keys.server_key.verifying_key().to_bytes();
    let registry = Arc::new(LinkRegistry::default());
    let named_homes = Arc::new(NamedHomes::default());
    let remote_directory = Arc::new(RemoteDirectory {
        domain: config.domain.clone(),
        peers: Arc::clone(&peers),
        refused: refused.clone(),
        registry: Arc::clone(&registry),
        clock: Arc::clone(&clock),
        metrics: metrics.clone(),
        store: Arc::clone(&store),
    });
    let relay_home = Arc::new(RelayHome::new(
        config.domain.clone(),
        keys.federation_key.clone(),
        Arc::clone(&registry),
        Arc::clone(&remote_rooms),
        Arc::clone(&clock),
        metrics.clone(),
    ));
    let replica_follower = Arc::new(ReplicaFollower::new(
        node.clone(),
        Arc::clone(&remote_rooms),
        Arc::clone(&registry),
        metrics.clone(),
    ));
    let replica_feeds = Arc::new(ReplicaFeeds::new(
        node.clone(),
        Arc::clone(&store),
        Arc::clone(&remote_rooms),
        metrics.clone(),
    ));
    let own_keys = config
        .federation
        .own_keys(&config.domain, keys.federation_key.verifying_key())
        .map_err(|reason| StartError::FederationPeer { domain: config.domain.to_string(), reason })?;
    let listener = Listener::new(
        node.clone(),
        Arc::clone(&store),
        config.limits.clone(),
        Arc::clone(&clock),
        metrics.clone(),
        server_public_key,
        ListenerFederation {
            directory: remote_directory,
            relay_home: Arc::clone(&relay_home),
            replicas: Arc::clone(&replica_follower),
            welcome_routing: Some(welcome_routing.clone()),
            named_homes: Arc::clone(&named_homes),
            home: HomeIssuer { domain: config.domain.clone(), key: Arc::new(keys.federation_key.clone()) },
            own_keys,
        },
    );
    let relay_authority = Arc::new(RelayAuthority::new(
        config.domain.clone(),
        Arc::clone(&peers),
        refused.clone(),
        Arc::new(ListenerHost(Arc::clone(&listener))),
        Arc::clone(&store),
        Arc::clone(&clock),
        metrics.clone(),
    ));
    let home = Arc::new(HomeDirectory {
        store: Arc::clone(&store),
        domain: config.domain.clone(),
        key: keys.federation_key.clone(),
        clock: Arc::clone(&clock),
        welcomes: WelcomeInbox {
            store: Arc::clone(&store),
            rooms: Arc::clone(&remote_rooms),
            metrics: metrics.clone(),
            arrived: welcomes_arrived(&node),
            clock: Arc::clone(&clock),
        },
        claim_rate: HomeDirectory::claim_rate(),
        metrics: metrics.clone(),
    });
    let router = WelcomeRouter {
        store: Arc::clone(&store),
        registry: Arc::clone(&registry),
        rooms: Arc::clone(&remote_rooms),
        metrics: metrics.clone(),
        refused: refused.clone(),
        named: named_homes,
    }
    .start(routed);
    let link_context = LinkContext {
        domain: config.domain.clone(),
        key: keys.federation_key.clone(),
        peers: Arc::clone(&peers),
        refused,
        links: federation_links.clone(),
        clock: Arc::clone(&clock),
        handshake_timeout_ms: config.federation.handshake_timeout_ms,
        registry,
        home,
        relay_home,
        relay_authority: Arc::clone(&relay_authority),
        replica_feeds,
        replica_follower: Arc::clone(&replica_follower),
    };
    let holding = Arc::clone(&replica_follower);
    tokio::spawn(async move { holding.load_held().await });
    let federation = match start_federation(&config, &keys.identity, listeners.federation, link_context) {
        Ok(federation) => federation,
        Err(error) => {
            endpoint.close(quinn::VarInt::from_u32(0), b"");
            node.shutdown().await;
            return Err(error);
        }
    };
    let serving = tokio::spawn(listener.serve(endpoint.clone(), stopped));
    let gauges = tokio::spawn(gauge_loop(node.clone(), metrics.clone(), database));
    let retention = tokio::spawn(retention_loop(node.clone(), RETENTION_INTERVAL_MS_DEFAULT));
    ready.store(true, Ordering::Release);
    let federation_address = federation.as_ref().map(|running| running.address);
    tracing::info!(%quic_address, %admin_address, data_dir = %config.data_dir.display(), "ready");
    Ok(RunningServer {
        fingerprint_hex: keys.identity.fingerprint_sha256_hex(),
        certificate_created: keys.identity.was_created(),
        server_public_key,
        server_key_created: keys.server_key_created,
        federation_public_key: keys.federation_key.verifying_key().to_bytes(),
        federation_key_created: keys.federation_key_created,
        federation_links,
        federation_address,
        federation,
        admin_token_file: keys.admin_token_file,
        quic_address,
        admin_address,
        config,
        store,
        group_commit,
        node,
        metrics,
        ready,
        endpoint,
        stop,
        serving,
        admin,
        background: [gauges, retention, router],
        remote_rooms,
        federation_peers: peers,
        relay_authority,
    })
}

/// The rooms other domains order, as the store records them.
async fn load_remote_rooms(store: &Arc<dyn Store>) -> Result<Arc<RemoteRooms>, StartError> {
    let loading = Arc::clone(store);
    let loaded = tokio::task::spawn_blocking(move || RemoteRooms::load(loading.as_ref()))
        .await
        .map_err(|error| StartError::Recovery(RecoveryError::Storage(error.to_string())))?;
    let rooms = loaded.map_err(|error| StartError::Recovery(RecoveryError::Storage(error.to_string())))?;
    Ok(Arc::new(rooms))
}

/// Hands peers' Welcomes just stored to their connected recipients (called
/// on a blocking thread: the delivery runs on the runtime).
fn welcomes_arrived(node: &Node) -> WelcomesArrived {
    let (node, runtime) = (node.clone(), tokio::runtime::Handle::current());
    Arc::new(move |recipients| {
        let node = node.clone();
        runtime.spawn(async move { node.deliver_welcomes_to(&recipients).await });
    })
}

/// The push queue: to the sink given, else to the configured webhook.
fn push_queue(
    config: &ServerConfig,
    sink: Option<Arc<dyn PushSink>>,
    metrics: &Metrics,
) -> Result<Option<PushQueue>, StartError> {
    let sink: Arc<dyn PushSink> = match (sink, &config.push_webhook_url) {
        (Some(sink), _) => sink,
        (None, Some(url)) => {
            let sink = WebhookSink::new(url).map_err(StartError::PushWebhook)?;
            tracing::info!(%url, "forwarding push payloads to the webhook");
            Arc::new(sink)
        }
        (None, None) => return Ok(None),
    };
    Ok(Some(PushQueue::start_counted(sink, Some(metrics.clone()))))
}

/// The QUIC endpoint on the bound socket, and its address.
fn quic_endpoint(
    config: &ServerConfig,
    identity: &ServerTlsIdentity,
    socket: std::net::UdpSocket,
) -> Result<(quinn::Endpoint, SocketAddr), StartError> {
    let server_config =
        quinn_server_config(identity, config.limits.idle_timeout_ms).map_err(StartError::QuicConfig)?;
    let endpoint = quinn_server_endpoint_on(server_config, socket)
        .map_err(|source| StartError::Quic { address: config.listen, source })?;
    let address = endpoint.local_addr().map_err(StartError::LocalAddress)?;
    Ok((endpoint, address))
}

/// The federation listener with its dialers.
struct RunningFederation {
    endpoint: quinn::Endpoint,
    address: SocketAddr,
    tasks: FederationTasks,
}

/// Serves server-to-server links on `socket` (if federation is on) and
/// dials the peers with an address.
fn start_federation(
    config: &ServerConfig,
    identity: &ServerTlsIdentity,
    socket: Option<std::net::UdpSocket>,
    context: LinkContext,
) -> Result<Option<RunningFederation>, StartError> {
    let Some(socket) = socket else { return Ok(None) };
    let bound = config.federation.listen.unwrap_or(config.listen);
    let server_config = crate::federation::quic::server_config(identity).map_err(StartError::Federation)?;
    let endpoint = quinn_server_endpoint_on(server_config, socket)
        .map_err(|source| StartError::FederationBind { address: bound, source })?;
    let address = endpoint.local_addr().map_err(StartError::LocalAddress)?;
    context.links.set_listen(address);
    let dial = config
        .federation
        .peers
        .iter()
        .filter(|peer| !peer.refused)
        .filter_map(|peer| Some((peer.domain.clone(), peer.address.clone()?)))
        .collect();
    let tasks =
        crate::federation::quic::start(context, endpoint.clone(), dial).map_err(StartError::Federation)?;
    tracing::info!(%address, domain = %config.domain, "federation listener up");
    Ok(Some(RunningFederation { endpoint, address, tasks }))
}

/// The TLS identity, the server's signing and federation keys and the admin token.
struct Keys {
    identity: ServerTlsIdentity,
    server_key: ed25519_dalek::SigningKey,
    server_key_created: bool,
    federation_key: ed25519_dalek::SigningKey,
    federation_key_created: bool,
    admin_token: String,
    admin_token_file: Option<PathBuf>,
}

impl Keys {
    fn load(config: &ServerConfig) -> Result<Keys, StartError> {
        let identity = load_identity(config).map_err(StartError::Tls)?;
        let fingerprint = identity.fingerprint_sha256_hex();
        tracing::info!(%fingerprint, "TLS certificate loaded");
        let (server_key, server_key_created) =
            crate::server_key::load_or_create(&config.data_dir, rand::random())
                .map_err(StartError::ServerKey)?;
        let (federation_key, federation_key_created) =
            crate::server_key::load_or_create_federation_key(&config.data_dir, rand::random())
                .map_err(StartError::FederationKey)?;
        tracing::info!(
            domain = %config.domain,
            federation_key = %hex::encode(federation_key.verifying_key().to_bytes()),
            "federation identity loaded"
        );
        let (admin_token, admin_token_file) =
            load_or_create_admin_token(&config.data_dir, config.admin_token.as_ref(), rand::random())
                .map_err(StartError::AdminToken)?;
        Ok(Keys {
            identity,
            server_key,
            server_key_created,
            federation_key,
            federation_key_created,
            admin_token: admin_token.0,
            admin_token_file,
        })
    }
}

/// A server that serves until [`RunningServer::shutdown`].
pub struct RunningServer {
    fingerprint_hex: String,
    certificate_created: bool,
    server_public_key: [u8; 32],
    server_key_created: bool,
    federation_public_key: [u8; 32],
    federation_key_created: bool,
    federation_links: FederationLinks,
    federation_address: Option<SocketAddr>,
    federation: Option<RunningFederation>,
    admin_token_file: Option<PathBuf>,
    quic_address: SocketAddr,
    admin_address: SocketAddr,
    config: ServerConfig,
    store: Arc<dyn Store>,
    group_commit: GroupCommit,
    node: Node,
    metrics: Metrics,
    ready: Arc<AtomicBool>,
    endpoint: quinn::Endpoint,
    stop: watch::Sender<ShutdownPhase>,
    serving: JoinHandle<()>,
    admin: JoinHandle<std::io::Result<()>>,
    background: [JoinHandle<()>; 3],
    /// The rooms other domains order.
    remote_rooms: Arc<RemoteRooms>,
    federation_peers: Arc<SharedPeers>,
    relay_authority: Arc<RelayAuthority>,
}

/// How a server stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped {
    /// The room core failed while serving (storage failed or a shard task
    /// panicked): restart to recover from durable state.
    pub core_failed: bool,
    /// Of those, a shard task panicked.
    pub shard_panicked: bool,
}

impl RunningServer {
    /// The QUIC address it listens on.
    pub fn quic_address(&self) -> SocketAddr {
        self.quic_address
    }

    /// The admin HTTP address it listens on.
    pub fn admin_address(&self) -> SocketAddr {
        self.admin_address
    }

    /// SHA-256 fingerprint of the certificate it serves, lowercase hex.
    pub fn fingerprint_hex(&self) -> &str {
        &self.fingerprint_hex
    }

    /// Whether the self-signed certificate was created at this start.
    pub fn certificate_created(&self) -> bool {
        self.certificate_created
    }

    /// The server's Ed25519 signing key (public half).
    pub fn server_public_key(&self) -> [u8; 32] {
        self.server_public_key
    }

    /// Whether the signing key was created at this start.
    pub fn server_key_created(&self) -> bool {
        self.server_key_created
    }

    /// The federation key (public half): what peer domains configure for this one.
    pub fn federation_public_key(&self) -> [u8; 32] {
        self.federation_public_key
    }

    /// Whether the federation key was created at this start.
    pub fn federation_key_created(&self) -> bool {
        self.federation_key_created
    }

    /// The server-to-server address it listens on, if federation is on.
    pub fn federation_address(&self) -> Option<SocketAddr> {
        self.federation_address
    }

    /// The per-peer link state.
    pub fn federation_links(&self) -> &FederationLinks {
        &self.federation_links
    }

    /// The domain recorded as ordering `room_id`, if it is another
    /// domain's room this server's users were welcomed to.
    pub fn remote_room_authority(
        &self,
        room_id: kalandra_proto::RoomId,
    ) -> Option<kalandra_proto::federation::DomainName> {
        self.remote_rooms.authority_of(room_id)
    }

    /// The file the admin token was read from or created in (`None`: it
    /// was configured).
    pub fn admin_token_file(&self) -> Option<&std::path::Path> {
        self.admin_token_file.as_deref()
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// The room core.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Whether the room core is healthy (storage has not failed).
    pub fn health(&self) -> &Arc<NodeHealth> {
        self.node.health()
    }

    /// Re-reads the certificate and key: new connections get them, open
    /// ones keep theirs. On error the old certificate stays in use.
    /// Returns the new fingerprint.
    pub fn reload_tls(&self) -> Result<String, TlsError> {
        let identity = load_identity(&self.config)?;
        let server_config = quinn_server_config(&identity, self.config.limits.idle_timeout_ms)?;
        self.endpoint.set_server_config(Some(server_config));
        Ok(identity.fingerprint_sha256_hex())
    }

    /// Takes the peers' keys from `config` again, without a restart (a
    /// peer rotated its federation key: the operator lists the new one).
    /// Only the keys of peers already configured change; peers added,
    /// removed, refused or accepted again are reported and take a restart.
    /// Links already up stay; each new handshake and relayed envelope is
    /// checked against the keys now in force.
    pub fn reload_federation_keys(&self, config: &ServerConfig) -> Result<PeerKeysReload, ReloadKeysError> {
        let reload = self.federation_peers.replace_keys(&configured_peers(config)?);
        if !reload.changed.is_empty() {
            self.relay_authority.peer_keys_replaced();
        }
        Ok(reload)
    }

    /// Drains and stops: stops accepting and reading, makes everything
    /// accepted durable and queues its acknowledgements, lets connections
    /// say goodbye (within the drain timeout), flushes storage.
    pub async fn shutdown(self) -> Result<Stopped, ShutdownError> {
        self.ready.store(false, Ordering::Release);
        let _ = self.stop.send(ShutdownPhase::Draining);
        let drain = Duration::from_millis(self.config.limits.drain_timeout_ms);
        if let Some(federation) = self.federation {
            federation.tasks.stop().await;
            federation.endpoint.close(quinn::VarInt::from_u32(0), b"shutting down");
            // Peers learn that the links closed (a connection still in its
            // handshake may take longer to drain: it is not waited for).
            let close_wait = Duration::from_millis(crate::federation::limits::CLOSE_WAIT_MS);
            let _ = tokio::time::timeout(close_wait, federation.endpoint.wait_idle()).await;
        }
        for task in &self.background {
            task.abort();
        }
        for task in self.background {
            // Cancelled: what it held (the room core, the store) is released.
            let _ = task.await;
        }
        self.node.shutdown().await;
        let _ = self.stop.send(ShutdownPhase::Drained);
        if tokio::time::timeout(drain, self.serving).await.is_err() {
            tracing::warn!("connections did not close within the drain timeout");
        }
        self.group_commit.shutdown().await.map_err(ShutdownError::Flush)?;
        let _ = tokio::time::timeout(drain, self.admin).await;
        let health = self.node.health();
        Ok(Stopped { core_failed: health.has_failed(), shard_panicked: health.shard_panicked() })
    }
}

/// The TLS identity the configuration names (created in the data directory
/// on first run when it names none).
fn load_identity(config: &ServerConfig) -> Result<ServerTlsIdentity, TlsError> {
    load_or_create_server_identity(
        &config.data_dir,
        config.tls_cert_path.as_deref(),
        config.tls_key_path.as_deref(),
    )
}

/// The wall clock, ms since the Unix epoch.
fn wall_clock() -> Clock {
    Arc::new(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    })
}
