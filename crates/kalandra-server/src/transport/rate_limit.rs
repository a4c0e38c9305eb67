//! Token-bucket rate limiting without a clock.
//!
//! [`TokenBucket`] is pure: the caller passes the time (`now_ms`, any
//! millisecond counter that normally moves forward) to every call. Tokens are
//! kept as whole micro-tokens in integers, so refills are exact and a bucket
//! never grants more than `burst + rate * elapsed` tokens over any window.
//! Time that goes backwards refills nothing; time already credited is never
//! credited twice; huge gaps saturate at a full bucket.
//!
//! [`KeyedLimiter`] keeps one bucket per key (user, address) with a bounded
//! number of keys: at capacity it evicts the least recently used bucket.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

/// Micro-tokens per token: the resolution of rates, bursts and requests.
pub const MICRO_TOKENS_PER_TOKEN: u64 = 1_000_000;

/// Milliseconds per second.
const MS_PER_SECOND: u64 = 1_000;

// A rate of one token per second must refill a whole number of micro-tokens per millisecond.
const _: () = assert!(MICRO_TOKENS_PER_TOKEN.is_multiple_of(MS_PER_SECOND));

/// A request was refused; it may succeed after this many milliseconds.
///
/// `u64::MAX` means never: the request is larger than the burst, or the
/// bucket does not refill.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RetryAfterMs(pub u64);

/// Converts a non-negative amount of tokens (or tokens per millisecond) to
/// micro-tokens, rounding to nearest; negative values and NaN become 0, and
/// values beyond `u64::MAX` saturate.
#[allow(clippy::cast_possible_truncation)] // Float-to-integer `as` saturates, which is the intent.
fn to_micro_tokens(value: f64, scale: f64) -> u64 {
    let scaled = (value * scale).round();
    if scaled.is_nan() || scaled <= 0.0 {
        0
    } else {
        scaled as u64
    }
}

/// A token bucket: `burst` tokens of capacity, refilled at `rate_per_second`.
///
/// A new bucket is full and considers time 0 already credited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBucket {
    /// Micro-tokens added per elapsed millisecond.
    refill_micro_per_ms: u64,
    /// Capacity in micro-tokens.
    capacity_micro: u64,
    /// Tokens available at `credited_ms`, in micro-tokens.
    available_micro: u64,
    /// Latest time already credited (a high-water mark).
    credited_ms: u64,
}

impl TokenBucket {
    /// A full bucket holding up to `burst` tokens, refilled at
    /// `rate_per_second` tokens per second.
    ///
    /// Both are rounded to micro-tokens (a rate to 0.001 tokens per second);
    /// negative or NaN values count as 0.
    pub fn new(rate_per_second: f64, burst: f64) -> TokenBucket {
        let capacity_micro = to_micro_tokens(burst, MICRO_TOKENS_PER_TOKEN as f64);
        TokenBucket {
            refill_micro_per_ms: to_micro_tokens(
                rate_per_second,
                (MICRO_TOKENS_PER_TOKEN / MS_PER_SECOND) as f64,
            ),
            capacity_micro,
            available_micro: capacity_micro,
            credited_ms: 0,
        }
    }

    /// Takes `tokens` at time `now_ms`, or says how long to wait.
    ///
    /// A refused request takes nothing. Requests of 0 tokens (or negative or
    /// NaN) always succeed.
    pub fn try_take(&mut self, now_ms: u64, tokens: f64) -> Result<(), RetryAfterMs> {
        self.refill(now_ms);
        let wanted_micro = to_micro_tokens(tokens, MICRO_TOKENS_PER_TOKEN as f64);
        if wanted_micro <= self.available_micro {
            self.available_micro -= wanted_micro;
            return Ok(());
        }
        if wanted_micro > self.capacity_micro || self.refill_micro_per_ms == 0 {
            return Err(RetryAfterMs(u64::MAX));
        }
        let deficit_micro = wanted_micro - self.available_micro;
        let refill_ms = deficit_micro.div_ceil(self.refill_micro_per_ms);
        // If the clock went backwards, the credited time must be reached first.
        let behind_ms = self.credited_ms.saturating_sub(now_ms);
        Err(RetryAfterMs(refill_ms.saturating_add(behind_ms)))
    }

