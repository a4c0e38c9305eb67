//! Property tests: every header and payload round-trips, and the streaming
//! decoder yields exactly the encoded frames under any chunking.

mod common;

use bytes::Bytes;
use common::{arb_header, arb_payload};
use ed25519_dalek::SigningKey;
use kalandra_proto::{AnyPayload, Frame, FrameDecoder, FrameHeader, Opcode};
use proptest::collection::vec;
use proptest::prelude::*;

fn frame_of(payload: &AnyPayload, header: kalandra_proto::FrameHeaderBuf) -> Frame {
    Frame::new(header, payload.encode()).expect("generated payloads fit their opcode")
}

fn arb_frame() -> impl Strategy<Value = Frame> {
    arb_payload().prop_flat_map(|payload| {
        arb_header(payload.opcode()).prop_map(move |header| frame_of(&payload, header))
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn payload_round_trips(payload in arb_payload()) {
        let bytes = payload.encode();
        let decoded = AnyPayload::decode(payload.opcode(), &bytes).expect("decodes");
        prop_assert_eq!(&decoded, &payload);
        prop_assert_eq!(decoded.encode(), bytes, "encoding is stable");
    }

    #[test]
    fn header_round_trips(frame in arb_frame()) {
        let wire = frame.to_bytes();
        let header = FrameHeader::parse(&wire).expect("valid");
        let original = frame.header();
        prop_assert_eq!(header.as_bytes(), original.as_bytes());
        prop_assert_eq!(header.opcode(), original.opcode());
        prop_assert_eq!(header.flags(), original.flags());
        prop_assert_eq!(header.request_id(), original.request_id());
        prop_assert_eq!(header.room_id(), original.room_id());
        prop_assert_eq!(header.sender_id(), original.sender_id());
        prop_assert_eq!(header.log_index(), original.log_index());
        prop_assert_eq!(header.epoch(), original.epoch());
        prop_assert_eq!(header.server_timestamp_ms(), original.server_timestamp_ms());
        prop_assert_eq!(header.payload_len() as usize, frame.payload().len());
        prop_assert_eq!(&header.to_buf(), &frame.header().to_buf());
        let whole = Frame::decode(&wire).expect("valid");
        prop_assert_eq!(&whole, &frame);
    }

    #[test]
    fn decoder_yields_exactly_the_encoded_frames(
        frames in vec(arb_frame(), 1..12),
        chunk_sizes in vec(1usize..200, 1..64),
    ) {
        let mut stream = Vec::new();
        for frame in &frames {
            frame.encode_into(&mut stream);
        }
        let mut decoder = FrameDecoder::new();
        let mut decoded = Vec::new();
        let mut rest = &stream[..];
        let mut chunk_index = 0;
        while !rest.is_empty() {
            let size = chunk_sizes[chunk_index % chunk_sizes.len()].min(rest.len());
            chunk_index += 1;
            let (chunk, tail) = rest.split_at(size);
            rest = tail;
            let mut input = chunk;
            while let Some(frame) = decoder.decode(&mut input).expect("valid stream") {
                decoded.push(frame);
            }
            prop_assert!(input.is_empty(), "decoder consumes every byte it is given");
        }
        prop_assert!(decoder.is_idle());
        prop_assert_eq!(decoded, frames);
    }

    #[test]
    fn signatures_survive_sequencing_and_nothing_else(
        frame in arb_frame(),
        log_index in any::<u64>(),
        timestamp in any::<u64>(),
        byte in 0usize..64,
        bit in 0u8..8,
    ) {
        let key = SigningKey::from_bytes(&[3; 32]);
        let mut signed = frame;
        signed.sign(&key);
        let verifying = key.verifying_key();
        prop_assert!(signed.verify(&verifying).is_ok());

        // The sequencer's fields and the countersigned flag may change freely.
        let mut sequenced = signed.clone();
        sequenced.header_mut().set_log_index(log_index).set_server_timestamp_ms(timestamp).set_signature_flags(true, true);
        prop_assert!(sequenced.verify(&verifying).is_ok());

        // Flipping any other bit of the signed header breaks the signature (or the header).
        let mut wire = signed.to_bytes().to_vec();
        let in_assigned_field = (40..48).contains(&byte) || (56..64).contains(&byte) || (byte == 5 && bit == 1);
        prop_assume!(!in_assigned_field);
        wire[byte] ^= 1 << bit;
        if let Ok(tampered) = Frame::decode(&Bytes::from(wire)) {
            prop_assert!(tampered.verify(&verifying).is_err());
        }
    }
}

#[test]
fn payload_tampering_breaks_the_signature() {
    let key = SigningKey::from_bytes(&[4; 32]);
    let mut header = kalandra_proto::FrameHeaderBuf::new(Opcode::Application);
    header.set_epoch(1);
    let payload = kalandra_proto::payload::Application {
        generation: 1,
        ciphertext: Bytes::from_static(b"abc"),
        push: None,
        epoch_tag: None,
    };
    let mut frame = Frame::with_payload(header, &payload).unwrap();
    frame.sign(&key);
    let other = kalandra_proto::payload::Application {
        generation: 1,
        ciphertext: Bytes::from_static(b"abd"),
        push: None,
        epoch_tag: None,
    };
    let swapped = Frame::new(frame.header().to_buf(), kalandra_proto::Payload::encode(&other)).unwrap();
    assert_eq!(swapped.verify(&key.verifying_key()), Err(kalandra_proto::SignatureError::Invalid));
    assert!(frame.verify(&key.verifying_key()).is_ok());
    let unsigned = Frame::new(kalandra_proto::FrameHeaderBuf::new(Opcode::Ping), Bytes::new()).unwrap();
    assert_eq!(unsigned.verify(&key.verifying_key()), Err(kalandra_proto::SignatureError::NotSigned));
    let wrong_key = SigningKey::from_bytes(&[5; 32]).verifying_key();
    assert_eq!(frame.verify(&wrong_key), Err(kalandra_proto::SignatureError::Invalid));
}
