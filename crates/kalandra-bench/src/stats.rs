//! Latency histograms.

use std::time::Duration;

use hdrhistogram::Histogram;

use crate::limits::LATENCY_US_MAX;

/// Latencies in microseconds with three significant digits.
#[derive(Clone)]
pub struct Latencies {
    histogram: Histogram<u64>,
}

impl Default for Latencies {
    fn default() -> Self {
        Latencies::new()
    }
}

impl Latencies {
    /// An empty histogram.
    pub fn new() -> Latencies {
        let histogram =
            Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("the bounds are valid constants");
        Latencies { histogram }
    }

    /// Records one latency (clamped to the histogram's range).
    pub fn record(&mut self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.histogram.saturating_record(micros.clamp(1, LATENCY_US_MAX));
    }

    /// Records one latency given in microseconds.
    pub fn record_us(&mut self, micros: u64) {
        self.histogram.saturating_record(micros.clamp(1, LATENCY_US_MAX));
    }

    /// Adds another histogram's samples.
    pub fn merge(&mut self, other: &Latencies) {
        self.histogram.add(&other.histogram).expect("histograms with equal bounds merge");
    }

    /// Samples recorded.
    pub fn count(&self) -> u64 {
        self.histogram.len()
    }

    /// The latency at `quantile` (0..=1), in milliseconds; 0 when empty.
    pub fn quantile_ms(&self, quantile: f64) -> f64 {
        if self.histogram.is_empty() {
            return 0.0;
        }
        #[allow(clippy::cast_precision_loss)]
        let micros = self.histogram.value_at_quantile(quantile) as f64;
        micros / 1_000.0
    }

    /// The highest latency recorded, in milliseconds.
    pub fn max_ms(&self) -> f64 {
        #[allow(clippy::cast_precision_loss)]
        let micros = self.histogram.max() as f64;
        micros / 1_000.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_of_a_known_distribution() {
        let mut latencies = Latencies::new();
        for micros in 1..=1_000u64 {
            latencies.record(Duration::from_micros(micros * 10));
        }
        assert_eq!(latencies.count(), 1_000);
        let p50 = latencies.quantile_ms(0.5);
        let p99 = latencies.quantile_ms(0.99);
        assert!((4.99..=5.01).contains(&p50), "{p50}");
        assert!((9.89..=9.91).contains(&p99), "{p99}");
        let mut other = Latencies::new();
        other.record(Duration::from_secs(1));
        latencies.merge(&other);
        assert!((999.0..=1_001.0).contains(&latencies.max_ms()));
    }
}
