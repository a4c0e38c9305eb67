//! Server configuration: defaults, the TOML file, environment variables and
//! command-line flags.
//!
//! Precedence, highest first: command-line flag, environment variable,
//! configuration file, default. Every default is a named constant below; the
//! documented example file (`deploy/kalandra.example.toml`, which the
//! tests parse) spells them all out. Relative paths are relative to the
//! working directory of the process.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};

use kalandra_proto::federation::{DomainName, PeerKey, PeerKeys};
use kalandra_proto::limits::{CONTROL_PAYLOAD_BYTES_MAX, PAYLOAD_BYTES_MAX};

use crate::admin::api::{ADMIN_TOKEN_CHARS_MAX, ADMIN_TOKEN_CHARS_MIN};
use serde::Deserialize;
use tracing_subscriber::filter::Targets;

/// Default data directory (database and self-signed TLS identity).
pub const DATA_DIR_DEFAULT: &str = "./kalandra-data";
/// Default QUIC port.
pub const LISTEN_PORT_DEFAULT: u16 = 4433;
/// Default QUIC address: loopback only.
pub const LISTEN_DEFAULT: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, LISTEN_PORT_DEFAULT));
/// Default admin HTTP port.
pub const ADMIN_LISTEN_PORT_DEFAULT: u16 = 9090;
/// Default admin HTTP address: loopback only (health and metrics have no
/// authentication, and the admin API's token travels in plain HTTP).
pub const ADMIN_LISTEN_DEFAULT: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, ADMIN_LISTEN_PORT_DEFAULT));
/// Default log format.
pub const LOG_FORMAT_DEFAULT: LogFormat = LogFormat::Text;
/// Default log filter (`target=level` directives, comma-separated, see [`parse_log_filter`]).
pub const LOG_FILTER_DEFAULT: &str = "info";

/// Default domain name of the server (its federation identity).
pub const DOMAIN_DEFAULT: &str = "localhost";
/// Default time a peer domain has to complete the link handshake.
pub const FEDERATION_HANDSHAKE_TIMEOUT_MS_DEFAULT: u64 = 5_000;
/// Most peer domains one server may be configured with.
pub const FEDERATION_PEERS_MAX: usize = 256;

/// Default sustained frames per second one connection may send.
pub const FRAMES_PER_SECOND_PER_CONNECTION_DEFAULT: u32 = 200;
/// Default burst of frames one connection may send above its rate.
pub const FRAMES_BURST_PER_CONNECTION_DEFAULT: u32 = 400;
/// Default sustained frames per second one user may send over all connections.
pub const FRAMES_PER_SECOND_PER_USER_DEFAULT: u32 = 500;
/// Default burst of frames one user may send above its rate.
pub const FRAMES_BURST_PER_USER_DEFAULT: u32 = 1_000;
/// Default number of rooms one user may be a member of.
pub const ROOMS_PER_USER_MAX_DEFAULT: u32 = 1_000;
/// Default number of connections one IP address may hold open.
pub const CONNECTIONS_PER_ADDRESS_MAX_DEFAULT: u32 = 64;
/// Default largest payload accepted: the protocol's own limit.
pub const PAYLOAD_BYTES_MAX_DEFAULT: u32 = PAYLOAD_BYTES_MAX;
/// Default number of frames queued towards one connection.
pub const SEND_QUEUE_FRAMES_MAX_DEFAULT: usize = 1_024;
/// Default bytes queued towards one connection (the outbox's
/// `outbox_bytes_max`).
pub const SEND_QUEUE_BYTES_MAX_DEFAULT: usize = crate::transport::outbox::limits::OUTBOX_BYTES_MAX_DEFAULT;
/// Default time a client has to authenticate after connecting.
pub const HANDSHAKE_TIMEOUT_MS_DEFAULT: u64 = 10_000;
/// Default QUIC idle timeout.
pub const IDLE_TIMEOUT_MS_DEFAULT: u64 = 30_000;
/// Default time connections get to close on shutdown.
pub const DRAIN_TIMEOUT_MS_DEFAULT: u64 = 10_000;

/// Smallest accepted idle timeout: clients send keep-alives every
/// [`crate::transport::tls::CLIENT_KEEP_ALIVE_INTERVAL_MS`], and at least two must fit.
pub const IDLE_TIMEOUT_MS_MIN: u64 = 2 * crate::transport::tls::CLIENT_KEEP_ALIVE_INTERVAL_MS;
/// Largest accepted idle timeout (one hour).
pub const IDLE_TIMEOUT_MS_MAX: u64 = 3_600_000;
/// Largest accepted handshake or drain timeout (ten minutes).
pub const TIMEOUT_MS_MAX: u64 = 600_000;
/// Largest accepted send queue, frames: queues are memory, and a reader that
/// far behind should resynchronise instead.
pub const SEND_QUEUE_FRAMES_MAX_LIMIT: usize = 65_536;

const _: () = assert!(PAYLOAD_BYTES_MAX_DEFAULT <= PAYLOAD_BYTES_MAX);
const _: () = assert!(PAYLOAD_BYTES_MAX_DEFAULT >= CONTROL_PAYLOAD_BYTES_MAX);
// One busy connection is limited by its own bucket before its user's.
const _: () = assert!(FRAMES_PER_SECOND_PER_USER_DEFAULT >= FRAMES_PER_SECOND_PER_CONNECTION_DEFAULT);
const _: () = assert!(FRAMES_BURST_PER_USER_DEFAULT >= FRAMES_BURST_PER_CONNECTION_DEFAULT);
// A burst covers at least one second at the sustained rate.
const _: () = assert!(FRAMES_BURST_PER_CONNECTION_DEFAULT >= FRAMES_PER_SECOND_PER_CONNECTION_DEFAULT);
const _: () = assert!(FRAMES_BURST_PER_USER_DEFAULT >= FRAMES_PER_SECOND_PER_USER_DEFAULT);
const _: () = assert!(IDLE_TIMEOUT_MS_MIN <= IDLE_TIMEOUT_MS_DEFAULT);
const _: () = assert!(IDLE_TIMEOUT_MS_DEFAULT <= IDLE_TIMEOUT_MS_MAX);
const _: () = assert!(HANDSHAKE_TIMEOUT_MS_DEFAULT <= IDLE_TIMEOUT_MS_DEFAULT);
const _: () = assert!(DRAIN_TIMEOUT_MS_DEFAULT <= TIMEOUT_MS_MAX);
const _: () = assert!(SEND_QUEUE_FRAMES_MAX_DEFAULT <= SEND_QUEUE_FRAMES_MAX_LIMIT);
const _: () = assert!(FEDERATION_HANDSHAKE_TIMEOUT_MS_DEFAULT <= TIMEOUT_MS_MAX);

