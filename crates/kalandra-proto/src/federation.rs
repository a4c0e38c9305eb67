//! Federation primitives, without I/O: domain names, the keys a domain
//! accepts for a peer (with a rotation overlap), the proofs two servers
//! exchange to authenticate a server-to-server link, home certificates that
//! bind a user's identity key to its home domain, and the relay envelope that
//! carries a client's frame, countersigned by its home domain, to the room's
//! authoritative domain.
//!
//! Every signature here is Ed25519 over a context label and length-prefixed
//! fields (`docs/wire-protocol.md` §10), verified strictly. Nothing here
//! reads a clock: callers pass `now_ms`.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use bytes::Bytes;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::frame::Frame;
use crate::header::Flags;
use crate::ids::SenderId;
use crate::limits::{FRAME_BYTES_MAX, PUBLIC_KEY_BYTES, SIGNATURE_BYTES};
use crate::opcode::Opcode;
use crate::payload::strict_bytes;
use crate::sign::{parse_identity_key, SignatureError};

/// Longest domain name, in bytes (a DNS name).
pub const DOMAIN_NAME_BYTES_MAX: usize = 253;
/// Longest label of a domain name, in bytes.
pub const DOMAIN_LABEL_BYTES_MAX: usize = 63;
/// Keys a domain accepts for one peer at once: the current one and those
/// of a rotation in progress.
pub const PEER_KEYS_MAX: usize = 4;
/// Bytes of each side's link nonce.
pub const LINK_NONCE_BYTES: usize = 32;
/// Bytes of the value that binds a link proof to its TLS connection (a TLS
/// exporter, RFC 5705 / RFC 8446 §7.5, label [`LINK_TLS_EXPORTER_LABEL`]).
pub const LINK_TLS_BINDING_BYTES: usize = 32;
/// The TLS exporter label both ends use for [`LINK_TLS_BINDING_BYTES`].
pub const LINK_TLS_EXPORTER_LABEL: &[u8] = b"EXPORTER-kalandra-federation-link";

/// Context label of link proofs.
pub const LINK_PROOF_CONTEXT: &[u8] = b"kalandra-federation-link-v1";
/// Context label of home certificates.
pub const HOME_CERTIFICATE_CONTEXT: &[u8] = b"kalandra-home-certificate-v1";
/// Context label of countersignatures.
pub const COUNTERSIGNATURE_CONTEXT: &[u8] = b"kalandra-countersignature-v1";

const _: () = assert!(DOMAIN_LABEL_BYTES_MAX < DOMAIN_NAME_BYTES_MAX);
const _: () =
    assert!(DOMAIN_NAME_BYTES_MAX < u8::MAX as usize, "domain names are length-prefixed by one byte");
const _: () = assert!(PEER_KEYS_MAX >= 2, "a rotation needs the old key and the new one");

/// Why a domain name is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainNameError {
    /// Empty, or an empty label (`a..b`, a leading or trailing dot).
    #[error("empty domain name or label")]
    Empty,
    /// Longer than [`DOMAIN_NAME_BYTES_MAX`].
    #[error("domain name of {len_bytes} bytes, limit {DOMAIN_NAME_BYTES_MAX}")]
    TooLong {
        /// Its length.
        len_bytes: usize,
    },
    /// A label longer than [`DOMAIN_LABEL_BYTES_MAX`].
    #[error("domain label of {len_bytes} bytes, limit {DOMAIN_LABEL_BYTES_MAX}")]
    LabelTooLong {
        /// The label's length.
        len_bytes: usize,
    },
    /// A character other than `a`–`z`, `0`–`9`, `-` and `.` (names are
    /// lowercase ASCII; internationalised names travel as A-labels).
    #[error("character {character:?} not allowed in a domain name")]
    BadCharacter {
        /// The character.
        character: char,
    },
    /// A label that begins or ends with `-`.
    #[error("a domain label may not begin or end with '-'")]
    BadHyphen,
}

