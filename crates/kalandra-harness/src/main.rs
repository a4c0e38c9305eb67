//! Runs a swarm of simulation seeds, or replays one.
//!
//! `kalandra-harness --seeds 1000` runs seeds 0..1000; `--seed N` replays
//! one. A failing seed prints the command that replays it exactly.

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use kalandra_harness::world::{REPLICA_DOMAINS_DEFAULT, REPLICA_DOMAINS_MAX};
use kalandra_harness::{run, Bugs, SimConfig};

#[derive(Parser, Debug)]
#[command(about = "Deterministic simulation of Kalandra under network and disk faults")]
struct Args {
    /// Run this many seeds, starting at --first-seed.
    #[arg(long, default_value_t = 100)]
    seeds: u64,
    /// First seed of the swarm.
    #[arg(long, default_value_t = 0)]
    first_seed: u64,
    /// Replay exactly this seed (overrides --seeds).
    #[arg(long)]
    seed: Option<u64>,
    /// Clients.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Rooms (odd ones open to external joins).
    #[arg(long, default_value_t = 2)]
    rooms: usize,
    /// Highest per-host loss probability drawn.
    #[arg(long, default_value_t = 0.5)]
    loss_max: f64,
    /// Highest one-way latency drawn (ms).
    #[arg(long, default_value_t = 50)]
    latency_max_ms: u64,
    /// Length of the fault phase (simulated ms).
    #[arg(long, default_value_t = 6_000)]
    fault_phase_ms: u64,
    /// Bound on convergence after healing (simulated ms).
    #[arg(long, default_value_t = 30_000)]
    heal_bound_ms: u64,
    /// No crashes.
    #[arg(long)]
    no_crashes: bool,
    /// No partitions.
    #[arg(long)]
    no_partitions: bool,
    /// No disk faults.
    #[arg(long)]
    no_disk_faults: bool,
    /// Inject: acknowledge before the write is durable.
    #[arg(long)]
    bug_ack_before_durable: bool,
    /// Inject: accept two commits for one epoch.
    #[arg(long)]
    bug_double_commit: bool,
    /// Inject: drop a frame on restart.
    #[arg(long)]
    bug_drop_frame_on_restart: bool,
    /// Inject in the shard: release one entry past each durable batch.
    #[arg(long)]
    bug_release_one_past_durable: bool,
    /// Inject in the sequencer: stamp timestamps that follow the clock back.
    #[arg(long)]
    bug_stamp_without_clock_floor: bool,
    /// Inject in the shard: panic on a resubscription.
    #[arg(long)]
    bug_panic_on_resubscribe: bool,
    /// Inject in client-core's room log: our message read back from the log does not settle it.
    #[arg(long)]
    bug_resend_sequenced_message: bool,
    /// Inject in the shard: never void a commit members reported.
    #[arg(long)]
    bug_never_void: bool,
    /// Hostile clients (taken among those that create no room, last first).
    #[arg(long, default_value_t = 1)]
    hostile: usize,
    /// Inject in the shard: sign a wrong log head for odd indices.
    #[arg(long)]
    bug_wrong_signed_head: bool,
    /// Inject in the sequencer: chain frames as submitted, not as sequenced.
    #[arg(long)]
    bug_chain_unstamped_frames: bool,
    /// Domains besides the authority's, each keeping a replica of every room.
    #[arg(long, default_value_t = REPLICA_DOMAINS_DEFAULT)]
    replica_domains: usize,
    /// No other domain keeping replicas (`--replica-domains 0`).
    #[arg(long)]
    no_replica: bool,
    /// Inject in the second domain's disk: drop each replica's last entry on restart.
    #[arg(long)]
    bug_replica_drops_frame_on_restart: bool,
    /// Inject on the authority's replica feed: alter some application frames.
    #[arg(long)]
    bug_equivocating_authority: bool,
    /// Inject in the second domain: the replica ignores its authority's erasures.
    #[arg(long)]
    bug_replica_ignores_erasures: bool,
    /// Inject in client-core: a self-update's leaf goes without the home certificate.
    #[arg(long)]
    bug_self_update_drops_home_certificate: bool,
    /// Probability per tick that a client takes on new work.
    #[arg(long, default_value_t = 0.05)]
    work_rate: f64,
    /// Share of new work that changes membership (or redacts).
    #[arg(long, default_value_t = 0.08)]
    membership_share: f64,
    /// Print every run's counters.
    #[arg(long)]
    verbose: bool,
}

