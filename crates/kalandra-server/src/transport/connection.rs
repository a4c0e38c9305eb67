//! The QUIC driver: accepts connections, runs each one's [`Session`], and
//! hands requests to the room core ([`Node`]) and the directory.
//!
//! One bidirectional stream per connection carries frames both ways. The
//! reader decodes frames with [`FrameDecoder`]; a writer task drains the
//! connection's bounded [`Outbox`]. Nothing here decides protocol questions:
//! the session, the sequencer and the directory do.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use kalandra_proto::payload::KeyPackageClaim;
use kalandra_proto::{ErrorCode, Frame, FrameDecoder, Opcode, RoomId, SenderId};
use tokio::sync::watch;

use crate::federation::directory::RemoteDirectory;
use crate::federation::peers::domain_keys;
use crate::federation::relay::RelayHome;
use crate::federation::replica::ReplicaFollower;
use crate::node::erasure::{redact_reply, redact_request};
use crate::node::{error_frame, Command, Node, Outbox, Outgoing};
use crate::protocol::session::{HomeIssuer, Route, Session, Step};
use crate::room::{moderation_reply, moderation_request, server_frame, OtherRoute, RoomRequest, Routed};
use crate::store::Store;
use crate::transport::directory::{self, DirectoryReply, DirectoryRequest};
use crate::transport::rate_limit::{frame_cost_tokens, KeyedLimiter, TokenBucket};

/// Limits applied per connection, per user and per address: the
/// operator's `[limits]` configuration.
pub use crate::config::Limits as ConnectionLimits;

mod relayed;

pub use self::relayed::ListenerHost;

/// Most users whose rate buckets are tracked at once.
pub const USER_RATE_BUCKETS_MAX: usize = 1_000_000;
/// Bytes read from a stream at a time.
pub const READ_CHUNK_BYTES_MAX: usize = 64 * 1024;

/// Bits of an IPv6 address that the per-address connection cap counts: a
/// host usually holds a whole /64, so counting exact addresses would leave
/// it unlimited.
pub const IPV6_CONNECTION_PREFIX_BITS: u32 = 64;

/// What the per-address connection cap counts for `address`: an IPv4
/// address (IPv4-mapped IPv6 included) as is, an IPv6 address by its
/// [`IPV6_CONNECTION_PREFIX_BITS`] prefix.
pub fn connection_limit_key(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mask = u128::MAX << (128 - IPV6_CONNECTION_PREFIX_BITS);
                IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & mask))
            }
        },
    }
}

/// Largest payload read before the connection authenticates: the handshake
/// is control frames only, so a stranger cannot make the server buffer a
/// sequenced frame's 8 MiB before it knows who sends it.
pub const PRE_AUTH_PAYLOAD_BYTES_MAX: u32 = kalandra_proto::limits::CONTROL_PAYLOAD_BYTES_MAX;
const _: () = assert!(
    PRE_AUTH_PAYLOAD_BYTES_MAX >= Opcode::Hello.payload_bytes_max()
        && PRE_AUTH_PAYLOAD_BYTES_MAX >= Opcode::AuthResponse.payload_bytes_max()
);

/// Shared state of the listener.
pub struct Listener {
    node: Node,
    store: Arc<dyn Store>,
    limits: ConnectionLimits,
    clock: crate::node::Clock,
    next_connection_id: AtomicU64,
    per_address: Mutex<HashMap<IpAddr, u32>>,
    per_user: Mutex<KeyedLimiter<SenderId>>,
    metrics: crate::admin::metrics::Metrics,
    server_key: [u8; 32],
    remote_directory: Arc<RemoteDirectory>,
    relay_home: Arc<RelayHome>,
    replicas: Arc<ReplicaFollower>,
    welcome_routing: Option<tokio::sync::mpsc::Sender<Vec<SenderId>>>,
    named_homes: Arc<crate::federation::named_homes::NamedHomes>,
    home: HomeIssuer,
    own_keys: kalandra_proto::federation::PeerKeys,
}

