//! Federation primitives: domain names, link proofs, home certificates and
//! countersigned relay envelopes, each refusal by its typed error, and the
//! vectors in `docs/federation-vectors.json` (recomputed here; set
//! `KALANDRA_WRITE_FEDERATION_VECTORS=1` to rewrite the file after a
//! deliberate change).

use ed25519_dalek::SigningKey;
use kalandra_proto::federation::{
    link_proof_input, sign_link_proof, verify_link_proof, DomainName, DomainNameError, HomeCertificate,
    HomeCertificateError, LinkError, LinkHello, LinkRole, PeerKey, PeerKeys, PeerKeysError, RelayEnvelope,
    RelayError, VerifiedCertificates,
};
use kalandra_proto::payload::{Application, Subscribe};
use kalandra_proto::{Flags, Frame, FrameHeaderBuf, Payload, RoomId, SenderId};
use serde_json::{json, Value};

const NOW_MS: u64 = 1_800_000_000_000;
const DAY_MS: u64 = 86_400_000;

fn domain(name: &str) -> DomainName {
    DomainName::parse(name).unwrap()
}

fn key(byte: u8) -> SigningKey {
    SigningKey::from_bytes(&[byte; 32])
}

fn peer(name: &str, signing: &SigningKey) -> PeerKeys {
    PeerKeys::new(domain(name), vec![PeerKey { key: signing.verifying_key(), valid_until_ms: None }]).unwrap()
}

fn hello(name: &str, signing: &SigningKey, nonce: u8) -> LinkHello {
    LinkHello { domain: domain(name), federation_key: signing.verifying_key().to_bytes(), nonce: [nonce; 32] }
}

/// A client frame of `user` in a room, signed by it.
fn client_frame(user: &SigningKey, text: &[u8]) -> Frame {
    let mut header = FrameHeaderBuf::new(Application::OPCODE);
    header
        .set_room_id(RoomId(*b"federation-room!"))
        .set_sender_id(SenderId::from_identity_key(user.verifying_key().as_bytes()))
        .set_epoch(3)
        .set_request_id(7);
    let mut frame = Frame::with_payload(
        header,
        &Application { generation: 0, ciphertext: text.to_vec().into(), push: None, epoch_tag: None },
    )
    .unwrap();
    frame.sign(user);
    frame
}

/// Domain B (key 2) relays user U (key 9)'s frame to domain A (key 1).
fn relayed(sequence: u64) -> RelayEnvelope {
    let certificate = HomeCertificate::issue(
        &key(2),
        domain("b.example"),
        key(9).verifying_key().to_bytes(),
        NOW_MS + DAY_MS,
    );
    RelayEnvelope::countersign(
        &key(2),
        domain("b.example"),
        domain("a.example"),
        sequence,
        certificate,
        client_frame(&key(9), b"hello"),
    )
}

#[test]
fn domain_names_are_lowercase_dns_names() {
    for good in ["a.example", "chat.example.org", "x", "b-2.example", &"a".repeat(63)] {
        assert_eq!(DomainName::parse(good).unwrap().as_str(), good);
    }
    let cases: [(&str, DomainNameError); 7] = [
        ("", DomainNameError::Empty),
        ("a..b", DomainNameError::Empty),
        ("a.example.", DomainNameError::Empty),
        ("A.example", DomainNameError::BadCharacter { character: 'A' }),
        ("a_b.example", DomainNameError::BadCharacter { character: '_' }),
        ("-a.example", DomainNameError::BadHyphen),
        (&"a".repeat(64), DomainNameError::LabelTooLong { len_bytes: 64 }),
    ];
    for (bad, error) in cases {
        assert_eq!(DomainName::parse(bad), Err(error), "{bad:?}");
    }
    let long = vec!["a".repeat(60); 5].join(".");
    assert_eq!(DomainName::parse(&long), Err(DomainNameError::TooLong { len_bytes: 304 }));
    // Decoding checks too.
    let mut cbor = Vec::new();
    ciborium::into_writer(&"Not.A.Domain", &mut cbor).unwrap();
    assert!(ciborium::from_reader::<DomainName, _>(cbor.as_slice()).is_err());
}

