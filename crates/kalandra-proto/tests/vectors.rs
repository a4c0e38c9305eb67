//! Checks every vector in `docs/test-vectors.json` against this implementation.

use bytes::Bytes;
use ed25519_dalek::{SigningKey, VerifyingKey};
use kalandra_proto::{AnyPayload, Frame, Opcode, SenderId};
use serde_json::Value;

fn vectors() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/test-vectors.json");
    let text = std::fs::read_to_string(path).expect("docs/test-vectors.json exists");
    serde_json::from_str(&text).expect("valid JSON")
}

fn bytes_of(value: &Value) -> Vec<u8> {
    hex::decode(value.as_str().expect("hex string")).expect("valid hex")
}

#[test]
fn valid_frames_decode_to_their_fields_and_re_encode_exactly() {
    let document = vectors();
    let seed: [u8; 32] = bytes_of(&document["signing_key_seed_hex"]).try_into().unwrap();
    let key = SigningKey::from_bytes(&seed);
    let sender = SenderId::from_identity_key(key.verifying_key().as_bytes());
    assert_eq!(document["sender_id_of_signing_key"], format!("{:016x}", sender.0));
    let valid = document["valid"].as_array().expect("list");
    assert!(valid.len() >= 5);
    for vector in valid {
        let name = &vector["name"];
        let wire = Bytes::from(bytes_of(&vector["hex"]));
        let frame = Frame::decode(&wire).unwrap_or_else(|error| panic!("{name}: {error}"));
        let header = frame.header();
        let expected = &vector["header"];
        assert_eq!(expected["version"], header.version(), "{name}");
        assert_eq!(expected["flags"], header.flags().bits(), "{name}");
        assert_eq!(expected["opcode"], header.opcode().to_u16(), "{name}");
        assert_eq!(expected["opcode_name"], header.opcode().name(), "{name}");
        assert_eq!(expected["payload_len"], header.payload_len(), "{name}");
        assert_eq!(expected["request_id"], header.request_id(), "{name}");
        assert_eq!(expected["room_id"], hex::encode(header.room_id().0), "{name}");
        assert_eq!(expected["sender_id"], format!("{:016x}", header.sender_id().0), "{name}");
        assert_eq!(expected["log_index"], header.log_index(), "{name}");
        assert_eq!(expected["epoch"], header.epoch(), "{name}");
        assert_eq!(expected["server_timestamp_ms"], header.server_timestamp_ms(), "{name}");
        assert_eq!(expected["signature"], hex::encode(header.signature()), "{name}");
        assert_eq!(bytes_of(&vector["payload_hex"]), frame.payload().to_vec(), "{name}");
        let payload = AnyPayload::decode(header.opcode(), frame.payload()).expect("payload decodes");
        assert_eq!(serde_json::to_value(&payload).unwrap(), vector["payload"], "{name}");
        assert_eq!(payload.encode(), frame.payload(), "{name}: payload re-encodes exactly");
        assert_eq!(frame.to_bytes(), wire, "{name}: frame re-encodes exactly");
        if let Some(signer) = vector["signed_by"].as_str() {
            let signer: [u8; 32] = hex::decode(signer).unwrap().try_into().unwrap();
            let verifying = VerifyingKey::from_bytes(&signer).unwrap();
            frame.verify(&verifying).unwrap_or_else(|error| panic!("{name}: {error}"));
        }
    }
}

#[test]
fn invalid_frames_fail_with_their_exact_error() {
    let document = vectors();
    let invalid = document["invalid_frames"].as_array().expect("list");
    assert!(invalid.len() >= 8);
    for vector in invalid {
        let wire = Bytes::from(bytes_of(&vector["hex"]));
        let error = Frame::decode(&wire).expect_err(vector["name"].as_str().unwrap());
        assert_eq!(format!("{error:?}"), vector["error"].as_str().unwrap(), "{}", vector["name"]);
        assert_eq!(vector["error_code"], error.error_code().to_u16(), "{}", vector["name"]);
        assert_eq!(vector["error_code_name"], error.error_code().name(), "{}", vector["name"]);
    }
}

#[test]
fn invalid_payloads_fail_with_their_exact_error() {
    let document = vectors();
    for vector in document["invalid_payloads"].as_array().expect("list") {
        let opcode = Opcode::from_u16(u16::try_from(vector["opcode"].as_u64().unwrap()).unwrap()).unwrap();
        let error = AnyPayload::decode(opcode, &bytes_of(&vector["payload_hex"])).expect_err("must fail");
        let expected = vector["error"].as_str().unwrap();
        let debug = format!("{error:?}");
        if expected == "Malformed" {
            assert!(debug.starts_with("Malformed"), "{}: {debug}", vector["name"]);
        } else {
            assert_eq!(debug, expected, "{}", vector["name"]);
        }
    }
}
