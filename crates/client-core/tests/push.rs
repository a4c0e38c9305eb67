//! Push-notification keys: the documented formats (checked against an
//! independent reading of the module documentation), round trips, the
//! binding of room and epoch, the previous-epoch window, exact errors for
//! malformed caches and payloads, and agreement between real MLS groups.

mod common;
use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{ChaCha20Poly1305, Key, KeyInit, Nonce, Tag};
use client_core::push::{
    cache_bytes, decrypt_push, export_notification_keys, seal_push, CacheDefect, CacheWriteError,
    KeyCacheView, NotificationKey, NotificationKeyFromGroup as _, NotificationKeys, PushError, PushFormat,
    PushMessage, SealPushError, CACHE_BUDGET_BYTES, CACHE_BYTES_MAX, CACHE_ENTRIES_MAX, CACHE_HEADER_BYTES,
    EPOCHS_PER_ROOM_MAX, PCEK_BYTES, PUSH_EXPORTER_LABEL, PUSH_HEADER_BYTES, PUSH_PAYLOAD_BYTES_MAX,
    PUSH_PAYLOAD_BYTES_MIN, PUSH_PLAINTEXT_BYTES_MAX,
};
use kalandra_proto::RoomId;
use proptest::prelude::*;
use sha2::{Digest, Sha256};

const ROOM: RoomId = RoomId(*b"push-test-room-1");
const OTHER_ROOM: RoomId = RoomId(*b"push-test-room-2");
const EPOCH: u64 = 5;
const NONCE: [u8; 24] = [0x24; 24];

/// A distinct PCEK per room and epoch.
fn pcek(room_id: RoomId, epoch: u64) -> [u8; PCEK_BYTES] {
    let mut pcek = [0x5a; PCEK_BYTES];
    pcek[..16].copy_from_slice(&room_id.0);
    pcek[16..24].copy_from_slice(&epoch.to_be_bytes());
    pcek
}

fn key(room_id: RoomId, epoch: u64) -> NotificationKey {
    NotificationKey::from_pcek(room_id, epoch, &pcek(room_id, epoch))
}

fn room(index: usize) -> RoomId {
    let mut id = [0u8; 16];
    id[8..].copy_from_slice(&u64::try_from(index).expect("small").to_be_bytes());
    RoomId(id)
}

fn cache(keys: &[NotificationKey]) -> Vec<u8> {
    export_notification_keys(keys).expect("valid keys").as_bytes().to_vec()
}

fn seal(key: &NotificationKey, plaintext: &[u8]) -> Vec<u8> {
    seal_push(key, plaintext, &NONCE).expect("seal")
}

// --- An independent reading of the documentation ---

/// HMAC-SHA256 (RFC 2104) from SHA-256 alone.
fn hmac_sha256(key: &[u8; 32], message: &[u8]) -> [u8; 32] {
    let mut block = [0u8; 64];
    block[..32].copy_from_slice(key);
    let inner_pad: Vec<u8> = block.iter().map(|byte| byte ^ 0x36).collect();
    let outer_pad: Vec<u8> = block.iter().map(|byte| byte ^ 0x5c).collect();
    let inner = Sha256::new().chain_update(&inner_pad).chain_update(message).finalize();
    let outer = Sha256::new().chain_update(&outer_pad).chain_update(inner).finalize();
    outer.as_slice().try_into().expect("32 bytes")
}

fn quarter_round(state: &mut [u32; 16], a: usize, b: usize, c: usize, d: usize) {
    state[a] = state[a].wrapping_add(state[b]);
    state[d] = (state[d] ^ state[a]).rotate_left(16);
    state[c] = state[c].wrapping_add(state[d]);
    state[b] = (state[b] ^ state[c]).rotate_left(12);
    state[a] = state[a].wrapping_add(state[b]);
    state[d] = (state[d] ^ state[a]).rotate_left(8);
    state[c] = state[c].wrapping_add(state[d]);
    state[b] = (state[b] ^ state[c]).rotate_left(7);
}

