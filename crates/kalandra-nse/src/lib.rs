//! Push-notification keys (PCEK) without MLS: what a Notification Service
//! Extension (NSE) needs to decrypt a push, and nothing more. This crate
//! depends on no MLS library, no async runtime and no network code (CI checks
//! its dependency tree with `scripts/check-nse-deps.sh`); client-core
//! derives the keys from MLS and re-exports everything here as
//! `client_core::push`.
//!
//! Every member of a room derives, per epoch, the same *notification key*
//! from the MLS exporter. A sender seals a short notification (for example a
//! sender name and a preview) into a *push payload*; the server forwards it
//! opaquely to the platform's push service. The app keeps the notification
//! keys of the current and the previous epoch of each room and writes them to
//! a *key cache*; the NSE decrypts a push with [`decrypt_push`] from that
//! cache alone. Everything below is normative: it is enough to implement
//! [`decrypt_push`] on another platform.
//!
//! All integers are unsigned big-endian; `||` is concatenation; offsets and
//! lengths are in bytes; HKDF is HKDF-SHA256 (RFC 5869); XChaCha20-Poly1305 is
//! draft-irtf-cfrg-xchacha-03 (see [below](#xchacha20-poly1305-from-chacha20-poly1305)).
//!
//! # Derivation
//!
//! 1. **PCEK** (32 bytes), once per room and epoch, from MLS (RFC 9420 §8.5):
//!
//!    ```text
//!    pcek = MLS-Exporter("kalandra push v1", room_id, 32)
//!    ```
//!
//!    with the label [`PUSH_EXPORTER_LABEL`] and the 16-byte room id as
//!    context. client-core's `NotificationKeyFromGroup::from_group` does
//!    this; it is the only part of the scheme that touches MLS.
//! 2. **Push key** (32 bytes), the XChaCha20-Poly1305 key of the epoch, with
//!    the PCEK as HKDF pseudorandom key ([`NotificationKey::from_pcek`]):
//!
//!    ```text
//!    push_key = HKDF-Expand(pcek, "kalandraPushV1", 32)
//!             = HMAC-SHA256(pcek, "kalandraPushV1" || 0x01)
//!    ```
//!
//!    ([`PUSH_KEY_LABEL`], 14 bytes; one output block, hence the single HMAC).
//!    The key cache holds push keys, never the PCEK: an NSE needs no HKDF.
//!
//! # Push payload
//!
//! What a sender produces ([`seal_push`]) and the server forwards unchanged:
//!
//! ```text
//! offset  length  field
//!      0       1  version = 0x01
//!      1      16  room_id
//!     17       8  epoch (u64)
//!     25      24  nonce
//!     49  n + 16  XChaCha20-Poly1305(push_key, nonce, plaintext, aad) with the
//!                 16-byte tag appended (ciphertext n bytes, then tag)
//! ```
//!
//! with `aad = payload[0..25] = version || room_id || epoch` and `push_key`
//! the key of `(room_id, epoch)`. The plaintext is at most
//! [`PUSH_PLAINTEXT_BYTES_MAX`] (2048) bytes, so a payload is 65 to 2113 bytes
//! ([`PUSH_PAYLOAD_BYTES_MIN`], [`PUSH_PAYLOAD_BYTES_MAX`]). Base64-encoded
//! (standard alphabet, padded) it takes at most 2820 bytes, which leaves 1276
//! bytes of an APNs or FCM payload (4096 bytes) for the JSON around it.
//!
//! The nonce must be 24 uniformly random bytes, fresh for every push: all
//! members of the epoch share the push key, so a counter would repeat across
//! senders. [`seal_push`] takes the nonce from the caller (no IO here).
//! The payload length reveals the plaintext length; senders that mind pad the
//! plaintext.
//!
//! # Key cache
//!
//! What the app writes ([`export_notification_keys`],
//! [`NotificationKeys::export`]) and the NSE reads:
//!
//! ```text
//! offset  length     field
//!      0       4     magic "KLPC" = 0x4b 0x4c 0x50 0x43
//!      4       1     version = 0x01
//!      5       2     count (u16), at most 800
//!      7  56·count   entries, each:
//!                      room_id (16) || epoch (8, u64) || push_key (32)
//! ```
//!
//! - The cache is exactly `7 + 56·count` bytes, so at most
//!   [`CACHE_BYTES_MAX`] (44,807) bytes; 100 rooms with two epochs each take
//!   11,207 bytes.
//! - Entries are in strictly increasing order of their first 24 bytes
//!   (`room_id || epoch`) compared as byte strings, that is by room id, then
//!   by epoch: no (room, epoch) appears twice.
//! - A room has at most [`EPOCHS_PER_ROOM_MAX`] (2) entries: its current and
//!   its previous epoch, so a push sealed just before a commit still decrypts
//!   after the app has moved on. Pushes of older epochs are
//!   [`PushError::UnknownRoomOrEpoch`] (the NSE shows a generic notification).
//!
//! The cache holds secret keys: store it where only the app and its NSE can
//! read it, under the platform's data protection.
//!
//! ## Key cache file
//!
//! The app writes the cache to a file with [`write_key_cache_file`] (client-core
//! does so after every change of a room's epoch): the bytes go to a temporary
//! file in the same directory (`<name>.tmp`), which is flushed to disk
//! (`fsync`), then renamed over the file, and the directory is synced. A
//! reader therefore sees either the old cache or the new one, never a mix. The
//! NSE reads it with [`read_key_cache_file`] (at most [`CACHE_BYTES_MAX`]
//! bytes are read; a longer file is [`PushError::TooLarge`]) or decrypts
//! straight from it with [`decrypt_push_file`].
//!
//! An NSE that read the cache just before the app moved a room to a new
//! epoch still opens pushes of the old epoch, and after the rewrite it opens
//! pushes of both: the app keeps the previous epoch's key for exactly that.
//!
//! # Decrypting a push
//!
//! [`decrypt_push`] makes these checks in this order; the first that fails
//! gives the error named.
//!
//! 1. Payload longer than 2113 bytes: [`PushError::TooLarge`].
//! 2. Payload empty: [`PushError::MalformedPayload`]. Byte 0 not `0x01`:
//!    [`PushError::UnsupportedVersion`]. Payload shorter than 65 bytes:
//!    [`PushError::MalformedPayload`].
//! 3. Cache longer than 44,807 bytes: [`PushError::TooLarge`]. Shorter than
//!    7 bytes: [`CacheDefect::Truncated`]. Magic not `"KLPC"`:
//!    [`CacheDefect::BadMagic`]. Byte 4 not `0x01`:
//!    [`PushError::UnsupportedVersion`]. Shorter than `7 + 56·count`:
//!    [`CacheDefect::Truncated`]; longer: [`CacheDefect::TrailingBytes`].
//! 4. For each entry `i` from 1: its first 24 bytes not greater than those of
//!    entry `i - 1`: [`CacheDefect::Unordered`]. For each entry `i` from 2:
//!    its room id equal to that of entry `i - 2`:
//!    [`CacheDefect::TooManyEpochs`]. (Cache defects are
//!    [`PushError::MalformedCache`]; the whole cache is checked.)
//! 5. No entry whose first 24 bytes equal `payload[1..25]`:
//!    [`PushError::UnknownRoomOrEpoch`].
//! 6. XChaCha20-Poly1305 decryption with the entry's push key, nonce
//!    `payload[25..49]`, associated data `payload[0..25]`, ciphertext
//!    `payload[49..len - 16]` and tag `payload[len - 16..]` fails:
//!    [`PushError::Authentication`]. Otherwise the plaintext is the push.
//!
//! # XChaCha20-Poly1305 from ChaCha20-Poly1305
//!
//! Platforms that only offer ChaCha20-Poly1305 with a 12-byte nonce
//! (RFC 8439; CryptoKit's `ChaChaPoly`) decrypt a push as follows, with the
//! ciphertext, tag and associated data unchanged:
//!
//! ```text
//! subkey    = HChaCha20(push_key, nonce[0..16])
//! nonce12   = 0x00 0x00 0x00 0x00 || nonce[16..24]
//! plaintext = ChaCha20-Poly1305-Open(subkey, nonce12, aad, ciphertext, tag)
//! ```
//!
//! `HChaCha20(key, n)`: build the ChaCha20 state of 16 little-endian `u32`
//! words — `0x61707865 0x3320646e 0x79622d32 0x6b206574`, then the 32-byte
//! key as 8 words, then the 16-byte `n` as 4 words (no block counter) — run
//! the 20 ChaCha20 rounds (10 times a column round then a diagonal round,
//! RFC 8439 §2.3), *do not* add the input state, and output words 0–3 and
//! 12–15 as 32 little-endian bytes.
//!
//! # Test vector
//!
//! With `pcek = 0x00 0x01 … 0x1f`, `room_id = 0xa0 0xa1 … 0xaf`, `epoch = 7`,
//! `nonce = 0x40 0x41 … 0x57` and the plaintext `"hello"` (hex; spaces only
//! separate fields, the payload ends with the 5-byte ciphertext and the tag):
//!
//! ```text
//! push_key = eaef4691df522213d7a5b9be8718ca9ae250eecb575c8c1e286d3e03c5f4a50f
//! payload  = 01 a0a1a2a3a4a5a6a7a8a9aaabacadaeaf 0000000000000007
//!            404142434445464748494a4b4c4d4e4f5051525354555657
//!            7bad8e9797 5fc95e33b26c57c5f4e39d2d82e69f42
//! cache    = 4b4c5043 01 0001
//!            a0a1a2a3a4a5a6a7a8a9aaabacadaeaf 0000000000000007 <push_key>
//! ```
//!
//! # Security notes
//!
//! - The push key is shared by every member of the epoch: a push proves that
//!   a member of the room in that epoch sealed it, not which member. A push
//!   is a hint; the app shows the signed message once it has synced.
//! - The NSE keeps no state, so a replayed push decrypts again.
//! - Forward secrecy is that of MLS, delayed by the cache's retention: a
//!   stolen cache opens the pushes of its two epochs per room.
//! - [`NotificationKey`], [`NotificationKeys`] and [`KeyCache`] overwrite
//!   their secret bytes when dropped.

