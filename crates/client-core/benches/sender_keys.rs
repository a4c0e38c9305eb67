//! Criterion benchmarks of sender keys: one ratchet step plus
//! XChaCha20-Poly1305 of a 1 KiB message, signatures excluded.
//!
//! Run with `cargo bench -p client-core --bench sender_keys`.
#![allow(missing_docs)]

use std::hint::black_box;

use client_core::sender_keys::SenderKeyState;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use kalandra_proto::{RoomId, SenderId};

const MESSAGE_BYTES: usize = 1024;
const ROOM: RoomId = RoomId([7; 16]);
const EPOCH: u64 = 3;
const EPOCH_SECRET: [u8; 32] = [0x42; 32];
const SENDER_LEAF: u32 = 0;
const RECEIVER_LEAF: u32 = 1;
const SENDER_ID: SenderId = SenderId(0x1122_3344_5566_7788);

fn state(own_leaf: u32) -> SenderKeyState {
    SenderKeyState::new(ROOM, EPOCH, &EPOCH_SECRET, own_leaf, [SENDER_LEAF, RECEIVER_LEAF])
}

fn benches(c: &mut Criterion) {
    let message = vec![0xA5u8; MESSAGE_BYTES];
    let mut group = c.benchmark_group("sender_keys_1KiB");
    group.throughput(Throughput::Bytes(MESSAGE_BYTES as u64));

    let mut sender = state(SENDER_LEAF);
    group.bench_function("ratchet_encrypt", |b| {
        b.iter(|| sender.encrypt(SENDER_ID, black_box(&message)).expect("encrypt"));
    });

    // Setup (untimed) encrypts the next messages in order; the timed routine
    // decrypts them in the same order, each one stepping the receiving chain.
    let mut sender = state(SENDER_LEAF);
    let mut receiver = state(RECEIVER_LEAF);
    group.bench_function("ratchet_decrypt", |b| {
        b.iter_batched(
            || sender.encrypt(SENDER_ID, &message).expect("encrypt"),
            |sealed| {
                receiver
                    .decrypt(SENDER_LEAF, SENDER_ID, sealed.generation, black_box(&sealed.ciphertext))
                    .expect("decrypt")
            },
            BatchSize::SmallInput,
        );
    });
    group.finish();
}

criterion_group!(sender_keys, benches);
criterion_main!(sender_keys);
