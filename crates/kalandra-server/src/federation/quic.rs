//! The link driver over quinn: the server-to-server listener (its own
//! socket and ALPN [`S2S_ALPN`]) and one dialer per peer with an address.
//! Each runs the pure [`LinkHandshake`] over one bidirectional stream, with
//! the connection's TLS exporter as the proofs' binding, then serves the
//! link: pings, and requests both ways ([`super::requests`]). Decisions
//! live in [`super::handshake`], [`super::requests`], [`super::directory`]
//! and [`super::links`]; this module only moves bytes and keeps time.
//!
//! TLS here does not authenticate: a dialer accepts any certificate (its
//! handshake signature is still checked), and the listener asks for none.
//! The link proofs do, bound to the exporter of this very TLS connection,
//! so a proof relayed through another connection does not verify.

use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use kalandra_proto::federation::{DomainName, LINK_TLS_BINDING_BYTES, LINK_TLS_EXPORTER_LABEL};
use kalandra_proto::RoomId;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::{timeout, timeout_at, Instant};

use crate::federation::directory::HomeDirectory;
use crate::federation::handshake::{
    body_len, decode, decode_established, encode, encode_established, established_body_len, Established,
    LinkHandshake, LinkHandshakeError, LinkMessage, RefusedDomains, Step, LINK_LENGTH_PREFIX_BYTES,
};
use crate::federation::limits::{
    BACKOFF_INITIAL_MS, HANDSHAKES_IN_FLIGHT_MAX, IDLE_TIMEOUT_MS, LINK_SILENCE_MS_MAX, PING_INTERVAL_MS,
    S2S_ALPN, STREAM_RECEIVE_WINDOW_BYTES,
};
use crate::federation::links::FederationLinks;
use crate::federation::next_backoff_ms;
use crate::federation::peers::SharedPeers;
use crate::federation::registry::{lock_pending, LinkRegistry, Pending, LINK_OUTGOING_MESSAGES_MAX};
use crate::federation::relay::{Intake, RelayAuthority, RelayHome, RELAY_CHECKS_IN_FLIGHT_MAX};
use crate::federation::replica::{ReplicaFeeds, ReplicaFollower, FOLLOWS_IN_FLIGHT_PER_LINK_MAX};
use crate::federation::requests::{
    refusal, PendingRequests, RefusalCode, LINK_ESTABLISHED_LENGTH_PREFIX_BYTES, LINK_REQUESTS_IN_FLIGHT_MAX,
};
use crate::node::Clock;
use crate::transport::tls::{ServerTlsIdentity, TlsError};

/// QUIC application error code of a link closed by this server; the
/// reason is the [`LinkHandshakeError::code`].
pub const LINK_CLOSE_CODE: u32 = 1;

/// What the listener and the dialers share.
pub struct LinkContext {
    /// This server's domain.
    pub domain: DomainName,
    /// Its federation key.
    pub key: SigningKey,
    /// The peers and the keys accepted for them.
    pub peers: Arc<SharedPeers>,
    /// The domains the operator refuses: their links are refused.
    pub refused: RefusedDomains,
    /// The per-peer state.
    pub links: FederationLinks,
    /// ms since the Unix epoch (key acceptance, state times).
    pub clock: Clock,
    /// Time a handshake may take.
    pub handshake_timeout_ms: u64,
    /// The links that are up, for requests.
    pub registry: Arc<LinkRegistry>,
    /// Answers the peers' requests.
    pub home: Arc<HomeDirectory>,
    /// Relays this domain's clients to the rooms of peers.
    pub relay_home: Arc<RelayHome>,
    /// Serves the peers' clients relayed to this domain's rooms.
    pub relay_authority: Arc<RelayAuthority>,
    /// Feeds the peers' replicas of this domain's rooms.
    pub replica_feeds: Arc<ReplicaFeeds>,
    /// Keeps this domain's replicas of the peers' rooms.
    pub replica_follower: Arc<ReplicaFollower>,
}

impl LinkContext {
    fn now_ms(&self) -> u64 {
        (self.clock)()
    }

    fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }
}

/// The running listener and dialers.
pub struct FederationTasks {
    tasks: Vec<JoinHandle<()>>,
}

