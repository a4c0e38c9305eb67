//! Server metrics, rendered in the Prometheus text format (version 0.0.4).
//!
//! Every series exists from the start: counters and gauges are fixed arrays
//! over closed label sets (opcodes, error codes, admin routes and statuses),
//! so a fresh server's `/metrics` already lists each of them at zero and
//! `rate()` and absence alerts work from the first scrape. The recording
//! side is lock-free (atomics); rendering reads `/proc/self` for the
//! `process_*` series on Linux.
//!
//! Metric names are stable and listed in `docs/OPERATIONS.md`; the constants
//! below are the exported names.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use kalandra_proto::{ErrorCode, Opcode};

use crate::federation::codes::{
    FEDERATION_REFUSAL_CODES, FEDERATION_WELCOME_OUTCOMES, LINK_FAILURE_CODES, RELAY_DIRECTIONS,
    RELAY_REFUSAL_CODES, REPLICA_ERASURE_OUTCOMES, REPLICA_HEAD_OUTCOMES,
};
use crate::room::roles::Actor;

/// Content type of [`Metrics::render`]'s output.
pub const PROMETHEUS_TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// Build information: always 1, with `version` (gauge).
pub const BUILD_INFO: &str = "kalandra_build_info";
/// Frames received, by `opcode` (counter).
pub const FRAMES_IN_TOTAL: &str = "kalandra_frames_in_total";
/// Frames written to connections (counter).
pub const FRAMES_OUT_TOTAL: &str = "kalandra_frames_out_total";
/// Acknowledgements sent (counter).
pub const ACKS_TOTAL: &str = "kalandra_acks_total";
/// Wire-protocol requests rejected with an Error frame, by `code` (counter).
pub const REJECTIONS_TOTAL: &str = "kalandra_rejections_total";
/// Admin-API moderation acts the room core refused, by `code` (counter).
pub const ADMIN_REFUSALS_TOTAL: &str = "kalandra_admin_refusals_total";
/// Admin HTTP requests answered, by `method`, `route` and `status` (counter).
pub const ADMIN_REQUESTS_TOTAL: &str = "kalandra_admin_requests_total";
/// Failed authentications, by `surface` (`wire`, `admin`) (counter).
pub const AUTH_FAILURES_TOTAL: &str = "kalandra_auth_failures_total";
/// Push notifications the sink accepted (counter).
pub const PUSH_DELIVERED_TOTAL: &str = "kalandra_push_delivered_total";
/// Push notifications dropped, by `reason` (`queue_full`, `sink_failed`) (counter).
pub const PUSH_DROPPED_TOTAL: &str = "kalandra_push_dropped_total";
/// Time to validate one MLS commit, seconds (histogram).
pub const COMMIT_VALIDATION_DURATION_SECONDS: &str = "kalandra_commit_validation_duration_seconds";
/// Entries written by one storage batch (histogram).
pub const STORAGE_BATCH_ENTRIES: &str = "kalandra_storage_batch_entries";
/// Time to make one storage batch durable, seconds (histogram).
pub const STORAGE_BATCH_DURATION_SECONDS: &str = "kalandra_storage_batch_duration_seconds";
/// Connections currently open (gauge).
pub const CONNECTIONS_OPEN: &str = "kalandra_connections_open";
/// Rooms the server holds (gauge).
pub const ROOMS: &str = "kalandra_rooms";
/// Room memberships: the sum of every room's member count (gauge).
pub const ROOM_MEMBERS: &str = "kalandra_room_members";
/// Size of the database file, bytes (gauge).
pub const DATABASE_SIZE_BYTES: &str = "kalandra_database_size_bytes";
/// Whether at least one authenticated link with a peer domain is up, by
/// `peer` (gauge, 0 or 1).
pub const FEDERATION_LINK_UP: &str = "kalandra_federation_link_up";
/// Failed server-to-server link handshakes, by `code` (counter).
pub const FEDERATION_HANDSHAKE_FAILURES_TOTAL: &str = "kalandra_federation_handshake_failures_total";
/// Counter, by `code`: peers' answers refused, and requests naming an unknown domain.
pub const FEDERATION_REFUSALS_TOTAL: &str = "kalandra_federation_refusals_total";
/// Counter, by `code`: frames relayed between domains that were refused.
pub const FEDERATION_RELAY_REFUSALS_TOTAL: &str = "kalandra_federation_relay_refusals_total";
/// Counter, by `direction`: client frames relayed to (`out`) and from (`in`) other domains.
pub const FEDERATION_RELAYED_FRAMES_TOTAL: &str = "kalandra_federation_relayed_frames_total";
/// Counter, by `outcome`: heads an authority signed that a replica checked.
pub const FEDERATION_REPLICA_HEADS_TOTAL: &str = "kalandra_federation_replica_heads_total";
/// Counter, by `outcome`: entries of replicas here that their authority
/// erased, and erasures this server could not apply.
pub const FEDERATION_REPLICA_ERASURES_TOTAL: &str = "kalandra_federation_replica_erasures_total";
/// Gauge, by `peer`: frames this server (the rooms' authority) holds for
/// the peer's replica feed and has not sent yet, as of its last batch.
pub const FEDERATION_PEER_FEED_QUEUED_FRAMES: &str = "kalandra_federation_peer_feed_queued_frames";
/// Gauge, by `peer`: age (local clock minus the authority's timestamp) of
/// the newest frame this server's replicas took from the peer, as it was
/// taken, ms.
pub const FEDERATION_PEER_REPLICA_LAG_MS: &str = "kalandra_federation_peer_replica_lag_ms";
/// Gauge, by `peer` and `state` (`catching_up`, `live`, `refused`): this
/// server's replicas of rooms the peer orders.
pub const FEDERATION_PEER_REPLICAS: &str = "kalandra_federation_peer_replicas";
/// Counter, by `peer` and `code`: relayed and replicated frames of (or for)
/// the peer that were refused or dropped.
pub const FEDERATION_PEER_REFUSALS_TOTAL: &str = "kalandra_federation_peer_refusals_total";
/// Counter, by `outcome`: Welcomes for other domains' users forwarded to
/// their home domain, put off, or dropped, and peers' Welcomes stored here.
pub const FEDERATION_WELCOMES_TOTAL: &str = "kalandra_federation_welcomes_total";

