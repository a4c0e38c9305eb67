//! One test per validation error: each failure yields its exact typed error.

use bytes::Bytes;
use ed25519_dalek::SigningKey;
use kalandra_proto::header::offset;
use kalandra_proto::limits::{
    APPLICATION_PAYLOAD_BYTES_MAX, HEADER_BYTES, KEY_PACKAGES_PER_UPLOAD_MAX, PAYLOAD_BYTES_MAX,
    TEXT_BYTES_MAX,
};
use kalandra_proto::payload::*;
use kalandra_proto::sign::{parse_identity_key, sign_auth_challenge, verify_auth_response, verify_batch};
use kalandra_proto::{
    DecodeError, ErrorCode, Frame, FrameDecoder, FrameError, FrameHeader, FrameHeaderBuf, HeaderError,
    Opcode, SignatureError,
};

fn valid_header(opcode: Opcode) -> [u8; HEADER_BYTES] {
    *FrameHeaderBuf::new(opcode).as_bytes()
}

fn with(mut bytes: [u8; HEADER_BYTES], at: usize, value: &[u8]) -> [u8; HEADER_BYTES] {
    bytes[at..at + value.len()].copy_from_slice(value);
    bytes
}

#[test]
fn header_too_short() {
    let bytes = valid_header(Opcode::Ping);
    assert_eq!(FrameHeader::parse(&bytes[..127]).unwrap_err(), HeaderError::TooShort { len_bytes: 127 });
    assert_eq!(FrameHeader::parse(&[]).unwrap_err(), HeaderError::TooShort { len_bytes: 0 });
}

#[test]
fn header_bad_magic() {
    let bytes = with(valid_header(Opcode::Ping), offset::MAGIC, &0x5355_4E45u32.to_be_bytes());
    assert_eq!(FrameHeader::parse(&bytes).unwrap_err(), HeaderError::BadMagic { found: 0x5355_4E45 });
    assert_eq!(HeaderError::BadMagic { found: 0 }.error_code(), ErrorCode::MalformedHeader);
}

#[test]
fn header_unsupported_version() {
    for version in [0u8, 2, 0xFF] {
        let bytes = with(valid_header(Opcode::Ping), offset::VERSION, &[version]);
        assert_eq!(
            FrameHeader::parse(&bytes).unwrap_err(),
            HeaderError::UnsupportedVersion { found: version }
        );
    }
    assert_eq!(HeaderError::UnsupportedVersion { found: 2 }.error_code(), ErrorCode::UnsupportedVersion);
}

#[test]
fn header_reserved_flags() {
    for bit in 3..8 {
        let flags = 1u8 << bit;
        let bytes = with(valid_header(Opcode::Ping), offset::FLAGS, &[flags]);
        assert_eq!(FrameHeader::parse(&bytes).unwrap_err(), HeaderError::ReservedFlags { flags });
    }
}

#[test]
fn header_unknown_and_reserved_opcodes() {
    for value in [0x0000u16, 0x0009, 0x00FF, 0x0106, 0x0500, 0x3000, 0xFFFF] {
        let bytes = with(valid_header(Opcode::Ping), offset::OPCODE, &value.to_be_bytes());
        assert_eq!(FrameHeader::parse(&bytes).unwrap_err(), HeaderError::UnknownOpcode { found: value });
    }
    for value in [0x1000u16, 0x1ABC, 0x1FFF, 0x2000, 0x2FFF] {
        let bytes = with(valid_header(Opcode::Ping), offset::OPCODE, &value.to_be_bytes());
        assert_eq!(FrameHeader::parse(&bytes).unwrap_err(), HeaderError::ReservedOpcode { found: value });
        assert_eq!(HeaderError::ReservedOpcode { found: value }.error_code(), ErrorCode::UnknownOpcode);
    }
}

#[test]
fn header_ephemeral_flag_must_match_opcode() {
    let bytes = with(valid_header(Opcode::Application), offset::FLAGS, &[0x04]);
    assert_eq!(
        FrameHeader::parse(&bytes).unwrap_err(),
        HeaderError::EphemeralFlagMismatch { opcode: 0x0112 }
    );
    let bytes = with(valid_header(Opcode::Typing), offset::FLAGS, &[0x00]);
    assert_eq!(
        FrameHeader::parse(&bytes).unwrap_err(),
        HeaderError::EphemeralFlagMismatch { opcode: 0x0400 }
    );
    assert!(FrameHeader::parse(&valid_header(Opcode::Typing)).is_ok());
}

