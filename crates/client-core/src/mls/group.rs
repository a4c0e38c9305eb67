//! A room's MLS group as seen by one member.
//!
//! Commits are two-phase: creating one leaves it *pending* until the server
//! has sequenced it ([`RoomGroup::confirm_pending_commit`]) or refused it
//! ([`RoomGroup::discard_pending_commit`], after which the caller re-applies
//! its intent in the new epoch). A commit from another member for our epoch
//! means ours lost: processing it discards ours and says so.

use openmls::group::{MlsGroup, MlsGroupJoinConfig, StagedCommit, StagedWelcome};
use openmls::prelude::{
    BasicCredential, Credential, Extension, Extensions, ExternalSender, GroupId, LeafNodeIndex,
    LeafNodeParameters, MlsMessageBodyIn, MlsMessageIn, MlsMessageOut, ProcessedMessageContent, Proposal,
    ProposalOrRefType, ProtocolMessage, ProtocolVersion, RatchetTreeIn, Sender, SenderExtensionIndex,
    SignaturePublicKey, PURE_PLAINTEXT_WIRE_FORMAT_POLICY,
};
use openmls::prelude::{ContentType, WelcomeError};
use openmls::storage::OpenMlsProvider;
use tls_codec::{Deserialize as _, Serialize as _};

use super::error::{
    BoxError, CommitError, CreateRoomError, ExportError, JoinError, PendingCommitError, ProcessError,
    StorageError,
};
use super::identity::Identity;
use kalandra_proto::federation::{DomainName, PeerKeys};
use kalandra_proto::home::{check_member_home, HomeCheck};

use super::{leaf_capabilities, lifetime_at, CIPHERSUITE, IDENTITY_LEN, ROOM_ID_LEN};

/// A member: its leaf index and credential identity (its Ed25519 public key).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MemberInfo {
    /// Leaf index in the ratchet tree.
    pub leaf_index: u32,
    /// BasicCredential identity.
    pub identity: Vec<u8>,
}

/// The home certificate a leaf carries: none, or one read (or not) from it.
pub type LeafHomeCertificate = kalandra_mls::LeafHomeCertificate;

/// What a member's leaf shows of its home: its signature key, whether its
/// credential names that key (Kalandra's credential rule, which a member
/// that joined by Welcome has not seen checked), and its certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafHome {
    /// The leaf's signature key: the key a certificate must certify.
    pub signature_key: Vec<u8>,
    /// Whether the leaf's credential identity is its signature key.
    pub credential_is_key: bool,
    /// The certificate the leaf carries.
    pub certificate: LeafHomeCertificate,
}

impl LeafHome {
    /// Checks the leaf's certificate with `keys_of`, the keys the checking
    /// member's server accepts for a domain, at `now_ms`: a leaf whose
    /// credential names another key than its signature key is invalid
    /// whatever it carries.
    pub fn check<'k>(
        self,
        keys_of: impl FnOnce(&DomainName) -> Option<&'k PeerKeys>,
        now_ms: u64,
    ) -> HomeCheck {
        if !self.credential_is_key {
            let reason = "the leaf's credential names another key than its signature key".to_owned();
            return HomeCheck::Invalid { reason };
        }
        check_member_home(self.certificate, &self.signature_key, keys_of, now_ms)
    }
}

/// What the server needs to start a room's public state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomCreated {
    /// Signed GroupInfo for epoch 0, as an `MLSMessage`.
    pub group_info: Vec<u8>,
    /// The ratchet tree.
    pub ratchet_tree: Vec<u8>,
}

/// A commit we created, pending until the server answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitOutput {
    /// The commit, a `PublicMessage` inside an `MLSMessage`.
    pub commit: Vec<u8>,
    /// The Welcome for added members, as an `MLSMessage`.
    pub welcome: Option<Vec<u8>>,
    /// The signed GroupInfo of the new epoch, as an `MLSMessage`.
    pub group_info: Vec<u8>,
    /// The ratchet tree of the new epoch (for Welcome recipients and
    /// external joiners).
    pub ratchet_tree: Vec<u8>,
    /// The epoch the commit moves the group into.
    pub new_epoch: u64,
}

/// A proposal we sent by reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProposalOutput {
    /// The proposal, a `PublicMessage` inside an `MLSMessage`.
    pub proposal: Vec<u8>,
    /// Its reference (RFC 9420 §5.2), which a commit uses to cover it.
    pub proposal_ref: Vec<u8>,
}

