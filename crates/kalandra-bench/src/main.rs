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
    /// Two linked domains (servers a and b, started by the tool): relay lag
    /// and throughput of senders on b in rooms of a, against local rooms.
    Federation {
        /// Receivers on a in the lag part (the room's creator included).
        #[arg(long, default_value_t = 2)]
        a_receivers: usize,
        /// Receivers on b in the lag part.
        #[arg(long, default_value_t = 2)]
        b_receivers: usize,
        /// Frames per second of the lag part's sender.
        #[arg(long, default_value_t = 200)]
        rate: u64,
        /// Seconds of load of the lag part, per room and round.
        #[arg(long, default_value_t = 5)]
        duration_s: u64,
        /// Rounds of the lag part, each a local room and a room across, alternating which goes first.
        #[arg(long, default_value_t = 4)]
        rounds: usize,
        /// Unacknowledged frames of the lag part's sender at most.
        #[arg(long, default_value_t = 64)]
        window: usize,
        /// Plaintext bytes per message.
        #[arg(long, default_value_t = 256)]
        message_bytes: usize,
        /// Pipelined senders of the throughput part (on b; as many on a for the baseline).
        #[arg(long, default_value_t = 4)]
        senders: usize,
        /// Frames per throughput sender.
        #[arg(long, default_value_t = 5_000)]
        frames_per_sender: usize,
        /// Unacknowledged frames per throughput sender at most.
        #[arg(long, default_value_t = 16)]
        throughput_window: usize,
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
    if matches!(cli.scenario, Scenario::Federation { .. }) {
        return run_federation(cli).await;
    }
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
            let binary = server_binary(&cli)?;
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
    print_reports(&result?, cli.json)
}

fn print_reports(reports: &[Report], json: bool) -> Result<(), BenchError> {
    if json {
        let text = serde_json::to_string_pretty(reports)
            .map_err(|e| BenchError::Io { what: "writing JSON", detail: e.to_string() })?;
        println!("{text}");
    } else {
        for report in reports {
            println!("{}", report.to_table());
        }
    }
    Ok(())
}

/// The federation scenario: starts servers a and b itself, linked.
async fn run_federation(cli: Cli) -> Result<(), BenchError> {
    if cli.server.is_some() {
        return Err(BenchError::Usage("federation starts its own two servers; --server is not used".into()));
    }
    let binary = server_binary(&cli)?;
    let Scenario::Federation {
        a_receivers,
        b_receivers,
        rate,
        duration_s,
        rounds,
        window,
        message_bytes,
        senders,
        frames_per_sender,
        throughput_window,
    } = cli.scenario
    else {
        return Err(BenchError::Usage("not the federation scenario".into()));
    };
    let common = Common { nonce: run_nonce(), quiet: cli.quiet || cli.json };
    let data_dir = cli.data_dir.clone();
    let nonce = common.nonce;
    let mut pair = tokio::task::spawn_blocking(move || {
        scenarios::federation::ServerPair::start(&binary, data_dir.as_deref(), nonce)
    })
    .await
    .map_err(|e| BenchError::client("server start task", e))??;
    let timeout = Duration::from_millis(cli.connect_timeout_ms);
    let clients = Clients::new(pair.a.target.clone(), cli.endpoints, timeout)
        .and_then(|a| Ok((a, Clients::new(pair.b.target.clone(), cli.endpoints, timeout)?)));
    let result = match clients {
        Ok((a, b)) => {
            let (a, b) = (Arc::new(a), Arc::new(b));
            let params = scenarios::federation::FederationParams {
                a_receivers,
                b_receivers,
                rate,
                duration_seconds: duration_s,
                rounds,
                window,
                message_bytes,
                senders,
                frames_per_sender,
                throughput_window,
            };
            let mut result = scenarios::federation::run(&a, &b, common, &params).await;
            if let Ok(reports) = &mut result {
                match scenarios::federation::catch_up(&a, &b, &mut pair, common, &params).await {
                    Ok(report) => reports.push(report),
                    Err(error) => result = Err(error),
                }
            }
            a.close();
            b.close();
            result
        }
        Err(error) => Err(error),
    };
    let stopped = tokio::task::spawn_blocking(move || pair.stop()).await;
    if let Ok(Err(error)) = stopped {
        eprintln!("kalandra-bench: {error}");
    }
    print_reports(&result?, cli.json)
}

/// The server binary to start: `--server-bin`, or the one next to this executable.
fn server_binary(cli: &Cli) -> Result<PathBuf, BenchError> {
    cli.server_bin.clone().or_else(default_server_binary).ok_or_else(|| BenchError::ServerStart {
        path: PathBuf::from("kalandra-server"),
        detail: "not found next to kalandra-bench; build it (cargo build --release -p kalandra-server) or pass --server-bin".into(),
    })
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
        Scenario::Federation { .. } => {
            Err(BenchError::Usage("federation starts its own servers and runs on its own".into()))
        }
    }
}
