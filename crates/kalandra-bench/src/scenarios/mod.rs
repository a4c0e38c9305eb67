//! The scenarios, and the load loops they share.

pub mod commit;
pub mod connections;
pub mod fanout;
pub mod federation;
pub mod latency;
pub mod throughput;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use client_core::connection::{Connection, ConnectionError};
use client_core::sender_keys::{open_application, SenderKeyState};
use kalandra_proto::payload::Error as ErrorPayload;
use kalandra_proto::{ErrorCode, Frame, Opcode, SenderId};

use crate::limits::{LOAD_REQUEST_ID_FIRST, RECEIVE_SLICE_MS};
use crate::members::Member;
use crate::procfs::{self, ProcessSample};
use crate::report::Report;
use crate::stats::Latencies;
use crate::BenchError;

/// Options every scenario shares.
#[derive(Debug, Clone, Copy)]
pub struct Common {
    /// Run nonce (seeds and room ids).
    pub nonce: u64,
    /// No progress line.
    pub quiet: bool,
}

/// What a pipelined sender saw.
#[derive(Default)]
pub struct SenderOutcome {
    /// Acknowledgement latencies.
    pub latencies: Latencies,
    /// Frames acknowledged.
    pub acked: u64,
    /// Frames refused, by error code.
    pub rejected: HashMap<u16, u64>,
    /// Other members' frames received meanwhile.
    pub deliveries: u64,
    /// (log index, request offset) of every acknowledged frame, when asked for.
    pub acked_indices: Vec<(u64, u32)>,
}

/// Sends `frames` (sealed, request ids from [`LOAD_REQUEST_ID_FIRST`]) as
/// fast as the window allows: at most `window` unacknowledged, refilled as
/// acknowledgements arrive. Frames to one room from one connection are
/// acknowledged in order, so a ring of `window` send instants suffices.
pub async fn pipelined_sender(
    connection: &mut Connection,
    frames: &[Bytes],
    window: usize,
    progress: &AtomicU64,
    keep_indices: bool,
) -> Result<SenderOutcome, BenchError> {
    let window = window.max(1);
    let total = frames.len();
    let mut sent_at: Vec<Option<Instant>> = vec![None; window];
    let mut outcome = SenderOutcome::default();
    let (mut next, mut in_flight, mut done) = (0usize, 0usize, 0usize);
    let mut buffer = Vec::with_capacity(64 * 1024);
    while done < total {
        if in_flight < window && next < total {
            buffer.clear();
            let now = Instant::now();
            while in_flight < window && next < total && buffer.len() < 64 * 1024 {
                buffer.extend_from_slice(&frames[next]);
                sent_at[next % window] = Some(now);
                next += 1;
                in_flight += 1;
            }
            connection
                .send_bytes(&buffer)
                .await
                .map_err(|e| BenchError::Connection { during: "sending load", detail: e.to_string() })?;
        }
        let first = connection.recv().await.map_err(|e| BenchError::Connection {
            during: "waiting for acknowledgements",
            detail: e.to_string(),
        })?;
        let mut frame = Some(first);
        while let Some(current) = frame {
            let header = current.header();
            let request_id = header.request_id();
            match current.opcode() {
                Opcode::Ack if request_id >= LOAD_REQUEST_ID_FIRST => {
                    let offset = (request_id - LOAD_REQUEST_ID_FIRST) as usize;
                    if let Some(at) = sent_at.get_mut(offset % window).and_then(Option::take) {
                        outcome.latencies.record(at.elapsed());
                    }
                    if keep_indices {
                        let log_index = current
                            .decode_payload::<kalandra_proto::payload::Ack>()
                            .map_or(u64::MAX, |ack| ack.log_index);
                        outcome.acked_indices.push((log_index, request_id - LOAD_REQUEST_ID_FIRST));
                    }
                    outcome.acked += 1;
                    in_flight -= 1;
                    done += 1;
                    progress.fetch_add(1, Ordering::Relaxed);
                }
                Opcode::Error if request_id >= LOAD_REQUEST_ID_FIRST => {
                    let code = current.decode_payload::<ErrorPayload>().map_or(0, |e| e.code);
                    *outcome.rejected.entry(code).or_insert(0) += 1;
                    let offset = (request_id - LOAD_REQUEST_ID_FIRST) as usize;
                    sent_at[offset % window] = None;
                    in_flight -= 1;
                    done += 1;
                    progress.fetch_add(1, Ordering::Relaxed);
                }
                Opcode::Error => {
                    let error = current.decode_payload::<ErrorPayload>().ok();
                    let code = error.as_ref().map_or(0, |e| e.code);
                    if code != ErrorCode::ResyncRequired.to_u16() {
                        return Err(crate::members::refusal(&current, "load"));
                    }
                    *outcome.rejected.entry(code).or_insert(0) += 1;
                }
                Opcode::Application => outcome.deliveries += 1,
                _ => {}
            }
            frame = connection.try_recv();
        }
    }
    Ok(outcome)
}

