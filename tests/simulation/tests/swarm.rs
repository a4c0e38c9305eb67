//! Fixed seeds of the full fault plan (up to 50% loss, latency and jitter,
//! partitions, server and client crashes, disk I/O errors and failed syncs)
//! over the full workload (two rooms of overlapping members; messages
//! pipelined and sent out of order; updates, adds, removals, leaves,
//! external joins, kicks, bans and redactions) that every test run replays,
//! and the proof that the runs do something.

use kalandra_harness::world::REPLICA_DOMAINS_DEFAULT;
use kalandra_harness::{run, SimConfig};

/// Seeds run on every test run (debug profile: about 0.4 s each).
const SEEDS: std::ops::Range<u64> = 0..24;

#[test]
fn fixed_seeds_pass_every_checker_under_faults() {
    let mut totals = kalandra_harness::world::RunStats::default();
    let mut server_restarts = 0;
    for seed in SEEDS {
        let outcome = run(&SimConfig { seed, ..SimConfig::default() });
        assert!(
            outcome.passed(),
            "seed {seed} failed: {:#?}\nreplay: cargo run -p kalandra-harness --release -- --seed {seed}",
            outcome.failures
        );
        // The subject ran: frames were sequenced, acknowledged, fanned out
        // and read, and the rooms moved through epochs.
        let stats = &outcome.stats;
        assert!(stats.sequenced > 3 && stats.acknowledged > 3, "seed {seed}: {stats:?}");
        assert!(
            stats.fanned_out > 0 && stats.delivered > 0 && stats.plaintexts > 0,
            "seed {seed}: {stats:?}"
        );
        assert!(stats.epoch >= 1 && stats.log_len >= 4, "seed {seed}: {stats:?}");
        assert!(stats.converged_after_heal_ms.is_some(), "seed {seed}: {stats:?}");
        server_restarts += stats.server_boots - 1;
        totals.client_boots += stats.client_boots - 4;
        totals.partitions += stats.partitions;
        totals.external_joins += stats.external_joins;
        totals.server_proposals += stats.server_proposals;
        totals.redacted += stats.redacted;
        totals.opened_late += stats.opened_late;
        totals.batches_in_flight_max = totals.batches_in_flight_max.max(stats.batches_in_flight_max);
        totals.bad_commits += stats.bad_commits;
        totals.voids += stats.voids;
        for (act, count) in &stats.hostile {
            *totals.hostile.entry(act.clone()).or_default() += count;
        }
        // Each other domain kept every room and checked its heads.
        let replicas = REPLICA_DOMAINS_DEFAULT as u64;
        assert!(stats.replica_log_len >= replicas * stats.log_len, "seed {seed}: {stats:?}");
        totals.replica_boots += stats.replica_boots - u32::try_from(REPLICA_DOMAINS_DEFAULT).unwrap();
        totals.domain_partitions += stats.domain_partitions;
        totals.domain_links += stats.domain_links;
        totals.replica_erased += stats.replica_erased;
        for (outcome, count) in &stats.head_checks {
            *totals.head_checks.entry(outcome.clone()).or_default() += count;
        }
    }
    // Across domains: replicas' servers crashed, domains were partitioned
    // from the authority, links came up again, and signed heads were compared.
    assert!(totals.replica_boots > 0 && totals.domain_partitions > 0, "{totals:?}");
    assert!(totals.domain_links > SEEDS.count() as u64, "{totals:?}");
    assert!(totals.head_checks.get("matched").is_some_and(|n| *n > 0), "{totals:?}");
    // Entries erased after the replica took them were erased there too.
    assert!(totals.replica_erased > 0, "{totals:?}");
    // The hostile client acted: commits members cannot process were
    // sequenced and voided, and the server refused what it can detect.
    assert!(totals.bad_commits > 0 && totals.voids > 0, "{totals:?}");
    for refused in [
        "missing signature: BadSignature",
        "not a member: NotMember",
        "stale epoch: WrongEpoch",
        "wrong Welcome recipients: InvalidCommit",
        "forged application: acknowledged",
    ] {
        assert!(totals.hostile.get(refused).is_some_and(|n| *n > 0), "no {refused:?}: {totals:?}");
    }
    // The faults happened, and so did every kind of work.
    assert!(
        server_restarts > 0 && totals.client_boots > 0 && totals.partitions > 0,
        "{server_restarts} {totals:?}"
    );
    assert!(
        totals.external_joins > 0
            && totals.server_proposals > 0
            && totals.redacted > 0
            && totals.opened_late > 0,
        "{totals:?}"
    );
    assert!(totals.batches_in_flight_max > 1, "several storage batches in flight: {totals:?}");
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

/// Three rooms, five clients: the workload spreads over more overlapping
/// memberships.
#[test]
fn three_rooms_of_five_clients_converge() {
    for seed in 200..203 {
        let config = SimConfig { seed, rooms: 3, clients: 5, ..SimConfig::default() };
        let outcome = run(&config);
        assert!(outcome.passed(), "seed {seed}: {:#?}", outcome.failures);
    }
}

/// Seed 11 found a lost Welcome: a batch whose write failed with an
/// unknown outcome was durable, and its Welcome, stored only after a
/// successful write, never was; the added member could never join.
/// Welcomes are now stored ahead of their batch and delivered once their
/// commit is durable (`docs/TESTING.md`, "Found by the simulation").
#[test]
fn welcomes_stored_ahead_of_a_failed_batch_are_not_lost() {
    let outcome = run(&SimConfig { seed: 11, ..SimConfig::default() });
    assert!(outcome.passed(), "seed 11: {:#?}", outcome.failures);
}

/// Seeds that once failed with three domains (two keeping replicas), kept
/// as regressions: 534, a client restarted during its rejoin read the log
/// with its join's group in place of the one it had dropped (client-core's
/// `RoomLog::restore`);
/// 502, a member stuck on a commit could not rejoin while a removal waited
/// that only it would commit (the room stayed closed; the server now lets
/// a member's rejoin through and issues the removal again).
#[test]
fn seeds_once_failing_with_three_domains_pass() {
    for seed in [502, 534] {
        let outcome = run(&SimConfig { seed, ..SimConfig::default() });
        assert!(outcome.passed(), "seed {seed} failed: {:#?}", outcome.failures);
        assert!(outcome.stats.rejoins >= 1, "seed {seed} rejoined: {:?}", outcome.stats);
    }
}

/// Seeds that once failed with more membership churn (`--membership-share
/// 0.3`), kept as regressions: 68, a leave proposed in an epoch a void
/// undid was refused (expected: proposed again); 327, a timed ban that had
/// ended came back with a server clock stepped back at a restart (bans
/// are judged on the room's time now); 105, a message sealed in an epoch
/// a void undid was sequenced in a new epoch of that number and nobody
/// could open it (the server checks its epoch tag now, and the message is
/// refused, then sealed again).
#[test]
fn seeds_once_failing_under_heavy_churn_pass() {
    for seed in [68, 105, 327] {
        let outcome = run(&SimConfig { seed, membership_share: 0.3, ..SimConfig::default() });
        assert!(outcome.passed(), "seed {seed} failed: {:#?}", outcome.failures);
        if seed == 105 {
            assert_eq!(outcome.stats.voids, 1, "seed 105 voids the hostile commit: {:?}", outcome.stats);
        }
    }
}