impl FederationTasks {
    /// Stops accepting and dialing; open links are dropped with the endpoint.
    pub async fn stop(self) {
        for task in &self.tasks {
            task.abort();
        }
        for task in self.tasks {
            // Cancelled: nothing it held outlives it.
            let _ = task.await;
        }
    }
}

/// The quinn server configuration of the listener: TLS 1.3, ALPN
/// [`S2S_ALPN`] only, no 0-RTT, one stream per connection.
pub fn server_config(identity: &ServerTlsIdentity) -> Result<quinn::ServerConfig, TlsError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(identity.cert_chain().to_vec(), identity.key().clone_key())?;
    tls.alpn_protocols = vec![S2S_ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport()?));
    Ok(config)
}

/// The dialers' client configuration: TLS 1.3, ALPN [`S2S_ALPN`], any
/// certificate (the link proof authenticates).
pub fn client_config() -> Result<quinn::ClientConfig, TlsError> {
    let provider = provider();
    let verifier = ProofAuthenticates { algorithms: provider.signature_verification_algorithms };
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    tls.alpn_protocols = vec![S2S_ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport()?));
    Ok(config)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn transport() -> Result<quinn::TransportConfig, TlsError> {
    let idle = quinn::IdleTimeout::try_from(Duration::from_millis(IDLE_TIMEOUT_MS))
        .map_err(|_| TlsError::IdleTimeout { idle_timeout_ms: IDLE_TIMEOUT_MS })?;
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(idle))
        .keep_alive_interval(Some(Duration::from_millis(PING_INTERVAL_MS)))
        .max_concurrent_bidi_streams(quinn::VarInt::from_u32(1))
        .max_concurrent_uni_streams(quinn::VarInt::from_u32(0))
        .stream_receive_window(quinn::VarInt::from_u32(STREAM_RECEIVE_WINDOW_BYTES))
        .receive_window(quinn::VarInt::from_u32(STREAM_RECEIVE_WINDOW_BYTES))
        .datagram_receive_buffer_size(None)
        .datagram_send_buffer_size(0);
    Ok(transport)
}

/// Accepts any certificate; checks the TLS 1.3 handshake signature.
#[derive(Debug)]
struct ProofAuthenticates {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ProofAuthenticates {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
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

/// Serves links on `endpoint` and dials each of `dial` (domain, address)
/// from it.
pub fn start(
    context: LinkContext,
    endpoint: quinn::Endpoint,
    dial: Vec<(DomainName, String)>,
) -> Result<FederationTasks, TlsError> {
    let client = client_config()?;
    let context = Arc::new(context);
    let mut tasks = vec![tokio::spawn(listen(Arc::clone(&context), endpoint.clone()))];
    for (peer, address) in dial {
        let dialer =
            Dialer { context: Arc::clone(&context), endpoint: endpoint.clone(), client: client.clone() };
        tasks.push(tokio::spawn(dialer.run(peer, address)));
    }
    Ok(FederationTasks { tasks })
}

async fn listen(context: Arc<LinkContext>, endpoint: quinn::Endpoint) {
    let handshakes = Arc::new(Semaphore::new(HANDSHAKES_IN_FLIGHT_MAX));
    while let Some(incoming) = endpoint.accept().await {
        match Arc::clone(&handshakes).try_acquire_owned() {
            Ok(permit) => {
                tokio::spawn(accept(Arc::clone(&context), incoming, permit));
            }
            Err(_) => {
                incoming.refuse();
                context.links.handshake_failed(&LinkHandshakeError::TooManyHandshakes, context.now_ms());
            }
        }
    }
}

/// One incoming connection: the handshake within the timeout, then the link.
async fn accept(context: Arc<LinkContext>, incoming: quinn::Incoming, permit: OwnedSemaphorePermit) {
    let deadline = Instant::now() + context.handshake_timeout();
    let timed_out = LinkHandshakeError::Timeout { timeout_ms: context.handshake_timeout_ms };
    let connection = match timeout_at(deadline, incoming).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(error)) => {
            context
                .links
                .handshake_failed(&LinkHandshakeError::Transport(error.to_string()), context.now_ms());
            return;
        }
        Err(_) => {
            context.links.handshake_failed(&timed_out, context.now_ms());
            return;
        }
    };
    let result = timeout_at(deadline, respond(&context, &connection)).await.unwrap_or(Err(timed_out));
    drop(permit);
    match result {
        Ok((peer, send, recv)) => {
            let link = Link { context: &context, connection: &connection, peer: &peer };
            let reason = link.serve(send, recv, false).await;
            context.links.inbound_closed(&peer, &reason, context.now_ms());
            close(&connection, &reason);
        }
        Err(error) => {
            context.links.handshake_failed(&error, context.now_ms());
            close(&connection, &error);
        }
    }
}

