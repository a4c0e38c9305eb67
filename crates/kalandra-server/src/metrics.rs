//! Server metrics: OpenTelemetry instruments exported in the Prometheus text
//! format.
//!
//! Metric names are stable and listed in `docs/OPERATIONS.md`; the constants
//! below are the exported (Prometheus) names.

use std::sync::Arc;

use kalandra_proto::{ErrorCode, Opcode};
use opentelemetry::metrics::{Counter, Histogram, Meter, MeterProvider as _, UpDownCounter};
use opentelemetry::KeyValue;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use prometheus::{Encoder as _, TextEncoder};

/// Content type of [`Metrics::render`]'s output.
pub const PROMETHEUS_TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// Frames received, by `opcode` (counter).
pub const FRAMES_IN_TOTAL: &str = "kalandra_frames_in_total";
/// Frames written to connections (counter).
pub const FRAMES_OUT_TOTAL: &str = "kalandra_frames_out_total";
/// Acknowledgements sent (counter).
pub const ACKS_TOTAL: &str = "kalandra_acks_total";
/// Requests rejected with an Error frame, by `code` (counter).
pub const REJECTIONS_TOTAL: &str = "kalandra_rejections_total";
/// Time to validate one MLS commit, seconds (histogram).
pub const COMMIT_VALIDATION_DURATION_SECONDS: &str = "kalandra_commit_validation_duration_seconds";
/// Entries written by one storage batch (histogram).
pub const STORAGE_BATCH_ENTRIES: &str = "kalandra_storage_batch_entries";
/// Time to make one storage batch durable, seconds (histogram).
pub const STORAGE_BATCH_DURATION_SECONDS: &str = "kalandra_storage_batch_duration_seconds";
/// Connections currently open (gauge).
pub const CONNECTIONS_OPEN: &str = "kalandra_connections_open";

/// Attribute carrying an opcode's specification name.
pub const OPCODE_ATTRIBUTE: &str = "opcode";
/// Attribute carrying an error code's specification name.
pub const CODE_ATTRIBUTE: &str = "code";

/// Histogram bucket bounds for commit validation, seconds.
const COMMIT_VALIDATION_BUCKETS_SECONDS: [f64; 12] =
    [0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];
/// Histogram bucket bounds for storage batch sizes, entries.
const STORAGE_BATCH_BUCKETS_ENTRIES: [f64; 12] =
    [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1_000.0, 2_000.0, 5_000.0];
/// Histogram bucket bounds for storage batch latency, seconds.
const STORAGE_BATCH_BUCKETS_SECONDS: [f64; 13] =
    [0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];

/// Name of the OpenTelemetry meter (instrumentation scope).
const METER_NAME: &str = "kalandra-server";

/// Metrics could not be set up or rendered.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The Prometheus exporter could not be built.
    #[error("cannot build the Prometheus exporter: {0}")]
    Exporter(String),
    /// The metrics could not be encoded as Prometheus text.
    #[error("cannot encode metrics: {0}")]
    Encode(#[from] prometheus::Error),
}

/// The server's metrics; cheap to clone (all clones record into the same instruments).
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: prometheus::Registry,
    /// Kept alive: the instruments stop exporting when the provider is dropped.
    provider: SdkMeterProvider,
    frames_in: Counter<u64>,
    frames_out: Counter<u64>,
    acks: Counter<u64>,
    rejections: Counter<u64>,
    commit_validation_seconds: Histogram<f64>,
    storage_batch_entries: Histogram<u64>,
    storage_batch_seconds: Histogram<f64>,
    connections_open: UpDownCounter<i64>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Shutting down a manual reader cannot lose data; its result carries no information.
        let _ = self.provider.shutdown();
    }
}

impl Metrics {
    /// Fresh instruments in their own Prometheus registry.
    pub fn new() -> Result<Metrics, MetricsError> {
        let registry = prometheus::Registry::new();
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .without_target_info()
            .scope_info_enabled(false)
            .build()
            .map_err(|error| MetricsError::Exporter(error.to_string()))?;
        let provider = SdkMeterProvider::builder().with_reader(exporter).build();
        let meter = provider.meter(METER_NAME);
        let inner = Inner {
            frames_in: counter(&meter, "kalandra_frames_in", "Frames received, by opcode."),
            frames_out: counter(&meter, "kalandra_frames_out", "Frames written to connections."),
            acks: counter(&meter, "kalandra_acks", "Acknowledgements sent."),
            rejections: counter(
                &meter,
                "kalandra_rejections",
                "Requests rejected with an Error frame, by error code.",
            ),
            commit_validation_seconds: meter
                .f64_histogram("kalandra_commit_validation_duration")
                .with_description("Time to validate one MLS commit.")
                .with_unit("s")
                .with_boundaries(COMMIT_VALIDATION_BUCKETS_SECONDS.to_vec())
                .build(),
            storage_batch_entries: meter
                .u64_histogram("kalandra_storage_batch_entries")
                .with_description("Entries written by one durable storage batch.")
                .with_boundaries(STORAGE_BATCH_BUCKETS_ENTRIES.to_vec())
                .build(),
            storage_batch_seconds: meter
                .f64_histogram("kalandra_storage_batch_duration")
                .with_description("Time to make one storage batch durable.")
                .with_unit("s")
                .with_boundaries(STORAGE_BATCH_BUCKETS_SECONDS.to_vec())
                .build(),
            connections_open: meter
                .i64_up_down_counter("kalandra_connections_open")
                .with_description("Connections currently open.")
                .build(),
            registry,
            provider,
        };
        Ok(Metrics { inner: Arc::new(inner) })
    }

