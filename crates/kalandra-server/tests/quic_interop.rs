//! Another MLS implementation against the server over real QUIC: a stranger
//! whose MLS is AWS's mls-rs (its RustCrypto provider) joins an open room by
//! external commit, exactly as an OpenMLS client does (GroupInfo and ratchet
//! tree from `GroupInfoRequest`, the commit and the new epoch's GroupInfo in
//! an `ExternalJoin` frame).
//!
//! mls-rs's external-commit builder can add a Remove of any leaf
//! (`with_removal`), which OpenMLS's cannot, so it sends what a hostile or
//! merely different joiner could: an external commit that also removes the
//! admin, or another member. Such a commit is valid MLS (RFC 9420 §12.4.3.2
//! leaves it to the application to decide whose leaf a joiner may remove;
//! OpenMLS's validation accepts it), and the server refuses it by room
//! policy (`RoomPolicy::may_remove`: `JoinerRemovesOther`) with `Forbidden`
//! before it gets a log index. The control: the same stranger's external
//! commit without the removal is accepted, and the OpenMLS members that
//! process it reach the same epoch secret as mls-rs, so the refusal is for
//! the removal and not a failure to interoperate. See `docs/SECURITY.md`.

mod common;

use common::*;
use kalandra_mls::PolicyError;
use kalandra_proto::payload::{
    Ack, Application, Error as ErrorPayload, ExternalJoin, GroupInfo, GroupInfoRequest, JoinRule, Subscribe,
};
use kalandra_proto::{ErrorCode, Frame, Opcode, RoomId};
use mls_rs::client_builder::MlsConfig;
use mls_rs::crypto::{SignaturePublicKey, SignatureSecretKey};
use mls_rs::group::ExportedTree;
use mls_rs::identity::basic::{BasicCredential, BasicIdentityProvider, BasicIdentityProviderError};
use mls_rs::identity::{CredentialType, SigningIdentity};
use mls_rs::time::MlsTime;
use mls_rs::{CipherSuite, Client, ExtensionList, Group, IdentityProvider, MlsMessage};
use mls_rs_core::identity::MemberValidationContext;
use mls_rs_crypto_rustcrypto::RustCryptoProvider;

const ROOM: RoomId = RoomId(*b"room-for-testing");
/// Shares the first eight bytes (which choose the shard) with [`ROOM`]:
/// on the same shard whatever the shard count.
const NEIGHBOUR: RoomId = RoomId(*b"room-for-neighbr");

/// Kalandra's only ciphersuite (`kalandra_mls::CIPHERSUITE`, 0x0001) as
/// mls-rs names it.
const SUITE: CipherSuite = CipherSuite::CURVE25519_AES128;

/// An exporter label both implementations derive a secret for, to compare
/// their key schedules.
const EXPORTER_LABEL: &str = "kalandra interop";

/// Asserts a refusal with `code`; returns its message.
fn assert_refused(reply: &Frame, code: ErrorCode, what: &str) -> String {
    assert_eq!(reply.opcode(), Opcode::Error, "{what}: expected a refusal, got {reply:?}");
    let error: ErrorPayload = reply.decode_payload().unwrap();
    assert_eq!(error.code, code as u16, "{what}: {}", error.message);
    error.message
}

/// The admin (Alice, leaf 0) creates an open `ROOM` and adds Bob; Dan
/// creates a room on the same shard. Returns (Alice, Bob, Dan).
async fn open_room(server: &TestServer) -> (TestClient, TestClient, TestClient) {
    let mut dan = TestClient::connect(server, "dan", 40).await;
    assert_eq!(dan.create_room(NEIGHBOUR).await.log_index, 0);
    let mut bob = TestClient::connect(server, "bob", 2).await;
    bob.upload_key_packages(2).await;
    let mut alice = TestClient::connect(server, "alice", 1).await;
    assert_eq!(alice.create_room_with(ROOM, Some(JoinRule::Open)).await.log_index, 0);
    let ack: Ack = decode_ok(&alice.add(&[bob.sender()]).await);
    assert_eq!((ack.log_index, ack.epoch), (1, 1));
    bob.join_from_welcome(ROOM).await;
    (alice, bob, dan)
}

/// Basic credentials as mls-rs's `BasicIdentityProvider` checks them,
/// except that a joiner may succeed (remove) any leaf. mls-rs asks the
/// application whether an external commit's Remove is the joiner's own
/// earlier leaf (`valid_successor`, RFC 9420 §12.4.3.2) and by default
/// refuses another credential's; this stranger's application allows it, so
/// the server is the one that has to refuse.
#[derive(Clone)]
struct AnyLeafMayBeReplaced(BasicIdentityProvider);

impl IdentityProvider for AnyLeafMayBeReplaced {
    type Error = BasicIdentityProviderError;

    fn validate_member(
        &self,
        identity: &SigningIdentity,
        time: Option<MlsTime>,
        context: MemberValidationContext<'_>,
    ) -> Result<(), Self::Error> {
        self.0.validate_member(identity, time, context)
    }