/// Result of joining by external commit. The joiner's state already is in
/// the new epoch; if the server refuses the commit, drop the group with
/// [`RoomGroup::delete`] and join again from the current GroupInfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalJoinOutput {
    /// The external commit, a `PublicMessage` inside an `MLSMessage`.
    pub commit: Vec<u8>,
    /// The signed GroupInfo of the new epoch, as an `MLSMessage`.
    pub group_info: Vec<u8>,
    /// The ratchet tree of the new epoch.
    pub ratchet_tree: Vec<u8>,
}

/// Who sent a proposal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProposalSender {
    /// A member, by leaf index.
    Member(u32),
    /// An entry of the group's external senders (the server), by index.
    External(u32),
}

/// A commit that moved the group to a new epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitApplied {
    /// The new epoch.
    pub epoch: u64,
    /// The committer; for an external commit, the joiner at its new leaf.
    pub committer: MemberInfo,
    /// Whether this was an external commit (a join).
    pub external: bool,
    /// Members added, at their leaves in the new epoch.
    pub added: Vec<MemberInfo>,
    /// Members removed, at their leaves in the previous epoch.
    pub removed: Vec<MemberInfo>,
    /// References of the proposals the commit covered by reference.
    pub covered_proposal_refs: Vec<Vec<u8>>,
    /// We were removed: the group is no longer usable.
    pub self_removed: bool,
    /// A pending commit of ours lost to this one and was discarded: re-apply
    /// its intent in the new epoch.
    pub own_commit_discarded: bool,
}

/// The effect of an incoming handshake message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeOutcome {
    /// A proposal was validated and stored; the next commit covers it.
    ProposalStored {
        /// Its reference.
        proposal_ref: Vec<u8>,
        /// Who sent it.
        sender: ProposalSender,
        /// For a Remove proposal, the leaf it removes.
        removes: Option<u32>,
    },
    /// A commit was applied.
    CommitApplied(CommitApplied),
}

/// One member's view of a room's MLS group.
#[derive(Debug)]
pub struct RoomGroup {
    pub(super) group: MlsGroup,
    room_id: [u8; ROOM_ID_LEN],
}

fn boxed<E: std::error::Error + Send + Sync + 'static>(error: E) -> BoxError {
    Box::new(error)
}

/// Group configuration for joiners: handshake messages stay `PublicMessage`s
/// so that the server can validate them; trees travel outside GroupInfos.
fn join_config() -> MlsGroupJoinConfig {
    MlsGroupJoinConfig::builder()
        .wire_format_policy(PURE_PLAINTEXT_WIRE_FORMAT_POLICY)
        .use_ratchet_tree_extension(false)
        .build()
}

fn identity_of(credential: &Credential) -> Vec<u8> {
    match BasicCredential::try_from(credential.clone()) {
        Ok(basic) => basic.identity().to_vec(),
        Err(_) => credential.serialized_content().to_vec(),
    }
}

fn room_id_of(group_id: &GroupId) -> Option<[u8; ROOM_ID_LEN]> {
    group_id.as_slice().try_into().ok()
}

fn encode(message: &MlsMessageOut) -> Result<Vec<u8>, BoxError> {
    message.tls_serialize_detached().map_err(boxed)
}

impl RoomGroup {
    /// Creates a room whose MLS group id is `room_id`, with `identity` as
    /// its only member and the server's Ed25519 key as the group's one
    /// external sender (so that the server can propose removals).
    pub fn create<P>(
        provider: &P,
        identity: &Identity,
        room_id: [u8; ROOM_ID_LEN],
        server_signature_key: &[u8],
        now_unix_secs: u64,
    ) -> Result<(Self, RoomCreated), CreateRoomError>
    where
        P: OpenMlsProvider,
        P::StorageError: Send + Sync + 'static,
    {
        let server_key: [u8; IDENTITY_LEN] = server_signature_key
            .try_into()
            .map_err(|_| CreateRoomError::InvalidServerKeyLength(server_signature_key.len()))?;
        if ed25519_dalek::VerifyingKey::from_bytes(&server_key).is_err() {
            return Err(CreateRoomError::InvalidServerKey);
        }
        let external_sender = ExternalSender::new(
            SignaturePublicKey::from(server_key.to_vec()),
            BasicCredential::new(server_key.to_vec()).into(),
        );
        let extensions = Extensions::single(Extension::ExternalSenders(vec![external_sender]))
            .map_err(|e| CreateRoomError::Internal(boxed(e)))?;
        let group = MlsGroup::builder()
            .with_group_id(GroupId::from_slice(&room_id))
            .ciphersuite(CIPHERSUITE)
            .with_wire_format_policy(PURE_PLAINTEXT_WIRE_FORMAT_POLICY)
            .use_ratchet_tree_extension(false)
            .with_capabilities(leaf_capabilities())
            .with_leaf_node_extensions(identity.leaf_extensions())
            .map_err(|e| CreateRoomError::Internal(boxed(e)))?
            .lifetime(lifetime_at(now_unix_secs))
            .with_group_context_extensions(extensions)
            .build(provider, identity.signer(), identity.credential_with_key())
            .map_err(|e| match e {
                openmls::group::NewGroupError::GroupAlreadyExists => CreateRoomError::AlreadyExists,
                other => CreateRoomError::Internal(boxed(other)),
            })?;
        let room = Self { group, room_id };
        let created = RoomCreated {
            group_info: room
                .group_info(provider, identity)
                .map_err(|e| CreateRoomError::Internal(boxed(e)))?,
            ratchet_tree: room.ratchet_tree().map_err(|e| CreateRoomError::Internal(boxed(e)))?,
        };
        Ok((room, created))
    }