    /// Whether the bucket is full at `now_ms` (taking nothing): a full bucket
    /// is indistinguishable from a new one.
    #[cfg(test)]
    pub fn is_full(&self, now_ms: u64) -> bool {
        let mut probe = self.clone();
        probe.refill(now_ms);
        probe.available_micro == probe.capacity_micro
    }

    /// Tokens available at `now_ms`, without taking any.
    #[cfg(test)]
    pub fn available(&self, now_ms: u64) -> f64 {
        let mut probe = self.clone();
        probe.refill(now_ms);
        probe.available_micro as f64 / MICRO_TOKENS_PER_TOKEN as f64
    }

    fn refill(&mut self, now_ms: u64) {
        if now_ms <= self.credited_ms {
            return;
        }
        let elapsed_ms = now_ms - self.credited_ms;
        let added_micro = elapsed_ms.saturating_mul(self.refill_micro_per_ms);
        self.available_micro = self.available_micro.saturating_add(added_micro).min(self.capacity_micro);
        self.credited_ms = now_ms;
    }
}

/// One bucket per key, with at most `keys_max` keys.
///
/// When a new key arrives at capacity, the least recently used key's bucket
/// is dropped (ties are impossible: uses are numbered). That key starts
/// again from a full bucket if it returns, so eviction gives back at most one
/// burst to the longest-idle key; with a sensible `keys_max` the evicted
/// bucket has normally refilled to full anyway.
#[derive(Debug, Clone)]
pub struct KeyedLimiter<K> {
    rate_per_second: f64,
    burst: f64,
    keys_max: usize,
    /// Each key's bucket and the number of its latest use.
    buckets: HashMap<K, (TokenBucket, u64)>,
    /// Keys by the number of their latest use, oldest first.
    by_use: BTreeMap<u64, K>,
    /// Number given to the next use.
    next_use: u64,
}

impl<K: Eq + Hash + Clone> KeyedLimiter<K> {
    /// A limiter giving each key a [`TokenBucket::new`]`(rate_per_second, burst)`
    /// and tracking at most `keys_max` keys (at least 1).
    pub fn new(rate_per_second: f64, burst: f64, keys_max: usize) -> KeyedLimiter<K> {
        KeyedLimiter {
            rate_per_second,
            burst,
            keys_max: keys_max.max(1),
            buckets: HashMap::new(),
            by_use: BTreeMap::new(),
            next_use: 0,
        }
    }

    /// Takes `tokens` from `key`'s bucket at `now_ms`, or says how long to wait.
    pub fn try_take(&mut self, key: K, now_ms: u64, tokens: f64) -> Result<(), RetryAfterMs> {
        let use_number = self.next_use;
        self.next_use += 1;
        if let Some((bucket, last_use)) = self.buckets.get_mut(&key) {
            self.by_use.remove(last_use);
            *last_use = use_number;
            self.by_use.insert(use_number, key);
            return bucket.try_take(now_ms, tokens);
        }
        while self.buckets.len() >= self.keys_max {
            let Some((_, oldest)) = self.by_use.pop_first() else {
                break;
            };
            self.buckets.remove(&oldest);
        }
        let mut bucket = TokenBucket::new(self.rate_per_second, self.burst);
        let result = bucket.try_take(now_ms, tokens);
        self.by_use.insert(use_number, key.clone());
        self.buckets.insert(key, (bucket, use_number));
        result
    }

    /// Forgets `key`'s bucket (for example when its last connection closes
    /// and its bucket is full).
    #[cfg(test)]
    pub fn remove(&mut self, key: &K) {
        if let Some((_, last_use)) = self.buckets.remove(key) {
            self.by_use.remove(&last_use);
        }
    }

    /// Whether `key` has a bucket.
    #[cfg(test)]
    pub fn contains(&self, key: &K) -> bool {
        self.buckets.contains_key(key)
    }

    /// Number of keys tracked.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// The most keys tracked at once.
    #[cfg(test)]
    pub fn keys_max(&self) -> usize {
        self.keys_max
    }
}

