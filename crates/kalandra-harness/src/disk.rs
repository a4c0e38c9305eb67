//! The simulated disk: a real [`Store`] behind a fault injector — the
//! production [`RedbStore`] in a temporary directory on some seeds,
//! [`MemoryStore`] (which shares the store test suite with it) on the rest.
//!
//! Model: a store call is durable when it returns `Ok` (the `Store`
//! contract). Time spent writing and syncing is spent by the server shell
//! *before* it calls the store, so a crash during that time loses the whole
//! unsynced batch, exactly as a crash before `fsync` returns would. A call
//! may fail instead: an I/O error (nothing written) or a failed sync whose
//! outcome is unknown (the write became durable or not, drawn from the
//! seed). The disk outlives server crashes; only what was made durable is
//! on it.

use std::sync::Mutex;

use bytes::Bytes;
use kalandra_proto::federation::DomainName;
use kalandra_server::audit::{AuditEvent, AuditHead, AuditRecord};
use kalandra_server::store::{
    AppendError, ClaimedKeyPackage, DataKey, EntryContent, GroupInfoError, GroupInfoRecord, HandedOutClaim,
    JournaledErasure, KeyPackageCount, KeyPackageError, KeyPackageUpload, LogEntry, LogIndex, MemoryStore,
    ModerationChange, ModerationStoreError, PendingWelcome, ReadError, RedactError, RedactOutcome, Redaction,
    RemoteRecordError, RetentionError, RoomHead, RoomId, RoomMetadata, RoomMetadataError, RoomModeration,
    RoomRetention, StorageFailure, Store, StoredEntry, StoredWelcome, UserId, WelcomeCounts, WelcomeError,
    WelcomeId,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::Digest as _;

/// Why a simulated disk operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DiskFault {
    /// The write was refused before reaching the medium.
    #[error("simulated I/O error")]
    Io,
    /// `fsync` failed: the write may or may not be durable.
    #[error("simulated failed sync")]
    FailedSync,
}

/// Fault switches of the disk, changed by the harness as the run goes.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DiskFaults {
    /// Probability that a write fails with an I/O error.
    pub io_error_rate: f64,
    /// Probability that a write's sync fails (outcome unknown).
    pub failed_sync_rate: f64,
}

/// Counters of what the disk did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskStats {
    /// Log entries made durable.
    pub entries_appended: u64,
    /// Writes that failed with an I/O error.
    pub io_errors: u64,
    /// Syncs that failed.
    pub failed_syncs: u64,
    /// Failed syncs whose write nevertheless became durable.
    pub failed_syncs_durable: u64,
}

struct Injector {
    rng: ChaCha8Rng,
    faults: DiskFaults,
    stats: DiskStats,
}

/// What a simulated disk keeps its data in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Medium {
    /// The in-memory store.
    Memory,
    /// The production redb store, in a temporary directory.
    Redb,
}

/// A server's disk in the simulation.
pub struct SimDisk {
    durable: std::sync::RwLock<std::sync::Arc<dyn Store>>,
    /// The redb file's directory, removed with the disk.
    _directory: Option<tempfile::TempDir>,
    injector: Mutex<Injector>,
    /// Users the disk has stored something for (to copy the store when the
    /// injected "drop a frame on restart" bug rewrites it).
    users: Mutex<std::collections::BTreeSet<UserId>>,
    /// SHA-256 of every frame appended durably, by room and index: what an
    /// erased entry held, for the checkers.
    appended: Mutex<std::collections::BTreeMap<(RoomId, LogIndex), [u8; 32]>>,
}

/// A durable entry of a room's log, as the checkers see it.
#[derive(Debug, Clone)]
pub struct DurableEntry {
    /// Its index.
    pub log_index: LogIndex,
    /// What history carries at this index: the frame, or the placeholder of
    /// an erased entry.
    pub bytes: Bytes,
    /// Whether the entry was erased.
    pub erased: bool,
    /// SHA-256 of the frame as appended.
    pub appended_digest: Option<[u8; 32]>,
}

impl std::fmt::Debug for SimDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimDisk").finish_non_exhaustive()
    }
}

