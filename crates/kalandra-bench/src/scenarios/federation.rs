//! Federation: two servers of domains a and b on loopback, linked as
//! peers, and rooms ordered by a with members on both. Every client only
//! connects to its home server: a member of b reaches the room through b,
//! which relays its frames to a over the server-to-server link; a's
//! acknowledgements and fan-out come back the same way.
//!
//! Two parts, each against a baseline run in the same process pair, the
//! same durability, just before it:
//!
//! - relay lag: one sender at a fixed rate; for every frame, the time from
//!   its send to its arrival at each receiver, to receivers on a and on b,
//!   and the sender's acknowledgement latency. Baseline: the same traffic
//!   in a room of a whose members are all a's (the sender too).
//! - cross-domain throughput: several pipelined senders on b in one room
//!   of a, against as many senders on a in another room of a.
//! - replica catch-up ([`catch_up`]): b's replica of a room of a, live,
//!   falls behind while b is stopped and the senders on a write; b starts
//!   again and follows the room from its replica's head. Measured from b's
//!   link with a up to b's replica live again (durable through a's head,
//!   a's signed head checked), read off b's metrics.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use client_core::connection::Connection;
use client_core::mls::RoomGroup;
use ed25519_dalek::SigningKey;
use kalandra_proto::federation::DomainName;
use kalandra_proto::payload::{
    Ack, Commit, CreateRoom, KeyPackageClaim, KeyPackageClaimed, KeyPackageUpload, Welcome,
};
use kalandra_proto::{ErrorCode, Opcode, RoomId};
use sha2::{Digest, Sha256};

use super::latency::{paced_sender, Timeline};
use super::{
    check_range, pipelined_sender, receive_loop, report_rejections, wait_for_count, Common, Deliveries,
};
use crate::limits::{
    DURATION_SECONDS_MAX, FRAMES_PER_RUN_MAX, LAG_ROUNDS_MAX, LINK_TIMEOUT_MS, MESSAGE_BYTES_MAX,
    MESSAGE_BYTES_MIN, RATE_FRAMES_PER_SECOND_MAX, RELAYED_WINDOW_MAX, ROOM_RECEIVERS_MAX, WINDOW_MAX,
};
use crate::members::{
    connect_all, member_seed, now_unix_secs, request, room_id, seal_all, setup_timeout, subscribe, Clients,
    Member,
};
use crate::procfs::{self, ProcessSample};
use crate::progress::Progress;
use crate::report::Report;
use crate::server::{ServerOptions, ServerProcess};
use crate::stats::Latencies;
use crate::BenchError;

/// Domain of the server that orders the rooms.
pub const DOMAIN_A: &str = "a.kalandra-bench.test";
/// Domain of the server whose users join a's rooms from afar.
pub const DOMAIN_B: &str = "b.kalandra-bench.test";

/// Parameters of a federation run.
#[derive(Debug, Clone)]
pub struct FederationParams {
    /// Receivers on a in the lag part (the room's creator is one of them).
    pub a_receivers: usize,
    /// Receivers on b in the lag part.
    pub b_receivers: usize,
    /// Frames per second of the lag part's sender.
    pub rate: u64,
    /// Seconds of load of the lag part, for each room and round.
    pub duration_seconds: u64,
    /// Rounds of the lag part, each a local room and a room across.
    pub rounds: usize,
    /// Unacknowledged frames of the lag part's sender at most.
    pub window: usize,
    /// Plaintext bytes per message.
    pub message_bytes: usize,
    /// Senders of the throughput part (on b, and as many on a for the baseline).
    pub senders: usize,
    /// Frames each throughput sender sends.
    pub frames_per_sender: usize,
    /// Unacknowledged frames per throughput sender at most.
    pub throughput_window: usize,
}

impl FederationParams {
    fn check(&self) -> Result<(), BenchError> {
        check_range("a-receivers", self.a_receivers as u64, 1, ROOM_RECEIVERS_MAX as u64)?;
        check_range("b-receivers", self.b_receivers as u64, 1, ROOM_RECEIVERS_MAX as u64)?;
        check_range("rate", self.rate, 1, RATE_FRAMES_PER_SECOND_MAX)?;
        check_range("duration-s", self.duration_seconds, 1, DURATION_SECONDS_MAX)?;
        check_range("rounds", self.rounds as u64, 1, LAG_ROUNDS_MAX as u64)?;
        check_range("window", self.window as u64, 1, RELAYED_WINDOW_MAX as u64)?;
        check_range(
            "message-bytes",
            self.message_bytes as u64,
            MESSAGE_BYTES_MIN as u64,
            MESSAGE_BYTES_MAX as u64,
        )?;
        check_range("senders", self.senders as u64, 1, ROOM_RECEIVERS_MAX as u64)?;
        check_range("throughput-window", self.throughput_window as u64, 1, RELAYED_WINDOW_MAX as u64)?;
        check_range(
            "senders × throughput-window",
            (self.senders * self.throughput_window) as u64,
            1,
            WINDOW_MAX as u64,
        )?;
        check_range(
            "frames in all",
            (self.senders * self.frames_per_sender) as u64,
            1,
            FRAMES_PER_RUN_MAX as u64,
        )?;
        check_range("frames of the lag part", self.lag_frames() as u64, 1, FRAMES_PER_RUN_MAX as u64)
    }

    fn lag_frames(&self) -> usize {
        usize::try_from(self.rate.saturating_mul(self.duration_seconds)).unwrap_or(usize::MAX)
    }
}

