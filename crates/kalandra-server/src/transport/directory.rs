//! The key-package directory: upload (validated, bound to the uploader)
//! and claim (each package once; a last-resort package may be reused).
//!
//! These functions are blocking (storage and signature checks); drivers call
//! them from a blocking thread.

use bytes::Bytes;
use kalandra_proto::federation::PeerKeys;
use kalandra_proto::home::check_leaf_certificate;
use kalandra_proto::payload::{
    ClaimedKeyPackage, KeyPackageClaim, KeyPackageClaimed, KeyPackageStatus, KeyPackageUpload,
};
use kalandra_proto::{ErrorCode, RoomId, SenderId};
use openmls::prelude::{BasicCredential, KeyPackage, MlsMessageBodyIn, MlsMessageIn, ProtocolVersion};
use openmls_rust_crypto::RustCrypto;
use tls_codec::Deserialize as _;

pub use crate::room::DirectoryRequest;
use crate::store::{self, KeyPackageError, Store};

/// Why a directory request failed.
#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    /// A key package does not parse or verify (peer misbehaviour).
    #[error("key package {index}: {detail}")]
    InvalidKeyPackage {
        /// Position in the upload (the last-resort package is last).
        index: usize,
        /// What is wrong.
        detail: String,
    },
    /// A key package belongs to another identity than the uploader's.
    #[error("key package {index} belongs to another identity")]
    NotOwnKeyPackage {
        /// Position in the upload.
        index: usize,
    },
    /// The last-resort slot holds a package without the last-resort extension, or the reverse.
    #[error("key package {index}: last-resort marking does not match its slot")]
    LastResortMismatch {
        /// Position in the upload.
        index: usize,
    },
    /// Storage refused or failed.
    #[error(transparent)]
    Store(#[from] KeyPackageError),
}

impl DirectoryError {
    /// The wire error code.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            DirectoryError::InvalidKeyPackage { .. }
            | DirectoryError::NotOwnKeyPackage { .. }
            | DirectoryError::LastResortMismatch { .. } => ErrorCode::InvalidKeyPackage,
            DirectoryError::Store(KeyPackageError::TooMany { .. }) => ErrorCode::QuotaExceeded,
            DirectoryError::Store(error) => match error.kind() {
                store::ErrorKind::CallerMisuse => ErrorCode::InvalidKeyPackage,
                store::ErrorKind::Storage => ErrorCode::StorageUnavailable,
                store::ErrorKind::Internal => ErrorCode::Internal,
            },
        }
    }
}

/// A verified key package: its reference, owner, last-resort marking and
/// the home certificate its leaf carries.
struct Inspected {
    key_package_ref: Vec<u8>,
    identity_key: [u8; 32],
    owner: SenderId,
    last_resort: bool,
    home_certificate: kalandra_mls::LeafHomeCertificate,
}

fn inspect(index: usize, bytes: &[u8]) -> Result<Inspected, DirectoryError> {
    let invalid = |detail: String| DirectoryError::InvalidKeyPackage { index, detail };
    let message =
        MlsMessageIn::tls_deserialize_exact(bytes).map_err(|e| invalid(format!("not an MLSMessage: {e}")))?;
    let MlsMessageBodyIn::KeyPackage(key_package) = message.extract() else {
        return Err(invalid("MLSMessage is not a key package".into()));
    };
    let crypto = RustCrypto::default();
    let key_package: KeyPackage = key_package
        .validate(&crypto, ProtocolVersion::Mls10)
        .map_err(|e| invalid(format!("does not verify: {e}")))?;
    let key_package_ref = key_package.hash_ref(&crypto).map_err(|e| invalid(format!("reference: {e}")))?;
    let leaf = key_package.leaf_node();
    let credential = BasicCredential::try_from(leaf.credential().clone())
        .map_err(|e| invalid(format!("credential: {e}")))?;
    let signature_key = leaf.signature_key().as_slice();
    let identity: [u8; 32] =
        signature_key.try_into().map_err(|_| invalid("signature key is not Ed25519".into()))?;
    if credential.identity() != signature_key {
        return Err(invalid("credential identity is not the signature key".into()));
    }
    Ok(Inspected {
        key_package_ref: key_package_ref.as_slice().to_vec(),
        identity_key: identity,
        owner: SenderId::from_identity_key(&identity),
        last_resort: key_package.last_resort(),
        home_certificate: kalandra_mls::leaf_home_certificate(leaf),
    })
}

