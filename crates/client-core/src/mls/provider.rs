//! The OpenMLS provider: RustCrypto primitives with every random draw routed
//! through one seedable ChaCha20 generator.
//!
//! `openmls_rust_crypto::RustCrypto` seeds its generator from the OS and its
//! HPKE encapsulation (path secrets, Welcome secrets, external init) creates
//! a fresh generator from the OS on every call, so neither can be replayed.
//! [`SeededCrypto`] delegates the deterministic primitives (hashes, HKDF, AEAD,
//! signatures, HPKE decryption) to `RustCrypto` and replaces the randomised
//! ones:
//!
//! - `random_array`, `random_vec` and Ed25519 key generation draw from the
//!   seeded generator;
//! - HPKE encapsulation derives its ephemeral key from the seeded state with
//!   HMAC-SHA256 over the encryption's inputs ("synthetic randomness"). OpenMLS
//!   encrypts path secrets in parallel (rayon), so draws from one sequential
//!   generator would be assigned to ciphertexts in scheduling order; deriving
//!   the ephemeral key from the inputs makes the result independent of thread
//!   scheduling. The plaintexts are fresh secrets, so distinct encryptions get
//!   distinct ephemeral keys. In production ([`SeededCrypto::from_os_entropy`])
//!   each encapsulation additionally mixes in 32 bytes from the OS.

use std::fmt;
use std::sync::Mutex;

use hpke_rs::hpke_types::{AeadAlgorithm, KdfAlgorithm, KemAlgorithm};
use hpke_rs::rustcrypto::HpkeRustCrypto;
use hpke_rs::{Hpke, Mode};
use hpke_rs_crypto::HpkeCrypto;
use openmls_memory_storage::MemoryStorage;
use openmls_rust_crypto::RustCrypto;
use openmls_traits::crypto::OpenMlsCrypto;
use openmls_traits::random::OpenMlsRand;
use openmls_traits::storage::{StorageProvider, CURRENT_VERSION};
use openmls_traits::types::{
    AeadType, Ciphersuite, CryptoError, ExporterSecret, HashType, HpkeAeadType, HpkeCiphertext, HpkeConfig,
    HpkeKdfType, HpkeKemType, HpkeKeyPair, KemOutput, SignatureScheme,
};
use openmls_traits::OpenMlsProvider;
use rand::RngCore;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;
use tls_codec::SecretVLBytes;

/// Length of the seed that determines every random draw of a provider.
pub const SEED_LEN: usize = 32;

/// Domain separation for the synthetic HPKE ephemeral key.
const HPKE_EPHEMERAL_LABEL: &[u8] = b"kalandra hpke ephemeral v1";

/// The ciphersuites whose every randomised operation [`SeededCrypto`] controls.
const SUPPORTED_CIPHERSUITES: [Ciphersuite; 2] = [
    Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519,
    Ciphersuite::MLS_128_DHKEMX25519_CHACHA20POLY1305_SHA256_Ed25519,
];

/// Error of the randomness source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RandError {
    /// A thread panicked while holding the generator.
    #[error("the random generator lock is poisoned")]
    LockPoisoned,
}

/// RustCrypto primitives whose randomness comes from one seedable ChaCha20
/// generator (see the module documentation).
pub struct SeededCrypto {
    /// Deterministic primitives. Its own generator (OS-seeded) is never used.
    primitives: RustCrypto,
    rng: Mutex<ChaCha20Rng>,
    /// Key of the synthetic HPKE ephemeral-key derivation.
    hpke_key: [u8; 32],
    /// Mix OS entropy into every HPKE encapsulation (production mode).
    hedge_with_os_entropy: bool,
}

impl fmt::Debug for SeededCrypto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SeededCrypto")
            .field("hedge_with_os_entropy", &self.hedge_with_os_entropy)
            .finish_non_exhaustive()
    }
}

impl SeededCrypto {
    /// Crypto whose every output is a function of `seed` and the inputs:
    /// two instances with the same seed given the same calls produce the
    /// same bytes.
    pub fn from_seed(seed: [u8; SEED_LEN]) -> Self {
        Self::new(seed, false)
    }

    /// Crypto seeded from the operating system, with OS entropy also mixed
    /// into every HPKE encapsulation. For production.
    pub fn from_os_entropy() -> Self {
        let mut seed = [0u8; SEED_LEN];
        rand::rngs::OsRng.fill_bytes(&mut seed);
        Self::new(seed, true)
    }