/// A federation domain's name: a lowercase DNS name (`chat.example.org`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct DomainName(String);

impl DomainName {
    /// Checks `name`.
    pub fn parse(name: &str) -> Result<DomainName, DomainNameError> {
        if name.len() > DOMAIN_NAME_BYTES_MAX {
            return Err(DomainNameError::TooLong { len_bytes: name.len() });
        }
        if let Some(character) =
            name.chars().find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '.'))
        {
            return Err(DomainNameError::BadCharacter { character });
        }
        for label in name.split('.') {
            if label.is_empty() {
                return Err(DomainNameError::Empty);
            }
            if label.len() > DOMAIN_LABEL_BYTES_MAX {
                return Err(DomainNameError::LabelTooLong { len_bytes: label.len() });
            }
            if label.starts_with('-') || label.ends_with('-') {
                return Err(DomainNameError::BadHyphen);
            }
        }
        Ok(DomainName(name.to_owned()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// One length byte, then the name (the form signing inputs use).
    fn put_prefixed(&self, out: &mut Vec<u8>) {
        // `parse` bounds the length below 256.
        out.push(u8::try_from(self.0.len()).unwrap_or(u8::MAX));
        out.extend_from_slice(self.0.as_bytes());
    }
}

impl std::fmt::Display for DomainName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for DomainName {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        DomainName::parse(&name).map_err(serde::de::Error::custom)
    }
}

/// Why a peer's keys are not acceptable (the operator's configuration).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerKeysError {
    /// No key, or more than [`PEER_KEYS_MAX`], for a peer.
    #[error("peer {domain}: {count} keys, expected 1 to {PEER_KEYS_MAX}")]
    KeyCount {
        /// The peer.
        domain: DomainName,
        /// Keys given.
        count: usize,
    },
    /// A weak (small-order) Ed25519 key.
    #[error("peer {domain}: weak Ed25519 key")]
    WeakKey {
        /// The peer.
        domain: DomainName,
    },
}

/// Why a peer's link proof was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// The peer claims a domain other than the one expected.
    #[error("expected domain {expected}, the peer says {claimed}")]
    WrongDomain {
        /// The domain expected.
        expected: DomainName,
        /// The domain claimed.
        claimed: DomainName,
    },
    /// The key is not (or no longer) one this domain accepts for the peer.
    #[error("key not accepted for {domain} at this time")]
    KeyNotAccepted {
        /// The peer.
        domain: DomainName,
    },
    /// The proof does not verify.
    #[error("link proof of {domain} does not verify")]
    BadLinkProof {
        /// The peer.
        domain: DomainName,
    },
}

/// Why a home certificate was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HomeCertificateError {
    /// Checked against another domain's keys than its own.
    #[error("certificate of {claimed}, checked as {expected}'s")]
    WrongDomain {
        /// The domain whose keys were given.
        expected: DomainName,
        /// The certificate's domain.
        claimed: DomainName,
    },
    /// Past its end.
    #[error("home certificate expired at {not_after_ms} ms")]
    Expired {
        /// Its end.
        not_after_ms: u64,
    },
    /// The certified identity key is not a valid Ed25519 key.
    #[error("certified identity key is not a valid Ed25519 key")]
    BadIdentityKey,
    /// The signature does not verify under the domain's keys.
    #[error("home certificate does not verify under {domain}'s keys")]
    BadSignature {
        /// Its domain.
        domain: DomainName,
    },
}