/// How log lines are written (to standard error).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Command-line flags; each can also come from an environment variable.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Parser)]
#[command(
    name = "kalandra-server",
    version,
    about = "Kalandra server: a server-sequenced MLS group-messaging backend."
)]
pub struct CliArgs {
    /// Configuration file (TOML); without it, defaults apply.
    #[arg(long, env = "KALANDRA_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Data directory (database, self-signed TLS identity).
    #[arg(long, env = "KALANDRA_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// QUIC listen address.
    #[arg(long, env = "KALANDRA_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Admin HTTP listen address (health, readiness, metrics, admin API).
    #[arg(long, env = "KALANDRA_ADMIN_LISTEN", value_name = "ADDR")]
    pub admin_listen: Option<SocketAddr>,
    /// The server's domain name (its federation identity).
    #[arg(long, env = "KALANDRA_DOMAIN", value_name = "NAME", value_parser = parse_domain)]
    pub domain: Option<DomainName>,
    /// Log format.
    #[arg(long, env = "KALANDRA_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Log filter, e.g. `info` or `kalandra_server=debug,info`.
    #[arg(long, env = "KALANDRA_LOG", value_name = "FILTER")]
    pub log_filter: Option<String>,
    /// `http://` URL of the push gateway (see `push_webhook_url`).
    #[arg(long, env = "KALANDRA_PUSH_WEBHOOK_URL", value_name = "URL")]
    pub push_webhook_url: Option<String>,
    /// Operator token of the admin API (prefer the environment variable to
    /// the flag: flags are visible to other local users).
    #[arg(long, env = "KALANDRA_ADMIN_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Read-only token of the admin API.
    #[arg(long, env = "KALANDRA_ADMIN_READ_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    pub admin_read_token: Option<String>,
    /// Directory `POST /v1/backup` writes database copies into.
    #[arg(long, env = "KALANDRA_BACKUP_DIR", value_name = "DIR")]
    pub backup_dir: Option<PathBuf>,
    /// Rewrite the database into a fresh file that holds only live data
    /// (dropping what erased entries left in freed pages), then exit. The
    /// server must not be running on the same data directory.
    #[arg(long)]
    pub compact: bool,
    /// An offline task instead of serving.
    #[command(subcommand)]
    pub command: Option<ServerCommand>,
}

/// Offline tasks on a stopped server's data directory or on an export.
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum ServerCommand {
    /// The audit log.
    Audit {
        /// What to do with it.
        #[command(subcommand)]
        action: AuditCommand,
    },
    /// The federation identity.
    Federation {
        /// What to do with it.
        #[command(subcommand)]
        action: FederationCommand,
    },
}

/// What to do with the audit log.
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum AuditCommand {
    /// Verify the hash chain: of an export (`--file`), or of the data
    /// directory's database (the server must be stopped). Exits 0 if
    /// intact, 1 if broken.
    Verify {
        /// An export written by `audit export` or `GET /v1/audit/export`.
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
    },
    /// Write the audit log with its head as JSON to standard output.
    Export,
}

/// Offline tasks on the federation identity.
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum FederationCommand {
    /// Print the domain name and the federation public key (64 hex
    /// digits), creating the key in the data directory if there is none:
    /// what the operators of peer domains configure for this one.
    Key,
}

/// A secret that never appears in `Debug` output.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// The server's configuration (the TOML file's top level).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Data directory; default [`DATA_DIR_DEFAULT`].
    pub data_dir: PathBuf,
    /// QUIC listen address; default [`LISTEN_DEFAULT`].
    pub listen: SocketAddr,
    /// Admin HTTP listen address; default [`ADMIN_LISTEN_DEFAULT`].
    pub admin_listen: SocketAddr,
    /// The server's domain name; default [`DOMAIN_DEFAULT`].
    pub domain: DomainName,
    /// PEM certificate chain; with [`Self::tls_key_path`] or neither. Default:
    /// none, and a self-signed certificate in `<data_dir>/tls/` is used.
    pub tls_cert_path: Option<PathBuf>,
    /// PEM private key for [`Self::tls_cert_path`]; default none.
    pub tls_key_path: Option<PathBuf>,
    /// Log format; default [`LOG_FORMAT_DEFAULT`].
    pub log_format: LogFormat,
    /// Log filter; default [`LOG_FILTER_DEFAULT`].
    pub log_filter: String,
    /// `http://` URL of a push gateway that receives a JSON POST for each
    /// push notification of a member who is not connected; default none
    /// (push payloads are not forwarded).
    pub push_webhook_url: Option<String>,
    /// Operator token of the admin API (everything); default none: a random
    /// token is created in `<data_dir>/admin-token` (mode 0600) on first
    /// run and read from there afterwards.
    pub admin_token: Option<Secret>,
    /// Read-only token of the admin API (rooms, members, audit); default none.
    pub admin_read_token: Option<Secret>,
    /// Directory the admin API's `POST /v1/backup` writes database copies
    /// into (created with mode 0700 if missing); default none: online
    /// backups are off.
    pub backup_dir: Option<PathBuf>,
    /// The `[limits]` table.
    pub limits: Limits,
    /// The `[federation]` table.
    pub federation: FederationConfig,
}

/// Server-to-server links (the `[federation]` table).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FederationConfig {
    /// QUIC address of the server-to-server listener (ALPN
    /// `kalandra-s2s/1`); default none: no link is served or dialed.
    pub listen: Option<SocketAddr>,
    /// Time a peer has to complete the link handshake; default
    /// [`FEDERATION_HANDSHAKE_TIMEOUT_MS_DEFAULT`].
    pub handshake_timeout_ms: u64,
    /// The peer domains, at most [`FEDERATION_PEERS_MAX`]; default none.
    pub peers: Vec<PeerConfig>,
    /// This domain's earlier federation keys after a rotation, each with
    /// the end of its acceptance (required), at most `PEER_KEYS_MAX - 1`:
    /// listed to clients beside the current key, so that members keep
    /// finding leaves certified under an earlier key certified until then
    /// (`docs/FEDERATION.md`, "Key rotation"); default none.
    pub previous_keys: Vec<PeerKeyConfig>,
}

