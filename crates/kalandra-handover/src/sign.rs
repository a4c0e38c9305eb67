//! Signatures of authority records, behind two small traits so that the
//! model checker can use a cheap deterministic signer; [`Ed25519Signer`] and
//! [`Ed25519Directory`] are what servers use.

use std::collections::BTreeMap;
use std::fmt;

use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};

use crate::ids::DomainId;

/// Domains a federation directory holds at most.
pub const FEDERATION_DOMAINS_MAX: usize = 4_096;

/// A 64-byte signature (Ed25519 in production).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Signature(pub [u8; 64]);

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sig(")?;
        for byte in &self.0[..4] {
            write!(f, "{byte:02x}")?;
        }
        write!(f, "..)")
    }
}

/// This domain's federation signing key.
pub trait Signer {
    /// The domain whose key this is.
    fn domain(&self) -> DomainId;
    /// Signs `message`.
    fn sign(&self, message: &[u8]) -> Signature;
}

/// The published federation keys of every known domain.
pub trait Verifier {
    /// Checks that `domain` signed `message`.
    fn verify(&self, domain: DomainId, message: &[u8], signature: &Signature) -> Result<(), SignatureError>;
}

/// Why a signature was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// No key is known for the domain.
    #[error("no federation key is known for {0:?}")]
    UnknownDomain(DomainId),
    /// The signature does not verify under the domain's key.
    #[error("signature by {0:?} does not verify")]
    Invalid(DomainId),
}

/// A domain's Ed25519 federation key.
pub struct Ed25519Signer {
    domain: DomainId,
    key: SigningKey,
}

impl Ed25519Signer {
    /// The signer of `domain` with `key`.
    pub fn new(domain: DomainId, key: SigningKey) -> Ed25519Signer {
        Ed25519Signer { domain, key }
    }

    /// The public half, for peers' directories.
    pub fn verifying_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }
}

impl Signer for Ed25519Signer {
    fn domain(&self) -> DomainId {
        self.domain
    }

    fn sign(&self, message: &[u8]) -> Signature {
        Signature(self.key.sign(message).to_bytes())
    }
}

/// The directory of federation keys, one Ed25519 key per domain.
#[derive(Default)]
pub struct Ed25519Directory {
    keys: BTreeMap<DomainId, VerifyingKey>,
}

/// The directory already holds [`FEDERATION_DOMAINS_MAX`] domains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the federation directory is full ({FEDERATION_DOMAINS_MAX} domains)")]
pub struct DirectoryFull;

impl Ed25519Directory {
    /// Records (or replaces) the key of `domain`.
    pub fn insert(&mut self, domain: DomainId, key: VerifyingKey) -> Result<(), DirectoryFull> {
        if self.keys.len() >= FEDERATION_DOMAINS_MAX && !self.keys.contains_key(&domain) {
            return Err(DirectoryFull);
        }
        self.keys.insert(domain, key);
        Ok(())
    }
}

impl Verifier for Ed25519Directory {
    fn verify(&self, domain: DomainId, message: &[u8], signature: &Signature) -> Result<(), SignatureError> {
        let key = self.keys.get(&domain).ok_or(SignatureError::UnknownDomain(domain))?;
        let signature = ed25519_dalek::Signature::from_bytes(&signature.0);
        key.verify_strict(message, &signature).map_err(|_| SignatureError::Invalid(domain))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer(name: &str, seed: u8) -> Ed25519Signer {
        Ed25519Signer::new(DomainId::from_name(name), SigningKey::from_bytes(&[seed; 32]))
    }

    #[test]
    fn ed25519_signatures_verify_only_for_their_domain_and_message() {
        let a = signer("a.example", 1);
        let b = signer("b.example", 2);
        let mut directory = Ed25519Directory::default();
        directory.insert(a.domain(), a.verifying_key()).unwrap();
        directory.insert(b.domain(), b.verifying_key()).unwrap();

        let signature = a.sign(b"message");
        assert_eq!(directory.verify(a.domain(), b"message", &signature), Ok(()));
        assert_eq!(
            directory.verify(b.domain(), b"message", &signature),
            Err(SignatureError::Invalid(b.domain()))
        );
        assert_eq!(
            directory.verify(a.domain(), b"messagf", &signature),
            Err(SignatureError::Invalid(a.domain()))
        );
        let stranger = DomainId::from_name("c.example");
        assert_eq!(
            directory.verify(stranger, b"message", &signature),
            Err(SignatureError::UnknownDomain(stranger))
        );
    }
}