    /// Loads a group previously created or joined with the same storage.
    pub fn load<P>(provider: &P, room_id: [u8; ROOM_ID_LEN]) -> Result<Option<Self>, StorageError>
    where
        P: OpenMlsProvider,
        P::StorageError: Send + Sync + 'static,
    {
        let group = MlsGroup::load(provider.storage(), &GroupId::from_slice(&room_id))
            .map_err(|e| StorageError::Storage(boxed(e)))?;
        Ok(group.map(|group| Self { group, room_id }))
    }

    /// Deletes this group's state from storage (after leaving, being
    /// removed, or a refused external join).
    pub fn delete<P>(mut self, provider: &P) -> Result<(), StorageError>
    where
        P: OpenMlsProvider,
        P::StorageError: Send + Sync + 'static,
    {
        self.group.delete(provider.storage()).map_err(|e| StorageError::Storage(boxed(e)))
    }

    /// Joins from a Welcome. `ratchet_tree` is required unless the Welcome's
    /// GroupInfo carries the tree (Kalandra rooms do not put it there).
    ///
    /// Lifetimes of leaves in the tree are not checked: a member that never
    /// updated keeps its key package's lifetime, and RFC 9420 §7.3 leaves the
    /// check optional for trees received in a Welcome.
    pub fn join_from_welcome<P>(
        provider: &P,
        welcome: &[u8],
        ratchet_tree: Option<&[u8]>,
    ) -> Result<Self, JoinError>
    where
        P: OpenMlsProvider,
        P::StorageError: Send + Sync + 'static,
    {
        let message = MlsMessageIn::tls_deserialize_exact(welcome).map_err(JoinError::Malformed)?;
        let MlsMessageBodyIn::Welcome(welcome) = message.extract() else {
            return Err(JoinError::NotAWelcome);
        };
        let tree = ratchet_tree.map(decode_tree).transpose()?;
        let map_welcome_error = |e: WelcomeError<P::StorageError>| match e {
            WelcomeError::NoMatchingKeyPackage | WelcomeError::NoMatchingEncryptionKey => JoinError::NotForUs,
            WelcomeError::LibraryError(_) | WelcomeError::StorageError(_) => JoinError::Internal(boxed(e)),
            other => JoinError::Invalid(boxed(other)),
        };
        let mut builder = StagedWelcome::build_from_welcome(provider, &join_config(), welcome)
            .map_err(map_welcome_error)?
            .skip_lifetime_validation();
        if let Some(tree) = tree {
            builder = builder.with_ratchet_tree(tree);
        }
        let group =
            builder.build().map_err(map_welcome_error)?.into_group(provider).map_err(map_welcome_error)?;
        let room_id = room_id_of(group.group_id())
            .ok_or_else(|| JoinError::Invalid("group id is not a 16-byte room id".into()))?;
        Ok(Self { group, room_id })
    }

