//! client-core's `Client` against a real server: the outbox and the
//! encrypted store across a lost server and a killed client.

mod common;

use std::time::Duration;

use client_core::client::{Client, ClientError, MessageBody};
use common::{device, key, Server};

fn texts(client: &Client, room: kalandra_proto::RoomId) -> Vec<(u64, Vec<u8>)> {
    client
        .history(room, 0, 1000)
        .unwrap()
        .into_iter()
        .filter_map(|m| match m.body {
            MessageBody::Text(text) => Some((m.log_index, text)),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_sent_while_the_server_is_down_waits_in_the_outbox_across_a_client_restart() {
    let server_dir = tempfile::tempdir().unwrap();
    let server = Server::start(server_dir.path()).await;
    let (alice_dir, bob_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut alice = device(alice_dir.path(), 1, &server).await;
    let mut bob = device(bob_dir.path(), 2, &server).await;
    let room = alice.create_room().await.unwrap();
    assert_eq!(alice.invite(room, &[bob.sender_id()]).await.unwrap(), 1);
    assert_eq!(bob.join(room, Duration::from_secs(10)).await.unwrap(), 1);
    let first = alice.send(room, b"before the outage").await.unwrap();
    bob.disconnect().await;

    // The server goes away; the send fails but the message is kept.
    server.stop().await;
    alice.set_request_timeout(Duration::from_secs(2));
    let error = alice.send(room, b"during the outage").await.unwrap_err();
    assert!(matches!(error, ClientError::Connection(_)), "{error:?}");
    assert_eq!(alice.outbox_len(), 1);
    drop(alice); // killed: nothing but the store survives

    let server = Server::start(server_dir.path()).await;
    let mut alice = Client::open(alice_dir.path(), &key(1)).unwrap();
    assert_eq!(alice.outbox_len(), 1, "the outbox survived the restart");
    alice.set_server(server.target()).unwrap();
    alice.connect().await.unwrap();
    assert_eq!(alice.outbox_len(), 0, "connecting sent it");
    // The restarted sending chain does not reuse a generation: Bob reads everything.
    let third = alice.send(room, b"after the restart").await.unwrap();

    drop(bob);
    let mut bob = Client::open(bob_dir.path(), &key(2)).unwrap();
    bob.set_server(server.target()).unwrap();
    bob.connect().await.unwrap();
    bob.sync(room).await.unwrap();
    let expected: Vec<&[u8]> = vec![b"before the outage", b"during the outage", b"after the restart"];
    for history in [texts(&alice, room), texts(&bob, room)] {
        let bodies: Vec<&[u8]> = history.iter().map(|(_, t)| t.as_slice()).collect();
        assert_eq!(bodies, expected, "each message exactly once, in order");
        assert_eq!(history[0].0, first);
        assert_eq!(history[2].0, third);
    }
    let unreadable = bob
        .history(room, 0, 1000)
        .unwrap()
        .into_iter()
        .filter(|m| matches!(m.body, MessageBody::Unreadable(_)))
        .count();
    assert_eq!(unreadable, 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_invites_rebase_and_a_restarted_member_keeps_its_room() {
    let server_dir = tempfile::tempdir().unwrap();
    let server = Server::start(server_dir.path()).await;
    let dirs: Vec<tempfile::TempDir> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut alice = device(dirs[0].path(), 1, &server).await;
    let mut bob = device(dirs[1].path(), 2, &server).await;
    let carol = device(dirs[2].path(), 3, &server).await;
    let dave = device(dirs[3].path(), 4, &server).await;
    let room = alice.create_room().await.unwrap();
    alice.invite(room, &[bob.sender_id()]).await.unwrap();
    bob.join(room, Duration::from_secs(10)).await.unwrap();
    // Both commit at once: one wins epoch 2; the other is refused with
    // WrongEpoch (or sees the winner first), catches up and commits epoch 3.
    let (carol_id, dave_id) = ([carol.sender_id()], [dave.sender_id()]);
    let (by_alice, by_bob) = tokio::join!(alice.invite(room, &carol_id), bob.invite(room, &dave_id));
    let mut epochs = [by_alice.unwrap(), by_bob.unwrap()];
    epochs.sort_unstable();
    assert_eq!(epochs, [2, 3]);
    alice.sync(room).await.unwrap();
    assert_eq!(alice.rooms()[0].epoch, 3);
    assert_eq!(alice.rooms()[0].members.len(), 4);
    drop(alice);
    let mut alice = Client::open(dirs[0].path(), &key(1)).unwrap();
    assert_eq!(alice.rooms()[0].epoch, 3, "MLS state restored from the encrypted store");
    alice.connect().await.unwrap();
    let index = alice.send(room, b"still here").await.unwrap();
    bob.sync(room).await.unwrap();
    assert_eq!(texts(&bob, room).last().unwrap(), &(index, b"still here".to_vec()));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_member_reads_nothing_after_its_removal_and_a_leave_is_applied_by_the_next_commit() {
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
    alice.send(room, b"for everyone").await.unwrap();
    bob.sync(room).await.unwrap();
    bob.disconnect().await;

    assert_eq!(alice.remove(room, &[bob.sender_id()]).await.unwrap(), 2);
    alice.send(room, b"after bob left").await.unwrap();
    // Bob comes back with all of his old state and reads the log.
    bob.connect().await.unwrap();
    assert!(matches!(bob.sync(room).await, Err(ClientError::NotMember(_))));
    let bob_texts: Vec<Vec<u8>> = texts(&bob, room).into_iter().map(|(_, t)| t).collect();
    assert_eq!(bob_texts, vec![b"for everyone".to_vec()]);
    assert!(matches!(bob.send(room, b"still here?").await, Err(ClientError::NotMember(_))));
    assert!(bob.rooms().is_empty());

    // Carol leaves: a proposal; Alice's next commit (a key update) applies it.
    carol.leave(room).await.unwrap();
    assert_eq!(alice.self_update(room).await.unwrap(), 3);
    assert_eq!(alice.rooms()[0].members, vec![alice.sender_id()]);
    // Carol's device reads the commit that removed her, nothing after it.
    let read = carol.sync(room).await;
    assert!(matches!(read, Ok(_) | Err(ClientError::NotMember(_))), "{read:?}");
    assert!(matches!(carol.sync(room).await, Err(ClientError::NotMember(_))));
    assert!(carol.rooms().is_empty(), "Carol's device knows it is out");
    let error = alice.remove(room, &[carol.sender_id()]).await.unwrap_err();
    assert!(matches!(error, ClientError::UnknownMember(_)), "{error:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_joins_by_external_commit_and_reads_what_follows() {
    let server_dir = tempfile::tempdir().unwrap();
    let server = Server::start(server_dir.path()).await;
    let (alice_dir, erin_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut alice = device(alice_dir.path(), 1, &server).await;
    let mut erin = device(erin_dir.path(), 5, &server).await;
    let room = alice.create_room_with(kalandra_proto::payload::JoinRule::Open).await.unwrap();
    alice.send(room, b"before erin").await.unwrap();
    assert_eq!(erin.join_external(room).await.unwrap(), 1);
    let index = alice.send(room, b"welcome erin").await.unwrap();
    erin.sync(room).await.unwrap();
    assert_eq!(texts(&erin, room), vec![(index, b"welcome erin".to_vec())]);
    alice.sync(room).await.unwrap();
    assert_eq!(alice.rooms()[0].members.len(), 2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_welcome_survives_a_device_that_dies_before_reading_it() {
    let server_dir = tempfile::tempdir().unwrap();
    let server = Server::start(server_dir.path()).await;
    let (alice_dir, bob_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut alice = device(alice_dir.path(), 1, &server).await;
    let bob = device(bob_dir.path(), 2, &server).await;
    let room = alice.create_room().await.unwrap();
    // Bob is online: the server hands the Welcome to his connection at once.
    alice.invite(room, &[bob.sender_id()]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(bob); // dies without reading it
    let mut bob = Client::open(bob_dir.path(), &key(2)).unwrap();
    bob.connect().await.unwrap();
    assert_eq!(bob.join(room, Duration::from_secs(5)).await.unwrap(), 1);
    // Once Bob has read the room, the Welcome is gone from the server: a
    // later connection is not handed it again.
    bob.disconnect().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pending = server.pending_welcomes(bob.sender_id());
    assert_eq!(pending, 0, "the used Welcome was deleted");
    server.stop().await;
}
