//! Sender keys: how members encrypt `Application` messages within an epoch.
//!
//! MLS gives every member of an epoch the same exporter secret. From it each
//! member derives one symmetric *chain* per sender (by leaf index); a sender
//! ratchets its chain once per message, and every member can follow it. Used
//! keys are deleted: a message key exists only until its message is
//! decrypted, and a chain key only until the next step replaces it.
//!
//! # Derivation
//!
//! All integers are unsigned big-endian; `||` is concatenation; HKDF is
//! HKDF-SHA256 (RFC 5869).
//!
//! 1. **Epoch secret** (32 bytes), once per epoch, from MLS (RFC 9420 §8.5):
//!
//!    ```text
//!    epoch_secret = MLS-Exporter("kalandra sender keys v1", room_id, 32)
//!    ```
//!
//!    with the label [`SENDER_KEYS_EXPORTER_LABEL`] and the 16-byte room id
//!    as context ([`SenderKeyState::from_group`] does this).
//! 2. **Epoch root**: `root = HKDF-Extract(salt = none, ikm = epoch_secret)`,
//!    where no salt means 32 zero bytes (RFC 5869 §2.2).
//! 3. **Chain start** of the sender at leaf `L` (`u32`):
//!
//!    ```text
//!    chain_key[0] = HKDF-Expand(root, "kalandraSenderV1" || L, 32)
//!    ```
//!
//!    ([`CHAIN_LABEL`]; the info is 16 + 4 = 20 bytes).
//! 4. **Ratchet step** for generation `n` (`u32`), one HKDF-Expand of 88 bytes
//!    with the chain key as pseudorandom key:
//!
//!    ```text
//!    okm = HKDF-Expand(chain_key[n], "kalandraStepV1" || n, 88)
//!    message_key[n]   = okm[0..32]    XChaCha20-Poly1305 key
//!    nonce[n]         = okm[32..56]   XChaCha20-Poly1305 nonce (24 bytes)
//!    chain_key[n + 1] = okm[56..88]
//!    ```
//!
//!    ([`STEP_LABEL`]; the info is 14 + 4 = 18 bytes). `chain_key[n]` is
//!    deleted once `chain_key[n + 1]` exists. Every key is used for exactly
//!    one message, so the derived nonce never repeats under a key.
//! 5. **Encryption**: `ciphertext = XChaCha20-Poly1305(message_key[n],
//!    nonce[n], plaintext, aad)`, the 16-byte tag appended. The `Application`
//!    payload carries `{ generation: n, ciphertext }`.
//! 6. **Associated data** ([`associated_data`], 38 bytes): the routing
//!    fields of the frame header and the generation,
//!
//!    ```text
//!    aad = room_id (16) || sender_id (8) || epoch (8) || opcode (2, 0x0112) || generation (4)
//!    ```
//!
//!    so that a ciphertext cannot be moved to another room, sender, epoch or
//!    chain position. The log index and server timestamp are not included
//!    (the sequencer writes them after encryption), nor is the request id
//!    (a transport detail).
//!
//! # Receiving
//!
//! A receiver keeps one chain per sender leaf, created on the first message
//! from it. A generation ahead of the chain is reached by stepping forward at
//! most [`GENERATION_JUMP_MAX`] times; the message keys stepped over are kept
//! for late messages, at most [`SKIPPED_KEYS_PER_SENDER_MAX`] per sender and
//! [`SKIPPED_KEYS_PER_EPOCH_MAX`] in all (the oldest are dropped first). A
//! generation whose key was used is a [`DecryptError::Replay`]; one whose
//! key was dropped is [`DecryptError::TooOld`]. A message that fails
//! authentication changes nothing: no key is consumed and the chain does not
//! move.
//!
//! # Signatures
//!
//! Frames are signed with the sender's Ed25519 identity key, which is also
//! the identity of its MLS credential. Every member holds every chain of the
//! epoch, so the encryption alone does not tell members apart: the signature
//! does. [`verify_sender`] checks that the frame's `sender_id` belongs to the
//! member's key and that the frame is signed by it; [`open_application`]
//! does so before decrypting.
//!
//! # Secrets in memory
//!
//! Chain keys, message keys and the epoch root are overwritten when dropped
//! (the cipher zeroes its own key copy). The epoch root stays for the whole
//! epoch so that chains can be created lazily; the MLS group keeps its
//! exporter secret for the epoch as well, so this does not widen what a
//! compromise during the epoch reveals. Forward secrecy across epochs comes
//! from MLS.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{Key, KeyInit, Tag, XChaCha20Poly1305, XNonce};
use ed25519_dalek::SigningKey;
use hkdf::Hkdf;
use kalandra_proto::limits::{APPLICATION_PAYLOAD_BYTES_MAX, EPOCH_TAG_BYTES, PUBLIC_KEY_BYTES};
use kalandra_proto::payload::Application;
use kalandra_proto::sign::parse_identity_key;
use kalandra_proto::{
    Frame, FrameError, FrameHeaderBuf, Opcode, PayloadError, RoomId, SenderId, SignatureError,
};
use openmls::storage::OpenMlsProvider;
use sha2::Sha256;

use crate::mls::{ExportError, RoomGroup};