type Streams = (quinn::SendStream, quinn::RecvStream);

/// The responder's handshake; the link is counted for its peer when it returns.
async fn respond(
    context: &LinkContext,
    connection: &quinn::Connection,
) -> Result<(DomainName, quinn::SendStream, quinn::RecvStream), LinkHandshakeError> {
    let alpn = connection
        .handshake_data()
        .and_then(|data| data.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|data| data.protocol);
    if alpn.as_deref() != Some(S2S_ALPN) {
        return Err(LinkHandshakeError::Malformed("no server-to-server ALPN negotiated".to_owned()));
    }
    let binding = tls_binding(connection)?;
    let (mut send, mut recv): Streams = connection.accept_bi().await.map_err(connection_error)?;
    let mut handshake =
        LinkHandshake::responder(context.key.clone(), context.domain.clone(), rand::random(), binding);
    handshake.refusing(&context.refused);
    let established = exchange(context, &mut handshake, &mut send, &mut recv, &[]).await?;
    let now_ms = context.now_ms();
    context.links.inbound_opened(&established.peer, established.key, now_ms)?;
    if let Err(error) = write(&mut send, &established.send).await {
        context.links.inbound_closed(&established.peer, &error, context.now_ms());
        return Err(error);
    }
    tracing::info!(peer = %established.peer, "federation link accepted");
    Ok((established.peer, send, recv))
}

/// One peer's dialer.
struct Dialer {
    context: Arc<LinkContext>,
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
}

impl Dialer {
    /// Dials `peer` at `address` for ever, waiting a backoff between attempts.
    async fn run(self, peer: DomainName, address: String) {
        let mut backoff_ms = BACKOFF_INITIAL_MS;
        loop {
            match self.dial(&peer, &address).await {
                Ok((connection, established, send, recv)) => {
                    let now_ms = self.context.now_ms();
                    self.context.links.dialed_up(&peer, established.key, now_ms);
                    tracing::info!(%peer, "federation link up");
                    backoff_ms = BACKOFF_INITIAL_MS;
                    let link = Link { context: &self.context, connection: &connection, peer: &peer };
                    let reason = link.serve(send, recv, true).await;
                    close(&connection, &reason);
                    tracing::warn!(%peer, %reason, "federation link down");
                    self.context.links.dialed_down(&peer, &reason, self.context.now_ms());
                }
                Err(error) => {
                    tracing::debug!(%peer, %error, "federation link refused or unreachable");
                    let now_ms = self.context.now_ms();
                    self.context.links.handshake_failed(&error, now_ms);
                    self.context.links.dialed_down(&peer, &error, now_ms);
                }
            }
            tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
            backoff_ms = next_backoff_ms(backoff_ms);
        }
    }

    async fn dial(
        &self,
        peer: &DomainName,
        address: &str,
    ) -> Result<(quinn::Connection, Established, quinn::SendStream, quinn::RecvStream), LinkHandshakeError>
    {
        let deadline = Instant::now() + self.context.handshake_timeout();
        let timed_out = LinkHandshakeError::Timeout { timeout_ms: self.context.handshake_timeout_ms };
        let connection =
            timeout_at(deadline, self.connect(peer, address)).await.unwrap_or(Err(timed_out.clone()))?;
        let result = timeout_at(deadline, self.initiate(&connection, peer)).await.unwrap_or(Err(timed_out));
        match result {
            Ok((established, send, recv)) => Ok((connection, established, send, recv)),
            Err(error) => {
                close(&connection, &error);
                Err(error)
            }
        }
    }

    async fn connect(
        &self,
        peer: &DomainName,
        address: &str,
    ) -> Result<quinn::Connection, LinkHandshakeError> {
        let resolved = tokio::net::lookup_host(address)
            .await
            .map_err(|error| LinkHandshakeError::Transport(format!("resolving {address}: {error}")))?
            .next()
            .ok_or_else(|| LinkHandshakeError::Transport(format!("{address} resolves to nothing")))?;
        let connecting = self
            .endpoint
            .connect_with(self.client.clone(), resolved, peer.as_str())
            .map_err(|error| LinkHandshakeError::Transport(error.to_string()))?;
        connecting.await.map_err(connection_error)
    }