/// HChaCha20 as the module documentation describes it.
fn hchacha20(key: &[u8; 32], input: &[u8; 16]) -> [u8; 32] {
    let word = |bytes: &[u8]| u32::from_le_bytes(bytes.try_into().expect("4 bytes"));
    let mut state = [0u32; 16];
    state[..4].copy_from_slice(&[0x6170_7865, 0x3320_646e, 0x7962_2d32, 0x6b20_6574]);
    for (index, chunk) in key.chunks_exact(4).enumerate() {
        state[4 + index] = word(chunk);
    }
    for (index, chunk) in input.chunks_exact(4).enumerate() {
        state[12 + index] = word(chunk);
    }
    for _ in 0..10 {
        quarter_round(&mut state, 0, 4, 8, 12);
        quarter_round(&mut state, 1, 5, 9, 13);
        quarter_round(&mut state, 2, 6, 10, 14);
        quarter_round(&mut state, 3, 7, 11, 15);
        quarter_round(&mut state, 0, 5, 10, 15);
        quarter_round(&mut state, 1, 6, 11, 12);
        quarter_round(&mut state, 2, 7, 8, 13);
        quarter_round(&mut state, 3, 4, 9, 14);
    }
    let mut out = [0u8; 32];
    for (index, word) in state[..4].iter().chain(&state[12..]).enumerate() {
        out[index * 4..][..4].copy_from_slice(&word.to_le_bytes());
    }
    out
}

/// Decrypts a push following the documentation step by step, with
/// ChaCha20-Poly1305 (12-byte nonce) and HChaCha20 as on a platform without
/// XChaCha20-Poly1305.
fn documented_decrypt(cache: &[u8], payload: &[u8]) -> Option<Vec<u8>> {
    if cache.get(..4)? != b"KLPC" || *cache.get(4)? != 1 || payload.first() != Some(&1) {
        return None;
    }
    let count = usize::from(u16::from_be_bytes(cache.get(5..7)?.try_into().ok()?));
    if cache.len() != 7 + 56 * count || payload.len() < 65 {
        return None;
    }
    let entry = cache[7..].chunks_exact(56).find(|entry| entry[..24] == payload[1..25])?;
    let push_key: [u8; 32] = entry[24..].try_into().ok()?;
    let nonce = &payload[25..49];
    let subkey = hchacha20(&push_key, nonce[..16].try_into().ok()?);
    let mut nonce12 = [0u8; 12];
    nonce12[4..].copy_from_slice(&nonce[16..]);
    let (ciphertext, tag) = payload[49..].split_at(payload.len() - 49 - 16);
    let mut plaintext = ciphertext.to_vec();
    ChaCha20Poly1305::new(Key::from_slice(&subkey))
        .decrypt_in_place_detached(
            Nonce::from_slice(&nonce12),
            &payload[..25],
            &mut plaintext,
            Tag::from_slice(tag),
        )
        .ok()?;
    Some(plaintext)
}

fn hex(text: &str) -> Vec<u8> {
    let digits: Vec<u8> = text.bytes().filter(|byte| !byte.is_ascii_whitespace()).collect();
    digits
        .chunks_exact(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).expect("ascii"), 16).expect("hex"))
        .collect()
}

#[test]
fn hchacha20_matches_the_xchacha_draft_vector() {
    // draft-irtf-cfrg-xchacha-03 §2.2.1.
    let key: [u8; 32] = std::array::from_fn(|index| u8::try_from(index).expect("small"));
    let input: [u8; 16] = hex("000000090000004a0000000031415927").try_into().expect("16 bytes");
    assert_eq!(
        hchacha20(&key, &input).to_vec(),
        hex("82413b4227b27bfed30e42508a877d73a0f9e4d58a74a853c12ec41326d3ecdc")
    );
}

