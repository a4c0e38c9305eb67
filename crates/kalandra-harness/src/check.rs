//! The checkers run after every simulation (one of them, early release,
//! as frames are queued).
//!
//! (a) Nothing is released before it is durable: no acknowledgement,
//!     fan-out or Welcome reaches a connection's queue for an index the
//!     disk does not hold yet (checked as each frame is queued).
//! (b) Every message and intent lands exactly once, end to end: every
//!     message a client wrote (its plaintext is its id, `c{client}-m{n}`)
//!     and did not give up appears at exactly one index of its room's log;
//!     every member that read that index read the same plaintext from the
//!     same sender (or the placeholder of its erasure); nothing appears that
//!     no client wrote; a second copy of one sealing is only ever refused as
//!     a replay; every commit in a log was made by a client for an intent,
//!     and no intent took effect twice.
//! (c) Server timestamps never decrease within a room's log.
//! (d) No task panicked (recorded by the world).
//! - Every room has one total order: each client's delivered entries are,
//!   membership by membership, contiguous runs of the server's durable log
//!   (same index, same bytes, or the frame an erased entry held).
//! - Nothing acknowledged is lost: every acknowledged frame is in the
//!   durable log at its index, byte for byte, across server restarts.
//! - Convergence (checked by the world): every member at the server's
//!   epoch, tree hash and head, nobody else holding a room's group.
//! - Members agree on the log's hash chain: every two clients that reached
//!   a room's index hold the same head there, and no client found a head
//!   signed by the server that its frames do not produce.
//! - No client saw a broken rule (gaps, duplicates, commits that do not
//!   apply, messages that do not decrypt, illegal state transitions).
//! - Hostile clients: nothing the server must refuse is in a log (beyond
//!   a replay's original); every void names a commit a hostile client
//!   damaged (a false report never voids a valid commit); a commit whose
//!   report by the room's admin was counted — the admin alone meets the
//!   rule — is voided in the log; the hostile client's refusals are of the
//!   kinds each act expects (checked as they arrive).
//! - Honest members keep exchanging messages: after convergence each
//!   writes one message per room, and every other honest member of the
//!   room reads it.
//! - The run did something: frames were sequenced, acknowledged and
//!   delivered.
//! - Across domains ([`check_replica`], for each other domain): each
//!   room's replica is the authority's durable log, frame for frame (same
//!   SHA-256 as appended at every index, or, for an entry erased before
//!   the replica read it, its placeholder; same length); the replica never
//!   found a signed head of the authority its frames do not produce; the
//!   authority never refused or mangled its feed; and (checked by the
//!   world as it runs) the replica never holds less of a room than it held
//!   durably before, across its crashes.

use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use kalandra_proto::{Frame, Opcode, RoomId, SenderId};

use crate::client::{Behaviour, Cast, ClientShared, RoomTrace, Seen};
use crate::disk::DurableEntry;
use crate::ledger::{digest, Ledger};
use crate::server::ServerShared;

/// Findings reported per kind, at most.
const FINDINGS_PER_KIND_MAX: usize = 5;

