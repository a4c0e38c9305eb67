//! The admin HTTP API against a real server: the operator manages rooms,
//! roles, kicks and bans; every error path answers its status and JSON
//! code; the route table, the router and the OpenAPI document agree; the
//! audit log detects edited, removed and reordered records, in the
//! database and in exports, through the API and the offline command.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;

use common::*;
use kalandra_proto::payload::{Ack, Kick, Proposal};
use kalandra_proto::{ErrorCode, Opcode, RoomId};
use kalandra_server::audit::{self, AuditExport, AuditRecord, AuditVerifyError};
use kalandra_server::store::redb::AUDIT_TABLE_NAME;
use kalandra_server::store::RedbStore;
use kalandra_server::{OPENAPI_JSON, ROUTES};

const ROOM: RoomId = RoomId(*b"admin-api-room-1");
const TOKEN: &str = ADMIN_TOKEN;
const READ_TOKEN: &str = ADMIN_READ_TOKEN;
const JSON: &str = "application/json";

async fn two_member_room(server: &TestServer) -> (TestClient, TestClient) {
    let mut alice = TestClient::connect(server, "alice", 1).await;
    let mut bob = TestClient::connect(server, "bob", 2).await;
    bob.upload_key_packages(2).await;
    alice.create_room(ROOM).await;
    alice.subscribe(1).await;
    alice.next_of(Opcode::SyncDone).await;
    decode_ok::<Ack>(&alice.add(&[bob.sender()]).await);
    bob.join_from_welcome(ROOM).await;
    bob.subscribe(2).await;
    bob.next_of(Opcode::SyncDone).await;
    (alice, bob)
}

async fn get(admin: SocketAddr, path: &str) -> HttpAnswer {
    http(admin, "GET", path, Some(TOKEN), None).await
}

async fn post(admin: SocketAddr, path: &str, body: &str) -> HttpAnswer {
    http(admin, "POST", path, Some(TOKEN), Some((JSON, body))).await
}

async fn delete(admin: SocketAddr, path: &str) -> HttpAnswer {
    http(admin, "DELETE", path, Some(TOKEN), None).await
}

fn ok(answer: &HttpAnswer) -> serde_json::Value {
    assert_eq!(answer.status, 200, "{}", answer.body);
    answer.json()
}

fn refused(answer: &HttpAnswer, status: u16, code: &str) {
    assert_eq!((answer.status, answer.code().as_str()), (status, code), "{}", answer.body);
    assert!(answer.json()["message"].is_string());
}