#[test]
fn the_documented_test_vector() {
    let pcek: [u8; 32] = std::array::from_fn(|index| u8::try_from(index).expect("small"));
    let room_id = RoomId(std::array::from_fn(|index| 0xa0 + u8::try_from(index).expect("small")));
    let nonce: [u8; 24] = std::array::from_fn(|index| 0x40 + u8::try_from(index).expect("small"));
    let push_key = hex("eaef4691df522213d7a5b9be8718ca9ae250eecb575c8c1e286d3e03c5f4a50f");
    assert_eq!(hmac_sha256(&pcek, b"kalandraPushV1\x01").to_vec(), push_key);

    let key = NotificationKey::from_pcek(room_id, 7, &pcek);
    let payload = seal_push(&key, b"hello", &nonce).expect("seal");
    assert_eq!(
        payload,
        hex("01 a0a1a2a3a4a5a6a7a8a9aaabacadaeaf 0000000000000007
             404142434445464748494a4b4c4d4e4f5051525354555657
             7bad8e9797 5fc95e33b26c57c5f4e39d2d82e69f42")
    );
    let cache = cache(&[key]);
    let mut expected_cache = hex("4b4c5043 01 0001 a0a1a2a3a4a5a6a7a8a9aaabacadaeaf 0000000000000007");
    expected_cache.extend_from_slice(&push_key);
    assert_eq!(cache, expected_cache);
    assert_eq!(
        decrypt_push(&cache, &payload),
        Ok(PushMessage { room_id, epoch: 7, plaintext: b"hello".to_vec() })
    );
    assert_eq!(documented_decrypt(&cache, &payload).as_deref(), Some(&b"hello"[..]));
}

#[test]
fn the_documented_decryption_opens_what_seal_push_makes() {
    let keys: Vec<NotificationKey> =
        (0..10).flat_map(|index| [key(room(index), 1), key(room(index), 2)]).collect();
    let cache = cache(&keys);
    for (index, key) in keys.iter().enumerate() {
        let plaintext = vec![u8::try_from(index).expect("small"); index * 37];
        let nonce = [u8::try_from(index).expect("small"); 24];
        let payload = seal_push(key, &plaintext, &nonce).expect("seal");
        assert_eq!(documented_decrypt(&cache, &payload), Some(plaintext.clone()));
        assert_eq!(decrypt_push(&cache, &payload).map(|message| message.plaintext), Ok(plaintext));
        // The cache holds HMAC-SHA256(pcek, label || 1) after room and epoch.
        let pcek = pcek(key.room_id(), key.epoch());
        let entry = &cache[CACHE_HEADER_BYTES + 56 * index..][..56];
        assert_eq!(&entry[24..], hmac_sha256(&pcek, b"kalandraPushV1\x01").as_slice());
    }
}

// --- Round trips and binding ---

#[test]
fn round_trip_at_every_size_class() {
    let key = key(ROOM, EPOCH);
    let cache = cache(std::slice::from_ref(&key));
    for len in [0, 1, 15, 16, 17, 200, 1024, PUSH_PLAINTEXT_BYTES_MAX - 1, PUSH_PLAINTEXT_BYTES_MAX] {
        let plaintext: Vec<u8> = (0..len).map(|index| u8::try_from(index % 251).expect("small")).collect();
        let payload = seal(&key, &plaintext);
        assert_eq!(payload.len(), PUSH_PAYLOAD_BYTES_MIN + len);
        if len >= 16 {
            assert_ne!(&payload[PUSH_HEADER_BYTES..][..len], plaintext.as_slice(), "encrypted (len {len})");
        }
        assert_eq!(
            decrypt_push(&cache, &payload),
            Ok(PushMessage { room_id: ROOM, epoch: EPOCH, plaintext: plaintext.clone() })
        );
    }
    assert_eq!(
        seal_push(&key, &vec![0; PUSH_PLAINTEXT_BYTES_MAX + 1], &NONCE),
        Err(SealPushError::PlaintextTooLarge { len_bytes: PUSH_PLAINTEXT_BYTES_MAX + 1 })
    );
}

#[test]
fn nonces_change_the_ciphertext() {
    let key = key(ROOM, EPOCH);
    let first = seal_push(&key, b"same", &[1; 24]).expect("seal");
    let second = seal_push(&key, b"same", &[2; 24]).expect("seal");
    assert_ne!(first[PUSH_HEADER_BYTES..], second[PUSH_HEADER_BYTES..]);
}

#[test]
fn wrong_room_or_epoch_is_unknown() {
    let payload = seal(&key(ROOM, EPOCH), b"hi");
    let cache = cache(&[key(ROOM, EPOCH + 1), key(OTHER_ROOM, EPOCH)]);
    assert_eq!(
        decrypt_push(&cache, &payload),
        Err(PushError::UnknownRoomOrEpoch { room_id: ROOM, epoch: EPOCH })
    );
    let empty = cache_bytes(0);
    assert_eq!(empty, CACHE_HEADER_BYTES);
    assert_eq!(
        decrypt_push(export_notification_keys(&[]).expect("empty").as_bytes(), &payload),
        Err(PushError::UnknownRoomOrEpoch { room_id: ROOM, epoch: EPOCH })
    );
}

#[test]
fn a_different_key_for_the_same_room_and_epoch_fails_authentication() {
    let payload = seal(&key(ROOM, EPOCH), b"hi");
    let impostor = NotificationKey::from_pcek(ROOM, EPOCH, &[0x77; 32]);
    assert_eq!(
        decrypt_push(&cache(&[impostor]), &payload),
        Err(PushError::Authentication { room_id: ROOM, epoch: EPOCH })
    );
}

#[test]
fn every_tampered_byte_is_detected() {
    // The cache has keys for the rooms and epochs a tampered header may
    // name, so those cases reach the cipher.
    let keys = [key(ROOM, EPOCH), key(ROOM, EPOCH + 1), key(OTHER_ROOM, EPOCH)];
    let cache = cache(&keys);
    let payload = seal(&key(ROOM, EPOCH), b"a notification preview");
    for index in 0..payload.len() {
        let mut tampered = payload.clone();
        tampered[index] ^= 0x01;
        let result = decrypt_push(&cache, &tampered);
        match index {
            0 => assert_eq!(
                result,
                Err(PushError::UnsupportedVersion { format: PushFormat::Payload, version: 0 })
            ),
            1..=24 => assert!(
                matches!(result, Err(PushError::UnknownRoomOrEpoch { .. })),
                "byte {index}: {result:?}"
            ),
            _ => assert_eq!(
                result,
                Err(PushError::Authentication { room_id: ROOM, epoch: EPOCH }),
                "byte {index}"
            ),
        }
    }
    // A header moved to another room or epoch whose key the cache holds.
    let mut other_epoch = payload.clone();
    other_epoch[17..25].copy_from_slice(&(EPOCH + 1).to_be_bytes());
    assert_eq!(
        decrypt_push(&cache, &other_epoch),
        Err(PushError::Authentication { room_id: ROOM, epoch: EPOCH + 1 })
    );
    let mut other_room = payload.clone();
    other_room[1..17].copy_from_slice(&OTHER_ROOM.0);
    assert_eq!(
        decrypt_push(&cache, &other_room),
        Err(PushError::Authentication { room_id: OTHER_ROOM, epoch: EPOCH })
    );
    assert!(decrypt_push(&cache, &payload).is_ok());
}

// --- Keeping the current and previous epoch ---

#[test]
fn the_previous_epoch_decrypts_until_two_commits_later() {
    let mut keys = NotificationKeys::new();
    keys.insert(key(ROOM, 1)).expect("insert");
    let sealed_in_one = seal(&key(ROOM, 1), b"sent just before the commit");
    keys.insert(key(ROOM, 2)).expect("insert");
    let sealed_in_two = seal(&key(ROOM, 2), b"after");
    let cache = keys.export();
    assert_eq!(decrypt_push(cache.as_bytes(), &sealed_in_one).map(|m| m.epoch), Ok(1));
    assert_eq!(decrypt_push(cache.as_bytes(), &sealed_in_two).map(|m| m.epoch), Ok(2));

    keys.insert(key(ROOM, 3)).expect("insert");
    assert_eq!(keys.epochs(ROOM).collect::<Vec<_>>(), vec![2, 3]);
    let cache = keys.export();
    assert_eq!(
        decrypt_push(cache.as_bytes(), &sealed_in_one),
        Err(PushError::UnknownRoomOrEpoch { room_id: ROOM, epoch: 1 })
    );
    assert_eq!(decrypt_push(cache.as_bytes(), &sealed_in_two).map(|m| m.epoch), Ok(2));
}

#[test]
fn notification_keys_keep_the_newest_epochs_within_bounds() {
    let mut keys = NotificationKeys::new();
    keys.insert(key(ROOM, 4)).expect("insert");
    keys.insert(key(ROOM, 6)).expect("insert");
    // Older than both kept epochs: dropped at once.
    keys.insert(key(ROOM, 2)).expect("insert");
    assert_eq!(keys.epochs(ROOM).collect::<Vec<_>>(), vec![4, 6]);
    // Between them: replaces the oldest.
    keys.insert(key(ROOM, 5)).expect("insert");
    assert_eq!(keys.epochs(ROOM).collect::<Vec<_>>(), vec![5, 6]);
    // The same epoch again replaces its key.
    keys.insert(NotificationKey::from_pcek(ROOM, 6, &[9; 32])).expect("insert");
    let replaced = seal(&NotificationKey::from_pcek(ROOM, 6, &[9; 32]), b"x");
    assert!(decrypt_push(keys.export().as_bytes(), &replaced).is_ok());
    assert_eq!(keys.len(), 2);
    assert!(keys.get(ROOM, 5).is_some() && keys.get(ROOM, 4).is_none());
    assert_eq!(keys.remove_room(ROOM), 2);
    assert!(keys.is_empty());
    assert_eq!(keys.export().as_bytes(), cache(&[]).as_slice());
}

#[test]
fn notification_keys_refuse_more_than_the_cache_holds() {
    let mut keys = NotificationKeys::new();
    for index in 0..CACHE_ENTRIES_MAX / EPOCHS_PER_ROOM_MAX {
        keys.insert(key(room(index), 1)).expect("insert");
        keys.insert(key(room(index), 2)).expect("insert");
    }
    assert_eq!(keys.len(), CACHE_ENTRIES_MAX);
    let full = keys.export();
    assert_eq!(full.as_bytes().len(), CACHE_BYTES_MAX);
    assert!(full.as_bytes().len() <= CACHE_BUDGET_BYTES);
    assert_eq!(
        keys.insert(key(OTHER_ROOM, 1)),
        Err(CacheWriteError::TooManyEntries { count: CACHE_ENTRIES_MAX + 1 })
    );
    assert_eq!(keys.epochs(OTHER_ROOM).count(), 0);
    // A full room still moves to its next epoch.
    keys.insert(key(room(0), 3)).expect("advance");
    assert_eq!(keys.epochs(room(0)).collect::<Vec<_>>(), vec![2, 3]);
    let payload = seal(&key(room(CACHE_ENTRIES_MAX / 2 - 1), 2), b"last room");
    assert!(decrypt_push(keys.export().as_bytes(), &payload).is_ok());
}

#[test]
fn a_cache_for_100_rooms_is_within_50_kb() {
    let mut keys = NotificationKeys::new();
    for index in 0..100 {
        keys.insert(key(room(index), 10)).expect("insert");
        keys.insert(key(room(index), 11)).expect("insert");
    }
    let cache = keys.export();
    assert_eq!(cache.entry_count(), 200);
    assert_eq!(cache.as_bytes().len(), 11_207);
    assert!(cache.as_bytes().len() <= 50_000);
}

#[test]
fn export_is_independent_of_order_and_checks_its_input() {
    let mut keys: Vec<NotificationKey> =
        (0..20).flat_map(|index| [key(room(index), 3), key(room(index), 1)]).collect();
    let forward = cache(&keys);
    keys.reverse();
    assert_eq!(cache(&keys), forward);
    let mut ring = NotificationKeys::new();
    for key in &keys {
        ring.insert(key.clone()).expect("insert");
    }
    assert_eq!(ring.export().as_bytes(), forward.as_slice());
    let view = KeyCacheView::parse(&forward).expect("valid");
    assert_eq!(view.len(), 40);
    let listed: Vec<(RoomId, u64)> = view.entries().take(3).collect();
    assert_eq!(listed, vec![(room(0), 1), (room(0), 3), (room(1), 1)]);
    assert!(view.contains(room(19), 3) && !view.contains(room(19), 2) && !view.contains(room(20), 1));

    assert_eq!(
        export_notification_keys(&[key(ROOM, 1), key(OTHER_ROOM, 1), key(ROOM, 1)]).map(|_| ()),
        Err(CacheWriteError::Duplicate { room_id: ROOM, epoch: 1 })
    );
    assert_eq!(
        export_notification_keys(&[key(ROOM, 1), key(ROOM, 3), key(OTHER_ROOM, 1), key(ROOM, 2)]).map(|_| ()),
        Err(CacheWriteError::TooManyEpochs { room_id: ROOM })
    );
    let too_many: Vec<NotificationKey> = (0..=CACHE_ENTRIES_MAX).map(|index| key(room(index), 1)).collect();
    assert_eq!(
        export_notification_keys(&too_many).map(|_| ()),
        Err(CacheWriteError::TooManyEntries { count: CACHE_ENTRIES_MAX + 1 })
    );
    assert!(export_notification_keys(&too_many[..CACHE_ENTRIES_MAX]).is_ok());
}

#[test]
fn debug_output_shows_no_key_material() {
    let key = key(ROOM, EPOCH);
    let cache = export_notification_keys(std::slice::from_ref(&key)).expect("cache");
    let secret_hex: String =
        cache.as_bytes()[CACHE_HEADER_BYTES + 24..].iter().map(|b| format!("{b:02x}")).collect();
    let view = KeyCacheView::parse(cache.as_bytes()).expect("valid");
    let mut ring = NotificationKeys::new();
    ring.insert(key.clone()).expect("insert");
    for debug in [format!("{key:?}"), format!("{cache:?}"), format!("{view:?}"), format!("{ring:?}")] {
        assert!(!debug.contains(&secret_hex[..8]), "{debug}");
        assert!(!debug.contains('['), "no byte arrays: {debug}");
    }
}

// --- Malformed caches ---

/// A cache built byte by byte, without the library's writer.
fn raw_cache(version: u8, count: u16, entries: &[(RoomId, u64)]) -> Vec<u8> {
    let mut bytes = b"KLPC".to_vec();
    bytes.push(version);
    bytes.extend_from_slice(&count.to_be_bytes());
    for (room_id, epoch) in entries {
        bytes.extend_from_slice(&room_id.0);
        bytes.extend_from_slice(&epoch.to_be_bytes());
        bytes.extend_from_slice(&[0x33; 32]);
    }
    bytes
}

fn malformed(defect: CacheDefect) -> Result<PushMessage, PushError> {
    Err(PushError::MalformedCache(defect))
}

#[test]
fn a_truncated_cache_is_truncated_at_every_length() {
    let keys = [key(ROOM, 1), key(ROOM, 2), key(OTHER_ROOM, 1)];
    let cache = cache(&keys);
    let payload = seal(&key(OTHER_ROOM, 1), b"last entry");
    assert!(decrypt_push(&cache, &payload).is_ok());
    for len in 0..cache.len() {
        assert_eq!(decrypt_push(&cache[..len], &payload), malformed(CacheDefect::Truncated), "length {len}");
        assert_eq!(
            KeyCacheView::parse(&cache[..len]).map(|_| ()),
            Err(PushError::MalformedCache(CacheDefect::Truncated))
        );
    }
}

#[test]
fn malformed_caches_give_the_exact_error() {
    let payload = seal(&key(ROOM, 1), b"hi");
    let mut trailing = cache(&[key(ROOM, 1)]);
    trailing.push(0);
    assert_eq!(decrypt_push(&trailing, &payload), malformed(CacheDefect::TrailingBytes));

    let mut bad_magic = cache(&[key(ROOM, 1)]);
    bad_magic[3] = b'X';
    assert_eq!(decrypt_push(&bad_magic, &payload), malformed(CacheDefect::BadMagic));
    assert_eq!(decrypt_push(b"KLP", &payload), malformed(CacheDefect::Truncated));
    assert_eq!(decrypt_push(b"nope!!!", &payload), malformed(CacheDefect::BadMagic));

    assert_eq!(
        decrypt_push(&raw_cache(2, 1, &[(ROOM, 1)]), &payload),
        Err(PushError::UnsupportedVersion { format: PushFormat::KeyCache, version: 2 })
    );
    // A count larger than the entries present.
    assert_eq!(decrypt_push(&raw_cache(1, 2, &[(ROOM, 1)]), &payload), malformed(CacheDefect::Truncated));
    assert_eq!(
        decrypt_push(&raw_cache(1, u16::MAX, &[(ROOM, 1)]), &payload),
        malformed(CacheDefect::Truncated)
    );
    assert_eq!(decrypt_push(&raw_cache(1, 0, &[(ROOM, 1)]), &payload), malformed(CacheDefect::TrailingBytes));

    // Order: by room id, then epoch; no repeats.
    assert_eq!(
        decrypt_push(&raw_cache(1, 2, &[(ROOM, 2), (ROOM, 1)]), &payload),
        malformed(CacheDefect::Unordered { index: 1 })
    );
    assert_eq!(
        decrypt_push(&raw_cache(1, 2, &[(OTHER_ROOM, 1), (ROOM, 1)]), &payload),
        malformed(CacheDefect::Unordered { index: 1 })
    );
    assert_eq!(
        decrypt_push(&raw_cache(1, 3, &[(ROOM, 0), (ROOM, 1), (ROOM, 1)]), &payload),
        malformed(CacheDefect::Unordered { index: 2 })
    );
    // Epoch 256 sorts after epoch 1 only when encoded big-endian.
    assert!(KeyCacheView::parse(&raw_cache(1, 2, &[(ROOM, 1), (ROOM, 256)])).is_ok());
    assert_eq!(
        decrypt_push(&raw_cache(1, 3, &[(ROOM, 1), (ROOM, 2), (ROOM, 3)]), &payload),
        malformed(CacheDefect::TooManyEpochs { index: 2 })
    );
    assert_eq!(
        decrypt_push(&raw_cache(1, 4, &[(room(0), 1), (ROOM, 1), (ROOM, 2), (ROOM, 3)]), &payload),
        malformed(CacheDefect::TooManyEpochs { index: 3 })
    );
    // The whole cache is checked, even past the entry the push needs.
    assert_eq!(
        decrypt_push(
            &raw_cache(1, 4, &[(ROOM, 1), (OTHER_ROOM, 1), (OTHER_ROOM, 2), (OTHER_ROOM, 2)]),
            &payload
        ),
        malformed(CacheDefect::Unordered { index: 3 })
    );

    let mut too_large = vec![0u8; CACHE_BYTES_MAX + 1];
    too_large[..4].copy_from_slice(b"KLPC");
    assert_eq!(
        decrypt_push(&too_large, &payload),
        Err(PushError::TooLarge {
            format: PushFormat::KeyCache,
            len_bytes: CACHE_BYTES_MAX + 1,
            max_bytes: CACHE_BYTES_MAX
        })
    );
}

// --- Malformed payloads ---

#[test]
fn a_truncated_payload_fails_with_the_exact_error_at_every_length() {
    let key = key(ROOM, EPOCH);
    let cache = cache(std::slice::from_ref(&key));
    let payload = seal(&key, b"some preview text");
    for len in 0..payload.len() {
        let expected = if len < PUSH_PAYLOAD_BYTES_MIN {
            Err(PushError::MalformedPayload { len_bytes: len })
        } else {
            // The header is intact, the tag is not where it was.
            Err(PushError::Authentication { room_id: ROOM, epoch: EPOCH })
        };
        assert_eq!(decrypt_push(&cache, &payload[..len]), expected, "length {len}");
    }
}

#[test]
fn malformed_payloads_give_the_exact_error() {
    let key = key(ROOM, EPOCH);
    let cache = cache(std::slice::from_ref(&key));
    let mut payload = seal(&key, b"hi");
    for version in [0, 2, 0xff] {
        payload[0] = version;
        assert_eq!(
            decrypt_push(&cache, &payload),
            Err(PushError::UnsupportedVersion { format: PushFormat::Payload, version })
        );
        assert_eq!(
            decrypt_push(&cache, &[version]),
            Err(PushError::UnsupportedVersion { format: PushFormat::Payload, version })
        );
    }
    let mut too_large = seal(&key, &[7; PUSH_PLAINTEXT_BYTES_MAX]);
    assert_eq!(too_large.len(), PUSH_PAYLOAD_BYTES_MAX);
    assert!(decrypt_push(&cache, &too_large).is_ok());
    too_large.push(0);
    assert_eq!(
        decrypt_push(&cache, &too_large),
        Err(PushError::TooLarge {
            format: PushFormat::Payload,
            len_bytes: PUSH_PAYLOAD_BYTES_MAX + 1,
            max_bytes: PUSH_PAYLOAD_BYTES_MAX
        })
    );
    // Payload errors come before cache errors.
    assert_eq!(decrypt_push(b"", b""), Err(PushError::MalformedPayload { len_bytes: 0 }));
    let valid = seal(&key, b"hi");
    assert_eq!(decrypt_push(b"", &valid), malformed(CacheDefect::Truncated));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn decrypt_push_never_panics_on_arbitrary_bytes(
        cache in proptest::collection::vec(any::<u8>(), 0..400),
        payload in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let _ = decrypt_push(&cache, &payload);
        let _ = KeyCacheView::parse(&cache);
    }

    #[test]
    fn decrypt_push_never_panics_near_valid_inputs(
        header in proptest::collection::vec(any::<u8>(), 0..120),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 0..4),
        count in any::<u16>(),
        cut in any::<prop::sample::Index>(),
    ) {
        let key = key(ROOM, EPOCH);
        let mut cache = cache(&[key.clone(), NotificationKey::from_pcek(OTHER_ROOM, 1, &[1; 32])]);
        cache[5..7].copy_from_slice(&count.to_be_bytes());
        let original = seal(&key, b"preview");
        let mut payload = original.clone();
        payload.extend_from_slice(&header);
        for (index, flip) in &flips {
            let at = index.index(payload.len());
            payload[at] ^= flip;
        }
        let payload = &payload[..cut.index(payload.len() + 1)];
        let result = decrypt_push(&cache, payload);
        // Any change to the payload, or a wrong count, is refused.
        prop_assert_eq!(result.is_ok(), count == 2 && payload == original.as_slice(), "{:?}", result);
    }

    #[test]
    fn round_trip_any_push(
        room_id in any::<[u8; 16]>(),
        epoch in any::<u64>(),
        pcek in any::<[u8; 32]>(),
        nonce in any::<[u8; 24]>(),
        plaintext in proptest::collection::vec(any::<u8>(), 0..=PUSH_PLAINTEXT_BYTES_MAX),
    ) {
        let key = NotificationKey::from_pcek(RoomId(room_id), epoch, &pcek);
        let payload = seal_push(&key, &plaintext, &nonce).expect("seal");
        let cache = cache(&[key, NotificationKey::from_pcek(RoomId(room_id), epoch ^ 1, &[0; 32])]);
        prop_assert_eq!(
            decrypt_push(&cache, &payload),
            Ok(PushMessage { room_id: RoomId(room_id), epoch, plaintext: plaintext.clone() })
        );
        prop_assert_eq!(documented_decrypt(&cache, &payload), Some(plaintext));
    }
}