/// Counters every receive loop of a run adds to.
#[derive(Default)]
pub struct Deliveries {
    /// Application frames received.
    pub received: AtomicU64,
    /// Frames decrypted and checked (verifying receivers only).
    pub verified: AtomicU64,
    /// Frames whose signature, decryption or content did not check.
    pub verify_failures: AtomicU64,
    /// `ResyncRequired` notices (a reader fell behind and lost its live subscription).
    pub resyncs: AtomicU64,
    /// Nanoseconds from the run's start to the latest delivery.
    pub last_ns: AtomicU64,
}

/// Checks received frames as a member: signature against the sender's
/// credential, sender-key decryption, and the generation in the plaintext.
pub struct Verifier {
    keys: SenderKeyState,
    senders: HashMap<SenderId, (u32, [u8; 32])>,
}

impl Verifier {
    /// A verifier for `member`'s current epoch.
    pub fn new(member: &Member) -> Result<Verifier, BenchError> {
        let keys = member.sender_keys()?;
        let group = member.group.as_ref().expect("sender_keys checked the group");
        let senders = group
            .members()
            .into_iter()
            .filter_map(|info| {
                let key: [u8; 32] = info.identity.as_slice().try_into().ok()?;
                Some((SenderId::from_identity_key(&key), (info.leaf_index, key)))
            })
            .collect();
        Ok(Verifier { keys, senders })
    }

    /// Whether `frame` verifies and decrypts to a plaintext naming its generation.
    pub fn check(&mut self, frame: &Frame) -> bool {
        let Some(&(leaf, key)) = self.senders.get(&frame.header().sender_id()) else { return false };
        let Ok(generation) =
            frame.decode_payload::<kalandra_proto::payload::Application>().map(|a| a.generation)
        else {
            return false;
        };
        match open_application(&mut self.keys, frame, leaf, &key) {
            Ok(plaintext) => plaintext.get(..4) == Some(&generation.to_be_bytes()[..]),
            Err(_) => false,
        }
    }
}

