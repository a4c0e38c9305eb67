//! `kalandra-bench`: drives a `kalandra-server` over QUIC on loopback with
//! authenticated MLS clients and prints what it measured. See `--help` and
//! the README's "Benchmarks" section.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use kalandra_bench::error::EXIT_OTHER;
use kalandra_bench::members::{member_seed, run_nonce, Clients};
use kalandra_bench::report::Report;
use kalandra_bench::scenarios::{self, Common};
use kalandra_bench::server::{default_server_binary, ServerProcess, ServerTarget};
use kalandra_bench::BenchError;

/// Load generator for Kalandra: real server process, real MLS clients, QUIC on loopback.
#[derive(Parser, Debug)]
#[command(name = "kalandra-bench", version)]
struct Cli {
    /// Address of a running server (QUIC); without it, the tool starts
    /// `kalandra-server` on a free loopback port with a temporary data directory.
    #[arg(long, global = true)]
    server: Option<SocketAddr>,
    /// SHA-256 fingerprint (hex) of the running server's certificate; required with --server.
    #[arg(long, global = true)]
    fingerprint: Option<String>,
    /// Process id of the running server, to read its CPU time and memory.
    #[arg(long, global = true)]
    server_pid: Option<u32>,
    /// The server binary to start (default: `kalandra-server` next to this executable).
    #[arg(long, global = true)]
    server_bin: Option<PathBuf>,
    /// Data directory for the started server (default: a temporary directory, removed afterwards).
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// Print JSON (an array of reports) instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// No progress line on standard error.
    #[arg(long, global = true)]
    quiet: bool,
    /// How long connecting to the server may take, in milliseconds.
    #[arg(long, global = true, default_value_t = 5_000)]
    connect_timeout_ms: u64,
    /// Client UDP sockets that connections are spread over.
    #[arg(long, global = true, default_value_t = 16)]
    endpoints: usize,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand, Debug)]
