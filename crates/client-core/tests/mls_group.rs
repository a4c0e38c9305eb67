//! Room groups between several clients, driven in memory: every test plays
//! the server's role by handing each commit to the other members in order.

use std::time::{SystemTime, UNIX_EPOCH};

use client_core::mls::PolicyViolation;
use client_core::mls::{
    generate_key_packages, generate_last_resort_key_package, CommitError, CommitOutput, HandshakeOutcome,
    Identity, JoinError, MlsProvider, PendingCommitError, ProcessError, ProposalSender, RoomGroup,
};
use openmls::prelude::{
    ExternalProposal, GroupEpoch, GroupId, LeafNodeIndex, LeafNodeParameters, MlsGroup, MlsMessageBodyIn,
    MlsMessageIn, NewSignerBundle, OpenMlsProvider as _, ProtocolVersion, SenderExtensionIndex,
    SignatureScheme,
};
use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::OpenMlsRustCrypto;
use tls_codec::{Deserialize as _, Serialize as _};

const ROOM: [u8; 16] = *b"room-0123456789a";
const LABEL: &str = "kalandra test exporter";

/// Key package lifetimes are checked by OpenMLS against the system clock,
/// so tests start from the current time (read once per test).
fn now_unix_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_secs()
}

struct Client {
    provider: MlsProvider,
    identity: Identity,
    group: Option<RoomGroup>,
}

impl Client {
    fn new(seed_byte: u8) -> Self {
        let provider = MlsProvider::from_seed([seed_byte; 32]);
        let identity = Identity::generate(&provider).expect("identity");
        Self { provider, identity, group: None }
    }

    fn group(&mut self) -> &mut RoomGroup {
        self.group.as_mut().expect("client is in the room")
    }

    fn key_package(&self, now: u64) -> Vec<u8> {
        generate_key_packages(&self.provider, &self.identity, 1, now).expect("key package").remove(0).message
    }

    fn exporter(&self) -> Vec<u8> {
        self.group
            .as_ref()
            .expect("in room")
            .export_secret(&self.provider, LABEL, b"ctx", 32)
            .expect("export")
    }

    fn try_process(&mut self, message: &[u8]) -> Result<HandshakeOutcome, ProcessError> {
        self.group.as_mut().expect("in room").process_handshake(&self.provider, message)
    }

    fn process(&mut self, message: &[u8]) -> HandshakeOutcome {
        let provider = &self.provider;
        self.group.as_mut().expect("in room").process_handshake(provider, message).expect("process handshake")
    }

    fn add(&mut self, key_packages: &[&[u8]]) -> CommitOutput {
        let Client { provider, identity, group } = self;
        group.as_mut().expect("in room").add_members(provider, identity, key_packages).expect("add members")
    }

    fn confirm(&mut self) {
        let provider = &self.provider;
        self.group.as_mut().expect("in room").confirm_pending_commit(provider).expect("confirm");
    }

    fn join(&mut self, output: &CommitOutput) {
        let welcome = output.welcome.as_ref().expect("welcome");
        self.group = Some(
            RoomGroup::join_from_welcome(&self.provider, welcome, Some(&output.ratchet_tree))
                .expect("join from welcome"),
        );
    }
}

fn server_key() -> SignatureKeyPair {
    let signing = ed25519_dalek::SigningKey::from_bytes(&[42u8; 32]);
    SignatureKeyPair::from_raw(
        SignatureScheme::ED25519,
        signing.to_bytes().to_vec(),
        signing.verifying_key().to_bytes().to_vec(),
    )
}

/// Alice creates the room and adds Bob and Carol in one commit.
fn three_member_room(now: u64) -> (Client, Client, Client) {
    let mut alice = Client::new(1);
    let mut bob = Client::new(2);
    let mut carol = Client::new(3);
    let (group, created) =
        RoomGroup::create(&alice.provider, &alice.identity, ROOM, server_key().public(), now)
            .expect("create room");
    assert!(!created.group_info.is_empty() && !created.ratchet_tree.is_empty());
    alice.group = Some(group);
    let kp_bob = bob.key_package(now);
    let kp_carol = carol.key_package(now);
    let output = alice.add(&[&kp_bob, &kp_carol]);
    assert_eq!(output.new_epoch, 1);
    alice.confirm();
    bob.join(&output);
    carol.join(&output);
    (alice, bob, carol)
}