impl Default for FederationConfig {
    fn default() -> FederationConfig {
        FederationConfig {
            listen: None,
            handshake_timeout_ms: FEDERATION_HANDSHAKE_TIMEOUT_MS_DEFAULT,
            peers: Vec::new(),
            previous_keys: Vec::new(),
        }
    }
}

/// A peer domain (one `[[federation.peers]]` entry).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// Its domain name.
    pub domain: DomainName,
    /// `host:port` of its server-to-server listener; without one this
    /// server does not dial it, and only accepts its links.
    #[serde(default)]
    pub address: Option<String>,
    /// The federation keys accepted for it (1 to 4); a refused peer may
    /// list none.
    #[serde(default)]
    pub keys: Vec<PeerKeyConfig>,
    /// Defederation: the domain is refused (never dialed, its links
    /// refused, its users' key packages never claimed); default false.
    #[serde(default)]
    pub refused: bool,
}

/// A federation key accepted for a peer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerKeyConfig {
    /// The Ed25519 public key, 64 hex digits.
    pub key: String,
    /// End of its acceptance (exclusive), ms since the Unix epoch; default
    /// none: accepted until removed.
    #[serde(default)]
    pub valid_until_ms: Option<u64>,
}

impl PeerConfig {
    /// The keys accepted for the peer, checked.
    pub fn peer_keys(&self) -> Result<PeerKeys, String> {
        let keys = self.keys.iter().map(PeerKeyConfig::peer_key).collect::<Result<Vec<_>, String>>()?;
        PeerKeys::new(self.domain.clone(), keys).map_err(|error| error.to_string())
    }
}

impl PeerKeyConfig {
    /// The key, checked.
    pub fn peer_key(&self) -> Result<PeerKey, String> {
        let bytes: [u8; 32] = hex::decode(&self.key)
            .ok()
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or_else(|| format!("key {:?} is not 64 hex digits", self.key))?;
        let key = ed25519_dalek::VerifyingKey::from_bytes(&bytes)
            .map_err(|_| format!("key {} is not an Ed25519 public key", self.key))?;
        Ok(PeerKey { key, valid_until_ms: self.valid_until_ms })
    }
}

impl FederationConfig {
    /// The keys this domain lists for itself: `current` and the earlier
    /// ones configured; each earlier key needs its end, and no key is
    /// listed twice.
    pub fn own_keys(
        &self,
        us: &DomainName,
        current: ed25519_dalek::VerifyingKey,
    ) -> Result<PeerKeys, String> {
        let mut keys = vec![PeerKey { key: current, valid_until_ms: None }];
        for configured in &self.previous_keys {
            let key = configured.peer_key()?;
            if key.valid_until_ms.is_none() {
                return Err(format!("earlier key {} needs its valid_until_ms", configured.key));
            }
            if keys.iter().any(|listed| listed.key == key.key) {
                return Err(format!("key {} is listed twice (or is the current key)", configured.key));
            }
            keys.push(key);
        }
        PeerKeys::new(us.clone(), keys).map_err(|error| error.to_string())
    }
}

/// Limits on what clients may do (the `[limits]` table). All must be above 0.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Sustained frames per second per connection; default [`FRAMES_PER_SECOND_PER_CONNECTION_DEFAULT`].
    pub frames_per_second_per_connection: u32,
    /// Burst per connection; default [`FRAMES_BURST_PER_CONNECTION_DEFAULT`].
    pub frames_burst_per_connection: u32,
    /// Sustained frames per second per user; default [`FRAMES_PER_SECOND_PER_USER_DEFAULT`].
    pub frames_per_second_per_user: u32,
    /// Burst per user; default [`FRAMES_BURST_PER_USER_DEFAULT`].
    pub frames_burst_per_user: u32,
    /// Rooms per user; default [`ROOMS_PER_USER_MAX_DEFAULT`].
    pub rooms_per_user_max: u32,
    /// Open connections per IP address; default [`CONNECTIONS_PER_ADDRESS_MAX_DEFAULT`].
    pub connections_per_address_max: u32,
    /// Largest payload accepted, at most the protocol's
    /// [`PAYLOAD_BYTES_MAX`] and at least [`CONTROL_PAYLOAD_BYTES_MAX`];
    /// default [`PAYLOAD_BYTES_MAX_DEFAULT`].
    pub payload_bytes_max: u32,
    /// Frames queued towards one connection, at most
    /// [`SEND_QUEUE_FRAMES_MAX_LIMIT`]; default [`SEND_QUEUE_FRAMES_MAX_DEFAULT`].
    pub send_queue_frames_max: usize,
    /// Bytes queued towards one connection, between
    /// [`OUTBOX_BYTES_MAX_MIN`](crate::transport::outbox::limits::OUTBOX_BYTES_MAX_MIN)
    /// and [`OUTBOX_BYTES_MAX_LIMIT`](crate::transport::outbox::limits::OUTBOX_BYTES_MAX_LIMIT);
    /// default [`SEND_QUEUE_BYTES_MAX_DEFAULT`].
    pub send_queue_bytes_max: usize,
    /// Time to authenticate after connecting; default [`HANDSHAKE_TIMEOUT_MS_DEFAULT`].
    pub handshake_timeout_ms: u64,
    /// QUIC idle timeout, between [`IDLE_TIMEOUT_MS_MIN`] and
    /// [`IDLE_TIMEOUT_MS_MAX`]; default [`IDLE_TIMEOUT_MS_DEFAULT`].
    pub idle_timeout_ms: u64,
    /// Time connections get to close on shutdown; default [`DRAIN_TIMEOUT_MS_DEFAULT`].
    pub drain_timeout_ms: u64,
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            data_dir: PathBuf::from(DATA_DIR_DEFAULT),
            listen: LISTEN_DEFAULT,
            admin_listen: ADMIN_LISTEN_DEFAULT,
            domain: default_domain(),
            tls_cert_path: None,
            tls_key_path: None,
            log_format: LOG_FORMAT_DEFAULT,
            log_filter: LOG_FILTER_DEFAULT.to_owned(),
            push_webhook_url: None,
            admin_token: None,
            admin_read_token: None,
            backup_dir: None,
            limits: Limits::default(),
            federation: FederationConfig::default(),
        }
    }
}

