//! One room's log as this device applies it, without I/O.
//!
//! A [`RoomLog`] holds what a device knows of one room: the cursor (the next
//! log index to apply), the MLS group, the sender keys of the epoch, our
//! pending commit and the intent behind it, and the room's
//! [`ClientState`] machine. Its inputs are the room's sequenced frames in
//! order, the server's answers to our commits, and connection events; its
//! outputs are data: the history entry a frame makes ([`LogEntry`]), the
//! outbox entry a frame of ours settles, the intent to redo, the commit to
//! send again, and the [`RoomRecord`] to checkpoint. It reads no clock,
//! opens no connection and writes no store: MLS goes through
//! [`RoomGroup`] and the provider passed in, whose storage the driver
//! persists together with the record.
//!
//! Both drivers call it: [`crate::client::Client`] (QUIC and the device's
//! store) and the deterministic simulation's client (turmoil TCP and a
//! simulated disk), so the decisions the simulation checks are the ones a
//! device makes.
//!
//! # Decisions
//!
//! - The cursor moves by one for every frame at it; a frame before it was
//!   applied already (ignored), a frame after it is a gap (an error: the
//!   server broke the log's order). A frame that fails to apply leaves the
//!   cursor at it, so a failed room is read again from there, never past it.
//! - A commit of an epoch before ours is a fork (the server sequenced two
//!   commits for one epoch) and an error.
//! - A commit of ours for the pending epoch is merged (`CommitAcked`);
//!   another commit for that epoch discards ours (`CommitFromOthers`) and
//!   its intent is kept to be redone; a refusal settles it the same way.
//! - An application frame of ours settles the outbox entry sealed at that
//!   epoch and generation (sequenced, not to be resent).
//! - While our own removal is proposed (a kick, our leave) we commit
//!   nothing in the room: any commit would have to cover that proposal, and
//!   a member cannot commit its own removal. Our pending commit of that
//!   epoch can never be sequenced and is dropped with its intent. When the
//!   removal of every member is pending, nobody can ever commit it: the
//!   room is left at once, as a commit removing us would leave it.
//! - Every change of membership, epoch or pending commit goes through the
//!   state machine; a transition it refuses, or a disagreement between it
//!   and the MLS group, is [`RoomLogError::Internal`].
//! - A commit this device cannot process makes the room stuck, not failed;
//!   a commit it applied can be voided by the server until it settles
//!   (`recovery`, `docs/RECOVERY.md`).

mod chain;
mod recovery;

pub use chain::{ChainViolation, LogHeadError, SIGNED_HEADS_KEPT_MAX, SIGNED_HEADS_PENDING_MAX};
pub use recovery::test_support;

use kalandra_proto::chain::{LogChain, SignedLogHead};
use kalandra_proto::federation::DomainName;
use kalandra_proto::payload::{self, Application, Commit, ExternalJoin};
use kalandra_proto::{ErrorCode, Frame, Opcode, RoomId, SenderId};
use serde::{Deserialize, Serialize};

use crate::mls::{
    ExportError, HandshakeOutcome, JoinError, MlsProvider, PendingCommitError, ProcessError, RoomGroup,
    StorageError,
};
use crate::sender_keys::{
    open_application, seal_application_with_push, SealError, SenderKeyState, SenderKeyStateDecodeError,
};
use crate::state::{Action, ClientState, CommitKind, Event, Resume};