#[test]
fn header_payload_too_large_per_opcode() {
    let over = APPLICATION_PAYLOAD_BYTES_MAX + 1;
    let bytes = with(valid_header(Opcode::Application), offset::PAYLOAD_LEN, &over.to_be_bytes());
    assert_eq!(
        FrameHeader::parse(&bytes).unwrap_err(),
        HeaderError::PayloadTooLarge {
            opcode: 0x0112,
            len_bytes: over,
            max_bytes: APPLICATION_PAYLOAD_BYTES_MAX
        }
    );
    // The same length is fine for a commit.
    let bytes = with(valid_header(Opcode::Commit), offset::PAYLOAD_LEN, &over.to_be_bytes());
    assert!(FrameHeader::parse(&bytes).is_ok());
    let bytes = with(valid_header(Opcode::Commit), offset::PAYLOAD_LEN, &u32::MAX.to_be_bytes());
    assert!(matches!(FrameHeader::parse(&bytes), Err(HeaderError::PayloadTooLarge { .. })));
}

#[test]
fn decoder_refuses_an_oversized_length_before_buffering_its_payload() {
    let over = PAYLOAD_BYTES_MAX + 1;
    let bytes = with(valid_header(Opcode::Commit), offset::PAYLOAD_LEN, &over.to_be_bytes());
    let mut decoder = FrameDecoder::new();
    let mut input = &bytes[..];
    let error = decoder.decode(&mut input).unwrap_err();
    assert!(matches!(error, DecodeError::Header(HeaderError::PayloadTooLarge { .. })));
    assert!(input.is_empty());
    // Poisoned from now on, whatever follows.
    let mut more: &[u8] = &[0u8; 10];
    assert_eq!(decoder.decode(&mut more).unwrap_err(), DecodeError::Poisoned);

    // An endpoint limit lower than the protocol's is enforced too.
    let bytes = with(valid_header(Opcode::Commit), offset::PAYLOAD_LEN, &2048u32.to_be_bytes());
    let mut decoder = FrameDecoder::with_payload_bytes_max(1024);
    let mut input = &bytes[..];
    assert_eq!(
        decoder.decode(&mut input).unwrap_err(),
        DecodeError::PayloadTooLarge { len_bytes: 2048, max_bytes: 1024 }
    );
    assert_eq!(
        DecodeError::PayloadTooLarge { len_bytes: 1, max_bytes: 0 }.error_code(),
        ErrorCode::PayloadTooLarge
    );
}

#[test]
fn decoder_reports_bad_header_after_exactly_128_bytes() {
    let bytes = with(valid_header(Opcode::Ping), offset::MAGIC, &[0, 0, 0, 0]);
    let mut decoder = FrameDecoder::new();
    for byte in &bytes[..127] {
        let mut input = std::slice::from_ref(byte);
        assert_eq!(decoder.decode(&mut input).unwrap(), None);
    }
    let mut input = &bytes[127..];
    assert_eq!(
        decoder.decode(&mut input).unwrap_err(),
        DecodeError::Header(HeaderError::BadMagic { found: 0 })
    );
}

#[test]
fn whole_buffer_decode_truncated_and_trailing() {
    let frame = Frame::with_payload(FrameHeaderBuf::new(Opcode::Ping), &Ping { nonce: 7 }).unwrap();
    let wire = frame.to_bytes();
    let short = wire.slice(..wire.len() - 1);
    assert_eq!(Frame::decode(&short).unwrap_err(), DecodeError::Truncated { missing_bytes: 1 });
    let mut long = wire.to_vec();
    long.push(0);
    assert_eq!(
        Frame::decode(&Bytes::from(long)).unwrap_err(),
        DecodeError::TrailingBytes { trailing_bytes: 1 }
    );
    assert_eq!(Frame::decode(&wire).unwrap(), frame);
}

#[test]
fn frame_construction_errors() {
    let too_big = Bytes::from(vec![0u8; APPLICATION_PAYLOAD_BYTES_MAX as usize + 1]);
    assert_eq!(
        Frame::new(FrameHeaderBuf::new(Opcode::Application), too_big).unwrap_err(),
        FrameError::PayloadTooLarge {
            opcode: Opcode::Application,
            len_bytes: APPLICATION_PAYLOAD_BYTES_MAX as usize + 1,
            max_bytes: APPLICATION_PAYLOAD_BYTES_MAX
        }
    );
    assert_eq!(
        Frame::with_payload(FrameHeaderBuf::new(Opcode::Pong), &Ping { nonce: 1 }).unwrap_err(),
        FrameError::OpcodeMismatch { expected: Opcode::Ping, found: Opcode::Pong }
    );
    let frame = Frame::with_payload(FrameHeaderBuf::new(Opcode::Ping), &Ping { nonce: 1 }).unwrap();
    assert_eq!(
        frame.decode_payload::<Pong>().unwrap_err(),
        PayloadError::OpcodeMismatch { expected: Opcode::Pong, found: Opcode::Ping }
    );
}

