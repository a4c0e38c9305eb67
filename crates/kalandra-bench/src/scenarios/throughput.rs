//! Throughput: R rooms × M members, S senders per room at full speed with
//! a bounded window; acknowledged durable frames per second and the
//! acknowledgement latency. Optionally the same load through JetStream.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::{
    check_range, pipelined_sender, receive_loop, report_rejections, wait_for_count, Common, CpuWindow,
    Deliveries, Verifier,
};
use crate::limits::{
    DRAIN_TIMEOUT_MS, FRAMES_PER_RUN_MAX, MESSAGE_BYTES_MAX, MESSAGE_BYTES_MIN, ROOMS_MAX, ROOM_MEMBERS_MAX,
    WINDOW_MAX,
};
use crate::members::{build_room, room_id, seal_all, Clients, RoomPlan};
use crate::progress::Progress;
use crate::report::Report;
use crate::stats::Latencies;
use crate::BenchError;

/// Parameters of a throughput run.
#[derive(Debug, Clone)]
pub struct ThroughputParams {
    /// Rooms.
    pub rooms: usize,
    /// Members per room, the creator included; all connected and subscribed.
    pub members: usize,
    /// Senders per room (the first members).
    pub senders_per_room: usize,
    /// Frames each sender sends.
    pub frames_per_sender: usize,
    /// Unacknowledged frames per sender at most.
    pub window: usize,
    /// Plaintext bytes per message.
    pub message_bytes: usize,
    /// Every receiver verifies and decrypts every frame (slow: for checks, not for figures).
    pub verify: bool,
    /// A JetStream server to run the same load against (`nats://…`).
    pub jetstream_url: Option<String>,
    /// That server's process id, for its CPU time.
    pub jetstream_pid: Option<u32>,
}

impl ThroughputParams {
    fn check(&self) -> Result<(), BenchError> {
        check_range("rooms", self.rooms as u64, 1, ROOMS_MAX as u64)?;
        check_range("members", self.members as u64, 1, ROOM_MEMBERS_MAX as u64)?;
        check_range("senders-per-room", self.senders_per_room as u64, 1, self.members as u64)?;
        check_range("window", self.window as u64, 1, WINDOW_MAX as u64)?;
        check_range(
            "message-bytes",
            self.message_bytes as u64,
            MESSAGE_BYTES_MIN as u64,
            MESSAGE_BYTES_MAX as u64,
        )?;
        let total = self.rooms * self.senders_per_room * self.frames_per_sender;
        check_range("frames in all", total as u64, 1, FRAMES_PER_RUN_MAX as u64)
    }
}

