//! The seeded provider makes every MLS output a function of the seeds and
//! the inputs: two runs with the same seeds produce the same bytes, a
//! different seed produces different bytes.

use std::time::{SystemTime, UNIX_EPOCH};

use client_core::mls::{generate_key_packages, Identity, MlsProvider, RoomGroup};

const ROOM: [u8; 16] = *b"determinism-room";

/// Everything a run produces that involves randomness: key generation,
/// key packages, HPKE to init keys (Welcome), HPKE to tree nodes (a commit
/// with a path in a three-member group), HPKE export (external commit), and
/// the key schedule.
struct Transcript {
    identities: Vec<Vec<u8>>,
    key_packages: Vec<Vec<u8>>,
    add_commit: Vec<u8>,
    welcome: Vec<u8>,
    update_commit: Vec<u8>,
    external_commit: Vec<u8>,
    exporter_secret: Vec<u8>,
    tree_hash: Vec<u8>,
}

fn run(seed: u8, now: u64) -> Transcript {
    let seed_of = |client: u8| {
        let mut s = [seed; 32];
        s[0] = client;
        s
    };
    let alice_p = MlsProvider::from_seed(seed_of(1));
    let bob_p = MlsProvider::from_seed(seed_of(2));
    let carol_p = MlsProvider::from_seed(seed_of(3));
    let dave_p = MlsProvider::from_seed(seed_of(4));
    let alice = Identity::generate(&alice_p).expect("id");
    let bob = Identity::generate(&bob_p).expect("id");
    let carol = Identity::generate(&carol_p).expect("id");
    let dave = Identity::generate(&dave_p).expect("id");
    let server_key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]).verifying_key().to_bytes();

    let kp_bob = generate_key_packages(&bob_p, &bob, 1, now).expect("kp").remove(0);
    let kp_carol = generate_key_packages(&carol_p, &carol, 1, now).expect("kp").remove(0);

    let (mut a, _) = RoomGroup::create(&alice_p, &alice, ROOM, &server_key, now).expect("create");
    let add = a.add_members(&alice_p, &alice, &[&kp_bob.message, &kp_carol.message]).expect("add");
    a.confirm_pending_commit(&alice_p).expect("confirm");
    let welcome = add.welcome.clone().expect("welcome");
    let mut b = RoomGroup::join_from_welcome(&bob_p, &welcome, Some(&add.ratchet_tree)).expect("join");
    let mut c = RoomGroup::join_from_welcome(&carol_p, &welcome, Some(&add.ratchet_tree)).expect("join");

    // Bob's self-update encrypts path secrets to Alice and Carol.
    let update = b.self_update(&bob_p, &bob).expect("update");
    b.confirm_pending_commit(&bob_p).expect("confirm");
    a.process_handshake(&alice_p, &update.commit).expect("process");
    c.process_handshake(&carol_p, &update.commit).expect("process");

    // Dave joins by external commit (HPKE export to the external key).
    let (_d, external) =
        RoomGroup::join_by_external_commit(&dave_p, &dave, &update.group_info, Some(&update.ratchet_tree))
            .expect("external join");
    a.process_handshake(&alice_p, &external.commit).expect("process");

    Transcript {
        identities: [&alice, &bob, &carol, &dave].iter().map(|i| i.public_key().to_vec()).collect(),
        key_packages: vec![kp_bob.message, kp_carol.message],
        add_commit: add.commit,
        welcome,
        update_commit: update.commit,
        external_commit: external.commit,
        exporter_secret: a.export_secret(&alice_p, "det", b"", 32).expect("export"),
        tree_hash: a.tree_hash(),
    }
}

#[test]
fn same_seed_same_bytes_different_seed_different_bytes() {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs();
    let first = run(0xA5, now);
    let second = run(0xA5, now);
    // Field by field, so that a failure names the output that diverged.
    assert!(first.identities == second.identities, "identities differ");
    assert!(first.key_packages == second.key_packages, "key packages differ");
    assert!(first.add_commit == second.add_commit, "add commits differ");
    assert!(first.welcome == second.welcome, "Welcomes differ");
    assert!(first.update_commit == second.update_commit, "update commits differ");
    assert!(first.external_commit == second.external_commit, "external commits differ");
    assert!(first.exporter_secret == second.exporter_secret, "exporter secrets differ");
    assert!(first.tree_hash == second.tree_hash, "tree hashes differ");

    let other = run(0x5A, now);
    assert_ne!(first.identities, other.identities);
    assert_ne!(first.key_packages, other.key_packages);
    assert_ne!(first.add_commit, other.add_commit);
    assert_ne!(first.welcome, other.welcome);
    assert_ne!(first.update_commit, other.update_commit);
    assert_ne!(first.external_commit, other.external_commit);
    assert_ne!(first.exporter_secret, other.exporter_secret);
    assert_ne!(first.tree_hash, other.tree_hash);
}

/// OpenMLS encrypts path secrets in parallel (rayon). Ciphertexts must not
/// depend on which thread encrypts first: in a sparse 64-member room one
/// self-update carries 63 HPKE ciphertexts, sealed concurrently.
#[test]
fn parallel_path_encryption_is_deterministic() {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs();
    let self_update = |seed: u8| {
        let creator_p = MlsProvider::from_seed([seed; 32]);
        let others_p = MlsProvider::from_seed([seed ^ 0xFF; 32]);
        let creator = Identity::generate(&creator_p).expect("id");
        let server_key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]).verifying_key().to_bytes();
        let key_packages: Vec<Vec<u8>> = (0..63)
            .map(|_| {
                let identity = Identity::generate(&others_p).expect("id");
                generate_key_packages(&others_p, &identity, 1, now).expect("kp").remove(0).message
            })
            .collect();
        let refs: Vec<&[u8]> = key_packages.iter().map(Vec::as_slice).collect();
        let (mut room, _) = RoomGroup::create(&creator_p, &creator, ROOM, &server_key, now).expect("create");
        room.add_members(&creator_p, &creator, &refs).expect("add");
        room.confirm_pending_commit(&creator_p).expect("confirm");
        room.self_update(&creator_p, &creator).expect("update").commit
    };
    let first = self_update(0x11);
    for _ in 0..4 {
        assert!(self_update(0x11) == first, "self-update commits differ");
    }
}