impl Args {
    fn config(&self, seed: u64) -> SimConfig {
        SimConfig {
            seed,
            clients: self.clients,
            rooms: self.rooms,
            membership_share: self.membership_share,
            loss_max: self.loss_max,
            latency_max_ms: self.latency_max_ms,
            fault_phase_ms: self.fault_phase_ms,
            heal_bound_ms: self.heal_bound_ms,
            crashes: !self.no_crashes,
            partitions: !self.no_partitions,
            disk_faults: !self.no_disk_faults,
            work_rate: self.work_rate,
            hostile: self.hostile,
            replica_domains: self.replicas(),
            bugs: Bugs {
                ack_before_durable: self.bug_ack_before_durable,
                double_commit: self.bug_double_commit,
                drop_frame_on_restart: self.bug_drop_frame_on_restart,
                release_one_past_durable: self.bug_release_one_past_durable,
                stamp_without_clock_floor: self.bug_stamp_without_clock_floor,
                panic_on_resubscribe: self.bug_panic_on_resubscribe,
                resend_sequenced_message: self.bug_resend_sequenced_message,
                never_void: self.bug_never_void,
                wrong_signed_head: self.bug_wrong_signed_head,
                chain_unstamped_frames: self.bug_chain_unstamped_frames,
                replica_drops_frame_on_restart: self.bug_replica_drops_frame_on_restart,
                equivocating_authority: self.bug_equivocating_authority,
                replica_ignores_erasures: self.bug_replica_ignores_erasures,
                self_update_drops_home_certificate: self.bug_self_update_drops_home_certificate,
            },
            ..SimConfig::default()
        }
    }

    /// The domains keeping replicas in each run, as the world builds them.
    fn replicas(&self) -> usize {
        if self.no_replica {
            0
        } else {
            self.replica_domains.min(REPLICA_DOMAINS_MAX)
        }
    }