/// What the listener asks of the other domains: their users' key packages,
/// the relay of frames for their rooms, and the replicas of those rooms.
pub struct ListenerFederation {
    /// Claims other domains' users' key packages.
    pub directory: Arc<RemoteDirectory>,
    /// Relays frames to the rooms' authorities.
    pub relay_home: Arc<RelayHome>,
    /// The replicas of other domains' rooms.
    pub replicas: Arc<ReplicaFollower>,
    /// Hands users whose home was just named to the Welcome router.
    pub welcome_routing: Option<tokio::sync::mpsc::Sender<Vec<SenderId>>>,
    /// Homes relaying domains named for Welcome recipients, per room.
    pub named_homes: Arc<crate::federation::named_homes::NamedHomes>,
    /// Certifies clients as this domain's users, for their MLS leaves.
    pub home: HomeIssuer,
    /// This domain's keys as clients are told (its current key and earlier
    /// ones configured).
    pub own_keys: kalandra_proto::federation::PeerKeys,
}

impl Listener {
    /// A listener feeding `node`.
    pub fn new(
        node: Node,
        store: Arc<dyn Store>,
        limits: ConnectionLimits,
        clock: crate::node::Clock,
        metrics: crate::admin::metrics::Metrics,
        server_key: [u8; 32],
        federation: ListenerFederation,
    ) -> Arc<Listener> {
        let per_user = KeyedLimiter::new(
            f64::from(limits.frames_per_second_per_user),
            f64::from(limits.frames_burst_per_user),
            USER_RATE_BUCKETS_MAX,
        );
        Arc::new(Listener {
            node,
            store,
            limits,
            clock,
            next_connection_id: AtomicU64::new(1),
            per_address: Mutex::new(HashMap::new()),
            per_user: Mutex::new(per_user),
            metrics,
            server_key,
            remote_directory: federation.directory,
            relay_home: federation.relay_home,
            replicas: federation.replicas,
            welcome_routing: federation.welcome_routing,
            named_homes: federation.named_homes,
            home: federation.home,
            own_keys: federation.own_keys,
        })
    }

    /// Accepts connections on `endpoint` until the phase is
    /// [`ShutdownPhase::Draining`]; then waits for every connection to close
    /// (they do once the phase is [`ShutdownPhase::Drained`]).
    pub async fn serve(self: Arc<Self>, endpoint: quinn::Endpoint, mut stop: watch::Receiver<ShutdownPhase>) {
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                _ = reached(&mut stop, ShutdownPhase::Draining) => break,
                incoming = endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    let listener = Arc::clone(&self);
                    let stop = stop.clone();
                    tasks.spawn(async move { listener.connection(incoming, stop).await });
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        while tasks.join_next().await.is_some() {}
        endpoint.close(quinn::VarInt::from_u32(0), b"server shutting down");
    }

    async fn connection(self: Arc<Self>, incoming: quinn::Incoming, stop: watch::Receiver<ShutdownPhase>) {
        let address = connection_limit_key(incoming.remote_address().ip());
        let admitted = {
            let mut per_address = self.per_address.lock().expect("per-address lock");
            let count = per_address.entry(address).or_insert(0);
            if *count >= self.limits.connections_per_address_max {
                false
            } else {
                *count += 1;
                true
            }
        };
        let connection = match incoming.await {
            Ok(connection) => connection,
            Err(error) => {
                tracing::debug!(%address, %error, "handshake failed");
                if admitted {
                    self.release_address(address);
                }
                return;
            }
        };
        if !admitted {
            self.metrics.rejected(ErrorCode::TooManyConnections);
            refuse(&connection, ErrorCode::TooManyConnections, "too many connections from this address")
                .await;
            return;
        }
        self.metrics.connection_opened();
        let id = self.next_connection_id.fetch_add(1, Ordering::Relaxed);
        let outbox = self.run_connection(id, &connection, stop).await;
        if let Some(outbox) = outbox {
            self.relay_home.connection_closed(outbox.connection());
            self.node.connection_closed(&outbox).await;
        }
        self.metrics.connection_closed();
        self.release_address(address);
    }

    fn release_address(&self, address: IpAddr) {
        let mut per_address = self.per_address.lock().expect("per-address lock");
        if let Some(count) = per_address.get_mut(&address) {
            *count -= 1;
            if *count == 0 {
                per_address.remove(&address);
            }
        }
    }