/// Why a room's log could not be applied or settled.
#[derive(Debug, thiserror::Error)]
pub enum RoomLogError {
    /// The server broke the log: a gap, a payload that does not decode,
    /// history that ends before the frames it announced.
    #[error("{0}")]
    Protocol(String),
    /// A bug: the state machine refused a transition, or it and the MLS
    /// group disagree.
    #[error("{0}")]
    Internal(String),
    /// The device is not (or no longer) a member of the room.
    #[error("not a member of room {0}")]
    NotMember(RoomId),
    /// Processing a handshake message from the log.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// Merging or discarding our pending commit.
    #[error(transparent)]
    PendingCommit(#[from] PendingCommitError),
    /// Joining from a Welcome.
    #[error(transparent)]
    Join(#[from] JoinError),
    /// Exporting the epoch's secrets.
    #[error(transparent)]
    Export(#[from] ExportError),
    /// MLS storage.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// Sealing a message.
    #[error(transparent)]
    Seal(#[from] SealError),
    /// Stored sender keys do not decode.
    #[error(transparent)]
    SenderKeys(#[from] SenderKeyStateDecodeError),
}

/// What a commit of ours is for: redone in a later epoch when another
/// commit wins the epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Intent {
    /// Creating the room (not a commit: `CreateRoom`).
    Create,
    /// Adding these sender ids.
    Invite(Vec<u64>),
    /// Adding these sender ids of another domain (their key packages are
    /// claimed through this device's server from that domain).
    InviteAt {
        /// The users' home domain.
        domain: DomainName,
        /// Their sender ids.
        members: Vec<u64>,
    },
    /// Removing these sender ids.
    Remove(Vec<u64>),
    /// A fresh leaf key and path.
    Update,
    /// Commit the proposals pending in the room (a removal the server
    /// proposed for a moderator, a member's leave).
    CoverProposals,
}

/// Our commit (or room creation) awaiting its fate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PendingCommitRecord {
    /// The signed frame as sent.
    pub(crate) frame: Vec<u8>,
    /// The epoch the commit was made in.
    pub(crate) epoch: u64,
    pub(crate) intent: Intent,
}

impl PendingCommitRecord {
    /// The signed frame as sent (to send again under a fresh request id).
    pub fn frame(&self) -> &[u8] {
        &self.frame
    }

    /// The epoch the commit was made in.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// What the commit is for.
    pub fn intent(&self) -> &Intent {
        &self.intent
    }
}

/// What a room's log persists at each checkpoint, with the MLS storage.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoomRecord {
    pub(crate) room_id: [u8; 16],
    pub(crate) next_log_index: u64,
    /// Whether the server acknowledged the room's creation.
    pub(crate) confirmed: bool,
    pub(crate) pending: Option<PendingCommitRecord>,
    pub(crate) sender_keys: Option<Vec<u8>>,
    pub(crate) removed: bool,
    /// A commit of ours that another commit beat while we were away: redone
    /// on the next connection.
    #[serde(default)]
    pub(crate) redo: Option<Intent>,
    /// A proposal we can commit is pending (not our own removal): commit it.
    #[serde(default)]
    pub(crate) cover_proposals: bool,
    /// What recovering from an unprocessable or voided commit needs.
    #[serde(default)]
    pub(crate) recovery: recovery::Recovery,
    /// The log's hash chain as applied, and the server's signed heads.
    #[serde(default)]
    pub(crate) chain: chain::ChainRecord,
}

impl RoomRecord {
    /// A room just joined (by Welcome or external commit), read from `next_log_index` on.
    pub(crate) fn joined(room_id: RoomId, next_log_index: u64) -> Self {
        RoomRecord {
            room_id: room_id.0,
            next_log_index,
            confirmed: true,
            pending: None,
            sender_keys: None,
            removed: false,
            redo: None,
            cover_proposals: false,
            recovery: recovery::Recovery::default(),
            chain: chain::ChainRecord::default(),
        }
    }
}

/// One of our messages sealed and not yet settled, as the outbox holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SentMessage {
    /// The outbox entry.
    pub id: u64,
    /// The epoch it was sealed in.
    pub epoch: u64,
    /// Its sending generation in that epoch.
    pub generation: u32,
}

/// A message sealed for the room: send `frame`; it is settled by the log
/// at `epoch` and `generation`.
#[derive(Debug, Clone)]
pub struct Sealed {
    /// The signed `Application` frame (request id 0).
    pub frame: Frame,
    /// The epoch it was sealed in.
    pub epoch: u64,
    /// Its sending generation.
    pub generation: u32,
}

/// What an entry of the log is to this device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryBody {
    /// A message, decrypted.
    Text(Vec<u8>),
    /// Our own message, sequenced: the outbox entry `outbox_id` is settled
    /// (its plaintext is the entry's).
    Own {
        /// The outbox entry.
        outbox_id: u64,
    },
    /// A commit moved the room to `epoch`.
    Membership {
        /// The epoch after the commit.
        epoch: u64,
        /// Who joined (by Welcome, or by external commit: its committer).
        added: Vec<u64>,
        /// Who left or was removed.
        removed: Vec<u64>,
    },
    /// A message this device cannot read (sent before it joined, or damaged).
    Unreadable(String),
    /// Erased on the server before this device read it.
    Redacted,
    /// The server voided the commit at `voided_log_index` and every frame
    /// after it up to this one (`docs/RECOVERY.md`): the room is back at
    /// `epoch`, with these membership changes undone.
    CommitVoided {
        /// The voided commit's log index.
        voided_log_index: u64,
        /// The epoch the room is back at.
        epoch: u64,
        /// Who is a member again (the voided commit had removed them).
        added: Vec<u64>,
        /// Who is no longer a member (the voided commit had added them).
        removed: Vec<u64>,
    },
}

/// A history entry made by applying a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// Its log index.
    pub log_index: u64,
    /// Who sent it.
    pub sender: SenderId,
    /// When the server sequenced it, ms since the Unix epoch.
    pub server_time_ms: u64,
    /// What it is.
    pub body: EntryBody,
}

