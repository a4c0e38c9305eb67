//! Cryptographic erasure through the room core: redaction of one entry by
//! its sender or a moderator, and the periodic retention sweep.
//!
//! Policy (the store itself erases whatever it is asked to):
//! - only application frames are erasable. Handshake frames (`CreateRoom`,
//!   `Commit`, `Proposal`, `ExternalJoin`) hold no application content and
//!   are replayed on restart to rebuild the room's MLS public state;
//! - [`RedactAuthority::Sender`] may erase only frames whose header names
//!   the actor as sender; [`RedactAuthority::Moderator`] may erase any
//!   erasable frame of the room, [`RedactAuthority::Operator`] (the admin
//!   API) any erasable frame. This module does not check roles: a caller
//!   passing `Moderator` has checked that the actor holds the role
//!   ([`Node::member_redact`] asks the room's shard);
//! - every redaction that erases something is recorded in the audit log
//!   (actor, room, index, the frame's sender, time, reason) in the same
//!   durable transaction as the erasure, and so is every retention change
//!   ([`Node::set_retention`]). Entries a retention pass erases are not
//!   recorded one by one: the room's recorded retention period accounts
//!   for them;
//! - erasure is idempotent: erasing an erased entry reports
//!   [`RedactOutcome::AlreadyErased`];
//! - the log index stays: history carries a placeholder in its place (an
//!   `Error` frame with code `Redacted`, see [`erased_placeholder`](crate::room::erased_placeholder)).
//!
//! Order of an erasure: the shard first replaces the entry in its in-memory
//! recent frames (so no subscriber catching up from memory gets it), then
//! the store destroys the data key and replaces the record by a tombstone
//! in one durable transaction. A history read that fetched the entry before
//! that transaction may still deliver it; frames already delivered to
//! clients are beyond the server's reach.

use std::sync::Arc;

use bytes::Bytes;
use kalandra_proto::header::offset;
use kalandra_proto::{payload, ErrorCode, Frame, RoomId, SenderId};
use tokio::sync::oneshot;

use crate::node::{Command, Node, Standing};
use crate::room::audit::{ActorKind, AuditAction, AuditEvent, AuditRecord};
use crate::room::{error_frame, reply_frame};
use crate::store::retention::{erasable_opcode, expired};
use crate::store::sealing::routing_u64;
use crate::store::{
    EntryContent, ErasureCause, ReadError, RedactOutcome, Redaction, RetentionError, RoomRetention,
    StoredEntry,
};

/// Every bound of erasure in the room core, in one place.
pub mod limits {
    /// Log entries one retention pass reads at most (over all rooms).
    pub const RETENTION_PASS_ENTRIES_MAX: usize = 4096;
    /// Rooms one retention pass visits at most.
    pub const RETENTION_PASS_ROOMS_MAX: usize = 1024;
    /// Entries read from one room per store read during a sweep.
    pub const RETENTION_READ_ENTRIES_MAX: usize = 256;
    /// Interval between retention passes of [`retention_loop`](super::retention_loop), ms.
    pub const RETENTION_INTERVAL_MS_DEFAULT: u64 = 60_000;

    const _: () = assert!(RETENTION_READ_ENTRIES_MAX <= crate::store::limits::READ_RANGE_ENTRIES_MAX);
    const _: () = assert!(RETENTION_READ_ENTRIES_MAX <= crate::store::limits::REDACT_ENTRIES_PER_CALL_MAX);
    const _: () = assert!(RETENTION_PASS_ROOMS_MAX <= crate::store::limits::RETENTION_ROOMS_PAGE_MAX);
    const _: () = assert!(RETENTION_PASS_ENTRIES_MAX >= RETENTION_READ_ENTRIES_MAX);
}

use limits::*;

/// On whose authority an entry is redacted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RedactAuthority {
    /// The actor claims to be the frame's sender: checked against the
    /// frame's header.
    Sender,
    /// The actor is a moderator of the room: the caller has checked the
    /// role; any erasable frame of the room may be redacted.
    Moderator,
    /// The operator, through the admin API: any erasable frame of any
    /// room (the actor id is not used).
    Operator,
}

