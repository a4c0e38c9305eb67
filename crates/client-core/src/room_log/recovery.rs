//! A room's recovery from a sequenced commit members cannot process
//! (`docs/RECOVERY.md`), without I/O.
//!
//! - A commit this device cannot process (a membership or confirmation tag
//!   that does not verify, a path that does not decrypt, anything that
//!   does not apply) does not fail the room: the room is *stuck* on it,
//!   stays at its epoch, reports it ([`RoomLog::take_report`]) and reads on,
//!   every later frame of the commit's epoch unreadable for now.
//! - A commit this device applied keeps an *undo record* until it settles:
//!   this group's OpenMLS storage entries as they were before the merge,
//!   the pre-merge values of every other entry the merge changed, and the
//!   sender keys of the epoch it left.
//! - A `CommitVoided` for the commit ends either: a stuck room resumes; a
//!   room that applied it rolls back (and redoes the voided commit's intent
//!   if it was ours); a room this commit made us a member of is no longer
//!   ours.
//! - A commit settles, without any clock, when a later commit is in the log
//!   or a frame stamped at or after its time plus
//!   [`COMMIT_VOID_WINDOW_MS`]: timestamps never go back in a room and the
//!   server voids only within the window, so no `CommitVoided` for it can
//!   follow. The undo record goes; a room still stuck rejoins by external
//!   commit ([`RoomLog::take_rejoin`]).

use std::collections::{BTreeSet, HashMap};

use kalandra_proto::limits::COMMIT_VOID_WINDOW_MS;
use kalandra_proto::payload::{self, CommitReport, CommitReportReason, CommitVoided};
use kalandra_proto::{ErrorCode, Frame, Opcode, RoomId, SenderId};
use openmls::group::{ProcessMessageError, StageCommitError, ValidationError};
use openmls::prelude::GroupId;
use openmls_memory_storage::MemoryStorageError;
use openmls_traits::OpenMlsProvider as _;
use serde::{Deserialize, Serialize};

use super::{sender_of, step, EntryBody, Intent, RoomLog, RoomLogError};
use crate::mls::{MlsProvider, ProcessError, RoomGroup};
use crate::sender_keys::SenderKeyState;
use crate::state::{Action, Event};

/// The sender id of frames the server originates.
const SERVER_SENDER_ID: SenderId = SenderId(0);

/// What a room keeps to recover from a commit it cannot process, or to
/// undo one the server voids. Persisted with the room's record.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Recovery {
    /// What undoing the latest commit we applied needs, until it settles.
    #[serde(default)]
    undo: Option<UndoRecord>,
    /// The commit we cannot process, until it is voided or settles.
    #[serde(default)]
    stuck: Option<StuckOn>,
    /// The commit that made us a member, until it settles.
    #[serde(default)]
    joined: Option<JoinedAt>,
    /// Our membership is void, or we were stuck past the window: join the
    /// room again by external commit.
    #[serde(default)]
    rejoin: bool,
    /// The report of the commit we are stuck on is due on this connection.
    #[serde(skip)]
    report_due: bool,
}

impl Recovery {
    /// Whether the room must be joined again (its group was dropped).
    pub(crate) fn rejoin_needed(&self) -> bool {
        self.rejoin
    }

    /// The commit the room is stuck on, if any.
    pub(crate) fn stuck_log_index(&self) -> Option<u64> {
        self.stuck.map(|stuck| stuck.log_index)
    }
}

/// A commit this device applied, and the state before it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct UndoRecord {
    log_index: u64,
    /// The epoch the commit left.
    epoch: u64,
    /// Its server timestamp.
    at_ms: u64,
    /// This group's storage entries before the merge.
    group_entries: Vec<(Vec<u8>, Vec<u8>)>,
    /// Other entries the merge changed, with their values before it
    /// (`None`: the merge created it).
    other_entries: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    /// The sender keys of the epoch it left, as they were.
    sender_keys: Option<Vec<u8>>,
    cover_proposals: bool,
    /// The intent, when the commit was ours.
    own_intent: Option<Intent>,
}

/// A sequenced commit this device cannot process.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct StuckOn {
    log_index: u64,
    /// The epoch it left (ours).
    epoch: u64,
    at_ms: u64,
    reason: u8,
}