    /// Joins by external commit from the room's current GroupInfo and tree.
    /// The returned group is already in the new epoch (see
    /// [`ExternalJoinOutput`]).
    pub fn join_by_external_commit<P>(
        provider: &P,
        identity: &Identity,
        group_info: &[u8],
        ratchet_tree: Option<&[u8]>,
    ) -> Result<(Self, ExternalJoinOutput), JoinError>
    where
        P: OpenMlsProvider,
        P::StorageError: Send + Sync + 'static,
    {
        let message = MlsMessageIn::tls_deserialize_exact(group_info).map_err(JoinError::Malformed)?;
        let MlsMessageBodyIn::GroupInfo(group_info) = message.extract() else {
            return Err(JoinError::NotAGroupInfo);
        };
        let room_id = room_id_of(group_info.group_id())
            .ok_or_else(|| JoinError::Invalid("group id is not a 16-byte room id".into()))?;
        let mut builder =
            MlsGroup::external_commit_builder().with_config(join_config()).skip_lifetime_validation();
        if let Some(tree) = ratchet_tree {
            builder = builder.with_ratchet_tree(decode_tree(tree)?);
        }
        let (group, bundle) = builder
            .build_group(provider, group_info, identity.credential_with_key())
            .map_err(|e| JoinError::Invalid(boxed(e)))?
            .leaf_node_parameters(
                LeafNodeParameters::builder()
                    .with_capabilities(leaf_capabilities())
                    .with_extensions(identity.leaf_extensions())
                    .build(),
            )
            .load_psks(provider.storage())
            .map_err(|e| JoinError::Internal(boxed(e)))?
            .create_group_info(true)
            .build(provider.rand(), provider.crypto(), identity.signer(), |_| true)
            .map_err(|e| JoinError::Invalid(boxed(e)))?
            .finalize(provider)
            .map_err(|e| JoinError::Internal(boxed(e)))?;
        let (commit, _welcome, group_info) = bundle.into_contents();
        let group_info =
            group_info.ok_or_else(|| JoinError::Internal("external commit produced no GroupInfo".into()))?;
        let room = Self { group, room_id };
        let output = ExternalJoinOutput {
            commit: encode(&commit).map_err(JoinError::Internal)?,
            group_info: encode(&MlsMessageOut::from(group_info)).map_err(JoinError::Internal)?,
            ratchet_tree: room.ratchet_tree().map_err(|e| JoinError::Internal(boxed(e)))?,
        };
        Ok((room, output))
    }

    /// Commits adding the members whose key packages (`MLSMessage`s, as
    /// claimed from the directory) are given. Also covers every pending
    /// proposal.
    pub fn add_members<P>(
        &mut self,
        provider: &P,
        identity: &Identity,
        key_packages: &[&[u8]],
    ) -> Result<CommitOutput, CommitError>
    where
        P: OpenMlsProvider,
        P::StorageError: Send + Sync + 'static,
    {
        if key_packages.is_empty() {
            return Err(CommitError::EmptyInput);
        }
        let mut verified = Vec::with_capacity(key_packages.len());
        for (index, bytes) in key_packages.iter().enumerate() {
            let message = MlsMessageIn::tls_deserialize_exact(bytes)
                .map_err(|source| CommitError::MalformedKeyPackage { index, source })?;
            let MlsMessageBodyIn::KeyPackage(key_package) = message.extract() else {
                return Err(CommitError::NotAKeyPackage { index });
            };
            let key_package = key_package
                .validate(provider.crypto(), ProtocolVersion::Mls10)
                .map_err(|source| CommitError::InvalidKeyPackage { index, source })?;
            verified.push(key_package);
        }
        self.commit(provider, identity, |builder| builder.propose_adds(verified))
    }

    /// Commits removing the members at `leaf_indices`. Also covers every
    /// pending proposal.
    pub fn remove_members<P>(
        &mut self,
        provider: &P,
        identity: &Identity,
        leaf_indices: &[u32],
    ) -> Result<CommitOutput, CommitError>
    where
        P: OpenMlsProvider,
        P::StorageError: Send + Sync + 'static,
    {
        if leaf_indices.is_empty() {
            return Err(CommitError::EmptyInput);
        }
        for &leaf in leaf_indices {
            if leaf == self.own_leaf_index() {
                return Err(CommitError::SelfRemoval);
            }
            if self.group.member_at(LeafNodeIndex::new(leaf)).is_none() {
                return Err(CommitError::UnknownMember(leaf));
            }
        }
        let removed: Vec<LeafNodeIndex> = leaf_indices.iter().copied().map(LeafNodeIndex::new).collect();
        self.commit(provider, identity, |builder| builder.propose_removals(removed))
    }

    /// Commits a fresh leaf and path for this member (post-compromise
    /// security). Also covers every pending proposal.
    pub fn self_update<P>(&mut self, provider: &P, identity: &Identity) -> Result<CommitOutput, CommitError>
    where
        P: OpenMlsProvider,
        P::StorageError: Send + Sync + 'static,
    {
        // A fresh leaf carries the home certificate of this connection
        // (renewing one near its end), when the server issued one.
        #[cfg(feature = "injected-bugs")]
        if crate::bugs::planted().self_update_drops_home_certificate {
            let parameters = LeafNodeParameters::builder()
                .with_capabilities(leaf_capabilities())
                .with_extensions(openmls::prelude::Extensions::empty())
                .build();
            return self.commit(provider, identity, |builder| {
                builder.force_self_update(true).leaf_node_parameters(parameters)
            });
        }
        let parameters = match identity.home_certificate() {
            Some(_) => LeafNodeParameters::builder()
                .with_capabilities(leaf_capabilities())
                .with_extensions(identity.leaf_extensions())
                .build(),
            None => LeafNodeParameters::default(),
        };
        self.commit(provider, identity, |builder| {
            builder.force_self_update(true).leaf_node_parameters(parameters)
        })
    }

