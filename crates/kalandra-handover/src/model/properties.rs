//! What must hold in every reachable state, and what must be reachable.

use std::collections::BTreeMap;

use stateright::Expectation;

use super::{
    actor_of, heal, DomainStorage, HandoverModel, ModelConfig, ModelState, NodeStorage, COMMIT, DOMAINS, TEXT,
};
use crate::ids::Generation;
use crate::record::AuthorityRecord;

pub(crate) type Condition = fn(&HandoverModel, &ModelState) -> bool;

/// Safety properties (`always`), the healing check, and examples (`sometimes`)
/// that show the model reaches what the safety properties are about.
pub(crate) fn all(config: &ModelConfig) -> Vec<(Expectation, &'static str, Condition)> {
    let mut properties: Vec<(Expectation, &'static str, Condition)> = vec![
        (Expectation::Always, "one sequencer per index", one_sequencer_per_index),
        (Expectation::Always, "one commit per epoch", one_commit_per_epoch),
        (Expectation::Always, "one authority record per generation", one_record_per_generation),
        (Expectation::Always, "logs agree", logs_agree),
        (Expectation::Always, "acknowledged frames survive", acknowledged_frames_survive),
        (Expectation::Always, "server time never goes backwards", timestamps_never_go_backwards),
        (Expectation::Always, "no domain sees a peer fault", no_peer_faults),
        (Expectation::Sometimes, "a handover completes", a_handover_completes),
    ];
    if config.client_frames >= 1 {
        properties.push((
            Expectation::Sometimes,
            "the new authority sequences a frame",
            the_new_authority_sequences,
        ));
    }
    if config.client_frames >= 2 {
        properties.push((
            Expectation::Sometimes,
            "both client frames are acknowledged",
            both_frames_acknowledged,
        ));
    } else if config.client_frames == 1 {
        properties.push((Expectation::Sometimes, "the client's commit is acknowledged", commit_acknowledged));
    }
    if config.aborts {
        properties.push((Expectation::Sometimes, "a handover is aborted", a_handover_is_aborted));
    }
    if config.generations_max >= 2 {
        properties.push((Expectation::Sometimes, "a second handover completes", a_second_handover_completes));
    }
    if config.check_healing {
        properties.push((Expectation::Always, "the room heals", the_room_heals));
    }
    properties
}

/// The durable state of each domain, domain `i` at position `i` (every
/// domain saves its state when it first starts).
pub(crate) fn domain_storages(state: &ModelState) -> Vec<&DomainStorage> {
    state.actor_storages[..DOMAINS]
        .iter()
        .map(|storage| match storage {
            Some(NodeStorage::Domain(storage)) => &**storage,
            _ => panic!("every domain saved its state at start"),
        })
        .collect()
}

/// No two different (generation, frame) pairs were ever sent for one index.
fn one_sequencer_per_index(_: &HandoverModel, state: &ModelState) -> bool {
    let assigned: Vec<_> = state.history.assigned.iter().collect();
    assigned.windows(2).all(|pair| pair[0].0 != pair[1].0)
}

/// The one commit of the model (epoch 0) was accepted at one index at most.
fn one_commit_per_epoch(_: &HandoverModel, state: &ModelState) -> bool {
    let mut indices: Vec<_> = state.history.assigned.iter().filter(|a| a.2 == COMMIT).map(|a| a.0).collect();
    indices.dedup();
    indices.len() <= 1
}

/// No two domains hold different records for one generation: a handover
/// was completed or aborted, never both.
fn one_record_per_generation(_: &HandoverModel, state: &ModelState) -> bool {
    let mut seen: BTreeMap<Generation, &AuthorityRecord> = BTreeMap::new();
    for storage in domain_storages(state) {
        for record in &storage.record.records {
            if *seen.entry(record.generation()).or_insert(record) != record {
                return false;
            }
        }
    }
    true
}

/// Every two durable logs agree wherever both have an entry.
fn logs_agree(_: &HandoverModel, state: &ModelState) -> bool {
    let storages = domain_storages(state);
    storages.iter().all(|a| storages.iter().all(|b| a.log.iter().zip(&b.log).all(|(x, y)| x == y)))
}

/// Every frame acknowledged to the client is at its index in every durable
/// log that reaches it, and in the log of the newest authority once that
/// authority has installed its record.
fn acknowledged_frames_survive(_: &HandoverModel, state: &ModelState) -> bool {
    let storages = domain_storages(state);
    let newest =
        storages.iter().filter_map(|storage| storage.record.records.last()).max_by_key(|r| r.generation());
    let installed = newest.and_then(|record| {
        let authority = storages[actor_of(record.authority())];
        (authority.record.records.last() == Some(record)).then_some(authority)
    });
    state.history.acked.iter().all(|&(index, frame)| {
        let at = |storage: &DomainStorage| {
            storage.log.get(usize::try_from(index.0).expect("model logs are short")).map(|entry| entry.frame)
        };
        let agreed = storages.iter().all(|storage| at(storage).is_none_or(|found| found == frame));
        agreed && installed.is_none_or(|storage| at(storage) == Some(frame))
    })
}

fn timestamps_never_go_backwards(_: &HandoverModel, state: &ModelState) -> bool {
    domain_storages(state)
        .iter()
        .all(|storage| storage.log.windows(2).all(|w| w[0].timestamp_ms <= w[1].timestamp_ms))
}

fn no_peer_faults(_: &HandoverModel, state: &ModelState) -> bool {
    domain_storages(state).iter().all(|storage| storage.faults == 0)
}

fn the_room_heals(model: &HandoverModel, state: &ModelState) -> bool {
    heal::heal(model, state).is_ok()
}

fn a_handover_completes(_: &HandoverModel, state: &ModelState) -> bool {
    domain_storages(state)
        .iter()
        .any(|s| s.record.records.iter().any(|r| matches!(r, AuthorityRecord::Handover(_))))
}

fn a_handover_is_aborted(_: &HandoverModel, state: &ModelState) -> bool {
    domain_storages(state)
        .iter()
        .any(|s| s.record.records.iter().any(|r| matches!(r, AuthorityRecord::Resume(_))))
}

fn a_second_handover_completes(_: &HandoverModel, state: &ModelState) -> bool {
    domain_storages(state)
        .iter()
        .any(|s| s.record.records.iter().filter(|r| matches!(r, AuthorityRecord::Handover(_))).count() >= 2)
}

fn the_new_authority_sequences(_: &HandoverModel, state: &ModelState) -> bool {
    state.history.assigned.iter().any(|assigned| assigned.1 >= Generation(1))
}

fn both_frames_acknowledged(_: &HandoverModel, state: &ModelState) -> bool {
    let acked = |frame| state.history.acked.iter().any(|a| a.1 == frame);
    acked(COMMIT) && acked(TEXT)
}

fn commit_acknowledged(_: &HandoverModel, state: &ModelState) -> bool {
    state.history.acked.iter().any(|a| a.1 == COMMIT)
}