/// How a refusal of our pending commit settles it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitRefusal {
    /// Another commit won the epoch: catch up from `sync_from` and redo
    /// the intent in the new epoch.
    Retry {
        /// The intent to redo.
        intent: Intent,
        /// First log index of the epoch that won.
        sync_from: u64,
    },
    /// Refused for good: the intent stays undone.
    Final,
}

/// One room's log on this device.
#[derive(Debug)]
pub struct RoomLog {
    pub(crate) record: RoomRecord,
    pub(crate) group: Option<RoomGroup>,
    pub(crate) sender_keys: Option<SenderKeyState>,
    /// The room's state machine ([`crate::state`]): every change of
    /// membership, epoch and pending commit goes through it, and an event it
    /// calls illegal is reported as [`RoomLogError::Internal`].
    pub(crate) state: ClientState,
}

/// Moves a room's state machine.
pub(crate) fn step(state: &mut ClientState, event: Event) -> Result<Vec<Action>, RoomLogError> {
    let (next, actions) =
        state.apply(event).map_err(|illegal| RoomLogError::Internal(illegal.to_string()))?;
    *state = next;
    Ok(actions)
}

/// The state a room is in when the device starts (not connected).
fn initial_state(record: &RoomRecord, group: Option<&RoomGroup>) -> ClientState {
    if let (Some(group), Some(log_index)) = (group, record.recovery.stuck_log_index()) {
        let pending_commit = record.pending.as_ref().is_some_and(|pending| pending.intent != Intent::Create);
        return ClientState::Disconnected {
            resume: Resume::Stuck { epoch: group.epoch(), log_index, pending_commit },
        };
    }
    let resume = match (group, &record.pending) {
        (None, _) => Resume::Join,
        (Some(group), Some(pending)) if pending.intent != Intent::Create => {
            Resume::PendingCommit { target_epoch: group.epoch() + 1 }
        }
        (Some(group), _) => Resume::Synchronized { epoch: group.epoch() },
    };
    ClientState::Disconnected { resume }
}

pub(crate) use kalandra_mls::sender_of;

/// The leaf and identity key of member `sender`.
pub(crate) fn member_of(group: &RoomGroup, sender: SenderId) -> Option<(u32, [u8; 32])> {
    group.members().into_iter().find_map(|member| {
        let key: [u8; 32] = member.identity.as_slice().try_into().ok()?;
        (SenderId::from_identity_key(&key) == sender).then_some((member.leaf_index, key))
    })
}

/// The history placeholder of an erased entry: an unsolicited `Error`
/// `Redacted` frame carrying the entry's log index.
pub fn is_erased_placeholder(frame: &Frame) -> bool {
    frame.opcode() == Opcode::Error
        && frame.header().request_id() == 0
        && frame.decode_payload::<payload::Error>().is_ok_and(|e| e.code == ErrorCode::Redacted.to_u16())
}

/// Whether `frame` is an entry of a room's log (as opposed to a reply or a
/// notice).
pub fn is_log_frame(frame: &Frame) -> bool {
    matches!(
        frame.opcode(),
        Opcode::CreateRoom
            | Opcode::Commit
            | Opcode::Proposal
            | Opcode::Application
            | Opcode::ExternalJoin
            | Opcode::CommitVoided
    ) || is_erased_placeholder(frame)
}

impl RoomLog {
    /// The room as checkpointed: its group loaded from the provider's
    /// storage, disconnected.
    pub fn restore(provider: &MlsProvider, record: RoomRecord) -> Result<RoomLog, RoomLogError> {
        // A room to be joined again dropped its group: a group stored under
        // the room's id now is another one (the rejoin's own, built before
        // its answer), never this log's.
        let dropped = record.removed || record.recovery.rejoin_needed();
        let group = if dropped { None } else { RoomGroup::load(provider, record.room_id)? };
        let sender_keys = record.sender_keys.as_deref().map(SenderKeyState::from_bytes).transpose()?;
        let state = initial_state(&record, group.as_ref());
        Ok(RoomLog { record, group, sender_keys, state })
    }

    /// A room we just created (connected, a member at epoch 0); `frame` is
    /// the signed `CreateRoom`, pending until the server confirms it.
    pub fn created(
        provider: &MlsProvider,
        group: RoomGroup,
        frame: Vec<u8>,
    ) -> Result<RoomLog, RoomLogError> {
        let sender_keys = SenderKeyState::from_group(provider, &group)?;
        let record = RoomRecord {
            room_id: group.room_id(),
            next_log_index: 0,
            confirmed: false,
            pending: Some(PendingCommitRecord { frame, epoch: 0, intent: Intent::Create }),
            sender_keys: None,
            removed: false,
            redo: None,
            cover_proposals: false,
            recovery: recovery::Recovery::default(),
            // Anchored by the acknowledgement of the creation.
            chain: chain::ChainRecord::default(),
        };
        // Creation is not a commit: the creator is a member at epoch 0 at once.
        let state = ClientState::Synchronized { epoch: 0 };
        Ok(RoomLog { record, group: Some(group), sender_keys: Some(sender_keys), state })
    }

