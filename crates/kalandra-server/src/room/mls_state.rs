//! A room's public MLS group state, kept by the server to validate every
//! handshake message before it is sequenced.
//!
//! The server holds no secrets of the group: an OpenMLS [`PublicGroup`]
//! (tree, group context, transcript hash, pending proposals) over an
//! in-memory store that [`RoomGroupState::snapshot`] serialises.
//!
//! What the server checks: framing, group id, epoch, the sender's
//! signature, membership of the sender, proposal validity, the update path's
//! public part (parent hashes, tree hash), external commits, and Kalandra's
//! own policies (a leaf's BasicCredential identity is its Ed25519 signature
//! key; a commit covers every pending proposal issued by the server).
//! What it cannot check: the membership tag and whether the encrypted path
//! secrets decrypt (see DESIGN §3).

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use openmls::group::StagedCommit;
use openmls::prelude::{
    BasicCredential, ContentType, Credential, ExternalProposal, GroupEpoch, GroupId, LeafNode, LeafNodeIndex,
    MlsMessageBodyIn, MlsMessageIn, OpenMlsSignaturePublicKey, ProcessedMessageContent, Proposal,
    ProposalOrRefType, ProposalStore, ProtocolMessage, PublicGroup, PublicProcessMessageError, RatchetTreeIn,
    Sender, SenderExtensionIndex, SignaturePublicKey, SignatureScheme, StageCommitError, ValidationError,
    Verifiable,
};
use openmls_rust_crypto::{MemoryStorage, OpenMlsRustCrypto, RustCrypto};
use openmls_traits::signatures::{Signer, SignerError};
use tls_codec::{Deserialize as _, Serialize as _, Size as _};

use kalandra_mls::credential_matches_key;
pub use kalandra_mls::CIPHERSUITE;

/// An underlying error kept as the source of a typed variant.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Most proposals members may have pending in one epoch of a room, all
/// members together (server-issued ones are bounded apart, so members can
/// never crowd out a removal). Each proposal is kept until a commit, and
/// each new one is checked against all those pending.
pub const MEMBER_PROPOSALS_PENDING_MAX: usize = 512;
/// Most proposals one member may have pending in one epoch: a member needs
/// a few (its update, its leave), and one hostile member cannot take the
/// room's whole allowance.
pub const MEMBER_PROPOSALS_PENDING_PER_SENDER_MAX: usize = 16;
const _: () = assert!(MEMBER_PROPOSALS_PENDING_PER_SENDER_MAX * 8 <= MEMBER_PROPOSALS_PENDING_MAX);
/// Bytes of members' pending proposals (their TLS encoding) in one epoch
/// of a room: a proposal may be as large as a frame (8 MiB), and the count
/// alone let 512 of them hold 4 GiB.
pub const MEMBER_PROPOSALS_PENDING_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Bytes of one member's pending proposals in one epoch (an update or a
/// leave is about a kilobyte; an add carries a key package).
pub const MEMBER_PROPOSALS_PENDING_BYTES_PER_SENDER_MAX: usize = 256 * 1024;
const _: () =
    assert!(MEMBER_PROPOSALS_PENDING_BYTES_PER_SENDER_MAX * 8 <= MEMBER_PROPOSALS_PENDING_BYTES_MAX);

const SNAPSHOT_MAGIC: &[u8; 4] = b"KMLS";
const SNAPSHOT_VERSION: u8 = 1;

/// A member of the room: leaf index and BasicCredential identity (its
/// Ed25519 public key).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MemberRef {
    /// Leaf index in the ratchet tree.
    pub leaf_index: u32,
    /// BasicCredential identity.
    pub identity: Vec<u8>,
}

/// What an accepted commit did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitSummary {
    /// The epoch the commit moved the room into.
    pub epoch: u64,
    /// The committer (for an external commit: the joiner, at its new leaf).
    pub committer: MemberRef,
    /// Whether this was an external commit (a join without Welcome).
    pub external: bool,
    /// Members added, at their leaves in the new epoch.
    pub added: Vec<MemberRef>,
    /// Members removed, at their leaves in the previous epoch.
    pub removed: Vec<MemberRef>,
    /// References of the proposals covered by reference.
    pub covered_proposal_refs: Vec<Vec<u8>>,
    /// Whether the commit carried an update path.
    pub has_path: bool,
    /// Whether every leaf the commit replaced kept its identity (only a
    /// commit replayed from a log written before the room's policy refused
    /// identity changes can have changed one).
    pub identities_kept: bool,
}

impl CommitSummary {
    /// Whether the commit covered every proposal in `proposal_refs`.
    pub fn covers_all<R: AsRef<[u8]>>(&self, proposal_refs: &[R]) -> bool {
        covers_all(&self.covered_proposal_refs, proposal_refs)
    }
}

fn covers_all<R: AsRef<[u8]>>(covered: &[Vec<u8>], required: &[R]) -> bool {
    required.iter().all(|r| covered.iter().any(|c| c.as_slice() == r.as_ref()))
}

/// Who sent a proposal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProposalSender {
    /// A member, by leaf index.
    Member(u32),
    /// An entry of the room's external senders (the server), by index.
    External(u32),
    /// The joiner of an external commit (its inline proposals).
    NewMember,
}

/// What a proposal asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProposalKind {
    /// Add the holder of a key package.
    Add {
        /// Identity of the member to add.
        identity: Vec<u8>,
    },
    /// Remove the member at a leaf.
    Remove {
        /// The leaf to remove.
        leaf_index: u32,
    },
    /// The sender replaces its own leaf.
    Update {
        /// Whether the new leaf keeps the sender's identity: the same
        /// signature key and credential (the room's policy refuses an
        /// Update that changes them).
        keeps_identity: bool,
    },
    /// An external commit's `ExternalInit`.
    ExternalInit,
    /// A change of the group context's extensions (external senders among them).
    GroupContextExtensions,
    /// Any other proposal type (PreSharedKey, ReInit, custom, ...), by its type code.
    Other(u16),
}

/// What a proposal from `sender` asks for, without the credential checks;
/// `group` is the state the proposal applies to.
fn proposal_kind(group: &PublicGroup, sender: &Sender, proposal: &Proposal) -> ProposalKind {
    match proposal {
        Proposal::Add(add) => {
            ProposalKind::Add { identity: identity_of(add.key_package().leaf_node().credential()) }
        }
        Proposal::Remove(remove) => ProposalKind::Remove { leaf_index: remove.removed().u32() },
        Proposal::Update(update) => ProposalKind::Update {
            keeps_identity: match sender {
                Sender::Member(leaf) => keeps_identity(group, *leaf, update.leaf_node()),
                _ => false,
            },
        },
        Proposal::ExternalInit(_) => ProposalKind::ExternalInit,
        Proposal::GroupContextExtensions(_) => ProposalKind::GroupContextExtensions,
        other => ProposalKind::Other(u16::from(other.proposal_type())),
    }
}

/// A pending proposal as the bounds and the cover rule see it.
struct Queued {
    proposal_ref: Vec<u8>,
    /// Bytes of the proposal (its TLS encoding).
    bytes: usize,
    /// The proposing member's leaf, for a member's proposal.
    member_leaf: Option<u32>,
    /// Whether the server (an external sender) issued it.
    external: bool,
}

/// Whether the member at `leaf` may add a proposal of `bytes` to `pending`.
fn check_member_proposals_bound(
    pending: &[Queued],
    leaf: u32,
    bytes: usize,
) -> Result<(), MlsValidationError> {
    // (count, bytes) of all members' pending proposals, and of the sender's.
    let (mut members, mut own) = ((0, bytes), (0, bytes));
    for queued in pending {
        let Some(member) = queued.member_leaf else { continue };
        members = (members.0 + 1, members.1 + queued.bytes);
        if member == leaf {
            own = (own.0 + 1, own.1 + queued.bytes);
        }
    }
    for (pending, max_pending) in
        [(members.0, MEMBER_PROPOSALS_PENDING_MAX), (own.0, MEMBER_PROPOSALS_PENDING_PER_SENDER_MAX)]
    {
        if pending >= max_pending {
            return Err(MlsValidationError::TooManyProposals { pending, max_pending });
        }
    }
    for (pending_bytes, max_bytes) in [
        (own.1, MEMBER_PROPOSALS_PENDING_BYTES_PER_SENDER_MAX),
        (members.1, MEMBER_PROPOSALS_PENDING_BYTES_MAX),
    ] {
        if pending_bytes > max_bytes {
            return Err(MlsValidationError::ProposalBytes { pending_bytes, max_bytes });
        }
    }
    Ok(())
}

fn proposal_sender(sender: &Sender) -> Result<ProposalSender, MlsValidationError> {
    match sender {
        Sender::Member(leaf) => Ok(ProposalSender::Member(leaf.u32())),
        Sender::External(index) => {
            Ok(ProposalSender::External(sender_extension_index(index).map_err(MlsValidationError::Internal)?))
        }
        Sender::NewMemberCommit => Ok(ProposalSender::NewMember),
        Sender::NewMemberProposal => Err(MlsValidationError::UnknownSender),
    }
}

/// A checkpoint of a room's state, taken before a merge so that a check
/// made on the merged state can undo it ([`RoomGroupState::rollback`]).
pub struct Checkpoint {
    values: HashMap<Vec<u8>, Vec<u8>>,
}

/// A proposal accepted into the pending set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProposalSummary {
    /// Its reference (RFC 9420 §5.2), which a commit uses to cover it.
    pub proposal_ref: Vec<u8>,
    /// Who sent it.
    pub sender: ProposalSender,
    /// What it asks for.
    pub kind: ProposalKind,
}

/// A proposal the server issued, already validated and pending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedProposal {
    /// The proposal, a `PublicMessage` inside an `MLSMessage`, to sequence.
    pub message: Vec<u8>,
    /// Its reference.
    pub proposal_ref: Vec<u8>,
}

