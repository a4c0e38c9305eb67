//! Known bugs the harness can inject, to show that its checkers catch them.
//! Three are planted in the production room core itself (the server's
//! `injected-bugs` switches, [`kalandra_server::bugs`]); one wraps the
//! pluggable [`GroupState`]; two are switches of the simulation's shell
//! ([`crate::server::ShellBugs`]).

use bytes::Bytes;
use kalandra_proto::SenderId;
use kalandra_server::sim::ServerSigner;
use kalandra_server::sim::{
    CommitRules, CommitSummary, GroupError, GroupState, PersistentGroup, ProposalRef, RoomPolicy,
};

use crate::server::ServerGroup;

/// Which bugs to inject.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bugs {
    /// The server acknowledges (and fans out) a batch before it is durable.
    pub ack_before_durable: bool,
    /// The server accepts a second commit for an epoch (its epoch check
    /// compares against the epoch before the last commit).
    pub double_commit: bool,
    /// The server loses the last frame of each room when it restarts.
    pub drop_frame_on_restart: bool,
    /// In the shard: one entry past each durable batch is released too.
    pub release_one_past_durable: bool,
    /// In the sequencer: timestamps follow the clock back after a restart.
    pub stamp_without_clock_floor: bool,
    /// In the shard: a resubscription panics the task that handles it.
    pub panic_on_resubscribe: bool,
}

impl Bugs {
    /// Whether any bug is injected.
    pub fn any(&self) -> bool {
        self.ack_before_durable
            || self.double_commit
            || self.drop_frame_on_restart
            || self.release_one_past_durable
            || self.stamp_without_clock_floor
            || self.panic_on_resubscribe
    }
}

/// A group state whose epoch check goes stale after a commit: until the
/// next commit is submitted it reports the epoch before the last commit, and
/// it accepts that next commit (made for the stale epoch) without applying
/// it. The sequencer therefore sequences two commits for one epoch.
/// Armed only after `armed_after` commits, so the room can be set up.
pub struct StaleEpochGroup<G> {
    inner: G,
    stale: bool,
    commits_seen: u64,
}

/// Commits a [`StaleEpochGroup`] lets through correctly before the bug shows.
pub const STALE_EPOCH_ARMED_AFTER_COMMITS: u64 = 1;

impl<G: GroupState> GroupState for StaleEpochGroup<G> {
    fn epoch(&self) -> u64 {
        if self.stale {
            self.inner.epoch().saturating_sub(1)
        } else {
            self.inner.epoch()
        }
    }
    fn is_member(&self, sender: SenderId) -> bool {
        self.inner.is_member(sender)
    }
    fn members(&self) -> Vec<SenderId> {
        self.inner.members()
    }
    fn apply_commit(&mut self, commit: &[u8], rules: &CommitRules<'_>) -> Result<CommitSummary, GroupError> {
        if self.stale {
            self.stale = false;
            let ratchet_tree = Bytes::new();
            return Ok(CommitSummary {
                epoch: self.inner.epoch(),
                added: Vec::new(),
                removed: Vec::new(),
                ratchet_tree,
            });
        }
        let summary = self.inner.apply_commit(commit, rules)?;
        self.commits_seen += 1;
        if self.commits_seen > STALE_EPOCH_ARMED_AFTER_COMMITS {
            self.stale = true;
        }
        Ok(summary)
    }
    fn apply_proposal(
        &mut self,
        proposal: &[u8],
        policy: Option<&RoomPolicy>,
    ) -> Result<ProposalRef, GroupError> {
        self.inner.apply_proposal(proposal, policy)
    }
    fn group_info_valid(&self, group_info: &[u8], signer: SenderId) -> bool {
        self.inner.group_info_valid(group_info, signer)
    }
    fn only_external_sender_is(&self, server_key: &[u8; 32]) -> bool {
        self.inner.only_external_sender_is(server_key)
    }
    fn ratchet_tree(&self) -> Bytes {
        self.inner.ratchet_tree()
    }
}

impl<G: PersistentGroup> PersistentGroup for StaleEpochGroup<G> {
    fn from_create_room(group_info: &[u8], ratchet_tree: &[u8]) -> Result<Self, GroupError> {
        Ok(StaleEpochGroup {
            inner: G::from_create_room(group_info, ratchet_tree)?,
            stale: false,
            commits_seen: 0,
        })
    }
    fn snapshot(&self) -> Result<Bytes, GroupError> {
        self.inner.snapshot()
    }
    fn restore(snapshot: &[u8]) -> Result<Self, GroupError> {
        Ok(StaleEpochGroup { inner: G::restore(snapshot)?, stale: false, commits_seen: 0 })
    }
    fn remove_proposal(&self, member: SenderId, signer: &ServerSigner) -> Result<Vec<u8>, GroupError> {
        self.inner.remove_proposal(member, signer)
    }
    fn pending_server_removals(&self) -> Result<Vec<SenderId>, GroupError> {
        self.inner.pending_server_removals()
    }
}

impl<G: ServerGroup> ServerGroup for StaleEpochGroup<G> {
    fn tree_hash(&self) -> Vec<u8> {
        self.inner.tree_hash()
    }
}

/// The switches to plant in the production room core for `bugs`.
pub fn planted(bugs: &Bugs) -> kalandra_server::bugs::InjectedBugs {
    kalandra_server::bugs::InjectedBugs {
        release_one_past_durable: bugs.release_one_past_durable,
        stamp_without_clock_floor: bugs.stamp_without_clock_floor,
        panic_on_resubscribe: bugs.panic_on_resubscribe,
    }
}