    fn new(seed: [u8; SEED_LEN], hedge_with_os_entropy: bool) -> Self {
        let mut rng = ChaCha20Rng::from_seed(seed);
        let mut hpke_key = [0u8; 32];
        rng.fill_bytes(&mut hpke_key);
        Self { primitives: RustCrypto::default(), rng: Mutex::new(rng), hpke_key, hedge_with_os_entropy }
    }

    fn fill(&self, out: &mut [u8]) -> Result<(), RandError> {
        let mut rng = self.rng.lock().map_err(|_| RandError::LockPoisoned)?;
        rng.fill_bytes(out);
        Ok(())
    }

    /// The ephemeral-key input keying material of one HPKE encapsulation:
    /// HMAC-SHA256 keyed with the provider's HPKE key over every input of
    /// the encryption (length-prefixed), plus OS entropy in production.
    fn synthetic_ikm(&self, parts: &[&[u8]]) -> Result<Vec<u8>, CryptoError> {
        let mut message = Vec::with_capacity(
            HPKE_EPHEMERAL_LABEL.len() + parts.iter().map(|p| p.len() + 8).sum::<usize>() + 32,
        );
        message.extend_from_slice(HPKE_EPHEMERAL_LABEL);
        for part in parts {
            message.extend_from_slice(&(part.len() as u64).to_be_bytes());
            message.extend_from_slice(part);
        }
        if self.hedge_with_os_entropy {
            let mut hedge = [0u8; 32];
            rand::rngs::OsRng.fill_bytes(&mut hedge);
            message.extend_from_slice(&hedge);
        }
        let mac = self.primitives.hmac(HashType::Sha2_256, &self.hpke_key, &message)?;
        Ok(mac.as_slice().to_vec())
    }

    /// HPKE base-mode sender setup with the ephemeral key derived from `ikm`
    /// (RFC 9180 §4.1 `Encap` with `DeriveKeyPair(ikm)`).
    fn hpke_sender_context(
        config: HpkeConfig,
        pk_r: &[u8],
        info: &[u8],
        ikm: &[u8],
    ) -> Result<(KemOutput, hpke_rs::Context<HpkeRustCrypto>), CryptoError> {
        let kem = match config.0 {
            HpkeKemType::DhKem25519 => KemAlgorithm::DhKem25519,
            _ => return Err(CryptoError::UnsupportedCiphersuite),
        };
        let kdf = match config.1 {
            HpkeKdfType::HkdfSha256 => KdfAlgorithm::HkdfSha256,
            _ => return Err(CryptoError::UnsupportedKdf),
        };
        let aead = match config.2 {
            HpkeAeadType::AesGcm128 => AeadAlgorithm::Aes128Gcm,
            HpkeAeadType::AesGcm256 => AeadAlgorithm::Aes256Gcm,
            HpkeAeadType::ChaCha20Poly1305 => AeadAlgorithm::ChaCha20Poly1305,
            HpkeAeadType::Export => AeadAlgorithm::HpkeExport,
        };
        let hpke = Hpke::<HpkeRustCrypto>::new(Mode::Base, kem, kdf, aead);

        // Ephemeral key pair, DeriveKeyPair(ikm) of RFC 9180 §7.1.3.
        let (sk_e, pk_e) =
            hpke.derive_key_pair(ikm).map_err(|_| CryptoError::CryptoLibraryError)?.into_keys();
        let enc = pk_e.as_slice().to_vec();

        // ExtractAndExpand(DH(skE, pkR), enc || pkR) of RFC 9180 §4.1.
        let dh = HpkeRustCrypto::dh(kem, pk_r, sk_e.as_slice()).map_err(|_| CryptoError::InvalidPublicKey)?;
        let mut kem_suite_id = b"KEM".to_vec();
        kem_suite_id.extend_from_slice(&(kem as u16).to_be_bytes());
        let mut kem_context = enc.clone();
        kem_context.extend_from_slice(pk_r);
        let eae_prk = labeled_extract(kdf, &[], &kem_suite_id, b"eae_prk", &dh)?;
        let shared_secret = labeled_expand(
            kdf,
            &eae_prk,
            &kem_suite_id,
            b"shared_secret",
            &kem_context,
            HpkeRustCrypto::kdf_digest_length(kdf),
        )?;

        let context =
            hpke.key_schedule(&shared_secret, info, &[], &[]).map_err(|_| CryptoError::SenderSetupError)?;
        Ok((enc, context))
    }
}