    /// A frame with `opcode` was received.
    pub fn frame_in(&self, opcode: Opcode) {
        self.inner.frames_in.add(1, &[KeyValue::new(OPCODE_ATTRIBUTE, opcode.name())]);
    }

    /// A frame was written to a connection.
    pub fn frame_out(&self) {
        self.frames_out(1);
    }

    /// `count` frames were written to a connection in one write.
    pub fn frames_out(&self, count: u64) {
        if count > 0 {
            self.inner.frames_out.add(count, &[]);
        }
    }

    /// An acknowledgement was sent.
    pub fn ack(&self) {
        self.inner.acks.add(1, &[]);
    }

    /// A request was rejected with `code`.
    pub fn rejected(&self, code: ErrorCode) {
        self.inner.rejections.add(1, &[KeyValue::new(CODE_ATTRIBUTE, code.name())]);
    }

    /// A connection was opened.
    pub fn connection_opened(&self) {
        self.inner.connections_open.add(1, &[]);
    }

    /// A connection was closed.
    pub fn connection_closed(&self) {
        self.inner.connections_open.add(-1, &[]);
    }

    /// An MLS commit was validated in `seconds`.
    pub fn commit_validated(&self, seconds: f64) {
        self.inner.commit_validation_seconds.record(seconds, &[]);
    }

    /// A storage batch of `entries` was made durable in `seconds`.
    pub fn storage_batch(&self, entries: usize, seconds: f64) {
        let entries = u64::try_from(entries).unwrap_or(u64::MAX);
        self.inner.storage_batch_entries.record(entries, &[]);
        self.inner.storage_batch_seconds.record(seconds, &[]);
    }

    /// Every metric in the Prometheus text format
    /// ([`PROMETHEUS_TEXT_CONTENT_TYPE`]).
    pub fn render(&self) -> Result<String, MetricsError> {
        let families = self.inner.registry.gather();
        let mut text = Vec::new();
        TextEncoder::new().encode(&families, &mut text)?;
        String::from_utf8(text)
            .map_err(|error| MetricsError::Encode(prometheus::Error::Msg(error.to_string())))
    }
}

fn counter(meter: &Meter, name: &'static str, description: &'static str) -> Counter<u64> {
    meter.u64_counter(name).with_description(description).build()
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
        metrics.connection_opened();
        metrics.connection_opened();
        metrics.connection_closed();
        metrics.commit_validated(0.003);
        metrics.storage_batch(7, 0.002);
        metrics.storage_batch(300, 0.02);

        let text = metrics.render().expect("render");
        let expect = [
            ("kalandra_frames_in_total{opcode=\"Commit\"}", 2.0),
            ("kalandra_frames_in_total{opcode=\"Hello\"}", 1.0),
            ("kalandra_frames_out_total", 3.0),
            ("kalandra_acks_total", 1.0),
            ("kalandra_rejections_total{code=\"RateLimited\"}", 2.0),
            ("kalandra_rejections_total{code=\"WrongEpoch\"}", 1.0),
            ("kalandra_connections_open", 1.0),
            ("kalandra_commit_validation_duration_seconds_count", 1.0),
            ("kalandra_commit_validation_duration_seconds_sum", 0.003),
            ("kalandra_commit_validation_duration_seconds_bucket{le=\"0.0025\"}", 0.0),
            ("kalandra_commit_validation_duration_seconds_bucket{le=\"0.005\"}", 1.0),
            ("kalandra_storage_batch_entries_count", 2.0),
            ("kalandra_storage_batch_entries_sum", 307.0),
            ("kalandra_storage_batch_entries_bucket{le=\"10\"}", 1.0),
            ("kalandra_storage_batch_entries_bucket{le=\"500\"}", 2.0),
            ("kalandra_storage_batch_duration_seconds_count", 2.0),
            ("kalandra_storage_batch_duration_seconds_bucket{le=\"0.0025\"}", 1.0),
        ];
        for (series, value) in expect {
            assert_eq!(sample(&text, series), Some(value), "{series} in:\n{text}");
        }
        for name in [
            FRAMES_IN_TOTAL,
            FRAMES_OUT_TOTAL,
            ACKS_TOTAL,
            REJECTIONS_TOTAL,
            COMMIT_VALIDATION_DURATION_SECONDS,
            STORAGE_BATCH_ENTRIES,
            STORAGE_BATCH_DURATION_SECONDS,
            CONNECTIONS_OPEN,
        ] {
            assert!(text.contains(&format!("# TYPE {name} ")), "{name} missing in:\n{text}");
        }
        assert!(!text.contains("otel_scope"), "scope labels are disabled:\n{text}");
    }

    #[test]
    fn instances_are_independent() {
        let first = Metrics::new().expect("metrics");
        let second = Metrics::new().expect("metrics");
        first.ack();
        let text = second.render().expect("render");
        assert_eq!(sample(&text, ACKS_TOTAL), None, "{text}");
        assert_eq!(sample(&first.render().expect("render"), ACKS_TOTAL), Some(1.0));
    }
}
