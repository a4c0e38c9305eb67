//! A device (client-core's `Client`) as a foreign object. Calls that talk to
//! the server are async (a Kotlin `suspend fun`, a Swift `async` function, a
//! Python coroutine) and run on a tokio runtime inside the library; one call
//! at a time per device (later calls wait for the one in progress).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use client_core::client::{Client, MessageBody, ServerAddress, ServerTarget, ServerTrust};
use client_core::store::StoreKey;
use client_core::tls::parse_fingerprint;
use kalandra_proto::{RoomId, SenderId};
use tokio::sync::Mutex;

use crate::error::KalandraError;

/// Longest wait a caller may ask for (one hour).
pub const WAIT_MS_MAX: u64 = 3_600_000;
/// Most history entries one call returns.
pub const HISTORY_COUNT_MAX: u32 = 10_000;

/// One entry of a room's history on this device.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct Message {
    /// The room (16 bytes).
    pub room_id: Vec<u8>,
    /// Its log index.
    pub log_index: u64,
    /// Who sent it.
    pub sender: u64,
    /// When the server sequenced it, ms since the Unix epoch.
    pub server_time_ms: u64,
    /// Its content.
    pub body: Body,
}

/// What a history entry holds.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Enum)]
pub enum Body {
    /// A message, decrypted.
    Text {
        /// Its bytes (UTF-8 for text the apps send).
        text: Vec<u8>,
    },
    /// A commit changed the room's members.
    Membership {
        /// The epoch after the commit.
        epoch: u64,
        /// Who joined.
        added: Vec<u64>,
        /// Who left or was removed.
        removed: Vec<u64>,
    },
    /// A message this device cannot read.
    Unreadable {
        /// Why.
        reason: String,
    },
    /// Erased on the server before this device read it.
    Redacted,
}

impl From<client_core::client::Message> for Message {
    fn from(message: client_core::client::Message) -> Self {
        let body = match message.body {
            MessageBody::Text(text) => Body::Text { text },
            MessageBody::Membership { epoch, added, removed } => Body::Membership { epoch, added, removed },
            MessageBody::Unreadable(reason) => Body::Unreadable { reason },
            MessageBody::Redacted => Body::Redacted,
        };
        Message {
            room_id: message.room_id.to_vec(),
            log_index: message.log_index,
            sender: message.sender,
            server_time_ms: message.server_time_ms,
            body,
        }
    }
}

/// A room as this device sees it.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct RoomSummary {
    /// The room (16 bytes).
    pub room_id: Vec<u8>,
    /// Its epoch.
    pub epoch: u64,
    /// Its members' sender ids.
    pub members: Vec<u64>,
    /// The next log index this device will read.
    pub next_log_index: u64,
    /// Whether this device's removal is proposed (it can no longer send).
    pub removal_pending: bool,
}

/// What a member's leaf shows of its home domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum HomeStatus {
    /// Certified by its domain under a key this device's server accepts for it.
    Certified,
    /// As `Certified`, but past its end (the member has not updated its leaf since).
    Expired,
    /// The leaf carries no home certificate.
    Uncertified,
    /// Its domain's keys are not known to this device's server.
    UnknownDomain,
    /// Not a certificate of that domain for this leaf.
    Invalid,
}

/// A member and its home domain as its leaf's home certificate shows it,
/// checked on this device ([`Device::member_homes`]).
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct MemberHome {
    /// The member's sender id (none if its credential is not a key).
    pub sender_id: Option<u64>,
    /// Its leaf index.
    pub leaf_index: u32,
    /// What its certificate shows.
    pub status: HomeStatus,
    /// The home domain, when certified (or expired) or of an unknown domain.
    pub domain: Option<String>,
    /// The certificate's end, ms since the Unix epoch, when certified or expired.
    pub not_after_ms: Option<u64>,
    /// Why it is invalid.
    pub reason: Option<String>,
}