/// The federation key seed of `domain` in run `nonce`.
fn federation_seed(nonce: u64, domain: &str) -> [u8; 32] {
    Sha256::new()
        .chain_update(b"kalandra-bench federation key")
        .chain_update(nonce.to_be_bytes())
        .chain_update(domain.as_bytes())
        .finalize()
        .into()
}

fn public_key_hex(seed: &[u8; 32]) -> String {
    hex::encode(SigningKey::from_bytes(seed).verifying_key().to_bytes())
}

/// The `[federation]` table of a server listening on a free loopback port
/// with one peer (dialed when its address is known, otherwise only accepted).
fn federation_table(peer: &str, peer_key_hex: &str, peer_address: Option<std::net::SocketAddr>) -> String {
    let address = peer_address.map(|a| format!("address = \"{a}\"\n")).unwrap_or_default();
    format!(
        "[federation]\nlisten = \"127.0.0.1:0\"\n[[federation.peers]]\ndomain = \"{peer}\"\n{address}keys = [{{ key = \"{peer_key_hex}\" }}]\n"
    )
}

/// Two server processes, a and b, configured as each other's peers: a
/// accepts b's link, b dials a.
pub struct ServerPair {
    /// The server of [`DOMAIN_A`].
    pub a: ServerProcess,
    /// The server of [`DOMAIN_B`].
    pub b: ServerProcess,
}

impl ServerPair {
    /// Starts both with the generator's usual limits and durable storage,
    /// each with its own data directory (`data_dir`/a and /b, or temporary
    /// ones). Blocking.
    pub fn start(binary: &Path, data_dir: Option<&Path>, nonce: u64) -> Result<ServerPair, BenchError> {
        let (seed_a, seed_b) = (federation_seed(nonce, DOMAIN_A), federation_seed(nonce, DOMAIN_B));
        let dir_of = |name: &str| data_dir.map(|dir| dir.join(name));
        let a_dir: Option<PathBuf> = dir_of("a");
        let a = ServerProcess::start_with(
            binary,
            a_dir.as_deref(),
            &ServerOptions {
                domain: Some(DOMAIN_A.to_owned()),
                extra_config: federation_table(DOMAIN_B, &public_key_hex(&seed_b), None),
                federation_key_seed: Some(seed_a),
            },
        )?;
        let a_federation = a.federation_address.ok_or_else(|| BenchError::ServerStart {
            path: binary.to_owned(),
            detail: "the server of a did not print its federation address".into(),
        })?;
        let b_dir: Option<PathBuf> = dir_of("b");
        let b = ServerProcess::start_with(
            binary,
            b_dir.as_deref(),
            &ServerOptions {
                domain: Some(DOMAIN_B.to_owned()),
                extra_config: federation_table(DOMAIN_A, &public_key_hex(&seed_a), Some(a_federation)),
                federation_key_seed: Some(seed_b),
            },
        )?;
        Ok(ServerPair { a, b })
    }

    /// Stops both. Blocking.
    pub fn stop(self) -> Result<(), BenchError> {
        let a = self.a.stop();
        let b = self.b.stop();
        a.and(b)
    }
}

/// Runs both parts against the servers that `a` and `b` connect to.
pub async fn run(
    a: &Arc<Clients>,
    b: &Arc<Clients>,
    common: Common,
    params: &FederationParams,
) -> Result<Vec<Report>, BenchError> {
    params.check()?;
    Ok(vec![lag(a, b, common, params).await?, throughput(a, b, common, params).await?])
}

/// A room of a with members on a (the creator first) and on b.
struct RoomAcross {
    room_id: RoomId,
    next_log_index: u64,
    /// Members on a, the creator first, with their connections to a.
    on_a: Vec<(Member, Connection)>,
    /// Members on b, with their connections to b.
    on_b: Vec<(Member, Connection)>,
}