/// A domain name given as a flag.
fn parse_domain(name: &str) -> Result<DomainName, String> {
    DomainName::parse(name).map_err(|error| error.to_string())
}

/// [`DOMAIN_DEFAULT`] as a domain name.
fn default_domain() -> DomainName {
    // A constant, checked by the tests.
    DomainName::parse(DOMAIN_DEFAULT).expect("the default domain name is valid")
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            frames_per_second_per_connection: FRAMES_PER_SECOND_PER_CONNECTION_DEFAULT,
            frames_burst_per_connection: FRAMES_BURST_PER_CONNECTION_DEFAULT,
            frames_per_second_per_user: FRAMES_PER_SECOND_PER_USER_DEFAULT,
            frames_burst_per_user: FRAMES_BURST_PER_USER_DEFAULT,
            rooms_per_user_max: ROOMS_PER_USER_MAX_DEFAULT,
            connections_per_address_max: CONNECTIONS_PER_ADDRESS_MAX_DEFAULT,
            payload_bytes_max: PAYLOAD_BYTES_MAX_DEFAULT,
            send_queue_frames_max: SEND_QUEUE_FRAMES_MAX_DEFAULT,
            send_queue_bytes_max: SEND_QUEUE_BYTES_MAX_DEFAULT,
            handshake_timeout_ms: HANDSHAKE_TIMEOUT_MS_DEFAULT,
            idle_timeout_ms: IDLE_TIMEOUT_MS_DEFAULT,
            drain_timeout_ms: DRAIN_TIMEOUT_MS_DEFAULT,
        }
    }
}

/// The configuration could not be loaded, or logging could not start.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The configuration file is not valid TOML or does not match the schema
    /// (unknown key, wrong type).
    #[error("config file {}: {source}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        #[source]
        source: Box<toml::de::Error>,
    },
    /// A value is out of range or inconsistent with another.
    #[error("invalid `{field}`: {reason}")]
    Invalid {
        /// The key, e.g. `limits.payload_bytes_max`.
        field: &'static str,
        /// Why it is invalid.
        reason: String,
    },
    /// The log subscriber could not be installed (for example, one already is).
    #[error("cannot start logging: {reason}")]
    Logging {
        /// Why.
        reason: String,
    },
}

impl ServerConfig {
    /// The configuration from `cli`: its file (if any), environment variables
    /// and flags over the defaults, validated.
    pub fn load(cli: &CliArgs) -> Result<ServerConfig, ConfigError> {
        let mut config = match &cli.config {
            Some(path) => ServerConfig::from_file(path)?,
            None => ServerConfig::default(),
        };
        config.apply_cli(cli);
        config.validate()?;
        Ok(config)
    }

    /// Parses a configuration file, without validating the values.
    pub fn from_file(path: &Path) -> Result<ServerConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        ServerConfig::from_toml_str(&text, path)
    }

    /// Parses TOML `text` (read from `path`, used in errors), without validating the values.
    pub fn from_toml_str(text: &str, path: &Path) -> Result<ServerConfig, ConfigError> {
        toml::from_str(text)
            .map_err(|source| ConfigError::Syntax { path: path.to_owned(), source: Box::new(source) })
    }

    /// Overrides file values and defaults with the flags and environment
    /// variables present in `cli`.
    pub fn apply_cli(&mut self, cli: &CliArgs) {
        if let Some(data_dir) = &cli.data_dir {
            self.data_dir.clone_from(data_dir);
        }
        if let Some(listen) = cli.listen {
            self.listen = listen;
        }
        if let Some(admin_listen) = cli.admin_listen {
            self.admin_listen = admin_listen;
        }
        if let Some(domain) = &cli.domain {
            self.domain = domain.clone();
        }
        if let Some(log_format) = cli.log_format {
            self.log_format = log_format;
        }
        if let Some(log_filter) = &cli.log_filter {
            self.log_filter.clone_from(log_filter);
        }
        if let Some(url) = &cli.push_webhook_url {
            self.push_webhook_url = Some(url.clone());
        }
        if let Some(token) = &cli.admin_token {
            self.admin_token = Some(Secret(token.clone()));
        }
        if let Some(token) = &cli.admin_read_token {
            self.admin_read_token = Some(Secret(token.clone()));
        }
        if let Some(dir) = &cli.backup_dir {
            self.backup_dir = Some(dir.clone());
        }
    }

    /// Checks every value and the relations between them.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty".to_owned()));
        }
        if self.backup_dir.as_ref().is_some_and(|dir| dir.as_os_str().is_empty()) {
            return Err(invalid("backup_dir", "must not be empty".to_owned()));
        }
        match (&self.tls_cert_path, &self.tls_key_path) {
            (Some(_), None) => {
                return Err(invalid(
                    "tls_key_path",
                    "tls_cert_path is set, so tls_key_path must be set too".to_owned(),
                ))
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "tls_cert_path",
                    "tls_key_path is set, so tls_cert_path must be set too".to_owned(),
                ))
            }
            _ => {}
        }
        parse_log_filter(&self.log_filter)?;
        if let Some(url) = &self.push_webhook_url {
            crate::node::push::WebhookSink::new(url)
                .map_err(|error| invalid("push_webhook_url", error.to_string()))?;
        }
        for (field, token) in
            [("admin_token", &self.admin_token), ("admin_read_token", &self.admin_read_token)]
        {
            if let Some(Secret(token)) = token {
                validate_token(token).map_err(|reason| invalid(field, reason))?;
            }
        }
        if self.admin_token.is_some() && self.admin_token == self.admin_read_token {
            return Err(invalid("admin_read_token", "must differ from admin_token".to_owned()));
        }
        self.limits.validate()?;
        self.federation.validate(&self.domain)
    }
}