#[test]
fn payload_malformed_cbor() {
    // 0xFF is a CBOR "break" with nothing to break.
    assert!(matches!(Ping::decode(&[0xFF]), Err(PayloadError::Malformed { opcode: Opcode::Ping, .. })));
    // A map missing the required field.
    assert!(matches!(Ping::decode(&[0xA0]), Err(PayloadError::Malformed { .. })));
    // A byte string sent as an array of integers: {"generation": 1, "ciphertext": [1, 2]}.
    let mut as_array = vec![0xA2, 0x6A];
    as_array.extend_from_slice(b"generation");
    as_array.extend_from_slice(&[0x01, 0x6A]);
    as_array.extend_from_slice(b"ciphertext");
    as_array.extend_from_slice(&[0x82, 0x01, 0x02]);
    assert!(matches!(Application::decode(&as_array), Err(PayloadError::Malformed { .. })));
    // The same with a real byte string decodes.
    let len = as_array.len();
    as_array[len - 3] = 0x42;
    assert_eq!(
        Application::decode(&as_array).unwrap(),
        Application { generation: 1, ciphertext: Bytes::from_static(&[1, 2]), push: None, epoch_tag: None }
    );
    // A fixed-size byte string of the wrong length.
    let mut short_signature = vec![0xA1, 0x69];
    short_signature.extend_from_slice(b"signature");
    short_signature.extend_from_slice(&[0x42, 0x01, 0x02]);
    assert!(matches!(AuthResponse::decode(&short_signature), Err(PayloadError::Malformed { .. })));
    assert!(matches!(AnyPayload::decode(Opcode::Hello, &[]), Err(PayloadError::Malformed { .. })));
}

#[test]
fn payload_trailing_bytes() {
    let mut bytes = Ping { nonce: 1 }.encode().to_vec();
    bytes.extend_from_slice(&[0, 0]);
    assert_eq!(
        Ping::decode(&bytes).unwrap_err(),
        PayloadError::TrailingBytes { opcode: Opcode::Ping, trailing_bytes: 2 }
    );
}

#[test]
fn payload_field_too_long() {
    let error = Error {
        code: 1,
        message: "x".repeat(TEXT_BYTES_MAX + 1),
        current_epoch: None,
        log_index: None,
        retry_after_ms: None,
        frame_digest: None,
    };
    assert_eq!(
        Error::decode(&error.encode()).unwrap_err(),
        PayloadError::FieldTooLong {
            field: "message",
            len_bytes: TEXT_BYTES_MAX + 1,
            max_bytes: TEXT_BYTES_MAX
        }
    );
}

#[test]
fn push_payload_too_long() {
    let max = kalandra_proto::limits::PUSH_PAYLOAD_BYTES_MAX;
    let at_max = Application {
        generation: 0,
        ciphertext: Bytes::from_static(b"c"),
        push: Some(Bytes::from(vec![1u8; max])),
        epoch_tag: None,
    };
    assert_eq!(Application::decode(&at_max.encode()).unwrap(), at_max);
    let over = Application {
        generation: 0,
        ciphertext: Bytes::from_static(b"c"),
        push: Some(Bytes::from(vec![1u8; max + 1])),
        epoch_tag: None,
    };
    assert_eq!(
        Application::decode(&over.encode()).unwrap_err(),
        PayloadError::FieldTooLong { field: "push", len_bytes: max + 1, max_bytes: max }
    );
}

#[test]
fn payload_too_many_items() {
    let upload = KeyPackageUpload {
        key_packages: vec![ByteString::from(vec![1u8]); KEY_PACKAGES_PER_UPLOAD_MAX + 1],
        last_resort: None,
    };
    assert_eq!(
        KeyPackageUpload::decode(&upload.encode()).unwrap_err(),
        PayloadError::TooManyItems {
            field: "key_packages",
            count: KEY_PACKAGES_PER_UPLOAD_MAX + 1,
            max: KEY_PACKAGES_PER_UPLOAD_MAX
        }
    );
}

