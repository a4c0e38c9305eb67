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

/// The log-chain vectors of `docs/wire-protocol.md` §4.1: frame digests,
/// heads and the server's signature over a head.
#[test]
fn log_chain_vectors_match_the_specification() {
    use kalandra_proto::chain::{frame_digest, log_head_signing_input, next_log_head, SignedLogHead};
    use kalandra_proto::RoomId;
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/wire-protocol.md");
    let text = std::fs::read_to_string(path).expect("docs/wire-protocol.md exists");
    let block = text
        .split("<!-- log-chain-vectors -->")
        .nth(1)
        .and_then(|rest| rest.split("<!-- /log-chain-vectors -->").next())
        .expect("the log-chain vectors block");
    let field = |name: &str| -> Vec<u8> {
        let line = block
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{name}:")))
            .unwrap_or_else(|| panic!("{name} in the vectors"));
        hex::decode(line.trim()).unwrap()
    };
    let fixed = |name: &str| -> [u8; 32] { field(name).try_into().unwrap() };
    let document = vectors();
    let frame = |name: &str| {
        let vector = document["valid"].as_array().unwrap().iter().find(|v| v["name"] == name).unwrap();
        bytes_of(&vector["hex"])
    };
    let room_id = RoomId(field("room_id").try_into().unwrap());
    let mut head = fixed("head_45");
    for (index, name) in [(46u64, "commit_with_welcome"), (47, "application")] {
        let digest = frame_digest(&frame(name));
        assert_eq!(digest, fixed(&format!("frame_digest_{index}")), "{name}");
        head = next_log_head(room_id, index, &head, &digest);
        assert_eq!(head, fixed(&format!("head_{index}")), "{name}");
    }
    assert_eq!(log_head_signing_input(room_id, 47, &head).to_vec(), field("signing_input_47"));
    let seed: [u8; 32] = bytes_of(&document["signing_key_seed_hex"]).try_into().unwrap();
    let key = SigningKey::from_bytes(&seed);
    assert_eq!(key.verifying_key().to_bytes().to_vec(), field("server_key"));
    let signed = SignedLogHead::sign(room_id, 47, head, &key);
    assert_eq!(signed.signature.to_vec(), field("signature_47"));
    let server_key = VerifyingKey::from_bytes(&fixed("server_key")).unwrap();
    assert_eq!(signed.verify(room_id, &server_key), Ok(()));
}