impl FederationConfig {
    /// Checks the table: peers need a listener, each peer once, not this
    /// domain itself, with usable keys and address.
    pub fn validate(&self, us: &DomainName) -> Result<(), ConfigError> {
        if !(1..=TIMEOUT_MS_MAX).contains(&self.handshake_timeout_ms) {
            return Err(invalid(
                "federation.handshake_timeout_ms",
                format!("{} is outside 1..={TIMEOUT_MS_MAX}", self.handshake_timeout_ms),
            ));
        }
        if !self.peers.is_empty() && self.listen.is_none() {
            return Err(invalid("federation.listen", "peers are configured, so it must be set".to_owned()));
        }
        if self.peers.len() > FEDERATION_PEERS_MAX {
            return Err(invalid(
                "federation.peers",
                format!("{} peers, at most {FEDERATION_PEERS_MAX}", self.peers.len()),
            ));
        }
        let placeholder = ed25519_dalek::SigningKey::from_bytes(&[1; 32]).verifying_key();
        self.own_keys(us, placeholder).map_err(|reason| invalid("federation.previous_keys", reason))?;
        let mut seen = std::collections::BTreeSet::new();
        for peer in &self.peers {
            if peer.domain == *us {
                return Err(invalid("federation.peers", format!("{} is this server's own domain", us)));
            }
            if !seen.insert(&peer.domain) {
                return Err(invalid("federation.peers", format!("{} is listed twice", peer.domain)));
            }
            if !peer.refused {
                peer.peer_keys().map_err(|reason| invalid("federation.peers.keys", reason))?;
            }
            if let Some(address) = &peer.address {
                check_peer_address(address).map_err(|reason| {
                    invalid("federation.peers.address", format!("{address:?}: {reason}"))
                })?;
            }
        }
        Ok(())
    }
}

/// Checks a peer's `host:port` (the host is resolved when dialing).
fn check_peer_address(address: &str) -> Result<(), String> {
    let (host, port) = address.rsplit_once(':').ok_or("expected host:port")?;
    if host.is_empty() {
        return Err("no host".to_owned());
    }
    match port.parse::<u16>() {
        Ok(port) if port > 0 => Ok(()),
        _ => Err("the port must be 1 to 65535".to_owned()),
    }
}

impl Limits {
    /// Checks every limit.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("limits.frames_per_second_per_connection", u64::from(self.frames_per_second_per_connection)),
            ("limits.frames_burst_per_connection", u64::from(self.frames_burst_per_connection)),
            ("limits.frames_per_second_per_user", u64::from(self.frames_per_second_per_user)),
            ("limits.frames_burst_per_user", u64::from(self.frames_burst_per_user)),
            ("limits.rooms_per_user_max", u64::from(self.rooms_per_user_max)),
            ("limits.connections_per_address_max", u64::from(self.connections_per_address_max)),
            ("limits.payload_bytes_max", u64::from(self.payload_bytes_max)),
            ("limits.send_queue_frames_max", u64::try_from(self.send_queue_frames_max).unwrap_or(u64::MAX)),
            ("limits.handshake_timeout_ms", self.handshake_timeout_ms),
            ("limits.idle_timeout_ms", self.idle_timeout_ms),
            ("limits.drain_timeout_ms", self.drain_timeout_ms),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(invalid(field, "must be greater than 0".to_owned()));
            }
        }
        if !(CONTROL_PAYLOAD_BYTES_MAX..=PAYLOAD_BYTES_MAX).contains(&self.payload_bytes_max) {
            return Err(invalid(
                "limits.payload_bytes_max",
                format!(
                    "{} is outside {CONTROL_PAYLOAD_BYTES_MAX}..={PAYLOAD_BYTES_MAX} (the protocol's control-frame and overall payload limits)",
                    self.payload_bytes_max
                ),
            ));
        }
        if self.send_queue_frames_max > SEND_QUEUE_FRAMES_MAX_LIMIT {
            return Err(invalid(
                "limits.send_queue_frames_max",
                format!("{} is above {SEND_QUEUE_FRAMES_MAX_LIMIT}", self.send_queue_frames_max),
            ));
        }
        use crate::transport::outbox::limits::{OUTBOX_BYTES_MAX_LIMIT, OUTBOX_BYTES_MAX_MIN};
        if !(OUTBOX_BYTES_MAX_MIN..=OUTBOX_BYTES_MAX_LIMIT).contains(&self.send_queue_bytes_max) {
            return Err(invalid(
                "limits.send_queue_bytes_max",
                format!(
                    "{} is outside {OUTBOX_BYTES_MAX_MIN}..={OUTBOX_BYTES_MAX_LIMIT} (at least twice the largest frame)",
                    self.send_queue_bytes_max
                ),
            ));
        }
        if !(IDLE_TIMEOUT_MS_MIN..=IDLE_TIMEOUT_MS_MAX).contains(&self.idle_timeout_ms) {
            return Err(invalid(
                "limits.idle_timeout_ms",
                format!("{} is outside {IDLE_TIMEOUT_MS_MIN}..={IDLE_TIMEOUT_MS_MAX}", self.idle_timeout_ms),
            ));
        }
        for (field, value) in [
            ("limits.handshake_timeout_ms", self.handshake_timeout_ms),
            ("limits.drain_timeout_ms", self.drain_timeout_ms),
        ] {
            if value > TIMEOUT_MS_MAX {
                return Err(invalid(field, format!("{value} is above {TIMEOUT_MS_MAX}")));
            }
        }
        Ok(())
    }
}

/// Checks an admin API token: [`ADMIN_TOKEN_CHARS_MIN`] to
/// [`ADMIN_TOKEN_CHARS_MAX`] visible ASCII characters.
pub fn validate_token(token: &str) -> Result<(), String> {
    if !(ADMIN_TOKEN_CHARS_MIN..=ADMIN_TOKEN_CHARS_MAX).contains(&token.len()) {
        return Err(format!("must be {ADMIN_TOKEN_CHARS_MIN} to {ADMIN_TOKEN_CHARS_MAX} characters"));
    }
    if !token.bytes().all(|byte| byte.is_ascii_graphic()) {
        return Err("must be visible ASCII characters without spaces".to_owned());
    }
    Ok(())
}

/// File name of the generated operator token inside the data directory.
pub const ADMIN_TOKEN_FILE_NAME: &str = "admin-token";

/// The operator token: `configured`, or the one in
/// `<data_dir>/admin-token`, created there (mode 0600) from `random` when
/// absent. Returns the token and the file it came from, if any.
pub fn load_or_create_admin_token(
    data_dir: &Path,
    configured: Option<&Secret>,
    random: [u8; 32],
) -> Result<(Secret, Option<PathBuf>), ConfigError> {
    if let Some(token) = configured {
        return Ok((token.clone(), None));
    }
    let path = data_dir.join(ADMIN_TOKEN_FILE_NAME);
    let read = |source| ConfigError::Read { path: path.clone(), source };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let token = text.trim().to_owned();
            validate_token(&token).map_err(|reason| invalid("admin-token file", reason))?;
            Ok((Secret(token), Some(path)))
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            let token = hex::encode(random);
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(read)?;
            file.write_all(format!("{token}\n").as_bytes()).map_err(read)?;
            file.sync_all().map_err(read)?;
            Ok((Secret(token), Some(path)))
        }
        Err(error) => Err(read(error)),
    }
}

