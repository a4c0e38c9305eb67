//! Checks `docs/session-vectors.json` (written by `examples/session_vectors.rs`):
//! every value is recomputed here from the formulas of docs/wire-protocol.md
//! §5 and §6.1, and client-core's own sealing and opening agree with them;
//! the room's frames follow §2, §4 and §6 (what the sequencer may change,
//! what an `Ack` and a `Welcome` carry), client-core makes the same
//! `CreateRoom` and key package from the same seeds, and the joiner reaches
//! the epoch-1 tree from the `Welcome`.

use bytes::Bytes;
use chacha20poly1305::aead::{Aead as _, KeyInit as _, Payload as AeadPayload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use client_core::mls::{generate_key_packages, Identity, MlsProvider, RoomGroup};
use client_core::sender_keys::{open_application, seal_application, SenderKeyState};
use ed25519_dalek::{Signature, SigningKey, Verifier as _};
use hkdf::Hkdf;
use kalandra_proto::payload::{Ack, AnyPayload, Application, Commit, CreateRoom, Welcome};
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
    // The home certificate: the server's domain's signature over the client's key (§10).
    let certificate = ok.home_certificate.as_ref().expect("a home certificate");
    let domain =
        kalandra_proto::federation::DomainName::parse(auth["home_domain"].as_str().unwrap()).unwrap();
    let domain_key = SigningKey::from_bytes(&array(&auth["home_domain_key_seed_hex"])).verifying_key();
    let keys = kalandra_proto::federation::PeerKeys::new(
        domain.clone(),
        vec![kalandra_proto::federation::PeerKey { key: domain_key, valid_until_ms: None }],
    )
    .unwrap();
    let signing_input = [
        b"kalandra-home-certificate-v1".as_slice(),
        &[u8::try_from(domain.as_str().len()).unwrap()],
        domain.as_str().as_bytes(),
        &identity_key,
        &certificate.not_after_ms.to_be_bytes(),
    ]
    .concat();
    domain_key
        .verify(&signing_input, &Signature::from_bytes(&certificate.signature))
        .expect("the certificate's signature verifies over §10's input");
    assert_eq!(certificate.verify(&keys, certificate.not_after_ms - 1), Ok(kalandra_proto::SenderId(sender)));
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

fn frame_of(value: &Value) -> Frame {
    Frame::decode(&Bytes::from(bytes(value))).expect("frame decodes")
}

/// One sequenced step: the frame as sent is signed by `key` with the
/// client's header; the sequenced one differs in `log_index` and
/// `server_timestamp_ms` alone and still verifies; the `Ack` answers the
/// request with the index, the epoch after the frame and the frame's time.
fn check_step(
    step: &Value,
    key: &SigningKey,
    room: RoomId,
    opcode: Opcode,
    log_index: u64,
    epoch_after: u64,
) -> Frame {
    let sender = SenderId::from_identity_key(key.verifying_key().as_bytes());
    let sent = frame_of(&step["sent_hex"]);
    assert_eq!(sent.opcode(), opcode);
    let header = sent.header();
    assert_eq!((header.room_id(), header.sender_id(), header.epoch()), (room, sender, 0));
    assert_eq!((header.log_index(), header.server_timestamp_ms()), (0, 0), "a client leaves them zero");
    assert_eq!(header.flags().bits(), 0x01, "SIGNED");
    sent.verify(&key.verifying_key()).expect("signed by the sender");

    let (sent_bytes, sequenced_bytes) = (bytes(&step["sent_hex"]), bytes(&step["sequenced_hex"]));
    assert_eq!(sent_bytes.len(), sequenced_bytes.len());
    for (offset, (a, b)) in sent_bytes.iter().zip(&sequenced_bytes).enumerate() {
        if a != b {
            assert!((40..48).contains(&offset) || (56..64).contains(&offset), "byte {offset} changed");
        }
    }
    let sequenced = frame_of(&step["sequenced_hex"]);
    assert_eq!(sequenced.header().log_index(), log_index);
    sequenced.verify(&key.verifying_key()).expect("the sequencer's fields are outside the signature");
    let time = sequenced.header().server_timestamp_ms();

    let ack_frame = frame_of(&step["ack_hex"]);
    assert_eq!(ack_frame.opcode(), Opcode::Ack);
    let ack_header = ack_frame.header();
    assert_eq!((ack_header.request_id(), ack_header.room_id()), (header.request_id(), room));
    assert_eq!(
        (ack_header.sender_id().0, ack_header.epoch(), ack_header.log_index(), ack_header.flags().bits()),
        (0, 0, 0, 0),
        "a server frame: unsigned, no sender; the payload carries index and epoch"
    );
    let ack: Ack = ack_frame.decode_payload().expect("an Ack");
    assert_eq!((ack.log_index, ack.epoch, ack.server_time_ms), (log_index, epoch_after, time));
    assert_eq!(
        (
            step["ack"]["log_index"].as_u64(),
            step["ack"]["epoch"].as_u64(),
            step["ack"]["server_time_ms"].as_u64()
        ),
        (Some(ack.log_index), Some(ack.epoch), Some(ack.server_time_ms))
    );
    sent
}

#[test]
fn a_room_is_created_and_a_member_added_as_sections_2_4_and_6_say() {
    let vectors = &document()["room"];
    let room = RoomId(array(&vectors["room_id_hex"]));
    let now_secs = vectors["now_unix_secs"].as_u64().unwrap();
    let creator_key = SigningKey::from_bytes(&array(&vectors["creator_signing_key_seed_hex"]));
    let server_key =
        SigningKey::from_bytes(&array(&vectors["server_key_seed_hex"])).verifying_key().to_bytes();

    let create = check_step(&vectors["create_room"], &creator_key, room, Opcode::CreateRoom, 0, 0);
    let commit = check_step(&vectors["commit"], &creator_key, room, Opcode::Commit, 1, 1);
    assert!(create.header().request_id() != commit.header().request_id(), "each request has its id");

    // client-core makes the same CreateRoom from the same seeds.
    let mut creator = Identity::from_secret_bytes(&creator_key.to_bytes()).unwrap();
    // Each leaf carries its home certificate (§10, "Members' home certificates").
    let domain =
        kalandra_proto::federation::DomainName::parse(vectors["home_domain"].as_str().unwrap()).unwrap();
    let domain_key = SigningKey::from_bytes(&array(&vectors["home_domain_key_seed_hex"]));
    let not_after_ms = vectors["home_certificates_not_after_ms"].as_u64().unwrap();
    let certify = |identity: &mut Identity| {
        let certificate = kalandra_proto::federation::HomeCertificate::issue(
            &domain_key,
            domain.clone(),
            *identity.public_key(),
            not_after_ms,
        );
        identity.set_home_certificate(Some(certificate));
    };
    certify(&mut creator);
    let creator_mls = MlsProvider::from_seed(array(&vectors["creator_mls_seed_hex"]));
    let (_group, created) = RoomGroup::create(&creator_mls, &creator, room.0, &server_key, now_secs).unwrap();
    let create_room: CreateRoom = create.decode_payload().expect("a CreateRoom");
    assert_eq!(
        (create_room.group_info, create_room.ratchet_tree),
        (created.group_info, created.ratchet_tree)
    );
    assert_eq!(create_room.join_rule, None, "invite only");

    // The joiner: its key package, its sender id in the commit, and the Welcome.
    let mut joiner = Identity::from_secret_bytes(&bytes(&vectors["joiner_signing_key_seed_hex"])).unwrap();
    certify(&mut joiner);
    let joiner_sender = SenderId::from_identity_key(joiner.public_key());
    assert_eq!(vectors["joiner_sender_id"], joiner_sender.to_string());
    let joiner_mls = MlsProvider::from_seed(array(&vectors["joiner_mls_seed_hex"]));
    let key_package = generate_key_packages(&joiner_mls, &joiner, 1, now_secs).unwrap().remove(0).message;
    assert_eq!(
        bytes(&vectors["joiner_key_package_hex"]),
        key_package,
        "the same key package from the same seeds"
    );
    let commit_payload: Commit = commit.decode_payload().expect("a Commit");
    assert_eq!(commit_payload.welcome_recipients, [joiner_sender.0]);
    assert!(commit_payload.group_info.is_some(), "the new epoch's GroupInfo");

    let welcome_frame = frame_of(&vectors["welcome_hex"]);
    assert_eq!(welcome_frame.opcode(), Opcode::Welcome);
    let header = welcome_frame.header();
    assert_eq!((header.room_id(), header.log_index()), (room, 1), "the commit's index");
    assert_eq!(
        (header.request_id(), header.sender_id().0, header.flags().bits()),
        (0, 0, 0),
        "a server push"
    );
    let welcome: Welcome = welcome_frame.decode_payload().expect("a Welcome");
    assert_eq!(Some(&welcome.welcome), commit_payload.welcome.as_ref(), "the commit's Welcome, forwarded");
    let joined = RoomGroup::join_from_welcome(&joiner_mls, &welcome.welcome, welcome.ratchet_tree.as_deref())
        .expect("the joiner joins from the Welcome");
    assert_eq!((joined.room_id(), joined.epoch()), (room.0, 1), "the epoch the commit's Ack names");
    assert_eq!(bytes(&vectors["epoch_1_tree_hash_hex"]), joined.tree_hash());
    let members: Vec<Vec<u8>> = joined.members().into_iter().map(|member| member.identity).collect();
    assert_eq!(members, [creator.public_key().to_vec(), joiner.public_key().to_vec()]);
    // The joiner finds both leaves certified by the home domain.
    let keys = kalandra_proto::federation::PeerKeys::new(
        domain.clone(),
        vec![kalandra_proto::federation::PeerKey { key: domain_key.verifying_key(), valid_until_ms: None }],
    )
    .unwrap();
    for (_, leaf) in joined.member_home_certificates() {
        let check = leaf.check(|_| Some(&keys), not_after_ms - 1);
        assert!(
            matches!(&check, kalandra_proto::home::HomeCheck::Certified { domain: d, .. } if *d == domain),
            "{check:?}"
        );
    }
}