    /// Runs one connection; returns its outbox if it authenticated.
    async fn run_connection(
        &self,
        id: u64,
        connection: &quinn::Connection,
        mut stop: watch::Receiver<ShutdownPhase>,
    ) -> Option<Arc<Outbox>> {
        let handshake = Duration::from_millis(self.limits.handshake_timeout_ms);
        let (send, mut recv) = match tokio::time::timeout(handshake, connection.accept_bi()).await {
            Ok(Ok(streams)) => streams,
            _ => return None,
        };
        let mut state = ConnectionState {
            id,
            session: Session::new(rand::random(), self.server_key).with_home(self.home.clone()),
            send: Some(send),
            outbox: None,
            writer: None,
            bucket: TokenBucket::new(
                f64::from(self.limits.frames_per_second_per_connection),
                f64::from(self.limits.frames_burst_per_connection),
            ),
        };
        // Before authentication only control frames are valid: nothing larger is buffered.
        let mut decoder = FrameDecoder::with_payload_bytes_max(PRE_AUTH_PAYLOAD_BYTES_MAX);
        let deadline = tokio::time::Instant::now() + handshake;
        let mut frames = Vec::new();
        let mut draining = false;
        'read: loop {
            let chunk = tokio::select! {
                _ = reached(&mut stop, ShutdownPhase::Draining) => {
                    draining = true;
                    break 'read;
                }
                _ = tokio::time::sleep_until(deadline), if state.outbox.is_none() => {
                    self.metrics.rejected(ErrorCode::NotAuthenticated);
                    let error = error_frame(RoomId::default(), 0, ErrorCode::NotAuthenticated, "authentication timed out");
                    state.write(error).await;
                    break 'read;
                }
                chunk = recv.read_chunk(READ_CHUNK_BYTES_MAX, true) => chunk,
            };
            let chunk = match chunk {
                Ok(Some(chunk)) => chunk.bytes,
                Ok(None) => {
                    // The peer finished its stream; a partial frame is a truncated one.
                    if !decoder.is_idle() {
                        self.metrics.rejected(ErrorCode::MalformedHeader);
                        let error = error_frame(
                            RoomId::default(),
                            0,
                            ErrorCode::MalformedHeader,
                            "stream ends inside a frame",
                        );
                        state.write(error).await;
                    }
                    break 'read;
                }
                Err(_) => break 'read,
            };
            let mut input = &chunk[..];
            loop {
                let mut decode_error = None;
                while !input.is_empty() {
                    match decoder.decode(&mut input) {
                        // An AuthResponse is handled before the next header is
                        // read, so that the full limit applies only once authenticated.
                        Ok(Some(frame)) if frame.opcode() == Opcode::AuthResponse => {
                            frames.push(frame);
                            break;
                        }
                        Ok(Some(frame)) => frames.push(frame),
                        Ok(None) => break,
                        Err(error) => {
                            decode_error = Some(error);
                            break;
                        }
                    }
                }
                // Frames decoded before a bad one are handled: nothing accepted is lost.
                // Boxed: the handling of a request is a large future, and keeping
                // it inline would make every idle connection's task that large.
                let open = Box::pin(self.handle_frames(&mut state, &mut frames)).await;
                if state.outbox.is_some() {
                    decoder.set_payload_bytes_max(self.limits.payload_bytes_max);
                }
                if let Some(error) = decode_error {
                    self.metrics.rejected(error.error_code());
                    // The Error answers the refused frame when its request id is readable.
                    let request_id = decoder.failed_request_id().unwrap_or(0);
                    let error =
                        error_frame(RoomId::default(), request_id, error.error_code(), &error.to_string());
                    state.write(error).await;
                    break 'read;
                }
                if !open {
                    break 'read;
                }
                if input.is_empty() {
                    break;
                }
            }
        }
        if draining {
            // Read nothing more; once the room core has made everything
            // accepted durable (and queued its acknowledgements), say goodbye.
            let drain = Duration::from_millis(self.limits.drain_timeout_ms);
            let _ = tokio::time::timeout(drain, reached(&mut stop, ShutdownPhase::Drained)).await;
            let goodbye = error_frame(RoomId::default(), 0, ErrorCode::ShuttingDown, "server shutting down");
            state.write(goodbye).await;
        }
        match (&state.outbox, state.writer) {
            (Some(outbox), Some(writer)) => {
                outbox.close();
                let _ = tokio::time::timeout(WRITER_DRAIN_TIMEOUT, writer).await;
            }
            _ => {
                if let Some(mut send) = state.send {
                    let _ = send.finish();
                    let _ = tokio::time::timeout(WRITER_DRAIN_TIMEOUT, send.stopped()).await;
                }
            }
        }
        connection.close(quinn::VarInt::from_u32(0), b"closed");
        state.outbox
    }

    /// Handles decoded frames in order; `false` when the connection must close.
    async fn handle_frames(&self, state: &mut ConnectionState, frames: &mut Vec<Frame>) -> bool {
        for frame in frames.drain(..) {
            let now_ms = (self.clock)();
            self.metrics.frame_in(frame.opcode());
            if let (Some(outbox), Some(sender)) = (state.outbox.clone(), state.session.sender()) {
                if let Err(retry_after_ms) = self.admit(sender, &mut state.bucket, &frame, now_ms) {
                    self.metrics.rejected(ErrorCode::RateLimited);
                    let header = frame.header();
                    let error = crate::room::error_frame_with(
                        header.room_id(),
                        header.request_id(),
                        ErrorCode::RateLimited,
                        "rate limit exceeded",
                        None,
                        None,
                        Some(retry_after_ms),
                    );
                    let _ = outbox.send(error).await;
                    continue;
                }
            }
            // Kept whole for a relay: the client's signature covers it.
            let original = frame.clone();
            match state.session.on_frame(frame, now_ms) {
                Step::Ignore => {}
                Step::Reply(reply) => state.write(reply).await,
                Step::Authenticated { sender, reply } => {
                    state.write(reply).await;
                    let (outbox, receiver) = Outbox::new(
                        state.id,
                        sender,
                        self.limits.send_queue_frames_max,
                        self.limits.send_queue_bytes_max,
                    );
                    let send = state.send.take().expect("the stream is ours until authentication");
                    state.writer = Some(tokio::spawn(write_loop(send, receiver, self.metrics.clone())));
                    self.node.connection_authenticated(&outbox).await;
                    state.outbox = Some(outbox);
                }
                Step::Route(_, route) => {
                    let Some(outbox) = state.outbox.clone() else { return false };
                    match self.relayed_to(&route, &original, outbox.connection()).await {
                        Some(authority) => {
                            if matches!(route, Route::Unsubscribe { .. }) {
                                // Its subscription may be here, at the replica.
                                self.route(&outbox, route).await;
                            }
                            self.relay(&outbox, &state.session, original, &authority).await
                        }
                        None => self.route(&outbox, route).await,
                    }
                }
                Step::Close(error) => {
                    if let Ok(frame) = Frame::decode(&error) {
                        if let Ok(payload) = frame.decode_payload::<kalandra_proto::payload::Error>() {
                            if let Some(code) = ErrorCode::from_u16(payload.code) {
                                self.metrics.rejected(code);
                            }
                        }
                    }
                    state.write(error).await;
                    return false;
                }
                Step::Goodbye => return false,
            }
        }
        true
    }

    /// The answer to a directory request run on a blocking thread.
    fn directory_reply(
        &self,
        request_id: u32,
        result: Result<DirectoryReply, tokio::task::JoinError>,
    ) -> Bytes {
        match result {
            Ok(DirectoryReply { frame, refused }) => {
                if let Some(code) = refused {
                    self.metrics.rejected(code);
                }
                frame
            }
            Err(_) => {
                self.metrics.rejected(ErrorCode::Internal);
                error_frame(RoomId::default(), request_id, ErrorCode::Internal, "directory task failed")
            }
        }
    }

    /// Charges the frame to the connection's and the user's buckets (MLS
    /// validation by the payload's size, see [`frame_cost_tokens`]).
    fn admit(
        &self,
        sender: SenderId,
        connection_bucket: &mut TokenBucket,
        frame: &Frame,
        now_ms: u64,
    ) -> Result<(), u64> {
        let burst = f64::from(self.limits.frames_burst_per_connection.min(self.limits.frames_burst_per_user));
        let tokens = frame_cost_tokens(frame.opcode(), frame.header().payload_len(), burst);
        connection_bucket.try_take(now_ms, tokens).map_err(|retry| retry.0)?;
        self.per_user.lock().expect("per-user lock").try_take(sender, now_ms, tokens).map_err(|retry| retry.0)
    }

    async fn route(&self, outbox: &Arc<Outbox>, route: Route) {
        let route = match RoomRequest::from_route(route) {
            Routed::Room(request) => {
                let room_id = request.room_id();
                self.node.send(room_id, Command::Room { outbox: Arc::clone(outbox), request }).await;
                return;
            }
            Routed::Other(other) => other,
        };
        match route {
            OtherRoute::Directory(DirectoryRequest::Claim { request_id, claim })
                if claim.domain.as_ref().is_some_and(|domain| *domain != self.remote_directory.domain) =>
            {
                let reply = self.claim_remote(request_id, &claim).await;
                let _ = outbox.send(reply).await;
            }
            OtherRoute::Directory(request) => {
                let request_id = match &request {
                    DirectoryRequest::Upload { request_id, .. }
                    | DirectoryRequest::Claim { request_id, .. } => *request_id,
                };
                let (store, sender, now_ms) = (Arc::clone(&self.store), outbox.sender(), (self.clock)());
                let own_keys = self.own_keys.clone();
                let result = tokio::task::spawn_blocking(move || {
                    directory::answer(store.as_ref(), &own_keys, sender, &request, now_ms)
                })
                .await;
                let _ = outbox.send(self.directory_reply(request_id, result)).await;
            }
            OtherRoute::Redact(frame) => {
                let reply = self.redact(outbox.sender(), &frame).await;
                let _ = outbox.send(reply).await;
            }
            OtherRoute::Moderation(frame) => {
                let header = frame.header();
                let (room_id, request_id) = (header.room_id(), header.request_id());
                let reply = match moderation_request(&frame, outbox.sender()) {
                    Err((code, message)) => {
                        self.metrics.rejected(code);
                        error_frame(room_id, request_id, code, &message)
                    }
                    Ok(request) => moderation_reply(room_id, request_id, &self.node.moderate(request).await),
                };
                let _ = outbox.send(reply).await;
            }
            OtherRoute::DomainKeys { request_id, request } => {
                let directory = &self.remote_directory;
                let keys =
                    domain_keys(&self.own_keys, &directory.peers.current(), &directory.refused, &request);
                let reply = server_frame(RoomId::default(), request_id, &keys).unwrap_or_else(|error| {
                    error_frame(RoomId::default(), request_id, ErrorCode::Internal, &error.to_string())
                });
                let _ = outbox.send(reply).await;
            }
        }
    }
}