/// Why a relayed frame was refused. Each is the relaying domain's doing
/// (or its client's, for [`RelayError::ClientSignature`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RelayError {
    /// The frame comes from a domain other than the link's peer.
    #[error("frame relayed over the link from {link} claims origin {claimed}")]
    OriginMismatch {
        /// The link's authenticated peer.
        link: DomainName,
        /// The origin claimed.
        claimed: DomainName,
    },
    /// The frame is for another domain.
    #[error("frame relayed for {destination}, not for this domain")]
    WrongDestination {
        /// The destination named.
        destination: DomainName,
    },
    /// At or below the last relay sequence number accepted from its
    /// origin: a replay, or reordered.
    #[error("relay sequence {sequence} not above the last accepted, {last}")]
    Replayed {
        /// The frame's relay sequence number.
        sequence: u64,
        /// The last accepted.
        last: u64,
    },
    /// The relayed bytes are not one frame.
    #[error("relayed bytes are not a frame: {0}")]
    MalformedFrame(String),
    /// The frame lacks the `COUNTERSIGNED` flag.
    #[error("relayed frame is not flagged countersigned")]
    NotCountersigned,
    /// The countersignature does not verify under the origin's keys.
    #[error("countersignature does not verify under {origin}'s keys")]
    BadCountersignature {
        /// The origin.
        origin: DomainName,
    },
    /// The frame's user is not a user of the origin domain: a domain
    /// speaking for another domain's user.
    #[error("{origin} relays a frame of a user homed at {home}")]
    ForeignUser {
        /// The relaying domain.
        origin: DomainName,
        /// The user's home, by its certificate.
        home: DomainName,
    },
    /// The sender's home certificate is not valid.
    #[error("the sender's home certificate: {0}")]
    HomeCertificate(HomeCertificateError),
    /// The frame's sender id is not the certified identity key's.
    #[error("sender {header} is not the certified key's sender {certified}")]
    SenderMismatch {
        /// The header's sender id.
        header: SenderId,
        /// The certificate's.
        certified: SenderId,
    },
    /// The client's own signature does not verify.
    #[error("the client's signature: {0}")]
    ClientSignature(SignatureError),
}

/// A key a domain accepts for a peer, until `valid_until_ms` if set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerKey {
    /// The peer's federation key.
    pub key: VerifyingKey,
    /// End of its acceptance (exclusive), ms since the Unix epoch.
    pub valid_until_ms: Option<u64>,
}

/// The keys a domain accepts for one peer domain. During a rotation the
/// operator lists the new key beside the old one, and ends the old one's
/// acceptance at the end of the overlap: the peer switches keys whenever
/// it likes within it, and nothing needs a restart at that moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerKeys {
    domain: DomainName,
    keys: Vec<PeerKey>,
}

impl PeerKeys {
    /// The keys for `domain`: 1 to [`PEER_KEYS_MAX`].
    pub fn new(domain: DomainName, keys: Vec<PeerKey>) -> Result<PeerKeys, PeerKeysError> {
        if keys.is_empty() || keys.len() > PEER_KEYS_MAX {
            return Err(PeerKeysError::KeyCount { domain, count: keys.len() });
        }
        if keys.iter().any(|k| k.key.is_weak()) {
            return Err(PeerKeysError::WeakKey { domain });
        }
        Ok(PeerKeys { domain, keys })
    }

    /// The peer's domain.
    pub fn domain(&self) -> &DomainName {
        &self.domain
    }

    /// Every key listed, with the end of its acceptance.
    pub fn keys(&self) -> &[PeerKey] {
        &self.keys
    }

    /// The keys accepted at `now_ms`.
    pub fn accepted(&self, now_ms: u64) -> impl Iterator<Item = &VerifyingKey> {
        self.keys.iter().filter(move |k| k.valid_until_ms.is_none_or(|end| now_ms < end)).map(|k| &k.key)
    }

    /// `key` if it is accepted at `now_ms`.
    pub fn accept(&self, key: &[u8; PUBLIC_KEY_BYTES], now_ms: u64) -> Option<VerifyingKey> {
        self.accepted(now_ms).find(|accepted| accepted.as_bytes() == key).copied()
    }

