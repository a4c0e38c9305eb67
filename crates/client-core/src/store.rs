//! The client's embedded store (redb), encrypted at rest.
//!
//! Everything a device keeps — its identity, its OpenMLS state (groups, key
//! package private keys, pending commits), each room's position in the log
//! and sender-key state, the outbox and the message history — is written
//! here, encrypted with XChaCha20-Poly1305 under a 32-byte key the
//! application supplies ([`StoreKey`]; on a phone it comes from the
//! platform keystore).
//!
//! # Layout
//!
//! Two subkeys are derived from the application key with HKDF-SHA256:
//! `value_key` (info `kalandra client store values v1`) encrypts, and
//! `name_key` (info `kalandra client store names v1`) hides names. Tables:
//!
//! - `records_v1`: key `HMAC-SHA256(name_key, namespace || name)`, value
//!   `nonce (24) || XChaCha20-Poly1305(value_key, nonce, namespace || name_len
//!   (u32) || name || value, aad = table key)`. Names (MLS storage keys carry
//!   group ids) never appear in the clear; a record moved under another key
//!   fails authentication.
//! - `messages_v1`: key `HMAC-SHA256(name_key, "room" || room_id)[..16] ||
//!   log_index (u64 BE)`, value encrypted the same way with the key as
//!   associated data. Range reads per room work; what leaks is how many
//!   entries a room has.
//! - `meta_v1`: a key check (a fixed plaintext encrypted under `value_key`),
//!   so a wrong key is [`StoreError::WrongKey`], not garbage.
//!
//! Every [`ClientStore::write`] is one redb transaction committed with
//! `Durability::Immediate`: a batch is entirely on disk or not at all, which
//! is what lets the client checkpoint its MLS state together with the log
//! index it has reached.
//!
//! # A damaged file
//!
//! redb trusts the file it opens and may panic inside its B-trees on one
//! altered behind its back. So [`ClientStore::open`] has redb check the
//! whole file as it opens it (the checksum of every page of the committed
//! trees; one read of the file, which is small for a device) and turns what
//! fails into [`StoreError::Damaged`], as it does a panic inside redb while
//! opening (caught, never passed on); a file that cannot be read at all is
//! [`StoreError::Unreadable`]. A record that opens but fails authentication
//! is [`StoreError::Corrupt`].
//!
//! Nonces are 24 random bytes from the operating system (this module is a
//! driver); with XChaCha20's 192-bit nonces random nonces do not collide in
//! practice.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};

use chacha20poly1305::aead::{Aead, Payload as AeadPayload};
use chacha20poly1305::{KeyInit, XChaCha20Poly1305, XNonce};
use hkdf::hmac::{Hmac, KeyInit as _, Mac};
use hkdf::Hkdf;
use kalandra_proto::RoomId;
use rand::RngCore;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use sha2::Sha256;

/// Length of the application-supplied store key.
pub const STORE_KEY_BYTES: usize = 32;
/// Length of a record's table key.
pub const RECORD_KEY_BYTES: usize = 32;
/// Length of a message's table key: room tag (16) and log index (8).
pub const MESSAGE_KEY_BYTES: usize = 24;
/// Largest record name.
pub const RECORD_NAME_BYTES_MAX: usize = 4096;
/// Largest record or message value.
pub const RECORD_VALUE_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Most messages one [`ClientStore::messages`] call returns.
pub const MESSAGES_PER_READ_MAX: usize = 10_000;
/// XChaCha20-Poly1305 nonce length.
const NONCE_BYTES: usize = 24;
/// Poly1305 tag length.
const TAG_BYTES: usize = 16;
/// Records loaded by [`ClientStore::load_records`] at most (a device's state
/// is thousands of records; this bounds the loop against a damaged file).
pub const RECORDS_MAX: usize = 1_000_000;