impl Listener {
    /// Answers a client's claim of another domain's users: through that
    /// domain ([`RemoteDirectory::claim`]), its answer checked.
    async fn claim_remote(&self, request_id: u32, claim: &KeyPackageClaim) -> Bytes {
        let Some(domain) = &claim.domain else {
            return error_frame(
                RoomId::default(),
                request_id,
                ErrorCode::Internal,
                "no domain to claim through",
            );
        };
        match self.remote_directory.claim(domain, &claim.sender_ids).await {
            Ok(claimed) => server_frame(RoomId::default(), request_id, &claimed).unwrap_or_else(|error| {
                error_frame(RoomId::default(), request_id, ErrorCode::Internal, &error.to_string())
            }),
            Err(error) => {
                let code = error.error_code();
                self.metrics.rejected(code);
                // An unreachable domain is worth trying again: say when.
                let retry_after_ms = (code == ErrorCode::DomainUnreachable)
                    .then_some(crate::federation::relay::RELAY_RETRY_AFTER_MS);
                let message = error.to_string();
                crate::room::error_frame_with(
                    RoomId::default(),
                    request_id,
                    code,
                    &message,
                    None,
                    None,
                    retry_after_ms,
                )
            }
        }
    }

    /// Answers a client's `Redact`: the sender of a frame may erase it, and
    /// a current member holding the room's admin or moderator role may erase
    /// any erasable frame of the room ([`Node::member_redact`]). The reply
    /// is an `Ack` naming the erased index, or an `Error`.
    async fn redact(&self, sender: SenderId, frame: &Frame) -> Bytes {
        let header = frame.header();
        let (room_id, request_id) = (header.room_id(), header.request_id());
        let redact = match redact_request(frame) {
            Ok(redact) => redact,
            Err(reply) => {
                self.metrics.rejected(ErrorCode::MalformedPayload);
                return reply;
            }
        };
        let result = self.node.member_redact(room_id, redact.log_index, sender, &redact.reason).await;
        if let Err(error) = &result {
            self.metrics.rejected(error.error_code());
        }
        redact_reply(room_id, request_id, &result)
    }
}