/// MLS exporter label of the per-epoch sender-key secret.
pub const SENDER_KEYS_EXPORTER_LABEL: &str = "kalandra sender keys v1";
/// Length of the exported epoch secret.
pub const EPOCH_SECRET_BYTES: usize = 32;
/// HKDF info prefix of a sender's chain start (followed by its leaf index).
pub const CHAIN_LABEL: &[u8] = b"kalandraSenderV1";
/// HKDF info prefix of a ratchet step (followed by the generation).
pub const STEP_LABEL: &[u8] = b"kalandraStepV1";
/// Length of a chain key.
pub const CHAIN_KEY_BYTES: usize = 32;
/// Length of a message key (XChaCha20-Poly1305 key).
pub const MESSAGE_KEY_BYTES: usize = 32;
/// Length of a message nonce (XChaCha20-Poly1305 nonce).
pub const NONCE_BYTES: usize = 24;
/// Output of one ratchet step: message key, nonce, next chain key.
pub const STEP_OUTPUT_BYTES: usize = MESSAGE_KEY_BYTES + NONCE_BYTES + CHAIN_KEY_BYTES;
/// Length of the Poly1305 tag appended to every ciphertext.
pub const TAG_BYTES: usize = 16;
/// Length of the associated data ([`associated_data`]).
pub const ASSOCIATED_DATA_BYTES: usize = 16 + 8 + 8 + 2 + 4;
/// The last generation a chain can reach; a sender that used it cannot send
/// again in this epoch ([`EncryptError::ChainExhausted`]).
pub const GENERATION_MAX: u32 = u32::MAX;
/// Largest forward jump of a receiving chain in one message: a generation
/// more than this many steps ahead is refused ([`DecryptError::TooFarAhead`]),
/// so a malicious generation costs at most this many derivations.
pub const GENERATION_JUMP_MAX: u32 = 1024;
/// Most skipped message keys kept for one sender.
pub const SKIPPED_KEYS_PER_SENDER_MAX: usize = 1024;
/// Most skipped message keys kept for all senders of an epoch.
pub const SKIPPED_KEYS_PER_EPOCH_MAX: usize = 8192;
/// Upper bound of the CBOR encoding of an `Application` payload around its
/// ciphertext: map header (1), key `generation` (11), a `u32` (at most 5),
/// key `ciphertext` (11), byte-string header (at most 5), key `epoch_tag`
/// (10) with its 8-byte string (9) — 52 bytes, rounded up.
pub const APPLICATION_ENCODING_OVERHEAD_BYTES_MAX: usize = 64;
/// Largest plaintext that fits an `Application` frame.
pub const PLAINTEXT_BYTES_MAX: usize =
    APPLICATION_PAYLOAD_BYTES_MAX as usize - TAG_BYTES - APPLICATION_ENCODING_OVERHEAD_BYTES_MAX;

/// SHA-256 output length; HKDF-Expand makes one HMAC call per this many bytes.
const HASH_BYTES: usize = 32;

const _: () = assert!(EPOCH_SECRET_BYTES == HASH_BYTES);
const _: () = assert!(CHAIN_KEY_BYTES == HASH_BYTES, "a chain key is used directly as an HKDF PRK");
const _: () = assert!(STEP_OUTPUT_BYTES == 88);
const _: () = assert!(STEP_OUTPUT_BYTES <= 255 * HASH_BYTES, "HKDF-Expand output limit");
/// Longest message one SHA-256 compression takes with its padding.
const SHA256_ONE_BLOCK_BYTES_MAX: usize = 55;
/// HMAC input of a step's later output blocks: previous block, info, counter.
const STEP_BLOCK_INPUT_BYTES: usize = HASH_BYTES + STEP_LABEL.len() + 4 + 1;
// Each such input fits one SHA-256 block, so a step costs 8 compressions
// (2 for the HMAC key, 2 per output block).
const _: () = assert!(STEP_BLOCK_INPUT_BYTES <= SHA256_ONE_BLOCK_BYTES_MAX);
const _: () = assert!(ASSOCIATED_DATA_BYTES == 38);
const _: () =
    assert!(1 + 11 + 5 + 11 + 5 + 10 + 1 + EPOCH_TAG_BYTES <= APPLICATION_ENCODING_OVERHEAD_BYTES_MAX);
const _: () = assert!(PLAINTEXT_BYTES_MAX > 0);
const _: () =
    assert!((GENERATION_JUMP_MAX as usize) <= SKIPPED_KEYS_PER_SENDER_MAX, "one jump fits the store");
const _: () = assert!(SKIPPED_KEYS_PER_SENDER_MAX <= SKIPPED_KEYS_PER_EPOCH_MAX);

/// Overwrites `bytes` with zeros in a way the optimiser keeps.
fn wipe(bytes: &mut [u8]) {
    bytes.fill(0);
    std::hint::black_box(bytes);
}

/// Secret bytes, overwritten on drop.
struct Secret<const N: usize>([u8; N]);

impl<const N: usize> Secret<N> {
    fn zero() -> Self {
        Secret([0u8; N])
    }

    fn from_slice(bytes: &[u8]) -> Self {
        let mut secret = Self::zero();
        secret.0.copy_from_slice(bytes);
        secret
    }
}

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

type ChainKey = Secret<CHAIN_KEY_BYTES>;

/// One message's key and nonce.
struct MessageKey {
    key: Secret<MESSAGE_KEY_BYTES>,
    nonce: Secret<NONCE_BYTES>,
}

/// The epoch root: `HKDF-Extract(salt = none, epoch_secret)`.
fn epoch_root(epoch_secret: &[u8; EPOCH_SECRET_BYTES]) -> Secret<HASH_BYTES> {
    let (mut prk, _) = Hkdf::<Sha256>::extract(None, epoch_secret);
    let root = Secret::from_slice(&prk);
    wipe(&mut prk);
    root
}

/// `HKDF-Expand(root, CHAIN_LABEL || leaf, 32)`.
fn chain_start(root: &Secret<HASH_BYTES>, leaf: u32) -> ChainKey {
    let hkdf = Hkdf::<Sha256>::from_prk(&root.0).expect("the root is one hash output long");
    let mut chain_key = ChainKey::zero();
    hkdf.expand_multi_info(&[CHAIN_LABEL, &leaf.to_be_bytes()], &mut chain_key.0)
        .expect("32 bytes is within HKDF-SHA256's output limit");
    chain_key
}

/// One ratchet step: the message key of `generation` and the next chain key.
fn step(chain_key: &ChainKey, generation: u32) -> (MessageKey, ChainKey) {
    let hkdf = Hkdf::<Sha256>::from_prk(&chain_key.0).expect("a chain key is one hash output long");
    let mut okm = Secret::<STEP_OUTPUT_BYTES>::zero();
    hkdf.expand_multi_info(&[STEP_LABEL, &generation.to_be_bytes()], &mut okm.0)
        .expect("88 bytes is within HKDF-SHA256's output limit");
    let (key, rest) = okm.0.split_at(MESSAGE_KEY_BYTES);
    let (nonce, next) = rest.split_at(NONCE_BYTES);
    let message_key = MessageKey { key: Secret::from_slice(key), nonce: Secret::from_slice(nonce) };
    (message_key, ChainKey::from_slice(next))
}

