//! The key cache: writing it from notification keys, and reading it in place.

use std::collections::BTreeMap;

use kalandra_proto::RoomId;

use crate::{
    entry_id, wipe, CacheDefect, CacheWriteError, NotificationKey, PushError, PushFormat, Secret,
    CACHE_BYTES_MAX, CACHE_ENTRIES_MAX, CACHE_ENTRY_BYTES, CACHE_HEADER_BYTES, CACHE_MAGIC, CACHE_VERSION,
    ENTRY_ID_BYTES, EPOCHS_PER_ROOM_MAX, EPOCH_BYTES, PUSH_KEY_BYTES, ROOM_ID_BYTES,
};

/// An encoded key cache (see the [module documentation](crate#key-cache)),
/// overwritten when dropped.
pub struct KeyCache {
    bytes: Vec<u8>,
}

impl KeyCache {
    /// The encoding, to be written where the NSE reads it.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The number of keys.
    pub fn entry_count(&self) -> usize {
        (self.bytes.len() - CACHE_HEADER_BYTES) / CACHE_ENTRY_BYTES
    }
}

impl AsRef<[u8]> for KeyCache {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Drop for KeyCache {
    fn drop(&mut self) {
        wipe(&mut self.bytes);
    }
}

impl std::fmt::Debug for KeyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyCache")
            .field("len_bytes", &self.bytes.len())
            .field("entries", &self.entry_count())
            .finish_non_exhaustive()
    }
}

/// Encodes `count` entries given in cache order. The caller has checked the
/// order, the epochs per room and `count <= CACHE_ENTRIES_MAX`.
fn write_cache<'a>(
    count: usize,
    entries: impl Iterator<Item = ([u8; ENTRY_ID_BYTES], &'a [u8; PUSH_KEY_BYTES])>,
) -> KeyCache {
    assert!(count <= CACHE_ENTRIES_MAX, "the callers bound the entries");
    let count_field = u16::try_from(count).expect("CACHE_ENTRIES_MAX fits a u16");
    // Exactly sized, so that no reallocation leaves a copy of the keys behind.
    let mut bytes = Vec::with_capacity(crate::cache_bytes(count));
    bytes.extend_from_slice(&CACHE_MAGIC);
    bytes.push(CACHE_VERSION);
    bytes.extend_from_slice(&count_field.to_be_bytes());
    for (id, key) in entries.take(count) {
        bytes.extend_from_slice(&id);
        bytes.extend_from_slice(key);
    }
    assert_eq!(bytes.len(), crate::cache_bytes(count), "the iterator yields `count` entries");
    KeyCache { bytes }
}

/// The key cache of `keys`, in any order. Refuses more than
/// [`CACHE_ENTRIES_MAX`] keys, two keys for one room and epoch, and more than
/// [`EPOCHS_PER_ROOM_MAX`] keys for one room ([`NotificationKeys`] keeps
/// within these bounds by itself).
pub fn export_notification_keys(keys: &[NotificationKey]) -> Result<KeyCache, CacheWriteError> {
    if keys.len() > CACHE_ENTRIES_MAX {
        return Err(CacheWriteError::TooManyEntries { count: keys.len() });
    }
    let mut sorted: Vec<&NotificationKey> = keys.iter().collect();
    sorted.sort_unstable_by_key(|key| key.entry_id());
    for (index, key) in sorted.iter().enumerate() {
        if index >= 1 && sorted[index - 1].entry_id() == key.entry_id() {
            return Err(CacheWriteError::Duplicate { room_id: key.room_id, epoch: key.epoch });
        }
        if index >= EPOCHS_PER_ROOM_MAX && sorted[index - EPOCHS_PER_ROOM_MAX].room_id == key.room_id {
            return Err(CacheWriteError::TooManyEpochs { room_id: key.room_id });
        }
    }
    Ok(write_cache(sorted.len(), sorted.iter().map(|key| (key.entry_id(), &key.key.0))))
}

/// The notification keys an app keeps: the [`EPOCHS_PER_ROOM_MAX`] newest
/// epochs of each room, at most [`CACHE_ENTRIES_MAX`] keys in all.
///
/// Insert the key of every epoch the app enters (client-core's `NotificationKeyFromGroup::from_group`
/// after creating or joining a room and after every commit), remove a room
/// the app leaves, and rewrite the cache with [`NotificationKeys::export`]
/// after each change.
#[derive(Default)]
pub struct NotificationKeys {
    keys: BTreeMap<(RoomId, u64), Secret<PUSH_KEY_BYTES>>,
}