impl From<client_core::client::MemberHome> for MemberHome {
    fn from(member: client_core::client::MemberHome) -> MemberHome {
        use client_core::client::HomeCheck;
        let (status, domain, not_after_ms, reason) = match member.home {
            HomeCheck::Certified { domain, not_after_ms } => {
                (HomeStatus::Certified, Some(domain.to_string()), Some(not_after_ms), None)
            }
            HomeCheck::Expired { domain, not_after_ms } => {
                (HomeStatus::Expired, Some(domain.to_string()), Some(not_after_ms), None)
            }
            HomeCheck::Uncertified => (HomeStatus::Uncertified, None, None, None),
            HomeCheck::UnknownDomain { domain } => {
                (HomeStatus::UnknownDomain, Some(domain.to_string()), None, None)
            }
            HomeCheck::Invalid { reason } => (HomeStatus::Invalid, None, None, Some(reason)),
        };
        let sender_id = member.sender.map(|sender| sender.0);
        MemberHome { sender_id, leaf_index: member.leaf_index, status, domain, not_after_ms, reason }
    }
}

/// A room that failed while a call went over every room; the other rooms
/// went on.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct RoomFailure {
    /// The room (16 bytes).
    pub room_id: Vec<u8>,
    /// The server's error code, when the server refused.
    pub code: Option<u16>,
    /// What failed, as the error raised for it would say.
    pub detail: String,
}

impl From<client_core::client::RoomFailure> for RoomFailure {
    fn from(failure: client_core::client::RoomFailure) -> Self {
        RoomFailure {
            room_id: failure.room_id.0.to_vec(),
            code: failure.error.code(),
            detail: KalandraError::from(failure.error).to_string(),
        }
    }
}

fn failures(list: Vec<client_core::client::RoomFailure>) -> Vec<RoomFailure> {
    list.into_iter().map(RoomFailure::from).collect()
}

fn room(room_id: &[u8]) -> Result<RoomId, KalandraError> {
    let bytes: [u8; 16] = room_id
        .try_into()
        .map_err(|_| KalandraError::invalid(format!("a room id is 16 bytes, not {}", room_id.len())))?;
    Ok(RoomId(bytes))
}

fn store_key(key: &[u8]) -> Result<StoreKey, KalandraError> {
    let bytes: [u8; 32] = key
        .try_into()
        .map_err(|_| KalandraError::invalid(format!("a store key is 32 bytes, not {}", key.len())))?;
    Ok(StoreKey::from_bytes(bytes))
}

fn wait(wait_ms: u64) -> Result<Duration, KalandraError> {
    if wait_ms > WAIT_MS_MAX {
        return Err(KalandraError::invalid(format!("a wait of {wait_ms} ms exceeds {WAIT_MS_MAX}")));
    }
    Ok(Duration::from_millis(wait_ms))
}

fn senders(ids: &[u64]) -> Vec<SenderId> {
    ids.iter().copied().map(SenderId).collect()
}

fn messages(list: Vec<client_core::client::Message>) -> Vec<Message> {
    list.into_iter().map(Message::from).collect()
}

/// What [`Device::background_sync`] did and left.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct BackgroundReport {
    /// Rooms brought to their current epoch, commits settled (first pass).
    pub rooms_settled: Vec<Vec<u8>>,
    /// Rooms caught up, in the order handled (rooms waiting on a commit first).
    pub rooms_synced: Vec<Vec<u8>>,
    /// Rooms left for the next call.
    pub rooms_left: Vec<Vec<u8>>,
    /// Rooms that failed; the others went on.
    pub rooms_failed: Vec<RoomFailure>,
    /// Outbox messages sent.
    pub outbox_sent: u64,
    /// Messages still in the outbox.
    pub outbox_left: u64,
    /// Whether the budget ran out before everything was done.
    pub budget_exhausted: bool,
}