mod cache;
mod file;
mod payload;

use hkdf::Hkdf;
use kalandra_proto::RoomId;
use sha2::Sha256;

pub use cache::{export_notification_keys, KeyCache, KeyCacheView, NotificationKeys};
pub use file::{decrypt_push_file, read_key_cache_file, write_key_cache_file, KeyCacheFileError};
pub use payload::{decrypt_push, seal_push, PushMessage};

/// MLS exporter label of the PCEK.
pub const PUSH_EXPORTER_LABEL: &str = "kalandra push v1";
/// Length of the exported PCEK.
pub const PCEK_BYTES: usize = 32;
/// HKDF info of the push key.
pub const PUSH_KEY_LABEL: &[u8] = b"kalandraPushV1";
/// Length of a push key (XChaCha20-Poly1305 key).
pub const PUSH_KEY_BYTES: usize = 32;
/// Length of a room id.
pub const ROOM_ID_BYTES: usize = 16;
/// Length of an encoded epoch.
pub const EPOCH_BYTES: usize = 8;

/// Version byte of the push payload.
pub const PUSH_VERSION: u8 = 1;
/// Length of a push nonce (XChaCha20-Poly1305 nonce).
pub const PUSH_NONCE_BYTES: usize = 24;
/// Length of the Poly1305 tag.
pub const PUSH_TAG_BYTES: usize = 16;
/// Length of the associated data: version, room id, epoch.
pub const PUSH_ASSOCIATED_DATA_BYTES: usize = 1 + ROOM_ID_BYTES + EPOCH_BYTES;
/// Length of the payload before the ciphertext.
pub const PUSH_HEADER_BYTES: usize = PUSH_ASSOCIATED_DATA_BYTES + PUSH_NONCE_BYTES;
/// Largest plaintext of a push.
pub const PUSH_PLAINTEXT_BYTES_MAX: usize = 2048;
/// Shortest payload: an empty plaintext.
pub const PUSH_PAYLOAD_BYTES_MIN: usize = PUSH_HEADER_BYTES + PUSH_TAG_BYTES;
/// Longest payload.
pub const PUSH_PAYLOAD_BYTES_MAX: usize = PUSH_PAYLOAD_BYTES_MIN + PUSH_PLAINTEXT_BYTES_MAX;
// The wire protocol carries exactly these payloads in `Application.push`.
const _: () = assert!(PUSH_PAYLOAD_BYTES_MAX == kalandra_proto::limits::PUSH_PAYLOAD_BYTES_MAX);
/// Largest APNs notification payload (and FCM data message).
pub const APNS_PAYLOAD_BYTES_MAX: usize = 4096;
/// Part of an APNs payload kept for the JSON around the base64 push
/// (`aps`, `mutable-content`, a fallback alert, the key name).
pub const APNS_ENVELOPE_BYTES_RESERVED: usize = 1024;

