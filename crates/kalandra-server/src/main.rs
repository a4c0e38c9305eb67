//! `kalandra-server`: the server binary.
//!
//! Zero configuration: `kalandra-server` stores everything in
//! `./kalandra-data` (an embedded redb database and a self-signed TLS
//! certificate created on first run, whose fingerprint it prints) and
//! listens for QUIC on 127.0.0.1:4433 and for admin HTTP on 127.0.0.1:9090.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser as _;
use kalandra_server::audit::{self, AuditExport};
use kalandra_server::store::redb::{CompactError, OpenError};
use kalandra_server::store::RedbStore;
use kalandra_server::{
    export_audit, init_logging, load_or_create_federation_key, verify_store, AuditCommand, CliArgs,
    FederationCommand, RunningServer, Server, ServerCommand, ServerConfig, AUDIT_EXPORT_RECORDS_MAX,
    DATABASE_FILE_NAME,
};

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
    match &cli.command {
        Some(ServerCommand::Audit { action }) => return audit_command(&config, action),
        Some(ServerCommand::Federation { action: FederationCommand::Key }) => return federation_key(&config),
        None => {}
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
    match runtime.block_on(run(config, &cli)) {
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

impl From<kalandra_server::StartError> for Fatal {
    fn from(error: kalandra_server::StartError) -> Fatal {
        let exit_code = if error.is_damaged_database() {
            EXIT_DATABASE_DAMAGED
        } else if error.is_configuration() {
            EXIT_CONFIG
        } else {
            EXIT_FAILURE
        };
        Fatal { error: error.into(), exit_code }
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

/// `kalandra-server federation key`: the domain and the federation public
/// key, the key created in the data directory if there is none.
fn federation_key(config: &ServerConfig) -> ExitCode {
    let loaded = std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data directory {}", config.data_dir.display()))
        .and_then(|()| {
            load_or_create_federation_key(&config.data_dir, rand::random())
                .context("loading the federation key")
        });
    match loaded {
        Ok((key, created)) => {
            if created {
                eprintln!("created the federation key in {}", config.data_dir.display());
            }
            println!("domain: {}", config.domain);
            println!("federation key: {}", hex::encode(key.verifying_key().to_bytes()));
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("kalandra-server: {error:#}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
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

async fn run(config: ServerConfig, cli: &CliArgs) -> Result<ExitCode, Fatal> {
    // Watched from the start: SIGHUP's default action would end the process.
    let mut signals = Signals::watch().context("watching signals")?;
    // Everything that can be refused is checked before anything is created.
    let server = Server::start(config).await?;
    let data_dir = server.config().data_dir.clone();
    if server.certificate_created() {
        println!("created a self-signed certificate in {}", data_dir.join("tls").display());
    }
    println!("certificate fingerprint (sha256): {}", server.fingerprint_hex());
    if server.server_key_created() {
        println!("created the server signing key in {}", data_dir.display());
    }
    println!("server signing key: {}", hex::encode(server.server_public_key()));
    if server.federation_key_created() {
        println!("created the federation key in {}", data_dir.display());
    }
    println!(
        "domain {}, federation key: {}",
        server.config().domain,
        hex::encode(server.federation_public_key())
    );
    if let Some(address) = server.federation_address() {
        println!("federation links on quic://{address} (ALPN kalandra-s2s/1)");
    }
    if let Some(path) = server.admin_token_file() {
        println!("admin API token in {}", path.display());
    }
    println!("listening on quic://{} (admin http://{})", server.quic_address(), server.admin_address());

    let failed = wait_for_stop(&server, &mut signals, cli).await;
    tracing::info!(failed, "draining");
    let stopped = server.shutdown().await.map_err(anyhow::Error::from)?;
    if failed || stopped.core_failed {
        let cause = if stopped.shard_panicked { "a shard task panicked" } else { "storage failed" };
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

/// SIGHUP: re-reads the certificate and key; new connections get them,
/// open ones keep theirs. A certificate that does not load is logged and
/// the old one stays in use.
fn reload_tls(server: &RunningServer) {
    match server.reload_tls() {
        Ok(fingerprint) => {
            println!("reloaded the TLS certificate; fingerprint (sha256): {fingerprint}");
            tracing::info!(%fingerprint, "TLS certificate reloaded");
        }
        Err(error) => {
            tracing::error!(error = %format!("{:#}", anyhow::Error::from(error)), "TLS certificate not reloaded; keeping the old one")
        }
    }
}

/// SIGHUP: re-reads the configuration and takes the peers' federation keys
/// from it (a peer rotated its key). A configuration that does not load
/// is logged and the keys in force stay.
fn reload_federation_keys(server: &RunningServer, cli: &CliArgs) {
    let config = match ServerConfig::load(cli) {
        Ok(config) => config,
        Err(error) => {
            tracing::error!(%error, "configuration not reloaded; the peers' keys in force stay");
            return;
        }
    };
    match server.reload_federation_keys(&config) {
        Ok(reload) => {
            for domain in &reload.changed {
                println!("reloaded the federation keys of {domain}");
                tracing::info!(%domain, "federation keys reloaded");
            }
            for domain in &reload.not_applied {
                tracing::warn!(%domain, "a peer added, removed, refused or accepted again takes a restart");
            }
        }
        Err(error) => tracing::error!(%error, "federation keys not reloaded; the keys in force stay"),
    }
}

/// Waits for SIGTERM or SIGINT (`false`) or a failure of the room core
/// (`true`: storage failed or a shard task panicked); reloads the
/// certificate and the peers' federation keys on each SIGHUP.
async fn wait_for_stop(server: &RunningServer, signals: &mut Signals, cli: &CliArgs) -> bool {
    let mut poll = tokio::time::interval(HEALTH_POLL_INTERVAL);
    loop {
        tokio::select! {
            _ = signals.terminate.recv() => return false,
            _ = tokio::signal::ctrl_c() => return false,
            _ = signals.hangup.recv() => {
                reload_tls(server);
                reload_federation_keys(server, cli);
            }
            _ = poll.tick() => if server.health().has_failed() { return true },
        }
    }
}
