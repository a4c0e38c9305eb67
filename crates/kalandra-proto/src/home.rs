//! A member's own check of another member's home domain.
//!
//! Servers check a user's home certificate (`federation::HomeCertificate`)
//! when they hand out its key packages and relay its frames. So that
//! members need not take the room's domain's word for it, each client
//! carries a home certificate its home server issued it (in `AuthOk`) in
//! its MLS leaf, as a private-use leaf-node extension
//! (`kalandra_mls::HOME_CERTIFICATE_EXTENSION_TYPE`). Any member checks it
//! against the keys its own server accepts for that domain (the
//! `DomainKeys` answer), here, without I/O.

use crate::federation::DOMAIN_NAME_BYTES_MAX;
use crate::federation::{DomainName, HomeCertificate, HomeCertificateError, PeerKeys};
use crate::limits::{PUBLIC_KEY_BYTES, SIGNATURE_BYTES};

/// Validity of the home certificate a server issues a client for its
/// leaves: longer than a key package lives (84 days and an hour of skew),
/// so that a leaf added from any valid key package is certified when added.
pub const MEMBER_HOME_CERTIFICATE_VALIDITY_MS: u64 = 90 * 24 * 60 * 60 * 1000;

/// Longest CBOR encoding of a home certificate: the map, its four keys,
/// the longest domain, the key, the end and the signature, with heads.
pub const HOME_CERTIFICATE_ENCODED_BYTES_MAX: usize = 1
    + (1 + 6)
    + (2 + DOMAIN_NAME_BYTES_MAX)
    + (1 + 12)
    + (2 + PUBLIC_KEY_BYTES)
    + (1 + 12)
    + 9
    + (1 + 9)
    + (2 + SIGNATURE_BYTES);

const _: () = assert!(HOME_CERTIFICATE_ENCODED_BYTES_MAX < 512, "a leaf's certificate stays small");

/// Why a leaf's home certificate could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HomeCertificateDecodeError {
    /// Longer than [`HOME_CERTIFICATE_ENCODED_BYTES_MAX`].
    #[error("home certificate of {len_bytes} bytes, limit {HOME_CERTIFICATE_ENCODED_BYTES_MAX}")]
    TooLong {
        /// Its length.
        len_bytes: usize,
    },
    /// Not one CBOR home certificate.
    #[error("home certificate is not valid CBOR: {0}")]
    Malformed(String),
}

impl HomeCertificate {
    /// The CBOR encoding carried in a leaf.
    pub fn to_cbor(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HOME_CERTIFICATE_ENCODED_BYTES_MAX);
        // Serializing this plain struct into a Vec cannot fail.
        ciborium::ser::into_writer(self, &mut out).expect("CBOR encoding into a Vec is infallible");
        out
    }

    /// Reads exactly one CBOR home certificate from `bytes`.
    pub fn from_cbor(bytes: &[u8]) -> Result<HomeCertificate, HomeCertificateDecodeError> {
        if bytes.len() > HOME_CERTIFICATE_ENCODED_BYTES_MAX {
            return Err(HomeCertificateDecodeError::TooLong { len_bytes: bytes.len() });
        }
        let mut reader = bytes;
        let certificate: HomeCertificate = ciborium::de::from_reader(&mut reader)
            .map_err(|error| HomeCertificateDecodeError::Malformed(error.to_string()))?;
        if !reader.is_empty() {
            let detail = format!("{} bytes after the certificate", reader.len());
            return Err(HomeCertificateDecodeError::Malformed(detail));
        }
        Ok(certificate)
    }
}

/// What a member finds about another member's home domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HomeCheck {
    /// The leaf's certificate is its domain's, under a key the checking
    /// member's server accepts for that domain, and is within its validity.
    Certified {
        /// The member's home domain.
        domain: DomainName,
        /// The certificate's end of validity, ms since the Unix epoch.
        not_after_ms: u64,
    },
    /// As `Certified`, but past its end of validity: the member has not
    /// renewed its leaf since (a self-update renews it).
    Expired {
        /// The member's home domain.
        domain: DomainName,
        /// The certificate's end of validity, ms since the Unix epoch.
        not_after_ms: u64,
    },
    /// The leaf carries no home certificate: nothing says which domain
    /// speaks for this member.
    Uncertified,
    /// The certificate names a domain whose keys the checking member's
    /// server does not give (not a peer, or refused there).
    UnknownDomain {
        /// The domain the certificate names.
        domain: DomainName,
    },
    /// Not a certificate of that domain for this leaf: it does not decode,
    /// certifies another key, or does not verify under the domain's keys.
    Invalid {
        /// What is wrong.
        reason: String,
    },
}