const RECORDS: TableDefinition<&[u8; RECORD_KEY_BYTES], &[u8]> = TableDefinition::new("records_v1");
const MESSAGES: TableDefinition<&[u8; MESSAGE_KEY_BYTES], &[u8]> = TableDefinition::new("messages_v1");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta_v1");
const KEY_CHECK: &str = "key_check";
const KEY_CHECK_PLAINTEXT: &[u8] = b"kalandra client store v1";

const _: () = assert!(RECORD_NAME_BYTES_MAX <= u32::MAX as usize);
const _: () = assert!(MESSAGE_KEY_BYTES == 16 + 8);

/// The application's key for the store. Not `Debug`, overwritten on drop.
pub struct StoreKey([u8; STORE_KEY_BYTES]);

impl StoreKey {
    /// A key from its bytes.
    pub fn from_bytes(bytes: [u8; STORE_KEY_BYTES]) -> Self {
        StoreKey(bytes)
    }

    /// A fresh random key from the operating system.
    pub fn generate() -> Self {
        let mut bytes = [0u8; STORE_KEY_BYTES];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        StoreKey(bytes)
    }

    /// The key's bytes (to hand to a keystore).
    pub fn as_bytes(&self) -> &[u8; STORE_KEY_BYTES] {
        &self.0
    }
}

impl Drop for StoreKey {
    fn drop(&mut self) {
        self.0 = [0u8; STORE_KEY_BYTES];
        std::hint::black_box(&self.0);
    }
}

/// What a record is; part of its name, so records of different kinds never collide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Namespace {
    /// OpenMLS storage entries (the provider's key-value map).
    Mls = 1,
    /// The device identity.
    Identity = 2,
    /// A room's position, state and sender keys.
    Room = 3,
    /// An outbox entry.
    Outbox = 4,
    /// A Welcome received but not yet used.
    Welcome = 5,
    /// Client settings (server address and the like).
    Config = 6,
}

impl Namespace {
    fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            1 => Namespace::Mls,
            2 => Namespace::Identity,
            3 => Namespace::Room,
            4 => Namespace::Outbox,
            5 => Namespace::Welcome,
            6 => Namespace::Config,
            _ => return None,
        })
    }
}

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The key does not open this store.
    #[error("the store key does not match this store")]
    WrongKey,
    /// A record failed authentication or does not parse: the file was
    /// damaged or tampered with.
    #[error("store record damaged: {detail}")]
    Corrupt {
        /// What was wrong.
        detail: String,
    },
    /// The caller passed a name or value past its limit.
    #[error("{what} of {len_bytes} bytes exceeds {max_bytes}")]
    TooLarge {
        /// Which part.
        what: &'static str,
        /// Its length.
        len_bytes: usize,
        /// The limit.
        max_bytes: usize,
    },
    /// Another process has the store open (one process at a time).
    #[error("the store is open in another process")]
    InUse,
    /// The store file is damaged (altered or cut short since it was
    /// written, or not a store at all): it does not open.
    #[error("the device store {} is damaged: {reason}", path.display())]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What redb found.
        reason: String,
    },
    /// The store file exists but cannot be read (permissions, I/O error).
    #[error("the device store {} cannot be read: {reason}", path.display())]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        reason: String,
    },
    /// The file system or redb failed.
    #[error("storage failure during {operation}: {detail}")]
    Io {
        /// The operation.
        operation: &'static str,
        /// The underlying error.
        detail: String,
    },
}

fn damaged(path: &Path, reason: impl Into<String>) -> StoreError {
    StoreError::Damaged { path: path.to_owned(), reason: reason.into() }
}

fn panic_reason(panic: &(dyn std::any::Any + Send)) -> String {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".to_owned());
    format!("the storage engine failed on it ({message})")
}

