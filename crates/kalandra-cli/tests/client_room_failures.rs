//! One room's trouble stays in that room: `connect`, `background_sync` and
//! the `kalandra` command go on with the other rooms and name the failed
//! one; and `background_sync` brings every room's commits up to date
//! before it reads any room's messages.

mod common;

use std::path::Path;
use std::time::Duration;

use client_core::client::{BackgroundStep, Client, ClientError, MessageBody};
use common::{device, kalandra, key, Server};
use kalandra_proto::RoomId;

fn texts(client: &Client, room: RoomId) -> Vec<Vec<u8>> {
    let history = client.history(room, 0, 1000).unwrap();
    history
        .into_iter()
        .filter_map(|m| match m.body {
            MessageBody::Text(text) => Some(text),
            _ => None,
        })
        .collect()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

async fn reconnect(client: &mut Client, server: &Server) {
    client.disconnect().await;
    client.set_server(server.target()).unwrap();
    let failures = client.connect().await.unwrap();
    assert!(failures.is_empty(), "{failures:?}");
}

/// Bob is in rooms `kept` and `lost`; the server is then restored from a
/// backup taken before Bob read `lost`'s newest message, so Bob's cursor in
/// `lost` lies beyond that room's log (the server refuses to read it),
/// while `kept` is as it was. Returns the restored server, Alice and Bob
/// (both disconnected), and the two rooms.
async fn a_server_restored_from_an_old_backup(
    dirs: &[tempfile::TempDir; 4],
) -> (Server, Client, Client, RoomId, RoomId) {
    let [server_dir, backup_dir, alice_dir, bob_dir] = dirs;
    let server = Server::start(server_dir.path()).await;
    let mut alice = device(alice_dir.path(), 1, &server).await;
    let mut bob = device(bob_dir.path(), 2, &server).await;
    let kept = alice.create_room().await.unwrap();
    let lost = alice.create_room().await.unwrap();
    for room in [kept, lost] {
        alice.invite(room, &[bob.sender_id()]).await.unwrap();
        bob.join(room, Duration::from_secs(10)).await.unwrap();
    }
    alice.disconnect().await;
    bob.disconnect().await;
    server.stop().await;
    copy_dir(server_dir.path(), backup_dir.path());

    let server = Server::start(server_dir.path()).await;
    reconnect(&mut alice, &server).await;
    reconnect(&mut bob, &server).await;
    alice.send(lost, b"lost with the restore").await.unwrap();
    bob.sync(lost).await.unwrap();
    alice.disconnect().await;
    bob.disconnect().await;
    server.stop().await;

    let restored = Server::start(backup_dir.path()).await;
    for client in [&mut alice, &mut bob] {
        client.set_server(restored.target()).unwrap();
    }
    (restored, alice, bob, kept, lost)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_the_server_cannot_serve_fails_alone_in_connect_background_sync_and_the_cli() {
    let dirs: [tempfile::TempDir; 4] = std::array::from_fn(|_| tempfile::tempdir().unwrap());
    let (server, mut alice, mut bob, kept, lost) = a_server_restored_from_an_old_backup(&dirs).await;
    let alice_failures = alice.connect().await.unwrap();
    assert_eq!(alice_failures.iter().map(|f| f.room_id).collect::<Vec<_>>(), [lost], "{alice_failures:?}");
    alice.send(kept, b"one").await.unwrap();

    // connect: Bob's other room is caught up and usable; the lost one is
    // named, with the server's refusal.
    let failures = bob.connect().await.unwrap();
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_eq!(failures[0].room_id, lost);
    assert!(matches!(failures[0].error, ClientError::Refused { .. }), "{:?}", failures[0].error);
    assert_eq!(texts(&bob, kept), [b"one".to_vec()]);
    bob.send(kept, b"bob in the room that works").await.unwrap();
    assert!(bob.sync(lost).await.is_err(), "the lost room still fails on its own");

    // background_sync: the failure is reported, the other room is synced.
    alice.send(kept, b"two").await.unwrap();
    bob.disconnect().await;
    let report = bob.background_sync(Duration::from_secs(30)).await.unwrap();
    assert_eq!(report.rooms_failed.iter().map(|f| f.room_id).collect::<Vec<_>>(), [lost], "{report:?}");
    assert_eq!(report.rooms_synced, [kept]);
    assert!(report.is_complete() && report.rooms_left.is_empty());
    assert_eq!(texts(&bob, kept).last().unwrap(), b"two");

    // The command: a send to the working room succeeds and names the other
    // room on standard error, once.
    alice.send(kept, b"three").await.unwrap();
    bob.disconnect().await;
    drop(bob);
    let bob_dir = dirs[3].path();
    std::fs::write(bob_dir.join("store.key"), hex::encode(key(2).as_bytes())).unwrap();
    let output = kalandra(bob_dir, &["send", "--room", &kept.to_string(), "from the command"]).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{:?}: {stderr}", output.status.code());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with(&format!("kalandra: room {lost}: ")), "{stderr}");
    let history = kalandra(bob_dir, &["history", "--room", &kept.to_string()]).await;
    let history = String::from_utf8_lossy(&history.stdout).into_owned();
    assert!(history.contains("\tthree") && history.contains("\tfrom the command"), "{history}");
    // A command about the failed room fails by itself.
    let refused = kalandra(bob_dir, &["history", "--room", &lost.to_string()]).await;
    assert_eq!(refused.status.code(), Some(4), "{refused:?}");
    alice.disconnect().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_sync_applies_every_rooms_commits_before_any_rooms_messages() {
    const MESSAGES: usize = 20;
    let server_dir = tempfile::tempdir().unwrap();
    let server = Server::start(server_dir.path()).await;
    let (alice_dir, bob_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut alice = device(alice_dir.path(), 1, &server).await;
    let mut bob = device(bob_dir.path(), 2, &server).await;
    let mut rooms = [alice.create_room().await.unwrap(), alice.create_room().await.unwrap()];
    rooms.sort();
    for room in rooms {
        alice.invite(room, &[bob.sender_id()]).await.unwrap();
        bob.join(room, Duration::from_secs(10)).await.unwrap();
    }
    bob.disconnect().await;
    drop(bob);
    // While Bob is away each room gets a commit, then many messages.
    for room in rooms {
        alice.self_update(room).await.unwrap();
        for i in 0..MESSAGES {
            alice.send(room, format!("message {i}").as_bytes()).await.unwrap();
        }
    }

    let mut bob = Client::open(bob_dir.path(), &key(2)).unwrap();
    bob.set_server(server.target()).unwrap();
    // A budget that lasts for the control-plane pass and no further.
    let mut asked = Vec::new();
    let report = bob
        .background_sync_with(|step| {
            asked.push(step);
            matches!(step, BackgroundStep::ControlPlane(_))
        })
        .await
        .unwrap();
    assert_eq!(
        asked,
        [
            BackgroundStep::ControlPlane(rooms[0]),
            BackgroundStep::ControlPlane(rooms[1]),
            BackgroundStep::Messages(rooms[0])
        ]
    );
    assert_eq!(report.rooms_settled, rooms);
    assert!(report.rooms_synced.is_empty() && report.budget_exhausted);
    assert_eq!(report.rooms_left, rooms);
    for summary in bob.rooms() {
        assert_eq!(summary.epoch, 2, "the commit of room {} was applied", summary.room_id);
    }
    for room in rooms {
        assert!(texts(&bob, room).is_empty(), "no message was read yet");
        let membership = bob.history(room, 0, 1000).unwrap();
        assert!(membership.iter().any(|m| matches!(m.body, MessageBody::Membership { epoch: 2, .. })));
    }

    // The next call reads the messages.
    let done = bob.background_sync(Duration::from_secs(30)).await.unwrap();
    assert!(done.is_complete() && done.rooms_failed.is_empty(), "{done:?}");
    for room in rooms {
        assert_eq!(texts(&bob, room).len(), MESSAGES);
    }
    server.stop().await;
}