    /// Whether `signature` over `input` verifies under a key accepted at `now_ms`.
    fn verifies(&self, input: &[u8], signature: &[u8; SIGNATURE_BYTES], now_ms: u64) -> bool {
        self.verifying_key(input, signature, now_ms).is_some()
    }

    /// The key accepted at `now_ms` under which `signature` over `input` verifies.
    fn verifying_key(
        &self,
        input: &[u8],
        signature: &[u8; SIGNATURE_BYTES],
        now_ms: u64,
    ) -> Option<&VerifyingKey> {
        let signature = Signature::from_bytes(signature);
        self.accepted(now_ms).find(|key| key.verify_strict(input, &signature).is_ok())
    }
}

/// What each end of a server-to-server link says first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkHello {
    /// The sender's domain.
    pub domain: DomainName,
    /// The federation key it will prove.
    #[serde(serialize_with = "serde_bytes::serialize", deserialize_with = "strict_bytes::required")]
    pub federation_key: [u8; PUBLIC_KEY_BYTES],
    /// Fresh randomness.
    #[serde(serialize_with = "serde_bytes::serialize", deserialize_with = "strict_bytes::required")]
    pub nonce: [u8; LINK_NONCE_BYTES],
}

/// Which end of a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkRole {
    /// The end that connected.
    Initiator,
    /// The end that accepted.
    Responder,
}

/// The input a link proof signs: the context, the prover's role, both
/// hellos (domain, key, nonce; the initiator's first) and the TLS binding.
/// Binding both nonces and the TLS connection means a proof cannot be
/// replayed, nor relayed into another connection.
pub fn link_proof_input(
    initiator: &LinkHello,
    responder: &LinkHello,
    tls_binding: &[u8; LINK_TLS_BINDING_BYTES],
    prover: LinkRole,
) -> Vec<u8> {
    let hello_bytes_max = 1 + DOMAIN_NAME_BYTES_MAX + PUBLIC_KEY_BYTES + LINK_NONCE_BYTES;
    let mut input =
        Vec::with_capacity(LINK_PROOF_CONTEXT.len() + 1 + 2 * hello_bytes_max + LINK_TLS_BINDING_BYTES);
    input.extend_from_slice(LINK_PROOF_CONTEXT);
    input.push(match prover {
        LinkRole::Initiator => 0,
        LinkRole::Responder => 1,
    });
    for hello in [initiator, responder] {
        hello.domain.put_prefixed(&mut input);
        input.extend_from_slice(&hello.federation_key);
        input.extend_from_slice(&hello.nonce);
    }
    input.extend_from_slice(tls_binding);
    input
}

/// Signs our link proof as `prover`.
pub fn sign_link_proof(
    key: &SigningKey,
    initiator: &LinkHello,
    responder: &LinkHello,
    tls_binding: &[u8; LINK_TLS_BINDING_BYTES],
    prover: LinkRole,
) -> [u8; SIGNATURE_BYTES] {
    key.sign(&link_proof_input(initiator, responder, tls_binding, prover)).to_bytes()
}

/// Verifies the peer's link proof (the peer being `peer_role`): its hello
/// names the expected domain and a key accepted at `now_ms`, and the proof
/// verifies under that key. Returns the key the peer proved.
pub fn verify_link_proof(
    expected: &PeerKeys,
    initiator: &LinkHello,
    responder: &LinkHello,
    tls_binding: &[u8; LINK_TLS_BINDING_BYTES],
    peer_role: LinkRole,
    signature: &[u8; SIGNATURE_BYTES],
    now_ms: u64,
) -> Result<VerifyingKey, LinkError> {
    let peer = match peer_role {
        LinkRole::Initiator => initiator,
        LinkRole::Responder => responder,
    };
    if peer.domain != expected.domain {
        return Err(LinkError::WrongDomain {
            expected: expected.domain.clone(),
            claimed: peer.domain.clone(),
        });
    }
    let key = expected
        .accept(&peer.federation_key, now_ms)
        .ok_or_else(|| LinkError::KeyNotAccepted { domain: expected.domain.clone() })?;
    let input = link_proof_input(initiator, responder, tls_binding, peer_role);
    key.verify_strict(&input, &Signature::from_bytes(signature))
        .map_err(|_| LinkError::BadLinkProof { domain: expected.domain.clone() })?;
    Ok(key)
}