#[test]
fn peer_keys_hold_one_to_four_keys_and_end_the_old_one_after_the_overlap() {
    let empty = PeerKeys::new(domain("b.example"), vec![]);
    assert!(matches!(empty, Err(PeerKeysError::KeyCount { count: 0, .. })));
    let (old, new) = (key(2), key(3));
    let keys = PeerKeys::new(
        domain("b.example"),
        vec![
            PeerKey { key: old.verifying_key(), valid_until_ms: Some(NOW_MS + DAY_MS) },
            PeerKey { key: new.verifying_key(), valid_until_ms: None },
        ],
    )
    .unwrap();
    assert_eq!(keys.accepted(NOW_MS).count(), 2, "during the overlap both");
    assert!(keys.accept(old.verifying_key().as_bytes(), NOW_MS).is_some());
    assert_eq!(keys.accept(old.verifying_key().as_bytes(), NOW_MS + DAY_MS), None, "after the overlap");
    assert!(keys.accept(new.verifying_key().as_bytes(), NOW_MS + DAY_MS).is_some());
}

#[test]
fn a_link_proof_verifies_for_its_role_domain_key_and_tls_connection_only() {
    let (a, b) = (key(1), key(2));
    let (initiator, responder) = (hello("a.example", &a, 0xa1), hello("b.example", &b, 0xb2));
    let binding = [0x42; 32];
    let proof = sign_link_proof(&b, &initiator, &responder, &binding, LinkRole::Responder);
    let b_keys = peer("b.example", &b);
    let verify = |keys: &PeerKeys, binding: &[u8; 32], role, proof: &[u8; 64], now_ms| {
        verify_link_proof(keys, &initiator, &responder, binding, role, proof, now_ms)
    };
    assert_eq!(verify(&b_keys, &binding, LinkRole::Responder, &proof, NOW_MS).unwrap(), b.verifying_key());
    // Relayed into another TLS connection.
    let bad = LinkError::BadLinkProof { domain: domain("b.example") };
    assert_eq!(verify(&b_keys, &[0x43; 32], LinkRole::Responder, &proof, NOW_MS), Err(bad.clone()));
    // Reflected: A's own proof sent back as B's.
    let a_proof = sign_link_proof(&a, &initiator, &responder, &binding, LinkRole::Initiator);
    assert_eq!(verify(&b_keys, &binding, LinkRole::Responder, &a_proof, NOW_MS), Err(bad));
    // Someone else's domain, or a key the operator did not configure.
    let c_keys = peer("c.example", &b);
    assert!(matches!(
        verify(&c_keys, &binding, LinkRole::Responder, &proof, NOW_MS),
        Err(LinkError::WrongDomain { .. })
    ));
    let other_key = peer("b.example", &key(5));
    assert_eq!(
        verify(&other_key, &binding, LinkRole::Responder, &proof, NOW_MS),
        Err(LinkError::KeyNotAccepted { domain: domain("b.example") })
    );
}

#[test]
fn a_home_certificate_binds_a_user_to_the_domain_that_issued_it() {
    let (b, user) = (key(2), key(9));
    let certificate =
        HomeCertificate::issue(&b, domain("b.example"), user.verifying_key().to_bytes(), NOW_MS + DAY_MS);
    let sender = SenderId::from_identity_key(user.verifying_key().as_bytes());
    assert_eq!(certificate.verify(&peer("b.example", &b), NOW_MS), Ok(sender));
    assert_eq!(
        certificate.verify(&peer("b.example", &b), NOW_MS + DAY_MS),
        Err(HomeCertificateError::Expired { not_after_ms: NOW_MS + DAY_MS })
    );
    // Domain C cannot issue a certificate that says "b.example".
    let forged = HomeCertificate::issue(
        &key(3),
        domain("b.example"),
        user.verifying_key().to_bytes(),
        NOW_MS + DAY_MS,
    );
    assert_eq!(
        forged.verify(&peer("b.example", &b), NOW_MS),
        Err(HomeCertificateError::BadSignature { domain: domain("b.example") })
    );
    let mut later = certificate.clone();
    later.not_after_ms += DAY_MS;
    assert!(later.verify(&peer("b.example", &b), NOW_MS).is_err(), "the end is signed");
}