    async fn initiate(
        &self,
        connection: &quinn::Connection,
        peer: &DomainName,
    ) -> Result<(Established, quinn::SendStream, quinn::RecvStream), LinkHandshakeError> {
        let binding = tls_binding(connection)?;
        let (mut send, mut recv): Streams = connection.open_bi().await.map_err(connection_error)?;
        let context = &self.context;
        let (mut handshake, hello) = LinkHandshake::initiator(
            context.key.clone(),
            context.domain.clone(),
            rand::random(),
            binding,
            peer.clone(),
        );
        handshake.refusing(&context.refused);
        let established = exchange(context, &mut handshake, &mut send, &mut recv, &[hello]).await?;
        Ok((established, send, recv))
    }
}

/// An authenticated link being served.
struct Link<'a> {
    context: &'a LinkContext,
    connection: &'a quinn::Connection,
    peer: &'a DomainName,
}

fn intake_ended() -> LinkHandshakeError {
    LinkHandshakeError::Transport("the link's relay intake ended".into())
}

impl Link<'_> {
    /// Serves the link until it fails: writes what is queued, reads and
    /// dispatches the peer's messages, and (`pings`: the initiator) pings
    /// every interval. A link silent for [`LINK_SILENCE_MS_MAX`] is dropped.
    /// Requests can be sent over it meanwhile ([`LinkRegistry::request`]).
    async fn serve(
        &self,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        pings: bool,
    ) -> LinkHandshakeError {
        let (outgoing, queued) = mpsc::channel(LINK_OUTGOING_MESSAGES_MAX);
        let pending: Pending = Arc::new(std::sync::Mutex::new(PendingRequests::default()));
        let registry = &self.context.registry;
        let link_id = registry.add(self.peer, outgoing.clone(), Arc::clone(&pending));
        self.context.replica_follower.link_up(self.peer);
        let (intake, mut admissions) = mpsc::channel(RELAY_CHECKS_IN_FLIGHT_MAX);
        let authority = &self.context.relay_authority;
        let reason = tokio::select! {
            reason = write_queued(send, queued) => reason,
            reason = self.read_loop(recv, &outgoing, &pending, &intake) => reason,
            // Never first: `intake` lives as long as this select.
            () = authority.admit_in_order(self.peer, &mut admissions, &outgoing) => intake_ended(),
            reason = ping_loop(&outgoing, pings) => reason,
            error = self.connection.closed() => connection_error(error),
        };
        registry.remove(self.peer, link_id);
        // Relayed connections on this link end with it; their clients read again.
        self.context.relay_authority.link_down(self.peer);
        self.context.relay_home.dropped_by(self.peer, None);
        self.context.replica_feeds.link_down(self.peer);
        self.context.replica_follower.link_down(self.peer);
        // Dropping the waiters tells each request at once that the link is down.
        drop(lock_pending(&pending).abandon());
        reason
    }

    async fn read_loop(
        &self,
        mut recv: quinn::RecvStream,
        outgoing: &mpsc::Sender<Vec<u8>>,
        pending: &Pending,
        intake: &mpsc::Sender<Intake>,
    ) -> LinkHandshakeError {
        let answering = Arc::new(Semaphore::new(LINK_REQUESTS_IN_FLIGHT_MAX));
        let following = Arc::new(Semaphore::new(FOLLOWS_IN_FLIGHT_PER_LINK_MAX));
        loop {
            let message = match timeout(
                Duration::from_millis(LINK_SILENCE_MS_MAX),
                read_established(&mut recv),
            )
            .await
            {
                Err(_) => return LinkHandshakeError::Timeout { timeout_ms: LINK_SILENCE_MS_MAX },
                Ok(Err(error)) => return error,
                Ok(Ok(message)) => message,
            };
            match message {
                LinkMessage::Ping { sequence } => {
                    self.context.links.keepalive(self.peer);
                    queue_now(outgoing, &LinkMessage::Pong { sequence });
                }
                LinkMessage::Pong { .. } => self.context.links.keepalive(self.peer),
                LinkMessage::Request { id, request } => match Arc::clone(&answering).try_acquire_owned() {
                    Ok(permit) => self.answer(id, request, outgoing.clone(), permit),
                    Err(_) => {
                        let response = refusal(RefusalCode::TooManyRequests, "too many requests in progress");
                        queue_now(outgoing, &LinkMessage::Response { id, response });
                    }
                },
                LinkMessage::Response { id, response } => match lock_pending(pending).finish(id) {
                    Some(waiter) => {
                        // The requester may have given up meanwhile.
                        let _ = waiter.send(response);
                    }
                    None => tracing::debug!(peer = %self.peer, id, "late or unknown link response dropped"),
                },
                LinkMessage::Relay { connection, envelope, recipient_homes } => {
                    let check = self.context.relay_authority.start_check(
                        self.peer,
                        connection,
                        envelope,
                        recipient_homes,
                    );
                    if intake.send(check).await.is_err() {
                        return intake_ended();
                    }
                }
                LinkMessage::Deliver { connection, frames } => {
                    self.context.relay_home.deliver(self.peer, connection, frames)
                }
                LinkMessage::Follow { room_id, from_log_index, erasures_after } => {
                    // Waits while the link's follows in flight are at their bound.
                    let Ok(permit) = Arc::clone(&following).acquire_owned().await else {
                        return LinkHandshakeError::Transport("the link's follow limit closed".into());
                    };
                    let from = (from_log_index, erasures_after);
                    self.context.replica_feeds.follow(self.peer, RoomId(room_id), from, outgoing, permit)
                }
                LinkMessage::Erasures { room_id, from_log_index, erasures } => self
                    .context
                    .replica_follower
                    .erasures(self.peer, RoomId(room_id), from_log_index, erasures),
                LinkMessage::Replicate { frames } => {
                    self.context.replica_follower.replicated(self.peer, frames).await
                }
                LinkMessage::RelayClosed { connection } => {
                    if intake.send(Intake::Closed { connection }).await.is_err() {
                        return intake_ended();
                    }
                }
                LinkMessage::RelayDropped { connection } => {
                    self.context.relay_home.dropped_by(self.peer, Some(connection))
                }
                other => return LinkHandshakeError::UnexpectedMessage { message: other.name() },
            }
        }
    }

    /// Answers the peer's request on a blocking thread; the answer is queued
    /// when ready, holding `permit` until then.
    fn answer(
        &self,
        id: u64,
        request: crate::federation::requests::LinkRequest,
        outgoing: mpsc::Sender<Vec<u8>>,
        permit: OwnedSemaphorePermit,
    ) {
        let (home, peer) = (Arc::clone(&self.context.home), self.peer.clone());
        tokio::spawn(async move {
            let response = tokio::task::spawn_blocking(move || home.answer(&peer, request))
                .await
                .unwrap_or_else(|error| refusal(RefusalCode::Unavailable, &error.to_string()));
            let message = LinkMessage::Response { id, response };
            let message = match encode_established(&message) {
                Ok(_) => message,
                Err(_) => {
                    let response = refusal(RefusalCode::Unavailable, "answer too large for a link message");
                    LinkMessage::Response { id, response }
                }
            };
            queue(&outgoing, &message).await;
            drop(permit);
        });
    }
}