fn assert_agree(clients: &[&Client]) {
    let first = clients[0].group.as_ref().expect("in room");
    for client in &clients[1..] {
        let group = client.group.as_ref().expect("in room");
        assert_eq!(group.epoch(), first.epoch(), "epoch");
        assert_eq!(group.tree_hash(), first.tree_hash(), "tree hash");
        assert_eq!(client.exporter(), clients[0].exporter(), "exporter secret");
        assert_eq!(group.members(), first.members(), "members");
    }
}

#[test]
fn create_and_add_two_members_all_agree() {
    let now = now_unix_secs();
    let (alice, bob, carol) = three_member_room(now);
    assert_agree(&[&alice, &bob, &carol]);
    let alice_group = alice.group.as_ref().expect("in room");
    assert_eq!(alice_group.epoch(), 1);
    assert_eq!(alice_group.room_id(), ROOM);
    let members = alice_group.members();
    assert_eq!(members.len(), 3);
    assert_eq!(members[0].identity, alice.identity.public_key().to_vec());
    assert!(members.iter().any(|m| m.identity == bob.identity.public_key().to_vec()));
    assert_ne!(
        bob.group.as_ref().expect("in room").own_leaf_index(),
        carol.group.as_ref().expect("in room").own_leaf_index()
    );
}

#[test]
fn remove_member_all_remaining_agree_and_removed_learns_it() {
    let now = now_unix_secs();
    let (mut alice, mut bob, mut carol) = three_member_room(now);
    let carol_leaf = carol.group().own_leaf_index();
    let Client { provider, identity, group } = &mut alice;
    let output =
        group.as_mut().expect("in room").remove_members(provider, identity, &[carol_leaf]).expect("remove");
    assert!(output.welcome.is_none());
    alice.confirm();
    let HandshakeOutcome::CommitApplied(bob_view) = bob.process(&output.commit) else {
        panic!("expected a commit");
    };
    assert_eq!(bob_view.removed.len(), 1);
    assert_eq!(bob_view.removed[0].leaf_index, carol_leaf);
    assert_eq!(bob_view.removed[0].identity, carol.identity.public_key().to_vec());
    assert!(!bob_view.self_removed);
    let HandshakeOutcome::CommitApplied(carol_view) = carol.process(&output.commit) else {
        panic!("expected a commit");
    };
    assert!(carol_view.self_removed);
    assert!(!carol.group().is_active());
    assert_agree(&[&alice, &bob]);
    assert_eq!(alice.group().members().len(), 2);
}

#[test]
fn self_update_changes_tree_hash_and_all_agree() {
    let now = now_unix_secs();
    let (mut alice, mut bob, mut carol) = three_member_room(now);
    let tree_hash_before = alice.group().tree_hash();
    let exporter_before = alice.exporter();
    let Client { provider, identity, group } = &mut bob;
    let output = group.as_mut().expect("in room").self_update(provider, identity).expect("self update");
    bob.confirm();
    alice.process(&output.commit);
    carol.process(&output.commit);
    assert_agree(&[&alice, &bob, &carol]);
    assert_eq!(alice.group().epoch(), 2);
    assert_ne!(alice.group().tree_hash(), tree_hash_before);
    assert_ne!(alice.exporter(), exporter_before);
}