#[test]
fn a_verified_certificate_counts_again_only_unchanged_unexpired_and_under_a_key_still_accepted() {
    let (b, user) = (key(2), key(9));
    let certificate =
        HomeCertificate::issue(&b, domain("b.example"), user.verifying_key().to_bytes(), NOW_MS + DAY_MS);
    let sender = SenderId::from_identity_key(user.verifying_key().as_bytes());
    let b_keys = peer("b.example", &b);
    let verified = std::sync::Mutex::new(VerifiedCertificates::new());
    assert_eq!(certificate.verify_once(&b_keys, NOW_MS, Some(&verified)), Ok(sender));
    assert_eq!(certificate.verify_once(&b_keys, NOW_MS + 1, Some(&verified)), Ok(sender));
    assert_eq!(verified.lock().unwrap().len(), 1, "verified once, held once");

    // The same signature over other fields is not the certificate verified.
    let mut other_user = certificate.clone();
    other_user.identity_key = key(8).verifying_key().to_bytes();
    let mut later = certificate.clone();
    later.not_after_ms += DAY_MS;
    for forged in [other_user, later] {
        assert_eq!(
            forged.verify_once(&b_keys, NOW_MS, Some(&verified)),
            Err(HomeCertificateError::BadSignature { domain: domain("b.example") })
        );
    }
    // Its end of validity still ends it.
    assert_eq!(
        certificate.verify_once(&b_keys, NOW_MS + DAY_MS, Some(&verified)),
        Err(HomeCertificateError::Expired { not_after_ms: NOW_MS + DAY_MS })
    );
    // A rotation that ends b's old key ends what it verified.
    let rotated = PeerKeys::new(
        domain("b.example"),
        vec![
            PeerKey { key: b.verifying_key(), valid_until_ms: Some(NOW_MS + 10) },
            PeerKey { key: key(4).verifying_key(), valid_until_ms: None },
        ],
    )
    .unwrap();
    assert_eq!(certificate.verify_once(&rotated, NOW_MS + 9, Some(&verified)), Ok(sender));
    assert_eq!(
        certificate.verify_once(&rotated, NOW_MS + 10, Some(&verified)),
        Err(HomeCertificateError::BadSignature { domain: domain("b.example") })
    );
    // Another domain's keys never match b's entries.
    assert!(matches!(
        certificate.verify_once(&peer("c.example", &key(3)), NOW_MS, Some(&verified)),
        Err(HomeCertificateError::WrongDomain { .. })
    ));
}

#[test]
fn a_relayed_frame_is_accepted_once_with_both_signatures_and_a_user_of_its_origin() {
    let (a_name, b_keys) = (domain("a.example"), peer("b.example", &key(2)));
    let envelope = relayed(5);
    let frame = envelope.verify(&b_keys, &a_name, Some(4), NOW_MS).unwrap();
    assert!(frame.header().flags().contains(Flags::COUNTERSIGNED));
    assert_eq!(frame.header().request_id(), 7, "the client's request id travels with it");
    frame.verify(&key(9).verifying_key()).unwrap();

    let replay = envelope.verify(&b_keys, &a_name, Some(5), NOW_MS);
    assert_eq!(replay, Err(RelayError::Replayed { sequence: 5, last: 5 }));
    let c_link = peer("c.example", &key(3));
    assert!(matches!(
        envelope.verify(&c_link, &a_name, None, NOW_MS),
        Err(RelayError::OriginMismatch { .. })
    ));
    assert!(matches!(
        envelope.verify(&b_keys, &domain("c.example"), None, NOW_MS),
        Err(RelayError::WrongDestination { .. })
    ));
}

