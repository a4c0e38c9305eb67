//! The device's push-key cache: the notification keys of the current and the
//! previous epoch of every room, kept in memory and written to the key cache
//! file (format and atomic write: [`kalandra_nse`]) whenever a room's epoch
//! changes, so that a Notification Service Extension reading the file opens
//! pushes of both epochs.
//!
//! The file is also where the previous epochs' keys survive a restart (they
//! cannot be derived again once the group moved on): [`PushKeys::load`]
//! reads it when the device opens. A missing or damaged file only costs those
//! previous keys; it is rewritten at the next check.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use kalandra_proto::RoomId;
use rand::RngCore;

use super::{Client, ClientError};
use crate::push::{
    read_key_cache_file, seal_push, write_key_cache_file, CacheWriteError, KeyCache, NotificationKey,
    NotificationKeyFromGroup as _, NotificationKeys, PUSH_NONCE_BYTES,
};
use crate::room_log::RoomLog as RoomEntry;
use crate::store::StoreError;

/// File name of the key cache inside a client's data directory (the default
/// path; [`Client::set_key_cache_path`] moves it, e.g. to an iOS app group
/// container).
pub const KEY_CACHE_FILE_NAME: &str = "push-keys.klpc";

/// The keys and where they are written.
pub(super) struct PushKeys {
    keys: NotificationKeys,
    path: PathBuf,
    /// The file differs from `keys` (a write failed, or the path moved).
    stale: bool,
}

impl PushKeys {
    /// The keys of the cache file at `path`, or none if it is missing or
    /// does not parse.
    pub(super) fn load(path: PathBuf) -> PushKeys {
        let keys =
            read_key_cache_file(&path).ok().and_then(|bytes| NotificationKeys::from_cache(&bytes).ok());
        let stale = keys.is_none();
        PushKeys { keys: keys.unwrap_or_default(), path, stale }
    }

    /// Brings the keys to every room's current epoch and drops the rooms we
    /// are no longer in; writes the file if anything changed. Rooms beyond
    /// the cache's capacity ([`crate::push::CACHE_ROOMS_MAX`]) get no key:
    /// their pushes are not decryptable (the NSE shows a generic notice).
    fn refresh<'a>(
        &mut self,
        provider: &crate::mls::MlsProvider,
        rooms: impl Iterator<Item = (&'a RoomId, &'a RoomEntry)>,
    ) -> Result<(), StoreError> {
        let mut changed = self.stale;
        let mut kept = std::collections::BTreeSet::new();
        for (room_id, entry) in rooms {
            let Some(group) = entry.group.as_ref().filter(|_| !entry.record.removed) else { continue };
            kept.insert(*room_id);
            let epoch = group.epoch();
            // Only the current and the previous epoch: an older key (from a
            // file written long ago) would open pushes MLS has moved past.
            let older: Vec<u64> =
                self.keys.epochs(*room_id).filter(|e| e.saturating_add(1) < epoch).collect();
            for old in older {
                changed |= self.keys.remove(*room_id, old);
            }
            if self.keys.get(*room_id, epoch).is_some() {
                continue;
            }
            let key = NotificationKey::from_group(provider, group)
                .map_err(|e| StoreError::Io { operation: "deriving a push key", detail: e.to_string() })?;
            match self.keys.insert(key) {
                Ok(()) => changed = true,
                Err(CacheWriteError::TooManyEntries { .. }) => {}
                Err(error) => {
                    return Err(StoreError::Io { operation: "push key", detail: error.to_string() })
                }
            }
        }
        let gone: Vec<RoomId> = self.keys.rooms().filter(|room_id| !kept.contains(room_id)).collect();
        for room_id in gone {
            changed |= self.keys.remove_room(room_id) > 0;
        }
        if changed {
            self.write()?;
        }
        Ok(())
    }

    fn write(&mut self) -> Result<(), StoreError> {
        self.stale = true;
        write_key_cache_file(&self.path, &self.keys.export())
            .map_err(|e| StoreError::Io { operation: "writing the key cache", detail: e.to_string() })?;
        self.stale = false;
        Ok(())
    }
}

/// A push payload of `plaintext` for the room's current epoch, under a fresh
/// random nonce.
pub(super) fn seal_notification(
    provider: &crate::mls::MlsProvider,
    entry: &RoomEntry,
    plaintext: &[u8],
) -> Result<Bytes, ClientError> {
    let group = entry.group.as_ref().ok_or(ClientError::NotMember(RoomId(entry.record.room_id)))?;
    let key = NotificationKey::from_group(provider, group)?;
    let mut nonce = [0u8; PUSH_NONCE_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    Ok(Bytes::from(seal_push(&key, plaintext, &nonce)?))
}

impl Client {
    /// Where the key cache file is written (by default
    /// `<directory>/push-keys.klpc`).
    pub fn key_cache_path(&self) -> &Path {
        &self.push_keys.path
    }

    /// Writes the key cache to `path` from now on (for example into the app
    /// group container an iOS Notification Service Extension can read), and
    /// writes it there at once. The path is not stored: set it after every
    /// [`Client::open`].
    /// Keys already in a cache file at `path` (written there by an earlier
    /// run) are kept where they are still the current or previous epoch of a
    /// room; the file at the old path is removed.
    pub fn set_key_cache_path(&mut self, path: &Path) -> Result<(), ClientError> {
        if path == self.push_keys.path {
            return Ok(());
        }
        if let Some(earlier) =
            read_key_cache_file(path).ok().and_then(|b| NotificationKeys::from_cache(&b).ok())
        {
            for room_id in earlier.rooms().collect::<Vec<_>>() {
                for epoch in earlier.epochs(room_id).collect::<Vec<_>>() {
                    if let Some(key) = earlier.get(room_id, epoch) {
                        // Full cache: the key is dropped, as at any refresh.
                        let _ = self.push_keys.keys.insert(key);
                    }
                }
            }
        }
        let old = std::mem::replace(&mut self.push_keys.path, path.to_owned());
        self.push_keys.stale = true;
        self.refresh_key_cache()?;
        match std::fs::remove_file(&old) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(StoreError::Io {
                operation: "removing the old key cache",
                detail: format!("{}: {error}", old.display()),
            }
            .into()),
            _ => Ok(()),
        }
    }

    /// The key cache as it is written to the file: the push keys of the
    /// current and previous epoch of every room.
    pub fn export_key_cache(&self) -> KeyCache {
        self.push_keys.keys.export()
    }

    /// Updates the key cache after a change (called by every checkpoint;
    /// does nothing unless a room changed its epoch, was joined or left).
    pub(super) fn refresh_key_cache(&mut self) -> Result<(), StoreError> {
        self.push_keys.refresh(&self.provider, self.rooms.iter())
    }
}