/// A redaction that took effect (or had taken effect before).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedactReport {
    /// The erased entry.
    pub log_index: u64,
    /// The entry's MLS epoch.
    pub epoch: u64,
    /// When the content was erased (now, or the earlier erasure's time).
    pub erased_at_ms: u64,
    /// Whether this call erased it.
    pub outcome: RedactOutcome,
    /// The audit record of this erasure (`None` when it had been erased
    /// before: nothing was done, nothing is recorded).
    pub audit: Option<AuditRecord>,
}

/// Why a redaction was refused or failed. Nothing was erased.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RedactError {
    /// The room does not exist.
    #[error("room {room_id} does not exist")]
    UnknownRoom {
        /// The room.
        room_id: RoomId,
    },
    /// The index is not a durable entry of the room (yet).
    #[error("log index {log_index} is beyond the room's durable head {next_log_index}")]
    UnknownLogIndex {
        /// The index asked for.
        log_index: u64,
        /// The room's next durable index.
        next_log_index: u64,
    },
    /// Over the wire, only current members redact: not someone who left
    /// or was removed, nor one whose removal is pending.
    #[error("{member} is not a member of the room")]
    NotMember {
        /// The requester.
        member: SenderId,
    },
    /// A banned user redacts nothing of the room, its own messages
    /// included (the room policy, `docs/MODERATION.md`).
    #[error("{member} is banned from the room")]
    Banned {
        /// The requester.
        member: SenderId,
    },
    /// A sender may redact only their own frames.
    #[error("log index {log_index} was not sent by the requester")]
    NotSender {
        /// The index asked for.
        log_index: u64,
    },
    /// The entry is a handshake frame, which is never erased.
    #[error("log index {log_index} holds a frame that is never erased (opcode {opcode:#06x})")]
    NotErasable {
        /// The index asked for.
        log_index: u64,
        /// The frame's opcode value.
        opcode: u16,
    },
    /// Storage failed; the node stops and recovers on restart.
    #[error("storage failure: {0}")]
    Storage(String),
    /// A bug or corrupt data.
    #[error("internal error: {0}")]
    Internal(String),
}

impl RedactError {
    /// The wire error code for the requester.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            Self::UnknownRoom { .. } => ErrorCode::UnknownRoom,
            Self::UnknownLogIndex { .. } => ErrorCode::UnknownLogIndex,
            Self::NotMember { .. } => ErrorCode::NotMember,
            Self::Banned { .. } => ErrorCode::Banned,
            Self::NotSender { .. } | Self::NotErasable { .. } => ErrorCode::Forbidden,
            Self::Storage(_) => ErrorCode::StorageUnavailable,
            Self::Internal(_) => ErrorCode::Internal,
        }
    }
}

/// What one retention pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetentionPassReport {
    /// Rooms with a retention period visited.
    pub rooms_visited: u64,
    /// Entries read.
    pub entries_read: u64,
    /// Entries erased.
    pub entries_erased: u64,
}

/// A retention pass stopped: storage failed or data is corrupt.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("retention pass in room {room_id:?}: {detail}")]
pub struct RetentionPassError {
    /// The room being swept, if any.
    pub room_id: Option<RoomId>,
    /// What failed.
    pub detail: String,
}

fn read_failed(error: &ReadError) -> RedactError {
    match error {
        ReadError::Storage(failure) => RedactError::Storage(failure.to_string()),
        ReadError::Internal(violation) => RedactError::Internal(violation.to_string()),
    }
}

impl Node {
    /// Erases the content of `room_id`'s entry `log_index` on `actor`'s
    /// `authority` (see the module documentation for the policy): the data
    /// key is destroyed and the record replaced by a tombstone, durably,
    /// before this returns `Ok`. Idempotent.
    pub async fn redact(
        &self,
        room_id: RoomId,
        log_index: u64,
        actor: SenderId,
        authority: RedactAuthority,
    ) -> Result<RedactReport, RedactError> {
        self.redact_with_reason(room_id, log_index, actor, authority, "").await
    }