/// Attribute carrying an opcode's specification name.
pub const OPCODE_ATTRIBUTE: &str = "opcode";
/// Attribute carrying an error code's specification name.
pub const CODE_ATTRIBUTE: &str = "code";

/// Statuses the admin requests counter distinguishes; any other is counted as `other`.
pub const ADMIN_STATUSES: [u16; 12] = [200, 400, 401, 403, 404, 405, 409, 413, 429, 500, 503, 504];
/// The `route` label of a request that matched no route.
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// Histogram bucket bounds for commit validation, seconds.
const COMMIT_VALIDATION_BUCKETS_SECONDS: [f64; 12] =
    [0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];
/// Histogram bucket bounds for storage batch sizes, entries.
const STORAGE_BATCH_BUCKETS_ENTRIES: [f64; 12] =
    [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1_000.0, 2_000.0, 5_000.0];
/// Histogram bucket bounds for storage batch latency, seconds.
const STORAGE_BATCH_BUCKETS_SECONDS: [f64; 13] =
    [0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];
/// Clock ticks per second of `/proc/self/stat` (`USER_HZ`, fixed at 100 in the Linux ABI).
const PROC_TICKS_PER_SECOND: f64 = 100.0;

const _: () = assert!(ADMIN_STATUSES.len() < 64);

/// Metrics could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// Formatting the text failed (only on allocation failure).
    #[error("cannot encode metrics: {0}")]
    Encode(#[from] std::fmt::Error),
}

/// A histogram with fixed bucket bounds.
struct Histogram {
    bounds: &'static [f64],
    /// Non-cumulative counts per bound, then one for `+Inf`.
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    /// The sum's `f64` bits.
    sum_bits: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_bits: AtomicU64::new(0f64.to_bits()),
        }
    }

    fn record(&self, value: f64) {
        let bucket = self.bounds.iter().position(|bound| value <= *bound).unwrap_or(self.bounds.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        let mut current = self.sum_bits.load(Ordering::Relaxed);
        loop {
            let next = (f64::from_bits(current) + value).to_bits();
            match self.sum_bits.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => break,
                Err(actual) => current = actual,
            }
        }
    }

    fn render(&self, out: &mut String, name: &str, help: &str) -> std::fmt::Result {
        header(out, name, help, "histogram")?;
        let mut cumulative = 0u64;
        for (bound, bucket) in self.bounds.iter().zip(&self.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}")?;
        }
        cumulative += self.buckets[self.bounds.len()].load(Ordering::Relaxed);
        writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}")?;
        writeln!(out, "{name}_sum {}", f64::from_bits(self.sum_bits.load(Ordering::Relaxed)))?;
        writeln!(out, "{name}_count {cumulative}")
    }
}

/// Counters, one per label value, in the order of `labels`.
struct Family {
    counts: Vec<AtomicU64>,
}

impl Family {
    fn new(size: usize) -> Family {
        Family { counts: (0..size).map(|_| AtomicU64::new(0)).collect() }
    }

    fn add(&self, index: usize, count: u64) {
        if let Some(counter) = self.counts.get(index) {
            counter.fetch_add(count, Ordering::Relaxed);
        }
    }

    fn get(&self, index: usize) -> u64 {
        self.counts.get(index).map_or(0, |counter| counter.load(Ordering::Relaxed))
    }
}

/// The surfaces an authentication can fail on.
const AUTH_SURFACES: [&str; 2] = ["wire", "admin"];
/// Why a push was dropped.
const PUSH_DROP_REASONS: [&str; 2] = ["queue_full", "sink_failed"];

/// The states a replica's follow is in, as the per-peer gauge names them.
pub const REPLICA_STATES: [&str; 3] = ["catching_up", "live", "refused"];

/// One configured peer's series.
struct PeerSeries {
    name: String,
    link_up: AtomicU64,
    feed_queued_frames: AtomicU64,
    replica_lag_ms: AtomicU64,
    replicas: [AtomicU64; REPLICA_STATES.len()],
    refusals: Family,
}

/// A peer's numbers, as the admin API shows them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerNumbers {
    /// Frames held for the peer's replica feed, not sent yet.
    pub feed_queued_frames: u64,
    /// Age of the newest frame taken from the peer, as it was taken, ms.
    pub replica_lag_ms: u64,
    /// Replicas of the peer's rooms here: catching up, live, refused.
    pub replicas: [u64; REPLICA_STATES.len()],
    /// Refusals by code (only codes counted at least once).
    pub refusals: Vec<(&'static str, u64)>,
}