impl std::fmt::Debug for NotificationKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NotificationKeys").field("keys", &self.keys.len()).finish_non_exhaustive()
    }
}

impl NotificationKeys {
    /// No keys.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `key`, replacing a key of the same room and epoch, then drops the
    /// room's oldest epochs beyond [`EPOCHS_PER_ROOM_MAX`] (which may be
    /// `key` itself if it is older than those kept). Refuses a key that would
    /// make more than [`CACHE_ENTRIES_MAX`] keys; nothing changes then.
    pub fn insert(&mut self, key: NotificationKey) -> Result<(), CacheWriteError> {
        let NotificationKey { room_id, epoch, key } = key;
        let replaces = self.keys.contains_key(&(room_id, epoch));
        let grows = !replaces && self.epoch_count(room_id) < EPOCHS_PER_ROOM_MAX;
        if grows && self.keys.len() >= CACHE_ENTRIES_MAX {
            return Err(CacheWriteError::TooManyEntries { count: self.keys.len() + 1 });
        }
        self.keys.insert((room_id, epoch), key);
        if self.epoch_count(room_id) > EPOCHS_PER_ROOM_MAX {
            // At most one over: the room had at most EPOCHS_PER_ROOM_MAX before.
            let oldest = self.epochs(room_id).next().expect("the room has keys");
            self.keys.remove(&(room_id, oldest));
        }
        Ok(())
    }

    /// Removes the key of `room_id` at `epoch`; returns whether it was kept.
    pub fn remove(&mut self, room_id: RoomId, epoch: u64) -> bool {
        self.keys.remove(&(room_id, epoch)).is_some()
    }

    /// Removes the keys of `room_id`; returns how many there were.
    pub fn remove_room(&mut self, room_id: RoomId) -> usize {
        let epochs: Vec<u64> = self.epochs(room_id).collect();
        for epoch in &epochs {
            self.keys.remove(&(room_id, *epoch));
        }
        epochs.len()
    }

    /// The key of `room_id` at `epoch`, if kept.
    pub fn get(&self, room_id: RoomId, epoch: u64) -> Option<NotificationKey> {
        self.keys.get(&(room_id, epoch)).map(|key| NotificationKey { room_id, epoch, key: key.clone() })
    }

    /// The epochs kept for `room_id`, oldest first.
    pub fn epochs(&self, room_id: RoomId) -> impl Iterator<Item = u64> + '_ {
        self.keys.range((room_id, 0)..=(room_id, u64::MAX)).map(|((_, epoch), _)| *epoch)
    }

    /// The rooms that have keys, in order.
    pub fn rooms(&self) -> impl Iterator<Item = RoomId> + '_ {
        let mut previous = None;
        self.keys.keys().filter_map(move |(room_id, _)| {
            let first = previous != Some(*room_id);
            previous = Some(*room_id);
            first.then_some(*room_id)
        })
    }

    /// The number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether there are no keys.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The keys of a key cache written before (for example by an earlier run
    /// of the app), after checking it whole ([`KeyCacheView::parse`]).
    pub fn from_cache(cache: &[u8]) -> Result<NotificationKeys, PushError> {
        let view = KeyCacheView::parse(cache)?;
        let mut keys = BTreeMap::new();
        for entry in view.entries.chunks_exact(CACHE_ENTRY_BYTES) {
            let (id, key) = entry.split_at(ENTRY_ID_BYTES);
            let room_id = RoomId(id[..ROOM_ID_BYTES].try_into().expect("16 bytes"));
            let epoch = u64::from_be_bytes(id[ROOM_ID_BYTES..].try_into().expect("8 bytes"));
            keys.insert((room_id, epoch), Secret(key.try_into().expect("32 bytes")));
        }
        // The parse bounds the entries and the epochs per room.
        Ok(NotificationKeys { keys })
    }

    /// The key cache of all kept keys.
    pub fn export(&self) -> KeyCache {
        // BTreeMap order on (RoomId, u64) is the cache order: room id bytes,
        // then the epoch, whose big-endian bytes sort like the number.
        write_cache(
            self.keys.len(),
            self.keys.iter().map(|((room_id, epoch), key)| (entry_id(*room_id, *epoch), &key.0)),
        )
    }

    fn epoch_count(&self, room_id: RoomId) -> usize {
        self.epochs(room_id).count()
    }
}