#[test]
fn external_join_all_agree() {
    let now = now_unix_secs();
    let (mut alice, mut bob, mut carol) = three_member_room(now);
    let group_info = alice
        .group
        .as_ref()
        .expect("in room")
        .group_info(&alice.provider, &alice.identity)
        .expect("group info");
    let tree = alice.group().ratchet_tree().expect("tree");
    let mut dave = Client::new(4);
    let (group, output) =
        RoomGroup::join_by_external_commit(&dave.provider, &dave.identity, &group_info, Some(&tree))
            .expect("external join");
    dave.group = Some(group);
    for member in [&mut alice, &mut bob, &mut carol] {
        let HandshakeOutcome::CommitApplied(applied) = member.process(&output.commit) else {
            panic!("expected a commit");
        };
        assert!(applied.external);
        assert_eq!(applied.committer.identity, dave.identity.public_key().to_vec());
        assert_eq!(applied.committer.leaf_index, dave.group().own_leaf_index());
    }
    assert_agree(&[&alice, &bob, &carol, &dave]);
    assert_eq!(dave.group().members().len(), 4);
    assert_eq!(output.ratchet_tree, alice.group().ratchet_tree().expect("tree"));
}

#[test]
fn concurrent_commits_loser_rebases_into_next_epoch() {
    let now = now_unix_secs();
    let (mut alice, mut bob, mut carol) = three_member_room(now);
    let mut dave = Client::new(4);
    let kp_dave = dave.key_package(now);

    // Both commit for epoch 1: Alice a self-update, Bob adds Dave.
    let Client { provider, identity, group } = &mut alice;
    let alice_commit =
        group.as_mut().expect("in room").self_update(provider, identity).expect("alice commit");
    let bob_commit = bob.add(&[&kp_dave]);
    assert_eq!(alice_commit.new_epoch, 2);
    assert_eq!(bob_commit.new_epoch, 2);

    // The server sequences Alice's first: Alice confirms, the others process it.
    alice.confirm();
    carol.process(&alice_commit.commit);

    // Bob hears WrongEpoch: he drops his commit and processes the winner.
    {
        let provider = &bob.provider;
        let group = bob.group.as_mut().expect("in room");
        assert!(group.has_pending_commit());
        group.discard_pending_commit(provider).expect("discard");
        assert!(matches!(group.discard_pending_commit(provider), Err(PendingCommitError::NoPendingCommit)));
    }
    let HandshakeOutcome::CommitApplied(applied) = bob.process(&alice_commit.commit) else {
        panic!("expected a commit");
    };
    assert!(!applied.own_commit_discarded);
    assert_agree(&[&alice, &bob, &carol]);

    // Bob's stale commit is refused by everyone (epoch 1 < 2).
    let provider = &carol.provider;
    let stale = carol.group.as_mut().expect("in room").process_handshake(provider, &bob_commit.commit);
    assert!(matches!(stale, Err(ProcessError::WrongEpoch { message_epoch: 1, current_epoch: 2 })));

    // Bob re-applies his intent in epoch 2 (a fresh key package: the first
    // one may have been claimed).
    let kp_dave = dave.key_package(now);
    let rebased = bob.add(&[&kp_dave]);
    assert_eq!(rebased.new_epoch, 3);
    bob.confirm();
    alice.process(&rebased.commit);
    carol.process(&rebased.commit);
    dave.join(&rebased);
    assert_agree(&[&alice, &bob, &carol, &dave]);
}

#[test]
fn processing_a_winning_commit_discards_our_pending_one() {
    let now = now_unix_secs();
    let (mut alice, mut bob, _carol) = three_member_room(now);
    let Client { provider, identity, group } = &mut alice;
    let alice_commit =
        group.as_mut().expect("in room").self_update(provider, identity).expect("alice commit");
    let Client { provider, identity, group } = &mut bob;
    group.as_mut().expect("in room").self_update(provider, identity).expect("bob commit");
    alice.confirm();
    let HandshakeOutcome::CommitApplied(applied) = bob.process(&alice_commit.commit) else {
        panic!("expected a commit");
    };
    assert!(applied.own_commit_discarded);
    assert!(!bob.group().has_pending_commit());
    assert_agree(&[&alice, &bob]);
}