/// Opens (or creates) the redb file with a full integrity check, turning
/// damage, and a panic of redb's on it, into [`StoreError::Damaged`].
fn open_database(path: &Path) -> Result<Database, StoreError> {
    let mut builder = Database::builder();
    builder.set_check_integrity_on_open(true);
    let opened = std::panic::catch_unwind(AssertUnwindSafe(|| builder.create(path)));
    match opened {
        Ok(Ok(database)) => Ok(database),
        Ok(Err(redb::DatabaseError::DatabaseAlreadyOpen | redb::DatabaseError::LockProtocolMismatch)) => {
            Err(StoreError::InUse)
        }
        // redb reports a file that is not one of its own as invalid data,
        // and one cut inside its header as an early end of file.
        Ok(Err(redb::DatabaseError::Storage(redb::StorageError::Io(error))))
            if matches!(
                error.kind(),
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
            ) =>
        {
            Err(damaged(path, error.to_string()))
        }
        Ok(Err(redb::DatabaseError::Storage(redb::StorageError::Io(error)))) => {
            Err(StoreError::Unreadable { path: path.to_owned(), reason: error.to_string() })
        }
        Ok(Err(redb::DatabaseError::Storage(redb::StorageError::Corrupted(reason)))) => {
            Err(damaged(path, reason))
        }
        Ok(Err(redb::DatabaseError::RepairAborted)) => Err(damaged(path, "it needs a repair that failed")),
        Ok(Err(redb::DatabaseError::UpgradeRequired(version))) => {
            Err(damaged(path, format!("file format {version} is not one this version reads")))
        }
        Ok(Err(other)) => Err(StoreError::Io { operation: "open", detail: other.to_string() }),
        Err(panic) => Err(damaged(path, panic_reason(panic.as_ref()))),
    }
}

fn io<E: std::fmt::Display>(operation: &'static str) -> impl Fn(E) -> StoreError {
    move |error| StoreError::Io { operation, detail: error.to_string() }
}

/// One change of a [`WriteBatch`].
#[derive(Debug, Clone)]
enum Change {
    Put { namespace: Namespace, name: Vec<u8>, value: Vec<u8> },
    Delete { namespace: Namespace, name: Vec<u8> },
    Message { room_id: RoomId, log_index: u64, value: Vec<u8> },
}

/// Changes written together in one durable transaction.
#[derive(Debug, Clone, Default)]
pub struct WriteBatch {
    changes: Vec<Change>,
}

impl WriteBatch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }
    /// Sets record `name` of `namespace` to `value`.
    pub fn put(&mut self, namespace: Namespace, name: &[u8], value: Vec<u8>) -> &mut Self {
        self.changes.push(Change::Put { namespace, name: name.to_vec(), value });
        self
    }
    /// Deletes record `name` of `namespace` (absent is fine).
    pub fn delete(&mut self, namespace: Namespace, name: &[u8]) -> &mut Self {
        self.changes.push(Change::Delete { namespace, name: name.to_vec() });
        self
    }
    /// Stores message `log_index` of `room_id` (replacing one stored there).
    pub fn message(&mut self, room_id: RoomId, log_index: u64, value: Vec<u8>) -> &mut Self {
        self.changes.push(Change::Message { room_id, log_index, value });
        self
    }
    /// Whether the batch has no change.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }
    /// How many changes the batch has.
    pub fn len(&self) -> usize {
        self.changes.len()
    }
}

/// A decrypted record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Its kind.
    pub namespace: Namespace,
    /// Its name.
    pub name: Vec<u8>,
    /// Its value.
    pub value: Vec<u8>,
}

/// The encrypted store of one device.
pub struct ClientStore {
    path: PathBuf,
    database: Database,
    cipher: XChaCha20Poly1305,
    name_key: [u8; 32],
}

impl std::fmt::Debug for ClientStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientStore").finish_non_exhaustive()
    }
}