enum Scenario {
    /// Acknowledged durable frames per second and acknowledgement latency.
    Throughput {
        /// Rooms.
        #[arg(long, default_value_t = 32)]
        rooms: usize,
        /// Members per room (all connected and subscribed).
        #[arg(long, default_value_t = 2)]
        members: usize,
        /// Senders per room.
        #[arg(long, default_value_t = 1)]
        senders_per_room: usize,
        /// Frames per sender.
        #[arg(long, default_value_t = 20_000)]
        frames_per_sender: usize,
        /// Unacknowledged frames per sender at most.
        #[arg(long, default_value_t = 64)]
        window: usize,
        /// Plaintext bytes per message.
        #[arg(long, default_value_t = 256)]
        message_bytes: usize,
        /// Receivers verify signatures and decrypt every frame.
        #[arg(long)]
        verify: bool,
        /// Run the same load against this NATS JetStream server too (`nats://127.0.0.1:4222`).
        #[arg(long)]
        jetstream: Option<String>,
        /// The JetStream server's process id, for its CPU time.
        #[arg(long)]
        jetstream_pid: Option<u32>,
    },
    /// Send-to-received-by-all latency at a fixed rate.
    Latency {
        /// Members of the room.
        #[arg(long, default_value_t = 100)]
        members: usize,
        /// Senders (the rate is split between them).
        #[arg(long, default_value_t = 10)]
        senders: usize,
        /// Frames per second in all.
        #[arg(long, default_value_t = 10_000)]
        rate: u64,
        /// Seconds of load.
        #[arg(long, default_value_t = 10)]
        duration_s: u64,
        /// Plaintext bytes per message.
        #[arg(long, default_value_t = 256)]
        message_bytes: usize,
        /// Unacknowledged frames per sender at most.
        #[arg(long, default_value_t = 1_024)]
        window: usize,
    },
    /// Deliveries per second into one large room.
    Fanout {
        /// Members of the room.
        #[arg(long, default_value_t = 10_000)]
        members: usize,
        /// Frames sent by one member.
        #[arg(long, default_value_t = 200)]
        frames: usize,
        /// Unacknowledged frames at most.
        #[arg(long, default_value_t = 64)]
        window: usize,
        /// Plaintext bytes per message.
        #[arg(long, default_value_t = 256)]
        message_bytes: usize,
    },
    /// Commit submitted → acknowledged in large rooms.
    Commit {
        /// Room sizes, comma-separated.
        #[arg(long, value_delimiter = ',', default_values_t = vec![1_000usize, 10_000])]
        members: Vec<usize>,
        /// Commits of each kind per size.
        #[arg(long, default_value_t = 5)]
        iterations: usize,
    },
    /// Server memory per idle authenticated connection.
    Connections {
        /// Connections.
        #[arg(long, default_value_t = 10_000)]
        count: usize,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("kalandra-bench: cannot start the runtime: {error}");
            return ExitCode::from(EXIT_OTHER);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("kalandra-bench: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}

async fn run(cli: Cli) -> Result<(), BenchError> {
    let (target, process) = match cli.server {
        Some(address) => {
            let text = cli.fingerprint.as_deref().ok_or_else(|| {
                BenchError::Usage("--server needs --fingerprint (the server prints it at start)".into())
            })?;
            let fingerprint = client_core::connection::parse_fingerprint(text)
                .ok_or_else(|| BenchError::Usage(format!("--fingerprint {text:?} is not 64 hex digits")))?;
            (ServerTarget { address, fingerprint, pid: cli.server_pid }, None)
        }
        None => {
            let binary = cli.server_bin.clone().or_else(default_server_binary).ok_or_else(|| BenchError::ServerStart {
                path: PathBuf::from("kalandra-server"),
                detail: "not found next to kalandra-bench; build it (cargo build --release -p kalandra-server) or pass --server-bin".into(),
            })?;
            let data_dir = cli.data_dir.clone();
            let process =
                tokio::task::spawn_blocking(move || ServerProcess::start(&binary, data_dir.as_deref()))
                    .await
                    .map_err(|e| BenchError::client("server start task", e))??;
            (process.target.clone(), Some(process))
        }
    };
    let clients =
        Arc::new(Clients::new(target, cli.endpoints, Duration::from_millis(cli.connect_timeout_ms))?);
    let common = Common { nonce: run_nonce(), quiet: cli.quiet || cli.json };
    // Reachability first, so that a wrong address fails at once and clearly.
    let probe = ed25519_dalek::SigningKey::from_bytes(&member_seed(common.nonce, "probe", 0, 0));
    drop(clients.connect(&probe).await?);

    let result = run_scenario(&clients, common, cli.scenario).await;
    clients.close();
    if let Some(process) = process {
        let stopped = tokio::task::spawn_blocking(move || process.stop()).await;
        if let Ok(Err(error)) = stopped {
            eprintln!("kalandra-bench: {error}");
        }
    }
    let reports = result?;
    if cli.json {
        let text = serde_json::to_string_pretty(&reports)
            .map_err(|e| BenchError::Io { what: "writing JSON", detail: e.to_string() })?;
        println!("{text}");
    } else {
        for report in &reports {
            println!("{}", report.to_table());
        }
    }
    Ok(())
}

async fn run_scenario(
    clients: &Arc<Clients>,
    common: Common,
    scenario: Scenario,
) -> Result<Vec<Report>, BenchError> {
    match scenario {
        Scenario::Throughput {
            rooms,
            members,
            senders_per_room,
            frames_per_sender,
            window,
            message_bytes,
            verify,
            jetstream,
            jetstream_pid,
        } => {
            let params = scenarios::throughput::ThroughputParams {
                rooms,
                members,
                senders_per_room,
                frames_per_sender,
                window,
                message_bytes,
                verify,
                jetstream_url: jetstream,
                jetstream_pid,
            };
            scenarios::throughput::run(clients, common, &params).await
        }
        Scenario::Latency { members, senders, rate, duration_s, message_bytes, window } => {
            let params = scenarios::latency::LatencyParams {
                members,
                senders,
                rate,
                duration_seconds: duration_s,
                message_bytes,
                window,
            };
            Ok(vec![scenarios::latency::run(clients, common, &params).await?])
        }
        Scenario::Fanout { members, frames, window, message_bytes } => {
            let params = scenarios::fanout::FanoutParams { members, frames, window, message_bytes };
            Ok(vec![scenarios::fanout::run(clients, common, &params).await?])
        }
        Scenario::Commit { members, iterations } => {
            let params = scenarios::commit::CommitParams { sizes: members, iterations };
            scenarios::commit::run(clients, common, &params).await
        }
        Scenario::Connections { count } => {
            let params = scenarios::connections::ConnectionsParams { count };
            Ok(vec![scenarios::connections::run(clients, common, &params).await?])
        }
    }
}
