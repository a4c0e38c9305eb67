//! Answering the server's moderation: a kick or ban arrives as a
//! server-signed Remove proposal, and the room accepts no application
//! message until a commit covering it lands. Every online member calls
//! [`commit_for_server_proposal`] on each processed proposal; the first
//! covering commit the server sequences wins, the others get `WrongEpoch`
//! and discard theirs.

use kalandra_proto::payload::Commit;
use openmls::storage::OpenMlsProvider;

use crate::mls::{CommitError, CommitOutput, HandshakeOutcome, Identity, ProposalSender, RoomGroup};

/// What to do about a processed handshake message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerProposalResponse {
    /// Send this commit: it covers every pending proposal, the server's included.
    Commit(Box<CommitOutput>),
    /// The server (or we, leaving) proposed removing us: we cannot commit
    /// it, nor any commit covering it (nobody commits their own removal),
    /// and will be removed by another member's commit.
    WeAreRemoved,
    /// Not a server proposal: nothing to do.
    NotAServerProposal,
}

/// Given the outcome of processing a sequenced handshake frame, produces
/// the commit that covers a server-issued proposal (with every other
/// pending proposal). The commit is pending in `group` until the server
/// answers (`confirm_pending_commit` or `discard_pending_commit`).
pub fn commit_for_server_proposal<P>(
    group: &mut RoomGroup,
    provider: &P,
    identity: &Identity,
    outcome: &HandshakeOutcome,
) -> Result<ServerProposalResponse, CommitError>
where
    P: OpenMlsProvider,
    P::StorageError: Send + Sync + 'static,
{
    let HandshakeOutcome::ProposalStored { sender: ProposalSender::External(_), removes, .. } = outcome
    else {
        return Ok(ServerProposalResponse::NotAServerProposal);
    };
    // Our removal proposed by this frame or an earlier one: every commit
    // covers all pending proposals, and nobody commits their own removal.
    let own = group.own_leaf_index();
    if *removes == Some(own) || group.pending_removals().contains(&own) {
        return Ok(ServerProposalResponse::WeAreRemoved);
    }
    let output = group.commit_pending_proposals(provider, identity)?;
    Ok(ServerProposalResponse::Commit(Box::new(output)))
}

/// The `Commit` payload that carries `output` (no one is added, so no Welcome).
pub fn commit_payload(output: &CommitOutput) -> Commit {
    Commit {
        commit: output.commit.clone(),
        welcome: None,
        welcome_recipients: Vec::new(),
        group_info: Some(output.group_info.clone()),
    }
}