impl ClientStore {
    /// Opens the store at `path`, creating it if absent. A store created
    /// under another key is [`StoreError::WrongKey`].
    pub fn open(path: &Path, key: &StoreKey) -> Result<Self, StoreError> {
        let hkdf = Hkdf::<Sha256>::new(None, &key.0);
        let mut value_key = [0u8; 32];
        let mut name_key = [0u8; 32];
        hkdf.expand(b"kalandra client store values v1", &mut value_key).expect("32 bytes fit HKDF");
        hkdf.expand(b"kalandra client store names v1", &mut name_key).expect("32 bytes fit HKDF");
        let cipher = XChaCha20Poly1305::new(&value_key.into());
        value_key = [0u8; 32];
        std::hint::black_box(&value_key);
        let database = open_database(path)?;
        let store = ClientStore { path: path.to_owned(), database, cipher, name_key };
        match std::panic::catch_unwind(AssertUnwindSafe(|| store.check_key())) {
            Ok(checked) => checked?,
            Err(panic) => return Err(damaged(path, panic_reason(panic.as_ref()))),
        }
        Ok(store)
    }

    fn check_key(&self) -> Result<(), StoreError> {
        let txn = self.database.begin_write().map_err(io("open"))?;
        {
            let mut meta = txn.open_table(META).map_err(io("open"))?;
            let existing = meta.get(KEY_CHECK).map_err(io("open"))?.map(|v| v.value().to_vec());
            match existing {
                Some(sealed) => {
                    let opened =
                        self.open_value(&sealed, KEY_CHECK.as_bytes()).map_err(|_| StoreError::WrongKey)?;
                    if opened != KEY_CHECK_PLAINTEXT {
                        return Err(StoreError::WrongKey);
                    }
                }
                None => {
                    let sealed = self.seal_value(KEY_CHECK_PLAINTEXT, KEY_CHECK.as_bytes());
                    meta.insert(KEY_CHECK, sealed.as_slice()).map_err(io("open"))?;
                }
            }
            txn.open_table(RECORDS).map_err(io("open"))?;
            txn.open_table(MESSAGES).map_err(io("open"))?;
        }
        txn.commit().map_err(io("open"))
    }

