//! The baseline: the same frames, publishers and acknowledgement
//! discipline through NATS JetStream (one replica, file storage). Each
//! publisher has its own client connection, publishes to its room's
//! subject, and keeps at most `window` publishes unacknowledged.

use std::future::IntoFuture as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt as _};

use crate::progress::Progress;
use crate::report::Report;
use crate::scenarios::CpuWindow;
use crate::stats::Latencies;
use crate::BenchError;

/// The stream the baseline writes; deleted before and after a run.
pub const STREAM_NAME: &str = "KALANDRA_BENCH";
/// Its subjects.
pub const STREAM_SUBJECTS: &str = "kalandra-bench.>";

fn failed(what: &str, error: impl std::fmt::Display) -> BenchError {
    BenchError::JetStream(format!("{what}: {error}"))
}

/// Publishes `frames[i]` from publisher `i` to `subjects[i]` and reports
/// acknowledged messages per second and the acknowledgement latency.
pub async fn run(
    url: &str,
    server_pid: Option<u32>,
    frames: Vec<Vec<Bytes>>,
    subjects: Vec<String>,
    window: usize,
    quiet: bool,
) -> Result<Report, BenchError> {
    let mut report = Report::new("throughput-jetstream");
    report.parameter("publishers", frames.len()).parameter("window", window).parameter("url", url);
    let admin = async_nats::connect(url).await.map_err(|e| failed(&format!("connecting to {url}"), e))?;
    let context = jetstream::new(admin.clone());
    let _ = context.delete_stream(STREAM_NAME).await;
    let info = context
        .create_stream(stream::Config {
            name: STREAM_NAME.to_owned(),
            subjects: vec![STREAM_SUBJECTS.to_owned()],
            storage: stream::StorageType::File,
            num_replicas: 1,
            ..Default::default()
        })
        .await
        .map_err(|e| failed("creating the stream", e))?;
    drop(info);

    let mut clients = Vec::with_capacity(frames.len());
    for _ in 0..frames.len() {
        clients.push(async_nats::connect(url).await.map_err(|e| failed("connecting a publisher", e))?);
    }
    let total: usize = frames.iter().map(Vec::len).sum();
    let progress = Progress::start("jetstream: acknowledged", total as u64, quiet);
    let counter = progress.counter();
    let cpu = CpuWindow::start(server_pid);
    let timed = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for ((client, frames), subject) in clients.into_iter().zip(frames).zip(subjects) {
        let counter = Arc::clone(&counter);
        tasks.spawn(publisher(client, frames, subject, window, counter));
    }
    let mut latencies = Latencies::new();
    let mut acked = 0u64;
    let mut last_done = timed;
    while let Some(result) = tasks.join_next().await {
        let (publisher_latencies, publisher_acked, done_at) =
            result.map_err(|e| failed("publisher task", e))??;
        latencies.merge(&publisher_latencies);
        acked += publisher_acked;
        last_done = last_done.max(done_at);
    }
    let elapsed = last_done.duration_since(timed).as_secs_f64();
    progress.finish().await;
    cpu.finish(&mut report);
    let _ = context.delete_stream(STREAM_NAME).await;
    #[allow(clippy::cast_precision_loss)]
    let acked_f = acked as f64;
    report.figure("acked_frames", acked_f, "messages");
    report.figure("elapsed_seconds", elapsed, "s");
    report.figure("acked_frames_per_second", acked_f / elapsed, "messages/s");
    report.figure("ack_latency_p50_ms", latencies.quantile_ms(0.50), "ms");
    report.figure("ack_latency_p99_ms", latencies.quantile_ms(0.99), "ms");
    report.figure("ack_latency_p999_ms", latencies.quantile_ms(0.999), "ms");
    report.figure("ack_latency_max_ms", latencies.max_ms(), "ms");
    report.note(
        "payloads are the same sealed Kalandra frames; a publish counts when JetStream's PubAck arrives",
    );
    Ok(report)
}

async fn publisher(
    client: async_nats::Client,
    frames: Vec<Bytes>,
    subject: String,
    window: usize,
    counter: Arc<AtomicU64>,
) -> Result<(Latencies, u64, Instant), BenchError> {
    let context = jetstream::new(client);
    let mut latencies = Latencies::new();
    let mut in_flight = FuturesUnordered::new();
    let mut acked = 0u64;
    let mut frames = frames.into_iter();
    loop {
        while in_flight.len() < window.max(1) {
            let Some(frame) = frames.next() else { break };
            let sent = Instant::now();
            let ack = context.publish(subject.clone(), frame).await.map_err(|e| failed("publishing", e))?;
            in_flight.push(async move { (sent, ack.into_future().await) });
        }
        let Some((sent, result)) = in_flight.next().await else { break };
        result.map_err(|e| failed("acknowledgement", e))?;
        latencies.record(sent.elapsed());
        acked += 1;
        counter.fetch_add(1, Ordering::Relaxed);
    }
    Ok((latencies, acked, Instant::now()))
}