/// The server's metrics; cheap to clone (all clones record into the same series).
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    admin_routes: Vec<(&'static str, &'static str)>,
    frames_in: Family,
    frames_out: AtomicU64,
    acks: AtomicU64,
    rejections: Family,
    admin_refusals: Family,
    admin_requests: Family,
    auth_failures: Family,
    push_delivered: AtomicU64,
    push_dropped: Family,
    commit_validation_seconds: Histogram,
    storage_batch_entries: Histogram,
    storage_batch_seconds: Histogram,
    connections_open: AtomicI64,
    rooms: AtomicU64,
    room_members: AtomicU64,
    database_size_bytes: AtomicU64,
    /// Each configured peer domain with its series, set once at start.
    federation_peers: std::sync::OnceLock<Vec<PeerSeries>>,
    federation_failures: Family,
    federation_refusals: Family,
    federation_relay_refusals: Family,
    federation_relayed: Family,
    federation_replica_heads: Family,
    federation_replica_erasures: Family,
    federation_welcomes: Family,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Fresh series, every one at zero. Never fails today; the `Result`
    /// keeps callers ready for series that need setting up.
    pub fn new() -> Result<Metrics, MetricsError> {
        let admin_routes = crate::admin::routes::ROUTES.to_vec();
        let admin_series = (admin_routes.len() + 1) * (ADMIN_STATUSES.len() + 1);
        let inner = Inner {
            frames_in: Family::new(Opcode::ALL.len()),
            frames_out: AtomicU64::new(0),
            acks: AtomicU64::new(0),
            rejections: Family::new(ErrorCode::ALL.len()),
            admin_refusals: Family::new(ErrorCode::ALL.len()),
            admin_requests: Family::new(admin_series),
            auth_failures: Family::new(AUTH_SURFACES.len()),
            push_delivered: AtomicU64::new(0),
            push_dropped: Family::new(PUSH_DROP_REASONS.len()),
            commit_validation_seconds: Histogram::new(&COMMIT_VALIDATION_BUCKETS_SECONDS),
            storage_batch_entries: Histogram::new(&STORAGE_BATCH_BUCKETS_ENTRIES),
            storage_batch_seconds: Histogram::new(&STORAGE_BATCH_BUCKETS_SECONDS),
            connections_open: AtomicI64::new(0),
            rooms: AtomicU64::new(0),
            room_members: AtomicU64::new(0),
            database_size_bytes: AtomicU64::new(0),
            federation_peers: std::sync::OnceLock::new(),
            federation_failures: Family::new(LINK_FAILURE_CODES.len()),
            federation_refusals: Family::new(FEDERATION_REFUSAL_CODES.len()),
            federation_relay_refusals: Family::new(RELAY_REFUSAL_CODES.len()),
            federation_relayed: Family::new(RELAY_DIRECTIONS.len()),
            federation_replica_heads: Family::new(REPLICA_HEAD_OUTCOMES.len()),
            federation_replica_erasures: Family::new(REPLICA_ERASURE_OUTCOMES.len()),
            federation_welcomes: Family::new(FEDERATION_WELCOME_OUTCOMES.len()),
            admin_routes,
        };
        Ok(Metrics { inner: Arc::new(inner) })
    }

    /// A frame with `opcode` was received.
    pub fn frame_in(&self, opcode: Opcode) {
        let index = Opcode::ALL.iter().position(|known| *known == opcode).unwrap_or(usize::MAX);
        self.inner.frames_in.add(index, 1);
    }

    /// A frame was written to a connection.
    pub fn frame_out(&self) {
        self.frames_out(1);
    }

    /// `count` frames were written to a connection in one write.
    pub fn frames_out(&self, count: u64) {
        self.inner.frames_out.fetch_add(count, Ordering::Relaxed);
    }

    /// An acknowledgement was sent.
    pub fn ack(&self) {
        self.acks(1);
    }

    /// `count` frames were acknowledged.
    pub fn acks(&self, count: u64) {
        self.inner.acks.fetch_add(count, Ordering::Relaxed);
    }

    /// A wire-protocol request was rejected with `code` (an
    /// `AuthenticationFailed` also counts as a failed authentication).
    pub fn rejected(&self, code: ErrorCode) {
        self.inner.rejections.add(code_index(code), 1);
        if code == ErrorCode::AuthenticationFailed {
            self.inner.auth_failures.add(0, 1);
        }
    }

    /// The room core refused a moderation act of `actor` with `code`: a
    /// member's is a wire rejection, the operator's an admin refusal.
    pub fn moderation_refused(&self, actor: &Actor, code: ErrorCode) {
        match actor {
            Actor::Member(_) => self.rejected(code),
            Actor::Operator => self.inner.admin_refusals.add(code_index(code), 1),
        }
    }

    /// An admin HTTP request presented no valid token.
    pub fn admin_auth_failed(&self) {
        self.inner.auth_failures.add(1, 1);
    }

    /// An admin HTTP request for route `route_index` (into
    /// [`crate::admin::routes::ROUTES`]; `None`: no route matched) was answered with `status`.
    pub fn admin_request(&self, route_index: Option<usize>, status: u16) {
        let routes = self.inner.admin_routes.len();
        let route = route_index.filter(|index| *index < routes).unwrap_or(routes);
        let status = ADMIN_STATUSES.iter().position(|known| *known == status).unwrap_or(ADMIN_STATUSES.len());
        self.inner.admin_requests.add(route * (ADMIN_STATUSES.len() + 1) + status, 1);
    }

    /// The push sink accepted a notification.
    pub fn push_delivered(&self) {
        self.inner.push_delivered.fetch_add(1, Ordering::Relaxed);
    }

    /// A push notification was dropped: the queue was full (`true`) or the sink failed.
    pub fn push_dropped(&self, queue_full: bool) {
        self.inner.push_dropped.add(usize::from(!queue_full), 1);
    }

    /// A connection was opened.
    pub fn connection_opened(&self) {
        self.inner.connections_open.fetch_add(1, Ordering::Relaxed);
    }

    /// A connection was closed.
    pub fn connection_closed(&self) {
        self.inner.connections_open.fetch_sub(1, Ordering::Relaxed);
    }

    /// An MLS commit was validated in `seconds`.
    pub fn commit_validated(&self, seconds: f64) {
        self.inner.commit_validation_seconds.record(seconds);
    }

    /// A storage batch of `entries` was made durable in `seconds`.
    pub fn storage_batch(&self, entries: usize, seconds: f64) {
        #[allow(clippy::cast_precision_loss)] // a batch is far below 2^52 entries
        self.inner.storage_batch_entries.record(entries as f64);
        self.inner.storage_batch_seconds.record(seconds);
    }

    /// Sets the room and membership gauges.
    pub fn set_rooms(&self, rooms: u64, members: u64) {
        self.inner.rooms.store(rooms, Ordering::Relaxed);
        self.inner.room_members.store(members, Ordering::Relaxed);
    }

    /// Sets the database size gauge.
    pub fn set_database_size(&self, bytes: u64) {
        self.inner.database_size_bytes.store(bytes, Ordering::Relaxed);
    }

    /// The peer domains the per-peer series exist for (the first call counts).
    pub fn set_federation_peers(&self, peers: Vec<String>) {
        let series = peers
            .into_iter()
            .map(|name| PeerSeries {
                name,
                link_up: AtomicU64::new(0),
                feed_queued_frames: AtomicU64::new(0),
                replica_lag_ms: AtomicU64::new(0),
                replicas: std::array::from_fn(|_| AtomicU64::new(0)),
                refusals: Family::new(RELAY_REFUSAL_CODES.len()),
            })
            .collect();
        let _ = self.inner.federation_peers.set(series);
    }

    fn peer(&self, peer: &str) -> Option<&PeerSeries> {
        self.inner.federation_peers.get()?.iter().find(|series| series.name == peer)
    }

    /// Whether a link with `peer` is up.
    pub fn federation_link_up(&self, peer: &str, up: bool) {
        if let Some(series) = self.peer(peer) {
            series.link_up.store(u64::from(up), Ordering::Relaxed);
        }
    }

    /// Frames held for `peer`'s replica feed and not sent yet.
    pub fn federation_feed_queued(&self, peer: &str, frames: u64) {
        if let Some(series) = self.peer(peer) {
            series.feed_queued_frames.store(frames, Ordering::Relaxed);
        }
    }

    /// Age of the newest frame just taken from `peer`'s feed, ms.
    pub fn federation_replica_lag(&self, peer: &str, lag_ms: u64) {
        if let Some(series) = self.peer(peer) {
            series.replica_lag_ms.store(lag_ms, Ordering::Relaxed);
        }
    }

    /// Replicas of `peer`'s rooms here, by [`REPLICA_STATES`].
    pub fn federation_replicas(&self, peer: &str, counts: [u64; REPLICA_STATES.len()]) {
        if let Some(series) = self.peer(peer) {
            for (gauge, count) in series.replicas.iter().zip(counts) {
                gauge.store(count, Ordering::Relaxed);
            }
        }
    }

    /// `peer`'s numbers (`None`: not a configured peer).
    pub fn peer_numbers(&self, peer: &str) -> Option<PeerNumbers> {
        let series = self.peer(peer)?;
        Some(PeerNumbers {
            feed_queued_frames: load(&series.feed_queued_frames),
            replica_lag_ms: load(&series.replica_lag_ms),
            replicas: std::array::from_fn(|index| load(&series.replicas[index])),
            refusals: RELAY_REFUSAL_CODES
                .iter()
                .enumerate()
                .map(|(index, code)| (*code, series.refusals.get(index)))
                .filter(|(_, count)| *count > 0)
                .collect(),
        })
    }

    /// A link handshake failed with `code` (one of [`LINK_FAILURE_CODES`]).
    pub fn federation_handshake_failed(&self, code: &str) {
        let index = LINK_FAILURE_CODES.iter().position(|known| *known == code).unwrap_or(usize::MAX);
        self.inner.federation_failures.add(index, 1);
    }

    /// Counts a refusal of a peer's answer (or of a request naming an
    /// unknown domain) under `code`, one of [`FEDERATION_REFUSAL_CODES`].
    pub fn federation_refused(&self, code: &str) {
        let index = FEDERATION_REFUSAL_CODES.iter().position(|known| *known == code).unwrap_or(usize::MAX);
        self.inner.federation_refusals.add(index, 1);
    }

    /// A frame relayed or replicated between this server and `peer` was
    /// refused or dropped under `code`, one of [`RELAY_REFUSAL_CODES`].
    pub fn relay_refused(&self, peer: &str, code: &str) {
        let index = RELAY_REFUSAL_CODES.iter().position(|known| *known == code).unwrap_or(usize::MAX);
        self.inner.federation_relay_refusals.add(index, 1);
        if let Some(series) = self.peer(peer) {
            series.refusals.add(index, 1);
        }
    }

    /// A client frame was relayed to (`out`) or accepted from (`in`) another domain.
    pub fn relayed(&self, direction: &str) {
        let index = RELAY_DIRECTIONS.iter().position(|known| *known == direction).unwrap_or(usize::MAX);
        self.inner.federation_relayed.add(index, 1);
    }

    /// A replica checked its authority's signed head: `outcome` is one of
    /// [`REPLICA_HEAD_OUTCOMES`].
    pub fn replica_head(&self, outcome: &str) {
        let index = REPLICA_HEAD_OUTCOMES.iter().position(|known| *known == outcome).unwrap_or(usize::MAX);
        self.inner.federation_replica_heads.add(index, 1);
    }

    /// Counts `count` under `outcome` of a replica's erasures, one of
    /// [`REPLICA_ERASURE_OUTCOMES`].
    pub fn replica_erasures(&self, outcome: &str, count: u64) {
        let index = REPLICA_ERASURE_OUTCOMES.iter().position(|known| *known == outcome).unwrap_or(usize::MAX);
        self.inner.federation_replica_erasures.add(index, count);
    }

    /// Counts a Welcome routed between domains under `outcome`, one of
    /// [`FEDERATION_WELCOME_OUTCOMES`].
    pub fn federation_welcome(&self, outcome: &str) {
        let index =
            FEDERATION_WELCOME_OUTCOMES.iter().position(|known| *known == outcome).unwrap_or(usize::MAX);
        self.inner.federation_welcomes.add(index, 1);
    }

    /// Every metric in the Prometheus text format
    /// ([`PROMETHEUS_TEXT_CONTENT_TYPE`]).
    pub fn render(&self) -> Result<String, MetricsError> {
        let mut out = String::with_capacity(32 * 1024);
        self.render_counters(&mut out)?;
        self.render_gauges(&mut out)?;
        let inner = &self.inner;
        inner.commit_validation_seconds.render(
            &mut out,
            COMMIT_VALIDATION_DURATION_SECONDS,
            "Time to validate one MLS commit, seconds.",
        )?;
        inner.storage_batch_entries.render(
            &mut out,
            STORAGE_BATCH_ENTRIES,
            "Entries written by one durable storage batch.",
        )?;
        inner.storage_batch_seconds.render(
            &mut out,
            STORAGE_BATCH_DURATION_SECONDS,
            "Time to make one storage batch durable, seconds.",
        )?;
        render_process(&mut out)?;
        Ok(out)
    }

    fn render_counters(&self, out: &mut String) -> std::fmt::Result {
        let inner = &self.inner;
        header(out, FRAMES_IN_TOTAL, "Frames received, by opcode.", "counter")?;
        for (index, opcode) in Opcode::ALL.iter().enumerate() {
            let value = inner.frames_in.get(index);
            writeln!(out, "{FRAMES_IN_TOTAL}{{{OPCODE_ATTRIBUTE}=\"{}\"}} {value}", opcode.name())?;
        }
        scalar(out, FRAMES_OUT_TOTAL, "Frames written to connections.", "counter", load(&inner.frames_out))?;
        scalar(out, ACKS_TOTAL, "Acknowledgements sent.", "counter", load(&inner.acks))?;
        let help = "Wire-protocol requests rejected with an Error frame, by error code.";
        by_code(out, REJECTIONS_TOTAL, help, &inner.rejections)?;
        let help = "Admin API moderation acts refused by the room core, by error code.";
        by_code(out, ADMIN_REFUSALS_TOTAL, help, &inner.admin_refusals)?;
        let help = "Admin HTTP requests answered, by method, route and status.";
        header(out, ADMIN_REQUESTS_TOTAL, help, "counter")?;
        let routes =
            inner.admin_routes.iter().copied().chain(std::iter::once(("", UNMATCHED_ROUTE))).enumerate();
        for (route_index, (method, route)) in routes {
            let statuses = ADMIN_STATUSES.iter().map(u16::to_string).chain(std::iter::once("other".into()));
            for (status_index, status) in statuses.enumerate() {
                let value = inner.admin_requests.get(route_index * (ADMIN_STATUSES.len() + 1) + status_index);
                writeln!(
                    out,
                    "{ADMIN_REQUESTS_TOTAL}{{method=\"{method}\",route=\"{route}\",status=\"{status}\"}} {value}"
                )?;
            }
        }
        let help = "Failed authentications, by surface (wire protocol or admin API).";
        labelled(out, AUTH_FAILURES_TOTAL, help, "surface", &AUTH_SURFACES, &inner.auth_failures)?;
        let help = "Push notifications the push sink accepted.";
        scalar(out, PUSH_DELIVERED_TOTAL, help, "counter", load(&inner.push_delivered))?;
        let help = "Push notifications dropped, by reason.";
        labelled(out, PUSH_DROPPED_TOTAL, help, "reason", &PUSH_DROP_REASONS, &inner.push_dropped)?;
        let help = "Failed server-to-server link handshakes, by code.";
        labelled(
            out,
            FEDERATION_HANDSHAKE_FAILURES_TOTAL,
            help,
            "code",
            &LINK_FAILURE_CODES,
            &inner.federation_failures,
        )?;
        let help = "Refused answers of peer domains, and requests naming an unknown domain, by code.";
        labelled(
            out,
            FEDERATION_REFUSALS_TOTAL,
            help,
            "code",
            &FEDERATION_REFUSAL_CODES,
            &inner.federation_refusals,
        )?;
        let help = "Frames relayed between domains that were refused, by code.";
        labelled(
            out,
            FEDERATION_RELAY_REFUSALS_TOTAL,
            help,
            "code",
            &RELAY_REFUSAL_CODES,
            &inner.federation_relay_refusals,
        )?;
        let help = "Client frames relayed to (out) and accepted from (in) other domains.";
        labelled(
            out,
            FEDERATION_RELAYED_FRAMES_TOTAL,
            help,
            "direction",
            &RELAY_DIRECTIONS,
            &inner.federation_relayed,
        )?;
        let help = "Heads the authority of a room signed that its replica here checked, by outcome.";
        labelled(
            out,
            FEDERATION_REPLICA_HEADS_TOTAL,
            help,
            "outcome",
            &REPLICA_HEAD_OUTCOMES,
            &inner.federation_replica_heads,
        )?;
        let help =
            "Entries of replicas here that their authority erased, and erasures not applied, by outcome.";
        labelled(
            out,
            FEDERATION_REPLICA_ERASURES_TOTAL,
            help,
            "outcome",
            &REPLICA_ERASURE_OUTCOMES,
            &inner.federation_replica_erasures,
        )?;
        let help = "Welcomes routed between domains, by outcome.";
        labelled(
            out,
            FEDERATION_WELCOMES_TOTAL,
            help,
            "outcome",
            &FEDERATION_WELCOME_OUTCOMES,
            &inner.federation_welcomes,
        )
    }

    fn render_gauges(&self, out: &mut String) -> std::fmt::Result {
        let inner = &self.inner;
        header(out, BUILD_INFO, "Build information; always 1.", "gauge")?;
        writeln!(out, "{BUILD_INFO}{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"))?;
        let open = inner.connections_open.load(Ordering::Relaxed);
        header(out, CONNECTIONS_OPEN, "Connections currently open.", "gauge")?;
        writeln!(out, "{CONNECTIONS_OPEN} {open}")?;
        scalar(out, ROOMS, "Rooms the server holds.", "gauge", load(&inner.rooms))?;
        let help = "Room memberships (the sum of every room's member count).";
        scalar(out, ROOM_MEMBERS, help, "gauge", load(&inner.room_members))?;
        let help = "Size of the database file, bytes.";
        scalar(out, DATABASE_SIZE_BYTES, help, "gauge", load(&inner.database_size_bytes))?;
        let help = "Whether an authenticated link with the peer domain is up (1) or not (0).";
        header(out, FEDERATION_LINK_UP, help, "gauge")?;
        let peers = inner.federation_peers.get().map_or(&[][..], Vec::as_slice);
        for series in peers {
            writeln!(out, "{FEDERATION_LINK_UP}{{peer=\"{}\"}} {}", series.name, load(&series.link_up))?;
        }
        render_peers(out, peers)
    }
}

