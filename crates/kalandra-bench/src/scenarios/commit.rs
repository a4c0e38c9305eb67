//! Commit validation end to end: in rooms of N members, commits submitted
//! to the server → acknowledged (the server validates and merges each
//! with its OpenMLS `PublicGroup` and stores it durably before the
//! acknowledgement).

use std::sync::Arc;
use std::time::{Duration, Instant};

use kalandra_proto::payload::Commit;

use super::{check_range, Common};
use crate::limits::{COMMIT_ITERATIONS_MAX, ROOM_MEMBERS_MAX};
use crate::members::Clients;
use crate::members::{build_room, member_seed, request, room_id, BuiltRoom, Member, RoomPlan};
use crate::report::Report;
use crate::BenchError;

/// Parameters of a commit run.
#[derive(Debug, Clone)]
pub struct CommitParams {
    /// Room sizes (members, the committer included).
    pub sizes: Vec<usize>,
    /// Commits of each kind per size.
    pub iterations: usize,
}

/// Runs the scenario: one report per room size.
pub async fn run(
    clients: &Arc<Clients>,
    common: Common,
    params: &CommitParams,
) -> Result<Vec<Report>, BenchError> {
    check_range("iterations", params.iterations as u64, 1, COMMIT_ITERATIONS_MAX as u64)?;
    if params.sizes.is_empty() {
        return Err(BenchError::Usage("commit needs at least one room size".into()));
    }
    let mut reports = Vec::new();
    for (number, &size) in params.sizes.iter().enumerate() {
        check_range("members", size as u64, 2, ROOM_MEMBERS_MAX as u64)?;
        reports.push(run_size(clients, common, size, number as u64, params.iterations).await?);
    }
    Ok(reports)
}

async fn run_size(
    clients: &Arc<Clients>,
    common: Common,
    size: usize,
    number: u64,
    iterations: usize,
) -> Result<Report, BenchError> {
    let mut report = Report::new(&format!("commit-{size}"));
    report.parameter("members", size).parameter("iterations", iterations);
    let setup = Instant::now();
    let plan = RoomPlan {
        room_id: room_id(common.nonce, "commit", number),
        members: size,
        joiners: 0,
        welcome: false,
        connect_members: false,
        seed: (common.nonce, "commit", number),
    };
    let mut room = build_room(clients, &plan).await?;
    report.figure("setup_seconds", setup.elapsed().as_secs_f64(), "s");
    report.figure("add_all_commit_bytes", room.add_commit_bytes as f64, "bytes");
    report.figure("add_all_commit_ack_ms", millis(room.add_commit_ack), "ms");

    let mut self_update = Vec::new();
    let mut self_update_create = Vec::new();
    let mut self_update_bytes = 0;
    for _ in 0..iterations {
        let (ack, create, bytes) = commit_once(&mut room, None).await?;
        self_update.push(ack);
        self_update_create.push(create);
        self_update_bytes = bytes;
    }
    let mut add_one = Vec::new();
    for iteration in 0..iterations {
        let joiner = Member::new(member_seed(common.nonce, "commit-joiner", number, iteration as u64))?;
        let (ack, _, _) = commit_once(&mut room, Some(joiner.key_package()?)).await?;
        add_one.push(ack);
    }
    report.figure("self_update_commit_bytes", self_update_bytes as f64, "bytes");
    report.figure("self_update_client_create_ms_median", median_ms(&mut self_update_create), "ms");
    report.figure("self_update_ack_ms_median", median_ms(&mut self_update), "ms");
    report.figure("self_update_ack_ms_max", max_ms(&self_update), "ms");
    report.figure("add_one_ack_ms_median", median_ms(&mut add_one), "ms");
    report.figure("add_one_ack_ms_max", max_ms(&add_one), "ms");
    if size <= 1_000 {
        report.goal(
            "self-update commit submitted → acknowledged",
            median_ms(&mut self_update),
            10.0,
            "ms",
            false,
        );
    }
    report.note("ack time = commit frame written → Ack received: server decode, OpenMLS PublicGroup validation and merge, durable store, acknowledgement; the client's own commit creation is not included");
    report.note("the room is built by one commit adding every member (the sparsest tree); later self-updates fill the committer's path");
    Ok(report)
}

/// One commit by the creator: a self-update, or an add of `key_package`.
/// Returns (submit → ack, client-side creation, frame bytes).
async fn commit_once(
    room: &mut BuiltRoom,
    key_package: Option<Vec<u8>>,
) -> Result<(Duration, Duration, usize), BenchError> {
    let room_id = room.room_id;
    let mut creator = room.members.remove(0);
    let (creator_back, output, create) = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let group = creator.group.as_mut().expect("the creator has the group");
        let output = match &key_package {
            Some(package) => group.add_members(&creator.provider, &creator.identity, &[package.as_slice()]),
            None => group.self_update(&creator.provider, &creator.identity),
        };
        (creator, output, started.elapsed())
    })
    .await
    .map_err(|e| BenchError::client("commit task", e))?;
    let mut creator = creator_back;
    let output = output.map_err(|e| BenchError::client("commit", e));
    let result = match output {
        Ok(output) => {
            let connection = room.connections[0].as_mut().expect("the creator is connected");
            let commit = Commit {
                commit: output.commit,
                welcome: None,
                welcome_recipients: Vec::new(),
                group_info: Some(output.group_info),
            };
            let frame = creator.frame(room_id, connection.next_request_id(), &commit)?;
            let bytes = frame.encoded_len();
            let started = Instant::now();
            let reply = request(connection, &frame, "commit").await;
            let ack = started.elapsed();
            let group = creator.group.as_mut().expect("the creator has the group");
            match reply {
                Ok(_) => {
                    group
                        .confirm_pending_commit(&creator.provider)
                        .map_err(|e| BenchError::client("confirm", e))?;
                    Ok((ack, create, bytes))
                }
                Err(error) => {
                    let _ = group.discard_pending_commit(&creator.provider);
                    Err(error)
                }
            }
        }
        Err(error) => Err(error),
    };
    room.members.insert(0, creator);
    result
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1_000.0
}

fn median_ms(values: &mut [Duration]) -> f64 {
    values.sort();
    values.get(values.len() / 2).map_or(0.0, |d| millis(*d))
}

fn max_ms(values: &[Duration]) -> f64 {
    values.iter().max().map_or(0.0, |d| millis(*d))
}