/// Building or restoring a room's state.
#[derive(Debug, thiserror::Error)]
pub enum RoomStateError {
    /// The GroupInfo does not decode.
    #[error("malformed GroupInfo")]
    Malformed(#[source] tls_codec::Error),
    /// The message is not a GroupInfo.
    #[error("message is not a GroupInfo")]
    NotAGroupInfo,
    /// The ratchet tree does not decode.
    #[error("malformed ratchet tree")]
    MalformedRatchetTree(#[source] tls_codec::Error),
    /// The room uses another ciphersuite.
    #[error("unsupported ciphersuite {0:#06x}")]
    UnsupportedCiphersuite(u16),
    /// The GroupInfo or tree is invalid (signature, tree hash, leaves).
    #[error("invalid GroupInfo or ratchet tree")]
    Invalid(#[source] BoxError),
    /// A leaf's credential identity is not its signature key.
    #[error("leaf {leaf_index} has a credential that is not its signature key")]
    CredentialMismatch {
        /// The offending leaf.
        leaf_index: u32,
    },
    /// A snapshot does not decode.
    #[error("malformed snapshot: {0}")]
    MalformedSnapshot(&'static str),
    /// Library or storage failure.
    #[error("internal error")]
    Internal(#[source] BoxError),
}

/// Validating a handshake message.
#[derive(Debug, thiserror::Error)]
pub enum MlsValidationError {
    /// The message does not decode.
    #[error("malformed message")]
    Malformed(#[source] tls_codec::Error),
    /// Not a `PublicMessage` (a `PrivateMessage`, Welcome, GroupInfo, ...).
    #[error("not a PublicMessage")]
    NotAPublicMessage,
    /// The message is for another group.
    #[error("message is for another group")]
    WrongGroup,
    /// The message is for another epoch (normally a lost race: rebase).
    #[error("message is for epoch {message_epoch}, room is at {current_epoch}")]
    WrongEpoch {
        /// Epoch in the message.
        message_epoch: u64,
        /// The room's epoch.
        current_epoch: u64,
    },
    /// A commit was expected.
    #[error("not a commit")]
    NotACommit,
    /// A proposal was expected.
    #[error("not a proposal")]
    NotAProposal,
    /// The sender is not a member (or not a valid sender type here).
    #[error("unknown sender")]
    UnknownSender,
    /// The message's signature does not verify.
    #[error("invalid signature")]
    InvalidSignature,
    /// The external sender is not listed in the room.
    #[error("unauthorised external sender")]
    UnauthorizedExternalSender,
    /// The commit is invalid (proposals, path, external-commit rules).
    #[error("invalid commit")]
    InvalidCommit(#[source] BoxError),
    /// The proposal is invalid.
    #[error("invalid proposal")]
    InvalidProposal(#[source] BoxError),
    /// A new or updated leaf's credential identity is not its signature key.
    #[error("leaf {leaf_index} has a credential that is not its signature key")]
    CredentialMismatch {
        /// The offending leaf (for an add: the leaf it would take, unknown: `u32::MAX`).
        leaf_index: u32,
    },
    /// The proposal is already pending.
    #[error("proposal already pending")]
    DuplicateProposal,
    /// Members' proposals pending in this epoch are at their bound (the
    /// room's, [`MEMBER_PROPOSALS_PENDING_MAX`], or the sender's,
    /// [`MEMBER_PROPOSALS_PENDING_PER_SENDER_MAX`]); a commit clears them.
    #[error("{pending} proposals pending, at most {max_pending}: commit them first")]
    TooManyProposals {
        /// Pending proposals that count against the bound hit.
        pending: usize,
        /// The bound.
        max_pending: usize,
    },
    /// Members' proposals pending in this epoch would be larger than their
    /// bound (the room's, [`MEMBER_PROPOSALS_PENDING_BYTES_MAX`], or the
    /// sender's, [`MEMBER_PROPOSALS_PENDING_BYTES_PER_SENDER_MAX`]).
    #[error("{pending_bytes} bytes of proposals would be pending, at most {max_bytes}: commit them first")]
    ProposalBytes {
        /// Bytes pending with the new proposal, against the bound hit.
        pending_bytes: usize,
        /// The bound.
        max_bytes: usize,
    },
    /// The commit leaves server-issued proposals uncovered.
    #[error("commit does not cover {} pending server proposal(s)", missing.len())]
    UncoveredServerProposals {
        /// References of the uncovered proposals.
        missing: Vec<Vec<u8>>,
    },
    /// The room's policy forbids the proposal for its sender.
    #[error("forbidden by the room's policy: {0}")]
    Forbidden(String),
    /// Library or storage failure: a bug, not the sender's fault.
    #[error("internal error")]
    Internal(#[source] BoxError),
}

impl MlsValidationError {
    /// Whether the sender is at fault. `WrongEpoch` is a race, and
    /// `Internal` our own failure.
    pub fn is_peer_fault(&self) -> bool {
        !matches!(self, Self::WrongEpoch { .. } | Self::Internal(_))
    }
}

/// Issuing a server proposal.
#[derive(Debug, thiserror::Error)]
pub enum IssueProposalError {
    /// The signer's key is not among the room's external senders.
    #[error("the server key is not an external sender of this room")]
    NotAnExternalSender,
    /// There is no member at this leaf.
    #[error("no member at leaf {0}")]
    UnknownMember(u32),
    /// Library failure.
    #[error("internal error")]
    Internal(#[source] BoxError),
}

/// Checking a GroupInfo a member uploads with its commit.
#[derive(Debug, thiserror::Error)]
pub enum GroupInfoError {
    /// The message does not decode.
    #[error("malformed GroupInfo")]
    Malformed(#[source] tls_codec::Error),
    /// The message is not a GroupInfo.
    #[error("message is not a GroupInfo")]
    NotAGroupInfo,
    /// Its group context or confirmation tag differ from the room's.
    #[error("GroupInfo does not match the room's current epoch")]
    Mismatch,
    /// It lacks the `external_pub` extension needed for external joins.
    #[error("GroupInfo has no external_pub extension")]
    MissingExternalPub,
    /// Its signer is not a member.
    #[error("GroupInfo signer is not a member")]
    UnknownSigner,
    /// Its signature does not verify.
    #[error("invalid GroupInfo signature")]
    InvalidSignature,
    /// Encoding failure.
    #[error("internal error")]
    Internal(#[source] BoxError),
}

/// Exporting the tree or a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum ExportStateError {
    /// TLS encoding failed.
    #[error("encoding failed")]
    Encode(#[source] tls_codec::Error),
    /// A thread panicked while holding the storage lock.
    #[error("storage lock poisoned")]
    LockPoisoned,
    /// A length does not fit the snapshot format.
    #[error("{0} too large for the snapshot format")]
    TooLarge(&'static str),
}

/// The server's Ed25519 key as an OpenMLS signer (for server-issued
/// proposals).
pub struct ServerSigner {
    signing_key: ed25519_dalek::SigningKey,
}

impl fmt::Debug for ServerSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerSigner").field("public_key", &self.public_key()).finish_non_exhaustive()
    }
}

impl ServerSigner {
    /// Wraps the server's signing key.
    pub fn new(signing_key: ed25519_dalek::SigningKey) -> Self {
        Self { signing_key }
    }

    /// The wrapped key (it also signs the frames that carry the proposals).
    pub fn signing_key(&self) -> &ed25519_dalek::SigningKey {
        &self.signing_key
    }

    /// The public key rooms list as their external sender.
    pub fn public_key(&self) -> [u8; 32] {
        self.signing_key.verifying_key().to_bytes()
    }
}

impl Signer for ServerSigner {
    fn sign(&self, payload: &[u8]) -> Result<Vec<u8>, SignerError> {
        Ok(ed25519_dalek::Signer::sign(&self.signing_key, payload).to_bytes().to_vec())
    }

    fn signature_scheme(&self) -> SignatureScheme {
        SignatureScheme::ED25519
    }
}

/// A commit that passed validation and can be merged (two-phase variant of
/// [`RoomGroupState::validate_commit`]).
#[derive(Debug)]
pub struct StagedRoomCommit {
    staged: StagedCommit,
    base_epoch: u64,
    committer: Option<MemberRef>,
    joiner_identity: Vec<u8>,
    removed: Vec<MemberRef>,
    /// Leaves whose content the commit replaces (committer with a path,
    /// senders of Update proposals), with their identities before it.
    changed: Vec<MemberRef>,
    added_keys: Vec<(Vec<u8>, Vec<u8>)>,
    covered_proposal_refs: Vec<Vec<u8>>,
    has_path: bool,
    /// Whether the committer's new leaf (its update path) keeps its
    /// signature key and credential; `true` without a path and for
    /// external commits (the joiner's leaf is new).
    path_keeps_identity: bool,
    proposals: Vec<(ProposalSender, ProposalKind)>,
}

impl StagedRoomCommit {
    /// Every proposal the commit applies (inline and by reference), with
    /// who proposed it.
    pub fn proposals(&self) -> &[(ProposalSender, ProposalKind)] {
        &self.proposals
    }

    /// Whether the committer's update path keeps its leaf's signature key
    /// and credential (`true` without a path and for external commits).
    pub fn path_keeps_identity(&self) -> bool {
        self.path_keeps_identity
    }

    /// The epoch the commit moves the room into.
    pub fn new_epoch(&self) -> u64 {
        self.base_epoch + 1
    }

    /// Whether this is an external commit.
    pub fn is_external(&self) -> bool {
        self.committer.is_none()
    }

    /// The committing member (`None` for an external commit).
    pub fn committer(&self) -> Option<&MemberRef> {
        self.committer.as_ref()
    }

    /// References of the proposals covered by reference.
    pub fn covered_proposal_refs(&self) -> &[Vec<u8>] {
        &self.covered_proposal_refs
    }

    /// Whether the commit covers every proposal in `proposal_refs`.
    pub fn covers_all<R: AsRef<[u8]>>(&self, proposal_refs: &[R]) -> bool {
        covers_all(&self.covered_proposal_refs, proposal_refs)
    }

    /// Members the commit removes (leaves of the current epoch).
    pub fn removed(&self) -> &[MemberRef] {
        &self.removed
    }

    /// Credential identities of the members the commit adds.
    pub fn added_identities(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.added_keys.iter().map(|(_, identity)| identity.as_slice())
    }

    /// For an external commit, the joiner's credential identity (empty otherwise).
    pub fn joiner_identity(&self) -> &[u8] {
        &self.joiner_identity
    }
}

/// One room's public MLS state.
pub struct RoomGroupState {
    group: PublicGroup,
    storage: MemoryStorage,
    crypto: RustCrypto,
    members_by_identity: HashMap<Vec<u8>, u32>,
}

impl fmt::Debug for RoomGroupState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RoomGroupState")
            .field("group_id", &self.group.group_id())
            .field("epoch", &self.epoch())
            .field("members", &self.member_count())
            .finish_non_exhaustive()
    }
}

fn boxed<E: std::error::Error + Send + Sync + 'static>(error: E) -> BoxError {
    Box::new(error)
}

fn identity_of(credential: &Credential) -> Vec<u8> {
    match BasicCredential::try_from(credential.clone()) {
        Ok(basic) => basic.identity().to_vec(),
        Err(_) => credential.serialized_content().to_vec(),
    }
}

/// The signature key and identity of each leaf a commit adds.
type AddedKeys = Vec<(Vec<u8>, Vec<u8>)>;

/// The credential policy for every leaf a staged commit introduces (its
/// path, Updates, Adds); the signature keys and identities of the added.
fn check_introduced_credentials(
    staged: &StagedCommit,
    committer: Option<&MemberRef>,
) -> Result<AddedKeys, MlsValidationError> {
    if let Some(path_leaf) = staged.update_path_leaf_node() {
        if !credential_matches_key(path_leaf) {
            return Err(MlsValidationError::CredentialMismatch {
                leaf_index: committer.map_or(u32::MAX, |c| c.leaf_index),
            });
        }
    }
    for update in staged.update_proposals() {
        if !credential_matches_key(update.update_proposal().leaf_node()) {
            let leaf_index = match update.sender() {
                Sender::Member(leaf) => leaf.u32(),
                _ => u32::MAX,
            };
            return Err(MlsValidationError::CredentialMismatch { leaf_index });
        }
    }
    let mut added_keys = Vec::new();
    for add in staged.add_proposals() {
        let leaf = add.add_proposal().key_package().leaf_node();
        if !credential_matches_key(leaf) {
            return Err(MlsValidationError::CredentialMismatch { leaf_index: u32::MAX });
        }
        added_keys.push((leaf.signature_key().as_slice().to_vec(), identity_of(leaf.credential())));
    }
    Ok(added_keys)
}

/// Whether `new` keeps the identity of the member at `leaf`: the same
/// signature key and the same credential. A member's sender id derives from
/// its signature key, so a leaf that changed it would be another user.
fn keeps_identity(group: &PublicGroup, leaf: LeafNodeIndex, new: &LeafNode) -> bool {
    group
        .leaf(leaf)
        .is_some_and(|old| old.signature_key() == new.signature_key() && old.credential() == new.credential())
}

fn to_u32(value: usize) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
}

/// The position of an external sender. OpenMLS keeps the accessor
/// crate-private; the TLS encoding is the `uint32` itself.
fn sender_extension_index(index: &SenderExtensionIndex) -> Result<u32, BoxError> {
    let bytes: [u8; 4] = index
        .tls_serialize_detached()
        .map_err(boxed)?
        .try_into()
        .map_err(|_| BoxError::from("sender index is not a uint32"))?;
    Ok(u32::from_be_bytes(bytes))
}

/// Whether a nested OpenMLS error is a library (internal) error.
fn is_library_error(error: &PublicProcessMessageError) -> bool {
    matches!(
        error,
        PublicProcessMessageError::LibraryError(_)
            | PublicProcessMessageError::ValidationError(ValidationError::LibraryError(_))
            | PublicProcessMessageError::InvalidCommit(StageCommitError::LibraryError(_))
    )
}

fn map_process_error(error: PublicProcessMessageError, commit: bool) -> MlsValidationError {
    if is_library_error(&error) {
        return MlsValidationError::Internal(boxed(error));
    }
    match error {
        PublicProcessMessageError::IncompatibleWireFormat => MlsValidationError::NotAPublicMessage,
        PublicProcessMessageError::ValidationError(ValidationError::WrongGroupId) => {
            MlsValidationError::WrongGroup
        }
        PublicProcessMessageError::ValidationError(ValidationError::InvalidSignature) => {
            MlsValidationError::InvalidSignature
        }
        PublicProcessMessageError::ValidationError(ValidationError::UnknownMember) => {
            MlsValidationError::UnknownSender
        }
        PublicProcessMessageError::ValidationError(
            ValidationError::UnauthorizedExternalSender | ValidationError::NoExternalSendersExtension,
        ) => MlsValidationError::UnauthorizedExternalSender,
        other if commit => MlsValidationError::InvalidCommit(boxed(other)),
        other => MlsValidationError::InvalidProposal(boxed(other)),
    }
}

/// A decoded `PublicMessage` that passed the cheap checks.
struct Framed {
    message: ProtocolMessage,
    content_type: ContentType,
}

impl RoomGroupState {
    /// Starts tracking a room from the creator's GroupInfo and ratchet tree
    /// (as produced by the client's room creation). Verifies the GroupInfo
    /// signature, the tree (hashes, leaf signatures) and the credential
    /// policy of every leaf.
    pub fn from_group_info(group_info: &[u8], ratchet_tree: &[u8]) -> Result<Self, RoomStateError> {
        let message = MlsMessageIn::tls_deserialize_exact(group_info).map_err(RoomStateError::Malformed)?;
        let MlsMessageBodyIn::GroupInfo(group_info) = message.extract() else {
            return Err(RoomStateError::NotAGroupInfo);
        };
        if group_info.ciphersuite() != CIPHERSUITE {
            return Err(RoomStateError::UnsupportedCiphersuite(group_info.ciphersuite().into()));
        }
        let tree = RatchetTreeIn::tls_deserialize_exact(ratchet_tree)
            .map_err(RoomStateError::MalformedRatchetTree)?;
        let crypto = RustCrypto::default();
        let storage = MemoryStorage::default();
        let (group, _verified) =
            PublicGroup::from_external(&crypto, &storage, tree, group_info, ProposalStore::new()).map_err(
                |e| match e {
                    openmls::prelude::CreationFromExternalError::LibraryError(_)
                    | openmls::prelude::CreationFromExternalError::WriteToStorageError(_) => {
                        RoomStateError::Internal(boxed(e))
                    }
                    other => RoomStateError::Invalid(boxed(other)),
                },
            )?;
        if let Some((leaf_index, _)) =
            group.treesync().full_leaves().find(|(_, leaf)| !credential_matches_key(leaf))
        {
            return Err(RoomStateError::CredentialMismatch { leaf_index: leaf_index.u32() });
        }
        Ok(Self::assemble(group, storage, crypto))
    }

    fn assemble(group: PublicGroup, storage: MemoryStorage, crypto: RustCrypto) -> Self {
        let members_by_identity = group
            .treesync()
            .full_leaves()
            .map(|(index, leaf)| (identity_of(leaf.credential()), index.u32()))
            .collect();
        Self { group, storage, crypto, members_by_identity }
    }

    fn frame(&self, bytes: &[u8]) -> Result<Framed, MlsValidationError> {
        let message = MlsMessageIn::tls_deserialize_exact(bytes).map_err(MlsValidationError::Malformed)?;
        let public = match message.extract() {
            MlsMessageBodyIn::PublicMessage(public) => public,
            _ => return Err(MlsValidationError::NotAPublicMessage),
        };
        if public.group_id() != self.group.group_id() {
            return Err(MlsValidationError::WrongGroup);
        }
        let current_epoch = self.epoch();
        if public.epoch().as_u64() != current_epoch {
            return Err(MlsValidationError::WrongEpoch {
                message_epoch: public.epoch().as_u64(),
                current_epoch,
            });
        }
        let content_type = public.content_type();
        Ok(Framed { message: ProtocolMessage::from(public), content_type })
    }

    /// Validates a commit without applying it. Checks everything
    /// [`RoomGroupState::validate_commit`] does except the coverage of
    /// server proposals, which the caller can test with
    /// [`StagedRoomCommit::covers_all`].
    pub fn stage_commit(&self, message: &[u8]) -> Result<StagedRoomCommit, MlsValidationError> {
        let framed = self.frame(message)?;
        if framed.content_type != ContentType::Commit {
            return Err(MlsValidationError::NotACommit);
        }
        let processed = self
            .group
            .process_message(&self.crypto, framed.message)
            .map_err(|e| map_process_error(e, true))?;
        let sender = processed.sender().clone();
        let joiner_identity = identity_of(processed.credential());
        let ProcessedMessageContent::StagedCommitMessage(staged) = processed.into_content() else {
            return Err(MlsValidationError::NotACommit);
        };
        let committer = self.committer_of(sender)?;
        let added_keys = check_introduced_credentials(&staged, committer.as_ref())?;
        let removed = self.removed_members(&staged);
        let covered_proposal_refs = staged
            .queued_proposals()
            .filter(|queued| queued.proposal_or_ref_type() == ProposalOrRefType::Reference)
            .map(|queued| queued.proposal_reference_ref().as_slice().to_vec())
            .collect();
        let has_path = staged.update_path_leaf_node().is_some();
        let path_keeps_identity = match (&committer, staged.update_path_leaf_node()) {
            (Some(committer), Some(path_leaf)) => {
                keeps_identity(&self.group, LeafNodeIndex::new(committer.leaf_index), path_leaf)
            }
            _ => true,
        };
        let proposals = staged
            .queued_proposals()
            .map(|queued| {
                let kind = proposal_kind(&self.group, queued.sender(), queued.proposal());
                Ok((proposal_sender(queued.sender())?, kind))
            })
            .collect::<Result<Vec<_>, MlsValidationError>>()?;
        let changed = self.changed_members(&staged, has_path.then_some(committer.as_ref()).flatten());
        Ok(StagedRoomCommit {
            staged: *staged,
            base_epoch: self.epoch(),
            committer,
            joiner_identity,
            removed,
            changed,
            added_keys,
            covered_proposal_refs,
            has_path,
            path_keeps_identity,
            proposals,
        })
    }

    /// The committer of a staged commit: a member by leaf, or `None` for
    /// an external commit's joiner.
    fn committer_of(&self, sender: Sender) -> Result<Option<MemberRef>, MlsValidationError> {
        match sender {
            Sender::Member(leaf) => Ok(Some(MemberRef {
                leaf_index: leaf.u32(),
                identity: self
                    .group
                    .leaf(leaf)
                    .map(|node| identity_of(node.credential()))
                    .ok_or(MlsValidationError::UnknownSender)?,
            })),
            Sender::NewMemberCommit => Ok(None),
            Sender::External(_) | Sender::NewMemberProposal => Err(MlsValidationError::UnknownSender),
        }
    }

    /// The members a staged commit removes, by leaf, with their identities
    /// before it.
    fn removed_members(&self, staged: &StagedCommit) -> Vec<MemberRef> {
        staged
            .remove_proposals()
            .map(|remove| {
                let leaf = remove.remove_proposal().removed();
                MemberRef {
                    leaf_index: leaf.u32(),
                    identity: self
                        .group
                        .leaf(leaf)
                        .map(|node| identity_of(node.credential()))
                        .unwrap_or_default(),
                }
            })
            .collect()
    }

    /// The members whose leaf a staged commit replaces (their Update
    /// proposals, and the committer's own leaf if it has a path), as they
    /// are before it.
    fn changed_members(&self, staged: &StagedCommit, path_committer: Option<&MemberRef>) -> Vec<MemberRef> {
        let mut changed: Vec<MemberRef> = staged
            .update_proposals()
            .filter_map(|update| match update.sender() {
                Sender::Member(leaf) => self.member_at(leaf.u32()),
                _ => None,
            })
            .collect();
        changed.extend(path_committer.cloned());
        changed
    }

    /// Keeps the identity index in step with the tree after a merge.
    /// Keeps the identity index in step with the tree; false when a changed
    /// leaf now has another identity.
    fn reindex(&mut self, removed: &[MemberRef], changed: &[MemberRef]) -> bool {
        for removed in removed {
            if self.members_by_identity.get(&removed.identity) == Some(&removed.leaf_index) {
                self.members_by_identity.remove(&removed.identity);
            }
        }
        let mut identities_kept = true;
        for before in changed {
            if let Some(now) = self.member_at(before.leaf_index) {
                if now.identity != before.identity {
                    identities_kept = false;
                    if self.members_by_identity.get(&before.identity) == Some(&before.leaf_index) {
                        self.members_by_identity.remove(&before.identity);
                    }
                    self.members_by_identity.insert(now.identity, now.leaf_index);
                }
            }
        }
        identities_kept
    }

    /// The leaves the merged commit added, found by signature key, entered
    /// in the identity index.
    fn index_added(&mut self, added_keys: &[(Vec<u8>, Vec<u8>)]) -> Vec<MemberRef> {
        let mut added = Vec::with_capacity(added_keys.len());
        if added_keys.is_empty() {
            return added;
        }
        for (index, leaf) in self.group.treesync().full_leaves() {
            if let Some((_, identity)) =
                added_keys.iter().find(|(key, _)| key.as_slice() == leaf.signature_key().as_slice())
            {
                added.push(MemberRef { leaf_index: index.u32(), identity: identity.clone() });
            }
        }
        for member in &added {
            self.members_by_identity.insert(member.identity.clone(), member.leaf_index);
        }
        added
    }

    /// Applies a commit staged by [`RoomGroupState::stage_commit`] in the
    /// current epoch.
    pub fn merge_staged_commit(
        &mut self,
        staged: StagedRoomCommit,
    ) -> Result<CommitSummary, MlsValidationError> {
        let current_epoch = self.epoch();
        if staged.base_epoch != current_epoch {
            return Err(MlsValidationError::WrongEpoch { message_epoch: staged.base_epoch, current_epoch });
        }
        let external_leaf = if staged.committer.is_none() {
            Some(
                self.group
                    .ext_commit_sender_index(&staged.staged)
                    .map_err(|e| MlsValidationError::Internal(boxed(e)))?
                    .u32(),
            )
        } else {
            None
        };
        let committer_before = staged.committer.clone();
        self.group
            .merge_commit(&self.storage, staged.staged)
            .map_err(|e| MlsValidationError::Internal(boxed(e)))?;
        let identities_kept = self.reindex(&staged.removed, &staged.changed);
        let committer = match (committer_before, external_leaf) {
            (Some(before), _) => self.member_at(before.leaf_index).unwrap_or(before),
            (None, Some(leaf_index)) => {
                let joiner = MemberRef { leaf_index, identity: staged.joiner_identity.clone() };
                self.members_by_identity.insert(joiner.identity.clone(), leaf_index);
                joiner
            }
            (None, None) => return Err(MlsValidationError::Internal("no committer".into())),
        };
        let added = self.index_added(&staged.added_keys);
        Ok(CommitSummary {
            epoch: self.epoch(),
            committer,
            external: external_leaf.is_some(),
            added,
            removed: staged.removed,
            covered_proposal_refs: staged.covered_proposal_refs,
            has_path: staged.has_path,
            identities_kept,
        })
    }

    /// Validates a commit and, if it is valid, applies it. Besides the MLS
    /// rules, the commit must cover every pending proposal the server issued.
    pub fn validate_commit(&mut self, message: &[u8]) -> Result<CommitSummary, MlsValidationError> {
        let staged = self.stage_commit(message)?;
        let required = self.pending_server_proposal_refs()?;
        let missing = self.uncovered_server_proposals(&staged, &required)?;
        if !missing.is_empty() {
            return Err(MlsValidationError::UncoveredServerProposals { missing });
        }
        self.merge_staged_commit(staged)
    }

    /// Validates a proposal sent by reference (by a member or by the
    /// server) and adds it to the pending set, where the next commit can
    /// cover it.
    pub fn add_proposal(&mut self, message: &[u8]) -> Result<ProposalSummary, MlsValidationError> {
        self.add_proposal_checked(message, &|_, _| Ok(()))
    }

    /// [`RoomGroupState::add_proposal`] with the caller's own `check` (room
    /// policy) on the validated proposal before it joins the pending set.
    pub fn add_proposal_checked(
        &mut self,
        message: &[u8],
        check: &dyn Fn(&RoomGroupState, &ProposalSummary) -> Result<(), MlsValidationError>,
    ) -> Result<ProposalSummary, MlsValidationError> {
        let framed = self.frame(message)?;
        if framed.content_type != ContentType::Proposal {
            return Err(MlsValidationError::NotAProposal);
        }
        let processed = self
            .group
            .process_message(&self.crypto, framed.message)
            .map_err(|e| map_process_error(e, false))?;
        let ProcessedMessageContent::ProposalMessage(queued) = processed.into_content() else {
            return Err(MlsValidationError::NotAProposal);
        };
        let sender = match proposal_sender(queued.sender())? {
            ProposalSender::NewMember => return Err(MlsValidationError::UnknownSender),
            sender => sender,
        };
        let leaf = match queued.proposal() {
            Proposal::Add(add) => Some((add.key_package().leaf_node(), u32::MAX)),
            Proposal::Update(update) => {
                let leaf_index = match sender {
                    ProposalSender::Member(leaf) => leaf,
                    _ => u32::MAX,
                };
                Some((update.leaf_node(), leaf_index))
            }
            _ => None,
        };
        if let Some((leaf, leaf_index)) = leaf {
            if !credential_matches_key(leaf) {
                return Err(MlsValidationError::CredentialMismatch { leaf_index });
            }
        }
        let kind = proposal_kind(&self.group, queued.sender(), queued.proposal());
        let proposal_ref = queued.proposal_reference_ref().as_slice().to_vec();
        let pending = self.queued()?;
        if pending.iter().any(|queued| queued.proposal_ref == proposal_ref) {
            return Err(MlsValidationError::DuplicateProposal);
        }
        if let ProposalSender::Member(leaf) = sender {
            let bytes = queued.proposal().tls_serialized_len();
            check_member_proposals_bound(&pending, leaf, bytes)?;
        }
        let summary = ProposalSummary { proposal_ref, sender, kind };
        check(self, &summary)?;
        self.group
            .add_proposal(&self.storage, *queued)
            .map_err(|e| MlsValidationError::Internal(boxed(e)))?;
        Ok(summary)
    }

    /// The state as it is now, to return to with [`RoomGroupState::rollback`].
    pub fn checkpoint(&self) -> Result<Checkpoint, ExportStateError> {
        let values = self.storage.values.read().map_err(|_| ExportStateError::LockPoisoned)?;
        Ok(Checkpoint { values: values.clone() })
    }

    /// Returns to the state of `checkpoint` (taken from this room).
    pub fn rollback(&mut self, checkpoint: Checkpoint) -> Result<(), RoomStateError> {
        let group_id = self.group.group_id().clone();
        let storage = MemoryStorage { values: std::sync::RwLock::new(checkpoint.values) };
        let group = PublicGroup::load(&storage, &group_id)
            .map_err(|e| RoomStateError::Internal(boxed(e)))?
            .ok_or(RoomStateError::MalformedSnapshot("no group state for the group id"))?;
        *self = Self::assemble(group, storage, RustCrypto::default());
        Ok(())
    }

    /// Issues, validates and stores a server Remove proposal for the member
    /// at `leaf_index`. Sequence the returned message like any frame; the
    /// next commit must cover it ([`RoomGroupState::validate_commit`]
    /// enforces this).
    pub fn issue_remove_proposal(
        &mut self,
        signer: &ServerSigner,
        leaf_index: u32,
    ) -> Result<IssuedProposal, IssueProposalError> {
        let message = self.remove_proposal_message(signer, leaf_index)?;
        let summary = self.add_proposal(&message).map_err(|e| IssueProposalError::Internal(boxed(e)))?;
        Ok(IssuedProposal { message, proposal_ref: summary.proposal_ref })
    }

    /// A server Remove proposal for the member at `leaf_index`, signed by
    /// `signer` for the current epoch, without adding it to the pending set
    /// (the sequencer adds it when it sequences the proposal).
    pub fn remove_proposal_message(
        &self,
        signer: &ServerSigner,
        leaf_index: u32,
    ) -> Result<Vec<u8>, IssueProposalError> {
        let sender_index = self
            .external_sender_index(&signer.public_key())
            .ok_or(IssueProposalError::NotAnExternalSender)?;
        if self.group.leaf(LeafNodeIndex::new(leaf_index)).is_none() {
            return Err(IssueProposalError::UnknownMember(leaf_index));
        }
        ExternalProposal::new_remove::<OpenMlsRustCrypto>(
            LeafNodeIndex::new(leaf_index),
            self.group.group_id().clone(),
            GroupEpoch::from(self.epoch()),
            signer,
            SenderExtensionIndex::new(sender_index),
        )
        .map_err(|e| IssueProposalError::Internal(boxed(e)))?
        .tls_serialize_detached()
        .map_err(|e| IssueProposalError::Internal(boxed(e)))
    }

    /// How many external senders the room lists.
    pub fn external_sender_count(&self) -> usize {
        self.group.group_context().extensions().external_senders().map_or(0, |senders| senders.len())
    }

    /// The signature key of the room's first external sender (the server
    /// of the domain that orders it), if it is an Ed25519 key.
    pub fn first_external_sender_key(&self) -> Option<[u8; 32]> {
        let senders = self.group.group_context().extensions().external_senders()?;
        let encoded = senders.first()?.tls_serialize_detached().ok()?;
        // The key comes first, as a length-prefixed byte string.
        match encoded.split_first() {
            Some((32, rest)) if rest.len() >= 32 => rest[..32].try_into().ok(),
            _ => None,
        }
    }

    /// Position of `signature_key` among the room's external senders.
    pub fn external_sender_index(&self, signature_key: &[u8]) -> Option<u32> {
        let prefix = SignaturePublicKey::from(signature_key.to_vec()).tls_serialize_detached().ok()?;
        self.group
            .group_context()
            .extensions()
            .external_senders()?
            .iter()
            .position(|sender| sender.tls_serialize_detached().is_ok_and(|bytes| bytes.starts_with(&prefix)))
            .map(to_u32)
    }

    /// References of all pending proposals, in arrival order.
    pub fn pending_proposal_refs(&self) -> Result<Vec<Vec<u8>>, MlsValidationError> {
        Ok(self.queued()?.into_iter().map(|queued| queued.proposal_ref).collect())
    }

    /// References of the pending proposals the server issued; the next
    /// commit must cover all of them.
    pub fn pending_server_proposal_refs(&self) -> Result<Vec<Vec<u8>>, MlsValidationError> {
        Ok(self
            .queued()?
            .into_iter()
            .filter(|queued| queued.external)
            .map(|queued| queued.proposal_ref)
            .collect())
    }

    /// Those of `required` (server proposals) that `staged` leaves
    /// uncovered: neither covered by reference, nor a Remove of a member the
    /// commit removes anyway. A commit carries one Remove per leaf (RFC 9420
    /// §12.2), so when a kick and the member's own leave name one leaf, a
    /// commit covers only one of them, and the member is out either way.
    pub fn uncovered_server_proposals<R: AsRef<[u8]>>(
        &self,
        staged: &StagedRoomCommit,
        required: &[R],
    ) -> Result<Vec<Vec<u8>>, MlsValidationError> {
        let by_reference: Vec<&[u8]> = required
            .iter()
            .map(AsRef::as_ref)
            .filter(|r| !staged.covered_proposal_refs.iter().any(|c| c.as_slice() == *r))
            .collect();
        if by_reference.is_empty() {
            return Ok(Vec::new());
        }
        let queued =
            self.group.queued_proposals(&self.storage).map_err(|e| MlsValidationError::Internal(boxed(e)))?;
        let removes_anyway = |proposal_ref: &[u8]| {
            queued.iter().any(|(queued_ref, proposal)| {
                queued_ref.as_slice() == proposal_ref
                    && matches!(proposal.sender(), Sender::External(_))
                    && matches!(proposal.proposal(), Proposal::Remove(remove)
                        if staged.removed.iter().any(|m| m.leaf_index == remove.removed().u32()))
            })
        };
        Ok(by_reference.into_iter().filter(|r| !removes_anyway(r)).map(<[u8]>::to_vec).collect())
    }

    /// Members whose removal the server proposed and no commit covered yet.
    pub fn pending_server_removals(&self) -> Result<Vec<MemberRef>, MlsValidationError> {
        let queued =
            self.group.queued_proposals(&self.storage).map_err(|e| MlsValidationError::Internal(boxed(e)))?;
        Ok(queued
            .into_iter()
            .filter(|(_, proposal)| matches!(proposal.sender(), Sender::External(_)))
            .filter_map(|(_, proposal)| match proposal.proposal() {
                Proposal::Remove(remove) => self.member_at(remove.removed().u32()),
                _ => None,
            })
            .collect())
    }

    fn queued(&self) -> Result<Vec<Queued>, MlsValidationError> {
        let queued =
            self.group.queued_proposals(&self.storage).map_err(|e| MlsValidationError::Internal(boxed(e)))?;
        Ok(queued
            .into_iter()
            .map(|(proposal_ref, proposal)| Queued {
                proposal_ref: proposal_ref.as_slice().to_vec(),
                bytes: proposal.proposal().tls_serialized_len(),
                member_leaf: match proposal.sender() {
                    Sender::Member(leaf) => Some(leaf.u32()),
                    _ => None,
                },
                external: matches!(proposal.sender(), Sender::External(_)),
            })
            .collect())
    }

    /// Checks a GroupInfo uploaded for the current epoch (for external
    /// joiners): same group context and confirmation tag as the room, an
    /// `external_pub` extension, and a valid signature by a member.
    /// Returns the signer's leaf index.
    pub fn validate_group_info(&self, group_info: &[u8]) -> Result<u32, GroupInfoError> {
        let message = MlsMessageIn::tls_deserialize_exact(group_info).map_err(GroupInfoError::Malformed)?;
        let MlsMessageBodyIn::GroupInfo(group_info) = message.extract() else {
            return Err(GroupInfoError::NotAGroupInfo);
        };
        if group_info.group_context() != self.group.group_context() {
            return Err(GroupInfoError::Mismatch);
        }
        if group_info.extensions().external_pub().is_none() {
            return Err(GroupInfoError::MissingExternalPub);
        }
        // GroupInfoTBS = group_context || extensions || confirmation_tag || signer.
        let payload = group_info.unsigned_payload().map_err(|e| GroupInfoError::Internal(boxed(e)))?;
        let mut expected = self
            .group
            .group_context()
            .tls_serialize_detached()
            .map_err(|e| GroupInfoError::Internal(boxed(e)))?;
        expected.extend(
            group_info
                .extensions()
                .tls_serialize_detached()
                .map_err(|e| GroupInfoError::Internal(boxed(e)))?,
        );
        expected.extend(
            self.group
                .confirmation_tag()
                .tls_serialize_detached()
                .map_err(|e| GroupInfoError::Internal(boxed(e)))?,
        );
        let signer_bytes: [u8; 4] = payload
            .strip_prefix(expected.as_slice())
            .and_then(|rest| rest.try_into().ok())
            .ok_or(GroupInfoError::Mismatch)?;
        let signer = u32::from_be_bytes(signer_bytes);
        let leaf = self.group.leaf(LeafNodeIndex::new(signer)).ok_or(GroupInfoError::UnknownSigner)?;
        let key = OpenMlsSignaturePublicKey::from_signature_key(
            leaf.signature_key().clone(),
            SignatureScheme::ED25519,
        );
        group_info.verify_no_out(&self.crypto, &key).map_err(|_| GroupInfoError::InvalidSignature)?;
        Ok(signer)
    }

    /// The leaf of the member whose credential identity is `identity`.
    pub fn is_member(&self, identity: &[u8]) -> Option<u32> {
        self.members_by_identity.get(identity).copied()
    }

    /// The member at `leaf_index`, if any.
    pub fn member_at(&self, leaf_index: u32) -> Option<MemberRef> {
        self.group
            .leaf(LeafNodeIndex::new(leaf_index))
            .map(|leaf| MemberRef { leaf_index, identity: identity_of(leaf.credential()) })
    }

    /// All members, by leaf index.
    pub fn members(&self) -> Vec<MemberRef> {
        self.group
            .treesync()
            .full_leaves()
            .map(|(index, leaf)| MemberRef {
                leaf_index: index.u32(),
                identity: identity_of(leaf.credential()),
            })
            .collect()
    }

    /// Number of members.
    pub fn member_count(&self) -> usize {
        self.members_by_identity.len()
    }

    /// The current epoch.
    pub fn epoch(&self) -> u64 {
        self.group.group_context().epoch().as_u64()
    }

    /// The current epoch's confirmed transcript hash (RFC 9420 §8.2): two
    /// epochs of one number that different commits began differ in it.
    pub fn confirmed_transcript_hash(&self) -> &[u8] {
        self.group.group_context().confirmed_transcript_hash()
    }

    /// The current tree hash.
    pub fn tree_hash(&self) -> &[u8] {
        self.group.group_context().tree_hash()
    }

    /// The group id (the room id).
    pub fn group_id(&self) -> &[u8] {
        self.group.group_id().as_slice()
    }

    /// The current ratchet tree, for Welcome recipients and external
    /// joiners.
    pub fn ratchet_tree(&self) -> Result<Vec<u8>, ExportStateError> {
        self.group.export_ratchet_tree().tls_serialize_detached().map_err(ExportStateError::Encode)
    }

    /// Serialises the whole public state, pending proposals included.
    ///
    /// Format: `"KMLS"`, version `1`, the group id (u16 length), then the
    /// OpenMLS storage entries sorted by key, each as u32 length + key,
    /// u32 length + value. The entries are OpenMLS's own storage encoding
    /// (its storage version is part of each key), so a snapshot restores
    /// with the same OpenMLS storage format only.
    pub fn snapshot(&self) -> Result<Vec<u8>, ExportStateError> {
        let values = self.storage.values.read().map_err(|_| ExportStateError::LockPoisoned)?;
        let sorted: BTreeMap<&Vec<u8>, &Vec<u8>> = values.iter().collect();
        let group_id = self.group.group_id().as_slice();
        let group_id_len =
            u16::try_from(group_id.len()).map_err(|_| ExportStateError::TooLarge("group id"))?;
        let count = u32::try_from(sorted.len()).map_err(|_| ExportStateError::TooLarge("entry count"))?;
        let mut out =
            Vec::with_capacity(16 + sorted.iter().map(|(k, v)| k.len() + v.len() + 8).sum::<usize>());
        out.extend_from_slice(SNAPSHOT_MAGIC);
        out.push(SNAPSHOT_VERSION);
        out.extend_from_slice(&group_id_len.to_be_bytes());
        out.extend_from_slice(group_id);
        out.extend_from_slice(&count.to_be_bytes());
        for (key, value) in sorted {
            for part in [key, value] {
                let len = u32::try_from(part.len()).map_err(|_| ExportStateError::TooLarge("entry"))?;
                out.extend_from_slice(&len.to_be_bytes());
                out.extend_from_slice(part);
            }
        }
        Ok(out)
    }

    /// Rebuilds the state from [`RoomGroupState::snapshot`] output.
    pub fn restore(snapshot: &[u8]) -> Result<Self, RoomStateError> {
        let mut reader = SnapshotReader { rest: snapshot };
        if reader.take(4)? != SNAPSHOT_MAGIC {
            return Err(RoomStateError::MalformedSnapshot("bad magic"));
        }
        if reader.take(1)? != [SNAPSHOT_VERSION] {
            return Err(RoomStateError::MalformedSnapshot("unknown version"));
        }
        let group_id_len = usize::from(u16::from_be_bytes(reader.array()?));
        let group_id = GroupId::from_slice(reader.take(group_id_len)?);
        let count = u32::from_be_bytes(reader.array()?);
        let mut values = HashMap::new();
        for _ in 0..count {
            let key = reader.chunk()?.to_vec();
            let value = reader.chunk()?.to_vec();
            values.insert(key, value);
        }
        if !reader.rest.is_empty() {
            return Err(RoomStateError::MalformedSnapshot("trailing bytes"));
        }
        let storage = MemoryStorage { values: std::sync::RwLock::new(values) };
        let group = PublicGroup::load(&storage, &group_id)
            .map_err(|e| RoomStateError::Internal(boxed(e)))?
            .ok_or(RoomStateError::MalformedSnapshot("no group state for the group id"))?;
        Ok(Self::assemble(group, storage, RustCrypto::default()))
    }
}

struct SnapshotReader<'a> {
    rest: &'a [u8],
}

impl<'a> SnapshotReader<'a> {
    fn take(&mut self, len: usize) -> Result<&'a [u8], RoomStateError> {
        if self.rest.len() < len {
            return Err(RoomStateError::MalformedSnapshot("truncated"));
        }
        let (head, tail) = self.rest.split_at(len);
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], RoomStateError> {
        self.take(N)?.try_into().map_err(|_| RoomStateError::MalformedSnapshot("truncated"))
    }

    fn chunk(&mut self) -> Result<&'a [u8], RoomStateError> {
        let len = u32::from_be_bytes(self.array()?);
        let len = usize::try_from(len).map_err(|_| RoomStateError::MalformedSnapshot("length"))?;
        self.take(len)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::{SystemTime, UNIX_EPOCH};

    use client_core::mls::{
        generate_key_packages, CommitOutput, HandshakeOutcome, Identity, MlsProvider, RoomGroup,
    };

    use super::*;

    const ROOM: [u8; 16] = *b"server-room-0001";

    /// OpenMLS checks key package lifetimes against the system clock.
    fn now_unix_secs() -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_secs()
    }

    pub(crate) fn server_signer() -> ServerSigner {
        ServerSigner::new(ed25519_dalek::SigningKey::from_bytes(&[42u8; 32]))
    }

    pub(crate) struct Client {
        pub(crate) provider: MlsProvider,
        pub(crate) identity: Identity,
        pub(crate) group: Option<RoomGroup>,
    }

    impl Client {
        pub(crate) fn new(seed_byte: u8) -> Self {
            let provider = MlsProvider::from_seed([seed_byte; 32]);
            let identity = Identity::generate(&provider).expect("identity");
            Self { provider, identity, group: None }
        }

        pub(crate) fn id(&self) -> Vec<u8> {
            self.identity.public_key().to_vec()
        }

        pub(crate) fn room(&self) -> &RoomGroup {
            self.group.as_ref().expect("in room")
        }

        fn key_package(&self) -> Vec<u8> {
            generate_key_packages(&self.provider, &self.identity, 1, now_unix_secs())
                .expect("key package")
                .remove(0)
                .message
        }

        /// Runs a commit-producing operation on this client's group.
        pub(crate) fn commit_with(
            &mut self,
            op: impl FnOnce(
                &mut RoomGroup,
                &MlsProvider,
                &Identity,
            ) -> Result<CommitOutput, client_core::mls::CommitError>,
        ) -> CommitOutput {
            let group = self.group.as_mut().expect("in room");
            op(group, &self.provider, &self.identity).expect("commit")
        }

        fn confirm(&mut self) {
            let group = self.group.as_mut().expect("in room");
            group.confirm_pending_commit(&self.provider).expect("confirm");
        }

        fn discard(&mut self) {
            let group = self.group.as_mut().expect("in room");
            group.discard_pending_commit(&self.provider).expect("discard");
        }

        pub(crate) fn process(&mut self, message: &[u8]) -> HandshakeOutcome {
            let group = self.group.as_mut().expect("in room");
            group.process_handshake(&self.provider, message).expect("process")
        }

        fn join(&mut self, output: &CommitOutput, tree: &[u8]) {
            self.group = Some(
                RoomGroup::join_from_welcome(
                    &self.provider,
                    output.welcome.as_ref().expect("welcome"),
                    Some(tree),
                )
                .expect("join"),
            );
        }
    }

    fn assert_in_step(server: &RoomGroupState, clients: &[&Client]) {
        for client in clients {
            let room = client.room();
            assert_eq!(room.epoch(), server.epoch(), "epoch");
            assert_eq!(room.tree_hash(), server.tree_hash(), "tree hash");
            assert_eq!(
                room.ratchet_tree().expect("tree"),
                server.ratchet_tree().expect("tree"),
                "ratchet tree"
            );
        }
        let rebuilt: HashMap<Vec<u8>, u32> =
            server.members().into_iter().map(|m| (m.identity, m.leaf_index)).collect();
        assert_eq!(rebuilt, server.members_by_identity, "identity index");
    }

    /// Alice creates the room, the server starts tracking it, Alice adds Bob
    /// and Carol; the server validates the commit before anyone applies it.
    pub(crate) fn room_of_three() -> (RoomGroupState, Client, Client, Client) {
        let mut alice = Client::new(1);
        let mut bob = Client::new(2);
        let mut carol = Client::new(3);
        let (group, created) = RoomGroup::create(
            &alice.provider,
            &alice.identity,
            ROOM,
            &server_signer().public_key(),
            now_unix_secs(),
        )
        .expect("create");
        alice.group = Some(group);
        let mut server = RoomGroupState::from_group_info(&created.group_info, &created.ratchet_tree)
            .expect("server state");
        assert_eq!(server.epoch(), 0);
        assert_eq!(server.group_id(), ROOM);
        assert_eq!(server.is_member(&alice.id()), Some(0));
        assert_eq!(server.external_sender_index(&server_signer().public_key()), Some(0));

        let (kp_bob, kp_carol) = (bob.key_package(), carol.key_package());
        let output = alice.commit_with(|g, p, i| g.add_members(p, i, &[&kp_bob, &kp_carol]));
        let summary = server.validate_commit(&output.commit).expect("valid add");
        assert_eq!(summary.epoch, 1);
        assert_eq!(summary.committer, MemberRef { leaf_index: 0, identity: alice.id() });
        assert!(!summary.external);
        assert_eq!(
            summary.added.iter().map(|m| m.identity.clone()).collect::<Vec<_>>(),
            vec![bob.id(), carol.id()]
        );
        assert!(summary.removed.is_empty());
        assert_eq!(server.validate_group_info(&output.group_info).expect("group info"), 0);
        alice.confirm();
        let tree = server.ratchet_tree().expect("tree");
        assert_eq!(tree, output.ratchet_tree);
        bob.join(&output, &tree);
        carol.join(&output, &tree);
        assert_in_step(&server, &[&alice, &bob, &carol]);
        assert_eq!(server.member_count(), 3);
        assert_eq!(server.is_member(&bob.id()), Some(summary.added[0].leaf_index));
        (server, alice, bob, carol)
    }

    #[test]
    fn mls_state_tracks_add_update_remove() {
        let (mut server, mut alice, mut bob, mut carol) = room_of_three();

        let update = bob.commit_with(|g, p, i| g.self_update(p, i));
        let summary = server.validate_commit(&update.commit).expect("valid update");
        assert!(summary.has_path);
        assert_eq!(summary.committer.identity, bob.id());
        bob.confirm();
        alice.process(&update.commit);
        carol.process(&update.commit);
        assert_in_step(&server, &[&alice, &bob, &carol]);

        let carol_leaf = carol.room().own_leaf_index();
        let remove = alice.commit_with(|g, p, i| g.remove_members(p, i, &[carol_leaf]));
        let summary = server.validate_commit(&remove.commit).expect("valid remove");
        assert_eq!(summary.removed, vec![MemberRef { leaf_index: carol_leaf, identity: carol.id() }]);
        alice.confirm();
        bob.process(&remove.commit);
        assert_in_step(&server, &[&alice, &bob]);
        assert_eq!(server.is_member(&carol.id()), None);
        assert_eq!(server.member_count(), 2);
        assert_eq!(server.epoch(), 3);
    }

    #[test]
    fn mls_state_rejects_replayed_stale_foreign_and_tampered_commits() {
        let (mut server, mut alice, mut bob, _carol) = room_of_three();
        let update = bob.commit_with(|g, p, i| g.self_update(p, i));

        // Tampered content: the signature no longer verifies.
        let mut tampered = update.commit.clone();
        let middle = tampered.len() / 2;
        tampered[middle] ^= 0x01;
        let error = server.validate_commit(&tampered).expect_err("tampered");
        assert!(matches!(error, MlsValidationError::InvalidSignature), "{error:?}");
        assert!(error.is_peer_fault());

        // Truncated.
        assert!(matches!(
            server.validate_commit(&update.commit[..update.commit.len() - 3]),
            Err(MlsValidationError::Malformed(_))
        ));
        // Not a handshake message at all.
        assert!(matches!(
            server.validate_commit(&update.group_info),
            Err(MlsValidationError::NotAPublicMessage)
        ));
        // A commit is not a proposal.
        assert!(matches!(server.add_proposal(&update.commit), Err(MlsValidationError::NotAProposal)));

        // The state is untouched by all of the above.
        let epoch = server.epoch();
        server.validate_commit(&update.commit).expect("valid");
        assert_eq!(server.epoch(), epoch + 1);
        bob.confirm();
        alice.process(&update.commit);

        // Replay: same commit again, now one epoch behind.
        let replay = server.validate_commit(&update.commit).expect_err("replay");
        assert!(
            matches!(replay, MlsValidationError::WrongEpoch { message_epoch: 1, current_epoch: 2 }),
            "{replay:?}"
        );
        assert!(!replay.is_peer_fault());

        // A commit for another room.
        let mut eve = Client::new(9);
        let (group, _) = RoomGroup::create(
            &eve.provider,
            &eve.identity,
            *b"another-room-xyz",
            &server_signer().public_key(),
            now_unix_secs(),
        )
        .expect("create");
        eve.group = Some(group);
        let foreign = eve.commit_with(|g, p, i| g.self_update(p, i));
        assert!(matches!(server.validate_commit(&foreign.commit), Err(MlsValidationError::WrongGroup)));
    }

    #[test]
    fn mls_state_rejects_a_forged_commit_from_a_non_member() {
        let (mut alice, mut mallory) = (Client::new(1), Client::new(8));
        let now = now_unix_secs();
        let server_key = server_signer().public_key();
        let (group, created) =
            RoomGroup::create(&alice.provider, &alice.identity, ROOM, &server_key, now).expect("create");
        alice.group = Some(group);
        let mut server =
            RoomGroupState::from_group_info(&created.group_info, &created.ratchet_tree).expect("server");
        // Mallory builds her own group with the same room id and epoch and
        // commits as leaf 0.
        let (group, _) =
            RoomGroup::create(&mallory.provider, &mallory.identity, ROOM, &server_key, now).expect("create");
        mallory.group = Some(group);
        let bob = Client::new(2);
        let kp_bob = bob.key_package();
        let forged = mallory.commit_with(|g, p, i| g.add_members(p, i, &[&kp_bob]));
        let error = server.validate_commit(&forged.commit).expect_err("forged");
        assert!(matches!(error, MlsValidationError::InvalidSignature), "{error:?}");
        assert_eq!(server.epoch(), 0);
        assert_eq!(server.member_count(), 1);
    }

    #[test]
    fn mls_state_enforces_the_credential_policy() {
        use openmls::prelude::{CredentialWithKey, KeyPackage, MlsMessageOut};
        use openmls_basic_credential::SignatureKeyPair;

        let (mut server, mut alice, _bob, _carol) = room_of_three();
        // A key package whose credential names someone else.
        let provider = OpenMlsRustCrypto::default();
        let keys = SignatureKeyPair::from_raw(
            SignatureScheme::ED25519,
            ed25519_dalek::SigningKey::from_bytes(&[3u8; 32]).to_bytes().to_vec(),
            ed25519_dalek::SigningKey::from_bytes(&[3u8; 32]).verifying_key().to_bytes().to_vec(),
        );
        let credential = CredentialWithKey {
            credential: BasicCredential::new(b"not-my-key".to_vec()).into(),
            signature_key: keys.public().to_vec().into(),
        };
        let bundle =
            KeyPackage::builder().build(CIPHERSUITE, &provider, &keys, credential).expect("key package");
        let kp = MlsMessageOut::from(bundle.key_package().clone()).tls_serialize_detached().expect("encode");
        let output = alice.commit_with(|g, p, i| g.add_members(p, i, &[&kp]));
        let error = server.validate_commit(&output.commit).expect_err("policy");
        assert!(matches!(error, MlsValidationError::CredentialMismatch { .. }), "{error:?}");
        assert_eq!(server.epoch(), 1);
    }

    /// A kick and the member's own leave remove the same leaf: a commit
    /// can carry only one Remove per leaf (RFC 9420 §12.2), so the server's
    /// proposal counts as covered when the commit removes its member.
    #[test]
    fn a_kick_and_the_members_own_leave_are_covered_by_one_removal() {
        let (mut server, mut alice, mut bob, mut carol) = room_of_three();
        let carol_leaf = carol.room().own_leaf_index();
        let leave = {
            let group = carol.group.as_mut().expect("in room");
            group.leave(&carol.provider, &carol.identity).expect("leave").proposal
        };
        let issued = server.issue_remove_proposal(&server_signer(), carol_leaf).expect("kick");
        server.add_proposal(&leave).expect("leave proposal");
        for client in [&mut alice, &mut bob] {
            client.process(&issued.message);
            client.process(&leave);
        }
        let commit = bob.commit_with(|g, p, i| g.commit_pending_proposals(p, i));
        let summary = server.validate_commit(&commit.commit).expect("one removal covers both");
        assert_eq!(summary.removed, vec![MemberRef { leaf_index: carol_leaf, identity: carol.id() }]);
        assert!(server.pending_server_proposal_refs().expect("refs").is_empty());
        bob.confirm();
        alice.process(&commit.commit);
        assert_in_step(&server, &[&alice, &bob]);
    }

    #[test]
    fn mls_state_server_remove_must_be_committed() {
        let (mut server, mut alice, mut bob, mut carol) = room_of_three();
        let carol_leaf = carol.room().own_leaf_index();

        // A stranger's key cannot propose.
        let stranger = ServerSigner::new(ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]));
        assert!(matches!(
            server.issue_remove_proposal(&stranger, carol_leaf),
            Err(IssueProposalError::NotAnExternalSender)
        ));
        assert!(matches!(
            server.issue_remove_proposal(&server_signer(), 99),
            Err(IssueProposalError::UnknownMember(99))
        ));

        // Bob commits before the kick reaches him: his commit is refused.
        let early = bob.commit_with(|g, p, i| g.self_update(p, i));

        let issued = server.issue_remove_proposal(&server_signer(), carol_leaf).expect("issue");
        assert_eq!(server.pending_server_proposal_refs().expect("refs"), vec![issued.proposal_ref.clone()]);
        // Sequencing the same proposal twice is refused.
        assert!(matches!(server.add_proposal(&issued.message), Err(MlsValidationError::DuplicateProposal)));
        let error = server.validate_commit(&early.commit).expect_err("uncovered");
        let MlsValidationError::UncoveredServerProposals { missing } = error else {
            panic!("expected UncoveredServerProposals, got {error:?}");
        };
        assert_eq!(missing, vec![issued.proposal_ref.clone()]);
        bob.discard();

        for client in [&mut alice, &mut bob, &mut carol] {
            let HandshakeOutcome::ProposalStored { proposal_ref, .. } = client.process(&issued.message)
            else {
                panic!("expected a stored proposal");
            };
            assert_eq!(proposal_ref, issued.proposal_ref);
        }
        let commit = bob.commit_with(|g, p, i| g.commit_pending_proposals(p, i));
        let staged = server.stage_commit(&commit.commit).expect("stage");
        assert!(staged.covers_all(std::slice::from_ref(&issued.proposal_ref)));
        let summary = server.merge_staged_commit(staged).expect("merge");
        assert!(summary.covers_all(std::slice::from_ref(&issued.proposal_ref)));
        assert_eq!(summary.removed, vec![MemberRef { leaf_index: carol_leaf, identity: carol.id() }]);
        assert!(server.pending_server_proposal_refs().expect("refs").is_empty());
        bob.confirm();
        alice.process(&commit.commit);
        let HandshakeOutcome::CommitApplied(applied) = carol.process(&commit.commit) else {
            panic!("expected a commit");
        };
        assert!(applied.self_removed);
        assert_in_step(&server, &[&alice, &bob]);
        assert_eq!(server.is_member(&carol.id()), None);
    }

    #[test]
    fn members_proposals_are_bounded_per_sender_and_per_room_and_server_ones_do_not_count() {
        let member = |leaf: u32, n: usize| Queued {
            proposal_ref: n.to_be_bytes().to_vec(),
            bytes: 100,
            member_leaf: Some(leaf),
            external: false,
        };
        let server = |n: usize| Queued {
            proposal_ref: n.to_be_bytes().to_vec(),
            bytes: 100_000,
            member_leaf: None,
            external: true,
        };
        let own_full: Vec<Queued> =
            (0..MEMBER_PROPOSALS_PENDING_PER_SENDER_MAX).map(|n| member(1, n)).collect();
        assert!(matches!(
            check_member_proposals_bound(&own_full, 1, 100),
            Err(MlsValidationError::TooManyProposals { pending, max_pending })
                if pending == MEMBER_PROPOSALS_PENDING_PER_SENDER_MAX
                    && max_pending == MEMBER_PROPOSALS_PENDING_PER_SENDER_MAX
        ));
        assert!(check_member_proposals_bound(&own_full, 2, 100).is_ok(), "another member may still propose");
        assert!(check_member_proposals_bound(&own_full[1..], 1, 100).is_ok(), "one below the sender's bound");
        // Many members, each below its own bound, fill the room's allowance.
        let per_leaf = MEMBER_PROPOSALS_PENDING_PER_SENDER_MAX - 1;
        let mut room_full: Vec<Queued> = (0..MEMBER_PROPOSALS_PENDING_MAX)
            .map(|n| member(u32::try_from(n / per_leaf).unwrap() + 10, n))
            .collect();
        room_full.extend((0..crate::room::sequencer::SERVER_PROPOSALS_PENDING_MAX).map(server));
        assert!(matches!(
            check_member_proposals_bound(&room_full, 9_999, 100),
            Err(MlsValidationError::TooManyProposals { max_pending, .. }) if max_pending == MEMBER_PROPOSALS_PENDING_MAX
        ));
        room_full.remove(0);
        assert!(
            check_member_proposals_bound(&room_full, 9_999, 100).is_ok(),
            "server proposals do not count"
        );

        // Bytes: one large proposal, or a few, reach the sender's bound first.
        let per_sender = MEMBER_PROPOSALS_PENDING_BYTES_PER_SENDER_MAX;
        assert!(check_member_proposals_bound(&[], 1, per_sender).is_ok());
        assert!(matches!(
            check_member_proposals_bound(&[], 1, per_sender + 1),
            Err(MlsValidationError::ProposalBytes { pending_bytes, max_bytes })
                if pending_bytes == per_sender + 1 && max_bytes == per_sender
        ));
        let half = Queued { bytes: per_sender / 2 + 1, ..member(1, 0) };
        assert!(matches!(
            check_member_proposals_bound(std::slice::from_ref(&half), 1, per_sender / 2),
            Err(MlsValidationError::ProposalBytes { max_bytes, .. }) if max_bytes == per_sender
        ));
        assert!(check_member_proposals_bound(std::slice::from_ref(&half), 2, per_sender / 2).is_ok());
        // ... and many members together reach the room's.
        let large: Vec<Queued> = (0..MEMBER_PROPOSALS_PENDING_BYTES_MAX / per_sender)
            .map(|n| Queued { bytes: per_sender, ..member(u32::try_from(n).unwrap() + 10, n) })
            .collect();
        assert!(matches!(
            check_member_proposals_bound(&large, 9_999, 1),
            Err(MlsValidationError::ProposalBytes { max_bytes, .. }) if max_bytes == MEMBER_PROPOSALS_PENDING_BYTES_MAX
        ));
    }

    #[test]
    fn a_members_proposals_beyond_its_bound_are_refused_and_another_member_may_still_propose() {
        use openmls::prelude::{GroupId, LeafNodeParameters, MlsGroup, OpenMlsProvider as _};
        let (mut server, _alice, mut bob, carol) = room_of_three();
        // Carol's group as OpenMLS keeps it, to make distinct self-update proposals.
        let mut mls = MlsGroup::load(carol.provider.storage(), &GroupId::from_slice(&ROOM))
            .expect("storage")
            .expect("carol's group");
        for proposed in 0..=MEMBER_PROPOSALS_PENDING_PER_SENDER_MAX {
            let (message, _) = mls
                .propose_self_update(&carol.provider, carol.identity.signer(), LeafNodeParameters::default())
                .expect("proposal");
            let added = server.add_proposal(&message.tls_serialize_detached().expect("encode"));
            if proposed < MEMBER_PROPOSALS_PENDING_PER_SENDER_MAX {
                added.expect("within the sender's bound");
            } else {
                assert!(matches!(
                    added,
                    Err(MlsValidationError::TooManyProposals { pending, max_pending })
                        if pending == max_pending && max_pending == MEMBER_PROPOSALS_PENDING_PER_SENDER_MAX
                ));
            }
        }
        assert_eq!(
            server.pending_proposal_refs().expect("refs").len(),
            MEMBER_PROPOSALS_PENDING_PER_SENDER_MAX
        );
        let left = bob.group.as_mut().expect("in room").leave(&bob.provider, &bob.identity).expect("leave");
        server.add_proposal(&left.proposal).expect("another member's proposal");
    }

    #[test]
    fn mls_state_member_proposal_by_reference() {
        let (mut server, mut alice, mut bob, mut carol) = room_of_three();
        let carol_leaf = carol.room().own_leaf_index();
        let left = {
            let group = carol.group.as_mut().expect("in room");
            group.leave(&carol.provider, &carol.identity).expect("leave")
        };
        let summary = server.add_proposal(&left.proposal).expect("proposal");
        assert_eq!(summary.proposal_ref, left.proposal_ref);
        assert_eq!(summary.sender, ProposalSender::Member(carol_leaf));
        assert_eq!(summary.kind, ProposalKind::Remove { leaf_index: carol_leaf });
        // Member proposals are not mandatory for the next commit.
        assert!(server.pending_server_proposal_refs().expect("refs").is_empty());
        alice.process(&left.proposal);
        bob.process(&left.proposal);
        let commit = alice.commit_with(|g, p, i| g.commit_pending_proposals(p, i));
        let summary = server.validate_commit(&commit.commit).expect("valid");
        assert_eq!(summary.covered_proposal_refs, vec![left.proposal_ref]);
        alice.confirm();
        bob.process(&commit.commit);
        assert_in_step(&server, &[&alice, &bob]);
        assert!(server.pending_proposal_refs().expect("refs").is_empty());
    }

    #[test]
    fn mls_state_external_join() {
        let (mut server, mut alice, mut bob, mut carol) = room_of_three();
        // The GroupInfo of the last commit is what joiners get.
        let group_info = alice.room().group_info(&alice.provider, &alice.identity).expect("group info");
        assert_eq!(server.validate_group_info(&group_info).expect("valid"), 0);
        let mut dave = Client::new(4);
        let (group, output) = RoomGroup::join_by_external_commit(
            &dave.provider,
            &dave.identity,
            &group_info,
            Some(&server.ratchet_tree().expect("tree")),
        )
        .expect("external join");
        dave.group = Some(group);
        let summary = server.validate_commit(&output.commit).expect("valid external");
        assert!(summary.external);
        assert_eq!(summary.committer.identity, dave.id());
        assert_eq!(summary.committer.leaf_index, dave.room().own_leaf_index());
        assert_eq!(server.is_member(&dave.id()), Some(dave.room().own_leaf_index()));
        // The old GroupInfo is now stale; the joiner's one is current.
        assert!(matches!(server.validate_group_info(&group_info), Err(GroupInfoError::Mismatch)));
        assert_eq!(
            server.validate_group_info(&output.group_info).expect("valid"),
            dave.room().own_leaf_index()
        );
        for client in [&mut alice, &mut bob, &mut carol] {
            client.process(&output.commit);
        }
        assert_in_step(&server, &[&alice, &bob, &carol, &dave]);
        assert_eq!(server.member_count(), 4);
    }

    /// The known gap (DESIGN §3): the membership tag is keyed with a secret
    /// the server does not have. A commit with a broken tag passes the
    /// server and is refused by members.
    #[test]
    fn mls_state_cannot_check_the_membership_tag() {
        let (mut server, mut alice, mut bob, _carol) = room_of_three();
        let update = bob.commit_with(|g, p, i| g.self_update(p, i));
        // A member's PublicMessage ends with its 32-byte membership tag.
        let mut bad_tag = update.commit.clone();
        let last = bad_tag.len() - 1;
        bad_tag[last] ^= 0x01;
        server.validate_commit(&bad_tag).expect("server cannot tell");
        let group = alice.group.as_mut().expect("in room");
        let refused = group.process_handshake(&alice.provider, &bad_tag);
        assert!(matches!(refused, Err(client_core::mls::ProcessError::Invalid(_))), "{refused:?}");
    }

    #[test]
    fn mls_state_group_info_checks() {
        let (server, alice, _bob, _carol) = room_of_three();
        let group_info = alice.room().group_info(&alice.provider, &alice.identity).expect("group info");
        let mut tampered = group_info.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 0x01;
        assert!(matches!(server.validate_group_info(&tampered), Err(GroupInfoError::InvalidSignature)));
        assert!(matches!(server.validate_group_info(&group_info[..20]), Err(GroupInfoError::Malformed(_))));
    }

    #[test]
    fn mls_state_losing_commit_rebases() {
        let (mut server, mut alice, mut bob, mut carol) = room_of_three();
        let dave = Client::new(4);
        let alice_commit = alice.commit_with(|g, p, i| g.self_update(p, i));
        let kp = dave.key_package();
        let bob_commit = bob.commit_with(|g, p, i| g.add_members(p, i, &[&kp]));
        server.validate_commit(&alice_commit.commit).expect("first wins");
        let lost = server.validate_commit(&bob_commit.commit).expect_err("second loses");
        assert!(matches!(lost, MlsValidationError::WrongEpoch { message_epoch: 1, current_epoch: 2 }));
        alice.confirm();
        carol.process(&alice_commit.commit);
        bob.discard();
        bob.process(&alice_commit.commit);
        let kp = dave.key_package();
        let rebased = bob.commit_with(|g, p, i| g.add_members(p, i, &[&kp]));
        let summary = server.validate_commit(&rebased.commit).expect("rebased");
        assert_eq!(summary.added[0].identity, dave.id());
        bob.confirm();
        alice.process(&rebased.commit);
        carol.process(&rebased.commit);
        assert_in_step(&server, &[&alice, &bob, &carol]);
    }

    #[test]
    fn mls_state_snapshot_restore_and_replay() {
        let (mut server, mut alice, mut bob, mut carol) = room_of_three();
        let snapshot = server.snapshot().expect("snapshot");
        assert_eq!(snapshot, server.snapshot().expect("snapshot"), "deterministic");

        // Later commits, plus a pending member proposal at the end.
        let mut later = Vec::new();
        let update = bob.commit_with(|g, p, i| g.self_update(p, i));
        server.validate_commit(&update.commit).expect("valid");
        bob.confirm();
        alice.process(&update.commit);
        carol.process(&update.commit);
        later.push(update.commit);
        let dave = Client::new(4);
        let kp = dave.key_package();
        let add = carol.commit_with(|g, p, i| g.add_members(p, i, &[&kp]));
        server.validate_commit(&add.commit).expect("valid");
        later.push(add.commit);
        let issued = server.issue_remove_proposal(&server_signer(), 1).expect("issue");

        // Restart: snapshot + replay.
        let mut restored = RoomGroupState::restore(&snapshot).expect("restore");
        assert_eq!(restored.epoch(), 1);
        for commit in &later {
            restored.validate_commit(commit).expect("replay");
        }
        restored.add_proposal(&issued.message).expect("replay proposal");
        assert_eq!(restored.epoch(), server.epoch());
        assert_eq!(restored.tree_hash(), server.tree_hash());
        assert_eq!(restored.members(), server.members());
        assert_eq!(restored.members_by_identity, server.members_by_identity);
        assert_eq!(restored.pending_server_proposal_refs().expect("refs"), vec![issued.proposal_ref.clone()]);
        assert_eq!(restored.snapshot().expect("s"), server.snapshot().expect("s"));

        // A snapshot with a pending proposal restores it too.
        let again = RoomGroupState::restore(&server.snapshot().expect("s")).expect("restore");
        assert_eq!(again.pending_server_proposal_refs().expect("refs"), vec![issued.proposal_ref]);

        assert!(matches!(
            RoomGroupState::restore(&snapshot[..snapshot.len() - 1]),
            Err(RoomStateError::MalformedSnapshot(_))
        ));
        assert!(matches!(RoomGroupState::restore(b"nope"), Err(RoomStateError::MalformedSnapshot(_))));
    }

    #[test]
    fn mls_state_rejects_bad_room_creation_input() {
        let alice = Client::new(1);
        let (_group, created) = RoomGroup::create(
            &alice.provider,
            &alice.identity,
            ROOM,
            &server_signer().public_key(),
            now_unix_secs(),
        )
        .expect("create");
        assert!(matches!(
            RoomGroupState::from_group_info(&created.ratchet_tree, &created.ratchet_tree),
            Err(RoomStateError::Malformed(_) | RoomStateError::NotAGroupInfo)
        ));
        assert!(matches!(
            RoomGroupState::from_group_info(&created.group_info, &[1, 2, 3]),
            Err(RoomStateError::MalformedRatchetTree(_))
        ));
        // A tree that does not match the GroupInfo's tree hash.
        let other = Client::new(2);
        let (_g, other_created) = RoomGroup::create(
            &other.provider,
            &other.identity,
            ROOM,
            &server_signer().public_key(),
            now_unix_secs(),
        )
        .expect("create");
        assert!(matches!(
            RoomGroupState::from_group_info(&created.group_info, &other_created.ratchet_tree),
            Err(RoomStateError::Invalid(_))
        ));
        let mut tampered = created.group_info.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 0x01;
        assert!(matches!(
            RoomGroupState::from_group_info(&tampered, &created.ratchet_tree),
            Err(RoomStateError::Invalid(_))
        ));
    }
}
