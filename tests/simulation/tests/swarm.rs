//! Fixed seeds of the full fault plan (up to 50% loss, latency and jitter,
//! partitions, server and client crashes, disk I/O errors and failed syncs)
//! that every test run replays, and the proof that the runs do something.

use kalandra_harness::{run, SimConfig};

/// Seeds run on every test run (debug profile: about 0.2 s each).
const SEEDS: std::ops::Range<u64> = 0..24;

#[test]
fn fixed_seeds_pass_every_checker_under_faults() {
    let mut server_restarts = 0;
    let mut client_restarts = 0;
    let mut partitions = 0;
    for seed in SEEDS {
        let outcome = run(&SimConfig { seed, ..SimConfig::default() });
        assert!(
            outcome.passed(),
            "seed {seed} failed: {:#?}\nreplay: cargo run -p kalandra-harness --release -- --seed {seed}",
            outcome.failures
        );
        // The subject ran: frames were sequenced, acknowledged, fanned out
        // and read, and the room moved through epochs.
        let stats = &outcome.stats;
        assert!(stats.sequenced > 3 && stats.acknowledged > 3, "seed {seed}: {stats:?}");
        assert!(
            stats.fanned_out > 0 && stats.delivered > 0 && stats.plaintexts > 0,
            "seed {seed}: {stats:?}"
        );
        assert!(stats.epoch >= 1 && stats.log_len >= 2, "seed {seed}: {stats:?}");
        assert!(stats.converged_after_heal_ms.is_some(), "seed {seed}: {stats:?}");
        server_restarts += stats.server_boots - 1;
        client_restarts += stats.client_boots - 3;
        partitions += stats.partitions;
    }
    // The faults happened.
    assert!(
        server_restarts > 0 && client_restarts > 0 && partitions > 0,
        "{server_restarts} {client_restarts} {partitions}"
    );
}

#[test]
fn crashes_of_the_server_are_survived_on_every_seed() {
    for seed in 100..106 {
        let config = SimConfig { seed, server_crashes_min: 2, partitions: false, ..SimConfig::default() };
        let outcome = run(&config);
        assert!(outcome.passed(), "seed {seed}: {:#?}", outcome.failures);
        assert!(outcome.stats.server_boots >= 2, "seed {seed}: {:?}", outcome.stats);
    }
}