    /// Joins from a Welcome frame for `room_id` (connected): the log is
    /// read from the entry after the commit that made the Welcome.
    pub fn join_from_welcome(
        provider: &MlsProvider,
        room_id: RoomId,
        frame: &Frame,
    ) -> Result<RoomLog, RoomLogError> {
        let welcome: payload::Welcome =
            frame.decode_payload().map_err(|e| RoomLogError::Protocol(format!("Welcome payload: {e}")))?;
        let group =
            RoomGroup::join_from_welcome(provider, &welcome.welcome, welcome.ratchet_tree.as_deref())?;
        if group.room_id() != room_id.0 {
            return Err(RoomLogError::Protocol("a Welcome for another room was routed to this one".into()));
        }
        let sender_keys = SenderKeyState::from_group(provider, &group)?;
        let mut record = RoomRecord::joined(room_id, frame.header().log_index() + 1);
        record.chain = chain::ChainRecord::anchored(frame.header().log_index(), welcome.log_head);
        let mut state = ClientState::PendingWelcome;
        step(&mut state, Event::WelcomeReceived { epoch: group.epoch() })?;
        let mut room = RoomLog { record, group: Some(group), sender_keys: Some(sender_keys), state };
        room.joined_by_welcome(frame.header().log_index());
        Ok(room)
    }

    /// The room.
    pub fn room_id(&self) -> RoomId {
        RoomId(self.record.room_id)
    }

    /// The next log index to apply.
    pub fn next_log_index(&self) -> u64 {
        self.record.next_log_index
    }

    /// The group's epoch (0 without a group).
    pub fn epoch(&self) -> u64 {
        self.group.as_ref().map_or(0, RoomGroup::epoch)
    }

    /// Whether this device is a member (has the room's group).
    pub fn is_member(&self) -> bool {
        self.group.is_some() && !self.record.removed
    }

    /// The room's MLS group, while a member.
    pub fn group(&self) -> Option<&RoomGroup> {
        self.group.as_ref()
    }

    /// The room's MLS group, to make a commit in.
    pub fn group_mut(&mut self) -> Option<&mut RoomGroup> {
        self.group.as_mut()
    }

    /// The state machine's state.
    pub fn state(&self) -> ClientState {
        self.state
    }

    /// Our commit (or creation) awaiting its fate.
    pub fn pending_commit(&self) -> Option<&PendingCommitRecord> {
        self.record.pending.as_ref()
    }

    /// Whether the server confirmed the room's creation.
    pub fn is_confirmed(&self) -> bool {
        self.record.confirmed
    }

    /// Whether a proposal waits for our commit (never while our own
    /// removal is proposed: we cannot commit that).
    pub fn proposals_to_cover(&self) -> bool {
        self.record.cover_proposals && !self.record.removed && !self.own_removal_pending()
    }

    /// Whether our own removal is proposed and not yet committed.
    pub fn own_removal_pending(&self) -> bool {
        !self.record.removed
            && self.group.as_ref().is_some_and(|g| g.pending_removals().contains(&g.own_leaf_index()))
    }

    /// An intent whose commit another commit beat: the driver redoes it.
    pub fn take_redo(&mut self) -> Option<Intent> {
        self.record.redo.take()
    }

    /// Keeps `intent` to be redone (its commit lost, or its fate unknown).
    pub fn redo_later(&mut self, intent: Intent) {
        self.record.redo = Some(intent);
    }

    /// The intent to redo, if any (not taken).
    pub fn redo(&self) -> Option<&Intent> {
        self.record.redo.as_ref()
    }

    /// The record to checkpoint (with the sender keys' current position).
    pub fn checkpoint_record(&mut self) -> &RoomRecord {
        self.record.sender_keys = self.sender_keys.as_ref().map(SenderKeyState::to_bytes);
        &self.record
    }
}

impl RoomLog {
    /// A connection is up (after one that may have died without a word).
    pub fn connected(&mut self) -> Result<Vec<Action>, RoomLogError> {
        if self.state.is_connected() {
            step(&mut self.state, Event::ConnectionLost)?;
        }
        let actions = step(&mut self.state, Event::Connected)?;
        self.note_actions(&actions);
        Ok(actions)
    }

    /// The connection is gone.
    pub fn connection_lost(&mut self) -> Result<(), RoomLogError> {
        if self.state.is_connected() {
            let actions = step(&mut self.state, Event::ConnectionLost)?;
            // A member's state (and its pending commit) survives a lost connection.
            assert!(actions.is_empty(), "a lost connection changed a member's state: {actions:?}");
        }
        Ok(())
    }