/// How a room is built: members on each side and how many join the MLS group.
struct PlanAcross {
    seed: (u64, &'static str, u64),
    /// Members on a, the creator included (at least 1).
    on_a: usize,
    /// Members on b.
    on_b: usize,
    /// Members on a after the creator that join the group (they send).
    a_joiners: usize,
    /// Members on b that join the group (they send).
    b_joiners: usize,
}

/// Creates the room on a, claims the key packages of b's members through
/// a (their home b vouches for them), adds everyone in one commit, and
/// subscribes every member through its home server; b's members first
/// wait for their Welcome, which a routes to b.
async fn build_across(
    a: &Arc<Clients>,
    b: &Arc<Clients>,
    plan: &PlanAcross,
) -> Result<RoomAcross, BenchError> {
    let (nonce, scenario, number) = plan.seed;
    let room = room_id(nonce, scenario, number);
    let mut creator = Member::new(member_seed(nonce, scenario, number, 0))?;
    let mut connection = a.connect(&creator.key).await?;
    let server_key = connection.server_key();
    let (group, created) =
        RoomGroup::create(&creator.provider, &creator.identity, room.0, &server_key, now_unix_secs())
            .map_err(|e| BenchError::client("create room", e))?;
    creator.group = Some(group);
    let request_id = connection.next_request_id();
    let frame = creator.frame(
        room,
        request_id,
        &CreateRoom { group_info: created.group_info, ratchet_tree: created.ratchet_tree, join_rule: None },
    )?;
    request(&mut connection, &frame, "create room").await?;

    let others = plan.on_a - 1 + plan.on_b;
    let made = tokio::task::spawn_blocking(move || {
        (1..=others as u64)
            .map(|index| {
                let member = Member::new(member_seed(nonce, scenario, number, index))?;
                let key_package = member.key_package()?;
                Ok((member, key_package))
            })
            .collect::<Result<Vec<_>, BenchError>>()
    })
    .await
    .map_err(|e| BenchError::client("members", e))??;
    let (mut members, mut key_packages): (Vec<Member>, Vec<Vec<u8>>) = made.into_iter().unzip();
    let b_members = members.split_off(plan.on_a - 1);
    let b_packages = key_packages.split_off(plan.on_a - 1);
    let mut on_a = connect_all(a, members).await?;
    let mut on_b = connect_all(b, b_members).await?;

    // b's members put their key package on b; a's creator claims them through a.
    for ((member, connection), package) in on_b.iter_mut().zip(b_packages) {
        let request_id = connection.next_request_id();
        let upload = KeyPackageUpload { key_packages: vec![package.into()], last_resort: None };
        let frame = member.frame(RoomId::default(), request_id, &upload)?;
        request(connection, &frame, "key-package upload").await?;
    }
    let b_senders: Vec<u64> = on_b.iter().map(|(member, _)| member.sender.0).collect();
    for chunk in b_senders.chunks(kalandra_proto::limits::KEY_PACKAGES_PER_CLAIM_MAX as usize) {
        key_packages.extend(claim_through_a(&mut connection, &creator, chunk).await?);
    }

    let recipients: Vec<u64> = on_a.iter().chain(on_b.iter()).map(|(member, _)| member.sender.0).collect();
    let (creator_back, output) = tokio::task::spawn_blocking(move || {
        let refs: Vec<&[u8]> = key_packages.iter().map(Vec::as_slice).collect();
        let output = match creator.group.as_mut() {
            Some(group) => {
                group.add_members(&creator.provider, &creator.identity, &refs).map_err(|e| e.to_string())
            }
            None => Err("the creator has no group".to_owned()),
        };
        (creator, output)
    })
    .await
    .map_err(|e| BenchError::client("add members", e))?;
    creator = creator_back;
    let output = output.map_err(|e| BenchError::client("add members", e))?;
    let commit = Commit {
        welcome_recipients: recipients,
        welcome: output.welcome,
        commit: output.commit,
        group_info: Some(output.group_info),
    };
    let request_id = connection.next_request_id();
    let frame = creator.frame(room, request_id, &commit)?;
    let reply = request(&mut connection, &frame, "add-members commit").await?;
    let ack: Ack = reply
        .decode_payload()
        .map_err(|e| BenchError::Unexpected { request: "add", detail: e.to_string() })?;
    let next_log_index = ack.log_index + 1;
    if let Some(group) = creator.group.as_mut() {
        group
            .confirm_pending_commit(&creator.provider)
            .map_err(|e| BenchError::client("confirm commit", e))?;
    }

    subscribe(&mut connection, room, next_log_index, &creator, false).await?;
    for (index, (member, connection)) in on_a.iter_mut().enumerate() {
        if let Some(group) =
            subscribe(connection, room, next_log_index, member, index < plan.a_joiners).await?
        {
            member.group = Some(group);
        }
    }
    for (index, (member, connection)) in on_b.iter_mut().enumerate() {
        let group = welcome_at_home(connection, member, room, index < plan.b_joiners).await?;
        if group.is_some() {
            member.group = group;
        }
        subscribe(connection, room, next_log_index, member, false).await?;
    }
    on_a.insert(0, (creator, connection));
    Ok(RoomAcross { room_id: room, next_log_index, on_a, on_b })
}

/// Claims the key packages of b's `users` through a; retried while a has
/// no link with b yet (`DomainUnreachable`), for at most [`LINK_TIMEOUT_MS`].
async fn claim_through_a(
    connection: &mut Connection,
    creator: &Member,
    users: &[u64],
) -> Result<Vec<Vec<u8>>, BenchError> {
    let domain = DomainName::parse(DOMAIN_B).map_err(|e| BenchError::Usage(format!("{DOMAIN_B}: {e}")))?;
    let deadline = Instant::now() + Duration::from_millis(LINK_TIMEOUT_MS);
    loop {
        let claim = KeyPackageClaim { sender_ids: users.to_vec(), domain: Some(domain.clone()) };
        let request_id = connection.next_request_id();
        let frame = creator.frame(RoomId::default(), request_id, &claim)?;
        match request(connection, &frame, "key-package claim through a").await {
            Ok(reply) => {
                let claimed: KeyPackageClaimed = reply.decode_payload().map_err(|e| {
                    BenchError::Unexpected { request: "key-package claim", detail: e.to_string() }
                })?;
                return claimed
                    .key_packages
                    .into_iter()
                    .map(|entry| {
                        entry.key_package.ok_or_else(|| BenchError::Unexpected {
                            request: "key-package claim",
                            detail: format!("no key package for user {:016x}", entry.sender_id),
                        })
                    })
                    .collect();
            }
            Err(BenchError::Refused { code, .. })
                if code == ErrorCode::DomainUnreachable.to_u16() && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(BenchError::Refused { code, .. }) if code == ErrorCode::DomainUnreachable.to_u16() => {
                return Err(BenchError::TimedOut {
                    what: "the link between a and b",
                    timeout_ms: LINK_TIMEOUT_MS,
                })
            }
            Err(other) => return Err(other),
        }
    }
}

/// Waits for the Welcome of `room` that a routed to the member's home b,
/// and joins the group from it if `joins`.
async fn welcome_at_home(
    connection: &mut Connection,
    member: &Member,
    room: RoomId,
    joins: bool,
) -> Result<Option<RoomGroup>, BenchError> {
    let deadline = tokio::time::Instant::now() + setup_timeout();
    loop {
        let frame = tokio::time::timeout_at(deadline, connection.recv())
            .await
            .map_err(|_| BenchError::TimedOut {
                what: "the Welcome at b",
                timeout_ms: u64::try_from(setup_timeout().as_millis()).unwrap_or(u64::MAX),
            })?
            .map_err(|e| BenchError::Connection {
                during: "waiting for the Welcome",
                detail: e.to_string(),
            })?;
        match frame.opcode() {
            Opcode::Welcome if frame.header().room_id() == room => {
                if !joins {
                    return Ok(None);
                }
                let welcome: Welcome = frame
                    .decode_payload()
                    .map_err(|e| BenchError::Unexpected { request: "welcome", detail: e.to_string() })?;
                let group = RoomGroup::join_from_welcome(
                    &member.provider,
                    &welcome.welcome,
                    welcome.ratchet_tree.as_deref(),
                )
                .map_err(|e| BenchError::client("join from welcome", e))?;
                return Ok(Some(group));
            }
            Opcode::Error => return Err(crate::members::refusal(&frame, "waiting for the Welcome")),
            _ => {}
        }
    }
}

/// CPU time of both servers and of the generator over a timed part.
struct CpuSamples {
    a_pid: Option<u32>,
    b_pid: Option<u32>,
    a: Option<ProcessSample>,
    b: Option<ProcessSample>,
    generator: Option<ProcessSample>,
    started: Instant,
}

impl CpuSamples {
    fn start(a_pid: Option<u32>, b_pid: Option<u32>) -> CpuSamples {
        CpuSamples {
            a_pid,
            b_pid,
            a: a_pid.and_then(|pid| procfs::sample(pid).ok()),
            b: b_pid.and_then(|pid| procfs::sample(pid).ok()),
            generator: procfs::sample_self().ok(),
            started: Instant::now(),
        }
    }

