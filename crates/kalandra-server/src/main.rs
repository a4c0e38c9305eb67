//! `kalandra-server`: the server binary.
//!
//! Zero configuration: `kalandra-server` stores everything in
//! `./kalandra-data` (an embedded redb database and a self-signed TLS
//! certificate created on first run, whose fingerprint it prints) and
//! listens for QUIC on 127.0.0.1:4433 and for admin HTTP on 127.0.0.1:9090.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use clap::Parser as _;
use kalandra_server::admin::{serve_admin, AdminState};
use kalandra_server::admin_api::{export_audit, verify_store, AdminApi, AUDIT_EXPORT_RECORDS_MAX};
use kalandra_server::audit::{self, AuditExport};
use kalandra_server::config::{
    init_logging, load_or_create_admin_token, AuditCommand, CliArgs, ServerCommand, ServerConfig,
};
use kalandra_server::connection::{reached, Listener, ShutdownPhase};
use kalandra_server::metrics::Metrics;
use kalandra_server::mls_state::ServerSigner;
use kalandra_server::node::{Clock, Node, NodeLimits};
use kalandra_server::room_group::MlsRoomGroup;
use kalandra_server::store::group_commit::{GroupCommit, GroupCommitConfig};
use kalandra_server::store::redb::{CompactError, OpenError};
use kalandra_server::store::{RedbStore, Store};
use kalandra_server::tls::{load_or_create_server_identity, quinn_server_config, ServerTlsIdentity};

/// Name of the database file inside the data directory.
const DATABASE_FILE_NAME: &str = "kalandra.redb";
/// How often the process checks the room core's health.
const HEALTH_POLL_INTERVAL: Duration = Duration::from_millis(100);

fn main() -> ExitCode {
    let cli = CliArgs::parse();
    let config = match ServerConfig::load(&cli) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("kalandra-server: {error}");
            return ExitCode::from(2);
        }
    };
    if let Some(ServerCommand::Audit { action }) = &cli.command {
        return audit_command(&config, action);
    }
    if let Err(error) = init_logging(config.log_format, &config.log_filter) {
        eprintln!("kalandra-server: {error}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("kalandra-server: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    if cli.compact {
        return compact(&config);
    }
    match runtime.block_on(run(config)) {
        Ok(code) => code,
        // Printed once, to standard error (not also as a log line).
        Err(fatal) => {
            eprintln!("kalandra-server: {:#}", fatal.error);
            ExitCode::from(fatal.exit_code)
        }
    }
}

/// Exit status of a configuration error found at start (a bad value, a
/// port in use, a certificate that does not load): nothing was changed.
const EXIT_CONFIG: u8 = 2;
/// Exit status of a damaged database: restore it from a backup.
const EXIT_DATABASE_DAMAGED: u8 = 3;
/// Exit status of any other failure.
const EXIT_FAILURE: u8 = 1;

/// Why the server could not run, and its exit status.
struct Fatal {
    error: anyhow::Error,
    exit_code: u8,
}

impl From<anyhow::Error> for Fatal {
    fn from(error: anyhow::Error) -> Fatal {
        Fatal { error, exit_code: EXIT_FAILURE }
    }
}

trait FatalContext<T> {
    /// Marks the error as a configuration error ([`EXIT_CONFIG`]).
    fn config_error(self, context: String) -> Result<T, Fatal>;
}

impl<T, E: Into<anyhow::Error>> FatalContext<T> for Result<T, E> {
    fn config_error(self, context: String) -> Result<T, Fatal> {
        self.map_err(|error| Fatal { error: error.into().context(context), exit_code: EXIT_CONFIG })
    }
}

/// Opens the database, telling damage ([`EXIT_DATABASE_DAMAGED`]) from
/// other failures.
fn open_database(database: &std::path::Path) -> Result<RedbStore, Fatal> {
    RedbStore::open(database).map_err(|error| {
        let exit_code = match error {
            OpenError::Damaged { .. } => EXIT_DATABASE_DAMAGED,
            OpenError::InUse | OpenError::SchemaVersion { .. } => EXIT_CONFIG,
            OpenError::Storage(_) => EXIT_FAILURE,
        };
        Fatal {
            error: anyhow::Error::new(error).context(format!("opening database {}", database.display())),
            exit_code,
        }
    })
}

/// `kalandra-server audit verify|export`: offline, on an export or on the
/// stopped server's database.
fn audit_command(config: &ServerConfig, action: &AuditCommand) -> ExitCode {
    let open = || open_database(&config.data_dir.join(DATABASE_FILE_NAME));
    let unreadable = |error: anyhow::Error| Fatal { error, exit_code: EXIT_CONFIG };
    let result: Result<ExitCode, Fatal> = (|| match action {
        AuditCommand::Verify { file: Some(file) } => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("reading {}", file.display()))
                .map_err(unreadable)?;
            let export: AuditExport = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", file.display()))
                .map_err(unreadable)?;
            Ok(report_verification(audit::verify_export(&export)))
        }
        AuditCommand::Verify { file: None } => {
            let store = open()?;
            let verified = verify_store(&store).map_err(|error| unreadable(anyhow::Error::msg(error)))?;
            Ok(report_verification(verified))
        }
        AuditCommand::Export => {
            let store = open()?;
            let export = export_audit(&store, 0, AUDIT_EXPORT_RECORDS_MAX)
                .map_err(|error| unreadable(anyhow::Error::msg(error)))?;
            let text = serde_json::to_string_pretty(&export).map_err(|error| unreadable(error.into()))?;
            println!("{text}");
            Ok(ExitCode::SUCCESS)
        }
    })();
    result.unwrap_or_else(|fatal| {
        eprintln!("kalandra-server: {:#}", fatal.error);
        // Damage keeps its own status; anything else unreadable is 2.
        ExitCode::from(if fatal.exit_code == EXIT_DATABASE_DAMAGED {
            EXIT_DATABASE_DAMAGED
        } else {
            EXIT_CONFIG
        })
    })
}