/// The associated data of a message: the header's routing fields and the
/// generation (see the module documentation for the layout).
pub fn associated_data(
    room_id: RoomId,
    sender_id: SenderId,
    epoch: u64,
    generation: u32,
) -> [u8; ASSOCIATED_DATA_BYTES] {
    let mut aad = [0u8; ASSOCIATED_DATA_BYTES];
    aad[0..16].copy_from_slice(&room_id.0);
    aad[16..24].copy_from_slice(&sender_id.0.to_be_bytes());
    aad[24..32].copy_from_slice(&epoch.to_be_bytes());
    aad[32..34].copy_from_slice(&Opcode::Application.to_u16().to_be_bytes());
    aad[34..38].copy_from_slice(&generation.to_be_bytes());
    aad
}

fn seal(message_key: &MessageKey, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let cipher = XChaCha20Poly1305::new(Key::from_slice(&message_key.key.0));
    let mut out = Vec::with_capacity(plaintext.len() + TAG_BYTES);
    out.extend_from_slice(plaintext);
    let tag = cipher
        .encrypt_in_place_detached(XNonce::from_slice(&message_key.nonce.0), aad, &mut out)
        .expect("XChaCha20-Poly1305 encrypts far more than PLAINTEXT_BYTES_MAX");
    out.extend_from_slice(&tag);
    out
}

fn open(message_key: &MessageKey, aad: &[u8], ciphertext: &[u8]) -> Option<Vec<u8>> {
    let body_len = ciphertext.len().checked_sub(TAG_BYTES)?;
    let (body, tag) = ciphertext.split_at(body_len);
    let cipher = XChaCha20Poly1305::new(Key::from_slice(&message_key.key.0));
    let mut out = body.to_vec();
    cipher
        .decrypt_in_place_detached(
            XNonce::from_slice(&message_key.nonce.0),
            aad,
            &mut out,
            Tag::from_slice(tag),
        )
        .ok()?;
    Some(out)
}

/// Why a message could not be encrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncryptError {
    /// Generation [`GENERATION_MAX`] was used: no more messages in this epoch.
    #[error("the sending chain is exhausted for this epoch")]
    ChainExhausted,
    /// The plaintext does not fit an `Application` frame.
    #[error("plaintext of {len_bytes} bytes exceeds {PLAINTEXT_BYTES_MAX}")]
    PlaintextTooLarge {
        /// The plaintext's length.
        len_bytes: usize,
    },
}

/// Why a message could not be decrypted. None of these changes the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecryptError {
    /// The sender is this member: our own messages are not decrypted.
    #[error("message from our own leaf {leaf}")]
    OwnMessage {
        /// Our leaf.
        leaf: u32,
    },
    /// The leaf is not a member of this epoch.
    #[error("leaf {leaf} is not a member of this epoch")]
    UnknownSender {
        /// The leaf.
        leaf: u32,
    },
    /// The generation's key was already used.
    #[error("generation {generation} of leaf {leaf} was already decrypted")]
    Replay {
        /// The sender's leaf.
        leaf: u32,
        /// The generation.
        generation: u32,
    },
    /// The generation's key was dropped to respect the skipped-key bounds.
    #[error("generation {generation} of leaf {leaf} is older than the kept keys (from {oldest_kept})")]
    TooOld {
        /// The sender's leaf.
        leaf: u32,
        /// The generation.
        generation: u32,
        /// Generations below this one are no longer kept.
        oldest_kept: u32,
    },
    /// The generation is more than [`GENERATION_JUMP_MAX`] ahead of the chain.
    #[error("generation {generation} of leaf {leaf} is too far ahead of {next_generation}")]
    TooFarAhead {
        /// The sender's leaf.
        leaf: u32,
        /// The generation.
        generation: u32,
        /// The chain's next generation.
        next_generation: u64,
    },
    /// The ciphertext does not authenticate under the key and associated data.
    #[error("generation {generation} of leaf {leaf} failed authentication")]
    Authentication {
        /// The sender's leaf.
        leaf: u32,
        /// The generation.
        generation: u32,
    },
}

/// Why a frame is not from the member it claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SenderError {
    /// The frame's `sender_id` is not the one of the member's identity key.
    #[error("frame sender {frame_sender} is not the member's {member_sender}")]
    SenderMismatch {
        /// The frame's sender id.
        frame_sender: SenderId,
        /// The sender id of the member's key.
        member_sender: SenderId,
    },
    /// The key is invalid, or the frame is unsigned or its signature does not verify.
    #[error(transparent)]
    Signature(#[from] SignatureError),
}

/// Why an `Application` frame could not be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// Encryption failed.
    #[error(transparent)]
    Encrypt(#[from] EncryptError),
    /// The frame could not be built.
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// Why an `Application` frame could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// The frame is not an `Application` frame.
    #[error("expected an Application frame, got {opcode:?}")]
    NotApplication {
        /// The frame's opcode.
        opcode: Opcode,
    },
    /// The frame is not from the member it claims.
    #[error(transparent)]
    Sender(#[from] SenderError),
    /// The frame is for another room than this state's.
    #[error("frame for room {frame_room}, keys for room {state_room}")]
    WrongRoom {
        /// The frame's room.
        frame_room: RoomId,
        /// The state's room.
        state_room: RoomId,
    },
    /// The frame is for another epoch than this state's.
    #[error("frame for epoch {frame_epoch}, keys for epoch {state_epoch}")]
    WrongEpoch {
        /// The frame's epoch.
        frame_epoch: u64,
        /// The state's epoch.
        state_epoch: u64,
    },
    /// The payload is not a valid `Application` payload.
    #[error(transparent)]
    Payload(#[from] PayloadError),
    /// Decryption failed.
    #[error(transparent)]
    Decrypt(#[from] DecryptError),
}

/// An encrypted message: what an `Application` payload carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    /// The sender's chain position.
    pub generation: u32,
    /// Ciphertext with the tag appended.
    pub ciphertext: Vec<u8>,
}

/// A chain and the generation its key is for.
struct Chain {
    key: ChainKey,
    /// Next generation; `2^32` once generation [`GENERATION_MAX`] was derived.
    next: u64,
}

struct ReceivingChain {
    chain: Chain,
    /// Generations below this whose keys are not stored were dropped.
    oldest_kept: u32,
    /// Skipped keys of this sender in the store.
    stored: usize,
}

struct StoredKey {
    /// Insertion order, for dropping the oldest key of the epoch.
    order: u64,
    key: MessageKey,
}

/// The sender keys of one room in one epoch: our sending chain and the
/// receiving chains of the other members.
pub struct SenderKeyState {
    room_id: RoomId,
    epoch: u64,
    own_leaf: u32,
    root: Secret<HASH_BYTES>,
    members: BTreeSet<u32>,
    sending: Chain,
    receiving: BTreeMap<u32, ReceivingChain>,
    /// Skipped message keys by (leaf, generation).
    skipped: BTreeMap<(u32, u32), StoredKey>,
    /// The same keys by insertion order.
    skipped_order: BTreeMap<u64, (u32, u32)>,
    next_order: u64,
    /// The epoch instance's tag our messages carry
    /// ([`kalandra_proto::epoch_tag`]); `None` for a state made from a bare
    /// secret ([`SenderKeyState::new`]).
    epoch_tag: Option<[u8; EPOCH_TAG_BYTES]>,
}

impl std::fmt::Debug for SenderKeyState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SenderKeyState")
            .field("room_id", &self.room_id)
            .field("epoch", &self.epoch)
            .field("own_leaf", &self.own_leaf)
            .field("members", &self.members.len())
            .field("next_send_generation", &self.sending.next)
            .field("receiving_chains", &self.receiving.len())
            .field("stored_skipped_keys", &self.skipped.len())
            .finish_non_exhaustive()
    }
}