    /// Commits every pending proposal (for example a removal the server
    /// proposed, which the server requires the next commit to cover).
    pub fn commit_pending_proposals<P>(
        &mut self,
        provider: &P,
        identity: &Identity,
    ) -> Result<CommitOutput, CommitError>
    where
        P: OpenMlsProvider,
        P::StorageError: Send + Sync + 'static,
    {
        self.commit(provider, identity, |builder| builder)
    }

    /// Proposes our own removal (an RFC 9420 Remove proposal for our leaf);
    /// another member commits it.
    pub fn leave<P>(&mut self, provider: &P, identity: &Identity) -> Result<ProposalOutput, CommitError>
    where
        P: OpenMlsProvider,
        P::StorageError: Send + Sync + 'static,
    {
        self.check_can_commit()?;
        let own = self.group.own_leaf_index();
        let message = self
            .group
            .leave_group(provider, identity.signer())
            .map_err(|e| CommitError::Internal(boxed(e)))?;
        let proposal_ref = self
            .group
            .pending_proposals()
            .filter(|queued| matches!(queued.sender(), Sender::Member(leaf) if *leaf == own))
            .find_map(|queued| match queued.proposal() {
                Proposal::Remove(remove) if remove.removed() == own => {
                    Some(queued.proposal_reference_ref().as_slice().to_vec())
                }
                _ => None,
            })
            .ok_or_else(|| CommitError::Internal("own Remove proposal not stored".into()))?;
        Ok(ProposalOutput { proposal: encode(&message).map_err(CommitError::Internal)?, proposal_ref })
    }

    fn check_can_commit(&self) -> Result<(), CommitError> {
        if !self.group.is_active() {
            return Err(CommitError::NotAMember);
        }
        if self.group.pending_commit().is_some() {
            return Err(CommitError::CommitPending);
        }
        Ok(())
    }

    fn commit<P>(
        &mut self,
        provider: &P,
        identity: &Identity,
        configure: impl FnOnce(
            openmls::prelude::CommitBuilder<'_, openmls::prelude::Initial>,
        ) -> openmls::prelude::CommitBuilder<'_, openmls::prelude::Initial>,
    ) -> Result<CommitOutput, CommitError>
    where
        P: OpenMlsProvider,
        P::StorageError: Send + Sync + 'static,
    {
        self.check_can_commit()?;
        let bundle = configure(self.group.commit_builder().consume_proposal_store(true))
            .load_psks(provider.storage())
            .map_err(|e| CommitError::Internal(boxed(e)))?
            .create_group_info(true)
            .build(provider.rand(), provider.crypto(), identity.signer(), |_| true)
            .map_err(|e| match e {
                openmls::prelude::CreateCommitError::LibraryError(_) => CommitError::Internal(boxed(e)),
                other => CommitError::Rejected(boxed(other)),
            })?
            .stage_commit(provider)
            .map_err(|e| CommitError::Internal(boxed(e)))?;
        let (commit, welcome, group_info) = bundle.into_contents();
        let staged = self
            .group
            .pending_commit()
            .ok_or_else(|| CommitError::Internal("staged commit missing".into()))?;
        let new_epoch = staged.epoch().as_u64();
        let tree = staged
            .export_ratchet_tree(provider.crypto(), self.group.export_ratchet_tree())
            .map_err(|e| CommitError::Internal(boxed(e)))?
            .ok_or_else(|| CommitError::Internal("staged commit has no tree".into()))?;
        let group_info =
            group_info.ok_or_else(|| CommitError::Internal("commit produced no GroupInfo".into()))?;
        Ok(CommitOutput {
            commit: encode(&commit).map_err(CommitError::Internal)?,
            welcome: welcome
                .map(|welcome| encode(&MlsMessageOut::from_welcome(welcome, ProtocolVersion::Mls10)))
                .transpose()
                .map_err(CommitError::Internal)?,
            group_info: encode(&MlsMessageOut::from(group_info)).map_err(CommitError::Internal)?,
            ratchet_tree: tree.tls_serialize_detached().map_err(|e| CommitError::Internal(boxed(e)))?,
            new_epoch,
        })
    }

    /// Whether one of our commits awaits the server's answer.
    pub fn has_pending_commit(&self) -> bool {
        self.group.pending_commit().is_some()
    }