/// The checkers' findings; empty when the run is correct.
pub fn check(server: &ServerShared, cast: &Cast, clients: &[Rc<ClientShared>]) -> Vec<String> {
    let mut failures = Vec::new();
    let stats = *server.stats.borrow();
    let logs: BTreeMap<RoomId, Vec<DurableEntry>> =
        cast.rooms.iter().map(|plan| (plan.room_id, server.disk.log(plan.room_id))).collect();
    let entries: usize = logs.values().map(Vec::len).sum();
    let delivered: usize = clients
        .iter()
        .map(|c| c.record.borrow().rooms.values().map(|t| t.delivered.len()).sum::<usize>())
        .sum();
    if stats.sequenced == 0 || stats.acknowledged == 0 || entries == 0 || delivered == 0 {
        failures.push(format!(
            "nothing ran: {} sequenced, {} acknowledged, logs of {entries}",
            stats.sequenced, stats.acknowledged
        ));
    }
    failures.extend(check_timestamps(&logs));
    let early = server.early_releases.borrow();
    if let Some(first) = early.first() {
        failures.push(format!(
            "released before durable: {} of room {} index {} while the disk held {} entries ({} such releases)",
            first.what,
            first.room_id,
            first.log_index,
            first.durable_next,
            early.len()
        ));
    }
    for client in clients {
        let record = client.record.borrow();
        failures.extend(record.violations.iter().take(FINDINGS_PER_KIND_MAX).cloned());
        for (room_id, trace) in &record.rooms {
            let log = logs.get(room_id).map_or(&[][..], Vec::as_slice);
            failures.extend(check_order(client.index, *room_id, trace, log));
        }
    }
    let ledger = cast.ledger.borrow();
    let senders = cast.senders.borrow();
    for (room_id, log) in &logs {
        failures.extend(check_messages(*room_id, log, &ledger, &senders, clients));
    }
    failures.extend(check_written(&ledger, clients));
    let traces: Vec<(usize, std::cell::Ref<'_, crate::client::ClientRecord>)> =
        clients.iter().map(|client| (client.index, client.record.borrow())).collect();
    failures.extend(check_heads_agree(traces.iter().flat_map(|(client, record)| {
        record.rooms.iter().map(move |(room_id, trace)| (*client, *room_id, trace))
    })));
    failures.extend(check_intents(&logs, &ledger));
    failures.extend(check_voids(&logs, &ledger));
    failures.extend(check_refused(&logs, &ledger));
    failures.extend(check_probes(&ledger, clients));
    failures.extend(check_member_homes(server, clients));
    failures
}

/// Every member a client sees in a room is certified by the server's
/// domain, as the client checks it from the home certificate in the leaf
/// (every simulated client connects to that server, which certifies it).
pub fn check_member_homes(server: &ServerShared, clients: &[Rc<ClientShared>]) -> Vec<String> {
    let keys = server.own_keys();
    let now_ms = server.now_ms();
    let mut failures = Vec::new();
    for client in clients {
        let record = client.record.borrow();
        for (room_id, status) in &record.status {
            for (identity, leaf) in &status.home_certificates {
                let check = leaf.clone().check(|domain| (domain == keys.domain()).then_some(&keys), now_ms);
                if !matches!(&check, kalandra_proto::home::HomeCheck::Certified { domain, .. } if domain == keys.domain())
                {
                    let member = <[u8; 32]>::try_from(identity.as_slice())
                        .map_or_else(|_| "?".to_owned(), |key| SenderId::from_identity_key(&key).to_string());
                    failures.push(format!(
                        "client {} in room {room_id}: member {member}'s home is {check:?}",
                        client.index
                    ));
                }
            }
        }
    }
    failures.truncate(FINDINGS_PER_KIND_MAX);
    failures
}

/// Each `CommitVoided` of a log: (the voided commit's index, the void's).
fn voids_of(log: &[DurableEntry]) -> Vec<(u64, u64)> {
    log.iter()
        .filter_map(|entry| {
            let frame = Frame::decode(&entry.bytes).ok()?;
            let void = frame.decode_payload::<kalandra_proto::payload::CommitVoided>().ok()?;
            (frame.opcode() == Opcode::CommitVoided).then_some((void.log_index, entry.log_index))
        })
        .collect()
}

/// The MLS commit of a log entry, if it is a commit or external join.
fn commit_of(entry: &DurableEntry) -> Option<Result<Vec<u8>, String>> {
    let frame = Frame::decode(&entry.bytes).ok()?;
    let commit = match frame.opcode() {
        Opcode::Commit => frame.decode_payload::<kalandra_proto::payload::Commit>().map(|c| c.commit),
        Opcode::ExternalJoin => {
            frame.decode_payload::<kalandra_proto::payload::ExternalJoin>().map(|c| c.commit)
        }
        _ => return None,
    };
    Some(commit.map_err(|error| error.to_string()))
}

/// Every void names a commit a hostile client damaged; every commit the
/// room's admin reported and the server counted without voiding at once
/// is voided in the log.
fn check_voids(logs: &BTreeMap<RoomId, Vec<DurableEntry>>, ledger: &Ledger) -> Vec<String> {
    let mut failures = Vec::new();
    for (room_id, log) in logs {
        let voids = voids_of(log);
        for (voided, void_index) in &voids {
            let entry = usize::try_from(*voided).ok().and_then(|i| log.get(i));
            let bad = entry
                .and_then(commit_of)
                .and_then(Result::ok)
                .is_some_and(|c| ledger.bad_commits.contains(&digest(&c)));
            if !bad {
                failures.push(format!(
                    "room {room_id}: the CommitVoided at {void_index} voids the commit at {voided}, which members could process"
                ));
            }
        }
        for (_, reported) in ledger.admin_reports_unvoided.iter().filter(|(room, _)| room == room_id) {
            if !voids.iter().any(|(voided, _)| voided == reported) {
                failures.push(format!(
                    "room {room_id}: the admin reported the commit at {reported}, the server counted the report \
                     (the rule is met) and never voided the commit"
                ));
            }
        }
    }
    failures.truncate(FINDINGS_PER_KIND_MAX);
    failures
}

/// Nothing a hostile client sent that the server must refuse holds a log
/// index (a replay's original holds one).
fn check_refused(logs: &BTreeMap<RoomId, Vec<DurableEntry>>, ledger: &Ledger) -> Vec<String> {
    let mut copies: BTreeMap<[u8; 32], usize> = BTreeMap::new();
    for entry in logs.values().flatten() {
        if let Ok(frame) = Frame::decode(&entry.bytes) {
            *copies.entry(digest(frame.payload())).or_default() += 1;
        }
    }
    let mut failures: Vec<String> = ledger
        .refused_payloads
        .iter()
        .filter_map(|(payload, allowed)| {
            let found = copies.get(payload).copied().unwrap_or(0);
            (found > *allowed).then(|| {
                format!("a hostile frame the server must refuse was sequenced ({found} copies, {allowed} allowed)")
            })
        })
        .collect();
    failures.truncate(FINDINGS_PER_KIND_MAX);
    failures
}

/// Every message written after convergence was read by every other
/// honest member of its room (a member at the end).
pub fn check_probes(ledger: &Ledger, clients: &[Rc<ClientShared>]) -> Vec<String> {
    let mut failures = Vec::new();
    for (room_id, id) in &ledger.probes {
        // A writer removed before its message was sequenced gave it up.
        if ledger.messages.get(id).is_some_and(|written| written.abandoned) {
            continue;
        }
        let writer = ledger.messages.get(id).map(|written| written.client);
        for client in clients.iter().filter(|c| c.behaviour == Behaviour::Honest && Some(c.index) != writer) {
            let record = client.record.borrow();
            if !record.status.get(room_id).is_some_and(|status| status.member) {
                continue;
            }
            let read = record.rooms.get(room_id).is_some_and(|trace| {
                trace.entries.iter().any(|(_, _, seen)| matches!(seen, Seen::Text(text) if text == id))
            });
            if !read {
                failures.push(format!(
                    "room {room_id}: honest member {} did not read {id}, written after convergence",
                    client.index
                ));
            }
        }
    }
    failures.truncate(FINDINGS_PER_KIND_MAX);
    failures
}

/// Every two clients that reached an index of a room hold the same head
/// there: the server showed them the same log up to it.
pub fn check_heads_agree<'a>(
    traces: impl IntoIterator<Item = (usize, RoomId, &'a RoomTrace)>,
) -> Vec<String> {
    let mut first_seen: BTreeMap<(RoomId, u64), ([u8; 32], usize)> = BTreeMap::new();
    let mut failures = Vec::new();
    for (client, room_id, trace) in traces {
        for (index, head) in &trace.heads {
            let (seen, by) = *first_seen.entry((room_id, *index)).or_insert((*head, client));
            if seen != *head && failures.len() < FINDINGS_PER_KIND_MAX {
                failures.push(format!(
                    "room {room_id}: clients {by} and {client} hold different log heads at index {index}"
                ));
            }
        }
    }
    failures
}

/// Each client's delivered entries, membership by membership, are
/// contiguous runs of the durable log; what was acknowledged is in it.
fn check_order(client: usize, room_id: RoomId, trace: &RoomTrace, log: &[DurableEntry]) -> Vec<String> {
    let mut failures = Vec::new();
    let matches = |index: u64, frame_digest: &[u8; 32]| {
        let entry = usize::try_from(index).ok().and_then(|i| log.get(i));
        entry.map(|entry| {
            digest(&entry.bytes) == *frame_digest || entry.appended_digest == Some(*frame_digest)
        })
    };
    let mut stint_starts: BTreeSet<usize> = trace.stints.iter().copied().collect();
    stint_starts.insert(0);
    for (position, pair) in trace.delivered.windows(2).enumerate() {
        let (previous, next) = (pair[0].0, pair[1].0);
        let new_stint = stint_starts.contains(&(position + 1));
        if (!new_stint && next != previous + 1) || (new_stint && next <= previous) {
            failures.push(format!("client {client} room {room_id}: delivered {next} after {previous}"));
            break;
        }
    }
    for (index, frame_digest) in &trace.delivered {
        match matches(*index, frame_digest) {
            Some(true) => {}
            Some(false) => {
                failures.push(format!(
                    "client {client} room {room_id}: delivered a frame at {index} that the log holds differently"
                ));
                break;
            }
            None => {
                failures.push(format!(
                    "client {client} room {room_id}: delivered index {index} beyond the durable log ({})",
                    log.len()
                ));
                break;
            }
        }
    }
    for (index, frame_digest) in &trace.acknowledged {
        if matches(*index, frame_digest) != Some(true) {
            failures.push(format!(
                "client {client} room {room_id}: acknowledged frame at {index} lost from the durable log"
            ));
            break;
        }
    }
    failures
}

/// Checker (b) over one room: at every index, every reader read the same
/// message from its writer; a message appears at one index at most;
/// placeholders only where the log erased the entry.
fn check_messages(
    room_id: RoomId,
    log: &[DurableEntry],
    ledger: &Ledger,
    senders: &[SenderId],
    clients: &[Rc<ClientShared>],
) -> Vec<String> {
    let mut failures = Vec::new();
    let mut at_index: BTreeMap<u64, BTreeMap<String, Vec<usize>>> = BTreeMap::new();
    let mut indices_of: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    for client in clients {
        let record = client.record.borrow();
        let Some(trace) = record.rooms.get(&room_id) else { continue };
        let mut seen_here: BTreeMap<&str, u64> = BTreeMap::new();
        for (index, sender, seen) in &trace.entries {
            let id = match seen {
                Seen::Text(id) | Seen::Own(id) => id,
                Seen::Redacted => {
                    let erased =
                        usize::try_from(*index).ok().and_then(|i| log.get(i)).is_some_and(|e| e.erased);
                    if !erased {
                        failures.push(format!(
                            "room {room_id}: client {} read index {index} as erased; the log holds it",
                            client.index
                        ));
                    }
                    continue;
                }
                Seen::Replay => continue,
            };
            if let Some(first) = seen_here.insert(id, *index) {
                failures.push(format!(
                    "room {room_id}: client {} read message {id} twice, at {first} and {index}",
                    client.index
                ));
            }
            match ledger.messages.get(id) {
                Some(written) if written.room == room_id && senders.get(written.client) == Some(sender) => {}
                _ => failures.push(format!(
                    "room {room_id}: client {} read {id:?} at {index} from {sender}, which no client wrote there",
                    client.index
                )),
            }
            at_index.entry(*index).or_default().entry(id.clone()).or_default().push(client.index);
            indices_of.entry(id.clone()).or_default().insert(*index);
        }
    }
    for (index, ids) in &at_index {
        if ids.len() > 1 {
            failures
                .push(format!("room {room_id}: members read different messages at index {index}: {ids:?}"));
        }
    }
    for (id, indices) in &indices_of {
        if indices.len() > 1 {
            failures.push(format!(
                "room {room_id}: message {id} appears {} times, at {indices:?}",
                indices.len()
            ));
        }
    }
    failures.truncate(FINDINGS_PER_KIND_MAX);
    failures
}

/// Every message a client wrote and did not give up was sequenced: its
/// writer holds it at one index.
fn check_written(ledger: &Ledger, clients: &[Rc<ClientShared>]) -> Vec<String> {
    let mut landed: BTreeMap<&str, usize> = BTreeMap::new();
    let records: Vec<_> = clients.iter().map(|c| c.record.borrow()).collect();
    for record in &records {
        for trace in record.rooms.values() {
            for (_, _, seen) in &trace.entries {
                if let Seen::Own(id) = seen {
                    *landed.entry(id.as_str()).or_default() += 1;
                }
            }
        }
    }
    let mut failures: Vec<String> = ledger
        .messages
        .iter()
        .filter(|(id, written)| !written.abandoned && landed.get(id.as_str()).copied().unwrap_or(0) == 0)
        .map(|(id, written)| {
            format!("message {id} of client {} never landed in room {}", written.client, written.room)
        })
        .collect();
    failures.extend(
        landed
            .iter()
            .filter(|(_, count)| **count > 1)
            .map(|(id, count)| format!("message {id} settled {count} times at its writer")),
    );
    failures.truncate(FINDINGS_PER_KIND_MAX);
    failures
}

/// Every commit in a log is one a client made for an intent; no intent
/// took effect twice.
fn check_intents(logs: &BTreeMap<RoomId, Vec<DurableEntry>>, ledger: &Ledger) -> Vec<String> {
    let mut failures = Vec::new();
    let mut applied: BTreeMap<&str, Vec<(RoomId, u64)>> = BTreeMap::new();
    for (room_id, log) in logs {
        // A voided commit and everything up to its void never took effect.
        let dead = voids_of(log);
        for entry in log {
            if dead.iter().any(|(voided, void)| (*voided..*void).contains(&entry.log_index)) {
                continue;
            }
            let Some(commit) = commit_of(entry) else { continue };
            let Ok(commit) = commit else {
                failures.push(format!("room {room_id}: commit at {} does not decode", entry.log_index));
                continue;
            };
            match ledger.commits.get(&digest(&commit)) {
                Some(label) => applied.entry(label.as_str()).or_default().push((*room_id, entry.log_index)),
                None => failures
                    .push(format!("room {room_id}: a commit at {} that no client made", entry.log_index)),
            }
        }
    }
    for (label, places) in applied {
        if places.len() > 1 {
            let what = ledger.intents.get(label).map_or("?", |intent| intent.what.as_str());
            failures.push(format!("intent {label} ({what}) took effect {} times: {places:?}", places.len()));
        }
    }
    failures.truncate(FINDINGS_PER_KIND_MAX);
    failures
}

/// Where the server and each client are, for a convergence failure.
pub fn describe_progress(server: &ServerShared, cast: &Cast, clients: &[Rc<ClientShared>]) -> String {
    let views = server.rooms.borrow();
    let senders = cast.senders.borrow();
    let mut parts = Vec::new();
    let stats = server.stats.borrow();
    if stats.welcomes_of_failed_batches > 0 {
        parts.push(format!(
            "{} Welcomes stored ahead of failed batches ({} forgotten as orphans)",
            stats.welcomes_of_failed_batches, stats.welcomes_orphaned
        ));
    }
    drop(stats);
    for plan in &cast.rooms {
        let Some(view) = views.get(&plan.room_id) else {
            parts.push(format!("room {}: not on the server", plan.room_id));
            continue;
        };
        let members: Vec<usize> =
            (0..senders.len()).filter(|c| view.members.contains(&senders[*c])).collect();
        parts.push(format!(
            "room {}: server epoch {} head {} members {members:?} proposals {}",
            plan.room_id, view.epoch, view.next_log_index, view.proposals_pending
        ));
    }
    for client in clients {
        let record = client.record.borrow();
        let rooms: Vec<String> = record
            .status
            .iter()
            .map(|(room, s)| {
                format!(
                    "{room}: member {} live {} next {} epoch {:?} joining {}",
                    s.member,
                    s.live,
                    s.next_log_index,
                    s.epoch_and_tree.as_ref().map(|(e, _)| *e),
                    s.joining
                )
            })
            .collect();
        parts.push(format!("client {} work {:?} [{}]", client.index, record.work, rooms.join("; ")));
    }
    parts.join(" | ")
}

/// Server timestamps never decrease within a room's log, across restarts
/// and clock steps.
fn check_timestamps(logs: &BTreeMap<RoomId, Vec<DurableEntry>>) -> Vec<String> {
    let mut failures = Vec::new();
    for (room_id, log) in logs {
        let mut last: Option<(u64, u64)> = None;
        for entry in log {
            let Ok(frame) = Frame::decode(&entry.bytes) else { continue };
            let stamped = frame.header().server_timestamp_ms();
            if let Some((index, previous)) = last.filter(|(_, previous)| stamped < *previous) {
                failures.push(format!(
                    "room {room_id}: index {} stamped {stamped} ms, before index {index} ({previous} ms)",
                    entry.log_index
                ));
                break;
            }
            last = Some((entry.log_index, stamped));
        }
    }
    failures
}

/// The second domain's replicas against the authority's logs (see the
/// module's list); also returns how many entries erased at the authority
/// the replica still holds (each also a failure).
pub fn check_replica(authority: &ServerShared, replica: &ServerShared, cast: &Cast) -> (Vec<String>, u64) {
    let mut failures = Vec::new();
    let mut holds_erased = 0;
    for plan in &cast.rooms {
        let ordered = authority.disk.log(plan.room_id);
        let replicated = replica.disk.log(plan.room_id);
        if ordered.len() != replicated.len() {
            failures.push(format!(
                "the replica of room {} holds {} entries, the authority {}",
                plan.room_id,
                replicated.len(),
                ordered.len()
            ));
        }
        for (kept, copy) in ordered.iter().zip(&replicated) {
            let copied = kept.appended_digest == copy.appended_digest;
            // An entry erased before the replica read it arrives as its placeholder.
            let placeholder = kept.erased && copy.bytes == kept.bytes;
            if !copied && !placeholder {
                failures.push(format!(
                    "the replica of room {} holds another frame than the authority at index {}",
                    plan.room_id, kept.log_index
                ));
                break;
            }
            if kept.erased && copied && !copy.erased {
                holds_erased += 1;
                if holds_erased <= 3 {
                    failures.push(format!(
                        "the replica of room {} still holds index {}, erased at the authority",
                        plan.room_id, kept.log_index
                    ));
                }
            }
        }
    }
    for equivocation in replica.equivocations.borrow().iter().take(3) {
        failures.push(format!("the replica caught its authority equivocating: {equivocation}"));
    }
    for refusal in replica.feed_refusals.borrow().iter().take(3) {
        failures.push(format!("the authority's feed: {refusal}"));
    }
    (failures, holds_erased)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace(heads: &[(u64, u8)]) -> RoomTrace {
        RoomTrace {
            heads: heads.iter().map(|(index, byte)| (*index, [*byte; 32])).collect(),
            ..RoomTrace::default()
        }
    }

    /// Heads that agree where clients overlap pass; one client holding a
    /// different head at an index another reached is caught, in any room.
    #[test]
    fn clients_holding_different_heads_at_one_index_are_caught() {
        let room = RoomId([1; 16]);
        let (alice, bob, carol) =
            (trace(&[(0, 1), (1, 2), (2, 3)]), trace(&[(1, 2), (2, 3), (3, 4)]), trace(&[(2, 9)]));
        assert!(check_heads_agree([(0, room, &alice), (1, room, &bob)]).is_empty());
        let failures = check_heads_agree([(0, room, &alice), (1, room, &bob), (2, room, &carol)]);
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert!(failures[0].contains("clients 0 and 2 hold different log heads at index 2"), "{failures:?}");
        // The same index in another room is another log.
        assert!(check_heads_agree([(0, room, &alice), (2, RoomId([2; 16]), &carol)]).is_empty());
    }
}