/// A home domain's statement that an identity key is one of its users'
/// until `not_after_ms`. Every server and member can check it with the
/// domain's federation key; only that domain can issue it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HomeCertificate {
    /// The user's home domain.
    pub domain: DomainName,
    /// The user's identity key.
    #[serde(serialize_with = "serde_bytes::serialize", deserialize_with = "strict_bytes::required")]
    pub identity_key: [u8; PUBLIC_KEY_BYTES],
    /// End of validity (exclusive), ms since the Unix epoch.
    pub not_after_ms: u64,
    /// The domain's signature.
    #[serde(serialize_with = "serde_bytes::serialize", deserialize_with = "strict_bytes::required")]
    pub signature: [u8; SIGNATURE_BYTES],
}

impl HomeCertificate {
    fn signing_input(
        domain: &DomainName,
        identity_key: &[u8; PUBLIC_KEY_BYTES],
        not_after_ms: u64,
    ) -> Vec<u8> {
        let mut input = Vec::with_capacity(
            HOME_CERTIFICATE_CONTEXT.len() + 1 + DOMAIN_NAME_BYTES_MAX + PUBLIC_KEY_BYTES + 8,
        );
        input.extend_from_slice(HOME_CERTIFICATE_CONTEXT);
        domain.put_prefixed(&mut input);
        input.extend_from_slice(identity_key);
        input.extend_from_slice(&not_after_ms.to_be_bytes());
        input
    }

    /// Issues a certificate for `identity_key` as `domain`, whose federation key is `key`.
    pub fn issue(
        key: &SigningKey,
        domain: DomainName,
        identity_key: [u8; PUBLIC_KEY_BYTES],
        not_after_ms: u64,
    ) -> HomeCertificate {
        let signature = key.sign(&Self::signing_input(&domain, &identity_key, not_after_ms)).to_bytes();
        HomeCertificate { domain, identity_key, not_after_ms, signature }
    }

    /// Checks the certificate against its domain's keys at `now_ms`; returns
    /// the certified user's sender id.
    pub fn verify(&self, home: &PeerKeys, now_ms: u64) -> Result<SenderId, HomeCertificateError> {
        self.verify_once(home, now_ms, None)
    }

    /// As [`HomeCertificate::verify`], but a certificate `verified` holds
    /// (checked before under a key `home` still accepts at `now_ms`) is not
    /// verified again, and one that verifies is added to it.
    pub fn verify_once(
        &self,
        home: &PeerKeys,
        now_ms: u64,
        verified: Option<&Mutex<VerifiedCertificates>>,
    ) -> Result<SenderId, HomeCertificateError> {
        self.check_fields(home, Some(now_ms))?;
        let sender = SenderId::from_identity_key(&self.identity_key);
        let Some(verified) = verified else {
            return self.check_signature(home, now_ms).map(|_| sender);
        };
        // The lock is not held while verifying: concurrent checks of one
        // peer's frames verify in parallel.
        if lock_set(verified).holds(self, home, now_ms) {
            return Ok(sender);
        }
        let key = self.check_signature(home, now_ms)?;
        lock_set(verified).insert(self, key, now_ms);
        Ok(sender)
    }

    /// Checks that the certificate is `home`'s (its domain, a valid
    /// identity key, a signature under a key `home` accepts at `now_ms`),
    /// whatever its end of validity: what a member checks of a leaf that
    /// may have been added long ago ([`crate::home::check_member_home`]).
    pub fn verify_signature(&self, home: &PeerKeys, now_ms: u64) -> Result<(), HomeCertificateError> {
        self.check_fields(home, None)?;
        self.check_signature(home, now_ms).map(|_| ())
    }