/// Magic of the key cache.
pub const CACHE_MAGIC: [u8; 4] = *b"KLPC";
/// Version byte of the key cache.
pub const CACHE_VERSION: u8 = 1;
/// Length of the key cache header: magic, version, count.
pub const CACHE_HEADER_BYTES: usize = CACHE_MAGIC.len() + 1 + 2;
/// Length of a key cache entry: room id, epoch, push key.
pub const CACHE_ENTRY_BYTES: usize = ROOM_ID_BYTES + EPOCH_BYTES + PUSH_KEY_BYTES;
/// Most entries of one room in a cache: its current and previous epoch.
pub const EPOCHS_PER_ROOM_MAX: usize = 2;
/// Most rooms with [`EPOCHS_PER_ROOM_MAX`] entries each in a cache.
pub const CACHE_ROOMS_MAX: usize = 400;
/// Most entries in a cache.
pub const CACHE_ENTRIES_MAX: usize = CACHE_ROOMS_MAX * EPOCHS_PER_ROOM_MAX;
/// Longest cache.
pub const CACHE_BYTES_MAX: usize = cache_bytes(CACHE_ENTRIES_MAX);
/// The size goal of a key cache (50 KB).
pub const CACHE_BUDGET_BYTES: usize = 50_000;

/// Length of a cache of `entries` entries.
pub const fn cache_bytes(entries: usize) -> usize {
    CACHE_HEADER_BYTES + entries * CACHE_ENTRY_BYTES
}

