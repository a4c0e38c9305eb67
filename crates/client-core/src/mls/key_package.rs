//! Key packages: what others need to add this device to a room.

use openmls::prelude::{KeyPackage, MlsMessageOut, OpenMlsProvider};
use tls_codec::Serialize as _;

use super::error::KeyPackageError;
use super::identity::Identity;
use super::{leaf_capabilities, lifetime_at, CIPHERSUITE};

/// A key package ready to upload. Its private keys stay in the provider's
/// storage until a Welcome that uses it is processed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratedKeyPackage {
    /// The key package as a TLS-serialised `MLSMessage` (wire format
    /// `mls_key_package`).
    pub message: Vec<u8>,
    /// The key package reference (RFC 9420 §5.2), which identifies it in
    /// the directory and in Welcomes.
    pub key_package_ref: Vec<u8>,
    /// The end of its validity, in seconds since the Unix epoch.
    pub not_after_unix_secs: u64,
}

/// Generates `count` single-use key packages valid from `now_unix_secs`.
pub fn generate_key_packages<P: OpenMlsProvider>(
    provider: &P,
    identity: &Identity,
    count: usize,
    now_unix_secs: u64,
) -> Result<Vec<GeneratedKeyPackage>, KeyPackageError> {
    (0..count).map(|_| build(provider, identity, now_unix_secs, false)).collect()
}

/// Generates a last-resort key package (RFC 9420 §17.3 `last_resort`
/// extension): the directory hands it out, without deleting it, once the
/// single-use ones are gone.
pub fn generate_last_resort_key_package<P: OpenMlsProvider>(
    provider: &P,
    identity: &Identity,
    now_unix_secs: u64,
) -> Result<GeneratedKeyPackage, KeyPackageError> {
    build(provider, identity, now_unix_secs, true)
}

fn build<P: OpenMlsProvider>(
    provider: &P,
    identity: &Identity,
    now_unix_secs: u64,
    last_resort: bool,
) -> Result<GeneratedKeyPackage, KeyPackageError> {
    let lifetime = lifetime_at(now_unix_secs);
    let mut builder = KeyPackage::builder()
        .key_package_lifetime(lifetime)
        .leaf_node_capabilities(leaf_capabilities())
        .leaf_node_extensions(identity.leaf_extensions());
    if last_resort {
        builder = builder.mark_as_last_resort();
    }
    let bundle = builder
        .build(CIPHERSUITE, provider, identity.signer(), identity.credential_with_key())
        .map_err(KeyPackageError::Build)?;
    let key_package = bundle.key_package().clone();
    let key_package_ref = key_package
        .hash_ref(provider.crypto())
        .map_err(|e| KeyPackageError::Internal(Box::new(e)))?
        .as_slice()
        .to_vec();
    let message =
        MlsMessageOut::from(key_package).tls_serialize_detached().map_err(KeyPackageError::Encode)?;
    Ok(GeneratedKeyPackage { message, key_package_ref, not_after_unix_secs: lifetime.not_after() })
}