#[test]
fn payload_invalid_values() {
    let cases: Vec<(AnyPayload, &str)> = vec![
        (AnyPayload::Sync(Sync { from_log_index: 0, count_max: 0 }), "count_max"),
        (AnyPayload::Sync(Sync { from_log_index: 0, count_max: 4097 }), "count_max"),
        (AnyPayload::Presence(Presence { status: 4 }), "status"),
        (
            AnyPayload::Hello(Hello { versions: vec![], identity_key: [0; 32], client_name: String::new() }),
            "versions",
        ),
        (
            AnyPayload::Commit(Commit {
                commit: vec![1],
                welcome: Some(vec![1]),
                welcome_recipients: vec![],
                group_info: None,
            }),
            "welcome_recipients",
        ),
        (
            AnyPayload::Commit(Commit {
                commit: vec![1],
                welcome: None,
                welcome_recipients: vec![5],
                group_info: None,
            }),
            "welcome_recipients",
        ),
        (
            AnyPayload::Commit(Commit {
                commit: vec![],
                welcome: None,
                welcome_recipients: vec![],
                group_info: None,
            }),
            "commit",
        ),
        (
            AnyPayload::Application(Application {
                generation: 0,
                ciphertext: Bytes::new(),
                push: None,
                epoch_tag: None,
            }),
            "ciphertext",
        ),
        (
            AnyPayload::KeyPackageUpload(KeyPackageUpload { key_packages: vec![], last_resort: None }),
            "key_packages",
        ),
        (AnyPayload::KeyPackageClaim(KeyPackageClaim { sender_ids: vec![], domain: None }), "sender_ids"),
    ];
    for (payload, expected_field) in cases {
        match AnyPayload::decode(payload.opcode(), &payload.encode()) {
            Err(PayloadError::InvalidValue { field, .. }) => assert_eq!(field, expected_field, "{payload:?}"),
            other => panic!("{payload:?} gave {other:?}"),
        }
    }
}

#[test]
fn unknown_map_keys_are_ignored() {
    // {"nonce": 5, "zzz": 1}
    let bytes = [0xA2, 0x65, b'n', b'o', b'n', b'c', b'e', 0x05, 0x63, b'z', b'z', b'z', 0x01];
    assert_eq!(Ping::decode(&bytes).unwrap(), Ping { nonce: 5 });
}

#[test]
fn signature_errors() {
    let key = SigningKey::from_bytes(&[1; 32]);
    let mut frame = Frame::with_payload(FrameHeaderBuf::new(Opcode::Ping), &Ping { nonce: 1 }).unwrap();
    frame.sign(&key);
    let verifying = key.verifying_key();
    assert_eq!(verify_batch(&[&frame], &[]), Err(SignatureError::BatchLengthMismatch { frames: 1, keys: 0 }));
    assert_eq!(verify_batch(&[&frame, &frame], &[verifying, verifying]), Ok(()));
    let other = SigningKey::from_bytes(&[2; 32]).verifying_key();
    assert_eq!(verify_batch(&[&frame, &frame], &[verifying, other]), Err(SignatureError::Invalid));
    // The identity point is a small-order (weak) key.
    let mut identity = [0u8; 32];
    identity[0] = 1;
    assert_eq!(parse_identity_key(&identity).unwrap_err(), SignatureError::BadKey);
    assert!(parse_identity_key(verifying.as_bytes()).is_ok());
}

#[test]
fn auth_challenge_signature() {
    let key = SigningKey::from_bytes(&[6; 32]);
    let nonce = [9u8; 32];
    let signature = sign_auth_challenge(&key, &nonce);
    assert_eq!(verify_auth_response(&key.verifying_key(), &nonce, &signature), Ok(()));
    assert_eq!(
        verify_auth_response(&key.verifying_key(), &[8; 32], &signature),
        Err(SignatureError::Invalid)
    );
    let other = SigningKey::from_bytes(&[7; 32]).verifying_key();
    assert_eq!(verify_auth_response(&other, &nonce, &signature), Err(SignatureError::Invalid));
}

#[test]
fn large_byte_strings_decode() {
    for len in [4095usize, 4096, 4097, 65_536, 200_000] {
        let payload = Application {
            generation: 1,
            ciphertext: Bytes::from(vec![7u8; len]),
            push: None,
            epoch_tag: None,
        };
        assert_eq!(Application::decode(&payload.encode()).unwrap(), payload, "{len}");
        let commit = Commit {
            commit: vec![1u8; len],
            welcome: Some(vec![2u8; len]),
            welcome_recipients: vec![1],
            group_info: None,
        };
        assert_eq!(Commit::decode(&commit.encode()).unwrap(), commit, "{len}");
    }
}