impl From<client_core::client::BackgroundReport> for BackgroundReport {
    fn from(report: client_core::client::BackgroundReport) -> Self {
        let ids = |rooms: Vec<RoomId>| rooms.into_iter().map(|room| room.0.to_vec()).collect();
        BackgroundReport {
            rooms_settled: ids(report.rooms_settled),
            rooms_synced: ids(report.rooms_synced),
            rooms_left: ids(report.rooms_left),
            rooms_failed: failures(report.rooms_failed),
            outbox_sent: u64::try_from(report.outbox_sent).unwrap_or(u64::MAX),
            outbox_left: u64::try_from(report.outbox_left).unwrap_or(u64::MAX),
            budget_exhausted: report.budget_exhausted,
        }
    }
}

/// A device: its identity, rooms, outbox and history, in an encrypted store
/// in one directory.
#[derive(uniffi::Object)]
pub struct Device {
    client: Mutex<Client>,
    sender_id: u64,
    directory: PathBuf,
}

impl Device {
    fn wrap(client: Client) -> Arc<Device> {
        let sender_id = client.sender_id().0;
        let directory = client.directory().to_owned();
        Arc::new(Device { client: Mutex::new(client), sender_id, directory })
    }
}

#[uniffi::export(async_runtime = "tokio")]
impl Device {
    /// Creates a new device in `directory`, its store encrypted under the
    /// 32-byte `store_key` (keep it in the platform's keychain/keystore).
    #[uniffi::constructor]
    pub fn init(directory: String, store_key: Vec<u8>) -> Result<Arc<Device>, KalandraError> {
        Ok(Device::wrap(Client::init(Path::new(&directory), &self::store_key(&store_key)?)?))
    }

    /// Opens the device in `directory` with its `store_key`.
    #[uniffi::constructor]
    pub fn open(directory: String, store_key: Vec<u8>) -> Result<Arc<Device>, KalandraError> {
        Ok(Device::wrap(Client::open(Path::new(&directory), &self::store_key(&store_key)?)?))
    }

    /// This device's sender id (what others invite).
    pub fn sender_id(&self) -> u64 {
        self.sender_id
    }

    /// The directory the device lives in.
    pub fn directory(&self) -> String {
        self.directory.display().to_string()
    }

    /// Remembers the server: its QUIC `address` (`host:port`), TLS
    /// `server_name` and the hex SHA-256 `fingerprint_hex` of its certificate.
    pub async fn set_server(
        &self,
        address: String,
        server_name: String,
        fingerprint_hex: String,
    ) -> Result<(), KalandraError> {
        let address = ServerAddress::parse(&address)
            .map_err(|e| KalandraError::invalid(format!("address {address}: {e}")))?;
        let fingerprint = parse_fingerprint(&fingerprint_hex)
            .ok_or_else(|| KalandraError::invalid("a fingerprint is 64 hex digits"))?;
        let target = ServerTarget { address, server_name, trust: ServerTrust::Fingerprint(fingerprint) };
        Ok(self.client.lock().await.set_server(target)?)
    }

    /// How long a request waits for its answer, in ms.
    pub async fn set_request_timeout(&self, timeout_ms: u64) -> Result<(), KalandraError> {
        self.client.lock().await.set_request_timeout(wait(timeout_ms)?);
        Ok(())
    }

    /// Connects, authenticates, catches every room up and sends the
    /// outbox; returns the rooms that failed (the others went on). Raises
    /// only for the whole device (the connection, the store).
    pub async fn connect(&self) -> Result<Vec<RoomFailure>, KalandraError> {
        Ok(failures(self.client.lock().await.connect().await?))
    }

    /// Closes the connection.
    pub async fn disconnect(&self) {
        self.client.lock().await.disconnect().await
    }

    /// Creates a room; returns its 16-byte id.
    pub async fn create_room(&self) -> Result<Vec<u8>, KalandraError> {
        Ok(self.client.lock().await.create_room().await?.0.to_vec())
    }