// --- Real MLS groups ---

#[test]
fn two_real_groups_derive_the_same_notification_keys() {
    let room_id = *b"push-mls-room-01";
    let ((alice_provider, alice_identity, mut alice_group), (bob_provider, _, mut bob_group)) =
        common::two_members(3, 4, room_id);

    // Both export the same PCEK with the documented label and context.
    let alice_pcek = alice_group
        .export_secret(&alice_provider, PUSH_EXPORTER_LABEL, &room_id, PCEK_BYTES)
        .expect("export");
    let bob_pcek =
        bob_group.export_secret(&bob_provider, PUSH_EXPORTER_LABEL, &room_id, PCEK_BYTES).expect("export");
    assert_eq!(alice_pcek, bob_pcek);
    let other_label =
        alice_group.export_secret(&alice_provider, "kalandra sender keys v1", &room_id, 32).expect("export");
    assert_ne!(alice_pcek, other_label);

    let alice_key = NotificationKey::from_group(&alice_provider, &alice_group).expect("alice key");
    let bob_key = NotificationKey::from_group(&bob_provider, &bob_group).expect("bob key");
    assert_eq!((bob_key.room_id(), bob_key.epoch()), (RoomId(room_id), 1));
    let pcek: [u8; 32] = alice_pcek.as_slice().try_into().expect("32 bytes");
    assert_eq!(
        cache(std::slice::from_ref(&alice_key)),
        cache(&[NotificationKey::from_pcek(RoomId(room_id), 1, &pcek)])
    );
    assert_eq!(cache(std::slice::from_ref(&alice_key)), cache(std::slice::from_ref(&bob_key)));

    let mut bob_keys = NotificationKeys::new();
    bob_keys.insert(bob_key).expect("insert");
    let before_commit = seal_push(&alice_key, b"alice: sealed in epoch 1", &[1; 24]).expect("seal");
    assert_eq!(
        decrypt_push(bob_keys.export().as_bytes(), &before_commit),
        Ok(PushMessage {
            room_id: RoomId(room_id),
            epoch: 1,
            plaintext: b"alice: sealed in epoch 1".to_vec()
        })
    );

    // A commit: new keys for epoch 2; the epoch-1 push still decrypts.
    let update = alice_group.self_update(&alice_provider, &alice_identity).expect("update");
    alice_group.confirm_pending_commit(&alice_provider).expect("confirm");
    bob_group.process_handshake(&bob_provider, &update.commit).expect("bob applies the commit");
    let alice_next = NotificationKey::from_group(&alice_provider, &alice_group).expect("alice key");
    bob_keys
        .insert(NotificationKey::from_group(&bob_provider, &bob_group).expect("bob key"))
        .expect("insert");
    assert_eq!(bob_keys.epochs(RoomId(room_id)).collect::<Vec<_>>(), vec![1, 2]);
    assert_ne!(
        cache(std::slice::from_ref(&alice_next))[31..],
        cache(&[alice_key])[31..],
        "a new epoch has a new key"
    );
    let after_commit = seal_push(&alice_next, b"alice: epoch 2", &[2; 24]).expect("seal");
    let bob_cache = bob_keys.export();
    assert_eq!(decrypt_push(bob_cache.as_bytes(), &before_commit).map(|m| m.epoch), Ok(1));
    assert_eq!(
        decrypt_push(bob_cache.as_bytes(), &after_commit).map(|m| m.plaintext),
        Ok(b"alice: epoch 2".to_vec())
    );
}
