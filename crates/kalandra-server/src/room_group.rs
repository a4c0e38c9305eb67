//! The sequencer's view of a room's MLS state, backed by OpenMLS's
//! `PublicGroup` ([`RoomGroupState`]).
//!
//! Adds what the sequencer needs on top: members by sender id, the binding
//! of a commit's committer to the authenticated connection, and the
//! server-proposal coverage check before anything is merged.

use std::collections::HashMap;

use bytes::Bytes;
use kalandra_proto::SenderId;

use crate::mls_state::{MemberRef, MlsValidationError, RoomGroupState, ServerSigner};
use crate::sequencer::{CommitSummary, GroupError, GroupState, PersistentGroup, ProposalRef};

/// A room's public MLS state with a sender-id index.
pub struct MlsRoomGroup {
    state: RoomGroupState,
    /// Leaves per sender id (a sender id may, in principle, hold several leaves).
    members: HashMap<SenderId, u32>,
}

fn sender_of(identity: &[u8]) -> Option<SenderId> {
    let key: &[u8; 32] = identity.try_into().ok()?;
    Some(SenderId::from_identity_key(key))
}

fn group_error(error: MlsValidationError) -> GroupError {
    match error {
        MlsValidationError::WrongEpoch { message_epoch, current_epoch } => {
            GroupError::WrongEpoch { message_epoch, group_epoch: current_epoch }
        }
        MlsValidationError::UncoveredServerProposals { missing } => {
            GroupError::UncoveredProposals { missing: missing.len() }
        }
        MlsValidationError::Internal(error) => GroupError::Internal(error.to_string()),
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

impl MlsRoomGroup {
    fn from_state(state: RoomGroupState) -> MlsRoomGroup {
        let mut group = MlsRoomGroup { state, members: HashMap::new() };
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

    fn members(&self) -> Vec<SenderId> {
        self.members.keys().copied().collect()
    }

    fn apply_commit(
        &mut self,
        commit: &[u8],
        committer: SenderId,
        must_cover: &[ProposalRef],
        barred: &dyn Fn(SenderId) -> bool,
    ) -> Result<CommitSummary, GroupError> {
        let staged = self.state.stage_commit(commit).map_err(group_error)?;
        let signer = match staged.committer() {
            Some(member) => sender_of(&member.identity),
            None => sender_of(staged.joiner_identity()),
        };
        if signer != Some(committer) {
            return Err(GroupError::CommitterMismatch);
        }
        if staged.is_external() && barred(committer) {
            return Err(GroupError::Banned { member: committer });
        }
        if let Some(member) = staged.added_identities().filter_map(sender_of).find(|member| barred(*member)) {
            return Err(GroupError::Banned { member });
        }
        let required: Vec<&[u8]> = must_cover.iter().map(|r| r.0.as_slice()).collect();
        if !staged.covers_all(&required) {
            let missing =
                required.iter().filter(|r| !staged.covered_proposal_refs().iter().any(|c| c == *r)).count();
            return Err(GroupError::UncoveredProposals { missing });
        }
        let summary = self.state.merge_staged_commit(staged).map_err(group_error)?;
        for member in &summary.removed {
            self.remove_member(member);
        }
        for member in &summary.added {
            self.add_member(member);
        }
        if summary.external {
            self.add_member(&summary.committer);
        }
        // Updates can change a leaf's identity only to the same key (the
        // credential is the signature key), so the index stays exact; a
        // full rebuild guards the rare multi-leaf case.
        if self.members.values().any(|count| *count > 1) {
            self.reindex();
        }
        let mut added: Vec<SenderId> = summary.added.iter().filter_map(|m| sender_of(&m.identity)).collect();
        if summary.external {
            added.extend(sender_of(&summary.committer.identity));
        }
        let removed = summary
            .removed
            .iter()
            .filter_map(|m| sender_of(&m.identity))
            .filter(|sender| !self.members.contains_key(sender))
            .collect();
        Ok(CommitSummary { epoch: summary.epoch, added, removed })
    }

    fn apply_proposal(&mut self, proposal: &[u8]) -> Result<ProposalRef, GroupError> {
        let summary = self.state.add_proposal(proposal).map_err(group_error)?;
        Ok(ProposalRef(summary.proposal_ref))
    }

    fn ratchet_tree(&self) -> Bytes {
        self.state.ratchet_tree().map(Bytes::from).unwrap_or_default()
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
        self.state
            .pending_server_removals()
            .map(|members| members.iter().filter_map(|m| sender_of(&m.identity)).collect())
            .map_err(group_error)
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
            crate::mls_state::IssueProposalError::Internal(_) => GroupError::Internal(describe(&error)),
            other => GroupError::Invalid(describe(&other)),
        })
    }
}
