//! [`Store`] in memory, for tests: same semantics as
//! [`RedbStore`](super::RedbStore) (entries are sealed the same way, keys
//! kept in a map of their own), nothing survives the process.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Mutex, MutexGuard};

use bytes::Bytes;
use kalandra_proto::federation::DomainName;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

use super::limits::{
    ERASURES_PAGE_MAX, KEY_PACKAGES_PER_USER_MAX, REMOTE_ROOMS_MAX, REMOTE_USERS_MAX, REMOTE_USERS_PAGE_MAX,
    RETENTION_ROOMS_PAGE_MAX, ROOM_HEADS_PAGE_MAX, WELCOMES_PER_RECIPIENT_MAX,
};
use super::sealing::{self, DataKey, Record};
use super::RemoteRecordError;
use super::{
    check_read_dense, distinct_recipients, handed_out_claims_to_drop, key_package_key,
    key_package_key_bounds, key_package_ref_of, read_bytes_allow, read_count_cap, validate_batch,
    validate_group_info, validate_key_package_ref, validate_key_package_upload, validate_redaction,
    validate_retention_period, validate_room_metadata, validate_sweep_position, validate_welcome,
    welcome_page_allows, AppendError, ClaimedKeyPackage, EntryContent, GroupInfoError, GroupInfoRecord,
    HandedOutClaim, InvariantViolation, JournaledErasure, KeyPackageCount, KeyPackageError, KeyPackageUpload,
    LogEntry, LogIndex, PendingWelcome, ReadError, RedactError, RedactOutcome, Redaction, RetentionError,
    RoomHead, RoomId, RoomMetadata, RoomMetadataError, RoomRetention, Store, StoredEntry, StoredWelcome,
    UserId, WelcomeCounts, WelcomeError, WelcomeId, KEY_PACKAGE_KEY_BYTES,
};
use super::{moderation_key, seal_audit, ModerationChange, ModerationStoreError, RoomModeration, StoredBan};
use crate::room::audit::{AuditEvent, AuditHead, AuditRecord, AUDIT_PAGE_RECORDS_MAX};
use crate::room::roles::{Role, ROLES_PER_ROOM_MAX};
use crate::room::sequencer::BANS_PER_ROOM_MAX;

struct State {
    /// Sealed records and tombstones.
    log: BTreeMap<(RoomId, LogIndex), Bytes>,
    /// Data keys of the sealed records.
    keys: BTreeMap<(RoomId, LogIndex), DataKey>,
    /// Retention period and sweep position per room.
    retention: BTreeMap<RoomId, (u64, LogIndex)>,
    rng: ChaCha20Rng,
    heads: BTreeMap<RoomId, LogIndex>,
    key_packages: BTreeMap<[u8; KEY_PACKAGE_KEY_BYTES], Bytes>,
    last_resort: BTreeMap<UserId, Bytes>,
    /// Packages handed out (to local clients or peer domains): when (ms), by user and reference.
    handed_out_claims: BTreeMap<[u8; KEY_PACKAGE_KEY_BYTES], u64>,
    group_info: BTreeMap<RoomId, GroupInfoRecord>,
    /// Each Welcome once, with the number of recipients that still have it.
    welcome_bodies: BTreeMap<WelcomeId, (u64, Bytes)>,
    /// Pending Welcomes per recipient, with the room each joins.
    welcome_recipients: BTreeMap<(UserId, WelcomeId), RoomId>,
    welcome_id_next: WelcomeId,
    room_metadata: BTreeMap<RoomId, RoomMetadata>,
    roles: BTreeMap<[u8; 24], Role>,
    bans: BTreeMap<[u8; 24], StoredBan>,
    audit: BTreeMap<u64, Bytes>,
    audit_head: Option<AuditHead>,
    /// Other domains' users and their home domains.
    remote_users: BTreeMap<UserId, DomainName>,
    /// Other domains' rooms and their authorities.
    remote_rooms: BTreeMap<RoomId, DomainName>,
    /// Each room's erasure journal.
    erasures: BTreeMap<(RoomId, u64), Vec<LogIndex>>,
    /// How far each replica here applied its authority's erasure journal.
    replica_erasure_cursors: BTreeMap<RoomId, u64>,
}

