//! TLS for QUIC: the server's identity (an operator's certificate or a
//! self-signed one created on first run), the quinn server configuration,
//! and client configurations that pin a certificate fingerprint or verify
//! against root certificates.
//!
//! Everything is TLS 1.3 only, with ALPN [`ALPN`], on the *ring* provider.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest as _, Sha256};

/// ALPN protocol id of Kalandra over QUIC.
pub const ALPN: &[u8] = b"kalandra/1";
/// Directory inside the data directory that holds the self-signed identity.
pub const TLS_DIR_NAME: &str = "tls";
/// File name of the self-signed certificate (PEM).
pub const CERT_FILE_NAME: &str = "cert.pem";
/// File name of the self-signed certificate's private key (PEM, PKCS#8).
pub const KEY_FILE_NAME: &str = "key.pem";
/// Subject alternative names of the self-signed certificate.
pub const SELF_SIGNED_SUBJECT_ALT_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];
/// Common name of the self-signed certificate.
pub const SELF_SIGNED_COMMON_NAME: &str = "kalandra server (self-signed)";
/// Bidirectional streams a client may have open at once on one connection
/// (the protocol uses one; a few allow a reconnecting stream to overlap).
pub const BIDI_STREAMS_PER_CONNECTION_MAX: u32 = 4;
/// Interval at which clients send QUIC keep-alives.
pub const CLIENT_KEEP_ALIVE_INTERVAL_MS: u64 = 5_000;
/// Bytes a client may send on one stream ahead of the server reading them
/// (QUIC stream flow control). A sender pipelining a full window of
/// messages (4,096 frames of a few hundred bytes) is not throttled by it; a
/// larger frame (a commit, up to the protocol's payload limit) streams
/// through it. It bounds what one connection can make the server buffer.
pub const STREAM_RECEIVE_WINDOW_BYTES: u32 = 1024 * 1024;
/// Bytes a client may send on all its streams ahead of the server reading
/// them: the protocol uses one stream at a time.
pub const CONNECTION_RECEIVE_WINDOW_BYTES: u32 = 2 * STREAM_RECEIVE_WINDOW_BYTES;
/// Bytes written towards one client and not yet acknowledged by it, at
/// most: with the connection's outbox (`limits.send_queue_frames_max`
/// frames, `limits.send_queue_bytes_max` bytes) this bounds the memory a
/// slow reader holds. One megabyte keeps a
/// loopback or LAN link busy (quinn's default, ten, is sized for bulk
/// transfers over long paths).
pub const SEND_WINDOW_BYTES: u64 = 1024 * 1024;
/// Receive buffer asked for the server's UDP socket. Every connection's
/// packets arrive on that one socket: with the kernel's default (about
/// 200 KB) a burst of acknowledgements from a large room overflowed it and
/// the dropped packets cost loss-recovery timeouts. The kernel caps it at
/// `net.core.rmem_max`.
pub const UDP_RECEIVE_BUFFER_BYTES: usize = 8 * 1024 * 1024;
/// Send buffer asked for the server's UDP socket (capped at `net.core.wmem_max`).
pub const UDP_SEND_BUFFER_BYTES: usize = 8 * 1024 * 1024;

const _: () = assert!(CONNECTION_RECEIVE_WINDOW_BYTES >= STREAM_RECEIVE_WINDOW_BYTES);

/// The self-signed identity or the TLS configuration could not be loaded or built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file or directory could not be read, written or created.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A PEM file could not be parsed.
    #[error("{}: invalid PEM: {reason}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        reason: String,
    },
    /// A certificate file holds no certificate.
    #[error("{}: no certificate found", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// Only one of certificate and key was given or found.
    #[error("{} exists but {} does not: provide both or neither", present.display(), missing.display())]
    PartialIdentity {
        /// The file that exists or was given.
        present: PathBuf,
        /// The file that is missing.
        missing: PathBuf,
    },
    /// The private key is unusable or does not belong to the certificate.
    #[error("{}: {source}", key_path.display())]
    Key {
        /// The key file.
        key_path: PathBuf,
        /// Why.
        #[source]
        source: rustls::Error,
    },
    /// The self-signed certificate could not be generated.
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The crypto provider lacks the cipher suite QUIC needs for initial packets.
    #[error("QUIC needs TLS_AES_128_GCM_SHA256: {0}")]
    NoInitialCipherSuite(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    /// The idle timeout cannot be expressed in QUIC.
    #[error("idle timeout of {idle_timeout_ms} ms is too large for QUIC")]
    IdleTimeout {
        /// The rejected value.
        idle_timeout_ms: u64,
    },
}

