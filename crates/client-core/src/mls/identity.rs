//! A device's long-term Ed25519 signature key and its MLS credential.

use kalandra_proto::federation::HomeCertificate;
use openmls::prelude::{
    BasicCredential, CredentialWithKey, Extensions, LeafNode, OpenMlsCrypto, SignatureScheme,
};
use openmls_basic_credential::SignatureKeyPair;
use openmls_traits::OpenMlsProvider;

use super::error::IdentityError;
use super::IDENTITY_LEN;

/// Length of an identity's exported secret (the Ed25519 seed).
pub const IDENTITY_SECRET_LEN: usize = ed25519_dalek::SECRET_KEY_LENGTH;

/// A device's Ed25519 signature key pair. Its MLS credential is a
/// `BasicCredential` whose identity is the 32-byte public key, so the
/// identity and the leaf's signature key are the same bytes.
#[derive(Debug)]
pub struct Identity {
    signing_key: ed25519_dalek::SigningKey,
    keypair: SignatureKeyPair,
    public_key: [u8; IDENTITY_LEN],
    /// The home domain's certificate of this key, from the last `AuthOk`,
    /// carried in the leaves made from now on.
    home_certificate: Option<HomeCertificate>,
}

impl Identity {
    /// Generates a key pair from the provider's randomness.
    pub fn generate(provider: &impl OpenMlsProvider) -> Result<Self, IdentityError> {
        let (secret, _public) = provider
            .crypto()
            .signature_key_gen(SignatureScheme::ED25519)
            .map_err(IdentityError::KeyGeneration)?;
        Self::from_secret_bytes(&secret)
    }

    /// Rebuilds an identity from the secret exported by
    /// [`Identity::secret_bytes`].
    pub fn from_secret_bytes(secret: &[u8]) -> Result<Self, IdentityError> {
        let secret: [u8; IDENTITY_SECRET_LEN] = secret.try_into().map_err(|_| {
            IdentityError::InvalidSecretLength { expected: IDENTITY_SECRET_LEN, actual: secret.len() }
        })?;
        let signing_key = ed25519_dalek::SigningKey::from_bytes(&secret);
        let public_key = signing_key.verifying_key().to_bytes();
        let keypair =
            SignatureKeyPair::from_raw(SignatureScheme::ED25519, secret.to_vec(), public_key.to_vec());
        Ok(Self { signing_key, keypair, public_key, home_certificate: None })
    }

    /// The secret to persist (the 32-byte Ed25519 seed). Keep it encrypted
    /// at rest.
    pub fn secret_bytes(&self) -> [u8; IDENTITY_SECRET_LEN] {
        self.signing_key.to_bytes()
    }

    /// The Ed25519 public key, which is also the MLS credential identity.
    pub fn public_key(&self) -> &[u8; IDENTITY_LEN] {
        &self.public_key
    }

    /// The credential and signature key that go into this device's leaves.
    pub fn credential_with_key(&self) -> CredentialWithKey {
        CredentialWithKey {
            credential: BasicCredential::new(self.public_key.to_vec()).into(),
            signature_key: self.public_key.to_vec().into(),
        }
    }

    /// The signer OpenMLS uses for this device.
    pub fn signer(&self) -> &SignatureKeyPair {
        &self.keypair
    }

    /// Takes the home certificate the server issued at this authentication
    /// in place of any earlier one: none (or one for another key than this
    /// identity's) leaves new leaves without one.
    pub fn set_home_certificate(&mut self, certificate: Option<HomeCertificate>) {
        self.home_certificate = certificate.filter(|certificate| certificate.identity_key == self.public_key);
    }

    /// The home certificate carried in new leaves, if the server issued one.
    pub fn home_certificate(&self) -> Option<&HomeCertificate> {
        self.home_certificate.as_ref()
    }

    /// The extensions of a new leaf of this device: its home certificate,
    /// when it has one.
    pub fn leaf_extensions(&self) -> Extensions<LeafNode> {
        match &self.home_certificate {
            Some(certificate) => {
                Extensions::from_vec(vec![kalandra_mls::home_certificate_extension(certificate)])
                    // One extension of a type valid in leaves cannot be refused.
                    .unwrap_or_else(|_| Extensions::empty())
            }
            None => Extensions::empty(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mls::MlsProvider;

    #[test]
    fn secret_round_trips_and_identity_is_the_public_key() {
        let provider = MlsProvider::from_seed([9; 32]);
        let identity = Identity::generate(&provider).expect("generate");
        let restored = Identity::from_secret_bytes(&identity.secret_bytes()).expect("restore");
        assert_eq!(identity.public_key(), restored.public_key());
        assert_eq!(identity.signer().public(), identity.public_key());
        let credential =
            BasicCredential::try_from(identity.credential_with_key().credential).expect("basic credential");
        assert_eq!(credential.identity(), identity.public_key());
    }

    #[test]
    fn wrong_secret_length_is_rejected() {
        assert!(matches!(
            Identity::from_secret_bytes(&[0u8; 31]),
            Err(IdentityError::InvalidSecretLength { actual: 31, .. })
        ));
    }
}
