//! Client-side TLS for QUIC: trust the server by certificate fingerprint
//! (what a zero-configuration server prints on first start), by a root
//! certificate file, or by the system's roots; TLS 1.3 only, ALPN
//! `kalandra/1`.
//!
//! [`client_tls`] also returns a [`CertificateVerdict`]: after a failed
//! handshake it says whether (and why) the server's certificate was refused,
//! so that a wrong pin is reported as a fingerprint mismatch rather than as
//! a generic TLS alert.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest as _, Sha256};

/// ALPN protocol id of Kalandra over QUIC.
pub const ALPN: &[u8] = b"kalandra/1";
/// How often an idle client connection sends a QUIC keep-alive.
pub const KEEP_ALIVE_INTERVAL_MS: u64 = 5_000;

/// Why a client TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientTlsError {
    /// The root certificate file could not be read or parsed.
    #[error("root certificates {path}: {detail}")]
    Roots {
        /// The file.
        path: String,
        /// What went wrong.
        detail: String,
    },
    /// rustls or quinn refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
    /// The system has no usable root certificates.
    #[error("no system root certificates found ({0})")]
    NoSystemRoots(String),
}

/// How a client recognises its server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerTrust {
    /// Exactly the certificate whose DER has this SHA-256 (names, issuer and
    /// validity are not checked).
    Fingerprint([u8; 32]),
    /// A chain to one of the roots in this PEM file, valid for the server name.
    CaFile(PathBuf),
    /// A chain to one of the system's roots (as `SSL_CERT_FILE` /
    /// `SSL_CERT_DIR` or the platform store give them), valid for the server name.
    SystemRoots,
}

/// Why the server's certificate was refused during a handshake.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertificateRefusal {
    /// A pinned fingerprint and the certificate presented differ.
    #[error(
        "server certificate fingerprint mismatch: expected {expected}, the server presented {presented}"
    )]
    FingerprintMismatch {
        /// The pinned fingerprint (hex).
        expected: String,
        /// The presented certificate's fingerprint (hex).
        presented: String,
    },
    /// The chain or the name did not verify against the roots.
    #[error("server certificate not trusted: {0}")]
    Untrusted(String),
}

/// The certificate check's refusal, if it refused (shared with the verifier
/// inside a [`ClientTls`]'s configuration).
#[derive(Debug, Clone, Default)]
pub struct CertificateVerdict(Arc<Mutex<Option<CertificateRefusal>>>);

impl CertificateVerdict {
    /// The refusal recorded by the last failed certificate check.
    pub fn refusal(&self) -> Option<CertificateRefusal> {
        self.0.lock().map_or(None, |slot| slot.clone())
    }

    fn record(&self, refusal: CertificateRefusal) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(refusal);
        }
    }
}

/// A client configuration and the verdict its certificate check reports to.
#[derive(Clone)]
pub struct ClientTls {
    /// The QUIC client configuration.
    pub config: quinn::ClientConfig,
    /// Filled in when the server's certificate is refused.
    pub verdict: CertificateVerdict,
}

/// The client configuration for `trust`.
pub fn client_tls(trust: &ServerTrust) -> Result<ClientTls, ClientTlsError> {
    let verdict = CertificateVerdict::default();
    let provider = provider();
    let algorithms = provider.signature_verification_algorithms;
    let verifier: Arc<dyn ServerCertVerifier> = match trust {
        ServerTrust::Fingerprint(fingerprint_sha256) => Arc::new(PinnedServerCertVerifier {
            fingerprint_sha256: *fingerprint_sha256,
            algorithms,
            verdict: Some(verdict.clone()),
        }),
        ServerTrust::CaFile(path) => {
            Arc::new(RootsVerifier::new(roots_from_file(path)?, &provider, verdict.clone())?)
        }
        ServerTrust::SystemRoots => {
            Arc::new(RootsVerifier::new(system_roots()?, &provider, verdict.clone())?)
        }
    };
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientTlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(ClientTls { config: quic_config(tls)?, verdict })
}

fn roots_from_file(ca_pem_path: &Path) -> Result<rustls::RootCertStore, ClientTlsError> {
    let roots_error =
        |detail: String| ClientTlsError::Roots { path: ca_pem_path.display().to_string(), detail };
    let mut roots = rustls::RootCertStore::empty();
    for certificate in CertificateDer::pem_file_iter(ca_pem_path).map_err(|e| roots_error(e.to_string()))? {
        let certificate = certificate.map_err(|e| roots_error(e.to_string()))?;
        roots.add(certificate).map_err(|e| roots_error(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(roots_error("no certificate in the file".into()));
    }
    Ok(roots)
}

fn system_roots() -> Result<rustls::RootCertStore, ClientTlsError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    let (_added, _ignored) = roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        let detail = found.errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
        return Err(ClientTlsError::NoSystemRoots(if detail.is_empty() {
            "none installed".into()
        } else {
            detail
        }));
    }
    Ok(roots)
}

