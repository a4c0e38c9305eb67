//! Killing `kalandra send` at many points loses nothing it accepted and
//! duplicates nothing.

mod common;

use std::process::Command;
use std::time::Duration;

use client_core::client::{Client, MessageBody};
use client_core::store::StoreKey;
use common::{ok, Server};

/// Delays after which a `send` is killed: from before it opened its store
/// to after it finished.
const KILL_AFTER_MS: [u64; 16] = [0, 30, 60, 80, 100, 110, 120, 130, 140, 150, 160, 180, 200, 230, 260, 400];

fn texts(dir: &std::path::Path, room: kalandra_proto::RoomId) -> Vec<String> {
    let key = std::fs::read_to_string(dir.join("store.key")).unwrap();
    let key: [u8; 32] = hex::decode(key.trim()).unwrap().try_into().unwrap();
    let client = Client::open(dir, &StoreKey::from_bytes(key)).unwrap();
    assert_eq!(client.outbox_len(), 0, "the outbox was flushed");
    client
        .history(room, 0, 10_000)
        .unwrap()
        .into_iter()
        .filter_map(|m| match m.body {
            MessageBody::Text(text) => Some(String::from_utf8(text).unwrap()),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_send_at_any_point_loses_nothing_accepted_and_duplicates_nothing() {
    let server_dir = tempfile::tempdir().unwrap();
    let server = Server::start(server_dir.path()).await;
    let (alice, bob) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let address = server.address.to_string();
    for dir in [&alice, &bob] {
        ok(dir.path(), &["init", "--server", &address, "--fingerprint", &server.fingerprint_hex]).await;
    }
    let bob_id = ok(bob.path(), &["whoami"]).await.trim().to_owned();
    let room_hex = ok(alice.path(), &["room", "create"]).await.trim().to_owned();
    ok(alice.path(), &["invite", "--room", &room_hex, &bob_id]).await;
    ok(bob.path(), &["join", "--room", &room_hex]).await;
    let room = kalandra_proto::RoomId(hex::decode(&room_hex).unwrap().try_into().unwrap());

    let mut completed = Vec::new();
    for (i, delay_ms) in KILL_AFTER_MS.iter().enumerate() {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kalandra"))
            .arg("--dir")
            .arg(alice.path())
            .args(["send", "--room", &room_hex, &format!("m{i}")])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(*delay_ms)).await;
        let _ = child.kill();
        let status = tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
        if status.success() {
            completed.push(format!("m{i}"));
        }
    }
    // The next command on each device settles everything.
    ok(alice.path(), &["history", "--room", &room_hex]).await;
    ok(bob.path(), &["history", "--room", &room_hex]).await;
    let (alice_texts, bob_texts) = (texts(alice.path(), room), texts(bob.path(), room));
    assert_eq!(alice_texts, bob_texts, "one order, the same on both devices");
    let mut unique = alice_texts.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), alice_texts.len(), "no message twice: {alice_texts:?}");
    for text in &completed {
        assert!(alice_texts.contains(text), "{text} was acknowledged but is missing: {alice_texts:?}");
    }
    eprintln!("acknowledged before the kill: {completed:?}; in the log: {alice_texts:?}");
    assert!(!completed.is_empty(), "the longest delays let some sends finish");
    assert!(completed.len() < KILL_AFTER_MS.len(), "some sends were killed");
    server.stop().await;
}
