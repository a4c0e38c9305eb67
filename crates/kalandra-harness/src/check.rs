//! The checkers run after every simulation.
//!
//! - Nothing is released before it is durable: no acknowledgement,
//!   fan-out or Welcome reaches a connection's queue for an index the disk
//!   does not hold yet (checked as each frame is queued, not after the run).
//! - Server timestamps never decrease within a room's log.
//! - Every room has one total order: each client's delivered entries are a
//!   contiguous run of the server's durable log (same index, same bytes),
//!   so all clients saw the same frames in the same order, each once.
//! - Nothing acknowledged is lost: every acknowledged frame is in the
//!   durable log at its index, byte for byte, across server restarts.
//! - All clients converge to the server's epoch and tree hash, and every
//!   client reached the log's head.
//! - No client saw a broken rule (gaps, duplicates, commits that do not
//!   apply, messages that do not decrypt, illegal state transitions).
//! - The run did something: frames were sequenced, acknowledged and
//!   delivered.

use std::collections::BTreeMap;
use std::rc::Rc;

use sha2::{Digest, Sha256};

use crate::client::{ClientShared, ROOM};
use crate::server::ServerShared;

/// The checkers' findings; empty when the run is correct.
pub fn check(server: &ServerShared, clients: &[Rc<ClientShared>]) -> Vec<String> {
    let mut failures = Vec::new();
    let log: Vec<[u8; 32]> =
        server.disk.log(ROOM).iter().map(|entry| Sha256::digest(&entry.frame).into()).collect();
    let stats = *server.stats.borrow();
    if stats.sequenced == 0 || stats.acknowledged == 0 || log.is_empty() {
        failures.push(format!(
            "nothing ran: {} sequenced, {} acknowledged, log of {}",
            stats.sequenced,
            stats.acknowledged,
            log.len()
        ));
    }
    failures.extend(check_timestamps(server));
    let early = server.early_releases.borrow();
    if let Some(first) = early.first() {
        failures.push(format!(
            "released before durable: {} of index {} while the disk held {} entries ({} such releases)",
            first.what,
            first.log_index,
            first.durable_next,
            early.len()
        ));
    }
    let views = server.rooms.borrow();
    let view = views.get(&ROOM);
    let mut states = BTreeMap::new();
    for client in clients {
        let index = client.index;
        let record = client.record.borrow();
        for violation in record.violations.iter().take(5) {
            failures.push(format!("client {index}: {violation}"));
        }
        if record.delivered.is_empty() {
            failures.push(format!("client {index}: nothing delivered"));
        }
        for pair in record.delivered.windows(2) {
            if pair[1].0 != pair[0].0 + 1 {
                failures.push(format!("client {index}: delivered {} after {}", pair[1].0, pair[0].0));
                break;
            }
        }
        for (log_index, frame_digest) in &record.delivered {
            match log.get(usize::try_from(*log_index).unwrap_or(usize::MAX)) {
                Some(stored) if stored == frame_digest => {}
                Some(_) => {
                    failures.push(format!(
                        "client {index}: delivered a frame at {log_index} that the log holds differently"
                    ));
                    break;
                }
                None => {
                    failures.push(format!(
                        "client {index}: delivered index {log_index} beyond the durable log ({})",
                        log.len()
                    ));
                    break;
                }
            }
        }
        for (log_index, frame_digest) in &record.acknowledged {
            match log.get(usize::try_from(*log_index).unwrap_or(usize::MAX)) {
                Some(stored) if stored == frame_digest => {}
                _ => {
                    failures.push(format!(
                        "client {index}: acknowledged frame at {log_index} lost from the durable log"
                    ));
                    break;
                }
            }
        }
        if let Some(last) = record.last_applied {
            if last + 1 != log.len() as u64 {
                failures.push(format!("client {index}: applied through {last}, log holds {}", log.len()));
            }
        }
        states.insert(index, record.epoch_and_tree.clone());
    }
    let distinct: std::collections::BTreeSet<_> = states.values().collect();
    if distinct.len() > 1 {
        let epochs: Vec<String> =
            states.iter().map(|(i, s)| format!("{i}: epoch {:?}", s.as_ref().map(|(e, _)| *e))).collect();
        failures.push(format!("clients did not converge: {}", epochs.join(", ")));
    } else if let (Some(Some((epoch, tree))), Some(view)) = (distinct.iter().next(), view) {
        if *epoch != view.epoch || *tree != view.tree_hash {
            failures.push(format!("clients at epoch {epoch}, server at {}", view.epoch));
        }
    }
    failures
}

/// Where each client is, for a convergence failure.
pub fn describe_progress(server: &ServerShared, clients: &[Rc<ClientShared>]) -> String {
    let views = server.rooms.borrow();
    let mut parts = vec![format!(
        "server {}",
        views.get(&ROOM).map_or("without the room".to_owned(), |v| format!(
            "epoch {} head {}",
            v.epoch, v.next_log_index
        ))
    )];
    for client in clients {
        let record = client.record.borrow();
        parts.push(format!(
            "client {} epoch {:?} applied {:?} live {} work {}",
            client.index,
            record.epoch_and_tree.as_ref().map(|(e, _)| *e),
            record.last_applied,
            record.live,
            record.work_left
        ));
    }
    parts.join("; ")
}

/// Server timestamps never decrease within a room's log, across restarts
/// and clock steps.
fn check_timestamps(server: &ServerShared) -> Vec<String> {
    let mut failures = Vec::new();
    for room_id in server.disk.rooms() {
        let mut last: Option<(u64, u64)> = None;
        for entry in server.disk.log(room_id) {
            let Ok(frame) = kalandra_proto::Frame::decode(&entry.frame) else { continue };
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
