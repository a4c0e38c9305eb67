//! Bindings for Kotlin, Swift and Python (uniffi, proc-macro style: no UDL)
//! of kalandra-nse's push decryption, in a library of their own: what an
//! iOS Notification Service Extension (about 20 MB of memory) loads, without
//! the app's OpenMLS, async runtime and network code. Synchronous; every
//! call reads only the key cache the app's device writes.
//!
//! Built as a cdylib (`libkalandra_nse_ffi.so`, `.dylib`, `.dll`);
//! `scripts/generate-bindings.sh` generates the foreign code (module
//! `kalandra_nse`) with kalandra-ffi's `uniffi-bindgen` (docs/MOBILE.md).

uniffi::setup_scaffolding!("kalandra_nse");

use kalandra_nse::{KeyCacheFileError, PushError, PushFormat};

/// A decrypted push.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct PushMessage {
    /// The room (16 bytes).
    pub room_id: Vec<u8>,
    /// The epoch whose key sealed it.
    pub epoch: u64,
    /// The sender's notification content.
    pub plaintext: Vec<u8>,
}

impl From<kalandra_nse::PushMessage> for PushMessage {
    fn from(message: kalandra_nse::PushMessage) -> Self {
        PushMessage {
            room_id: message.room_id.0.to_vec(),
            epoch: message.epoch,
            plaintext: message.plaintext,
        }
    }
}

/// Decrypts a push `payload` (as the server forwarded it) with the key
/// `cache` bytes.
#[uniffi::export]
pub fn decrypt_push(cache: Vec<u8>, payload: Vec<u8>) -> Result<PushMessage, NseError> {
    Ok(kalandra_nse::decrypt_push(&cache, &payload)?.into())
}

/// Decrypts a push `payload` with the key cache file at `path` (the file the
/// app's device writes; see `Device::key_cache_path`).
#[uniffi::export]
pub fn decrypt_push_file(path: String, payload: Vec<u8>) -> Result<PushMessage, NseError> {
    Ok(kalandra_nse::decrypt_push_file(std::path::Path::new(&path), &payload)?.into())
}

/// Why a push could not be decrypted (raised as `NseException` in Kotlin,
/// `NseError` in Swift and Python). The NSE shows a generic notification
/// for any of them.
#[derive(Debug, thiserror::Error, uniffi::Error)]
pub enum NseError {
    /// The key cache is not well formed (or not a key cache).
    #[error("malformed key cache: {detail}")]
    MalformedCache {
        /// What is wrong.
        detail: String,
    },
    /// The payload is not a push payload.
    #[error("malformed push payload: {detail}")]
    MalformedPayload {
        /// What is wrong.
        detail: String,
    },
    /// The cache has no key for the push's room and epoch (the app has not
    /// seen that epoch yet, or the push is older than the previous epoch).
    #[error("no key for room {room_id_hex} epoch {epoch}")]
    UnknownRoomOrEpoch {
        /// The push's room, hex.
        room_id_hex: String,
        /// The push's epoch.
        epoch: u64,
    },
    /// The push does not authenticate under its room's key.
    #[error("push for room {room_id_hex} epoch {epoch} failed authentication")]
    Authentication {
        /// The push's room, hex.
        room_id_hex: String,
        /// The push's epoch.
        epoch: u64,
    },
    /// The key cache file could not be read.
    #[error("key cache file: {detail}")]
    Io {
        /// What failed.
        detail: String,
    },
}

impl From<PushError> for NseError {
    fn from(error: PushError) -> Self {
        let detail = error.to_string();
        match error {
            PushError::MalformedCache(_) => NseError::MalformedCache { detail },
            PushError::UnknownRoomOrEpoch { room_id, epoch } => {
                NseError::UnknownRoomOrEpoch { room_id_hex: room_id.to_string(), epoch }
            }
            PushError::Authentication { room_id, epoch } => {
                NseError::Authentication { room_id_hex: room_id.to_string(), epoch }
            }
            PushError::UnsupportedVersion { format, .. } | PushError::TooLarge { format, .. } => match format
            {
                PushFormat::KeyCache => NseError::MalformedCache { detail },
                PushFormat::Payload => NseError::MalformedPayload { detail },
            },
            PushError::MalformedPayload { .. } => NseError::MalformedPayload { detail },
        }
    }
}

impl From<KeyCacheFileError> for NseError {
    fn from(error: KeyCacheFileError) -> Self {
        match error {
            KeyCacheFileError::Push(error) => error.into(),
            io @ KeyCacheFileError::Io { .. } => NseError::Io { detail: io.to_string() },
        }
    }
}