/// The commit that made this device a member.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct JoinedAt {
    log_index: u64,
    /// Its server timestamp; for a Welcome, the first later frame's, an
    /// upper bound (the Welcome carries none).
    at_ms: Option<u64>,
    /// Joined by our external commit (as opposed to a Welcome).
    external: bool,
}

/// Storage entries taken before a merge, to build its undo record.
pub(super) struct BeforeMerge {
    group_entries: Vec<(Vec<u8>, Vec<u8>)>,
    other_entries: HashMap<Vec<u8>, Vec<u8>>,
}

/// Why this device cannot process a commit, as a report reason.
fn reason_of(error: &ProcessError) -> CommitReportReason {
    let ProcessError::Invalid(source) = error else { return CommitReportReason::DoesNotApply };
    match source.downcast_ref::<ProcessMessageError<MemoryStorageError>>() {
        Some(ProcessMessageError::ValidationError(
            ValidationError::InvalidMembershipTag | ValidationError::MissingMembershipTag,
        )) => CommitReportReason::MembershipTag,
        Some(ProcessMessageError::InvalidCommit(StageCommitError::ConfirmationTagMismatch)) => {
            CommitReportReason::ConfirmationTag
        }
        Some(ProcessMessageError::InvalidCommit(
            StageCommitError::UpdatePathError(_) | StageCommitError::VerifiedUpdatePathError(_),
        )) => CommitReportReason::UpdatePath,
        _ => CommitReportReason::DoesNotApply,
    }
}

/// Whether a failure to process a sequenced commit makes the room stuck
/// (rather than being a bug or a storage failure of this device).
pub(super) fn unprocessable(error: &ProcessError) -> bool {
    matches!(
        error,
        ProcessError::Invalid(_)
            | ProcessError::Malformed(_)
            | ProcessError::NotAPublicMessage
            | ProcessError::WrongGroup
            | ProcessError::WrongEpoch { .. }
            | ProcessError::OwnCommit
            | ProcessError::Unsupported
    )
}

/// The marker of this group's entries in OpenMLS's memory storage: every
/// key of a group's state holds its group id as the storage serializes it.
fn group_marker(room_id: RoomId) -> Result<Vec<u8>, RoomLogError> {
    serde_json::to_vec(&GroupId::from_slice(&room_id.0))
        .map_err(|e| RoomLogError::Internal(format!("encoding the group id: {e}")))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|window| window == needle)
}

fn storage_poisoned() -> RoomLogError {
    RoomLogError::Internal("the MLS storage lock is poisoned".into())
}

impl RoomLog {
    /// This group's storage entries and everyone else's, before a merge.
    pub(super) fn before_merge(&self, provider: &MlsProvider) -> Result<BeforeMerge, RoomLogError> {
        let marker = group_marker(self.room_id())?;
        let values = provider.storage().values.read().map_err(|_| storage_poisoned())?;
        let (group, other): (Vec<_>, Vec<_>) =
            values.iter().map(|(k, v)| (k.clone(), v.clone())).partition(|(key, _)| contains(key, &marker));
        Ok(BeforeMerge { group_entries: group, other_entries: other.into_iter().collect() })
    }

    /// A commit at `frame` was applied: keep what undoing it needs until it
    /// settles. `sender_keys` are those of the epoch it left.
    pub(super) fn keep_undo(
        &mut self,
        provider: &MlsProvider,
        frame: &Frame,
        before: BeforeMerge,
        sender_keys: Option<Vec<u8>>,
        cover_proposals: bool,
        own_intent: Option<Intent>,
    ) -> Result<(), RoomLogError> {
        let marker = group_marker(self.room_id())?;
        let values = provider.storage().values.read().map_err(|_| storage_poisoned())?;
        let mut other_entries: Vec<(Vec<u8>, Option<Vec<u8>>)> = before
            .other_entries
            .iter()
            .filter(|(key, value)| values.get(*key) != Some(*value))
            .map(|(key, value)| (key.clone(), Some(value.clone())))
            .collect();
        other_entries.extend(
            values
                .keys()
                .filter(|key| !contains(key, &marker) && !before.other_entries.contains_key(*key))
                .map(|key| (key.clone(), None)),
        );
        let header = frame.header();
        self.record.recovery.undo = Some(UndoRecord {
            log_index: header.log_index(),
            epoch: header.epoch(),
            at_ms: header.server_timestamp_ms(),
            group_entries: before.group_entries,
            other_entries,
            sender_keys,
            cover_proposals,
            own_intent,
        });
        Ok(())
    }

