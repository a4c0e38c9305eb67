//! Voiding a sequenced commit that members cannot process (`docs/RECOVERY.md`).
//!
//! The server validates a commit with the group's public state only: the
//! membership tag, the confirmation tag and the encrypted path secrets need
//! epoch secrets it does not have. A commit that is wrong in one of those
//! ways is sequenced and then refused by the members. They report it
//! (`CommitReport`); while the commit is the room's latest and its report
//! window is open, the room's admin, or a strict majority of the members
//! of the epoch it left that it does not remove (its committer counted in
//! the majority's base but never as a reporter), voids it: the sequencer
//! sequences a `CommitVoided` and goes back to the state before the commit.
//!
//! To do that it keeps, for the latest commit only and only until it
//! settles, what the commit changed: the group's state before it (kept by
//! the [`GroupState`]), and the sequencer's own epoch state (where the epoch
//! began, its GroupInfo, the server proposals it had pending).

use std::collections::HashSet;

use bytes::Bytes;
use kalandra_proto::limits::COMMIT_VOID_REPORTERS_MAX;
pub use kalandra_proto::limits::COMMIT_VOID_WINDOW_MS;
use kalandra_proto::payload::{CommitReport, CommitVoided};
use kalandra_proto::{ErrorCode, Frame, Opcode, SenderId};

use super::{
    check_sender, CommitFollowUp, CommitSummary, GroupError, GroupState, InFlight, ProposalRef, ReplayError,
    RoomSequencer, Sequenced, IN_FLIGHT_FRAMES_PER_ROOM_MAX, SERVER_SENDER_ID,
};

/// The sequencer's epoch state before a commit: what a void restores.
#[derive(Debug, Clone, Default)]
pub(super) struct EpochRestore {
    epoch_started_at_log_index: u64,
    group_info: Option<(u64, Bytes)>,
    server_proposals_pending: Vec<ProposalRef>,
    server_proposals_since: Option<(u64, u64)>,
    reannounce_at_ms: u64,
}

/// The room's latest commit while it can be voided.
#[derive(Debug)]
struct UnsettledCommit {
    log_index: u64,
    /// The epoch the commit left (its header's epoch).
    epoch: u64,
    committer: SenderId,
    /// Its server timestamp.
    at_ms: u64,
    /// Members of the epoch it left that it does not remove, without the committer.
    voters: HashSet<SenderId>,
    /// Members of the epoch it left that it does not remove, committer included.
    electorate: usize,
    /// Members it added (its joiner included): no longer members after a void.
    added: Vec<SenderId>,
    /// Members it removed: members again after a void.
    removed: Vec<SenderId>,
    /// Reports counted, in the order they came.
    reports: Vec<SenderId>,
    /// Whether the admin reported it.
    admin_reported: bool,
    restore: EpochRestore,
}

impl UnsettledCommit {
    fn window_open(&self, now_ms: u64) -> bool {
        now_ms < self.at_ms.saturating_add(COMMIT_VOID_WINDOW_MS)
    }

    fn quorum(&self) -> bool {
        self.admin_reported || self.reports.len() * 2 > self.electorate
    }
}

/// What the sequencer keeps to void its room's latest commit.
#[derive(Debug, Default)]
pub(super) struct VoidState {
    /// Captured just before a commit changes the sequencer's epoch state.
    before_commit: Option<EpochRestore>,
    unsettled: Option<Box<UnsettledCommit>>,
    /// The commit voided last, and the epoch it left.
    last_voided: Option<(u64, u64)>,
}

/// Why a `CommitReport` was not counted, or a void not sequenced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    /// The reporter was not a member of the epoch the commit left.
    #[error("sender {0} was not a member of the epoch the reported commit left")]
    NotMember(SenderId),
    /// The log index names no reportable commit: beyond the head, not a
    /// commit, the room's creation, or another epoch.
    #[error("log index {log_index} names no commit of epoch {epoch} that can be reported")]
    NoSuchCommit {
        /// The reported index.
        log_index: u64,
        /// The reported epoch.
        epoch: u64,
    },
    /// The commit is settled: its window is over or a later commit was sequenced.
    #[error("the commit at {log_index} is settled; rejoin the room")]
    Settled {
        /// The reported index.
        log_index: u64,
    },
    /// The reporter was a member but does not vote on this commit.
    #[error("{0}")]
    DoesNotVote(&'static str),
    /// Limit: too many frames of the room wait for storage; the void waits.
    #[error("room has {in_flight} frames waiting for storage")]
    Overloaded {
        /// Frames in flight.
        in_flight: usize,
    },
    /// Internal: the room is being rebuilt after a storage failure.
    #[error("room is recovering from a storage failure")]
    Recovering,
    /// Internal: the void frame is not the one the sequencer decided, or
    /// the group could not go back (a bug).
    #[error("internal: {0}")]
    Internal(String),
}