    /// The server confirmed the room's creation (or said it exists: sent
    /// before a crash and sequenced then; the log decides the rest).
    pub fn creation_confirmed(&mut self) {
        self.record.confirmed = true;
        self.record.pending = None;
        self.record.next_log_index = self.record.next_log_index.max(1);
    }

    /// Seals `plaintext` as our next message of the epoch (the sending
    /// chain moves on: checkpoint before sending).
    pub fn seal(
        &mut self,
        plaintext: &[u8],
        signing_key: &ed25519_dalek::SigningKey,
    ) -> Result<Sealed, RoomLogError> {
        self.seal_with_push(plaintext, None, signing_key)
    }

    /// [`RoomLog::seal`] with a push payload already sealed for the room's
    /// current epoch, carried in the frame for members who are offline.
    pub fn seal_with_push(
        &mut self,
        plaintext: &[u8],
        push: Option<bytes::Bytes>,
        signing_key: &ed25519_dalek::SigningKey,
    ) -> Result<Sealed, RoomLogError> {
        let room_id = self.room_id();
        if self.record.removed {
            return Err(RoomLogError::NotMember(room_id));
        }
        let keys = self.sender_keys.as_mut().ok_or(RoomLogError::NotMember(room_id))?;
        let frame = seal_application_with_push(keys, plaintext, push, signing_key)?;
        let generation = frame
            .decode_payload::<Application>()
            .map_err(|e| RoomLogError::Internal(format!("a sealed frame does not decode: {e}")))?
            .generation;
        Ok(Sealed { frame, epoch: keys.epoch(), generation })
    }

    /// We made a commit in `epoch` for `intent` and are about to send `frame`.
    pub fn commit_sent(&mut self, frame: Vec<u8>, epoch: u64, intent: Intent) -> Result<(), RoomLogError> {
        if epoch != self.epoch() {
            return Err(RoomLogError::Internal(format!(
                "a commit made in epoch {epoch} while the group is at {}",
                self.epoch()
            )));
        }
        self.record.pending = Some(PendingCommitRecord { frame, epoch, intent });
        step(&mut self.state, Event::CommitSent { target_epoch: epoch + 1 })?;
        Ok(())
    }

    /// The frame of our pending member commit, when the log (read up to
    /// the head) did not settle it: its fate is unknown, send it again.
    pub fn commit_to_resend(&self) -> Option<&[u8]> {
        let pending = self.record.pending.as_ref()?;
        (pending.intent != Intent::Create && !self.record.removed).then_some(pending.frame.as_slice())
    }

    /// The server refused our pending commit with `error`: the commit is
    /// discarded; a `WrongEpoch`, or `PendingProposals` (a proposal it does
    /// not cover came first), means its intent is redone after catching up.
    pub fn commit_refused(
        &mut self,
        provider: &MlsProvider,
        error: Option<&payload::Error>,
    ) -> Result<CommitRefusal, RoomLogError> {
        let event = match error {
            // The room is behind our epoch only after a void of the epoch we
            // committed in: catch up (the void rolls us back) and redo.
            Some(payload::Error { code, current_epoch: Some(current_epoch), log_index, .. })
                if *code == ErrorCode::WrongEpoch.to_u16() && *current_epoch > self.epoch() =>
            {
                Event::WrongEpoch { current_epoch: *current_epoch, log_index: log_index.unwrap_or(0) }
            }
            _ => Event::CommitRefused,
        };
        let actions = step(&mut self.state, event)?;
        if let Some(group) = self.group.as_mut() {
            if group.has_pending_commit() {
                group.discard_pending_commit(provider)?;
            }
        }
        let pending = self.record.pending.take();
        let retry = [ErrorCode::WrongEpoch, ErrorCode::PendingProposals].map(ErrorCode::to_u16);
        let redo = error.is_some_and(|e| retry.contains(&e.code));
        let sync_from = actions.iter().find_map(|action| match action {
            Action::SyncFrom { log_index } => Some(*log_index),
            _ => None,
        });
        match (redo, pending) {
            (true, Some(pending)) => Ok(CommitRefusal::Retry {
                intent: pending.intent,
                sync_from: sync_from.unwrap_or(self.record.next_log_index),
            }),
            _ => Ok(CommitRefusal::Final),
        }
    }

    /// The room is no longer ours (the server says we are not a member):
    /// its group and keys go.
    pub fn mark_removed(&mut self, provider: &MlsProvider) -> Result<(), RoomLogError> {
        if self.state.is_connected() && self.state.member_epoch().is_some() {
            step(&mut self.state, Event::Removed)?;
        }
        self.record.removed = true;
        self.record.pending = None;
        self.record.redo = None;
        self.sender_keys = None;
        if let Some(group) = self.group.take() {
            group.delete(provider)?;
        }
        Ok(())
    }