/// Payload bytes of a frame the server validates with MLS (`CreateRoom`,
/// `Commit`, `ExternalJoin`, `Proposal`) charged as one more rate-limit
/// token: validation costs grow with the commit (tens of milliseconds at
/// 10,000 members), a Ping's do not.
pub const VALIDATED_BYTES_PER_TOKEN: u32 = 64 * 1024;

/// Most tokens one frame costs (so that every frame fits a bucket's burst).
pub const FRAME_TOKENS_MAX: u32 = 16;

// The cap binds below the payload limit: the largest frames all cost the most.
const _: () = assert!(
    FRAME_TOKENS_MAX as u64 * VALIDATED_BYTES_PER_TOKEN as u64
        <= kalandra_proto::limits::PAYLOAD_BYTES_MAX as u64
);

/// The tokens a frame costs: one, plus one per [`VALIDATED_BYTES_PER_TOKEN`]
/// of an MLS-validated payload, at most [`FRAME_TOKENS_MAX`] and at most
/// `burst` (a frame that costs more than the bucket holds could never pass).
pub fn frame_cost_tokens(opcode: kalandra_proto::Opcode, payload_len: u32, burst: f64) -> f64 {
    use kalandra_proto::Opcode;
    let validated =
        matches!(opcode, Opcode::CreateRoom | Opcode::Commit | Opcode::ExternalJoin | Opcode::Proposal);
    let extra = if validated { payload_len / VALIDATED_BYTES_PER_TOKEN } else { 0 };
    f64::from((1 + extra).min(FRAME_TOKENS_MAX)).min(burst.max(1.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn new_bucket_is_full_and_drains() {
        let mut bucket = TokenBucket::new(10.0, 3.0);
        assert!(bucket.is_full(0));
        for _ in 0..3 {
            assert_eq!(bucket.try_take(0, 1.0), Ok(()));
        }
        // 10 per second: one token every 100 ms.
        assert_eq!(bucket.try_take(0, 1.0), Err(RetryAfterMs(100)));
        assert_eq!(bucket.try_take(99, 1.0), Err(RetryAfterMs(1)));
        assert_eq!(bucket.try_take(100, 1.0), Ok(()));
        assert_eq!(bucket.try_take(100, 2.0), Err(RetryAfterMs(200)));
    }

    #[test]
    fn refused_request_takes_nothing() {
        let mut bucket = TokenBucket::new(1.0, 2.0);
        assert_eq!(bucket.try_take(0, 1.5), Ok(()));
        assert!(bucket.try_take(0, 1.0).is_err());
        assert_eq!(bucket.try_take(0, 0.5), Ok(()));
        assert_eq!(bucket.available(0), 0.0);
    }

    #[test]
    fn oversized_or_never_refilled_requests_never_succeed() {
        let mut bucket = TokenBucket::new(100.0, 2.0);
        assert_eq!(bucket.try_take(0, 3.0), Err(RetryAfterMs(u64::MAX)));
        let mut no_refill = TokenBucket::new(0.0, 1.0);
        assert_eq!(no_refill.try_take(0, 1.0), Ok(()));
        assert_eq!(no_refill.try_take(1_000_000, 1.0), Err(RetryAfterMs(u64::MAX)));
        let mut nan = TokenBucket::new(f64::NAN, f64::NAN);
        assert_eq!(nan.try_take(5, 1.0), Err(RetryAfterMs(u64::MAX)));
        assert_eq!(nan.try_take(5, 0.0), Ok(()));
    }

    #[test]
    fn clock_going_backwards_refills_nothing() {
        let mut bucket = TokenBucket::new(1.0, 1.0);
        assert_eq!(bucket.try_take(10_000, 1.0), Ok(()));
        // Earlier times: no refill, and the wait includes getting back to 10 s.
        assert_eq!(bucket.try_take(5_000, 1.0), Err(RetryAfterMs(6_000)));
        assert_eq!(bucket.try_take(0, 1.0), Err(RetryAfterMs(11_000)));
        // The time between 0 and 10 s is not credited again.
        assert_eq!(bucket.try_take(10_999, 1.0), Err(RetryAfterMs(1)));
        assert_eq!(bucket.try_take(11_000, 1.0), Ok(()));
    }

    #[test]
    fn huge_gaps_saturate_at_full() {
        let mut bucket = TokenBucket::new(1e12, 5.0);
        assert_eq!(bucket.try_take(0, 5.0), Ok(()));
        assert_eq!(bucket.try_take(u64::MAX, 5.0), Ok(()));
        assert!(bucket.try_take(u64::MAX, 1.0).is_err());
        assert!(!bucket.is_full(u64::MAX));
    }

    #[test]
    fn keyed_limiter_keeps_keys_apart() {
        let mut limiter = KeyedLimiter::new(1.0, 1.0, 10);
        assert_eq!(limiter.try_take("a", 0, 1.0), Ok(()));
        assert!(limiter.try_take("a", 0, 1.0).is_err());
        assert_eq!(limiter.try_take("b", 0, 1.0), Ok(()));
        assert_eq!(limiter.len(), 2);
        limiter.remove(&"a");
        assert!(!limiter.contains(&"a"));
        assert_eq!(limiter.try_take("a", 0, 1.0), Ok(()));
    }

    #[test]
    fn keyed_limiter_evicts_least_recently_used() {
        let mut limiter = KeyedLimiter::new(1.0, 1.0, 2);
        assert_eq!(limiter.try_take(1, 0, 1.0), Ok(()));
        assert_eq!(limiter.try_take(2, 0, 1.0), Ok(()));
        // Key 1 is used again (refused), so key 2 is now the least recently used.
        assert!(limiter.try_take(1, 0, 1.0).is_err());
        assert_eq!(limiter.try_take(3, 0, 1.0), Ok(()));
        assert_eq!(limiter.len(), 2);
        assert!(limiter.contains(&1));
        assert!(!limiter.contains(&2));
        assert!(limiter.contains(&3));
        // Key 1 kept its empty bucket.
        assert!(limiter.try_take(1, 0, 1.0).is_err());
    }

    #[test]
    fn keyed_limiter_has_at_least_one_key() {
        let mut limiter = KeyedLimiter::new(1.0, 1.0, 0);
        assert_eq!(limiter.keys_max(), 1);
        assert_eq!(limiter.try_take('x', 0, 1.0), Ok(()));
        assert_eq!(limiter.try_take('y', 0, 1.0), Ok(()));
        assert_eq!(limiter.len(), 1);
    }

    /// Checks that over every window `i..=j` of `granted` (time, tokens) the
    /// grants are within `burst + rate * (t_j - t_i)`, in milli-tokens.
    fn assert_window_bound(granted: &[(u64, u64)], rate_per_second: u64, burst: u64) {
        for i in 0..granted.len() {
            let mut sum_milli: u128 = 0;
            for j in i..granted.len() {
                sum_milli += u128::from(granted[j].1) * 1_000;
                let elapsed_ms = u128::from(granted[j].0 - granted[i].0);
                let bound_milli = u128::from(burst) * 1_000 + u128::from(rate_per_second) * elapsed_ms;
                assert!(
                    sum_milli <= bound_milli,
                    "window {i}..={j}: granted {sum_milli} > {bound_milli} milli-tokens"
                );
            }
        }
    }

    proptest! {
        #[test]
        fn bucket_never_exceeds_burst_plus_rate(
            rate_per_second in 0u64..2_000,
            burst in 0u64..50,
            steps in proptest::collection::vec((0u64..300, 0u64..4, any::<bool>()), 1..200),
        ) {
            let mut bucket = TokenBucket::new(rate_per_second as f64, burst as f64);
            let mut now_ms = 0u64;
            let mut granted = Vec::new();
            for (advance_ms, tokens, greedy) in steps {
                now_ms += advance_ms;
                if bucket.try_take(now_ms, tokens as f64).is_ok() {
                    granted.push((now_ms, tokens));
                }
                if greedy {
                    // Take single tokens until refused: the bucket holds at most `burst`.
                    for _ in 0..=burst {
                        if bucket.try_take(now_ms, 1.0).is_err() {
                            break;
                        }
                        granted.push((now_ms, 1));
                    }
                    prop_assert!(bucket.try_take(now_ms, 1.0).is_err());
                }
            }
            assert_window_bound(&granted, rate_per_second, burst);
        }

        #[test]
        fn retry_after_is_exact(
            rate_per_second in 1u64..2_000,
            burst in 1u64..50,
            steps in proptest::collection::vec((0u64..500, 1u64..4), 1..100),
        ) {
            let mut bucket = TokenBucket::new(rate_per_second as f64, burst as f64);
            let mut now_ms = 0u64;
            for (advance_ms, tokens) in steps {
                now_ms += advance_ms;
                if let Err(RetryAfterMs(wait_ms)) = bucket.try_take(now_ms, tokens as f64) {
                    if tokens > burst {
                        prop_assert_eq!(wait_ms, u64::MAX);
                        continue;
                    }
                    prop_assert!(wait_ms >= 1);
                    let mut early = bucket.clone();
                    prop_assert!(early.try_take(now_ms + wait_ms - 1, tokens as f64).is_err());
                    let mut on_time = bucket.clone();
                    prop_assert!(on_time.try_take(now_ms + wait_ms, tokens as f64).is_ok());
                }
            }
        }

        #[test]
        fn arbitrary_times_never_panic_or_overgrant(
            rate_per_second in 0u64..1_000,
            burst in 0u64..20,
            times in proptest::collection::vec(any::<u64>(), 1..100),
        ) {
            let mut bucket = TokenBucket::new(rate_per_second as f64, burst as f64);
            let mut granted = 0u128;
            let mut high_water_ms = 0u64;
            for now_ms in times {
                high_water_ms = high_water_ms.max(now_ms);
                if bucket.try_take(now_ms, 1.0).is_ok() {
                    granted += 1_000;
                }
                // Only time up to the high-water mark is ever credited.
                let bound = u128::from(burst) * 1_000 + u128::from(rate_per_second) * u128::from(high_water_ms);
                prop_assert!(granted <= bound);
            }
        }

        #[test]
        fn keyed_limiter_stays_bounded_and_limits_each_key(
            keys_max in 1usize..8,
            steps in proptest::collection::vec((0u8..12, 0u64..200), 1..300),
        ) {
            let rate_per_second = 5u64;
            let burst = 2u64;
            let mut limiter = KeyedLimiter::new(rate_per_second as f64, burst as f64, keys_max);
            // Keys below `keys_max` are never evicted when only they are used.
            let mut now_ms = 0u64;
            let mut granted: HashMap<u8, Vec<(u64, u64)>> = HashMap::new();
            let mut everything_fits = true;
            let mut seen = std::collections::HashSet::new();
            for (key, advance_ms) in steps {
                now_ms += advance_ms;
                seen.insert(key);
                everything_fits &= seen.len() <= keys_max;
                if limiter.try_take(key, now_ms, 1.0).is_ok() {
                    granted.entry(key).or_default().push((now_ms, 1));
                }
                prop_assert!(limiter.len() <= keys_max);
                prop_assert_eq!(limiter.by_use.len(), limiter.len());
            }
            if everything_fits {
                for grants in granted.values() {
                    assert_window_bound(grants, rate_per_second, burst);
                }
            }
        }
    }

    #[test]
    fn validated_frames_cost_by_size_and_others_one_token() {
        use kalandra_proto::Opcode;
        assert_eq!(frame_cost_tokens(Opcode::Ping, 8 * 1024 * 1024, 100.0), 1.0);
        assert_eq!(frame_cost_tokens(Opcode::Commit, 1_000, 100.0), 1.0);
        assert_eq!(frame_cost_tokens(Opcode::Commit, 821 * 1024, 100.0), 13.0);
        assert_eq!(
            frame_cost_tokens(Opcode::ExternalJoin, 8 * 1024 * 1024, 100.0),
            f64::from(FRAME_TOKENS_MAX)
        );
        assert_eq!(frame_cost_tokens(Opcode::Commit, 8 * 1024 * 1024, 4.0), 4.0, "never above the burst");
    }
}
