//! In-memory sequencing throughput of the pure room sequencer: submit,
//! then mark durable in batches and collect acknowledgements and fan-out.
//! No MLS work is involved (application messages only), no storage, no I/O.
//!
//! Run with `cargo bench -p kalandra-server --bench sequencer`.
#![allow(missing_docs)]

use std::collections::HashSet;
use std::hint::black_box;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ed25519_dalek::SigningKey;
use kalandra_proto::chain::{log_entry_digest, LogChain, SignedLogHead};
use kalandra_proto::payload::{Application, CreateRoom};
use kalandra_proto::{Frame, FrameHeaderBuf, Opcode, RoomId, SenderId};
use kalandra_server::sim::{
    CommitRules, CommitSummary, GroupError, GroupState, ProposalRef, RoomPolicy, RoomSequencer,
};

/// Membership only: application messages never reach MLS validation.
/// With a transcript hash, the sequencer checks each message's epoch tag
/// (as it does on the MLS-backed state); without, it skips that check.
struct MembersOnly(HashSet<SenderId>, Option<[u8; 32]>);

impl GroupState for MembersOnly {
    fn epoch(&self) -> u64 {
        0
    }
    fn is_member(&self, sender: SenderId) -> bool {
        self.0.contains(&sender)
    }
    fn members(&self) -> Vec<SenderId> {
        self.0.iter().copied().collect()
    }
    fn apply_commit(&mut self, _: &[u8], _: &CommitRules<'_>) -> Result<CommitSummary, GroupError> {
        Err(GroupError::Invalid("benchmark group takes no commits".into()))
    }
    fn apply_proposal(&mut self, _: &[u8], _: Option<&RoomPolicy>) -> Result<ProposalRef, GroupError> {
        Err(GroupError::Invalid("benchmark group takes no proposals".into()))
    }
    fn group_info_valid(&self, _: &[u8], _: SenderId) -> bool {
        false
    }
    fn only_external_sender_is(&self, _: &[u8; 32]) -> bool {
        true
    }
    fn ratchet_tree(&self) -> Bytes {
        Bytes::new()
    }
    fn confirmed_transcript_hash(&self) -> Option<&[u8]> {
        self.1.as_ref().map(|hash| hash.as_slice())
    }
}

const TRANSCRIPT_HASH: [u8; 32] = [0x11; 32];

const ROOM: RoomId = RoomId([3; 16]);
const BATCH_FRAMES: u64 = 1024;

/// A room of `senders` and one 1 KiB message of each, tagged with the
/// room's epoch tag; `checks_tags`: whether the room's state checks it.
fn room_and_messages(senders: &[SenderId], checks_tags: bool) -> (RoomSequencer<MembersOnly>, Vec<Frame>) {
    let mut create = FrameHeaderBuf::new(Opcode::CreateRoom);
    create.set_room_id(ROOM).set_sender_id(senders[0]);
    let create = Frame::with_payload(
        create,
        &CreateRoom { group_info: vec![1], ratchet_tree: vec![1], join_rule: None },
    )
    .unwrap();
    let group = MembersOnly(senders.iter().copied().collect(), checks_tags.then_some(TRANSCRIPT_HASH));
    let (mut room, _) = RoomSequencer::create(ROOM, group, senders[0], create, 0, &[0; 32]).unwrap();
    room.durable(0, &mut Vec::new());
    let frames = senders
        .iter()
        .map(|sender| {
            let mut header = FrameHeaderBuf::new(Opcode::Application);
            header.set_room_id(ROOM).set_sender_id(*sender).set_request_id(7);
            let payload = Application {
                generation: 1,
                ciphertext: Bytes::from(vec![0x5A; 1024]),
                push: None,
                epoch_tag: Some(kalandra_proto::epoch_tag(ROOM, 0, &TRANSCRIPT_HASH)),
            };
            Frame::with_payload(header, &payload).unwrap()
        })
        .collect();
    (room, frames)
}

/// Submits a batch of `BATCH_FRAMES` messages, then marks them durable.
fn submit_batch(
    room: &mut RoomSequencer<MembersOnly>,
    senders: &[SenderId],
    frames: &[Frame],
    now_ms: &mut u64,
    effects: &mut Vec<kalandra_server::sim::Effect>,
) {
    for i in 0..BATCH_FRAMES {
        let index = usize::try_from(i).unwrap() % frames.len();
        let sequenced = room.submit(senders[index], frames[index].clone(), *now_ms).expect("accepted");
        black_box(sequenced.log_index);
    }
    *now_ms += 1;
    effects.clear();
    room.durable(room.next_log_index() - 1, effects);
    black_box(effects.len());
}

fn bench(c: &mut Criterion) {
    let senders: Vec<SenderId> = (1..=100).map(SenderId).collect();
    let (mut room, frames) = room_and_messages(&senders, true);
    let (mut unchecked_room, _) = room_and_messages(&senders, false);
    let mut effects = Vec::with_capacity(4 * usize::try_from(BATCH_FRAMES).unwrap());

    let mut group = c.benchmark_group("sequencer");
    group.throughput(Throughput::Elements(BATCH_FRAMES));
    let mut now_ms = 1u64;
    group.bench_function("application_1KiB_submit_and_durable_batch_1024", |b| {
        b.iter(|| submit_batch(&mut room, &senders, &frames, &mut now_ms, &mut effects))
    });
    // The same without the epoch-tag check (a state that knows no
    // transcript hash), as a baseline in the same run.
    group.bench_function("application_1KiB_submit_and_durable_batch_1024_tag_unchecked", |b| {
        b.iter(|| submit_batch(&mut unchecked_room, &senders, &frames, &mut now_ms, &mut effects))
    });
    // The hash chain alone, as the sequencer runs it per frame: the digest
    // of the stamped 1 KiB frame and the next head.
    let mut chain = LogChain::genesis();
    group.bench_function("log_chain_1KiB_digest_and_head_1024", |b| {
        b.iter(|| {
            for i in 0..BATCH_FRAMES {
                let index = usize::try_from(i).unwrap() % frames.len();
                black_box(chain.extend(ROOM, &log_entry_digest(&frames[index])));
            }
            black_box(chain.head)
        })
    });
    // The server's signature over a head: one per room and durable batch.
    let signer = SigningKey::from_bytes(&[7; 32]);
    group.throughput(Throughput::Elements(1));
    group.bench_function("log_head_signature", |b| {
        b.iter(|| black_box(SignedLogHead::sign(ROOM, chain.next_log_index, chain.head, &signer)))
    });
    group.finish();
}

criterion_group!(sequencer, bench);
criterion_main!(sequencer);
