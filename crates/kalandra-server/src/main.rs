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
use kalandra_server::store::{RedbStore, Store};
use kalandra_server::tls::{load_or_create_server_identity, quinn_server_config};

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
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("kalandra-server: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// `kalandra-server audit verify|export`: offline, on an export or on the
/// stopped server's database.
fn audit_command(config: &ServerConfig, action: &AuditCommand) -> ExitCode {
    let open = || {
        let database = config.data_dir.join(DATABASE_FILE_NAME);
        RedbStore::open(&database).with_context(|| format!("opening database {}", database.display()))
    };
    let result: anyhow::Result<ExitCode> = (|| match action {
        AuditCommand::Verify { file: Some(file) } => {
            let text =
                std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
            let export: AuditExport =
                serde_json::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;
            Ok(report_verification(audit::verify_export(&export)))
        }
        AuditCommand::Verify { file: None } => {
            let store = open()?;
            let verified = verify_store(&store).map_err(anyhow::Error::msg)?;
            Ok(report_verification(verified))
        }
        AuditCommand::Export => {
            let store = open()?;
            let export = export_audit(&store, 0, AUDIT_EXPORT_RECORDS_MAX).map_err(anyhow::Error::msg)?;
            println!("{}", serde_json::to_string_pretty(&export)?);
            Ok(ExitCode::SUCCESS)
        }
    })();
    result.unwrap_or_else(|error| {
        eprintln!("kalandra-server: {error:#}");
        ExitCode::from(2)
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
            ExitCode::FAILURE
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

async fn run(config: ServerConfig) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
    let database = config.data_dir.join(DATABASE_FILE_NAME);
    let store: Arc<dyn Store> = Arc::new(
        RedbStore::open(&database).with_context(|| format!("opening database {}", database.display()))?,
    );
    let group_commit = GroupCommit::start(Arc::clone(&store), GroupCommitConfig::default())
        .context("starting the storage writer")?;

    let identity = load_or_create_server_identity(
        &config.data_dir,
        config.tls_cert_path.as_deref(),
        config.tls_key_path.as_deref(),
    )
    .context("loading the TLS certificate")?;
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
    let admin_listener = tokio::net::TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("binding admin HTTP on {}", config.admin_listen))?;
    let admin_address = admin_listener.local_addr()?;
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
    let endpoint = kalandra_server::tls::quinn_server_endpoint(server_config, config.listen)
        .with_context(|| format!("binding QUIC on {}", config.listen))?;
    let quic_address = endpoint.local_addr()?;
    let listener = Listener::new(
        node.clone(),
        Arc::clone(&store),
        config.limits.clone(),
        wall_clock(),
        metrics.clone(),
        server_public_key,
    );
    let serving = tokio::spawn(Arc::clone(&listener).serve(endpoint, stopped.clone()));
    let gauges = tokio::spawn(kalandra_server::admin::gauge_loop(node.clone(), metrics.clone(), database));
    let retention = tokio::spawn(kalandra_server::erasure::retention_loop(
        node.clone(),
        kalandra_server::erasure::limits::RETENTION_INTERVAL_MS_DEFAULT,
    ));
    ready.store(true, Ordering::Release);
    println!("listening on quic://{quic_address} (admin http://{admin_address})");
    tracing::info!(%quic_address, %admin_address, data_dir = %config.data_dir.display(), "ready");

    let failed = wait_for_stop(&node).await;
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
    group_commit.shutdown().await.context("flushing storage")?;
    let _ = tokio::time::timeout(drain, admin).await;
    if failed || node.health().has_failed() {
        tracing::error!("stopped after a storage failure; restart to recover from durable state");
        return Ok(ExitCode::FAILURE);
    }
    tracing::info!("stopped cleanly");
    Ok(ExitCode::SUCCESS)
}

/// Waits for SIGTERM or SIGINT (`false`) or a storage failure (`true`).
async fn wait_for_stop(node: &Node) -> bool {
    let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(signal) => signal,
        Err(error) => {
            tracing::warn!(%error, "cannot watch SIGTERM");
            return false;
        }
    };
    let mut poll = tokio::time::interval(HEALTH_POLL_INTERVAL);
    loop {
        tokio::select! {
            _ = terminate.recv() => return false,
            _ = tokio::signal::ctrl_c() => return false,
            _ = poll.tick() => if node.health().has_failed() { return true },
        }
    }
}