/// In-memory store behind one mutex.
pub struct MemoryStore {
    state: Mutex<State>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore").finish_non_exhaustive()
    }
}

impl MemoryStore {
    /// An empty store drawing data keys from a generator seeded by the
    /// operating system.
    pub fn new() -> Self {
        let mut seed = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut seed);
        Self::with_key_seed(seed)
    }

    /// An empty store drawing data keys from a generator seeded with
    /// `seed` (deterministic, for simulations).
    pub fn with_key_seed(seed: [u8; 32]) -> Self {
        Self {
            state: Mutex::new(State {
                log: BTreeMap::new(),
                keys: BTreeMap::new(),
                retention: BTreeMap::new(),
                rng: ChaCha20Rng::from_seed(seed),
                heads: BTreeMap::new(),
                key_packages: BTreeMap::new(),
                last_resort: BTreeMap::new(),
                handed_out_claims: BTreeMap::new(),
                group_info: BTreeMap::new(),
                welcome_bodies: BTreeMap::new(),
                welcome_recipients: BTreeMap::new(),
                welcome_id_next: 0,
                room_metadata: BTreeMap::new(),
                roles: BTreeMap::new(),
                bans: BTreeMap::new(),
                audit: BTreeMap::new(),
                audit_head: None,
                remote_users: BTreeMap::new(),
                remote_rooms: BTreeMap::new(),
                erasures: BTreeMap::new(),
                replica_erasure_cursors: BTreeMap::new(),
            }),
        }
    }

    /// [`Store::redact`], appending `event` to the audit log when
    /// something was erased and moving a replica's erasure cursor to
    /// `cursor`; all or nothing.
    fn redact_in(
        &self,
        room_id: RoomId,
        log_indices: &[LogIndex],
        redaction: &Redaction,
        event: Option<&AuditEvent>,
        cursor: Option<u64>,
    ) -> Result<(Vec<RedactOutcome>, Option<AuditRecord>), RedactError> {
        let mut state = self.lock()?;
        validate_redaction(room_id, log_indices, state.head(room_id))?;
        // Sealed before anything changes, so that a record that cannot be
        // sealed leaves everything as it was.
        let sealed = event.map(|event| seal_audit(state.audit_head, event)).transpose()?;
        // Check everything before changing anything: all or nothing.
        let mut tombstones: Vec<Option<Vec<u8>>> = Vec::with_capacity(log_indices.len());
        for &log_index in log_indices {
            let record = state.log.get(&(room_id, log_index)).ok_or_else(|| {
                InvariantViolation(format!("room {room_id}: no record at {log_index} below the head"))
            })?;
            let tombstone = match sealing::decode(record) {
                Ok(Record::Erased(_)) => None,
                Ok(Record::Sealed { routing, sealed }) => {
                    let key = state.keys.get(&(room_id, log_index)).ok_or_else(|| {
                        InvariantViolation(format!(
                            "room {room_id} index {log_index}: sealed record without its data key"
                        ))
                    })?;
                    let tombstone =
                        sealing::erase_sealed(key, room_id, log_index, routing, sealed, redaction).map_err(
                            |error| InvariantViolation(format!("room {room_id} index {log_index}: {error}")),
                        )?;
                    Some(tombstone)
                }
                Err(error) => {
                    return Err(
                        InvariantViolation(format!("room {room_id} index {log_index}: {error}")).into()
                    )
                }
            };
            tombstones.push(tombstone);
        }
        let mut outcomes = Vec::with_capacity(log_indices.len());
        for (&log_index, tombstone) in log_indices.iter().zip(tombstones) {
            // An index repeated in one call is erased by its first occurrence.
            match tombstone {
                Some(tombstone) if state.keys.remove(&(room_id, log_index)).is_some() => {
                    state.log.insert((room_id, log_index), Bytes::from(tombstone));
                    outcomes.push(RedactOutcome::Erased);
                }
                _ => outcomes.push(RedactOutcome::AlreadyErased),
            }
        }
        let erased = super::erased_indices(log_indices, &outcomes);
        if !erased.is_empty() {
            let seq =
                state.erasures.range((room_id, 0)..=(room_id, u64::MAX)).next_back().map_or(0, |(k, _)| k.1);
            state.erasures.insert((room_id, seq + 1), erased);
        }
        if let Some(cursor) = cursor {
            let stored = state.replica_erasure_cursors.entry(room_id).or_insert(0);
            if stored.checked_add(1) == Some(cursor) {
                *stored = cursor;
            }
        }
        let record = match sealed {
            Some((record, encoded, head)) if outcomes.contains(&RedactOutcome::Erased) => {
                state.audit.insert(head.seq, Bytes::from(encoded));
                state.audit_head = Some(head);
                Some(record)
            }
            _ => None,
        };
        Ok((outcomes, record))
    }

    /// [`Store::set_retention`], appending `event` (if any) to the audit
    /// log; all or nothing.
    fn set_retention_in(
        &self,
        room_id: RoomId,
        retention_ms: Option<u64>,
        event: Option<&AuditEvent>,
    ) -> Result<Option<AuditRecord>, RetentionError> {
        if let Some(retention_ms) = retention_ms {
            validate_retention_period(retention_ms)?;
        }
        let mut state = self.lock()?;
        if !state.heads.contains_key(&room_id) {
            return Err(RetentionError::UnknownRoom { room_id });
        }
        let sealed = event.map(|event| seal_audit(state.audit_head, event)).transpose()?;
        match retention_ms {
            Some(retention_ms) => {
                let swept = state.retention.get(&room_id).map_or(0, |(_, swept)| *swept);
                state.retention.insert(room_id, (retention_ms, swept));
            }
            None => {
                state.retention.remove(&room_id);
            }
        }
        Ok(sealed.map(|(record, encoded, head)| {
            state.audit.insert(head.seq, Bytes::from(encoded));
            state.audit_head = Some(head);
            record
        }))
    }

    /// Locks the state. A poisoned lock means a panic interrupted an update,
    /// so the state may be inconsistent: reported as an invariant violation.
    fn lock(&self) -> Result<MutexGuard<'_, State>, InvariantViolation> {
        self.state.lock().map_err(|_| InvariantViolation("memory store lock poisoned by a panic".to_owned()))
    }
}