/// Why a server refuses the home certificate a key package's leaf carries
/// ([`check_leaf_certificate`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeafCertificateError {
    /// It does not decode.
    #[error("home certificate in the leaf: {0}")]
    Unreadable(HomeCertificateDecodeError),
    /// It certifies another key than the leaf's.
    #[error("the home certificate in the leaf is for another key")]
    OtherKey,
    /// It is another domain's, has ended, or does not verify.
    #[error("home certificate in the leaf: {0}")]
    Certificate(HomeCertificateError),
}

/// What a server checks of the certificate a key package's leaf carries
/// (`certificate`, `None` when it carries none, which passes): that it is
/// `home`'s, for the leaf's key `leaf_key`, and valid at `now_ms`. A home
/// checks its own users' uploads with it, a claiming server a peer's
/// answer.
pub fn check_leaf_certificate(
    certificate: Option<Result<HomeCertificate, HomeCertificateDecodeError>>,
    leaf_key: &[u8],
    home: &PeerKeys,
    now_ms: u64,
) -> Result<(), LeafCertificateError> {
    let certificate = match certificate {
        None => return Ok(()),
        Some(Err(error)) => return Err(LeafCertificateError::Unreadable(error)),
        Some(Ok(certificate)) => certificate,
    };
    if certificate.domain != *home.domain() {
        let (expected, claimed) = (home.domain().clone(), certificate.domain);
        return Err(LeafCertificateError::Certificate(HomeCertificateError::WrongDomain {
            expected,
            claimed,
        }));
    }
    if certificate.identity_key.as_slice() != leaf_key {
        return Err(LeafCertificateError::OtherKey);
    }
    certificate.verify(home, now_ms).map(|_| ()).map_err(LeafCertificateError::Certificate)
}