    fn validate_external_sender(
        &self,
        identity: &SigningIdentity,
        time: Option<MlsTime>,
        extensions: Option<&ExtensionList>,
    ) -> Result<(), Self::Error> {
        self.0.validate_external_sender(identity, time, extensions)
    }

    fn identity(
        &self,
        identity: &SigningIdentity,
        extensions: &ExtensionList,
    ) -> Result<Vec<u8>, Self::Error> {
        self.0.identity(identity, extensions)
    }

    fn valid_successor(
        &self,
        _predecessor: &SigningIdentity,
        _successor: &SigningIdentity,
        _extensions: &ExtensionList,
    ) -> Result<bool, Self::Error> {
        Ok(true)
    }

    fn supported_types(&self) -> Vec<CredentialType> {
        self.0.supported_types()
    }
}

/// An mls-rs client holding `stranger`'s identity key as Kalandra's
/// credential rule wants it (`kalandra_mls::credential_matches_key`): a
/// basic credential whose identity is the Ed25519 public key that signs the
/// leaf, the key the stranger authenticated its connection with.
fn mls_rs_client(stranger: &TestClient) -> Client<impl MlsConfig> {
    let public = stranger.key.verifying_key().to_bytes().to_vec();
    let identity = SigningIdentity::new(
        BasicCredential::new(public.clone()).into_credential(),
        SignaturePublicKey::from(public),
    );
    // The RustCrypto provider's Ed25519 secret key is the keypair encoding
    // (seed, then public key).
    let secret = SignatureSecretKey::from(stranger.key.to_keypair_bytes().to_vec());
    Client::builder()
        .identity_provider(AnyLeafMayBeReplaced(BasicIdentityProvider::new()))
        .crypto_provider(RustCryptoProvider::with_enabled_cipher_suites(vec![SUITE]))
        .signing_identity(identity, secret, SUITE)
        .build()
}

/// mls-rs's external commit into the room `info` describes, also removing
/// leaf `remove` when given: the joiner's group (in the new epoch) and the
/// `ExternalJoin` payload (the commit and the new epoch's GroupInfo, signed
/// by the joiner, as the server requires).
fn external_join<C: MlsConfig>(
    client: &Client<C>,
    info: &GroupInfo,
    remove: Option<u32>,
) -> anyhow::Result<(Group<C>, ExternalJoin)> {
    let tree = ExportedTree::from_bytes(&info.ratchet_tree)?;
    let mut builder = client.external_commit_builder()?.with_tree_data(tree);
    if let Some(leaf) = remove {
        builder = builder.with_removal(leaf);
    }
    let (group, commit) = builder.build(MlsMessage::from_bytes(&info.group_info)?)?;
    let group_info = group.group_info_message_allowing_ext_commit(false)?;
    let join = ExternalJoin { commit: commit.to_bytes()?, group_info: Some(group_info.to_bytes()?) };
    Ok((group, join))
}

/// The `ExternalJoin` frame as an OpenMLS joiner sends it: header epoch the
/// GroupInfo's, signed with the connection's key.
fn join_frame(stranger: &mut TestClient, join: &ExternalJoin, epoch: u64) -> Frame {
    let mut frame = stranger.frame(join);
    frame.header_mut().set_epoch(epoch);
    frame.sign(&stranger.key);
    frame
}

/// A message from a client without OpenMLS state: header epoch `epoch`.
async fn post(client: &mut TestClient, text: &str, epoch: u64) -> Frame {
    let payload = Application {
        generation: 0,
        ciphertext: text.as_bytes().to_vec().into(),
        push: None,
        epoch_tag: None,
    };
    let mut frame = client.frame(&payload);
    frame.header_mut().set_epoch(epoch);
    frame.sign(&client.key);
    client.send_and_wait(&frame).await
}