/// The server's certificate chain and private key.
pub struct ServerTlsIdentity {
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    cert_path: PathBuf,
    created: bool,
}

impl std::fmt::Debug for ServerTlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTlsIdentity")
            .field("cert_path", &self.cert_path)
            .field("fingerprint_sha256", &self.fingerprint_sha256_hex())
            .field("created", &self.created)
            .finish_non_exhaustive()
    }
}

impl ServerTlsIdentity {
    /// The certificate chain, leaf first.
    pub fn cert_chain(&self) -> &[CertificateDer<'static>] {
        &self.cert_chain
    }

    /// The private key of the leaf certificate.
    pub fn key(&self) -> &PrivateKeyDer<'static> {
        &self.key
    }

    /// The leaf certificate's DER encoding.
    pub fn leaf(&self) -> &CertificateDer<'static> {
        // A chain is only built from a non-empty list (see `read_cert_chain`).
        &self.cert_chain[0]
    }

    /// SHA-256 of the leaf certificate's DER encoding: what clients pin.
    pub fn fingerprint_sha256(&self) -> [u8; 32] {
        fingerprint_sha256(self.leaf())
    }

    /// [`Self::fingerprint_sha256`] as 64 lowercase hex digits.
    pub fn fingerprint_sha256_hex(&self) -> String {
        hex::encode(self.fingerprint_sha256())
    }

    /// Whether the self-signed certificate was created by this call (first run).
    pub fn was_created(&self) -> bool {
        self.created
    }

    /// The file the certificate chain was read from or written to.
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }
}

/// SHA-256 of a certificate's DER encoding.
pub fn fingerprint_sha256(certificate: &CertificateDer<'_>) -> [u8; 32] {
    Sha256::digest(certificate.as_ref()).into()
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loads the server's identity.
///
/// With `cert_path` and `key_path`, reads that PEM certificate chain and
/// key. Without them, uses `<data_dir>/tls/cert.pem` and `key.pem`, creating
/// a self-signed certificate (and the directories) if neither exists. The key
/// must belong to the certificate.
pub fn load_or_create_server_identity(
    data_dir: &Path,
    cert_path: Option<&Path>,
    key_path: Option<&Path>,
) -> Result<ServerTlsIdentity, TlsError> {
    match (cert_path, key_path) {
        (Some(cert_path), Some(key_path)) => load_identity(cert_path, key_path, false),
        (Some(present), None) => Err(TlsError::PartialIdentity {
            present: present.to_owned(),
            missing: PathBuf::from("(no key path given)"),
        }),
        (None, Some(present)) => Err(TlsError::PartialIdentity {
            present: present.to_owned(),
            missing: PathBuf::from("(no certificate path given)"),
        }),
        (None, None) => {
            let dir = data_dir.join(TLS_DIR_NAME);
            let cert_path = dir.join(CERT_FILE_NAME);
            let key_path = dir.join(KEY_FILE_NAME);
            match (exists(&cert_path)?, exists(&key_path)?) {
                (true, true) => {
                    warn_if_key_is_readable_by_others(&key_path);
                    load_identity(&cert_path, &key_path, false)
                }
                (false, false) => {
                    create_self_signed(&dir, &cert_path, &key_path)?;
                    load_identity(&cert_path, &key_path, true)
                }
                (true, false) => Err(TlsError::PartialIdentity { present: cert_path, missing: key_path }),
                (false, true) => Err(TlsError::PartialIdentity { present: key_path, missing: cert_path }),
            }
        }
    }
}

fn exists(path: &Path) -> Result<bool, TlsError> {
    path.try_exists().map_err(|source| io_error(path, source))
}

fn io_error(path: &Path, source: std::io::Error) -> TlsError {
    TlsError::Io { path: path.to_owned(), source }
}

fn read_cert_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = std::fs::read(path).map_err(|source| io_error(path, source))?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| TlsError::Pem { path: path.to_owned(), reason: error.to_string() })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate { path: path.to_owned() });
    }
    Ok(chain)
}

