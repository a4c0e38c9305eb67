//! client-core's `Client` and its key cache file against a real server: a
//! push sent to a member who is not connected is forwarded by the server and
//! opened from that member's key cache file alone (the NSE path), and the
//! file follows the room's epochs, keeping the previous one.

mod common;

use std::sync::Arc;
use std::time::Duration;

use client_core::client::{Client, KEY_CACHE_FILE_NAME};
use client_core::push::{decrypt_push_file, read_key_cache_file, KeyCacheFileError, KeyCacheView, PushError};
use common::{device, key, Server};
use kalandra_server::{MemoryPushSink, PushNotification};

fn epochs(path: &std::path::Path) -> Vec<u64> {
    let bytes = read_key_cache_file(path).unwrap();
    KeyCacheView::parse(&bytes).unwrap().entries().map(|(_, epoch)| epoch).collect()
}

/// Waits for the server's push worker to hand over `count` notifications.
async fn pushes(sink: &MemoryPushSink, count: usize) -> Vec<PushNotification> {
    let mut taken = Vec::new();
    for _ in 0..200 {
        taken.extend(sink.take());
        if taken.len() >= count {
            return taken;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{} of {count} pushes arrived", taken.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_to_an_offline_member_opens_from_its_key_cache_file_across_epochs() {
    let server_dir = tempfile::tempdir().unwrap();
    let sink = Arc::new(MemoryPushSink::default());
    let server = Server::start_with_push(server_dir.path(), Some(sink.clone())).await;
    let (alice_dir, bob_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut alice = device(alice_dir.path(), 1, &server).await;
    let mut bob = device(bob_dir.path(), 2, &server).await;
    let alice_cache = alice_dir.path().join(KEY_CACHE_FILE_NAME);
    let bob_cache = bob.key_cache_path().to_owned();
    assert_eq!(epochs(&bob_cache), Vec::<u64>::new(), "written at init, empty");

    let room = alice.create_room().await.unwrap();
    assert_eq!(epochs(&alice_cache), [0]);
    alice.invite(room, &[bob.sender_id()]).await.unwrap();
    assert_eq!(epochs(&alice_cache), [0, 1], "the previous epoch is kept");
    bob.join(room, Duration::from_secs(10)).await.unwrap();
    assert_eq!(epochs(&bob_cache), [1]);
    assert_eq!(alice.export_key_cache().as_bytes(), read_key_cache_file(&alice_cache).unwrap());

    bob.disconnect().await;
    alice.send_with_push(room, b"the message", b"alice: the message").await.unwrap();
    let delivered = pushes(&sink, 1).await;
    assert_eq!(delivered.len(), 1, "only the member without a connection gets a push");
    assert_eq!(delivered[0].recipient, bob.sender_id());
    let opened = decrypt_push_file(&bob_cache, &delivered[0].payload).unwrap();
    assert_eq!(
        (opened.room_id, opened.epoch, opened.plaintext.as_slice()),
        (room, 1, &b"alice: the message"[..])
    );

    // Alice moves the room on; Bob's NSE still has the old file (one epoch
    // behind): a push of the new epoch is a typed miss, not a failure.
    alice.self_update(room).await.unwrap();
    assert_eq!(epochs(&alice_cache), [1, 2]);
    alice.send_with_push(room, b"second", b"alice: second").await.unwrap();
    let second = pushes(&sink, 1).await;
    assert!(matches!(
        decrypt_push_file(&bob_cache, &second[0].payload),
        Err(KeyCacheFileError::Push(PushError::UnknownRoomOrEpoch { epoch: 2, .. }))
    ));
    // Alice's own cache (current and previous epoch) opens both pushes.
    assert_eq!(decrypt_push_file(&alice_cache, &delivered[0].payload).unwrap().epoch, 1);
    assert_eq!(decrypt_push_file(&alice_cache, &second[0].payload).unwrap().epoch, 2);

    // Bob comes back: his cache follows, keeping epoch 1 for late pushes.
    drop(bob);
    let mut bob = Client::open(bob_dir.path(), &key(2)).unwrap();
    bob.set_server(server.target()).unwrap();
    bob.connect().await.unwrap();
    assert_eq!(epochs(&bob_cache), [1, 2]);
    assert_eq!(decrypt_push_file(&bob_cache, &delivered[0].payload).unwrap().epoch, 1);
    assert_eq!(decrypt_push_file(&bob_cache, &second[0].payload).unwrap().plaintext, b"alice: second");

    // Moved (as into an app group container): written there at once.
    let moved = bob_dir.path().join("shared").join("keys");
    std::fs::create_dir_all(moved.parent().unwrap()).unwrap();
    bob.set_key_cache_path(&moved).unwrap();
    assert_eq!(epochs(&moved), [1, 2]);
    assert!(!bob_cache.exists(), "the old file is removed");
    // After a restart the device reads its default path (now empty), so the
    // host sets the path again: the previous epoch's key comes back from there.
    drop(bob);
    let mut bob = Client::open(bob_dir.path(), &key(2)).unwrap();
    bob.set_key_cache_path(&moved).unwrap();
    assert_eq!(epochs(&moved), [1, 2], "epoch 1 survived in the moved file");
    assert_eq!(decrypt_push_file(&moved, &delivered[0].payload).unwrap().epoch, 1);
    // The room moves on: the cache keeps its two newest epochs.
    bob.set_server(server.target()).unwrap();
    bob.connect().await.unwrap();
    alice.self_update(room).await.unwrap();
    bob.sync(room).await.unwrap();
    assert_eq!(epochs(&moved), [2, 3]);
    let too_long = vec![0u8; client_core::push::PUSH_PLAINTEXT_BYTES_MAX + 1];
    assert!(alice.send_with_push(room, b"x", &too_long).await.is_err());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_sync_settles_rooms_within_its_budget_and_reports_the_rest() {
    let server_dir = tempfile::tempdir().unwrap();
    let server = Server::start(server_dir.path()).await;
    let (alice_dir, bob_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut alice = device(alice_dir.path(), 1, &server).await;
    let mut bob = device(bob_dir.path(), 2, &server).await;
    let quiet = alice.create_room().await.unwrap();
    let busy = alice.create_room().await.unwrap();
    for room in [quiet, busy] {
        alice.invite(room, &[bob.sender_id()]).await.unwrap();
        bob.join(room, Duration::from_secs(10)).await.unwrap();
    }
    drop(bob);
    alice.send(busy, b"while bob was away").await.unwrap();
    alice.self_update(busy).await.unwrap();

    let mut bob = Client::open(bob_dir.path(), &key(2)).unwrap();
    bob.set_server(server.target()).unwrap();
    // No budget: connected, nothing read, everything reported as left.
    let nothing = bob.background_sync(Duration::ZERO).await.unwrap();
    assert!(nothing.rooms_synced.is_empty() && nothing.budget_exhausted);
    let mut left = nothing.rooms_left.clone();
    left.sort();
    let mut both = vec![quiet, busy];
    both.sort();
    assert_eq!(left, both);
    assert_eq!(epochs(bob.key_cache_path()), [1, 1], "no room was read");

    let done = bob.background_sync(Duration::from_secs(30)).await.unwrap();
    assert!(done.is_complete() && !done.budget_exhausted, "{done:?}");
    assert_eq!(done.rooms_synced.len(), 2);
    let summary = bob.rooms().into_iter().find(|room| room.room_id == busy).unwrap();
    assert_eq!(summary.epoch, 2, "the commit was applied");
    let mut cached = epochs(bob.key_cache_path());
    cached.sort();
    assert_eq!(cached, [1, 1, 2], "and the key cache follows (busy keeps epoch 1 too)");
    let texts: Vec<_> = bob.history(busy, 0, 100).unwrap().into_iter().map(|m| m.body).collect();
    assert!(texts.contains(&client_core::client::MessageBody::Text(b"while bob was away".to_vec())));
    server.stop().await;
}