/// A checked key cache, read in place (no copy, no allocation).
#[derive(Clone, Copy)]
pub struct KeyCacheView<'a> {
    /// The entries: a multiple of [`CACHE_ENTRY_BYTES`], checked.
    entries: &'a [u8],
}

impl std::fmt::Debug for KeyCacheView<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyCacheView").field("entries", &self.len()).finish_non_exhaustive()
    }
}

impl<'a> KeyCacheView<'a> {
    /// Checks the whole of `cache` (steps 3 and 4 of the
    /// [decryption](crate#decrypting-a-push)).
    pub fn parse(cache: &'a [u8]) -> Result<Self, PushError> {
        if cache.len() > CACHE_BYTES_MAX {
            return Err(PushError::TooLarge {
                format: PushFormat::KeyCache,
                len_bytes: cache.len(),
                max_bytes: CACHE_BYTES_MAX,
            });
        }
        let Some((header, entries)) = cache.split_first_chunk::<CACHE_HEADER_BYTES>() else {
            return Err(PushError::MalformedCache(CacheDefect::Truncated));
        };
        if header[..CACHE_MAGIC.len()] != CACHE_MAGIC {
            return Err(PushError::MalformedCache(CacheDefect::BadMagic));
        }
        let version = header[CACHE_MAGIC.len()];
        if version != CACHE_VERSION {
            return Err(PushError::UnsupportedVersion { format: PushFormat::KeyCache, version });
        }
        let count = usize::from(u16::from_be_bytes([header[5], header[6]]));
        // A count above CACHE_ENTRIES_MAX cannot match the length, which is
        // at most CACHE_BYTES_MAX.
        match entries.len().cmp(&(count * CACHE_ENTRY_BYTES)) {
            std::cmp::Ordering::Less => return Err(PushError::MalformedCache(CacheDefect::Truncated)),
            std::cmp::Ordering::Greater => return Err(PushError::MalformedCache(CacheDefect::TrailingBytes)),
            std::cmp::Ordering::Equal => {}
        }
        let mut previous: Option<&[u8]> = None;
        for (index, entry) in entries.chunks_exact(CACHE_ENTRY_BYTES).enumerate() {
            let id = &entry[..ENTRY_ID_BYTES];
            if previous.is_some_and(|previous| id <= previous) {
                return Err(PushError::MalformedCache(CacheDefect::Unordered { index }));
            }
            if index >= EPOCHS_PER_ROOM_MAX {
                // Sorted, so equal to the room two entries back means three
                // entries of one room.
                let back = &entries[(index - EPOCHS_PER_ROOM_MAX) * CACHE_ENTRY_BYTES..][..ROOM_ID_BYTES];
                if back == &entry[..ROOM_ID_BYTES] {
                    return Err(PushError::MalformedCache(CacheDefect::TooManyEpochs { index }));
                }
            }
            previous = Some(id);
        }
        Ok(KeyCacheView { entries })
    }

    /// The number of keys.
    pub fn len(&self) -> usize {
        self.entries.len() / CACHE_ENTRY_BYTES
    }

    /// Whether there are no keys.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The (room, epoch) of every key, in cache order.
    pub fn entries(&self) -> impl Iterator<Item = (RoomId, u64)> + 'a {
        self.entries.chunks_exact(CACHE_ENTRY_BYTES).map(|entry| {
            let (room_id, rest) = entry.split_at(ROOM_ID_BYTES);
            let room_id = RoomId(room_id.try_into().expect("16 bytes"));
            let epoch = u64::from_be_bytes(rest[..EPOCH_BYTES].try_into().expect("8 bytes"));
            (room_id, epoch)
        })
    }

    /// Whether the cache has a key for `room_id` at `epoch`.
    pub fn contains(&self, room_id: RoomId, epoch: u64) -> bool {
        self.key_for(&entry_id(room_id, epoch)).is_some()
    }

    /// The push key of the entry whose first 24 bytes are `id`.
    pub(crate) fn key_for(&self, id: &[u8; ENTRY_ID_BYTES]) -> Option<&'a [u8; PUSH_KEY_BYTES]> {
        self.entries
            .chunks_exact(CACHE_ENTRY_BYTES)
            .find(|entry| entry[..ENTRY_ID_BYTES] == id[..])
            .map(|entry| entry[ENTRY_ID_BYTES..].try_into().expect("32 bytes"))
    }
}
