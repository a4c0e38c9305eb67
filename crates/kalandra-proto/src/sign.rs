//! Frame signatures (Ed25519) and the authentication challenge.
//!
//! The signing input is the header's first 64 bytes with the fields a server
//! assigns or changes zeroed — log index (bytes 40..48), server timestamp
//! (bytes 56..64) and the `COUNTERSIGNED` flag bit — followed by the whole
//! payload. Verification is strict (`verify_strict`: canonical signatures, no
//! small-order keys).

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

use crate::frame::Frame;
use crate::header::{offset, Flags, SIGNED_HEADER_BYTES};
use crate::limits::{AUTH_NONCE_BYTES, HEADER_BYTES, PUBLIC_KEY_BYTES};

/// Context prefix of the authentication challenge signature.
pub const AUTH_CONTEXT: &[u8] = b"kalandra-auth-v1";

/// Why a signature did not verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The frame's `SIGNED` flag is not set.
    #[error("frame is not signed")]
    NotSigned,
    /// The public key is not a valid Ed25519 key.
    #[error("invalid public key")]
    BadKey,
    /// The signature does not verify under the key.
    #[error("signature does not verify")]
    Invalid,
    /// Batch inputs differ in length.
    #[error("{frames} frames but {keys} keys")]
    BatchLengthMismatch {
        /// Frames given.
        frames: usize,
        /// Keys given.
        keys: usize,
    },
}

/// The signed part of a header: bytes 0..64 with the server-assigned fields zeroed.
pub fn signed_header_bytes(header: &[u8; HEADER_BYTES]) -> [u8; SIGNED_HEADER_BYTES] {
    let mut signed = [0u8; SIGNED_HEADER_BYTES];
    signed.copy_from_slice(&header[..SIGNED_HEADER_BYTES]);
    signed[offset::FLAGS] &= !Flags::COUNTERSIGNED.bits();
    signed[offset::LOG_INDEX..offset::LOG_INDEX + 8].fill(0);
    signed[offset::SERVER_TIMESTAMP..offset::SERVER_TIMESTAMP + 8].fill(0);
    signed
}

/// The full signing input of a frame: signed header bytes followed by the payload.
pub fn signing_input(frame: &Frame) -> Vec<u8> {
    let mut input = Vec::with_capacity(SIGNED_HEADER_BYTES + frame.payload().len());
    input.extend_from_slice(&signed_header_bytes(frame.header().as_bytes()));
    input.extend_from_slice(frame.payload());
    input
}

impl Frame {
    /// Sets the `SIGNED` flag and signs the frame with `key`.
    pub fn sign(&mut self, key: &SigningKey) {
        let countersigned = self.header().flags().contains(Flags::COUNTERSIGNED);
        self.header_mut().set_signature_flags(true, countersigned);
        let signature = key.sign(&signing_input(self));
        self.header_mut().set_signature(&signature.to_bytes());
    }

    /// Verifies the frame's signature strictly against `key`.
    pub fn verify(&self, key: &VerifyingKey) -> Result<(), SignatureError> {
        if !self.header().flags().contains(Flags::SIGNED) {
            return Err(SignatureError::NotSigned);
        }
        let signature = Signature::from_bytes(self.header().signature());
        key.verify_strict(&signing_input(self), &signature).map_err(|_| SignatureError::Invalid)
    }
}

/// Verifies many frames at once (each against its own key); faster than one
/// by one, but it only says whether *all* verify.
///
/// Batch verification is not strict, so weak (small-order) keys are refused
/// first; keys should be validated when they are registered as well.
pub fn verify_batch(frames: &[&Frame], keys: &[VerifyingKey]) -> Result<(), SignatureError> {
    if frames.len() != keys.len() {
        return Err(SignatureError::BatchLengthMismatch { frames: frames.len(), keys: keys.len() });
    }
    if keys.iter().any(VerifyingKey::is_weak) {
        return Err(SignatureError::BadKey);
    }
    let mut inputs = Vec::with_capacity(frames.len());
    let mut signatures = Vec::with_capacity(frames.len());
    for frame in frames {
        if !frame.header().flags().contains(Flags::SIGNED) {
            return Err(SignatureError::NotSigned);
        }
        inputs.push(signing_input(frame));
        signatures.push(Signature::from_bytes(frame.header().signature()));
    }
    let messages: Vec<&[u8]> = inputs.iter().map(Vec::as_slice).collect();
    ed25519_dalek::verify_batch(&messages, &signatures, keys).map_err(|_| SignatureError::Invalid)
}

/// Parses an Ed25519 public key, refusing weak (small-order) keys.
pub fn parse_identity_key(bytes: &[u8; PUBLIC_KEY_BYTES]) -> Result<VerifyingKey, SignatureError> {
    let key = VerifyingKey::from_bytes(bytes).map_err(|_| SignatureError::BadKey)?;
    if key.is_weak() {
        return Err(SignatureError::BadKey);
    }
    Ok(key)
}

fn auth_input(nonce: &[u8; AUTH_NONCE_BYTES], identity_key: &[u8; PUBLIC_KEY_BYTES]) -> Vec<u8> {
    let mut input = Vec::with_capacity(AUTH_CONTEXT.len() + AUTH_NONCE_BYTES + PUBLIC_KEY_BYTES);
    input.extend_from_slice(AUTH_CONTEXT);
    input.extend_from_slice(nonce);
    input.extend_from_slice(identity_key);
    input
}

/// Signs an authentication challenge: Ed25519 over `AUTH_CONTEXT || nonce || identity_key`.
pub fn sign_auth_challenge(key: &SigningKey, nonce: &[u8; AUTH_NONCE_BYTES]) -> [u8; 64] {
    key.sign(&auth_input(nonce, key.verifying_key().as_bytes())).to_bytes()
}

/// Verifies an authentication response strictly.
pub fn verify_auth_response(
    identity_key: &VerifyingKey,
    nonce: &[u8; AUTH_NONCE_BYTES],
    signature: &[u8; 64],
) -> Result<(), SignatureError> {
    let input = auth_input(nonce, identity_key.as_bytes());
    identity_key.verify_strict(&input, &Signature::from_bytes(signature)).map_err(|_| SignatureError::Invalid)
}