/// What a fault draw decided for one write.
enum Draw {
    Write,
    Io,
    SyncFailedDurable,
    SyncFailedLost,
}

impl SimDisk {
    /// An empty in-memory disk whose faults are drawn from `seed`.
    pub fn new(seed: u64) -> SimDisk {
        SimDisk::with_store(seed, std::sync::Arc::new(MemoryStore::new()), None)
    }

    /// An empty disk on `medium`.
    pub fn on(medium: Medium, seed: u64) -> std::io::Result<SimDisk> {
        match medium {
            Medium::Memory => Ok(SimDisk::new(seed)),
            Medium::Redb => {
                let directory = tempfile::tempdir()?;
                let store = kalandra_server::store::RedbStore::open(directory.path().join("kalandra.redb"))
                    .map_err(|error| std::io::Error::other(error.to_string()))?;
                Ok(SimDisk::with_store(seed, std::sync::Arc::new(store), Some(directory)))
            }
        }
    }

    fn with_store(
        seed: u64,
        store: std::sync::Arc<dyn Store>,
        directory: Option<tempfile::TempDir>,
    ) -> SimDisk {
        SimDisk {
            durable: std::sync::RwLock::new(store),
            _directory: directory,
            users: Mutex::new(std::collections::BTreeSet::new()),
            appended: Mutex::new(std::collections::BTreeMap::new()),
            injector: Mutex::new(Injector {
                rng: ChaCha8Rng::seed_from_u64(seed),
                faults: DiskFaults::default(),
                stats: DiskStats::default(),
            }),
        }
    }

    /// Sets the fault rates from now on.
    pub fn set_faults(&self, faults: DiskFaults) {
        self.lock().faults = faults;
    }

    /// What the disk did so far.
    pub fn stats(&self) -> DiskStats {
        self.lock().stats
    }

    fn store(&self) -> std::sync::Arc<dyn Store> {
        std::sync::Arc::clone(&self.durable.read().expect("disk lock"))
    }

    /// Every durable entry of a room's log, in order.
    pub fn log(&self, room_id: RoomId) -> Vec<DurableEntry> {
        let appended = self.appended.lock().expect("appended lock");
        read_log(self.store().as_ref(), room_id)
            .into_iter()
            .map(|entry| DurableEntry {
                log_index: entry.log_index,
                erased: matches!(entry.content, EntryContent::Erased(_)),
                appended_digest: appended.get(&(room_id, entry.log_index)).copied(),
                bytes: kalandra_server::sim::history_bytes(room_id, entry),
            })
            .collect()
    }

    /// Every room with a log.
    pub fn rooms(&self) -> Vec<RoomId> {
        self.store()
            .room_heads(None, usize::MAX)
            .expect("the simulated disk reads")
            .iter()
            .map(|h| h.room_id)
            .collect()
    }

    /// Removes the last durable entry of every room's log. Only the injected
    /// "drop a frame on restart" bug calls this. Returns how many were removed.
    pub fn drop_last_entries(&self) -> usize {
        let old = self.store();
        let fresh = MemoryStore::new();
        let mut dropped = 0;
        for room_id in self.rooms() {
            let mut log: Vec<LogEntry> = read_log(old.as_ref(), room_id)
                .into_iter()
                .map(|entry| LogEntry {
                    room_id,
                    log_index: entry.log_index,
                    frame: kalandra_server::sim::history_bytes(room_id, entry),
                })
                .collect();
            if log.len() > 1 {
                let last = log.pop().expect("more than one entry");
                self.appended.lock().expect("appended lock").remove(&(room_id, last.log_index));
                dropped += 1;
            }
            fresh.append_batch(&log).expect("a dense log appends");
            if let Some(record) = old.group_info(room_id).expect("memory store reads") {
                fresh.put_group_info(room_id, &record).expect("memory store writes");
            }
            if let Some(metadata) = old.room_metadata(room_id).expect("memory store reads") {
                if metadata.mls_snapshot_log_index <= log.len() as u64 {
                    fresh.put_room_metadata(room_id, &metadata).expect("memory store writes");
                }
            }
        }
        for (room_id, authority) in old.remote_rooms().expect("the simulated disk reads") {
            fresh.record_remote_room(room_id, &authority).expect("memory store writes");
        }
        let users: Vec<UserId> = self.users.lock().expect("users lock").iter().copied().collect();
        for user in users {
            let mut after = None;
            loop {
                let page = old.pending_welcomes(user, after).expect("memory store reads");
                let Some(last) = page.last() else { break };
                after = Some(last.welcome_id);
                for welcome in page {
                    fresh.put_welcome(user, welcome.room_id, welcome.welcome).expect("memory store writes");
                }
            }
            let mut packages = Vec::new();
            let mut last_resort = None;
            while let Some(claimed) = old.claim_key_package(user).expect("memory store claims") {
                if claimed.is_last_resort {
                    last_resort = Some(claimed.key_package);
                    break;
                }
                let key_package_ref = sha2::Sha256::digest(&claimed.key_package)[..32].to_vec();
                packages.push(KeyPackageUpload { key_package_ref, key_package: claimed.key_package });
            }
            fresh.put_key_packages(user, &packages, last_resort).expect("memory store writes");
        }
        *self.durable.write().expect("disk lock") = std::sync::Arc::new(fresh);
        dropped
    }