    /// The command line that replays `seed` with these options.
    fn replay_command(&self, seed: u64) -> String {
        let mut command = format!(
            "cargo run -p kalandra-harness --release -- --seed {seed} --clients {} --rooms {} --loss-max {} --latency-max-ms {} --fault-phase-ms {} --heal-bound-ms {} --work-rate {} --membership-share {} --hostile {} --replica-domains {}",
            self.clients,
            self.rooms,
            self.loss_max,
            self.latency_max_ms,
            self.fault_phase_ms,
            self.heal_bound_ms,
            self.work_rate,
            self.membership_share,
            self.hostile,
            self.replicas()
        );
        for (set, flag) in [
            (self.no_crashes, "--no-crashes"),
            (self.no_partitions, "--no-partitions"),
            (self.no_disk_faults, "--no-disk-faults"),
            (self.no_replica, "--no-replica"),
            (self.bug_replica_drops_frame_on_restart, "--bug-replica-drops-frame-on-restart"),
            (self.bug_equivocating_authority, "--bug-equivocating-authority"),
            (self.bug_replica_ignores_erasures, "--bug-replica-ignores-erasures"),
            (self.bug_self_update_drops_home_certificate, "--bug-self-update-drops-home-certificate"),
            (self.bug_ack_before_durable, "--bug-ack-before-durable"),
            (self.bug_double_commit, "--bug-double-commit"),
            (self.bug_drop_frame_on_restart, "--bug-drop-frame-on-restart"),
            (self.bug_release_one_past_durable, "--bug-release-one-past-durable"),
            (self.bug_stamp_without_clock_floor, "--bug-stamp-without-clock-floor"),
            (self.bug_panic_on_resubscribe, "--bug-panic-on-resubscribe"),
            (self.bug_resend_sequenced_message, "--bug-resend-sequenced-message"),
            (self.bug_never_void, "--bug-never-void"),
            (self.bug_wrong_signed_head, "--bug-wrong-signed-head"),
            (self.bug_chain_unstamped_frames, "--bug-chain-unstamped-frames"),
        ] {
            if set {
                command.push(' ');
                command.push_str(flag);
            }
        }
        command
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let seeds: Vec<u64> = match args.seed {
        Some(seed) => vec![seed],
        None => (args.first_seed..args.first_seed + args.seeds).collect(),
    };
    let started = Instant::now();
    let (mut passed, mut failed) = (0u64, 0u64);
    let mut sequenced = 0u64;
    let mut work = kalandra_harness::world::RunStats::default();
    let mut on_redb = 0u64;
    let (mut server_restarts, mut client_restarts, mut partitions, mut storage_failures, mut disk_faults) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    for &seed in &seeds {
        let run_started = Instant::now();
        let outcome = run(&args.config(seed));
        sequenced += outcome.stats.sequenced;
        work.commits += outcome.stats.commits;
        work.external_joins += outcome.stats.external_joins;
        work.server_proposals += outcome.stats.server_proposals;
        work.redacted += outcome.stats.redacted;
        work.plaintexts += outcome.stats.plaintexts;
        work.opened_late += outcome.stats.opened_late;
        for (kind, count) in &outcome.stats.intents {
            *work.intents.entry(kind.clone()).or_default() += count;
        }
        for (act, count) in &outcome.stats.hostile {
            *work.hostile.entry(act.clone()).or_default() += count;
        }
        work.voids += outcome.stats.voids;
        work.rejoins += outcome.stats.rejoins;
        on_redb += u64::from(outcome.stats.on_redb);
        server_restarts += u64::from(outcome.stats.server_boots.saturating_sub(1));
        client_restarts += u64::from(outcome.stats.client_boots).saturating_sub(args.clients as u64);
        partitions += outcome.stats.partitions;
        storage_failures += outcome.stats.storage_failures;
        disk_faults += outcome.stats.disk_faults;
        work.replica_log_len += outcome.stats.replica_log_len;
        let replicas = args.replicas();
        work.replica_boots +=
            outcome.stats.replica_boots.saturating_sub(u32::try_from(replicas).unwrap_or(u32::MAX));
        work.domain_links += outcome.stats.domain_links;
        work.follows += outcome.stats.follows;
        work.domain_partitions += outcome.stats.domain_partitions;
        work.replica_refusals += outcome.stats.replica_refusals;
        work.replica_holds_erased += outcome.stats.replica_holds_erased;
        work.replica_erased += outcome.stats.replica_erased;
        for (outcome_label, count) in &outcome.stats.head_checks {
            *work.head_checks.entry(outcome_label.clone()).or_default() += count;
        }
        if args.verbose || args.seed.is_some() {
            println!(
                "seed {seed}: {} in {:.2?} (transcript {}), {:?}",
                if outcome.passed() { "passed" } else { "FAILED" },
                run_started.elapsed(),
                hex::encode(&outcome.transcript[..8]),
                outcome.stats
            );
        }
        if outcome.passed() {
            passed += 1;
        } else {
            failed += 1;
            println!("seed {seed} FAILED:");
            for failure in outcome.failures.iter().take(10) {
                println!("  {failure}");
            }
            println!("  replay: {}", args.replay_command(seed));
        }
    }
    let elapsed = started.elapsed();
    println!(
        "{} seeds in {:.1?} ({:.1} ms per seed), {sequenced} frames sequenced, {on_redb} seeds on redb",
        seeds.len(),
        elapsed,
        elapsed.as_secs_f64() * 1000.0 / seeds.len().max(1) as f64
    );
    println!(
        "faults: {server_restarts} server restarts, {client_restarts} client restarts, {partitions} partitions, \
         {disk_faults} disk faults ({storage_failures} storage failures)"
    );
    println!(
        "work: {} commits ({} external joins), {} server proposals, {} entries erased, {} messages read ({} out of order), intents {:?}",
        work.commits,
        work.external_joins,
        work.server_proposals,
        work.redacted,
        work.plaintexts,
        work.opened_late,
        work.intents
    );
    println!("recovery: {} commits voided, {} rejoins after a settled commit", work.voids, work.rejoins);
    println!("hostile acts (act, outcome): {:?}", work.hostile);
    println!(
        "other domains ({} keeping replicas): {} replicated entries, {} replica restarts, {} domain partitions, {} links, {} follows, \
         {} batches refused and followed again, signed heads checked {:?}, {} entries erased after the authority, \
         {} erased entries still held by a replica",
        args.replicas(),
        work.replica_log_len,
        work.replica_boots,
        work.domain_partitions,
        work.domain_links,
        work.follows,
        work.replica_refusals,
        work.head_checks,
        work.replica_erased,
        work.replica_holds_erased
    );
    println!("{passed} passed, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