    /// [`Node::redact`] with the reason given, kept in the audit record.
    /// Every erasure it makes is recorded in the audit log, in the same
    /// durable transaction as the erasure.
    pub async fn redact_with_reason(
        &self,
        room_id: RoomId,
        log_index: u64,
        actor: SenderId,
        authority: RedactAuthority,
        reason: &str,
    ) -> Result<RedactReport, RedactError> {
        let store = Arc::clone(&self.store);
        let read = tokio::task::spawn_blocking(move || -> Result<(Option<StoredEntry>, u64), ReadError> {
            let entry = store.read_range(room_id, log_index, 1)?.into_iter().next();
            let next_log_index = store.next_log_index(room_id)?;
            Ok((entry, next_log_index))
        })
        .await
        .map_err(|error| RedactError::Internal(error.to_string()))?;
        let (entry, next_log_index) = read.map_err(|error| {
            if matches!(error, ReadError::Storage(_)) {
                self.storage_failed();
            }
            read_failed(&error)
        })?;
        let asked = RedactAsk { room_id, log_index, actor, authority, reason };
        let erasure = match plan_redaction(&asked, entry, next_log_index, (self.clock)())? {
            RedactPlan::AlreadyErased(report) => return Ok(report),
            RedactPlan::Erase(erasure) => erasure,
        };
        self.hide_in_shard(room_id, vec![log_index]).await?;
        let (outcomes, audit) = self
            .erase_in_store(room_id, vec![log_index], erasure.redaction, Some(erasure.event.clone()))
            .await?;
        erasure.report(&outcomes, audit)
    }

    /// A member's `Redact` over the wire: on the authority of a moderator
    /// when `member` currently holds the room's admin or moderator role
    /// (checked by the room's shard), otherwise as the frame's sender; a
    /// requester who is not a current member (left, removed, removal
    /// pending) or is banned redacts nothing.
    pub async fn member_redact(
        &self,
        room_id: RoomId,
        log_index: u64,
        member: SenderId,
        reason: &str,
    ) -> Result<RedactReport, RedactError> {
        let (reply, answer) = oneshot::channel();
        if !self.send(room_id, Command::RedactStanding { room_id, member, reply }).await {
            return Err(RedactError::Internal("the room core has stopped".into()));
        }
        let standing = answer.await.map_err(|_| RedactError::Internal("the room core has stopped".into()))?;
        let authority = member_authority(room_id, member, standing)?;
        self.redact_with_reason(room_id, log_index, member, authority, reason).await
    }

    /// Sets (`Some`, milliseconds) or removes (`None`) the room's retention
    /// period. Entries older than the period are erased by later retention
    /// passes.
    ///
    /// Only the operator sets retention: the change is recorded in the audit
    /// log as the operator's, in the same durable transaction, and its
    /// record returned.
    pub async fn set_retention(
        &self,
        room_id: RoomId,
        retention_ms: Option<u64>,
    ) -> Result<AuditRecord, RetentionError> {
        let event = AuditEvent {
            time_ms: (self.clock)(),
            actor_kind: ActorKind::Operator,
            actor_id: None,
            action: if retention_ms.is_some() {
                AuditAction::SetRetention
            } else {
                AuditAction::ClearRetention
            },
            room: Some(room_id.to_string()),
            target: None,
            role: None,
            reason: None,
            until_ms: None,
            log_index: None,
            retention_ms,
        };
        let store = Arc::clone(&self.store);
        let result =
            tokio::task::spawn_blocking(move || store.set_retention_audited(room_id, retention_ms, &event))
                .await
                .map_err(|error| {
                    RetentionError::Internal(crate::store::InvariantViolation(error.to_string()))
                })?;
        if let Err(RetentionError::Storage(failure)) = &result {
            tracing::error!(%room_id, %failure, "storage failed changing retention; the node stops and recovers on restart");
            self.storage_failed();
        }
        result
    }