impl ReportError {
    /// The wire error code for this refusal.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            ReportError::NotMember(_) => ErrorCode::NotMember,
            ReportError::NoSuchCommit { .. } => ErrorCode::NoSuchCommit,
            ReportError::Settled { .. } => ErrorCode::CommitSettled,
            ReportError::DoesNotVote(_) => ErrorCode::Forbidden,
            ReportError::Overloaded { .. } => ErrorCode::RateLimited,
            ReportError::Recovering => ErrorCode::StorageUnavailable,
            ReportError::Internal(_) => ErrorCode::Internal,
        }
    }
}

/// What a counted report leads to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReportOutcome {
    /// Counted; no quorum yet.
    Counted {
        /// Reports counted so far.
        reports: usize,
        /// Members whose votes count (committer included).
        electorate: usize,
    },
    /// This reporter had reported the commit already.
    Duplicate,
    /// The commit was voided already (a late report).
    AlreadyVoided,
    /// The quorum is reached: build and sequence the `CommitVoided`
    /// ([`RoomSequencer::sequence_void`]).
    Void(VoidDecision),
}

/// A commit to void: what its `CommitVoided` frame carries (header epoch
/// `epoch`, sender [`SERVER_SENDER_ID`], signed by the server).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VoidDecision {
    /// The commit's log index.
    pub log_index: u64,
    /// The epoch the room returns to.
    pub epoch: u64,
    /// Who reported it (at most [`COMMIT_VOID_REPORTERS_MAX`]).
    pub reporters: Vec<SenderId>,
}

impl VoidDecision {
    /// The `CommitVoided` payload.
    pub fn payload(&self) -> CommitVoided {
        CommitVoided {
            log_index: self.log_index,
            epoch: self.epoch,
            reporters: self.reporters.iter().map(|r| r.0).collect(),
        }
    }
}

impl<G: GroupState> RoomSequencer<G> {
    /// Keeps the epoch state a commit is about to change (called before a
    /// commit changes the GroupInfo, the epoch start or the pending proposals).
    pub(super) fn capture_epoch_restore(&mut self) {
        self.void.before_commit = Some(EpochRestore {
            epoch_started_at_log_index: self.epoch_started_at_log_index,
            group_info: self.group_info.clone(),
            server_proposals_pending: self.server_proposals_pending.clone(),
            server_proposals_since: self.server_proposals_since,
            reannounce_at_ms: self.reannounce_at_ms,
        });
    }

    /// A commit that left `epoch` is sequenced (or replayed) at `log_index`:
    /// it is the room's latest commit, voidable until `at_ms` plus the window.
    pub(super) fn open_void_window(
        &mut self,
        log_index: u64,
        epoch: u64,
        committer: SenderId,
        at_ms: u64,
        summary: &CommitSummary,
    ) {
        let restore = self.void.before_commit.take().unwrap_or_default();
        // Members of the epoch it left that it does not remove: the new
        // epoch's members without the ones it added (its joiner included).
        let remaining: HashSet<SenderId> =
            self.group.members().into_iter().filter(|m| !summary.added.contains(m)).collect();
        let electorate = remaining.len();
        let mut voters = remaining;
        voters.remove(&committer);
        self.void.unsettled = Some(Box::new(UnsettledCommit {
            log_index,
            epoch,
            committer,
            at_ms,
            voters,
            electorate,
            added: summary.added.clone(),
            removed: summary.removed.clone(),
            reports: Vec::new(),
            admin_reported: false,
            restore,
        }));
    }

    /// Whether the room's latest commit can still be voided (a snapshot
    /// waits until it settles).
    pub fn commit_unsettled(&self) -> bool {
        self.void.unsettled.is_some()
    }