#[test]
fn own_commit_is_confirmed_not_processed() {
    let now = now_unix_secs();
    let (mut alice, _bob, _carol) = three_member_room(now);
    let Client { provider, identity, group } = &mut alice;
    let group = group.as_mut().expect("in room");
    let output = group.self_update(provider, identity).expect("commit");
    assert!(matches!(group.self_update(provider, identity), Err(CommitError::CommitPending)));
    assert!(matches!(group.process_handshake(provider, &output.commit), Err(ProcessError::OwnCommit)));
    let applied = group.confirm_pending_commit(provider).expect("confirm");
    assert_eq!(applied.epoch, 2);
    assert_eq!(group.epoch(), 2);
}

#[test]
fn server_remove_proposal_is_committed_by_a_member() {
    let now = now_unix_secs();
    let (mut alice, mut bob, mut carol) = three_member_room(now);
    let carol_leaf = carol.group().own_leaf_index();
    let proposal = ExternalProposal::new_remove::<OpenMlsRustCrypto>(
        LeafNodeIndex::new(carol_leaf),
        GroupId::from_slice(&ROOM),
        GroupEpoch::from(alice.group().epoch()),
        &server_key(),
        SenderExtensionIndex::new(0),
    )
    .expect("server proposal")
    .tls_serialize_detached()
    .expect("encode");
    let mut proposal_ref = None;
    for member in [&mut alice, &mut bob, &mut carol] {
        let HandshakeOutcome::ProposalStored { proposal_ref: r, sender, removes } = member.process(&proposal)
        else {
            panic!("expected a stored proposal");
        };
        assert_eq!(sender, ProposalSender::External(0));
        assert_eq!(removes, Some(carol_leaf));
        proposal_ref = Some(r);
    }
    assert_eq!(bob.group().pending_proposal_count(), 1);

    let Client { provider, identity, group } = &mut bob;
    let output =
        group.as_mut().expect("in room").commit_pending_proposals(provider, identity).expect("commit");
    let applied =
        bob.group.as_mut().expect("in room").confirm_pending_commit(&bob.provider).expect("confirm");
    assert_eq!(applied.covered_proposal_refs, vec![proposal_ref.expect("ref")]);
    assert_eq!(applied.removed.len(), 1);
    alice.process(&output.commit);
    let HandshakeOutcome::CommitApplied(carol_view) = carol.process(&output.commit) else {
        panic!("expected a commit");
    };
    assert!(carol_view.self_removed);
    assert_agree(&[&alice, &bob]);
    assert_eq!(alice.group().members().len(), 2);
}

#[test]
fn leave_is_a_remove_proposal_another_member_commits() {
    let now = now_unix_secs();
    let (mut alice, mut bob, mut carol) = three_member_room(now);
    let Client { provider, identity, group } = &mut carol;
    let left = group.as_mut().expect("in room").leave(provider, identity).expect("leave");
    let carol_leaf = carol.group().own_leaf_index();
    for member in [&mut alice, &mut bob] {
        let HandshakeOutcome::ProposalStored { proposal_ref, sender, removes } =
            member.process(&left.proposal)
        else {
            panic!("expected a stored proposal");
        };
        assert_eq!(proposal_ref, left.proposal_ref);
        assert_eq!(sender, ProposalSender::Member(carol_leaf));
        assert_eq!(removes, Some(carol_leaf));
    }
    let Client { provider, identity, group } = &mut alice;
    let output =
        group.as_mut().expect("in room").commit_pending_proposals(provider, identity).expect("commit");
    alice.confirm();
    bob.process(&output.commit);
    let HandshakeOutcome::CommitApplied(carol_view) = carol.process(&output.commit) else {
        panic!("expected a commit");
    };
    assert!(carol_view.self_removed);
    assert_eq!(carol_view.covered_proposal_refs, vec![left.proposal_ref]);
    assert_agree(&[&alice, &bob]);
}