    /// The server sequenced our pending commit: move to its epoch.
    pub fn confirm_pending_commit<P>(&mut self, provider: &P) -> Result<CommitApplied, PendingCommitError>
    where
        P: OpenMlsProvider,
        P::StorageError: Send + Sync + 'static,
    {
        let staged = self.group.pending_commit().ok_or(PendingCommitError::NoPendingCommit)?;
        let own = self.own_leaf_index();
        let committer =
            self.member(own).ok_or_else(|| PendingCommitError::Internal("own leaf missing".into()))?;
        let before = CommitBefore::of(self, staged, false);
        self.group.merge_pending_commit(provider).map_err(|e| PendingCommitError::Internal(boxed(e)))?;
        Ok(before.after(self, committer, false))
    }

    /// The server refused our pending commit (for example `WrongEpoch`):
    /// forget it. Process the commits that won, then re-apply the intent.
    pub fn discard_pending_commit<P>(&mut self, provider: &P) -> Result<(), PendingCommitError>
    where
        P: OpenMlsProvider,
        P::StorageError: Send + Sync + 'static,
    {
        if self.group.pending_commit().is_none() {
            return Err(PendingCommitError::NoPendingCommit);
        }
        self.group
            .clear_pending_commit(provider.storage())
            .map_err(|e| PendingCommitError::Internal(boxed(e)))
    }

    /// Processes a sequenced handshake message from someone else: a commit
    /// (applied at once) or a proposal (stored for the next commit).
    pub fn process_handshake<P>(
        &mut self,
        provider: &P,
        message: &[u8],
    ) -> Result<HandshakeOutcome, ProcessError>
    where
        P: OpenMlsProvider,
        P::StorageError: Send + Sync + 'static,
    {
        if !self.group.is_active() {
            return Err(ProcessError::NotAMember);
        }
        let message = MlsMessageIn::tls_deserialize_exact(message).map_err(ProcessError::Malformed)?;
        let public = match message.extract() {
            MlsMessageBodyIn::PublicMessage(public) => public,
            _ => return Err(ProcessError::NotAPublicMessage),
        };
        if public.group_id() != self.group.group_id() {
            return Err(ProcessError::WrongGroup);
        }
        let current_epoch = self.epoch();
        if public.epoch().as_u64() != current_epoch {
            return Err(ProcessError::WrongEpoch { message_epoch: public.epoch().as_u64(), current_epoch });
        }
        let is_commit = public.content_type() == ContentType::Commit;
        if is_commit && *public.sender() == Sender::Member(self.group.own_leaf_index()) {
            return Err(ProcessError::OwnCommit);
        }
        let had_pending_commit = self.group.pending_commit().is_some();
        let processed =
            self.group.process_message(provider, ProtocolMessage::from(public)).map_err(|e| match e {
                openmls::prelude::ProcessMessageError::LibraryError(_)
                | openmls::prelude::ProcessMessageError::StorageError(_) => ProcessError::Internal(boxed(e)),
                other => ProcessError::Invalid(boxed(other)),
            })?;
        let sender = processed.sender().clone();
        let credential = processed.credential().clone();
        match processed.into_content() {
            ProcessedMessageContent::ProposalMessage(queued) => {
                let proposal_sender = match queued.sender() {
                    Sender::Member(leaf) => ProposalSender::Member(leaf.u32()),
                    Sender::External(index) => ProposalSender::External(
                        external_sender_index(index).map_err(ProcessError::Internal)?,
                    ),
                    Sender::NewMemberProposal | Sender::NewMemberCommit => {
                        return Err(ProcessError::Unsupported)
                    }
                };
                super::policy::check_proposal(&self.group, queued.sender(), queued.proposal())
                    .map_err(|e| ProcessError::Invalid(boxed(e)))?;
                let removes = match queued.proposal() {
                    Proposal::Remove(remove) => Some(remove.removed().u32()),
                    _ => None,
                };
                let proposal_ref = queued.proposal_reference_ref().as_slice().to_vec();
                self.group
                    .store_pending_proposal(provider.storage(), *queued)
                    .map_err(|e| ProcessError::Internal(boxed(e)))?;
                Ok(HandshakeOutcome::ProposalStored { proposal_ref, sender: proposal_sender, removes })
            }
            ProcessedMessageContent::StagedCommitMessage(staged) => {
                let (committer_leaf, external) = match sender {
                    Sender::Member(leaf) => (Some(leaf.u32()), false),
                    Sender::NewMemberCommit => (None, true),
                    Sender::External(_) | Sender::NewMemberProposal => {
                        return Err(ProcessError::Invalid("commit from a non-member sender".into()))
                    }
                };
                let before = CommitBefore::of(self, &staged, external);
                let joiner_key =
                    staged.update_path_leaf_node().map(|leaf| leaf.signature_key().as_slice().to_vec());
                let external_joiner = if external { joiner_key.as_deref().or(Some(&[][..])) } else { None };
                let committer = committer_leaf.map(LeafNodeIndex::new);
                super::policy::check_commit(&self.group, &staged, committer, external_joiner)
                    .map_err(|e| ProcessError::Invalid(boxed(e)))?;
                self.group
                    .merge_staged_commit(provider, *staged)
                    .map_err(|e| ProcessError::Internal(boxed(e)))?;
                let committer_identity = identity_of(&credential);
                let committer_leaf = match committer_leaf {
                    Some(leaf) => leaf,
                    None => joiner_key
                        .and_then(|key| self.leaf_with_signature_key(&key))
                        .ok_or_else(|| ProcessError::Internal("external joiner not in tree".into()))?,
                };
                let committer = MemberInfo { leaf_index: committer_leaf, identity: committer_identity };
                Ok(HandshakeOutcome::CommitApplied(before.after(self, committer, had_pending_commit)))
            }
            ProcessedMessageContent::ApplicationMessage(_)
            | ProcessedMessageContent::ExternalJoinProposalMessage(_) => Err(ProcessError::Unsupported),
            // Variants OpenMLS adds under draft features (unresolved
            // app-data commits), which Kalandra does not enable.
            #[allow(unreachable_patterns)]
            _ => Err(ProcessError::Unsupported),
        }
    }

