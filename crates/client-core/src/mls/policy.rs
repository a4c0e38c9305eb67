//! The room-policy checks a member applies to a sequenced handshake before
//! merging it, the same the server applies before sequencing it (see
//! `docs/SECURITY.md`): a member does not rely on the server alone.
//!
//! Checked here, with no knowledge beyond the group: every leaf a commit or
//! proposal introduces carries a BasicCredential whose identity is its
//! Ed25519 signature key; an Update proposal or a commit's update path
//! keeps the member's signature key and credential (its identity); an
//! external commit removes at most the joiner's own earlier leaf; no
//! proposal type Kalandra rooms refuse (`GroupContextExtensions`,
//! `PreSharedKey`, `ReInit`, custom types).

use kalandra_mls::{credential_matches_key, proposal_type_allowed};
use openmls::group::{MlsGroup, StagedCommit};
use openmls::prelude::{LeafNode, LeafNodeIndex, Proposal, Sender};

/// Why a member refuses a sequenced commit or proposal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyViolation {
    /// A leaf's credential identity is not its signature key.
    #[error("a leaf's credential identity is not its signature key")]
    CredentialMismatch,
    /// An external commit removes a leaf that is not the joiner's own.
    #[error("an external commit removes another member's leaf")]
    JoinerRemovesOther,
    /// An Update proposal or an update path gives a member's leaf another
    /// signature key or credential: another identity.
    #[error("an update changes a member's signature key or credential")]
    IdentityChange,
    /// A proposal type Kalandra rooms do not allow.
    #[error("proposal type not allowed in Kalandra rooms")]
    ProposalType,
}

/// Whether `new` keeps the identity of the member at `leaf` in `group`: the
/// same signature key and credential.
fn keeps_identity(group: &MlsGroup, leaf: LeafNodeIndex, new: &LeafNode) -> bool {
    group.member_at(leaf).is_some_and(|old| {
        old.signature_key.as_slice() == new.signature_key().as_slice() && &old.credential == new.credential()
    })
}

/// The checks on one proposal's content, sent by `sender` in `group`.
pub(crate) fn check_proposal(
    group: &MlsGroup,
    sender: &Sender,
    proposal: &Proposal,
) -> Result<(), PolicyViolation> {
    match proposal {
        Proposal::Add(add) if !credential_matches_key(add.key_package().leaf_node()) => {
            Err(PolicyViolation::CredentialMismatch)
        }
        Proposal::Update(update) if !credential_matches_key(update.leaf_node()) => {
            Err(PolicyViolation::CredentialMismatch)
        }
        Proposal::Update(update) => match sender {
            Sender::Member(leaf) if keeps_identity(group, *leaf, update.leaf_node()) => Ok(()),
            _ => Err(PolicyViolation::IdentityChange),
        },
        _ if proposal_type_allowed(proposal.proposal_type()) => Ok(()),
        _ => Err(PolicyViolation::ProposalType),
    }
}

/// The checks on a staged commit, before it is merged into `group`;
/// `committer` is the committing member's leaf (`None` for an external
/// commit) and `joiner_key` the signature key of an external commit's
/// joiner.
pub(crate) fn check_commit(
    group: &MlsGroup,
    staged: &StagedCommit,
    committer: Option<LeafNodeIndex>,
    joiner_key: Option<&[u8]>,
) -> Result<(), PolicyViolation> {
    if let Some(leaf) = staged.update_path_leaf_node() {
        if !credential_matches_key(leaf) {
            return Err(PolicyViolation::CredentialMismatch);
        }
        if committer.is_some_and(|committer| !keeps_identity(group, committer, leaf)) {
            return Err(PolicyViolation::IdentityChange);
        }
    }
    for queued in staged.queued_proposals() {
        check_proposal(group, queued.sender(), queued.proposal())?;
    }
    if let Some(joiner_key) = joiner_key {
        for remove in staged.remove_proposals() {
            let removed = group.member_at(remove.remove_proposal().removed());
            // The credential identity is the signature key, so comparing keys
            // compares identities.
            if removed.is_none_or(|member| member.signature_key.as_slice() != joiner_key) {
                return Err(PolicyViolation::JoinerRemovesOther);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use openmls::prelude::{BasicCredential, CredentialWithKey, KeyPackage};

    use super::*;
    use crate::mls::{leaf_capabilities, Identity, MlsProvider, CIPHERSUITE};

    /// Whether the leaf of a key package built with `credential_with_key` passes.
    fn leaf_passes(
        provider: &MlsProvider,
        identity: &Identity,
        credential_with_key: CredentialWithKey,
    ) -> bool {
        let bundle = KeyPackage::builder()
            .leaf_node_capabilities(leaf_capabilities())
            .build(CIPHERSUITE, provider, identity.signer(), credential_with_key)
            .unwrap();
        credential_matches_key(bundle.key_package().leaf_node())
    }

    #[test]
    fn adds_whose_identity_is_not_their_key_and_foreign_proposal_types_are_refused() {
        let provider = MlsProvider::from_seed([9; 32]);
        let identity = Identity::generate(&provider).unwrap();
        assert!(leaf_passes(&provider, &identity, identity.credential_with_key()));
        let impostor = CredentialWithKey {
            credential: BasicCredential::new(vec![1; 32]).into(),
            signature_key: identity.credential_with_key().signature_key,
        };
        assert!(!leaf_passes(&provider, &identity, impostor), "identity is not the signature key");
        let server_key = ed25519_dalek::SigningKey::from_bytes(&[8; 32]).verifying_key().to_bytes();
        let (group, _) =
            crate::mls::RoomGroup::create(&provider, &identity, [3; 16], &server_key, 1_000).unwrap();
        let sender = Sender::Member(LeafNodeIndex::new(0));
        assert_eq!(
            check_proposal(&group.group, &sender, &Proposal::SelfRemove),
            Err(PolicyViolation::ProposalType)
        );
    }
}