fn load_identity(cert_path: &Path, key_path: &Path, created: bool) -> Result<ServerTlsIdentity, TlsError> {
    let cert_chain = read_cert_chain(cert_path)?;
    let key_pem = std::fs::read(key_path).map_err(|source| io_error(key_path, source))?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|error| TlsError::Pem { path: key_path.to_owned(), reason: error.to_string() })?;
    // Fails on an unsupported key type and on a key that is not the leaf's.
    rustls::sign::CertifiedKey::from_der(cert_chain.clone(), key.clone_key(), &provider())
        .map_err(|source| TlsError::Key { key_path: key_path.to_owned(), source })?;
    Ok(ServerTlsIdentity { cert_chain, key, cert_path: cert_path.to_owned(), created })
}

fn create_self_signed(dir: &Path, cert_path: &Path, key_path: &Path) -> Result<(), TlsError> {
    let names: Vec<String> = SELF_SIGNED_SUBJECT_ALT_NAMES.iter().map(|name| (*name).to_owned()).collect();
    let mut params = rcgen::CertificateParams::new(names)?;
    let mut subject = rcgen::DistinguishedName::new();
    subject.push(rcgen::DnType::CommonName, SELF_SIGNED_COMMON_NAME);
    params.distinguished_name = subject;
    let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let certificate = params.self_signed(&key_pair)?;

    create_private_dir(dir)?;
    // The key first: a crash in between leaves a key without a certificate,
    // which is reported rather than silently replaced.
    write_file_atomically(key_path, key_pair.serialize_pem().as_bytes(), true)?;
    write_file_atomically(cert_path, certificate.pem().as_bytes(), false)?;
    sync_dir(dir)?;
    tracing::info!(cert_path = %cert_path.display(), "created a self-signed TLS certificate");
    Ok(())
}

fn create_private_dir(dir: &Path) -> Result<(), TlsError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt as _;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(|source| io_error(dir, source))
}

/// Writes `contents` to a temporary file beside `path`, flushes it to disk
/// and renames it over `path`. `private` files get mode 0600 on Unix.
fn write_file_atomically(path: &Path, contents: &[u8], private: bool) -> Result<(), TlsError> {
    let mut temporary_name = path.as_os_str().to_owned();
    temporary_name.push(".tmp");
    let temporary = PathBuf::from(temporary_name);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(&temporary).map_err(|source| io_error(&temporary, source))?;
    #[cfg(unix)]
    if private {
        // `mode` applies only on creation; a leftover temporary file keeps its own.
        use std::os::unix::fs::PermissionsExt as _;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(|source| io_error(&temporary, source))?;
    }
    #[cfg(not(unix))]
    let _ = private;
    file.write_all(contents).map_err(|source| io_error(&temporary, source))?;
    file.sync_all().map_err(|source| io_error(&temporary, source))?;
    drop(file);
    std::fs::rename(&temporary, path).map_err(|source| io_error(path, source))
}