#[test]
fn tampered_and_misrouted_messages_are_rejected() {
    let now = now_unix_secs();
    let (mut alice, mut bob, _carol) = three_member_room(now);
    let Client { provider, identity, group } = &mut alice;
    let output = group.as_mut().expect("in room").self_update(provider, identity).expect("commit");
    let provider = &bob.provider;
    let group = bob.group.as_mut().expect("in room");

    // Flip a byte inside the signed content (past the framing header).
    let mut tampered = output.commit.clone();
    let middle = tampered.len() / 2;
    tampered[middle] ^= 0x01;
    let error = group.process_handshake(provider, &tampered).expect_err("tampered commit");
    assert!(error.is_peer_fault(), "{error:?}");

    assert!(matches!(
        group.process_handshake(provider, &output.commit[..10]),
        Err(ProcessError::Malformed(_))
    ));
    assert!(matches!(
        group.process_handshake(provider, &output.welcome.clone().unwrap_or(output.group_info.clone())),
        Err(ProcessError::NotAPublicMessage)
    ));
    // The untampered commit still applies.
    assert!(group.process_handshake(provider, &output.commit).is_ok());
    assert_eq!(group.epoch(), 2);
}

/// The policy violation a refused handshake carries.
fn violation(error: &ProcessError) -> Option<PolicyViolation> {
    match error {
        ProcessError::Invalid(source) => source.downcast_ref::<PolicyViolation>().cloned(),
        _ => None,
    }
}

/// A member's identity is its signature key: an Update proposal or an
/// update path that installs another key (and credential) in its leaf
/// would make it someone else, and is refused before merging.
#[test]
fn updates_that_change_a_members_identity_are_refused() {
    let now = now_unix_secs();
    let (mut alice, bob, _carol) = three_member_room(now);
    let other = Identity::generate(&bob.provider).expect("identity");
    let new_signer =
        || NewSignerBundle { signer: other.signer(), credential_with_key: other.credential_with_key() };
    let mut bob_mls = MlsGroup::load(bob.provider.storage(), &GroupId::from_slice(&ROOM)).unwrap().unwrap();

    let (proposal, _) = bob_mls
        .propose_self_update_with_new_signer(
            &bob.provider,
            bob.identity.signer(),
            new_signer(),
            LeafNodeParameters::default(),
        )
        .expect("proposal");
    let refused = alice.try_process(&proposal.tls_serialize_detached().unwrap());
    assert_eq!(
        violation(&refused.expect_err("identity-changing Update")),
        Some(PolicyViolation::IdentityChange)
    );
    bob_mls.clear_pending_proposals(bob.provider.storage()).unwrap();

    let bundle = bob_mls
        .self_update_with_new_signer(
            &bob.provider,
            bob.identity.signer(),
            new_signer(),
            LeafNodeParameters::default(),
        )
        .expect("commit");
    let (commit, _, _) = bundle.into_messages();
    let refused = alice.try_process(&commit.tls_serialize_detached().unwrap());
    assert_eq!(
        violation(&refused.expect_err("identity-changing path")),
        Some(PolicyViolation::IdentityChange)
    );
    assert_eq!(alice.group().epoch(), 1, "nothing was merged");

    // An update that keeps the key applies.
    let mut bob = bob;
    bob.group = RoomGroup::load(&bob.provider, ROOM).unwrap();
    bob.group.as_mut().unwrap().discard_pending_commit(&bob.provider).unwrap();
    let Client { provider, identity, group } = &mut bob;
    let output = group.as_mut().unwrap().self_update(provider, identity).expect("self update");
    alice.process(&output.commit);
    assert_eq!(alice.group().epoch(), 2);
}

#[test]
fn welcome_for_someone_else_is_not_for_us() {
    let now = now_unix_secs();
    let mut alice = Client::new(1);
    let bob = Client::new(2);
    let eve = Client::new(5);
    let (group, _) = RoomGroup::create(&alice.provider, &alice.identity, ROOM, server_key().public(), now)
        .expect("create");
    alice.group = Some(group);
    let output = alice.add(&[&bob.key_package(now)]);
    let result = RoomGroup::join_from_welcome(
        &eve.provider,
        output.welcome.as_ref().expect("welcome"),
        Some(&output.ratchet_tree),
    );
    assert!(matches!(result, Err(JoinError::NotForUs)), "{result:?}");
}