/// `LabeledExtract` of RFC 9180 §4.
fn labeled_extract(
    kdf: KdfAlgorithm,
    salt: &[u8],
    suite_id: &[u8],
    label: &[u8],
    ikm: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let mut labeled_ikm = b"HPKE-v1".to_vec();
    labeled_ikm.extend_from_slice(suite_id);
    labeled_ikm.extend_from_slice(label);
    labeled_ikm.extend_from_slice(ikm);
    HpkeRustCrypto::kdf_extract(kdf, salt, &labeled_ikm).map_err(|_| CryptoError::CryptoLibraryError)
}

/// `LabeledExpand` of RFC 9180 §4.
fn labeled_expand(
    kdf: KdfAlgorithm,
    prk: &[u8],
    suite_id: &[u8],
    label: &[u8],
    info: &[u8],
    len: usize,
) -> Result<Vec<u8>, CryptoError> {
    let len_u16 = u16::try_from(len).map_err(|_| CryptoError::HkdfOutputLengthInvalid)?;
    let mut labeled_info = len_u16.to_be_bytes().to_vec();
    labeled_info.extend_from_slice(b"HPKE-v1");
    labeled_info.extend_from_slice(suite_id);
    labeled_info.extend_from_slice(label);
    labeled_info.extend_from_slice(info);
    HpkeRustCrypto::kdf_expand(kdf, prk, &labeled_info, len).map_err(|_| CryptoError::CryptoLibraryError)
}

impl OpenMlsRand for SeededCrypto {
    type Error = RandError;

    fn random_array<const N: usize>(&self) -> Result<[u8; N], Self::Error> {
        let mut out = [0u8; N];
        self.fill(&mut out)?;
        Ok(out)
    }

    fn random_vec(&self, len: usize) -> Result<Vec<u8>, Self::Error> {
        let mut out = vec![0u8; len];
        self.fill(&mut out)?;
        Ok(out)
    }
}

impl OpenMlsCrypto for SeededCrypto {
    fn supports(&self, ciphersuite: Ciphersuite) -> Result<(), CryptoError> {
        if SUPPORTED_CIPHERSUITES.contains(&ciphersuite) {
            Ok(())
        } else {
            Err(CryptoError::UnsupportedCiphersuite)
        }
    }

    fn supported_ciphersuites(&self) -> Vec<Ciphersuite> {
        SUPPORTED_CIPHERSUITES.to_vec()
    }

    fn hkdf_extract(
        &self,
        hash_type: HashType,
        salt: &[u8],
        ikm: &[u8],
    ) -> Result<SecretVLBytes, CryptoError> {
        self.primitives.hkdf_extract(hash_type, salt, ikm)
    }

    fn hmac(&self, hash_type: HashType, key: &[u8], message: &[u8]) -> Result<SecretVLBytes, CryptoError> {
        self.primitives.hmac(hash_type, key, message)
    }

    fn hkdf_expand(
        &self,
        hash_type: HashType,
        prk: &[u8],
        info: &[u8],
        okm_len: usize,
    ) -> Result<SecretVLBytes, CryptoError> {
        self.primitives.hkdf_expand(hash_type, prk, info, okm_len)
    }

    fn hash(&self, hash_type: HashType, data: &[u8]) -> Result<Vec<u8>, CryptoError> {
        self.primitives.hash(hash_type, data)
    }

    fn aead_encrypt(
        &self,
        alg: AeadType,
        key: &[u8],
        data: &[u8],
        nonce: &[u8],
        aad: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        self.primitives.aead_encrypt(alg, key, data, nonce, aad)
    }

    fn aead_decrypt(
        &self,
        alg: AeadType,
        key: &[u8],
        ct_tag: &[u8],
        nonce: &[u8],
        aad: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        self.primitives.aead_decrypt(alg, key, ct_tag, nonce, aad)
    }

    fn signature_key_gen(&self, alg: SignatureScheme) -> Result<(Vec<u8>, Vec<u8>), CryptoError> {
        match alg {
            SignatureScheme::ED25519 => {
                let mut secret = [0u8; ed25519_dalek::SECRET_KEY_LENGTH];
                self.fill(&mut secret).map_err(|_| CryptoError::InsufficientRandomness)?;
                let signing_key = ed25519_dalek::SigningKey::from_bytes(&secret);
                Ok((signing_key.to_bytes().to_vec(), signing_key.verifying_key().to_bytes().to_vec()))
            }
            _ => Err(CryptoError::UnsupportedSignatureScheme),
        }
    }