    /// The commit at `frame` cannot be processed: the room is stuck on it.
    pub(super) fn commit_unprocessable(
        &mut self,
        provider: &MlsProvider,
        frame: &Frame,
        error: &ProcessError,
    ) -> Result<Option<EntryBody>, RoomLogError> {
        let header = frame.header();
        let (log_index, epoch) = (header.log_index(), self.epoch());
        let target = epoch.checked_add(1).ok_or_else(|| RoomLogError::Internal("epoch overflow".into()))?;
        let actions = step(&mut self.state, Event::CommitUnprocessable { epoch: target, log_index })?;
        self.note_actions(&actions);
        if actions.contains(&Action::DiscardPendingCommit) {
            if let Some(group) = self.group.as_mut().filter(|group| group.has_pending_commit()) {
                group.discard_pending_commit(provider)?;
            }
        }
        if actions.contains(&Action::ReapplyIntent) {
            self.record.redo = self.record.pending.take().map(|pending| pending.intent);
        }
        self.record.recovery.stuck = Some(StuckOn {
            log_index,
            epoch,
            at_ms: header.server_timestamp_ms(),
            reason: reason_of(error).to_u8(),
        });
        Ok(Some(EntryBody::Unreadable(format!(
            "a commit this device cannot process ({error}); reported to the server"
        ))))
    }

    /// Recovery's part of applying a frame at the cursor: a `CommitVoided`,
    /// settlement of what waits for it, and the frames a stuck room skips.
    /// `None` when the frame is applied as usual.
    pub(super) fn recovery_first(
        &mut self,
        provider: &MlsProvider,
        frame: &Frame,
    ) -> Result<Option<Option<EntryBody>>, RoomLogError> {
        if frame.opcode() == Opcode::CommitVoided {
            return self.apply_void(provider, frame).map(Some);
        }
        self.settle_by(provider, frame)?;
        if self.group.is_none() {
            return Ok(Some(None));
        }
        let Some(stuck) = self.record.recovery.stuck else { return Ok(None) };
        let skipped = match frame.opcode() {
            Opcode::Application => Some(EntryBody::Unreadable(format!(
                "sent in epoch {}, after a commit this device could not process",
                stuck.epoch + 1
            ))),
            Opcode::Error => Some(EntryBody::Redacted),
            _ => None,
        };
        Ok(Some(skipped))
    }

    /// Settles what waits on the latest commit, by `frame`'s timestamp or
    /// by `frame` being a later commit.
    fn settle_by(&mut self, provider: &MlsProvider, frame: &Frame) -> Result<(), RoomLogError> {
        let header = frame.header();
        let (log_index, at_ms) = (header.log_index(), header.server_timestamp_ms());
        let later_commit = matches!(frame.opcode(), Opcode::Commit | Opcode::ExternalJoin);
        let settles = |commit: u64, commit_at_ms: u64| {
            log_index > commit
                && (later_commit || at_ms >= commit_at_ms.saturating_add(COMMIT_VOID_WINDOW_MS))
        };
        let recovery = &mut self.record.recovery;
        if recovery.undo.as_ref().is_some_and(|undo| settles(undo.log_index, undo.at_ms)) {
            recovery.undo = None;
        }
        if let Some(joined) = recovery.joined.as_mut() {
            let joined_at_ms = *joined.at_ms.get_or_insert(at_ms);
            if settles(joined.log_index, joined_at_ms) {
                recovery.joined = None;
            }
        }
        if recovery.stuck.is_some_and(|stuck| settles(stuck.log_index, stuck.at_ms)) {
            self.stuck_commit_settled(provider)?;
        }
        Ok(())
    }