impl SenderKeyState {
    /// The state of `room_id` at `epoch` for the member at `own_leaf`, from
    /// the epoch's exported secret ([`SENDER_KEYS_EXPORTER_LABEL`], context
    /// the room id) and the leaves of the epoch's members.
    pub fn new(
        room_id: RoomId,
        epoch: u64,
        epoch_secret: &[u8; EPOCH_SECRET_BYTES],
        own_leaf: u32,
        member_leaves: impl IntoIterator<Item = u32>,
    ) -> Self {
        let root = epoch_root(epoch_secret);
        let sending = Chain { key: chain_start(&root, own_leaf), next: 0 };
        SenderKeyState {
            room_id,
            epoch,
            own_leaf,
            root,
            members: member_leaves.into_iter().collect(),
            sending,
            receiving: BTreeMap::new(),
            skipped: BTreeMap::new(),
            skipped_order: BTreeMap::new(),
            next_order: 0,
            epoch_tag: None,
        }
    }

    /// The state for `group`'s current epoch: exports the epoch secret and
    /// takes the room id, epoch, own leaf and members from the group.
    pub fn from_group<P: OpenMlsProvider>(provider: &P, group: &RoomGroup) -> Result<Self, ExportError> {
        let room_id = group.room_id();
        let mut exported =
            group.export_secret(provider, SENDER_KEYS_EXPORTER_LABEL, &room_id, EPOCH_SECRET_BYTES)?;
        let secret: Result<[u8; EPOCH_SECRET_BYTES], _> = exported.as_slice().try_into();
        wipe(&mut exported);
        let Ok(secret) = secret else {
            return Err(ExportError::Export("exporter returned a secret of the wrong length".into()));
        };
        let secret = Secret(secret);
        let members = group.members().into_iter().map(|member| member.leaf_index);
        let mut state = Self::new(RoomId(room_id), group.epoch(), &secret.0, group.own_leaf_index(), members);
        state.epoch_tag = Some(kalandra_proto::epoch_tag(
            RoomId(room_id),
            group.epoch(),
            group.confirmed_transcript_hash(),
        ));
        Ok(state)
    }

    /// The tag of the epoch instance this state belongs to, which our
    /// `Application` payloads carry; `None` when made with [`Self::new`].
    pub fn epoch_tag(&self) -> Option<[u8; EPOCH_TAG_BYTES]> {
        self.epoch_tag
    }

    /// The room.
    pub fn room_id(&self) -> RoomId {
        self.room_id
    }
    /// The epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
    /// Our leaf.
    pub fn own_leaf(&self) -> u32 {
        self.own_leaf
    }
    /// The generation our next message will use, or `None` if the sending
    /// chain is exhausted.
    pub fn next_send_generation(&self) -> Option<u32> {
        u32::try_from(self.sending.next).ok()
    }
    /// Skipped message keys currently stored, for all senders.
    pub fn stored_skipped_keys(&self) -> usize {
        self.skipped.len()
    }
    /// Whether the key of `generation` of `leaf` is stored as a skipped key.
    pub fn has_skipped_key(&self, leaf: u32, generation: u32) -> bool {
        self.skipped.contains_key(&(leaf, generation))
    }

    /// Encrypts `plaintext` as our next message; `sender_id` is our sender
    /// id (it is part of the associated data). Never reuses a generation.
    pub fn encrypt(&mut self, sender_id: SenderId, plaintext: &[u8]) -> Result<Sealed, EncryptError> {
        if plaintext.len() > PLAINTEXT_BYTES_MAX {
            return Err(EncryptError::PlaintextTooLarge { len_bytes: plaintext.len() });
        }
        let generation = u32::try_from(self.sending.next).map_err(|_| EncryptError::ChainExhausted)?;
        let (message_key, next_key) = step(&self.sending.key, generation);
        self.sending.key = next_key;
        self.sending.next = u64::from(generation) + 1;
        let aad = associated_data(self.room_id, sender_id, self.epoch, generation);
        Ok(Sealed { generation, ciphertext: seal(&message_key, &aad, plaintext) })
    }

