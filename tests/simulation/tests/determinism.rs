//! One seed, one history: two runs of a seed write the same frames, derive
//! the same epochs and exporter secrets, and reach the same verdict.

use kalandra_harness::{run, Bugs, SimConfig};

#[test]
fn two_runs_of_a_seed_have_identical_transcripts() {
    for seed in [3, 17] {
        let config = SimConfig { seed, ..SimConfig::default() };
        let first = run(&config);
        let second = run(&config);
        assert!(first.transcript_entries > 50, "seed {seed}: the transcript holds the run");
        assert!(first.stats.sequenced > 0 && first.stats.plaintexts > 0, "{:?}", first.stats);
        assert_eq!(first.transcript, second.transcript, "seed {seed}: transcripts differ");
        assert_eq!(first.transcript_entries, second.transcript_entries);
        assert_eq!(first.failures, second.failures);
        assert_eq!(format!("{:?}", first.stats), format!("{:?}", second.stats));
    }
}

#[test]
fn different_seeds_have_different_transcripts() {
    let one = run(&SimConfig { seed: 5, ..SimConfig::default() });
    let other = run(&SimConfig { seed: 6, ..SimConfig::default() });
    assert_ne!(one.transcript, other.transcript);
}

#[test]
fn a_failing_seed_replays_to_the_same_failure() {
    let bugs = Bugs { ack_before_durable: true, ..Bugs::default() };
    let config = |seed| SimConfig {
        seed,
        bugs,
        server_crashes_min: 2,
        disk_latency_max_ms: 20,
        ..SimConfig::default()
    };
    let (seed, first) = (0..10)
        .map(|seed| (seed, run(&config(seed))))
        .find(|(_, outcome)| !outcome.passed())
        .expect("the injected bug is caught on one of ten seeds");
    let replay = run(&config(seed));
    assert!(!replay.failures.is_empty());
    assert_eq!(first.failures, replay.failures, "seed {seed}");
    assert_eq!(first.transcript, replay.transcript, "seed {seed}");
}
