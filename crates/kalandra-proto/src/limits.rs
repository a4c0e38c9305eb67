//! Every size and count the wire protocol bounds, in one place.
//!
//! The server may configure *lower* limits than these; it may never accept
//! more. Relations between limits are checked at compile time below.

/// Size of the fixed frame header in bytes.
pub const HEADER_BYTES: usize = 128;

/// Largest payload any frame may carry (8 MiB).
///
/// Sized for MLS handshake traffic in large rooms: FACTS.md measured an add
/// commit for 10,000 members at 821 KB and its ratchet tree at 1.8 MB; a
/// GroupInfo with the tree, or a commit with its Welcome, must fit.
pub const PAYLOAD_BYTES_MAX: u32 = 8 * 1024 * 1024;

/// Largest payload of an application message (sender-key ciphertext), 256 KiB.
/// Larger content (attachments) travels out of band.
pub const APPLICATION_PAYLOAD_BYTES_MAX: u32 = 256 * 1024;

/// Largest payload of an ephemeral message (typing, presence), 4 KiB.
pub const EPHEMERAL_PAYLOAD_BYTES_MAX: u32 = 4 * 1024;

/// Largest payload of a session control frame (hello, auth, ping, error,
/// goodbye, acknowledgement, subscribe), 16 KiB.
pub const CONTROL_PAYLOAD_BYTES_MAX: u32 = 16 * 1024;

/// Largest encoded frame (header plus payload).
pub const FRAME_BYTES_MAX: usize = HEADER_BYTES + PAYLOAD_BYTES_MAX as usize;

/// Largest push-notification payload an `Application` frame may carry
/// (a sealed push: 65 bytes of framing plus at most 2,048 of plaintext;
/// it must fit an APNs payload once base64-encoded).
pub const PUSH_PAYLOAD_BYTES_MAX: usize = 2113;

/// Bytes of an `Application` payload's `epoch_tag` ([`crate::epoch_tag`]).
pub const EPOCH_TAG_BYTES: usize = 8;

/// Most key packages one upload may carry.
pub const KEY_PACKAGES_PER_UPLOAD_MAX: usize = 256;

/// Most key packages one claim may ask for (one per device of one user).
pub const KEY_PACKAGES_PER_CLAIM_MAX: u32 = 64;

/// Most frames one sync request may ask for.
pub const SYNC_FRAMES_PER_REQUEST_MAX: u32 = 4096;

/// Most Welcome recipients one commit may name.
pub const WELCOME_RECIPIENTS_MAX: usize = 10_000;

/// How long after a commit's server timestamp the server may still void it
/// when members report that they cannot process it (`CommitReport`), ms.
/// A frame stamped at or after `commit time + COMMIT_VOID_WINDOW_MS`, or a
/// later commit, settles the commit: no `CommitVoided` for it can follow.
pub const COMMIT_VOID_WINDOW_MS: u64 = 5_000;

/// Most reporters a `CommitVoided` names: the reports that made its
/// quorum, in the order they came (a larger quorum lists its first ones).
pub const COMMIT_VOID_REPORTERS_MAX: usize = 16_384;

/// Longest human-readable text (error messages, reasons, client names), bytes.
pub const TEXT_BYTES_MAX: usize = 1024;

/// Most protocol versions a client may offer in `Hello`.
pub const VERSIONS_OFFERED_MAX: usize = 16;

/// Length of an authentication challenge nonce in bytes.
pub const AUTH_NONCE_BYTES: usize = 32;

/// Length of an Ed25519 public key in bytes.
pub const PUBLIC_KEY_BYTES: usize = 32;

/// Length of an Ed25519 signature in bytes.
pub const SIGNATURE_BYTES: usize = 64;

const _: () = assert!(HEADER_BYTES == 128);
const _: () = assert!(APPLICATION_PAYLOAD_BYTES_MAX <= PAYLOAD_BYTES_MAX);
const _: () = assert!(EPHEMERAL_PAYLOAD_BYTES_MAX <= APPLICATION_PAYLOAD_BYTES_MAX);
const _: () = assert!(CONTROL_PAYLOAD_BYTES_MAX <= PAYLOAD_BYTES_MAX);
const _: () = assert!(PUSH_PAYLOAD_BYTES_MAX < APPLICATION_PAYLOAD_BYTES_MAX as usize / 16);
const _: () = assert!(CONTROL_PAYLOAD_BYTES_MAX as usize > 4 * TEXT_BYTES_MAX);
// A `CommitVoided` naming the most reporters (a map head, three keys, and
// at most 9 bytes per reporter id) fits its opcode's limit.
const _: () = assert!(64 + 9 * COMMIT_VOID_REPORTERS_MAX < APPLICATION_PAYLOAD_BYTES_MAX as usize);
// A maximal frame must be addressable by the 32-bit length field.
const _: () = assert!((FRAME_BYTES_MAX as u64) < u32::MAX as u64);