    fn check_signature(
        &self,
        home: &PeerKeys,
        now_ms: u64,
    ) -> Result<[u8; PUBLIC_KEY_BYTES], HomeCertificateError> {
        let input = Self::signing_input(&self.domain, &self.identity_key, self.not_after_ms);
        match home.verifying_key(&input, &self.signature, now_ms) {
            Some(key) => Ok(key.to_bytes()),
            None => Err(HomeCertificateError::BadSignature { domain: self.domain.clone() }),
        }
    }

    /// Its domain is `home`'s, it has not ended at `now_ms` (when given),
    /// and its identity key is a key.
    fn check_fields(&self, home: &PeerKeys, now_ms: Option<u64>) -> Result<(), HomeCertificateError> {
        if self.domain != *home.domain() {
            return Err(HomeCertificateError::WrongDomain {
                expected: home.domain().clone(),
                claimed: self.domain.clone(),
            });
        }
        if now_ms.is_some_and(|now_ms| now_ms >= self.not_after_ms) {
            return Err(HomeCertificateError::Expired { not_after_ms: self.not_after_ms });
        }
        parse_identity_key(&self.identity_key).map_err(|_| HomeCertificateError::BadIdentityKey)?;
        Ok(())
    }
}

/// Home certificates of one peer domain already verified, so that the
/// authority of a room checks a user's certificate once, not once per
/// frame that user sends. An entry counts only for the very same
/// certificate, before its end of validity, and while the peer key it
/// verified under is still accepted (a rotation that ends a key ends its
/// entries). At most [`VERIFIED_CERTIFICATES_MAX`] entries: when full,
/// expired entries go, and if none had, all go (the next frames are
/// verified again; a peer cannot grow it).
#[derive(Debug, Default)]
pub struct VerifiedCertificates {
    /// Certificate signature → what it was verified for.
    entries: HashMap<[u8; SIGNATURE_BYTES], VerifiedCertificate>,
}

#[derive(Debug)]
struct VerifiedCertificate {
    identity_key: [u8; PUBLIC_KEY_BYTES],
    not_after_ms: u64,
    peer_key: [u8; PUBLIC_KEY_BYTES],
}

fn lock_set(set: &Mutex<VerifiedCertificates>) -> std::sync::MutexGuard<'_, VerifiedCertificates> {
    // Every update leaves the set consistent: a panic elsewhere cannot break it.
    set.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Entries of one [`VerifiedCertificates`].
pub const VERIFIED_CERTIFICATES_MAX: usize = 16_384;
/// Bytes of one entry's fields (the map adds its own overhead).
pub const VERIFIED_CERTIFICATE_BYTES: usize = SIGNATURE_BYTES + 2 * PUBLIC_KEY_BYTES + 8;

const _: () = assert!(
    VERIFIED_CERTIFICATES_MAX * VERIFIED_CERTIFICATE_BYTES <= 4 * 1024 * 1024,
    "a peer's verified certificates take at most a few MiB"
);

impl VerifiedCertificates {
    /// An empty set.
    pub fn new() -> VerifiedCertificates {
        VerifiedCertificates::default()
    }

    /// Certificates held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether `certificate` (its domain and validity already checked) was
    /// verified under a key `home` still accepts at `now_ms`.
    fn holds(&self, certificate: &HomeCertificate, home: &PeerKeys, now_ms: u64) -> bool {
        self.entries.get(&certificate.signature).is_some_and(|entry| {
            entry.identity_key == certificate.identity_key
                && entry.not_after_ms == certificate.not_after_ms
                && home.accept(&entry.peer_key, now_ms).is_some()
        })
    }

