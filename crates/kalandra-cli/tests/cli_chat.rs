//! Two and three people chatting through a real server with the `kalandra`
//! command, as the README shows.

mod common;

use common::{kalandra, ok, Server};

async fn init(dir: &std::path::Path, server: &Server) -> String {
    let address = server.address.to_string();
    let id = ok(dir, &["init", "--server", &address, "--fingerprint", &server.fingerprint_hex]).await;
    id.trim().to_owned()
}

fn texts(history: &str) -> Vec<String> {
    history.lines().filter(|line| !line.contains("\t* ")).map(str::to_owned).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_people_chat_end_to_end_with_the_cli() {
    let server_dir = tempfile::tempdir().unwrap();
    let server = Server::start(server_dir.path()).await;
    let alice = tempfile::tempdir().unwrap();
    let bob = tempfile::tempdir().unwrap();
    let _alice_id = init(alice.path(), &server).await;
    let bob_id = init(bob.path(), &server).await;
    assert_eq!(ok(bob.path(), &["whoami"]).await.trim(), bob_id);

    let room = ok(alice.path(), &["room", "create"]).await.trim().to_owned();
    assert_eq!(room.len(), 32, "{room}");
    assert_eq!(ok(alice.path(), &["invite", "--room", &room, &bob_id]).await.trim(), "epoch 1");
    assert!(ok(bob.path(), &["join", "--room", &room]).await.contains("epoch 1"));

    ok(alice.path(), &["send", "--room", &room, "hello bob"]).await;
    ok(bob.path(), &["send", "--room", &room, "hi alice"]).await;
    ok(alice.path(), &["send", "--room", &room, "how are you?"]).await;

    let alice_history = texts(&ok(alice.path(), &["history", "--room", &room]).await);
    let bob_history = texts(&ok(bob.path(), &["history", "--room", &room]).await);
    assert_eq!(alice_history.len(), 3, "{alice_history:?}");
    assert_eq!(alice_history, bob_history, "one order for both");
    assert!(alice_history[0].ends_with("\thello bob"));
    assert!(alice_history[1].ends_with(&format!("{bob_id}\thi alice")));
    assert!(alice_history[2].ends_with("\thow are you?"));

    // Live: Bob tails while Alice sends.
    let tail = {
        let bob = bob.path().to_owned();
        let room = room.clone();
        tokio::spawn(async move {
            kalandra(&bob, &["tail", "--room", &room, "--count", "1", "--for-ms", "20000"]).await
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    ok(alice.path(), &["send", "--room", &room, "live one"]).await;
    let tailed = tail.await.unwrap();
    assert!(tailed.status.success(), "{}", String::from_utf8_lossy(&tailed.stderr));
    assert!(String::from_utf8_lossy(&tailed.stdout).contains("\tlive one"), "{tailed:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_people_see_one_order_and_a_late_joiner_reads_from_its_join() {
    let server_dir = tempfile::tempdir().unwrap();
    let server = Server::start(server_dir.path()).await;
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut ids = Vec::new();
    for dir in &dirs {
        ids.push(init(dir.path(), &server).await);
    }
    let room = ok(dirs[0].path(), &["room", "create"]).await.trim().to_owned();
    ok(dirs[0].path(), &["invite", "--room", &room, &ids[1]]).await;
    ok(dirs[1].path(), &["join", "--room", &room]).await;
    ok(dirs[1].path(), &["send", "--room", &room, "before carol"]).await;
    // Bob invites Carol: Alice's device learns of the new epoch from the log.
    assert_eq!(ok(dirs[1].path(), &["invite", "--room", &room, &ids[2]]).await.trim(), "epoch 2");
    ok(dirs[2].path(), &["join", "--room", &room]).await;
    for (i, dir) in dirs.iter().enumerate() {
        ok(dir.path(), &["send", "--room", &room, &format!("from {i}")]).await;
    }
    let histories: Vec<Vec<String>> = {
        let mut all = Vec::new();
        for dir in &dirs {
            all.push(texts(&ok(dir.path(), &["history", "--room", &room]).await));
        }
        all
    };
    assert_eq!(histories[0], histories[1]);
    assert_eq!(histories[0].len(), 4, "{:?}", histories[0]);
    // Carol joined after "before carol": she has exactly the three later messages, in the same order.
    assert_eq!(histories[2], histories[0][1..].to_vec());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_failure_is_a_clear_error_with_its_exit_code() {
    let server_dir = tempfile::tempdir().unwrap();
    let server = Server::start(server_dir.path()).await;
    let alice = tempfile::tempdir().unwrap();
    let bob = tempfile::tempdir().unwrap();
    init(alice.path(), &server).await;
    let bob_id = init(bob.path(), &server).await;

    // Not initialised.
    let nowhere = tempfile::tempdir().unwrap();
    let output = kalandra(nowhere.path(), &["room", "create"]).await;
    assert_eq!(output.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&output.stderr).contains("run `init` first"));
    // Unknown room and malformed ids.
    let unknown = "00112233445566778899aabbccddeeff";
    let output = kalandra(alice.path(), &["send", "--room", unknown, "x"]).await;
    assert_eq!(output.status.code(), Some(5), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("unknown to this device"));
    let output = kalandra(alice.path(), &["send", "--room", "xyz", "x"]).await;
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("not hex"));
    // No invitation.
    let output = kalandra(bob.path(), &["join", "--room", unknown, "--wait-ms", "300"]).await;
    assert_eq!(output.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&output.stderr).contains("no invitation"));
    // A user without key packages (never initialised against this server).
    let room = ok(alice.path(), &["room", "create"]).await.trim().to_owned();
    let output = kalandra(alice.path(), &["invite", "--room", &room, "0123456789abcdef"]).await;
    assert_eq!(output.status.code(), Some(4), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("no key package"));
    // Joining a room without being a member: the server's GroupInfo is public
    // only to external joins; sending needs membership first.
    let output = kalandra(bob.path(), &["send", "--room", &room, "x"]).await;
    assert_eq!(output.status.code(), Some(5));
    ok(alice.path(), &["invite", "--room", &room, &bob_id]).await;
    ok(bob.path(), &["join", "--room", &room]).await;
    // Server unreachable.
    server.stop().await;
    let output = kalandra(alice.path(), &["--timeout-secs", "2", "send", "--room", &room, "lost?"]).await;
    assert_eq!(output.status.code(), Some(3), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot reach the server"), "{output:?}");
}