    fn seal_value(&self, plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_BYTES];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let ciphertext = self
            .cipher
            .encrypt(XNonce::from_slice(&nonce), AeadPayload { msg: plaintext, aad })
            .expect("XChaCha20-Poly1305 encrypts any length below 256 GiB");
        let mut out = Vec::with_capacity(NONCE_BYTES + ciphertext.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ciphertext);
        out
    }

    fn open_value(&self, sealed: &[u8], aad: &[u8]) -> Result<Vec<u8>, StoreError> {
        if sealed.len() < NONCE_BYTES + TAG_BYTES {
            return Err(StoreError::Corrupt { detail: "value shorter than nonce and tag".into() });
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_BYTES);
        self.cipher
            .decrypt(XNonce::from_slice(nonce), AeadPayload { msg: ciphertext, aad })
            .map_err(|_| StoreError::Corrupt { detail: "value fails authentication".into() })
    }

    fn mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.name_key).expect("HMAC takes any key length");
        for part in parts {
            mac.update(part);
        }
        mac.finalize().into_bytes().into()
    }

    fn record_key(&self, namespace: Namespace, name: &[u8]) -> [u8; RECORD_KEY_BYTES] {
        self.mac(&[&[namespace as u8], name])
    }

    fn message_key(&self, room_id: RoomId, log_index: u64) -> [u8; MESSAGE_KEY_BYTES] {
        let tag = self.mac(&[b"room", &room_id.0]);
        let mut key = [0u8; MESSAGE_KEY_BYTES];
        key[..16].copy_from_slice(&tag[..16]);
        key[16..].copy_from_slice(&log_index.to_be_bytes());
        key
    }

    /// Writes `batch` in one durable transaction: all of it or none.
    pub fn write(&self, batch: &WriteBatch) -> Result<(), StoreError> {
        for change in &batch.changes {
            let (name_len, value_len) = match change {
                Change::Put { name, value, .. } => (name.len(), value.len()),
                Change::Delete { name, .. } => (name.len(), 0),
                Change::Message { value, .. } => (0, value.len()),
            };
            if name_len > RECORD_NAME_BYTES_MAX {
                return Err(StoreError::TooLarge {
                    what: "record name",
                    len_bytes: name_len,
                    max_bytes: RECORD_NAME_BYTES_MAX,
                });
            }
            if value_len > RECORD_VALUE_BYTES_MAX {
                return Err(StoreError::TooLarge {
                    what: "record value",
                    len_bytes: value_len,
                    max_bytes: RECORD_VALUE_BYTES_MAX,
                });
            }
        }
        let mut txn = self.database.begin_write().map_err(io("write"))?;
        txn.set_durability(Durability::Immediate).map_err(io("write"))?;
        {
            let mut records = txn.open_table(RECORDS).map_err(io("write"))?;
            let mut messages = txn.open_table(MESSAGES).map_err(io("write"))?;
            for change in &batch.changes {
                match change {
                    Change::Put { namespace, name, value } => {
                        let key = self.record_key(*namespace, name);
                        let mut plaintext = Vec::with_capacity(5 + name.len() + value.len());
                        plaintext.push(*namespace as u8);
                        plaintext.extend_from_slice(
                            &u32::try_from(name.len())
                                .expect("checked against RECORD_NAME_BYTES_MAX")
                                .to_be_bytes(),
                        );
                        plaintext.extend_from_slice(name);
                        plaintext.extend_from_slice(value);
                        let sealed = self.seal_value(&plaintext, &key);
                        records.insert(&key, sealed.as_slice()).map_err(io("write"))?;
                    }
                    Change::Delete { namespace, name } => {
                        records.remove(&self.record_key(*namespace, name)).map_err(io("write"))?;
                    }
                    Change::Message { room_id, log_index, value } => {
                        let key = self.message_key(*room_id, *log_index);
                        let sealed = self.seal_value(value, &key);
                        messages.insert(&key, sealed.as_slice()).map_err(io("write"))?;
                    }
                }
            }
        }
        txn.commit().map_err(io("write"))
    }

    /// Every record, decrypted and checked (at most [`RECORDS_MAX`]). A
    /// panic of redb's while reading is [`StoreError::Damaged`].
    pub fn load_records(&self) -> Result<Vec<Record>, StoreError> {
        std::panic::catch_unwind(AssertUnwindSafe(|| self.read_records()))
            .unwrap_or_else(|panic| Err(damaged(&self.path, panic_reason(panic.as_ref()))))
    }

    fn read_records(&self) -> Result<Vec<Record>, StoreError> {
        let txn = self.database.begin_read().map_err(io("load"))?;
        let records = txn.open_table(RECORDS).map_err(io("load"))?;
        let mut out = Vec::new();
        for item in records.iter().map_err(io("load"))?.take(RECORDS_MAX) {
            let (key, value) = item.map_err(io("load"))?;
            let key = *key.value();
            let plaintext = self.open_value(value.value(), &key)?;
            let corrupt = |detail: &str| StoreError::Corrupt { detail: detail.to_owned() };
            let (&namespace, rest) = plaintext.split_first().ok_or_else(|| corrupt("empty record"))?;
            let namespace = Namespace::from_u8(namespace).ok_or_else(|| corrupt("unknown namespace"))?;
            if rest.len() < 4 {
                return Err(corrupt("record name length missing"));
            }
            let (len, rest) = rest.split_at(4);
            let name_len = u32::from_be_bytes(len.try_into().expect("4 bytes")) as usize;
            if name_len > rest.len() {
                return Err(corrupt("record name longer than the record"));
            }
            let (name, value) = rest.split_at(name_len);
            if self.record_key(namespace, name) != key {
                return Err(corrupt("record stored under another name"));
            }
            out.push(Record { namespace, name: name.to_vec(), value: value.to_vec() });
        }
        Ok(out)
    }

    /// Messages of `room_id` from `from_log_index` on, in log order, at most
    /// `count_max` (capped at [`MESSAGES_PER_READ_MAX`]).
    pub fn messages(
        &self,
        room_id: RoomId,
        from_log_index: u64,
        count_max: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let txn = self.database.begin_read().map_err(io("messages"))?;
        let table = txn.open_table(MESSAGES).map_err(io("messages"))?;
        let low = self.message_key(room_id, from_log_index);
        let high = self.message_key(room_id, u64::MAX);
        let mut out = Vec::new();
        for item in table
            .range::<&[u8; MESSAGE_KEY_BYTES]>(&low..=&high)
            .map_err(io("messages"))?
            .take(count_max.min(MESSAGES_PER_READ_MAX))
        {
            let (key, value) = item.map_err(io("messages"))?;
            let key = *key.value();
            let log_index = u64::from_be_bytes(key[16..].try_into().expect("8 bytes"));
            out.push((log_index, self.open_value(value.value(), &key)?));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOM: RoomId = RoomId(*b"store-test-room!");

    fn temp_path(name: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        (dir, path)
    }

    #[test]
    fn records_and_messages_survive_reopening_and_are_not_stored_in_the_clear() {
        let (_dir, path) = temp_path("client.redb");
        let key = StoreKey::from_bytes([5u8; 32]);
        let marker = b"marker-0123456789-abcdef-secret-plaintext";
        {
            let store = ClientStore::open(&path, &key).unwrap();
            let mut batch = WriteBatch::new();
            batch.put(Namespace::Mls, b"group-name-in-clear?", marker.to_vec());
            batch.put(Namespace::Room, b"r1", b"one".to_vec());
            batch.message(ROOM, 7, marker.to_vec());
            batch.message(ROOM, 3, b"three".to_vec());
            store.write(&batch).unwrap();
            let mut batch = WriteBatch::new();
            batch.delete(Namespace::Room, b"r1");
            store.write(&batch).unwrap();
        }
        let store = ClientStore::open(&path, &key).unwrap();
        let records = store.load_records().unwrap();
        assert_eq!(
            records,
            vec![Record {
                namespace: Namespace::Mls,
                name: b"group-name-in-clear?".to_vec(),
                value: marker.to_vec()
            }]
        );
        let messages = store.messages(ROOM, 0, 10).unwrap();
        assert_eq!(messages, vec![(3, b"three".to_vec()), (7, marker.to_vec())]);
        assert_eq!(store.messages(ROOM, 4, 10).unwrap().len(), 1);
        drop(store);
        let bytes = std::fs::read(&path).unwrap();
        let contains = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
        assert!(!contains(marker), "a value is on disk in the clear");
        assert!(!contains(b"group-name-in-clear?"), "a name is on disk in the clear");
        assert!(contains(b"records_v1"), "the scan finds what is there");
    }

    #[test]
    fn another_key_is_refused_as_a_wrong_key() {
        let (_dir, path) = temp_path("client.redb");
        drop(ClientStore::open(&path, &StoreKey::from_bytes([1u8; 32])).unwrap());
        let error = ClientStore::open(&path, &StoreKey::from_bytes([2u8; 32])).unwrap_err();
        assert!(matches!(error, StoreError::WrongKey), "{error:?}");
    }

    #[test]
    fn oversized_names_are_refused_and_nothing_of_the_batch_is_written() {
        let (_dir, path) = temp_path("client.redb");
        let store = ClientStore::open(&path, &StoreKey::from_bytes([1u8; 32])).unwrap();
        let mut batch = WriteBatch::new();
        batch.put(Namespace::Config, b"ok", b"v".to_vec());
        batch.put(Namespace::Config, &vec![0u8; RECORD_NAME_BYTES_MAX + 1], b"v".to_vec());
        assert!(matches!(store.write(&batch), Err(StoreError::TooLarge { what: "record name", .. })));
        assert!(store.load_records().unwrap().is_empty());
    }

    const PAGE_BYTES: usize = 4096;

    /// A store with enough records and messages to span many pages.
    fn filled_store(path: &Path, key: &StoreKey, rounds: u64) {
        let store = ClientStore::open(path, key).unwrap();
        for round in 0..rounds {
            let mut batch = WriteBatch::new();
            for i in 0..64u64 {
                batch.put(Namespace::Mls, format!("entry-{round}-{i}").as_bytes(), vec![7u8; 300]);
                batch.message(ROOM, round * 64 + i, vec![9u8; 200]);
            }
            store.write(&batch).unwrap();
        }
    }

    fn garbage(page: &mut [u8]) {
        for (byte, i) in page.iter_mut().zip((0..=u8::MAX).cycle()) {
            *byte = i.wrapping_mul(31).wrapping_add(7);
        }
    }

    /// Opens the store at `path` and reads everything in it.
    fn open_and_read(path: &Path, key: &StoreKey) -> Result<(), StoreError> {
        let store = ClientStore::open(path, key)?;
        store.load_records()?;
        store.messages(ROOM, 0, MESSAGES_PER_READ_MAX)?;
        Ok(())
    }

    /// A filled store damaged by `damage`: what opening and reading it says.
    fn opened_after(damage: impl FnOnce(&mut Vec<u8>)) -> Result<(), StoreError> {
        let (_dir, path) = temp_path("client.redb");
        let key = StoreKey::from_bytes([3u8; 32]);
        filled_store(&path, &key, 4);
        let mut bytes = std::fs::read(&path).unwrap();
        damage(&mut bytes);
        std::fs::write(&path, &bytes).unwrap();
        open_and_read(&path, &key)
    }

    #[test]
    fn a_truncated_file_a_garbage_page_and_a_zeroed_header_are_damage() {
        let truncated = opened_after(|bytes| bytes.truncate(bytes.len() / 2));
        // Garbage over a page in the file's first half that holds data (the
        // file grows by regions, so the pages past the data are free).
        let middle = (1..8)
            .map(|eighth| {
                opened_after(|bytes| {
                    let start = (bytes.len() / PAGE_BYTES) * eighth / 16 * PAGE_BYTES;
                    garbage(&mut bytes[start..start + PAGE_BYTES]);
                })
            })
            .find(Result::is_err)
            .expect("one of the pages holds data");
        let header = opened_after(|bytes| bytes[..PAGE_BYTES].fill(0));
        let cut_in_header = opened_after(|bytes| bytes.truncate(100));
        for (what, result) in [
            ("truncated", truncated),
            ("garbage page", middle),
            ("zeroed header", header),
            ("cut inside the header", cut_in_header),
        ] {
            match &result {
                Err(StoreError::Damaged { path, reason }) => {
                    assert!(path.ends_with("client.redb"), "{what}: {result:?}");
                    assert!(
                        !reason.starts_with("the storage engine failed"),
                        "{what}: redb panicked: {reason}"
                    );
                }
                other => panic!("{what}: {other:?}"),
            }
        }
    }

    /// Garbage over each page of the file in turn: every open either works
    /// (a page no committed tree uses) or says the file is damaged, and the
    /// integrity check, not a caught panic, is what finds it.
    #[test]
    fn garbage_over_any_page_is_found_by_the_integrity_check_not_a_panic() {
        let (_dir, path) = temp_path("client.redb");
        let key = StoreKey::from_bytes([4u8; 32]);
        filled_store(&path, &key, 2);
        let pristine = std::fs::read(&path).unwrap();
        let mut found = 0;
        for page in (0..pristine.len() / PAGE_BYTES).step_by(2) {
            let mut bytes = pristine.clone();
            garbage(&mut bytes[page * PAGE_BYTES..(page + 1) * PAGE_BYTES]);
            std::fs::write(&path, &bytes).unwrap();
            match open_and_read(&path, &key) {
                Ok(()) => {}
                Err(StoreError::Damaged { reason, .. }) => {
                    assert!(!reason.starts_with("the storage engine failed"), "page {page}: {reason}");
                    found += 1;
                }
                Err(StoreError::Corrupt { .. }) => found += 1,
                Err(other) => panic!("page {page}: {other:?}"),
            }
        }
        assert!(found > 0, "no damaged page was noticed");
    }
}