    /// Adds the CPU seconds used since the start by a, b and the generator to `totals`.
    fn finish(self, totals: &mut CpuTotals) {
        let seconds = self.started.elapsed().as_secs_f64();
        totals.seconds += seconds;
        for (slot, pid, before) in [(0, self.a_pid, self.a), (1, self.b_pid, self.b)] {
            if let (Some(pid), Some(before), Some(total)) = (pid, before, totals.core_seconds[slot].as_mut())
            {
                match procfs::sample(pid) {
                    Ok(after) => *total += procfs::cores_used(before, after, seconds) * seconds,
                    Err(_) => totals.core_seconds[slot] = None,
                }
            }
        }
        if let (Some(before), Some(total)) = (self.generator, totals.core_seconds[2].as_mut()) {
            match procfs::sample_self() {
                Ok(after) => *total += procfs::cores_used(before, after, seconds) * seconds,
                Err(_) => totals.core_seconds[2] = None,
            }
        }
    }
}

/// CPU seconds of a, b and the generator over several timed parts.
struct CpuTotals {
    core_seconds: [Option<f64>; 3],
    seconds: f64,
}

impl CpuTotals {
    fn new() -> CpuTotals {
        CpuTotals { core_seconds: [Some(0.0); 3], seconds: 0.0 }
    }

    /// Mean cores used by each, as figures named `{prefix}_…`.
    fn report(&self, report: &mut Report, prefix: &str) {
        for (slot, name) in ["server_a", "server_b", "generator"].into_iter().enumerate() {
            if let Some(total) = self.core_seconds[slot] {
                report.figure(&format!("{prefix}_{name}_cpu_cores"), total / self.seconds.max(1e-9), "cores");
            }
        }
    }
}

/// Where a receiver's home is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Home {
    A,
    B,
}

/// What paced runs measured.
#[derive(Default)]
struct LagOutcome {
    to_a: Latencies,
    to_b: Latencies,
    acks: Latencies,
    frames: u64,
    send_seconds: f64,
    missing: u64,
    refused: u64,
    resyncs: u64,
}

impl LagOutcome {
    fn merge(&mut self, other: &LagOutcome) {
        self.to_a.merge(&other.to_a);
        self.to_b.merge(&other.to_b);
        self.acks.merge(&other.acks);
        self.frames += other.frames;
        self.send_seconds += other.send_seconds;
        self.missing += other.missing;
        self.refused += other.refused;
        self.resyncs += other.resyncs;
    }

    #[allow(clippy::cast_precision_loss)]
    fn achieved_rate(&self) -> f64 {
        self.frames as f64 / self.send_seconds.max(1e-9)
    }
}