    fn insert(&mut self, certificate: &HomeCertificate, peer_key: [u8; PUBLIC_KEY_BYTES], now_ms: u64) {
        if self.entries.len() >= VERIFIED_CERTIFICATES_MAX {
            self.entries.retain(|_, entry| now_ms < entry.not_after_ms);
            if self.entries.len() >= VERIFIED_CERTIFICATES_MAX {
                self.entries.clear();
            }
        }
        let entry = VerifiedCertificate {
            identity_key: certificate.identity_key,
            not_after_ms: certificate.not_after_ms,
            peer_key,
        };
        self.entries.insert(certificate.signature, entry);
        assert!(self.entries.len() <= VERIFIED_CERTIFICATES_MAX, "verified certificates stay bounded");
    }
}

/// A client's frame on its way from its home domain (`origin`) to the
/// room's authoritative domain (`destination`), countersigned by the origin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayEnvelope {
    /// The relaying domain, the sender's home.
    pub origin: DomainName,
    /// The domain it is relayed to.
    pub destination: DomainName,
    /// The origin's sequence number for frames it relays to `destination`:
    /// strictly increasing, so a replayed or reordered envelope is refused.
    pub relay_sequence: u64,
    /// The sender's home certificate, issued by `origin`.
    pub home_certificate: HomeCertificate,
    /// The client's frame, as the client signed it, with the `COUNTERSIGNED` flag set.
    #[serde(serialize_with = "serde_bytes::serialize", deserialize_with = "strict_bytes::required")]
    pub frame: Vec<u8>,
    /// The origin's countersignature.
    #[serde(serialize_with = "serde_bytes::serialize", deserialize_with = "strict_bytes::required")]
    pub countersignature: [u8; SIGNATURE_BYTES],
}

fn countersignature_input(
    origin: &DomainName,
    destination: &DomainName,
    relay_sequence: u64,
    certificate: &HomeCertificate,
    frame: &[u8],
) -> Vec<u8> {
    let fixed_bytes = 2 * (1 + DOMAIN_NAME_BYTES_MAX) + 8 + PUBLIC_KEY_BYTES + SIGNATURE_BYTES;
    let mut input = Vec::with_capacity(COUNTERSIGNATURE_CONTEXT.len() + fixed_bytes + frame.len());
    input.extend_from_slice(COUNTERSIGNATURE_CONTEXT);
    origin.put_prefixed(&mut input);
    destination.put_prefixed(&mut input);
    input.extend_from_slice(&relay_sequence.to_be_bytes());
    input.extend_from_slice(&certificate.identity_key);
    input.extend_from_slice(&certificate.signature);
    input.extend_from_slice(frame);
    input
}

impl RelayEnvelope {
    /// The origin's side: flags `frame` countersigned (the client's
    /// signature does not cover that bit) and countersigns the whole frame
    /// with the origin's federation key. The origin has checked the
    /// client's signature and that `certificate` is its own user's.
    pub fn countersign(
        key: &SigningKey,
        origin: DomainName,
        destination: DomainName,
        relay_sequence: u64,
        certificate: HomeCertificate,
        mut frame: Frame,
    ) -> RelayEnvelope {
        let signed = frame.header().flags().contains(Flags::SIGNED);
        frame.header_mut().set_signature_flags(signed, true);
        let frame = frame.to_bytes().to_vec();
        let input = countersignature_input(&origin, &destination, relay_sequence, &certificate, &frame);
        let countersignature = key.sign(&input).to_bytes();
        RelayEnvelope {
            origin,
            destination,
            relay_sequence,
            home_certificate: certificate,
            frame,
            countersignature,
        }
    }

    /// The destination's side, for an envelope received over the link
    /// authenticated as `link_peer` (whose keys are `origin_keys`): origin
    /// and destination, the relay sequence (above `last_sequence`), the
    /// countersignature, the home certificate (issued by the origin for its
    /// own user), the sender id and the client's signature. Membership and
    /// everything else a local frame is checked for remain the caller's.
    pub fn verify(
        &self,
        link_peer: &PeerKeys,
        us: &DomainName,
        last_sequence: Option<u64>,
        now_ms: u64,
    ) -> Result<Frame, RelayError> {
        self.verify_with(link_peer, us, last_sequence, now_ms, None)
    }

