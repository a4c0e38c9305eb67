//! The checks: a bounded exhaustive run by default, deeper runs on demand,
//! and one run per deliberate bug showing that the checker catches it.

use std::time::Instant;

use stateright::actor::ActorModelAction;
use stateright::{Checker, HasDiscoveries, Model};

use super::properties::domain_storages;
use super::{build_model, heal, ModelConfig, Msg, Timer, CLIENT};
use crate::message::Message;
use crate::record::AuthorityRecord;
use crate::room::Mutation;

/// The safety properties; a deliberate bug must break at least one.
const SAFETY: [&str; 7] = [
    "one sequencer per index",
    "one commit per epoch",
    "one authority record per generation",
    "logs agree",
    "acknowledged frames survive",
    "server time never goes backwards",
    "no domain sees a peer fault",
];

/// One handover A → B that the operator may abort and B may decline,
/// crashes at every step (one actor at a time), the client's commit sent
/// through `client_home`, and the heal check from every state.
fn one_handover(client_home: usize) -> ModelConfig {
    ModelConfig {
        client_home,
        client_frames: 1,
        generations_max: 1,
        hand_back: true,
        aborts: true,
        declines: true,
        max_crashes: 1,
        log_entries_max: 4,
        mutation: None,
        sends_before_persist: false,
        check_healing: true,
        retries_armed: false,
    }
}

fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// Runs the checker to the end and asserts every property; prints the figures.
fn check_exhaustively(name: &str, config: ModelConfig) {
    let started = Instant::now();
    let checker = build_model(config.clone()).checker().threads(threads()).spawn_bfs();
    let checker = if std::env::var_os("KALANDRA_MODEL_PROGRESS").is_some() {
        checker.report(&mut stateright::report::WriteReporter::new(&mut std::io::stderr()))
    } else {
        checker.join()
    };
    println!(
        "{name}: {} states ({} unique), depth {}, {:.1} s; {config:?}",
        checker.state_count(),
        checker.unique_state_count(),
        checker.max_depth(),
        started.elapsed().as_secs_f64(),
    );
    checker.assert_properties();
}

#[test]
fn handover_hand_back_and_retry_under_crashes_aborts_and_declines() {
    // No client traffic: the protocol alone, over two generations (A -> B
    // then B -> A, or a second attempt after an abort).
    check_exhaustively(
        "two generations, no traffic",
        ModelConfig { client_frames: 0, generations_max: 2, ..one_handover(0) },
    );
}

#[test]
fn handover_with_a_client_of_the_old_authority() {
    // Declines off to stay within the default run's budget (an abort
    // covers what follows a decline); the deep runs have them.
    check_exhaustively("client at A, no declines", ModelConfig { declines: false, ..one_handover(0) });
}

#[test]
fn handover_with_a_client_behind_the_relay() {
    // Without crashes, aborts and declines to stay within the default run's
    // budget; `deep_client_behind_the_relay` has them all.
    let config = ModelConfig { max_crashes: 0, aborts: false, declines: false, ..one_handover(2) };
    check_exhaustively("client at C, no crashes, aborts or declines", config);
}

#[test]
#[ignore = "deep: about 2 minutes in release; see docs/TESTING.md"]
fn deep_client_behind_the_relay() {
    check_exhaustively("deep, client at C", one_handover(2));
}

#[test]
#[ignore = "deep: see docs/TESTING.md"]
fn deep_client_of_the_new_authority() {
    check_exhaustively("deep, client at B", one_handover(1));
}

#[test]
#[ignore = "deep: see docs/TESTING.md"]
fn deep_hand_back_with_traffic() {
    // Crashes, aborts and declines off: with them the space outgrows memory
    // (a BFS queue holds whole states); two generations with all of them run
    // without traffic in `handover_hand_back_and_retry_under_crashes_aborts_and_declines`.
    let config =
        ModelConfig { generations_max: 2, max_crashes: 0, aborts: false, declines: false, ..one_handover(0) };
    check_exhaustively("deep, hand-back, client at A", config);
}

#[test]
#[ignore = "deep: see docs/TESTING.md"]
fn deep_chain_to_the_third_domain() {
    let config = ModelConfig {
        generations_max: 2,
        hand_back: false,
        max_crashes: 0,
        aborts: false,
        declines: false,
        ..one_handover(0)
    };
    check_exhaustively("deep, chain A -> B -> C, client at A", config);
}

/// Runs the checker until a safety property fails, prints the trace, and
/// returns the names of the failed properties.
fn find_counterexample(config: ModelConfig) -> Vec<&'static str> {
    find_counterexample_to(config, &SAFETY)
}