/// The lag part: the local room, then the room across domains.
async fn lag(
    a: &Arc<Clients>,
    b: &Arc<Clients>,
    common: Common,
    params: &FederationParams,
) -> Result<Report, BenchError> {
    let mut report = Report::new("federation-lag");
    report
        .parameter("a_receivers", params.a_receivers)
        .parameter("b_receivers", params.b_receivers)
        .parameter("rate_frames_per_second", params.rate)
        .parameter("duration_seconds", params.duration_seconds)
        .parameter("rounds", params.rounds)
        .parameter("window", params.window)
        .parameter("message_bytes", params.message_bytes);
    let (mut base, mut fed) = (LagOutcome::default(), LagOutcome::default());
    let (mut base_cpu, mut fed_cpu) = (CpuTotals::new(), CpuTotals::new());
    let mut setup_seconds = 0.0;
    // Rounds alternate which room goes first, so that a drift of the
    // machine (other load, the disk) weighs on both alike.
    for round in 0..params.rounds {
        for across in [round % 2 == 1, round % 2 == 0] {
            let setup = Instant::now();
            let (room, sender, receivers) = if across {
                lag_room_across(a, b, common, params, round).await?
            } else {
                lag_room_local(a, b, common, params, round).await?
            };
            setup_seconds += setup.elapsed().as_secs_f64();
            let cpu = CpuSamples::start(a.target.pid, b.target.pid);
            let label = if across { "across" } else { "local" };
            let outcome = paced_run(sender, room.0, room.1, receivers, params, common, label).await?;
            if across {
                cpu.finish(&mut fed_cpu);
                fed.merge(&outcome);
            } else {
                cpu.finish(&mut base_cpu);
                base.merge(&outcome);
            }
        }
    }
    report.figure("setup_seconds", setup_seconds, "s");
    base_cpu.report(&mut report, "local");
    fed_cpu.report(&mut report, "across");

    #[allow(clippy::cast_precision_loss)]
    {
        report.figure("frames_per_room", base.frames as f64, "frames");
        report.figure("local_achieved_rate", base.achieved_rate(), "frames/s");
        report.figure("across_achieved_rate", fed.achieved_rate(), "frames/s");
        report.figure("local_to_receivers_samples", base.to_a.count() as f64, "deliveries");
        report.figure("local_to_receivers_p50_ms", base.to_a.quantile_ms(0.50), "ms");
        report.figure("local_to_receivers_p99_ms", base.to_a.quantile_ms(0.99), "ms");
        report.figure("local_to_receivers_max_ms", base.to_a.max_ms(), "ms");
        report.figure("local_ack_p50_ms", base.acks.quantile_ms(0.50), "ms");
        report.figure("local_ack_p99_ms", base.acks.quantile_ms(0.99), "ms");
        report.figure("local_ack_max_ms", base.acks.max_ms(), "ms");
        report.figure("across_to_a_samples", fed.to_a.count() as f64, "deliveries");
        report.figure("across_to_a_p50_ms", fed.to_a.quantile_ms(0.50), "ms");
        report.figure("across_to_a_p99_ms", fed.to_a.quantile_ms(0.99), "ms");
        report.figure("across_to_a_max_ms", fed.to_a.max_ms(), "ms");
        report.figure("across_to_b_samples", fed.to_b.count() as f64, "deliveries");
        report.figure("across_to_b_p50_ms", fed.to_b.quantile_ms(0.50), "ms");
        report.figure("across_to_b_p99_ms", fed.to_b.quantile_ms(0.99), "ms");
        report.figure("across_to_b_max_ms", fed.to_b.max_ms(), "ms");
        report.figure("across_ack_p50_ms", fed.acks.quantile_ms(0.50), "ms");
        report.figure("across_ack_p99_ms", fed.acks.quantile_ms(0.99), "ms");
        report.figure("across_ack_max_ms", fed.acks.max_ms(), "ms");
        for (name, across, local) in
            [("to_a", &fed.to_a, &base.to_a), ("to_b", &fed.to_b, &base.to_a), ("ack", &fed.acks, &base.acks)]
        {
            for (quantile, label) in [(0.50, "p50"), (0.99, "p99")] {
                report.figure(
                    &format!("added_{name}_{label}_ms"),
                    across.quantile_ms(quantile) - local.quantile_ms(quantile),
                    "ms",
                );
            }
        }
        report.figure("local_missing_deliveries", base.missing as f64, "deliveries");
        report.figure("across_missing_deliveries", fed.missing as f64, "deliveries");
        report.figure("refused_frames", (base.refused + fed.refused) as f64, "frames");
        report.figure("resync_notices", (base.resyncs + fed.resyncs) as f64, "notices");
    }
    let added_b_p50 = fed.to_b.quantile_ms(0.50) - base.to_a.quantile_ms(0.50);
    report.goal("relay lag to b's receivers, p50 added over local", added_b_p50, 1.0, "ms", false);
    report.goal("relay lag to b's receivers, p99 (roadmap)", fed.to_b.quantile_ms(0.99), 50.0, "ms", false);
    report.note("lag = from the sender's write to the QUIC stream until a receiver decoded the frame; local: sender and receivers on a; across: sender on b, receivers on a and on b (each through its home server); on the same two servers, in rounds that alternate which room runs first; each round builds both rooms afresh");
    report.note("b relays each of its users separately: a's fan-out to b's receivers crosses the link once per receiving connection");
    Ok(report)
}

/// A room, its first load index, its sender and its receivers.
type LagRoom = ((RoomId, u64), (Member, Connection), Vec<(Home, Connection)>);

/// The baseline room of `round`: the sender and every receiver on a.
async fn lag_room_local(
    a: &Arc<Clients>,
    b: &Arc<Clients>,
    common: Common,
    params: &FederationParams,
    round: usize,
) -> Result<LagRoom, BenchError> {
    let plan = PlanAcross {
        seed: (common.nonce, "federation-lag-local", round as u64),
        on_a: 2 + params.a_receivers + params.b_receivers - 1,
        on_b: 0,
        a_joiners: 1,
        b_joiners: 0,
    };
    let RoomAcross { room_id, next_log_index, mut on_a, .. } = build_across(a, b, &plan).await?;
    // The creator and members 2.. receive, member 1 sends.
    let sender = on_a.remove(1);
    let receivers = on_a.into_iter().map(|(_, c)| (Home::A, c)).collect();
    Ok(((room_id, next_log_index), sender, receivers))
}

/// The room across of `round`: the sender on b, receivers on a and on b.
async fn lag_room_across(
    a: &Arc<Clients>,
    b: &Arc<Clients>,
    common: Common,
    params: &FederationParams,
    round: usize,
) -> Result<LagRoom, BenchError> {
    let plan = PlanAcross {
        seed: (common.nonce, "federation-lag-across", round as u64),
        on_a: params.a_receivers,
        on_b: 1 + params.b_receivers,
        a_joiners: 0,
        b_joiners: 1,
    };
    let RoomAcross { room_id, next_log_index, on_a, mut on_b } = build_across(a, b, &plan).await?;
    let sender = on_b.remove(0);
    let receivers = on_a
        .into_iter()
        .map(|(_, c)| (Home::A, c))
        .chain(on_b.into_iter().map(|(_, c)| (Home::B, c)))
        .collect();
    Ok(((room_id, next_log_index), sender, receivers))
}