#[test]
fn bad_key_packages_are_rejected_before_committing() {
    let now = now_unix_secs();
    let mut alice = Client::new(1);
    let (group, created) =
        RoomGroup::create(&alice.provider, &alice.identity, ROOM, server_key().public(), now)
            .expect("create");
    alice.group = Some(group);
    let Client { provider, identity, group } = &mut alice;
    let group = group.as_mut().expect("in room");
    assert!(matches!(
        group.add_members(provider, identity, &[&[0u8, 1, 2]]),
        Err(CommitError::MalformedKeyPackage { index: 0, .. })
    ));
    assert!(matches!(
        group.add_members(provider, identity, &[&created.group_info]),
        Err(CommitError::NotAKeyPackage { index: 0 })
    ));
    // An expired key package fails verification.
    let bob = Client::new(2);
    let expired =
        generate_key_packages(&bob.provider, &bob.identity, 1, 1_000_000_000).expect("kp").remove(0).message;
    assert!(matches!(
        group.add_members(provider, identity, &[&expired]),
        Err(CommitError::InvalidKeyPackage { index: 0, .. })
    ));
    assert!(matches!(group.remove_members(provider, identity, &[0]), Err(CommitError::SelfRemoval)));
    assert!(matches!(group.remove_members(provider, identity, &[7]), Err(CommitError::UnknownMember(7))));
    assert!(!group.has_pending_commit());
}

#[test]
fn last_resort_key_package_is_marked_and_usable() {
    let now = now_unix_secs();
    let bob = Client::new(2);
    let generated = generate_last_resort_key_package(&bob.provider, &bob.identity, now).expect("last resort");
    let message = MlsMessageIn::tls_deserialize_exact(&generated.message).expect("decode");
    let MlsMessageBodyIn::KeyPackage(key_package) = message.extract() else {
        panic!("not a key package");
    };
    let key_package = key_package
        .validate(&openmls_rust_crypto::RustCrypto::default(), ProtocolVersion::Mls10)
        .expect("valid");
    assert!(key_package.last_resort());
    assert_eq!(generated.not_after_unix_secs, key_package.life_time().not_after());

    let regular = generate_key_packages(&bob.provider, &bob.identity, 3, now).expect("kps");
    assert_eq!(regular.len(), 3);
    assert_ne!(regular[0].key_package_ref, regular[1].key_package_ref);

    // Joining through the last-resort package works.
    let mut alice = Client::new(1);
    let (group, _) = RoomGroup::create(&alice.provider, &alice.identity, ROOM, server_key().public(), now)
        .expect("create");
    alice.group = Some(group);
    let output = alice.add(&[&generated.message]);
    alice.confirm();
    let mut bob = bob;
    bob.join(&output);
    assert_agree(&[&alice, &bob]);
}

#[test]
fn group_survives_reload_from_storage() {
    let now = now_unix_secs();
    let (alice, _bob, _carol) = three_member_room(now);
    let reloaded = RoomGroup::load(&alice.provider, ROOM).expect("load").expect("present");
    let original = alice.group.as_ref().expect("in room");
    assert_eq!(reloaded.epoch(), original.epoch());
    assert_eq!(reloaded.tree_hash(), original.tree_hash());
    assert_eq!(reloaded.export_secret(&alice.provider, LABEL, b"ctx", 32).expect("export"), alice.exporter());
    assert!(RoomGroup::load(&alice.provider, [0u8; 16]).expect("load").is_none());
}

