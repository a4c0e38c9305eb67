//! Writes `docs/session-vectors.json`: an authentication transcript, the
//! sender-key derivation and encryption of §6.1 with every intermediate
//! value, and a room's first steps (`CreateRoom`, then a `Commit` adding a
//! member, each as sent, as sequenced and acknowledged, and the `Welcome`
//! the new member receives), from fixed inputs. `tests/session_vectors.rs`
//! recomputes them from the spec's formulas and checks client-core against
//! them.
//!
//! `cargo run -p client-core --example session_vectors > docs/session-vectors.json`
#![allow(missing_docs)]

use chacha20poly1305::aead::{Aead as _, KeyInit as _, Payload as AeadPayload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use client_core::mls::{generate_key_packages, Identity, MlsProvider, RoomGroup};
use client_core::sender_keys::{associated_data, seal_application, SenderKeyState};
use ed25519_dalek::SigningKey;
use hkdf::Hkdf;
use kalandra_proto::federation::{DomainName, HomeCertificate};
use kalandra_proto::home::MEMBER_HOME_CERTIFICATE_VALIDITY_MS;
use kalandra_proto::payload::{Ack, AuthChallenge, AuthOk, AuthResponse, Commit, CreateRoom, Hello, Welcome};
use kalandra_proto::sign::sign_auth_challenge;
use kalandra_proto::{Frame, FrameHeaderBuf, Payload, RoomId, SenderId};
use serde_json::{json, Value};
use sha2::Sha256;

const CLIENT_SEED: [u8; 32] = [0x11; 32];
const SERVER_KEY_SEED: [u8; 32] = [0x22; 32];
const NONCE: [u8; 32] = [0x33; 32];
/// The server's domain and the seed of its federation key (which signs
/// the client's home certificate in `AuthOk`).
const HOME_DOMAIN: &str = "a.example.org";
const HOME_DOMAIN_KEY_SEED: [u8; 32] = [0x88; 32];
const SERVER_TIME_MS: u64 = 1_767_225_600_000;
const ROOM: [u8; 16] = *b"kalandra-room-01";
const EPOCH: u64 = 3;
const EPOCH_SECRET: [u8; 32] = [0x44; 32];
const SENDER_LEAF: u32 = 1;
const RECEIVER_LEAF: u32 = 0;
const PLAINTEXTS: [&str; 2] = ["hello, Bob", "second message"];
/// Seed of the creator's MLS randomness (HPKE and init keys, secrets).
const CREATOR_MLS_SEED: [u8; 32] = [0x55; 32];
/// The joiner's identity key seed and MLS randomness seed.
const JOINER_SEED: [u8; 32] = [0x66; 32];
const JOINER_MLS_SEED: [u8; 32] = [0x77; 32];
/// Request ids of the creator's `CreateRoom` and `Commit`.
const CREATE_REQUEST_ID: u32 = 3;
const COMMIT_REQUEST_ID: u32 = 5;
/// After the room's start, ms at which the server sequences the two frames.
const CREATE_SEQUENCED_AFTER_MS: u64 = 10;
const COMMIT_SEQUENCED_AFTER_MS: u64 = 20;

fn frame<P: Payload>(request_id: u32, sender: SenderId, payload: &P) -> Frame {
    let mut header = FrameHeaderBuf::new(P::OPCODE);
    header.set_request_id(request_id).set_sender_id(sender);
    Frame::with_payload(header, payload).expect("fits")
}

fn auth() -> Value {
    let client = SigningKey::from_bytes(&CLIENT_SEED);
    let server = SigningKey::from_bytes(&SERVER_KEY_SEED);
    let identity_key = client.verifying_key().to_bytes();
    let sender = SenderId::from_identity_key(&identity_key);
    let hello = Hello { versions: vec![1], identity_key, client_name: "vectors/1".into() };
    let challenge = AuthChallenge { nonce: NONCE, version: 1, server_time_ms: SERVER_TIME_MS };
    let signature = sign_auth_challenge(&client, &NONCE);
    let response = AuthResponse { signature };
    let ok = AuthOk {
        sender_id: sender.0,
        server_time_ms: SERVER_TIME_MS + 1,
        server_key: server.verifying_key().to_bytes(),
        home_certificate: Some(home_certificate(
            identity_key,
            SERVER_TIME_MS + 1 + MEMBER_HOME_CERTIFICATE_VALIDITY_MS,
        )),
    };
    let signed_message = [b"kalandra-auth-v1".as_slice(), &NONCE, &identity_key].concat();
    json!({
        "client_signing_key_seed_hex": hex::encode(CLIENT_SEED),
        "client_identity_key_hex": hex::encode(identity_key),
        "sender_id_hash_input_hex": hex::encode([b"kalandra-sender-id-v1".as_slice(), &identity_key].concat()),
        "sender_id": format!("{:016x}", sender.0),
        "server_key_hex": hex::encode(server.verifying_key().to_bytes()),
        "home_domain": HOME_DOMAIN,
        "home_domain_key_seed_hex": hex::encode(HOME_DOMAIN_KEY_SEED),
        "challenge_signing_input_hex": hex::encode(signed_message),
        "challenge_signature_hex": hex::encode(signature),
        "frames": [
            {"direction": "client->server", "opcode_name": "Hello", "hex": hex::encode(frame(1, SenderId(0), &hello).to_bytes())},
            {"direction": "server->client", "opcode_name": "AuthChallenge", "hex": hex::encode(frame(0, SenderId(0), &challenge).to_bytes())},
            {"direction": "client->server", "opcode_name": "AuthResponse", "hex": hex::encode(frame(2, SenderId(0), &response).to_bytes())},
            {"direction": "server->client", "opcode_name": "AuthOk", "hex": hex::encode(frame(2, SenderId(0), &ok).to_bytes())},
        ],
    })
}

fn expand<const N: usize>(prk: &[u8], info: &[u8]) -> [u8; N] {
    let hkdf = Hkdf::<Sha256>::from_prk(prk).expect("32-byte PRK");
    let mut out = [0u8; N];
    hkdf.expand(info, &mut out).expect("length fits HKDF");
    out
}

fn sender_keys() -> Value {
    let signing_key = SigningKey::from_bytes(&CLIENT_SEED);
    let sender = SenderId::from_identity_key(signing_key.verifying_key().as_bytes());
    let room = RoomId(ROOM);
    let (root, _) = Hkdf::<Sha256>::extract(Some(&[0u8; 32]), &EPOCH_SECRET);
    let chain_info = [b"kalandraSenderV1".as_slice(), &SENDER_LEAF.to_be_bytes()].concat();
    let mut chain_key: [u8; 32] = expand(&root, &chain_info);
    let chain_key_0 = chain_key;
    let mut state =
        SenderKeyState::new(room, EPOCH, &EPOCH_SECRET, SENDER_LEAF, [RECEIVER_LEAF, SENDER_LEAF]);
    let mut messages = Vec::new();
    for (generation, plaintext) in (0u32..).zip(PLAINTEXTS) {
        let step_info = [b"kalandraStepV1".as_slice(), &generation.to_be_bytes()].concat();
        let okm: [u8; 88] = expand(&chain_key, &step_info);
        let (message_key, nonce, next_chain_key) = (&okm[0..32], &okm[32..56], &okm[56..88]);
        let aad = associated_data(room, sender, EPOCH, generation);
        let cipher = XChaCha20Poly1305::new_from_slice(message_key).expect("32-byte key");
        let ciphertext = cipher
            .encrypt(XNonce::from_slice(nonce), AeadPayload { msg: plaintext.as_bytes(), aad: &aad })
            .expect("encrypts");
        let frame = seal_application(&mut state, plaintext.as_bytes(), &signing_key).expect("seals");
        messages.push(json!({
            "generation": generation,
            "chain_key_hex": hex::encode(chain_key),
            "step_info_hex": hex::encode(&step_info),
            "okm_hex": hex::encode(okm),
            "message_key_hex": hex::encode(message_key),
            "nonce_hex": hex::encode(nonce),
            "next_chain_key_hex": hex::encode(next_chain_key),
            "plaintext_utf8": plaintext,
            "aad_hex": hex::encode(aad),
            "ciphertext_hex": hex::encode(&ciphertext),
            "application_frame_hex": hex::encode(frame.to_bytes()),
        }));
        chain_key = next_chain_key.try_into().expect("32 bytes");
    }
    json!({
        "room_id_hex": hex::encode(ROOM),
        "epoch": EPOCH,
        "epoch_secret_hex": hex::encode(EPOCH_SECRET),
        "exporter_label": "kalandra sender keys v1",
        "sender_signing_key_seed_hex": hex::encode(CLIENT_SEED),
        "sender_id": format!("{sender}"),
        "sender_leaf": SENDER_LEAF,
        "receiver_leaf": RECEIVER_LEAF,
        "root_hex": hex::encode(root),
        "chain_info_hex": hex::encode(&chain_info),
        "chain_key_0_hex": hex::encode(chain_key_0),
        "messages": messages,
    })
}

/// A signed frame from `key`'s sender about `room`, as a client sends it.
fn signed<P: Payload>(request_id: u32, room: RoomId, epoch: u64, key: &SigningKey, payload: &P) -> Frame {
    let sender = SenderId::from_identity_key(key.verifying_key().as_bytes());
    let mut header = FrameHeaderBuf::new(P::OPCODE);
    header.set_request_id(request_id).set_room_id(room).set_sender_id(sender).set_epoch(epoch);
    let mut frame = Frame::with_payload(header, payload).expect("fits");
    frame.sign(key);
    frame
}

/// `sent` as the sequencer stamps it (§4: only `log_index` and
/// `server_timestamp_ms` change), and the `Ack` the sender gets.
fn sequence(sent: &Frame, log_index: u64, server_time_ms: u64, epoch_after: u64) -> Value {
    let mut sequenced = sent.clone();
    sequenced.header_mut().set_log_index(log_index).set_server_timestamp_ms(server_time_ms);
    let ack = Ack { log_index, epoch: epoch_after, server_time_ms, log_head: None, signed_head: None };
    let mut header = FrameHeaderBuf::new(Ack::OPCODE);
    header.set_request_id(sent.header().request_id()).set_room_id(sent.header().room_id());
    let ack_frame = Frame::with_payload(header, &ack).expect("fits");
    json!({
        "sent_hex": hex::encode(sent.to_bytes()),
        "sequenced_hex": hex::encode(sequenced.to_bytes()),
        "ack": { "log_index": log_index, "epoch": epoch_after, "server_time_ms": server_time_ms },
        "ack_hex": hex::encode(ack_frame.to_bytes()),
    })
}

/// The room's steps at `now_secs`: the time the file is written, as MLS
/// implementations check key package lifetimes against their clock (a
/// commit adding a key package made at a fixed past time would be refused).
fn room(now_secs: u64) -> Value {
    let room = RoomId(ROOM);
    let server_key = SigningKey::from_bytes(&SERVER_KEY_SEED).verifying_key().to_bytes();
    let mut creator = Identity::from_secret_bytes(&CLIENT_SEED).expect("identity");
    let creator_key = SigningKey::from_bytes(&CLIENT_SEED);
    let creator_mls = MlsProvider::from_seed(CREATOR_MLS_SEED);
    let mut joiner = Identity::from_secret_bytes(&JOINER_SEED).expect("identity");
    // Both leaves carry their home certificate (§10), as their server issued it.
    let certificates_end_ms = now_secs * 1000 + MEMBER_HOME_CERTIFICATE_VALIDITY_MS;
    for identity in [&mut creator, &mut joiner] {
        identity.set_home_certificate(Some(home_certificate(*identity.public_key(), certificates_end_ms)));
    }
    let joiner_mls = MlsProvider::from_seed(JOINER_MLS_SEED);
    let joiner_sender = SenderId::from_identity_key(joiner.public_key());
    let key_package = generate_key_packages(&joiner_mls, &joiner, 1, now_secs).expect("key package");
    let key_package: Vec<u8> = key_package.into_iter().next().expect("one").message;

    let (mut group, created) =
        RoomGroup::create(&creator_mls, &creator, ROOM, &server_key, now_secs).expect("the room's group");
    let create =
        CreateRoom { group_info: created.group_info, ratchet_tree: created.ratchet_tree, join_rule: None };
    let create_frame = signed(CREATE_REQUEST_ID, room, 0, &creator_key, &create);
    let output = group.add_members(&creator_mls, &creator, &[&key_package]).expect("add commit");
    let commit = Commit {
        commit: output.commit,
        welcome: output.welcome.clone(),
        welcome_recipients: vec![joiner_sender.0],
        group_info: Some(output.group_info),
    };
    let commit_frame = signed(COMMIT_REQUEST_ID, room, 0, &creator_key, &commit);
    group.confirm_pending_commit(&creator_mls).expect("the server acknowledged it");
    // The server hands the Welcome to the joiner with the new epoch's tree,
    // its header naming the commit's index.
    let welcome = Welcome {
        welcome: output.welcome.expect("an add makes a Welcome"),
        ratchet_tree: Some(group.ratchet_tree().expect("tree")),
        log_head: None,
    };
    let mut header = FrameHeaderBuf::new(Welcome::OPCODE);
    header.set_room_id(room).set_log_index(1);
    let welcome_frame = Frame::with_payload(header, &welcome).expect("fits");
    json!({
        "room_id_hex": hex::encode(ROOM),
        "now_unix_secs": now_secs,
        "server_key_seed_hex": hex::encode(SERVER_KEY_SEED),
        "creator_signing_key_seed_hex": hex::encode(CLIENT_SEED),
        "creator_mls_seed_hex": hex::encode(CREATOR_MLS_SEED),
        "joiner_signing_key_seed_hex": hex::encode(JOINER_SEED),
        "joiner_mls_seed_hex": hex::encode(JOINER_MLS_SEED),
        "joiner_sender_id": format!("{joiner_sender}"),
        "home_domain": HOME_DOMAIN,
        "home_domain_key_seed_hex": hex::encode(HOME_DOMAIN_KEY_SEED),
        "home_certificates_not_after_ms": certificates_end_ms,
        "joiner_key_package_hex": hex::encode(&key_package),
        "create_room": sequence(&create_frame, 0, now_secs * 1000 + CREATE_SEQUENCED_AFTER_MS, 0),
        "commit": sequence(&commit_frame, 1, now_secs * 1000 + COMMIT_SEQUENCED_AFTER_MS, 1),
        "welcome_hex": hex::encode(welcome_frame.to_bytes()),
        "epoch_1_tree_hash_hex": hex::encode(group.tree_hash()),
    })
}

/// The home domain's certificate of `identity_key`, ending at `not_after_ms`.
fn home_certificate(identity_key: [u8; 32], not_after_ms: u64) -> HomeCertificate {
    let domain = DomainName::parse(HOME_DOMAIN).expect("a domain name");
    HomeCertificate::issue(&SigningKey::from_bytes(&HOME_DOMAIN_KEY_SEED), domain, identity_key, not_after_ms)
}

fn main() {
    let now_secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_secs();
    let document = json!({
        "description": "Kalandra session test vectors (docs/wire-protocol.md §5, §6.1). auth: the four frames of an authentication with fixed keys and nonce (request ids 1 and 2), the challenge's signing input and signature, the sender-id hash input. sender_keys: from epoch_secret (what the MLS exporter gives, taken as input here), the HKDF-Extract root, the sender's chain start, and per generation the HKDF-Expand output split into message key, nonce and next chain key, the AAD, the XChaCha20-Poly1305 ciphertext with tag, and the signed Application frame (header epoch, room and sender set; request id 0). room (§2, §4, §6): the auth client creates a room and adds a joiner at now_unix_secs (the time the file was written: key package lifetimes are checked against the clock when a commit adds one), MLS made deterministic by seeded randomness (client-core's MlsProvider::from_seed; the MLS bytes are what client-core makes from these seeds, another MLS implementation makes its own): the joiner's key package; the CreateRoom and the Commit each as sent (signed, epoch 0, log_index and server_timestamp_ms 0), as sequenced (only log_index and server_timestamp_ms set, so the signature still verifies) and the Ack the sender gets (header: request id and room only; payload: log_index, the room's epoch after the frame, server_time_ms equal to the sequenced frame's timestamp); the Welcome frame the joiner gets (header log_index: the commit's; payload: the Welcome and the epoch-1 ratchet tree), and the epoch-1 tree hash both members reach.",
        "auth": auth(),
        "sender_keys": sender_keys(),
        "room": room(now_secs),
    });
    println!("{}", serde_json::to_string_pretty(&document).expect("JSON"));
}