/// The per-peer federation series.
fn render_peers(out: &mut String, peers: &[PeerSeries]) -> std::fmt::Result {
    let help = "Frames held for the peer's replica feed and not sent yet, as of its last batch.";
    header(out, FEDERATION_PEER_FEED_QUEUED_FRAMES, help, "gauge")?;
    for series in peers {
        let value = load(&series.feed_queued_frames);
        writeln!(out, "{FEDERATION_PEER_FEED_QUEUED_FRAMES}{{peer=\"{}\"}} {value}", series.name)?;
    }
    let help = "Age of the newest frame the replicas here took from the peer, as it was taken, ms.";
    header(out, FEDERATION_PEER_REPLICA_LAG_MS, help, "gauge")?;
    for series in peers {
        let value = load(&series.replica_lag_ms);
        writeln!(out, "{FEDERATION_PEER_REPLICA_LAG_MS}{{peer=\"{}\"}} {value}", series.name)?;
    }
    let help = "Replicas here of rooms the peer orders, by state.";
    header(out, FEDERATION_PEER_REPLICAS, help, "gauge")?;
    for series in peers {
        for (state, gauge) in REPLICA_STATES.iter().zip(&series.replicas) {
            let (name, value) = (&series.name, load(gauge));
            writeln!(out, "{FEDERATION_PEER_REPLICAS}{{peer=\"{name}\",state=\"{state}\"}} {value}")?;
        }
    }
    let help = "Frames relayed or replicated between this server and the peer that were refused or dropped, by code.";
    header(out, FEDERATION_PEER_REFUSALS_TOTAL, help, "counter")?;
    for series in peers {
        for (index, code) in RELAY_REFUSAL_CODES.iter().enumerate() {
            let (name, value) = (&series.name, series.refusals.get(index));
            writeln!(out, "{FEDERATION_PEER_REFUSALS_TOTAL}{{peer=\"{name}\",code=\"{code}\"}} {value}")?;
        }
    }
    Ok(())
}