#[test]
fn refused_external_join_is_deleted_from_storage() {
    let now = now_unix_secs();
    let (mut alice, _bob, _carol) = three_member_room(now);
    let group_info = alice
        .group
        .as_ref()
        .expect("in room")
        .group_info(&alice.provider, &alice.identity)
        .expect("group info");
    let tree = alice.group().ratchet_tree().expect("tree");
    let dave = Client::new(4);
    let (group, _output) =
        RoomGroup::join_by_external_commit(&dave.provider, &dave.identity, &group_info, Some(&tree))
            .expect("external join");
    assert!(RoomGroup::load(&dave.provider, ROOM).expect("load").is_some());
    // The server answered WrongEpoch: Dave drops the state and may retry.
    group.delete(&dave.provider).expect("delete");
    assert!(RoomGroup::load(&dave.provider, ROOM).expect("load").is_none());
    let (retry, _) =
        RoomGroup::join_by_external_commit(&dave.provider, &dave.identity, &group_info, Some(&tree))
            .expect("retry");
    assert_eq!(retry.epoch(), 2);
    assert!(matches!(
        RoomGroup::join_by_external_commit(&dave.provider, &dave.identity, b"junk", None),
        Err(JoinError::Malformed(_))
    ));
    assert!(matches!(
        RoomGroup::join_by_external_commit(&dave.provider, &dave.identity, &tree, None),
        Err(JoinError::Malformed(_) | JoinError::NotAGroupInfo)
    ));
}

#[test]
fn room_creation_checks_its_inputs() {
    use client_core::mls::CreateRoomError;
    let now = now_unix_secs();
    let alice = Client::new(1);
    let create = |key: &[u8]| RoomGroup::create(&alice.provider, &alice.identity, ROOM, key, now);
    assert!(matches!(create(&[1u8; 31]), Err(CreateRoomError::InvalidServerKeyLength(31))));
    let not_a_point = (0u8..=255)
        .map(|b| [b; 32])
        .find(|bytes| ed25519_dalek::VerifyingKey::from_bytes(bytes).is_err())
        .expect("some byte pattern is not a curve point");
    assert!(matches!(create(&not_a_point), Err(CreateRoomError::InvalidServerKey)));
    assert!(create(server_key().public()).is_ok());
    assert!(matches!(create(server_key().public()), Err(CreateRoomError::AlreadyExists)));
}

mod home_certificates {
    use super::*;
    use client_core::mls::LeafHome;
    use kalandra_proto::federation::{DomainName, HomeCertificate, PeerKey, PeerKeys};
    use kalandra_proto::home::HomeCheck;

    fn domain(name: &str) -> DomainName {
        DomainName::parse(name).unwrap()
    }

    fn domain_key(byte: u8) -> ed25519_dalek::SigningKey {
        ed25519_dalek::SigningKey::from_bytes(&[byte; 32])
    }

    fn certify(client: &mut Client, key: &ed25519_dalek::SigningKey, home: &str, now_ms: u64) {
        let certificate =
            HomeCertificate::issue(key, domain(home), *client.identity.public_key(), now_ms + 3_600_000);
        client.identity.set_home_certificate(Some(certificate));
    }

    /// What `viewer` finds of each member, by identity, with a.test's and
    /// b.test's keys known.
    fn homes(viewer: &Client, now_ms: u64) -> Vec<(Vec<u8>, HomeCheck)> {
        let a = PeerKeys::new(
            domain("a.test"),
            vec![PeerKey { key: domain_key(0xa1).verifying_key(), valid_until_ms: None }],
        )
        .unwrap();
        let b = PeerKeys::new(
            domain("b.test"),
            vec![PeerKey { key: domain_key(0xb2).verifying_key(), valid_until_ms: None }],
        )
        .unwrap();
        let leaves: Vec<(client_core::mls::MemberInfo, LeafHome)> =
            viewer.group.as_ref().expect("in room").member_home_certificates();
        leaves
            .into_iter()
            .map(|(member, leaf)| {
                let keys_of = |name: &DomainName| [&a, &b].into_iter().find(|keys| keys.domain() == name);
                (member.identity, leaf.check(keys_of, now_ms))
            })
            .collect()
    }