    /// Decrypts message `generation` of the member at `sender_leaf`, whose
    /// sender id is `sender_id`. On success the message key is deleted; on
    /// failure no key is consumed and no chain moves.
    pub fn decrypt(
        &mut self,
        sender_leaf: u32,
        sender_id: SenderId,
        generation: u32,
        ciphertext: &[u8],
    ) -> Result<Vec<u8>, DecryptError> {
        if sender_leaf == self.own_leaf {
            return Err(DecryptError::OwnMessage { leaf: sender_leaf });
        }
        if !self.members.contains(&sender_leaf) {
            return Err(DecryptError::UnknownSender { leaf: sender_leaf });
        }
        let aad = associated_data(self.room_id, sender_id, self.epoch, generation);
        let root = &self.root;
        let receiving = self.receiving.entry(sender_leaf).or_insert_with(|| ReceivingChain {
            chain: Chain { key: chain_start(root, sender_leaf), next: 0 },
            oldest_kept: 0,
            stored: 0,
        });
        let leaf = sender_leaf;
        if u64::from(generation) < receiving.chain.next {
            let oldest_kept = receiving.oldest_kept;
            let Some(stored) = self.skipped.get(&(leaf, generation)) else {
                if generation < oldest_kept {
                    return Err(DecryptError::TooOld { leaf, generation, oldest_kept });
                }
                return Err(DecryptError::Replay { leaf, generation });
            };
            let plaintext = open(&stored.key, &aad, ciphertext)
                .ok_or(DecryptError::Authentication { leaf, generation })?;
            self.remove_skipped(leaf, generation);
            return Ok(plaintext);
        }
        let next_generation = receiving.chain.next;
        if u64::from(generation) - next_generation > u64::from(GENERATION_JUMP_MAX) {
            return Err(DecryptError::TooFarAhead { leaf, generation, next_generation });
        }
        let first = u32::try_from(next_generation).expect("next_generation <= generation, a u32");
        let mut chain_key = receiving.chain.key.clone();
        let mut passed = Vec::new();
        for skipped_generation in first..generation {
            let (message_key, next_key) = step(&chain_key, skipped_generation);
            passed.push((skipped_generation, message_key));
            chain_key = next_key;
        }
        let (message_key, next_key) = step(&chain_key, generation);
        let plaintext =
            open(&message_key, &aad, ciphertext).ok_or(DecryptError::Authentication { leaf, generation })?;
        receiving.chain.key = next_key;
        receiving.chain.next = u64::from(generation) + 1;
        for (skipped_generation, message_key) in passed {
            self.store_skipped(leaf, skipped_generation, message_key);
        }
        Ok(plaintext)
    }

    /// Stores a skipped key, first dropping the sender's or the epoch's
    /// oldest key if a bound is reached.
    fn store_skipped(&mut self, leaf: u32, generation: u32, key: MessageKey) {
        let stored = self.receiving.get(&leaf).map_or(0, |receiving| receiving.stored);
        if stored >= SKIPPED_KEYS_PER_SENDER_MAX {
            let oldest = self.skipped.range((leaf, 0)..=(leaf, u32::MAX)).next().map(|(&key, _)| key);
            if let Some((oldest_leaf, oldest_generation)) = oldest {
                self.drop_skipped(oldest_leaf, oldest_generation);
            }
        }
        if self.skipped.len() >= SKIPPED_KEYS_PER_EPOCH_MAX {
            let oldest = self.skipped_order.first_key_value().map(|(_, &key)| key);
            if let Some((oldest_leaf, oldest_generation)) = oldest {
                self.drop_skipped(oldest_leaf, oldest_generation);
            }
        }
        let order = self.next_order;
        self.next_order += 1;
        self.skipped.insert((leaf, generation), StoredKey { order, key });
        self.skipped_order.insert(order, (leaf, generation));
        if let Some(receiving) = self.receiving.get_mut(&leaf) {
            receiving.stored += 1;
        }
    }

    /// Drops a stored key unused: its generation becomes too old.
    fn drop_skipped(&mut self, leaf: u32, generation: u32) {
        self.remove_skipped(leaf, generation);
        if let Some(receiving) = self.receiving.get_mut(&leaf) {
            // A sender's keys are stored and dropped in generation order.
            receiving.oldest_kept = receiving.oldest_kept.max(generation.saturating_add(1));
        }
    }

    fn remove_skipped(&mut self, leaf: u32, generation: u32) {
        if let Some(stored) = self.skipped.remove(&(leaf, generation)) {
            self.skipped_order.remove(&stored.order);
            if let Some(receiving) = self.receiving.get_mut(&leaf) {
                receiving.stored -= 1;
            }
        }
    }
}

/// Format version of [`SenderKeyState::to_bytes`]: version 1 followed by
/// the epoch tag (a byte 0, or 1 and the tag's 8 bytes).
pub const SENDER_KEY_STATE_FORMAT_VERSION: u8 = 2;
/// The format before the epoch tag, still read (as a state without one).
const SENDER_KEY_STATE_FORMAT_UNTAGGED: u8 = 1;
/// Most member leaves a serialized state may list (the MLS tree's bound).
pub const SERIALIZED_MEMBERS_MAX: usize = 1 << 20;

/// Why a serialized [`SenderKeyState`] was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SenderKeyStateDecodeError {
    /// The bytes end early.
    #[error("sender-key state truncated")]
    Truncated,
    /// Bytes follow the state.
    #[error("{extra_bytes} bytes after the sender-key state")]
    TrailingBytes {
        /// How many.
        extra_bytes: usize,
    },
    /// Written by another format version.
    #[error("unknown sender-key state format {version}")]
    UnknownVersion {
        /// The version found.
        version: u8,
    },
    /// A count or position breaks a bound the live state keeps.
    #[error("invalid sender-key state: {detail}")]
    Invalid {
        /// Which rule.
        detail: &'static str,
    },
}

/// A collection's length as the `u32` the format stores; every collection
/// of the state is bounded far below `u32::MAX`.
fn count_u32(len: usize) -> u32 {
    u32::try_from(len).expect("state collections are bounded below u32::MAX")
}

struct StateReader<'a> {
    bytes: &'a [u8],
}

impl<'a> StateReader<'a> {
    fn take(&mut self, len: usize) -> Result<&'a [u8], SenderKeyStateDecodeError> {
        if self.bytes.len() < len {
            return Err(SenderKeyStateDecodeError::Truncated);
        }
        let (head, rest) = self.bytes.split_at(len);
        self.bytes = rest;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], SenderKeyStateDecodeError> {
        Ok(self.take(N)?.try_into().expect("took N bytes"))
    }
    fn u32(&mut self) -> Result<u32, SenderKeyStateDecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, SenderKeyStateDecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    fn count(&mut self, max: usize) -> Result<usize, SenderKeyStateDecodeError> {
        let count = self.u32()? as usize;
        if count > max {
            return Err(SenderKeyStateDecodeError::Invalid { detail: "count above its bound" });
        }
        Ok(count)
    }
}