    /// The commit we are stuck on settled without a void: our group is of
    /// no use; rejoin.
    fn stuck_commit_settled(&mut self, provider: &MlsProvider) -> Result<(), RoomLogError> {
        let actions = step(&mut self.state, Event::StuckCommitSettled)?;
        if actions.contains(&Action::ReapplyIntent) {
            // Our commit kept while stuck can no longer be sequenced.
            self.record.redo = self.record.pending.take().map(|pending| pending.intent);
        }
        self.record.recovery.stuck = None;
        self.record.recovery.report_due = false;
        self.record.recovery.rejoin = actions.contains(&Action::Rejoin);
        self.drop_group(provider)
    }

    /// Deletes the group and its keys; the room's history and intents stay.
    fn drop_group(&mut self, provider: &MlsProvider) -> Result<(), RoomLogError> {
        self.record.pending = None;
        self.record.cover_proposals = false;
        self.record.recovery.undo = None;
        self.sender_keys = None;
        self.record.sender_keys = None;
        if let Some(group) = self.group.take() {
            group.delete(provider)?;
        }
        Ok(())
    }

    /// A `CommitVoided` at the cursor.
    fn apply_void(
        &mut self,
        provider: &MlsProvider,
        frame: &Frame,
    ) -> Result<Option<EntryBody>, RoomLogError> {
        let protocol = |what: String| RoomLogError::Protocol(format!("room {}: {what}", self.room_id()));
        if frame.header().sender_id() != SERVER_SENDER_ID {
            return Err(protocol("a CommitVoided from a member".into()));
        }
        let void: CommitVoided =
            frame.decode_payload().map_err(|e| protocol(format!("CommitVoided payload: {e}")))?;
        let recovery = &self.record.recovery;
        let (log_index, epoch) = (void.log_index, void.epoch);
        let members_before = self.member_ids();
        if recovery.stuck.is_some_and(|stuck| (stuck.log_index, stuck.epoch) == (log_index, epoch)) {
            step(&mut self.state, Event::CommitVoided { epoch })?;
            self.record.recovery.stuck = None;
            self.record.recovery.report_due = false;
        } else if recovery
            .undo
            .as_ref()
            .is_some_and(|undo| (undo.log_index, undo.epoch) == (log_index, epoch))
        {
            self.roll_back(provider)?;
        } else if recovery.joined.is_some_and(|joined| joined.log_index == log_index) {
            self.membership_voided(provider)?;
        } else {
            return Err(protocol(format!(
                "a CommitVoided for log index {log_index}, which is not a commit this room can still void"
            )));
        }
        let members_after = self.member_ids();
        Ok(Some(EntryBody::CommitVoided {
            voided_log_index: log_index,
            epoch,
            added: members_after.difference(&members_before).copied().collect(),
            removed: members_before.difference(&members_after).copied().collect(),
        }))
    }

    fn member_ids(&self) -> BTreeSet<u64> {
        self.group
            .iter()
            .flat_map(RoomGroup::members)
            .filter_map(|member| sender_of(&member.identity))
            .map(|sender| sender.0)
            .collect()
    }

    /// Back to the state before the voided commit we applied.
    fn roll_back(&mut self, provider: &MlsProvider) -> Result<(), RoomLogError> {
        let undo = self.record.recovery.undo.take().expect("checked by the caller");
        let actions = step(&mut self.state, Event::CommitVoided { epoch: undo.epoch })?;
        if actions.contains(&Action::DiscardPendingCommit) {
            if let Some(group) = self.group.as_mut().filter(|group| group.has_pending_commit()) {
                group.discard_pending_commit(provider)?;
            }
        }
        let pending_intent = self.record.pending.take().map(|pending| pending.intent);
        self.restore_storage(provider, &undo)?;
        let room_id = self.room_id();
        let mut group = RoomGroup::load(provider, room_id.0)?
            .ok_or_else(|| RoomLogError::Internal(format!("room {room_id}: no group after rolling back")))?;
        if group.has_pending_commit() {
            // Our own voided commit was pending before it merged; its intent is redone.
            group.discard_pending_commit(provider)?;
        }
        if group.epoch() != undo.epoch {
            return Err(RoomLogError::Internal(format!(
                "room {room_id}: rolled back to epoch {}, not {}",
                group.epoch(),
                undo.epoch
            )));
        }
        self.group = Some(group);
        self.sender_keys = undo.sender_keys.as_deref().map(SenderKeyState::from_bytes).transpose()?;
        self.record.cover_proposals = undo.cover_proposals;
        // The voided commit's intent first (ours), else a commit we had made on top of it.
        if let Some(intent) = undo.own_intent.or(pending_intent) {
            self.record.redo = Some(intent);
        }
        Ok(())
    }