/// A package this server's user uploads may carry a home certificate only
/// if it is this domain's, for the package's key, under a key this domain
/// lists (`own_keys`), and valid at `now_ms`: members would find anything
/// else invalid, so it is refused here, with the package's index.
fn check_own_home(
    index: usize,
    inspected: &Inspected,
    own_keys: &PeerKeys,
    now_ms: u64,
) -> Result<(), DirectoryError> {
    let certificate = inspected.home_certificate.clone();
    check_leaf_certificate(certificate, &inspected.identity_key, own_keys, now_ms)
        .map_err(|error| DirectoryError::InvalidKeyPackage { index, detail: error.to_string() })
}

/// The identity key of a key package (an MLSMessage) that verifies and
/// whose credential identity is its signature key.
pub fn key_package_identity(bytes: &[u8]) -> Result<[u8; 32], DirectoryError> {
    inspect(0, bytes).map(|inspected| inspected.identity_key)
}

/// The identity key of a key package, as [`key_package_identity`] checks
/// it, and the home certificate its leaf carries (none, or one read or not).
pub fn key_package_identity_and_home(
    bytes: &[u8],
) -> Result<([u8; 32], kalandra_mls::LeafHomeCertificate), DirectoryError> {
    inspect(0, bytes).map(|inspected| (inspected.identity_key, inspected.home_certificate))
}

/// The MLS `KeyPackageRef` and the identity key of a key package, as
/// [`key_package_identity`] checks it.
pub fn key_package_ref_and_identity(bytes: &[u8]) -> Result<(Vec<u8>, [u8; 32]), DirectoryError> {
    inspect(0, bytes).map(|inspected| (inspected.key_package_ref, inspected.identity_key))
}

/// The `KeyPackageRef`s a Welcome (an MLSMessage) is encrypted to, one per
/// new member; an error when it is not a Welcome.
pub fn welcome_key_package_refs(bytes: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let message =
        MlsMessageIn::tls_deserialize_exact(bytes).map_err(|e| format!("not an MLSMessage: {e}"))?;
    let MlsMessageBodyIn::Welcome(welcome) = message.extract() else {
        return Err("the MLSMessage is not a Welcome".into());
    };
    Ok(welcome.secrets().iter().map(|secrets| secrets.new_member().as_slice().to_vec()).collect())
}

/// Verifies and stores `uploader`'s key packages (a home certificate in
/// one must be this domain's, under `own_keys`, valid at `now_ms`); returns
/// the new stock.
pub fn upload(
    store: &dyn Store,
    own_keys: &PeerKeys,
    uploader: SenderId,
    upload: &KeyPackageUpload,
    now_ms: u64,
) -> Result<KeyPackageStatus, DirectoryError> {
    let mut packages = Vec::with_capacity(upload.key_packages.len());
    for (index, bytes) in upload.key_packages.iter().enumerate() {
        let inspected = inspect(index, bytes)?;
        if inspected.owner != uploader {
            return Err(DirectoryError::NotOwnKeyPackage { index });
        }
        check_own_home(index, &inspected, own_keys, now_ms)?;
        if inspected.last_resort {
            return Err(DirectoryError::LastResortMismatch { index });
        }
        packages.push(store::KeyPackageUpload {
            key_package_ref: inspected.key_package_ref,
            key_package: Bytes::copy_from_slice(bytes),
        });
    }
    let last_resort = match &upload.last_resort {
        Some(bytes) => {
            let index = upload.key_packages.len();
            let inspected = inspect(index, bytes)?;
            if inspected.owner != uploader {
                return Err(DirectoryError::NotOwnKeyPackage { index });
            }
            if !inspected.last_resort {
                return Err(DirectoryError::LastResortMismatch { index });
            }
            check_own_home(index, &inspected, own_keys, now_ms)?;
            Some(Bytes::copy_from_slice(bytes))
        }
        None => None,
    };
    store.put_key_packages(uploader.0, &packages, last_resort)?;
    status(store, uploader)
}