fn sync_dir(dir: &Path) -> Result<(), TlsError> {
    #[cfg(unix)]
    {
        let handle = std::fs::File::open(dir).map_err(|source| io_error(dir, source))?;
        handle.sync_all().map_err(|source| io_error(dir, source))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

fn warn_if_key_is_readable_by_others(key_path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        if let Ok(metadata) = std::fs::metadata(key_path) {
            let mode = metadata.permissions().mode();
            if mode & 0o077 != 0 {
                tracing::warn!(
                    key_path = %key_path.display(),
                    mode = %format!("{:o}", mode & 0o777),
                    "the TLS private key is accessible to other users; chmod 600 it"
                );
            }
        }
    }
    #[cfg(not(unix))]
    let _ = key_path;
}

/// The quinn server configuration for `identity`: TLS 1.3 only, ALPN
/// [`ALPN`], no 0-RTT, at most [`BIDI_STREAMS_PER_CONNECTION_MAX`]
/// bidirectional and no unidirectional streams per connection, no QUIC
/// datagrams, flow-control windows sized for a messaging server
/// ([`STREAM_RECEIVE_WINDOW_BYTES`], [`SEND_WINDOW_BYTES`]), and the given
/// idle timeout (clients keep connections alive).
pub fn quinn_server_config(
    identity: &ServerTlsIdentity,
    idle_timeout_ms: u64,
) -> Result<quinn::ServerConfig, TlsError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(identity.cert_chain.clone(), identity.key.clone_key())?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    // No early data: 0-RTT frames could be replayed.
    tls.max_early_data_size = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;

    let idle_timeout = quinn::IdleTimeout::try_from(Duration::from_millis(idle_timeout_ms))
        .map_err(|_| TlsError::IdleTimeout { idle_timeout_ms })?;
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(idle_timeout))
        .keep_alive_interval(None)
        .max_concurrent_bidi_streams(quinn::VarInt::from_u32(BIDI_STREAMS_PER_CONNECTION_MAX))
        .max_concurrent_uni_streams(quinn::VarInt::from_u32(0))
        .stream_receive_window(quinn::VarInt::from_u32(STREAM_RECEIVE_WINDOW_BYTES))
        .receive_window(quinn::VarInt::from_u32(CONNECTION_RECEIVE_WINDOW_BYTES))
        .send_window(SEND_WINDOW_BYTES)
        // The protocol does not use QUIC datagrams: none are accepted or buffered.
        .datagram_receive_buffer_size(None)
        .datagram_send_buffer_size(0);
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Binds the UDP socket of the QUIC listener, with enlarged buffers; the
/// server binds it first, so that a port in use is reported before anything
/// is created.
pub fn bind_quic_socket(address: std::net::SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let socket = std::net::UdpSocket::bind(address)?;
    let state = quinn::udp::UdpSocketState::new((&socket).into())?;
    if let Err(error) = state.set_recv_buffer_size((&socket).into(), UDP_RECEIVE_BUFFER_BYTES) {
        tracing::warn!(%error, "could not enlarge the UDP receive buffer");
    }
    if let Err(error) = state.set_send_buffer_size((&socket).into(), UDP_SEND_BUFFER_BYTES) {
        tracing::warn!(%error, "could not enlarge the UDP send buffer");
    }
    Ok(socket)
}