    /// Adds `members` (sender ids) to the room; returns the new epoch.
    pub async fn invite(&self, room_id: Vec<u8>, members: Vec<u64>) -> Result<u64, KalandraError> {
        Ok(self.client.lock().await.invite(room(&room_id)?, &senders(&members)).await?)
    }

    /// Removes `members` from the room; returns the new epoch.
    pub async fn remove(&self, room_id: Vec<u8>, members: Vec<u64>) -> Result<u64, KalandraError> {
        Ok(self.client.lock().await.remove(room(&room_id)?, &senders(&members)).await?)
    }

    /// Joins a room we were invited to, waiting up to `wait_ms` for the
    /// invitation; returns the epoch joined.
    pub async fn join(&self, room_id: Vec<u8>, wait_ms: u64) -> Result<u64, KalandraError> {
        Ok(self.client.lock().await.join(room(&room_id)?, wait(wait_ms)?).await?)
    }

    /// Leaves the room.
    pub async fn leave(&self, room_id: Vec<u8>) -> Result<u64, KalandraError> {
        Ok(self.client.lock().await.leave(room(&room_id)?).await?)
    }

    /// Renews this device's keys in the room; returns the new epoch.
    pub async fn self_update(&self, room_id: Vec<u8>) -> Result<u64, KalandraError> {
        Ok(self.client.lock().await.self_update(room(&room_id)?).await?)
    }

    /// Sends `text`; returns its log index.
    pub async fn send(&self, room_id: Vec<u8>, text: Vec<u8>) -> Result<u64, KalandraError> {
        Ok(self.client.lock().await.send(room(&room_id)?, &text).await?)
    }

    /// Sends `text` with a push notification `push` (at most 2048 bytes) for
    /// members who are not connected; returns its log index.
    pub async fn send_with_push(
        &self,
        room_id: Vec<u8>,
        text: Vec<u8>,
        push: Vec<u8>,
    ) -> Result<u64, KalandraError> {
        Ok(self.client.lock().await.send_with_push(room(&room_id)?, &text, &push).await?)
    }

    /// Catches the room up with the server; returns the new entries.
    pub async fn sync(&self, room_id: Vec<u8>) -> Result<Vec<Message>, KalandraError> {
        Ok(messages(self.client.lock().await.sync(room(&room_id)?).await?))
    }

    /// Subscribes to the room: [`Device::next_message`] then yields its new entries.
    pub async fn subscribe(&self, room_id: Vec<u8>) -> Result<(), KalandraError> {
        Ok(self.client.lock().await.subscribe(room(&room_id)?).await?)
    }

    /// The next new entry of a subscribed room, waiting up to `wait_ms`;
    /// none if nothing came.
    pub async fn next_message(&self, wait_ms: u64) -> Result<Option<Message>, KalandraError> {
        Ok(self.client.lock().await.next_message(wait(wait_ms)?).await?.map(Message::from))
    }

    /// The room's history on this device from `from_log_index`, at most
    /// `count_max` (at most 10,000) entries.
    pub async fn history(
        &self,
        room_id: Vec<u8>,
        from_log_index: u64,
        count_max: u32,
    ) -> Result<Vec<Message>, KalandraError> {
        if count_max > HISTORY_COUNT_MAX {
            return Err(KalandraError::invalid(format!("count_max {count_max} exceeds {HISTORY_COUNT_MAX}")));
        }
        let count = usize::try_from(count_max).unwrap_or(usize::MAX);
        Ok(messages(self.client.lock().await.history(room(&room_id)?, from_log_index, count)?))
    }

    /// The rooms this device is a member of.
    pub async fn rooms(&self) -> Vec<RoomSummary> {
        self.client
            .lock()
            .await
            .rooms()
            .into_iter()
            .map(|summary| RoomSummary {
                room_id: summary.room_id.0.to_vec(),
                epoch: summary.epoch,
                members: summary.members.iter().map(|member| member.0).collect(),
                next_log_index: summary.next_log_index,
                removal_pending: summary.removal_pending,
            })
            .collect()
    }

