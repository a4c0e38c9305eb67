//! Writes the wire-protocol test vectors (`docs/test-vectors.json`).
//!
//! Run from the workspace root:
//! `cargo run -p kalandra-proto --example test_vectors > docs/test-vectors.json`.
//! Ed25519 signatures are deterministic, so the output is reproducible.

use bytes::Bytes;
use ed25519_dalek::SigningKey;
use kalandra_proto::header::offset;
use kalandra_proto::payload::*;
use kalandra_proto::{AnyPayload, Frame, FrameHeaderBuf, RoomId, SenderId};
use serde_json::{json, Value};

const SIGNING_KEY_SEED: [u8; 32] = [0x42; 32];

fn header_json(frame: &Frame) -> Value {
    let header = frame.header();
    json!({
        "version": header.version(),
        "flags": header.flags().bits(),
        "opcode": header.opcode().to_u16(),
        "opcode_name": header.opcode().name(),
        "payload_len": header.payload_len(),
        "request_id": header.request_id(),
        "room_id": hex::encode(header.room_id().0),
        "sender_id": format!("{:016x}", header.sender_id().0),
        "log_index": header.log_index(),
        "epoch": header.epoch(),
        "server_timestamp_ms": header.server_timestamp_ms(),
        "signature": hex::encode(header.signature()),
    })
}

