//! Cryptographic erasure end to end over real QUIC on loopback: a message
//! carrying a random marker is redacted by its sender (or expires under the
//! room's retention period), the database is compacted, and then neither
//! the marker nor the entry's data key is anywhere in the bytes of the data
//! directory. Negative controls show that the scan finds a live entry's
//! key, and that no marker is ever stored in clear.

mod common;

use std::path::Path;

use common::*;
use kalandra_proto::payload::{Ack, Application, Error, Redact, Sync, SyncDone};
use kalandra_proto::{ErrorCode, Frame, Opcode, RoomId};
use kalandra_server::store::{DataKey, RedactOutcome, RedbStore, Store};
use kalandra_server::{RedactAuthority, RetentionSweeper};
use rand::{RngCore, SeedableRng};

const ROOM: RoomId = RoomId(*b"room-for-erasure");
const DATABASE: &str = "kalandra.redb";

/// 64 random bytes: content that can only be in a file if it was written.
fn marker(rng: &mut rand_chacha::ChaCha20Rng) -> [u8; 64] {
    let mut marker = [0u8; 64];
    rng.fill_bytes(&mut marker);
    marker
}

/// Every file under `dir`, recursively, with its bytes.
fn files(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for item in std::fs::read_dir(&dir).unwrap() {
            let path = item.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else {
                let bytes = std::fs::read(&path).unwrap();
                out.push((path, bytes));
            }
        }
    }
    assert!(out.iter().any(|(path, _)| path.ends_with(DATABASE)), "the database is scanned");
    out
}

/// Files of `dir` that contain `needle`.
fn found_in(dir: &Path, needle: &[u8]) -> Vec<std::path::PathBuf> {
    files(dir)
        .into_iter()
        .filter(|(_, bytes)| bytes.windows(needle.len()).any(|window| window == needle))
        .map(|(path, _)| path)
        .collect()
}

async fn send_marker(client: &mut TestClient, marker: &[u8; 64]) -> u64 {
    let payload = Application {
        generation: 0,
        ciphertext: bytes::Bytes::copy_from_slice(marker),
        push: None,
        epoch_tag: None,
    };
    let reply = client.request(&payload).await;
    decode_ok::<Ack>(&reply).log_index
}

/// The room's whole log as the client reads it with `Sync`.
async fn sync_log(client: &mut TestClient) -> Vec<Frame> {
    let request = client.frame(&Sync { from_log_index: 0, count_max: 4096 });
    let request_id = request.header().request_id();
    client.conn().send(&request).await.unwrap();
    let mut log = Vec::new();
    for _ in 0..10_000 {
        let frame = client.conn().recv().await.unwrap();
        match frame.opcode() {
            Opcode::SyncDone if frame.header().request_id() == request_id => {
                let done: SyncDone = decode_ok(&frame);
                assert_eq!(done.next_log_index, log.len() as u64);
                for (index, frame) in log.iter().enumerate() {
                    let frame: &Frame = frame;
                    assert_eq!(frame.header().log_index(), index as u64, "history stays dense");
                }
                return log;
            }
            Opcode::Error if frame.header().request_id() == request_id => {
                panic!("Sync refused: {:?}", frame.decode_payload::<Error>());
            }
            Opcode::Welcome => {}
            _ => log.push(frame),
        }
    }
    panic!("no SyncDone");
}

/// Asserts that `frame` is the placeholder of an erased entry at `log_index`.
fn assert_placeholder(frame: &Frame, log_index: u64, sender: kalandra_proto::SenderId) {
    assert_eq!(frame.opcode(), Opcode::Error, "index {log_index} is a placeholder");
    let error: Error = frame.decode_payload().unwrap();
    assert_eq!(error.code, ErrorCode::Redacted.to_u16());
    assert_eq!(error.log_index, Some(log_index));
    assert_eq!(frame.header().log_index(), log_index);
    assert_eq!(frame.header().sender_id(), sender, "the placeholder keeps the routing fields");
    assert!(frame.header().server_timestamp_ms() > 0);
}

fn application_text(frame: &Frame) -> Vec<u8> {
    assert_eq!(frame.opcode(), Opcode::Application);
    frame.decode_payload::<Application>().unwrap().ciphertext.to_vec()
}