    fn verify_signature(
        &self,
        alg: SignatureScheme,
        data: &[u8],
        pk: &[u8],
        signature: &[u8],
    ) -> Result<(), CryptoError> {
        self.primitives.verify_signature(alg, data, pk, signature)
    }

    fn sign(&self, alg: SignatureScheme, data: &[u8], key: &[u8]) -> Result<Vec<u8>, CryptoError> {
        // Ed25519 signing is deterministic (RFC 8032).
        self.primitives.sign(alg, data, key)
    }

    fn hpke_seal(
        &self,
        config: HpkeConfig,
        pk_r: &[u8],
        info: &[u8],
        aad: &[u8],
        ptxt: &[u8],
    ) -> Result<HpkeCiphertext, CryptoError> {
        let ikm = self.synthetic_ikm(&[b"seal", pk_r, info, aad, ptxt])?;
        let (kem_output, mut context) = Self::hpke_sender_context(config, pk_r, info, &ikm)?;
        let ciphertext = context.seal(aad, ptxt).map_err(|_| CryptoError::HpkeEncryptionError)?;
        Ok(HpkeCiphertext { kem_output: kem_output.into(), ciphertext: ciphertext.into() })
    }

    fn hpke_open(
        &self,
        config: HpkeConfig,
        input: &HpkeCiphertext,
        sk_r: &[u8],
        info: &[u8],
        aad: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        self.primitives.hpke_open(config, input, sk_r, info, aad)
    }

    fn hpke_setup_sender_and_export(
        &self,
        config: HpkeConfig,
        pk_r: &[u8],
        info: &[u8],
        exporter_context: &[u8],
        exporter_length: usize,
    ) -> Result<(KemOutput, ExporterSecret), CryptoError> {
        // Not called from parallel code: a sequential draw keeps two calls
        // with equal inputs apart.
        let mut fresh = [0u8; 32];
        self.fill(&mut fresh).map_err(|_| CryptoError::InsufficientRandomness)?;
        let ikm = self.synthetic_ikm(&[b"export", pk_r, info, exporter_context, &fresh])?;
        let (kem_output, context) = Self::hpke_sender_context(config, pk_r, info, &ikm)?;
        let secret =
            context.export(exporter_context, exporter_length).map_err(|_| CryptoError::ExporterError)?;
        Ok((kem_output, secret.into()))
    }

    fn hpke_setup_receiver_and_export(
        &self,
        config: HpkeConfig,
        enc: &[u8],
        sk_r: &[u8],
        info: &[u8],
        exporter_context: &[u8],
        exporter_length: usize,
    ) -> Result<ExporterSecret, CryptoError> {
        self.primitives.hpke_setup_receiver_and_export(
            config,
            enc,
            sk_r,
            info,
            exporter_context,
            exporter_length,
        )
    }

    fn derive_hpke_keypair(&self, config: HpkeConfig, ikm: &[u8]) -> Result<HpkeKeyPair, CryptoError> {
        self.primitives.derive_hpke_keypair(config, ikm)
    }
}

/// The OpenMLS provider of a client: [`SeededCrypto`] plus a storage backend
/// (in memory by default).
#[derive(Debug)]
pub struct MlsProvider<S = MemoryStorage> {
    crypto: SeededCrypto,
    storage: S,
}

impl MlsProvider<MemoryStorage> {
    /// A provider with in-memory storage whose randomness is determined by
    /// `seed` (tests and simulation).
    pub fn from_seed(seed: [u8; SEED_LEN]) -> Self {
        Self::with_storage(SeededCrypto::from_seed(seed), MemoryStorage::default())
    }

    /// A provider with in-memory storage seeded from the operating system.
    pub fn from_os_entropy() -> Self {
        Self::with_storage(SeededCrypto::from_os_entropy(), MemoryStorage::default())
    }
}

impl<S: StorageProvider<CURRENT_VERSION>> MlsProvider<S> {
    /// A provider over the given crypto and storage backend.
    pub fn with_storage(crypto: SeededCrypto, storage: S) -> Self {
        Self { crypto, storage }
    }
}

impl<S: StorageProvider<CURRENT_VERSION>> OpenMlsProvider for MlsProvider<S> {
    type CryptoProvider = SeededCrypto;
    type RandProvider = SeededCrypto;
    type StorageProvider = S;