    /// The latest commit's report window ends at `now_ms` or before: it is
    /// settled, and what undoing it needed is dropped. Returns whether it
    /// settled now.
    pub fn settle_commit_if_due(&mut self, now_ms: u64) -> bool {
        let now_ms = now_ms.max(self.last_timestamp_ms);
        let due = self.void.unsettled.as_ref().is_some_and(|unsettled| !unsettled.window_open(now_ms));
        if due {
            self.void.unsettled = None;
            self.group.settle_latest_commit();
        }
        due
    }

    /// Counts `reporter`'s report that it cannot process the commit the
    /// report names. See the module documentation for the rule.
    pub fn report_commit(
        &mut self,
        reporter: SenderId,
        report: &CommitReport,
        now_ms: u64,
    ) -> Result<ReportOutcome, ReportError> {
        if self.recovering {
            return Err(ReportError::Recovering);
        }
        self.settle_commit_if_due(now_ms);
        let (log_index, epoch) = (report.log_index, report.epoch);
        if self.void.last_voided == Some((log_index, epoch)) {
            return Ok(ReportOutcome::AlreadyVoided);
        }
        let admin = self.policy.admin;
        let Some(unsettled) = self.void.unsettled.as_mut().filter(|u| u.log_index == log_index) else {
            return Err(self.unreportable(log_index, epoch));
        };
        if unsettled.epoch != epoch {
            return Err(ReportError::NoSuchCommit { log_index, epoch });
        }
        if !unsettled.voters.contains(&reporter) {
            return Err(if unsettled.removed.contains(&reporter) {
                ReportError::DoesNotVote("members the commit removes do not vote on it")
            } else if reporter == unsettled.committer && !unsettled.added.contains(&reporter) {
                ReportError::DoesNotVote("the committer does not vote on its own commit")
            } else {
                ReportError::NotMember(reporter)
            });
        }
        if unsettled.reports.contains(&reporter) {
            return Ok(match unsettled.quorum() {
                true => ReportOutcome::Void(self.void_decision()),
                false => ReportOutcome::Duplicate,
            });
        }
        assert!(unsettled.reports.len() < unsettled.voters.len(), "reports come from distinct voters");
        unsettled.reports.push(reporter);
        unsettled.admin_reported |= reporter == admin;
        if unsettled.quorum() {
            return Ok(ReportOutcome::Void(self.void_decision()));
        }
        Ok(ReportOutcome::Counted { reports: unsettled.reports.len(), electorate: unsettled.electorate })
    }

    /// Why a report that does not name the unsettled latest commit is refused.
    fn unreportable(&self, log_index: u64, epoch: u64) -> ReportError {
        let latest_commit = self.epoch_started_at_log_index;
        if log_index >= self.next_log_index || log_index == 0 {
            ReportError::NoSuchCommit { log_index, epoch }
        } else if log_index <= latest_commit {
            // The latest commit past its window, or one a later commit settled.
            ReportError::Settled { log_index }
        } else {
            ReportError::NoSuchCommit { log_index, epoch }
        }
    }

    /// The void the reports decided: the commit, and who reported it.
    fn void_decision(&self) -> VoidDecision {
        let unsettled = self.void.unsettled.as_ref().expect("a decision needs an unsettled commit");
        VoidDecision {
            log_index: unsettled.log_index,
            epoch: unsettled.epoch,
            reporters: unsettled.reports.iter().copied().take(COMMIT_VOID_REPORTERS_MAX).collect(),
        }
    }

    /// A quorum reached earlier whose void could not be sequenced then (the
    /// room was at its in-flight limit): the decision, while the window is open.
    pub fn void_due(&mut self, now_ms: u64) -> Option<VoidDecision> {
        self.settle_commit_if_due(now_ms);
        let quorum = self.void.unsettled.as_ref().is_some_and(|unsettled| unsettled.quorum());
        quorum.then(|| self.void_decision())
    }

