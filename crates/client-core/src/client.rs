//! A device: identity, rooms, outbox and history, persisted in an encrypted
//! [`ClientStore`] and driven over one [`Connection`].
//!
//! This is the layer apps and the `kalandra` CLI use. It is a driver: the
//! decisions are made by the pure parts ([`crate::room_log::RoomLog`], which
//! applies each room's log on [`crate::mls::RoomGroup`],
//! [`crate::sender_keys`] and [`crate::state`]); this module adds the
//! connection, the store and the clock, and persists what the room logs
//! say.
//!
//! # Crash safety
//!
//! The MLS state, each room's next log index, its sender-key state, the
//! outbox and the history are written together in one store transaction (a
//! *checkpoint*) after each step, so a restarted client resumes from a
//! consistent point:
//!
//! - frames after the checkpoint are read again from the server and applied
//!   again (nothing before it is applied twice: the log index is the cursor);
//! - a message is sealed and put in the outbox, with the sending chain
//!   advanced, in one checkpoint *before* it is sent, so a generation is
//!   never reused. After a restart the outbox entry is resolved by the log:
//!   if the room's log holds our frame of that epoch and generation, it was
//!   sequenced (recorded, not resent); otherwise it is sent again, resealed
//!   if the epoch moved on. Receivers refuse a replayed generation, so even
//!   a frame sequenced twice shows once;
//! - a commit is kept pending in the MLS state with its frame, and settled
//!   by the log the same way (our commit in the log: merged; another
//!   commit for that epoch: discarded and the intent redone; neither: sent
//!   again).
//!
//! Failed sends are retried with exponential backoff ([`backoff_ms`]).
//!
//! # One room's trouble stays in that room
//!
//! Calls that go over every room ([`Client::connect`], the outbox,
//! [`Client::background_sync`]) handle each room on its own: a room that
//! fails is reported as a [`RoomFailure`] and the others go on. Only what
//! concerns the whole device stops them: the connection and the store.
//! A frame that fails to apply is not read past ([`RoomLog::apply`]), so a
//! failed room is tried again from where it stopped.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ed25519_dalek::SigningKey;
use kalandra_proto::federation::{PeerKey, PeerKeys};
use kalandra_proto::payload::{
    self, Ack, Commit, CreateRoom, DomainKeys, DomainKeysRequest, ExternalJoin, GroupInfo, GroupInfoRequest,
    JoinRule, KeyPackageClaim, KeyPackageClaimed, KeyPackageStatus, KeyPackageUpload, Subscribe, Sync,
    SyncDone, DOMAINS_PER_KEYS_REQUEST_MAX,
};
use kalandra_proto::{ErrorCode, Frame, FrameHeaderBuf, Opcode, Payload, RoomId, SenderId};
use openmls_memory_storage::MemoryStorage;
use openmls_traits::OpenMlsProvider as _;
use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::connection::{Connection, ConnectionError};
use crate::mls::{
    generate_key_packages, generate_last_resort_key_package, CommitError, CreateRoomError, ExportError,
    Identity, IdentityError, JoinError, KeyPackageError, MlsProvider, PendingCommitError, ProcessError,
    RoomGroup, SeededCrypto, StorageError,
};
use crate::push::SealPushError;
use crate::room_log::{
    is_erased_placeholder, member_of, sender_of, step, CommitRefusal, EntryBody, Intent, LogEntry, RoomLog,
    RoomLogError, RoomRecord, SentMessage,
};
use crate::sender_keys::{SealError, SenderKeyStateDecodeError};
use crate::state::{Action, ClientState, Event};
use crate::store::{ClientStore, Namespace, StoreError, StoreKey, WriteBatch};

mod background;
mod key_cache;
mod recovery;
pub use background::{BackgroundReport, BackgroundStep, CONTROL_FRAMES_PER_REQUEST, CONTROL_ROUNDS_MAX};
pub use key_cache::KEY_CACHE_FILE_NAME;
pub use recovery::COMMIT_REPORT_AGAIN_AFTER_MS;

/// File name of the store inside a client's data directory.
pub const STORE_FILE_NAME: &str = "client.redb";
/// Key packages kept on the server: refilled to this many when low.
pub const KEY_PACKAGES_TARGET: u32 = 32;
/// Refill when fewer than this many are left.
pub const KEY_PACKAGES_LOW_WATERMARK: u32 = 8;
/// Messages waiting in the outbox at most.
pub const OUTBOX_ENTRIES_MAX: usize = 1024;
/// Attempts of one commit (invite) before giving up on repeated `WrongEpoch`.
pub const COMMIT_ATTEMPTS_MAX: u32 = 8;
/// Attempts of one send within one call before leaving it to the outbox.
pub const SEND_ATTEMPTS_MAX: u32 = 8;
/// First retry delay of the outbox.
pub const BACKOFF_INITIAL_MS: u64 = 250;
/// Longest retry delay of the outbox.
pub const BACKOFF_MAX_MS: u64 = 30_000;
/// Frames asked for per `Sync` request.
pub const SYNC_FRAMES_PER_REQUEST: u32 = 1024;
/// `Sync` rounds of one catch-up (bounds the loop: 4 M frames).
pub const CATCH_UP_ROUNDS_MAX: usize = 4096;
/// Longest message body.
pub const MESSAGE_BYTES_MAX: usize = 60 * 1024;
/// Frames read while waiting for one Welcome, at most.
pub const WELCOME_WAIT_FRAMES_MAX: usize = 100_000;

const _: () = assert!(KEY_PACKAGES_LOW_WATERMARK < KEY_PACKAGES_TARGET);
const _: () = assert!(BACKOFF_INITIAL_MS < BACKOFF_MAX_MS);
const _: () = assert!(SYNC_FRAMES_PER_REQUEST <= kalandra_proto::limits::SYNC_FRAMES_PER_REQUEST_MAX);

/// Delay before retry number `attempts` (1-based) of a failed send:
/// `BACKOFF_INITIAL_MS · 2^(attempts-1)`, at most [`BACKOFF_MAX_MS`].
pub fn backoff_ms(attempts: u32) -> u64 {
    let shift = attempts.saturating_sub(1).min(30);
    BACKOFF_INITIAL_MS.saturating_mul(1u64 << shift).min(BACKOFF_MAX_MS)
}

