//! Idle connections: N authenticated connections that send nothing; the
//! server's resident memory per connection.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;

use super::{check_range, Common};
use crate::limits::{CONNECTIONS_MAX, CONNECTIONS_SETTLE_MS};
use crate::members::{connect_keys, member_seed, Clients};
use crate::procfs;
use crate::report::Report;
use crate::BenchError;

/// Parameters of a connections run.
#[derive(Debug, Clone)]
pub struct ConnectionsParams {
    /// Connections to open.
    pub count: usize,
}

/// Runs the scenario. Needs the server's pid.
pub async fn run(
    clients: &Arc<Clients>,
    common: Common,
    params: &ConnectionsParams,
) -> Result<Report, BenchError> {
    check_range("count", params.count as u64, 1, CONNECTIONS_MAX as u64)?;
    let pid = clients.target.pid.ok_or_else(|| {
        BenchError::Usage("the connections scenario reads the server's memory: let the tool start the server, or pass --server-pid".into())
    })?;
    let mut report = Report::new("connections");
    report.parameter("count", params.count).parameter("client_endpoints", clients.endpoint_count());
    let keys: Vec<SigningKey> = (0..params.count)
        .map(|i| SigningKey::from_bytes(&member_seed(common.nonce, "connections", 0, i as u64)))
        .collect();
    // One connection first, so that one-time allocations are not counted per connection.
    let warm =
        connect_keys(clients, vec![SigningKey::from_bytes(&member_seed(common.nonce, "warm", 0, 0))]).await?;
    tokio::time::sleep(Duration::from_millis(CONNECTIONS_SETTLE_MS)).await;
    let before = procfs::sample(pid)?;
    let started = Instant::now();
    let connections = connect_keys(clients, keys).await?;
    let connect_seconds = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(CONNECTIONS_SETTLE_MS)).await;
    let after = procfs::sample(pid)?;
    let generator = procfs::sample_self()?;
    #[allow(clippy::cast_precision_loss)]
    {
        let delta = after.rss_bytes.saturating_sub(before.rss_bytes) as f64;
        let per_connection = delta / params.count as f64;
        report.figure("connections", connections.len() as f64, "connections");
        report.figure("connect_seconds", connect_seconds, "s");
        report.figure("connections_per_second", params.count as f64 / connect_seconds, "connections/s");
        report.figure("server_rss_before_mib", before.rss_bytes as f64 / 1_048_576.0, "MiB");
        report.figure("server_rss_after_mib", after.rss_bytes as f64 / 1_048_576.0, "MiB");
        report.figure("server_bytes_per_connection", per_connection, "bytes");
        report.figure("generator_rss_mib", generator.rss_bytes as f64 / 1_048_576.0, "MiB");
        report.goal("server memory per idle connection", per_connection, 20_000.0, "bytes", false);
    }
    report.note("RSS delta of the server process (VmRSS) between one warm connection and all of them, settled, divided by the count");
    drop(connections);
    drop(warm);
    Ok(report)
}