    /// Checks a head the server signed against the chain of the frames this
    /// device applied (now, or once it has applied that far). A violation is
    /// also kept in the room's record ([`RoomLog::chain_violation`]). A
    /// device that holds no group for the room (removed, or deleted its group
    /// to rejoin after a commit it could not process) has no server key to
    /// check with: the head is passed over, and the heads after its
    /// (re)joining are checked.
    pub fn check_signed_head(&mut self, signed: &SignedLogHead) -> Result<(), LogHeadError> {
        let room_id = self.room_id();
        let Some(group) = self.group.as_ref() else { return Ok(()) };
        let key = group
            .server_key()
            .and_then(|key| ed25519_dalek::VerifyingKey::from_bytes(&key).ok())
            .ok_or(LogHeadError::NoServerKey(room_id))?;
        signed.verify(room_id, &key).map_err(|_| LogHeadError::BadSignature { room_id })?;
        self.record
            .chain
            .signed(*signed, self.record.next_log_index)
            .map_err(|violation| LogHeadError::Violation { room_id, violation })
    }

    /// An acknowledgement of one of our frames (applied or stepped over
    /// first): its head anchors a chain not yet anchored, and its signed
    /// head is checked.
    pub fn acknowledged(&mut self, ack: &payload::Ack) -> Result<(), LogHeadError> {
        if let Some(head) = ack.log_head {
            self.record.chain.anchor_if_unknown(ack.log_index, head, self.record.next_log_index);
        }
        match &ack.signed_head {
            Some(signed) => self.check_signed_head(signed),
            None => Ok(()),
        }
    }

    /// The end of a history read: its signed head is checked.
    pub fn sync_done(&mut self, done: &payload::SyncDone) -> Result<(), LogHeadError> {
        match &done.log_head {
            Some(signed) => self.check_signed_head(signed),
            None => Ok(()),
        }
    }

    /// The latest head the server signed that matched the frames this
    /// device applied: what members compare out of band (same index, same
    /// head, or one of them holds a different log, with the server's
    /// signature to show).
    pub fn log_head(&self) -> Option<SignedLogHead> {
        self.record.chain.latest_checked()
    }

    /// The chain of the frames this device applied (`None` until anchored).
    pub fn applied_chain(&self) -> Option<LogChain> {
        self.record.chain.chain
    }

    /// The first proof found that the server showed this device a log it
    /// cannot stand behind.
    pub fn chain_violation(&self) -> Option<ChainViolation> {
        self.record.chain.violation
    }

    /// Checks the end of a history read: the server said its frames run to
    /// `next_log_index`, so the cursor must be there at least.
    pub fn history_ended(&self, next_log_index: u64) -> Result<(), RoomLogError> {
        let next = self.record.next_log_index;
        if next < next_log_index {
            return Err(RoomLogError::Protocol(format!(
                "room {}: sync ended at {next_log_index} but frames stop at {next}",
                self.room_id()
            )));
        }
        Ok(())
    }
}

impl RoomLog {
    /// Applies a sequenced frame of the room's log at the cursor. `own` is
    /// this device's sender id; `sent` the outbox entries of this room not
    /// yet settled. Returns the history entry the frame makes, if any.
    pub fn apply(
        &mut self,
        provider: &MlsProvider,
        own: SenderId,
        frame: &Frame,
        sent: impl IntoIterator<Item = SentMessage>,
    ) -> Result<Option<LogEntry>, RoomLogError> {
        let header = frame.header();
        assert_eq!(header.room_id(), self.room_id(), "a frame applied to another room's log");
        let log_index = header.log_index();
        if log_index < self.record.next_log_index {
            return Ok(None);
        }
        if log_index > self.record.next_log_index {
            return Err(RoomLogError::Protocol(format!(
                "room {}: log index {log_index} after {} (a gap)",
                self.room_id(),
                self.record.next_log_index
            )));
        }
        let entry = |body| LogEntry {
            log_index,
            sender: header.sender_id(),
            server_time_ms: header.server_timestamp_ms(),
            body,
        };
        if self.group.is_some() {
            if let Some(handled) = self.recovery_first(provider, frame)? {
                self.record.next_log_index = log_index + 1;
                self.chain_applied(frame);
                return Ok(handled.map(entry));
            }
        }
        let body = match frame.opcode() {
            _ if self.group.is_none() => None,
            Opcode::Commit | Opcode::ExternalJoin => self.apply_commit(provider, own, frame)?,
            Opcode::Proposal => self.apply_proposal(provider, frame)?,
            // An erased entry: the log index stays, the content is gone.
            Opcode::Error => Some(EntryBody::Redacted),
            Opcode::Application if header.sender_id() == own => settle_own(frame, sent),
            Opcode::Application => Some(self.open(frame)),
            _ => None,
        };
        // Only now: a frame that failed to apply is read again.
        self.record.next_log_index = log_index + 1;
        self.chain_applied(frame);
        Ok(body.map(entry))
    }