fn main() {
    let key = SigningKey::from_bytes(&SIGNING_KEY_SEED);
    let identity_key = *key.verifying_key().as_bytes();
    let sender = SenderId::from_identity_key(&identity_key);
    let room = RoomId(*b"kalandra-room-01");

    let samples: Vec<(&str, AnyPayload, bool)> = vec![
        (
            "hello",
            AnyPayload::Hello(Hello {
                versions: vec![1],
                identity_key,
                client_name: "kalandra-cli/0.1".into(),
            }),
            false,
        ),
        (
            "auth_challenge",
            AnyPayload::AuthChallenge(AuthChallenge {
                nonce: [7; 32],
                version: 1,
                server_time_ms: 1_795_000_000_000,
            }),
            false,
        ),
        (
            "ack",
            AnyPayload::Ack(Ack {
                log_index: 41,
                epoch: 3,
                server_time_ms: 1_795_000_000_123,
                log_head: None,
                signed_head: None,
            }),
            false,
        ),
        (
            "error_wrong_epoch",
            AnyPayload::Error(Error {
                code: 2002,
                message: "commit for epoch 2, room is at 3".into(),
                current_epoch: Some(3),
                log_index: Some(41),
                retry_after_ms: None,
                frame_digest: None,
            }),
            false,
        ),
        ("subscribe", AnyPayload::Subscribe(Subscribe { from_log_index: 17 }), true),
        (
            "commit_with_welcome",
            AnyPayload::Commit(Commit {
                commit: vec![0, 1, 0, 1],
                welcome: Some(vec![0, 1, 0, 3]),
                welcome_recipients: vec![0x0102_0304_0506_0708],
                group_info: Some(vec![0, 1, 0, 4]),
            }),
            true,
        ),
        (
            "application",
            AnyPayload::Application(Application {
                generation: 5,
                ciphertext: Bytes::from_static(&[0xC1; 40]),
                push: None,
                epoch_tag: None,
            }),
            true,
        ),
        (
            "key_package_claim",
            AnyPayload::KeyPackageClaim(KeyPackageClaim { sender_ids: vec![1, 2], domain: None }),
            true,
        ),
        ("typing", AnyPayload::Typing(Typing { active: true }), true),
        (
            "application_with_push",
            AnyPayload::Application(Application {
                generation: 6,
                ciphertext: Bytes::from_static(&[0xC2; 40]),
                push: Some(Bytes::from_static(&[0xD1; 81])),
                epoch_tag: None,
            }),
            true,
        ),
        (
            "application_with_epoch_tag",
            AnyPayload::Application(Application {
                generation: 7,
                ciphertext: Bytes::from_static(&[0xC3; 40]),
                push: None,
                epoch_tag: Some([0x4f, 0x80, 0x9a, 0x4a, 0x4b, 0xed, 0x06, 0x40]),
            }),
            true,
        ),
        (
            "commit_report",
            AnyPayload::CommitReport(CommitReport {
                log_index: 40,
                epoch: 3,
                reason: CommitReportReason::ConfirmationTag.to_u8(),
            }),
            false,
        ),
        (
            "commit_voided",
            AnyPayload::CommitVoided(CommitVoided {
                log_index: 40,
                epoch: 3,
                reporters: vec![0x0102_0304_0506_0708, 0x1112_1314_1516_1718],
            }),
            true,
        ),
    ];

    let mut valid = Vec::new();
    for (index, (name, payload, signed)) in samples.into_iter().enumerate() {
        let mut header = FrameHeaderBuf::new(payload.opcode());
        let request_id = u32::try_from(index).expect("few samples") + 1;
        header.set_request_id(request_id).set_room_id(room).set_sender_id(sender).set_epoch(3);
        let mut frame = Frame::new(header, payload.encode()).expect("fits");
        if signed {
            frame.sign(&key);
            // As the sequencer would: assign index and time after signing.
            frame
                .header_mut()
                .set_log_index(40 + u64::from(request_id))
                .set_server_timestamp_ms(1_795_000_000_500);
        }
        valid.push(json!({
            "name": name,
            "hex": hex::encode(frame.to_bytes()),
            "header": header_json(&frame),
            "payload_hex": hex::encode(frame.payload()),
            "payload": serde_json::to_value(&payload).expect("serializable"),
            "signed_by": if signed { Value::String(hex::encode(identity_key)) } else { Value::Null },
        }));
    }

    let base = {
        let mut frame =
            Frame::with_payload(FrameHeaderBuf::new(kalandra_proto::Opcode::Ping), &Ping { nonce: 1 })
                .expect("fits");
        frame.header_mut().set_room_id(room);
        frame.to_bytes().to_vec()
    };
    let patch = |at: usize, bytes: &[u8]| {
        let mut wire = base.clone();
        wire[at..at + bytes.len()].copy_from_slice(bytes);
        wire
    };
    let mut oversized = patch(offset::OPCODE, &0x0112u16.to_be_bytes());
    oversized[offset::PAYLOAD_LEN..offset::PAYLOAD_LEN + 4]
        .copy_from_slice(&(256 * 1024 + 1u32).to_be_bytes());
    oversized.truncate(128);
    let mut trailing = base.clone();
    trailing.push(0);
    let array_ciphertext = {
        // {"generation": 1, "ciphertext": [1, 2]}: bytes as an array of integers.
        let mut payload = vec![0xA2, 0x6A];
        payload.extend_from_slice(b"generation");
        payload.extend_from_slice(&[0x01, 0x6A]);
        payload.extend_from_slice(b"ciphertext");
        payload.extend_from_slice(&[0x82, 0x01, 0x02]);
        payload
    };
    let invalid_frames: Vec<(&str, Vec<u8>, &str)> = vec![
        ("too_short", base[..100].to_vec(), "Header(TooShort { len_bytes: 100 })"),
        (
            "bad_magic",
            patch(offset::MAGIC, &[0x53, 0x55, 0x4E, 0x45]),
            "Header(BadMagic { found: 1398099525 })",
        ),
        ("unsupported_version", patch(offset::VERSION, &[2]), "Header(UnsupportedVersion { found: 2 })"),
        ("reserved_flag_bit", patch(offset::FLAGS, &[0x80]), "Header(ReservedFlags { flags: 128 })"),
        ("unknown_opcode", patch(offset::OPCODE, &[0x05, 0x00]), "Header(UnknownOpcode { found: 1280 })"),
        (
            "reserved_federation_opcode",
            patch(offset::OPCODE, &[0x10, 0x00]),
            "Header(ReservedOpcode { found: 4096 })",
        ),
        (
            "ephemeral_flag_on_ping",
            patch(offset::FLAGS, &[0x04]),
            "Header(EphemeralFlagMismatch { opcode: 6 })",
        ),
        (
            "application_payload_too_large",
            oversized,
            "Header(PayloadTooLarge { opcode: 274, len_bytes: 262145, max_bytes: 262144 })",
        ),
        ("truncated_payload", base[..base.len() - 1].to_vec(), "Truncated { missing_bytes: 1 }"),
        ("trailing_bytes", trailing, "TrailingBytes { trailing_bytes: 1 }"),
    ];
    let invalid: Vec<Value> = invalid_frames
        .into_iter()
        .map(|(name, wire, error)| {
            let code = Frame::decode(&Bytes::from(wire.clone())).expect_err("invalid").error_code();
            json!({ "name": name, "hex": hex::encode(wire), "error": error, "error_code": code.to_u16(), "error_code_name": code.name() })
        })
        .collect();

    let invalid_payloads: Vec<Value> = vec![
        ("application_bytes_as_array", 0x0112u16, array_ciphertext, "Malformed"),
        ("ping_trailing_bytes", 0x0006, vec![0xA1, 0x65, b'n', b'o', b'n', b'c', b'e', 0x01, 0x00], "TrailingBytes { opcode: Ping, trailing_bytes: 1 }"),
        ("presence_unknown_status", 0x0401, Presence { status: 9 }.encode().to_vec(), "InvalidValue { field: \"status\", detail: \"unknown presence status\" }"),
        ("sync_count_zero", 0x0102, Sync { from_log_index: 0, count_max: 0 }.encode().to_vec(), "InvalidValue { field: \"count_max\", detail: \"must be 1..=SYNC_FRAMES_PER_REQUEST_MAX\" }"),
    ]
    .into_iter()
    .map(|(name, opcode, payload, error)| json!({ "name": name, "opcode": opcode, "payload_hex": hex::encode(payload), "error": error }))
    .collect();

    let document = json!({
        "description": "Kalandra wire protocol v1 test vectors. Valid frames: decode `hex`, compare header fields and the decoded payload, re-encode to the same bytes, and verify the signature with `signed_by` (an Ed25519 public key) where present. Invalid frames: whole-buffer decoding must fail with `error` (this implementation's error, as Rust debug text) and the stable `error_code` a server sends back. Invalid payloads: decoding `payload_hex` as the opcode's payload must fail with `error` (for Malformed only the variant is fixed, not the decoder's message).",
        "protocol_version": 1,
        "signing_key_seed_hex": hex::encode(SIGNING_KEY_SEED),
        "sender_id_of_signing_key": format!("{:016x}", sender.0),
        "valid": valid,
        "invalid_frames": invalid,
        "invalid_payloads": invalid_payloads,
    });
    println!("{}", serde_json::to_string_pretty(&document).expect("serializable"));
}