fn invalid(field: &'static str, reason: String) -> ConfigError {
    ConfigError::Invalid { field, reason }
}

/// The documented example configuration (`deploy/kalandra.example.toml`);
/// it parses to the defaults.
#[cfg(test)]
pub fn example_toml() -> &'static str {
    include_str!("../../../deploy/kalandra.example.toml")
}

/// Parses a log filter: comma-separated directives, each a level (`info`:
/// the default for every target) or `target=level`
/// (`kalandra_server=debug,quinn=warn,info`); levels are `trace`, `debug`,
/// `info`, `warn`, `error` and `off`.
pub fn parse_log_filter(filter: &str) -> Result<Targets, ConfigError> {
    filter.parse::<Targets>().map_err(|error| invalid("log_filter", format!("{filter:?}: {error}")))
}

/// Installs the global log subscriber: `format` lines on standard error,
/// filtered by `filter` ([`parse_log_filter`]), with colours only when
/// standard error is a terminal. Fails if one is installed already.
pub fn init_logging(format: LogFormat, filter: &str) -> Result<(), ConfigError> {
    use std::io::IsTerminal as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let targets = parse_log_filter(filter)?;
    let ansi = std::io::stderr().is_terminal();
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi);
    let registry = tracing_subscriber::registry().with(targets);
    let installed = match format {
        LogFormat::Text => registry.with(layer).try_init(),
        LogFormat::Json => registry.with(layer.json()).try_init(),
    };
    installed.map_err(|error| ConfigError::Logging { reason: error.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_config(dir: &tempfile::TempDir, text: &str) -> PathBuf {
        let path = dir.path().join("kalandra.toml");
        std::fs::write(&path, text).expect("write config");
        path
    }

    fn invalid_field(result: Result<ServerConfig, ConfigError>) -> &'static str {
        match result {
            Err(ConfigError::Invalid { field, .. }) => field,
            other => panic!("expected an invalid value, got {other:?}"),
        }
    }

    #[test]
    fn example_parses_to_the_defaults() {
        let parsed = ServerConfig::from_toml_str(example_toml(), Path::new("kalandra.example.toml"))
            .expect("example parses");
        assert_eq!(parsed, ServerConfig::default());
        parsed.validate().expect("defaults are valid");
    }

    #[test]
    fn example_mentions_every_key() {
        let limits = [
            "frames_per_second_per_connection",
            "frames_burst_per_connection",
            "frames_per_second_per_user",
            "frames_burst_per_user",
            "rooms_per_user_max",
            "connections_per_address_max",
            "payload_bytes_max",
            "send_queue_frames_max",
            "send_queue_bytes_max",
            "handshake_timeout_ms",
            "idle_timeout_ms",
            "drain_timeout_ms",
        ];
        let top = [
            "data_dir",
            "listen",
            "admin_listen",
            "tls_cert_path",
            "tls_key_path",
            "log_format",
            "log_filter",
            "admin_token",
            "admin_read_token",
            "backup_dir",
            "domain",
            "[limits]",
            "[federation]",
            "[[federation.peers]]",
            "valid_until_ms",
        ];
        for key in top.iter().chain(limits.iter()) {
            assert!(example_toml().contains(key), "{key} is not in the example");
        }
    }

    #[test]
    fn no_file_means_defaults() {
        let config = ServerConfig::load(&CliArgs::default()).expect("defaults");
        assert_eq!(config, ServerConfig::default());
        assert_eq!(config.listen.to_string(), "127.0.0.1:4433");
        assert_eq!(config.admin_listen.to_string(), "127.0.0.1:9090");
        assert!(config.admin_listen.ip().is_loopback());
    }

    #[test]
    fn file_overrides_defaults_and_cli_overrides_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write_config(
            &dir,
            r#"
data_dir = "/var/lib/kalandra"
listen = "0.0.0.0:5555"
log_format = "json"
[limits]
rooms_per_user_max = 7
"#,
        );
        let cli = CliArgs { config: Some(path.clone()), ..CliArgs::default() };
        let from_file = ServerConfig::load(&cli).expect("file");
        assert_eq!(from_file.data_dir, PathBuf::from("/var/lib/kalandra"));
        assert_eq!(from_file.listen.to_string(), "0.0.0.0:5555");
        assert_eq!(from_file.log_format, LogFormat::Json);
        assert_eq!(from_file.limits.rooms_per_user_max, 7);
        assert_eq!(from_file.admin_listen, ADMIN_LISTEN_DEFAULT);
        assert_eq!(from_file.limits.idle_timeout_ms, IDLE_TIMEOUT_MS_DEFAULT);

        let cli = CliArgs {
            config: Some(path),
            data_dir: Some(PathBuf::from("/tmp/elsewhere")),
            listen: Some("127.0.0.1:6000".parse().expect("address")),
            admin_listen: Some("127.0.0.1:6001".parse().expect("address")),
            domain: Some(DomainName::parse("b.example.org").expect("domain")),
            log_format: Some(LogFormat::Text),
            log_filter: Some("debug".to_owned()),
            push_webhook_url: Some("http://127.0.0.1:6002/push".to_owned()),
            admin_token: Some("flag-operator-token-01".to_owned()),
            admin_read_token: Some("flag-read-only-token-01".to_owned()),
            backup_dir: Some(PathBuf::from("/tmp/backups")),
            compact: false,
            command: None,
        };
        let overridden = ServerConfig::load(&cli).expect("flags");
        assert_eq!(overridden.admin_token, Some(Secret("flag-operator-token-01".to_owned())));
        assert_eq!(overridden.admin_read_token, Some(Secret("flag-read-only-token-01".to_owned())));
        assert_eq!(overridden.push_webhook_url.as_deref(), Some("http://127.0.0.1:6002/push"));
        assert_eq!(overridden.data_dir, PathBuf::from("/tmp/elsewhere"));
        assert_eq!(overridden.backup_dir, Some(PathBuf::from("/tmp/backups")));
        assert_eq!(overridden.listen.to_string(), "127.0.0.1:6000");
        assert_eq!(overridden.admin_listen.to_string(), "127.0.0.1:6001");
        assert_eq!(overridden.log_format, LogFormat::Text);
        assert_eq!(overridden.log_filter, "debug");
        assert_eq!(overridden.limits.rooms_per_user_max, 7);
        assert_eq!(overridden.domain.as_str(), "b.example.org");
    }

    #[test]
    fn unreadable_file_is_a_read_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cli = CliArgs { config: Some(dir.path().join("missing.toml")), ..CliArgs::default() };
        match ServerConfig::load(&cli) {
            Err(error @ ConfigError::Read { .. }) => {
                assert!(error.to_string().contains("missing.toml"), "{error}");
            }
            other => panic!("expected a read error, got {other:?}"),
        }
    }

    #[test]
    fn syntax_errors_and_unknown_keys_name_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        for text in [
            "listen = ",
            "lisen = \"127.0.0.1:1\"",
            "[limits]\nrooms_per_user = 3",
            "listen = \"not an address\"",
            "log_format = \"xml\"",
            "[limits]\nidle_timeout_ms = -1",
        ] {
            let path = write_config(&dir, text);
            let cli = CliArgs { config: Some(path), ..CliArgs::default() };
            match ServerConfig::load(&cli) {
                Err(error @ ConfigError::Syntax { .. }) => {
                    assert!(error.to_string().contains("kalandra.toml"), "{error}");
                }
                other => panic!("{text:?}: expected a syntax error, got {other:?}"),
            }
        }
    }

    #[test]
    fn invalid_values_name_their_field() {
        let cases = [
            ("[limits]\nframes_per_second_per_connection = 0", "limits.frames_per_second_per_connection"),
            ("[limits]\nframes_burst_per_user = 0", "limits.frames_burst_per_user"),
            ("[limits]\nrooms_per_user_max = 0", "limits.rooms_per_user_max"),
            ("[limits]\nconnections_per_address_max = 0", "limits.connections_per_address_max"),
            ("[limits]\nsend_queue_frames_max = 0", "limits.send_queue_frames_max"),
            ("[limits]\nsend_queue_frames_max = 1000000", "limits.send_queue_frames_max"),
            ("[limits]\nsend_queue_bytes_max = 1048576", "limits.send_queue_bytes_max"),
            ("[limits]\nsend_queue_bytes_max = 2147483648", "limits.send_queue_bytes_max"),
            ("[limits]\ndrain_timeout_ms = 0", "limits.drain_timeout_ms"),
            ("[limits]\nhandshake_timeout_ms = 600001", "limits.handshake_timeout_ms"),
            ("[limits]\nidle_timeout_ms = 10", "limits.idle_timeout_ms"),
            ("[limits]\nidle_timeout_ms = 3600001", "limits.idle_timeout_ms"),
            ("[limits]\npayload_bytes_max = 8388609", "limits.payload_bytes_max"),
            ("[limits]\npayload_bytes_max = 100", "limits.payload_bytes_max"),
            ("tls_cert_path = \"cert.pem\"", "tls_key_path"),
            ("tls_key_path = \"key.pem\"", "tls_cert_path"),
            ("log_filter = \"info,kalandra_server=loud\"", "log_filter"),
            ("push_webhook_url = \"ftp://push.example/hook\"", "push_webhook_url"),
            ("push_webhook_url = \"http:///no-host\"", "push_webhook_url"),
            ("data_dir = \"\"", "data_dir"),
            ("backup_dir = \"\"", "backup_dir"),
        ];
        let federation_cases = [
            ("[federation]\nhandshake_timeout_ms = 0".to_owned(), "federation.handshake_timeout_ms"),
            (peer_entry("b.example", "b.example:4434", &key_hex(1)), "federation.listen"),
            (with_listen(&peer_entry("localhost", "a:1", &key_hex(1))), "federation.peers"),
            (
                with_listen(
                    &(peer_entry("b.example", "b:1", &key_hex(1))
                        + &peer_entry("b.example", "b:2", &key_hex(2))),
                ),
                "federation.peers",
            ),
            (with_listen(&peer_entry("b.example", "b:1", "abcd")), "federation.peers.keys"),
            (with_listen(&peer_entry("b.example", "no-port", &key_hex(1))), "federation.peers.address"),
            (with_listen(&peer_entry("b.example", "b:0", &key_hex(1))), "federation.peers.address"),
            (
                with_listen("[[federation.peers]]\ndomain = \"b.example\"\nkeys = []\n"),
                "federation.peers.keys",
            ),
            (
                format!("[federation]\nprevious_keys = [{{ key = \"{}\" }}]", key_hex(1)),
                "federation.previous_keys",
            ),
            (
                "[federation]\nprevious_keys = [{ key = \"ab\", valid_until_ms = 1 }]".to_owned(),
                "federation.previous_keys",
            ),
            (
                format!(
                    "[federation]\nprevious_keys = [{{ key = \"{0}\", valid_until_ms = 1 }}, {{ key = \"{0}\", valid_until_ms = 2 }}]",
                    key_hex(2)
                ),
                "federation.previous_keys",
            ),
            (
                format!(
                    "[federation]\nprevious_keys = [{}]",
                    (1..=4)
                        .map(|seed| format!("{{ key = \"{}\", valid_until_ms = 1 }}", key_hex(seed)))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                "federation.previous_keys",
            ),
        ];
        let federation_cases = federation_cases.iter().map(|(text, field)| (text.as_str(), *field));
        for (text, field) in cases.into_iter().chain(federation_cases) {
            let parsed = ServerConfig::from_toml_str(text, Path::new("test.toml")).expect(text);
            let result = parsed.validate().map(|()| parsed);
            assert_eq!(invalid_field(result), field, "{text}");
        }
    }

    fn key_hex(seed: u8) -> String {
        hex::encode(ed25519_dalek::SigningKey::from_bytes(&[seed; 32]).verifying_key().to_bytes())
    }

    fn peer_entry(domain: &str, address: &str, key: &str) -> String {
        format!("[[federation.peers]]\ndomain = \"{domain}\"\naddress = \"{address}\"\nkeys = [{{ key = \"{key}\" }}]\n")
    }

    fn with_listen(peers: &str) -> String {
        format!("[federation]\nlisten = \"127.0.0.1:4434\"\n{peers}")
    }

    #[test]
    fn federation_peers_map_onto_the_keys_they_accept() {
        let text = format!(
            "domain = \"a.example\"\n[federation]\nlisten = \"127.0.0.1:4434\"\n[[federation.peers]]\ndomain = \"b.example\"\naddress = \"b.example:4434\"\nkeys = [{{ key = \"{}\", valid_until_ms = 1000 }}, {{ key = \"{}\" }}]\n[[federation.peers]]\ndomain = \"c.example\"\nkeys = [{{ key = \"{}\" }}]\n",
            key_hex(1),
            key_hex(2),
            key_hex(3)
        );
        let config = ServerConfig::from_toml_str(&text, Path::new("test.toml")).expect("parses");
        config.validate().expect("valid");
        assert_eq!(config.domain.as_str(), "a.example");
        let b = config.federation.peers[0].peer_keys().expect("keys");
        assert_eq!(b.domain().as_str(), "b.example");
        assert_eq!(b.accepted(999).count(), 2, "the old key until the end of the overlap");
        assert_eq!(b.accepted(1000).count(), 1, "then the new one only");
        assert_eq!(config.federation.peers[1].address, None);
        for bad in [
            "domain = \"Upper.Case\"",
            "domain = \"\"",
            "[federation]\npeers = [{ domain = \"-x\", keys = [] }]",
        ] {
            assert!(ServerConfig::from_toml_str(bad, Path::new("t.toml")).is_err(), "{bad}");
        }
        assert_eq!(default_domain().as_str(), DOMAIN_DEFAULT);
    }

    #[test]
    fn federation_peer_refused_needs_no_keys_and_defaults_to_false() {
        let text = format!(
            "domain = \"a.example\"\n[federation]\nlisten = \"127.0.0.1:4434\"\n[[federation.peers]]\ndomain = \"b.example\"\nrefused = true\n[[federation.peers]]\ndomain = \"c.example\"\nkeys = [{{ key = \"{}\" }}]\n",
            key_hex(1)
        );
        let config = ServerConfig::from_toml_str(&text, Path::new("test.toml")).expect("parses");
        config.validate().expect("a refused peer needs no keys");
        assert!(config.federation.peers[0].refused);
        assert!(!config.federation.peers[1].refused, "default false");
        let keyless = with_listen("[[federation.peers]]\ndomain = \"b.example\"\nrefused = false\n");
        let config = ServerConfig::from_toml_str(&keyless, Path::new("t.toml")).expect("parses");
        let error = config.validate().expect_err("a peer that is not refused needs keys");
        assert!(matches!(error, ConfigError::Invalid { field: "federation.peers.keys", .. }), "{error}");
    }

    #[test]
    fn limits_at_their_bounds_are_valid() {
        let text = format!(
            "tls_cert_path = \"c.pem\"\ntls_key_path = \"k.pem\"\n[limits]\npayload_bytes_max = {PAYLOAD_BYTES_MAX}\nidle_timeout_ms = {IDLE_TIMEOUT_MS_MIN}\nsend_queue_frames_max = {SEND_QUEUE_FRAMES_MAX_LIMIT}\n"
        );
        let parsed = ServerConfig::from_toml_str(&text, Path::new("test.toml")).expect("parses");
        parsed.validate().expect("valid");
        assert_eq!(parsed.tls_cert_path, Some(PathBuf::from("c.pem")));
    }

    #[test]
    fn cli_parses_flags() {
        use clap::Parser as _;
        let cli = CliArgs::try_parse_from([
            "kalandra-server",
            "--config",
            "/etc/kalandra.toml",
            "--listen",
            "[::1]:4433",
            "--log-format",
            "json",
        ])
        .expect("flags parse");
        assert_eq!(cli.config, Some(PathBuf::from("/etc/kalandra.toml")));
        assert_eq!(cli.listen, Some("[::1]:4433".parse().expect("address")));
        assert_eq!(cli.log_format, Some(LogFormat::Json));
        assert!(CliArgs::try_parse_from(["kalandra-server", "--listen", "nowhere"]).is_err());
        assert!(CliArgs::try_parse_from(["kalandra-server", "--log-format", "xml"]).is_err());
        let audit = CliArgs::try_parse_from([
            "kalandra-server",
            "--data-dir",
            "/d",
            "audit",
            "verify",
            "--file",
            "x.json",
        ])
        .expect("audit command parses");
        assert_eq!(
            audit.command,
            Some(ServerCommand::Audit {
                action: AuditCommand::Verify { file: Some(PathBuf::from("x.json")) }
            })
        );
        assert!(CliArgs::try_parse_from(["kalandra-server", "audit", "rewrite"]).is_err());
        let key = CliArgs::try_parse_from(["kalandra-server", "--domain", "a.example", "federation", "key"])
            .expect("federation key parses");
        assert_eq!(key.command, Some(ServerCommand::Federation { action: FederationCommand::Key }));
        assert!(CliArgs::try_parse_from(["kalandra-server", "--domain", "A.example"]).is_err());
    }

    #[test]
    fn tokens_are_checked_and_never_printed() {
        let mut config =
            ServerConfig { admin_token: Some(Secret("short".into())), ..ServerConfig::default() };
        assert_eq!(invalid_field(config.validate().map(|_| config.clone())), "admin_token");
        config.admin_token = Some(Secret("a token with spaces inside".into()));
        assert_eq!(invalid_field(config.validate().map(|_| config.clone())), "admin_token");
        config.admin_token = Some(Secret("0123456789abcdef0123".into()));
        config.validate().unwrap();
        config.admin_read_token = config.admin_token.clone();
        assert_eq!(invalid_field(config.validate().map(|_| config.clone())), "admin_read_token");
        assert!(!format!("{config:?}").contains("0123456789abcdef"), "Debug hides tokens");
    }

    #[test]
    fn the_admin_token_is_generated_once_with_owner_only_permissions() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let (token, path) = load_or_create_admin_token(dir.path(), None, [7; 32]).unwrap();
        let path = path.expect("a generated token lives in a file");
        assert_eq!(token.0, hex::encode([7; 32]));
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let (again, _) = load_or_create_admin_token(dir.path(), None, [9; 32]).unwrap();
        assert_eq!(again, token, "the file is reused, not regenerated");
        let configured = Secret("configured-token-0001".into());
        assert_eq!(
            load_or_create_admin_token(dir.path(), Some(&configured), [9; 32]).unwrap(),
            (configured, None)
        );
        std::fs::write(&path, "bad\n").unwrap();
        assert!(load_or_create_admin_token(dir.path(), None, [9; 32]).is_err());
    }
}