/// Error messages reach peers in `Error` frames: plain words, never Rust
/// debug text such as `Io(Error { kind: UnexpectedEof, .. })`.
#[test]
fn payload_errors_are_plain_text() {
    let hello: Vec<u8> =
        Hello { versions: vec![1], identity_key: [7; 32], client_name: "plain".into() }.encode().to_vec();
    let cases: Vec<(&str, String)> = vec![
        ("truncated", Hello::decode(&hello[..hello.len() - 3]).unwrap_err().to_string()),
        ("not a map", Hello::decode(&[0x01]).unwrap_err().to_string()),
        ("bad syntax", Hello::decode(&[0xff, 0x00]).unwrap_err().to_string()),
        ("trailing", Hello::decode(&[&hello[..], &[0u8][..]].concat()).unwrap_err().to_string()),
        ("value", Sync::decode(&Sync { from_log_index: 0, count_max: 0 }.encode()).unwrap_err().to_string()),
    ];
    for (name, message) in cases {
        for debug_marker in ["Error {", "kind:", "Io(", "Semantic(", "Syntax("] {
            assert!(!message.contains(debug_marker), "{name}: {message}");
        }
        assert!(!message.is_empty(), "{name}");
    }
}

/// After a header error the decoder tells the refused frame's request id,
/// for the `Error` that answers it, when the header's layout is known.
#[test]
fn a_failed_decoder_reports_the_request_id_only_of_a_readable_header() {
    let mut good = FrameHeaderBuf::new(Opcode::Ping);
    good.set_request_id(77);
    let valid = *good.as_bytes();
    let decode = |bytes: [u8; HEADER_BYTES]| {
        let mut decoder = FrameDecoder::new();
        let mut input = &bytes[..];
        let result = decoder.decode(&mut input);
        (result.is_err(), decoder.failed_request_id())
    };
    let mut reserved_flag = valid;
    reserved_flag[5] = 0x80;
    assert_eq!(decode(reserved_flag), (true, Some(77)));
    let mut unknown_opcode = valid;
    unknown_opcode[6..8].copy_from_slice(&[0x09, 0x99]);
    assert_eq!(decode(unknown_opcode), (true, Some(77)));
    let mut bad_magic = valid;
    bad_magic[0] = b'X';
    assert_eq!(decode(bad_magic), (true, None));
    let mut version_two = valid;
    version_two[4] = 2;
    assert_eq!(decode(version_two), (true, None));
    // A decoder that has not failed has no refused frame.
    let mut decoder = FrameDecoder::new();
    assert_eq!(decoder.failed_request_id(), None);
    let mut input = &valid[..];
    assert!(decoder.decode(&mut input).is_ok());
    assert_eq!(decoder.failed_request_id(), None);
}

#[test]
fn an_epoch_tag_is_eight_bytes_and_read_without_the_rest() {
    let tagged = Application {
        generation: 3,
        ciphertext: Bytes::from(vec![9u8; 5000]),
        push: None,
        epoch_tag: Some([0xE7; 8]),
    };
    let bytes = tagged.encode();
    assert_eq!(Application::decode(&bytes).unwrap(), tagged);
    assert_eq!(Application::epoch_tag_of(&bytes).unwrap(), Some([0xE7; 8]));
    let untagged = Application { epoch_tag: None, ..tagged.clone() };
    assert_eq!(Application::epoch_tag_of(&untagged.encode()).unwrap(), None);
    // Seven bytes, or the tag as an array of integers: refused by both.
    let mut short = Vec::new();
    ciborium::ser::into_writer(
        &ciborium::Value::Map(vec![
            (ciborium::Value::Text("generation".into()), ciborium::Value::Integer(1.into())),
            (ciborium::Value::Text("ciphertext".into()), ciborium::Value::Bytes(vec![1])),
            (ciborium::Value::Text("epoch_tag".into()), ciborium::Value::Bytes(vec![0; 7])),
        ]),
        &mut short,
    )
    .unwrap();
    assert!(matches!(Application::decode(&short), Err(PayloadError::Malformed { .. })));
    assert!(matches!(Application::epoch_tag_of(&short), Err(PayloadError::Malformed { .. })));
    let mut as_array = Vec::new();
    let eight = (0..8).map(|_| ciborium::Value::Integer(0.into())).collect();
    ciborium::ser::into_writer(
        &ciborium::Value::Map(vec![
            (ciborium::Value::Text("generation".into()), ciborium::Value::Integer(1.into())),
            (ciborium::Value::Text("ciphertext".into()), ciborium::Value::Bytes(vec![1])),
            (ciborium::Value::Text("epoch_tag".into()), ciborium::Value::Array(eight)),
        ]),
        &mut as_array,
    )
    .unwrap();
    assert!(matches!(Application::decode(&as_array), Err(PayloadError::Malformed { .. })));
    assert!(matches!(Application::epoch_tag_of(&as_array), Err(PayloadError::Malformed { .. })));
}