/// Where a graceful shutdown is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ShutdownPhase {
    /// Serving.
    Running,
    /// No new connections, no new frames read; the room core is flushing.
    Draining,
    /// Everything accepted is durable and acknowledged: connections say goodbye and close.
    Drained,
}

/// Resolves once the phase is at least `phase` (or the sender is gone).
pub async fn reached(stop: &mut watch::Receiver<ShutdownPhase>, phase: ShutdownPhase) {
    loop {
        if *stop.borrow_and_update() >= phase {
            return;
        }
        if stop.changed().await.is_err() {
            return;
        }
    }
}

/// Time the writer gets to flush a closing connection.
const WRITER_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// One connection's state in the driver.
struct ConnectionState {
    id: u64,
    session: Session,
    /// The send stream until authentication; then the writer task owns it.
    send: Option<quinn::SendStream>,
    outbox: Option<Arc<Outbox>>,
    writer: Option<tokio::task::JoinHandle<()>>,
    bucket: TokenBucket,
}

impl ConnectionState {
    /// Writes a control frame: directly before authentication, as a notice
    /// (ahead of queued frames) after.
    async fn write(&mut self, frame: Bytes) {
        if let Some(outbox) = &self.outbox {
            outbox.notice(frame);
        } else if let Some(send) = &mut self.send {
            let _ = send.write_all(&frame).await;
        }
    }
}