    /// The room's retention setting, if any.
    pub async fn retention(&self, room_id: RoomId) -> Result<Option<RoomRetention>, RetentionError> {
        let store = Arc::clone(&self.store);
        tokio::task::spawn_blocking(move || store.retention(room_id))
            .await
            .map_err(|error| RetentionError::Internal(crate::store::InvariantViolation(error.to_string())))?
    }

    /// Erases this replica's copies of entries the room's authority erased
    /// (`log_indices`, all durable here), moving the replica's cursor of
    /// the authority's erasure journal to `cursor` if given, in the same
    /// transaction. Entries held without content need nothing; handshake
    /// frames are not erased (returned in the plan's `refused`).
    pub async fn erase_in_replica(
        &self,
        room_id: RoomId,
        log_indices: Vec<u64>,
        cursor: Option<u64>,
    ) -> Result<ReplicaErasurePlan, RedactError> {
        let store = Arc::clone(&self.store);
        let read = tokio::task::spawn_blocking(move || -> Result<Vec<StoredEntry>, ReadError> {
            let mut entries = Vec::with_capacity(log_indices.len());
            for log_index in log_indices {
                entries.extend(store.read_range(room_id, log_index, 1)?.into_iter().take(1));
            }
            Ok(entries)
        })
        .await
        .map_err(|error| RedactError::Internal(error.to_string()))?;
        let entries = read.map_err(|error| read_failed(&error))?;
        let plan = plan_replica_erasure(&entries);
        if !plan.erase.is_empty() {
            self.hide_in_shard(room_id, plan.erase.clone()).await?;
        }
        let redaction = Redaction { erased_at_ms: (self.clock)(), cause: ErasureCause::Authority };
        let (store, erase) = (Arc::clone(&self.store), plan.erase.clone());
        let result = tokio::task::spawn_blocking(move || match cursor {
            Some(cursor) => store.redact_replicated(room_id, &erase, &redaction, cursor).map(|_| ()),
            None if erase.is_empty() => Ok(()),
            None => store.redact(room_id, &erase, &redaction).map(|_| ()),
        })
        .await
        .map_err(|error| RedactError::Internal(error.to_string()))?;
        result.map_err(|error| {
            if matches!(error, crate::store::RedactError::Storage(_)) {
                self.storage_failed();
            }
            store_redact_error(error)
        })?;
        Ok(plan)
    }

    /// How far this server's replica of `room_id` applied its authority's
    /// erasure journal (0: nothing yet, or no replica).
    pub async fn replica_erasure_cursor(&self, room_id: RoomId) -> Result<u64, RedactError> {
        let store = Arc::clone(&self.store);
        tokio::task::spawn_blocking(move || store.replica_erasure_cursor(room_id))
            .await
            .map_err(|error| RedactError::Internal(error.to_string()))?
            .map_err(|error| read_failed(&error))
    }

    /// The erasures journaled for `room_id` after `after_seq`: one page.
    pub async fn erasures_after(
        &self,
        room_id: RoomId,
        after_seq: u64,
    ) -> Result<Vec<crate::store::JournaledErasure>, RedactError> {
        let store = Arc::clone(&self.store);
        tokio::task::spawn_blocking(move || {
            store.erasures_after(room_id, after_seq, crate::store::limits::ERASURES_PAGE_MAX)
        })
        .await
        .map_err(|error| RedactError::Internal(error.to_string()))?
        .map_err(|error| read_failed(&error))
    }

    /// Tells the room's shard to drop the entries from its recent frames.
    async fn hide_in_shard(&self, room_id: RoomId, log_indices: Vec<u64>) -> Result<(), RedactError> {
        let (done, hidden) = oneshot::channel();
        if !self.send(room_id, Command::Erased { room_id, log_indices, done }).await {
            return Err(RedactError::Internal("the room core has stopped".into()));
        }
        hidden.await.map_err(|_| RedactError::Internal("the room core has stopped".into()))
    }

