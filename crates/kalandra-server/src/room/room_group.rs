//! The sequencer's view of a room's MLS state, backed by OpenMLS's
//! `PublicGroup` ([`RoomGroupState`]).
//!
//! Adds what the sequencer needs on top: members by sender id, the binding
//! of a commit's committer to the authenticated connection, and the
//! server-proposal coverage check before anything is merged.

use std::collections::HashMap;

use bytes::Bytes;
use kalandra_mls::sender_of;
use kalandra_proto::SenderId;

use crate::room::mls_state::{
    Checkpoint, MemberRef, MlsValidationError, ProposalKind, ProposalSender, ProposalSummary, RoomGroupState,
    ServerSigner, StagedRoomCommit,
};
use crate::room::sequencer::{
    check_group_info_fits, CommitRules, CommitSummary, GroupError, GroupState, PersistentGroup, PolicyError,
    ProposalRef, Proposer, RoomPolicy, WELCOME_PAYLOAD_BYTES_MAX,
};

/// A room's public MLS state with a sender-id index.
pub struct MlsRoomGroup {
    state: RoomGroupState,
    /// Leaves per sender id (a sender id may, in principle, hold several leaves).
    members: HashMap<SenderId, u32>,
    /// The state before the latest commit, until it settles (a void goes back to it).
    before_latest_commit: Option<Checkpoint>,
    /// The members whose removal the server proposed and no commit covered,
    /// as last worked out (reading them decodes every pending proposal, and
    /// the shard asks for each frame while a removal waits); emptied by
    /// every change of the state.
    removals_pending: std::sync::OnceLock<Vec<SenderId>>,
}

fn group_error(error: MlsValidationError) -> GroupError {
    match error {
        MlsValidationError::WrongEpoch { message_epoch, current_epoch } => {
            GroupError::WrongEpoch { message_epoch, group_epoch: current_epoch }
        }
        MlsValidationError::UncoveredServerProposals { missing } => {
            GroupError::UncoveredProposals { missing: missing.len() }
        }
        MlsValidationError::DuplicateProposal => GroupError::AlreadyPending,
        MlsValidationError::TooManyProposals { pending, max_pending } => {
            GroupError::TooManyProposals { pending, max_pending }
        }
        MlsValidationError::ProposalBytes { pending_bytes, max_bytes } => {
            GroupError::ProposalBytes { pending_bytes, max_bytes }
        }
        MlsValidationError::Internal(error) => GroupError::Internal(error.to_string()),
        MlsValidationError::Forbidden(reason) => GroupError::Invalid(format!("forbidden: {reason}")),
        other => GroupError::Invalid(describe(&other)),
    }
}