/// The stock of `owner`'s key packages.
pub fn status(store: &dyn Store, owner: SenderId) -> Result<KeyPackageStatus, DirectoryError> {
    let count = store.count_key_packages(owner.0)?;
    Ok(KeyPackageStatus {
        available: u32::try_from(count.ordinary).unwrap_or(u32::MAX),
        last_resort: count.has_last_resort,
    })
}

/// Claims one key package for each requested identity, in request order,
/// and records at `now_ms` each one handed out
/// ([`Store::record_handed_out_claims`]): a peer's Welcome for the user
/// names one of them, and the user is known as this domain's when its
/// inviter's commit is relayed to another domain's room.
pub fn claim(
    store: &dyn Store,
    claim: &KeyPackageClaim,
    now_ms: u64,
) -> Result<KeyPackageClaimed, DirectoryError> {
    let mut key_packages = Vec::with_capacity(claim.sender_ids.len());
    let mut handed_out = Vec::with_capacity(claim.sender_ids.len());
    for &sender_id in &claim.sender_ids {
        let claimed = store.claim_key_package(sender_id)?;
        if let Some(claimed) = &claimed {
            // Stored packages were verified on upload; one that no longer
            // verifies (an old last-resort package past its lifetime) is
            // still handed out, unrecorded.
            match inspect(0, &claimed.key_package) {
                Ok(inspected) => handed_out.push((sender_id, inspected.key_package_ref)),
                Err(error) => tracing::warn!(sender_id, %error, "a handed-out key package not recorded"),
            }
        }
        key_packages
            .push(ClaimedKeyPackage { sender_id, key_package: claimed.map(|c| c.key_package.to_vec()) });
    }
    // The packages are taken: a failed record loses none of them, only a
    // peer's Welcome naming one would be refused.
    if let Err(error) = store.record_handed_out_claims(&handed_out, now_ms) {
        tracing::warn!(%error, "handed-out key packages not recorded");
    }
    Ok(KeyPackageClaimed { key_packages })
}

/// The frame answering a [`DirectoryRequest`], and the error code when it
/// was refused (for the driver's metrics).
#[derive(Debug)]
pub struct DirectoryReply {
    /// The reply: `KeyPackageStatus`, `KeyPackageClaimed` or `Error`.
    pub frame: Bytes,
    /// Why it was refused, if it was.
    pub refused: Option<ErrorCode>,
}

/// Carries out `sender`'s request at `now_ms` and builds the reply (blocks
/// on storage).
pub fn answer(
    store: &dyn Store,
    own_keys: &PeerKeys,
    sender: SenderId,
    request: &DirectoryRequest,
    now_ms: u64,
) -> DirectoryReply {
    let refusal = |error: DirectoryError| (error.error_code(), error.to_string());
    let (request_id, encoded) = match request {
        DirectoryRequest::Upload { request_id, upload: payload } => (
            *request_id,
            upload(store, own_keys, sender, payload, now_ms)
                .map_err(refusal)
                .and_then(|status| encode(*request_id, &status)),
        ),
        DirectoryRequest::Claim { request_id, claim: payload } => (
            *request_id,
            claim(store, payload, now_ms).map_err(refusal).and_then(|claimed| encode(*request_id, &claimed)),
        ),
    };
    match encoded {
        Ok(frame) => DirectoryReply { frame, refused: None },
        Err((code, message)) => {
            let frame = crate::room::error_frame(RoomId::default(), request_id, code, &message);
            DirectoryReply { frame, refused: Some(code) }
        }
    }
}

/// The reply frame, or `Internal` when it cannot be built (too large).
fn encode<P: kalandra_proto::Payload>(request_id: u32, payload: &P) -> Result<Bytes, (ErrorCode, String)> {
    crate::room::server_frame(RoomId::default(), request_id, payload)
        .map_err(|error| (ErrorCode::Internal, error.to_string()))
}

#[cfg(test)]
mod tests {
    use std::time::{SystemTime, UNIX_EPOCH};

    use client_core::mls::{generate_key_packages, Identity, MlsProvider};

    use super::*;
    use crate::store::MemoryStore;
    use kalandra_proto::federation::HomeCertificate;