    /// Erases the entries, with `event` in the audit log if given (and
    /// something was erased), in one durable transaction; then tells the
    /// room's shard, which tells the room's replica feeds.
    async fn erase_in_store(
        &self,
        room_id: RoomId,
        log_indices: Vec<u64>,
        redaction: Redaction,
        event: Option<AuditEvent>,
    ) -> Result<(Vec<RedactOutcome>, Option<AuditRecord>), RedactError> {
        let (store, asked) = (Arc::clone(&self.store), log_indices.clone());
        let result = tokio::task::spawn_blocking(move || match &event {
            Some(event) => store.redact_audited(room_id, &log_indices, &redaction, event),
            None => store.redact(room_id, &log_indices, &redaction).map(|outcomes| (outcomes, None)),
        })
        .await
        .map_err(|error| RedactError::Internal(error.to_string()))?;
        let (outcomes, audit) = result.map_err(|error| {
            if matches!(error, crate::store::RedactError::Storage(_)) {
                tracing::error!(%room_id, %error, "storage failed erasing entries; the node stops and recovers on restart");
                self.storage_failed();
            }
            store_redact_error(error)
        })?;
        let erased = crate::store::erased_indices(&asked, &outcomes);
        if !erased.is_empty() {
            self.send(room_id, Command::ErasureDurable { room_id, log_indices: erased }).await;
        }
        Ok((outcomes, audit))
    }
}

/// What a replica does with its authority's erasure of some entries it
/// holds, decided over what it stores there ([`plan_replica_erasure`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplicaErasurePlan {
    /// Application frames held with their content: erase them.
    pub erase: Vec<u64>,
    /// Entries that hold no application content (a handshake frame):
    /// the authority asked what no erasure may do; nothing is erased.
    pub refused: Vec<u64>,
}

/// Decides a replica's part of its authority's erasure: `entries` are what
/// the replica stores at the erased indices. An entry erased already, or
/// held as its placeholder (the authority had erased it before the
/// replica read it), needs nothing; an application frame is erased; any
/// other frame is refused (it carries no content to erase, and recovery
/// replays it).
pub fn plan_replica_erasure(entries: &[StoredEntry]) -> ReplicaErasurePlan {
    let mut plan = ReplicaErasurePlan::default();
    for entry in entries {
        let EntryContent::Frame(frame) = &entry.content else { continue };
        let opcode = crate::store::sealing::routing_u16(frame, offset::OPCODE);
        if erasable_opcode(opcode) {
            plan.erase.push(entry.log_index);
        } else if opcode != Some(kalandra_proto::Opcode::Error.to_u16()) {
            plan.refused.push(entry.log_index);
        }
    }
    plan
}

/// A redaction as asked: which entry, by whom, on what authority, why.
#[derive(Clone, Copy, Debug)]
pub struct RedactAsk<'a> {
    /// The room.
    pub room_id: RoomId,
    /// The entry.
    pub log_index: u64,
    /// Who asks (ignored for the operator).
    pub actor: SenderId,
    /// On whose authority.
    pub authority: RedactAuthority,
    /// The reason, for the audit record.
    pub reason: &'a str,
}

/// What a redaction comes to, decided before anything is erased.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RedactPlan {
    /// The entry was erased before: nothing is done, nothing recorded.
    AlreadyErased(RedactReport),
    /// Hide the entry in the room's shard, then erase it in the store with
    /// its audit record (`Store::redact_audited`).
    Erase(PlannedErasure),
}

/// An erasure decided by [`plan_redaction`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedErasure {
    /// The entry.
    pub log_index: u64,
    /// The entry's MLS epoch.
    pub epoch: u64,
    /// The tombstone to store.
    pub redaction: Redaction,
    /// The audit record to store with it.
    pub event: AuditEvent,
}