    /// Sequences `frame`, the server's signed `CommitVoided` for the
    /// decision [`RoomSequencer::report_commit`] returned: the room goes
    /// back to its state before the commit. Persist it like any frame.
    pub fn sequence_void(&mut self, mut frame: Frame, now_ms: u64) -> Result<Sequenced, ReportError> {
        if self.recovering {
            return Err(ReportError::Recovering);
        }
        if self.in_flight.len() >= IN_FLIGHT_FRAMES_PER_ROOM_MAX {
            return Err(ReportError::Overloaded { in_flight: self.in_flight.len() });
        }
        let now_ms = now_ms.max(self.last_timestamp_ms);
        self.settle_commit_if_due(now_ms);
        self.check_void_frame(&frame)?;
        let unsettled = self.void.unsettled.take().expect("checked by check_void_frame");
        if let Err(error) = self.group.undo_latest_commit() {
            self.void.unsettled = Some(unsettled);
            return Err(ReportError::Internal(format!("the group cannot go back: {error}")));
        }
        let log_index = self.stamp(&mut frame, now_ms);
        let epoch_after = self.group.epoch();
        let follow_up = self.restore_epoch(*unsettled);
        self.in_flight.push_back(InFlight {
            log_index,
            log_head: self.chain.head,
            sender: SERVER_SENDER_ID,
            request_id: frame.header().request_id(),
            epoch_after,
            frame: frame.clone(),
            commit: Some(follow_up),
        });
        Ok(Sequenced { log_index, frame })
    }

    /// The frame must be the server's `CommitVoided` for the unsettled
    /// commit, with the epoch it left in its header.
    fn check_void_frame(&self, frame: &Frame) -> Result<(), ReportError> {
        let internal = |what: &str| ReportError::Internal(what.to_owned());
        check_sender(frame, SERVER_SENDER_ID).map_err(|e| internal(&e.to_string()))?;
        if frame.opcode() != Opcode::CommitVoided {
            return Err(internal("a void must be a CommitVoided frame"));
        }
        let payload: CommitVoided = frame.decode_payload().map_err(|e| internal(&e.to_string()))?;
        let Some(unsettled) = self.void.unsettled.as_ref().filter(|u| u.log_index == payload.log_index)
        else {
            return Err(self.unreportable(payload.log_index, payload.epoch));
        };
        if payload.epoch != unsettled.epoch || frame.header().epoch() != unsettled.epoch {
            return Err(internal("the CommitVoided names another epoch than the commit left"));
        }
        Ok(())
    }

    /// Puts the sequencer's epoch state back as it was before the commit;
    /// returns the membership change the void makes, to report once durable.
    fn restore_epoch(&mut self, unsettled: UnsettledCommit) -> Box<CommitFollowUp> {
        let restore = unsettled.restore;
        assert_eq!(
            self.group.epoch(),
            unsettled.epoch,
            "a void returns the group to the epoch the commit left"
        );
        self.epoch_started_at_log_index = restore.epoch_started_at_log_index;
        self.group_info = restore.group_info;
        self.server_proposals_pending = restore.server_proposals_pending;
        self.server_proposals_since = restore.server_proposals_since;
        self.reannounce_at_ms = restore.reannounce_at_ms;
        self.void.last_voided = Some((unsettled.log_index, unsettled.epoch));
        let summary = CommitSummary {
            epoch: unsettled.epoch,
            added: unsettled.removed,
            removed: unsettled.added,
            ratchet_tree: Bytes::new(),
        };
        Box::new(CommitFollowUp { summary, welcome: None, ratchet_tree: Bytes::new() })
    }

    /// Replays a stored `CommitVoided` at the cursor: the commit it names
    /// must be the latest one replayed.
    pub(super) fn replay_void(&mut self, frame: &Frame) -> Result<(), ReplayError> {
        let log_index = frame.header().log_index();
        let does_not_apply =
            |error: String| ReplayError::DoesNotApply { log_index, error: GroupError::Invalid(error) };
        // Windows are judged by the live clock, not on replay: a stored void
        // was decided while its window was open.
        self.check_void_frame(frame).map_err(|e| does_not_apply(e.to_string()))?;
        let unsettled = self.void.unsettled.take().expect("checked by check_void_frame");
        self.group.undo_latest_commit().map_err(|e| does_not_apply(e.to_string()))?;
        self.restore_epoch(*unsettled);
        Ok(())
    }
}

#[cfg(test)]
#[path = "void_tests.rs"]
mod tests;
