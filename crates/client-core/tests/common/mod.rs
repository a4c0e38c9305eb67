//! Two members of one real MLS room, for tests that need real epoch secrets.
#![allow(dead_code)]

use std::time::{SystemTime, UNIX_EPOCH};

use client_core::mls::{generate_key_packages, Identity, MlsProvider, RoomGroup};
use ed25519_dalek::SigningKey;

/// A member's provider, identity and group state.
pub type Member = (MlsProvider, Identity, RoomGroup);

/// Alice creates `room_id` (with a fixed server key among its external
/// senders) and adds Bob from a key package; both are in epoch 1.
pub fn two_members(alice_seed: u8, bob_seed: u8, room_id: [u8; 16]) -> (Member, Member) {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_secs();
    let server_key = SigningKey::from_bytes(&[42u8; 32]).verifying_key().to_bytes();
    let alice_provider = MlsProvider::from_seed([alice_seed; 32]);
    let alice_identity = Identity::generate(&alice_provider).expect("identity");
    let bob_provider = MlsProvider::from_seed([bob_seed; 32]);
    let bob_identity = Identity::generate(&bob_provider).expect("identity");

    let (mut alice_group, _) =
        RoomGroup::create(&alice_provider, &alice_identity, room_id, &server_key, now).expect("create");
    let key_package =
        generate_key_packages(&bob_provider, &bob_identity, 1, now).expect("key package").remove(0).message;
    let commit = alice_group.add_members(&alice_provider, &alice_identity, &[&key_package]).expect("add");
    alice_group.confirm_pending_commit(&alice_provider).expect("confirm");
    let bob_group = RoomGroup::join_from_welcome(
        &bob_provider,
        commit.welcome.as_ref().expect("welcome"),
        Some(&commit.ratchet_tree),
    )
    .expect("join");
    ((alice_provider, alice_identity, alice_group), (bob_provider, bob_identity, bob_group))
}