    fn check_of<'h>(homes: &'h [(Vec<u8>, HomeCheck)], client: &Client) -> &'h HomeCheck {
        &homes.iter().find(|(identity, _)| identity == client.identity.public_key()).expect("a member").1
    }

    /// Every member sees the same verdict on each leaf: the creator's and a
    /// joiner's certificates hold; a certificate of b.test signed with
    /// a.test's key (a domain speaking for another's user), one naming
    /// another key, and a leaf with none are told apart; a self-update
    /// renews a member's certificate in its leaf.
    #[test]
    fn members_check_each_leafs_home_certificate_themselves() {
        let now = now_unix_secs();
        let now_ms = now * 1000;
        let (mut alice, mut bob, mut mallory, mut trent, eve) =
            (Client::new(1), Client::new(2), Client::new(3), Client::new(4), Client::new(5));
        certify(&mut alice, &domain_key(0xa1), "a.test", now_ms);
        certify(&mut bob, &domain_key(0xb2), "b.test", now_ms);
        // a.test certifies mallory as b.test's user: not b.test's signature.
        certify(&mut mallory, &domain_key(0xa1), "b.test", now_ms);
        let (group, _) =
            RoomGroup::create(&alice.provider, &alice.identity, ROOM, server_key().public(), now)
                .expect("create");
        alice.group = Some(group);
        let packages = [bob.key_package(now), mallory.key_package(now), eve.key_package(now)];
        let output = alice.add(&[&packages[0], &packages[1], &packages[2]]);
        alice.confirm();
        bob.join(&output);

        for viewer in [&alice, &bob] {
            let homes = homes(viewer, now_ms);
            assert_eq!(homes.len(), 4);
            assert!(
                matches!(check_of(&homes, &alice), HomeCheck::Certified { domain: d, .. } if d.as_str() == "a.test")
            );
            assert!(
                matches!(check_of(&homes, &bob), HomeCheck::Certified { domain: d, .. } if d.as_str() == "b.test")
            );
            assert!(matches!(check_of(&homes, &mallory), HomeCheck::Invalid { .. }), "{homes:?}");
            assert_eq!(check_of(&homes, &eve), &HomeCheck::Uncertified);
        }
        // After its end, a certificate shows as expired, until a self-update renews it.
        let later_ms = now_ms + 2 * 3_600_000;
        assert!(matches!(check_of(&homes(&bob, later_ms), &alice), HomeCheck::Expired { .. }));
        certify(&mut alice, &domain_key(0xa1), "a.test", later_ms);
        let update = {
            let Client { provider, identity, group } = &mut alice;
            group.as_mut().expect("in room").self_update(provider, identity).expect("self-update")
        };
        alice.confirm();
        bob.process(&update.commit);
        assert!(matches!(check_of(&homes(&bob, later_ms), &alice), HomeCheck::Certified { .. }));

        // A certificate for another key than the leaf's (an identity refuses to carry it).
        let stolen = bob.identity.home_certificate().cloned().expect("bob is certified");
        trent.identity.set_home_certificate(Some(stolen.clone()));
        assert_eq!(trent.identity.home_certificate(), None);
        let trent_key = trent.identity.public_key().to_vec();
        let leaf = |credential_is_key| LeafHome {
            signature_key: trent_key.clone(),
            credential_is_key,
            certificate: Some(Ok(stolen.clone())),
        };
        let b_keys = PeerKeys::new(
            domain("b.test"),
            vec![PeerKey { key: domain_key(0xb2).verifying_key(), valid_until_ms: None }],
        )
        .unwrap();
        for credential_is_key in [true, false] {
            let check = leaf(credential_is_key).check(|_| Some(&b_keys), now_ms);
            assert!(matches!(check, HomeCheck::Invalid { .. }), "{check:?}");
        }
        // A leaf whose credential names bob's key, with bob's certificate,
        // but another signature key: what a member that joined by Welcome
        // could be shown by a hostile room; invalid, not bob's.
        let impostor = LeafHome {
            signature_key: trent_key.clone(),
            credential_is_key: false,
            certificate: Some(Ok(stolen.clone())),
        };
        let check = impostor.check(|_| Some(&b_keys), now_ms);
        assert!(
            matches!(check, HomeCheck::Invalid { ref reason } if reason.contains("credential")),
            "{check:?}"
        );
        let genuine = LeafHome {
            signature_key: bob.identity.public_key().to_vec(),
            credential_is_key: true,
            certificate: Some(Ok(stolen)),
        };
        assert!(matches!(genuine.check(|_| Some(&b_keys), now_ms), HomeCheck::Certified { .. }));
    }
}