impl SenderKeyState {
    /// The whole state as bytes, for an encrypted client store: chains and
    /// the skipped keys not yet used, so a restarted client neither reuses a
    /// sending generation nor accepts a replay. The bytes are secret.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            96 + self.members.len() * 4 + self.receiving.len() * 52 + self.skipped.len() * 72,
        );
        out.push(SENDER_KEY_STATE_FORMAT_VERSION);
        out.extend_from_slice(&self.room_id.0);
        out.extend_from_slice(&self.epoch.to_be_bytes());
        out.extend_from_slice(&self.own_leaf.to_be_bytes());
        out.extend_from_slice(&self.root.0);
        out.extend_from_slice(&count_u32(self.members.len()).to_be_bytes());
        for leaf in &self.members {
            out.extend_from_slice(&leaf.to_be_bytes());
        }
        out.extend_from_slice(&self.sending.key.0);
        out.extend_from_slice(&self.sending.next.to_be_bytes());
        out.extend_from_slice(&count_u32(self.receiving.len()).to_be_bytes());
        for (leaf, receiving) in &self.receiving {
            out.extend_from_slice(&leaf.to_be_bytes());
            out.extend_from_slice(&receiving.chain.key.0);
            out.extend_from_slice(&receiving.chain.next.to_be_bytes());
            out.extend_from_slice(&receiving.oldest_kept.to_be_bytes());
        }
        out.extend_from_slice(&count_u32(self.skipped.len()).to_be_bytes());
        for ((leaf, generation), stored) in &self.skipped {
            out.extend_from_slice(&leaf.to_be_bytes());
            out.extend_from_slice(&generation.to_be_bytes());
            out.extend_from_slice(&stored.order.to_be_bytes());
            out.extend_from_slice(&stored.key.key.0);
            out.extend_from_slice(&stored.key.nonce.0);
        }
        out.extend_from_slice(&self.next_order.to_be_bytes());
        match self.epoch_tag {
            Some(tag) => {
                out.push(1);
                out.extend_from_slice(&tag);
            }
            None => out.push(0),
        }
        out
    }

    /// Reads a state written by [`Self::to_bytes`], checking every bound the
    /// live state keeps.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SenderKeyStateDecodeError> {
        let mut reader = StateReader { bytes };
        let version = reader.array::<1>()?[0];
        if version != SENDER_KEY_STATE_FORMAT_VERSION && version != SENDER_KEY_STATE_FORMAT_UNTAGGED {
            return Err(SenderKeyStateDecodeError::UnknownVersion { version });
        }
        let room_id = RoomId(reader.array()?);
        let epoch = reader.u64()?;
        let own_leaf = reader.u32()?;
        let root = Secret(reader.array()?);
        let member_count = reader.count(SERIALIZED_MEMBERS_MAX)?;
        let mut members = BTreeSet::new();
        for _ in 0..member_count {
            members.insert(reader.u32()?);
        }
        let sending = Chain { key: Secret(reader.array()?), next: reader.u64()? };
        if sending.next > u64::from(u32::MAX) + 1 {
            return Err(SenderKeyStateDecodeError::Invalid { detail: "sending generation past the chain" });
        }
        let receiving_count = reader.count(member_count)?;
        let mut receiving = BTreeMap::new();
        for _ in 0..receiving_count {
            let leaf = reader.u32()?;
            let chain = Chain { key: Secret(reader.array()?), next: reader.u64()? };
            let oldest_kept = reader.u32()?;
            if !members.contains(&leaf) || chain.next > u64::from(u32::MAX) + 1 {
                return Err(SenderKeyStateDecodeError::Invalid { detail: "receiving chain" });
            }
            receiving.insert(leaf, ReceivingChain { chain, oldest_kept, stored: 0 });
        }
        let skipped_count = reader.count(SKIPPED_KEYS_PER_EPOCH_MAX)?;
        let mut skipped = BTreeMap::new();
        let mut skipped_order = BTreeMap::new();
        for _ in 0..skipped_count {
            let leaf = reader.u32()?;
            let generation = reader.u32()?;
            let order = reader.u64()?;
            let key = MessageKey { key: Secret(reader.array()?), nonce: Secret(reader.array()?) };
            let Some(chain) = receiving.get_mut(&leaf) else {
                return Err(SenderKeyStateDecodeError::Invalid { detail: "skipped key of no chain" });
            };
            if u64::from(generation) >= chain.chain.next || chain.stored >= SKIPPED_KEYS_PER_SENDER_MAX {
                return Err(SenderKeyStateDecodeError::Invalid { detail: "skipped key" });
            }
            chain.stored += 1;
            if skipped.insert((leaf, generation), StoredKey { order, key }).is_some()
                || skipped_order.insert(order, (leaf, generation)).is_some()
            {
                return Err(SenderKeyStateDecodeError::Invalid { detail: "duplicate skipped key" });
            }
        }
        let next_order = reader.u64()?;
        if skipped_order.last_key_value().is_some_and(|(&order, _)| order >= next_order) {
            return Err(SenderKeyStateDecodeError::Invalid { detail: "skipped key order" });
        }
        let epoch_tag = match version {
            SENDER_KEY_STATE_FORMAT_UNTAGGED => None,
            _ => match reader.array::<1>()?[0] {
                0 => None,
                1 => Some(reader.array()?),
                _ => return Err(SenderKeyStateDecodeError::Invalid { detail: "epoch tag marker" }),
            },
        };
        if !reader.bytes.is_empty() {
            return Err(SenderKeyStateDecodeError::TrailingBytes { extra_bytes: reader.bytes.len() });
        }
        Ok(SenderKeyState {
            room_id,
            epoch,
            own_leaf,
            root,
            members,
            sending,
            receiving,
            skipped,
            skipped_order,
            next_order,
            epoch_tag,
        })
    }
}

/// Checks that `frame` is from the member whose identity key (its MLS
/// credential identity) is `member_identity_key`: its `sender_id` is that
/// key's, and its signature verifies under the key.
pub fn verify_sender(frame: &Frame, member_identity_key: &[u8; PUBLIC_KEY_BYTES]) -> Result<(), SenderError> {
    let member_sender = SenderId::from_identity_key(member_identity_key);
    let frame_sender = frame.header().sender_id();
    if frame_sender != member_sender {
        return Err(SenderError::SenderMismatch { frame_sender, member_sender });
    }
    let key = parse_identity_key(member_identity_key)?;
    frame.verify(&key)?;
    Ok(())
}