/// Length of the padded standard base64 encoding of `bytes` bytes.
const fn base64_bytes(bytes: usize) -> usize {
    bytes.div_ceil(3) * 4
}

/// SHA-256 output length.
const HASH_BYTES: usize = 32;
/// Length of the part of a cache entry that is sorted on: room id, epoch.
const ENTRY_ID_BYTES: usize = ROOM_ID_BYTES + EPOCH_BYTES;

const _: () = assert!(PCEK_BYTES == HASH_BYTES, "the PCEK is used directly as an HKDF PRK");
const _: () = assert!(PUSH_KEY_BYTES <= HASH_BYTES, "one HMAC block, as documented");
const _: () = assert!(PUSH_ASSOCIATED_DATA_BYTES == 25);
const _: () = assert!(PUSH_HEADER_BYTES == 49);
const _: () = assert!(PUSH_PAYLOAD_BYTES_MIN == 65);
const _: () = assert!(PUSH_PAYLOAD_BYTES_MAX == 2113);
const _: () = assert!(base64_bytes(PUSH_PAYLOAD_BYTES_MAX) == 2820);
const _: () = assert!(
    base64_bytes(PUSH_PAYLOAD_BYTES_MAX) + APNS_ENVELOPE_BYTES_RESERVED <= APNS_PAYLOAD_BYTES_MAX,
    "a push fits an APNs payload after base64"
);
const _: () = assert!(CACHE_HEADER_BYTES == 7);
const _: () = assert!(CACHE_ENTRY_BYTES == 56);
const _: () = assert!(CACHE_ENTRIES_MAX <= u16::MAX as usize, "the count is a u16");
const _: () = assert!(CACHE_BYTES_MAX == 44_807);
const _: () = assert!(CACHE_BYTES_MAX <= CACHE_BUDGET_BYTES);
const _: () = assert!(cache_bytes(100 * EPOCHS_PER_ROOM_MAX) == 11_207);
const _: () = assert!(cache_bytes(100 * EPOCHS_PER_ROOM_MAX) <= CACHE_BUDGET_BYTES, "100 rooms fit 50 KB");

/// Overwrites `bytes` with zeros in a way the optimiser keeps.
fn wipe(bytes: &mut [u8]) {
    bytes.fill(0);
    std::hint::black_box(bytes);
}

/// Secret bytes, overwritten on drop.
struct Secret<const N: usize>([u8; N]);

impl<const N: usize> Clone for Secret<N> {
    fn clone(&self) -> Self {
        Secret(self.0)
    }
}

impl<const N: usize> Drop for Secret<N> {
    fn drop(&mut self) {
        wipe(&mut self.0);
    }
}

/// The push key of one room in one epoch.
#[derive(Clone)]
pub struct NotificationKey {
    room_id: RoomId,
    epoch: u64,
    key: Secret<PUSH_KEY_BYTES>,
}

impl std::fmt::Debug for NotificationKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NotificationKey")
            .field("room_id", &self.room_id)
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

impl NotificationKey {
    /// The push key of `room_id` at `epoch` from the epoch's PCEK:
    /// `HKDF-Expand(pcek, "kalandraPushV1", 32)`. Pure: no MLS.
    pub fn from_pcek(room_id: RoomId, epoch: u64, pcek: &[u8; PCEK_BYTES]) -> Self {
        let hkdf = Hkdf::<Sha256>::from_prk(pcek).expect("the PCEK is one hash output long");
        let mut key = Secret([0u8; PUSH_KEY_BYTES]);
        hkdf.expand(PUSH_KEY_LABEL, &mut key.0).expect("32 bytes is within HKDF-SHA256's output limit");
        NotificationKey { room_id, epoch, key }
    }