/// Checks the home certificate a leaf carries (`certificate`, `None` when
/// it carries none) for the leaf whose signature key is `leaf_key`,
/// against `keys_of`, the keys the checking member's server accepts for a
/// domain (`None` for a domain it does not know), at `now_ms`.
pub fn check_member_home<'k>(
    certificate: Option<Result<HomeCertificate, HomeCertificateDecodeError>>,
    leaf_key: &[u8],
    keys_of: impl FnOnce(&DomainName) -> Option<&'k PeerKeys>,
    now_ms: u64,
) -> HomeCheck {
    let certificate = match certificate {
        None => return HomeCheck::Uncertified,
        Some(Err(error)) => return HomeCheck::Invalid { reason: error.to_string() },
        Some(Ok(certificate)) => certificate,
    };
    if certificate.identity_key.as_slice() != leaf_key {
        return HomeCheck::Invalid {
            reason: "the certificate is for another key than the leaf's".to_owned(),
        };
    }
    let Some(keys) = keys_of(&certificate.domain) else {
        return HomeCheck::UnknownDomain { domain: certificate.domain };
    };
    match certificate.verify_signature(keys, now_ms) {
        Err(HomeCertificateError::WrongDomain { .. }) => {
            HomeCheck::UnknownDomain { domain: certificate.domain }
        }
        Err(error) => HomeCheck::Invalid { reason: error.to_string() },
        Ok(()) if now_ms >= certificate.not_after_ms => {
            HomeCheck::Expired { domain: certificate.domain, not_after_ms: certificate.not_after_ms }
        }
        Ok(()) => HomeCheck::Certified { domain: certificate.domain, not_after_ms: certificate.not_after_ms },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::federation::PeerKey;
    use ed25519_dalek::SigningKey;

    fn domain(name: &str) -> DomainName {
        DomainName::parse(name).unwrap()
    }

    fn keys(name: &str, key: &SigningKey) -> PeerKeys {
        PeerKeys::new(domain(name), vec![PeerKey { key: key.verifying_key(), valid_until_ms: None }]).unwrap()
    }

    #[test]
    fn a_certificate_round_trips_and_its_bound_holds_for_the_longest_domain() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let longest = ["a".repeat(63), "b".repeat(63), "c".repeat(63), "d".repeat(61)].join(".");
        let certificate = HomeCertificate::issue(&key, domain(&longest), [9; 32], u64::MAX);
        let encoded = certificate.to_cbor();
        assert_eq!(encoded.len(), HOME_CERTIFICATE_ENCODED_BYTES_MAX, "the bound is the longest encoding");
        assert_eq!(HOME_CERTIFICATE_ENCODED_BYTES_MAX, 408, "as wire-protocol.md §8 says");
        assert_eq!(HomeCertificate::from_cbor(&encoded), Ok(certificate));
        let mut trailing = encoded.clone();
        trailing.push(0);
        assert!(HomeCertificate::from_cbor(&trailing).is_err());
        let short = HomeCertificate::issue(&key, domain("b.test"), [9; 32], 5).to_cbor();
        let trailing = [short.as_slice(), &[0]].concat();
        assert!(matches!(
            HomeCertificate::from_cbor(&trailing),
            Err(HomeCertificateDecodeError::Malformed(_))
        ));
        assert!(matches!(
            HomeCertificate::from_cbor(&encoded[..20]),
            Err(HomeCertificateDecodeError::Malformed(_))
        ));
    }

    #[test]
    fn a_member_tells_certified_expired_unknown_forged_and_missing_apart() {
        let (b_key, c_key) = (SigningKey::from_bytes(&[1; 32]), SigningKey::from_bytes(&[2; 32]));
        let bob = SigningKey::from_bytes(&[3; 32]).verifying_key().to_bytes();
        let b_keys = keys("b.test", &b_key);
        let known = |name: &DomainName| (name.as_str() == "b.test").then_some(&b_keys);
        let issued = |key: &SigningKey, name: &str| HomeCertificate::issue(key, domain(name), bob, 1_000);

        let check = |certificate: HomeCertificate, leaf: &[u8], now_ms| {
            check_member_home(Some(Ok(certificate)), leaf, known, now_ms)
        };
        let certified = HomeCheck::Certified { domain: domain("b.test"), not_after_ms: 1_000 };
        assert_eq!(check(issued(&b_key, "b.test"), &bob, 999), certified);
        assert_eq!(
            check(issued(&b_key, "b.test"), &bob, 1_000),
            HomeCheck::Expired { domain: domain("b.test"), not_after_ms: 1_000 }
        );
        // Another domain's key signing as b.test, or b.test's key for another leaf.
        assert!(matches!(check(issued(&c_key, "b.test"), &bob, 1), HomeCheck::Invalid { .. }));
        assert!(matches!(check(issued(&b_key, "b.test"), &[4; 32], 1), HomeCheck::Invalid { .. }));
        // An expired forgery is a forgery.
        assert!(matches!(check(issued(&c_key, "b.test"), &bob, 5_000), HomeCheck::Invalid { .. }));
        assert_eq!(
            check(issued(&c_key, "c.test"), &bob, 1),
            HomeCheck::UnknownDomain { domain: domain("c.test") }
        );
        assert_eq!(check_member_home(None, &bob, known, 1), HomeCheck::Uncertified);
        let garbage = Some(HomeCertificate::from_cbor(&[0xff, 0x00]));
        assert!(matches!(check_member_home(garbage, &bob, known, 1), HomeCheck::Invalid { .. }));
    }

    #[test]
    fn a_server_refuses_a_leaf_certificate_not_of_the_home_for_the_key_or_no_longer_valid() {
        let (b_key, c_key) = (SigningKey::from_bytes(&[1; 32]), SigningKey::from_bytes(&[2; 32]));
        let bob = SigningKey::from_bytes(&[3; 32]).verifying_key().to_bytes();
        let b_keys = keys("b.test", &b_key);
        let check = |certificate: HomeCertificate, leaf: &[u8]| {
            check_leaf_certificate(Some(Ok(certificate)), leaf, &b_keys, 999)
        };
        let issued = |key: &SigningKey, name: &str, end| HomeCertificate::issue(key, domain(name), bob, end);
        assert_eq!(check_leaf_certificate(None, &bob, &b_keys, 999), Ok(()));
        assert_eq!(check(issued(&b_key, "b.test", 1_000), &bob), Ok(()));
        assert_eq!(check(issued(&b_key, "b.test", 1_000), &[4; 32]), Err(LeafCertificateError::OtherKey));
        let wrong_domain = check(issued(&c_key, "c.test", 1_000), &bob);
        assert!(matches!(
            wrong_domain,
            Err(LeafCertificateError::Certificate(HomeCertificateError::WrongDomain { .. }))
        ));
        let forged = check(issued(&c_key, "b.test", 1_000), &bob);
        assert!(matches!(
            forged,
            Err(LeafCertificateError::Certificate(HomeCertificateError::BadSignature { .. }))
        ));
        let ended = check(issued(&b_key, "b.test", 999), &bob);
        assert!(matches!(
            ended,
            Err(LeafCertificateError::Certificate(HomeCertificateError::Expired { .. }))
        ));
        let unreadable =
            check_leaf_certificate(Some(HomeCertificate::from_cbor(&[0xff])), &bob, &b_keys, 999);
        assert!(matches!(unreadable, Err(LeafCertificateError::Unreadable(_))));
    }
}