fn report_verification(result: Result<audit::AuditVerified, audit::AuditVerifyError>) -> ExitCode {
    match result {
        Ok(verified) => {
            let head = verified
                .head
                .map_or_else(|| "none".to_owned(), |head| format!("{} {}", head.seq, hex::encode(head.hash)));
            println!("audit log intact: {} records, head {head}", verified.records);
            ExitCode::SUCCESS
        }
        Err(error) => {
            println!("audit log broken: {error}");
            ExitCode::FAILURE
        }
    }
}

/// `--compact`: rewrites the database (see `RedbStore::compact_file`).
fn compact(config: &ServerConfig) -> ExitCode {
    let database = config.data_dir.join(DATABASE_FILE_NAME);
    match RedbStore::compact_file(&database) {
        Ok(report) => {
            println!(
                "compacted {}: {} rows, {} -> {} bytes",
                database.display(),
                report.rows,
                report.bytes_before,
                report.bytes_after
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("kalandra-server: compacting {}: {error}", database.display());
            match error {
                CompactError::Open(OpenError::Damaged { .. }) => ExitCode::from(EXIT_DATABASE_DAMAGED),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

fn wall_clock() -> Clock {
    Arc::new(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    })
}

async fn run(config: ServerConfig) -> Result<ExitCode, Fatal> {
    // Watched from the start: SIGHUP's default action would end the process.
    let mut signals = Signals::watch().context("watching signals")?;
    // Everything that can be refused is checked before anything is created.
    let admin_listener = tokio::net::TcpListener::bind(config.admin_listen)
        .await
        .config_error(format!("binding admin HTTP on {}", config.admin_listen))?;
    let quic_socket = kalandra_server::tls::bind_quic_socket(config.listen)
        .config_error(format!("binding QUIC on {}", config.listen))?;
    if config.tls_cert_path.is_some() {
        load_identity(&config).config_error("loading the TLS certificate".to_owned())?;
    }
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
    let database = config.data_dir.join(DATABASE_FILE_NAME);
    let store: Arc<dyn Store> = Arc::new(open_database(&database)?);
    let group_commit = GroupCommit::start(Arc::clone(&store), GroupCommitConfig::default())
        .context("starting the storage writer")?;

    let identity = load_identity(&config).config_error("loading the TLS certificate".to_owned())?;
    let fingerprint = identity.fingerprint_sha256_hex();
    if identity.was_created() {
        println!("created a self-signed certificate in {}", config.data_dir.join("tls").display());
    }
    println!("certificate fingerprint (sha256): {fingerprint}");
    tracing::info!(%fingerprint, "TLS certificate loaded");

    let (server_key, key_created) =
        kalandra_server::server_key::load_or_create(&config.data_dir, rand::random())
            .context("loading the server signing key")?;
    let server_public_key = server_key.verifying_key().to_bytes();
    if key_created {
        println!("created the server signing key in {}", config.data_dir.display());
    }
    println!("server signing key: {}", hex::encode(server_public_key));

    let (admin_token, admin_token_file) =
        load_or_create_admin_token(&config.data_dir, config.admin_token.as_ref(), rand::random())
            .context("loading the admin API token")?;
    if let Some(path) = &admin_token_file {
        println!("admin API token in {}", path.display());
    }

    let metrics = Metrics::new().context("setting up metrics")?;
    let ready = Arc::new(AtomicBool::new(false));
    let admin_address = admin_listener.local_addr().context("admin HTTP address")?;
    let (stop, stopped) = tokio::sync::watch::channel(ShutdownPhase::Running);
    let admin_state = AdminState::new(metrics.clone(), Arc::clone(&ready));
    let admin_stop = {
        let mut stopped = stopped.clone();
        async move { reached(&mut stopped, ShutdownPhase::Drained).await }
    };
    let admin = tokio::spawn(serve_admin(admin_listener, admin_state.clone(), admin_stop));

    let push = match &config.push_webhook_url {
        Some(url) => {
            let sink = kalandra_server::push::WebhookSink::new(url).context("push webhook")?;
            tracing::info!(%url, "forwarding push payloads to the webhook");
            Some(kalandra_server::push::PushQueue::start_counted(Arc::new(sink), Some(metrics.clone())))
        }
        None => None,
    };
    let started = std::time::Instant::now();
    let shard_count = std::thread::available_parallelism().map_or(1, usize::from);
    let node = Node::start::<MlsRoomGroup>(
        Arc::clone(&store),
        group_commit.clone(),
        shard_count,
        wall_clock(),
        metrics.clone(),
        NodeLimits {
            rooms_per_user_max: config.limits.rooms_per_user_max,
            push,
            server_signer: Arc::new(ServerSigner::new(server_key.clone())),
        },
    )
    .await
    .context("recovering rooms from storage")?;
    tracing::info!(
        elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        "rooms recovered"
    );
    let api = AdminApi::new(
        node.clone(),
        &admin_token.0,
        config.admin_read_token.as_ref().map(|token| token.0.as_str()),
    );
    admin_state.set_api(api);

    let server_config =
        quinn_server_config(&identity, config.limits.idle_timeout_ms).context("QUIC configuration")?;
    let endpoint = kalandra_server::tls::quinn_server_endpoint_on(server_config, quic_socket)
        .with_context(|| format!("starting QUIC on {}", config.listen))?;
    let quic_address = endpoint.local_addr().context("QUIC address")?;
    let listener = Listener::new(
        node.clone(),
        Arc::clone(&store),
        config.limits.clone(),
        wall_clock(),
        metrics.clone(),
        server_public_key,
    );
    let serving = tokio::spawn(Arc::clone(&listener).serve(endpoint.clone(), stopped.clone()));
    let gauges = tokio::spawn(kalandra_server::admin::gauge_loop(node.clone(), metrics.clone(), database));
    let retention = tokio::spawn(kalandra_server::erasure::retention_loop(
        node.clone(),
        kalandra_server::erasure::limits::RETENTION_INTERVAL_MS_DEFAULT,
    ));
    ready.store(true, Ordering::Release);
    println!("listening on quic://{quic_address} (admin http://{admin_address})");
    tracing::info!(%quic_address, %admin_address, data_dir = %config.data_dir.display(), "ready");

    let failed = wait_for_stop(&node, &mut signals, || reload_tls(&config, &endpoint)).await;
    ready.store(false, Ordering::Release);
    tracing::info!(failed, "draining");
    // Stop accepting and reading; make everything accepted durable and
    // queue its acknowledgements; then let connections say goodbye.
    let _ = stop.send(ShutdownPhase::Draining);
    retention.abort();
    gauges.abort();
    node.shutdown().await;
    let _ = stop.send(ShutdownPhase::Drained);
    let drain = Duration::from_millis(config.limits.drain_timeout_ms);
    if tokio::time::timeout(drain, serving).await.is_err() {
        tracing::warn!("connections did not close within the drain timeout");
    }
    group_commit.shutdown().await.map_err(|error| anyhow::anyhow!("flushing storage: {error}"))?;
    let _ = tokio::time::timeout(drain, admin).await;
    if failed || node.health().has_failed() {
        let cause = if node.health().shard_panicked() { "a shard task panicked" } else { "storage failed" };
        tracing::error!(
            cause,
            "stopped after a failure of the room core; restart to recover from durable state"
        );
        return Ok(ExitCode::FAILURE);
    }
    tracing::info!("stopped cleanly");
    Ok(ExitCode::SUCCESS)
}

/// The signals the server acts on.
struct Signals {
    terminate: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl Signals {
    fn watch() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals { terminate: signal(SignalKind::terminate())?, hangup: signal(SignalKind::hangup())? })
    }
}

/// The TLS identity the configuration names (created in the data directory
/// on first run when it names none).
fn load_identity(config: &ServerConfig) -> Result<ServerTlsIdentity, kalandra_server::tls::TlsError> {
    load_or_create_server_identity(
        &config.data_dir,
        config.tls_cert_path.as_deref(),
        config.tls_key_path.as_deref(),
    )
}

/// SIGHUP: re-reads the certificate and key; new connections get them,
/// open ones keep theirs. A certificate that does not load is logged and
/// the old one stays in use.
fn reload_tls(config: &ServerConfig, endpoint: &quinn::Endpoint) {
    let reloaded = load_identity(config).map_err(anyhow::Error::from).and_then(|identity| {
        let server_config = quinn_server_config(&identity, config.limits.idle_timeout_ms)?;
        endpoint.set_server_config(Some(server_config));
        Ok(identity.fingerprint_sha256_hex())
    });
    match reloaded {
        Ok(fingerprint) => {
            println!("reloaded the TLS certificate; fingerprint (sha256): {fingerprint}");
            tracing::info!(%fingerprint, "TLS certificate reloaded");
        }
        Err(error) => {
            tracing::error!(error = %format!("{error:#}"), "TLS certificate not reloaded; keeping the old one")
        }
    }
}

/// Waits for SIGTERM or SIGINT (`false`) or a failure of the room core
/// (`true`: storage failed or a shard task panicked);
/// calls `reload` on each SIGHUP.
async fn wait_for_stop(node: &Node, signals: &mut Signals, reload: impl Fn()) -> bool {
    let mut poll = tokio::time::interval(HEALTH_POLL_INTERVAL);
    loop {
        tokio::select! {
            _ = signals.terminate.recv() => return false,
            _ = tokio::signal::ctrl_c() => return false,
            _ = signals.hangup.recv() => reload(),
            _ = poll.tick() => if node.health().has_failed() { return true },
        }
    }
}