pub use crate::target::{ServerAddress, ServerTarget};
pub use crate::tls::ServerTrust;
/// A federation domain's name, as [`Client::invite_remote`] takes it.
pub use kalandra_proto::federation::DomainName;
pub use kalandra_proto::home::HomeCheck;

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server's signed log head does not hold: it showed this device a
    /// log it cannot stand behind (the proof is kept in the room's record,
    /// see [`Client::chain_violation`]).
    #[error(transparent)]
    LogHead(Box<crate::room_log::LogHeadError>),
    /// There is no client in the directory.
    #[error("no client in {path}: run `init` first")]
    NotInitialised {
        /// The directory.
        path: PathBuf,
    },
    /// `init` on a directory that has a client.
    #[error("a client already exists in {path}")]
    AlreadyInitialised {
        /// The directory.
        path: PathBuf,
    },
    /// The operation needs a connection.
    #[error("not connected to a server")]
    NotConnected,
    /// The room is not known to this device.
    #[error("room {0} is unknown to this device")]
    UnknownRoom(RoomId),
    /// This device is not (or no longer) a member of the room.
    #[error("not a member of room {0}")]
    NotMember(RoomId),
    /// This device's removal from the room is proposed (a kick, its leave):
    /// it can neither commit nor send there any more.
    #[error("this device's removal from room {0} is pending: it can no longer commit or send there")]
    RemovalPending(RoomId),
    /// Outbox messages for a room this device has left, or is being removed
    /// from, were dropped: they can never be sent.
    #[error("{messages} unsent messages for room {room} were dropped: this device is removed from the room")]
    Undelivered {
        /// The room.
        room: RoomId,
        /// How many messages.
        messages: usize,
    },
    /// The server refused the request.
    #[error("the server refused: {name} ({code}): {message}")]
    Refused {
        /// The error code.
        code: u16,
        /// Its name.
        name: &'static str,
        /// The server's message.
        message: String,
    },
    /// The request named a domain that is not a peer of this device's
    /// server (`UnknownDomain`): final, the domain is not federated with.
    #[error("unknown domain: {message}")]
    UnknownDomain {
        /// The server's message.
        message: String,
    },
    /// The peer domain refused the request, is refused by this device's
    /// server, or answered with what does not verify (`FederationRefused`):
    /// final.
    #[error("federation refused: {message}")]
    FederationRefused {
        /// The server's message.
        message: String,
    },
    /// The peer domain cannot be reached now (`DomainUnreachable`): the
    /// request may be retried later (see [`ClientError::is_retryable`]).
    #[error("domain unreachable (retry later): {message}")]
    DomainUnreachable {
        /// The server's message.
        message: String,
        /// When to retry, if the server said.
        retry_after_ms: Option<u64>,
    },
    /// The user is not a member of the room.
    #[error("{0} is not a member of the room")]
    UnknownMember(SenderId),
    /// A user to invite has no key package on the server.
    #[error("{0} has no key package on the server (they must connect once first)")]
    NoKeyPackage(SenderId),
    /// No Welcome for the room arrived in time.
    #[error("no invitation to room {room} arrived within {waited_ms} ms")]
    NoWelcome {
        /// The room.
        room: RoomId,
        /// How long we waited.
        waited_ms: u64,
    },
    /// Repeated refusals (the room kept moving): the intent stays undone.
    #[error("{what}: gave up after {attempts} attempts")]
    RetriesExhausted {
        /// What was attempted.
        what: &'static str,
        /// How often.
        attempts: u32,
    },
    /// The outbox is full.
    #[error("the outbox holds {OUTBOX_ENTRIES_MAX} messages already")]
    OutboxFull,
    /// The message is too long.
    #[error("message of {len_bytes} bytes exceeds {MESSAGE_BYTES_MAX}")]
    MessageTooLarge {
        /// Its length.
        len_bytes: usize,
    },
    /// A bug in this library: its state machine refused a transition.
    #[error("internal error: {0}")]
    Internal(String),
    /// The server sent something that breaks the protocol.
    #[error("server misbehaved: {0}")]
    Protocol(String),
    /// The connection failed.
    #[error(transparent)]
    Connection(#[from] ConnectionError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored record does not parse.
    #[error("stored state damaged: {0}")]
    Corrupt(String),
    /// Identity.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// Key packages.
    #[error(transparent)]
    KeyPackage(#[from] KeyPackageError),
    /// Creating a room.
    #[error(transparent)]
    CreateRoom(#[from] CreateRoomError),
    /// Making a commit.
    #[error(transparent)]
    Commit(#[from] CommitError),
    /// Settling a commit.
    #[error(transparent)]
    PendingCommit(#[from] PendingCommitError),
    /// Joining.
    #[error(transparent)]
    Join(#[from] JoinError),
    /// Processing a handshake message from the log.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// Exporting epoch secrets.
    #[error(transparent)]
    Export(#[from] ExportError),
    /// MLS storage.
    #[error(transparent)]
    MlsStorage(#[from] StorageError),
    /// Encrypting a message.
    #[error(transparent)]
    Seal(#[from] SealError),
    /// Stored sender keys.
    #[error(transparent)]
    SenderKeys(#[from] SenderKeyStateDecodeError),
    /// Sealing a push notification.
    #[error(transparent)]
    SealPush(#[from] SealPushError),
    /// The room's latest commit cannot be processed by this device: it
    /// waits for the server to void it or rejoins (`docs/RECOVERY.md`).
    /// Messages wait in the outbox meanwhile.
    #[error("room {0} is recovering from a commit this device cannot process")]
    Recovering(RoomId),
}

impl From<RoomLogError> for ClientError {
    fn from(error: RoomLogError) -> Self {
        match error {
            RoomLogError::Protocol(message) => ClientError::Protocol(message),
            RoomLogError::Internal(message) => ClientError::Internal(message),
            RoomLogError::NotMember(room_id) => ClientError::NotMember(room_id),
            RoomLogError::Process(error) => ClientError::Process(error),
            RoomLogError::PendingCommit(error) => ClientError::PendingCommit(error),
            RoomLogError::Join(error) => ClientError::Join(error),
            RoomLogError::Export(error) => ClientError::Export(error),
            RoomLogError::Storage(error) => ClientError::MlsStorage(error),
            RoomLogError::Seal(error) => ClientError::Seal(error),
            RoomLogError::SenderKeys(error) => ClientError::SenderKeys(error),
        }
    }
}

impl From<crate::room_log::LogHeadError> for ClientError {
    fn from(error: crate::room_log::LogHeadError) -> Self {
        ClientError::LogHead(Box::new(error))
    }
}

impl ClientError {
    fn refused(frame: &Frame) -> ClientError {
        match frame.decode_payload::<payload::Error>() {
            Ok(error) => match ErrorCode::from_u16(error.code) {
                Some(ErrorCode::UnknownDomain) => ClientError::UnknownDomain { message: error.message },
                Some(ErrorCode::FederationRefused) => {
                    ClientError::FederationRefused { message: error.message }
                }
                Some(ErrorCode::DomainUnreachable) => ClientError::DomainUnreachable {
                    message: error.message,
                    retry_after_ms: error.retry_after_ms,
                },
                known => ClientError::Refused {
                    code: error.code,
                    name: known.map_or("Unknown", ErrorCode::name),
                    message: error.message,
                },
            },
            Err(error) => ClientError::Protocol(format!("undecodable Error frame: {error}")),
        }
    }

    /// Whether the failure is the connection's (the operation can be retried
    /// once connected again), not the request's.
    pub fn is_transient(&self) -> bool {
        matches!(self, ClientError::NotConnected | ClientError::Connection(_) | ClientError::Recovering(_))
    }

    /// Whether the same request may succeed later without anything changed
    /// on this device: the connection's failures ([`Self::is_transient`])
    /// and a peer domain that cannot be reached now
    /// ([`ClientError::DomainUnreachable`]).
    pub fn is_retryable(&self) -> bool {
        self.is_transient() || matches!(self, ClientError::DomainUnreachable { .. })
    }

    /// Whether the failure is the whole device's (its connection or its
    /// store), not one room's: calls over every room stop at it.
    pub fn is_device_wide(&self) -> bool {
        self.is_transient() || matches!(self, ClientError::Store(_))
    }

    /// The server's error code, if the server refused.
    pub fn code(&self) -> Option<u16> {
        match self {
            ClientError::Refused { code, .. } => Some(*code),
            ClientError::UnknownDomain { .. } => Some(ErrorCode::UnknownDomain.to_u16()),
            ClientError::FederationRefused { .. } => Some(ErrorCode::FederationRefused.to_u16()),
            ClientError::DomainUnreachable { .. } => Some(ErrorCode::DomainUnreachable.to_u16()),
            _ => None,
        }
    }
}

/// Whether `reply` is the server's refusal to let this device read the
/// room any more: it is not a member (removed), or it is banned (removed,
/// and the server no longer remembers how far it may read). Either way the
/// room is left on this device.
pub(crate) fn refused_membership(reply: &Frame) -> bool {
    if reply.opcode() != Opcode::Error {
        return false;
    }
    let code = ClientError::refused(reply).code();
    code == Some(ErrorCode::NotMember.to_u16()) || code == Some(ErrorCode::Banned.to_u16())
}

/// A room that failed while a call went over every room (the other rooms
/// went on).
#[derive(Debug)]
pub struct RoomFailure {
    /// The room.
    pub room_id: RoomId,
    /// Why it failed.
    pub error: ClientError,
}

/// `error` of `room_id` as a [`RoomFailure`], or as the call's error when
/// it is the whole device's.
fn room_failure(room_id: RoomId, error: ClientError) -> Result<RoomFailure, ClientError> {
    if error.is_device_wide() {
        return Err(error);
    }
    Ok(RoomFailure { room_id, error })
}

/// What a history entry holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MessageBody {
    /// A message, decrypted.
    Text(Vec<u8>),
    /// A commit changed the room's members.
    Membership {
        /// The epoch after the commit.
        epoch: u64,
        /// Who joined.
        added: Vec<u64>,
        /// Who left or was removed.
        removed: Vec<u64>,
    },
    /// A message this device cannot read (sent before it joined, or damaged).
    Unreadable(String),
    /// The message was erased on the server (redaction or retention) before
    /// this device read it.
    Redacted,
}

/// One entry of a room's history on this device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// The room.
    pub room_id: [u8; 16],
    /// Its log index.
    pub log_index: u64,
    /// Who sent it.
    pub sender: u64,
    /// When the server sequenced it, ms since the Unix epoch.
    pub server_time_ms: u64,
    /// Its content.
    pub body: MessageBody,
}

/// Domains whose keys one [`Client::member_homes`] asks the server for
/// (four `DomainKeysRequest`s).
pub const MEMBER_HOME_DOMAINS_ASKED_MAX: usize = 4 * DOMAINS_PER_KEYS_REQUEST_MAX;

/// A last-resort package is made again this long before its lifetime or
/// its home certificate ends (it is handed out for as long as the server
/// holds it, so it must stay valid).
pub const LAST_RESORT_RENEW_BEFORE_SECS: u64 = 7 * 24 * 60 * 60;

/// The record of the last-resort package uploaded: when to make it again
/// (seconds, big-endian), whether it carries a home certificate, and that
/// certificate (CBOR).
fn last_resort_record(
    package: &crate::mls::GeneratedKeyPackage,
    certificate: Option<&kalandra_proto::federation::HomeCertificate>,
) -> Vec<u8> {
    let ends_s = certificate
        .map_or(package.not_after_unix_secs, |c| package.not_after_unix_secs.min(c.not_after_ms / 1000));
    let renew_at_s = ends_s.saturating_sub(LAST_RESORT_RENEW_BEFORE_SECS);
    let mut record = renew_at_s.to_be_bytes().to_vec();
    record.push(u8::from(certificate.is_some()));
    record.extend(certificate.map(kalandra_proto::federation::HomeCertificate::to_cbor).unwrap_or_default());
    record
}

/// A device renews the home certificate in its leaf of a room this long
/// before it ends.
pub const HOME_CERTIFICATE_RENEW_BEFORE_MS: u64 = 30 * 24 * 60 * 60 * 1000;

/// Rooms whose leaf one `connect` renews at most (the others at later
/// connections), so that a rotation does not turn one connect into a
/// commit in every room.
pub const HOME_CERTIFICATE_RENEWALS_PER_CONNECT_MAX: usize = 16;

const _: () = assert!(
    HOME_CERTIFICATE_RENEW_BEFORE_MS < kalandra_proto::home::MEMBER_HOME_CERTIFICATE_VALIDITY_MS / 2,
    "a renewed certificate lasts a while before the next renewal"
);

/// Whether our leaf, which members find `check` (checked with this
/// device's domain's keys), needs a self-update to carry `current`, the
/// certificate of this connection: it is not certified by that domain
/// (none, unreadable, of another domain, under a key no longer listed,
/// expired), or its certificate ends within
/// [`HOME_CERTIFICATE_RENEW_BEFORE_MS`] of `now_ms`. Never when this
/// connection's server issued none.
fn home_certificate_renewal_due(
    check: &HomeCheck,
    current: Option<&kalandra_proto::federation::HomeCertificate>,
    now_ms: u64,
) -> bool {
    let Some(current) = current else { return false };
    match check {
        HomeCheck::Certified { domain, not_after_ms } => {
            *domain != current.domain
                || not_after_ms.saturating_sub(now_ms) < HOME_CERTIFICATE_RENEW_BEFORE_MS
        }
        _ => true,
    }
}

/// Whether the last-resort package `record` describes stays usable at
/// `now_s`, for a device whose server now certifies it or not: and, when
/// `current_keys` (its domain's current key) are known, whether its
/// certificate is under them (after a rotation it is made again).
fn last_resort_current(
    record: Option<&[u8]>,
    now_s: u64,
    certified_now: bool,
    current_keys: Option<&PeerKeys>,
) -> bool {
    // An older record ([1]) does not say when the package ends: make a new one.
    let Some((head, certificate)) = record.filter(|value| value.len() >= 9).map(|value| value.split_at(9))
    else {
        return false;
    };
    let mut renew_at = [0u8; 8];
    renew_at.copy_from_slice(&head[..8]);
    let certified = head[8] == 1;
    let under_current_key = match (certified, current_keys) {
        (true, Some(keys)) => kalandra_proto::federation::HomeCertificate::from_cbor(certificate)
            .is_ok_and(|certificate| certificate.verify_signature(keys, now_s.saturating_mul(1000)).is_ok()),
        _ => true,
    };
    now_s < u64::from_be_bytes(renew_at) && (certified || !certified_now) && under_current_key
}

const _: () = assert!(
    LAST_RESORT_RENEW_BEFORE_SECS < crate::mls::KEY_PACKAGE_LIFETIME_SECS / 4,
    "a last-resort package serves most of its life"
);

/// What a member's leaf shows of its home domain ([`Client::member_homes`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberHome {
    /// The member's sender id (`None` if its credential is not a key).
    pub sender: Option<SenderId>,
    /// Its leaf index.
    pub leaf_index: u32,
    /// What its home certificate shows.
    pub home: HomeCheck,
}

/// A room as this device sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomSummary {
    /// The room.
    pub room_id: RoomId,
    /// Its epoch.
    pub epoch: u64,
    /// Its members' sender ids.
    pub members: Vec<SenderId>,
    /// The next log index this device will read.
    pub next_log_index: u64,
    /// Whether this device's removal is proposed (it can no longer send).
    pub removal_pending: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct OutboxRecord {
    id: u64,
    room_id: [u8; 16],
    plaintext: Vec<u8>,
    epoch: u64,
    generation: u32,
    frame: Vec<u8>,
    attempts: u32,
    next_attempt_ms: u64,
    /// The push notification sent along (resealed with the message).
    #[serde(default)]
    push: Option<Vec<u8>>,
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(value, &mut out).expect("writing CBOR to a Vec cannot fail");
    out
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8], what: &str) -> Result<T, ClientError> {
    ciborium::from_reader(bytes).map_err(|error| ClientError::Corrupt(format!("{what}: {error}")))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A device with its store, rooms and (when connected) its connection.
pub struct Client {
    directory: PathBuf,
    store: ClientStore,
    provider: MlsProvider,
    identity: Identity,
    signing_key: SigningKey,
    rooms: BTreeMap<RoomId, RoomLog>,
    outbox: BTreeMap<u64, OutboxRecord>,
    welcomes: BTreeMap<RoomId, Frame>,
    persisted_mls: HashMap<Vec<u8>, Vec<u8>>,
    /// No MLS operation ran since the last checkpoint: the OpenMLS storage
    /// equals `persisted_mls` and need not be compared (the common case of
    /// reading and sending messages, which never touches MLS state).
    mls_clean: bool,
    pending_batch: WriteBatch,
    connection: Option<Connection>,
    server: Option<ServerTarget>,
    request_timeout: Duration,
    push_keys: key_cache::PushKeys,
    /// Rooms that failed while applying frames another operation read (one
    /// entry per room, the latest), reported by the next call over every room.
    deferred_failures: BTreeMap<RoomId, ClientError>,
    /// Stuck rooms whose report was acknowledged, and when to report again.
    recovery_reports: BTreeMap<RoomId, tokio::time::Instant>,
    /// The keys this connection's server lists for its own domain with no
    /// end (its current key), when it certified this device: what our
    /// leaves and packages are renewed against.
    current_own_keys: Option<PeerKeys>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("directory", &self.directory)
            .field("sender_id", &self.sender_id())
            .field("rooms", &self.rooms.len())
            .field("outbox", &self.outbox.len())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Creates a new device in `directory` (an identity and an empty store
    /// encrypted under `key`).
    pub fn init(directory: &Path, key: &StoreKey) -> Result<Client, ClientError> {
        let path = directory.join(STORE_FILE_NAME);
        if path.exists() {
            return Err(ClientError::AlreadyInitialised { path: directory.to_owned() });
        }
        std::fs::create_dir_all(directory)
            .map_err(|e| StoreError::Io { operation: "create directory", detail: e.to_string() })?;
        let store = ClientStore::open(&path, key)?;
        let provider = MlsProvider::from_os_entropy();
        let identity = Identity::generate(&provider)?;
        let mut batch = WriteBatch::new();
        batch.put(Namespace::Identity, b"identity", identity.secret_bytes().to_vec());
        store.write(&batch)?;
        Self::assemble(directory, store, provider, identity, Vec::new())
    }

    /// Opens the device in `directory` with `key`.
    pub fn open(directory: &Path, key: &StoreKey) -> Result<Client, ClientError> {
        let path = directory.join(STORE_FILE_NAME);
        if !path.exists() {
            return Err(ClientError::NotInitialised { path: directory.to_owned() });
        }
        let store = ClientStore::open(&path, key)?;
        let records = store.load_records()?;
        let mut mls = HashMap::new();
        let mut identity = None;
        let mut rest = Vec::new();
        for record in records {
            match record.namespace {
                Namespace::Mls => {
                    mls.insert(record.name, record.value);
                }
                Namespace::Identity => identity = Some(Identity::from_secret_bytes(&record.value)?),
                _ => rest.push(record),
            }
        }
        let identity = identity.ok_or_else(|| ClientError::Corrupt("no identity in the store".into()))?;
        let storage = MemoryStorage { values: RwLock::new(mls) };
        let provider = MlsProvider::with_storage(SeededCrypto::from_os_entropy(), storage);
        Self::assemble(directory, store, provider, identity, rest)
    }

    fn assemble(
        directory: &Path,
        store: ClientStore,
        provider: MlsProvider,
        identity: Identity,
        records: Vec<crate::store::Record>,
    ) -> Result<Client, ClientError> {
        let signing_key = SigningKey::from_bytes(&identity.secret_bytes());
        let persisted_mls = provider.storage().values.read().expect("storage lock").clone();
        let mut client = Client {
            directory: directory.to_owned(),
            store,
            provider,
            identity,
            signing_key,
            rooms: BTreeMap::new(),
            outbox: BTreeMap::new(),
            welcomes: BTreeMap::new(),
            persisted_mls,
            mls_clean: true,
            pending_batch: WriteBatch::new(),
            connection: None,
            server: None,
            request_timeout: Duration::from_secs(10),
            push_keys: key_cache::PushKeys::load(directory.join(KEY_CACHE_FILE_NAME)),
            deferred_failures: BTreeMap::new(),
            current_own_keys: None,
            recovery_reports: BTreeMap::new(),
        };
        for record in records {
            match record.namespace {
                Namespace::Room => {
                    let record: RoomRecord = decode(&record.value, "room")?;
                    let room = RoomLog::restore(&client.provider, record)?;
                    client.rooms.insert(room.room_id(), room);
                }
                Namespace::Outbox => {
                    let entry: OutboxRecord = decode(&record.value, "outbox")?;
                    client.outbox.insert(entry.id, entry);
                }
                Namespace::Welcome => {
                    let frame = Frame::decode(&bytes::Bytes::from(record.value))
                        .map_err(|e| ClientError::Corrupt(format!("stored Welcome: {e}")))?;
                    client.welcomes.insert(frame.header().room_id(), frame);
                }
                Namespace::Config => {
                    if record.name == b"server" {
                        client.server = Some(decode(&record.value, "server")?);
                    }
                }
                Namespace::Mls | Namespace::Identity => {}
            }
        }
        client.refresh_key_cache()?;
        Ok(client)
    }

    /// This device's sender id (what others invite).
    pub fn sender_id(&self) -> SenderId {
        SenderId::from_identity_key(self.signing_key.verifying_key().as_bytes())
    }

    /// The directory the device lives in.
    pub fn directory(&self) -> &Path {
        &self.directory
    }

    /// The server remembered from the last [`Client::set_server`].
    pub fn server(&self) -> Option<&ServerTarget> {
        self.server.as_ref()
    }

    /// Remembers the server to use.
    pub fn set_server(&mut self, server: ServerTarget) -> Result<(), ClientError> {
        let mut batch = WriteBatch::new();
        batch.put(Namespace::Config, b"server", encode(&server));
        self.store.write(&batch)?;
        self.server = Some(server);
        Ok(())
    }

    /// How long a request waits for its answer.
    pub fn set_request_timeout(&mut self, timeout: Duration) {
        self.request_timeout = timeout;
    }

    /// Messages waiting in the outbox.
    pub fn outbox_len(&self) -> usize {
        self.outbox.len()
    }

    /// The rooms this device is a member of.
    pub fn rooms(&self) -> Vec<RoomSummary> {
        self.rooms
            .iter()
            .filter_map(|(room_id, entry)| {
                let group = entry.group.as_ref()?;
                Some(RoomSummary {
                    room_id: *room_id,
                    epoch: group.epoch(),
                    members: group.members().iter().filter_map(|m| sender_of(&m.identity)).collect(),
                    next_log_index: entry.record.next_log_index,
                    removal_pending: entry.own_removal_pending(),
                })
            })
            .collect()
    }

    /// Each member of `room_id` with what its leaf shows of its home
    /// domain, checked here against the keys this device's server accepts
    /// for each domain named (one `DomainKeysRequest` per 16 domains, at
    /// most [`MEMBER_HOME_DOMAINS_ASKED_MAX`] domains; members of others
    /// show as of an unknown domain):
    /// certified, expired, uncertified, of a domain unknown to the server,
    /// or invalid (`docs/wire-protocol.md` §10, "Members' home
    /// certificates"). The room's own server's word is not needed.
    pub async fn member_homes(&mut self, room_id: RoomId) -> Result<Vec<MemberHome>, ClientError> {
        let entry = self.rooms.get(&room_id).ok_or(ClientError::UnknownRoom(room_id))?;
        let group = entry.group.as_ref().ok_or(ClientError::NotMember(room_id))?;
        let leaves = group.member_home_certificates();
        let mut domains: Vec<DomainName> = leaves
            .iter()
            .filter_map(|(_, leaf)| leaf.certificate.as_ref()?.as_ref().ok().map(|c| c.domain.clone()))
            .collect();
        domains.sort();
        domains.dedup();
        // A room's members may name many domains; members of those past the
        // bound show as of an unknown domain.
        domains.truncate(MEMBER_HOME_DOMAINS_ASKED_MAX);
        let keys = self.domain_keys(&domains).await?;
        let now_ms = now_ms();
        Ok(leaves
            .into_iter()
            .map(|(member, leaf)| {
                let home = leaf.check(|domain| keys.get(domain), now_ms);
                MemberHome { sender: sender_of(&member.identity), leaf_index: member.leaf_index, home }
            })
            .collect())
    }

    /// The keys this device's server accepts for each of `domains` (those
    /// it gives none for are left out).
    async fn domain_keys(
        &mut self,
        domains: &[DomainName],
    ) -> Result<std::collections::BTreeMap<DomainName, PeerKeys>, ClientError> {
        let mut known = std::collections::BTreeMap::new();
        for chunk in domains.chunks(DOMAINS_PER_KEYS_REQUEST_MAX) {
            let request = DomainKeysRequest { domains: chunk.to_vec() };
            let frame = self.frame(RoomId::default(), 0, &request)?;
            let reply = self.request(&frame).await?;
            let answer: DomainKeys = expect(&reply)?;
            if answer.domains.iter().map(|entry| &entry.domain).ne(chunk.iter()) {
                return Err(ClientError::Protocol("DomainKeys does not answer the domains asked".into()));
            }
            for entry in answer.domains.into_iter().filter(|entry| !entry.keys.is_empty()) {
                let keys = entry
                    .keys
                    .iter()
                    .map(|key| {
                        let verifying = ed25519_dalek::VerifyingKey::from_bytes(&key.key)
                            .map_err(|_| ClientError::Protocol("DomainKeys lists an invalid key".into()))?;
                        Ok(PeerKey { key: verifying, valid_until_ms: key.valid_until_ms })
                    })
                    .collect::<Result<Vec<_>, ClientError>>()?;
                let keys = PeerKeys::new(entry.domain.clone(), keys)
                    .map_err(|error| ClientError::Protocol(format!("DomainKeys: {error}")))?;
                known.insert(entry.domain, keys);
            }
        }
        Ok(known)
    }

    /// The rooms this device has left (removed by a commit, by a removal
    /// nobody is left to commit, or by the server's `NotMember`); their
    /// history stays on the device.
    pub fn left_rooms(&self) -> Vec<RoomId> {
        self.rooms.iter().filter(|(_, entry)| entry.record.removed).map(|(room_id, _)| *room_id).collect()
    }

    /// The room's history on this device, from `from_log_index`, at most `count_max` entries.
    pub fn history(
        &self,
        room_id: RoomId,
        from_log_index: u64,
        count_max: usize,
    ) -> Result<Vec<Message>, ClientError> {
        if !self.rooms.contains_key(&room_id) {
            return Err(ClientError::UnknownRoom(room_id));
        }
        self.store
            .messages(room_id, from_log_index, count_max)?
            .into_iter()
            .map(|(_, bytes)| decode(&bytes, "message"))
            .collect()
    }

    /// Connects to the remembered server, authenticates, keeps key packages
    /// stocked, stores any Welcome that waits, catches every room up,
    /// settles pending commits, renews the home certificate in its leaf of
    /// a room by a self-update when due, and sends what waits in the outbox. A room
    /// that fails does not stop the others: it is returned as a
    /// [`RoomFailure`]. The call fails only for the whole device (the
    /// connection, the store).
    pub async fn connect(&mut self) -> Result<Vec<RoomFailure>, ClientError> {
        self.open_connection().await?;
        let mut failures = Vec::new();
        let rooms: Vec<RoomId> = self.rooms.keys().copied().collect();
        let mut renewals_left = HOME_CERTIFICATE_RENEWALS_PER_CONNECT_MAX;
        for room_id in rooms {
            match self.resume_room(room_id).await {
                Ok(()) if renewals_left > 0 => {
                    if self.renew_home_certificate(room_id).await {
                        renewals_left -= 1;
                    }
                }
                Ok(()) => {}
                Err(error) => failures.push(room_failure(room_id, error)?),
            }
        }
        self.flush_outbox_into(&mut failures).await?;
        self.take_deferred_failures(&mut failures);
        Ok(failures)
    }

    /// Adds the failures of rooms met while reading others, unless the room
    /// is reported already.
    fn take_deferred_failures(&mut self, failures: &mut Vec<RoomFailure>) {
        for (room_id, error) in std::mem::take(&mut self.deferred_failures) {
            if !failures.iter().any(|failure| failure.room_id == room_id) {
                failures.push(RoomFailure { room_id, error });
            }
        }
    }

    /// Connects and authenticates, keeps key packages stocked and stores any
    /// Welcome that waits; reads no room.
    async fn open_connection(&mut self) -> Result<(), ClientError> {
        let server = self.server.clone().ok_or(ClientError::NotConnected)?;
        let connection = server.connect(&self.signing_key, self.request_timeout).await?;
        self.identity.set_home_certificate(connection.home_certificate().cloned());
        self.connection = Some(connection);
        for room in self.rooms.values_mut() {
            // The previous connection may have died without a word.
            room.connected()?;
        }
        self.current_own_keys = self.own_domain_keys().await;
        self.refill_key_packages().await?;
        self.drain_buffered(None)?;
        self.checkpoint()?;
        Ok(())
    }

    /// Closes the connection politely.
    pub async fn disconnect(&mut self) {
        if let Some(connection) = self.connection.take() {
            connection.close().await;
        }
        for room in self.rooms.values_mut() {
            let _ = room.connection_lost();
        }
    }

    fn connection(&mut self) -> Result<&mut Connection, ClientError> {
        self.connection.as_mut().ok_or(ClientError::NotConnected)
    }

    fn frame<P: Payload>(&mut self, room_id: RoomId, epoch: u64, payload: &P) -> Result<Frame, ClientError> {
        let request_id = self.connection()?.next_request_id();
        let mut header = FrameHeaderBuf::new(P::OPCODE);
        header
            .set_room_id(room_id)
            .set_sender_id(self.sender_id())
            .set_epoch(epoch)
            .set_request_id(request_id);
        let mut frame = Frame::with_payload(header, payload)
            .map_err(|e| ClientError::Protocol(format!("building {:?}: {e}", P::OPCODE)))?;
        frame.sign(&self.signing_key);
        Ok(frame)
    }

    /// A stored frame, to send again under a fresh request id (signed anew:
    /// the signature covers the request id).
    fn fresh_request(&mut self, stored: &[u8], what: &str) -> Result<Frame, ClientError> {
        let mut frame = Frame::decode(&bytes::Bytes::copy_from_slice(stored))
            .map_err(|e| ClientError::Corrupt(format!("{what}: {e}")))?;
        let request_id = self.connection()?.next_request_id();
        frame.header_mut().set_request_id(request_id);
        frame.sign(&self.signing_key);
        Ok(frame)
    }

    /// Sends `frame` and waits for its answer.
    async fn request(&mut self, frame: &Frame) -> Result<Frame, ClientError> {
        let reply = self.connection()?.request(frame).await?;
        Ok(reply)
    }

    async fn refill_key_packages(&mut self) -> Result<(), ClientError> {
        self.mls_clean = false;
        let now_s = now_ms() / 1000;
        let one = generate_key_packages(&self.provider, &self.identity, 1, now_s)?;
        let (last_resort, record) = if self.last_resort_current(now_s) {
            (None, None)
        } else {
            let package = generate_last_resort_key_package(&self.provider, &self.identity, now_s)?;
            let record = last_resort_record(&package, self.identity.home_certificate());
            (Some(package.message), Some(record))
        };
        let upload = KeyPackageUpload {
            key_packages: one.into_iter().map(|p| p.message.into()).collect(),
            last_resort,
        };
        let mut status = self.upload(upload).await?;
        if let Some(record) = record {
            self.pending_batch.put(Namespace::Config, b"last_resort", record);
        } else if !status.last_resort {
            // The server lost it, or this is another server: one now.
            let package = generate_last_resort_key_package(&self.provider, &self.identity, now_s)?;
            let record = last_resort_record(&package, self.identity.home_certificate());
            let upload = KeyPackageUpload { key_packages: Vec::new(), last_resort: Some(package.message) };
            status = self.upload(upload).await?;
            self.pending_batch.put(Namespace::Config, b"last_resort", record);
        }
        if status.available < KEY_PACKAGES_LOW_WATERMARK {
            let count = KEY_PACKAGES_TARGET - status.available;
            let packages = generate_key_packages(&self.provider, &self.identity, count as usize, now_s)?;
            let upload = KeyPackageUpload {
                key_packages: packages.into_iter().map(|p| p.message.into()).collect(),
                last_resort: None,
            };
            self.upload(upload).await?;
        }
        Ok(())
    }

    /// Whether the server holds a last-resort package of this device that
    /// stays usable a while yet: not near the end of its lifetime or of its
    /// home certificate, and certified if this connection's server certifies.
    fn last_resort_current(&self, now_s: u64) -> bool {
        let record = self.store.load_records().ok().and_then(|records| {
            records
                .into_iter()
                .find(|r| r.namespace == Namespace::Config && r.name == b"last_resort")
                .map(|r| r.value)
        });
        let certified_now = self.identity.home_certificate().is_some();
        last_resort_current(record.as_deref(), now_s, certified_now, self.current_own_keys.as_ref())
    }

    async fn upload(&mut self, upload: KeyPackageUpload) -> Result<KeyPackageStatus, ClientError> {
        // Key package private keys must be on disk before the server can hand them out.
        self.mls_clean = false;
        self.checkpoint()?;
        let frame = self.frame(RoomId::default(), 0, &upload)?;
        let reply = self.request(&frame).await?;
        expect::<KeyPackageStatus>(&reply)
    }

    /// Stores Welcomes that arrived and applies other buffered frames. A
    /// frame of another room than `focus` that fails is that room's failure
    /// (kept for the next call over every room); the first failure of
    /// `focus` is returned once every frame was handled.
    fn drain_buffered(&mut self, focus: Option<RoomId>) -> Result<Vec<Message>, ClientError> {
        let frames = match self.connection.as_mut() {
            Some(connection) => connection.take_buffered(),
            None => return Ok(Vec::new()),
        };
        self.handle_frames(frames, focus)
    }

    fn handle_frames(
        &mut self,
        frames: Vec<Frame>,
        focus: Option<RoomId>,
    ) -> Result<Vec<Message>, ClientError> {
        let mut messages = Vec::new();
        let mut focus_error = None;
        for frame in frames {
            let room_id = frame.header().room_id();
            match self.handle_incoming(frame) {
                Ok(message) => messages.extend(message),
                Err(error) if error.is_device_wide() => return Err(error),
                Err(error) if Some(room_id) == focus => {
                    focus_error.get_or_insert(error);
                }
                Err(error) => {
                    self.deferred_failures.entry(room_id).or_insert(error);
                }
            }
        }
        match focus_error {
            Some(error) => Err(error),
            None => Ok(messages),
        }
    }

    /// Handles one frame from the server that is not a reply.
    fn handle_incoming(&mut self, frame: Frame) -> Result<Option<Message>, ClientError> {
        match frame.opcode() {
            Opcode::Welcome => {
                let room_id = frame.header().room_id();
                if self.rooms.get(&room_id).is_some_and(|e| e.group.is_some() && !e.record.removed) {
                    // Delivered again until the server sees us read the room.
                    return Ok(None);
                }
                self.pending_batch.put(Namespace::Welcome, &room_id.0, frame.to_bytes().to_vec());
                self.welcomes.insert(room_id, frame);
                // A Welcome the server delivered is deleted there: store it at once.
                self.checkpoint()?;
                Ok(None)
            }
            _ if crate::room_log::is_log_frame(&frame) => self.apply_log_frame(&frame),
            _ => Ok(None),
        }
    }

    /// Applies a sequenced frame of a room's log at the room's cursor
    /// ([`RoomLog::apply`]) and stages the history entry it makes, with the
    /// outbox entry it settles.
    fn apply_log_frame(&mut self, frame: &Frame) -> Result<Option<Message>, ClientError> {
        if frame.opcode() != Opcode::Application {
            self.mls_clean = false;
        }
        if frame.opcode() == Opcode::CommitVoided {
            // The history the void rewrites must be in the store first.
            self.checkpoint()?;
        }
        let room_id = frame.header().room_id();
        let own = self.sender_id();
        let Some(room) = self.rooms.get_mut(&room_id) else { return Ok(None) };
        let sent = self.outbox.values().filter(|o| o.room_id == room_id.0).map(|o| SentMessage {
            id: o.id,
            epoch: o.epoch,
            generation: o.generation,
        });
        let Some(LogEntry { log_index, sender, server_time_ms, body }) =
            room.apply(&self.provider, own, frame, sent)?
        else {
            return Ok(None);
        };
        let body = match body {
            EntryBody::Own { outbox_id } => {
                let Some(sent) = self.outbox.remove(&outbox_id) else {
                    return Err(ClientError::Internal("a settled outbox entry vanished".into()));
                };
                self.pending_batch.delete(Namespace::Outbox, &outbox_id.to_be_bytes());
                MessageBody::Text(sent.plaintext)
            }
            EntryBody::Text(text) => MessageBody::Text(text),
            EntryBody::Membership { epoch, added, removed } => {
                MessageBody::Membership { epoch, added, removed }
            }
            EntryBody::Unreadable(why) => MessageBody::Unreadable(why),
            EntryBody::Redacted => MessageBody::Redacted,
            EntryBody::CommitVoided { voided_log_index, epoch, added, removed } => {
                self.commit_voided(room_id, voided_log_index, log_index, epoch)?;
                MessageBody::Membership { epoch, added, removed }
            }
        };
        let message = Message { room_id: room_id.0, log_index, sender: sender.0, server_time_ms, body };
        self.pending_batch.message(room_id, log_index, encode(&message));
        Ok(Some(message))
    }

    /// Writes everything changed since the last checkpoint in one transaction.
    fn checkpoint(&mut self) -> Result<(), StoreError> {
        let mut batch = std::mem::take(&mut self.pending_batch);
        let current = if self.mls_clean {
            None
        } else {
            let current = self.provider.storage().values.read().expect("storage lock").clone();
            for (name, value) in &current {
                if self.persisted_mls.get(name) != Some(value) {
                    batch.put(Namespace::Mls, name, value.clone());
                }
            }
            for name in self.persisted_mls.keys() {
                if !current.contains_key(name) {
                    batch.delete(Namespace::Mls, name);
                }
            }
            Some(current)
        };
        for (room_id, room) in &mut self.rooms {
            batch.put(Namespace::Room, &room_id.0, encode(room.checkpoint_record()));
        }
        if let Err(error) = self.store.write(&batch) {
            // Nothing was written: keep the changes for the next attempt.
            self.pending_batch = batch;
            return Err(error);
        }
        if let Some(current) = current {
            self.persisted_mls = current;
        }
        self.mls_clean = true;
        self.refresh_key_cache()
    }

    /// The latest head of `room_id`'s log that the server signed and that
    /// matched the frames this device applied: (index, head, signature), to
    /// compare with other members out of band. `None` before the first.
    pub fn log_head(&self, room_id: RoomId) -> Option<kalandra_proto::chain::SignedLogHead> {
        self.rooms.get(&room_id).and_then(RoomLog::log_head)
    }

    /// The proof, if one was found, that the server showed this device a
    /// log of `room_id` it cannot stand behind.
    pub fn chain_violation(&self, room_id: RoomId) -> Option<crate::room_log::ChainViolation> {
        self.rooms.get(&room_id).and_then(RoomLog::chain_violation)
    }

    /// Catches `room_id` up with the server's log (and settles a pending
    /// commit of ours that the log decides). Returns the new entries.
    pub async fn sync(&mut self, room_id: RoomId) -> Result<Vec<Message>, ClientError> {
        let mut messages = Vec::new();
        for _ in 0..CATCH_UP_ROUNDS_MAX {
            let from =
                self.rooms.get(&room_id).ok_or(ClientError::UnknownRoom(room_id))?.record.next_log_index;
            let epoch = self.epoch_of(room_id);
            let sync = Sync { from_log_index: from, count_max: SYNC_FRAMES_PER_REQUEST };
            let frame = self.frame(room_id, epoch, &sync)?;
            let reply = self.request(&frame).await?;
            if refused_membership(&reply) {
                // Removed (or banned) while away: the server no longer lets
                // us read the room.
                self.mark_removed(room_id)?;
                return Err(ClientError::NotMember(room_id));
            }
            let done: SyncDone = expect(&reply)?;
            let drained = self.drain_buffered(Some(room_id));
            let head_checked = match self.rooms.get_mut(&room_id) {
                Some(room) => room.sync_done(&done),
                None => Ok(()),
            };
            // What applied before a failure is kept.
            self.checkpoint()?;
            messages.extend(drained?);
            head_checked?;
            let next = self.rooms.get(&room_id).map_or(from, |entry| entry.record.next_log_index);
            if next < done.next_log_index {
                return Err(ClientError::Protocol(format!(
                    "room {room_id}: sync ended at {} but frames stop at {next}",
                    done.next_log_index
                )));
            }
            if done.next_log_index.saturating_sub(from) < u64::from(SYNC_FRAMES_PER_REQUEST) {
                self.drive_recovery(room_id).await?;
                return Ok(messages);
            }
        }
        Err(ClientError::RetriesExhausted {
            what: "catching up",
            attempts: u32::try_from(CATCH_UP_ROUNDS_MAX).unwrap_or(u32::MAX),
        })
    }

    /// The room is no longer ours: its keys go, its history stays.
    fn mark_removed(&mut self, room_id: RoomId) -> Result<(), ClientError> {
        self.mls_clean = false;
        if let Some(room) = self.rooms.get_mut(&room_id) {
            room.mark_removed(&self.provider)?;
        }
        self.checkpoint()?;
        Ok(())
    }

    fn epoch_of(&self, room_id: RoomId) -> u64 {
        self.rooms.get(&room_id).and_then(|e| e.group.as_ref()).map_or(0, RoomGroup::epoch)
    }

    fn member_group(&mut self, room_id: RoomId) -> Result<&mut RoomLog, ClientError> {
        member_entry(&mut self.rooms, room_id)
    }

    /// After reconnecting: confirm a created room, read what was missed,
    /// and settle or resend a pending commit.
    async fn resume_room(&mut self, room_id: RoomId) -> Result<(), ClientError> {
        let Some(entry) = self.rooms.get(&room_id) else { return Ok(()) };
        if entry.record.removed {
            return Ok(());
        }
        if !entry.record.confirmed {
            return self.confirm_creation(room_id).await;
        }
        match self.sync(room_id).await {
            Err(ClientError::NotMember(_)) => return Ok(()),
            other => other?,
        };
        self.settle_room(room_id).await
    }

    /// The keys this connection's server lists with no end for its own
    /// domain (its current key; not the earlier ones of a rotation's
    /// overlap), when it certified this device (none if it did not, or the
    /// answer did not come: our leaves and packages are then left as they
    /// are).
    async fn own_domain_keys(&mut self) -> Option<PeerKeys> {
        let domain = self.identity.home_certificate()?.domain.clone();
        let mut keys = self.domain_keys(std::slice::from_ref(&domain)).await.ok()?;
        let listed = keys.remove(&domain)?;
        let current: Vec<PeerKey> =
            listed.keys().iter().filter(|key| key.valid_until_ms.is_none()).cloned().collect();
        PeerKeys::new(domain, current).ok()
    }

    /// Renews the home certificate in our leaf of `room_id` by a
    /// self-update when members would not find it certified by this
    /// device's domain under `own_keys` (missing, unreadable, of another
    /// domain, under a key the domain no longer lists, expired) or it ends
    /// soon (see [`home_certificate_renewal_due`]), so that members keep
    /// finding this device certified without the app asking.
    ///
    /// Best effort: a room that cannot commit now (its own removal pending,
    /// stuck, a commit or intent of ours under way) is left for a later
    /// connection, and a renewal that fails leaves the leaf as it is (the
    /// room itself was caught up). Returns whether a renewal was tried.
    async fn renew_home_certificate(&mut self, room_id: RoomId) -> bool {
        let Some(own_keys) = self.current_own_keys.clone() else { return false };
        let Some(entry) = self.rooms.get(&room_id) else { return false };
        let busy = entry.stuck_on().is_some()
            || entry.rejoin_needed()
            || entry.pending_commit().is_some()
            || entry.redo().is_some();
        if entry.record.removed || entry.own_removal_pending() || busy {
            return false;
        }
        let Some(group) = entry.group.as_ref() else { return false };
        let own = group.own_leaf_index();
        let Some((_, leaf)) =
            group.member_home_certificates().into_iter().find(|(member, _)| member.leaf_index == own)
        else {
            return false;
        };
        let now_ms = now_ms();
        let check = leaf.check(|domain| (domain == own_keys.domain()).then_some(&own_keys), now_ms);
        if !home_certificate_renewal_due(&check, self.identity.home_certificate(), now_ms) {
            return false;
        }
        // The next connection tries again; the room is caught up either way.
        let _ = self.self_update(room_id).await;
        true
    }

    /// Our own removal is pending: nothing of ours is committed, and when
    /// nobody is left to commit it the room is left. Returns whether it is
    /// pending (or the room left).
    fn settle_own_removal(&mut self, room_id: RoomId) -> Result<bool, ClientError> {
        let Some(room) = self.rooms.get_mut(&room_id) else { return Ok(false) };
        if !room.own_removal_pending() {
            return Ok(room.record.removed);
        }
        self.mls_clean = false;
        room.settle_own_removal(&self.provider)?;
        self.checkpoint()?;
        Ok(true)
    }

    /// With the room's log read to its end: resend or settle our pending
    /// commit, redo an intent whose commit lost, and cover proposals that
    /// wait for a commit.
    async fn settle_room(&mut self, room_id: RoomId) -> Result<(), ClientError> {
        if self.settle_own_removal(room_id)? {
            return Ok(());
        }
        let pending = self.rooms.get(&room_id).and_then(|e| e.record.pending.clone());
        if let Some(pending) = pending {
            let frame = self.fresh_request(&pending.frame, "pending commit")?;
            if !self.settle_commit(room_id, &frame).await? {
                self.redo_later(room_id, pending.intent);
            }
        }
        let redo = self.rooms.get_mut(&room_id).and_then(|entry| entry.record.redo.take());
        if let Some(intent) = redo {
            self.commit_intent(room_id, intent).await?;
        }
        self.cover_pending_proposals(room_id).await
    }

    /// Commits the room's pending proposals if one of them waits for us (a
    /// removal the server proposed: the room takes no message until it is
    /// committed). Every online member does this; the first commit wins and
    /// the others find nothing left to cover.
    async fn cover_pending_proposals(&mut self, room_id: RoomId) -> Result<(), ClientError> {
        let waiting = self.rooms.get(&room_id).is_some_and(RoomLog::proposals_to_cover);
        if waiting {
            self.commit_intent(room_id, Intent::CoverProposals).await?;
        }
        Ok(())
    }

    fn redo_later(&mut self, room_id: RoomId, intent: Intent) {
        if let Some(room) = self.rooms.get_mut(&room_id) {
            room.redo_later(intent);
        }
    }

    async fn confirm_creation(&mut self, room_id: RoomId) -> Result<(), ClientError> {
        let pending = self.rooms.get(&room_id).and_then(|e| e.record.pending.clone());
        let Some(pending) = pending else { return Ok(()) };
        let frame = self.fresh_request(&pending.frame, "pending room creation")?;
        let reply = self.request(&frame).await?;
        let entry = self.rooms.get_mut(&room_id).expect("checked by the caller");
        let ack = match reply.opcode() {
            Opcode::Ack => Some(expect::<Ack>(&reply)?),
            Opcode::Error if ClientError::refused(&reply).code() == Some(ErrorCode::RoomExists.to_u16()) => {
                // Sent before a crash and sequenced then: the log decides below.
                None
            }
            _ => return Err(ClientError::refused(&reply)),
        };
        entry.creation_confirmed();
        // The creation's head anchors the room's chain.
        let head_checked = ack.map_or(Ok(()), |ack| entry.acknowledged(&ack));
        self.checkpoint()?;
        head_checked?;
        Ok(())
    }

    /// Creates an invite-only room with a random id; this device is its
    /// first member and its admin.
    pub async fn create_room(&mut self) -> Result<RoomId, ClientError> {
        self.create_room_with(JoinRule::InviteOnly).await
    }

    /// Creates a room with a random id and the join rule `join_rule`.
    pub async fn create_room_with(&mut self, join_rule: JoinRule) -> Result<RoomId, ClientError> {
        self.mls_clean = false;
        let server_key = self.connection()?.server_key();
        let mut id = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut id);
        let room_id = RoomId(id);
        let (group, created) =
            RoomGroup::create(&self.provider, &self.identity, id, &server_key, now_ms() / 1000)?;
        let frame = self.frame(
            room_id,
            0,
            &CreateRoom {
                group_info: created.group_info,
                ratchet_tree: created.ratchet_tree,
                join_rule: Some(join_rule),
            },
        )?;
        let room = RoomLog::created(&self.provider, group, frame.to_bytes().to_vec())?;
        self.rooms.insert(room_id, room);
        self.checkpoint()?;
        self.confirm_creation(room_id).await?;
        Ok(room_id)
    }

    /// Adds `members` (by sender id) to the room: claims a key package for
    /// each, commits, and sends them the Welcome. Rebases and retries when
    /// another commit wins the epoch. Returns the room's new epoch.
    pub async fn invite(&mut self, room_id: RoomId, members: &[SenderId]) -> Result<u64, ClientError> {
        self.commit_intent(room_id, Intent::Invite(members.iter().map(|s| s.0).collect())).await
    }

    /// Adds `members` of another domain, `domain`, to the room: their key
    /// packages are claimed through this device's server from `domain`'s
    /// server (one claim), and the Welcome reaches them through their home
    /// server; once joined they read and write the room through it. For
    /// users of several domains, call once per domain. `domain` may also be
    /// this server's own domain (the same as [`Client::invite`]).
    ///
    /// Besides [`Client::invite`]'s errors: [`ClientError::UnknownDomain`]
    /// when `domain` is not a peer of this server,
    /// [`ClientError::FederationRefused`] when the peer or this server
    /// refuses, [`ClientError::DomainUnreachable`] when `domain` cannot be
    /// reached now (retry later). Returns the room's new epoch.
    pub async fn invite_remote(
        &mut self,
        room_id: RoomId,
        domain: &DomainName,
        members: &[SenderId],
    ) -> Result<u64, ClientError> {
        let members = members.iter().map(|s| s.0).collect();
        self.commit_intent(room_id, Intent::InviteAt { domain: domain.clone(), members }).await
    }

    /// Removes `members` (by sender id) from the room with a commit; they
    /// cannot read what follows. Returns the room's new epoch.
    pub async fn remove(&mut self, room_id: RoomId, members: &[SenderId]) -> Result<u64, ClientError> {
        self.commit_intent(room_id, Intent::Remove(members.iter().map(|s| s.0).collect())).await
    }

    /// Commits a fresh leaf key and path for this device (post-compromise
    /// security). Returns the room's new epoch.
    pub async fn self_update(&mut self, room_id: RoomId) -> Result<u64, ClientError> {
        self.commit_intent(room_id, Intent::Update).await
    }

    /// Proposes this device's removal; the next commit by another member
    /// removes it. Returns the proposal's log index.
    pub async fn leave(&mut self, room_id: RoomId) -> Result<u64, ClientError> {
        self.member_group(room_id)?;
        self.sync(room_id).await?;
        let entry = member_entry(&mut self.rooms, room_id)?;
        let group = entry.group.as_mut().expect("member_entry checked");
        let epoch = group.epoch();
        self.mls_clean = false;
        let output = group.leave(&self.provider, &self.identity)?;
        self.checkpoint()?;
        let frame = self.frame(room_id, epoch, &payload::Proposal { proposal: output.proposal })?;
        let reply = self.request(&frame).await?;
        let ack: Ack = expect(&reply)?;
        self.sync(room_id).await?;
        Ok(ack.log_index)
    }

    /// Sends a moderation request (an admin's or moderator's act) for the
    /// room and returns the log index it was sequenced at, if it was (a kick
    /// becomes a server-issued Remove proposal in the log; acts that
    /// sequence nothing answer `u64::MAX`).
    async fn moderate<P: Payload>(&mut self, room_id: RoomId, request: &P) -> Result<u64, ClientError> {
        let epoch = self.epoch_of(room_id);
        let frame = self.frame(room_id, epoch, request)?;
        let reply = self.request(&frame).await?;
        let ack: Ack = expect(&reply)?;
        Ok(ack.log_index)
    }

    /// Removes `member` from the room as a moderator: the server proposes the
    /// removal and the room takes no message until a member commits it
    /// (online members do so at once). Returns the proposal's log index.
    pub async fn kick(
        &mut self,
        room_id: RoomId,
        member: SenderId,
        reason: &str,
    ) -> Result<u64, ClientError> {
        self.member_group(room_id)?;
        self.moderate(room_id, &payload::Kick { target: member.0, reason: reason.to_owned() }).await
    }

    /// Removes `user` and refuses their return (for `duration_ms`, or for
    /// good). Returns the log index of the removal proposal, or `u64::MAX`
    /// if the user was not a member.
    pub async fn ban(
        &mut self,
        room_id: RoomId,
        user: SenderId,
        reason: &str,
        duration_ms: Option<u64>,
    ) -> Result<u64, ClientError> {
        self.member_group(room_id)?;
        let ban = payload::Ban { target: user.0, reason: reason.to_owned(), duration_ms };
        self.moderate(room_id, &ban).await
    }

    /// Lifts a ban.
    pub async fn unban(&mut self, room_id: RoomId, user: SenderId, reason: &str) -> Result<(), ClientError> {
        self.member_group(room_id)?;
        self.moderate(room_id, &payload::Unban { target: user.0, reason: reason.to_owned() })
            .await
            .map(|_| ())
    }

    /// Grants or revokes a room role (the room's admin does this).
    pub async fn set_role(
        &mut self,
        room_id: RoomId,
        user: SenderId,
        role: &str,
        granted: bool,
    ) -> Result<(), ClientError> {
        self.member_group(room_id)?;
        let request = payload::SetRole { target: user.0, role: role.to_owned(), granted };
        self.moderate(room_id, &request).await.map(|_| ())
    }

    /// Erases the content of entry `log_index` on the server (our own
    /// message, or anyone's for a moderator). Copies other devices already
    /// read stay on those devices.
    pub async fn redact(&mut self, room_id: RoomId, log_index: u64, reason: &str) -> Result<(), ClientError> {
        self.member_group(room_id)?;
        self.moderate(room_id, &payload::Redact { log_index, reason: reason.to_owned() }).await.map(|_| ())
    }

    /// Makes, sends and settles a commit for `intent`, catching up and
    /// trying again (at most [`COMMIT_ATTEMPTS_MAX`] times) when another
    /// commit wins the epoch.
    async fn commit_intent(&mut self, room_id: RoomId, intent: Intent) -> Result<u64, ClientError> {
        self.member_group(room_id)?;
        self.sync(room_id).await?;
        for _ in 0..COMMIT_ATTEMPTS_MAX {
            if self.rooms.get(&room_id).and_then(RoomLog::stuck_on).is_some() {
                self.redo_later(room_id, intent);
                return Err(ClientError::Recovering(room_id));
            }
            if self.settle_own_removal(room_id)? {
                // Any commit would have to cover our own removal, which we
                // cannot commit: nothing of ours is left to cover.
                if intent == Intent::CoverProposals {
                    return Ok(self.epoch_of(room_id));
                }
                self.member_group(room_id)?;
                return Err(ClientError::RemovalPending(room_id));
            }
            self.mls_clean = false;
            let epoch = self.epoch_of(room_id);
            let packages = match &intent {
                Intent::Invite(members) => self.claim_key_packages(room_id, epoch, None, members).await?,
                Intent::InviteAt { domain, members } => {
                    self.claim_key_packages(room_id, epoch, Some(domain.clone()), members).await?
                }
                _ => Vec::new(),
            };
            let entry = member_entry(&mut self.rooms, room_id)?;
            let group = entry.group.as_mut().expect("member_entry checked");
            let (output, recipients) = match &intent {
                Intent::Invite(members) | Intent::InviteAt { members, .. } => {
                    let refs: Vec<&[u8]> = packages.iter().map(Vec::as_slice).collect();
                    (group.add_members(&self.provider, &self.identity, &refs)?, members.clone())
                }
                Intent::Remove(members) => {
                    let mut leaves = Vec::with_capacity(members.len());
                    for member in members {
                        let (leaf, _) = member_of(group, SenderId(*member))
                            .ok_or(ClientError::UnknownMember(SenderId(*member)))?;
                        leaves.push(leaf);
                    }
                    (group.remove_members(&self.provider, &self.identity, &leaves)?, Vec::new())
                }
                Intent::Update => (group.self_update(&self.provider, &self.identity)?, Vec::new()),
                Intent::CoverProposals => {
                    if !entry.record.cover_proposals {
                        // Another member's commit covered them meanwhile.
                        return Ok(group.epoch());
                    }
                    (group.commit_pending_proposals(&self.provider, &self.identity)?, Vec::new())
                }
                Intent::Create => return Err(ClientError::Protocol("room creation is not a commit".into())),
            };
            let commit = Commit {
                commit: output.commit,
                welcome: output.welcome,
                welcome_recipients: recipients,
                group_info: Some(output.group_info),
            };
            let frame = self.frame(room_id, epoch, &commit)?;
            let room = self.rooms.get_mut(&room_id).ok_or(ClientError::UnknownRoom(room_id))?;
            room.commit_sent(frame.to_bytes().to_vec(), epoch, intent.clone())?;
            self.checkpoint()?;
            if self.settle_commit(room_id, &frame).await? {
                return Ok(self.epoch_of(room_id));
            }
        }
        Err(ClientError::RetriesExhausted { what: "commit", attempts: COMMIT_ATTEMPTS_MAX })
    }

    async fn claim_key_packages(
        &mut self,
        room_id: RoomId,
        epoch: u64,
        domain: Option<DomainName>,
        members: &[u64],
    ) -> Result<Vec<Vec<u8>>, ClientError> {
        let claim = KeyPackageClaim { sender_ids: members.to_vec(), domain };
        let frame = self.frame(room_id, epoch, &claim)?;
        let reply = self.request(&frame).await?;
        let claimed: KeyPackageClaimed = expect(&reply)?;
        if claimed.key_packages.len() != members.len() {
            return Err(ClientError::Protocol("claim answered with the wrong number of key packages".into()));
        }
        let mut packages = Vec::with_capacity(members.len());
        for (member, claimed) in members.iter().zip(claimed.key_packages) {
            packages.push(claimed.key_package.ok_or(ClientError::NoKeyPackage(SenderId(*member)))?);
        }
        Ok(packages)
    }

    /// Sends a pending commit and settles it: `true` if it landed, `false`
    /// if another commit won (the pending commit is discarded and the
    /// caller redoes its intent).
    async fn settle_commit(&mut self, room_id: RoomId, frame: &Frame) -> Result<bool, ClientError> {
        self.mls_clean = false;
        let reply = self.request(frame).await?;
        match reply.opcode() {
            Opcode::Ack => {
                let _: Ack = expect(&reply)?;
                // The log reaches our commit and merges it (with everything before it).
                self.sync(room_id).await?;
                let still_pending = self.rooms.get(&room_id).is_some_and(|e| e.record.pending.is_some());
                if still_pending {
                    return Err(ClientError::Protocol("acknowledged commit missing from the log".into()));
                }
                Ok(true)
            }
            Opcode::Error => {
                let error = ClientError::refused(&reply);
                let details = reply.decode_payload::<payload::Error>().ok();
                let room = self.rooms.get_mut(&room_id).ok_or(ClientError::UnknownRoom(room_id))?;
                let refusal = room.commit_refused(&self.provider, details.as_ref())?;
                self.checkpoint()?;
                match refusal {
                    // The caller redoes the intent once caught up.
                    CommitRefusal::Retry { .. } => {
                        self.sync(room_id).await?;
                        Ok(false)
                    }
                    CommitRefusal::Final => Err(error),
                }
            }
            other => Err(ClientError::Protocol(format!("{other:?} answering a commit"))),
        }
    }

    /// Joins `room_id` with the Welcome someone sent (waiting up to
    /// `wait` for it). Returns the epoch joined.
    pub async fn join(&mut self, room_id: RoomId, wait: Duration) -> Result<u64, ClientError> {
        if self.rooms.get(&room_id).is_some_and(|e| e.group.is_some() && !e.record.removed) {
            return Ok(self.epoch_of(room_id));
        }
        self.drain_buffered(Some(room_id))?;
        let deadline = tokio::time::Instant::now() + wait;
        let mut frames_read = 0usize;
        while !self.welcomes.contains_key(&room_id) {
            if frames_read >= WELCOME_WAIT_FRAMES_MAX {
                break;
            }
            let connection = self.connection()?;
            match tokio::time::timeout_at(deadline, connection.recv()).await {
                Ok(Ok(frame)) => {
                    frames_read += 1;
                    self.handle_incoming(frame)?;
                }
                Ok(Err(ConnectionError::TimedOut)) | Err(_) => break,
                Ok(Err(error)) => return Err(error.into()),
            }
        }
        let Some(frame) = self.welcomes.get(&room_id).cloned() else {
            return Err(ClientError::NoWelcome {
                room: room_id,
                waited_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
            });
        };
        self.mls_clean = false;
        let room = RoomLog::join_from_welcome(&self.provider, room_id, &frame)?;
        self.rooms.insert(room_id, room);
        self.welcomes.remove(&room_id);
        self.pending_batch.delete(Namespace::Welcome, &room_id.0);
        self.checkpoint()?;
        self.sync(room_id).await?;
        Ok(self.epoch_of(room_id))
    }

    /// Joins `room_id` by external commit from its published GroupInfo
    /// (no invitation needed). Retries when another commit wins the epoch,
    /// and when the commit is refused as invalid but the room's GroupInfo
    /// has changed meanwhile: the one it was built on was of an epoch a
    /// void undid, whose number the room has reached again with other keys.
    pub async fn join_external(&mut self, room_id: RoomId) -> Result<u64, ClientError> {
        let mut refused_as_invalid: Option<(Vec<u8>, ClientError)> = None;
        for _ in 0..COMMIT_ATTEMPTS_MAX {
            self.mls_clean = false;
            let request = self.frame(room_id, 0, &GroupInfoRequest {})?;
            let reply = self.request(&request).await?;
            let info: GroupInfo = expect(&reply)?;
            if let Some((group_info, error)) = refused_as_invalid.take() {
                if group_info == info.group_info {
                    return Err(error);
                }
            }
            let (group, output) = RoomGroup::join_by_external_commit(
                &self.provider,
                &self.identity,
                &info.group_info,
                Some(&info.ratchet_tree),
            )?;
            let mut state = ClientState::PendingWelcome;
            step(&mut state, Event::JoinedByExternalCommit { epoch: group.epoch() })?;
            let join = ExternalJoin { commit: output.commit, group_info: Some(output.group_info) };
            let frame = self.frame(room_id, info.epoch, &join)?;
            let reply = self.request(&frame).await?;
            match reply.opcode() {
                Opcode::Ack => {
                    let ack: Ack = expect(&reply)?;
                    let room = RoomLog::joined_by_external_commit(
                        &self.provider,
                        room_id,
                        group,
                        ack.log_index,
                        ack.epoch,
                        Some(ack.server_time_ms),
                    )?;
                    self.rooms.insert(room_id, room);
                    self.checkpoint()?;
                    return Ok(ack.epoch);
                }
                _ => {
                    let error = ClientError::refused(&reply);
                    let wrong_epoch = reply
                        .decode_payload::<payload::Error>()
                        .ok()
                        .filter(|e| e.code == ErrorCode::WrongEpoch.to_u16())
                        .map(|e| (e.current_epoch.unwrap_or(info.epoch + 1), e.log_index.unwrap_or(0)));
                    let event = match wrong_epoch {
                        Some((current_epoch, log_index)) => Event::WrongEpoch { current_epoch, log_index },
                        None => Event::CommitRefused,
                    };
                    let invalid = error.code() == Some(ErrorCode::InvalidCommit.to_u16());
                    let actions = step(&mut state, event)?;
                    if actions.contains(&Action::DeleteGroup) {
                        group.delete(&self.provider)?;
                    }
                    if invalid {
                        refused_as_invalid = Some((info.group_info, error));
                    } else if !actions.contains(&Action::ReapplyIntent) {
                        return Err(error);
                    }
                }
            }
        }
        Err(ClientError::RetriesExhausted { what: "external join", attempts: COMMIT_ATTEMPTS_MAX })
    }

    /// Encrypts `text` for the room and sends it; returns its log index.
    /// The message is in the outbox (on disk) before it is sent; if the
    /// connection fails it stays there and is sent by the next
    /// [`Client::connect`] or [`Client::flush_outbox`].
    pub async fn send(&mut self, room_id: RoomId, text: &[u8]) -> Result<u64, ClientError> {
        self.send_message(room_id, text, None).await
    }

    /// [`Client::send`] with a push notification (`push`, at most
    /// [`crate::push::PUSH_PLAINTEXT_BYTES_MAX`] bytes, e.g. a sender name and
    /// a preview) sealed with the room's push key, which the server forwards
    /// to members who are not connected.
    pub async fn send_with_push(
        &mut self,
        room_id: RoomId,
        text: &[u8],
        push: &[u8],
    ) -> Result<u64, ClientError> {
        if push.len() > crate::push::PUSH_PLAINTEXT_BYTES_MAX {
            return Err(SealPushError::PlaintextTooLarge { len_bytes: push.len() }.into());
        }
        self.send_message(room_id, text, Some(push.to_vec())).await
    }

    async fn send_message(
        &mut self,
        room_id: RoomId,
        text: &[u8],
        push: Option<Vec<u8>>,
    ) -> Result<u64, ClientError> {
        if text.len() > MESSAGE_BYTES_MAX {
            return Err(ClientError::MessageTooLarge { len_bytes: text.len() });
        }
        if self.outbox.len() >= OUTBOX_ENTRIES_MAX {
            return Err(ClientError::OutboxFull);
        }
        self.member_group(room_id)?;
        // Without a connection the message still goes to the outbox (sealed
        // in the epoch we know; resealed at delivery if the room moved on).
        let mut synced = self.sync(room_id).await;
        if synced.is_ok() {
            synced = self.cover_pending_proposals(room_id).await.map(|()| Vec::new());
        }
        if synced.is_ok() && self.rooms.get(&room_id).and_then(RoomLog::stuck_on).is_some() {
            synced = Err(ClientError::Recovering(room_id));
        }
        // The room's domain unreachable now (a room of another domain) is
        // like no connection: the message waits in the outbox.
        if let Err(error) = &synced {
            if !error.is_retryable() {
                return Err(synced.unwrap_err());
            }
        }
        if self.settle_own_removal(room_id)? {
            // The server takes no message until the removal is committed,
            // and then we are no longer a member.
            self.member_group(room_id)?;
            return Err(ClientError::RemovalPending(room_id));
        }
        let id = self.outbox.last_key_value().map_or(1, |(id, _)| id + 1);
        let entry = self.seal_entry(room_id, id, text.to_vec(), push, 0)?;
        self.outbox.insert(id, entry);
        self.checkpoint()?;
        synced?;
        self.deliver(id).await
    }

    fn seal_entry(
        &mut self,
        room_id: RoomId,
        id: u64,
        plaintext: Vec<u8>,
        push: Option<Vec<u8>>,
        attempts: u32,
    ) -> Result<OutboxRecord, ClientError> {
        let room = member_entry(&mut self.rooms, room_id)?;
        let sealed_push = push
            .as_deref()
            .map(|push| key_cache::seal_notification(&self.provider, room, push))
            .transpose()?;
        let sealed = room.seal_with_push(&plaintext, sealed_push, &self.signing_key)?;
        let record = OutboxRecord {
            id,
            room_id: room_id.0,
            plaintext,
            epoch: sealed.epoch,
            generation: sealed.generation,
            frame: sealed.frame.to_bytes().to_vec(),
            attempts,
            next_attempt_ms: 0,
            push,
        };
        self.pending_batch.put(Namespace::Outbox, &id.to_be_bytes(), encode(&record));
        Ok(record)
    }

    /// Sends outbox entry `id` until it is sequenced, refused for good, or
    /// the connection fails (then it stays in the outbox with its backoff).
    async fn deliver(&mut self, id: u64) -> Result<u64, ClientError> {
        for _ in 0..SEND_ATTEMPTS_MAX {
            let Some(entry) = self.outbox.get(&id).cloned() else {
                return Err(ClientError::Protocol("outbox entry vanished".into()));
            };
            let room_id = RoomId(entry.room_id);
            let frame = self.fresh_request(&entry.frame, "outbox entry")?;
            let reply = match self.request(&frame).await {
                Ok(reply) => reply,
                Err(error) => {
                    self.note_failed_attempt(id)?;
                    return Err(error);
                }
            };
            match reply.opcode() {
                Opcode::Ack => {
                    let ack: Ack = expect(&reply)?;
                    self.outbox.remove(&id);
                    self.pending_batch.delete(Namespace::Outbox, &id.to_be_bytes());
                    let message = Message {
                        room_id: entry.room_id,
                        log_index: ack.log_index,
                        sender: self.sender_id().0,
                        server_time_ms: ack.server_time_ms,
                        body: MessageBody::Text(entry.plaintext),
                    };
                    self.pending_batch.message(room_id, ack.log_index, encode(&message));
                    let mut head_checked = Ok(());
                    if let Some(room) = self.rooms.get_mut(&room_id) {
                        // A subscribed connection is not sent its own frame back (the
                        // Ack stands for it): step over it when it is next in the log.
                        let mut stamped = frame.clone();
                        stamped
                            .header_mut()
                            .set_log_index(ack.log_index)
                            .set_server_timestamp_ms(ack.server_time_ms);
                        room.step_over_own(&stamped);
                        head_checked = room.acknowledged(&ack);
                    }
                    self.checkpoint()?;
                    head_checked?;
                    return Ok(ack.log_index);
                }
                _ => {
                    let error = ClientError::refused(&reply);
                    let retry_after =
                        reply.decode_payload::<payload::Error>().ok().and_then(|e| e.retry_after_ms);
                    match error.code().and_then(ErrorCode::from_u16) {
                        Some(ErrorCode::WrongEpoch) | Some(ErrorCode::PendingProposals) => {
                            // The room moved on (or waits for a commit covering a
                            // removal): catch up, commit what waits, reseal.
                            self.sync(room_id).await?;
                            self.cover_pending_proposals(room_id).await?;
                            if self.settle_own_removal(room_id)? {
                                // The removal waiting is ours: this message, and any
                                // other for the room, can never be sent.
                                self.drop_undeliverable(room_id)?;
                                return Err(ClientError::RemovalPending(room_id));
                            }
                            let resealed = self.seal_entry(
                                room_id,
                                id,
                                entry.plaintext,
                                entry.push,
                                entry.attempts + 1,
                            )?;
                            self.outbox.insert(id, resealed);
                            self.checkpoint()?;
                        }
                        Some(ErrorCode::DomainUnreachable) => {
                            // The room's domain cannot be reached now: the
                            // message stays in the outbox, as when the
                            // connection fails.
                            self.note_failed_attempt(id)?;
                            return Err(error);
                        }
                        Some(ErrorCode::RateLimited) => {
                            let attempts = self.note_failed_attempt(id)?;
                            let delay =
                                retry_after.unwrap_or_else(|| backoff_ms(attempts)).min(BACKOFF_MAX_MS);
                            tokio::time::sleep(Duration::from_millis(delay)).await;
                        }
                        _ => {
                            // Refused for good: the message cannot be sent.
                            self.outbox.remove(&id);
                            self.pending_batch.delete(Namespace::Outbox, &id.to_be_bytes());
                            self.checkpoint()?;
                            return Err(error);
                        }
                    }
                }
            }
        }
        Err(ClientError::RetriesExhausted { what: "send", attempts: SEND_ATTEMPTS_MAX })
    }

    fn note_failed_attempt(&mut self, id: u64) -> Result<u32, ClientError> {
        let Some(entry) = self.outbox.get_mut(&id) else { return Ok(0) };
        entry.attempts += 1;
        entry.next_attempt_ms = now_ms() + backoff_ms(entry.attempts);
        let encoded = encode(entry);
        let attempts = entry.attempts;
        self.pending_batch.put(Namespace::Outbox, &id.to_be_bytes(), encoded);
        self.checkpoint()?;
        Ok(attempts)
    }

    /// Sends every outbox entry whose retry time has come (entries the log
    /// shows as sequenced were resolved by the catch-up before). Returns how
    /// many were sent. A room that fails does not keep the other rooms'
    /// messages back: they are sent, and the first room's failure is
    /// returned after them.
    pub async fn flush_outbox(&mut self) -> Result<usize, ClientError> {
        let mut failures = Vec::new();
        let sent = self.flush_outbox_into(&mut failures).await?;
        match failures.into_iter().next() {
            Some(failure) => Err(failure.error),
            None => Ok(sent),
        }
    }

    /// [`Client::flush_outbox`], adding each failed room to `failures` (and
    /// skipping rooms already there); fails only for the whole device.
    async fn flush_outbox_into(&mut self, failures: &mut Vec<RoomFailure>) -> Result<usize, ClientError> {
        let now = now_ms();
        let due: Vec<u64> = self.outbox.values().filter(|e| e.next_attempt_ms <= now).map(|e| e.id).collect();
        let mut sent = 0;
        for id in due {
            let Some(entry) = self.outbox.get(&id) else { continue };
            let room_id = RoomId(entry.room_id);
            if failures.iter().any(|failure| failure.room_id == room_id) {
                continue;
            }
            match self.flush_entry(id, room_id).await {
                Ok(delivered) => sent += usize::from(delivered),
                Err(error) => failures.push(room_failure(room_id, error)?),
            }
        }
        Ok(sent)
    }

    /// Catches the entry's room up and sends the entry (resealed if the
    /// epoch moved on). `false`: the log showed it sequenced already.
    async fn flush_entry(&mut self, id: u64, room_id: RoomId) -> Result<bool, ClientError> {
        if !self.rooms.get(&room_id).is_some_and(RoomLog::is_member) {
            self.drop_undeliverable(room_id)?;
            return Ok(false);
        }
        self.sync(room_id).await?;
        if !self.outbox.contains_key(&id) || self.rooms.get(&room_id).and_then(RoomLog::stuck_on).is_some() {
            return Ok(false);
        }
        if self.settle_own_removal(room_id)? {
            self.drop_undeliverable(room_id)?;
            return Ok(false);
        }
        if let Some(entry) = self.outbox.get(&id).filter(|e| e.epoch != self.epoch_of(room_id)).cloned() {
            let resealed = self.seal_entry(room_id, id, entry.plaintext, entry.push, entry.attempts)?;
            self.outbox.insert(id, resealed);
            self.checkpoint()?;
        }
        self.deliver(id).await?;
        Ok(true)
    }

    /// Drops the outbox entries of a room this device has left or is being
    /// removed from, and reports them as [`ClientError::Undelivered`].
    fn drop_undeliverable(&mut self, room_id: RoomId) -> Result<(), ClientError> {
        let ids: Vec<u64> = self.outbox.values().filter(|e| e.room_id == room_id.0).map(|e| e.id).collect();
        for id in &ids {
            self.outbox.remove(id);
            self.pending_batch.delete(Namespace::Outbox, &id.to_be_bytes());
        }
        self.checkpoint()?;
        if ids.is_empty() {
            return Ok(());
        }
        Err(ClientError::Undelivered { room: room_id, messages: ids.len() })
    }

    /// Subscribes to `room_id` from the first entry not yet read; then
    /// [`Client::next_message`] yields entries as they are sequenced.
    pub async fn subscribe(&mut self, room_id: RoomId) -> Result<(), ClientError> {
        self.member_group(room_id)?;
        let from = self.rooms[&room_id].record.next_log_index;
        let epoch = self.epoch_of(room_id);
        let frame = self.frame(room_id, epoch, &Subscribe { from_log_index: from })?;
        self.connection()?.send(&frame).await?;
        Ok(())
    }

    /// The next new history entry of any subscribed room, waiting up to `wait`.
    pub async fn next_message(&mut self, wait: Duration) -> Result<Option<Message>, ClientError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let wake = self.recovery_wake(deadline);
            let connection = self.connection()?;
            let frame = match tokio::time::timeout_at(wake, connection.recv()).await {
                Ok(Ok(frame)) => frame,
                Ok(Err(ConnectionError::TimedOut)) | Err(_) => {
                    if self.report_overdue().await? && tokio::time::Instant::now() < deadline {
                        continue;
                    }
                    return Ok(None);
                }
                Ok(Err(error)) => return Err(error.into()),
            };
            let room_id = frame.header().room_id();
            if frame.opcode() == Opcode::Error && !is_erased_placeholder(&frame) {
                let error = ClientError::refused(&frame);
                if error.code() == Some(ErrorCode::PendingProposals.to_u16()) {
                    // The server's reminder that a removal waits for a commit.
                    self.sync(room_id).await?;
                    self.cover_pending_proposals(room_id).await?;
                    continue;
                }
                return Err(error);
            }
            let message = self.handle_incoming(frame)?;
            self.checkpoint()?;
            self.drive_recovery(room_id).await?;
            self.cover_pending_proposals(room_id).await?;
            if message.is_some() {
                return Ok(message);
            }
        }
    }
}

fn expect<P: Payload>(frame: &Frame) -> Result<P, ClientError> {
    if frame.opcode() == Opcode::Error {
        return Err(ClientError::refused(frame));
    }
    if frame.opcode() != P::OPCODE {
        return Err(ClientError::Protocol(format!("expected {:?}, got {:?}", P::OPCODE, frame.opcode())));
    }
    frame.decode_payload().map_err(|e| ClientError::Protocol(format!("{:?} payload: {e}", P::OPCODE)))
}

fn member_entry(rooms: &mut BTreeMap<RoomId, RoomLog>, room_id: RoomId) -> Result<&mut RoomLog, ClientError> {
    let entry = rooms.get_mut(&room_id).ok_or(ClientError::UnknownRoom(room_id))?;
    if entry.group.is_none() || entry.record.removed {
        return Err(ClientError::NotMember(room_id));
    }
    Ok(entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leaf_certificate_is_renewed_unless_certified_by_this_domain_for_a_while_yet() {
        use kalandra_proto::federation::HomeCertificate;
        let key = ed25519_dalek::SigningKey::from_bytes(&[4; 32]);
        let a = DomainName::parse("a.test").unwrap();
        let now_ms = 1_800_000_000_000;
        let current = HomeCertificate::issue(&key, a.clone(), [7; 32], now_ms + 90 * 24 * 3600 * 1000);
        let certified = |domain: &DomainName, ends_in_ms| HomeCheck::Certified {
            domain: domain.clone(),
            not_after_ms: now_ms + ends_in_ms,
        };
        let due = |check: &HomeCheck| home_certificate_renewal_due(check, Some(&current), now_ms);
        assert!(!due(&certified(&a, HOME_CERTIFICATE_RENEW_BEFORE_MS + 1)));
        assert!(due(&certified(&a, HOME_CERTIFICATE_RENEW_BEFORE_MS - 1)), "ends soon");
        assert!(
            due(&certified(&DomainName::parse("b.test").unwrap(), 90 * 24 * 3600 * 1000)),
            "another domain"
        );
        assert!(due(&HomeCheck::Expired { domain: a.clone(), not_after_ms: now_ms - 1 }));
        assert!(due(&HomeCheck::Uncertified));
        assert!(due(&HomeCheck::UnknownDomain { domain: a.clone() }));
        // Under a key the domain no longer lists (after a rotation), or forged.
        assert!(due(&HomeCheck::Invalid { reason: "does not verify".into() }));
        assert!(!home_certificate_renewal_due(&HomeCheck::Uncertified, None, now_ms), "nothing to carry");
    }

    #[test]
    fn a_last_resort_package_is_made_again_before_it_or_its_certificate_ends() {
        let provider = crate::mls::MlsProvider::from_seed([3; 32]);
        let mut identity = crate::mls::Identity::generate(&provider).unwrap();
        let now_s = 1_800_000_000;
        let package = generate_last_resort_key_package(&provider, &identity, now_s).unwrap();
        let plain = last_resort_record(&package, None);
        let renew_at = package.not_after_unix_secs - LAST_RESORT_RENEW_BEFORE_SECS;
        assert!(last_resort_current(Some(&plain), now_s, false, None));
        assert!(!last_resort_current(Some(&plain), renew_at, false, None), "near its lifetime's end");
        assert!(
            !last_resort_current(Some(&plain), now_s, true, None),
            "uncertified while the server certifies"
        );
        assert!(!last_resort_current(Some(&[1]), now_s, false, None), "a record that does not say when");
        assert!(!last_resort_current(None, now_s, false, None));
        // A certificate ending before the package: renewed before the certificate ends.
        let key = ed25519_dalek::SigningKey::from_bytes(&[4; 32]);
        let domain = DomainName::parse("a.test").unwrap();
        let ends_ms = (now_s + 10 * 24 * 3600) * 1000;
        let certificate =
            kalandra_proto::federation::HomeCertificate::issue(&key, domain, *identity.public_key(), ends_ms);
        identity.set_home_certificate(Some(certificate.clone()));
        let certified = last_resort_record(&package, identity.home_certificate());
        assert!(last_resort_current(Some(&certified), now_s, true, None));
        assert!(!last_resort_current(Some(&certified), now_s + 3 * 24 * 3600 + 1, true, None));
        // After a rotation: under the domain's current key, or made again.
        let listed = |key: &ed25519_dalek::SigningKey| {
            let key = PeerKey { key: key.verifying_key(), valid_until_ms: None };
            PeerKeys::new(DomainName::parse("a.test").unwrap(), vec![key]).unwrap()
        };
        assert!(last_resort_current(Some(&certified), now_s, true, Some(&listed(&key))));
        let rotated = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
        assert!(!last_resort_current(Some(&certified), now_s, true, Some(&listed(&rotated))));
    }

    #[test]
    fn backoff_doubles_from_the_initial_delay_up_to_the_cap() {
        assert_eq!(backoff_ms(0), BACKOFF_INITIAL_MS);
        assert_eq!(backoff_ms(1), BACKOFF_INITIAL_MS);
        assert_eq!(backoff_ms(2), 2 * BACKOFF_INITIAL_MS);
        assert_eq!(backoff_ms(5), 16 * BACKOFF_INITIAL_MS);
        assert_eq!(backoff_ms(8), BACKOFF_MAX_MS.min(128 * BACKOFF_INITIAL_MS));
        assert_eq!(backoff_ms(u32::MAX), BACKOFF_MAX_MS);
    }

    #[test]
    fn init_then_open_keeps_the_identity_and_refuses_a_second_init_and_a_wrong_key() {
        let dir = tempfile::tempdir().unwrap();
        let key = StoreKey::from_bytes([9u8; 32]);
        let sender = Client::init(dir.path(), &key).unwrap().sender_id();
        assert!(matches!(Client::init(dir.path(), &key), Err(ClientError::AlreadyInitialised { .. })));
        assert_eq!(Client::open(dir.path(), &key).unwrap().sender_id(), sender);
        let wrong = Client::open(dir.path(), &StoreKey::from_bytes([8u8; 32])).unwrap_err();
        assert!(matches!(wrong, ClientError::Store(StoreError::WrongKey)), "{wrong:?}");
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(Client::open(empty.path(), &key), Err(ClientError::NotInitialised { .. })));
    }
}