/// Encrypts `plaintext` as our next message and builds the signed
/// `Application` frame for the state's room and epoch. The sender id is the
/// one of `signing_key`, our identity key.
pub fn seal_application(
    state: &mut SenderKeyState,
    plaintext: &[u8],
    signing_key: &SigningKey,
) -> Result<Frame, SealError> {
    seal_application_with_push(state, plaintext, None, signing_key)
}

/// [`seal_application`] with a push payload (sealed with the epoch's push
/// key, see [`crate::push`]) that the server forwards to members who are not
/// connected. The signature covers it.
pub fn seal_application_with_push(
    state: &mut SenderKeyState,
    plaintext: &[u8],
    push: Option<Bytes>,
    signing_key: &SigningKey,
) -> Result<Frame, SealError> {
    let sender_id = SenderId::from_identity_key(signing_key.verifying_key().as_bytes());
    let sealed = state.encrypt(sender_id, plaintext)?;
    let mut header = FrameHeaderBuf::new(Opcode::Application);
    header.set_room_id(state.room_id()).set_sender_id(sender_id).set_epoch(state.epoch());
    let payload = Application {
        generation: sealed.generation,
        ciphertext: Bytes::from(sealed.ciphertext),
        push,
        epoch_tag: state.epoch_tag(),
    };
    let mut frame = Frame::with_payload(header, &payload)?;
    frame.sign(signing_key);
    Ok(frame)
}

/// Opens an `Application` frame from the member at `sender_leaf` whose
/// identity key is `sender_identity_key`: checks the sender binding and
/// signature ([`verify_sender`]), the room and epoch, then decrypts.
pub fn open_application(
    state: &mut SenderKeyState,
    frame: &Frame,
    sender_leaf: u32,
    sender_identity_key: &[u8; PUBLIC_KEY_BYTES],
) -> Result<Vec<u8>, OpenError> {
    if frame.opcode() != Opcode::Application {
        return Err(OpenError::NotApplication { opcode: frame.opcode() });
    }
    verify_sender(frame, sender_identity_key)?;
    let header = frame.header();
    if header.room_id() != state.room_id() {
        return Err(OpenError::WrongRoom { frame_room: header.room_id(), state_room: state.room_id() });
    }
    if header.epoch() != state.epoch() {
        return Err(OpenError::WrongEpoch { frame_epoch: header.epoch(), state_epoch: state.epoch() });
    }
    let payload: Application = frame.decode_payload()?;
    let plaintext =
        state.decrypt(sender_leaf, header.sender_id(), payload.generation, &payload.ciphertext)?;
    Ok(plaintext)
}

#[cfg(test)]
mod tests {
    use sha2::{Digest, Sha256};

    use super::*;

    const SECRET: [u8; EPOCH_SECRET_BYTES] = [7u8; EPOCH_SECRET_BYTES];
    const ROOM: RoomId = RoomId(*b"unit-test-room-0");

    /// HMAC-SHA256 from the hash alone, independent of the `hmac`/`hkdf` crates.
    fn hmac(key: &[u8], message: &[u8]) -> [u8; 32] {
        assert!(key.len() <= 64);
        let mut padded = [0u8; 64];
        padded[..key.len()].copy_from_slice(key);
        let inner_pad: Vec<u8> = padded.iter().map(|byte| byte ^ 0x36).collect();
        let outer_pad: Vec<u8> = padded.iter().map(|byte| byte ^ 0x5c).collect();
        let inner = Sha256::new().chain_update(&inner_pad).chain_update(message).finalize();
        let outer = Sha256::new().chain_update(&outer_pad).chain_update(inner).finalize();
        outer.into()
    }

    /// HKDF-Expand (RFC 5869 §2.3) from `hmac` above.
    fn expand(prk: &[u8], info: &[u8], len: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut previous: Vec<u8> = Vec::new();
        for counter in 1u8..=255 {
            if out.len() >= len {
                break;
            }
            let mut input = previous.clone();
            input.extend_from_slice(info);
            input.push(counter);
            previous = hmac(prk, &input).to_vec();
            out.extend_from_slice(&previous);
        }
        out.truncate(len);
        out
    }

    #[test]
    fn derivation_matches_the_documented_construction() {
        let prk = hmac(&[0u8; 32], &SECRET);
        assert_eq!(epoch_root(&SECRET).0, prk);

        let leaf: u32 = 0x0102_0304;
        let mut info = b"kalandraSenderV1".to_vec();
        info.extend_from_slice(&[1, 2, 3, 4]);
        let chain_key = expand(&prk, &info, 32);
        let start = chain_start(&epoch_root(&SECRET), leaf);
        assert_eq!(start.0.as_slice(), chain_key.as_slice());

        let generation: u32 = 0x0a0b_0c0d;
        let mut info = b"kalandraStepV1".to_vec();
        info.extend_from_slice(&[0x0a, 0x0b, 0x0c, 0x0d]);
        let okm = expand(&chain_key, &info, 88);
        let (message_key, next) = step(&start, generation);
        assert_eq!(message_key.key.0.as_slice(), &okm[0..32]);
        assert_eq!(message_key.nonce.0.as_slice(), &okm[32..56]);
        assert_eq!(next.0.as_slice(), &okm[56..88]);
    }

    #[test]
    fn a_restored_state_continues_both_chains_and_keeps_replay_protection() {
        let mut alice = SenderKeyState::new(ROOM, 3, &SECRET, 0, [0, 1]);
        let mut bob = SenderKeyState::new(ROOM, 3, &SECRET, 1, [0, 1]);
        let sealed: Vec<Sealed> =
            (0..4).map(|i| alice.encrypt(SenderId(10), format!("m{i}").as_bytes()).unwrap()).collect();
        // Bob reads 0 and 3 (1 and 2 stay as skipped keys), then restarts.
        bob.decrypt(0, SenderId(10), 0, &sealed[0].ciphertext).unwrap();
        bob.decrypt(0, SenderId(10), 3, &sealed[3].ciphertext).unwrap();
        let bytes = bob.to_bytes();
        let mut restored = SenderKeyState::from_bytes(&bytes).unwrap();
        assert_eq!(restored.to_bytes(), bytes);
        assert_eq!(restored.stored_skipped_keys(), 2);
        assert_eq!(restored.decrypt(0, SenderId(10), 2, &sealed[2].ciphertext).unwrap(), b"m2");
        for used in [0, 2, 3] {
            let error = restored.decrypt(0, SenderId(10), used, &sealed[used as usize].ciphertext);
            assert!(matches!(error, Err(DecryptError::Replay { .. })), "{used}: {error:?}");
        }
        // Alice restarts and never reuses a generation.
        let mut alice = SenderKeyState::from_bytes(&alice.to_bytes()).unwrap();
        assert_eq!(alice.encrypt(SenderId(10), b"m4").unwrap().generation, 4);
    }