/// Standard chain and name verification that records why it refused.
#[derive(Debug)]
struct RootsVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    verdict: CertificateVerdict,
}

impl RootsVerifier {
    fn new(
        roots: rustls::RootCertStore,
        provider: &Arc<CryptoProvider>,
        verdict: CertificateVerdict,
    ) -> Result<RootsVerifier, ClientTlsError> {
        let inner =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| ClientTlsError::Config(e.to_string()))?;
        Ok(RootsVerifier { inner, verdict })
    }
}

impl ServerCertVerifier for RootsVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let result =
            self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now);
        if let Err(error) = &result {
            let name = server_name.to_str();
            self.verdict.record(CertificateRefusal::Untrusted(format!("{error} (server name {name})")));
        }
        result
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Lower-case hex of a fingerprint.
pub fn fingerprint_hex(fingerprint: &[u8; 32]) -> String {
    fingerprint.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// SHA-256 of a certificate's DER encoding.
pub fn fingerprint_sha256(certificate: &CertificateDer<'_>) -> [u8; 32] {
    Sha256::digest(certificate.as_ref()).into()
}

/// SHA-256 fingerprint of the first certificate in the PEM file at `path`
/// (e.g. the server's `tls/cert.pem`).
pub fn fingerprint_of_pem_file(path: &Path) -> Result<[u8; 32], ClientTlsError> {
    let roots_error = |detail: String| ClientTlsError::Roots { path: path.display().to_string(), detail };
    let first = CertificateDer::pem_file_iter(path)
        .map_err(|e| roots_error(e.to_string()))?
        .next()
        .ok_or_else(|| roots_error("no certificate in the file".into()))?
        .map_err(|e| roots_error(e.to_string()))?;
    Ok(fingerprint_sha256(&first))
}

/// Parses a fingerprint written as 64 hex digits (colons allowed).
pub fn parse_fingerprint(text: &str) -> Option<[u8; 32]> {
    let digits: Vec<u8> = text.trim().bytes().filter(|b| *b != b':').collect();
    if digits.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in digits.chunks(2).enumerate() {
        out[i] = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(out)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn quic_config(mut tls: rustls::ClientConfig) -> Result<quinn::ClientConfig, ClientTlsError> {
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| ClientTlsError::Config(e.to_string()))?;
    let mut transport = quinn::TransportConfig::default();
    transport
        .keep_alive_interval(Some(Duration::from_millis(KEEP_ALIVE_INTERVAL_MS)))
        .max_concurrent_bidi_streams(quinn::VarInt::from_u32(0))
        .max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// A configuration that accepts exactly the server certificate whose DER
/// encoding has SHA-256 `fingerprint_sha256`, whatever its names, issuer or
/// validity. The TLS 1.3 handshake signature is still verified with that
/// certificate's key.
pub fn client_config_pinned(fingerprint_sha256: [u8; 32]) -> Result<quinn::ClientConfig, ClientTlsError> {
    let provider = provider();
    let verifier = PinnedServerCertVerifier {
        fingerprint_sha256,
        algorithms: provider.signature_verification_algorithms,
        verdict: None,
    };
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientTlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    quic_config(tls)
}

/// A configuration that verifies the server's chain and name against the
/// root certificates in the PEM file `ca_pem_path`.
pub fn client_config_with_roots(ca_pem_path: &Path) -> Result<quinn::ClientConfig, ClientTlsError> {
    let roots = roots_from_file(ca_pem_path)?;
    let tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientTlsError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    quic_config(tls)
}

/// Accepts exactly one certificate, identified by the SHA-256 of its DER.
#[derive(Debug)]
struct PinnedServerCertVerifier {
    fingerprint_sha256: [u8; 32],
    algorithms: WebPkiSupportedAlgorithms,
    verdict: Option<CertificateVerdict>,
}

impl ServerCertVerifier for PinnedServerCertVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = fingerprint_sha256(end_entity);
        if presented == self.fingerprint_sha256 {
            Ok(ServerCertVerified::assertion())
        } else {
            if let Some(verdict) = &self.verdict {
                verdict.record(CertificateRefusal::FingerprintMismatch {
                    expected: fingerprint_hex(&self.fingerprint_sha256),
                    presented: fingerprint_hex(&presented),
                });
            }
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Only TLS 1.3 is offered.
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_with_or_without_colons() {
        let hex = "f59309b388cc6a81ff8c3a97c56e439b29be0e83a98b374e94295c62940d3f48";
        let parsed = parse_fingerprint(hex).unwrap();
        assert_eq!(parsed[0], 0xf5);
        assert_eq!(parsed[31], 0x48);
        let with_colons: String =
            hex.as_bytes().chunks(2).map(|p| std::str::from_utf8(p).unwrap()).collect::<Vec<_>>().join(":");
        assert_eq!(parse_fingerprint(&with_colons), Some(parsed));
        assert_eq!(parse_fingerprint(&hex[..62]), None);
        assert_eq!(parse_fingerprint(&hex.replace('f', "g")), None);
    }
}