    /// Puts this group's storage entries back as they were before the merge.
    fn restore_storage(&self, provider: &MlsProvider, undo: &UndoRecord) -> Result<(), RoomLogError> {
        let marker = group_marker(self.room_id())?;
        let mut values = provider.storage().values.write().map_err(|_| storage_poisoned())?;
        values.retain(|key, _| !contains(key, &marker));
        values.extend(undo.group_entries.iter().cloned());
        for (key, value) in &undo.other_entries {
            match value {
                Some(value) => values.insert(key.clone(), value.clone()),
                None => values.remove(key),
            };
        }
        Ok(())
    }

    /// The commit that made us a member is void: the room is not ours;
    /// after our own external join, join again.
    fn membership_voided(&mut self, provider: &MlsProvider) -> Result<(), RoomLogError> {
        let joined = self.record.recovery.joined.take().expect("checked by the caller");
        step(&mut self.state, Event::Removed)?;
        self.drop_group(provider)?;
        self.record.redo = None;
        if joined.external {
            self.record.recovery.rejoin = true;
        } else {
            self.record.removed = true;
        }
        Ok(())
    }

    /// Notes the actions recovery acts on.
    pub(super) fn note_actions(&mut self, actions: &[Action]) {
        if actions.iter().any(|action| matches!(action, Action::ReportCommit { .. })) {
            self.record.recovery.report_due = true;
        }
    }

    /// Records that this device joined at `log_index` by its own external
    /// commit, stamped `at_ms`: if that commit is voided, it joins again.
    pub fn joined_externally(&mut self, log_index: u64, at_ms: u64) {
        self.record.recovery.joined = Some(JoinedAt { log_index, at_ms: Some(at_ms), external: true });
    }

    /// A room this device just joined by its external commit, which the
    /// server sequenced at `log_index` in `epoch` (connected, a member at
    /// the group's epoch, the log read from the next index); `at_ms` is the
    /// commit's timestamp when known (else the next frame's is taken). Used
    /// by [`crate::client::Client`] and by the simulation alike.
    pub fn joined_by_external_commit(
        provider: &MlsProvider,
        room_id: RoomId,
        group: RoomGroup,
        log_index: u64,
        epoch: u64,
        at_ms: Option<u64>,
    ) -> Result<RoomLog, RoomLogError> {
        if group.room_id() != room_id.0 {
            return Err(RoomLogError::Protocol("the GroupInfo joined is another room's".into()));
        }
        let sender_keys = SenderKeyState::from_group(provider, &group)?;
        let mut state = crate::state::ClientState::PendingWelcome;
        step(&mut state, Event::JoinedByExternalCommit { epoch: group.epoch() })?;
        step(&mut state, Event::CommitAcked { epoch })?;
        let record = super::RoomRecord::joined(room_id, log_index + 1);
        let mut room = RoomLog { record, group: Some(group), sender_keys: Some(sender_keys), state };
        room.record.recovery.joined = Some(JoinedAt { log_index, at_ms, external: true });
        Ok(room)
    }

    /// Records that this device joined by the Welcome of the commit at `log_index`.
    pub(super) fn joined_by_welcome(&mut self, log_index: u64) {
        self.record.recovery.joined = Some(JoinedAt { log_index, at_ms: None, external: false });
    }
}

impl RoomLog {
    /// The report to send (`CommitReport`) for the commit the room is stuck
    /// on, once per connection (again after reconnecting, while stuck).
    pub fn take_report(&mut self) -> Option<CommitReport> {
        let recovery = &mut self.record.recovery;
        let stuck = recovery.stuck.filter(|_| recovery.report_due)?;
        recovery.report_due = false;
        Some(CommitReport { log_index: stuck.log_index, epoch: stuck.epoch, reason: stuck.reason })
    }