fn code_index(code: ErrorCode) -> usize {
    ErrorCode::ALL.iter().position(|known| *known == code).unwrap_or(usize::MAX)
}

fn load(value: &AtomicU64) -> u64 {
    value.load(Ordering::Relaxed)
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) -> std::fmt::Result {
    writeln!(out, "# HELP {name} {help}")?;
    writeln!(out, "# TYPE {name} {kind}")
}

fn scalar(out: &mut String, name: &str, help: &str, kind: &str, value: u64) -> std::fmt::Result {
    header(out, name, help, kind)?;
    writeln!(out, "{name} {value}")
}

fn by_code(out: &mut String, name: &str, help: &str, family: &Family) -> std::fmt::Result {
    header(out, name, help, "counter")?;
    for (index, code) in ErrorCode::ALL.iter().enumerate() {
        writeln!(out, "{name}{{{CODE_ATTRIBUTE}=\"{}\"}} {}", code.name(), family.get(index))?;
    }
    Ok(())
}

fn labelled(
    out: &mut String,
    name: &str,
    help: &str,
    label: &str,
    values: &[&str],
    family: &Family,
) -> std::fmt::Result {
    header(out, name, help, "counter")?;
    for (index, value) in values.iter().enumerate() {
        writeln!(out, "{name}{{{label}=\"{value}\"}} {}", family.get(index))?;
    }
    Ok(())
}