impl State {
    /// The recipient's pending Welcomes (ids).
    fn pending_of(&self, recipient_user_id: UserId) -> impl Iterator<Item = WelcomeId> + '_ {
        self.welcome_recipients
            .range((recipient_user_id, 0)..=(recipient_user_id, WelcomeId::MAX))
            .map(|(&(_, welcome_id), _)| welcome_id)
    }

    /// Removes one pending Welcome of a recipient, and the Welcome's bytes
    /// with its last recipient; whether it was pending.
    fn remove_pending_welcome(
        &mut self,
        recipient_user_id: UserId,
        welcome_id: WelcomeId,
    ) -> Result<bool, WelcomeError> {
        if self.welcome_recipients.remove(&(recipient_user_id, welcome_id)).is_none() {
            return Ok(false);
        }
        let (refs, _) = self
            .welcome_bodies
            .get_mut(&welcome_id)
            .ok_or_else(|| InvariantViolation(format!("pending welcome {welcome_id} has no stored bytes")))?;
        *refs = refs.saturating_sub(1);
        if *refs == 0 {
            self.welcome_bodies.remove(&welcome_id);
        }
        Ok(true)
    }

    fn head(&self, room_id: RoomId) -> LogIndex {
        self.heads.get(&room_id).copied().unwrap_or(0)
    }

    fn key_package_count(&self, user_id: UserId) -> usize {
        let (low, high) = key_package_key_bounds(user_id);
        self.key_packages.range(low..=high).count()
    }
}