impl PlannedErasure {
    /// The report once the store erased it (`outcomes` and `audit` from
    /// `Store::redact_audited`).
    pub fn report(
        &self,
        outcomes: &[RedactOutcome],
        audit: Option<AuditRecord>,
    ) -> Result<RedactReport, RedactError> {
        let outcome = outcomes.first().copied().ok_or_else(|| RedactError::Internal("no outcome".into()))?;
        Ok(RedactReport {
            log_index: self.log_index,
            epoch: self.epoch,
            erased_at_ms: self.redaction.erased_at_ms,
            outcome,
            audit,
        })
    }
}

/// Decides a redaction (the policy of this module, without I/O): `entry`
/// is what the store holds at `ask.log_index` (if anything) and
/// `next_log_index` the room's durable head, both read just before;
/// `now_ms` is the erasure's time.
pub fn plan_redaction(
    ask: &RedactAsk<'_>,
    entry: Option<StoredEntry>,
    next_log_index: u64,
    now_ms: u64,
) -> Result<RedactPlan, RedactError> {
    let RedactAsk { room_id, log_index, actor, authority, reason } = *ask;
    let Some(entry) = entry.filter(|entry| entry.log_index == log_index) else {
        return Err(if next_log_index == 0 {
            RedactError::UnknownRoom { room_id }
        } else {
            RedactError::UnknownLogIndex { log_index, next_log_index }
        });
    };
    let routing = entry.routing();
    let epoch = routing_u64(routing, offset::EPOCH).unwrap_or(0);
    if let EntryContent::Erased(erasure) = &entry.content {
        return Ok(RedactPlan::AlreadyErased(RedactReport {
            log_index,
            epoch,
            erased_at_ms: erasure.redaction.erased_at_ms,
            outcome: RedactOutcome::AlreadyErased,
            audit: None,
        }));
    }
    let opcode = crate::store::sealing::routing_u16(routing, offset::OPCODE);
    if !erasable_opcode(opcode) {
        return Err(RedactError::NotErasable { log_index, opcode: opcode.unwrap_or(0) });
    }
    let sender = routing_u64(routing, offset::SENDER_ID);
    let cause = match authority {
        RedactAuthority::Sender if sender != Some(actor.0) => {
            return Err(RedactError::NotSender { log_index })
        }
        // A moderator erasing their own frame does so as its sender.
        RedactAuthority::Sender | RedactAuthority::Moderator if sender == Some(actor.0) => {
            ErasureCause::Sender { actor: actor.0 }
        }
        RedactAuthority::Sender | RedactAuthority::Moderator => ErasureCause::Moderator { actor: actor.0 },
        RedactAuthority::Operator => ErasureCause::Operator,
    };
    let redaction = Redaction { erased_at_ms: now_ms, cause };
    let (actor_kind, actor_id) = match authority {
        RedactAuthority::Operator => (ActorKind::Operator, None),
        RedactAuthority::Sender | RedactAuthority::Moderator => (ActorKind::Member, Some(actor.0)),
    };
    let event = AuditEvent {
        time_ms: now_ms,
        actor_kind,
        actor_id,
        action: AuditAction::Redact,
        room: Some(room_id.to_string()),
        target: sender,
        role: None,
        reason: (!reason.is_empty()).then(|| reason.to_owned()),
        until_ms: None,
        log_index: Some(log_index),
        retention_ms: None,
    };
    Ok(RedactPlan::Erase(PlannedErasure { log_index, epoch, redaction, event }))
}

/// The authority a member's `Redact` carries, from where the member stands
/// in the room now (`standing`, as the room's shard answers
/// [`crate::room::Shard::redact_standing`]; `None`: no such room): a
/// moderator's, a sender's, or none (not a current member, or banned).
pub fn member_authority(
    room_id: RoomId,
    member: SenderId,
    standing: Option<Standing>,
) -> Result<RedactAuthority, RedactError> {
    match standing {
        None => Err(RedactError::UnknownRoom { room_id }),
        Some(Standing::Moderator) => Ok(RedactAuthority::Moderator),
        Some(Standing::Member) => Ok(RedactAuthority::Sender),
        Some(Standing::NotMember) => Err(RedactError::NotMember { member }),
        Some(Standing::Banned) => Err(RedactError::Banned { member }),
    }
}