/// A QUIC server endpoint on a socket from [`bind_quic_socket`].
pub fn quinn_server_endpoint_on(
    config: quinn::ServerConfig,
    socket: std::net::UdpSocket,
) -> std::io::Result<quinn::Endpoint> {
    let runtime = quinn::default_runtime().ok_or_else(|| std::io::Error::other("no async runtime"))?;
    quinn::Endpoint::new(quinn::EndpointConfig::default(), Some(config), socket, runtime)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, SocketAddr};

    const ECHO_BYTES: &[u8] = b"kalandra echo";
    const TEST_IDLE_TIMEOUT_MS: u64 = 10_000;

    #[test]
    fn self_signed_identity_is_created_once_then_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data_dir = dir.path().join("data");
        let first = load_or_create_server_identity(&data_dir, None, None).expect("create");
        assert!(first.was_created());
        assert_eq!(first.cert_path(), data_dir.join("tls").join("cert.pem"));
        assert_eq!(first.fingerprint_sha256_hex().len(), 64);
        assert_eq!(first.cert_chain().len(), 1);

        let second = load_or_create_server_identity(&data_dir, None, None).expect("load");
        assert!(!second.was_created());
        assert_eq!(second.fingerprint_sha256(), first.fingerprint_sha256());
        assert_eq!(second.key().secret_der(), first.key().secret_der());

        let other = load_or_create_server_identity(&dir.path().join("other"), None, None).expect("create");
        assert_ne!(other.fingerprint_sha256(), first.fingerprint_sha256());
    }

    #[cfg(unix)]
    #[test]
    fn private_key_is_owner_only() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        load_or_create_server_identity(dir.path(), None, None).expect("create");
        let tls_dir = dir.path().join(TLS_DIR_NAME);
        let key_mode = std::fs::metadata(tls_dir.join(KEY_FILE_NAME)).expect("key").permissions().mode();
        assert_eq!(key_mode & 0o777, 0o600);
        let dir_mode = std::fs::metadata(&tls_dir).expect("dir").permissions().mode();
        assert_eq!(dir_mode & 0o077, 0);
    }

    #[test]
    fn explicit_paths_are_used() {
        let dir = tempfile::tempdir().expect("tempdir");
        let generated = load_or_create_server_identity(&dir.path().join("a"), None, None).expect("create");
        let tls_dir = dir.path().join("a").join(TLS_DIR_NAME);
        let cert = dir.path().join("chain.pem");
        let key = dir.path().join("private.pem");
        std::fs::copy(tls_dir.join(CERT_FILE_NAME), &cert).expect("copy cert");
        std::fs::copy(tls_dir.join(KEY_FILE_NAME), &key).expect("copy key");

        let empty_data_dir = dir.path().join("unused");
        let loaded = load_or_create_server_identity(&empty_data_dir, Some(&cert), Some(&key)).expect("load");
        assert!(!loaded.was_created());
        assert_eq!(loaded.fingerprint_sha256(), generated.fingerprint_sha256());
        assert_eq!(loaded.cert_path(), cert);
        assert!(!empty_data_dir.exists(), "nothing is created with explicit paths");
    }

    #[test]
    fn bad_identities_are_rejected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = load_or_create_server_identity(&dir.path().join("a"), None, None).expect("a");
        drop(a);
        load_or_create_server_identity(&dir.path().join("b"), None, None).expect("b");
        let cert_a = dir.path().join("a").join(TLS_DIR_NAME).join(CERT_FILE_NAME);
        let key_b = dir.path().join("b").join(TLS_DIR_NAME).join(KEY_FILE_NAME);

        let mismatch = load_or_create_server_identity(dir.path(), Some(&cert_a), Some(&key_b));
        assert!(matches!(mismatch, Err(TlsError::Key { .. })), "{mismatch:?}");

        let only_cert = load_or_create_server_identity(dir.path(), Some(&cert_a), None);
        assert!(matches!(only_cert, Err(TlsError::PartialIdentity { .. })), "{only_cert:?}");

        let missing =
            load_or_create_server_identity(dir.path(), Some(&dir.path().join("nope.pem")), Some(&key_b));
        assert!(matches!(missing, Err(TlsError::Io { .. })), "{missing:?}");

        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not pem at all").expect("write");
        let no_cert = load_or_create_server_identity(dir.path(), Some(&garbage), Some(&key_b));
        assert!(matches!(no_cert, Err(TlsError::NoCertificate { .. })), "{no_cert:?}");
        let no_key = load_or_create_server_identity(dir.path(), Some(&cert_a), Some(&garbage));
        assert!(matches!(no_key, Err(TlsError::Pem { .. })), "{no_key:?}");

        // A self-signed directory with only one of the two files is reported, not replaced.
        std::fs::remove_file(&key_b).expect("remove key");
        let partial = load_or_create_server_identity(&dir.path().join("b"), None, None);
        assert!(matches!(partial, Err(TlsError::PartialIdentity { .. })), "{partial:?}");
    }

    #[test]
    fn idle_timeout_beyond_quic_range_is_rejected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let identity = load_or_create_server_identity(dir.path(), None, None).expect("create");
        assert!(quinn_server_config(&identity, TEST_IDLE_TIMEOUT_MS).is_ok());
        let result = quinn_server_config(&identity, u64::MAX);
        assert!(matches!(result, Err(TlsError::IdleTimeout { .. })), "{result:?}");
    }

    /// A server on 127.0.0.1:0 that echoes one bidirectional stream per connection.
    fn echo_server(identity: &ServerTlsIdentity) -> (quinn::Endpoint, tokio::task::JoinHandle<()>) {
        let config = quinn_server_config(identity, TEST_IDLE_TIMEOUT_MS).expect("server config");
        let endpoint =
            quinn::Endpoint::server(config, SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).expect("bind");
        let accepting = endpoint.clone();
        let task = tokio::spawn(async move {
            while let Some(incoming) = accepting.accept().await {
                let Ok(connection) = incoming.await else { continue };
                tokio::spawn(async move {
                    let Ok((mut send, mut recv)) = connection.accept_bi().await else { return };
                    let Ok(bytes) = recv.read_to_end(1024).await else { return };
                    if send.write_all(&bytes).await.is_ok() {
                        let _ = send.finish();
                        let _ = send.stopped().await;
                    }
                });
            }
        });
        (endpoint, task)
    }

    async fn echo(
        client_config: quinn::ClientConfig,
        server: SocketAddr,
        server_name: &str,
    ) -> Result<Vec<u8>, String> {
        let mut client =
            quinn::Endpoint::client(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).map_err(|e| e.to_string())?;
        client.set_default_client_config(client_config);
        let connection = client
            .connect(server, server_name)
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        let alpn = connection
            .handshake_data()
            .and_then(|data| data.downcast::<quinn::crypto::rustls::HandshakeData>().ok()?.protocol);
        if alpn.as_deref() != Some(ALPN) {
            return Err(format!("negotiated ALPN {alpn:?}"));
        }
        let (mut send, mut recv) = connection.open_bi().await.map_err(|e| e.to_string())?;
        send.write_all(ECHO_BYTES).await.map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        let reply = recv.read_to_end(1024).await.map_err(|e| e.to_string())?;
        connection.close(quinn::VarInt::from_u32(0), b"done");
        client.wait_idle().await;
        Ok(reply)
    }

    #[tokio::test]
    async fn pinned_client_connects_only_with_the_right_pin() {
        let dir = tempfile::tempdir().expect("tempdir");
        let identity = load_or_create_server_identity(dir.path(), None, None).expect("identity");
        let (server, task) = echo_server(&identity);
        let address = server.local_addr().expect("address");
        let timeout = Duration::from_secs(10);

        let right =
            client_core::tls::client_config_pinned(identity.fingerprint_sha256()).expect("client config");
        // The pin ignores the name: any server name is accepted for the pinned certificate.
        let reply = tokio::time::timeout(timeout, echo(right, address, "not-in-the-certificate"))
            .await
            .expect("in time")
            .expect("echo with the right pin");
        assert_eq!(reply, ECHO_BYTES);

        let mut wrong_pin = identity.fingerprint_sha256();
        wrong_pin[0] ^= 1;
        let wrong = client_core::tls::client_config_pinned(wrong_pin).expect("client config");
        let result = tokio::time::timeout(timeout, echo(wrong, address, "localhost")).await.expect("in time");
        let error = result.expect_err("a wrong pin must not connect");
        assert!(error.contains("certificate") || error.contains("Certificate"), "{error}");

        server.close(quinn::VarInt::from_u32(0), b"bye");
        task.abort();
    }

    #[tokio::test]
    async fn root_verified_client_checks_chain_and_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let identity = load_or_create_server_identity(dir.path(), None, None).expect("identity");
        let (server, task) = echo_server(&identity);
        let address = server.local_addr().expect("address");
        let timeout = Duration::from_secs(10);
        let ca = dir.path().join(TLS_DIR_NAME).join(CERT_FILE_NAME);

        for name in ["localhost", "127.0.0.1"] {
            let config = client_core::tls::client_config_with_roots(&ca).expect("client config");
            let reply = tokio::time::timeout(timeout, echo(config, address, name))
                .await
                .expect("in time")
                .expect("echo with the right root");
            assert_eq!(reply, ECHO_BYTES);
        }

        let config = client_core::tls::client_config_with_roots(&ca).expect("client config");
        let wrong_name =
            tokio::time::timeout(timeout, echo(config, address, "example.org")).await.expect("in time");
        assert!(wrong_name.is_err(), "a name outside the certificate must not connect");

        let other_dir = tempfile::tempdir().expect("tempdir");
        load_or_create_server_identity(other_dir.path(), None, None).expect("other identity");
        let other_ca = other_dir.path().join(TLS_DIR_NAME).join(CERT_FILE_NAME);
        let config = client_core::tls::client_config_with_roots(&other_ca).expect("client config");
        let wrong_root =
            tokio::time::timeout(timeout, echo(config, address, "localhost")).await.expect("in time");
        assert!(wrong_root.is_err(), "an unrelated root must not connect");

        server.close(quinn::VarInt::from_u32(0), b"bye");
        task.abort();
    }
}
