//! The checkers bite: each known bug, planted at a seam of the production
//! code, is caught, and the same seeds pass without it.

use kalandra_harness::{run, Bugs, SimConfig};

const SEEDS: std::ops::Range<u64> = 0..6;

fn failures_with(
    bugs: Bugs,
    seeds: std::ops::Range<u64>,
    config: impl Fn(u64) -> SimConfig,
) -> Vec<(u64, Vec<String>)> {
    seeds
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

fn plain(seed: u64) -> SimConfig {
    SimConfig { seed, ..SimConfig::default() }
}

/// A busier workload: frames of a room arrive while its previous batch is
/// being written (seed 0 found a kick and the member's own leave of one
/// leaf wedging a room; `docs/TESTING.md`, "Found by the simulation").
fn busy(seed: u64) -> SimConfig {
    SimConfig { seed, work_rate: 0.2, ..SimConfig::default() }
}

#[test]
fn the_same_seeds_pass_without_bugs() {
    assert!(failures_with(Bugs::default(), SEEDS, crashing).is_empty());
    assert!(failures_with(Bugs::default(), SEEDS, plain).is_empty());
    assert!(failures_with(Bugs::default(), 0..20, busy).is_empty());
}

/// Checker (a) at a seam of the real shard: a batch acknowledged and
/// fanned out as it is handed to storage is seen as it is queued.
#[test]
fn acknowledging_before_durability_is_caught_as_it_happens() {
    let caught = failures_with(Bugs { ack_before_durable: true, ..Bugs::default() }, SEEDS, crashing);
    // The probe sees the release itself: every seed, crash or not.
    assert_eq!(caught.len(), SEEDS.count(), "{caught:#?}");
    assert!(
        caught.iter().all(|(_, failures)| failures.iter().any(|f| f.contains("released before durable"))),
        "{caught:#?}"
    );
}

/// Checker (a) at a seam of the real shard: one entry past each durable
/// batch released early is seen as it is queued, crash or not, whenever a
/// frame of the room is sequenced while the batch before it is written.
#[test]
fn releasing_one_entry_past_the_durable_point_is_caught_on_nearly_every_seed() {
    let seeds = 0..20;
    let caught =
        failures_with(Bugs { release_one_past_durable: true, ..Bugs::default() }, seeds.clone(), busy);
    assert!(caught.len() * 10 >= seeds.count() * 9, "on at least 90% of seeds: {}", caught.len());
    assert!(
        caught.iter().all(|(_, failures)| failures.iter().any(|f| f.contains("released before durable"))),
        "{caught:#?}"
    );
}

/// A sequencer that sequences a commit of the previous epoch forks the
/// room: client-core's room log refuses it, and recovery cannot replay it.
#[test]
fn two_commits_for_one_epoch_are_caught() {
    let caught = failures_with(Bugs { double_commit: true, ..Bugs::default() }, SEEDS, |seed| SimConfig {
        seed,
        update_share: 0.5,
        ..SimConfig::default()
    });
    assert!(caught.len() >= 4, "{caught:#?}");
    assert!(
        caught.iter().flat_map(|(_, f)| f).any(|f| f.contains("two commits for one epoch")),
        "{caught:#?}"
    );
}

#[test]
fn dropping_a_frame_on_restart_is_caught() {
    let caught = failures_with(Bugs { drop_frame_on_restart: true, ..Bugs::default() }, SEEDS, crashing);
    assert!(caught.len() >= 4, "{caught:#?}");
}

/// Checker (c) at a seam of the real sequencer: with the clock stepped back
/// at restarts, a sequencer that follows the clock stamps a time earlier
/// than one it stamped before.
#[test]
fn timestamps_that_follow_the_clock_back_are_caught() {
    let caught = failures_with(Bugs { stamp_without_clock_floor: true, ..Bugs::default() }, SEEDS, crashing);
    assert!(caught.len() * 20 >= SEEDS.count(), "on at least 5% of seeds: {caught:#?}");
    assert!(caught.iter().flat_map(|(_, f)| f).any(|f| f.contains("stamped")), "{caught:#?}");
}

/// Checker (d): a panic inside a task of the real shard, which tokio
/// catches and nothing else would notice, fails the seed.
#[test]
fn a_panic_in_any_task_fails_the_seed() {
    let caught = failures_with(Bugs { panic_on_resubscribe: true, ..Bugs::default() }, SEEDS, crashing);
    assert!(caught.len() * 20 >= SEEDS.count(), "on at least 5% of seeds: {caught:#?}");
    assert!(
        caught.iter().all(|(_, failures)| failures.iter().any(|f| f.contains("a task panicked"))),
        "{caught:#?}"
    );
}

/// Checker (b) at a seam of client-core's room log: a message whose
/// acknowledgement was lost is not settled when the log shows it
/// sequenced, so it is sent again and lands twice.
#[test]
fn a_message_resent_after_the_log_showed_it_is_caught() {
    let seeds = 0..20;
    let caught =
        failures_with(Bugs { resend_sequenced_message: true, ..Bugs::default() }, seeds.clone(), plain);
    assert!(caught.len() * 20 >= seeds.count(), "on at least 5% of seeds: {caught:#?}");
    assert!(
        caught.iter().all(|(_, failures)| failures.iter().any(|f| f.contains("appears 2 times")
            || f.contains("read message")
            || f.contains("different messages"))),
        "{caught:#?}"
    );
}

/// The recovery checker at a seam of the real shard: a commit the room's
/// admin reported (the admin's report alone meets the rule) is counted and
/// never voided; the seed fails although the stuck members heal by
/// rejoining once the commit settles.
#[test]
fn a_server_that_never_voids_a_bad_commit_is_caught() {
    let caught = failures_with(Bugs { never_void: true, ..Bugs::default() }, SEEDS, plain);
    assert!(caught.len() >= 2, "seeds caught: {caught:#?}");
    assert!(
        caught.iter().all(|(_, failures)| failures.iter().any(|f| f.contains("never voided the commit"))),
        "{caught:#?}"
    );
}

/// A server that signs a head its log does not have is caught by
/// client-core's own check: the signed head does not match the frames the
/// member applied (or contradicts another signed head for the index).
#[test]
fn a_wrongly_signed_log_head_is_caught_by_the_members_check() {
    let caught = failures_with(Bugs { wrong_signed_head: true, ..Bugs::default() }, SEEDS, plain);
    assert_eq!(caught.len(), SEEDS.count(), "{caught:#?}");
    assert!(
        caught.iter().all(|(_, failures)| failures.iter().any(|f| f.contains("log head"))),
        "{caught:#?}"
    );
}

/// A sequencer whose chain hashes frames before stamping them states heads
/// no member computes: every member's check of the signed heads refuses
/// them.
#[test]
fn a_chain_over_unstamped_frames_is_caught() {
    let caught = failures_with(Bugs { chain_unstamped_frames: true, ..Bugs::default() }, SEEDS, plain);
    assert_eq!(caught.len(), SEEDS.count(), "{caught:#?}");
    assert!(
        caught.iter().all(|(_, failures)| failures.iter().any(|f| f.contains("log head"))),
        "{caught:#?}"
    );
}

/// Checker (b) across domains: a second domain whose disk loses each
/// replica's last entry at a restart holds less of a room than it held
/// durably before; the world sees it as the replica's server comes back.
#[test]
fn a_replica_that_loses_durable_entries_at_restart_is_caught() {
    let caught =
        failures_with(Bugs { replica_drops_frame_on_restart: true, ..Bugs::default() }, SEEDS, |seed| {
            SimConfig { seed, replica_crashes_min: 2, ..SimConfig::default() }
        });
    assert_eq!(caught.len(), SEEDS.count(), "{caught:#?}");
    assert!(
        caught.iter().all(|(_, failures)| failures.iter().any(|f| f.contains("lost durable entries"))),
        "{caught:#?}"
    );
}

/// The order checker across domains, and the replica's own head check: an
/// authority whose feed shows the other domain altered frames leaves a
/// replica that is not its log, and the head it signs does not match the
/// frames it sent.
#[test]
fn an_authority_that_shows_the_other_domain_another_log_is_caught() {
    let caught = failures_with(Bugs { equivocating_authority: true, ..Bugs::default() }, SEEDS, plain);
    assert_eq!(caught.len(), SEEDS.count(), "{caught:#?}");
    assert!(
        caught.iter().all(|(_, failures)| failures
            .iter()
            .any(|f| f.contains("holds another frame than the authority"))),
        "{caught:#?}"
    );
    assert!(
        caught.iter().flat_map(|(_, f)| f).any(|f| f.contains("caught its authority equivocating")),
        "{caught:#?}"
    );
}

/// The replica checker against erasure: a replica that ignores its
/// authority's erasure notices and journal still holds, after healing,
/// entries the authority erased (seeds where an entry was erased after the
/// replica took it; about two in three at this work rate).
#[test]
fn a_replica_that_keeps_what_its_authority_erased_is_caught() {
    let caught = failures_with(Bugs { replica_ignores_erasures: true, ..Bugs::default() }, 0..20, busy);
    assert!(caught.len() >= 5, "{caught:#?}");
    assert!(
        caught.iter().all(|(_, failures)| failures.iter().any(|f| f.contains("erased at the authority"))),
        "{caught:#?}"
    );
}

/// The members' home check: a client-core whose self-update makes its
/// fresh leaf without the device's home certificate leaves members that
/// every other member finds uncertified, however the server orders it.
#[test]
fn a_self_update_that_drops_the_home_certificate_is_caught_by_the_members_check() {
    let caught =
        failures_with(Bugs { self_update_drops_home_certificate: true, ..Bugs::default() }, SEEDS, plain);
    assert_eq!(caught.len(), SEEDS.count(), "{caught:#?}");
    assert!(
        caught.iter().all(|(_, failures)| failures.iter().any(|f| f.contains("home is Uncertified"))),
        "{caught:#?}"
    );
}