    /// Our own frame, acknowledged and not echoed to us (`stamped` with the
    /// acknowledgement's index and time, as the log holds it): the cursor
    /// steps over it when it is next, and the chain takes it.
    pub fn step_over_own(&mut self, stamped: &Frame) {
        if stamped.header().log_index() == self.record.next_log_index {
            self.record.next_log_index += 1;
            self.chain_applied(stamped);
        }
    }

    /// The chain takes an applied frame. A violation found here (a signed
    /// head that waited for this index) is kept in the record, where
    /// [`RoomLog::chain_violation`] reports it: the frame itself applied.
    fn chain_applied(&mut self, frame: &Frame) {
        let room_id = self.room_id();
        let _kept_in_the_record = self.record.chain.applied(room_id, frame);
    }

    fn apply_commit(
        &mut self,
        provider: &MlsProvider,
        own: SenderId,
        frame: &Frame,
    ) -> Result<Option<EntryBody>, RoomLogError> {
        let commit_bytes = match frame.opcode() {
            Opcode::Commit => frame.decode_payload::<Commit>().map(|c| c.commit),
            _ => frame.decode_payload::<ExternalJoin>().map(|c| c.commit),
        }
        .map_err(|e| RoomLogError::Protocol(format!("sequenced commit payload: {e}")))?;
        let frame_epoch = frame.header().epoch();
        if frame_epoch < self.epoch() {
            // The cursor starts after the commit that made us a member and
            // our own commits merge only from the log, so every commit after
            // the cursor is of our epoch: an older one means the server
            // sequenced two commits for one epoch.
            return Err(RoomLogError::Protocol(format!(
                "room {}: a commit of epoch {frame_epoch} at log index {}, after epoch {} began \
                 (two commits for one epoch)",
                self.room_id(),
                frame.header().log_index(),
                self.epoch()
            )));
        }
        let ours = frame.header().sender_id() == own
            && self.record.pending.as_ref().is_some_and(|p| p.epoch == frame_epoch);
        let before = self.before_merge(provider)?;
        let sender_keys_before = self.sender_keys.as_ref().map(SenderKeyState::to_bytes);
        let cover_proposals_before = self.record.cover_proposals;
        let own_intent = self.record.pending.as_ref().filter(|_| ours).map(|pending| pending.intent.clone());
        let applied = if ours {
            self.merge_own_commit(provider)?
        } else {
            match self.process_commit(provider, &commit_bytes) {
                Ok(applied) => applied,
                Err(RoomLogError::Process(error)) if recovery::unprocessable(&error) => {
                    return self.commit_unprocessable(provider, frame, &error);
                }
                Err(error) => return Err(error),
            }
        };
        // A commit covers every pending proposal.
        self.record.cover_proposals = false;
        if applied.self_removed {
            self.record.removed = true;
            self.record.pending = None;
            self.sender_keys = None;
            self.record.sender_keys = None;
        } else {
            let group = self.group.as_ref().ok_or(RoomLogError::NotMember(self.room_id()))?;
            self.sender_keys = Some(SenderKeyState::from_group(provider, group)?);
            self.keep_undo(provider, frame, before, sender_keys_before, cover_proposals_before, own_intent)?;
        }
        let senders = |members: &[crate::mls::MemberInfo]| {
            members.iter().filter_map(|m| sender_of(&m.identity)).map(|s| s.0).collect()
        };
        let mut added: Vec<u64> = senders(&applied.added);
        if applied.external {
            // An external commit adds its committer, the joiner.
            added.extend(sender_of(&applied.committer.identity).map(|s| s.0));
        }
        Ok(Some(EntryBody::Membership { epoch: applied.epoch, added, removed: senders(&applied.removed) }))
    }

    /// Our pending commit is in the log: merge it.
    fn merge_own_commit(
        &mut self,
        provider: &MlsProvider,
    ) -> Result<crate::mls::CommitApplied, RoomLogError> {
        let group = self.group.as_mut().ok_or(RoomLogError::NotMember(RoomId(self.record.room_id)))?;
        self.record.pending = None;
        let applied = group.confirm_pending_commit(provider)?;
        step(&mut self.state, Event::CommitAcked { epoch: applied.epoch })?;
        Ok(applied)
    }

