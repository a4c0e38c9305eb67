//! The Notification Service Extension's calls: decrypt a push from the key
//! cache (bytes, or the file the app writes). Synchronous, no runtime, no
//! MLS: these reach only kalandra-nse.

use crate::error::NseError;

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

impl From<client_core::push::PushMessage> for PushMessage {
    fn from(message: client_core::push::PushMessage) -> Self {
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