/// An external commit that also removes the admin's leaf, or another
/// member's, is refused with `Forbidden`; nothing is sequenced, the
/// GroupInfo stays the one before, the room and its shard keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_commit_from_another_implementation_that_removes_a_member_is_refused() {
    let server = TestServer::start(default_limits()).await;
    let (mut alice, mut bob, mut dan) = open_room(&server).await;
    let mut erin = TestClient::connect(&server, "erin", 5).await;
    erin.room = ROOM;
    let info: GroupInfo = decode_ok(&erin.request(&GroupInfoRequest {}).await);
    assert_eq!(info.epoch, 1);
    let client = mls_rs_client(&erin);

    let admin_leaf = alice.group.as_ref().unwrap().own_leaf_index();
    let member_leaf = bob.group.as_ref().unwrap().own_leaf_index();
    for (leaf, what) in [(admin_leaf, "the admin"), (member_leaf, "another member")] {
        let (group, join) = external_join(&client, &info, Some(leaf)).expect("mls-rs builds the commit");
        // mls-rs applied it: the joiner's own view has the victim gone.
        assert_eq!(group.roster().members().len(), 2, "{what}: the joiner replaced a leaf");
        let frame = join_frame(&mut erin, &join, info.epoch);
        let reply = erin.send_and_wait(&frame).await;
        let message =
            assert_refused(&reply, ErrorCode::Forbidden, &format!("an external commit removing {what}"));
        // Refused by the room's policy on the Remove, not for the join.
        assert!(message.contains(&PolicyError::JoinerRemovesOther.to_string()), "{what}: {message}");
        assert_refused(&post(&mut erin, "am I in?", info.epoch).await, ErrorCode::NotMember, what);
    }

    // Nothing was sequenced: the room's log still ends with the Add at 1,
    // and the GroupInfo served is still the one of epoch 1.
    let after: GroupInfo = decode_ok(&erin.request(&GroupInfoRequest {}).await);
    assert_eq!((after.epoch, &after.group_info), (info.epoch, &info.group_info));
    let subscribe = bob.frame(&Subscribe { from_log_index: 2 });
    bob.conn().send(&subscribe).await.unwrap();
    assert_eq!(sync_done(&bob.next_of(Opcode::SyncDone).await).next_log_index, 2);

    // The room keeps working: the admin's message is sequenced next and
    // read by the member; the room's MLS state is the one before (Alice's
    // commit, made on it, is accepted and Bob follows it).
    let ack: Ack = decode_ok(&alice.send_text("still the admin").await);
    assert_eq!(ack.log_index, 2);
    let message = bob.next_of(Opcode::Application).await;
    assert_eq!(message.header().log_index(), 2);
    let payload: Application = message.decode_payload().unwrap();
    assert_eq!(&payload.ciphertext[..], b"still the admin");
    let ack: Ack = decode_ok(&alice.self_update().await);
    assert_eq!((ack.log_index, ack.epoch), (3, 2));
    let commit = bob.next_of(Opcode::Commit).await;
    bob.apply(&commit);
    assert_eq!(bob.epoch(), 2);
    // And so does the other room on the shard.
    decode_ok::<Ack>(&dan.send_text("and here").await);
    server.stop().await;
}

/// The control: the same mls-rs stranger's external commit without a
/// removal is accepted, the OpenMLS members process it and share the new
/// epoch's secrets with it, and it is a member for the server (it posts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_commit_from_another_implementation_joins_an_open_room() {
    let server = TestServer::start(default_limits()).await;
    let (mut alice, mut bob, mut dan) = open_room(&server).await;
    let mut erin = TestClient::connect(&server, "erin", 5).await;
    erin.room = ROOM;
    let info: GroupInfo = decode_ok(&erin.request(&GroupInfoRequest {}).await);
    let client = mls_rs_client(&erin);

    let (mut group, join) = external_join(&client, &info, None).expect("mls-rs builds the commit");
    let frame = join_frame(&mut erin, &join, info.epoch);
    let ack: Ack = decode_ok(&erin.send_and_wait(&frame).await);
    assert_eq!((ack.log_index, ack.epoch), (2, info.epoch + 1));
    assert_eq!(group.current_epoch(), ack.epoch);

    let secret = group.export_secret(EXPORTER_LABEL.as_bytes(), b"", 32).unwrap();
    for member in [&mut alice, &mut bob] {
        member.subscribe(ack.log_index).await;
        let sequenced = member.next_of(Opcode::ExternalJoin).await;
        assert_eq!(sequenced.header().log_index(), ack.log_index);
        let external: ExternalJoin = sequenced.decode_payload().unwrap();
        let room = member.group.as_mut().unwrap();
        room.process_handshake(&member.provider, &external.commit)
            .expect("OpenMLS processes mls-rs's commit");
        assert_eq!(room.epoch(), ack.epoch);
        assert_eq!(room.members().len(), 3);
        let theirs = room.export_secret(&member.provider, EXPORTER_LABEL, b"", 32).unwrap();
        assert_eq!(theirs, secret.as_bytes(), "{}: the same epoch secrets as mls-rs", member.name);
    }
    decode_ok::<Ack>(&post(&mut erin, "hello from mls-rs", ack.epoch).await);

    // The GroupInfo mls-rs published is served to the next joiner, and an
    // OpenMLS member's commit on the mixed tree is accepted and processed by mls-rs.
    let served: GroupInfo = decode_ok(&erin.request(&GroupInfoRequest {}).await);
    assert_eq!((served.epoch, &served.group_info), (ack.epoch, join.group_info.as_ref().unwrap()));
    let update: Ack = decode_ok(&alice.self_update().await);
    assert_eq!(update.epoch, ack.epoch + 1);
    let commit = bob.next_of(Opcode::Commit).await;
    bob.apply(&commit);
    let commit: kalandra_proto::payload::Commit = commit.decode_payload().unwrap();
    group
        .process_incoming_message(MlsMessage::from_bytes(&commit.commit).unwrap())
        .expect("mls-rs processes OpenMLS's commit");
    assert_eq!(group.current_epoch(), update.epoch);
    let secret = group.export_secret(EXPORTER_LABEL.as_bytes(), b"", 32).unwrap();
    let alice_room = alice.group.as_ref().unwrap();
    assert_eq!(
        alice_room.export_secret(&alice.provider, EXPORTER_LABEL, b"", 32).unwrap(),
        secret.as_bytes()
    );
    decode_ok::<Ack>(&dan.send_text("and here").await);
    server.stop().await;
}
