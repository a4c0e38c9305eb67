//! Group commit: many tasks submit appends, one writer thread makes them
//! durable in batches.
//!
//! Submitters put requests (a few log entries and a completion channel) on a
//! bounded queue; the queue is bounded both in requests and in frame bytes,
//! so a slow disk pushes back on submitters instead of growing memory. A
//! single dedicated thread (redb calls block) takes the first waiting
//! request, drains whatever else is already queued up to
//! [`GroupCommitConfig::batch_entries_max`] entries and
//! [`GroupCommitConfig::batch_bytes_max`] bytes, writes it all with one
//! [`Store::append_batch`] (one durable transaction), and only then completes
//! every request of the batch. There is no timer: while one batch is being
//! synced, the next one accumulates, so batches grow with load.
//!
//! Failure: a batch that fails in storage fails every request in it, and
//! nothing of it is acknowledged. A batch refused because one room's entries
//! are not dense (a caller bug) is retried without that room's requests, so
//! one faulty room does not fail the others; that room's requests get the
//! error. Requests of one submitter are written in submission order.
//!
//! Shutdown ([`GroupCommit::shutdown`]) stops accepting requests, writes
//! everything already queued, and returns once the writer has stopped.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore, TryAcquireError};

use super::limits::{
    GROUP_COMMIT_BATCH_BYTES_MAX, GROUP_COMMIT_BATCH_ENTRIES_MAX, GROUP_COMMIT_QUEUE_BYTES_MAX,
    GROUP_COMMIT_QUEUE_REQUESTS_MAX,
};
use super::{AppendError, LogEntry, Store};

/// Bounds of a [`GroupCommit`] driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupCommitConfig {
    /// Requests the queue holds before submitters wait.
    pub queue_requests_max: usize,
    /// Frame bytes queued or being written before submitters wait. At least
    /// `batch_bytes_max`, at most `u32::MAX`.
    pub queue_bytes_max: usize,
    /// Most entries in one transaction; also the most entries in one request.
    pub batch_entries_max: usize,
    /// Most frame bytes in one transaction; also the most bytes in one
    /// request.
    pub batch_bytes_max: usize,
}

impl Default for GroupCommitConfig {
    fn default() -> Self {
        Self {
            queue_requests_max: GROUP_COMMIT_QUEUE_REQUESTS_MAX,
            queue_bytes_max: GROUP_COMMIT_QUEUE_BYTES_MAX,
            batch_entries_max: GROUP_COMMIT_BATCH_ENTRIES_MAX,
            batch_bytes_max: GROUP_COMMIT_BATCH_BYTES_MAX,
        }
    }
}

/// A [`GroupCommitConfig`] that cannot work.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A bound is zero.
    #[error("group commit {0} must be positive")]
    Zero(&'static str),
    /// `queue_bytes_max` is below `batch_bytes_max`: a maximal request could
    /// never be queued.
    #[error("group commit queue_bytes_max must be at least batch_bytes_max")]
    QueueBytesBelowBatchBytes,
    /// `queue_bytes_max` exceeds `u32::MAX` (bytes are counted as semaphore
    /// permits).
    #[error("group commit queue_bytes_max must not exceed u32::MAX")]
    QueueBytesTooLarge,
}

impl GroupCommitConfig {
    /// Checks the bounds against each other.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.queue_requests_max == 0 {
            return Err(ConfigError::Zero("queue_requests_max"));
        }
        if self.batch_entries_max == 0 {
            return Err(ConfigError::Zero("batch_entries_max"));
        }
        if self.batch_bytes_max == 0 {
            return Err(ConfigError::Zero("batch_bytes_max"));
        }
        if self.queue_bytes_max < self.batch_bytes_max {
            return Err(ConfigError::QueueBytesBelowBatchBytes);
        }
        if u32::try_from(self.queue_bytes_max).is_err() {
            return Err(ConfigError::QueueBytesTooLarge);
        }
        Ok(())
    }
}

/// Error starting a [`GroupCommit`].
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is inconsistent.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The writer thread could not be spawned.
    #[error("spawning the storage writer thread: {0}")]
    Spawn(#[from] std::io::Error),
}

/// A request the driver refused to queue. Nothing of it was written.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// The request holds no entry.
    #[error("append request holds no entry")]
    Empty,
    /// The request cannot fit in one batch.
    #[error(
        "append request of {entries} entries / {bytes} bytes exceeds one batch ({entries_max} / {bytes_max})"
    )]
    TooLarge {
        /// Entries in the request.
        entries: usize,
        /// Frame bytes in the request.
        bytes: usize,
        /// Batch entry limit.
        entries_max: usize,
        /// Batch byte limit.
        bytes_max: usize,
    },
    /// The queue is full ([`GroupCommit::try_submit`] only).
    #[error("append queue is full")]
    QueueFull,
    /// The driver is shutting down or its writer has stopped.
    #[error("append queue is shut down")]
    ShutDown,
}

/// Error of [`GroupCommit::append`] and of awaiting an [`AppendTicket`].
#[derive(Clone, Debug, thiserror::Error)]
pub enum GroupCommitError {
    /// The request was not queued.
    #[error(transparent)]
    Submit(#[from] SubmitError),
    /// The batch holding the request failed; nothing of it was acknowledged.
    #[error(transparent)]
    Append(#[from] AppendError),
    /// The writer stopped (panicked) before completing the request: its
    /// durability is unknown.
    #[error("storage writer stopped before completing the request")]
    WriterStopped,
}

/// Completion of a submitted request: resolves to `Ok(())` only once the
/// request's batch is durable.
#[derive(Debug)]
pub struct AppendTicket {
    receiver: oneshot::Receiver<Result<(), AppendError>>,
}

impl Future for AppendTicket {
    type Output = Result<(), GroupCommitError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.receiver).poll(cx).map(|received| match received {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(GroupCommitError::Append(error)),
            Err(_) => Err(GroupCommitError::WriterStopped),
        })
    }
}