/// A store's refusal of an erasure, as the requester is told.
pub fn store_redact_error(error: crate::store::RedactError) -> RedactError {
    match error {
        crate::store::RedactError::UnknownRoom { room_id } => RedactError::UnknownRoom { room_id },
        crate::store::RedactError::IndexOutOfRange { log_index, next_log_index, .. } => {
            RedactError::UnknownLogIndex { log_index, next_log_index }
        }
        crate::store::RedactError::Storage(failure) => RedactError::Storage(failure.to_string()),
        other => RedactError::Internal(other.to_string()),
    }
}

/// The `Redact` payload of a member's frame, or the `Error` frame that
/// answers a malformed one.
pub fn redact_request(frame: &Frame) -> Result<payload::Redact, Bytes> {
    let header = frame.header();
    frame.decode_payload().map_err(|error| {
        error_frame(header.room_id(), header.request_id(), ErrorCode::MalformedPayload, &error.to_string())
    })
}

/// The reply to a member's `Redact`: an `Ack` naming the erased index
/// (with its epoch and the erasure's time), or an `Error`.
pub fn redact_reply(room_id: RoomId, request_id: u32, result: &Result<RedactReport, RedactError>) -> Bytes {
    match result {
        Ok(report) => {
            let ack = payload::Ack {
                log_index: report.log_index,
                epoch: report.epoch,
                server_time_ms: report.erased_at_ms,
                log_head: None,
                signed_head: None,
            };
            reply_frame(room_id, request_id, &ack)
        }
        Err(error) => error_frame(room_id, request_id, error.error_code(), &error.to_string()),
    }
}

/// Position of the retention sweep across passes, so that one pass's
/// budget is spread over all rooms in turn.
#[derive(Debug, Default)]
pub struct RetentionSweeper {
    /// The last room visited; the next pass starts after it.
    after: Option<RoomId>,
}

impl RetentionSweeper {
    /// A sweeper starting at the first room.
    pub fn new() -> Self {
        Self::default()
    }

    /// One bounded pass at `now_ms`: visits rooms with a retention period
    /// (after where the last pass stopped, wrapping around), reads at most
    /// `entries_max` entries (capped at [`RETENTION_PASS_ENTRIES_MAX`]) and
    /// erases the expired application frames among them.
    pub async fn pass(
        &mut self,
        node: &Node,
        now_ms: u64,
        entries_max: usize,
    ) -> Result<RetentionPassReport, RetentionPassError> {
        let mut budget = entries_max.min(RETENTION_PASS_ENTRIES_MAX);
        let mut report = RetentionPassReport::default();
        let store = Arc::clone(&node.store);
        let after = self.after;
        let rooms = tokio::task::spawn_blocking(move || -> Result<Vec<RoomRetention>, RetentionError> {
            let mut rooms = store.retention_rooms(after, RETENTION_PASS_ROOMS_MAX)?;
            if rooms.len() < RETENTION_PASS_ROOMS_MAX && after.is_some() {
                // Wrap around to the rooms before the start.
                let wrapped = store.retention_rooms(None, RETENTION_PASS_ROOMS_MAX - rooms.len())?;
                rooms.extend(wrapped.into_iter().take_while(|room| Some(room.room_id) <= after));
            }
            Ok(rooms)
        })
        .await
        .map_err(|error| RetentionPassError { room_id: None, detail: error.to_string() })?
        .map_err(|error| RetentionPassError { room_id: None, detail: error.to_string() })?;
        for room in rooms {
            if budget == 0 {
                break;
            }
            self.after = Some(room.room_id);
            report.rooms_visited += 1;
            let (read, erased) = sweep_room(node, room, now_ms, budget.min(RETENTION_READ_ENTRIES_MAX))
                .await
                .map_err(|detail| RetentionPassError { room_id: Some(room.room_id), detail })?;
            budget = budget.saturating_sub(read.max(1));
            report.entries_read += read as u64;
            report.entries_erased += erased as u64;
        }
        Ok(report)
    }
}

