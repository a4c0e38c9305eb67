//! Server-side validation and merge of a commit (`RoomGroupState::validate_commit`)
//! in rooms of 1,000 and 10,000 members.
//!
//! The room is built once per size, outside the timed loop: the creator
//! adds every other member in one commit, so the tree is as sparse as it
//! gets (no member has updated its path yet), which is the worst case for a
//! commit with a path. Two commits are measured against that state:
//!
//! - `self_update`: the creator's self-update, whose path encrypts to every
//!   other member (n − 1 HPKE ciphertexts the server parses and hashes);
//! - `add_one`: the creator adds one member (no path).
//!
//! Validation mutates the state, so every iteration restores it from a
//! snapshot first; only `validate_commit` is timed.

use std::hint::black_box;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use client_core::mls::{generate_key_packages, Identity, MlsProvider, RoomGroup};
use criterion::{criterion_main, BenchmarkId, Criterion, SamplingMode};
use kalandra_server::sim::RoomGroupState;

const ROOM: [u8; 16] = *b"bench-room-00001";

struct Fixture {
    snapshot: Vec<u8>,
    self_update: Vec<u8>,
    add_one: Vec<u8>,
}

fn fixture(members: usize) -> Fixture {
    // OpenMLS checks key package lifetimes against the system clock.
    let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_secs();
    let server_key = ed25519_dalek::SigningKey::from_bytes(&[42; 32]).verifying_key().to_bytes();
    let creator_provider = MlsProvider::from_seed([1; 32]);
    let creator = Identity::generate(&creator_provider).expect("identity");
    let others_provider = MlsProvider::from_seed([2; 32]);
    let key_package = || {
        let identity = Identity::generate(&others_provider).expect("identity");
        generate_key_packages(&others_provider, &identity, 1, now).expect("key package").remove(0).message
    };

    let (mut room, created) =
        RoomGroup::create(&creator_provider, &creator, ROOM, &server_key, now).expect("create");
    let mut server =
        RoomGroupState::from_group_info(&created.group_info, &created.ratchet_tree).expect("state");
    let key_packages: Vec<Vec<u8>> = (1..members).map(|_| key_package()).collect();
    let refs: Vec<&[u8]> = key_packages.iter().map(Vec::as_slice).collect();
    let add_all = room.add_members(&creator_provider, &creator, &refs).expect("add members");
    server.validate_commit(&add_all.commit).expect("valid");
    room.confirm_pending_commit(&creator_provider).expect("confirm");
    assert_eq!(server.member_count(), members);

    let self_update = room.self_update(&creator_provider, &creator).expect("self update").commit;
    room.discard_pending_commit(&creator_provider).expect("discard");
    let extra = key_package();
    let add_one = room.add_members(&creator_provider, &creator, &[&extra]).expect("add one").commit;
    Fixture { snapshot: server.snapshot().expect("snapshot"), self_update, add_one }
}

fn commit_validation(c: &mut Criterion) {
    for (members, measurement_secs) in [(1_000usize, 5u64), (10_000, 10)] {
        let fixture = fixture(members);
        let mut group = c.benchmark_group(format!("commit_validation/{members}_members"));
        group
            .sample_size(10)
            .sampling_mode(SamplingMode::Flat)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(measurement_secs));
        for (name, commit) in [("self_update", &fixture.self_update), ("add_one", &fixture.add_one)] {
            group.bench_with_input(BenchmarkId::from_parameter(name), commit, |b, commit| {
                b.iter_custom(|iterations| {
                    let mut timed = Duration::ZERO;
                    for _ in 0..iterations {
                        let mut state = RoomGroupState::restore(&fixture.snapshot).expect("restore");
                        let start = Instant::now();
                        let summary = state.validate_commit(black_box(commit)).expect("valid");
                        timed += start.elapsed();
                        black_box(summary);
                    }
                    timed
                })
            });
        }
        group.finish();
    }
}

/// The benchmark group (criterion's `criterion_group!` without the
/// undocumented function it generates).
fn benches() {
    let mut criterion = Criterion::default().configure_from_args();
    commit_validation(&mut criterion);
}

criterion_main!(benches);
