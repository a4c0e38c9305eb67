//! Fan-out: one room of many members; one member sends as fast as its
//! window allows, every other member is connected and subscribed; frames
//! delivered per second.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{
    check_range, pipelined_sender, receive_loop, report_rejections, wait_for_count, Common, CpuWindow,
    Deliveries,
};
use crate::limits::{
    DRAIN_TIMEOUT_MS, FRAMES_PER_RUN_MAX, MESSAGE_BYTES_MAX, MESSAGE_BYTES_MIN, ROOM_MEMBERS_MAX, WINDOW_MAX,
};
use crate::members::{build_room, room_id, seal_all, Clients, RoomPlan};
use crate::progress::Progress;
use crate::report::Report;
use crate::BenchError;

/// Parameters of a fan-out run.
#[derive(Debug, Clone)]
pub struct FanoutParams {
    /// Members of the room (one sends, the others receive).
    pub members: usize,
    /// Frames sent.
    pub frames: usize,
    /// Unacknowledged frames at most.
    pub window: usize,
    /// Plaintext bytes per message.
    pub message_bytes: usize,
}

/// Runs the scenario.
pub async fn run(
    clients: &Arc<Clients>,
    common: Common,
    params: &FanoutParams,
) -> Result<Report, BenchError> {
    check_range("members", params.members as u64, 2, ROOM_MEMBERS_MAX as u64)?;
    check_range("frames", params.frames as u64, 1, FRAMES_PER_RUN_MAX as u64)?;
    check_range("window", params.window as u64, 1, WINDOW_MAX as u64)?;
    check_range(
        "message-bytes",
        params.message_bytes as u64,
        MESSAGE_BYTES_MIN as u64,
        MESSAGE_BYTES_MAX as u64,
    )?;
    let mut report = Report::new("fanout");
    report
        .parameter("members", params.members)
        .parameter("frames", params.frames)
        .parameter("window", params.window)
        .parameter("message_bytes", params.message_bytes)
        .parameter("client_endpoints", clients.endpoint_count());

    let setup = Instant::now();
    let plan = RoomPlan {
        room_id: room_id(common.nonce, "fanout", 0),
        members: params.members,
        joiners: 0,
        welcome: false,
        connect_members: true,
        seed: (common.nonce, "fanout", 0),
    };
    let mut room = build_room(clients, &plan).await?;
    report.figure("setup_seconds", setup.elapsed().as_secs_f64(), "s");
    report.figure("add_commit_ack_ms", room.add_commit_ack.as_secs_f64() * 1_000.0, "ms");
    let (sealed, _) = seal_all(&[(&room.members[0], room.room_id, params.frames)], params.message_bytes)?;
    let frames = sealed.into_iter().next().expect("one sender");
    report.figure("frame_bytes", frames[0].len() as f64, "bytes");

    let stop = Arc::new(AtomicBool::new(false));
    let deliveries = Arc::new(Deliveries::default());
    let mut receivers = tokio::task::JoinSet::new();
    let mut sender = None;
    let started = Instant::now();
    for (index, connection) in room.connections.iter_mut().enumerate() {
        let connection = connection.take().expect("every member is connected");
        if index == 0 {
            sender = Some(connection);
        } else {
            receivers.spawn(receive_loop(
                connection,
                Arc::clone(&stop),
                Arc::clone(&deliveries),
                started,
                None,
                |_, _| {},
            ));
        }
    }
    let mut sender = sender.expect("the creator sends");
    let expected = params.frames as u64 * (params.members as u64 - 1);
    let progress = Progress::start("fanout: delivered", expected, common.quiet);
    let counter = progress.counter();
    let cpu = CpuWindow::start(clients.target.pid);
    let timed_ns = super::nanos_since(started);
    let ack_counter = std::sync::atomic::AtomicU64::new(0);
    let watcher = {
        let (deliveries, counter, stop) = (Arc::clone(&deliveries), Arc::clone(&counter), Arc::clone(&stop));
        tokio::spawn(async move {
            while !stop.load(Ordering::Acquire) {
                counter.store(deliveries.received.load(Ordering::Relaxed), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let outcome = pipelined_sender(&mut sender, &frames, params.window, &ack_counter, false).await?;
    let acked_seconds = super::nanos_since(started).saturating_sub(timed_ns) as f64 / 1e9;
    let complete = wait_for_count(&deliveries.received, expected).await;
    cpu.finish(&mut report);
    stop.store(true, Ordering::Release);
    let _ = watcher.await;
    progress.finish().await;
    while let Some(result) = receivers.join_next().await {
        result.map_err(|e| BenchError::client("receiver task", e))??;
    }
    drop(sender);

    let delivered = deliveries.received.load(Ordering::Relaxed);
    let last_ns = deliveries.last_ns.load(Ordering::Relaxed);
    let seconds = last_ns.saturating_sub(timed_ns) as f64 / 1e9;
    #[allow(clippy::cast_precision_loss)]
    {
        report.figure("acked_frames", outcome.acked as f64, "frames");
        report.figure("acked_frames_per_second", outcome.acked as f64 / acked_seconds, "frames/s");
        report.figure("deliveries", delivered as f64, "deliveries");
        report.figure("deliveries_expected", expected as f64, "deliveries");
        report.figure("first_send_to_last_delivery_seconds", seconds, "s");
        let rate = delivered as f64 / seconds.max(1e-9);
        report.figure("deliveries_per_second", rate, "deliveries/s");
        report.figure("resync_notices", deliveries.resyncs.load(Ordering::Relaxed) as f64, "notices");
        report.goal("deliveries per second", rate, 1_000_000.0, "deliveries/s", true);
    }
    report_rejections(&mut report, &outcome.rejected);
    if !complete {
        report.note(format!(
            "not every delivery arrived within {DRAIN_TIMEOUT_MS} ms of the last acknowledgement"
        ));
    }
    report.note(format!(
        "every member is its own authenticated QUIC connection; the {} connections are multiplexed over {} UDP sockets of one generator process",
        params.members,
        clients.endpoint_count()
    ));
    Ok(report)
}
