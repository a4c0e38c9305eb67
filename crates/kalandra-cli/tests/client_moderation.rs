//! Moderation from devices: a kick that online members commit by
//! themselves, bans, roles and redaction, through client-core's `Client`
//! and the `kalandra` command against a real server.

mod common;

use std::time::Duration;

use client_core::client::{Client, ClientError, MessageBody};
use common::{device, kalandra, ok, Server};
use kalandra_proto::{ErrorCode, RoomId};

fn bodies(client: &Client, room: RoomId) -> Vec<(u64, MessageBody)> {
    client.history(room, 0, 1000).unwrap().into_iter().map(|m| (m.log_index, m.body)).collect()
}

fn refused_with(result: Result<impl std::fmt::Debug, ClientError>, code: ErrorCode) {
    match result {
        Err(error) => assert_eq!(error.code(), Some(code.to_u16()), "{error:?}"),
        Ok(value) => panic!("expected {code:?}, got {value:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_online_member_commits_a_kick_by_itself_and_the_kicked_device_reads_nothing_after() {
    let server_dir = tempfile::tempdir().unwrap();
    let server = Server::start(server_dir.path()).await;
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut alice = device(dirs[0].path(), 1, &server).await;
    let mut bob = device(dirs[1].path(), 2, &server).await;
    let mut carol = device(dirs[2].path(), 3, &server).await;
    let room = alice.create_room().await.unwrap();
    alice.invite(room, &[bob.sender_id(), carol.sender_id()]).await.unwrap();
    bob.join(room, Duration::from_secs(10)).await.unwrap();
    carol.join(room, Duration::from_secs(10)).await.unwrap();
    carol.subscribe(room).await.unwrap();

    // Only admins and moderators kick.
    refused_with(bob.kick(room, carol.sender_id(), "no").await, ErrorCode::Forbidden);
    alice.kick(room, bob.sender_id(), "spam").await.unwrap();
    // Carol is online: she commits the removal without being asked.
    for _ in 0..20 {
        if !carol.rooms()[0].members.contains(&bob.sender_id()) {
            break;
        }
        carol.next_message(Duration::from_millis(200)).await.unwrap();
    }
    assert_eq!(carol.rooms()[0].epoch, 2, "Carol's commit moved the room on");
    assert!(!carol.rooms()[0].members.contains(&bob.sender_id()));
    let after = alice.send(room, b"after the kick").await.unwrap();
    // Bob's device may read its own removal, nothing after it.
    let read = bob.sync(room).await;
    assert!(matches!(read, Ok(_) | Err(ClientError::NotMember(_))), "{read:?}");
    assert!(matches!(bob.sync(room).await, Err(ClientError::NotMember(_))));
    assert!(bodies(&bob, room).iter().all(|(index, _)| *index < after));

    // A ban keeps Bob out: re-adding him is refused.
    assert_eq!(alice.ban(room, bob.sender_id(), "again", None).await.unwrap(), u64::MAX);
    refused_with(alice.invite(room, &[bob.sender_id()]).await, ErrorCode::Banned);
    alice.unban(room, bob.sender_id(), "second chance").await.unwrap();
    assert_eq!(alice.invite(room, &[bob.sender_id()]).await.unwrap(), 3);

    // Redaction: Carol may erase only her own message until she moderates.
    let oops = alice.send(room, b"oops").await.unwrap();
    refused_with(carol.redact(room, oops, "not hers").await, ErrorCode::Forbidden);
    alice.set_role(room, carol.sender_id(), "moderator", true).await.unwrap();
    carol.redact(room, oops, "as moderator").await.unwrap();
    // Bob had not read it: his device gets the erased placeholder, and reads on past it.
    bob.join(room, Duration::from_secs(10)).await.unwrap();
    let next = alice.send(room, b"after the redaction").await.unwrap();
    bob.sync(room).await.unwrap();
    let bob_view = bodies(&bob, room);
    assert!(bob_view.contains(&(oops, MessageBody::Redacted)), "{bob_view:?}");
    assert!(bob_view.contains(&(next, MessageBody::Text(b"after the redaction".to_vec()))));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moderation_with_the_kalandra_command() {
    let server_dir = tempfile::tempdir().unwrap();
    let server = Server::start(server_dir.path()).await;
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let address = server.address.to_string();
    let mut ids = Vec::new();
    for dir in &dirs {
        let id =
            ok(dir.path(), &["init", "--server", &address, "--fingerprint", &server.fingerprint_hex]).await;
        ids.push(id.trim().to_owned());
    }
    let room = ok(dirs[0].path(), &["room", "create"]).await.trim().to_owned();
    ok(dirs[0].path(), &["invite", "--room", &room, &ids[1], &ids[2]]).await;
    ok(dirs[1].path(), &["join", "--room", &room]).await;
    ok(dirs[2].path(), &["join", "--room", &room]).await;

    let refused = kalandra(dirs[1].path(), &["kick", "--room", &room, &ids[2]]).await;
    assert_eq!(refused.status.code(), Some(4), "{refused:?}");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("Forbidden"));
    assert!(ok(dirs[0].path(), &["kick", "--room", &room, &ids[1], "--reason", "spam"])
        .await
        .contains("removal proposed"));
    // Carol's next message first commits the pending removal.
    let index: u64 = ok(dirs[2].path(), &["send", "--room", &room, "hello"]).await.trim().parse().unwrap();
    let history = ok(dirs[0].path(), &["history", "--room", &room]).await;
    assert!(history.contains(&format!("removed [{}]", ids[1])), "{history}");
    assert!(history.contains("\thello"));
    ok(dirs[2].path(), &["redact", "--room", &room, &index.to_string()]).await;
    let output = kalandra(dirs[1].path(), &["send", "--room", &room, "let me in"]).await;
    assert_eq!(output.status.code(), Some(5), "{output:?}");
    server.stop().await;
}

/// A device banned while away, from a server that has since restarted (and
/// so no longer remembers how far it may read), is refused with `Banned`:
/// the device marks the room as left, and its other rooms carry on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_banned_while_away_leaves_the_room_and_keeps_its_other_rooms() {
    let server_dir = tempfile::tempdir().unwrap();
    let server = Server::start(server_dir.path()).await;
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut alice = device(dirs[0].path(), 1, &server).await;
    let mut bob = device(dirs[1].path(), 2, &server).await;
    let (banned_from, other) = (alice.create_room().await.unwrap(), alice.create_room().await.unwrap());
    for room in [banned_from, other] {
        alice.invite(room, &[bob.sender_id()]).await.unwrap();
        bob.join(room, Duration::from_secs(10)).await.unwrap();
    }
    let bob_id = bob.sender_id();
    drop(bob); // away: nothing but its store survives

    assert_ne!(alice.ban(banned_from, bob_id, "spam", None).await.unwrap(), u64::MAX);
    // Alice's next message first commits the pending removal.
    alice.send(banned_from, b"without bob").await.unwrap();
    let members = alice.rooms().into_iter().find(|r| r.room_id == banned_from).unwrap().members;
    assert!(!members.contains(&bob_id), "Alice committed the removal");
    server.stop().await;

    let server = Server::start(server_dir.path()).await;
    alice.set_server(server.target()).unwrap();
    alice.connect().await.unwrap();
    let mut bob = Client::open(dirs[1].path(), &common::key(2)).unwrap();
    bob.set_server(server.target()).unwrap();
    let failures = bob.connect().await.unwrap();
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(bob.left_rooms(), vec![banned_from], "the banned room is left on the device");
    assert!(matches!(bob.sync(banned_from).await, Err(ClientError::NotMember(_))));
    let index = bob.send(other, b"still here").await.unwrap();
    alice.sync(other).await.unwrap();
    let alice_view = bodies(&alice, other);
    assert!(alice_view.contains(&(index, MessageBody::Text(b"still here".to_vec()))), "{alice_view:?}");
    server.stop().await;
}
