//! The operator kicks members through the admin API. When every member of
//! a room is kicked nobody can commit the removals: each device sees its
//! own removal pending among the server's proposals, leaves the room, and
//! its commands in its other rooms keep working. When one member is
//! kicked and others remain, the kicked device commits nothing, a remaining
//! member's command commits the removal, and the kicked device leaves the
//! room when it learns of it.

mod common;

use std::path::Path;
use std::process::Output;

use common::{init_device, kalandra, ok, start_admin, Server};

const TOKEN: &str = common::ADMIN_TOKEN;

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// `room list` on `dir`: the line of `room`, if any.
async fn listed(dir: &Path, room: &str) -> Option<String> {
    ok(dir, &["room", "list"]).await.lines().find(|line| line.starts_with(room)).map(str::to_owned)
}

/// Runs a command that must succeed without naming any room as failed.
async fn clean(dir: &Path, args: &[&str]) -> String {
    let output = kalandra(dir, args).await;
    assert!(output.status.success(), "kalandra {args:?} ({:?}): {}", output.status.code(), stderr(&output));
    assert!(stderr(&output).is_empty(), "kalandra {args:?} reported: {}", stderr(&output));
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kicking_every_member_leaves_the_room_on_each_device_and_their_other_rooms_work() {
    let server_dir = tempfile::tempdir().unwrap();
    let server = Server::start(server_dir.path()).await;
    let operator = start_admin(&server, TOKEN, server_dir.path()).await;
    let (alice, bob) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (alice, bob) = (alice.path(), bob.path());
    let alice_id = init_device(alice, &server).await;
    let bob_id = init_device(bob, &server).await;
    let doomed = ok(alice, &["room", "create"]).await.trim().to_owned();
    let other = ok(alice, &["room", "create"]).await.trim().to_owned();
    for room in [&doomed, &other] {
        ok(alice, &["invite", "--room", room, &bob_id]).await;
        ok(bob, &["join", "--room", room]).await;
    }
    ok(bob, &["send", "--room", &doomed, "before the kicks"]).await;

    // The operator kicks both members of the room: two server Remove
    // proposals that no remaining member can ever commit.
    for member in [&alice_id, &bob_id] {
        operator.ok(&["kick", "--room", &doomed, member, "--reason", "closing the room"]).await;
    }

    // Each device's next command reads the proposals, leaves the room, and
    // does what it was asked in the other room, naming no failure.
    let alice_index = clean(alice, &["send", "--room", &other, "alice, after the kicks"]).await;
    let bob_index = clean(bob, &["send", "--room", &other, "bob, after the kicks"]).await;
    assert!(alice_index.trim().parse::<u64>().unwrap() < bob_index.trim().parse::<u64>().unwrap());
    for dir in [alice, bob] {
        assert_eq!(listed(dir, &doomed).await, Some(format!("{doomed}\tleft")));
        assert!(
            listed(dir, &other).await.unwrap().contains("\t2 members"),
            "{:?}",
            listed(dir, &other).await
        );
        let history = clean(dir, &["history", "--room", &other]).await;
        assert!(history.contains("\talice, after the kicks") && history.contains("\tbob, after the kicks"));
        // The left room's history stays on the device; it takes no message.
        let kept = clean(dir, &["history", "--room", &doomed, "--offline"]).await;
        assert!(kept.contains("\tbefore the kicks"), "{kept}");
        let refused = kalandra(dir, &["send", "--room", &doomed, "anyone?"]).await;
        assert_eq!(refused.status.code(), Some(5), "{}", stderr(&refused));
        // Commands keep working, the left room named nowhere.
        clean(dir, &["update", "--room", &other]).await;
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_kicked_member_commits_nothing_and_leaves_when_another_commits_the_removal() {
    let server_dir = tempfile::tempdir().unwrap();
    let server = Server::start(server_dir.path()).await;
    let operator = start_admin(&server, TOKEN, server_dir.path()).await;
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (alice, bob, carol) = (dirs[0].path(), dirs[1].path(), dirs[2].path());
    let _alice_id = init_device(alice, &server).await;
    let bob_id = init_device(bob, &server).await;
    let carol_id = init_device(carol, &server).await;
    let room = ok(alice, &["room", "create"]).await.trim().to_owned();
    let other = ok(alice, &["room", "create"]).await.trim().to_owned();
    for joined in [&room, &other] {
        ok(alice, &["invite", "--room", joined, &bob_id, &carol_id]).await;
        ok(bob, &["join", "--room", joined]).await;
        ok(carol, &["join", "--room", joined]).await;
    }

    operator.ok(&["kick", "--room", &room, &carol_id, "--reason", "spam"]).await;
    // Carol's device reads its own removal first: it commits nothing,
    // refuses to send there, and lists the removal as pending.
    let refused = kalandra(carol, &["send", "--room", &room, "still here?"]).await;
    assert_eq!(refused.status.code(), Some(5), "{}", stderr(&refused));
    assert!(stderr(&refused).contains("removal from room"), "{}", stderr(&refused));
    assert!(listed(carol, &room).await.unwrap().ends_with("\tremoval pending"));
    clean(carol, &["send", "--room", &other, "carol elsewhere"]).await;

    // Bob's next message commits the removal first.
    clean(bob, &["send", "--room", &room, "after carol"]).await;
    let history = clean(alice, &["history", "--room", &room]).await;
    assert!(history.contains(&format!("removed [{carol_id}]")), "{history}");
    assert!(history.contains("\tafter carol"));
    // Carol's device learns it on its next command and leaves the room.
    clean(carol, &["send", "--room", &other, "carol again"]).await;
    assert_eq!(listed(carol, &room).await, Some(format!("{room}\tleft")));
    assert!(!clean(carol, &["history", "--room", &other]).await.contains("after carol"));
    server.stop().await;
}