/// Sweeps one room once: returns entries read and erased.
async fn sweep_room(
    node: &Node,
    room: RoomRetention,
    now_ms: u64,
    entries_max: usize,
) -> Result<(usize, usize), String> {
    let store = Arc::clone(&node.store);
    let from = room.swept_next_log_index;
    let read = tokio::task::spawn_blocking(move || store.read_range(room.room_id, from, entries_max))
        .await
        .map_err(|error| error.to_string())?;
    let entries = read.map_err(|error| {
        if matches!(error, ReadError::Storage(_)) {
            node.storage_failed();
        }
        error.to_string()
    })?;
    let plan = expired(now_ms, room.retention_ms, &entries);
    let erased = plan.erase.len();
    if !plan.erase.is_empty() {
        node.hide_in_shard(room.room_id, plan.erase.clone()).await.map_err(|error| error.to_string())?;
        let redaction = Redaction { erased_at_ms: now_ms, cause: ErasureCause::Retention };
        node.erase_in_store(room.room_id, plan.erase, redaction, None)
            .await
            .map_err(|error| error.to_string())?;
    }
    if let Some(swept_next) = plan.swept_next_log_index {
        let store = Arc::clone(&node.store);
        tokio::task::spawn_blocking(move || store.advance_retention(room.room_id, swept_next))
            .await
            .map_err(|error| error.to_string())?
            .map_err(|error| error.to_string())?;
    }
    Ok((entries.len(), erased))
}

/// Runs a retention pass every `interval_ms` (at least one second) with
/// the wall clock `node` was started with, until the task is dropped. A
/// failed pass is logged and retried at the next interval.
pub async fn retention_loop(node: Node, interval_ms: u64) {
    let mut interval = tokio::time::interval(std::time::Duration::from_millis(interval_ms.max(1_000)));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sweeper = RetentionSweeper::new();
    loop {
        interval.tick().await;
        let now_ms = (node.clock)();
        match sweeper.pass(&node, now_ms, RETENTION_PASS_ENTRIES_MAX).await {
            Ok(report) if report.entries_erased > 0 => {
                tracing::info!(
                    rooms = report.rooms_visited,
                    read = report.entries_read,
                    erased = report.entries_erased,
                    "retention pass erased expired entries"
                );
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "retention pass failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use kalandra_proto::{FrameHeaderBuf, Opcode};

    use super::*;
    use crate::store::{Erasure, ErasureCause};

    const ROOM: RoomId = RoomId([4; 16]);

    fn held(log_index: u64, opcode: Opcode) -> StoredEntry {
        let mut header = FrameHeaderBuf::new(opcode);
        header.set_room_id(ROOM).set_log_index(log_index);
        let frame = Bytes::copy_from_slice(header.as_bytes());
        StoredEntry { room_id: ROOM, log_index, content: EntryContent::Frame(frame) }
    }

    #[test]
    fn a_replica_erases_only_application_content_its_authority_erased() {
        let tombstone = Erasure {
            routing: Bytes::new(),
            redaction: Redaction { erased_at_ms: 1, cause: ErasureCause::Authority },
            frame_digest: None,
        };
        let entries = [
            held(1, Opcode::Commit),
            held(2, Opcode::Application),
            StoredEntry { room_id: ROOM, log_index: 3, content: EntryContent::Erased(tombstone) },
            // The placeholder the replica was sent for an entry erased before it read it.
            held(4, Opcode::Error),
            held(5, Opcode::Application),
            held(0, Opcode::CreateRoom),
        ];
        let plan = plan_replica_erasure(&entries);
        assert_eq!(plan, ReplicaErasurePlan { erase: vec![2, 5], refused: vec![1, 0] });
        assert_eq!(plan_replica_erasure(&[]), ReplicaErasurePlan::default());
    }
}
