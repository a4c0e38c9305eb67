//! A QUIC connection to a Kalandra server: TLS 1.3 with a pinned server
//! certificate (or normal root verification), the Ed25519 challenge-response,
//! then frames in both directions on one bidirectional stream.
//!
//! This is a thin driver: framing is [`kalandra_proto::FrameDecoder`],
//! authentication is [`kalandra_proto::sign::sign_auth_challenge`], TLS
//! configuration is [`crate::tls`].

pub use crate::tls::{client_config_pinned, parse_fingerprint};
use crate::tls::{CertificateRefusal, ClientTls};

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use kalandra_proto::payload::{AuthChallenge, AuthOk, AuthResponse, Hello};
use kalandra_proto::sign::sign_auth_challenge;
use kalandra_proto::{
    DecodeError, Frame, FrameDecoder, FrameHeaderBuf, Opcode, Payload, SenderId, PROTOCOL_VERSION,
};

/// Frames received but not yet asked for that a connection keeps.
pub const RECEIVED_FRAMES_BUFFERED_MAX: usize = 65_536;
/// Bytes read from the stream at a time.
pub const READ_CHUNK_BYTES_MAX: usize = 64 * 1024;

/// Why connecting or talking to the server failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// The TLS configuration could not be built.
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// The server could not be reached.
    #[error("cannot reach the server: {0}")]
    Unreachable(String),
    /// The server's certificate was refused (a wrong pin, an untrusted
    /// chain, a name the certificate is not valid for).
    #[error(transparent)]
    Certificate(#[from] CertificateRefusal),
    /// The connection was lost.
    #[error("connection lost: {0}")]
    Lost(String),
    /// The server closed the stream.
    #[error("the server closed the connection")]
    Closed,
    /// The server sent bytes that are not frames.
    #[error("server sent an invalid frame: {0}")]
    Protocol(#[from] DecodeError),
    /// The server answered the handshake with something unexpected.
    #[error("unexpected {0:?} during authentication")]
    UnexpectedFrame(Opcode),
    /// The server refused us with an `Error` frame.
    #[error("server error {code}: {message}")]
    Refused {
        /// The error code.
        code: u16,
        /// Its message.
        message: String,
    },
    /// No answer in time.
    #[error("timed out")]
    TimedOut,
    /// Too many frames arrived that nobody asked for.
    #[error("too many unread frames")]
    Overflow,
}

/// An authenticated connection to a server.
pub struct Connection {
    endpoint: quinn::Endpoint,
    connection: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
    received: VecDeque<Frame>,
    sender_id: SenderId,
    server_key: [u8; 32],
    home_certificate: Option<kalandra_proto::federation::HomeCertificate>,
    next_request_id: u32,
    timeout: Duration,
}

impl Connection {
    /// Connects to `address`, authenticates with `identity`, and returns the connection.
    pub async fn connect(
        address: SocketAddr,
        server_name: &str,
        config: quinn::ClientConfig,
        identity: &SigningKey,
        timeout: Duration,
    ) -> Result<Connection, ConnectionError> {
        let endpoint = client_endpoint(address)?;
        Connection::connect_on(endpoint, address, server_name, config, identity, timeout).await
    }

    /// Like [`Connection::connect`], over an existing client `endpoint`
    /// (one UDP socket can carry many connections, as in a load generator).
    /// [`Connection::close`] waits for the whole endpoint to go idle, so
    /// connections sharing an endpoint are better dropped.
    pub async fn connect_on(
        endpoint: quinn::Endpoint,
        address: SocketAddr,
        server_name: &str,
        config: quinn::ClientConfig,
        identity: &SigningKey,
        timeout: Duration,
    ) -> Result<Connection, ConnectionError> {
        let connecting = endpoint
            .connect_with(config, address, server_name)
            .map_err(|e| ConnectionError::Unreachable(e.to_string()))?;
        let connection = tokio::time::timeout(timeout, connecting)
            .await
            .map_err(|_| ConnectionError::Unreachable(format!("no answer from {address} in {timeout:?}")))?
            .map_err(|e| ConnectionError::Unreachable(e.to_string()))?;
        Connection::authenticated(endpoint, connection, identity, timeout).await
    }

    /// Connects to the first of `addresses` (those of one host name) whose
    /// handshake completes, trying them at once, then authenticates.
    /// A certificate refusal is reported as [`ConnectionError::Certificate`].
    pub async fn connect_any(
        addresses: &[SocketAddr],
        server_name: &str,
        tls: ClientTls,
        identity: &SigningKey,
        timeout: Duration,
    ) -> Result<Connection, ConnectionError> {
        let mut attempts = tokio::task::JoinSet::new();
        let mut last_error = ConnectionError::Unreachable("no address to try".into());
        for address in addresses.iter().take(crate::target::RESOLVED_ADDRESSES_TRIED_MAX) {
            match client_endpoint(*address)
                .and_then(|endpoint| handshake(endpoint, *address, server_name, tls.config.clone()))
            {
                Ok(attempt) => {
                    attempts.spawn(tokio::time::timeout(timeout, attempt));
                }
                Err(error) => last_error = error,
            }
        }
        while let Some(joined) = attempts.join_next().await {
            match joined {
                Ok(Ok(Ok((endpoint, connection)))) => {
                    attempts.abort_all();
                    return Connection::authenticated(endpoint, connection, identity, timeout).await;
                }
                Ok(Ok(Err(error))) => {
                    if let Some(refusal) = tls.verdict.refusal() {
                        // The host presented a certificate we do not trust: say so now.
                        attempts.abort_all();
                        return Err(ConnectionError::Certificate(refusal));
                    }
                    last_error = error;
                }
                Ok(Err(_elapsed)) => {
                    last_error = ConnectionError::Unreachable(format!("no answer in {timeout:?}"));
                }
                Err(join_error) => last_error = ConnectionError::Unreachable(join_error.to_string()),
            }
        }
        Err(tls.verdict.refusal().map_or(last_error, ConnectionError::Certificate))
    }

    async fn authenticated(
        endpoint: quinn::Endpoint,
        connection: quinn::Connection,
        identity: &SigningKey,
        timeout: Duration,
    ) -> Result<Connection, ConnectionError> {
        let (send, recv) = connection.open_bi().await.map_err(|e| ConnectionError::Lost(e.to_string()))?;
        let mut this = Connection {
            endpoint,
            connection,
            send,
            recv,
            decoder: FrameDecoder::new(),
            received: VecDeque::new(),
            sender_id: SenderId::from_identity_key(identity.verifying_key().as_bytes()),
            server_key: [0; 32],
            home_certificate: None,
            next_request_id: 1,
            timeout,
        };
        this.authenticate(identity).await?;
        Ok(this)
    }

    async fn authenticate(&mut self, identity: &SigningKey) -> Result<(), ConnectionError> {
        let hello = Hello {
            versions: vec![PROTOCOL_VERSION],
            identity_key: identity.verifying_key().to_bytes(),
            client_name: concat!("kalandra-client-core/", env!("CARGO_PKG_VERSION")).to_string(),
        };
        self.send_payload(FrameHeaderBuf::new(Opcode::Hello), &hello).await?;
        let challenge: AuthChallenge = self.expect_reply(Opcode::AuthChallenge).await?;
        let response = AuthResponse { signature: sign_auth_challenge(identity, &challenge.nonce) };
        self.send_payload(FrameHeaderBuf::new(Opcode::AuthResponse), &response).await?;
        let ok: AuthOk = self.expect_reply(Opcode::AuthOk).await?;
        if ok.sender_id != self.sender_id.0 {
            return Err(ConnectionError::UnexpectedFrame(Opcode::AuthOk));
        }
        self.server_key = ok.server_key;
        self.home_certificate = ok.home_certificate;
        Ok(())
    }

    async fn expect_reply<P: Payload>(&mut self, opcode: Opcode) -> Result<P, ConnectionError> {
        let frame = self.recv().await?;
        if frame.opcode() == Opcode::Error {
            return Err(refused(&frame));
        }
        if frame.opcode() != opcode {
            return Err(ConnectionError::UnexpectedFrame(frame.opcode()));
        }
        frame.decode_payload().map_err(|_| ConnectionError::UnexpectedFrame(opcode))
    }

    async fn send_payload<P: Payload>(
        &mut self,
        header: FrameHeaderBuf,
        payload: &P,
    ) -> Result<(), ConnectionError> {
        let frame = Frame::with_payload(header, payload).map_err(|e| ConnectionError::Tls(e.to_string()))?;
        self.send(&frame).await
    }

    /// This connection's sender id (bound by the server).
    pub fn sender_id(&self) -> SenderId {
        self.sender_id
    }

    /// The server's Ed25519 signing key (list it in a new room's external senders).
    pub fn server_key(&self) -> [u8; 32] {
        self.server_key
    }

    /// The home certificate the server issued this client in `AuthOk`, if any.
    pub fn home_certificate(&self) -> Option<&kalandra_proto::federation::HomeCertificate> {
        self.home_certificate.as_ref()
    }

    /// A fresh request id.
    pub fn next_request_id(&mut self) -> u32 {
        let id = self.next_request_id;
        self.next_request_id = self.next_request_id.wrapping_add(1).max(1);
        id
    }

    /// Sends one frame.
    pub async fn send(&mut self, frame: &Frame) -> Result<(), ConnectionError> {
        self.send_bytes(&frame.to_bytes()).await
    }

    /// Sends raw bytes (for tests of the server's handling of bad input).
    pub async fn send_bytes(&mut self, bytes: &[u8]) -> Result<(), ConnectionError> {
        self.send.write_all(bytes).await.map_err(|e| ConnectionError::Lost(e.to_string()))
    }

    /// The next frame from the server, waiting up to the connection's timeout.
    pub async fn recv(&mut self) -> Result<Frame, ConnectionError> {
        if let Some(frame) = self.received.pop_front() {
            return Ok(frame);
        }
        tokio::time::timeout(self.timeout, self.read_frame()).await.map_err(|_| ConnectionError::TimedOut)?
    }

    /// The next frame already received and buffered, without waiting for
    /// the network (frames arrive in chunks; [`Connection::recv`] buffers
    /// the rest of a chunk).
    pub fn try_recv(&mut self) -> Option<Frame> {
        self.received.pop_front()
    }

    async fn read_frame(&mut self) -> Result<Frame, ConnectionError> {
        let mut bounded_reads = 0u64;
        loop {
            bounded_reads += 1;
            debug_assert!(bounded_reads < u64::MAX);
            let chunk = self
                .recv
                .read_chunk(READ_CHUNK_BYTES_MAX, true)
                .await
                .map_err(|e| ConnectionError::Lost(e.to_string()))?
                .ok_or(ConnectionError::Closed)?;
            let mut input = &chunk.bytes[..];
            while !input.is_empty() {
                if let Some(frame) = self.decoder.decode(&mut input)? {
                    if self.received.len() >= RECEIVED_FRAMES_BUFFERED_MAX {
                        return Err(ConnectionError::Overflow);
                    }
                    self.received.push_back(frame);
                }
            }
            if let Some(frame) = self.received.pop_front() {
                return Ok(frame);
            }
        }
    }

    /// Takes the frames received and not yet read, in order, without waiting.
    pub fn take_buffered(&mut self) -> Vec<Frame> {
        self.received.drain(..).collect()
    }

    /// Sends `frame` and waits for the reply with the same request id
    /// (see [`Connection::wait_reply`]).
    pub async fn request(&mut self, frame: &Frame) -> Result<Frame, ConnectionError> {
        self.send(frame).await?;
        self.wait_reply(frame.header().request_id()).await
    }

    /// Waits for the reply to `request_id` (`Ack`, `Error` or a directory
    /// answer); frames that arrive meanwhile stay queued for
    /// [`Connection::recv`], in order.
    pub async fn wait_reply(&mut self, request_id: u32) -> Result<Frame, ConnectionError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut skipped = VecDeque::new();
        let result = loop {
            if let Some(position) = self.received.iter().position(|f| is_reply(f, request_id)) {
                break Ok(self.received.remove(position).expect("position is valid"));
            }
            skipped.extend(self.received.drain(..));
            match tokio::time::timeout_at(deadline, self.read_frame()).await {
                Err(_) => break Err(ConnectionError::TimedOut),
                Ok(Err(error)) => break Err(error),
                Ok(Ok(frame)) if is_reply(&frame, request_id) => break Ok(frame),
                Ok(Ok(frame)) => skipped.push_back(frame),
            }
            if skipped.len() > RECEIVED_FRAMES_BUFFERED_MAX {
                break Err(ConnectionError::Overflow);
            }
        };
        skipped.extend(self.received.drain(..));
        self.received = skipped;
        result
    }

    /// Closes the connection politely.
    pub async fn close(mut self) {
        let _ = self.send.finish();
        self.connection.close(quinn::VarInt::from_u32(0), b"bye");
        self.endpoint.wait_idle().await;
    }
}