    /// The room id (the MLS group id).
    pub fn room_id(&self) -> [u8; ROOM_ID_LEN] {
        self.room_id
    }

    /// The current epoch.
    pub fn epoch(&self) -> u64 {
        self.group.epoch().as_u64()
    }

    /// The current epoch's confirmed transcript hash (RFC 9420 §8.2).
    pub fn confirmed_transcript_hash(&self) -> &[u8] {
        self.group.public_group().group_context().confirmed_transcript_hash()
    }

    /// The Ed25519 key of the group's single external sender: the server
    /// (whose key also signs the room log's heads). `None` if the group
    /// does not list exactly one sender with a 32-byte key.
    pub fn server_key(&self) -> Option<[u8; IDENTITY_LEN]> {
        use tls_codec::Serialize as _;
        let [sender] = self.group.extensions().external_senders()?.as_slice() else { return None };
        // TLS encoding: the signature key as `opaque<V>` (a one-byte length
        // for 32 bytes), then the credential.
        let encoded = sender.tls_serialize_detached().ok()?;
        let (&len, rest) = encoded.split_first()?;
        (usize::from(len) == IDENTITY_LEN).then_some(())?;
        rest.get(..IDENTITY_LEN)?.try_into().ok()
    }

    /// The current tree hash (RFC 9420 §7.8), equal for every member and the
    /// server in the same epoch.
    pub fn tree_hash(&self) -> Vec<u8> {
        self.group.public_group().group_context().tree_hash().to_vec()
    }

    /// The leaves whose removal is proposed and not yet committed.
    pub fn pending_removals(&self) -> Vec<u32> {
        self.group
            .pending_proposals()
            .filter_map(|queued| match queued.proposal() {
                Proposal::Remove(remove) => Some(remove.removed().u32()),
                _ => None,
            })
            .collect()
    }

    /// Our leaf index.
    pub fn own_leaf_index(&self) -> u32 {
        self.group.own_leaf_index().u32()
    }

    /// Whether we are still a member.
    pub fn is_active(&self) -> bool {
        self.group.is_active()
    }

    /// The members, by leaf index.
    pub fn members(&self) -> Vec<MemberInfo> {
        self.group
            .members()
            .map(|member| MemberInfo {
                leaf_index: member.index.u32(),
                identity: identity_of(&member.credential),
            })
            .collect()
    }

    /// Each member with what its leaf shows of its home, by leaf index.
    pub fn member_home_certificates(&self) -> Vec<(MemberInfo, LeafHome)> {
        self.group
            .members()
            .map(|member| {
                let leaf = self.group.public_group().leaf(member.index);
                let home = LeafHome {
                    signature_key: member.signature_key.clone(),
                    credential_is_key: leaf.is_some_and(kalandra_mls::credential_matches_key),
                    certificate: leaf.and_then(kalandra_mls::leaf_home_certificate),
                };
                let info =
                    MemberInfo { leaf_index: member.index.u32(), identity: identity_of(&member.credential) };
                (info, home)
            })
            .collect()
    }