/// Sends `params.rate` frames per second for `params.duration_seconds`
/// from `sender` and records, per receiver, when each frame arrived.
async fn paced_run(
    sender: (Member, Connection),
    room: RoomId,
    first_log_index: u64,
    receivers: Vec<(Home, Connection)>,
    params: &FederationParams,
    common: Common,
    label: &'static str,
) -> Result<LagOutcome, BenchError> {
    let (member, connection) = sender;
    let total = params.lag_frames();
    let (mut sealed, _) = seal_all(&[(&member, room, total)], params.message_bytes)?;
    let frames = sealed.pop().unwrap_or_default();
    let timeline = Arc::new(Timeline::new(first_log_index, total));
    let stop = Arc::new(AtomicBool::new(false));
    let deliveries = Arc::new(Deliveries::default());
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut arrivals = Vec::with_capacity(receivers.len());
    for (home, connection) in receivers {
        let arrived: Arc<Vec<AtomicU64>> = Arc::new((0..total).map(|_| AtomicU64::new(0)).collect());
        arrivals.push((home, Arc::clone(&arrived)));
        let timeline = Arc::clone(&timeline);
        tasks.spawn(receive_loop(
            connection,
            Arc::clone(&stop),
            Arc::clone(&deliveries),
            started,
            None,
            move |frame, now_ns| {
                if let Some(slot) = timeline.slot(frame.header().log_index()) {
                    let _ = arrived[slot].compare_exchange(
                        0,
                        now_ns.max(1),
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                }
            },
        ));
    }
    let progress = Progress::start(
        if label == "local" {
            "federation lag, local room: sent"
        } else {
            "federation lag, room across: sent"
        },
        total as u64,
        common.quiet,
    );
    #[allow(clippy::cast_precision_loss)]
    let rate = params.rate as f64;
    let load_started = Instant::now();
    let (acks, refused, connection) = paced_sender(
        connection,
        frames,
        rate,
        params.window,
        started,
        load_started,
        Arc::clone(&timeline),
        progress.counter(),
        |_, _| {},
    )
    .await?;
    let send_seconds = load_started.elapsed().as_secs_f64();
    progress.finish().await;
    let expected = (total * arrivals.len()) as u64;
    wait_for_count(&deliveries.received, expected).await;
    stop.store(true, Ordering::Release);
    while let Some(result) = tasks.join_next().await {
        result.map_err(|e| BenchError::client("receiver task", e))??;
    }
    drop(connection);

    let (mut to_a, mut to_b, mut missing) = (Latencies::new(), Latencies::new(), 0u64);
    for (home, arrived) in &arrivals {
        let latencies = if *home == Home::A { &mut to_a } else { &mut to_b };
        for (slot, arrival) in arrived.iter().enumerate() {
            let arrival = arrival.load(Ordering::Relaxed);
            match timeline.sent_ns(slot) {
                Some(sent) if arrival != 0 => latencies.record_us(arrival.saturating_sub(sent) / 1_000),
                _ => missing += 1,
            }
        }
    }
    Ok(LagOutcome {
        to_a,
        to_b,
        acks,
        frames: total as u64,
        send_seconds,
        missing,
        refused,
        resyncs: deliveries.resyncs.load(Ordering::Relaxed),
    })
}

/// What one pipelined run measured.
struct ThroughputOutcome {
    acked: u64,
    seconds: f64,
    acks: Latencies,
    rejected: HashMap<u16, u64>,
    receiver_deliveries: u64,
    receiver_deliveries_expected: u64,
}

/// The throughput part: senders on a in one room, then as many on b in another.
async fn throughput(
    a: &Arc<Clients>,
    b: &Arc<Clients>,
    common: Common,
    params: &FederationParams,
) -> Result<Report, BenchError> {
    let mut report = pipelined_report("federation-throughput", params);
    let setup = Instant::now();
    let local = build_across(
        a,
        b,
        &PlanAcross {
            seed: (common.nonce, "federation-throughput-local", 0),
            on_a: 1 + params.senders,
            on_b: 0,
            a_joiners: params.senders,
            b_joiners: 0,
        },
    )
    .await?;
    let across = build_across(
        a,
        b,
        &PlanAcross {
            seed: (common.nonce, "federation-throughput-across", 0),
            on_a: 1,
            on_b: params.senders,
            a_joiners: 0,
            b_joiners: params.senders,
        },
    )
    .await?;
    report.figure("setup_seconds", setup.elapsed().as_secs_f64(), "s");

    let RoomAcross { room_id: local_room, on_a: mut local_a, .. } = local;
    let local_senders = local_a.split_off(1);
    let (mut base_cpu, mut fed_cpu) = (CpuTotals::new(), CpuTotals::new());
    let cpu = CpuSamples::start(a.target.pid, b.target.pid);
    let base = pipelined_run(local_senders, local_room, local_a, params, common, "local").await?;
    cpu.finish(&mut base_cpu);
    base_cpu.report(&mut report, "local");
    let RoomAcross { room_id, on_a, on_b, .. } = across;
    let cpu = CpuSamples::start(a.target.pid, b.target.pid);
    let fed = pipelined_run(on_b, room_id, on_a, params, common, "across").await?;
    cpu.finish(&mut fed_cpu);
    fed_cpu.report(&mut report, "across");

    let mut rejected = base.rejected.clone();
    for (code, count) in &fed.rejected {
        *rejected.entry(*code).or_insert(0) += count;
    }
    #[allow(clippy::cast_precision_loss)]
    {
        let local_rate = base.acked as f64 / base.seconds;
        let across_rate = fed.acked as f64 / fed.seconds;
        report.figure("local_acked_frames", base.acked as f64, "frames");
        report.figure("local_acked_frames_per_second", local_rate, "frames/s");
        report.figure("local_ack_p50_ms", base.acks.quantile_ms(0.50), "ms");
        report.figure("local_ack_p99_ms", base.acks.quantile_ms(0.99), "ms");
        report.figure("across_acked_frames", fed.acked as f64, "frames");
        report.figure("across_acked_frames_per_second", across_rate, "frames/s");
        report.figure("across_ack_p50_ms", fed.acks.quantile_ms(0.50), "ms");
        report.figure("across_ack_p99_ms", fed.acks.quantile_ms(0.99), "ms");
        report.figure("across_over_local", across_rate / local_rate, "×");
        report.figure("local_receiver_deliveries", base.receiver_deliveries as f64, "frames");
        report.figure(
            "local_receiver_deliveries_expected",
            base.receiver_deliveries_expected as f64,
            "frames",
        );
        report.figure("across_receiver_deliveries", fed.receiver_deliveries as f64, "frames");
        report.figure(
            "across_receiver_deliveries_expected",
            fed.receiver_deliveries_expected as f64,
            "frames",
        );
    }
    let refused = report_rejections(&mut report, &rejected);
    #[allow(clippy::cast_precision_loss)]
    report.figure("refused_frames", refused as f64, "frames");
    report.note("local: the senders and the receiving creator on a; across: the senders on b (each relayed by b as its own connection), the receiving creator on a; one room each, every sender's window refilled as acknowledgements arrive; local first, then across, on the same two servers");
    Ok(report)
}

/// A report of a part whose senders write pipelined, with their parameters.
fn pipelined_report(scenario: &str, params: &FederationParams) -> Report {
    let mut report = Report::new(scenario);
    report
        .parameter("senders", params.senders)
        .parameter("frames_per_sender", params.frames_per_sender)
        .parameter("window", params.throughput_window)
        .parameter("message_bytes", params.message_bytes);
    report
}

/// Sends every sender's frames pipelined; the receivers (on a) count deliveries.
async fn pipelined_run(
    senders: Vec<(Member, Connection)>,
    room: RoomId,
    receivers: Vec<(Member, Connection)>,
    params: &FederationParams,
    common: Common,
    label: &'static str,
) -> Result<ThroughputOutcome, BenchError> {
    let jobs: Vec<_> = senders.iter().map(|(member, _)| (member, room, params.frames_per_sender)).collect();
    let (sealed, _) = seal_all(&jobs, params.message_bytes)?;
    let total: usize = sealed.iter().map(Vec::len).sum();
    let stop = Arc::new(AtomicBool::new(false));
    let deliveries = Arc::new(Deliveries::default());
    let started = Instant::now();
    let mut receiving = tokio::task::JoinSet::new();
    let receiver_count = receivers.len() as u64;
    for (_, connection) in receivers {
        receiving.spawn(receive_loop(
            connection,
            Arc::clone(&stop),
            Arc::clone(&deliveries),
            started,
            None,
            |_, _| {},
        ));
    }
    let title = match label {
        "local" => "federation throughput, local senders: acknowledged",
        "catch-up" => "federation catch-up, senders on a while b is down: acknowledged",
        _ => "federation throughput, senders on b: acknowledged",
    };
    let progress = Progress::start(title, total as u64, common.quiet);
    let counter = progress.counter();
    let timed = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for ((_, mut connection), frames) in senders.into_iter().zip(sealed) {
        let counter = Arc::clone(&counter);
        let window = params.throughput_window;
        tasks.spawn(async move {
            let outcome = pipelined_sender(&mut connection, &frames, window, &counter, false).await;
            outcome.map(|outcome| (outcome, connection, Instant::now()))
        });
    }
    let (mut acks, mut acked, mut rejected, mut last_done) = (Latencies::new(), 0u64, HashMap::new(), timed);
    let mut keep = Vec::new();
    while let Some(result) = tasks.join_next().await {
        let (outcome, connection, done_at) = result.map_err(|e| BenchError::client("sender task", e))??;
        acks.merge(&outcome.latencies);
        acked += outcome.acked;
        for (code, count) in outcome.rejected {
            *rejected.entry(code).or_insert(0) += count;
        }
        last_done = last_done.max(done_at);
        keep.push(connection);
    }
    let seconds = last_done.duration_since(timed).as_secs_f64();
    progress.finish().await;
    let expected = acked * receiver_count;
    wait_for_count(&deliveries.received, expected).await;
    stop.store(true, Ordering::Release);
    while let Some(result) = receiving.join_next().await {
        result.map_err(|e| BenchError::client("receiver task", e))??;
    }
    drop(keep);
    Ok(ThroughputOutcome {
        acked,
        seconds,
        acks,
        rejected,
        receiver_deliveries: deliveries.received.load(Ordering::Relaxed),
        receiver_deliveries_expected: expected,
    })
}

/// Interval between two reads of b's metrics in the catch-up part.
const CATCH_UP_POLL_MS: u64 = 5;
/// Longest the catch-up part waits for b's link or replica.
const CATCH_UP_TIMEOUT_MS: u64 = 300_000;

/// The catch-up part (see the module's list). Stops and starts b itself.
pub async fn catch_up(
    a: &Arc<Clients>,
    b: &Arc<Clients>,
    pair: &mut ServerPair,
    common: Common,
    params: &FederationParams,
) -> Result<Report, BenchError> {
    let mut report = pipelined_report("federation-catch-up", params);
    let plan = PlanAcross {
        seed: (common.nonce, "federation-catch-up", 0),
        on_a: 1 + params.senders,
        on_b: 1,
        a_joiners: params.senders,
        b_joiners: 0,
    };
    let RoomAcross { room_id, mut on_a, on_b, next_log_index, .. } = build_across(a, b, &plan).await?;
    let live = format!("kalandra_federation_peer_replicas{{peer=\"{DOMAIN_A}\",state=\"live\"}} ");
    let catching_up =
        format!("kalandra_federation_peer_replicas{{peer=\"{DOMAIN_A}\",state=\"catching_up\"}} ");
    let link = format!("kalandra_federation_link_up{{peer=\"{DOMAIN_A}\"}} ");
    // b keeps replicas of the earlier parts' rooms too: all of them live.
    let admin = admin_of(&pair.b)?;
    let settled = |page: &str| metric(page, &live) >= Some(1) && metric(page, &catching_up) == Some(0);
    wait_for_page(admin, "b's replicas live", settled).await?;
    let replicas = read_page(admin).await.and_then(|page| metric(&page, &live)).unwrap_or(1);
    drop(on_b);
    tokio::task::block_in_place(|| pair.b.pause())?;
    let senders = on_a.split_off(1);
    let written = pipelined_run(senders, room_id, on_a, params, common, "catch-up").await?;
    let restarted = Instant::now();
    tokio::task::block_in_place(|| pair.b.start_again())?;
    let admin = admin_of(&pair.b)?;
    let linked = wait_for_page(admin, "b's link with a", |page| metric(page, &link) == Some(1)).await?;
    let all_live = |page: &str| metric(page, &live) >= Some(replicas);
    let caught_up = wait_for_page(admin, "b's replicas live again", all_live).await?;
    let seconds = caught_up.duration_since(linked).as_secs_f64();
    #[allow(clippy::cast_precision_loss)]
    {
        let behind = written.acked as f64;
        report.figure("replica_behind_frames", behind, "frames");
        report.figure("replica_head_before_frames", next_log_index as f64, "frames");
        let from_restart = caught_up.duration_since(restarted).as_secs_f64();
        report.figure("restart_to_link_seconds", linked.duration_since(restarted).as_secs_f64(), "s");
        report.figure("catch_up_seconds", seconds, "s");
        report.figure("catch_up_frames_per_second", behind / seconds.max(f64::EPSILON), "frames/s");
        report.figure("restart_to_live_seconds", from_restart, "s");
        report.figure(
            "catch_up_with_restart_frames_per_second",
            behind / from_restart.max(f64::EPSILON),
            "frames/s",
        );
    }
    report.note("b's replica of a room of a is live (with b's replicas of the earlier parts' rooms); b stops (SIGTERM), the senders on a write; b starts again on the same data and follows every room from its replica's head; catch-up runs from b's link with a up to all of b's replicas live again (durable through a's head and a's signed head checked), read off b's metrics every 5 ms (so a catch-up shorter than a few polls is not resolved); with_restart counts from b's start, process start and link handshake included");
    Ok(report)
}

fn admin_of(server: &ServerProcess) -> Result<std::net::SocketAddr, BenchError> {
    server.admin_address.ok_or_else(|| BenchError::Unexpected {
        request: "server start",
        detail: "b did not print its admin address".into(),
    })
}

/// Reads the metrics page at `admin` until `ready` holds of it; the
/// moment it was read so.
async fn wait_for_page(
    admin: std::net::SocketAddr,
    what: &'static str,
    ready: impl Fn(&str) -> bool,
) -> Result<Instant, BenchError> {
    let deadline = Instant::now() + Duration::from_millis(CATCH_UP_TIMEOUT_MS);
    loop {
        if read_page(admin).await.is_some_and(|page| ready(&page)) {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            return Err(BenchError::TimedOut { what, timeout_ms: CATCH_UP_TIMEOUT_MS });
        }
        tokio::time::sleep(Duration::from_millis(CATCH_UP_POLL_MS)).await;
    }
}

/// The server's metrics page, over plain HTTP/1.0; `None` if unreadable.
async fn read_page(admin: std::net::SocketAddr) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(admin).await.ok()?;
    stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").await.ok()?;
    let mut page = Vec::new();
    stream.read_to_end(&mut page).await.ok()?;
    Some(String::from_utf8_lossy(&page).into_owned())
}

/// The value of `series` (its name and labels, then a space) on `page`.
fn metric(page: &str, series: &str) -> Option<u64> {
    page.lines().find_map(|line| line.strip_prefix(series)).and_then(|value| value.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_domain_gets_its_own_federation_key_and_a_table_naming_the_other() {
        let (a, b) = (federation_seed(7, DOMAIN_A), federation_seed(7, DOMAIN_B));
        assert_ne!(a, b);
        assert_ne!(a, federation_seed(8, DOMAIN_A), "a fresh key per run");
        let table = federation_table(DOMAIN_B, &public_key_hex(&b), None);
        assert!(table.contains(&format!("domain = \"{DOMAIN_B}\"")), "{table}");
        assert!(!table.contains("address"), "a only accepts b's link: {table}");
        let address = "127.0.0.1:4434".parse().ok();
        let table = federation_table(DOMAIN_A, &public_key_hex(&a), address);
        assert!(table.contains("address = \"127.0.0.1:4434\""), "{table}");
        assert!(DomainName::parse(DOMAIN_A).is_ok() && DomainName::parse(DOMAIN_B).is_ok());
    }
}
