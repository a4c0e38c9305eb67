//! Killing `kalandra send` at many points loses nothing it accepted and
//! duplicates nothing.

mod common;

use std::process::Command;
use std::time::Duration;

use client_core::client::{Client, MessageBody};
use client_core::store::StoreKey;
use common::{ok, Server};

/// Delays after which a `send` is killed: from before it opened its store
/// to after it finished. `None`: the send is left to finish, so that at
/// least one completes however slow the machine is.
const KILL_AFTER_MS: [Option<u64>; 17] = [
    Some(0),
    Some(30),
    Some(60),
    Some(80),
    Some(100),
    Some(110),
    Some(120),
    Some(130),
    Some(140),
    Some(150),
    Some(160),
    Some(180),
    Some(200),
    Some(230),
    Some(260),
    Some(400),
    None,
];

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

/// Runs `kalandra --dir dir args…`, killed after `kill_after_ms` if given;
/// returns whether it exited successfully.
async fn run_killed_after(dir: &std::path::Path, args: &[&str], kill_after_ms: Option<u64>) -> bool {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kalandra"))
        .arg("--dir")
        .arg(dir)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    if let Some(delay_ms) = kill_after_ms {
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        let _ = child.kill();
    }
    tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap().success()
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
        if run_killed_after(alice.path(), &["send", "--room", &room_hex, &format!("m{i}")], *delay_ms).await {
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
    assert!(
        completed.contains(&format!("m{}", KILL_AFTER_MS.len() - 1)),
        "the send left to finish succeeded"
    );
    assert!(completed.len() < KILL_AFTER_MS.len(), "some sends were killed");
    server.stop().await;
}

/// Delays after which a `join --external` is killed.
const JOIN_KILL_AFTER_MS: [u64; 10] = [0, 40, 80, 120, 160, 200, 240, 280, 320, 400];

/// A device whose external join was killed at any point (its commit
/// sequenced or not, its answer lost) joins again: the new external commit
/// removes the leaf the lost one left, so the room holds the device once,
/// and messages flow both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_an_external_join_at_any_point_lets_the_device_join_again_once() {
    let server_dir = tempfile::tempdir().unwrap();
    let server = Server::start(server_dir.path()).await;
    let (alice, bob) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let address = server.address.to_string();
    for dir in [&alice, &bob] {
        ok(dir.path(), &["init", "--server", &address, "--fingerprint", &server.fingerprint_hex]).await;
    }
    let bob_id = ok(bob.path(), &["whoami"]).await.trim().to_owned();
    let room_hex = ok(alice.path(), &["room", "create", "--open"]).await.trim().to_owned();

    let mut joined = false;
    for delay_ms in JOIN_KILL_AFTER_MS {
        if run_killed_after(bob.path(), &["join", "--room", &room_hex, "--external"], Some(delay_ms)).await {
            joined = true;
            break;
        }
    }
    if !joined {
        ok(bob.path(), &["join", "--room", &room_hex, "--external"]).await;
    }
    ok(alice.path(), &["send", "--room", &room_hex, "from alice"]).await;
    ok(bob.path(), &["send", "--room", &room_hex, "from bob"]).await;
    let alice_view = ok(alice.path(), &["history", "--room", &room_hex]).await;
    let bob_view = ok(bob.path(), &["history", "--room", &room_hex]).await;
    eprintln!("Alice's view after the killed joins:\n{alice_view}");
    assert!(alice_view.contains("from bob"), "{alice_view}");
    assert!(alice_view.contains(&format!("added [{bob_id}]")), "the joiner is shown joining: {alice_view}");
    assert!(bob_view.contains("from alice"), "{bob_view}");

    let key = std::fs::read_to_string(alice.path().join("store.key")).unwrap();
    let key: [u8; 32] = hex::decode(key.trim()).unwrap().try_into().unwrap();
    let alice_client = Client::open(alice.path(), &StoreKey::from_bytes(key)).unwrap();
    let room = kalandra_proto::RoomId(hex::decode(&room_hex).unwrap().try_into().unwrap());
    let members = alice_client.rooms().into_iter().find(|r| r.room_id == room).unwrap().members;
    let bob_leaves = members.iter().filter(|m| m.to_string() == bob_id).count();
    assert_eq!(bob_leaves, 1, "Bob holds one leaf: {members:?}");
    server.stop().await;
}