    /// The room.
    pub fn room_id(&self) -> RoomId {
        self.room_id
    }

    /// The epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The first 24 bytes of the key's cache entry: room id, epoch.
    fn entry_id(&self) -> [u8; ENTRY_ID_BYTES] {
        entry_id(self.room_id, self.epoch)
    }
}

/// `room_id || epoch`: the associated data after the version byte, and the
/// sort key of a cache entry.
fn entry_id(room_id: RoomId, epoch: u64) -> [u8; ENTRY_ID_BYTES] {
    let mut id = [0u8; ENTRY_ID_BYTES];
    id[..ROOM_ID_BYTES].copy_from_slice(&room_id.0);
    id[ROOM_ID_BYTES..].copy_from_slice(&epoch.to_be_bytes());
    id
}

/// Which format an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushFormat {
    /// The key cache.
    KeyCache,
    /// The push payload.
    Payload,
}

impl std::fmt::Display for PushFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PushFormat::KeyCache => "key cache",
            PushFormat::Payload => "push payload",
        })
    }
}

/// What is wrong with a key cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CacheDefect {
    /// Shorter than its header, or than its header and `count` entries.
    #[error("truncated")]
    Truncated,
    /// The magic is not [`CACHE_MAGIC`].
    #[error("bad magic")]
    BadMagic,
    /// Longer than its header and `count` entries.
    #[error("trailing bytes after the entries")]
    TrailingBytes,
    /// The entry does not come strictly after the previous one.
    #[error("entry {index} is out of order or repeated")]
    Unordered {
        /// The entry's position.
        index: usize,
    },
    /// The entry is the room's third (more than [`EPOCHS_PER_ROOM_MAX`]).
    #[error("entry {index} exceeds the epochs kept per room")]
    TooManyEpochs {
        /// The entry's position.
        index: usize,
    },
}

/// Why a push could not be decrypted, or a key cache not read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    /// The key cache is not well formed.
    #[error("malformed key cache: {0}")]
    MalformedCache(CacheDefect),
    /// The payload is shorter than [`PUSH_PAYLOAD_BYTES_MIN`].
    #[error("malformed push payload of {len_bytes} bytes")]
    MalformedPayload {
        /// The payload's length.
        len_bytes: usize,
    },
    /// The version byte is not one this code reads.
    #[error("unsupported {format} version {version}")]
    UnsupportedVersion {
        /// The cache or the payload.
        format: PushFormat,
        /// The version byte.
        version: u8,
    },
    /// Longer than the format allows.
    #[error("{format} of {len_bytes} bytes exceeds {max_bytes}")]
    TooLarge {
        /// The cache or the payload.
        format: PushFormat,
        /// Its length.
        len_bytes: usize,
        /// The largest allowed.
        max_bytes: usize,
    },
    /// The cache has no key for the payload's room and epoch.
    #[error("no notification key for room {room_id} epoch {epoch}")]
    UnknownRoomOrEpoch {
        /// The payload's room.
        room_id: RoomId,
        /// The payload's epoch.
        epoch: u64,
    },
    /// The payload does not authenticate under the key of its room and epoch.
    #[error("push for room {room_id} epoch {epoch} failed authentication")]
    Authentication {
        /// The payload's room.
        room_id: RoomId,
        /// The payload's epoch.
        epoch: u64,
    },
}

/// Why a push could not be sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SealPushError {
    /// The plaintext is longer than [`PUSH_PLAINTEXT_BYTES_MAX`].
    #[error("push plaintext of {len_bytes} bytes exceeds {PUSH_PLAINTEXT_BYTES_MAX}")]
    PlaintextTooLarge {
        /// The plaintext's length.
        len_bytes: usize,
    },
}

/// Why a key cache could not be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CacheWriteError {
    /// More than [`CACHE_ENTRIES_MAX`] keys.
    #[error("{count} notification keys exceed {CACHE_ENTRIES_MAX}")]
    TooManyEntries {
        /// The number of keys.
        count: usize,
    },
    /// Two keys for the same room and epoch.
    #[error("two notification keys for room {room_id} epoch {epoch}")]
    Duplicate {
        /// The room.
        room_id: RoomId,
        /// The epoch.
        epoch: u64,
    },
    /// More than [`EPOCHS_PER_ROOM_MAX`] keys for one room.
    #[error("more than {EPOCHS_PER_ROOM_MAX} notification keys for room {room_id}")]
    TooManyEpochs {
        /// The room.
        room_id: RoomId,
    },
}
