//! `kalandra admin …` against a real server and its admin API: the operator
//! lists rooms and members, grants and revokes a role, kicks and bans a
//! member, redacts an entry and sets a room's retention, exports and
//! verifies the audit log, and shows the federation identity; refusals exit with the documented codes.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Output;

use common::{ok, start_admin, Server};

const TOKEN: &str = common::ADMIN_TOKEN;

/// Runs `kalandra admin --url <admin> --token-file <file> <args>`.
async fn admin(admin: SocketAddr, token_file: &Path, args: &[&str]) -> Output {
    common::admin_at(admin, token_file, args).await
}

async fn admin_ok(address: SocketAddr, token_file: &Path, args: &[&str]) -> serde_json::Value {
    common::admin_ok_at(address, token_file, args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_moderates_with_kalandra_admin() {
    let server_dir = tempfile::tempdir().unwrap();
    let server = Server::start(server_dir.path()).await;
    let operator = start_admin(&server, TOKEN, server_dir.path()).await;
    let (address, token_file) = (operator.address, operator.token_file.clone());

    // Alice creates a room and invites Bob and Carol with the client commands.
    let (alice, bob, carol) =
        (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let init = |dir: std::path::PathBuf| {
        let server_address = server.address.to_string();
        let fingerprint = server.fingerprint_hex.clone();
        async move {
            ok(&dir, &["init", "--server", &server_address, "--fingerprint", &fingerprint])
                .await
                .trim()
                .to_owned()
        }
    };
    let _alice_id = init(alice.path().to_owned()).await;
    let bob_id = init(bob.path().to_owned()).await;
    let carol_id = init(carol.path().to_owned()).await;
    let room = ok(alice.path(), &["room", "create"]).await.trim().to_owned();
    ok(alice.path(), &["invite", "--room", &room, &bob_id, &carol_id]).await;
    ok(bob.path(), &["join", "--room", &room]).await;

    let federation = admin_ok(address, &token_file, &["federation"]).await;
    assert_eq!(federation["domain"], "localhost");
    assert_eq!(federation["public_key"].as_str().map(str::len), Some(64));
    assert_eq!(federation["peers"], serde_json::json!([]));

    let rooms = admin_ok(address, &token_file, &["rooms"]).await;
    assert_eq!(rooms["rooms"][0]["room_id"], room.as_str());
    assert_eq!(rooms["rooms"][0]["members"], 3);
    let shown = admin_ok(address, &token_file, &["rooms", "--room", &room]).await;
    assert_eq!(shown["roles"][0]["role"], "admin");

    let granted =
        admin_ok(address, &token_file, &["grant", "--room", &room, &bob_id, "--reason", "helps"]).await;
    assert_eq!(granted["audit"]["action"], "grant_role");
    let members = admin_ok(address, &token_file, &["members", "--room", &room]).await;
    let bob_entry = members["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["user_id"] == bob_id.as_str())
        .unwrap()
        .clone();
    assert_eq!(bob_entry["role"], "moderator");
    admin_ok(address, &token_file, &["revoke", "--room", &room, &bob_id]).await;

    // Bob's message is redacted.
    ok(bob.path(), &["send", "--room", &room, "regrettable"]).await;
    let shown = admin_ok(address, &token_file, &["rooms", "--room", &room]).await;
    let index = (shown["next_log_index"].as_u64().unwrap() - 1).to_string();
    let redacted =
        admin_ok(address, &token_file, &["redact", "--room", &room, &index, "--reason", "reported"]).await;
    assert_eq!(
        (redacted["outcome"].as_str(), redacted["audit"]["action"].as_str()),
        (Some("erased"), Some("redact"))
    );
    let again = admin_ok(address, &token_file, &["redact", "--room", &room, &index]).await;
    assert_eq!(again["outcome"], "already_erased");
    let room_id = kalandra_proto::RoomId(hex::decode(&room).unwrap().try_into().unwrap());
    let erased_index: u64 = index.parse().unwrap();
    assert!(server.node().store().data_key(room_id, erased_index).unwrap().is_none(), "the key is gone");
    // The CreateRoom frame is never erased: exit 4; an index beyond the log: exit 5.
    let handshake = admin(address, &token_file, &["redact", "--room", &room, "0"]).await;
    assert_eq!(handshake.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&handshake.stderr).contains("not_erasable"));
    let beyond = admin(address, &token_file, &["redact", "--room", &room, "9999"]).await;
    assert_eq!(beyond.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&beyond.stderr).contains("unknown_log_index"));

    // Retention: set, read, refused below the minimum, cleared.
    let set = admin_ok(address, &token_file, &["retention", "--room", &room, "set", "86400000"]).await;
    assert_eq!(set["audit"]["action"], "set_retention");
    let shown = admin_ok(address, &token_file, &["retention", "--room", &room, "get"]).await;
    assert_eq!(shown["retention_ms"].as_u64(), Some(86_400_000));
    let short = admin(address, &token_file, &["retention", "--room", &room, "set", "1"]).await;
    assert_eq!(short.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&short.stderr).contains("malformed_request"));
    let elsewhere = admin(address, &token_file, &["retention", "--room", &"07".repeat(16), "get"]).await;
    assert_eq!(elsewhere.status.code(), Some(5));
    let cleared = admin_ok(address, &token_file, &["retention", "--room", &room, "clear"]).await;
    assert_eq!(
        (cleared["retention_ms"].clone(), cleared["audit"]["action"].clone()),
        (serde_json::Value::Null, "clear_retention".into())
    );

    let kicked =
        admin_ok(address, &token_file, &["kick", "--room", &room, &carol_id, "--reason", "spam"]).await;
    assert!(kicked["log_index"].as_u64().is_some());
    // A second kick before anyone commits is refused: exit 4.
    let again = admin(address, &token_file, &["kick", "--room", &room, &carol_id]).await;
    assert_eq!(again.status.code(), Some(4), "{}", String::from_utf8_lossy(&again.stderr));
    assert!(String::from_utf8_lossy(&again.stderr).contains("removal_pending"));

    let stranger = "00000000000000aa";
    let banned =
        admin_ok(address, &token_file, &["ban", "--room", &room, stranger, "--duration-ms", "60000"]).await;
    assert_eq!(banned["audit"]["action"], "ban");
    admin_ok(address, &token_file, &["unban", "--room", &room, stranger]).await;
    let not_banned = admin(address, &token_file, &["unban", "--room", &room, stranger]).await;
    assert_eq!(not_banned.status.code(), Some(4));

    // Unknown room: exit 5. Wrong token: exit 4. Nothing listening: exit 3.
    let nowhere = "07".repeat(16);
    assert_eq!(admin(address, &token_file, &["members", "--room", &nowhere]).await.status.code(), Some(5));
    let wrong = server_dir.path().join("wrong-token");
    std::fs::write(&wrong, "not-the-operator-token").unwrap();
    assert_eq!(admin(address, &wrong, &["rooms"]).await.status.code(), Some(4));
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    assert_eq!(admin(closed, &token_file, &["rooms"]).await.status.code(), Some(3));

    let export = admin_ok(address, &token_file, &["audit", "export"]).await;
    let actions: Vec<&str> =
        export["records"].as_array().unwrap().iter().map(|r| r["action"].as_str().unwrap()).collect();
    assert_eq!(
        actions,
        ["grant_role", "revoke_role", "redact", "set_retention", "clear_retention", "kick", "ban", "unban"]
    );
    let verified = admin_ok(address, &token_file, &["audit", "verify"]).await;
    assert_eq!((verified["valid"].as_bool(), verified["records"].as_u64()), (Some(true), Some(8)));
    server.stop().await;
}