/// The paths and methods of the OpenAPI document.
fn documented_routes() -> BTreeSet<(String, String)> {
    let document: serde_json::Value = serde_json::from_str(OPENAPI_JSON).unwrap();
    assert!(document["openapi"].as_str().unwrap().starts_with("3."));
    let mut routes = BTreeSet::new();
    for (path, item) in document["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            routes.insert((method.to_ascii_uppercase(), path.clone()));
        }
    }
    routes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_is_served_and_documented_and_nothing_else() {
    let table: BTreeSet<(String, String)> =
        ROUTES.iter().map(|(method, path)| ((*method).to_owned(), (*path).to_owned())).collect();
    assert_eq!(table.len(), ROUTES.len(), "no route is listed twice");
    let documented = documented_routes();
    let missing: Vec<_> = table.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&table).collect();
    assert!(missing.is_empty(), "routes missing from the OpenAPI document: {missing:?}");
    assert!(extra.is_empty(), "documented routes the router lacks: {extra:?}");

    // Every route answers through its handler, not the router's fallback.
    let server = TestServer::start(default_limits()).await;
    let (alice, bob) = two_member_room(&server).await;
    let admin = server.admin_address();
    for (method, path) in ROUTES {
        let concrete = path
            .replace("{room_id}", &ROOM.to_string())
            .replace("{user_id}", &bob.sender().to_string())
            .replace("{role}", "moderator");
        let body = (*method == "POST").then_some((JSON, "{}"));
        let answer = http(admin, method, &concrete, Some(TOKEN), body).await;
        assert_ne!(answer.status, 405, "{method} {path}");
        if answer.status == 404 {
            assert_ne!(answer.code(), "not_found", "{method} {path} is not routed");
        }
    }
    // And anything else is not.
    refused(&get(admin, "/v1/nowhere").await, 404, "not_found");
    assert_eq!(http(admin, "PUT", "/v1/rooms", Some(TOKEN), None).await.status, 405);
    drop(alice);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_manages_a_room_through_the_api() {
    let server = TestServer::start(default_limits()).await;
    let (mut alice, mut bob) = two_member_room(&server).await;
    let admin = server.admin_address();
    let room = ROOM.to_string();
    let (alice_id, bob_id) = (alice.sender().to_string(), bob.sender().to_string());

    let rooms = ok(&http(admin, "GET", "/v1/rooms", Some(READ_TOKEN), None).await);
    assert_eq!(rooms["rooms"][0]["room_id"], room.as_str());
    assert_eq!(rooms["rooms"][0]["members"], 2);
    assert_eq!(rooms["next_after"], serde_json::Value::Null);
    let page = ok(&get(admin, "/v1/rooms?limit=1").await);
    assert_eq!(page["next_after"], room.as_str());
    assert!(ok(&get(admin, &format!("/v1/rooms?after={room}")).await)["rooms"]
        .as_array()
        .unwrap()
        .is_empty());

    let shown = ok(&get(admin, &format!("/v1/rooms/{room}")).await);
    assert_eq!((shown["creator"].as_str(), shown["epoch"].as_u64()), (Some(alice_id.as_str()), Some(1)));
    assert_eq!(shown["roles"][0]["role"], "admin");

    // Grant Bob the moderator role; he can then kick over the wire.
    let granted = ok(&post(
        admin,
        &format!("/v1/rooms/{room}/roles"),
        &format!(r#"{{"user_id":"{bob_id}","role":"moderator","reason":"helps out"}}"#),
    )
    .await);
    assert_eq!(granted["audit"]["action"], "grant_role");
    assert_eq!(granted["audit"]["actor_kind"], "operator");
    let members = ok(&get(admin, &format!("/v1/rooms/{room}/members")).await);
    let bob_entry = members["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["user_id"] == bob_id.as_str())
        .unwrap()
        .clone();
    assert_eq!(bob_entry["role"], "moderator");
    ok(&delete(admin, &format!("/v1/rooms/{room}/roles/{bob_id}/moderator")).await);
    let reply = bob.request(&Kick { target: alice.sender().0, reason: String::new() }).await;
    assert_eq!(error_code(&reply), ErrorCode::Forbidden.to_u16());

    // The operator kicks Bob (even the creator could be kicked by the operator).
    let kicked = ok(&post(
        admin,
        &format!("/v1/rooms/{room}/kick"),
        &format!(r#"{{"user_id":"{bob_id}","reason":"spam"}}"#),
    )
    .await);
    let log_index = kicked["log_index"].as_u64().unwrap();
    assert_eq!(kicked["audit"]["log_index"].as_u64(), Some(log_index));
    let members = ok(&get(admin, &format!("/v1/rooms/{room}/members")).await);
    assert!(members["members"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["user_id"] == bob_id.as_str() && m["removal_pending"] == true));
    let shown = ok(&get(admin, &format!("/v1/rooms/{room}")).await);
    assert_eq!(shown["pending_since_log_index"].as_u64(), Some(log_index));
    // Alice's client commits the removal.
    let proposal = alice.next_of(Opcode::Proposal).await;
    let payload: Proposal = proposal.decode_payload().unwrap();
    let group = alice.group.as_mut().unwrap();
    let outcome = group.process_handshake(&alice.provider, &payload.proposal).unwrap();
    let client_core::moderation::ServerProposalResponse::Commit(output) =
        client_core::moderation::commit_for_server_proposal(
            group,
            &alice.provider,
            &alice.identity,
            &outcome,
        )
        .unwrap()
    else {
        panic!("Alice commits");
    };
    let reply = alice.request(&client_core::moderation::commit_payload(&output)).await;
    alice.settle_commit(&reply);
    decode_ok::<Ack>(&reply);
    let shown = ok(&get(admin, &format!("/v1/rooms/{room}")).await);
    assert_eq!(
        (shown["member_count"].as_u64(), shown["server_proposals_pending"].as_u64()),
        (Some(1), Some(0))
    );

    // Ban and unban Bob, who is no longer a member: nothing is sequenced.
    let banned = ok(&post(
        admin,
        &format!("/v1/rooms/{room}/bans"),
        &format!(r#"{{"user_id":"{bob_id}","duration_ms":60000}}"#),
    )
    .await);
    assert_eq!(banned["log_index"], serde_json::Value::Null);
    assert!(banned["audit"]["until_ms"].as_u64().unwrap() > 60_000);
    let shown = ok(&get(admin, &format!("/v1/rooms/{room}")).await);
    assert_eq!(shown["bans"][0]["user_id"], bob_id.as_str());
    ok(&delete(admin, &format!("/v1/rooms/{room}/bans/{bob_id}")).await);

    // The audit log holds every act, chained, and verifies.
    let export: AuditExport = serde_json::from_str(&get(admin, "/v1/audit/export").await.body).unwrap();
    let actions: Vec<String> = export
        .records
        .iter()
        .map(|r| serde_json::to_value(r.action).unwrap().as_str().unwrap().to_owned())
        .collect();
    assert_eq!(actions, ["grant_role", "revoke_role", "kick", "ban", "unban"]);
    assert_eq!(audit::verify_export(&export).unwrap().records, 5);
    let page: AuditExport =
        serde_json::from_str(&get(admin, "/v1/audit/export?from=3&limit=1").await.body).unwrap();
    assert_eq!(page.records.iter().map(|r| r.seq).collect::<Vec<_>>(), [3]);
    let verified = ok(&http(admin, "GET", "/v1/audit/verify", Some(READ_TOKEN), None).await);
    assert_eq!((verified["valid"].as_bool(), verified["records"].as_u64()), (Some(true), Some(5)));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_path_answers_its_status_and_code() {
    let server = TestServer::start(default_limits()).await;
    let (_alice, bob) = two_member_room(&server).await;
    let admin = server.admin_address();
    let room = ROOM.to_string();
    let bob_id = bob.sender().to_string();
    let kick_bob = format!(r#"{{"user_id":"{bob_id}"}}"#);
    let kick_path = format!("/v1/rooms/{room}/kick");

    // 401: no token, a wrong one, another scheme.
    refused(&http(admin, "GET", "/v1/rooms", None, None).await, 401, "unauthorized");
    refused(&http(admin, "GET", "/v1/rooms", Some("not-the-token-at-all"), None).await, 401, "unauthorized");
    refused(
        &http(admin, "POST", &kick_path, Some("wrong-token-0000000000"), Some((JSON, &kick_bob))).await,
        401,
        "unauthorized",
    );
    // 401 comes before anything else is looked at.
    refused(&http(admin, "GET", "/v1/rooms/not-hex", None, None).await, 401, "unauthorized");

    // 403: the read-only token reads but changes nothing.
    ok(&http(admin, "GET", &format!("/v1/rooms/{room}/members"), Some(READ_TOKEN), None).await);
    let grant = format!(r#"{{"user_id":"{bob_id}","role":"moderator"}}"#);
    for (method, path, body) in [
        ("POST", kick_path.clone(), Some(kick_bob.as_str())),
        ("POST", format!("/v1/rooms/{room}/bans"), Some(kick_bob.as_str())),
        ("POST", format!("/v1/rooms/{room}/roles"), Some(grant.as_str())),
        ("DELETE", format!("/v1/rooms/{room}/bans/{bob_id}"), None),
        ("DELETE", format!("/v1/rooms/{room}/roles/{bob_id}/moderator"), None),
    ] {
        let answer = http(admin, method, &path, Some(READ_TOKEN), body.map(|b| (JSON, b))).await;
        refused(&answer, 403, "insufficient_scope");
    }

    // 400: malformed ids, bodies, roles, reasons and queries.
    refused(&get(admin, "/v1/rooms/not-hex").await, 400, "malformed_request");
    refused(&get(admin, "/v1/rooms/00ff").await, 400, "malformed_request");
    refused(&post(admin, &kick_path, r#"{"user_id":"xyz"}"#).await, 400, "malformed_request");
    refused(&post(admin, &kick_path, "{not json").await, 400, "malformed_request");
    refused(
        &post(admin, &kick_path, &format!(r#"{{"user_id":"{bob_id}","extra":1}}"#)).await,
        400,
        "malformed_request",
    );
    refused(
        &http(admin, "POST", &kick_path, Some(TOKEN), Some(("text/plain", &kick_bob))).await,
        400,
        "malformed_request",
    );
    let long = "x".repeat(kalandra_proto::limits::TEXT_BYTES_MAX + 1);
    refused(
        &post(admin, &kick_path, &format!(r#"{{"user_id":"{bob_id}","reason":"{long}"}}"#)).await,
        400,
        "malformed_request",
    );
    refused(
        &post(
            admin,
            &format!("/v1/rooms/{room}/roles"),
            &format!(r#"{{"user_id":"{bob_id}","role":"owner"}}"#),
        )
        .await,
        400,
        "malformed_request",
    );
    refused(
        &delete(admin, &format!("/v1/rooms/{room}/roles/{bob_id}/owner")).await,
        400,
        "malformed_request",
    );
    refused(&get(admin, "/v1/rooms?limit=many").await, 400, "malformed_request");
    refused(&get(admin, "/v1/rooms?limit=1000000").await, 400, "malformed_request");
    refused(&get(admin, "/v1/rooms?limit=1&limit=2").await, 400, "malformed_request");
    refused(&get(admin, "/v1/audit/export?from=-1").await, 400, "malformed_request");

    // 404: unknown rooms and members.
    let nowhere = RoomId([7; 16]).to_string();
    refused(&get(admin, &format!("/v1/rooms/{nowhere}")).await, 404, "unknown_room");
    refused(&get(admin, &format!("/v1/rooms/{nowhere}/members")).await, 404, "unknown_room");
    refused(&post(admin, &format!("/v1/rooms/{nowhere}/kick"), &kick_bob).await, 404, "unknown_room");
    refused(&post(admin, &format!("/v1/rooms/{nowhere}/bans"), &kick_bob).await, 404, "unknown_room");
    refused(&delete(admin, &format!("/v1/rooms/{nowhere}/bans/{bob_id}")).await, 404, "unknown_room");
    refused(&post(admin, &kick_path, r#"{"user_id":"00000000000000aa"}"#).await, 404, "unknown_member");

    // 409: the room's state does not allow the act.
    refused(&delete(admin, &format!("/v1/rooms/{room}/bans/{bob_id}")).await, 409, "not_banned");
    refused(
        &delete(admin, &format!("/v1/rooms/{room}/roles/{bob_id}/moderator")).await,
        409,
        "role_not_held",
    );
    ok(&post(admin, &format!("/v1/rooms/{room}/roles"), &grant).await);
    refused(&post(admin, &format!("/v1/rooms/{room}/roles"), &grant).await, 409, "role_held");
    let admin_role = format!(r#"{{"user_id":"{bob_id}","role":"admin"}}"#);
    refused(&post(admin, &format!("/v1/rooms/{room}/roles"), &admin_role).await, 409, "admin_role_fixed");
    ok(&post(admin, &kick_path, &kick_bob).await);
    refused(&post(admin, &kick_path, &kick_bob).await, 409, "removal_pending");

    // Refusals are not acts: the log holds the grant and the kick.
    let verified = ok(&get(admin, "/v1/audit/verify").await);
    assert_eq!(verified["records"].as_u64(), Some(2));
    server.stop().await;
}

/// The records of a redb database's audit table, as stored.
fn stored_records(path: &std::path::Path) -> Vec<(u64, Vec<u8>)> {
    use redb::{ReadableDatabase as _, ReadableTable as _};
    let db = redb::Database::open(path).unwrap();
    let txn = db.begin_read().unwrap();
    let table = txn.open_table(redb::TableDefinition::<u64, &[u8]>::new(AUDIT_TABLE_NAME)).unwrap();
    table
        .iter()
        .unwrap()
        .map(|item| {
            let (seq, bytes) = item.unwrap();
            (seq.value(), bytes.value().to_vec())
        })
        .collect()
}

/// Rewrites a database's audit table.
fn rewrite_records(path: &std::path::Path, records: &[(u64, Vec<u8>)]) {
    let db = redb::Database::open(path).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let mut table = txn.open_table(redb::TableDefinition::<u64, &[u8]>::new(AUDIT_TABLE_NAME)).unwrap();
        use redb::ReadableTable as _;
        let keys: Vec<u64> = table.iter().unwrap().map(|item| item.unwrap().0.value()).collect();
        for key in keys {
            table.remove(key).unwrap();
        }
        for (seq, bytes) in records {
            table.insert(*seq, bytes.as_slice()).unwrap();
        }
    }
    txn.commit().unwrap();
}

fn verify_database(path: &std::path::Path) -> Result<u64, AuditVerifyError> {
    let store = RedbStore::open(path).unwrap();
    kalandra_server::verify_store(&store).unwrap().map(|verified| verified.records)
}

/// Runs `kalandra-server audit verify` and returns its exit code.
fn verify_command(data_dir: &std::path::Path, file: Option<&std::path::Path>) -> i32 {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_kalandra-server"));
    command.arg("--data-dir").arg(data_dir).arg("audit").arg("verify");
    if let Some(file) = file {
        command.arg("--file").arg(file);
    }
    command.env_remove("KALANDRA_CONFIG");
    let output = command.output().unwrap();
    output.status.code().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edited_removed_and_reordered_audit_records_are_detected() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_in(dir.path(), default_limits()).await;
    let (_alice, bob) = two_member_room(&server).await;
    let admin = server.admin_address();
    let room = ROOM.to_string();
    let bob_id = bob.sender().to_string();
    for _ in 0..2 {
        ok(&post(
            admin,
            &format!("/v1/rooms/{room}/roles"),
            &format!(r#"{{"user_id":"{bob_id}","role":"moderator"}}"#),
        )
        .await);
        ok(&delete(admin, &format!("/v1/rooms/{room}/roles/{bob_id}/moderator")).await);
    }
    let export_text = get(admin, "/v1/audit/export").await.body;
    drop(bob);
    server.stop().await;

    // The database as written verifies, with the function and the command.
    let database = dir.path().join("kalandra.redb");
    assert_eq!(verify_database(&database), Ok(4));
    assert_eq!(verify_command(dir.path(), None), 0);
    let original = stored_records(&database);
    assert_eq!(original.len(), 4);

    // An edited record: Bob was never granted anything, says record 1.
    let mut edited = original.clone();
    let mut record = AuditRecord::decode(&edited[1].1).unwrap();
    record.reason = Some("edited".into());
    edited[1].1 = record.encode().unwrap();
    rewrite_records(&database, &edited);
    assert_eq!(verify_database(&database), Err(AuditVerifyError::BrokenChain { seq: 2 }));
    assert_eq!(verify_command(dir.path(), None), 1);
    // Editing the last record breaks the head instead.
    let mut edited = original.clone();
    let mut record = AuditRecord::decode(&edited[3].1).unwrap();
    record.target = Some(1);
    edited[3].1 = record.encode().unwrap();
    rewrite_records(&database, &edited);
    assert!(matches!(verify_database(&database), Err(AuditVerifyError::HeadMismatch { .. })));

    // A removed record.
    let mut removed = original.clone();
    removed.remove(2);
    rewrite_records(&database, &removed);
    assert_eq!(verify_database(&database), Err(AuditVerifyError::OutOfSequence { position: 2, found: 3 }));
    assert_eq!(verify_command(dir.path(), None), 1);

    // Reordered records, swapped under their keys.
    let mut reordered = original.clone();
    let (first, second) = (reordered[1].1.clone(), reordered[2].1.clone());
    reordered[1].1 = second;
    reordered[2].1 = first;
    rewrite_records(&database, &reordered);
    assert_eq!(verify_database(&database), Err(AuditVerifyError::OutOfSequence { position: 1, found: 2 }));
    assert_eq!(verify_command(dir.path(), None), 1);

    rewrite_records(&database, &original);
    assert_eq!(verify_database(&database), Ok(4));

    // The same in an export, checked by the command.
    let export: AuditExport = serde_json::from_str(&export_text).unwrap();
    let file = dir.path().join("export.json");
    let check = |export: &AuditExport| {
        std::fs::write(&file, serde_json::to_string(export).unwrap()).unwrap();
        (audit::verify_export(export).is_ok(), verify_command(dir.path(), Some(&file)))
    };
    assert_eq!(check(&export), (true, 0));
    let mut edited = export.clone();
    edited.records[0].time_ms += 1;
    assert_eq!(check(&edited), (false, 1));
    let mut removed = export.clone();
    removed.records.remove(1);
    assert_eq!(check(&removed), (false, 1));
    let mut reordered = export.clone();
    reordered.records.swap(0, 1);
    assert_eq!(check(&reordered), (false, 1));
}

async fn put(admin: SocketAddr, path: &str, body: &str) -> HttpAnswer {
    http(admin, "PUT", path, Some(TOKEN), Some((JSON, body))).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_redacts_entries_and_sets_retention_through_the_api() {
    let server = TestServer::start(default_limits()).await;
    let (mut alice, mut bob) = two_member_room(&server).await;
    let admin = server.admin_address();
    let room = ROOM.to_string();
    let sent: Ack = decode_ok(&bob.send_text("something to take back").await);
    let redact_path = format!("/v1/rooms/{room}/redact");

    let body = format!(r#"{{"log_index":{},"reason":"reported"}}"#, sent.log_index);
    let done = ok(&post(admin, &redact_path, &body).await);
    assert_eq!(
        (done["log_index"].as_u64(), done["outcome"].as_str()),
        (Some(sent.log_index), Some("erased"))
    );
    assert_eq!(done["audit"]["action"], "redact");
    assert_eq!(done["audit"]["actor_kind"], "operator");
    assert_eq!(done["audit"]["room"], room.as_str());
    assert_eq!(done["audit"]["log_index"].as_u64(), Some(sent.log_index));
    assert_eq!(done["audit"]["target"].as_str(), Some(format!("{:016x}", bob.sender().0).as_str()));
    assert_eq!(done["audit"]["reason"], "reported");
    assert!(server.store.data_key(ROOM, sent.log_index).unwrap().is_none(), "the data key is gone");
    // History carries the placeholder at the index.
    let history = alice.subscribe(sent.log_index).await;
    let mut placeholder = history;
    while placeholder.header().log_index() != sent.log_index || placeholder.opcode() != Opcode::Error {
        placeholder = alice.next_of(Opcode::Error).await;
    }
    assert_eq!(error_code(&placeholder), ErrorCode::Redacted.to_u16());
    // Again: idempotent, nothing done, nothing recorded.
    let again = ok(&post(admin, &redact_path, &body).await);
    assert_eq!(again["outcome"], "already_erased");
    assert_eq!(again["erased_at_ms"], done["erased_at_ms"]);
    assert_eq!(again["audit"], serde_json::Value::Null);

    // Retention: none, set, changed, read with the read-only token, cleared.
    let retention_path = format!("/v1/rooms/{room}/retention");
    let none = ok(&get(admin, &retention_path).await);
    assert_eq!(
        (none["retention_ms"].clone(), none["audit"].clone()),
        (serde_json::Value::Null, serde_json::Value::Null)
    );
    let set = ok(&put(admin, &retention_path, r#"{"retention_ms":86400000}"#).await);
    assert_eq!(set["retention_ms"].as_u64(), Some(86_400_000));
    assert_eq!(set["swept_next_log_index"].as_u64(), Some(0));
    assert_eq!(set["audit"]["action"], "set_retention");
    assert_eq!(set["audit"]["retention_ms"].as_u64(), Some(86_400_000));
    ok(&put(admin, &retention_path, r#"{"retention_ms":3600000}"#).await);
    let shown = ok(&http(admin, "GET", &retention_path, Some(READ_TOKEN), None).await);
    assert_eq!(shown["retention_ms"].as_u64(), Some(3_600_000));
    assert_eq!(server.node.retention(ROOM).await.unwrap().map(|r| r.retention_ms), Some(3_600_000));
    let cleared = ok(&delete(admin, &retention_path).await);
    assert_eq!(cleared["retention_ms"], serde_json::Value::Null);
    assert_eq!(cleared["audit"]["action"], "clear_retention");
    assert_eq!(server.node.retention(ROOM).await.unwrap(), None);

    // Each change is in the chained audit log, in order.
    let export: AuditExport = serde_json::from_str(&get(admin, "/v1/audit/export").await.body).unwrap();
    let actions: Vec<String> = export
        .records
        .iter()
        .map(|r| serde_json::to_value(r.action).unwrap().as_str().unwrap().to_owned())
        .collect();
    assert_eq!(actions, ["redact", "set_retention", "set_retention", "clear_retention"]);
    assert_eq!(export.records[2].retention_ms, Some(3_600_000));
    assert_eq!(audit::verify_export(&export).unwrap().records, 4);
    let verified = ok(&get(admin, "/v1/audit/verify").await);
    assert_eq!((verified["valid"].as_bool(), verified["records"].as_u64()), (Some(true), Some(4)));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redaction_and_retention_errors_answer_their_status_and_code() {
    let server = TestServer::start(default_limits()).await;
    let (_alice, mut bob) = two_member_room(&server).await;
    let admin = server.admin_address();
    let room = ROOM.to_string();
    let sent: Ack = decode_ok(&bob.send_text("stays").await);
    let redact_path = format!("/v1/rooms/{room}/redact");
    let retention_path = format!("/v1/rooms/{room}/retention");
    let redact_body = format!(r#"{{"log_index":{}}}"#, sent.log_index);
    let day = r#"{"retention_ms":86400000}"#;

    // 401: no token or a wrong one.
    refused(&http(admin, "POST", &redact_path, None, Some((JSON, &redact_body))).await, 401, "unauthorized");
    refused(&http(admin, "GET", &retention_path, None, None).await, 401, "unauthorized");
    refused(
        &http(admin, "PUT", &retention_path, Some("wrong-token-0000000000"), Some((JSON, day))).await,
        401,
        "unauthorized",
    );
    // 403: the read-only token reads the retention but changes nothing.
    ok(&http(admin, "GET", &retention_path, Some(READ_TOKEN), None).await);
    for (method, path, body) in [
        ("POST", &redact_path, Some(redact_body.as_str())),
        ("PUT", &retention_path, Some(day)),
        ("DELETE", &retention_path, None),
    ] {
        let answer = http(admin, method, path, Some(READ_TOKEN), body.map(|b| (JSON, b))).await;
        refused(&answer, 403, "insufficient_scope");
    }
    // 400: ids, bodies, reasons and periods.
    refused(&post(admin, "/v1/rooms/not-hex/redact", &redact_body).await, 400, "malformed_request");
    refused(&get(admin, "/v1/rooms/00ff/retention").await, 400, "malformed_request");
    refused(&post(admin, &redact_path, "{}").await, 400, "malformed_request");
    refused(&post(admin, &redact_path, r#"{"log_index":-1}"#).await, 400, "malformed_request");
    refused(&post(admin, &redact_path, r#"{"log_index":2,"extra":1}"#).await, 400, "malformed_request");
    refused(
        &http(admin, "POST", &redact_path, Some(TOKEN), Some(("text/plain", &redact_body))).await,
        400,
        "malformed_request",
    );
    let long = "x".repeat(kalandra_proto::limits::TEXT_BYTES_MAX + 1);
    refused(
        &post(admin, &redact_path, &format!(r#"{{"log_index":2,"reason":"{long}"}}"#)).await,
        400,
        "malformed_request",
    );
    refused(&put(admin, &retention_path, r#"{"retention_ms":"a day"}"#).await, 400, "malformed_request");
    refused(&put(admin, &retention_path, r#"{"retention_ms":1}"#).await, 400, "malformed_request");
    refused(&http(admin, "PUT", &retention_path, Some(TOKEN), None).await, 400, "malformed_request");
    // 404: unknown rooms and indices.
    let nowhere = RoomId([7; 16]).to_string();
    refused(&post(admin, &format!("/v1/rooms/{nowhere}/redact"), &redact_body).await, 404, "unknown_room");
    for (method, body) in [("GET", None), ("PUT", Some(day)), ("DELETE", None)] {
        let answer = http(
            admin,
            method,
            &format!("/v1/rooms/{nowhere}/retention"),
            Some(TOKEN),
            body.map(|b| (JSON, b)),
        )
        .await;
        refused(&answer, 404, "unknown_room");
    }
    refused(&post(admin, &redact_path, r#"{"log_index":99}"#).await, 404, "unknown_log_index");
    // 409: handshake frames (the CreateRoom at 0, the commit at 1) are never erased.
    for index in [0, 1] {
        let answer = post(admin, &redact_path, &format!(r#"{{"log_index":{index}}}"#)).await;
        refused(&answer, 409, "not_erasable");
    }

    // Refusals erase nothing and record nothing.
    assert!(server.store.data_key(ROOM, sent.log_index).unwrap().is_some());
    assert_eq!(server.node.retention(ROOM).await.unwrap(), None);
    let verified = ok(&get(admin, "/v1/audit/verify").await);
    assert_eq!(verified["records"].as_u64(), Some(0));
    server.stop().await;
}