    /// The member at `leaf_index`, if any.
    pub fn member(&self, leaf_index: u32) -> Option<MemberInfo> {
        self.group
            .member_at(LeafNodeIndex::new(leaf_index))
            .map(|member| MemberInfo { leaf_index, identity: identity_of(&member.credential) })
    }

    /// Number of proposals waiting for a commit.
    pub fn pending_proposal_count(&self) -> usize {
        self.group.pending_proposals().count()
    }

    fn leaf_with_signature_key(&self, key: &[u8]) -> Option<u32> {
        self.group.members().find(|member| member.signature_key == key).map(|member| member.index.u32())
    }

    /// MLS-Exporter(label, context, length) of the current epoch
    /// (RFC 9420 §8.5).
    pub fn export_secret<P>(
        &self,
        provider: &P,
        label: &str,
        context: &[u8],
        length: usize,
    ) -> Result<Vec<u8>, ExportError>
    where
        P: OpenMlsProvider,
    {
        self.group
            .export_secret(provider.crypto(), label, context, length)
            .map_err(|e| ExportError::Export(boxed(e)))
    }

    /// A signed GroupInfo of the current epoch (without the tree), as an
    /// `MLSMessage`.
    pub fn group_info<P>(&self, provider: &P, identity: &Identity) -> Result<Vec<u8>, ExportError>
    where
        P: OpenMlsProvider,
    {
        let message = self
            .group
            .export_group_info(provider.crypto(), identity.signer(), false)
            .map_err(|e| ExportError::Export(boxed(e)))?;
        message.tls_serialize_detached().map_err(ExportError::Encode)
    }

    /// The current ratchet tree.
    pub fn ratchet_tree(&self) -> Result<Vec<u8>, ExportError> {
        self.group.export_ratchet_tree().tls_serialize_detached().map_err(ExportError::Encode)
    }
}

/// The position of an external sender in the group's list. OpenMLS keeps
/// the accessor crate-private; the TLS encoding is the `uint32` itself.
fn external_sender_index(index: &SenderExtensionIndex) -> Result<u32, BoxError> {
    let bytes: [u8; 4] = index
        .tls_serialize_detached()
        .map_err(boxed)?
        .try_into()
        .map_err(|_| BoxError::from("sender index is not a uint32"))?;
    Ok(u32::from_be_bytes(bytes))
}

fn decode_tree(bytes: &[u8]) -> Result<RatchetTreeIn, JoinError> {
    RatchetTreeIn::tls_deserialize_exact(bytes).map_err(JoinError::MalformedRatchetTree)
}

/// What a staged commit does, read before it is merged.
struct CommitBefore {
    epoch: u64,
    external: bool,
    removed: Vec<MemberInfo>,
    added_keys: Vec<(Vec<u8>, Vec<u8>)>,
    covered_proposal_refs: Vec<Vec<u8>>,
    self_removed: bool,
}

impl CommitBefore {
    fn of(room: &RoomGroup, staged: &StagedCommit, external: bool) -> Self {
        let removed = staged
            .remove_proposals()
            .map(|remove| {
                let leaf = remove.remove_proposal().removed().u32();
                room.member(leaf).unwrap_or(MemberInfo { leaf_index: leaf, identity: Vec::new() })
            })
            .collect();
        let added_keys = staged
            .add_proposals()
            .map(|add| {
                let leaf = add.add_proposal().key_package().leaf_node();
                (leaf.signature_key().as_slice().to_vec(), identity_of(leaf.credential()))
            })
            .collect();
        let covered_proposal_refs = staged
            .queued_proposals()
            .filter(|queued| queued.proposal_or_ref_type() == ProposalOrRefType::Reference)
            .map(|queued| queued.proposal_reference_ref().as_slice().to_vec())
            .collect();
        Self {
            epoch: staged.epoch().as_u64(),
            external,
            removed,
            added_keys,
            covered_proposal_refs,
            self_removed: staged.self_removed(),
        }
    }

    fn after(self, room: &RoomGroup, committer: MemberInfo, own_commit_discarded: bool) -> CommitApplied {
        let added = if self.added_keys.is_empty() {
            Vec::new()
        } else {
            let mut added = Vec::with_capacity(self.added_keys.len());
            for member in room.group.members() {
                if let Some((_, identity)) =
                    self.added_keys.iter().find(|(key, _)| *key == member.signature_key)
                {
                    added.push(MemberInfo { leaf_index: member.index.u32(), identity: identity.clone() });
                }
            }
            added
        };
        CommitApplied {
            epoch: self.epoch,
            committer,
            external: self.external,
            added,
            removed: self.removed,
            covered_proposal_refs: self.covered_proposal_refs,
            self_removed: self.self_removed,
            own_commit_discarded,
        }
    }
}