/// The same, running until one of `wanted` fails.
fn find_counterexample_to(config: ModelConfig, wanted: &[&'static str]) -> Vec<&'static str> {
    let model = build_model(ModelConfig { check_healing: false, ..config });
    let checker = model
        .checker()
        .threads(threads())
        .finish_when(HasDiscoveries::AnyOf(wanted.iter().copied().collect()))
        .spawn_bfs()
        .join();
    let failed: Vec<&'static str> =
        SAFETY.into_iter().filter(|name| checker.discovery(name).is_some()).collect();
    assert!(
        !failed.is_empty(),
        "the checker found no counterexample in {} states",
        checker.unique_state_count()
    );
    let shown = wanted.iter().find(|name| failed.contains(name)).unwrap_or(&failed[0]);
    let path = checker.discovery(shown).expect("listed as failed");
    println!("counterexample to \"{shown}\" after {} states:", checker.unique_state_count());
    let last = path.last_state().clone();
    for action in path.into_actions() {
        println!("  {}", describe(&action));
    }
    for (actor, storage) in domain_storages(&last).into_iter().enumerate() {
        let records: Vec<String> = storage.record.records.iter().map(short_record).collect();
        let log: Vec<String> =
            storage.log.iter().map(|e| format!("{:02x}@{:?}", e.frame.0[0], e.generation)).collect();
        println!(
            "  durable at {}: records [{}], log [{}]",
            ["A", "B", "C"][actor],
            records.join(", "),
            log.join(" ")
        );
    }
    failed
}

#[test]
fn checker_finds_the_abort_after_signing() {
    let config =
        ModelConfig { mutation: Some(Mutation::AbortAfterSigning), max_crashes: 0, ..one_handover(0) };
    let failed = find_counterexample(config);
    assert!(failed.contains(&"one authority record per generation"), "{failed:?}");
}

#[test]
fn checker_finds_the_new_authority_starting_on_its_acceptance() {
    // Its own users are the ones the new authority would sequence early: it
    // acknowledges a frame that is in no log of the authority, which is
    // still the sealed old one and may yet abort.
    let config =
        ModelConfig { mutation: Some(Mutation::StartOnAcceptance), max_crashes: 0, ..one_handover(1) };
    let failed = find_counterexample(config);
    assert!(failed.contains(&"acknowledged frames survive"), "{failed:?}");
}

#[test]
fn checker_finds_sends_before_writes_are_durable() {
    // Without client traffic the only writes are the seal, the acceptance
    // and the decision: losing the decision lets the old authority decide again.
    let config = ModelConfig { sends_before_persist: true, client_frames: 0, ..one_handover(0) };
    let failed = find_counterexample(config);
    assert!(failed.contains(&"one authority record per generation"), "{failed:?}");
}

#[test]
fn checker_finds_an_acknowledgement_sent_before_its_entry_is_durable() {
    let config =
        ModelConfig { sends_before_persist: true, aborts: false, declines: false, ..one_handover(0) };
    let failed = find_counterexample(config);
    assert!(
        failed.contains(&"acknowledged frames survive") || failed.contains(&"one sequencer per index"),
        "{failed:?}"
    );
}

#[test]
fn heal_check_finds_a_lost_message_never_resent() {
    // Without retries, a Prepare lost in a partition is never replaced: the
    // room stays sealed. The heal check must report it.
    let config = ModelConfig {
        mutation: Some(Mutation::NoRetries),
        client_frames: 0,
        max_crashes: 0,
        ..one_handover(0)
    };
    let model = build_model(config);
    let checker = model
        .checker()
        .threads(threads())
        .finish_when(HasDiscoveries::AnyOf(["the room heals"].into_iter().collect()));
    let checker = checker.spawn_bfs().join();
    let path = checker.discovery("the room heals").expect("the heal check fails without retries");
    let last = path.last_state().clone();
    println!("heal fails without retries: {:?}", heal::heal(checker.model(), &last));
    for action in path.into_actions() {
        println!("  {}", describe(&action));
    }
    assert!(heal::heal(checker.model(), &last).is_err());
}

/// A trace line: who did what, with messages in short.
fn describe(action: &ActorModelAction<Msg, Timer, ()>) -> String {
    let name = |id: stateright::actor::Id| ["A", "B", "C", "client"][usize::from(id).min(CLIENT)];
    match action {
        ActorModelAction::Deliver { src, dst, msg } => {
            format!("{} -> {}: {}", name(*src), name(*dst), short(msg))
        }
        ActorModelAction::Timeout(id, timer) => format!("{} timer {timer:?}", name(*id)),
        ActorModelAction::Crash(id) => format!("{} crashes", name(*id)),
        ActorModelAction::Recover(id) => format!("{} restarts from its durable state", name(*id)),
        other => format!("{other:?}"),
    }
}

fn short(msg: &Msg) -> String {
    match msg {
        Msg::Fed(message) => short_federation(message),
        Msg::Submit(frame) => format!("Submit frame {:02x}", frame.0[0]),
        Msg::Ack { frame, index } => format!("Ack frame {:02x} at {index:?}", frame.0[0]),
        Msg::Refused { frame, refusal } => format!("Refused frame {:02x}: {refusal:?}", frame.0[0]),
    }
}

fn short_federation(message: &Message) -> String {
    match message {
        Message::Entry(entry) => format!(
            "Entry {:?} {:?} frame {:02x} t={}",
            entry.index, entry.generation, entry.frame.0[0], entry.timestamp_ms
        ),
        Message::Prepare(body) => format!("Prepare {:?} sealed at {:?}", body.generation, body.sealed_index),
        Message::Accept(acceptance) => format!("Accept {:?}", acceptance.body.generation),
        Message::Decline(body) => format!("Decline {:?}", body.generation),
        Message::Records(records) => {
            let records: Vec<String> = records.iter().map(short_record).collect();
            format!("Records [{}]", records.join(", "))
        }
        other => format!("{other:?}"),
    }
}

fn short_record(record: &AuthorityRecord) -> String {
    let name = |domain| ["A", "B", "C"][super::actor_of(domain)];
    match record {
        AuthorityRecord::Genesis(_) => "genesis A".to_string(),
        AuthorityRecord::Handover(c) => {
            format!(
                "certificate {:?} {} from #{}",
                c.body.generation,
                name(c.body.to),
                c.body.sealed_index.0 + 1
            )
        }
        AuthorityRecord::Resume(r) => {
            format!(
                "resume {:?} {} from #{}",
                r.body.generation,
                name(r.body.from),
                r.body.sealed_index.0 + 1
            )
        }
    }
}