/// Counters of the writer, for the metrics layer.
#[derive(Debug, Default)]
pub struct GroupCommitStats {
    batches_written: AtomicU64,
    batches_failed: AtomicU64,
    entries_written: AtomicU64,
    requests_acknowledged: AtomicU64,
    requests_failed: AtomicU64,
    last_batch_entries: AtomicU64,
    last_batch_latency_us: AtomicU64,
    batch_latency_us_total: AtomicU64,
    batch_latency_us_max: AtomicU64,
}

/// A point-in-time copy of [`GroupCommitStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GroupCommitStatsSnapshot {
    /// Durable transactions written.
    pub batches_written: u64,
    /// Transactions that failed in storage (each request got the error).
    pub batches_failed: u64,
    /// Entries made durable.
    pub entries_written: u64,
    /// Requests completed with `Ok`.
    pub requests_acknowledged: u64,
    /// Requests completed with an error.
    pub requests_failed: u64,
    /// Entries in the last written transaction.
    pub last_batch_entries: u64,
    /// Duration of the last written transaction, microseconds.
    pub last_batch_latency_us: u64,
    /// Sum of all transaction durations, microseconds.
    pub batch_latency_us_total: u64,
    /// Longest transaction duration, microseconds.
    pub batch_latency_us_max: u64,
    /// Requests waiting in the queue when the snapshot was taken.
    pub queued_requests: u64,
}

impl GroupCommitStats {
    fn record_batch(&self, entries: u64, requests: u64, latency_us: u64) {
        self.batches_written.fetch_add(1, Ordering::Relaxed);
        self.entries_written.fetch_add(entries, Ordering::Relaxed);
        self.requests_acknowledged.fetch_add(requests, Ordering::Relaxed);
        self.last_batch_entries.store(entries, Ordering::Relaxed);
        self.last_batch_latency_us.store(latency_us, Ordering::Relaxed);
        self.batch_latency_us_total.fetch_add(latency_us, Ordering::Relaxed);
        self.batch_latency_us_max.fetch_max(latency_us, Ordering::Relaxed);
    }

    fn snapshot(&self, queued_requests: u64) -> GroupCommitStatsSnapshot {
        GroupCommitStatsSnapshot {
            batches_written: self.batches_written.load(Ordering::Relaxed),
            batches_failed: self.batches_failed.load(Ordering::Relaxed),
            entries_written: self.entries_written.load(Ordering::Relaxed),
            requests_acknowledged: self.requests_acknowledged.load(Ordering::Relaxed),
            requests_failed: self.requests_failed.load(Ordering::Relaxed),
            last_batch_entries: self.last_batch_entries.load(Ordering::Relaxed),
            last_batch_latency_us: self.last_batch_latency_us.load(Ordering::Relaxed),
            batch_latency_us_total: self.batch_latency_us_total.load(Ordering::Relaxed),
            batch_latency_us_max: self.batch_latency_us_max.load(Ordering::Relaxed),
            queued_requests,
        }
    }
}

/// One queued append.
struct Request {
    entries: Vec<LogEntry>,
    bytes: usize,
    completion: oneshot::Sender<Result<(), AppendError>>,
    /// Returns the request's bytes to the queue budget when dropped, i.e.
    /// once the request is completed.
    _budget: OwnedSemaphorePermit,
}

impl Request {
    fn complete(self, outcome: Result<(), AppendError>) {
        // A submitter that dropped its ticket no longer waits for the outcome.
        let _ = self.completion.send(outcome);
    }
}

enum Command {
    Append(Request),
    Shutdown,
}

struct Inner {
    config: GroupCommitConfig,
    sender: mpsc::Sender<Command>,
    bytes_budget: Arc<Semaphore>,
    stats: Arc<GroupCommitStats>,
    stopped: watch::Receiver<bool>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

/// The group-commit driver. Cheap to clone; all clones share one queue and
/// one writer thread. The writer stops after [`GroupCommit::shutdown`] or
/// once every clone is dropped (after writing what was queued).
#[derive(Clone)]
pub struct GroupCommit {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for GroupCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCommit").field("config", &self.inner.config).finish_non_exhaustive()
    }
}