/// Receives until `stop`, counting Application frames; `on_frame` sees each.
pub async fn receive_loop(
    mut connection: Connection,
    stop: Arc<AtomicBool>,
    deliveries: Arc<Deliveries>,
    started: Instant,
    mut verifier: Option<Verifier>,
    mut on_frame: impl FnMut(&Frame, u64) + Send,
) -> Result<Connection, BenchError> {
    let slice = Duration::from_millis(RECEIVE_SLICE_MS);
    loop {
        if stop.load(Ordering::Acquire) {
            return Ok(connection);
        }
        let frame = match tokio::time::timeout(slice, connection.recv()).await {
            Err(_) | Ok(Err(ConnectionError::TimedOut)) => continue,
            Ok(Err(error)) => {
                return Err(BenchError::Connection { during: "receiving", detail: error.to_string() })
            }
            Ok(Ok(frame)) => frame,
        };
        let mut frame = Some(frame);
        while let Some(current) = frame {
            match current.opcode() {
                Opcode::Application => {
                    let now_ns = nanos_since(started);
                    on_frame(&current, now_ns);
                    if let Some(verifier) = verifier.as_mut() {
                        if verifier.check(&current) {
                            deliveries.verified.fetch_add(1, Ordering::Relaxed);
                        } else {
                            deliveries.verify_failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    deliveries.received.fetch_add(1, Ordering::Relaxed);
                    deliveries.last_ns.fetch_max(now_ns, Ordering::Relaxed);
                }
                Opcode::Error => {
                    let code = current.decode_payload::<ErrorPayload>().map_or(0, |e| e.code);
                    if code == ErrorCode::ResyncRequired.to_u16() {
                        deliveries.resyncs.fetch_add(1, Ordering::Relaxed);
                    }
                }
                _ => {}
            }
            frame = connection.try_recv();
        }
    }
}

/// Nanoseconds since `started`.
pub fn nanos_since(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Waits until `done()` or `timeout`; `false` on timeout.
pub async fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while !done() {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

/// Progress stops counting after this long without a change.
pub const STALL_MS: u64 = 3_000;

/// Waits until `counter` reaches `expected`; gives up when it has not
/// moved for [`STALL_MS`] (a reader that fell behind lost frames) or after
/// [`DRAIN_TIMEOUT_MS`](crate::limits::DRAIN_TIMEOUT_MS). `true` if reached.
pub async fn wait_for_count(counter: &AtomicU64, expected: u64) -> bool {
    let deadline = Instant::now() + Duration::from_millis(crate::limits::DRAIN_TIMEOUT_MS);
    let (mut last, mut last_change) = (counter.load(Ordering::Relaxed), Instant::now());
    loop {
        let now_count = counter.load(Ordering::Relaxed);
        if now_count >= expected {
            return true;
        }
        if now_count != last {
            (last, last_change) = (now_count, Instant::now());
        }
        if Instant::now() >= deadline || last_change.elapsed() >= Duration::from_millis(STALL_MS) {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// CPU and memory of the server and of the generator around a timed part.
pub struct CpuWindow {
    server_pid: Option<u32>,
    server: Option<ProcessSample>,
    generator: Option<ProcessSample>,
    started: Instant,
}

impl CpuWindow {
    /// Starts a window.
    pub fn start(server_pid: Option<u32>) -> CpuWindow {
        CpuWindow {
            server_pid,
            server: server_pid.and_then(|pid| procfs::sample(pid).ok()),
            generator: procfs::sample_self().ok(),
            started: Instant::now(),
        }
    }

    /// Adds the cores each process used since the start to `report`.
    pub fn finish(self, report: &mut Report) {
        let seconds = self.started.elapsed().as_secs_f64();
        if let (Some(pid), Some(before)) = (self.server_pid, self.server) {
            if let Ok(after) = procfs::sample(pid) {
                report.figure("server_cpu_cores", procfs::cores_used(before, after, seconds), "cores");
                #[allow(clippy::cast_precision_loss)]
                report.figure("server_rss_mib", after.rss_bytes as f64 / (1024.0 * 1024.0), "MiB");
            }
        }
        if let Some(before) = self.generator {
            if let Ok(after) = procfs::sample_self() {
                report.figure("generator_cpu_cores", procfs::cores_used(before, after, seconds), "cores");
            }
        }
    }
}

/// Adds refusals by code to `report` and returns their total.
pub fn report_rejections(report: &mut Report, rejected: &HashMap<u16, u64>) -> u64 {
    let mut codes: Vec<_> = rejected.iter().collect();
    codes.sort();
    for (code, count) in &codes {
        #[allow(clippy::cast_precision_loss)]
        report.figure(&format!("refused_code_{code}"), **count as f64, "frames");
    }
    codes.iter().map(|(_, count)| **count).sum()
}

/// Checks that a numeric argument is within its bounds.
pub fn check_range(name: &str, value: u64, min: u64, max: u64) -> Result<(), BenchError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(BenchError::Usage(format!("{name} = {value} is outside {min}..={max}")))
    }
}
