//! Criterion benchmarks of the wire protocol's hot paths.
//!
//! Run with `cargo bench -p kalandra-proto --bench proto`.
#![allow(missing_docs)]

use std::hint::black_box;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use ed25519_dalek::SigningKey;
use kalandra_proto::payload::Application;
use kalandra_proto::sign::verify_batch;
use kalandra_proto::{Frame, FrameDecoder, FrameHeader, FrameHeaderBuf, Opcode, Payload, RoomId, SenderId};

const CIPHERTEXT_BYTES: usize = 1024;

fn application_frame(signing_key: &SigningKey, sequence: u64) -> Frame {
    let payload = Application {
        generation: 7,
        ciphertext: Bytes::from(vec![0xA5; CIPHERTEXT_BYTES]),
        push: None,
        epoch_tag: None,
    };
    let mut header = FrameHeaderBuf::new(Opcode::Application);
    header
        .set_request_id(42)
        .set_room_id(RoomId([7; 16]))
        .set_sender_id(SenderId(0x1122_3344_5566_7788))
        .set_epoch(3)
        .set_log_index(sequence)
        .set_server_timestamp_ms(1_790_000_000_000);
    let mut frame = Frame::with_payload(header, &payload).expect("payload fits");
    frame.sign(signing_key);
    frame
}

fn benches(c: &mut Criterion) {
    let signing_key = SigningKey::from_bytes(&[9; 32]);
    let frame = application_frame(&signing_key, 1);
    let wire = frame.to_bytes();

    let mut group = c.benchmark_group("header");
    group.throughput(Throughput::Elements(1));
    group.bench_function("parse_validate", |b| {
        b.iter(|| {
            let header = FrameHeader::parse(black_box(&wire[..])).expect("valid");
            black_box((header.opcode(), header.payload_len()))
        })
    });
    group.finish();

    let mut group = c.benchmark_group("payload");
    group.throughput(Throughput::Elements(1));
    let payload_bytes = frame.payload().clone();
    group.bench_function("application_decode_1KiB", |b| {
        b.iter(|| Application::decode(black_box(&payload_bytes)).expect("valid"))
    });
    let application = Application {
        generation: 7,
        ciphertext: Bytes::from(vec![0xA5; CIPHERTEXT_BYTES]),
        push: None,
        epoch_tag: None,
    };
    let mut scratch = Vec::with_capacity(2048);
    group.bench_function("application_encode_1KiB", |b| {
        b.iter(|| {
            scratch.clear();
            black_box(&application).encode_into(&mut scratch);
            black_box(scratch.len())
        })
    });
    group.finish();

    let mut group = c.benchmark_group("frame");
    group.throughput(Throughput::Elements(1));
    group.bench_function("decode_1KiB_application_full", |b| {
        b.iter(|| {
            let frame = Frame::decode(black_box(&wire)).expect("valid");
            let payload: Application = frame.decode_payload().expect("valid");
            black_box(payload.generation)
        })
    });
    group.bench_function("stream_decode_1KiB_application", |b| {
        let mut decoder = FrameDecoder::new();
        b.iter(|| {
            let mut input = black_box(&wire[..]);
            let frame = decoder.decode(&mut input).expect("valid").expect("complete");
            black_box(frame.payload().len())
        })
    });
    let mut out = Vec::with_capacity(wire.len());
    group.bench_function("encode_1KiB_application", |b| {
        b.iter(|| {
            out.clear();
            black_box(&frame).encode_into(&mut out);
            black_box(out.len())
        })
    });
    group.finish();

    let mut group = c.benchmark_group("signature");
    let verifying_key = signing_key.verifying_key();
    group.throughput(Throughput::Elements(1));
    group.bench_function("verify_1KiB_frame", |b| {
        b.iter(|| black_box(&frame).verify(&verifying_key).expect("valid"))
    });
    group.bench_function("sign_1KiB_frame", |b| {
        b.iter_batched(|| frame.clone(), |mut frame| frame.sign(&signing_key), BatchSize::SmallInput)
    });
    const BATCH: u8 = 64;
    let keys: Vec<SigningKey> = (1..=BATCH).map(|i| SigningKey::from_bytes(&[i; 32])).collect();
    let frames: Vec<Frame> =
        keys.iter().enumerate().map(|(i, key)| application_frame(key, i as u64)).collect();
    let frame_refs: Vec<&Frame> = frames.iter().collect();
    let verifying_keys: Vec<_> = keys.iter().map(SigningKey::verifying_key).collect();
    group.throughput(Throughput::Elements(u64::from(BATCH)));
    group.bench_function("verify_batch_64_1KiB_frames", |b| {
        b.iter(|| verify_batch(black_box(&frame_refs), &verifying_keys).expect("valid"))
    });
    group.finish();
}

criterion_group!(proto, benches);
criterion_main!(proto);