    /// The server refused our report with `error`. A settled commit (or one
    /// the server does not know) ends the wait: the room rejoins. A rate
    /// limit leaves the report due; anything else is final.
    pub fn report_refused(
        &mut self,
        provider: &MlsProvider,
        error: &payload::Error,
    ) -> Result<(), RoomLogError> {
        if self.record.recovery.stuck.is_none() {
            return Ok(());
        }
        match ErrorCode::from_u16(error.code) {
            Some(ErrorCode::CommitSettled | ErrorCode::NoSuchCommit) => self.stuck_commit_settled(provider),
            Some(ErrorCode::RateLimited) => {
                self.record.recovery.report_due = true;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Makes the report of the commit the room is stuck on due again (its
    /// window has passed on the driver's clock); whether the room is stuck.
    pub fn report_again(&mut self) -> bool {
        let recovery = &mut self.record.recovery;
        recovery.report_due = recovery.stuck.is_some();
        recovery.report_due
    }

    /// Whether the room must be joined again by external commit (taken:
    /// the driver joins, and the joined room replaces this one).
    pub fn take_rejoin(&mut self) -> bool {
        std::mem::take(&mut self.record.recovery.rejoin)
    }

    /// Whether the room must be joined again by external commit.
    pub fn rejoin_needed(&self) -> bool {
        self.record.recovery.rejoin
    }

    /// The commit the room is stuck on, if any: its log index.
    pub fn stuck_on(&self) -> Option<u64> {
        self.record.recovery.stuck.map(|stuck| stuck.log_index)
    }

    /// The latest commit this device applied while it can still be voided
    /// (an undo record is kept): its log index.
    pub fn unsettled_commit(&self) -> Option<u64> {
        self.record.recovery.undo.as_ref().map(|undo| undo.log_index)
    }
}

/// Helpers for tests and simulations that play a hostile committer; not
/// for use by a real device.
pub mod test_support {
    /// `commit` (a member's `PublicMessage` commit in an `MLSMessage`, as
    /// [`crate::mls::CommitOutput::commit`]) with its confirmation tag
    /// altered: the signature still verifies, so the server accepts it,
    /// and every member refuses it. Kalandra's ciphersuite uses 32-byte
    /// MACs: the message ends with the confirmation tag and the membership
    /// tag, each a one-byte length and 32 bytes. `None` when `commit` does
    /// not end that way.
    pub fn corrupt_confirmation_tag(commit: &[u8]) -> Option<Vec<u8>> {
        const MAC_BYTES: usize = 32;
        let len = commit.len();
        let membership_tag = len.checked_sub(1 + MAC_BYTES)?;
        let confirmation_tag = membership_tag.checked_sub(1 + MAC_BYTES)?;
        let tags_framed = usize::from(commit[membership_tag]) == MAC_BYTES
            && usize::from(commit[confirmation_tag]) == MAC_BYTES;
        if !tags_framed {
            return None;
        }
        let mut corrupted = commit.to_vec();
        corrupted[membership_tag - 1] ^= 0x01;
        Some(corrupted)
    }

    /// [`corrupt_confirmation_tag`] for `commit` and the same change in
    /// `group_info` (the `MLSMessage` GroupInfo of the epoch the commit
    /// creates), signed again by the committer's `signing_key`: the pair a
    /// hostile committer sends so that the server, which checks that the
    /// GroupInfo's confirmation tag is the commit's, accepts both.
    pub fn corrupt_confirmation_tag_and_group_info(
        commit: &[u8],
        group_info: &[u8],
        signing_key: &ed25519_dalek::SigningKey,
    ) -> Option<(Vec<u8>, Vec<u8>)> {
        use ed25519_dalek::Signer as _;
        const MAC_BYTES: usize = 32;
        const SIGNATURE_BYTES: usize = 64;
        const MLS_MESSAGE_HEAD_BYTES: usize = 4;
        let commit = corrupt_confirmation_tag(commit)?;
        // MLSMessage head | GroupInfoTBS (.. | confirmation_tag<V> | signer: u32) | signature<V>;
        // a 64-byte vector has a two-byte length.
        let signature = group_info.len().checked_sub(2 + SIGNATURE_BYTES)?;
        let tbs = group_info.get(MLS_MESSAGE_HEAD_BYTES..signature)?;
        let tag_end = tbs.len().checked_sub(4)?;
        let tag_head = tag_end.checked_sub(1 + MAC_BYTES)?;
        if group_info[signature..signature + 2] != [0x40, 0x40] || usize::from(tbs[tag_head]) != MAC_BYTES {
            return None;
        }
        let mut tbs = tbs.to_vec();
        tbs[tag_end - 1] ^= 0x01;
        // SignWithLabel (RFC 9420 §5.1.2): SignContent = label<V> | content<V>.
        let mut content = Vec::with_capacity(tbs.len() + 32);
        push_vl(&mut content, b"MLS 1.0 GroupInfoTBS");
        push_vl(&mut content, &tbs);
        let mut forged = group_info[..MLS_MESSAGE_HEAD_BYTES].to_vec();
        forged.extend_from_slice(&tbs);
        push_vl(&mut forged, &signing_key.sign(&content).to_bytes());
        Some((commit, forged))
    }

    /// An MLS variable-length vector (RFC 9420 §2.1.2).
    fn push_vl(out: &mut Vec<u8>, bytes: &[u8]) {
        match (u8::try_from(bytes.len()), u16::try_from(bytes.len()), u32::try_from(bytes.len())) {
            (Ok(len), _, _) if len < 0x40 => out.push(len),
            (_, Ok(len), _) if len < 0x4000 => out.extend_from_slice(&(0x4000 | len).to_be_bytes()),
            (_, _, Ok(len)) => out.extend_from_slice(&(0x8000_0000 | len).to_be_bytes()),
            // No GroupInfo reaches 4 GiB; an impossible length gets an empty vector.
            _ => out.push(0),
        }
        out.extend_from_slice(bytes);
    }
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::SigningKey;
    use kalandra_proto::payload::Commit;
    use kalandra_proto::FrameHeaderBuf;

    use super::*;
    use crate::mls::Identity;

    /// Restoring puts back this group's entries exactly, and the other
    /// entries the merge changed, and touches nothing else.
    #[test]
    fn restoring_storage_puts_back_the_group_and_what_the_merge_changed_elsewhere() {
        let provider = MlsProvider::from_seed([3; 32]);
        let identity = Identity::generate(&provider).unwrap();
        let server = SigningKey::from_bytes(&[4; 32]).verifying_key().to_bytes();
        let room = RoomId(*b"room-of-restores");
        let (group, _) = RoomGroup::create(&provider, &identity, room.0, &server, 1_700_000_000).unwrap();
        let mut log = RoomLog::created(&provider, group, Vec::new()).unwrap();
        let marker = group_marker(room).unwrap();
        let put = |key: &[u8], value: &[u8]| {
            provider.storage().values.write().unwrap().insert(key.to_vec(), value.to_vec());
        };
        put(b"Elsewhere-kept", b"1");
        put(b"Elsewhere-deleted-by-merge", b"2");
        let snapshot = |provider: &MlsProvider| provider.storage().values.read().unwrap().clone();
        let before_state = snapshot(&provider);
        let before = log.before_merge(&provider).unwrap();
        // What a merge might do: change this group's entries, delete and create others.
        let group_key = before_state.keys().find(|key| contains(key, &marker)).unwrap().clone();
        put(&group_key, b"changed");
        let mut group_new = group_key.clone();
        group_new.extend_from_slice(b"-new");
        put(&group_new, b"new in the group");
        provider.storage().values.write().unwrap().remove(&b"Elsewhere-deleted-by-merge"[..]);
        put(b"Elsewhere-created-by-merge", b"3");
        let mut header = FrameHeaderBuf::new(Opcode::Commit);
        header.set_room_id(room).set_log_index(5).set_epoch(0).set_server_timestamp_ms(9);
        let frame = Frame::with_payload(
            header,
            &Commit { commit: vec![1], welcome: None, welcome_recipients: vec![], group_info: None },
        )
        .unwrap();
        log.keep_undo(&provider, &frame, before, None, false, None).unwrap();
        // After the merge, another room's operation writes elsewhere: it stays.
        put(b"Elsewhere-after", b"4");
        let undo = log.record.recovery.undo.clone().unwrap();
        assert_eq!(undo.other_entries.len(), 2, "{:?}", undo.other_entries);
        log.restore_storage(&provider, &undo).unwrap();
        let mut expected = before_state;
        expected.insert(b"Elsewhere-after".to_vec(), b"4".to_vec());
        assert_eq!(snapshot(&provider), expected);
    }
}
