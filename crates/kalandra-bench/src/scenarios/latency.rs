//! Latency: one room of M members, S of them sending at a fixed total
//! rate; for every frame, the time from its send to its arrival at the
//! last of the other members.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use client_core::connection::Connection;
use kalandra_proto::payload::{Ack, Error as ErrorPayload};
use kalandra_proto::{ErrorCode, Opcode};

use super::{check_range, nanos_since, receive_loop, wait_until, Common, CpuWindow, Deliveries};
use crate::limits::{
    DRAIN_TIMEOUT_MS, DURATION_SECONDS_MAX, FRAMES_PER_RUN_MAX, LOAD_REQUEST_ID_FIRST, MESSAGE_BYTES_MAX,
    MESSAGE_BYTES_MIN, RATE_FRAMES_PER_SECOND_MAX, ROOM_MEMBERS_MAX, WINDOW_MAX,
};
use crate::members::{build_room, room_id, seal_all, Clients, RoomPlan};
use crate::progress::Progress;
use crate::report::Report;
use crate::stats::Latencies;
use crate::BenchError;

/// Parameters of a latency run.
#[derive(Debug, Clone)]
pub struct LatencyParams {
    /// Members of the room.
    pub members: usize,
    /// Senders (the first members); the rate is split evenly between them.
    pub senders: usize,
    /// Frames per second, all senders together.
    pub rate: u64,
    /// Seconds of load.
    pub duration_seconds: u64,
    /// Plaintext bytes per message.
    pub message_bytes: usize,
    /// Unacknowledged frames per sender at most; a frame due while the
    /// window is full waits (and its latency includes the wait).
    pub window: usize,
}

/// Per frame of the run, indexed by log index minus the first: when it
/// was sent, when the last member got it, and how many did.
pub(super) struct Timeline {
    first_log_index: u64,
    sent_ns: Vec<AtomicU64>,
    last_received_ns: Vec<AtomicU64>,
    received: Vec<AtomicU64>,
}