impl GroupCommit {
    /// Starts the writer thread over `store`.
    pub fn start(store: Arc<dyn Store>, config: GroupCommitConfig) -> Result<Self, StartError> {
        config.validate()?;
        let (sender, receiver) = mpsc::channel(config.queue_requests_max);
        let (stopped_sender, stopped) = watch::channel(false);
        let stats = Arc::new(GroupCommitStats::default());
        let writer = Writer { store, receiver, config, stats: Arc::clone(&stats), carried: None };
        let handle =
            std::thread::Builder::new().name("kalandra-store-writer".to_owned()).spawn(move || {
                writer.run();
                // Receivers may all be gone already.
                let _ = stopped_sender.send(true);
            })?;
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                sender,
                bytes_budget: Arc::new(Semaphore::new(config.queue_bytes_max)),
                stats,
                stopped,
                writer: Mutex::new(Some(handle)),
            }),
        })
    }

    /// Queues `entries` for the next batch, waiting while the queue is full.
    /// The ticket resolves once the batch is durable (or failed).
    ///
    /// Cancelling this future before it returns leaves nothing queued;
    /// dropping the returned ticket does not cancel the write.
    pub async fn submit(&self, entries: Vec<LogEntry>) -> Result<AppendTicket, SubmitError> {
        let (bytes, permits) = self.check_request(&entries)?;
        let budget = Arc::clone(&self.inner.bytes_budget)
            .acquire_many_owned(permits)
            .await
            .map_err(|_| SubmitError::ShutDown)?;
        let (completion, receiver) = oneshot::channel();
        let request = Request { entries, bytes, completion, _budget: budget };
        self.inner.sender.send(Command::Append(request)).await.map_err(|_| SubmitError::ShutDown)?;
        Ok(AppendTicket { receiver })
    }

    /// Queues `entries` like [`GroupCommit::submit`], but fails with
    /// [`SubmitError::QueueFull`] instead of waiting.
    pub fn try_submit(&self, entries: Vec<LogEntry>) -> Result<AppendTicket, SubmitError> {
        let (bytes, permits) = self.check_request(&entries)?;
        let budget = Arc::clone(&self.inner.bytes_budget).try_acquire_many_owned(permits).map_err(
            |error| match error {
                TryAcquireError::NoPermits => SubmitError::QueueFull,
                TryAcquireError::Closed => SubmitError::ShutDown,
            },
        )?;
        let (completion, receiver) = oneshot::channel();
        let request = Request { entries, bytes, completion, _budget: budget };
        self.inner.sender.try_send(Command::Append(request)).map_err(|error| match error {
            TrySendError::Full(_) => SubmitError::QueueFull,
            TrySendError::Closed(_) => SubmitError::ShutDown,
        })?;
        Ok(AppendTicket { receiver })
    }

    /// Submits `entries` and waits until they are durable.
    pub async fn append(&self, entries: Vec<LogEntry>) -> Result<(), GroupCommitError> {
        self.submit(entries).await?.await
    }

    /// The writer's counters.
    pub fn stats(&self) -> GroupCommitStatsSnapshot {
        let capacity_free = self.inner.sender.capacity();
        let queued = self.inner.config.queue_requests_max.saturating_sub(capacity_free);
        self.inner.stats.snapshot(queued as u64)
    }

    /// Stops accepting requests, writes everything already queued, and waits
    /// for the writer thread to end. Requests submitted afterwards fail with
    /// [`SubmitError::ShutDown`]. Returns
    /// [`GroupCommitError::WriterStopped`] if the writer had panicked.
    pub async fn shutdown(&self) -> Result<(), GroupCommitError> {
        self.inner.bytes_budget.close();
        // Fails only if the writer is already gone.
        let _ = self.inner.sender.send(Command::Shutdown).await;
        let mut stopped = self.inner.stopped.clone();
        // An error means the writer thread ended without reporting (panic).
        let _ = stopped.wait_for(|stopped| *stopped).await;
        let handle = self.inner.writer.lock().map_err(|_| GroupCommitError::WriterStopped)?.take();
        match handle {
            // The writer has reported that it is ending: joining is immediate.
            Some(handle) => handle.join().map_err(|_| GroupCommitError::WriterStopped),
            None => Ok(()),
        }
    }

    /// Returns the request's byte count and the queue permits it needs.
    fn check_request(&self, entries: &[LogEntry]) -> Result<(usize, u32), SubmitError> {
        if entries.is_empty() {
            return Err(SubmitError::Empty);
        }
        let config = &self.inner.config;
        let bytes = entries.iter().fold(0usize, |total, entry| total.saturating_add(entry.frame.len()));
        let too_large = SubmitError::TooLarge {
            entries: entries.len(),
            bytes,
            entries_max: config.batch_entries_max,
            bytes_max: config.batch_bytes_max,
        };
        if entries.len() > config.batch_entries_max || bytes > config.batch_bytes_max {
            return Err(too_large);
        }
        // batch_bytes_max <= queue_bytes_max <= u32::MAX (validated).
        let permits = u32::try_from(bytes).map_err(|_| too_large)?;
        Ok((bytes, permits))
    }
}

/// State of the writer thread.
struct Writer {
    store: Arc<dyn Store>,
    receiver: mpsc::Receiver<Command>,
    config: GroupCommitConfig,
    stats: Arc<GroupCommitStats>,
    /// A request that did not fit in the previous batch; it opens the next.
    carried: Option<Request>,
}

impl Writer {
    /// Writes batches until shut down (or every sender is gone) and the
    /// queue is empty.
    fn run(mut self) {
        while let Some(first) = self.next_first() {
            let batch = self.gather(first);
            self.write(batch);
        }
        tracing::debug!("storage writer stopped");
    }

    /// The request that opens the next batch, blocking until there is one;
    /// `None` once the queue is closed and drained.
    fn next_first(&mut self) -> Option<Request> {
        if let Some(request) = self.carried.take() {
            return Some(request);
        }
        // Each Shutdown command is seen at most once, and a closed channel
        // holds a bounded number of buffered commands.
        loop {
            match self.receiver.blocking_recv()? {
                Command::Append(request) => return Some(request),
                // Buffered requests are still received after close.
                Command::Shutdown => self.receiver.close(),
            }
        }
    }

    /// Adds to `first` whatever is already queued, within the batch limits.
    fn gather(&mut self, first: Request) -> Vec<Request> {
        let mut entries = first.entries.len();
        let mut bytes = first.bytes;
        let mut batch = vec![first];
        while entries < self.config.batch_entries_max && bytes < self.config.batch_bytes_max {
            let request = match self.receiver.try_recv() {
                Ok(Command::Append(request)) => request,
                Ok(Command::Shutdown) => {
                    self.receiver.close();
                    continue;
                }
                // Empty, or closed and drained.
                Err(_) => break,
            };
            if entries + request.entries.len() > self.config.batch_entries_max
                || bytes + request.bytes > self.config.batch_bytes_max
            {
                self.carried = Some(request);
                break;
            }
            entries += request.entries.len();
            bytes += request.bytes;
            batch.push(request);
        }
        batch
    }

    /// Writes `batch` as one transaction (see [`write_parts`]) and
    /// completes its requests.
    fn write(&self, batch: Vec<Request>) {
        let started = Instant::now();
        let requests = batch.len() as u64;
        let report = write_parts(self.store.as_ref(), batch, |request| &request.entries);
        if report.entries_written > 0 {
            let latency_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
            let written = report.outcomes.iter().filter(|(_, outcome)| outcome.is_ok()).count() as u64;
            self.stats.record_batch(report.entries_written as u64, written.min(requests), latency_us);
        }
        self.stats.batches_failed.fetch_add(report.transactions_failed, Ordering::Relaxed);
        for (request, outcome) in report.outcomes {
            if outcome.is_err() {
                self.stats.requests_failed.fetch_add(1, Ordering::Relaxed);
            }
            request.complete(outcome);
        }
    }
}