    fn storage(&self) -> &Self::StorageProvider {
        &self.storage
    }

    fn crypto(&self) -> &Self::CryptoProvider {
        &self.crypto
    }

    fn rand(&self) -> &Self::RandProvider {
        &self.crypto
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;

    fn recipient(crypto: &SeededCrypto) -> HpkeKeyPair {
        crypto.derive_hpke_keypair(SUITE.hpke_config(), &[7u8; 32]).expect("derive recipient key")
    }

    #[test]
    fn seeded_hpke_seal_opens_with_rustcrypto() {
        let crypto = SeededCrypto::from_seed([1; SEED_LEN]);
        let keys = recipient(&crypto);
        let sealed =
            crypto.hpke_seal(SUITE.hpke_config(), &keys.public, b"info", b"aad", b"secret").expect("seal");
        let opened = RustCrypto::default()
            .hpke_open(SUITE.hpke_config(), &sealed, &keys.private, b"info", b"aad")
            .expect("open");
        assert_eq!(opened, b"secret");
        // A different aad must not open.
        assert!(RustCrypto::default()
            .hpke_open(SUITE.hpke_config(), &sealed, &keys.private, b"info", b"other")
            .is_err());
    }

    #[test]
    fn seeded_hpke_export_matches_rustcrypto_receiver() {
        let crypto = SeededCrypto::from_seed([2; SEED_LEN]);
        let keys = recipient(&crypto);
        let (enc, sender_secret) = crypto
            .hpke_setup_sender_and_export(SUITE.hpke_config(), &keys.public, b"info", b"ctx", 32)
            .expect("sender export");
        let receiver_secret = RustCrypto::default()
            .hpke_setup_receiver_and_export(SUITE.hpke_config(), &enc, &keys.private, b"info", b"ctx", 32)
            .expect("receiver export");
        assert_eq!(&*sender_secret, &*receiver_secret);
    }

    #[test]
    fn hpke_seal_is_a_function_of_seed_and_inputs() {
        let a = SeededCrypto::from_seed([3; SEED_LEN]);
        let b = SeededCrypto::from_seed([3; SEED_LEN]);
        let c = SeededCrypto::from_seed([4; SEED_LEN]);
        let keys = recipient(&a);
        let seal = |crypto: &SeededCrypto, ptxt: &[u8]| {
            crypto.hpke_seal(SUITE.hpke_config(), &keys.public, b"i", b"a", ptxt).expect("seal")
        };
        assert_eq!(seal(&a, b"x"), seal(&b, b"x"));
        assert_ne!(seal(&a, b"x").kem_output, seal(&a, b"y").kem_output);
        assert_ne!(seal(&a, b"x").kem_output, seal(&c, b"x").kem_output);
    }

    #[test]
    fn os_entropy_hpke_is_hedged() {
        let crypto = SeededCrypto::from_os_entropy();
        let keys = recipient(&crypto);
        let one = crypto.hpke_seal(SUITE.hpke_config(), &keys.public, b"i", b"a", b"p").expect("seal");
        let two = crypto.hpke_seal(SUITE.hpke_config(), &keys.public, b"i", b"a", b"p").expect("seal");
        assert_ne!(one.kem_output, two.kem_output);
    }

    #[test]
    fn random_draws_follow_the_seed() {
        let a = SeededCrypto::from_seed([5; SEED_LEN]);
        let b = SeededCrypto::from_seed([5; SEED_LEN]);
        let c = SeededCrypto::from_seed([6; SEED_LEN]);
        let draw = |crypto: &SeededCrypto| crypto.random_vec(48).expect("draw");
        let (from_a, from_b, from_c) = (draw(&a), draw(&b), draw(&c));
        assert_eq!(from_a, from_b);
        assert_ne!(from_a, from_c);
        // Successive draws differ.
        assert_ne!(draw(&a), from_a);
        let keygen =
            |crypto: &SeededCrypto| crypto.signature_key_gen(SignatureScheme::ED25519).expect("keygen");
        let fresh = SeededCrypto::from_seed([5; SEED_LEN]);
        assert_eq!(keygen(&fresh), keygen(&SeededCrypto::from_seed([5; SEED_LEN])));
        assert_ne!(keygen(&fresh), keygen(&SeededCrypto::from_seed([5; SEED_LEN])));
    }
}