impl Timeline {
    /// A timeline of `total` frames from `first_log_index`, nothing sent yet.
    pub(super) fn new(first_log_index: u64, total: usize) -> Timeline {
        Timeline {
            first_log_index,
            sent_ns: (0..total).map(|_| AtomicU64::new(u64::MAX)).collect(),
            last_received_ns: (0..total).map(|_| AtomicU64::new(0)).collect(),
            received: (0..total).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// When the frame of `slot` was sent (ns since the run's start), once acknowledged.
    pub(super) fn sent_ns(&self, slot: usize) -> Option<u64> {
        let sent = self.sent_ns.get(slot)?.load(Ordering::Relaxed);
        (sent != u64::MAX).then_some(sent)
    }

    pub(super) fn slot(&self, log_index: u64) -> Option<usize> {
        let offset = usize::try_from(log_index.checked_sub(self.first_log_index)?).ok()?;
        (offset < self.sent_ns.len()).then_some(offset)
    }
}

/// Runs the scenario.
pub async fn run(
    clients: &Arc<Clients>,
    common: Common,
    params: &LatencyParams,
) -> Result<Report, BenchError> {
    check_range("members", params.members as u64, 2, ROOM_MEMBERS_MAX as u64)?;
    check_range("senders", params.senders as u64, 1, params.members as u64)?;
    check_range("rate", params.rate, 1, RATE_FRAMES_PER_SECOND_MAX)?;
    check_range("duration-s", params.duration_seconds, 1, DURATION_SECONDS_MAX)?;
    check_range(
        "message-bytes",
        params.message_bytes as u64,
        MESSAGE_BYTES_MIN as u64,
        MESSAGE_BYTES_MAX as u64,
    )?;
    check_range("window", params.window as u64, 1, WINDOW_MAX as u64)?;
    let per_sender = usize::try_from(params.rate * params.duration_seconds / params.senders as u64)
        .unwrap_or(usize::MAX)
        .max(1);
    check_range("frames in all", (per_sender * params.senders) as u64, 1, FRAMES_PER_RUN_MAX as u64)?;
    #[allow(clippy::cast_precision_loss)]
    let per_sender_rate = params.rate as f64 / params.senders as f64;

    let mut report = Report::new("latency");
    report
        .parameter("members", params.members)
        .parameter("senders", params.senders)
        .parameter("rate_frames_per_second", params.rate)
        .parameter("duration_seconds", params.duration_seconds)
        .parameter("message_bytes", params.message_bytes)
        .parameter("window", params.window);

    let setup = Instant::now();
    let plan = RoomPlan {
        room_id: room_id(common.nonce, "latency", 0),
        members: params.members,
        joiners: params.senders - 1,
        welcome: params.senders > 1,
        connect_members: true,
        seed: (common.nonce, "latency", 0),
    };
    let mut room = build_room(clients, &plan).await?;
    report.figure("setup_seconds", setup.elapsed().as_secs_f64(), "s");
    let jobs: Vec<_> = room.members[..params.senders].iter().map(|m| (m, room.room_id, per_sender)).collect();
    let (sealed, _) = seal_all(&jobs, params.message_bytes)?;
    let total = per_sender * params.senders;
    report.figure("frame_bytes", sealed[0][0].len() as f64, "bytes");

    let timeline = Arc::new(Timeline::new(room.next_log_index, total));
    let stop = Arc::new(AtomicBool::new(false));
    let deliveries = Arc::new(Deliveries::default());
    let started = Instant::now();
    let record = {
        let timeline = Arc::clone(&timeline);
        move |frame: &kalandra_proto::Frame, now_ns: u64| {
            if let Some(slot) = timeline.slot(frame.header().log_index()) {
                timeline.last_received_ns[slot].fetch_max(now_ns, Ordering::Relaxed);
                timeline.received[slot].fetch_add(1, Ordering::Relaxed);
            }
        }
    };
    let mut receivers = tokio::task::JoinSet::new();
    let mut sender_connections = Vec::new();
    for (index, connection) in room.connections.iter_mut().enumerate() {
        let connection = connection.take().expect("every member is connected");
        if index < params.senders {
            sender_connections.push(connection);
        } else {
            receivers.spawn(receive_loop(
                connection,
                Arc::clone(&stop),
                Arc::clone(&deliveries),
                started,
                None,
                record.clone(),
            ));
        }
    }

    let progress = Progress::start("latency: sent", total as u64, common.quiet);
    let counter = progress.counter();
    let cpu = CpuWindow::start(clients.target.pid);
    let mut senders = tokio::task::JoinSet::new();
    let load_started = Instant::now();
    for (connection, frames) in sender_connections.into_iter().zip(sealed) {
        let (timeline, counter, record) = (Arc::clone(&timeline), Arc::clone(&counter), record.clone());
        let window = params.window;
        senders.spawn(paced_sender(
            connection,
            frames,
            per_sender_rate,
            window,
            started,
            load_started,
            timeline,
            counter,
            record,
        ));
    }
    let mut acks = Latencies::new();
    let mut refused = 0u64;
    while let Some(result) = senders.join_next().await {
        let (latencies, sender_refused, connection) =
            result.map_err(|e| BenchError::client("sender task", e))??;
        acks.merge(&latencies);
        refused += sender_refused;
        // A sender keeps receiving the other senders' last frames.
        receivers.spawn(receive_loop(
            connection,
            Arc::clone(&stop),
            Arc::clone(&deliveries),
            started,
            None,
            record.clone(),
        ));
    }
    let send_seconds = load_started.elapsed().as_secs_f64();
    progress.finish().await;
    let expected = (params.members - 1) as u64;
    let complete = wait_until(Duration::from_millis(DRAIN_TIMEOUT_MS), || {
        timeline.received.iter().all(|count| count.load(Ordering::Relaxed) >= expected)
    })
    .await;
    cpu.finish(&mut report);
    stop.store(true, Ordering::Release);
    while let Some(result) = receivers.join_next().await {
        result.map_err(|e| BenchError::client("receiver task", e))??;
    }

    let mut to_all = Latencies::new();
    let mut incomplete = 0u64;
    // Deliveries that happened, over the time from the first send to the last delivery.
    let (mut delivered, mut last_delivery_ns) = (0u64, 0u64);
    for slot in 0..total {
        let sent = timeline.sent_ns[slot].load(Ordering::Relaxed);
        let count = timeline.received[slot].load(Ordering::Relaxed);
        delivered += count;
        last_delivery_ns = last_delivery_ns.max(timeline.last_received_ns[slot].load(Ordering::Relaxed));
        if sent == u64::MAX || count < expected {
            incomplete += 1;
            continue;
        }
        let last = timeline.last_received_ns[slot].load(Ordering::Relaxed);
        to_all.record_us(last.saturating_sub(sent) / 1_000);
    }
    #[allow(clippy::cast_precision_loss)]
    {
        report.figure("frames", total as f64, "frames");
        report.figure("achieved_rate", total as f64 / send_seconds, "frames/s");
        report.figure("send_to_all_p50_ms", to_all.quantile_ms(0.50), "ms");
        report.figure("send_to_all_p99_ms", to_all.quantile_ms(0.99), "ms");
        report.figure("send_to_all_p999_ms", to_all.quantile_ms(0.999), "ms");
        report.figure("send_to_all_max_ms", to_all.max_ms(), "ms");
        report.figure("ack_latency_p50_ms", acks.quantile_ms(0.50), "ms");
        report.figure("ack_latency_p99_ms", acks.quantile_ms(0.99), "ms");
        let load_started_ns = u64::try_from(load_started.duration_since(started).as_nanos()).unwrap_or(0);
        let delivery_seconds = last_delivery_ns.saturating_sub(load_started_ns) as f64 / 1e9;
        report.figure("deliveries", delivered as f64, "deliveries");
        report.figure("deliveries_expected", (total as u64 * expected) as f64, "deliveries");
        report.figure(
            "deliveries_per_second",
            delivered as f64 / delivery_seconds.max(send_seconds),
            "deliveries/s",
        );
        report.figure("frames_not_received_by_all", incomplete as f64, "frames");
        report.figure("refused_frames", refused as f64, "frames");
        report.figure("resync_notices", deliveries.resyncs.load(Ordering::Relaxed) as f64, "notices");
    }
    if !complete {
        report.note(format!(
            "not every frame reached every member within {DRAIN_TIMEOUT_MS} ms of the last send"
        ));
    }
    report.goal("send-to-all p99", to_all.quantile_ms(0.99), 10.0, "ms", false);
    report.note("a frame's send time is taken just before it is written to the QUIC stream; received = arrived and decoded at the member (not decrypted)");
    Ok(report)
}

/// Sends frame k at `load_started + k / rate` (later if the window is full),
/// and records send instants and acknowledgements.
#[allow(clippy::too_many_arguments)]
pub(super) async fn paced_sender(
    mut connection: Connection,
    frames: Vec<Bytes>,
    rate: f64,
    window: usize,
    started: Instant,
    load_started: Instant,
    timeline: Arc<Timeline>,
    counter: Arc<AtomicU64>,
    mut record: impl FnMut(&kalandra_proto::Frame, u64) + Send,
) -> Result<(Latencies, u64, Connection), BenchError> {
    let total = frames.len();
    let mut sent_ns = vec![0u64; total];
    let mut acks = Latencies::new();
    let (mut next, mut done, mut refused) = (0usize, 0usize, 0u64);
    let mut buffer = Vec::new();
    while done < total {
        let elapsed = load_started.elapsed().as_secs_f64();
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let due = ((elapsed * rate) as usize + 1).min(total);
        if next < due && next - done < window {
            buffer.clear();
            let now = nanos_since(started);
            while next < due && next - done < window {
                buffer.extend_from_slice(&frames[next]);
                sent_ns[next] = now;
                next += 1;
            }
            connection
                .send_bytes(&buffer)
                .await
                .map_err(|e| BenchError::Connection { during: "sending load", detail: e.to_string() })?;
        }
        #[allow(clippy::cast_precision_loss)]
        let next_due = load_started + Duration::from_secs_f64(next as f64 / rate);
        let frame = tokio::select! {
            frame = connection.recv() => Some(frame.map_err(|e| BenchError::Connection { during: "waiting for acknowledgements", detail: e.to_string() })?),
            () = tokio::time::sleep_until(next_due.into()), if next < total && next - done < window => None,
        };
        let mut frame = frame;
        while let Some(current) = frame {
            let header = current.header();
            let request_id = header.request_id();
            match current.opcode() {
                Opcode::Ack if request_id >= LOAD_REQUEST_ID_FIRST => {
                    let offset = (request_id - LOAD_REQUEST_ID_FIRST) as usize;
                    let sent = sent_ns.get(offset).copied().unwrap_or(0);
                    acks.record_us(nanos_since(started).saturating_sub(sent) / 1_000);
                    // The acknowledged index is in the Ack's payload, not its header.
                    let log_index = current.decode_payload::<Ack>().map_or(u64::MAX, |ack| ack.log_index);
                    if let Some(slot) = timeline.slot(log_index) {
                        timeline.sent_ns[slot].store(sent, Ordering::Relaxed);
                    }
                    done += 1;
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                Opcode::Error if request_id >= LOAD_REQUEST_ID_FIRST => {
                    refused += 1;
                    done += 1;
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                Opcode::Error => {
                    let code = current.decode_payload::<ErrorPayload>().map_or(0, |e| e.code);
                    if code != ErrorCode::ResyncRequired.to_u16() {
                        return Err(crate::members::refusal(&current, "load"));
                    }
                }
                Opcode::Application => record(&current, nanos_since(started)),
                _ => {}
            }
            frame = connection.try_recv();
        }
    }
    Ok((acks, refused, connection))
}