/// What [`write_parts`] did with each part of a batch.
#[derive(Debug)]
pub struct WriteReport<R> {
    /// Each part with its outcome.
    pub outcomes: Vec<(R, Result<(), AppendError>)>,
    /// Entries made durable.
    pub entries_written: usize,
    /// Transactions that failed as a whole (storage failure, not one room's entries).
    pub transactions_failed: u64,
}

/// Group commit's write step: the entries of every part of a batch in one
/// durable transaction. A transaction refused for one room's entries (a
/// caller bug) is retried without that room's parts, so one faulty room
/// does not fail the others; each retry removes at least one part. Runs on
/// the writer thread, and in the simulation over its own store.
pub fn write_parts<R>(
    store: &dyn Store,
    mut parts: Vec<R>,
    entries_of: impl Fn(&R) -> &[LogEntry],
) -> WriteReport<R> {
    let mut report =
        WriteReport { outcomes: Vec::with_capacity(parts.len()), entries_written: 0, transactions_failed: 0 };
    let attempts_max = parts.len();
    for _ in 0..attempts_max {
        let entries: Vec<LogEntry> = parts.iter().flat_map(|part| entries_of(part).iter().cloned()).collect();
        let error = match store.append_batch(&entries) {
            Ok(()) => {
                report.entries_written += entries.len();
                report.outcomes.extend(parts.into_iter().map(|part| (part, Ok(()))));
                return report;
            }
            Err(error) => error,
        };
        let Some(room_id) = error.offending_room() else {
            tracing::error!(%error, parts = parts.len(), "durable append batch failed");
            report.transactions_failed += 1;
            report.outcomes.extend(parts.into_iter().map(|part| (part, Err(error.clone()))));
            return report;
        };
        let (refused, rest): (Vec<R>, Vec<R>) =
            parts.into_iter().partition(|part| entries_of(part).iter().any(|entry| entry.room_id == room_id));
        tracing::warn!(%error, refused = refused.len(), "append refused for one room");
        if refused.is_empty() {
            // The store blamed a room that is not in the batch.
            report.transactions_failed += 1;
            report.outcomes.extend(rest.into_iter().map(|part| (part, Err(error.clone()))));
            return report;
        }
        report.outcomes.extend(refused.into_iter().map(|part| (part, Err(error.clone()))));
        if rest.is_empty() {
            return report;
        }
        parts = rest;
    }
    // Unreachable in practice (each attempt removes a part), but the loop
    // is bounded: whatever remains is failed, never acknowledged.
    let error = AppendError::Internal(super::InvariantViolation("group commit retries exhausted".to_owned()));
    report.transactions_failed += 1;
    report.outcomes.extend(parts.into_iter().map(|part| (part, Err(error.clone()))));
    report
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    use bytes::Bytes;
    use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

    use super::*;
    use crate::store::suite::{entry, room};
    use crate::store::*;

    /// Bound on every wait in these tests, so a bug fails them instead of
    /// hanging them.
    const WAIT: Duration = Duration::from_secs(20);
    /// How long a ticket is watched to show it is still pending.
    const PENDING: Duration = Duration::from_millis(100);

    /// A memory store whose appends can be held, failed or made to panic.
    struct ScriptedStore {
        inner: MemoryStore,
        gated: AtomicBool,
        fail: AtomicBool,
        panic: AtomicBool,
        entered: UnboundedSender<usize>,
        release: Mutex<std::sync::mpsc::Receiver<()>>,
    }

    struct Script {
        store: Arc<ScriptedStore>,
        entered: UnboundedReceiver<usize>,
        release: std::sync::mpsc::Sender<()>,
    }

    impl Script {
        fn new(gated: bool) -> Self {
            let (entered_sender, entered) = unbounded_channel();
            let (release, release_receiver) = std::sync::mpsc::channel();
            let store = Arc::new(ScriptedStore {
                inner: MemoryStore::new(),
                gated: AtomicBool::new(gated),
                fail: AtomicBool::new(false),
                panic: AtomicBool::new(false),
                entered: entered_sender,
                release: Mutex::new(release_receiver),
            });
            Self { store, entered, release }
        }

        fn start(&self, config: GroupCommitConfig) -> GroupCommit {
            GroupCommit::start(Arc::clone(&self.store) as Arc<dyn Store>, config).unwrap()
        }

        /// Waits until the writer is inside an append of `entries` entries.
        async fn expect_append(&mut self, entries: usize) {
            let got = tokio::time::timeout(WAIT, self.entered.recv()).await.unwrap().unwrap();
            assert_eq!(got, entries, "entries in the append attempt");
        }

        /// Lets the held append proceed.
        fn release(&self) {
            self.release.send(()).unwrap();
        }

        async fn expect_and_release(&mut self, entries: usize) {
            self.expect_append(entries).await;
            self.release();
        }

        /// Releases append attempts until they total `entries` entries.
        async fn release_until_total(&mut self, entries: usize) {
            let mut total = 0;
            while total < entries {
                total += tokio::time::timeout(WAIT, self.entered.recv()).await.unwrap().unwrap();
                self.release();
            }
            assert_eq!(total, entries);
        }

        fn stored(&self, room_id: RoomId) -> Vec<StoredEntry> {
            self.store.inner.read_range(room_id, 0, usize::MAX).unwrap()
        }
    }

    impl Store for ScriptedStore {
        fn append_batch(&self, entries: &[LogEntry]) -> Result<(), AppendError> {
            let _ = self.entered.send(entries.len());
            if self.gated.load(Ordering::SeqCst) {
                let release = self.release.lock().unwrap();
                release.recv_timeout(WAIT).expect("the test releases the append");
            }
            if self.panic.load(Ordering::SeqCst) {
                panic!("scripted store panics on purpose");
            }
            if self.fail.load(Ordering::SeqCst) {
                return Err(
                    StorageFailure::new("append_batch", std::io::Error::other("scripted failure")).into()
                );
            }
            self.inner.append_batch(entries)
        }
        fn read_range(
            &self,
            room_id: RoomId,
            from: LogIndex,
            count_max: usize,
        ) -> Result<Vec<StoredEntry>, ReadError> {
            self.inner.read_range(room_id, from, count_max)
        }
        fn next_log_index(&self, room_id: RoomId) -> Result<LogIndex, ReadError> {
            self.inner.next_log_index(room_id)
        }
        fn room_heads(&self, after: Option<RoomId>, count_max: usize) -> Result<Vec<RoomHead>, ReadError> {
            self.inner.room_heads(after, count_max)
        }
        fn put_key_packages(
            &self,
            user_id: UserId,
            packages: &[KeyPackageUpload],
            last_resort: Option<Bytes>,
        ) -> Result<(), KeyPackageError> {
            self.inner.put_key_packages(user_id, packages, last_resort)
        }
        fn claim_key_package(&self, user_id: UserId) -> Result<Option<ClaimedKeyPackage>, KeyPackageError> {
            self.inner.claim_key_package(user_id)
        }
        fn record_handed_out_claims(
            &self,
            claims: &[(UserId, Vec<u8>)],
            now_ms: u64,
        ) -> Result<(), KeyPackageError> {
            self.inner.record_handed_out_claims(claims, now_ms)
        }
        fn handed_out_claims(&self, user_id: UserId) -> Result<Vec<HandedOutClaim>, KeyPackageError> {
            self.inner.handed_out_claims(user_id)
        }
        fn count_key_packages(&self, user_id: UserId) -> Result<KeyPackageCount, KeyPackageError> {
            self.inner.count_key_packages(user_id)
        }
        fn put_group_info(&self, room_id: RoomId, record: &GroupInfoRecord) -> Result<(), GroupInfoError> {
            self.inner.put_group_info(room_id, record)
        }
        fn group_info(&self, room_id: RoomId) -> Result<Option<GroupInfoRecord>, GroupInfoError> {
            self.inner.group_info(room_id)
        }
        fn put_welcomes(
            &self,
            room_id: RoomId,
            recipients: &[UserId],
            welcome: Bytes,
        ) -> Result<StoredWelcome, WelcomeError> {
            self.inner.put_welcomes(room_id, recipients, welcome)
        }
        fn pending_welcomes(
            &self,
            recipient_user_id: UserId,
            after: Option<WelcomeId>,
        ) -> Result<Vec<PendingWelcome>, WelcomeError> {
            self.inner.pending_welcomes(recipient_user_id, after)
        }
        fn delete_welcomes_for_room(
            &self,
            recipient_user_id: UserId,
            room_id: RoomId,
        ) -> Result<usize, WelcomeError> {
            self.inner.delete_welcomes_for_room(recipient_user_id, room_id)
        }
        fn welcome_counts(&self) -> Result<WelcomeCounts, WelcomeError> {
            self.inner.welcome_counts()
        }
        fn delete_welcomes(
            &self,
            recipient_user_id: UserId,
            ids: &[WelcomeId],
        ) -> Result<usize, WelcomeError> {
            self.inner.delete_welcomes(recipient_user_id, ids)
        }
        fn delete_welcomes_through(
            &self,
            recipient_user_id: UserId,
            through: WelcomeId,
        ) -> Result<usize, WelcomeError> {
            self.inner.delete_welcomes_through(recipient_user_id, through)
        }
        fn put_room_metadata(
            &self,
            room_id: RoomId,
            metadata: &RoomMetadata,
        ) -> Result<(), RoomMetadataError> {
            self.inner.put_room_metadata(room_id, metadata)
        }
        fn room_metadata(&self, room_id: RoomId) -> Result<Option<RoomMetadata>, RoomMetadataError> {
            self.inner.room_metadata(room_id)
        }
        fn record_remote_user(
            &self,
            user_id: UserId,
            home: &kalandra_proto::federation::DomainName,
        ) -> Result<(), crate::store::RemoteRecordError> {
            self.inner.record_remote_user(user_id, home)
        }
        fn remote_user_home(
            &self,
            user_id: UserId,
        ) -> Result<Option<kalandra_proto::federation::DomainName>, crate::store::RemoteRecordError> {
            self.inner.remote_user_home(user_id)
        }
        fn remote_users(
            &self,
            after: Option<UserId>,
            count_max: usize,
        ) -> Result<Vec<(UserId, kalandra_proto::federation::DomainName)>, crate::store::RemoteRecordError>
        {
            self.inner.remote_users(after, count_max)
        }
        fn record_remote_room(
            &self,
            room_id: RoomId,
            authority: &kalandra_proto::federation::DomainName,
        ) -> Result<(), crate::store::RemoteRecordError> {
            self.inner.record_remote_room(room_id, authority)
        }
        fn remote_rooms(
            &self,
        ) -> Result<Vec<(RoomId, kalandra_proto::federation::DomainName)>, crate::store::RemoteRecordError>
        {
            self.inner.remote_rooms()
        }
        fn record_moderation(
            &self,
            change: &crate::store::ModerationChange,
            event: &crate::room::audit::AuditEvent,
        ) -> Result<crate::room::audit::AuditRecord, crate::store::ModerationStoreError> {
            self.inner.record_moderation(change, event)
        }
        fn room_moderation(
            &self,
            room_id: RoomId,
        ) -> Result<crate::store::RoomModeration, crate::store::ModerationStoreError> {
            self.inner.room_moderation(room_id)
        }
        fn audit_records(
            &self,
            from_seq: u64,
            count_max: usize,
        ) -> Result<Vec<(u64, Bytes)>, crate::store::ModerationStoreError> {
            self.inner.audit_records(from_seq, count_max)
        }
        fn audit_head(
            &self,
        ) -> Result<Option<crate::room::audit::AuditHead>, crate::store::ModerationStoreError> {
            self.inner.audit_head()
        }
        fn redact(
            &self,
            room_id: RoomId,
            log_indices: &[LogIndex],
            redaction: &Redaction,
        ) -> Result<Vec<RedactOutcome>, RedactError> {
            self.inner.redact(room_id, log_indices, redaction)
        }
        fn erasures_after(
            &self,
            room_id: RoomId,
            after_seq: u64,
            count_max: usize,
        ) -> Result<Vec<crate::store::JournaledErasure>, ReadError> {
            self.inner.erasures_after(room_id, after_seq, count_max)
        }
        fn replica_erasure_cursor(&self, room_id: RoomId) -> Result<u64, ReadError> {
            self.inner.replica_erasure_cursor(room_id)
        }
        fn redact_replicated(
            &self,
            room_id: RoomId,
            log_indices: &[LogIndex],
            redaction: &Redaction,
            cursor: u64,
        ) -> Result<Vec<RedactOutcome>, RedactError> {
            self.inner.redact_replicated(room_id, log_indices, redaction, cursor)
        }
        fn redact_audited(
            &self,
            room_id: RoomId,
            log_indices: &[LogIndex],
            redaction: &Redaction,
            event: &crate::room::audit::AuditEvent,
        ) -> Result<(Vec<RedactOutcome>, Option<crate::room::audit::AuditRecord>), RedactError> {
            self.inner.redact_audited(room_id, log_indices, redaction, event)
        }
        fn set_retention_audited(
            &self,
            room_id: RoomId,
            retention_ms: Option<u64>,
            event: &crate::room::audit::AuditEvent,
        ) -> Result<crate::room::audit::AuditRecord, RetentionError> {
            self.inner.set_retention_audited(room_id, retention_ms, event)
        }
        fn data_key(&self, room_id: RoomId, log_index: LogIndex) -> Result<Option<DataKey>, ReadError> {
            self.inner.data_key(room_id, log_index)
        }
        fn set_retention(&self, room_id: RoomId, retention_ms: Option<u64>) -> Result<(), RetentionError> {
            self.inner.set_retention(room_id, retention_ms)
        }
        fn retention(&self, room_id: RoomId) -> Result<Option<RoomRetention>, RetentionError> {
            self.inner.retention(room_id)
        }
        fn retention_rooms(
            &self,
            after: Option<RoomId>,
            count_max: usize,
        ) -> Result<Vec<RoomRetention>, RetentionError> {
            self.inner.retention_rooms(after, count_max)
        }
        fn advance_retention(&self, room_id: RoomId, swept_next: LogIndex) -> Result<(), RetentionError> {
            self.inner.advance_retention(room_id, swept_next)
        }
    }

    async fn assert_pending(ticket: &mut AppendTicket) {
        assert!(
            tokio::time::timeout(PENDING, ticket).await.is_err(),
            "completed before its batch was durable"
        );
    }

    async fn settle(ticket: AppendTicket) -> Result<(), GroupCommitError> {
        tokio::time::timeout(WAIT, ticket).await.expect("ticket completes")
    }

    fn small_config() -> GroupCommitConfig {
        GroupCommitConfig {
            queue_requests_max: 64,
            queue_bytes_max: 10_000,
            batch_entries_max: 64,
            batch_bytes_max: 5_000,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn acknowledges_only_after_the_write() {
        let mut script = Script::new(true);
        let gc = script.start(small_config());
        let mut ticket = gc.submit(vec![entry(room(1), 0)]).await.unwrap();
        script.expect_append(1).await;
        assert_pending(&mut ticket).await;
        assert!(script.stored(room(1)).is_empty());
        script.release();
        settle(ticket).await.unwrap();
        assert_eq!(script.stored(room(1)), vec![entry(room(1), 0)]);
        let stats = gc.stats();
        assert_eq!((stats.batches_written, stats.entries_written, stats.requests_acknowledged), (1, 1, 1));
        gc.shutdown().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queued_requests_share_one_transaction() {
        let mut script = Script::new(true);
        let gc = script.start(small_config());
        let first = gc.submit(vec![entry(room(1), 0)]).await.unwrap();
        script.expect_append(1).await;
        let mut queued = Vec::new();
        for n in 2..=4 {
            queued.push(gc.submit(vec![entry(room(n), 0), entry(room(n), 1)]).await.unwrap());
        }
        assert_eq!(gc.stats().queued_requests, 3);
        script.release();
        script.expect_and_release(6).await;
        settle(first).await.unwrap();
        for ticket in queued {
            settle(ticket).await.unwrap();
        }
        let stats = gc.stats();
        assert_eq!(stats.batches_written, 2);
        assert_eq!(stats.entries_written, 7);
        assert_eq!(stats.requests_acknowledged, 4);
        assert_eq!(stats.last_batch_entries, 6);
        assert_eq!(stats.queued_requests, 0);
        assert!(stats.batch_latency_us_max >= stats.last_batch_latency_us);
        assert!(stats.batch_latency_us_total >= stats.batch_latency_us_max);
        gc.shutdown().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batches_respect_entry_and_byte_limits() {
        // Frames are 40 bytes: three fit in 120 bytes, not in 100.
        let mut script = Script::new(true);
        let config = GroupCommitConfig { batch_entries_max: 3, batch_bytes_max: 100, ..small_config() };
        let gc = script.start(config);
        let first = gc.submit(vec![entry(room(1), 0)]).await.unwrap();
        script.expect_append(1).await;
        let tickets = vec![
            gc.submit(vec![entry(room(1), 1)]).await.unwrap(),
            gc.submit(vec![entry(room(1), 2), entry(room(1), 3)]).await.unwrap(),
            gc.submit(vec![entry(room(2), 0)]).await.unwrap(),
            gc.submit(vec![entry(room(3), 0)]).await.unwrap(),
            gc.submit(vec![entry(room(4), 0)]).await.unwrap(),
            gc.submit(vec![entry(room(5), 0)]).await.unwrap(),
        ];
        script.release();
        // 1 entry + 2 would be 120 bytes: carried over. Then 2 + 1 = 120:
        // carried. Then 1 + 1 = 80 and a third would be 120: carried, twice.
        for expected in [1, 2, 2, 2] {
            script.expect_and_release(expected).await;
        }
        settle(first).await.unwrap();
        for ticket in tickets {
            settle(ticket).await.unwrap();
        }
        assert_eq!(script.stored(room(1)).len(), 4);
        assert_eq!(gc.stats().batches_written, 5);

        // Too large for any batch: refused at once.
        let four = (0..4).map(|i| entry(room(9), i)).collect();
        assert!(matches!(
            gc.submit(four).await,
            Err(SubmitError::TooLarge { entries: 4, entries_max: 3, .. })
        ));
        let wide = LogEntry { room_id: room(9), log_index: 0, frame: Bytes::from(vec![0u8; 101]) };
        assert!(matches!(
            gc.try_submit(vec![wide]),
            Err(SubmitError::TooLarge { bytes: 101, bytes_max: 100, .. })
        ));
        assert_eq!(gc.submit(Vec::new()).await.unwrap_err(), SubmitError::Empty);
        script.store.gated.store(false, Ordering::SeqCst);
        gc.shutdown().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn entry_limit_splits_batches() {
        let mut script = Script::new(true);
        let gc = script.start(GroupCommitConfig { batch_entries_max: 2, ..small_config() });
        let first = gc.submit(vec![entry(room(1), 0)]).await.unwrap();
        script.expect_append(1).await;
        let mut tickets = Vec::new();
        for n in 2..=6 {
            tickets.push(gc.submit(vec![entry(room(n), 0)]).await.unwrap());
        }
        script.release();
        for expected in [2, 2, 1] {
            script.expect_and_release(expected).await;
        }
        settle(first).await.unwrap();
        for ticket in tickets {
            settle(ticket).await.unwrap();
        }
        gc.shutdown().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_storage_failure_fails_the_whole_batch_and_writes_nothing() {
        let mut script = Script::new(true);
        let gc = script.start(small_config());
        let first = gc.submit(vec![entry(room(1), 0)]).await.unwrap();
        script.expect_append(1).await;
        let second = gc.submit(vec![entry(room(2), 0)]).await.unwrap();
        let third = gc.submit(vec![entry(room(3), 0), entry(room(3), 1)]).await.unwrap();
        script.store.fail.store(true, Ordering::SeqCst);
        script.release();
        script.expect_and_release(3).await;
        for ticket in [first, second, third] {
            match settle(ticket).await {
                Err(GroupCommitError::Append(error)) => assert_eq!(error.kind(), ErrorKind::Storage),
                other => panic!("expected a storage failure, got {other:?}"),
            }
        }
        for n in 1..=3 {
            assert!(script.stored(room(n)).is_empty());
        }
        let stats = gc.stats();
        assert_eq!((stats.batches_failed, stats.requests_failed, stats.batches_written), (2, 3, 0));
        // Nothing was half-written: the same indices go through afterwards.
        script.store.fail.store(false, Ordering::SeqCst);
        script.store.gated.store(false, Ordering::SeqCst);
        gc.append(vec![entry(room(3), 0), entry(room(3), 1)]).await.unwrap();
        assert_eq!(script.stored(room(3)).len(), 2);
        gc.shutdown().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_faulty_room_does_not_fail_the_others() {
        let mut script = Script::new(true);
        let gc = script.start(small_config());
        let first = gc.submit(vec![entry(room(1), 0)]).await.unwrap();
        script.expect_append(1).await;
        let good_1 = gc.submit(vec![entry(room(2), 0)]).await.unwrap();
        let bad_1 = gc.submit(vec![entry(room(3), 5)]).await.unwrap();
        let good_2 = gc.submit(vec![entry(room(2), 1)]).await.unwrap();
        let bad_2 = gc.submit(vec![entry(room(3), 6)]).await.unwrap();
        script.release();
        script.expect_and_release(4).await;
        script.expect_and_release(2).await;
        settle(first).await.unwrap();
        settle(good_1).await.unwrap();
        settle(good_2).await.unwrap();
        for ticket in [bad_1, bad_2] {
            match settle(ticket).await {
                Err(GroupCommitError::Append(AppendError::IndexNotDense {
                    room_id,
                    expected_log_index: 0,
                    found_log_index: 5,
                })) => {
                    assert_eq!(room_id, room(3));
                }
                other => panic!("expected IndexNotDense, got {other:?}"),
            }
        }
        assert_eq!(script.stored(room(2)), vec![entry(room(2), 0), entry(room(2), 1)]);
        assert!(script.stored(room(3)).is_empty());
        let stats = gc.stats();
        assert_eq!((stats.batches_written, stats.requests_failed, stats.batches_failed), (2, 2, 0));
        gc.shutdown().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_queue_pushes_back() {
        let mut script = Script::new(true);
        let config = GroupCommitConfig {
            queue_requests_max: 1,
            queue_bytes_max: 100,
            batch_bytes_max: 100,
            ..small_config()
        };
        let gc = script.start(config);
        let first = gc.submit(vec![entry(room(1), 0)]).await.unwrap();
        script.expect_append(1).await;
        // One request slot left; 40 of 100 bytes are being written.
        let second = gc.try_submit(vec![entry(room(2), 0)]).unwrap();
        assert_eq!(gc.try_submit(vec![entry(room(3), 0)]).unwrap_err(), SubmitError::QueueFull);
        // An async submit waits for room instead.
        let waiting = {
            let gc = gc.clone();
            tokio::spawn(async move { gc.submit(vec![entry(room(3), 0)]).await })
        };
        tokio::time::sleep(PENDING).await;
        assert!(!waiting.is_finished(), "a submit into a full queue waits");
        script.release();
        // The second and third requests, in one batch or two depending on
        // when the waiting submit gets its slot.
        script.release_until_total(2).await;
        let third = tokio::time::timeout(WAIT, waiting).await.unwrap().unwrap().unwrap();
        for ticket in [first, second, third] {
            settle(ticket).await.unwrap();
        }

        // Bytes bound the queue too: 100 bytes at most.
        let gc_bytes =
            script.start(GroupCommitConfig { queue_bytes_max: 100, batch_bytes_max: 100, ..small_config() });
        let a = gc_bytes.submit(vec![entry(room(4), 0)]).await.unwrap();
        script.expect_append(1).await;
        let b = gc_bytes.try_submit(vec![entry(room(5), 0)]).unwrap();
        assert_eq!(gc_bytes.try_submit(vec![entry(room(6), 0)]).unwrap_err(), SubmitError::QueueFull);
        script.release();
        script.expect_and_release(1).await;
        settle(a).await.unwrap();
        settle(b).await.unwrap();
        script.store.gated.store(false, Ordering::SeqCst);
        gc.shutdown().await.unwrap();
        gc_bytes.shutdown().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_refuses_new_requests_and_flushes_queued_ones() {
        let mut script = Script::new(true);
        let gc = script.start(small_config());
        let first = gc.submit(vec![entry(room(1), 0)]).await.unwrap();
        script.expect_append(1).await;
        let queued = vec![
            gc.submit(vec![entry(room(1), 1)]).await.unwrap(),
            gc.submit(vec![entry(room(2), 0)]).await.unwrap(),
        ];
        let mut shutdown = Box::pin(gc.shutdown());
        // Started, but held up by the queued writes.
        assert!(tokio::time::timeout(PENDING, &mut shutdown).await.is_err());
        assert_eq!(gc.try_submit(vec![entry(room(3), 0)]).unwrap_err(), SubmitError::ShutDown);
        assert_eq!(gc.submit(vec![entry(room(3), 0)]).await.unwrap_err(), SubmitError::ShutDown);
        script.release();
        script.expect_and_release(2).await;
        tokio::time::timeout(WAIT, shutdown).await.unwrap().unwrap();
        settle(first).await.unwrap();
        for ticket in queued {
            settle(ticket).await.unwrap();
        }
        assert_eq!(script.stored(room(1)).len(), 2);
        assert_eq!(script.stored(room(2)).len(), 1);
        assert!(script.stored(room(3)).is_empty());
        // A second shutdown is harmless.
        gc.shutdown().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropping_every_handle_still_writes_what_was_queued() {
        let script = Script::new(false);
        let gc = script.start(small_config());
        let mut tickets = Vec::new();
        for i in 0..20 {
            tickets.push(gc.submit(vec![entry(room(1), i)]).await.unwrap());
        }
        drop(gc);
        for ticket in tickets {
            settle(ticket).await.unwrap();
        }
        assert_eq!(script.stored(room(1)).len(), 20);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_writer_never_acknowledges() {
        let script = Script::new(false);
        script.store.panic.store(true, Ordering::SeqCst);
        let gc = script.start(small_config());
        let ticket = gc.submit(vec![entry(room(1), 0)]).await.unwrap();
        assert!(matches!(settle(ticket).await, Err(GroupCommitError::WriterStopped)));
        // The queue's receiver is gone with the thread. A request sent in
        // the instant the receiver is dropped may stay in the channel, its
        // ticket unresolved, until the last sender goes (tokio drains the
        // queue once, on drop): wait for each ticket a moment only.
        let refused = tokio::time::timeout(WAIT, async {
            loop {
                match gc.submit(vec![entry(room(1), 0)]).await {
                    Err(error) => return error,
                    Ok(ticket) => {
                        let answered = tokio::time::timeout(PENDING, ticket).await;
                        assert!(!matches!(answered, Ok(Ok(()))), "nothing is acknowledged after the panic");
                    }
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(refused, SubmitError::ShutDown);
        assert!(matches!(gc.shutdown().await, Err(GroupCommitError::WriterStopped)));
        assert!(script.stored(room(1)).is_empty());
    }

    /// Many submitters on a real redb file: every acknowledged entry is
    /// stored, in order, including from a submitter that pipelines.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_submitters_on_redb() {
        const TASKS: u8 = 24;
        const PER_TASK: u64 = 40;
        const PIPELINED: u64 = 300;
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RedbStore::open(dir.path().join("gc.redb")).unwrap());
        let gc =
            GroupCommit::start(Arc::clone(&store) as Arc<dyn Store>, GroupCommitConfig::default()).unwrap();
        let mut tasks = Vec::new();
        for n in 1..=TASKS {
            let gc = gc.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..PER_TASK {
                    gc.append(vec![entry(room(n), i)]).await.unwrap();
                }
            }));
        }
        let pipelined = {
            let gc = gc.clone();
            tokio::spawn(async move {
                let mut tickets = Vec::new();
                for i in 0..PIPELINED {
                    tickets.push(gc.submit(vec![entry(room(200), i)]).await.unwrap());
                }
                for ticket in tickets {
                    ticket.await.unwrap();
                }
            })
        };
        for task in tasks {
            tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
        }
        tokio::time::timeout(WAIT, pipelined).await.unwrap().unwrap();
        gc.shutdown().await.unwrap();
        for n in 1..=TASKS {
            let expected: Vec<LogEntry> = (0..PER_TASK).map(|i| entry(room(n), i)).collect();
            assert_eq!(store.read_range(room(n), 0, usize::MAX).unwrap(), expected);
        }
        assert_eq!(store.next_log_index(room(200)).unwrap(), PIPELINED);
        let stats = gc.stats();
        let total = u64::from(TASKS) * PER_TASK + PIPELINED;
        assert_eq!(stats.entries_written, total);
        assert_eq!(stats.requests_acknowledged, total);
        assert!(stats.batches_written < total, "some requests shared a transaction");
    }

    #[test]
    fn config_validation() {
        let ok = GroupCommitConfig::default();
        assert_eq!(ok.validate(), Ok(()));
        let cases = [
            (GroupCommitConfig { queue_requests_max: 0, ..ok }, ConfigError::Zero("queue_requests_max")),
            (GroupCommitConfig { batch_entries_max: 0, ..ok }, ConfigError::Zero("batch_entries_max")),
            (GroupCommitConfig { batch_bytes_max: 0, ..ok }, ConfigError::Zero("batch_bytes_max")),
            (
                GroupCommitConfig { queue_bytes_max: ok.batch_bytes_max - 1, ..ok },
                ConfigError::QueueBytesBelowBatchBytes,
            ),
            (
                GroupCommitConfig { queue_bytes_max: u32::MAX as usize + 1, ..ok },
                ConfigError::QueueBytesTooLarge,
            ),
        ];
        for (config, expected) in cases {
            assert_eq!(config.validate(), Err(expected));
            let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
            assert!(matches!(GroupCommit::start(store, config), Err(StartError::Config(e)) if e == expected));
        }
    }
}