fn client_endpoint(address: SocketAddr) -> Result<quinn::Endpoint, ConnectionError> {
    let bind: SocketAddr =
        if address.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }.parse().expect("valid wildcard address");
    quinn::Endpoint::client(bind).map_err(|e| ConnectionError::Unreachable(e.to_string()))
}

/// Starts the QUIC handshake; the future completes with the endpoint and
/// the established connection.
fn handshake(
    endpoint: quinn::Endpoint,
    address: SocketAddr,
    server_name: &str,
    config: quinn::ClientConfig,
) -> Result<
    impl std::future::Future<Output = Result<(quinn::Endpoint, quinn::Connection), ConnectionError>>,
    ConnectionError,
> {
    let connecting = endpoint
        .connect_with(config, address, server_name)
        .map_err(|e| ConnectionError::Unreachable(format!("{address}: {e}")))?;
    Ok(async move {
        let connection =
            connecting.await.map_err(|e| ConnectionError::Unreachable(format!("{address}: {e}")))?;
        Ok((endpoint, connection))
    })
}

fn is_reply(frame: &Frame, request_id: u32) -> bool {
    frame.header().request_id() == request_id
        && matches!(
            frame.opcode(),
            Opcode::Ack
                | Opcode::Error
                | Opcode::KeyPackageStatus
                | Opcode::KeyPackageClaimed
                | Opcode::GroupInfo
                | Opcode::DomainKeys
                | Opcode::Pong
                | Opcode::SyncDone
        )
}

/// The `Error` frame's code and message as an error.
pub fn refused(frame: &Frame) -> ConnectionError {
    match frame.decode_payload::<kalandra_proto::payload::Error>() {
        Ok(error) => ConnectionError::Refused { code: error.code, message: error.message },
        Err(_) => ConnectionError::UnexpectedFrame(frame.opcode()),
    }
}