/// The error with its sources, for the peer's error message.
fn describe(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    let mut depth = 0;
    while let Some(cause) = source {
        depth += 1;
        if depth > 4 {
            break;
        }
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The sender id of the member at `leaf`.
fn sender_at(state: &RoomGroupState, leaf: u32) -> Result<SenderId, MlsValidationError> {
    state.member_at(leaf).and_then(|m| sender_of(&m.identity)).ok_or(MlsValidationError::UnknownSender)
}

/// The room's policy on one proposal by `proposer`.
fn check_proposal(
    state: &RoomGroupState,
    policy: &RoomPolicy,
    proposer: Proposer,
    kind: &ProposalKind,
) -> Result<(), PolicyError> {
    match kind {
        ProposalKind::Add { .. } => policy.may_add(proposer),
        ProposalKind::Remove { leaf_index } => {
            let target = state.member_at(*leaf_index).and_then(|m| sender_of(&m.identity));
            match target {
                Some(target) => policy.may_remove(proposer, target),
                // MLS refuses removing an empty leaf; nothing to decide here.
                None => Ok(()),
            }
        }
        ProposalKind::Update { keeps_identity: true } => Ok(()),
        ProposalKind::Update { keeps_identity: false } => Err(PolicyError::IdentityChange),
        ProposalKind::ExternalInit => match proposer {
            Proposer::Joiner(_) => Ok(()),
            _ => Err(PolicyError::ProposalType("ExternalInit outside an external commit")),
        },
        ProposalKind::GroupContextExtensions => Err(PolicyError::ProposalType("GroupContextExtensions")),
        ProposalKind::Other(_) => Err(PolicyError::ProposalType("other than Add, Remove, Update")),
    }
}

impl MlsRoomGroup {
    /// Everything decided before the merge: committer, bans, policy on
    /// every proposal, coverage of server proposals, Welcome recipients.
    fn check_staged(&self, staged: &StagedRoomCommit, rules: &CommitRules<'_>) -> Result<(), GroupError> {
        let signer = match staged.committer() {
            Some(member) => sender_of(&member.identity),
            None => sender_of(staged.joiner_identity()),
        };
        if signer != Some(rules.committer) {
            return Err(GroupError::CommitterMismatch);
        }
        let committer = rules.committer;
        if rules.policy.is_some() && !staged.path_keeps_identity() {
            return Err(GroupError::Forbidden(PolicyError::IdentityChange));
        }
        if staged.is_external() && (rules.barred)(committer) {
            return Err(GroupError::Banned { member: committer });
        }
        let added: Vec<Option<SenderId>> = staged.added_identities().map(sender_of).collect();
        if let Some(member) = added.iter().flatten().copied().find(|member| (rules.barred)(*member)) {
            return Err(GroupError::Banned { member });
        }
        for (sender, kind) in staged.proposals().iter().filter(|_| rules.policy.is_some()) {
            let proposer = match sender {
                ProposalSender::External(_) => Proposer::Server,
                ProposalSender::NewMember => Proposer::Joiner(committer),
                ProposalSender::Member(leaf) => {
                    Proposer::Member(sender_at(&self.state, *leaf).map_err(group_error)?)
                }
            };
            if let Some(policy) = rules.policy {
                check_proposal(&self.state, policy, proposer, kind)?;
            }
        }
        let required: Vec<&[u8]> = rules.must_cover.iter().map(|r| r.0.as_slice()).collect();
        let missing = self.state.uncovered_server_proposals(staged, &required).map_err(group_error)?;
        if !missing.is_empty() {
            return Err(GroupError::UncoveredProposals { missing: missing.len() });
        }
        if let Some((_, recipients)) = rules.welcome {
            let mut expected: Vec<SenderId> = added.iter().flatten().copied().collect();
            let mut named = recipients.to_vec();
            expected.sort_by_key(|s| s.0);
            named.sort_by_key(|s| s.0);
            let unique = named.windows(2).all(|pair| pair[0] != pair[1]);
            if expected.is_empty() || !unique || named != expected || expected.len() != added.len() {
                return Err(GroupError::WelcomeRecipients { added: added.len() });
            }
        }
        Ok(())
    }

    /// Everything decided on the merged state: the GroupInfo (the new
    /// epoch's, signed by the committer, servable with the new tree) and
    /// the Welcome's size with the tree. Returns the new ratchet tree when
    /// the commit carries a Welcome.
    fn check_merged(
        &self,
        summary: &crate::room::mls_state::CommitSummary,
        rules: &CommitRules<'_>,
    ) -> Result<Bytes, GroupError> {
        let tree = match (rules.group_info, rules.welcome) {
            (None, None) => Bytes::new(),
            _ => Bytes::from(self.state.ratchet_tree().map_err(|e| GroupError::Internal(e.to_string()))?),
        };
        if let Some(group_info) = rules.group_info {
            let signer = self
                .state
                .validate_group_info(group_info)
                .map_err(|e| GroupError::InvalidGroupInfo(describe(&e)))?;
            if signer != summary.committer.leaf_index {
                return Err(GroupError::InvalidGroupInfo("GroupInfo is not signed by the committer".into()));
            }
            check_group_info_fits(summary.epoch, group_info.len(), tree.len())?;
        }
        if let Some((welcome_bytes, _)) = rules.welcome {
            let bytes = kalandra_proto::payload::Welcome::encoded_len(welcome_bytes, tree.len());
            if bytes > WELCOME_PAYLOAD_BYTES_MAX {
                return Err(GroupError::WelcomeTooLarge { bytes, max_bytes: WELCOME_PAYLOAD_BYTES_MAX });
            }
        }
        // A member that cannot process a commit rejoins from the GroupInfo
        // of the epoch it creates, so every live commit publishes one
        // (`docs/RECOVERY.md`); stored commits are replayed without one.
        if rules.group_info.is_none() && rules.policy.is_some() {
            return Err(GroupError::InvalidGroupInfo(
                "a commit must publish the GroupInfo of the epoch it creates".into(),
            ));
        }
        Ok(if rules.welcome.is_some() { tree } else { Bytes::new() })
    }

    fn from_state(state: RoomGroupState) -> MlsRoomGroup {
        let mut group = MlsRoomGroup {
            state,
            members: HashMap::new(),
            before_latest_commit: None,
            removals_pending: std::sync::OnceLock::new(),
        };
        group.reindex();
        group
    }

    fn reindex(&mut self) {
        self.members.clear();
        for member in self.state.members() {
            if let Some(sender) = sender_of(&member.identity) {
                *self.members.entry(sender).or_insert(0) += 1;
            }
        }
    }

    fn add_member(&mut self, member: &MemberRef) {
        if let Some(sender) = sender_of(&member.identity) {
            *self.members.entry(sender).or_insert(0) += 1;
        }
    }

    fn remove_member(&mut self, member: &MemberRef) {
        if let Some(sender) = sender_of(&member.identity) {
            if let Some(count) = self.members.get_mut(&sender) {
                *count -= 1;
                if *count == 0 {
                    self.members.remove(&sender);
                }
            }
        }
    }

    /// The underlying OpenMLS public state.
    pub fn state(&self) -> &RoomGroupState {
        &self.state
    }
}

impl GroupState for MlsRoomGroup {
    fn epoch(&self) -> u64 {
        self.state.epoch()
    }

    fn is_member(&self, sender: SenderId) -> bool {
        self.members.contains_key(&sender)
    }

    fn confirmed_transcript_hash(&self) -> Option<&[u8]> {
        Some(self.state.confirmed_transcript_hash())
    }

    fn server_removal_pending(&self, member: SenderId) -> bool {
        // A state that cannot list them answers yes.
        PersistentGroup::pending_server_removals(self).map_or(true, |removals| removals.contains(&member))
    }

    fn members(&self) -> Vec<SenderId> {
        self.members.keys().copied().collect()
    }

    fn apply_commit(&mut self, commit: &[u8], rules: &CommitRules<'_>) -> Result<CommitSummary, GroupError> {
        self.removals_pending = std::sync::OnceLock::new();
        let staged = self.state.stage_commit(commit).map_err(group_error)?;
        self.check_staged(&staged, rules)?;
        // Checks on the merged state (the Welcome's size with the new tree,
        // the new GroupInfo) undo the merge when they fail; a merged commit
        // keeps the checkpoint until it settles, so that a void can undo it.
        let checkpoint = self.state.checkpoint().map_err(|e| GroupError::Internal(e.to_string()))?;
        let summary = self.state.merge_staged_commit(staged).map_err(group_error)?;
        let ratchet_tree = match self.check_merged(&summary, rules) {
            Ok(tree) => tree,
            Err(error) => {
                self.state.rollback(checkpoint).map_err(|e| GroupError::Internal(describe(&e)))?;
                return Err(error);
            }
        };
        self.before_latest_commit = Some(checkpoint);
        // Added: who was not a member before. A member replacing its own
        // earlier leaf (an external rejoin) is neither added nor removed:
        // it was a member of the epoch the commit left and still is.
        let mut added: Vec<SenderId> = summary.added.iter().filter_map(|m| sender_of(&m.identity)).collect();
        if summary.external {
            added.extend(sender_of(&summary.committer.identity));
        }
        added.retain(|sender| !self.members.contains_key(sender));
        for member in &summary.removed {
            self.remove_member(member);
        }
        for member in &summary.added {
            self.add_member(member);
        }
        if summary.external {
            self.add_member(&summary.committer);
        }
        // Updates cannot change a leaf's identity (the policy refuses it), so
        // the index stays exact; a full rebuild covers commits replayed from
        // logs written before that rule, and the rare multi-leaf case.
        if !summary.identities_kept || self.members.values().any(|count| *count > 1) {
            self.reindex();
        }

        let removed = summary
            .removed
            .iter()
            .filter_map(|m| sender_of(&m.identity))
            .filter(|sender| !self.members.contains_key(sender))
            .collect();
        Ok(CommitSummary { epoch: summary.epoch, added, removed, ratchet_tree })
    }

    fn apply_proposal(
        &mut self,
        proposal: &[u8],
        policy: Option<&RoomPolicy>,
    ) -> Result<ProposalRef, GroupError> {
        self.removals_pending = std::sync::OnceLock::new();
        let refused = std::cell::Cell::new(None);
        let check = |state: &RoomGroupState, summary: &ProposalSummary| {
            let Some(policy) = policy else { return Ok(()) };
            let proposer = match summary.sender {
                ProposalSender::External(_) => Proposer::Server,
                ProposalSender::Member(leaf) => Proposer::Member(sender_at(state, leaf)?),
                ProposalSender::NewMember => return Err(MlsValidationError::UnknownSender),
            };
            check_proposal(state, policy, proposer, &summary.kind).map_err(|error| {
                let reason = error.to_string();
                refused.set(Some(error));
                MlsValidationError::Forbidden(reason)
            })
        };
        let result = self.state.add_proposal_checked(proposal, &check);
        if let Some(error) = refused.take() {
            return Err(GroupError::Forbidden(error));
        }
        Ok(ProposalRef(result.map_err(group_error)?.proposal_ref))
    }

    fn group_info_valid(&self, group_info: &[u8], signer: SenderId) -> bool {
        self.state
            .validate_group_info(group_info)
            .is_ok_and(|leaf| self.state.member_at(leaf).and_then(|m| sender_of(&m.identity)) == Some(signer))
    }

    fn only_external_sender_is(&self, server_key: &[u8; 32]) -> bool {
        self.state.external_sender_count() == 1 && self.state.external_sender_index(server_key) == Some(0)
    }

    fn authority_key(&self) -> Option<[u8; 32]> {
        (self.state.external_sender_count() == 1).then(|| self.state.first_external_sender_key()).flatten()
    }

    fn ratchet_tree(&self) -> Bytes {
        self.state.ratchet_tree().map(Bytes::from).unwrap_or_default()
    }

    fn undo_latest_commit(&mut self) -> Result<(), GroupError> {
        let checkpoint = self
            .before_latest_commit
            .take()
            .ok_or_else(|| GroupError::Internal("no commit to undo: the latest one settled".into()))?;
        self.removals_pending = std::sync::OnceLock::new();
        self.state.rollback(checkpoint).map_err(|e| GroupError::Internal(describe(&e)))?;
        self.reindex();
        Ok(())
    }

    fn settle_latest_commit(&mut self) {
        self.before_latest_commit = None;
    }
}

impl PersistentGroup for MlsRoomGroup {
    fn from_create_room(group_info: &[u8], ratchet_tree: &[u8]) -> Result<Self, GroupError> {
        RoomGroupState::from_group_info(group_info, ratchet_tree)
            .map(MlsRoomGroup::from_state)
            .map_err(|error| GroupError::Invalid(describe(&error)))
    }

    fn snapshot(&self) -> Result<Bytes, GroupError> {
        self.state.snapshot().map(Bytes::from).map_err(|error| GroupError::Internal(error.to_string()))
    }

    fn restore(snapshot: &[u8]) -> Result<Self, GroupError> {
        RoomGroupState::restore(snapshot)
            .map(MlsRoomGroup::from_state)
            .map_err(|error| GroupError::Internal(describe(&error)))
    }

    fn pending_server_removals(&self) -> Result<Vec<SenderId>, GroupError> {
        if let Some(removals) = self.removals_pending.get() {
            return Ok(removals.clone());
        }
        let removals: Vec<SenderId> = self
            .state
            .pending_server_removals()
            .map(|members| members.iter().filter_map(|m| sender_of(&m.identity)).collect())
            .map_err(group_error)?;
        Ok(self.removals_pending.get_or_init(|| removals).clone())
    }

    fn remove_proposal(&self, member: SenderId, signer: &ServerSigner) -> Result<Vec<u8>, GroupError> {
        let leaf_index = self
            .state
            .members()
            .into_iter()
            .find(|m| sender_of(&m.identity) == Some(member))
            .map(|m| m.leaf_index)
            .ok_or_else(|| GroupError::Invalid(format!("{member} is not a member")))?;
        self.state.remove_proposal_message(signer, leaf_index).map_err(|error| match error {
            crate::room::mls_state::IssueProposalError::Internal(_) => GroupError::Internal(describe(&error)),
            other => GroupError::Invalid(describe(&other)),
        })
    }
}

#[cfg(test)]
mod tests {
    use client_core::mls::RoomGroup;

    use super::*;
    use crate::room::mls_state::tests::{room_of_three, server_signer, Client};

    #[test]
    fn pending_removals_follow_every_change_of_the_state() {
        let (state, _alice, mut bob, carol) = room_of_three();
        let mut server = MlsRoomGroup::from_state(state);
        let (bob_sender, carol_sender) = (sender_of(&bob.id()).unwrap(), sender_of(&carol.id()).unwrap());
        assert_eq!(server.pending_server_removals(), Ok(vec![]));
        let kick = server.remove_proposal(carol_sender, &server_signer()).unwrap();
        let kick_ref = server.apply_proposal(&kick, None).unwrap();
        for _ in 0..2 {
            assert_eq!(server.pending_server_removals(), Ok(vec![carol_sender]), "worked out, then kept");
        }
        bob.process(&kick);
        let commit = bob.commit_with(|g, p, i| g.commit_pending_proposals(p, i));
        let must_cover = [kick_ref];
        server.apply_commit(&commit.commit, &CommitRules::replay(bob_sender, &must_cover)).unwrap();
        assert_eq!(server.pending_server_removals(), Ok(vec![]), "the commit covered it");
        server.undo_latest_commit().unwrap();
        assert_eq!(server.pending_server_removals(), Ok(vec![carol_sender]), "a void brings it back");
    }

    #[test]
    fn a_member_rejoining_by_external_commit_is_neither_added_nor_removed() {
        let (state, alice, mut bob, _carol) = room_of_three();
        let mut server = MlsRoomGroup::from_state(state);
        let bob_sender = sender_of(&bob.id()).unwrap();
        let group_info = alice.room().group_info(&alice.provider, &alice.identity).unwrap();
        let tree = server.ratchet_tree();
        let fresh = Client::new(2);
        let (group, output) =
            RoomGroup::join_by_external_commit(&fresh.provider, &fresh.identity, &group_info, Some(&tree))
                .unwrap();
        let summary = server.apply_commit(&output.commit, &CommitRules::replay(bob_sender, &[])).unwrap();
        assert_eq!((summary.added, summary.removed), (vec![], vec![]), "a rejoin");
        assert!(server.is_member(bob_sender));
        bob.group = Some(group);

        // A newcomer is added.
        let dave = Client::new(4);
        let group_info = bob.room().group_info(&bob.provider, &bob.identity).unwrap();
        let tree = server.ratchet_tree();
        let (_, output) =
            RoomGroup::join_by_external_commit(&dave.provider, &dave.identity, &group_info, Some(&tree))
                .unwrap();
        let dave_sender = sender_of(&dave.id()).unwrap();
        let summary = server.apply_commit(&output.commit, &CommitRules::replay(dave_sender, &[])).unwrap();
        assert_eq!(summary.added, vec![dave_sender]);
    }
}