    #[test]
    fn a_restored_state_keeps_its_epoch_tag_and_the_untagged_format_is_still_read() {
        let mut tagged = SenderKeyState::new(ROOM, 3, &SECRET, 0, [0, 1]);
        tagged.epoch_tag = Some([0x5A; EPOCH_TAG_BYTES]);
        let bytes = tagged.to_bytes();
        assert_eq!(bytes[0], SENDER_KEY_STATE_FORMAT_VERSION);
        assert_eq!(SenderKeyState::from_bytes(&bytes).unwrap().epoch_tag(), Some([0x5A; EPOCH_TAG_BYTES]));
        let untagged = SenderKeyState::new(ROOM, 3, &SECRET, 0, [0, 1]).to_bytes();
        assert_eq!(untagged.last(), Some(&0));
        assert_eq!(SenderKeyState::from_bytes(&untagged).unwrap().epoch_tag(), None);
        // Written before the tag: version 1, no marker.
        let mut version_one = untagged[..untagged.len() - 1].to_vec();
        version_one[0] = SENDER_KEY_STATE_FORMAT_UNTAGGED;
        assert_eq!(SenderKeyState::from_bytes(&version_one).unwrap().epoch_tag(), None);
        let mut bad_marker = untagged;
        *bad_marker.last_mut().unwrap() = 2;
        assert_eq!(
            SenderKeyState::from_bytes(&bad_marker).unwrap_err(),
            SenderKeyStateDecodeError::Invalid { detail: "epoch tag marker" }
        );
    }

    #[test]
    fn damaged_serialized_states_are_refused_with_a_reason() {
        let mut bob = SenderKeyState::new(ROOM, 3, &SECRET, 1, [0, 1]);
        let mut alice = SenderKeyState::new(ROOM, 3, &SECRET, 0, [0, 1]);
        let _ = alice.encrypt(SenderId(10), b"0").unwrap();
        let sealed = alice.encrypt(SenderId(10), b"1").unwrap();
        bob.decrypt(0, SenderId(10), 1, &sealed.ciphertext).unwrap();
        let bytes = bob.to_bytes();
        for len in 0..bytes.len() {
            assert_eq!(
                SenderKeyState::from_bytes(&bytes[..len]).unwrap_err(),
                SenderKeyStateDecodeError::Truncated,
                "{len}"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(
            SenderKeyState::from_bytes(&longer).unwrap_err(),
            SenderKeyStateDecodeError::TrailingBytes { extra_bytes: 1 }
        );
        let mut other_version = bytes.clone();
        other_version[0] = 9;
        assert_eq!(
            SenderKeyState::from_bytes(&other_version).unwrap_err(),
            SenderKeyStateDecodeError::UnknownVersion { version: 9 }
        );
    }

    #[test]
    fn exhausted_sending_chain_refuses_to_encrypt_and_the_last_generation_works() {
        let mut state = SenderKeyState::new(ROOM, 3, &SECRET, 0, [0, 1]);
        state.sending.next = u64::from(GENERATION_MAX);
        let sealed = state.encrypt(SenderId(1), b"last").expect("the last generation is usable");
        assert_eq!(sealed.generation, GENERATION_MAX);
        assert_eq!(state.next_send_generation(), None);
        assert_eq!(state.encrypt(SenderId(1), b"one more"), Err(EncryptError::ChainExhausted));
    }

    #[test]
    fn receiving_chain_at_the_last_generation_rejects_nothing_new() {
        let mut sender = SenderKeyState::new(ROOM, 3, &SECRET, 0, [0, 1]);
        let mut receiver = SenderKeyState::new(ROOM, 3, &SECRET, 1, [0, 1]);
        // Align both chains just below the end without stepping 2^32 times:
        // the receiver's chain key for generation g is the sender's.
        sender.sending.next = u64::from(GENERATION_MAX - 1);
        let receiving_key = sender.sending.key.clone();
        receiver.receiving.insert(
            0,
            ReceivingChain {
                chain: Chain { key: receiving_key, next: u64::from(GENERATION_MAX - 1) },
                oldest_kept: 0,
                stored: 0,
            },
        );
        let first = sender.encrypt(SenderId(9), b"a").expect("encrypt");
        let last = sender.encrypt(SenderId(9), b"b").expect("encrypt");
        assert_eq!(last.generation, GENERATION_MAX);
        assert_eq!(
            receiver.decrypt(0, SenderId(9), last.generation, &last.ciphertext).as_deref(),
            Ok(&b"b"[..])
        );
        assert_eq!(
            receiver.decrypt(0, SenderId(9), first.generation, &first.ciphertext).as_deref(),
            Ok(&b"a"[..])
        );
        assert_eq!(
            receiver.decrypt(0, SenderId(9), last.generation, &last.ciphertext),
            Err(DecryptError::Replay { leaf: 0, generation: GENERATION_MAX })
        );
    }

    #[test]
    fn the_per_sender_count_always_matches_the_store() {
        let mut sender = SenderKeyState::new(ROOM, 3, &SECRET, 0, [0, 1]);
        let mut receiver = SenderKeyState::new(ROOM, 3, &SECRET, 1, [0, 1]);
        let sealed: Vec<Sealed> =
            (0..40).map(|_| sender.encrypt(SenderId(9), b"m").expect("encrypt")).collect();
        for index in [39usize, 5, 17, 0, 38, 20] {
            receiver
                .decrypt(0, SenderId(9), sealed[index].generation, &sealed[index].ciphertext)
                .expect("decrypt");
            let counted = receiver.skipped.range((0, 0)..=(0, u32::MAX)).count();
            assert_eq!(receiver.receiving[&0].stored, counted);
            assert_eq!(receiver.skipped_order.len(), receiver.skipped.len());
        }
        assert_eq!(receiver.stored_skipped_keys(), 39 - 5);
    }
}