    /// As [`RelayEnvelope::verify`], with the origin's certificates already
    /// verified (see [`HomeCertificate::verify_once`]).
    pub fn verify_with(
        &self,
        link_peer: &PeerKeys,
        us: &DomainName,
        last_sequence: Option<u64>,
        now_ms: u64,
        verified: Option<&Mutex<VerifiedCertificates>>,
    ) -> Result<Frame, RelayError> {
        if self.origin != *link_peer.domain() {
            return Err(RelayError::OriginMismatch {
                link: link_peer.domain().clone(),
                claimed: self.origin.clone(),
            });
        }
        if self.destination != *us {
            return Err(RelayError::WrongDestination { destination: self.destination.clone() });
        }
        self.check_sequence(last_sequence)?;
        let frame = self.frame_checked()?;
        let input = countersignature_input(
            &self.origin,
            &self.destination,
            self.relay_sequence,
            &self.home_certificate,
            &self.frame,
        );
        if !link_peer.verifies(&input, &self.countersignature, now_ms) {
            return Err(RelayError::BadCountersignature { origin: self.origin.clone() });
        }
        self.check_sender(&frame, link_peer, now_ms, verified)?;
        Ok(frame)
    }

    /// The relay sequence must be above `last_sequence`, the last one
    /// accepted from the origin: a replayed or reordered envelope is refused.
    pub fn check_sequence(&self, last_sequence: Option<u64>) -> Result<(), RelayError> {
        match last_sequence.filter(|last| self.relay_sequence <= *last) {
            Some(last) => Err(RelayError::Replayed { sequence: self.relay_sequence, last }),
            None => Ok(()),
        }
    }

    fn frame_checked(&self) -> Result<Frame, RelayError> {
        if self.frame.len() > FRAME_BYTES_MAX {
            return Err(RelayError::MalformedFrame(format!("{} bytes", self.frame.len())));
        }
        let bytes = Bytes::copy_from_slice(&self.frame);
        let frame = Frame::decode(&bytes).map_err(|e| RelayError::MalformedFrame(e.to_string()))?;
        if frame.encoded_len() != self.frame.len() {
            return Err(RelayError::MalformedFrame("bytes follow the frame".into()));
        }
        if !frame.header().flags().contains(Flags::COUNTERSIGNED) {
            return Err(RelayError::NotCountersigned);
        }
        Ok(frame)
    }

    fn check_sender(
        &self,
        frame: &Frame,
        origin: &PeerKeys,
        now_ms: u64,
        verified: Option<&Mutex<VerifiedCertificates>>,
    ) -> Result<(), RelayError> {
        let certificate = &self.home_certificate;
        if certificate.domain != self.origin {
            return Err(RelayError::ForeignUser {
                origin: self.origin.clone(),
                home: certificate.domain.clone(),
            });
        }
        let certified =
            certificate.verify_once(origin, now_ms, verified).map_err(RelayError::HomeCertificate)?;
        let header = frame.header().sender_id();
        if header != certified {
            return Err(RelayError::SenderMismatch { header, certified });
        }
        let key = parse_identity_key(&certificate.identity_key)
            .map_err(|_| RelayError::HomeCertificate(HomeCertificateError::BadIdentityKey))?;
        // As for a local connection (§4): a signed frame's signature is
        // checked except an Application's (its readers verify it); an
        // unsigned control frame is vouched for by the countersignature.
        if !frame.header().flags().contains(Flags::SIGNED) || frame.opcode() == Opcode::Application {
            return Ok(());
        }
        frame.verify(&key).map_err(RelayError::ClientSignature)
    }
}