#[test]
fn forged_missing_or_foreign_signatures_are_refused_by_type() {
    let (a_name, b_keys) = (domain("a.example"), peer("b.example", &key(2)));
    let bad_countersignature = Err(RelayError::BadCountersignature { origin: domain("b.example") });

    let mut missing = relayed(1);
    missing.countersignature = [0; 64];
    assert_eq!(missing.verify(&b_keys, &a_name, None, NOW_MS).map(|_| ()), bad_countersignature);
    let mut swapped = relayed(1);
    let last = swapped.frame.len() - 1;
    swapped.frame[last] ^= 1;
    assert_eq!(swapped.verify(&b_keys, &a_name, None, NOW_MS).map(|_| ()), bad_countersignature);
    let mut renumbered = relayed(1);
    renumbered.relay_sequence = 2;
    assert_eq!(renumbered.verify(&b_keys, &a_name, None, NOW_MS).map(|_| ()), bad_countersignature);
    let mut unflagged = relayed(1);
    unflagged.frame[5] &= !Flags::COUNTERSIGNED.bits();
    assert_eq!(
        unflagged.verify(&b_keys, &a_name, None, NOW_MS).map(|_| ()),
        Err(RelayError::NotCountersigned)
    );

    // B speaks for a user of C: C's certificate in B's envelope.
    let c_certificate = HomeCertificate::issue(
        &key(3),
        domain("c.example"),
        key(9).verifying_key().to_bytes(),
        NOW_MS + DAY_MS,
    );
    let foreign = RelayEnvelope::countersign(
        &key(2),
        domain("b.example"),
        a_name.clone(),
        1,
        c_certificate,
        client_frame(&key(9), b"hi"),
    );
    assert!(matches!(foreign.verify(&b_keys, &a_name, None, NOW_MS), Err(RelayError::ForeignUser { .. })));

    // B's own certificate for user U, but a frame of user V.
    let b_certificate = HomeCertificate::issue(
        &key(2),
        domain("b.example"),
        key(9).verifying_key().to_bytes(),
        NOW_MS + DAY_MS,
    );
    let other_sender = RelayEnvelope::countersign(
        &key(2),
        domain("b.example"),
        a_name.clone(),
        1,
        b_certificate.clone(),
        client_frame(&key(8), b"hi"),
    );
    assert!(matches!(
        other_sender.verify(&b_keys, &a_name, None, NOW_MS),
        Err(RelayError::SenderMismatch { .. })
    ));

    // B makes up U's signed frame: the client's signature does not verify.
    let mut header = FrameHeaderBuf::new(Subscribe::OPCODE);
    header
        .set_room_id(RoomId(*b"federation-room!"))
        .set_sender_id(SenderId::from_identity_key(key(9).verifying_key().as_bytes()));
    let mut made_up = Frame::with_payload(header, &Subscribe { from_log_index: 0 }).unwrap();
    made_up.sign(&key(8));
    let made_up = RelayEnvelope::countersign(
        &key(2),
        domain("b.example"),
        a_name.clone(),
        1,
        b_certificate.clone(),
        made_up,
    );
    assert!(matches!(made_up.verify(&b_keys, &a_name, None, NOW_MS), Err(RelayError::ClientSignature(_))));

    // An Application frame's signature is its readers' to check, as for a
    // local connection (wire-protocol.md §4): only the countersignature is.
    let mut application = client_frame(&key(9), b"hi");
    application.sign(&key(8));
    let application = RelayEnvelope::countersign(
        &key(2),
        domain("b.example"),
        a_name.clone(),
        1,
        b_certificate,
        application,
    );
    assert!(application.verify(&b_keys, &a_name, None, NOW_MS).is_ok());
}

fn vector_document() -> Value {
    let (a, b, user) = (key(1), key(2), key(9));
    let (initiator, responder) = (hello("a.example", &a, 0xa1), hello("b.example", &b, 0xb2));
    let binding = [0x42; 32];
    let certificate =
        HomeCertificate::issue(&b, domain("b.example"), user.verifying_key().to_bytes(), NOW_MS + DAY_MS);
    let envelope = relayed(5);
    let mut envelope_cbor = Vec::new();
    ciborium::into_writer(&envelope, &mut envelope_cbor).unwrap();
    json!({
        "keys": {
            "a.example_seed_hex": hex::encode([1u8; 32]),
            "b.example_seed_hex": hex::encode([2u8; 32]),
            "user_seed_hex": hex::encode([9u8; 32]),
        },
        "link": {
            "tls_binding_hex": hex::encode(binding),
            "initiator_nonce_hex": hex::encode(initiator.nonce),
            "responder_nonce_hex": hex::encode(responder.nonce),
            "responder_proof_input_hex": hex::encode(link_proof_input(&initiator, &responder, &binding, LinkRole::Responder)),
            "responder_proof_hex": hex::encode(sign_link_proof(&b, &initiator, &responder, &binding, LinkRole::Responder)),
            "initiator_proof_hex": hex::encode(sign_link_proof(&a, &initiator, &responder, &binding, LinkRole::Initiator)),
        },
        "home_certificate": {
            "not_after_ms": NOW_MS + DAY_MS,
            "signature_hex": hex::encode(certificate.signature),
        },
        "relay_envelope": {
            "relay_sequence": 5,
            "frame_hex": hex::encode(&envelope.frame),
            "countersignature_hex": hex::encode(envelope.countersignature),
            "cbor_hex": hex::encode(envelope_cbor),
        },
    })
}

#[test]
fn the_documented_vectors_are_what_this_implementation_computes() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/federation-vectors.json");
    let computed = vector_document();
    if std::env::var_os("KALANDRA_WRITE_FEDERATION_VECTORS").is_some() {
        std::fs::write(path, serde_json::to_string_pretty(&computed).unwrap() + "\n").unwrap();
    }
    let documented: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(documented, computed);
    // The envelope decodes from its CBOR to the same value.
    let cbor = hex::decode(documented["relay_envelope"]["cbor_hex"].as_str().unwrap()).unwrap();
    let decoded: RelayEnvelope = ciborium::from_reader(cbor.as_slice()).unwrap();
    assert_eq!(decoded, relayed(5));
}