/// Queues `message` for the link's writer (dropped if the link is gone).
async fn queue(outgoing: &mpsc::Sender<Vec<u8>>, message: &LinkMessage) {
    if let Ok(bytes) = encode_established(message) {
        // A closed queue means the link is going down: nothing to do.
        let _ = outgoing.send(bytes).await;
    }
}

/// Queues `message` without waiting: the reader never blocks on the
/// writer (which may wait for the peer to read). A full queue drops it;
/// a dropped pong lets the link fall silent, a dropped refusal leaves the
/// peer's request to its timeout.
fn queue_now(outgoing: &mpsc::Sender<Vec<u8>>, message: &LinkMessage) {
    if let Ok(bytes) = encode_established(message) {
        if outgoing.try_send(bytes).is_err() {
            tracing::debug!(message = message.name(), "link queue full; message dropped");
        }
    }
}

/// Writes the link's queued messages in order.
async fn write_queued(
    mut send: quinn::SendStream,
    mut queued: mpsc::Receiver<Vec<u8>>,
) -> LinkHandshakeError {
    while let Some(bytes) = queued.recv().await {
        if let Err(error) = send.write_all(&bytes).await {
            return write_error(error);
        }
    }
    LinkHandshakeError::Transport("link queue closed".to_owned())
}