    /// Another member's commit: apply it; if it beat ours, keep our intent to redo.
    fn process_commit(
        &mut self,
        provider: &MlsProvider,
        commit_bytes: &[u8],
    ) -> Result<crate::mls::CommitApplied, RoomLogError> {
        let group = self.group.as_mut().ok_or(RoomLogError::NotMember(RoomId(self.record.room_id)))?;
        let applied = match group.process_handshake(provider, commit_bytes)? {
            HandshakeOutcome::CommitApplied(applied) => applied,
            HandshakeOutcome::ProposalStored { .. } => {
                return Err(RoomLogError::Protocol("a Commit frame held a proposal".into()))
            }
        };
        let event = if applied.self_removed {
            Event::Removed
        } else {
            Event::CommitFromOthers { epoch: applied.epoch }
        };
        let actions = step(&mut self.state, event)?;
        let reapply = actions.contains(&Action::ReapplyIntent);
        // Removed, our pending commit is discarded with the group, not redone.
        if !applied.self_removed && reapply != applied.own_commit_discarded {
            return Err(RoomLogError::Internal(
                "the state machine and the MLS group disagree about our pending commit".into(),
            ));
        }
        if reapply {
            // Another commit won the epoch: our intent is redone in the new one.
            self.record.redo = self.record.pending.take().map(|pending| pending.intent);
        }
        Ok(applied)
    }

    fn apply_proposal(
        &mut self,
        provider: &MlsProvider,
        frame: &Frame,
    ) -> Result<Option<EntryBody>, RoomLogError> {
        let Some(group) = self.group.as_mut() else { return Ok(None) };
        if frame.header().epoch() != group.epoch() {
            return Ok(None);
        }
        let proposal = frame
            .decode_payload::<payload::Proposal>()
            .map_err(|e| RoomLogError::Protocol(format!("sequenced proposal payload: {e}")))?;
        let outcome = group.process_handshake(provider, &proposal.proposal)?;
        if let HandshakeOutcome::ProposalStored { .. } = outcome {
            // Covered by our commit, unless it is our own removal
            // (`proposals_to_cover`).
            self.record.cover_proposals = true;
        }
        self.settle_own_removal(provider)?;
        Ok(None)
    }

    /// Our own removal is proposed: our pending commit of this epoch (which
    /// cannot cover it) and any intent to redo are dropped, and when every
    /// member's removal is pending the room is left ([`RoomLog::mark_removed`]).
    /// Returns whether the room was left. Also called after a catch-up, for
    /// a removal read before this rule existed.
    pub fn settle_own_removal(&mut self, provider: &MlsProvider) -> Result<bool, RoomLogError> {
        if !self.own_removal_pending() {
            return Ok(false);
        }
        let Some(group) = self.group.as_ref() else { return Ok(false) };
        let removals = group.pending_removals();
        let everyone = group.members().iter().all(|member| removals.contains(&member.leaf_index));
        let epoch = group.epoch();
        self.record.redo = None;
        let stale_commit =
            self.record.pending.as_ref().is_some_and(|p| p.intent != Intent::Create && p.epoch == epoch);
        if stale_commit && matches!(self.state, ClientState::PendingCommit { kind: CommitKind::Member, .. }) {
            self.commit_refused(provider, None)?;
        }
        if everyone {
            self.mark_removed(provider)?;
        }
        Ok(everyone)
    }

    /// Opens another member's message.
    fn open(&mut self, frame: &Frame) -> EntryBody {
        let Some(group) = self.group.as_ref() else { return EntryBody::Unreadable("not a member".into()) };
        let frame_epoch = frame.header().epoch();
        match (&mut self.sender_keys, member_of(group, frame.header().sender_id())) {
            (Some(keys), Some((leaf, identity_key))) if keys.epoch() == frame_epoch => {
                match open_application(keys, frame, leaf, &identity_key) {
                    Ok(plaintext) => EntryBody::Text(plaintext),
                    Err(error) => EntryBody::Unreadable(error.to_string()),
                }
            }
            (_, None) => EntryBody::Unreadable("sender is not a member".into()),
            _ => EntryBody::Unreadable(format!("sent in epoch {frame_epoch}, before this device joined")),
        }
    }
}

/// Our own message in the log settles the outbox entry sealed at its epoch
/// and generation; without one it was recorded when it was acknowledged.
fn settle_own(frame: &Frame, sent: impl IntoIterator<Item = SentMessage>) -> Option<EntryBody> {
    #[cfg(feature = "injected-bugs")]
    if crate::bugs::planted().own_message_unsettled_by_log {
        return None;
    }
    let generation = frame.decode_payload::<Application>().ok()?.generation;
    let epoch = frame.header().epoch();
    sent.into_iter()
        .find(|s| s.epoch == epoch && s.generation == generation)
        .map(|s| EntryBody::Own { outbox_id: s.id })
}