    fn own_key() -> ed25519_dalek::SigningKey {
        ed25519_dalek::SigningKey::from_bytes(&[0xa1; 32])
    }

    fn own_keys() -> PeerKeys {
        let key =
            kalandra_proto::federation::PeerKey { key: own_key().verifying_key(), valid_until_ms: None };
        PeerKeys::new(kalandra_proto::federation::DomainName::parse("a.test").unwrap(), vec![key]).unwrap()
    }

    /// A new identity's upload of one package, carrying the certificate
    /// `certify` makes for its key (none: no certificate).
    fn certified_upload(
        certify: impl FnOnce([u8; 32]) -> Option<HomeCertificate>,
    ) -> (SenderId, KeyPackageUpload) {
        let provider = MlsProvider::from_seed([9; 32]);
        let mut identity = Identity::generate(&provider).unwrap();
        identity.set_home_certificate(certify(*identity.public_key()));
        let now_secs = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
        let package = generate_key_packages(&provider, &identity, 1, now_secs).unwrap().remove(0);
        let owner = SenderId::from_identity_key(identity.public_key());
        (owner, KeyPackageUpload { key_packages: vec![package.message.into()], last_resort: None })
    }

    #[test]
    fn an_upload_carrying_a_home_certificate_not_of_this_domain_is_refused() {
        let store = MemoryStore::new();
        let domain = |name: &str| kalandra_proto::federation::DomainName::parse(name).unwrap();
        let other = ed25519_dalek::SigningKey::from_bytes(&[0xb2; 32]);
        let issue = |signer: &ed25519_dalek::SigningKey, name: &str, not_after_ms| {
            let (signer, name) = (signer.clone(), domain(name));
            move |key| Some(HomeCertificate::issue(&signer, name, key, not_after_ms))
        };
        let (owner, payload) = certified_upload(issue(&own_key(), "a.test", 5_000));
        assert!(upload(&store, &own_keys(), owner, &payload, 2_000).is_ok(), "this domain's");
        let (owner, payload) = certified_upload(|_| None);
        assert!(upload(&store, &own_keys(), owner, &payload, 2_000).is_ok(), "none");
        for (certify, what) in [
            (issue(&other, "a.test", 5_000), "signed with another key"),
            (issue(&other, "b.test", 5_000), "another domain's"),
            (issue(&own_key(), "a.test", 1_000), "expired"),
        ] {
            let (owner, payload) = certified_upload(certify);
            let result = upload(&store, &own_keys(), owner, &payload, 2_000);
            assert!(
                matches!(result, Err(DirectoryError::InvalidKeyPackage { index: 0, .. })),
                "{what}: {result:?}"
            );
        }
    }

    #[test]
    fn a_local_claim_records_each_package_it_hands_out() {
        let store = MemoryStore::new();
        let provider = MlsProvider::from_seed([7; 32]);
        let identity = Identity::generate(&provider).unwrap();
        let now_secs = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
        let packages = generate_key_packages(&provider, &identity, 2, now_secs)
            .unwrap()
            .into_iter()
            .map(|package| package.message.into())
            .collect();
        let owner = SenderId::from_identity_key(identity.public_key());
        let upload_payload = KeyPackageUpload { key_packages: packages, last_resort: None };
        upload(&store, &own_keys(), owner, &upload_payload, 1_000).unwrap();
        let nobody = 0x5eed;
        let request = KeyPackageClaim { sender_ids: vec![owner.0, nobody], domain: None };

        let claimed = claim(&store, &request, 1_000).unwrap();
        let handed = claimed.key_packages[0].key_package.as_deref().unwrap();
        let (handed_ref, _) = key_package_ref_and_identity(handed).unwrap();
        let records = store.handed_out_claims(owner.0).unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!((records[0].key_package_ref.clone(), records[0].claimed_at_ms), (handed_ref, 1_000));
        assert!(
            store.handed_out_claims(nobody).unwrap().is_empty(),
            "nothing handed out for a user without packages"
        );
        claim(&store, &request, 2_000).unwrap();
        assert_eq!(store.handed_out_claims(owner.0).unwrap().len(), 2, "each package handed out is recorded");
    }
}