fn key_of(store: &dyn Store, log_index: u64) -> DataKey {
    store.data_key(ROOM, log_index).unwrap().expect("a live entry has its key")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redacted_message_is_gone_from_every_file_after_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand_chacha::ChaCha20Rng::from_seed([0x5e; 32]);
    let (erased_marker, kept_marker) = (marker(&mut rng), marker(&mut rng));

    let server = TestServer::start_in(dir.path(), default_limits()).await;
    let mut alice = TestClient::connect(&server, "alice", 1).await;
    let mut mallory = TestClient::connect(&server, "mallory", 9).await;
    alice.create_room(ROOM).await;
    let erased = send_marker(&mut alice, &erased_marker).await;
    let kept = send_marker(&mut alice, &kept_marker).await;
    assert_eq!((erased, kept), (1, 2));
    let erased_key = key_of(server.store.as_ref(), erased);
    let kept_key = key_of(server.store.as_ref(), kept);

    // Negative control: the scan finds both keys, but no marker in clear.
    assert!(!found_in(dir.path(), &erased_key.0).is_empty(), "the scan finds a stored key");
    assert!(!found_in(dir.path(), &kept_key.0).is_empty());
    assert!(found_in(dir.path(), &erased_marker).is_empty(), "content is encrypted at rest");
    assert!(found_in(dir.path(), &kept_marker).is_empty(), "content is encrypted at rest");

    // Only the sender may redact, only application frames, only stored indices.
    mallory.room = ROOM;
    let refused = mallory.request(&Redact { log_index: erased, reason: "not mine".into() }).await;
    assert_eq!(error_code(&refused), ErrorCode::NotMember.to_u16());
    let refused = alice.request(&Redact { log_index: 0, reason: "the room itself".into() }).await;
    assert_eq!(error_code(&refused), ErrorCode::Forbidden.to_u16());
    let refused = alice.request(&Redact { log_index: 99, reason: "not yet".into() }).await;
    assert_eq!(error_code(&refused), ErrorCode::UnknownLogIndex.to_u16());
    assert_eq!(server.store.data_key(ROOM, erased).unwrap(), Some(erased_key.clone()), "nothing erased");

    // The sender redacts; a second request is acknowledged the same way.
    let ack: Ack = decode_ok(&alice.request(&Redact { log_index: erased, reason: "oops".into() }).await);
    assert_eq!(ack.log_index, erased);
    let again: Ack = decode_ok(&alice.request(&Redact { log_index: erased, reason: "oops".into() }).await);
    assert_eq!((again.log_index, again.server_time_ms), (erased, ack.server_time_ms));
    assert_eq!(server.store.data_key(ROOM, erased).unwrap(), None);

    // History keeps the index with a placeholder; the other message is intact.
    let log = sync_log(&mut alice).await;
    assert_eq!(log.len(), 3);
    assert_eq!(log[0].opcode(), Opcode::CreateRoom);
    assert_placeholder(&log[1], erased, alice.sender());
    assert_eq!(application_text(&log[2]), kept_marker);

    // The room goes on: a commit after the erased entry, then a message.
    assert_eq!(decode_ok::<Ack>(&alice.self_update().await).log_index, 3);
    assert_eq!(alice.epoch(), 1);
    let after = send_marker(&mut alice, &marker(&mut rng)).await;
    assert_eq!(after, 4);
    server.stop().await;

    // Restart: recovery replays around the erased entry, and it stays erased.
    let server = TestServer::start_in(dir.path(), default_limits()).await;
    alice.reconnect(&server).await;
    let log = sync_log(&mut alice).await;
    assert_eq!(log.len(), 5);
    assert_placeholder(&log[1], erased, alice.sender());
    assert_eq!(application_text(&log[2]), kept_marker);
    assert_eq!(log[3].opcode(), Opcode::Commit);
    // The recovered MLS state is at epoch 1: a message in it is accepted.
    assert_eq!(send_marker(&mut alice, &marker(&mut rng)).await, 5);
    // A moderator's redaction goes through the node with its own authority.
    let report = server.node.redact(ROOM, kept, mallory.sender(), RedactAuthority::Moderator).await.unwrap();
    assert_eq!((report.log_index, report.outcome), (kept, RedactOutcome::Erased));
    let report = server.node.redact(ROOM, erased, alice.sender(), RedactAuthority::Sender).await.unwrap();
    assert_eq!(report.outcome, RedactOutcome::AlreadyErased);
    server.stop().await;

    // Before compaction the freed pages may still hold the keys; after it,
    // nothing of the erased entries is in any file, and the log still reads.
    let report = RedbStore::compact_file(dir.path().join(DATABASE)).unwrap();
    assert!(report.rows > 0);
    assert!(report.bytes_after <= report.bytes_before, "{report:?}");
    for needle in [&erased_key.0[..], &kept_key.0[..], &erased_marker[..], &kept_marker[..]] {
        assert_eq!(found_in(dir.path(), needle), Vec::<std::path::PathBuf>::new());
    }
    let store = RedbStore::open(dir.path().join(DATABASE)).unwrap();
    let live_key = key_of(&store, 5);
    let entries = store.read_range(ROOM, 0, 10).unwrap();
    assert_eq!(entries.len(), 6);
    assert!(entries[1].frame().is_none() && entries[2].frame().is_none());
    assert!(entries[5].frame().is_some());
    drop(store);
    // Positive control after compaction: a live entry's key is still found.
    assert!(!found_in(dir.path(), &live_key.0).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_erases_expired_messages_for_good() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand_chacha::ChaCha20Rng::from_seed([0x7a; 32]);
    let old: Vec<[u8; 64]> = (0..3).map(|_| marker(&mut rng)).collect();
    let young = marker(&mut rng);
    const RETENTION_MS: u64 = 60_000;

    let server = TestServer::start_in(dir.path(), default_limits()).await;
    let mut alice = TestClient::connect(&server, "alice", 1).await;
    alice.create_room(ROOM).await;
    let mut old_indices = Vec::new();
    for marker in &old {
        old_indices.push(send_marker(&mut alice, marker).await);
    }
    let old_keys: Vec<DataKey> = old_indices.iter().map(|&i| key_of(server.store.as_ref(), i)).collect();
    server.node.set_retention(ROOM, Some(RETENTION_MS)).await.unwrap();
    assert!(server.node.set_retention(RoomId([0; 16]), Some(RETENTION_MS)).await.is_err(), "unknown room");

    let mut sweeper = RetentionSweeper::new();
    // Nothing has expired yet.
    let report = sweeper.pass(&server.node, now_ms(), 1000).await.unwrap();
    assert_eq!(report.entries_erased, 0);
    // Two minutes later everything sent so far has; CreateRoom is kept.
    let later = now_ms() + 2 * RETENTION_MS;
    let report = sweeper.pass(&server.node, later, 1000).await.unwrap();
    assert_eq!(report.entries_erased, 3);
    let young_index = send_marker(&mut alice, &young).await;
    let young_key = key_of(server.store.as_ref(), young_index);
    // A later pass leaves the young message alone.
    let report = sweeper.pass(&server.node, now_ms() + 1_000, 1000).await.unwrap();
    assert_eq!(report.entries_erased, 0);
    let log = sync_log(&mut alice).await;
    assert_eq!(log[0].opcode(), Opcode::CreateRoom);
    for &index in &old_indices {
        assert_placeholder(&log[usize::try_from(index).unwrap()], index, alice.sender());
    }
    assert_eq!(application_text(&log[usize::try_from(young_index).unwrap()]), young);
    server.stop().await;

    // Restart: still erased, the retention setting and sweep position kept.
    let server = TestServer::start_in(dir.path(), default_limits()).await;
    alice.reconnect(&server).await;
    let retention = server.node.retention(ROOM).await.unwrap().unwrap();
    assert_eq!(retention.retention_ms, RETENTION_MS);
    assert_eq!(retention.swept_next_log_index, young_index);
    let log = sync_log(&mut alice).await;
    assert_placeholder(&log[1], 1, alice.sender());
    assert_eq!(application_text(&log[usize::try_from(young_index).unwrap()]), young);
    server.stop().await;

    RedbStore::compact_file(dir.path().join(DATABASE)).unwrap();
    for key in &old_keys {
        assert!(found_in(dir.path(), &key.0).is_empty(), "an expired entry's key is gone");
    }
    for marker in old.iter().chain([&young]) {
        assert!(found_in(dir.path(), marker).is_empty(), "no content in clear");
    }
    assert!(!found_in(dir.path(), &young_key.0).is_empty(), "the scan finds a live key");
}

/// `kalandra-server --compact` rewrites the database of a stopped server
/// and exits; the log reads back the same, erased entries included.
#[test]
fn the_compact_flag_rewrites_the_database_and_exits() {
    use kalandra_server::store::{ErasureCause, LogEntry, Redaction};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(DATABASE);
    let frame = |i: u8| bytes::Bytes::from(vec![i; 300]);
    let erased_key = {
        let store = RedbStore::open(&path).unwrap();
        let entries: Vec<LogEntry> =
            (0..3u8).map(|i| LogEntry { room_id: ROOM, log_index: u64::from(i), frame: frame(i) }).collect();
        store.append_batch(&entries).unwrap();
        let key = key_of(&store, 1);
        let redaction = Redaction { erased_at_ms: 5, cause: ErasureCause::Retention };
        store.redact(ROOM, &[1], &redaction).unwrap();
        key
    };
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kalandra-server"))
        .arg("--compact")
        .arg("--data-dir")
        .arg(dir.path())
        .env_remove("KALANDRA_CONFIG")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).contains("compacted"));
    assert!(found_in(dir.path(), &erased_key.0).is_empty());
    let store = RedbStore::open(&path).unwrap();
    let entries = store.read_range(ROOM, 0, 10).unwrap();
    assert_eq!(entries.len(), 3);
    assert_eq!(entries[0].frame(), Some(&frame(0)));
    assert!(entries[1].frame().is_none());
    assert_eq!(entries[2].frame(), Some(&frame(2)));
    drop(store);
    // A running server holds the database: compaction refuses, changing nothing.
    let _open = RedbStore::open(&path).unwrap();
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_kalandra-server"))
        .arg("--compact")
        .arg("--data-dir")
        .arg(dir.path())
        .env_remove("KALANDRA_CONFIG")
        .output()
        .unwrap();
    assert!(!refused.status.success());
}