/// What `/proc/self` says about this process (Linux; elsewhere nothing).
#[derive(Debug, Default, PartialEq)]
struct ProcessStats {
    cpu_seconds: f64,
    start_time_seconds: f64,
    resident_bytes: u64,
    virtual_bytes: u64,
    open_fds: u64,
    max_fds: Option<u64>,
}

/// The `process_*` series of the Prometheus client conventions.
fn render_process(out: &mut String) -> std::fmt::Result {
    let Some(stats) = process_stats() else { return Ok(()) };
    header(out, "process_cpu_seconds_total", "Total user and system CPU time spent, seconds.", "counter")?;
    writeln!(out, "process_cpu_seconds_total {}", stats.cpu_seconds)?;
    header(
        out,
        "process_start_time_seconds",
        "Start time of the process since the Unix epoch, seconds.",
        "gauge",
    )?;
    writeln!(out, "process_start_time_seconds {}", stats.start_time_seconds)?;
    scalar(
        out,
        "process_resident_memory_bytes",
        "Resident memory size, bytes.",
        "gauge",
        stats.resident_bytes,
    )?;
    scalar(out, "process_virtual_memory_bytes", "Virtual memory size, bytes.", "gauge", stats.virtual_bytes)?;
    scalar(out, "process_open_fds", "Open file descriptors.", "gauge", stats.open_fds)?;
    if let Some(max_fds) = stats.max_fds {
        scalar(out, "process_max_fds", "Limit on open file descriptors.", "gauge", max_fds)?;
    }
    Ok(())
}

