//! Checks `docs/session-vectors.json` (written by `examples/session_vectors.rs`):
//! every value is recomputed here from the formulas of docs/wire-protocol.md
//! §5 and §6.1, and client-core's own sealing and opening agree with them.

use bytes::Bytes;
use chacha20poly1305::aead::{Aead as _, KeyInit as _, Payload as AeadPayload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use client_core::sender_keys::{open_application, seal_application, SenderKeyState};
use ed25519_dalek::{Signature, SigningKey, Verifier as _};
use hkdf::Hkdf;
use kalandra_proto::payload::{AnyPayload, Application};
use kalandra_proto::{Frame, Opcode, RoomId, SenderId};
use serde_json::Value;
use sha2::{Digest as _, Sha256};

fn document() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/session-vectors.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("docs/session-vectors.json")).expect("JSON")
}

fn bytes(value: &Value) -> Vec<u8> {
    hex::decode(value.as_str().expect("hex string")).expect("hex")
}

fn array<const N: usize>(value: &Value) -> [u8; N] {
    bytes(value).try_into().expect("length")
}

#[test]
fn the_authentication_transcript_follows_section_5() {
    let auth = &document()["auth"];
    let client = SigningKey::from_bytes(&array(&auth["client_signing_key_seed_hex"]));
    let identity_key = client.verifying_key().to_bytes();
    assert_eq!(bytes(&auth["client_identity_key_hex"]), identity_key);
    let hash_input = [b"kalandra-sender-id-v1".as_slice(), &identity_key].concat();
    assert_eq!(bytes(&auth["sender_id_hash_input_hex"]), hash_input);
    let digest = Sha256::digest(&hash_input);
    let sender = u64::from_be_bytes(digest[..8].try_into().unwrap());
    assert_eq!(auth["sender_id"], format!("{sender:016x}"));
    assert_eq!(SenderId::from_identity_key(&identity_key).0, sender);

    let frames: Vec<Frame> = auth["frames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| Frame::decode(&Bytes::from(bytes(&f["hex"]))).expect("frame decodes"))
        .collect();
    let opcodes: Vec<Opcode> = frames.iter().map(Frame::opcode).collect();
    assert_eq!(opcodes, [Opcode::Hello, Opcode::AuthChallenge, Opcode::AuthResponse, Opcode::AuthOk]);
    let payloads: Vec<AnyPayload> =
        frames.iter().map(|f| AnyPayload::decode(f.opcode(), f.payload()).expect("payload")).collect();
    let (
        AnyPayload::Hello(hello),
        AnyPayload::AuthChallenge(challenge),
        AnyPayload::AuthResponse(response),
        AnyPayload::AuthOk(ok),
    ) = (&payloads[0], &payloads[1], &payloads[2], &payloads[3])
    else {
        panic!("payload kinds")
    };
    assert_eq!(hello.identity_key, identity_key);
    let signing_input = [b"kalandra-auth-v1".as_slice(), &challenge.nonce, &identity_key].concat();
    assert_eq!(bytes(&auth["challenge_signing_input_hex"]), signing_input);
    assert_eq!(bytes(&auth["challenge_signature_hex"]), response.signature);
    let signature = Signature::from_bytes(&response.signature);
    client.verifying_key().verify(&signing_input, &signature).expect("the challenge signature verifies");
    assert_eq!(ok.sender_id, sender);
    assert_eq!(bytes(&auth["server_key_hex"]), ok.server_key);
    // Header fields of frames without a room or sender (§2).
    for frame in &frames {
        let header = frame.header();
        assert_eq!(
            (header.room_id(), header.sender_id().0, header.epoch(), header.log_index()),
            (RoomId::default(), 0, 0, 0)
        );
        assert_eq!(header.flags().bits(), 0, "unsigned");
    }
    let request_ids: Vec<u32> = frames.iter().map(|f| f.header().request_id()).collect();
    assert_eq!(request_ids, [1, 0, 2, 2], "AuthChallenge 0, AuthOk answers AuthResponse");
    // Each frame is exactly its payload's canonical encoding behind the header.
    for (frame, payload) in frames.iter().zip(&payloads) {
        assert_eq!(payload.encode(), frame.payload());
    }
}

fn expand<const N: usize>(prk: &[u8], info: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    Hkdf::<Sha256>::from_prk(prk).unwrap().expand(info, &mut out).unwrap();
    out
}

#[test]
fn sender_keys_follow_section_6_1_step_by_step() {
    let vectors = &document()["sender_keys"];
    let room = RoomId(array(&vectors["room_id_hex"]));
    let epoch = vectors["epoch"].as_u64().unwrap();
    let epoch_secret: [u8; 32] = array(&vectors["epoch_secret_hex"]);
    let signing_key = SigningKey::from_bytes(&array(&vectors["sender_signing_key_seed_hex"]));
    let identity_key = signing_key.verifying_key().to_bytes();
    let sender = SenderId::from_identity_key(&identity_key);
    assert_eq!(vectors["sender_id"], sender.to_string());
    let leaf = u32::try_from(vectors["sender_leaf"].as_u64().unwrap()).unwrap();
    let receiver_leaf = u32::try_from(vectors["receiver_leaf"].as_u64().unwrap()).unwrap();

    let (root, _) = Hkdf::<Sha256>::extract(Some(&[0u8; 32]), &epoch_secret);
    assert_eq!(bytes(&vectors["root_hex"]), root.as_slice(), "step 2: root");
    let chain_info = [b"kalandraSenderV1".as_slice(), &leaf.to_be_bytes()].concat();
    assert_eq!(bytes(&vectors["chain_info_hex"]), chain_info);
    let mut chain_key: [u8; 32] = expand(&root, &chain_info);
    assert_eq!(bytes(&vectors["chain_key_0_hex"]), chain_key, "step 3: chain start");

    let mut sending = SenderKeyState::new(room, epoch, &epoch_secret, leaf, [receiver_leaf, leaf]);
    let mut receiving = SenderKeyState::new(room, epoch, &epoch_secret, receiver_leaf, [receiver_leaf, leaf]);
    for message in vectors["messages"].as_array().unwrap() {
        let generation = u32::try_from(message["generation"].as_u64().unwrap()).unwrap();
        assert_eq!(bytes(&message["chain_key_hex"]), chain_key);
        let step_info = [b"kalandraStepV1".as_slice(), &generation.to_be_bytes()].concat();
        assert_eq!(bytes(&message["step_info_hex"]), step_info);
        let okm: [u8; 88] = expand(&chain_key, &step_info);
        assert_eq!(bytes(&message["okm_hex"]), okm, "step 4: okm");
        assert_eq!(bytes(&message["message_key_hex"]), okm[0..32]);
        assert_eq!(bytes(&message["nonce_hex"]), okm[32..56]);
        assert_eq!(bytes(&message["next_chain_key_hex"]), okm[56..88]);
        let aad = [
            &room.0[..],
            &sender.0.to_be_bytes(),
            &epoch.to_be_bytes(),
            &[0x01, 0x12],
            &generation.to_be_bytes(),
        ]
        .concat();
        assert_eq!(bytes(&message["aad_hex"]), aad, "step 5: aad");
        let plaintext = message["plaintext_utf8"].as_str().unwrap().as_bytes();
        let cipher = XChaCha20Poly1305::new_from_slice(&okm[0..32]).unwrap();
        let ciphertext = cipher
            .encrypt(XNonce::from_slice(&okm[32..56]), AeadPayload { msg: plaintext, aad: &aad })
            .unwrap();
        assert_eq!(bytes(&message["ciphertext_hex"]), ciphertext, "step 5: ciphertext");

        // The frame: client-core seals the same bytes, and opens them.
        let wire = Bytes::from(bytes(&message["application_frame_hex"]));
        let frame = Frame::decode(&wire).expect("frame decodes");
        let application: Application = frame.decode_payload().expect("Application payload");
        assert_eq!(application.generation, generation);
        assert_eq!(application.ciphertext.as_ref(), ciphertext.as_slice());
        let header = frame.header();
        assert_eq!((header.room_id(), header.sender_id(), header.epoch()), (room, sender, epoch));
        frame.verify(&signing_key.verifying_key()).expect("signed by the sender");
        assert_eq!(seal_application(&mut sending, plaintext, &signing_key).unwrap().to_bytes(), wire);
        let opened = open_application(&mut receiving, &frame, leaf, &identity_key).expect("opens");
        assert_eq!(opened, plaintext);
        chain_key = okm[56..88].try_into().unwrap();
    }
}