/// Runs the scenario; the JetStream report follows if a URL was given.
pub async fn run(
    clients: &Arc<Clients>,
    common: Common,
    params: &ThroughputParams,
) -> Result<Vec<Report>, BenchError> {
    params.check()?;
    let mut report = Report::new("throughput");
    report
        .parameter("rooms", params.rooms)
        .parameter("members_per_room", params.members)
        .parameter("senders_per_room", params.senders_per_room)
        .parameter("frames_per_sender", params.frames_per_sender)
        .parameter("window", params.window)
        .parameter("message_bytes", params.message_bytes)
        .parameter("verify", params.verify);

    let setup = Instant::now();
    let joiners = if params.verify { params.members - 1 } else { params.senders_per_room - 1 };
    let mut rooms = Vec::with_capacity(params.rooms);
    for room in 0..params.rooms {
        let plan = RoomPlan {
            room_id: room_id(common.nonce, "throughput", room as u64),
            members: params.members,
            joiners,
            welcome: joiners > 0,
            connect_members: true,
            seed: (common.nonce, "throughput", room as u64),
        };
        rooms.push(build_room(clients, &plan).await?);
    }
    report.figure("setup_seconds", setup.elapsed().as_secs_f64(), "s");

    let jobs: Vec<_> = rooms
        .iter()
        .flat_map(|room| {
            room.members[..params.senders_per_room]
                .iter()
                .map(move |m| (m, room.room_id, params.frames_per_sender))
        })
        .collect();
    let (sealed, seal_seconds) = seal_all(&jobs, params.message_bytes)?;
    let total_frames: usize = sealed.iter().map(Vec::len).sum();
    #[allow(clippy::cast_precision_loss)]
    let total_f = total_frames as f64;
    report.figure("frame_bytes", sealed[0][0].len() as f64, "bytes");
    report.figure("client_seal_frames_per_second", total_f / seal_seconds, "frames/s");

    // Receivers: every member that does not send.
    let stop = Arc::new(AtomicBool::new(false));
    let deliveries = Arc::new(Deliveries::default());
    let started = Instant::now();
    let mut receivers = tokio::task::JoinSet::new();
    let mut sender_connections = Vec::new();
    for room in &mut rooms {
        for (index, connection) in room.connections.iter_mut().enumerate() {
            let connection = connection.take().expect("every member is connected");
            if index < params.senders_per_room {
                sender_connections.push(connection);
                continue;
            }
            let verifier = if params.verify { Some(Verifier::new(&room.members[index])?) } else { None };
            receivers.spawn(receive_loop(
                connection,
                Arc::clone(&stop),
                Arc::clone(&deliveries),
                started,
                verifier,
                |_, _| {},
            ));
        }
    }

    let progress = Progress::start("throughput: acknowledged", total_frames as u64, common.quiet);
    let counter = progress.counter();
    let cpu = CpuWindow::start(clients.target.pid);
    let timed = Instant::now();
    let mut senders = tokio::task::JoinSet::new();
    for (mut connection, frames) in sender_connections.into_iter().zip(sealed) {
        let counter = Arc::clone(&counter);
        let window = params.window;
        senders.spawn(async move {
            let outcome = pipelined_sender(&mut connection, &frames, window, &counter, false).await;
            outcome.map(|outcome| (outcome, connection, Instant::now()))
        });
    }
    let mut latencies = Latencies::new();
    let (mut acked, mut sender_deliveries) = (0u64, 0u64);
    let mut rejected: HashMap<u16, u64> = HashMap::new();
    let mut last_done = timed;
    let mut keep = Vec::new();
    while let Some(result) = senders.join_next().await {
        let (outcome, connection, done_at) = result.map_err(|e| BenchError::client("sender task", e))??;
        latencies.merge(&outcome.latencies);
        acked += outcome.acked;
        sender_deliveries += outcome.deliveries;
        for (code, count) in outcome.rejected {
            *rejected.entry(code).or_insert(0) += count;
        }
        last_done = last_done.max(done_at);
        keep.push(connection);
    }
    let elapsed = last_done.duration_since(timed).as_secs_f64();
    progress.finish().await;
    cpu.finish(&mut report);

    // Deliveries to the members that do not send; senders count theirs above.
    let receivers_per_room = (params.members - params.senders_per_room) as u64;
    let expected_receiver = acked * receivers_per_room;
    let complete = wait_for_count(&deliveries.received, expected_receiver).await;
    stop.store(true, Ordering::Release);
    while let Some(result) = receivers.join_next().await {
        result.map_err(|e| BenchError::client("receiver task", e))??;
    }

    #[allow(clippy::cast_precision_loss)]
    let acked_f = acked as f64;
    let rate = acked_f / elapsed;
    report.figure("acked_frames", acked_f, "frames");
    report.figure("elapsed_seconds", elapsed, "s");
    report.figure("acked_frames_per_second", rate, "frames/s");
    report.figure("ack_latency_p50_ms", latencies.quantile_ms(0.50), "ms");
    report.figure("ack_latency_p99_ms", latencies.quantile_ms(0.99), "ms");
    report.figure("ack_latency_p999_ms", latencies.quantile_ms(0.999), "ms");
    report.figure("ack_latency_max_ms", latencies.max_ms(), "ms");
    let refused = report_rejections(&mut report, &rejected);
    #[allow(clippy::cast_precision_loss)]
    {
        report.figure("refused_frames", refused as f64, "frames");
        // Senders stop reading once their own frames are acknowledged, so
        // only the members that do not send are counted.
        report.figure("receiver_deliveries", deliveries.received.load(Ordering::Relaxed) as f64, "frames");
        report.figure("receiver_deliveries_expected", expected_receiver as f64, "frames");
        report.figure("sender_deliveries", sender_deliveries as f64, "frames");
        report.figure("resync_notices", deliveries.resyncs.load(Ordering::Relaxed) as f64, "notices");
        if params.verify {
            report.figure("verified", deliveries.verified.load(Ordering::Relaxed) as f64, "frames");
            report.figure(
                "verify_failures",
                deliveries.verify_failures.load(Ordering::Relaxed) as f64,
                "frames",
            );
        }
    }
    if !complete {
        report.note(format!(
            "not every delivery arrived within {DRAIN_TIMEOUT_MS} ms after the last acknowledgement"
        ));
    }
    report.goal("acked frames per second", rate, 100_000.0, "frames/s", true);
    report.goal("ack p99", latencies.quantile_ms(0.99), 10.0, "ms", false);
    report.note("frames are encrypted (sender keys) and signed before the timed part; the generator and the server share the machine's cores");
    drop(keep);

    let mut reports = vec![report];
    if let Some(url) = &params.jetstream_url {
        let jobs: Vec<_> = rooms
            .iter()
            .flat_map(|room| {
                room.members[..params.senders_per_room]
                    .iter()
                    .map(move |m| (m, room.room_id, params.frames_per_sender))
            })
            .collect();
        let (sealed, _) = seal_all(&jobs, params.message_bytes)?;
        let subjects: Vec<String> = (0..rooms.len())
            .flat_map(|room| (0..params.senders_per_room).map(move |_| format!("kalandra-bench.room.{room}")))
            .collect();
        let mut baseline =
            crate::jetstream::run(url, params.jetstream_pid, sealed, subjects, params.window, common.quiet)
                .await?;
        if let Some(jetstream_rate) = baseline.value("acked_frames_per_second") {
            let ratio = rate / jetstream_rate;
            baseline.figure("kalandra_over_jetstream", ratio, "×");
            baseline.goal("Kalandra / JetStream throughput", ratio, 1.5, "×", true);
        }
        reports.push(baseline);
    }
    Ok(reports)
}