impl Store for MemoryStore {
    fn append_batch(&self, entries: &[LogEntry]) -> Result<(), AppendError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut state = self.lock()?;
        let next_by_room = validate_batch(entries, |room_id| Ok::<_, AppendError>(state.head(room_id)))?;
        for entry in entries {
            let (key, record) = sealing::seal(&mut state.rng, entry.room_id, entry.log_index, &entry.frame);
            state.log.insert((entry.room_id, entry.log_index), Bytes::from(record));
            state.keys.insert((entry.room_id, entry.log_index), key);
        }
        state.heads.extend(next_by_room);
        Ok(())
    }

    fn read_range(
        &self,
        room_id: RoomId,
        from_log_index: LogIndex,
        count_max: usize,
    ) -> Result<Vec<StoredEntry>, ReadError> {
        let count_cap = read_count_cap(count_max);
        let state = self.lock()?;
        let mut entries = Vec::new();
        let mut bytes_total = 0usize;
        let range = state.log.range((room_id, from_log_index)..=(room_id, LogIndex::MAX)).take(count_cap);
        for ((_, log_index), record) in range {
            let content_bytes = sealing::content_len(record);
            if !read_bytes_allow(entries.len(), bytes_total, content_bytes) {
                break;
            }
            bytes_total = bytes_total.saturating_add(content_bytes);
            let log_index = *log_index;
            let corrupt = |error: sealing::OpenError| {
                InvariantViolation(format!("room {room_id} index {log_index}: {error}"))
            };
            let content = match sealing::decode(record).map_err(corrupt)? {
                Record::Erased(erasure) => EntryContent::Erased(erasure),
                Record::Sealed { routing, sealed } => {
                    let key = state
                        .keys
                        .get(&(room_id, log_index))
                        .ok_or_else(|| corrupt(sealing::OpenError::KeyMissing))?;
                    EntryContent::Frame(
                        sealing::open(key, room_id, log_index, routing, sealed).map_err(corrupt)?,
                    )
                }
            };
            entries.push(StoredEntry { room_id, log_index, content });
        }
        check_read_dense(room_id, from_log_index, &entries)?;
        Ok(entries)
    }

    fn redact(
        &self,
        room_id: RoomId,
        log_indices: &[LogIndex],
        redaction: &Redaction,
    ) -> Result<Vec<RedactOutcome>, RedactError> {
        self.redact_in(room_id, log_indices, redaction, None, None).map(|(outcomes, _)| outcomes)
    }

    fn erasures_after(
        &self,
        room_id: RoomId,
        after_seq: u64,
        count_max: usize,
    ) -> Result<Vec<JournaledErasure>, ReadError> {
        let state = self.lock()?;
        let from = (room_id, after_seq.saturating_add(1));
        Ok(state
            .erasures
            .range(from..=(room_id, u64::MAX))
            .take(count_max.min(ERASURES_PAGE_MAX))
            .map(|(&(_, seq), log_indices)| JournaledErasure { seq, log_indices: log_indices.clone() })
            .collect())
    }

    fn replica_erasure_cursor(&self, room_id: RoomId) -> Result<u64, ReadError> {
        Ok(self.lock()?.replica_erasure_cursors.get(&room_id).copied().unwrap_or(0))
    }

    fn redact_replicated(
        &self,
        room_id: RoomId,
        log_indices: &[LogIndex],
        redaction: &Redaction,
        cursor: u64,
    ) -> Result<Vec<RedactOutcome>, RedactError> {
        self.redact_in(room_id, log_indices, redaction, None, Some(cursor)).map(|(outcomes, _)| outcomes)
    }

    fn redact_audited(
        &self,
        room_id: RoomId,
        log_indices: &[LogIndex],
        redaction: &Redaction,
        event: &AuditEvent,
    ) -> Result<(Vec<RedactOutcome>, Option<AuditRecord>), RedactError> {
        self.redact_in(room_id, log_indices, redaction, Some(event), None)
    }

    fn data_key(&self, room_id: RoomId, log_index: LogIndex) -> Result<Option<DataKey>, ReadError> {
        Ok(self.lock()?.keys.get(&(room_id, log_index)).cloned())
    }

    fn set_retention(&self, room_id: RoomId, retention_ms: Option<u64>) -> Result<(), RetentionError> {
        self.set_retention_in(room_id, retention_ms, None).map(|_| ())
    }

    fn set_retention_audited(
        &self,
        room_id: RoomId,
        retention_ms: Option<u64>,
        event: &AuditEvent,
    ) -> Result<AuditRecord, RetentionError> {
        let record = self.set_retention_in(room_id, retention_ms, Some(event))?;
        record.ok_or_else(|| InvariantViolation("no audit record for a retention change".into()).into())
    }

    fn retention(&self, room_id: RoomId) -> Result<Option<RoomRetention>, RetentionError> {
        Ok(self.lock()?.retention.get(&room_id).map(|(retention_ms, swept_next_log_index)| RoomRetention {
            room_id,
            retention_ms: *retention_ms,
            swept_next_log_index: *swept_next_log_index,
        }))
    }

    fn retention_rooms(
        &self,
        after: Option<RoomId>,
        count_max: usize,
    ) -> Result<Vec<RoomRetention>, RetentionError> {
        let count_cap = count_max.min(RETENTION_ROOMS_PAGE_MAX);
        let state = self.lock()?;
        let lower = match after {
            Some(room_id) => Bound::Excluded(room_id),
            None => Bound::Unbounded,
        };
        Ok(state
            .retention
            .range((lower, Bound::Unbounded))
            .take(count_cap)
            .map(|(room_id, (retention_ms, swept_next_log_index))| RoomRetention {
                room_id: *room_id,
                retention_ms: *retention_ms,
                swept_next_log_index: *swept_next_log_index,
            })
            .collect())
    }

    fn advance_retention(
        &self,
        room_id: RoomId,
        swept_next_log_index: LogIndex,
    ) -> Result<(), RetentionError> {
        let mut state = self.lock()?;
        let head = state.head(room_id);
        let Some((retention_ms, stored)) = state.retention.get(&room_id).copied() else { return Ok(()) };
        validate_sweep_position(room_id, swept_next_log_index, stored, head)?;
        state.retention.insert(room_id, (retention_ms, swept_next_log_index));
        Ok(())
    }

    fn next_log_index(&self, room_id: RoomId) -> Result<LogIndex, ReadError> {
        Ok(self.lock()?.head(room_id))
    }

    fn room_heads(&self, after: Option<RoomId>, count_max: usize) -> Result<Vec<RoomHead>, ReadError> {
        let count_cap = count_max.min(ROOM_HEADS_PAGE_MAX);
        let state = self.lock()?;
        let lower = match after {
            Some(room_id) => Bound::Excluded(room_id),
            None => Bound::Unbounded,
        };
        Ok(state
            .heads
            .range((lower, Bound::Unbounded))
            .take(count_cap)
            .map(|(room_id, next_log_index)| RoomHead { room_id: *room_id, next_log_index: *next_log_index })
            .collect())
    }

    fn put_key_packages(
        &self,
        user_id: UserId,
        packages: &[KeyPackageUpload],
        last_resort: Option<Bytes>,
    ) -> Result<(), KeyPackageError> {
        validate_key_package_upload(user_id, packages, last_resort.as_ref())?;
        let mut state = self.lock()?;
        let stored = state.key_package_count(user_id);
        let keys: Vec<_> =
            packages.iter().map(|package| key_package_key(user_id, &package.key_package_ref)).collect();
        let added = keys.iter().filter(|key| !state.key_packages.contains_key(*key)).count();
        if stored + added > KEY_PACKAGES_PER_USER_MAX {
            return Err(KeyPackageError::TooMany { user_id, stored, added, max: KEY_PACKAGES_PER_USER_MAX });
        }
        for (key, package) in keys.into_iter().zip(packages) {
            state.key_packages.insert(key, package.key_package.clone());
        }
        if let Some(last_resort) = last_resort {
            state.last_resort.insert(user_id, last_resort);
        }
        Ok(())
    }

    fn claim_key_package(&self, user_id: UserId) -> Result<Option<ClaimedKeyPackage>, KeyPackageError> {
        let mut state = self.lock()?;
        let (low, high) = key_package_key_bounds(user_id);
        let first = state.key_packages.range(low..=high).next().map(|(key, _)| *key);
        if let Some(key) = first {
            let key_package = state
                .key_packages
                .remove(&key)
                .ok_or_else(|| InvariantViolation("key package vanished while claimed".to_owned()))?;
            return Ok(Some(ClaimedKeyPackage { key_package, is_last_resort: false }));
        }
        Ok(state
            .last_resort
            .get(&user_id)
            .map(|key_package| ClaimedKeyPackage { key_package: key_package.clone(), is_last_resort: true }))
    }

    fn record_handed_out_claims(
        &self,
        claims: &[(UserId, Vec<u8>)],
        now_ms: u64,
    ) -> Result<(), KeyPackageError> {
        claims.iter().try_for_each(|(_, key_package_ref)| validate_key_package_ref(key_package_ref))?;
        let mut state = self.lock()?;
        for (user_id, key_package_ref) in claims {
            let key = key_package_key(*user_id, key_package_ref);
            let (low, high) = key_package_key_bounds(*user_id);
            let records: Vec<_> =
                state.handed_out_claims.range(low..=high).map(|(key, ms)| (*key, *ms)).collect();
            for dropped in handed_out_claims_to_drop(&records, &key, now_ms) {
                state.handed_out_claims.remove(&dropped);
            }
            state.handed_out_claims.insert(key, now_ms);
        }
        Ok(())
    }

    fn handed_out_claims(&self, user_id: UserId) -> Result<Vec<HandedOutClaim>, KeyPackageError> {
        let state = self.lock()?;
        let (low, high) = key_package_key_bounds(user_id);
        let records = state.handed_out_claims.range(low..=high);
        let claims = records.map(|(key, claimed_at_ms)| {
            Ok(HandedOutClaim { key_package_ref: key_package_ref_of(key)?, claimed_at_ms: *claimed_at_ms })
        });
        claims.collect::<Result<_, InvariantViolation>>().map_err(KeyPackageError::from)
    }

    fn count_key_packages(&self, user_id: UserId) -> Result<KeyPackageCount, KeyPackageError> {
        let state = self.lock()?;
        Ok(KeyPackageCount {
            ordinary: state.key_package_count(user_id) as u64,
            has_last_resort: state.last_resort.contains_key(&user_id),
        })
    }

    fn put_group_info(&self, room_id: RoomId, record: &GroupInfoRecord) -> Result<(), GroupInfoError> {
        validate_group_info(record)?;
        self.lock()?.group_info.insert(room_id, record.clone());
        Ok(())
    }

    fn group_info(&self, room_id: RoomId) -> Result<Option<GroupInfoRecord>, GroupInfoError> {
        Ok(self.lock()?.group_info.get(&room_id).cloned())
    }

    fn put_welcomes(
        &self,
        room_id: RoomId,
        recipient_user_ids: &[UserId],
        welcome: Bytes,
    ) -> Result<StoredWelcome, WelcomeError> {
        validate_welcome(&welcome)?;
        let mut state = self.lock()?;
        let (mut room, mut full) = (Vec::new(), Vec::new());
        for recipient_user_id in distinct_recipients(recipient_user_ids) {
            if state.pending_of(recipient_user_id).count() >= WELCOMES_PER_RECIPIENT_MAX {
                full.push(recipient_user_id);
            } else {
                room.push(recipient_user_id);
            }
        }
        if room.is_empty() {
            return Ok(StoredWelcome { welcome_id: None, full });
        }
        let welcome_id = state.welcome_id_next;
        state.welcome_id_next = welcome_id
            .checked_add(1)
            .ok_or_else(|| InvariantViolation("welcome id space exhausted".to_owned()))?;
        for &recipient_user_id in &room {
            state.welcome_recipients.insert((recipient_user_id, welcome_id), room_id);
        }
        let refs = u64::try_from(room.len()).map_err(|_| InvariantViolation("recipient count".to_owned()))?;
        state.welcome_bodies.insert(welcome_id, (refs, welcome));
        Ok(StoredWelcome { welcome_id: Some(welcome_id), full })
    }

    fn pending_welcomes(
        &self,
        recipient_user_id: UserId,
        after: Option<WelcomeId>,
    ) -> Result<Vec<PendingWelcome>, WelcomeError> {
        let Some(first) = after.map_or(Some(0), |after| after.checked_add(1)) else { return Ok(Vec::new()) };
        let state = self.lock()?;
        let (mut out, mut bytes) = (Vec::new(), 0usize);
        for (&(_, welcome_id), &room_id) in
            state.welcome_recipients.range((recipient_user_id, first)..=(recipient_user_id, WelcomeId::MAX))
        {
            let (_, welcome) = state.welcome_bodies.get(&welcome_id).ok_or_else(|| {
                InvariantViolation(format!("pending welcome {welcome_id} has no stored bytes"))
            })?;
            if !welcome_page_allows(out.len(), bytes, welcome.len()) {
                break;
            }
            bytes += welcome.len();
            out.push(PendingWelcome { welcome_id, room_id, welcome: welcome.clone() });
        }
        Ok(out)
    }

    fn delete_welcomes_for_room(
        &self,
        recipient_user_id: UserId,
        room_id: RoomId,
    ) -> Result<usize, WelcomeError> {
        let used: Vec<WelcomeId> = self
            .lock()?
            .welcome_recipients
            .range((recipient_user_id, 0)..=(recipient_user_id, WelcomeId::MAX))
            .filter(|(_, room)| **room == room_id)
            .map(|(&(_, welcome_id), _)| welcome_id)
            .collect();
        self.delete_welcomes(recipient_user_id, &used)
    }

    fn welcome_counts(&self) -> Result<WelcomeCounts, WelcomeError> {
        let state = self.lock()?;
        let count = |len: usize| u64::try_from(len).unwrap_or(u64::MAX);
        Ok(WelcomeCounts {
            welcomes: count(state.welcome_bodies.len()),
            pending: count(state.welcome_recipients.len()),
        })
    }

    fn delete_welcomes(
        &self,
        recipient_user_id: UserId,
        welcome_ids: &[WelcomeId],
    ) -> Result<usize, WelcomeError> {
        let mut state = self.lock()?;
        let mut removed = 0;
        for &welcome_id in welcome_ids.iter().take(WELCOMES_PER_RECIPIENT_MAX) {
            if state.remove_pending_welcome(recipient_user_id, welcome_id)? {
                removed += 1;
            }
        }
        Ok(removed)
    }

    fn delete_welcomes_through(
        &self,
        recipient_user_id: UserId,
        through_welcome_id: WelcomeId,
    ) -> Result<usize, WelcomeError> {
        let mut state = self.lock()?;
        let ids: Vec<WelcomeId> = state
            .welcome_recipients
            .range((recipient_user_id, 0)..=(recipient_user_id, through_welcome_id))
            .take(WELCOMES_PER_RECIPIENT_MAX)
            .map(|(&(_, welcome_id), _)| welcome_id)
            .collect();
        for &welcome_id in &ids {
            state.remove_pending_welcome(recipient_user_id, welcome_id)?;
        }
        Ok(ids.len())
    }

    fn put_room_metadata(&self, room_id: RoomId, metadata: &RoomMetadata) -> Result<(), RoomMetadataError> {
        let mut state = self.lock()?;
        validate_room_metadata(room_id, metadata, state.head(room_id))?;
        state.room_metadata.insert(room_id, metadata.clone());
        Ok(())
    }

    fn room_metadata(&self, room_id: RoomId) -> Result<Option<RoomMetadata>, RoomMetadataError> {
        Ok(self.lock()?.room_metadata.get(&room_id).cloned())
    }

    fn record_remote_user(&self, user_id: UserId, home: &DomainName) -> Result<(), RemoteRecordError> {
        let mut state = self.lock()?;
        if !state.remote_users.contains_key(&user_id) && state.remote_users.len() >= REMOTE_USERS_MAX {
            return Err(RemoteRecordError::Full { what: "users", max: REMOTE_USERS_MAX });
        }
        state.remote_users.insert(user_id, home.clone());
        Ok(())
    }

    fn remote_user_home(&self, user_id: UserId) -> Result<Option<DomainName>, RemoteRecordError> {
        Ok(self.lock()?.remote_users.get(&user_id).cloned())
    }

    fn remote_users(
        &self,
        after: Option<UserId>,
        count_max: usize,
    ) -> Result<Vec<(UserId, DomainName)>, RemoteRecordError> {
        let state = self.lock()?;
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        let page = state.remote_users.range((from, Bound::Unbounded));
        Ok(page
            .take(count_max.min(REMOTE_USERS_PAGE_MAX))
            .map(|(user, home)| (*user, home.clone()))
            .collect())
    }

    fn record_remote_room(&self, room_id: RoomId, authority: &DomainName) -> Result<(), RemoteRecordError> {
        let mut state = self.lock()?;
        match state.remote_rooms.get(&room_id) {
            Some(known) if known == authority => Ok(()),
            Some(known) => {
                Err(InvariantViolation(format!("room {room_id} is recorded under {known}")).into())
            }
            None if state.remote_rooms.len() >= REMOTE_ROOMS_MAX => {
                Err(RemoteRecordError::Full { what: "rooms", max: REMOTE_ROOMS_MAX })
            }
            None => {
                state.remote_rooms.insert(room_id, authority.clone());
                Ok(())
            }
        }
    }

    fn remote_rooms(&self) -> Result<Vec<(RoomId, DomainName)>, RemoteRecordError> {
        Ok(self.lock()?.remote_rooms.iter().map(|(room, authority)| (*room, authority.clone())).collect())
    }

    fn record_moderation(
        &self,
        change: &ModerationChange,
        event: &AuditEvent,
    ) -> Result<AuditRecord, ModerationStoreError> {
        let mut state = self.lock()?;
        match change {
            ModerationChange::None => {}
            ModerationChange::SetRole { room_id, user_id, role } => {
                let key = moderation_key(*room_id, *user_id);
                match role {
                    Some(role) => {
                        let (low, high) = (moderation_key(*room_id, 0), moderation_key(*room_id, u64::MAX));
                        if !state.roles.contains_key(&key)
                            && state.roles.range(low..=high).count() >= ROLES_PER_ROOM_MAX
                        {
                            return Err(ModerationStoreError::TooMany { room_id: *room_id, what: "roles" });
                        }
                        state.roles.insert(key, *role);
                    }
                    None => {
                        state.roles.remove(&key);
                    }
                }
            }
            ModerationChange::SetBan { room_id, user_id, ban } => {
                let key = moderation_key(*room_id, *user_id);
                match ban {
                    Some(ban) => {
                        let (low, high) = (moderation_key(*room_id, 0), moderation_key(*room_id, u64::MAX));
                        if !state.bans.contains_key(&key)
                            && state.bans.range(low..=high).count() >= BANS_PER_ROOM_MAX
                        {
                            return Err(ModerationStoreError::TooMany { room_id: *room_id, what: "bans" });
                        }
                        state.bans.insert(key, *ban);
                    }
                    None => {
                        state.bans.remove(&key);
                    }
                }
            }
        }
        let (record, encoded, head) = seal_audit(state.audit_head, event)?;
        state.audit.insert(head.seq, Bytes::from(encoded));
        state.audit_head = Some(head);
        Ok(record)
    }

    fn room_moderation(&self, room_id: RoomId) -> Result<RoomModeration, ModerationStoreError> {
        let state = self.lock()?;
        let (low, high) = (moderation_key(room_id, 0), moderation_key(room_id, u64::MAX));
        let user = |key: &[u8; 24]| u64::from_be_bytes(key[16..].try_into().expect("8 bytes"));
        Ok(RoomModeration {
            roles: state.roles.range(low..=high).map(|(key, role)| (user(key), *role)).collect(),
            bans: state.bans.range(low..=high).map(|(key, ban)| (user(key), *ban)).collect(),
        })
    }

    fn audit_records(
        &self,
        from_seq: u64,
        count_max: usize,
    ) -> Result<Vec<(u64, Bytes)>, ModerationStoreError> {
        let state = self.lock()?;
        Ok(state
            .audit
            .range(from_seq..)
            .take(count_max.min(AUDIT_PAGE_RECORDS_MAX))
            .map(|(seq, bytes)| (*seq, bytes.clone()))
            .collect())
    }

    fn audit_head(&self) -> Result<Option<AuditHead>, ModerationStoreError> {
        Ok(self.lock()?.audit_head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::suite::{entry, room};
    use crate::store::ErrorKind;

    #[test]
    fn a_poisoned_lock_is_an_internal_error() {
        let store = std::sync::Arc::new(MemoryStore::new());
        store.append_batch(&[entry(room(1), 0)]).unwrap();
        let poisoner = std::sync::Arc::clone(&store);
        let joined = std::thread::spawn(move || {
            let _guard = poisoner.state.lock().unwrap();
            panic!("poisoning the store on purpose");
        })
        .join();
        assert!(joined.is_err());
        let error = store.append_batch(&[entry(room(1), 1)]).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Internal);
        assert_eq!(store.read_range(room(1), 0, 1).unwrap_err().kind(), ErrorKind::Internal);
        assert_eq!(store.claim_key_package(1).unwrap_err().kind(), ErrorKind::Internal);
        assert_eq!(
            store.put_welcome(1, RoomId::default(), Bytes::new()).unwrap_err().kind(),
            ErrorKind::Internal
        );
        assert_eq!(store.group_info(room(1)).unwrap_err().kind(), ErrorKind::Internal);
        assert_eq!(store.room_metadata(room(1)).unwrap_err().kind(), ErrorKind::Internal);
    }
}
