//! The checkers bite: each known bug, injected, is caught, and the same
//! seeds pass without it.

use kalandra_harness::{run, Bugs, SimConfig};

const SEEDS: std::ops::Range<u64> = 0..6;

fn failures_with(bugs: Bugs, config: impl Fn(u64) -> SimConfig) -> Vec<(u64, Vec<String>)> {
    SEEDS
        .map(|seed| {
            let outcome = run(&SimConfig { bugs, ..config(seed) });
            assert!(outcome.stats.sequenced > 0, "seed {seed}: the server ran");
            (seed, outcome.failures)
        })
        .filter(|(_, failures)| !failures.is_empty())
        .collect()
}

fn crashing(seed: u64) -> SimConfig {
    SimConfig { seed, server_crashes_min: 2, disk_latency_max_ms: 20, ..SimConfig::default() }
}

#[test]
fn the_same_seeds_pass_without_bugs() {
    assert!(failures_with(Bugs::default(), crashing).is_empty());
    assert!(failures_with(Bugs::default(), |seed| SimConfig { seed, ..SimConfig::default() }).is_empty());
}

#[test]
fn acknowledging_before_durability_is_caught_as_it_happens() {
    let caught = failures_with(Bugs { ack_before_durable: true, ..Bugs::default() }, crashing);
    // The probe sees the release itself: every seed, crash or not.
    assert_eq!(caught.len(), SEEDS.count(), "{caught:#?}");
    assert!(
        caught.iter().all(|(_, failures)| failures.iter().any(|f| f.contains("released before durable"))),
        "{caught:#?}"
    );
}

#[test]
fn two_commits_for_one_epoch_are_caught() {
    let caught = failures_with(Bugs { double_commit: true, ..Bugs::default() }, |seed| SimConfig {
        seed,
        update_share: 0.5,
        ..SimConfig::default()
    });
    assert!(caught.len() >= 4, "{caught:#?}");
    assert!(caught.iter().flat_map(|(_, f)| f).any(|f| f.contains("does not apply")), "{caught:#?}");
}

#[test]
fn dropping_a_frame_on_restart_is_caught() {
    let caught = failures_with(Bugs { drop_frame_on_restart: true, ..Bugs::default() }, crashing);
    assert!(caught.len() >= 4, "{caught:#?}");
}