fn process_stats() -> Option<ProcessStats> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let boot = std::fs::read_to_string("/proc/stat").ok()?;
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count();
    let mut stats = parse_process(&stat, &status, &boot, &limits)?;
    // The directory handle of the listing is one of the entries.
    stats.open_fds = u64::try_from(open_fds.saturating_sub(1)).unwrap_or(u64::MAX);
    Some(stats)
}

/// Parses the `/proc` files [`process_stats`] reads.
#[allow(clippy::cast_precision_loss)] // tick counts stay far below 2^52
fn parse_process(stat: &str, status: &str, boot: &str, limits: &str) -> Option<ProcessStats> {
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime, stime and starttime are fields 14, 15 and 22 of stat(5); fields[0] is field 3.
    let ticks = |field: usize| fields.get(field - 3).and_then(|value| value.parse::<u64>().ok());
    let cpu_ticks = ticks(14)?.saturating_add(ticks(15)?);
    let boot_seconds: u64 = boot.lines().find_map(|line| line.strip_prefix("btime "))?.trim().parse().ok()?;
    let kib = |key: &str| -> Option<u64> {
        let line = status.lines().find_map(|line| line.strip_prefix(key))?;
        line.trim().trim_end_matches("kB").trim().parse::<u64>().ok().map(|kib| kib.saturating_mul(1024))
    };
    let max_fds = limits
        .lines()
        .find_map(|line| line.strip_prefix("Max open files"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|soft| soft.parse().ok());
    Some(ProcessStats {
        cpu_seconds: cpu_ticks as f64 / PROC_TICKS_PER_SECOND,
        start_time_seconds: boot_seconds as f64 + ticks(22)? as f64 / PROC_TICKS_PER_SECOND,
        resident_bytes: kib("VmRSS:").unwrap_or(0),
        virtual_bytes: kib("VmSize:").unwrap_or(0),
        open_fds: 0,
        max_fds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the sample line `name{labels} value` (exact label text), if present.
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|line| {
            let rest = line.strip_prefix(series)?;
            rest.strip_prefix(' ')?.trim().parse().ok()
        })
    }

    #[test]
    fn recorded_values_are_rendered() {
        let metrics = Metrics::new().expect("metrics");
        let clone = metrics.clone();
        metrics.frame_in(Opcode::Commit);
        metrics.frame_in(Opcode::Commit);
        clone.frame_in(Opcode::Hello);
        metrics.frame_out();
        metrics.frame_out();
        metrics.frame_out();
        metrics.ack();
        metrics.rejected(ErrorCode::RateLimited);
        metrics.rejected(ErrorCode::WrongEpoch);
        metrics.rejected(ErrorCode::RateLimited);
        metrics.rejected(ErrorCode::AuthenticationFailed);
        metrics.moderation_refused(&Actor::Operator, ErrorCode::Banned);
        metrics.moderation_refused(&Actor::Member(kalandra_proto::SenderId(3)), ErrorCode::Forbidden);
        metrics.admin_auth_failed();
        metrics.admin_request(Some(4), 200);
        metrics.admin_request(Some(4), 401);
        metrics.admin_request(None, 404);
        metrics.admin_request(Some(4), 418);
        metrics.push_delivered();
        metrics.push_dropped(true);
        metrics.push_dropped(false);
        metrics.push_dropped(false);
        metrics.connection_opened();
        metrics.connection_opened();
        metrics.connection_closed();
        metrics.set_rooms(3, 7);
        metrics.set_database_size(4096);
        metrics.commit_validated(0.003);
        metrics.storage_batch(7, 0.002);
        metrics.storage_batch(300, 0.02);

        let text = metrics.render().expect("render");
        let route = crate::admin::routes::ROUTES[4];
        let admin = |status: &str| {
            format!(
                "{ADMIN_REQUESTS_TOTAL}{{method=\"{}\",route=\"{}\",status=\"{status}\"}}",
                route.0, route.1
            )
        };
        let expect = [
            ("kalandra_frames_in_total{opcode=\"Commit\"}".to_owned(), 2.0),
            ("kalandra_frames_in_total{opcode=\"Hello\"}".to_owned(), 1.0),
            ("kalandra_frames_in_total{opcode=\"Application\"}".to_owned(), 0.0),
            ("kalandra_frames_out_total".to_owned(), 3.0),
            ("kalandra_acks_total".to_owned(), 1.0),
            ("kalandra_rejections_total{code=\"RateLimited\"}".to_owned(), 2.0),
            ("kalandra_rejections_total{code=\"WrongEpoch\"}".to_owned(), 1.0),
            ("kalandra_rejections_total{code=\"Forbidden\"}".to_owned(), 1.0),
            ("kalandra_rejections_total{code=\"Banned\"}".to_owned(), 0.0),
            ("kalandra_admin_refusals_total{code=\"Banned\"}".to_owned(), 1.0),
            ("kalandra_admin_refusals_total{code=\"Forbidden\"}".to_owned(), 0.0),
            ("kalandra_auth_failures_total{surface=\"wire\"}".to_owned(), 1.0),
            ("kalandra_auth_failures_total{surface=\"admin\"}".to_owned(), 1.0),
            (admin("200"), 1.0),
            (admin("401"), 1.0),
            (admin("other"), 1.0),
            (admin("503"), 0.0),
            (format!("{ADMIN_REQUESTS_TOTAL}{{method=\"\",route=\"unmatched\",status=\"404\"}}"), 1.0),
            ("kalandra_push_delivered_total".to_owned(), 1.0),
            ("kalandra_push_dropped_total{reason=\"queue_full\"}".to_owned(), 1.0),
            ("kalandra_push_dropped_total{reason=\"sink_failed\"}".to_owned(), 2.0),
            ("kalandra_connections_open".to_owned(), 1.0),
            ("kalandra_rooms".to_owned(), 3.0),
            ("kalandra_room_members".to_owned(), 7.0),
            ("kalandra_database_size_bytes".to_owned(), 4096.0),
            (format!("kalandra_build_info{{version=\"{}\"}}", env!("CARGO_PKG_VERSION")), 1.0),
            ("kalandra_commit_validation_duration_seconds_count".to_owned(), 1.0),
            ("kalandra_commit_validation_duration_seconds_sum".to_owned(), 0.003),
            ("kalandra_commit_validation_duration_seconds_bucket{le=\"0.0025\"}".to_owned(), 0.0),
            ("kalandra_commit_validation_duration_seconds_bucket{le=\"0.005\"}".to_owned(), 1.0),
            ("kalandra_commit_validation_duration_seconds_bucket{le=\"+Inf\"}".to_owned(), 1.0),
            ("kalandra_storage_batch_entries_count".to_owned(), 2.0),
            ("kalandra_storage_batch_entries_sum".to_owned(), 307.0),
            ("kalandra_storage_batch_entries_bucket{le=\"10\"}".to_owned(), 1.0),
            ("kalandra_storage_batch_entries_bucket{le=\"500\"}".to_owned(), 2.0),
            ("kalandra_storage_batch_duration_seconds_count".to_owned(), 2.0),
            ("kalandra_storage_batch_duration_seconds_bucket{le=\"0.0025\"}".to_owned(), 1.0),
        ];
        for (series, value) in expect {
            assert_eq!(sample(&text, &series), Some(value), "{series} in:\n{text}");
        }
    }

    #[test]
    fn every_series_exists_before_any_event() {
        let text = Metrics::new().expect("metrics").render().expect("render");
        for name in [
            BUILD_INFO,
            FRAMES_IN_TOTAL,
            FRAMES_OUT_TOTAL,
            ACKS_TOTAL,
            REJECTIONS_TOTAL,
            ADMIN_REFUSALS_TOTAL,
            ADMIN_REQUESTS_TOTAL,
            AUTH_FAILURES_TOTAL,
            PUSH_DELIVERED_TOTAL,
            PUSH_DROPPED_TOTAL,
            COMMIT_VALIDATION_DURATION_SECONDS,
            STORAGE_BATCH_ENTRIES,
            STORAGE_BATCH_DURATION_SECONDS,
            CONNECTIONS_OPEN,
            ROOMS,
            ROOM_MEMBERS,
            DATABASE_SIZE_BYTES,
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_max_fds",
            "process_start_time_seconds",
        ] {
            assert!(text.contains(&format!("# TYPE {name} ")), "{name} missing in:\n{text}");
        }
        for code in ErrorCode::ALL {
            let series = format!("{REJECTIONS_TOTAL}{{code=\"{}\"}}", code.name());
            assert_eq!(sample(&text, &series), Some(0.0), "{series}");
        }
        for (method, route) in crate::admin::routes::ROUTES {
            let series =
                format!("{ADMIN_REQUESTS_TOTAL}{{method=\"{method}\",route=\"{route}\",status=\"200\"}}");
            assert_eq!(sample(&text, &series), Some(0.0), "{series}");
        }
        assert!(sample(&text, "process_resident_memory_bytes").is_some_and(|bytes| bytes > 0.0), "{text}");
    }

    #[test]
    fn proc_files_parse() {
        let stat = "4242 (kalandra server) S 1 2 3 4 5 6 7 8 9 10 250 150 0 0 20 0 8 0 5000 1000 100";
        let status = "Name:\tx\nVmSize:\t  2048 kB\nVmRSS:\t    512 kB\n";
        let boot = "cpu  1 2 3\nbtime 1700000000\n";
        let limits = "Limit Soft Limit Hard Limit Units\nMax open files            65536                524288               files\n";
        let stats = parse_process(stat, status, boot, limits).expect("parsed");
        assert_eq!(
            stats,
            ProcessStats {
                cpu_seconds: 4.0,
                start_time_seconds: 1_700_000_050.0,
                resident_bytes: 512 * 1024,
                virtual_bytes: 2048 * 1024,
                open_fds: 0,
                max_fds: Some(65536),
            }
        );
        assert_eq!(parse_process("garbage", status, boot, limits), None);
    }

    #[test]
    fn instances_are_independent() {
        let first = Metrics::new().expect("metrics");
        let second = Metrics::new().expect("metrics");
        first.ack();
        let text = second.render().expect("render");
        assert_eq!(sample(&text, ACKS_TOTAL), Some(0.0), "{text}");
        assert_eq!(sample(&first.render().expect("render"), ACKS_TOTAL), Some(1.0));
    }
}