    fn note_user(&self, user: UserId) {
        self.users.lock().expect("users lock").insert(user);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Injector> {
        self.injector.lock().expect("disk injector lock")
    }

    fn draw(&self) -> Draw {
        let mut injector = self.lock();
        let faults = injector.faults;
        let roll: f64 = injector.rng.gen();
        if roll < faults.io_error_rate {
            injector.stats.io_errors += 1;
            return Draw::Io;
        }
        if roll < faults.io_error_rate + faults.failed_sync_rate {
            injector.stats.failed_syncs += 1;
            if injector.rng.gen_bool(0.5) {
                injector.stats.failed_syncs_durable += 1;
                return Draw::SyncFailedDurable;
            }
            return Draw::SyncFailedLost;
        }
        Draw::Write
    }

    /// Runs a write under the fault model.
    fn write<T, E: From<StorageFailure>>(
        &self,
        operation: &'static str,
        write: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, E> {
        match self.draw() {
            Draw::Write => write(),
            Draw::Io => Err(StorageFailure::new(operation, DiskFault::Io).into()),
            Draw::SyncFailedDurable => {
                write()?;
                Err(StorageFailure::new(operation, DiskFault::FailedSync).into())
            }
            Draw::SyncFailedLost => Err(StorageFailure::new(operation, DiskFault::FailedSync).into()),
        }
    }
}

fn read_log(store: &dyn Store, room_id: RoomId) -> Vec<StoredEntry> {
    let mut entries = Vec::new();
    let mut from = 0;
    loop {
        let page = store
            .read_range(room_id, from, kalandra_server::store::limits::READ_RANGE_ENTRIES_MAX)
            .expect("the simulated disk reads");
        let Some(last) = page.last() else { break };
        from = last.log_index + 1;
        entries.extend(page);
    }
    entries
}

impl Store for SimDisk {
    fn append_batch(&self, entries: &[LogEntry]) -> Result<(), AppendError> {
        let count = entries.len() as u64;
        let note = || {
            let mut appended = self.appended.lock().expect("appended lock");
            for entry in entries {
                appended.insert((entry.room_id, entry.log_index), sha2::Sha256::digest(&entry.frame).into());
            }
        };
        self.write("append_batch", || self.store().append_batch(entries).inspect(|()| note()))?;
        self.lock().stats.entries_appended += count;
        Ok(())
    }

    fn read_range(
        &self,
        room_id: RoomId,
        from_log_index: LogIndex,
        count_max: usize,
    ) -> Result<Vec<StoredEntry>, ReadError> {
        self.store().read_range(room_id, from_log_index, count_max)
    }

    fn redact(
        &self,
        room_id: RoomId,
        log_indices: &[LogIndex],
        redaction: &Redaction,
    ) -> Result<Vec<RedactOutcome>, RedactError> {
        self.write("redact", || self.store().redact(room_id, log_indices, redaction))
    }

    fn redact_audited(
        &self,
        room_id: RoomId,
        log_indices: &[LogIndex],
        redaction: &Redaction,
        event: &AuditEvent,
    ) -> Result<(Vec<RedactOutcome>, Option<AuditRecord>), RedactError> {
        self.write("redact_audited", || self.store().redact_audited(room_id, log_indices, redaction, event))
    }

    fn set_retention_audited(
        &self,
        room_id: RoomId,
        retention_ms: Option<u64>,
        event: &AuditEvent,
    ) -> Result<AuditRecord, RetentionError> {
        self.write("set_retention_audited", || {
            self.store().set_retention_audited(room_id, retention_ms, event)
        })
    }

    fn erasures_after(
        &self,
        room_id: RoomId,
        after_seq: u64,
        count_max: usize,
    ) -> Result<Vec<JournaledErasure>, ReadError> {
        self.store().erasures_after(room_id, after_seq, count_max)
    }

    fn replica_erasure_cursor(&self, room_id: RoomId) -> Result<u64, ReadError> {
        self.store().replica_erasure_cursor(room_id)
    }

    fn redact_replicated(
        &self,
        room_id: RoomId,
        log_indices: &[LogIndex],
        redaction: &Redaction,
        cursor: u64,
    ) -> Result<Vec<RedactOutcome>, RedactError> {
        self.write("redact_replicated", || {
            self.store().redact_replicated(room_id, log_indices, redaction, cursor)
        })
    }

    fn data_key(&self, room_id: RoomId, log_index: LogIndex) -> Result<Option<DataKey>, ReadError> {
        self.store().data_key(room_id, log_index)
    }

    fn set_retention(&self, room_id: RoomId, retention_ms: Option<u64>) -> Result<(), RetentionError> {
        self.write("set_retention", || self.store().set_retention(room_id, retention_ms))
    }

    fn retention(&self, room_id: RoomId) -> Result<Option<RoomRetention>, RetentionError> {
        self.store().retention(room_id)
    }

    fn retention_rooms(
        &self,
        after: Option<RoomId>,
        count_max: usize,
    ) -> Result<Vec<RoomRetention>, RetentionError> {
        self.store().retention_rooms(after, count_max)
    }

    fn advance_retention(
        &self,
        room_id: RoomId,
        swept_next_log_index: LogIndex,
    ) -> Result<(), RetentionError> {
        self.write("advance_retention", || self.store().advance_retention(room_id, swept_next_log_index))
    }

    fn next_log_index(&self, room_id: RoomId) -> Result<LogIndex, ReadError> {
        self.store().next_log_index(room_id)
    }

    fn room_heads(&self, after: Option<RoomId>, count_max: usize) -> Result<Vec<RoomHead>, ReadError> {
        self.store().room_heads(after, count_max)
    }

    fn put_key_packages(
        &self,
        user_id: UserId,
        packages: &[KeyPackageUpload],
        last_resort: Option<Bytes>,
    ) -> Result<(), KeyPackageError> {
        self.note_user(user_id);
        self.write("put_key_packages", || self.store().put_key_packages(user_id, packages, last_resort))
    }

    fn claim_key_package(&self, user_id: UserId) -> Result<Option<ClaimedKeyPackage>, KeyPackageError> {
        self.write("claim_key_package", || self.store().claim_key_package(user_id))
    }

    fn record_handed_out_claims(
        &self,
        claims: &[(UserId, Vec<u8>)],
        now_ms: u64,
    ) -> Result<(), KeyPackageError> {
        self.write("record_handed_out_claims", || self.store().record_handed_out_claims(claims, now_ms))
    }

    fn handed_out_claims(&self, user_id: UserId) -> Result<Vec<HandedOutClaim>, KeyPackageError> {
        self.store().handed_out_claims(user_id)
    }

    fn count_key_packages(&self, user_id: UserId) -> Result<KeyPackageCount, KeyPackageError> {
        self.store().count_key_packages(user_id)
    }

    fn put_group_info(&self, room_id: RoomId, record: &GroupInfoRecord) -> Result<(), GroupInfoError> {
        self.write("put_group_info", || self.store().put_group_info(room_id, record))
    }

    fn group_info(&self, room_id: RoomId) -> Result<Option<GroupInfoRecord>, GroupInfoError> {
        self.store().group_info(room_id)
    }

    fn put_welcomes(
        &self,
        room_id: RoomId,
        recipient_user_ids: &[UserId],
        welcome: Bytes,
    ) -> Result<StoredWelcome, WelcomeError> {
        for user in recipient_user_ids {
            self.note_user(*user);
        }
        self.write("put_welcomes", || self.store().put_welcomes(room_id, recipient_user_ids, welcome))
    }

    fn pending_welcomes(
        &self,
        recipient_user_id: UserId,
        after: Option<WelcomeId>,
    ) -> Result<Vec<PendingWelcome>, WelcomeError> {
        self.store().pending_welcomes(recipient_user_id, after)
    }

    fn delete_welcomes_for_room(
        &self,
        recipient_user_id: UserId,
        room_id: RoomId,
    ) -> Result<usize, WelcomeError> {
        self.write("delete_welcomes_for_room", || {
            self.store().delete_welcomes_for_room(recipient_user_id, room_id)
        })
    }

    fn welcome_counts(&self) -> Result<WelcomeCounts, WelcomeError> {
        self.store().welcome_counts()
    }

    fn delete_welcomes(
        &self,
        recipient_user_id: UserId,
        welcome_ids: &[WelcomeId],
    ) -> Result<usize, WelcomeError> {
        self.write("delete_welcomes", || self.store().delete_welcomes(recipient_user_id, welcome_ids))
    }

    fn delete_welcomes_through(
        &self,
        recipient_user_id: UserId,
        through_welcome_id: WelcomeId,
    ) -> Result<usize, WelcomeError> {
        self.write("delete_welcomes_through", || {
            self.store().delete_welcomes_through(recipient_user_id, through_welcome_id)
        })
    }

    fn put_room_metadata(&self, room_id: RoomId, metadata: &RoomMetadata) -> Result<(), RoomMetadataError> {
        self.write("put_room_metadata", || self.store().put_room_metadata(room_id, metadata))
    }

    fn room_metadata(&self, room_id: RoomId) -> Result<Option<RoomMetadata>, RoomMetadataError> {
        self.store().room_metadata(room_id)
    }

    fn record_remote_user(&self, user_id: UserId, home: &DomainName) -> Result<(), RemoteRecordError> {
        self.write("record_remote_user", || self.store().record_remote_user(user_id, home))
    }

    fn remote_user_home(&self, user_id: UserId) -> Result<Option<DomainName>, RemoteRecordError> {
        self.store().remote_user_home(user_id)
    }

    fn remote_users(
        &self,
        after: Option<UserId>,
        count_max: usize,
    ) -> Result<Vec<(UserId, DomainName)>, RemoteRecordError> {
        self.store().remote_users(after, count_max)
    }

    fn record_remote_room(&self, room_id: RoomId, authority: &DomainName) -> Result<(), RemoteRecordError> {
        self.write("record_remote_room", || self.store().record_remote_room(room_id, authority))
    }

    fn remote_rooms(&self) -> Result<Vec<(RoomId, DomainName)>, RemoteRecordError> {
        self.store().remote_rooms()
    }

    fn record_moderation(
        &self,
        change: &ModerationChange,
        event: &AuditEvent,
    ) -> Result<AuditRecord, ModerationStoreError> {
        self.write("record_moderation", || self.store().record_moderation(change, event))
    }

    fn room_moderation(&self, room_id: RoomId) -> Result<RoomModeration, ModerationStoreError> {
        self.store().room_moderation(room_id)
    }

    fn audit_records(
        &self,
        from_seq: u64,
        count_max: usize,
    ) -> Result<Vec<(u64, Bytes)>, ModerationStoreError> {
        self.store().audit_records(from_seq, count_max)
    }

    fn audit_head(&self) -> Result<Option<AuditHead>, ModerationStoreError> {
        self.store().audit_head()
    }
}
