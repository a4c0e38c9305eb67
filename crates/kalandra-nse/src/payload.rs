//! Sealing a push, and decrypting one with a key cache. Nothing here uses
//! MLS: the NSE path is [`decrypt_push`] alone.

use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{Key, KeyInit, Tag, XChaCha20Poly1305, XNonce};
use kalandra_proto::RoomId;

use crate::{
    entry_id, KeyCacheView, NotificationKey, PushError, PushFormat, SealPushError, EPOCH_BYTES,
    PUSH_ASSOCIATED_DATA_BYTES, PUSH_HEADER_BYTES, PUSH_KEY_BYTES, PUSH_NONCE_BYTES, PUSH_PAYLOAD_BYTES_MAX,
    PUSH_PAYLOAD_BYTES_MIN, PUSH_PLAINTEXT_BYTES_MAX, PUSH_TAG_BYTES, PUSH_VERSION, ROOM_ID_BYTES,
};

/// A decrypted push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushMessage {
    /// The room it was sealed for.
    pub room_id: RoomId,
    /// The epoch whose key sealed it.
    pub epoch: u64,
    /// The sender's notification content.
    pub plaintext: Vec<u8>,
}

/// The push payload of `plaintext` under `key` (see the
/// [module documentation](crate#push-payload)). `nonce` must be 24 fresh
/// uniformly random bytes: every member of the epoch seals with this key.
pub fn seal_push(
    key: &NotificationKey,
    plaintext: &[u8],
    nonce: &[u8; PUSH_NONCE_BYTES],
) -> Result<Vec<u8>, SealPushError> {
    if plaintext.len() > PUSH_PLAINTEXT_BYTES_MAX {
        return Err(SealPushError::PlaintextTooLarge { len_bytes: plaintext.len() });
    }
    let mut payload = Vec::with_capacity(PUSH_PAYLOAD_BYTES_MIN + plaintext.len());
    payload.push(PUSH_VERSION);
    payload.extend_from_slice(&key.entry_id());
    payload.extend_from_slice(nonce);
    payload.extend_from_slice(plaintext);
    let (header, body) = payload.split_at_mut(PUSH_HEADER_BYTES);
    let cipher = XChaCha20Poly1305::new(Key::from_slice(&key.key.0));
    let tag = cipher
        .encrypt_in_place_detached(XNonce::from_slice(nonce), &header[..PUSH_ASSOCIATED_DATA_BYTES], body)
        .expect("XChaCha20-Poly1305 encrypts far more than PUSH_PLAINTEXT_BYTES_MAX");
    payload.extend_from_slice(&tag);
    debug_assert!(payload.len() <= PUSH_PAYLOAD_BYTES_MAX);
    Ok(payload)
}

/// The fields of a payload, borrowed from it.
struct PayloadView<'a> {
    /// `version || room_id || epoch`.
    associated_data: &'a [u8],
    room_id: RoomId,
    epoch: u64,
    nonce: &'a [u8],
    ciphertext: &'a [u8],
    tag: &'a [u8],
}

/// Steps 1 and 2 of the [decryption](crate#decrypting-a-push).
fn parse_payload(payload: &[u8]) -> Result<PayloadView<'_>, PushError> {
    if payload.len() > PUSH_PAYLOAD_BYTES_MAX {
        return Err(PushError::TooLarge {
            format: PushFormat::Payload,
            len_bytes: payload.len(),
            max_bytes: PUSH_PAYLOAD_BYTES_MAX,
        });
    }
    let Some(&version) = payload.first() else {
        return Err(PushError::MalformedPayload { len_bytes: 0 });
    };
    if version != PUSH_VERSION {
        return Err(PushError::UnsupportedVersion { format: PushFormat::Payload, version });
    }
    if payload.len() < PUSH_PAYLOAD_BYTES_MIN {
        return Err(PushError::MalformedPayload { len_bytes: payload.len() });
    }
    let (header, rest) = payload.split_at(PUSH_HEADER_BYTES);
    let (associated_data, nonce) = header.split_at(PUSH_ASSOCIATED_DATA_BYTES);
    let (ciphertext, tag) = rest.split_at(rest.len() - PUSH_TAG_BYTES);
    let room_id = RoomId(associated_data[1..][..ROOM_ID_BYTES].try_into().expect("16 bytes"));
    let epoch =
        u64::from_be_bytes(associated_data[1 + ROOM_ID_BYTES..][..EPOCH_BYTES].try_into().expect("8 bytes"));
    Ok(PayloadView { associated_data, room_id, epoch, nonce, ciphertext, tag })
}

/// Decrypts a push `payload` with the key `cache` alone: the entry point of
/// a Notification Service Extension. Checks the payload, then the whole
/// cache, then finds the key of the payload's room and epoch and decrypts
/// (see the [module documentation](crate#decrypting-a-push) for the order of
/// the checks). Allocates only the plaintext; touches no MLS state.
pub fn decrypt_push(cache: &[u8], payload: &[u8]) -> Result<PushMessage, PushError> {
    let push = parse_payload(payload)?;
    let cache = KeyCacheView::parse(cache)?;
    let (room_id, epoch) = (push.room_id, push.epoch);
    let Some(key) = cache.key_for(&entry_id(room_id, epoch)) else {
        return Err(PushError::UnknownRoomOrEpoch { room_id, epoch });
    };
    let plaintext = open(key, &push).ok_or(PushError::Authentication { room_id, epoch })?;
    Ok(PushMessage { room_id, epoch, plaintext })
}

fn open(key: &[u8; PUSH_KEY_BYTES], push: &PayloadView<'_>) -> Option<Vec<u8>> {
    let cipher = XChaCha20Poly1305::new(Key::from_slice(key));
    let mut plaintext = push.ciphertext.to_vec();
    cipher
        .decrypt_in_place_detached(
            XNonce::from_slice(push.nonce),
            push.associated_data,
            &mut plaintext,
            Tag::from_slice(push.tag),
        )
        .ok()?;
    Some(plaintext)
}