async fn refuse(connection: &quinn::Connection, code: ErrorCode, message: &str) {
    if let Ok(Ok((mut send, _recv))) =
        tokio::time::timeout(Duration::from_secs(2), connection.accept_bi()).await
    {
        let _ = send.write_all(&error_frame(RoomId::default(), 0, code, message)).await;
        let _ = send.finish();
        let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
    }
    connection.close(quinn::VarInt::from_u32(u32::from(code.to_u16())), message.as_bytes());
}

/// Drains the outbox: every wake-up takes all that is queued and writes it
/// with one stream write (the frames are shared, not copied), so a burst of
/// deliveries costs one wake-up and as few packets as the bytes need.
async fn write_loop(
    mut send: quinn::SendStream,
    mut receiver: crate::node::OutboxReceiver,
    metrics: crate::admin::metrics::Metrics,
) {
    let mut batch = std::collections::VecDeque::new();
    loop {
        let next = receiver.next_batch(&mut batch).await;
        let count = batch.len() as u64;
        if send.write_all_chunks(batch.make_contiguous()).await.is_err() {
            break;
        }
        metrics.frames_out(count);
        crate::transport::outbox::recycle_batch(&mut batch);
        if next == Outgoing::Close {
            break;
        }
    }
    let _ = send.finish();
    let _ = tokio::time::timeout(WRITER_DRAIN_TIMEOUT, send.stopped()).await;
}

#[cfg(test)]
mod address_tests {
    use super::*;

    #[test]
    fn the_connection_cap_counts_an_ipv6_slash_64_as_one_address() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff:ffff:ffff:ffff".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(connection_limit_key(a), connection_limit_key(b));
        assert_ne!(connection_limit_key(a), connection_limit_key(other));
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(connection_limit_key(v4), v4);
        assert_eq!(connection_limit_key("::ffff:192.0.2.7".parse().unwrap()), v4);
        assert_ne!(connection_limit_key("192.0.2.8".parse().unwrap()), v4);
    }
}