/// The initiator's keepalive: a ping each interval (the responder: none).
async fn ping_loop(outgoing: &mpsc::Sender<Vec<u8>>, pings: bool) -> LinkHandshakeError {
    if !pings {
        return std::future::pending().await;
    }
    for sequence in 1u64.. {
        tokio::time::sleep(Duration::from_millis(PING_INTERVAL_MS)).await;
        queue(outgoing, &LinkMessage::Ping { sequence }).await;
    }
    LinkHandshakeError::Transport("ping sequence exhausted".to_owned())
}

/// Sends `first`, then feeds the peer's messages to `handshake` until the link is up.
async fn exchange(
    context: &LinkContext,
    handshake: &mut LinkHandshake,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    first: &[LinkMessage],
) -> Result<Established, LinkHandshakeError> {
    write(send, first).await?;
    loop {
        let message = read(recv).await?;
        match handshake.receive(message, &context.peers.current(), context.now_ms())? {
            Step::Send(messages) => write(send, &messages).await?,
            Step::Established(established) => return Ok(established),
        }
    }
}

/// The connection's TLS exporter under [`LINK_TLS_EXPORTER_LABEL`].
fn tls_binding(connection: &quinn::Connection) -> Result<[u8; LINK_TLS_BINDING_BYTES], LinkHandshakeError> {
    let mut binding = [0u8; LINK_TLS_BINDING_BYTES];
    connection
        .export_keying_material(&mut binding, LINK_TLS_EXPORTER_LABEL, b"")
        .map_err(|_| LinkHandshakeError::Transport("no TLS exporter".to_owned()))?;
    Ok(binding)
}

async fn read(recv: &mut quinn::RecvStream) -> Result<LinkMessage, LinkHandshakeError> {
    let mut prefix = [0u8; LINK_LENGTH_PREFIX_BYTES];
    recv.read_exact(&mut prefix).await.map_err(read_error)?;
    let mut body = vec![0u8; body_len(prefix)?];
    recv.read_exact(&mut body).await.map_err(read_error)?;
    decode(&body)
}

/// One message of an established link (a 4-byte length prefix).
async fn read_established(recv: &mut quinn::RecvStream) -> Result<LinkMessage, LinkHandshakeError> {
    let mut prefix = [0u8; LINK_ESTABLISHED_LENGTH_PREFIX_BYTES];
    recv.read_exact(&mut prefix).await.map_err(read_error)?;
    let mut body = vec![0u8; established_body_len(prefix)?];
    recv.read_exact(&mut body).await.map_err(read_error)?;
    decode_established(&body)
}

async fn write(send: &mut quinn::SendStream, messages: &[LinkMessage]) -> Result<(), LinkHandshakeError> {
    for message in messages {
        send.write_all(&encode(message)).await.map_err(write_error)?;
    }
    Ok(())
}

fn write_error(error: quinn::WriteError) -> LinkHandshakeError {
    match error {
        quinn::WriteError::ConnectionLost(lost) => connection_error(lost),
        other => LinkHandshakeError::Transport(other.to_string()),
    }
}

fn read_error(error: quinn::ReadExactError) -> LinkHandshakeError {
    match error {
        quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(lost)) => connection_error(lost),
        other => LinkHandshakeError::Transport(other.to_string()),
    }
}

/// A lost connection; the peer's refusal if it closed with one.
fn connection_error(error: quinn::ConnectionError) -> LinkHandshakeError {
    match error {
        quinn::ConnectionError::ApplicationClosed(close)
            if close.error_code == quinn::VarInt::from_u32(LINK_CLOSE_CODE) =>
        {
            LinkHandshakeError::RefusedByPeer { code: String::from_utf8_lossy(&close.reason).into_owned() }
        }
        quinn::ConnectionError::TimedOut => LinkHandshakeError::Transport("timed out".to_owned()),
        other => LinkHandshakeError::Transport(other.to_string()),
    }
}

fn close(connection: &quinn::Connection, reason: &LinkHandshakeError) {
    connection.close(quinn::VarInt::from_u32(LINK_CLOSE_CODE), reason.code().as_bytes());
}