    /// Each member of the room with its home domain, checked on this device
    /// against the keys its server accepts for that domain.
    pub async fn member_homes(&self, room_id: Vec<u8>) -> Result<Vec<MemberHome>, KalandraError> {
        let homes = self.client.lock().await.member_homes(room(&room_id)?).await?;
        Ok(homes.into_iter().map(MemberHome::from).collect())
    }

    /// The rooms this device has left (removed); their history stays.
    pub async fn left_rooms(&self) -> Vec<Vec<u8>> {
        self.client.lock().await.left_rooms().into_iter().map(|room| room.0.to_vec()).collect()
    }

    /// Messages waiting in the outbox.
    pub async fn outbox_len(&self) -> u64 {
        u64::try_from(self.client.lock().await.outbox_len()).unwrap_or(u64::MAX)
    }

    /// A bounded catch-up for a background slot (Android foreground service
    /// or job, iOS background task): within `budget_ms`, every room's
    /// commits and proposals first (its epoch brought up to date, removals
    /// committed), then every room's messages, then the outbox; returns what
    /// was done, what is left and which rooms failed.
    pub async fn background_sync(&self, budget_ms: u64) -> Result<BackgroundReport, KalandraError> {
        Ok(self.client.lock().await.background_sync(wait(budget_ms)?).await?.into())
    }

    /// Sends the outbox entries that are due; returns how many were sent.
    pub async fn flush_outbox(&self) -> Result<u64, KalandraError> {
        let sent = self.client.lock().await.flush_outbox().await?;
        Ok(u64::try_from(sent).unwrap_or(u64::MAX))
    }

    /// Moderation: removes `member` from the room (a moderator's kick).
    pub async fn kick(&self, room_id: Vec<u8>, member: u64, reason: String) -> Result<u64, KalandraError> {
        Ok(self.client.lock().await.kick(room(&room_id)?, SenderId(member), &reason).await?)
    }

    /// Moderation: bans `user` from the room, for `duration_ms` or for good.
    pub async fn ban(
        &self,
        room_id: Vec<u8>,
        user: u64,
        reason: String,
        duration_ms: Option<u64>,
    ) -> Result<u64, KalandraError> {
        Ok(self.client.lock().await.ban(room(&room_id)?, SenderId(user), &reason, duration_ms).await?)
    }

    /// Moderation: lifts a ban.
    pub async fn unban(&self, room_id: Vec<u8>, user: u64, reason: String) -> Result<(), KalandraError> {
        Ok(self.client.lock().await.unban(room(&room_id)?, SenderId(user), &reason).await?)
    }

    /// Moderation: grants or revokes `role` (`admin`, `moderator`).
    pub async fn set_role(
        &self,
        room_id: Vec<u8>,
        user: u64,
        role: String,
        granted: bool,
    ) -> Result<(), KalandraError> {
        Ok(self.client.lock().await.set_role(room(&room_id)?, SenderId(user), &role, granted).await?)
    }

    /// Moderation: erases the entry at `log_index` on the server.
    pub async fn redact(
        &self,
        room_id: Vec<u8>,
        log_index: u64,
        reason: String,
    ) -> Result<(), KalandraError> {
        Ok(self.client.lock().await.redact(room(&room_id)?, log_index, &reason).await?)
    }

    /// The key cache (push keys of the current and previous epoch of every
    /// room) as written to [`Device::key_cache_path`].
    pub async fn export_key_cache(&self) -> Vec<u8> {
        self.client.lock().await.export_key_cache().as_bytes().to_vec()
    }

    /// Where the key cache file is written.
    pub async fn key_cache_path(&self) -> String {
        self.client.lock().await.key_cache_path().display().to_string()
    }

    /// Writes the key cache file to `path` from now on (e.g. the app group
    /// container), and at once. Not stored: set it after every open.
    pub async fn set_key_cache_path(&self, path: String) -> Result<(), KalandraError> {
        Ok(self.client.lock().await.set_key_cache_path(Path::new(&path))?)
    }
}
